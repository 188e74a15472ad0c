//! Disclosure control on one trust's partial aggregation states, group by group.
//!
//! The node hands over its partial answer (one row per group: the group keys, the number of
//! distinct patients, the aggregate states) with the role of each column. Groups are withheld
//! when they have too few patients, when a sum is dominated by a few contributions, or when
//! they hold every patient of their margin (a 100% cell); a withheld group also withholds every
//! subtotal and total it belongs to in the same answer, so it cannot be recovered by
//! subtraction. Counts are then rounded as the policy says.

use std::collections::{HashMap, HashSet};

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch, UInt64Array};
use arrow::compute::{cast, filter_record_batch};
use arrow::datatypes::{DataType, Schema};
use arrow::row::{RowConverter, SortField};
use datafusion::common::hash_utils::RandomState;

use crate::policy::{Disclosure, Rounding};
use crate::refusal::{Refusal, Rule};

/// What a column of the partial answer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnRole {
    /// A GROUP BY key (null where a grouping set rolls it up).
    Key,
    /// DataFusion's grouping id: bit `n-1-i` set when key `i` is rolled up.
    GroupingId,
    /// Distinct patients in the group.
    Patients,
    /// A count (of rows or distinct values): rounded.
    Count,
    /// A sum; `top` is the column holding the sum of its largest contributions, if any.
    Sum {
        /// Column index of the matching [`ColumnRole::Top`].
        top: Option<usize>,
    },
    /// The sum of the `n` largest contributions to a sum (used, then dropped).
    Top,
    /// Any other state (min, max, sums of squares): released as computed.
    Other,
}

/// Rows that differ only at one key: (grouped keys, that key, the other grouped keys' ids).
type Bucket = (u64, usize, Vec<u32>);

/// Why groups were withheld, and how many were released.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DisclosureReport {
    /// Groups released.
    pub released: usize,
    /// Withheld: fewer patients than the minimum.
    pub small: usize,
    /// Withheld: a sum dominated by its largest contributions.
    pub dominated: usize,
    /// Withheld: the group holds every patient of its margin (100% cell).
    pub whole_margin: usize,
    /// Withheld: a subtotal or total of a withheld group.
    pub margin_of_withheld: usize,
}

impl DisclosureReport {
    /// All groups withheld.
    pub fn withheld(&self) -> usize {
        self.small + self.dominated + self.whole_margin + self.margin_of_withheld
    }
}

/// The protected answer.
#[derive(Debug, Clone)]
pub struct Protected {
    /// Released groups, counts rounded, `Top` columns removed.
    pub batch: RecordBatch,
    /// What was withheld and why.
    pub report: DisclosureReport,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Release,
    Small,
    Dominated,
    WholeMargin,
    MarginOfWithheld,
}

/// Applies the policy's disclosure rules to a partial answer.
pub fn protect(
    batch: &RecordBatch,
    roles: &[ColumnRole],
    rules: &Disclosure,
    max_groups: usize,
) -> Result<Protected, Refusal> {
    let internal = |what: &str| Refusal::new(Rule::Unsupported, format!("internal: {what}"));
    if roles.len() != batch.num_columns() {
        return Err(internal("column roles do not match the answer"));
    }
    let rows = batch.num_rows();
    if rows > max_groups {
        return Err(Refusal::new(
            Rule::TooManyGroups,
            format!(
                "the query produces more than {max_groups} groups at this trust; group more \
                 coarsely or filter"
            ),
        ));
    }
    let column_as_i64 = |index: usize| -> Result<Vec<Option<i64>>, Refusal> {
        let array = cast(batch.column(index), &DataType::Int64)
            .map_err(|_| internal("a count column is not numeric"))?;
        Ok(array
            .as_primitive::<arrow::datatypes::Int64Type>()
            .iter()
            .collect())
    };
    let column_as_f64 = |index: usize| -> Result<Vec<Option<f64>>, Refusal> {
        let array = cast(batch.column(index), &DataType::Float64)
            .map_err(|_| internal("a sum column is not numeric"))?;
        Ok(array
            .as_primitive::<arrow::datatypes::Float64Type>()
            .iter()
            .collect())
    };

    let Some(patients_index) = roles.iter().position(|r| *r == ColumnRole::Patients) else {
        return Err(internal("no patient count"));
    };
    let patients = column_as_i64(patients_index)?;
    let keys: Vec<usize> = roles
        .iter()
        .enumerate()
        .filter(|(_, r)| **r == ColumnRole::Key)
        .map(|(i, _)| i)
        .collect();
    if keys.len() > 64 {
        return Err(Refusal::new(
            Rule::Unsupported,
            "a query may group by at most 64 keys",
        ));
    }
    let grouped = grouped_masks(batch, roles, &keys)?;
    let ids = key_ids(batch, &keys)?;
    let n = keys.len();
    let is_grouped = |row: usize, j: usize| grouped[row] & (1 << j) != 0;
    // The ids of the keys in `mask`, for one row.
    let project = |row: usize, mask: u64| -> Vec<u32> {
        (0..n)
            .filter(|&j| mask & (1 << j) != 0)
            .map(|j| ids[row * n + j])
            .collect()
    };

    let mut verdicts = vec![Verdict::Release; rows];
    for (row, verdict) in verdicts.iter_mut().enumerate() {
        if patients[row].unwrap_or(0) < rules.min_patients as i64 {
            *verdict = Verdict::Small;
        }
    }
    if let Some(dominance) = rules.dominance {
        for (index, role) in roles.iter().enumerate() {
            let ColumnRole::Sum { top } = role else {
                continue;
            };
            let Some(top) = top else {
                return Err(internal("a sum has no largest-contribution column"));
            };
            let sums = column_as_f64(index)?;
            let tops = column_as_f64(*top)?;
            for row in 0..rows {
                if verdicts[row] != Verdict::Release {
                    continue;
                }
                if let (Some(total), Some(largest)) = (sums[row], tops[row]) {
                    let total = total.abs();
                    if total > 0.0 && largest.abs() / total * 100.0 > dominance.k {
                        verdicts[row] = Verdict::Dominated;
                    }
                }
            }
        }
    }
    // Hash buckets keep both rules linear in the number of groups (a pairwise scan took
    // most of a node's time on a few thousand groups).
    if rules.withhold_whole_margin_cells && !keys.is_empty() {
        // Rows that differ only at key k share a bucket; a bucket of one is a 100% cell
        // (its siblings at k are all 0%). Each (row, k) remembers its bucket's position.
        let mut buckets: HashMap<Bucket, usize, RandomState> = HashMap::default();
        let mut sizes: Vec<usize> = Vec::new();
        let mut bucket_of = vec![usize::MAX; rows * n];
        for row in 0..rows {
            for k in (0..n).filter(|&k| is_grouped(row, k)) {
                let bucket = (grouped[row], k, project(row, grouped[row] & !(1 << k)));
                let next = sizes.len();
                let at = *buckets.entry(bucket).or_insert(next);
                if at == next {
                    sizes.push(0);
                }
                sizes[at] += 1;
                bucket_of[row * n + k] = at;
            }
        }
        for (row, verdict) in verdicts.iter_mut().enumerate() {
            if *verdict != Verdict::Release {
                continue;
            }
            let alone = (0..n)
                .filter(|&k| is_grouped(row, k))
                .any(|k| sizes.get(bucket_of[row * n + k]) == Some(&1));
            if alone {
                *verdict = Verdict::WholeMargin;
            }
        }
    }
    // Subtotals and totals of anything withheld are withheld too: project every withheld row
    // onto each coarser grouping present, then look each released row up.
    let masks: HashSet<u64, RandomState> = grouped.iter().copied().collect();
    let mut margins: HashSet<(u64, Vec<u32>), RandomState> = HashSet::default();
    for w in (0..rows).filter(|&r| verdicts[r] != Verdict::Release) {
        for &mask in &masks {
            // Coarser: a proper subset of the withheld row's grouped keys.
            if mask != grouped[w] && mask & !grouped[w] == 0 {
                margins.insert((mask, project(w, mask)));
            }
        }
    }
    if !margins.is_empty() {
        for (a, verdict) in verdicts.iter_mut().enumerate() {
            if *verdict == Verdict::Release
                && margins.contains(&(grouped[a], project(a, grouped[a])))
            {
                *verdict = Verdict::MarginOfWithheld;
            }
        }
    }

    let mut report = DisclosureReport::default();
    for v in &verdicts {
        match v {
            Verdict::Release => report.released += 1,
            Verdict::Small => report.small += 1,
            Verdict::Dominated => report.dominated += 1,
            Verdict::WholeMargin => report.whole_margin += 1,
            Verdict::MarginOfWithheld => report.margin_of_withheld += 1,
        }
    }

    // Round counts, drop the helper columns, keep released rows.
    let mut fields = Vec::new();
    let mut columns: Vec<ArrayRef> = Vec::new();
    for (index, role) in roles.iter().enumerate() {
        let field = batch.schema().field(index).clone();
        match role {
            ColumnRole::Top => continue,
            ColumnRole::Count | ColumnRole::Patients => {
                let values = column_as_i64(index)?;
                let rounded: Int64Array = values
                    .into_iter()
                    .map(|v| v.map(|x| round(x, rules)))
                    .collect();
                // Back to the accumulator's own type, so DataFusion can merge the state.
                let rounded = cast(&rounded, field.data_type())
                    .map_err(|_| internal("could not restore a count's type"))?;
                fields.push(field);
                columns.push(rounded);
            }
            _ => {
                fields.push(field);
                columns.push(batch.column(index).clone());
            }
        }
    }
    let rounded = RecordBatch::try_new(std::sync::Arc::new(Schema::new(fields)), columns)
        .map_err(|_| internal("could not rebuild the answer"))?;
    let keep: BooleanArray = verdicts
        .iter()
        .map(|v| Some(*v == Verdict::Release))
        .collect();
    let batch = filter_record_batch(&rounded, &keep)
        .map_err(|_| internal("could not filter the answer"))?;
    Ok(Protected { batch, report })
}

/// Rounds a count as the policy says.
pub fn round(x: i64, rules: &Disclosure) -> i64 {
    match rules.rounding {
        Rounding::None => x,
        Rounding::Base => {
            let base = rules.rounding_base.max(1) as i64;
            ((x + base / 2).div_euclid(base)) * base
        }
        Rounding::Midpoint6 => {
            if x <= 0 {
                0
            } else {
                (x + 5) / 6 * 6 - 3
            }
        }
    }
}

/// For each row, which keys are grouped (not rolled up): bit `j` set when key `j` is.
fn grouped_masks(
    batch: &RecordBatch,
    roles: &[ColumnRole],
    keys: &[usize],
) -> Result<Vec<u64>, Refusal> {
    let n = keys.len();
    let all = (0..n).fold(0u64, |mask, j| mask | (1 << j));
    if let Some(index) = roles.iter().position(|r| *r == ColumnRole::GroupingId) {
        let ids = cast(batch.column(index), &DataType::UInt64).map_err(|_| {
            Refusal::new(Rule::Unsupported, "internal: grouping id is not an integer")
        })?;
        let ids: &UInt64Array = ids.as_primitive();
        return Ok(ids
            .iter()
            .map(|id| {
                let id = id.unwrap_or(0);
                (0..n)
                    .filter(|&j| id & (1 << (n - 1 - j)) == 0)
                    .fold(0u64, |mask, j| mask | (1 << j))
            })
            .collect());
    }
    Ok(vec![all; batch.num_rows()])
}

/// Each key's values as small ids, equal ids for equal values (nulls included), so groups
/// compare as integers: row `r`'s key `j` is at `r * keys.len() + j`.
fn key_ids(batch: &RecordBatch, keys: &[usize]) -> Result<Vec<u32>, Refusal> {
    let rows = batch.num_rows();
    let n = keys.len();
    let mut ids = vec![0u32; rows * n];
    for (j, &k) in keys.iter().enumerate() {
        let column = batch.column(k);
        let converter = RowConverter::new(vec![SortField::new(column.data_type().clone())])
            .map_err(|_| Refusal::new(Rule::Unsupported, "internal: key not comparable"))?;
        let encoded = converter
            .convert_columns(std::slice::from_ref(column))
            .map_err(|_| Refusal::new(Rule::Unsupported, "internal: key not comparable"))?;
        let mut seen: HashMap<&[u8], u32, RandomState> =
            HashMap::with_capacity_and_hasher(rows, RandomState::default());
        for r in 0..rows {
            let next = seen.len() as u32;
            ids[r * n + j] = *seen.entry(encoded.row(r).data()).or_insert(next);
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(rounding: Rounding) -> Disclosure {
        Disclosure {
            rounding,
            ..Disclosure::default()
        }
    }

    #[test]
    fn rounding_to_a_base_and_midpoint_six() {
        let base = rules(Rounding::Base);
        assert_eq!(round(0, &base), 0);
        assert_eq!(round(2, &base), 0);
        assert_eq!(round(3, &base), 5);
        assert_eq!(round(12, &base), 10);
        assert_eq!(round(13, &base), 15);
        let m6 = rules(Rounding::Midpoint6);
        assert_eq!(round(0, &m6), 0);
        assert_eq!(round(1, &m6), 3);
        assert_eq!(round(6, &m6), 3);
        assert_eq!(round(7, &m6), 9);
        assert_eq!(round(12, &m6), 9);
        assert_eq!(round(13, &m6), 15);
        assert_eq!(round(17, &rules(Rounding::None)), 17);
    }
}
