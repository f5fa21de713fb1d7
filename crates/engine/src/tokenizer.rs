//! A byte-level BPE tokenizer (GPT-2 style, as Hugging Face `tokenizers`
//! implements `ByteLevel` + `BPE`), loaded from GGUF metadata or a
//! `tokenizer.json`, with a streaming decoder.
//!
//! Encoding runs in four steps, each matching the Hugging Face pipeline of
//! SmolLM2 (`Sequence[Digits(individual_digits), ByteLevel(add_prefix_space =
//! false, use_regex = true)]`):
//! 1. added tokens (`<|im_start|>` …) are cut out of the text, leftmost-longest;
//! 2. optionally every numeric char becomes its own piece (`Digits`);
//! 3. each piece is split by the GPT-2 pattern
//!    `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`,
//!    hand-written in [`split_gpt2`] because this crate takes no regex
//!    dependency, and no prefix space is added;
//! 4. each word's bytes become the GPT-2 printable chars and are merged by
//!    BPE, lowest merge rank first, leftmost first on a tie.
//!
//! Invariants:
//! * `decode(encode(s, false), false) == s` for every string `s` whose bytes
//!   all have a token ([`Tokenizer::encodes_losslessly`]); a token decodes
//!   to exactly the bytes it was made of. Bytes without a token are dropped,
//!   as Hugging Face does (its BPE has no unknown token here). SmolLM2's
//!   vocabulary lacks 21 of the 256 byte tokens: 0x04, 0x06, 0x13, 0x14,
//!   0x16, 0x1d (control chars) and 0xc0, 0xc1, 0xf1, 0xf2, 0xf5..=0xff
//!   (never in UTF-8, or leads of the unassigned planes U+40000..U+BFFFF).
//! * With `allow_special = false` no special (control) token id is produced
//!   from text, so user text cannot forge `<|im_start|>`: merges that would
//!   build a special token are dropped at load (real vocabularies have none),
//!   and a special token is never a single byte's token.
//! * Neither `encode` nor `decode` panics or fails on any input: unknown ids
//!   decode to nothing, as in Hugging Face.
//! * [`StreamDecoder`] emits only complete UTF-8; the concatenation of
//!   everything it emits plus [`StreamDecoder::finish`] equals `decode` of the
//!   same ids with the same `skip_special`.
//! * A `Tokenizer` is immutable after loading (no per-word cache), so it is
//!   `Send + Sync` without locks; encoding a prompt costs microseconds next to
//!   milliseconds per generated token, which is why no cache is kept.
//!
//! Approximation (documented, deliberate): `\p{L}` is taken as
//! `char::is_alphabetic() && !char::is_numeric()` and `\p{N}` as
//! `char::is_numeric()`. `is_numeric` is exactly `\p{N}` (Nd, Nl, No) and
//! `is_whitespace` is exactly White_Space, which is what Oniguruma's `\s`
//! matches; `is_alphabetic` also accepts Other_Alphabetic chars (mostly
//! combining vowel signs such as U+093E and circled letters such as U+24B6)
//! that `\p{L}` does not, so for scripts that use them a word can be split
//! at a different place than Hugging Face splits it. Round trips are exact
//! regardless; only the chosen ids can differ there.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::path::Path;

use candle_core::quantized::gguf_file;
use serde::Deserialize;

use crate::error::{EngineError, Result};
use crate::gguf_meta::GgufMeta;

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp `llama_token_type`).
const GGUF_TOKEN_TYPE_CONTROL: i32 = 3;
const GGUF_TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// How text is cut into words before BPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PreTokenizer {
    /// Every numeric char is its own piece before the GPT-2 split
    /// (`Digits(individual_digits = true)`; llama.cpp pre "smollm",
    /// "starcoder", "refact").
    individual_digits: bool,
}

/// A token cut out of the text before pre-tokenization.
#[derive(Debug, Clone)]
struct AddedToken {
    id: u32,
    content: String,
    /// Special (control) tokens are matched only with `allow_special` and
    /// dropped by `decode(.., skip_special = true)`; non-special added tokens
    /// are ordinary vocabulary that BPE cannot build, so they always match,
    /// as in Hugging Face.
    special: bool,
}

/// A byte-level BPE tokenizer. Cheap to share (`&Tokenizer` is all the
/// encoder and decoders need).
#[derive(Clone)]
pub struct Tokenizer {
    /// Token text by id; `None` for ids a sparse `tokenizer.json` skips.
    id_to_token: Vec<Option<String>>,
    token_to_id: HashMap<String, u32>,
    /// The bytes each id decodes to (added tokens: their text as is).
    id_to_bytes: Vec<Vec<u8>>,
    /// `(left id, right id) -> (rank, merged id)`.
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// The id of each byte's one-char token.
    byte_to_id: [Option<u32>; 256],
    /// Sorted longest first so the first match at a position is the longest.
    added_tokens: Vec<AddedToken>,
    /// Whether some added token starts with this byte.
    added_first_bytes: [bool; 256],
    special_ids: HashSet<u32>,
    pre_tokenizer: PreTokenizer,
    /// Hugging Face `ignore_merges`: a word that is itself in the vocabulary
    /// is emitted whole (Llama 3 style); false for SmolLM2 and GGUF.
    ignore_merges: bool,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    pad_id: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The vocabulary is tens of thousands of entries; print its shape.
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("n_merges", &self.merges.len())
            .field("n_added_tokens", &self.added_tokens.len())
            .field("pre_tokenizer", &self.pre_tokenizer)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

/// What the loaders hand to [`Tokenizer::build`].
struct Parts {
    /// `(token, id)`; later duplicates of a token text win, as in llama.cpp.
    vocab: Vec<(String, u32)>,
    merges: Vec<(String, String)>,
    added: Vec<AddedToken>,
    pre_tokenizer: PreTokenizer,
    ignore_merges: bool,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    pad_id: Option<u32>,
}

impl Tokenizer {
    /// Loads the tokenizer from GGUF metadata (`tokenizer.ggml.*`). Only
    /// `tokenizer.ggml.model = "gpt2"` (byte-level BPE) is supported.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Tokenizer> {
        let meta = GgufMeta::new(&content.metadata);
        let tok_err = |e: crate::gguf_meta::MetadataError| EngineError::Tokenizer(e.to_string());

        let model = meta.str("tokenizer.ggml.model").map_err(tok_err)?;
        if model != "gpt2" {
            return Err(EngineError::Unsupported(format!(
                "gguf metadata key tokenizer.ggml.model: tokenizer model {model:?} is not supported, only \"gpt2\" (byte-level bpe)"
            )));
        }
        let pre = meta.opt_str("tokenizer.ggml.pre").map_err(tok_err)?;
        let pre_tokenizer = match pre {
            // These llama.cpp pre-tokenizer names all mean "digits one by one,
            // then the GPT-2 pattern".
            Some("smollm" | "starcoder" | "refact") => PreTokenizer {
                individual_digits: true,
            },
            // A GGUF without the key predates `pre`; "gpt2" is what the model
            // name says it is.
            Some("gpt-2") | None => PreTokenizer {
                individual_digits: false,
            },
            Some(other) => {
                return Err(EngineError::Unsupported(format!(
                    "gguf metadata key tokenizer.ggml.pre: pre-tokenizer {other:?} is not supported (supported: smollm, starcoder, refact, gpt-2)"
                )))
            }
        };

        let tokens = meta.str_array("tokenizer.ggml.tokens").map_err(tok_err)?;
        let token_types = meta
            .opt_i32_array("tokenizer.ggml.token_type")
            .map_err(tok_err)?;
        if let Some(types) = &token_types {
            if types.len() != tokens.len() {
                return Err(EngineError::Tokenizer(format!(
                    "gguf metadata key tokenizer.ggml.token_type: {} types for {} tokens",
                    types.len(),
                    tokens.len()
                )));
            }
        }
        let mut vocab = Vec::with_capacity(tokens.len());
        let mut added = Vec::new();
        for (idx, token) in tokens.iter().enumerate() {
            let id = u32::try_from(idx).map_err(|_| {
                EngineError::Tokenizer(
                    "gguf metadata key tokenizer.ggml.tokens: more than u32::MAX tokens"
                        .to_string(),
                )
            })?;
            vocab.push((token.to_string(), id));
            let token_type = token_types
                .as_ref()
                .and_then(|types| types.get(idx).copied());
            match token_type {
                Some(GGUF_TOKEN_TYPE_CONTROL) => added.push(AddedToken {
                    id,
                    content: token.to_string(),
                    special: true,
                }),
                Some(GGUF_TOKEN_TYPE_USER_DEFINED) => added.push(AddedToken {
                    id,
                    content: token.to_string(),
                    special: false,
                }),
                _ => {}
            }
        }

        let merge_lines = meta.str_array("tokenizer.ggml.merges").map_err(tok_err)?;
        let mut merges = Vec::with_capacity(merge_lines.len());
        for (idx, line) in merge_lines.iter().enumerate() {
            merges.push(split_merge_line(line).ok_or_else(|| {
                EngineError::Tokenizer(format!(
                    "gguf metadata key tokenizer.ggml.merges: merge {idx} {line:?} is not two tokens separated by one space"
                ))
            })?);
        }

        let special_id = |key: &str| meta.opt_u32(key).map_err(tok_err);
        let n_tokens = tokens.len();
        let check_in_range = |key: &str, id: Option<u32>| -> Result<Option<u32>> {
            match id {
                Some(id) if id as usize >= n_tokens => Err(EngineError::Tokenizer(format!(
                    "gguf metadata key {key}: id {id} is outside the vocabulary of {n_tokens} tokens"
                ))),
                other => Ok(other),
            }
        };
        let bos_id = check_in_range(
            "tokenizer.ggml.bos_token_id",
            special_id("tokenizer.ggml.bos_token_id")?,
        )?;
        let eos_id = check_in_range(
            "tokenizer.ggml.eos_token_id",
            special_id("tokenizer.ggml.eos_token_id")?,
        )?;
        let pad_id = check_in_range(
            "tokenizer.ggml.padding_token_id",
            special_id("tokenizer.ggml.padding_token_id")?,
        )?;

        Self::build(
            "gguf metadata",
            Parts {
                vocab,
                merges,
                added,
                pre_tokenizer,
                ignore_merges: false,
                bos_id,
                eos_id,
                pad_id,
            },
        )
    }

    /// Loads a Hugging Face `tokenizer.json`. The bos/eos/pad tokens are not
    /// in that file; they are read from a `tokenizer_config.json` next to it
    /// when there is one (as `transformers` does), and are `None` otherwise.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Tokenizer> {
        let path = path.as_ref();
        let json = std::fs::read_to_string(path)
            .map_err(|e| EngineError::Tokenizer(format!("{}: cannot read: {e}", path.display())))?;
        let config_path = path.with_file_name("tokenizer_config.json");
        let config_json = match std::fs::read_to_string(&config_path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(EngineError::Tokenizer(format!(
                    "{}: cannot read: {e}",
                    config_path.display()
                )))
            }
        };
        Self::from_json_parts(
            &json,
            config_json.as_deref(),
            &path.display().to_string(),
            &config_path.display().to_string(),
        )
    }

    /// [`Tokenizer::from_file`] on text already in memory: the contents of
    /// `tokenizer.json` and, optionally, of `tokenizer_config.json`.
    pub fn from_json_str(
        tokenizer_json: &str,
        tokenizer_config_json: Option<&str>,
    ) -> Result<Tokenizer> {
        Self::from_json_parts(
            tokenizer_json,
            tokenizer_config_json,
            "tokenizer.json",
            "tokenizer_config.json",
        )
    }

    /// The loader behind both; `json_name` and `config_name` name the
    /// sources in errors.
    fn from_json_parts(
        tokenizer_json: &str,
        tokenizer_config_json: Option<&str>,
        json_name: &str,
        config_name: &str,
    ) -> Result<Tokenizer> {
        let file: TokenizerJson = serde_json::from_str(tokenizer_json)
            .map_err(|e| EngineError::Tokenizer(format!("{json_name}: invalid: {e}")))?;
        let model = file.model;
        if let Some(kind) = model.kind.as_deref() {
            if kind != "BPE" {
                return Err(EngineError::Unsupported(format!(
                    "{json_name}: model type {kind:?} is not supported, only \"BPE\""
                )));
            }
        }
        if model.byte_fallback {
            return Err(EngineError::Unsupported(
                format!("{json_name}: byte_fallback bpe (sentencepiece style) is not supported, only byte-level bpe"),
            ));
        }
        for (field, value) in [
            (
                "continuing_subword_prefix",
                &model.continuing_subword_prefix,
            ),
            ("end_of_word_suffix", &model.end_of_word_suffix),
        ] {
            if value.as_deref().is_some_and(|v| !v.is_empty()) {
                return Err(EngineError::Unsupported(format!(
                    "{json_name}: model.{field} is not supported"
                )));
            }
        }
        if !file.normalizer.is_null() {
            return Err(EngineError::Unsupported(format!(
                "{json_name}: normalizer {} is not supported, only null",
                json_type_name(&file.normalizer)
            )));
        }
        let pre_tokenizer = parse_pre_tokenizer(&file.pre_tokenizer, json_name)?;

        let vocab: Vec<(String, u32)> = model.vocab.into_iter().collect();
        let mut merges = Vec::with_capacity(model.merges.len());
        for (idx, merge) in model.merges.into_iter().enumerate() {
            merges.push(match merge {
                MergeJson::Pair(left, right) => (left, right),
                MergeJson::Joined(line) => split_merge_line(&line).ok_or_else(|| {
                    EngineError::Tokenizer(format!(
                        "{json_name}: model.merges[{idx}] {line:?} is not two tokens separated by one space"
                    ))
                })?,
            });
        }
        let added: Vec<AddedToken> = file
            .added_tokens
            .into_iter()
            .map(|t| AddedToken {
                id: t.id,
                content: t.content,
                special: t.special,
            })
            .collect();

        // Resolve the config's token names through both the model vocabulary
        // and the added tokens (which may have ids beyond the vocabulary).
        let (mut bos_id, mut eos_id, mut pad_id) = (None, None, None);
        if let Some(config_json) = tokenizer_config_json {
            let config: TokenizerConfigJson = serde_json::from_str(config_json)
                .map_err(|e| EngineError::Tokenizer(format!("{config_name}: invalid: {e}")))?;
            let lookup = |name: &str, token: Option<TokenNameJson>| -> Result<Option<u32>> {
                let Some(token) = token.and_then(TokenNameJson::into_content) else {
                    return Ok(None);
                };
                let id = added
                    .iter()
                    .find(|a| a.content == token)
                    .map(|a| a.id)
                    .or_else(|| vocab.iter().find(|(t, _)| *t == token).map(|(_, id)| *id));
                id.map(Some).ok_or_else(|| {
                    EngineError::Tokenizer(format!(
                        "{config_name}: {name} {token:?} is not in the vocabulary"
                    ))
                })
            };
            bos_id = lookup("bos_token", config.bos_token)?;
            eos_id = lookup("eos_token", config.eos_token)?;
            pad_id = lookup("pad_token", config.pad_token)?;
        }

        Self::build(
            json_name,
            Parts {
                vocab,
                merges,
                added,
                pre_tokenizer,
                ignore_merges: model.ignore_merges,
                bos_id,
                eos_id,
                pad_id,
            },
        )
    }

    /// Builds the lookup tables shared by both loaders; `source` names the
    /// file or metadata in errors.
    fn build(source: &str, parts: Parts) -> Result<Tokenizer> {
        let max_id = parts
            .vocab
            .iter()
            .map(|(_, id)| *id)
            .chain(parts.added.iter().map(|a| a.id))
            .max();
        let Some(max_id) = max_id else {
            return Err(EngineError::Tokenizer(format!(
                "{source}: the vocabulary is empty"
            )));
        };
        let vocab_size = max_id as usize + 1;
        // Ids index a table, so a corrupt file with one huge id must not
        // make us allocate gigabytes; real vocabularies are dense.
        let n_entries = parts.vocab.len() + parts.added.len();
        if vocab_size > 2 * n_entries + 1024 {
            return Err(EngineError::Tokenizer(format!(
                "{source}: id {max_id} is far beyond the {n_entries} tokens; ids must be dense"
            )));
        }
        let mut id_to_token: Vec<Option<String>> = vec![None; vocab_size];
        let mut token_to_id = HashMap::with_capacity(parts.vocab.len());
        for (token, id) in parts.vocab {
            id_to_token[id as usize] = Some(token.clone());
            token_to_id.insert(token, id);
        }
        for added in &parts.added {
            id_to_token[added.id as usize] = Some(added.content.clone());
            token_to_id.insert(added.content.clone(), added.id);
        }

        let char_to_byte: HashMap<char, u8> = BYTE_TO_CHAR
            .iter()
            .enumerate()
            .filter_map(|(byte, c)| u8::try_from(byte).ok().map(|b| (*c, b)))
            .collect();
        let special_id_set: HashSet<u32> = parts
            .added
            .iter()
            .filter(|a| a.special)
            .map(|a| a.id)
            .collect();
        let mut byte_to_id = [None; 256];
        for (byte, c) in BYTE_TO_CHAR.iter().enumerate() {
            byte_to_id[byte] = token_to_id
                .get(c.to_string().as_str())
                .copied()
                .filter(|id| !special_id_set.contains(id));
        }
        // Real vocabularies miss a few byte tokens (see the module doc), but
        // one without the printable ASCII ones is not byte-level at all and
        // would silently drop most text.
        if let Some(byte) = (0x21..=0x7e).find(|b: &usize| byte_to_id[*b].is_none()) {
            return Err(EngineError::Tokenizer(format!(
                "{source}: no token for byte 0x{byte:02x} ({:?}); not a byte-level bpe vocabulary",
                BYTE_TO_CHAR[byte]
            )));
        }

        let added_ids: HashSet<u32> = parts.added.iter().map(|a| a.id).collect();
        let id_to_bytes: Vec<Vec<u8>> = id_to_token
            .iter()
            .enumerate()
            .map(|(id, token)| {
                let Some(token) = token else {
                    return Vec::new();
                };
                let is_added = u32::try_from(id).is_ok_and(|id| added_ids.contains(&id));
                if is_added {
                    return token.as_bytes().to_vec();
                }
                // A token with a char outside the byte alphabet is decoded
                // as its raw UTF-8, as the Hugging Face ByteLevel decoder does.
                token
                    .chars()
                    .map(|c| char_to_byte.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .unwrap_or_else(|| token.as_bytes().to_vec())
            })
            .collect();

        let mut merges = HashMap::with_capacity(parts.merges.len());
        for (rank, (left, right)) in parts.merges.iter().enumerate() {
            let lookup = |token: &str| {
                token_to_id.get(token).copied().ok_or_else(|| {
                    EngineError::Tokenizer(format!(
                        "{source}: merge {rank} ({left:?} {right:?}): token {token:?} is not in the vocabulary"
                    ))
                })
            };
            let left_id = lookup(left)?;
            let right_id = lookup(right)?;
            let merged_id = lookup(&format!("{left}{right}"))?;
            let rank = u32::try_from(rank).map_err(|_| {
                EngineError::Tokenizer(format!("{source}: more than u32::MAX merges"))
            })?;
            // Plain text must never turn into a control token, whatever the
            // merges say (see the module invariants).
            if special_id_set.contains(&merged_id) {
                continue;
            }
            // A duplicate pair takes the later rank, as Hugging Face's
            // HashMap collection does.
            merges.insert((left_id, right_id), (rank, merged_id));
        }

        let mut added_tokens: Vec<AddedToken> = parts
            .added
            .into_iter()
            .filter(|a| !a.content.is_empty())
            .collect();
        added_tokens.sort_by(|a, b| b.content.len().cmp(&a.content.len()).then(a.id.cmp(&b.id)));
        let mut added_first_bytes = [false; 256];
        for token in &added_tokens {
            if let Some(first) = token.content.bytes().next() {
                added_first_bytes[usize::from(first)] = true;
            }
        }

        Ok(Tokenizer {
            id_to_token,
            token_to_id,
            id_to_bytes,
            merges,
            byte_to_id,
            added_tokens,
            added_first_bytes,
            special_ids: special_id_set,
            pre_tokenizer: parts.pre_tokenizer,
            ignore_merges: parts.ignore_merges,
            bos_id: parts.bos_id,
            eos_id: parts.eos_id,
            pad_id: parts.pad_id,
        })
    }

    /// Encodes `text`. With `allow_special` the text of a special token
    /// (`<|im_start|>`) becomes that token's id; without, it is encoded as
    /// plain text. No bos/eos is added.
    pub fn encode(&self, text: &str, allow_special: bool) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 1);
        let mut rest = text;
        while !rest.is_empty() {
            match self.find_added(rest, allow_special) {
                Some((start, token)) => {
                    self.encode_plain(&rest[..start], &mut ids);
                    ids.push(token.id);
                    rest = &rest[start + token.content.len()..];
                }
                None => {
                    self.encode_plain(rest, &mut ids);
                    break;
                }
            }
        }
        ids
    }

    /// The leftmost added token in `text`, longest at that position.
    fn find_added(&self, text: &str, allow_special: bool) -> Option<(usize, &AddedToken)> {
        let eligible = |t: &&AddedToken| allow_special || !t.special;
        if !self.added_tokens.iter().any(|t| eligible(&t)) {
            return None;
        }
        // Tokens start at char boundaries, so only those need checking, and
        // only where the first byte can start one (`<` for most models).
        text.char_indices().find_map(|(start, _)| {
            let tail = &text.as_bytes()[start..];
            if !tail
                .first()
                .is_some_and(|b| self.added_first_bytes[usize::from(*b)])
            {
                return None;
            }
            self.added_tokens
                .iter()
                .filter(eligible)
                .find(|t| tail.starts_with(t.content.as_bytes()))
                .map(|t| (start, t))
        })
    }

    /// Encodes text that contains no added token to cut out.
    fn encode_plain(&self, text: &str, ids: &mut Vec<u32>) {
        let mut words = Vec::new();
        if self.pre_tokenizer.individual_digits {
            let mut piece_start = 0;
            for (idx, c) in text.char_indices() {
                if c.is_numeric() {
                    split_gpt2(&text[piece_start..idx], &mut words);
                    let end = idx + c.len_utf8();
                    words.push(&text[idx..end]);
                    piece_start = end;
                }
            }
            split_gpt2(&text[piece_start..], &mut words);
        } else {
            split_gpt2(text, &mut words);
        }
        for word in words {
            self.bpe(word.as_bytes(), ids);
        }
    }

    /// Byte-level BPE of one word, the same algorithm as Hugging Face's
    /// `Word::merge_all`: a min-heap of candidate merges ordered by (rank,
    /// position); a popped candidate is applied only if the pair at that
    /// position is still the one it was made for.
    fn bpe(&self, word: &[u8], ids: &mut Vec<u32>) {
        if word.is_empty() {
            return;
        }
        if self.ignore_merges {
            let as_chars: String = word.iter().map(|b| byte_to_char(*b)).collect();
            let whole = self.token_to_id.get(&as_chars);
            if let Some(id) = whole.filter(|id| !self.special_ids.contains(id)) {
                ids.push(*id);
                return;
            }
        }
        // Bytes without a token are dropped, as Hugging Face does.
        let mut symbols: Vec<Symbol> = word
            .iter()
            .filter_map(|b| self.byte_to_id[usize::from(*b)])
            .enumerate()
            .map(|(pos, id)| Symbol {
                id,
                prev: pos.checked_sub(1),
                next: Some(pos + 1),
                alive: true,
            })
            .collect();
        if let Some(last) = symbols.last_mut() {
            last.next = None;
        }

        let mut heap = BinaryHeap::new();
        for pos in 0..symbols.len().saturating_sub(1) {
            if let Some(&(rank, merged)) = self.merges.get(&(symbols[pos].id, symbols[pos + 1].id))
            {
                heap.push(Reverse((rank, pos, merged)));
            }
        }
        while let Some(Reverse((_, pos, merged))) = heap.pop() {
            if !symbols[pos].alive {
                continue;
            }
            let Some(next) = symbols[pos].next else {
                continue;
            };
            let current = self.merges.get(&(symbols[pos].id, symbols[next].id));
            if current.map(|(_, id)| *id) != Some(merged) {
                continue;
            }
            symbols[pos].id = merged;
            symbols[next].alive = false;
            symbols[pos].next = symbols[next].next;
            if let Some(after) = symbols[pos].next {
                symbols[after].prev = Some(pos);
            }
            if let Some(prev) = symbols[pos].prev {
                if let Some(&(rank, new)) = self.merges.get(&(symbols[prev].id, merged)) {
                    heap.push(Reverse((rank, prev, new)));
                }
            }
            if let Some(after) = symbols[pos].next {
                if let Some(&(rank, new)) = self.merges.get(&(merged, symbols[after].id)) {
                    heap.push(Reverse((rank, pos, new)));
                }
            }
        }
        // A merge always absorbs the right symbol into the left one, so the
        // live symbols are in text order.
        ids.extend(symbols.iter().filter(|s| s.alive).map(|s| s.id));
    }

    /// Decodes ids to text. Invalid UTF-8 (a sequence cut mid-character)
    /// becomes U+FFFD; ids outside the vocabulary decode to nothing.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            self.push_token_bytes(id, skip_special, &mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn push_token_bytes(&self, id: u32, skip_special: bool, bytes: &mut Vec<u8>) {
        if skip_special && self.special_ids.contains(&id) {
            return;
        }
        if let Some(token_bytes) = self.id_to_bytes.get(id as usize) {
            bytes.extend_from_slice(token_bytes);
        }
    }

    /// A decoder for ids arriving one at a time (generation). It drops
    /// special tokens by default; see [`StreamDecoder::with_skip_special`].
    pub fn decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder {
            tokenizer: self,
            pending: Vec::new(),
            skip_special: true,
        }
    }

    /// The bytes one id decodes to (empty outside the vocabulary): a piece
    /// of UTF-8 that may stop mid-character.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.id_to_bytes
            .get(id as usize)
            .map(|b| b.as_slice())
            .unwrap_or(&[])
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.token_to_id.get(token).copied()
    }

    /// The token's text as stored in the vocabulary (byte-level chars, e.g.
    /// `Ġthe` for " the").
    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.id_to_token.get(id as usize).and_then(|t| t.as_deref())
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// The ids that end generation: the eos token and, if the vocabulary has
    /// it, `<|im_end|>` (chat models end a turn with it even when their eos
    /// is `<|endoftext|>`). No duplicates.
    pub fn eos_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.eos_id.into_iter().collect();
        if let Some(im_end) = self.token_to_id("<|im_end|>") {
            if !ids.contains(&im_end) {
                ids.push(im_end);
            }
        }
        ids
    }

    /// Whether `id` is a special (control) token.
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    /// Whether every byte of `text` has a token, so that
    /// `decode(encode(text, _), false) == text`.
    pub fn encodes_losslessly(&self, text: &str) -> bool {
        text.bytes()
            .all(|b| self.byte_to_id[usize::from(b)].is_some())
    }

    /// One more than the largest id.
    pub fn vocab_size(&self) -> usize {
        self.id_to_token.len()
    }
}

/// One symbol of a word during BPE, in a doubly linked list over a Vec.
#[derive(Debug, Clone, Copy)]
struct Symbol {
    id: u32,
    prev: Option<usize>,
    next: Option<usize>,
    alive: bool,
}

/// Turns ids into text as they are generated, holding back bytes until they
/// form complete UTF-8 characters (a byte-level token can end inside one).
#[derive(Debug)]
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    /// Bytes of an unfinished character; never more than 3.
    pending: Vec<u8>,
    skip_special: bool,
}

impl StreamDecoder<'_> {
    /// Whether special tokens are dropped (the default) or emitted as their
    /// text.
    pub fn with_skip_special(mut self, skip_special: bool) -> Self {
        self.skip_special = skip_special;
        self
    }

    /// Adds one id; returns the text completed by it, if any.
    pub fn push(&mut self, id: u32) -> Option<String> {
        self.tokenizer
            .push_token_bytes(id, self.skip_special, &mut self.pending);
        let mut text = String::new();
        let mut consumed = 0;
        loop {
            match std::str::from_utf8(&self.pending[consumed..]) {
                Ok(valid) => {
                    text.push_str(valid);
                    consumed = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid_end = consumed + e.valid_up_to();
                    text.push_str(&String::from_utf8_lossy(&self.pending[consumed..valid_end]));
                    consumed = valid_end;
                    match e.error_len() {
                        // Bytes that can never become a character: replace
                        // them exactly as `String::from_utf8_lossy` would, so
                        // streaming and `decode` agree.
                        Some(len) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            consumed += len;
                        }
                        // The start of a character whose rest is still to
                        // come: keep it for the next push.
                        None => break,
                    }
                }
            }
        }
        self.pending.drain(..consumed);
        (!text.is_empty()).then_some(text)
    }

    /// Ends the stream: bytes of a character that never completed come out
    /// as U+FFFD.
    pub fn finish(self) -> Option<String> {
        (!self.pending.is_empty()).then(|| String::from_utf8_lossy(&self.pending).into_owned())
    }
}

/// The GPT-2 `bytes_to_unicode` table: printable Latin-1 bytes map to
/// themselves, the other 68 bytes to U+0100.. in byte order, so every byte
/// is a visible char and a space is `Ġ` (U+0120).
const BYTE_TO_CHAR: [char; 256] = byte_to_char_table();

const fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n_shifted = 0u32;
    let mut byte = 0usize;
    while byte < 256 {
        let keep = matches!(byte, 0x21..=0x7e | 0xa1..=0xac | 0xae..=0xff);
        let code = if keep {
            byte as u32
        } else {
            n_shifted += 1;
            255 + n_shifted
        };
        // 256..=323 are all valid scalar values; the fallback is unreachable.
        table[byte] = match char::from_u32(code) {
            Some(c) => c,
            None => char::REPLACEMENT_CHARACTER,
        };
        byte += 1;
    }
    table
}

fn byte_to_char(byte: u8) -> char {
    BYTE_TO_CHAR[usize::from(byte)]
}

/// `"a b"` → `("a", "b")`; byte-level tokens never contain a space (it is
/// `Ġ`), so exactly one space separates the two halves.
fn split_merge_line(line: &str) -> Option<(String, String)> {
    let (left, right) = line.split_once(' ')?;
    if left.is_empty() || right.is_empty() || right.contains(' ') {
        return None;
    }
    Some((left.to_string(), right.to_string()))
}

/// The char classes of the GPT-2 pattern; see the module doc for how they
/// approximate `\p{L}`, `\p{N}` and `\s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CharClass {
    Letter,
    Number,
    Space,
    Other,
}

fn char_class(c: char) -> CharClass {
    if c.is_whitespace() {
        CharClass::Space
    } else if c.is_numeric() {
        // Before the letter test: Nl chars (Ⅻ) are alphabetic *and* numeric,
        // and `\p{N}` claims them.
        CharClass::Number
    } else if c.is_alphabetic() {
        CharClass::Letter
    } else {
        CharClass::Other
    }
}

/// Splits `text` by the GPT-2 pattern
/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
/// with leftmost-first alternation, as the regex engine would, pushing the
/// non-empty pieces (which concatenate back to `text`) onto `out`.
pub(crate) fn split_gpt2<'t>(text: &'t str, out: &mut Vec<&'t str>) {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let byte_at = |idx: usize| chars.get(idx).map_or(text.len(), |(byte, _)| *byte);
    let mut idx = 0;
    while idx < chars.len() {
        let end = gpt2_match_end(&chars, idx);
        out.push(&text[byte_at(idx)..byte_at(end)]);
        idx = end;
    }
}

/// The end (char index, exclusive) of the pattern's match starting at
/// `start`; always greater than `start`, because the alternatives together
/// accept any char.
fn gpt2_match_end(chars: &[(usize, char)], start: usize) -> usize {
    let char_at = |idx: usize| chars.get(idx).map(|(_, c)| *c);
    let first = chars[start].1;

    // 's|'t|'re|'ve|'m|'ll|'d — ASCII apostrophe, case-sensitive.
    if first == '\'' {
        match (char_at(start + 1), char_at(start + 2)) {
            (Some('s' | 't' | 'm' | 'd'), _) => return start + 2,
            (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l')) => {
                return start + 3
            }
            _ => {}
        }
    }

    // ` ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+`: the three classes are disjoint,
    // so these alternatives reduce to "an optional U+0020 then a run of one
    // non-space class".
    let run_start = match char_at(start + 1) {
        Some(next) if first == ' ' && char_class(next) != CharClass::Space => start + 1,
        _ => start,
    };
    let run_class = char_class(chars[run_start].1);
    if run_class != CharClass::Space {
        let mut end = run_start + 1;
        while char_at(end).is_some_and(|c| char_class(c) == run_class) {
            end += 1;
        }
        return end;
    }

    // `\s+(?!\S)|\s+`: a whitespace run at the end of the text is taken whole;
    // one followed by a non-space gives up its last char (which then leads
    // the next word, e.g. " world"), unless it is a single char, which `\s+`
    // takes anyway.
    let mut end = start + 1;
    while char_at(end).is_some_and(char::is_whitespace) {
        end += 1;
    }
    if end < chars.len() && end - start >= 2 {
        end - 1
    } else {
        end
    }
}

#[derive(Deserialize)]
struct TokenizerJson {
    model: ModelJson,
    #[serde(default)]
    added_tokens: Vec<AddedTokenJson>,
    #[serde(default)]
    normalizer: serde_json::Value,
    #[serde(default)]
    pre_tokenizer: serde_json::Value,
}

#[derive(Deserialize)]
struct ModelJson {
    #[serde(rename = "type")]
    kind: Option<String>,
    vocab: HashMap<String, u32>,
    #[serde(default)]
    merges: Vec<MergeJson>,
    #[serde(default)]
    ignore_merges: bool,
    #[serde(default)]
    byte_fallback: bool,
    #[serde(default)]
    continuing_subword_prefix: Option<String>,
    #[serde(default)]
    end_of_word_suffix: Option<String>,
}

/// `tokenizers` < 0.20 writes merges as `"a b"`, later versions as `["a", "b"]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum MergeJson {
    Joined(String),
    Pair(String, String),
}

#[derive(Deserialize)]
struct AddedTokenJson {
    id: u32,
    content: String,
    #[serde(default)]
    special: bool,
}

#[derive(Deserialize)]
struct TokenizerConfigJson {
    #[serde(default)]
    bos_token: Option<TokenNameJson>,
    #[serde(default)]
    eos_token: Option<TokenNameJson>,
    #[serde(default)]
    pad_token: Option<TokenNameJson>,
}

/// A token in `tokenizer_config.json`: a string, an `AddedToken` object with
/// `content`, or null.
#[derive(Deserialize)]
#[serde(untagged)]
enum TokenNameJson {
    Name(String),
    Object { content: String },
    Other(serde::de::IgnoredAny),
}

impl TokenNameJson {
    fn into_content(self) -> Option<String> {
        match self {
            TokenNameJson::Name(name) => Some(name),
            TokenNameJson::Object { content } => Some(content),
            TokenNameJson::Other(_) => None,
        }
    }
}

fn json_type_name(value: &serde_json::Value) -> String {
    match value.get("type").and_then(|t| t.as_str()) {
        Some(kind) => format!("{kind:?}"),
        None => value.to_string(),
    }
}

/// Accepts the pre-tokenizers this module implements: `ByteLevel` alone
/// (GPT-2) and `Sequence[Digits(individual_digits = true), ByteLevel]`
/// (SmolLM2, StarCoder), both with `add_prefix_space = false` and
/// `use_regex = true`.
fn parse_pre_tokenizer(value: &serde_json::Value, json_name: &str) -> Result<PreTokenizer> {
    let unsupported = |what: String| {
        EngineError::Unsupported(format!(
            "{json_name}: pre_tokenizer {what} is not supported (supported: ByteLevel, Sequence[Digits(individual_digits), ByteLevel], with add_prefix_space false and use_regex true)"
        ))
    };
    let check_byte_level = |value: &serde_json::Value| -> Result<()> {
        if value.get("type").and_then(|t| t.as_str()) != Some("ByteLevel") {
            return Err(unsupported(json_type_name(value)));
        }
        // Hugging Face defaults: add_prefix_space true, use_regex true.
        let add_prefix_space = value
            .get("add_prefix_space")
            .and_then(|v| v.as_bool())
            .unwrap_or(true);
        let use_regex = value
            .get("use_regex")
            .and_then(|v| v.as_bool())
            .unwrap_or(true);
        if add_prefix_space {
            return Err(unsupported(
                "ByteLevel with add_prefix_space true".to_string(),
            ));
        }
        if !use_regex {
            return Err(unsupported("ByteLevel with use_regex false".to_string()));
        }
        Ok(())
    };
    match value.get("type").and_then(|t| t.as_str()) {
        Some("ByteLevel") => {
            check_byte_level(value)?;
            Ok(PreTokenizer {
                individual_digits: false,
            })
        }
        Some("Sequence") => {
            let steps = value
                .get("pretokenizers")
                .and_then(|v| v.as_array())
                .map(Vec::as_slice)
                .unwrap_or_default();
            match steps {
                [digits, byte_level]
                    if digits.get("type").and_then(|t| t.as_str()) == Some("Digits")
                        && digits.get("individual_digits").and_then(|v| v.as_bool())
                            == Some(true) =>
                {
                    check_byte_level(byte_level)?;
                    Ok(PreTokenizer {
                        individual_digits: true,
                    })
                }
                [byte_level] => {
                    check_byte_level(byte_level)?;
                    Ok(PreTokenizer {
                        individual_digits: false,
                    })
                }
                _ => Err(unsupported(format!(
                    "Sequence[{}]",
                    steps
                        .iter()
                        .map(json_type_name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
            }
        }
        _ => Err(unsupported(json_type_name(value))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(text: &str) -> Vec<&str> {
        let mut out = Vec::new();
        split_gpt2(text, &mut out);
        out
    }

    #[test]
    fn gpt2_split_matches_the_regex_on_the_classic_cases() {
        assert_eq!(split("Hello world"), ["Hello", " world"]);
        assert_eq!(split("don't it's"), ["don", "'t", " it", "'s"]);
        assert_eq!(split("I'LL we're"), ["I", "'", "LL", " we", "'re"]);
        assert_eq!(split("a  b"), ["a", " ", " b"]);
        assert_eq!(split("a\n\nb"), ["a", "\n", "\n", "b"]);
        assert_eq!(split("x\t\ty \n z"), ["x", "\t", "\t", "y", " \n", " z"]);
        assert_eq!(split("end  "), ["end", "  "]);
        assert_eq!(split("?!'s ok..."), ["?!'", "s", " ok", "..."]);
        assert_eq!(split(" 123abc"), [" 123", "abc"]);
        assert_eq!(split("'"), ["'"]);
        assert_eq!(split(""), Vec::<&str>::new());
    }

    #[test]
    fn gpt2_split_pieces_concatenate_to_the_input() {
        for text in [
            "  lead",
            "naïve café 東京",
            "\u{3000}x\u{a0} y",
            "a'b'c'",
            "Ⅻ½²",
        ] {
            assert_eq!(split(text).concat(), text);
        }
    }

    #[test]
    fn byte_table_is_the_gpt2_one() {
        let table = BYTE_TO_CHAR;
        assert_eq!(table[usize::from(b' ')], 'Ġ');
        assert_eq!(table[usize::from(b'\n')], 'Ċ');
        assert_eq!(table[usize::from(b'a')], 'a');
        assert_eq!(table[0], '\u{100}');
        assert_eq!(table[0xad], '\u{143}');
        let distinct: HashSet<char> = table.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    /// A tiny byte-level vocabulary: all 256 byte chars, a few merges and two
    /// added tokens, written as a `tokenizer.json`.
    fn tiny_tokenizer_json(merges_as_pairs: bool) -> String {
        let table = BYTE_TO_CHAR;
        let mut vocab: Vec<(String, u32)> = Vec::new();
        vocab.push(("<|im_start|>".to_string(), 0));
        vocab.push(("<|user_word|>".to_string(), 1));
        for (idx, c) in table.iter().enumerate() {
            vocab.push((c.to_string(), idx as u32 + 2));
        }
        let merge_list = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w")];
        for (id, (left, right)) in (258..).zip(merge_list) {
            vocab.push((format!("{left}{right}"), id));
        }
        let vocab_json: serde_json::Map<String, serde_json::Value> = vocab
            .into_iter()
            .map(|(t, id)| (t, serde_json::Value::from(id)))
            .collect();
        let merges_json: Vec<serde_json::Value> = merge_list
            .iter()
            .map(|(l, r)| {
                if merges_as_pairs {
                    serde_json::json!([l, r])
                } else {
                    serde_json::json!(format!("{l} {r}"))
                }
            })
            .collect();
        serde_json::json!({
            "added_tokens": [
                {"id": 0, "content": "<|im_start|>", "special": true},
                {"id": 1, "content": "<|user_word|>", "special": false},
            ],
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            ]},
            "model": {"type": "BPE", "vocab": vocab_json, "merges": merges_json},
        })
        .to_string()
    }

    fn tiny(merges_as_pairs: bool) -> Tokenizer {
        let config = r#"{"bos_token": "<|im_start|>", "eos_token": {"content": "<|user_word|>"}, "pad_token": null}"#;
        Tokenizer::from_json_str(&tiny_tokenizer_json(merges_as_pairs), Some(config)).unwrap()
    }

    #[test]
    fn tiny_vocab_merges_by_rank_in_both_merge_forms() {
        for pairs in [false, true] {
            let tok = tiny(pairs);
            let ids = tok.encode("hello world", true);
            let tokens: Vec<&str> = ids.iter().map(|id| tok.id_to_token(*id).unwrap()).collect();
            assert_eq!(tokens, ["hell", "o", "Ġw", "o", "r", "l", "d"]);
            assert_eq!(tok.decode(&ids, false), "hello world");
            assert_eq!(tok.bos_id(), Some(0));
            assert_eq!(tok.eos_ids(), vec![1]);
            assert_eq!(tok.pad_id(), None);
        }
    }

    #[test]
    fn special_tokens_need_allow_special_but_user_defined_ones_do_not() {
        let tok = tiny(true);
        assert_eq!(tok.encode("<|im_start|>he", true)[0], 0);
        let plain = tok.encode("<|im_start|>he", false);
        assert!(!plain.contains(&0));
        assert_eq!(tok.decode(&plain, false), "<|im_start|>he");
        assert_eq!(tok.encode("x<|user_word|>", false).last(), Some(&1));
        assert_eq!(tok.decode(&[0, 1], true), "<|user_word|>");
        assert_eq!(tok.decode(&[0, 1], false), "<|im_start|><|user_word|>");
    }

    #[test]
    fn unsupported_tokenizer_json_is_an_error_naming_the_part() {
        let mut json: serde_json::Value =
            serde_json::from_str(&tiny_tokenizer_json(false)).unwrap();
        json["pre_tokenizer"] = serde_json::json!({"type": "Metaspace"});
        let err = Tokenizer::from_json_str(&json.to_string(), None).unwrap_err();
        assert!(
            err.to_string().contains("pre_tokenizer \"Metaspace\""),
            "{err}"
        );

        let mut json: serde_json::Value =
            serde_json::from_str(&tiny_tokenizer_json(false)).unwrap();
        json["model"]["merges"] = serde_json::json!(["h e", "x y z"]);
        let err = Tokenizer::from_json_str(&json.to_string(), None).unwrap_err();
        assert!(err.to_string().contains("model.merges[1]"), "{err}");

        let config = r#"{"eos_token": "</s>"}"#;
        let err = Tokenizer::from_json_str(&tiny_tokenizer_json(false), Some(config)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tokenizer: tokenizer_config.json: eos_token \"</s>\" is not in the vocabulary"
        );
    }

    #[test]
    fn stream_decoder_holds_back_partial_characters() {
        let tok = tiny(true);
        // "é" is 0xC3 0xA9: two byte tokens.
        let ids = tok.encode("é!", false);
        assert_eq!(ids.len(), 3);
        let mut decoder = tok.decoder();
        assert_eq!(decoder.push(ids[0]), None);
        assert_eq!(decoder.push(ids[1]).as_deref(), Some("é"));
        assert_eq!(decoder.push(ids[2]).as_deref(), Some("!"));
        assert_eq!(decoder.finish(), None);

        let mut decoder = tok.decoder();
        assert_eq!(decoder.push(ids[0]), None);
        assert_eq!(decoder.finish().as_deref(), Some("\u{fffd}"));
    }
}
