//! Persistent node identity: a stable node id plus a restart counter.
//!
//! Invariants:
//! * `dir/node-id` holds the node id (`n-` followed by 8 lowercase hex digits). It is created
//!   once, on the first start, and never changed afterwards.
//! * `dir/incarnation` holds a decimal `u64`. Every call to [`NodeIdentity::load_or_create`]
//!   increments it by one, so every process start gets an incarnation strictly greater than
//!   the previous one. Peers use this to tell a restarted node from a stale one.
//! * Both files are written to a temporary file, synced, then renamed over the old file (and the
//!   directory is synced), so a crash leaves either the old or the new content, never a torn file.
//!
//! One identity directory belongs to one node daemon; two processes sharing a directory would
//! race on the incarnation counter (not guarded here).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const ID_FILE: &str = "node-id";
const INCARNATION_FILE: &str = "incarnation";

/// Who this node is: `id` is stable across restarts, `incarnation` grows on every start.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeIdentity {
    /// Stable node id, e.g. `n-1a2b3c4d`.
    pub id: String,
    /// Start counter, strictly increasing across starts of the same node (first start = 1).
    pub incarnation: u64,
}

impl NodeIdentity {
    /// Loads the identity stored in `dir` (creating `dir` and a fresh id if needed) and bumps the
    /// persisted incarnation.
    ///
    /// A corrupt `node-id` or `incarnation` file yields an [`io::ErrorKind::InvalidData`] error that
    /// names the file and says how to recover (delete it).
    pub fn load_or_create(dir: &Path) -> io::Result<NodeIdentity> {
        fs::create_dir_all(dir)?;

        let id_path = dir.join(ID_FILE);
        let id = match read_optional(&id_path)? {
            Some(text) => {
                let id = text.trim();
                if !is_generated_id(id) {
                    return Err(corrupt(
                        &id_path,
                        &format!("expected `n-` followed by 8 hex digits, found {id:?}"),
                        "delete it to give this node a new id",
                    ));
                }
                id.to_owned()
            }
            None => {
                let id = format!("n-{:08x}", fastrand::u32(..));
                write_atomic(dir, ID_FILE, format!("{id}\n").as_bytes())?;
                id
            }
        };

        let inc_path = dir.join(INCARNATION_FILE);
        let previous = match read_optional(&inc_path)? {
            Some(text) => text.trim().parse::<u64>().map_err(|e| {
                corrupt(
                    &inc_path,
                    &format!("expected a decimal number, found {:?} ({e})", text.trim()),
                    "delete it to restart the incarnation count",
                )
            })?,
            None => 0,
        };
        let incarnation = previous.checked_add(1).ok_or_else(|| {
            corrupt(
                &inc_path,
                "the incarnation counter is at u64::MAX",
                "delete it to restart the incarnation count",
            )
        })?;
        write_atomic(dir, INCARNATION_FILE, format!("{incarnation}\n").as_bytes())?;

        Ok(NodeIdentity { id, incarnation })
    }
}

/// `n-` + exactly 8 lowercase hex digits.
fn is_generated_id(id: &str) -> bool {
    id.strip_prefix("n-").is_some_and(|hex| {
        hex.len() == 8
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn read_optional(path: &Path) -> io::Result<Option<String>> {
    match fs::read(path) {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(text) => Ok(Some(text)),
            Err(_) => Err(corrupt(
                path,
                "the file is not valid UTF-8",
                "delete it and restart the node",
            )),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("cannot read {}: {e}", path.display()),
        )),
    }
}

fn corrupt(path: &Path, what: &str, fix: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "corrupt node identity file {}: {what}; {fix}",
            path.display()
        ),
    )
}

/// Writes `dir/name` atomically: temp file in the same directory, fsync, rename, fsync(dir).
fn write_atomic(dir: &Path, name: &str, contents: &[u8]) -> io::Result<()> {
    let tmp: PathBuf = dir.join(format!(
        ".{name}.tmp.{}.{:08x}",
        std::process::id(),
        fastrand::u32(..)
    ));
    let result = (|| {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, dir.join(name))?;
        // Make the rename itself durable.
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot write {}: {e}", dir.join(name).display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_id_format() {
        assert!(is_generated_id("n-0123abcd"));
        assert!(!is_generated_id("n-0123ABCD"));
        assert!(!is_generated_id("n-0123abc"));
        assert!(!is_generated_id("x-0123abcd"));
    }
}
