//! TrustQL's benchmarks live in `benches/`; run them with `cargo bench -p trustql-benches`.
