//! One branch's RunBlocks and Postprocess calls, for the policies whose steps call the stages
//! branch by branch (FirstBlockCache's head and tail, TaylorSeer's attention tensors), and
//! the check that every denoiser of the model understands those calls.

use teaserve_proto::codec::map_bytes;
use teaserve_proto::v1::{self, DType};

use crate::error::ControllerError;
use crate::orchestrator::{Traffic, branch_name, missing};
use crate::pool::DenoiserPool;

/// RunBlocks for one branch; counts its tensor bytes.
pub(crate) async fn run_blocks(
    pool: &DenoiserPool,
    model_type: &str,
    branch: v1::Branch,
    req: v1::RunBlocksRequest,
    traffic: &Traffic<'_>,
) -> Result<v1::RunBlocksResponse, ControllerError> {
    traffic.add(
        "to_denoiser",
        map_bytes(&req.streams) + map_bytes(&req.context) + map_bytes(&req.attention),
    );
    let out = pool
        .call(
            model_type,
            "RunBlocks",
            branch_name(branch),
            req,
            |mut c, r| async move { c.run_blocks(r).await },
        )
        .await?
        .response;
    traffic.add(
        "from_denoiser",
        map_bytes(&out.streams) + map_bytes(&out.attention),
    );
    Ok(out)
}

/// Postprocess of one branch's image stream; returns the prediction as it travelled.
pub(crate) async fn postprocess(
    pool: &DenoiserPool,
    model_type: &str,
    branch: v1::Branch,
    hidden: v1::Tensor,
    p: &v1::PreprocessResponse,
    wire: DType,
    traffic: &Traffic<'_>,
) -> Result<v1::Tensor, ControllerError> {
    traffic.add(
        "to_denoiser",
        hidden.data.len() as u64 + map_bytes(&p.context),
    );
    let req = v1::PostprocessRequest {
        hidden_states: Some(hidden),
        context: p.context.clone(),
        wire_dtype: wire as i32,
    };
    let sample = pool
        .call(
            model_type,
            "Postprocess",
            branch_name(branch),
            req,
            |mut c, r| async move { c.postprocess(r).await },
        )
        .await?
        .response
        .sample
        .ok_or_else(|| missing("sample", "Postprocess"))?;
    traffic.add("from_denoiser", sample.data.len() as u64);
    Ok(sample)
}

/// Checks that every denoiser of the model runs blocks by range (FirstBlockCache and
/// TaylorSeer need it: an older version would ignore the range and attention fields) and,
/// for FirstBlockCache, that the model has a head and a tail.
pub(crate) fn check_model(
    policy: &str,
    describe: &v1::DescribeResponse,
    pool: &DenoiserPool,
) -> Result<(), ControllerError> {
    if !pool.blocks_by_range(&describe.model_type) {
        return Err(ControllerError::FailedPrecondition(format!(
            "{policy} needs every denoiser serving '{}' to run blocks by range (Describe \
             num_blocks); one does not (an older version?): use tea_cache, mag_cache or none \
             until they are updated",
            teaserve_proto::quote(&describe.model_type)
        )));
    }
    if policy == "first_block_cache" && describe.num_blocks < 2 {
        return Err(ControllerError::InvalidArgument(format!(
            "first_block_cache needs a model with at least 2 blocks (a head and a tail); '{}' \
             has {}: use tea_cache, mag_cache or none",
            teaserve_proto::quote(&describe.model_type),
            describe.num_blocks
        )));
    }
    Ok(())
}
