//! The model registry (the seed's extractor registry): pipeline class name -> model adapter.
//!
//! Serving code only reaches a model through [`ModelAdapter`]: named, validated candle
//! tensors in, named tensors out. Each architecture's adapter lives in `adapters/` and maps
//! those names onto its candle model in `models/`.

use std::collections::HashMap;
use std::ops::Range;

use candle_core::{DType, Device, Tensor};

use crate::adapters;
use crate::error::DenoiserError;
use crate::loader::ModelFiles;
use crate::spec::TensorSpec;

/// Named candle tensors, decoded from a request map and converted to the model dtype.
pub type Tensors = HashMap<String, Tensor>;

/// The tensor contract of one RPC.
#[derive(Debug, Clone, Default)]
pub struct StageSpec {
    /// Tensors the RPC accepts (for RunBlocks: the streams).
    pub inputs: Vec<TensorSpec>,
    /// Context tensors the RPC accepts (RunBlocks, Postprocess).
    pub context: Vec<TensorSpec>,
    /// Tensors the RPC returns.
    pub outputs: Vec<TensorSpec>,
}

/// What a loaded model is and what each stage expects.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Pipeline class name, e.g. `FluxPipeline`.
    pub model_type: &'static str,
    /// Transformer class, e.g. `FluxTransformer2DModel`.
    pub architecture: &'static str,
    /// `config.json` as loaded.
    pub config_json: String,
    /// Compute dtype.
    pub dtype: DType,
    /// Compute device.
    pub device: Device,
    /// Preprocess contract.
    pub preprocess: StageSpec,
    /// RunBlocks contract.
    pub run_blocks: StageSpec,
    /// Postprocess contract.
    pub postprocess: StageSpec,
    /// Default image size `(height, width)` when the model has a text mode.
    pub text_mode: Option<(usize, usize)>,
    /// Parts of the pipeline loaded here (`--components`); empty: the model is one part.
    pub components: Vec<Component>,
    /// The checkpoint's `scheduler/scheduler_config.json`, empty when it has none.
    pub scheduler_config_json: String,
    /// Whether the transformer embeds a guidance scale (`guidance` input).
    pub guidance_embeds: bool,
    /// Default and largest text length of EncodePrompt; 0 where there is no such setting.
    pub max_sequence_length: usize,
    /// Transformer blocks RunBlocks runs, in execution order.
    pub num_blocks: usize,
}

/// A part of a diffusers pipeline one denoiser may load (`--components`), so that large
/// text encoders can live on other GPUs than the transformer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    /// The transformer: Preprocess, RunBlocks, Postprocess.
    Transformer,
    /// The tokenizers and text encoders: EncodePrompt.
    TextEncoders,
    /// The VAE decoder: Decode.
    Vae,
}

impl Component {
    /// Every component, in the order they run.
    pub const ALL: [Component; 3] = [Self::TextEncoders, Self::Transformer, Self::Vae];

    /// The name used by `--components` and Describe.
    pub fn name(self) -> &'static str {
        match self {
            Self::Transformer => "transformer",
            Self::TextEncoders => "text_encoders",
            Self::Vae => "vae",
        }
    }

    /// Parses one `--components` item.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "transformer" => Ok(Self::Transformer),
            "text_encoders" | "text_encoder" => Ok(Self::TextEncoders),
            "vae" => Ok(Self::Vae),
            other => Err(format!(
                "unknown component '{}'; use transformer, text_encoders, vae",
                other.chars().take(40).collect::<String>()
            )),
        }
    }
}

/// The tensor contracts of a dual-stream DiT split into three stages, built from what differs
/// between models: the Preprocess inputs and the context tensors after `temb`.
///
/// Streams are `hidden_states [B, N, inner_dim]` and `encoder_hidden_states [B, T,
/// inner_dim]`; the context starts with `temb [B, inner_dim]`; Postprocess needs only `temb`
/// and accepts the rest of the context as passed along.
pub struct DualStreamContract {
    /// Pipeline class name.
    pub model_type: &'static str,
    /// Transformer class name.
    pub architecture: &'static str,
    /// Hidden width of both streams.
    pub inner_dim: usize,
    /// Channels per token of the model output.
    pub out_dim: usize,
    /// Preprocess's model-native inputs.
    pub preprocess_inputs: Vec<TensorSpec>,
    /// What `temb` holds, for Describe.
    pub temb_description: &'static str,
    /// Context tensors after `temb`, passed from Preprocess to the later stages.
    pub extra_context: Vec<TensorSpec>,
    /// How the TeaCache indicator is computed, for Describe.
    pub indicator_description: &'static str,
    /// Transformer blocks, in execution order.
    pub num_blocks: usize,
}

impl DualStreamContract {
    /// The full [`ModelInfo`].
    pub fn info(self, config_json: String, dtype: DType, device: Device) -> ModelInfo {
        use crate::spec::{Dim, Kind};
        let b = || Dim::Sym("B");
        let d = || Dim::Fixed(self.inner_dim, "inner_dim");
        let stream = |name, tokens, description| {
            TensorSpec::new(
                name,
                vec![b(), Dim::Sym(tokens), d()],
                Kind::Float,
                description,
            )
        };
        let img = stream(
            "hidden_states",
            "N",
            "image stream [B, N image tokens, inner_dim]",
        );
        let txt = stream(
            "encoder_hidden_states",
            "T",
            "text stream [B, T text tokens, inner_dim]",
        );
        let temb = TensorSpec::new("temb", vec![b(), d()], Kind::Float, self.temb_description);
        let mut context = vec![temb.clone()];
        context.extend(self.extra_context.iter().cloned());
        let mut post_context = vec![temb];
        post_context.extend(self.extra_context.into_iter().map(TensorSpec::optional));
        let indicator = stream("modulated_input", "N", self.indicator_description);
        let sample = TensorSpec::new(
            "sample",
            vec![
                b(),
                Dim::Sym("N"),
                Dim::Fixed(self.out_dim, "patch_size^2 * out_channels"),
            ],
            Kind::Float,
            "model output (flow-matching velocity) in the packed latent layout",
        );
        ModelInfo {
            model_type: self.model_type,
            architecture: self.architecture,
            config_json,
            dtype,
            device,
            preprocess: StageSpec {
                inputs: self.preprocess_inputs,
                context: vec![],
                outputs: [vec![indicator, img.clone(), txt.clone()], context.clone()].concat(),
            },
            run_blocks: StageSpec {
                inputs: vec![img.clone(), txt.clone()],
                context,
                outputs: vec![img.clone(), txt],
            },
            postprocess: StageSpec {
                inputs: vec![img],
                context: post_context,
                outputs: vec![sample],
            },
            text_mode: None,
            components: Vec::new(),
            scheduler_config_json: String::new(),
            guidance_embeds: false,
            max_sequence_length: 0,
            num_blocks: self.num_blocks,
        }
    }
}

/// A tensor the stage's specs made required; absence here is a contract bug, reported as an
/// input error rather than a panic.
pub fn required<'a>(map: &'a Tensors, name: &str) -> Result<&'a Tensor, DenoiserError> {
    map.get(name)
        .ok_or_else(|| crate::spec::InputError::Invalid(format!("missing tensor '{name}'")).into())
}

/// What Preprocess returns.
#[derive(Debug, Clone)]
pub struct PreprocessOutput {
    /// TeaCache's indicator.
    pub modulated_input: Tensor,
    /// Streams entering the blocks.
    pub streams: Tensors,
    /// Context for RunBlocks and Postprocess.
    pub context: Tensors,
}

/// How long one prompt was for one text encoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptLength {
    /// The encoder, e.g. `clip` or `t5`.
    pub encoder: &'static str,
    /// Tokens before truncation, specials included.
    pub untruncated: usize,
    /// The encoder's length (what the model sees, padding included).
    pub kept: usize,
}

/// What `EncodePrompt` returns: model-native inputs for the prompts and the latent shape.
#[derive(Debug, Clone)]
pub struct PromptInputs {
    /// Every input except `hidden_states` and `timestep`.
    pub inputs: Tensors,
    /// Shape of `hidden_states` (the latents to sample noise for).
    pub latent_shape: Vec<usize>,
    /// Image size used, pixels.
    pub height: usize,
    /// Image size used, pixels.
    pub width: usize,
    /// The text length used (0 where the model has no such setting).
    pub max_sequence_length: usize,
    /// Per prompt, how long it was for each text encoder.
    pub prompt_lengths: Vec<Vec<PromptLength>>,
}

/// A model's text mode: a text encoder and a decoder to pixels.
pub trait TextMode {
    /// Default image size `(height, width)` in pixels.
    fn default_size(&self) -> (usize, usize);
    /// Inputs for `prompts` at `height x width` with text length `max_sequence_length`
    /// (each 0 = the model's default).
    fn encode_prompts(
        &self,
        prompts: &[String],
        height: usize,
        width: usize,
        max_sequence_length: usize,
    ) -> Result<PromptInputs, DenoiserError>;
    /// Final latents to PNG images.
    fn decode(
        &self,
        latents: &Tensor,
        height: usize,
        width: usize,
    ) -> Result<Vec<Vec<u8>>, DenoiserError>;
}

/// A loaded model behind the three-stage split. Implementations run on the compute thread
/// and receive tensors already checked against [`ModelInfo`]'s specs.
pub trait ModelAdapter: Send {
    /// The model's text mode, if it ships a text encoder and a decoder.
    fn text_mode(&self) -> Option<&dyn TextMode> {
        None
    }
    /// The model and its tensor contracts.
    fn info(&self) -> &ModelInfo;
    /// Embeds the model-native inputs.
    fn preprocess(&self, inputs: &Tensors) -> Result<PreprocessOutput, DenoiserError>;
    /// What Preprocess and RunBlocks derive from a session's conditioning alone, the same at
    /// every step (e.g. the embedded text stream, the pooled text projection, rotary tables),
    /// computed from one step's `inputs` (which may be used for their shapes, never for the
    /// latents' or timestep's values). Resident mode keeps it per session branch and passes
    /// it to [`ModelAdapter::preprocess_embedded`] and [`ModelAdapter::run_blocks_embedded`].
    /// Default: nothing (every step computes everything).
    fn embed_conditioning(&self, _inputs: &Tensors) -> Result<Tensors, DenoiserError> {
        Ok(Tensors::new())
    }
    /// [`ModelAdapter::preprocess`] given [`ModelAdapter::embed_conditioning`]'s result for the
    /// same conditioning: the same output, bit for bit.
    fn preprocess_embedded(
        &self,
        inputs: &Tensors,
        _embedded: &Tensors,
    ) -> Result<PreprocessOutput, DenoiserError> {
        self.preprocess(inputs)
    }
    /// Runs the transformer blocks `blocks` (indices in execution order, within
    /// `info().num_blocks`) over the streams.
    fn run_blocks(
        &self,
        streams: &Tensors,
        context: &Tensors,
        blocks: Range<usize>,
    ) -> Result<Tensors, DenoiserError>;
    /// [`ModelAdapter::run_blocks`] given [`ModelAdapter::embed_conditioning`]'s result for the
    /// session's conditioning: the same output, bit for bit.
    fn run_blocks_embedded(
        &self,
        streams: &Tensors,
        context: &Tensors,
        _embedded: &Tensors,
        blocks: Range<usize>,
    ) -> Result<Tensors, DenoiserError> {
        self.run_blocks(streams, context, blocks)
    }
    /// [`ModelAdapter::run_blocks`] with TaylorSeer's hook on every block's attention module:
    /// `given` (keys `<block>.<k>`, see [`attention_lists`]) stands in for computing attention;
    /// returns the streams and the attention outputs every block used, keyed the same way.
    fn run_blocks_attention(
        &self,
        _streams: &Tensors,
        _context: &Tensors,
        _blocks: Range<usize>,
        _given: Option<&Tensors>,
    ) -> Result<(Tensors, Tensors), DenoiserError> {
        Err(DenoiserError::Config(format!(
            "{} does not expose its attention modules (TaylorSeer)",
            self.info().model_type
        )))
    }
    /// Final norm and projection.
    fn postprocess(
        &self,
        hidden_states: &Tensor,
        context: &Tensors,
    ) -> Result<Tensor, DenoiserError>;
}

/// Name of the embedded text stream in [`ModelAdapter::embed_conditioning`]'s result.
pub const TEXT_STREAM: &str = "text_stream";
/// Names of the rotary tables `(cos, sin)` in [`ModelAdapter::embed_conditioning`]'s result.
pub const ROPE: [&str; 2] = ["rope_cos", "rope_sin"];

/// The rotary tables `(cos, sin)` an embedded conditioning keeps.
pub fn kept_rope(embedded: &Tensors) -> Result<(Tensor, Tensor), DenoiserError> {
    Ok((
        required(embedded, ROPE[0])?.clone(),
        required(embedded, ROPE[1])?.clone(),
    ))
}

/// An embedded conditioning of the text stream `text`, the rotary tables `rope` and `more`.
pub fn embedded(text: Tensor, (cos, sin): (Tensor, Tensor), more: Tensors) -> Tensors {
    let mut map = more;
    map.insert(TEXT_STREAM.to_string(), text);
    map.insert(ROPE[0].to_string(), cos);
    map.insert(ROPE[1].to_string(), sin);
    map
}

/// Attention outputs keyed `<block>.<k>` as one list per block of `blocks` (`per_block`
/// outputs each); refuses missing, extra or malformed keys.
pub fn attention_lists(
    given: &Tensors,
    blocks: Range<usize>,
    per_block: impl Fn(usize) -> usize,
) -> Result<Vec<Vec<Tensor>>, DenoiserError> {
    let mut lists = Vec::with_capacity(blocks.len());
    let mut wanted = 0;
    for b in blocks.clone() {
        let n = per_block(b);
        wanted += n;
        let list = (0..n)
            .map(|k| {
                given.get(&format!("{b}.{k}")).cloned().ok_or_else(|| {
                    crate::spec::InputError::Invalid(format!(
                        "RunBlocks attention lacks '{b}.{k}': give every output of blocks \
                         {}..{} as '<block>.<output>'",
                        blocks.start, blocks.end
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        lists.push(list);
    }
    if given.len() != wanted {
        return Err(crate::spec::InputError::Invalid(format!(
            "RunBlocks attention has {} tensors; blocks {}..{} take {wanted} ('<block>.<output>')",
            given.len(),
            blocks.start,
            blocks.end
        ))
        .into());
    }
    Ok(lists)
}

/// What [`ModelAdapter::run_blocks_attention`] returns, from a dual-stream model's hooked
/// blocks: the streams by name and the attention outputs keyed `<block>.<k>`. A failure over
/// client-given attention tensors is the request's mistake.
pub fn hooked_result(
    result: candle_core::Result<crate::models::layers::HookedBlocks>,
    given: bool,
    blocks: Range<usize>,
) -> Result<(Tensors, Tensors), DenoiserError> {
    let ((img, txt), used) = result.map_err(|e| {
        if given {
            given_attention_error(e)
        } else {
            e.into()
        }
    })?;
    Ok((dual_streams(img, txt), attention_map(blocks, used)))
}

/// A dual-stream model's streams by name: the image stream `img` (`hidden_states`) and the
/// text stream `txt` (`encoder_hidden_states`).
pub fn dual_streams(img: Tensor, txt: Tensor) -> Tensors {
    Tensors::from([
        ("hidden_states".to_string(), img),
        ("encoder_hidden_states".to_string(), txt),
    ])
}

/// Every block's attention outputs keyed `<block>.<k>`.
pub fn attention_map(blocks: Range<usize>, used: Vec<Vec<Tensor>>) -> Tensors {
    blocks
        .zip(used)
        .flat_map(|(b, list)| {
            list.into_iter()
                .enumerate()
                .map(move |(k, t)| (format!("{b}.{k}"), t))
        })
        .collect()
}

/// A model computation over client-given attention tensors: a shape the model refuses is
/// the request's mistake.
fn given_attention_error(e: candle_core::Error) -> DenoiserError {
    let msg = e.to_string();
    crate::spec::InputError::Invalid(format!(
        "RunBlocks attention: {}",
        msg.chars().take(300).collect::<String>()
    ))
    .into()
}

/// How to load one weight set onto a device.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Target device.
    pub device: Device,
    /// Weight and compute dtype.
    pub dtype: DType,
    /// Pipeline parts to load (all by default); models that are one part ignore it.
    pub components: Vec<Component>,
}

/// Builds an adapter from resolved files (a registry entry's constructor).
pub type LoadFn = fn(&ModelFiles, &LoadOptions) -> Result<Box<dyn ModelAdapter>, DenoiserError>;

/// A registered model type.
pub struct ModelEntry {
    /// Pipeline class name clients use (`model_class_name`).
    pub model_type: &'static str,
    /// The diffusers transformer class whose checkpoints it loads (`_class_name`).
    pub architecture: &'static str,
    /// Builds the adapter from resolved files.
    pub load: LoadFn,
}

/// Every model type this denoiser can serve.
pub static REGISTRY: &[ModelEntry] = &[
    ModelEntry {
        model_type: "FluxPipeline",
        architecture: "FluxTransformer2DModel",
        load: adapters::flux::load,
    },
    ModelEntry {
        model_type: "TinyFluxPipeline",
        architecture: "FluxTransformer2DModel",
        load: adapters::tiny_flux::load,
    },
    ModelEntry {
        model_type: "QwenImagePipeline",
        architecture: "QwenImageTransformer2DModel",
        load: adapters::qwen_image::load,
    },
];

/// Registered model types as Python writes a list of strings (the seed's message style):
/// `['FluxPipeline', 'QwenImagePipeline']`.
pub fn supported() -> String {
    let names: Vec<String> = REGISTRY
        .iter()
        .map(|e| format!("'{}'", e.model_type))
        .collect();
    format!("[{}]", names.join(", "))
}

/// Finds the entry for a model type, or for a checkpoint's `_class_name` when no type is
/// given.
pub fn lookup(
    model_type: Option<&str>,
    config_class: Option<&str>,
) -> Result<&'static ModelEntry, DenoiserError> {
    let entry = match (model_type, config_class) {
        (Some(t), _) => REGISTRY.iter().find(|e| e.model_type == t).ok_or_else(|| {
            DenoiserError::Config(format!(
                "Unknown model type: '{t}'. Supported: {}",
                supported()
            ))
        })?,
        (None, Some(c)) => REGISTRY
            .iter()
            .find(|e| e.architecture == c)
            .ok_or_else(|| {
                DenoiserError::Config(format!(
                    "config.json _class_name '{c}' matches no registered model; pass \
                 --model-class-name, one of {}",
                    supported()
                ))
            })?,
        (None, None) => {
            return Err(DenoiserError::Config(format!(
                "config.json has no _class_name: pass --model-class-name, one of {}",
                supported()
            )));
        }
    };
    if let Some(c) = config_class
        && c != entry.architecture
    {
        return Err(DenoiserError::Config(format!(
            "model type '{}' loads {} checkpoints, but config.json says _class_name '{c}'",
            entry.model_type, entry.architecture
        )));
    }
    Ok(entry)
}
