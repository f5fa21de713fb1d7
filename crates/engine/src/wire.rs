//! Activations between processes: a tensor as raw little-endian bytes after
//! a small header, not through serde.
//!
//! Layout: `rank: u32 LE`, then `rank` dims (`u32 LE` each), then the
//! `product(dims)` elements as `f32 LE`, and nothing after them.
//!
//! Invariants: `tensor_from_bytes` accepts exactly what `tensor_to_bytes`
//! produces; any other input (truncated, trailing bytes, absurd rank, dims
//! whose product overflows or disagrees with the length) is an error, never
//! a panic and never an allocation sized by untrusted header fields.

use candle_core::{DType, Device, Tensor};

use crate::error::{EngineError, Result};

/// Activations are at most `[seq, hidden]`; a generous cap keeps a garbage
/// rank from making the header parser read far.
pub const MAX_RANK: usize = 8;

fn wire_err(detail: impl Into<String>) -> EngineError {
    EngineError::Compute(format!("wire tensor: {}", detail.into()))
}

/// Encodes an f32 tensor.
pub fn tensor_to_bytes(t: &Tensor) -> Result<Vec<u8>> {
    if t.dtype() != DType::F32 {
        return Err(wire_err(format!("expected f32, got {:?}", t.dtype())));
    }
    let dims = t.dims();
    if dims.len() > MAX_RANK {
        return Err(wire_err(format!("rank {} exceeds {MAX_RANK}", dims.len())));
    }
    let data = t.flatten_all()?.to_vec1::<f32>()?;
    let mut out = Vec::with_capacity(4 + 4 * dims.len() + 4 * data.len());
    out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
    for &d in dims {
        let d = u32::try_from(d).map_err(|_| wire_err(format!("dim {d} does not fit u32")))?;
        out.extend_from_slice(&d.to_le_bytes());
    }
    for x in data {
        out.extend_from_slice(&x.to_le_bytes());
    }
    Ok(out)
}

/// Decodes what `tensor_to_bytes` produced.
pub fn tensor_from_bytes(bytes: &[u8]) -> Result<Tensor> {
    let mut rest = bytes;
    let mut take_u32 = |what: &str| -> Result<u32> {
        match rest {
            [a, b, c, d, tail @ ..] => {
                rest = tail;
                Ok(u32::from_le_bytes([*a, *b, *c, *d]))
            }
            _ => Err(wire_err(format!("truncated {what}"))),
        }
    };
    let rank = take_u32("rank")? as usize;
    if rank > MAX_RANK {
        return Err(wire_err(format!("rank {rank} exceeds {MAX_RANK}")));
    }
    let mut dims = Vec::with_capacity(rank);
    for _ in 0..rank {
        dims.push(take_u32("dims")? as usize);
    }
    let elems = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| wire_err(format!("dims {dims:?} overflow")))?;
    let data_len = elems
        .checked_mul(4)
        .ok_or_else(|| wire_err(format!("dims {dims:?} overflow")))?;
    if rest.len() != data_len {
        return Err(wire_err(format!(
            "dims {dims:?} need {data_len} data bytes, got {}",
            rest.len()
        )));
    }
    let data: Vec<f32> = rest
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(Tensor::from_vec(data, dims, &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_shape_and_bits() {
        let t = Tensor::new(
            &[[1.5f32, -0.0, f32::INFINITY], [3.0, 4.0, 5.0]],
            &Device::Cpu,
        )
        .expect("tensor");
        let bytes = tensor_to_bytes(&t).expect("encode");
        assert_eq!(bytes.len(), 4 + 8 + 24);
        let back = tensor_from_bytes(&bytes).expect("decode");
        assert_eq!(back.dims(), &[2, 3]);
        assert_eq!(
            back.to_vec2::<f32>().expect("rows"),
            t.to_vec2::<f32>().expect("rows")
        );
    }

    #[test]
    fn scalar_and_empty_tensors_round_trip() {
        let scalar = Tensor::new(2.5f32, &Device::Cpu).expect("scalar");
        let back = tensor_from_bytes(&tensor_to_bytes(&scalar).expect("encode")).expect("decode");
        assert_eq!(back.to_scalar::<f32>().expect("value"), 2.5);
        let empty = Tensor::zeros((0, 4), DType::F32, &Device::Cpu).expect("empty");
        let back = tensor_from_bytes(&tensor_to_bytes(&empty).expect("encode")).expect("decode");
        assert_eq!(back.dims(), &[0, 4]);
    }

    #[test]
    fn non_f32_and_garbage_are_errors() {
        let t = Tensor::new(&[1u32, 2], &Device::Cpu).expect("tensor");
        assert!(tensor_to_bytes(&t).is_err());
        assert!(tensor_from_bytes(&[]).is_err());
        assert!(tensor_from_bytes(&[9, 0, 0, 0]).is_err());
        // rank 2, dims 2^31 x 2^31: the product overflows on 32-bit and the
        // length check catches it on 64-bit; neither allocates.
        let mut huge = vec![2, 0, 0, 0];
        huge.extend_from_slice(&(1u32 << 31).to_le_bytes());
        huge.extend_from_slice(&(1u32 << 31).to_le_bytes());
        assert!(tensor_from_bytes(&huge).is_err());
    }
}
