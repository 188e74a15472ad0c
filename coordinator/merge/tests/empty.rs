//! Finishing no states at all: what the coordinator answers when every trust held no rows
//! (a trust releases no group of no patients, so none sends a state row).

use arrow::array::{Array, Int64Array, RecordBatch};
use arrow::compute::concat_batches;
use trustql_merge::{Merger, TotalsRules};
use trustql_schemas::TrustSchema;

async fn merged_over_nothing(sql: &str) -> RecordBatch {
    let merger = Merger::new(
        &TrustSchema::cancer().expect("schema"),
        TotalsRules::default(),
    )
    .expect("merger");
    let prepared = merger.prepare(sql).await.expect("prepared");
    let batches = merger.merge(&prepared, Vec::new()).await.expect("merged");
    concat_batches(&prepared.schema(), &batches).expect("concat")
}

fn count(batch: &RecordBatch, column: usize) -> Option<i64> {
    let array = batch
        .column(column)
        .as_any()
        .downcast_ref::<Int64Array>()
        .expect("a count is Int64");
    array.is_valid(0).then(|| array.value(0))
}

#[tokio::test]
async fn an_ungrouped_count_distinct_over_no_rows_is_zero_like_count() {
    // SQL (and one process over the union) says 0, as COUNT(*) does here.
    let batch = merged_over_nothing(
        "SELECT COUNT(*) AS n, COUNT(DISTINCT patientid) AS patients, \
         COUNT(DISTINCT patientid) + 1 AS more FROM sim_av_tumour",
    )
    .await;
    assert_eq!(batch.num_rows(), 1);
    assert_eq!(count(&batch, 0), Some(0), "COUNT(*)");
    assert_eq!(count(&batch, 1), Some(0), "COUNT(DISTINCT)");
    assert_eq!(count(&batch, 2), Some(1), "COUNT(DISTINCT) + 1");
}

#[tokio::test]
async fn a_grouped_count_distinct_over_no_rows_has_no_rows() {
    let batch = merged_over_nothing(
        "SELECT stage_best, COUNT(DISTINCT patientid) FROM sim_av_tumour GROUP BY stage_best",
    )
    .await;
    assert_eq!(batch.num_rows(), 0);
}
