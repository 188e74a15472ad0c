//! The federation's costs, each beside its baseline in one run:
//! - `vetting`: checking one query against a policy;
//! - `node_vs_datafusion`: the node's protected partial answer vs plain DataFusion's full
//!   answer on the same Parquet (the ratio is the node's overhead);
//! - `disclosure`: disclosure control on a node's partial states;
//! - `merge`: the coordinator finishing three trusts' states;
//! - `fanout`: COUNT(*) end to end through the coordinator with 1, 4 and 16 nodes on loopback.

use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext};
use trustql_client::Client;
use trustql_demo::{DemoOptions, launch};
use trustql_merge::{Merger, SiteStates, TotalsRules};
use trustql_node::{Limits, RecordKeySecret, SiteEngine};
use trustql_policies::{
    ApprovedPolicy, PartialAnswer, StateColumn, approve, authorise, load_approved, locked_session,
    protect, vet_sql,
};
use trustql_protocol::{ColumnKind, SiteRequest};
use trustql_schemas::{TrustSchema, table_path, trust_codes};
use trustql_synth::{SynthConfig, generate};

const PATIENTS: u64 = 30_000;
const TODAY: i32 = 20_415;

const QUERIES: &[(&str, &str)] = &[
    ("count", "SELECT COUNT(*) FROM sim_av_tumour"),
    (
        "site_stage",
        "SELECT site_icd10_o2_3char, stage_best, COUNT(*), AVG(age) FROM sim_av_tumour GROUP BY 1, 2",
    ),
    (
        "join_regimen",
        "SELECT t.site_icd10_o2_3char, r.intent_of_treatment, COUNT(DISTINCT t.patientid) \
         FROM sim_av_tumour t JOIN sim_sact_regimen r ON r.encore_patient_id = t.patientid GROUP BY 1, 2",
    ),
];

struct Fixture {
    _dir: tempfile::TempDir,
    schema: TrustSchema,
    engines: Vec<SiteEngine>,
    policy: ApprovedPolicy,
    plain: SessionContext,
    locked: SessionContext,
}

fn fixture(rt: &tokio::runtime::Runtime) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let schema = TrustSchema::cancer().expect("schema");
    let fed = dir.path().join("fed");
    let config = SynthConfig {
        trusts: 3,
        patients: PATIENTS,
        seed: 7,
        ..SynthConfig::default()
    };
    generate(&schema, &config, &fed).expect("generate");
    let mut engines = Vec::new();
    let mut first_policy = None;
    for trust in trust_codes(3) {
        let path = dir.path().join(format!("{trust}.toml"));
        std::fs::write(
            &path,
            format!(
                "[policy]\nversion = \"bench\"\ntrust = \"{trust}\"\n\n[disclosure]\nmin_patients = 10\n\
                 rounding = \"base\"\nrounding_base = 5\n\n[query]\nmax_groups = 100000\n\n[[project]]\n\
                 id = \"p1\"\nresearchers = [\"alice\"]\ntables = [\"sim_av_patient\", \"sim_av_tumour\", \
                 \"sim_sact_regimen\"]\nexpires = \"2099-12-31\"\n"
            ),
        )
        .expect("policy");
        approve(&path, "Bench", &schema).expect("approve");
        let policy = load_approved(&path, &schema).expect("load");
        first_policy.get_or_insert_with(|| policy.clone());
        let engine = rt
            .block_on(async {
                SiteEngine::open(
                    &trust,
                    schema.clone(),
                    policy,
                    &fed.join(&trust),
                    &Limits::default(),
                )
                .await?
                .with_record_keys(&RecordKeySecret::ephemeral().expect("a secret"))
                .await
            })
            .expect("engine");
        engines.push(engine);
    }
    let (plain, locked) = rt.block_on(async {
        let plain = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(2));
        let locked = locked_session(
            SessionConfig::new().with_target_partitions(2),
            Arc::new(datafusion::execution::runtime_env::RuntimeEnv::default()),
            &schema,
        );
        for table in schema.tables() {
            let path = table_path(&fed.join("TQ01"), &table.name);
            let path = path.to_str().expect("utf-8");
            for ctx in [&plain, &locked] {
                ctx.register_parquet(table.name.as_str(), path, ParquetReadOptions::default())
                    .await
                    .expect("register");
            }
        }
        (plain, locked)
    });
    Fixture {
        _dir: dir,
        schema,
        engines,
        policy: first_policy.expect("a policy"),
        plain,
        locked,
    }
}

fn request(sql: &str) -> SiteRequest {
    SiteRequest {
        request_id: "bench".into(),
        researcher: "alice".into(),
        project: "p1".into(),
        sql: sql.into(),
        ..Default::default()
    }
}

/// The answer's columns described again from its metadata, as the node described them.
fn described(answer: &trustql_node::SiteAnswer) -> PartialAnswer {
    let columns = answer
        .meta
        .columns
        .iter()
        .map(|c| {
            let aggregate = c.aggregate.unwrap_or(0);
            match c.kind {
                ColumnKind::Key => StateColumn::key(&c.name),
                ColumnKind::GroupingId => StateColumn::grouping_id(&c.name),
                ColumnKind::Patients => StateColumn::patients(&c.name),
                ColumnKind::DistinctCount => StateColumn::distinct(&c.name, aggregate),
                ColumnKind::Masked => panic!("the benchmark's projects are not pooled"),
                ColumnKind::State => {
                    let function = c.name.split('(').next().unwrap_or_default();
                    let state = c.name.rsplit_once('[').map_or("", |(_, s)| s);
                    StateColumn::state(&c.name, aggregate, function, state.trim_end_matches(']'))
                }
            }
        })
        .collect();
    PartialAnswer {
        batch: answer.batch.clone(),
        columns,
        contributions: None,
    }
}

fn federation(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let fx = fixture(&rt);

    let mut group = c.benchmark_group("vetting");
    let policy = &fx.policy.policy;
    for (name, sql) in QUERIES {
        group.bench_with_input(BenchmarkId::from_parameter(name), sql, |b, sql| {
            b.iter(|| {
                rt.block_on(async {
                    let project = authorise(policy, "p1", "alice", TODAY).expect("authorised");
                    vet_sql(&fx.locked, &fx.schema, policy, project, sql)
                        .await
                        .expect("vetted")
                })
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("node_vs_datafusion");
    group.sample_size(20);
    for (name, sql) in QUERIES {
        group.bench_with_input(BenchmarkId::new("trustql_node", name), sql, |b, sql| {
            b.iter(|| {
                rt.block_on(fx.engines[0].answer(&request(sql), TODAY))
                    .expect("answer")
            })
        });
        group.bench_with_input(BenchmarkId::new("datafusion", name), sql, |b, sql| {
            b.iter(|| {
                rt.block_on(async {
                    fx.plain
                        .sql(sql)
                        .await
                        .expect("sql")
                        .collect()
                        .await
                        .expect("collect")
                })
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("disclosure");
    let sql =
        "SELECT site_icd10_o2, stage_best, gender, COUNT(*) FROM sim_av_tumour GROUP BY 1, 2, 3";
    let answer = rt
        .block_on(fx.engines[0].answer(&request(sql), TODAY))
        .expect("answer");
    let partial = described(&answer);
    let rules = trustql_policies::Disclosure {
        min_patients: 1,
        ..Default::default()
    };
    group.bench_function(BenchmarkId::new("protect", answer.batch.num_rows()), |b| {
        b.iter(|| protect(&partial, &rules, 1_000_000).expect("protect"))
    });
    group.finish();

    let mut group = c.benchmark_group("merge");
    let merger = Merger::new(&fx.schema, TotalsRules::default()).expect("merger");
    for (name, sql) in QUERIES {
        let prepared = rt.block_on(merger.prepare(sql)).expect("prepare");
        let states: Vec<_> = fx
            .engines
            .iter()
            .map(|engine| {
                let answer = rt
                    .block_on(engine.answer(&request(sql), TODAY))
                    .expect("answer");
                prepared
                    .conform(&SiteStates {
                        trust: engine.trust().to_string(),
                        batch: answer.batch,
                        meta: answer.meta,
                    })
                    .expect("conform")
            })
            .collect();
        group.bench_with_input(BenchmarkId::from_parameter(name), &states, |b, states| {
            b.iter(|| {
                rt.block_on(merger.merge(&prepared, states.clone()))
                    .expect("merge")
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("fanout");
    group.sample_size(20);
    for nodes in [1usize, 4, 16] {
        let options = DemoOptions {
            trusts: nodes,
            patients: 200 * nodes as u64,
            ..DemoOptions::default()
        };
        let federation = rt.block_on(launch(&options)).expect("launch");
        let ca = std::fs::read(&federation.info.ca).expect("ca");
        let mut client = rt
            .block_on(Client::connect(
                &federation.info.url,
                Some(&ca),
                &federation.info.token,
                None,
            ))
            .expect("connect");
        group.bench_function(BenchmarkId::new("count_star", nodes), |b| {
            b.iter(|| {
                rt.block_on(client.query("SELECT COUNT(*) FROM sim_av_patient"))
                    .expect("query")
            })
        });
        drop(federation);
    }
    group.finish();
}

criterion_group!(benches, federation);
criterion_main!(benches);
