//! A node's audit log: every site request, accepted or refused, as one JSON line carrying the
//! hash of the line before, fsync'd before the answer leaves.
//!
//! - [`AuditLog`]: the writer a node holds (one per audit directory, locked).
//! - [`verify`]: checks a log's chain and names the first edited, removed or reordered record,
//!   and checks its end against the sealed head (an HMAC over the record count and last hash,
//!   kept beside the log in [`HEAD_FILE`] and keyed by a node secret, [`KEY_FILE`]), so a
//!   truncated log or a rewritten tail is named too.

// Library code returns errors; only tests may expect().
#![cfg_attr(not(test), deny(clippy::expect_used))]

mod error;
mod files;
mod head;
mod log;
mod record;
mod verify;

pub use error::{AuditError, HeadProblem};
pub use files::{sync_dir, temp_path};
pub use head::{HEAD_FILE, HeadKey, KEY_FILE};
pub use log::{AuditLog, LOG_FILE};
pub use record::{AuditEntry, AuditRecord, Decision, GENESIS, TrustOutcome};
pub use verify::{Unacknowledged, Verified, verify, verify_with_key};
