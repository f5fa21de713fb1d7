//! Wire framing: a little-endian `u32` length, then a postcard-encoded frame.
//!
//! Invariants: a length above the channel's `max_frame` is rejected before any
//! allocation; [`decode`] never panics, whatever the bytes — random, truncated
//! or hostile input gives a [`FrameError`] that says what was wrong.

use serde::{Deserialize, Serialize};

/// Default cap on one frame's encoded size.
pub const DEFAULT_MAX_FRAME: usize = 8 * 1024 * 1024;

/// Length prefix size in bytes.
pub const HEADER_LEN: usize = 4;

/// How a runner should treat in-flight tasks when asked to shut down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShutdownMode {
    /// Finish in-flight tasks, then end.
    Drain,
    /// Cancel in-flight tasks, then end.
    Cancel,
}

/// Messages of the control lane: written before any queued data, and read by
/// the receiver before any buffered data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    Ping {
        seq: u64,
    },
    Pong {
        seq: u64,
    },
    Cancel {
        task_id: String,
    },
    Shutdown {
        mode: ShutdownMode,
        deadline_ms: u64,
    },
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub enum Frame<T> {
    Data(T),
    End {
        reason: String,
    },
    Control(Control),
    /// The receiver has room for this many more data frames.
    Credit(u32),
}

/// The same layout as [`Frame`], borrowed, for encoding without a copy.
/// Variant order must match `Frame`: postcard encodes the variant index.
#[derive(Serialize)]
pub(crate) enum FrameRef<'a, T> {
    Data(&'a T),
    End { reason: &'a str },
    Control(&'a Control),
    Credit(u32),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes (raise max_frame on both ends if this is legitimate)")]
    TooLarge { len: usize, max: usize },
    #[error("malformed frame of {len} bytes: {detail}")]
    Malformed { len: usize, detail: String },
    #[error("could not encode frame: {0}")]
    Encode(String),
}

/// Encodes one frame with its length prefix.
pub(crate) fn encode<T: Serialize>(
    frame: &FrameRef<'_, T>,
    max: usize,
) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; HEADER_LEN];
    let mut buf = postcard::to_extend(frame, std::mem::take(&mut buf))
        .map_err(|e| FrameError::Encode(e.to_string()))?;
    let len = buf.len() - HEADER_LEN;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    // `len <= max`, and `max` fits u32 for any sane configuration; check anyway.
    let len32 = u32::try_from(len).map_err(|_| FrameError::TooLarge { len, max })?;
    buf[..HEADER_LEN].copy_from_slice(&len32.to_le_bytes());
    Ok(buf)
}

/// Encodes a frame given by value; used by tests and raw peers.
pub fn encode_data<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    encode(&FrameRef::Data(msg), max)
}

/// Encodes an `End` frame; used by tests and raw peers.
pub fn encode_end(reason: &str) -> Vec<u8> {
    // An End frame is a few bytes: it cannot exceed any configured limit.
    let frame: FrameRef<'_, ()> = FrameRef::End { reason };
    encode(&frame, usize::MAX).unwrap_or_default()
}

/// Tries to decode one frame from the front of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed, `Ok(Some((frame, used)))`
/// when a whole frame was decoded from the first `used` bytes.
pub fn decode<T: for<'de> Deserialize<'de>>(
    buf: &[u8],
    max: usize,
) -> Result<Option<(Frame<T>, usize)>, FrameError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let mut len_bytes = [0u8; HEADER_LEN];
    len_bytes.copy_from_slice(header);
    let len = u32::from_le_bytes(len_bytes) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let Some(body) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Ok(None);
    };
    match postcard::take_from_bytes::<Frame<T>>(body) {
        Ok((frame, [])) => Ok(Some((frame, HEADER_LEN + len))),
        Ok((_, rest)) => Err(FrameError::Malformed {
            len,
            detail: format!("{} trailing bytes after the frame", rest.len()),
        }),
        Err(e) => Err(FrameError::Malformed {
            len,
            detail: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_kind() {
        let max = DEFAULT_MAX_FRAME;
        let cases: Vec<Vec<u8>> = vec![
            encode(&FrameRef::Data(&"hello".to_string()), max).unwrap(),
            encode(&FrameRef::<String>::Control(&Control::Pong { seq: 1 }), max).unwrap(),
            encode_end("bye"),
            encode(&FrameRef::<String>::Control(&Control::Ping { seq: 7 }), max).unwrap(),
            encode(&FrameRef::<String>::Credit(64), max).unwrap(),
        ];
        let expected = [
            Frame::Data("hello".to_string()),
            Frame::Control(Control::Pong { seq: 1 }),
            Frame::End {
                reason: "bye".into(),
            },
            Frame::Control(Control::Ping { seq: 7 }),
            Frame::Credit(64),
        ];
        let all: Vec<u8> = cases.concat();
        let mut at = 0;
        for want in expected {
            let (got, used) = decode::<String>(&all[at..], max).unwrap().unwrap();
            assert_eq!(got, want);
            at += used;
        }
        assert_eq!(at, all.len());
    }

    #[test]
    fn truncated_frames_need_more_bytes() {
        let bytes = encode_data(&vec![1u32, 2, 3], DEFAULT_MAX_FRAME).unwrap();
        for cut in 0..bytes.len() {
            assert_eq!(
                decode::<Vec<u32>>(&bytes[..cut], DEFAULT_MAX_FRAME),
                Ok(None)
            );
        }
    }

    #[test]
    fn oversize_is_rejected_on_both_sides() {
        let big = vec![0u8; 100];
        assert!(matches!(
            encode_data(&big, 50),
            Err(FrameError::TooLarge { max: 50, .. })
        ));
        let bytes = encode_data(&big, 1000).unwrap();
        let err = decode::<Vec<u8>>(&bytes, 50).unwrap_err();
        assert!(
            err.to_string().contains("exceeds the limit of 50 bytes"),
            "{err}"
        );
    }

    #[test]
    fn garbage_is_an_error() {
        // Length 3, variant index 200: no such variant.
        let bytes = [3, 0, 0, 0, 200, 1, 2];
        let err = decode::<String>(&bytes, DEFAULT_MAX_FRAME).unwrap_err();
        assert!(matches!(err, FrameError::Malformed { len: 3, .. }), "{err}");
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = decode::<(String, Vec<u64>, Option<Control>)>(&bytes, 1024);
        }

        #[test]
        fn decode_truncation_of_valid_frames(s in ".{0,40}", n in 0u64..u64::MAX, cut in 0usize..64) {
            let bytes = encode_data(&(s.clone(), n), 1024).unwrap();
            let cut = cut.min(bytes.len());
            match decode::<(String, u64)>(&bytes[..cut], 1024) {
                Ok(None) => proptest::prop_assert!(cut < bytes.len()),
                Ok(Some((Frame::Data(v), used))) => {
                    proptest::prop_assert_eq!(used, bytes.len());
                    proptest::prop_assert_eq!(v, (s, n));
                }
                other => proptest::prop_assert!(false, "unexpected {:?}", other),
            }
        }
    }
}
