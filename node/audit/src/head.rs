//! The sealed chain head: the record count and last hash of the log, under an HMAC-SHA256 keyed
//! by a secret of the node, kept outside the log.
//!
//! The chain alone cannot show that records were removed from its end (the shorter log is a
//! valid chain), nor that its last records were rewritten with recomputed hashes. The head can:
//! whoever edits the log without the key cannot write a head that matches it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::error::{AuditError, HeadProblem};
use crate::files::{sync_dir, temp_path};
use crate::verify::Walk;

/// File name of the sealed head inside the audit directory.
pub const HEAD_FILE: &str = "audit.head";
/// File name of the head's key inside the audit directory (when no other key is given).
pub const KEY_FILE: &str = "audit.key";
/// Domain separation: a MAC over anything else never passes as a head.
const CONTEXT: &str = "trustql-audit-head/1";

/// The secret that seals the head.
pub struct HeadKey(hmac::Key);

impl std::fmt::Debug for HeadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.write_str("HeadKey(..)")
    }
}

impl HeadKey {
    /// Reads a key file (64 hex digits).
    pub fn load(path: &Path) -> Result<Self, AuditError> {
        let bad = |reason: String| AuditError::Key {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let bytes = from_hex(text.trim())
            .filter(|b| b.len() == 32)
            .ok_or_else(|| bad("not a key of 64 hex digits".into()))?;
        Ok(HeadKey(hmac::Key::new(hmac::HMAC_SHA256, &bytes)))
    }

    /// Makes a new random key and writes it to `path`, readable by its owner only; refuses to
    /// replace an existing file.
    pub(crate) fn create(path: &Path) -> Result<Self, AuditError> {
        let bad = |reason: String| AuditError::Key {
            path: path.to_path_buf(),
            reason,
        };
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| bad("the system random source failed".into()))?;
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(|e| bad(e.to_string()))?;
        let mut text = to_hex(&bytes);
        text.push('\n');
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| bad(e.to_string()))?;
        if let Some(dir) = path.parent() {
            sync_dir(dir).map_err(|e| bad(e.to_string()))?;
        }
        Ok(HeadKey(hmac::Key::new(hmac::HMAC_SHA256, &bytes)))
    }

    fn message(records: u64, head: &str) -> String {
        format!("{CONTEXT} {records} {head}")
    }

    fn seal(&self, records: u64, head: &str) -> SealedHead {
        let tag = hmac::sign(&self.0, Self::message(records, head).as_bytes());
        SealedHead {
            records,
            head: head.to_string(),
            mac: to_hex(tag.as_ref()),
        }
    }

    /// Whether `sealed` was sealed with this key (constant time).
    fn opens(&self, sealed: &SealedHead) -> bool {
        from_hex(&sealed.mac).is_some_and(|mac| {
            hmac::verify(
                &self.0,
                Self::message(sealed.records, &sealed.head).as_bytes(),
                &mac,
            )
            .is_ok()
        })
    }
}

/// The head file's content.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SealedHead {
    records: u64,
    head: String,
    mac: String,
}

/// The head a key opens: `(records, last hash)`, or `None` when there is no head file.
pub(crate) fn read_head(path: &Path, key: &HeadKey) -> Result<Option<(u64, String)>, AuditError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(AuditError::Io {
                path: path.to_path_buf(),
                reason: e.to_string(),
            });
        }
    };
    let forged = || AuditError::Head {
        path: path.to_path_buf(),
        problem: HeadProblem::Forged,
    };
    let sealed: SealedHead = serde_json::from_slice(&bytes).map_err(|_| forged())?;
    if !key.opens(&sealed) {
        return Err(forged());
    }
    Ok(Some((sealed.records, sealed.head)))
}

/// Replaces the head atomically (a temporary file, synced, renamed over the old one, and the
/// directory synced), so a crash leaves the old head or the new one, never a mix.
pub(crate) fn write_head(
    path: &Path,
    key: &HeadKey,
    records: u64,
    head: &str,
) -> Result<(), AuditError> {
    let io = |e: std::io::Error| AuditError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let mut line = serde_json::to_vec(&key.seal(records, head)).map_err(|e| AuditError::Io {
        path: path.to_path_buf(),
        reason: format!("the head could not be serialised: {e}"),
    })?;
    line.push(b'\n');
    let temp = temp_path(path);
    let mut file = File::create(&temp).map_err(io)?;
    file.write_all(&line)
        .and_then(|()| file.sync_all())
        .map_err(io)?;
    drop(file);
    std::fs::rename(&temp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir).map_err(io)?;
    }
    Ok(())
}

/// Compares the walked log with the head it should end at.
pub(crate) fn compare(sealed: &(u64, String), walk: &Walk) -> Result<(), HeadProblem> {
    let (sealed_records, sealed_head) = sealed;
    let records = walk.verified.records;
    if records < *sealed_records {
        return Err(HeadProblem::Truncated {
            records,
            sealed: *sealed_records,
        });
    }
    if records == *sealed_records {
        return if walk.verified.head == *sealed_head {
            Ok(())
        } else {
            Err(HeadProblem::Rewritten { record: records })
        };
    }
    Err(HeadProblem::Unsealed {
        sealed: *sealed_records,
        records,
        // One record past the head that chains onto it is what a crash between the log's
        // sync and the head's replacement leaves: a record that was never acknowledged.
        interrupted: records == sealed_records + 1 && walk.last_prev.as_ref() == Some(sealed_head),
    })
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}
