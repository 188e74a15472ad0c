//! The oracle panel and its comparison, shared by the merge's tests and the end-to-end
//! tests of the demo federation: what one DataFusion process over the union of every trust's
//! Parquet answers is what the federation must answer (when unprotected).

use std::path::Path;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::{DataType, Float64Type};
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use trustql_schemas::{TrustSchema, table_path};

/// The central oracle: one DataFusion session over the union of every trust's Parquet.
pub async fn union(data_dir: &Path, trusts: &[String]) -> SessionContext {
    let ctx = SessionContext::new();
    for table in TrustSchema::cancer().expect("schema").tables() {
        let paths: Vec<String> = trusts
            .iter()
            .map(|t| {
                table_path(&data_dir.join(t), &table.name)
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        let frame = ctx
            .read_parquet(paths, ParquetReadOptions::default())
            .await
            .expect("read");
        ctx.register_table(table.name.as_str(), frame.into_view())
            .expect("register");
    }
    ctx
}

/// Runs `sql` on `ctx` and returns its result as one batch (in the schema of its first batch).
pub async fn run(ctx: &SessionContext, sql: &str) -> RecordBatch {
    let batches = ctx
        .sql(sql)
        .await
        .expect("sql")
        .collect()
        .await
        .expect("collect");
    concat_batches(&batches[0].schema(), &batches).expect("concat")
}

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

/// Asserts two results hold the same rows (in order when `ordered`), floats to 1e-9.
pub fn assert_same(sql: &str, got: &RecordBatch, want: &RecordBatch, ordered: bool) {
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
