//! The round driver: open a round (the policy samples the cohort and fixes the plan),
//! collect until the target or the deadline, then aggregate and publish or fail; and the
//! operator's actions on rounds and versions.

use std::time::Duration;

use covey_proto::keys;
use tracing::{error, info, warn};

use super::{Coordinator, Opening};
use crate::error::{CoordinatorError, Result};
use crate::metrics::OutcomeLabel;
use crate::round::{NoRound, RoundFrame, RoundPlan, RoundPolicy, Sampling};
use crate::store::{Assignment, DeviceRecord, RoundRecord, RoundState};

impl Coordinator {
    /// Run rounds until `max-rounds` are published or `target-epsilon` is reached.
    /// Errors of the store or the artifacts are logged and retried with back-off (1 s
    /// doubling to 60 s); they never end the process.
    pub async fn run_rounds(self: std::sync::Arc<Self>) -> Result<()> {
        let mut failures = 0u32;
        loop {
            match self.round_step().await {
                Ok(true) => failures = 0,
                Ok(false) => return Ok(()),
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let delay =
                        Duration::from_secs(1u64 << failures.min(7).saturating_sub(1)).min(Duration::from_secs(60));
                    error!(error = %e, failures, retry_in_s = delay.as_secs(), "round driver error; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// One step of the driver; `false` when no more rounds will open.
    async fn round_step(&self) -> Result<bool> {
        let published =
            self.store.rounds(usize::MAX >> 1).await?.iter().filter(|r| r.state == RoundState::Published).count()
                as u64;
        if self.config.rounds.max_rounds > 0 && published >= self.config.rounds.max_rounds {
            info!(published, "max-rounds reached; no more rounds");
            return Ok(false);
        }
        let round = match self.store.active_round().await? {
            Some(r) => r,
            None => match self.open_round().await? {
                Opening::Opened(r) => *r,
                Opening::NotOpened(NoRound::BudgetReached { epsilon, next }) => {
                    info!(epsilon, next, "target-epsilon reached: no more rounds");
                    return Ok(false);
                }
                Opening::NotOpened(_) => {
                    let _ = tokio::time::timeout(self.config.rounds.poll_interval, self.wake.notified()).await;
                    return Ok(true);
                }
            },
        };
        self.drive(round).await?;
        tokio::time::sleep(self.config.rounds.pause).await;
        Ok(true)
    }

    /// Sample a cohort and open a round. Every eligible device (enrolled, not revoked,
    /// seen within the eligibility window) joins independently with probability
    /// q = min(1, cohort / N), N = max(`privacy.population`, eligible), drawn from the OS
    /// CSPRNG (from `rounds.seed` in simulations): the Poisson sampling the accountant
    /// assumes, with the q it is given. The round's plan is fixed here and stored.
    pub async fn open_round(&self) -> Result<Opening> {
        let now = self.now_ms();
        let window = self.config.rounds.eligibility_window.as_millis() as u64;
        let id = self.store.rounds(1).await?.first().map_or(1, |r| r.id + 1);
        let devices = self.store.devices().await?;
        let enrolled = devices.iter().filter(|d| !d.revoked).count();
        // Participation limits: a device over them is not sampled (and its upload is refused).
        let participations = self.store.participations().await?;
        let limits = self.config.privacy.participation;
        let max_contributions = participations.values().map(|p| p.count).max().unwrap_or(0);
        let online: Vec<DeviceRecord> =
            devices.into_iter().filter(|d| !d.revoked && d.last_seen_ms + window >= now).collect();
        let online_count = online.len();
        let eligible: Vec<DeviceRecord> = online
            .into_iter()
            .filter(|d| {
                let p = participations.get(&d.id);
                limits.allows(p.map_or(0, |p| p.count), p.map(|p| p.last_round), id)
            })
            .collect();
        let policy = RoundPolicy::new(&self.config);
        let sampling = match policy.sampling_among(online_count, eligible.len()) {
            Ok(s) => s,
            Err(no) => {
                if let NoRound::PopulationTooSmall { population, eligible } = no {
                    error!(
                        population,
                        eligible,
                        "privacy.population is below the eligible devices; no round opens (the sampling rate would \
                         be understated)"
                    );
                }
                return Ok(Opening::NotOpened(no));
            }
        };
        if let Some(no) = policy.within_budget(&self.privacy_events().await?, &sampling, enrolled, max_contributions)? {
            if let NoRound::DeltaTooLarge { delta, devices } = no {
                error!(
                    delta,
                    devices,
                    "privacy.delta is not below 1 / (enrolled devices): no round opens; lower delta below {}",
                    1.0 / devices as f64
                );
            }
            return Ok(Opening::NotOpened(no));
        }
        let cohort: Vec<&DeviceRecord> =
            policy.cohort(id, eligible.len(), &sampling)?.into_iter().map(|i| &eligible[i]).collect();
        let mut assignments = Vec::with_capacity(cohort.len());
        for d in &cohort {
            assignments.push(Assignment {
                round_id: id,
                device_id: d.id,
                task_id: keys::random_bytes()?,
                nonce: keys::random_bytes()?,
                used: false,
                declined: None,
            });
        }
        let base_version = self.store.current_version().await?;
        let frame = RoundFrame {
            round_id: id,
            base_version,
            base_manifest_hash: self.version(base_version).await?.manifest_sha256,
            a_factors_sha256: self.a_hash,
            deadline_ms: now + self.config.rounds.deadline.as_millis() as u64,
            max_payload_bytes: self.max_payload,
        };
        let plan = policy.plan(&frame, &sampling, &mut **self.strategy.lock().await);
        let round = new_round(&self.config.rounds, &frame, &sampling, cohort.len(), now, plan);
        self.store.insert_round(&round, &assignments).await?;
        crate::crashpoint::reach("round-opened");
        if round.state == RoundState::Failed {
            self.metrics.rounds.get_or_create(&OutcomeLabel { outcome: "failed".into() }).inc();
            warn!(round = id, cohort = round.cohort_size, "round failed at once: {}", round.failure);
        } else {
            let q = sampling.rate();
            info!(
                round = id,
                cohort = round.cohort_size,
                q,
                population = sampling.population,
                base = base_version,
                "round opened"
            );
        }
        Ok(Opening::Opened(Box::new(round)))
    }

    /// The plan a round was opened with; for a round stored before plans were, the plan
    /// the current configuration and strategy give it.
    pub(super) async fn plan_of(&self, round: &RoundRecord) -> Result<RoundPlan> {
        if let Some(plan) = &round.plan {
            return Ok(plan.clone());
        }
        let frame = RoundFrame {
            round_id: round.id,
            base_version: round.base_version,
            base_manifest_hash: self.version(round.base_version).await?.manifest_sha256,
            a_factors_sha256: self.a_hash,
            deadline_ms: round.deadline_ms,
            max_payload_bytes: self.max_payload,
        };
        let policy = RoundPolicy::new(&self.config);
        Ok(policy.plan(&frame, &sampling_of(round), &mut **self.strategy.lock().await))
    }

    /// Collect until the target or the deadline, then aggregate and publish (or fail).
    /// Returns at once when the round is finished, or when it is finished meanwhile (an
    /// operator's `fail-round`, `promote` or `rollback`).
    pub async fn drive(&self, round: RoundRecord) -> Result<()> {
        if matches!(round.state, RoundState::Published | RoundState::Failed) {
            return Ok(());
        }
        let mut round = round;
        if round.state.accepts_updates() {
            let Some(collected) = self.collect(round.id).await? else { return Ok(()) };
            round = collected;
            if round.state.accepts_updates() {
                let count = self.store.update_count(round.id).await?;
                if count < round.min_updates {
                    let reason = format!("{count} of the {} updates needed arrived by the deadline", round.min_updates);
                    self.fail(round.id, &reason).await?;
                    self.discard_updates(round.id).await;
                    return Ok(());
                }
                if !self.store.set_round_state(round.id, RoundState::Aggregating, "").await? {
                    return Ok(());
                }
            }
        }
        let started = std::time::Instant::now();
        crate::crashpoint::reach("aggregation-started");
        match self.aggregate_and_publish(&round).await {
            Ok(Some(v)) => {
                self.metrics.rounds.get_or_create(&OutcomeLabel { outcome: "published".into() }).inc();
                info!(round = round.id, version = v, "published");
            }
            Ok(None) => {
                self.fail(round.id, "no usable update").await?;
            }
            Err(CoordinatorError::Refused(reason)) => {
                info!(round = round.id, "not published: {reason}");
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        self.discard_updates(round.id).await;
        self.metrics.aggregate_seconds.observe(started.elapsed().as_secs_f64());
        self.metrics.round_seconds.observe(self.now_ms().saturating_sub(round.opened_ms) as f64 / 1000.0);
        Ok(())
    }

    /// Wait until round `id` has its target of updates, its deadline passes, or it stops
    /// accepting updates; `None` when it is no longer the active round.
    async fn collect(&self, id: u64) -> Result<Option<RoundRecord>> {
        loop {
            let round = match self.store.active_round().await? {
                Some(r) if r.id == id => r,
                _ => return Ok(None),
            };
            let updates = self.store.update_count(round.id).await?;
            if !round.state.accepts_updates() || updates >= round.target_updates {
                return Ok(Some(round));
            }
            // Every sampled device answered: an update, or a declined task.
            if updates + self.store.declined_count(round.id).await? >= round.cohort_size {
                return Ok(Some(round));
            }
            let now = self.now_ms();
            if now >= round.deadline_ms {
                return Ok(Some(round));
            }
            let left = Duration::from_millis(round.deadline_ms - now);
            let _ = tokio::time::timeout(left, self.wake.notified()).await;
        }
    }

    /// Mark round `id` failed (if it was not finished meanwhile) and count it.
    async fn fail(&self, id: u64, reason: &str) -> Result<bool> {
        let changed = self.store.set_round_state(id, RoundState::Failed, reason).await?;
        if changed {
            self.metrics.rounds.get_or_create(&OutcomeLabel { outcome: "failed".into() }).inc();
            warn!(round = id, "round failed: {reason}");
            self.wake.notify_one();
        }
        Ok(changed)
    }

    /// Delete a finished round's raw update payloads (unless `privacy.retain-updates`):
    /// they are personal data, and nothing reads them once the round is closed.
    async fn discard_updates(&self, round_id: u64) {
        if self.config.privacy.retain_updates {
            return;
        }
        let records = match self.store.updates(round_id).await {
            Ok(r) => r,
            Err(e) => {
                warn!(round = round_id, error = %e, "cannot list the round's updates to delete them");
                return;
            }
        };
        for r in records {
            if let Err(e) = self.uploads.remove(&r.payload_sha256) {
                warn!(round = round_id, update = r.id, error = %e, "cannot delete an update payload");
            }
        }
    }

    /// Make `version` current (operators). A round in progress on another base version is
    /// failed (its updates would merge into the wrong base); returns the current version
    /// and the round failed, if any.
    pub async fn promote(&self, version: u64) -> Result<(u64, Option<u64>)> {
        let Some(record) = self.store.version(version).await? else {
            return Err(CoordinatorError::NoSuchVersion(version));
        };
        self.check_available(&record, &super::publish::parse_manifest(&record)?)?;
        self.store.set_current_version(version).await?;
        self.metrics.current_version.set(version as i64);
        self.versions.send_replace(version);
        info!(version, "promoted");
        let mut failed = None;
        if let Some(r) = self.store.active_round().await?
            && r.base_version != version
            && self.fail(r.id, &format!("superseded: the operator made version {version} current")).await?
        {
            failed = Some(r.id);
        }
        Ok((version, failed))
    }

    /// The operator's `promote`: with `publish.release-on-promote`, an adapter version is
    /// merged into a new base release, which becomes current
    /// ([`Coordinator::cut_release`]); otherwise [`Coordinator::promote`].
    pub async fn promote_by_operator(&self, version: u64) -> Result<(u64, Option<u64>)> {
        if self.config.publish.release_on_promote {
            let record = self.store.version(version).await?.ok_or(CoordinatorError::NoSuchVersion(version))?;
            if super::publish::parse_manifest(&record)?.adapter.is_some() {
                return self.cut_release(version).await;
            }
        }
        self.promote(version).await
    }

    /// Go back to `version`, or to the current version's parent when 0.
    pub async fn rollback(&self, version: u64) -> Result<(u64, Option<u64>)> {
        let target = if version == 0 {
            let current = self.store.current_version().await?;
            match self.store.version(current).await? {
                Some(v) if v.parent > 0 => v.parent,
                _ => return Err(CoordinatorError::Refused("the current version has no parent".into())),
            }
        } else {
            version
        };
        self.promote(target).await
    }

    /// Fail the round in progress (operators): `round_id` must be it. Returns the state it
    /// had.
    pub async fn fail_round(&self, round_id: u64, reason: &str) -> Result<RoundState> {
        let Some(r) = self.store.active_round().await?.filter(|r| r.id == round_id) else {
            return Err(CoordinatorError::Refused(format!("round {round_id} is not in progress")));
        };
        let why = format!("failed by the operator: {}", if reason.is_empty() { "no reason given" } else { reason });
        if !self.fail(r.id, &why).await? {
            return Err(CoordinatorError::Refused(format!("round {round_id} finished meanwhile")));
        }
        Ok(r.state)
    }
}

/// How a stored round was sampled (a round stored before Poisson sampling: its cohort
/// was the whole sample).
pub(super) fn sampling_of(round: &RoundRecord) -> Sampling {
    if round.population > 0 {
        Sampling { population: round.population as usize, expected: round.expected_cohort.max(1) as usize }
    } else {
        let n = round.cohort_size.max(1) as usize;
        Sampling { population: n, expected: n }
    }
}

/// The record of a round just sampled: failed at once when the sample is below
/// `min-updates`.
fn new_round(
    rounds: &crate::config::RoundsConfig,
    frame: &RoundFrame,
    sampling: &Sampling,
    cohort: usize,
    now: u64,
    plan: RoundPlan,
) -> RoundRecord {
    let too_few = cohort < rounds.min_updates;
    RoundRecord {
        id: frame.round_id,
        state: if too_few { RoundState::Failed } else { RoundState::Open },
        base_version: frame.base_version,
        published_version: 0,
        cohort_size: cohort as u64,
        population: sampling.population as u64,
        expected_cohort: sampling.expected as u64,
        target_updates: rounds.target_updates.min(cohort) as u64,
        min_updates: rounds.min_updates as u64,
        opened_ms: now,
        deadline_ms: frame.deadline_ms,
        failure: if too_few {
            format!("sampled {cohort} devices, fewer than min-updates {}", rounds.min_updates)
        } else {
            String::new()
        },
        plan: Some(plan),
    }
}
