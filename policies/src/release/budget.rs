//! A project's privacy budget at one trust: what is left, whether a query can pay, what is
//! left after it. The ledger that remembers the spending is the node's; the arithmetic is here.

use crate::policy::ProjectDp;
use crate::refusal::{Refusal, Rule};
use crate::release::DpNeeds;

/// Room for floating-point sums of ε when comparing with the budget.
pub(crate) const SLACK: f64 = 1e-9;

/// The ε and δ a project has left at a trust.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// ε left.
    pub epsilon: f64,
    /// δ left.
    pub delta: f64,
}

impl Budget {
    /// What `dp` leaves after `spent_epsilon` and `spent_delta` (never below zero).
    pub fn left(dp: &ProjectDp, spent_epsilon: f64, spent_delta: f64) -> Budget {
        Budget {
            epsilon: (dp.epsilon_budget - spent_epsilon).max(0.0),
            delta: (dp.delta_budget - spent_delta).max(0.0),
        }
    }

    /// Refuses a query the budget cannot pay for, saying what is left (a preview costs nothing).
    pub fn afford(&self, needs: &DpNeeds, project: &str, trust: &str) -> Result<(), Refusal> {
        let (epsilon, delta) = (needs.epsilon, needs.delta);
        if needs.preview || (epsilon <= self.epsilon + SLACK && delta <= self.delta + SLACK * 1e-6)
        {
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
        Budget {
            epsilon: (self.epsilon - epsilon).max(0.0),
            delta: (self.delta - delta).max(0.0),
        }
    }
}
