//! FLUX text mode end to end against diffusers' own `FluxPipeline` run
//! (`tests/fixtures/flux-pipeline-tiny`: a complete pipeline folder with tiny components):
//! a denoiser serving the folder, a controller, real gRPC. Prompt in, latents and PNG out,
//! equal to what diffusers computed; the stages through the RPCs (EncodePrompt, Decode);
//! TeaCache's decisions; components split over two denoisers; bad input.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use teaserve_controller::models;
use teaserve_controller::policy::{BranchState, TeaCacheParams};
use teaserve_proto::encode_tensor;
use teaserve_proto::v1::{self, DType};
use teaserve_tests::{
    PipelineReference as Reference, RecordingProxy, TestController, TestDenoiser, check_within,
    decode, fixtures_dir, generate_run, max_abs_diff, png_pixels,
};
use tonic::Code;

/// The pipeline call of a case as a GenerateRequest, with the recorded initial noise.
fn request(r: &Reference, case: &str, adapter: &str) -> v1::GenerateRequest {
    let c = &r.cases[case];
    let noise = encode_tensor(r.get(case, "latents_init"), DType::F32).unwrap();
    v1::GenerateRequest {
        model_class_name: "FluxPipeline".into(),
        cache_adapter: adapter.into(),
        prompt: c["prompt"].as_str().unwrap().into(),
        height: r.u32(case, "height"),
        width: r.u32(case, "width"),
        num_inference_steps: r.u32(case, "num_inference_steps"),
        guidance_scale: c["guidance_scale"].as_f64(),
        max_sequence_length: r.u32(case, "max_sequence_length"),
        inputs: HashMap::from([("hidden_states".to_string(), noise)]),
        ..Default::default()
    }
}

fn folder() -> String {
    fixtures_dir()
        .join("flux-pipeline-tiny")
        .to_string_lossy()
        .into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encode_prompt_and_decode_match_the_pipeline_stages() {
    let r = Reference::load("flux-pipeline-tiny");
    let d = TestDenoiser::start(&["--model", &folder()]).await;
    let mut c = d.client().await;
    let describe = c
        .describe(v1::DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(describe.model_type, "FluxPipeline");
    assert!(describe.text_mode && describe.guidance_embeds);
    assert_eq!(describe.components, ["text_encoders", "transformer", "vae"]);
    assert_eq!(describe.max_sequence_length, 512);
    assert_eq!(
        (describe.default_height, describe.default_width),
        (1024, 1024)
    );
    assert!(
        describe
            .scheduler_config_json
            .contains("use_dynamic_shifting")
    );
    for case in r.cases.keys() {
        let resp = c
            .encode_prompt(v1::EncodePromptRequest {
                prompts: vec![r.cases[case]["prompt"].as_str().unwrap().into()],
                height: r.u32(case, "height"),
                width: r.u32(case, "width"),
                max_sequence_length: r.u32(case, "max_sequence_length"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let got = |n: &str| decode(&resp.inputs[n]);
        check_within(
            &format!("{case} prompt_embeds (T5)"),
            &got("encoder_hidden_states"),
            r.get(case, "prompt_embeds"),
            1e-4,
        );
        check_within(
            &format!("{case} pooled_prompt_embeds (CLIP)"),
            &got("pooled_projections"),
            r.get(case, "pooled_prompt_embeds"),
            1e-4,
        );
        check_within(
            &format!("{case} img_ids"),
            &got("img_ids"),
            r.get(case, "latent_image_ids"),
            0.0,
        );
        check_within(
            &format!("{case} txt_ids"),
            &got("txt_ids"),
            r.get(case, "text_ids"),
            0.0,
        );
        let init = r.get(case, "latents_init");
        let want: Vec<i64> = init.dims().iter().map(|&d| d as i64).collect();
        assert_eq!(resp.latent_shape, want);
        let tokens = &resp.prompt_tokens[0];
        assert_eq!(
            tokens.untruncated["clip"],
            r.u32(case, "clip_tokens_untruncated")
        );
        assert_eq!(
            tokens.untruncated["t5"],
            r.u32(case, "t5_tokens_untruncated")
        );
        assert_eq!(tokens.kept["t5"], r.u32(case, "max_sequence_length"));

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
        let want = r.image_uint8(case);
        check_within(
            &format!("{case} Decode pixels"),
            &png_pixels(&png[0]),
            &want,
            1.0,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_becomes_the_pipelines_picture_through_both_services() {
    let r = Reference::load("flux-pipeline-tiny");
    let d = TestDenoiser::start(&["--model", &folder()]).await;
    let ctl = TestController::start(&["--denoiser", &d.url()]).await;
    let mut c = ctl.client().await;
    for case in r.cases.keys() {
        let run = generate_run(&mut c, request(&r, case, "none"))
            .await
            .unwrap();
        let steps = r.u32(case, "num_inference_steps");
        assert_eq!(run.steps.len(), steps as usize);
        let sigmas: Vec<f32> = r.get(case, "sigmas").to_vec1().unwrap();
        for (ev, want) in run.steps.iter().zip(&sigmas) {
            assert_eq!(ev.sigma as f32, *want, "{case} step {} sigma", ev.step);
        }
        let latents = decode(run.result.latents.as_ref().unwrap());
        check_within(
            &format!("{case} final latents (gRPC)"),
            &latents,
            r.get(case, "latents_final"),
            1e-3,
        );
        let want = r.image_uint8(case);
        check_within(
            &format!("{case} PNG pixels (gRPC)"),
            &png_pixels(&run.result.image_png),
            &want,
            2.0,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tea_cache_decides_on_the_modulated_inputs_as_the_pure_policy() {
    let r = Reference::load("flux-pipeline-tiny");
    let d = TestDenoiser::start(&["--model", &folder()]).await;
    let (url, proxy) = RecordingProxy::start(&d).await;
    let ctl = TestController::start(&["--denoiser", &url, "--resident-tensors", "false"]).await;
    let mut c = ctl.client().await;
    let case = "case1";
    let steps = r.u32(case, "num_inference_steps") as usize;
    let thresh = 0.3;
    let mut req = request(&r, case, "tea_cache");
    req.cache_config = Some(v1::CacheConfig {
        rel_l1_thresh: Some(thresh),
        ..Default::default()
    });
    let run = generate_run(&mut c, req).await.unwrap();
    let log = proxy.log.lock().unwrap();
    assert_eq!(log.modulated.len(), steps);
    let p = TeaCacheParams {
        rel_l1_thresh: thresh,
        coefficients: models::lookup("FluxPipeline").unwrap().coefficients,
        warmup_steps: 0,
        cooldown_steps: 0,
        max_consecutive_reuses: None,
    };
    let mut state = BranchState::new();
    let mut pattern = String::new();
    for (i, ((_, _, m), ev)) in log.modulated.iter().zip(&run.steps).enumerate() {
        let values: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
        let want = state.decide(&p, i, steps, m.dims(), &values);
        let got = &ev.branches[0];
        assert_eq!(got.computed, want.compute, "step {i}");
        assert_eq!(got.accumulated, want.accumulated, "step {i}");
        pattern.push(if got.computed { 'C' } else { '.' });
    }
    eprintln!("TeaCache {thresh} on {case}: {pattern}");
    assert_eq!(log.run_blocks, run.result.computed_steps as usize);
    assert!(run.result.reused_steps > 0, "{pattern}: nothing was reused");
    assert!(!run.result.image_png.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_split_over_two_denoisers_give_the_same_picture() {
    let r = Reference::load("flux-pipeline-tiny");
    let whole = TestDenoiser::start(&["--model", &folder()]).await;
    let transformer =
        TestDenoiser::start(&["--model", &folder(), "--components", "transformer"]).await;
    let encoders =
        TestDenoiser::start(&["--model", &folder(), "--components", "text_encoders,vae"]).await;
    let mut t = transformer.client().await;
    let describe = t
        .describe(v1::DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(describe.components, ["transformer"]);
    let err = t
        .encode_prompt(v1::EncodePromptRequest {
            prompts: vec!["a red fox".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("text_encoders"), "{}", err.message());

    let one = TestController::start(&["--denoiser", &whole.url()]).await;
    let split = TestController::start(&[
        "--denoiser",
        &transformer.url(),
        "--denoiser",
        &encoders.url(),
    ])
    .await;
    let case = "case0";
    let a = generate_run(&mut one.client().await, request(&r, case, "none"))
        .await
        .unwrap();
    let b = generate_run(&mut split.client().await, request(&r, case, "none"))
        .await
        .unwrap();
    let (la, lb) = (
        decode(a.result.latents.as_ref().unwrap()),
        decode(b.result.latents.as_ref().unwrap()),
    );
    assert_eq!(max_abs_diff(&la, &lb), 0.0);
    assert_eq!(
        png_pixels(&a.result.image_png).to_vec3::<f32>().unwrap(),
        png_pixels(&b.result.image_png).to_vec3::<f32>().unwrap()
    );
}

/// A change that makes a valid request invalid.
type Edit = fn(&mut v1::GenerateRequest);

/// A copy of the fixture folder whose transformer has no guidance embedding (the
/// FLUX.1-schnell configuration); the weight files are linked, not copied.
fn schnell_like(dir: &Path) -> PathBuf {
    let src = fixtures_dir().join("flux-pipeline-tiny");
    let dst = dir.join("flux-schnell-like");
    for entry in walk(&src) {
        let rel = entry.strip_prefix(&src).unwrap();
        let to = dst.join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        if rel == Path::new("transformer/config.json") {
            let mut c: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&entry).unwrap()).unwrap();
            c["guidance_embeds"] = false.into();
            std::fs::write(&to, c.to_string()).unwrap();
        } else {
            std::fs::copy(&entry, &to).unwrap();
        }
    }
    dst
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_text_mode_requests_are_clear_invalid_arguments() {
    let r = Reference::load("flux-pipeline-tiny");
    let d = TestDenoiser::start(&["--model", &folder()]).await;
    let tmp = tempfile::tempdir().unwrap();
    let schnell = schnell_like(tmp.path());
    let s = TestDenoiser::start(&["--model", schnell.to_str().unwrap()]).await;
    let ctl = TestController::start(&["--denoiser", &d.url()]).await;
    let ctl_s = TestController::start(&["--denoiser", &s.url()]).await;
    let mut c = ctl.client().await;
    let refused = |mut req: v1::GenerateRequest, edit: fn(&mut v1::GenerateRequest)| {
        edit(&mut req);
        req
    };
    let base = request(&r, "case0", "none");
    let cases: [(Edit, &str); 5] = [
        (|q| q.height = 72, "multiple of 16"),
        (|q| q.width = 8200, "at most 4096"),
        (
            |q| q.max_sequence_length = 513,
            "above FluxPipeline's limit of 512",
        ),
        (|q| q.prompt = "   ".into(), "non-empty `prompt`"),
        (|q| q.guidance_scale = Some(f64::NAN), "finite"),
    ];
    for (edit, says) in cases {
        let mut req = refused(base.clone(), edit);
        if req.height == 72 || req.width == 8200 {
            req.inputs.clear(); // the noise shape would be refused first otherwise
        }
        let err = generate_run(&mut c, req).await.err().unwrap();
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(err.message().contains(says), "{}", err.message());
        assert!(err.message().len() < 1000);
    }
    // Noise of the wrong shape for the size.
    let mut req = base.clone();
    req.height = 128;
    let err = generate_run(&mut c, req).await.err().unwrap();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("packed latents are [1, 32, 64]"),
        "{}",
        err.message()
    );
    // Guidance on a checkpoint without a guidance embedding; unset works there.
    let mut cs = ctl_s.client().await;
    let err = generate_run(&mut cs, base.clone()).await.err().unwrap();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("no guidance embedding"),
        "{}",
        err.message()
    );
    let mut req = base.clone();
    req.guidance_scale = None;
    let run = generate_run(&mut cs, req).await.unwrap();
    assert!(!run.result.image_png.is_empty());
}
