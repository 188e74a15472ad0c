//! Pool-then-protect at the nodes (issue 17): three trusts of one pool answer a pooled
//! project's query with masked words only; the words of every member add up to the union's
//! exact states, the words of fewer (or under a wrong pinned key, or under rules the members do
//! not share) to nothing the canary lets through.

mod common;

use std::collections::BTreeMap;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Int64Type, UInt64Type};
use datafusion::prelude::SessionContext;
use trustql_node::{NodeError, PoolConfig, PoolKeys, SiteAnswer, SiteEngine};
use trustql_policies::{
    PoolParameters, Rule, Source, approve, load_approved, release_pooled, today,
};
use trustql_pool::{Layout, PoolError};
use trustql_protocol::{ColumnKind, MASKED_COLUMN};
use trustql_synth::{SynthConfig, generate};

const TRUSTS: [&str; 3] = ["TQ01", "TQ02", "TQ03"];
const UNPROTECTED: &str = common::UNPROTECTED;

fn secret(i: usize) -> [u8; 32] {
    [i as u8 + 1; 32]
}

fn public_hex(i: usize) -> String {
    PoolKeys::new(secret(i), &PoolConfig::default())
        .expect("keys")
        .public_key()
        .to_hex()
}

/// The federation directory with three trusts.
fn synth(dir: &std::path::Path) -> std::path::PathBuf {
    let out = dir.join("fed");
    let config = SynthConfig {
        trusts: 3,
        patients: 3_000,
        seed: 17,
        shared_share: 0.0,
        ..SynthConfig::default()
    };
    generate(&common::schema(), &config, &out).expect("generate");
    out
}

/// `trust`'s engine under a policy pooling project p1 over `members`, with `disclosure`, its
/// peers pinned as `peers` gives them.
async fn member(
    dir: &std::path::Path,
    fed: &std::path::Path,
    trust: &str,
    disclosure: &str,
    members: &[&str],
    peers: impl Fn(usize) -> String,
) -> SiteEngine {
    let index = TRUSTS.iter().position(|t| *t == trust).expect("a trust");
    let path = dir.join(format!("{trust}.toml"));
    let members: Vec<String> = members.iter().map(|m| format!("\"{m}\"")).collect();
    let text = format!(
        "[policy]\nversion = \"test\"\ntrust = \"{trust}\"\n\n[disclosure]\n{disclosure}\n\n\
         [[project]]\nid = \"p1\"\nresearchers = [\"alice\"]\ntables = {}\n\
         expires = \"2099-12-31\"\npool = {{ members = [{}] }}\n",
        common::ALL_TABLES,
        members.join(", ")
    );
    std::fs::write(&path, text).expect("write policy");
    approve(&path, "Test Controller", &common::schema()).expect("approve");
    let policy = load_approved(&path, &common::schema()).expect("load");
    let config = PoolConfig {
        peers: TRUSTS
            .iter()
            .chain(std::iter::once(&"TQ04"))
            .enumerate()
            .filter(|(i, _)| *i != index)
            .map(|(i, t)| (t.to_string(), peers(i)))
            .collect(),
    };
    let engine = SiteEngine::open(
        trust,
        common::schema(),
        policy,
        &fed.join(trust),
        &trustql_node::Limits::default(),
    )
    .await
    .expect("engine opens")
    .with_record_keys(&trustql_node::RecordKeySecret::ephemeral().expect("a secret"))
    .await
    .expect("record keys")
    .with_pool_keys(PoolKeys::new(secret(index), &config).expect("keys"))
    .expect("every member pinned");
    // Every member keeps its ledger in the test's directory, by trust.
    let ledger = trustql_budget::Ledger::open(&dir.join(format!("state-{trust}/budget.ledger")))
        .expect("ledger");
    engine.with_ledger(std::sync::Arc::new(ledger))
}

async fn pool(dir: &std::path::Path, fed: &std::path::Path, disclosure: &str) -> Vec<SiteEngine> {
    let mut engines = Vec::new();
    for trust in TRUSTS {
        engines.push(member(dir, fed, trust, disclosure, &TRUSTS, public_hex).await);
    }
    engines
}

use common::request;

async fn answers(engines: &[SiteEngine], sql: &str) -> Vec<SiteAnswer> {
    let mut out = Vec::new();
    for engine in engines {
        out.push(
            engine
                .answer(&request(sql), today())
                .await
                .expect("answered"),
        );
    }
    out
}

fn words(answer: &SiteAnswer) -> Vec<u64> {
    answer
        .batch
        .column(0)
        .as_primitive::<UInt64Type>()
        .values()
        .to_vec()
}

fn unmask(answers: &[&SiteAnswer]) -> Result<Vec<u64>, PoolError> {
    let vectors: Vec<Vec<u64>> = answers.iter().map(|a| words(a)).collect();
    Layout::new(vectors[0].len() - 1)?.unmask(&vectors)
}

/// The pooled release of every member's words, by its first column's text: the columns that
/// come from `source`.
fn pooled(answers: &[SiteAnswer], source: Source) -> BTreeMap<String, Vec<i64>> {
    let refs: Vec<&SiteAnswer> = answers.iter().collect();
    let sum = unmask(&refs).expect("the masks cancel");
    let meta = answers[0].meta.pool.as_ref().expect("pooled");
    let parameters = PoolParameters::from_json(&meta.parameters).expect("parameters");
    let released = release_pooled(&parameters, &meta.layout, &sum).expect("released");
    let keep: Vec<usize> = released
        .columns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.source == source)
        .map(|(i, _)| i)
        .collect();
    assert!(
        !keep.is_empty(),
        "no {source:?} column in the pooled release"
    );
    by_key(&released.batch, &keep)
}

fn by_key(batch: &RecordBatch, columns: &[usize]) -> BTreeMap<String, Vec<i64>> {
    let keys = cast(batch.column(0), &DataType::Utf8).expect("text");
    let keys = keys.as_string::<i32>();
    let values: Vec<_> = columns
        .iter()
        .map(|&c| cast(batch.column(c), &DataType::Int64).expect("int"))
        .collect();
    (0..batch.num_rows())
        .map(|r| {
            let key = if keys.is_null(r) {
                "null".to_string()
            } else {
                keys.value(r).to_string()
            };
            (
                key,
                values
                    .iter()
                    .map(|v| v.as_primitive::<Int64Type>().value(r))
                    .collect(),
            )
        })
        .collect()
}

/// The union of the three trusts' Parquet.
async fn union(fed: &std::path::Path, sql: &str) -> BTreeMap<String, Vec<i64>> {
    let ctx = SessionContext::new();
    for table in common::schema().tables() {
        let paths: Vec<String> = TRUSTS
            .iter()
            .map(|t| {
                trustql_schemas::table_path(&fed.join(t), &table.name)
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        let frame = ctx
            .read_parquet(paths, datafusion::prelude::ParquetReadOptions::default())
            .await
            .expect("read");
        ctx.register_table(table.name.as_str(), frame.into_view())
            .expect("register");
    }
    let batches = ctx
        .sql(sql)
        .await
        .expect("plan")
        .collect()
        .await
        .expect("run");
    let batch = arrow::compute::concat_batches(&batches[0].schema(), &batches).expect("concat");
    let columns: Vec<usize> = (1..batch.num_columns()).collect();
    by_key(&batch, &columns)
}

#[tokio::test]
async fn members_send_only_masked_words_that_add_up_to_the_union() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fed = synth(dir.path());
    let engines = pool(dir.path(), &fed, UNPROTECTED).await;
    let sql = "SELECT stage_best, COUNT(*), COUNT(er_status) FROM sim_av_tumour GROUP BY 1";
    let answers = answers(&engines, sql).await;
    for answer in &answers {
        // One column of words, nothing about groups, no patient count.
        assert_eq!(answer.batch.num_columns(), 1);
        assert_eq!(answer.batch.schema().field(0).name(), MASKED_COLUMN);
        assert_eq!(answer.meta.columns.len(), 1);
        assert_eq!(answer.meta.columns[0].kind, ColumnKind::Masked);
        assert_eq!(answer.meta.released, answer.batch.num_rows());
        // Uniform words: a count would be small.
        let small = words(answer).iter().filter(|w| **w < 1 << 40).count();
        assert_eq!(small, 0, "{} small words in a masked vector", small);
    }
    let truth = union(&fed, sql).await;
    assert_eq!(pooled(&answers, Source::State), truth);
}

#[tokio::test]
async fn distinct_patients_pool_as_a_count_per_trust() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fed = synth(dir.path());
    let engines = pool(dir.path(), &fed, UNPROTECTED).await;
    let sql = "SELECT stage_best, COUNT(DISTINCT patientid) FROM sim_av_tumour GROUP BY 1";
    let answers = answers(&engines, sql).await;
    // Patient ids are local to a trust (no patient is shared here), so the pooled distinct
    // count is the union's.
    assert_eq!(
        pooled(&answers, Source::DistinctCount),
        union(&fed, sql).await
    );
}

#[tokio::test]
async fn fewer_members_a_wrong_key_or_different_rules_release_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fed = synth(dir.path());
    let sql = "SELECT stage_best, COUNT(*) FROM sim_av_tumour GROUP BY 1";
    let engines = pool(dir.path(), &fed, UNPROTECTED).await;
    let all = answers(&engines, sql).await;
    // Two of three members' words, with the coordinator: too few; one of them twice in place of
    // the third: the canary stops them.
    assert!(unmask(&[&all[0], &all[1]]).is_err());
    assert_eq!(unmask(&[&all[0], &all[1], &all[1]]), Err(PoolError::Canary));

    // TQ03 pins a wrong key for TQ01.
    let wrong = member(dir.path(), &fed, "TQ03", UNPROTECTED, &TRUSTS, |i| {
        if i == 0 { public_hex(7) } else { public_hex(i) }
    })
    .await;
    let third = wrong
        .answer(&request(sql), today())
        .await
        .expect("answered");
    assert_eq!(unmask(&[&all[0], &all[1], &third]), Err(PoolError::Canary));

    // TQ03's controller approved other rules: the pool's parameters differ, so do the masks.
    let stricter = "min_patients = 5\nrounding = \"none\"\nwithhold_whole_margin_cells = false";
    let other = member(dir.path(), &fed, "TQ03", stricter, &TRUSTS, public_hex).await;
    let third = other
        .answer(&request(sql), today())
        .await
        .expect("answered");
    assert_ne!(
        third.meta.pool.as_ref().map(|p| &p.parameters),
        all[0].meta.pool.as_ref().map(|p| &p.parameters)
    );
    assert_eq!(unmask(&[&all[0], &all[1], &third]), Err(PoolError::Canary));
}

#[tokio::test]
async fn pooled_queries_need_public_cells_and_counts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fed = synth(dir.path());
    let engines = pool(dir.path(), &fed, UNPROTECTED).await;
    for sql in [
        "SELECT stage_best, SUM(age) FROM sim_av_tumour GROUP BY 1",
        "SELECT site_icd10_o2, COUNT(*) FROM sim_av_tumour GROUP BY 1",
        "SELECT t.stage_best, p.gender, COUNT(*) FROM sim_av_tumour t JOIN sim_av_patient p \
         ON t.patientid = p.patientid GROUP BY ROLLUP(t.stage_best, p.gender)",
    ] {
        match engines[0].answer(&request(sql), today()).await {
            Err(NodeError::Refused(r)) => assert_eq!(r.rule, Rule::Pool, "{sql}: {r}"),
            other => panic!("{sql}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_member_without_every_peer_pinned_does_not_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fed = synth(dir.path());
    let path = dir.path().join("TQ01.toml");
    let text = format!(
        "[policy]\nversion = \"test\"\ntrust = \"TQ01\"\n\n[disclosure]\n{UNPROTECTED}\n\n\
         [[project]]\nid = \"p1\"\nresearchers = [\"alice\"]\ntables = {}\n\
         expires = \"2099-12-31\"\npool = {{ members = [\"TQ01\", \"TQ02\", \"TQ03\"] }}\n",
        common::ALL_TABLES
    );
    std::fs::write(&path, text).expect("write policy");
    approve(&path, "Test Controller", &common::schema()).expect("approve");
    let policy = load_approved(&path, &common::schema()).expect("load");
    let only_one = PoolConfig {
        peers: [("TQ02".to_string(), public_hex(1))].into(),
    };
    let engine = SiteEngine::open(
        "TQ01",
        common::schema(),
        policy,
        &fed.join("TQ01"),
        &trustql_node::Limits::default(),
    )
    .await
    .expect("engine opens");
    match engine.with_pool_keys(PoolKeys::new(secret(0), &only_one).expect("keys")) {
        Err(NodeError::Pool(reason)) => assert!(reason.contains("TQ03"), "{reason}"),
        other => panic!("{:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn a_question_is_contributed_to_one_member_set_only_even_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fed = synth(dir.path());
    let sql = "SELECT stage_best, COUNT(*) FROM sim_av_tumour GROUP BY 1";
    let first = member(dir.path(), &fed, "TQ01", UNPROTECTED, &TRUSTS, public_hex).await;
    first
        .answer(&request(sql), today())
        .await
        .expect("answered");
    // Asked again, for the same set: answered.
    let mut again = request(sql);
    again.request_id = "r2".into();
    first
        .answer(&again, today())
        .await
        .expect("the same set again");
    drop(first);
    // The controller changes the pool; the node restarts on the same ledger.
    let other = ["TQ01", "TQ02", "TQ04"];
    let changed = member(dir.path(), &fed, "TQ01", UNPROTECTED, &other, public_hex).await;
    let mut third = request(sql);
    third.request_id = "r3".into();
    match changed.answer(&third, today()).await {
        Err(NodeError::Refused(r)) => {
            assert_eq!(r.rule, Rule::Pool);
            assert!(r.reason.contains("TQ01, TQ02, TQ03"), "{r}");
        }
        other => panic!("{:?}", other.map(|a| a.meta)),
    }
    // Another question is free to go to the new set.
    let mut fresh = request("SELECT gender, COUNT(*) FROM sim_av_patient GROUP BY 1");
    fresh.request_id = "r4".into();
    changed
        .answer(&fresh, today())
        .await
        .expect("a new question");
}
