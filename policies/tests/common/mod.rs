//! Shared set-up for the policies tests: the schema and a locked session over empty tables.

#![allow(dead_code)]

use std::sync::Arc;

use datafusion::catalog::MemTable;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::prelude::{SessionConfig, SessionContext};
use trustql_policies::locked_session;
use trustql_schemas::TrustSchema;

pub(crate) fn schema() -> TrustSchema {
    TrustSchema::cancer().expect("schema")
}

/// A locked session over empty tables of the shared schema (vetting needs no data).
pub(crate) fn session() -> SessionContext {
    let ctx = locked_session(SessionConfig::new(), Arc::new(RuntimeEnv::default()));
    for table in schema().tables() {
        let provider = MemTable::try_new(table.arrow_schema(), vec![vec![]]).expect("table");
        ctx.register_table(table.name.as_str(), Arc::new(provider))
            .expect("register");
    }
    ctx
}
