//! The `FluxPipeline` adapter: maps named tensors onto [`Flux`]'s typed stages.
//!
//! Context carried between stages: `temb` `[B, D]` and the position ids `txt_ids` `[T, 3]`,
//! `img_ids` `[N, 3]` from which RunBlocks rebuilds the rotary tables (a few KiB on the wire
//! instead of the tables' `(T+N) x head_dim` floats).

use std::ops::Range;

use candle_core::Tensor;

use crate::error::DenoiserError;
use crate::loader::{ModelFiles, parse_config, var_builder};
use crate::models::flux::{ConditioningTerms, Config, Flux, Inputs, Preprocessed};
use crate::registry::{
    DualStreamContract, LoadOptions, ModelAdapter, ModelInfo, PreprocessOutput, TEXT_STREAM,
    Tensors, attention_lists, dual_streams, embedded, hooked_result, kept_rope, required,
};
use crate::spec::{Dim, Kind, TensorSpec};

/// `FluxPipeline` served from a diffusers `FluxTransformer2DModel` checkpoint.
pub struct FluxAdapter {
    model: Flux,
    info: ModelInfo,
}

/// Loads a FLUX checkpoint (registry entry point): a whole diffusers pipeline folder serves
/// text mode too ([`flux_pipeline`](crate::adapters::flux_pipeline)), a bare transformer
/// serves model-native inputs.
pub fn load(
    files: &ModelFiles,
    opts: &LoadOptions,
) -> Result<Box<dyn ModelAdapter>, DenoiserError> {
    if let Some(pipeline) = &files.pipeline {
        return crate::adapters::flux_pipeline::load(files, pipeline, opts);
    }
    Ok(Box::new(load_transformer(files, opts)?))
}

/// Builds the transformer alone.
pub fn load_transformer(
    files: &ModelFiles,
    opts: &LoadOptions,
) -> Result<FluxAdapter, DenoiserError> {
    let config: Config = parse_config(files, Config::validate)?;
    let vb = var_builder(files, opts)?;
    let model = Flux::new(&config, vb)
        .map_err(|e| DenoiserError::Load(format!("building FluxTransformer2DModel: {e}")))?;
    Ok(FluxAdapter::new(model, files.config_json.clone()))
}

/// Names of what [`FluxAdapter`] derives from a session's conditioning alone
/// ([`ModelAdapter::embed_conditioning`]) besides the text stream and the rotary tables.
const POOLED_TEXT: &str = "pooled_text";
const GUIDANCE: &str = "guidance_embedding";

/// The named inputs as [`Flux`]'s typed inputs.
fn typed(inputs: &Tensors) -> Result<Inputs, DenoiserError> {
    Ok(Inputs {
        hidden_states: required(inputs, "hidden_states")?.clone(),
        encoder_hidden_states: required(inputs, "encoder_hidden_states")?.clone(),
        pooled_projections: required(inputs, "pooled_projections")?.clone(),
        timestep: required(inputs, "timestep")?.clone(),
        img_ids: required(inputs, "img_ids")?.clone(),
        txt_ids: required(inputs, "txt_ids")?.clone(),
        guidance: inputs.get("guidance").cloned(),
    })
}

/// Preprocess's typed result as named streams and context (the position ids travel as
/// context, RunBlocks rebuilds the rotary tables from them).
fn output(pre: Preprocessed, img_ids: Tensor, txt_ids: Tensor) -> PreprocessOutput {
    PreprocessOutput {
        modulated_input: pre.modulated_input,
        streams: dual_streams(pre.hidden_states, pre.encoder_hidden_states),
        context: Tensors::from([
            ("temb".to_string(), pre.temb),
            ("img_ids".to_string(), img_ids),
            ("txt_ids".to_string(), txt_ids),
        ]),
    }
}

fn sym(s: &'static str) -> Dim {
    Dim::Sym(s)
}

impl FluxAdapter {
    /// Wraps a built model; `config_json` is reported by Describe.
    pub fn new(model: Flux, config_json: String) -> Self {
        let info = Self::contract(model.config(), config_json, model.dtype(), model.device());
        Self { model, info }
    }

    /// The tensor contracts of a FLUX transformer with this config (also for a denoiser that
    /// serves only the pipeline's other components).
    pub fn contract(
        c: &Config,
        config_json: String,
        dtype: candle_core::DType,
        device: &candle_core::Device,
    ) -> ModelInfo {
        let ids = |name, tokens, what| {
            TensorSpec::new(
                name,
                vec![sym(tokens), Dim::Fixed(3, "")],
                Kind::Numeric,
                what,
            )
        };
        let img_ids = ids("img_ids", "N", "image position ids (0, row, col)");
        let txt_ids = ids("txt_ids", "T", "text position ids (zeros)");
        let fixed = |n, why| Dim::Fixed(n, why);
        let mut inputs = vec![
            TensorSpec::new(
                "hidden_states",
                vec![sym("B"), sym("N"), fixed(c.in_channels, "in_channels")],
                Kind::Float,
                "packed latents [B, N, in_channels]",
            ),
            TensorSpec::new(
                "encoder_hidden_states",
                vec![
                    sym("B"),
                    sym("T"),
                    fixed(c.joint_attention_dim, "joint_attention_dim"),
                ],
                Kind::Float,
                "text encoder hidden states [B, T, joint_attention_dim]",
            ),
            TensorSpec::new(
                "pooled_projections",
                vec![
                    sym("B"),
                    fixed(c.pooled_projection_dim, "pooled_projection_dim"),
                ],
                Kind::Float,
                "pooled text embedding [B, pooled_projection_dim]",
            ),
            TensorSpec::new(
                "timestep",
                vec![sym("B")],
                Kind::Float,
                "sigma in [0, 1] per sample (the model multiplies by 1000)",
            ),
            img_ids.clone(),
            txt_ids.clone(),
        ];
        if c.guidance_embeds {
            inputs.push(TensorSpec::new(
                "guidance",
                vec![sym("B")],
                Kind::Float,
                "raw guidance scale per sample, e.g. 3.5 (config.guidance_embeds = true)",
            ));
        }
        let info = DualStreamContract {
            model_type: "FluxPipeline",
            architecture: "FluxTransformer2DModel",
            inner_dim: c.inner_dim(),
            out_dim: c.out_dim(),
            preprocess_inputs: inputs,
            temb_description: "conditioning vector (timestep + guidance + pooled text)",
            extra_context: vec![img_ids, txt_ids],
            indicator_description: "TeaCache indicator: transformer_blocks[0].norm1(hidden_states, temb)[0]",
            num_blocks: c.num_layers + c.num_single_layers,
        }
        .info(config_json, dtype, device.clone());
        ModelInfo {
            guidance_embeds: c.guidance_embeds,
            ..info
        }
    }

    /// The wrapped model.
    pub fn model(&self) -> &Flux {
        &self.model
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
            blocks,
        )?;
        Ok(dual_streams(img, txt))
    }
}

impl ModelAdapter for FluxAdapter {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn preprocess(&self, inputs: &Tensors) -> Result<PreprocessOutput, DenoiserError> {
        let typed = typed(inputs)?;
        let pre = self.model.preprocess(&typed)?;
        Ok(output(pre, typed.img_ids, typed.txt_ids))
    }

    fn embed_conditioning(&self, inputs: &Tensors) -> Result<Tensors, DenoiserError> {
        let typed = typed(inputs)?;
        let terms = self
            .model
            .conditioning_terms(&typed.pooled_projections, typed.guidance.as_ref())?;
        let mut more = Tensors::from([(POOLED_TEXT.to_string(), terms.text)]);
        if let Some(g) = terms.guidance {
            more.insert(GUIDANCE.to_string(), g);
        }
        Ok(embedded(
            self.model.embed_text(&typed.encoder_hidden_states)?,
            self.model.rope(&typed.txt_ids, &typed.img_ids)?,
            more,
        ))
    }

    fn preprocess_embedded(
        &self,
        inputs: &Tensors,
        embedded: &Tensors,
    ) -> Result<PreprocessOutput, DenoiserError> {
        let terms = ConditioningTerms {
            guidance: embedded.get(GUIDANCE).cloned(),
            text: required(embedded, POOLED_TEXT)?.clone(),
        };
        let pre = self.model.preprocess_embedded(
            required(inputs, "hidden_states")?,
            required(inputs, "timestep")?,
            &terms,
            required(embedded, TEXT_STREAM)?,
        )?;
        Ok(output(
            pre,
            required(inputs, "img_ids")?.clone(),
            required(inputs, "txt_ids")?.clone(),
        ))
    }

    fn run_blocks(
        &self,
        streams: &Tensors,
        context: &Tensors,
        blocks: Range<usize>,
    ) -> Result<Tensors, DenoiserError> {
        let rope = self
            .model
            .rope(required(context, "txt_ids")?, required(context, "img_ids")?)?;
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
        let doubles = self.model.config().num_layers;
        let lists = given
            .map(|g| attention_lists(g, blocks.clone(), |b| if b < doubles { 2 } else { 1 }))
            .transpose()?;
        let rope = self
            .model
            .rope(required(context, "txt_ids")?, required(context, "img_ids")?)?;
        let result = self.model.run_blocks_hooked(
            required(streams, "hidden_states")?,
            required(streams, "encoder_hidden_states")?,
            required(context, "temb")?,
            &rope,
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
