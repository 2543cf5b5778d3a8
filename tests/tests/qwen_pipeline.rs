//! Qwen-Image text mode end to end against diffusers' own `QwenImagePipeline` run
//! (`tests/fixtures/qwen-image-pipeline-tiny`: a complete pipeline folder with tiny components):
//! a denoiser serving the folder, a controller, real gRPC. Prompt and negative prompt in,
//! latents and PNG out, equal to what diffusers computed with true CFG; the stages through the
//! RPCs (EncodePrompt, Decode); each CFG branch's TeaCache decisions; bad input.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use teaserve_controller::models;
use teaserve_controller::policy::{BranchState, TeaCacheParams};
use teaserve_denoiser::loader::{HubOptions, resolve, var_builder};
use teaserve_denoiser::models::qwen_image::{Config as QwenConfig, Inputs, QwenImage};
use teaserve_denoiser::registry::LoadOptions;
use teaserve_proto::encode_tensor;
use teaserve_proto::v1::{self, DType};
use teaserve_tests::{
    CfgCombine, PipelineReference as Reference, RecordingProxy, Residuals, TestController,
    TestDenoiser, check_within, decode, fixtures_dir, generate_run, max_abs_diff, png_pixels,
    qwen_cfg_reference,
};
use tonic::Code;

const MODEL: &str = "QwenImagePipeline";

/// The pipeline call of a case as a GenerateRequest, with the recorded initial noise.
fn request(r: &Reference, case: &str, adapter: &str) -> v1::GenerateRequest {
    let c = &r.cases[case];
    let noise = encode_tensor(r.get(case, "latents_init"), DType::F32).unwrap();
    v1::GenerateRequest {
        model_class_name: MODEL.into(),
        cache_adapter: adapter.into(),
        prompt: r.str(case, "prompt"),
        negative_prompt: Some(r.str(case, "negative_prompt")),
        true_cfg_scale: c["true_cfg_scale"].as_f64(),
        height: r.u32(case, "height"),
        width: r.u32(case, "width"),
        num_inference_steps: r.u32(case, "num_inference_steps"),
        inputs: HashMap::from([("hidden_states".to_string(), noise)]),
        ..Default::default()
    }
}

fn folder() -> String {
    fixtures_dir()
        .join("qwen-image-pipeline-tiny")
        .to_string_lossy()
        .into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encode_prompt_and_decode_match_the_pipeline_stages() {
    let r = Reference::load("qwen-image-pipeline-tiny");
    let d = TestDenoiser::start(&["--model", &folder()]).await;
    let mut c = d.client().await;
    let describe = c
        .describe(v1::DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(describe.model_type, MODEL);
    assert!(describe.text_mode && !describe.guidance_embeds);
    assert_eq!(describe.components, ["text_encoders", "transformer", "vae"]);
    assert_eq!(describe.max_sequence_length, 512);
    assert!(describe.scheduler_config_json.contains("shift_terminal"));
    for case in r.cases.keys() {
        for (field, prefix) in [("prompt", ""), ("negative_prompt", "negative_")] {
            let resp = c
                .encode_prompt(v1::EncodePromptRequest {
                    prompts: vec![r.str(case, field)],
                    height: r.u32(case, "height"),
                    width: r.u32(case, "width"),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            check_within(
                &format!("{case} {prefix}prompt_embeds (EncodePrompt)"),
                &decode(&resp.inputs["encoder_hidden_states"]),
                r.get(case, &format!("{prefix}prompt_embeds")),
                1e-4,
            );
            // An all-ones mask is dropped, as encode_prompt does.
            assert!(!resp.inputs.contains_key("encoder_hidden_states_mask"));
            let shapes: Vec<f32> = decode(&resp.inputs["img_shapes"])
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let want: Vec<f32> = r.cases[case]["img_shapes"][0][0]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(shapes, want, "{case} img_shapes");
            let init = r.get(case, "latents_init");
            let dims: Vec<i64> = init.dims().iter().map(|&d| d as i64).collect();
            assert_eq!(resp.latent_shape, dims);
            let kept = r
                .get(case, &format!("{prefix}prompt_embeds"))
                .dim(1)
                .unwrap();
            assert_eq!(resp.prompt_tokens[0].kept["qwen2_5_vl"], kept as u32);
        }
        let png = c
            .decode(v1::DecodeRequest {
                latents: Some(encode_tensor(r.get(case, "latents_final"), DType::F32).unwrap()),
                height: r.u32(case, "height"),
                width: r.u32(case, "width"),
            })
            .await
            .unwrap()
            .into_inner()
            .png;
        check_within(
            &format!("{case} Decode pixels"),
            &png_pixels(&png[0]),
            &r.image_uint8(case),
            1.0,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_and_negative_prompt_become_the_pipelines_picture() {
    let r = Reference::load("qwen-image-pipeline-tiny");
    let d = TestDenoiser::start(&["--model", &folder()]).await;
    let (url, proxy) = RecordingProxy::start(&d).await;
    // The wire mode (padded branch batching is what is checked); resident mode is checked in
    // tests/tests/resident.rs.
    let ctl = TestController::start(&["--denoiser", &url, "--resident-tensors", "false"]).await;
    let unbatched = TestController::start(&[
        "--denoiser",
        &url,
        "--batch-cfg",
        "false",
        "--resident-tensors",
        "false",
    ])
    .await;
    // Resident mode (the default): the branches run one after the other on the denoiser, so
    // it gives exactly what separate wire calls give.
    let resident = TestController::start(&["--denoiser", &url]).await;
    let mut c = ctl.client().await;
    // TeaCache off, and on at a threshold below every step's accumulated distance (so it
    // computes every step, through the TeaCache path).
    for (adapter, thresh) in [("none", None), ("tea_cache", Some(1e-9))] {
        for case in r.cases.keys() {
            let mut req = request(&r, case, adapter);
            req.cache_config = thresh.map(|t| v1::CacheConfig {
                rel_l1_thresh: Some(t),
                ..Default::default()
            });
            proxy.clear();
            let run = generate_run(&mut c, req.clone()).await.unwrap();
            let steps = r.u32(case, "num_inference_steps") as usize;
            // The branches' texts differ in length; padded with a key mask, they still go
            // in one RunBlocks call per step, and give what separate calls give.
            assert_eq!(
                proxy.log.lock().unwrap().run_blocks,
                steps,
                "one call per step"
            );
            let apart = generate_run(&mut unbatched.client().await, req.clone())
                .await
                .unwrap();
            let kept = generate_run(&mut resident.client().await, req)
                .await
                .unwrap();
            assert_eq!(
                max_abs_diff(
                    &decode(kept.result.latents.as_ref().unwrap()),
                    &decode(apart.result.latents.as_ref().unwrap())
                ),
                0.0,
                "{case} {adapter}: resident mode differs from separate wire calls"
            );
            assert_eq!(
                png_pixels(&kept.result.image_png).to_vec3::<f32>().unwrap(),
                png_pixels(&apart.result.image_png)
                    .to_vec3::<f32>()
                    .unwrap()
            );
            check_within(
                &format!("{case} {adapter} batched vs unbatched branches"),
                &decode(run.result.latents.as_ref().unwrap()),
                &decode(apart.result.latents.as_ref().unwrap()),
                1e-5,
            );
            assert_eq!(run.steps.len(), steps);
            let sigmas: Vec<f32> = r.get(case, "sigmas").to_vec1().unwrap();
            for (ev, want) in run.steps.iter().zip(&sigmas) {
                assert_eq!(ev.sigma as f32, *want, "{case} step {} sigma", ev.step);
                assert_eq!(ev.branches.len(), 2, "true CFG: two branches");
            }
            assert_eq!(run.result.computed_steps as usize, 2 * steps);
            check_within(
                &format!("{case} {adapter} final latents (gRPC)"),
                &decode(run.result.latents.as_ref().unwrap()),
                r.get(case, "latents_final"),
                1e-3,
            );
            check_within(
                &format!("{case} {adapter} PNG pixels (gRPC)"),
                &png_pixels(&run.result.image_png),
                &r.image_uint8(case),
                2.0,
            );
        }
    }
}

/// The fixture's transformer in-process, through the real loading code.
fn transformer() -> QwenImage {
    let files = resolve(&folder(), None, &HubOptions::default()).unwrap();
    let config: QwenConfig = serde_json::from_str(&files.config_json).unwrap();
    let opts = LoadOptions {
        device: Device::Cpu,
        dtype: candle_core::DType::F32,
        components: Vec::new(),
    };
    QwenImage::new(&config, var_builder(&files, &opts).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_branch_decides_on_its_own_modulated_inputs_as_the_pure_policy() {
    let r = Reference::load("qwen-image-pipeline-tiny");
    let model = transformer();
    let d = TestDenoiser::start(&["--model", &folder()]).await;
    let (url, proxy) = RecordingProxy::start(&d).await;
    let ctl = TestController::start(&["--denoiser", &url, "--resident-tensors", "false"]).await;
    let mut c = ctl.client().await;
    let thresh = 0.4;
    let p = TeaCacheParams {
        rel_l1_thresh: thresh,
        coefficients: models::lookup(MODEL).unwrap().coefficients,
        warmup_steps: 0,
        cooldown_steps: 0,
        max_consecutive_reuses: None,
    };
    let mut reused = 0;
    for case in r.cases.keys() {
        proxy.clear();
        let mut req = request(&r, case, "tea_cache");
        req.cache_config = Some(v1::CacheConfig {
            rel_l1_thresh: Some(thresh),
            ..Default::default()
        });
        let run = generate_run(&mut c, req).await.unwrap();
        let steps = run.steps.len();
        let recorded = proxy.log.lock().unwrap().modulated.clone();
        // Branches told apart by the length of the text they carry (the fixture's positive
        // and negative prompts embed to different lengths).
        let pos_len = r.get(case, "prompt_embeds").dim(1).unwrap() as i64;
        let mut per_branch: [Vec<&Tensor>; 2] = [Vec::new(), Vec::new()];
        for (_, text, m) in &recorded {
            per_branch[usize::from(text.shape[1] != pos_len)].push(m);
        }
        let mut pattern = String::new();
        for (k, ms) in per_branch.iter().enumerate() {
            assert_eq!(ms.len(), steps, "{case} branch {k}");
            let mut state = BranchState::new();
            for (i, (m, ev)) in ms.iter().zip(&run.steps).enumerate() {
                let values: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
                let want = state.decide(&p, i, steps, m.dims(), &values);
                let got = &ev.branches[k];
                assert_eq!(
                    got.branch,
                    [v1::Branch::Positive, v1::Branch::Negative][k] as i32
                );
                assert_eq!(
                    (got.computed, got.rel_l1, got.rescaled, got.accumulated),
                    (want.compute, want.rel_l1, want.rescaled, want.accumulated),
                    "{case} branch {k} step {i}"
                );
                pattern.push(if got.computed { 'C' } else { '.' });
            }
            pattern.push(' ');
        }
        eprintln!("TeaCache {thresh} on {case} (positive, negative): {pattern}");
        reused += run.result.reused_steps;
        // The latents equal an in-process loop with per-branch state and residuals.
        let branch = |prefix: &str| Inputs {
            hidden_states: r.get(case, "latents_init").clone(),
            encoder_hidden_states: r.get(case, &format!("{prefix}prompt_embeds")).clone(),
            encoder_hidden_states_mask: None,
            timestep: Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap(),
            img_shape: (
                1,
                r.u32(case, "height") as usize / 16,
                r.u32(case, "width") as usize / 16,
            ),
        };
        let sigmas: Vec<f64> = run.steps.iter().map(|s| s.sigma).chain([0.0]).collect();
        let (want, decisions) = qwen_cfg_reference(
            &model,
            [&branch(""), &branch("negative_")],
            &sigmas,
            Some(&p),
            CfgCombine {
                scale: 4.0,
                renorm: true,
            },
            Residuals::PerBranch,
        );
        let streamed: Vec<[bool; 2]> = run
            .steps
            .iter()
            .map(|s| [s.branches[0].computed, s.branches[1].computed])
            .collect();
        assert_eq!(streamed, decisions, "{case}");
        check_within(
            &format!("{case} TeaCache {thresh} latents vs in-process loop"),
            &decode(run.result.latents.as_ref().unwrap()),
            &want,
            1e-4,
        );
        assert!(!run.result.image_png.is_empty());
    }
    assert!(reused > 0, "TeaCache {thresh} reused nothing");
}

/// A change that makes a valid request invalid, and what the error must say.
type Edit = fn(&mut v1::GenerateRequest);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_text_mode_requests_are_clear_invalid_arguments() {
    let r = Reference::load("qwen-image-pipeline-tiny");
    let d = TestDenoiser::start(&["--model", &folder()]).await;
    let ctl = TestController::start(&["--denoiser", &d.url()]).await;
    let mut c = ctl.client().await;
    let mut base = request(&r, "case0", "none");
    base.inputs.clear();
    base.num_inference_steps = 2;
    let cases: [(Edit, &[&str]); 7] = [
        (
            |q| q.height = 72,
            &["height 72", "multiple of 16", "nearest accepted: 64 x 64"],
        ),
        (|q| q.width = 8192, &["at most 4096"]),
        (
            |q| q.true_cfg_scale = Some(f64::NAN),
            &["true_cfg_scale", "finite", "NaN"],
        ),
        (
            |q| q.true_cfg_scale = Some(-1.0),
            &["true_cfg_scale", ">= 0", "-1"],
        ),
        (
            |q| q.max_sequence_length = 1025,
            &["max_sequence_length 1025", "limit of 1024"],
        ),
        (
            |q| q.prompt = "fox ".repeat(1500),
            &[
                "prompt 'fox fox",
                "more than the 1058",
                "at most 1019 tokens",
            ],
        ),
        (
            |q| q.negative_prompt = Some("fox ".repeat(1500)),
            &["negative_prompt: the prompt 'fox fox", "more than the 1058"],
        ),
    ];
    for (edit, says) in cases {
        let mut req = base.clone();
        edit(&mut req);
        let err = generate_run(&mut c, req).await.err().unwrap();
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        for s in says {
            assert!(err.message().contains(s), "{s}: {}", err.message());
        }
        assert!(err.message().len() < 1000, "{}", err.message());
    }
    // Guidance: Qwen-Image has no guidance embedding.
    let mut req = base.clone();
    req.guidance_scale = Some(3.5);
    let err = generate_run(&mut c, req).await.err().unwrap();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("no guidance embedding"),
        "{}",
        err.message()
    );
    // The service is unharmed: a good request still works.
    let run = generate_run(&mut c, base).await.unwrap();
    assert!(!run.result.image_png.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_prompt_presence_and_scale_decide_cfg_as_diffusers() {
    let r = Reference::load("qwen-image-pipeline-tiny");
    let d = TestDenoiser::start(&["--model", &folder()]).await;
    let ctl = TestController::start(&["--denoiser", &d.url()]).await;
    let mut c = ctl.client().await;
    let mut base = request(&r, "case0", "none");
    base.num_inference_steps = 2;
    let branches = |run: &teaserve_tests::GenerateRun| run.steps[0].branches.len();
    // An empty negative prompt turns CFG on.
    let mut req = base.clone();
    req.negative_prompt = Some(String::new());
    let empty = generate_run(&mut c, req).await.unwrap();
    assert_eq!(branches(&empty), 2);
    // No negative prompt: one branch.
    let mut req = base.clone();
    req.negative_prompt = None;
    let none = generate_run(&mut c, req).await.unwrap();
    assert_eq!(branches(&none), 1);
    // A scale of 1 or less ignores the negative prompt (diffusers warns and runs without).
    let mut req = base.clone();
    req.true_cfg_scale = Some(1.0);
    let one = generate_run(&mut c, req).await.unwrap();
    assert_eq!(branches(&one), 1);
    assert_eq!(
        max_abs_diff(
            &decode(one.result.latents.as_ref().unwrap()),
            &decode(none.result.latents.as_ref().unwrap())
        ),
        0.0
    );
    // cfg_renorm unset is the pipeline's (on); off differs.
    let mut req = base.clone();
    req.cfg_renorm = Some(true);
    let on = generate_run(&mut c, req.clone()).await.unwrap();
    let default = generate_run(&mut c, base.clone()).await.unwrap();
    req.cfg_renorm = Some(false);
    let off = generate_run(&mut c, req).await.unwrap();
    let lat = |run: &teaserve_tests::GenerateRun| decode(run.result.latents.as_ref().unwrap());
    assert_eq!(max_abs_diff(&lat(&on), &lat(&default)), 0.0);
    assert!(max_abs_diff(&lat(&on), &lat(&off)) > 1e-3);
}
