//! The policies after TeaCache in the trace: the real `cache-controller` binary (resident mode,
//! its default) and a denoiser export spans to an in-process OTLP collector. Every step span holds one `cache.decide` span per branch naming
//! the policy, its decision and the numbers it decided from, equal to the StepEvents.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use teaserve_proto::v1::cache_controller_client::CacheControllerClient;
use teaserve_proto::v1::{self, DType, generate_event};
use teaserve_telemetry::{LogFormat, OtelConfig};
use teaserve_tests::{Fixture, TestDenoiser};
use tokio_stream::StreamExt as _;

mod common;
use common::{spans, start_collector, start_controller, stop_controller};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_step_names_the_policy_its_decision_and_numbers() {
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
    let (mut events, mut result) = (Vec::new(), None);
    while let Some(ev) = stream.next().await {
        match ev.unwrap().event.unwrap() {
            generate_event::Event::Step(s) => events.push(s),
            generate_event::Event::Result(r) => result = Some(r),
        }
    }
    let result = result.unwrap();
    assert!(result.reused_steps > 0, "MagCache 0.3 skipped nothing");

    stop_controller(&mut child).await;
    telemetry.flush().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let all = loop {
        let all = spans(&collector);
        let decided = all.iter().filter(|s| s.name == "cache.decide").count();
        if decided >= steps as usize {
            break all;
        }
        assert!(
            Instant::now() < deadline,
            "spans never arrived: {decided} cache.decide"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let in_trace: Vec<_> = all.iter().filter(|s| s.trace_id == client_trace).collect();
    let mut step_spans: Vec<_> = in_trace.iter().filter(|s| s.name == "step").collect();
    step_spans.sort_by_key(|s| s.f64("step").unwrap() as i64);
    assert_eq!(step_spans.len(), steps as usize);
    assert!(
        !in_trace.iter().any(|s| s.name == "teacache.decide"),
        "TeaCache did not decide"
    );
    for (s, ev) in step_spans.iter().zip(&events) {
        // MagCache runs in resident mode (SIGNAL, then ADVANCE with its decision).
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
