//! The loopback runner: a real `covey-coordinator` (SQLite state, artifact directory,
//! gRPC on 127.0.0.1) and one real `covey-agent` per client, each with its own key,
//! state directory and local text, in this process. Everything the fleet does happens:
//! enrolment, signed polls, verified downloads, local training, clipping and noise,
//! signed streamed uploads, verification, aggregation, accounting, int8 publishing.
//!
//! The runner wakes on the coordinator's version notifications; each published version
//! is scored on the held-out texts as devices receive it (the int8 artifact named by its
//! signed manifest).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use covey_agent::{AgentConfig, RunUntil};
use covey_coordinator::store::RoundState;
use covey_coordinator::{CoordinatorConfig, server};
use covey_proto::manifest::Manifest;
use covey_proto::signing::UpdateHeader;
use tokio::sync::watch;

use crate::config::Mode;
use crate::error::{Result, SimError};
use crate::prepare::{self, Prepared};
use crate::progress::Progress;
use crate::report::{Report, RoundMetrics};
use crate::runner::UPDATE_OVERHEAD_BYTES;

/// The enrolment token of the loopback fleet (never leaves 127.0.0.1).
const TOKEN: &str = "covey-sim-loopback";

/// What a loopback run leaves behind besides its report.
#[derive(Debug)]
pub struct LoopbackOutcome {
    /// The report.
    pub report: Report,
    /// The final published weights (int8, decoded), as devices hold them.
    pub published: covey_tensors::NamedTensors,
    /// State directory of the first agent (it holds the verified final model).
    pub agent_state: PathBuf,
}

/// The agents of a loopback fleet, running until told to stop.
struct Fleet {
    agents: Vec<tokio::task::JoinHandle<covey_agent::Result<covey_agent::RunSummary>>>,
    dirs: Vec<PathBuf>,
    stop: watch::Sender<bool>,
}

impl Fleet {
    /// Enrol one agent per client (its own key, state directory and local text) with the
    /// coordinator at `url`, and start them.
    async fn start(prepared: &Prepared, work: &Path, url: &str) -> Result<Self> {
        let (stop, stop_rx) = watch::channel(false);
        let mut fleet = Self { agents: Vec::new(), dirs: Vec::new(), stop };
        for (i, client) in prepared.dataset.clients.iter().enumerate() {
            let data = work.join("data").join(format!("{i:05}"));
            std::fs::create_dir_all(&data).map_err(|e| SimError::io(&data, e))?;
            std::fs::write(data.join("local.txt"), client.train.join("\n\n")).map_err(|e| SimError::io(&data, e))?;
            let state = work.join("agents").join(format!("{i:05}"));
            let mut cfg = AgentConfig::new(state.clone(), data);
            cfg.coordinator = Some(url.to_owned());
            cfg.max_poll_wait = Duration::from_millis(300);
            cfg.train_threads = prepared.experiment.rounds.training_threads;
            cfg.example_dp = prepared.experiment.rounds.example_dp;
            cfg.keep_versions = 1;
            covey_agent::enroll(&cfg, TOKEN, &client.id).await?;
            let mut rx = stop_rx.clone();
            fleet.agents.push(tokio::spawn(async move {
                covey_agent::run_with_shutdown(cfg, RunUntil::Forever, async move {
                    let _ = rx.wait_for(|stop| *stop).await;
                })
                .await
            }));
            fleet.dirs.push(state);
        }
        Ok(fleet)
    }

    /// An error if an agent stopped (they run until told to).
    async fn check(&mut self) -> Result<()> {
        let Some(finished) = self.agents.iter().position(|a| a.is_finished()) else { return Ok(()) };
        let handle = self.agents.swap_remove(finished);
        let reason = match handle.await {
            Ok(Ok(summary)) => format!("stopped early after {} updates", summary.submitted),
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        Err(SimError::Client { client: format!("agent {finished}"), reason })
    }

    /// Stop every agent (a minute each at most).
    async fn stop(self) {
        let _ = self.stop.send(true);
        for a in self.agents {
            match tokio::time::timeout(Duration::from_secs(60), a).await {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "an agent stopped with an error"),
                Ok(Err(e)) => tracing::warn!(error = %e, "an agent task failed"),
                Err(_) => tracing::warn!("an agent did not stop within a minute"),
            }
        }
    }
}

/// Run a prepared experiment with a real coordinator and agents over loopback gRPC,
/// working under `work` (created; state, artifacts, agents' directories). Each published
/// version is scored on the held-out texts as devices receive it; the runner wakes on the
/// coordinator's version notifications.
pub async fn run(prepared: Arc<Prepared>, work: &Path, progress: &dyn Progress) -> Result<LoopbackOutcome> {
    let exp = &prepared.experiment;
    if exp.rounds.centralised {
        return Err(SimError::config("rounds.centralised", "a centralised baseline runs in-process only"));
    }
    let started = Instant::now();
    let base = work.join("base");
    std::fs::create_dir_all(&base).map_err(|e| SimError::io(&base, e))?;
    std::fs::write(base.join("config.json"), &prepared.config_json).map_err(|e| SimError::io(&base, e))?;
    let master_bytes = covey_tensors::encode(&prepared.master, None)?;
    std::fs::write(base.join("model.safetensors"), &master_bytes).map_err(|e| SimError::io(&base, e))?;
    drop(master_bytes);
    if let Some(tc) = &prepared.tokenizer_config_json {
        prepared.tokenizer.save_to_dir(&base).map_err(covey_model::ModelError::from)?;
        std::fs::write(base.join("tokenizer_config.json"), tc).map_err(|e| SimError::io(&base, e))?;
    }

    let engine = server::open_engine(coordinator_config(&prepared, work, &base)).await?;
    let mut versions = engine.watch_versions();
    let running = server::start(engine.clone()).await?;
    let url = format!("http://{}", running.addr);
    tracing::info!(%url, population = prepared.population(), cohort = prepared.cohort(), "loopback coordinator started");
    let mut fleet = Fleet::start(&prepared, work, &url).await?;

    // Round 0: the initial version; its wall time is starting the coordinator and
    // enrolling the agents.
    let (mut published, _) = published_weights(&engine, 1).await?;
    let mut rounds = vec![RoundMetrics {
        wall_seconds: started.elapsed().as_secs_f64(),
        ..round_zero(&evaluate_blocking(&prepared, published.clone()).await?)
    }];
    let mut scorer = Scorer::new(&prepared, engine.clone())?;
    let deadline = Instant::now() + Duration::from_secs(6 * 3600);
    while (rounds.len() as u64) <= exp.rounds.rounds {
        if Instant::now() > deadline {
            return Err(SimError::Data("the loopback fleet made no progress for hours".into()));
        }
        fleet.check().await?;
        let all = engine.store().rounds(exp.rounds.rounds as usize + 8).await?;
        if let Some(failed) = all.iter().find(|r| r.state == RoundState::Failed) {
            return Err(SimError::Data(format!("round {} failed on the coordinator", failed.id)));
        }
        let next = rounds.len() as u64;
        let Some(round) = all.iter().find(|r| r.state == RoundState::Published && r.id == next) else {
            // Woken by the next version (or, at the latest, in a second to check on the agents).
            let _ = tokio::time::timeout(Duration::from_secs(1), versions.changed()).await;
            continue;
        };
        let (metrics, weights) = scorer.score(round).await?;
        progress.round_done(&metrics, exp.rounds.rounds);
        rounds.push(metrics);
        published = weights;
    }
    fleet.stop().await;
    running.abort();

    let notes = vec![format!(
        "loopback gRPC: one coordinator and {} agents on 127.0.0.1; every update signed, verified and accounted by \
         the coordinator",
        prepared.population()
    )];
    let report = prepare::report(&prepared, Mode::LoopbackGrpc, rounds, notes)?;
    Ok(LoopbackOutcome { report, published, agent_state: fleet_first_dir(work) })
}

/// State directory of the first agent.
fn fleet_first_dir(work: &Path) -> PathBuf {
    work.join("agents").join(format!("{:05}", 0))
}

/// The metrics of the base model.
fn round_zero(m: &covey_model::EvalMetrics) -> RoundMetrics {
    RoundMetrics {
        round: 0,
        clients: 0,
        train_loss: f64::NAN,
        test_loss: m.mean_nll,
        test_perplexity: m.perplexity,
        top1: m.top1,
        top3: m.top3,
        epsilon: 0.0,
        bytes_up_per_client: 0,
        bytes_down_per_client: 0,
        wall_seconds: 0.0,
    }
}

/// Scores published rounds as devices receive them, counting the bytes they moved.
struct Scorer<'a> {
    prepared: &'a Arc<Prepared>,
    engine: Arc<covey_coordinator::Coordinator>,
    /// The artifacts each device holds (hex SHA-256).
    seen: std::collections::HashMap<[u8; 32], std::collections::HashSet<String>>,
}

impl<'a> Scorer<'a> {
    fn new(prepared: &'a Arc<Prepared>, engine: Arc<covey_coordinator::Coordinator>) -> Result<Self> {
        Ok(Self { prepared, engine, seen: std::collections::HashMap::new() })
    }

    /// The metrics of a published round, and the weights devices now hold.
    async fn score(
        &mut self,
        round: &covey_coordinator::store::RoundRecord,
    ) -> Result<(RoundMetrics, covey_tensors::NamedTensors)> {
        let updates = self.engine.store().updates(round.id).await?;
        let (weights, manifest) = published_weights(&self.engine, round.published_version).await?;
        let metrics = evaluate_blocking(self.prepared, weights.clone()).await?;
        // Devices under local noise report no loss.
        let reported: Vec<(f64, f64)> =
            updates.iter().filter_map(|u| u.train_loss.map(|l| (f64::from(l), u.num_examples as f64))).collect();
        let examples: f64 = reported.iter().map(|(_, n)| n).sum();
        let train_loss =
            if reported.is_empty() { f64::NAN } else { reported.iter().map(|(l, n)| l * n).sum::<f64>() / examples };
        let base = version_manifest(&self.engine, round.base_version).await?;
        let mut up = 0u64;
        let mut down = 0u64;
        for u in &updates {
            let header =
                UpdateHeader::parse(&u.header).map_err(|e| SimError::Data(format!("stored update header: {e}")))?;
            up += header.payload_len + UPDATE_OVERHEAD_BYTES as u64;
            // The device fetched what of the round's base version it did not hold yet (its
            // artifact cache is content-addressed: a release, the A factors come once).
            let held = self.seen.entry(u.device_id).or_default();
            for a in base.artifacts() {
                if held.insert(a.sha256.clone()) {
                    down += a.size;
                }
            }
        }
        let n = updates.len().max(1) as u64;
        tracing::info!(
            round = round.id,
            version = round.published_version,
            release = manifest.release.version,
            perplexity = metrics.perplexity,
            "published"
        );
        let m = RoundMetrics {
            round: round.id,
            clients: updates.len(),
            train_loss,
            test_loss: metrics.mean_nll,
            test_perplexity: metrics.perplexity,
            top1: metrics.top1,
            top3: metrics.top3,
            epsilon: manifest.privacy.epsilon,
            bytes_up_per_client: up / n,
            bytes_down_per_client: down / n,
            // From the round's opening to its version's signing, by the coordinator's clock
            // (this loop may observe a round late while it scores the previous one).
            wall_seconds: manifest.created_unix_ms.saturating_sub(round.opened_ms) as f64 / 1000.0,
        };
        Ok((m, weights))
    }
}

/// The coordinator's configuration for the experiment ([`Prepared::fleet_config`]) on
/// loopback, with its state under `work`, all updates awaited for an hour, and limits
/// raised for a fleet that enrols at once.
fn coordinator_config(prepared: &Prepared, work: &Path, base: &Path) -> CoordinatorConfig {
    let mut c = prepared.fleet_config();
    c.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    c.metrics_listen = None;
    c.state_dir = work.join("coordinator");
    c.initial_model = Some(base.to_owned());
    c.enrollment.tokens = vec![TOKEN.into()];
    // Every agent of the simulation enrols at once with the one static token.
    let agents = u32::try_from(prepared.population()).unwrap_or(u32::MAX).max(1);
    c.enrollment.per_minute = agents.saturating_mul(2);
    c.enrollment.per_token_per_minute = agents.saturating_mul(2);
    c.limits.device_requests_per_minute = c.limits.device_requests_per_minute.max(600);
    c.rounds.deadline = Duration::from_secs(3600);
    c.rounds.pause = Duration::from_millis(10);
    c.rounds.poll_interval = Duration::from_millis(200);
    c
}

/// The verified manifest of `version`.
async fn version_manifest(engine: &covey_coordinator::Coordinator, version: u64) -> Result<Manifest> {
    let record = engine
        .store()
        .version(version)
        .await?
        .ok_or_else(|| SimError::Data(format!("version {version} is not in the coordinator's store")))?;
    Manifest::verify(&record.manifest, &record.signature, &engine.public_key())
        .map_err(|e| SimError::Data(format!("manifest of version {version}: {e}")))
}

/// The weights of `version` as devices run them (the release decoded, the adapter merged),
/// and its verified manifest.
async fn published_weights(
    engine: &covey_coordinator::Coordinator,
    version: u64,
) -> Result<(covey_tensors::NamedTensors, Manifest)> {
    let manifest = version_manifest(engine, version).await?;
    let (weights, _) = engine.device_weights(version).await?;
    Ok((weights, manifest))
}

async fn evaluate_blocking(
    prepared: &Arc<Prepared>,
    weights: covey_tensors::NamedTensors,
) -> Result<covey_model::EvalMetrics> {
    let prepared = prepared.clone();
    tokio::task::spawn_blocking(move || prepare::evaluate(&prepared, &weights))
        .await
        .map_err(|e| SimError::Data(format!("evaluation thread: {e}")))?
}
