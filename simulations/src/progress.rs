//! Progress of long runs, reported through a callback: the library draws nothing. The
//! `covey-sim` binary draws bars on a terminal and prints one plain line per round
//! otherwise (piped to a file, a run still says how far it got).

use crate::report::RoundMetrics;

/// Hears of a run's progress. Called from training threads, hence `Sync`.
pub trait Progress: Send + Sync {
    /// `done` of the `total` clients sampled in `round` have trained.
    fn client_done(&self, round: u64, done: usize, total: usize) {
        let _ = (round, done, total);
    }

    /// A round of `rounds` finished, with its metrics.
    fn round_done(&self, metrics: &RoundMetrics, rounds: u64) {
        let _ = (metrics, rounds);
    }
}

/// Reports nothing (tests, embedding).
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl Progress for Silent {}
