//! A whole federation on loopback, for `trustql demo` and end-to-end tests: synthetic data
//! (or a given directory), a throwaway CA and certificates, one approved policy per trust,
//! one node per trust and a coordinator, all on 127.0.0.1 with ports the OS picks.

// Library code returns errors; only tests may expect().
#![cfg_attr(not(test), deny(clippy::expect_used))]

use std::path::{Path, PathBuf};

use serde::Serialize;
use trustql_coordinator::{
    CoordinatorConfig, NodeEntry, Quorum, ResearcherEntry, RunningCoordinator, TlsFiles,
    TotalsRules, random_hex, token_hash,
};
use trustql_devcerts::{DevCa, SigningKey};
use trustql_node::{CoordinatorIdentity, Limits, NodeConfig, PoolConfig, RunningNode, TlsConfig};
use trustql_policies::{QueryAllowance, Rounding};
use trustql_schemas::{TrustSchema, trust_codes};
use trustql_synth::{SynthConfig, generate};

/// The demo project and its researcher.
pub const PROJECT: &str = "demo";
/// The researcher the demo token belongs to.
pub const RESEARCHER: &str = "analyst";
/// A second researcher on the demo project at every trust (the demo's coordinator gives them
/// no token; tests that run their own coordinator do).
pub const COLLEAGUE: &str = "colleague";

/// Errors setting up the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A step failed; the message says which and why.
    #[error("{step}: {reason}")]
    Step {
        /// What was being done.
        step: String,
        /// Why it failed.
        reason: String,
    },
}

fn step<E: std::fmt::Display>(step: &str) -> impl FnOnce(E) -> DemoError + '_ {
    move |e| DemoError::Step {
        step: step.to_string(),
        reason: e.to_string(),
    }
}

/// What to launch.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Number of trusts (when generating data).
    pub trusts: usize,
    /// Patients across the federation (when generating data).
    pub patients: u64,
    /// Seed for the synthetic data.
    pub seed: u64,
    /// Use this federation directory instead of generating one.
    pub data: Option<PathBuf>,
    /// Minimum count 1 and no rounding at every node (correctness checks only).
    pub unprotected: bool,
    /// Protect the demo project by suppression and rounding to 5 at every node instead of the
    /// cell-key method (`trustql demo --rounding`).
    pub rounding: bool,
    /// The coordinator's deadline per node.
    pub node_deadline_ms: u64,
    /// How many trusts must answer.
    pub quorum: Quorum,
    /// Run the demo project in differential-privacy mode with this budget at every trust.
    pub dp: Option<DemoDp>,
    /// The coordinator's totals rules, instead of the ones that go with the nodes' policies.
    pub totals: Option<TotalsRules>,
    /// More researchers on the demo project at every trust's policy, beside [`RESEARCHER`] and
    /// [`COLLEAGUE`] (the demo's coordinator gives them no token; tests that run their own
    /// coordinator do, such as the load test's hundred researchers).
    pub researchers: Vec<String>,
    /// The demo project's query allowance at every trust (cell-key or suppression and
    /// rounding), instead of the policy default ([`trustql_policies::DEFAULT_QUERIES_PER_DAY`]
    /// a day).
    pub query_allowance: Option<QueryAllowance>,
    /// Allow MIN/MAX of clinical columns (off by default; the unprotected mode always allows
    /// them, to compare with one process over the union).
    pub extremes: bool,
    /// Pool the demo project across every trust (`trustql demo --pool`): the trusts add their
    /// exact states under pairwise masks and the coordinator protects the total once.
    pub pool: bool,
}

/// With `--dp`: most rows of a table one patient brings to an aggregate (others: 1).
pub const DP_ROWS_PER_PATIENT: &[(&str, u32)] = &[
    ("sim_av_tumour", 3),
    ("sim_sact_regimen", 5),
    ("sim_rtds_episode", 5),
    ("sim_rtds_prescription", 10),
];

/// With `--dp`: the clamping bounds of the summable columns, `table.column`.
pub const DP_BOUNDS: &[(&str, f64, f64)] = &[
    ("sim_av_tumour.age", 0.0, 110.0),
    ("sim_sact_regimen.height_at_start_of_regimen", 1.0, 2.2),
    ("sim_sact_regimen.weight_at_start_of_regimen", 30.0, 200.0),
];

/// The demo project's privacy budget at each trust (`trustql demo --dp`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DemoDp {
    /// ε a query spends at each trust.
    pub epsilon_per_query: f64,
    /// ε the project may spend at each trust in all.
    pub epsilon_budget: f64,
}

impl Default for DemoDp {
    fn default() -> Self {
        DemoDp {
            epsilon_per_query: 1.0,
            epsilon_budget: 20.0,
        }
    }
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            trusts: 3,
            patients: 20_000,
            seed: 42,
            data: None,
            unprotected: false,
            rounding: false,
            node_deadline_ms: 30_000,
            quorum: Quorum::All,
            dp: None,
            totals: None,
            researchers: Vec::new(),
            query_allowance: None,
            extremes: false,
            pool: false,
        }
    }
}

/// How a client connects (written by `trustql demo --info FILE`).
#[derive(Debug, Clone, Serialize)]
pub struct DemoInfo {
    /// The coordinator's Flight SQL URL.
    pub url: String,
    /// The researcher's bearer token.
    pub token: String,
    /// The project to name in `x-trustql-project`.
    pub project: String,
    /// The CA certificate (PEM) that signed the coordinator's certificate.
    pub ca: PathBuf,
    /// The federation's data directory.
    pub data_dir: PathBuf,
    /// The trusts' codes.
    pub trusts: Vec<String>,
    /// With `--dp`: the ε a query spends at each trust.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epsilon_per_query: Option<f64>,
    /// With `--dp`: the ε the project may spend at each trust in all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epsilon_budget: Option<f64>,
    /// With `--pool`: the demo project is pooled across every trust, so protection applies
    /// once, to the total.
    pub pooled: bool,
}

/// A running demo federation; dropping it stops everything and removes its files.
pub struct Federation {
    /// How to connect.
    pub info: DemoInfo,
    /// The nodes, in trust order.
    pub nodes: Vec<RunningNode>,
    /// Their configurations, in the same order (to start one again).
    pub node_configs: Vec<NodeConfig>,
    /// The coordinator.
    pub coordinator: RunningCoordinator,
    /// Per-trust audit directories.
    pub audit_dirs: Vec<PathBuf>,
    /// The coordinator's own audit log.
    pub coordinator_audit: PathBuf,
    work: tempfile::TempDir,
}

impl Federation {
    /// The working directory (certificates, policies, audit logs, generated data).
    pub fn work_dir(&self) -> &Path {
        self.work.path()
    }
}

/// Generates (or finds) the data, makes certificates and policies, starts everything.
pub async fn launch(options: &DemoOptions) -> Result<Federation, DemoError> {
    let schema = TrustSchema::cancer().map_err(step("loading the schema"))?;
    let work = tempfile::Builder::new()
        .prefix("trustql-demo-")
        .tempdir()
        .map_err(step("creating the demo directory"))?;
    let dir = work.path().to_path_buf();

    let (data_dir, trusts) = match &options.data {
        Some(data) => (data.clone(), trusts_in(data)?),
        None => {
            let data = dir.join("data");
            let config = SynthConfig {
                trusts: options.trusts,
                patients: options.patients,
                seed: options.seed,
                ..SynthConfig::default()
            };
            generate(&schema, &config, &data).map_err(step("generating synthetic data"))?;
            (data, trust_codes(options.trusts))
        }
    };

    let pki = dir.join("pki");
    let ca = DevCa::new("TrustQL demo CA").map_err(step("making the demo CA"))?;
    let ca_path = ca
        .write_cert(&pki, "ca.pem")
        .map_err(step("writing the CA"))?;
    let hosts = ["localhost", "127.0.0.1"];
    // Researchers see the server certificate; nodes see (and pin) only the client one.
    let server = ca
        .issue_server("coordinator", &hosts)
        .and_then(|c| c.write(&pki, "coordinator"))
        .map_err(step("making the coordinator certificate"))?;
    let client_cert = ca
        .issue_client("coordinator (client)")
        .map_err(step("making the coordinator's client certificate"))?;
    let client_pin = client_cert.sha256_fingerprint();
    let client = client_cert
        .write(&pki, "coordinator-client")
        .map_err(step("writing the coordinator's client certificate"))?;
    let signing = SigningKey::generate()
        .and_then(|k| k.write(&pki, "coordinator-requests"))
        .map_err(step("making the coordinator's request-signing key"))?;

    let mut nodes = Vec::new();
    let mut audit_dirs = Vec::new();
    let mut node_configs = Vec::new();
    // Every trust's pool key pair, made in its state directory, and its public half for the
    // others to pin (as `trustql pool key` prints it).
    let pool_keys: Vec<(String, String)> = trusts
        .iter()
        .map(|trust| {
            trustql_node::pool_public_key(
                &dir.join("state")
                    .join(trust)
                    .join(trustql_node::POOL_KEY_FILE),
            )
            .map(|key| (trust.clone(), key.to_hex()))
            .map_err(step("making a pool key"))
        })
        .collect::<Result<_, _>>()?;
    for trust in &trusts {
        let cert = ca
            .issue_server(&format!("{trust} node"), &hosts)
            .and_then(|c| c.write(&pki, &format!("node-{trust}")))
            .map_err(step("making a node certificate"))?;
        let policy = write_policy(&dir, trust, &trusts, options)?;
        trustql_policies::approve(&policy, "Demo Controller", &schema)
            .map_err(step("approving a demo policy"))?;
        let config = NodeConfig {
            trust: trust.clone(),
            data_dir: data_dir.join(trust),
            policy,
            listen: "127.0.0.1:0".parse().map_err(step("parsing an address"))?,
            audit_dir: dir.join("audit").join(trust),
            state_dir: dir.join("state").join(trust),
            tls: TlsConfig {
                cert: cert.cert,
                key: cert.key,
                client_ca: ca_path.clone(),
            },
            coordinator: CoordinatorIdentity {
                client_cert_sha256: vec![client_pin.clone()],
                request_keys: vec![signing.public.clone()],
                max_request_age_secs: 300,
                max_clock_ahead_secs: 5,
            },
            limits: Limits::default(),
            pool: PoolConfig {
                peers: pool_keys
                    .iter()
                    .filter(|(peer, _)| peer != trust)
                    .cloned()
                    .collect(),
            },
        };
        audit_dirs.push(config.audit_dir.clone());
        let node = trustql_node::start(&config, schema.clone())
            .await
            .map_err(step(&format!("starting the node of {trust}")))?;
        nodes.push(node);
        node_configs.push(config);
    }

    let token = random_hex(24).map_err(step("making the researcher token"))?;
    let coordinator_audit = work.path().join("coordinator-audit");
    let config = CoordinatorConfig {
        audit_dir: coordinator_audit.clone(),
        listen: "127.0.0.1:0".parse().map_err(step("parsing an address"))?,
        node_deadline_ms: options.node_deadline_ms,
        quorum: options.quorum,
        tls: TlsFiles {
            cert: server.cert,
            key: server.key,
        },
        node_client: TlsFiles {
            cert: client.cert,
            key: client.key,
        },
        request_signing_key: signing.key,
        limits: Default::default(),
        nodes: nodes
            .iter()
            .map(|n| NodeEntry {
                trust: n.trust().to_string(),
                url: format!("https://{}", n.addr()),
                ca: ca_path.clone(),
                server_name: Some("localhost".into()),
            })
            .collect(),
        researchers: vec![ResearcherEntry {
            name: RESEARCHER.into(),
            token_sha256: token_hash(&token),
            projects: vec![PROJECT.into()],
        }],
        // The federation repeats the trusts' own rules on the totals (for cell-key answers the
        // coordinator keeps the minimum and drops the rounding itself); with DP, the noise is
        // the protection and the totals are left as the trusts' noise made them.
        disclosure: if let Some(totals) = options.totals {
            totals
        } else if options.unprotected || options.dp.is_some() {
            TotalsRules::default()
        } else {
            TotalsRules {
                min_patients: 10,
                rounding: Rounding::Base,
                rounding_base: 5,
            }
        },
    };
    config
        .validate()
        .map_err(step("configuring the coordinator"))?;
    let coordinator = trustql_coordinator::start(&config, schema)
        .await
        .map_err(step("starting the coordinator"))?;
    let info = DemoInfo {
        url: format!("https://127.0.0.1:{}", coordinator.addr().port()),
        token,
        project: PROJECT.into(),
        ca: ca_path,
        data_dir,
        trusts,
        epsilon_per_query: options.dp.map(|d| d.epsilon_per_query),
        epsilon_budget: options.dp.map(|d| d.epsilon_budget),
        pooled: options.pool,
    };
    Ok(Federation {
        info,
        nodes,
        node_configs,
        coordinator,
        audit_dirs,
        coordinator_audit,
        work,
    })
}

/// The trusts of an existing federation directory (its `TQnn` subdirectories).
fn trusts_in(data: &Path) -> Result<Vec<String>, DemoError> {
    let mut trusts: Vec<String> = std::fs::read_dir(data)
        .map_err(step(&format!("reading {}", data.display())))?
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    trusts.sort();
    if trusts.is_empty() {
        return Err(DemoError::Step {
            step: format!("reading {}", data.display()),
            reason: "no trust directories (DIR/<TRUST_CODE>/<table>.parquet) found".into(),
        });
    }
    Ok(trusts)
}

fn write_policy(
    dir: &Path,
    trust: &str,
    trusts: &[String],
    options: &DemoOptions,
) -> Result<PathBuf, DemoError> {
    let (unprotected, dp) = (options.unprotected, options.dp);
    let researchers: Vec<String> = [RESEARCHER, COLLEAGUE]
        .into_iter()
        .map(str::to_string)
        .chain(options.researchers.iter().cloned())
        .map(|r| format!("\"{r}\""))
        .collect();
    let disclosure = if unprotected {
        "min_patients = 1\nrounding = \"none\"\nwithhold_whole_margin_cells = false".to_string()
    } else {
        let method = if options.rounding {
            "min_patients = 10\nrounding = \"base\"\nrounding_base = 5"
        } else {
            // The cell-key method perturbs counts instead of rounding them.
            "method = \"cell_key\"\nmin_patients = 10\nrounding = \"none\""
        };
        let mut text = format!("{method}\nwithhold_whole_margin_cells = true");
        if let Some(a) = options.query_allowance {
            text.push_str(&format!(
                "\nquery_allowance = {{ per_day = {}{} }}",
                a.per_day,
                a.total
                    .map(|t| format!(", total = {t}"))
                    .unwrap_or_default()
            ));
        }
        text
    };
    let text = format!(
        "# Demo policy for {trust}{}\n[policy]\nversion = \"demo-1\"\ntrust = \"{trust}\"\n\
         description = \"TrustQL demo policy\"\n\n[disclosure]\n{disclosure}\n\n[query]\nmax_groups = 20000\n\n\
         {}[[project]]\nid = \"{PROJECT}\"\ntitle = \"Cancer pathways across the region (demonstration)\"\n\
         researchers = [{}]\ntables = [\"sim_av_patient\", \"sim_av_tumour\", \"sim_sact_regimen\", \
         \"sim_sact_cycle\", \"sim_sact_drug_detail\", \"sim_sact_outcome\", \"sim_rtds_episode\", \
         \"sim_rtds_prescription\"]\nexpires = \"2099-12-31\"\n",
        if unprotected {
            " (UNPROTECTED: for correctness checks only)"
        } else {
            ""
        },
        // The correctness mode answers what one process over the union would, extremes
        // included.
        if unprotected || options.extremes {
            "[classes.clinical]\ngroup_by = true\nfilter = true\naggregate = true\nmin_max = true\n\n"
        } else {
            ""
        },
        researchers.join(", ")
    );
    let text = if options.pool {
        let members: Vec<String> = trusts.iter().map(|t| format!("\"{t}\"")).collect();
        format!("{text}pool = {{ members = [{}] }}\n", members.join(", "))
    } else {
        text
    };
    let text = match dp {
        None => text,
        Some(dp) => {
            let rows: Vec<String> = DP_ROWS_PER_PATIENT
                .iter()
                .map(|(table, n)| format!("{table} = {n}"))
                .collect();
            let bounds: Vec<String> = DP_BOUNDS
                .iter()
                .map(|(column, lower, upper)| format!("\"{column}\" = [{lower:?}, {upper:?}]"))
                .collect();
            format!(
                "{text}dp = {{ epsilon_budget = {:?}, epsilon_per_query = {:?} }}\n\n\
                 # Differential privacy: each patient brings at most these rows of a table.\n[dp]\n\
                 default_rows_per_patient = 1\nrows_per_patient = {{ {} }}\nbounds = {{ {} }}\n",
                dp.epsilon_budget,
                dp.epsilon_per_query,
                rows.join(", "),
                bounds.join(", ")
            )
        }
    };
    let path = dir.join("policies").join(format!("{trust}.toml"));
    std::fs::create_dir_all(dir.join("policies")).map_err(step("writing the demo policies"))?;
    std::fs::write(&path, text).map_err(step("writing the demo policies"))?;
    Ok(path)
}

/// The showcase queries `trustql demo --pool` runs: (title, SQL).
pub const POOL_SHOWCASE: &[(&str, &str)] = &[
    (
        "Tumours by site, pooled (a site with a few patients at every trust is released once \
         the pool has enough)",
        "SELECT site_icd10_o2_3char AS site, COUNT(*) AS tumours FROM sim_av_tumour \
         GROUP BY site_icd10_o2_3char ORDER BY tumours LIMIT 15",
    ),
    (
        "Tumours by stage, pooled",
        "SELECT stage_best AS stage, COUNT(*) AS tumours FROM sim_av_tumour \
         GROUP BY stage_best ORDER BY stage",
    ),
    (
        "Means do not pool yet: refused with the reason",
        "SELECT stage_best, AVG(age) FROM sim_av_tumour GROUP BY stage_best",
    ),
];

/// The showcase queries `trustql demo --dp` runs: (title, SQL).
pub const DP_SHOWCASE: &[(&str, &str)] = &[
    (
        "Tumours by stage (noisy counts; every stage code is released, present or not)",
        "SELECT stage_best AS stage, COUNT(*) AS tumours FROM sim_av_tumour \
         GROUP BY stage_best ORDER BY stage",
    ),
    (
        "Mean age at diagnosis by stage (a noisy sum of ages clamped to 0–110 over a noisy count)",
        "SELECT stage_best AS stage, COUNT(*) AS tumours, AVG(age) AS mean_age \
         FROM sim_av_tumour GROUP BY stage_best ORDER BY stage",
    ),
    (
        "Tumours by site (sites have no public code list, so a site is released only where its \
         noisy patient count passes a threshold)",
        "SELECT site_icd10_o2_3char AS site, COUNT(*) AS tumours FROM sim_av_tumour \
         GROUP BY site_icd10_o2_3char ORDER BY tumours DESC LIMIT 10",
    ),
    (
        "SACT regimens by intent of treatment",
        "SELECT intent_of_treatment AS intent, COUNT(*) AS regimens FROM sim_sact_regimen \
         GROUP BY intent_of_treatment ORDER BY intent",
    ),
    (
        "The first query again (a repeat: each trust returns the same release at no cost)",
        "SELECT stage_best AS stage, COUNT(*) AS tumours FROM sim_av_tumour \
         GROUP BY stage_best ORDER BY stage",
    ),
];

/// The showcase queries `trustql demo` runs: (title, SQL).
pub const SHOWCASE: &[(&str, &str)] = &[
    (
        "Incidence by tumour site and stage (four common sites)",
        "SELECT site_icd10_o2_3char AS site, stage_best AS stage, COUNT(*) AS tumours \
         FROM sim_av_tumour WHERE site_icd10_o2_3char IN ('C18', 'C34', 'C50', 'C61') \
         GROUP BY site_icd10_o2_3char, stage_best ORDER BY site, stage",
    ),
    (
        "Mean and median age at diagnosis by site (ten largest; medians from 5-year bins)",
        "SELECT site_icd10_o2_3char AS site, COUNT(*) AS tumours, round(AVG(age), 1) AS mean_age, \
         round(STDDEV(age), 1) AS sd_age, round(median(age), 1) AS median_age, \
         round(percentile_cont(age, 0.9), 1) AS age_90th_percentile \
         FROM sim_av_tumour GROUP BY site_icd10_o2_3char ORDER BY tumours DESC LIMIT 10",
    ),
    (
        "SACT regimens by intent of treatment",
        "SELECT intent_of_treatment AS intent, COUNT(*) AS regimens, COUNT(DISTINCT encore_patient_id) AS patients \
         FROM sim_sact_regimen GROUP BY intent_of_treatment ORDER BY intent",
    ),
    (
        "Breast cancer by ethnicity (small cells are withheld)",
        "SELECT p.ethnicity, COUNT(*) AS tumours FROM sim_av_patient p \
         JOIN sim_av_tumour t ON p.patientid = t.patientid \
         WHERE t.site_icd10_o2_3char = 'C50' GROUP BY p.ethnicity ORDER BY p.ethnicity",
    ),
    (
        "1- and 5-year survival by stage at diagnosis (all sites; Kaplan-Meier over 30-day intervals)",
        "SELECT t.stage_best AS stage, \
         get_field(survival_at(t.diagnosisdatebest, p.vitalstatusdate, p.vitalstatus = 'D', 365), 'at_risk') AS patients, \
         round(get_field(survival_at(t.diagnosisdatebest, p.vitalstatusdate, p.vitalstatus = 'D', 365), 'survival'), 3) AS one_year, \
         round(get_field(survival_at(t.diagnosisdatebest, p.vitalstatusdate, p.vitalstatus = 'D', 1825), 'survival'), 3) AS five_years, \
         round(get_field(survival_at(t.diagnosisdatebest, p.vitalstatusdate, p.vitalstatus = 'D', 1825), 'lower_95'), 3) AS five_years_lower_95, \
         round(get_field(survival_at(t.diagnosisdatebest, p.vitalstatusdate, p.vitalstatus = 'D', 1825), 'upper_95'), 3) AS five_years_upper_95 \
         FROM sim_av_tumour t JOIN sim_av_patient p ON t.patientid = p.patientid \
         WHERE t.stage_best IN ('1', '2', '3', '4') \
         GROUP BY t.stage_best ORDER BY stage",
    ),
    (
        "A query that asks for identifiers (refused)",
        "SELECT patientid, age FROM sim_av_tumour",
    ),
];
