//! T5 encoder: a candle port of transformers' `T5EncoderModel`, the second text encoder of a
//! FLUX pipeline (`text_encoder_2/`, t5-v1_1-xxl), whose last hidden state becomes FLUX's
//! `encoder_hidden_states`.
//!
//! Weight names follow transformers (`shared.weight` or `encoder.embed_tokens.weight`,
//! `encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight`, ...). The forward pass matches
//! transformers 5: unscaled attention scores plus a bucketed relative position bias that block 0
//! owns and every block reuses, RMS layer norms without bias (variance in f32), residual adds,
//! a (gated) feed-forward and `final_layer_norm`. FLUX calls it without an attention mask, so
//! none is taken: padding tokens attend and are attended.
//!
//! Real checkpoints are bf16, and transformers keeps every `wo` in f32 (`T5PreTrainedModel.
//! _keep_in_fp32_modules = ["wo"]`). This port does the same whatever the `VarBuilder` dtype:
//! `wo` is loaded and computed in f32, and, as in torch's type promotion, the residual stream
//! becomes f32 from the first feed-forward residual add on while the norms return their weight
//! dtype. (transformers' clamp of fp16 infinities inside `T5Block` is not ported: run f32 or bf16.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

use super::layers::Linear;

/// `config.json` of a transformers `T5EncoderModel` (`text_encoder_2/` of a FLUX pipeline). Every
/// key that sizes the network is required; the activation comes from `feed_forward_proj` as
/// transformers derives it (the saved `dense_act_fn` / `is_gated_act` are ignored, as there).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct T5Config {
    /// Rows of the token embedding.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub d_model: usize,
    /// Width of one attention head (`num_heads * d_kv` need not equal `d_model`).
    pub d_kv: usize,
    /// Width of the feed-forward hidden layer.
    pub d_ff: usize,
    /// Number of encoder blocks.
    pub num_layers: usize,
    /// Attention heads per block.
    pub num_heads: usize,
    /// Number of relative position buckets (half for each direction in the encoder).
    pub relative_attention_num_buckets: usize,
    /// Distance from which all relative positions share the last bucket.
    pub relative_attention_max_distance: usize,
    /// Epsilon of every T5 layer norm.
    pub layer_norm_epsilon: f64,
    /// `"[gated-]ACT"` with ACT one of `relu`, `gelu`, `gelu_new`, `silu`; `"gated-gelu"`
    /// means `gelu_new` (tanh approximation), as in transformers.
    pub feed_forward_proj: String,
}

/// The feed-forward activation named by `feed_forward_proj`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum T5Activation {
    /// `max(x, 0)`.
    Relu,
    /// Exact (erf) GELU (transformers' `gelu`).
    Gelu,
    /// Tanh-approximated GELU (transformers' `gelu_new`; T5 v1.1 and FLUX's T5-XXL).
    GeluNew,
    /// `x * sigmoid(x)`.
    Silu,
}

impl T5Activation {
    fn apply(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Relu => xs.relu(),
            Self::Gelu => xs.gelu_erf(),
            Self::GeluNew => xs.gelu(),
            Self::Silu => xs.silu(),
        }
    }
}

/// The feed-forward layout a `feed_forward_proj` value selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedForwardKind {
    /// Gated (`wo(act(wi_0 x) * wi_1 x)`) rather than plain (`wo(act(wi x))`).
    pub gated: bool,
    /// The activation.
    pub activation: T5Activation,
}

impl T5Config {
    /// Parses `feed_forward_proj` as transformers' `T5Config.__init__` does.
    pub fn feed_forward(&self) -> std::result::Result<FeedForwardKind, String> {
        let parts: Vec<&str> = self.feed_forward_proj.split('-').collect();
        let (gated, act) = match parts.as_slice() {
            ["gated", act] => (true, *act),
            [act] => (false, *act),
            _ => return Err(self.bad_feed_forward()),
        };
        let activation = match (gated, act) {
            (true, "gelu") | (_, "gelu_new") => T5Activation::GeluNew,
            (false, "gelu") => T5Activation::Gelu,
            (_, "relu") => T5Activation::Relu,
            (_, "silu") => T5Activation::Silu,
            _ => return Err(self.bad_feed_forward()),
        };
        Ok(FeedForwardKind { gated, activation })
    }

    fn bad_feed_forward(&self) -> String {
        format!(
            "feed_forward_proj '{}' is not supported: expected '[gated-]ACT' with ACT one of \
             relu, gelu, gelu_new, silu",
            self.feed_forward_proj
        )
    }

    /// Checks the consistency transformers assumes (non-empty sizes, a known activation).
    pub fn validate(&self) -> std::result::Result<(), String> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            (
                "relative_attention_num_buckets",
                self.relative_attention_num_buckets,
            ),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be > 0"));
        }
        self.feed_forward().map(|_| ())
    }

    fn inner_dim(&self) -> usize {
        self.num_heads * self.d_kv
    }
}

/// transformers' `T5Attention._relative_position_bucket` for one relative position
/// (`memory_position - query_position`), with torch's arithmetic: the large-distance bucket is
/// `max_exact + trunc(log(f32(n) / max_exact) / f32(ln(max_distance / max_exact)) *
/// (buckets - max_exact))`, every step in f32, so that e.g. `n = 16` of 32 bidirectional
/// buckets lands exactly on bucket offset 2, as in torch.
pub fn relative_position_bucket(
    relative_position: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let mut num_buckets = num_buckets as i64;
    let mut bucket = 0i64;
    let distance = if bidirectional {
        num_buckets /= 2;
        if relative_position > 0 {
            bucket += num_buckets;
        }
        relative_position.abs()
    } else {
        -relative_position.min(0)
    };
    let max_exact = num_buckets / 2;
    if distance < max_exact {
        return (bucket + distance) as usize;
    }
    let log_range = ((max_distance as f64) / (max_exact as f64)).ln() as f32;
    let scaled = ((distance as f32) / (max_exact as f32)).ln() / log_range
        * ((num_buckets - max_exact) as f32);
    let large = (max_exact + scaled as i64).min(num_buckets - 1);
    (bucket + large) as usize
}

/// T5's layer norm (`T5LayerNorm`): RMS without mean subtraction or bias,
/// `weight * (x * rsqrt(mean(x^2) + eps))` with the statistics in f32 and the normalised value
/// cast to the weight's dtype before the gain.
#[derive(Debug, Clone)]
struct T5LayerNorm {
    weight: Tensor,
    eps: f64,
}

impl T5LayerNorm {
    fn new(cfg: &T5Config, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(cfg.d_model, "weight")?,
            eps: cfg.layer_norm_epsilon,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = xs.to_dtype(DType::F32)?;
        let variance = xs.sqr()?.mean_keepdim(D::Minus1)?;
        let inv_rms = (variance + self.eps)?.sqrt()?.recip()?;
        xs.broadcast_mul(&inv_rms)?
            .to_dtype(self.weight.dtype())?
            .broadcast_mul(&self.weight)
    }
}

/// `a + b`, promoted to f32 when the dtypes differ (torch's type promotion for the residual
/// adds next to the f32 `wo`).
fn add_promoting(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dtype() == b.dtype() {
        a + b
    } else {
        a.to_dtype(DType::F32)? + b.to_dtype(DType::F32)?
    }
}

/// A linear layer without bias, `[out, in]` weight named `weight` under `vb`, in `dtype`.
fn linear_no_bias(in_dim: usize, out_dim: usize, dtype: DType, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get_with_hints_dtype((out_dim, in_dim), "weight", Default::default(), dtype)?;
    Ok(Linear::new(weight, None))
}

/// The `[1, H, S, S]` relative position bias for a sequence length, cached per length.
type BiasCache = Arc<Mutex<HashMap<usize, Tensor>>>;

/// transformers' `T5Attention` in the encoder (bidirectional, no mask, no score scaling).
#[derive(Debug, Clone)]
struct T5Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    num_heads: usize,
}

impl T5Attention {
    fn new(cfg: &T5Config, vb: VarBuilder) -> Result<Self> {
        let (d, inner, dtype) = (cfg.d_model, cfg.inner_dim(), vb.dtype());
        Ok(Self {
            q: linear_no_bias(d, inner, dtype, vb.pp("q"))?,
            k: linear_no_bias(d, inner, dtype, vb.pp("k"))?,
            v: linear_no_bias(d, inner, dtype, vb.pp("v"))?,
            o: linear_no_bias(inner, d, dtype, vb.pp("o"))?,
            num_heads: cfg.num_heads,
        })
    }

    /// `[B, S, H*D]` -> `[B, H, S, D]`.
    fn heads(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, s, _) = xs.dims3()?;
        xs.reshape((b, s, self.num_heads, ()))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `bias`: `[1, H, S, S]` added to the unscaled scores.
    fn forward(&self, xs: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (b, s, _) = xs.dims3()?;
        let q = self.heads(&self.q.forward(xs)?)?;
        let k = self.heads(&self.k.forward(xs)?)?;
        let v = self.heads(&self.v.forward(xs)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(bias)?;
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, ()))?;
        self.o.forward(&out)
    }
}

/// transformers' `T5DenseGatedActDense` / `T5DenseActDense`, with `wo` in f32.
#[derive(Debug, Clone)]
struct T5FeedForward {
    wi_0: Linear,
    wi_1: Option<Linear>,
    wo: Linear,
    activation: T5Activation,
}

impl T5FeedForward {
    fn new(cfg: &T5Config, vb: VarBuilder) -> Result<Self> {
        let kind = cfg.feed_forward().map_err(candle_core::Error::msg)?;
        let (d, ff, dtype) = (cfg.d_model, cfg.d_ff, vb.dtype());
        let (wi_0, wi_1) = if kind.gated {
            let wi_0 = linear_no_bias(d, ff, dtype, vb.pp("wi_0"))?;
            (wi_0, Some(linear_no_bias(d, ff, dtype, vb.pp("wi_1"))?))
        } else {
            (linear_no_bias(d, ff, dtype, vb.pp("wi"))?, None)
        };
        Ok(Self {
            wi_0,
            wi_1,
            wo: linear_no_bias(ff, d, DType::F32, vb.pp("wo"))?,
            activation: kind.activation,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut hidden = self.activation.apply(&self.wi_0.forward(xs)?)?;
        if let Some(wi_1) = &self.wi_1 {
            hidden = (hidden * wi_1.forward(xs)?)?;
        }
        self.wo.forward(&hidden.to_dtype(DType::F32)?)
    }
}

/// transformers' `T5Block` of the encoder: pre-norm self-attention and feed-forward, each with
/// a residual add (`layer.0` and `layer.1` in the weight names).
#[derive(Debug, Clone)]
struct T5Block {
    attn_norm: T5LayerNorm,
    attn: T5Attention,
    ff_norm: T5LayerNorm,
    ff: T5FeedForward,
}

impl T5Block {
    fn new(cfg: &T5Config, vb: VarBuilder) -> Result<Self> {
        let (attn_vb, ff_vb) = (vb.pp("layer").pp(0), vb.pp("layer").pp(1));
        Ok(Self {
            attn_norm: T5LayerNorm::new(cfg, attn_vb.pp("layer_norm"))?,
            attn: T5Attention::new(cfg, attn_vb.pp("SelfAttention"))?,
            ff_norm: T5LayerNorm::new(cfg, ff_vb.pp("layer_norm"))?,
            ff: T5FeedForward::new(cfg, ff_vb.pp("DenseReluDense"))?,
        })
    }

    fn forward(&self, xs: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let attn = self.attn.forward(&self.attn_norm.forward(xs)?, bias)?;
        let xs = add_promoting(xs, &attn)?;
        let ff = self.ff.forward(&self.ff_norm.forward(&xs)?)?;
        add_promoting(&xs, &ff)
    }
}

/// What [`T5Encoder::forward`] returns.
#[derive(Debug, Clone)]
pub struct T5Output {
    /// transformers' `hidden_states` (`num_layers + 1` tensors `[B, S, d_model]`): the input
    /// of every block (token embeddings first, then the outputs of blocks `0..L-1`), and last
    /// the output of the final block AFTER `final_layer_norm` (= `last_hidden_state`); the last
    /// block's output before that norm is not among them, as in transformers.
    pub hidden_states: Vec<Tensor>,
    /// `[B, S, d_model]` after `final_layer_norm`: FLUX's `prompt_embeds`.
    pub last_hidden_state: Tensor,
}

/// transformers' `T5EncoderModel`: FLUX's T5 text encoder.
#[derive(Debug, Clone)]
pub struct T5Encoder {
    embed_tokens: Embedding,
    blocks: Vec<T5Block>,
    final_layer_norm: T5LayerNorm,
    relative_attention_bias: Tensor,
    num_buckets: usize,
    max_distance: usize,
    bias_cache: BiasCache,
}

impl T5Encoder {
    /// Builds the encoder from `vb_root` (the root of `text_encoder_2`'s weights); the token
    /// embedding is `shared.weight` or, failing that, `encoder.embed_tokens.weight`.
    pub fn new(cfg: &T5Config, vb_root: VarBuilder) -> Result<Self> {
        cfg.validate()
            .map_err(|e| candle_core::Error::msg(format!("T5 config: {e}")))?;
        let embed_vb = if vb_root.contains_tensor("shared.weight") {
            vb_root.pp("shared")
        } else {
            vb_root.pp("encoder").pp("embed_tokens")
        };
        let vb = vb_root.pp("encoder");
        let blocks = (0..cfg.num_layers)
            .map(|i| T5Block::new(cfg, vb.pp("block").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let relative_attention_bias = vb
            .pp("block.0.layer.0.SelfAttention.relative_attention_bias")
            .get(
                (cfg.relative_attention_num_buckets, cfg.num_heads),
                "weight",
            )?;
        Ok(Self {
            embed_tokens: candle_nn::embedding(cfg.vocab_size, cfg.d_model, embed_vb)?,
            blocks,
            final_layer_norm: T5LayerNorm::new(cfg, vb.pp("final_layer_norm"))?,
            relative_attention_bias,
            num_buckets: cfg.relative_attention_num_buckets,
            max_distance: cfg.relative_attention_max_distance,
            bias_cache: Arc::default(),
        })
    }

    /// Encodes `input_ids` `[B, S]` (u32 or i64) without an attention mask, as the FLUX
    /// pipeline calls it.
    pub fn forward(&self, input_ids: &Tensor) -> Result<T5Output> {
        let seq_len = input_ids.dim(1)?;
        let bias = self.position_bias(seq_len)?;
        let mut xs = self.embed_tokens.forward(input_ids)?;
        let mut hidden_states = Vec::with_capacity(self.blocks.len() + 1);
        for block in &self.blocks {
            hidden_states.push(xs.clone());
            xs = block.forward(&xs, &bias)?;
        }
        let last_hidden_state = self.final_layer_norm.forward(&xs)?;
        hidden_states.push(last_hidden_state.clone());
        Ok(T5Output {
            hidden_states,
            last_hidden_state,
        })
    }

    /// `[1, H, S, S]`: block 0's relative position bias (`compute_bias(S, S)`), cached per `S`.
    fn position_bias(&self, seq_len: usize) -> Result<Tensor> {
        let poisoned = |_| candle_core::Error::msg("T5 position-bias cache lock poisoned");
        if let Some(bias) = self.bias_cache.lock().map_err(poisoned)?.get(&seq_len) {
            return Ok(bias.clone());
        }
        let bias = self.compute_bias(seq_len)?;
        self.bias_cache
            .lock()
            .map_err(poisoned)?
            .insert(seq_len, bias.clone());
        Ok(bias)
    }

    fn compute_bias(&self, seq_len: usize) -> Result<Tensor> {
        let buckets: Vec<u32> = (0..seq_len as i64)
            .flat_map(|query| {
                (0..seq_len as i64).map(move |key| {
                    relative_position_bucket(key - query, true, self.num_buckets, self.max_distance)
                        as u32
                })
            })
            .collect();
        let device = self.relative_attention_bias.device();
        let buckets = Tensor::from_vec(buckets, seq_len * seq_len, device)?;
        self.relative_attention_bias
            .index_select(&buckets, 0)?
            .reshape((seq_len, seq_len, ()))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .contiguous()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::test_util::{check, max_abs_diff as max_diff};

    const FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/flux-pipeline-tiny"
    );

    fn config_json() -> String {
        std::fs::read_to_string(format!("{FIXTURE}/text_encoder_2/config.json")).unwrap()
    }

    fn config() -> T5Config {
        serde_json::from_str(&config_json()).unwrap()
    }

    #[allow(unsafe_code)]
    fn model(cfg: &T5Config) -> T5Encoder {
        let path = format!("{FIXTURE}/text_encoder_2/model.safetensors");
        // SAFETY: the fixture is not modified while the test runs.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, &Device::Cpu) }
            .unwrap();
        T5Encoder::new(cfg, vb).unwrap()
    }

    /// Values worked out by hand from transformers' formula (bidirectional, 32 buckets, max
    /// distance 128): 16 buckets per direction, exact below 8, then
    /// `8 + trunc(ln(n / 8) / ln(16) * 8)` capped at 15, plus 16 for keys after the query.
    #[test]
    fn relative_position_buckets_match_the_formula() {
        let cases: [(i64, usize); 22] = [
            (0, 0),
            (1, 17),
            (-1, 1),
            (7, 23),
            (-7, 7),
            (8, 24),
            (-8, 8),
            (-11, 8),  // ln(1.375)/ln(16)*8 = 0.919
            (-12, 9),  // 1.170
            (-15, 9),  // 1.814
            (-16, 10), // exactly 2 in f32 too
            (16, 26),
            (20, 26), // 2.644
            (-32, 12),
            (-64, 14),
            (-90, 14), // 6.984
            (-91, 15), // 7.016
            (-127, 15),
            (-128, 15), // 16 capped
            (128, 31),
            (-1000, 15),
            (1000, 31),
        ];
        for (rel, want) in cases {
            assert_eq!(
                relative_position_bucket(rel, true, 32, 128),
                want,
                "relative {rel}"
            );
        }
        // Unidirectional (decoder) rule: future keys clamp to 0, the 32 buckets cover the
        // past, exact below 16, then 16 + trunc(ln(n / 16) / ln(8) * 16).
        assert_eq!(relative_position_bucket(5, false, 32, 128), 0);
        assert_eq!(relative_position_bucket(-15, false, 32, 128), 15);
        assert_eq!(relative_position_bucket(-20, false, 32, 128), 17); // 1.717
        assert_eq!(relative_position_bucket(-32, false, 32, 128), 21); // exactly 5.333
    }

    #[test]
    fn feed_forward_proj_parses_like_transformers() {
        let mut cfg = config();
        let kind = |cfg: &T5Config| cfg.feed_forward();
        assert_eq!(
            kind(&cfg),
            Ok(FeedForwardKind {
                gated: true,
                activation: T5Activation::GeluNew
            })
        );
        for (proj, gated, activation) in [
            ("relu", false, T5Activation::Relu),
            ("gelu", false, T5Activation::Gelu),
            ("gated-silu", true, T5Activation::Silu),
            ("gated-gelu_new", true, T5Activation::GeluNew),
        ] {
            cfg.feed_forward_proj = proj.into();
            assert_eq!(
                kind(&cfg),
                Ok(FeedForwardKind { gated, activation }),
                "{proj}"
            );
        }
        for bad in ["gated-tanh", "mish", "gated-gelu-x", "fancy-gelu"] {
            cfg.feed_forward_proj = bad.into();
            assert!(kind(&cfg).is_err(), "{bad}");
        }
        let missing = config_json().replace("\"d_ff\"", "\"d_fff\"");
        assert!(serde_json::from_str::<T5Config>(&missing).is_err());
    }

    #[test]
    fn matches_transformers_on_both_cases() {
        let cfg = config();
        let model = model(&cfg);
        let refs = candle_core::safetensors::load(
            format!("{FIXTURE}/reference.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        for case in ["case0", "case1"] {
            let ids = &refs[&format!("{case}.t5_input_ids")];
            let out = model.forward(ids).unwrap();
            let layers = &refs[&format!("{case}.t5_hidden_states_layers")];
            assert_eq!(out.hidden_states.len(), layers.dim(0).unwrap());
            for (i, h) in out.hidden_states.iter().enumerate() {
                let theirs = layers.get(i).unwrap();
                check(
                    &format!("{case} hidden_states[{i}]"),
                    &h.squeeze(0).unwrap(),
                    &theirs,
                );
            }
            let embeds = &refs[&format!("{case}.prompt_embeds")];
            check(
                &format!("{case} prompt_embeds"),
                &out.last_hidden_state,
                embeds,
            );
            // Twice: the second call takes the cached bias.
            let again = model.forward(&ids.to_dtype(DType::U32).unwrap()).unwrap();
            assert_eq!(
                max_diff(&again.last_hidden_state, &out.last_hidden_state),
                0.0
            );
        }
    }

    #[test]
    fn bf16_weights_keep_wo_and_the_residual_stream_in_f32() {
        let cfg = config();
        let path = format!("{FIXTURE}/text_encoder_2/model.safetensors");
        #[allow(unsafe_code)]
        // SAFETY: the fixture is not modified while the test runs.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::BF16, &Device::Cpu) }
            .unwrap();
        let model = T5Encoder::new(&cfg, vb).unwrap();
        let ids = Tensor::new(&[[5u32, 9, 1, 0]], &Device::Cpu).unwrap();
        let out = model.forward(&ids).unwrap();
        assert_eq!(out.hidden_states[0].dtype(), DType::BF16);
        assert_eq!(out.hidden_states[1].dtype(), DType::F32);
        assert_eq!(out.last_hidden_state.dtype(), DType::BF16);
        let f32_out = super::tests::model(&cfg).forward(&ids).unwrap();
        let diff = max_diff(&out.last_hidden_state, &f32_out.last_hidden_state);
        eprintln!("bf16 vs f32 last_hidden_state: max abs diff {diff:e}");
        assert!(diff < 0.1, "bf16 run far from f32: {diff}");
    }
}
