//! FirstBlockCache, MagCache and TaylorSeer end to end against diffusers' own hooks
//! (`tests/fixtures/policies`: diffusers 0.42.1's `enable_cache` run inside the unmodified
//! FluxPipeline / QwenImagePipeline on the tiny pipeline folders, with every hook decision
//! recorded). A denoiser serving the folder, a controller, real gRPC: every decision per step
//! and branch equals diffusers', with the numbers it decided from; final latents within 1e-3
//! and pixels within 2/255 of diffusers'. `Calibrate` produces diffusers' MagCache ratios.
//! Bad settings are clear INVALID_ARGUMENTs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use teaserve_proto::encode_tensor;
use teaserve_proto::v1::{self, DType};
use teaserve_tests::{
    RecordingProxy, TestController, TestDenoiser, check_within, decode, fixtures_dir, generate_run,
    png_pixels,
};
use tokio_stream::StreamExt as _;
use tonic::Code;

/// One recorded diffusers run: its JSON and tensors.
struct Run {
    json: serde_json::Value,
    tensors: HashMap<String, Tensor>,
}

fn policies_dir(pipeline: &str) -> PathBuf {
    fixtures_dir().join("policies").join(pipeline)
}

fn load(pipeline: &str, name: &str) -> Run {
    let dir = policies_dir(pipeline);
    let json =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap())
            .unwrap();
    let tensors =
        candle_core::safetensors::load(dir.join(format!("{name}.safetensors")), &Device::Cpu)
            .unwrap();
    Run { json, tensors }
}

fn model_type(pipeline: &str) -> &'static str {
    if pipeline.starts_with("flux") {
        "FluxPipeline"
    } else {
        "QwenImagePipeline"
    }
}

/// The recorded pipeline call as a GenerateRequest with the recorded initial noise; the text
/// length is the case's (`cases.json`).
fn request(pipeline: &str, call: &serde_json::Value, latents: &Tensor) -> v1::GenerateRequest {
    let noise = encode_tensor(latents, DType::F32).unwrap();
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(policies_dir(pipeline).join("cases.json")).unwrap(),
    )
    .unwrap();
    v1::GenerateRequest {
        max_sequence_length: cases["cases"]["p0"]["max_sequence_length"]
            .as_u64()
            .map_or(0, |v| v as u32),
        model_class_name: model_type(pipeline).into(),
        prompt: call["prompt"].as_str().unwrap().into(),
        negative_prompt: call["negative_prompt"].as_str().map(str::to_string),
        true_cfg_scale: call["true_cfg_scale"].as_f64(),
        guidance_scale: call["guidance_scale"].as_f64(),
        height: call["height"].as_u64().unwrap() as u32,
        width: call["width"].as_u64().unwrap() as u32,
        num_inference_steps: call["num_inference_steps"].as_u64().unwrap() as u32,
        inputs: HashMap::from([("hidden_states".to_string(), noise)]),
        ..Default::default()
    }
}

/// The policy and its settings of a recorded run, as teaserve's cache_config names them.
fn cache(run: &Run) -> (&'static str, v1::CacheConfig) {
    let s = &run.json["settings"];
    match run.json["policy"].as_str().unwrap() {
        "firstblockcache" => (
            "first_block_cache",
            v1::CacheConfig {
                threshold: s["threshold"].as_f64(),
                ..Default::default()
            },
        ),
        "magcache" => (
            "mag_cache",
            v1::CacheConfig {
                threshold: s["threshold"].as_f64(),
                max_skip_steps: s["max_skip_steps"].as_u64().map(|v| v as u32),
                retention_ratio: s["retention_ratio"].as_f64(),
                mag_ratios: run.json["hooks"]["mag_ratios_used"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect(),
                ..Default::default()
            },
        ),
        "taylorseer" => (
            "taylor_seer",
            v1::CacheConfig {
                cache_interval: s["cache_interval"].as_u64().map(|v| v as u32),
                disable_cache_before_step: s["disable_cache_before_step"]
                    .as_u64()
                    .map(|v| v as u32),
                max_order: s["max_order"].as_u64().map(|v| v as u32),
                taylor_factors_dtype: s["taylor_factors_dtype"]
                    .as_str()
                    .unwrap_or_default()
                    .into(),
                ..Default::default()
            },
        ),
        p => panic!("no policy {p}"),
    }
}

fn branch_of(name: &str) -> i32 {
    match name {
        "cond" => v1::Branch::Positive as i32,
        "uncond" => v1::Branch::Negative as i32,
        b => panic!("branch {b}"),
    }
}

fn folder(pipeline: &str) -> String {
    fixtures_dir().join(pipeline).to_string_lossy().into_owned()
}

/// Every decision of `run` (per step and branch) as diffusers recorded it, and the number it
/// compared: FirstBlockCache's rel_diff, MagCache's accumulated error.
fn check_decisions(what: &str, run: &Run, got: &[v1::StepEvent]) {
    let records = run.json["records"].as_array().unwrap();
    let mut checked = 0;
    for r in records {
        let step = r["step"].as_u64().unwrap() as usize;
        let branch = branch_of(r["branch"].as_str().unwrap());
        let ev = &got[step];
        let b = ev
            .branches
            .iter()
            .find(|b| b.branch == branch)
            .unwrap_or_else(|| panic!("{what}: step {step} has no branch {branch}"));
        let want = r["decision"].as_str().unwrap() == "compute";
        assert_eq!(
            b.computed, want,
            "{what}: step {step} branch {branch} decision"
        );
        let number = |k: &str| b.numbers.get(k).copied();
        if let Some(d) = r["rel_diff"].as_f64() {
            let g = number("rel_diff").unwrap();
            assert!(
                (g - d).abs() <= 1e-4 * d.abs().max(1.0),
                "{what}: step {step} rel_diff {g} vs {d}"
            );
        }
        if let Some(e) = r["accumulated_err_tested"].as_f64() {
            let g = number("accumulated_err").unwrap();
            assert!(
                (g - e).abs() <= 1e-6,
                "{what}: step {step} accumulated_err {g} vs {e}"
            );
        }
        checked += 1;
    }
    let branches = got.first().map_or(0, |e| e.branches.len());
    assert_eq!(checked, got.len() * branches, "{what}: every call recorded");
}

async fn policy_runs_as_diffusers(pipeline: &str, runs: &[&str]) {
    let d = TestDenoiser::start(&["--model", &folder(pipeline)]).await;
    // The default controller (resident mode: MagCache keeps its tensors on the denoiser,
    // FirstBlockCache and TaylorSeer run their steps on the wire) and a wire-mode one, which
    // must give the same bits; it runs the branches one by one, as resident mode does (a
    // batched call with padded text rounds differently in the last bits).
    let ctl = TestController::start(&["--denoiser", &d.url()]).await;
    let wire = TestController::start(&[
        "--denoiser",
        &d.url(),
        "--resident-tensors",
        "false",
        "--batch-cfg",
        "false",
    ])
    .await;
    let mut c = ctl.client().await;
    // ListModels lists the policies and the model's default MagCache ratios.
    let models = c
        .list_models(v1::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    let m = models
        .iter()
        .find(|m| m.model_type == model_type(pipeline))
        .unwrap();
    for a in [
        "none",
        "tea_cache",
        "first_block_cache",
        "mag_cache",
        "taylor_seer",
    ] {
        assert!(m.cache_adapters.iter().any(|x| x == a), "{a} not listed");
    }
    assert_eq!(
        m.mag_ratios.len(),
        if pipeline.starts_with("flux") { 28 } else { 0 }
    );
    for name in runs {
        let run = load(pipeline, name);
        let what = format!("{pipeline} {name}");
        let mut req = request(pipeline, &run.json["call"], &run.tensors["latents_init"]);
        let (adapter, config) = cache(&run);
        req.cache_adapter = adapter.into();
        req.cache_config = Some(config);
        let got = generate_run(&mut c, req.clone()).await.unwrap();
        let on_wire = generate_run(&mut wire.client().await, req).await.unwrap();
        assert_eq!(
            decode(got.result.latents.as_ref().unwrap())
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            decode(on_wire.result.latents.as_ref().unwrap())
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            "{what}: resident and wire mode differ"
        );
        assert_eq!(
            got.steps
                .iter()
                .map(|e| e.branches.iter().map(|b| b.computed).collect::<Vec<_>>())
                .collect::<Vec<_>>(),
            on_wire
                .steps
                .iter()
                .map(|e| e.branches.iter().map(|b| b.computed).collect::<Vec<_>>())
                .collect::<Vec<_>>(),
            "{what}: resident and wire decisions differ"
        );
        for ev in &got.steps {
            for b in &ev.branches {
                assert_eq!(b.policy, adapter, "{what}: the deciding policy");
            }
        }
        check_decisions(&what, &run, &got.steps);
        // teaserve counts a forecast step as not computed, like a reused one.
        let reused: u64 = run.json["counts"]
            .as_object()
            .unwrap()
            .values()
            .map(|c| c["reused"].as_u64().unwrap() + c["forecast"].as_u64().unwrap())
            .sum();
        assert_eq!(u64::from(got.result.reused_steps), reused, "{what}: reused");
        assert!(reused > 0, "{what}: the fixture reuses");
        check_within(
            &format!("{what} final latents"),
            &decode(got.result.latents.as_ref().unwrap()),
            &run.tensors["latents_final"],
            1e-3,
        );
        let want_px = run.tensors["image_uint8"]
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        check_within(
            &format!("{what} pixels"),
            &png_pixels(&got.result.image_png),
            &want_px,
            2.0,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flux_first_block_cache_mag_cache_and_taylor_seer_decide_as_diffusers() {
    policy_runs_as_diffusers(
        "flux-pipeline-tiny",
        &[
            "p0__fbc_t0.7",
            "p0__magcache_cal_t0.1",
            "p0__taylorseer_o2_i3",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qwen_first_block_cache_mag_cache_and_taylor_seer_decide_as_diffusers() {
    policy_runs_as_diffusers(
        "qwen-image-pipeline-tiny",
        &[
            "p0__fbc_t1.2",
            "p0__magcache_cal_t0.25",
            "p0__taylorseer_o2_i3",
        ],
    )
    .await;
}

/// Calibrate on the fixture's call gives diffusers' `calibrate=True` ratios (the 'cond' list).
async fn calibrate_as_diffusers(pipeline: &str) {
    let dir = policies_dir(pipeline);
    let cal: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("magcache_calibration_p0.json")).unwrap(),
    )
    .unwrap();
    let want: Vec<f64> = cal["calibration_ratios"]["cond"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    // The calibration ran on the case's own noise, which every run of the case records.
    let run = load(
        pipeline,
        if pipeline.starts_with("flux") {
            "p0__fbc_t0.7"
        } else {
            "p0__fbc_t1.2"
        },
    );
    let d = TestDenoiser::start(&["--model", &folder(pipeline)]).await;
    let ctl = TestController::start(&["--denoiser", &d.url()]).await;
    let mut c = ctl.client().await;
    let req = request(pipeline, &cal["call"], &run.tensors["latents_init"]);
    let mut stream = c
        .calibrate(v1::CalibrateRequest {
            model_class_name: model_type(pipeline).into(),
            requests: vec![req],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut result = None;
    while let Some(ev) = stream.next().await {
        if let Some(v1::calibrate_event::Event::Result(r)) = ev.unwrap().event {
            result = Some(r);
        }
    }
    let got = result.unwrap().mag_ratios;
    assert_eq!(got.len(), want.len(), "{pipeline}: one ratio per step");
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4,
            "{pipeline} step {k}: {g} vs diffusers {w}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calibrate_gives_diffusers_mag_cache_ratios() {
    calibrate_as_diffusers("flux-pipeline-tiny").await;
    calibrate_as_diffusers("qwen-image-pipeline-tiny").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_policy_settings_are_invalid_arguments() {
    let d = TestDenoiser::start(&["--model", &folder("qwen-image-pipeline-tiny")]).await;
    let ctl = TestController::start(&["--denoiser", &d.url()]).await;
    let mut c = ctl.client().await;
    let run = load("qwen-image-pipeline-tiny", "p0__fbc_t1.2");
    let base = request(
        "qwen-image-pipeline-tiny",
        &run.json["call"],
        &run.tensors["latents_init"],
    );
    let cases: Vec<(&str, v1::CacheConfig, &str)> = vec![
        (
            "first_block_cache",
            v1::CacheConfig {
                threshold: Some(-1.0),
                ..Default::default()
            },
            "threshold must be a finite number >= 0",
        ),
        (
            "mag_cache",
            v1::CacheConfig {
                threshold: Some(f64::NAN),
                mag_ratios: vec![1.0],
                ..Default::default()
            },
            "threshold must be a finite number >= 0",
        ),
        (
            "mag_cache",
            v1::CacheConfig {
                retention_ratio: Some(1.5),
                mag_ratios: vec![1.0],
                ..Default::default()
            },
            "retention_ratio must be a number in [0, 1]",
        ),
        (
            "mag_cache",
            v1::CacheConfig {
                mag_ratios: vec![1.0, -2.0],
                ..Default::default()
            },
            "mag_ratios must be 1 to 1000 finite numbers > 0",
        ),
        (
            "mag_cache",
            v1::CacheConfig::default(),
            "mag_cache needs mag_ratios for model 'QwenImagePipeline'",
        ),
        (
            "taylor_seer",
            v1::CacheConfig {
                cache_interval: Some(0),
                ..Default::default()
            },
            "cache_interval must be >= 1",
        ),
        (
            "taylor_seer",
            v1::CacheConfig {
                max_order: Some(9),
                ..Default::default()
            },
            "max_order must be 0 to 8",
        ),
        (
            "taylor_seer",
            v1::CacheConfig {
                taylor_factors_dtype: "int8".into(),
                ..Default::default()
            },
            "taylor_factors_dtype must be 'bfloat16', 'float32' or 'float16', got 'int8'",
        ),
        (
            "magic_cache",
            v1::CacheConfig::default(),
            "Supported: ['none', 'tea_cache', 'first_block_cache', 'mag_cache', 'taylor_seer']",
        ),
    ];
    for (adapter, config, want) in cases {
        let mut req = base.clone();
        req.cache_adapter = adapter.into();
        req.cache_config = Some(config);
        let err = generate_run(&mut c, req).await.err().unwrap();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{adapter}: {}",
            err.message()
        );
        assert!(err.message().contains(want), "{adapter}: {}", err.message());
        assert!(err.message().len() < 600, "bounded: {}", err.message());
    }
}

/// MagCache in resident mode when the denoiser keeps nothing (a 1-byte store: every kept
/// tensor is evicted at once) rebuilds what it lacks and still gives diffusers' result, bit
/// for bit what a roomy store gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mag_cache_survives_a_store_that_keeps_nothing() {
    let pipeline = "qwen-image-pipeline-tiny";
    let run = load(pipeline, "p0__magcache_cal_t0.25");
    let mut req = request(pipeline, &run.json["call"], &run.tensors["latents_init"]);
    let (adapter, config) = cache(&run);
    req.cache_adapter = adapter.into();
    req.cache_config = Some(config);
    let mut got = Vec::new();
    for store in ["4294967296", "1"] {
        let d =
            TestDenoiser::start(&["--model", &folder(pipeline), "--resident-bytes", store]).await;
        let ctl = TestController::start(&["--denoiser", &d.url()]).await;
        let out = generate_run(&mut ctl.client().await, req.clone())
            .await
            .unwrap();
        got.push(
            decode(out.result.latents.as_ref().unwrap())
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
    }
    assert_eq!(got[0], got[1], "evictions changed the result");
    let want: Vec<f32> = run.tensors["latents_final"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let worst = got[1]
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst <= 1e-3, "{worst}");
}

/// A fleet with a denoiser from before block ranges (Describe without num_blocks): the
/// policies whose RunBlocks fields it would ignore are refused with FAILED_PRECONDITION, not
/// run wrongly; MagCache and TeaCache still run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_denoiser_refuses_what_it_cannot_do() {
    let pipeline = "flux-pipeline-tiny";
    let d = TestDenoiser::start(&["--model", &folder(pipeline)]).await;
    let (url, proxy) = RecordingProxy::start(&d).await;
    proxy
        .hide_num_blocks
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let ctl = TestController::start(&["--denoiser", &url]).await;
    let mut c = ctl.client().await;
    for name in [
        "p0__fbc_t0.7",
        "p0__taylorseer_o2_i3",
        "p0__magcache_cal_t0.1",
    ] {
        let run = load(pipeline, name);
        let mut req = request(pipeline, &run.json["call"], &run.tensors["latents_init"]);
        let (adapter, config) = cache(&run);
        req.cache_adapter = adapter.into();
        req.cache_config = Some(config);
        match (adapter, generate_run(&mut c, req).await) {
            ("mag_cache", got) => assert!(got.is_ok(), "{:?}", got.err()),
            (_, Err(e)) => {
                assert_eq!(
                    e.code(),
                    Code::FailedPrecondition,
                    "{adapter}: {}",
                    e.message()
                );
                assert!(
                    e.message().contains("run blocks by range"),
                    "{}",
                    e.message()
                );
            }
            (_, Ok(_)) => panic!("{adapter} ran on a denoiser that ignores its fields"),
        }
    }
}
