//! `check_site` on small hand-made sites, each broken in one way.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Int32Array, Int64Array, RecordBatch, StringArray, new_null_array};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use trustql_schemas::{Problem, SiteReport, TrustSchema, check_site};

fn schema() -> TrustSchema {
    TrustSchema::cancer().expect("shipped schema loads")
}

/// Writes `table` with `rows` rows: given columns as given, every other column null.
fn write_table(dir: &Path, table: &str, rows: usize, given: Vec<(&str, ArrayRef)>) {
    let schema = schema();
    let arrow_schema = schema.arrow_schema(table).expect("table");
    let given: HashMap<&str, ArrayRef> = given.into_iter().collect();
    let columns: Vec<ArrayRef> = arrow_schema
        .fields()
        .iter()
        .map(|f| {
            given
                .get(f.name().as_str())
                .cloned()
                .unwrap_or_else(|| new_null_array(f.data_type(), rows))
        })
        .collect();
    let batch = RecordBatch::try_new(Arc::clone(&arrow_schema), columns).expect("batch");
    write_batch(&dir.join(format!("{table}.parquet")), &batch);
}

fn write_batch(path: &Path, batch: &RecordBatch) {
    let mut writer =
        ArrowWriter::try_new(File::create(path).expect("create"), batch.schema(), None)
            .expect("writer");
    writer.write(batch).expect("write");
    writer.close().expect("close");
}

fn ints(values: &[Option<i64>]) -> ArrayRef {
    Arc::new(Int64Array::from(values.to_vec()))
}

fn strings(values: &[Option<&str>]) -> ArrayRef {
    Arc::new(StringArray::from(values.to_vec()))
}

/// A tiny valid site: two patients, two tumours, empty treatment tables.
fn valid_site(dir: &Path) {
    write_table(
        dir,
        "sim_av_patient",
        2,
        vec![
            ("patientid", ints(&[Some(11), Some(12)])),
            ("gender", strings(&[Some("1"), Some("2")])),
            ("vitalstatus", strings(&[Some("A"), Some("D")])),
        ],
    );
    write_table(
        dir,
        "sim_av_tumour",
        2,
        vec![
            ("tumourid", ints(&[Some(101), Some(102)])),
            ("patientid", ints(&[Some(11), Some(12)])),
            ("stage_best", strings(&[Some("3"), None])),
        ],
    );
    for table in [
        "sim_sact_regimen",
        "sim_sact_cycle",
        "sim_sact_drug_detail",
        "sim_sact_outcome",
        "sim_rtds_episode",
        "sim_rtds_prescription",
    ] {
        write_table(dir, table, 0, vec![]);
    }
}

fn check(dir: &Path) -> SiteReport {
    check_site(&schema(), dir).expect("directory readable")
}

fn problems(report: &SiteReport, table: &str) -> Vec<Problem> {
    report
        .tables
        .iter()
        .find(|t| t.table == table)
        .expect("table reported")
        .problems
        .clone()
}

#[test]
fn a_valid_site_passes() {
    let dir = tempfile::tempdir().expect("tempdir");
    valid_site(dir.path());
    let report = check(dir.path());
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.tables.len(), 8);
    assert_eq!(report.tables[1].rows, Some(2));
    assert!(report.to_string().contains("OK"));
}

#[test]
fn a_missing_table_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    valid_site(dir.path());
    std::fs::remove_file(dir.path().join("sim_sact_cycle.parquet")).expect("rm");
    let report = check(dir.path());
    assert_eq!(
        problems(&report, "sim_sact_cycle"),
        vec![Problem::MissingFile]
    );
    // The child of a missing table is not blamed for it.
    assert!(problems(&report, "sim_sact_drug_detail").is_empty());
}

#[test]
fn a_file_that_is_not_parquet_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    valid_site(dir.path());
    std::fs::write(
        dir.path().join("sim_av_tumour.parquet"),
        "patientid,age\n1,50\n",
    )
    .expect("w");
    let report = check(dir.path());
    assert!(matches!(
        problems(&report, "sim_av_tumour").as_slice(),
        [Problem::Unreadable { .. }]
    ));
    assert!(!report.is_ok());
}

#[test]
fn a_truncated_file_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    valid_site(dir.path());
    let path = dir.path().join("sim_av_patient.parquet");
    let bytes = std::fs::read(&path).expect("read");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("truncate");
    let report = check(dir.path());
    assert!(matches!(
        problems(&report, "sim_av_patient").as_slice(),
        [Problem::Unreadable { .. }]
    ));
}

#[test]
fn missing_extra_and_mistyped_columns_are_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    valid_site(dir.path());
    let file_schema = Arc::new(Schema::new(vec![
        Field::new("patientid", DataType::Int64, true),
        Field::new("gender", DataType::Int32, true),
        Field::new("nhs_number", DataType::Utf8, true),
    ]));
    let batch = RecordBatch::try_new(
        file_schema,
        vec![
            ints(&[Some(11), Some(12)]),
            Arc::new(Int32Array::from(vec![1, 2])),
            strings(&[Some("x"), Some("y")]),
        ],
    )
    .expect("batch");
    write_batch(&dir.path().join("sim_av_patient.parquet"), &batch);
    let found = problems(&check(dir.path()), "sim_av_patient");
    assert!(found.contains(&Problem::MissingColumn {
        column: "linknumber".into()
    }));
    assert!(found.contains(&Problem::ExtraColumn {
        column: "nhs_number".into()
    }));
    assert!(found.contains(&Problem::WrongType {
        column: "gender".into(),
        expected: trustql_schemas::ColumnType::Utf8,
        found: "Int32".into()
    }));
}

#[test]
fn values_outside_a_code_set_are_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    valid_site(dir.path());
    write_table(
        dir.path(),
        "sim_av_patient",
        3,
        vec![
            ("patientid", ints(&[Some(11), Some(12), Some(13)])),
            ("gender", strings(&[Some("M"), Some("2"), Some("M")])),
        ],
    );
    let found = problems(&check(dir.path()), "sim_av_patient");
    assert_eq!(
        found,
        vec![Problem::OutsideCodeSet {
            column: "gender".into(),
            code_set: "gender".into(),
            rows: 2,
            examples: vec!["M".into()],
        }]
    );
}

#[test]
fn broken_keys_are_counted_without_their_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    valid_site(dir.path());
    write_table(
        dir.path(),
        "sim_av_tumour",
        4,
        vec![
            ("tumourid", ints(&[Some(101), Some(101), None, Some(104)])),
            ("patientid", ints(&[Some(11), Some(987654), Some(12), None])),
        ],
    );
    let report = check(dir.path());
    let found = problems(&report, "sim_av_tumour");
    assert!(found.contains(&Problem::DuplicateKey {
        column: "tumourid".into(),
        rows: 1
    }));
    assert!(found.contains(&Problem::NullKey {
        column: "tumourid".into(),
        rows: 1
    }));
    assert!(found.contains(&Problem::NullKey {
        column: "patientid".into(),
        rows: 1
    }));
    assert!(found.contains(&Problem::BrokenReference {
        column: "patientid".into(),
        references: "sim_av_patient.patientid".into(),
        rows: 1
    }));
    let text = report.to_string();
    assert!(!text.contains("987654"), "identifier value leaked: {text}");
    assert!(!text.contains("101"), "identifier value leaked: {text}");
}

#[test]
fn other_files_are_noted_not_failed() {
    let dir = tempfile::tempdir().expect("tempdir");
    valid_site(dir.path());
    std::fs::write(dir.path().join("readme.txt"), "hello").expect("w");
    let report = check(dir.path());
    assert!(report.is_ok());
    assert_eq!(report.extra_files, vec!["readme.txt".to_string()]);
}

#[test]
fn a_missing_directory_is_an_error() {
    assert!(check_site(&schema(), Path::new("/nonexistent/site")).is_err());
}
