//! Qwen2.5-VL's language model, text only: a candle port of the part of transformers'
//! `Qwen2_5_VLForConditionalGeneration` that the Qwen-Image pipeline (`text_encoder/`) runs to
//! embed a prompt. Its `hidden_states[-1]` (the final RMSNorm output) becomes Qwen-Image's
//! `encoder_hidden_states`; the vision tower and `lm_head` are never loaded.
//!
//! Text-only multimodal RoPE: without images every token has the same position on all three
//! M-RoPE axes (`0..L-1`), so the sectioned rotary tables reduce to ordinary rotate-half RoPE
//! over the whole head. Attention is causal with grouped key/value heads and q/k/v biases;
//! RMS norms compute in f32 and return their weight's dtype; the MLP is SwiGLU.
//!
//! Config: the nested transformers-5 form (`text_config` with `rope_parameters`) and the flat
//! transformers-4 form (top-level keys, `rope_theta`, `rope_scaling`) are both read.
//! Weights: the legacy names (`model.layers.N`, Qwen2.5-VL-7B-Instruct's) and transformers 5's
//! (`model.language_model.layers.N`) are both found.

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde_json::Value;

use super::layers::Linear;

/// The language model's size, read from a `Qwen2_5_VLForConditionalGeneration` config.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    /// Rows of the token embedding.
    pub vocab_size: usize,
    /// Width of the hidden states (Qwen-Image's `joint_attention_dim`).
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_key_value_heads: usize,
    /// Epsilon of every RMS norm.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Positions the model was trained for (longer inputs are refused).
    pub max_position_embeddings: usize,
}

/// Why a config could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl TextConfig {
    /// Reads a `config.json` in either form: keys from `text_config` when present, else from
    /// the top level; `rope_theta` from `rope_parameters`, `text_config` or the top level.
    pub fn from_json(root: &Value) -> std::result::Result<Self, ConfigError> {
        let text = root.get("text_config").filter(|v| v.is_object());
        let find = |key: &str| -> Option<&Value> {
            text.and_then(|t| t.get(key))
                .filter(|v| !v.is_null())
                .or_else(|| root.get(key).filter(|v| !v.is_null()))
        };
        let size = |key: &str| -> std::result::Result<usize, ConfigError> {
            find(key)
                .and_then(Value::as_u64)
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| {
                    ConfigError(format!(
                        "text_encoder config: '{key}' (a positive integer) is required, in \
                         text_config or at the top level"
                    ))
                })
        };
        let rope_theta = find("rope_parameters")
            .and_then(|p| p.get("rope_theta"))
            .or_else(|| find("rope_theta"))
            .and_then(Value::as_f64)
            .ok_or_else(|| {
                ConfigError(
                    "text_encoder config: rope_theta is required (rope_parameters.rope_theta, \
                     or rope_theta)"
                        .into(),
                )
            })?;
        let config = Self {
            vocab_size: size("vocab_size")?,
            hidden_size: size("hidden_size")?,
            intermediate_size: size("intermediate_size")?,
            num_hidden_layers: size("num_hidden_layers")?,
            num_attention_heads: size("num_attention_heads")?,
            num_key_value_heads: size("num_key_value_heads")?,
            rms_norm_eps: find("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6),
            rope_theta,
            max_position_embeddings: find("max_position_embeddings")
                .and_then(Value::as_u64)
                .map_or(128_000, |n| n as usize),
        };
        config.validate(find)?;
        Ok(config)
    }

    fn validate<'a>(
        &self,
        find: impl Fn(&str) -> Option<&'a Value>,
    ) -> std::result::Result<(), ConfigError> {
        let heads = self.num_attention_heads;
        if !self.hidden_size.is_multiple_of(heads)
            || !heads.is_multiple_of(self.num_key_value_heads)
        {
            return Err(ConfigError(format!(
                "text_encoder config: hidden_size {} must divide into {heads} heads, and the \
                 heads into {} key/value heads",
                self.hidden_size, self.num_key_value_heads
            )));
        }
        let half = self.head_dim() / 2;
        let section = find("rope_parameters")
            .and_then(|p| p.get("mrope_section"))
            .or_else(|| find("rope_scaling").and_then(|p| p.get("mrope_section")));
        if let Some(s) = section.and_then(Value::as_array) {
            let total: u64 = s.iter().filter_map(Value::as_u64).sum();
            if total as usize != half {
                return Err(ConfigError(format!(
                    "text_encoder config: mrope_section sums to {total}, expected head_dim / 2 = \
                     {half}"
                )));
            }
        }
        if !(self.rope_theta > 0.0 && self.rms_norm_eps >= 0.0) {
            return Err(ConfigError(
                "text_encoder config: rope_theta must be positive and rms_norm_eps not negative"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// Qwen2's RMS norm: mean square in f32, the weight applied in its own dtype.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            eps,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        let x = xs.to_dtype(DType::F32)?;
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .to_dtype(self.weight.dtype())?
            .broadcast_mul(&self.weight)?
            .to_dtype(dtype)
    }
}

fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = if bias {
        Some(vb.get(out_dim, "bias")?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

/// Causal self-attention with grouped key/value heads.
#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(c: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let (d, hd) = (c.hidden_size, c.head_dim());
        let kv = c.num_key_value_heads * hd;
        Ok(Self {
            q: linear(d, c.num_attention_heads * hd, true, vb.pp("q_proj"))?,
            k: linear(d, kv, true, vb.pp("k_proj"))?,
            v: linear(d, kv, true, vb.pp("v_proj"))?,
            o: linear(c.num_attention_heads * hd, d, false, vb.pp("o_proj"))?,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: hd,
        })
    }

    /// `[B, L, H*D]` -> `[B, H, L, D]` in f32.
    fn split(&self, xs: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, l, _) = xs.dims3()?;
        xs.reshape((b, l, heads, self.head_dim))?
            .transpose(1, 2)?
            .to_dtype(DType::F32)?
            .contiguous()
    }

    fn forward(&self, xs: &Tensor, rope: &(Tensor, Tensor), causal: &Tensor) -> Result<Tensor> {
        let (b, l, _) = xs.dims3()?;
        let rot = |t: Tensor| candle_nn::rotary_emb::rope(&t, &rope.0, &rope.1);
        let q = rot(self.split(&self.q.forward(xs)?, self.heads)?)?;
        let k = rot(self.split(&self.k.forward(xs)?, self.kv_heads)?)?;
        let v = self.split(&self.v.forward(xs)?, self.kv_heads)?;
        let group = self.heads / self.kv_heads;
        let repeat = |t: Tensor| -> Result<Tensor> {
            if group == 1 {
                return Ok(t);
            }
            let (b, h, l, d) = t.dims4()?;
            t.unsqueeze(2)?
                .expand((b, h, group, l, d))?
                .reshape((b, h * group, l, d))
        };
        let (k, v) = (repeat(k)?, repeat(v)?);
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(causal)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, l, self.heads * self.head_dim))?
            .to_dtype(xs.dtype())?;
        self.o.forward(&out)
    }
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let gated = (self.gate.forward(xs)?.silu()? * self.up.forward(xs)?)?;
        self.down.forward(&gated)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn new(c: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let (d, i) = (c.hidden_size, c.intermediate_size);
        let m = vb.pp("mlp");
        Ok(Self {
            input_norm: RmsNorm::new(d, c.rms_norm_eps, vb.pp("input_layernorm"))?,
            attn: Attention::new(c, vb.pp("self_attn"))?,
            post_norm: RmsNorm::new(d, c.rms_norm_eps, vb.pp("post_attention_layernorm"))?,
            mlp: Mlp {
                gate: linear(d, i, false, m.pp("gate_proj"))?,
                up: linear(d, i, false, m.pp("up_proj"))?,
                down: linear(i, d, false, m.pp("down_proj"))?,
            },
        })
    }

    fn forward(&self, xs: &Tensor, rope: &(Tensor, Tensor), causal: &Tensor) -> Result<Tensor> {
        let h = (xs
            + self
                .attn
                .forward(&self.input_norm.forward(xs)?, rope, causal)?)?;
        &h + self.mlp.forward(&self.post_norm.forward(&h)?)?
    }
}

/// The language model of Qwen2.5-VL as a text encoder.
#[derive(Debug, Clone)]
pub struct Qwen25VlTextModel {
    embed: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    config: TextConfig,
    device: Device,
}

/// The weight prefix of the language model: transformers 5's `model.language_model`, or the
/// legacy `model` of Qwen2.5-VL-7B-Instruct / Qwen-Image's checkpoint.
fn language_model_prefix(vb: &VarBuilder) -> &'static str {
    if vb.contains_tensor("model.language_model.embed_tokens.weight") {
        "model.language_model"
    } else {
        "model"
    }
}

impl Qwen25VlTextModel {
    /// Builds the language model from a `text_encoder/` `VarBuilder` at its root.
    pub fn new(config: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp(language_model_prefix(&vb));
        let c = config;
        let embed = candle_nn::embedding(c.vocab_size, c.hidden_size, vb.pp("embed_tokens"))?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| DecoderLayer::new(c, vb.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed,
            layers,
            norm: RmsNorm::new(c.hidden_size, c.rms_norm_eps, vb.pp("norm"))?,
            config: c.clone(),
            device: vb.device().clone(),
        })
    }

    /// The model's size.
    pub fn config(&self) -> &TextConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Rotary tables `(cos, sin)` `[L, head_dim / 2]` for positions `0..L`, in f32 as
    /// transformers computes them (`inv_freq = 1 / theta^(2i/d)`, `freqs = pos * inv_freq`).
    fn rope(&self, len: usize) -> Result<(Tensor, Tensor)> {
        let d = self.config.head_dim();
        let theta = self.config.rope_theta as f32;
        let inv: Vec<f32> = (0..d / 2)
            .map(|i| 1f32 / theta.powf((2 * i) as f32 / d as f32))
            .collect();
        let freqs: Vec<f32> = (0..len)
            .flat_map(|p| inv.iter().map(move |f| p as f32 * f))
            .collect();
        let freqs = Tensor::from_vec(freqs, (len, d / 2), &self.device)?;
        Ok((freqs.cos()?, freqs.sin()?))
    }

    /// `0` on and below the diagonal, `-inf` above: `[1, 1, L, L]`.
    fn causal_mask(&self, len: usize) -> Result<Tensor> {
        let mask: Vec<f32> = (0..len)
            .flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Tensor::from_vec(mask, (1, 1, len, len), &self.device)
    }

    /// Every hidden state of `input_ids` `[B, L]` (unpadded): the token embeddings, each
    /// decoder layer's output but the last, and the final norm's output (transformers'
    /// `hidden_states` tuple; the last is the text embedding).
    pub fn hidden_states(&self, input_ids: &Tensor) -> Result<Vec<Tensor>> {
        let len = input_ids.dim(1)?;
        if len > self.config.max_position_embeddings {
            candle_core::bail!(
                "{len} tokens exceed the text encoder's {} positions",
                self.config.max_position_embeddings
            );
        }
        let rope = self.rope(len)?;
        let causal = self.causal_mask(len)?;
        let mut xs = self.embed.forward(input_ids)?;
        let mut states = vec![xs.clone()];
        for layer in &self.layers {
            xs = layer.forward(&xs, &rope, &causal)?;
            states.push(xs.clone());
        }
        let last = states.len() - 1;
        states[last] = self.norm.forward(&xs)?;
        Ok(states)
    }

    /// The final norm's output `[B, L, hidden_size]` (`hidden_states[-1]`).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.hidden_states(input_ids)?
            .pop()
            .ok_or_else(|| candle_core::Error::msg("the text encoder has no layers"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::test_util::{check, qwen_pipeline_dir, qwen_pipeline_reference};

    fn config_json() -> Value {
        let text =
            std::fs::read_to_string(qwen_pipeline_dir().join("text_encoder/config.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    #[allow(unsafe_code)]
    fn model(c: &TextConfig, dtype: DType) -> Qwen25VlTextModel {
        let path = qwen_pipeline_dir().join("text_encoder/model.safetensors");
        // SAFETY: the fixture file is not modified while mapped.
        let vb =
            unsafe { VarBuilder::from_mmaped_safetensors(&[path], dtype, &Device::Cpu) }.unwrap();
        Qwen25VlTextModel::new(c, vb).unwrap()
    }

    #[test]
    fn nested_and_flat_configs_read_the_same() {
        let nested = config_json();
        let c = TextConfig::from_json(&nested).unwrap();
        assert_eq!(
            (c.hidden_size, c.num_hidden_layers, c.num_attention_heads),
            (32, 2, 2)
        );
        assert_eq!((c.num_key_value_heads, c.vocab_size), (1, 640));
        assert_eq!(c.rope_theta, 1e6);
        // The transformers-4 form Qwen-Image's real config is written in: flat keys,
        // rope_theta and rope_scaling {type: mrope, mrope_section}.
        let t = &nested["text_config"];
        let flat = serde_json::json!({
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "vocab_size": t["vocab_size"], "hidden_size": t["hidden_size"],
            "intermediate_size": t["intermediate_size"],
            "num_hidden_layers": t["num_hidden_layers"],
            "num_attention_heads": t["num_attention_heads"],
            "num_key_value_heads": t["num_key_value_heads"],
            "rms_norm_eps": t["rms_norm_eps"], "rope_theta": 1000000.0,
            "max_position_embeddings": 128000,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        });
        assert_eq!(TextConfig::from_json(&flat).unwrap(), c);
        let mut bad = flat.clone();
        bad["rope_scaling"]["mrope_section"] = serde_json::json!([2, 3, 4]);
        let e = TextConfig::from_json(&bad).unwrap_err().to_string();
        assert!(e.contains("mrope_section sums to 9"), "{e}");
        let mut missing = flat;
        missing.as_object_mut().unwrap().remove("hidden_size");
        let e = TextConfig::from_json(&missing).unwrap_err().to_string();
        assert!(e.contains("'hidden_size'"), "{e}");
    }

    #[test]
    fn every_hidden_state_matches_transformers() {
        let c = TextConfig::from_json(&config_json()).unwrap();
        let m = model(&c, DType::F32);
        let r = qwen_pipeline_reference();
        for case in ["case0", "case1"] {
            for prefix in ["", "negative_"] {
                let ids = r[&format!("{case}.{prefix}input_ids")]
                    .to_dtype(DType::U32)
                    .unwrap();
                let layers = &r[&format!("{case}.{prefix}text_encoder_hidden_states_layers")];
                let states = m.hidden_states(&ids).unwrap();
                assert_eq!(states.len(), layers.dim(0).unwrap());
                for (i, s) in states.iter().enumerate() {
                    let want = layers.get(i).unwrap().unsqueeze(0).unwrap();
                    check(&format!("{case} {prefix}hidden_states[{i}]"), s, &want);
                }
                let last = m.forward(&ids).unwrap();
                let want = &r[&format!("{case}.{prefix}encoder_hidden_states")];
                check(
                    &format!("{case} {prefix}encoder_hidden_states"),
                    &last,
                    want,
                );
            }
        }
    }

    /// transformers 5 writes the language model under `model.language_model.`; the same
    /// weights renamed so load and give the same states.
    #[test]
    fn transformers_5_weight_names_load_too() {
        let c = TextConfig::from_json(&config_json()).unwrap();
        let path = qwen_pipeline_dir().join("text_encoder/model.safetensors");
        let tensors = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
        let renamed: std::collections::HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, v)| match k.strip_prefix("model.") {
                Some(rest) => (format!("model.language_model.{rest}"), v),
                None => (k, v),
            })
            .collect();
        let vb = VarBuilder::from_tensors(renamed, DType::F32, &Device::Cpu);
        let new = Qwen25VlTextModel::new(&c, vb).unwrap();
        let old = model(&c, DType::F32);
        let ids = Tensor::new(&[[519u32, 5, 77, 300, 520]], &Device::Cpu).unwrap();
        let (a, b) = (new.forward(&ids).unwrap(), old.forward(&ids).unwrap());
        assert_eq!(crate::test_util::max_abs_diff(&a, &b), 0.0);
    }

    /// Real checkpoints run in bf16 (`--dtype bf16`): the norms and attention compute in f32,
    /// the matmuls in bf16; the embedding stays within bf16's precision of the f32 one.
    #[test]
    fn bf16_weights_stay_within_bf16_precision() {
        let c = TextConfig::from_json(&config_json()).unwrap();
        let r = qwen_pipeline_reference();
        let ids = r["case0.input_ids"].to_dtype(DType::U32).unwrap();
        let out = model(&c, DType::BF16).forward(&ids).unwrap();
        assert_eq!(out.dtype(), DType::BF16);
        let want = &r["case0.encoder_hidden_states"];
        let scale = want
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let d = crate::test_util::max_abs_diff(&out, want);
        eprintln!("bf16 vs transformers f32: max abs diff {d:e} (max |value| {scale})");
        assert!(d <= 0.05 * scale, "{d} vs {scale}");
    }
}
