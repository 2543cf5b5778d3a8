//! Qwen-Image VAE decoder: a candle port of the decoding half of diffusers'
//! `AutoencoderKLQwenImage` for single images (one frame).
//!
//! With one frame every causal 3x3x3 conv only meets data with its last temporal tap (the two
//! earlier taps see the causal zero padding), so they run as 2-D 3x3 convs on `weight[:, :, 2]`;
//! 1x1x1 convs run as 1x1 convs; `upsample3d` skips its `time_conv` on the first frame. Norms
//! are `QwenImageRMS_norm`: an L2 normalisation over channels times `sqrt(C) * gamma`.
//! Computes in f32; the output is clamped to `[-1, 1]` as the VAE does.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};
use serde::Deserialize;

pub use super::autoencoder_kl::{to_image_f32, to_rgb8, unpack_latents};

/// `config.json` of a diffusers `AutoencoderKLQwenImage`; the sizing keys are required.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Config {
    /// Channels of the first level (`base_dim`).
    pub base_dim: usize,
    /// Latent channels.
    pub z_dim: usize,
    /// Channel multipliers per level, highest resolution first.
    pub dim_mult: Vec<usize>,
    /// Resnets per encoder level; decoder up blocks have one more.
    pub num_res_blocks: usize,
    /// Levels with attention (only empty is supported).
    #[serde(default)]
    pub attn_scales: Vec<f64>,
    /// Encoder temporal downsampling per level; reversed it picks `upsample3d` in the decoder.
    pub temperal_downsample: Vec<bool>,
    /// Image channels.
    #[serde(default = "default_channels")]
    pub input_channels: usize,
    /// Per-channel latent mean.
    pub latents_mean: Vec<f64>,
    /// Per-channel latent standard deviation.
    pub latents_std: Vec<f64>,
}

fn default_channels() -> usize {
    3
}

impl Config {
    /// Checks what the decoder relies on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.dim_mult.len() < 2 || self.temperal_downsample.len() + 1 != self.dim_mult.len() {
            return Err("dim_mult needs >= 2 levels and one more than temperal_downsample".into());
        }
        if !self.attn_scales.is_empty() {
            return Err("attn_scales is not supported".into());
        }
        if self.latents_mean.len() != self.z_dim || self.latents_std.len() != self.z_dim {
            return Err("latents_mean / latents_std must have z_dim entries".into());
        }
        Ok(())
    }

    /// The pipeline's VAE scale factor, `2^len(temperal_downsample)` (8).
    pub fn scale_factor(&self) -> usize {
        1 << self.temperal_downsample.len()
    }
}

/// The decoder input from unpacked latents `[B, z_dim, h, w]`:
/// `latents / (f32(1) / f32(std)) + f32(mean)` per channel, in f32, as the pipeline writes it.
pub fn latents_to_decoder_input(latents: &Tensor, config: &Config) -> Result<Tensor> {
    let dev = latents.device();
    let c = config.z_dim;
    let inv: Vec<f32> = config
        .latents_std
        .iter()
        .map(|&s| 1f32 / s as f32)
        .collect();
    let mean: Vec<f32> = config.latents_mean.iter().map(|&m| m as f32).collect();
    let inv = Tensor::from_vec(inv, (1, c, 1, 1), dev)?;
    let mean = Tensor::from_vec(mean, (1, c, 1, 1), dev)?;
    latents
        .to_dtype(DType::F32)?
        .broadcast_div(&inv)?
        .broadcast_add(&mean)
}

/// A causal 3-D conv (`kernel` 3 or 1) applied to one frame, as a 2-D conv.
fn causal_conv(in_c: usize, out_c: usize, kernel: usize, vb: VarBuilder) -> Result<Conv2d> {
    let w = vb.get((out_c, in_c, kernel, kernel, kernel), "weight")?;
    let w = w.narrow(2, kernel - 1, 1)?.squeeze(2)?.contiguous()?;
    let b = vb.get(out_c, "bias")?;
    let cfg = Conv2dConfig {
        padding: kernel / 2,
        ..Default::default()
    };
    Ok(Conv2d::new(w, Some(b), cfg))
}

/// `QwenImageRMS_norm`: `F.normalize(x, dim=1) * sqrt(C) * gamma (+ bias)`.
#[derive(Debug, Clone)]
struct RmsNorm {
    gamma: Tensor,
    bias: Option<Tensor>,
    scale: f64,
}

impl RmsNorm {
    fn new(c: usize, images: bool, vb: VarBuilder) -> Result<Self> {
        let gamma = if images {
            vb.get((c, 1, 1), "gamma")?
        } else {
            vb.get((c, 1, 1, 1), "gamma")?
        };
        let bias = if vb.contains_tensor("bias") {
            Some(vb.get(c, "bias")?.reshape((1, c, 1, 1))?)
        } else {
            None
        };
        Ok(Self {
            gamma: gamma.reshape((1, c, 1, 1))?,
            bias,
            scale: (c as f64).sqrt(),
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let norm = xs.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(1e-12f32)?;
        let ys = (xs.broadcast_div(&norm)? * self.scale)?.broadcast_mul(&self.gamma)?;
        match &self.bias {
            Some(b) => ys.broadcast_add(b),
            None => Ok(ys),
        }
    }
}

/// `QwenImageResidualBlock` for one frame.
#[derive(Debug, Clone)]
struct ResBlock {
    norm1: RmsNorm,
    conv1: Conv2d,
    norm2: RmsNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl ResBlock {
    fn new(in_c: usize, out_c: usize, vb: VarBuilder) -> Result<Self> {
        let shortcut = if in_c != out_c {
            Some(causal_conv(in_c, out_c, 1, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: RmsNorm::new(in_c, false, vb.pp("norm1"))?,
            conv1: causal_conv(in_c, out_c, 3, vb.pp("conv1"))?,
            norm2: RmsNorm::new(out_c, false, vb.pp("norm2"))?,
            conv2: causal_conv(out_c, out_c, 3, vb.pp("conv2"))?,
            shortcut,
        })
    }
}

impl Module for ResBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = match &self.shortcut {
            Some(c) => c.forward(xs)?,
            None => xs.clone(),
        };
        let x = self.conv1.forward(&self.norm1.forward(xs)?.silu()?)?;
        let x = self.conv2.forward(&self.norm2.forward(&x)?.silu()?)?;
        x + h
    }
}

/// `QwenImageAttentionBlock`: RMS norm, 1x1 `to_qkv`, single-head attention, 1x1 `proj`, residual.
#[derive(Debug, Clone)]
struct AttentionBlock {
    norm: RmsNorm,
    to_qkv: Conv2d,
    proj: Conv2d,
}

impl AttentionBlock {
    fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        let conv =
            |o: usize, name: &str| candle_nn::conv2d(c, o, 1, Conv2dConfig::default(), vb.pp(name));
        Ok(Self {
            norm: RmsNorm::new(c, true, vb.pp("norm"))?,
            to_qkv: conv(3 * c, "to_qkv")?,
            proj: conv(c, "proj")?,
        })
    }
}

impl Module for AttentionBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let qkv = self
            .to_qkv
            .forward(&self.norm.forward(xs)?)?
            .reshape((b, 3 * c, h * w))?
            .transpose(1, 2)?;
        let q = qkv.narrow(2, 0, c)?.contiguous()?;
        let k = qkv.narrow(2, c, c)?.contiguous()?;
        let v = qkv.narrow(2, 2 * c, c)?.contiguous()?;
        let scores = (q.matmul(&k.t()?.contiguous()?)? * (1.0 / (c as f64).sqrt()))?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, c, h, w))?;
        self.proj.forward(&out)? + xs
    }
}

/// `QwenImageUpBlock`: resnets, then optionally nearest 2x upsample + 3x3 conv halving channels.
#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResBlock>,
    upsampler: Option<Conv2d>,
}

impl Module for UpBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = xs.clone();
        for r in &self.resnets {
            xs = r.forward(&xs)?;
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

/// The decoding half of `AutoencoderKLQwenImage` for one frame: `post_quant_conv` and
/// `QwenImageDecoder3d`, in f32.
#[derive(Debug, Clone)]
pub struct Decoder {
    post_quant_conv: Conv2d,
    conv_in: Conv2d,
    mid: (ResBlock, AttentionBlock, ResBlock),
    up_blocks: Vec<UpBlock>,
    norm_out: RmsNorm,
    conv_out: Conv2d,
    device: Device,
}

impl Decoder {
    /// Builds the decoder from diffusers-named weights, `vb` at the VAE root.
    pub fn new(config: &Config, vb: VarBuilder) -> Result<Self> {
        config.validate().map_err(candle_core::Error::msg)?;
        let vb = vb.set_dtype(DType::F32);
        let base = config.base_dim;
        let n = config.dim_mult.len();
        let mut dims = vec![base * config.dim_mult[n - 1]];
        dims.extend(config.dim_mult.iter().rev().map(|m| base * m));
        let dec = vb.pp("decoder");
        let top = dims[0];
        let mid = dec.pp("mid_block");
        let mut up_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let in_c = if i > 0 { dims[i] / 2 } else { dims[i] };
            let out_c = dims[i + 1];
            let vb_i = dec.pp("up_blocks").pp(i);
            let resnets = (0..=config.num_res_blocks)
                .map(|j| {
                    let c = if j == 0 { in_c } else { out_c };
                    ResBlock::new(c, out_c, vb_i.pp("resnets").pp(j))
                })
                .collect::<Result<Vec<_>>>()?;
            let upsampler = if i + 1 < n {
                let cfg = Conv2dConfig {
                    padding: 1,
                    ..Default::default()
                };
                Some(candle_nn::conv2d(
                    out_c,
                    out_c / 2,
                    3,
                    cfg,
                    vb_i.pp("upsamplers.0.resample.1"),
                )?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsampler });
        }
        let bottom = dims[n];
        Ok(Self {
            post_quant_conv: causal_conv(config.z_dim, config.z_dim, 1, vb.pp("post_quant_conv"))?,
            conv_in: causal_conv(config.z_dim, top, 3, dec.pp("conv_in"))?,
            mid: (
                ResBlock::new(top, top, mid.pp("resnets.0"))?,
                AttentionBlock::new(top, mid.pp("attentions.0"))?,
                ResBlock::new(top, top, mid.pp("resnets.1"))?,
            ),
            up_blocks,
            norm_out: RmsNorm::new(bottom, false, dec.pp("norm_out"))?,
            conv_out: causal_conv(bottom, config.input_channels, 3, dec.pp("conv_out"))?,
            device: vb.device().clone(),
        })
    }

    /// Decodes `z` `[B, z_dim, h, w]` (see [`latents_to_decoder_input`]) to
    /// `[B, 3, 8h, 8w]` f32 clamped to `[-1, 1]` (frame 0 of `decode(z).sample`).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.run(z, &mut |_, _| {})?.clamp(-1f32, 1f32)
    }

    /// The stages of [`Decoder::decode`], named as diffusers' modules: `conv_in`, `mid_block`,
    /// `up_blocks.{i}`, `conv_out` (before the clamp).
    pub fn decode_stages(&self, z: &Tensor) -> Result<Vec<(String, Tensor)>> {
        let mut stages = Vec::new();
        self.run(z, &mut |name, t| stages.push((name, t.clone())))?;
        Ok(stages)
    }

    fn run(&self, z: &Tensor, observe: &mut dyn FnMut(String, &Tensor)) -> Result<Tensor> {
        let xs = z.to_device(&self.device)?.to_dtype(DType::F32)?;
        let xs = self.post_quant_conv.forward(&xs)?;
        let mut xs = self.conv_in.forward(&xs)?;
        observe("conv_in".into(), &xs);
        xs = self.mid.0.forward(&xs)?;
        xs = self.mid.1.forward(&xs)?;
        xs = self.mid.2.forward(&xs)?;
        observe("mid_block".into(), &xs);
        for (i, b) in self.up_blocks.iter().enumerate() {
            xs = b.forward(&xs)?;
            observe(format!("up_blocks.{i}"), &xs);
        }
        xs = self
            .conv_out
            .forward(&self.norm_out.forward(&xs)?.silu()?)?;
        observe("conv_out".into(), &xs);
        Ok(xs)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::test_util::max_abs_diff;

    const FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/qwen-image-pipeline-tiny"
    );

    fn config() -> Config {
        let text = std::fs::read_to_string(format!("{FIXTURE}/vae/config.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn reference() -> HashMap<String, Tensor> {
        candle_core::safetensors::load(format!("{FIXTURE}/reference.safetensors"), &Device::Cpu)
            .unwrap()
    }

    #[allow(unsafe_code)]
    fn decoder(cfg: &Config) -> Decoder {
        let path = format!("{FIXTURE}/vae/diffusion_pytorch_model.safetensors");
        // SAFETY: the fixture file is not modified while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, &Device::Cpu) }
            .unwrap();
        Decoder::new(cfg, vb).unwrap()
    }

    #[test]
    fn decoder_input_stages_and_images_match_diffusers() {
        let cfg = config();
        let dec = decoder(&cfg);
        let r = reference();
        for case in ["case0", "case1"] {
            let get = |n: &str| r[&format!("{case}.{n}")].clone();
            let vae_input = get("vae_input").squeeze(2).unwrap();
            let (_, _, h, w) = vae_input.dims4().unwrap();
            let lat = unpack_latents(&get("latents_final"), h, w).unwrap();
            let z = latents_to_decoder_input(&lat, &cfg).unwrap();
            let d = max_abs_diff(&z, &vae_input);
            eprintln!("{case} vae_input: {d:e}");
            assert!(d <= 1e-6, "{case} vae_input {d}");
            for (name, got) in dec.decode_stages(&vae_input).unwrap() {
                let d = max_abs_diff(&got, &get(&format!("vae_stage.{name}")).squeeze(2).unwrap());
                eprintln!("{case} {name}: {d:e}");
                assert!(d <= 1e-4, "{case} {name} {d}");
            }
            let out = dec.decode(&vae_input).unwrap();
            let d = max_abs_diff(&out, &get("vae_output").squeeze(2).unwrap());
            eprintln!("{case} vae_output: {d:e}");
            assert!(d <= 1e-4);
            let d = max_abs_diff(
                &to_image_f32(&out).unwrap().squeeze(0).unwrap(),
                &get("image"),
            );
            assert!(d <= 1e-4);
            let rgb = to_rgb8(&out).unwrap();
            let exp = get("image_uint8")
                .flatten_all()
                .unwrap()
                .to_vec1::<u8>()
                .unwrap();
            let off: Vec<u8> = rgb[0]
                .iter()
                .zip(&exp)
                .map(|(a, b)| a.abs_diff(*b))
                .collect();
            let n = off.iter().filter(|&&x| x > 0).count();
            eprintln!("{case} uint8: {n} differ");
            assert!(off.iter().all(|&x| x <= 1) && n <= 8);
        }
    }
}
