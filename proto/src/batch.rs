//! Stacking `RunBlocks` requests along the batch dimension and splitting the results back,
//! without decoding a tensor: the controller uses it to send both CFG branches in one call,
//! the denoiser to run concurrent requests of different sessions as one computation.

use crate::codec::{CodecError, TensorMap, concat_batch, split_batch};
use crate::v1;

/// Stacks tensor maps with the same names: tensors for which `batched(name)` is true are
/// concatenated along dimension 0; the others (shared tables such as rotary embeddings) must
/// be byte-identical and are kept once. `None` when the maps cannot be stacked (different
/// names, trailing shapes or dtypes, differing shared tensors, or an unknown name).
pub fn stack_maps(
    maps: &[&TensorMap],
    batched: &dyn Fn(&str) -> Option<bool>,
) -> Option<TensorMap> {
    let first = *maps.first()?;
    if maps.iter().any(|m| m.len() != first.len()) {
        return None;
    }
    let mut out = TensorMap::new();
    for name in first.keys() {
        let parts: Vec<&v1::Tensor> = maps.iter().map(|m| m.get(name)).collect::<Option<_>>()?;
        let t = if batched(name)? {
            concat_batch(&parts).ok()?
        } else if parts.iter().all(|p| *p == parts[0]) {
            parts[0].clone()
        } else {
            return None;
        };
        out.insert(name.clone(), t);
    }
    Some(out)
}

/// One `RunBlocks` request holding every request of `reqs` (same wire dtype, stackable
/// streams and context), and each request's batch size (rows of `hidden_states`).
pub fn stack_run_blocks(
    reqs: &[&v1::RunBlocksRequest],
    batched: &dyn Fn(&str) -> Option<bool>,
) -> Option<(v1::RunBlocksRequest, Vec<i64>)> {
    let first = *reqs.first()?;
    if reqs.iter().any(|r| r.wire_dtype != first.wire_dtype) {
        return None;
    }
    let sizes: Vec<i64> = reqs
        .iter()
        .map(|r| {
            r.streams
                .get("hidden_states")
                .and_then(|t| t.shape.first().copied())
        })
        .collect::<Option<_>>()?;
    let streams = stack_maps(
        &reqs.iter().map(|r| &r.streams).collect::<Vec<_>>(),
        batched,
    )?;
    let context = stack_maps(
        &reqs.iter().map(|r| &r.context).collect::<Vec<_>>(),
        batched,
    )?;
    Some((
        v1::RunBlocksRequest {
            streams,
            context,
            wire_dtype: first.wire_dtype,
        },
        sizes,
    ))
}

/// Splits every tensor of a stacked result into per-request maps of `sizes` rows (no copy).
pub fn split_map(out: &TensorMap, sizes: &[i64]) -> Result<Vec<TensorMap>, CodecError> {
    let mut per: Vec<TensorMap> = vec![TensorMap::new(); sizes.len()];
    for (name, t) in out {
        for (slot, piece) in per.iter_mut().zip(split_batch(t, sizes)?) {
            slot.insert(name.clone(), piece);
        }
    }
    Ok(per)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::encode_tensor;
    use candle_core::{Device, Tensor};

    fn t(rows: usize, v: f32) -> v1::Tensor {
        encode_tensor(
            &Tensor::full(v, (rows, 2), &Device::Cpu).unwrap(),
            v1::DType::F32,
        )
        .unwrap()
    }

    fn req(rows: usize, v: f32, shared: f32) -> v1::RunBlocksRequest {
        v1::RunBlocksRequest {
            streams: [("hidden_states".to_string(), t(rows, v))].into(),
            context: [("rope".to_string(), t(3, shared))].into(),
            wire_dtype: v1::DType::F32 as i32,
        }
    }

    #[test]
    fn stacks_batched_keeps_shared_and_splits_back() {
        let batched = |n: &str| match n {
            "hidden_states" => Some(true),
            "rope" => Some(false),
            _ => None,
        };
        let (a, b) = (req(1, 1.0, 9.0), req(2, 2.0, 9.0));
        let (all, sizes) = stack_run_blocks(&[&a, &b], &batched).unwrap();
        assert_eq!(sizes, vec![1, 2]);
        assert_eq!(all.streams["hidden_states"].shape, vec![3, 2]);
        assert_eq!(all.context["rope"], a.context["rope"]);
        let parts = split_map(&all.streams, &sizes).unwrap();
        assert_eq!(parts[0], a.streams);
        assert_eq!(parts[1], b.streams);
        // A differing shared tensor, an unknown name or a different wire dtype: not stackable.
        assert!(stack_run_blocks(&[&a, &req(1, 1.0, 8.0)], &batched).is_none());
        assert!(stack_run_blocks(&[&a, &b], &|_| None).is_none());
        let mut c = req(1, 1.0, 9.0);
        c.wire_dtype = v1::DType::Bf16 as i32;
        assert!(stack_run_blocks(&[&a, &c], &batched).is_none());
    }
}
