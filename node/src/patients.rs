//! The distinct-patient count every answer carries, computed once per row.
//!
//! DataFusion's `COUNT(DISTINCT)` keeps the ids themselves as its partial state, so the node
//! hashed every (group, patient) pair twice and shipped every id between its partitions; that
//! was most of a node's time. Here the partial aggregate's input is first hash-partitioned by
//! the patient key, so each partition sees a disjoint set of patients: a partition's count is
//! final for its patients, and partitions merge by summing counts.
//!
//! Outside differential privacy the count only decides thresholds (the node's minimum, the
//! coordinator's on the summed totals), and no threshold may exceed `MAX_MIN_PATIENTS`: so a
//! group stops collecting patients at [`PATIENT_COUNT_CAP`] (twice that, so rounding cannot
//! carry a capped count below a threshold), and large groups, which hold most rows, cost one
//! comparison per row instead of a hash insert.
//! Differentially private answers release the count with noise, so they count exactly.
//!
//! Where the input arrives in patient runs (a scan of files kept in patient order, see
//! [`crate::patient_order`]), the partitions already hold disjoint patients and a group's
//! patients are counted by comparing each row's patient with the group's last one: no
//! repartition and no sets ([`in_runs`]).
//!
//! A count is only exact if each partition counts every one of its rows into one set. An
//! aggregate that emits its groups early under memory pressure would start a fresh set and
//! count a patient twice, so a count that is asked to continue after it has been emitted fails
//! the query as out of memory instead.

use std::collections::HashSet;
use std::mem::size_of;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Int64Array, UInt64Array};
use arrow::datatypes::{DataType, Field, FieldRef, Int64Type, UInt64Type};
use datafusion::common::hash_utils::RandomState;
use datafusion::common::{Column, DataFusionError, Result, ScalarValue};
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::format_state_name;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, EmitTo, Expr, GroupsAccumulator, Signature,
    Volatility,
};
use datafusion::physical_expr::PartitioningSatisfaction;
use datafusion::physical_expr::aggregate::AggregateExprBuilder;
use datafusion::physical_expr::expressions::Column as PhysicalColumn;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::execution_plan::{ChildrenPropertiesMode, ReplaceChildrenOptions};
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::{
    Distribution, ExecutionPlan, ExecutionPlanProperties, Partitioning,
};
#[cfg(doc)]
use trustql_policies::PATIENT_COUNT_CAP;

use crate::patient_order::OrderedFiles;
use crate::record_keys::RecordKeys;

/// Name prefix of the patient count of one SDC aggregate (its index follows): the patients
/// with a value for its argument, for that aggregate's threshold.
pub(crate) const AGGREGATE_PATIENTS: &str = "__trustql_patients_of_";

/// The aggregate's name, as the physical plan shows it.
pub(crate) const PATIENT_COUNT: &str = "trustql_patient_count";

/// The state of a patient count that holds its patients' cell key.
pub(crate) const CELL_KEY_STATE: &str = "cell_key";

/// `trustql_patient_count(patient key)`: distinct patients per group, up to `cap` when given,
/// exact only over input partitioned by the patient key (see [`by_patient`]). With `keys`, it
/// also adds up the counted patients' record keys into the group's cell key (a second state),
/// and then counts every patient whatever `cap` says: the cell key needs all of them.
pub(crate) fn patient_count(cap: Option<u64>, keys: Option<Arc<RecordKeys>>) -> AggregateUDF {
    let cap = cap.and_then(|c| i64::try_from(c).ok()).unwrap_or(i64::MAX);
    AggregateUDF::from(PatientCount {
        signature: Signature::exact(vec![DataType::Int64], Volatility::Immutable),
        cap: if keys.is_some() { i64::MAX } else { cap },
        runs: false,
        keys: Keys(keys),
    })
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PatientCount {
    signature: Signature,
    cap: i64,
    /// The input arrives in patient runs: compare with the last patient, keep no sets.
    runs: bool,
    /// The patients' record keys, when the release perturbs by cell keys.
    keys: Keys,
}

/// The record keys, compared by identity: one engine has one set of them.
#[derive(Debug, Clone)]
struct Keys(Option<Arc<RecordKeys>>);

impl PartialEq for Keys {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }
}

impl Eq for Keys {}

impl std::hash::Hash for Keys {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.as_ref().map(Arc::as_ptr).hash(state);
    }
}

impl AggregateUDFImpl for PatientCount {
    fn name(&self) -> &str {
        PATIENT_COUNT
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int64)
    }

    fn is_nullable(&self) -> bool {
        false
    }

    fn state_fields(&self, args: StateFieldsArgs<'_>) -> Result<Vec<FieldRef>> {
        let mut fields = vec![Arc::new(Field::new(
            format_state_name(args.name, "count"),
            DataType::Int64,
            false,
        ))];
        if self.keys.0.is_some() {
            fields.push(Arc::new(Field::new(
                format_state_name(args.name, CELL_KEY_STATE),
                DataType::UInt64,
                false,
            )));
        }
        Ok(fields)
    }

    fn accumulator(&self, _args: AccumulatorArgs<'_>) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(PatientSet::new(
            self.cap,
            self.runs,
            self.keys.0.clone(),
        )))
    }

    fn groups_accumulator_supported(&self, _args: AccumulatorArgs<'_>) -> bool {
        true
    }

    fn create_groups_accumulator(
        &self,
        _args: AccumulatorArgs<'_>,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(PatientGroups::new(
            self.cap,
            self.runs,
            self.keys.0.clone(),
        )))
    }

    fn default_value(&self, _data_type: &DataType) -> Result<ScalarValue> {
        Ok(ScalarValue::Int64(Some(0)))
    }
}

fn emitted_early() -> DataFusionError {
    DataFusionError::ResourcesExhausted(
        "counting distinct patients needs more memory than the query limit".into(),
    )
}

fn summed(states: &[ArrayRef]) -> Result<&Int64Array> {
    states
        .first()
        .and_then(|s| s.as_primitive_opt::<Int64Type>())
        .ok_or_else(|| DataFusionError::Internal("a patient count state is not Int64".into()))
}

fn cell_keys(states: &[ArrayRef]) -> Result<&UInt64Array> {
    states
        .get(1)
        .and_then(|s| s.as_primitive_opt::<UInt64Type>())
        .ok_or_else(|| DataFusionError::Internal("a cell key state is not UInt64".into()))
}

fn no_record_key() -> DataFusionError {
    // Every row read from the trust's tables has a patient whose key was computed at open.
    DataFusionError::Internal("a patient without a record key".into())
}

fn patients(values: &[ArrayRef]) -> Result<&Int64Array> {
    values
        .first()
        .and_then(|v| v.as_primitive_opt::<Int64Type>())
        .ok_or_else(|| DataFusionError::Internal("the patient key is not Int64".into()))
}

/// How each group remembers the patients it has counted.
#[derive(Debug)]
enum Seen {
    /// Its set of patients (a set per group keeps each entry at 8 bytes), with the slots all
    /// the sets hold, kept as they grow (`size` is asked once per batch and must not walk every
    /// group).
    Sets(Vec<HashSet<i64, RandomState>>, usize),
    /// Its last patient: enough when each patient's rows come as one run.
    Last(Vec<Option<i64>>),
}

/// Per group, the patients seen and their number (and, with record keys, their cell key).
#[derive(Debug)]
struct PatientGroups {
    seen: Seen,
    counts: Vec<i64>,
    /// Patients a group needs no more of.
    cap: i64,
    emitted: bool,
    /// The record keys, and per group the sum of its patients' keys (mod 2⁶⁴, that is mod 1).
    keys: Option<Arc<RecordKeys>>,
    cells: Vec<u64>,
}

impl PatientGroups {
    fn new(cap: i64, runs: bool, keys: Option<Arc<RecordKeys>>) -> Self {
        PatientGroups {
            seen: if runs {
                Seen::Last(Vec::new())
            } else {
                Seen::Sets(Vec::new(), 0)
            },
            counts: Vec::new(),
            cap,
            emitted: false,
            keys,
            cells: Vec::new(),
        }
    }

    /// Patient `id` newly counted in `group`: its record key joins the group's cell key.
    fn add_key(&mut self, group: usize, id: i64) -> Result<()> {
        if let Some(keys) = &self.keys {
            let key = keys.key(id).ok_or_else(no_record_key)?;
            self.cells[group] = self.cells[group].wrapping_add(key);
        }
        Ok(())
    }
}

impl GroupsAccumulator for PatientGroups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        if self.emitted {
            return Err(emitted_early());
        }
        self.counts.resize(total_num_groups, 0);
        if self.keys.is_some() {
            self.cells.resize(total_num_groups, 0);
        }
        let ids = patients(values)?;
        let rows = group_indices.iter().enumerate().filter(|&(row, _)| {
            ids.is_valid(row) && opt_filter.is_none_or(|f| f.is_valid(row) && f.value(row))
        });
        // Taken out so that counting a patient can borrow the groups' keys.
        let mut seen = std::mem::replace(&mut self.seen, Seen::Last(Vec::new()));
        let mut counted = Ok(());
        match &mut seen {
            Seen::Sets(sets, slots) => {
                sets.resize_with(total_num_groups, HashSet::default);
                for (row, &group) in rows {
                    let set = &mut sets[group];
                    if (set.len() as i64) < self.cap {
                        let before = set.capacity();
                        let id = ids.value(row);
                        if set.insert(id) {
                            self.counts[group] += 1;
                            *slots += set.capacity() - before;
                            counted = counted.and_then(|()| self.add_key(group, id));
                        }
                    }
                }
            }
            Seen::Last(last) => {
                last.resize(total_num_groups, None);
                for (row, &group) in rows {
                    let id = ids.value(row);
                    if last[group] != Some(id) && self.counts[group] < self.cap {
                        last[group] = Some(id);
                        self.counts[group] += 1;
                        counted = counted.and_then(|()| self.add_key(group, id));
                    }
                }
            }
        }
        self.seen = seen;
        counted
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        self.emitted = true;
        // Partitions' counts, summed, may pass the cap; no more than it is known.
        let cap = self.cap;
        Ok(Arc::new(Int64Array::from_iter_values(
            emit_to
                .take_needed(&mut self.counts)
                .into_iter()
                .map(|n| n.min(cap)),
        )))
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        // The ids are not needed once counted: partitions hold disjoint patients.
        self.seen = match self.seen {
            Seen::Sets(..) => Seen::Sets(Vec::new(), 0),
            Seen::Last(_) => Seen::Last(Vec::new()),
        };
        // Groups without a row yet have an empty cell: keys line up with counts.
        if self.keys.is_some() {
            self.cells.resize(self.counts.len(), 0);
        }
        let mut states = vec![self.evaluate(emit_to)?];
        if self.keys.is_some() {
            states.push(Arc::new(UInt64Array::from(
                emit_to.take_needed(&mut self.cells),
            )));
        }
        Ok(states)
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        self.counts.resize(total_num_groups, 0);
        let counts = summed(values)?;
        for (row, &group) in group_indices.iter().enumerate() {
            self.counts[group] += counts.value(row);
        }
        // Partitions hold disjoint patients, so their cell keys add up.
        if self.keys.is_some() {
            self.cells.resize(total_num_groups, 0);
            let keys = cell_keys(values)?;
            for (row, &group) in group_indices.iter().enumerate() {
                self.cells[group] = self.cells[group].wrapping_add(keys.value(row));
            }
        }
        Ok(())
    }

    fn convert_to_state(
        &self,
        _values: &[ArrayRef],
        _opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        // One state per row would count a patient once per row.
        Err(DataFusionError::Internal(
            "a patient count cannot skip partial aggregation".into(),
        ))
    }

    fn size(&self) -> usize {
        let seen = match &self.seen {
            Seen::Sets(sets, slots) => {
                slots * (size_of::<i64>() + 1)
                    + sets.capacity() * size_of::<HashSet<i64, RandomState>>()
            }
            Seen::Last(last) => last.capacity() * size_of::<Option<i64>>(),
        };
        seen + (self.counts.capacity() + self.cells.capacity()) * size_of::<i64>()
    }
}

/// The patients of a query without groups: [`PatientGroups`] with one group.
#[derive(Debug)]
struct PatientSet(PatientGroups);

impl PatientSet {
    fn new(cap: i64, runs: bool, keys: Option<Arc<RecordKeys>>) -> Self {
        PatientSet(PatientGroups::new(cap, runs, keys))
    }
}

impl Accumulator for PatientSet {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let rows = values.first().map_or(0, |v| v.len());
        self.0.update_batch(values, &vec![0; rows], None, 1)
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let groups = &mut self.0;
        groups.emitted = true;
        // No rows, no patients.
        let n = groups.counts.first().copied().unwrap_or(0);
        Ok(ScalarValue::Int64(Some(n.min(groups.cap))))
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let mut states = vec![self.evaluate()?];
        if self.0.keys.is_some() {
            states.push(ScalarValue::UInt64(Some(
                self.0.cells.first().copied().unwrap_or(0),
            )));
        }
        Ok(states)
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let rows = states.first().map_or(0, |s| s.len());
        self.0.merge_batch(states, &vec![0; rows], 1)
    }

    fn size(&self) -> usize {
        size_of::<Self>() + self.0.size()
    }
}

/// `COUNT(DISTINCT <patient key>)` as the exact patient count under the same name: the same
/// value over input partitioned by patient, without DataFusion's list of ids. Any other
/// expression is returned as it is.
pub(crate) fn counted_directly(expr: Expr, patient_key: &Column) -> Expr {
    let name = expr.schema_name().to_string();
    let Expr::AggregateFunction(f) = expr.clone().unalias_nested().data else {
        return expr;
    };
    let direct = f.func.name() == "count"
        && f.params.distinct
        && f.params.order_by.is_empty()
        && f.params.args == [Expr::Column(patient_key.clone())];
    if !direct {
        return expr;
    }
    Expr::AggregateFunction(AggregateFunction::new_udf(
        Arc::new(patient_count(None, None)),
        f.params.args,
        false,
        f.params.filter,
        vec![],
        None,
    ))
    .alias(name)
}

/// The partial aggregate `partial` over its input hash-partitioned by the patient key (the
/// argument of its last aggregate, the patient count) into `partitions` partitions, unless
/// the input already is (a join on the patient key, say).
pub(crate) fn by_patient(
    partial: &AggregateExec,
    partitions: usize,
) -> Result<Arc<dyn ExecutionPlan>> {
    let patient = partial
        .aggr_expr()
        .last()
        .filter(|a| a.fun().name() == PATIENT_COUNT)
        .and_then(|a| a.expressions().into_iter().next())
        .ok_or_else(|| DataFusionError::Internal("no patient count to partition by".into()))?;
    let input = partial.input();
    // DataFusion's own test, equal columns of an equi-join included.
    let by_patient = Distribution::KeyPartitioned(vec![Arc::clone(&patient)]);
    let already = input.output_partitioning().satisfaction(
        &by_patient,
        input.equivalence_properties(),
        false,
    );
    if already == PartitioningSatisfaction::Exact {
        return Ok(Arc::new(partial.clone()));
    }
    let input = Arc::new(RepartitionExec::try_new(
        Arc::clone(partial.input()),
        Partitioning::Hash(vec![patient], partitions.max(1)),
    )?);
    // The partitioning changes, so the plan's properties are computed again.
    Arc::new(partial.clone()).replace_children(
        vec![input],
        ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
    )
}

/// The partial aggregate `partial` with each patient count taken over patient runs, if its
/// input brings every patient count's column in runs ([`OrderedFiles::in_runs`]); `None` if
/// not, and then the counts need [`by_patient`].
pub(crate) fn in_runs(
    partial: &AggregateExec,
    ordered: &OrderedFiles,
) -> Result<Option<Arc<dyn ExecutionPlan>>> {
    let mut aggr_expr = Vec::with_capacity(partial.aggr_expr().len());
    for aggregate in partial.aggr_expr() {
        let Some(count) = aggregate.fun().inner().downcast_ref::<PatientCount>() else {
            aggr_expr.push(Arc::clone(aggregate));
            continue;
        };
        let args = aggregate.expressions();
        let column = match args.as_slice() {
            [arg] => arg.downcast_ref::<PhysicalColumn>(),
            _ => None,
        };
        if !column.is_some_and(|c| ordered.in_runs(partial.input(), c.index())) {
            return Ok(None);
        }
        let in_runs = AggregateUDF::from(PatientCount {
            runs: true,
            ..count.clone()
        });
        let rebuilt = AggregateExprBuilder::new(Arc::new(in_runs), args)
            .schema(partial.input_schema())
            .alias(aggregate.name())
            .build()?;
        aggr_expr.push(Arc::new(rebuilt));
    }
    let partial = AggregateExec::try_new(
        AggregateMode::Partial,
        partial.group_expr().clone(),
        aggr_expr,
        partial.filter_expr().to_vec(),
        Arc::clone(partial.input()),
        partial.input_schema(),
    )?;
    Ok(Some(Arc::new(partial)))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::common::{Column, DataFusionError};
    use datafusion::datasource::MemTable;
    use datafusion::logical_expr::{Aggregate, EmitTo, Expr, GroupsAccumulator, LogicalPlan};
    use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
    use datafusion::physical_plan::displayable;
    use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
    use datafusion::prelude::{DataFrame, SessionConfig, SessionContext, col};

    use super::*;
    use crate::engine::partial_reduce;

    /// Two input partitions that share patient 1 in group a, plus a row without a patient.
    async fn session() -> SessionContext {
        let schema = Arc::new(Schema::new(vec![
            Field::new("g", DataType::Utf8, false),
            Field::new("p", DataType::Int64, true),
        ]));
        let batch = |groups: Vec<&str>, ids: Vec<Option<i64>>| {
            RecordBatch::try_new(
                Arc::clone(&schema),
                vec![
                    Arc::new(StringArray::from(groups)),
                    Arc::new(Int64Array::from(ids)),
                ],
            )
            .expect("batch")
        };
        let table = MemTable::try_new(
            Arc::clone(&schema),
            vec![
                vec![batch(
                    vec!["a", "a", "b", "b"],
                    vec![Some(1), Some(2), Some(1), None],
                )],
                vec![batch(vec!["a", "a", "b"], vec![Some(1), Some(3), Some(4)])],
            ],
        )
        .expect("table");
        let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(2));
        ctx.register_table("t", Arc::new(table)).expect("register");
        ctx
    }

    /// `aggregates` of `input` by `group`, planned and run as the node does (partial, reduced),
    /// with the partial aggregate.
    async fn reduced_over(
        ctx: &SessionContext,
        input: DataFrame,
        ordered: &OrderedFiles,
        group: Vec<Expr>,
        aggregates: Vec<Expr>,
    ) -> (Vec<RecordBatch>, Arc<dyn ExecutionPlan>) {
        let input = input.into_unoptimized_plan();
        let aggregate = Aggregate::try_new(Arc::new(input), group, aggregates)
            .map(LogicalPlan::Aggregate)
            .expect("aggregate");
        let physical = ctx
            .state()
            .create_physical_plan(&aggregate)
            .await
            .expect("plan");
        let reduce = partial_reduce(&physical, 2, ordered).expect("reduce");
        // The reduce's input leads (through the coalesce) down to the partial aggregate.
        let mut partial = Arc::clone(reduce.input());
        while !partial.is::<AggregateExec>() {
            partial = partial
                .children()
                .first()
                .map(|&child| Arc::clone(child))
                .expect("the reduce is over the partial");
        }
        let batches = datafusion::physical_plan::collect(reduce, ctx.task_ctx())
            .await
            .expect("run");
        (batches, partial)
    }

    /// `aggregates` of table t by `group`, run as the node runs them: partial, reduced.
    async fn reduced(
        ctx: &SessionContext,
        group: Vec<Expr>,
        aggregates: Vec<Expr>,
    ) -> Vec<RecordBatch> {
        let input = ctx.table("t").await.expect("t");
        reduced_over(ctx, input, &OrderedFiles::default(), group, aggregates)
            .await
            .0
    }

    /// Per group (or the one total, without groups), the reduced patient count.
    async fn counts(ctx: &SessionContext, group: Vec<Expr>) -> Vec<(String, i64)> {
        let patients = patient_count(None, None).call(vec![Expr::Column(Column::from_name("p"))]);
        let batches = reduced(ctx, group.clone(), vec![patients]).await;
        by_group(&batches, group.is_empty())
    }

    /// The first column (empty without groups) and the last of every row, sorted.
    fn by_group(batches: &[RecordBatch], no_groups: bool) -> Vec<(String, i64)> {
        let mut out = Vec::new();
        for batch in batches {
            let n = batch.num_columns();
            let values = batch.column(n - 1).as_primitive::<Int64Type>();
            let keys = arrow::compute::cast(batch.column(0), &DataType::Utf8).expect("text");
            for row in 0..batch.num_rows() {
                let key = if no_groups {
                    String::new()
                } else {
                    keys.as_string::<i32>().value(row).to_string()
                };
                out.push((key, values.value(row)));
            }
        }
        out.sort();
        out
    }

    #[tokio::test]
    async fn a_patient_in_two_partitions_is_counted_once() {
        let ctx = session().await;
        assert_eq!(
            counts(&ctx, vec![col("g")]).await,
            vec![("a".to_string(), 3), ("b".to_string(), 2)]
        );
        // DataFusion's own distinct count agrees.
        let expected = ctx
            .sql("SELECT g, COUNT(DISTINCT p) FROM t GROUP BY g ORDER BY g")
            .await
            .expect("sql")
            .collect()
            .await
            .expect("run");
        let expected = expected[0].column(1).as_primitive::<Int64Type>();
        assert_eq!(expected.values().to_vec(), vec![3, 2]);
    }

    #[tokio::test]
    async fn without_groups_every_patient_is_counted_once() {
        let ctx = session().await;
        assert_eq!(counts(&ctx, vec![]).await, vec![(String::new(), 4)]);
    }

    #[test]
    fn nulls_and_filtered_rows_are_not_patients() {
        for runs in [false, true] {
            let mut groups = PatientGroups::new(i64::MAX, runs, None);
            let ids: ArrayRef = Arc::new(Int64Array::from(vec![Some(7), None, Some(8), Some(7)]));
            let keep = BooleanArray::from(vec![true, true, false, true]);
            groups
                .update_batch(&[ids], &[0, 0, 0, 0], Some(&keep), 1)
                .expect("update");
            let counts = groups.evaluate(EmitTo::All).expect("evaluate");
            assert_eq!(
                counts.as_primitive::<Int64Type>().values().to_vec(),
                vec![1],
                "runs: {runs}"
            );
        }
    }

    #[test]
    fn in_runs_a_group_counts_each_change_of_patient() {
        // Patient 1's run holds rows of both groups; group 0 sees 1, 1, 2 and group 1 sees 1, 3.
        let mut groups = PatientGroups::new(i64::MAX, true, None);
        let ids: ArrayRef = Arc::new(Int64Array::from(vec![1, 1, 1, 2, 3, 3]));
        groups
            .update_batch(&[ids], &[0, 1, 0, 0, 1, 1], None, 2)
            .expect("update");
        let ids: ArrayRef = Arc::new(Int64Array::from(vec![3, 4]));
        // A run that goes on into the next batch is still one patient.
        groups
            .update_batch(&[ids], &[1, 0], None, 2)
            .expect("update");
        let counts = groups.evaluate(EmitTo::All).expect("evaluate");
        assert_eq!(
            counts.as_primitive::<Int64Type>().values().to_vec(),
            vec![3, 2]
        );
        let mut total = PatientSet::new(i64::MAX, true, None);
        let ids: ArrayRef = Arc::new(Int64Array::from(vec![Some(1), Some(1), None, Some(2)]));
        total.update_batch(&[ids]).expect("update");
        assert_eq!(
            total.evaluate().expect("evaluate"),
            ScalarValue::Int64(Some(2))
        );
    }

    #[test]
    fn counting_on_after_an_early_emission_fails_as_out_of_memory() {
        let ids: ArrayRef = Arc::new(Int64Array::from(vec![1, 2]));
        for runs in [false, true] {
            let mut groups = PatientGroups::new(i64::MAX, runs, None);
            groups
                .update_batch(std::slice::from_ref(&ids), &[0, 1], None, 2)
                .expect("update");
            groups.state(EmitTo::All).expect("state");
            // Counting patient 1 again in a fresh set would count them twice.
            let again = groups.update_batch(std::slice::from_ref(&ids), &[0, 1], None, 2);
            assert!(matches!(again, Err(DataFusionError::ResourcesExhausted(_))));

            let mut total = PatientSet::new(i64::MAX, runs, None);
            total
                .update_batch(std::slice::from_ref(&ids))
                .expect("update");
            total.state().expect("state");
            let again = total.update_batch(std::slice::from_ref(&ids));
            assert!(matches!(again, Err(DataFusionError::ResourcesExhausted(_))));
        }
    }

    #[test]
    fn a_group_stops_collecting_patients_at_the_cap() {
        let ids: ArrayRef = Arc::new(Int64Array::from(vec![1, 2, 3, 4, 5, 9]));
        for runs in [false, true] {
            let mut groups = PatientGroups::new(3, runs, None);
            groups
                .update_batch(std::slice::from_ref(&ids), &[0, 0, 0, 0, 0, 1], None, 2)
                .expect("update");
            if let Seen::Sets(sets, slots) = &groups.seen {
                assert_eq!(sets[0].len(), 3, "no patient kept beyond the cap");
                let held: usize = sets.iter().map(|set| set.capacity()).sum();
                assert_eq!(*slots, held, "memory is accounted as the sets grow");
            }
            assert_eq!(groups.counts, [3, 1], "runs: {runs}");
            let counts = groups.state(EmitTo::All).expect("state");
            assert_eq!(
                counts[0].as_primitive::<Int64Type>().values().to_vec(),
                vec![3, 1]
            );
        }
        // Two partitions at the cap merge to the cap, not past it.
        let mut reduce = PatientGroups::new(3, false, None);
        let states: ArrayRef = Arc::new(Int64Array::from(vec![3, 3]));
        reduce.merge_batch(&[states], &[0, 0], 1).expect("merge");
        let merged = reduce.evaluate(EmitTo::All).expect("evaluate");
        assert_eq!(
            merged.as_primitive::<Int64Type>().values().to_vec(),
            vec![3]
        );
    }

    #[test]
    fn only_count_distinct_of_the_patient_key_is_counted_directly() {
        use datafusion::functions_aggregate::expr_fn::{count, count_distinct};
        let key = Column::from_name("p");
        let direct = counted_directly(count_distinct(col("p")), &key);
        let Expr::Alias(alias) = &direct else {
            panic!("not renamed: {direct}");
        };
        assert_eq!(
            alias.name,
            count_distinct(col("p")).schema_name().to_string()
        );
        assert!(matches!(
            alias.expr.as_ref(),
            Expr::AggregateFunction(f) if f.func.name() == PATIENT_COUNT && !f.params.distinct
        ));
        for other in [count_distinct(col("g")), count(col("p"))] {
            assert_eq!(counted_directly(other.clone(), &key), other);
        }
    }

    #[tokio::test]
    async fn a_counted_count_distinct_matches_datafusion() {
        let ctx = session().await;
        let key = Column::from_name("p");
        let batches = reduced(
            &ctx,
            vec![col("g")],
            vec![
                counted_directly(
                    datafusion::functions_aggregate::expr_fn::count_distinct(col("p")),
                    &key,
                ),
                patient_count(Some(1), None).call(vec![Expr::Column(key.clone())]),
            ],
        )
        .await;
        let mut rows: Vec<(String, i64, i64)> = Vec::new();
        for batch in batches {
            for row in 0..batch.num_rows() {
                rows.push((
                    batch.column(0).as_string::<i32>().value(row).to_string(),
                    batch.column(1).as_primitive::<Int64Type>().value(row),
                    batch.column(2).as_primitive::<Int64Type>().value(row),
                ));
            }
        }
        rows.sort();
        // Exact for the researcher's count; the node's own count stops at its cap.
        assert_eq!(rows, vec![("a".into(), 3, 1), ("b".into(), 2, 1)]);
    }

    #[test]
    fn partial_aggregation_cannot_be_skipped() {
        let ids: ArrayRef = Arc::new(Int64Array::from(vec![1, 1]));
        assert!(
            PatientGroups::new(i64::MAX, false, None)
                .convert_to_state(std::slice::from_ref(&ids), None)
                .is_err()
        );
        assert!(
            PatientGroups::new(i64::MAX, true, None)
                .convert_to_state(&[ids], None)
                .is_err()
        );
    }

    /// Writes table (g, p) to `path`, one row group per slice, in this order.
    fn write_row_groups(path: &std::path::Path, row_groups: &[&[(&str, Option<i64>)]]) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("g", DataType::Utf8, false),
            Field::new("p", DataType::Int64, true),
        ]));
        let file = std::fs::File::create(path).expect("create");
        let mut writer =
            datafusion::parquet::arrow::ArrowWriter::try_new(file, Arc::clone(&schema), None)
                .expect("writer");
        for rows in row_groups {
            let batch = RecordBatch::try_new(
                Arc::clone(&schema),
                vec![
                    Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                    Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.1))),
                ],
            )
            .expect("batch");
            writer.write(&batch).expect("write");
            writer.flush().expect("end the row group");
        }
        writer.close().expect("close");
    }

    /// Patients in order, each in one row group, several rows and groups per patient.
    const IN_ORDER: &[&[(&str, Option<i64>)]] = &[
        &[
            ("a", Some(1)),
            ("b", Some(1)),
            ("a", Some(1)),
            ("a", Some(2)),
            ("b", None),
            ("b", Some(2)),
        ],
        &[
            ("a", Some(3)),
            ("b", Some(3)),
            ("a", Some(3)),
            ("c", Some(4)),
            ("a", Some(4)),
            ("a", Some(4)),
        ],
        &[
            ("b", Some(5)),
            ("a", Some(5)),
            ("a", Some(5)),
            ("c", Some(6)),
            ("b", Some(6)),
            ("a", Some(7)),
        ],
        &[
            ("c", Some(8)),
            ("c", Some(8)),
            ("a", Some(9)),
            ("b", Some(9)),
        ],
    ];

    /// Patient 2 in two row groups.
    const SPLIT: &[&[(&str, Option<i64>)]] = &[
        &[("a", Some(1)), ("a", Some(2))],
        &[("a", Some(2)), ("b", Some(3))],
    ];

    /// The file at `path`, checked for patient order in its column p.
    fn checked(path: &std::path::Path) -> OrderedFiles {
        let mut ordered = OrderedFiles::default();
        ordered.add(path, "p");
        ordered
    }

    /// Two partitions of two-row batches (so runs cross batches), reading files as the node
    /// does, or with DataFusion's defaults.
    fn two_partitions(as_node: bool) -> SessionConfig {
        let config = SessionConfig::new()
            .with_target_partitions(2)
            .with_batch_size(2);
        if as_node {
            config.with_repartition_file_min_size(0)
        } else {
            config
        }
    }

    /// A session of `config` reading `path` as table t.
    async fn parquet_session(path: &std::path::Path, config: SessionConfig) -> SessionContext {
        let ctx = SessionContext::new_with_config(config);
        ctx.register_parquet(
            "t",
            path.to_str().expect("utf-8 path"),
            datafusion::prelude::ParquetReadOptions::default(),
        )
        .await
        .expect("register");
        ctx
    }

    /// Whether the plan counts patients over runs.
    fn counts_in_runs(plan: &Arc<dyn ExecutionPlan>) -> bool {
        let mut stack = vec![Arc::clone(plan)];
        while let Some(node) = stack.pop() {
            let in_runs = |a: &Arc<AggregateFunctionExpr>| {
                a.fun()
                    .inner()
                    .downcast_ref::<PatientCount>()
                    .is_some_and(|c| c.runs)
            };
            if let Some(agg) = node.downcast_ref::<AggregateExec>()
                && agg.aggr_expr().iter().any(in_runs)
            {
                return true;
            }
            stack.extend(node.children().into_iter().cloned());
        }
        false
    }

    /// Per group of `input` (by `group`, named g), the node's patient count and whether it
    /// counted over runs; and DataFusion's COUNT(DISTINCT) of the same.
    async fn node_and_datafusion(
        ctx: &SessionContext,
        ordered: &OrderedFiles,
        input: DataFrame,
        group: Expr,
        patient: Column,
    ) -> (Vec<(String, i64)>, bool, Vec<(String, i64)>) {
        let (node, partial) = reduced_over(
            ctx,
            input.clone(),
            ordered,
            vec![group.clone().alias("g")],
            vec![patient_count(None, None).call(vec![Expr::Column(patient.clone())])],
        )
        .await;
        let runs = counts_in_runs(&partial);
        let expected = input
            .aggregate(
                vec![group.alias("g")],
                vec![datafusion::functions_aggregate::expr_fn::count_distinct(
                    Expr::Column(patient),
                )],
            )
            .expect("aggregate")
            .collect()
            .await
            .expect("run");
        (by_group(&node, false), runs, by_group(&expected, false))
    }

    #[tokio::test]
    async fn patients_in_order_are_counted_over_runs_exactly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.parquet");
        write_row_groups(&path, IN_ORDER);
        let ordered = checked(&path);
        let ctx = parquet_session(&path, two_partitions(true)).await;
        let p = Column::from_name("p");

        let t = ctx.table("t").await.expect("t");
        let (node, runs, expected) =
            node_and_datafusion(&ctx, &ordered, t, col("g"), p.clone()).await;
        assert!(runs, "a plain scan of a file in order is counted over runs");
        assert_eq!(node, expected);
        assert_eq!(node[0], ("a".to_string(), 7));

        // Filters and projections keep the runs.
        let filtered = ctx
            .table("t")
            .await
            .expect("t")
            .filter(col("p").not_eq(datafusion::prelude::lit(4)))
            .expect("filter");
        let (node, runs, expected) = node_and_datafusion(
            &ctx,
            &ordered,
            filtered,
            datafusion::functions::expr_fn::upper(col("g")),
            p,
        )
        .await;
        assert!(runs);
        assert_eq!(node, expected);

        // Without groups: one run per patient over the whole file.
        let batches = reduced_over(
            &ctx,
            ctx.table("t").await.expect("t"),
            &ordered,
            vec![],
            vec![patient_count(None, None).call(vec![col("p")])],
        )
        .await
        .0;
        assert_eq!(by_group(&batches, true), vec![(String::new(), 9)]);
    }

    #[tokio::test]
    async fn anything_else_is_counted_with_sets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.parquet");
        let p = Column::from_name("p");

        // Patient 2 is in two row groups: not in order.
        write_row_groups(&path, SPLIT);
        let ordered = checked(&path);
        let ctx = parquet_session(&path, two_partitions(true)).await;
        let t = ctx.table("t").await.expect("t");
        let (node, runs, expected) =
            node_and_datafusion(&ctx, &ordered, t, col("g"), p.clone()).await;
        assert!(
            !runs,
            "a patient split between row groups could be counted twice"
        );
        assert_eq!(node, expected);

        // In order when checked, changed since.
        write_row_groups(&path, IN_ORDER);
        let ordered = checked(&path);
        std::thread::sleep(std::time::Duration::from_millis(10));
        write_row_groups(&path, SPLIT);
        let ctx = parquet_session(&path, two_partitions(true)).await;
        let t = ctx.table("t").await.expect("t");
        let (node, runs, expected) =
            node_and_datafusion(&ctx, &ordered, t, col("g"), p.clone()).await;
        assert!(!runs, "a file replaced after its check is not trusted");
        assert_eq!(node, expected);

        // In order, but spread round-robin (DataFusion's defaults for a small file).
        write_row_groups(&path, IN_ORDER);
        let ordered = checked(&path);
        let ctx = parquet_session(&path, two_partitions(false)).await;
        let t = ctx.table("t").await.expect("t");
        let (node, runs, expected) =
            node_and_datafusion(&ctx, &ordered, t, col("g"), p.clone()).await;
        assert!(!runs, "round-robin batches interleave patients");
        assert_eq!(node, expected);

        // In order, but joined: a join's output is not in runs.
        let ctx = parquet_session(&path, two_partitions(true)).await;
        let joined = ctx
            .sql("SELECT t.g, t.p FROM t JOIN t AS u ON t.p = u.p")
            .await
            .expect("join");
        let (node, runs, expected) = node_and_datafusion(
            &ctx,
            &ordered,
            joined,
            Expr::Column(Column::new(Some("t"), "g")),
            Column::new(Some("t"), "p"),
        )
        .await;
        assert!(!runs);
        assert_eq!(node, expected);

        // A column computed from the patient key is not the patient key.
        let shifted = ctx
            .table("t")
            .await
            .expect("t")
            .select(vec![
                col("g"),
                (col("p") + datafusion::prelude::lit(1)).alias("p"),
            ])
            .expect("select");
        let (node, runs, expected) =
            node_and_datafusion(&ctx, &ordered, shifted, col("g"), p).await;
        assert!(!runs);
        assert_eq!(node, expected);
    }

    #[tokio::test]
    async fn input_already_partitioned_by_patient_is_not_partitioned_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.parquet");
        write_row_groups(&path, IN_ORDER);
        let mut config = two_partitions(true);
        // A partitioned join, as the node plans one over large tables.
        config
            .options_mut()
            .optimizer
            .hash_join_single_partition_threshold = 0;
        config
            .options_mut()
            .optimizer
            .hash_join_single_partition_threshold_rows = 0;
        let ctx = parquet_session(&path, config).await;
        // Partitioned by t.p; counted by u.p, which the join makes equal.
        let sql = "SELECT t.g, u.p FROM t JOIN t AS u ON t.p = u.p";
        let joined = ctx.sql(sql).await.expect("join");
        let (batches, partial) = reduced_over(
            &ctx,
            joined,
            &OrderedFiles::default(),
            vec![Expr::Column(Column::new(Some("t"), "g"))],
            vec![patient_count(None, None).call(vec![Expr::Column(Column::new(Some("u"), "p"))])],
        )
        .await;
        let partial_input = Arc::clone(partial.children()[0]);
        let join = partial_input.downcast_ref::<HashJoinExec>();
        assert!(
            join.is_some_and(|j| *j.partition_mode() == PartitionMode::Partitioned),
            "the join's output goes straight to the partial aggregate: {}",
            displayable(partial_input.as_ref()).indent(false)
        );
        let expected = ctx
            .sql(&format!(
                "SELECT g, COUNT(DISTINCT p) FROM ({sql}) GROUP BY g"
            ))
            .await
            .expect("sql")
            .collect()
            .await
            .expect("run");
        assert_eq!(by_group(&batches, false), by_group(&expected, false));
    }
}
