//! Both services on loopback sockets with the flux-tiny fixture model: the controller's
//! Generate stream and explicit sessions against an in-process reference loop and the pure
//! TeaCache policy, with every denoiser call observed through a recording proxy.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use candle_core::{DType as CDType, Device, Tensor};
use teaserve_controller::models;
use teaserve_controller::policy::{BranchState, TeaCacheParams};
use teaserve_controller::schedule;
use teaserve_proto::TensorMap;
use teaserve_proto::v1::{self, DType, generate_event};
use teaserve_tests::{
    Fixture, RecordingProxy, TestController, TestDenoiser, decode, flux_inputs, load_flux,
    max_abs_diff,
};
use tokio_stream::StreamExt as _;
use tonic::Code;

/// The model-native inputs of a fixture case, as a client sends them (no timestep: the
/// controller sets it from the schedule).
fn request_inputs(fx: &Fixture, prefix: &str) -> TensorMap {
    let mut m = fx.wire_inputs(prefix, DType::F32);
    m.remove("timestep");
    m
}

fn request(
    fx: &Fixture,
    prefix: &str,
    steps: u32,
    adapter: &str,
    thresh: Option<f64>,
) -> v1::GenerateRequest {
    v1::GenerateRequest {
        model_class_name: "FluxPipeline".into(),
        cache_adapter: adapter.into(),
        cache_config: thresh.map(|t| v1::CacheConfig {
            rel_l1_thresh: Some(t),
            ..Default::default()
        }),
        num_inference_steps: steps,
        inputs: request_inputs(fx, prefix),
        ..Default::default()
    }
}

struct Run {
    steps: Vec<v1::StepEvent>,
    result: v1::GenerateResult,
}

async fn generate(
    c: &mut v1::cache_controller_client::CacheControllerClient<tonic::transport::Channel>,
    req: v1::GenerateRequest,
) -> Result<Run, tonic::Status> {
    let mut stream = c.generate(req).await?.into_inner();
    let mut steps = Vec::new();
    while let Some(ev) = stream.next().await {
        match ev?.event.unwrap() {
            generate_event::Event::Step(s) => steps.push(s),
            generate_event::Event::Result(result) => return Ok(Run { steps, result }),
        }
    }
    panic!("stream ended without a result");
}

/// The reference: an in-process Euler loop over the monolithic forward.
fn reference_loop(fx: &Fixture, prefix: &str, sigmas: &[f64]) -> Tensor {
    let model = load_flux(fx);
    let mut inputs = flux_inputs(fx, prefix);
    let b = inputs.hidden_states.dim(0).unwrap();
    let mut latents = inputs.hidden_states.to_dtype(CDType::F32).unwrap();
    for w in sigmas.windows(2) {
        inputs.hidden_states = latents.clone();
        inputs.timestep =
            Tensor::full(schedule::transformer_timestep(w[0]), b, &Device::Cpu).unwrap();
        let v = model.forward(&inputs).unwrap();
        latents = (&latents + (v * (w[1] - w[0])).unwrap()).unwrap();
    }
    latents
}

async fn pair(
    fixture: &str,
    controller_flags: &[&str],
) -> (Fixture, TestDenoiser, RecordingProxy, TestController) {
    let fx = Fixture::load(fixture);
    let denoiser = TestDenoiser::start(&["--model", fx.dir.to_str().unwrap()]).await;
    let (url, proxy) = RecordingProxy::start(&denoiser).await;
    // The stateless wire mode: these tests look at the stage calls themselves (resident mode
    // is tests/tests/resident.rs).
    let mut flags = vec!["--denoiser", url.as_str(), "--resident-tensors", "false"];
    flags.extend_from_slice(controller_flags);
    let controller = TestController::start(&flags).await;
    (fx, denoiser, proxy, controller)
}

#[tokio::test]
async fn caching_off_equals_the_in_process_loop() {
    let (fx, _d, proxy, ctl) = pair("flux-tiny", &[]).await;
    let mut c = ctl.client().await;
    for (prefix, steps, explicit) in [("", 6, None), ("b2.", 4, Some(vec![1.0, 0.7, 0.4, 0.1]))] {
        proxy.clear();
        let mut req = request(&fx, prefix, steps, "none", None);
        if let Some(s) = &explicit {
            req.sigmas = s.clone();
        }
        let run = generate(&mut c, req).await.unwrap();
        let sigmas: Vec<f64> = match &explicit {
            Some(s) => schedule::from_explicit(s),
            None => schedule::default_sigmas(
                &models::lookup("FluxPipeline").unwrap().schedule,
                steps as usize,
                64,
            ),
        };
        let streamed: Vec<f64> = run.steps.iter().map(|s| s.sigma).collect();
        assert_eq!(
            streamed,
            sigmas[..steps as usize],
            "StepEvent sigmas follow the schedule"
        );
        let want = reference_loop(&fx, prefix, &sigmas);
        let got = decode(run.result.latents.as_ref().unwrap());
        let d = max_abs_diff(&got, &want);
        eprintln!(
            "caching off, {prefix:<3} {steps} steps: final latents max|diff| vs in-process loop = {d:.3e}"
        );
        assert!(d <= 1e-5, "{d}");
        assert_eq!(
            (run.result.computed_steps, run.result.reused_steps),
            (steps, 0)
        );
        let log = proxy.log.lock().unwrap();
        assert_eq!(
            (log.preprocess, log.run_blocks, log.postprocess),
            (steps as usize, steps as usize, steps as usize)
        );
        for s in &run.steps {
            assert_eq!(s.branches.len(), 1);
            assert!(s.branches[0].computed && !s.branches[0].forced);
        }
    }
}

fn flux_params(thresh: f64) -> TeaCacheParams {
    TeaCacheParams {
        rel_l1_thresh: thresh,
        coefficients: models::lookup("FluxPipeline").unwrap().coefficients,
        warmup_steps: 0,
        cooldown_steps: 0,
        max_consecutive_reuses: None,
    }
}

#[tokio::test]
async fn teacache_decisions_follow_the_pure_policy() {
    let (fx, _d, proxy, ctl) = pair("flux-tiny", &[]).await;
    let mut c = ctl.client().await;
    let steps = 12u32;
    let mut computed_by_thresh = Vec::new();
    for thresh in [0.05, 0.3, 0.6, 1.0, 2.0] {
        proxy.clear();
        let run = generate(&mut c, request(&fx, "", steps, "tea_cache", Some(thresh)))
            .await
            .unwrap();
        let log = proxy.log.lock().unwrap();
        // The pure policy over exactly the modulated inputs Preprocess returned.
        let mut state = BranchState::new();
        let p = flux_params(thresh);
        assert_eq!(log.modulated.len(), steps as usize);
        for (i, ((t, _, m), ev)) in log.modulated.iter().zip(&run.steps).enumerate() {
            assert_eq!(
                *t,
                schedule::transformer_timestep(ev.sigma),
                "step {i} timestep"
            );
            let values: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
            let want = state.decide(&p, i, steps as usize, m.dims(), &values);
            let got = &ev.branches[0];
            assert_eq!(got.branch, v1::Branch::Positive as i32);
            assert_eq!(got.computed, want.compute, "thresh {thresh} step {i}");
            assert_eq!(
                got.forced,
                want.forced.is_some(),
                "thresh {thresh} step {i}"
            );
            assert_eq!(got.rel_l1, want.rel_l1, "thresh {thresh} step {i}");
            assert_eq!(got.rescaled, want.rescaled, "thresh {thresh} step {i}");
            assert_eq!(
                got.accumulated, want.accumulated,
                "thresh {thresh} step {i}"
            );
        }
        assert!(run.steps[0].branches[0].computed && run.steps[0].branches[0].forced);
        assert!(run.steps.last().unwrap().branches[0].forced);
        // Reuse never calls RunBlocks.
        assert_eq!(
            log.run_blocks, run.result.computed_steps as usize,
            "thresh {thresh}"
        );
        assert_eq!(log.postprocess, steps as usize);
        assert_eq!(run.result.computed_steps + run.result.reused_steps, steps);
        let pattern: String = run
            .steps
            .iter()
            .map(|s| if s.branches[0].computed { 'C' } else { '.' })
            .collect();
        eprintln!(
            "thresh {thresh:<4}: {pattern} computed {}/{steps}",
            run.result.computed_steps
        );
        computed_by_thresh.push(run.result.computed_steps);
    }
    assert!(
        computed_by_thresh.windows(2).all(|w| w[0] >= w[1]),
        "{computed_by_thresh:?}"
    );
    assert!(
        computed_by_thresh.first() > computed_by_thresh.last(),
        "{computed_by_thresh:?}"
    );
}

async fn expect_invalid(
    c: &mut v1::cache_controller_client::CacheControllerClient<tonic::transport::Channel>,
    req: v1::GenerateRequest,
    code: Code,
    message: &str,
) {
    let err = match c.generate(req).await {
        Err(e) => e,
        Ok(resp) => match resp.into_inner().next().await {
            Some(Err(e)) => e,
            other => panic!("expected an error, got {other:?}"),
        },
    };
    assert_eq!(err.code(), code, "{}", err.message());
    assert!(
        err.message().contains(message),
        "{:?} lacks {message:?}",
        err.message()
    );
}

#[tokio::test]
async fn bad_configs_get_the_seed_messages_and_the_controller_keeps_serving() {
    let (fx, _d, _proxy, ctl) = pair("flux-tiny", &[]).await;
    let mut c = ctl.client().await;
    let good = request(&fx, "", 3, "tea_cache", None);
    let with_cfg = |cfg: v1::CacheConfig| v1::GenerateRequest {
        cache_config: Some(cfg),
        ..good.clone()
    };

    expect_invalid(
        &mut c,
        with_cfg(v1::CacheConfig {
            model_type: "SD3Pipeline".into(),
            ..Default::default()
        }),
        Code::InvalidArgument,
        "Unknown model type: 'SD3Pipeline'. Supported: ['FluxPipeline', 'TinyFluxPipeline', 'QwenImagePipeline']",
    )
    .await;
    expect_invalid(
        &mut c,
        v1::GenerateRequest {
            cache_adapter: "fb_cache".into(),
            ..good.clone()
        },
        Code::InvalidArgument,
        "Unknown cache adapter 'fb_cache'. Supported: ['none', 'tea_cache', 'first_block_cache', 'mag_cache', 'taylor_seer']",
    )
    .await;
    expect_invalid(
        &mut c,
        with_cfg(v1::CacheConfig {
            rel_l1_thresh: Some(-0.2),
            ..Default::default()
        }),
        Code::InvalidArgument,
        "rel_l1_thresh must be a finite number >= 0, got -0.2",
    )
    .await;
    expect_invalid(
        &mut c,
        with_cfg(v1::CacheConfig {
            rel_l1_thresh: Some(f64::NAN),
            ..Default::default()
        }),
        Code::InvalidArgument,
        "rel_l1_thresh must be a finite number >= 0, got NaN",
    )
    .await;
    expect_invalid(
        &mut c,
        with_cfg(v1::CacheConfig {
            coefficients: vec![1.0, 2.0, 3.0],
            ..Default::default()
        }),
        Code::InvalidArgument,
        "coefficients must be exactly 5 finite numbers (highest power first), got [1.0, 2.0, 3.0]",
    )
    .await;
    expect_invalid(
        &mut c,
        v1::GenerateRequest {
            num_inference_steps: 1001,
            ..good.clone()
        },
        Code::InvalidArgument,
        "num_inference_steps must be between 1 and 1000, got 1001",
    )
    .await;
    expect_invalid(
        &mut c,
        v1::GenerateRequest {
            sigmas: vec![1.0, f64::NAN, 0.5],
            num_inference_steps: 3,
            ..good.clone()
        },
        Code::InvalidArgument,
        "sigmas must be finite numbers in [0, 1], got NaN",
    )
    .await;
    let mut with_timestep = good.clone();
    with_timestep.inputs.insert(
        "timestep".into(),
        fx.wire_inputs("", DType::F32)["timestep"].clone(),
    );
    expect_invalid(
        &mut c,
        with_timestep,
        Code::InvalidArgument,
        "inputs['timestep'] is set by the controller",
    )
    .await;
    let mut no_latents = good.clone();
    no_latents.inputs.remove("hidden_states");
    expect_invalid(
        &mut c,
        no_latents,
        Code::InvalidArgument,
        "inputs['hidden_states']",
    )
    .await;
    // The denoiser's own validation reaches the client as INVALID_ARGUMENT.
    let mut no_text = good.clone();
    no_text.inputs.remove("encoder_hidden_states");
    expect_invalid(
        &mut c,
        no_text,
        Code::InvalidArgument,
        "missing inputs tensor 'encoder_hidden_states'",
    )
    .await;
    // A model type nobody serves.
    expect_invalid(
        &mut c,
        v1::GenerateRequest {
            model_class_name: "QwenImagePipeline".into(),
            ..good.clone()
        },
        Code::Unavailable,
        "no denoiser serves model type 'QwenImagePipeline'",
    )
    .await;

    let run = generate(&mut c, good).await.unwrap();
    assert_eq!(run.steps.len(), 3);
    let sessions = c
        .list_sessions(v1::ListSessionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        sessions.sessions.is_empty(),
        "failed requests leave no session behind"
    );
}

#[tokio::test]
async fn explicit_sessions_drive_the_same_generation() {
    let (fx, _d, proxy, ctl) = pair("flux-tiny", &["--max-sessions", "2"]).await;
    let mut c = ctl.client().await;
    let req = request(&fx, "", 5, "tea_cache", Some(0.6));
    let reference = generate(&mut c, req.clone()).await.unwrap();

    let created = c
        .create_session(v1::CreateSessionRequest {
            request: Some(req.clone()),
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!((created.next_step, created.num_inference_steps), (0, 5));
    assert_eq!(created.cache_adapter, "tea_cache");
    assert_eq!(created.sigmas.len(), 6);
    let id = created.session_id.clone();
    let listed = c
        .list_sessions(v1::ListSessionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].session_id, id);
    assert!(listed[0].memory_bytes > 0);

    let step = |c: &mut v1::cache_controller_client::CacheControllerClient<_>, id: String| {
        let mut c = c.clone();
        async move {
            c.step(v1::StepRequest {
                session_id: id,
                return_latents: false,
            })
            .await
        }
    };
    let run_all = |c: v1::cache_controller_client::CacheControllerClient<_>, id: String| async move {
        let mut c = c;
        let mut events = Vec::new();
        loop {
            let r = step(&mut c, id.clone()).await.unwrap().into_inner();
            events.push(r.event.unwrap());
            if let Some(result) = r.result {
                assert!(r.latents.is_some());
                return (events, result);
            }
            assert!(r.latents.is_none());
        }
    };
    let (events, result) = run_all(c.clone(), id.clone()).await;
    let without_time = |e: &v1::StepEvent| v1::StepEvent {
        elapsed_ms: 0.0,
        ..e.clone()
    };
    assert_eq!(
        events.iter().map(without_time).collect::<Vec<_>>(),
        reference.steps.iter().map(without_time).collect::<Vec<_>>(),
        "Step calls make the same decisions as Generate"
    );
    assert_eq!(
        max_abs_diff(
            &decode(result.latents.as_ref().unwrap()),
            &decode(reference.result.latents.as_ref().unwrap())
        ),
        0.0
    );
    assert_eq!(
        (result.computed_steps, result.reused_steps),
        (
            reference.result.computed_steps,
            reference.result.reused_steps
        )
    );

    // All steps done: another Step is refused, the session stays for inspection.
    let err = step(&mut c, id.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());

    // Reset with restart rewinds to step 0 and the run repeats bit for bit.
    let reset = c
        .reset_session(v1::ResetSessionRequest {
            session_id: id.clone(),
            restart: true,
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(
        (reset.next_step, reset.computed_steps, reset.finished),
        (0, 0, false)
    );
    let (_, again) = run_all(c.clone(), id.clone()).await;
    assert_eq!(
        max_abs_diff(
            &decode(again.latents.as_ref().unwrap()),
            &decode(result.latents.as_ref().unwrap())
        ),
        0.0
    );

    // A cache-only reset mid-run makes the next step compute (the seed's adapter.reset).
    c.reset_session(v1::ResetSessionRequest {
        session_id: id.clone(),
        restart: true,
    })
    .await
    .unwrap();
    for _ in 0..2 {
        step(&mut c, id.clone()).await.unwrap();
    }
    c.reset_session(v1::ResetSessionRequest {
        session_id: id.clone(),
        restart: false,
    })
    .await
    .unwrap();
    proxy.clear();
    let ev = step(&mut c, id.clone())
        .await
        .unwrap()
        .into_inner()
        .event
        .unwrap();
    assert!(ev.branches[0].computed && ev.branches[0].forced);
    assert_eq!(proxy.log.lock().unwrap().run_blocks, 1);

    // Session limit: a second session fits, a third does not; existing ones are untouched.
    let second = c
        .create_session(v1::CreateSessionRequest {
            request: Some(req.clone()),
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let err = c
        .create_session(v1::CreateSessionRequest {
            request: Some(req.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(
        err.message().contains("--max-sessions"),
        "{}",
        err.message()
    );
    let err = c.generate(req.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    step(&mut c, id.clone()).await.unwrap();

    // Close frees; unknown ids are NOT_FOUND.
    c.close_session(v1::CloseSessionRequest {
        session_id: id.clone(),
    })
    .await
    .unwrap();
    c.close_session(v1::CloseSessionRequest {
        session_id: second.session_id,
    })
    .await
    .unwrap();
    let err = step(&mut c, id.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    let err = c
        .close_session(v1::CloseSessionRequest {
            session_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        c.list_sessions(v1::ListSessionsRequest {})
            .await
            .unwrap()
            .into_inner()
            .sessions
            .is_empty()
    );
    generate(&mut c, req).await.unwrap();
}

#[tokio::test]
async fn idle_sessions_expire_and_cancelled_streams_free_their_session() {
    let (fx, _d, _proxy, ctl) = pair("flux-tiny", &["--session-ttl-secs", "1"]).await;
    let mut c = ctl.client().await;
    let req = request(&fx, "", 400, "none", None);
    let id = c
        .create_session(v1::CreateSessionRequest {
            request: Some(req.clone()),
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap()
        .session_id;
    tokio::time::sleep(std::time::Duration::from_millis(1600)).await;
    let err = c
        .step(v1::StepRequest {
            session_id: id,
            return_latents: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());

    // A long generation, cancelled after its first event: the session goes at once.
    let mut stream = c.generate(req).await.unwrap().into_inner();
    stream.next().await.unwrap().unwrap();
    assert_eq!(
        c.list_sessions(v1::ListSessionsRequest {})
            .await
            .unwrap()
            .into_inner()
            .sessions
            .len(),
        1
    );
    drop(stream);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !c
        .list_sessions(v1::ListSessionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .sessions
        .is_empty()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "cancelled Generate kept its session"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn cfg_branches_keep_separate_state_and_list_models_reports_the_fleet() {
    let (fx, _d, proxy, ctl) = pair("flux-tiny", &[]).await;
    let mut c = ctl.client().await;
    let models = c
        .list_models(v1::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    let flux = models
        .iter()
        .find(|m| m.model_type == "FluxPipeline")
        .unwrap();
    assert_eq!(
        flux.coefficients,
        models::lookup("FluxPipeline")
            .unwrap()
            .coefficients
            .to_vec()
    );
    assert_eq!(flux.default_rel_l1_thresh, 0.2);
    assert_eq!(flux.endpoints.len(), 1);
    let qwen = models
        .iter()
        .find(|m| m.model_type == "QwenImagePipeline")
        .unwrap();
    assert_eq!(
        qwen.coefficients,
        vec![-4.5e+02, 2.8e+02, -4.5e+01, 3.2e+00, -2.0e-02]
    );
    assert!(qwen.endpoints.is_empty());

    // True CFG: a NEGATIVE branch with its own text; both branches decide on their own input.
    let mut req = request(&fx, "", 8, "tea_cache", Some(0.6));
    let neg_text = fx
        .get("b2.in.encoder_hidden_states")
        .narrow(0, 1, 1)
        .unwrap();
    req.negative_inputs.insert(
        "encoder_hidden_states".into(),
        teaserve_proto::encode_tensor(&neg_text, DType::F32).unwrap(),
    );
    req.true_cfg_scale = Some(3.0);
    proxy.clear();
    let run = generate(&mut c, req.clone()).await.unwrap();
    for s in &run.steps {
        let b: Vec<i32> = s.branches.iter().map(|b| b.branch).collect();
        assert_eq!(
            b,
            vec![v1::Branch::Positive as i32, v1::Branch::Negative as i32]
        );
    }
    // Both branches computing share one batched RunBlocks call (same text length here).
    let steps_computing = run
        .steps
        .iter()
        .filter(|s| s.branches.iter().any(|b| b.computed))
        .count();
    assert_eq!(proxy.log.lock().unwrap().run_blocks, steps_computing);
    assert_eq!(run.result.computed_steps + run.result.reused_steps, 16);

    // Shared decision: both branches compute whenever either needs it.
    req.cache_config.as_mut().unwrap().shared_cfg_decision = Some(true);
    let shared = generate(&mut c, req).await.unwrap();
    for s in &shared.steps {
        assert_eq!(
            s.branches[0].computed, s.branches[1].computed,
            "step {}",
            s.step
        );
    }
}

#[tokio::test]
async fn every_configuration_surface_gives_the_same_generation() {
    let fx = Fixture::load("flux-tiny");
    let denoiser = TestDenoiser::start(&["--model", fx.dir.to_str().unwrap()]).await;
    let url = denoiser.url();
    let dir = tempfile::tempdir().unwrap();
    let stage = dir.path().join("stage.yaml");
    std::fs::write(
        &stage,
        format!(
            "model: {}\nmodel_class_name: FluxPipeline\ncache_adapter: tea_cache\ncache_config:\n  rel_l1_thresh: 0.6\n",
            fx.dir.display()
        ),
    )
    .unwrap();
    let full = request(&fx, "", 10, "tea_cache", Some(0.6));
    let bare = v1::GenerateRequest {
        cache_adapter: String::new(),
        cache_config: None,
        ..full.clone()
    };
    let cases: Vec<(Vec<String>, v1::GenerateRequest)> = vec![
        (vec![], full.clone()),
        (
            vec![
                "--cache-adapter".into(),
                "tea_cache".into(),
                "--cache-config".into(),
                r#"{"rel_l1_thresh": 0.6}"#.into(),
            ],
            bare.clone(),
        ),
        (
            vec!["--config".into(), stage.to_str().unwrap().into()],
            v1::GenerateRequest {
                model_class_name: String::new(),
                ..bare.clone()
            },
        ),
        (
            // The request wins over server defaults that disagree.
            vec![
                "--cache-adapter".into(),
                "none".into(),
                "--cache-config".into(),
                r#"{"rel_l1_thresh": 5.0}"#.into(),
            ],
            full.clone(),
        ),
    ];
    let mut runs = Vec::new();
    for (flags, req) in cases {
        let mut all = vec!["--denoiser".to_string(), url.clone()];
        all.extend(flags);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let ctl = TestController::start(&refs).await;
        let run = generate(&mut ctl.client().await, req).await.unwrap();
        let decisions: Vec<Vec<v1::BranchDecision>> =
            run.steps.iter().map(|s| s.branches.clone()).collect();
        runs.push((
            decisions,
            decode(run.result.latents.as_ref().unwrap()),
            run.result.computed_steps,
        ));
    }
    let (first, latents, computed) = &runs[0];
    assert!(*computed < 10, "TeaCache must be on in the reference case");
    for (i, (d, l, _)) in runs.iter().enumerate().skip(1) {
        assert_eq!(d, first, "surface {i}: decisions differ");
        assert_eq!(max_abs_diff(l, latents), 0.0, "surface {i}: latents differ");
    }

    // The memory budget refuses a session that would not fit.
    let ctl =
        TestController::start(&["--denoiser", &url, "--max-session-memory-bytes", "1000"]).await;
    let err = ctl
        .client()
        .await
        .create_session(v1::CreateSessionRequest {
            request: Some(full),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("--max-session-memory-bytes"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn a_failed_step_rolls_back_and_a_retry_decides_the_same() {
    let (fx, _d, proxy, ctl) = pair("flux-tiny", &[]).await;
    let mut c = ctl.client().await;
    let req = request(&fx, "", 8, "tea_cache", Some(0.6));
    let reference = generate(&mut c, req.clone()).await.unwrap();
    let id = c
        .create_session(v1::CreateSessionRequest { request: Some(req) })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap()
        .session_id;
    let mut events = Vec::new();
    let mut failures = 0;
    let mut result = None;
    // Step 0 succeeds, then the next RunBlocks fails once.
    while result.is_none() {
        if events.len() == 1 && failures == 0 {
            proxy
                .fail_run_blocks
                .store(1, std::sync::atomic::Ordering::SeqCst);
        }
        match c
            .step(v1::StepRequest {
                session_id: id.clone(),
                return_latents: false,
            })
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                events.push(v1::StepEvent {
                    elapsed_ms: 0.0,
                    ..r.event.unwrap()
                });
                result = r.result;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
                assert!(e.message().contains("RunBlocks"), "{}", e.message());
                let info = c
                    .list_sessions(v1::ListSessionsRequest {})
                    .await
                    .unwrap()
                    .into_inner()
                    .sessions;
                assert_eq!(
                    info[0].next_step as usize,
                    events.len(),
                    "a failed step does not advance"
                );
                failures += 1;
            }
        }
    }
    assert_eq!(failures, 1);
    let want: Vec<_> = reference
        .steps
        .iter()
        .map(|s| v1::StepEvent {
            elapsed_ms: 0.0,
            ..s.clone()
        })
        .collect();
    assert_eq!(events, want);
    let result = result.unwrap();
    assert_eq!(
        max_abs_diff(
            &decode(result.latents.as_ref().unwrap()),
            &decode(reference.result.latents.as_ref().unwrap())
        ),
        0.0
    );
    assert_eq!(result.computed_steps, reference.result.computed_steps);
}

#[tokio::test]
async fn oversize_generate_is_resource_exhausted_and_the_controller_keeps_serving() {
    let (fx, _d, _proxy, ctl) = pair("flux-tiny", &["--max-message-bytes", "12000"]).await;
    let mut c = ctl.client().await;
    // The flux-tiny latents alone are 16 KiB.
    let err = c
        .generate(request(&fx, "", 2, "none", None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(
        err.message().contains("--max-message-bytes"),
        "{}",
        err.message()
    );
    let models = c.list_models(v1::ListModelsRequest {}).await.unwrap();
    assert!(!models.into_inner().models.is_empty());
}

/// Fields proto3 leaves unset get defaults: no `num_inference_steps` runs the model's
/// default steps (FluxPipeline: 28), no `model_class_name` runs the only model type served.
/// With two model types served the controller cannot pick: the seed's cache-plan message
/// first, then one naming the served types.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unset_steps_and_model_get_the_defaults() {
    let (fx, _d, _proxy, ctl) = pair("flux-tiny", &[]).await;
    let mut c = ctl.client().await;
    let mut req = request(&fx, "", 0, "none", None);
    req.model_class_name.clear();
    let mut stream = c.generate(req.clone()).await.unwrap().into_inner();
    let mut steps = 0;
    let mut result = None;
    while let Some(ev) = stream.next().await {
        match ev.unwrap().event.unwrap() {
            generate_event::Event::Step(_) => steps += 1,
            generate_event::Event::Result(r) => result = Some(r),
        }
    }
    let result = result.unwrap();
    assert_eq!(steps, 28, "FluxPipeline's default num_inference_steps");
    assert_eq!(result.computed_steps, 28);

    let qwen = Fixture::load("qwen-image-tiny");
    let other = TestDenoiser::start(&["--model", qwen.dir.to_str().unwrap()]).await;
    let flux = TestDenoiser::start(&["--model", fx.dir.to_str().unwrap()]).await;
    let two = TestController::start(&["--denoiser", &flux.url(), "--denoiser", &other.url()]).await;
    let mut c = two.client().await;
    expect_invalid(
        &mut c,
        v1::GenerateRequest {
            cache_adapter: "tea_cache".into(),
            ..req.clone()
        },
        Code::InvalidArgument,
        "model_type must be provided in cache_config",
    )
    .await;
    expect_invalid(
        &mut c,
        req,
        Code::InvalidArgument,
        "model_class_name is required: the denoisers serve several model types: \
         [\"FluxPipeline\", \"QwenImagePipeline\"]",
    )
    .await;
}
