//! Stacking `RunBlocks` requests along the batch dimension and splitting the results back,
//! without decoding a tensor: the controller uses it to send both CFG branches in one call,
//! the denoiser to run concurrent requests of different sessions as one computation.

use bytes::Bytes;

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

/// One `RunBlocks` request holding every request of `reqs` (same wire dtype and block range,
/// no attention tensors, stackable streams and context), and each request's batch size (rows of `hidden_states`).
pub fn stack_run_blocks(
    reqs: &[&v1::RunBlocksRequest],
    batched: &dyn Fn(&str) -> Option<bool>,
) -> Option<(v1::RunBlocksRequest, Vec<i64>)> {
    let first = *reqs.first()?;
    if reqs.iter().any(|r| {
        // TaylorSeer's attention tensors are per request: such calls run alone.
        !r.attention.is_empty()
            || r.return_attention
            || r.wire_dtype != first.wire_dtype
            || r.first_block != first.first_block
            || r.end_block != first.end_block
    }) {
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
            first_block: first.first_block,
            end_block: first.end_block,
            ..Default::default()
        },
        sizes,
    ))
}

/// Pads a `[B, T, D]` wire tensor with zero rows along `T` to `len` (a byte copy per sample).
fn pad_tokens(t: &v1::Tensor, len: i64) -> Option<v1::Tensor> {
    let [b, tokens, d] = t.shape[..] else {
        return None;
    };
    let item = crate::codec::itemsize(crate::codec::wire_dtype(t).ok()?);
    let (b, tokens, d, len) = (
        usize::try_from(b).ok()?,
        usize::try_from(tokens).ok()?,
        usize::try_from(d).ok()?,
        usize::try_from(len).ok()?,
    );
    let row = tokens.checked_mul(d)?.checked_mul(item)?;
    let padded = len.checked_mul(d)?.checked_mul(item)?;
    if len < tokens || t.data.len() != b.checked_mul(row)? {
        return None;
    }
    let mut data = Vec::with_capacity(b.checked_mul(padded)?);
    for sample in t.data.chunks_exact(row.max(1)).take(b) {
        data.extend_from_slice(sample);
        data.resize(data.len() + padded - row, 0);
    }
    Some(v1::Tensor {
        dtype: t.dtype,
        shape: vec![b as i64, len as i64, d as i64],
        data: Bytes::from(data),
    })
}

/// The key mask `[B, len]` (I64, 1 = valid) of a request whose text stream has `tokens` valid
/// tokens padded to `len`: its own mask (`[B, tokens]`, any numeric dtype, nonzero = valid)
/// extended with zeros, or all valid tokens when it has none.
fn padded_mask(own: Option<&v1::Tensor>, b: i64, tokens: i64, len: i64) -> Option<v1::Tensor> {
    let valid: Vec<bool> = match own {
        Some(m) => {
            if m.shape[..] != [b, tokens] {
                return None;
            }
            let t = crate::codec::decode_tensor(m, &candle_core::Device::Cpu, usize::MAX).ok()?;
            let values: Vec<f64> = t
                .to_dtype(candle_core::DType::F64)
                .ok()?
                .flatten_all()
                .ok()?
                .to_vec1()
                .ok()?;
            values.into_iter().map(|v| v != 0.0).collect()
        }
        None => vec![true; usize::try_from(b.checked_mul(tokens)?).ok()?],
    };
    let row = usize::try_from(tokens).ok()?;
    let pad = usize::try_from(len - tokens).ok()?;
    let mut mask = Vec::with_capacity(valid.len() + pad * usize::try_from(b).ok()?);
    for sample in valid.chunks(row.max(1)) {
        mask.extend(sample.iter().map(|&v| i64::from(v)));
        mask.extend(std::iter::repeat_n(0i64, pad));
    }
    Some(v1::Tensor {
        dtype: v1::DType::I64 as i32,
        shape: vec![b, len],
        data: Bytes::from(bytemuck::cast_slice::<i64, u8>(&mask).to_vec()),
    })
}

/// Requests whose text streams (`text`, `[B, T, D]`) differ only in `T`, made stackable: each
/// text stream zero-padded to the longest `T`, and every request given the key mask `mask`
/// (`[B, T]`, 1 = valid) so the padding is never attended to. For models whose RunBlocks
/// takes that mask (Qwen-Image): the valid tokens' results equal the unpadded ones up to
/// float rounding. `None` when there is nothing to pad or a stream does not have that form.
pub fn pad_text_streams(
    reqs: &[&v1::RunBlocksRequest],
    text: &str,
    mask: &str,
) -> Option<Vec<v1::RunBlocksRequest>> {
    let lens: Vec<i64> = reqs
        .iter()
        .map(|r| r.streams.get(text).and_then(|t| t.shape.get(1).copied()))
        .collect::<Option<_>>()?;
    let longest = *lens.iter().max()?;
    if lens.iter().all(|&l| l == longest) {
        return None;
    }
    reqs.iter()
        .zip(lens)
        .map(|(r, tokens)| {
            let stream = r.streams.get(text)?;
            let mut out = (*r).clone();
            out.streams
                .insert(text.to_string(), pad_tokens(stream, longest)?);
            let m = padded_mask(r.context.get(mask), stream.shape[0], tokens, longest)?;
            out.context.insert(mask.to_string(), m);
            Some(out)
        })
        .collect()
}

/// Undoes [`pad_text_streams`] on one request's share of a padded result: its text stream
/// (`[B, T_padded, D]`) cut back to the `len` tokens the request sent. A stream already `len`
/// long is left as it is.
pub fn unpad_text_stream(out: &mut TensorMap, text: &str, len: i64) -> Result<(), CodecError> {
    let Some(t) = out.get(text) else {
        return Ok(());
    };
    let bad =
        || CodecError::BatchMismatch(format!("cannot cut {text} {:?} to {len} tokens", t.shape));
    let [b, tokens, d] = t.shape[..] else {
        return Err(bad());
    };
    if tokens == len {
        return Ok(());
    }
    let dims = [b, tokens, d, len].map(usize::try_from);
    let [Ok(b), Ok(tokens), Ok(d), Ok(len)] = dims else {
        return Err(bad());
    };
    let item = crate::codec::itemsize(crate::codec::wire_dtype(t)?);
    let row = tokens * d * item;
    if len > tokens || t.data.len() != b * row || row == 0 {
        return Err(bad());
    }
    let keep = len * d * item;
    let mut data = Vec::with_capacity(b * keep);
    for sample in t.data.chunks_exact(row) {
        data.extend_from_slice(&sample[..keep]);
    }
    let cut = v1::Tensor {
        dtype: t.dtype,
        shape: vec![b as i64, len as i64, d as i64],
        data: Bytes::from(data),
    };
    out.insert(text.to_string(), cut);
    Ok(())
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
            ..Default::default()
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

    fn text_req(tokens: usize, mask: Option<Vec<f32>>) -> v1::RunBlocksRequest {
        let txt: Vec<f32> = (0..tokens * 2).map(|i| i as f32 + 1.0).collect();
        let txt = Tensor::from_vec(txt, (1, tokens, 2), &Device::Cpu).unwrap();
        let mut context = TensorMap::new();
        if let Some(m) = mask {
            let m = Tensor::from_vec(m, (1, tokens), &Device::Cpu).unwrap();
            context.insert("mask".into(), encode_tensor(&m, v1::DType::F32).unwrap());
        }
        v1::RunBlocksRequest {
            streams: [
                ("hidden_states".to_string(), t(1, 1.0)),
                (
                    "txt".to_string(),
                    encode_tensor(&txt, v1::DType::F32).unwrap(),
                ),
            ]
            .into(),
            context,
            wire_dtype: v1::DType::F32 as i32,
            ..Default::default()
        }
    }

    fn values(t: &v1::Tensor) -> Vec<f64> {
        crate::decode_tensor(t, &Device::Cpu, usize::MAX)
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn text_of_different_lengths_is_padded_with_a_key_mask() {
        let (a, b) = (text_req(2, None), text_req(3, None));
        let padded = pad_text_streams(&[&a, &b], "txt", "mask").unwrap();
        assert_eq!(padded[0].streams["txt"].shape, vec![1, 3, 2]);
        assert_eq!(
            values(&padded[0].streams["txt"]),
            [1.0, 2.0, 3.0, 4.0, 0.0, 0.0]
        );
        assert_eq!(padded[1].streams["txt"], b.streams["txt"]);
        assert_eq!(values(&padded[0].context["mask"]), [1.0, 1.0, 0.0]);
        assert_eq!(values(&padded[1].context["mask"]), [1.0, 1.0, 1.0]);
        assert_eq!(
            padded[0].streams["hidden_states"],
            a.streams["hidden_states"]
        );
        let batched = |n: &str| Some(n != "rope");
        let (all, sizes) = stack_run_blocks(&padded.iter().collect::<Vec<_>>(), &batched).unwrap();
        assert_eq!(
            (all.streams["txt"].shape.clone(), sizes),
            (vec![2, 3, 2], vec![1, 1])
        );
        // A request's own mask is kept and extended.
        let c = text_req(2, Some(vec![1.0, 0.0]));
        let padded = pad_text_streams(&[&c, &b], "txt", "mask").unwrap();
        assert_eq!(values(&padded[0].context["mask"]), [1.0, 0.0, 0.0]);
        // Equal lengths need nothing; a stream of another form is not padded.
        assert!(pad_text_streams(&[&a, &text_req(2, None)], "txt", "mask").is_none());
        let mut bad = text_req(3, None);
        bad.streams.get_mut("txt").unwrap().shape = vec![1, 6];
        assert!(pad_text_streams(&[&a, &bad], "txt", "mask").is_none());
        let mut wrong_mask = text_req(2, Some(vec![1.0, 1.0]));
        wrong_mask.context.get_mut("mask").unwrap().shape = vec![2, 1];
        assert!(pad_text_streams(&[&wrong_mask, &b], "txt", "mask").is_none());
    }
}
