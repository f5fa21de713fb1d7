//! [`Blob`]: bytes that travel as one byte string.
//!
//! serde sees a `Vec<u8>` as a sequence and postcard then encodes and decodes
//! it one element at a time; a 1 MiB payload costs milliseconds that way.
//! `Blob` serializes through `serialize_bytes`, which postcard writes as a
//! length and the raw bytes (a copy), with the same bytes on the wire.

use serde::de::{Error, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Blob(pub Vec<u8>);

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

struct BlobVisitor;

impl<'de> Visitor<'de> for BlobVisitor {
    type Value = Blob;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Blob, E> {
        Ok(Blob(v.to_vec()))
    }

    fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Blob, E> {
        Ok(Blob(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Blob, A::Error> {
        let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
        while let Some(b) = seq.next_element()? {
            bytes.push(b);
        }
        Ok(Blob(bytes))
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Blob, D::Error> {
        deserializer.deserialize_byte_buf(BlobVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_bytes_on_the_wire_as_a_vec() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let as_vec = postcard::to_stdvec(&data).unwrap();
        let as_blob = postcard::to_stdvec(&Blob(data.clone())).unwrap();
        assert_eq!(as_vec, as_blob);
        let back: Blob = postcard::from_bytes(&as_vec).unwrap();
        assert_eq!(back.0, data);
    }
}
