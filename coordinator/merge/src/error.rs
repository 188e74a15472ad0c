use trustql_policies::Refusal;

/// Errors of planning or merging at the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// The query can never be answered (a statement, unknown table, bad SQL…).
    #[error("{0}")]
    Refused(Refusal),
    /// A node's answer does not have the shape this query's states need.
    #[error("the answer from {trust} does not fit this query ({reason}); it was left out")]
    Shape {
        /// The trust.
        trust: String,
        /// What did not fit.
        reason: String,
    },
    /// The merge itself failed.
    #[error("the answers could not be merged: {0}")]
    Engine(String),
    /// The coordinator could not set up its planning session.
    #[error("the coordinator's schema could not be loaded: {0}")]
    Setup(String),
}

impl From<Refusal> for MergeError {
    fn from(r: Refusal) -> Self {
        MergeError::Refused(r)
    }
}
