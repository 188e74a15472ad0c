//! Pool-then-protect (issue 17): the members of a pool send their unprotected states as one
//! dense vector over the public cells of the query's keys, masked so that only the sum over
//! every member means anything; the coordinator adds the vectors, and [`release_pooled`] then
//! protects the pooled total once, with the pool's own `[disclosure]` rules.
//!
//! The plaintext vector never exists outside this module: [`contribute`] encodes and masks in
//! one step. Every member derives the same cells from the schema's public code sets (never from
//! which groups its data holds), so the vector's length and order tell nothing.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Int64Array, RecordBatch, UInt64Array};
use arrow::compute::{cast, filter_record_batch};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, UInt64Type};
use arrow::row::{RowConverter, SortField};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use trustql_pool::{Layout, MaskContext, PoolPublicKey, PoolSecret, decode_count, encode_count};

use crate::grid::{self, public_grid};
use crate::policy::{CellKeyRules, Disclosure, Method, ProjectPool, Rounding};
use crate::refusal::{Refusal, Rule};
use crate::release::sdc::{self, internal};
use crate::release::{
    AnswerProtection, PartialAnswer, Release, ReleaseError, ReleaseReport, Role, SdcNeeds,
    StateColumn,
};

/// The pooled protection every member must share: its hash is bound into the masks, so
/// members whose policies disagree get garbage and the coordinator's canary check fails.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolParameters {
    /// The project.
    pub project: String,
    /// The members' codes, sorted.
    pub members: Vec<String>,
    /// Rounding or the cell-key method.
    pub method: Method,
    /// The cell-key method's tables.
    pub cell_key: CellKeyRules,
    /// Fewest distinct patients a pooled cell needs (summed over members).
    pub min_patients: u64,
    /// Rounding of pooled counts.
    pub rounding: Rounding,
    /// Base for `rounding = "base"`.
    pub rounding_base: u64,
    /// The 0%/100% rule.
    pub withhold_whole_margin_cells: bool,
    /// The most cells a pooled query may have.
    pub max_cells: usize,
}

impl PoolParameters {
    /// The parameters of `project`'s pool under this trust's `[disclosure]`.
    pub fn new(
        project: &str,
        pool: &ProjectPool,
        disclosure: &Disclosure,
        max_cells: usize,
    ) -> Self {
        let mut members = pool.members.clone();
        members.sort();
        members.dedup();
        PoolParameters {
            project: project.to_string(),
            members,
            method: disclosure.method,
            cell_key: disclosure.cell_key,
            min_patients: disclosure.min_patients,
            rounding: disclosure.rounding,
            rounding_base: disclosure.rounding_base,
            withhold_whole_margin_cells: disclosure.withhold_whole_margin_cells,
            max_cells,
        }
    }

    /// Parses the parameters a member sent.
    pub fn from_json(text: &str) -> Result<Self, ReleaseError> {
        serde_json::from_str(text).map_err(|_| internal("malformed pool parameters"))
    }

    /// The cell-key tables the pooled total is perturbed with, if it is.
    pub fn cell_key_meta(&self) -> Option<trustql_protocol::CellKeyMeta> {
        (self.method == Method::CellKey).then(|| self.cell_key.meta())
    }

    /// How the pooled total is protected, for the federation's totals rules.
    pub fn protection(&self) -> AnswerProtection {
        match self.method {
            Method::CellKey => AnswerProtection::CellKey,
            Method::Rounding => AnswerProtection::Sdc,
        }
    }

    /// The rules the pooled total is protected by.
    fn disclosure(&self) -> Disclosure {
        Disclosure {
            method: self.method,
            cell_key: self.cell_key,
            min_patients: self.min_patients,
            rounding: self.rounding,
            rounding_base: self.rounding_base,
            dominance: None,
            withhold_whole_margin_cells: self.withhold_whole_margin_cells,
            query_allowance: None,
            survival: crate::policy::SurvivalRules::default(),
        }
    }

    /// What a researcher is told the pooled protection did.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = vec![format!(
            "pooled over {}: the trusts added their exact counts under pairwise masks (the \
             coordinator saw only the total) and protection was applied once, to the total; a \
             patient treated at two trusts is counted at both",
            self.members.join(", ")
        )];
        if self.min_patients > 1 {
            notes.push(format!(
                "pooled cells with fewer than {} patients across the pool are withheld",
                self.min_patients
            ));
        }
        match (self.method, self.rounding) {
            (Method::CellKey, _) => notes.push(format!(
                "pooled counts are perturbed by the cell-key method: each moved by at most {}, \
                 with no bias, the same patients always giving the same numbers",
                self.cell_key.counts.max_adjustment
            )),
            (_, Rounding::Base) => notes.push(format!(
                "pooled counts are rounded to the nearest {}",
                self.rounding_base
            )),
            (_, Rounding::Midpoint6) => {
                notes.push("pooled counts are rounded by midpoint-6".into())
            }
            (_, Rounding::None) => {}
        }
        notes
    }
}

/// What a pooled query needs besides the SDC needs: the pool's parameters and every key's
/// public codes (a null cell follows each key's codes).
#[derive(Debug, Clone, PartialEq)]
pub struct PoolNeeds {
    /// The pooled protection.
    pub parameters: PoolParameters,
    /// Per GROUP BY key, its public codes.
    pub domain: Vec<Vec<String>>,
}

/// One column of a pooled answer, as every member lays it out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PooledColumn {
    /// What the column is.
    pub column: StateColumn,
    /// Its Arrow type, as Arrow writes it.
    pub data_type: String,
    /// For a key: its public codes (the cells are these and null).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codes: Option<Vec<String>>,
}

/// The shape of a pooled vector: the columns, cell by cell (the keys' product, the last key
/// fastest), one word per non-key column in each cell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PooledLayout {
    /// The partial answer's columns, in its order.
    pub columns: Vec<PooledColumn>,
    /// Per aggregate, whose patients it reads (see [`crate::SdcNeeds::reads`]).
    pub reads: Vec<Option<usize>>,
}

impl PooledLayout {
    fn keys(&self) -> impl Iterator<Item = &PooledColumn> {
        self.columns.iter().filter(|c| c.codes.is_some())
    }

    fn states(&self) -> usize {
        self.columns.len() - self.keys().count()
    }

    /// The cells: every combination of every key's codes and null.
    fn cells(&self) -> Result<usize, ReleaseError> {
        let domain: Vec<Vec<String>> = self.keys().filter_map(|k| k.codes.clone()).collect();
        grid::cells(&domain).ok_or(internal("too many pooled cells"))
    }

    fn words(&self) -> Result<usize, ReleaseError> {
        self.cells()?
            .checked_mul(self.states())
            .ok_or(internal("too many pooled cells"))
    }
}

/// Whether a trust may contribute a question to the pool `members`, given the member set it
/// first contributed that question to (`recorded`): only to that one, ever. A second set would
/// let the coordinator subtract one pooled total from another and get a member's numbers.
/// `Ok(true)` when the set is new and must be recorded before anything is sent.
pub fn bind_pool(recorded: Option<&[String]>, members: &[String]) -> Result<bool, Refusal> {
    match recorded {
        None => Ok(true),
        Some(set) if set == members => Ok(false),
        Some(set) => Err(Refusal::new(
            Rule::Pool,
            format!(
                "this trust already contributed this question to the pool {}; it answers a \
                 question for one member set only (another would let two pooled totals be \
                 subtracted), whatever the policy now lists",
                set.join(", ")
            ),
        )),
    }
}

/// SHA-256 of a pooled text (the parameters' or the layout's JSON), as the masks bind it.
pub fn pool_hash(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

/// What a member sends for a pooled query: its masked words and the texts every member must
/// agree on.
#[derive(Debug, Clone, PartialEq)]
pub struct PooledContribution {
    /// The states, cell by cell, and the canary, under this member's mask.
    pub words: Vec<u64>,
    /// The pool's parameters (JSON).
    pub parameters: String,
    /// The cell layout (JSON).
    pub layout: String,
}

/// Who is pooling and under which round.
#[derive(Debug, Clone, Copy)]
pub struct PoolRound<'a> {
    /// The member's own code.
    pub own: &'a str,
    /// Its secret key.
    pub secret: &'a PoolSecret,
    /// Every other member's pinned public key.
    pub peers: &'a [(String, PoolPublicKey)],
    /// The request (the same at every member).
    pub request_id: &'a str,
    /// The query text (the same at every member), so one round's masks serve one question.
    pub sql: &'a str,
}

/// Encodes `answer` over the pool's public cells and masks it for `round`: the only form in
/// which a pooled project's states leave a trust.
pub fn contribute(
    sdc: &SdcNeeds,
    answer: &PartialAnswer,
    round: PoolRound<'_>,
) -> Result<PooledContribution, ReleaseError> {
    let needs = sdc.pool.as_ref().ok_or(internal(
        "a pooled contribution for a query that is not pooled",
    ))?;
    let (layout, values) = encode(needs, &sdc.reads, answer)?;
    let parameters = serde_json::to_string(&needs.parameters)
        .map_err(|_| internal("could not write the pool's parameters"))?;
    let layout_text = serde_json::to_string(&layout)
        .map_err(|_| internal("could not write the pool's layout"))?;
    let context = MaskContext::new(
        needs.parameters.project.clone(),
        round.request_id,
        hex(&pool_hash(round.sql)),
        needs.parameters.members.clone(),
        pool_hash(&layout_text),
        pool_hash(&parameters),
    )
    .map_err(|e| ReleaseError::Pool(e.to_string()))?;
    let words = Layout::new(values.len())
        .and_then(|l| {
            l.masked_contribution(&values, round.secret, round.own, round.peers, &context)
        })
        .map_err(|e| ReleaseError::Pool(e.to_string()))?;
    Ok(PooledContribution {
        words,
        parameters,
        layout: layout_text,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The answer's states as words over every public cell, and the layout that says how.
fn encode(
    needs: &PoolNeeds,
    reads: &[Option<usize>],
    answer: &PartialAnswer,
) -> Result<(PooledLayout, Vec<u64>), ReleaseError> {
    let batch = &answer.batch;
    if answer.columns.len() != batch.num_columns() {
        return Err(internal("column descriptions do not match the answer"));
    }
    let keys: Vec<usize> = (0..answer.columns.len())
        .filter(|&i| answer.columns[i].role() == Role::Key)
        .collect();
    if keys.len() != needs.domain.len() {
        return Err(internal("a pooled key without its public codes"));
    }
    let mut columns = Vec::with_capacity(answer.columns.len());
    let mut domain = needs.domain.iter();
    for (i, column) in answer.columns.iter().enumerate() {
        let codes = match column.role() {
            Role::Key => Some(
                domain
                    .next()
                    .cloned()
                    .ok_or(internal("a key without codes"))?,
            ),
            Role::GroupingId => return Err(internal("grouping sets in a pooled answer")),
            _ => None,
        };
        columns.push(PooledColumn {
            column: column.clone(),
            data_type: batch.column(i).data_type().to_string(),
            codes,
        });
    }
    let layout = PooledLayout {
        columns,
        reads: reads.to_vec(),
    };
    let cells = layout.cells()?;
    if cells > needs.parameters.max_cells {
        return Err(internal("more pooled cells than the pool allows"));
    }
    let states: Vec<usize> = (0..answer.columns.len())
        .filter(|i| !keys.contains(i))
        .collect();
    let mut words = vec![0u64; layout.words()?];
    let cell_of = cell_index(batch, &keys, &needs.domain)?;
    let state_words: Vec<Vec<u64>> = states
        .iter()
        .map(|&s| to_words(batch.column(s)))
        .collect::<Result<_, _>>()?;
    for (row, cell) in cell_of.iter().enumerate() {
        for (s, values) in state_words.iter().enumerate() {
            let word = &mut words[cell * states.len() + s];
            *word = word.wrapping_add(values[row]);
        }
    }
    Ok((layout, words))
}

/// Each row's cell: its keys' position in the grid of public codes.
fn cell_index(
    batch: &RecordBatch,
    keys: &[usize],
    domain: &[Vec<String>],
) -> Result<Vec<usize>, ReleaseError> {
    if keys.is_empty() {
        return Ok(vec![0; batch.num_rows()]);
    }
    let types: Vec<DataType> = keys
        .iter()
        .map(|&k| batch.column(k).data_type().clone())
        .collect();
    let grid =
        public_grid(domain, &types).map_err(|_| internal("a key's codes do not fit its type"))?;
    let converter = RowConverter::new(types.into_iter().map(SortField::new).collect())
        .map_err(|_| internal("could not compare pooled keys"))?;
    let all = converter
        .convert_columns(&grid)
        .map_err(|_| internal("could not compare pooled keys"))?;
    let index: HashMap<&[u8], usize> = (0..all.num_rows())
        .map(|r| (all.row(r).data(), r))
        .collect();
    let present: Vec<ArrayRef> = keys.iter().map(|&k| Arc::clone(batch.column(k))).collect();
    let present = converter
        .convert_columns(&present)
        .map_err(|_| internal("could not compare pooled keys"))?;
    (0..batch.num_rows())
        .map(|r| {
            // The node checked its data against the code sets when it opened: a value outside
            // them is a fault, and says nothing to anyone.
            index
                .get(present.row(r).data())
                .copied()
                .ok_or(internal("a group outside its keys' public codes"))
        })
        .collect()
}

/// A state column as words of Z_2^64: counts in two's complement, cell keys as they are.
fn to_words(array: &ArrayRef) -> Result<Vec<u64>, ReleaseError> {
    match array.data_type() {
        DataType::UInt64 => Ok(array
            .as_primitive::<UInt64Type>()
            .iter()
            .map(|v| v.unwrap_or(0))
            .collect()),
        t if t.is_integer() => {
            let wide = cast(array, &DataType::Int64).map_err(|_| internal("a pooled count"))?;
            Ok(wide
                .as_primitive::<Int64Type>()
                .iter()
                .map(|v| encode_count(v.unwrap_or(0)))
                .collect())
        }
        _ => Err(internal("a pooled state that is not a count")),
    }
}

/// Protects the pooled total `sum` (every member's words added, the canary checked and
/// dropped) under the pool's `parameters`, laid out as `layout` says: the pooled counterpart
/// of [`crate::release`], applied once by the coordinator.
pub fn release_pooled(
    parameters: &PoolParameters,
    layout: &str,
    sum: &[u64],
) -> Result<Release, ReleaseError> {
    let layout: PooledLayout =
        serde_json::from_str(layout).map_err(|_| internal("malformed pool layout"))?;
    let (cells, states) = (layout.cells()?, layout.states());
    if cells > parameters.max_cells || sum.len() != layout.words()? {
        return Err(internal("the pooled total does not fit its layout"));
    }
    let types: Vec<DataType> = layout
        .columns
        .iter()
        .map(|c| DataType::from_str(&c.data_type).map_err(|_| internal("a pooled column's type")))
        .collect::<Result<_, _>>()?;
    let key_types: Vec<DataType> = layout
        .columns
        .iter()
        .zip(&types)
        .filter(|(c, _)| c.codes.is_some())
        .map(|(_, t)| t.clone())
        .collect();
    let domain: Vec<Vec<String>> = layout.keys().filter_map(|k| k.codes.clone()).collect();
    let mut grid = public_grid(&domain, &key_types)
        .map_err(|_| internal("a key's codes do not fit its type"))?
        .into_iter();
    let mut arrays: Vec<ArrayRef> = Vec::with_capacity(layout.columns.len());
    let mut state = 0;
    for (column, data_type) in layout.columns.iter().zip(&types) {
        if column.codes.is_some() {
            arrays.push(grid.next().ok_or(internal("a pooled key"))?);
            continue;
        }
        let s = state;
        state += 1;
        let words = (0..cells).map(|cell| sum[cell * states + s]);
        let array: ArrayRef = if *data_type == DataType::UInt64 {
            Arc::new(UInt64Array::from_iter_values(words))
        } else {
            let counts: ArrayRef = Arc::new(Int64Array::from_iter_values(words.map(decode_count)));
            cast(&counts, data_type)
                .map_err(|_| internal("a pooled count does not fit its type"))?
        };
        arrays.push(array);
    }
    let fields: Vec<Field> = layout
        .columns
        .iter()
        .zip(&types)
        .map(|(c, t)| Field::new(&c.column.name, t.clone(), true))
        .collect();
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
        .map_err(|_| internal("the pooled columns do not fit together"))?;
    // A cell no member's patients fall in is no group, as in a central database.
    let patients = layout
        .columns
        .iter()
        .position(|c| c.column.role() == Role::Patients)
        .ok_or(internal("no pooled patient count"))?;
    let present = arrow::compute::kernels::cmp::gt(
        &cast(batch.column(patients), &DataType::Int64).map_err(|_| internal("patients"))?,
        &Int64Array::new_scalar(0),
    )
    .map_err(|_| internal("patients"))?;
    let batch = filter_record_batch(&batch, &present).map_err(|_| internal("patients"))?;
    let answer = PartialAnswer {
        batch,
        columns: layout.columns.iter().map(|c| c.column.clone()).collect(),
        contributions: None,
    };
    let protected = sdc::protect_with(
        &answer,
        &parameters.disclosure(),
        &layout.reads,
        parameters.max_cells,
    )?;
    Ok(Release {
        batch: protected.batch,
        columns: protected.columns,
        report: ReleaseReport::Sdc(protected.report),
    })
}
