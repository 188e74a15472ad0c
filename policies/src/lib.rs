//! A trust's disclosure policy and everything that enforces it, as pure logic.
//!
//! - [`Policy`]: the TOML file a data controller writes, its lint and plain-words description;
//!   [`approve`] / [`load_approved`] bind an approval to the file's exact content.
//! - [`locked_session`] / [`plan_sql`]: a DataFusion session with only allow-listed functions
//!   and no statements, for planning researcher SQL; [`make_total`] (an analyzer rule of that
//!   session) rewrites every expression so it cannot fail on data.
//! - [`vet_plan`]: the rules a query must pass, checked on DataFusion's logical plans; a
//!   project protected by suppression and rounding is answered only table-builder shapes.
//! - [`needs`] and [`release`]: the release contract. What the node must compute for a query,
//!   and the only way its partial answer becomes releasable: disclosure control ([`protect`]:
//!   suppression, rounding, dominance) or differential privacy ([`bound_contributions`],
//!   OpenDP's noise, the [`Budget`]). [`TotalsRules`] are the coordinator's merged totals.
//!
//! Nothing here talks to the network; the node wraps it.

// Library code returns errors; only tests may expect().
#![cfg_attr(not(test), deny(clippy::expect_used))]

mod allowance;
mod approval;
pub mod cellkey;
mod contribution;
mod date;
mod error;
mod grid;
mod noise;
mod policy;
mod refusal;
mod release;
mod session;
mod shape;
mod text;
mod total;
mod vet;

pub use allowance::{AllowanceLeft, AllowanceUsed, DEFAULT_QUERIES_PER_DAY, QueryAllowance};
pub use approval::{
    Approval, ApprovedPolicy, approval_path, approve, content_hash, load_approved, load_checked,
};
pub use cellkey::{CellKey, CellKeyTables, PTable, PTableError};
pub use contribution::{
    BoundedQuery, Clamp, DP_AGGREGATES, MOMENT_AGGREGATES, bound_contributions,
};
pub use date::{now_rfc3339, parse_date, today};
pub use error::PolicyError;
pub use policy::{
    CellKeyRules, ClassRules, Classes, Disclosure, Dominance, DpRules, Finding, Header,
    MAX_MIN_PATIENTS, MAX_NESTING, MIN_EPSILON_FLOOR, MIN_POOL_MEMBERS, MagnitudeRules, Method,
    PATIENT_COUNT_CAP, PTableRules, Policy, Project, ProjectDp, ProjectPool, QueryRules, Rounding,
    SHIPPABLE_AGGREGATES, SurvivalRules,
};
pub use refusal::{Refusal, Rule};
pub use release::{
    ARM_KEY, AnswerProtection, Budget, Contributions, Curve, DisclosureReport, DpNeeds, DpReport,
    Moment, Needs, NoisyColumn, PartialAnswer, PoolNeeds, PoolParameters, PoolRound, PooledColumn,
    PooledContribution, PooledLayout, Protected, Release, ReleaseError, ReleaseReport, Role,
    SdcNeeds, Source, StateColumn, Terms, TotalsRules, argument_of, bind_pool, contribute, needs,
    pool_hash, protect, read_filter, release, release_pooled, round, round_count,
};
pub use session::{
    ALLOWED_SCALAR_FUNCTIONS, LOCKED_OUT_OPTIMIZER_RULES, locked_session, optimizer_rules_without,
    percentile_grids, plan_sql, sql_options,
};
pub use text::{TextLimits, check_text};
pub use total::{TOTAL_FUNCTIONS, TotalArithmetic, TotalExpressions, make_total};
pub use trustql_distribution::{Grids, is_percentile};
pub use trustql_survival::is_survival;
pub use vet::{Vetted, aggregate_of, authorise, vet_plan, vet_sql, vet_text};
