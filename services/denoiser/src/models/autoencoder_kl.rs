//! AutoencoderKL decoder: a candle port of the decoding half of diffusers' `AutoencoderKL`
//! (the FLUX VAE), in diffusers' weight names and `config.json`.
//!
//! [`Decoder::decode`] is `AutoencoderKL.decode(z).sample` (diffusers 0.42.1): optional
//! `post_quant_conv`, then `Decoder`: `conv_in`, the mid block (resnet, single-head attention,
//! resnet), the `UpDecoderBlock2D`s (nearest 2x upsample + conv on all but the last), then
//! `conv_norm_out` + SiLU + `conv_out`. The helpers around it do what the FLUX pipeline does
//! before and after: [`unpack_latents`], [`latents_to_decoder_input`] (scaling and shift),
//! [`to_image_f32`] and [`to_rgb8`] (diffusers' `VaeImageProcessor.postprocess`).
//!
//! The decoder always computes in f32 (weights are converted on load, the input on entry),
//! as diffusers runs this VAE (`force_upcast`); its output is f32.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, VarBuilder};
use serde::Deserialize;

use super::layers::{Linear, linear};

/// Epsilon of every GroupNorm in diffusers' VAE decoder.
const NORM_EPS: f64 = 1e-6;
/// The only up-block type diffusers' `AutoencoderKL` decoder uses.
const UP_BLOCK_TYPE: &str = "UpDecoderBlock2D";

/// `config.json` of a diffusers `AutoencoderKL` (the `vae/` folder of a pipeline). The keys
/// that size the decoder are required (a missing one is an error naming it); the others
/// default as in diffusers; unknown keys (the encoder's, `latents_mean`, ...) are ignored.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Config {
    /// Image channels the encoder takes (unused by the decoder).
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    /// Image channels the decoder produces.
    pub out_channels: usize,
    /// Channels of the latent space.
    pub latent_channels: usize,
    /// Channels per resolution level, highest resolution first.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block; decoder up blocks have one more.
    pub layers_per_block: usize,
    /// Groups of every GroupNorm.
    pub norm_num_groups: usize,
    /// Latents are `(z - shift_factor) * scaling_factor`; the pipeline undoes it before decoding.
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    /// Latent shift (FLUX: 0.1159); `None` means no shift.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Whether a 1x1 `post_quant_conv` runs before the decoder.
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    /// Whether the mid block has its attention layer.
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    /// Activation; only `"silu"` is supported.
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    /// Decoder block types, one per entry of `block_out_channels`; only `UpDecoderBlock2D`.
    #[serde(default = "default_up_block_types")]
    pub up_block_types: Vec<String>,
}

fn default_in_channels() -> usize {
    3
}

fn default_scaling_factor() -> f64 {
    0.18215
}

fn default_true() -> bool {
    true
}

fn default_act_fn() -> String {
    "silu".into()
}

fn default_up_block_types() -> Vec<String> {
    vec![UP_BLOCK_TYPE.into()]
}

impl Config {
    /// Checks what the decoder relies on: SiLU, `UpDecoderBlock2D` blocks matching
    /// `block_out_channels`, and channel counts divisible by `norm_num_groups`.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.act_fn != "silu" {
            return Err(format!(
                "act_fn {:?} is not supported (only \"silu\")",
                self.act_fn
            ));
        }
        if let Some(other) = self.up_block_types.iter().find(|t| *t != UP_BLOCK_TYPE) {
            return Err(format!(
                "up block type {other:?} is not supported (only {UP_BLOCK_TYPE})"
            ));
        }
        if self.up_block_types.len() != self.block_out_channels.len() {
            return Err(format!(
                "{} up_block_types for {} block_out_channels",
                self.up_block_types.len(),
                self.block_out_channels.len()
            ));
        }
        if self.block_out_channels.is_empty() {
            return Err("block_out_channels must not be empty".into());
        }
        if self.latent_channels == 0 || self.out_channels == 0 || self.norm_num_groups == 0 {
            return Err("latent_channels, out_channels and norm_num_groups must be > 0".into());
        }
        let groups = self.norm_num_groups;
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| c == 0 || !c.is_multiple_of(groups))
        {
            return Err(format!(
                "block_out_channels entry {c} must be a positive multiple of norm_num_groups {groups}"
            ));
        }
        Ok(())
    }

    /// Upscaling factor from latent to image pixels (`2^(levels - 1)`; 8 for FLUX).
    pub fn scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

/// Unpacks FLUX's packed latents `[B, (h/2)(w/2), 4C]` to `[B, C, h, w]` (`h`, `w` in latent
/// pixels): diffusers' `_unpack_latents`, `view(B, h/2, w/2, C, 2, 2).permute(0, 3, 1, 4, 2, 5)`.
pub fn unpack_latents(latents: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, n, packed) = latents.dims3()?;
    if !h.is_multiple_of(2)
        || !w.is_multiple_of(2)
        || n != (h / 2) * (w / 2)
        || !packed.is_multiple_of(4)
    {
        candle_core::bail!("cannot unpack latents {:?} to {h}x{w}", latents.dims())
    }
    let c = packed / 4;
    latents
        .reshape((b, h / 2, w / 2, c, 2, 2))?
        .permute([0, 3, 1, 4, 2, 5])?
        .reshape((b, c, h, w))
}

/// The decoder input from (unpacked) latents: `z / f32(scaling_factor) + f32(shift_factor)`
/// in the latents' dtype, a true division as diffusers does (not a multiplication by the
/// reciprocal); the shift is skipped when the config has none.
pub fn latents_to_decoder_input(latents: &Tensor, config: &Config) -> Result<Tensor> {
    let scalar = |v: f64| Tensor::new(v as f32, latents.device())?.to_dtype(latents.dtype());
    let z = latents.broadcast_div(&scalar(config.scaling_factor)?)?;
    match config.shift_factor {
        Some(shift) => z.broadcast_add(&scalar(shift)?),
        None => Ok(z),
    }
}

/// The pipeline's float image from decoder output `[B, C, H, W]`: `(x * 0.5 + 0.5).clamp(0, 1)`
/// in f32, as `[B, H, W, C]` (diffusers' `output_type="np"`).
pub fn to_image_f32(decoded: &Tensor) -> Result<Tensor> {
    let x = decoded.to_dtype(DType::F32)?;
    ((x * 0.5)? + 0.5)?
        .clamp(0f32, 1f32)?
        .permute((0, 2, 3, 1))?
        .contiguous()
}

/// The pipeline's 8-bit image from decoder output `[B, C, H, W]`: per sample, HWC bytes
/// (`H * W * C` each) of `round_half_even(to_image_f32(x) * 255)` in f32, as diffusers'
/// `numpy_to_pil` (numpy's `round` is half-to-even, candle's `round` is not).
pub fn to_rgb8(decoded: &Tensor) -> Result<Vec<Vec<u8>>> {
    let images = to_image_f32(decoded)?;
    let b = images.dim(0)?;
    (0..b)
        .map(|i| {
            let values = images.get(i)?.flatten_all()?.to_vec1::<f32>()?;
            Ok(values
                .iter()
                .map(|v| (v * 255.0).round_ties_even() as u8)
                .collect())
        })
        .collect()
}

/// A 2-D convolution with diffusers' weight names (`weight`, `bias`).
fn conv2d(in_c: usize, out_c: usize, kernel: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: kernel / 2,
        ..Default::default()
    };
    candle_nn::conv2d(in_c, out_c, kernel, cfg, vb)
}

/// diffusers' `GroupNorm` with affine weights and the decoder's eps.
fn group_norm(groups: usize, channels: usize, vb: VarBuilder) -> Result<GroupNorm> {
    candle_nn::group_norm(groups, channels, NORM_EPS, vb)
}

/// diffusers' `ResnetBlock2D` without time embedding (`output_scale_factor` 1, dropout 0).
#[derive(Debug, Clone)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(in_c: usize, out_c: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        let conv_shortcut = if in_c != out_c {
            Some(conv2d(in_c, out_c, 1, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(groups, in_c, vb.pp("norm1"))?,
            conv1: conv2d(in_c, out_c, 3, vb.pp("conv1"))?,
            norm2: group_norm(groups, out_c, vb.pp("norm2"))?,
            conv2: conv2d(out_c, out_c, 3, vb.pp("conv2"))?,
            conv_shortcut,
        })
    }
}

impl Module for ResnetBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(xs)?.silu()?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        shortcut + h
    }
}

/// The mid block's diffusers `Attention`: GroupNorm, then single-head attention over the
/// `H * W` positions (diffusers sets `attention_head_dim` to the channel count, so one head,
/// scale `1/sqrt(C)`), `to_out.0`, plus the residual.
#[derive(Debug, Clone)]
struct AttentionBlock {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    scale: f64,
}

impl AttentionBlock {
    fn new(channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            group_norm: group_norm(groups, channels, vb.pp("group_norm"))?,
            to_q: linear(channels, channels, vb.pp("to_q"))?,
            to_k: linear(channels, channels, vb.pp("to_k"))?,
            to_v: linear(channels, channels, vb.pp("to_v"))?,
            to_out: linear(channels, channels, vb.pp("to_out.0"))?,
            scale: 1.0 / (channels as f64).sqrt(),
        })
    }
}

impl Module for AttentionBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let tokens = self
            .group_norm
            .forward(xs)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        let scores = (q.matmul(&k.t()?.contiguous()?)? * self.scale)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = self.to_out.forward(&probs.matmul(&v)?)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + xs
    }
}

/// diffusers' `UNetMidBlock2D` as the VAE uses it: resnet, (attention, resnet).
#[derive(Debug, Clone)]
struct MidBlock {
    first: ResnetBlock,
    attention: Option<AttentionBlock>,
    second: ResnetBlock,
}

impl MidBlock {
    fn new(channels: usize, groups: usize, attention: bool, vb: VarBuilder) -> Result<Self> {
        let attention = if attention {
            Some(AttentionBlock::new(
                channels,
                groups,
                vb.pp("attentions.0"),
            )?)
        } else {
            None
        };
        let resnet =
            |i: usize| ResnetBlock::new(channels, channels, groups, vb.pp("resnets").pp(i));
        Ok(Self {
            first: resnet(0)?,
            attention,
            second: resnet(1)?,
        })
    }
}

impl Module for MidBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.first.forward(xs)?;
        if let Some(attention) = &self.attention {
            xs = attention.forward(&xs)?;
        }
        self.second.forward(&xs)
    }
}

/// diffusers' `UpDecoderBlock2D`: resnets, then (unless last) nearest 2x upsample + 3x3 conv.
#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    upsampler: Option<Conv2d>,
}

impl UpBlock {
    fn new(
        in_c: usize,
        out_c: usize,
        cfg: &Config,
        upsample: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let resnets = (0..=cfg.layers_per_block)
            .map(|j| {
                let c = if j == 0 { in_c } else { out_c };
                ResnetBlock::new(c, out_c, cfg.norm_num_groups, vb.pp("resnets").pp(j))
            })
            .collect::<Result<Vec<_>>>()?;
        let upsampler = if upsample {
            Some(conv2d(out_c, out_c, 3, vb.pp("upsamplers.0.conv"))?)
        } else {
            None
        };
        Ok(Self { resnets, upsampler })
    }
}

impl Module for UpBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = xs.clone();
        for resnet in &self.resnets {
            xs = resnet.forward(&xs)?;
        }
        match &self.upsampler {
            Some(conv) => {
                let (_, _, h, w) = xs.dims4()?;
                conv.forward(&xs.upsample_nearest2d(2 * h, 2 * w)?)
            }
            None => Ok(xs),
        }
    }
}

/// The decoding half of diffusers' `AutoencoderKL`: `post_quant_conv` (when configured) and
/// the `Decoder`, computing in f32.
#[derive(Debug, Clone)]
pub struct Decoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    device: Device,
}

impl Decoder {
    /// Builds the decoder from diffusers-named weights (`vb` at the VAE's root: `decoder.*`,
    /// `post_quant_conv.*`); weights are converted to f32 whatever `vb`'s dtype.
    pub fn new(config: &Config, vb: VarBuilder) -> Result<Self> {
        config.validate().map_err(candle_core::Error::msg)?;
        let vb = vb.set_dtype(DType::F32);
        let post_quant_conv = if config.use_post_quant_conv {
            let c = config.latent_channels;
            Some(conv2d(c, c, 1, vb.pp("post_quant_conv"))?)
        } else {
            None
        };
        let dec = vb.pp("decoder");
        let channels: Vec<usize> = config.block_out_channels.iter().rev().copied().collect();
        let (top, bottom) = match (channels.first(), channels.last()) {
            (Some(&top), Some(&bottom)) => (top, bottom),
            _ => candle_core::bail!("block_out_channels must not be empty"),
        };
        let groups = config.norm_num_groups;
        Ok(Self {
            post_quant_conv,
            conv_in: conv2d(config.latent_channels, top, 3, dec.pp("conv_in"))?,
            mid_block: MidBlock::new(
                top,
                groups,
                config.mid_block_add_attention,
                dec.pp("mid_block"),
            )?,
            up_blocks: Self::up_blocks(config, &channels, &dec)?,
            conv_norm_out: group_norm(groups, bottom, dec.pp("conv_norm_out"))?,
            conv_out: conv2d(bottom, config.out_channels, 3, dec.pp("conv_out"))?,
            device: vb.device().clone(),
        })
    }

    /// Up blocks over `channels` (`block_out_channels` reversed): block `i` maps
    /// `channels[i-1]` (`channels[0]` for the first) to `channels[i]`.
    fn up_blocks(config: &Config, channels: &[usize], dec: &VarBuilder) -> Result<Vec<UpBlock>> {
        let mut prev = channels.first().copied().unwrap_or_default();
        let mut blocks = Vec::with_capacity(channels.len());
        for (i, &out) in channels.iter().enumerate() {
            let upsample = i + 1 < channels.len();
            blocks.push(UpBlock::new(
                prev,
                out,
                config,
                upsample,
                dec.pp("up_blocks").pp(i),
            )?);
            prev = out;
        }
        Ok(blocks)
    }

    /// Decodes decoder input `z` `[B, latent_channels, h, w]` (already unscaled and shifted,
    /// see [`latents_to_decoder_input`]) to `[B, out_channels, s*h, s*w]` f32, unclamped, with
    /// `s` = [`Config::scale_factor`] (8 for FLUX): `AutoencoderKL.decode(z).sample`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.run(z, &mut |_, _| {})
    }

    /// Runs [`Decoder::decode`] and returns every stage's output, named as diffusers'
    /// modules, for comparison with diffusers: `post_quant_conv` (only when configured),
    /// `conv_in`, `mid_block`, `up_blocks.{i}`, then `conv_out` (after `conv_norm_out` + SiLU;
    /// this last one is what `decode` returns).
    pub fn decode_stages(&self, z: &Tensor) -> Result<Vec<(String, Tensor)>> {
        let mut stages = Vec::new();
        self.run(z, &mut |name, t| stages.push((name, t.clone())))?;
        Ok(stages)
    }

    /// The forward pass, handing each stage's output to `observe`.
    fn run(&self, z: &Tensor, observe: &mut dyn FnMut(String, &Tensor)) -> Result<Tensor> {
        let mut xs = z.to_device(&self.device)?.to_dtype(DType::F32)?;
        if let Some(conv) = &self.post_quant_conv {
            xs = conv.forward(&xs)?;
            observe("post_quant_conv".into(), &xs);
        }
        xs = self.conv_in.forward(&xs)?;
        observe("conv_in".into(), &xs);
        xs = self.mid_block.forward(&xs)?;
        observe("mid_block".into(), &xs);
        for (i, block) in self.up_blocks.iter().enumerate() {
            xs = block.forward(&xs)?;
            observe(format!("up_blocks.{i}"), &xs);
        }
        xs = self
            .conv_out
            .forward(&self.conv_norm_out.forward(&xs)?.silu()?)?;
        observe("conv_out".into(), &xs);
        Ok(xs)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::test_util::max_abs_diff;

    const FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/flux-pipeline-tiny"
    );
    const CASES: [&str; 2] = ["case0", "case1"];

    fn config() -> Config {
        let text = std::fs::read_to_string(format!("{FIXTURE}/vae/config.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn reference() -> HashMap<String, Tensor> {
        let path = format!("{FIXTURE}/reference.safetensors");
        candle_core::safetensors::load(path, &Device::Cpu).unwrap()
    }

    #[allow(unsafe_code)]
    fn fixture_weights(dtype: DType) -> VarBuilder<'static> {
        let path = format!("{FIXTURE}/vae/diffusion_pytorch_model.safetensors");
        // SAFETY: the fixture file is not modified while mapped.
        unsafe { VarBuilder::from_mmaped_safetensors(&[path], dtype, &Device::Cpu) }.unwrap()
    }

    fn decoder(config: &Config) -> Decoder {
        Decoder::new(config, fixture_weights(DType::F32)).unwrap()
    }

    #[test]
    fn config_parses_and_rejects_what_the_port_does_not_support() {
        let cfg = config();
        assert_eq!(cfg.block_out_channels, [8, 16, 32, 32]);
        assert_eq!(cfg.shift_factor, Some(0.1159));
        assert!(!cfg.use_post_quant_conv);
        assert_eq!(cfg.scale_factor(), 8);
        cfg.validate().unwrap();
        let gelu = Config {
            act_fn: "gelu".into(),
            ..cfg.clone()
        };
        assert!(gelu.validate().unwrap_err().contains("act_fn"));
        let groups = Config {
            norm_num_groups: 3,
            ..cfg.clone()
        };
        assert!(groups.validate().unwrap_err().contains("norm_num_groups"));
        let mut json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(format!("{FIXTURE}/vae/config.json")).unwrap(),
        )
        .unwrap();
        json.as_object_mut().unwrap().remove("layers_per_block");
        let err = serde_json::from_value::<Config>(json)
            .unwrap_err()
            .to_string();
        assert!(err.contains("layers_per_block"), "{err}");
    }

    #[test]
    fn decoder_input_from_final_latents_matches_diffusers() {
        let cfg = config();
        let reference = reference();
        for case in CASES {
            let expected = &reference[&format!("{case}.vae_input")];
            let (_, _, h, w) = expected.dims4().unwrap();
            let latents =
                unpack_latents(&reference[&format!("{case}.latents_final")], h, w).unwrap();
            let z = latents_to_decoder_input(&latents, &cfg).unwrap();
            let diff = max_abs_diff(&z, expected);
            eprintln!("{case} vae_input: max abs diff {diff:e}");
            assert!(diff <= 1e-6, "{case}: {diff}");
        }
    }

    #[test]
    fn decoder_stages_and_images_match_diffusers() {
        let cfg = config();
        let decoder = decoder(&cfg);
        let reference = reference();
        for case in CASES {
            let get = |name: &str| &reference[&format!("{case}.{name}")];
            let stages = decoder.decode_stages(get("vae_input")).unwrap();
            let names: Vec<&str> = stages.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(
                names,
                [
                    "conv_in",
                    "mid_block",
                    "up_blocks.0",
                    "up_blocks.1",
                    "up_blocks.2",
                    "up_blocks.3",
                    "conv_out"
                ]
            );
            for (name, got) in &stages {
                let expected = get(&format!("vae_stage.{name}"));
                let diff = max_abs_diff(got, expected);
                let scale = max_abs_diff(expected, &expected.zeros_like().unwrap());
                eprintln!("{case} {name}: max abs diff {diff:e} (max |reference| {scale})");
                assert!(diff <= 1e-4, "{case} {name}: {diff}");
            }
            check_outputs(case, &decoder, &get);
        }
    }

    fn check_outputs<'a>(case: &str, decoder: &Decoder, get: &dyn Fn(&str) -> &'a Tensor) {
        let decoded = decoder.decode(get("vae_input")).unwrap();
        let diff = max_abs_diff(&decoded, get("vae_output"));
        eprintln!("{case} vae_output: max abs diff {diff:e}");
        assert!(diff <= 1e-4, "{case} vae_output: {diff}");
        let image = to_image_f32(&decoded).unwrap().squeeze(0).unwrap();
        let diff = max_abs_diff(&image, get("image"));
        eprintln!("{case} image: max abs diff {diff:e}");
        assert!(diff <= 1e-4, "{case} image: {diff}");
        let rgb = to_rgb8(&decoded).unwrap();
        let expected = get("image_uint8")
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap();
        assert_eq!(rgb.len(), 1);
        assert_eq!(rgb[0].len(), expected.len());
        let off: Vec<u8> = rgb[0]
            .iter()
            .zip(&expected)
            .map(|(a, b)| a.abs_diff(*b))
            .collect();
        let differing = off.iter().filter(|&&d| d > 0).count();
        eprintln!(
            "{case} image_uint8: {differing} of {} values differ",
            off.len()
        );
        assert!(
            off.iter().all(|&d| d <= 1),
            "{case}: a pixel differs by more than 1"
        );
        assert!(differing <= 8, "{case}: {differing} values differ");
    }

    /// A decoder output `x` whose pixel value `(x * 0.5 + 0.5) * 255` is exactly `target` in f32.
    fn exact_input_for(target: f32) -> f32 {
        let start = ((target / 255.0) - 0.5) * 2.0;
        (0..1000u32)
            .flat_map(|i| [start.to_bits() + i, start.to_bits() - i])
            .map(f32::from_bits)
            .find(|x| ((x * 0.5) + 0.5) * 255.0 == target)
            .unwrap()
    }

    #[test]
    fn rgb8_clamps_and_rounds_half_to_even() {
        // Below 64.5 no f32 input lands exactly on a half (the +0.5 drops the low bits).
        let halves = [64.5f32, 65.5, 66.5, 127.5];
        let mut values: Vec<f32> = halves.iter().map(|&t| exact_input_for(t)).collect();
        values.extend([-1.5, 1.5]);
        let t = Tensor::from_vec(values.clone(), (1, 1, 1, values.len()), &Device::Cpu).unwrap();
        assert_eq!(to_rgb8(&t).unwrap(), [vec![64, 66, 66, 128, 0, 255]]);
    }

    #[test]
    fn decoder_computes_in_f32_whatever_the_weights_dtype() {
        let cfg = config();
        let z = reference()["case0.vae_input"].clone();
        let f32_out = decoder(&cfg).decode(&z).unwrap();
        let bf16_vb = Decoder::new(&cfg, fixture_weights(DType::BF16)).unwrap();
        let out = bf16_vb.decode(&z).unwrap();
        assert_eq!(out.dtype(), DType::F32);
        assert_eq!(max_abs_diff(&out, &f32_out), 0.0);
    }

    #[test]
    fn post_quant_conv_runs_first_and_attention_is_optional() {
        let cfg = Config {
            use_post_quant_conv: true,
            mid_block_add_attention: false,
            ..config()
        };
        let err = Decoder::new(&cfg, fixture_weights(DType::F32)).unwrap_err();
        assert!(err.to_string().contains("post_quant_conv"), "{err}");
        let decoder = Decoder::new(&cfg, VarBuilder::zeros(DType::F32, &Device::Cpu)).unwrap();
        let z = Tensor::zeros((1, 16, 2, 3), DType::F32, &Device::Cpu).unwrap();
        let stages = decoder.decode_stages(&z).unwrap();
        assert_eq!(stages[0].0, "post_quant_conv");
        assert_eq!(stages.len(), 8);
        assert_eq!(decoder.decode(&z).unwrap().dims(), [1, 3, 16, 24]);
    }
}
