//! Which tensor of a GGUF file has a type this engine cannot multiply.
//!
//! candle's GGUF reader stops at the first tensor of a type it does not know
//! (the IQ and TQ quantizations, MXFP4, …) with "unknown dtype for tensor
//! 20", naming neither the tensor nor the type. When it fails, the loader
//! walks the header itself with [`unsupported_tensor`] to say which tensor,
//! of which type, and what to do instead. Kept here because candle exposes
//! no partial header.
//!
//! Invariants:
//! * Never panics and never allocates more than one string of at most
//!   `MAX_STRING` bytes at a time, whatever the file holds: any read past the
//!   end, or an implausible length, ends the walk with `None`.

use std::io::Read;

/// Longest metadata string or tensor name the walk reads.
const MAX_STRING: u64 = 1 << 26;

/// The GGML type ids this engine multiplies (what candle's GGUF reader
/// reads, less Q8_1 and Q8_K, which no model file stores).
const SUPPORTED_IDS: [u32; 13] = [0, 1, 30, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14];

/// Their names, for errors: "F32, F16, BF16, Q4_0, …".
pub(crate) fn supported_names() -> String {
    SUPPORTED_IDS.map(type_name).join(", ")
}

/// GGML's name of a type id (ggml.h `enum ggml_type`).
pub(crate) fn type_name(id: u32) -> &'static str {
    match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "an unknown type",
    }
}

fn supported(id: u32) -> bool {
    SUPPORTED_IDS.contains(&id)
}

/// The first tensor whose type is not one this engine multiplies: its name
/// and GGML type id. `None` when every tensor's type is supported or the
/// header cannot be walked (then candle's own error stands).
pub(crate) fn unsupported_tensor(r: &mut impl Read) -> Option<(String, u32)> {
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic).ok()?;
    if &magic != b"GGUF" {
        return None;
    }
    let version = u32_le(r)?;
    let count = |r: &mut dyn Read| -> Option<u64> {
        if version == 1 {
            u32_le(r).map(u64::from)
        } else {
            u64_le(r)
        }
    };
    let n_tensors = count(r)?;
    let n_kv = count(r)?;
    for _ in 0..n_kv {
        skip_string(r, version)?;
        let ty = u32_le(r)?;
        skip_value(r, ty, version, 0)?;
    }
    for _ in 0..n_tensors {
        let name = read_string(r, version)?;
        let n_dims = u32_le(r)?;
        if n_dims > 8 {
            return None;
        }
        for _ in 0..n_dims {
            count(r)?;
        }
        let ty = u32_le(r)?;
        u64_le(r)?; // offset
        if !supported(ty) {
            return Some((name, ty));
        }
    }
    None
}

fn u32_le(r: &mut dyn Read) -> Option<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).ok()?;
    Some(u32::from_le_bytes(b))
}

fn u64_le(r: &mut dyn Read) -> Option<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b).ok()?;
    Some(u64::from_le_bytes(b))
}

fn string_len(r: &mut dyn Read, version: u32) -> Option<u64> {
    let len = if version == 1 {
        u64::from(u32_le(r)?)
    } else {
        u64_le(r)?
    };
    (len <= MAX_STRING).then_some(len)
}

fn read_string(r: &mut dyn Read, version: u32) -> Option<String> {
    let len = string_len(r, version)?;
    let mut bytes = Vec::new();
    r.take(len).read_to_end(&mut bytes).ok()?;
    (bytes.len() as u64 == len).then(|| String::from_utf8_lossy(&bytes).into_owned())
}

fn skip(r: &mut dyn Read, n: u64) -> Option<()> {
    let copied = std::io::copy(&mut r.take(n), &mut std::io::sink()).ok()?;
    (copied == n).then_some(())
}

fn skip_string(r: &mut dyn Read, version: u32) -> Option<()> {
    let len = string_len(r, version)?;
    skip(r, len)
}

/// Skips one metadata value of GGUF value type `ty` (gguf.md: 0 u8, 1 i8,
/// 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool, 8 string, 9 array, 10 u64,
/// 11 i64, 12 f64).
fn skip_value(r: &mut dyn Read, ty: u32, version: u32, depth: u32) -> Option<()> {
    match ty {
        0 | 1 | 7 => skip(r, 1),
        2 | 3 => skip(r, 2),
        4..=6 => skip(r, 4),
        10..=12 => skip(r, 8),
        8 => skip_string(r, version),
        9 if depth < 4 => {
            let elem = u32_le(r)?;
            let n = if version == 1 {
                u64::from(u32_le(r)?)
            } else {
                u64_le(r)?
            };
            let fixed = match elem {
                0 | 1 | 7 => Some(1),
                2 | 3 => Some(2),
                4..=6 => Some(4),
                10..=12 => Some(8),
                _ => None,
            };
            match fixed {
                Some(size) => skip(r, n.checked_mul(size)?),
                None => {
                    for _ in 0..n {
                        skip_value(r, elem, version, depth + 1)?;
                    }
                    Some(())
                }
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 header: metadata (a string, a string array, a u32 array),
    /// then tensors of the given type ids.
    fn header(types: &[(&str, u32)]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((types.len() as u64).to_le_bytes());
        b.extend(3u64.to_le_bytes());
        let s = |b: &mut Vec<u8>, text: &str| {
            b.extend((text.len() as u64).to_le_bytes());
            b.extend(text.as_bytes());
        };
        s(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        s(&mut b, "llama");
        s(&mut b, "tokenizer.ggml.tokens");
        b.extend(9u32.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        s(&mut b, "a");
        s(&mut b, "bc");
        s(&mut b, "tokenizer.ggml.token_type");
        b.extend(9u32.to_le_bytes());
        b.extend(4u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend([1, 0, 0, 0, 3, 0, 0, 0]);
        for (name, ty) in types {
            s(&mut b, name);
            b.extend(2u32.to_le_bytes());
            b.extend(256u64.to_le_bytes());
            b.extend(4u64.to_le_bytes());
            b.extend(ty.to_le_bytes());
            b.extend(0u64.to_le_bytes());
        }
        b
    }

    #[test]
    fn names_the_first_tensor_of_an_unsupported_type() {
        let h = header(&[("a.weight", 12), ("b.weight", 20), ("c.weight", 23)]);
        assert_eq!(
            unsupported_tensor(&mut h.as_slice()),
            Some(("b.weight".to_string(), 20))
        );
        assert_eq!(type_name(20), "IQ4_NL");
    }

    #[test]
    fn every_supported_type_passes() {
        let all: Vec<(&str, u32)> = SUPPORTED_IDS.iter().map(|t| ("t", *t)).collect();
        assert_eq!(unsupported_tensor(&mut header(&all).as_slice()), None);
        assert_eq!(
            supported_names(),
            "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K"
        );
        // Exactly the types candle's reader knows, less Q8_1/Q8_K.
        for id in 0..64 {
            let candle_reads = matches!(id, 0..=3 | 6..=15 | 30);
            assert_eq!(supported(id), candle_reads && !matches!(id, 9 | 15), "{id}");
        }
    }

    #[test]
    fn truncated_or_garbage_headers_end_the_walk_without_panicking() {
        let h = header(&[("a.weight", 20)]);
        for cut in 0..h.len() {
            assert_eq!(unsupported_tensor(&mut &h[..cut]), None, "cut at {cut}");
        }
        let mut huge = h.clone();
        // The first string's length: 2^63.
        huge[24..32].copy_from_slice(&(1u64 << 63).to_le_bytes());
        assert_eq!(unsupported_tensor(&mut huge.as_slice()), None);
    }
}
