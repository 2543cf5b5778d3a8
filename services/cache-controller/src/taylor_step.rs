//! One step under TaylorSeer (wire mode): per branch, the policy's schedule decides; a
//! computed step runs the blocks and brings back every attention module's outputs (the new
//! Taylor factors), a forecast step sends the forecast attention outputs, which the denoiser
//! uses instead of computing attention while the rest of every block runs; then Postprocess.
//! diffusers' `TaylorSeerCacheConfig` hooks do exactly this inside the transformer.

use std::collections::BTreeMap;

use candle_core::Tensor;
use teaserve_proto::codec::encode_tensor;
use teaserve_proto::v1::{self, DType};

use crate::branch_calls::{postprocess, run_blocks};
use crate::error::ControllerError;
use crate::orchestrator::{CallCounts, Traffic, decode_f32, missing};
use crate::policy::{Decision, TaylorSeerParams};
use crate::pool::DenoiserPool;
use crate::session::{BranchRun, Session};

/// Runs every branch of the step; returns each branch's decision and prediction.
pub(crate) async fn step(
    session: &mut Session,
    pool: &DenoiserPool,
    counts: &mut CallCounts,
    pre: &[v1::PreprocessResponse],
    params: &TaylorSeerParams,
    traffic: &Traffic<'_>,
) -> Result<(Vec<Decision>, Vec<Tensor>), ControllerError> {
    let wire = session.wire_dtype;
    let model_type = session.model_type.clone();
    let mut decisions = Vec::with_capacity(pre.len());
    let mut preds = Vec::with_capacity(pre.len());
    for (b, p) in session.branches.iter_mut().zip(pre) {
        let call = Call {
            pool,
            model_type: &model_type,
            wire,
            traffic,
        };
        let (d, sample) = call.branch(b, p, params, counts).await?;
        decisions.push(d);
        preds.push(sample);
    }
    Ok((decisions, preds))
}

/// Where one branch's calls go.
struct Call<'a> {
    pool: &'a DenoiserPool,
    model_type: &'a str,
    wire: DType,
    traffic: &'a Traffic<'a>,
}

impl Call<'_> {
    async fn branch(
        &self,
        b: &mut BranchRun,
        p: &v1::PreprocessResponse,
        params: &TaylorSeerParams,
        counts: &mut CallCounts,
    ) -> Result<(Decision, Tensor), ControllerError> {
        let d = b.state.taylor.decide(params);
        let mut req = v1::RunBlocksRequest {
            streams: p.streams.clone(),
            context: p.context.clone(),
            wire_dtype: self.wire as i32,
            return_attention: d.compute,
            ..Default::default()
        };
        if !d.compute {
            for (k, t) in b.state.taylor.predict()? {
                // In the wire dtype, as the streams travel (the model's own dtype by default,
                // which is what diffusers forecasts in).
                req.attention.insert(k, encode_tensor(&t, self.wire)?);
            }
        }
        let out = run_blocks(self.pool, self.model_type, b.branch, req, self.traffic).await?;
        counts.run_blocks += 1;
        if d.compute {
            let outputs = out
                .attention
                .iter()
                .map(|(k, t)| Ok((k.clone(), decode_f32(t, "attention")?)))
                .collect::<Result<BTreeMap<_, _>, ControllerError>>()?;
            if outputs.is_empty() {
                return Err(ControllerError::Internal(
                    "the denoiser returned no attention outputs for TaylorSeer".into(),
                ));
            }
            b.state.taylor.update(params, &outputs)?;
        }
        let hidden = out
            .streams
            .get("hidden_states")
            .cloned()
            .ok_or_else(|| missing("hidden_states", "RunBlocks"))?;
        let sample = postprocess(
            self.pool,
            self.model_type,
            b.branch,
            hidden,
            p,
            self.wire,
            self.traffic,
        )
        .await?;
        counts.postprocess += 1;
        Ok((d, decode_f32(&sample, "sample")?))
    }
}
