//! A Hugging Face tokenizer built from GGUF metadata, which holds the
//! vocabulary but not the `tokenizer.json` pipeline around it.
//!
//! * `tokenizer.ggml.model = "gpt2"`: byte-level BPE from `tokens` and
//!   `merges`; the normalizer and pre-tokenizer come from [`PRE_TOKENIZERS`],
//!   keyed by `tokenizer.ggml.pre` (the name llama.cpp's converter gives each
//!   model family's regexes), written as the model's own `tokenizer.json`
//!   writes them. A name not in the table is refused, naming the ones that
//!   are: guessing a regex would encode every prompt subtly wrong.
//! * `tokenizer.ggml.model = "llama"`: SentencePiece. GGUF keeps its pieces,
//!   scores and types, not merges; the merges are derived from the scores as
//!   `transformers`' SentencePiece converter does (each piece that splits
//!   into two pieces is a merge, ranked by the piece's score), and the model
//!   is a byte-fallback BPE behind a `Metaspace` pre-tokenizer (prepend
//!   scheme "first"), the pipeline `transformers` writes for Llama 2 and
//!   Mistral without its legacy flag.
//!
//! Token types (`tokenizer.ggml.token_type`, llama.cpp's): control and
//! unknown tokens are special added tokens, user-defined ones are plain
//! added tokens (always matched whole), byte tokens (`<0x0A>`) are the byte
//! fallback.

use std::collections::HashMap;

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::{AddedToken, NormalizerWrapper, PreTokenizerWrapper};

use super::{Specials, TokenText};
use crate::error::{EngineError, Result};
use crate::gguf_meta::{GgufMeta, MetadataError};

const TYPE_NORMAL: i32 = 1;
const TYPE_UNKNOWN: i32 = 2;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;

/// A model family's text pipeline before BPE, by `tokenizer.ggml.pre`.
struct PreTokenizerEntry {
    names: &'static [&'static str],
    /// `tokenizer.json` `normalizer`.
    normalizer: Option<&'static str>,
    /// `tokenizer.json` `pre_tokenizer`.
    pre_tokenizer: &'static str,
    /// BPE `ignore_merges`: a word that is itself a token is emitted whole.
    ignore_merges: bool,
    /// Whether a prompt starts with BOS when the file does not say
    /// (`tokenizer.ggml.add_bos_token`).
    add_bos: bool,
}

/// The pre-tokenizers of the byte-level models this engine runs, each as the
/// model's own `tokenizer.json` has it (the `gpt-2` entry also stands for a
/// file without `tokenizer.ggml.pre`, which predates the key).
const PRE_TOKENIZERS: &[PreTokenizerEntry] = &[
    PreTokenizerEntry {
        names: &["gpt-2"],
        normalizer: None,
        pre_tokenizer: r#"{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}"#,
        ignore_merges: false,
        add_bos: false,
    },
    // SmolLM, StarCoder: digits one by one, then the GPT-2 regex.
    PreTokenizerEntry {
        names: &["smollm", "starcoder", "refact"],
        normalizer: None,
        pre_tokenizer: r#"{"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]}"#,
        ignore_merges: false,
        add_bos: false,
    },
    // Llama 3.x.
    PreTokenizerEntry {
        names: &["llama-bpe", "llama3", "llama-v3"],
        normalizer: None,
        pre_tokenizer: r#"{"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}"#,
        ignore_merges: true,
        add_bos: true,
    },
    // Qwen 2, 2.5 and 3: single digits, NFC first.
    PreTokenizerEntry {
        names: &["qwen2"],
        normalizer: Some(r#"{"type": "NFC"}"#),
        pre_tokenizer: r#"{"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]}"#,
        ignore_merges: false,
        add_bos: false,
    },
    // DeepSeek LLM (the 7B and 67B models): line breaks, letter runs of the
    // scripts listed, ASCII and CJK punctuation, trailing space, CJK runs and
    // digit runs, each split off in turn. The character ranges are
    // llama.cpp's `llama-vocab.cpp` byte for byte, written as JSON escapes so
    // that no editor's Unicode normalization can change them (NFC folds
    // U+1FD3 into U+0390, which empties the range `\u1fd0-\u1fd3`).
    PreTokenizerEntry {
        names: &["deepseek-llm"],
        normalizer: None,
        pre_tokenizer: r##"{"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "[\r\n]"}, "behavior": "Isolated", "invert": false},
            {"type": "Split", "pattern": {"Regex": "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\ud801\udc00-\ud801\udc4f\ud801\udcb0-\ud801\udcd3\ud801\udcd8-\ud801\udcfb\ud803\udc80-\ud803\udcb2\ud803\udcc0-\ud803\udcf2\ud806\udca0-\ud806\udcdf\ud83a\udd00-\ud83a\udd43]+"}, "behavior": "Isolated", "invert": false},
            {"type": "Split", "pattern": {"Regex": "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+"}, "behavior": "Isolated", "invert": false},
            {"type": "Split", "pattern": {"Regex": "\\s+$"}, "behavior": "Isolated", "invert": false},
            {"type": "Split", "pattern": {"Regex": "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"}, "behavior": "Isolated", "invert": false},
            {"type": "Split", "pattern": {"Regex": "\\p{N}+"}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}"##,
        ignore_merges: false,
        add_bos: false,
    },
    // DeepSeek V3 and later: up to three digits, CJK runs, then words.
    PreTokenizerEntry {
        names: &["deepseek-v3"],
        normalizer: None,
        pre_tokenizer: r##"{"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": false},
            {"type": "Split", "pattern": {"Regex": "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"}, "behavior": "Isolated", "invert": false},
            {"type": "Split", "pattern": {"Regex": "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}"##,
        ignore_merges: false,
        add_bos: false,
    },
];

/// What [`build`] hands back to the tokenizer's assembly.
pub(super) struct Built {
    pub(super) hf: tokenizers::Tokenizer,
    pub(super) text: TokenText,
    pub(super) specials: Specials,
    /// Sentencepiece's dummy prefix: a space before the text.
    pub(super) prefix_space: bool,
}

pub(super) fn build(meta: &GgufMeta<'_>) -> Result<Built> {
    let err = |e: MetadataError| EngineError::Tokenizer(e.to_string());
    let model = meta.str("tokenizer.ggml.model").map_err(err)?;
    let tokens = meta.str_array("tokenizer.ggml.tokens").map_err(err)?;
    let types = match meta
        .opt_i32_array("tokenizer.ggml.token_type")
        .map_err(err)?
    {
        Some(types) if types.len() != tokens.len() => {
            return Err(EngineError::Tokenizer(format!(
                "gguf metadata key tokenizer.ggml.token_type: {} types for {} tokens",
                types.len(),
                tokens.len()
            )))
        }
        Some(types) => types,
        None => vec![TYPE_NORMAL; tokens.len()],
    };
    if u32::try_from(tokens.len()).is_err() {
        return Err(EngineError::Tokenizer(
            "gguf metadata key tokenizer.ggml.tokens: more than u32::MAX tokens".into(),
        ));
    }
    let (hf, text, default_add_bos) = match model {
        "gpt2" => byte_level(meta, &tokens, &types)?,
        "llama" => sentencepiece(meta, &tokens, &types)?,
        other => {
            return Err(EngineError::Unsupported(format!(
                "gguf metadata key tokenizer.ggml.model: tokenizer model {other:?} is not supported (supported: \"gpt2\", byte-level bpe; \"llama\", sentencepiece)"
            )))
        }
    };
    let mut hf = hf;
    add_tokens(&mut hf, &tokens, &types)?;

    let n_tokens = tokens.len();
    let id = |key: &str| -> Result<Option<u32>> {
        match meta.opt_u32(key).map_err(err)? {
            Some(id) if id as usize >= n_tokens => Err(EngineError::Tokenizer(format!(
                "gguf metadata key {key}: id {id} is outside the vocabulary of {n_tokens} tokens"
            ))),
            other => Ok(other),
        }
    };
    let mut eos: Vec<u32> = Vec::new();
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        if let Some(id) = id(key)? {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
    }
    let specials = Specials {
        bos: id("tokenizer.ggml.bos_token_id")?,
        eos,
        pad: id("tokenizer.ggml.padding_token_id")?,
        add_bos: meta
            .opt_bool("tokenizer.ggml.add_bos_token")
            .map_err(err)?
            .unwrap_or(default_add_bos),
    };
    let prefix_space = matches!(text, TokenText::SentencePiece { strip_space: true });
    Ok(Built {
        hf,
        text,
        specials,
        prefix_space,
    })
}

/// `tokens` as a BPE vocabulary: id = index; a later duplicate wins.
fn vocab_of(tokens: &[&str]) -> Vocab {
    tokens
        .iter()
        .zip(0u32..)
        .map(|(token, id)| (token.to_string(), id))
        .collect()
}

/// Control/unknown tokens, whose text must never come out of merges.
fn is_special_type(token_type: i32) -> bool {
    matches!(token_type, TYPE_CONTROL | TYPE_UNKNOWN)
}

fn byte_level(
    meta: &GgufMeta<'_>,
    tokens: &[&str],
    types: &[i32],
) -> Result<(tokenizers::Tokenizer, TokenText, bool)> {
    let err = |e: MetadataError| EngineError::Tokenizer(e.to_string());
    let pre = meta.opt_str("tokenizer.ggml.pre").map_err(err)?;
    let name = pre.unwrap_or("gpt-2");
    let Some(entry) = PRE_TOKENIZERS.iter().find(|e| e.names.contains(&name)) else {
        let known: Vec<&str> = PRE_TOKENIZERS
            .iter()
            .flat_map(|e| e.names)
            .copied()
            .collect();
        return Err(EngineError::Unsupported(format!(
            "gguf metadata key tokenizer.ggml.pre: pre-tokenizer {name:?} is not supported (supported: {})",
            known.join(", ")
        )));
    };
    let special_text: std::collections::HashSet<&str> = tokens
        .iter()
        .zip(types)
        .filter(|(_, t)| is_special_type(**t))
        .map(|(token, _)| *token)
        .collect();
    let lines = meta.str_array("tokenizer.ggml.merges").map_err(err)?;
    let mut merges = Vec::with_capacity(lines.len());
    for (idx, line) in lines.iter().enumerate() {
        let Some((left, right)) = line
            .split_once(' ')
            .filter(|(l, r)| !l.is_empty() && !r.is_empty() && !r.contains(' '))
        else {
            return Err(EngineError::Tokenizer(format!(
                "gguf metadata key tokenizer.ggml.merges: merge {idx} {line:?} is not two tokens separated by one space"
            )));
        };
        // Plain text must never turn into a control token (see the module
        // invariants of the tokenizer).
        if special_text.contains(format!("{left}{right}").as_str()) {
            continue;
        }
        merges.push((left.to_string(), right.to_string()));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab_of(tokens), merges)
        .ignore_merges(entry.ignore_merges)
        .build()
        .map_err(|e| EngineError::Tokenizer(format!("gguf metadata: invalid bpe: {e}")))?;
    let mut hf = tokenizers::Tokenizer::new(bpe);
    if let Some(normalizer) = entry.normalizer {
        let normalizer: NormalizerWrapper =
            serde_json::from_str(normalizer).map_err(|e| table_error(name, e))?;
        hf.with_normalizer(Some(normalizer))
            .map_err(|e| EngineError::Tokenizer(format!("gguf metadata: {e}")))?;
    }
    let pre_tokenizer: PreTokenizerWrapper =
        serde_json::from_str(entry.pre_tokenizer).map_err(|e| table_error(name, e))?;
    hf.with_pre_tokenizer(Some(pre_tokenizer));
    Ok((hf, TokenText::ByteLevel, entry.add_bos))
}

/// The table is code; a broken entry is a bug worth a clear message.
fn table_error(name: &str, e: serde_json::Error) -> EngineError {
    EngineError::Tokenizer(format!(
        "the built-in pipeline of pre-tokenizer {name:?} does not parse: {e}"
    ))
}

fn sentencepiece(
    meta: &GgufMeta<'_>,
    tokens: &[&str],
    types: &[i32],
) -> Result<(tokenizers::Tokenizer, TokenText, bool)> {
    let err = |e: MetadataError| EngineError::Tokenizer(e.to_string());
    let scores = meta
        .opt_f32_array("tokenizer.ggml.scores")
        .map_err(err)?
        .ok_or_else(|| {
            EngineError::Tokenizer(
                "gguf metadata key tokenizer.ggml.scores: missing; a sentencepiece vocabulary needs its piece scores".into(),
            )
        })?;
    if scores.len() != tokens.len() {
        return Err(EngineError::Tokenizer(format!(
            "gguf metadata key tokenizer.ggml.scores: {} scores for {} tokens",
            scores.len(),
            tokens.len()
        )));
    }
    let merges = merges_from_scores(tokens, types, &scores);
    let unk = meta
        .opt_u32("tokenizer.ggml.unknown_token_id")
        .map_err(err)?
        .and_then(|id| tokens.get(id as usize))
        .or_else(|| {
            tokens
                .iter()
                .zip(types)
                .find(|(_, t)| **t == TYPE_UNKNOWN)
                .map(|(token, _)| token)
        });
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab_of(tokens), merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk.to_string());
    }
    let bpe = builder
        .build()
        .map_err(|e| EngineError::Tokenizer(format!("gguf metadata: invalid bpe: {e}")))?;
    let add_space_prefix = meta
        .opt_bool("tokenizer.ggml.add_space_prefix")
        .map_err(err)?
        .unwrap_or(true);
    // Metaspace turns spaces into `▁`; the one sentencepiece puts before
    // the text (its dummy prefix) is the tokenizer's `prefix_space`: always,
    // even before a space, but not before a special token that starts a
    // template (Metaspace's own prepending skips text that starts with a
    // space, and the `Prepend` normalizer of older files puts one after
    // every special token, neither of which sentencepiece does).
    let pre_tokenizer =
        r#"{"type": "Metaspace", "replacement": "▁", "prepend_scheme": "never", "split": false}"#;
    let pre_tokenizer: PreTokenizerWrapper =
        serde_json::from_str(pre_tokenizer).map_err(|e| table_error("sentencepiece", e))?;
    let mut hf = tokenizers::Tokenizer::new(bpe);
    hf.with_pre_tokenizer(Some(pre_tokenizer));
    Ok((
        hf,
        TokenText::SentencePiece {
            strip_space: add_space_prefix,
        },
        true,
    ))
}

/// Merges of a SentencePiece vocabulary, as `transformers`'
/// `SentencePieceExtractor` derives them: every normal piece that splits
/// into two normal pieces gives the merge of those two, ordered within the
/// piece by the halves' ids and overall by the piece's score, highest first
/// (stable, so equal scores keep id order). SentencePiece's BPE merges the
/// pair whose union scores highest, which this ranking reproduces.
pub(super) fn merges_from_scores(
    tokens: &[&str],
    types: &[i32],
    scores: &[f32],
) -> Vec<(String, String)> {
    let normal: HashMap<&str, u32> = tokens
        .iter()
        .zip(types)
        .zip(0u32..)
        .filter(|((_, t), _)| **t == TYPE_NORMAL)
        .map(|((token, _), id)| (*token, id))
        .collect();
    let mut ranked: Vec<(f32, u32, u32, &str, &str)> = Vec::new();
    for ((token, token_type), score) in tokens.iter().zip(types).zip(scores) {
        if *token_type != TYPE_NORMAL {
            continue;
        }
        let mut local: Vec<(f32, u32, u32, &str, &str)> = token
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (left, right) = token.split_at(at);
                Some((*score, *normal.get(left)?, *normal.get(right)?, left, right))
            })
            .collect();
        local.sort_by_key(|&(_, l, r, _, _)| (l, r));
        ranked.extend(local);
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    ranked
        .into_iter()
        .map(|(_, _, _, left, right)| (left.to_string(), right.to_string()))
        .collect()
}

/// Control and unknown tokens become special added tokens, user-defined
/// ones plain added tokens; both are matched as they are (not normalized),
/// as llama.cpp matches them.
fn add_tokens(hf: &mut tokenizers::Tokenizer, tokens: &[&str], types: &[i32]) -> Result<()> {
    let of = |wanted: fn(i32) -> bool, special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(types)
            .filter(|(token, t)| wanted(**t) && !token.is_empty())
            .map(|(token, _)| AddedToken::from(token.to_string(), special).normalized(false))
            .collect()
    };
    let added = |e: tokenizers::Error| {
        EngineError::Tokenizer(format!("gguf metadata: cannot add the added tokens: {e}"))
    };
    hf.add_special_tokens(of(is_special_type, true))
        .map_err(added)?;
    hf.add_tokens(of(|t| t == TYPE_USER_DEFINED, false))
        .map_err(added)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_entry_parses_and_no_name_repeats() {
        let mut names = std::collections::HashSet::new();
        for entry in PRE_TOKENIZERS {
            for name in entry.names {
                assert!(names.insert(*name), "{name} twice");
            }
            let parsed: std::result::Result<PreTokenizerWrapper, _> =
                serde_json::from_str(entry.pre_tokenizer);
            assert!(parsed.is_ok(), "{:?}: {:?}", entry.names, parsed.err());
            if let Some(normalizer) = entry.normalizer {
                let parsed: std::result::Result<NormalizerWrapper, _> =
                    serde_json::from_str(normalizer);
                assert!(parsed.is_ok(), "{:?}: {:?}", entry.names, parsed.err());
            }
        }
    }
}
