//! Site files keep each patient in one row group, and `patients_in_order` tells which do.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Int64Array, RecordBatch, new_null_array};
use arrow::datatypes::Int64Type;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::properties::WriterProperties;
use trustql_schemas::{SiteWriter, TrustSchema, patients_in_order, table_path};

const TUMOUR: &str = "sim_av_tumour";

fn schema() -> TrustSchema {
    TrustSchema::cancer().expect("shipped schema loads")
}

/// A tumour batch with these patient ids and every other column null.
fn tumours(ids: &[Option<i64>]) -> RecordBatch {
    let arrow_schema = schema().arrow_schema(TUMOUR).expect("table");
    let columns: Vec<ArrayRef> = arrow_schema
        .fields()
        .iter()
        .map(|f| match f.name().as_str() {
            "patientid" => Arc::new(Int64Array::from(ids.to_vec())) as ArrayRef,
            _ => new_null_array(f.data_type(), ids.len()),
        })
        .collect();
    RecordBatch::try_new(arrow_schema, columns).expect("batch")
}

/// Writes the batches as the tumour table of a site with row groups of about `group_rows`.
fn write_site(dir: &Path, group_rows: usize, batches: &[RecordBatch]) -> std::path::PathBuf {
    let schema = schema();
    let position = schema
        .tables()
        .iter()
        .position(|t| t.name == TUMOUR)
        .expect("tumour table");
    let mut site = SiteWriter::create(&schema, dir, true)
        .expect("writer")
        .with_row_group_rows(group_rows);
    for batch in batches {
        site.write_table(position, batch).expect("write");
    }
    site.finish().expect("finish");
    table_path(dir, TUMOUR)
}

/// Each row group's patient ids, in file order.
fn row_groups(path: &Path) -> Vec<Vec<Option<i64>>> {
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(File::open(path).expect("open")).expect("parquet");
    let groups = builder.metadata().num_row_groups();
    (0..groups)
        .map(|g| {
            let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(path).expect("open"))
                .expect("parquet")
                .with_row_groups(vec![g])
                .build()
                .expect("reader");
            reader
                .flat_map(|b| {
                    let b = b.expect("batch");
                    let column = Arc::clone(b.column_by_name("patientid").expect("patientid"));
                    let ids = column.as_primitive::<Int64Type>().clone();
                    (0..ids.len())
                        .map(|i| ids.is_valid(i).then(|| ids.value(i)))
                        .collect::<Vec<_>>()
                })
                .collect()
        })
        .collect()
}

fn ids(values: &[i64]) -> Vec<Option<i64>> {
    values.iter().copied().map(Some).collect()
}

#[test]
fn row_groups_end_only_between_patients() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Runs of three rows per patient, cut by batches in the middle of patients 2 and 5.
    let all: Vec<i64> = (1..=6).flat_map(|p| [p, p, p]).collect();
    let batches = [
        tumours(&ids(&all[..4])),
        tumours(&ids(&all[4..14])),
        tumours(&ids(&all[14..])),
    ];
    let path = write_site(dir.path(), 4, &batches);

    let groups = row_groups(&path);
    assert!(
        groups.len() > 1,
        "small row groups were asked for: {groups:?}"
    );
    assert_eq!(
        groups.concat(),
        ids(&all),
        "every row is written once, in order"
    );
    for pair in groups.windows(2) {
        assert_ne!(
            pair[0].last(),
            pair[1].first(),
            "a patient crosses a row group: {groups:?}"
        );
    }
    for group in &groups[..groups.len() - 1] {
        assert!(
            group.len() >= 4,
            "a group ends only once it is full: {groups:?}"
        );
    }
    assert!(patients_in_order(&path, "patientid").expect("readable"));
}

#[test]
fn tables_without_a_patient_column_end_groups_anywhere() {
    let schema = schema();
    let cycles = schema.arrow_schema("sim_sact_cycle").expect("table");
    assert_eq!(
        schema.patient_column("sim_sact_cycle").expect("known"),
        None
    );
    assert_eq!(
        schema.patient_column(TUMOUR).expect("known").as_deref(),
        Some("patientid")
    );
    assert_eq!(
        schema
            .patient_column("sim_av_patient")
            .expect("known")
            .as_deref(),
        Some("patientid")
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let position = schema
        .tables()
        .iter()
        .position(|t| t.name == "sim_sact_cycle")
        .expect("cycle table");
    let batch = RecordBatch::try_new(
        Arc::clone(&cycles),
        cycles
            .fields()
            .iter()
            .map(|f| new_null_array(f.data_type(), 10))
            .collect(),
    )
    .expect("batch");
    let mut site = SiteWriter::create(&schema, dir.path(), true)
        .expect("writer")
        .with_row_group_rows(4);
    site.write_table(position, &batch).expect("write");
    site.finish().expect("finish");
    let file = File::open(table_path(dir.path(), "sim_sact_cycle")).expect("open");
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).expect("parquet");
    let sizes: Vec<i64> = builder
        .metadata()
        .row_groups()
        .iter()
        .map(|g| g.num_rows())
        .collect();
    assert_eq!(sizes, [4, 4, 2]);
}

#[test]
fn nulls_may_sit_anywhere() {
    let dir = tempfile::tempdir().expect("tempdir");
    let batch = tumours(&[None, Some(1), Some(1), None, Some(2), None, Some(3)]);
    let path = write_site(dir.path(), 2, &[batch]);
    assert!(patients_in_order(&path, "patientid").expect("readable"));
}

/// Writes `ids` as a one-column file with row groups of exactly `group_rows`.
fn raw_file(path: &Path, ids: &[i64], group_rows: usize) {
    let batch = RecordBatch::try_from_iter([(
        "patientid",
        Arc::new(Int64Array::from(ids.to_vec())) as ArrayRef,
    )])
    .expect("batch");
    let properties = WriterProperties::builder()
        .set_max_row_group_row_count(Some(group_rows))
        .build();
    let mut writer = ArrowWriter::try_new(
        File::create(path).expect("create"),
        batch.schema(),
        Some(properties),
    )
    .expect("writer");
    writer.write(&batch).expect("write");
    writer.close().expect("close");
}

#[test]
fn files_out_of_order_are_told_apart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.parquet");

    raw_file(&path, &[1, 1, 2, 2, 3, 3], 2);
    assert!(
        patients_in_order(&path, "patientid").expect("readable"),
        "aligned and ascending"
    );

    raw_file(&path, &[1, 1, 1, 2, 2, 2], 2);
    assert!(
        !patients_in_order(&path, "patientid").expect("readable"),
        "patient 1 is in two row groups"
    );

    raw_file(&path, &[1, 1, 3, 3, 2, 2], 2);
    assert!(
        !patients_in_order(&path, "patientid").expect("readable"),
        "descends"
    );

    raw_file(&path, &[1, 2, 1], 10);
    assert!(
        !patients_in_order(&path, "patientid").expect("readable"),
        "a patient comes back"
    );

    raw_file(&path, &[1, 2, 3], 10);
    assert!(
        !patients_in_order(&path, "other").expect("readable"),
        "no such column"
    );

    std::fs::write(&path, b"not parquet").expect("write");
    assert!(patients_in_order(&path, "patientid").is_err());
}
