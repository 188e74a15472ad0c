//! The writer.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::AuditError;
use crate::record::{AuditEntry, AuditRecord};
use crate::verify::check;

/// File name of the log inside the audit directory.
pub const LOG_FILE: &str = "audit.jsonl";

/// The append-only log a node writes; one writer per directory (an OS file lock).
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    file: File,
    seq: u64,
    head: String,
    /// Bytes of whole, synced records.
    len: u64,
}

impl AuditLog {
    /// Opens (or creates) the log in `dir`, checking its chain first.
    ///
    /// A cut-off last record (a write interrupted before its fsync, so never acknowledged)
    /// is dropped, and the drop is itself recorded. Any other break refuses to open: appending
    /// to a broken chain would hide it.
    pub fn open(dir: &Path, time: &str) -> Result<Self, AuditError> {
        let io = |path: &Path, e: std::io::Error| AuditError::Io {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let path = dir.join(LOG_FILE);
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        file.try_lock().map_err(|e| match e {
            std::fs::TryLockError::WouldBlock => AuditError::Locked(path.clone()),
            std::fs::TryLockError::Error(e) => io(&path, e),
        })?;
        let bytes = std::fs::read(&path).map_err(|e| io(&path, e))?;
        let (verified, torn) = check(&bytes, &path)?;
        let mut log = AuditLog {
            path: path.clone(),
            state: Mutex::new(State {
                file,
                seq: verified.records,
                head: verified.head,
                len: keep(&bytes),
            }),
        };
        if torn.is_some() {
            let dropped = bytes.len() as u64 - keep(&bytes);
            {
                let state = log.state.get_mut().map_err(|_| poisoned(&path))?;
                state.file.set_len(state.len).map_err(|e| io(&path, e))?;
                state.file.sync_all().map_err(|e| io(&path, e))?;
            }
            log.append(AuditEntry::node_note(
                time,
                format!(
                    "dropped a cut-off record of {dropped} bytes left by an interrupted write; \
                     it was never acknowledged"
                ),
                "",
            ))?;
        }
        Ok(log)
    }

    /// Appends a record and syncs it to disk; only then may the answer leave.
    pub fn append(&self, entry: AuditEntry) -> Result<AuditRecord, AuditError> {
        let mut state = self.state.lock().map_err(|_| poisoned(&self.path))?;
        let unwritable = |e: serde_json::Error| AuditError::Io {
            path: self.path.clone(),
            reason: format!("the record could not be serialised: {e}"),
        };
        let record = AuditRecord::seal(state.seq + 1, &state.head, entry).map_err(unwritable)?;
        // One write of the whole line, then fsync: a kill leaves either the line or a cut-off
        // tail that `open` drops; an acknowledged record is always whole and on disk.
        let line = record.to_line().map_err(unwritable)?;
        let result = state
            .file
            .write_all(&line)
            .and_then(|()| state.file.sync_data());
        if let Err(e) = result {
            // Cut back to the last whole record so the chain stays intact for the next append;
            // if even that fails, `open` drops the cut-off tail at the next start.
            let len = state.len;
            let _ = state.file.set_len(len);
            return Err(AuditError::Io {
                path: self.path.clone(),
                reason: e.to_string(),
            });
        }
        state.seq = record.seq;
        state.head = record.hash.clone();
        state.len += line.len() as u64;
        Ok(record)
    }

    /// Records written so far.
    pub fn len(&self) -> u64 {
        self.state.lock().map_or(0, |s| s.seq)
    }

    /// Whether the log holds no records.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Length of the whole lines at the start of `bytes`.
fn keep(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i as u64 + 1)
}

fn poisoned(path: &Path) -> AuditError {
    AuditError::Io {
        path: path.to_path_buf(),
        reason: "a previous write panicked".into(),
    }
}
