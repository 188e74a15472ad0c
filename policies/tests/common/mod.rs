//! Shared set-up for the policies tests: the schema and a locked session over empty tables.

#![allow(dead_code)]

use std::sync::Arc;

use datafusion::catalog::MemTable;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::prelude::{SessionConfig, SessionContext};
use trustql_policies::{
    Needs, Policy, Refusal, Terms, aggregate_of, locked_session, needs, vet_sql,
};
use trustql_schemas::TrustSchema;

pub(crate) fn schema() -> TrustSchema {
    TrustSchema::cancer().expect("schema")
}

/// A locked session over empty tables of the shared schema (vetting needs no data).
pub(crate) fn session() -> SessionContext {
    let ctx = locked_session(
        SessionConfig::new(),
        Arc::new(RuntimeEnv::default()),
        &schema(),
    );
    for table in schema().tables() {
        let provider = MemTable::try_new(table.arrow_schema(), vec![vec![]]).expect("table");
        ctx.register_table(table.name.as_str(), Arc::new(provider))
            .expect("register");
    }
    ctx
}

/// What the release needs for `sql` in `project` of the policy `policy` (TOML), as the node
/// would ask: vetting's refusals and `needs`' alike.
pub(crate) async fn needs_for(
    policy: &str,
    project: &str,
    sql: &str,
    terms: Terms,
) -> Result<Needs, Refusal> {
    let policy = Policy::from_toml(policy).expect("policy");
    let project = policy.project(project).expect("project");
    let (plan, optimized, vetted) = vet_sql(&session(), &schema(), &policy, project, sql).await?;
    let aggregate = aggregate_of(&plan).expect("aggregate");
    needs(
        &policy,
        project,
        &schema(),
        aggregate,
        &optimized,
        &vetted,
        terms,
    )
}
