//! Text mode: a `GenerateRequest` with a `prompt` (and optionally `negative_prompt`, `seed`,
//! `height`, `width`) becomes a model-native request by asking a denoiser of the model to
//! encode the prompts (`EncodePrompt`) and sampling the initial noise from the seed; at the
//! end the denoiser decodes the latents to a PNG (`Decode`).

use teaserve_proto::v1::{self, DType};
use teaserve_proto::{TensorMap, encode_tensor};

use crate::error::ControllerError;
use crate::pool::DenoiserPool;

/// Whether a request asks for text mode.
pub fn requested(req: &v1::GenerateRequest) -> bool {
    !req.prompt.is_empty()
        || !req.negative_prompt.is_empty()
        || req.seed != 0
        || req.height != 0
        || req.width != 0
}

/// SplitMix64 with Box-Muller: the seeded standard-normal noise of the initial latents.
pub fn seeded_noise(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let u1 = next().max(1e-12);
            let u2 = next();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect()
}

fn invalid(msg: String) -> ControllerError {
    ControllerError::InvalidArgument(msg)
}

/// Turns a text-mode request into a model-native one; returns it with the image size to
/// decode at.
pub async fn prepare(
    req: &v1::GenerateRequest,
    model_type: &str,
    pool: &DenoiserPool,
) -> Result<(v1::GenerateRequest, (u32, u32)), ControllerError> {
    if req.prompt.trim().is_empty() {
        return Err(invalid(
            "text mode needs `prompt` (negative_prompt, seed, height and width refine it)".into(),
        ));
    }
    if !req.inputs.is_empty() || !req.negative_inputs.is_empty() {
        return Err(invalid(
            "send either `prompt` (text mode) or model-native `inputs`, not both".into(),
        ));
    }
    let describe = pool.describe_for(model_type).await?;
    if !describe.text_mode {
        return Err(invalid(format!(
            "model type '{model_type}' ships no text encoder; send model-native inputs \
             (hidden_states, encoder_hidden_states, ...)"
        )));
    }
    let encode = |prompt: &str| {
        let req = v1::EncodePromptRequest {
            prompts: vec![prompt.to_string()],
            height: req.height,
            width: req.width,
            wire_dtype: DType::F32 as i32,
        };
        async move {
            pool.call(model_type, "EncodePrompt", "", req, |mut c, r| async move {
                c.encode_prompt(r).await
            })
            .await
            .map(|called| called.response)
        }
    };
    let positive = encode(&req.prompt).await?;
    let shape: Vec<usize> = positive
        .latent_shape
        .iter()
        .map(|&d| d.max(0) as usize)
        .collect();
    let numel: usize = shape.iter().product();
    let noise = candle_core::Tensor::from_vec(
        seeded_noise(req.seed, numel),
        shape.as_slice(),
        &candle_core::Device::Cpu,
    )?;
    let mut inputs = positive.inputs;
    inputs.insert("hidden_states".into(), encode_tensor(&noise, DType::F32)?);
    let mut negative_inputs = TensorMap::new();
    if !req.negative_prompt.trim().is_empty() {
        let negative = encode(&req.negative_prompt).await?;
        for name in [
            "encoder_hidden_states",
            "pooled_projections",
            "encoder_hidden_states_mask",
        ] {
            if let Some(t) = negative.inputs.get(name) {
                negative_inputs.insert(name.to_string(), t.clone());
            }
        }
    }
    Ok((
        v1::GenerateRequest {
            model_class_name: model_type.to_string(),
            inputs,
            negative_inputs,
            prompt: String::new(),
            negative_prompt: String::new(),
            seed: 0,
            height: 0,
            width: 0,
            ..req.clone()
        },
        (positive.height, positive.width),
    ))
}

/// Decodes final latents to a PNG on a denoiser of the model.
pub async fn decode(
    latents: &v1::Tensor,
    size: (u32, u32),
    model_type: &str,
    pool: &DenoiserPool,
) -> Result<Vec<u8>, ControllerError> {
    let req = v1::DecodeRequest {
        latents: Some(latents.clone()),
        height: size.0,
        width: size.1,
    };
    let resp = pool
        .call(model_type, "Decode", "", req, |mut c, r| async move {
            c.decode(r).await
        })
        .await?
        .response;
    resp.png
        .into_iter()
        .next()
        .map(|b| b.to_vec())
        .ok_or_else(|| ControllerError::Internal("Decode returned no image".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_is_seeded_and_standard_normal() {
        let a = seeded_noise(42, 20_000);
        assert_eq!(a, seeded_noise(42, 20_000));
        assert_ne!(a[..10], seeded_noise(43, 10)[..]);
        let mean = a.iter().map(|&x| f64::from(x)).sum::<f64>() / a.len() as f64;
        let var = a
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / a.len() as f64;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
    }
}
