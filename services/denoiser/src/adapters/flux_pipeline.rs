//! `FluxPipeline` from a whole diffusers folder (FLUX.1-dev / FLUX.1-schnell layout): the
//! transformer behind the three-stage split ([`FluxAdapter`]) plus text mode as diffusers'
//! `FluxPipeline` computes it: CLIP's pooled embedding and T5's hidden states from the
//! checkpoint's own tokenizers, the packed latent layout and image ids for the requested
//! size, and the VAE decoder to RGB.
//!
//! A denoiser may load only some components (`--components`): a large T5 can live on another
//! GPU than the transformer, and the controller routes EncodePrompt / Decode to a denoiser
//! that has them.

use candle_core::{DType, Device, Tensor};

use crate::adapters::flux::{FluxAdapter, load_transformer};
use crate::adapters::pipeline::{
    PipelineAdapter, SizeRule, component_config, component_vb, invalid, latent_grid, load_err,
    loaded_components, missing, scheduler_config, wants,
};
use crate::error::DenoiserError;
use crate::loader::{ModelFiles, PipelineSource, parse_config};
use crate::models::autoencoder_kl::{self, Decoder};
use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
use crate::models::flux::Config;
use crate::models::t5_encoder::{T5Config, T5Encoder};
use crate::models::text_tokenizers::{ClipTokenizer, T5Tokenizer};
use crate::registry::{
    Component, LoadOptions, ModelAdapter, PromptInputs, PromptLength, Tensors, TextMode,
};

/// `FluxPipeline.__call__`'s default size: `default_sample_size` 128 x VAE factor 8.
const DEFAULT_SIDE: usize = 1024;
/// Largest image side accepted, pixels (FLUX's 4096-token schedule range is 1024 x 1024;
/// larger sizes extrapolate `mu` as diffusers does, up to this bound).
const MAX_SIDE: usize = 4096;
/// `max_sequence_length` default and limit (T5's 512 positions in FLUX).
const MAX_SEQUENCE_LENGTH: usize = 512;

/// The pipeline's tokenizers and text encoders.
struct TextEncoders {
    clip_tokenizer: ClipTokenizer,
    clip: ClipTextModel,
    t5_tokenizer: T5Tokenizer,
    t5: T5Encoder,
}

/// The VAE decoder with its latent scaling.
struct Vae {
    config: autoencoder_kl::Config,
    decoder: Decoder,
    /// `2^(len(block_out_channels) - 1)`: pixels per latent pixel.
    scale_factor: usize,
}

/// The FLUX pipeline's text mode: whichever of its text encoders and VAE this denoiser
/// loaded.
pub struct FluxTextMode {
    text: Option<TextEncoders>,
    vae: Option<Vae>,
    /// Channels of a packed latent token (the transformer's `in_channels`).
    in_channels: usize,
    /// Components this denoiser loaded (for the error naming a missing one).
    components: Vec<Component>,
    /// Where the encoders' outputs are made.
    device: candle_core::Device,
}

/// A FLUX pipeline: whichever components this denoiser loaded.
pub type FluxPipelineAdapter = PipelineAdapter<FluxAdapter, FluxTextMode>;

/// Loads the components of a FLUX pipeline folder named by `opts.components`.
pub fn load(
    files: &ModelFiles,
    pipeline: &PipelineSource,
    opts: &LoadOptions,
) -> Result<Box<dyn ModelAdapter>, DenoiserError> {
    let wants = |c| wants(opts, c);
    let config: Config = parse_config(files, Config::validate)?;
    let transformer = if wants(Component::Transformer) {
        Some(load_transformer(files, opts)?)
    } else {
        None
    };
    let text = if wants(Component::TextEncoders) {
        Some(load_text_encoders(pipeline, opts)?)
    } else {
        None
    };
    let vae = if wants(Component::Vae) {
        Some(load_vae(pipeline, opts)?)
    } else {
        None
    };
    let mut info =
        FluxAdapter::contract(&config, files.config_json.clone(), opts.dtype, &opts.device);
    info.text_mode = Some((DEFAULT_SIDE, DEFAULT_SIDE));
    info.max_sequence_length = MAX_SEQUENCE_LENGTH;
    info.components = loaded_components(opts);
    info.scheduler_config_json = scheduler_config(pipeline)?;
    Ok(Box::new(PipelineAdapter {
        transformer,
        text_mode: FluxTextMode {
            text,
            vae,
            in_channels: config.in_channels,
            components: info.components.clone(),
            device: opts.device.clone(),
        },
        info,
    }))
}

fn load_text_encoders(
    pipeline: &PipelineSource,
    opts: &LoadOptions,
) -> Result<TextEncoders, DenoiserError> {
    let max_length = pipeline
        .json("tokenizer/tokenizer_config.json")
        .ok()
        .and_then(|c| c["model_max_length"].as_u64())
        .map_or(77, |n| n as usize);
    let clip_tokenizer = ClipTokenizer::from_files(
        &pipeline.file("tokenizer/vocab.json")?,
        &pipeline.file("tokenizer/merges.txt")?,
        max_length,
    )
    .map_err(|e| load_err("tokenizer/", e))?;
    let t5_tokenizer = T5Tokenizer::from_file(&pipeline.file("tokenizer_2/tokenizer.json")?)
        .map_err(|e| load_err("tokenizer_2/", e))?;
    let clip_config: ClipTextConfig = component_config(pipeline, "text_encoder")?;
    let clip = ClipTextModel::new(&clip_config, component_vb(pipeline, "text_encoder", opts)?)
        .map_err(|e| load_err("building the CLIP text encoder (text_encoder/)", e))?;
    let t5_config: T5Config = component_config(pipeline, "text_encoder_2")?;
    let t5 = T5Encoder::new(&t5_config, component_vb(pipeline, "text_encoder_2", opts)?)
        .map_err(|e| load_err("building the T5 encoder (text_encoder_2/)", e))?;
    Ok(TextEncoders {
        clip_tokenizer,
        clip,
        t5_tokenizer,
        t5,
    })
}

fn load_vae(pipeline: &PipelineSource, opts: &LoadOptions) -> Result<Vae, DenoiserError> {
    let config: autoencoder_kl::Config = component_config(pipeline, "vae")?;
    config.validate().map_err(|e| {
        DenoiserError::Config(format!("{}/vae/config.json: {e}", pipeline.describe()))
    })?;
    let decoder = Decoder::new(&config, component_vb(pipeline, "vae", opts)?)
        .map_err(|e| load_err("building the VAE decoder (vae/)", e))?;
    let scale_factor = config.scale_factor();
    Ok(Vae {
        config,
        decoder,
        scale_factor,
    })
}

impl FluxTextMode {
    /// Pixels per packed latent token side: 2 x the VAE factor (16 for FLUX).
    fn multiple(&self) -> usize {
        2 * self.vae.as_ref().map_or(8, |v| v.scale_factor)
    }

    /// The image size for a request (0 = default), refused unless a multiple of 16.
    fn size(&self, height: usize, width: usize) -> Result<(usize, usize), DenoiserError> {
        SizeRule {
            model_type: "FluxPipeline",
            default: (DEFAULT_SIDE, DEFAULT_SIDE),
            multiple: self.multiple(),
            max_side: MAX_SIDE,
        }
        .resolve(height, width)
    }
}

/// `img_ids` of FluxPipeline's `_prepare_latent_image_ids`: `(0, row, col)` over the token
/// grid, row-major; `txt_ids` are zeros.
fn position_ids(
    rows: usize,
    cols: usize,
    text: usize,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let img: Vec<f32> = (0..rows * cols)
        .flat_map(|i| [0.0, (i / cols) as f32, (i % cols) as f32])
        .collect();
    Ok((
        Tensor::from_vec(img, (rows * cols, 3), device)?,
        Tensor::zeros((text, 3), DType::F32, device)?,
    ))
}

impl TextEncoders {
    /// CLIP's pooled embeddings `[B, 768]` and T5's hidden states `[B, L, 4096]`.
    fn encode(
        &self,
        prompts: &[String],
        max_sequence_length: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor, Vec<Vec<PromptLength>>), DenoiserError> {
        let token_err = |e: crate::models::text_tokenizers::TokenizerError| invalid(e.to_string());
        let (mut clip_ids, mut t5_ids, mut lengths) = (Vec::new(), Vec::new(), Vec::new());
        for p in prompts {
            let c = self.clip_tokenizer.encode(p).map_err(token_err)?;
            let t = self
                .t5_tokenizer
                .encode(p, max_sequence_length)
                .map_err(token_err)?;
            lengths.push(vec![
                PromptLength {
                    encoder: "clip",
                    untruncated: c.untruncated,
                    kept: c.ids.len(),
                },
                PromptLength {
                    encoder: "t5",
                    untruncated: t.untruncated,
                    kept: t.ids.len(),
                },
            ]);
            clip_ids.extend(c.ids);
            t5_ids.extend(t.ids);
        }
        let b = prompts.len();
        let clip_ids = Tensor::from_vec(clip_ids, (b, self.clip_tokenizer.max_length()), device)?;
        let t5_ids = Tensor::from_vec(t5_ids, (b, max_sequence_length), device)?;
        let pooled = self.clip.forward(&clip_ids)?.pooled;
        let states = self.t5.forward(&t5_ids)?.last_hidden_state;
        Ok((pooled, states, lengths))
    }
}

impl TextMode for FluxTextMode {
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
        let max_len = match max_sequence_length {
            0 => MAX_SEQUENCE_LENGTH,
            n if n > MAX_SEQUENCE_LENGTH => {
                return Err(invalid(format!(
                    "max_sequence_length {n} is above FluxPipeline's limit of \
                     {MAX_SEQUENCE_LENGTH} (T5's positions); use 1 to {MAX_SEQUENCE_LENGTH}, or \
                     0 for the default {MAX_SEQUENCE_LENGTH}"
                )));
            }
            n => n,
        };
        let (h, w) = self.size(height, width)?;
        let device = &self.device;
        let (pooled, states, prompt_lengths) = text.encode(prompts, max_len, device)?;
        let m = self.multiple();
        let (rows, cols) = (h / m, w / m);
        let (img_ids, txt_ids) = position_ids(rows, cols, max_len, device)?;
        Ok(PromptInputs {
            inputs: Tensors::from([
                ("encoder_hidden_states".to_string(), states),
                ("pooled_projections".to_string(), pooled),
                ("img_ids".to_string(), img_ids),
                ("txt_ids".to_string(), txt_ids),
            ]),
            latent_shape: vec![prompts.len(), rows * cols, self.in_channels],
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
            autoencoder_kl::unpack_latents(&latents.to_dtype(DType::F32)?, 2 * rows, 2 * cols)?;
        let z = autoencoder_kl::latents_to_decoder_input(&unpacked, &vae.config)?;
        let decoded = vae.decoder.decode(&z)?;
        debug_assert_eq!(decoded.dims4()?.2, 2 * rows * vae.scale_factor);
        autoencoder_kl::to_rgb8(&decoded)?
            .into_iter()
            .map(|rgb| crate::adapters::png(rgb, h, w))
            .collect()
    }
}
