//! `[limits]` of `coordinator.toml`: what one researcher's request may cost the coordinator.

use std::time::Duration;

use serde::Deserialize;
use trustql_policies::{MAX_NESTING, TextLimits};

/// Caps on SQL text (checked on its tokens before it is parsed) and on results waiting to be
/// fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Longest SQL text accepted, in characters.
    pub max_query_chars: usize,
    /// Deepest nesting of parentheses and CASE.
    pub max_nesting: usize,
    /// Most operators (+, =, AND, WHEN …) in one query.
    pub max_operators: usize,
    /// Results one researcher may leave waiting to be fetched (queries running for them
    /// count too); more are refused as busy.
    pub max_waiting_results: usize,
    /// How long an un-fetched result is kept, in seconds.
    pub result_ttl_secs: u64,
    /// Queries the coordinator sends to the trusts at once, across all researchers; keep it
    /// at most the smallest `max_concurrent_queries` of the nodes (4 by default), or the nodes
    /// refuse the rest. More wait their turn, researchers taking turns.
    pub max_running_queries: usize,
    /// Queries that may wait for a turn; more are refused as busy.
    pub max_queued_queries: usize,
    /// Longest a query waits for its turn, in milliseconds, before it is refused as busy.
    pub max_queue_wait_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_query_chars: 10_000,
            max_nesting: 16,
            max_operators: 100,
            max_waiting_results: 8,
            result_ttl_secs: 300,
            max_running_queries: 4,
            max_queued_queries: 64,
            max_queue_wait_ms: 30_000,
        }
    }
}

impl Limits {
    /// The caps on SQL text.
    pub fn text(&self) -> TextLimits {
        TextLimits {
            max_chars: self.max_query_chars,
            max_nesting: self.max_nesting,
            max_operators: self.max_operators,
        }
    }

    /// How long an un-fetched result is kept.
    pub fn result_ttl(&self) -> Duration {
        Duration::from_secs(self.result_ttl_secs)
    }

    /// Why the limits cannot be served, if they cannot.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.max_query_chars == 0
            || self.max_nesting == 0
            || self.max_operators == 0
            || self.max_waiting_results == 0
            || self.result_ttl_secs == 0
            || self.max_running_queries == 0
            || self.max_queue_wait_ms == 0
        {
            return Err("every [limits] value must be positive".into());
        }
        if self.max_nesting > MAX_NESTING {
            return Err(format!(
                "[limits] max_nesting may be at most {MAX_NESTING} (the SQL parser's own limit)"
            ));
        }
        Ok(())
    }
}
