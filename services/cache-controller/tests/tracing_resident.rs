//! Resident mode in the trace: the real `cache-controller` binary (resident mode, its default)
//! and a denoiser export spans to an in-process OTLP collector. Every step span says which
//! path ran (`resident`, or `rebuild` after a miss) and the bytes it moved; every step makes
//! two ResidentStep calls (SIGNAL, ADVANCE) and no stage calls; `/metrics` counts the paths.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use teaserve_proto::v1::cache_controller_client::CacheControllerClient;
use teaserve_proto::v1::{self, DType, generate_event};
use teaserve_telemetry::{LogFormat, OtelConfig};
use teaserve_tests::{Fixture, TestDenoiser};
use tokio_stream::StreamExt as _;

mod common;
use common::{counter, http_get, spans, start_collector, start_controller, stop_controller};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_step_span_names_its_path_and_bytes() {
    let (collector, otlp) = start_collector().await;
    let telemetry = teaserve_telemetry::init(
        LogFormat::Text,
        &OtelConfig {
            endpoint: Some(otlp.clone()),
            service_name: "denoiser".into(),
        },
    )
    .unwrap();
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
    let mut request = tonic::Request::new(req);
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{client_trace}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    let mut c = CacheControllerClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let mut stream = c.generate(request).await.unwrap().into_inner();
    let mut result = None;
    while let Some(ev) = stream.next().await {
        if let generate_event::Event::Result(r) = ev.unwrap().event.unwrap() {
            result = Some(r);
        }
    }
    let result = result.unwrap();
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
    let deadline = Instant::now() + Duration::from_secs(20);
    let all = loop {
        let all = spans(&collector);
        let steps_seen = all.iter().filter(|s| s.name == "step").count();
        let served = all
            .iter()
            .filter(|s| s.name == "teaserve.v1.Denoiser/ResidentStep")
            .count();
        if steps_seen >= steps as usize && served >= 2 * steps as usize {
            break all;
        }
        assert!(
            Instant::now() < deadline,
            "spans never arrived: {steps_seen} steps, {served} ResidentStep"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let in_trace: Vec<_> = all.iter().filter(|s| s.trace_id == client_trace).collect();
    let step_spans: Vec<_> = in_trace.iter().filter(|s| s.name == "step").collect();
    assert_eq!(step_spans.len(), steps as usize);
    for s in &step_spans {
        assert_eq!(s.str("path"), Some("resident"));
        let bytes = s.f64("bytes").unwrap();
        // Latents in (SIGNAL) and predictions out, plus the conditioning once: far below
        // what the stage calls move.
        assert!(bytes > 0.0, "no bytes on the step span");
        let calls = in_trace
            .iter()
            .filter(|c| c.name == "Denoiser/ResidentStep" && c.parent == s.id)
            .count();
        assert_eq!(calls, 2, "SIGNAL and ADVANCE in every step");
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
