//! Record keys for the cell-key method: every patient of the trust gets a fixed pseudo-random
//! 64-bit key, an HMAC-SHA256 of its id under a secret the trust keeps in its state directory.
//!
//! A cell's key is the sum of its patients' record keys (mod 2^64), so the same set of
//! patients always gets the same cell key, whatever the wording of the query. The keys are
//! computed once when the node opens and held in memory: a query looks a key up per patient
//! and never hashes. Neither the secret nor any key is logged, written beside the data, or
//! sent: whoever knew them could tell which perturbation a cell got, and undo it.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use arrow::array::AsArray;
use arrow::compute::cast;
use arrow::datatypes::{DataType, Int64Type};
use datafusion::common::hash_utils::RandomState;
use datafusion::prelude::SessionContext;
use futures::StreamExt;
use ring::hmac;
use trustql_schemas::TrustSchema;

use crate::error::NodeError;
use crate::secret_file;

/// File name of the record-key secret inside the node's state directory.
pub const RECORD_KEYS_FILE: &str = "record-keys.key";

/// Domain separation: this secret's MACs mean nothing anywhere else.
const DOMAIN: &[u8] = b"trustql-record-key/1";

/// The trust's secret for record keys: the same secret gives the same keys across restarts,
/// so a restart cannot give the same cells fresh adjustments.
pub struct RecordKeySecret(hmac::Key);

impl std::fmt::Debug for RecordKeySecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.write_str("RecordKeySecret(..)")
    }
}

impl RecordKeySecret {
    /// The secret in `state_dir` ([`RECORD_KEYS_FILE`], 64 hex digits), made at first start,
    /// readable by its owner only. A file that is not such a secret is an error and is left
    /// as it is: replacing it would change every key.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, NodeError> {
        let bytes = secret_file::load_or_create(
            &state_dir.join(RECORD_KEYS_FILE),
            "record-key secret",
            "replacing it would change every patient's record key",
        )?;
        Ok(Self::from_bytes(&bytes))
    }

    /// A random secret held in memory only, for tests and benchmarks.
    pub fn ephemeral() -> Result<Self, NodeError> {
        let bytes = secret_file::random().map_err(|()| {
            NodeError::Config("the system random source failed: no record-key secret".into())
        })?;
        Ok(Self::from_bytes(&bytes))
    }

    fn from_bytes(bytes: &[u8; 32]) -> Self {
        RecordKeySecret(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    /// The record key of one patient: the first 8 bytes, big-endian, of the HMAC of the
    /// domain and the id's little-endian bytes.
    fn record_key(&self, patient: i64) -> u64 {
        let mut context = hmac::Context::with_key(&self.0);
        context.update(DOMAIN);
        context.update(&patient.to_le_bytes());
        let tag = context.sign();
        let mut first = [0u8; 8];
        first.copy_from_slice(&tag.as_ref()[..8]);
        u64::from_be_bytes(first)
    }
}

/// The record key of every patient in the trust's data.
pub(crate) struct RecordKeys {
    keys: HashMap<i64, u64, RandomState>,
}

impl std::fmt::Debug for RecordKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a key.
        write!(f, "RecordKeys({} patients)", self.keys.len())
    }
}

impl RecordKeys {
    /// Keys every distinct patient id of each table that holds the patient key (a table that
    /// reaches the patient only through another holds no patient of its own). Ids are read
    /// with DataFusion over `ctx`; null ids have no key.
    pub(crate) async fn compute(
        ctx: &SessionContext,
        schema: &TrustSchema,
        secret: &RecordKeySecret,
    ) -> Result<Self, NodeError> {
        let started = Instant::now();
        let mut keys: HashMap<i64, u64, RandomState> = HashMap::default();
        for table in schema.tables() {
            let Some(column) = schema.patient_column(&table.name).map_err(failed)? else {
                continue;
            };
            let mut batches = ctx
                .table(table.name.as_str())
                .await
                .and_then(|t| t.select_columns(&[column.as_str()]))
                .and_then(|t| t.distinct())
                .map_err(failed)?
                .execute_stream()
                .await
                .map_err(failed)?;
            while let Some(batch) = batches.next().await {
                let batch = batch.map_err(failed)?;
                let ids = cast(batch.column(0), &DataType::Int64).map_err(failed)?;
                for id in ids.as_primitive::<Int64Type>().iter().flatten() {
                    keys.entry(id).or_insert_with(|| secret.record_key(id));
                }
            }
        }
        keys.shrink_to_fit();
        let keys = RecordKeys { keys };
        tracing::info!(
            patients = keys.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "computed the record keys"
        );
        Ok(keys)
    }

    /// The record key of `patient`, if the trust's data holds that patient.
    #[allow(
        dead_code,
        reason = "the cell-key accumulator (issue 16) looks keys up"
    )]
    pub(crate) fn key(&self, patient: i64) -> Option<u64> {
        self.keys.get(&patient).copied()
    }

    /// How many patients have a key.
    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }
}

/// Logs the cause locally (it may quote data) and says only that the keys failed.
fn failed<E: std::fmt::Display>(cause: E) -> NodeError {
    tracing::error!(%cause, "the record keys could not be computed");
    NodeError::RecordKeys
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Arc;

    use datafusion::prelude::ParquetReadOptions;
    use trustql_policies::{approve, load_approved};
    use trustql_synth::{SynthConfig, generate};

    use super::*;
    use crate::config::Limits;
    use crate::engine::SiteEngine;

    const FIXED: [u8; 32] = [7; 32];

    #[test]
    fn the_key_is_the_documented_hmac() {
        let secret = RecordKeySecret::from_bytes(&FIXED);
        let key = hmac::Key::new(hmac::HMAC_SHA256, &FIXED);
        for id in [0i64, 1, -1, 42, i64::MIN, i64::MAX] {
            let mut message = b"trustql-record-key/1".to_vec();
            message.extend_from_slice(&id.to_le_bytes());
            let tag = hmac::sign(&key, &message);
            let expected = u64::from_be_bytes(tag.as_ref()[..8].try_into().expect("8 bytes"));
            assert_eq!(secret.record_key(id), expected, "id {id}");
        }
    }

    #[test]
    fn the_secret_is_made_once_private_and_reloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let first = RecordKeySecret::load_or_create(&state).expect("created");
        let path = state.join(RECORD_KEYS_FILE);
        let text = std::fs::read_to_string(&path).expect("secret file");
        assert_eq!(text.trim().len(), 64, "64 hex digits");
        assert!(!state.join("record-keys.key.tmp").exists());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        let again = RecordKeySecret::load_or_create(&state).expect("reloaded");
        assert_eq!(std::fs::read_to_string(&path).expect("secret file"), text);
        let other = RecordKeySecret::ephemeral().expect("a secret");
        let ids = 0..1_000i64;
        let keys = |s: &RecordKeySecret| ids.clone().map(|i| s.record_key(i)).collect::<Vec<_>>();
        assert_eq!(
            keys(&first),
            keys(&again),
            "the same secret gives the same keys"
        );
        let differ = keys(&first)
            .iter()
            .zip(keys(&other))
            .filter(|(a, b)| **a != *b)
            .count();
        assert_eq!(differ, 1_000, "another secret gives other keys");
        assert_eq!(format!("{first:?}"), "RecordKeySecret(..)");
        assert!(!format!("{first:?}").contains(text.trim()));
    }

    #[test]
    fn a_malformed_secret_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(RECORD_KEYS_FILE);
        for bad in [
            "",
            "not hex at all",
            &"ab".repeat(31),
            &"ab".repeat(33),
            &format!("+f{}", "ab".repeat(31)),
        ] {
            std::fs::write(&path, bad).expect("write");
            match RecordKeySecret::load_or_create(dir.path()) {
                Err(NodeError::Config(message)) => {
                    assert!(message.contains(RECORD_KEYS_FILE), "{message}");
                }
                other => panic!("{bad:?}: {other:?}"),
            }
            assert_eq!(std::fs::read_to_string(&path).expect("kept"), bad);
        }
    }

    #[test]
    fn keys_are_spread_uniformly() {
        let secret = RecordKeySecret::from_bytes(&FIXED);
        let n = 10_000;
        let keys: Vec<u64> = (0..n).map(|i| secret.record_key(i)).collect();
        let mean = keys.iter().map(|&k| k as f64 / 2f64.powi(64)).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
        assert_eq!(keys.iter().collect::<HashSet<_>>().len(), keys.len());
        // Each sixteenth of the range holds about 625 keys (sd 24).
        let mut buckets = [0usize; 16];
        for k in &keys {
            buckets[(k >> 60) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|&b| b.abs_diff(625) < 120),
            "{buckets:?}"
        );
    }

    #[tokio::test]
    async fn every_patient_of_the_trust_has_a_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let schema = TrustSchema::cancer().expect("schema");
        let fed = dir.path().join("fed");
        let config = SynthConfig {
            trusts: 1,
            patients: 300,
            seed: 11,
            shared_share: 0.0,
            ..SynthConfig::default()
        };
        generate(&schema, &config, &fed).expect("generate");
        let policy_path = dir.path().join("policy.toml");
        std::fs::write(
            &policy_path,
            "[policy]\nversion = \"test\"\ntrust = \"TQ01\"\n\n[disclosure]\nmin_patients = 10\n\n\
             [[project]]\nid = \"p1\"\nresearchers = [\"alice\"]\ntables = [\"sim_av_patient\"]\n\
             expires = \"2099-12-31\"\n",
        )
        .expect("policy");
        approve(&policy_path, "Test Controller", &schema).expect("approve");
        let policy = load_approved(&policy_path, &schema).expect("load");
        let site = fed.join("TQ01");
        let secret = RecordKeySecret::ephemeral().expect("a secret");
        let engine = SiteEngine::open("TQ01", schema.clone(), policy, &site, &Limits::default())
            .await
            .expect("opens")
            .with_record_keys(&secret)
            .await
            .expect("keys");
        let keys: &Arc<RecordKeys> = engine.record_keys.as_ref().expect("keys");

        // The ids, read independently: a plain session over each file holding the key.
        let plain = SessionContext::new();
        let mut ids = HashSet::new();
        let mut tables = 0;
        for table in schema.tables() {
            let Some(column) = schema.patient_column(&table.name).expect("schema") else {
                continue;
            };
            tables += 1;
            let path = trustql_schemas::table_path(&site, &table.name);
            plain
                .register_parquet(
                    table.name.as_str(),
                    path.to_str().expect("path"),
                    ParquetReadOptions::default(),
                )
                .await
                .expect("register");
            let batches = plain
                .sql(&format!("SELECT \"{column}\" FROM \"{}\"", table.name))
                .await
                .expect("sql")
                .collect()
                .await
                .expect("rows");
            for batch in batches {
                let column = cast(batch.column(0), &DataType::Int64).expect("ids");
                ids.extend(column.as_primitive::<Int64Type>().iter().flatten());
            }
        }
        assert!(tables > 1, "several tables hold the patient key");
        assert!(ids.len() >= 300, "{} ids", ids.len());
        assert_eq!(keys.len(), ids.len());
        for &id in &ids {
            assert_eq!(keys.key(id), Some(secret.record_key(id)), "patient {id}");
        }
        assert_eq!(keys.key(i64::MIN), None, "no key for an id the trust lacks");

        // Two starts from one state directory key every patient alike; another secret does not.
        let state = dir.path().join("state");
        let compute = async |secret: &RecordKeySecret| {
            RecordKeys::compute(&engine.ctx, &schema, secret)
                .await
                .expect("keys")
        };
        let first = compute(&RecordKeySecret::load_or_create(&state).expect("made")).await;
        let second = compute(&RecordKeySecret::load_or_create(&state).expect("loaded")).await;
        assert_eq!(first.keys, second.keys);
        let other = compute(&secret).await;
        assert!(ids.iter().all(|&id| first.key(id) != other.key(id)));
        assert!(!format!("{keys:?}").contains(&secret.record_key(0).to_string()));
    }
}
