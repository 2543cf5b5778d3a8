//! Resident mode of the step loop: the session's large tensors stay on the denoiser that
//! computed them (`ResidentStep`), and per step only the latents, the policy's signals and the
//! predictions travel. Caching off: one call per step (FUSED). TeaCache: a SIGNAL call (the
//! denoiser preprocesses every branch and returns each branch's relative L1 distance), the
//! policy decides here, then an ADVANCE call (blocks or the kept residual, then Postprocess).
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
            let resp = call
                .run(session, at, ResidentPhase::Fused, &decisions)
                .await?;
            (decisions, resp.samples)
        }
        plan @ (CachePlan::TeaCache { .. } | CachePlan::MagCache(_)) => {
            // SIGNAL preprocesses every branch on the denoiser (and, for TeaCache, measures
            // the indicator's change); MagCache decides from its ratios alone.
            let signals = call
                .run(session, at, ResidentPhase::Signal, &[])
                .await?
                .signals;
            let decisions = decide(session, &plan, at, &signals)?;
            let resp = call
                .run(session, at, ResidentPhase::Advance, &decisions)
                .await?;
            for (b, d) in session.branches.iter_mut().zip(&decisions) {
                if d.compute {
                    b.state.residual_kept_from(at.i);
                }
            }
            (decisions, resp.samples)
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

/// The policy's decisions from the denoiser's signals, exactly as the wire path decides from
/// the modulated inputs themselves.
fn decide(
    session: &mut Session,
    plan: &CachePlan,
    at: &StepAt,
    signals: &[v1::BranchSignal],
) -> Result<Vec<Decision>, ControllerError> {
    if signals.len() != session.branches.len() {
        return Err(ControllerError::Internal(format!(
            "ResidentStep returned {} signals for {} branches",
            signals.len(),
            session.branches.len()
        )));
    }
    let mut decisions = Vec::with_capacity(signals.len());
    for (b, s) in session.branches.iter_mut().zip(signals) {
        let shape: Vec<usize> = s
            .indicator_shape
            .iter()
            .map(|&d| d.max(0) as usize)
            .collect();
        let kept = b.state.resident_residual().is_some();
        let d = match plan {
            CachePlan::MagCache(params) => b.state.mag.decide(params, at.n, kept),
            CachePlan::TeaCache { params, .. } => {
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
        decisions: &[Decision],
    ) -> Result<v1::ResidentStepResponse, ControllerError> {
        let light = request(session, at, phase, decisions, false)?;
        match self.send(session, light).await {
            Err(ControllerError::ResidentMiss { endpoint, message }) => {
                tracing::info!(
                    endpoint = %endpoint,
                    phase = ?phase,
                    what = %message,
                    "resident miss: rebuilding on the denoiser"
                );
                self.rebuilt = true;
                let full = request(session, at, phase, decisions, true)?;
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
    decisions: &[Decision],
    rebuild: bool,
) -> Result<v1::ResidentStepRequest, ControllerError> {
    let batch = session.latents.dim(0)?;
    let r = &session.resident;
    let send_conditioning = rebuild || r.conditioned.is_none() || r.conditioned != r.endpoint;
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
        match phase {
            ResidentPhase::Signal => {
                // The policy state already moved past this step when it decided; the signal
                // compares with the step its previous indicator came from.
                let previous = b.state.previous_step().filter(|&p| p < at.i);
                rb.previous_step = previous.map(|p| p as u32);
                if rebuild && let Some(p) = previous {
                    rb.previous = Some(rebuild_inputs(session, p, batch)?);
                }
            }
            ResidentPhase::Advance => {
                let d = decisions.get(k).ok_or_else(|| {
                    ControllerError::Internal("a branch without a decision".into())
                })?;
                rb.compute = d.compute;
                if !d.compute {
                    let from = b.state.resident_residual().ok_or_else(|| {
                        ControllerError::Internal("reuse without a kept residual".into())
                    })?;
                    rb.residual_step = Some(from as u32);
                    if rebuild {
                        rb.residual = Some(rebuild_inputs(session, from, batch)?);
                    }
                }
            }
            _ => {}
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
    })
}
