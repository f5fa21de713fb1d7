//! Capture of runner output: each line goes to the runner's log file, to a
//! bounded ring kept for diagnostics, and to a callback (which re-emits it
//! with runner context).
//!
//! Invariants:
//! - Bounded: a [`LogRing`] never holds more than its capacity, and a line is
//!   never longer than [`MAX_LINE_BYTES`]; a longer one is split, never
//!   buffered whole. A split never cuts a UTF-8 character in two.
//! - Nothing lost silently: [`pump_lines`] reads until EOF, whatever happens
//!   to the log file; a file error is reported once and the ring and the
//!   callback still get every line.
//! - Every line reaches the file with a single `write` on a file opened with
//!   `O_APPEND`, so the stdout and stderr pumps of one runner can share a file
//!   without interleaving inside a line.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// Lines longer than this many bytes are split into several lines.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// The last lines of a runner's output, for diagnostics.
#[derive(Debug)]
pub struct LogRing {
    lines: Mutex<VecDeque<String>>,
    capacity: usize,
}

impl LogRing {
    pub fn new(capacity: usize) -> Arc<LogRing> {
        Arc::new(LogRing {
            lines: Mutex::new(VecDeque::new()),
            capacity,
        })
    }

    /// Appends `line`, dropping the oldest line when full.
    pub fn push(&self, line: String) {
        if self.capacity == 0 {
            return;
        }
        let mut lines = self.locked();
        if lines.len() == self.capacity {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    /// The last `n` lines (fewer if fewer were kept), oldest first.
    pub fn last(&self, n: usize) -> Vec<String> {
        let lines = self.locked();
        let skip = lines.len().saturating_sub(n);
        lines.iter().skip(skip).cloned().collect()
    }

    fn locked(&self) -> MutexGuard<'_, VecDeque<String>> {
        // A panic while holding the lock cannot leave the deque half-updated
        // in a way that matters for diagnostics, so poisoning is ignored.
        self.lines
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Which pipe a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Reads `reader` line by line until EOF: appends each line (raw, without a
/// prefix) to `file` (opened for append, created if missing), pushes it into
/// `ring`, and calls `on_line(stream, &line)`. Lines longer than 64 KiB are
/// split; invalid UTF-8 is replaced lossily. Returns when the pipe closes,
/// i.e. when the runner (and everything that inherited the pipe) exited.
/// Errors writing the file are reported once via `tracing::debug` and do not
/// stop the pump.
///
/// The file is written with plain `std::fs` calls from the async task: a line
/// written to the page cache costs microseconds, less than a hop to the
/// blocking pool would.
pub async fn pump_lines<R: AsyncRead + Unpin>(
    reader: R,
    stream: Stream,
    file: PathBuf,
    ring: Arc<LogRing>,
    mut on_line: impl FnMut(Stream, &str) + Send,
) {
    let mut reader = BufReader::new(reader);
    let mut sink = LogFile::open(file);
    let mut emit = |bytes: &[u8]| {
        let mut record = String::from_utf8_lossy(bytes).into_owned();
        record.push('\n');
        sink.append(record.as_bytes());
        record.pop();
        on_line(stream, &record);
        ring.push(record);
    };
    // The current line; never longer than MAX_LINE_BYTES.
    let mut line: Vec<u8> = Vec::new();
    loop {
        let chunk = match reader.fill_buf().await {
            Ok([]) => break,
            Ok(chunk) => chunk,
            Err(error) => {
                // A pipe read only fails if something is badly wrong; the
                // runner's exit is still observed by its owner.
                tracing::debug!(?stream, %error, "cannot read runner output");
                break;
            }
        };
        let room = MAX_LINE_BYTES - line.len();
        let window = &chunk[..chunk.len().min(room)];
        if let Some(newline) = window.iter().position(|&byte| byte == b'\n') {
            line.extend_from_slice(&window[..newline]);
            reader.consume(newline + 1);
            emit(&line);
            line.clear();
        } else {
            line.extend_from_slice(window);
            let taken = window.len();
            reader.consume(taken);
            if line.len() == MAX_LINE_BYTES {
                // Keep a character cut by the split for the next piece.
                let carry = line.split_off(line.len() - incomplete_utf8_tail(&line));
                emit(&line);
                line = carry;
            }
        }
    }
    // The last line of a runner that did not end it with a newline.
    if !line.is_empty() {
        emit(&line);
    }
}

/// How many bytes at the end of `bytes` start a UTF-8 character whose
/// remaining bytes are missing (0 to 3).
fn incomplete_utf8_tail(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let byte = bytes[bytes.len() - back];
        if byte & 0xC0 == 0x80 {
            // A continuation byte: the lead byte is further back.
            continue;
        }
        let needed = match byte {
            0xF0.. => 4,
            0xE0.. => 3,
            0xC0.. => 2,
            _ => 1,
        };
        return if needed > back { back } else { 0 };
    }
    0
}

/// The log file of one pump; after the first error it keeps trying but stays
/// quiet, so a full disk does not flood the logs.
struct LogFile {
    path: PathBuf,
    file: Option<File>,
    reported: bool,
}

impl LogFile {
    fn open(path: PathBuf) -> LogFile {
        let mut log = LogFile {
            file: None,
            path,
            reported: false,
        };
        match OpenOptions::new().append(true).create(true).open(&log.path) {
            Ok(file) => log.file = Some(file),
            Err(error) => log.report(&error),
        }
        log
    }

    fn append(&mut self, record: &[u8]) {
        let Some(file) = &mut self.file else { return };
        if let Err(error) = file.write_all(record) {
            self.report(&error);
        }
    }

    fn report(&mut self, error: &std::io::Error) {
        if !self.reported {
            self.reported = true;
            tracing::debug!(path = %self.path.display(), %error, "cannot write runner log file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_only_the_last_lines() {
        let ring = LogRing::new(3);
        for i in 1..=5 {
            ring.push(format!("line {i}"));
        }
        assert_eq!(ring.last(10), ["line 3", "line 4", "line 5"]);
        assert_eq!(ring.last(2), ["line 4", "line 5"]);
        assert!(ring.last(0).is_empty());
    }

    #[test]
    fn ring_of_capacity_zero_keeps_nothing() {
        let ring = LogRing::new(0);
        ring.push("x".to_owned());
        assert!(ring.last(1).is_empty());
    }

    /// Pumps `input` with `/dev/null` as the file and returns the lines.
    async fn pump(input: &[u8]) -> Vec<String> {
        let ring = LogRing::new(100);
        let mut seen = Vec::new();
        pump_lines(
            input,
            Stream::Stderr,
            PathBuf::from("/dev/null"),
            ring.clone(),
            |stream, line| {
                assert_eq!(stream, Stream::Stderr);
                seen.push(line.to_owned());
            },
        )
        .await;
        assert_eq!(ring.last(100), seen);
        seen
    }

    #[tokio::test]
    async fn lines_are_split_on_newlines_and_the_last_one_is_kept() {
        assert_eq!(pump(b"a\n\nb\nlast").await, ["a", "", "b", "last"]);
        assert!(pump(b"").await.is_empty());
    }

    #[tokio::test]
    async fn long_lines_are_split_without_cutting_characters() {
        // 'é' is two bytes; an odd prefix puts one across the 64 KiB mark.
        let mut input = vec![b'x'; MAX_LINE_BYTES - 1];
        input.extend_from_slice("é".repeat(3).as_bytes());
        input.push(b'\n');
        let lines = pump(&input).await;
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0], "x".repeat(MAX_LINE_BYTES - 1));
        assert_eq!(lines[1], "ééé");
    }

    #[tokio::test]
    async fn invalid_utf8_is_replaced() {
        assert_eq!(
            pump(b"ok \xff\xfe end\n").await,
            ["ok \u{fffd}\u{fffd} end"]
        );
    }

    #[test]
    fn incomplete_tail_is_measured() {
        assert_eq!(incomplete_utf8_tail(b"abc"), 0);
        assert_eq!(incomplete_utf8_tail("é".as_bytes()), 0);
        assert_eq!(incomplete_utf8_tail(&"é".as_bytes()[..1]), 1);
        assert_eq!(incomplete_utf8_tail(&"€".as_bytes()[..2]), 2);
        assert_eq!(incomplete_utf8_tail(&"😀".as_bytes()[..3]), 3);
        assert_eq!(incomplete_utf8_tail("😀".as_bytes()), 0);
    }
}
