//! The FLUX pipeline's tokenizers, built from a checkpoint's own files with the `tokenizers`
//! crate (the library behind transformers' fast tokenizers):
//!
//! - [`ClipTokenizer`]: `tokenizer/` of a FLUX folder holds only `vocab.json` + `merges.txt`
//!   (no `tokenizer.json`), so the tokenizer is assembled as transformers' `CLIPTokenizer`
//!   converts it: NFC, runs of whitespace to one space, lower case; CLIP's split regex, then
//!   byte-level; BPE with `</w>` word ends; `<|startoftext|>` ... `<|endoftext|>`; truncated
//!   to `model_max_length` (77) and padded to it with `<|endoftext|>`.
//! - [`T5Tokenizer`]: `tokenizer_2/tokenizer.json` as written (Precompiled nmt_nfkc,
//!   Metaspace, Unigram), truncated to `max_sequence_length` with `</s>` kept, padded with
//!   `<pad>`.
//!
//! Both return exactly the ids diffusers' pipelines pass to the text encoders.

use std::path::Path;

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as Normalizers};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizers;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// A tokenizer that could not be built from its files, or a prompt it could not encode.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TokenizerError(pub String);

/// Token ids for one prompt, padded to the encoder's length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenIds {
    /// The ids, `max_length` of them.
    pub ids: Vec<u32>,
    /// How many tokens the prompt had before truncation (specials included), so callers can
    /// say what was cut, as diffusers logs it.
    pub untruncated: usize,
}

impl TokenIds {
    /// Whether the prompt was cut to fit.
    pub fn truncated(&self) -> bool {
        self.untruncated > self.ids.len()
    }
}

/// CLIP's pre-tokenizer pattern (transformers' `CLIPConverter`).
const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
const CLIP_BOS: &str = "<|startoftext|>";
const CLIP_EOS: &str = "<|endoftext|>";

/// CLIP's BPE tokenizer (the FLUX pipeline's `tokenizer`).
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos: u32,
    eos: u32,
    max_length: usize,
}

fn err(what: &str) -> impl Fn(tokenizers::Error) -> TokenizerError + '_ {
    move |e| TokenizerError(format!("{what}: {e}"))
}

impl ClipTokenizer {
    /// Builds the tokenizer from `vocab.json` and `merges.txt`; ids are padded / truncated
    /// to `max_length` (`model_max_length` of `tokenizer_config.json`, 77 in FLUX).
    pub fn from_files(
        vocab: &Path,
        merges: &Path,
        max_length: usize,
    ) -> Result<Self, TokenizerError> {
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .end_of_word_suffix("</w>".into())
            .continuing_subword_prefix(String::new())
            .unk_token(CLIP_EOS.into())
            .fuse_unk(false)
            .build()
            .map_err(err("CLIP tokenizer (vocab.json, merges.txt)"))?;
        let mut tokenizer = Tokenizer::new(bpe);
        let whitespace = Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .map_err(err("CLIP normalizer"))?;
        tokenizer
            .with_normalizer(Some(Normalizers::new(vec![
                NFC.into(),
                whitespace.into(),
                Lowercase.into(),
            ])))
            .map_err(err("CLIP normalizer"))?;
        let split = Split::new(
            SplitPattern::Regex(CLIP_SPLIT.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(err("CLIP pre-tokenizer"))?;
        tokenizer.with_pre_tokenizer(Some(PreTokenizers::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        tokenizer
            .add_special_tokens([
                AddedToken::from(CLIP_BOS, true).normalized(true),
                AddedToken::from(CLIP_EOS, true).normalized(true),
            ])
            .map_err(err("CLIP special tokens"))?;
        let id = |t: &str| {
            tokenizer
                .token_to_id(t)
                .ok_or_else(|| TokenizerError(format!("CLIP vocab.json has no '{t}'")))
        };
        let (bos, eos) = (id(CLIP_BOS)?, id(CLIP_EOS)?);
        if max_length < 2 {
            return Err(TokenizerError(format!(
                "CLIP model_max_length {max_length} leaves no room for the start and end tokens"
            )));
        }
        Ok(Self {
            tokenizer,
            bos,
            eos,
            max_length,
        })
    }

    /// `<|startoftext|>`, at most `max_length - 2` BPE tokens, `<|endoftext|>`, then
    /// `<|endoftext|>` padding to `max_length`.
    pub fn encode(&self, prompt: &str) -> Result<TokenIds, TokenizerError> {
        let pieces = pieces(&self.tokenizer, prompt)?;
        let untruncated = pieces.len() + 2;
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos);
        ids.extend(pieces.iter().take(self.max_length - 2));
        ids.push(self.eos);
        ids.resize(self.max_length, self.eos);
        Ok(TokenIds { ids, untruncated })
    }

    /// The end-of-text id (the pooled output is taken at its first position).
    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// Length of every encoding.
    pub fn max_length(&self) -> usize {
        self.max_length
    }
}

/// The prompt's tokens without specials (added tokens such as `<|endoftext|>` written in
/// the prompt are still matched).
fn pieces(tokenizer: &Tokenizer, prompt: &str) -> Result<Vec<u32>, TokenizerError> {
    tokenizer
        .encode(prompt, false)
        .map(|e| e.get_ids().to_vec())
        .map_err(err("tokenizing the prompt"))
}

/// T5's Unigram tokenizer (the FLUX pipeline's `tokenizer_2`).
pub struct T5Tokenizer {
    tokenizer: Tokenizer,
    eos: u32,
    pad: u32,
}

impl T5Tokenizer {
    /// Loads `tokenizer.json`; it must define `</s>` and `<pad>`.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let tokenizer = Tokenizer::from_file(path)
            .map_err(|e| TokenizerError(format!("{}: {e}", path.display())))?;
        let id = |t: &str| {
            tokenizer
                .token_to_id(t)
                .ok_or_else(|| TokenizerError(format!("{} has no '{t}'", path.display())))
        };
        let (eos, pad) = (id("</s>")?, id("<pad>")?);
        Ok(Self {
            tokenizer,
            eos,
            pad,
        })
    }

    /// At most `max_length - 1` pieces, `</s>`, then `<pad>` padding to `max_length`.
    pub fn encode(&self, prompt: &str, max_length: usize) -> Result<TokenIds, TokenizerError> {
        if max_length == 0 {
            return Err(TokenizerError(
                "max_sequence_length must be at least 1".into(),
            ));
        }
        let pieces = pieces(&self.tokenizer, prompt)?;
        let untruncated = pieces.len() + 1;
        let mut ids = Vec::with_capacity(max_length);
        ids.extend(pieces.iter().take(max_length - 1));
        ids.push(self.eos);
        ids.resize(max_length, self.pad);
        Ok(TokenIds { ids, untruncated })
    }
}

/// Qwen2's byte-level BPE pre-tokenizer pattern (transformers' `Qwen2Converter`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's byte-level BPE tokenizer (the Qwen-Image pipeline's `tokenizer/`: `vocab.json` +
/// `merges.txt` + `added_tokens.json`), assembled as transformers converts it: NFC, Qwen2's
/// split regex (isolated), byte-level without a prefix space, BPE without unknown token or
/// word suffix; added tokens (`<|im_start|>`, ...) are matched before the BPE. Nothing is
/// added around the text and nothing is padded.
pub struct Qwen2Tokenizer {
    tokenizer: Tokenizer,
}

impl Qwen2Tokenizer {
    /// Builds the tokenizer; `added_tokens` is `added_tokens.json` (content -> id), whose ids
    /// must follow the vocabulary as the checkpoint's do.
    pub fn from_files(
        vocab: &Path,
        merges: &Path,
        added_tokens: &Path,
    ) -> Result<Self, TokenizerError> {
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .build()
            .map_err(err("Qwen2 tokenizer (vocab.json, merges.txt)"))?;
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer
            .with_normalizer(Some(NFC))
            .map_err(err("Qwen2 normalizer"))?;
        let split = Split::new(
            SplitPattern::Regex(QWEN2_SPLIT.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(err("Qwen2 pre-tokenizer"))?;
        tokenizer.with_pre_tokenizer(Some(PreTokenizers::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])));
        let text = std::fs::read_to_string(added_tokens)
            .map_err(|e| TokenizerError(format!("{}: {e}", added_tokens.display())))?;
        let map: std::collections::BTreeMap<String, u32> = serde_json::from_str(&text)
            .map_err(|e| TokenizerError(format!("{}: {e}", added_tokens.display())))?;
        let mut by_id: Vec<(u32, String)> = map.into_iter().map(|(t, id)| (id, t)).collect();
        by_id.sort();
        for (id, token) in by_id {
            tokenizer
                .add_special_tokens([AddedToken::from(token.as_str(), true)])
                .map_err(err("Qwen2 added tokens"))?;
            if tokenizer.token_to_id(&token) != Some(id) {
                return Err(TokenizerError(format!(
                    "{}: '{token}' should have id {id} but gets {:?}; the added tokens must follow \
                     the vocabulary",
                    added_tokens.display(),
                    tokenizer.token_to_id(&token)
                )));
            }
        }
        Ok(Self { tokenizer })
    }

    /// The ids of `text` (added tokens written in it are those tokens).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        pieces(&self.tokenizer, text)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    use crate::test_util::{flux_pipeline_dir as fixture, flux_pipeline_reference};

    fn reference_ids(key: &str) -> Vec<u32> {
        let t = flux_pipeline_reference();
        let ids: Vec<i64> = t[key].flatten_all().unwrap().to_vec1().unwrap();
        ids.into_iter().map(|i| i as u32).collect()
    }

    fn prompts() -> Vec<(String, serde_json::Value)> {
        let r: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture().join("reference.json")).unwrap(),
        )
        .unwrap();
        r["cases"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn clip() -> ClipTokenizer {
        let d = fixture().join("tokenizer");
        ClipTokenizer::from_files(&d.join("vocab.json"), &d.join("merges.txt"), 77).unwrap()
    }

    fn t5() -> T5Tokenizer {
        T5Tokenizer::from_file(&fixture().join("tokenizer_2/tokenizer.json")).unwrap()
    }

    #[test]
    fn clip_and_t5_ids_equal_the_pipelines() {
        let (clip, t5) = (clip(), t5());
        for (case, meta) in prompts() {
            let prompt = meta["prompt"].as_str().unwrap();
            let max = meta["max_sequence_length"].as_u64().unwrap() as usize;
            let c = clip.encode(prompt).unwrap();
            assert_eq!(
                c.ids,
                reference_ids(&format!("{case}.clip_input_ids")),
                "{case}"
            );
            assert_eq!(
                c.untruncated as u64,
                meta["clip_tokens_untruncated"].as_u64().unwrap()
            );
            assert_eq!(c.truncated(), meta["clip_truncated"].as_bool().unwrap());
            let t = t5.encode(prompt, max).unwrap();
            assert_eq!(
                t.ids,
                reference_ids(&format!("{case}.t5_input_ids")),
                "{case}"
            );
            assert_eq!(
                t.untruncated as u64,
                meta["t5_tokens_untruncated"].as_u64().unwrap()
            );
            assert_eq!(t.truncated(), meta["t5_truncated"].as_bool().unwrap());
        }
    }

    #[test]
    fn odd_prompts_keep_the_layout() {
        let (clip, t5) = (clip(), t5());
        let odd = [
            "",
            " ",
            "Hello, WORLD!! it's 42 o'clock...",
            "tabs\tand\nnewlines  and   spaces",
            "<|endoftext|> inside",
            "na\u{ef}ve fa\u{e7}ade \u{2014} \u{ff21}\u{ff22}\u{ff23} \u{fb00} \u{6771}\u{4eac} \u{2603} \u{1f98a}",
        ];
        for p in odd {
            let c = clip.encode(p).unwrap();
            assert_eq!(c.ids.len(), 77);
            assert_eq!(c.ids[0], 727, "{p:?}");
            assert!(c.ids[1..].contains(&728), "{p:?}");
            let t = t5.encode(p, 16).unwrap();
            assert_eq!(t.ids.len(), 16);
            assert!(t.ids.contains(&1), "{p:?}");
        }
        // Whitespace runs collapse and case folds: the same ids.
        assert_eq!(
            clip.encode("a  RED\tfox").unwrap(),
            clip.encode("a red fox").unwrap()
        );
        // The empty prompt is the pipeline's: start, end, padding (CLIP); </s>, padding (T5).
        assert_eq!(clip.encode("").unwrap().ids[..3], [727, 728, 728]);
        assert_eq!(t5.encode("", 4).unwrap().ids, [1, 0, 0, 0]);
        // A special token written in the prompt is that token.
        assert_eq!(clip.encode("<|endoftext|> inside").unwrap().ids[1], 728);
    }

    #[test]
    fn qwen2_ids_of_the_templated_prompts_equal_the_pipelines() {
        let dir = fixture().join("../qwen-image-pipeline-tiny");
        let t = dir.join("tokenizer");
        let tok = Qwen2Tokenizer::from_files(
            &t.join("vocab.json"),
            &t.join("merges.txt"),
            &t.join("added_tokens.json"),
        )
        .unwrap();
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
        let template = meta["tokenizers"]["tokenizer"]["template"]
            .as_str()
            .unwrap();
        let reference: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
                .unwrap();
        let tensors = candle_core::safetensors::load(
            dir.join("reference.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let ids = |key: &str| -> Vec<u32> {
            let v: Vec<i64> = tensors[key].flatten_all().unwrap().to_vec1().unwrap();
            v.into_iter().map(|i| i as u32).collect()
        };
        for (case, c) in reference["cases"].as_object().unwrap() {
            for (field, key) in [
                ("prompt", "input_ids"),
                ("negative_prompt", "negative_input_ids"),
            ] {
                let text = template.replace("{}", c[field].as_str().unwrap());
                let got = tok.encode(&text).unwrap();
                assert_eq!(got, ids(&format!("{case}.{key}")), "{case} {field}");
            }
        }
    }

    /// Odd prompts (unicode, emoji, whitespace runs, a special token in the text, long
    /// ones) give exactly the ids of transformers' own tokenizers
    /// (tools/fixtures/tokenizer_ids.py, transformers 5.24.0).
    #[test]
    fn odd_prompts_give_the_ids_transformers_gives() {
        let (clip, t5) = (clip(), t5());
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/flux-pipeline-tokenizer-ids.json"
        );
        let cases: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert!(cases.len() >= 10);
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_u64().unwrap() as u32)
                .collect()
        };
        for c in &cases {
            let p = c["prompt"].as_str().unwrap();
            assert_eq!(clip.encode(p).unwrap().ids, ids(&c["clip"]), "CLIP {p:?}");
            assert_eq!(t5.encode(p, 16).unwrap().ids, ids(&c["t5"]), "T5 {p:?}");
        }
    }
}

/// Any prompt (random unicode, control characters, special-token text) is tokenized to the
/// encoders' fixed lengths without panicking.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod properties {
    use super::*;
    use crate::test_util::flux_pipeline_dir;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_prompt_tokenizes_to_the_encoders_lengths(
            prompt in prop_oneof![any::<String>(), "(<\\|endoftext\\|>| |a|\u{1f98a}|\t){0,40}"],
            max in 1usize..40,
        ) {
            let d = flux_pipeline_dir();
            let clip = ClipTokenizer::from_files(
                &d.join("tokenizer/vocab.json"),
                &d.join("tokenizer/merges.txt"),
                77,
            )
            .unwrap_or_else(|e| panic!("{e}"));
            let t5 = T5Tokenizer::from_file(&d.join("tokenizer_2/tokenizer.json"))
                .unwrap_or_else(|e| panic!("{e}"));
            let c = clip.encode(&prompt).unwrap_or_else(|e| panic!("{e}"));
            prop_assert_eq!(c.ids.len(), 77);
            prop_assert_eq!(c.ids[0], 727);
            let t = t5.encode(&prompt, max).unwrap_or_else(|e| panic!("{e}"));
            prop_assert_eq!(t.ids.len(), max);
            prop_assert!(t.ids.contains(&1));
        }
    }
}
