//! Statistical disclosure control on one trust's partial states, group by group.
//!
//! Groups are withheld when they have too few patients, when a sum is dominated by a few
//! contributions, or when they hold every patient of their margin (a 100% cell); a withheld
//! group also withholds every subtotal and total it belongs to in the same answer, so it cannot
//! be recovered by subtraction. Counts are then rounded as the policy says.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch, UInt64Array};
use arrow::compute::{cast, filter_record_batch};
use arrow::datatypes::{DataType, Float64Type, Int64Type, Schema};
use arrow::row::{RowConverter, SortField};
use datafusion::common::hash_utils::RandomState;

use crate::policy::{Disclosure, Rounding};
use crate::refusal::{Refusal, Rule};
use crate::release::cellkey;
use crate::release::{Contributions, Moment, PartialAnswer, ReleaseError, Role, StateColumn};

/// Rows that differ only at one key: (grouped keys, that key, the other grouped keys' ids).
type Bucket = (u64, usize, Vec<u32>);

/// A sum column and, per row, the sum of its group's largest per-patient contributions.
pub(super) type Tops = Vec<(usize, Vec<Option<f64>>)>;

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
    /// Released groups, counts rounded.
    pub batch: RecordBatch,
    /// What each released column is.
    pub columns: Vec<StateColumn>,
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

pub(super) fn internal(what: &'static str) -> ReleaseError {
    ReleaseError::Internal(what)
}

/// The groups' keys, compared as integers: which keys each row groups by, and each key's id.
struct Groups {
    /// Bit `j` set when key `j` is grouped (not rolled up), per row.
    grouped: Vec<u64>,
    /// Row `r`'s key `j` is at `r * n + j`.
    ids: Vec<u32>,
    n: usize,
}

impl Groups {
    fn is_grouped(&self, row: usize, j: usize) -> bool {
        self.grouped[row] & (1 << j) != 0
    }

    /// The ids of the keys in `mask`, for one row.
    fn project(&self, row: usize, mask: u64) -> Vec<u32> {
        (0..self.n)
            .filter(|&j| mask & (1 << j) != 0)
            .map(|j| self.ids[row * self.n + j])
            .collect()
    }
}

/// Applies the policy's disclosure rules to a partial answer.
pub fn protect(
    answer: &PartialAnswer,
    rules: &Disclosure,
    max_groups: usize,
) -> Result<Protected, ReleaseError> {
    protect_with(answer, rules, &[], max_groups)
}

/// [`protect`], with whose patients each aggregate reads ([`crate::SdcNeeds::reads`]; an
/// aggregate not listed reads its own count's patients if the answer has one, else the
/// group's).
pub(crate) fn protect_with(
    answer: &PartialAnswer,
    rules: &Disclosure,
    reads: &[Option<usize>],
    max_groups: usize,
) -> Result<Protected, ReleaseError> {
    let batch = &answer.batch;
    if answer.columns.len() != batch.num_columns() {
        return Err(internal("column descriptions do not match the answer"));
    }
    let roles: Vec<Role> = answer.columns.iter().map(|c| c.role()).collect();
    let rows = batch.num_rows();
    if rows > max_groups {
        return Err(Refusal::new(
            Rule::TooManyGroups,
            format!(
                "the query produces more than {max_groups} groups at this trust; group more \
                 coarsely or filter"
            ),
        )
        .into());
    }
    let Some(patients_index) = roles.iter().position(|r| *r == Role::Patients) else {
        return Err(internal("no patient count"));
    };
    let patients = column_as_i64(batch, patients_index)?;
    let keys: Vec<usize> = roles
        .iter()
        .enumerate()
        .filter(|(_, r)| **r == Role::Key)
        .map(|(i, _)| i)
        .collect();
    if keys.len() > 64 {
        return Err(Refusal::new(Rule::Unsupported, "a query may group by at most 64 keys").into());
    }
    let groups = Groups {
        grouped: grouped_masks(batch, &roles, &keys)?,
        ids: key_ids(batch, &keys)?,
        n: keys.len(),
    };

    // The minimum holds for the group and for the patients each aggregate reads.
    let read_by_aggregates = roles
        .iter()
        .enumerate()
        .filter(|(_, r)| **r == Role::AggregatePatients)
        .map(|(i, _)| column_as_i64(batch, i))
        .collect::<Result<Vec<_>, _>>()?;
    let mut verdicts = vec![Verdict::Release; rows];
    for (row, verdict) in verdicts.iter_mut().enumerate() {
        let fewest = read_by_aggregates
            .iter()
            .map(|c| c[row].unwrap_or(0))
            .chain([patients[row].unwrap_or(0)])
            .min()
            .unwrap_or(0);
        if fewest < rules.min_patients as i64 {
            *verdict = Verdict::Small;
        }
    }
    if let Some(dominance) = rules.dominance {
        let tops = top_contributions(answer, &roles, &keys, dominance.n, &[Role::Sum])?;
        withhold_dominated(batch, &tops, dominance.k, &mut verdicts)?;
    }
    if rules.withhold_whole_margin_cells && !keys.is_empty() {
        withhold_whole_margins(&groups, &mut verdicts);
    }
    // Perturbed totals need no secondary suppression: a total less its released cells is the
    // withheld cell plus every cell's own adjustment.
    if !rules.uses_cell_keys() {
        withhold_margins_of_withheld(&groups, &mut verdicts);
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
    let batch = if rules.uses_cell_keys() {
        let tables = rules
            .cell_key_tables()
            .map_err(|_| internal("the approved cell-key tables cannot be built"))?;
        // A variance's mean is a sum over its count, perturbed as one.
        let measured = [Role::Sum, Role::Moment(Moment::Mean)];
        let tops = top_contributions(answer, &roles, &keys, 1, &measured)?;
        let perturbed = cellkey::perturbed(answer, &roles, reads, &tables, &tops)?;
        keep_released(&perturbed, &verdicts)?
    } else {
        rounded_release(batch, &roles, rules, &verdicts)?
    };
    let columns: Vec<StateColumn> = answer
        .columns
        .iter()
        .filter(|c| !c.stays())
        .cloned()
        .collect();
    // Curves and histograms are rounded cumulatively, whichever method protects the rest; no
    // bin of a histogram shows fewer rows than a cell may.
    let (base, least, ends) = if rules.is_unprotected() {
        (1, 0, 0)
    } else {
        (
            rules.survival.rounding_base,
            rules.survival.least_cumulative,
            rules.min_patients,
        )
    };
    let batch = super::survival::round_curves(&batch, &columns, base, least, ends)?;
    Ok(Protected {
        batch,
        columns,
        report,
    })
}

pub(super) fn column_as_i64(
    batch: &RecordBatch,
    index: usize,
) -> Result<Vec<Option<i64>>, ReleaseError> {
    let array = cast(batch.column(index), &DataType::Int64)
        .map_err(|_| internal("a count column is not numeric"))?;
    Ok(array.as_primitive::<Int64Type>().iter().collect())
}

pub(super) fn column_as_f64(array: &ArrayRef) -> Result<Vec<Option<f64>>, ReleaseError> {
    let array =
        cast(array, &DataType::Float64).map_err(|_| internal("a sum column is not numeric"))?;
    Ok(array.as_primitive::<Float64Type>().iter().collect())
}

/// For each sum column, the sum of the `n` largest per-patient contributions in each group
/// (the dominance statistic): (column, one value per row).
fn top_contributions(
    answer: &PartialAnswer,
    roles: &[Role],
    keys: &[usize],
    n: u32,
    measured: &[Role],
) -> Result<Tops, ReleaseError> {
    let sums: Vec<(usize, usize)> = roles
        .iter()
        .enumerate()
        .filter(|(_, r)| measured.contains(r))
        .map(|(c, _)| {
            answer.columns[c]
                .aggregate
                .map(|a| (c, a))
                .ok_or(internal("a sum belongs to no aggregate"))
        })
        .collect::<Result<_, _>>()?;
    if sums.is_empty() {
        return Ok(Vec::new());
    }
    let Some(Contributions {
        batch: rows,
        aggregates,
    }) = &answer.contributions
    else {
        return Err(internal("a sum has no per-patient contributions"));
    };
    let batch = &answer.batch;
    if rows.num_columns() != keys.len() + 1 + aggregates.len() {
        return Err(internal("the contributions do not match the answer's keys"));
    }
    // Match groups by their keys, encoded alike on both sides. Without keys there is one
    // group, and the row encoding (which cannot count rows of no columns) is not needed.
    let contribution_keys = keys
        .iter()
        .enumerate()
        .map(|(k, &i)| cast(rows.column(k), batch.column(i).data_type()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| internal("contribution keys do not match the answer's"))?;
    let answer_keys: Vec<ArrayRef> = keys.iter().map(|&i| Arc::clone(batch.column(i))).collect();
    let (answer_rows, contribution_rows) = (
        group_codes(&answer_keys, batch.num_rows())?,
        group_codes(&contribution_keys, rows.num_rows())?,
    );
    let first = keys.len() + 1;
    let values = (0..aggregates.len())
        .map(|j| column_as_f64(rows.column(first + j)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut by_group: HashMap<Vec<u8>, Vec<Vec<f64>>> = HashMap::new();
    for row in 0..rows.num_rows() {
        let entry = by_group
            .entry(contribution_rows[row].clone())
            .or_insert_with(|| vec![Vec::new(); aggregates.len()]);
        for (j, v) in values.iter().enumerate() {
            if let Some(v) = v[row] {
                entry[j].push(v.abs());
            }
        }
    }
    sums.into_iter()
        .map(|(column, aggregate)| {
            let j = aggregates
                .iter()
                .position(|a| *a == aggregate)
                .ok_or(internal("a sum has no per-patient contributions"))?;
            let tops = (0..batch.num_rows())
                .map(|row| {
                    by_group.get(&answer_rows[row]).map(|lists| {
                        let mut list = lists[j].clone();
                        list.sort_by(|a, b| b.total_cmp(a));
                        list.iter().take(n as usize).sum::<f64>()
                    })
                })
                .collect();
            Ok((column, tops))
        })
        .collect()
}

/// Each row's group keys as comparable bytes (empty for every row when there are no keys).
fn group_codes(keys: &[ArrayRef], rows: usize) -> Result<Vec<Vec<u8>>, ReleaseError> {
    if keys.is_empty() {
        return Ok(vec![Vec::new(); rows]);
    }
    let fields = keys
        .iter()
        .map(|k| SortField::new(k.data_type().clone()))
        .collect();
    let converter = RowConverter::new(fields).map_err(|_| internal("keys not comparable"))?;
    let encoded = converter
        .convert_columns(keys)
        .map_err(|_| internal("keys not comparable"))?;
    Ok((0..rows)
        .map(|r| encoded.row(r).as_ref().to_vec())
        .collect())
}

/// A group whose largest contributions exceed `k` percent of a sum is withheld.
fn withhold_dominated(
    batch: &RecordBatch,
    tops: &Tops,
    k: f64,
    verdicts: &mut [Verdict],
) -> Result<(), ReleaseError> {
    for (column, tops) in tops {
        let sums = column_as_f64(batch.column(*column))?;
        for (row, verdict) in verdicts.iter_mut().enumerate() {
            if *verdict != Verdict::Release {
                continue;
            }
            if let (Some(total), Some(largest)) = (sums[row], tops[row]) {
                let total = total.abs();
                if total > 0.0 && largest.abs() / total * 100.0 > k {
                    *verdict = Verdict::Dominated;
                }
            }
        }
    }
    Ok(())
}

/// A group that holds every patient of its margin (a 100% cell) is withheld. Hash buckets keep
/// this linear in the number of groups (a pairwise scan took most of a node's time on a few
/// thousand groups).
fn withhold_whole_margins(groups: &Groups, verdicts: &mut [Verdict]) {
    let rows = verdicts.len();
    let n = groups.n;
    // Rows that differ only at key k share a bucket; a bucket of one is a 100% cell (its
    // siblings at k are all 0%). Each (row, k) remembers its bucket's position.
    let mut buckets: HashMap<Bucket, usize, RandomState> = HashMap::default();
    let mut sizes: Vec<usize> = Vec::new();
    let mut bucket_of = vec![usize::MAX; rows * n];
    for row in 0..rows {
        let grouped = groups.grouped[row];
        for k in (0..n).filter(|&k| groups.is_grouped(row, k)) {
            let bucket = (grouped, k, groups.project(row, grouped & !(1 << k)));
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
            .filter(|&k| groups.is_grouped(row, k))
            .any(|k| sizes.get(bucket_of[row * n + k]) == Some(&1));
        if alone {
            *verdict = Verdict::WholeMargin;
        }
    }
}

/// Subtotals and totals of anything withheld are withheld too: project every withheld row onto
/// each coarser grouping present, then look each released row up.
fn withhold_margins_of_withheld(groups: &Groups, verdicts: &mut [Verdict]) {
    let masks: HashSet<u64, RandomState> = groups.grouped.iter().copied().collect();
    let mut margins: HashSet<(u64, Vec<u32>), RandomState> = HashSet::default();
    for w in (0..verdicts.len()).filter(|&r| verdicts[r] != Verdict::Release) {
        let grouped = groups.grouped[w];
        for &mask in &masks {
            // Coarser: a proper subset of the withheld row's grouped keys.
            if mask != grouped && mask & !grouped == 0 {
                margins.insert((mask, groups.project(w, mask)));
            }
        }
    }
    if margins.is_empty() {
        return;
    }
    for (a, verdict) in verdicts.iter_mut().enumerate() {
        let grouped = groups.grouped[a];
        if *verdict == Verdict::Release && margins.contains(&(grouped, groups.project(a, grouped)))
        {
            *verdict = Verdict::MarginOfWithheld;
        }
    }
}

/// The released rows, counts rounded.
fn rounded_release(
    batch: &RecordBatch,
    roles: &[Role],
    rules: &Disclosure,
    verdicts: &[Verdict],
) -> Result<RecordBatch, ReleaseError> {
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(roles.len());
    let mut fields = Vec::with_capacity(roles.len());
    for (index, role) in roles.iter().enumerate() {
        let column = batch.column(index);
        match role {
            // Thresholds' and perturbation's input only: it stays at the trust.
            Role::AggregatePatients | Role::CellKey => continue,
            Role::Count | Role::Patients | Role::Moment(Moment::Count) => {
                let rounded: Int64Array = column_as_i64(batch, index)?
                    .into_iter()
                    .map(|v| v.map(|x| round(x, rules)))
                    .collect();
                // Back to the accumulator's own type, so DataFusion can merge the state.
                let rounded = cast(&rounded, column.data_type())
                    .map_err(|_| internal("could not restore a count's type"))?;
                columns.push(rounded);
            }
            _ => columns.push(Arc::clone(column)),
        }
        fields.push(batch.schema().field(index).clone());
    }
    let schema = Schema::new(fields);
    let rounded = RecordBatch::try_new(Arc::new(schema), columns)
        .map_err(|_| internal("could not rebuild the answer"))?;
    keep_released(&rounded, verdicts)
}

/// The rows whose verdict is to release them.
fn keep_released(batch: &RecordBatch, verdicts: &[Verdict]) -> Result<RecordBatch, ReleaseError> {
    let keep: BooleanArray = verdicts
        .iter()
        .map(|v| Some(*v == Verdict::Release))
        .collect();
    filter_record_batch(batch, &keep).map_err(|_| internal("could not filter the answer"))
}

/// Rounds a count as the policy says.
pub fn round(x: i64, rules: &Disclosure) -> i64 {
    round_count(x, rules.rounding, rules.rounding_base)
}

/// Rounds a count: to the nearest multiple of `base`, by midpoint-6, or not at all. The
/// coordinator's totals use the same arithmetic as an expression
/// ([`crate::TotalsRules::rounded`]); a test keeps the two equal.
pub fn round_count(x: i64, rounding: Rounding, base: u64) -> i64 {
    match rounding {
        Rounding::None => x,
        Rounding::Base => {
            let base = base.max(1) as i64;
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
    roles: &[Role],
    keys: &[usize],
) -> Result<Vec<u64>, ReleaseError> {
    let n = keys.len();
    let all = (0..n).fold(0u64, |mask, j| mask | (1 << j));
    if let Some(index) = roles.iter().position(|r| *r == Role::GroupingId) {
        let ids = cast(batch.column(index), &DataType::UInt64)
            .map_err(|_| internal("grouping id is not an integer"))?;
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
fn key_ids(batch: &RecordBatch, keys: &[usize]) -> Result<Vec<u32>, ReleaseError> {
    let rows = batch.num_rows();
    let n = keys.len();
    let mut ids = vec![0u32; rows * n];
    for (j, &k) in keys.iter().enumerate() {
        let column = batch.column(k);
        let converter = RowConverter::new(vec![SortField::new(column.data_type().clone())])
            .map_err(|_| internal("key not comparable"))?;
        let encoded = converter
            .convert_columns(std::slice::from_ref(column))
            .map_err(|_| internal("key not comparable"))?;
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
