//! Text mode: a `GenerateRequest` with a `prompt` (and optionally `negative_prompt`, `seed`,
//! `height`, `width`) becomes a model-native request by asking a denoiser of the model to
//! encode the prompts (`EncodePrompt`) and sampling the initial noise from the seed; at the
//! end the denoiser decodes the latents to a PNG (`Decode`).

use teaserve_proto::v1::{self, DType};
use teaserve_proto::{TensorMap, encode_tensor};

use crate::error::ControllerError;
use crate::models;
use crate::pool::DenoiserPool;
use crate::schedule::SchedulerConfig;
use crate::session::step_count;

/// Whether a request asks for text mode.
pub fn requested(req: &v1::GenerateRequest) -> bool {
    !req.prompt.is_empty()
        || req.negative_prompt.is_some()
        || req.seed != 0
        || req.height != 0
        || req.width != 0
        || req.max_sequence_length != 0
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

/// Checks the parts of a text-mode request that need no denoiser: a prompt, and no
/// model-native inputs except the initial noise.
fn check(req: &v1::GenerateRequest) -> Result<(), ControllerError> {
    if req.prompt.trim().is_empty() {
        return Err(invalid(
            "text mode needs a non-empty `prompt` (negative_prompt, seed, height, width, \
             guidance_scale and max_sequence_length refine it)"
                .into(),
        ));
    }
    if let Some(name) = req.inputs.keys().find(|k| k.as_str() != "hidden_states") {
        return Err(invalid(format!(
            "with `prompt`, inputs may hold only 'hidden_states' (the initial packed noise), \
             got '{}'; send either a prompt or model-native inputs",
            name.chars().take(64).collect::<String>()
        )));
    }
    if !req.negative_inputs.is_empty() {
        return Err(invalid(
            "with `prompt`, use negative_prompt rather than negative_inputs".into(),
        ));
    }
    Ok(())
}

/// The guidance the transformer embeds: the request's, or the model's default, when the
/// checkpoint has a guidance embedding; refused when it has none.
fn guidance_scale(
    req: &v1::GenerateRequest,
    describe: &v1::DescribeResponse,
    model_type: &str,
) -> Result<Option<f64>, ControllerError> {
    match (describe.guidance_embeds, req.guidance_scale) {
        (true, Some(g)) => Ok(Some(g)),
        (true, None) => Ok(models::lookup(model_type).and_then(|m| m.guidance_scale)),
        (false, Some(g)) => Err(invalid(format!(
            "guidance_scale {g}: this {model_type} checkpoint has no guidance embedding \
             (config guidance_embeds is false, e.g. FLUX.1-schnell); leave guidance_scale unset"
        ))),
        (false, None) => Ok(None),
    }
}

/// The sigma schedule from the checkpoint's own scheduler config (the pipeline's, float32
/// arithmetic), unless the request gives sigmas or the checkpoint ships no config (then the
/// session uses the model table's schedule).
fn sigmas(
    req: &v1::GenerateRequest,
    describe: &v1::DescribeResponse,
    model_type: &str,
    image_seq_len: usize,
) -> Result<Vec<f64>, ControllerError> {
    if !req.sigmas.is_empty() || describe.scheduler_config_json.is_empty() {
        return Ok(req.sigmas.clone());
    }
    let config = SchedulerConfig::parse(&describe.scheduler_config_json).map_err(|e| {
        ControllerError::Internal(format!("the checkpoint's scheduler_config.json: {e}"))
    })?;
    let steps = step_count(req, model_type)? as usize;
    let mut s = config.sigmas(steps, image_seq_len);
    s.pop(); // the session appends the final 0 itself
    Ok(s)
}

/// The initial latents: `inputs["hidden_states"]` when the caller made the noise (it must
/// have the latent shape), else standard-normal noise from `seed`.
fn initial_latents(
    req: &v1::GenerateRequest,
    shape: &[usize],
) -> Result<v1::Tensor, ControllerError> {
    if let Some(given) = req.inputs.get("hidden_states") {
        let (_, dims) = teaserve_proto::codec::validate(given, usize::MAX)
            .map_err(|e| invalid(format!("inputs['hidden_states']: {e}")))?;
        if dims != shape {
            return Err(invalid(format!(
                "inputs['hidden_states'] is {dims:?}; for this prompt and size the packed \
                 latents are {shape:?}"
            )));
        }
        return Ok(given.clone());
    }
    let numel: usize = shape.iter().product();
    let noise = candle_core::Tensor::from_vec(
        seeded_noise(req.seed, numel),
        shape,
        &candle_core::Device::Cpu,
    )?;
    Ok(encode_tensor(&noise, DType::F32)?)
}

/// Asks a denoiser with the text encoders to encode one prompt; `field` (`prompt` or
/// `negative_prompt`) names it in a refusal.
async fn encode(
    req: &v1::GenerateRequest,
    (field, prompt): (&str, &str),
    model_type: &str,
    pool: &DenoiserPool,
) -> Result<v1::EncodePromptResponse, ControllerError> {
    let call = v1::EncodePromptRequest {
        prompts: vec![prompt.to_string()],
        height: req.height,
        width: req.width,
        wire_dtype: DType::F32 as i32,
        max_sequence_length: req.max_sequence_length,
    };
    let resp = pool
        .call(
            model_type,
            "EncodePrompt",
            "",
            call,
            |mut c, r| async move { c.encode_prompt(r).await },
        )
        .await
        .map_err(|e| match e {
            ControllerError::Denoiser {
                endpoint,
                method,
                code: code @ tonic::Code::InvalidArgument,
                message,
            } => ControllerError::Denoiser {
                endpoint,
                method,
                code,
                message: format!("{field}: {message}"),
            },
            other => other,
        })?
        .response;
    for (encoder, &n) in resp.prompt_tokens.iter().flat_map(|t| &t.untruncated) {
        let kept = resp.prompt_tokens.first().and_then(|t| t.kept.get(encoder));
        if let Some(&kept) = kept
            && n > kept
        {
            tracing::warn!(
                encoder = %encoder,
                tokens = i64::from(n),
                kept = i64::from(kept),
                "the prompt was truncated to the text encoder's length"
            );
        }
    }
    Ok(resp)
}

/// The negative prompt when true CFG runs: as diffusers' `do_true_cfg = true_cfg_scale > 1 and
/// negative_prompt is not None` (an empty or blank negative prompt counts); with a scale of 1
/// or less the negative prompt is ignored, with a warning, as the pipelines do.
fn cfg_negative_prompt<'r>(
    req: &'r v1::GenerateRequest,
    model_type: &str,
) -> Result<Option<&'r str>, ControllerError> {
    let Some(negative) = req.negative_prompt.as_deref() else {
        return Ok(None);
    };
    let scale = crate::session::cfg_scale(req, model_type)?;
    if scale <= 1.0 {
        tracing::warn!(
            true_cfg_scale = scale,
            "negative_prompt is given but classifier-free guidance is not enabled since \
             true_cfg_scale <= 1"
        );
        return Ok(None);
    }
    Ok(Some(negative))
}

/// Turns a text-mode request into a model-native one; returns it with the image size to
/// decode at.
pub async fn prepare(
    req: &v1::GenerateRequest,
    model_type: &str,
    pool: &DenoiserPool,
) -> Result<(v1::GenerateRequest, (u32, u32)), ControllerError> {
    check(req)?;
    let describe = pool.describe_for(model_type).await?;
    if !describe.text_mode {
        return Err(invalid(format!(
            "model type '{model_type}' ships no text encoder; send model-native inputs \
             (hidden_states, encoder_hidden_states, ...)"
        )));
    }
    let guidance_scale = guidance_scale(req, &describe, model_type)?;
    let positive = encode(req, ("prompt", &req.prompt), model_type, pool).await?;
    let shape: Vec<usize> = positive
        .latent_shape
        .iter()
        .map(|&d| d.max(0) as usize)
        .collect();
    let tokens = shape.get(1).copied().unwrap_or(0);
    let sigmas = sigmas(req, &describe, model_type, tokens)?;
    let mut inputs = positive.inputs;
    inputs.insert("hidden_states".into(), initial_latents(req, &shape)?);
    let mut negative_inputs = TensorMap::new();
    if let Some(negative_prompt) = cfg_negative_prompt(req, model_type)? {
        let negative = encode(req, ("negative_prompt", negative_prompt), model_type, pool).await?;
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
            sigmas,
            guidance_scale,
            prompt: String::new(),
            negative_prompt: None,
            seed: 0,
            height: 0,
            width: 0,
            max_sequence_length: 0,
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
