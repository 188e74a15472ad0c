//! Disclosure control on partial answers: one test per rule.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, AsArray, Float64Array, Int64Array, RecordBatch, StringArray, UInt8Array,
};
use arrow::datatypes::{DataType, Field, Int64Type, Schema};
use trustql_policies::{
    Contributions, Disclosure, Dominance, MAX_MIN_PATIENTS, PATIENT_COUNT_CAP, PartialAnswer,
    ReleaseError, Rounding, Rule, StateColumn, TotalsRules, protect, round, round_count,
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

fn strings(v: &[Option<&str>]) -> ArrayRef {
    Arc::new(StringArray::from(v.to_vec()))
}

fn ints(v: &[i64]) -> ArrayRef {
    Arc::new(Int64Array::from(v.to_vec()))
}

fn keys(b: &RecordBatch, column: usize) -> Vec<Option<String>> {
    b.column(column)
        .as_string::<i32>()
        .iter()
        .map(|v| v.map(str::to_string))
        .collect()
}

fn key() -> StateColumn {
    StateColumn::key("k")
}

fn patients() -> StateColumn {
    StateColumn::patients("patients")
}

fn count() -> StateColumn {
    StateColumn::state("count(*)[count]", 0, "count", "count")
}

fn sum() -> StateColumn {
    StateColumn::state("sum(x)[sum]", 1, "sum", "sum")
}

fn gid() -> StateColumn {
    StateColumn::grouping_id("__grouping_id")
}

/// The batch with its columns described, as the node hands it over.
fn described(b: &RecordBatch, columns: &[StateColumn]) -> PartialAnswer {
    PartialAnswer {
        batch: b.clone(),
        columns: columns.to_vec(),
        contributions: None,
    }
}

fn refusal(e: ReleaseError) -> trustql_policies::Refusal {
    match e {
        ReleaseError::Refused(r) => r,
        other => panic!("expected a refusal, got {other}"),
    }
}

fn no_rounding() -> Disclosure {
    Disclosure {
        rounding: Rounding::None,
        withhold_whole_margin_cells: false,
        ..Disclosure::default()
    }
}

#[test]
fn groups_below_the_minimum_are_withheld() {
    let b = batch(vec![
        ("site", strings(&[Some("C50"), Some("C34"), Some("C69")])),
        ("patients", ints(&[120, 10, 9])),
        ("count", ints(&[130, 11, 9])),
    ]);
    let roles = [key(), patients(), count()];
    let out = protect(&described(&b, &roles), &no_rounding(), 100).expect("protect");
    assert_eq!(
        keys(&out.batch, 0),
        vec![Some("C50".into()), Some("C34".into())]
    );
    assert_eq!(out.report.released, 2);
    assert_eq!(out.report.small, 1);
    assert_eq!(out.report.withheld(), 1);
}

#[test]
fn counts_and_patient_counts_are_rounded() {
    let b = batch(vec![
        ("site", strings(&[Some("C50"), Some("C34")])),
        ("patients", ints(&[123, 17])),
        ("count", ints(&[131, 18])),
        (
            "sum_age",
            Arc::new(Float64Array::from(vec![8123.0, 1200.5])),
        ),
    ]);
    let roles = [key(), patients(), count(), sum()];
    let rules = Disclosure {
        rounding: Rounding::Base,
        rounding_base: 5,
        withhold_whole_margin_cells: false,
        ..Disclosure::default()
    };
    let out = protect(&described(&b, &roles), &rules, 100).expect("protect");
    let counts: Vec<i64> = out
        .batch
        .column(2)
        .as_primitive::<Int64Type>()
        .values()
        .to_vec();
    let patients: Vec<i64> = out
        .batch
        .column(1)
        .as_primitive::<Int64Type>()
        .values()
        .to_vec();
    assert_eq!(counts, vec![130, 20]);
    assert_eq!(patients, vec![125, 15]);
    // Sums are not counts: released as computed.
    assert_eq!(out.batch.column(3).data_type(), &DataType::Float64);

    let m6 = Disclosure {
        rounding: Rounding::Midpoint6,
        withhold_whole_margin_cells: false,
        ..Disclosure::default()
    };
    let out = protect(&described(&b, &roles), &m6, 100).expect("protect");
    let counts: Vec<i64> = out
        .batch
        .column(2)
        .as_primitive::<Int64Type>()
        .values()
        .to_vec();
    // ceil(131/6)*6 - 3 = 129; ceil(18/6)*6 - 3 = 15.
    assert_eq!(counts, vec![129, 15]);
}

#[test]
fn dominated_sums_are_withheld_by_their_largest_contributions() {
    let b = batch(vec![
        ("drug", strings(&[Some("A"), Some("B")])),
        ("patients", ints(&[50, 50])),
        ("dose", Arc::new(Float64Array::from(vec![1000.0, 1000.0]))),
    ]);
    // A: three patients give 500, 450 and 50 (the two largest are 95%); B: ten give 100 each.
    let mut drug = vec![Some("A"); 3];
    drug.extend([Some("B"); 10]);
    let mut dose = vec![500.0, 450.0, 50.0];
    dose.extend([100.0; 10]);
    let per_patient = batch(vec![
        ("drug", strings(&drug)),
        ("patientid", ints(&(0..13).collect::<Vec<i64>>())),
        ("dose", Arc::new(Float64Array::from(dose))),
    ]);
    let mut answer = described(&b, &[key(), patients(), sum()]);
    answer.contributions = Some(Contributions {
        batch: per_patient,
        aggregates: vec![1],
    });
    let rules = Disclosure {
        dominance: Some(Dominance { n: 2, k: 90.0 }),
        ..no_rounding()
    };
    let out = protect(&answer, &rules, 100).expect("protect");
    assert_eq!(keys(&out.batch, 0), vec![Some("B".into())]);
    assert_eq!(out.report.dominated, 1);
    assert_eq!(out.batch.num_columns(), 3, "no helper column leaves");

    // A dominance rule without the contributions it needs is a fault, not a silent release
    // and not a refusal.
    answer.contributions = None;
    assert!(matches!(
        protect(&answer, &rules, 100),
        Err(ReleaseError::Internal(_))
    ));
}

#[test]
fn a_group_holding_its_whole_margin_is_withheld() {
    // Site C34: every patient dead (its row has one cell) -> 100% of its row.
    // (C50, A): every alive patient has site C50 (its column has one cell) -> 100% of its column.
    let b = batch(vec![
        ("site", strings(&[Some("C34"), Some("C50"), Some("C50")])),
        ("vital", strings(&[Some("D"), Some("A"), Some("D")])),
        ("patients", ints(&[40, 300, 25])),
    ]);
    let roles = [key(), key(), patients()];
    let rules = Disclosure {
        withhold_whole_margin_cells: true,
        ..no_rounding()
    };
    let out = protect(&described(&b, &roles), &rules, 100).expect("protect");
    assert_eq!(out.report.whole_margin, 2);
    assert_eq!(keys(&out.batch, 0), vec![Some("C50".into())]);
    assert_eq!(keys(&out.batch, 1), vec![Some("D".into())]);

    // A single-key answer with one group is the whole trust's patients.
    let one = batch(vec![
        ("vital", strings(&[Some("D")])),
        ("patients", ints(&[40])),
    ]);
    let out = protect(&described(&one, &[key(), patients()]), &rules, 100).expect("protect");
    assert_eq!(out.report.whole_margin, 1);
    assert_eq!(out.batch.num_rows(), 0);
}

#[test]
fn rollup_margins_of_a_withheld_cell_are_withheld() {
    // ROLLUP(site, stage): (C50,1)=30 (C50,2)=5 (C50)=35 (C34,1)=20 (C34,2)=25 (C34)=45 ()=80.
    // Releasing (C50) and (C50,1) would give (C50,2) = 35 - 30 by subtraction.
    let b = batch(vec![
        (
            "site",
            strings(&[
                Some("C50"),
                Some("C50"),
                Some("C50"),
                Some("C34"),
                Some("C34"),
                Some("C34"),
                None,
            ]),
        ),
        (
            "stage",
            strings(&[Some("1"), Some("2"), None, Some("1"), Some("2"), None, None]),
        ),
        (
            "__grouping_id",
            Arc::new(UInt8Array::from(vec![0u8, 0, 1, 0, 0, 1, 3])),
        ),
        ("patients", ints(&[30, 5, 35, 20, 25, 45, 80])),
    ]);
    let roles = [key(), key(), gid(), patients()];
    let out = protect(&described(&b, &roles), &no_rounding(), 100).expect("protect");
    assert_eq!(out.report.small, 1);
    assert_eq!(
        out.report.margin_of_withheld, 2,
        "(C50) and the grand total"
    );
    let site = keys(&out.batch, 0);
    let stage = keys(&out.batch, 1);
    let released: Vec<(Option<String>, Option<String>)> = site.into_iter().zip(stage).collect();
    assert_eq!(
        released,
        vec![
            (Some("C50".into()), Some("1".into())),
            (Some("C34".into()), Some("1".into())),
            (Some("C34".into()), Some("2".into())),
            (Some("C34".into()), None),
        ]
    );
}

#[test]
fn too_many_groups_is_a_refusal() {
    let b = batch(vec![
        ("site", strings(&[Some("a"), Some("b"), Some("c")])),
        ("patients", ints(&[50, 50, 50])),
    ]);
    let err = protect(&described(&b, &[key(), patients()]), &no_rounding(), 2).expect_err("cap");
    assert_eq!(refusal(err).rule, Rule::TooManyGroups);
}

#[test]
fn more_than_64_keys_is_a_refusal() {
    let mut columns: Vec<(String, ArrayRef)> = (0..65)
        .map(|k| (format!("k{k}"), strings(&[Some("a")])))
        .collect();
    columns.push(("patients".into(), ints(&[50])));
    let b = batch(
        columns
            .iter()
            .map(|(n, a)| (n.as_str(), Arc::clone(a)))
            .collect(),
    );
    let mut roles = vec![key(); 65];
    roles.push(patients());
    let err = refusal(protect(&described(&b, &roles), &no_rounding(), 100).expect_err("64 keys"));
    assert_eq!(err.rule, Rule::Unsupported);
    assert!(err.to_string().contains("64 keys"), "{err}");
}

#[test]
fn a_capped_patient_count_still_passes_every_threshold_after_rounding() {
    // Nodes stop counting a group's patients at the cap and round what they send on; the
    // coordinator compares the sum with its own minimum, at most MAX_MIN_PATIENTS.
    let cap = PATIENT_COUNT_CAP as i64;
    let highest = MAX_MIN_PATIENTS as i64;
    for base in 2..=MAX_MIN_PATIENTS {
        let rules = Disclosure {
            rounding: Rounding::Base,
            rounding_base: base,
            ..Disclosure::default()
        };
        assert!(round(cap, &rules) >= highest, "base {base}");
    }
    let midpoint6 = Disclosure {
        rounding: Rounding::Midpoint6,
        ..Disclosure::default()
    };
    assert!(round(cap, &midpoint6) >= highest);
}

#[test]
fn the_totals_rounding_expression_is_the_nodes_rounding() {
    use datafusion::arrow::array::Int64Array as DfInt64;
    use datafusion::prelude::{SessionContext, col};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let values: Vec<i64> = (-20..=200).collect();
    for (rounding, base) in [
        (Rounding::None, 5),
        (Rounding::Base, 5),
        (Rounding::Base, 10),
        (Rounding::Base, 3),
        (Rounding::Midpoint6, 5),
    ] {
        let rules = TotalsRules {
            min_patients: 0,
            rounding,
            rounding_base: base,
        };
        let ctx = SessionContext::new();
        let input = batch(vec![("x", ints(&values))]);
        let got = runtime.block_on(async {
            let frame = ctx.read_batch(input).expect("frame");
            let out = frame
                .select(vec![rules.rounded(col("x")).alias("r")])
                .expect("select")
                .collect()
                .await
                .expect("collect");
            out.iter()
                .flat_map(|b| {
                    b.column(0)
                        .as_any()
                        .downcast_ref::<DfInt64>()
                        .expect("ints")
                        .values()
                        .to_vec()
                })
                .collect::<Vec<i64>>()
        });
        let want: Vec<i64> = values
            .iter()
            .map(|&x| round_count(x, rounding, base))
            .collect();
        assert_eq!(got, want, "{rounding:?} {base}");
    }
}
