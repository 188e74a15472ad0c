//! The writer.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{AuditError, HeadProblem};
use crate::head::{HEAD_FILE, HeadKey, KEY_FILE, compare, read_head, write_head};
use crate::record::{AuditEntry, AuditRecord, GENESIS};
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
    /// Seals the head.
    key: HeadKey,
    head_path: PathBuf,
}

impl AuditLog {
    /// Opens (or creates) the log in `dir`, checking its chain and its sealed head first; the
    /// head's key is [`KEY_FILE`] beside the log, made on first open.
    ///
    /// A cut-off last record (a write interrupted before its fsync), or a last record the head
    /// never sealed (interrupted before the head was replaced), was never acknowledged: it is
    /// dropped, and the drop is itself recorded. Any other break refuses to open: appending to
    /// a broken chain would hide it.
    pub fn open(dir: &Path, time: &str) -> Result<Self, AuditError> {
        Self::open_with_key(dir, &dir.join(KEY_FILE), time)
    }

    /// [`AuditLog::open`] with the head's key at `key` (made there if the log is new).
    pub fn open_with_key(dir: &Path, key: &Path, time: &str) -> Result<Self, AuditError> {
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
        let walk = check(&bytes, &path)?;
        let head_path = dir.join(HEAD_FILE);
        let fresh = walk.verified.records == 0 && !head_path.exists();
        // A new key only for a new log: a missing key beside an existing log is an error, or
        // deleting key and head together would hide a truncation.
        let key = if fresh && !key.exists() {
            HeadKey::create(key)?
        } else {
            HeadKey::load(key)?
        };
        let head_error = |problem| AuditError::Head {
            path: head_path.clone(),
            problem,
        };
        // Where the acknowledged records end, and the chain there.
        let (keep, seq, head) = match read_head(&head_path, &key)? {
            None if fresh => {
                write_head(&head_path, &key, 0, GENESIS)?;
                (walk.whole_len, 0, GENESIS.to_string())
            }
            None => return Err(head_error(HeadProblem::Missing)),
            Some(sealed) => match compare(&sealed, &walk) {
                Ok(()) => (walk.whole_len, sealed.0, sealed.1),
                Err(HeadProblem::Unsealed {
                    interrupted: true, ..
                }) => (walk.last_start, sealed.0, sealed.1),
                Err(problem) => return Err(head_error(problem)),
            },
        };
        let mut log = AuditLog {
            path: path.clone(),
            state: Mutex::new(State {
                file,
                seq,
                head,
                len: keep,
                key,
                head_path,
            }),
        };
        let dropped = bytes.len() as u64 - keep;
        if dropped > 0 {
            {
                let state = log.state.get_mut().map_err(|_| poisoned(&path))?;
                state.file.set_len(state.len).map_err(|e| io(&path, e))?;
                state.file.sync_all().map_err(|e| io(&path, e))?;
            }
            log.append(AuditEntry::node_note(
                time,
                format!(
                    "dropped {dropped} bytes at the end of the log left by an interrupted write \
                     (a cut-off record, or one its head never sealed); they were never acknowledged"
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
        // The head follows the record; until it does, the record is not acknowledged.
        if let Err(e) = write_head(&state.head_path, &state.key, record.seq, &record.hash) {
            // Unless the new head is in place, the log goes back to what the head seals.
            let sealed = read_head(&state.head_path, &state.key)
                .ok()
                .flatten()
                .is_some_and(|(seq, _)| seq == record.seq);
            if sealed {
                state.seq = record.seq;
                state.head = record.hash.clone();
                state.len += line.len() as u64;
            } else {
                let len = state.len;
                let _ = state.file.set_len(len);
            }
            return Err(e);
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

fn poisoned(path: &Path) -> AuditError {
    AuditError::Io {
        path: path.to_path_buf(),
        reason: "a previous write panicked".into(),
    }
}
