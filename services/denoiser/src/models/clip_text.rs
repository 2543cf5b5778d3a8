//! CLIP text encoder: a candle port of transformers' `CLIPTextModel` (no projection head), the
//! first text encoder of a FLUX pipeline (`text_encoder/`), whose pooled output becomes FLUX's
//! `pooled_projections`.
//!
//! Weight names follow transformers (`text_model.embeddings.token_embedding.weight`, ...); the
//! `text_model.` prefix is optional (transformers 5 saves without it, FLUX.1-dev's checkpoint has
//! it). The forward pass matches transformers 5: token + position embeddings, pre-LN encoder
//! layers with a causal mask only (no padding mask), `final_layer_norm`, and pooling at the EOS
//! position chosen by the config's `eos_token_id` as transformers chooses it.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};
use serde::Deserialize;

use super::layers::{Linear, linear};

/// `eos_token_id` of the original CLIP configs; with it transformers pools at `argmax(input_ids)`.
const LEGACY_EOS_TOKEN_ID: i64 = 2;

/// The MLP activation of a CLIP text encoder (`hidden_act` in `config.json`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ClipActivation {
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP, FLUX's `text_encoder`).
    QuickGelu,
    /// Exact (erf) GELU.
    Gelu,
}

impl ClipActivation {
    fn apply(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::Gelu => xs.gelu_erf(),
        }
    }
}

/// `config.json` of a transformers `CLIPTextModel` (`text_encoder/` of a FLUX pipeline). The
/// keys that size the network are required; `eos_token_id` defaults as in transformers (2).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ClipTextConfig {
    /// Rows of the token embedding.
    pub vocab_size: usize,
    /// Width of the hidden states (and of the pooled output).
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer; `hidden_size` must be a multiple of it.
    pub num_attention_heads: usize,
    /// Rows of the position embedding: the longest input sequence.
    pub max_position_embeddings: usize,
    /// Epsilon of every LayerNorm.
    pub layer_norm_eps: f64,
    /// MLP activation.
    pub hidden_act: ClipActivation,
    /// EOS token id: 2 selects transformers' legacy pooling (`argmax(input_ids)`), any other
    /// value pooling at the first position holding it.
    #[serde(default = "default_eos_token_id")]
    pub eos_token_id: i64,
}

fn default_eos_token_id() -> i64 {
    LEGACY_EOS_TOKEN_ID
}

impl ClipTextConfig {
    /// Checks the consistency transformers assumes (non-empty sizes, whole heads).
    pub fn validate(&self) -> std::result::Result<(), String> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be > 0"));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        Ok(())
    }

    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// What [`ClipTextModel::forward`] returns.
#[derive(Debug, Clone)]
pub struct ClipOutput {
    /// transformers' `hidden_states`: `[B, S, hidden]` each, the embeddings first, then the
    /// output of every encoder layer (before `final_layer_norm`): `num_hidden_layers + 1`.
    pub hidden_states: Vec<Tensor>,
    /// `[B, S, hidden]` after `final_layer_norm`.
    pub last_hidden_state: Tensor,
    /// `[B, hidden]`: `last_hidden_state` at each sequence's EOS position (`pooler_output`).
    pub pooled: Tensor,
}

/// transformers' `CLIPTextEmbeddings`: token embedding plus learned absolute positions.
#[derive(Debug, Clone)]
struct ClipEmbeddings {
    token: Embedding,
    position: Tensor,
}

impl ClipEmbeddings {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let token =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("token_embedding"))?;
        let position = vb
            .pp("position_embedding")
            .get((cfg.max_position_embeddings, cfg.hidden_size), "weight")?;
        Ok(Self { token, position })
    }

    fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let seq_len = input_ids.dim(1)?;
        let max = self.position.dim(0)?;
        if seq_len > max {
            return Err(candle_core::Error::msg(format!(
                "CLIP: {seq_len} tokens, the position embedding has {max}"
            )));
        }
        let positions = self.position.narrow(0, 0, seq_len)?;
        self.token.forward(input_ids)?.broadcast_add(&positions)
    }
}

/// transformers' `CLIPAttention`: multi-head self-attention with biases, scale `head_dim^-0.5`.
#[derive(Debug, Clone)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    scale: f64,
}

impl ClipAttention {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            q_proj: linear(d, d, vb.pp("q_proj"))?,
            k_proj: linear(d, d, vb.pp("k_proj"))?,
            v_proj: linear(d, d, vb.pp("v_proj"))?,
            out_proj: linear(d, d, vb.pp("out_proj"))?,
            num_heads: cfg.num_attention_heads,
            scale: (cfg.head_dim() as f64).powf(-0.5),
        })
    }

    /// `[B, S, H*D]` -> `[B, H, S, D]`.
    fn heads(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, s, _) = xs.dims3()?;
        xs.reshape((b, s, self.num_heads, ()))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `mask`: `[S, S]` added to the scores (0 or `-inf`).
    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, s, d) = xs.dims3()?;
        let q = self.heads(&self.q_proj.forward(xs)?)?;
        let k = self.heads(&self.k_proj.forward(xs)?)?;
        let v = self.heads(&self.v_proj.forward(xs)?)?;
        let scores = (q.matmul(&k.t()?)? * self.scale)?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?
            .to_dtype(xs.dtype())?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, d))?;
        self.out_proj.forward(&out)
    }
}

/// transformers' `CLIPMLP`: `fc2(act(fc1(x)))`.
#[derive(Debug, Clone)]
struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
    act: ClipActivation,
}

impl ClipMlp {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: linear(cfg.hidden_size, cfg.intermediate_size, vb.pp("fc1"))?,
            fc2: linear(cfg.intermediate_size, cfg.hidden_size, vb.pp("fc2"))?,
            act: cfg.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.act.apply(&self.fc1.forward(xs)?)?)
    }
}

/// LayerNorm with weight and bias over the last dimension; the input is made contiguous so
/// candle's fused kernel always runs (its fallback rounds differently).
fn layer_norm(norm: &LayerNorm, xs: &Tensor) -> Result<Tensor> {
    norm.forward(&xs.contiguous()?)
}

/// transformers' `CLIPEncoderLayer`: pre-LN attention and MLP, each with a residual add.
#[derive(Debug, Clone)]
struct ClipEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    mlp: ClipMlp,
}

impl ClipEncoderLayer {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let ln =
            |name: &str| candle_nn::layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp(name));
        Ok(Self {
            layer_norm1: ln("layer_norm1")?,
            self_attn: ClipAttention::new(cfg, vb.pp("self_attn"))?,
            layer_norm2: ln("layer_norm2")?,
            mlp: ClipMlp::new(cfg, vb.pp("mlp"))?,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let attn = self
            .self_attn
            .forward(&layer_norm(&self.layer_norm1, xs)?, mask)?;
        let xs = (xs + attn)?;
        let mlp = self.mlp.forward(&layer_norm(&self.layer_norm2, &xs)?)?;
        xs + mlp
    }
}

/// `[S, S]`: 0 where key `j <= i` (query), `-inf` above the diagonal.
fn causal_mask(seq_len: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..seq_len)
        .flat_map(|i| (0..seq_len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (seq_len, seq_len), device)?.to_dtype(dtype)
}

/// Index of the first maximum, as `torch.argmax` picks it (0 for an empty row).
fn first_argmax(row: &[i64]) -> usize {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best
}

/// transformers' `CLIPTextModel` (the text transformer without a projection head): FLUX's
/// CLIP text encoder.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    embeddings: ClipEmbeddings,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    eos_token_id: i64,
}

impl ClipTextModel {
    /// Builds the model from `vb_root` (the root of `text_encoder/model.safetensors`), with or
    /// without the `text_model.` prefix on the weight names.
    pub fn new(cfg: &ClipTextConfig, vb_root: VarBuilder) -> Result<Self> {
        cfg.validate()
            .map_err(|e| candle_core::Error::msg(format!("CLIP text config: {e}")))?;
        let vb = if vb_root.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb_root.pp("text_model")
        } else {
            vb_root
        };
        let layers_vb = vb.pp("encoder").pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(cfg, layers_vb.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: ClipEmbeddings::new(cfg, vb.pp("embeddings"))?,
            layers,
            final_layer_norm: candle_nn::layer_norm(
                cfg.hidden_size,
                cfg.layer_norm_eps,
                vb.pp("final_layer_norm"),
            )?,
            eos_token_id: cfg.eos_token_id,
        })
    }

    /// Encodes `input_ids` `[B, S]` (u32 or i64, `S <= max_position_embeddings`; FLUX pads
    /// to 77) with a causal mask only, as the FLUX pipeline calls it.
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipOutput> {
        let seq_len = input_ids.dim(1)?;
        let mut xs = self.embeddings.forward(input_ids)?;
        let mask = causal_mask(seq_len, xs.dtype(), xs.device())?;
        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        hidden_states.push(xs.clone());
        for layer in &self.layers {
            xs = layer.forward(&xs, &mask)?;
            hidden_states.push(xs.clone());
        }
        let last_hidden_state = layer_norm(&self.final_layer_norm, &xs)?;
        let pooled = self.pool(&last_hidden_state, input_ids)?;
        Ok(ClipOutput {
            hidden_states,
            last_hidden_state,
            pooled,
        })
    }

    /// Each sequence's pooling position, as transformers picks it: `argmax(input_ids)` when
    /// `eos_token_id == 2` (legacy configs, FLUX.1-dev's), else the first position holding
    /// `eos_token_id` (0 when there is none, as `argmax` of an all-zero row gives).
    pub fn eos_positions(&self, input_ids: &Tensor) -> Result<Vec<usize>> {
        let rows = input_ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        Ok(rows
            .iter()
            .map(|row| {
                if self.eos_token_id == LEGACY_EOS_TOKEN_ID {
                    first_argmax(row)
                } else {
                    row.iter()
                        .position(|&t| t == self.eos_token_id)
                        .unwrap_or(0)
                }
            })
            .collect())
    }

    /// `[B, hidden]`: row `b` of `last_hidden_state` at sequence `b`'s pooling position.
    fn pool(&self, last_hidden_state: &Tensor, input_ids: &Tensor) -> Result<Tensor> {
        let rows = self
            .eos_positions(input_ids)?
            .into_iter()
            .enumerate()
            .map(|(b, pos)| last_hidden_state.get(b)?.get(pos))
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&rows, 0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::test_util::{check, flux_pipeline_reference as reference, max_abs_diff as max_diff};

    const FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/flux-pipeline-tiny"
    );

    fn config() -> ClipTextConfig {
        let json = std::fs::read_to_string(format!("{FIXTURE}/text_encoder/config.json")).unwrap();
        serde_json::from_str(&json).unwrap()
    }

    #[allow(unsafe_code)]
    fn model(cfg: &ClipTextConfig) -> ClipTextModel {
        let path = format!("{FIXTURE}/text_encoder/model.safetensors");
        // SAFETY: the fixture is not modified while the test runs.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, &Device::Cpu) }
            .unwrap();
        ClipTextModel::new(cfg, vb).unwrap()
    }

    #[test]
    fn config_parses_and_rejects_unknown_activation() {
        let cfg = config();
        assert_eq!(cfg.hidden_act, ClipActivation::QuickGelu);
        assert_eq!(cfg.eos_token_id, 2);
        let json = std::fs::read_to_string(format!("{FIXTURE}/text_encoder/config.json")).unwrap();
        let bad = json.replace("\"quick_gelu\"", "\"relu\"");
        assert!(serde_json::from_str::<ClipTextConfig>(&bad).is_err());
        let missing = json.replace("\"hidden_size\"", "\"hidden_sizes\"");
        assert!(serde_json::from_str::<ClipTextConfig>(&missing).is_err());
    }

    #[test]
    fn matches_transformers_on_both_cases() {
        let cfg = config();
        let model = model(&cfg);
        let refs = reference();
        for case in ["case0", "case1"] {
            let ids = &refs[&format!("{case}.clip_input_ids")];
            let out = model.forward(ids).unwrap();
            let layers = &refs[&format!("{case}.clip_hidden_states_layers")];
            assert_eq!(out.hidden_states.len(), layers.dim(0).unwrap());
            for (i, h) in out.hidden_states.iter().enumerate() {
                let theirs = layers.get(i).unwrap();
                check(
                    &format!("{case} hidden_states[{i}]"),
                    &h.squeeze(0).unwrap(),
                    &theirs,
                );
            }
            let last = &refs[&format!("{case}.clip_last_hidden_state")];
            check(
                &format!("{case} last_hidden_state"),
                &out.last_hidden_state,
                last,
            );
            let pooled = &refs[&format!("{case}.pooled_prompt_embeds")];
            check(&format!("{case} pooled"), &out.pooled, pooled);
        }
    }

    #[test]
    fn u32_ids_give_the_same_result() {
        let cfg = config();
        let model = model(&cfg);
        let ids = &reference()["case0.clip_input_ids"];
        let a = model.forward(ids).unwrap();
        let b = model.forward(&ids.to_dtype(DType::U32).unwrap()).unwrap();
        assert_eq!(max_diff(&a.pooled, &b.pooled), 0.0);
    }

    #[test]
    fn pooling_rule_follows_eos_token_id() {
        let mut cfg = config();
        let ids = Tensor::new(
            &[[727i64, 5, 728, 9, 728], [727, 3, 4, 728, 728]],
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(model(&cfg).eos_positions(&ids).unwrap(), vec![2, 3]);
        cfg.eos_token_id = 9;
        assert_eq!(model(&cfg).eos_positions(&ids).unwrap(), vec![3, 0]);
    }

    #[test]
    fn weights_without_the_text_model_prefix_load() {
        let cfg = config();
        let path = format!("{FIXTURE}/text_encoder/model.safetensors");
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let stripped: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, v)| (k.trim_start_matches("text_model.").to_string(), v))
            .collect();
        let vb = VarBuilder::from_tensors(stripped, DType::F32, &Device::Cpu);
        let ours = ClipTextModel::new(&cfg, vb).unwrap();
        let ids = &reference()["case0.clip_input_ids"];
        let a = ours.forward(ids).unwrap();
        let b = model(&cfg).forward(ids).unwrap();
        assert_eq!(max_diff(&a.last_hidden_state, &b.last_hidden_state), 0.0);
    }
}
