//! Checking a log's chain and its sealed head.

use std::path::Path;

use crate::error::{AuditError, HeadProblem};
use crate::head::{HEAD_FILE, HeadKey, KEY_FILE, compare, read_head};
use crate::log::LOG_FILE;
use crate::record::{AuditRecord, GENESIS};

/// A log whose chain holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Records in the log (the sealed ones, when the log ends in an unacknowledged record).
    pub records: u64,
    /// Hash of the last record ([`GENESIS`] for an empty log).
    pub head: String,
    /// A last record that a crash left behind before it was acknowledged, if any.
    pub unacknowledged: Option<Unacknowledged>,
}

/// What a crash mid-append leaves after the sealed records: nothing it describes was released
/// (an answer leaves only after its record is sealed), and the node drops it, with a note in
/// the log, when it next starts. Anyone can append such a record, so it is never counted as
/// verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unacknowledged {
    /// The last line is cut off: the write never completed.
    Torn {
        /// Its line number.
        line: usize,
    },
    /// One whole record chained onto the sealed head, which was never replaced to seal it.
    Unsealed {
        /// Its line number.
        line: usize,
    },
}

impl std::fmt::Display for Unacknowledged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Torn { line } => {
                write!(f, "line {line} is cut off (a write that never completed)")
            }
            Self::Unsealed { line } => write!(
                f,
                "the record on line {line} was written but never sealed (the node stopped \
                 before it acknowledged it)"
            ),
        }?;
        f.write_str(
            "; nothing it records was released, and the node drops it and notes it in the \
             log when it next starts",
        )
    }
}

/// What a walk over the log found.
#[derive(Debug)]
pub(crate) struct Walk {
    /// The whole records, whose chain holds.
    pub(crate) verified: Verified,
    /// The line of a cut-off last record, if any.
    pub(crate) torn: Option<usize>,
    /// The `prev` of the last whole record.
    pub(crate) last_prev: Option<String>,
    /// Where the last whole record starts.
    pub(crate) last_start: u64,
    /// Bytes of whole records.
    pub(crate) whole_len: u64,
}

/// Checks the chain of the log in `dir` and its sealed head, with the key beside the log
/// ([`KEY_FILE`]); the error names the first bad record, or what is wrong at the end.
pub fn verify(dir: &Path) -> Result<Verified, AuditError> {
    verify_with_key(dir, &dir.join(KEY_FILE))
}

/// [`verify`] with the head's key read from `key`.
pub fn verify_with_key(dir: &Path, key: &Path) -> Result<Verified, AuditError> {
    let path = dir.join(LOG_FILE);
    let bytes = std::fs::read(&path).map_err(|e| AuditError::Io {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let walk = check(&bytes, &path)?;
    let key = HeadKey::load(key)?;
    let head_path = dir.join(HEAD_FILE);
    let head_error = |problem| AuditError::Head {
        path: head_path.clone(),
        problem,
    };
    let sealed = read_head(&head_path, &key)?.ok_or_else(|| head_error(HeadProblem::Missing))?;
    let unsealed = match compare(&sealed, &walk) {
        Ok(()) => None,
        // Only a whole record can be unsealed; a torn line after it would be a second append
        // past the head, which the log's serialised appends never leave.
        Err(HeadProblem::Unsealed {
            interrupted: true,
            records,
            ..
        }) if walk.torn.is_none() => Some(Unacknowledged::Unsealed {
            line: usize::try_from(records).unwrap_or(usize::MAX),
        }),
        Err(problem) => return Err(head_error(problem)),
    };
    let torn = walk.torn.map(|line| Unacknowledged::Torn { line });
    Ok(Verified {
        records: sealed.0,
        head: sealed.1,
        unacknowledged: unsealed.or(torn),
    })
}

/// Walks the chain: the verified prefix, and what lies at its end.
pub(crate) fn check(bytes: &[u8], path: &Path) -> Result<Walk, AuditError> {
    let broken = |line: usize, problem: String| AuditError::Broken {
        path: path.to_path_buf(),
        line,
        problem,
    };
    let mut head = GENESIS.to_string();
    let mut records = 0u64;
    let mut rest = bytes;
    let mut line_no = 0usize;
    let mut last_prev = None;
    let mut last_start = 0u64;
    let mut offset = 0u64;
    while !rest.is_empty() {
        line_no += 1;
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return Ok(Walk {
                verified: Verified {
                    records,
                    head,
                    unacknowledged: None,
                },
                torn: Some(line_no),
                last_prev,
                last_start,
                whole_len: offset,
            });
        };
        let (line, tail) = rest.split_at(end);
        rest = &tail[1..];
        let record: AuditRecord = serde_json::from_slice(line).map_err(|_| {
            broken(
                line_no,
                "not a valid audit record (edited or corrupted)".into(),
            )
        })?;
        let expected_seq = records + 1;
        if record.seq != expected_seq {
            return Err(broken(
                line_no,
                format!(
                    "record {} found where record {expected_seq} should be (records removed or reordered)",
                    record.seq
                ),
            ));
        }
        if record.prev != head {
            return Err(broken(
                line_no,
                format!(
                    "record {} does not follow the record before it (a record was removed, reordered or edited)",
                    record.seq
                ),
            ));
        }
        if record.expected_hash().ok().as_ref() != Some(&record.hash) {
            return Err(broken(
                line_no,
                format!("record {} was edited after it was written", record.seq),
            ));
        }
        head = record.hash;
        last_prev = Some(record.prev);
        last_start = offset;
        offset += end as u64 + 1;
        records += 1;
    }
    Ok(Walk {
        verified: Verified {
            records,
            head,
            unacknowledged: None,
        },
        torn: None,
        last_prev,
        last_start,
        whole_len: offset,
    })
}
