//! The node's query engine: DataFusion over the trust's Parquet, answering with protected
//! partial aggregation states.
//!
//! Each request is authorised against the project, vetted, planned with an extra
//! distinct-patient count (over input partitioned by patient, see [`crate::patients`]), and
//! run as the *partial* half of DataFusion's two-phase aggregation, reduced to exactly one row
//! per group (`PartialReduce` over a coalesce, so skip-partial aggregation can never emit a
//! row per record). States that hold values (COUNT(DISTINCT) sets) are finished here into
//! counts; disclosure control then runs on the per-group states before anything leaves.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{ArrayRef, AsArray, RecordBatch, UInt64Array};
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::{DataType, Field, Schema};
use datafusion::common::DataFusionError;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::functions_aggregate::expr_fn::sum;
use datafusion::logical_expr::{Aggregate, Expr, ExprFunctionExt, LogicalPlan};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext};
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use trustql_budget::Ledger;
use trustql_policies::{
    ApprovedPolicy, Contributions, Needs, PartialAnswer, PoolRound, Refusal, ReleaseReport, Rule,
    SdcNeeds, StateColumn, Terms, aggregate_of, argument_of, authorise, bind_pool, contribute,
    locked_session, needs, read_filter, release, vet_sql,
};
use trustql_protocol::{
    AnswerColumn, AnswerMeta, ColumnKind, MASKED_COLUMN, PATIENTS_COLUMN, PooledMeta, SiteRequest,
    Withheld,
};
use trustql_schemas::{TrustSchema, check_site, table_path};

use crate::config::Limits;
use crate::dp::{DpStart, with_meta};
use crate::error::{NodeError, fault, internal};
use crate::patient_order::OrderedFiles;
use crate::patients::{
    AGGREGATE_PATIENTS, CELL_KEY_STATE, PATIENT_COUNT, by_patient, counted_directly, in_runs,
    patient_count,
};
use crate::pool_keys::PoolKeys;
use crate::record_keys::{RecordKeySecret, RecordKeys};
use crate::unordered::UnorderedExec;

/// A protected answer, ready to stream, and what the audit log needs to know about it.
#[derive(Debug, Clone)]
pub struct SiteAnswer {
    /// The released groups (schema metadata carries [`AnswerMeta`]).
    pub batch: RecordBatch,
    /// The answer's metadata.
    pub meta: AnswerMeta,
    /// Groups withheld, by reason: for this trust's audit log only (an exact, data-dependent
    /// count never leaves the trust).
    pub withheld: Withheld,
    /// SHA-256 of the optimised logical plan.
    pub plan_fingerprint: String,
    /// Where the node's time went.
    pub timings: Timings,
}

/// Where one answer's time went, so the cost of protection can be measured beside the query's.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// Authorising, parsing, planning and vetting the query.
    pub vetting: Duration,
    /// DataFusion running the partial aggregation (with the distinct-patient count).
    pub execution: Duration,
    /// Disclosure control, or contribution bounding and noise for differential privacy.
    pub protection: Duration,
}

/// The engine of one trust.
pub struct SiteEngine {
    pub(crate) trust: String,
    pub(crate) schema: TrustSchema,
    pub(crate) policy: ApprovedPolicy,
    pub(crate) ctx: SessionContext,
    timeout: Duration,
    permits: Arc<Semaphore>,
    /// Where differentially private releases are charged (required for DP projects).
    pub(crate) ledger: Option<Arc<Ledger>>,
    /// One DP release at a time, so the budget check, the release and its record are atomic.
    pub(crate) dp_turn: tokio::sync::Mutex<()>,
    /// SDC queries counted against project allowances (recorded in the ledger, if any).
    pub(crate) queries: std::sync::Mutex<trustql_budget::Queries>,
    /// SHA-256 of the data files' names, sizes and modification times.
    pub(crate) data_version: String,
    /// The files whose patients are in order, as checked when the node opened.
    ordered: OrderedFiles,
    /// Every patient's record key, for the cell-key method (computed once, at open).
    pub(crate) record_keys: Option<Arc<RecordKeys>>,
    /// This trust's pool key pair and its peers' keys, for pooled projects.
    pool_keys: Option<Arc<PoolKeys>>,
    /// One pooled question bound at a time, so two requests cannot bind it to two sets.
    pool_turn: tokio::sync::Mutex<()>,
    /// Without a ledger: the member set each (project, question) was contributed to.
    pool_rounds: std::sync::Mutex<std::collections::HashMap<(String, String), Vec<String>>>,
}

impl SiteEngine {
    /// Checks the site's data against the schema and opens it; refuses bad data.
    pub async fn open(
        trust: &str,
        schema: TrustSchema,
        policy: ApprovedPolicy,
        data_dir: &std::path::Path,
        limits: &Limits,
    ) -> Result<Self, NodeError> {
        let report = check_site(&schema, data_dir).map_err(|e| NodeError::Io {
            path: data_dir.to_path_buf(),
            reason: e.to_string(),
        })?;
        if !report.is_ok() {
            return Err(NodeError::BadData {
                dir: data_dir.to_path_buf(),
                problems: report.problem_count(),
                report: report.to_string(),
            });
        }
        if policy.policy.policy.trust != trust {
            return Err(NodeError::Config(format!(
                "the policy is for trust {}, but this node serves {trust}",
                policy.policy.policy.trust
            )));
        }
        // No spilling: the memory limit is a limit, and no intermediate data lands on disk.
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(FairSpillPool::new(limits.memory_mb.max(16) << 20)))
            .with_disk_manager_builder(
                DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
            )
            .build_arc()
            .map_err(|e| NodeError::Config(format!("cannot set up the query runtime: {e}")))?;
        let mut config = SessionConfig::new()
            .with_target_partitions(2)
            // Any file with several row groups is read by both partitions (DataFusion's default
            // leaves files under 10 MiB to one partition and spreads their rows round-robin,
            // which would also break patient runs).
            .with_repartition_file_min_size(0);
        // Never let a partial aggregate fall back to one state row per input row.
        config
            .options_mut()
            .execution
            .skip_partial_aggregation_probe_ratio_threshold = 1.0;
        let ctx = locked_session(config, runtime, &schema);
        // Which files, of which size and age: a DP release is only repeated over the same data.
        let mut data_version = Sha256::new();
        for table in schema.tables() {
            let path = table_path(data_dir, &table.name);
            if let Ok(meta) = std::fs::metadata(&path) {
                let modified = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                data_version.update(format!("{}|{}|{modified};", table.name, meta.len()));
            }
            let path = path.to_str().ok_or_else(|| {
                NodeError::Config(format!("{} is not a UTF-8 path", path.display()))
            })?;
            ctx.register_parquet(table.name.as_str(), path, ParquetReadOptions::default())
                .await
                .map_err(|e| NodeError::Io {
                    path: data_dir.to_path_buf(),
                    reason: format!("cannot open {}: {e}", table.name),
                })?;
        }
        Ok(SiteEngine {
            data_version: hex(&data_version.finalize()),
            ordered: OrderedFiles::check(&schema, data_dir),
            trust: trust.to_string(),
            schema,
            policy,
            ctx,
            timeout: Duration::from_millis(limits.query_timeout_ms),
            permits: Arc::new(Semaphore::new(limits.max_concurrent_queries)),
            ledger: None,
            dp_turn: tokio::sync::Mutex::new(()),
            queries: Default::default(),
            record_keys: None,
            pool_keys: None,
            pool_turn: tokio::sync::Mutex::new(()),
            pool_rounds: Default::default(),
        })
    }

    /// Keeps differentially private spending, and the queries counted against allowances, in
    /// `ledger` (without one, the counts last as long as the engine).
    pub fn with_ledger(mut self, ledger: Arc<Ledger>) -> Self {
        self.queries = std::sync::Mutex::new(ledger.queries());
        self.ledger = Some(ledger);
        self
    }

    /// Gives every patient of the trust's data its record key under `secret`, for the
    /// cell-key method: computed here, once, so a query looks keys up and never hashes.
    pub async fn with_record_keys(mut self, secret: &RecordKeySecret) -> Result<Self, NodeError> {
        let keys = RecordKeys::compute(&self.ctx, &self.schema, secret).await?;
        self.record_keys = Some(Arc::new(keys));
        Ok(self)
    }

    /// Masks pooled projects' answers with `keys`. Every member of every pool the policy
    /// declares must be pinned, so a missing key stops the node at start, not a query.
    pub fn with_pool_keys(mut self, keys: PoolKeys) -> Result<Self, NodeError> {
        for project in &self.policy.policy.projects {
            if let Some(pool) = &project.pool {
                keys.peers_in(&self.trust, &pool.members)?;
            }
        }
        self.pool_keys = Some(Arc::new(keys));
        Ok(self)
    }

    /// The per-request time limit, in milliseconds.
    pub(crate) fn timeout_ms(&self) -> u64 {
        self.timeout.as_millis() as u64
    }

    /// The budget ledger, if the node keeps one.
    pub fn ledger(&self) -> Option<&Arc<Ledger>> {
        self.ledger.as_ref()
    }

    /// The trust code.
    pub fn trust(&self) -> &str {
        &self.trust
    }

    /// The policy being served.
    pub fn policy(&self) -> &ApprovedPolicy {
        &self.policy
    }

    /// Answers one site request, or says why not: vet, decide what the release needs, run the
    /// partial aggregation, release through `policies`, charge a DP release, in one path.
    pub async fn answer(&self, request: &SiteRequest, today: i32) -> Result<SiteAnswer, NodeError> {
        // One limit for the whole request, planning and vetting included, however many plans
        // it runs.
        let started = tokio::time::Instant::now();
        let deadline = started + self.timeout;
        tokio::time::timeout_at(deadline, self.answer_by(request, today, started, deadline))
            .await
            .map_err(|_| NodeError::Timeout(self.timeout_ms()))?
    }

    async fn answer_by(
        &self,
        request: &SiteRequest,
        today: i32,
        started: tokio::time::Instant,
        deadline: tokio::time::Instant,
    ) -> Result<SiteAnswer, NodeError> {
        let permit = Arc::clone(&self.permits)
            .try_acquire_owned()
            .map_err(|_| NodeError::Busy)?;
        let policy = &self.policy.policy;
        let (planned, _permit) = self.plan_in_time(request, today, permit, deadline).await?;
        let (aggregate, needs) = (planned.aggregate()?, &planned.needs);
        let plan_fingerprint = fingerprint(&planned.optimized);
        let vetting = started.elapsed();

        // A DP release checks, releases and records as one step, or repeats a recorded one.
        let turn = match needs {
            Needs::Dp(dp) => match self
                .begin_dp(request, &request.project, dp, &plan_fingerprint, deadline)
                .await?
            {
                DpStart::Repeat(answer) => {
                    let mut answer = *answer;
                    answer.timings.vetting = vetting;
                    return Ok(answer);
                }
                DpStart::Turn(turn) => Some(turn),
            },
            Needs::Sdc(_) => None,
        };
        // An SDC query is checked against its project's query allowance, and counted, before
        // it runs.
        let allowance = match needs {
            Needs::Sdc(_) => self.count_query(request, today, &plan_fingerprint).await?,
            Needs::Dp(_) => None,
        };
        // A pooled question is bound to its member set before it runs.
        if let Needs::Sdc(sdc) = needs
            && let Some(pool) = &sdc.pool
        {
            self.bind_question(request, &pool.parameters.members, &plan_fingerprint)
                .await?;
        }

        let executing = tokio::time::Instant::now();
        let (run, cap) = to_run(aggregate, needs)?;
        let execute = !matches!(needs, Needs::Dp(dp) if dp.preview);
        let mut partial = self
            .run_partial(&run, needs, cap, deadline, execute)
            .await?;
        if let Needs::Sdc(sdc) = needs
            && !sdc.contributions.is_empty()
        {
            partial.contributions = Some(self.contributions(deadline, &run, sdc).await?);
        }
        let execution = executing.elapsed();

        let protecting = tokio::time::Instant::now();
        if let Needs::Sdc(sdc) = needs
            && sdc.pool.is_some()
        {
            let (batch, meta) = self.pooled(request, sdc, &partial, allowance)?;
            return Ok(SiteAnswer {
                batch,
                meta,
                withheld: Withheld::default(),
                plan_fingerprint,
                timings: Timings {
                    vetting,
                    execution,
                    protection: protecting.elapsed(),
                },
            });
        }
        #[cfg(feature = "fault-injection")]
        if crate::faults::releases_broken() {
            partial.columns.pop();
        }
        let released = release(policy, needs, &partial).map_err(NodeError::from)?;
        let columns: Vec<AnswerColumn> = released.columns.iter().map(StateColumn::wire).collect();
        let (withheld, dp) = match (&released.report, &turn) {
            (ReleaseReport::Sdc(report), _) => (
                Withheld {
                    small: report.small,
                    dominated: report.dominated,
                    whole_margin: report.whole_margin,
                    margin_of_withheld: report.margin_of_withheld,
                },
                None,
            ),
            // Nothing is said about groups not released: their number would tell how many
            // rare groups exist.
            (ReleaseReport::Dp(report), Some(turn)) => {
                (Withheld::default(), Some(turn.meta(report)))
            }
            (ReleaseReport::Dp(_), None) => {
                return Err(internal("a DP release without its ledger turn"));
            }
        };
        let meta = AnswerMeta {
            trust: self.trust.clone(),
            request_id: request.request_id.clone(),
            policy_version: policy.policy.version.clone(),
            policy_hash: self.policy.hash.clone(),
            released: released.batch.num_rows(),
            columns,
            dp,
            allowance,
            cell_key: match needs {
                Needs::Sdc(sdc) if sdc.cell_keys => Some(policy.disclosure.cell_key.meta()),
                _ => None,
            },
            pool: None,
        };
        let batch = with_meta(released.batch, &meta)?;
        let answer = SiteAnswer {
            batch,
            meta,
            withheld,
            plan_fingerprint,
            timings: Timings {
                vetting,
                execution,
                protection: protecting.elapsed(),
            },
        };
        match turn {
            Some(turn) => self.charge(turn, request, answer).await,
            None => Ok(answer),
        }
    }

    /// Binds `request`'s question (its project and plan) to the pool `members`, durably, or
    /// refuses it if it was contributed to another set (`policies` decides).
    async fn bind_question(
        &self,
        request: &SiteRequest,
        members: &[String],
        plan_fingerprint: &str,
    ) -> Result<(), NodeError> {
        let _turn = self.pool_turn.lock().await;
        let question = (request.project.clone(), plan_fingerprint.to_string());
        let recorded = match &self.ledger {
            Some(ledger) => ledger.pool_members(&question.0, &question.1),
            None => self
                .pool_rounds
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&question)
                .cloned(),
        };
        if bind_pool(recorded.as_deref(), members)? {
            match &self.ledger {
                Some(ledger) => {
                    let line = trustql_budget::Charge::pool(
                        &question.0,
                        &request.researcher,
                        &request.request_id,
                        &question.1,
                        members.to_vec(),
                        trustql_policies::now_rfc3339(),
                    );
                    crate::dp::write(ledger, line).await?;
                }
                None => {
                    self.pool_rounds
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(question, members.to_vec());
                }
            }
        }
        Ok(())
    }

    /// A pooled project's answer: the states over every public cell, masked for the pool, as
    /// one column of words. Nothing is protected here: the pool's rules protect the total.
    fn pooled(
        &self,
        request: &SiteRequest,
        sdc: &SdcNeeds,
        partial: &PartialAnswer,
        allowance: Option<trustql_protocol::AllowanceLeft>,
    ) -> Result<(RecordBatch, AnswerMeta), NodeError> {
        let keys = self
            .pool_keys
            .as_ref()
            .ok_or_else(|| NodeError::Pool("this node was started without its pool key".into()))?;
        let pool = sdc
            .pool
            .as_ref()
            .ok_or_else(|| internal("a pooled answer without its pool"))?;
        let members = pool.parameters.members.clone();
        let peers = keys.peers_in(&self.trust, &members)?;
        let contribution = contribute(
            sdc,
            partial,
            PoolRound {
                own: &self.trust,
                secret: keys.secret(),
                peers: &peers,
                request_id: &request.request_id,
                sql: &request.sql,
            },
        )?;
        let schema = Arc::new(Schema::new(vec![Field::new(
            MASKED_COLUMN,
            DataType::UInt64,
            false,
        )]));
        let count = contribution.words.len();
        let words: ArrayRef = Arc::new(UInt64Array::from(contribution.words));
        let batch = RecordBatch::try_new(schema, vec![words])
            .map_err(fault("could not build the pooled answer"))?;
        let meta = AnswerMeta {
            trust: self.trust.clone(),
            request_id: request.request_id.clone(),
            policy_version: self.policy.policy.policy.version.clone(),
            policy_hash: self.policy.hash.clone(),
            // The words, so a stream cut short is told from an answer (their number follows
            // from the public cells, not from the data).
            released: count,
            columns: vec![AnswerColumn {
                name: MASKED_COLUMN.into(),
                kind: ColumnKind::Masked,
                aggregate: None,
            }],
            dp: None,
            allowance,
            cell_key: None,
            pool: Some(PooledMeta {
                members,
                parameters: contribution.parameters,
                layout: contribution.layout,
            }),
        };
        Ok((with_meta(batch, &meta)?, meta))
    }

    /// For each aggregate in `sdc.contributions`, each patient's sum of its argument per group
    /// (the dominance rule's input; used in the release, never released).
    async fn contributions(
        &self,
        deadline: tokio::time::Instant,
        aggregate: &Aggregate,
        sdc: &SdcNeeds,
    ) -> Result<Contributions, NodeError> {
        let mut sums = Vec::with_capacity(sdc.contributions.len());
        for (j, a) in sdc.contributions.iter().enumerate() {
            let argument = aggregate
                .aggr_expr
                .get(*a)
                .and_then(argument_of)
                .ok_or_else(|| internal("a summed aggregate has no argument"))?;
            sums.push(sum(argument).alias(format!("__trustql_contribution_{j}")));
        }
        let mut group_expr = aggregate.group_expr.clone();
        group_expr.push(Expr::Column(sdc.patient_key.clone()));
        let physical = self
            .plan_aggregate(Arc::clone(&aggregate.input), group_expr, sums)
            .await?;
        Ok(Contributions {
            batch: self.collect(physical, deadline).await?,
            aggregates: sdc.contributions.clone(),
        })
    }

    /// Runs a plan to one batch, within the request's deadline and the memory pool.
    async fn collect(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        deadline: tokio::time::Instant,
    ) -> Result<RecordBatch, NodeError> {
        let schema = plan.schema();
        let batches = tokio::time::timeout_at(
            deadline,
            datafusion::physical_plan::collect(plan, self.ctx.task_ctx()),
        )
        .await
        .map_err(|_| NodeError::Timeout(self.timeout_ms()))?
        .map_err(|e| engine_error(&e))?;
        concat_batches(&schema, &batches).map_err(fault("could not join the answer batches"))
    }

    /// The physical plan, in this node's session, of `aggr_expr` over `input` by `group_expr`.
    async fn plan_aggregate(
        &self,
        input: Arc<LogicalPlan>,
        group_expr: Vec<Expr>,
        aggr_expr: Vec<Expr>,
    ) -> Result<Arc<dyn ExecutionPlan>, NodeError> {
        let aggregate = Aggregate::try_new(input, group_expr, aggr_expr)
            .map(LogicalPlan::Aggregate)
            .map_err(fault("could not build the aggregate plan"))?;
        self.ctx
            .state()
            .create_physical_plan(&aggregate)
            .await
            .map_err(fault("could not plan the aggregate"))
    }

    /// Runs `aggregate` with the distinct-patient count (up to `cap` patients) added, as the
    /// partial half of DataFusion's aggregation reduced to one row per group (without
    /// `execute`, no rows).
    pub(crate) async fn run_partial(
        &self,
        aggregate: &Aggregate,
        needs: &Needs,
        cap: Option<u64>,
        deadline: tokio::time::Instant,
        execute: bool,
    ) -> Result<PartialAnswer, NodeError> {
        let reduce = self.reduced_plan(aggregate, needs, cap).await?;
        self.run(reduce, deadline, execute).await
    }

    /// The physical plan of `aggregate` with the distinct-patient count (up to `cap`) added,
    /// reduced to one row per group.
    async fn reduced_plan(
        &self,
        aggregate: &Aggregate,
        needs: &Needs,
        cap: Option<u64>,
    ) -> Result<Arc<AggregateExec>, NodeError> {
        let patient_key = needs.patient_key();
        let mut aggr_expr: Vec<Expr> = aggregate
            .aggr_expr
            .iter()
            .map(|e| counted_directly(e.clone(), patient_key))
            .collect();
        // Under the cell-key method every count of ours also adds up its patients' record keys.
        let keys = match needs {
            Needs::Sdc(sdc) if sdc.cell_keys => Some(
                self.record_keys
                    .clone()
                    .ok_or_else(|| internal("the cell-key method without record keys"))?,
            ),
            _ => None,
        };
        // The patients each SDC aggregate reads (those with a value), before the group's own
        // count, which stays last; aggregates of the same column share the first one's count.
        if let Needs::Sdc(sdc) = needs {
            for &a in &sdc.counted {
                if sdc.reads.get(a) != Some(&Some(a)) {
                    continue;
                }
                let read = aggregate
                    .aggr_expr
                    .get(a)
                    .and_then(read_filter)
                    .ok_or_else(|| internal("a counted aggregate has no argument"))?;
                aggr_expr.push(
                    patient_count(cap, keys.clone())
                        .call(vec![Expr::Column(patient_key.clone())])
                        .filter(read)
                        .build()
                        .map_err(fault("could not count an aggregate's patients"))?
                        .alias(format!("{AGGREGATE_PATIENTS}{a}")),
                );
            }
        }
        aggr_expr.push(
            patient_count(cap, keys)
                .call(vec![Expr::Column(patient_key.clone())])
                .alias(PATIENTS_COLUMN),
        );
        let physical = self
            .plan_aggregate(
                Arc::clone(&aggregate.input),
                aggregate.group_expr.clone(),
                aggr_expr,
            )
            .await?;
        let partitions = self.ctx.state().config().target_partitions();
        partial_reduce(&physical, partitions, &self.ordered)
    }

    /// Authorises and vets `request`, and asks `policies` what its release needs.
    async fn plan_release(&self, request: &SiteRequest, today: i32) -> Result<Planned, NodeError> {
        plan_release(&self.ctx, &self.schema, &self.policy.policy, request, today).await
    }

    /// [`SiteEngine::plan_release`] on a blocking thread, within `deadline`: planning and
    /// vetting are CPU work that never yields, so only off the async threads can the deadline
    /// cut them short. The query slot's `permit` goes with them and comes back, so a plan still
    /// running after its request timed out keeps holding its slot until it stops.
    async fn plan_in_time(
        &self,
        request: &SiteRequest,
        today: i32,
        permit: OwnedSemaphorePermit,
        deadline: tokio::time::Instant,
    ) -> Result<(Planned, OwnedSemaphorePermit), NodeError> {
        let (ctx, schema) = (self.ctx.clone(), self.schema.clone());
        let (policy, request) = (self.policy.policy.clone(), request.clone());
        let runtime = tokio::runtime::Handle::current();
        let planning = tokio::task::spawn_blocking(move || {
            let planned = runtime.block_on(plan_release(&ctx, &schema, &policy, &request, today));
            (planned, permit)
        });
        let (planned, permit) = tokio::time::timeout_at(deadline, planning)
            .await
            .map_err(|_| NodeError::Timeout(self.timeout_ms()))?
            .map_err(|_| internal("the planning task failed"))?;
        Ok((planned?, permit))
    }

    /// The physical plan an answer to `request` runs (the reduced partial aggregate with the
    /// patient count, bounded for DP), as DataFusion's indented text: what the plan snapshots
    /// show. Nothing runs and nothing is charged.
    pub async fn explain(&self, request: &SiteRequest, today: i32) -> Result<String, NodeError> {
        let planned = self.plan_release(request, today).await?;
        let (run, cap) = to_run(planned.aggregate()?, &planned.needs)?;
        let reduce: Arc<dyn ExecutionPlan> = self.reduced_plan(&run, &planned.needs, cap).await?;
        Ok(datafusion::physical_plan::displayable(reduce.as_ref())
            .indent(false)
            .to_string())
    }

    /// Runs the reduced partial aggregate (or, without `execute`, takes no rows); finishes
    /// distinct sets into counts, and describes every column for the release.
    async fn run(
        &self,
        plan: Arc<AggregateExec>,
        deadline: tokio::time::Instant,
        execute: bool,
    ) -> Result<PartialAnswer, NodeError> {
        let schema = plan.schema();
        let layout = layout(&plan)?;
        let batch = if execute {
            self.collect(plan, deadline).await?
        } else {
            RecordBatch::new_empty(Arc::clone(&schema))
        };

        let mut fields = Vec::with_capacity(batch.num_columns());
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(batch.num_columns());
        let mut columns = Vec::with_capacity(batch.num_columns());
        for (index, slot) in layout.into_iter().enumerate() {
            let name = schema.field(index).name().clone();
            let array = batch.column(index);
            let (column, array) = match slot {
                Slot::Key => (StateColumn::key(name), Arc::clone(array)),
                Slot::GroupingId => (StateColumn::grouping_id(name), Arc::clone(array)),
                Slot::Patients => (StateColumn::patients(PATIENTS_COLUMN), Arc::clone(array)),
                Slot::AggregatePatients(a) => {
                    (StateColumn::aggregate_patients(name, a), Arc::clone(array))
                }
                Slot::CellKey(of) => (StateColumn::cell_key(name, of), Arc::clone(array)),
                Slot::DistinctPatients(a) => (StateColumn::distinct(name, a), Arc::clone(array)),
                Slot::Distinct(a) => (StateColumn::distinct(name, a), distinct_counts(array)?),
                Slot::State {
                    aggregate,
                    function,
                } => {
                    let state = state_suffix(&name).to_string();
                    (
                        StateColumn::state(name, aggregate, function, state),
                        Arc::clone(array),
                    )
                }
            };
            fields.push(Field::new(&column.name, array.data_type().clone(), true));
            arrays.push(array);
            columns.push(column);
        }
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
            .map_err(fault("could not rebuild the partial answer"))?;
        Ok(PartialAnswer {
            batch,
            columns,
            contributions: None,
        })
    }
}

/// Authorises and vets `request` against `policy`, and asks `policies` what its release needs.
async fn plan_release(
    ctx: &SessionContext,
    schema: &TrustSchema,
    policy: &trustql_policies::Policy,
    request: &SiteRequest,
    today: i32,
) -> Result<Planned, NodeError> {
    let project = authorise(policy, &request.project, &request.researcher, today)?;
    let (plan, optimized, vetted) = vet_sql(ctx, schema, policy, project, &request.sql).await?;
    let Some(aggregate) = aggregate_of(&plan) else {
        return Err(Refusal::new(Rule::NotAggregate, "no aggregation found").into());
    };
    let terms = Terms {
        epsilon: request.epsilon,
        preview: request.preview,
    };
    let needs = needs(
        policy, project, schema, aggregate, &optimized, &vetted, terms,
    )?;
    Ok(Planned {
        plan,
        optimized,
        needs,
    })
}

/// A vetted request and what its release needs.
struct Planned {
    plan: LogicalPlan,
    optimized: LogicalPlan,
    needs: Needs,
}

impl Planned {
    /// The query's one aggregation (vetting found it).
    fn aggregate(&self) -> Result<&Aggregate, NodeError> {
        aggregate_of(&self.plan).ok_or_else(|| internal("a vetted plan lost its aggregate"))
    }
}

/// The aggregate an answer runs and how far it counts patients: as asked, up to the cap the
/// thresholds need (SDC), or bounded and counted exactly, as the count is released with noise
/// (DP).
/// Under SDC, a `logrank`'s arm joins the keys, so each arm is a stratum of its own.
fn to_run<'a>(
    aggregate: &'a Aggregate,
    needs: &'a Needs,
) -> Result<(Cow<'a, Aggregate>, Option<u64>), NodeError> {
    Ok(match needs {
        Needs::Sdc(sdc) if !sdc.arms.is_empty() => {
            let mut group_expr = aggregate.group_expr.clone();
            group_expr.extend(sdc.arms.iter().cloned());
            let split = Aggregate::try_new(
                Arc::clone(&aggregate.input),
                group_expr,
                aggregate.aggr_expr.clone(),
            )
            .map_err(fault("could not split a log-rank test into its arms"))?;
            (Cow::Owned(split), Some(sdc.patient_cap))
        }
        Needs::Sdc(sdc) => (Cow::Borrowed(aggregate), Some(sdc.patient_cap)),
        Needs::Dp(dp) => (Cow::Borrowed(&dp.bounded.aggregate), None),
    })
}

/// What each output column of the reduced partial aggregate is.
#[derive(Debug, Clone)]
enum Slot {
    Key,
    GroupingId,
    Patients,
    /// The patients aggregate `.0` reads (SDC thresholds only).
    AggregatePatients(usize),
    /// The cell key of the group's patients (`None`) or of those aggregate `.0` reads.
    CellKey(Option<usize>),
    /// The researcher's COUNT(DISTINCT <patient key>), counted as patients.
    DistinctPatients(usize),
    Distinct(usize),
    State {
        aggregate: usize,
        function: String,
    },
}

fn layout(plan: &AggregateExec) -> Result<Vec<Slot>, NodeError> {
    // The reduce groups by the partial's output, where a grouping set's id became one more
    // plain key (`as_final`): find it by its reserved name, or margins would pass as cells.
    let mut slots: Vec<Slot> = plan
        .group_expr()
        .expr()
        .iter()
        .map(|(_, name)| {
            if name == Aggregate::INTERNAL_GROUPING_ID {
                Slot::GroupingId
            } else {
                Slot::Key
            }
        })
        .collect();
    if plan.group_expr().has_grouping_set() {
        slots.push(Slot::GroupingId);
    }
    for (i, expr) in plan.aggr_expr().iter().enumerate() {
        let name = expr.fun().name().to_lowercase();
        let states = expr
            .state_fields()
            .map_err(fault("an aggregate has no state fields"))?;
        if name == PATIENT_COUNT {
            // Ours are the last aggregate and those named for the aggregate whose patients
            // they count; any other is the researcher's, counted directly.
            let counted = expr
                .name()
                .strip_prefix(AGGREGATE_PATIENTS)
                .and_then(|a| a.parse().ok());
            let (slot, of) = if i + 1 == plan.aggr_expr().len() {
                (Slot::Patients, None)
            } else if let Some(a) = counted {
                (Slot::AggregatePatients(a), Some(a))
            } else {
                (Slot::DistinctPatients(i), Some(i))
            };
            slots.push(slot);
            // Counted with record keys: the count's second state is its cell key.
            match states.as_slice() {
                [_] => {}
                [_, key] if key.name().ends_with(&format!("[{CELL_KEY_STATE}]")) => {
                    slots.push(Slot::CellKey(of));
                }
                _ => return Err(internal("a patient count with unexpected states")),
            }
            continue;
        }
        if expr.is_distinct() {
            if name != "count" || states.len() != 1 {
                return Err(internal("a distinct aggregate that is not COUNT"));
            }
            slots.push(Slot::Distinct(i));
            continue;
        }
        for _ in states {
            slots.push(Slot::State {
                aggregate: i,
                function: name.clone(),
            });
        }
    }
    if slots.len() != plan.schema().fields().len() {
        return Err(internal("the partial plan has an unexpected shape"));
    }
    Ok(slots)
}

/// `count` of a state column named `avg(x)[count]`.
pub(crate) fn state_suffix(name: &str) -> &str {
    name.rsplit_once('[')
        .map(|(_, s)| s.trim_end_matches(']'))
        .unwrap_or_default()
}

/// Lengths of the distinct-value lists: the values themselves never leave.
fn distinct_counts(array: &ArrayRef) -> Result<ArrayRef, NodeError> {
    let lengths = match array.data_type() {
        DataType::List(_) => arrow::compute::kernels::length::length(array),
        DataType::LargeList(_) => arrow::compute::kernels::length::length(array),
        _ => return Err(internal("a distinct state is not a list")),
    }
    .map_err(fault("could not count distinct values"))?;
    let lengths =
        cast(&lengths, &DataType::Int64).map_err(fault("could not cast distinct counts"))?;
    let values: arrow::array::Int64Array = lengths
        .as_primitive::<arrow::datatypes::Int64Type>()
        .iter()
        .map(|v| Some(v.unwrap_or(0)))
        .collect();
    Ok(Arc::new(values))
}

/// Finds the one Partial aggregate, counts its patients over runs where its input brings them
/// (files in `ordered`) or else moves it over input partitioned by patient (into `partitions`
/// partitions), and reduces its output to one row per group.
pub(crate) fn partial_reduce(
    plan: &Arc<dyn ExecutionPlan>,
    partitions: usize,
    ordered: &OrderedFiles,
) -> Result<Arc<AggregateExec>, NodeError> {
    let mut partials = Vec::new();
    let mut aggregates = 0;
    let mut stack = vec![Arc::clone(plan)];
    while let Some(node) = stack.pop() {
        if let Some(agg) = node.downcast_ref::<AggregateExec>() {
            aggregates += 1;
            if *agg.mode() == AggregateMode::Partial {
                partials.push(Arc::clone(&node));
            }
        }
        stack.extend(node.children().into_iter().cloned());
    }
    // One logical aggregate plans as exactly Partial + Final; anything else is refused.
    let (Some(partial), 1, 2) = (partials.first(), partials.len(), aggregates) else {
        return Err(Refusal::new(
            Rule::Unsupported,
            "the query did not plan as a single two-phase aggregation",
        )
        .into());
    };
    let Some(agg) = partial.downcast_ref::<AggregateExec>() else {
        return Err(internal("the partial aggregate is not an AggregateExec"));
    };
    let partial = match in_runs(agg, ordered).map_err(fault("could not plan the patient runs"))? {
        Some(partial) => partial,
        None => by_patient(agg, partitions).map_err(fault("could not partition by patient"))?,
    };
    let reduce = AggregateExec::try_new(
        AggregateMode::PartialReduce,
        Arc::new(agg.group_expr().as_final()),
        agg.aggr_expr().to_vec(),
        vec![None; agg.aggr_expr().len()],
        // The partial's claims about its rows (constants, order) can be false after a grouping
        // set's expansion; the reduce must hash every group, not trust them.
        Arc::new(UnorderedExec::new(Arc::new(CoalescePartitionsExec::new(
            partial,
        )))),
        agg.input_schema(),
    )
    .map_err(fault("could not plan the partial reduce"))?;
    Ok(Arc::new(reduce))
}

fn engine_error(e: &DataFusionError) -> NodeError {
    match e.find_root() {
        DataFusionError::ResourcesExhausted(_) => NodeError::Memory,
        _ => fault("the query failed while running")(e),
    }
}

/// SHA-256 of a plan's text, to recognise the same query in the audit log.
pub fn fingerprint(plan: &LogicalPlan) -> String {
    hex(&Sha256::digest(
        plan.display_indent().to_string().as_bytes(),
    ))
}

/// Lower-case hex of a digest.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
