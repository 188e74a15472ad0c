//! The federation's totals rules: what the coordinator applies to merged totals, on top of
//! every node's own protection, and which answers they apply to.

use std::collections::HashSet;

use datafusion::common::{Column, Result as DfResult};
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder, lit, when};
use serde::{Deserialize, Serialize};

use crate::policy::{MAX_MIN_PATIENTS, Rounding};

/// `[disclosure]` of `coordinator.toml`: rules on the merged totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TotalsRules {
    /// Fewest distinct patients, summed over trusts, a released total may have.
    pub min_patients: u64,
    /// Rounding of merged counts: `none`, `base` or `midpoint6`.
    pub rounding: Rounding,
    /// Base for `rounding = "base"`.
    pub rounding_base: u64,
}

impl Default for TotalsRules {
    fn default() -> Self {
        TotalsRules {
            min_patients: 0,
            rounding: Rounding::None,
            rounding_base: 5,
        }
    }
}

/// How the answers of one query were protected at their trusts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerProtection {
    /// Suppression and rounding (statistical disclosure control).
    Sdc,
    /// Suppression and the cell-key method: counts and sums already perturbed.
    CellKey,
    /// Differential privacy: calibrated noise, and no patient count released.
    Dp,
}

impl TotalsRules {
    /// Whether the rules change anything.
    pub fn is_active(&self) -> bool {
        self.min_patients > 1 || self.rounding != Rounding::None
    }

    /// Why the rules cannot be served, if they cannot.
    pub fn check(&self) -> Result<(), String> {
        if self.min_patients > MAX_MIN_PATIENTS {
            return Err(format!(
                "disclosure.min_patients may be at most {MAX_MIN_PATIENTS} (nodes count patients \
                 per group up to that)"
            ));
        }
        if self.rounding == Rounding::Base && self.rounding_base == 0 {
            return Err("disclosure.rounding_base must be positive".into());
        }
        Ok(())
    }

    /// The rules for one query's answers. When every answer is differentially private, the
    /// noise is the protection and no patient count is released, so no totals rule applies.
    /// When some are and some are not (a mixed federation), the rules apply to the merged
    /// totals: the SDC trusts' counts need them, and the DP trusts, releasing no patient count,
    /// add nothing towards the minimum, which errs on the side of withholding.
    ///
    /// Cell-key answers are perturbed by their own cell keys: rounding their sum on top would
    /// bias it, so without a rounded (plain SDC) answer among them the totals are not rounded,
    /// and only the minimum applies.
    pub fn for_answers(&self, answers: impl IntoIterator<Item = AnswerProtection>) -> TotalsRules {
        let answers: Vec<AnswerProtection> = answers.into_iter().collect();
        if !answers.is_empty() && answers.iter().all(|a| *a == AnswerProtection::Dp) {
            return TotalsRules::default();
        }
        let rounded = answers.contains(&AnswerProtection::Sdc);
        if answers.contains(&AnswerProtection::CellKey) && !rounded {
            return TotalsRules {
                rounding: Rounding::None,
                ..*self
            };
        }
        *self
    }

    /// What a researcher is told the rules did.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if self.min_patients > 1 {
            notes.push(format!(
                "totals with fewer than {} patients across the trusts are withheld",
                self.min_patients
            ));
        }
        match self.rounding {
            Rounding::None => {}
            Rounding::Base => notes.push(format!(
                "merged counts are rounded to the nearest {}",
                self.rounding_base
            )),
            Rounding::Midpoint6 => notes.push("merged counts are rounded by midpoint-6".into()),
        }
        notes
    }

    /// `count` rounded as the rules say: the arithmetic of [`crate::round_count`] as an
    /// expression over Int64.
    pub fn rounded(&self, count: Expr) -> Expr {
        match self.rounding {
            Rounding::None => count,
            Rounding::Base => {
                // y − (y mod⁺ base): the multiple of base at or below y = count + base/2, as
                // div_euclid gives it (truncating division would differ below zero).
                let base = self.rounding_base.max(1) as i64;
                let y = count + lit(base / 2);
                y.clone() - ((y % lit(base)) + lit(base)) % lit(base)
            }
            Rounding::Midpoint6 => when(count.clone().lt_eq(lit(0i64)), lit(0i64))
                .otherwise((count + lit(5i64)) / lit(6i64) * lit(6i64) - lit(3i64))
                .unwrap_or_else(|_| lit(0i64)),
        }
    }

    /// Applies the rules directly above the merged aggregate `plan`: totals whose summed
    /// `patients` column is under the minimum are filtered out, and the unqualified columns in
    /// `counts` are rounded, so HAVING, ORDER BY and LIMIT see only what is released.
    pub fn apply(
        &self,
        plan: LogicalPlan,
        counts: &HashSet<String>,
        patients: &str,
    ) -> DfResult<LogicalPlan> {
        let mut plan = plan;
        if self.min_patients > 1 {
            plan = LogicalPlanBuilder::from(plan)
                .filter(
                    Expr::Column(Column::new_unqualified(patients))
                        .gt_eq(lit(self.min_patients as i64)),
                )?
                .build()?;
        }
        if self.rounding != Rounding::None {
            let exprs = plan
                .schema()
                .iter()
                .map(|(qualifier, field)| {
                    let column = Expr::Column(Column::new(qualifier.cloned(), field.name()));
                    if qualifier.is_none() && counts.contains(field.name()) {
                        self.rounded(column).alias(field.name())
                    } else {
                        column
                    }
                })
                .collect::<Vec<_>>();
            plan = LogicalPlanBuilder::from(plan).project(exprs)?.build()?;
        }
        Ok(plan)
    }
}
