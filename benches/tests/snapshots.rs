//! Snapshots of what correctness and researchers depend on, over the benchmark panel at one
//! synthetic trust: the physical plan each query runs at the node (one Partial + PartialReduce
//! over a coalesce, the patient partitioning or runs) and the released, protected states. A
//! DataFusion upgrade or a change of protection shows up as a reviewable diff.

use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, Float64Array, RecordBatch};
use arrow::datatypes::{DataType, Float64Type};
use arrow::util::pretty::pretty_format_batches;
use trustql_benches::{CANCER_PANEL, one_trust, open_node, panel_request};
use trustql_schemas::TrustSchema;

const TODAY: i32 = 20_415;

#[tokio::test]
async fn the_panel_plans_and_releases_as_recorded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let schema = TrustSchema::cancer().expect("schema");
    one_trust(&schema, 2_000, dir.path()).expect("synth");
    let node = open_node(&schema, dir.path(), "TQ01").await.expect("node");
    // DataFusion prints file paths without their leading slash.
    let root = dir.path().display().to_string();
    let root = root.trim_start_matches('/');
    for (name, sql) in CANCER_PANEL {
        let request = panel_request(name, sql);
        let plan = node.explain(&request, TODAY).await.expect("plan");
        insta::assert_snapshot!(format!("plan_{name}"), plan.replace(root, "<data>"), sql);

        let answer = node.answer(&request, TODAY).await.expect("answer");
        // Rows in key order: the node's own order depends on hashing.
        let batch = rounded_floats(&answer.batch);
        let text = pretty_format_batches(std::slice::from_ref(&batch))
            .expect("format")
            .to_string();
        let mut lines: Vec<&str> = text.lines().collect();
        let body = lines.split_off(3.min(lines.len()));
        let (rows, foot): (Vec<&str>, Vec<&str>) =
            body.into_iter().partition(|l| l.starts_with('|'));
        let mut rows = rows;
        rows.sort_unstable();
        let released = [lines, rows, foot].concat().join("\n");
        let meta = format!(
            "released {} withheld {:?}",
            answer.meta.released, answer.withheld
        );
        insta::assert_snapshot!(format!("answer_{name}"), format!("{meta}\n{released}"), sql);
    }
}

/// Floating-point states to nine significant digits: partitions merge in arrival order, so the
/// last bits of a sum may differ between runs.
fn rounded_floats(batch: &RecordBatch) -> RecordBatch {
    let columns: Vec<ArrayRef> = batch
        .columns()
        .iter()
        .map(|c| match c.data_type() {
            DataType::Float64 => {
                let values: Float64Array = c
                    .as_primitive::<Float64Type>()
                    .iter()
                    .map(|v| v.map(|x| format!("{x:.9e}").parse().unwrap_or(x)))
                    .collect();
                Arc::new(values) as ArrayRef
            }
            _ => Arc::clone(c),
        })
        .collect();
    RecordBatch::try_new(batch.schema(), columns).expect("same schema")
}
