//! Resident mode of the step loop: the session's large tensors stay on the denoiser that
//! computed them (`ResidentStep`), and per step only the latents, the policy's signals and the
//! predictions travel, in one call. Caching off: FUSED (the three stages). TeaCache and
//! MagCache: STEP, which carries the controller's decision down: MagCache's is taken before
//! the call (from its ratios); TeaCache's depends on the step's signal, so each branch gets
//! its rule with its accumulator ([`BranchState::rule_before_signal`]), the denoiser measures
//! the signal and takes the branch the rule gives, and the policy then decides here from the
//! returned signal, as in wire mode, and checks the denoiser's branch against its own. A
//! replica that predates STEP gets SIGNAL then ADVANCE.
//!
//! [`BranchState::rule_before_signal`]: crate::policy::BranchState::rule_before_signal
//!
//! The controller stays the source of truth: it keeps the latents of every step a kept tensor
//! came from, so when a denoiser lacks one (another replica, eviction, a restart) and answers
//! with a resident miss, the same call goes again with `rebuild` and the inputs to recompute
//! it. The miss never reaches a client. The calls prefer the replica that holds the session
//! (affinity) while it is healthy and go anywhere else when it is not.

use candle_core::{DType as CDType, Device, Tensor};
use teaserve_proto::TensorMap;
use teaserve_proto::codec::{decode_tensor, encode_tensor, resident_step_bytes};
use teaserve_proto::v1::{self, DType, ResidentPhase};

use crate::cache_config::CachePlan;
use crate::error::ControllerError;
use crate::metrics::ControllerMetrics;
use crate::orchestrator::{CallCounts, StepAt, Traffic, branch_name, share_and_trace};
use crate::policy::{Decision, Forced};
use crate::pool::DenoiserPool;
use crate::session::Session;

/// Whether this step runs in resident mode: the session wants it, it is not a calibration
/// (which needs the tensors here), and every denoiser of the model keeps resident tensors.
pub(crate) fn applies(
    session: &Session,
    describe: &v1::DescribeResponse,
    pool: &DenoiserPool,
) -> bool {
    // FirstBlockCache and TaylorSeer run their steps in wire mode for now (the first block's
    // residual and the Taylor factors are not kept on the denoiser yet).
    let policy = matches!(
        session.plan,
        CachePlan::None | CachePlan::TeaCache { .. } | CachePlan::MagCache(_)
    );
    policy
        && session.resident.on
        && session.calibration.is_none()
        && describe.resident_budget_bytes > 0
        && pool.resident_capable(&session.model_type)
}

/// Whether a failed resident call says the replica cannot do resident mode at all (an older
/// version: UNIMPLEMENTED; or `--resident-bytes 0`), rather than failing this one call.
pub(crate) fn unsupported(e: &ControllerError) -> bool {
    match e {
        ControllerError::Denoiser {
            method: "ResidentStep",
            code,
            message,
            ..
        } => {
            *code == tonic::Code::Unimplemented
                || (*code == tonic::Code::FailedPrecondition
                    && message.contains("resident mode is off"))
        }
        _ => false,
    }
}

/// Runs step `at` in resident mode; returns each branch's decision and prediction.
pub(crate) async fn step(
    session: &mut Session,
    pool: &DenoiserPool,
    metrics: &ControllerMetrics,
    counts: &mut CallCounts,
    at: &StepAt,
) -> Result<(Vec<Decision>, Vec<Tensor>), ControllerError> {
    session.resident.history.insert(at.i, at.latents.clone());
    let traffic = Traffic::new(metrics);
    let mut call = Caller {
        pool,
        traffic: &traffic,
        counts,
        rebuilt: false,
    };
    let (decisions, samples) = match session.plan.clone() {
        CachePlan::None => {
            let decisions = vec![crate::orchestrator::always_compute(); session.branches.len()];
            let resp = call.run(session, at, ResidentPhase::Fused, &[]).await?;
            (decisions, resp.samples)
        }
        plan @ (CachePlan::TeaCache { .. } | CachePlan::MagCache(_)) => {
            cached_step(&mut call, session, &plan, at).await?
        }
        CachePlan::FirstBlockCache(_) | CachePlan::TaylorSeer(_) => {
            return Err(ControllerError::Internal(format!(
                "{} does not run in resident mode",
                session.plan.adapter()
            )));
        }
    };
    prune_history(session, at.i);
    let span = tracing::Span::current();
    let path = if call.rebuilt { "rebuild" } else { "resident" };
    span.record("path", path);
    span.record("bytes", traffic.total() as i64);
    metrics.path(path);
    if samples.len() != decisions.len() {
        return Err(ControllerError::Internal(format!(
            "ResidentStep returned {} predictions for {} branches",
            samples.len(),
            decisions.len()
        )));
    }
    let preds = samples
        .iter()
        .map(|t| {
            decode_tensor(t, &Device::Cpu, usize::MAX)
                .and_then(|x| Ok(x.to_dtype(CDType::F32)?))
                .map_err(|e| {
                    ControllerError::Internal(format!("denoiser returned a bad sample: {e}"))
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((decisions, preds))
}

/// A cached step: one STEP call carrying the controller's decisions (TeaCache: its rule on
/// the step's signal), or SIGNAL then ADVANCE where a replica does not know STEP.
async fn cached_step(
    call: &mut Caller<'_>,
    session: &mut Session,
    plan: &CachePlan,
    at: &StepAt,
) -> Result<(Vec<Decision>, Vec<v1::Tensor>), ControllerError> {
    if !session.resident.two_calls {
        let before: Vec<_> = session.branches.iter().map(|b| b.state.clone()).collect();
        match one_call(call, session, plan, at).await {
            Err(e) if step_unsupported(&e) => {
                tracing::warn!(
                    session_id = %session.id,
                    error = %e,
                    "a denoiser does not know the STEP phase; this session's cached steps take \
                     two calls"
                );
                for (b, state) in session.branches.iter_mut().zip(before) {
                    b.state = state;
                }
                session.resident.two_calls = true;
            }
            other => return other,
        }
    }
    let signals = call
        .run(session, at, ResidentPhase::Signal, &[])
        .await?
        .signals;
    let decisions = decide(session, plan, at, &signals)?;
    let resp = call
        .run(
            session,
            at,
            ResidentPhase::Advance,
            &intents(session, &decisions)?,
        )
        .await?;
    kept_residuals(session, &decisions, at);
    Ok((decisions, resp.samples))
}

/// Whether a STEP call failed because the replica predates the STEP phase.
fn step_unsupported(e: &ControllerError) -> bool {
    matches!(
        e,
        ControllerError::Denoiser {
            method: "ResidentStep",
            code: tonic::Code::InvalidArgument,
            message,
            ..
        } if message.contains("phase 4 is not accepted")
    )
}

/// One STEP call. MagCache decides before it (from its ratios); TeaCache sends each
/// branch's rule and decides from the returned signals, which must give the branches the
/// denoiser took (if not, ADVANCE redoes the step with the controller's decisions).
async fn one_call(
    call: &mut Caller<'_>,
    session: &mut Session,
    plan: &CachePlan,
    at: &StepAt,
) -> Result<(Vec<Decision>, Vec<v1::Tensor>), ControllerError> {
    let (decisions, resp) = if let CachePlan::TeaCache { params, .. } = plan {
        let rules = rules(session, params, at);
        let resp = call.run(session, at, ResidentPhase::Step, &rules).await?;
        (decide(session, plan, at, &resp.signals)?, resp)
    } else {
        let decisions = decide(session, plan, at, &[])?;
        let fixed = intents(session, &decisions)?;
        let resp = call.run(session, at, ResidentPhase::Step, &fixed).await?;
        (decisions, resp)
    };
    let took = resp.signals.iter().map(|s| s.computed);
    let mut samples = resp.samples;
    if !took.eq(decisions.iter().map(|d| d.compute)) {
        tracing::warn!(
            session_id = %session.id,
            step = at.i,
            "the denoiser's branches differ from the controller's decisions; redoing the step \
             with ADVANCE"
        );
        let fixed = intents(session, &decisions)?;
        samples = call
            .run(session, at, ResidentPhase::Advance, &fixed)
            .await?
            .samples;
    }
    kept_residuals(session, &decisions, at);
    Ok((decisions, samples))
}

/// The branches that computed now keep this step's residual on the denoiser.
fn kept_residuals(session: &mut Session, decisions: &[Decision], at: &StepAt) {
    for (b, d) in session.branches.iter_mut().zip(decisions) {
        if d.compute {
            b.state.residual_kept_from(at.i);
        }
    }
}

/// What the denoiser is told to do with one branch at a step.
#[derive(Debug, Clone)]
enum Intent {
    /// Run the blocks.
    Compute,
    /// Reuse the residual kept from this step.
    Reuse(usize),
    /// Decide by TeaCache's rule on this step's signal (reusing the residual kept from
    /// `residual_step` if the rule reuses).
    Rule {
        rule: v1::ReuseRule,
        residual_step: usize,
    },
}

/// Intents from decisions already taken.
fn intents(session: &Session, decisions: &[Decision]) -> Result<Vec<Intent>, ControllerError> {
    session
        .branches
        .iter()
        .zip(decisions)
        .map(|(b, d)| {
            if d.compute {
                return Ok(Intent::Compute);
            }
            b.state
                .resident_residual()
                .map(Intent::Reuse)
                .ok_or_else(|| ControllerError::Internal("reuse without a kept residual".into()))
        })
        .collect()
}

/// TeaCache, before the signal: each branch's rule, or compute where the step computes
/// whatever the signal (forced, reuse cap, or no residual kept to reuse).
fn rules(session: &Session, params: &crate::policy::TeaCacheParams, at: &StepAt) -> Vec<Intent> {
    session
        .branches
        .iter()
        .map(|b| {
            let rule = b.state.rule_before_signal(params, at.i, at.n);
            match (rule, b.state.resident_residual()) {
                (Some((accumulated, threshold)), Some(residual_step)) => Intent::Rule {
                    rule: v1::ReuseRule {
                        accumulated,
                        threshold,
                        coefficients: params.coefficients.to_vec(),
                    },
                    residual_step,
                },
                _ => Intent::Compute,
            }
        })
        .collect()
}

/// The policy's decisions from the denoiser's signals, exactly as the wire path decides from
/// the modulated inputs themselves (MagCache decides from its ratios alone: no signals).
fn decide(
    session: &mut Session,
    plan: &CachePlan,
    at: &StepAt,
    signals: &[v1::BranchSignal],
) -> Result<Vec<Decision>, ControllerError> {
    let signals_needed = matches!(plan, CachePlan::TeaCache { .. });
    if signals_needed && signals.len() != session.branches.len() {
        return Err(ControllerError::Internal(format!(
            "ResidentStep returned {} signals for {} branches",
            signals.len(),
            session.branches.len()
        )));
    }
    let mut decisions = Vec::with_capacity(session.branches.len());
    for (k, b) in session.branches.iter_mut().enumerate() {
        let kept = b.state.resident_residual().is_some();
        let d = match plan {
            CachePlan::MagCache(params) => b.state.mag.decide(params, at.n, kept),
            CachePlan::TeaCache { params, .. } => {
                let s = &signals[k];
                let shape: Vec<usize> = s
                    .indicator_shape
                    .iter()
                    .map(|&d| d.max(0) as usize)
                    .collect();
                let mut d = b
                    .state
                    .decide_on_signal(params, at.i, at.n, &shape, s.rel_l1);
                if !d.compute && !kept {
                    b.state.force_compute(&mut d, Forced::ShapeChanged);
                }
                d
            }
            other => {
                return Err(ControllerError::Internal(format!(
                    "{} does not decide on signals",
                    other.adapter()
                )));
            }
        };
        decisions.push(d);
    }
    share_and_trace(&session.plan, &mut session.branches, &mut decisions);
    Ok(decisions)
}

/// Drops the latents no kept tensor can come from any more: older than this step (the next
/// step's previous one) and than every branch's residual step.
fn prune_history(session: &mut Session, i: usize) {
    let oldest = session
        .branches
        .iter()
        .filter_map(|b| b.state.resident_residual())
        .chain([i])
        .min()
        .unwrap_or(i);
    session.resident.history.retain(|&k, _| k >= oldest);
}

/// Makes the calls of one step.
struct Caller<'a> {
    pool: &'a DenoiserPool,
    traffic: &'a Traffic<'a>,
    counts: &'a mut CallCounts,
    /// A call of this step missed and was rebuilt.
    rebuilt: bool,
}

impl Caller<'_> {
    /// One `ResidentStep` call, light first; on a resident miss, again with `rebuild`.
    async fn run(
        &mut self,
        session: &mut Session,
        at: &StepAt,
        phase: ResidentPhase,
        intents: &[Intent],
    ) -> Result<v1::ResidentStepResponse, ControllerError> {
        let light = request(session, at, phase, intents, false)?;
        match self.send(session, light).await {
            Err(ControllerError::ResidentMiss { endpoint, message }) => {
                tracing::info!(
                    endpoint = %endpoint,
                    phase = ?phase,
                    what = %message,
                    "resident miss: rebuilding on the denoiser"
                );
                self.rebuilt = true;
                let full = request(session, at, phase, intents, true)?;
                self.send(session, full).await
            }
            other => other,
        }
    }

    async fn send(
        &mut self,
        session: &mut Session,
        req: v1::ResidentStepRequest,
    ) -> Result<v1::ResidentStepResponse, ControllerError> {
        let sent_conditioning = req.branches.iter().any(|b| !b.conditioning.is_empty());
        self.traffic.add("to_denoiser", resident_step_bytes(&req));
        let branches: Vec<&str> = session
            .branches
            .iter()
            .map(|b| branch_name(b.branch))
            .collect();
        let called = self
            .pool
            .call_prefer(
                &session.model_type,
                "ResidentStep",
                &branches.join(","),
                session.resident.endpoint.as_deref(),
                req,
                |mut c, r| async move { c.resident_step(r).await },
            )
            .await?;
        self.counts.resident_steps += 1;
        let resp = called.response;
        self.traffic.add(
            "from_denoiser",
            resp.samples.iter().map(|t| t.data.len() as u64).sum(),
        );
        if sent_conditioning {
            session.resident.conditioned = Some(called.endpoint.clone());
        }
        session.resident.endpoint = Some(called.endpoint);
        Ok(resp)
    }
}

/// The timestep tensor of step `k` for a batch of `batch`, as the wire path makes it.
fn timestep_at(session: &Session, k: usize, batch: usize) -> Result<v1::Tensor, ControllerError> {
    let sigma = session
        .sigmas
        .get(k)
        .copied()
        .ok_or_else(|| ControllerError::Internal(format!("no sigma for step {k}")))?;
    let t = Tensor::full(
        crate::schedule::transformer_timestep(sigma),
        batch,
        &Device::Cpu,
    )?;
    Ok(encode_tensor(&t, DType::F32)?)
}

/// The latents and timestep of an earlier step `k`, for a rebuild.
fn rebuild_inputs(
    session: &Session,
    k: usize,
    batch: usize,
) -> Result<v1::RebuildInputs, ControllerError> {
    let latents = session.resident.history.get(&k).cloned().ok_or_else(|| {
        ControllerError::Internal(format!("the latents of step {k} were not kept"))
    })?;
    Ok(v1::RebuildInputs {
        hidden_states: Some(latents),
        timestep: Some(timestep_at(session, k, batch)?),
    })
}

/// One step's request. Light: the conditioning only when the replica the session prefers was
/// not sent it in this generation, the latents only where the phase needs them. With
/// `rebuild`: everything needed to recompute any kept tensor.
fn request(
    session: &Session,
    at: &StepAt,
    phase: ResidentPhase,
    intents: &[Intent],
    rebuild: bool,
) -> Result<v1::ResidentStepRequest, ControllerError> {
    let batch = session.latents.dim(0)?;
    let r = &session.resident;
    let send_conditioning = rebuild || r.conditioned.is_none() || r.conditioned != r.endpoint;
    // TeaCache's signal: measured by SIGNAL, and by STEP (MagCache needs none).
    let signal = phase == ResidentPhase::Signal
        || (phase == ResidentPhase::Step && matches!(session.plan, CachePlan::TeaCache { .. }));
    let mut branches = Vec::with_capacity(session.branches.len());
    for (k, b) in session.branches.iter().enumerate() {
        let mut rb = v1::ResidentBranch {
            branch: branch_name(b.branch).to_string(),
            conditioning: if send_conditioning {
                b.inputs.clone()
            } else {
                TensorMap::new()
            },
            ..Default::default()
        };
        if signal {
            // SIGNAL: the policy state already moved past this step when it decided; the
            // signal compares with the step its previous indicator came from.
            let previous = b.state.previous_step().filter(|&p| p < at.i);
            rb.previous_step = previous.map(|p| p as u32);
            if rebuild && let Some(p) = previous {
                rb.previous = Some(rebuild_inputs(session, p, batch)?);
            }
        }
        if matches!(phase, ResidentPhase::Advance | ResidentPhase::Step) {
            let intent = intents
                .get(k)
                .ok_or_else(|| ControllerError::Internal("a branch without a decision".into()))?;
            let from = match intent {
                Intent::Compute => None,
                Intent::Reuse(from) => Some(*from),
                Intent::Rule {
                    rule,
                    residual_step,
                } => {
                    rb.reuse_rule = Some(rule.clone());
                    Some(*residual_step)
                }
            };
            rb.compute = from.is_none();
            if let Some(from) = from {
                rb.residual_step = Some(from as u32);
                if rebuild {
                    rb.residual = Some(rebuild_inputs(session, from, batch)?);
                }
            }
        }
        branches.push(rb);
    }
    let with_latents = phase != ResidentPhase::Advance || rebuild;
    Ok(v1::ResidentStepRequest {
        session_id: session.id.clone(),
        generation: r.generation,
        step: at.i as u32,
        phase: phase as i32,
        hidden_states: with_latents.then(|| at.latents.clone()),
        timestep: with_latents.then(|| at.timestep.clone()),
        branches,
        wire_dtype: session.wire_dtype as i32,
        rebuild,
        shared_decision: phase == ResidentPhase::Step
            && matches!(
                session.plan,
                CachePlan::TeaCache {
                    shared_cfg_decision: true,
                    ..
                }
            ),
    })
}
