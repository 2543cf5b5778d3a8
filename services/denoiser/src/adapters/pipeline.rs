//! What every whole-pipeline adapter (a diffusers folder with `model_index.json`) shares: the
//! adapter itself (the transformer's stages when loaded, plus a model's text mode), reading a
//! component's config and weights, the checkpoint's scheduler config, the image size and
//! latent shape checks of text mode, and the error for a component this denoiser did not
//! load.

use std::ops::Range;

use crate::error::DenoiserError;
use crate::loader::PipelineSource;
use candle_core::Tensor;

use crate::registry::{
    Component, LoadOptions, ModelAdapter, ModelInfo, PreprocessOutput, Tensors, TextMode,
};
use crate::spec::InputError;

/// A load failure naming what was being loaded.
pub(crate) fn load_err(what: &str, e: impl std::fmt::Display) -> DenoiserError {
    DenoiserError::Load(format!("{what}: {e}"))
}

/// A client-input error.
pub(crate) fn invalid(msg: String) -> DenoiserError {
    InputError::Invalid(msg).into()
}

/// Whether `opts.components` asks for `c` (all components when it names none).
pub(crate) fn wants(opts: &LoadOptions, c: Component) -> bool {
    opts.components.is_empty() || opts.components.contains(&c)
}

/// The components loaded, in [`Component::ALL`] order.
pub(crate) fn loaded_components(opts: &LoadOptions) -> Vec<Component> {
    Component::ALL
        .into_iter()
        .filter(|c| wants(opts, *c))
        .collect()
}

/// Memory-maps a component's weights at the load dtype.
#[allow(unsafe_code)]
pub(crate) fn component_vb(
    pipeline: &PipelineSource,
    sub: &str,
    opts: &LoadOptions,
) -> Result<candle_nn::VarBuilder<'static>, DenoiserError> {
    let weights = pipeline.weights(sub)?;
    // SAFETY: as in `loader::var_builder`: the files are mapped read-only for the life of
    // the process.
    unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&weights, opts.dtype, &opts.device) }
        .map_err(|e| load_err(&format!("reading {sub} weights {weights:?}"), e))
}

/// Parses a component's `config.json`.
pub(crate) fn component_config<C: serde::de::DeserializeOwned>(
    pipeline: &PipelineSource,
    sub: &str,
) -> Result<C, DenoiserError> {
    let value = pipeline.json(&format!("{sub}/config.json"))?;
    serde_json::from_value(value).map_err(|e| {
        DenoiserError::Config(format!("{}/{sub}/config.json: {e}", pipeline.describe()))
    })
}

/// The checkpoint's `scheduler/scheduler_config.json`, empty when it ships none.
pub(crate) fn scheduler_config(pipeline: &PipelineSource) -> Result<String, DenoiserError> {
    match pipeline.file("scheduler/scheduler_config.json") {
        Ok(p) => std::fs::read_to_string(&p).map_err(|e| load_err(&p.display().to_string(), e)),
        Err(_) => Ok(String::new()),
    }
}

/// The error for an RPC that needs a component this denoiser did not load (`loaded`).
pub(crate) fn missing(loaded: &[Component], component: Component, rpc: &str) -> DenoiserError {
    let loaded: Vec<&str> = loaded.iter().map(|c| c.name()).collect();
    DenoiserError::Config(format!(
        "{rpc} needs the pipeline's {}, which this denoiser did not load (--components {})",
        component.name(),
        loaded.join(",")
    ))
}

/// Text mode's image-size rule: each side a multiple of `multiple` pixels (2 x the VAE's
/// factor, one packed latent token), at least one token and at most `max_side`.
pub(crate) struct SizeRule {
    /// The pipeline class, for messages.
    pub model_type: &'static str,
    /// `(height, width)` when a request gives 0.
    pub default: (usize, usize),
    /// Pixels per packed latent token side.
    pub multiple: usize,
    /// Largest side, pixels.
    pub max_side: usize,
}

impl SizeRule {
    /// The image size for a request (0 = default), or a clear error.
    pub(crate) fn resolve(
        &self,
        height: usize,
        width: usize,
    ) -> Result<(usize, usize), DenoiserError> {
        let h = if height == 0 { self.default.0 } else { height };
        let w = if width == 0 { self.default.1 } else { width };
        let (m, max) = (self.multiple, self.max_side);
        if h % m != 0 || w % m != 0 || h > max || w > max {
            let round = |v: usize| (v / m * m).clamp(m, max / m * m);
            return Err(invalid(format!(
                "height {h} x width {w}: {} needs each side a multiple of {m} pixels (2 x the \
                 VAE's factor) and at most {max} (default {} x {}); nearest accepted: {} x {}",
                self.model_type,
                self.default.0,
                self.default.1,
                round(h),
                round(w)
            )));
        }
        Ok((h, w))
    }
}

/// The packed latent grid `(rows, cols)` of a `height x width` image, after checking that
/// `latents` `[B, N, C]` has `N = rows * cols` tokens of `in_channels`.
pub(crate) fn latent_grid(
    latents: &Tensor,
    (h, w): (usize, usize),
    multiple: usize,
    in_channels: usize,
) -> Result<(usize, usize), DenoiserError> {
    let (rows, cols) = (h / multiple, w / multiple);
    let (b, n, c) = latents.dims3()?;
    if n != rows * cols || c != in_channels {
        return Err(invalid(format!(
            "latents [{b}, {n}, {c}] do not fit a {h} x {w} image: expected [B, {}, \
             {in_channels}]",
            rows * cols
        )));
    }
    Ok((rows, cols))
}

/// A pipeline served from a diffusers folder: the transformer `T` behind the three-stage split
/// when this denoiser loaded it, and the text mode `M` (text encoders, VAE) built from the
/// folder's other components.
pub struct PipelineAdapter<T, M> {
    /// The transformer, when `--components` includes it.
    pub(crate) transformer: Option<T>,
    /// Prompt encoding and decoding.
    pub(crate) text_mode: M,
    /// The transformer's contracts, the components loaded, the scheduler config.
    pub(crate) info: ModelInfo,
}

impl<T: ModelAdapter, M> PipelineAdapter<T, M> {
    fn transformer(&self, rpc: &str) -> Result<&T, DenoiserError> {
        self.transformer
            .as_ref()
            .ok_or_else(|| missing(&self.info.components, Component::Transformer, rpc))
    }
}

impl<T: ModelAdapter, M: TextMode + Send> ModelAdapter for PipelineAdapter<T, M> {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn text_mode(&self) -> Option<&dyn TextMode> {
        Some(&self.text_mode)
    }

    fn preprocess(&self, inputs: &Tensors) -> Result<PreprocessOutput, DenoiserError> {
        self.transformer("Preprocess")?.preprocess(inputs)
    }

    fn run_blocks(
        &self,
        streams: &Tensors,
        context: &Tensors,
        blocks: Range<usize>,
    ) -> Result<Tensors, DenoiserError> {
        self.transformer("RunBlocks")?
            .run_blocks(streams, context, blocks)
    }

    fn run_blocks_attention(
        &self,
        streams: &Tensors,
        context: &Tensors,
        blocks: Range<usize>,
        given: Option<&Tensors>,
    ) -> Result<(Tensors, Tensors), DenoiserError> {
        self.transformer("RunBlocks")?
            .run_blocks_attention(streams, context, blocks, given)
    }

    fn postprocess(
        &self,
        hidden_states: &Tensor,
        context: &Tensors,
    ) -> Result<Tensor, DenoiserError> {
        self.transformer("Postprocess")?
            .postprocess(hidden_states, context)
    }
}
