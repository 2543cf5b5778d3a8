//! The `FluxPipeline` adapter: maps named tensors onto [`Flux`]'s typed stages.
//!
//! Context carried between stages: `temb` `[B, D]` and the position ids `txt_ids` `[T, 3]`,
//! `img_ids` `[N, 3]` from which RunBlocks rebuilds the rotary tables (a few KiB on the wire
//! instead of the tables' `(T+N) x head_dim` floats).

use candle_core::Tensor;

use crate::error::DenoiserError;
use crate::loader::{ModelFiles, var_builder};
use crate::models::flux::{Config, Flux, Inputs};
use crate::registry::{LoadOptions, ModelAdapter, ModelInfo, PreprocessOutput, StageSpec, Tensors};
use crate::spec::{Dim, InputError, Kind, TensorSpec};

/// `FluxPipeline` served from a diffusers `FluxTransformer2DModel` checkpoint.
pub struct FluxAdapter {
    model: Flux,
    info: ModelInfo,
}

/// Loads a FLUX checkpoint (registry entry point).
pub fn load(
    files: &ModelFiles,
    opts: &LoadOptions,
) -> Result<Box<dyn ModelAdapter>, DenoiserError> {
    let config: Config = serde_json::from_str(&files.config_json)
        .map_err(|e| DenoiserError::Config(format!("{}: {e}", files.config_path.display())))?;
    config
        .validate()
        .map_err(|e| DenoiserError::Config(format!("{}: {e}", files.config_path.display())))?;
    let vb = var_builder(files, opts)?;
    let model = Flux::new(&config, vb)
        .map_err(|e| DenoiserError::Load(format!("building FluxTransformer2DModel: {e}")))?;
    Ok(Box::new(FluxAdapter::new(model, files.config_json.clone())))
}

fn sym(s: &'static str) -> Dim {
    Dim::Sym(s)
}

impl FluxAdapter {
    /// Wraps a built model; `config_json` is reported by Describe.
    pub fn new(model: Flux, config_json: String) -> Self {
        let c = model.config();
        let d = Dim::Fixed(c.inner_dim(), "inner_dim");
        let ids = |name, tokens, what| {
            TensorSpec::new(
                name,
                vec![sym(tokens), Dim::Fixed(3, "")],
                Kind::Numeric,
                what,
            )
        };
        let img = TensorSpec::new(
            "hidden_states",
            vec![sym("B"), sym("N"), d.clone()],
            Kind::Float,
            "image stream [B, N image tokens, inner_dim]",
        );
        let txt = TensorSpec::new(
            "encoder_hidden_states",
            vec![sym("B"), sym("T"), d.clone()],
            Kind::Float,
            "text stream [B, T text tokens, inner_dim]",
        );
        let temb = TensorSpec::new(
            "temb",
            vec![sym("B"), d.clone()],
            Kind::Float,
            "conditioning vector (timestep + guidance + pooled text)",
        );
        let img_ids = ids("img_ids", "N", "image position ids (0, row, col)");
        let txt_ids = ids("txt_ids", "T", "text position ids (zeros)");
        let context = vec![temb, img_ids.clone(), txt_ids.clone()];
        let mut inputs = vec![
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
            TensorSpec::new(
                "pooled_projections",
                vec![
                    sym("B"),
                    Dim::Fixed(c.pooled_projection_dim, "pooled_projection_dim"),
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
            img_ids,
            txt_ids,
        ];
        if c.guidance_embeds {
            inputs.push(TensorSpec::new(
                "guidance",
                vec![sym("B")],
                Kind::Float,
                "raw guidance scale per sample, e.g. 3.5 (config.guidance_embeds = true)",
            ));
        }
        let modulated = TensorSpec::new(
            "modulated_input",
            vec![sym("B"), sym("N"), d.clone()],
            Kind::Float,
            "TeaCache indicator: transformer_blocks[0].norm1(hidden_states, temb)[0]",
        );
        let sample = TensorSpec::new(
            "sample",
            vec![
                sym("B"),
                sym("N"),
                Dim::Fixed(c.out_dim(), "patch_size^2 * out_channels"),
            ],
            Kind::Float,
            "model output (flow-matching velocity) in the packed latent layout",
        );
        let optional_ids: Vec<TensorSpec> = context
            .iter()
            .map(|s| {
                if s.name == "temb" {
                    s.clone()
                } else {
                    s.clone().optional()
                }
            })
            .collect();
        let info = ModelInfo {
            model_type: "FluxPipeline",
            architecture: "FluxTransformer2DModel",
            config_json,
            dtype: model.dtype(),
            device: model.device().clone(),
            preprocess: StageSpec {
                inputs,
                context: vec![],
                outputs: [vec![modulated, img.clone(), txt.clone()], context.clone()].concat(),
            },
            run_blocks: StageSpec {
                inputs: vec![img.clone(), txt.clone()],
                context: context.clone(),
                outputs: vec![img.clone(), txt],
            },
            postprocess: StageSpec {
                inputs: vec![img],
                context: optional_ids,
                outputs: vec![sample],
            },
        };
        Self { model, info }
    }

    /// The wrapped model.
    pub fn model(&self) -> &Flux {
        &self.model
    }
}

/// A tensor the specs made required; its absence here is a contract bug, reported as such.
fn get<'a>(map: &'a Tensors, name: &str) -> Result<&'a Tensor, DenoiserError> {
    map.get(name)
        .ok_or_else(|| InputError::Invalid(format!("missing tensor '{name}'")).into())
}

impl ModelAdapter for FluxAdapter {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn preprocess(&self, inputs: &Tensors) -> Result<PreprocessOutput, DenoiserError> {
        let typed = Inputs {
            hidden_states: get(inputs, "hidden_states")?.clone(),
            encoder_hidden_states: get(inputs, "encoder_hidden_states")?.clone(),
            pooled_projections: get(inputs, "pooled_projections")?.clone(),
            timestep: get(inputs, "timestep")?.clone(),
            img_ids: get(inputs, "img_ids")?.clone(),
            txt_ids: get(inputs, "txt_ids")?.clone(),
            guidance: inputs.get("guidance").cloned(),
        };
        let pre = self.model.preprocess(&typed)?;
        Ok(PreprocessOutput {
            modulated_input: pre.modulated_input,
            streams: Tensors::from([
                ("hidden_states".to_string(), pre.hidden_states),
                (
                    "encoder_hidden_states".to_string(),
                    pre.encoder_hidden_states,
                ),
            ]),
            context: Tensors::from([
                ("temb".to_string(), pre.temb),
                ("img_ids".to_string(), typed.img_ids),
                ("txt_ids".to_string(), typed.txt_ids),
            ]),
        })
    }

    fn run_blocks(&self, streams: &Tensors, context: &Tensors) -> Result<Tensors, DenoiserError> {
        let rope = self
            .model
            .rope(get(context, "txt_ids")?, get(context, "img_ids")?)?;
        let (img, txt) = self.model.run_blocks(
            get(streams, "hidden_states")?,
            get(streams, "encoder_hidden_states")?,
            get(context, "temb")?,
            &rope,
        )?;
        Ok(Tensors::from([
            ("hidden_states".to_string(), img),
            ("encoder_hidden_states".to_string(), txt),
        ]))
    }

    fn postprocess(
        &self,
        hidden_states: &Tensor,
        context: &Tensors,
    ) -> Result<Tensor, DenoiserError> {
        Ok(self
            .model
            .postprocess(hidden_states, get(context, "temb")?)?)
    }
}
