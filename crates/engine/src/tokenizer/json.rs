//! The parts of `tokenizer.json`, `tokenizer_config.json` and
//! `generation_config.json` this module reads itself (the library reads the
//! rest).

use serde::Deserialize;

use super::TokenText;
use crate::error::{EngineError, Result};

/// What this module reads of a `tokenizer.json` itself: enough to know how
/// its tokens map to bytes (the library does the rest).
#[derive(Deserialize)]
pub(super) struct TokenizerJsonShape {
    #[serde(default)]
    pub(super) model: serde_json::Value,
    #[serde(default)]
    pub(super) normalizer: serde_json::Value,
    #[serde(default)]
    pub(super) pre_tokenizer: serde_json::Value,
    #[serde(default)]
    pub(super) decoder: serde_json::Value,
}

impl TokenizerJsonShape {
    /// Byte-level (a `ByteLevel` decoder or pre-tokenizer) or SentencePiece
    /// (a byte-fallback BPE, or a `Metaspace`/`▁` decoder); anything else is
    /// not a tokenizer of the models this engine runs.
    pub(super) fn token_text(&self, json_name: &str) -> Result<TokenText> {
        let kind = self.model.get("type").and_then(|t| t.as_str());
        if kind.is_some_and(|k| k != "BPE") {
            return Err(EngineError::Unsupported(format!(
                "{json_name}: model type {:?} is not supported, only \"BPE\" (byte-level or byte-fallback)",
                kind.unwrap_or_default()
            )));
        }
        let has = |value: &serde_json::Value, wanted: &str| json_has_type(value, wanted);
        if has(&self.decoder, "ByteLevel") || has(&self.pre_tokenizer, "ByteLevel") {
            return Ok(TokenText::ByteLevel);
        }
        let byte_fallback = self.model.get("byte_fallback").and_then(|b| b.as_bool()) == Some(true);
        if byte_fallback || has(&self.decoder, "Metaspace") || has(&self.decoder, "ByteFallback") {
            // The space the normalizer (Prepend "▁") or the Metaspace
            // pre-tokenizer puts first, and the decoder takes off again.
            let strip_space = has(&self.decoder, "Strip")
                || has(&self.normalizer, "Prepend")
                || metaspace_prepends(&self.pre_tokenizer);
            return Ok(TokenText::SentencePiece { strip_space });
        }
        Err(EngineError::Unsupported(format!(
            "{json_name}: a tokenizer with decoder {} and pre_tokenizer {} is not supported: only byte-level BPE (GPT-2, Llama 3, Qwen) and byte-fallback BPE (SentencePiece: Llama 2, Mistral)",
            json_type_name(&self.decoder),
            json_type_name(&self.pre_tokenizer)
        )))
    }
}

/// Whether `value` is, or is a `Sequence` holding, a component of `wanted`
/// type.
pub(super) fn json_has_type(value: &serde_json::Value, wanted: &str) -> bool {
    if value.get("type").and_then(|t| t.as_str()) == Some(wanted) {
        return true;
    }
    ["decoders", "pretokenizers", "normalizers"]
        .iter()
        .filter_map(|key| value.get(key).and_then(|v| v.as_array()))
        .flatten()
        .any(|inner| json_has_type(inner, wanted))
}

/// A `Metaspace` pre-tokenizer that puts `▁` before the text.
pub(super) fn metaspace_prepends(value: &serde_json::Value) -> bool {
    if value.get("type").and_then(|t| t.as_str()) == Some("Metaspace") {
        let scheme = value.get("prepend_scheme").and_then(|s| s.as_str());
        let legacy = value.get("add_prefix_space").and_then(|b| b.as_bool());
        return scheme.map_or(legacy.unwrap_or(true), |s| s != "never");
    }
    value
        .get("pretokenizers")
        .and_then(|v| v.as_array())
        .is_some_and(|inner| inner.iter().any(metaspace_prepends))
}

pub(super) fn json_type_name(value: &serde_json::Value) -> String {
    match value.get("type").and_then(|t| t.as_str()) {
        Some(kind) => format!("{kind:?}"),
        None => value.to_string(),
    }
}

#[derive(Deserialize)]
pub(super) struct TokenizerConfigJson {
    #[serde(default)]
    pub(super) bos_token: Option<TokenNameJson>,
    #[serde(default)]
    pub(super) eos_token: Option<TokenNameJson>,
    #[serde(default)]
    pub(super) pad_token: Option<TokenNameJson>,
    #[serde(default)]
    pub(super) add_bos_token: Option<bool>,
}

/// A token in `tokenizer_config.json`: a string, an `AddedToken` object with
/// `content`, or null.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum TokenNameJson {
    Name(String),
    Object { content: String },
    Other(serde::de::IgnoredAny),
}

impl TokenNameJson {
    pub(super) fn into_content(self) -> Option<String> {
        match self {
            TokenNameJson::Name(name) => Some(name),
            TokenNameJson::Object { content } => Some(content),
            TokenNameJson::Other(_) => None,
        }
    }
}

#[derive(Deserialize)]
pub(super) struct GenerationConfigJson {
    #[serde(default)]
    pub(super) eos_token_id: IdsJson,
}

/// One id, a list of them, or nothing.
#[derive(Deserialize, Default)]
#[serde(untagged)]
pub(super) enum IdsJson {
    One(u32),
    Many(Vec<u32>),
    #[default]
    None,
    Other(serde::de::IgnoredAny),
}

impl IdsJson {
    pub(super) fn into_ids(self) -> Vec<u32> {
        match self {
            IdsJson::One(id) => vec![id],
            IdsJson::Many(ids) => ids,
            IdsJson::None | IdsJson::Other(_) => Vec::new(),
        }
    }
}
