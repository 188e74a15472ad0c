//! Oracle: three trusts' unprotected partial states, finished at the coordinator, equal
//! DataFusion run in one process over the union of the trusts' Parquet.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::compute::concat_batches;
use datafusion::prelude::SessionContext;
use trustql_merge::{MergeError, Merger, SiteStates, TotalsRules};
use trustql_node::{Limits, SiteEngine};
use trustql_policies::{approve, load_approved};
use trustql_protocol::SiteRequest;
use trustql_schemas::{TrustSchema, trust_codes};
use trustql_synth::{SynthConfig, generate};
use trustql_testkit::oracle::{self, PANEL, assert_same};

const TODAY: i32 = 20_415;

struct Federation {
    _dir: tempfile::TempDir,
    engines: Vec<SiteEngine>,
    union: SessionContext,
    merger: Merger,
}

async fn federation() -> Federation {
    let dir = tempfile::tempdir().expect("tempdir");
    let schema = TrustSchema::cancer().expect("schema");
    let fed = dir.path().join("fed");
    let config = SynthConfig {
        trusts: 3,
        patients: 3_000,
        seed: 21,
        ..SynthConfig::default()
    };
    generate(&schema, &config, &fed).expect("generate");
    let mut engines = Vec::new();
    for trust in trust_codes(3) {
        let path = dir.path().join(format!("{trust}.toml"));
        std::fs::write(
            &path,
            format!(
                "[policy]\nversion = \"oracle\"\ntrust = \"{trust}\"\n\n[disclosure]\nmin_patients = 1\n\
                 rounding = \"none\"\nwithhold_whole_margin_cells = false\n\n\
                 [classes.clinical]\ngroup_by = true\nfilter = true\naggregate = true\nmin_max = true\n\n\
                 [query]\nmax_groups = 100000\n\n\
                 [[project]]\nid = \"p1\"\nresearchers = [\"alice\"]\ntables = [\"sim_av_patient\", \
                 \"sim_av_tumour\", \"sim_sact_regimen\", \"sim_rtds_episode\", \"sim_rtds_prescription\"]\n\
                 expires = \"2099-12-31\"\n"
            ),
        )
        .expect("policy");
        approve(&path, "Oracle", &schema).expect("approve");
        let policy = load_approved(&path, &schema).expect("load");
        engines.push(
            SiteEngine::open(
                &trust,
                schema.clone(),
                policy,
                &fed.join(&trust),
                &Limits::default(),
            )
            .await
            .expect("engine"),
        );
    }
    let union = oracle::union(&fed, &trust_codes(3)).await;
    Federation {
        _dir: dir,
        engines,
        union,
        merger: Merger::new(&schema, TotalsRules::default()).expect("merger"),
    }
}

async fn federated(fed: &Federation, sql: &str) -> Result<RecordBatch, MergeError> {
    federated_with(fed, &fed.merger, sql).await
}

async fn federated_with(
    fed: &Federation,
    merger: &Merger,
    sql: &str,
) -> Result<RecordBatch, MergeError> {
    let prepared = merger.prepare(sql).await?;
    let request = SiteRequest {
        request_id: "oracle".into(),
        researcher: "alice".into(),
        project: "p1".into(),
        sql: sql.into(),
        ..Default::default()
    };
    let mut states = Vec::new();
    for engine in &fed.engines {
        let answer = engine
            .answer(&request, TODAY)
            .await
            .unwrap_or_else(|e| panic!("{}: {sql}: {e}", engine.trust()));
        states.push(prepared.conform(&SiteStates {
            trust: engine.trust().to_string(),
            batch: answer.batch,
            meta: answer.meta,
        })?);
    }
    let batches = merger.merge(&prepared, states).await?;
    Ok(concat_batches(&prepared.schema(), &batches).expect("concat"))
}

#[tokio::test]
async fn the_panel_through_the_merge_equals_one_process_over_the_union() {
    let fed = federation().await;
    assert!(PANEL.len() >= 30);
    for sql in PANEL {
        let got = federated(&fed, sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let want = fed
            .union
            .sql(sql)
            .await
            .expect("sql")
            .collect()
            .await
            .expect("collect");
        let want = concat_batches(&Arc::clone(&got.schema()), &want)
            .or_else(|_| {
                let schema = want.first().map(|b| b.schema()).expect("a batch");
                concat_batches(&schema, &want)
            })
            .expect("concat");
        // Only a query with ORDER BY promises an order, and a LIMIT needs a total order.
        assert_same(sql, &got, &want, sql.contains("ORDER BY"));
    }
}

#[tokio::test]
async fn what_can_never_be_answered_is_refused_before_any_node_is_asked() {
    let fed = federation().await;
    for sql in [
        "DROP TABLE sim_av_patient",
        "SELECT gender FROM sim_av_patient",
        "SELECT COUNT(*) FROM no_such_table",
        "SELEC nonsense",
        "EXPLAIN SELECT COUNT(*) FROM sim_av_patient",
    ] {
        match fed.merger.prepare(sql).await {
            Err(MergeError::Refused(_)) => {}
            other => panic!("{sql}: expected a refusal, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn an_answer_of_the_wrong_shape_is_named_not_merged() {
    let fed = federation().await;
    let prepared = fed
        .merger
        .prepare("SELECT gender, AVG(age) FROM sim_av_tumour GROUP BY gender")
        .await
        .expect("prepare");
    let other = fed.engines[0]
        .answer(
            &SiteRequest {
                request_id: "x".into(),
                researcher: "alice".into(),
                project: "p1".into(),
                sql: "SELECT gender, COUNT(*) FROM sim_av_tumour GROUP BY gender".into(),
                ..Default::default()
            },
            TODAY,
        )
        .await
        .expect("answer");
    let err = prepared
        .conform(&SiteStates {
            trust: "TQ01".into(),
            batch: other.batch,
            meta: other.meta,
        })
        .expect_err("shape mismatch");
    assert!(err.to_string().contains("TQ01"), "{err}");
}

#[tokio::test]
async fn totals_rules_filter_small_totals_and_round_merged_counts() {
    let fed = federation().await;
    let rules = TotalsRules {
        min_patients: 40,
        rounding: trustql_policies::Rounding::Base,
        rounding_base: 10,
    };
    let merger = Merger::new(&TrustSchema::cancer().expect("schema"), rules).expect("merger");
    let sql = "SELECT site_icd10_o2_3char, COUNT(*) AS n, AVG(age) FROM sim_av_tumour GROUP BY 1 ORDER BY 1";
    let got = federated_with(&fed, &merger, sql).await.expect("merged");
    let want = oracle::run(
        &fed.union,
        "SELECT site_icd10_o2_3char, CAST((COUNT(*) + 5) / 10 * 10 AS BIGINT) AS n, AVG(age) FROM sim_av_tumour \
         GROUP BY 1 HAVING COUNT(DISTINCT patientid) >= 40 ORDER BY 1",
    )
    .await;
    assert!(
        want.num_rows() > 3 && want.num_rows() < 60,
        "a mix of large and small sites"
    );
    assert_same(sql, &got, &want, true);
}

/// `t.gender` and `p.gender` are both `gender` in the states; each key must come from its own
/// column. The two agree on every joined row, so only the ROLLUP level that rolls up
/// `p.gender` alone (NULL there, not `t.gender`) tells them apart.
#[tokio::test]
async fn keys_of_one_name_from_two_tables_keep_their_own_columns_through_a_rollup() {
    let fed = federation().await;
    let case = "CASE WHEN t.site_icd10_o2_3char IN ('D07', 'C93', 'C84') THEN 'A' ELSE 'other' END";
    let query = |group_by: &str| {
        format!(
            "SELECT t.gender AS k0, {case} AS k1, p.gender AS k2, STDDEV_POP(t.age) AS a0, \
             SUM(t.gleason_combined) AS a1 FROM sim_av_patient p JOIN sim_av_tumour t \
             ON p.patientid = t.patientid GROUP BY {group_by}"
        )
    };
    let sql = query(&format!("ROLLUP(t.gender, {case}, p.gender)"));
    let got = federated(&fed, &sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let want = oracle::run(&fed.union, &sql).await;
    assert!(
        want.num_rows() > 4,
        "more than the grand total and one gender"
    );
    assert_same(&sql, &got, &want, false);
    // Without the ROLLUP each key reaches the result under its own alias.
    let plain = query(&format!("t.gender, {case}, p.gender"));
    let prepared = fed.merger.prepare(&plain).await.expect("prepare");
    assert_eq!(
        prepared.key_outputs(),
        Some(&["k0".to_string(), "k1".into(), "k2".into()][..])
    );
    // The ROLLUP's aggregates are found past its three keys and its grouping id.
    let prepared = fed.merger.prepare(&sql).await.expect("prepare");
    let outputs: Vec<_> = prepared
        .aggregate_outputs()
        .iter()
        .map(|o| (o.column.as_str(), o.function.as_str()))
        .collect();
    assert_eq!(outputs, [("a0", "stddev_pop"), ("a1", "sum")]);
}

#[tokio::test]
async fn a_filter_no_row_can_pass_gives_no_groups_not_a_refusal() {
    // The optimiser proves these inputs empty; the coordinator must still plan the two-phase
    // aggregation the nodes do (a randomised-SQL failure: the merge's own rule list had kept
    // `propagate_empty_relation`), and answer as one process over the union does.
    let fed = federation().await;
    for sql in [
        "SELECT ethnicity, COUNT(*) FROM sim_av_patient WHERE deathlocationcode IN ('1', '6') \
         AND deathlocationcode IN ('2') GROUP BY ethnicity",
        "SELECT ethnicity, COUNT(*) FROM sim_av_patient WHERE gender = '1' AND gender = '2' \
         GROUP BY ethnicity HAVING COUNT(DISTINCT patientid) >= 50",
    ] {
        let got = federated(&fed, sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert_eq!(got.num_rows(), 0, "{sql}");
        let union = fed.union.sql(sql).await.expect("sql").collect().await;
        let rows: usize = union.expect("collect").iter().map(|b| b.num_rows()).sum();
        assert_eq!(rows, 0, "{sql}");
    }
}
