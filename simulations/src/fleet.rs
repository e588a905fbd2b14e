//! A real fleet on one machine: a `covey-coordinator` process and one `covey-agent`
//! process per device, over loopback gRPC, federating a real pretrained model (a GGUF
//! file or a model directory) on roles of Shakespeare plays. This module holds what is
//! not process handling: the experiment file, the devices' data, and the report made
//! from the coordinator's state and the agents' histories once the processes are done.
//! `covey-sim fleet` (in `cli/sim`) starts and stops the processes.

use std::path::{Path, PathBuf};

use covey_agent::run::HistoryEntry;
use covey_coordinator::CoordinatorConfig;
use covey_model::{LoadedModel, Precision};
use covey_tensors::quant::StoredTensor;
use serde::Serialize;

use crate::error::{Result, SimError};

/// A fleet experiment (TOML); the file's schema lives in `covey-experiment`.
pub use covey_experiment::FleetExperiment;

/// One device's data.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceData {
    /// `play:speaker`.
    pub role: String,
    /// Its directory (`train.txt`).
    pub dir: PathBuf,
    /// Bytes of training text.
    pub train_bytes: usize,
    /// Bytes held out.
    pub held_out_bytes: usize,
}

/// Write every device's training text under `work/data/device-{i}` and the held-out text
/// of all of them to `work/data/held-out.txt` (every tenth speech of each role).
pub fn prepare_data(exp: &FleetExperiment, work: &Path) -> Result<(Vec<DeviceData>, PathBuf)> {
    let mut roles_per_play = Vec::new();
    for play in &exp.plays {
        let path = exp.data_dir.join(play);
        let text = std::fs::read_to_string(&path).map_err(|e| SimError::io(&path, e))?;
        let roles = covey_model::data::roles_by_size(&text);
        roles_per_play.push((play.clone(), text, roles));
    }
    let mut chosen = Vec::new();
    'outer: for rank in 0.. {
        let mut any = false;
        for (play, text, roles) in &roles_per_play {
            if let Some((speaker, _)) = roles.get(rank) {
                any = true;
                chosen.push((play.clone(), text.clone(), speaker.clone()));
                if chosen.len() == exp.devices {
                    break 'outer;
                }
            }
        }
        if !any {
            return Err(SimError::Data(format!(
                "the plays have only {} roles for {} devices",
                chosen.len(),
                exp.devices
            )));
        }
    }
    let data = work.join("data");
    let mut devices = Vec::new();
    let mut held_out = String::new();
    for (i, (play, text, speaker)) in chosen.into_iter().enumerate() {
        let (train, test) = covey_model::data::role_split(&text, &speaker);
        let dir = data.join(format!("device-{i}"));
        std::fs::create_dir_all(&dir).map_err(|e| SimError::io(&dir, e))?;
        let file = dir.join("train.txt");
        std::fs::write(&file, &train).map_err(|e| SimError::io(&file, e))?;
        held_out.push_str(&test);
        devices.push(DeviceData {
            role: format!("{play}:{speaker}"),
            dir,
            train_bytes: train.len(),
            held_out_bytes: test.len(),
        });
    }
    let file = data.join("held-out.txt");
    std::fs::write(&file, &held_out).map_err(|e| SimError::io(&file, e))?;
    Ok((devices, file))
}

/// One published version, as the report shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VersionRow {
    /// Version.
    pub version: u64,
    /// Its base release.
    pub release: u64,
    /// Adapter rounds on the release (0: the release itself).
    pub adapter_rounds: u64,
    /// Held-out perplexity of the weights devices run at this version.
    pub perplexity: f64,
    /// ε spent (at the coordinator's δ).
    pub epsilon: f64,
    /// Bytes a device that holds the previous version downloads for this one.
    pub download_bytes: u64,
}

/// One round, as the report shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundRow {
    /// Round.
    pub round: u64,
    /// Version trained on.
    pub base_version: u64,
    /// Version published.
    pub published_version: u64,
    /// Seconds from the round's opening to its version's signature.
    pub wall_seconds: f64,
    /// Mean bytes each device sent.
    pub bytes_up_per_device: f64,
    /// Mean bytes each device downloaded for the round's task.
    pub bytes_down_per_device: f64,
    /// Largest bytes a device downloaded for the round's task.
    pub max_bytes_down: u64,
    /// Mean seconds of local training.
    pub train_seconds: f64,
    /// Largest agent peak resident memory so far, bytes.
    pub peak_rss_bytes: u64,
}

/// What a fleet run measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FleetReport {
    /// Experiment name.
    pub name: String,
    /// The initial model's origin.
    pub model: String,
    /// Devices and their roles.
    pub devices: Vec<DeviceData>,
    /// Held-out tokens scored per version.
    pub eval_tokens: usize,
    /// Every version.
    pub versions: Vec<VersionRow>,
    /// Every round.
    pub rounds: Vec<RoundRow>,
    /// Relative change of held-out perplexity from the first to the last version.
    pub perplexity_change: f64,
    /// Held-out perplexity of the centrally trained adapter, and its optimizer steps.
    pub central: Option<(f64, usize)>,
    /// The adapted model's answer to `chat-prompt`.
    pub chat: Option<String>,
    /// Seconds the whole run took.
    pub wall_seconds: f64,
}

/// Score every version the coordinator published and gather the agents' figures. Runs
/// after the coordinator process stopped (it opens the same state).
pub async fn evaluate(
    exp: &FleetExperiment,
    config: CoordinatorConfig,
    devices: Vec<DeviceData>,
    held_out: &Path,
    agent_states: &[PathBuf],
) -> Result<FleetReport> {
    let model = LoadedModel::open(&exp.model).map_err(covey_model::ModelError::from)?;
    let text = std::fs::read_to_string(held_out).map_err(|e| SimError::io(held_out, e))?;
    let mut ids = model.tokenizer.encode(&text).map_err(covey_model::ModelError::from)?;
    ids.truncate(exp.eval_tokens);
    let engine = covey_coordinator::server::open_engine(config).await?;
    let store = engine.store().clone();
    let mut records = store.versions().await?;
    records.sort_by_key(|v| v.version);
    let mut versions = Vec::new();
    let mut held: std::collections::HashSet<String> = std::collections::HashSet::new();
    for v in &records {
        let (weights, manifest) = engine.device_weights(v.version).await?;
        let stored = weights.into_iter().map(|(n, t)| (n, StoredTensor::F32(t))).collect();
        let infer = covey_infer::Model::from_stored(model.config.clone(), stored, Precision::F32)
            .map_err(covey_model::ModelError::from)?;
        let (nll, _) = infer.nll(&ids, exp.eval_window).map_err(covey_model::ModelError::from)?;
        let download_bytes =
            manifest.artifacts().into_iter().filter(|a| held.insert(a.sha256.clone())).map(|a| a.size).sum();
        tracing::info!(version = v.version, perplexity = nll.exp(), "scored");
        versions.push(VersionRow {
            version: v.version,
            release: manifest.release.version,
            adapter_rounds: manifest.adapter.as_ref().map_or(0, |a| a.rounds),
            perplexity: nll.exp(),
            epsilon: manifest.privacy.epsilon,
            download_bytes,
        });
    }
    let histories: Vec<Vec<HistoryEntry>> = agent_states.iter().map(|s| covey_agent::run::read_history(s)).collect();
    let mut rounds = Vec::new();
    for r in store.rounds(u32::MAX as usize).await?.into_iter().rev() {
        if r.published_version == 0 {
            continue;
        }
        let entries: Vec<&HistoryEntry> = histories.iter().flatten().filter(|h| h.round_id == r.id).collect();
        let n = entries.len().max(1) as f64;
        let published = records.iter().find(|v| v.version == r.published_version);
        let signed_ms = published.map_or(r.opened_ms, |v| v.created_ms);
        rounds.push(RoundRow {
            round: r.id,
            base_version: r.base_version,
            published_version: r.published_version,
            wall_seconds: signed_ms.saturating_sub(r.opened_ms) as f64 / 1000.0,
            bytes_up_per_device: entries.iter().map(|h| h.payload_bytes as f64).sum::<f64>() / n,
            bytes_down_per_device: entries.iter().map(|h| h.downloaded_bytes as f64).sum::<f64>() / n,
            max_bytes_down: entries.iter().map(|h| h.downloaded_bytes).max().unwrap_or(0),
            train_seconds: entries.iter().map(|h| h.train_seconds).sum::<f64>() / n,
            peak_rss_bytes: entries.iter().filter_map(|h| h.peak_rss_bytes).max().unwrap_or(0),
        });
    }
    let first = versions.first().map_or(f64::NAN, |v| v.perplexity);
    let last = versions.last().map_or(f64::NAN, |v| v.perplexity);
    Ok(FleetReport {
        name: exp.name.clone(),
        model: model.description.clone(),
        devices,
        eval_tokens: ids.len(),
        versions,
        rounds,
        perplexity_change: last / first - 1.0,
        central: None,
        chat: None,
        wall_seconds: 0.0,
    })
}

/// The central baseline ([`FleetExperiment::central_baseline`]): returns the held-out
/// perplexity of the adapter and its steps. Runs after the fleet (it opens the
/// coordinator's state for version 1's weights and `A`).
pub async fn central_baseline(
    exp: &FleetExperiment,
    config: CoordinatorConfig,
    devices: &[DeviceData],
    held_out: &Path,
) -> Result<(f64, usize)> {
    let model = LoadedModel::open(&exp.model).map_err(covey_model::ModelError::from)?;
    let engine = covey_coordinator::server::open_engine(config.clone()).await?;
    let (base, manifest) = engine.device_weights(1).await?;
    let a =
        covey_tensors::decode(&engine.artifacts().get(
            &manifest.lora.a.sha256_bytes().map_err(|e| SimError::Data(format!("manifest of version 1: {e}")))?,
        )?)?
        .0;
    let mut corpus = Vec::new();
    for d in devices {
        let file = d.dir.join("train.txt");
        corpus.push(std::fs::read_to_string(&file).map_err(|e| SimError::io(&file, e))?);
    }
    let t = &config.training;
    let steps = exp.rounds as usize * devices.len() * t.steps as usize;
    let spec = covey_model::LocalTrainSpec {
        lora: covey_model::LoraConfig {
            rank: config.lora.rank,
            alpha: f64::from(config.lora.alpha),
            dropout: 0.0,
            targets: config.lora.lora_targets(),
            ffa: true,
            seed: 0,
        },
        train: covey_model::TrainConfig {
            steps,
            batch_size: t.batch_size as usize,
            seq_len: t.seq_len as usize,
            grad_accum: 1,
            lr: f64::from(t.learning_rate),
            warmup_steps: steps / 10,
            seed: t.seed,
            // The fleet's processes are done: the baseline may use the whole machine.
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()).max(exp.agent.train_threads),
            ..covey_model::TrainConfig::default()
        },
        proximal_mu: 0.0,
        checkpoint_every: 0,
        example_dp: None,
    };
    let round = covey_model::LocalRound {
        config: &model.config,
        base: covey_model::RoundBase::Tensors(std::borrow::Cow::Borrowed(&base)),
        adapter: None,
        a: &a,
        tokenizer: &model.tokenizer,
        corpus: &corpus,
        chats: &[],
        chat_format: None,
    };
    let device = covey_model::cpu_device();
    let result = tokio::task::block_in_place(|| covey_model::train_local_adapter(round, &spec, &device, None, |_| {}))?;
    let mut merged = base;
    let mut factors = a;
    factors.extend(result.b);
    covey_tensors::lora::merge(&mut merged, &factors, config.lora.alpha / config.lora.rank as f32)?;
    let text = std::fs::read_to_string(held_out).map_err(|e| SimError::io(held_out, e))?;
    let mut ids = model.tokenizer.encode(&text).map_err(covey_model::ModelError::from)?;
    ids.truncate(exp.eval_tokens);
    let stored = merged.into_iter().map(|(n, t)| (n, StoredTensor::F32(t))).collect();
    let infer = covey_infer::Model::from_stored(model.config.clone(), stored, Precision::F32)
        .map_err(covey_model::ModelError::from)?;
    let (nll, _) = infer.nll(&ids, exp.eval_window).map_err(covey_model::ModelError::from)?;
    Ok((nll.exp(), steps))
}

fn mb(b: f64) -> String {
    format!("{:.2} MB", b / 1e6)
}

impl FleetReport {
    /// The report as Markdown tables.
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "# {}\n\nModel: {}; {} devices ({}); {} held-out tokens; {:.0} s in all.\n\n",
            self.name,
            self.model,
            self.devices.len(),
            self.devices.iter().map(|d| d.role.as_str()).collect::<Vec<_>>().join(", "),
            self.eval_tokens,
            self.wall_seconds
        );
        s.push_str("| version | release | adapter rounds | held-out perplexity | ε | download for a device |\n");
        s.push_str("|---|---|---|---|---|---|\n");
        for v in &self.versions {
            s.push_str(&format!(
                "| {} | {} | {} | {:.3} | {:.3} | {} |\n",
                v.version,
                v.release,
                v.adapter_rounds,
                v.perplexity,
                v.epsilon,
                mb(v.download_bytes as f64)
            ));
        }
        s.push_str(&format!(
            "\nHeld-out perplexity {:+.2} % from version 1 to the last.\n",
            100.0 * self.perplexity_change
        ));
        if let Some((ppl, steps)) = self.central {
            let first = self.versions.first().map_or(f64::NAN, |v| v.perplexity);
            s.push_str(&format!(
                "Central baseline (the pooled text, {steps} steps, same batch, learning rate and A): held-out \
                 perplexity {ppl:.3} ({:+.2} %).\n",
                100.0 * (ppl / first - 1.0)
            ));
        }
        s.push('\n');
        s.push_str("| round | on version | published | wall s | up / device | down / device (max) | train s | agent peak RSS |\n");
        s.push_str("|---|---|---|---|---|---|---|---|\n");
        for r in &self.rounds {
            s.push_str(&format!(
                "| {} | {} | {} | {:.1} | {} | {} ({}) | {:.1} | {} |\n",
                r.round,
                r.base_version,
                r.published_version,
                r.wall_seconds,
                mb(r.bytes_up_per_device),
                mb(r.bytes_down_per_device),
                mb(r.max_bytes_down as f64),
                r.train_seconds,
                mb(r.peak_rss_bytes as f64)
            ));
        }
        if let Some(c) = &self.chat {
            s.push_str(&format!("\n`covey-agent chat` (last version): {c}\n"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_the_largest_roles_and_every_tenth_speech_is_held_out() {
        let work = tempfile::tempdir().expect("tmp");
        let exp = FleetExperiment {
            data_dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/shakespeare"),
            plays: vec!["macbeth_gut.txt".into()],
            devices: 3,
            ..FleetExperiment::default()
        };
        let (devices, held_out) = prepare_data(&exp, work.path()).expect("data");
        assert_eq!(devices.len(), 3);
        assert!(devices[0].role.starts_with("macbeth_gut.txt:"));
        assert!(devices.iter().all(|d| d.train_bytes > 5 * d.held_out_bytes && d.held_out_bytes > 0));
        let text = std::fs::read_to_string(held_out).expect("held out");
        assert_eq!(text.len(), devices.iter().map(|d| d.held_out_bytes).sum::<usize>());
        let too_many = FleetExperiment { devices: 500, ..exp };
        assert!(prepare_data(&too_many, work.path()).is_err());
    }

    #[test]
    fn the_shipped_fleet_experiments_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/fleet");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("experiments/fleet/") {
            let path = entry.expect("entry").path();
            let exp = FleetExperiment::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let c = exp.coordinator_config(Path::new("/tmp/x"), 7070, "token-123456").expect("valid");
            assert_eq!((c.rounds.min_updates, c.rounds.max_rounds), (exp.devices, exp.rounds));
            n += 1;
        }
        assert_eq!(n, 2);
    }
}
