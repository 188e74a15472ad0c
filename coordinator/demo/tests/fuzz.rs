//! Randomised SQL against a real loopback federation: seeded, grammar-generated aggregate
//! queries, each checked against ground truth DataFusion computes over the trusts' own Parquet.
//!
//! - Unprotected (`min_patients = 1`, no rounding): the federated answer equals one process
//!   over the union of every trust's Parquet (a patient seen at two trusts is two rows there,
//!   as in the oracle test), as sorted rows, numbers to about six significant digits.
//! - Protected (the demo's `--rounding` policy: at least 10 patients a group, counts rounded
//!   to base 5 at each trust, the same rules on the coordinator's totals): every released
//!   count is a multiple of 5; every released row is explained, value by value, by a set of
//!   trusts that each hold at least 10 of the group's patients; the coverage report parses,
//!   travels in the schema too, and adds up to each trust's groups. Queries outside the table
//!   builder are refused with a clear message and the coordinator keeps answering.
//!
//! `TRUSTQL_FUZZ_SEED` replays a run (every run prints its seed); `TRUSTQL_FUZZ_SECONDS` bounds
//! the time of each property (default 30) and `TRUSTQL_FUZZ_QUERIES` the number of queries
//! (default 400). The time only decides how many queries run; it is never asserted.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::{DataType, Float64Type};
use datafusion::prelude::SessionContext;
use trustql_client::{Client, QueryResult};
use trustql_demo::{DemoOptions, Federation, launch};
use trustql_protocol::{COVERAGE_META_KEY, Coverage, TrustStatus};
use trustql_testkit::federation::{at_trust, central, client, one};

/// The demo's `--rounding` policy (`write_policy` in the demo) and its coordinator's totals
/// rules.
const MIN_PATIENTS: i64 = 10;
const BASE: i64 = 5;

// ---------------------------------------------------------------------------------------------
// Set-up.

fn options(unprotected: bool) -> DemoOptions {
    DemoOptions {
        trusts: 3,
        patients: 3_000,
        seed: 21,
        unprotected,
        // The protected invariants are those of suppression and rounding (ignored when
        // unprotected).
        rounding: true,
        // MIN/MAX of clinical columns, off by default, is allowed here so its invariants
        // (the minimum applies to the patients it reads) are checked too.
        extremes: true,
        // Hundreds of queries a run: more than the default daily allowance.
        query_allowance: Some(trustql_policies::QueryAllowance {
            per_day: 1_000_000,
            total: None,
        }),
        node_deadline_ms: 20_000,
        ..DemoOptions::default()
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// The run's seed, one for both properties: `TRUSTQL_FUZZ_SEED`, else the clock.
fn seed() -> u64 {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SEED.get_or_init(|| {
        env_u64("TRUSTQL_FUZZ_SEED").unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
    })
}

struct Budget {
    started: Instant,
    time: Duration,
    queries: usize,
}

impl Budget {
    fn from_env() -> Self {
        Budget {
            started: Instant::now(),
            time: Duration::from_secs(env_u64("TRUSTQL_FUZZ_SECONDS").unwrap_or(30)),
            queries: env_u64("TRUSTQL_FUZZ_QUERIES").unwrap_or(400) as usize,
        }
    }

    fn more(&self, done: usize) -> bool {
        done < self.queries && self.started.elapsed() < self.time
    }
}

async fn collect(ctx: &SessionContext, sql: &str) -> Result<RecordBatch, String> {
    let frame = ctx.sql(sql).await.map_err(|e| format!("central: {e}"))?;
    let schema = std::sync::Arc::new(frame.schema().as_arrow().clone());
    let batches = frame.collect().await.map_err(|e| format!("central: {e}"))?;
    concat_batches(&schema, &batches).map_err(|e| format!("central: {e}"))
}

/// One DataFusion session over each trust's own Parquet: (trust, session).
async fn trust_contexts(fed: &Federation) -> Vec<(String, SessionContext)> {
    let mut trusts = Vec::new();
    for trust in &fed.info.trusts {
        let ctx = at_trust(fed, trust).await;
        trusts.push((trust.clone(), ctx));
    }
    trusts
}

// ---------------------------------------------------------------------------------------------
// A small seeded PRNG (SplitMix64): deterministic for a seed, no dependency.

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// True `percent` times in a hundred.
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

// ---------------------------------------------------------------------------------------------
// The grammar.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Tumour,
    Patient,
    Join,
}

impl Source {
    fn sql(self) -> &'static str {
        match self {
            Source::Tumour => "sim_av_tumour t",
            Source::Patient => "sim_av_patient p",
            Source::Join => "sim_av_patient p JOIN sim_av_tumour t ON p.patientid = t.patientid",
        }
    }

    fn patient_key(self) -> &'static str {
        match self {
            Source::Tumour => "t.patientid",
            Source::Patient | Source::Join => "p.patientid",
        }
    }

    fn tumour(self) -> bool {
        self != Source::Patient
    }

    fn patient(self) -> bool {
        self != Source::Tumour
    }
}

/// Categorical columns that may be grouped, filtered and counted.
const TUMOUR_CODES: &[&str] = &[
    "site_icd10_o2_3char",
    "stage_best",
    "grade",
    "gender",
    "quintile_2019",
    "laterality",
    "behaviour_icd10_o2",
    "cancercareplanintent",
    "performancestatus",
    "er_status",
];
const PATIENT_CODES: &[&str] = &["gender", "ethnicity", "vitalstatus", "deathlocationcode"];
/// Tumour columns with public bounds: (column, a clinical column, so MIN/MAX may read it).
const TUMOUR_NUMBERS: &[(&str, bool)] = &[
    ("age", false),
    ("chrl_tot_27_03", true),
    ("gleason_combined", true),
];

/// VAR and STDDEV in their spellings.
const MOMENTS: &[&str] = &[
    "VAR",
    "VAR_SAMP",
    "VAR_POP",
    "STDDEV",
    "STDDEV_SAMP",
    "STDDEV_POP",
];

/// The off-grammar piece every mode refuses, with its reason.
const DISTINCT_NON_KEY: &str = "COUNT(DISTINCT) of a non-key";

/// The values present in each categorical column (`t.stage_best` → codes), sorted, so a
/// seed generates the same constants every run.
type Values = HashMap<String, Vec<String>>;

async fn values(union: &SessionContext) -> Values {
    let mut values = Values::new();
    for (alias, table, columns) in [
        ("t", "sim_av_tumour", TUMOUR_CODES),
        ("p", "sim_av_patient", PATIENT_CODES),
    ] {
        for column in columns {
            let batch = collect(
                union,
                &format!(
                    "SELECT DISTINCT {column} AS v FROM {table} WHERE {column} IS NOT NULL ORDER BY 1"
                ),
            )
            .await
            .expect("distinct values");
            let text = cast(batch.column(0), &DataType::Utf8).expect("cast");
            let mut list: Vec<String> = text
                .as_string::<i32>()
                .iter()
                .flatten()
                .filter(|v| !v.contains('\''))
                .map(str::to_string)
                .collect();
            list.sort();
            assert!(!list.is_empty(), "{table}.{column} has values");
            values.insert(format!("{alias}.{column}"), list);
        }
    }
    values
}

#[derive(Debug, Clone)]
enum Agg {
    CountStar,
    Count(String),
    CountDistinct(String),
    Sum(String),
    Avg(String),
    /// VAR, STDDEV and their _POP/_SAMP forms.
    Moment(&'static str, String),
    Min(String),
    Max(String),
    /// Outside the table builder (protected mode refuses it): the SQL as written.
    Off(String),
}

impl Agg {
    fn sql(&self) -> String {
        match self {
            Agg::CountStar => "COUNT(*)".into(),
            Agg::Count(c) => format!("COUNT({c})"),
            Agg::CountDistinct(c) => format!("COUNT(DISTINCT {c})"),
            Agg::Sum(c) => format!("SUM({c})"),
            Agg::Avg(c) => format!("AVG({c})"),
            Agg::Moment(f, c) => format!("{f}({c})"),
            Agg::Min(c) => format!("MIN({c})"),
            Agg::Max(c) => format!("MAX({c})"),
            Agg::Off(sql) => sql.clone(),
        }
    }

    fn is_count(&self) -> bool {
        matches!(self, Agg::CountStar | Agg::Count(_) | Agg::CountDistinct(_))
    }

    /// What one trust's ground truth needs to predict this aggregate's released value.
    fn raw(&self) -> Vec<String> {
        match self {
            Agg::CountStar | Agg::Count(_) | Agg::CountDistinct(_) => vec![self.sql()],
            Agg::Sum(c) => vec![format!("SUM({c})")],
            Agg::Avg(c) => vec![format!("SUM({c})"), format!("COUNT({c})")],
            Agg::Min(_) | Agg::Max(_) => vec![self.sql()],
            Agg::Moment(..) | Agg::Off(_) => Vec::new(),
        }
    }
}

#[derive(Debug, Clone)]
struct Query {
    source: Source,
    keys: Vec<String>,
    aggs: Vec<Agg>,
    filter: Option<String>,
    rollup: bool,
    ordinals: bool,
    having: Option<String>,
    order: Option<String>,
    limit: Option<usize>,
    /// Why the query is outside the table builder, when it is.
    off: Option<&'static str>,
}

impl Query {
    fn group_by(&self) -> String {
        if self.keys.is_empty() {
            String::new()
        } else if self.rollup {
            format!(" GROUP BY ROLLUP({})", self.keys.join(", "))
        } else if self.ordinals {
            let ordinals: Vec<String> = (1..=self.keys.len()).map(|i| i.to_string()).collect();
            format!(" GROUP BY {}", ordinals.join(", "))
        } else {
            format!(" GROUP BY {}", self.keys.join(", "))
        }
    }

    /// FROM and WHERE.
    fn body(&self) -> String {
        match &self.filter {
            Some(f) => format!(" FROM {} WHERE {f}", self.source.sql()),
            None => format!(" FROM {}", self.source.sql()),
        }
    }

    fn select_keys(&self) -> Vec<String> {
        self.keys
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{k} AS k{i}"))
            .collect()
    }

    fn sql(&self) -> String {
        let mut select = self.select_keys();
        select.extend(
            self.aggs
                .iter()
                .enumerate()
                .map(|(i, a)| format!("{} AS a{i}", a.sql())),
        );
        let mut sql = format!(
            "SELECT {}{}{}",
            select.join(", "),
            self.body(),
            self.group_by()
        );
        if let Some(h) = &self.having {
            sql.push_str(&format!(" HAVING {h}"));
        }
        if let Some(o) = &self.order {
            sql.push_str(&format!(" ORDER BY {o}"));
        }
        if let Some(l) = self.limit {
            sql.push_str(&format!(" LIMIT {l}"));
        }
        sql
    }

    /// Each trust's ground truth: the same groups, with their distinct patients and what
    /// each aggregate needs (the raw columns of aggregate `i` follow in order).
    fn truth_sql(&self) -> String {
        let mut select = self.select_keys();
        select.push(format!(
            "COUNT(DISTINCT {}) AS patients",
            self.source.patient_key()
        ));
        let mut n = 0;
        for agg in &self.aggs {
            for raw in agg.raw() {
                select.push(format!("CAST({raw} AS DOUBLE) AS r{n}"));
                n += 1;
            }
        }
        format!(
            "SELECT {}{}{}",
            select.join(", "),
            self.body(),
            self.group_by()
        )
    }
}

struct Generator {
    rng: Rng,
    values: Values,
}

impl Generator {
    fn quoted(&mut self, column: &str) -> String {
        // Now and then a code no row has.
        if self.rng.chance(8) {
            return "'zz'".into();
        }
        let value = self.rng.pick(&self.values[column]).clone();
        format!("'{value}'")
    }

    fn list(&mut self, column: &str) -> String {
        let n = 1 + self.rng.below(3);
        let items: Vec<String> = (0..n).map(|_| self.quoted(column)).collect();
        items.join(", ")
    }

    fn code_column(&mut self, source: Source) -> String {
        let tumour = source.tumour() && (!source.patient() || self.rng.chance(60));
        if tumour {
            format!("t.{}", self.rng.pick(TUMOUR_CODES))
        } else {
            format!("p.{}", self.rng.pick(PATIENT_CODES))
        }
    }

    fn number_column(&mut self) -> String {
        format!("t.{}", self.rng.pick(TUMOUR_NUMBERS).0)
    }

    /// Age bands: cuts on multiples of 5 (the schema's band width), constant labels.
    fn age_bands(&mut self) -> String {
        let mut cuts: Vec<i64> = (0..1 + self.rng.below(3))
            .map(|_| 5 * (4 + self.rng.below(16)) as i64)
            .collect();
        cuts.sort();
        cuts.dedup();
        let mut sql = format!("CASE WHEN t.age < {} THEN 'under {}'", cuts[0], cuts[0]);
        for w in cuts.windows(2) {
            if self.rng.chance(50) {
                sql.push_str(&format!(
                    " WHEN t.age BETWEEN {} AND {} THEN '{}-{}'",
                    w[0],
                    w[1] - 1,
                    w[0],
                    w[1] - 1
                ));
            } else {
                sql.push_str(&format!(
                    " WHEN t.age < {} THEN '{}-{}'",
                    w[1],
                    w[0],
                    w[1] - 1
                ));
            }
        }
        let last = cuts[cuts.len() - 1];
        if self.rng.chance(80) {
            sql.push_str(&format!(" ELSE '{last}+' END"));
        } else {
            sql.push_str(" END");
        }
        sql
    }

    /// A CASE grouping one code column's values into constant labels.
    fn code_bands(&mut self, source: Source) -> String {
        let column = self.code_column(source);
        let mut sql = format!("CASE WHEN {column} IN ({}) THEN 'A'", self.list(&column));
        if self.rng.chance(50) {
            sql.push_str(&format!(
                " WHEN {column} = {} THEN 'B'",
                self.quoted(&column)
            ));
        }
        if self.rng.chance(70) {
            sql.push_str(" ELSE 'other'");
        }
        sql.push_str(" END");
        sql
    }

    fn key(&mut self, source: Source) -> String {
        let roll = self.rng.below(100);
        if source.tumour() {
            match roll {
                0..55 => self.code_column(source),
                55..65 => "date_part('year', t.diagnosisdatebest)".into(),
                65..69 => "EXTRACT(QUARTER FROM t.diagnosisdatebest)".into(),
                69..75 => format!(
                    "substr(t.site_icd10_o2_3char, 1, {})",
                    1 + self.rng.below(2)
                ),
                75..88 => self.age_bands(),
                88..95 => self.code_bands(source),
                _ => "CASE WHEN t.chrl_tot_27_03 = 0 THEN 'none' ELSE 'some' END".into(),
            }
        } else {
            match roll {
                0..75 => self.code_column(source),
                75..85 => "date_part('year', p.vitalstatusdate)".into(),
                _ => self.code_bands(source),
            }
        }
    }

    fn agg(&mut self, source: Source) -> Agg {
        let roll = self.rng.below(100);
        if !source.tumour() {
            return match roll {
                0..40 => Agg::CountStar,
                40..70 => Agg::Count(self.code_column(source)),
                _ => Agg::CountDistinct(source.patient_key().into()),
            };
        }
        match roll {
            0..22 => Agg::CountStar,
            22..32 => Agg::Count(self.code_column(source)),
            32..42 => Agg::CountDistinct(source.patient_key().into()),
            42..55 => Agg::Sum(self.number_column()),
            55..72 => Agg::Avg(self.number_column()),
            72..90 => Agg::Moment(MOMENTS[self.rng.below(MOMENTS.len())], self.number_column()),
            _ => {
                let clinical: Vec<&str> = TUMOUR_NUMBERS
                    .iter()
                    .filter(|(_, c)| *c)
                    .map(|(n, _)| *n)
                    .collect();
                let column = format!("t.{}", self.rng.pick(&clinical));
                if self.rng.chance(50) {
                    Agg::Min(column)
                } else {
                    Agg::Max(column)
                }
            }
        }
    }

    /// One comparison of a column with constants.
    fn atom(&mut self, source: Source) -> String {
        let roll = self.rng.below(100);
        if source.tumour() && roll >= 55 {
            return match roll {
                55..63 => {
                    let low = 20 + self.rng.below(60);
                    format!("t.age BETWEEN {low} AND {}", low + self.rng.below(40))
                }
                63..70 => format!("t.age < {}", 30 + self.rng.below(60)),
                70..75 => format!("t.age >= {}", 30 + self.rng.below(60)),
                75..80 => format!("t.chrl_tot_27_03 > {}", self.rng.below(4)),
                80..84 => format!("t.gleason_combined >= {}", 5 + self.rng.below(5)),
                84..90 => format!(
                    "t.diagnosisdatebest >= DATE '{}-{:02}-01'",
                    2016 + self.rng.below(4),
                    1 + self.rng.below(12)
                ),
                90..94 => format!(
                    "date_part('year', t.diagnosisdatebest) = {}",
                    2016 + self.rng.below(4)
                ),
                _ => format!("t.site_icd10_o2_3char LIKE 'C{}%'", self.rng.below(10)),
            };
        }
        if source.patient() && roll >= 50 && self.rng.chance(30) {
            return format!(
                "p.vitalstatusdate < DATE '{}-06-01'",
                2016 + self.rng.below(6)
            );
        }
        let column = self.code_column(source);
        match self.rng.below(7) {
            0 | 1 => format!("{column} = {}", self.quoted(&column)),
            2 => format!("{column} <> {}", self.quoted(&column)),
            3 => format!("{column} IN ({})", self.list(&column)),
            4 => format!("{column} NOT IN ({})", self.list(&column)),
            5 => format!("{column} IS NULL"),
            _ => format!("{column} IS NOT NULL"),
        }
    }

    fn filter(&mut self, source: Source, depth: usize) -> String {
        if depth == 0 || self.rng.chance(50) {
            return self.atom(source);
        }
        match self.rng.below(5) {
            0 | 1 => format!(
                "({} AND {})",
                self.filter(source, depth - 1),
                self.filter(source, depth - 1)
            ),
            2 | 3 => format!(
                "({} OR {})",
                self.filter(source, depth - 1),
                self.filter(source, depth - 1)
            ),
            _ => format!("NOT ({})", self.filter(source, depth - 1)),
        }
    }

    fn query(&mut self) -> Query {
        let source = *self.rng.pick(&[
            Source::Tumour,
            Source::Tumour,
            Source::Join,
            Source::Patient,
        ]);
        let mut keys: Vec<String> = Vec::new();
        let wanted = if self.rng.chance(8) {
            0
        } else {
            1 + self.rng.below(3)
        };
        for _ in 0..wanted * 3 {
            if keys.len() == wanted {
                break;
            }
            let key = self.key(source);
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        let aggs: Vec<Agg> = (0..1 + self.rng.below(3))
            .map(|_| self.agg(source))
            .collect();
        let filter = self.rng.chance(60).then(|| self.filter(source, 2));
        let grouped = !keys.is_empty();
        let rollup = grouped && self.rng.chance(20);
        let ordinals = grouped && !rollup && self.rng.chance(20);
        let having = (grouped && self.rng.chance(20)).then(|| match self.rng.below(3) {
            0 if source.tumour() => format!("AVG(t.age) > {}", 50 + self.rng.below(25)),
            1 => format!(
                "COUNT(DISTINCT {}) >= {}",
                source.patient_key(),
                self.rng.pick(&[1, 10, 20, 50])
            ),
            _ => format!("COUNT(*) > {}", self.rng.pick(&[0, 5, 10, 20, 50])),
        });
        let mut order = None;
        let mut limit = None;
        if grouped && self.rng.chance(30) {
            let keys: Vec<String> = (0..keys.len())
                .map(|i| {
                    if self.rng.chance(30) {
                        format!("k{i} DESC")
                    } else {
                        format!("k{i}")
                    }
                })
                .collect();
            // With a LIMIT, a total order (exact counts, then every key), so both sides cut
            // at the same row; ROLLUP's rolled-up nulls would tie with null keys.
            let count = aggs.iter().position(Agg::is_count);
            order = Some(match count {
                Some(i) if self.rng.chance(40) => format!("a{i} DESC, {}", keys.join(", ")),
                _ => keys.join(", "),
            });
            if !rollup && self.rng.chance(50) {
                limit = Some(1 + self.rng.below(20));
            }
        }
        Query {
            source,
            keys,
            aggs,
            filter,
            rollup,
            ordinals,
            having,
            order,
            limit,
            off: None,
        }
    }

    /// A query with one piece outside the table builder.
    fn off_query(&mut self) -> Query {
        let mut q = self.query();
        if !q.source.tumour() {
            q.source = Source::Tumour;
            q.keys = vec![self.key(Source::Tumour)];
            q.aggs = vec![Agg::CountStar];
            q.filter = None;
            q.having = None;
            q.order = None;
            q.limit = None;
            q.rollup = false;
        }
        let (what, piece): (&'static str, String) = match self.rng.below(12) {
            0 => ("arithmetic inside SUM", "SUM(t.age + 1)".into()),
            1 => ("arithmetic inside AVG", "AVG(t.age * 2)".into()),
            2 => (
                "CASE inside SUM",
                format!(
                    "SUM(CASE WHEN t.stage_best = {} THEN 1 ELSE 0 END)",
                    self.quoted("t.stage_best")
                ),
            ),
            3 => (
                "CASE inside COUNT",
                "COUNT(CASE WHEN t.age > 70 THEN 1 END)".into(),
            ),
            4 => (
                DISTINCT_NON_KEY,
                "COUNT(DISTINCT t.site_icd10_o2_3char)".into(),
            ),
            5 => (
                "FILTER on an aggregate",
                "COUNT(*) FILTER (WHERE t.age > 60)".into(),
            ),
            6 => ("MIN of a quasi-identifier", "MIN(t.age)".into()),
            7 => ("arithmetic group key", "t.age % 10".into()),
            8 => (
                "bands narrower than the band width",
                "CASE WHEN t.age < 50 THEN 'a' WHEN t.age < 52 THEN 'b' ELSE 'c' END".into(),
            ),
            9 => ("a key of two columns", "t.age + t.chrl_tot_27_03".into()),
            10 => (
                "a condition on two columns",
                "t.age > t.chrl_tot_27_03 + 40".into(),
            ),
            _ => (
                "a condition on arithmetic",
                "t.age + t.chrl_tot_27_03 > 60".into(),
            ),
        };
        match what {
            "arithmetic group key"
            | "bands narrower than the band width"
            | "a key of two columns" => {
                q.keys.retain(|k| k != &piece);
                q.keys.insert(0, piece);
                q.ordinals = false;
                // The aliases shifted by one: keep the ORDER BY total, or a LIMIT cuts
                // between tied rows differently on the two sides.
                let last = format!("k{}", q.keys.len() - 1);
                if let Some(order) = q.order.as_mut().filter(|o| !o.contains(&last)) {
                    order.push_str(&format!(", {last}"));
                }
            }
            "a condition on two columns" | "a condition on arithmetic" => {
                q.filter = Some(match q.filter.take() {
                    Some(f) => format!("{piece} AND {f}"),
                    None => piece,
                });
            }
            _ => {
                let at = self.rng.below(q.aggs.len());
                q.aggs[at] = Agg::Off(piece);
            }
        }
        if q.keys.is_empty() {
            q.having = None;
            q.order = None;
            q.limit = None;
        }
        q.off = Some(what);
        q
    }
}

// ---------------------------------------------------------------------------------------------
// Reading results.

#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Num(Option<f64>),
    Text(Option<String>),
}

fn is_numeric(t: &DataType) -> bool {
    t.is_numeric()
}

fn cells(array: &ArrayRef) -> Vec<Cell> {
    if is_numeric(array.data_type()) {
        let floats = cast(array, &DataType::Float64).expect("cast to f64");
        floats
            .as_primitive::<Float64Type>()
            .iter()
            .map(Cell::Num)
            .collect()
    } else {
        let text = cast(array, &DataType::Utf8).expect("cast to text");
        text.as_string::<i32>()
            .iter()
            .map(|v| Cell::Text(v.map(str::to_string)))
            .collect()
    }
}

fn rows(batch: &RecordBatch) -> Vec<Vec<Cell>> {
    let columns: Vec<Vec<Cell>> = batch.columns().iter().map(cells).collect();
    (0..batch.num_rows())
        .map(|r| columns.iter().map(|c| c[r].clone()).collect())
        .collect()
}

fn key_text(row: &[Cell], keys: usize) -> String {
    row[..keys]
        .iter()
        .map(|c| match c {
            Cell::Num(Some(v)) => format!("{v}"),
            Cell::Text(Some(v)) => v.clone(),
            _ => "∅".into(),
        })
        .collect::<Vec<_>>()
        .join("|")
}

/// Equal to about six significant digits (merge order changes a float's last bits).
fn close(a: f64, b: f64) -> bool {
    if a.is_nan() || b.is_nan() {
        return a.is_nan() && b.is_nan();
    }
    let diff = (a - b).abs();
    diff <= 1e-6 * a.abs().max(b.abs()) || diff <= 1e-9
}

fn same(a: &Cell, b: &Cell) -> bool {
    match (a, b) {
        (Cell::Num(Some(x)), Cell::Num(Some(y))) => close(*x, *y),
        (Cell::Num(None), Cell::Num(None)) => true,
        (Cell::Text(x), Cell::Text(y)) => x == y,
        _ => false,
    }
}

/// The same rows in any order: rows are matched within groups of equal keys.
fn compare(got: &RecordBatch, want: &RecordBatch, keys: usize) -> Result<(), String> {
    let names = |b: &RecordBatch| -> Vec<String> {
        b.schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect()
    };
    if names(got) != names(want) {
        return Err(format!(
            "columns differ: federated {:?}, central {:?}",
            names(got),
            names(want)
        ));
    }
    if got.num_rows() != want.num_rows() {
        return Err(format!(
            "{} rows federated, {} central\nfederated {:?}\ncentral   {:?}",
            got.num_rows(),
            want.num_rows(),
            rows(got).iter().take(5).collect::<Vec<_>>(),
            rows(want).iter().take(5).collect::<Vec<_>>()
        ));
    }
    let mut buckets: HashMap<String, Vec<Option<Vec<Cell>>>> = HashMap::new();
    for row in rows(want) {
        buckets
            .entry(key_text(&row, keys))
            .or_default()
            .push(Some(row));
    }
    for row in rows(got) {
        let key = key_text(&row, keys);
        let bucket = buckets.get_mut(&key);
        let found = bucket.and_then(|b| {
            b.iter_mut().find(|w| {
                w.as_ref()
                    .is_some_and(|w| w.iter().zip(&row).all(|(a, b)| same(a, b)))
            })
        });
        match found {
            Some(slot) => *slot = None,
            None => {
                let central: Vec<&Vec<Cell>> = buckets
                    .get(&key)
                    .map(|b| b.iter().flatten().collect())
                    .unwrap_or_default();
                return Err(format!(
                    "federated row {row:?} is not central; central rows with its keys: {central:?}"
                ));
            }
        }
    }
    Ok(())
}

/// The coverage in the Flight info's metadata and in the result schema: both present, both
/// parse, and the same.
fn coverage_of(result: &QueryResult) -> Result<Coverage, String> {
    let coverage = result
        .coverage
        .clone()
        .ok_or("no coverage report in the Flight info (or it did not parse)")?;
    let text = result
        .schema
        .metadata()
        .get(COVERAGE_META_KEY)
        .ok_or("no coverage report in the result schema")?;
    let in_schema = Coverage::from_json(text)?;
    if in_schema != coverage {
        return Err(format!(
            "the schema's coverage differs from the info's:\n{in_schema}\n{coverage}"
        ));
    }
    if !coverage.complete || coverage.trusts.len() != 3 {
        return Err(format!("every trust should answer:\n{coverage}"));
    }
    if coverage
        .trusts
        .iter()
        .any(|t| t.status != TrustStatus::Answered || t.dp.is_some() || t.reason.is_some())
        || !coverage.noise.is_empty()
    {
        return Err(format!(
            "an SDC answer from every trust, no DP:\n{coverage}"
        ));
    }
    Ok(coverage)
}

/// A refusal a researcher can read: it says it refused and why, and is no crash.
fn clear_refusal(message: &str) -> Result<(), String> {
    let lower = message.to_lowercase();
    if !lower.contains("refused") || lower.contains("panic") || lower.contains("internal") {
        return Err(format!("not a clear refusal: {message}"));
    }
    Ok(())
}

/// COUNT(DISTINCT) of no patient key is refused in every mode, saying why.
fn distinct_refusal(message: &str) -> Result<(), String> {
    clear_refusal(message)?;
    if !message.contains("answered only for the patient key") {
        return Err(format!(
            "refused, but not for its distinct count: {message}"
        ));
    }
    Ok(())
}

/// After a refusal, the coordinator still answers.
async fn still_answers(client: &mut Client) -> Result<(), String> {
    client
        .query("SELECT gender, COUNT(*) AS n FROM sim_av_patient GROUP BY gender")
        .await
        .map(|_| ())
        .map_err(|e| format!("the coordinator stopped answering after a refusal: {e}"))
}

fn fail(seed: u64, index: usize, sql: &str, why: &str) -> ! {
    panic!(
        "TRUSTQL_FUZZ_SEED={seed} query #{index} failed:\n  {sql}\n{why}\n\
         (replay: TRUSTQL_FUZZ_SEED={seed} cargo test -p trustql-demo --test fuzz)"
    )
}

// ---------------------------------------------------------------------------------------------
// Property 1: unprotected answers equal one process over the union.

#[tokio::test]
async fn unprotected_random_queries_equal_one_process_over_the_union() {
    let seed = seed();
    eprintln!("fuzz (unprotected): TRUSTQL_FUZZ_SEED={seed}");
    let fed = launch(&options(true)).await.expect("launch");
    let mut client = client(&fed).await;
    let union = central(&fed).await;
    let trusts = trust_contexts(&fed).await;
    let mut generator = Generator {
        rng: Rng(seed ^ 0x756e_7072),
        values: values(&union).await,
    };
    let budget = Budget::from_env();
    let (mut done, mut refused, mut compared) = (0, 0, 0);
    while budget.more(done) {
        let query = if generator.rng.chance(10) {
            generator.off_query()
        } else {
            generator.query()
        };
        let sql = query.sql();
        let outcome = async {
            let answer = client.query(&sql).await;
            let result = match (answer, query.off) {
                // Per-trust distinct counts do not add up: refused, as in every mode.
                (Ok(_), Some(DISTINCT_NON_KEY)) => {
                    return Err("COUNT(DISTINCT) of a non-key was answered".into());
                }
                (Err(e), Some(DISTINCT_NON_KEY)) => {
                    distinct_refusal(&e.to_string())?;
                    still_answers(&mut client).await?;
                    return Ok(false);
                }
                (Ok(result), _) => result,
                // Unprotected answers the full aggregate SQL, but its policy's classes still
                // hold (MIN of a quasi-identifier); what is refused is refused clearly.
                (Err(e), Some(_)) => {
                    clear_refusal(&e.to_string())?;
                    still_answers(&mut client).await?;
                    return Ok(false);
                }
                (Err(e), None) => return Err(format!("refused or failed: {e}")),
            };
            let coverage = coverage_of(&result)?;
            let got = one(&result);
            let truth = truth(&trusts, &query).await?;
            counts_nothing(&coverage, &truth)?;
            // Over no rows at all, ROLLUP's grand total is a group of no patients in one
            // process (COUNT 0), and a trust never releases a group of no patients, even
            // unprotected: nothing is released. (Without GROUP BY both sides give one row.)
            let empty = truth
                .iter()
                .all(|(_, groups, _)| groups.values().flatten().all(|g| g.patients == 0));
            if empty && query.rollup {
                if got.num_rows() != 0 {
                    return Err(format!("over no rows, {} rows released", got.num_rows()));
                }
                return Ok(true);
            }
            let want = collect(&union, &sql).await?;
            compared += got.num_rows();
            compare(&got, &want, query.keys.len())?;
            Ok::<bool, String>(true)
        }
        .await;
        match outcome {
            Ok(true) => {}
            Ok(false) => refused += 1,
            Err(why) => fail(seed, done, &sql, &why),
        }
        done += 1;
    }
    eprintln!(
        "fuzz (unprotected): {done} queries ({refused} refused, {compared} rows compared) in {:.1} s",
        budget.started.elapsed().as_secs_f64()
    );
    assert!(
        done > 0 && done > refused,
        "some queries ran and were answered"
    );
}

// ---------------------------------------------------------------------------------------------
// Property 2: protected answers keep the policy's invariants.

/// One trust's group: its distinct patients and the raw values of its aggregates.
#[derive(Debug, Clone)]
struct TruthRow {
    patients: i64,
    raw: Vec<Option<f64>>,
}

/// Each trust's groups by key text.
type Truth = Vec<(String, HashMap<String, Vec<TruthRow>>, usize)>;

async fn truth(trusts: &[(String, SessionContext)], query: &Query) -> Result<Truth, String> {
    let sql = query.truth_sql();
    let keys = query.keys.len();
    let mut out = Vec::new();
    for (trust, ctx) in trusts {
        let batch = collect(ctx, &sql)
            .await
            .map_err(|e| format!("{trust} truth {sql}: {e}"))?;
        let mut groups: HashMap<String, Vec<TruthRow>> = HashMap::new();
        let all = rows(&batch);
        for row in &all {
            let num = |c: &Cell| match c {
                Cell::Num(v) => *v,
                Cell::Text(_) => None,
            };
            groups
                .entry(key_text(row, keys))
                .or_default()
                .push(TruthRow {
                    patients: num(&row[keys]).unwrap_or(0.0) as i64,
                    raw: row[keys + 1..].iter().map(num).collect(),
                });
        }
        out.push((trust.clone(), groups, all.len()));
    }
    Ok(out)
}

fn round(x: f64) -> f64 {
    ((x as i64 + BASE / 2).div_euclid(BASE) * BASE) as f64
}

/// Whether the released row's aggregates are what the trusts in `set` release together.
fn explains(query: &Query, row: &[Cell], set: &[&TruthRow]) -> bool {
    let keys = query.keys.len();
    let mut raw = 0;
    for (i, agg) in query.aggs.iter().enumerate() {
        let value = match &row[keys + i] {
            Cell::Num(v) => *v,
            Cell::Text(_) => return false,
        };
        let column = |j: usize| set.iter().map(move |t| t.raw[j]);
        let ok = match agg {
            Agg::CountStar | Agg::Count(_) | Agg::CountDistinct(_) => {
                let want: f64 = column(raw).map(|v| round(v.unwrap_or(0.0))).sum();
                value.is_some_and(|v| v == want)
            }
            Agg::Sum(_) => {
                let values: Vec<f64> = column(raw).flatten().collect();
                match value {
                    None => values.is_empty(),
                    Some(v) => !values.is_empty() && close(v, values.iter().sum()),
                }
            }
            Agg::Avg(_) => {
                // The mean of an SDC answer divides by the rounded count.
                let sum: f64 = column(raw).flatten().sum();
                let count: f64 = column(raw + 1).map(|v| round(v.unwrap_or(0.0))).sum();
                match value {
                    None => count == 0.0,
                    Some(v) => count > 0.0 && close(v, sum / count),
                }
            }
            Agg::Min(_) | Agg::Max(_) => {
                let values: Vec<f64> = column(raw).flatten().collect();
                let want = if matches!(agg, Agg::Min(_)) {
                    values.iter().copied().reduce(f64::min)
                } else {
                    values.iter().copied().reduce(f64::max)
                };
                match (value, want) {
                    (Some(v), Some(w)) => close(v, w),
                    (None, None) => true,
                    _ => false,
                }
            }
            // Moments divide by a rounded n: only their sanity is checked here.
            Agg::Moment(..) | Agg::Off(_) => value.is_none_or(|v| v.is_finite() && v >= -1e-9),
        };
        if !ok {
            return false;
        }
        raw += agg.raw().len();
    }
    true
}

/// The coverage report carries no count of a trust's groups (released or withheld): under a
/// fine key that number is an exact count of the trust's patients. Every trust of the truth
/// has its line.
fn counts_nothing(coverage: &Coverage, truth: &Truth) -> Result<(), String> {
    for (trust, ..) in truth {
        let line = coverage
            .trusts
            .iter()
            .find(|t| &t.trust == trust)
            .ok_or_else(|| format!("no coverage line for {trust}"))?;
        if line.released.is_some() {
            return Err(format!("{trust}'s line counts its groups\n{coverage}"));
        }
    }
    let json = coverage.to_json().map_err(|e| e.to_string())?;
    if json.contains("withheld\":") {
        return Err(format!("the report counts withheld groups: {json}"));
    }
    Ok(())
}

/// Groups of at least `min` patients at some trust: no more rows can be released.
fn releasable(truth: &Truth, min: i64) -> usize {
    truth
        .iter()
        .map(|(_, groups, _)| {
            groups
                .values()
                .flatten()
                .filter(|g| g.patients >= min)
                .count()
        })
        .sum()
}

/// Every invariant of one protected answer.
fn check_protected(query: &Query, result: &QueryResult, truth: &Truth) -> Result<(), String> {
    let coverage = coverage_of(result)?;
    let notes = coverage.notes.join("\n");
    if !notes.contains(&format!("rounded to the nearest {BASE}")) {
        return Err(format!(
            "the coverage should say counts are rounded:\n{coverage}"
        ));
    }
    counts_nothing(&coverage, truth)?;
    let batch = one(result);
    let keys = query.keys.len();
    if batch.num_columns() != keys + query.aggs.len() {
        return Err(format!("{} columns", batch.num_columns()));
    }
    let released = releasable(truth, MIN_PATIENTS);
    if batch.num_rows() > released {
        return Err(format!(
            "{} rows from {released} released groups",
            batch.num_rows()
        ));
    }
    for row in rows(&batch) {
        for (i, agg) in query.aggs.iter().enumerate() {
            if agg.is_count() {
                match row[keys + i] {
                    Cell::Num(Some(v)) if v >= 0.0 && v % BASE as f64 == 0.0 => {}
                    ref other => {
                        return Err(format!(
                            "a{i} = {other:?} is not a multiple of {BASE} (row {row:?})"
                        ));
                    }
                }
            }
        }
        // Some trusts, each with at least the minimum of the group's patients, released it:
        // try every choice of one candidate group (or none) per trust. (A ROLLUP's rolled-up
        // null and a real null key can share key text, hence candidates.)
        let key = key_text(&row, keys);
        let options: Vec<Vec<Option<&TruthRow>>> = truth
            .iter()
            .map(|(_, groups, _)| {
                let mut options = vec![None];
                options.extend(
                    groups
                        .get(&key)
                        .into_iter()
                        .flatten()
                        .filter(|g| g.patients >= MIN_PATIENTS)
                        .map(Some),
                );
                options
            })
            .collect();
        let mut choice = vec![0; options.len()];
        let mut explained = false;
        loop {
            let set: Vec<&TruthRow> = choice
                .iter()
                .zip(&options)
                .filter_map(|(&c, o)| o[c])
                .collect();
            // No trust at all explains only the one row of a query without GROUP BY.
            if (!set.is_empty() || keys == 0) && explains(query, &row, &set) {
                explained = true;
                break;
            }
            // Next choice (odometer).
            let mut at = 0;
            while at < choice.len() {
                choice[at] += 1;
                if choice[at] < options[at].len() {
                    break;
                }
                choice[at] = 0;
                at += 1;
            }
            if at == choice.len() {
                break;
            }
        }
        if !explained {
            let seen: Vec<(&str, Vec<&TruthRow>)> = truth
                .iter()
                .map(|(t, g, _)| (t.as_str(), g.get(&key).into_iter().flatten().collect()))
                .collect();
            return Err(format!(
                "released row {row:?} is not what any set of trusts with at least \
                 {MIN_PATIENTS} of its patients releases; the trusts' groups: {seen:?}"
            ));
        }
    }
    Ok(())
}

#[tokio::test]
async fn protected_random_queries_release_only_what_the_policy_allows() {
    let seed = seed();
    eprintln!("fuzz (protected): TRUSTQL_FUZZ_SEED={seed}");
    let fed = launch(&options(false)).await.expect("launch");
    let mut client = client(&fed).await;
    let union = central(&fed).await;
    let trusts = trust_contexts(&fed).await;
    let mut generator = Generator {
        rng: Rng(seed ^ 0x7364_6321),
        values: values(&union).await,
    };
    let budget = Budget::from_env();
    let (mut done, mut refused, mut compared) = (0, 0, 0);
    while budget.more(done) {
        let query = if generator.rng.chance(20) {
            generator.off_query()
        } else {
            generator.query()
        };
        let sql = query.sql();
        let outcome = async {
            match (client.query(&sql).await, query.off) {
                (Ok(result), None) => {
                    let truth = truth(&trusts, &query).await?;
                    compared += result
                        .batches
                        .iter()
                        .map(RecordBatch::num_rows)
                        .sum::<usize>();
                    check_protected(&query, &result, &truth)?;
                    Ok(false)
                }
                (Ok(_), Some(what)) => Err(format!(
                    "answered, but {what} is outside the table builder and should be refused"
                )),
                (Err(e), Some(what)) => {
                    if what == DISTINCT_NON_KEY {
                        distinct_refusal(&e.to_string())?;
                    } else {
                        clear_refusal(&e.to_string())?;
                    }
                    still_answers(&mut client).await?;
                    Ok(true)
                }
                (Err(e), None) => Err(format!("a table-builder query was not answered: {e}")),
            }
        }
        .await;
        match outcome {
            Ok(true) => refused += 1,
            Ok(false) => {}
            Err(why) => fail(seed, done, &sql, &why),
        }
        done += 1;
    }
    eprintln!(
        "fuzz (protected): {done} queries ({refused} refused as expected, {compared} released \
         rows checked) in {:.1} s",
        budget.started.elapsed().as_secs_f64()
    );
    assert!(
        done > 0 && done > refused,
        "some queries ran and were answered"
    );
}
