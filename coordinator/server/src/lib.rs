//! The TrustQL coordinator.
//!
//! Researchers connect with any Flight SQL client over TLS with a bearer token. Each query
//! is planned against the shared schema (refusing early what can never be answered), sent to
//! every trust's node in parallel over mutual TLS with a deadline, and the nodes' protected
//! partial states are finished with DataFusion's own final aggregation. Every answer carries
//! a coverage report: which trusts answered, refused, timed out or could not be reached.

// Library code returns errors; only tests may expect().
#![cfg_attr(not(test), deny(clippy::expect_used))]

mod admission;
mod auth;
mod config;
mod error;
mod fanout;
mod federation;
mod flight_sql;
mod limits;
mod noise;
mod pool;
mod server;

pub use auth::{EPSILON_HEADER, PREVIEW_HEADER, PROJECT_HEADER, token_hash};
pub use config::{CoordinatorConfig, NodeEntry, Quorum, ResearcherEntry, TlsFiles};
pub use error::{CoordinatorError, random_hex};
pub use federation::{Coordinator, FederatedAnswer, REFUSED_CALLS_PER_MINUTE};
pub use flight_sql::ResearcherService;
pub use limits::Limits;
pub use server::{RunningCoordinator, start};
pub use trustql_policies::TotalsRules;
