//! `trustql`: the one command for TrustQL's users.

// Library code returns errors; only tests may expect().
#![cfg_attr(not(test), deny(clippy::expect_used))]
// Doc comments here are clap's --help text, where `DIR/<TRUST>/<table>.parquet` is meant
// literally, not as HTML.
#![allow(rustdoc::invalid_html_tags)]

mod data;
mod demo;
mod node;
mod policy;
mod query;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Federated SQL analytics over NHS cancer data, with disclosure control at every trust.
#[derive(Parser)]
#[command(name = "trustql", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate synthetic multi-trust cancer data (DIR/<TRUST>/<table>.parquet).
    Synth(data::SynthArgs),
    /// Load real data into the TrustQL layout.
    Import {
        #[command(subcommand)]
        source: ImportSource,
    },
    /// Work with the common cancer schema.
    Schema {
        #[command(subcommand)]
        action: SchemaAction,
    },
    /// Check or approve a trust's disclosure policy.
    Policy {
        #[command(subcommand)]
        action: PolicyAction,
    },
    /// Run a trust's node (DataFusion over its Parquet, behind Flight with mutual TLS).
    Node {
        /// The node configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the coordinator researchers connect to (Flight SQL over TLS).
    Coordinator {
        /// The coordinator configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Send one SQL query to a coordinator and print the result and its coverage.
    Query(query::QueryArgs),
    /// Synthetic data, nodes and a coordinator on loopback, and a few showcase queries.
    Demo(demo::DemoArgs),
    /// Work with a node's audit log.
    Audit {
        #[command(subcommand)]
        action: AuditAction,
    },
    /// A node's privacy budgets (differential privacy).
    Budget {
        #[command(subcommand)]
        action: BudgetAction,
    },
    /// A node's key for pooled projects.
    Pool {
        #[command(subcommand)]
        action: PoolAction,
    },
}

#[derive(Subcommand)]
enum PoolAction {
    /// Print this node's pool public key (made in its state directory if there is none), for
    /// the pool's other members to pin in their `[pool] peers`.
    Key {
        /// The node configuration file (its state directory).
        #[arg(long, default_value = "node.toml")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum BudgetAction {
    /// Print each project's ε and δ spent and left at this node.
    Show {
        /// The node configuration file (its policy and state directory).
        #[arg(long, default_value = "node.toml")]
        config: PathBuf,
        /// Only this project.
        #[arg(long)]
        project: Option<String>,
    },
}

#[derive(Subcommand)]
enum AuditAction {
    /// Check the hash chain and report the first edited, removed or reordered record, and
    /// check the log's end against its sealed head (removed or rewritten last records).
    Verify {
        /// The node's (or the coordinator's) audit directory.
        dir: PathBuf,
        /// The head's key (default: audit.key in DIR).
        #[arg(long)]
        key: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PolicyAction {
    /// Lint a policy file and print its effective rules in plain words.
    Check {
        /// The policy file (TOML).
        file: PathBuf,
    },
    /// Record your approval of the policy's current content (who, when, its hash).
    Approve {
        /// The policy file (TOML).
        file: PathBuf,
        /// The approving data controller's name.
        #[arg(long)]
        by: String,
    },
}

#[derive(Subcommand)]
enum ImportSource {
    /// The Simulacrum v2.1.0 CSV download, spread over N trusts.
    Simulacrum(data::ImportArgs),
}

#[derive(Subcommand)]
enum SchemaAction {
    /// Validate a site's Parquet files (or every trust under a federation directory).
    Check {
        /// A site directory (<table>.parquet files) or a directory of trust directories.
        dir: PathBuf,
        /// Check against this schema file instead of the built-in one.
        #[arg(long)]
        schema: Option<PathBuf>,
    },
}

/// Logs to standard error, filtered by `RUST_LOG` as usual (`RUST_LOG=trustql_node=debug`);
/// without it the servers say what they answer and refuse, and the other commands only warn.
fn init_logging(command: &Command) {
    let default = match command {
        Command::Node { .. } | Command::Coordinator { .. } => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.command);
    let result = match cli.command {
        Command::Synth(args) => data::synth(&args),
        Command::Import {
            source: ImportSource::Simulacrum(args),
        } => data::import(&args),
        Command::Schema {
            action: SchemaAction::Check { dir, schema },
        } => data::check(&dir, schema.as_deref()),
        Command::Policy {
            action: PolicyAction::Check { file },
        } => policy::check(&file),
        Command::Policy {
            action: PolicyAction::Approve { file, by },
        } => policy::approve_file(&file, &by),
        Command::Node { config } => node::run(&config),
        Command::Coordinator { config } => query::coordinator(&config),
        Command::Query(args) => query::query(&args),
        Command::Demo(args) => demo::demo(&args),
        Command::Audit {
            action: AuditAction::Verify { dir, key },
        } => node::verify_audit(&dir, key.as_deref()),
        Command::Budget {
            action: BudgetAction::Show { config, project },
        } => node::budget_show(&config, project.as_deref()),
        Command::Pool {
            action: PoolAction::Key { config },
        } => node::pool_key(&config),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
