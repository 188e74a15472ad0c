//! `trustql node` and `trustql audit verify`.

use std::path::Path;

use anyhow::{Context, Result};
use trustql_audit::{AuditError, verify};
use trustql_node::{NodeConfig, start};
use trustql_schemas::TrustSchema;

/// Runs a node until Ctrl-C (or SIGTERM) or until its server fails.
pub fn run(config_path: &Path) -> Result<bool> {
    let config = NodeConfig::load(config_path)?;
    let schema = TrustSchema::cancer().context("loading the built-in schema")?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let mut node = start(&config, schema).await?;
        // Scripts read this line to find the port when listening on port 0.
        println!(
            "node {} listening on {} (audit log in {})",
            node.trust(),
            node.addr(),
            config.audit_dir.display()
        );
        tokio::select! {
            result = node.wait() => result?,
            () = shutdown_signal() => {
                println!("node {} stopping", node.trust());
                node.stop().await?;
            }
        }
        Ok(true)
    })
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Checks an audit log's chain; false (and the first bad record) if it is broken.
pub fn verify_audit(dir: &Path) -> Result<bool> {
    match verify(dir) {
        Ok(verified) => {
            println!(
                "audit log in {}: {} record(s), chain intact (last hash {})",
                dir.display(),
                verified.records,
                verified.head
            );
            Ok(true)
        }
        Err(e @ AuditError::Broken { .. }) => {
            println!("audit log in {} is BROKEN: {e}", dir.display());
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}
