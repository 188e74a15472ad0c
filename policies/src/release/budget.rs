//! A project's privacy budget at one trust: what is left, whether a query can pay, what is
//! left after it. The ledger that remembers the spending is the node's; the arithmetic is here.
//!
//! The accounting is bounded: every query spends at least the policy's minimum ε
//! ([`crate::DpRules::min_epsilon_per_query`]), a query passes only while what was spent, with
//! it, stays within the budget plus [`SLACK`], and a budget with no more than the slack left
//! is spent. The slack only forgives the rounding of floating-point sums (0.1 + 0.2 > 0.3),
//! once in all; it is far below the smallest minimum ε the policy lint allows.

use crate::policy::ProjectDp;
use crate::refusal::{Refusal, Rule};
use crate::release::DpNeeds;

/// Room for floating-point sums of ε when comparing with the budget (far below
/// [`crate::MIN_EPSILON_FLOOR`], so it never pays for a query).
pub(crate) const SLACK: f64 = 1e-9;

/// The ε and δ a project has left at a trust.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// ε left (never below zero).
    pub epsilon: f64,
    /// δ left (never below zero).
    pub delta: f64,
    /// ε left, below zero when rounding has overspent: what `afford` compares with, so the
    /// slack is granted once in all, not once per query.
    exact_epsilon: f64,
    exact_delta: f64,
}

impl Budget {
    /// What `dp` leaves after `spent_epsilon` and `spent_delta`.
    pub fn left(dp: &ProjectDp, spent_epsilon: f64, spent_delta: f64) -> Budget {
        Self::from_exact(
            dp.epsilon_budget - spent_epsilon,
            dp.delta_budget - spent_delta,
        )
    }

    fn from_exact(epsilon: f64, delta: f64) -> Budget {
        Budget {
            epsilon: epsilon.max(0.0),
            delta: delta.max(0.0),
            exact_epsilon: epsilon,
            exact_delta: delta,
        }
    }

    /// The ε a query of `dp` spends: the project's per-query ε, or a smaller one it asked
    /// for, never below the policy's minimum `min_epsilon` (each query costs at least that,
    /// so a budget pays for a bounded number of queries).
    pub fn epsilon_for(
        dp: &ProjectDp,
        min_epsilon: f64,
        requested: Option<f64>,
    ) -> Result<f64, Refusal> {
        let epsilon = requested.unwrap_or(dp.epsilon_per_query);
        if epsilon.is_finite() && epsilon >= min_epsilon && epsilon <= dp.epsilon_per_query {
            return Ok(epsilon);
        }
        Err(Refusal::new(
            Rule::Budget,
            format!(
                "a query of this project may spend ε from {min_epsilon} to at most {} at this \
                 trust",
                dp.epsilon_per_query
            ),
        ))
    }

    /// Refuses a query the budget cannot pay for, saying what is left (a preview costs nothing).
    pub fn afford(&self, needs: &DpNeeds, project: &str, trust: &str) -> Result<(), Refusal> {
        let (epsilon, delta) = (needs.epsilon, needs.delta);
        // A budget with no more than the slack left is spent: nothing more passes, however
        // small its ε (with the slack alone, an ε of 1e-300 would pass forever).
        let pays = self.exact_epsilon > SLACK
            && epsilon <= self.exact_epsilon + SLACK
            && delta <= self.exact_delta + SLACK * 1e-6;
        if needs.preview || pays {
            return Ok(());
        }
        Err(Refusal::new(
            Rule::Budget,
            format!(
                "project {project} has ε {:.4} and δ {:e} left at trust {trust}; this query needs \
                 ε {epsilon} and δ {delta:e} (ask for a smaller ε with the x-trustql-epsilon \
                 header, or ask the data controller for more budget)",
                self.epsilon, self.delta
            ),
        ))
    }

    /// What the query charges: nothing for a preview.
    pub fn charge(needs: &DpNeeds) -> (f64, f64) {
        if needs.preview {
            (0.0, 0.0)
        } else {
            (needs.epsilon, needs.delta)
        }
    }

    /// What is left once the query is charged.
    pub fn after(&self, needs: &DpNeeds) -> Budget {
        let (epsilon, delta) = Self::charge(needs);
        Self::from_exact(self.exact_epsilon - epsilon, self.exact_delta - delta)
    }
}
