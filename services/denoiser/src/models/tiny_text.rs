//! The embedded model's text encoder: a fixed word vocabulary (the caption grammar of the
//! training scenes), learned word embeddings, and a pooled vector (mean of the prompt's word
//! embeddings). It produces FLUX's `encoder_hidden_states` `[B, T, dim]` (padded to
//! [`MAX_TOKENS`] with the `<pad>` embedding) and `pooled_projections` `[B, dim]`.

use candle_core::{Device, Result, Tensor};
use candle_nn::{Embedding, Module, VarBuilder};

/// Words the encoder knows; index 0 is padding.
pub const VOCAB: &[&str] = &[
    "<pad>",
    "a",
    "an",
    "on",
    "the",
    "at",
    "in",
    "background",
    "red",
    "green",
    "blue",
    "yellow",
    "white",
    "black",
    "purple",
    "orange",
    "circle",
    "square",
    "triangle",
    "left",
    "right",
    "top",
    "bottom",
    "center",
];

/// Tokens per prompt (prompts are padded to this length).
pub const MAX_TOKENS: usize = 12;

/// Why a prompt cannot be encoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PromptError {
    /// A word outside the vocabulary.
    #[error("unknown word '{}' in the prompt; the embedded model knows: {known}", teaserve_proto::quote(.word))]
    UnknownWord {
        /// The word.
        word: String,
        /// The vocabulary.
        known: String,
    },
    /// Too many words.
    #[error("the prompt has {0} words; the embedded model reads at most {MAX_TOKENS}")]
    TooLong(usize),
    /// No words.
    #[error("the prompt is empty")]
    Empty,
}

/// Word ids of a prompt (lower-cased, punctuation ignored), without padding.
pub fn tokenize(prompt: &str) -> std::result::Result<Vec<u32>, PromptError> {
    let words: Vec<String> = prompt
        .split(|c: char| !c.is_ascii_alphabetic())
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
        .collect();
    if words.is_empty() {
        return Err(PromptError::Empty);
    }
    if words.len() > MAX_TOKENS {
        return Err(PromptError::TooLong(words.len()));
    }
    words
        .iter()
        .map(|w| {
            VOCAB
                .iter()
                .skip(1)
                .position(|v| v == w)
                .map(|i| i as u32 + 1)
                .ok_or_else(|| PromptError::UnknownWord {
                    word: w.clone(),
                    known: VOCAB[1..].join(", "),
                })
        })
        .collect()
}

/// The learned encoder (`text_encoder.embedding.weight` `[vocab, dim]`).
#[derive(Debug, Clone)]
pub struct TinyTextEncoder {
    embedding: Embedding,
    dim: usize,
}

impl TinyTextEncoder {
    /// Builds the encoder from `vb` at `text_encoder`.
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            embedding: candle_nn::embedding(VOCAB.len(), dim, vb.pp("embedding"))?,
            dim,
        })
    }

    /// `(encoder_hidden_states [B, MAX_TOKENS, dim], pooled_projections [B, dim])` for a batch
    /// of tokenized prompts.
    pub fn encode(&self, prompts: &[Vec<u32>], device: &Device) -> Result<(Tensor, Tensor)> {
        let b = prompts.len();
        let mut ids = vec![0u32; b * MAX_TOKENS];
        let mut mask = vec![0f32; b * MAX_TOKENS];
        for (i, p) in prompts.iter().enumerate() {
            for (j, &t) in p.iter().take(MAX_TOKENS).enumerate() {
                ids[i * MAX_TOKENS + j] = t;
                mask[i * MAX_TOKENS + j] = 1.0;
            }
        }
        let ids = Tensor::from_vec(ids, (b, MAX_TOKENS), device)?;
        let mask = Tensor::from_vec(mask, (b, MAX_TOKENS, 1), device)?;
        let states = self.embedding.forward(&ids)?;
        let count = mask.sum(1)?.clamp(1.0, f64::MAX)?;
        let pooled = states
            .broadcast_mul(&mask.to_dtype(states.dtype())?)?
            .sum(1)?
            .broadcast_div(&count.to_dtype(states.dtype())?)?;
        Ok((states, pooled))
    }

    /// Embedding width.
    pub fn dim(&self) -> usize {
        self.dim
    }
}

/// Packs images `[B, C, H, W]` into tokens of `p x p` patches `[B, (H/p)(W/p), C*p*p]`
/// (channel-major, then dy, dx within a token), as diffusers' FLUX pipeline packs latents
/// (there with `p = 2`).
pub fn pack(images: &Tensor, p: usize) -> Result<Tensor> {
    let (b, c, h, w) = images.dims4()?;
    images
        .reshape((b, c, h / p, p, w / p, p))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b, (h / p) * (w / p), c * p * p))
}

/// Inverse of [`pack`]: `[B, (H/p)(W/p), C*p*p]` back to `[B, C, H, W]`.
pub fn unpack(tokens: &Tensor, height: usize, width: usize, p: usize) -> Result<Tensor> {
    let (b, _, cpp) = tokens.dims3()?;
    let c = cpp / (p * p);
    tokens
        .reshape((b, height / p, width / p, c, p, p))?
        .permute((0, 3, 1, 4, 2, 5))?
        .reshape((b, c, height, width))
}

/// Position ids for an `h x w` token grid `[h*w, 3]` = (0, row, col), and for
/// [`MAX_TOKENS`] text tokens `(i, 0, 0)`: unlike FLUX (whose T5 text states already carry word
/// order, so its text ids are zeros) the word embeddings here carry none, so the rotary
/// embedding's first axis gives the text its order.
pub fn position_ids(h: usize, w: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let img: Vec<f32> = (0..h * w)
        .flat_map(|i| [0.0, (i / w) as f32, (i % w) as f32])
        .collect();
    let txt: Vec<f32> = (0..MAX_TOKENS).flat_map(|i| [i as f32, 0.0, 0.0]).collect();
    Ok((
        Tensor::from_vec(img, (h * w, 3), device)?,
        Tensor::from_vec(txt, (MAX_TOKENS, 3), device)?,
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_knows_the_grammar_and_names_unknown_words() {
        let ids = tokenize("A red circle on the left, on a blue background.").unwrap();
        assert_eq!(ids.len(), 10);
        assert_eq!(VOCAB[ids[1] as usize], "red");
        let err = tokenize("a pink circle").unwrap_err().to_string();
        assert!(
            err.contains("unknown word 'pink'") && err.contains("purple"),
            "{err}"
        );
        assert_eq!(tokenize("  "), Err(PromptError::Empty));
        assert!(matches!(
            tokenize(&"a ".repeat(13)),
            Err(PromptError::TooLong(13))
        ));
    }

    #[test]
    fn pack_unpack_round_trip() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 2.0 * 3.0 * 4.0 * 6.0, &dev)
            .unwrap()
            .reshape((2, 3, 4, 6))
            .unwrap();
        let p = pack(&x, 2).unwrap();
        assert_eq!(p.dims(), &[2, 6, 12]);
        // Token 0 of image 0: channel 0's 2x2 patch first.
        let t0: Vec<f32> = p.get(0).unwrap().get(0).unwrap().to_vec1().unwrap();
        assert_eq!(&t0[..4], &[0.0, 1.0, 6.0, 7.0]);
        let back = unpack(&p, 4, 6, 2).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_prompt_gets_tokens_or_a_bounded_error(prompt in any::<String>(), n in 1usize..2000) {
            let long = prompt.repeat(n % 7 + 1);
            match tokenize(&long) {
                Ok(ids) => prop_assert!(ids.len() <= MAX_TOKENS),
                Err(e) => prop_assert!(e.to_string().len() < 1024, "{}", e.to_string().len()),
            }
        }
    }
}
