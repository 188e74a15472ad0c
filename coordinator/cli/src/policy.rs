//! `trustql policy check|approve`.

use std::path::Path;

use anyhow::{Context, Result};
use trustql_policies::{Finding, Policy, PolicyError, approve, load_approved};
use trustql_schemas::TrustSchema;

/// Lints a policy, prints its rules in plain words and its approval status; false on errors.
pub(crate) fn check(path: &Path) -> Result<bool> {
    let schema = TrustSchema::cancer().context("loading the built-in schema")?;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let policy = Policy::from_toml(&text)?;
    let findings = policy.lint(&schema);
    let mut ok = true;
    for finding in &findings {
        match finding {
            Finding::Error(m) => {
                ok = false;
                println!("error: {m}");
            }
            Finding::Warning(m) => println!("warning: {m}"),
        }
    }
    println!("{}", policy.describe());
    match load_approved(path, &schema) {
        Ok(approved) => println!(
            "Approved by {} at {} (content sha256 {}): a node will serve it.",
            approved.approval.approved_by, approved.approval.approved_at, approved.hash
        ),
        Err(e @ (PolicyError::NotApproved(_) | PolicyError::ChangedSinceApproval { .. })) => {
            println!("Not servable yet: {e}");
        }
        Err(PolicyError::Invalid(_)) => println!("Not servable: fix the errors above first."),
        Err(e) => return Err(e.into()),
    }
    Ok(ok)
}

/// Records an approval of the policy's current content.
pub(crate) fn approve_file(path: &Path, by: &str) -> Result<bool> {
    let schema = TrustSchema::cancer().context("loading the built-in schema")?;
    let approval = approve(path, by, &schema)?;
    println!(
        "Approved policy {} version {} by {} at {} (content sha256 {}).",
        path.display(),
        approval.version,
        approval.approved_by,
        approval.approved_at,
        approval.sha256
    );
    println!("Any change to the file now needs a new approval before a node will serve it.");
    Ok(true)
}
