//! One generation, one trace: the real `cache-controller` binary and a denoiser export spans
//! over OTLP/gRPC to an in-process collector (opentelemetry-proto's TraceService on loopback);
//! the test checks the trace's shape against the streamed decisions, and the controller's
//! `/metrics` against the result.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;

use teaserve_proto::v1::{self, DType};
use teaserve_tests::{Fixture, TestDenoiser};

mod common;
use common::{
    Span, counter, generate_in_trace, http_get, init_denoiser_telemetry, start_collector,
    start_controller, stop_controller, wait_for_spans,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_trace_holds_every_step_decision_and_denoiser_call() {
    // The collector.
    let (collector, otlp) = start_collector().await;

    // This process plays the denoiser, exporting through the same telemetry code.
    let telemetry = init_denoiser_telemetry(&otlp);
    let fx = Fixture::load("flux-tiny");
    let denoiser = TestDenoiser::start(&["--model", fx.dir.to_str().unwrap()]).await;

    // The real controller binary, in the stateless wire mode (the stage calls are what this
    // test follows; tracing_resident.rs follows resident mode).
    let (mut child, grpc, metrics) =
        start_controller(&denoiser.url(), &otlp, &["--resident-tensors", "false"]);

    // A CFG generation with TeaCache, continuing the client's own trace.
    let mut inputs = fx.wire_inputs("", DType::F32);
    inputs.remove("timestep");
    let neg_text = fx
        .get("b2.in.encoder_hidden_states")
        .narrow(0, 1, 1)
        .unwrap();
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
        negative_inputs: [(
            "encoder_hidden_states".to_string(),
            teaserve_proto::encode_tensor(&neg_text, DType::F32).unwrap(),
        )]
        .into(),
        true_cfg_scale: Some(3.0),
        ..Default::default()
    };
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let (events, result) = generate_in_trace(&grpc, req, client_trace).await;
    assert_eq!(result.trace_id, client_trace, "the result names the trace");

    // Background calls, as Kubernetes probes and tools make them: health checks on both
    // services, a Describe outside any trace, reflection. None of them may produce a span.
    for url in [format!("http://{grpc}"), denoiser.url()] {
        let channel = tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        for _ in 0..3 {
            health
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await
                .unwrap();
        }
    }
    denoiser
        .client()
        .await
        .describe(v1::DescribeRequest {})
        .await
        .unwrap();

    // Metrics: the step counters equal the result.
    let text = http_get(&metrics, "/metrics").await;
    let name = "teaserve_controller_steps_total";
    let computed = counter(
        &text,
        name,
        &[("model_type", "FluxPipeline"), ("decision", "computed")],
    );
    let reused = counter(
        &text,
        name,
        &[("model_type", "FluxPipeline"), ("decision", "reused")],
    );
    assert_eq!(computed, f64::from(result.computed_steps), "{text}");
    assert_eq!(reused, f64::from(result.reused_steps), "{text}");
    for branch in ["positive", "negative"] {
        let b_computed = counter(&text, name, &[("branch", branch), ("decision", "computed")]);
        let want = events
            .iter()
            .flat_map(|e| &e.branches)
            .filter(|b| {
                b.computed
                    && b.branch
                        == [v1::Branch::Positive, v1::Branch::Negative]
                            [usize::from(branch == "negative")] as i32
            })
            .count();
        assert_eq!(b_computed, want as f64, "{branch}");
    }
    assert!(
        counter(
            &text,
            "teaserve_grpc_server_requests_total",
            &[
                ("method", "teaserve.v1.CacheController/Generate"),
                ("status", "Ok")
            ]
        ) >= 1.0,
        "{text}"
    );
    assert!(
        counter(
            &text,
            "teaserve_controller_tensor_bytes_total",
            &[("direction", "to_denoiser")]
        ) > 0.0
    );

    // Stop the controller (its exporter flushes on shutdown) and flush this process.
    stop_controller(&mut child).await;
    telemetry.flush().await;
    let all = wait_for_spans(&collector, |all| {
        let services: std::collections::HashSet<&str> =
            all.iter().map(|s| s.service.as_str()).collect();
        let steps_seen = all.iter().filter(|s| s.name == "step").count();
        (services.contains("cache-controller")
            && services.contains("denoiser")
            && steps_seen >= steps as usize)
            .then_some(())
            .ok_or(format!("{services:?}, {steps_seen} steps"))
    })
    .await;

    // Health checks, reflection and background Describe calls are not traced by default:
    // every span either service exported belongs to the one generation's trace.
    for s in &all {
        assert_eq!(
            s.trace_id, client_trace,
            "span {} ({}) outside the generation's trace",
            s.name, s.service
        );
        assert!(
            !s.name.starts_with("grpc.health") && !s.name.starts_with("grpc.reflection"),
            "background call traced: {} ({})",
            s.name,
            s.service
        );
    }

    // One trace, from both services: everything the generation did is in the client's trace.
    let generation_work = |s: &Span| {
        matches!(
            s.name.as_str(),
            "generate" | "step" | "teacache.decide" | "compute"
        ) || s.name.starts_with("Denoiser/")
            || s.name.starts_with("teaserve.v1.Denoiser/P")
            || s.name == "teaserve.v1.Denoiser/RunBlocks"
            || s.name == "teaserve.v1.CacheController/Generate"
    };
    let in_trace: Vec<&Span> = all.iter().filter(|s| s.trace_id == client_trace).collect();
    for s in all
        .iter()
        .filter(|s| generation_work(s) && s.name != "compute")
    {
        assert_eq!(
            s.trace_id, client_trace,
            "{} ({}) outside the trace",
            s.name, s.service
        );
    }
    for s in &in_trace {
        assert!(
            // The pool may describe a denoiser it has not met yet on the request's behalf.
            generation_work(s) || s.name == "teaserve.v1.Denoiser/Describe",
            "unexpected span {} ({}) in the trace",
            s.name,
            s.service
        );
    }
    let services: std::collections::HashSet<&str> =
        in_trace.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(services, ["cache-controller", "denoiser"].into());
    let by_id: HashMap<&[u8], &Span> = all.iter().map(|s| (s.id.as_slice(), s)).collect();
    let ancestor = |s: &Span, pred: &dyn Fn(&Span) -> bool| -> Option<Span> {
        let mut cur = by_id.get(s.parent.as_slice()).copied();
        while let Some(p) = cur {
            if pred(p) {
                return Some(p.clone());
            }
            cur = by_id.get(p.parent.as_slice()).copied();
        }
        None
    };
    let generate: Vec<&Span> = all.iter().filter(|s| s.name == "generate").collect();
    assert_eq!(generate.len(), 1);
    assert_eq!(generate[0].service, "cache-controller");
    assert_eq!(generate[0].str("adapter"), Some("tea_cache"));
    assert_eq!(generate[0].bool("cfg"), Some(true));

    // One step span per step, each under `generate`.
    let step_spans: Vec<&Span> = all.iter().filter(|s| s.name == "step").collect();
    assert_eq!(step_spans.len(), steps as usize);
    let step_of = |s: &Span| s.f64("step").unwrap() as u32;
    for s in &step_spans {
        assert!(ancestor(s, &|p| p.name == "generate").is_some());
        assert_eq!(s.str("path"), Some("wire"));
        assert!(
            s.f64("bytes").unwrap_or(0.0) > 0.0,
            "no bytes on the step span"
        );
    }

    // One teacache.decide per branch per step, whose numbers equal the StepEvents.
    for ev in &events {
        let step_span = step_spans.iter().find(|s| step_of(s) == ev.step).unwrap();
        let decides: Vec<&Span> = all
            .iter()
            .filter(|s| s.name == "teacache.decide" && s.parent == step_span.id)
            .collect();
        assert_eq!(decides.len(), 2, "step {}", ev.step);
        for b in &ev.branches {
            let branch = if b.branch == v1::Branch::Positive as i32 {
                "positive"
            } else {
                "negative"
            };
            let d = decides
                .iter()
                .find(|s| s.str("branch") == Some(branch))
                .unwrap();
            assert_eq!(
                d.str("decision"),
                Some(if b.computed { "compute" } else { "reuse" })
            );
            assert_eq!(d.bool("forced"), Some(b.forced));
            assert_eq!(d.f64("rel_l1"), b.rel_l1, "step {} {branch}", ev.step);
            assert_eq!(d.f64("rescaled"), b.rescaled);
            assert_eq!(d.f64("accumulated"), Some(b.accumulated));
            assert_eq!(d.f64("threshold"), Some(0.6));
        }
    }

    // Every RunBlocks served by the denoiser descends from the step it belongs to, and no
    // RunBlocks runs for a branch that reused.
    let run_blocks: Vec<&Span> = all
        .iter()
        .filter(|s| s.service == "denoiser" && s.name == "teaserve.v1.Denoiser/RunBlocks")
        .collect();
    assert!(!run_blocks.is_empty());
    for rb in &run_blocks {
        let step = ancestor(rb, &|p| p.name == "step").expect("RunBlocks outside a step");
        let ev = events.iter().find(|e| e.step == step_of(&step)).unwrap();
        let call = ancestor(rb, &|p| {
            p.name == "Denoiser/RunBlocks" && p.service == "cache-controller"
        })
        .unwrap();
        for branch in call.str("branches").unwrap().split(',') {
            let want = if branch == "positive" {
                v1::Branch::Positive
            } else {
                v1::Branch::Negative
            } as i32;
            let b = ev.branches.iter().find(|b| b.branch == want).unwrap();
            assert!(
                b.computed,
                "RunBlocks under a reuse decision at step {}",
                ev.step
            );
        }
        // The denoiser's compute span (queue wait and compute time) is under its server span.
        assert!(
            all.iter()
                .any(|s| s.name == "compute" && ancestor(s, &|p| p.id == rb.id).is_some())
        );
    }
    for ev in &events {
        let step = step_spans.iter().find(|s| step_of(s) == ev.step).unwrap();
        let calls = run_blocks
            .iter()
            .filter(|rb| ancestor(rb, &|p| p.id == step.id).is_some())
            .count();
        if ev.branches.iter().all(|b| !b.computed) {
            assert_eq!(calls, 0, "step {} reused on both branches", ev.step);
        } else {
            assert!(calls >= 1, "step {}", ev.step);
        }
    }
    let compute = all.iter().find(|s| s.name == "compute").unwrap();
    assert!(compute.f64("queue_wait_ms").is_some() && compute.f64("compute_ms").is_some());
    telemetry.shutdown().await;
}
