//! A rolling update, as Kubernetes does one: two denoisers behind a controller, four
//! generations running, each denoiser in turn terminated (what SIGTERM does: NOT_SERVING on
//! the health watch at once, new calls UNAVAILABLE, calls in flight finished, exit) and
//! started again on its address. Every generation completes bit-identical to a clean run,
//! and a terminated denoiser does not wait out its shutdown grace.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use teaserve_proto::v1;
use teaserve_tests::{
    KillableDenoiser, TestController, decode, generate_run, max_abs_diff, wait_serving,
};

const STEPS: u32 = 300;
/// Far above what a drain takes here: a denoiser that waited for it would fail the test.
const GRACE_SECS: &str = "60";

fn request(seed: u64) -> v1::GenerateRequest {
    v1::GenerateRequest {
        model_class_name: "TinyFluxPipeline".into(),
        prompt: "a white triangle at the top on a black background".into(),
        seed,
        num_inference_steps: STEPS,
        cache_adapter: "none".into(),
        ..Default::default()
    }
}

async fn four_generations(
    ctl: &TestController,
) -> Vec<tokio::task::JoinHandle<Result<teaserve_tests::GenerateRun, tonic::Status>>> {
    let mut runs = Vec::new();
    for seed in 1..=4 {
        let mut c = ctl.client().await;
        runs.push(tokio::spawn(async move {
            generate_run(&mut c, request(seed)).await
        }));
    }
    runs
}

async fn restart(d: &mut KillableDenoiser, name: &str) -> Duration {
    let addr = d.addr.to_string();
    let took = d.terminate().await;
    eprintln!("denoiser {name} terminated in {took:?} (grace {GRACE_SECS} s)");
    *d = KillableDenoiser::start(&["--shutdown-grace-secs", GRACE_SECS], &addr).await;
    wait_serving(&d.url()).await;
    // The controller's health watch reconnects with a backoff of at most 2 s.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_the_denoisers_loses_nothing() {
    let flags = ["--shutdown-grace-secs", GRACE_SECS];
    let mut a = KillableDenoiser::start(&flags, "127.0.0.1:0").await;
    let mut b = KillableDenoiser::start(&flags, "127.0.0.1:0").await;
    let ctl = TestController::start(&["--denoiser", &a.url(), "--denoiser", &b.url()]).await;

    let mut clean = Vec::new();
    for run in four_generations(&ctl).await {
        clean.push(decode(
            run.await.unwrap().unwrap().result.latents.as_ref().unwrap(),
        ));
    }

    let runs = four_generations(&ctl).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let took_a = restart(&mut a, "A").await;
    let took_b = restart(&mut b, "B").await;
    let mut finished_during = 0;
    for (i, run) in runs.into_iter().enumerate() {
        let done = run.is_finished();
        let run = run
            .await
            .unwrap()
            .unwrap_or_else(|s| panic!("generation {i}: {s:?}"));
        assert_eq!(run.steps.len(), STEPS as usize);
        let got = decode(run.result.latents.as_ref().unwrap());
        assert_eq!(max_abs_diff(&got, &clean[i]), 0.0, "generation {i}");
        finished_during += usize::from(done);
    }
    eprintln!("{finished_during} of 4 generations had finished before both restarts were done");
    for (name, took) in [("A", took_a), ("B", took_b)] {
        assert!(
            took < Duration::from_secs(15),
            "denoiser {name} took {took:?} to stop: it waited for the grace instead of exiting \
             when its calls were done"
        );
    }
}
