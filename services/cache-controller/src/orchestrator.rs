//! The timestep loop: for each step, every CFG branch runs Preprocess on a denoiser, the
//! policy decides from the modulated input whether the blocks run, then RunBlocks (or the
//! cached residual) and Postprocess; the branches' predictions are combined (true CFG) and a
//! flow-matching Euler step moves the latents. Branches run concurrently.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{D, DType as CDType, Device, Tensor};
use teaserve_proto::TensorMap;
use teaserve_proto::batch::{pad_text_streams, split_map, stack_run_blocks, unpad_text_stream};
use teaserve_proto::codec::{decode_tensor, encode_tensor, map_bytes};
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

/// One RunBlocks request for several branches stacked along the batch dimension, with each
/// branch's batch size. Text streams of different lengths are zero-padded to the longest
/// with a key mask when the model's RunBlocks takes `encoder_hidden_states_mask` (Qwen-Image's
/// prompt and negative prompt). `None` when their tensors cannot be stacked: different stream
/// names or other trailing shapes, a context tensor without a leading batch dimension (per Describe) that
/// differs between branches, or a stacked batch over the denoiser's `max_batch`.
fn batch_request(
    pre: &[v1::PreprocessResponse],
    branches: &[usize],
    describe: &v1::DescribeResponse,
    wire: DType,
) -> Option<(v1::RunBlocksRequest, Vec<i64>)> {
    let reqs: Vec<v1::RunBlocksRequest> = branches
        .iter()
        .filter_map(|&k| pre.get(k))
        .map(|p| v1::RunBlocksRequest {
            streams: p.streams.clone(),
            context: p.context.clone(),
            wire_dtype: wire as i32,
            ..Default::default()
        })
        .collect();
    let batched = |name: &str| {
        describe
            .run_blocks
            .as_ref()
            .and_then(|s| s.inputs.iter().find(|t| t.name == name))
            .map(|t| t.dims.first().is_some_and(|d| d == "B"))
    };
    let refs: Vec<&v1::RunBlocksRequest> = reqs.iter().collect();
    let (req, sizes) = stack_run_blocks(&refs, &batched).or_else(|| {
        // Text of different lengths (a prompt and its negative prompt): padded, with a key
        // mask, where the model's RunBlocks takes one.
        batched(TEXT_MASK)?;
        let padded = pad_text_streams(&refs, TEXT, TEXT_MASK)?;
        stack_run_blocks(&padded.iter().collect::<Vec<_>>(), &batched)
    })?;
    (sizes.iter().sum::<i64>() <= i64::from(describe.max_batch)).then_some((req, sizes))
}

/// The text stream of dual-stream models (`[B, T, D]`).
const TEXT: &str = "encoder_hidden_states";
/// The text key mask a RunBlocks contract may take (`[B, T]`, 1 = valid).
const TEXT_MASK: &str = "encoder_hidden_states_mask";

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
        wire_step(session, pool, metrics, counts, &describe, &at).await?
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

/// The stateless wire path: Preprocess, decide on the returned indicator, RunBlocks or the
/// controller's cached residual, Postprocess; returns each branch's decision and prediction.
async fn wire_step(
    session: &mut Session,
    pool: &DenoiserPool,
    metrics: &ControllerMetrics,
    counts: &mut CallCounts,
    describe: &v1::DescribeResponse,
    at: &StepAt,
) -> Result<(Vec<Decision>, Vec<Tensor>), ControllerError> {
    let (i, n, wire) = (at.i, at.n, session.wire_dtype);
    let (latents_wire, timestep) = (&at.latents, &at.timestep);
    let model_type = session.model_type.as_str();
    let traffic = Traffic::new(metrics);
    let traffic = &traffic;
    // 1. Preprocess every branch concurrently (each call balanced and retried by the pool).
    let pre = futures::future::try_join_all(session.branches.iter().map(|b| {
        let mut inputs = b.inputs.clone();
        inputs.insert("hidden_states".into(), latents_wire.clone());
        inputs.insert("timestep".into(), timestep.clone());
        traffic.add("to_denoiser", map_bytes(&inputs));
        let req = v1::PreprocessRequest {
            inputs,
            wire_dtype: wire as i32,
        };
        async move {
            pool.call(
                model_type,
                "Preprocess",
                branch_name(b.branch),
                req,
                |mut c, r| async move { c.preprocess(r).await },
            )
            .await
            .map(|called| called.response)
        }
    }))
    .await?;
    counts.preprocess += pre.len() as u32;
    for p in &pre {
        let indicator = p
            .modulated_input
            .as_ref()
            .map_or(0, |t| t.data.len() as u64);
        traffic.add(
            "from_denoiser",
            map_bytes(&p.streams) + map_bytes(&p.context) + indicator,
        );
    }

    if let CachePlan::FirstBlockCache(params) = &session.plan {
        crate::first_block_step::check_model(describe)?;
        let params = params.clone();
        let (mut decisions, preds) =
            crate::first_block_step::step(session, pool, counts, &pre, &params, traffic).await?;
        share_and_trace(&session.plan, &mut session.branches, &mut decisions);
        record_path(traffic, metrics);
        return Ok((decisions, preds));
    }
    if let CachePlan::TaylorSeer(params) = &session.plan {
        let params = params.clone();
        let (mut decisions, preds) =
            crate::taylor_step::step(session, pool, counts, &pre, &params, traffic).await?;
        share_and_trace(&session.plan, &mut session.branches, &mut decisions);
        record_path(traffic, metrics);
        return Ok((decisions, preds));
    }

    // 2. Decide per branch (pure policy), then apply the shared-CFG extension.
    let mut decisions = Vec::with_capacity(pre.len());
    let mut streams_in: Vec<Option<HashMap<String, Tensor>>> = Vec::with_capacity(pre.len());
    for (b, p) in session.branches.iter_mut().zip(&pre) {
        match &session.plan {
            CachePlan::None => {
                decisions.push(always_compute());
                streams_in.push(None);
            }
            CachePlan::TeaCache { params, .. } => {
                let m = p
                    .modulated_input
                    .as_ref()
                    .ok_or_else(|| missing("modulated_input", "Preprocess"))?;
                let m = decode_f32(m, "modulated_input")?;
                let shape = m.dims().to_vec();
                let values: Vec<f32> = m.flatten_all()?.to_vec1()?;
                let streams = decode_streams(&p.streams)?;
                let mut d = b.state.decide(params, i, n, &shape, &values);
                if !d.compute && !b.state.has_residuals_for(&streams) {
                    // Cannot reuse what was never cached (e.g. the streams changed shape).
                    b.state.force_compute(&mut d, Forced::ShapeChanged);
                }
                decisions.push(d);
                streams_in.push(Some(streams));
            }
            CachePlan::MagCache(params) => {
                let streams = decode_streams(&p.streams)?;
                let kept = b.state.has_residuals_for(&streams);
                decisions.push(b.state.mag.decide(params, n, kept));
                streams_in.push(Some(streams));
            }
            CachePlan::FirstBlockCache(_) | CachePlan::TaylorSeer(_) => {
                return Err(ControllerError::Internal(format!(
                    "{} runs its own step",
                    session.plan.adapter()
                )));
            }
        }
    }
    share_and_trace(&session.plan, &mut session.branches, &mut decisions);

    // 3. RunBlocks for the branches that compute (one batched call when allowed), the cached
    //    residual for the others, then Postprocess every branch concurrently.
    let mut hidden: Vec<Option<v1::Tensor>> = Vec::with_capacity(pre.len());
    for ((b, d), streams) in session.branches.iter().zip(&decisions).zip(&streams_in) {
        let reused = match (d.compute, streams) {
            (false, Some(streams)) => {
                let out = b
                    .state
                    .apply_residuals(streams)
                    .map_err(ControllerError::Internal)?;
                let h = out
                    .get("hidden_states")
                    .ok_or_else(|| missing("hidden_states", "Preprocess"))?;
                Some(encode_tensor(h, wire)?)
            }
            _ => None,
        };
        hidden.push(reused);
    }
    let computing: Vec<usize> = (0..decisions.len())
        .filter(|&k| decisions[k].compute)
        .collect();
    let mut blocks_out: Vec<Option<TensorMap>> = vec![None; pre.len()];
    let batched = match (session.batch_branches, computing.as_slice()) {
        (true, [_, _, ..]) => batch_request(&pre, &computing, describe, wire),
        _ => None,
    };
    let names_of = |ks: &[usize]| -> String {
        ks.iter()
            .filter_map(|&k| session.branches.get(k).map(|b| branch_name(b.branch)))
            .collect::<Vec<_>>()
            .join(",")
    };
    let run_blocks = |req: v1::RunBlocksRequest, branches: String| async move {
        traffic.add(
            "to_denoiser",
            map_bytes(&req.streams) + map_bytes(&req.context),
        );
        let out = pool
            .call(
                model_type,
                "RunBlocks",
                &branches,
                req,
                |mut c, r| async move { c.run_blocks(r).await },
            )
            .await?
            .response
            .streams;
        traffic.add("from_denoiser", map_bytes(&out));
        Ok::<_, ControllerError>(out)
    };
    if let Some((req, sizes)) = batched {
        let out = run_blocks(req, names_of(&computing)).await?;
        counts.run_blocks += 1;
        for (&k, mut map) in computing.iter().zip(split_map(&out, &sizes)?) {
            // A text stream padded for the batch goes back to the branch's own length.
            if let Some(len) = pre[k].streams.get(TEXT).and_then(|t| t.shape.get(1)) {
                unpad_text_stream(&mut map, TEXT, *len)?;
            }
            blocks_out[k] = Some(map);
        }
    } else {
        let outs = futures::future::try_join_all(computing.iter().map(|&k| {
            let req = v1::RunBlocksRequest {
                streams: pre[k].streams.clone(),
                context: pre[k].context.clone(),
                wire_dtype: wire as i32,
                ..Default::default()
            };
            run_blocks(req, names_of(&[k]))
        }))
        .await?;
        counts.run_blocks += outs.len() as u32;
        for (&k, out) in computing.iter().zip(outs) {
            blocks_out[k] = Some(out);
        }
    }
    for (h, out) in hidden.iter_mut().zip(&blocks_out) {
        if let Some(out) = out {
            *h = Some(
                out.get("hidden_states")
                    .cloned()
                    .ok_or_else(|| missing("hidden_states", "RunBlocks"))?,
            );
        }
    }
    let samples = futures::future::try_join_all(pre.iter().zip(hidden).zip(&session.branches).map(
        |((p, h), b)| {
            traffic.add("to_denoiser", h.as_ref().map_or(0, |t| t.data.len() as u64));
            let req = v1::PostprocessRequest {
                hidden_states: h,
                context: p.context.clone(),
                wire_dtype: wire as i32,
            };
            async move {
                pool.call(
                    model_type,
                    "Postprocess",
                    branch_name(b.branch),
                    req,
                    |mut c, r| async move { c.postprocess(r).await },
                )
                .await?
                .response
                .sample
                .ok_or_else(|| missing("sample", "Postprocess"))
            }
        },
    ))
    .await?;
    counts.postprocess += samples.len() as u32;
    for (p, sample) in pre.iter().zip(&samples) {
        traffic.add("to_denoiser", map_bytes(&p.context));
        traffic.add("from_denoiser", sample.data.len() as u64);
    }

    // 4. Keep residuals of computed branches; combine predictions; Euler step.
    let mut preds = Vec::with_capacity(samples.len());
    for (((b, streams), out), sample) in session
        .branches
        .iter_mut()
        .zip(streams_in)
        .zip(&blocks_out)
        .zip(samples)
    {
        if let (Some(out), Some(streams)) = (out, streams) {
            b.state.store_residuals(&streams, &decode_streams(out)?)?;
        }
        preds.push(decode_f32(&sample, "sample")?);
    }
    if session.calibration.is_some() {
        let values = |t: &Tensor| -> Result<Vec<f32>, ControllerError> {
            Ok(t.flatten_all()?.to_vec1::<f32>()?)
        };
        let p = pre
            .first()
            .ok_or_else(|| missing("modulated_input", "Preprocess"))?;
        let modulated = decode_f32(
            p.modulated_input
                .as_ref()
                .ok_or_else(|| missing("modulated_input", "Preprocess"))?,
            "modulated_input",
        )?;
        let hidden_in = decode_f32(
            p.streams
                .get("hidden_states")
                .ok_or_else(|| missing("hidden_states", "Preprocess"))?,
            "hidden_states",
        )?;
        let hidden_out = blocks_out
            .first()
            .and_then(|o| o.as_ref())
            .and_then(|o| o.get("hidden_states"))
            .ok_or_else(|| missing("hidden_states", "RunBlocks"))?;
        let residual = (decode_f32(hidden_out, "hidden_states")? - hidden_in)?;
        let output = preds
            .first()
            .ok_or_else(|| missing("sample", "Postprocess"))?;
        let channels = residual.dims().last().copied().unwrap_or(1);
        let record = (
            values(&modulated)?,
            (values(&residual)?, channels),
            values(output)?,
        );
        if let Some(trace) = session.calibration.as_mut() {
            trace.record(i as u32, record.0, record.1, record.2);
        }
    }
    record_path(traffic, metrics);
    Ok((decisions, preds))
}

/// Records a wire step's path and bytes on its span and in the metrics.
fn record_path(traffic: &Traffic<'_>, metrics: &ControllerMetrics) {
    let span = tracing::Span::current();
    span.record("path", "wire");
    span.record("bytes", traffic.total() as i64);
    metrics.path("wire");
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
