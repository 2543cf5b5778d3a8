//! FLUX: a candle port of diffusers' `FluxTransformer2DModel`, split into the three stages
//! teaserve serves.
//!
//! Weight names and `config.json` follow diffusers exactly, so a diffusers checkpoint (the
//! `transformer/` folder of a FLUX pipeline) loads as is. The forward pass is cut where
//! TeaCache needs it:
//! - [`Flux::preprocess`]: embeddings, plus the first double block's modulated input
//!   (`transformer_blocks[0].norm1(hidden, emb=temb)[0]`), TeaCache's indicator;
//! - [`Flux::run_blocks`]: every double-stream then single-stream block;
//! - [`Flux::postprocess`]: `norm_out` and `proj_out`.
//!
//! [`Flux::forward`] composes them and is the monolithic reference.

use std::ops::Range;

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

pub use super::layers::timestep_projection;
use super::layers::{
    DualStreamBlock, DualStreamNames, Linear, Mlp2, PlainNorm, Qkv, TIME_PROJ_DIM, ada_chunks,
    attention, gated, linear, modulate,
};

/// `config.json` of a diffusers `FluxTransformer2DModel` (the keys that size the network are required:
/// a missing one is an error naming it; the flags default as in diffusers).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Config {
    /// Patch size of the packed latents (FLUX packs 2x2 before the model; the model uses 1).
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    /// Channels per packed latent token.
    pub in_channels: usize,
    /// Output channels; `None` means `in_channels`.
    #[serde(default)]
    pub out_channels: Option<usize>,
    /// Number of double-stream blocks.
    pub num_layers: usize,
    /// Number of single-stream blocks.
    pub num_single_layers: usize,
    /// Width of one attention head.
    pub attention_head_dim: usize,
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// Width of the text encoder's hidden states.
    pub joint_attention_dim: usize,
    /// Width of the pooled text embedding.
    pub pooled_projection_dim: usize,
    /// Whether the model embeds a guidance scale (guidance-distilled FLUX.1-dev).
    #[serde(default)]
    pub guidance_embeds: bool,
    /// Rotary dimensions per position axis; they sum to `attention_head_dim`.
    pub axes_dims_rope: Vec<usize>,
}

fn default_patch_size() -> usize {
    1
}

const ROPE_THETA: f64 = 10_000.0;

impl Config {
    /// Hidden width of both streams.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Channels per token of the model output.
    pub fn out_dim(&self) -> usize {
        self.patch_size * self.patch_size * self.out_channels.unwrap_or(self.in_channels)
    }

    /// Checks the internal consistency diffusers assumes but does not check.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.attention_head_dim == 0 || self.num_attention_heads == 0 {
            return Err("attention_head_dim and num_attention_heads must be > 0".into());
        }
        if self.axes_dims_rope.iter().sum::<usize>() != self.attention_head_dim {
            return Err(format!(
                "axes_dims_rope {:?} must sum to attention_head_dim {}",
                self.axes_dims_rope, self.attention_head_dim
            ));
        }
        if self.axes_dims_rope.iter().any(|d| d % 2 != 0) {
            return Err(format!(
                "every axes_dims_rope entry must be even, got {:?}",
                self.axes_dims_rope
            ));
        }
        if self.in_channels == 0 || self.patch_size == 0 {
            return Err("in_channels and patch_size must be > 0".into());
        }
        Ok(())
    }
}

/// Model-native inputs of one call, named as diffusers' `forward()` arguments.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// Packed latents `[B, N, in_channels]`.
    pub hidden_states: Tensor,
    /// Text encoder states `[B, T, joint_attention_dim]`.
    pub encoder_hidden_states: Tensor,
    /// Pooled text embedding `[B, pooled_projection_dim]`.
    pub pooled_projections: Tensor,
    /// Sigma in `[0, 1]`, `[B]` (the model multiplies by 1000).
    pub timestep: Tensor,
    /// Image position ids `[N, 3]`.
    pub img_ids: Tensor,
    /// Text position ids `[T, 3]`.
    pub txt_ids: Tensor,
    /// Raw guidance scale `[B]`; only for `guidance_embeds` models.
    pub guidance: Option<Tensor>,
}

/// What [`Flux::preprocess`] returns.
#[derive(Debug, Clone)]
pub struct Preprocessed {
    /// TeaCache's indicator `[B, N, inner_dim]`.
    pub modulated_input: Tensor,
    /// Image stream entering the blocks `[B, N, inner_dim]`.
    pub hidden_states: Tensor,
    /// Text stream entering the blocks `[B, T, inner_dim]`.
    pub encoder_hidden_states: Tensor,
    /// Conditioning vector `[B, inner_dim]`.
    pub temb: Tensor,
}

/// The step-invariant terms of `temb` ([`Flux::conditioning_terms`]).
#[derive(Debug, Clone)]
pub struct ConditioningTerms {
    /// The guidance embedding `[B, inner_dim]` (models with `guidance_embeds`).
    pub guidance: Option<Tensor>,
    /// The pooled text projection `[B, inner_dim]`.
    pub text: Tensor,
}

/// Rotary tables for position ids `[S, axes]`: `(cos, sin)`, each `[S, head_dim / 2]` in f32,
/// one entry per rotated pair (diffusers repeats each twice; `rope_i` pairs adjacent channels).
/// Frequencies and angles are computed in f64 as diffusers does.
pub fn rope_tables(ids: &Tensor, axes_dims: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
    let ids = ids.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let half: usize = axes_dims.iter().sum::<usize>() / 2;
    let mut cos = Vec::with_capacity(ids.len() * half);
    let mut sin = Vec::with_capacity(ids.len() * half);
    for row in &ids {
        for (axis, &dim) in axes_dims.iter().enumerate() {
            let pos = row.get(axis).copied().unwrap_or(0.0);
            for k in 0..dim / 2 {
                let freq = 1.0 / ROPE_THETA.powf((2 * k) as f64 / dim as f64);
                let angle = pos * freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
    }
    let s = ids.len();
    Ok((
        Tensor::from_vec(cos, (s, half), device)?,
        Tensor::from_vec(sin, (s, half), device)?,
    ))
}

/// Weight names of FLUX's double-stream blocks (diffusers' `FluxTransformerBlock`).
const DOUBLE_BLOCK: DualStreamNames = DualStreamNames {
    img_mod: "norm1.linear",
    txt_mod: "norm1_context.linear",
    img_mlp: "ff",
    txt_mlp: "ff_context",
};

/// One single-stream block (diffusers' `FluxSingleTransformerBlock`).
#[derive(Debug, Clone)]
struct SingleBlock {
    norm_linear: Linear,
    qkv: Qkv,
    proj_mlp: Linear,
    proj_out: Linear,
    norm: PlainNorm,
    num_heads: usize,
}

impl SingleBlock {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.inner_dim();
        let mlp = dim * 4;
        Ok(Self {
            norm_linear: linear(dim, 3 * dim, vb.pp("norm.linear"))?,
            qkv: Qkv::new(
                dim,
                cfg.attention_head_dim,
                ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
                &vb.pp("attn"),
            )?,
            proj_mlp: linear(dim, mlp, vb.pp("proj_mlp"))?,
            proj_out: linear(dim + mlp, dim, vb.pp("proj_out"))?,
            norm: PlainNorm::new(dim, vb.dtype(), vb.device())?,
            num_heads: cfg.num_attention_heads,
        })
    }

    /// Returns `(img, txt)` after the block (text and image are joined as `[text ; image]`),
    /// and the attention module's output `[B, T + N, inner_dim]` it used: `given` (TaylorSeer's
    /// forecast) replaces computing attention.
    fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb: &Tensor,
        rope: &(Tensor, Tensor),
        given: Option<&[Tensor]>,
    ) -> Result<((Tensor, Tensor), Vec<Tensor>)> {
        let t_len = txt.dim(1)?;
        let xs = Tensor::cat(&[txt, img], 1)?;
        let [shift, scale, gate] = ada_chunks::<3>(&self.norm_linear, temb)?;
        let normed = modulate(&self.norm.forward(&xs)?, &shift, &scale)?;
        let mlp = self.proj_mlp.forward(&normed)?.gelu()?;
        let attn = match given {
            Some([a]) if a.dims() == xs.dims() => a.to_dtype(xs.dtype())?,
            Some(g) => candle_core::bail!(
                "a single-stream block's attention output is [text ; image] {:?}, got {:?}",
                xs.dims(),
                g.iter().map(|t| t.dims().to_vec()).collect::<Vec<_>>()
            ),
            None => {
                let (q, k, v) = self.qkv.project(&normed, self.num_heads)?;
                attention(&q, &k, &v, rope, None, xs.dtype())?
            }
        };
        let out = self
            .proj_out
            .forward(&Tensor::cat(&[&attn, &mlp], D::Minus1)?)?;
        let xs = (xs + gated(&gate, &out)?)?;
        let s = xs.dim(1)?;
        Ok((
            (xs.narrow(1, t_len, s - t_len)?, xs.narrow(1, 0, t_len)?),
            vec![attn],
        ))
    }
}

/// diffusers' `FluxTransformer2DModel`.
#[derive(Debug, Clone)]
pub struct Flux {
    config: Config,
    x_embedder: Linear,
    context_embedder: Linear,
    timestep_embedder: Mlp2,
    guidance_embedder: Option<Mlp2>,
    text_embedder: Mlp2,
    double_blocks: Vec<DualStreamBlock>,
    single_blocks: Vec<SingleBlock>,
    norm_out_linear: Linear,
    norm_out: PlainNorm,
    proj_out: Linear,
    device: Device,
    dtype: DType,
}

impl Flux {
    /// Builds the model from diffusers-named weights (`vb` at the checkpoint root).
    pub fn new(config: &Config, vb: VarBuilder) -> Result<Self> {
        config.validate().map_err(candle_core::Error::msg)?;
        let dim = config.inner_dim();
        let tte = vb.pp("time_text_embed");
        let guidance_embedder = if config.guidance_embeds {
            Some(Mlp2::new(TIME_PROJ_DIM, dim, tte.pp("guidance_embedder"))?)
        } else {
            None
        };
        let double_blocks = (0..config.num_layers)
            .map(|i| {
                DualStreamBlock::new(
                    dim,
                    config.attention_head_dim,
                    config.num_attention_heads,
                    DOUBLE_BLOCK,
                    vb.pp("transformer_blocks").pp(i),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let single_blocks = (0..config.num_single_layers)
            .map(|i| SingleBlock::new(config, vb.pp("single_transformer_blocks").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        if double_blocks.is_empty() {
            candle_core::bail!("num_layers must be >= 1: TeaCache reads the first double block")
        }
        Ok(Self {
            config: config.clone(),
            x_embedder: linear(config.in_channels, dim, vb.pp("x_embedder"))?,
            context_embedder: linear(config.joint_attention_dim, dim, vb.pp("context_embedder"))?,
            timestep_embedder: Mlp2::new(TIME_PROJ_DIM, dim, tte.pp("timestep_embedder"))?,
            guidance_embedder,
            text_embedder: Mlp2::new(config.pooled_projection_dim, dim, tte.pp("text_embedder"))?,
            double_blocks,
            single_blocks,
            norm_out_linear: linear(dim, 2 * dim, vb.pp("norm_out.linear"))?,
            norm_out: PlainNorm::new(dim, vb.dtype(), vb.device())?,
            proj_out: linear(dim, config.out_dim(), vb.pp("proj_out"))?,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// The architecture config.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Compute dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Compute device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Conditioning vector `temb` `[B, inner_dim]` from sigma, pooled text and guidance.
    pub fn conditioning(
        &self,
        timestep: &Tensor,
        pooled_projections: &Tensor,
        guidance: Option<&Tensor>,
    ) -> Result<Tensor> {
        let terms = self.conditioning_terms(pooled_projections, guidance)?;
        self.conditioning_from(timestep, &terms)
    }

    /// The terms of `temb` that do not change between steps: the guidance embedding (models
    /// that embed guidance) and the pooled text projection.
    pub fn conditioning_terms(
        &self,
        pooled_projections: &Tensor,
        guidance: Option<&Tensor>,
    ) -> Result<ConditioningTerms> {
        let guidance = match (&self.guidance_embedder, guidance) {
            (Some(g), Some(guidance)) => Some(self.embed_scalar(g, guidance)?),
            (Some(_), None) => candle_core::bail!("this model embeds guidance: pass `guidance`"),
            (None, Some(_)) => candle_core::bail!("this model does not embed guidance"),
            (None, None) => None,
        };
        Ok(ConditioningTerms {
            guidance,
            text: self.text_embedder.forward(pooled_projections)?,
        })
    }

    /// `temb` at `timestep` from the step-invariant `terms`, with the same operations in the
    /// same order as [`Flux::conditioning`] (so the same bits).
    pub fn conditioning_from(
        &self,
        timestep: &Tensor,
        terms: &ConditioningTerms,
    ) -> Result<Tensor> {
        let mut temb = self.embed_scalar(&self.timestep_embedder, timestep)?;
        if let Some(g) = &terms.guidance {
            temb = (temb + g)?;
        }
        temb + &terms.text
    }

    /// A per-sample scalar (sigma, guidance) through the sinusoidal projection and `mlp`.
    fn embed_scalar(&self, mlp: &Mlp2, values: &Tensor) -> Result<Tensor> {
        let proj = timestep_projection(values, 1000.0, 1.0)?
            .to_device(&self.device)?
            .to_dtype(self.dtype)?;
        mlp.forward(&proj)
    }

    /// The text stream entering the blocks: `context_embedder(encoder_hidden_states)`.
    pub fn embed_text(&self, encoder_hidden_states: &Tensor) -> Result<Tensor> {
        self.context_embedder.forward(encoder_hidden_states)
    }

    /// Rotary tables for `[text ; image]` tokens from their position ids.
    pub fn rope(&self, txt_ids: &Tensor, img_ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let ids = Tensor::cat(
            &[txt_ids.to_dtype(DType::F64)?, img_ids.to_dtype(DType::F64)?],
            0,
        )?;
        rope_tables(&ids, &self.config.axes_dims_rope, &self.device)
    }

    /// Embeds the inputs; returns the streams entering the blocks, `temb` and TeaCache's
    /// modulated input.
    pub fn preprocess(&self, inputs: &Inputs) -> Result<Preprocessed> {
        let terms =
            self.conditioning_terms(&inputs.pooled_projections, inputs.guidance.as_ref())?;
        let text = self.embed_text(&inputs.encoder_hidden_states)?;
        self.preprocess_embedded(&inputs.hidden_states, &inputs.timestep, &terms, &text)
    }

    /// [`Flux::preprocess`] with what does not change between steps already computed: the
    /// step-invariant `terms` of `temb` and the embedded text stream `text` (the same bits).
    pub fn preprocess_embedded(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        terms: &ConditioningTerms,
        text: &Tensor,
    ) -> Result<Preprocessed> {
        let hidden_states = self.x_embedder.forward(hidden_states)?;
        let temb = self.conditioning_from(timestep, terms)?;
        let modulated_input = match self.double_blocks.first() {
            Some(block) => block.modulated_input(&hidden_states, &temb)?,
            None => candle_core::bail!("model has no double-stream block"),
        };
        Ok(Preprocessed {
            modulated_input,
            hidden_states,
            encoder_hidden_states: text.clone(),
            temb,
        })
    }

    /// Runs the double-stream blocks; returns `(img, txt)`.
    pub fn run_double_blocks(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb: &Tensor,
        rope: &(Tensor, Tensor),
    ) -> Result<(Tensor, Tensor)> {
        let (mut img, mut txt) = (img.clone(), txt.clone());
        for block in &self.double_blocks {
            (img, txt) = block.forward(&img, &txt, temb, rope, None)?;
        }
        Ok((img, txt))
    }

    /// Runs the single-stream blocks; returns `(img, txt)`.
    pub fn run_single_blocks(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb: &Tensor,
        rope: &(Tensor, Tensor),
    ) -> Result<(Tensor, Tensor)> {
        let (mut img, mut txt) = (img.clone(), txt.clone());
        for block in &self.single_blocks {
            ((img, txt), _) = block.forward(&img, &txt, temb, rope, None)?;
        }
        Ok((img, txt))
    }

    /// Transformer blocks in execution order: the double-stream ones, then the single-stream.
    pub fn num_blocks(&self) -> usize {
        self.double_blocks.len() + self.single_blocks.len()
    }

    /// Runs the transformer blocks `blocks` (indices in execution order, see
    /// [`Flux::num_blocks`]); returns `(hidden_states, encoder_hidden_states)`.
    pub fn run_blocks(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb: &Tensor,
        rope: &(Tensor, Tensor),
        blocks: Range<usize>,
    ) -> Result<(Tensor, Tensor)> {
        let (out, _) = self.run_blocks_hooked(img, txt, temb, rope, blocks, None)?;
        Ok(out)
    }

    /// [`Flux::run_blocks`] with TaylorSeer's hook on every block's attention module: `given`
    /// (one list per block of the range, FLUX double blocks `[image, text]`, single blocks
    /// `[text ; image]`) replaces computing attention; returns the streams and the attention
    /// outputs every block used.
    pub fn run_blocks_hooked(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb: &Tensor,
        rope: &(Tensor, Tensor),
        blocks: Range<usize>,
        given: Option<&[Vec<Tensor>]>,
    ) -> Result<crate::models::layers::HookedBlocks> {
        if blocks.start > blocks.end || blocks.end > self.num_blocks() {
            candle_core::bail!(
                "blocks {}..{} out of 0..{}",
                blocks.start,
                blocks.end,
                self.num_blocks()
            )
        }
        let doubles = self.double_blocks.len();
        let (mut img, mut txt) = (img.clone(), txt.clone());
        let mut used = Vec::with_capacity(blocks.len());
        for (k, i) in blocks.enumerate() {
            let g = given.and_then(|g| g.get(k)).map(Vec::as_slice);
            let attn;
            ((img, txt), attn) = match i.checked_sub(doubles) {
                None => self.double_blocks[i].forward_hooked(&img, &txt, temb, rope, None, g)?,
                Some(s) => self.single_blocks[s].forward(&img, &txt, temb, rope, g)?,
            };
            used.push(attn);
        }
        Ok(((img, txt), used))
    }

    /// `norm_out` (AdaLayerNormContinuous, scale first) then `proj_out`: the model output.
    pub fn postprocess(&self, img: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let [scale, shift] = ada_chunks::<2>(&self.norm_out_linear, temb)?;
        let normed = modulate(&self.norm_out.forward(img)?, &shift, &scale)?;
        self.proj_out.forward(&normed)
    }

    /// The monolithic forward pass: preprocess, every block, postprocess.
    pub fn forward(&self, inputs: &Inputs) -> Result<Tensor> {
        let pre = self.preprocess(inputs)?;
        let rope = self.rope(&inputs.txt_ids, &inputs.img_ids)?;
        let (img, _) = self.run_blocks(
            &pre.hidden_states,
            &pre.encoder_hidden_states,
            &pre.temb,
            &rope,
            0..self.num_blocks(),
        )?;
        self.postprocess(&img, &pre.temb)
    }
}
