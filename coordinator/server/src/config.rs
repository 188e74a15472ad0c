//! `coordinator.toml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use trustql_policies::TotalsRules;

use crate::error::CoordinatorError;
use crate::limits::Limits;

/// The coordinator configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Address researchers connect to (`127.0.0.1:0` picks a free port).
    pub listen: SocketAddr,
    /// Longest a node may take to answer, in milliseconds.
    #[serde(default = "default_deadline")]
    pub node_deadline_ms: u64,
    /// How many trusts must answer: `"all"` (the default) or a number.
    #[serde(default)]
    pub quorum: Quorum,
    /// The certificate researchers see.
    pub tls: TlsFiles,
    /// The client certificate presented to nodes (clientAuth; nodes pin it). Never the
    /// researcher-facing one: nodes refuse a server certificate as a client.
    pub node_client: TlsFiles,
    /// The Ed25519 private key (PEM PKCS#8) the coordinator signs every site request with,
    /// vouching for the researcher and project it authenticated; nodes hold its public half.
    pub request_signing_key: PathBuf,
    /// The trusts' nodes.
    #[serde(rename = "node")]
    pub nodes: Vec<NodeEntry>,
    /// Who may query, with which projects.
    #[serde(rename = "researcher", default)]
    pub researchers: Vec<ResearcherEntry>,
    /// Rules applied to the merged totals, on top of every node's own.
    #[serde(default)]
    pub disclosure: TotalsRules,
    /// Where the coordinator keeps its own hash-chained audit log of every request
    /// (default `coordinator-audit` beside the config file).
    #[serde(default = "default_audit_dir")]
    pub audit_dir: PathBuf,
    /// What one request may cost: SQL size and shape, results waiting to be fetched.
    #[serde(default)]
    pub limits: Limits,
}

fn default_audit_dir() -> PathBuf {
    PathBuf::from("coordinator-audit")
}

fn default_deadline() -> u64 {
    30_000
}

/// The quorum rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quorum {
    /// Every trust must answer.
    #[default]
    All,
    /// At least this many trusts must answer.
    AtLeast(usize),
}

impl<'de> Deserialize<'de> for Quorum {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            Number(usize),
        }
        match Raw::deserialize(d)? {
            Raw::Word(w) if w == "all" => Ok(Quorum::All),
            Raw::Number(n) if n > 0 => Ok(Quorum::AtLeast(n)),
            _ => Err(serde::de::Error::custom(
                "quorum must be \"all\" or a positive number of trusts",
            )),
        }
    }
}

/// A certificate and its key (PEM).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

/// One trust's node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    /// The trust code.
    pub trust: String,
    /// `https://host:port`.
    pub url: String,
    /// The CA that signed the node's certificate (PEM).
    pub ca: PathBuf,
    /// The name on the node's certificate, if not the URL's host.
    #[serde(default)]
    pub server_name: Option<String>,
}

/// One researcher.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResearcherEntry {
    /// The researcher's name, as nodes see it.
    pub name: String,
    /// SHA-256 (hex) of their bearer token; the token itself is never stored.
    pub token_sha256: String,
    /// Projects they work on.
    pub projects: Vec<String>,
}

impl CoordinatorConfig {
    /// Reads a config file; relative paths are taken from the file's directory.
    pub fn load(path: &Path) -> Result<Self, CoordinatorError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            CoordinatorError::Config(format!("cannot read {}: {e}", path.display()))
        })?;
        let mut config: CoordinatorConfig =
            toml::from_str(&text).map_err(|e| CoordinatorError::Config(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve(base);
        config.validate()?;
        Ok(config)
    }

    /// Makes relative paths relative to `base`.
    pub fn resolve(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.tls.cert);
        fix(&mut self.tls.key);
        fix(&mut self.node_client.cert);
        fix(&mut self.node_client.key);
        fix(&mut self.request_signing_key);
        fix(&mut self.audit_dir);
        for node in &mut self.nodes {
            fix(&mut node.ca);
        }
    }

    /// Checks the parts fit together.
    pub fn validate(&self) -> Result<(), CoordinatorError> {
        let err = |m: String| Err(CoordinatorError::Config(m));
        if self.nodes.is_empty() {
            return err("at least one [[node]] is needed".into());
        }
        let mut trusts = std::collections::HashSet::new();
        for node in &self.nodes {
            if !trusts.insert(node.trust.as_str()) {
                return err(format!("trust {} is listed twice", node.trust));
            }
            if !node.url.starts_with("https://") {
                return err(format!(
                    "node {} must be reached over https:// (mutual TLS)",
                    node.trust
                ));
            }
        }
        if let Quorum::AtLeast(n) = self.quorum
            && n > self.nodes.len()
        {
            return err(format!(
                "quorum {n} is more than the {} nodes listed",
                self.nodes.len()
            ));
        }
        self.disclosure.check().or_else(err)?;
        self.limits.check().or_else(err)?;
        if self.node_deadline_ms == 0 {
            return err("node_deadline_ms must be positive".into());
        }
        // One entry per researcher and per token: a result waiting for a researcher is theirs
        // by name, so a second entry of the same name (another token) could fetch it.
        let mut names = std::collections::HashSet::new();
        let mut tokens = std::collections::HashSet::new();
        for r in &self.researchers {
            if r.token_sha256.len() != 64 || !r.token_sha256.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return err(format!(
                    "researcher {}: token_sha256 must be 64 hex digits",
                    r.name
                ));
            }
            if !names.insert(r.name.as_str()) {
                return err(format!(
                    "researcher {} is listed twice; give each researcher one [[researcher]] entry",
                    r.name
                ));
            }
            if !tokens.insert(r.token_sha256.to_ascii_lowercase()) {
                return err(format!(
                    "researcher {} has the same token as another researcher",
                    r.name
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(disclosure: &str) -> CoordinatorConfig {
        toml::from_str(&format!(
            "listen = \"127.0.0.1:0\"\n\
             tls = {{ cert = \"c.pem\", key = \"k.pem\" }}\n\
             node_client = {{ cert = \"c.pem\", key = \"k.pem\" }}\n\
             request_signing_key = \"requests.key\"\n\
             [[node]]\ntrust = \"TQ01\"\nurl = \"https://127.0.0.1:1\"\nca = \"ca.pem\"\n\
             [disclosure]\n{disclosure}\n"
        ))
        .expect("config")
    }

    #[test]
    fn a_totals_threshold_above_what_nodes_count_is_refused() {
        assert!(config("min_patients = 1000").validate().is_ok());
        let err = config("min_patients = 1001")
            .validate()
            .expect_err("too high");
        assert!(err.to_string().contains("at most 1000"), "{err}");
    }

    fn researcher(name: &str, token: &str) -> ResearcherEntry {
        ResearcherEntry {
            name: name.into(),
            token_sha256: crate::token_hash(token),
            projects: vec!["p1".into()],
        }
    }

    #[test]
    fn a_researcher_listed_twice_or_sharing_a_token_is_refused_when_the_config_loads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("coordinator.toml");
        let entry = |name: &str, token: &str| {
            format!(
                "[[researcher]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\nprojects = [\"p1\"]\n",
                crate::token_hash(token)
            )
        };
        let base = "listen = \"127.0.0.1:0\"\nrequest_signing_key = \"requests.key\"\n\
                    tls = { cert = \"c.pem\", key = \"k.pem\" }\n\
                    node_client = { cert = \"c.pem\", key = \"k.pem\" }\n\
                    [[node]]\ntrust = \"TQ01\"\nurl = \"https://127.0.0.1:1\"\nca = \"ca.pem\"\n";
        std::fs::write(
            &path,
            format!("{base}{}{}", entry("alice", "t1"), entry("bob", "t2")),
        )
        .expect("write");
        let loaded = CoordinatorConfig::load(&path).expect("distinct researchers load");
        assert_eq!(loaded.request_signing_key, dir.path().join("requests.key"));

        std::fs::write(
            &path,
            format!("{base}{}{}", entry("alice", "t1"), entry("alice", "t2")),
        )
        .expect("write");
        let err = CoordinatorConfig::load(&path).expect_err("a name listed twice");
        assert!(matches!(err, CoordinatorError::Config(_)), "{err}");
        assert!(
            err.to_string().contains("researcher alice is listed twice"),
            "{err}"
        );

        let mut shared = config("");
        shared.researchers = vec![researcher("alice", "t1"), researcher("bob", "t1")];
        let err = shared.validate().expect_err("a shared token");
        assert!(err.to_string().contains("same token"), "{err}");
    }
}
