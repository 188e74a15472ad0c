//! A node's audit log: every site request, accepted or refused, as one JSON line carrying the
//! hash of the line before, fsync'd before the answer leaves.
//!
//! - [`AuditLog`]: the writer a node holds (one per audit directory, locked).
//! - [`verify`]: checks a log's chain and names the first edited, removed or reordered record.

mod error;
mod log;
mod record;
mod verify;

pub use error::AuditError;
pub use log::{AuditLog, LOG_FILE};
pub use record::{AuditEntry, AuditRecord, Decision, GENESIS, TrustOutcome};
pub use verify::{Verified, verify};
