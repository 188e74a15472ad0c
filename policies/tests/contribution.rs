//! Differential privacy's query side: bounded rows per patient, clamped sums, refused shapes.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Int64Array, RecordBatch, StringArray, new_null_array,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use datafusion::catalog::MemTable;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::{SessionConfig, SessionContext};
use trustql_policies::{
    BoundedQuery, Policy, Refusal, aggregate_of, bound_contributions, locked_session, vet_sql,
};
use trustql_schemas::TrustSchema;

const POLICY: &str = r#"
[policy]
version = "dp-1"
trust = "TQ01"

[dp]
default_rows_per_patient = 1
rows_per_patient = { sim_av_tumour = 2 }
bounds = { "sim_av_tumour.age" = [0, 50] }

[[project]]
id = "dp"
researchers = ["alice"]
tables = ["sim_av_patient", "sim_av_tumour", "sim_sact_regimen", "sim_sact_cycle"]
expires = "2099-12-31"
dp = { epsilon_budget = 10.0, epsilon_per_query = 1.0 }
"#;

fn schema() -> TrustSchema {
    TrustSchema::cancer().expect("schema")
}

/// A table of the schema with the given columns set and every other column null.
fn table(name: &str, set: &[(&str, ArrayRef)]) -> RecordBatch {
    let schema = schema().arrow_schema(name).expect("table");
    let rows = set.first().map_or(0, |(_, a)| a.len());
    let columns = schema
        .fields()
        .iter()
        .map(|f| {
            set.iter()
                .find(|(n, _)| *n == f.name())
                .map(|(_, a)| cast(a, f.data_type()).expect("cast"))
                .unwrap_or_else(|| new_null_array(f.data_type(), rows))
        })
        .collect();
    RecordBatch::try_new(schema, columns).expect("batch")
}

/// Patient 1 has ten stage-4 tumours at age 90; patients 2 and 3 one stage-1 tumour each.
fn session() -> SessionContext {
    let ctx = locked_session(
        SessionConfig::new(),
        Arc::new(RuntimeEnv::default()),
        &trustql_schemas::TrustSchema::cancer().expect("schema"),
    );
    let patients = table(
        "sim_av_patient",
        &[("patientid", Arc::new(Int64Array::from(vec![1, 2, 3])))],
    );
    let mut ids = vec![1i64; 10];
    ids.extend([2, 3]);
    let mut ages = vec![90i64; 10];
    ages.extend([40, 30]);
    let mut stages = vec!["4"; 10];
    stages.extend(["1", "1"]);
    let tumours = table(
        "sim_av_tumour",
        &[
            (
                "tumourid",
                Arc::new(Int64Array::from((100..112).collect::<Vec<i64>>())),
            ),
            ("patientid", Arc::new(Int64Array::from(ids))),
            ("age", Arc::new(Int64Array::from(ages))),
            ("stage_best", Arc::new(StringArray::from(stages))),
        ],
    );
    for schema_table in schema().tables() {
        let data = match schema_table.name.as_str() {
            "sim_av_patient" => vec![patients.clone()],
            "sim_av_tumour" => vec![tumours.clone()],
            _ => vec![],
        };
        let provider = MemTable::try_new(schema_table.arrow_schema(), vec![data]).expect("table");
        ctx.register_table(schema_table.name.as_str(), Arc::new(provider))
            .expect("register");
    }
    ctx
}

async fn bound(ctx: &SessionContext, sql: &str) -> Result<BoundedQuery, Refusal> {
    let policy = Policy::from_toml(POLICY).expect("policy");
    let project = policy.project("dp").expect("project");
    let (plan, optimized, vetted) = vet_sql(ctx, &schema(), &policy, project, sql).await?;
    let aggregate = aggregate_of(&plan).expect("an aggregate");
    bound_contributions(&schema(), &policy.dp, aggregate, &optimized, &vetted)
}

/// Runs the bounded aggregate; one row per group (keys first, then the aggregates).
async fn run(sql: &str) -> (BoundedQuery, RecordBatch) {
    let ctx = session();
    let bounded = match bound(&ctx, sql).await {
        Ok(b) => b,
        Err(r) => panic!("should be accepted: {sql}\n{r}"),
    };
    let plan = LogicalPlan::Aggregate(bounded.aggregate.clone());
    let batches = ctx
        .execute_logical_plan(plan)
        .await
        .expect("plan")
        .collect()
        .await
        .expect("run");
    let batch = arrow::compute::concat_batches(&batches[0].schema(), &batches).expect("concat");
    (bounded, batch)
}

fn int(batch: &RecordBatch, column: usize, row: usize) -> i64 {
    let c = cast(batch.column(column), &DataType::Int64).expect("cast");
    c.as_primitive::<Int64Type>().value(row)
}

async fn refused(sql: &str, words: &str) {
    match bound(&session(), sql).await {
        Ok(b) => panic!("should be refused: {sql}\naccepted as {b:?}"),
        Err(r) => assert!(
            r.to_string().contains(words),
            "refusal of {sql} should mention `{words}`: {r}"
        ),
    }
}

#[tokio::test]
async fn each_patient_brings_at_most_the_bound_of_rows() {
    let (bounded, batch) = run("SELECT COUNT(*) FROM sim_av_tumour").await;
    assert_eq!(bounded.max_rows, 2);
    // Patient 1's ten tumours count as two.
    assert_eq!(int(&batch, 0, 0), 4);
    assert_eq!(bounded.clamp, vec![None]);
}

#[tokio::test]
async fn sums_are_clamped_to_the_policy_bounds() {
    let (bounded, batch) = run("SELECT SUM(age), AVG(age) FROM sim_av_tumour").await;
    let range = Some(trustql_policies::Clamp {
        lower: 0.0,
        upper: 50.0,
    });
    assert_eq!(bounded.clamp, vec![range, range]);
    // Two of patient 1's tumours at 90 → 50 each, then 40 and 30.
    assert_eq!(int(&batch, 0, 0), 170);
    assert_eq!(
        batch.column(0).data_type(),
        &DataType::Int64,
        "clamping keeps the column's type, so states match the coordinator's plan"
    );
    let avg = batch.column(1).as_primitive::<Float64Type>().value(0);
    assert!((avg - 42.5).abs() < 1e-9, "avg {avg}");
}

#[tokio::test]
async fn joins_on_the_patient_key_keep_the_product_bound() {
    let (bounded, batch) = run("SELECT t.stage_best, COUNT(*) FROM sim_av_tumour t \
         JOIN sim_av_patient p ON t.patientid = p.patientid GROUP BY t.stage_best")
    .await;
    assert_eq!(
        bounded.max_rows, 2,
        "the patient table adds no rows per patient"
    );
    let stages = cast(batch.column(0), &DataType::Utf8).expect("cast");
    let stages = stages.as_string::<i32>();
    for row in 0..batch.num_rows() {
        assert_eq!(int(&batch, 1, row), 2, "stage {}", stages.value(row));
    }
    let domain = bounded.public_domain.expect("stage has a public code set");
    assert!(domain[0].contains(&"4".to_string()));
}

#[tokio::test]
async fn keys_without_a_code_set_are_not_public() {
    let (bounded, _) = run("SELECT age, COUNT(*) FROM sim_av_tumour GROUP BY age").await;
    assert!(bounded.public_domain.is_none());
}

#[tokio::test]
async fn shapes_that_would_let_one_patient_move_many_rows_are_refused() {
    refused("SELECT MIN(age) FROM sim_av_tumour", "MIN").await;
    refused(
        "SELECT SUM(chrl_tot_27_03) FROM sim_av_tumour",
        "sets no bounds",
    )
    .await;
    refused(
        "SELECT SUM(CASE WHEN age > 60 THEN 1 ELSE 0 END) FROM sim_av_tumour",
        "plain column",
    )
    .await;
    refused(
        "SELECT COUNT(*) FROM sim_av_tumour t JOIN sim_av_tumour u ON t.stage_best = u.stage_best",
        "key",
    )
    .await;
    refused(
        "SELECT stage_best, COUNT(*) FROM sim_av_tumour GROUP BY ROLLUP(stage_best)",
        "ROLLUP",
    )
    .await;
    refused("SELECT COUNT(*) FROM sim_sact_cycle", "patient key").await;
}

#[tokio::test]
async fn subqueries_are_refused() {
    let ctx = session();
    let sql = "SELECT COUNT(*) FROM sim_av_tumour WHERE stage_best IN \
               (SELECT stage_best FROM sim_av_tumour GROUP BY stage_best HAVING COUNT(*) > 5)";
    assert!(bound(&ctx, sql).await.is_err(), "{sql} must be refused");
}
