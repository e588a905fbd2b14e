//! Pace steering in simulation: a crowd of devices checking in at once, replayed on a
//! simulated clock against the coordinator's own policy
//! ([`covey_coordinator::pace::PaceSteering`], the code `PollTask` runs), with steering
//! off (every device told `poll-interval`) and on. Each device comes back when it was
//! told, plus a network delay drawn from the seed; the result is the polls the
//! coordinator receives in every second (`covey-sim pace`, README "Pace steering").

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::Path;
use std::time::Duration;

use covey_coordinator::pace::PaceSteering;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Result, SimError};

/// The crowd and the policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaceOptions {
    /// Devices. Default 10,000.
    pub devices: usize,
    /// Their first polls fall uniformly within this window. Default 1 s.
    pub arrival_window: Duration,
    /// Simulated time. Default 120 s.
    pub duration: Duration,
    /// The coordinator's `rounds.poll-interval`. Default 2 s.
    pub poll_interval: Duration,
    /// `rounds.pace-polls-per-second` when steering. Default 500.
    pub polls_per_second: f64,
    /// `rounds.pace-max-wait`. Default 60 s.
    pub max_wait: Duration,
    /// Each return lands up to this much after the time the device was told (uniform).
    /// Default 50 ms.
    pub max_delay: Duration,
    /// Seed of arrivals and delays. Default 0.
    pub seed: u64,
}

impl Default for PaceOptions {
    fn default() -> Self {
        Self {
            devices: 10_000,
            arrival_window: Duration::from_secs(1),
            duration: Duration::from_secs(120),
            poll_interval: Duration::from_secs(2),
            polls_per_second: 500.0,
            max_wait: Duration::from_secs(60),
            max_delay: Duration::from_millis(50),
            seed: 0,
        }
    }
}

impl PaceOptions {
    /// Check the values.
    pub fn validate(&self) -> Result<()> {
        if self.devices == 0 {
            return Err(SimError::config("devices", "must be at least 1"));
        }
        if self.duration <= self.arrival_window {
            return Err(SimError::config("duration", "must be longer than the arrival window"));
        }
        if self.poll_interval.is_zero() || self.max_wait < self.poll_interval {
            return Err(SimError::config("poll-interval", "must be > 0 and at most max-wait"));
        }
        if !(self.polls_per_second.is_finite() && self.polls_per_second > 0.0) {
            return Err(SimError::config("polls-per-second", "must be a number > 0"));
        }
        Ok(())
    }
}

/// One replay: what the coordinator received.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaceRun {
    /// `unsteered` or `steered`.
    pub label: String,
    /// Polls received in each second of simulated time.
    pub per_second: Vec<u64>,
    /// The busiest second of the whole run (the arrival included).
    pub peak: u64,
    /// The busiest second after the arrival window: what the returns look like.
    pub peak_after_arrival: u64,
    /// Mean polls per second after the arrival window.
    pub mean_after_arrival: f64,
    /// The longest wait a device was told, in seconds.
    pub longest_wait_s: f64,
}

/// Both replays.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaceReport {
    /// The crowd and the policy.
    pub options: PaceOptions,
    /// Every device told `poll-interval`.
    pub unsteered: PaceRun,
    /// Pace steering at `polls-per-second`.
    pub steered: PaceRun,
}

/// Replay the crowd through `policy`.
pub fn replay(options: &PaceOptions, policy: &PaceSteering, label: &str) -> PaceRun {
    let end_ms = options.duration.as_millis() as u64;
    let window_ms = options.arrival_window.as_millis().max(1) as u64;
    let delay_ms = options.max_delay.as_millis() as u64;
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    // (time in ms, device), earliest first.
    let mut queue: BinaryHeap<Reverse<(u64, usize)>> =
        (0..options.devices).map(|d| Reverse((rng.random_range(0..window_ms), d))).collect();
    let mut per_second = vec![0u64; end_ms.div_ceil(1000) as usize];
    let mut longest = Duration::ZERO;
    while let Some(Reverse((now, device))) = queue.pop() {
        if now >= end_ms {
            break;
        }
        per_second[(now / 1000) as usize] += 1;
        let wait = policy.wait(now);
        longest = longest.max(wait);
        let delay = if delay_ms == 0 { 0 } else { rng.random_range(0..=delay_ms) };
        queue.push(Reverse((now + wait.as_millis() as u64 + delay, device)));
    }
    let after = &per_second[window_ms.div_ceil(1000) as usize..];
    PaceRun {
        label: label.to_owned(),
        peak: per_second.iter().copied().max().unwrap_or(0),
        peak_after_arrival: after.iter().copied().max().unwrap_or(0),
        mean_after_arrival: after.iter().sum::<u64>() as f64 / after.len().max(1) as f64,
        longest_wait_s: longest.as_secs_f64(),
        per_second,
    }
}

/// Replay the crowd without and with steering.
pub fn compare(options: &PaceOptions) -> Result<PaceReport> {
    options.validate()?;
    let off = PaceSteering::new(0.0, options.poll_interval, options.max_wait);
    let on = PaceSteering::new(options.polls_per_second, options.poll_interval, options.max_wait);
    Ok(PaceReport {
        options: options.clone(),
        unsteered: replay(options, &off, "unsteered"),
        steered: replay(options, &on, "steered"),
    })
}

impl PaceReport {
    /// A Markdown table of the figures.
    pub fn table(&self) -> String {
        let o = &self.options;
        let mut out = format!(
            "{} devices arriving within {:?}, {:?} simulated, poll interval {:?}, steering at {} polls/s \
             (max wait {:?}), returns delayed up to {:?}\n\n",
            o.devices, o.arrival_window, o.duration, o.poll_interval, o.polls_per_second, o.max_wait, o.max_delay
        );
        out.push_str("| | peak polls/s (arrival) | peak polls/s after | mean polls/s after | longest wait |\n");
        out.push_str("|---|---|---|---|---|\n");
        for r in [&self.unsteered, &self.steered] {
            out.push_str(&format!(
                "| {} | {} | {} | {:.0} | {:.1} s |\n",
                r.label, r.peak, r.peak_after_arrival, r.mean_after_arrival, r.longest_wait_s
            ));
        }
        out
    }

    /// `second,unsteered,steered`.
    pub fn csv(&self) -> String {
        let mut out = String::from("second,unsteered,steered\n");
        for (s, (a, b)) in self.unsteered.per_second.iter().zip(&self.steered.per_second).enumerate() {
            out.push_str(&format!("{s},{a},{b}\n"));
        }
        out
    }

    /// Write `pace.json`, `pace.csv`, `pace.md` and `pace.svg` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| SimError::io(dir, e))?;
        let json_path = dir.join("pace.json");
        let json =
            serde_json::to_string_pretty(self).map_err(|source| SimError::Json { path: json_path.clone(), source })?;
        let svg_path = dir.join("pace.svg");
        let svg = crate::plot::plot_pace(self).map_err(|reason| SimError::Plot { path: svg_path.clone(), reason })?;
        for (path, bytes) in [
            (json_path, json.into_bytes()),
            (dir.join("pace.csv"), self.csv().into_bytes()),
            (dir.join("pace.md"), self.table().into_bytes()),
            (svg_path, svg.into_bytes()),
        ] {
            crate::output::write_atomic(&path, &bytes)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> PaceOptions {
        PaceOptions {
            devices: 2_000,
            duration: Duration::from_secs(30),
            polls_per_second: 100.0,
            ..PaceOptions::default()
        }
    }

    #[test]
    fn steering_flattens_a_crowd_to_the_rate_and_unsteered_returns_stay_bunched() {
        let r = compare(&small()).expect("valid");
        // Unsteered, the crowd comes back together every poll interval.
        assert!(r.unsteered.peak_after_arrival >= 1_900, "{}", r.table());
        // Steered, after the arrival no second holds much more than the rate (delays
        // move a few returns into the next second).
        assert!(r.steered.peak_after_arrival <= 110, "{}", r.table());
        assert!((r.steered.mean_after_arrival - 100.0).abs() < 10.0, "{}", r.table());
        // 2,000 devices at 100 a second: waits reach 20 s.
        assert!(r.steered.longest_wait_s > 19.0 && r.steered.longest_wait_s <= 60.0, "{}", r.table());
        // Both saw the same arrival.
        assert_eq!(r.unsteered.per_second[0], r.steered.per_second[0]);
        assert_eq!(r.unsteered.per_second[0], 2_000);
    }

    #[test]
    fn a_small_fleet_is_hardly_steered() {
        // 100 devices every 2 s is 50 polls a second, half the rate: only devices that
        // arrive within a few slots (10 ms each) of others are moved, by those few slots.
        let r = compare(&PaceOptions { devices: 100, ..small() }).expect("valid");
        assert!(r.steered.longest_wait_s < 2.2, "{}", r.table());
        assert!((r.steered.mean_after_arrival - r.unsteered.mean_after_arrival).abs() < 2.0, "{}", r.table());
    }

    #[test]
    fn impossible_options_are_refused() {
        assert!(compare(&PaceOptions { devices: 0, ..small() }).is_err());
        assert!(compare(&PaceOptions { polls_per_second: 0.0, ..small() }).is_err());
        assert!(compare(&PaceOptions { duration: Duration::from_millis(500), ..small() }).is_err());
    }
}
