//! Tokenizers, loaded from a Hugging Face `tokenizer.json` or built from GGUF
//! metadata ([`gguf`]), with a streaming decoder.
//!
//! Encoding is Hugging Face `tokenizers` itself: its byte-level BPE (GPT-2,
//! Llama 3, Qwen, SmolLM2, DeepSeek) and its byte-fallback BPE (the
//! SentencePiece models: Llama 2, TinyLlama, Mistral), with their
//! normalizers, pre-tokenizer regexes and added tokens. A GGUF file carries
//! no `tokenizer.json`, so [`gguf`] builds the same pipeline from its
//! `tokenizer.ggml.*` keys: the pre-tokenizer named by `tokenizer.ggml.pre`
//! comes from a table written in `tokenizer.json` form, and a SentencePiece
//! vocabulary gets its merges from its scores the way `transformers`
//! converts one.
//!
//! Kept here, because the library does not model it the way serving needs:
//! * the bytes of each token (a byte-level token can end inside a UTF-8
//!   character; `tokenizers`' decoders return lossy strings per token), from
//!   which [`Tokenizer::decode`] and [`StreamDecoder`] are built;
//! * which text may produce special ids (user text may not);
//! * the BOS and end-of-generation policy ([`Tokenizer::encode_prompt`],
//!   [`Tokenizer::eos_ids`]).
//!
//! Invariants:
//! * `decode(encode(s, false), false) == s` for every string `s` that
//!   [`Tokenizer::encodes_losslessly`]: every byte of it has a token (the
//!   byte-level alphabet, or SentencePiece's `<0xAB>` byte tokens) and, for
//!   SentencePiece, it holds no `▁` (U+2581, which stands for a space). A
//!   token decodes to exactly the bytes it was made of; SentencePiece's `▁`
//!   is a space, and the one space its normalizer puts before the text is
//!   taken off the start of a decode, as its `Strip` decoder does.
//! * With `allow_special = false` no special (control) token id is produced
//!   from text, so user text cannot forge `<|im_start|>`: special tokens'
//!   text is encoded as plain text, and merges that would build a special
//!   token are dropped at load (real vocabularies have none).
//! * Neither `encode` nor `decode` panics on any input; `encode` fails with
//!   a [`EngineError::Tokenizer`] that says why (a regex that gives up on
//!   pathological text), never by dropping text silently, and unknown ids
//!   decode to nothing, as in Hugging Face.
//! * [`StreamDecoder`] emits only complete UTF-8; the concatenation of
//!   everything it emits plus [`StreamDecoder::finish`] equals `decode` of
//!   the same ids with the same `skip_special`.
//! * A `Tokenizer` is immutable after loading, so it is `Send + Sync`.

mod gguf;
mod json;

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::quantized::gguf_file;

use crate::error::{EngineError, Result};
use json::{GenerationConfigJson, TokenNameJson, TokenizerConfigJson, TokenizerJsonShape};

/// How a token's vocabulary text maps to the bytes it stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenText {
    /// GPT-2's byte alphabet: every byte is one printable char (`Ġ` is a
    /// space).
    ByteLevel,
    /// SentencePiece: `▁` is a space, `<0xAB>` is the byte 0xAB (byte
    /// fallback); `strip_space`: the normalizer puts a space before the text
    /// and a decode takes one off its start.
    SentencePiece { strip_space: bool },
}

/// The special ids and BOS policy the loaders find next to the vocabulary.
#[derive(Debug, Clone, Default)]
struct Specials {
    bos: Option<u32>,
    /// Ids that end generation, the eos token first.
    eos: Vec<u32>,
    pad: Option<u32>,
    /// Whether a prompt starts with BOS.
    add_bos: bool,
}

/// Control tokens that end a turn or a document in the chat formats people
/// use; a vocabulary's special token with one of these texts ends generation
/// too (llama.cpp's end-of-generation list), whatever its eos id says.
const END_OF_GENERATION_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
];

/// A tokenizer. Cheap to share (`&Tokenizer` is all the encoder and decoders
/// need).
#[derive(Clone)]
pub struct Tokenizer {
    /// Special tokens' text encodes as plain text (user content).
    plain: tokenizers::Tokenizer,
    /// Special tokens' text becomes their ids (rendered templates).
    special: tokenizers::Tokenizer,
    /// Token text by id; `None` for ids the vocabulary skips.
    id_to_token: Vec<Option<String>>,
    /// The bytes each id decodes to (added tokens: their text as is).
    id_to_bytes: Vec<Vec<u8>>,
    special_ids: HashSet<u32>,
    /// Whether each byte has a token of its own.
    byte_covered: [bool; 256],
    text: TokenText,
    specials: Specials,
    /// Put a space before the text (sentencepiece's dummy prefix, for a
    /// pipeline that does not do it itself), unless the text starts with an
    /// added token.
    prefix_space: bool,
    /// The added tokens' texts and whether each is special (where
    /// `prefix_space` is not applied).
    added_texts: Vec<(String, bool)>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The vocabulary is tens of thousands of entries; print its shape.
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("n_special", &self.special_ids.len())
            .field("text", &self.text)
            .field("specials", &self.specials)
            .finish()
    }
}

impl Tokenizer {
    /// Builds the tokenizer from GGUF metadata (`tokenizer.ggml.*`):
    /// `tokenizer.ggml.model` "gpt2" (byte-level BPE, with the pre-tokenizer
    /// `tokenizer.ggml.pre` names) or "llama" (SentencePiece).
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Tokenizer> {
        let built = gguf::build(&crate::gguf_meta::GgufMeta::new(&content.metadata))?;
        let mut tokenizer = Self::assemble("gguf metadata", built.hf, built.text, built.specials)?;
        tokenizer.prefix_space = built.prefix_space;
        Ok(tokenizer)
    }

    /// Loads a Hugging Face `tokenizer.json`. The bos/eos/pad tokens and
    /// `add_bos_token` are read from a `tokenizer_config.json` next to it,
    /// and more end-of-generation ids from a `generation_config.json`, when
    /// there are such files (as `transformers` does).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Tokenizer> {
        let path = path.as_ref();
        let json = std::fs::read_to_string(path)
            .map_err(|e| EngineError::Tokenizer(format!("{}: cannot read: {e}", path.display())))?;
        let read_beside = |name: &str| -> Result<Option<(String, String)>> {
            let beside = path.with_file_name(name);
            match std::fs::read_to_string(&beside) {
                Ok(text) => Ok(Some((text, beside.display().to_string()))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(EngineError::Tokenizer(format!(
                    "{}: cannot read: {e}",
                    beside.display()
                ))),
            }
        };
        let config = read_beside("tokenizer_config.json")?;
        let mut tokenizer = Self::from_json_parts(
            &json,
            config
                .as_ref()
                .map(|(text, name)| (text.as_str(), name.as_str())),
            &path.display().to_string(),
        )?;
        if let Some((text, name)) = read_beside("generation_config.json")? {
            let generation: GenerationConfigJson = serde_json::from_str(&text)
                .map_err(|e| EngineError::Tokenizer(format!("{name}: invalid: {e}")))?;
            for id in generation.eos_token_id.into_ids() {
                if (id as usize) < tokenizer.vocab_size() && !tokenizer.specials.eos.contains(&id) {
                    tokenizer.specials.eos.push(id);
                }
            }
        }
        Ok(tokenizer)
    }

    /// [`Tokenizer::from_file`] on text already in memory: the contents of
    /// `tokenizer.json` and, optionally, of `tokenizer_config.json`.
    pub fn from_json_str(
        tokenizer_json: &str,
        tokenizer_config_json: Option<&str>,
    ) -> Result<Tokenizer> {
        Self::from_json_parts(
            tokenizer_json,
            tokenizer_config_json.map(|text| (text, "tokenizer_config.json")),
            "tokenizer.json",
        )
    }

    /// The loader behind both; the names say where each text came from.
    fn from_json_parts(
        tokenizer_json: &str,
        config: Option<(&str, &str)>,
        json_name: &str,
    ) -> Result<Tokenizer> {
        let shape: TokenizerJsonShape = serde_json::from_str(tokenizer_json)
            .map_err(|e| EngineError::Tokenizer(format!("{json_name}: invalid: {e}")))?;
        let text = shape.token_text(json_name)?;
        let hf: tokenizers::Tokenizer = tokenizer_json
            .parse()
            .map_err(|e| EngineError::Tokenizer(format!("{json_name}: invalid: {e}")))?;

        let mut specials = Specials::default();
        let mut add_bos = None;
        if let Some((config_json, config_name)) = config {
            let config: TokenizerConfigJson = serde_json::from_str(config_json)
                .map_err(|e| EngineError::Tokenizer(format!("{config_name}: invalid: {e}")))?;
            let lookup = |name: &str, token: Option<TokenNameJson>| -> Result<Option<u32>> {
                let Some(token) = token.and_then(TokenNameJson::into_content) else {
                    return Ok(None);
                };
                hf.token_to_id(&token).map(Some).ok_or_else(|| {
                    EngineError::Tokenizer(format!(
                        "{config_name}: {name} {token:?} is not in the vocabulary"
                    ))
                })
            };
            specials.bos = lookup("bos_token", config.bos_token)?;
            specials.eos = lookup("eos_token", config.eos_token)?.into_iter().collect();
            specials.pad = lookup("pad_token", config.pad_token)?;
            add_bos = config.add_bos_token;
        }
        // Without `add_bos_token`, the file's post-processor says whether
        // the model's own pipeline starts a sequence with BOS.
        specials.add_bos = match (add_bos, specials.bos) {
            (Some(add), _) => add,
            (None, Some(bos)) => hf
                .encode_fast("", true)
                .is_ok_and(|e| e.get_ids().first() == Some(&bos)),
            (None, None) => false,
        };
        Self::assemble(json_name, hf, text, specials)
    }

    /// Builds the tables both loaders share; `source` names the file or
    /// metadata in errors.
    fn assemble(
        source: &str,
        hf: tokenizers::Tokenizer,
        text: TokenText,
        mut specials: Specials,
    ) -> Result<Tokenizer> {
        let vocab = hf.get_vocab(true);
        let Some(max_id) = vocab.values().copied().max() else {
            return Err(EngineError::Tokenizer(format!(
                "{source}: the vocabulary is empty"
            )));
        };
        let vocab_size = max_id as usize + 1;
        // Ids index a table, so a corrupt file with one huge id must not
        // make us allocate gigabytes; real vocabularies are dense.
        if vocab_size > 2 * vocab.len() + 1024 {
            return Err(EngineError::Tokenizer(format!(
                "{source}: id {max_id} is far beyond the {} tokens; ids must be dense",
                vocab.len()
            )));
        }
        let added = hf.get_added_tokens_decoder();
        let special_ids: HashSet<u32> = added
            .iter()
            .filter(|(_, token)| token.special)
            .map(|(id, _)| *id)
            .collect();
        let mut id_to_token: Vec<Option<String>> = vec![None; vocab_size];
        for (token, id) in vocab {
            id_to_token[id as usize] = Some(token);
        }
        let char_to_byte: HashMap<char, u8> = BYTE_TO_CHAR
            .iter()
            .zip(0u8..=255)
            .map(|(c, byte)| (*c, byte))
            .collect();
        let id_to_bytes: Vec<Vec<u8>> = id_to_token
            .iter()
            .enumerate()
            .map(|(id, token)| match token {
                None => Vec::new(),
                Some(token) if u32::try_from(id).is_ok_and(|id| added.contains_key(&id)) => {
                    token.as_bytes().to_vec()
                }
                Some(token) => token_bytes(token, text, &char_to_byte),
            })
            .collect();
        let mut byte_covered = [false; 256];
        for (id, bytes) in id_to_bytes.iter().enumerate() {
            let special = u32::try_from(id).is_ok_and(|id| special_ids.contains(&id));
            if let ([byte], false) = (bytes.as_slice(), special) {
                byte_covered[usize::from(*byte)] = true;
            }
        }
        // Real byte-level vocabularies miss a few byte tokens, but one
        // without the printable ASCII ones is not what it says it is and
        // would silently drop most text.
        if let Some(byte) = (0x21u8..=0x7e).find(|b| !byte_covered[usize::from(*b)]) {
            if text == TokenText::ByteLevel {
                return Err(EngineError::Tokenizer(format!(
                    "{source}: no token for byte 0x{byte:02x} ({:?}); not a byte-level bpe vocabulary",
                    char::from(byte)
                )));
            }
        }
        // More end-of-generation ids: the chat formats' control tokens.
        let mut eog: Vec<u32> = END_OF_GENERATION_TEXTS
            .iter()
            .filter_map(|text| hf.token_to_id(text))
            .filter(|id| special_ids.contains(id))
            .collect();
        eog.sort_unstable();
        for id in eog {
            if !specials.eos.contains(&id) {
                specials.eos.push(id);
            }
        }
        let mut added_texts: Vec<(String, bool)> = added
            .values()
            .filter(|t| !t.content.is_empty())
            .map(|t| (t.content.clone(), t.special))
            .collect();
        added_texts.sort();
        let mut plain = hf.clone();
        plain.set_encode_special_tokens(true);
        Ok(Tokenizer {
            plain,
            special: hf,
            id_to_token,
            id_to_bytes,
            special_ids,
            byte_covered,
            text,
            specials,
            prefix_space: false,
            added_texts,
        })
    }

    /// Encodes `text`. With `allow_special` the text of a special token
    /// (`<|im_start|>`) becomes that token's id; without, it is encoded as
    /// plain text. No BOS is added (see [`Tokenizer::encode_prompt`]).
    pub fn encode(&self, text: &str, allow_special: bool) -> Result<Vec<u32>> {
        let hf = if allow_special {
            &self.special
        } else {
            &self.plain
        };
        let prefixed;
        let text = if self.prefix_space
            && !text.is_empty()
            && !self.starts_with_added(text, allow_special)
        {
            prefixed = format!(" {text}");
            prefixed.as_str()
        } else {
            text
        };
        let encoding = hf.encode_fast(text, false).map_err(|e| {
            EngineError::Tokenizer(format!(
                "cannot tokenize the text ({} bytes): {e}",
                text.len()
            ))
        })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Whether `text` starts with an added token that `encode` would cut
    /// out whole (special ones only with `allow_special`).
    fn starts_with_added(&self, text: &str, allow_special: bool) -> bool {
        self.added_texts
            .iter()
            .any(|(added, special)| (allow_special || !special) && text.starts_with(added.as_str()))
    }

    /// Encodes a whole prompt (a rendered chat template, with special
    /// tokens, or a text completion's prompt): BOS first when the model's
    /// tokenizer asks for it (`add_bos_token`) and the text did not already
    /// begin with it, so a template that prints `{{ bos_token }}` gets one.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(text, true)?;
        if let (true, Some(bos)) = (self.specials.add_bos, self.specials.bos) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// Decodes ids to text. Invalid UTF-8 (a sequence cut mid-character)
    /// becomes U+FFFD; ids outside the vocabulary decode to nothing.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut decoder = self.decoder().with_skip_special(skip_special);
        let mut text: String = ids.iter().filter_map(|&id| decoder.push(id)).collect();
        text.extend(decoder.finish());
        text
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
            at_start: true,
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
        self.special.token_to_id(token)
    }

    /// The token's text as stored in the vocabulary (byte-level chars, e.g.
    /// `Ġthe` for " the"; SentencePiece `▁the`).
    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.id_to_token.get(id as usize).and_then(|t| t.as_deref())
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.specials.bos
    }

    /// Whether [`Tokenizer::encode_prompt`] starts a prompt with BOS.
    pub fn adds_bos(&self) -> bool {
        self.specials.add_bos && self.specials.bos.is_some()
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.specials.pad
    }

    /// The ids that end generation, no duplicates: the eos token first,
    /// then the model's other end ids (GGUF `eot`/`eom`, a
    /// `generation_config.json` list) and its special tokens that end a turn
    /// in a chat format (`<|im_end|>`, `<|eot_id|>`, …).
    pub fn eos_ids(&self) -> Vec<u32> {
        self.specials.eos.clone()
    }

    /// Whether `id` is a special (control) token.
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    /// Whether `decode(encode(text, _), false) == text` is guaranteed: every
    /// byte has a token and, for SentencePiece, no `▁` stands in the text.
    pub fn encodes_losslessly(&self, text: &str) -> bool {
        let bytes_ok = text.bytes().all(|b| self.byte_covered[usize::from(b)]);
        match self.text {
            TokenText::ByteLevel => bytes_ok,
            TokenText::SentencePiece { .. } => bytes_ok && !text.contains('▁'),
        }
    }

    /// One more than the largest id.
    pub fn vocab_size(&self) -> usize {
        self.id_to_token.len()
    }

    /// Fails when this tokenizer can produce ids the model has no embedding
    /// row for (`model_vocab` rows): a tokenizer from another model. Fewer
    /// tokens than rows is normal (Qwen pads its embedding). `tokenizer` and
    /// `model` say where each count comes from, for the error.
    pub fn check_fits(&self, model_vocab: usize, tokenizer: &str, model: &str) -> Result<()> {
        if self.vocab_size() <= model_vocab {
            return Ok(());
        }
        Err(EngineError::Tokenizer(format!(
            "{tokenizer} has ids up to {}, but the model has {model_vocab} token rows ({model}): \
             this tokenizer belongs to another model; use the one made for this model",
            self.vocab_size() - 1
        )))
    }
}

/// The bytes a vocabulary token (not an added one) stands for.
fn token_bytes(token: &str, text: TokenText, char_to_byte: &HashMap<char, u8>) -> Vec<u8> {
    match text {
        // A token with a char outside the byte alphabet is decoded as its
        // raw UTF-8, as the Hugging Face ByteLevel decoder does.
        TokenText::ByteLevel => token
            .chars()
            .map(|c| char_to_byte.get(&c).copied())
            .collect::<Option<Vec<u8>>>()
            .unwrap_or_else(|| token.as_bytes().to_vec()),
        TokenText::SentencePiece { .. } => match byte_fallback_byte(token) {
            Some(byte) => vec![byte],
            None => token.replace('▁', " ").into_bytes(),
        },
    }
}

/// `<0xAB>` → 0xAB: SentencePiece's byte-fallback tokens.
fn byte_fallback_byte(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2)
        .then(|| u8::from_str_radix(hex, 16).ok())
        .flatten()
}

/// Turns ids into text as they are generated, holding back bytes until they
/// form complete UTF-8 characters (a byte-level token can end inside one).
#[derive(Debug)]
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    /// Bytes of an unfinished character; never more than 3.
    pending: Vec<u8>,
    skip_special: bool,
    /// Nothing emitted yet (where SentencePiece's leading space comes off).
    at_start: bool,
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
        if self.at_start && !self.pending.is_empty() {
            self.at_start = false;
            let strip = matches!(
                self.tokenizer.text,
                TokenText::SentencePiece { strip_space: true }
            );
            if strip && self.pending[0] == b' ' {
                self.pending.remove(0);
            }
        }
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

#[cfg(test)]
mod tests;
