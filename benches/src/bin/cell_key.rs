//! The cell-key method beside suppression and rounding, on one node: for each panel query,
//! the utility of what each method releases (the mean relative error of every released count
//! and mean against the exact answer of plain DataFusion over the same Parquet, and how many
//! groups each releases) and what the cell-key method adds to the node's time (median node
//! time of each, their ratio, and the split into execution and protection). Also the one-off
//! cost of the record keys, computed when the node opens.
//!
//! `cargo run --release -p trustql-benches --bin cell-key -- --patients 100000 --runs 5`
//!
//! Both nodes read the same Parquet in this process, with the same minimum of 10 patients:
//! one rounds to 5 (`rounding = "base"`, `rounding_base = 5`), the other perturbs by the
//! cell-key method with its built-in tables (`method = "cell_key"`, `rounding = "none"`).
//! After one warm-up each they alternate, each going first in every other run. A query
//! either node refuses is listed as refused, with the refusal's rule. VAR and STDDEV are
//! compared too, on a line of their own below the utility table.
//!
//! The record keys come from a fresh random secret on each run of the binary, so the
//! cell-key errors move a little from one run to the next (each run is one trust's secret).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Float64Type};
use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext};
use trustql_benches::{
    CANCER_PANEL, CELL_KEY, ROUNDING_TO_5, median, ms, one_trust, open_node_with,
    open_node_without_keys, panel_request,
};
use trustql_node::{NodeError, RecordKeySecret, SiteAnswer, SiteEngine};
use trustql_policies::{PATIENT_COUNT_CAP, today};
use trustql_protocol::{AnswerColumn, ColumnKind};
use trustql_schemas::{TrustSchema, table_path};

/// Command-line options.
#[derive(Parser)]
struct Args {
    /// Patients at the trust.
    #[arg(long, default_value_t = 100_000)]
    patients: u64,
    /// Timed runs of each query on each node (and of the record keys).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Where the trust is written (kept for later runs of the same size).
    #[arg(long, default_value = "target/cell-key")]
    out: PathBuf,
}

/// What a released number is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// COUNT's count or COUNT(DISTINCT)'s.
    Count,
    /// The group's distinct-patient count: compared, as a count, only where the rounding
    /// node counts it exactly (at most [`PATIENT_COUNT_CAP`]; past it, thresholds and
    /// rounding need no more, and its released value is the cap).
    Patients,
    /// AVG: its sum state over its count state.
    Mean,
    /// VAR or STDDEV (sample or population) from its count and m2 states.
    Spread {
        /// A standard deviation (else a variance).
        root: bool,
        /// Over n (else over n − 1).
        population: bool,
    },
}

/// One released number per group, and where the exact answer has it.
#[derive(Debug, Clone, PartialEq)]
struct Measure {
    kind: Kind,
    /// Columns of the released batch: the count, the sum and the count, or the count and m2.
    released: Vec<usize>,
    /// Column of the exact answer.
    exact: usize,
}

/// Everything of an answer the comparison needs: its groups' keys, and its measures' values
/// per group.
struct Values {
    measures: Vec<Measure>,
    /// Group key → one value per measure.
    groups: HashMap<String, Vec<f64>>,
}

/// Relative errors summed, by kind.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Errors {
    groups: usize,
    counts: usize,
    count_error: f64,
    means: usize,
    mean_error: f64,
    spreads: usize,
    spread_error: f64,
}

impl Errors {
    fn add(&mut self, other: &Errors) {
        self.groups += other.groups;
        self.counts += other.counts;
        self.count_error += other.count_error;
        self.means += other.means;
        self.mean_error += other.mean_error;
        self.spreads += other.spreads;
        self.spread_error += other.spread_error;
    }

    fn count_mre(&self) -> Option<f64> {
        (self.counts > 0).then(|| self.count_error / self.counts as f64)
    }

    fn mean_mre(&self) -> Option<f64> {
        (self.means > 0).then(|| self.mean_error / self.means as f64)
    }

    fn spread_mre(&self) -> Option<f64> {
        (self.spreads > 0).then(|| self.spread_error / self.spreads as f64)
    }
}

/// The released answer's measures: for each aggregate a count (one `[count]` state, or a
/// finished COUNT(DISTINCT)), a mean (AVG's `[sum]` and `[count]`) or a spread (VAR's or
/// STDDEV's `[count]`, `[mean]` and `[m2]`), then the patient count.
/// The exact answer has the group keys first, each aggregate in the order of the query, and
/// the patient count last (see [`exact_sql`]); aggregates of other shapes are not compared.
fn measures(columns: &[AnswerColumn]) -> Result<Vec<Measure>> {
    let keys = columns.iter().filter(|c| c.kind == ColumnKind::Key).count();
    let mut by_aggregate: BTreeMap<usize, Vec<(usize, &AnswerColumn)>> = BTreeMap::new();
    let mut patients = None;
    for (i, column) in columns.iter().enumerate() {
        match (column.kind, column.aggregate) {
            (ColumnKind::Key, _) => {}
            (ColumnKind::Patients, _) => patients = Some(i),
            (ColumnKind::State | ColumnKind::DistinctCount, Some(a)) => {
                by_aggregate.entry(a).or_default().push((i, column));
            }
            (kind, _) => bail!("cannot compare a column {} of kind {kind:?}", column.name),
        }
    }
    let mut out = Vec::new();
    for (&a, states) in &by_aggregate {
        let suffix = |s: &str| {
            states
                .iter()
                .find(|(_, c)| c.kind == ColumnKind::State && c.name.ends_with(&format!("[{s}]")))
                .map(|(i, _)| *i)
        };
        let exact = keys + a;
        match (states.as_slice(), suffix("count"), suffix("sum")) {
            ([(i, c)], _, _) if c.kind == ColumnKind::DistinctCount => out.push(Measure {
                kind: Kind::Count,
                released: vec![*i],
                exact,
            }),
            ([_], Some(count), None) => out.push(Measure {
                kind: Kind::Count,
                released: vec![count],
                exact,
            }),
            ([_, _], Some(count), Some(sum)) if states[0].1.name.starts_with("avg(") => {
                out.push(Measure {
                    kind: Kind::Mean,
                    released: vec![sum, count],
                    exact,
                });
            }
            ([_, _, _], Some(count), None) => {
                let function = states[0].1.name.split('(').next().unwrap_or_default();
                let (root, population) = match function {
                    "stddev" | "stddev_samp" => (true, false),
                    "stddev_pop" => (true, true),
                    "var" | "var_samp" | "variance" => (false, false),
                    "var_pop" => (false, true),
                    _ => continue,
                };
                let Some(m2) = suffix("m2") else { continue };
                out.push(Measure {
                    kind: Kind::Spread { root, population },
                    released: vec![count, m2],
                    exact,
                });
            }
            _ => {}
        }
    }
    let patients = patients.context("the answer has no patient count")?;
    out.push(Measure {
        kind: Kind::Patients,
        released: vec![patients],
        exact: keys + by_aggregate.len(),
    });
    Ok(out)
}

/// Column `i` of `batch` as numbers.
fn numbers(batch: &RecordBatch, i: usize) -> Result<Vec<Option<f64>>> {
    let values = cast(batch.column(i), &DataType::Float64)?;
    let values = values.as_primitive::<Float64Type>();
    Ok((0..values.len())
        .map(|r| values.is_valid(r).then(|| values.value(r)))
        .collect())
}

/// Each row's group key: its key columns as text (`∅` for null), joined.
fn group_keys(batch: &RecordBatch, keys: &[usize]) -> Result<Vec<String>> {
    let texts = keys
        .iter()
        .map(|&k| cast(batch.column(k), &DataType::Utf8))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((0..batch.num_rows())
        .map(|r| {
            texts
                .iter()
                .map(|t| {
                    let t = t.as_string::<i32>();
                    if t.is_null(r) {
                        "∅".to_string()
                    } else {
                        t.value(r).to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join(" | ")
        })
        .collect())
}

/// A released answer's values per group.
fn released(batch: &RecordBatch, columns: &[AnswerColumn]) -> Result<Values> {
    let measures = measures(columns)?;
    let keys: Vec<usize> = (0..columns.len())
        .filter(|&i| columns[i].kind == ColumnKind::Key)
        .collect();
    let names = group_keys(batch, &keys)?;
    let mut per_measure = Vec::new();
    for m in &measures {
        let values = match m.kind {
            Kind::Count | Kind::Patients => numbers(batch, m.released[0])?,
            Kind::Mean => {
                let (sums, counts) = (
                    numbers(batch, m.released[0])?,
                    numbers(batch, m.released[1])?,
                );
                sums.iter()
                    .zip(&counts)
                    .map(|(s, n)| match (s, n) {
                        (Some(s), Some(n)) if *n != 0.0 => Some(s / n),
                        _ => None,
                    })
                    .collect()
            }
            Kind::Spread { root, population } => {
                let (counts, m2) = (
                    numbers(batch, m.released[0])?,
                    numbers(batch, m.released[1])?,
                );
                counts
                    .iter()
                    .zip(&m2)
                    .map(|(n, m2)| {
                        let n = (*n)? - if population { 0.0 } else { 1.0 };
                        let v = (n > 0.0).then_some((*m2)? / n)?;
                        Some(if root { v.max(0.0).sqrt() } else { v })
                    })
                    .collect()
            }
        };
        per_measure.push(values);
    }
    let groups = names
        .into_iter()
        .enumerate()
        .map(|(r, name)| {
            let values = per_measure
                .iter()
                .map(|v| v[r].unwrap_or(f64::NAN))
                .collect();
            (name, values)
        })
        .collect();
    Ok(Values { measures, groups })
}

/// Relative errors of `released` against the exact answer `exact`, whose first `keys` columns
/// are the group keys; groups are matched by their keys. A value the exact answer has as 0 or
/// null, or the release as null, is not compared.
fn errors(released: &Values, exact: &RecordBatch, keys: usize) -> Result<Errors> {
    let names = group_keys(exact, &(0..keys).collect::<Vec<_>>())?;
    let mut columns = HashMap::new();
    for m in &released.measures {
        if m.exact >= exact.num_columns() {
            bail!("the exact answer has no column {}", m.exact);
        }
        columns.insert(m.exact, numbers(exact, m.exact)?);
    }
    let rows: HashMap<&str, usize> = names
        .iter()
        .enumerate()
        .map(|(r, n)| (n.as_str(), r))
        .collect();
    let mut out = Errors::default();
    for (name, values) in &released.groups {
        let row = *rows
            .get(name.as_str())
            .with_context(|| format!("released group {name} is not in the exact answer"))?;
        out.groups += 1;
        for (m, value) in released.measures.iter().zip(values) {
            let Some(truth) = columns[&m.exact][row] else {
                continue;
            };
            if truth == 0.0 || value.is_nan() {
                continue;
            }
            let error = ((value - truth) / truth).abs();
            match m.kind {
                Kind::Patients if truth > PATIENT_COUNT_CAP as f64 => {}
                Kind::Count | Kind::Patients => {
                    out.counts += 1;
                    out.count_error += error;
                }
                Kind::Mean => {
                    out.means += 1;
                    out.mean_error += error;
                }
                Kind::Spread { .. } => {
                    out.spreads += 1;
                    out.spread_error += error;
                }
            }
        }
    }
    Ok(out)
}

/// `sql` with the distinct patients of its groups added as the last output column: the
/// patient key of the first table after FROM (by its alias, if it has one).
fn exact_sql(sql: &str, schema: &TrustSchema) -> Result<String> {
    let at = sql
        .to_ascii_uppercase()
        .find(" FROM ")
        .context("a query without FROM")?;
    let mut words = sql[at + 6..].split_whitespace();
    let table = words.next().context("FROM without a table")?;
    let alias = match words.next() {
        Some(w) if w.eq_ignore_ascii_case("AS") => words.next(),
        Some(w)
            if !matches!(
                w.to_ascii_uppercase().as_str(),
                "JOIN" | "INNER" | "LEFT" | "RIGHT" | "FULL" | "CROSS" | "WHERE" | "GROUP"
            ) =>
        {
            Some(w)
        }
        _ => None,
    };
    let key = schema
        .patient_column(table)?
        .with_context(|| format!("{table} has no patient column"))?;
    Ok(format!(
        "{}, COUNT(DISTINCT {}.{key}) AS __exact_patients{}",
        &sql[..at],
        alias.unwrap_or(table),
        &sql[at..]
    ))
}

/// One query on one node: its medians, and the utility of its (always identical) answer.
struct Side {
    node: Duration,
    execution: Duration,
    protection: Duration,
    errors: Errors,
}

/// One query of the panel.
enum Outcome {
    Compared {
        exact_groups: usize,
        rounding: Side,
        cell_key: Side,
    },
    Refused {
        by: &'static str,
        rule: &'static str,
        reason: String,
    },
}

/// An answer, or the refusal's rule and reason.
async fn answer(
    engine: &SiteEngine,
    name: &str,
    sql: &str,
) -> Result<Result<SiteAnswer, (&'static str, String)>> {
    match engine.answer(&panel_request(name, sql), today()).await {
        Ok(answer) => Ok(Ok(answer)),
        Err(NodeError::Refused(r)) => Ok(Err((r.rule.name(), r.reason))),
        Err(e) => Err(e).with_context(|| format!("{name}: {sql}")),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let schema = TrustSchema::cancer()?;
    let dir = args.out.join(args.patients.to_string());
    if !dir.join("TQ01/sim_av_tumour.parquet").exists() {
        println!("Generating one trust with {} patients…", args.patients);
        one_trust(&schema, args.patients, &dir)?;
    }
    let rounding = open_node_with(&schema, &dir, "TQ01", ROUNDING_TO_5).await?;
    let start = Instant::now();
    let mut cell_key = open_node_without_keys(&schema, &dir, "TQ01", CELL_KEY).await?;
    let open = start.elapsed();
    // The record keys, once per run (each replaces the last): the one-off cost at open.
    let secret = RecordKeySecret::ephemeral()?;
    let mut keys = Vec::with_capacity(args.runs);
    for _ in 0..args.runs {
        let start = Instant::now();
        cell_key = cell_key.with_record_keys(&secret).await?;
        keys.push(start.elapsed());
    }
    let plain = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(2));
    for table in schema.tables() {
        let path = table_path(&dir.join("TQ01"), &table.name);
        plain
            .register_parquet(
                table.name.as_str(),
                path.to_string_lossy().as_ref(),
                ParquetReadOptions::default(),
            )
            .await?;
    }

    let mut outcomes = Vec::new();
    for (name, sql) in CANCER_PANEL {
        let (first_r, first_c) = (
            answer(&rounding, name, sql).await?,
            answer(&cell_key, name, sql).await?,
        );
        let (first_r, first_c) = match (first_r, first_c) {
            (Ok(r), Ok(c)) => (r, c),
            (Err((rule, reason)), _) => {
                outcomes.push(Outcome::Refused {
                    by: "rounding",
                    rule,
                    reason,
                });
                continue;
            }
            (_, Err((rule, reason))) => {
                outcomes.push(Outcome::Refused {
                    by: "cell key",
                    rule,
                    reason,
                });
                continue;
            }
        };
        let batches = plain
            .sql(&exact_sql(sql, &schema)?)
            .await?
            .collect()
            .await?;
        let exact = datafusion::arrow::compute::concat_batches(
            &batches.first().context("no exact batches")?.schema(),
            &batches,
        )?;
        let keys = first_r
            .meta
            .columns
            .iter()
            .filter(|c| c.kind == ColumnKind::Key)
            .count();
        let utility = |a: &SiteAnswer| -> Result<Errors> {
            errors(&released(&a.batch, &a.meta.columns)?, &exact, keys)
                .with_context(|| format!("{name}: comparing with the exact answer"))
        };
        let (errors_r, errors_c) = (utility(&first_r)?, utility(&first_c)?);

        let mut samples: [Vec<Duration>; 6] = Default::default();
        for run in 0..args.runs {
            let order: [(&SiteEngine, usize); 2] = if run % 2 == 0 {
                [(&rounding, 0), (&cell_key, 3)]
            } else {
                [(&cell_key, 3), (&rounding, 0)]
            };
            for (engine, at) in order {
                let start = Instant::now();
                let a = engine.answer(&panel_request(name, sql), today()).await?;
                samples[at].push(start.elapsed());
                samples[at + 1].push(a.timings.execution);
                samples[at + 2].push(a.timings.protection);
            }
        }
        let [rn, re, rp, cn, ce, cp] = &mut samples;
        outcomes.push(Outcome::Compared {
            exact_groups: exact.num_rows(),
            rounding: Side {
                node: median(rn),
                execution: median(re),
                protection: median(rp),
                errors: errors_r,
            },
            cell_key: Side {
                node: median(cn),
                execution: median(ce),
                protection: median(cp),
                errors: errors_c,
            },
        });
    }

    report(&args, &outcomes, open, &mut keys);
    Ok(())
}

/// A relative error as a percentage, or a dash.
fn percent(e: Option<f64>) -> String {
    e.map_or_else(|| "–".into(), |e| format!("{:.3}%", 100.0 * e))
}

fn report(args: &Args, outcomes: &[Outcome], open: Duration, keys: &mut [Duration]) {
    println!(
        "\nOne trust of {} patients; minimum 10 patients for both; rounding to 5 against the \
         cell-key method's built-in tables.\n",
        args.patients
    );
    println!(
        "Utility: mean relative error of every released count (COUNT, COUNT(DISTINCT), the \
         patient count) and mean (AVG's sum / count) against the exact answer, over the groups \
         each method released.\n"
    );
    println!(
        "| query | groups exact / rounding / cell key | counts compared | count MRE rounding | count MRE cell key | means compared | mean MRE rounding | mean MRE cell key |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut refused = BTreeSet::new();
    let mut spreads = Vec::new();
    let (mut all_r, mut all_c, mut all_exact) = (Errors::default(), Errors::default(), 0);
    for ((name, _), outcome) in CANCER_PANEL.iter().zip(outcomes) {
        match outcome {
            Outcome::Compared {
                exact_groups,
                rounding,
                cell_key,
            } => {
                let (r, c) = (&rounding.errors, &cell_key.errors);
                println!(
                    "| {name} | {exact_groups} / {} / {} | {} / {} | {} | {} | {} / {} | {} | {} |",
                    r.groups,
                    c.groups,
                    r.counts,
                    c.counts,
                    percent(r.count_mre()),
                    percent(c.count_mre()),
                    r.means,
                    c.means,
                    percent(r.mean_mre()),
                    percent(c.mean_mre()),
                );
                all_r.add(r);
                all_c.add(c);
                all_exact += exact_groups;
                if r.spreads + c.spreads > 0 {
                    spreads.push(format!(
                        "{name}: VAR/STDDEV mean relative error {} over {} groups rounding, {} \
                         over {} groups cell key",
                        percent(r.spread_mre()),
                        r.spreads,
                        percent(c.spread_mre()),
                        c.spreads
                    ));
                }
            }
            Outcome::Refused { by, rule, reason } => {
                println!("| {name} | refused by the {by} node (`{rule}`) | | | | | | |");
                refused.insert(format!("{name}: {reason}"));
            }
        }
    }
    println!(
        "| whole panel | {all_exact} / {} / {} | {} / {} | {} | {} | {} / {} | {} | {} |",
        all_r.groups,
        all_c.groups,
        all_r.counts,
        all_c.counts,
        percent(all_r.count_mre()),
        percent(all_c.count_mre()),
        all_r.means,
        all_c.means,
        percent(all_r.mean_mre()),
        percent(all_c.mean_mre()),
    );
    if !spreads.is_empty() {
        println!();
    }
    for s in &spreads {
        println!("- {s}");
    }
    for r in &refused {
        println!("\nRefused: {r}");
    }

    println!(
        "\nNode time: medians of {} alternating runs (ms); execution is DataFusion's partial \
         aggregation with the patient count (and, under the cell-key method, the cell keys), \
         protection the release.\n",
        args.runs
    );
    println!(
        "| query | rounding | cell key | cell key / rounding | execution rounding | execution cell key | protection rounding | protection cell key |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut total: [Duration; 6] = Default::default();
    for ((name, _), outcome) in CANCER_PANEL.iter().zip(outcomes) {
        let Outcome::Compared {
            rounding, cell_key, ..
        } = outcome
        else {
            continue;
        };
        let row = [
            rounding.node,
            cell_key.node,
            rounding.execution,
            cell_key.execution,
            rounding.protection,
            cell_key.protection,
        ];
        cost_row(name, &row);
        for (t, r) in total.iter_mut().zip(row) {
            *t += r;
        }
    }
    cost_row("whole panel (sum)", &total);
    println!(
        "\nRecord keys: {:.1} ms to compute at open (median of {} runs), beside {:.1} ms to \
         open the node.",
        ms(median(keys)),
        keys.len(),
        ms(open)
    );
}

fn cost_row(name: &str, [rn, cn, re, ce, rp, cp]: &[Duration; 6]) {
    println!(
        "| {name} | {:.1} | {:.1} | {:.3} | {:.1} | {:.1} | {:.2} | {:.2} |",
        ms(*rn),
        ms(*cn),
        ms(*cn) / ms(*rn).max(f64::MIN_POSITIVE),
        ms(*re),
        ms(*ce),
        ms(*rp),
        ms(*cp),
    );
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{ArrayRef, Float64Array, Int64Array, StringArray, UInt64Array};
    use datafusion::arrow::datatypes::{Field, Schema};

    use super::*;

    fn column(name: &str, kind: ColumnKind, aggregate: Option<usize>) -> AnswerColumn {
        AnswerColumn {
            name: name.into(),
            kind,
            aggregate,
        }
    }

    fn batch(columns: Vec<(&str, ArrayRef)>) -> RecordBatch {
        let fields: Vec<Field> = columns
            .iter()
            .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
            .collect();
        RecordBatch::try_new(
            Arc::new(Schema::new(fields)),
            columns.into_iter().map(|(_, a)| a).collect(),
        )
        .expect("batch")
    }

    #[test]
    fn released_counts_and_means_are_matched_to_the_exact_groups_by_key() {
        // Released: site, COUNT(*), AVG(age) as sum and count, the patients; one group of the
        // exact answer (C20) withheld, and the groups in another order.
        let columns = vec![
            column("site", ColumnKind::Key, None),
            column("count(*)[count]", ColumnKind::State, Some(0)),
            column("avg(t.age)[count]", ColumnKind::State, Some(1)),
            column("avg(t.age)[sum]", ColumnKind::State, Some(1)),
            column("__trustql_patients", ColumnKind::Patients, None),
        ];
        let released_batch = batch(vec![
            ("site", Arc::new(StringArray::from(vec!["C50", "C18"]))),
            ("count(*)[count]", Arc::new(Int64Array::from(vec![110, 45]))),
            (
                "avg(t.age)[count]",
                Arc::new(UInt64Array::from(vec![100, 40])),
            ),
            (
                "avg(t.age)[sum]",
                Arc::new(Float64Array::from(vec![6_600.0, 2_800.0])),
            ),
            (
                "__trustql_patients",
                Arc::new(Int64Array::from(vec![100, 40])),
            ),
        ]);
        let values = released(&released_batch, &columns).expect("released");
        assert_eq!(
            values.measures,
            vec![
                Measure {
                    kind: Kind::Count,
                    released: vec![1],
                    exact: 1
                },
                Measure {
                    kind: Kind::Mean,
                    released: vec![3, 2],
                    exact: 2
                },
                Measure {
                    kind: Kind::Patients,
                    released: vec![4],
                    exact: 3
                },
            ]
        );
        // Exact: site, COUNT(*), AVG(age), the patients.
        let exact = batch(vec![
            (
                "site",
                Arc::new(StringArray::from(vec!["C18", "C20", "C50"])),
            ),
            ("n", Arc::new(Int64Array::from(vec![50, 3, 100]))),
            ("mean", Arc::new(Float64Array::from(vec![70.0, 50.0, 60.0]))),
            ("p", Arc::new(Int64Array::from(vec![40, 2, 100]))),
        ]);
        let e = errors(&values, &exact, 1).expect("errors");
        assert_eq!(e.groups, 2);
        assert_eq!((e.counts, e.means), (4, 2));
        // Counts: C50 110 for 100 and 100 for 100; C18 45 for 50 and 40 for 40.
        let counts = e.count_mre().expect("counts");
        assert!(
            (counts - (0.1 + 0.0 + 0.1 + 0.0) / 4.0).abs() < 1e-12,
            "{counts}"
        );
        // Means: C50 66 for 60, C18 70 for 70.
        let means = e.mean_mre().expect("means");
        assert!((means - 0.05).abs() < 1e-12, "{means}");
    }

    #[test]
    fn a_standard_deviation_is_its_m2_over_its_count_less_one() {
        let columns = vec![
            column("stage", ColumnKind::Key, None),
            column("stddev(t.age)[count]", ColumnKind::State, Some(0)),
            column("stddev(t.age)[mean]", ColumnKind::State, Some(0)),
            column("stddev(t.age)[m2]", ColumnKind::State, Some(0)),
            column("__trustql_patients", ColumnKind::Patients, None),
        ];
        let values = released(
            &batch(vec![
                ("stage", Arc::new(StringArray::from(vec![Some("1"), None]))),
                ("n", Arc::new(UInt64Array::from(vec![10, 17]))),
                ("mean", Arc::new(Float64Array::from(vec![60.0, 50.0]))),
                ("m2", Arc::new(Float64Array::from(vec![81.0, 64.0]))),
                ("p", Arc::new(Int64Array::from(vec![10, 17]))),
            ]),
            &columns,
        )
        .expect("released");
        assert_eq!(
            values.measures[0].kind,
            Kind::Spread {
                root: true,
                population: false
            }
        );
        // A null key matches a null key.
        let exact = batch(vec![
            ("stage", Arc::new(StringArray::from(vec![None, Some("1")]))),
            ("sd", Arc::new(Float64Array::from(vec![2.0, 3.0]))),
            ("p", Arc::new(Int64Array::from(vec![16, 10]))),
        ]);
        let e = errors(&values, &exact, 1).expect("errors");
        assert_eq!((e.groups, e.spreads, e.counts), (2, 2, 2));
        // sqrt(81 / 9) = 3 for 3; sqrt(64 / 16) = 2 for 2.
        assert!(e.spread_mre().expect("spreads").abs() < 1e-12);
        // 17 patients for 16.
        let counts = e.count_mre().expect("counts");
        assert!((counts - 0.5 / 16.0).abs() < 1e-12, "{counts}");
    }

    #[test]
    fn a_released_group_the_exact_answer_lacks_is_an_error() {
        let columns = vec![
            column("site", ColumnKind::Key, None),
            column("__trustql_patients", ColumnKind::Patients, None),
        ];
        let values = released(
            &batch(vec![
                ("site", Arc::new(StringArray::from(vec!["C50"]))),
                ("p", Arc::new(Int64Array::from(vec![10]))),
            ]),
            &columns,
        )
        .expect("released");
        let exact = batch(vec![
            ("site", Arc::new(StringArray::from(vec!["C18"]))),
            ("p", Arc::new(Int64Array::from(vec![10]))),
        ]);
        assert!(errors(&values, &exact, 1).is_err());
    }

    #[test]
    fn the_exact_query_counts_the_patients_of_the_first_table() {
        let schema = TrustSchema::cancer().expect("schema");
        assert_eq!(
            exact_sql(
                "SELECT stage_best, COUNT(*) FROM sim_av_tumour GROUP BY stage_best",
                &schema
            )
            .expect("sql"),
            "SELECT stage_best, COUNT(*), COUNT(DISTINCT sim_av_tumour.patientid) AS \
             __exact_patients FROM sim_av_tumour GROUP BY stage_best"
        );
        assert_eq!(
            exact_sql(
                "SELECT t.site_icd10_o2_3char, COUNT(*) FROM sim_av_patient p JOIN sim_av_tumour t \
                 ON p.patientid = t.patientid GROUP BY 1",
                &schema
            )
            .expect("sql"),
            "SELECT t.site_icd10_o2_3char, COUNT(*), COUNT(DISTINCT p.patientid) AS \
             __exact_patients FROM sim_av_patient p JOIN sim_av_tumour t ON p.patientid = \
             t.patientid GROUP BY 1"
        );
        assert!(
            exact_sql(
                "SELECT intent_of_treatment, COUNT(*) FROM sim_sact_regimen GROUP BY 1",
                &schema
            )
            .expect("sql")
            .contains("COUNT(DISTINCT sim_sact_regimen.encore_patient_id)")
        );
        // Every panel query can be made exact.
        for (name, sql) in CANCER_PANEL {
            assert!(exact_sql(sql, &schema).is_ok(), "{name}");
        }
    }
}
