use std::path::PathBuf;

use trustql_policies::{Refusal, ReleaseError};

/// Errors of a TrustQL node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The node configuration file is missing, malformed or inconsistent.
    #[error("node configuration: {0}")]
    Config(String),
    /// The site's data does not match the schema; the node will not start.
    #[error("the site data in {dir} does not match the schema ({problems} problem(s)):\n{report}")]
    BadData {
        /// The data directory.
        dir: PathBuf,
        /// Number of problems.
        problems: usize,
        /// The full check report.
        report: String,
    },
    /// The policy is not servable (invalid, unapproved or changed since approval).
    #[error(transparent)]
    Policy(#[from] trustql_policies::PolicyError),
    /// TLS material is missing or unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// The request is not a TrustQL site request.
    #[error("bad site request: {0}")]
    BadRequest(String),
    /// The caller's certificate is not one this node pins as its coordinator's; what it was
    /// (fingerprint, subject, usage) is for the node's audit log, never for the caller.
    #[error("the caller is not this trust's coordinator: {0}")]
    NotCoordinator(String),
    /// The request is unsigned, signed by an unknown key, or its signature does not verify.
    #[error("the site request was not vouched for by the coordinator: {0}")]
    Unvouched(trustql_protocol::ProtocolError),
    /// The coordinator signed the request for another trust.
    #[error("the site request was signed for another trust")]
    OtherTrust,
    /// The request's issue time is outside the node's window.
    #[error(
        "the site request was issued {age_secs} s from this trust's clock; at most {window_secs} s is accepted"
    )]
    Stale {
        /// How far from the node's clock, in whole seconds.
        age_secs: u64,
        /// The window.
        window_secs: u64,
    },
    /// The request's issue time is ahead of the node's clock by more than the clocks may
    /// differ: a request signed for later could be replayed after the node restarts.
    #[error(
        "the site request was issued {ahead_secs} s ahead of this trust's clock; at most {allowed_secs} s is accepted"
    )]
    Early {
        /// How far ahead, in whole seconds.
        ahead_secs: u64,
        /// How far ahead a request may be.
        allowed_secs: u64,
    },
    /// Issued before this node started: the ids it had seen are gone, so it could be a replay.
    #[error(
        "the site request was issued before this trust's node started, so it may have been used already"
    )]
    BeforeStart,
    /// The request id was seen before within the window: a replay.
    #[error("the site request id was already used (a replayed request)")]
    Replayed,
    /// The query was refused by a rule.
    #[error("{0}")]
    Refused(Refusal),
    /// The query ran past the node's time limit.
    #[error("the query took longer than this trust's limit of {0} ms")]
    Timeout(u64),
    /// The query needed more memory than this trust allows.
    #[error("the query needed more memory than this trust allows")]
    Memory,
    /// The node is running as many queries as it allows.
    #[error("this trust is busy with other queries; try again shortly")]
    Busy,
    /// The query failed while running (details are in the node's log, never in the answer).
    #[error("the query could not be completed at this trust")]
    Execution,
    /// A fault inside protection: a failure, not a policy decision. Nothing was released; the
    /// cause is in the node's log, never in the answer.
    #[error("the trust could not protect the answer, so nothing was released")]
    Internal(String),
    /// The audit log could not be written; no answer is released without its record.
    #[error("the audit log could not be written: {0}")]
    Audit(String),
    /// The privacy-budget ledger could not be read or written; nothing is released unpaid.
    #[error("the privacy-budget ledger could not be used: {0}")]
    Budget(String),
    /// The record keys of the trust's patients could not be computed at start (the cause, which
    /// may quote data, is in the node's log).
    #[error(
        "the record keys of this trust's patients could not be computed; the cause is in the node's log"
    )]
    RecordKeys,
    /// The pool's masks could not be made (a member's key not pinned, the pool's settings
    /// inconsistent): a set-up fault of this trust, which names a member, never any data.
    #[error("pooled answer: {0}")]
    Pool(String),
    /// A file could not be read or written.
    #[error("cannot access {path}: {reason}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The reason.
        reason: String,
    },
}

impl From<Refusal> for NodeError {
    fn from(r: Refusal) -> Self {
        NodeError::Refused(r)
    }
}

impl From<ReleaseError> for NodeError {
    fn from(e: ReleaseError) -> Self {
        match e {
            ReleaseError::Refused(r) => NodeError::Refused(r),
            ReleaseError::Internal(_) | ReleaseError::Noise(_) => {
                NodeError::Internal(e.to_string())
            }
            ReleaseError::Pool(reason) => NodeError::Pool(reason),
        }
    }
}

impl From<trustql_audit::AuditError> for NodeError {
    fn from(e: trustql_audit::AuditError) -> Self {
        NodeError::Audit(e.to_string())
    }
}

impl From<trustql_budget::BudgetError> for NodeError {
    fn from(e: trustql_budget::BudgetError) -> Self {
        NodeError::Budget(e.to_string())
    }
}

impl NodeError {
    /// The tonic status a client sees: explicit codes, bounded messages, no engine text.
    pub fn to_status(&self) -> tonic::Status {
        use tonic::Status;
        match self {
            NodeError::Refused(r) => Status::permission_denied(r.to_string()),
            NodeError::BadRequest(_) => Status::invalid_argument(self.to_string()),
            // Says nothing of the certificate presented, or of what this node would take.
            NodeError::NotCoordinator(_) => Status::permission_denied(
                "this trust takes site requests only from the coordinator it is configured to trust",
            ),
            NodeError::Unvouched(_)
            | NodeError::OtherTrust
            | NodeError::Stale { .. }
            | NodeError::Early { .. }
            | NodeError::BeforeStart
            | NodeError::Replayed => Status::unauthenticated(self.to_string()),
            NodeError::Timeout(_) => Status::deadline_exceeded(self.to_string()),
            NodeError::Memory => Status::resource_exhausted(self.to_string()),
            // Marked, so the coordinator can tell admission (no data read) from running out of
            // memory mid-query (which the data can cause).
            NodeError::Busy => {
                let mut status = Status::resource_exhausted(self.to_string());
                status.metadata_mut().insert(
                    trustql_protocol::BUSY_HEADER,
                    tonic::metadata::MetadataValue::from_static("1"),
                );
                status
            }
            NodeError::Execution | NodeError::Internal(_) => Status::internal(self.to_string()),
            NodeError::Pool(_) => Status::failed_precondition(self.to_string()),
            // Not `unavailable`: that code means the transport failed, and the coordinator
            // reports it as an unreachable node.
            NodeError::Audit(_) => Status::aborted(
                "the trust cannot record queries right now, so nothing was released",
            ),
            NodeError::Budget(_) => Status::aborted(
                "the trust cannot record privacy spending right now, so nothing was released",
            ),
            // Set-up errors never reach a researcher's request; if one does, say nothing of it.
            NodeError::Config(_)
            | NodeError::BadData { .. }
            | NodeError::Policy(_)
            | NodeError::Tls(_)
            | NodeError::RecordKeys
            | NodeError::Io { .. } => Status::internal("the trust could not answer"),
        }
    }
}

/// An internal fault with its cause: logged here, where the cause is known (the log stays
/// local), and bounded to [`NodeError::Execution`] for the wire.
pub(crate) fn fault<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> NodeError {
    move |cause| {
        tracing::error!(%cause, "{what}");
        NodeError::Execution
    }
}

/// An internal fault without an underlying error: logged, and bounded for the wire.
pub(crate) fn internal(what: &'static str) -> NodeError {
    tracing::error!("{what}");
    NodeError::Execution
}
