//! Resident mode in the trace: the real `cache-controller` binary (resident mode, its default)
//! and a denoiser export spans to an in-process OTLP collector. Every step span says which
//! path ran (`resident`, or `rebuild` after a miss) and the bytes it moved; every TeaCache
//! step makes one ResidentStep call (STEP: the signal, the controller's rule, blocks or the kept
//! residual) and no stage calls; `/metrics` counts the paths.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use teaserve_proto::v1::{self, DType};
use teaserve_tests::{Fixture, TestDenoiser};

mod common;
use common::{
    counter, generate_in_trace, http_get, init_denoiser_telemetry, start_collector,
    start_controller, stop_controller, wait_for_spans,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_step_span_names_its_path_and_bytes() {
    let (collector, otlp) = start_collector().await;
    let telemetry = init_denoiser_telemetry(&otlp);
    let fx = Fixture::load("flux-tiny");
    let denoiser = TestDenoiser::start(&["--model", fx.dir.to_str().unwrap()]).await;
    let (mut child, grpc, metrics) = start_controller(&denoiser.url(), &otlp, &[]);

    let mut inputs = fx.wire_inputs("", DType::F32);
    inputs.remove("timestep");
    let steps = 8u32;
    let req = v1::GenerateRequest {
        model_class_name: "FluxPipeline".into(),
        cache_adapter: "tea_cache".into(),
        cache_config: Some(v1::CacheConfig {
            rel_l1_thresh: Some(0.6),
            ..Default::default()
        }),
        num_inference_steps: steps,
        inputs,
        ..Default::default()
    };
    let client_trace = "5cf92f3577b34da6a3ce929d0e0e4737";
    let (_, result) = generate_in_trace(&grpc, req, client_trace).await;
    assert!(result.reused_steps > 0, "TeaCache 0.6 reused nothing");

    let text = http_get(&metrics, "/metrics").await;
    let resident = counter(
        &text,
        "teaserve_controller_step_paths_total",
        &[("path", "resident")],
    );
    assert_eq!(resident, f64::from(steps), "{text}");

    stop_controller(&mut child).await;
    telemetry.flush().await;
    let all = wait_for_spans(&collector, |all| {
        let steps_seen = all.iter().filter(|s| s.name == "step").count();
        let served = all
            .iter()
            .filter(|s| s.name == "teaserve.v1.Denoiser/ResidentStep")
            .count();
        (steps_seen >= steps as usize && served >= steps as usize)
            .then_some(())
            .ok_or(format!("{steps_seen} steps, {served} ResidentStep"))
    })
    .await;
    let in_trace: Vec<_> = all.iter().filter(|s| s.trace_id == client_trace).collect();
    let step_spans: Vec<_> = in_trace.iter().filter(|s| s.name == "step").collect();
    assert_eq!(step_spans.len(), steps as usize);
    for s in &step_spans {
        assert_eq!(s.str("path"), Some("resident"));
        let bytes = s.f64("bytes").unwrap();
        // Latents in and predictions out, plus the conditioning once: far below
        // what the stage calls move.
        assert!(bytes > 0.0, "no bytes on the step span");
        let calls = in_trace
            .iter()
            .filter(|c| c.name == "Denoiser/ResidentStep" && c.parent == s.id)
            .count();
        assert_eq!(calls, 1, "one STEP call in every step");
    }
    for stage in ["Preprocess", "RunBlocks", "Postprocess"] {
        assert!(
            !in_trace
                .iter()
                .any(|s| s.name == format!("teaserve.v1.Denoiser/{stage}")),
            "{stage} was called in resident mode"
        );
    }
    assert!(
        in_trace
            .iter()
            .any(|s| s.service == "denoiser" && s.name == "teaserve.v1.Denoiser/ResidentStep"),
        "the denoiser's ResidentStep spans join the trace"
    );
    telemetry.shutdown().await;
}
