//! The experiment file: model, data and partitioner, LoRA, local training,
//! rounds and cohort, strategy, privacy, seed.
//!
//! The `lora`, `training`, `privacy` and `strategy` sections are the coordinator's own
//! (`covey-coordinator`'s configuration types, same keys), so an experiment that works
//! in simulation is a coordinator configuration away from a real fleet.
//! `simulations/experiments/` holds examples; every key is optional and defaults are
//! listed in [`Experiment::default`]. Relative paths are resolved against the current
//! directory (run from the repository root).

use std::path::{Path, PathBuf};

use covey_coordinator::config::{LoraSection, PrivacySection, TrainingSection};
use covey_infer::LlamaConfig;
use covey_strategy::StrategyConfig;
use serde::{Deserialize, Serialize};

use crate::attack::AttackConfig;
use crate::data::{LeafOptions, Partitioner};
use crate::error::{ExperimentError, Result};

/// How the clients talk to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Virtual clients in this process, trained in parallel, aggregated by the
    /// coordinator's strategy code directly.
    #[default]
    InProcess,
    /// A real `covey-coordinator` and one real `covey-agent` per client over loopback gRPC.
    LoopbackGrpc,
}

impl Mode {
    /// The name written in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::InProcess => "in-process",
            Self::LoopbackGrpc => "loopback-grpc",
        }
    }
}

/// Where the clients' data comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// Gutenberg plays split by play and speaking role (LEAF Shakespeare).
    #[default]
    LeafShakespeare,
    /// One subdirectory of text files per client.
    ClientDirs,
    /// One JSONL file of `{"client": ..., "text": ...}` records.
    Jsonl,
}

/// The base model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ModelSection {
    /// A model directory (`config.json`, `model.safetensors` in f32, int8 or int4, and a
    /// `tokenizer.json` when the model is not byte-level), e.g. from `covey-model
    /// pretrain`, `import`, `distill` or `quantize`, or a GGUF file (SmolLM2: see
    /// `scripts/fetch-smollm2.sh`). When absent, a model of `preset` shape is initialised
    /// at random from `init-seed`. The repository ships a pretrained byte-level model,
    /// `models/shakespeare-byte`. Default: none.
    pub base: Option<PathBuf>,
    /// Shape of a randomly initialised model when `base` is absent: `tiny` (hidden 32,
    /// 2 layers) or `small` (hidden 64, 2 layers). Default `tiny`.
    pub preset: String,
    /// Seed of the random initialisation. Default 0.
    pub init_seed: u64,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self { base: None, preset: "tiny".into(), init_seed: 0 }
    }
}

impl ModelSection {
    /// The shape of `preset`.
    pub fn preset_config(&self) -> Result<LlamaConfig> {
        match self.preset.as_str() {
            "tiny" => Ok(LlamaConfig::tiny()),
            "small" => Ok(LlamaConfig {
                hidden_size: 64,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                intermediate_size: 128,
                vocab_size: 256,
                max_position_embeddings: 256,
                ..LlamaConfig::default()
            }),
            other => {
                Err(ExperimentError::invalid("model.preset", format!("unknown preset `{other}` (known: tiny, small)")))
            }
        }
    }
}

/// The clients' data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct DataSection {
    /// Kind of source. Default `leaf-shakespeare`.
    pub source: Source,
    /// The plays' directory, the clients' directory, or the JSONL file. Default
    /// `data/shakespeare` (ships with the repository).
    pub path: PathBuf,
    /// LEAF options (plays, minimum speeches, train fraction, client cap).
    pub leaf: LeafOptions,
    /// Fraction of each client's texts used for training (client directories and JSONL
    /// records without a split). Default 0.8.
    pub train_fraction: f64,
    /// How the pooled texts are spread over clients. Default `natural` (the dataset's own
    /// clients).
    pub partitioner: Partitioner,
    /// Held-out evaluation: the clients' test texts, taken client by client (in id order,
    /// from clients spread evenly over the population) until this many bytes. Default
    /// 60,000.
    pub eval_bytes: usize,
    /// Sequence length of evaluation windows. Default: `training.seq-len`.
    pub eval_seq_len: Option<usize>,
    /// Score only the test texts of clients whose id starts with one of these (e.g.
    /// `"hamlet/"`: plays a pretrained base never saw). Empty: every client. Default
    /// empty.
    pub eval_client_prefixes: Vec<String>,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            source: Source::LeafShakespeare,
            path: PathBuf::from("data/shakespeare"),
            leaf: LeafOptions::default(),
            train_fraction: 0.8,
            partitioner: Partitioner::default(),
            eval_bytes: 60_000,
            eval_seq_len: None,
            eval_client_prefixes: Vec::new(),
        }
    }
}

/// Rounds and cohorts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RoundsSection {
    /// Rounds to run. Default 10.
    pub rounds: u64,
    /// Expected clients per round: each client joins a round independently with
    /// probability clients-per-round / population (Poisson sampling, as the coordinator
    /// samples and the accountant assumes). Default 10.
    pub clients_per_round: usize,
    /// Clients trained at once (in-process mode); each uses `training-threads` threads.
    /// Memory grows with this, not with the population. Default 2.
    pub parallel: usize,
    /// Threads of one client's training. Default 1.
    pub training_threads: usize,
    /// Centralised baseline: pool every client's training text into one client that
    /// trains `clients-per-round × training.steps` steps per round (the same compute as
    /// the federated round). Default false.
    pub centralised: bool,
    /// Example-level DP-SGD in every client's local training
    /// (`example-dp = { clip = 1.0, noise-multiplier = 1.0 }`), as the agent's option of
    /// the same name. Default none.
    pub example_dp: Option<covey_settings::ExampleDp>,
}

impl Default for RoundsSection {
    fn default() -> Self {
        Self {
            rounds: 10,
            clients_per_round: 10,
            parallel: 2,
            training_threads: 1,
            centralised: false,
            example_dp: None,
        }
    }
}

/// Calibration of the noise to a privacy target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct CalibrateSection {
    /// Target ε at `privacy.delta` over the whole run. When set, the noise multiplier of
    /// `privacy.central` (or, without it, `privacy.local-noise-multiplier`) is chosen so
    /// that `rounds` rounds at sampling rate `clients-per-round / population` spend it.
    pub target_epsilon: Option<f64>,
}

/// Where the report goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ReportSection {
    /// Report directory. Default `runs/sim/{name}`.
    pub dir: Option<PathBuf>,
    /// Also generate a sample from the final model with this prompt (empty: none).
    pub sample_prompt: String,
    /// Bytes of the sample. Default 200.
    pub sample_bytes: usize,
}

impl Default for ReportSection {
    fn default() -> Self {
        Self { dir: None, sample_prompt: String::new(), sample_bytes: 200 }
    }
}

/// One experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Experiment {
    /// Name of the run (reports, plots). Default `experiment`.
    pub name: String,
    /// Seed of everything random: cohorts, batches, noise, partitions. Default 0.
    pub seed: u64,
    /// In-process virtual clients or real agents over loopback gRPC. Default in-process.
    pub mode: Mode,
    /// The base model.
    pub model: ModelSection,
    /// The data.
    pub data: DataSection,
    /// FFA-LoRA layout (the coordinator's `[lora]`).
    pub lora: LoraSection,
    /// Local training of each client per round (the coordinator's `[training]`).
    pub training: TrainingSection,
    /// Rounds and cohorts.
    pub rounds: RoundsSection,
    /// Clipping, local and central noise, δ (the coordinator's `[privacy]`;
    /// `population` is ignored: it is the number of clients).
    pub privacy: PrivacySection,
    /// Noise calibration to a target ε.
    pub calibrate: CalibrateSection,
    /// Aggregation (the coordinator's `[strategy]`).
    pub strategy: StrategyConfig,
    /// Output.
    pub report: ReportSection,
    /// Personalisation: every evaluated device fits its own adapter on its training
    /// text, stacked on the final global model, and is scored on its held-out text with
    /// the base, the global and the personal model. Default none.
    pub personalisation: Option<covey_settings::PersonalConfig>,
    /// Byzantine clients: a fraction of the clients send hostile updates
    /// ([`crate::attack`]; what they do is `covey_sim::attack`'s). Default none.
    pub attack: Option<AttackConfig>,
}

impl Default for Experiment {
    fn default() -> Self {
        Self {
            name: "experiment".into(),
            seed: 0,
            mode: Mode::InProcess,
            model: ModelSection::default(),
            data: DataSection::default(),
            lora: LoraSection {
                rank: 4,
                device_ranks: Vec::new(),
                alpha: 8.0,
                targets: vec!["q_proj".into(), "v_proj".into()],
                seed: 0,
            },
            training: TrainingSection {
                steps: 10,
                batch_size: 8,
                seq_len: 64,
                learning_rate: 1e-2,
                ..Default::default()
            },
            rounds: RoundsSection::default(),
            privacy: PrivacySection::default(),
            calibrate: CalibrateSection::default(),
            strategy: StrategyConfig::default(),
            report: ReportSection::default(),
            personalisation: None,
            attack: None,
        }
    }
}

impl Experiment {
    /// Parse an experiment from TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self> {
        let exp: Self = toml::from_str(text)
            .map_err(|e| ExperimentError::File { path: origin.to_owned(), reason: e.to_string() })?;
        exp.validate()?;
        Ok(exp)
    }

    /// Read and validate an experiment file.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ExperimentError::Io { path: path.to_owned(), source: e })?;
        Self::from_toml(&text, path)
    }

    /// The report directory.
    pub fn report_dir(&self) -> PathBuf {
        self.report.dir.clone().unwrap_or_else(|| PathBuf::from("runs/sim").join(&self.name))
    }

    /// The evaluation sequence length.
    pub fn eval_seq_len(&self) -> usize {
        self.data.eval_seq_len.unwrap_or(self.training.seq_len as usize)
    }

    /// Check every value that does not need the data.
    pub fn validate(&self) -> Result<()> {
        if let Some(a) = &self.attack {
            a.validate()?;
            if self.mode != Mode::InProcess {
                return Err(ExperimentError::invalid(
                    "attack",
                    "Byzantine clients run in process only (mode = \"in-process\")",
                ));
            }
        }
        if self.name.is_empty() || self.name.contains(['/', '\\']) {
            return Err(ExperimentError::invalid("name", format!("`{}` must be a non-empty file name", self.name)));
        }
        self.model.preset_config()?;
        let r = &self.rounds;
        if r.rounds == 0 {
            return Err(ExperimentError::invalid("rounds.rounds", "must be at least 1"));
        }
        if r.clients_per_round == 0 {
            return Err(ExperimentError::invalid("rounds.clients-per-round", "must be at least 1"));
        }
        if r.parallel == 0 || r.training_threads == 0 {
            return Err(ExperimentError::invalid(
                "rounds.parallel",
                "parallel and training-threads must be at least 1",
            ));
        }
        if let Some(dp) = &r.example_dp
            && let Err(e) = dp.validate()
        {
            return Err(ExperimentError::invalid("rounds.example-dp", e.to_string()));
        }
        if !(self.data.train_fraction > 0.0 && self.data.train_fraction < 1.0) {
            return Err(ExperimentError::invalid(
                "data.train-fraction",
                format!("{} is not in (0, 1)", self.data.train_fraction),
            ));
        }
        if let Some(p) = &self.personalisation {
            p.validate().map_err(|e| ExperimentError::invalid("personalisation", e.to_string()))?;
            if self.mode != Mode::InProcess {
                return Err(ExperimentError::invalid("personalisation", "runs in the in-process mode only"));
            }
        }
        if self.data.eval_bytes < 256 {
            return Err(ExperimentError::invalid("data.eval-bytes", "must be at least 256"));
        }
        if let Some(e) = self.calibrate.target_epsilon
            && !(e.is_finite() && e > 0.0)
        {
            return Err(ExperimentError::invalid("calibrate.target-epsilon", format!("{e} is not a positive number")));
        }
        if self.calibrate.target_epsilon.is_some() && self.privacy.central.is_none() && self.privacy.clip_norm == 0.0 {
            return Err(ExperimentError::invalid(
                "calibrate.target-epsilon",
                "needs [privacy.central] or a privacy.clip-norm for local noise",
            ));
        }
        // The coordinator's own checks of the sections it shares with experiments.
        let mut coordinator = covey_coordinator::CoordinatorConfig {
            lora: self.lora.clone(),
            training: self.training.clone(),
            privacy: self.privacy.clone(),
            strategy: self.strategy.clone(),
            ..covey_coordinator::CoordinatorConfig::default()
        };
        coordinator.enrollment.tokens = vec!["simulation".into()];
        coordinator.rounds.target_updates = r.clients_per_round;
        coordinator.rounds.min_updates = 1;
        coordinator.rounds.min_available = 1;
        coordinator.rounds.max_rounds = r.rounds;
        coordinator.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_is_the_default_experiment() {
        let e = Experiment::from_toml("", Path::new("empty.toml")).expect("defaults are valid");
        assert_eq!(e, Experiment::default());
    }

    #[test]
    fn the_shipped_experiments_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../simulations/experiments");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("experiments/") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                Experiment::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 3, "only {n} experiment files");
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            ("[rounds]\nrounds = 0\n", "rounds.rounds"),
            ("[rounds]\nclients-per-round = 0\n", "clients-per-round"),
            ("[model]\npreset = \"huge\"\n", "model.preset"),
            ("[lora]\ntargets = [\"x_proj\"]\n", "lora.targets"),
            ("[calibrate]\ntarget-epsilon = -1.0\n", "calibrate.target-epsilon"),
            ("[data]\ntrain-fraction = 1.5\n", "data.train-fraction"),
            ("colour = \"red\"\n", "unknown field"),
            ("[strategy]\nkind = \"fed-nothing\"\n", "fed-nothing"),
            ("[rounds]\nexample-dp = { clip = -1.0, noise-multiplier = 1.0 }\n", "rounds.example-dp"),
        ];
        for (text, needle) in cases {
            let err = Experiment::from_toml(text, Path::new("bad.toml")).expect_err(text).to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }
}
