//! Loading the shipped schema and rejecting inconsistent schema files.

use arrow::datatypes::DataType;
use trustql_schemas::{DisclosureClass, SchemaError, TrustSchema};

const TABLES: [&str; 8] = [
    "sim_av_patient",
    "sim_av_tumour",
    "sim_sact_regimen",
    "sim_sact_cycle",
    "sim_sact_drug_detail",
    "sim_sact_outcome",
    "sim_rtds_episode",
    "sim_rtds_prescription",
];

#[test]
fn shipped_schema_has_the_simulacrum_tables_in_lower_case() {
    let schema = TrustSchema::cancer().expect("shipped schema loads");
    assert_eq!(schema.info().version, "1.0.0");
    let names: Vec<&str> = schema.tables().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, TABLES);
    for table in schema.tables() {
        for column in &table.columns {
            assert_eq!(column.name, column.name.to_lowercase());
        }
    }
}

#[test]
fn arrow_schemas_carry_the_declared_types() {
    let schema = TrustSchema::cancer().expect("loads");
    let tumour = schema.arrow_schema("sim_av_tumour").expect("tumour");
    let field = |n: &str| tumour.field_with_name(n).expect(n).data_type().clone();
    assert_eq!(field("patientid"), DataType::Int64);
    assert_eq!(field("diagnosisdatebest"), DataType::Date32);
    assert_eq!(field("stage_best"), DataType::Utf8);
    assert_eq!(field("age"), DataType::Int64);
    assert!(matches!(
        schema.arrow_schema("nope"),
        Err(SchemaError::UnknownTable(_))
    ));
}

#[test]
fn identifiers_dates_and_codes_are_classified() {
    let schema = TrustSchema::cancer().expect("loads");
    let class = |t: &str, c: &str| schema.table(t).expect(t).column(c).expect(c).class;
    for (t, c) in [
        ("sim_av_patient", "patientid"),
        ("sim_av_patient", "linknumber"),
        ("sim_av_tumour", "tumourid"),
        ("sim_sact_regimen", "merged_regimen_id"),
        ("sim_sact_cycle", "merged_cycle_id"),
        ("sim_sact_drug_detail", "merged_drug_detail_id"),
    ] {
        assert_eq!(class(t, c), DisclosureClass::DirectIdentifier, "{t}.{c}");
    }
    for (t, c) in [
        ("sim_av_tumour", "diagnosisdatebest"),
        ("sim_av_tumour", "age"),
        ("sim_av_patient", "ethnicity"),
        ("sim_av_patient", "gender"),
        ("sim_av_tumour", "quintile_2019"),
    ] {
        assert_eq!(class(t, c), DisclosureClass::QuasiIdentifier, "{t}.{c}");
    }
    assert_eq!(
        class("sim_av_tumour", "stage_best"),
        DisclosureClass::Clinical
    );
    let gender = schema.code_set("gender").expect("gender codes");
    let codes = gender.code_set();
    for code in ["1", "2", "9"] {
        assert!(codes.contains(code));
    }
    let vital = schema
        .code_set("vitalstatus")
        .expect("vital status codes")
        .code_set();
    for code in ["A", "D", "X"] {
        assert!(vital.contains(code));
    }
}

/// The public Simulacrum value counts the synthetic generator is calibrated on (in the repository,
/// a copy of /work/shared/reference/simulacrum/tumour_value_counts_v1.2.csv).
const VALUE_COUNTS: &str = include_str!("../synth/data/tumour_value_counts_v1.2.csv");

#[test]
fn the_three_character_site_holds_exactly_the_published_sites() {
    let schema = TrustSchema::cancer().expect("loads");
    let tumour = schema.table("sim_av_tumour").expect("tumour");
    let column = tumour.column("site_icd10_o2_3char").expect("site");
    assert_eq!(column.code_set.as_deref(), Some("site_icd10_3char"));
    let set = schema.code_set("site_icd10_3char").expect("site codes");
    let listed: Vec<&str> = set.codes.iter().map(|c| c.code.as_str()).collect();
    // `None` is how the counts write a null; every other value is a code.
    let published: Vec<&str> = VALUE_COUNTS
        .lines()
        .filter_map(|line| line.strip_prefix("SITE_ICD10_O2_3CHAR,"))
        .filter_map(|rest| rest.split(',').next())
        .filter(|code| *code != "None")
        .collect();
    assert_eq!(published.len(), 115);
    assert_eq!(listed, published);
}

#[test]
fn every_table_reaches_the_patient() {
    let schema = TrustSchema::cancer().expect("loads");
    assert!(
        schema
            .patient_path("sim_av_patient")
            .expect("path")
            .is_empty()
    );
    let path = schema.patient_path("sim_sact_drug_detail").expect("path");
    let steps: Vec<(&str, &str)> = path
        .iter()
        .map(|h| (h.table.as_str(), h.column.as_str()))
        .collect();
    assert_eq!(
        steps,
        [
            ("sim_sact_drug_detail", "merged_cycle_id"),
            ("sim_sact_cycle", "merged_regimen_id"),
            ("sim_sact_regimen", "encore_patient_id"),
        ]
    );
    assert_eq!(path[2].parent_table, "sim_av_patient");
    assert_eq!(path[2].parent_column, "patientid");
}

/// A small valid schema that each test below breaks in one way.
const BASE: &str = r#"
[schema]
name = "t"
version = "0.1.0"
based_on = "test"
patient_table = "p"

[[table]]
name = "p"
description = "patients"
primary_key = "id"
columns = [
  { name = "id", type = "int64", class = "direct_identifier", description = "id" },
  { name = "sex", type = "utf8", class = "quasi_identifier", code_set = "sex", description = "sex" },
]

[[table]]
name = "t"
description = "tumours"
columns = [
  { name = "pid", type = "int64", class = "direct_identifier", references = "p.id", description = "patient" },
]

[code_sets.sex]
lookup = "test"
codes = [ { code = "1" }, { code = "2" } ]
"#;

fn inconsistent(text: &str) -> String {
    match TrustSchema::from_toml(text) {
        Err(SchemaError::Inconsistent(msg)) => msg,
        other => panic!("expected an inconsistency, got {other:?}"),
    }
}

#[test]
fn the_test_base_schema_is_valid() {
    TrustSchema::from_toml(BASE).expect("base schema is valid");
}

#[test]
fn unknown_keys_are_refused() {
    let text = BASE.replace(
        "based_on = \"test\"",
        "based_on = \"test\"\ncolour = \"red\"",
    );
    assert!(matches!(
        TrustSchema::from_toml(&text),
        Err(SchemaError::Parse(_))
    ));
    let text = BASE.replace("type = \"utf8\"", "type = \"string\"");
    assert!(matches!(
        TrustSchema::from_toml(&text),
        Err(SchemaError::Parse(_))
    ));
}

#[test]
fn undefined_code_sets_are_refused() {
    let msg = inconsistent(&BASE.replace("code_set = \"sex\"", "code_set = \"gender\""));
    assert!(msg.contains("gender"), "{msg}");
}

#[test]
fn dangling_references_are_refused() {
    let msg = inconsistent(&BASE.replace("references = \"p.id\"", "references = \"q.id\""));
    assert!(msg.contains("`q`"), "{msg}");
    let msg = inconsistent(&BASE.replace("references = \"p.id\"", "references = \"p.sex\""));
    assert!(msg.contains("primary key"), "{msg}");
    let msg = inconsistent(&BASE.replace("references = \"p.id\"", "references = \"pid\""));
    assert!(msg.contains("table.column"), "{msg}");
}

#[test]
fn upper_case_and_duplicate_columns_are_refused() {
    let msg = inconsistent(&BASE.replace("name = \"sex\"", "name = \"SEX\""));
    assert!(msg.contains("lower case"), "{msg}");
    let msg = inconsistent(&BASE.replace("name = \"sex\"", "name = \"id\""));
    assert!(msg.contains("twice"), "{msg}");
}

#[test]
fn tables_that_cannot_reach_the_patient_are_refused() {
    let msg = inconsistent(&BASE.replace(", references = \"p.id\"", ""));
    assert!(msg.contains("no foreign key"), "{msg}");
    let msg = inconsistent(&BASE.replace("patient_table = \"p\"", "patient_table = \"x\""));
    assert!(msg.contains("patient table"), "{msg}");
}

#[test]
fn missing_schema_file_is_an_io_error() {
    let err = TrustSchema::from_path(std::path::Path::new("/nonexistent/schema.toml"))
        .expect_err("no such file");
    assert!(matches!(err, SchemaError::Io { .. }));
}
