//! TrustQL's common cancer data model.
//!
//! The model lives in `schemas/cancer_schema.toml`, a file a trust's data controller can read:
//! the Simulacrum v2.1.0 tables with lower-case column names, each column's type, disclosure
//! class and code set, and the foreign keys by which every table reaches the patient. This crate
//! loads it, turns it into Arrow schemas, and checks a site's Parquet files against it.

// Library code returns errors; only tests may expect().
#![cfg_attr(not(test), deny(clippy::expect_used))]

mod check;
mod error;
mod layout;
mod model;
mod patient_order;

pub use check::{Problem, SiteReport, TableReport, check_site};
pub use error::SchemaError;
pub use layout::{MAX_TRUSTS, ROW_GROUP_ROWS, SiteWriter, table_path, trust_codes, trust_weights};
pub use model::{
    CodeSet, Column, ColumnType, DisclosureClass, Hop, SchemaInfo, Table, TrustSchema,
};
pub use patient_order::patients_in_order;

/// The text of the schema file shipped with this build.
pub const CANCER_SCHEMA_TOML: &str = include_str!("../cancer_schema.toml");
