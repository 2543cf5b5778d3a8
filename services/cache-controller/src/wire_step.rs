//! The stateless wire step: every tensor travels with every call. Per step: Preprocess every
//! branch; then the policy's own path (FirstBlockCache, TaylorSeer) or the residual path
//! (no caching, TeaCache, MagCache): decide per branch, RunBlocks for the computing branches
//! (one batched call when allowed) or the kept residual for the others, Postprocess, keep the
//! new residuals (and the calibration trace).

use std::collections::HashMap;

use candle_core::Tensor;
use teaserve_proto::TensorMap;
use teaserve_proto::batch::{pad_text_streams, split_map, stack_run_blocks, unpad_text_stream};
use teaserve_proto::codec::{encode_tensor, map_bytes};
use teaserve_proto::v1::{self, DType};

use crate::cache_config::CachePlan;
use crate::error::ControllerError;
use crate::metrics::ControllerMetrics;
use crate::orchestrator::{
    CallCounts, StepAt, Traffic, always_compute, branch_name, decode_f32, decode_streams, missing,
    share_and_trace,
};
use crate::policy::{Decision, Forced};
use crate::pool::DenoiserPool;
use crate::session::Session;

/// The wire path of one step; returns each branch's decision and prediction.
pub(crate) async fn step(
    session: &mut Session,
    pool: &DenoiserPool,
    metrics: &ControllerMetrics,
    counts: &mut CallCounts,
    describe: &v1::DescribeResponse,
    at: &StepAt,
) -> Result<(Vec<Decision>, Vec<Tensor>), ControllerError> {
    let traffic = Traffic::new(metrics);
    let pre = preprocess_all(session, pool, at, &traffic).await?;
    counts.preprocess += pre.len() as u32;
    let (decisions, preds) = match session.plan.clone() {
        CachePlan::FirstBlockCache(params) => {
            crate::branch_calls::check_model("first_block_cache", describe, pool)?;
            let (mut decisions, preds) =
                crate::first_block_step::step(session, pool, counts, &pre, &params, &traffic)
                    .await?;
            share_and_trace(&session.plan, &mut session.branches, &mut decisions);
            (decisions, preds)
        }
        CachePlan::TaylorSeer(params) => {
            crate::branch_calls::check_model("taylor_seer", describe, pool)?;
            let (mut decisions, preds) =
                crate::taylor_step::step(session, pool, counts, &pre, &params, &traffic).await?;
            share_and_trace(&session.plan, &mut session.branches, &mut decisions);
            (decisions, preds)
        }
        _ => {
            let calls = Calls {
                pool,
                model_type: session.model_type.clone(),
                wire: session.wire_dtype,
                traffic: &traffic,
            };
            residual_step(session, &calls, counts, describe, at, &pre).await?
        }
    };
    let span = tracing::Span::current();
    span.record("path", "wire");
    span.record("bytes", traffic.total() as i64);
    metrics.path("wire");
    Ok((decisions, preds))
}

/// Where this step's calls go, and their byte count.
struct Calls<'a> {
    pool: &'a DenoiserPool,
    model_type: String,
    wire: DType,
    traffic: &'a Traffic<'a>,
}

/// Preprocess of every branch, concurrently (each call balanced and retried by the pool).
async fn preprocess_all(
    session: &Session,
    pool: &DenoiserPool,
    at: &StepAt,
    traffic: &Traffic<'_>,
) -> Result<Vec<v1::PreprocessResponse>, ControllerError> {
    let (wire, model_type) = (session.wire_dtype, session.model_type.as_str());
    let pre = futures::future::try_join_all(session.branches.iter().map(|b| {
        let mut inputs = b.inputs.clone();
        inputs.insert("hidden_states".into(), at.latents.clone());
        inputs.insert("timestep".into(), at.timestep.clone());
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
    Ok(pre)
}

/// The residual policies' step: decide, blocks or kept residual, Postprocess, keep.
async fn residual_step(
    session: &mut Session,
    calls: &Calls<'_>,
    counts: &mut CallCounts,
    describe: &v1::DescribeResponse,
    at: &StepAt,
    pre: &[v1::PreprocessResponse],
) -> Result<(Vec<Decision>, Vec<Tensor>), ControllerError> {
    let (mut decisions, streams_in) = decide_all(session, pre, at)?;
    share_and_trace(&session.plan, &mut session.branches, &mut decisions);
    let mut hidden = reused_hidden(session, &decisions, &streams_in, calls.wire)?;
    let blocks_out = run_computing(session, calls, counts, describe, pre, &decisions).await?;
    for (h, out) in hidden.iter_mut().zip(&blocks_out) {
        if let Some(out) = out {
            *h = Some(
                out.get("hidden_states")
                    .cloned()
                    .ok_or_else(|| missing("hidden_states", "RunBlocks"))?,
            );
        }
    }
    let samples = postprocess_all(session, calls, pre, hidden).await?;
    counts.postprocess += samples.len() as u32;
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
        record_calibration(session, at.i, pre, &blocks_out, &preds)?;
    }
    Ok((decisions, preds))
}

/// Every branch's decision (pure policy), with its decoded input streams where the policy
/// keeps residuals.
#[allow(clippy::type_complexity)]
fn decide_all(
    session: &mut Session,
    pre: &[v1::PreprocessResponse],
    at: &StepAt,
) -> Result<(Vec<Decision>, Vec<Option<HashMap<String, Tensor>>>), ControllerError> {
    let (i, n) = (at.i, at.n);
    let mut decisions = Vec::with_capacity(pre.len());
    let mut streams_in = Vec::with_capacity(pre.len());
    for (b, p) in session.branches.iter_mut().zip(pre) {
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
    Ok((decisions, streams_in))
}

/// The image stream of every reusing branch: its input plus the kept residual.
fn reused_hidden(
    session: &Session,
    decisions: &[Decision],
    streams_in: &[Option<HashMap<String, Tensor>>],
    wire: DType,
) -> Result<Vec<Option<v1::Tensor>>, ControllerError> {
    let mut hidden = Vec::with_capacity(decisions.len());
    for ((b, d), streams) in session.branches.iter().zip(decisions).zip(streams_in) {
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
    Ok(hidden)
}

/// RunBlocks for the computing branches: one batched call when allowed, else one each,
/// concurrently. Returns each branch's output streams (None for reusing branches).
async fn run_computing(
    session: &Session,
    calls: &Calls<'_>,
    counts: &mut CallCounts,
    describe: &v1::DescribeResponse,
    pre: &[v1::PreprocessResponse],
    decisions: &[Decision],
) -> Result<Vec<Option<TensorMap>>, ControllerError> {
    let computing: Vec<usize> = (0..decisions.len())
        .filter(|&k| decisions[k].compute)
        .collect();
    let mut blocks_out: Vec<Option<TensorMap>> = vec![None; pre.len()];
    let batched = match (session.batch_branches, computing.as_slice()) {
        (true, [_, _, ..]) => batch_request(pre, &computing, describe, calls.wire),
        _ => None,
    };
    let names_of = |ks: &[usize]| -> String {
        ks.iter()
            .filter_map(|&k| session.branches.get(k).map(|b| branch_name(b.branch)))
            .collect::<Vec<_>>()
            .join(",")
    };
    let run_blocks = |req: v1::RunBlocksRequest, branches: String| async move {
        calls.traffic.add(
            "to_denoiser",
            map_bytes(&req.streams) + map_bytes(&req.context),
        );
        let out = calls
            .pool
            .call(
                &calls.model_type,
                "RunBlocks",
                &branches,
                req,
                |mut c, r| async move { c.run_blocks(r).await },
            )
            .await?
            .response
            .streams;
        calls.traffic.add("from_denoiser", map_bytes(&out));
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
                wire_dtype: calls.wire as i32,
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
    Ok(blocks_out)
}

/// Postprocess of every branch's image stream, concurrently.
async fn postprocess_all(
    session: &Session,
    calls: &Calls<'_>,
    pre: &[v1::PreprocessResponse],
    hidden: Vec<Option<v1::Tensor>>,
) -> Result<Vec<v1::Tensor>, ControllerError> {
    let samples = futures::future::try_join_all(pre.iter().zip(hidden).zip(&session.branches).map(
        |((p, h), b)| {
            calls
                .traffic
                .add("to_denoiser", h.as_ref().map_or(0, |t| t.data.len() as u64));
            let req = v1::PostprocessRequest {
                hidden_states: h,
                context: p.context.clone(),
                wire_dtype: calls.wire as i32,
            };
            async move {
                calls
                    .pool
                    .call(
                        &calls.model_type,
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
    for (p, sample) in pre.iter().zip(&samples) {
        calls.traffic.add("to_denoiser", map_bytes(&p.context));
        calls.traffic.add("from_denoiser", sample.data.len() as u64);
    }
    Ok(samples)
}

/// Calibration: the POSITIVE branch's modulated input, blocks' residual and output.
fn record_calibration(
    session: &mut Session,
    i: usize,
    pre: &[v1::PreprocessResponse],
    blocks_out: &[Option<TensorMap>],
    preds: &[Tensor],
) -> Result<(), ControllerError> {
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
    Ok(())
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
