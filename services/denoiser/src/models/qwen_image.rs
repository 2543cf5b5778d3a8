//! Qwen-Image: a candle port of diffusers' `QwenImageTransformer2DModel`, split into the three
//! stages teaserve serves.
//!
//! Dual-stream blocks only (joint attention over `[text ; image]`), text normalised by
//! `txt_norm` (RMSNorm) before `txt_in`, a timestep-only conditioning vector, complex RoPE
//! over (frame, height, width) with centred image positions and text positions after the
//! image's, and an optional text mask that hides padded text keys from attention.
//! - [`QwenImage::preprocess`]: embeddings, `temb`, and TeaCache's indicator
//!   `img_norm1(hidden) * (1 + scale1) + shift1` with the first chunk of
//!   `transformer_blocks[0].img_mod(temb)`;
//! - [`QwenImage::run_blocks`]: every block;
//! - [`QwenImage::postprocess`]: `norm_out` and `proj_out`.

use std::ops::Range;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{RmsNorm, VarBuilder};
use serde::Deserialize;

use super::layers::{
    DualStreamBlock, DualStreamNames, Linear, Mlp2, PlainNorm, TIME_PROJ_DIM, ada_chunks, linear,
    modulate, rms_norm, rms_norm_layer, timestep_projection,
};

/// `config.json` of a diffusers `QwenImageTransformer2DModel` (the keys that size the network are required:
/// a missing one is an error naming it; the flags default as in diffusers).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Config {
    /// Patch size of the packed latents (2: each token is a 2x2 patch).
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    /// Channels per packed latent token.
    pub in_channels: usize,
    /// Latent channels of the output (before packing); `None` means `in_channels`.
    #[serde(default = "default_out_channels")]
    pub out_channels: Option<usize>,
    /// Number of dual-stream blocks.
    pub num_layers: usize,
    /// Width of one attention head.
    pub attention_head_dim: usize,
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// Width of the text encoder's hidden states.
    pub joint_attention_dim: usize,
    /// Unused by diffusers' forward for this class; must be false.
    #[serde(default)]
    pub guidance_embeds: bool,
    /// Rotary dimensions per axis (frame, height, width); they sum to `attention_head_dim`.
    pub axes_dims_rope: Vec<usize>,
    /// Edit-model variant; not supported.
    #[serde(default)]
    pub zero_cond_t: bool,
    /// Layered variant; not supported.
    #[serde(default)]
    pub use_additional_t_cond: bool,
    /// Layered variant; not supported.
    #[serde(default)]
    pub use_layer3d_rope: bool,
}

fn default_patch_size() -> usize {
    2
}
fn default_out_channels() -> Option<usize> {
    Some(16)
}

const ROPE_THETA: f32 = 10_000.0;

impl Config {
    /// Hidden width of both streams.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Channels per token of the model output.
    pub fn out_dim(&self) -> usize {
        self.patch_size * self.patch_size * self.out_channels.unwrap_or(self.in_channels)
    }

    /// Checks what this port supports and diffusers assumes.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.attention_head_dim == 0 || self.num_attention_heads == 0 || self.num_layers == 0 {
            return Err(
                "attention_head_dim, num_attention_heads and num_layers must be > 0".into(),
            );
        }
        if self.axes_dims_rope.len() != 3
            || self.axes_dims_rope.iter().sum::<usize>() != self.attention_head_dim
            || self.axes_dims_rope.iter().any(|d| d % 2 != 0)
        {
            return Err(format!(
                "axes_dims_rope {:?} must be 3 even numbers summing to attention_head_dim {}",
                self.axes_dims_rope, self.attention_head_dim
            ));
        }
        for (flag, name) in [
            (self.zero_cond_t, "zero_cond_t"),
            (self.use_additional_t_cond, "use_additional_t_cond"),
            (self.use_layer3d_rope, "use_layer3d_rope"),
            (self.guidance_embeds, "guidance_embeds"),
        ] {
            if flag {
                return Err(format!("{name} = true is not supported by this port"));
            }
        }
        Ok(())
    }
}

/// Model-native inputs of one call.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// Packed latents `[B, N, in_channels]`.
    pub hidden_states: Tensor,
    /// Text encoder states `[B, T, joint_attention_dim]`.
    pub encoder_hidden_states: Tensor,
    /// Text mask `[B, T]` (nonzero = valid); `None` = all valid.
    pub encoder_hidden_states_mask: Option<Tensor>,
    /// Sigma in `[0, 1]`, `[B]`.
    pub timestep: Tensor,
    /// Latent grid in patches: (frames, height, width), the same for the whole batch.
    pub img_shape: (usize, usize, usize),
}

/// What [`QwenImage::preprocess`] returns.
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

/// Angles of one axis for integer positions, in f32 as diffusers' `rope_params` computes them.
fn axis_angles(pos: i64, dim: usize) -> impl Iterator<Item = f32> {
    (0..dim / 2).map(move |k| {
        let freq = 1.0 / ROPE_THETA.powf((2 * k) as f32 / dim as f32);
        pos as f32 * freq
    })
}

/// Rotary tables `(cos, sin)`, each `[T + N, head_dim / 2]` in f32, rows in `[text ; image]`
/// order (diffusers' `QwenEmbedRope` with `scale_rope=True`): image rows over (frame, row,
/// col) with frame positions `0..F`, row positions `-(H - H/2)..H/2` and column positions
/// likewise; text row `i` at position `max(H/2, W/2) + i` on every axis.
pub fn rope_tables(
    axes_dims: &[usize],
    img_shape: (usize, usize, usize),
    txt_len: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let (f, h, w) = img_shape;
    let half: usize = axes_dims.iter().sum::<usize>() / 2;
    let rows = txt_len + f * h * w;
    let (mut cos, mut sin) = (
        Vec::with_capacity(rows * half),
        Vec::with_capacity(rows * half),
    );
    let mut push = |positions: [i64; 3]| {
        for (&p, &dim) in positions.iter().zip(axes_dims) {
            for a in axis_angles(p, dim) {
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
    };
    let centred = |i: usize, n: usize| i as i64 - (n - n / 2) as i64;
    let txt_start = (h / 2).max(w / 2) as i64;
    for i in 0..txt_len as i64 {
        push([txt_start + i; 3]);
    }
    for fi in 0..f {
        for hi in 0..h {
            for wi in 0..w {
                push([fi as i64, centred(hi, h), centred(wi, w)]);
            }
        }
    }
    Ok((
        Tensor::from_vec(cos, (rows, half), device)?,
        Tensor::from_vec(sin, (rows, half), device)?,
    ))
}

/// Weight names of Qwen-Image's blocks (diffusers' `QwenImageTransformerBlock`).
const BLOCK: DualStreamNames = DualStreamNames {
    img_mod: "img_mod.1",
    txt_mod: "txt_mod.1",
    img_mlp: "img_mlp",
    txt_mlp: "txt_mlp",
};

/// diffusers' `QwenImageTransformer2DModel`.
#[derive(Debug, Clone)]
pub struct QwenImage {
    config: Config,
    img_in: Linear,
    txt_in: Linear,
    txt_norm: (RmsNorm, Tensor),
    timestep_embedder: Mlp2,
    blocks: Vec<DualStreamBlock>,
    norm_out_linear: Linear,
    norm_out: PlainNorm,
    proj_out: Linear,
    device: Device,
    dtype: DType,
}

impl QwenImage {
    /// Builds the model from diffusers-named weights (`vb` at the checkpoint root).
    pub fn new(config: &Config, vb: VarBuilder) -> Result<Self> {
        config.validate().map_err(candle_core::Error::msg)?;
        let dim = config.inner_dim();
        let blocks = (0..config.num_layers)
            .map(|i| {
                DualStreamBlock::new(
                    dim,
                    config.attention_head_dim,
                    config.num_attention_heads,
                    BLOCK,
                    vb.pp("transformer_blocks").pp(i),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: config.clone(),
            img_in: linear(config.in_channels, dim, vb.pp("img_in"))?,
            txt_in: linear(config.joint_attention_dim, dim, vb.pp("txt_in"))?,
            txt_norm: rms_norm_layer(config.joint_attention_dim, vb.pp("txt_norm"))?,
            timestep_embedder: Mlp2::new(
                TIME_PROJ_DIM,
                dim,
                vb.pp("time_text_embed.timestep_embedder"),
            )?,
            blocks,
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

    /// Rotary tables for `[text ; image]` tokens.
    pub fn rope(
        &self,
        img_shape: (usize, usize, usize),
        txt_len: usize,
    ) -> Result<(Tensor, Tensor)> {
        rope_tables(
            &self.config.axes_dims_rope,
            img_shape,
            txt_len,
            &self.device,
        )
    }

    /// Additive key bias `[B, 1, 1, T + N]` from a text mask `[B, T]` (0 = padding, hidden from
    /// attention); image keys are always visible.
    pub fn key_bias(&self, mask: &Tensor, img_tokens: usize) -> Result<Tensor> {
        let (b, t) = mask.dims2()?;
        let valid = mask.to_dtype(DType::F32)?.ne(0f32)?;
        let zeros = Tensor::zeros((b, t), DType::F32, &self.device)?;
        let neg = Tensor::full(f32::NEG_INFINITY, (b, t), &self.device)?;
        let txt = valid.where_cond(&zeros, &neg)?;
        let img = Tensor::zeros((b, img_tokens), DType::F32, &self.device)?;
        Tensor::cat(&[&txt, &img], 1)?.reshape((b, 1, 1, t + img_tokens))
    }

    /// `timestep_embedder(time_proj(timestep))`, `[B, inner_dim]`.
    pub fn conditioning(&self, timestep: &Tensor) -> Result<Tensor> {
        let proj = timestep_projection(timestep, 1.0, 1000.0)?
            .to_device(&self.device)?
            .to_dtype(self.dtype)?;
        self.timestep_embedder.forward(&proj)
    }

    /// Embeds the inputs; returns the streams entering the blocks, `temb` and TeaCache's
    /// modulated input.
    pub fn preprocess(&self, inputs: &Inputs) -> Result<Preprocessed> {
        let text = self.embed_text(&inputs.encoder_hidden_states)?;
        self.preprocess_embedded(&inputs.hidden_states, &inputs.timestep, &text)
    }

    /// The text stream entering the blocks: `txt_in(txt_norm(encoder_hidden_states))`.
    pub fn embed_text(&self, encoder_hidden_states: &Tensor) -> Result<Tensor> {
        let (norm, gain) = &self.txt_norm;
        let text = rms_norm(&encoder_hidden_states.contiguous()?, norm, gain)?;
        self.txt_in.forward(&text)
    }

    /// [`QwenImage::preprocess`] with the text stream already embedded ([`QwenImage::embed_text`];
    /// the same bits).
    pub fn preprocess_embedded(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        text: &Tensor,
    ) -> Result<Preprocessed> {
        let hidden_states = self.img_in.forward(hidden_states)?;
        let temb = self.conditioning(timestep)?;
        let modulated_input = match self.blocks.first() {
            Some(b) => b.modulated_input(&hidden_states, &temb)?,
            None => candle_core::bail!("model has no transformer block"),
        };
        Ok(Preprocessed {
            modulated_input,
            hidden_states,
            encoder_hidden_states: text.clone(),
            temb,
        })
    }

    /// Runs every block; returns `(hidden_states, encoder_hidden_states)`.
    pub fn run_blocks(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb: &Tensor,
        rope: &(Tensor, Tensor),
        mask: Option<&Tensor>,
        blocks: Range<usize>,
    ) -> Result<(Tensor, Tensor)> {
        let (out, _) = self.run_blocks_hooked(img, txt, temb, rope, mask, blocks, None)?;
        Ok(out)
    }

    /// [`QwenImage::run_blocks`] with TaylorSeer's hook on every block's attention module:
    /// `given` (one `[image, text]` list per block of the range) replaces computing attention;
    /// returns the streams and the attention outputs every block used.
    #[allow(clippy::too_many_arguments)]
    pub fn run_blocks_hooked(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb: &Tensor,
        rope: &(Tensor, Tensor),
        mask: Option<&Tensor>,
        blocks: Range<usize>,
        given: Option<&[Vec<Tensor>]>,
    ) -> Result<crate::models::layers::HookedBlocks> {
        let Some(selected) = self.blocks.get(blocks.clone()) else {
            candle_core::bail!(
                "blocks {}..{} out of 0..{}",
                blocks.start,
                blocks.end,
                self.blocks.len()
            )
        };
        let bias = mask.map(|m| self.key_bias(m, img.dim(1)?)).transpose()?;
        let (mut img, mut txt) = (img.clone(), txt.clone());
        let mut used = Vec::with_capacity(selected.len());
        for (k, block) in selected.iter().enumerate() {
            let g = given.and_then(|g| g.get(k)).map(Vec::as_slice);
            let attn;
            ((img, txt), attn) = block.forward_hooked(&img, &txt, temb, rope, bias.as_ref(), g)?;
            used.push(attn);
        }
        Ok(((img, txt), used))
    }

    /// `norm_out` (scale first) then `proj_out`: the model output.
    pub fn postprocess(&self, img: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let [scale, shift] = ada_chunks::<2>(&self.norm_out_linear, temb)?;
        let normed = modulate(&self.norm_out.forward(img)?, &shift, &scale)?;
        self.proj_out.forward(&normed)
    }

    /// The monolithic forward pass.
    pub fn forward(&self, inputs: &Inputs) -> Result<Tensor> {
        let pre = self.preprocess(inputs)?;
        let rope = self.rope(inputs.img_shape, inputs.encoder_hidden_states.dim(1)?)?;
        let (img, _) = self.run_blocks(
            &pre.hidden_states,
            &pre.encoder_hidden_states,
            &pre.temb,
            &rope,
            inputs.encoder_hidden_states_mask.as_ref(),
            0..self.blocks.len(),
        )?;
        self.postprocess(&img, &pre.temb)
    }
}
