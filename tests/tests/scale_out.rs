//! Scale-out and faults: one controller over several denoisers, each killable like a process
//! (its runtime, listener and connections vanish at once). Losing a denoiser mid-generation
//! must not fail the generation nor change a bit of its result; losing all of them gives
//! UNAVAILABLE naming what was tried, and the controller keeps serving and recovers when a
//! denoiser comes back.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Instant;

use teaserve_proto::v1::{self, generate_event};
use teaserve_tests::{
    KillableDenoiser, RecordingProxy, TestController, TestDenoiser, decode, max_abs_diff,
};
use tokio_stream::StreamExt as _;
use tonic::Code;

const STEPS: u32 = 16;

fn request(adapter: &str) -> v1::GenerateRequest {
    v1::GenerateRequest {
        model_class_name: "TinyFluxPipeline".into(),
        prompt: "a yellow triangle on the right on a blue background".into(),
        negative_prompt: Some("a red square on a green background".into()),
        true_cfg_scale: Some(2.0),
        seed: 7,
        num_inference_steps: STEPS,
        cache_adapter: adapter.into(),
        cache_config: Some(v1::CacheConfig {
            rel_l1_thresh: Some(0.2),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Runs a generation; `on_step(i)` is called after step event `i` arrives.
async fn generate(
    ctl: &TestController,
    req: v1::GenerateRequest,
    mut on_step: impl FnMut(usize),
) -> Result<v1::GenerateResult, tonic::Status> {
    let mut stream = ctl.client().await.generate(req).await?.into_inner();
    let mut steps = 0;
    while let Some(ev) = stream.next().await {
        match ev?.event {
            Some(generate_event::Event::Step(_)) => {
                on_step(steps);
                steps += 1;
            }
            Some(generate_event::Event::Result(r)) => return Ok(r),
            None => {}
        }
    }
    panic!("stream ended without a result");
}

fn controller_flags(urls: &[String]) -> Vec<String> {
    let mut flags = Vec::new();
    for u in urls {
        flags.push("--denoiser".to_string());
        flags.push(u.clone());
    }
    flags
}

async fn controller(urls: &[String]) -> TestController {
    let flags = controller_flags(urls);
    let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    TestController::start(&refs).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_denoiser_mid_generation_changes_nothing() {
    let mut a = KillableDenoiser::start(&[], "127.0.0.1:0").await;
    let b = KillableDenoiser::start(&[], "127.0.0.1:0").await;
    let ctl = controller(&[a.url(), b.url()]).await;
    for adapter in ["none", "tea_cache"] {
        // Reference: a healthy pool (calls spread over both).
        let healthy = generate(&ctl, request(adapter), |_| {}).await.unwrap();
        // Two CFG branches per step.
        assert_eq!(healthy.computed_steps + healthy.reused_steps, 2 * STEPS);
        let want = decode(healthy.latents.as_ref().unwrap());
        let again = generate(&ctl, request(adapter), |_| {}).await.unwrap();
        assert_eq!(
            max_abs_diff(&decode(again.latents.as_ref().unwrap()), &want),
            0.0,
            "a healthy pool is deterministic"
        );
        if adapter == "tea_cache" {
            assert!(healthy.reused_steps > 0, "TeaCache reused nothing");
        }
        break_one_and_compare(&mut a, &b, &ctl, adapter, &want, healthy.computed_steps).await;
        // Bring `a` back on the same port for the next round.
        a = KillableDenoiser::start(&[], &a.addr.to_string()).await;
        teaserve_tests::wait_serving(&a.url()).await;
    }
}

async fn break_one_and_compare(
    a: &mut KillableDenoiser,
    b: &KillableDenoiser,
    ctl: &TestController,
    adapter: &str,
    want: &candle_core::Tensor,
    computed: u32,
) {
    // Same generation; `a` dies after the 4th step, with calls of the next step in flight or
    // about to be made to it.
    let mut killed = false;
    let got = generate(ctl, request(adapter), |i| {
        if i == 3 {
            a.kill();
            killed = true;
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{adapter}: generation failed after a denoiser died: {e}"));
    assert!(killed);
    let got_latents = decode(got.latents.as_ref().unwrap());
    let d = max_abs_diff(&got_latents, want);
    eprintln!(
        "{adapter}: killed {} after step 4 of {STEPS}; survived on {}; computed {} branch-steps; \
         max |latents - healthy| = {d:e}",
        a.addr, b.addr, got.computed_steps
    );
    assert_eq!(d, 0.0, "{adapter}: the result changed when a denoiser died");
    assert_eq!(got.computed_steps, computed);
    assert!(!got.image_png.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_denoisers_gone_is_unavailable_and_the_controller_recovers() {
    let mut a = KillableDenoiser::start(&[], "127.0.0.1:0").await;
    let mut b = KillableDenoiser::start(&[], "127.0.0.1:0").await;
    let ctl = controller(&[a.url(), b.url()]).await;
    let ok = generate(&ctl, request("tea_cache"), |_| {}).await.unwrap();
    let (addr_a, addr_b) = (a.addr, b.addr);
    a.kill();
    b.kill();
    let started = Instant::now();
    let err = generate(&ctl, request("tea_cache"), |_| {})
        .await
        .expect_err("no denoiser is left");
    eprintln!(
        "all gone: {:?} after {:?}: {}",
        err.code(),
        started.elapsed(),
        err.message()
    );
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        err.message().contains(&addr_a.to_string()) && err.message().contains(&addr_b.to_string()),
        "the error names what was tried: {}",
        err.message()
    );
    // The controller itself is fine: it answers, and validation still works.
    let models = ctl
        .client()
        .await
        .list_models(v1::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        models
            .models
            .iter()
            .any(|m| m.model_type == "TinyFluxPipeline")
    );
    let bad = ctl
        .client()
        .await
        .generate(v1::GenerateRequest {
            num_inference_steps: 1001,
            ..request("tea_cache")
        })
        .await;
    assert_eq!(bad.err().map(|e| e.code()), Some(Code::InvalidArgument));
    // A denoiser comes back on a known address: generations work again, same result.
    let a = KillableDenoiser::start(&[], &addr_a.to_string()).await;
    let mut last = None;
    for _ in 0..100 {
        match generate(&ctl, request("tea_cache"), |_| {}).await {
            Ok(r) => {
                last = Some(r);
                break;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
    let back = last.expect("the controller never used the restarted denoiser");
    assert_eq!(
        max_abs_diff(
            &decode(back.latents.as_ref().unwrap()),
            &decode(ok.latents.as_ref().unwrap())
        ),
        0.0
    );
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_call_is_retried_on_another_replica() {
    // Two replicas behind recording proxies; one proxy fails RunBlocks with UNAVAILABLE.
    let d = TestDenoiser::start(&[]).await;
    let (url_ok, ok) = RecordingProxy::start(&d).await;
    let (url_bad, bad) = RecordingProxy::start(&d).await;
    bad.fail_run_blocks
        .store(usize::MAX / 2, std::sync::atomic::Ordering::SeqCst);
    let ctl = controller(&[url_ok, url_bad]).await;
    let direct = TestController::start(&["--denoiser", &d.url()]).await;
    let want = generate(&direct, request("none"), |_| {}).await.unwrap();
    let got = generate(&ctl, request("none"), |_| {}).await.unwrap();
    assert_eq!(
        max_abs_diff(
            &decode(got.latents.as_ref().unwrap()),
            &decode(want.latents.as_ref().unwrap())
        ),
        0.0
    );
    let served = {
        let log = ok.log.lock().unwrap();
        log.run_blocks + log.resident_steps
    };
    eprintln!(
        "compute calls served by the healthy proxy: {served}; failed at the bad one: {}",
        usize::MAX / 2
            - bad
                .fail_run_blocks
                .load(std::sync::atomic::Ordering::SeqCst)
    );
    assert!(served > 0);
    // With retries off, the bad replica's failure reaches the caller.
    let (strict_url, strict_proxy) = RecordingProxy::start(&d).await;
    strict_proxy
        .fail_run_blocks
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let strict = TestController::start(&["--denoiser", &strict_url, "--retry-attempts", "1"]).await;
    let err = generate(&strict, request("none"), |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    // The compute call: ResidentStep in resident mode (the default), RunBlocks in wire mode.
    assert!(err.message().contains("ResidentStep"), "{}", err.message());
}
