//! `QwenImagePipeline` from a whole diffusers folder (Qwen/Qwen-Image layout): the transformer
//! behind the three-stage split ([`QwenImageAdapter`]) plus text mode as diffusers'
//! `QwenImagePipeline` computes it: the prompt wrapped in the pipeline's chat template, tokenized
//! by the checkpoint's Qwen2 tokenizer, embedded by Qwen2.5-VL's language model
//! (`hidden_states[-1]`), the first 34 tokens (the system prompt) dropped, truncated to
//! `max_sequence_length`; the token grid (`img_shapes`) for the requested size; and the Qwen-Image
//! VAE decoder to RGB.
//!
//! A denoiser may load only some components (`--components`): the 7B text encoder can live on
//! another GPU than the transformer, and the controller routes EncodePrompt / Decode to a
//! denoiser that has them.

use candle_core::{DType, Tensor};

use crate::adapters::pipeline::{
    PipelineAdapter, SizeRule, component_config, component_vb, invalid, latent_grid, load_err,
    loaded_components, missing, scheduler_config, wants,
};
use crate::adapters::qwen_image::{QwenImageAdapter, load_transformer};
use crate::error::DenoiserError;
use crate::loader::{ModelFiles, PipelineSource, parse_config};
use crate::models::qwen_image::Config;
use crate::models::qwen_vae::{self, Decoder};
use crate::models::qwen2_5_vl_text::{Qwen25VlTextModel, TextConfig};
use crate::models::text_tokenizers::Qwen2Tokenizer;
use crate::registry::{
    Component, LoadOptions, ModelAdapter, PromptInputs, PromptLength, Tensors, TextMode,
};

/// `QwenImagePipeline.__call__`'s default size: `default_sample_size` 128 x VAE factor 8.
const DEFAULT_SIDE: usize = 1024;
/// Largest image side accepted, pixels (the schedule's `max_image_seq_len` 8192 tokens is
/// about 1448 x 1448; larger sizes extrapolate `mu` as diffusers does, up to this bound).
const MAX_SIDE: usize = 4096;
/// The pipeline's `prompt_template_encode`; `{}` is the prompt.
pub const PROMPT_TEMPLATE: &str = "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n";
/// `prompt_template_encode_start_idx`: hidden states dropped from the front (the system
/// prompt and `<|im_start|>user\n`, 34 tokens with the real tokenizer). Hard-coded in the
/// pipeline, whatever the tokenizer makes of the template.
pub const DROP_IDX: usize = 34;
/// `tokenizer_max_length`: the tokenizer keeps at most this many tokens after `DROP_IDX`.
const TOKENIZER_MAX_LENGTH: usize = 1024;
/// `max_sequence_length` default (`__call__`) and limit (`check_inputs`).
const DEFAULT_MAX_SEQUENCE_LENGTH: usize = 512;
/// Tokens of the template after the prompt (`<|im_end|>\n<|im_start|>assistant\n`).
const TEMPLATE_SUFFIX_TOKENS: usize = 5;

/// Encoded prompts: embeddings `[B, T, D]`, the mask `[B, T]` when some token is padding,
/// and each prompt's lengths.
type Encoded = (Tensor, Option<Tensor>, Vec<Vec<PromptLength>>);

/// The pipeline's tokenizer and text encoder.
struct TextEncoder {
    tokenizer: Qwen2Tokenizer,
    model: Qwen25VlTextModel,
}

/// The VAE decoder with its latent de-normalisation.
struct Vae {
    config: qwen_vae::Config,
    decoder: Decoder,
}

/// The Qwen-Image pipeline's text mode: whichever of its text encoders and VAE this denoiser
/// loaded.
pub struct QwenTextMode {
    text: Option<TextEncoder>,
    vae: Option<Vae>,
    /// Channels of a packed latent token (the transformer's `in_channels`).
    in_channels: usize,
    /// Components this denoiser loaded (for the error naming a missing one).
    components: Vec<Component>,
    /// Where the encoders' outputs are made.
    device: candle_core::Device,
}

/// A Qwen-Image pipeline: whichever components this denoiser loaded.
pub type QwenImagePipelineAdapter = PipelineAdapter<QwenImageAdapter, QwenTextMode>;

/// Loads the components of a Qwen-Image pipeline folder named by `opts.components`.
pub fn load(
    files: &ModelFiles,
    pipeline: &PipelineSource,
    opts: &LoadOptions,
) -> Result<Box<dyn ModelAdapter>, DenoiserError> {
    let config: Config = parse_config(files, Config::validate)?;
    let transformer = if wants(opts, Component::Transformer) {
        Some(load_transformer(files, opts)?)
    } else {
        None
    };
    let text = if wants(opts, Component::TextEncoders) {
        Some(load_text_encoder(
            pipeline,
            opts,
            config.joint_attention_dim,
        )?)
    } else {
        None
    };
    let vae = if wants(opts, Component::Vae) {
        Some(load_vae(pipeline, opts)?)
    } else {
        None
    };
    let mut info =
        QwenImageAdapter::contract(&config, files.config_json.clone(), opts.dtype, &opts.device);
    info.text_mode = Some((DEFAULT_SIDE, DEFAULT_SIDE));
    info.max_sequence_length = DEFAULT_MAX_SEQUENCE_LENGTH;
    info.components = loaded_components(opts);
    info.scheduler_config_json = scheduler_config(pipeline)?;
    Ok(Box::new(PipelineAdapter {
        transformer,
        text_mode: QwenTextMode {
            text,
            vae,
            in_channels: config.in_channels,
            components: info.components.clone(),
            device: opts.device.clone(),
        },
        info,
    }))
}

fn load_text_encoder(
    pipeline: &PipelineSource,
    opts: &LoadOptions,
    joint_attention_dim: usize,
) -> Result<TextEncoder, DenoiserError> {
    let tokenizer = Qwen2Tokenizer::from_files(
        &pipeline.file("tokenizer/vocab.json")?,
        &pipeline.file("tokenizer/merges.txt")?,
        &pipeline.file("tokenizer/added_tokens.json")?,
    )
    .map_err(|e| load_err("tokenizer/", e))?;
    let json = pipeline.json("text_encoder/config.json")?;
    let config = TextConfig::from_json(&json).map_err(|e| {
        DenoiserError::Config(format!(
            "{}/text_encoder/config.json: {e}",
            pipeline.describe()
        ))
    })?;
    if config.hidden_size != joint_attention_dim {
        return Err(DenoiserError::Config(format!(
            "text_encoder hidden_size {} differs from the transformer's joint_attention_dim {}",
            config.hidden_size, joint_attention_dim
        )));
    }
    let model = Qwen25VlTextModel::new(&config, component_vb(pipeline, "text_encoder", opts)?)
        .map_err(|e| load_err("building the Qwen2.5-VL text encoder (text_encoder/)", e))?;
    Ok(TextEncoder { tokenizer, model })
}

fn load_vae(pipeline: &PipelineSource, opts: &LoadOptions) -> Result<Vae, DenoiserError> {
    let config: qwen_vae::Config = component_config(pipeline, "vae")?;
    config.validate().map_err(|e| {
        DenoiserError::Config(format!("{}/vae/config.json: {e}", pipeline.describe()))
    })?;
    let decoder = Decoder::new(&config, component_vb(pipeline, "vae", opts)?)
        .map_err(|e| load_err("building the Qwen-Image VAE decoder (vae/)", e))?;
    Ok(Vae { config, decoder })
}

/// `max_sequence_length` of a request: 0 = the default 512; above 1024 refused, as
/// `check_inputs` does.
fn resolve_max_sequence_length(n: usize) -> Result<usize, DenoiserError> {
    match n {
        0 => Ok(DEFAULT_MAX_SEQUENCE_LENGTH),
        n if n > TOKENIZER_MAX_LENGTH => Err(invalid(format!(
            "max_sequence_length {n} is above QwenImagePipeline's limit of \
             {TOKENIZER_MAX_LENGTH}; use 1 to {TOKENIZER_MAX_LENGTH}, or 0 for the default \
             {DEFAULT_MAX_SEQUENCE_LENGTH}"
        ))),
        n => Ok(n),
    }
}

impl TextEncoder {
    /// The template ids of one prompt, refused when the pipeline's tokenizer would cut into
    /// them (more than `DROP_IDX + tokenizer_max_length` tokens).
    fn template_ids(&self, prompt: &str) -> Result<Vec<u32>, DenoiserError> {
        let text = PROMPT_TEMPLATE.replacen("{}", prompt, 1);
        let ids = self
            .tokenizer
            .encode(&text)
            .map_err(|e| invalid(format!("prompt: {e}")))?;
        let limit = DROP_IDX + TOKENIZER_MAX_LENGTH;
        if ids.len() > limit {
            return Err(invalid(format!(
                "the prompt '{}' is {} tokens in QwenImagePipeline's chat template, more than the \
                 {limit} its tokenizer keeps ({TOKENIZER_MAX_LENGTH} after the {DROP_IDX}-token \
                 system prefix); shorten the prompt to at most {} tokens",
                teaserve_proto::quote(prompt),
                ids.len(),
                limit - DROP_IDX - TEMPLATE_SUFFIX_TOKENS
            )));
        }
        Ok(ids)
    }

    /// One prompt's embedding `[1, T, D]`: `hidden_states[-1][:, DROP_IDX:]`, then
    /// `[:, :max_len]`, with its lengths before and after truncation.
    fn embed(&self, prompt: &str, max_len: usize) -> Result<(Tensor, PromptLength), DenoiserError> {
        let ids = self.template_ids(prompt)?;
        let device = self.model.device();
        let len = ids.len();
        let ids = Tensor::from_vec(ids, (1, len), device)?;
        let states = self.model.forward(&ids)?;
        let untruncated = len.saturating_sub(DROP_IDX);
        let kept = untruncated.min(max_len);
        if kept == 0 {
            return Err(invalid(format!(
                "the prompt '{}': the tokenizer made only {len} template tokens, not more than the \
                 {DROP_IDX} the pipeline drops",
                teaserve_proto::quote(prompt)
            )));
        }
        let embeds = states.narrow(1, DROP_IDX, kept)?;
        Ok((
            embeds,
            PromptLength {
                encoder: "qwen2_5_vl",
                untruncated,
                kept,
            },
        ))
    }

    /// `prompt_embeds [B, T, D]` padded with zeros to the longest prompt, and the mask
    /// `[B, T]` (1 = valid) unless every token is valid (the pipeline then passes none).
    fn encode(&self, prompts: &[String], max_len: usize) -> Result<Encoded, DenoiserError> {
        let mut embeds = Vec::with_capacity(prompts.len());
        let mut lengths = Vec::with_capacity(prompts.len());
        for p in prompts {
            let (e, l) = self.embed(p, max_len)?;
            embeds.push(e);
            lengths.push(vec![l]);
        }
        let longest = lengths.iter().map(|l| l[0].kept).max().unwrap_or(0);
        let device = self.model.device();
        let mut mask = Vec::with_capacity(prompts.len() * longest);
        let mut padded = Vec::with_capacity(prompts.len());
        for (e, l) in embeds.into_iter().zip(&lengths) {
            let kept = l[0].kept;
            mask.extend((0..longest).map(|i| i64::from(i < kept)));
            padded.push(if kept < longest {
                let (_, _, d) = e.dims3()?;
                let zeros = Tensor::zeros((1, longest - kept, d), e.dtype(), device)?;
                Tensor::cat(&[&e, &zeros], 1)?
            } else {
                e
            });
        }
        let embeds = Tensor::cat(&padded, 0)?;
        let mask = if mask.iter().all(|&m| m == 1) {
            None
        } else {
            Some(Tensor::from_vec(mask, (prompts.len(), longest), device)?)
        };
        Ok((embeds, mask, lengths))
    }
}

impl QwenTextMode {
    /// Pixels per packed latent token side: 2 x the VAE factor (16 for Qwen-Image).
    fn multiple(&self) -> usize {
        2 * self.vae.as_ref().map_or(8, |v| v.config.scale_factor())
    }

    /// The image size for a request (0 = default), refused unless a multiple of 16.
    fn size(&self, height: usize, width: usize) -> Result<(usize, usize), DenoiserError> {
        SizeRule {
            model_type: "QwenImagePipeline",
            default: (DEFAULT_SIDE, DEFAULT_SIDE),
            multiple: self.multiple(),
            max_side: MAX_SIDE,
        }
        .resolve(height, width)
    }
}

impl TextMode for QwenTextMode {
    fn default_size(&self) -> (usize, usize) {
        (DEFAULT_SIDE, DEFAULT_SIDE)
    }

    fn encode_prompts(
        &self,
        prompts: &[String],
        height: usize,
        width: usize,
        max_sequence_length: usize,
    ) -> Result<PromptInputs, DenoiserError> {
        let text = self
            .text
            .as_ref()
            .ok_or_else(|| missing(&self.components, Component::TextEncoders, "EncodePrompt"))?;
        if prompts.is_empty() {
            return Err(invalid("EncodePrompt needs at least one prompt".into()));
        }
        let max_len = resolve_max_sequence_length(max_sequence_length)?;
        let (h, w) = self.size(height, width)?;
        let (embeds, mask, prompt_lengths) = text.encode(prompts, max_len)?;
        let m = self.multiple();
        let (rows, cols) = (h / m, w / m);
        let b = prompts.len();
        let shapes: Vec<i64> = (0..b).flat_map(|_| [1, rows as i64, cols as i64]).collect();
        let mut inputs = Tensors::from([
            ("encoder_hidden_states".to_string(), embeds),
            (
                "img_shapes".to_string(),
                Tensor::from_vec(shapes, (b, 3), &self.device)?,
            ),
        ]);
        if let Some(mask) = mask {
            inputs.insert("encoder_hidden_states_mask".to_string(), mask);
        }
        Ok(PromptInputs {
            inputs,
            latent_shape: vec![b, rows * cols, self.in_channels],
            height: h,
            width: w,
            max_sequence_length: max_len,
            prompt_lengths,
        })
    }

    fn decode(
        &self,
        latents: &Tensor,
        height: usize,
        width: usize,
    ) -> Result<Vec<Vec<u8>>, DenoiserError> {
        let vae = self
            .vae
            .as_ref()
            .ok_or_else(|| missing(&self.components, Component::Vae, "Decode"))?;
        let (h, w) = self.size(height, width)?;
        let (rows, cols) = latent_grid(latents, (h, w), self.multiple(), self.in_channels)?;
        let unpacked =
            qwen_vae::unpack_latents(&latents.to_dtype(DType::F32)?, 2 * rows, 2 * cols)?;
        let z = qwen_vae::latents_to_decoder_input(&unpacked, &vae.config)?;
        let decoded = vae.decoder.decode(&z)?;
        qwen_vae::to_rgb8(&decoded)?
            .into_iter()
            .map(|rgb| crate::adapters::png(rgb, h, w))
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::test_util::{check, qwen_pipeline_dir, qwen_pipeline_reference};

    fn adapter(components: &[Component]) -> Box<dyn ModelAdapter> {
        let dir = qwen_pipeline_dir();
        let files = crate::loader::resolve(
            dir.to_str().unwrap(),
            None,
            &crate::loader::HubOptions::default(),
        )
        .unwrap();
        let opts = LoadOptions {
            device: candle_core::Device::Cpu,
            dtype: DType::F32,
            components: components.to_vec(),
        };
        load(&files, files.pipeline.as_ref().unwrap(), &opts).unwrap()
    }

    fn reference_json() -> serde_json::Value {
        let text = std::fs::read_to_string(qwen_pipeline_dir().join("reference.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn template_matches_the_fixture_and_drops_34_tokens() {
        let meta: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(qwen_pipeline_dir().join("meta.json")).unwrap(),
        )
        .unwrap();
        let t = &meta["tokenizers"]["tokenizer"];
        assert_eq!(t["template"].as_str().unwrap(), PROMPT_TEMPLATE);
        assert_eq!(t["drop_idx"].as_u64().unwrap() as usize, DROP_IDX);
    }

    #[test]
    fn prompt_embeds_and_masks_match_the_pipeline() {
        let a = adapter(&[Component::TextEncoders]);
        let tm = a.text_mode().unwrap();
        let r = qwen_pipeline_reference();
        let json = reference_json();
        for (case, c) in json["cases"].as_object().unwrap() {
            let (h, w) = (
                c["height"].as_u64().unwrap() as usize,
                c["width"].as_u64().unwrap() as usize,
            );
            for (field, prefix) in [("prompt", ""), ("negative_prompt", "negative_")] {
                let prompt = c[field].as_str().unwrap().to_string();
                let out = tm.encode_prompts(&[prompt], h, w, 0).unwrap();
                let want = &r[&format!("{case}.{prefix}prompt_embeds")];
                check(
                    &format!("{case} {prefix}prompt_embeds"),
                    &out.inputs["encoder_hidden_states"],
                    want,
                );
                // The pipeline's mask is all ones, so the transformer gets none.
                let mask: Vec<i64> = r[&format!("{case}.{prefix}prompt_embeds_mask")]
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert!(mask.iter().all(|&m| m == 1));
                assert!(!out.inputs.contains_key("encoder_hidden_states_mask"));
                let shapes: Vec<i64> = out.inputs["img_shapes"]
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let want: Vec<i64> = c["img_shapes"][0][0]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_i64().unwrap())
                    .collect();
                assert_eq!(shapes, want, "{case} img_shapes");
                let lat = r[&format!("{case}.latents_init")].dims().to_vec();
                assert_eq!(out.latent_shape, lat);
                assert_eq!(out.prompt_lengths[0][0].kept, mask.len());
            }
        }
    }

    #[test]
    fn truncation_padding_and_limits_follow_the_pipeline() {
        let a = adapter(&[Component::TextEncoders, Component::Vae]);
        let tm = a.text_mode().unwrap();
        let r = qwen_pipeline_reference();
        let full = &r["case1.prompt_embeds"];
        let json = reference_json();
        let long = json["cases"]["case1"]["prompt"]
            .as_str()
            .unwrap()
            .to_string();
        let short = json["cases"]["case0"]["prompt"]
            .as_str()
            .unwrap()
            .to_string();
        // max_sequence_length keeps the first tokens: prompt_embeds[:, :n].
        let out = tm
            .encode_prompts(std::slice::from_ref(&long), 64, 64, 20)
            .unwrap();
        check(
            "case1 truncated to 20",
            &out.inputs["encoder_hidden_states"],
            &full.narrow(1, 0, 20).unwrap(),
        );
        assert_eq!(out.prompt_lengths[0][0].untruncated, 83);
        assert_eq!(out.prompt_lengths[0][0].kept, 20);
        // Two prompts: zero padding to the longest and a mask.
        let out = tm.encode_prompts(&[short, long], 64, 64, 0).unwrap();
        let e = &out.inputs["encoder_hidden_states"];
        assert_eq!(e.dims(), [2, 83, 32]);
        check(
            "batch row 0",
            &e.narrow(0, 0, 1).unwrap().narrow(1, 0, 11).unwrap(),
            &r["case0.prompt_embeds"],
        );
        let pad = e.narrow(0, 0, 1).unwrap().narrow(1, 11, 72).unwrap();
        assert_eq!(
            pad.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        let mask: Vec<Vec<i64>> = out.inputs["encoder_hidden_states_mask"].to_vec2().unwrap();
        assert_eq!(mask[0].iter().sum::<i64>(), 11);
        assert_eq!(mask[1].iter().sum::<i64>(), 83);
        // Refusals: sizes, max_sequence_length, a prompt past the tokenizer's length.
        let err = |h, w, n, p: &str| {
            tm.encode_prompts(&[p.to_string()], h, w, n)
                .err()
                .unwrap()
                .to_string()
        };
        assert!(err(72, 64, 0, "a").contains("multiple of 16"));
        assert!(err(72, 64, 0, "a").contains("nearest accepted: 64 x 64"));
        assert!(err(64, 8192, 0, "a").contains("at most 4096"));
        assert!(err(64, 64, 1025, "a").contains("limit of 1024"));
        let huge = "a ".repeat(3000);
        let e = err(64, 64, 0, &huge);
        assert!(e.contains("more than the 1058"), "{e}");
        assert!(e.len() < 600, "{e}");
    }

    #[test]
    fn decode_gives_the_pipelines_pixels() {
        let a = adapter(&[Component::Vae]);
        let tm = a.text_mode().unwrap();
        let r = qwen_pipeline_reference();
        for (case, (h, w)) in [("case0", (64, 64)), ("case1", (96, 64))] {
            let png = tm
                .decode(&r[&format!("{case}.latents_final")], h, w)
                .unwrap();
            let img = image::load_from_memory(&png[0]).unwrap().to_rgb8();
            assert_eq!(img.dimensions(), (w as u32, h as u32));
            let want: Vec<u8> = r[&format!("{case}.image_uint8")]
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let off = img
                .into_raw()
                .iter()
                .zip(&want)
                .map(|(a, b)| a.abs_diff(*b))
                .max();
            assert!(off.unwrap() <= 1, "{case}: {off:?}");
        }
        // The transformer's stages were not loaded here.
        let err = a
            .run_blocks(&Tensors::new(), &Tensors::new(), 0..1)
            .err()
            .unwrap();
        assert!(err.to_string().contains("--components vae"), "{err}");
    }
}
