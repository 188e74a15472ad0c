//! The policy file a trust's data controller writes, and its lint.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use trustql_schemas::{ColumnType, DisclosureClass, TrustSchema};

use crate::allowance::QueryAllowance;
use crate::cellkey::{CellKeyTables, PTableError};
use crate::date::parse_date;
use crate::error::PolicyError;
use crate::text::TextLimits;

/// Aggregates whose partial state is a few numbers per group, so may cross the wire.
pub const SHIPPABLE_AGGREGATES: [&str; 15] = [
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "stddev",
    "stddev_pop",
    "var",
    "var_pop",
    // Their states are interval counts over a public grid (trustql-survival).
    "km_curve",
    "survival_at",
    "logrank",
    // Theirs are bin counts over a column's public grid (trustql-distribution).
    "median",
    "percentile_cont",
    "approx_percentile_cont",
];

/// A trust's disclosure policy.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Version and owner.
    pub policy: Header,
    /// How results are protected.
    #[serde(default)]
    pub disclosure: Disclosure,
    /// What each disclosure class may do.
    #[serde(default)]
    pub classes: Classes,
    /// Which aggregates may be used, and query size caps.
    #[serde(default)]
    pub query: QueryRules,
    /// How differential privacy is applied to projects that use it.
    #[serde(default)]
    pub dp: DpRules,
    /// The approved projects.
    #[serde(default, rename = "project")]
    pub projects: Vec<Project>,
}

/// `[dp]`: how a query of a project in differential-privacy mode is bounded.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DpRules {
    /// Most rows of a table, per patient, that reach an aggregate (by table name).
    pub rows_per_patient: BTreeMap<String, u32>,
    /// The bound for tables not listed in `rows_per_patient`.
    pub default_rows_per_patient: u32,
    /// `[lower, upper]` clamping bounds for SUM, AVG, VAR and STDDEV, by `table.column`; a
    /// column without bounds cannot be summed in DP mode.
    pub bounds: BTreeMap<String, [f64; 2]>,
    /// The least ε any query spends: a request for less is refused, so a budget pays for at
    /// most `epsilon_budget / min_epsilon_per_query` releases (an ε of 1e-300 would otherwise
    /// make an oracle that never runs out).
    pub min_epsilon_per_query: f64,
}

/// The smallest `[dp] min_epsilon_per_query` the lint accepts: far above the slack the
/// budget arithmetic allows for rounding, so a spent budget pays for nothing more.
pub const MIN_EPSILON_FLOOR: f64 = 1e-6;

impl Default for DpRules {
    fn default() -> Self {
        DpRules {
            rows_per_patient: BTreeMap::new(),
            default_rows_per_patient: 1,
            bounds: BTreeMap::new(),
            min_epsilon_per_query: 0.01,
        }
    }
}

impl DpRules {
    /// The row bound of a table (the patient table always has one row per patient).
    pub fn rows_per_patient(&self, table: &str) -> u32 {
        self.rows_per_patient
            .get(table)
            .copied()
            .unwrap_or(self.default_rows_per_patient)
    }
}

/// `[project.dp]`: the project is in differential-privacy mode, with this budget at this trust.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProjectDp {
    /// Total ε the project may spend here, ever.
    pub epsilon_budget: f64,
    /// ε a query spends unless it asks for less.
    pub epsilon_per_query: f64,
    /// Total δ (spent only by queries grouped on keys outside a public code set).
    #[serde(default = "default_delta_budget")]
    pub delta_budget: f64,
    /// δ such a query spends on choosing which groups exist.
    #[serde(default = "default_delta_per_query")]
    pub delta_per_query: f64,
}

fn default_delta_budget() -> f64 {
    1e-6
}

fn default_delta_per_query() -> f64 {
    1e-8
}

/// `[policy]`: which trust and which version.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// Version label the controller gives this policy.
    pub version: String,
    /// The trust code it applies to.
    pub trust: String,
    /// Free text for the record.
    #[serde(default)]
    pub description: String,
}

/// How counts are rounded before release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rounding {
    /// Released as computed.
    None,
    /// To the nearest multiple of `rounding_base`.
    Base,
    /// OpenSAFELY's midpoint-6: `ceil(x/6)*6 - 3` for x > 0.
    Midpoint6,
}

/// The deepest `[query] max_nesting` a policy may allow: the SQL parser's own recursion limit
/// (DataFusion's `sql_parser.recursion_limit`, 50) takes a few levels per parenthesis.
pub const MAX_NESTING: usize = 24;

/// The largest minimum number of patients any rule may ask for, and the largest rounding
/// base. Nodes count distinct patients per group only up to [`PATIENT_COUNT_CAP`].
pub const MAX_MIN_PATIENTS: u64 = 1000;

/// How many distinct patients a node counts in a group before it stops: twice the highest
/// threshold, so a capped count, rounded at the node (by at most half a base, and no base
/// exceeds [`MAX_MIN_PATIENTS`]), still passes every threshold the true count passes.
pub const PATIENT_COUNT_CAP: u64 = 2 * MAX_MIN_PATIENTS;

/// `[disclosure]`: statistical disclosure control.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Disclosure {
    /// How released numbers are protected: suppression and rounding, or the cell-key method.
    #[serde(skip_serializing_if = "Method::is_rounding")]
    pub method: Method,
    /// The cell-key method's perturbation tables (used when `method = "cell_key"`).
    #[serde(skip_serializing_if = "CellKeyRules::is_default")]
    pub cell_key: CellKeyRules,
    /// Fewest distinct patients a released group may have.
    pub min_patients: u64,
    /// Rounding of counts.
    pub rounding: Rounding,
    /// Base for `rounding = "base"`.
    pub rounding_base: u64,
    /// Dominance rule: withhold a sum when its `n` largest contributions exceed `k` percent.
    pub dominance: Option<Dominance>,
    /// Withhold a group that holds all the patients of its margin: a 100% cell, whose
    /// siblings are the 0% cells (a query never releases an empty group, so this is the
    /// 0%/100% rule).
    pub withhold_whole_margin_cells: bool,
    /// Answered queries a project outside differential privacy may ask per day and in total,
    /// unless the project sets its own; without it, [`QueryAllowance::default`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query_allowance: Option<QueryAllowance>,
    /// `[disclosure.survival]`: how survival curves are protected.
    #[serde(skip_serializing_if = "SurvivalRules::is_default")]
    pub survival: SurvivalRules,
}

/// `[disclosure.survival]`: Kaplan–Meier curves are never suppressed interval by interval (a
/// withheld interval would corrupt every later at-risk count): each stratum's *cumulative*
/// events and censorings are rounded to the midpoint of their band, and intervals are at
/// least so wide that single event times cannot be read off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SurvivalRules {
    /// The narrowest interval, in days, a curve may use.
    pub min_interval_days: u32,
    /// The band cumulative counts are rounded within (1 for none; the unprotected mode never
    /// rounds).
    pub rounding_base: u64,
    /// A cumulative count below this is released as 0, so an event only one or two patients
    /// have (a rare code) shows nowhere; larger values cost accuracy on small strata (each
    /// trust's first few events appear late).
    pub least_cumulative: u64,
}

impl Default for SurvivalRules {
    fn default() -> Self {
        SurvivalRules {
            min_interval_days: 30,
            rounding_base: 5,
            least_cumulative: 3,
        }
    }
}

impl SurvivalRules {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl Disclosure {
    /// The cell-key method's tables, as `[disclosure.cell_key]` sets them.
    pub fn cell_key_tables(&self) -> Result<CellKeyTables, PTableError> {
        CellKeyTables::new(&self.cell_key)
    }

    /// The correctness mode used by tests: no minimum, no rounding, no perturbation. It
    /// answers the full aggregate SQL; every other SDC setting answers table-builder queries
    /// only.
    pub fn is_unprotected(&self) -> bool {
        self.min_patients <= 1 && self.rounding == Rounding::None && self.method == Method::Rounding
    }

    /// Whether released numbers are perturbed by the cell-key method.
    pub fn uses_cell_keys(&self) -> bool {
        self.method == Method::CellKey
    }
}

/// `[disclosure] method`: how the numbers a group releases are protected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum Method {
    /// Suppression of small groups and rounding of counts (`rounding`, `rounding_base`).
    #[default]
    #[serde(rename = "rounding")]
    Rounding,
    /// Suppression of small groups, and every count and sum perturbed by the cell-key method
    /// (`[disclosure.cell_key]`): the same patients always get the same adjustment.
    #[serde(rename = "cell_key", alias = "cell-key")]
    CellKey,
}

impl Method {
    fn is_rounding(&self) -> bool {
        *self == Method::Rounding
    }
}

/// `[disclosure.cell_key]`: the cell-key method's perturbation tables, public parameters
/// (`ptable`'s D and V).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CellKeyRules {
    /// The table for counts: integer adjustments.
    pub counts: PTableRules,
    /// The table for sums: an adjustment of `scale` × the cell's largest contribution per
    /// step (the ABS magnitude method).
    pub magnitudes: MagnitudeRules,
}

impl Default for CellKeyRules {
    fn default() -> Self {
        CellKeyRules {
            counts: PTableRules {
                max_adjustment: 3,
                variance: 1.5,
            },
            magnitudes: MagnitudeRules {
                max_adjustment: 3,
                variance: 1.5,
                scale: 0.1,
            },
        }
    }
}

impl CellKeyRules {
    fn is_default(&self) -> bool {
        *self == CellKeyRules::default()
    }

    /// The tables' public parameters, as an answer's metadata tells them.
    pub fn meta(&self) -> trustql_protocol::CellKeyMeta {
        trustql_protocol::CellKeyMeta {
            count_max_adjustment: self.counts.max_adjustment,
            count_variance: self.counts.variance,
            sum_max_steps: self.magnitudes.max_adjustment,
            sum_step_variance: self.magnitudes.variance,
            sum_step_scale: self.magnitudes.scale,
        }
    }
}

/// One perturbation table: the largest adjustment D and the variance V.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PTableRules {
    /// D: no count moves by more than this.
    pub max_adjustment: u32,
    /// V: the adjustments' variance.
    pub variance: f64,
}

/// The magnitude table: a perturbation table, and how far one step moves a sum.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MagnitudeRules {
    /// D: no sum moves by more than D × `scale` × its largest contribution.
    pub max_adjustment: u32,
    /// V: the steps' variance.
    pub variance: f64,
    /// The fraction of the cell's largest contribution one step is.
    pub scale: f64,
}

impl Default for Disclosure {
    fn default() -> Self {
        Disclosure {
            method: Method::Rounding,
            cell_key: CellKeyRules::default(),
            min_patients: 10,
            rounding: Rounding::None,
            rounding_base: 5,
            dominance: None,
            withhold_whole_margin_cells: true,
            query_allowance: None,
            survival: SurvivalRules::default(),
        }
    }
}

/// The (n, k) dominance rule.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Dominance {
    /// Number of largest contributions.
    pub n: u32,
    /// Percentage of the total they may not exceed.
    pub k: f64,
}

/// `[classes.*]`: what may be done with the columns of one disclosure class.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClassRules {
    /// May be a GROUP BY key (released as a group label).
    pub group_by: bool,
    /// May be used in WHERE / JOIN filters and CASE conditions.
    pub filter: bool,
    /// May be summed or averaged.
    pub aggregate: bool,
    /// May be the argument of MIN or MAX (releases an extreme value).
    pub min_max: bool,
}

/// `[classes]`: rules per disclosure class. Direct identifiers have fixed rules.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Classes {
    /// Dates, age, gender, ethnicity, area, deprivation.
    pub quasi_identifier: ClassRules,
    /// Clinical detail.
    pub clinical: ClassRules,
}

impl Default for Classes {
    fn default() -> Self {
        Classes {
            quasi_identifier: ClassRules {
                group_by: true,
                filter: true,
                aggregate: true,
                min_max: false,
            },
            clinical: ClassRules {
                group_by: true,
                filter: true,
                aggregate: true,
                // MIN/MAX releases one patient's value whatever the group's size; a controller
                // who accepts that says so.
                min_max: false,
            },
        }
    }
}

impl Classes {
    /// The rules for a class; `None` for direct identifiers, whose rules are fixed.
    pub fn rules(&self, class: DisclosureClass) -> Option<&ClassRules> {
        match class {
            DisclosureClass::DirectIdentifier => None,
            DisclosureClass::QuasiIdentifier => Some(&self.quasi_identifier),
            DisclosureClass::Clinical => Some(&self.clinical),
        }
    }
}

/// `[query]`: allowed aggregates and size caps.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueryRules {
    /// Aggregate functions a query may use (lower case).
    pub aggregates: Vec<String>,
    /// Longest SQL text accepted, in characters.
    pub max_query_chars: usize,
    /// Most values in one IN (...) list.
    pub max_in_list: usize,
    /// Most groups one answer may have before protection.
    pub max_groups: usize,
    /// Most joins in one query.
    pub max_joins: usize,
    /// Deepest nesting of parentheses and CASE in the SQL text (checked before parsing).
    pub max_nesting: usize,
    /// Most operators (+, =, AND, WHEN …) in the SQL text (checked before parsing): planning
    /// is superlinear in them, and a few thousand overflow the stack.
    pub max_operators: usize,
}

impl QueryRules {
    /// The caps checked on the SQL text before it is parsed.
    pub fn text_limits(&self) -> TextLimits {
        TextLimits {
            max_chars: self.max_query_chars,
            max_nesting: self.max_nesting,
            max_operators: self.max_operators,
        }
    }
}

impl Default for QueryRules {
    fn default() -> Self {
        QueryRules {
            aggregates: SHIPPABLE_AGGREGATES.iter().map(|s| s.to_string()).collect(),
            max_query_chars: 10_000,
            max_in_list: 50,
            max_groups: 5_000,
            max_joins: 4,
            max_nesting: 16,
            max_operators: 100,
        }
    }
}

/// `[[project]]`: a project approved at this trust.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Project {
    /// Project id (sent by researchers in `x-trustql-project`).
    pub id: String,
    /// What it is for.
    #[serde(default)]
    pub title: String,
    /// Researchers (by the name the coordinator authenticates) on the project.
    pub researchers: Vec<String>,
    /// Tables the project may read.
    pub tables: Vec<String>,
    /// Last day of approval (YYYY-MM-DD), inclusive.
    pub expires: String,
    /// Differential-privacy mode and budget; without it, disclosure control applies.
    #[serde(default)]
    pub dp: Option<ProjectDp>,
    /// This project's query allowance (outside differential privacy), instead of
    /// `[disclosure] query_allowance`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_allowance: Option<QueryAllowance>,
    /// Pool-then-protect: the trusts whose states are added under pairwise masks before
    /// `[disclosure]` protects the pooled total once (issue 17). Every member's policy must list
    /// the same members and the same `[disclosure]` protection, or the masks do not cancel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<ProjectPool>,
}

/// `pool = { members = [...] }` of a project.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectPool {
    /// The member trusts' codes, this trust among them.
    pub members: Vec<String>,
    /// Fewest members the pool may have: with two, the coordinator and one member could
    /// recover the other's numbers by subtraction.
    #[serde(default = "default_min_members")]
    pub min_members: usize,
}

fn default_min_members() -> usize {
    MIN_POOL_MEMBERS
}

/// The fewest members any pool may have.
pub const MIN_POOL_MEMBERS: usize = trustql_pool::MIN_MEMBERS;

impl Project {
    /// Whether the approval is still in force on `today` (days since 1970-01-01).
    pub fn in_force(&self, today: i32) -> bool {
        parse_date(&self.expires).is_some_and(|last| today <= last)
    }
}

/// One lint finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// The node will not serve the policy.
    Error(String),
    /// Allowed, but the controller should know.
    Warning(String),
}

impl Policy {
    /// Parses policy text (unknown keys are an error).
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        toml::from_str(text).map_err(|e| PolicyError::Parse(e.to_string()))
    }

    /// The project with this id.
    pub fn project(&self, id: &str) -> Option<&Project> {
        self.projects.iter().find(|p| p.id == id)
    }

    /// Checks the policy against the schema; errors make the policy unusable.
    pub fn lint(&self, schema: &TrustSchema) -> Vec<Finding> {
        let mut findings = Vec::new();
        let mut error = |m: String| findings.push(Finding::Error(m));
        if self.policy.version.trim().is_empty() {
            error("[policy] version is empty".into());
        }
        if self.policy.trust.trim().is_empty() {
            error("[policy] trust is empty".into());
        }
        let d = &self.disclosure;
        if d.min_patients == 0 {
            error("[disclosure] min_patients must be at least 1".into());
        }
        if d.min_patients > MAX_MIN_PATIENTS {
            error(format!(
                "[disclosure] min_patients may be at most {MAX_MIN_PATIENTS}"
            ));
        }
        if d.survival.min_interval_days == 0 {
            error("[disclosure.survival] min_interval_days must be at least 1".into());
        }
        if d.survival.least_cumulative > MAX_MIN_PATIENTS {
            error(format!(
                "[disclosure.survival] least_cumulative may be at most {MAX_MIN_PATIENTS}"
            ));
        }
        if d.survival.rounding_base == 0 || d.survival.rounding_base > MAX_MIN_PATIENTS {
            error(format!(
                "[disclosure.survival] rounding_base must be between 1 and {MAX_MIN_PATIENTS}"
            ));
        }
        if d.rounding == Rounding::Base && d.rounding_base < 2 {
            error("[disclosure] rounding_base must be at least 2".into());
        }
        if d.rounding == Rounding::Base && d.rounding_base > MAX_MIN_PATIENTS {
            error(format!(
                "[disclosure] rounding_base may be at most {MAX_MIN_PATIENTS}"
            ));
        }
        if d.uses_cell_keys() {
            if let Err(e) = d.cell_key_tables() {
                error(format!("[disclosure.cell_key] {e}"));
            }
            if d.rounding != Rounding::None {
                error(
                    "[disclosure] method = \"cell_key\" perturbs counts instead of rounding them: \
                     set rounding = \"none\" (rounding on top would bias the adjustments)"
                        .into(),
                );
            }
        }
        if let Some(dom) = d.dominance
            && (dom.n == 0 || !(dom.k > 0.0 && dom.k <= 100.0))
        {
            error("[disclosure] dominance needs n >= 1 and 0 < k <= 100".into());
        }
        let allowances = std::iter::once(("[disclosure]".to_string(), d.query_allowance)).chain(
            self.projects
                .iter()
                .map(|p| (format!("project `{}`", p.id), p.query_allowance)),
        );
        for (whose, allowance) in allowances {
            // A zero allowance would refuse every query; a project's expiry is how to stop one.
            if let Some(a) = allowance
                && (a.per_day == 0 || a.total == Some(0))
            {
                error(format!(
                    "{whose} query_allowance: per_day and total must be at least 1"
                ));
            }
        }
        for name in &self.query.aggregates {
            if !SHIPPABLE_AGGREGATES.contains(&name.as_str()) {
                error(format!(
                    "[query] aggregate `{name}` is not supported: only {} can be combined across \
                     trusts without shipping row values",
                    SHIPPABLE_AGGREGATES.join(", ")
                ));
            }
        }
        let q = &self.query;
        if q.max_query_chars == 0 || q.max_groups == 0 {
            error("[query] max_query_chars and max_groups must be positive".into());
        }
        if q.max_nesting == 0 || q.max_operators == 0 {
            error("[query] max_nesting and max_operators must be positive".into());
        }
        if q.max_nesting > MAX_NESTING {
            // Deeper than this, the parser's own recursion limit refuses first.
            error(format!("[query] max_nesting may be at most {MAX_NESTING}"));
        }
        let mut ids = HashSet::new();
        for project in &self.projects {
            if !ids.insert(project.id.as_str()) {
                error(format!("project `{}` is listed twice", project.id));
            }
            if project.researchers.is_empty() {
                error(format!("project `{}` has no researchers", project.id));
            }
            if project.tables.is_empty() {
                error(format!("project `{}` has no tables", project.id));
            }
            for table in &project.tables {
                if schema.table(table).is_err() {
                    error(format!(
                        "project `{}` names table `{table}`, which the schema does not have",
                        project.id
                    ));
                }
            }
            if parse_date(&project.expires).is_none() {
                error(format!(
                    "project `{}` expiry `{}` is not a date (YYYY-MM-DD)",
                    project.id, project.expires
                ));
            }
        }
        self.lint_pools(&mut findings);
        self.lint_dp(schema, &mut findings);
        if d.min_patients < 5 {
            findings.push(Finding::Warning(format!(
                "min_patients = {} is below the usual NHS threshold of 5–10",
                d.min_patients
            )));
        }
        if d.rounding == Rounding::None && !d.uses_cell_keys() {
            findings.push(Finding::Warning(
                "counts are not rounded: differencing two answers can reveal small numbers".into(),
            ));
        }
        if self.classes.quasi_identifier.min_max {
            findings.push(Finding::Warning(
                "MIN/MAX of quasi-identifiers releases exact extreme dates and ages".into(),
            ));
        }
        if self.classes.clinical.min_max {
            findings.push(Finding::Warning(
                "MIN/MAX of clinical columns releases one patient's value (the heaviest weight, \
                 the largest dose), even in a group that passes the minimum"
                    .into(),
            ));
        }
        if self.projects.is_empty() {
            findings.push(Finding::Warning(
                "no project is approved: every query will be refused".into(),
            ));
        }
        findings
    }

    fn lint_pools(&self, findings: &mut Vec<Finding>) {
        for project in &self.projects {
            let Some(pool) = &project.pool else {
                continue;
            };
            let mut error = |m: String| {
                findings.push(Finding::Error(format!(
                    "project `{}` pool: {m}",
                    project.id
                )))
            };
            let mut seen = HashSet::new();
            for member in &pool.members {
                if !seen.insert(member.as_str()) {
                    error(format!("member {member} is listed twice"));
                }
            }
            if !seen.contains(self.policy.trust.as_str()) {
                error(format!(
                    "this trust ({}) must be one of the members",
                    self.policy.trust
                ));
            }
            if pool.min_members < MIN_POOL_MEMBERS {
                error(format!(
                    "min_members must be at least {MIN_POOL_MEMBERS}: with fewer, the \
                     coordinator and one member could recover another member's numbers"
                ));
            }
            if seen.len() < pool.min_members.max(MIN_POOL_MEMBERS) {
                error(format!(
                    "{} member(s) listed; the pool needs at least {}",
                    seen.len(),
                    pool.min_members.max(MIN_POOL_MEMBERS)
                ));
            }
            if project.dp.is_some() {
                error(
                    "pooled differential privacy (noise shares) is not built yet: pool a \
                     project under suppression and rounding or the cell-key method"
                        .into(),
                );
            }
            if self.disclosure.dominance.is_some() {
                findings.push(Finding::Warning(format!(
                    "project `{}` pool: pooled answers release counts only, so the dominance \
                     rule has nothing to apply to",
                    project.id
                )));
            }
            if self.disclosure.min_patients < 5 {
                findings.push(Finding::Warning(format!(
                    "project `{}` pool: the minimum ({}) applies to the pooled total; a \
                     patient treated at two members is counted at both",
                    project.id, self.disclosure.min_patients
                )));
            }
        }
    }

    fn lint_dp(&self, schema: &TrustSchema, findings: &mut Vec<Finding>) {
        let mut error = |m: String| findings.push(Finding::Error(m));
        let positive = |x: f64| x.is_finite() && x > 0.0;
        for project in &self.projects {
            let Some(dp) = project.dp else { continue };
            let id = &project.id;
            if !positive(dp.epsilon_budget) || !positive(dp.epsilon_per_query) {
                error(format!(
                    "project `{id}`: epsilon_budget and epsilon_per_query must be positive"
                ));
            } else if dp.epsilon_per_query > dp.epsilon_budget {
                error(format!(
                    "project `{id}`: epsilon_per_query exceeds epsilon_budget"
                ));
            } else if dp.epsilon_per_query < self.dp.min_epsilon_per_query {
                error(format!(
                    "project `{id}`: epsilon_per_query is below [dp] min_epsilon_per_query ({})",
                    self.dp.min_epsilon_per_query
                ));
            }
            let deltas_ok = positive(dp.delta_budget)
                && dp.delta_budget < 1.0
                && positive(dp.delta_per_query)
                && dp.delta_per_query <= dp.delta_budget;
            if !deltas_ok {
                error(format!(
                    "project `{id}`: delta_budget must be in (0, 1) and delta_per_query in (0, delta_budget]"
                ));
            }
        }
        let rules = &self.dp;
        if !(rules.min_epsilon_per_query.is_finite()
            && rules.min_epsilon_per_query >= MIN_EPSILON_FLOOR)
        {
            error(format!(
                "[dp] min_epsilon_per_query must be a number of at least {MIN_EPSILON_FLOOR}"
            ));
        }
        if rules.default_rows_per_patient == 0 {
            error("[dp] default_rows_per_patient must be at least 1".into());
        }
        for (table, rows) in &rules.rows_per_patient {
            if schema.table(table).is_err() {
                error(format!(
                    "[dp] rows_per_patient names table `{table}`, which the schema does not have"
                ));
            } else if *rows == 0 {
                error(format!(
                    "[dp] rows_per_patient for `{table}` must be at least 1"
                ));
            }
        }
        for (name, [lower, upper]) in &rules.bounds {
            let column = name
                .split_once('.')
                .and_then(|(t, c)| schema.table(t).ok()?.column(c));
            match column {
                None => error(format!(
                    "[dp] bounds name `{name}`, which is not a `table.column` of the schema"
                )),
                Some(c) if !matches!(c.ty, ColumnType::Int64 | ColumnType::Float64) => error(
                    format!("[dp] bounds for `{name}`: only numeric columns can be summed"),
                ),
                Some(_) if !(lower.is_finite() && upper.is_finite() && lower < upper) => error(
                    format!("[dp] bounds for `{name}` must be finite with lower < upper"),
                ),
                Some(_) => {}
            }
        }
    }

    /// The effective rules in plain words, for the controller.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let d = &self.disclosure;
        let _ = writeln!(
            out,
            "Policy {} for trust {}{}",
            self.policy.version,
            self.policy.trust,
            if self.policy.description.is_empty() {
                String::new()
            } else {
                format!(": {}", self.policy.description)
            }
        );
        let _ = writeln!(out, "Disclosure control:");
        if d.is_unprotected() {
            let _ = writeln!(
                out,
                "  - UNPROTECTED correctness mode (minimum 1, no rounding; for tests only): the \
                 full aggregate SQL is answered exactly"
            );
        } else {
            let _ = writeln!(
                out,
                "  - projects outside differential privacy are answered table-builder queries \
                 only (joins on the patient key; WHERE comparing a column with constants; GROUP \
                 BY columns or a coarsening of one column; COUNT, COUNT(DISTINCT patient key), \
                 and SUM/AVG/VAR/STDDEV of columns with public bounds); DP projects are \
                 answered the full aggregate SQL their budget pays for"
            );
            let a = d.query_allowance.unwrap_or_default();
            let _ = writeln!(
                out,
                "  - many overlapping tables could be differenced, so each such project has a \
                 query allowance at this trust: {} queries a day (UTC){} unless the project \
                 says otherwise (query_allowance); a query counts once it passes vetting (a \
                 refusal by vetting does not, a failure does), and a repeat the same day does \
                 not",
                a.per_day,
                match a.total {
                    Some(t) => format!(" and {t} in all"),
                    None => String::new(),
                }
            );
        }
        let _ = writeln!(
            out,
            "  - a group is released only if it has at least {} distinct patients, and each \
             aggregate only if that many of them have a value for it",
            d.min_patients
        );
        if d.uses_cell_keys() {
            describe_cell_keys(&mut out, d);
        } else {
            let _ = writeln!(
                out,
                "  - counts are {}",
                match d.rounding {
                    Rounding::None => "released unrounded".to_string(),
                    Rounding::Base =>
                        format!("rounded to the nearest multiple of {}", d.rounding_base),
                    Rounding::Midpoint6 => "rounded by midpoint-6 (ceil(x/6)*6 - 3)".to_string(),
                }
            );
            if d.rounding != Rounding::None {
                // Say plainly what rounding does not cover, so a controller can decide.
                let _ = writeln!(
                    out,
                    "    (every count an aggregate carries is rounded, AVG's and VAR's too; sums are \
                     exact: a SUM of a column that only takes a few values can still tell a count \
                     apart — allow only COUNT in [query] aggregates if that matters)"
                );
            }
        }
        let curves = self
            .query
            .aggregates
            .iter()
            .any(|a| trustql_survival::is_survival(a));
        if curves && !d.is_unprotected() {
            let s = d.survival;
            let _ = writeln!(
                out,
                "  - survival curves (km_curve, survival_at, logrank): a stratum below the minimum is \
                 withheld whole; the rest release each interval's events and censorings with \
                 the cumulative counts rounded to the middle of their band of {} and any below \
                 {} released as 0 (never one interval suppressed); intervals are at least {} \
                 days wide; logrank's arms are strata of their own, each withheld or rounded so",
                s.rounding_base, s.least_cumulative, s.min_interval_days
            );
        }
        let percentiles = self
            .query
            .aggregates
            .iter()
            .any(|a| trustql_distribution::is_percentile(a));
        if percentiles && !d.is_unprotected() {
            let _ = writeln!(
                out,
                "  - percentiles (median, percentile_cont, approx_percentile_cont): read from a \
                 histogram over the column's public bins (at least as wide as a CASE band may \
                 be); bins with fewer than {} rows are pooled with their neighbours, so no \
                 youngest or oldest patient stands alone, then the cumulative counts are \
                 rounded to the middle of their band of {}; a group below the minimum is \
                 withheld whole",
                d.min_patients, d.survival.rounding_base
            );
        }
        match d.dominance {
            Some(dom) => {
                let _ = writeln!(
                    out,
                    "  - a sum is withheld when its {} largest contributions make up more than {}% of it",
                    dom.n, dom.k
                );
            }
            None => {
                let _ = writeln!(out, "  - no dominance rule");
            }
        }
        if d.withhold_whole_margin_cells {
            let _ = writeln!(
                out,
                "  - a group holding every patient of its row or column (a 100% cell, so every \
                 other cell of that row or column is 0%) is withheld"
            );
        }
        if d.uses_cell_keys() {
            let _ = writeln!(
                out,
                "  - totals and subtotals are perturbed by their own cell keys, and a withheld \
                 group does not withhold them: subtracting released cells from a total gives \
                 the withheld cell plus every cell's independent adjustment, not its count"
            );
        } else {
            let _ = writeln!(
                out,
                "  - a withheld group also withholds the totals and subtotals it belongs to, so it \
                 cannot be recovered by subtraction"
            );
        }
        let _ = writeln!(out, "Columns:");
        let _ = writeln!(
            out,
            "  - direct identifiers (ids, link numbers) are never released, grouped on, filtered \
             or transformed; they may only join tables on the patient key and be counted distinct"
        );
        for (name, rules) in [
            ("quasi-identifiers", &self.classes.quasi_identifier),
            ("clinical columns", &self.classes.clinical),
        ] {
            let yes_no = |b: bool| if b { "may" } else { "may not" };
            let _ = writeln!(
                out,
                "  - {name} {} be grouped on, {} be filtered on, {} be summed or averaged, {} be \
                 given to MIN/MAX",
                yes_no(rules.group_by),
                yes_no(rules.filter),
                yes_no(rules.aggregate),
                yes_no(rules.min_max)
            );
        }
        let q = &self.query;
        let _ = writeln!(out, "Queries:");
        let _ = writeln!(out, "  - aggregates allowed: {}", q.aggregates.join(", "));
        let _ = writeln!(
            out,
            "  - at most {} characters, {} values per IN list, {} joins, {} groups",
            q.max_query_chars, q.max_in_list, q.max_joins, q.max_groups
        );
        let _ = writeln!(
            out,
            "  - at most {} operators and nesting {} deep, checked before the SQL is parsed",
            q.max_operators, q.max_nesting
        );
        let _ = writeln!(out, "Projects:");
        if self.projects.is_empty() {
            let _ = writeln!(out, "  (none)");
        }
        for p in &self.projects {
            let _ = writeln!(
                out,
                "  - {}{}: researchers {}; tables {}; approved until {}",
                p.id,
                if p.title.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", p.title)
                },
                p.researchers.join(", "),
                p.tables.join(", "),
                p.expires
            );
            if let Some(a) = self.allowance(p) {
                let _ = writeln!(
                    out,
                    "    query allowance: {} queries a day (UTC){}",
                    a.per_day,
                    match a.total {
                        Some(t) => format!(", {t} in all"),
                        None => ", no total limit".to_string(),
                    }
                );
            }
            if let Some(pool) = &p.pool {
                let _ = writeln!(
                    out,
                    "    pooled with {}: this trust sends its exact counts over every public cell \
                     of a query, masked so that only the sum over all members means anything \
                     (no one sees this trust's numbers); the coordinator adds them, so it sees \
                     the EXACT POOLED TOTALS, before it applies the [disclosure] rules above \
                     once, to them: approve a pool only with a coordinator you trust with \
                     those (every member must approve the same rules and members); counts \
                     only, grouped by columns with public code sets; a patient treated at two \
                     members is counted at both, so set min_patients with that in mind",
                    pool.members.join(", ")
                );
            }
            if let Some(dp) = p.dp {
                let _ = writeln!(
                    out,
                    "    differential privacy: ε {} per query, {} in all; δ {} per query grouped \
                     on non-public keys, {} in all",
                    dp.epsilon_per_query, dp.epsilon_budget, dp.delta_per_query, dp.delta_budget
                );
                let min = self.dp.min_epsilon_per_query;
                if min > 0.0 {
                    let _ = writeln!(
                        out,
                        "    at most {} releases: a query spends at least ε {min}",
                        (dp.epsilon_budget / min).floor()
                    );
                }
            }
        }
        if self.projects.iter().any(|p| p.dp.is_some()) {
            let r = &self.dp;
            let _ = writeln!(out, "Differential privacy (for the projects marked above):");
            let _ = writeln!(
                out,
                "  - noise from OpenDP's Laplace mechanism replaces suppression and rounding; \
                 COUNT, SUM, AVG, VAR and STDDEV only"
            );
            let _ = writeln!(
                out,
                "  - each patient brings at most {} row(s) of a table to an aggregate{}",
                r.default_rows_per_patient,
                r.rows_per_patient
                    .iter()
                    .map(|(t, n)| format!(", {n} of {t}"))
                    .collect::<String>()
            );
            let _ = writeln!(
                out,
                "  - summable columns, clamped to: {}",
                if r.bounds.is_empty() {
                    "(none)".to_string()
                } else {
                    r.bounds
                        .iter()
                        .map(|(c, [l, u])| format!("{c} [{l}, {u}]"))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            );
            let _ = writeln!(
                out,
                "  - groups on keys outside a public code set are released only if their noisy \
                 patient count passes a threshold"
            );
            let _ = writeln!(
                out,
                "  - a query spends at least ε {} (min_epsilon_per_query): a request for less is \
                 refused, and each release is charged before the query runs, so a query that \
                 fails still costs its ε",
                r.min_epsilon_per_query
            );
        }
        out
    }
}

/// The cell-key method in plain words, with its tables' bias and variance.
fn describe_cell_keys(out: &mut String, d: &Disclosure) {
    let c = &d.cell_key;
    let _ = writeln!(
        out,
        "  - every count and sum is perturbed by the cell-key method (as the ONS did for Census \
         2021 and the ABS does in TableBuilder): each patient has a fixed random record key, \
         made at this trust from a secret that never leaves it; a cell's key is the sum of its \
         patients' keys; a count moves by an adjustment the public table below gives for the \
         count and the key (at most {} either way, never below zero, zero stays zero)",
        c.counts.max_adjustment
    );
    let _ = writeln!(
        out,
        "    the same patients always get the same adjustment, however the query is worded, so \
         asking again averages nothing away; two cells one patient apart get unrelated \
         adjustments, so their difference is noise, not the patient (repeated differencing is \
         limited by the query allowance)"
    );
    let _ = writeln!(
        out,
        "  - a SUM moves by up to {} steps of {} × its largest contribution (the ABS magnitude \
         method); an AVG is the perturbed sum over the perturbed count, and so is a VAR's or \
         STDDEV's mean, whose spread (the sample variance) is the group's own",
        c.magnitudes.max_adjustment, c.magnitudes.scale
    );
    match d.cell_key_tables() {
        Ok(tables) => {
            let _ = writeln!(
                out,
                "    count table (D = {}, V = {}): bias and variance of the adjustment by count:",
                c.counts.max_adjustment, c.counts.variance
            );
            for (n, bias, variance) in tables.count_moments() {
                let _ = writeln!(
                    out,
                    "      {}{n}: bias {:+.4}, variance {variance:.3}",
                    if n > u64::from(c.counts.max_adjustment) {
                        ">= "
                    } else {
                        ""
                    },
                    // -0.0000 reads as a bias; it is none.
                    if bias.abs() < 5e-5 { 0.0 } else { bias }
                );
            }
        }
        Err(e) => {
            let _ = writeln!(out, "    (the tables cannot be built: {e})");
        }
    }
}
