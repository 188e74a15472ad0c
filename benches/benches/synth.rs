//! Synthetic data generation rate (patients per second, Parquet written to a temporary
//! directory), on one thread and on every core, side by side.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use trustql_schemas::TrustSchema;
use trustql_synth::{SynthConfig, generate};

const PATIENTS: u64 = 50_000;

fn synth(c: &mut Criterion) {
    let schema = match TrustSchema::cancer() {
        Ok(schema) => schema,
        Err(e) => panic!("the built-in schema does not load: {e}"),
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut group = c.benchmark_group("synth");
    group.throughput(Throughput::Elements(PATIENTS));
    group.sample_size(10);
    for threads in [1, cores] {
        group.bench_with_input(
            BenchmarkId::new("threads", threads),
            &threads,
            |b, &threads| {
                b.iter_batched(
                    || tempfile::tempdir().expect("tempdir"),
                    |dir| {
                        let config = SynthConfig {
                            trusts: 3,
                            patients: PATIENTS,
                            seed: 1,
                            threads,
                            ..SynthConfig::default()
                        };
                        generate(&schema, &config, &dir.path().join("fed")).expect("generate");
                        dir
                    },
                    criterion::BatchSize::PerIteration,
                );
            },
        );
    }
    group.finish();
}

criterion_group!(benches, synth);
criterion_main!(benches);
