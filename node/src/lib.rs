//! A trust's TrustQL node.
//!
//! Serves the trust's Parquet through DataFusion behind Arrow Flight, vets every query against
//! the trust's approved policy, answers with protected partial aggregation states, and records
//! every request in a hash-chained audit log. It trusts nothing the coordinator checked.

// Library code returns errors; only tests may expect().
#![cfg_attr(not(test), deny(clippy::expect_used))]

mod allowance;
mod config;
mod dp;
mod engine;
mod error;
#[cfg(feature = "fault-injection")]
pub mod faults;
mod gate;
mod patient_order;
mod patients;
mod pool_keys;
mod record_keys;
mod secret_file;
mod server;
mod service;
mod unordered;

pub use config::{
    CoordinatorIdentity, LEDGER_FILE, Limits, NodeConfig, POOL_KEY_FILE, PoolConfig, TlsConfig,
};
pub use engine::{SiteAnswer, SiteEngine, Timings, fingerprint};
pub use error::NodeError;
pub use pool_keys::{PoolKeys, pool_public_key};
pub use record_keys::{RECORD_KEYS_FILE, RecordKeySecret};
pub use server::{RunningNode, start};
pub use service::{MAX_REQUEST_BYTES, NodeService};
