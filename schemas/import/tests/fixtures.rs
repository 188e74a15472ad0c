//! The importer on small CSV fixtures written with the exact Simulacrum v2.1.0 headers.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::concat_batches;
use arrow::datatypes::{Date32Type, Float64Type, Int64Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use trustql_import::{ImportConfig, ImportError, assign_trust, import_simulacrum};
use trustql_schemas::{TrustSchema, check_site, trust_codes};

/// The v2.1.0 download's headers, copied from the data dictionary's field lists.
const HEADERS: [(&str, &str); 8] = [
    (
        "sim_av_patient",
        "PATIENTID,GENDER,ETHNICITY,DEATHCAUSECODE_1A,DEATHCAUSECODE_1B,DEATHCAUSECODE_1C,DEATHCAUSECODE_2,DEATHCAUSECODE_UNDERLYING,DEATHLOCATIONCODE,VITALSTATUS,VITALSTATUSDATE,LINKNUMBER",
    ),
    (
        "sim_av_tumour",
        "TUMOURID,GENDER,PATIENTID,DIAGNOSISDATEBEST,SITE_ICD10_O2_3CHAR,SITE_ICD10_O2,SITE_ICD10R4_O2_3CHAR_FROM2013,SITE_ICD10R4_O2_FROM2013,SITE_ICDO3REV2011,SITE_ICDO3REV2011_3CHAR,MORPH_ICD10_O2,MORPH_ICDO3REV2011,BEHAVIOUR_ICD10_O2,BEHAVIOUR_ICDO3REV2011,T_BEST,N_BEST,M_BEST,STAGE_BEST,GRADE,AGE,CREG_CODE,STAGE_BEST_SYSTEM,LATERALITY,SCREENINGSTATUSFULL_CODE,ER_STATUS,PR_STATUS,HER2_STATUS,QUINTILE_2019,DATE_FIRST_SURGERY,CANCERCAREPLANINTENT,PERFORMANCESTATUS,CHRL_TOT_27_03,COMORBIDITIES_27_03,GLEASON_PRIMARY,GLEASON_SECONDARY,GLEASON_TERTIARY,GLEASON_COMBINED",
    ),
    (
        "sim_sact_regimen",
        "ENCORE_PATIENT_ID,MERGED_REGIMEN_ID,HEIGHT_AT_START_OF_REGIMEN,WEIGHT_AT_START_OF_REGIMEN,INTENT_OF_TREATMENT,DATE_DECISION_TO_TREAT,START_DATE_OF_REGIMEN,MAPPED_REGIMEN,CLINICAL_TRIAL,CHEMO_RADIATION,BENCHMARK_GROUP,LINK_NUMBER",
    ),
    (
        "sim_sact_cycle",
        "MERGED_REGIMEN_ID,MERGED_CYCLE_ID,CYCLE_NUMBER,START_DATE_OF_CYCLE,OPCS_PROCUREMENT_CODE,PERF_STATUS_START_OF_CYCLE",
    ),
    (
        "sim_sact_drug_detail",
        "MERGED_DRUG_DETAIL_ID,MERGED_CYCLE_ID,ACTUAL_DOSE_PER_ADMINISTRATION,OPCS_DELIVERY_CODE,ADMINISTRATION_ROUTE,ADMINISTRATION_DATE,DRUG_GROUP",
    ),
    (
        "sim_sact_outcome",
        "MERGED_REGIMEN_ID,DATE_OF_FINAL_TREATMENT,REGIMEN_MOD_DOSE_REDUCTION,REGIMEN_MOD_TIME_DELAY,REGIMEN_MOD_STOPPED_EARLY,REGIMEN_OUTCOME_SUMMARY",
    ),
    (
        "sim_rtds_episode",
        "PATIENTID,RADIOTHERAPYEPISODEID,ATTENDID,APPTDATE,LINKCODE,DECISIONTOTREATDATE,EARLIESTCLINAPPROPDATE,RADIOTHERAPYPRIORITY,RADIOTHERAPYINTENT",
    ),
    (
        "sim_rtds_prescription",
        "PATIENTID,PRESCRIPTIONID,RTTREATMENTMODALITY,RTPRESCRIBEDDOSE,PRESCRIBEDFRACTIONS,RTACTUALDOSE,RTACTUALFRACTIONS,TREATMENTREGION,TREATMENTANATOMICALSITE,RADIOTHERAPYEPISODEID,ATTENDID,APPTDATE,LINKCODE",
    ),
];

const PATIENTS: i64 = 60;

/// Builds CSV text: the header, then rows given as (field, value) pairs, other fields empty.
struct Csv {
    header: Vec<&'static str>,
    text: String,
}

impl Csv {
    fn new(table: &str) -> Self {
        let header = HEADERS
            .iter()
            .find(|(t, _)| *t == table)
            .map(|(_, h)| *h)
            .expect("header");
        Csv {
            header: header.split(',').collect(),
            text: format!("{header}\n"),
        }
    }

    fn row(&mut self, values: &[(&str, String)]) {
        let given: HashMap<&str, &str> = values.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert!(
            given.keys().all(|k| self.header.contains(k)),
            "fixture names a field"
        );
        let fields: Vec<String> = self
            .header
            .iter()
            .map(|h| {
                let v = given.get(h).copied().unwrap_or("");
                if v.contains(',') {
                    format!("\"{v}\"")
                } else {
                    v.to_string()
                }
            })
            .collect();
        self.text.push_str(&fields.join(","));
        self.text.push('\n');
    }
}

/// Writes the fixture download: 60 patients and their pathways, two orphan rows, a gene table.
fn write_fixtures(dir: &Path) {
    let mut patient = Csv::new("sim_av_patient");
    let mut tumour = Csv::new("sim_av_tumour");
    let mut regimen = Csv::new("sim_sact_regimen");
    let mut cycle = Csv::new("sim_sact_cycle");
    let mut drug = Csv::new("sim_sact_drug_detail");
    let mut outcome = Csv::new("sim_sact_outcome");
    let mut episode = Csv::new("sim_rtds_episode");
    let mut prescription = Csv::new("sim_rtds_prescription");
    let s = |v: &str| v.to_string();
    for i in 0..PATIENTS {
        let id = 10_000_001 + i;
        let dead = i % 4 == 0;
        patient.row(&[
            ("PATIENTID", id.to_string()),
            ("GENDER", s(if i % 2 == 0 { "1" } else { "2" })),
            ("ETHNICITY", s("A")),
            ("DEATHCAUSECODE_1A", s(if dead { "C349,J189" } else { "" })),
            (
                "DEATHCAUSECODE_UNDERLYING",
                s(if dead { "C349" } else { "" }),
            ),
            ("DEATHLOCATIONCODE", s(if dead { "1" } else { "" })),
            ("VITALSTATUS", s(if dead { "D" } else { "A" })),
            (
                "VITALSTATUSDATE",
                s(if dead { "2019-03-04" } else { "2022-07-05" }),
            ),
            ("LINKNUMBER", (900_000_000 + i).to_string()),
        ]);
        tumour.row(&[
            ("TUMOURID", (20_000_000 + i).to_string()),
            ("GENDER", s(if i % 2 == 0 { "1" } else { "2" })),
            ("PATIENTID", id.to_string()),
            ("DIAGNOSISDATEBEST", s("2017-06-15")),
            ("SITE_ICD10_O2_3CHAR", s("C34")),
            ("SITE_ICD10_O2", s("C349")),
            ("BEHAVIOUR_ICD10_O2", s("3")),
            ("STAGE_BEST", s(["1", "2", "3", "4"][(i % 4) as usize])),
            ("GRADE", s("G2")),
            ("AGE", (50 + i % 40).to_string()),
            ("QUINTILE_2019", s("1 - most deprived")),
            ("CHRL_TOT_27_03", s("0")),
        ]);
        if i % 3 == 0 {
            let reg = 30_000_000 + i;
            regimen.row(&[
                ("ENCORE_PATIENT_ID", id.to_string()),
                ("MERGED_REGIMEN_ID", reg.to_string()),
                ("HEIGHT_AT_START_OF_REGIMEN", s("1.72")),
                ("WEIGHT_AT_START_OF_REGIMEN", s("80")),
                ("INTENT_OF_TREATMENT", s("P")),
                ("START_DATE_OF_REGIMEN", s("2017-07-01")),
                ("MAPPED_REGIMEN", s("CARBOPLATIN + PEMETREXED")),
                ("LINK_NUMBER", (900_000_000 + i).to_string()),
            ]);
            outcome.row(&[
                ("MERGED_REGIMEN_ID", reg.to_string()),
                ("DATE_OF_FINAL_TREATMENT", s("2017-07-22")),
                ("REGIMEN_MOD_STOPPED_EARLY", s("N")),
            ]);
            for c in 0..2 {
                let cyc = reg * 10 + c;
                cycle.row(&[
                    ("MERGED_REGIMEN_ID", reg.to_string()),
                    ("MERGED_CYCLE_ID", cyc.to_string()),
                    ("CYCLE_NUMBER", (c + 1).to_string()),
                    (
                        "START_DATE_OF_CYCLE",
                        s(if c == 0 { "2017-07-01" } else { "2017-07-22" }),
                    ),
                ]);
                for k in 0..2 {
                    drug.row(&[
                        ("MERGED_DRUG_DETAIL_ID", (cyc * 10 + k).to_string()),
                        ("MERGED_CYCLE_ID", cyc.to_string()),
                        ("ACTUAL_DOSE_PER_ADMINISTRATION", s("600.5")),
                        ("ADMINISTRATION_ROUTE", s("1")),
                        (
                            "DRUG_GROUP",
                            s(if k == 0 { "CARBOPLATIN" } else { "PEMETREXED" }),
                        ),
                    ]);
                }
            }
        }
        if i % 5 == 0 {
            for n in 0..3 {
                let attend = format!("{i}-{n}");
                episode.row(&[
                    ("PATIENTID", id.to_string()),
                    ("RADIOTHERAPYEPISODEID", (40_000_000 + i).to_string()),
                    ("ATTENDID", attend.clone()),
                    ("APPTDATE", s("2017-08-01")),
                    ("RADIOTHERAPYINTENT", s("3")),
                ]);
                prescription.row(&[
                    ("PATIENTID", id.to_string()),
                    ("PRESCRIPTIONID", (50_000_000 + i).to_string()),
                    ("RTPRESCRIBEDDOSE", s("20")),
                    ("PRESCRIBEDFRACTIONS", s("5")),
                    ("RADIOTHERAPYEPISODEID", (40_000_000 + i).to_string()),
                    ("ATTENDID", attend),
                ]);
            }
        }
    }
    // Orphans: a tumour whose patient is absent, a drug whose cycle is absent.
    tumour.row(&[("TUMOURID", s("29999999")), ("PATIENTID", s("99999999"))]);
    drug.row(&[
        ("MERGED_DRUG_DETAIL_ID", s("1")),
        ("MERGED_CYCLE_ID", s("42")),
    ]);
    for (name, csv) in [
        ("sim_av_patient", patient),
        ("sim_av_tumour", tumour),
        ("sim_sact_regimen", regimen),
        ("sim_sact_cycle", cycle),
        ("sim_sact_drug_detail", drug),
        ("sim_sact_outcome", outcome),
        ("sim_rtds_episode", episode),
        ("sim_rtds_prescription", prescription),
    ] {
        std::fs::write(dir.join(format!("{name}.csv")), csv.text).expect("write csv");
    }
    std::fs::write(dir.join("sim_av_gene.csv"), "GENEID,TUMOURID\n1,20000000\n").expect("gene");
}

fn read(path: &Path) -> RecordBatch {
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(File::open(path).expect("open")).expect("pq");
    let schema = Arc::clone(builder.schema());
    let batches: Vec<RecordBatch> = builder
        .build()
        .expect("reader")
        .collect::<Result<_, _>>()
        .expect("batches");
    concat_batches(&schema, &batches).expect("concat")
}

fn config(trusts: usize) -> ImportConfig {
    ImportConfig {
        trusts,
        overwrite: false,
    }
}

#[test]
fn header_exact_fixtures_import_into_valid_sites() {
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = dir.path().join("csv");
    std::fs::create_dir(&csv).expect("mkdir");
    write_fixtures(&csv);
    let out = dir.path().join("out");
    let schema = TrustSchema::cancer().expect("schema");
    let summary = import_simulacrum(&schema, &csv, &config(3), &out).expect("import");

    assert_eq!(summary.total("sim_av_patient"), PATIENTS as u64);
    assert_eq!(summary.total("sim_av_tumour"), PATIENTS as u64);
    assert_eq!(summary.total("sim_sact_regimen"), 20);
    assert_eq!(summary.total("sim_sact_cycle"), 40);
    assert_eq!(summary.total("sim_sact_drug_detail"), 80);
    assert_eq!(summary.total("sim_sact_outcome"), 20);
    assert_eq!(summary.total("sim_rtds_episode"), 36);
    assert_eq!(summary.total("sim_rtds_prescription"), 36);
    assert_eq!(
        summary.orphans,
        BTreeMap::from([
            ("sim_av_tumour".to_string(), 1),
            ("sim_sact_drug_detail".to_string(), 1)
        ])
    );
    assert_eq!(summary.skipped_files, vec!["sim_av_gene.csv".to_string()]);
    assert!(summary.missing_tables.is_empty());

    // Every trust's files pass the schema check, which includes every key chain to the
    // patient: a patient's rows stayed together.
    for code in trust_codes(3) {
        let report = check_site(&schema, &out.join(&code)).expect("check");
        assert!(report.is_ok(), "{report}");
        let patients = read(&out.join(&code).join("sim_av_patient.parquet"));
        for id in patients
            .column(0)
            .as_primitive::<Int64Type>()
            .iter()
            .flatten()
        {
            assert_eq!(trust_codes(3)[assign_trust(id, 3)], code);
        }
    }

    // Values come through typed, with empty fields as nulls.
    let mut ages = 0;
    let mut doses = 0.0;
    for code in trust_codes(3) {
        let site = out.join(&code);
        let tumours = read(&site.join("sim_av_tumour.parquet"));
        ages += tumours
            .column_by_name("age")
            .expect("age")
            .as_primitive::<Int64Type>()
            .iter()
            .flatten()
            .sum::<i64>();
        let dates = tumours.column_by_name("diagnosisdatebest").expect("date");
        assert!(
            dates
                .as_primitive::<Date32Type>()
                .iter()
                .all(|d| d == Some(17_332))
        );
        assert_eq!(
            tumours.column_by_name("t_best").expect("t").null_count(),
            tumours.num_rows()
        );
        let drugs = read(&site.join("sim_sact_drug_detail.parquet"));
        doses += drugs
            .column_by_name("actual_dose_per_administration")
            .expect("dose")
            .as_primitive::<Float64Type>()
            .iter()
            .flatten()
            .sum::<f64>();
        let patients = read(&site.join("sim_av_patient.parquet"));
        let causes = patients.column_by_name("deathcausecode_1a").expect("cause");
        assert!(
            causes
                .as_string::<i32>()
                .iter()
                .flatten()
                .all(|c| c == "C349,J189")
        );
    }
    let expected_ages: i64 = (0..PATIENTS).map(|i| 50 + i % 40).sum();
    assert_eq!(ages, expected_ages);
    assert!((doses - 80.0 * 600.5).abs() < 1e-6);
}

#[test]
fn a_header_without_a_v2_field_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_fixtures(dir.path());
    let path = dir.path().join("sim_av_tumour.csv");
    let text = std::fs::read_to_string(&path).expect("read");
    std::fs::write(&path, text.replacen("STAGE_BEST,", "STAGE,", 1)).expect("write");
    let schema = TrustSchema::cancer().expect("schema");
    let err = import_simulacrum(&schema, dir.path(), &config(2), &dir.path().join("out"))
        .expect_err("bad header");
    assert!(matches!(err, ImportError::Header { .. }), "{err}");
    assert!(err.to_string().contains("STAGE_BEST"), "{err}");
}

#[test]
fn a_bad_value_names_line_and_column_but_not_the_value() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_fixtures(dir.path());
    let path = dir.path().join("sim_av_patient.csv");
    let text = std::fs::read_to_string(&path).expect("read");
    std::fs::write(&path, text.replacen("2022-07-05", "05/07/2022", 1)).expect("write");
    let schema = TrustSchema::cancer().expect("schema");
    let err = import_simulacrum(&schema, dir.path(), &config(2), &dir.path().join("out"))
        .expect_err("bad date");
    let msg = err.to_string();
    assert!(matches!(err, ImportError::Value { line: 3, .. }), "{msg}");
    assert!(msg.contains("VITALSTATUSDATE"), "{msg}");
    assert!(!msg.contains("05/07/2022"), "value echoed: {msg}");
}

#[test]
fn a_ragged_row_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_fixtures(dir.path());
    let path = dir.path().join("sim_sact_cycle.csv");
    let mut text = std::fs::read_to_string(&path).expect("read");
    text.push_str("1,2,3\n");
    std::fs::write(&path, text).expect("write");
    let schema = TrustSchema::cancer().expect("schema");
    let err = import_simulacrum(&schema, dir.path(), &config(2), &dir.path().join("out"))
        .expect_err("ragged");
    assert!(matches!(err, ImportError::Csv { .. }), "{err}");
}

#[test]
fn the_patient_table_is_required_and_others_are_optional() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_fixtures(dir.path());
    std::fs::remove_file(dir.path().join("sim_rtds_episode.csv")).expect("rm");
    let schema = TrustSchema::cancer().expect("schema");
    let summary = import_simulacrum(&schema, dir.path(), &config(2), &dir.path().join("out"))
        .expect("import without RT episodes");
    assert_eq!(summary.missing_tables, vec!["sim_rtds_episode".to_string()]);
    assert_eq!(summary.total("sim_rtds_episode"), 0);

    std::fs::remove_file(dir.path().join("sim_av_patient.csv")).expect("rm");
    let err = import_simulacrum(&schema, dir.path(), &config(2), &dir.path().join("out2"))
        .expect_err("no patients");
    assert!(matches!(err, ImportError::MissingPatients(_)));
}

#[test]
fn trust_assignment_is_stable_and_skewed() {
    let mut counts = [0u32; 3];
    for id in 10_000_001..10_030_001 {
        let trust = assign_trust(id, 3);
        assert_eq!(trust, assign_trust(id, 3));
        counts[trust] += 1;
    }
    assert!(counts[0] > counts[1] && counts[1] > counts[2], "{counts:?}");
    assert!(counts[2] > 0);
}
