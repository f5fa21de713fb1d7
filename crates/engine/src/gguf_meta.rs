//! Typed reads of GGUF metadata (`gguf_file::Content::metadata`), so callers
//! state what they expect of a key and get an error naming that key.
//!
//! Invariants:
//! * No function here panics on any metadata: a missing key is `Ok(None)`
//!   from the `opt_*` readers and an error from the required ones; a value
//!   of the wrong type is always an error naming the key, the expected type
//!   and the type found.
//! * Integers are accepted in any GGUF integer type as long as the value fits
//!   the requested type: writers disagree on whether ids are `u32`, `i32` or
//!   `u64` (llama.cpp writes `u32`, some converters `i32` or `u64`).
//! * The error is a plain [`MetadataError`], not an `EngineError`, because the
//!   same key can be a tokenizer problem for one caller and a model problem
//!   for another; each caller wraps it in the variant that fits.

use std::collections::HashMap;
use std::fmt;

use candle_core::quantized::gguf_file::Value;

/// A metadata key is missing or does not hold what the caller expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataError {
    /// The GGUF metadata key, e.g. `tokenizer.ggml.tokens`.
    pub key: String,
    /// What is wrong with it, lower-case.
    pub detail: String,
}

impl fmt::Display for MetadataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gguf metadata key {}: {}", self.key, self.detail)
    }
}

impl std::error::Error for MetadataError {}

/// A borrowed view of a GGUF file's metadata with typed accessors.
#[derive(Debug, Clone, Copy)]
pub struct GgufMeta<'a> {
    metadata: &'a HashMap<String, Value>,
}

impl<'a> GgufMeta<'a> {
    pub fn new(metadata: &'a HashMap<String, Value>) -> Self {
        Self { metadata }
    }

    /// The raw value, if the key exists.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.metadata.get(key)
    }

    fn required(&self, key: &str) -> Result<&'a Value, MetadataError> {
        self.get(key).ok_or_else(|| MetadataError {
            key: key.to_string(),
            detail: "missing".to_string(),
        })
    }

    /// A string value; `Ok(None)` when the key is absent.
    pub fn opt_str(&self, key: &str) -> Result<Option<&'a str>, MetadataError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(other) => Err(wrong_type(key, "a string", other)),
        }
    }

    /// A string value that must be present.
    pub fn str(&self, key: &str) -> Result<&'a str, MetadataError> {
        match self.required(key)? {
            Value::String(s) => Ok(s.as_str()),
            other => Err(wrong_type(key, "a string", other)),
        }
    }

    /// A non-negative integer that fits in `u32`; `Ok(None)` when absent.
    pub fn opt_u32(&self, key: &str) -> Result<Option<u32>, MetadataError> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        integer_u32(value)
            .map(Some)
            .ok_or_else(|| wrong_type(key, "an integer in u32 range", value))
    }

    /// A boolean; `Ok(None)` when absent.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, MetadataError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(wrong_type(key, "a bool", other)),
        }
    }

    /// An array of strings that must be present.
    pub fn str_array(&self, key: &str) -> Result<Vec<&'a str>, MetadataError> {
        let items = self.array(key)?;
        items
            .iter()
            .enumerate()
            .map(|(idx, item)| match item {
                Value::String(s) => Ok(s.as_str()),
                other => Err(MetadataError {
                    key: key.to_string(),
                    detail: format!(
                        "element {idx}: expected a string, found {}",
                        type_name(other)
                    ),
                }),
            })
            .collect()
    }

    /// An array of integers (each in `i32` range, which is what token types
    /// are); `Ok(None)` when absent.
    pub fn opt_i32_array(&self, key: &str) -> Result<Option<Vec<i32>>, MetadataError> {
        self.opt_array_of(key, "an integer in i32 range", |item| {
            integer_i64(item).and_then(|v| i32::try_from(v).ok())
        })
    }

    /// An array of floats (SentencePiece scores); `Ok(None)` when absent.
    pub fn opt_f32_array(&self, key: &str) -> Result<Option<Vec<f32>>, MetadataError> {
        self.opt_array_of(key, "a float", |item| match item {
            Value::F32(v) => Some(*v),
            Value::F64(v) => Some(*v as f32),
            _ => None,
        })
    }

    /// An array whose every element `convert` accepts (`expected` says what
    /// it wants, for the error); `Ok(None)` when absent.
    fn opt_array_of<T>(
        &self,
        key: &str,
        expected: &str,
        convert: impl Fn(&Value) -> Option<T>,
    ) -> Result<Option<Vec<T>>, MetadataError> {
        if self.get(key).is_none() {
            return Ok(None);
        }
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(idx, item)| {
                convert(item).ok_or_else(|| MetadataError {
                    key: key.to_string(),
                    detail: format!(
                        "element {idx}: expected {expected}, found {}",
                        type_name(item)
                    ),
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    fn array(&self, key: &str) -> Result<&'a [Value], MetadataError> {
        match self.required(key)? {
            Value::Array(items) => Ok(items.as_slice()),
            other => Err(wrong_type(key, "an array", other)),
        }
    }
}

fn wrong_type(key: &str, expected: &str, found: &Value) -> MetadataError {
    MetadataError {
        key: key.to_string(),
        detail: format!("expected {expected}, found {}", type_name(found)),
    }
}

fn type_name(value: &Value) -> String {
    match value {
        Value::U8(v) => format!("u8 {v}"),
        Value::I8(v) => format!("i8 {v}"),
        Value::U16(v) => format!("u16 {v}"),
        Value::I16(v) => format!("i16 {v}"),
        Value::U32(v) => format!("u32 {v}"),
        Value::I32(v) => format!("i32 {v}"),
        Value::U64(v) => format!("u64 {v}"),
        Value::I64(v) => format!("i64 {v}"),
        Value::F32(v) => format!("f32 {v}"),
        Value::F64(v) => format!("f64 {v}"),
        Value::Bool(v) => format!("bool {v}"),
        Value::String(_) => "a string".to_string(),
        Value::Array(items) => format!("an array of {} values", items.len()),
    }
}

/// Any GGUF integer as `i64`, or `None` for non-integers and `u64` values
/// beyond `i64` (no token id or type is that large).
fn integer_i64(value: &Value) -> Option<i64> {
    match value {
        Value::U8(v) => Some(i64::from(*v)),
        Value::I8(v) => Some(i64::from(*v)),
        Value::U16(v) => Some(i64::from(*v)),
        Value::I16(v) => Some(i64::from(*v)),
        Value::U32(v) => Some(i64::from(*v)),
        Value::I32(v) => Some(i64::from(*v)),
        Value::U64(v) => i64::try_from(*v).ok(),
        Value::I64(v) => Some(*v),
        _ => None,
    }
}

fn integer_u32(value: &Value) -> Option<u32> {
    integer_i64(value).and_then(|v| u32::try_from(v).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta_of(pairs: Vec<(&str, Value)>) -> HashMap<String, Value> {
        pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }

    #[test]
    fn integers_of_any_width_are_accepted_when_they_fit() {
        let map = meta_of(vec![
            ("a", Value::I32(7)),
            ("b", Value::U64(9)),
            ("c", Value::I32(-1)),
        ]);
        let meta = GgufMeta::new(&map);
        assert_eq!(meta.opt_u32("a").unwrap(), Some(7));
        assert_eq!(meta.opt_u32("b").unwrap(), Some(9));
        assert_eq!(meta.opt_u32("missing").unwrap(), None);
        let err = meta.opt_u32("c").unwrap_err();
        assert_eq!(err.key, "c");
        assert!(err.to_string().contains("i32 -1"), "{err}");
    }

    #[test]
    fn wrong_types_name_the_key_and_element() {
        let map = meta_of(vec![
            ("s", Value::U32(1)),
            (
                "arr",
                Value::Array(vec![Value::String("x".into()), Value::U8(1)]),
            ),
        ]);
        let meta = GgufMeta::new(&map);
        let err = meta.str("s").unwrap_err();
        assert_eq!(
            err.to_string(),
            "gguf metadata key s: expected a string, found u32 1"
        );
        let err = meta.str_array("arr").unwrap_err();
        assert!(err.to_string().contains("element 1"), "{err}");
        let err = meta.str("nope").unwrap_err();
        assert_eq!(err.to_string(), "gguf metadata key nope: missing");
    }
}
