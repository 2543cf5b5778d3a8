//! `TinyFluxPipeline`: teaserve's embedded text-to-image model. The FLUX architecture (the
//! same [`FluxAdapter`] code path) in RGB pixel space — tokens are `p x p` pixel patches —
//! with a word-embedding text encoder ([`TinyTextEncoder`]) and a decoder that is just
//! unpatchifying to pixels. Trained by `tools/train`; the weights ship in the repository
//! (`models/tiny-flux`) and are compiled into the denoiser.

use std::ops::Range;

use candle_core::{DType, Tensor};

use crate::adapters::flux::FluxAdapter;
use crate::error::DenoiserError;
use crate::loader::{ModelFiles, parse_config, var_builder};
use crate::models::flux::{Config, Flux};
use crate::models::tiny_text::{MAX_TOKENS, TinyTextEncoder, position_ids, tokenize, unpack};
use crate::registry::{
    LoadOptions, ModelAdapter, ModelInfo, PreprocessOutput, PromptInputs, Tensors, TextMode,
};
use crate::spec::InputError;

/// Largest image side accepted in text mode, pixels.
pub const MAX_SIDE: usize = 256;

/// The embedded model: FLUX in pixel space with its own text encoder.
pub struct TinyFluxAdapter {
    flux: FluxAdapter,
    text: TinyTextEncoder,
    patch: usize,
    default_side: usize,
    info: ModelInfo,
}

/// Loads the embedded model (registry entry point). `config.json` carries
/// `teaserve.pixel_patch` and `teaserve.image_size` besides the FLUX config.
pub fn load(
    files: &ModelFiles,
    opts: &LoadOptions,
) -> Result<Box<dyn ModelAdapter>, DenoiserError> {
    let config: Config = parse_config(files, Config::validate)?;
    let extra: serde_json::Value = serde_json::from_str(&files.config_json)
        .map_err(|e| DenoiserError::Config(format!("config.json: {e}")))?;
    let field = |k: &str| {
        extra["teaserve"][k]
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| {
                DenoiserError::Config(format!(
                    "{}: TinyFluxPipeline needs teaserve.{k} in config.json",
                    files.config_path.display()
                ))
            })
    };
    let (patch, side) = (field("pixel_patch")?, field("image_size")?);
    if patch == 0 || side % patch != 0 || config.in_channels != 3 * patch * patch {
        return Err(DenoiserError::Config(format!(
            "teaserve.pixel_patch {patch} and image_size {side} do not fit in_channels {}",
            config.in_channels
        )));
    }
    let vb = var_builder(files, opts)?;
    let model = Flux::new(&config, vb.clone())
        .map_err(|e| DenoiserError::Load(format!("building the embedded FLUX: {e}")))?;
    let text = TinyTextEncoder::new(config.joint_attention_dim, vb.pp("text_encoder"))
        .map_err(|e| DenoiserError::Load(format!("building the text encoder: {e}")))?;
    let flux = FluxAdapter::new(model, files.config_json.clone());
    let mut info = flux.info().clone();
    info.model_type = "TinyFluxPipeline";
    info.text_mode = Some((side, side));
    info.max_sequence_length = MAX_TOKENS;
    Ok(Box::new(TinyFluxAdapter {
        flux,
        text,
        patch,
        default_side: side,
        info,
    }))
}

fn invalid(msg: String) -> DenoiserError {
    InputError::Invalid(msg).into()
}

impl TinyFluxAdapter {
    fn size(&self, height: usize, width: usize) -> Result<(usize, usize), DenoiserError> {
        let h = if height == 0 {
            self.default_side
        } else {
            height
        };
        let w = if width == 0 { self.default_side } else { width };
        let p = self.patch;
        if h % p != 0 || w % p != 0 || h > MAX_SIDE || w > MAX_SIDE {
            return Err(invalid(format!(
                "height {h} x width {w}: each must be a multiple of {p} pixels and at most \
                 {MAX_SIDE} (default {0} x {0})",
                self.default_side
            )));
        }
        Ok((h, w))
    }
}

impl ModelAdapter for TinyFluxAdapter {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn text_mode(&self) -> Option<&dyn TextMode> {
        Some(self)
    }

    fn preprocess(&self, inputs: &Tensors) -> Result<PreprocessOutput, DenoiserError> {
        self.flux.preprocess(inputs)
    }

    fn embed_conditioning(&self, inputs: &Tensors) -> Result<Tensors, DenoiserError> {
        self.flux.embed_conditioning(inputs)
    }

    fn preprocess_embedded(
        &self,
        inputs: &Tensors,
        embedded: &Tensors,
    ) -> Result<PreprocessOutput, DenoiserError> {
        self.flux.preprocess_embedded(inputs, embedded)
    }

    fn run_blocks_embedded(
        &self,
        streams: &Tensors,
        context: &Tensors,
        embedded: &Tensors,
        blocks: Range<usize>,
    ) -> Result<Tensors, DenoiserError> {
        self.flux
            .run_blocks_embedded(streams, context, embedded, blocks)
    }

    fn run_blocks(
        &self,
        streams: &Tensors,
        context: &Tensors,
        blocks: Range<usize>,
    ) -> Result<Tensors, DenoiserError> {
        self.flux.run_blocks(streams, context, blocks)
    }

    fn run_blocks_attention(
        &self,
        streams: &Tensors,
        context: &Tensors,
        blocks: Range<usize>,
        given: Option<&Tensors>,
    ) -> Result<(Tensors, Tensors), DenoiserError> {
        self.flux
            .run_blocks_attention(streams, context, blocks, given)
    }

    fn postprocess(
        &self,
        hidden_states: &Tensor,
        context: &Tensors,
    ) -> Result<Tensor, DenoiserError> {
        self.flux.postprocess(hidden_states, context)
    }
}

impl TextMode for TinyFluxAdapter {
    fn default_size(&self) -> (usize, usize) {
        (self.default_side, self.default_side)
    }

    fn encode_prompts(
        &self,
        prompts: &[String],
        height: usize,
        width: usize,
        max_sequence_length: usize,
    ) -> Result<PromptInputs, DenoiserError> {
        if prompts.is_empty() {
            return Err(invalid("EncodePrompt needs at least one prompt".into()));
        }
        if max_sequence_length != 0 && max_sequence_length != MAX_TOKENS {
            return Err(invalid(format!(
                "max_sequence_length {max_sequence_length}: TinyFluxPipeline's text length is \
                 fixed at {MAX_TOKENS}; leave it unset (0)"
            )));
        }
        let (h, w) = self.size(height, width)?;
        let tokens = prompts
            .iter()
            .map(|p| {
                tokenize(p)
                    .map_err(|e| invalid(format!("prompt \"{}\": {e}", teaserve_proto::quote(p))))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let device = &self.info.device;
        let (states, pooled) = self.text.encode(&tokens, device)?;
        let (img_ids, txt_ids) = position_ids(h / self.patch, w / self.patch, device)?;
        debug_assert_eq!(txt_ids.dim(0)?, MAX_TOKENS);
        let p = self.patch;
        Ok(PromptInputs {
            inputs: Tensors::from([
                ("encoder_hidden_states".to_string(), states),
                ("pooled_projections".to_string(), pooled),
                ("img_ids".to_string(), img_ids),
                ("txt_ids".to_string(), txt_ids),
            ]),
            latent_shape: vec![prompts.len(), (h / p) * (w / p), 3 * p * p],
            height: h,
            width: w,
            max_sequence_length: MAX_TOKENS,
            prompt_lengths: Vec::new(),
        })
    }

    fn decode(
        &self,
        latents: &Tensor,
        height: usize,
        width: usize,
    ) -> Result<Vec<Vec<u8>>, DenoiserError> {
        let (h, w) = self.size(height, width)?;
        let p = self.patch;
        let (b, n, c) = latents.dims3()?;
        if n != (h / p) * (w / p) || c != 3 * p * p {
            return Err(invalid(format!(
                "latents [{b}, {n}, {c}] do not fit a {h} x {w} image: expected [B, {}, {}]",
                (h / p) * (w / p),
                3 * p * p
            )));
        }
        let pixels = unpack(&latents.to_dtype(DType::F32)?, h, w, p)?
            .clamp(-1f32, 1f32)?
            .affine(127.5, 127.5)?
            .round()?
            .permute((0, 2, 3, 1))?
            .to_dtype(DType::U8)?;
        (0..b)
            .map(|i| crate::adapters::png(pixels.get(i)?.flatten_all()?.to_vec1()?, h, w))
            .collect()
    }
}
