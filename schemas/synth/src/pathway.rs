//! One patient's pathway: registration, tumours, vital status, chemotherapy and radiotherapy.

use std::collections::HashMap;

use rand::Rng;
use trustql_schemas::TrustSchema;

use crate::buffer::TableBuffer;
use crate::clinical::{self, SexRule};
use crate::error::SynthError;
use crate::marginals::{Categorical, Reference};

/// Table positions, in the schema's order (checked when the generator starts).
pub const TABLES: [&str; 8] = [
    "sim_av_patient",
    "sim_av_tumour",
    "sim_sact_regimen",
    "sim_sact_cycle",
    "sim_sact_drug_detail",
    "sim_sact_outcome",
    "sim_rtds_episode",
    "sim_rtds_prescription",
];
const PATIENT: usize = 0;
const TUMOUR: usize = 1;
const REGIMEN: usize = 2;
const CYCLE: usize = 3;
const DRUG: usize = 4;
const OUTCOME: usize = 5;
const RT_EPISODE: usize = 6;
const RT_PRESCRIPTION: usize = 7;

/// First day of the diagnosis window, 2016-01-01 (days since 1970-01-01).
pub const FIRST_DIAGNOSIS: i32 = 16_801;
/// Last day of the diagnosis window, 2019-12-31.
pub const LAST_DIAGNOSIS: i32 = 18_261;
/// End of follow-up, 2022-07-05.
pub const FOLLOW_UP_END: i32 = 19_178;

/// Ethnicity of people diagnosed with cancer in England (approximate shares, per 10,000).
pub const ETHNICITY: &[(&str, u64)] = &[
    ("A", 7_800),
    ("B", 120),
    ("C", 300),
    ("D", 40),
    ("E", 20),
    ("F", 30),
    ("G", 40),
    ("H", 150),
    ("J", 80),
    ("K", 30),
    ("L", 80),
    ("M", 90),
    ("N", 80),
    ("P", 20),
    ("R", 30),
    ("S", 90),
    ("Z", 650),
    ("X", 350),
];

/// The sampling distributions, built once from the reference marginals and the schema.
pub(crate) struct Distributions {
    site: Categorical,
    site4: HashMap<String, Categorical>,
    morph: Categorical,
    t_best: Categorical,
    n_best: Categorical,
    m_best: Categorical,
    stage: Categorical,
    grade: Categorical,
    age: Categorical,
    creg: Categorical,
    stage_system: Categorical,
    laterality: Categorical,
    screening: Categorical,
    er: Categorical,
    pr: Categorical,
    her2: Categorical,
    quintile: Categorical,
    careplan: Categorical,
    performance: Categorical,
    gleason_primary: Categorical,
    gleason_secondary: Categorical,
    ethnicity: Categorical,
    /// Chance of being male for a first tumour at a site open to both sexes, chosen so the
    /// overall sex ratio matches the reference.
    male_if_any: f64,
}

impl Distributions {
    /// Builds the distributions, keeping coded fields within the schema's code sets.
    pub(crate) fn new(schema: &TrustSchema) -> Result<Self, SynthError> {
        let reference = Reference::load();
        let codes = |name: &str| {
            schema
                .code_set(name)
                .map(|s| s.code_set())
                .ok_or_else(|| SynthError::Schema(format!("code set `{name}` is missing")))
        };
        let non_null = |c: Categorical| c.filtered(|v| v.is_some());
        let site =
            non_null(reference.marginal_in("SITE_ICD10_O2_3CHAR", &codes("site_icd10_3char")?));
        let mut site4: HashMap<String, Vec<(Option<String>, u64)>> = HashMap::new();
        for (value, weight) in reference.marginal("SITE_ICD10_O2").weights() {
            if let Some(v) = value
                && v.len() >= 4
            {
                site4
                    .entry(v[..3].to_string())
                    .or_default()
                    .push((Some(v.to_string()), weight));
            }
        }
        let quintile_codes = codes("quintile")?;
        let quintile = Categorical::new(reference.marginal("QUINTILE_2015").weights().filter_map(
            |(v, w)| {
                let code = match v? {
                    "1" => "1 - most deprived",
                    "5" => "5 - least deprived",
                    other => other,
                };
                quintile_codes
                    .contains(code)
                    .then(|| (Some(code.to_string()), w))
            },
        ));
        let sex = reference.marginal("SEX").probabilities();
        let male = sex.get(&Some("1".to_string())).copied().unwrap_or(0.5);
        let female = sex.get(&Some("2".to_string())).copied().unwrap_or(0.5);
        let target_male = male / (male + female).max(f64::MIN_POSITIVE);
        let (mut male_only, mut female_only, mut breast) = (0.0, 0.0, 0.0);
        for (value, p) in site.probabilities() {
            match value.as_deref().map(clinical::sex_rule) {
                Some(SexRule::Male) => male_only += p,
                Some(SexRule::Female) => female_only += p,
                Some(SexRule::MostlyFemale) => breast += p,
                _ => {}
            }
        }
        let open = (1.0 - male_only - female_only - breast).max(f64::MIN_POSITIVE);
        let male_if_any = ((target_male - male_only - 0.01 * breast) / open).clamp(0.0, 1.0);
        Ok(Distributions {
            site,
            site4: site4
                .into_iter()
                .map(|(k, v)| (k, Categorical::new(v)))
                .collect(),
            morph: non_null(reference.marginal("MORPH_ICD10_O2")),
            t_best: reference.marginal("T_BEST"),
            n_best: reference.marginal("N_BEST"),
            m_best: reference.marginal("M_BEST"),
            stage: reference.marginal_in("STAGE_BEST", &codes("stage")?),
            grade: reference.marginal_in("GRADE", &codes("grade")?),
            age: non_null(reference.marginal("AGE")),
            creg: non_null(reference.marginal("CREG_CODE")),
            stage_system: reference.marginal("STAGE_BEST_SYSTEM"),
            laterality: reference.marginal_in("LATERALITY", &codes("laterality")?),
            screening: non_null(reference.marginal("SCREENINGSTATUSFULL_CODE")),
            er: non_null(reference.marginal("ER_STATUS")),
            pr: non_null(reference.marginal("PR_STATUS")),
            her2: non_null(reference.marginal("HER2_STATUS")),
            quintile,
            careplan: reference
                .marginal_in("CANCERCAREPLANINTENT", &codes("cancercareplanintent")?),
            performance: reference.marginal_in("PERFORMANCESTATUS", &codes("performancestatus")?),
            gleason_primary: reference
                .marginal("GLEASON_PRIMARY")
                .filtered(|v| matches!(v, Some("3" | "4" | "5"))),
            gleason_secondary: reference
                .marginal("GLEASON_SECONDARY")
                .filtered(|v| matches!(v, Some("3" | "4" | "5"))),
            ethnicity: Categorical::of(ETHNICITY),
            male_if_any,
        })
    }
}

/// Where a patient is seen: the diagnosing trust, and the treating trust if different.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Placement {
    /// Trust that registers the diagnosis (and treats, when not shared).
    pub home: usize,
    /// Second trust giving the treatment, for patients seen at two trusts.
    pub treating: Option<usize>,
}

/// Patient identifiers derived from the patient's global index, unique across the federation.
#[derive(Debug, Clone, Copy)]
struct Ids {
    index: u64,
}

impl Ids {
    fn patientid(self, second_trust: bool) -> i64 {
        10_000_001 + 2 * self.index as i64 + i64::from(second_trust)
    }
    /// A 9-digit stand-in for the NHS number; multiplying by a unit modulo 9e8 keeps it unique.
    fn linknumber(self) -> i64 {
        ((self.index as u128 * 123_456_791) % 900_000_000) as i64 + 100_000_000
    }
    fn tumourid(self, k: usize) -> i64 {
        100_000_001 + 4 * self.index as i64 + k as i64
    }
    fn regimenid(self, k: usize) -> i64 {
        200_000_001 + 4 * self.index as i64 + k as i64
    }
    fn episodeid(self, k: usize) -> i64 {
        300_000_001 + 2 * self.index as i64 + k as i64
    }
    fn prescriptionid(self, k: usize) -> i64 {
        400_000_001 + 2 * self.index as i64 + k as i64
    }
}

fn normal<R: Rng>(rng: &mut R, mean: f64, sd: f64) -> f64 {
    // Box–Muller: heights and weights only need a bell shape.
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    mean + sd * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn chance<R: Rng>(rng: &mut R, p: f64) -> bool {
    rng.random::<f64>() < p
}

struct TumourFacts {
    site: String,
    site4: String,
    stage: Option<String>,
    diagnosed: i32,
}

/// Writes every record of patient `index` into the per-trust buffers (`out[trust][table]`).
pub(crate) fn generate_patient<R: Rng>(
    d: &Distributions,
    index: u64,
    placement: Placement,
    trust_codes: &[String],
    rng: &mut R,
    out: &mut [Vec<TableBuffer>],
) {
    let ids = Ids { index };

    // Tumours: the first decides sex; later ones are drawn compatible with it.
    let tumour_count = match rng.random_range(0..100) {
        0..94 => 1,
        94..99 => 2,
        _ => 3,
    };
    let first_site = d.site.sample(rng).unwrap_or("C80").to_string();
    let male = match clinical::sex_rule(&first_site) {
        SexRule::Male => true,
        SexRule::Female => false,
        SexRule::MostlyFemale => chance(rng, 0.01),
        SexRule::Any => chance(rng, d.male_if_any),
    };
    let gender = if male { "1" } else { "2" };
    let first_day = rng.random_range(FIRST_DIAGNOSIS..=LAST_DIAGNOSIS);
    let first_age: i64 = d.age.sample(rng).and_then(|a| a.parse().ok()).unwrap_or(70);
    let creg = d.creg.sample(rng).map(str::to_string);
    let quintile = d.quintile.sample(rng).map(str::to_string);

    let first_site4 = site4(d, rng, &first_site);
    let first_stage = d.stage.sample(rng).map(str::to_string);

    // Survival from the first tumour: exponential with a hazard by site, stage and age.
    let profile = clinical::profile(&first_site);
    let hazard = -profile.five_year_survival.ln() / 365.25 / 5.0
        * clinical::stage_hazard(first_stage.as_deref())
        * (0.035 * (first_age as f64 - 70.0)).exp();
    let survival_days = -rng.random_range(f64::EPSILON..1.0).ln() / hazard.max(1e-9);
    let death_day = f64::from(first_day) + survival_days;
    let (vital, vital_day) = if death_day <= f64::from(FOLLOW_UP_END) {
        ("D", death_day as i32)
    } else if chance(rng, 0.003) {
        ("X", rng.random_range(first_day..=FOLLOW_UP_END))
    } else {
        ("A", FOLLOW_UP_END)
    };
    let last_alive = vital_day;

    // Later tumours fall between the first diagnosis and the end of the window or of life.
    let mut later: Vec<i32> = (1..tumour_count)
        .map(|_| rng.random_range(first_day..=LAST_DIAGNOSIS.min(last_alive)))
        .collect();
    later.sort_unstable();
    let mut tumours = Vec::with_capacity(tumour_count);
    tumours.push(TumourFacts {
        site: first_site,
        site4: first_site4,
        stage: first_stage,
        diagnosed: first_day,
    });
    for day in later {
        let site = compatible_site(d, rng, male);
        tumours.push(TumourFacts {
            site4: site4(d, rng, &site),
            site,
            stage: d.stage.sample(rng).map(str::to_string),
            diagnosed: day,
        });
    }
    let first = &tumours[0];

    let ethnicity = d.ethnicity.sample(rng).map(str::to_string);
    let death = (vital == "D").then(|| death_record(rng, &first.site4));
    let home = placement.home;
    let treating = placement.treating.unwrap_or(home);
    let sites: Vec<(usize, bool)> = match placement.treating {
        Some(t) => vec![(home, false), (t, true)],
        None => vec![(home, false)],
    };
    for &(trust, second) in &sites {
        let p = &mut out[trust][PATIENT];
        p.int(Some(ids.patientid(second)))
            .text(Some(gender))
            .text(ethnicity.as_deref());
        match &death {
            Some(dr) => p
                .text(dr.cause_1a.as_deref())
                .text(None)
                .text(None)
                .text(dr.cause_2.as_deref())
                .text(Some(&dr.underlying))
                .text(Some(dr.location)),
            None => p
                .text(None)
                .text(None)
                .text(None)
                .text(None)
                .text(None)
                .text(None),
        };
        p.text(Some(vital))
            .date(Some(vital_day))
            .int(Some(ids.linknumber()));
        p.end_row();
    }

    // Tumours are registered at the home trust.
    let home_patient = ids.patientid(false);
    for (k, t) in tumours.iter().enumerate() {
        let age = first_age + i64::from((t.diagnosed - first_day) / 365);
        write_tumour(
            d,
            rng,
            &mut out[home][TUMOUR],
            ids.tumourid(k),
            home_patient,
            gender,
            age,
            t,
            creg.as_deref(),
            quintile.as_deref(),
            last_alive,
        );
    }

    // Treatment follows the first tumour, at the treating trust.
    let treating_patient = ids.patientid(placement.treating.is_some());
    let t = &tumours[0];
    if chance(rng, profile.sact_share) {
        let regimens = match rng.random_range(0..100) {
            0..65 => 1,
            65..88 => 2,
            88..97 => 3,
            _ => 4,
        };
        let mut start = t.diagnosed + rng.random_range(14..90);
        for k in 0..regimens {
            if start >= last_alive {
                break;
            }
            let end = write_regimen(
                rng,
                &mut out[treating],
                ids.regimenid(k),
                treating_patient,
                ids.linknumber(),
                male,
                profile,
                start,
                last_alive,
            );
            start = end + rng.random_range(30..240);
        }
    }
    if chance(rng, profile.rt_share) {
        let episodes = if chance(rng, 0.15) { 2 } else { 1 };
        let mut decision = t.diagnosed + rng.random_range(20..80);
        for k in 0..episodes {
            if decision >= last_alive {
                break;
            }
            let last = write_radiotherapy(
                rng,
                &mut out[treating],
                ids,
                k,
                treating_patient,
                &trust_codes[treating],
                profile.group,
                decision,
                last_alive,
                k > 0,
            );
            decision = last + rng.random_range(60..365);
        }
    }
}

fn site4<R: Rng>(d: &Distributions, rng: &mut R, site: &str) -> String {
    d.site4
        .get(site)
        .and_then(|c| c.sample(rng))
        .map(str::to_string)
        .unwrap_or_else(|| format!("{site}9"))
}

fn compatible_site<R: Rng>(d: &Distributions, rng: &mut R, male: bool) -> String {
    for _ in 0..20 {
        if let Some(site) = d.site.sample(rng) {
            let fits = match clinical::sex_rule(site) {
                SexRule::Male => male,
                SexRule::Female => !male,
                SexRule::MostlyFemale | SexRule::Any => true,
            };
            if fits {
                return site.to_string();
            }
        }
    }
    "C44".to_string()
}

struct DeathRecord {
    cause_1a: Option<String>,
    cause_2: Option<String>,
    underlying: String,
    location: &'static str,
}

fn death_record<R: Rng>(rng: &mut R, site4: &str) -> DeathRecord {
    const OTHER_CAUSES: [&str; 5] = ["I219", "J189", "I639", "J449", "F03X"];
    let underlying = if chance(rng, 0.85) {
        site4.to_string()
    } else {
        OTHER_CAUSES[rng.random_range(0..OTHER_CAUSES.len())].to_string()
    };
    let cause_1a = if chance(rng, 0.6) {
        Some(underlying.clone())
    } else {
        Some("J189".to_string())
    };
    let cause_2 = chance(rng, 0.2).then(|| "I10X".to_string());
    let location = match rng.random_range(0..100) {
        0..44 => "1",
        44..49 => "2",
        49..59 => "3",
        59..87 => "4",
        87..98 => "5",
        98..99 => "6",
        _ => "X",
    };
    DeathRecord {
        cause_1a,
        cause_2,
        underlying,
        location,
    }
}

#[allow(clippy::too_many_arguments)]
fn write_tumour<R: Rng>(
    d: &Distributions,
    rng: &mut R,
    buf: &mut TableBuffer,
    tumourid: i64,
    patientid: i64,
    gender: &str,
    age: i64,
    t: &TumourFacts,
    creg: Option<&str>,
    quintile: Option<&str>,
    last_alive: i32,
) {
    let site = t.site.as_str();
    let morph = d.morph.sample(rng).map(str::to_string);
    let behaviour = clinical::behaviour(site);
    let breast = site == "C50";
    let prostate = site == "C61";
    let screened = matches!(site, "C50" | "C18" | "C19" | "C20" | "C53");
    let surgery = chance(rng, 0.5)
        .then(|| t.diagnosed + rng.random_range(7..120))
        .filter(|&day| day <= last_alive);
    let charlson: i64 = match rng.random_range(0..100) {
        0..70 => 0,
        70..82 => 1,
        82..90 => 2,
        90..95 => 3,
        95..98 => 4,
        _ => 5,
    };
    let (gp, gs) = if prostate && chance(rng, 0.8) {
        (
            d.gleason_primary.sample(rng).map(str::to_string),
            d.gleason_secondary.sample(rng).map(str::to_string),
        )
    } else {
        (None, None)
    };
    let combined = match (&gp, &gs) {
        (Some(a), Some(b)) => a
            .parse::<i64>()
            .ok()
            .zip(b.parse::<i64>().ok())
            .map(|(a, b)| a + b),
        _ => None,
    };
    buf.int(Some(tumourid))
        .text(Some(gender))
        .int(Some(patientid))
        .date(Some(t.diagnosed))
        .text(Some(site))
        .text(Some(&t.site4))
        .text(Some(site))
        .text(Some(&t.site4))
        .text(Some(&t.site4))
        .text(Some(site))
        .text(morph.as_deref())
        .text(morph.as_deref())
        .text(Some(behaviour))
        .text(Some(behaviour))
        .text(d.t_best.sample(rng))
        .text(d.n_best.sample(rng))
        .text(d.m_best.sample(rng))
        .text(t.stage.as_deref())
        .text(d.grade.sample(rng))
        .int(Some(age))
        .text(creg)
        .text(d.stage_system.sample(rng))
        .text(d.laterality.sample(rng))
        .text(if screened && chance(rng, 0.5) {
            d.screening.sample(rng)
        } else {
            None
        })
        .text(if breast && chance(rng, 0.85) {
            d.er.sample(rng)
        } else {
            None
        })
        .text(if breast && chance(rng, 0.75) {
            d.pr.sample(rng)
        } else {
            None
        })
        .text(if breast && chance(rng, 0.75) {
            d.her2.sample(rng)
        } else {
            None
        })
        .text(quintile)
        .date(surgery)
        .text(d.careplan.sample(rng))
        .text(d.performance.sample(rng))
        .int(Some(charlson))
        .text(match charlson {
            0 => None,
            1 => Some("COPD"),
            2 => Some("DIAB_COMP"),
            3 => Some("CHF,COPD"),
            _ => Some("CHF,RENAL"),
        })
        .text(gp.as_deref())
        .text(gs.as_deref())
        .text(None)
        .int(combined);
    buf.end_row();
}

/// Writes one regimen with its cycles, drugs and outcome; returns the day of its last cycle.
#[allow(clippy::too_many_arguments)]
fn write_regimen<R: Rng>(
    rng: &mut R,
    trust: &mut [TableBuffer],
    regimenid: i64,
    patientid: i64,
    linknumber: i64,
    male: bool,
    profile: &clinical::SiteProfile,
    decision: i32,
    last_alive: i32,
) -> i32 {
    let (mapped, benchmark, drugs) = profile.regimens[rng.random_range(0..profile.regimens.len())];
    let start = (decision + rng.random_range(3..28)).min(last_alive);
    let (height, weight) = if male {
        (normal(rng, 1.76, 0.07), normal(rng, 82.0, 15.0))
    } else {
        (normal(rng, 1.62, 0.065), normal(rng, 70.0, 14.0))
    };
    let intent = match rng.random_range(0..100) {
        0..22 => "A",
        22..32 => "N",
        32..50 => "C",
        50..95 => "P",
        95..98 => "D",
        _ => "98",
    };
    trust[REGIMEN]
        .int(Some(patientid))
        .int(Some(regimenid))
        .float(Some((height.clamp(1.3, 2.1) * 100.0).round() / 100.0))
        .float(Some(weight.clamp(35.0, 180.0).round()))
        .text(Some(intent))
        .date(Some(decision))
        .date(Some(start))
        .text(Some(mapped))
        .text(Some(if chance(rng, 0.04) { "Y" } else { "N" }))
        .text(Some(if chance(rng, 0.08) { "Y" } else { "N" }))
        .text(Some(benchmark))
        .int(Some(linknumber));
    trust[REGIMEN].end_row();

    let planned = match rng.random_range(0..100) {
        0..20 => 1,
        20..35 => 2,
        35..50 => 3,
        50..68 => 4,
        68..75 => 5,
        75..95 => 6,
        95..97 => 7,
        _ => 8,
    };
    let mut day = start;
    let mut last = start;
    for c in 0..planned {
        if day > last_alive {
            break;
        }
        let cycleid = regimenid * 16 + c as i64;
        trust[CYCLE]
            .int(Some(regimenid))
            .int(Some(cycleid))
            .int(Some(c as i64 + 1))
            .date(Some(day))
            .text(Some(
                ["X70.1", "X71.1", "X72.1", "X73.1"][rng.random_range(0..4)],
            ))
            .text(Some(match rng.random_range(0..100) {
                0..35 => "0",
                35..75 => "1",
                75..93 => "2",
                93..99 => "3",
                _ => "4",
            }));
        trust[CYCLE].end_row();
        for (k, drug) in drugs.iter().enumerate() {
            let (dose, oral) = clinical::drug_dose(drug);
            let given = (dose * rng.random_range(0.8..1.05) * 10.0).round() / 10.0;
            trust[DRUG]
                .int(Some(cycleid * 8 + k as i64))
                .int(Some(cycleid))
                .float(Some(given))
                .text(Some(if oral {
                    "X73.1"
                } else {
                    ["X72.1", "X72.2", "X72.3", "X72.4"][rng.random_range(0..4)]
                }))
                .text(Some(if oral { "2" } else { "1" }))
                .date(Some(day + i32::from(!oral && k > 0 && chance(rng, 0.2))))
                .text(Some(drug));
            trust[DRUG].end_row();
        }
        last = day;
        day += [14, 21, 21, 28][rng.random_range(0..4)];
    }

    let stopped = chance(rng, 0.2);
    let summary = if last_alive - last < 30 && last_alive < FOLLOW_UP_END {
        Some("3")
    } else if stopped {
        Some(["1", "2", "4", "5"][rng.random_range(0..4)])
    } else {
        None
    };
    let yes_no = |b: bool| Some(if b { "Y" } else { "N" });
    trust[OUTCOME]
        .int(Some(regimenid))
        .date(Some(last))
        .text(yes_no(chance(rng, 0.2)))
        .text(yes_no(chance(rng, 0.25)))
        .text(yes_no(stopped))
        .text(summary);
    trust[OUTCOME].end_row();
    last
}

/// Writes one radiotherapy course (an episode row and a prescription row per attendance);
/// returns the day of its last attendance.
#[allow(clippy::too_many_arguments)]
fn write_radiotherapy<R: Rng>(
    rng: &mut R,
    trust: &mut [TableBuffer],
    ids: Ids,
    k: usize,
    patientid: i64,
    trust_code: &str,
    anatomical_site: &str,
    decision: i32,
    last_alive: i32,
    metastatic: bool,
) -> i32 {
    let (fractions, per_fraction) = match rng.random_range(0..100) {
        0..15 => (1, 8.0),
        15..40 => (5, 5.2),
        40..48 => (10, 3.0),
        48..66 => (15, 2.67),
        66..83 => (20, 2.75),
        83..90 => (25, 2.0),
        90..95 => (30, 2.0),
        _ => (33, 2.0),
    };
    let episodeid = ids.episodeid(k);
    let prescriptionid = ids.prescriptionid(k);
    let earliest = decision + rng.random_range(0..14);
    let mut day = earliest + rng.random_range(0..28);
    let linkcode = format!("{trust_code}RT");
    let priority = match rng.random_range(0..100) {
        0..5 => "E",
        5..30 => "U",
        30..95 => "R",
        _ => "D",
    };
    let intent = match rng.random_range(0..100) {
        0..35 => "1",
        35..45 => "2",
        _ => "3",
    };
    let modality = if chance(rng, 0.05) { "6" } else { "5" };
    let region = if metastatic {
        "M"
    } else {
        match rng.random_range(0..100) {
            0..65 => "P",
            65..85 => "PR",
            85..95 => "R",
            _ => "M",
        }
    };
    let site = if region == "M" {
        "Bone"
    } else {
        anatomical_site
    };
    let prescribed = (f64::from(fractions) * per_fraction * 100.0).round() / 100.0;
    let mut last = day;
    for n in 0..fractions {
        if day > last_alive {
            break;
        }
        let attendid = format!("{episodeid}-{:02}", n + 1);
        trust[RT_EPISODE]
            .int(Some(patientid))
            .int(Some(episodeid))
            .text(Some(&attendid))
            .date(Some(day))
            .text(Some(&linkcode))
            .date(Some(decision))
            .date(Some(earliest))
            .text(Some(priority))
            .text(Some(intent));
        trust[RT_EPISODE].end_row();
        let delivered = f64::from(n + 1);
        trust[RT_PRESCRIPTION]
            .int(Some(patientid))
            .int(Some(prescriptionid))
            .text(Some(modality))
            .float(Some(prescribed))
            .float(Some(f64::from(fractions)))
            .float(Some((delivered * per_fraction * 100.0).round() / 100.0))
            .float(Some(delivered))
            .text(Some(region))
            .text(Some(site))
            .int(Some(episodeid))
            .text(Some(&attendid))
            .date(Some(day))
            .text(Some(&linkcode));
        trust[RT_PRESCRIPTION].end_row();
        last = day;
        // Weekdays only: skip the weekend after every fifth fraction.
        day += if (n + 1) % 5 == 0 { 3 } else { 1 };
    }
    last
}
