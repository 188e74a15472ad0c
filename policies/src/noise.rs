//! Differential privacy's release side: OpenDP noise on one trust's partial states.
//!
//! The node hands over one row per group (keys, distinct patients, count and sum states) with
//! how much one patient can change each state column over all groups together (its L1
//! sensitivity, from [`crate::bound_contributions`]). The query's ε is split evenly over the
//! columns, and OpenDP's Laplace mechanism adds the noise. Which groups are released depends on
//! the keys: when every key has a public code set, every combination of codes is released,
//! present in the data or not, so a group's presence says nothing; otherwise a group is
//! released only when its noisy patient count passes a threshold that OpenDP calibrates to δ.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, Int64Array, RecordBatch, UInt32Array};
use arrow::compute::{cast, concat, take};
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use arrow::row::{RowConverter, SortField};
use opendp::domains::{AtomDomain, MapDomain, VectorDomain};
use opendp::error::Fallible;
use opendp::measurements::{make_laplace, make_laplace_threshold};
use opendp::measures::{Approximate, MaxDivergence};
use opendp::metrics::{AbsoluteDistance, L0PInfDistance, L1Distance};

use crate::error::PolicyError;

/// How the groups to release are chosen.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Selection<'a> {
    /// Every key has a public code set: every combination of codes (and null) is released.
    Public(&'a [Vec<String>]),
    /// A group is released when its noisy patient count passes a threshold calibrated to δ.
    Threshold,
}

/// One column that gets noise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Noisy {
    /// Its index in the batch.
    pub column: usize,
    /// How much one patient can change the column, summed over all groups.
    pub sensitivity: f64,
}

/// What one release spent and how noisy it is.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NoiseReport {
    /// ε spent (the sum over the columns, each as OpenDP's privacy map gives it).
    pub epsilon: f64,
    /// δ spent (non-zero only when groups were chosen by threshold).
    pub delta: f64,
    /// Laplace scale of each noisy column, in the order given (standard deviation is
    /// scale × √2).
    pub scales: Vec<f64>,
    /// The noisy patient count a group needed, when groups were chosen by threshold.
    pub threshold: Option<i64>,
    /// Groups released.
    pub released: usize,
}

/// A noisy answer.
#[derive(Debug, Clone)]
pub(crate) struct Released {
    /// The released groups with noisy states.
    pub batch: RecordBatch,
    /// Spend and scales.
    pub report: NoiseReport,
}

/// Adds calibrated noise to `noisy` columns of `batch` and chooses the groups to release.
///
/// `keys` are the GROUP BY columns; `patients` (one of `noisy`) is the distinct-patient count
/// used to choose groups by threshold, where one patient changes at most `max_rows` groups by
/// one. Groups beyond `max_groups` after completing a public domain fall back to a threshold.
#[allow(clippy::too_many_arguments)]
pub(crate) fn add_noise(
    batch: &RecordBatch,
    keys: &[usize],
    patients: usize,
    noisy: &[Noisy],
    max_rows: u64,
    selection: Selection<'_>,
    epsilon: f64,
    delta: f64,
    max_groups: usize,
) -> Result<Released, PolicyError> {
    if noisy.is_empty() || epsilon.is_nan() || epsilon <= 0.0 {
        return Err(PolicyError::Noise("nothing to measure".into()));
    }
    let share = epsilon / noisy.len() as f64;
    let measured = |column: usize| noisy.iter().any(|n| n.column == column);
    let (batch, threshold_mode) = match selection {
        Selection::Public(domain) if !keys.is_empty() => {
            match complete(batch, keys, domain, max_groups)? {
                Some(completed) => (completed, false),
                None => (batch.clone(), true),
            }
        }
        Selection::Public(_) => (batch.clone(), false),
        Selection::Threshold => (batch.clone(), !keys.is_empty()),
    };

    let mut spent = 0.0;
    let mut delta_spent = 0.0;
    let mut threshold = None;
    let mut scales = vec![0.0; noisy.len()];
    let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
    let mut rows: Option<Vec<u32>> = None;

    if threshold_mode {
        // Groups are chosen by the patient count, so it must be among the measured columns.
        let position = noisy
            .iter()
            .position(|n| n.column == patients)
            .ok_or_else(|| PolicyError::Noise("no patient count to choose groups by".into()))?;
        let counts = integers(batch.column(patients))?;
        let l0 = u32::try_from(max_rows).map_err(|_| noise_error("too many rows per patient"))?;
        let (selected, scale, eps, t) = choose_groups(&counts, l0, share, delta)?;
        let mut kept: Vec<(u32, i64)> = selected.into_iter().collect();
        kept.sort_unstable();
        rows = Some(kept.iter().map(|(r, _)| *r).collect());
        columns[patients] = Arc::new(Int64Array::from(
            kept.iter().map(|(_, v)| *v).collect::<Vec<_>>(),
        ));
        spent += eps;
        delta_spent = delta;
        threshold = Some(t);
        scales[position] = scale;
    }
    if let Some(rows) = &rows {
        let indices = UInt32Array::from(rows.clone());
        for (i, column) in columns.iter_mut().enumerate() {
            if !(threshold_mode && i == patients) {
                *column = take(column.as_ref(), &indices, None).map_err(arrow_error)?;
            }
        }
    }
    for (position, n) in noisy.iter().enumerate() {
        if threshold_mode && n.column == patients {
            continue;
        }
        let original = batch.column(n.column).data_type().clone();
        let (values, scale, eps) = laplace_column(&columns[n.column], n.sensitivity, share)?;
        columns[n.column] = cast(&values, &original).map_err(arrow_error)?;
        spent += eps;
        scales[position] = scale;
    }
    // What was not measured says nothing: every column that is neither a key nor noisy is
    // released as null (the patient count, when groups were not chosen by it).
    let released = columns.first().map_or(0, |c| c.len());
    for (i, column) in columns.iter_mut().enumerate() {
        if !keys.contains(&i) && !measured(i) {
            *column = arrow::array::new_null_array(batch.column(i).data_type(), released);
        }
    }
    // The patients column is released with the type it had.
    columns[patients] =
        cast(&columns[patients], batch.column(patients).data_type()).map_err(arrow_error)?;
    let batch = RecordBatch::try_new(batch.schema(), columns).map_err(arrow_error)?;
    Ok(Released {
        batch,
        report: NoiseReport {
            epsilon: spent,
            delta: delta_spent,
            scales,
            threshold,
            released,
        },
    })
}

/// Every combination of the public codes (and null) per key: groups missing from `batch` are
/// added with zero states, and groups outside the domain dropped. `None` when the domain has
/// more than `max_groups` combinations.
fn complete(
    batch: &RecordBatch,
    keys: &[usize],
    domain: &[Vec<String>],
    max_groups: usize,
) -> Result<Option<RecordBatch>, PolicyError> {
    let mut size: usize = 1;
    for codes in domain {
        size = size.saturating_mul(codes.len() + 1);
    }
    if size > max_groups || domain.len() != keys.len() {
        return Ok(None);
    }
    // The full grid, one array per key, in each key's type.
    let types: Vec<_> = keys
        .iter()
        .map(|&k| batch.column(k).data_type().clone())
        .collect();
    let grid = crate::grid::public_grid(domain, &types).map_err(arrow_error)?;
    let fields = keys
        .iter()
        .map(|&k| SortField::new(batch.column(k).data_type().clone()))
        .collect();
    let converter = RowConverter::new(fields).map_err(arrow_error)?;
    let present: Vec<ArrayRef> = keys.iter().map(|&k| Arc::clone(batch.column(k))).collect();
    let present = converter.convert_columns(&present).map_err(arrow_error)?;
    let all = converter.convert_columns(&grid).map_err(arrow_error)?;
    let in_domain: HashSet<&[u8]> = (0..all.num_rows()).map(|r| all.row(r).data()).collect();
    let mut seen = HashSet::new();
    let keep: Vec<u32> = (0..batch.num_rows())
        .filter(|&r| {
            let row = present.row(r);
            in_domain.contains(row.as_ref()) && seen.insert(row.as_ref().to_vec())
        })
        .filter_map(|r| u32::try_from(r).ok())
        .collect();
    let missing: Vec<u32> = (0..size)
        .filter(|&r| !seen.contains(all.row(r).as_ref()))
        .filter_map(|r| u32::try_from(r).ok())
        .collect();
    let keep = UInt32Array::from(keep);
    let missing = UInt32Array::from(missing);
    let zeros = Int64Array::from(vec![0i64; missing.len()]);
    let mut columns = Vec::with_capacity(batch.num_columns());
    for (i, column) in batch.columns().iter().enumerate() {
        let kept = take(column.as_ref(), &keep, None).map_err(arrow_error)?;
        let added = match keys.iter().position(|&k| k == i) {
            Some(g) => take(grid[g].as_ref(), &missing, None).map_err(arrow_error)?,
            None => cast(&zeros, column.data_type()).map_err(arrow_error)?,
        };
        columns.push(concat(&[kept.as_ref(), added.as_ref()]).map_err(arrow_error)?);
    }
    RecordBatch::try_new(batch.schema(), columns)
        .map(Some)
        .map_err(arrow_error)
}

/// Groups whose noisy patient count passes the smallest threshold OpenDP allows for `delta`:
/// (row → noisy count, scale, ε, threshold).
fn choose_groups(
    counts: &[i64],
    l0: u32,
    epsilon: f64,
    delta: f64,
) -> Result<(HashMap<u32, i64>, f64, f64, i64), PolicyError> {
    let data: HashMap<u32, i64> = counts
        .iter()
        .enumerate()
        .filter_map(|(r, c)| u32::try_from(r).ok().map(|r| (r, *c)))
        .collect();
    let l1 = i64::from(l0);
    let d_in = (l0, l1, 1i64);
    let measure = |scale: f64, threshold: i64| {
        make_laplace_threshold::<_, _, Approximate<MaxDivergence>>(
            MapDomain::new(AtomDomain::<u32>::default(), AtomDomain::<i64>::default()),
            L0PInfDistance(AbsoluteDistance::<i64>::default()),
            scale,
            threshold,
            None,
        )
    };
    let scale = calibrate(l1 as f64 / epsilon, epsilon, |s| {
        Ok(measure(s, 1 << 20)?.map(&d_in)?.0)
    })?;
    // The smallest threshold whose δ fits: double, then halve back.
    let delta_of = |t: i64| -> Result<f64, PolicyError> {
        Ok(measure(scale, t)
            .map_err(opendp_error)?
            .map(&d_in)
            .map_err(opendp_error)?
            .1)
    };
    let mut high: i64 = 1;
    while delta_of(high)? > delta {
        high = high
            .checked_mul(2)
            .filter(|h| *h < i64::MAX / 4)
            .ok_or_else(|| noise_error("no threshold meets δ"))?;
    }
    let mut low = high / 2;
    while high - low > 1 {
        let mid = low + (high - low) / 2;
        if delta_of(mid)? > delta {
            low = mid;
        } else {
            high = mid;
        }
    }
    let measurement = measure(scale, high).map_err(opendp_error)?;
    let (eps, _) = measurement.map(&d_in).map_err(opendp_error)?;
    let released = measurement.invoke(&data).map_err(opendp_error)?;
    Ok((released, scale, eps, high))
}

/// Laplace noise on one column: (noisy values as Int64 or Float64, scale, ε spent).
fn laplace_column(
    array: &ArrayRef,
    sensitivity: f64,
    epsilon: f64,
) -> Result<(ArrayRef, f64, f64), PolicyError> {
    let unsigned = array.data_type().is_unsigned_integer();
    if array.data_type().is_integer() {
        let values = integers(array)?;
        let d_in = sensitivity.ceil() as i64;
        let measure = |scale: f64| {
            make_laplace::<_, _, MaxDivergence>(
                VectorDomain::new(AtomDomain::<i64>::default()),
                L1Distance::<i64>::default(),
                scale,
                None,
            )
        };
        let scale = calibrate(d_in as f64 / epsilon, epsilon, |s| measure(s)?.map(&d_in))?;
        let measurement = measure(scale).map_err(opendp_error)?;
        let eps = measurement.map(&d_in).map_err(opendp_error)?;
        let mut noisy = measurement.invoke(&values).map_err(opendp_error)?;
        if unsigned {
            // An unsigned state is AVG's count, a denominator: at least 1, so a mean is never
            // infinite (clamping is post-processing and costs no privacy).
            noisy.iter_mut().for_each(|v| *v = (*v).max(1));
        }
        Ok((Arc::new(Int64Array::from(noisy)), scale, eps))
    } else if array.data_type().is_floating() {
        let values: Vec<f64> = cast(array, &DataType::Float64)
            .map_err(arrow_error)?
            .as_primitive::<Float64Type>()
            .iter()
            .map(|v| v.filter(|x| x.is_finite()).unwrap_or(0.0))
            .collect();
        let measure = |scale: f64| {
            make_laplace::<_, _, MaxDivergence>(
                VectorDomain::new(AtomDomain::<f64>::new_non_nan()),
                L1Distance::<f64>::default(),
                scale,
                None,
            )
        };
        let scale = calibrate(sensitivity / epsilon, epsilon, |s| {
            measure(s)?.map(&sensitivity)
        })?;
        let measurement = measure(scale).map_err(opendp_error)?;
        let eps = measurement.map(&sensitivity).map_err(opendp_error)?;
        let noisy = measurement.invoke(&values).map_err(opendp_error)?;
        Ok((Arc::new(Float64Array::from(noisy)), scale, eps))
    } else {
        Err(noise_error("a state of this type cannot be given noise"))
    }
}

/// The smallest scale from `start` up whose ε (from OpenDP's privacy map) is within `target`.
fn calibrate(
    start: f64,
    target: f64,
    epsilon_at: impl Fn(f64) -> Fallible<f64>,
) -> Result<f64, PolicyError> {
    let mut scale = start;
    for _ in 0..20 {
        let eps = epsilon_at(scale).map_err(opendp_error)?;
        if eps <= target {
            return Ok(scale);
        }
        scale *= (eps / target) * (1.0 + 1e-9);
    }
    Err(noise_error("the noise scale could not be calibrated"))
}

/// Integer states as i64, nulls (a group with no values) as 0 so nulls say nothing.
fn integers(array: &ArrayRef) -> Result<Vec<i64>, PolicyError> {
    let values = cast(array, &DataType::Int64).map_err(arrow_error)?;
    Ok(values
        .as_primitive::<Int64Type>()
        .iter()
        .map(|v| v.unwrap_or(0))
        .collect())
}

fn noise_error(why: &str) -> PolicyError {
    PolicyError::Noise(why.to_string())
}

fn opendp_error(e: opendp::error::Error) -> PolicyError {
    PolicyError::Noise(format!("OpenDP: {e}"))
}

fn arrow_error(e: arrow::error::ArrowError) -> PolicyError {
    PolicyError::Noise(format!("arrow: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::StringArray;
    use arrow::datatypes::{Field, Schema};

    fn variance(values: &[f64]) -> f64 {
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (values.len() - 1) as f64
    }

    #[test]
    fn integer_noise_has_the_calibrated_scale() {
        let zeros: ArrayRef = Arc::new(Int64Array::from(vec![0i64; 20_000]));
        let (noisy, scale, eps) = laplace_column(&zeros, 3.0, 0.5).expect("noise");
        assert!((scale - 6.0).abs() < 1e-6, "scale {scale}");
        assert!(eps <= 0.5 + 1e-12);
        let values: Vec<f64> = noisy
            .as_primitive::<Int64Type>()
            .values()
            .iter()
            .map(|v| *v as f64)
            .collect();
        // Laplace(b) has variance 2b²; 20 000 draws put the sample within a few percent.
        let expected = 2.0 * scale * scale;
        let got = variance(&values);
        assert!(
            (got / expected - 1.0).abs() < 0.08,
            "variance {got}, expected {expected}"
        );
        assert!(values.iter().any(|v| *v != 0.0));
    }

    #[test]
    fn float_noise_has_the_calibrated_scale() {
        let zeros: ArrayRef = Arc::new(Float64Array::from(vec![0.0; 20_000]));
        let (noisy, scale, eps) = laplace_column(&zeros, 120.0, 1.0).expect("noise");
        assert!((120.0..120.01).contains(&scale), "scale {scale}");
        assert!(eps <= 1.0 + 1e-12);
        let values: Vec<f64> = noisy.as_primitive::<Float64Type>().values().to_vec();
        let expected = 2.0 * scale * scale;
        let got = variance(&values);
        assert!(
            (got / expected - 1.0).abs() < 0.08,
            "variance {got}, expected {expected}"
        );
    }

    #[test]
    fn unsigned_states_stay_non_negative() {
        let zeros: ArrayRef = Arc::new(arrow::array::UInt64Array::from(vec![0u64; 1000]));
        let (noisy, _, _) = laplace_column(&zeros, 1.0, 0.1).expect("noise");
        assert!(
            noisy
                .as_primitive::<Int64Type>()
                .values()
                .iter()
                .all(|v| *v >= 0)
        );
    }

    fn groups(keys: Vec<&str>, patients: Vec<i64>) -> RecordBatch {
        let schema = Schema::new(vec![
            Field::new("stage", DataType::Utf8, true),
            Field::new("__trustql_patients", DataType::Int64, true),
            Field::new("count(*)[count]", DataType::Int64, true),
        ]);
        RecordBatch::try_new(
            Arc::new(schema),
            vec![
                Arc::new(StringArray::from(keys)),
                Arc::new(Int64Array::from(patients.clone())),
                Arc::new(Int64Array::from(patients)),
            ],
        )
        .expect("batch")
    }

    const NOISY: [Noisy; 2] = [
        Noisy {
            column: 1,
            sensitivity: 1.0,
        },
        Noisy {
            column: 2,
            sensitivity: 1.0,
        },
    ];

    #[test]
    fn public_keys_release_every_code_present_or_not() {
        let domain = vec![vec!["1".to_string(), "2".to_string(), "3".to_string()]];
        // Code "3" and null are absent; "X" is outside the code set and must not appear.
        let batch = groups(vec!["1", "2", "X"], vec![500, 1, 40]);
        let out = add_noise(
            &batch,
            &[0],
            1,
            &NOISY,
            1,
            Selection::Public(&domain),
            1.0,
            1e-8,
            100,
        )
        .expect("release");
        let keys = out.batch.column(0).as_string::<i32>();
        let mut released: Vec<Option<&str>> = keys.iter().collect();
        released.sort();
        assert_eq!(released, vec![None, Some("1"), Some("2"), Some("3")]);
        assert_eq!(out.report.delta, 0.0);
        assert_eq!(out.report.threshold, None);
        assert!(out.report.epsilon <= 1.0 + 1e-12);
        assert_eq!(
            out.report.scales,
            vec![2.0, 2.0],
            "ε is split over two columns"
        );
    }

    #[test]
    fn other_keys_pass_only_above_the_threshold() {
        let batch = groups(vec!["big", "one", "two"], vec![10_000, 1, 2]);
        for _ in 0..50 {
            let out = add_noise(
                &batch,
                &[0],
                1,
                &NOISY,
                1,
                Selection::Threshold,
                1.0,
                1e-8,
                100,
            )
            .expect("release");
            let keys: Vec<Option<&str>> = out.batch.column(0).as_string::<i32>().iter().collect();
            assert_eq!(keys, vec![Some("big")], "rare groups must not be released");
            let threshold = out.report.threshold.expect("a threshold");
            assert!(
                threshold > 10,
                "threshold {threshold} is too low for δ = 1e-8"
            );
            assert_eq!(out.report.delta, 1e-8);
        }
    }

    #[test]
    fn a_patient_in_more_groups_needs_more_noise() {
        let batch = groups(vec!["a"], vec![100]);
        let one = add_noise(
            &batch,
            &[],
            1,
            &NOISY,
            1,
            Selection::Threshold,
            1.0,
            1e-8,
            10,
        )
        .expect("release");
        let noisy = [
            Noisy {
                column: 1,
                sensitivity: 4.0,
            },
            Noisy {
                column: 2,
                sensitivity: 4.0,
            },
        ];
        let four = add_noise(
            &batch,
            &[],
            1,
            &noisy,
            4,
            Selection::Threshold,
            1.0,
            1e-8,
            10,
        )
        .expect("release");
        assert_eq!(four.report.scales[0], 4.0 * one.report.scales[0]);
    }
}
