//! The release contract: every decision about what may leave a trust, and how, behind one
//! typed API that the node calls and that tests can drive without a server.
//!
//! 1. [`needs`]: given the vetted query and the mode the project is in, what the node must
//!    compute besides the query (the patient count's cap, per-patient contributions for a
//!    dominance rule, the bounded rewrite and cost for differential privacy), or why the query
//!    cannot be released at all.
//! 2. The node runs the partial aggregation and describes each column ([`PartialAnswer`]).
//! 3. [`release`]: the protected answer and its report; for DP the node writes the charge
//!    ([`Budget`]) before it lets the answer go.
//!
//! The federation's [`TotalsRules`] are the coordinator's side of the same contract.

mod budget;
mod cellkey;
mod dp;
mod pooled;
mod sdc;
mod state;
mod survival;
pub use survival::ARM_KEY;
mod totals;

use arrow::array::RecordBatch;
use datafusion::common::Column;
use datafusion::logical_expr::{Aggregate, Expr, LogicalPlan};
use trustql_schemas::TrustSchema;

use crate::contribution::{BoundedQuery, MOMENT_AGGREGATES, bound_contributions};
use crate::policy::{PATIENT_COUNT_CAP, Policy, Project, ProjectDp};
use crate::refusal::{Refusal, Rule};
use crate::vet::Vetted;

pub use budget::Budget;
pub use pooled::{
    PoolNeeds, PoolParameters, PoolRound, PooledColumn, PooledContribution, PooledLayout,
    bind_pool, contribute, pool_hash, release_pooled,
};
pub use sdc::{DisclosureReport, Protected, protect, round, round_count};
pub use state::{Contributions, Curve, Moment, PartialAnswer, Role, Source, StateColumn};
pub use totals::{AnswerProtection, TotalsRules};

/// Why a release did not happen: a rule refused it, or something went wrong inside.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// A rule refused the release; the reason is for the researcher.
    #[error("{0}")]
    Refused(Refusal),
    /// The answer was not what the release expects (a fault, not a decision): nothing leaves,
    /// and the node logs and audits it as a failure.
    #[error("internal fault in the release: {0}")]
    Internal(&'static str),
    /// OpenDP could not add the noise (nothing leaves).
    #[error("differential privacy: {0}")]
    Noise(String),
    /// The pool's masks could not be made (a member without a pinned key, too few members):
    /// a configuration fault, and nothing leaves.
    #[error("pool: {0}")]
    Pool(String),
}

impl From<Refusal> for ReleaseError {
    fn from(r: Refusal) -> Self {
        ReleaseError::Refused(r)
    }
}

/// What the researcher asked for besides the SQL.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Terms {
    /// A smaller ε than the project's per-query ε, for DP projects.
    pub epsilon: Option<f64>,
    /// Only the cost of a DP query: nothing runs, nothing is spent.
    pub preview: bool,
}

/// What the node must compute for a release, by mode.
#[derive(Debug, Clone)]
pub enum Needs {
    /// Statistical disclosure control.
    Sdc(Box<SdcNeeds>),
    /// Differential privacy.
    Dp(Box<DpNeeds>),
}

/// What an SDC release needs.
#[derive(Debug, Clone)]
pub struct SdcNeeds {
    /// The column the patients are counted by.
    pub patient_key: Column,
    /// Patients need counting only up to this (thresholds and rounding cannot tell more).
    pub patient_cap: u64,
    /// The aggregates whose per-patient sums the dominance rule needs ([`Contributions`]);
    /// empty when it needs none.
    pub contributions: Vec<usize>,
    /// The dominance rule's n: how many of the largest contributions it adds up.
    pub top: u32,
    /// The aggregates whose argument can be missing for some of the group's patients: each
    /// needs its own patient count ([`Source::AggregatePatients`]), so that an AVG over the
    /// two patients who have a value is not released because the group has twenty.
    /// Aggregates of the same argument share one count: the first's.
    pub counted: Vec<usize>,
    /// Per aggregate, whose patients it reads: `Some(a)` for the count of aggregate `a` in
    /// `counted` (the first of its argument), `None` for the group's.
    pub reads: Vec<Option<usize>>,
    /// Whether released numbers are perturbed by the cell-key method: the node then adds
    /// every patient count's cell key ([`Source::CellKey`]), and counts exactly.
    pub cell_keys: bool,
    /// For a pooled project: the answer is not protected here but masked and pooled
    /// ([`contribute`]), and the pool's rules protect the total ([`release_pooled`]).
    pub pool: Option<Box<PoolNeeds>>,
    /// GROUP BY keys the node adds to the query's own: each `logrank` call's arm, so every
    /// arm is a stratum with its own patient count, withheld and rounded as a curve is.
    pub arms: Vec<Expr>,
}

/// What a differentially private release needs.
#[derive(Debug, Clone)]
pub struct DpNeeds {
    /// The column the patients are counted by.
    pub patient_key: Column,
    /// The query rewritten so each patient brings a bounded number of rows, with clamps.
    pub bounded: BoundedQuery,
    /// The ε this query spends.
    pub epsilon: f64,
    /// The δ it spends (only when groups are chosen by threshold).
    pub delta: f64,
    /// Whether every key's codes are public and few enough to release all of them.
    pub public: bool,
    /// Only the cost: nothing is released or charged.
    pub preview: bool,
    /// The project's DP terms at this trust.
    pub project: ProjectDp,
}

impl Needs {
    /// The column the patients are counted by.
    pub fn patient_key(&self) -> &Column {
        match self {
            Needs::Sdc(n) => &n.patient_key,
            Needs::Dp(n) => &n.patient_key,
        }
    }
}

/// Decides what the node must compute to release `aggregate` (the query's one aggregation,
/// from the unoptimised plan `vetted` describes) for `project`, or refuses it.
pub fn needs(
    policy: &Policy,
    project: &Project,
    schema: &TrustSchema,
    aggregate: &Aggregate,
    optimized: &LogicalPlan,
    vetted: &Vetted,
    terms: Terms,
) -> Result<Needs, Refusal> {
    survival::check_calls(policy, aggregate, project.dp.is_some())?;
    let Some(patient_key) = vetted.patient_key.clone() else {
        return Err(Refusal::new(
            Rule::Unsupported,
            "the query must read a table holding the patient key (sim_av_patient, \
             sim_av_tumour, sim_sact_regimen or an RTDS table) so patients can be counted; \
             join sim_sact_regimen for cycles, drugs and outcomes",
        ));
    };
    if let Some(dp) = project.dp {
        let epsilon = Budget::epsilon_for(&dp, policy.dp.min_epsilon_per_query, terms.epsilon)?;
        let bounded = bound_contributions(schema, &policy.dp, aggregate, optimized, vetted)?;
        let public = bounded.public_domain.as_ref().is_some_and(|domain| {
            let size = domain
                .iter()
                .fold(1usize, |n, codes| n.saturating_mul(codes.len() + 1));
            size <= policy.query.max_groups
        });
        let delta = if !public && !aggregate.group_expr.is_empty() {
            dp.delta_per_query
        } else {
            0.0
        };
        return Ok(Needs::Dp(Box::new(DpNeeds {
            patient_key,
            bounded,
            epsilon,
            delta,
            public,
            preview: terms.preview,
            project: dp,
        })));
    }
    if terms.preview {
        return Err(Refusal::new(
            Rule::Unsupported,
            "a preview tells the cost of a differentially private query; this project is \
             not in differential-privacy mode here, so its queries cost no budget",
        ));
    }
    let disclosure = &policy.disclosure;
    let cell_keys = disclosure.uses_cell_keys();
    let mut contributions = Vec::new();
    let mut top = 0;
    // SUM's and AVG's sums are the states the dominance rule reads, and the cell-key method
    // scales their adjustment (and a variance's mean's) by their largest contribution.
    if disclosure.dominance.is_some() || cell_keys {
        contributions = aggregate
            .aggr_expr
            .iter()
            .enumerate()
            .filter(|(_, e)| {
                function_of(e).is_some_and(|f| {
                    matches!(f.as_str(), "sum" | "avg")
                        || (cell_keys && MOMENT_AGGREGATES.contains(&f.as_str()))
                })
            })
            .map(|(a, _)| a)
            .collect();
        top = disclosure.dominance.map_or(1, |d| d.n);
        if !contributions.is_empty()
            && aggregate
                .group_expr
                .iter()
                .any(|e| matches!(e, Expr::GroupingSet(_)))
        {
            let why = if cell_keys {
                "this trust perturbs sums, means and variances by the cell-key method, scaled by each group's \
                 largest contribution, which TrustQL does not measure on ROLLUP, CUBE or \
                 GROUPING SETS yet; group without them, or ask for counts only"
            } else {
                "this trust applies a dominance rule to sums, which TrustQL does not evaluate on \
                 ROLLUP, CUBE or GROUPING SETS yet; group without them"
            };
            return Err(Refusal::new(Rule::Unsupported, why));
        }
    }
    // COUNT(*) and COUNT(DISTINCT patient) read every patient of the group; any aggregate of a
    // column reads only the patients with a value, whose minimum and whose cell key are their
    // own.
    let counted: Vec<usize> = if disclosure.min_patients > 1 || cell_keys {
        aggregate
            .aggr_expr
            .iter()
            .enumerate()
            .filter(|(_, e)| reads_a_column(e))
            .map(|(a, _)| a)
            .collect()
    } else {
        Vec::new()
    };
    let mut reads = vec![None; aggregate.aggr_expr.len()];
    let mut firsts: Vec<(Option<Expr>, usize)> = Vec::new();
    for &a in &counted {
        let argument = read_filter(&aggregate.aggr_expr[a]);
        let first = match firsts.iter().find(|(arg, _)| *arg == argument) {
            Some(&(_, first)) => first,
            None => {
                firsts.push((argument, a));
                a
            }
        };
        reads[a] = Some(first);
    }
    let sdc = SdcNeeds {
        patient_key,
        // Thresholds need no more patients than twice the largest any rule may set; a
        // perturbed count is released, so it is counted exactly.
        patient_cap: if cell_keys {
            u64::MAX
        } else {
            PATIENT_COUNT_CAP
        },
        contributions,
        top,
        counted,
        reads,
        cell_keys,
        pool: None,
        arms: survival::arm_keys(aggregate),
    };
    match &project.pool {
        Some(pool) => pooled_needs(policy, project, pool, schema, aggregate, vetted, sdc),
        None => Ok(Needs::Sdc(Box::new(sdc))),
    }
}

/// What a query of a pooled project needs: every key a column with a public code set, few
/// enough cells, and only counts, which add up under masks.
fn pooled_needs(
    policy: &Policy,
    project: &Project,
    pool: &crate::policy::ProjectPool,
    schema: &TrustSchema,
    aggregate: &Aggregate,
    vetted: &Vetted,
    mut sdc: SdcNeeds,
) -> Result<Needs, Refusal> {
    let refuse = |why: String| Err(Refusal::new(Rule::Pool, why));
    if aggregate
        .group_expr
        .iter()
        .any(|e| matches!(e, Expr::GroupingSet(_)))
    {
        return refuse(
            "project is pooled across trusts, and pooled answers do not take ROLLUP, CUBE or \
             GROUPING SETS yet; ask for each grouping separately"
                .into(),
        );
    }
    if let Some(f) = aggregate
        .aggr_expr
        .iter()
        .filter_map(function_of)
        .find(|f| f != "count")
    {
        return refuse(format!(
            "project is pooled across trusts, and pooled answers release counts only so far \
             (COUNT(*), COUNT(column), COUNT(DISTINCT patient key)); {} is not pooled yet",
            f.to_uppercase()
        ));
    }
    let mut domain = Vec::with_capacity(vetted.key_code_sets.len());
    for (i, set) in vetted.key_code_sets.iter().enumerate() {
        let Some(set) = set.as_deref().and_then(|s| schema.code_set(s)) else {
            return refuse(format!(
                "project is pooled across trusts, and every GROUP BY key must be a column with \
                 a public code set, so every trust lays out the same cells without saying \
                 which groups it has; key {} has none (group by a coded column such as \
                 site_icd10_o2_3char, stage_best or gender)",
                i + 1
            ));
        };
        domain.push(set.codes.iter().map(|c| c.code.clone()).collect::<Vec<_>>());
    }
    let max_cells = policy.query.max_groups;
    if crate::grid::cells(&domain).is_none_or(|c| c > max_cells) {
        return Err(Refusal::new(
            Rule::TooManyGroups,
            format!(
                "a pooled answer has one cell per combination of its keys' codes, more than \
                 the {max_cells} this pool allows; group by fewer keys"
            ),
        ));
    }
    sdc.patient_cap = u64::MAX;
    sdc.pool = Some(Box::new(PoolNeeds {
        parameters: PoolParameters::new(&project.id, pool, &policy.disclosure, max_cells),
        domain,
    }));
    Ok(Needs::Sdc(Box::new(sdc)))
}

/// The first argument of an aggregate expression.
pub fn argument_of(expr: &Expr) -> Option<Expr> {
    match expr.clone().unalias_nested().data {
        Expr::AggregateFunction(f) => f.params.args.first().cloned(),
        _ => None,
    }
}

/// Which rows an aggregate reads, as a condition: those with a value for its argument, or for
/// a survival aggregate those with a start, an end and an event, and logrank's an arm (the
/// rest are not counted).
pub fn read_filter(expr: &Expr) -> Option<Expr> {
    match expr.clone().unalias_nested().data {
        Expr::AggregateFunction(f) => {
            let name = f.func.name().to_lowercase();
            let read = if trustql_survival::is_survival(&name) {
                trustql_survival::data_arguments(&name)
            } else {
                1
            };
            f.params
                .args
                .into_iter()
                .take(read)
                .map(Expr::is_not_null)
                .reduce(Expr::and)
        }
        _ => None,
    }
}

/// Whether an aggregate reads a value that some rows may lack: anything but COUNT(*) and
/// COUNT(DISTINCT …), which the node counts as patients.
fn reads_a_column(expr: &Expr) -> bool {
    match expr.clone().unalias_nested().data {
        Expr::AggregateFunction(f) => {
            let constant = f
                .params
                .args
                .iter()
                .all(|a| matches!(a, Expr::Literal(v, _) if !v.is_null()));
            let distinct_count = f.params.distinct && f.func.name() == "count";
            !constant && !distinct_count
        }
        _ => false,
    }
}

/// The aggregate function an aggregate expression calls, lower case.
fn function_of(expr: &Expr) -> Option<String> {
    match expr.clone().unalias_nested().data {
        Expr::AggregateFunction(f) => Some(f.func.name().to_lowercase()),
        _ => None,
    }
}

/// A protected answer, ready to leave the trust.
#[derive(Debug, Clone)]
pub struct Release {
    /// The released groups and states.
    pub batch: RecordBatch,
    /// What each released column is (the partial answer's, less what stays at the trust).
    pub columns: Vec<StateColumn>,
    /// What protection did.
    pub report: ReleaseReport,
}

/// What protection did to one answer.
#[derive(Debug, Clone)]
pub enum ReleaseReport {
    /// Groups withheld and why.
    Sdc(DisclosureReport),
    /// The noise added.
    Dp(DpReport),
}

/// The noise of a differentially private release.
#[derive(Debug, Clone, PartialEq)]
pub struct DpReport {
    /// The noisy patient count a group needed, when groups were chosen by threshold.
    pub threshold: Option<i64>,
    /// Every noisy column's Laplace scale.
    pub noise: Vec<NoisyColumn>,
}

/// One noisy column of a release.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NoisyColumn {
    /// Its index in the answer.
    pub column: usize,
    /// Laplace scale (standard deviation is scale × √2).
    pub scale: f64,
    /// For a variance's mean and m2: the centre its moments were taken about.
    pub centre: Option<f64>,
}

/// Protects `answer` as `needs` says: the only way a partial answer becomes releasable.
pub fn release(
    policy: &Policy,
    needs: &Needs,
    answer: &PartialAnswer,
) -> Result<Release, ReleaseError> {
    let max_groups = policy.query.max_groups;
    match needs {
        Needs::Sdc(sdc) if sdc.pool.is_some() => Err(ReleaseError::Internal(
            "a pooled project's answer is masked for its pool, never released by one trust",
        )),
        Needs::Sdc(sdc) => {
            let protected = sdc::protect_with(answer, &policy.disclosure, &sdc.reads, max_groups)?;
            Ok(Release {
                batch: protected.batch,
                columns: protected.columns,
                report: ReleaseReport::Sdc(protected.report),
            })
        }
        Needs::Dp(needs) => {
            let (batch, report) = dp::release_dp(needs, answer, max_groups)?;
            Ok(Release {
                batch,
                columns: answer.columns.clone(),
                report: ReleaseReport::Dp(report),
            })
        }
    }
}
