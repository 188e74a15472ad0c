//! The node's engine over real Parquet: partial states that DataFusion's final aggregation
//! finishes into the single-process answer, and nothing row-level in what it releases.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::prelude::SessionContext;
use trustql_node::{Limits, NodeError, SiteEngine};
use trustql_policies::Rule;
use trustql_protocol::{ColumnKind, PATIENTS_COLUMN};

use common::request;

const TODAY: i32 = 20_415; // 2025-11-23

async fn engine(dir: &std::path::Path, patients: u64, disclosure: &str) -> SiteEngine {
    let fed = common::synth(dir, patients);
    let (_, policy) = common::policy(dir, disclosure);
    common::open_engine(dir, &fed, policy, false).await
}

/// A plain DataFusion session over the same files.
async fn plain(dir: &std::path::Path) -> SessionContext {
    common::plain_session(&dir.join("fed/TQ01")).await
}

/// Ground truth: `sql` run by plain DataFusion over the trust's files, as one batch.
async fn truth(ctx: &SessionContext, sql: &str) -> RecordBatch {
    let batches = ctx
        .sql(sql)
        .await
        .expect("sql")
        .collect()
        .await
        .expect("collect");
    concat_batches(&batches[0].schema(), &batches).expect("concat")
}

/// Finishes the node's states with DataFusion's own Final aggregation of the same query.
async fn finish(ctx: &SessionContext, sql: &str, states: RecordBatch) -> RecordBatch {
    let state = datafusion::execution::SessionStateBuilder::new_from_existing(ctx.state())
        .with_physical_optimizer_rules(
            datafusion::physical_optimizer::optimizer::PhysicalOptimizer::new()
                .rules
                .into_iter()
                .filter(|r| r.name() != "CombinePartialFinalAggregate")
                .collect(),
        )
        .build();
    let plan = state.create_logical_plan(sql).await.expect("plan");
    let physical = state.create_physical_plan(&plan).await.expect("physical");
    let mut node: Arc<dyn ExecutionPlan> = physical;
    let final_agg = loop {
        if let Some(agg) = node.downcast_ref::<AggregateExec>()
            && matches!(
                agg.mode(),
                AggregateMode::Final | AggregateMode::FinalPartitioned
            )
        {
            break agg.clone();
        }
        node = Arc::clone(node.children()[0]);
    };
    let received = states
        .project(&(0..states.num_columns() - 1).collect::<Vec<_>>())
        .expect("drop patients");
    let source =
        MemorySourceConfig::try_new_exec(&[vec![received.clone()]], received.schema(), None)
            .expect("memory source");
    let merged = AggregateExec::try_new(
        AggregateMode::Final,
        Arc::new(final_agg.group_expr().clone()),
        final_agg.aggr_expr().to_vec(),
        vec![None; final_agg.aggr_expr().len()],
        source,
        final_agg.input_schema(),
    )
    .expect("final");
    let batches = datafusion::physical_plan::collect(Arc::new(merged), state.task_ctx())
        .await
        .expect("collect");
    concat_batches(&batches[0].schema(), &batches).expect("concat")
}

fn rows_as_text(batch: &RecordBatch) -> Vec<String> {
    // Each column rendered once (floats to 6 places, so merge order cannot matter).
    let columns: Vec<Vec<String>> = batch
        .columns()
        .iter()
        .map(|col| match col.data_type() {
            DataType::Float64 => col
                .as_primitive::<Float64Type>()
                .iter()
                .map(|v| v.map_or("null".into(), |v| format!("{v:.6}")))
                .collect(),
            _ => {
                let text = cast(col, &DataType::Utf8).expect("cast");
                text.as_string::<i32>()
                    .iter()
                    .map(|v| v.unwrap_or("null").to_string())
                    .collect()
            }
        })
        .collect();
    let mut rows: Vec<String> = (0..batch.num_rows())
        .map(|r| {
            columns
                .iter()
                .map(|c| c[r].as_str())
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect();
    rows.sort();
    rows
}

#[tokio::test]
async fn partial_states_finished_by_datafusion_equal_the_single_process_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(dir.path(), 4_000, common::UNPROTECTED_EXTREMES).await;
    let ctx = plain(dir.path()).await;
    for sql in [
        "SELECT site_icd10_o2_3char, COUNT(*), SUM(age), AVG(age), VAR(age), STDDEV(age), MIN(chrl_tot_27_03), MAX(chrl_tot_27_03) FROM sim_av_tumour GROUP BY site_icd10_o2_3char",
        "SELECT p.gender, t.stage_best, COUNT(*), AVG(t.age) FROM sim_av_patient p JOIN sim_av_tumour t ON p.patientid = t.patientid GROUP BY p.gender, t.stage_best",
        "SELECT intent_of_treatment, COUNT(*), AVG(weight_at_start_of_regimen) FROM sim_sact_regimen GROUP BY 1",
        "SELECT COUNT(*), AVG(age) FROM sim_av_tumour WHERE age >= 50",
        "SELECT site_icd10_o2_3char, stage_best, COUNT(*), AVG(age) FROM sim_av_tumour GROUP BY ROLLUP(site_icd10_o2_3char, stage_best)",
    ] {
        let answer = engine
            .answer(&request(sql), TODAY)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let finished = finish(&ctx, sql, answer.batch.clone()).await;
        // The final aggregate still carries the grouping id that the query's projection drops.
        let finished = match finished.schema().index_of("__grouping_id") {
            Ok(gid) => finished
                .project(
                    &(0..finished.num_columns())
                        .filter(|c| *c != gid)
                        .collect::<Vec<_>>(),
                )
                .expect("project"),
            Err(_) => finished,
        };
        let direct = ctx
            .sql(sql)
            .await
            .expect("sql")
            .collect()
            .await
            .expect("collect");
        let direct = concat_batches(&direct[0].schema(), &direct).expect("concat");
        assert_eq!(rows_as_text(&finished), rows_as_text(&direct), "{sql}");
        assert_eq!(answer.withheld.small, 0);
        assert_eq!(answer.meta.released, direct.num_rows());
    }
}

#[tokio::test]
async fn released_answers_hold_no_identifiers_and_no_value_lists() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(dir.path(), 3_000, common::UNPROTECTED).await;
    let ctx = plain(dir.path()).await;
    let ids: HashSet<i64> = {
        let batches = ctx
            .sql("SELECT patientid FROM sim_av_tumour UNION ALL SELECT linknumber FROM sim_av_patient")
            .await
            .expect("sql")
            .collect()
            .await
            .expect("collect");
        batches
            .iter()
            .flat_map(|b| {
                b.column(0)
                    .as_primitive::<Int64Type>()
                    .iter()
                    .flatten()
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let answer = engine
        .answer(&request("SELECT stage_best, COUNT(DISTINCT patientid), COUNT(patientid) FROM sim_av_tumour GROUP BY stage_best"), TODAY)
        .await
        .expect("answer");
    let batch = &answer.batch;
    for (i, field) in batch.schema().fields().iter().enumerate() {
        assert!(
            !matches!(
                field.data_type(),
                DataType::List(_) | DataType::LargeList(_)
            ),
            "list column {}",
            field.name()
        );
        if let Some(ints) = batch.column(i).as_primitive_opt::<Int64Type>() {
            for v in ints.iter().flatten() {
                assert!(!ids.contains(&v), "an identifier value left the node");
            }
        }
    }
    let kinds: Vec<ColumnKind> = answer.meta.columns.iter().map(|c| c.kind).collect();
    assert!(kinds.contains(&ColumnKind::DistinctCount));
    assert_eq!(kinds.last(), Some(&ColumnKind::Patients));
    assert_eq!(
        batch.schema().field(batch.num_columns() - 1).name(),
        PATIENTS_COLUMN
    );
}

#[tokio::test]
async fn nearly_distinct_groups_still_give_one_row_per_group() {
    // Enough rows for DataFusion's skip-partial probe (100,000) with groups nearly all distinct:
    // a partial aggregate that skipped would emit one state row per record.
    let dir = tempfile::tempdir().expect("tempdir");
    let disclosure = format!("{}\n\n[query]\nmax_groups = 1000000", common::UNPROTECTED);
    let engine = engine(dir.path(), 110_000, &disclosure).await;
    let ctx = plain(dir.path()).await;
    let sql = "SELECT diagnosisdatebest, age, site_icd10_o2, gender, COUNT(*) FROM sim_av_tumour GROUP BY 1, 2, 3, 4";
    let scalar = |batches: Vec<RecordBatch>| {
        batches[0].column(0).as_primitive::<Int64Type>().value(0) as usize
    };
    let groups = scalar(
        ctx.sql(&format!("SELECT COUNT(*) FROM ({sql}) g"))
            .await
            .expect("sql")
            .collect()
            .await
            .expect("c"),
    );
    let rows = scalar(
        ctx.sql("SELECT COUNT(*) FROM sim_av_tumour")
            .await
            .expect("sql")
            .collect()
            .await
            .expect("c"),
    );
    assert!(
        rows > 100_000 && groups as f64 / rows as f64 > 0.8,
        "{groups} groups over {rows} rows"
    );

    let answer = engine.answer(&request(sql), TODAY).await.expect("answer");
    assert_eq!(
        answer.batch.num_rows(),
        groups,
        "one row per group, not per record"
    );
    let keys = answer.batch.project(&[0, 1, 2, 3]).expect("keys");
    let distinct: HashSet<String> = rows_as_text(&keys).into_iter().collect();
    assert_eq!(distinct.len(), groups, "no group appears twice");
}

#[tokio::test]
async fn the_group_cap_refuses_huge_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disclosure = format!("{}\n\n[query]\nmax_groups = 50", common::UNPROTECTED);
    let engine = engine(dir.path(), 2_000, &disclosure).await;
    match engine
        .answer(
            &request("SELECT diagnosisdatebest, COUNT(*) FROM sim_av_tumour GROUP BY 1"),
            TODAY,
        )
        .await
    {
        Err(NodeError::Refused(r)) => assert_eq!(r.rule, Rule::TooManyGroups),
        other => panic!("expected the group cap, got {other:?}"),
    }
}

#[tokio::test]
async fn refusals_and_bad_set_ups_are_clear() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(dir.path(), 500, "min_patients = 10").await;
    let mut req = request("SELECT COUNT(*) FROM sim_av_tumour");
    req.project = "unknown".into();
    match engine.answer(&req, TODAY).await {
        Err(NodeError::Refused(r)) => assert_eq!(r.rule, Rule::Project),
        other => panic!("{other:?}"),
    }
    match engine
        .answer(&request("SELECT patientid FROM sim_av_tumour"), TODAY)
        .await
    {
        Err(NodeError::Refused(r)) => assert_eq!(r.rule, Rule::NotAggregate),
        other => panic!("{other:?}"),
    }

    // Bad data: the node will not start.
    let broken = dir.path().join("fed/TQ01/sim_av_tumour.parquet");
    std::fs::write(&broken, "not parquet").expect("corrupt");
    let (_, policy) = common::policy(dir.path(), "min_patients = 10");
    let err = SiteEngine::open(
        "TQ01",
        common::schema(),
        policy.clone(),
        &dir.path().join("fed/TQ01"),
        &Limits::default(),
    )
    .await
    .err()
    .expect("bad data refused");
    assert!(matches!(err, NodeError::BadData { .. }), "{err}");
    assert!(err.to_string().contains("sim_av_tumour"), "{err}");

    // A policy for another trust is refused.
    let err = SiteEngine::open(
        "TQ02",
        common::schema(),
        policy,
        &dir.path().join("fed/TQ01"),
        &Limits::default(),
    )
    .await
    .err()
    .expect("wrong trust");
    assert!(
        matches!(err, NodeError::BadData { .. } | NodeError::Config(_)),
        "{err}"
    );
}

#[tokio::test]
async fn small_groups_are_withheld_and_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(
        dir.path(),
        2_000,
        "min_patients = 10\nrounding = \"base\"\nrounding_base = 5",
    )
    .await;
    let answer = engine
        .answer(
            &request("SELECT site_icd10_o2_3char, COUNT(*) FROM sim_av_tumour GROUP BY 1"),
            TODAY,
        )
        .await
        .expect("answer");
    assert!(answer.withheld.small > 0, "rare sites are withheld");
    assert!(answer.meta.released > 0);
    let counts = answer.batch.column(1).as_primitive::<Int64Type>();
    assert!(
        counts.iter().flatten().all(|c| c % 5 == 0),
        "counts rounded to 5"
    );
    let patients = answer.batch.column(2).as_primitive::<Int64Type>();
    assert!(patients.iter().flatten().all(|p| p >= 10));
}

#[tokio::test]
async fn rollup_subtotals_of_withheld_cells_are_withheld_at_the_node() {
    // Pins DataFusion's grouping-id bits to what disclosure control assumes: a site subtotal
    // is released only when every stage cell under it is.
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(
        dir.path(),
        3_000,
        "min_patients = 10\nrounding = \"none\"\nwithhold_whole_margin_cells = false",
    )
    .await;
    let ctx = plain(dir.path()).await;
    let cells = ctx
        .sql("SELECT site_icd10_o2_3char, COUNT(*) FROM (SELECT site_icd10_o2_3char, stage_best, COUNT(DISTINCT patientid) AS n FROM sim_av_tumour WHERE stage_best IN ('1', '2', '3', '4') GROUP BY 1, 2) WHERE n < 10 GROUP BY 1")
        .await
        .expect("sql")
        .collect()
        .await
        .expect("collect");
    let sites_with_small_cells: HashSet<String> = cells
        .iter()
        .flat_map(|b| {
            let sites = cast(b.column(0), &DataType::Utf8).expect("cast");
            sites
                .as_string::<i32>()
                .iter()
                .flatten()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        !sites_with_small_cells.is_empty(),
        "the data must have small cells for this test"
    );

    let sql = "SELECT site_icd10_o2_3char, stage_best, COUNT(*) FROM sim_av_tumour \
               WHERE stage_best IN ('1', '2', '3', '4') GROUP BY ROLLUP(site_icd10_o2_3char, stage_best)";
    let answer = engine.answer(&request(sql), TODAY).await.expect("answer");
    let kinds: Vec<ColumnKind> = answer.meta.columns.iter().map(|c| c.kind).collect();
    let gid = kinds
        .iter()
        .position(|k| *k == ColumnKind::GroupingId)
        .expect("grouping id column");
    let gids = cast(answer.batch.column(gid), &DataType::Int64).expect("cast");
    let gids = gids.as_primitive::<Int64Type>();
    let sites = cast(answer.batch.column(0), &DataType::Utf8).expect("cast");
    let sites = sites.as_string::<i32>();
    let mut subtotals = 0;
    let mut grand_total = false;
    for row in 0..answer.batch.num_rows() {
        match gids.value(row) {
            0 => {}
            // Stage (the last key) rolled up: a site subtotal.
            1 => {
                subtotals += 1;
                let site = sites.value(row);
                assert!(
                    !sites_with_small_cells.contains(site),
                    "the subtotal of a withheld cell was released"
                );
            }
            3 => grand_total = true,
            other => panic!("unexpected grouping id {other}"),
        }
    }
    assert!(
        subtotals > 0,
        "sites whose cells are all large keep their subtotal"
    );
    assert!(
        !grand_total,
        "the grand total is the margin of withheld cells too"
    );
    assert!(answer.withheld.small > 0 && answer.withheld.margin_of_withheld > 0);
}

#[tokio::test]
async fn rounding_rounds_every_count_a_state_carries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(
        dir.path(),
        3_000,
        "min_patients = 10\nrounding = \"base\"\nrounding_base = 5\nwithhold_whole_margin_cells = false",
    )
    .await;
    let ctx = plain(dir.path()).await;
    // AVG's count is rounded too: an exact one beside SUM would give the exact count that the
    // rounded COUNT hides (SUM / AVG).
    let sql = "SELECT site_icd10_o2_3char, COUNT(*), AVG(age), SUM(age) FROM sim_av_tumour GROUP BY site_icd10_o2_3char";
    let answer = engine.answer(&request(sql), TODAY).await.expect("answer");
    assert!(answer.meta.released > 3);
    let finished = finish(&ctx, sql, answer.batch.clone()).await;
    let exact = truth(&ctx, sql).await;
    let exact: std::collections::HashMap<String, (i64, f64)> = rows_as_text(&exact)
        .into_iter()
        .map(|row| {
            let parts: Vec<&str> = row.split('|').collect();
            (
                parts[0].to_string(),
                (
                    parts[1].parse().expect("count"),
                    parts[2].parse().expect("avg"),
                ),
            )
        })
        .collect();
    let mut biased = 0;
    for row in rows_as_text(&finished) {
        let parts: Vec<&str> = row.split('|').collect();
        let (count, mean, sum): (i64, f64, f64) = (
            parts[1].parse().expect("count"),
            parts[2].parse().expect("avg"),
            parts[3].parse().expect("sum"),
        );
        let (exact_count, exact_mean) = exact[parts[0]];
        assert_eq!(count % 5, 0, "counts are rounded to 5: {row}");
        assert!((count - exact_count).abs() <= 2, "{row}");
        // SUM / AVG is AVG's count (the mean is printed to 6 places): rounded as well.
        let recovered = sum / mean;
        assert!(
            (recovered - recovered.round()).abs() < 1e-3 && recovered.round() as i64 % 5 == 0,
            "AVG's count is rounded: {row}"
        );
        // The mean divides the exact sum by the rounded count: off by at most 2 in n.
        let n = exact_count as f64;
        assert!(
            (mean - exact_mean).abs() <= exact_mean * 2.0 / (n - 2.0) + 1e-9,
            "{row} vs {exact_mean}"
        );
        if (mean - exact_mean).abs() > 1e-9 {
            biased += 1;
        }
    }
    assert!(biased > 0, "some group's count was not a multiple of 5");
}

#[tokio::test]
async fn each_aggregate_reads_at_least_the_minimum_of_patients() {
    // A group of many patients where only a few have a value: COUNT(col), SUM, AVG of that
    // column describe the few, so the minimum applies to the patients each aggregate reads.
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(
        dir.path(),
        3_000,
        "min_patients = 10\nrounding = \"none\"\nwithhold_whole_margin_cells = false",
    )
    .await;
    let ctx = plain(dir.path()).await;
    let readers_sql = "SELECT site_icd10_o2_3char, stage_best, COUNT(DISTINCT patientid), \
        COUNT(DISTINCT CASE WHEN date_first_surgery IS NOT NULL THEN patientid END) \
        FROM sim_av_tumour GROUP BY 1, 2";
    let readers: std::collections::HashMap<String, (i64, i64)> =
        rows_as_text(&truth(&ctx, readers_sql).await)
            .into_iter()
            .map(|row| {
                let parts: Vec<&str> = row.split('|').collect();
                (
                    format!("{}|{}", parts[0], parts[1]),
                    (parts[2].parse().expect("p"), parts[3].parse().expect("q")),
                )
            })
            .collect();
    let targets: Vec<&String> = readers
        .iter()
        .filter(|(_, (p, q))| *p >= 10 && (1..10).contains(q))
        .map(|(k, _)| k)
        .collect();
    assert!(!targets.is_empty(), "the data has no group to attack");

    let sql = "SELECT site_icd10_o2_3char, stage_best, COUNT(*), COUNT(date_first_surgery) \
               FROM sim_av_tumour GROUP BY 1, 2";
    let answer = engine.answer(&request(sql), TODAY).await.expect("answer");
    let released = rows_as_text(&finish(&ctx, sql, answer.batch.clone()).await);
    assert!(!released.is_empty());
    for row in &released {
        let parts: Vec<&str> = row.split('|').collect();
        let key = format!("{}|{}", parts[0], parts[1]);
        let (p, q) = readers[&key];
        assert!(p >= 10 && q >= 10, "released over too few patients: {row}");
    }
    assert!(answer.withheld.small >= targets.len());
    // Only the group's own patients stay in the answer: no per-aggregate count leaves.
    assert_eq!(
        answer
            .meta
            .columns
            .iter()
            .filter(|c| c.kind == ColumnKind::Patients)
            .count(),
        1
    );
    assert_eq!(answer.batch.num_columns(), answer.meta.columns.len());
}

#[tokio::test]
async fn dominated_sums_are_withheld_by_the_largest_contributions() {
    // Dominance (n = 1, k = 60%): a group is withheld when one patient gives more than 60%
    // of its sum. The oracle recomputes each group's per-patient contributions directly.
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(
        dir.path(),
        3_000,
        "min_patients = 1\nrounding = \"none\"\nwithhold_whole_margin_cells = false\ndominance = { n = 1, k = 60.0 }",
    )
    .await;
    let ctx = plain(dir.path()).await;
    let sql = "SELECT site_icd10_o2, SUM(age) FROM sim_av_tumour GROUP BY site_icd10_o2";
    let answer = engine.answer(&request(sql), TODAY).await.expect("answer");
    let oracle = truth(
        &ctx,
        "SELECT site_icd10_o2, CAST(MAX(s) AS DOUBLE) / SUM(s) > 0.6 AS dominated FROM \
         (SELECT site_icd10_o2, patientid, SUM(age) AS s FROM sim_av_tumour GROUP BY 1, 2) GROUP BY 1",
    )
    .await;
    let dominated: HashSet<String> = rows_as_text(&oracle)
        .into_iter()
        .filter_map(|row| row.strip_suffix("|true").map(str::to_string))
        .collect();
    assert!(
        !dominated.is_empty(),
        "the data must have dominated groups for this test"
    );
    assert_eq!(answer.withheld.dominated, dominated.len());
    let released: HashSet<String> = rows_as_text(&answer.batch.project(&[0]).expect("keys"))
        .into_iter()
        .collect();
    assert!(
        released.is_disjoint(&dominated),
        "a dominated group was released"
    );
    assert_eq!(released.len() + dominated.len(), oracle.num_rows());
    assert!(
        answer
            .batch
            .schema()
            .fields()
            .iter()
            .all(|f| !f.name().starts_with("__trustql_top")),
        "the largest contributions never leave the node"
    );
    // Without groups (once a panic): the same rule on the one total, SUM and AVG alike.
    let site = |dominated: bool| {
        rows_as_text(&oracle)
            .into_iter()
            .find(|row| row.ends_with(if dominated { "|true" } else { "|false" }))
            .and_then(|row| row.split('|').next().map(str::to_string))
            .expect("a site")
    };
    for (dominated, released) in [(true, 0), (false, 1)] {
        let sql = format!(
            "SELECT SUM(age), AVG(age) FROM sim_av_tumour WHERE site_icd10_o2 = '{}'",
            site(dominated)
        );
        let answer = engine.answer(&request(&sql), TODAY).await.expect("answer");
        assert_eq!(answer.meta.released, released, "{sql}");
        assert_eq!(answer.withheld.dominated, 1 - released, "{sql}");
    }
}

/// Each released row of a one-COUNT(*) answer as its keys and grouping id ("a|b|gid"), with
/// its count and patients; fails if a (keys, grouping id) group appears twice.
fn groups_of(answer: &trustql_node::SiteAnswer) -> BTreeMap<String, (i64, i64)> {
    let batch = &answer.batch;
    let column = |kind: ColumnKind| {
        answer
            .meta
            .columns
            .iter()
            .position(|c| c.kind == kind)
            .unwrap_or_else(|| panic!("no {kind:?} column"))
    };
    let keys: Vec<usize> = (0..answer.meta.columns.len())
        .filter(|c| answer.meta.columns[*c].kind == ColumnKind::Key)
        .chain([column(ColumnKind::GroupingId)])
        .collect();
    let text = rows_in_order(&batch.project(&keys).expect("keys"));
    let count = cast(batch.column(column(ColumnKind::State)), &DataType::Int64).expect("cast");
    let patients =
        cast(batch.column(column(ColumnKind::Patients)), &DataType::Int64).expect("cast");
    let (count, patients) = (
        count.as_primitive::<Int64Type>(),
        patients.as_primitive::<Int64Type>(),
    );
    let mut groups = BTreeMap::new();
    for (row, key) in text.into_iter().enumerate() {
        let before = groups.insert(key.clone(), (count.value(row), patients.value(row)));
        assert!(before.is_none(), "group {key} appears twice");
    }
    groups
}

/// The same as [`groups_of`] from ground truth whose columns are the keys, the grouping id,
/// the count and the distinct patients.
fn truth_groups(batch: &RecordBatch) -> BTreeMap<String, (i64, i64)> {
    let n = batch.num_columns();
    let text = rows_in_order(
        &batch
            .project(&(0..n - 2).collect::<Vec<_>>())
            .expect("keys"),
    );
    let count = cast(batch.column(n - 2), &DataType::Int64).expect("cast");
    let patients = cast(batch.column(n - 1), &DataType::Int64).expect("cast");
    let (count, patients) = (
        count.as_primitive::<Int64Type>(),
        patients.as_primitive::<Int64Type>(),
    );
    text.into_iter()
        .enumerate()
        .map(|(row, key)| (key, (count.value(row), patients.value(row))))
        .collect()
}

/// Each row as text, in the batch's order.
fn rows_in_order(batch: &RecordBatch) -> Vec<String> {
    let columns: Vec<ArrayRef> = batch
        .columns()
        .iter()
        .map(|c| cast(c, &DataType::Utf8).expect("cast"))
        .collect();
    (0..batch.num_rows())
        .map(|r| {
            columns
                .iter()
                .map(|c| {
                    c.as_string::<i32>()
                        .iter()
                        .nth(r)
                        .flatten()
                        .unwrap_or("null")
                })
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect()
}

/// A site of the joined patients and tumours with at least 30 patients and a stage cell of
/// fewer than 10: its ROLLUP by site and stage has released and withheld groups.
async fn site_with_small_stages(ctx: &SessionContext) -> String {
    let sites = truth(
        ctx,
        "SELECT site FROM (SELECT t.site_icd10_o2_3char AS site, t.stage_best, \
         COUNT(DISTINCT t.patientid) AS n FROM sim_av_patient p JOIN sim_av_tumour t \
         ON p.patientid = t.patientid GROUP BY 1, 2) c GROUP BY site \
         HAVING SUM(n) >= 30 AND MIN(n) < 10 ORDER BY SUM(n) DESC LIMIT 1",
    )
    .await;
    let site = cast(sites.column(0), &DataType::Utf8).expect("cast");
    site.as_string::<i32>()
        .iter()
        .next()
        .flatten()
        .expect("the data must have such a site")
        .to_string()
}

/// ROLLUPs whose WHERE fixes a key, each with its ground truth over the trust's files (keys,
/// grouping id, count, distinct patients).
fn fixed_key_rollups(site: &str) -> Vec<(String, String)> {
    let join = "FROM sim_av_patient p JOIN sim_av_tumour t ON p.patientid = t.patientid";
    vec![
        (
            "SELECT gender, COUNT(*) FROM sim_av_patient WHERE gender = '1' GROUP BY ROLLUP(gender)"
                .into(),
            "SELECT gender, GROUPING(gender), COUNT(*), COUNT(DISTINCT patientid) \
             FROM sim_av_patient WHERE gender = '1' GROUP BY ROLLUP(gender)"
                .into(),
        ),
        (
            format!("SELECT p.gender, COUNT(*) {join} WHERE p.gender = '1' GROUP BY ROLLUP(p.gender)"),
            format!(
                "SELECT p.gender, GROUPING(p.gender), COUNT(*), COUNT(DISTINCT p.patientid) \
                 {join} WHERE p.gender = '1' GROUP BY ROLLUP(p.gender)"
            ),
        ),
        (
            format!(
                "SELECT t.site_icd10_o2_3char, t.stage_best, COUNT(*) {join} \
                 WHERE t.site_icd10_o2_3char = '{site}' \
                 GROUP BY ROLLUP(t.site_icd10_o2_3char, t.stage_best)"
            ),
            format!(
                "SELECT t.site_icd10_o2_3char, t.stage_best, \
                 GROUPING(t.site_icd10_o2_3char, t.stage_best), COUNT(*), \
                 COUNT(DISTINCT p.patientid) {join} WHERE t.site_icd10_o2_3char = '{site}' \
                 GROUP BY ROLLUP(t.site_icd10_o2_3char, t.stage_best)"
            ),
        ),
    ]
}

#[tokio::test]
async fn a_rollup_whose_filter_fixes_a_key_has_one_row_per_group() {
    // The filter makes the key look constant to DataFusion, which the rolled-up rows (NULL
    // there) are not: trusted, the reduce emitted the grand total once per partition.
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(dir.path(), 3_000, common::UNPROTECTED).await;
    let ctx = plain(dir.path()).await;
    let site = site_with_small_stages(&ctx).await;
    for (sql, truth_sql) in fixed_key_rollups(&site) {
        let plan = engine
            .explain(&request(&sql), TODAY)
            .await
            .expect("explain");
        assert!(
            !plan.contains("ordering_mode"),
            "the reduce must hash every group:\n{plan}"
        );
        let answer = engine.answer(&request(&sql), TODAY).await.expect("answer");
        let expected = truth_groups(&truth(&ctx, &truth_sql).await);
        assert!(expected.len() >= 2, "{sql}: a detail row and a total");
        assert_eq!(groups_of(&answer), expected, "{sql}");
        assert_eq!(answer.meta.released, expected.len(), "{sql}");
        assert_eq!(answer.withheld.small, 0, "{sql}");
    }
}

#[tokio::test]
async fn a_rollup_whose_filter_fixes_a_key_withholds_each_group_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(
        dir.path(),
        3_000,
        "min_patients = 10\nrounding = \"none\"\nwithhold_whole_margin_cells = false",
    )
    .await;
    let ctx = plain(dir.path()).await;
    let site = site_with_small_stages(&ctx).await;
    for (sql, truth_sql) in fixed_key_rollups(&site) {
        let answer = engine.answer(&request(&sql), TODAY).await.expect("answer");
        let expected = truth_groups(&truth(&ctx, &truth_sql).await);
        let small = expected.values().filter(|(_, n)| *n < 10).count();
        let released = groups_of(&answer);
        let w = &answer.withheld;
        let withheld = w.small + w.dominated + w.whole_margin + w.margin_of_withheld;
        assert_eq!(released.len() + withheld, expected.len(), "{sql}: {w:?}");
        assert_eq!(answer.meta.released, released.len(), "{sql}");
        assert_eq!(w.small, small, "{sql}");
        for (group, value) in &released {
            assert_eq!(expected.get(group), Some(value), "{sql}: {group}");
        }
    }
    // The site's ROLLUP has a small stage cell, whose subtotal and total are withheld too.
    let (sql, _) = &fixed_key_rollups(&site)[2];
    let answer = engine.answer(&request(sql), TODAY).await.expect("answer");
    assert!(answer.withheld.small > 0 && answer.withheld.margin_of_withheld == 2);
    assert!(answer.meta.released > 0);
}
