//! Categorical distributions, and the Simulacrum marginals the generator is calibrated on.

use std::collections::{BTreeMap, HashSet};

use rand::Rng;

/// The Simulacrum v1.2 value counts of each tumour field (Health Data Insight, CC BY 4.0).
const VALUE_COUNTS: &str = include_str!("../data/tumour_value_counts_v1.2.csv");

/// A categorical distribution over optional string values (`None` is a null).
#[derive(Debug, Clone)]
pub struct Categorical {
    values: Vec<Option<String>>,
    cumulative: Vec<u64>,
}

impl Categorical {
    /// From `(value, weight)` pairs; zero weights are dropped.
    pub fn new(pairs: impl IntoIterator<Item = (Option<String>, u64)>) -> Self {
        let mut values = Vec::new();
        let mut cumulative = Vec::new();
        let mut total = 0u64;
        for (value, weight) in pairs {
            if weight == 0 {
                continue;
            }
            total += weight;
            values.push(value);
            cumulative.push(total);
        }
        Categorical { values, cumulative }
    }

    /// From literal `(code, weight)` pairs.
    pub fn of(pairs: &[(&str, u64)]) -> Self {
        Self::new(pairs.iter().map(|(v, w)| (Some((*v).to_string()), *w)))
    }

    /// Sum of weights.
    pub fn total(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }

    /// Draws one value (`None` for a null or an empty distribution).
    pub fn sample<R: Rng>(&self, rng: &mut R) -> Option<&str> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let x = rng.random_range(0..total);
        let index = self.cumulative.partition_point(|&c| c <= x);
        self.values.get(index).and_then(|v| v.as_deref())
    }

    /// Each value's probability.
    pub fn probabilities(&self) -> BTreeMap<Option<String>, f64> {
        let total = self.total() as f64;
        let mut previous = 0;
        let mut out = BTreeMap::new();
        for (value, &c) in self.values.iter().zip(&self.cumulative) {
            *out.entry(value.clone()).or_insert(0.0) += (c - previous) as f64 / total;
            previous = c;
        }
        out
    }

    /// Only the values kept by `keep` (renormalised).
    pub fn filtered(&self, keep: impl Fn(Option<&str>) -> bool) -> Self {
        let mut previous = 0;
        let mut pairs = Vec::new();
        for (value, &c) in self.values.iter().zip(&self.cumulative) {
            if keep(value.as_deref()) {
                pairs.push((value.clone(), c - previous));
            }
            previous = c;
        }
        Self::new(pairs)
    }

    /// Iterates `(value, weight)`.
    pub fn weights(&self) -> impl Iterator<Item = (Option<&str>, u64)> {
        let mut previous = 0;
        self.values
            .iter()
            .zip(&self.cumulative)
            .map(move |(v, &c)| {
                let w = c - previous;
                previous = c;
                (v.as_deref(), w)
            })
    }
}

/// The reference marginals, one per Simulacrum tumour field (upper-case field name).
#[derive(Debug, Clone)]
pub struct Reference {
    columns: BTreeMap<String, Vec<(Option<String>, u64)>>,
}

impl Reference {
    /// Parses the embedded value counts.
    pub fn load() -> Self {
        let mut columns: BTreeMap<String, Vec<(Option<String>, u64)>> = BTreeMap::new();
        for line in VALUE_COUNTS.lines().skip(1) {
            let mut parts = line.splitn(3, ',');
            let (Some(column), Some(value), Some(count)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let Ok(count) = count.trim().parse::<u64>() else {
                continue;
            };
            let value = (value != "None").then(|| value.to_string());
            columns
                .entry(column.to_string())
                .or_default()
                .push((value, count));
        }
        Reference { columns }
    }

    /// A field's marginal as reported (nulls included).
    pub fn marginal(&self, column: &str) -> Categorical {
        Categorical::new(self.columns.get(column).cloned().unwrap_or_default())
    }

    /// A field's marginal restricted to a code set (nulls kept, foreign codes dropped).
    pub fn marginal_in(&self, column: &str, codes: &HashSet<&str>) -> Categorical {
        self.marginal(column)
            .filtered(|v| v.is_none_or(|code| codes.contains(code)))
    }
}
