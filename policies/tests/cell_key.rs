//! The cell-key method on partial answers: what is perturbed, by which key, what stays at the
//! trust, and what an attacker differencing cells one patient apart learns.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, Int64Array, RecordBatch, StringArray, UInt8Array,
    UInt64Array,
};
use arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema};
use trustql_policies::{
    CellKey, CellKeyTables, Contributions, Disclosure, Method, PartialAnswer, Rounding,
    StateColumn, protect,
};

fn batch(columns: Vec<(&str, ArrayRef)>) -> RecordBatch {
    let fields: Vec<Field> = columns
        .iter()
        .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
        .collect();
    RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns.into_iter().map(|(_, a)| a).collect(),
    )
    .expect("batch")
}

fn ints(v: &[i64]) -> ArrayRef {
    Arc::new(Int64Array::from(v.to_vec()))
}

fn keys(v: &[u64]) -> ArrayRef {
    Arc::new(UInt64Array::from(v.to_vec()))
}

fn cell_key_rules() -> Disclosure {
    Disclosure {
        method: Method::CellKey,
        rounding: Rounding::None,
        withhold_whole_margin_cells: false,
        ..Disclosure::default()
    }
}

fn tables() -> CellKeyTables {
    cell_key_rules().cell_key_tables().expect("tables")
}

/// SplitMix64: random record keys, seeded, so the statistics below are reproducible.
struct Keys(u64);

impl Keys {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The cell key of `n` new random patients.
    fn cell(&mut self, n: usize) -> CellKey {
        (0..n).map(|_| CellKey(self.next())).sum()
    }
}

fn column_i64(b: &RecordBatch, name: &str) -> Vec<i64> {
    let column = b.column_by_name(name).expect("column");
    let column = arrow::compute::cast(column, &DataType::Int64).expect("int");
    column.as_primitive::<Int64Type>().values().to_vec()
}

#[test]
fn counts_move_by_the_table_for_their_value_and_the_key_of_the_patients_they_count() {
    let mut random = Keys(7);
    let (group, with_age) = (random.cell(40), random.cell(25));
    let b = batch(vec![
        ("site", Arc::new(StringArray::from(vec!["C50", "C34"]))),
        ("patients", ints(&[40, 40])),
        ("count(*)[count]", ints(&[52, 40])),
        ("count(age)[count]", ints(&[31, 40])),
        ("__patients_of_1", ints(&[25, 40])),
        ("__cell_key", keys(&[group.0, group.0])),
        ("__cell_key_of_1", keys(&[with_age.0, group.0])),
    ]);
    let columns = [
        StateColumn::key("site"),
        StateColumn::patients("patients"),
        StateColumn::state("count(*)[count]", 0, "count", "count"),
        StateColumn::state("count(age)[count]", 1, "count", "count"),
        StateColumn::aggregate_patients("__patients_of_1", 1),
        StateColumn::cell_key("__cell_key", None),
        StateColumn::cell_key("__cell_key_of_1", Some(1)),
    ];
    let answer = PartialAnswer {
        batch: b,
        columns: columns.to_vec(),
        contributions: None,
    };
    let out = protect(&answer, &cell_key_rules(), 100).expect("protect");
    let t = tables();
    // The cell keys and the per-aggregate counts stay at the trust.
    let names: Vec<String> = out
        .batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(
        names,
        ["site", "patients", "count(*)[count]", "count(age)[count]"]
    );
    assert!(out.columns.iter().all(|c| !c.stays()));
    assert_eq!(
        column_i64(&out.batch, "patients"),
        vec![t.count(40, group) as i64, t.count(40, group) as i64]
    );
    assert_eq!(
        column_i64(&out.batch, "count(*)[count]"),
        vec![t.count(52, group) as i64, t.count(40, group) as i64]
    );
    // COUNT(age) reads the 25 patients with an age: their key, its own value.
    let by_age = column_i64(&out.batch, "count(age)[count]");
    assert_eq!(by_age[0], t.count(31, with_age) as i64);
    // Where every patient has an age, COUNT(age) is COUNT(*): same patients, same value.
    assert_eq!(by_age[1], column_i64(&out.batch, "count(*)[count]")[1]);
    // The count moved (with these keys) and by no more than D.
    let moved = column_i64(&out.batch, "count(*)[count]")[0];
    assert!((moved - 52).abs() <= 3);
}

#[test]
fn a_cell_key_answer_without_its_keys_is_a_fault_not_a_release() {
    let b = batch(vec![("patients", ints(&[40])), ("n", ints(&[40]))]);
    let answer = PartialAnswer {
        batch: b,
        columns: vec![
            StateColumn::patients("patients"),
            StateColumn::state("n", 0, "count", "count"),
        ],
        contributions: None,
    };
    let err = protect(&answer, &cell_key_rules(), 100).expect_err("no keys");
    assert!(matches!(err, trustql_policies::ReleaseError::Internal(_)));
}

#[test]
fn sums_move_by_the_magnitude_table_scaled_by_the_largest_contribution() {
    let mut random = Keys(11);
    let group = random.cell(12);
    let b = batch(vec![
        ("site", Arc::new(StringArray::from(vec!["C50"]))),
        ("patients", ints(&[12])),
        ("sum(weight)[sum]", ints(&[960])),
        ("avg(weight)[count]", ints(&[12])),
        (
            "avg(weight)[sum]",
            Arc::new(Float64Array::from(vec![960.0])),
        ),
        ("__cell_key", keys(&[group.0])),
    ]);
    let columns = vec![
        StateColumn::key("site"),
        StateColumn::patients("patients"),
        StateColumn::state("sum(weight)[sum]", 0, "sum", "sum"),
        StateColumn::state("avg(weight)[count]", 1, "avg", "count"),
        StateColumn::state("avg(weight)[sum]", 1, "avg", "sum"),
        StateColumn::cell_key("__cell_key", None),
    ];
    // Per patient contributions: the largest weighs 120.
    let contributions = batch(vec![
        ("site", Arc::new(StringArray::from(vec!["C50"; 12]))),
        ("patient", ints(&(0..12).collect::<Vec<_>>())),
        (
            "c0",
            ints(&[120, 70, 75, 80, 85, 90, 60, 65, 70, 80, 85, 80]),
        ),
        (
            "c1",
            ints(&[120, 70, 75, 80, 85, 90, 60, 65, 70, 80, 85, 80]),
        ),
    ]);
    let answer = PartialAnswer {
        batch: b,
        columns,
        contributions: Some(Contributions {
            batch: contributions,
            aggregates: vec![0, 1],
        }),
    };
    let out = protect(&answer, &cell_key_rules(), 100).expect("protect");
    let t = tables();
    let want = t.sum(960.0, 120.0, group);
    // An integer sum stays an integer state, rounded.
    assert_eq!(
        out.batch.column(2).data_type(),
        &DataType::Int64,
        "SUM's state keeps its type"
    );
    assert_eq!(
        column_i64(&out.batch, "sum(weight)[sum]"),
        vec![want.round() as i64]
    );
    let avg_sum = out.batch.column(4).as_primitive::<Float64Type>().value(0);
    assert!((avg_sum - want).abs() < 1e-9);
    // AVG = perturbed sum / perturbed count, and neither is exact.
    assert_eq!(
        column_i64(&out.batch, "avg(weight)[count]"),
        vec![t.count(12, group) as i64]
    );
    assert!((want - 960.0).abs() <= 3.0 * 0.1 * 120.0 + 1e-9);
}

#[test]
fn totals_are_perturbed_by_their_own_keys_and_not_withheld_with_their_cells() {
    // ROLLUP(stage): two cells and their total; the second cell is small.
    let mut random = Keys(3);
    let (a, b) = (random.cell(30), random.cell(4));
    let total = a + b;
    let out = protect(
        &PartialAnswer {
            batch: batch(vec![
                (
                    "stage",
                    Arc::new(StringArray::from(vec![Some("1"), Some("2"), None])),
                ),
                ("__grouping_id", Arc::new(UInt8Array::from(vec![0u8, 0, 1]))),
                ("patients", ints(&[30, 4, 34])),
                ("count(*)[count]", ints(&[30, 4, 34])),
                ("__cell_key", keys(&[a.0, b.0, total.0])),
            ]),
            columns: vec![
                StateColumn::key("stage"),
                StateColumn::grouping_id("__grouping_id"),
                StateColumn::patients("patients"),
                StateColumn::state("count(*)[count]", 0, "count", "count"),
                StateColumn::cell_key("__cell_key", None),
            ],
            contributions: None,
        },
        &cell_key_rules(),
        100,
    )
    .expect("protect");
    assert_eq!(out.report.small, 1);
    assert_eq!(out.report.margin_of_withheld, 0);
    let t = tables();
    assert_eq!(
        column_i64(&out.batch, "count(*)[count]"),
        vec![t.count(30, a) as i64, t.count(34, total) as i64]
    );
}

/// The adjustments' distribution for large counts, from the table itself.
fn distribution(t: &CellKeyTables) -> Vec<(i64, f64)> {
    t.counts.distribution(1000)
}

#[test]
fn over_many_cells_the_adjustment_is_unbiased_with_the_tables_variance() {
    let t = tables();
    let mut random = Keys(2026);
    for n in [1u64, 2, 3, 10, 100] {
        let cells = 200_000;
        let adjustments: Vec<f64> = (0..cells)
            .map(|_| {
                let key = random.cell(1);
                t.count(n, key) as f64 - n as f64
            })
            .collect();
        let mean = adjustments.iter().sum::<f64>() / cells as f64;
        let var = adjustments.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / cells as f64;
        let want: f64 = t
            .counts
            .distribution(n)
            .iter()
            .map(|(d, p)| (*d as f64).powi(2) * p)
            .sum();
        assert!(mean.abs() < 0.01, "n = {n}: mean adjustment {mean}");
        assert!(
            (var - want).abs() < 0.03,
            "n = {n}: variance {var}, table {want}"
        );
        if n >= 3 {
            assert!(
                (want - 1.5).abs() < 1e-3,
                "n = {n}: the table's V is {want}"
            );
        }
    }
    // Every row of the table is unbiased, as `policy check` shows.
    assert!(
        t.count_moments()
            .iter()
            .all(|(_, bias, _)| bias.abs() < 1e-6)
    );
}

/// The best an attacker can do telling "the patient is in the second cell" from "is not", from
/// the difference of the two released counts: the total variation distance between the two
/// differences' distributions, which the table alone decides.
fn designed_advantage(t: &CellKeyTables) -> f64 {
    let row = distribution(t);
    let mut diff = std::collections::BTreeMap::<i64, f64>::new();
    for (x, p) in &row {
        for (y, q) in &row {
            *diff.entry(x - y).or_default() += p * q;
        }
    }
    // Out: released difference = X − Y; in: 1 + X − Y.
    let lo = diff.keys().next().copied().unwrap_or(0);
    let hi = diff.keys().last().copied().unwrap_or(0) + 1;
    (lo..=hi)
        .map(|d| {
            let out = diff.get(&d).copied().unwrap_or(0.0);
            let inside = diff.get(&(d - 1)).copied().unwrap_or(0.0);
            (out - inside).abs()
        })
        .sum::<f64>()
        / 2.0
}

#[test]
fn differencing_cells_one_patient_apart_gives_no_more_than_the_table_allows() {
    // Many pairs: a cell of n patients, and the same cell with or without one more patient
    // (the target). The attacker sees both released counts and guesses "in" when the
    // difference is more likely under "in": the best rule, since the table is public.
    let t = tables();
    let bound = designed_advantage(&t);
    let row = distribution(&t);
    let p = |d: i64| {
        let mut total = 0.0;
        for (x, px) in &row {
            for (y, py) in &row {
                if x - y == d {
                    total += px * py;
                }
            }
        }
        total
    };
    let mut random = Keys(16);
    let pairs = 40_000;
    let (mut caught, mut false_alarms) = (0usize, 0usize);
    for i in 0..pairs {
        let n = 10 + (i % 40) as u64;
        let cell = random.cell(n as usize);
        let target = CellKey(random.next());
        let inside = i % 2 == 0;
        let (second_n, second_key) = if inside {
            (n + 1, cell + target)
        } else {
            // Without the target the second cell holds other patients: one swapped for
            // another, so the true difference is 0 and the keys still differ.
            (n, cell + target + CellKey(random.next().wrapping_neg()))
        };
        let first = t.count(n, cell) as i64;
        let second = t.count(second_n, second_key) as i64;
        let d = second - first;
        let guess_in = p(d - 1) > p(d);
        match (inside, guess_in) {
            (true, true) => caught += 1,
            (false, true) => false_alarms += 1,
            _ => {}
        }
    }
    let half = pairs as f64 / 2.0;
    let advantage = caught as f64 / half - false_alarms as f64 / half;
    eprintln!("differencing advantage {advantage:.3}, table's bound {bound:.3}");
    // Within sampling error of the design bound, and far from certainty (exact counts give 1).
    assert!(
        advantage <= bound + 0.03,
        "advantage {advantage:.3} above the table's bound {bound:.3}"
    );
    assert!(bound < 0.5, "the default table's bound is {bound:.3}");
    // Exact counts: the difference is the target, every time.
    assert!(advantage < 0.5);
}

#[test]
fn a_perturbed_sum_keeps_null_for_a_group_without_values() {
    let mut random = Keys(5);
    let group = random.cell(20);
    let out = protect(
        &PartialAnswer {
            batch: batch(vec![
                ("patients", ints(&[20])),
                (
                    "sum(x)[sum]",
                    Arc::new(Float64Array::from(vec![None::<f64>])),
                ),
                ("__cell_key", keys(&[group.0])),
            ]),
            columns: vec![
                StateColumn::patients("patients"),
                StateColumn::state("sum(x)[sum]", 0, "sum", "sum"),
                StateColumn::cell_key("__cell_key", None),
            ],
            contributions: Some(Contributions {
                batch: batch(vec![
                    ("patient", ints(&[1])),
                    ("c0", Arc::new(Float64Array::from(vec![None::<f64>]))),
                ]),
                aggregates: vec![0],
            }),
        },
        &Disclosure {
            min_patients: 1,
            ..cell_key_rules()
        },
        100,
    )
    .expect("protect");
    assert!(out.batch.column(1).is_null(0));
}

#[test]
fn the_same_patients_with_one_more_row_get_an_unrelated_adjustment() {
    // A second tumour of a patient already counted: the patients, and so the cell key, are
    // the same; the count and the sum are one row more. The released difference must not be
    // that row.
    let t = tables();
    let mut random = Keys(99);
    let cells = 20_000;
    let (mut exact_counts, mut exact_sums) = (0, 0);
    for i in 0..cells {
        let key = random.cell(15);
        let n = 20 + (i % 30) as u64;
        if t.count(n + 1, key) as i64 - t.count(n, key) as i64 == 1 {
            exact_counts += 1;
        }
        let (sum, age) = (1_300.0 + i as f64, 67.0);
        let difference = t.sum(sum + age, 90.0, key) - t.sum(sum, 90.0, key);
        if (difference - age).abs() < 1e-9 {
            exact_sums += 1;
        }
    }
    // Independent draws agree this often (Σ p² of the table's row), not always.
    let row = t.counts.distribution(1000);
    let agree: f64 = row.iter().map(|(_, p)| p * p).sum();
    let rate = exact_counts as f64 / cells as f64;
    assert!(
        (rate - agree).abs() < 0.02,
        "the count difference was exact {rate:.3} of the time, independent draws {agree:.3}"
    );
    let steps = t.magnitudes.distribution(1000);
    let agree: f64 = steps.iter().map(|(_, p)| p * p).sum();
    let rate = exact_sums as f64 / cells as f64;
    assert!(
        (rate - agree).abs() < 0.02,
        "the sum difference was exact {rate:.3} of the time, independent draws {agree:.3}"
    );
    // And asking again is the same answer: the grid absorbs floating-point reordering.
    let key = random.cell(15);
    let (a, b): (f64, f64) = ((0.1 + 0.2 + 0.3) * 1000.0, (0.3 + 0.2 + 0.1) * 1000.0);
    assert_ne!(
        a.to_bits(),
        b.to_bits(),
        "the test needs two orders that differ"
    );
    assert_eq!(
        t.sum(a, 90.0, key) - a,
        t.sum(b, 90.0, key) - b,
        "the same step"
    );
}

#[test]
fn a_variance_carries_the_perturbed_count_the_perturbed_sum_over_it_and_its_own_spread() {
    let mut random = Keys(21);
    let group = random.cell(12);
    let (n, mean, m2) = (12i64, 70.0, 11.0 * 9.0);
    let out = protect(
        &PartialAnswer {
            batch: batch(vec![
                ("patients", ints(&[12])),
                (
                    "var(age)[count]",
                    Arc::new(arrow::array::UInt64Array::from(vec![n as u64])),
                ),
                ("var(age)[mean]", Arc::new(Float64Array::from(vec![mean]))),
                ("var(age)[m2]", Arc::new(Float64Array::from(vec![m2]))),
                ("__cell_key", keys(&[group.0])),
            ]),
            columns: vec![
                StateColumn::patients("patients"),
                StateColumn::state("var(age)[count]", 0, "var", "count"),
                StateColumn::state("var(age)[mean]", 0, "var", "mean"),
                StateColumn::state("var(age)[m2]", 0, "var", "m2"),
                StateColumn::cell_key("__cell_key", None),
            ],
            contributions: Some(Contributions {
                batch: batch(vec![
                    ("patient", ints(&(0..12).collect::<Vec<_>>())),
                    (
                        "c0",
                        ints(&[90, 60, 65, 70, 75, 70, 70, 65, 70, 75, 60, 70]),
                    ),
                ]),
                aggregates: vec![0],
            }),
        },
        &cell_key_rules(),
        100,
    )
    .expect("protect");
    let t = tables();
    let released_n = t.count(12, group) as f64;
    assert_eq!(
        column_i64(&out.batch, "var(age)[count]"),
        vec![released_n as i64]
    );
    let released_mean = out.batch.column(2).as_primitive::<Float64Type>().value(0);
    let want = t.sum(mean * n as f64, 90.0, group) / released_n;
    assert!(
        (released_mean - want).abs() < 1e-9,
        "{released_mean} for {want}"
    );
    // The sample variance is the group's own: m2 / (n − 1) = 9.
    let released_m2 = out.batch.column(3).as_primitive::<Float64Type>().value(0);
    assert!((released_m2 / (released_n - 1.0) - 9.0).abs() < 1e-9);
}
