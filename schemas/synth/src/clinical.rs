//! Clinical knowledge the generator uses: survival, treatment and sex rules by tumour site.
//!
//! The figures are rounded from published England cancer statistics (ONS/NDRS five-year net
//! survival; NDRS treatment-route shares) and aim at plausibility, not precision.

/// A regimen: mapped name, benchmark group, and its drugs.
pub(crate) type Regimen = (&'static str, &'static str, &'static [&'static str]);

/// What happens to patients with a tumour at a group of sites.
#[derive(Debug)]
pub(crate) struct SiteProfile {
    /// Name of the group (also the radiotherapy anatomical site).
    pub group: &'static str,
    /// Five-year survival for the group, all stages.
    pub five_year_survival: f64,
    /// Share of patients given systemic anti-cancer therapy.
    pub sact_share: f64,
    /// Share of patients given radiotherapy.
    pub rt_share: f64,
    /// Regimens used for the group.
    pub regimens: &'static [Regimen],
}

const GENERIC: &[Regimen] = &[
    (
        "CARBOPLATIN + PACLITAXEL",
        "CARBOPLATIN + PACLITAXEL",
        &["CARBOPLATIN", "PACLITAXEL"],
    ),
    ("CAPECITABINE", "CAPECITABINE", &["CAPECITABINE"]),
];

const PROFILES: &[SiteProfile] = &[
    SiteProfile {
        group: "Breast",
        five_year_survival: 0.86,
        sact_share: 0.45,
        rt_share: 0.60,
        regimens: &[
            ("EC", "EC", &["EPIRUBICIN", "CYCLOPHOSPHAMIDE"]),
            ("DOCETAXEL", "DOCETAXEL", &["DOCETAXEL"]),
            ("PACLITAXEL WEEKLY", "PACLITAXEL", &["PACLITAXEL"]),
            (
                "PERTUZUMAB + TRASTUZUMAB + DOCETAXEL",
                "PERTUZUMAB + TRASTUZUMAB + DOCETAXEL",
                &["PERTUZUMAB", "TRASTUZUMAB", "DOCETAXEL"],
            ),
            ("CAPECITABINE", "CAPECITABINE", &["CAPECITABINE"]),
        ],
    },
    SiteProfile {
        group: "Prostate",
        five_year_survival: 0.88,
        sact_share: 0.15,
        rt_share: 0.35,
        regimens: &[
            ("DOCETAXEL", "DOCETAXEL", &["DOCETAXEL", "PREDNISOLONE"]),
            ("ENZALUTAMIDE", "ENZALUTAMIDE", &["ENZALUTAMIDE"]),
            (
                "ABIRATERONE",
                "ABIRATERONE",
                &["ABIRATERONE", "PREDNISOLONE"],
            ),
        ],
    },
    SiteProfile {
        group: "Lung",
        five_year_survival: 0.16,
        sact_share: 0.40,
        rt_share: 0.35,
        regimens: &[
            (
                "CARBOPLATIN + PEMETREXED",
                "CARBOPLATIN + PEMETREXED",
                &["CARBOPLATIN", "PEMETREXED"],
            ),
            ("PEMBROLIZUMAB", "PEMBROLIZUMAB", &["PEMBROLIZUMAB"]),
            (
                "CARBOPLATIN + VINORELBINE",
                "CARBOPLATIN + VINORELBINE",
                &["CARBOPLATIN", "VINORELBINE"],
            ),
            (
                "CISPLATIN + ETOPOSIDE",
                "CISPLATIN + ETOPOSIDE",
                &["CISPLATIN", "ETOPOSIDE"],
            ),
        ],
    },
    SiteProfile {
        group: "Colorectal",
        five_year_survival: 0.59,
        sact_share: 0.35,
        rt_share: 0.12,
        regimens: &[
            (
                "FOLFOX",
                "MODIFIED DE GRAMONT + OXALIPLATIN",
                &["OXALIPLATIN", "FLUOROURACIL", "FOLINIC ACID"],
            ),
            (
                "CAPOX",
                "CAPECITABINE + OXALIPLATIN",
                &["OXALIPLATIN", "CAPECITABINE"],
            ),
            ("CAPECITABINE", "CAPECITABINE", &["CAPECITABINE"]),
            (
                "FOLFIRI",
                "MODIFIED DE GRAMONT + IRINOTECAN",
                &["IRINOTECAN", "FLUOROURACIL", "FOLINIC ACID"],
            ),
        ],
    },
    SiteProfile {
        group: "Upper gastrointestinal",
        five_year_survival: 0.18,
        sact_share: 0.40,
        rt_share: 0.20,
        regimens: &[
            (
                "FLOT",
                "FLOT",
                &["FLUOROURACIL", "FOLINIC ACID", "OXALIPLATIN", "DOCETAXEL"],
            ),
            ("GEMCITABINE", "GEMCITABINE", &["GEMCITABINE"]),
            (
                "FOLFIRINOX",
                "FOLFIRINOX",
                &["OXALIPLATIN", "IRINOTECAN", "FLUOROURACIL", "FOLINIC ACID"],
            ),
        ],
    },
    SiteProfile {
        group: "Melanoma",
        five_year_survival: 0.91,
        sact_share: 0.08,
        rt_share: 0.03,
        regimens: &[
            ("PEMBROLIZUMAB", "PEMBROLIZUMAB", &["PEMBROLIZUMAB"]),
            (
                "NIVOLUMAB + IPILIMUMAB",
                "NIVOLUMAB + IPILIMUMAB",
                &["NIVOLUMAB", "IPILIMUMAB"],
            ),
        ],
    },
    SiteProfile {
        group: "Haematological",
        five_year_survival: 0.60,
        sact_share: 0.60,
        rt_share: 0.10,
        regimens: &[
            (
                "R-CHOP",
                "R-CHOP",
                &[
                    "RITUXIMAB",
                    "CYCLOPHOSPHAMIDE",
                    "DOXORUBICIN",
                    "VINCRISTINE",
                    "PREDNISOLONE",
                ],
            ),
            (
                "ABVD",
                "ABVD",
                &["DOXORUBICIN", "BLEOMYCIN", "VINBLASTINE", "DACARBAZINE"],
            ),
            (
                "LENALIDOMIDE + DEXAMETHASONE",
                "LENALIDOMIDE + DEXAMETHASONE",
                &["LENALIDOMIDE", "DEXAMETHASONE"],
            ),
        ],
    },
    SiteProfile {
        group: "Gynaecological",
        five_year_survival: 0.60,
        sact_share: 0.35,
        rt_share: 0.35,
        regimens: &[
            (
                "CARBOPLATIN + PACLITAXEL",
                "CARBOPLATIN + PACLITAXEL",
                &["CARBOPLATIN", "PACLITAXEL"],
            ),
            ("CARBOPLATIN", "CARBOPLATIN", &["CARBOPLATIN"]),
        ],
    },
    SiteProfile {
        group: "Urological",
        five_year_survival: 0.55,
        sact_share: 0.20,
        rt_share: 0.15,
        regimens: &[
            (
                "GEMCITABINE + CISPLATIN",
                "GEMCITABINE + CISPLATIN",
                &["GEMCITABINE", "CISPLATIN"],
            ),
            ("SUNITINIB", "SUNITINIB", &["SUNITINIB"]),
        ],
    },
    SiteProfile {
        group: "Brain",
        five_year_survival: 0.12,
        sact_share: 0.40,
        rt_share: 0.60,
        regimens: &[("TEMOZOLOMIDE", "TEMOZOLOMIDE", &["TEMOZOLOMIDE"])],
    },
    SiteProfile {
        group: "Head and neck",
        five_year_survival: 0.60,
        sact_share: 0.30,
        rt_share: 0.60,
        regimens: &[("CISPLATIN", "CISPLATIN", &["CISPLATIN"])],
    },
    SiteProfile {
        group: "Non-melanoma skin",
        five_year_survival: 0.99,
        sact_share: 0.0,
        rt_share: 0.02,
        regimens: GENERIC,
    },
    SiteProfile {
        group: "In situ and benign",
        five_year_survival: 0.97,
        sact_share: 0.01,
        rt_share: 0.08,
        regimens: GENERIC,
    },
    SiteProfile {
        group: "Other",
        five_year_survival: 0.45,
        sact_share: 0.25,
        rt_share: 0.15,
        regimens: GENERIC,
    },
];

fn site_number(site: &str) -> Option<(char, u32)> {
    let mut chars = site.chars();
    let letter = chars.next()?;
    let number = chars.as_str().get(..2)?.parse().ok()?;
    Some((letter, number))
}

/// The profile for a three-character ICD-10 site.
pub(crate) fn profile(site: &str) -> &'static SiteProfile {
    let group = match site_number(site) {
        Some(('C', 50)) => "Breast",
        Some(('C', 61)) => "Prostate",
        Some(('C', 33..=34)) => "Lung",
        Some(('C', 18..=20)) => "Colorectal",
        Some(('C', 15..=17 | 22..=25)) => "Upper gastrointestinal",
        Some(('C', 43)) => "Melanoma",
        Some(('C', 81..=96)) => "Haematological",
        Some(('C', 51..=58)) => "Gynaecological",
        Some(('C', 60 | 62..=68)) => "Urological",
        Some(('C', 70..=72)) => "Brain",
        Some(('C', 0..=14 | 30..=32)) => "Head and neck",
        Some(('C', 44)) => "Non-melanoma skin",
        Some(('D', _)) => "In situ and benign",
        _ => "Other",
    };
    PROFILES
        .iter()
        .find(|p| p.group == group)
        .unwrap_or(&PROFILES[PROFILES.len() - 1])
}

/// Who can have a tumour at a site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SexRule {
    /// Male organs.
    Male,
    /// Female organs.
    Female,
    /// Breast: almost all female.
    MostlyFemale,
    /// Anyone.
    Any,
}

/// The sex rule for a three-character ICD-10 site.
pub(crate) fn sex_rule(site: &str) -> SexRule {
    match site_number(site) {
        Some(('C', 60..=63)) | Some(('D', 7)) => SexRule::Male,
        Some(('C', 51..=58)) | Some(('D', 6)) => SexRule::Female,
        Some(('C', 50)) | Some(('D', 5)) => SexRule::MostlyFemale,
        _ => SexRule::Any,
    }
}

/// Behaviour code implied by the site (malignant C, in situ D0, uncertain D37-D48, benign).
pub(crate) fn behaviour(site: &str) -> &'static str {
    match site_number(site) {
        Some(('C', _)) => "3",
        Some(('D', 0..=9)) => "2",
        Some(('D', 37..=48)) => "1",
        _ => "0",
    }
}

/// How much a stage multiplies the site's hazard of death.
pub(crate) fn stage_hazard(stage: Option<&str>) -> f64 {
    match stage.and_then(|s| s.chars().next()) {
        Some('0') => 0.1,
        Some('1') => 0.3,
        Some('2') => 0.7,
        Some('3') => 1.6,
        Some('4') => 4.0,
        _ => 1.0,
    }
}

/// A drug's usual dose per administration (mg) and whether it is taken by mouth.
pub(crate) fn drug_dose(drug: &str) -> (f64, bool) {
    match drug {
        "CAPECITABINE" => (1650.0, true),
        "ENZALUTAMIDE" => (160.0, true),
        "ABIRATERONE" => (1000.0, true),
        "TEMOZOLOMIDE" => (150.0, true),
        "LENALIDOMIDE" => (25.0, true),
        "PREDNISOLONE" => (100.0, true),
        "DEXAMETHASONE" => (40.0, true),
        "SUNITINIB" => (50.0, true),
        "CARBOPLATIN" => (600.0, false),
        "CISPLATIN" => (130.0, false),
        "OXALIPLATIN" => (150.0, false),
        "PEMETREXED" => (900.0, false),
        "PEMBROLIZUMAB" => (200.0, false),
        "NIVOLUMAB" => (240.0, false),
        "IPILIMUMAB" => (80.0, false),
        "DOCETAXEL" => (130.0, false),
        "PACLITAXEL" => (140.0, false),
        "EPIRUBICIN" => (170.0, false),
        "DOXORUBICIN" => (90.0, false),
        "CYCLOPHOSPHAMIDE" => (1000.0, false),
        "FLUOROURACIL" => (4000.0, false),
        "FOLINIC ACID" => (350.0, false),
        "IRINOTECAN" => (320.0, false),
        "GEMCITABINE" => (1800.0, false),
        "RITUXIMAB" => (650.0, false),
        "TRASTUZUMAB" => (600.0, false),
        "PERTUZUMAB" => (420.0, false),
        "VINORELBINE" => (45.0, false),
        "VINCRISTINE" => (2.0, false),
        "VINBLASTINE" => (10.0, false),
        "BLEOMYCIN" => (18.0, false),
        "DACARBAZINE" => (650.0, false),
        "ETOPOSIDE" => (180.0, false),
        _ => (100.0, false),
    }
}
