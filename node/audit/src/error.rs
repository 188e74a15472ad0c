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
}
