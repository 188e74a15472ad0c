use trustql_merge::MergeError;
use trustql_protocol::Coverage;

/// Errors of the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The configuration file is missing, malformed or inconsistent.
    #[error("coordinator configuration: {0}")]
    Config(String),
    /// TLS material is missing or unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// The caller is not a known researcher.
    #[error("missing or unknown bearer token")]
    Unauthenticated,
    /// The researcher may not use this project, or must name one.
    #[error("{0}")]
    Forbidden(String),
    /// The query can never be answered, or every trust refused it.
    #[error("{message}")]
    Refused {
        /// What to tell the researcher.
        message: String,
        /// Per-trust report, when nodes were asked.
        coverage: Option<Box<Coverage>>,
    },
    /// Too few trusts answered.
    #[error(
        "only {answered} of {total} trusts answered; this coordinator needs {needed}\n{coverage}"
    )]
    NoQuorum {
        /// Trusts that answered.
        answered: usize,
        /// Trusts asked.
        total: usize,
        /// Trusts needed.
        needed: usize,
        /// The report.
        coverage: Box<Coverage>,
    },
    /// The members of a pool did not agree (their policies list other members or other
    /// protection), or their masks did not cancel: nothing is released.
    #[error("{message}\n{coverage}")]
    Pool {
        /// What went wrong, naming no data.
        message: String,
        /// The report.
        coverage: Box<Coverage>,
    },
    /// The merge failed.
    #[error("{0}")]
    Merge(MergeError),
    /// A TrustQL header of the call is malformed.
    #[error("{0}")]
    BadHeader(String),
    /// The researcher already has as many results waiting to be fetched (or running) as the
    /// coordinator keeps for one researcher.
    #[error(
        "you have {limit} results waiting to be fetched or still running, as many as this \
         coordinator keeps for one researcher; fetch them, or wait for them to expire (after \
         {ttl_secs} s), then ask again"
    )]
    Busy {
        /// Results one researcher may leave waiting.
        limit: usize,
        /// How long a result waits.
        ttl_secs: u64,
    },
    /// The coordinator is sending the trusts as many queries as it runs at once, and as many
    /// more are waiting their turn (or this one waited as long as it may).
    #[error(
        "the federation is busy: this coordinator runs {running} queries at once and keeps at \
         most {queued} waiting for a turn; nothing was run for this one, so try again shortly"
    )]
    Crowded {
        /// Queries run at once.
        running: usize,
        /// Queries that may wait.
        queued: usize,
    },
    /// The result expired or belongs to someone else.
    #[error("no such result: run the query again")]
    UnknownResult,
    /// A fault inside the coordinator (the random source, encoding a report); the cause is in
    /// the coordinator's log.
    #[error("the coordinator could not complete the request")]
    Internal(String),
}

impl From<MergeError> for CoordinatorError {
    fn from(e: MergeError) -> Self {
        match e {
            MergeError::Refused(r) => CoordinatorError::Refused {
                message: r.to_string(),
                coverage: None,
            },
            other => CoordinatorError::Merge(other),
        }
    }
}

impl CoordinatorError {
    /// The status a researcher's client sees: explicit codes, messages without data.
    pub fn to_status(&self) -> tonic::Status {
        use tonic::Status;
        match self {
            CoordinatorError::Unauthenticated => Status::unauthenticated(self.to_string()),
            CoordinatorError::Forbidden(_) => Status::permission_denied(self.to_string()),
            CoordinatorError::Refused { message, coverage } => {
                let text = match coverage {
                    Some(c) => format!("{message}\n{c}"),
                    None => message.clone(),
                };
                Status::invalid_argument(text)
            }
            CoordinatorError::NoQuorum { .. } => Status::unavailable(self.to_string()),
            CoordinatorError::Pool { .. } => Status::failed_precondition(self.to_string()),
            CoordinatorError::UnknownResult => Status::not_found(self.to_string()),
            CoordinatorError::Busy { .. } | CoordinatorError::Crowded { .. } => {
                Status::resource_exhausted(self.to_string())
            }
            CoordinatorError::BadHeader(_) => Status::invalid_argument(self.to_string()),
            CoordinatorError::Merge(_) | CoordinatorError::Internal(_) => {
                Status::internal(self.to_string())
            }
            CoordinatorError::Config(_) | CoordinatorError::Tls(_) => {
                Status::internal("the coordinator is misconfigured")
            }
        }
    }
}

/// `n` random bytes from the operating system, as lower-case hex (request ids, handles,
/// tokens); a failing random source is an error, never a predictable value.
pub fn random_hex(n: usize) -> Result<String, CoordinatorError> {
    use rand::TryRngCore;
    let mut bytes = vec![0u8; n];
    rand::rngs::OsRng.try_fill_bytes(&mut bytes).map_err(|e| {
        tracing::error!(error = %e, "the system random source failed");
        CoordinatorError::Internal(format!("the system random source failed: {e}"))
    })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
