use std::path::PathBuf;

/// Errors of the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A file could not be read, written or synced.
    #[error("cannot access the audit log {path}: {reason}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The reason.
        reason: String,
    },
    /// Another process holds the log.
    #[error("the audit log {0} is in use by another node; one node per audit directory")]
    Locked(PathBuf),
    /// The chain is broken at a record.
    #[error("audit log {path}: line {line}: {problem}")]
    Broken {
        /// The log file.
        path: PathBuf,
        /// 1-based line number of the first bad record.
        line: usize,
        /// What is wrong there.
        problem: String,
    },
    /// The log and its sealed head disagree, or the head is missing or forged.
    #[error("audit log head {path}: {problem}")]
    Head {
        /// The head file.
        path: PathBuf,
        /// What is wrong.
        problem: HeadProblem,
    },
    /// The head's key is missing or unreadable.
    #[error("the audit head key {path}: {reason}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// The reason.
        reason: String,
    },
}

/// What is wrong between a log and its sealed head.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadProblem {
    /// The log has records but no head beside it.
    #[error(
        "the sealed chain head is missing: records may have been removed from the end of the log"
    )]
    Missing,
    /// The head does not open with the key.
    #[error(
        "the sealed chain head does not match the key: it was forged or edited, or this is not \
         the log's key"
    )]
    Forged,
    /// Fewer records than the head sealed.
    #[error(
        "the log ends after record {records} but its sealed head says {sealed} were written: \
         records were removed from the end"
    )]
    Truncated {
        /// Records in the log.
        records: u64,
        /// Records the head sealed.
        sealed: u64,
    },
    /// As many records as sealed, but a different last hash.
    #[error(
        "the log's records up to {record} are not the ones the head sealed: the tail was \
         rewritten and its hashes recomputed"
    )]
    Rewritten {
        /// The last record.
        record: u64,
    },
    /// Records after the sealed head.
    #[error(
        "the log holds {records} records but its head sealed {sealed}: {}",
        if *interrupted {
            "the last was written by an interrupted append and never acknowledged; the node \
             drops it and notes it in the log when it next starts"
        } else {
            "records were added or rewritten by someone without the key"
        }
    )]
    Unsealed {
        /// Records the head sealed.
        sealed: u64,
        /// Records in the log.
        records: u64,
        /// Exactly one record past the head, chained onto it (a crash mid-append).
        interrupted: bool,
    },
}
