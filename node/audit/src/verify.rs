//! Checking a log's chain.

use std::path::Path;

use crate::error::AuditError;
use crate::log::LOG_FILE;
use crate::record::{AuditRecord, GENESIS};

/// A log whose chain holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Records in the log.
    pub records: u64,
    /// Hash of the last record ([`GENESIS`] for an empty log).
    pub head: String,
}

/// Checks the chain of the log in `dir`; the error names the first bad record.
pub fn verify(dir: &Path) -> Result<Verified, AuditError> {
    let path = dir.join(LOG_FILE);
    let bytes = std::fs::read(&path).map_err(|e| AuditError::Io {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let (verified, torn) = check(&bytes, &path)?;
    if let Some(line) = torn {
        return Err(AuditError::Broken {
            path,
            line,
            problem: "the last record is cut off (a write that never completed); \
                      the node drops it and notes it in the log when it next starts"
                .into(),
        });
    }
    Ok(verified)
}

/// Walks the chain; returns the verified prefix and the line of a cut-off last record, if any.
pub(crate) fn check(bytes: &[u8], path: &Path) -> Result<(Verified, Option<usize>), AuditError> {
    let broken = |line: usize, problem: String| AuditError::Broken {
        path: path.to_path_buf(),
        line,
        problem,
    };
    let mut head = GENESIS.to_string();
    let mut records = 0u64;
    let mut rest = bytes;
    let mut line_no = 0usize;
    while !rest.is_empty() {
        line_no += 1;
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return Ok((Verified { records, head }, Some(line_no)));
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
        records += 1;
    }
    Ok((Verified { records, head }, None))
}
