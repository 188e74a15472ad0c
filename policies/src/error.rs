use std::path::PathBuf;

/// Errors from loading, checking or approving a policy file.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file is not valid TOML or has unknown or missing keys.
    #[error("policy file is not valid: {0}")]
    Parse(String),
    /// The policy parsed but breaks a rule (the list says which).
    #[error("policy has {} error(s):\n  - {}", .0.len(), .0.join("\n  - "))]
    Invalid(Vec<String>),
    /// There is no approval record next to the policy.
    #[error("policy {0} has not been approved: run `trustql policy approve {0} --by NAME`")]
    NotApproved(PathBuf),
    /// The policy changed after it was approved.
    #[error(
        "policy {path} changed after it was approved (approved content sha256 {approved}, now {actual}); \
         review it and approve it again"
    )]
    ChangedSinceApproval {
        /// The policy file.
        path: PathBuf,
        /// Hash recorded at approval.
        approved: String,
        /// Hash of the content now.
        actual: String,
    },
    /// A file could not be read or written.
    #[error("cannot access {path}: {reason}")]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// The reason.
        reason: String,
    },
    /// Differential-privacy noise could not be added (nothing is released).
    #[error("differential privacy: {0}")]
    Noise(String),
}
