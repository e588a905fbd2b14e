//! Pace steering (Bonawitz et al. 2019, "Towards Federated Learning at Scale", §2.3): the
//! coordinator tells each waiting device when to come back so that check-ins arrive at
//! a steady rate, however many devices turned up at once.
//!
//! The policy is a schedule of future check-in slots, `1 / rate` apart. A device that has
//! to wait gets the first free slot no earlier than `poll-interval` from now; the slot is
//! then taken. While devices arrive more slowly than `rate`, every slot is free and each
//! is told `poll-interval`, as without steering. When ten thousand arrive within a second,
//! they are told to come back one slot apart, so their next polls arrive at `rate` per
//! second and stay spread on every later return. A slot further than `max-wait` away is
//! not given: the device is told `max-wait` (the schedule cannot absorb more than
//! `rate × max-wait` devices; beyond that the load is what the population makes it).
//!
//! Pure and clock-free: the caller passes the time. `covey-sim pace` replays a crowd of
//! devices through it (README, "Pace steering").

use std::sync::Mutex;
use std::time::Duration;

/// Where the next free check-in slot is, and how far apart slots are.
#[derive(Debug)]
pub struct PaceSteering {
    /// Microseconds between two slots; 0 turns steering off.
    spacing_us: u64,
    min_wait: Duration,
    max_wait: Duration,
    /// The next free slot, in microseconds of the caller's clock.
    next_free_us: Mutex<u64>,
}

impl PaceSteering {
    /// Slots `1 / polls_per_second` apart (0: off, every device is told `min_wait`); a
    /// device waits at least `min_wait` (the poll interval) and at most `max_wait`.
    pub fn new(polls_per_second: f64, min_wait: Duration, max_wait: Duration) -> Self {
        let spacing_us = if polls_per_second > 0.0 && polls_per_second.is_finite() {
            (1e6 / polls_per_second).round().max(1.0) as u64
        } else {
            0
        };
        Self { spacing_us, min_wait, max_wait: max_wait.max(min_wait), next_free_us: Mutex::new(0) }
    }

    /// Whether slots are handed out (a rate was set).
    pub fn is_on(&self) -> bool {
        self.spacing_us > 0
    }

    /// How long a device that polls at `now_ms` should wait before its next poll; takes
    /// the slot it is given.
    pub fn wait(&self, now_ms: u64) -> Duration {
        if self.spacing_us == 0 {
            return self.min_wait;
        }
        let now_us = now_ms.saturating_mul(1000);
        let earliest = now_us.saturating_add(self.min_wait.as_micros() as u64);
        let latest = now_us.saturating_add(self.max_wait.as_micros() as u64);
        // A poisoned lock only means another poll panicked mid-update of a plain integer.
        let mut next_free = self.next_free_us.lock().unwrap_or_else(|e| e.into_inner());
        let slot = earliest.max(*next_free);
        if slot > latest {
            // The schedule is full up to max-wait: this device comes back then, and the
            // schedule is left as it is.
            return self.max_wait;
        }
        *next_free = slot.saturating_add(self.spacing_us);
        Duration::from_micros(slot - now_us)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trickle_of_devices_is_told_the_poll_interval() {
        let pace = PaceSteering::new(100.0, Duration::from_secs(2), Duration::from_secs(60));
        // One device a second, far below 100 a second: nothing changes.
        for t in 0..20 {
            assert_eq!(pace.wait(t * 1000), Duration::from_secs(2));
        }
    }

    #[test]
    fn a_crowd_is_spread_one_slot_apart_and_stays_spread() {
        let pace = PaceSteering::new(100.0, Duration::from_secs(2), Duration::from_secs(60));
        // 1,000 devices within the same millisecond.
        let waits: Vec<Duration> = (0..1000).map(|_| pace.wait(5_000)).collect();
        assert_eq!(waits[0], Duration::from_secs(2));
        assert_eq!(waits[1], Duration::from_millis(2_010));
        assert_eq!(waits[999], Duration::from_millis(2_000 + 9_990));
        // Their returns, each at its slot, are again given slots 10 ms apart.
        let mut returns: Vec<u64> = waits.iter().map(|w| 5_000 + w.as_millis() as u64).collect();
        returns.sort_unstable();
        let next: Vec<u64> = returns.iter().map(|&t| t + pace.wait(t).as_millis() as u64).collect();
        assert!(next.windows(2).all(|w| w[1] - w[0] == 10), "slots stay 10 ms apart");
    }

    #[test]
    fn beyond_max_wait_devices_are_told_max_wait_and_the_schedule_holds() {
        let pace = PaceSteering::new(10.0, Duration::from_secs(1), Duration::from_secs(3));
        // Slots at 1.0, 1.1, ..., 3.0 s: 21 of them; the rest are told 3 s.
        let waits: Vec<Duration> = (0..30).map(|_| pace.wait(0)).collect();
        assert_eq!(waits[20], Duration::from_secs(3));
        assert!(waits[21..].iter().all(|w| *w == Duration::from_secs(3)));
        assert_eq!(pace.wait(0), Duration::from_secs(3));
        // At 2.5 s the first free slot (3.1 s) is before the earliest allowed (3.5 s).
        assert_eq!(pace.wait(2_500), Duration::from_secs(1));
        assert_eq!(pace.wait(2_500), Duration::from_millis(1_100));
    }

    #[test]
    fn off_means_the_poll_interval_for_everyone() {
        let pace = PaceSteering::new(0.0, Duration::from_secs(2), Duration::from_secs(60));
        assert!(!pace.is_on());
        assert!((0..1000).all(|_| pace.wait(0) == Duration::from_secs(2)));
    }
}
