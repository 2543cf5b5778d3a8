//! The `QwenImagePipeline` adapter: maps named tensors onto [`QwenImage`]'s typed stages.
//!
//! `img_shapes` travels as an integer tensor `[B, 3]` (frames, height, width in latent
//! patches); every row must be the same (diffusers uses the first for the whole batch).
//! Context carried between stages: `temb`, `img_shapes`, and `encoder_hidden_states_mask`
//! when given; RunBlocks rebuilds the rotary tables and the attention mask from them.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};

use crate::error::DenoiserError;
use crate::loader::{ModelFiles, parse_config, var_builder};
use crate::models::qwen_image::{Config, QwenImage};
use crate::registry::{
    DualStreamContract, LoadOptions, ModelAdapter, ModelInfo, PreprocessOutput, TEXT_STREAM,
    Tensors, attention_lists, dual_streams, embedded, hooked_result, kept_rope, required,
};
use crate::spec::{Dim, InputError, Kind, TensorSpec};

/// `QwenImagePipeline` served from a diffusers `QwenImageTransformer2DModel` checkpoint.
pub struct QwenImageAdapter {
    model: QwenImage,
    info: ModelInfo,
}

/// Loads a Qwen-Image checkpoint (registry entry point): a whole diffusers pipeline folder
/// serves text mode too ([`qwen_image_pipeline`](crate::adapters::qwen_image_pipeline)), a
/// bare transformer serves model-native inputs.
pub fn load(
    files: &ModelFiles,
    opts: &LoadOptions,
) -> Result<Box<dyn ModelAdapter>, DenoiserError> {
    if let Some(pipeline) = &files.pipeline {
        return crate::adapters::qwen_image_pipeline::load(files, pipeline, opts);
    }
    Ok(Box::new(load_transformer(files, opts)?))
}

/// Builds the transformer alone.
pub fn load_transformer(
    files: &ModelFiles,
    opts: &LoadOptions,
) -> Result<QwenImageAdapter, DenoiserError> {
    let config: Config = parse_config(files, Config::validate)?;
    let vb = var_builder(files, opts)?;
    let model = QwenImage::new(&config, vb)
        .map_err(|e| DenoiserError::Load(format!("building QwenImageTransformer2DModel: {e}")))?;
    Ok(QwenImageAdapter::new(model, files.config_json.clone()))
}

fn sym(s: &'static str) -> Dim {
    Dim::Sym(s)
}

impl QwenImageAdapter {
    /// Wraps a built model; `config_json` is reported by Describe.
    pub fn new(model: QwenImage, config_json: String) -> Self {
        let info = Self::contract(model.config(), config_json, model.dtype(), model.device());
        Self { model, info }
    }

    /// The tensor contracts of a Qwen-Image transformer with this config (also for a
    /// denoiser that serves only the pipeline's other components).
    pub fn contract(c: &Config, config_json: String, dtype: DType, device: &Device) -> ModelInfo {
        let img_shapes = TensorSpec::new(
            "img_shapes",
            vec![sym("B"), Dim::Fixed(3, "")],
            Kind::Numeric,
            "latent grid per sample (frames, height, width) in patches; rows must be equal",
        );
        let mask = TensorSpec::new(
            "encoder_hidden_states_mask",
            vec![sym("B"), sym("T")],
            Kind::Numeric,
            "text mask, 1 = valid, 0 = padding (absent: all valid)",
        )
        .optional();
        let inputs = vec![
            TensorSpec::new(
                "hidden_states",
                vec![sym("B"), sym("N"), Dim::Fixed(c.in_channels, "in_channels")],
                Kind::Float,
                "packed latents [B, N, in_channels]",
            ),
            TensorSpec::new(
                "encoder_hidden_states",
                vec![
                    sym("B"),
                    sym("T"),
                    Dim::Fixed(c.joint_attention_dim, "joint_attention_dim"),
                ],
                Kind::Float,
                "text encoder hidden states [B, T, joint_attention_dim]",
            ),
            mask.clone(),
            TensorSpec::new(
                "timestep",
                vec![sym("B")],
                Kind::Float,
                "sigma in [0, 1] per sample",
            ),
            img_shapes.clone(),
        ];
        DualStreamContract {
            model_type: "QwenImagePipeline",
            architecture: "QwenImageTransformer2DModel",
            inner_dim: c.inner_dim(),
            out_dim: c.out_dim(),
            preprocess_inputs: inputs,
            temb_description: "conditioning vector (timestep embedding)",
            extra_context: vec![img_shapes, mask],
            indicator_description:
                "TeaCache indicator: img_norm1(hidden) modulated by img_mod(temb) chunk 0 of block 0",
            num_blocks: c.num_layers,
        }
        .info(config_json, dtype, device.clone())
    }
}

/// The single (frames, height, width) of a `[B, 3]` `img_shapes`, checked against `N` tokens.
fn img_shape(t: &Tensor, tokens: usize) -> Result<(usize, usize, usize), DenoiserError> {
    let rows: Vec<Vec<f64>> = t.to_dtype(DType::F64)?.to_vec2()?;
    let bad =
        |why: String| -> DenoiserError { InputError::Invalid(format!("img_shapes: {why}")).into() };
    let first = rows.first().ok_or_else(|| bad("empty".into()))?.clone();
    if rows.iter().any(|r| *r != first) {
        return Err(bad(format!(
            "every sample must have the same (frames, height, width); got {rows:?}"
        )));
    }
    let dims: Vec<usize> = first
        .iter()
        .map(|&v| {
            if v.fract() == 0.0 && (1.0..=1e6).contains(&v) {
                Ok(v as usize)
            } else {
                Err(bad(format!(
                    "values must be positive integers, got {first:?}"
                )))
            }
        })
        .collect::<Result<_, _>>()?;
    let [f, h, w] = dims[..] else {
        return Err(bad(format!("expected 3 values per row, got {first:?}")));
    };
    if f * h * w != tokens {
        return Err(bad(format!(
            "({f}, {h}, {w}) covers {} tokens but hidden_states has N = {tokens}",
            f * h * w
        )));
    }
    Ok((f, h, w))
}

impl QwenImageAdapter {
    /// Preprocess with the text stream `text` already embedded.
    fn preprocess_with(
        &self,
        inputs: &Tensors,
        text: &Tensor,
    ) -> Result<PreprocessOutput, DenoiserError> {
        let hidden_states = required(inputs, "hidden_states")?;
        let shapes = required(inputs, "img_shapes")?.clone();
        img_shape(&shapes, hidden_states.dim(1)?)?;
        let pre =
            self.model
                .preprocess_embedded(hidden_states, required(inputs, "timestep")?, text)?;
        let mut context = Tensors::from([
            ("temb".to_string(), pre.temb),
            ("img_shapes".to_string(), shapes),
        ]);
        if let Some(mask) = inputs.get("encoder_hidden_states_mask") {
            context.insert("encoder_hidden_states_mask".to_string(), mask.clone());
        }
        Ok(PreprocessOutput {
            modulated_input: pre.modulated_input,
            streams: dual_streams(pre.hidden_states, pre.encoder_hidden_states),
            context,
        })
    }

    /// The blocks `blocks` over the streams with the rotary tables `rope`.
    fn blocks_with(
        &self,
        streams: &Tensors,
        context: &Tensors,
        rope: &(Tensor, Tensor),
        blocks: Range<usize>,
    ) -> Result<Tensors, DenoiserError> {
        let (img, txt) = self.model.run_blocks(
            required(streams, "hidden_states")?,
            required(streams, "encoder_hidden_states")?,
            required(context, "temb")?,
            rope,
            context.get("encoder_hidden_states_mask"),
            blocks,
        )?;
        Ok(dual_streams(img, txt))
    }
}

impl ModelAdapter for QwenImageAdapter {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn preprocess(&self, inputs: &Tensors) -> Result<PreprocessOutput, DenoiserError> {
        let text = self
            .model
            .embed_text(required(inputs, "encoder_hidden_states")?)?;
        self.preprocess_with(inputs, &text)
    }

    fn embed_conditioning(&self, inputs: &Tensors) -> Result<Tensors, DenoiserError> {
        let text = self
            .model
            .embed_text(required(inputs, "encoder_hidden_states")?)?;
        let tokens = required(inputs, "hidden_states")?.dim(1)?;
        let shape = img_shape(required(inputs, "img_shapes")?, tokens)?;
        let rope = self.model.rope(shape, text.dim(1)?)?;
        Ok(embedded(text, rope, Tensors::new()))
    }

    fn preprocess_embedded(
        &self,
        inputs: &Tensors,
        embedded: &Tensors,
    ) -> Result<PreprocessOutput, DenoiserError> {
        self.preprocess_with(inputs, required(embedded, TEXT_STREAM)?)
    }

    fn run_blocks(
        &self,
        streams: &Tensors,
        context: &Tensors,
        blocks: Range<usize>,
    ) -> Result<Tensors, DenoiserError> {
        let img = required(streams, "hidden_states")?;
        let txt = required(streams, "encoder_hidden_states")?;
        let shape = img_shape(required(context, "img_shapes")?, img.dim(1)?)?;
        let rope = self.model.rope(shape, txt.dim(1)?)?;
        self.blocks_with(streams, context, &rope, blocks)
    }

    fn run_blocks_embedded(
        &self,
        streams: &Tensors,
        context: &Tensors,
        embedded: &Tensors,
        blocks: Range<usize>,
    ) -> Result<Tensors, DenoiserError> {
        self.blocks_with(streams, context, &kept_rope(embedded)?, blocks)
    }

    fn run_blocks_attention(
        &self,
        streams: &Tensors,
        context: &Tensors,
        blocks: Range<usize>,
        given: Option<&Tensors>,
    ) -> Result<(Tensors, Tensors), DenoiserError> {
        let lists = given
            .map(|g| attention_lists(g, blocks.clone(), |_| 2))
            .transpose()?;
        let img = required(streams, "hidden_states")?;
        let txt = required(streams, "encoder_hidden_states")?;
        let shape = img_shape(required(context, "img_shapes")?, img.dim(1)?)?;
        let rope = self.model.rope(shape, txt.dim(1)?)?;
        let result = self.model.run_blocks_hooked(
            img,
            txt,
            required(context, "temb")?,
            &rope,
            context.get("encoder_hidden_states_mask"),
            blocks.clone(),
            lists.as_deref(),
        );
        hooked_result(result, given.is_some(), blocks)
    }

    fn postprocess(
        &self,
        hidden_states: &Tensor,
        context: &Tensors,
    ) -> Result<Tensor, DenoiserError> {
        Ok(self
            .model
            .postprocess(hidden_states, required(context, "temb")?)?)
    }
}
