//! A pass-through plan node that claims nothing about its rows: no ordering, no constants, no
//! equal columns, no uniqueness.
//!
//! The node's partial reduce merges partial states coalesced from several partitions, and an
//! aggregate trusts its input's equivalence properties to choose how it groups. DataFusion's
//! partial aggregate projects its input's properties onto its output through the grouping
//! expressions without the grouping-set expansion: after `WHERE gender = '1' GROUP BY
//! ROLLUP(gender)` it still claims `gender` is constant though the rolled-up rows have NULL
//! there. The reduce then groups in streaming order and emits a group once per partition.
//! Put between the coalesce and the reduce, this node makes the reduce hash every group.

use std::fmt;
use std::sync::Arc;

use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{Result, internal_datafusion_err};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::{
    ChildrenPropertiesMode, DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties,
    Partitioning, PhysicalExpr, PlanProperties, ReplaceChildrenOptions,
};

/// Forwards its input's rows unchanged and reports only their schema, partition count,
/// emission and boundedness.
#[derive(Debug)]
pub(crate) struct UnorderedExec {
    input: Arc<dyn ExecutionPlan>,
    properties: Arc<PlanProperties>,
}

impl UnorderedExec {
    pub(crate) fn new(input: Arc<dyn ExecutionPlan>) -> Self {
        let properties = PlanProperties::new(
            EquivalenceProperties::new(input.schema()),
            // A hash partitioning's expressions would be a claim about the rows too.
            Partitioning::UnknownPartitioning(input.output_partitioning().partition_count()),
            input.pipeline_behavior(),
            input.boundedness(),
        );
        UnorderedExec {
            input,
            properties: Arc::new(properties),
        }
    }
}

impl DisplayAs for UnorderedExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match t {
            DisplayFormatType::Default | DisplayFormatType::Verbose => write!(f, "UnorderedExec"),
            // The tree rendering prints the name itself; this node has no details.
            DisplayFormatType::TreeRender => Ok(()),
        }
    }
}

impl ExecutionPlan for UnorderedExec {
    fn name(&self) -> &str {
        "UnorderedExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
        options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let [input] = <[_; 1]>::try_from(children)
            .map_err(|_| internal_datafusion_err!("UnorderedExec has exactly one child"))?;
        Ok(Arc::new(match options.children_properties {
            ChildrenPropertiesMode::Keep => UnorderedExec {
                input,
                properties: Arc::clone(&self.properties),
            },
            ChildrenPropertiesMode::Recompute => UnorderedExec::new(input),
        }))
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
        )
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        self.input.execute(partition, context)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{AsArray, Int64Array, RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Field, Int64Type, Schema};
    use datafusion::common::Column;
    use datafusion::datasource::MemTable;
    use datafusion::logical_expr::{Aggregate, Expr, GroupingSet, LogicalPlan};
    use datafusion::physical_plan::InputOrderMode;
    use datafusion::prelude::{SessionConfig, SessionContext, col, lit};

    use crate::engine::partial_reduce;
    use crate::patient_order::OrderedFiles;
    use crate::patients::patient_count;

    #[tokio::test]
    async fn a_key_fixed_by_the_filter_is_not_trusted_after_a_rollup() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("g", DataType::Utf8, false),
            Field::new("p", DataType::Int64, true),
        ]));
        let batch = |ids: Vec<i64>| {
            let groups = vec!["a"; ids.len()];
            RecordBatch::try_new(
                Arc::clone(&schema),
                vec![
                    Arc::new(StringArray::from(groups)),
                    Arc::new(Int64Array::from(ids)),
                ],
            )
            .expect("batch")
        };
        // Patients in both partitions, so each partition's partial has both groups.
        let table = MemTable::try_new(
            Arc::clone(&schema),
            vec![vec![batch(vec![1, 2, 3])], vec![batch(vec![4, 5, 6])]],
        )
        .expect("table");
        let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(2));
        ctx.register_table("t", Arc::new(table)).expect("register");
        let input = ctx
            .table("t")
            .await
            .expect("t")
            .filter(col("g").eq(lit("a")))
            .expect("filter")
            .into_unoptimized_plan();
        let rollup = Expr::GroupingSet(GroupingSet::Rollup(vec![col("g")]));
        let patients = patient_count(None, None).call(vec![Expr::Column(Column::from_name("p"))]);
        let aggregate = Aggregate::try_new(Arc::new(input), vec![rollup], vec![patients])
            .map(LogicalPlan::Aggregate)
            .expect("aggregate");
        let physical = ctx
            .state()
            .create_physical_plan(&aggregate)
            .await
            .expect("plan");
        let reduce = partial_reduce(&physical, 2, &OrderedFiles::default()).expect("reduce");
        assert_eq!(reduce.input_order_mode(), &InputOrderMode::Linear);

        let batches = datafusion::physical_plan::collect(reduce, ctx.task_ctx())
            .await
            .expect("run");
        let mut counts: Vec<i64> = batches
            .iter()
            .flat_map(|b| {
                let n = b.num_columns();
                b.column(n - 1)
                    .as_primitive::<Int64Type>()
                    .values()
                    .to_vec()
            })
            .collect();
        counts.sort_unstable();
        // The detail row and the grand total, each once, each of all six patients.
        assert_eq!(counts, vec![6, 6]);
    }
}
