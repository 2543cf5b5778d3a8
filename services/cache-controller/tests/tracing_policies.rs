//! The policies after TeaCache in the trace: the real `cache-controller` binary (resident mode,
//! its default) and a denoiser export spans to an in-process OTLP collector. Every step span holds one `cache.decide` span per branch naming
//! the policy, its decision and the numbers it decided from, equal to the StepEvents.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use teaserve_proto::v1::{self, DType};
use teaserve_tests::{Fixture, TestDenoiser};

mod common;
use common::{
    generate_in_trace, init_denoiser_telemetry, start_collector, start_controller, stop_controller,
    wait_for_spans,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_step_names_the_policy_its_decision_and_numbers() {
    let (collector, otlp) = start_collector().await;
    let telemetry = init_denoiser_telemetry(&otlp);
    let fx = Fixture::load("flux-tiny");
    let denoiser = TestDenoiser::start(&["--model", fx.dir.to_str().unwrap()]).await;
    let (mut child, grpc, _metrics) = start_controller(&denoiser.url(), &otlp, &[]);

    let mut inputs = fx.wire_inputs("", DType::F32);
    inputs.remove("timestep");
    let steps = 8u32;
    // MagCache with FluxPipeline's default ratios (diffusers' FLUX_MAG_RATIOS, resampled to 8
    // steps); its decisions do not depend on the data, so a loose threshold skips.
    let req = v1::GenerateRequest {
        model_class_name: "FluxPipeline".into(),
        cache_adapter: "mag_cache".into(),
        cache_config: Some(v1::CacheConfig {
            threshold: Some(0.3),
            ..Default::default()
        }),
        num_inference_steps: steps,
        inputs,
        ..Default::default()
    };
    let client_trace = "6df92f3577b34da6a3ce929d0e0e4738";
    let (events, result) = generate_in_trace(&grpc, req, client_trace).await;
    assert!(result.reused_steps > 0, "MagCache 0.3 skipped nothing");

    stop_controller(&mut child).await;
    telemetry.flush().await;
    let all = wait_for_spans(&collector, |all| {
        let decided = all.iter().filter(|s| s.name == "cache.decide").count();
        (decided >= steps as usize)
            .then_some(())
            .ok_or(format!("{decided} cache.decide"))
    })
    .await;
    let in_trace: Vec<_> = all.iter().filter(|s| s.trace_id == client_trace).collect();
    let mut step_spans: Vec<_> = in_trace.iter().filter(|s| s.name == "step").collect();
    step_spans.sort_by_key(|s| s.f64("step").unwrap() as i64);
    assert_eq!(step_spans.len(), steps as usize);
    assert!(
        !in_trace.iter().any(|s| s.name == "teacache.decide"),
        "TeaCache did not decide"
    );
    for (s, ev) in step_spans.iter().zip(&events) {
        // MagCache runs in resident mode (one STEP call carrying its decision).
        assert_eq!(s.str("path"), Some("resident"));
        let decides: Vec<_> = in_trace
            .iter()
            .filter(|d| d.name == "cache.decide" && d.parent == s.id)
            .collect();
        assert_eq!(decides.len(), 1, "one branch, one decision per step");
        let (d, b) = (decides[0], &ev.branches[0]);
        assert_eq!(d.str("policy"), Some("mag_cache"));
        assert_eq!(b.policy, "mag_cache");
        let want = if b.computed { "compute" } else { "reuse" };
        assert_eq!(d.str("decision"), Some(want), "step {}", ev.step);
        assert_eq!(d.f64("threshold"), Some(0.3));
        let numbers = d.str("numbers").unwrap();
        for (k, v) in &b.numbers {
            assert!(
                numbers.contains(&format!("{k}={v}")),
                "step {}: the span's numbers '{numbers}' lack {k}={v}",
                ev.step
            );
        }
        assert!(b.numbers.contains_key("mag_ratio"), "step {}", ev.step);
    }
    telemetry.shutdown().await;
}
