//! Oracle: three trusts' unprotected partial states, finished at the coordinator, equal
//! DataFusion run in one process over the union of the trusts' Parquet.

use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::{DataType, Float64Type};
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use trustql_merge::{MergeError, Merger, SiteStates};
use trustql_node::{Limits, SiteEngine};
use trustql_policies::{approve, load_approved};
use trustql_schemas::{TrustSchema, table_path, trust_codes};
use trustql_synth::{SynthConfig, generate};
use trustql_wire::SiteRequest;

const TODAY: i32 = 20_415;

/// The panel: filters, one and several keys, joins on the patient key, distinct patients,
/// SUM/AVG/VAR/STDDEV, CASE buckets, date parts, HAVING, ORDER BY … LIMIT, ROLLUP.
pub const PANEL: &[&str] = &[
    "SELECT COUNT(*) FROM sim_av_patient",
    "SELECT gender, COUNT(*) FROM sim_av_patient GROUP BY gender",
    "SELECT vitalstatus, gender, COUNT(*) FROM sim_av_patient GROUP BY vitalstatus, gender",
    "SELECT ethnicity, COUNT(*) FROM sim_av_patient WHERE gender = '2' GROUP BY ethnicity",
    "SELECT site_icd10_o2_3char, COUNT(*) FROM sim_av_tumour GROUP BY site_icd10_o2_3char",
    "SELECT site_icd10_o2_3char, stage_best, COUNT(*) FROM sim_av_tumour GROUP BY 1, 2",
    "SELECT stage_best, COUNT(*), AVG(age) FROM sim_av_tumour GROUP BY stage_best",
    "SELECT site_icd10_o2_3char, SUM(age), AVG(age), VAR(age), STDDEV(age) FROM sim_av_tumour GROUP BY 1",
    "SELECT site_icd10_o2_3char, VAR_POP(age), STDDEV_POP(age) FROM sim_av_tumour GROUP BY 1",
    "SELECT MIN(chrl_tot_27_03), MAX(chrl_tot_27_03), AVG(age) FROM sim_av_tumour",
    "SELECT COUNT(DISTINCT patientid) FROM sim_av_tumour",
    "SELECT site_icd10_o2_3char, COUNT(DISTINCT patientid), COUNT(*) FROM sim_av_tumour GROUP BY 1",
    "SELECT p.gender, t.stage_best, COUNT(*) FROM sim_av_patient p JOIN sim_av_tumour t ON p.patientid = t.patientid GROUP BY 1, 2",
    "SELECT p.vitalstatus, AVG(t.age) FROM sim_av_patient p JOIN sim_av_tumour t ON p.patientid = t.patientid GROUP BY 1",
    "SELECT r.intent_of_treatment, COUNT(*) FROM sim_sact_regimen r GROUP BY 1",
    "SELECT p.gender, r.intent_of_treatment, COUNT(DISTINCT p.patientid) FROM sim_av_patient p JOIN sim_sact_regimen r ON r.encore_patient_id = p.patientid GROUP BY 1, 2",
    "SELECT r.benchmark_group, AVG(r.weight_at_start_of_regimen), STDDEV(r.height_at_start_of_regimen) FROM sim_sact_regimen r GROUP BY 1",
    "SELECT CASE WHEN age < 50 THEN 'under 50' WHEN age < 70 THEN '50-69' ELSE '70+' END AS band, COUNT(*) FROM sim_av_tumour GROUP BY 1",
    "SELECT CASE WHEN age < 60 THEN 'young' ELSE 'old' END AS band, stage_best, AVG(age) FROM sim_av_tumour GROUP BY 1, 2",
    "SELECT date_part('year', diagnosisdatebest) AS y, COUNT(*) FROM sim_av_tumour GROUP BY 1",
    "SELECT EXTRACT(YEAR FROM diagnosisdatebest) AS y, site_icd10_o2_3char, COUNT(*) FROM sim_av_tumour GROUP BY 1, 2",
    "SELECT site_icd10_o2_3char, COUNT(*) FROM sim_av_tumour GROUP BY 1 HAVING COUNT(*) > 20",
    "SELECT site_icd10_o2_3char, AVG(age) AS a FROM sim_av_tumour GROUP BY 1 HAVING AVG(age) > 60",
    "SELECT site_icd10_o2_3char, COUNT(*) AS n FROM sim_av_tumour GROUP BY 1 ORDER BY n DESC, site_icd10_o2_3char LIMIT 5",
    "SELECT stage_best, COUNT(*) FROM sim_av_tumour GROUP BY 1 HAVING stage_best IN ('1', '2') ORDER BY 1",
    "SELECT site_icd10_o2_3char, stage_best, COUNT(*) FROM sim_av_tumour GROUP BY ROLLUP(site_icd10_o2_3char, stage_best)",
    "SELECT COUNT(*) FROM sim_av_tumour WHERE age BETWEEN 40 AND 60 AND gender = '1'",
    "SELECT grade, COUNT(*) FROM sim_av_tumour WHERE site_icd10_o2_3char IN ('C50', 'C34', 'C18') GROUP BY grade",
    "SELECT e.radiotherapyintent, COUNT(*) FROM sim_rtds_episode e GROUP BY 1",
    "SELECT rx.treatmentregion, SUM(rx.rtactualdose), AVG(rx.rtactualfractions) FROM sim_rtds_prescription rx GROUP BY 1",
    "SELECT p.gender, COUNT(*) * 2 AS doubled, AVG(t.age) + 1 AS shifted FROM sim_av_patient p JOIN sim_av_tumour t ON p.patientid = t.patientid GROUP BY 1",
    "SELECT t.site_icd10_o2_3char, COUNT(DISTINCT t.patientid) FROM sim_av_tumour t JOIN sim_sact_regimen r ON r.encore_patient_id = t.patientid GROUP BY 1",
];

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
                 rounding = \"none\"\nwithhold_whole_margin_cells = false\n\n[query]\nmax_groups = 100000\n\n\
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
    let union = SessionContext::new();
    for table in schema.tables() {
        let paths: Vec<String> = trust_codes(3)
            .iter()
            .map(|t| {
                table_path(&fed.join(t), &table.name)
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        let frame = union
            .read_parquet(paths, ParquetReadOptions::default())
            .await
            .expect("read");
        union
            .register_table(table.name.as_str(), frame.into_view())
            .expect("register");
    }
    Federation {
        _dir: dir,
        engines,
        union,
        merger: Merger::new(&schema).expect("merger"),
    }
}

async fn federated(fed: &Federation, sql: &str) -> Result<RecordBatch, MergeError> {
    let prepared = fed.merger.prepare(sql).await?;
    let request = SiteRequest {
        request_id: "oracle".into(),
        researcher: "alice".into(),
        project: "p1".into(),
        sql: sql.into(),
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
    let batches = fed.merger.merge(&prepared, states).await?;
    Ok(concat_batches(&prepared.schema(), &batches).expect("concat"))
}

/// Rows as comparable cells: floats kept as numbers, everything else as text.
fn cells(batch: &RecordBatch) -> Vec<Vec<Cell>> {
    let columns: Vec<Vec<Cell>> = batch
        .columns()
        .iter()
        .map(|col| match col.data_type() {
            DataType::Float64 | DataType::Float32 => {
                let floats = cast(col, &DataType::Float64).expect("cast");
                floats
                    .as_primitive::<Float64Type>()
                    .iter()
                    .map(Cell::Float)
                    .collect()
            }
            _ => {
                let text = cast(col, &DataType::Utf8).expect("cast");
                text.as_string::<i32>()
                    .iter()
                    .map(|v| Cell::Text(v.map(str::to_string)))
                    .collect()
            }
        })
        .collect();
    (0..batch.num_rows())
        .map(|r| columns.iter().map(|c| c[r].clone()).collect())
        .collect()
}

#[derive(Debug, Clone)]
enum Cell {
    Float(Option<f64>),
    Text(Option<String>),
}

impl Cell {
    fn sort_key(&self) -> String {
        match self {
            Cell::Float(v) => v.map_or("null".into(), |v| format!("{v:.3}")),
            Cell::Text(v) => v.clone().unwrap_or_else(|| "null".into()),
        }
    }

    fn same(&self, other: &Cell) -> bool {
        match (self, other) {
            (Cell::Float(Some(a)), Cell::Float(Some(b))) => {
                (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
            }
            (Cell::Float(None), Cell::Float(None)) => true,
            (Cell::Text(a), Cell::Text(b)) => a == b,
            _ => false,
        }
    }
}

fn assert_same(sql: &str, got: &RecordBatch, want: &RecordBatch, ordered: bool) {
    assert_eq!(got.num_columns(), want.num_columns(), "{sql}: column count");
    assert_eq!(got.num_rows(), want.num_rows(), "{sql}: row count");
    let (mut got, mut want) = (cells(got), cells(want));
    if !ordered {
        let key = |row: &Vec<Cell>| row.iter().map(Cell::sort_key).collect::<Vec<_>>().join("|");
        got.sort_by_key(key);
        want.sort_by_key(key);
    }
    for (g, w) in got.iter().zip(&want) {
        assert!(
            g.iter().zip(w).all(|(a, b)| a.same(b)),
            "{sql}:\n federated {g:?}\n central   {w:?}"
        );
    }
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
