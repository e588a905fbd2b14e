//! Exponential backoff with jitter, and a retry loop for calls whose failures may be
//! transient.

use std::future::Future;
use std::time::Duration;

use crate::config::BackoffConfig;
use crate::error::Result;

/// Delays `base · 2^attempt`, capped at `cap`, with "equal jitter": the delay actually
/// slept is uniform in `[d/2, d]`, so a fleet that failed together does not retry together.
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
}

impl Backoff {
    /// Backoff from `base` up to `cap` (`cap` is raised to `base` if smaller).
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self { base, cap: cap.max(base) }
    }

    /// The nominal delay before retry number `attempt` (0-based), without jitter.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.min(31));
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The delay before retry `attempt` for a jitter draw `unit` in `[0, 1]`:
    /// `ceiling / 2 + unit · ceiling / 2`.
    pub fn delay_with(&self, attempt: u32, unit: f64) -> Duration {
        let d = self.ceiling(attempt);
        d / 2 + d.mul_f64(unit.clamp(0.0, 1.0) / 2.0)
    }

    /// The delay before retry `attempt`, jittered from the operating system's generator.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, jitter_unit())
    }
}

impl From<&BackoffConfig> for Backoff {
    fn from(c: &BackoffConfig) -> Self {
        Self::new(c.base, c.cap)
    }
}

/// A uniform draw in `[0, 1)` (0.5 when the system generator fails: jitter is not a
/// security property).
fn jitter_unit() -> f64 {
    match covey_proto::keys::random_bytes::<8>() {
        Ok(b) => (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64,
        Err(_) => 0.5,
    }
}

/// Run `op` until it succeeds, fails permanently ([`crate::AgentError::is_transient`] false), or
/// `cfg.max_attempts` attempts failed (0: no limit); sleep with backoff between attempts.
/// `op` receives the attempt number (0-based).
pub async fn retry<T, F, Fut>(what: &str, cfg: &BackoffConfig, mut op: F) -> Result<T>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let backoff = Backoff::from(cfg);
    let mut attempt = 0u32;
    loop {
        match op(attempt).await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() && (cfg.max_attempts == 0 || attempt + 1 < cfg.max_attempts) => {
                let delay = backoff.delay(attempt);
                tracing::warn!(what, attempt, error = %e, delay_ms = delay.as_millis() as u64, "transient failure, retrying");
                tokio::time::sleep(delay).await;
                attempt = attempt.saturating_add(1);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Shorthand for a transient error in tests and stubs.
#[cfg(test)]
pub(crate) fn unavailable() -> crate::AgentError {
    crate::AgentError::Rpc { method: "test", code: tonic::Code::Unavailable, message: "down".into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let b = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        let ceilings: Vec<Duration> = (0..20).map(|a| b.ceiling(a)).collect();
        assert_eq!(ceilings[0], Duration::from_millis(200));
        assert_eq!(ceilings[1], Duration::from_millis(400));
        assert_eq!(ceilings[3], Duration::from_millis(1600));
        assert!(ceilings.windows(2).all(|w| w[1] >= w[0]), "{ceilings:?}");
        assert_eq!(ceilings[19], Duration::from_secs(30));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(30));
        for attempt in [0, 3, 8, 40] {
            let c = b.ceiling(attempt);
            assert_eq!(b.delay_with(attempt, 0.0), c / 2);
            assert_eq!(b.delay_with(attempt, 1.0), c);
            for _ in 0..50 {
                let d = b.delay(attempt);
                assert!(d >= c / 2 && d <= c, "{d:?} outside [{:?}, {c:?}]", c / 2);
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retry_stops_at_success_permanent_error_or_attempt_limit() {
        let cfg = BackoffConfig { max_attempts: 4, ..BackoffConfig::default() };
        let mut calls = 0;
        let v = retry("t", &cfg, |a| {
            calls += 1;
            async move { if a < 2 { Err(unavailable()) } else { Ok(a) } }
        })
        .await
        .expect("third attempt succeeds");
        assert_eq!((v, calls), (2, 3));

        let mut calls = 0;
        let err = retry("t", &cfg, |_| {
            calls += 1;
            async { Err::<(), _>(unavailable()) }
        })
        .await
        .expect_err("gives up");
        assert!(err.is_transient());
        assert_eq!(calls, 4);

        let mut calls = 0;
        let err = retry("t", &cfg, |_| {
            calls += 1;
            async { Err::<(), _>(crate::AgentError::untrusted(1, "bad")) }
        })
        .await
        .expect_err("permanent");
        assert!(!err.is_transient());
        assert_eq!(calls, 1);
    }
}
