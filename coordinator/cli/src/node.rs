//! `trustql node` and `trustql audit verify`.

use std::path::Path;

use anyhow::{Context, Result};
use trustql_audit::{AuditError, KEY_FILE, verify_with_key};
use trustql_budget::{Spend, read_queries, read_spend};
use trustql_node::{NodeConfig, start};
use trustql_policies::{Policy, today};
use trustql_schemas::TrustSchema;

/// Runs a node until Ctrl-C (or SIGTERM) or until its server fails.
pub(crate) fn run(config_path: &Path) -> Result<bool> {
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
pub(crate) async fn shutdown_signal() {
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

/// Checks an audit log's chain and sealed head; false (and what is wrong) if it is broken.
pub(crate) fn verify_audit(dir: &Path, key: Option<&Path>) -> Result<bool> {
    let key = key.map_or_else(|| dir.join(KEY_FILE), Path::to_path_buf);
    match verify_with_key(dir, &key) {
        Ok(verified) => {
            println!(
                "audit log in {}: {} record(s), chain intact and matching its sealed head \
                 (last hash {})",
                dir.display(),
                verified.records,
                verified.head
            );
            if let Some(tail) = verified.unacknowledged {
                println!("note: after them, {tail}");
            }
            Ok(true)
        }
        Err(e @ (AuditError::Broken { .. } | AuditError::Head { .. })) => {
            println!("audit log in {} is BROKEN: {e}", dir.display());
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// Prints spend and what is left per project from the node's ledger (read-only, so it is
/// safe while the node runs), and the query allowance used by projects outside DP; false if a
/// named project has neither.
/// `trustql pool key`: the node's pool public key, made at first use.
pub(crate) fn pool_key(config_path: &Path) -> Result<bool> {
    let config = NodeConfig::load(config_path)?;
    let key = trustql_node::pool_public_key(&config.pool_key_path())?;
    println!("{key}");
    Ok(true)
}

pub(crate) fn budget_show(config_path: &Path, only: Option<&str>) -> Result<bool> {
    let config = NodeConfig::load(config_path)?;
    let text = std::fs::read_to_string(&config.policy)
        .with_context(|| format!("cannot read the policy {}", config.policy.display()))?;
    let policy = Policy::from_toml(&text)?;
    let ledger = config.ledger_path();
    let spent = if ledger.exists() {
        read_spend(&ledger)?
    } else {
        Default::default()
    };
    // Projects in DP mode, then any the ledger knows that the policy no longer lists.
    let mut projects: Vec<&str> = policy
        .projects
        .iter()
        .filter(|p| p.dp.is_some())
        .map(|p| p.id.as_str())
        .collect();
    projects.extend(
        spent
            .keys()
            .map(String::as_str)
            .filter(|id| policy.project(id).and_then(|p| p.dp).is_none()),
    );
    let mut allowed: Vec<_> = policy
        .projects
        .iter()
        .filter_map(|p| Some((p.id.as_str(), policy.allowance(p)?)))
        .collect();
    if let Some(only) = only {
        if !projects.contains(&only) && !allowed.iter().any(|(id, _)| *id == only) {
            println!(
                "project {only} has no privacy budget or query allowance at trust {}",
                config.trust
            );
            return Ok(false);
        }
        projects.retain(|p| *p == only);
        allowed.retain(|(id, _)| *id == only);
    }
    if !allowed.is_empty() {
        let day = today();
        let queries = if ledger.exists() {
            read_queries(&ledger)?.summary(day)
        } else {
            Default::default()
        };
        println!(
            "Query allowances at trust {} (today, UTC; a repeat the same day is not counted)",
            config.trust
        );
        println!(
            "{:<16} {:>10} {:>10} {:>10} {:>10}",
            "project", "today", "per day", "in all", "total"
        );
        for (id, allowance) in &allowed {
            let (used_today, used) = queries.get(*id).copied().unwrap_or_default();
            let total = allowance
                .total
                .map_or_else(|| "-".to_string(), |t| t.to_string());
            println!(
                "{id:<16} {used_today:>10} {:>10} {used:>10} {total:>10}",
                allowance.per_day
            );
        }
        if projects.is_empty() {
            return Ok(true);
        }
    }
    println!(
        "Privacy budgets at trust {} (ledger {})",
        config.trust,
        ledger.display()
    );
    println!(
        "{:<16} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9}",
        "project", "ε spent", "ε budget", "ε left", "δ spent", "δ budget", "releases"
    );
    for id in projects {
        let spend = spent.get(id).copied().unwrap_or(Spend::default());
        match policy.project(id).and_then(|p| p.dp) {
            Some(dp) => println!(
                "{id:<16} {:>10.4} {:>10} {:>10.4} {:>10.1e} {:>10.1e} {:>9}",
                spend.epsilon,
                dp.epsilon_budget,
                (dp.epsilon_budget - spend.epsilon).max(0.0),
                spend.delta,
                dp.delta_budget,
                spend.releases
            ),
            None => println!(
                "{id:<16} {:>10.4} {:>10} {:>10} {:>10.1e} {:>10} {:>9}",
                spend.epsilon, "-", "-", spend.delta, "-", spend.releases
            ),
        }
    }
    Ok(true)
}
