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
//! A count is only exact if each partition counts every one of its rows into one set. An
//! aggregate that emits its groups early under memory pressure would start a fresh set and
//! count a patient twice, so a count that is asked to continue after it has been emitted fails
//! the query as out of memory instead.

use std::collections::HashSet;
use std::mem::size_of;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Int64Array};
use arrow::datatypes::{DataType, Field, FieldRef, Int64Type};
use datafusion::common::hash_utils::RandomState;
use datafusion::common::{Column, DataFusionError, Result, ScalarValue};
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::format_state_name;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, EmitTo, Expr, GroupsAccumulator, Signature,
    Volatility,
};
use datafusion::physical_plan::aggregates::AggregateExec;
use datafusion::physical_plan::execution_plan::{ChildrenPropertiesMode, ReplaceChildrenOptions};
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::{ExecutionPlan, Partitioning};
#[cfg(doc)]
use trustql_policies::PATIENT_COUNT_CAP;

/// The aggregate's name, as the physical plan shows it.
pub(crate) const PATIENT_COUNT: &str = "trustql_patient_count";

/// `trustql_patient_count(patient key)`: distinct patients per group, up to `cap` when given,
/// exact only over input partitioned by the patient key (see [`by_patient`]).
pub(crate) fn patient_count(cap: Option<u64>) -> AggregateUDF {
    AggregateUDF::from(PatientCount {
        signature: Signature::exact(vec![DataType::Int64], Volatility::Immutable),
        cap: cap.and_then(|c| i64::try_from(c).ok()).unwrap_or(i64::MAX),
    })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct PatientCount {
    signature: Signature,
    cap: i64,
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

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format_state_name(args.name, "count"),
            DataType::Int64,
            false,
        ))])
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(PatientSet::new(self.cap)))
    }

    fn groups_accumulator_supported(&self, _args: AccumulatorArgs) -> bool {
        true
    }

    fn create_groups_accumulator(
        &self,
        _args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(PatientGroups::new(self.cap)))
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

fn patients(values: &[ArrayRef]) -> Result<&Int64Array> {
    values
        .first()
        .and_then(|v| v.as_primitive_opt::<Int64Type>())
        .ok_or_else(|| DataFusionError::Internal("the patient key is not Int64".into()))
}

/// Per group, the patients seen and their number.
#[derive(Debug)]
struct PatientGroups {
    /// Per group, its patients (a set per group keeps each entry at 8 bytes).
    seen: Vec<HashSet<i64, RandomState>>,
    counts: Vec<i64>,
    /// Slots held by all the sets, kept as they grow (`size` is asked once per batch and
    /// must not walk every group).
    slots: usize,
    /// Patients a group needs no more of.
    cap: i64,
    emitted: bool,
}

impl PatientGroups {
    fn new(cap: i64) -> Self {
        PatientGroups {
            seen: Vec::new(),
            counts: Vec::new(),
            slots: 0,
            cap,
            emitted: false,
        }
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
        self.seen.resize_with(total_num_groups, HashSet::default);
        let ids = patients(values)?;
        for (row, &group) in group_indices.iter().enumerate() {
            let included =
                ids.is_valid(row) && opt_filter.is_none_or(|f| f.is_valid(row) && f.value(row));
            let set = &mut self.seen[group];
            if included && (set.len() as i64) < self.cap {
                let before = set.capacity();
                if set.insert(ids.value(row)) {
                    self.counts[group] += 1;
                    self.slots += set.capacity() - before;
                }
            }
        }
        Ok(())
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
        self.seen = Vec::new();
        self.slots = 0;
        Ok(vec![self.evaluate(emit_to)?])
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
        self.slots * (size_of::<i64>() + 1)
            + self.seen.capacity() * size_of::<HashSet<i64, RandomState>>()
            + self.counts.capacity() * size_of::<i64>()
    }
}

/// The patients of a query without groups.
#[derive(Debug)]
struct PatientSet {
    seen: HashSet<i64, RandomState>,
    merged: i64,
    cap: i64,
    emitted: bool,
}

impl PatientSet {
    fn new(cap: i64) -> Self {
        PatientSet {
            seen: HashSet::default(),
            merged: 0,
            cap,
            emitted: false,
        }
    }
}

impl Accumulator for PatientSet {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        if self.emitted {
            return Err(emitted_early());
        }
        for id in patients(values)?.iter().flatten() {
            if self.seen.len() as i64 >= self.cap {
                break;
            }
            self.seen.insert(id);
        }
        Ok(())
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        self.emitted = true;
        let n = self.seen.len() as i64 + self.merged;
        Ok(ScalarValue::Int64(Some(n.min(self.cap))))
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![self.evaluate()?])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.merged += summed(states)?.iter().flatten().sum::<i64>();
        Ok(())
    }

    fn size(&self) -> usize {
        size_of::<Self>() + self.seen.capacity() * (size_of::<i64>() + 1)
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
        Arc::new(patient_count(None)),
        f.params.args,
        false,
        f.params.filter,
        vec![],
        None,
    ))
    .alias(name)
}

/// The partial aggregate `partial` over its input hash-partitioned by the patient key (the
/// argument of its last aggregate, the patient count) into `partitions` partitions.
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
    let input = Arc::new(RepartitionExec::try_new(
        partial.input().clone(),
        Partitioning::Hash(vec![patient], partitions.max(1)),
    )?);
    // The partitioning changes, so the plan's properties are computed again.
    Arc::new(partial.clone()).replace_children(
        vec![input],
        ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::common::{Column, DataFusionError};
    use datafusion::datasource::MemTable;
    use datafusion::logical_expr::{Aggregate, EmitTo, Expr, GroupsAccumulator, LogicalPlan};
    use datafusion::prelude::{SessionConfig, SessionContext, col};

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
                schema.clone(),
                vec![
                    Arc::new(StringArray::from(groups)),
                    Arc::new(Int64Array::from(ids)),
                ],
            )
            .expect("batch")
        };
        let table = MemTable::try_new(
            schema.clone(),
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

    /// `aggregates` of table t by `group`, run as the node runs them: partial, reduced.
    async fn reduced(
        ctx: &SessionContext,
        group: Vec<Expr>,
        aggregates: Vec<Expr>,
    ) -> Vec<RecordBatch> {
        let input = ctx.table("t").await.expect("t").into_unoptimized_plan();
        let aggregate = Aggregate::try_new(Arc::new(input), group, aggregates)
            .map(LogicalPlan::Aggregate)
            .expect("aggregate");
        let physical = ctx
            .state()
            .create_physical_plan(&aggregate)
            .await
            .expect("plan");
        let reduce = partial_reduce(&physical, 2).expect("reduce");
        datafusion::physical_plan::collect(reduce, ctx.task_ctx())
            .await
            .expect("run")
    }

    /// Per group (or the one total, without groups), the reduced patient count.
    async fn counts(ctx: &SessionContext, group: Vec<Expr>) -> Vec<(String, i64)> {
        let patients = patient_count(None).call(vec![Expr::Column(Column::from_name("p"))]);
        let batches = reduced(ctx, group.clone(), vec![patients]).await;
        let mut out = Vec::new();
        for batch in batches {
            let n = batch.num_columns();
            let values = batch.column(n - 1).as_primitive::<Int64Type>();
            for row in 0..batch.num_rows() {
                let key = if group.is_empty() {
                    String::new()
                } else {
                    batch.column(0).as_string::<i32>().value(row).to_string()
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
        let mut groups = PatientGroups::new(i64::MAX);
        let ids: ArrayRef = Arc::new(Int64Array::from(vec![Some(7), None, Some(8), Some(7)]));
        let keep = BooleanArray::from(vec![true, true, false, true]);
        groups
            .update_batch(&[ids], &[0, 0, 0, 0], Some(&keep), 1)
            .expect("update");
        let counts = groups.evaluate(EmitTo::All).expect("evaluate");
        assert_eq!(
            counts.as_primitive::<Int64Type>().values().to_vec(),
            vec![1]
        );
    }

    #[test]
    fn counting_on_after_an_early_emission_fails_as_out_of_memory() {
        let ids: ArrayRef = Arc::new(Int64Array::from(vec![1, 2]));
        let mut groups = PatientGroups::new(i64::MAX);
        groups
            .update_batch(std::slice::from_ref(&ids), &[0, 1], None, 2)
            .expect("update");
        groups.state(EmitTo::All).expect("state");
        // Counting patient 1 again in a fresh set would count them twice.
        let again = groups.update_batch(std::slice::from_ref(&ids), &[0, 1], None, 2);
        assert!(matches!(again, Err(DataFusionError::ResourcesExhausted(_))));

        let mut total = PatientSet::new(i64::MAX);
        total
            .update_batch(std::slice::from_ref(&ids))
            .expect("update");
        total.state().expect("state");
        let again = total.update_batch(std::slice::from_ref(&ids));
        assert!(matches!(again, Err(DataFusionError::ResourcesExhausted(_))));
    }

    #[test]
    fn a_group_stops_collecting_patients_at_the_cap() {
        let mut groups = PatientGroups::new(3);
        let ids: ArrayRef = Arc::new(Int64Array::from(vec![1, 2, 3, 4, 5, 9]));
        groups
            .update_batch(&[ids], &[0, 0, 0, 0, 0, 1], None, 2)
            .expect("update");
        assert_eq!(groups.seen[0].len(), 3, "no patient kept beyond the cap");
        let slots: usize = groups.seen.iter().map(|set| set.capacity()).sum();
        assert_eq!(groups.slots, slots, "memory is accounted as the sets grow");
        let counts = groups.state(EmitTo::All).expect("state");
        assert_eq!(
            counts[0].as_primitive::<Int64Type>().values().to_vec(),
            vec![3, 1]
        );
        // Two partitions at the cap merge to the cap, not past it.
        let mut reduce = PatientGroups::new(3);
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
                patient_count(Some(1)).call(vec![Expr::Column(key.clone())]),
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
            PatientGroups::new(i64::MAX)
                .convert_to_state(&[ids], None)
                .is_err()
        );
    }
}
