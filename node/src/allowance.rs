//! The node's side of an SDC project's query allowance: it counts queries per project, per day
//! and in total, and keeps the count in the budget ledger (fsync'd, so a restart does not give
//! the allowance back). Whether a query may run, and what is left, is decided in `policies`
//! ([`trustql_policies::QueryAllowance::check`]).
//!
//! A query is counted once it passes vetting, before it runs, as a DP release is charged: a
//! query that then fails still counts, or the allowance left, shown in the next coverage report,
//! would tell which trust failed (a failure after vetting can depend on the trust's data).
//! A query refused before it runs (by vetting, or a spent allowance) is not counted.
//!
//! The node keeps no cache of SDC answers, so "a repeat answered from a cache is not counted"
//! is kept this way: a query with the same plan, policy and data as one counted that day runs
//! again, gives the same answer, and is not counted.

use sha2::{Digest, Sha256};
use trustql_budget::Charge;
use trustql_policies::{AllowanceUsed, now_rfc3339};
use trustql_protocol::{AllowanceLeft, SiteRequest};

use crate::engine::{SiteEngine, hex};
use crate::error::NodeError;

impl SiteEngine {
    /// Checks `request`'s project allowance on `today` and counts the query against it, or
    /// refuses a spent one; `None` for a project without an allowance (DP, the unprotected
    /// mode). A console dry-run, when there is one, stops before this and is never counted;
    /// a pooled round, when pools exist, is counted once by its caller.
    pub(crate) async fn count_query(
        &self,
        request: &SiteRequest,
        today: i32,
        plan_fingerprint: &str,
    ) -> Result<Option<AllowanceLeft>, NodeError> {
        let policy = &self.policy.policy;
        let Some(allowance) = policy
            .project(&request.project)
            .and_then(|p| policy.allowance(p))
        else {
            return Ok(None);
        };
        // The same plan over the same data under the same policy is the same answer.
        let query_key = hex(&Sha256::digest(format!(
            "{plan_fingerprint}|{}|{}",
            self.policy.hash, self.data_version
        )));
        let project = request.project.as_str();
        // Checked and counted under one lock, so concurrent queries cannot all pass the last
        // unit; counted in memory before the ledger write, so a failed write errs on the safe
        // side (over-counting until the node restarts).
        let left = {
            let mut queries = self.queries.lock().unwrap_or_else(|p| p.into_inner());
            let used = queries.used(project, today, &query_key);
            let used = AllowanceUsed {
                today: used.today,
                total: used.total,
                repeat: used.repeat,
            };
            let left = allowance.check(used, project, &self.trust, today)?;
            if left.counts {
                queries.count(project, today, &query_key);
            }
            left
        };
        if left.counts
            && let Some(ledger) = self.ledger.clone()
        {
            let line = Charge::query(
                project,
                &request.researcher,
                &request.request_id,
                &query_key,
                today,
                now_rfc3339(),
            );
            tokio::task::spawn_blocking(move || ledger.charge(line))
                .await
                .map_err(|_| NodeError::Budget("the ledger write did not finish".into()))??;
        }
        Ok(Some(AllowanceLeft {
            today_left: left.today,
            total_left: left.total,
            repeat: !left.counts,
        }))
    }
}
