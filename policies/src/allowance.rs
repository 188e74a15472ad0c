//! An SDC project's query allowance at one trust: whether a query may run, and what is left.
//!
//! Suppression and rounding hold for one table, not for an unlimited series of overlapping
//! ones (differencing many ranges recovers small cells), so a project outside differential
//! privacy may ask a trust only so many queries per day and in total. The node counts each
//! query that passes vetting (one refused before it runs is not; one that fails after vetting
//! is, as its absence would tell which trust failed), persists the counts and supplies the
//! day; the decision is here. A repeat of a query already counted the same day (same plan, policy and
//! data, so the same answer) is not counted.

use serde::{Deserialize, Serialize};

use crate::date::civil_from_days;
use crate::policy::{Policy, Project};
use crate::refusal::{Refusal, Rule};

/// `query_allowance = { per_day = …, total = … }`, in `[disclosure]` (every SDC project's) or
/// in a `[[project]]` (that project's, instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueryAllowance {
    /// Queries per day (UTC) at this trust.
    #[serde(default = "default_per_day")]
    pub per_day: u64,
    /// Queries ever at this trust; none means no total limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
}

/// The daily allowance when a policy sets none: a day's generous work at a table builder,
/// far below the thousands of overlapping ranges a differencing attack needs.
pub const DEFAULT_QUERIES_PER_DAY: u64 = 500;

fn default_per_day() -> u64 {
    DEFAULT_QUERIES_PER_DAY
}

impl Default for QueryAllowance {
    fn default() -> Self {
        QueryAllowance {
            per_day: DEFAULT_QUERIES_PER_DAY,
            total: None,
        }
    }
}

/// What a project has used at a trust, as the node counted it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AllowanceUsed {
    /// Queries counted on the day asked about.
    pub today: u64,
    /// Queries counted ever.
    pub total: u64,
    /// The query repeats one already counted that day.
    pub repeat: bool,
}

/// What a project has left at a trust once a query is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowanceLeft {
    /// Queries left today.
    pub today: u64,
    /// Queries left in total; none without a total limit.
    pub total: Option<u64>,
    /// Whether this query is counted (a repeat is not).
    pub counts: bool,
}

impl Policy {
    /// The allowance a project's queries are counted against: none for a project in
    /// differential privacy (its budget bounds what any sequence of queries learns) or under
    /// the unprotected correctness mode (tests only).
    pub fn allowance(&self, project: &Project) -> Option<QueryAllowance> {
        if project.dp.is_some() || self.disclosure.is_unprotected() {
            return None;
        }
        Some(
            project
                .query_allowance
                .or(self.disclosure.query_allowance)
                .unwrap_or_default(),
        )
    }
}

impl QueryAllowance {
    /// Whether a query of `project` may run on `today` (days since 1970-01-01, UTC) after
    /// `used`, and what is left once it is answered; a spent allowance is a refusal that
    /// says which one and, for the daily one, when it resets.
    pub fn check(
        &self,
        used: AllowanceUsed,
        project: &str,
        trust: &str,
        today: i32,
    ) -> Result<AllowanceLeft, Refusal> {
        let left_today = self.per_day.saturating_sub(used.today);
        let left_total = self.total.map(|t| t.saturating_sub(used.total));
        if used.repeat {
            return Ok(AllowanceLeft {
                today: left_today,
                total: left_total,
                counts: false,
            });
        }
        if left_total == Some(0) {
            return Err(Refusal::new(
                Rule::QueryAllowance,
                format!(
                    "project {project} has used its total allowance of {} queries at trust \
                     {trust}; it does not reset (a repeat of a query answered today is still \
                     answered; ask the data controller for more)",
                    self.total.unwrap_or_default()
                ),
            ));
        }
        if left_today == 0 {
            let (y, m, d) = civil_from_days(i64::from(today) + 1);
            return Err(Refusal::new(
                Rule::QueryAllowance,
                format!(
                    "project {project} has used its allowance of {} queries today at trust \
                     {trust}; it resets at 00:00 UTC on {y:04}-{m:02}-{d:02} (a repeat of a query \
                     answered today is still answered)",
                    self.per_day
                ),
            ));
        }
        Ok(AllowanceLeft {
            today: left_today - 1,
            total: left_total.map(|t| t - 1),
            counts: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Finding;

    const TODAY: i32 = 20_415; // 2025-11-23

    fn allowance() -> QueryAllowance {
        QueryAllowance {
            per_day: 3,
            total: Some(5),
        }
    }

    fn used(today: u64, total: u64) -> AllowanceUsed {
        AllowanceUsed {
            today,
            total,
            repeat: false,
        }
    }

    #[test]
    fn a_query_within_the_allowance_runs_and_counts() {
        let left = allowance()
            .check(used(0, 0), "p", "T", TODAY)
            .expect("runs");
        assert_eq!(
            left,
            AllowanceLeft {
                today: 2,
                total: Some(4),
                counts: true
            }
        );
        let left = allowance()
            .check(used(2, 4), "p", "T", TODAY)
            .expect("runs");
        assert_eq!((left.today, left.total), (0, Some(0)));
    }

    #[test]
    fn a_spent_daily_allowance_refuses_and_says_when_it_resets() {
        let refusal = allowance()
            .check(used(3, 3), "p1", "TQ01", TODAY)
            .expect_err("refused");
        assert_eq!(refusal.rule, Rule::QueryAllowance);
        assert_eq!(refusal.rule.name(), "query-allowance");
        assert!(refusal.reason.contains("3 queries today"), "{refusal}");
        assert!(
            refusal.reason.contains("00:00 UTC on 2025-11-24"),
            "{refusal}"
        );
        // More than the allowance (a lowered policy) refuses too.
        assert!(allowance().check(used(9, 3), "p", "T", TODAY).is_err());
    }

    #[test]
    fn the_daily_allowance_resets_the_next_day_but_the_total_does_not() {
        // The node counts per day: the next day's count starts at zero.
        assert!(allowance().check(used(0, 3), "p", "T", TODAY + 1).is_ok());
        let refusal = allowance()
            .check(used(0, 5), "p", "T", TODAY + 1)
            .expect_err("total spent");
        assert_eq!(refusal.rule, Rule::QueryAllowance);
        assert!(refusal.reason.contains("total allowance of 5"), "{refusal}");
        assert!(refusal.reason.contains("does not reset"), "{refusal}");
    }

    #[test]
    fn a_repeat_is_answered_uncounted_even_when_the_allowance_is_spent() {
        let repeat = AllowanceUsed {
            repeat: true,
            ..used(3, 5)
        };
        let left = allowance().check(repeat, "p", "T", TODAY).expect("repeat");
        assert_eq!(
            left,
            AllowanceLeft {
                today: 0,
                total: Some(0),
                counts: false
            }
        );
    }

    #[test]
    fn without_a_total_only_the_day_limits() {
        let daily = QueryAllowance {
            per_day: 2,
            total: None,
        };
        let left = daily
            .check(used(1, 1_000_000), "p", "T", TODAY)
            .expect("ok");
        assert_eq!((left.today, left.total), (0, None));
    }

    fn policy(extra: &str) -> Policy {
        Policy::from_toml(&format!(
            "[policy]\nversion = \"v\"\ntrust = \"T\"\n{extra}\n\
             [[project]]\nid = \"sdc\"\nresearchers = [\"r\"]\ntables = [\"sim_av_patient\"]\n\
             expires = \"2099-12-31\"\n\
             [[project]]\nid = \"own\"\nresearchers = [\"r\"]\ntables = [\"sim_av_patient\"]\n\
             expires = \"2099-12-31\"\nquery_allowance = {{ per_day = 7 }}\n\
             [[project]]\nid = \"dp\"\nresearchers = [\"r\"]\ntables = [\"sim_av_patient\"]\n\
             expires = \"2099-12-31\"\n\
             dp = {{ epsilon_budget = 1.0, epsilon_per_query = 0.1 }}\n"
        ))
        .expect("policy parses")
    }

    fn of(policy: &Policy, id: &str) -> Option<QueryAllowance> {
        policy.allowance(policy.project(id).expect("project"))
    }

    #[test]
    fn sdc_projects_have_an_allowance_dp_and_unprotected_ones_do_not() {
        let p = policy("");
        assert_eq!(of(&p, "sdc"), Some(QueryAllowance::default()));
        assert_eq!(of(&p, "sdc").map(|a| a.per_day), Some(500));
        assert_eq!(
            of(&p, "own"),
            Some(QueryAllowance {
                per_day: 7,
                total: None
            })
        );
        assert_eq!(
            of(&p, "dp"),
            None,
            "DP projects are bounded by their budget"
        );

        let p = policy("[disclosure]\nquery_allowance = { per_day = 200, total = 5000 }\n");
        assert_eq!(
            of(&p, "sdc"),
            Some(QueryAllowance {
                per_day: 200,
                total: Some(5000)
            })
        );
        assert_eq!(
            of(&p, "own").map(|a| a.per_day),
            Some(7),
            "the project's own wins"
        );

        let p = policy("[disclosure]\nmin_patients = 1\nrounding = \"none\"\n");
        assert_eq!(of(&p, "sdc"), None, "the unprotected correctness mode");
        assert_eq!(of(&p, "own"), None);
    }

    #[test]
    fn a_zero_allowance_is_a_lint_error() {
        let schema = trustql_schemas::TrustSchema::cancer().expect("schema");
        let errors = |p: &Policy| {
            p.lint(&schema)
                .into_iter()
                .filter(|f| matches!(f, Finding::Error(m) if m.contains("query_allowance")))
                .count()
        };
        assert_eq!(errors(&policy("")), 0);
        assert_eq!(
            errors(&policy("[disclosure]\nquery_allowance = { per_day = 0 }\n")),
            1
        );
        assert_eq!(
            errors(&policy(
                "[disclosure]\nquery_allowance = { per_day = 5, total = 0 }\n"
            )),
            1
        );
    }
}
