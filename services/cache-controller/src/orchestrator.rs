//! The timestep loop, one step at a time: the step's latents and timestep, then the tensors'
//! path (resident: [`crate::resident`], wire: [`crate::wire_step`]) where every CFG branch
//! gets its policy's decision and its prediction, then [`finish_step`]: the branches combined
//! (true CFG), a flow-matching Euler step, the counts and the event. A failed step rolls every
//! branch's policy state back.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{D, DType as CDType, Device, Tensor};
use teaserve_proto::TensorMap;
use teaserve_proto::codec::{decode_tensor, encode_tensor};
use teaserve_proto::v1::{self, Branch, DType};
use tracing::Instrument as _;

use crate::cache_config::CachePlan;
use crate::error::ControllerError;
use crate::metrics::ControllerMetrics;
use crate::policy::{Decision, Forced};
use crate::pool::DenoiserPool;
use crate::session::Session;

/// Counts of denoiser calls, for callers that want to observe the split.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CallCounts {
    /// Preprocess calls.
    pub preprocess: u32,
    /// RunBlocks calls.
    pub run_blocks: u32,
    /// Postprocess calls.
    pub postprocess: u32,
    /// ResidentStep calls (resident mode), rebuilds included.
    pub resident_steps: u32,
}

pub(crate) fn decode_f32(t: &v1::Tensor, what: &str) -> Result<Tensor, ControllerError> {
    decode_tensor(t, &Device::Cpu, usize::MAX)
        .and_then(|x| Ok(x.to_dtype(CDType::F32)?))
        .map_err(|e| ControllerError::Internal(format!("denoiser returned a bad {what}: {e}")))
}

pub(crate) fn decode_streams(map: &TensorMap) -> Result<HashMap<String, Tensor>, ControllerError> {
    map.iter()
        .map(|(k, v)| Ok((k.clone(), decode_f32(v, k)?)))
        .collect()
}

pub(crate) fn missing(what: &str, method: &str) -> ControllerError {
    ControllerError::Internal(format!("denoiser {method} response lacks '{what}'"))
}

/// The decision a branch reports when caching is off.
pub(crate) fn always_compute() -> Decision {
    Decision {
        compute: true,
        ..Decision::default()
    }
}

/// Runs the session's next step; returns its event. `counts` accumulates denoiser calls.
/// A step is all or nothing: if any call fails, every branch's cache state is rolled back
/// and the session stays at the same step, so a retried `Step` decides exactly as before.
pub async fn run_step(
    session: &mut Session,
    pool: &DenoiserPool,
    metrics: &ControllerMetrics,
    counts: &mut CallCounts,
) -> Result<v1::StepEvent, ControllerError> {
    let snapshot: Vec<_> = session.branches.iter().map(|b| b.state.clone()).collect();
    let span = tracing::info_span!(
        "step",
        // i64: OpenTelemetry has no unsigned integers (u64 would be exported as a string).
        step = session.step as i64,
        sigma = session.sigmas.get(session.step).copied().unwrap_or(f64::NAN),
        session_id = %session.id,
        // How the tensors travelled: wire, resident, or rebuild (a miss, then recomputed).
        path = tracing::field::Empty,
        // Tensor payload bytes to and from denoisers in this step.
        bytes = tracing::field::Empty,
    );
    let mut result = step_once(session, pool, metrics, counts)
        .instrument(span.clone())
        .await;
    if let Err(e) = &result
        && session.resident.on
        && crate::resident::unsupported(e)
    {
        // A replica without resident mode (an older version joining during a rolling
        // update): this session finishes in wire mode, from this very step.
        tracing::warn!(
            session_id = %session.id,
            error = %e,
            "a denoiser does not keep resident tensors; the session continues in wire mode"
        );
        for (b, state) in session.branches.iter_mut().zip(&snapshot) {
            b.state = state.clone();
        }
        session.resident.on = false;
        result = step_once(session, pool, metrics, counts)
            .instrument(span)
            .await;
    }
    if result.is_err() {
        for (b, state) in session.branches.iter_mut().zip(snapshot) {
            b.state = state;
        }
    }
    result
}

/// A client span for one denoiser call, named `Denoiser/<method>`; the call's `traceparent`
/// points at it, so the denoiser's server span is its child.
/// Applies the shared-CFG extension (both branches compute when either needs to) and records
/// every branch's decision as a span; both step paths finish their decisions with it.
pub(crate) fn share_and_trace(
    plan: &CachePlan,
    branches: &mut [crate::session::BranchRun],
    decisions: &mut [Decision],
) {
    if let CachePlan::TeaCache {
        shared_cfg_decision: true,
        ..
    } = plan
        && decisions.iter().any(|d| d.compute)
    {
        for (b, d) in branches.iter_mut().zip(decisions.iter_mut()) {
            b.state.force_compute(d, Forced::SharedCfg);
        }
    }
    let threshold = plan.threshold();
    for (b, d) in branches.iter().zip(decisions.iter()) {
        match plan {
            CachePlan::TeaCache { .. } | CachePlan::None => decide_span(b.branch, d, threshold),
            _ => policy_span(plan.adapter(), b.branch, d, threshold),
        }
    }
}

/// Records one branch's decision by a policy other than TeaCache as a `cache.decide` span:
/// the policy, the decision and the numbers it decided from.
fn policy_span(policy: &'static str, branch: Branch, d: &Decision, threshold: f64) {
    let numbers = d
        .numbers
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ");
    let span = tracing::info_span!(
        "cache.decide",
        policy,
        branch = branch_name(branch),
        decision = if d.compute { "compute" } else { "reuse" },
        forced = d.forced.is_some(),
        forced_reason = tracing::field::Empty,
        accumulated = d.accumulated,
        threshold,
        numbers,
    );
    if let Some(f) = d.forced {
        span.record("forced_reason", tracing::field::debug(f));
    }
}

/// Records one branch's decision as a `teacache.decide` span under the current step.
fn decide_span(branch: Branch, d: &Decision, threshold: f64) {
    let span = tracing::info_span!(
        "teacache.decide",
        branch = branch_name(branch),
        decision = if d.compute { "compute" } else { "reuse" },
        forced = d.forced.is_some(),
        forced_reason = tracing::field::Empty,
        rel_l1 = tracing::field::Empty,
        rescaled = tracing::field::Empty,
        accumulated = d.accumulated,
        threshold,
    );
    if let Some(f) = d.forced {
        span.record("forced_reason", tracing::field::debug(f));
    }
    if let Some(r) = d.rel_l1 {
        span.record("rel_l1", r);
    }
    if let Some(r) = d.rescaled {
        span.record("rescaled", r);
    }
}

/// `positive` / `negative`, as spans and metrics label branches.
pub fn branch_name(b: Branch) -> &'static str {
    match b {
        Branch::Positive => "positive",
        Branch::Negative => "negative",
        Branch::Unspecified => "unspecified",
    }
}

async fn step_once(
    session: &mut Session,
    pool: &DenoiserPool,
    metrics: &ControllerMetrics,
    counts: &mut CallCounts,
) -> Result<v1::StepEvent, ControllerError> {
    let started = Instant::now();
    if session.finished() {
        return Err(ControllerError::FailedPrecondition(format!(
            "session '{}' has run all {} steps; ResetSession with restart to run again",
            session.id,
            session.num_steps()
        )));
    }
    let i = session.step;
    let n = session.num_steps();
    let (sigma, sigma_next) = match (session.sigmas.get(i), session.sigmas.get(i + 1)) {
        (Some(a), Some(b)) => (*a, *b),
        _ => return Err(ControllerError::Internal("sigma schedule too short".into())),
    };
    let model_type = session.model_type.clone();
    let describe = pool.describe_for(&model_type).await?;
    if !session.wire_dtype_given
        && let Ok(d @ (DType::Bf16 | DType::F16)) = DType::try_from(describe.dtype)
    {
        // Unset: the model's own half-precision dtype, since it computes in it anyway.
        session.wire_dtype = d;
    }
    let wire = session.wire_dtype;
    let batch = session.latents.dim(0)?;
    let latents_wire = encode_tensor(&session.latents, wire)?;
    let timestep = encode_tensor(
        &Tensor::full(
            crate::schedule::transformer_timestep(sigma),
            batch,
            &Device::Cpu,
        )?,
        DType::F32,
    )?;

    let at = StepAt {
        i,
        n,
        latents: latents_wire,
        timestep,
    };
    let (decisions, preds) = if crate::resident::applies(session, &describe, pool) {
        crate::resident::step(session, pool, metrics, counts, &at).await?
    } else {
        crate::wire_step::step(session, pool, metrics, counts, &describe, &at).await?
    };
    finish_step(
        session,
        metrics,
        &decisions,
        preds,
        (sigma, sigma_next),
        i,
        started,
    )
}

/// Tensor bytes moved with the denoisers in one step, also counted in the metrics.
pub(crate) struct Traffic<'a> {
    metrics: &'a ControllerMetrics,
    bytes: std::sync::atomic::AtomicU64,
}

impl<'a> Traffic<'a> {
    /// Counts into `metrics`.
    pub fn new(metrics: &'a ControllerMetrics) -> Self {
        Self {
            metrics,
            bytes: Default::default(),
        }
    }

    /// `bytes` moved `to_denoiser` or `from_denoiser`.
    pub fn add(&self, direction: &'static str, bytes: u64) {
        self.metrics.tensors(direction, bytes);
        self.bytes
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Bytes moved so far.
    pub fn total(&self) -> u64 {
        self.bytes.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Where a step stands: its index of `n`, its sigma, and the latents and timestep as they
/// travel.
pub(crate) struct StepAt {
    /// Step index.
    pub i: usize,
    /// Number of steps.
    pub n: usize,
    /// The latents in the session's wire dtype.
    pub latents: v1::Tensor,
    /// The transformer's timestep for every sample (F32).
    pub timestep: v1::Tensor,
}

/// Combines the branches' predictions (true CFG), moves the latents one Euler step, counts
/// the decisions, and returns the step's event.
fn finish_step(
    session: &mut Session,
    metrics: &ControllerMetrics,
    decisions: &[Decision],
    preds: Vec<Tensor>,
    (sigma, sigma_next): (f64, f64),
    i: usize,
    started: Instant,
) -> Result<v1::StepEvent, ControllerError> {
    let policy = session.plan.adapter();
    let branch_events = session
        .branches
        .iter()
        .zip(decisions)
        .map(|(b, d)| v1::BranchDecision {
            branch: b.branch as i32,
            computed: d.compute,
            forced: d.forced.is_some(),
            rel_l1: d.rel_l1,
            rescaled: d.rescaled,
            accumulated: d.accumulated,
            policy: policy.to_string(),
            numbers: d.numbers.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        })
        .collect();
    let pred = combine(session, preds)?;
    if pred.dims() != session.latents.dims() {
        return Err(ControllerError::InvalidArgument(format!(
            "the model's output has shape {:?} but the latents have {:?}; the model's out \
             channels must equal its in channels",
            pred.dims(),
            session.latents.dims()
        )));
    }
    session.latents = (&session.latents + (pred * (sigma_next - sigma))?)?;
    session.step += 1;
    // Counted only now: a failed step leaves the counts as they were.
    for (b, d) in session.branches.iter_mut().zip(decisions) {
        if d.compute {
            b.computed += 1;
        } else {
            b.reused += 1;
        }
        metrics.step(&session.model_type, branch_name(b.branch), d.compute);
    }
    Ok(v1::StepEvent {
        step: i as u32,
        sigma,
        branches: branch_events,
        elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
    })
}

/// `pos` alone, or true CFG `neg + scale * (pos - neg)`, optionally rescaled to `|pos|` along
/// the channel axis (Qwen-Image's renorm).
fn combine(session: &Session, mut preds: Vec<Tensor>) -> Result<Tensor, ControllerError> {
    let pos = preds
        .first()
        .cloned()
        .ok_or_else(|| ControllerError::Internal("no branch prediction".into()))?;
    let Some(neg) = preds.drain(..).nth(1) else {
        return Ok(pos);
    };
    let comb = (&neg + ((&pos - &neg)? * session.true_cfg_scale)?)?;
    if !session.cfg_renorm {
        return Ok(comb);
    }
    let norm =
        |t: &Tensor| -> candle_core::Result<Tensor> { t.sqr()?.sum_keepdim(D::Minus1)?.sqrt() };
    let ratio = (norm(&pos)? / norm(&comb)?)?;
    Ok(comb.broadcast_mul(&ratio)?)
}

/// The final result of a finished session.
pub fn result(session: &Session, wall_ms: f64) -> Result<v1::GenerateResult, ControllerError> {
    let (computed, reused) = session.counts();
    Ok(v1::GenerateResult {
        latents: Some(encode_tensor(&session.latents, DType::F32)?),
        image_png: Default::default(),
        computed_steps: computed,
        reused_steps: reused,
        wall_ms,
        session_id: session.id.clone(),
        trace_id: String::new(),
    })
}
