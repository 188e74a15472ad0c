//! Shared test support for TrustQL's tests (a dev-dependency only, never published).
//!
//! - [`oracle`]: the central oracle (one DataFusion session over the union of the trusts'
//!   Parquet), the panel of queries every federated path must answer as it does, and the
//!   comparison of two results.
//! - `federation` (feature `federation`): a researcher's view of a loopback
//!   `trustql_demo::Federation` — a connected client and its answers as one batch.

pub mod oracle;

#[cfg(feature = "federation")]
pub mod federation;
