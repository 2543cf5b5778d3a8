//! One step under FirstBlockCache (wire mode): per branch, Preprocess's streams go through the
//! first block alone (RunBlocks 0..1); the policy compares the head's output residual with the
//! last computed one; the remaining blocks run (RunBlocks 1..) or the kept tail residual is
//! added to the head's output; then Postprocess. diffusers' `FirstBlockCacheConfig` hooks do
//! exactly this inside the transformer.

use candle_core::Tensor;
use teaserve_proto::TensorMap;
use teaserve_proto::codec::encode_tensor;
use teaserve_proto::v1::{self, DType};

use crate::branch_calls::{postprocess, run_blocks};
use crate::error::ControllerError;
use crate::orchestrator::{CallCounts, Traffic, decode_f32, decode_streams, missing};
use crate::policy::{Decision, FirstBlockParams};
use crate::pool::DenoiserPool;
use crate::session::{BranchRun, Session};

/// The image stream.
const IMAGE: &str = "hidden_states";

/// Runs every branch of the step; returns each branch's decision and prediction.
pub(crate) async fn step(
    session: &mut Session,
    pool: &DenoiserPool,
    counts: &mut CallCounts,
    pre: &[v1::PreprocessResponse],
    params: &FirstBlockParams,
    traffic: &Traffic<'_>,
) -> Result<(Vec<Decision>, Vec<Tensor>), ControllerError> {
    let wire = session.wire_dtype;
    let model_type = session.model_type.clone();
    let mut decisions = Vec::with_capacity(pre.len());
    let mut preds = Vec::with_capacity(pre.len());
    for (b, p) in session.branches.iter_mut().zip(pre) {
        let (d, sample) =
            branch_step(b, p, params, pool, &model_type, wire, counts, traffic).await?;
        decisions.push(d);
        preds.push(sample);
    }
    Ok((decisions, preds))
}

#[allow(clippy::too_many_arguments)]
async fn branch_step(
    b: &mut BranchRun,
    p: &v1::PreprocessResponse,
    params: &FirstBlockParams,
    pool: &DenoiserPool,
    model_type: &str,
    wire: DType,
    counts: &mut CallCounts,
    traffic: &Traffic<'_>,
) -> Result<(Decision, Tensor), ControllerError> {
    let head = run_blocks(
        pool,
        model_type,
        b.branch,
        range_request(p.streams.clone(), p, wire, (0, Some(1))),
        traffic,
    )
    .await?
    .streams;
    counts.run_blocks += 1;
    let head_in = decode_f32(
        p.streams
            .get(IMAGE)
            .ok_or_else(|| missing(IMAGE, "Preprocess"))?,
        IMAGE,
    )?;
    let head_out = sorted(decode_streams(&head)?);
    let head_img = stream(&head_out, IMAGE)?;
    let residual = (head_img - &head_in)?;
    let d = b.state.first_block.decide(params, &residual)?;
    let hidden = if d.compute {
        let tail = run_blocks(
            pool,
            model_type,
            b.branch,
            range_request(head, p, wire, (1, None)),
            traffic,
        )
        .await?
        .streams;
        counts.run_blocks += 1;
        let tail_out = sorted(decode_streams(&tail)?);
        b.state.first_block.store(residual, &head_out, &tail_out)?;
        tail.get(IMAGE)
            .cloned()
            .ok_or_else(|| missing(IMAGE, "RunBlocks"))?
    } else {
        let out =
            b.state.first_block.reuse(IMAGE, head_img)?.ok_or_else(|| {
                ControllerError::Internal("no kept tail residual to reuse".into())
            })?;
        encode_tensor(&out, wire)?
    };
    let sample = postprocess(pool, model_type, b.branch, hidden, p, wire, traffic).await?;
    counts.postprocess += 1;
    Ok((d, decode_f32(&sample, "sample")?))
}

/// RunBlocks over `streams` for the blocks `first..end` (`None`: to the last).
fn range_request(
    streams: TensorMap,
    p: &v1::PreprocessResponse,
    wire: DType,
    (first, end): (u32, Option<u32>),
) -> v1::RunBlocksRequest {
    v1::RunBlocksRequest {
        streams,
        context: p.context.clone(),
        wire_dtype: wire as i32,
        first_block: Some(first),
        end_block: end,
        ..Default::default()
    }
}

fn sorted(map: std::collections::HashMap<String, Tensor>) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = map.into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn stream<'a>(streams: &'a [(String, Tensor)], name: &str) -> Result<&'a Tensor, ControllerError> {
    streams
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, t)| t)
        .ok_or_else(|| missing(name, "RunBlocks"))
}
