//! The timestep loop: for each step, every CFG branch runs Preprocess on a denoiser, the
//! policy decides from the modulated input whether the blocks run, then RunBlocks (or the
//! cached residual) and Postprocess; the branches' predictions are combined (true CFG) and a
//! flow-matching Euler step moves the latents. Branches run concurrently.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{D, DType as CDType, Device, Tensor};
use teaserve_proto::TensorMap;
use teaserve_proto::codec::{decode_tensor, encode_tensor};
use teaserve_proto::v1::{self, DType};

use crate::cache_config::CachePlan;
use crate::error::ControllerError;
use crate::policy::{Decision, Forced};
use crate::pool::{Client, DenoiserPool};
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
}

/// One branch's denoiser traffic within a step.
struct BranchCall {
    endpoint: String,
    client: Client,
}

fn denoiser_err(endpoint: &str, method: &'static str, s: tonic::Status) -> ControllerError {
    ControllerError::Denoiser {
        endpoint: endpoint.to_string(),
        method,
        code: s.code(),
        message: s.message().to_string(),
    }
}

fn decode_f32(t: &v1::Tensor, what: &str) -> Result<Tensor, ControllerError> {
    decode_tensor(t, &Device::Cpu, usize::MAX)
        .and_then(|x| Ok(x.to_dtype(CDType::F32)?))
        .map_err(|e| ControllerError::Internal(format!("denoiser returned a bad {what}: {e}")))
}

fn decode_streams(map: &TensorMap) -> Result<HashMap<String, Tensor>, ControllerError> {
    map.iter()
        .map(|(k, v)| Ok((k.clone(), decode_f32(v, k)?)))
        .collect()
}

fn missing(what: &str, method: &str) -> ControllerError {
    ControllerError::Internal(format!("denoiser {method} response lacks '{what}'"))
}

/// The decision a branch reports when caching is off.
fn always_compute() -> Decision {
    Decision {
        compute: true,
        forced: None,
        rel_l1: None,
        rescaled: None,
        accumulated: 0.0,
    }
}

/// Runs the session's next step; returns its event. `counts` accumulates denoiser calls.
/// A step is all or nothing: if any call fails, every branch's cache state is rolled back
/// and the session stays at the same step, so a retried `Step` decides exactly as before.
pub async fn run_step(
    session: &mut Session,
    pool: &DenoiserPool,
    counts: &mut CallCounts,
) -> Result<v1::StepEvent, ControllerError> {
    let snapshot: Vec<_> = session.branches.iter().map(|b| b.state.clone()).collect();
    let result = step_once(session, pool, counts).await;
    if result.is_err() {
        for (b, state) in session.branches.iter_mut().zip(snapshot) {
            b.state = state;
        }
    }
    result
}

async fn step_once(
    session: &mut Session,
    pool: &DenoiserPool,
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
    let wire = session.wire_dtype;
    let batch = session.latents.dim(0)?;
    let latents_wire = encode_tensor(&session.latents, wire)?;
    let timestep = encode_tensor(
        &Tensor::full(sigma as f32, batch, &Device::Cpu)?,
        DType::F32,
    )?;

    // 1. Preprocess every branch concurrently.
    let mut calls = Vec::with_capacity(session.branches.len());
    for _ in &session.branches {
        let (endpoint, client) = pool.client_for(&session.model_type).await?;
        calls.push(BranchCall { endpoint, client });
    }
    let pre =
        futures::future::try_join_all(session.branches.iter().zip(&calls).map(|(b, call)| {
            let mut inputs = b.inputs.clone();
            inputs.insert("hidden_states".into(), latents_wire.clone());
            inputs.insert("timestep".into(), timestep.clone());
            let mut client = call.client.clone();
            let endpoint = call.endpoint.clone();
            async move {
                client
                    .preprocess(v1::PreprocessRequest {
                        inputs,
                        wire_dtype: wire as i32,
                    })
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(|s| denoiser_err(&endpoint, "Preprocess", s))
            }
        }))
        .await?;
    counts.preprocess += pre.len() as u32;

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
        }
    }
    if let CachePlan::TeaCache {
        shared_cfg_decision: true,
        ..
    } = session.plan
        && decisions.iter().any(|d| d.compute)
    {
        for (b, d) in session.branches.iter_mut().zip(decisions.iter_mut()) {
            b.state.force_compute(d, Forced::SharedCfg);
        }
    }

    // 3. RunBlocks or reuse, then Postprocess, every branch concurrently.
    let mut reuse_hidden = Vec::with_capacity(pre.len());
    for ((b, d), streams) in session.branches.iter().zip(&decisions).zip(&streams_in) {
        let hidden = match (d.compute, streams) {
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
        reuse_hidden.push(hidden);
    }
    let results = futures::future::try_join_all(pre.iter().zip(&calls).zip(reuse_hidden).map(
        |((p, call), reused)| {
            let mut client = call.client.clone();
            let endpoint = call.endpoint.clone();
            let streams = p.streams.clone();
            let context = p.context.clone();
            async move {
                let (hidden, blocks_out) = match reused {
                    Some(h) => (h, None),
                    None => {
                        let out = client
                            .run_blocks(v1::RunBlocksRequest {
                                streams,
                                context: context.clone(),
                                wire_dtype: wire as i32,
                            })
                            .await
                            .map_err(|s| denoiser_err(&endpoint, "RunBlocks", s))?
                            .into_inner()
                            .streams;
                        let h = out
                            .get("hidden_states")
                            .cloned()
                            .ok_or_else(|| missing("hidden_states", "RunBlocks"))?;
                        (h, Some(out))
                    }
                };
                let sample = client
                    .postprocess(v1::PostprocessRequest {
                        hidden_states: Some(hidden),
                        context,
                        wire_dtype: wire as i32,
                    })
                    .await
                    .map_err(|s| denoiser_err(&endpoint, "Postprocess", s))?
                    .into_inner()
                    .sample
                    .ok_or_else(|| missing("sample", "Postprocess"))?;
                Ok::<_, ControllerError>((blocks_out, sample))
            }
        },
    ))
    .await?;

    // 4. Keep residuals of computed branches; combine predictions; Euler step.
    let mut preds = Vec::with_capacity(results.len());
    let mut branch_events = Vec::with_capacity(results.len());
    for (((b, d), streams), (blocks_out, sample)) in session
        .branches
        .iter_mut()
        .zip(&decisions)
        .zip(streams_in)
        .zip(results)
    {
        if let Some(out) = &blocks_out {
            counts.run_blocks += 1;
            if let Some(streams) = streams {
                b.state.store_residuals(&streams, &decode_streams(out)?)?;
            }
        }
        counts.postprocess += 1;
        preds.push(decode_f32(&sample, "sample")?);
        branch_events.push(v1::BranchDecision {
            branch: b.branch as i32,
            computed: d.compute,
            forced: d.forced.is_some(),
            rel_l1: d.rel_l1,
            rescaled: d.rescaled,
            accumulated: d.accumulated,
        });
    }
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
    for (b, d) in session.branches.iter_mut().zip(&decisions) {
        if d.compute {
            b.computed += 1;
        } else {
            b.reused += 1;
        }
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
    let ratio = (norm(&pos)? / (norm(&comb)? + 1e-12)?)?;
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
