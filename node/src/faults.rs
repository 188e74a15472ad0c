//! Fault injection for tests (feature `fault-injection`, never in a build for use): makes every
//! release fail inside `policies`, as a bug would, so tests can check that the fault is logged
//! with its cause, audited as a failure and reported to the researcher without detail.

use std::sync::atomic::{AtomicBool, Ordering};

static BREAK_RELEASES: AtomicBool = AtomicBool::new(false);

/// From now on, every release in this process gets an answer that does not match its
/// description (or, with `false`, none does).
pub fn break_releases(on: bool) {
    BREAK_RELEASES.store(on, Ordering::SeqCst);
}

pub(crate) fn releases_broken() -> bool {
    BREAK_RELEASES.load(Ordering::SeqCst)
}
