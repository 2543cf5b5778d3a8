//! Building blocks shared by the DiT model files: adaLN modulation, plain LayerNorm, QK-normed
//! projections, rotary attention, the sinusoidal timestep projection, MLPs. Each mirrors the
//! diffusers module named in its doc comment, with diffusers' weight names.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::{LayerNorm, RmsNorm, VarBuilder};

/// Whether layers use differentiable composite ops instead of candle's fused kernels (which
/// have no backward pass: layer norm, RMS norm, softmax, rotary embedding). Off for serving;
/// a training process turns it on once with [`set_differentiable`]. The results agree to
/// float rounding (tested).
static DIFFERENTIABLE: AtomicBool = AtomicBool::new(false);

/// Switches every layer of this process to differentiable ops (for training with candle's
/// autograd) or back to the fused inference kernels.
pub fn set_differentiable(on: bool) {
    DIFFERENTIABLE.store(on, Ordering::Relaxed);
}

fn differentiable() -> bool {
    DIFFERENTIABLE.load(Ordering::Relaxed)
}

/// RMS norm over the last dimension with a gain, through the fused kernel or composite ops.
pub(crate) fn rms_norm(xs: &Tensor, norm: &RmsNorm, weight: &Tensor) -> Result<Tensor> {
    if differentiable() {
        candle_nn::ops::rms_norm_slow(xs, weight, NORM_EPS as f32)
    } else {
        norm.forward(xs)
    }
}

/// Width of the sinusoidal timestep projection.
pub const TIME_PROJ_DIM: usize = 256;
/// Epsilon of every norm in these models.
pub const NORM_EPS: f64 = 1e-6;

/// Sinusoidal projection of timesteps (diffusers' `Timesteps(256, flip_sin_to_cos=True,
/// downscale_freq_shift=0, scale=after)`), in f32 as diffusers computes it: the argument is
/// `((v * before) * freq) * after`, `[B, 256]` as `[cos | sin]`. FLUX scales the timestep by
/// 1000 before (`before = 1000, after = 1`), Qwen-Image after (`before = 1, after = 1000`);
/// the rounding differs, so both are kept.
pub fn timestep_projection(values: &Tensor, before: f32, after: f32) -> Result<Tensor> {
    let half = TIME_PROJ_DIM / 2;
    let neg_log_period = -(10_000f64.ln()) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|k| (neg_log_period * k as f32 / half as f32).exp())
        .collect();
    let values = values.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let mut out = Vec::with_capacity(values.len() * TIME_PROJ_DIM);
    for v in &values {
        let v = v * before;
        let args: Vec<f32> = freqs.iter().map(|f| (v * f) * after).collect();
        out.extend(args.iter().map(|a| a.cos()));
        out.extend(args.iter().map(|a| a.sin()));
    }
    Tensor::from_vec(out, (values.len(), TIME_PROJ_DIM), &Device::Cpu)
}

/// Two linears with SiLU between (diffusers' `TimestepEmbedding` and
/// `PixArtAlphaTextProjection` share this layout).
#[derive(Debug, Clone)]
pub(crate) struct Mlp2 {
    linear_1: Linear,
    linear_2: Linear,
}

impl Mlp2 {
    pub(crate) fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear_1: linear(in_dim, out_dim, vb.pp("linear_1"))?,
            linear_2: linear(out_dim, out_dim, vb.pp("linear_2"))?,
        })
    }
}

impl Module for Mlp2 {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(xs)?.silu()?)
    }
}

/// LayerNorm without affine parameters (eps 1e-6), as FLUX's adaLN norms use.
///
/// Inputs are made contiguous first: candle's fused kernel only runs on contiguous tensors
/// and its fallback rounds differently, so without this the result would depend on whether
/// a stream arrived as a view (in-process) or fresh from the wire.
#[derive(Debug, Clone)]
pub(crate) struct PlainNorm(LayerNorm);

impl PlainNorm {
    pub(crate) fn new(dim: usize, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self(LayerNorm::new(
            Tensor::ones(dim, dtype, device)?,
            Tensor::zeros(dim, dtype, device)?,
            NORM_EPS,
        )))
    }
}

impl Module for PlainNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if differentiable() {
            let mean = xs.mean_keepdim(D::Minus1)?;
            let centred = xs.broadcast_sub(&mean)?;
            let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
            return centred.broadcast_div(&(var + NORM_EPS)?.sqrt()?);
        }
        self.0.forward(&xs.contiguous()?)
    }
}

/// `x * (1 + scale) + shift` with `[B, D]` modulation broadcast over tokens.
pub(crate) fn modulate(xs: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    xs.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?
        .broadcast_add(&shift.unsqueeze(1)?)
}

/// `gate[:, None] * xs`.
pub(crate) fn gated(gate: &Tensor, xs: &Tensor) -> Result<Tensor> {
    xs.broadcast_mul(&gate.unsqueeze(1)?)
}

/// A linear layer whose result for one sample does not depend on the batch it arrives in.
///
/// candle folds a batch into the rows of one GEMM, and gemm's blocking and kernel choice
/// depend on the row count, so the same sample alone and stacked with others would differ in
/// the last bits. Serving runs the GEMM per sample instead (the same arithmetic as that sample
/// alone), so batched requests (CFG branches, cross-session batching) are bit-identical to
/// unbatched ones; training keeps the folded GEMM.
#[derive(Debug, Clone)]
pub struct Linear(candle_nn::Linear);

/// A [`Linear`] with diffusers' weight names (`weight`, `bias`).
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear(candle_nn::linear(in_dim, out_dim, vb)?))
}

impl Linear {
    /// A [`Linear`] from an already loaded `weight` `[out, in]` and optional `bias` `[out]`
    /// (for layers without a bias, or kept in another dtype than the `VarBuilder`'s).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self(candle_nn::Linear::new(weight, bias))
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let rows = xs.dim(0)?;
        if rows <= 1 || xs.rank() < 2 || differentiable() {
            return self.0.forward(xs);
        }
        let outs = (0..rows)
            .map(|r| self.0.forward(&xs.narrow(0, r, 1)?))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&outs, 0)
    }
}

/// Splits `linear(silu(temb))` into `N` chunks of `[B, dim]`.
pub(crate) fn ada_chunks<const N: usize>(linear: &Linear, temb: &Tensor) -> Result<[Tensor; N]> {
    let chunks = linear.forward(&temb.silu()?)?.chunk(N, 1)?;
    let got = chunks.len();
    chunks
        .try_into()
        .map_err(|_| candle_core::Error::msg(format!("adaLN: expected {N} chunks, got {got}")))
}

/// Splits `[B, S, H*D]` into heads, RMS-normalises each head and returns `[B, H, S, D]` in f32.
pub(crate) fn heads(
    xs: &Tensor,
    norm: Option<&(RmsNorm, Tensor)>,
    num_heads: usize,
) -> Result<Tensor> {
    let (b, s, _) = xs.dims3()?;
    let xs = xs.reshape((b, s, num_heads, ()))?;
    let xs = match norm {
        Some((n, w)) => rms_norm(&xs, n, w)?,
        None => xs,
    };
    xs.transpose(1, 2)?.to_dtype(DType::F32)?.contiguous()
}

/// `rope_i` from composite ops: adjacent channel pairs `(x0, x1)` of `[B, H, S, D]` become
/// `(x0 cos - x1 sin, x0 sin + x1 cos)`.
fn rope_pairs(x: &Tensor, rope: &(Tensor, Tensor)) -> Result<Tensor> {
    let (b, h, s, d) = x.dims4()?;
    let pairs = x.reshape((b, h, s, d / 2, 2))?;
    let x0 = pairs.narrow(4, 0, 1)?;
    let x1 = pairs.narrow(4, 1, 1)?;
    let cos = rope.0.reshape((1, 1, s, d / 2, 1))?;
    let sin = rope.1.reshape((1, 1, s, d / 2, 1))?;
    let out0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
    let out1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
    Tensor::cat(&[&out0, &out1], 4)?.reshape((b, h, s, d))
}

/// Scaled dot-product attention over `[B, H, S, D]` f32 tensors with rotary embedding applied
/// to q and k (adjacent channel pairs rotated, `rope` = `(cos, sin)` `[S, D/2]`); `key_bias`,
/// when given, is added to the scores (`[B, 1, 1, S]`, `-inf` masks a key). Returns
/// `[B, S, H*D]` in `out_dtype`.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rope: &(Tensor, Tensor),
    key_bias: Option<&Tensor>,
    out_dtype: DType,
) -> Result<Tensor> {
    let (q, k) = if differentiable() {
        (rope_pairs(q, rope)?, rope_pairs(k, rope)?)
    } else {
        (
            candle_nn::rotary_emb::rope_i(q, &rope.0, &rope.1)?,
            candle_nn::rotary_emb::rope_i(k, &rope.0, &rope.1)?,
        )
    };
    let (b, h, s, d) = q.dims4()?;
    let scale = 1.0 / (d as f64).sqrt();
    let mut scores = (q.matmul(&k.t()?)? * scale)?;
    if let Some(bias) = key_bias {
        scores = scores.broadcast_add(bias)?;
    }
    let probs = if differentiable() {
        candle_nn::ops::softmax(&scores, D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&scores)?
    };
    probs
        .matmul(v)?
        .transpose(1, 2)?
        .reshape((b, s, h * d))?
        .to_dtype(out_dtype)
}

/// q/k/v projections with per-head QK RMSNorm (diffusers' `FluxAttention` input side).
#[derive(Debug, Clone)]
pub(crate) struct Qkv {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    norm_q: (RmsNorm, Tensor),
    norm_k: (RmsNorm, Tensor),
}

/// An RMS norm with gain `weight` of `size`, kept with its weight for the composite path.
pub(crate) fn rms_norm_layer(size: usize, vb: VarBuilder) -> Result<(RmsNorm, Tensor)> {
    let weight = vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?;
    Ok((RmsNorm::new(weight.clone(), NORM_EPS), weight))
}

impl Qkv {
    /// `names`: the weight names of q, k, v, q-norm and k-norm under `vb`.
    pub(crate) fn new(
        dim: usize,
        head_dim: usize,
        names: [&str; 5],
        vb: &VarBuilder,
    ) -> Result<Self> {
        let [q, k, v, nq, nk] = names;
        Ok(Self {
            to_q: linear(dim, dim, vb.pp(q))?,
            to_k: linear(dim, dim, vb.pp(k))?,
            to_v: linear(dim, dim, vb.pp(v))?,
            norm_q: rms_norm_layer(head_dim, vb.pp(nq))?,
            norm_k: rms_norm_layer(head_dim, vb.pp(nk))?,
        })
    }

    /// `(q, k, v)` as `[B, H, S, D]` f32.
    pub(crate) fn project(
        &self,
        xs: &Tensor,
        num_heads: usize,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        Ok((
            heads(&self.to_q.forward(xs)?, Some(&self.norm_q), num_heads)?,
            heads(&self.to_k.forward(xs)?, Some(&self.norm_k), num_heads)?,
            heads(&self.to_v.forward(xs)?, None, num_heads)?,
        ))
    }
}

/// diffusers' `FeedForward(dim, activation_fn="gelu-tanh-approximate")`.
#[derive(Debug, Clone)]
pub(crate) struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    pub(crate) fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            proj_in: linear(dim, dim * 4, vb.pp("net.0.proj"))?,
            proj_out: linear(dim * 4, dim, vb.pp("net.2"))?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.proj_out.forward(&self.proj_in.forward(xs)?.gelu()?)
    }
}

/// Weight names that differ between the dual-stream blocks of FLUX and Qwen-Image.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DualStreamNames {
    /// adaLN linear of the image stream (`norm1.linear` / `img_mod.1`).
    pub img_mod: &'static str,
    /// adaLN linear of the text stream (`norm1_context.linear` / `txt_mod.1`).
    pub txt_mod: &'static str,
    /// Image MLP (`ff` / `img_mlp`).
    pub img_mlp: &'static str,
    /// Text MLP (`ff_context` / `txt_mlp`).
    pub txt_mlp: &'static str,
}

/// What blocks run with TaylorSeer's attention hook return: the streams `(image, text)` and
/// the attention outputs every block used (one list per block).
pub type HookedBlocks = ((Tensor, Tensor), Vec<Vec<Tensor>>);

/// A dual-stream (MM-DiT) block: adaLN-Zero modulation of each stream (chunks shift, scale,
/// gate for attention, then for the MLP), joint attention over `[text ; image]` with
/// per-stream QK-normed projections, gated residuals, per-stream MLPs. FLUX's
/// `FluxTransformerBlock` and Qwen-Image's `QwenImageTransformerBlock` are both this.
#[derive(Debug, Clone)]
pub(crate) struct DualStreamBlock {
    img_mod: Linear,
    txt_mod: Linear,
    img_qkv: Qkv,
    txt_qkv: Qkv,
    to_out: Linear,
    to_add_out: Linear,
    img_mlp: FeedForward,
    txt_mlp: FeedForward,
    norm: PlainNorm,
    num_heads: usize,
}

impl DualStreamBlock {
    pub(crate) fn new(
        dim: usize,
        head_dim: usize,
        num_heads: usize,
        names: DualStreamNames,
        vb: VarBuilder,
    ) -> Result<Self> {
        let attn = vb.pp("attn");
        Ok(Self {
            img_mod: linear(dim, 6 * dim, vb.pp(names.img_mod))?,
            txt_mod: linear(dim, 6 * dim, vb.pp(names.txt_mod))?,
            img_qkv: Qkv::new(
                dim,
                head_dim,
                ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
                &attn,
            )?,
            txt_qkv: Qkv::new(
                dim,
                head_dim,
                [
                    "add_q_proj",
                    "add_k_proj",
                    "add_v_proj",
                    "norm_added_q",
                    "norm_added_k",
                ],
                &attn,
            )?,
            to_out: linear(dim, dim, attn.pp("to_out.0"))?,
            to_add_out: linear(dim, dim, attn.pp("to_add_out"))?,
            img_mlp: FeedForward::new(dim, vb.pp(names.img_mlp))?,
            txt_mlp: FeedForward::new(dim, vb.pp(names.txt_mlp))?,
            norm: PlainNorm::new(dim, vb.dtype(), vb.device())?,
            num_heads,
        })
    }

    /// The modulated image stream entering attention: TeaCache's indicator for block 0.
    pub(crate) fn modulated_input(&self, img: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let [shift, scale, ..] = ada_chunks::<6>(&self.img_mod, temb)?;
        modulate(&self.norm.forward(img)?, &shift, &scale)
    }

    /// Returns `(img, txt)` after the block.
    pub(crate) fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb: &Tensor,
        rope: &(Tensor, Tensor),
        key_bias: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let (out, _) = self.forward_hooked(img, txt, temb, rope, key_bias, None)?;
        Ok(out)
    }

    /// The attention module's outputs `[image, text]` (after `to_out` / `to_add_out`, what
    /// diffusers' `attn` returns), computed from the streams.
    fn attention_outputs(
        &self,
        (img, txt): (&Tensor, &Tensor),
        (img_mod, txt_mod): (&[Tensor; 6], &[Tensor; 6]),
        rope: &(Tensor, Tensor),
        key_bias: Option<&Tensor>,
    ) -> Result<Vec<Tensor>> {
        let img_in = modulate(&self.norm.forward(img)?, &img_mod[0], &img_mod[1])?;
        let txt_in = modulate(&self.norm.forward(txt)?, &txt_mod[0], &txt_mod[1])?;
        let (iq, ik, iv) = self.img_qkv.project(&img_in, self.num_heads)?;
        let (tq, tk, tv) = self.txt_qkv.project(&txt_in, self.num_heads)?;
        let q = Tensor::cat(&[&tq, &iq], 2)?;
        let k = Tensor::cat(&[&tk, &ik], 2)?;
        let v = Tensor::cat(&[&tv, &iv], 2)?;
        let attn = attention(&q, &k, &v, rope, key_bias, img.dtype())?;
        let t_len = txt.dim(1)?;
        let txt_attn = attn.narrow(1, 0, t_len)?.contiguous()?;
        let img_attn = attn.narrow(1, t_len, attn.dim(1)? - t_len)?.contiguous()?;
        Ok(vec![
            self.to_out.forward(&img_attn)?,
            self.to_add_out.forward(&txt_attn)?,
        ])
    }

    /// [`Self::forward`] with TaylorSeer's hook on the attention module: `given` (`[image,
    /// text]` attention outputs) replaces computing attention; returns the block's streams
    /// and the attention outputs it used.
    pub(crate) fn forward_hooked(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb: &Tensor,
        rope: &(Tensor, Tensor),
        key_bias: Option<&Tensor>,
        given: Option<&[Tensor]>,
    ) -> Result<((Tensor, Tensor), Vec<Tensor>)> {
        let img_mod = ada_chunks::<6>(&self.img_mod, temb)?;
        let txt_mod = ada_chunks::<6>(&self.txt_mod, temb)?;
        let attn = match given {
            Some([i, t]) if i.dims() == img.dims() && t.dims() == txt.dims() => {
                vec![i.to_dtype(img.dtype())?, t.to_dtype(img.dtype())?]
            }
            Some(g) => candle_core::bail!(
                "a dual-stream block's attention outputs are [image {:?}, text {:?}], got {:?}",
                img.dims(),
                txt.dims(),
                g.iter().map(|t| t.dims().to_vec()).collect::<Vec<_>>()
            ),
            None => self.attention_outputs((img, txt), (&img_mod, &txt_mod), rope, key_bias)?,
        };
        let [_, _, gate1, shift2, scale2, gate2] = &img_mod;
        let [_, _, t_gate1, t_shift2, t_scale2, t_gate2] = &txt_mod;
        let img = (img + gated(gate1, &attn[0])?)?;
        let txt = (txt + gated(t_gate1, &attn[1])?)?;
        let img_ff = self
            .img_mlp
            .forward(&modulate(&self.norm.forward(&img)?, shift2, scale2)?)?;
        let txt_ff =
            self.txt_mlp
                .forward(&modulate(&self.norm.forward(&txt)?, t_shift2, t_scale2)?)?;
        Ok((
            (
                (img + gated(gate2, &img_ff)?)?,
                (txt + gated(t_gate2, &txt_ff)?)?,
            ),
            attn,
        ))
    }
}
