//! Synthetic multi-trust cancer data in the TrustQL schema.
//!
//! Patients are drawn one at a time from the Simulacrum's published marginals (tumour site,
//! stage, grade, age, sex, deprivation quintile…), given a survival time by site, stage and age,
//! and, for a plausible share, chemotherapy and radiotherapy. Trusts differ in size, and a
//! configurable share of patients is seen at two trusts: the same `linknumber` at both, a
//! different local `patientid` at each, diagnosis at one and treatment at the other.
//!
//! Generation works in chunks of patients, each with its own random stream derived from the seed
//! and the chunk number, so the output depends only on the seed, never on the thread count.

// Library code returns errors; only tests may expect().
#![cfg_attr(not(test), deny(clippy::expect_used))]

mod buffer;
mod clinical;
mod error;
mod marginals;
mod pathway;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arrow::array::RecordBatch;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use trustql_schemas::{MAX_TRUSTS, SiteWriter, TrustSchema, trust_codes, trust_weights};

pub use error::SynthError;
pub use marginals::{Categorical, Reference};
pub use pathway::{ETHNICITY, FIRST_DIAGNOSIS, FOLLOW_UP_END, LAST_DIAGNOSIS, TABLES};

use buffer::TableBuffer;
use pathway::{Distributions, Placement};

/// Patients per chunk (one random stream and one record batch per table per trust).
const CHUNK: u64 = 8_192;

/// What to generate.
#[derive(Debug, Clone)]
pub struct SynthConfig {
    /// Number of trusts (1–99).
    pub trusts: usize,
    /// Number of distinct patients across the federation.
    pub patients: u64,
    /// Random seed: the same seed gives the same files.
    pub seed: u64,
    /// Share of patients diagnosed at one trust and treated at another (0–1).
    pub shared_share: f64,
    /// Worker threads (0 = one per core).
    pub threads: usize,
    /// Whether existing files in the output directory may be replaced.
    pub overwrite: bool,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            trusts: 3,
            patients: 10_000,
            seed: 42,
            shared_share: 0.1,
            threads: 0,
            overwrite: false,
        }
    }
}

/// Rows written per trust and table.
#[derive(Debug, Clone, Default)]
pub struct SynthSummary {
    /// Trust code → table → rows.
    pub rows: BTreeMap<String, BTreeMap<String, u64>>,
}

impl SynthSummary {
    /// Rows of one table summed over trusts.
    pub fn total(&self, table: &str) -> u64 {
        self.rows.values().filter_map(|t| t.get(table)).sum()
    }
}

fn pick<R: Rng>(rng: &mut R, cumulative: &[f64]) -> usize {
    let total = cumulative.last().copied().unwrap_or(1.0);
    let x = rng.random::<f64>() * total;
    cumulative
        .partition_point(|&c| c <= x)
        .min(cumulative.len().saturating_sub(1))
}

/// Generates a federation into `out/<TRUST_CODE>/<table>.parquet`.
pub fn generate(
    schema: &TrustSchema,
    config: &SynthConfig,
    out: &Path,
) -> Result<SynthSummary, SynthError> {
    if config.trusts == 0 || config.trusts > MAX_TRUSTS {
        return Err(SynthError::Config(format!(
            "--trusts must be between 1 and {MAX_TRUSTS}"
        )));
    }
    if config.patients == 0 {
        return Err(SynthError::Config("--patients must be at least 1".into()));
    }
    if !(0.0..=1.0).contains(&config.shared_share) {
        return Err(SynthError::Config(
            "the shared share must be between 0 and 1".into(),
        ));
    }
    let names: Vec<&str> = schema.tables().iter().map(|t| t.name.as_str()).collect();
    if names != TABLES {
        return Err(SynthError::Schema(format!(
            "expected tables {TABLES:?}, found {names:?}"
        )));
    }
    let distributions = Distributions::new(schema)?;
    let codes = trust_codes(config.trusts);
    let schemas: Vec<_> = schema.tables().iter().map(|t| t.arrow_schema()).collect();

    let mut sites = Vec::with_capacity(codes.len());
    for code in &codes {
        sites.push(SiteWriter::create(
            schema,
            &out.join(code),
            config.overwrite,
        )?);
    }

    let threads = if config.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        config.threads
    };
    let chunks = config.patients.div_ceil(CHUNK);
    let work = Work {
        distributions: &distributions,
        codes: &codes,
        schemas: &schemas,
        config,
    };
    let mut next = 0u64;
    while next < chunks {
        let round: Vec<u64> = (next..chunks.min(next + threads as u64)).collect();
        next += round.len() as u64;
        let results: Vec<Result<Vec<Vec<RecordBatch>>, SynthError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = round
                .iter()
                .map(|&chunk| scope.spawn(move || work.chunk(chunk)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(SynthError::Encode("a generator thread panicked".into()))
                    })
                })
                .collect()
        });
        // Writing is parallel across trusts; chunk order is kept, so output is deterministic.
        let mut batches: Vec<Vec<Vec<RecordBatch>>> = Vec::with_capacity(results.len());
        for result in results {
            batches.push(result?);
        }
        std::thread::scope(|scope| {
            let handles: Vec<_> = sites
                .iter_mut()
                .enumerate()
                .map(|(trust, site)| {
                    let batches = &batches;
                    scope.spawn(move || {
                        for chunk in batches {
                            site.write(&chunk[trust])?;
                        }
                        Ok::<(), SynthError>(())
                    })
                })
                .collect();
            handles.into_iter().try_for_each(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(SynthError::Encode("a writer thread panicked".into())))
            })
        })?;
    }

    let mut summary = SynthSummary::default();
    for (code, site) in codes.iter().zip(sites) {
        summary.rows.insert(code.clone(), site.finish()?);
    }
    Ok(summary)
}

/// What every generator thread shares.
#[derive(Clone, Copy)]
struct Work<'a> {
    distributions: &'a Distributions,
    codes: &'a [String],
    schemas: &'a [arrow::datatypes::SchemaRef],
    config: &'a SynthConfig,
}

impl Work<'_> {
    /// Generates one chunk of patients: a batch per trust per table.
    fn chunk(self, chunk: u64) -> Result<Vec<Vec<RecordBatch>>, SynthError> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed);
        rng.set_stream(chunk);
        let trusts = self.codes.len();
        let cumulative: Vec<f64> = trust_weights(trusts)
            .iter()
            .scan(0.0, |acc, w| {
                *acc += w;
                Some(*acc)
            })
            .collect();
        let mut buffers: Vec<Vec<TableBuffer>> = (0..trusts)
            .map(|_| {
                self.schemas
                    .iter()
                    .map(|s| TableBuffer::new(Arc::clone(s)))
                    .collect::<Result<_, _>>()
            })
            .collect::<Result<_, _>>()?;
        let first = chunk * CHUNK;
        let last = (first + CHUNK).min(self.config.patients);
        for index in first..last {
            let home = pick(&mut rng, &cumulative);
            let treating =
                (trusts > 1 && rng.random::<f64>() < self.config.shared_share).then(|| {
                    // Any other trust, in proportion to its size.
                    loop {
                        let t = pick(&mut rng, &cumulative);
                        if t != home {
                            break t;
                        }
                    }
                });
            pathway::generate_patient(
                self.distributions,
                index,
                Placement { home, treating },
                self.codes,
                &mut rng,
                &mut buffers,
            );
        }
        buffers
            .iter_mut()
            .map(|tables| tables.iter_mut().map(TableBuffer::finish).collect())
            .collect()
    }
}
