//! Staged rollout, the policy (issue 21, first part; not yet wired into the engine, the
//! store or the admin service): which devices are in a version's canary and which in
//! the held-back control group, and whether the canary's health allows the next stage.
//! Pure: no I/O, no clock, no transport.
//!
//! * **Sticky buckets.** A device's bucket is SHA-256(salt ‖ device id) mod 10,000, so the
//!   same devices stay in the canary as it grows (1 % ⊂ 10 % ⊂ 50 %) and the control group
//!   (the top `control` per cent of buckets) stays on the stable version until the last
//!   stage.
//! * **One bounded vote per device.** Health reports are kept per device and per stage
//!   ([`StageVotes`]): a device that reports a thousand failures counts as one failing
//!   device, so no single device can halt a good rollout or pass a bad one once
//!   `min-devices` is above one.
//! * **The test.** The coordinator's own held-out evaluation first (no device needed): a
//!   candidate whose held-out perplexity exceeds the stable version's by more than
//!   `max-perplexity-regression` is halted. Then, with at least `min-devices` votes in each
//!   arm, the failure rates are compared by a one-sided two-proportion z-test (pooled
//!   variance): the stage halts when z > `halt-z` (2.33: α = 1 %) **and** the canary's
//!   rate exceeds the control's by more than `tolerance` (so that a very large fleet does
//!   not halt on a significant but negligible difference); otherwise, once the stage has
//!   run `min-stage-duration`, it advances.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{CoordinatorError, Result};

/// Buckets per fleet: a bucket is a hundredth of a per cent.
pub const BUCKETS: u32 = 10_000;

/// A version's rollout plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RolloutPlan {
    /// Per cent of the fleet on the candidate at each stage, strictly increasing, ending at
    /// 100. Default `[1, 10, 50, 100]`.
    pub stages: Vec<f64>,
    /// Per cent of the fleet held back on the stable version until the last stage, to
    /// compare the canary against. Default 5.
    pub control: f64,
    /// Votes needed in each arm before a stage is judged on device reports. Default 20.
    pub min_devices: usize,
    /// The z above which the canary's failure rate is significantly worse. Default 2.33
    /// (one-sided α = 1 %).
    pub halt_z: f64,
    /// How much worse the canary's failure rate may be and still pass (absolute, 0.01 =
    /// one percentage point). Default 0.01.
    pub tolerance: f64,
    /// How much higher the candidate's held-out perplexity may be than the stable
    /// version's (relative, 0.02 = 2 %). Default 0.02.
    pub max_perplexity_regression: f64,
    /// The shortest time a stage runs before it may advance. Default `1h`.
    #[serde(with = "humantime_serde")]
    pub min_stage_duration: Duration,
}

impl Default for RolloutPlan {
    fn default() -> Self {
        Self {
            stages: vec![1.0, 10.0, 50.0, 100.0],
            control: 5.0,
            min_devices: 20,
            halt_z: 2.33,
            tolerance: 0.01,
            max_perplexity_regression: 0.02,
            min_stage_duration: Duration::from_secs(3600),
        }
    }
}

fn bad(field: &str, reason: String) -> Result<()> {
    Err(CoordinatorError::Config { field: field.into(), reason })
}

impl RolloutPlan {
    /// Check the plan; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let Some(&last) = self.stages.last() else {
            return bad("rollout.stages", "names no stage".into());
        };
        if self.stages.iter().any(|s| !(s.is_finite() && *s > 0.0 && *s <= 100.0)) {
            return bad("rollout.stages", format!("{:?}: every stage is a per cent in (0, 100]", self.stages));
        }
        if self.stages.windows(2).any(|w| w[1] <= w[0]) {
            return bad("rollout.stages", format!("{:?} are out of order: each stage must be larger", self.stages));
        }
        if last != 100.0 {
            return bad("rollout.stages", format!("{:?} must end at 100", self.stages));
        }
        if !(self.control.is_finite() && (0.0..=50.0).contains(&self.control)) {
            return bad("rollout.control", format!("{} is not a per cent in [0, 50]", self.control));
        }
        if let Some(s) = self.stages[..self.stages.len() - 1].iter().find(|&&s| s > 100.0 - self.control) {
            return bad("rollout.stages", format!("stage {s} % overlaps the {} % control group", self.control));
        }
        if self.min_devices == 0 {
            return bad("rollout.min-devices", "must be at least 1".into());
        }
        if !(self.halt_z.is_finite() && self.halt_z > 0.0) {
            return bad("rollout.halt-z", format!("{} is not a number > 0", self.halt_z));
        }
        if !(self.tolerance.is_finite() && (0.0..1.0).contains(&self.tolerance)) {
            return bad("rollout.tolerance", format!("{} is not in [0, 1)", self.tolerance));
        }
        if !(self.max_perplexity_regression.is_finite() && self.max_perplexity_regression >= 0.0) {
            return bad(
                "rollout.max-perplexity-regression",
                format!("{} is not a number >= 0", self.max_perplexity_regression),
            );
        }
        Ok(())
    }

    /// Where a device in `bucket` stands at stage `stage` (an index into `stages`).
    pub fn arm(&self, bucket: u32, stage: usize) -> Arm {
        let last = stage + 1 >= self.stages.len();
        let percent = self.stages.get(stage).copied().unwrap_or(100.0);
        let canary_buckets = (percent * f64::from(BUCKETS) / 100.0).round() as u32;
        let control_from = BUCKETS - (self.control * f64::from(BUCKETS) / 100.0).round() as u32;
        if last {
            Arm::Canary
        } else if bucket >= control_from {
            Arm::Control
        } else if bucket < canary_buckets {
            Arm::Canary
        } else {
            Arm::Stable
        }
    }
}

/// A device's bucket in `[0, BUCKETS)`: SHA-256 of `salt` and its id. The salt is fixed
/// per fleet (or track), so a device keeps its bucket across stages and versions.
pub fn bucket(salt: &[u8], device_id: &[u8; 32]) -> u32 {
    let mut material = Vec::with_capacity(salt.len() + 32);
    material.extend_from_slice(salt);
    material.extend_from_slice(device_id);
    let h = covey_proto::keys::sha256(&material);
    let mut first = [0u8; 8];
    first.copy_from_slice(&h[..8]);
    (u64::from_be_bytes(first) % u64::from(BUCKETS)) as u32
}

/// Which version a device runs during a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arm {
    /// The candidate.
    Canary,
    /// The stable version, compared against the canary.
    Control,
    /// The stable version, not yet reached by the rollout.
    Stable,
}

/// A stage's health reports, one vote per device and arm: whether it failed (to load the
/// version, or at inference) during the stage. A later report of the same device replaces
/// its earlier one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StageVotes {
    canary: BTreeMap<[u8; 32], bool>,
    control: BTreeMap<[u8; 32], bool>,
}

impl StageVotes {
    /// Record `device`'s report from `arm` (reports from the stable arm are not votes).
    pub fn record(&mut self, device: [u8; 32], arm: Arm, failed: bool) {
        match arm {
            Arm::Canary => self.canary.insert(device, failed),
            Arm::Control => self.control.insert(device, failed),
            Arm::Stable => None,
        };
    }

    /// The canary's and the control's counts.
    pub fn stats(&self) -> (ArmStats, ArmStats) {
        let count = |votes: &BTreeMap<[u8; 32], bool>| ArmStats {
            devices: votes.len(),
            failures: votes.values().filter(|&&f| f).count(),
        };
        (count(&self.canary), count(&self.control))
    }
}

/// Votes of one arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ArmStats {
    /// Devices that reported.
    pub devices: usize,
    /// Of them, those that failed.
    pub failures: usize,
}

impl ArmStats {
    /// The failure rate (0 without votes).
    pub fn rate(&self) -> f64 {
        if self.devices == 0 { 0.0 } else { self.failures as f64 / self.devices as f64 }
    }
}

/// The coordinator's held-out perplexity of the candidate and of the stable version.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HeldOut {
    /// The candidate's.
    pub candidate: f64,
    /// The stable version's.
    pub stable: f64,
}

/// What to do with a stage, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "verdict", content = "reason")]
pub enum Verdict {
    /// Move to the next stage (or finish, after the last).
    Advance(String),
    /// Keep the stage running.
    Hold(String),
    /// Stop the rollout and return every device to the stable version.
    Halt(String),
}

/// The one-sided two-proportion z statistic of the canary's failure rate over the
/// control's, with pooled variance; 0 when either arm is empty or no device failed in
/// either (no evidence either way).
pub fn failure_z(canary: ArmStats, control: ArmStats) -> f64 {
    let (n1, n2) = (canary.devices as f64, control.devices as f64);
    if canary.devices == 0 || control.devices == 0 {
        return 0.0;
    }
    let pooled = (canary.failures + control.failures) as f64 / (n1 + n2);
    let variance = pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2);
    if variance <= 0.0 {
        return 0.0;
    }
    (canary.rate() - control.rate()) / variance.sqrt()
}

/// Judge a stage that has run `elapsed`, from its votes and, when there is one, the
/// coordinator's own held-out evaluation.
pub fn judge(plan: &RolloutPlan, elapsed: Duration, votes: &StageVotes, held_out: Option<HeldOut>) -> Verdict {
    let (canary, control) = votes.stats();
    judge_stats(plan, elapsed, canary, control, held_out)
}

/// [`judge`] from the arms' counts.
pub fn judge_stats(
    plan: &RolloutPlan,
    elapsed: Duration,
    canary: ArmStats,
    control: ArmStats,
    held_out: Option<HeldOut>,
) -> Verdict {
    if let Some(h) = held_out {
        let limit = h.stable * (1.0 + plan.max_perplexity_regression);
        if !(h.candidate.is_finite() && h.candidate <= limit) {
            return Verdict::Halt(format!(
                "held-out perplexity {:.4} against the stable version's {:.4} (at most {:.4} allowed)",
                h.candidate, h.stable, limit
            ));
        }
    }
    if canary.devices < plan.min_devices || control.devices < plan.min_devices {
        return Verdict::Hold(format!(
            "{} canary and {} control votes; {} of each needed",
            canary.devices, control.devices, plan.min_devices
        ));
    }
    let z = failure_z(canary, control);
    let excess = canary.rate() - control.rate();
    if z > plan.halt_z && excess > plan.tolerance {
        return Verdict::Halt(format!(
            "failures {}/{} in the canary against {}/{} in the control (z = {z:.2} > {})",
            canary.failures, canary.devices, control.failures, control.devices, plan.halt_z
        ));
    }
    if elapsed < plan.min_stage_duration {
        return Verdict::Hold(format!(
            "healthy so far; the stage has run {elapsed:?} of {:?}",
            plan.min_stage_duration
        ));
    }
    Verdict::Advance(format!(
        "failures {}/{} in the canary against {}/{} in the control (z = {z:.2})",
        canary.failures, canary.devices, control.failures, control.devices
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: u32) -> [u8; 32] {
        let mut d = [0u8; 32];
        d[..4].copy_from_slice(&i.to_be_bytes());
        d
    }

    fn plan() -> RolloutPlan {
        RolloutPlan { min_stage_duration: Duration::ZERO, ..RolloutPlan::default() }
    }

    #[test]
    fn plans_out_of_order_or_overlapping_the_control_are_refused() {
        RolloutPlan::default().validate().expect("default");
        let cases = [
            (RolloutPlan { stages: vec![10.0, 1.0, 100.0], ..plan() }, "out of order"),
            (RolloutPlan { stages: vec![1.0, 50.0], ..plan() }, "end at 100"),
            (RolloutPlan { stages: vec![], ..plan() }, "no stage"),
            (RolloutPlan { stages: vec![1.0, 98.0, 100.0], ..plan() }, "control group"),
            (RolloutPlan { stages: vec![0.0, 100.0], ..plan() }, "(0, 100]"),
            (RolloutPlan { control: 60.0, ..plan() }, "rollout.control"),
            (RolloutPlan { min_devices: 0, ..plan() }, "min-devices"),
        ];
        for (p, needle) in cases {
            let err = p.validate().expect_err(needle).to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn buckets_are_sticky_and_the_canary_only_grows() {
        let p = plan();
        let buckets: Vec<u32> = (0..20_000).map(|i| bucket(b"fleet", &id(i))).collect();
        assert_eq!(buckets, (0..20_000).map(|i| bucket(b"fleet", &id(i))).collect::<Vec<_>>(), "deterministic");
        assert_ne!(bucket(b"fleet", &id(1)), bucket(b"other fleet", &id(1)), "the salt matters");
        let share =
            |stage: usize, arm: Arm| buckets.iter().filter(|&&b| p.arm(b, stage) == arm).count() as f64 / 20_000.0;
        // About 1 %, 10 %, 50 % canary; 5 % control until the last stage, then everyone.
        for (stage, expected) in [(0, 0.01), (1, 0.10), (2, 0.50)] {
            assert!((share(stage, Arm::Canary) - expected).abs() < 0.01, "stage {stage}");
            assert!((share(stage, Arm::Control) - 0.05).abs() < 0.01, "stage {stage}");
        }
        assert_eq!(share(3, Arm::Canary), 1.0);
        // A device in an earlier canary stays in every later one; control devices are never in it early.
        for &b in &buckets {
            for stage in 0..2 {
                if p.arm(b, stage) == Arm::Canary {
                    assert_eq!(p.arm(b, stage + 1), Arm::Canary);
                }
                if p.arm(b, stage) == Arm::Control {
                    assert_ne!(p.arm(b, stage + 1), Arm::Canary, "control stays back until the last stage");
                }
            }
        }
    }

    #[test]
    fn a_failing_canary_halts_and_a_healthy_one_advances() {
        let p = plan();
        let mut bad = StageVotes::default();
        let mut good = StageVotes::default();
        for i in 0..100 {
            bad.record(id(i), Arm::Canary, i % 5 == 0); // 20 % fail
            good.record(id(i), Arm::Canary, i == 0); // 1 %
        }
        for i in 100..200 {
            bad.record(id(i), Arm::Control, i == 100); // 1 %
            good.record(id(i), Arm::Control, i == 100);
        }
        assert!(matches!(judge(&p, Duration::ZERO, &bad, None), Verdict::Halt(r) if r.contains("z =")));
        assert!(matches!(judge(&p, Duration::ZERO, &good, None), Verdict::Advance(_)));
        // Too few votes: hold, whatever they say.
        let mut few = StageVotes::default();
        few.record(id(1), Arm::Canary, true);
        few.record(id(2), Arm::Control, false);
        assert!(matches!(judge(&p, Duration::ZERO, &few, None), Verdict::Hold(_)));
        // Healthy but young: hold until the stage has run its time.
        let slow = RolloutPlan { min_stage_duration: Duration::from_secs(60), ..plan() };
        assert!(matches!(judge(&slow, Duration::from_secs(59), &good, None), Verdict::Hold(_)));
        assert!(matches!(judge(&slow, Duration::from_secs(60), &good, None), Verdict::Advance(_)));
    }

    #[test]
    fn the_coordinators_own_evaluation_halts_a_regression_without_any_device() {
        let p = plan();
        let none = StageVotes::default();
        let worse = HeldOut { candidate: 5.3, stable: 5.0 };
        assert!(matches!(judge(&p, Duration::ZERO, &none, Some(worse)), Verdict::Halt(r) if r.contains("perplexity")));
        let nan = HeldOut { candidate: f64::NAN, stable: 5.0 };
        assert!(matches!(judge(&p, Duration::ZERO, &none, Some(nan)), Verdict::Halt(_)));
        let fine = HeldOut { candidate: 5.05, stable: 5.0 };
        assert!(matches!(judge(&p, Duration::ZERO, &none, Some(fine)), Verdict::Hold(_)), "then waits for votes");
    }

    #[test]
    fn one_device_is_one_vote() {
        let p = plan();
        let mut votes = StageVotes::default();
        for i in 0..20 {
            votes.record(id(i), Arm::Canary, false);
            votes.record(id(100 + i), Arm::Control, false);
        }
        // One hostile device reports failure a thousand times: still one failing device of 21.
        for _ in 0..1000 {
            votes.record(id(999), Arm::Canary, true);
        }
        assert_eq!(votes.stats().0, ArmStats { devices: 21, failures: 1 });
        assert!(matches!(judge(&p, Duration::ZERO, &votes, None), Verdict::Advance(_)));
        // Reports from devices on the stable arm are not votes.
        votes.record(id(5_000), Arm::Stable, true);
        assert_eq!(votes.stats().0.devices + votes.stats().1.devices, 41);
    }

    #[test]
    fn a_negligible_but_significant_difference_does_not_halt() {
        let p = plan();
        let canary = ArmStats { devices: 1_000_000, failures: 15_000 }; // 1.5 %
        let control = ArmStats { devices: 1_000_000, failures: 10_000 }; // 1.0 %
        assert!(failure_z(canary, control) > p.halt_z, "significant");
        assert!(matches!(judge_stats(&p, Duration::ZERO, canary, control, None), Verdict::Advance(_)));
        // Beyond the tolerance it halts.
        let worse = ArmStats { devices: 1_000_000, failures: 25_000 };
        assert!(matches!(judge_stats(&p, Duration::ZERO, worse, control, None), Verdict::Halt(_)));
    }
}
