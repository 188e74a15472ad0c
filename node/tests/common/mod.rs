//! Shared set-up for node tests: a synthetic trust, approved policies.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use trustql_policies::{ApprovedPolicy, approve, load_approved};
use trustql_schemas::TrustSchema;
use trustql_synth::{SynthConfig, generate};

pub(crate) const ALL_TABLES: &str = r#"["sim_av_patient", "sim_av_tumour", "sim_sact_regimen", "sim_sact_cycle", "sim_sact_drug_detail", "sim_sact_outcome", "sim_rtds_episode", "sim_rtds_prescription"]"#;

pub(crate) fn schema() -> TrustSchema {
    TrustSchema::cancer().expect("schema")
}

/// Generates one trust (TQ01) with `patients` patients; returns the federation directory.
pub(crate) fn synth(dir: &Path, patients: u64) -> PathBuf {
    let out = dir.join("fed");
    let config = SynthConfig {
        trusts: 1,
        patients,
        seed: 11,
        shared_share: 0.0,
        ..SynthConfig::default()
    };
    generate(&schema(), &config, &out).expect("generate");
    out
}

/// Researcher alice's request `r1` of project p1.
pub(crate) fn request(sql: &str) -> trustql_protocol::SiteRequest {
    trustql_protocol::SiteRequest {
        request_id: "r1".into(),
        researcher: "alice".into(),
        project: "p1".into(),
        sql: sql.into(),
        ..Default::default()
    }
}

/// A plain DataFusion session (no TrustQL rules) over one site's Parquet, for exact answers.
pub(crate) async fn plain_session(site: &Path) -> datafusion::prelude::SessionContext {
    let ctx = datafusion::prelude::SessionContext::new();
    for table in schema().tables() {
        let path = trustql_schemas::table_path(site, &table.name);
        ctx.register_parquet(
            table.name.as_str(),
            path.to_str().expect("path"),
            datafusion::prelude::ParquetReadOptions::default(),
        )
        .await
        .expect("register");
    }
    ctx
}

/// Writes, approves and loads a policy for TQ01 with the given [disclosure] body.
pub(crate) fn policy(dir: &Path, disclosure: &str) -> (PathBuf, ApprovedPolicy) {
    let path = dir.join("policy.toml");
    let text = format!(
        "[policy]\nversion = \"test\"\ntrust = \"TQ01\"\n\n[disclosure]\n{disclosure}\n\n\
         [[project]]\nid = \"p1\"\nresearchers = [\"alice\"]\ntables = {ALL_TABLES}\nexpires = \"2099-12-31\"\n"
    );
    std::fs::write(&path, text).expect("write policy");
    approve(&path, "Test Controller", &schema()).expect("approve");
    let loaded = load_approved(&path, &schema()).expect("load");
    (path, loaded)
}

/// TQ01's engine over `fed` under `policy`, keeping DP spending in `dir/state` when `ledger`.
pub(crate) async fn open_engine(
    dir: &Path,
    fed: &Path,
    policy: ApprovedPolicy,
    ledger: bool,
) -> trustql_node::SiteEngine {
    let engine = trustql_node::SiteEngine::open(
        "TQ01",
        schema(),
        policy,
        &fed.join("TQ01"),
        &trustql_node::Limits::default(),
    )
    .await
    .expect("engine opens")
    .with_record_keys(&trustql_node::RecordKeySecret::ephemeral().expect("a secret"))
    .await
    .expect("record keys");
    if !ledger {
        return engine;
    }
    let ledger = trustql_budget::Ledger::open(&dir.join("state/budget.ledger")).expect("ledger");
    engine.with_ledger(std::sync::Arc::new(ledger))
}

/// Every record of the audit log in `audit`.
pub(crate) fn records(audit: &Path) -> Vec<trustql_audit::AuditRecord> {
    std::fs::read_to_string(audit.join(trustql_audit::LOG_FILE))
        .expect("audit log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("record"))
        .collect()
}

/// No protection: every group, exact counts (for correctness checks only).
pub(crate) const UNPROTECTED: &str =
    "min_patients = 1\nrounding = \"none\"\nwithhold_whole_margin_cells = false";

/// [`UNPROTECTED`], and MIN/MAX of clinical columns allowed (off by default); ends in the
/// `[classes.clinical]` table, so nothing may be appended to it.
pub(crate) const UNPROTECTED_EXTREMES: &str = "min_patients = 1\nrounding = \"none\"\n\
     withhold_whole_margin_cells = false\n\n[classes.clinical]\ngroup_by = true\nfilter = true\n\
     aggregate = true\nmin_max = true";

/// Certificates for a node, its coordinator, and an impostor signed by another CA; the
/// coordinator's request-signing key.
pub(crate) struct Pki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub ca_pem: String,
    /// The CA itself, to issue more certificates in a test.
    pub authority: trustql_devcerts::DevCa,
    pub node: trustql_devcerts::CertFiles,
    /// The coordinator's client certificate, which the node pins.
    pub coordinator: trustql_devcerts::Issued,
    pub impostor: trustql_devcerts::Issued,
    /// The coordinator's request-signing key, and its public half's file.
    pub signer: trustql_protocol::RequestSigner,
    pub request_key: PathBuf,
}

pub(crate) fn pki(dir: &Path) -> Pki {
    let dir = dir.join("pki");
    let ca = trustql_devcerts::DevCa::new("TrustQL test CA").expect("ca");
    let rogue = trustql_devcerts::DevCa::new("Rogue CA").expect("rogue ca");
    let node = ca
        .issue_server("TQ01 node", &["localhost", "127.0.0.1"])
        .expect("node cert")
        .write(&dir, "node")
        .expect("write node cert");
    let key = trustql_devcerts::SigningKey::generate().expect("signing key");
    let key_files = key.write(&dir, "requests").expect("write signing key");
    Pki {
        ca: ca.write_cert(&dir, "ca.pem").expect("write ca"),
        ca_pem: ca.cert_pem(),
        node,
        coordinator: ca
            .issue_client("coordinator (client)")
            .expect("coordinator cert"),
        impostor: rogue
            .issue_client("coordinator (client)")
            .expect("impostor cert"),
        signer: trustql_protocol::RequestSigner::from_pem(key.key_pem.as_bytes())
            .expect("the signing key loads"),
        request_key: key_files.public,
        authority: ca,
        dir,
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

/// `request` as the coordinator sends it to TQ01: signed, issued now.
pub(crate) fn signed_ticket(
    pki: &Pki,
    request: trustql_protocol::SiteRequest,
) -> arrow_flight::Ticket {
    signed_ticket_at(pki, request, "TQ01", now_ms())
}

/// `request` signed by the coordinator for `trust`, issued at `issued_unix_ms`.
pub(crate) fn signed_ticket_at(
    pki: &Pki,
    request: trustql_protocol::SiteRequest,
    trust: &str,
    issued_unix_ms: u64,
) -> arrow_flight::Ticket {
    let signed = trustql_protocol::SignedRequest {
        trust: trust.into(),
        issued_unix_ms,
        request,
    };
    arrow_flight::Ticket::new(pki.signer.sign(&signed).expect("signed"))
}

/// A node configuration for TQ01 over `fed`, listening on 127.0.0.1:0.
pub(crate) fn node_config(
    dir: &Path,
    fed: &Path,
    policy: &Path,
    pki: &Pki,
    limits: trustql_node::Limits,
) -> trustql_node::NodeConfig {
    trustql_node::NodeConfig {
        trust: "TQ01".into(),
        data_dir: fed.join("TQ01"),
        policy: policy.to_path_buf(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        audit_dir: dir.join("audit"),
        state_dir: dir.join("state"),
        tls: trustql_node::TlsConfig {
            cert: pki.node.cert.clone(),
            key: pki.node.key.clone(),
            client_ca: pki.ca.clone(),
        },
        coordinator: trustql_node::CoordinatorIdentity {
            client_cert_sha256: vec![pki.coordinator.sha256_fingerprint()],
            request_keys: vec![pki.request_key.clone()],
            max_request_age_secs: 300,
            max_clock_ahead_secs: 5,
        },
        limits,
        pool: Default::default(),
    }
}

/// A Flight client over TLS to `addr`, trusting `ca_pem`, presenting `identity` if any.
pub(crate) async fn client(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    identity: Option<&trustql_devcerts::Issued>,
) -> Result<
    arrow_flight::flight_service_client::FlightServiceClient<tonic::transport::Channel>,
    String,
> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(&id.cert_pem, &id.key_pem));
    }
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(arrow_flight::flight_service_client::FlightServiceClient::new(channel))
}
