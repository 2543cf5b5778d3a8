//! Resident mode (the controller's default): the denoisers keep each session's large tensors
//! and only latents, signals and predictions travel. Checked against the stateless wire mode
//! on the same denoiser: bit-identical latents and decisions (FLUX and Qwen-Image with true
//! CFG, TeaCache on and off), with a store too small to keep anything (every call misses and
//! is rebuilt), and when the replica holding a session is killed mid-generation. The miss
//! status never reaches the client; call counts and metrics say what happened.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read as _, Write as _};

use teaserve_proto::v1::{self, DType, generate_event};
use teaserve_proto::{TensorMap, encode_tensor};
use teaserve_tests::{
    Fixture, KillableDenoiser, RecordingProxy, TestController, TestDenoiser, decode, max_abs_diff,
};
use tokio_stream::StreamExt as _;

/// A FLUX request with true CFG (the negative text from the fixture's batch-2 case).
fn flux_request(fx: &Fixture, adapter: &str, thresh: f64, steps: u32) -> v1::GenerateRequest {
    let mut inputs = fx.wire_inputs("", DType::F32);
    inputs.remove("timestep");
    let neg = fx
        .get("b2.in.encoder_hidden_states")
        .narrow(0, 1, 1)
        .unwrap();
    // Its own pooled text too, so the branches' indicators (and decisions) differ.
    let neg_pooled = (fx.get("b2.in.pooled_projections").narrow(0, 1, 1).unwrap() * 8.0).unwrap();
    v1::GenerateRequest {
        model_class_name: "FluxPipeline".into(),
        cache_adapter: adapter.into(),
        cache_config: Some(v1::CacheConfig {
            rel_l1_thresh: Some(thresh),
            ..Default::default()
        }),
        num_inference_steps: steps,
        inputs,
        negative_inputs: TensorMap::from([
            (
                "encoder_hidden_states".to_string(),
                encode_tensor(&neg, DType::F32).unwrap(),
            ),
            (
                "pooled_projections".to_string(),
                encode_tensor(&neg_pooled, DType::F32).unwrap(),
            ),
        ]),
        true_cfg_scale: Some(3.0),
        ..Default::default()
    }
}

/// A Qwen-Image request with true CFG and the norm rescale (negative text with padding).
fn qwen_request(fx: &Fixture, adapter: &str, thresh: f64, steps: u32) -> v1::GenerateRequest {
    let mut inputs = fx.wire_inputs("", DType::F32);
    inputs.remove("timestep");
    let second = |k: &str| fx.get(k).narrow(0, 1, 1).unwrap();
    v1::GenerateRequest {
        model_class_name: "QwenImagePipeline".into(),
        cache_adapter: adapter.into(),
        cache_config: Some(v1::CacheConfig {
            rel_l1_thresh: Some(thresh),
            ..Default::default()
        }),
        num_inference_steps: steps,
        inputs,
        negative_inputs: TensorMap::from([
            (
                "encoder_hidden_states".to_string(),
                encode_tensor(&second("b2.in.encoder_hidden_states"), DType::F32).unwrap(),
            ),
            (
                "encoder_hidden_states_mask".to_string(),
                encode_tensor(
                    &second("b2.in.encoder_hidden_states_mask"),
                    DType::DtypeUnspecified,
                )
                .unwrap(),
            ),
        ]),
        true_cfg_scale: Some(4.0),
        cfg_renorm: Some(true),
        ..Default::default()
    }
}

struct Run {
    steps: Vec<v1::StepEvent>,
    result: v1::GenerateResult,
}

/// Runs a generation to its end; `on_step(i)` after step event `i`.
async fn generate(
    ctl: &TestController,
    req: v1::GenerateRequest,
    mut on_step: impl FnMut(usize),
) -> Result<Run, tonic::Status> {
    let mut stream = ctl.client().await.generate(req).await?.into_inner();
    let mut steps = Vec::new();
    while let Some(ev) = stream.next().await {
        match ev?.event {
            Some(generate_event::Event::Step(s)) => {
                on_step(steps.len());
                steps.push(s);
            }
            Some(generate_event::Event::Result(result)) => return Ok(Run { steps, result }),
            None => {}
        }
    }
    Err(tonic::Status::internal("no result"))
}

/// Asserts two runs are bit-identical: latents and every decision's numbers.
fn same(what: &str, a: &Run, b: &Run) {
    let d = max_abs_diff(
        &decode(a.result.latents.as_ref().unwrap()),
        &decode(b.result.latents.as_ref().unwrap()),
    );
    assert_eq!(d, 0.0, "{what}: latents differ by {d}");
    let decisions = |r: &Run| -> Vec<Vec<v1::BranchDecision>> {
        r.steps.iter().map(|s| s.branches.clone()).collect()
    };
    assert_eq!(decisions(a), decisions(b), "{what}: decisions differ");
    assert_eq!(
        (a.result.computed_steps, a.result.reused_steps),
        (b.result.computed_steps, b.result.reused_steps)
    );
}

const WIRE: [&str; 2] = ["--resident-tensors", "false"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resident_and_wire_modes_give_the_same_bits_with_cfg() {
    for (fixture, request) in [
        (
            "flux-tiny",
            flux_request as fn(&Fixture, &str, f64, u32) -> v1::GenerateRequest,
        ),
        ("qwen-image-tiny", qwen_request),
    ] {
        let fx = Fixture::load(fixture);
        let d = TestDenoiser::start(&["--model", fx.dir.to_str().unwrap()]).await;
        let (url, proxy) = RecordingProxy::start(&d).await;
        let resident = TestController::start(&["--denoiser", &url]).await;
        let wire = TestController::start(&["--denoiser", &url, WIRE[0], WIRE[1]]).await;
        let steps = 10;
        let (mut reused, mut decided_apart) = (0, 0);
        // Caching off runs the three stages in one call: with BF16 on the wire its streams
        // must still be rounded as the stage calls round them.
        // TeaCache runs one call per step (STEP), the denoiser taking the branch the
        // controller's rule gives on its signal: with BF16 too, and with the CFG branches
        // deciding together.
        for (adapter, thresh, wire_dtype, shared) in [
            ("none", 0.0, DType::F32, false),
            ("none", 0.0, DType::Bf16, false),
            ("tea_cache", 0.3, DType::F32, false),
            ("tea_cache", 0.8, DType::F32, false),
            ("tea_cache", 0.8, DType::Bf16, false),
            ("tea_cache", 0.8, DType::F32, true),
        ] {
            let mut req = request(&fx, adapter, thresh, steps);
            req.wire_dtype = wire_dtype as i32;
            if let Some(c) = req.cache_config.as_mut() {
                c.shared_cfg_decision = Some(shared);
            }
            proxy.clear();
            let w = generate(&wire, req.clone(), |_| {}).await.unwrap();
            assert_eq!(proxy.log.lock().unwrap().resident_steps, 0);
            proxy.clear();
            let r = generate(&resident, req, |_| {}).await.unwrap();
            {
                let log = proxy.log.lock().unwrap();
                // One call per step, caching on or off; no stage calls.
                let phase = if adapter == "none" {
                    v1::ResidentPhase::Fused
                } else {
                    v1::ResidentPhase::Step
                };
                assert_eq!(
                    log.resident_phases,
                    vec![phase as i32; steps as usize],
                    "{fixture} {adapter}"
                );
                assert_eq!((log.preprocess, log.run_blocks, log.postprocess), (0, 0, 0));
                assert_eq!(log.resident_rebuilds, 0, "one healthy replica: no misses");
            }
            same(
                &format!("{fixture} {adapter} {thresh} {wire_dtype:?} shared {shared}"),
                &r,
                &w,
            );
            // The finished session's tensors are released on the denoiser.
            let id = r.result.session_id.clone();
            for _ in 0..200 {
                if proxy.log.lock().unwrap().released.contains(&id) {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            assert!(
                proxy.log.lock().unwrap().released.contains(&id),
                "{id} not released"
            );
            reused += r.result.reused_steps;
            // Steps whose branches decided apart: none when they decide together.
            let apart = r
                .steps
                .iter()
                .filter(|s| {
                    let computed = s.branches.iter().filter(|b| b.computed).count();
                    computed > 0 && computed < s.branches.len()
                })
                .count();
            if shared {
                assert_eq!(apart, 0, "{fixture}: shared decisions came apart");
            } else {
                decided_apart += apart;
            }
            eprintln!(
                "{fixture} {adapter} {thresh} {wire_dtype:?} shared {shared}: resident == wire, {} computed / {} reused",
                r.result.computed_steps, r.result.reused_steps
            );
        }
        assert!(reused > 0, "{fixture}: TeaCache reused nothing");
        // Qwen-Image's indicator depends on the latents and timestep alone, so its branches
        // always decide alike; FLUX's on the pooled text too.
        assert!(
            fixture != "flux-tiny" || decided_apart > 0,
            "{fixture}: the branches never decided apart, so the shared case shows nothing"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_too_small_for_a_session_still_gives_the_same_bits() {
    let fx = Fixture::load("qwen-image-tiny");
    // One byte: every tensor is evicted as soon as it is kept, so every call misses.
    let tiny =
        TestDenoiser::start(&["--model", fx.dir.to_str().unwrap(), "--resident-bytes", "1"]).await;
    let (url, proxy) = RecordingProxy::start(&tiny).await;
    let ctl = TestController::start(&["--denoiser", &url]).await;
    let normal = TestDenoiser::start(&["--model", fx.dir.to_str().unwrap()]).await;
    let wire = TestController::start(&["--denoiser", &normal.url(), WIRE[0], WIRE[1]]).await;
    for (adapter, thresh) in [("tea_cache", 0.3), ("none", 0.0)] {
        let req = qwen_request(&fx, adapter, thresh, 8);
        proxy.clear();
        let r = generate(&ctl, req.clone(), |_| {}).await.unwrap();
        let w = generate(&wire, req, |_| {}).await.unwrap();
        same(&format!("evicting store, {adapter}"), &r, &w);
        let log = proxy.log.lock().unwrap();
        eprintln!(
            "evicting store, {adapter}: {} ResidentStep calls, {} rebuilds, {} reused",
            log.resident_steps, log.resident_rebuilds, r.result.reused_steps
        );
        if adapter == "tea_cache" {
            assert!(r.result.reused_steps > 0);
            // Every step after the first misses its conditioning at least.
            assert!(
                log.resident_rebuilds >= 7,
                "{} rebuilds",
                log.resident_rebuilds
            );
        }
    }
}

fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// `GET /metrics` (blocking; loopback, short).
fn metrics(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

/// The value of a metric line starting with `name` (0 when absent).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_replica_that_holds_a_session_changes_nothing() {
    let fx = Fixture::load("flux-tiny");
    let model = fx.dir.to_str().unwrap().to_string();
    let (ma, mb) = (free_port(), free_port());
    let mut a =
        KillableDenoiser::start(&["--model", &model, "--metrics-listen", &ma], "127.0.0.1:0").await;
    let mut b =
        KillableDenoiser::start(&["--model", &model, "--metrics-listen", &mb], "127.0.0.1:0").await;
    let cm = free_port();
    let ctl = TestController::start(&[
        "--denoiser",
        &a.url(),
        "--denoiser",
        &b.url(),
        "--metrics-listen",
        &cm,
    ])
    .await;
    let reference = TestDenoiser::start(&["--model", &model]).await;
    let wire = TestController::start(&["--denoiser", &reference.url(), WIRE[0], WIRE[1]]).await;
    let req = flux_request(&fx, "tea_cache", 0.6, 12);
    let want = generate(&wire, req.clone(), |_| {}).await.unwrap();
    let mut killed = None;
    let got = generate(&ctl, req, |i| {
        if i == 4 {
            // The replica holding the session's tensors is the one with resident bytes.
            let held = |m: &str| metric(&metrics(m), "teaserve_denoiser_resident_bytes");
            let (ha, hb) = (held(&ma), held(&mb));
            assert!(
                (ha > 0.0) != (hb > 0.0),
                "affinity: one holder ({ha}, {hb})"
            );
            if ha > 0.0 {
                a.kill();
                killed = Some("a");
            } else {
                b.kill();
                killed = Some("b");
            }
        }
    })
    .await
    .unwrap_or_else(|e| panic!("the generation failed after its replica died: {e}"));
    same("holder killed after step 5", &got, &want);
    assert!(got.result.reused_steps > 0);
    let survivor = if killed == Some("a") { &mb } else { &ma };
    let text = metrics(survivor);
    assert!(
        metric(&text, "teaserve_denoiser_resident_misses") >= 1.0,
        "the survivor saw the session first as a miss:\n{text}"
    );
    assert!(metric(&text, "teaserve_denoiser_resident_rebuilds") >= 1.0);
    let ctl_metrics = metrics(&cm);
    assert!(
        metric(
            &ctl_metrics,
            "teaserve_controller_step_paths_total{path=\"rebuild\"}"
        ) >= 1.0,
        "{ctl_metrics}"
    );
    eprintln!("killed {killed:?} after step 5 of 12: bit-identical to the wire run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_resident_steps_are_refused_clearly_and_misses_are_marked() {
    let fx = Fixture::load("flux-tiny");
    let d = TestDenoiser::start(&["--model", fx.dir.to_str().unwrap()]).await;
    let mut c = d.client().await;
    let mut conditioning = fx.wire_inputs("", DType::F32);
    let hidden = conditioning.remove("hidden_states").unwrap();
    let timestep = conditioning.remove("timestep").unwrap();
    let good = v1::ResidentStepRequest {
        session_id: "s1".into(),
        generation: 0,
        step: 0,
        phase: v1::ResidentPhase::Signal as i32,
        hidden_states: Some(hidden.clone()),
        timestep: Some(timestep.clone()),
        branches: vec![v1::ResidentBranch {
            branch: "positive".into(),
            conditioning: conditioning.clone(),
            ..Default::default()
        }],
        wire_dtype: DType::F32 as i32,
        rebuild: false,
        shared_decision: false,
    };
    type Edit = fn(&mut v1::ResidentStepRequest);
    fn rule(r: &mut v1::ResidentStepRequest, coefficients: Vec<f64>) {
        r.phase = v1::ResidentPhase::Step as i32;
        r.branches[0].reuse_rule = Some(v1::ReuseRule {
            accumulated: 0.0,
            threshold: 0.5,
            coefficients,
        });
    }
    let cases: [(Edit, &str); 8] = [
        (
            |r| r.session_id.clear(),
            "session_id must be 1 to 128 bytes",
        ),
        (
            |r| r.session_id = "x".repeat(500),
            "session_id must be 1 to 128 bytes",
        ),
        (|r| r.phase = 0, "phase 0 is not accepted"),
        (
            |r| {
                let b = r.branches[0].clone();
                r.branches.push(b);
            },
            "appears twice",
        ),
        (
            |r| {
                let h = r.hidden_states.clone().unwrap();
                r.branches[0].conditioning.insert("hidden_states".into(), h);
            },
            "must not hold 'hidden_states'",
        ),
        (
            |r| r.hidden_states = None,
            "hidden_states and timestep are required",
        ),
        (
            |r| rule(r, vec![1.0; 4]),
            "reuse_rule.coefficients must hold 5 numbers",
        ),
        (
            |r| rule(r, vec![0.0, 0.0, 0.0, f64::NAN, 0.0]),
            "reuse_rule numbers must be finite",
        ),
    ];
    for (edit, says) in cases {
        let mut req = good.clone();
        edit(&mut req);
        let err = c.resident_step(req).await.unwrap_err();
        refused(&err, says);
    }
    // A step that needs what was never kept is a marked miss, not an error of the input.
    let mut advance = good.clone();
    advance.session_id = "never-seen".into();
    advance.phase = v1::ResidentPhase::Advance as i32;
    advance.branches[0].conditioning.clear();
    advance.branches[0].compute = true;
    let err = c.resident_step(advance.clone()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(teaserve_proto::serving::is_resident_miss(&err), "{err:?}");
    // The same step with rebuild succeeds.
    advance.rebuild = true;
    advance.branches[0].conditioning = conditioning;
    let ok = c.resident_step(advance).await.unwrap().into_inner();
    assert_eq!(ok.samples.len(), 1);
    assert_eq!(ok.rebuilt, 1);
    // The service is unharmed, and a denoiser with resident mode off says so.
    c.resident_step(good.clone()).await.unwrap();
    later_steps_are_checked_against_the_kept_conditioning(&mut c, &good).await;
    let off =
        TestDenoiser::start(&["--model", fx.dir.to_str().unwrap(), "--resident-bytes", "0"]).await;
    let err = off.client().await.resident_step(good).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message().contains("resident mode is off"),
        "{}",
        err.message()
    );
    assert!(!teaserve_proto::serving::is_resident_miss(&err));
}

/// Asserts a clear refusal: INVALID_ARGUMENT, saying `says`, bounded.
fn refused(err: &tonic::Status, says: &str) {
    assert_eq!(
        err.code(),
        tonic::Code::InvalidArgument,
        "{}",
        err.message()
    );
    assert!(err.message().contains(says), "{says}: {}", err.message());
    assert!(err.message().len() < 1000);
}

/// The conditioning is checked once, on a session's first step; later steps send only latents
/// and a timestep, which are still checked against what it bound (token count, batch) and for
/// NaN, and a refused step leaves the kept conditioning as it was.
async fn later_steps_are_checked_against_the_kept_conditioning(
    c: &mut teaserve_proto::v1::denoiser_client::DenoiserClient<tonic::transport::Channel>,
    good: &v1::ResidentStepRequest,
) {
    let mut first = good.clone();
    first.session_id = "kept-conditioning".into();
    first.phase = v1::ResidentPhase::Fused as i32;
    c.resident_step(first.clone()).await.unwrap();
    let mut later = first.clone();
    later.step = 1;
    later.branches[0].conditioning.clear();
    let latents = decode(later.hidden_states.as_ref().unwrap());
    let tokens = latents.dim(1).unwrap();
    let fewer = latents.narrow(1, 0, tokens - 1).unwrap();
    let nan = (&latents * f64::NAN).unwrap();
    for (bad, says) in [
        (fewer, "but 'hidden_states of an earlier step' set N ="),
        (nan, "'hidden_states': holds a non-finite value"),
    ] {
        let mut req = later.clone();
        req.hidden_states = Some(encode_tensor(&bad, DType::F32).unwrap());
        let err = c.resident_step(req).await.unwrap_err();
        refused(&err, says);
    }
    let again = c.resident_step(later).await.unwrap().into_inner();
    assert_eq!(again.samples.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_resident_mode_turns_the_session_to_wire_mode() {
    let fx = Fixture::load("flux-tiny");
    let d = TestDenoiser::start(&["--model", fx.dir.to_str().unwrap()]).await;
    let (url, proxy) = RecordingProxy::start(&d).await;
    let ctl = TestController::start(&["--denoiser", &url]).await;
    let wire = TestController::start(&["--denoiser", &d.url(), WIRE[0], WIRE[1]]).await;
    let req = flux_request(&fx, "tea_cache", 0.6, 10);
    let want = generate(&wire, req.clone(), |_| {}).await.unwrap();
    // From the first step: the whole generation runs in wire mode, the same bits.
    proxy
        .resident_unimplemented
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let got = generate(&ctl, req.clone(), |_| {}).await.unwrap();
    same("old replica from the start", &got, &want);
    assert!(proxy.log.lock().unwrap().preprocess > 0);
    // From the middle (a rolling update replacing the replica): the generation completes;
    // the step that switched computes (the previous indicator was kept on the denoiser).
    proxy
        .resident_unimplemented
        .store(false, std::sync::atomic::Ordering::SeqCst);
    proxy.clear();
    let flag = proxy.resident_unimplemented.clone();
    let got = generate(&ctl, req, move |i| {
        if i == 4 {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    })
    .await
    .unwrap();
    assert_eq!(got.steps.len(), 10);
    // The step that switched is the first one the stage calls served (the controller may run
    // ahead of the client's events, so it is step 5 or later).
    let first_wire = proxy.log.lock().unwrap().modulated.first().unwrap().0;
    let k = got
        .steps
        .iter()
        .position(|s| teaserve_controller::schedule::transformer_timestep(s.sigma) == first_wire)
        .unwrap();
    assert!(k >= 5, "switched at step {k}");
    let switched = &got.steps[k];
    assert!(
        switched.branches.iter().all(|b| b.computed && b.forced),
        "{switched:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_the_step_phase_gets_two_calls_per_cached_step() {
    let fx = Fixture::load("flux-tiny");
    let d = TestDenoiser::start(&["--model", fx.dir.to_str().unwrap()]).await;
    let (url, proxy) = RecordingProxy::start(&d).await;
    let ctl = TestController::start(&["--denoiser", &url]).await;
    let wire = TestController::start(&["--denoiser", &d.url(), WIRE[0], WIRE[1]]).await;
    let req = flux_request(&fx, "tea_cache", 0.8, 10);
    let want = generate(&wire, req.clone(), |_| {}).await.unwrap();
    // A denoiser from before STEP refuses it as an unknown phase: the session goes on in
    // resident mode with SIGNAL then ADVANCE, the same bits.
    proxy
        .step_phase_unknown
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let got = generate(&ctl, req, |_| {}).await.unwrap();
    same("replica without STEP", &got, &want);
    assert!(got.result.reused_steps > 0);
    let log = proxy.log.lock().unwrap();
    let (signal, advance) = (
        v1::ResidentPhase::Signal as i32,
        v1::ResidentPhase::Advance as i32,
    );
    assert_eq!(log.resident_phases, [signal, advance].repeat(10));
    assert_eq!((log.preprocess, log.run_blocks, log.postprocess), (0, 0, 0));
}
