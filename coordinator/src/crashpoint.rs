//! Named points where the crash suite stops the coordinator to kill it with SIGKILL
//! (`cli/coordinator/tests/process/crash.rs`). Inert unless the environment variable
//! `COVEY_CRASH_AT=<point>:<n>` names a point: then the `n`-th time the process reaches
//! it, it prints `covey: crash point <point> reached` to stderr and stops there (the thread
//! sleeps; the harness sends SIGKILL). Reading the variable once costs one branch per point
//! afterwards.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Every point, in the order a round reaches them.
pub const POINTS: [&str; 7] = [
    "enroll-stored",
    "round-opened",
    "upload-blob-committed",
    "upload-stored",
    "aggregation-started",
    "publish-artifacts-written",
    "publish-committed",
];

fn plan() -> Option<&'static (String, u64)> {
    static PLAN: OnceLock<Option<(String, u64)>> = OnceLock::new();
    PLAN.get_or_init(|| {
        let v = std::env::var("COVEY_CRASH_AT").ok()?;
        let (point, n) = v.rsplit_once(':')?;
        Some((point.to_owned(), n.parse().ok()?))
    })
    .as_ref()
}

/// Mark `point` as reached; stops here when the crash plan says so.
pub fn reach(point: &'static str) {
    static HITS: AtomicU64 = AtomicU64::new(0);
    let Some((planned, n)) = plan() else { return };
    if planned != point || HITS.fetch_add(1, Ordering::SeqCst) + 1 != *n {
        return;
    }
    eprintln!("covey: crash point {point} reached");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
