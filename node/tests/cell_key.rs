//! The cell-key method at a node over real Parquet: the same patients give the same numbers
//! however the query is worded, every count and sum moves by at most the table's bound and
//! not always by zero, and what the method needs stays at the trust.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use datafusion::prelude::SessionContext;
use trustql_node::SiteEngine;
use trustql_protocol::{ColumnKind, PATIENTS_COLUMN, SiteRequest};

const TODAY: i32 = 20_415; // 2025-11-23

const CELL_KEY: &str = "method = \"cell_key\"\nmin_patients = 10\nrounding = \"none\"";

use common::request;

async fn engine(dir: &std::path::Path, disclosure: &str) -> SiteEngine {
    let fed = common::synth(dir, 3_000);
    let (_, policy) = common::policy(dir, disclosure);
    common::open_engine(dir, &fed, policy, false).await
}

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

fn text(batch: &RecordBatch, column: usize, row: usize) -> String {
    let column = cast(batch.column(column), &DataType::Utf8).expect("text");
    column.as_string::<i32>().value(row).to_string()
}

fn int(batch: &RecordBatch, column: usize, row: usize) -> i64 {
    let column = cast(batch.column(column), &DataType::Int64).expect("int");
    column.as_primitive::<Int64Type>().value(row)
}

/// The first column's values, and the named columns' integers, per row.
fn by_key(batch: &RecordBatch, columns: &[usize]) -> BTreeMap<String, Vec<i64>> {
    (0..batch.num_rows())
        .map(|r| {
            (
                text(batch, 0, r),
                columns.iter().map(|&c| int(batch, c, r)).collect(),
            )
        })
        .collect()
}

async fn answer(engine: &SiteEngine, sql: &str) -> trustql_node::SiteAnswer {
    engine.answer(&request(sql), TODAY).await.expect("answer")
}

#[tokio::test]
async fn the_same_patients_get_the_same_numbers_however_the_query_is_worded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(dir.path(), CELL_KEY).await;
    let wordings = [
        "SELECT site_icd10_o2_3char, COUNT(*) FROM sim_av_tumour WHERE stage_best = '4' GROUP BY 1",
        "SELECT site_icd10_o2_3char, COUNT(*) FROM sim_av_tumour WHERE stage_best IN ('4') GROUP BY 1",
        "SELECT site_icd10_o2_3char, COUNT(*) FROM sim_av_tumour WHERE '4' = stage_best AND age >= 0 \
         GROUP BY site_icd10_o2_3char",
        "SELECT site_icd10_o2_3char, COUNT(*) FROM sim_av_tumour WHERE age >= 0 AND stage_best = '4' \
         GROUP BY site_icd10_o2_3char",
    ];
    let first = answer(&engine, wordings[0]).await;
    assert!(first.meta.released > 3, "enough groups to compare");
    let cell_key = first.meta.cell_key.expect("the answer says the method");
    assert_eq!(cell_key.count_max_adjustment, 3);
    let want = by_key(&first.batch, &[1, 2]);
    for sql in &wordings[1..] {
        let got = by_key(&answer(&engine, sql).await.batch, &[1, 2]);
        assert_eq!(got, want, "{sql}");
    }
    // Asking again gives the same numbers: nothing to average away.
    assert_eq!(
        by_key(&answer(&engine, wordings[0]).await.batch, &[1, 2]),
        want
    );
}

#[tokio::test]
async fn counts_move_by_at_most_the_tables_bound_and_not_always_by_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(dir.path(), CELL_KEY).await;
    let ctx = common::plain_session(&dir.path().join("fed/TQ01")).await;
    let sql = "SELECT site_icd10_o2_3char, COUNT(*) FROM sim_av_tumour GROUP BY 1";
    let released = answer(&engine, sql).await;
    let exact = by_key(
        &truth(
            &ctx,
            "SELECT site_icd10_o2_3char, COUNT(*), COUNT(DISTINCT patientid) FROM sim_av_tumour \
             GROUP BY 1",
        )
        .await,
        &[1, 2],
    );
    let got = by_key(&released.batch, &[1, 2]);
    assert!(got.len() > 5);
    let mut moved = 0;
    for (site, values) in &got {
        let truth = &exact[site];
        assert!(truth[1] >= 10, "{site}: a small group was released");
        for (released, exact) in values.iter().zip(truth) {
            assert!(
                (released - exact).abs() <= 3,
                "{site}: {released} for {exact}"
            );
            if released != exact {
                moved += 1;
            }
        }
    }
    assert!(moved > 0, "no count moved: the perturbation is not applied");
    // The patient count is released perturbed too, under its usual name.
    assert_eq!(released.batch.schema().field(2).name(), PATIENTS_COLUMN);
}

#[tokio::test]
async fn sums_and_means_no_longer_give_the_exact_count() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(dir.path(), CELL_KEY).await;
    let ctx = common::plain_session(&dir.path().join("fed/TQ01")).await;
    let released = answer(
        &engine,
        "SELECT site_icd10_o2_3char, COUNT(*), SUM(age), AVG(age) FROM sim_av_tumour GROUP BY 1",
    )
    .await;
    let exact = by_key(
        &truth(
            &ctx,
            "SELECT site_icd10_o2_3char, COUNT(age) FROM sim_av_tumour GROUP BY 1",
        )
        .await,
        &[1],
    );
    // The states: COUNT's count, SUM's sum, AVG's count and sum, the patients.
    let kinds: Vec<ColumnKind> = released.meta.columns.iter().map(|c| c.kind).collect();
    assert!(!kinds.is_empty());
    let schema = released.batch.schema();
    let column = |name: &str| {
        schema
            .fields()
            .iter()
            .position(|f| f.name() == name)
            .unwrap_or_else(|| panic!("no column {name} in {schema:?}"))
    };
    let (sum, avg_count, avg_sum) = (
        column("sum(sim_av_tumour.age)[sum]"),
        column("avg(sim_av_tumour.age)[count]"),
        column("avg(sim_av_tumour.age)[sum]"),
    );
    let mut exact_ratios = 0;
    let rows = released.batch.num_rows();
    for r in 0..rows {
        let site = text(&released.batch, 0, r);
        let n = exact[&site][0];
        let s = int(&released.batch, sum, r) as f64;
        let avg_sum = released
            .batch
            .column(avg_sum)
            .as_primitive::<Float64Type>()
            .value(r);
        let mean = avg_sum / int(&released.batch, avg_count, r) as f64;
        // SUM / AVG is the perturbed count of the patients with an age, not the exact one.
        if ((s / mean).round() as i64) == n {
            exact_ratios += 1;
        }
        assert!((int(&released.batch, avg_count, r) - n).abs() <= 3);
    }
    assert!(
        exact_ratios * 2 < rows,
        "{exact_ratios} of {rows} groups give their exact count as SUM / AVG"
    );
}

#[tokio::test]
async fn count_of_a_column_every_patient_has_equals_count_star() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(dir.path(), CELL_KEY).await;
    let ctx = common::plain_session(&dir.path().join("fed/TQ01")).await;
    let nulls = truth(
        &ctx,
        "SELECT COUNT(*) - COUNT(site_icd10_o2_3char) FROM sim_av_tumour",
    )
    .await;
    assert_eq!(
        int(&nulls, 0, 0),
        0,
        "the test needs a column without nulls"
    );
    let released = answer(
        &engine,
        "SELECT stage_best, COUNT(*), COUNT(site_icd10_o2_3char) FROM sim_av_tumour GROUP BY 1",
    )
    .await;
    for r in 0..released.batch.num_rows() {
        // The same patients, the same value: the same adjustment.
        assert_eq!(int(&released.batch, 1, r), int(&released.batch, 2, r));
    }
}

#[tokio::test]
async fn cell_keys_stay_at_the_trust() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(dir.path(), CELL_KEY).await;
    let released = answer(
        &engine,
        "SELECT site_icd10_o2_3char, COUNT(*), AVG(age) FROM sim_av_tumour GROUP BY 1",
    )
    .await;
    for field in released.batch.schema().fields() {
        assert!(
            !field.name().contains("cell_key") && !field.name().contains("patients_of"),
            "{} left the trust",
            field.name()
        );
    }
    assert_eq!(
        released.meta.columns.len(),
        released.batch.num_columns(),
        "every released column is described"
    );
}

#[tokio::test]
async fn totals_are_perturbed_and_released_beside_withheld_cells() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(dir.path(), CELL_KEY).await;
    let released = answer(
        &engine,
        "SELECT site_icd10_o2_3char, stage_best, COUNT(*) FROM sim_av_tumour \
         GROUP BY ROLLUP(site_icd10_o2_3char, stage_best)",
    )
    .await;
    assert!(released.withheld.small > 0, "some cells are small");
    assert_eq!(released.withheld.margin_of_withheld, 0);
    // The grand total is there, within the bound of the true number of tumours.
    let ctx = common::plain_session(&dir.path().join("fed/TQ01")).await;
    let total = int(
        &truth(&ctx, "SELECT COUNT(*) FROM sim_av_tumour").await,
        0,
        0,
    );
    let grand = (0..released.batch.num_rows())
        .find(|&r| released.batch.column(0).is_null(r) && released.batch.column(1).is_null(r))
        .expect("the grand total is released");
    let count = released
        .batch
        .schema()
        .fields()
        .iter()
        .position(|f| f.name().starts_with("count("))
        .expect("the count");
    let grand_count = int(&released.batch, count, grand);
    assert!(
        (grand_count - total).abs() <= 3,
        "{grand_count} for {total}"
    );
}

#[tokio::test]
async fn variances_carry_a_perturbed_count_and_mean_and_the_groups_own_spread() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = engine(dir.path(), CELL_KEY).await;
    let ctx = common::plain_session(&dir.path().join("fed/TQ01")).await;
    let released = answer(
        &engine,
        "SELECT stage_best, VAR(age) FROM sim_av_tumour GROUP BY 1",
    )
    .await;
    let exact = truth(
        &ctx,
        // The largest contribution is a patient's: the sum of their tumours' ages.
        "WITH per AS (SELECT stage_best, patientid, SUM(age) AS s FROM sim_av_tumour GROUP BY 1, 2), \
         top AS (SELECT stage_best, MAX(ABS(s)) AS largest FROM per GROUP BY 1) \
         SELECT t.stage_best, COUNT(t.age), AVG(t.age), VAR(t.age), MAX(top.largest) \
         FROM sim_av_tumour t JOIN top ON t.stage_best IS NOT DISTINCT FROM top.stage_best \
         GROUP BY 1",
    )
    .await;
    let exact: BTreeMap<String, (i64, f64, f64, f64)> = (0..exact.num_rows())
        .map(|r| {
            let f = |c: usize| {
                cast(exact.column(c), &DataType::Float64)
                    .expect("float")
                    .as_primitive::<Float64Type>()
                    .value(r)
            };
            (text(&exact, 0, r), (int(&exact, 1, r), f(2), f(3), f(4)))
        })
        .collect();
    let schema = released.batch.schema();
    let column = |state: &str| {
        schema
            .fields()
            .iter()
            .position(|f| f.name().ends_with(&format!("[{state}]")) && f.name().starts_with("var"))
            .unwrap_or_else(|| panic!("no {state} in {schema:?}"))
    };
    let (count, mean, m2) = (column("count"), column("mean"), column("m2"));
    let float = |c: usize, r: usize| {
        cast(released.batch.column(c), &DataType::Float64)
            .expect("float")
            .as_primitive::<Float64Type>()
            .value(r)
    };
    let mut moved_means = 0;
    assert!(released.batch.num_rows() > 2);
    for r in 0..released.batch.num_rows() {
        let (n, true_mean, true_var, largest) = exact[&text(&released.batch, 0, r)];
        let released_n = int(&released.batch, count, r);
        // The count is perturbed like any count, the mean is the perturbed sum over it: the
        // sum moves by at most D = 3 steps of 0.1 × the largest contribution (the default magnitude
        // table), whatever the count did (a small group's mean can move a lot with its count).
        assert!((released_n - n).abs() <= 3, "{released_n} for {n}");
        let released_mean = float(mean, r);
        let (released_sum, true_sum) = (released_mean * released_n as f64, true_mean * n as f64);
        assert!(
            (released_sum - true_sum).abs() <= 0.3 * largest + 1e-6 * true_sum.abs(),
            "sum {released_sum} for {true_sum}"
        );
        if (released_mean - true_mean).abs() > 1e-9 {
            moved_means += 1;
        }
        // The sample variance is the group's own.
        let variance = float(m2, r) / (released_n - 1) as f64;
        assert!(
            (variance - true_var).abs() < 1e-6 * true_var.max(1.0),
            "{variance} for {true_var}"
        );
    }
    assert!(
        moved_means > 0,
        "no mean moved: an exact mean beside a perturbed count gives it away"
    );
}

/// Every group's patients for a query at TQ01, from the Parquet: SQL whose last column is the
/// patient key and whose other columns name the group.
async fn cell_keys_of(
    ctx: &SessionContext,
    sql: &str,
    record_keys: &HashMap<i64, u64>,
) -> HashMap<String, u64> {
    let batch = truth(ctx, sql).await;
    let last = batch.num_columns() - 1;
    let ids = cast(batch.column(last), &DataType::Int64).expect("ids");
    let ids = ids.as_primitive::<Int64Type>();
    let labels: Vec<_> = (0..last)
        .map(|c| cast(batch.column(c), &DataType::Utf8).expect("text"))
        .collect();
    let mut cells: HashMap<String, u64> = HashMap::new();
    let mut seen = HashSet::new();
    for row in 0..batch.num_rows() {
        if ids.is_null(row) {
            continue;
        }
        let label = labels
            .iter()
            .map(|l| {
                let l = l.as_string::<i32>();
                if l.is_null(row) {
                    "∅".to_string()
                } else {
                    l.value(row).to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("/");
        let id = ids.value(row);
        if !seen.insert((label.clone(), id)) {
            continue;
        }
        let key = record_keys.get(&id).expect("every patient has a key");
        let cell = cells.entry(label).or_default();
        *cell = cell.wrapping_add(*key);
    }
    cells
}

/// Whether `bytes` holds any of the 8-byte values in `forbidden`, at any offset.
fn holds_any(bytes: &[u8], forbidden: &HashSet<[u8; 8]>) -> bool {
    bytes.windows(8).any(|w| {
        let w: [u8; 8] = w.try_into().expect("8 bytes");
        forbidden.contains(&w)
    })
}

#[tokio::test]
async fn record_and_cell_keys_never_leave_the_node_in_any_frame() {
    use arrow::ipc::{MessageHeader, root_as_message};
    use arrow_flight::FlightData;
    use futures::TryStreamExt;
    use trustql_policies::{CellKey, CellKeyRules, CellKeyTables};

    let dir = tempfile::tempdir().expect("tempdir");
    let fed = common::synth(dir.path(), 3_000);
    let (policy_path, _) = common::policy(dir.path(), CELL_KEY);
    let pki = common::pki(dir.path());
    let config = common::node_config(
        dir.path(),
        &fed,
        &policy_path,
        &pki,
        trustql_node::Limits::default(),
    );
    let node = trustql_node::start(&config, common::schema())
        .await
        .expect("node starts");

    // The node's secret, and from it every patient's record key by the documented HMAC.
    let text = std::fs::read_to_string(config.state_dir.join(trustql_node::RECORD_KEYS_FILE))
        .expect("the node made its secret");
    let text = text.trim();
    assert_eq!(text.len(), 64, "64 hex digits");
    let secret: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).expect("hex"))
        .collect();
    let secret = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
    let ctx = common::plain_session(&fed.join("TQ01")).await;
    let schema = common::schema();
    let mut record_keys: HashMap<i64, u64> = HashMap::new();
    for table in schema.tables() {
        let Some(column) = schema.patient_column(&table.name).expect("schema") else {
            continue;
        };
        let batch = truth(
            &ctx,
            &format!("SELECT DISTINCT \"{column}\" FROM \"{}\"", table.name),
        )
        .await;
        let ids = cast(batch.column(0), &DataType::Int64).expect("ids");
        for id in ids.as_primitive::<Int64Type>().iter().flatten() {
            let mut message = b"trustql-record-key/1".to_vec();
            message.extend_from_slice(&id.to_le_bytes());
            let tag = ring::hmac::sign(&secret, &message);
            let key = u64::from_be_bytes(tag.as_ref()[..8].try_into().expect("8 bytes"));
            record_keys.insert(id, key);
        }
    }
    assert!(record_keys.len() >= 3_000, "{} patients", record_keys.len());

    // Each query, and the groups (and the patients each aggregate reads) whose cell keys it
    // needs: every key of every group, released or not.
    let tumours = "FROM sim_av_tumour";
    let queries: [(&str, Vec<String>); 6] = [
        (
            "SELECT site_icd10_o2_3char, COUNT(*), AVG(age) FROM sim_av_tumour GROUP BY 1",
            vec![
                format!("SELECT site_icd10_o2_3char, patientid {tumours}"),
                format!("SELECT site_icd10_o2_3char, patientid {tumours} WHERE age IS NOT NULL"),
            ],
        ),
        (
            "SELECT stage_best, COUNT(*), SUM(age) FROM sim_av_tumour \
             WHERE site_icd10_o2_3char = 'C18' GROUP BY 1",
            vec![
                format!("SELECT stage_best, patientid {tumours} WHERE site_icd10_o2_3char = 'C18'"),
                format!(
                    "SELECT stage_best, patientid {tumours} WHERE site_icd10_o2_3char = 'C18' \
                     AND age IS NOT NULL"
                ),
            ],
        ),
        (
            "SELECT site_icd10_o2_3char, stage_best, COUNT(*) FROM sim_av_tumour \
             GROUP BY ROLLUP(site_icd10_o2_3char, stage_best)",
            vec![
                format!("SELECT site_icd10_o2_3char, stage_best, patientid {tumours}"),
                format!("SELECT site_icd10_o2_3char, patientid {tumours}"),
                format!("SELECT patientid {tumours}"),
            ],
        ),
        (
            "SELECT gender, COUNT(*) FROM sim_av_patient GROUP BY gender",
            vec!["SELECT gender, patientid FROM sim_av_patient".into()],
        ),
        (
            "SELECT intent_of_treatment, COUNT(*), COUNT(DISTINCT encore_patient_id) \
             FROM sim_sact_regimen GROUP BY 1",
            vec!["SELECT intent_of_treatment, encore_patient_id FROM sim_sact_regimen".into()],
        ),
        (
            "SELECT p.gender, t.stage_best, COUNT(*) FROM sim_av_patient p \
             JOIN sim_av_tumour t ON p.patientid = t.patientid GROUP BY 1, 2",
            vec![
                "SELECT p.gender, t.stage_best, t.patientid FROM sim_av_patient p \
                 JOIN sim_av_tumour t ON p.patientid = t.patientid"
                    .into(),
            ],
        ),
    ];
    let mut forbidden: HashSet<[u8; 8]> = HashSet::new();
    let mut forbid = |key: u64| {
        forbidden.insert(key.to_be_bytes());
        forbidden.insert(key.to_le_bytes());
    };
    record_keys.values().copied().for_each(&mut forbid);
    let mut cells = 0;
    let mut by_site = HashMap::new();
    for (i, (_, truths)) in queries.iter().enumerate() {
        for sql in truths {
            let keys = cell_keys_of(&ctx, sql, &record_keys).await;
            cells += keys.len();
            if i == 0 && by_site.is_empty() {
                by_site = keys.clone();
            }
            keys.into_values().for_each(&mut forbid);
        }
    }
    assert!(cells > 100, "{cells} cell keys");
    // The scan finds a key at any offset.
    let some_key = record_keys.values().next().expect("a key");
    assert!(holds_any(
        &[&[0u8][..], &some_key.to_le_bytes()].concat(),
        &forbidden
    ));

    // The keys computed here are the node's: the public table at them gives the released
    // patient counts exactly.
    let tables = CellKeyTables::new(&CellKeyRules::default()).expect("the default tables");
    let patients = truth(
        &ctx,
        "SELECT site_icd10_o2_3char, COUNT(DISTINCT patientid) FROM sim_av_tumour GROUP BY 1",
    )
    .await;
    let exact_patients = by_key(&patients, &[1]);

    let mut client = common::client(node.addr(), &pki.ca_pem, Some(&pki.coordinator))
        .await
        .expect("the coordinator's identity connects");
    let mut frames = 0;
    for (n, (sql, _)) in queries.iter().enumerate() {
        let ticket = common::signed_ticket(
            &pki,
            SiteRequest {
                request_id: format!("frames-{n}"),
                ..request(sql)
            },
        );
        let messages: Vec<FlightData> = client
            .do_get(ticket)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .into_inner()
            .try_collect()
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert!(messages.len() >= 2, "{sql}: a schema and a batch");
        for message in &messages {
            frames += 1;
            for (part, bytes) in [
                ("data_header", &message.data_header),
                ("data_body", &message.data_body),
                ("app_metadata", &message.app_metadata),
            ] {
                assert!(
                    !holds_any(bytes, &forbidden),
                    "{sql}: a record or cell key in a frame's {part}"
                );
            }
            let header = root_as_message(&message.data_header).expect("an IPC message");
            if header.header_type() == MessageHeader::Schema {
                let schema = arrow::datatypes::Schema::try_from(message).expect("a schema message");
                // AVG's count is UInt64 too, so the names tell the key states apart; their
                // values are covered by the scan above.
                for field in schema.fields() {
                    assert!(
                        !field.name().contains("cell_key") && !field.name().contains("patients_of"),
                        "{sql}: {field:?} left the trust"
                    );
                }
            }
        }
        if n == 0 {
            let batches =
                arrow_flight::utils::flight_data_to_batches(&messages).expect("decodable");
            let batch = concat_batches(&batches[0].schema(), &batches).expect("concat");
            let column = batch
                .schema()
                .index_of(PATIENTS_COLUMN)
                .expect("the patient count is released");
            assert!(batch.num_rows() > 5, "{sql}");
            for (site, released) in by_key(&batch, &[column]) {
                let exact = exact_patients[&site][0] as u64;
                let key = CellKey(by_site[&site]);
                assert_eq!(
                    released[0] as u64,
                    tables.count(exact, key),
                    "{site}: the released patient count is not the table's at this key"
                );
            }
        }
    }
    assert!(frames >= 2 * queries.len());
}
