//! The agent's loop: poll → fetch and verify → train → clip / noise → sign → upload.
//!
//! Failures are sorted by [`AgentError::is_transient`]: transient ones (the coordinator is
//! unreachable, overloaded, failed internally) are retried with backoff inside each call,
//! and the task's checkpoint is kept; permanent ones end the task: it is logged, its
//! checkpoint dropped, and the agent polls again after a backoff that grows with
//! consecutive failures.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backoff::Backoff;
use crate::checkpoint::CheckpointStore;
use crate::client::{CoordinatorClient, PollReply, SubmitOutcome};
use crate::config::AgentConfig;
use crate::error::{AgentError, Result};
use crate::identity::Identity;
use crate::models::{ModelCache, VerifiedManifest, VerifiedModel};
use crate::task::Task;
use crate::train::{TrainJob, local_spec, train};
use crate::update::{PrivateUpdate, SignedUpdate};

/// File of the state directory listing submitted updates, one JSON object a line.
pub const HISTORY_FILE: &str = "history.jsonl";

/// When [`run`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunUntil {
    /// Never (until the shutdown future of [`run_with_shutdown`] resolves, or a fatal error).
    Forever,
    /// Once this many updates were accepted by the coordinator.
    Updates(u64),
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Updates the coordinator accepted.
    pub submitted: u64,
    /// Rounds of those updates, in order.
    pub rounds: Vec<u64>,
    /// Tasks given up after a permanent failure.
    pub failed_tasks: u64,
    /// Tasks declined because they do not fit the device (`max-memory-bytes`).
    pub declined: u64,
    /// Polls that answered.
    pub polls: u64,
    /// The newest model version trained on.
    pub last_version: Option<u64>,
}

/// One line of `history.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Round.
    pub round_id: u64,
    /// Hex task id.
    pub task_id: String,
    /// Version trained on.
    pub base_version: u64,
    /// Coordinator's id of the update (0 when an earlier attempt was stored).
    pub update_id: u64,
    /// Training sequences behind the update.
    pub examples: u64,
    /// Last training loss.
    pub train_loss: f32,
    /// Clip norm applied.
    pub clip_norm: f64,
    /// Noise multiplier applied.
    pub noise_multiplier: f64,
    /// Global norm of `B` before clipping.
    pub pre_clip_norm: Option<f64>,
    /// Payload size in bytes.
    pub payload_bytes: u64,
    /// Optimizer step training resumed from after a restart, if it did.
    #[serde(default)]
    pub resumed_from_step: Option<usize>,
    /// Bytes downloaded for the task (manifest excluded): 0 when the version was cached,
    /// the adapter alone when only it was new.
    #[serde(default)]
    pub downloaded_bytes: u64,
    /// Seconds spent training.
    #[serde(default)]
    pub train_seconds: f64,
    /// Peak resident memory of the agent process so far, in bytes (Linux `VmHWM`; `None`
    /// where the platform does not say).
    #[serde(default)]
    pub peak_rss_bytes: Option<u64>,
    /// When it was accepted, ms since the Unix epoch.
    pub submitted_unix_ms: u64,
}

/// The device's privacy ledger in the state directory.
pub const LEDGER_FILE: &str = "privacy-ledger.json";

/// Run the agent of `cfg` until `until` is reached or a fatal error occurs.
///
/// Needs an enrolled state directory ([`crate::enroll`]). Fatal: no or corrupt identity,
/// unusable configuration, `cfg.max_task_failures` consecutive failed tasks, and a spent
/// privacy budget (`cfg.privacy_budget`).
pub async fn run(cfg: AgentConfig, until: RunUntil) -> Result<RunSummary> {
    run_with_shutdown(cfg, until, std::future::pending()).await
}

/// [`run`], also returning (with what was done so far) as soon as `shutdown` resolves.
/// A training step in progress continues on its blocking thread and keeps checkpointing;
/// the next run resumes it.
pub async fn run_with_shutdown(
    cfg: AgentConfig,
    until: RunUntil,
    shutdown: impl Future<Output = ()>,
) -> Result<RunSummary> {
    cfg.validate()?;
    let identity = Identity::load(&cfg.state_dir)?;
    // One agent per state directory: two would race on the ledger, the checkpoints and
    // the same tasks (two independently noised updates of one task).
    let _lock = StateLock::acquire(&cfg.state_dir)?;
    let url = cfg.coordinator.clone().unwrap_or_else(|| identity.coordinator_url.clone());
    let coordinator = CoordinatorClient::connect(&url, &cfg)?;
    tracing::info!(device = %identity.device_id_hex(), coordinator = %url, "agent started");
    let personal = crate::personal::open_store(&cfg)?.map(std::sync::Arc::new);
    let agent = Agent {
        personal,
        models: ModelCache::new(&cfg.state_dir),
        checkpoints: CheckpointStore::new(&cfg.state_dir),
        rank_basis: std::sync::Mutex::new(None),
        cfg,
        identity,
        coordinator,
    };
    let mut summary = RunSummary::default();
    let mut failures = 0u32;
    let backoff = Backoff::from(&agent.cfg.backoff);
    tokio::pin!(shutdown);
    loop {
        if let RunUntil::Updates(n) = until
            && summary.submitted >= n
        {
            break;
        }
        let step = agent.step(&mut summary);
        let outcome = tokio::select! {
            biased;
            () = &mut shutdown => {
                tracing::info!("shutting down");
                break;
            }
            outcome = step => outcome,
        };
        let pause = match outcome {
            Ok(Some(wait)) => {
                failures = 0;
                wait
            }
            Ok(None) => {
                failures = 0;
                Duration::ZERO
            }
            Err(e @ AgentError::Privacy(covey_privacy::PrivacyError::BudgetExceeded { .. })) => {
                tracing::warn!(error = %e, "the device's privacy budget is spent; stopping");
                return Err(e);
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!(error = %e, failures, "task failed");
                if let Some(max) = agent.cfg.max_task_failures
                    && failures >= max
                {
                    return Err(AgentError::TooManyFailures { failures, last: Box::new(e) });
                }
                backoff.delay(failures - 1)
            }
        };
        if !pause.is_zero() {
            tokio::select! {
                biased;
                () = &mut shutdown => {
                    tracing::info!("shutting down");
                    break;
                }
                () = tokio::time::sleep(pause) => {}
            }
        }
    }
    Ok(summary)
}

struct Agent {
    cfg: AgentConfig,
    identity: Identity,
    coordinator: CoordinatorClient,
    models: ModelCache,
    checkpoints: CheckpointStore,
    /// What the last task trained on: the basis of the rank cap a memory budget implies.
    rank_basis: std::sync::Mutex<Option<RankBasis>>,
    /// The sealed local adapter, when this device personalises.
    personal: Option<std::sync::Arc<crate::personal::PersonalStore>>,
}

/// The model and training shape of the last task, for [`Agent::rank_cap`].
struct RankBasis {
    config: covey_model::LlamaConfig,
    release_bytes: u64,
    training: crate::task::TrainingSpec,
    targets: Vec<covey_model::LoraTarget>,
    layout_rank: usize,
}

impl Agent {
    /// The rank cap stated with each poll: `max-lora-rank` when set; otherwise, with a
    /// `max-memory-bytes` budget, the largest rank whose task would fit it on the model and
    /// training shape of the last task, trained or declined (none before the first task:
    /// its memory check declines it if it does not fit, and the next poll asks for less).
    fn rank_cap(&self) -> u32 {
        if self.cfg.max_lora_rank > 0 {
            return self.cfg.max_lora_rank;
        }
        let (Some(limit), Ok(basis)) = (self.cfg.max_memory_bytes, self.rank_basis.lock()) else { return 0 };
        let Some(b) = basis.as_ref() else { return 0 };
        let r =
            crate::budget::rank_for_budget(&b.config, b.release_bytes, &b.training, &b.targets, b.layout_rank, limit);
        u32::try_from(r).unwrap_or(u32::MAX)
    }

    /// Keep what `task` trains on as the basis of the next rank cap.
    fn remember_rank_basis(
        &self,
        config: &covey_model::LlamaConfig,
        release_bytes: u64,
        task: &Task,
        layout_rank: usize,
    ) {
        if let Ok(mut basis) = self.rank_basis.lock() {
            *basis = Some(RankBasis {
                config: config.clone(),
                release_bytes,
                training: task.training.clone(),
                targets: task.lora.targets.clone(),
                layout_rank,
            });
        }
    }

    /// One poll and, when it brings a task, the whole task. `Ok(Some(d))`: wait `d` before
    /// polling again; `Ok(None)`: poll again now.
    async fn step(&self, summary: &mut RunSummary) -> Result<Option<Duration>> {
        let outcome = self.coordinator.poll(&self.identity, self.rank_cap()).await?;
        summary.polls += 1;
        let task = match outcome {
            PollReply::Wait { retry_after, reason } => {
                let wait = retry_after.clamp(Duration::from_millis(10), self.cfg.max_poll_wait);
                tracing::debug!(reason, wait_ms = wait.as_millis() as u64, "nothing to do");
                return Ok(Some(wait));
            }
            PollReply::Task(task) => task,
        };
        crate::task::verify_task(&task, &self.identity.device_id, &self.identity.coordinator_public_key)?;
        let task = crate::task::validate(&task)?;
        self.checkpoints.remove_others(&task.task_id);
        match self.run_task(&task).await {
            Ok((entry, version)) => {
                summary.submitted += 1;
                summary.rounds.push(entry.round_id);
                summary.last_version = Some(version);
                self.checkpoints.remove(&task.task_id);
                if let Err(e) = append_history(&self.cfg.state_dir, &entry) {
                    tracing::warn!(error = %e, "cannot record the update in the history");
                }
                Ok(None)
            }
            Err(AgentError::Declined { .. }) => {
                self.checkpoints.remove(&task.task_id);
                summary.declined += 1;
                Ok(Some(self.cfg.max_poll_wait))
            }
            Err(e) => {
                if !e.is_transient() {
                    summary.failed_tasks += 1;
                    tracing::warn!(task = %task.id_hex(), round = task.round_id, error = %e, "giving up the task");
                    self.checkpoints.remove(&task.task_id);
                }
                Err(e)
            }
        }
    }

    /// Carry out one task to an accepted upload.
    async fn run_task(&self, task: &Task) -> Result<(HistoryEntry, u64)> {
        let id = task.id_hex();
        tracing::info!(task = %id, round = task.round_id, version = task.base_version, "task received");
        self.check_deadline(task)?;
        if let Some(update) = self.checkpoints.load_update(task, &self.identity) {
            tracing::info!(task = %id, "re-sending the update signed before a restart");
            return self.upload(task, &update, None, None).await.map(|e| (e, task.base_version));
        }
        if task.privacy.noise_multiplier > 0.0 && self.checkpoints.was_sent(task) {
            // The coordinator may have seen the noised update that was rejected; a second,
            // independently noised one would spend the task's privacy twice.
            return Err(AgentError::InvalidTask {
                task_id: id,
                field: "task_id",
                reason: "a noised update of this task already left the device; not sending another".into(),
            });
        }
        // Refuse early (before any download or training) what the budget cannot pay for;
        // the charge itself comes just before the update is noised and signed.
        self.check_budget(task)?;
        let (model, downloaded) = match self.ensure_model(task).await {
            Err(AgentError::Declined { task_id, reason }) => {
                tracing::warn!(task = %task_id, reason, "declining the task");
                self.coordinator.decline(&self.identity, &task.task_id, &reason).await?;
                return Err(AgentError::Declined { task_id, reason });
            }
            other => other?,
        };
        check_layout(task, &model)?;
        self.remember_rank_basis(&model.config, model.manifest.release.model.size, task, model.manifest.lora.rank);
        let mut spec = local_spec(task, &self.cfg, &self.identity.device_id);
        if let Some(limit) = self.cfg.max_memory_bytes {
            // What the budget leaves above the leanest footprint buys speed: activations
            // kept instead of recomputed.
            let need = crate::budget::task_memory_bytes(
                &model.config,
                model.manifest.release.model.size,
                &task.training,
                task.lora.rank,
                &task.lora.targets,
            );
            spec.train.activation_memory_mib = usize::try_from(limit.saturating_sub(need) >> 20).unwrap_or(usize::MAX);
        }
        let job = TrainJob {
            model,
            data_dir: self.cfg.data_dir.clone(),
            spec,
            task: task.clone(),
            store: self.checkpoints.clone(),
        };
        let started = std::time::Instant::now();
        let trained = train(job).await?;
        tracing::info!(task = %id, examples = trained.examples, loss = trained.loss,
            resumed_from = trained.resumed_from, seconds = started.elapsed().as_secs_f64(), "trained");
        self.check_deadline(task)?;
        self.charge_budget(task)?;
        let private = PrivateUpdate::new(trained.b, task.privacy)?;
        let pre_clip = private.pre_clip_norm();
        let signed = SignedUpdate::sign(private, task, &self.identity, trained.examples, trained.loss)?;
        self.checkpoints.save_update(task, &signed)?;
        self.checkpoints.mark_sent(task)?;
        let mut entry = self.upload(task, &signed, Some(pre_clip), trained.resumed_from).await?;
        entry.downloaded_bytes = downloaded;
        entry.train_seconds = started.elapsed().as_secs_f64();
        self.personalise(task.base_version).await;
        Ok((entry, task.base_version))
    }

    /// Fit the local adapter on `version` (the newest global model this device holds),
    /// after its update left: the upload is built and signed before this runs, from the
    /// task's `B` alone. A failure is logged and changes nothing already stored.
    async fn personalise(&self, version: u64) {
        let (Some(store), Some(cfg)) = (&self.personal, &self.cfg.personalisation) else { return };
        let model = match self.models.load(version, &self.identity.coordinator_public_key) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(version, error = %e, "cannot personalise: the version does not load");
                return;
            }
        };
        let (store, cfg, data_dir) = (store.clone(), cfg.clone(), self.cfg.data_dir.clone());
        let (device_id, threads) = (self.identity.device_id, self.cfg.train_threads);
        let fitted = tokio::task::spawn_blocking(move || {
            crate::personal::fit(model, &cfg, &data_dir, &store, &device_id, threads)
        })
        .await;
        match fitted {
            Ok(Ok(meta)) => tracing::info!(version = meta.version, tokens = meta.train_tokens, "personalised"),
            Ok(Err(e)) => tracing::warn!(version, error = %e, "personalisation failed; the last local adapter stays"),
            Err(e) => tracing::warn!(version, error = %e, "personalisation panicked; the last local adapter stays"),
        }
    }

    async fn upload(
        &self,
        task: &Task,
        update: &SignedUpdate,
        pre_clip_norm: Option<f64>,
        resumed_from_step: Option<usize>,
    ) -> Result<HistoryEntry> {
        let outcome = self.coordinator.submit(update).await?;
        let update_id = match outcome {
            SubmitOutcome::Stored { update_id, .. } => update_id,
            SubmitOutcome::AlreadyStored => 0,
        };
        tracing::info!(task = %task.id_hex(), round = task.round_id, update_id, bytes = update.payload().len(), "update accepted");
        Ok(HistoryEntry {
            round_id: task.round_id,
            task_id: task.id_hex(),
            base_version: task.base_version,
            update_id,
            examples: update.header().num_examples,
            train_loss: update.train_loss(),
            clip_norm: task.privacy.clip_norm,
            noise_multiplier: task.privacy.noise_multiplier,
            pre_clip_norm,
            payload_bytes: update.payload().len() as u64,
            resumed_from_step,
            downloaded_bytes: 0,
            train_seconds: 0.0,
            peak_rss_bytes: peak_rss_bytes(),
            submitted_unix_ms: covey_proto::signing::unix_ms(),
        })
    }

    /// The ledger and the cost of this task's local Gaussian release (z = the task's noise
    /// multiplier, q = 1: the device's own data is in every update it sends), when the
    /// device has a budget. A task without clipping or without noise is refused then.
    fn budget_and_cost(
        &self,
        task: &Task,
    ) -> Result<Option<(covey_privacy::BudgetLedger, covey_privacy::RdpAccountant)>> {
        let Some(budget) = self.cfg.privacy_budget else { return Ok(None) };
        for (field, value) in
            [("privacy.clip_norm", task.privacy.clip_norm), ("privacy.noise_multiplier", task.privacy.noise_multiplier)]
        {
            if value <= 0.0 {
                return Err(AgentError::InvalidTask {
                    task_id: task.id_hex(),
                    field,
                    reason: "this device has a privacy budget and the task does not clip and noise its update".into(),
                });
            }
        }
        let ledger = covey_privacy::BudgetLedger::open(&self.cfg.state_dir.join(LEDGER_FILE), budget)?;
        let mut cost = covey_privacy::RdpAccountant::default();
        cost.compose_subsampled_gaussian(1.0, task.privacy.noise_multiplier, 1)?;
        Ok(Some((ledger, cost)))
    }

    /// Refuse, before any work, a task the budget cannot pay for (nothing is charged).
    fn check_budget(&self, task: &Task) -> Result<()> {
        let Some((ledger, cost)) = self.budget_and_cost(task)? else { return Ok(()) };
        let budget = ledger.budget();
        let would = ledger.would_spend(&self.identity.device_id_hex(), &cost)?;
        if would > budget.epsilon {
            return Err(AgentError::Privacy(covey_privacy::PrivacyError::BudgetExceeded {
                device: self.identity.device_id_hex(),
                would_spend: would,
                budget: budget.epsilon,
                delta: budget.delta,
            }));
        }
        Ok(())
    }

    /// Charge the task's release to the persisted ledger, just before the update is
    /// noised and signed: download or training failures, retried, charge nothing; once
    /// signed, the update is persisted and re-sent as it is, never noised again. A crash
    /// between the charge and the persisted update charges the retrained task again: the
    /// ledger can only over-count.
    fn charge_budget(&self, task: &Task) -> Result<()> {
        let Some((mut ledger, cost)) = self.budget_and_cost(task)? else { return Ok(()) };
        let spent = ledger.charge(&self.identity.device_id_hex(), &cost)?;
        let budget = ledger.budget().epsilon;
        tracing::info!(task = %task.id_hex(), epsilon_spent = spent, budget, "privacy budget charged");
        Ok(())
    }

    fn check_deadline(&self, task: &Task) -> Result<()> {
        match task.late_by(covey_proto::signing::unix_ms()) {
            Some(late_ms) => Err(AgentError::DeadlinePassed { task_id: task.id_hex(), late_ms }),
            None => Ok(()),
        }
    }

    /// The task's base version, from the cache or downloaded and verified (then cached),
    /// and the bytes downloaded for it. Artifacts already cached (a release shared with an
    /// earlier version, the `A` factors) are not downloaded again.
    async fn ensure_model(&self, task: &Task) -> Result<(VerifiedModel, u64)> {
        let key = self.identity.coordinator_public_key;
        match self.models.load(task.base_version, &key) {
            Ok(m) if m.manifest_hash == task.base_manifest_hash => return Ok((m, 0)),
            Ok(_) => {
                tracing::warn!(version = task.base_version, "the cached version differs from the task's; fetching")
            }
            Err(AgentError::Io { .. }) => {}
            Err(e) => tracing::warn!(version = task.base_version, error = %e, "cached version unusable; fetching"),
        }
        let signed = self.coordinator.get_manifest(&self.identity, task.base_version).await?;
        let manifest = VerifiedManifest::verify(
            &signed.manifest,
            &signed.signature,
            &key,
            task.base_version,
            Some(&task.base_manifest_hash),
        )?;
        let mut downloaded = 0u64;
        // The config first (small): the budget check needs it, before the weights.
        let mut artifacts = manifest.artifacts();
        artifacts.sort_by_key(|(a, _)| a.format != crate::models::CONFIG_FORMAT);
        let mut checked = false;
        for (a, sha256) in artifacts {
            if !checked && a.format != crate::models::CONFIG_FORMAT {
                self.check_memory(task, &manifest)?;
                checked = true;
            }
            if self.models.artifacts().get(&sha256).is_some() {
                continue;
            }
            tracing::info!(version = task.base_version, artifact = %a.sha256, format = %a.format, bytes = a.size,
                "fetching a verified artifact");
            let bytes = self
                .coordinator
                .fetch_artifact(&self.identity, &sha256, Some(a.size), self.cfg.max_artifact_bytes)
                .await?;
            downloaded += bytes.len() as u64;
            self.models.artifacts().put(&sha256, &bytes)?;
        }
        let stored = self.models.store(&manifest)?;
        self.models.prune(self.cfg.keep_versions);
        Ok((stored, downloaded))
    }
}

impl Agent {
    /// Decline (and tell the coordinator) a task whose training would not fit
    /// `max-memory-bytes`, by [`crate::budget::task_memory_bytes`] on the version's config.
    fn check_memory(&self, task: &Task, manifest: &VerifiedManifest) -> Result<()> {
        let Some(limit) = self.cfg.max_memory_bytes else { return Ok(()) };
        let m = manifest.manifest();
        let config_sha = m.release.config.sha256_bytes().unwrap_or_default();
        let bytes = self.models.artifacts().get(&config_sha).ok_or_else(|| AgentError::ArtifactMismatch {
            sha256: m.release.config.sha256.clone(),
            reason: "the config is not cached".into(),
        })?;
        let config: covey_model::LlamaConfig = serde_json::from_slice(&bytes)
            .map_err(|e| AgentError::untrusted(m.version, format!("config.json does not parse: {e}")))?;
        let need = crate::budget::task_memory_bytes(
            &config,
            m.release.model.size,
            &task.training,
            task.lora.rank,
            &task.lora.targets,
        );
        // Whether or not this task fits, the next poll asks for a rank that would.
        self.remember_rank_basis(&config, m.release.model.size, task, m.lora.rank);
        if need <= limit {
            return Ok(());
        }
        Err(AgentError::Declined {
            task_id: task.id_hex(),
            reason: format!(
                "training needs about {:.2} GB (batch {} × {} tokens on {} parameters), the device allows {:.2} GB",
                need as f64 / 1e9,
                task.training.batch_size,
                task.training.seq_len,
                crate::budget::parameters(&config),
                limit as f64 / 1e9
            ),
        })
    }
}

/// The task's LoRA layout must be the version's: the same `A` factors and targets, a rank
/// no larger than the layout's (a device of lesser means trains the first rows of `A`,
/// HetLoRA) and the same scale `alpha / rank` (an adapter trained on anything else would
/// merge into the wrong base, or at the wrong scale).
fn check_layout(task: &Task, model: &VerifiedModel) -> Result<()> {
    let layout = &model.manifest.lora;
    let bad = |field: &'static str, reason: String| AgentError::InvalidTask { task_id: task.id_hex(), field, reason };
    if layout.a.sha256_bytes().ok() != Some(task.lora.a_factors_sha256) {
        return Err(bad(
            "lora.a_factors_sha256",
            format!(
                "names {}, version {} issues {}",
                hex::encode(task.lora.a_factors_sha256),
                model.version(),
                layout.a.sha256
            ),
        ));
    }
    let targets: Vec<&str> = task.lora.targets.iter().map(|t| t.hf_name()).collect();
    let task_scale = task.lora.alpha as f32 / task.lora.rank as f32;
    let layout_scale = layout.alpha / layout.rank as f32;
    if task.lora.rank > layout.rank
        || (task_scale - layout_scale).abs() > 1e-6 * layout_scale
        || targets != layout.targets
    {
        return Err(bad(
            "lora",
            format!(
                "rank {} alpha {} targets {:?}, version {} has rank {} alpha {} targets {:?}",
                task.lora.rank,
                task.lora.alpha,
                targets,
                model.version(),
                layout.rank,
                layout.alpha,
                layout.targets
            ),
        ));
    }
    Ok(())
}

/// An exclusive lock on `state/agent.lock`, held while the agent runs (released by the
/// operating system when the process ends, however it ends).
#[derive(Debug)]
pub struct StateLock {
    _file: std::fs::File,
}

/// File locked by a running agent in its state directory.
pub const LOCK_FILE: &str = "agent.lock";

impl StateLock {
    /// Take the lock, or fail with [`AgentError::StateLocked`] when another agent holds it.
    pub fn acquire(state_dir: &Path) -> Result<Self> {
        let path = state_dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| AgentError::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(AgentError::StateLocked { state_dir: state_dir.to_owned() }),
            Err(std::fs::TryLockError::Error(e)) => Err(AgentError::io(&path, e)),
        }
    }
}

/// Peak resident set size of this process (`VmHWM` of `/proc/self/status`), on Linux.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn append_history(state_dir: &Path, entry: &HistoryEntry) -> Result<()> {
    use std::io::Write;
    let path = state_dir.join(HISTORY_FILE);
    let mut line = serde_json::to_vec(entry).map_err(|e| AgentError::json(&path, e))?;
    line.push(b'\n');
    let mut f =
        std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|e| AgentError::io(&path, e))?;
    f.write_all(&line).map_err(|e| AgentError::io(&path, e))
}

/// The entries of `history.jsonl` (an absent file is an empty history; unreadable lines
/// are skipped).
pub fn read_history(state_dir: &Path) -> Vec<HistoryEntry> {
    std::fs::read_to_string(state_dir.join(HISTORY_FILE))
        .map(|text| text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
        .unwrap_or_default()
}
