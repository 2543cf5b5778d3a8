//! True CFG with Qwen-Image through both services: a POSITIVE and a NEGATIVE branch (padded
//! negative text), each with its own TeaCache state and residuals, batched or not, against an
//! in-process reference loop over the candle model.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use candle_core::Tensor;
use teaserve_controller::models;
use teaserve_controller::policy::{BranchState, TeaCacheParams};
use teaserve_denoiser::models::qwen_image::{Inputs, QwenImage};
use teaserve_proto::v1::{self, DType, generate_event};
use teaserve_proto::{TensorMap, encode_tensor};
use teaserve_tests::{
    CfgCombine, Fixture, RecordingProxy, Residuals, TestController, TestDenoiser, decode,
    load_qwen, max_abs_diff, qwen_cfg_reference, qwen_inputs,
};
use tokio_stream::StreamExt as _;

const STEPS: u32 = 10;
const SCALE: f64 = 4.0;

/// Positive: the batch-1 prompt (7 valid tokens). Negative: the second batch-2 prompt, whose
/// last 2 of 7 tokens are padding.
fn branches(fx: &Fixture) -> (Inputs, Inputs) {
    let pos = qwen_inputs(fx, "");
    let second = |k: &str| fx.get(k).narrow(0, 1, 1).unwrap();
    let neg = Inputs {
        encoder_hidden_states: second("b2.in.encoder_hidden_states"),
        encoder_hidden_states_mask: Some(second("b2.in.encoder_hidden_states_mask")),
        ..pos.clone()
    };
    (pos, neg)
}

fn request(fx: &Fixture, adapter: &str, thresh: f64, renorm: bool) -> v1::GenerateRequest {
    let mut inputs: TensorMap = fx.wire_inputs("", DType::F32);
    inputs.remove("timestep");
    let (_, neg) = branches(fx);
    let negative_inputs = TensorMap::from([
        (
            "encoder_hidden_states".to_string(),
            encode_tensor(&neg.encoder_hidden_states, DType::F32).unwrap(),
        ),
        (
            "encoder_hidden_states_mask".to_string(),
            encode_tensor(
                neg.encoder_hidden_states_mask.as_ref().unwrap(),
                DType::DtypeUnspecified,
            )
            .unwrap(),
        ),
    ]);
    v1::GenerateRequest {
        model_class_name: "QwenImagePipeline".into(),
        cache_adapter: adapter.into(),
        cache_config: Some(v1::CacheConfig {
            rel_l1_thresh: Some(thresh),
            ..Default::default()
        }),
        num_inference_steps: STEPS,
        inputs,
        negative_inputs,
        true_cfg_scale: Some(SCALE),
        cfg_renorm: Some(renorm),
        ..Default::default()
    }
}

struct Run {
    steps: Vec<v1::StepEvent>,
    result: v1::GenerateResult,
}

async fn generate(ctl: &TestController, req: v1::GenerateRequest) -> Run {
    let mut stream = ctl.client().await.generate(req).await.unwrap().into_inner();
    let mut steps = Vec::new();
    while let Some(ev) = stream.next().await {
        match ev.unwrap().event.unwrap() {
            generate_event::Event::Step(s) => steps.push(s),
            generate_event::Event::Result(result) => return Run { steps, result },
        }
    }
    panic!("no result");
}

fn sigmas(run: &Run) -> Vec<f64> {
    run.steps.iter().map(|s| s.sigma).chain([0.0]).collect()
}

/// In-process reference over this fixture's two branches.
fn reference(
    model: &QwenImage,
    fx: &Fixture,
    sigmas: &[f64],
    params: Option<&TeaCacheParams>,
    renorm: bool,
    residuals: Residuals,
) -> (Tensor, Vec<[bool; 2]>) {
    let (pos, neg) = branches(fx);
    qwen_cfg_reference(
        model,
        [&pos, &neg],
        sigmas,
        params,
        CfgCombine {
            scale: SCALE,
            renorm,
        },
        residuals,
    )
}

struct Rig {
    fx: Fixture,
    model: QwenImage,
    _denoiser: TestDenoiser,
    proxy: RecordingProxy,
    batched: TestController,
    unbatched: TestController,
}

async fn rig() -> Rig {
    let fx = Fixture::load("qwen-image-tiny");
    let model = load_qwen(&fx);
    let denoiser = TestDenoiser::start(&["--model", fx.dir.to_str().unwrap()]).await;
    let (url, proxy) = RecordingProxy::start(&denoiser).await;
    // The stateless wire mode: these tests look at the stage calls themselves.
    let batched = TestController::start(&["--denoiser", &url, "--resident-tensors", "false"]).await;
    let unbatched = TestController::start(&[
        "--denoiser",
        &url,
        "--batch-cfg",
        "false",
        "--resident-tensors",
        "false",
    ])
    .await;
    Rig {
        fx,
        model,
        _denoiser: denoiser,
        proxy,
        batched,
        unbatched,
    }
}

#[tokio::test]
async fn cfg_without_caching_equals_the_in_process_loop_batched_or_not() {
    let r = rig().await;
    for renorm in [false, true] {
        let req = request(&r.fx, "none", 0.0, renorm);
        r.proxy.clear();
        let unbatched = generate(&r.unbatched, req.clone()).await;
        assert_eq!(r.proxy.log.lock().unwrap().run_blocks, 2 * STEPS as usize);
        r.proxy.clear();
        let batched = generate(&r.batched, req).await;
        assert_eq!(
            r.proxy.log.lock().unwrap().run_blocks,
            STEPS as usize,
            "one call per step"
        );
        let default = models::lookup("QwenImagePipeline").unwrap().schedule;
        let want_sigmas =
            teaserve_controller::schedule::default_sigmas(&default, STEPS as usize, 64);
        assert_eq!(sigmas(&unbatched), want_sigmas);
        let (want, _) = reference(
            &r.model,
            &r.fx,
            &want_sigmas,
            None,
            renorm,
            Residuals::PerBranch,
        );
        let u = decode(unbatched.result.latents.as_ref().unwrap());
        let b = decode(batched.result.latents.as_ref().unwrap());
        let (du, db, dub) = (
            max_abs_diff(&u, &want),
            max_abs_diff(&b, &want),
            max_abs_diff(&u, &b),
        );
        eprintln!(
            "CFG renorm={renorm} caching off: unbatched vs in-process {du:.3e}, batched vs in-process {db:.3e}, batched vs unbatched {dub:.3e}"
        );
        assert!(du <= 1e-5 && db <= 1e-5 && dub <= 1e-5, "{du} {db} {dub}");
        for s in &unbatched.steps {
            assert_eq!(s.branches.len(), 2);
            assert!(s.branches.iter().all(|b| b.computed));
        }
    }
}

fn params(thresh: f64) -> TeaCacheParams {
    TeaCacheParams {
        rel_l1_thresh: thresh,
        coefficients: models::lookup("QwenImagePipeline").unwrap().coefficients,
        warmup_steps: 0,
        cooldown_steps: 0,
        max_consecutive_reuses: None,
    }
}

#[tokio::test]
async fn each_branch_follows_the_policy_on_its_own_inputs_with_its_own_residuals() {
    let r = rig().await;
    let pos_text = encode_tensor(&branches(&r.fx).0.encoder_hidden_states, DType::F32).unwrap();
    let mut any_split_decision = false;
    for thresh in [0.3, 0.8, 1.5] {
        let req = request(&r.fx, "tea_cache", thresh, false);
        r.proxy.clear();
        let run = generate(&r.unbatched, req.clone()).await;

        // 1. Two decisions per step, each the pure policy over that branch's own modulated
        //    inputs as the denoiser returned them.
        let (recorded, run_blocks_calls) = {
            let log = r.proxy.log.lock().unwrap();
            (log.modulated.clone(), log.run_blocks)
        };
        let mut per_branch: [Vec<&Tensor>; 2] = [Vec::new(), Vec::new()];
        for (_, text, m) in &recorded {
            per_branch[usize::from(*text != pos_text)].push(m);
        }
        let p = params(thresh);
        for (k, ms) in per_branch.iter().enumerate() {
            assert_eq!(ms.len(), STEPS as usize);
            let mut state = BranchState::new();
            for (i, (m, ev)) in ms.iter().zip(&run.steps).enumerate() {
                let values: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
                let want = state.decide(&p, i, STEPS as usize, m.dims(), &values);
                let got = &ev.branches[k];
                let branch = [v1::Branch::Positive, v1::Branch::Negative][k] as i32;
                assert_eq!(got.branch, branch);
                assert_eq!(
                    (got.computed, got.rel_l1, got.rescaled, got.accumulated),
                    (want.compute, want.rel_l1, want.rescaled, want.accumulated),
                    "thresh {thresh} branch {k} step {i}"
                );
            }
        }
        let computed_calls = run
            .steps
            .iter()
            .flat_map(|s| &s.branches)
            .filter(|b| b.computed)
            .count();
        assert_eq!(
            run_blocks_calls, computed_calls,
            "unbatched: one RunBlocks per computing branch"
        );

        // 2. Latents equal the in-process loop with per-branch state and residuals.
        let sig = sigmas(&run);
        let (want, decisions) =
            reference(&r.model, &r.fx, &sig, Some(&p), false, Residuals::PerBranch);
        let got = decode(run.result.latents.as_ref().unwrap());
        let d = max_abs_diff(&got, &want);
        let streamed: Vec<[bool; 2]> = run
            .steps
            .iter()
            .map(|s| [s.branches[0].computed, s.branches[1].computed])
            .collect();
        assert_eq!(streamed, decisions);
        let pattern: String = decisions
            .iter()
            .map(|[a, b]| match (a, b) {
                (true, true) => 'B',
                (true, false) => 'P',
                (false, true) => 'N',
                (false, false) => '.',
            })
            .collect();
        eprintln!(
            "thresh {thresh}: {pattern} (B both, P/N one branch, . none), computed {}/{}; latents vs in-process {d:.3e}",
            run.result.computed_steps,
            2 * STEPS
        );
        assert!(d <= 1e-5, "{d}");

        // 3. Sensitivity: had the negative branch reused the positive branch's residual, the
        //    result would be measurably different, so step 2 really proves they are distinct.
        let negative_reuses = decisions.iter().any(|[_, n]| !n);
        if negative_reuses {
            let (mixed, _) = reference(&r.model, &r.fx, &sig, Some(&p), false, Residuals::Shared);
            let dm = max_abs_diff(&got, &mixed);
            eprintln!("thresh {thresh}: latents vs shared-residual counterfactual {dm:.3e}");
            assert!(
                dm > 1e-3,
                "shared residuals would be indistinguishable ({dm})"
            );
        }
        any_split_decision |= decisions.iter().any(|[a, b]| a != b);

        // 4. Batched execution gives the same latents and decisions with fewer calls.
        r.proxy.clear();
        let batched = generate(&r.batched, req).await;
        let b = decode(batched.result.latents.as_ref().unwrap());
        let db = max_abs_diff(&b, &got);
        eprintln!(
            "thresh {thresh}: batched vs unbatched latents {db:.3e}, RunBlocks calls {}",
            r.proxy.log.lock().unwrap().run_blocks
        );
        assert!(db <= 1e-5, "{db}");
        let both = decisions.iter().filter(|[a, b]| *a && *b).count();
        let one = decisions.iter().filter(|[a, b]| a != b).count();
        assert_eq!(r.proxy.log.lock().unwrap().run_blocks, both + one);
    }
    // Qwen-Image's indicator is img_norm1(img_in(latents)) modulated by a timestep-only
    // temb: it does not see the prompt, and both branches share the latents, so their
    // decisions coincide step for step even though their states and residuals are separate.
    assert!(!any_split_decision);
}

#[tokio::test]
async fn list_models_shows_both_families_with_their_coefficients() {
    let r = rig().await;
    let models = r
        .batched
        .client()
        .await
        .list_models(v1::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    let qwen = models
        .iter()
        .find(|m| m.model_type == "QwenImagePipeline")
        .unwrap();
    assert_eq!(
        qwen.coefficients,
        vec![-4.5e+02, 2.8e+02, -4.5e+01, 3.2e+00, -2.0e-02]
    );
    assert_eq!(qwen.endpoints.len(), 1);
    let flux = models
        .iter()
        .find(|m| m.model_type == "FluxPipeline")
        .unwrap();
    assert_eq!(flux.coefficients.len(), 5);
    assert!(flux.endpoints.is_empty());
}
