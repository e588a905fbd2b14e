//! The experiment file of `covey-sim fleet`: a real fleet on one machine, a
//! `covey-coordinator` process and one `covey-agent` process per device over loopback
//! gRPC. Preparing the devices' data, running the processes and the report are
//! `covey_sim::fleet`'s and `cli/sim`'s.

use std::path::{Path, PathBuf};

use covey_coordinator::CoordinatorConfig;
use covey_settings::AgentConfig;
use serde::{Deserialize, Serialize};

use crate::error::{ExperimentError, Result};

/// A fleet experiment (TOML).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct FleetExperiment {
    /// Name; the report goes to `runs/fleet/{name}`.
    pub name: String,
    /// The initial model: a `.gguf` file or a model directory.
    pub model: PathBuf,
    /// The Shakespeare directory (one `.txt` per play).
    pub data_dir: PathBuf,
    /// Plays whose largest roles are the devices (one role per device, taken in turn
    /// from each play, largest first). Every tenth speech of a role is held out.
    pub plays: Vec<String>,
    /// Devices (agent processes).
    pub devices: usize,
    /// Rounds; every device takes part in each.
    pub rounds: u64,
    /// Tokens of held-out text scored per version (from its start).
    pub eval_tokens: usize,
    /// Scoring window (each starts with an empty cache).
    pub eval_window: usize,
    /// What the report asks the adapted model with `covey-agent chat`.
    pub chat_prompt: String,
    /// Also train one adapter centrally, for comparison: the pooled training text of
    /// every device, as many optimizer steps as the devices took in all (rounds ×
    /// devices × local steps), the same batch, sequence length, learning rate and frozen
    /// `A`, on version 1's weights. Default true.
    pub central_baseline: bool,
    /// The coordinator's configuration; the harness sets its listener, state directory,
    /// initial model, enrolment token and the round sizes from `devices` and `rounds`.
    pub coordinator: CoordinatorConfig,
    /// Every agent's configuration (threads, rank cap, ...); the harness sets the state
    /// and data directories and the coordinator's URL.
    pub agent: AgentConfig,
}

impl Default for FleetExperiment {
    fn default() -> Self {
        Self {
            name: "fleet".into(),
            model: PathBuf::from("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            data_dir: PathBuf::from("data/shakespeare"),
            plays: vec!["hamlet_gut.txt".into()],
            devices: 4,
            rounds: 3,
            eval_tokens: 4096,
            eval_window: 256,
            chat_prompt: "Who is Hamlet?".into(),
            central_baseline: true,
            coordinator: CoordinatorConfig::default(),
            agent: AgentConfig::default(),
        }
    }
}

impl FleetExperiment {
    /// Read an experiment file; relative paths are taken from the current directory.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ExperimentError::Io { path: path.to_owned(), source: e })?;
        Self::from_toml(&text, path)
    }

    /// Parse and validate a fleet experiment from TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self> {
        let exp: Self = toml::from_str(text)
            .map_err(|e| ExperimentError::File { path: origin.to_owned(), reason: e.to_string() })?;
        exp.validate()?;
        Ok(exp)
    }

    /// Check what the harness relies on.
    pub fn validate(&self) -> Result<()> {
        if self.devices == 0 || self.rounds == 0 {
            return Err(ExperimentError::invalid("devices", "devices and rounds must be at least 1"));
        }
        if self.plays.is_empty() {
            return Err(ExperimentError::invalid("plays", "name at least one play"));
        }
        if self.eval_window < 2 || self.eval_tokens < self.eval_window {
            return Err(ExperimentError::invalid("eval-window", "at least 2, and no more than eval-tokens"));
        }
        // The agents' section fails here, not when the agents start.
        self.agent.validate().map_err(|e| ExperimentError::invalid("agent", e.to_string()))?;
        Ok(())
    }

    /// The coordinator's configuration for this run.
    pub fn coordinator_config(&self, work: &Path, port: u16, token: &str) -> Result<CoordinatorConfig> {
        let mut c = self.coordinator.clone();
        c.listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        c.metrics_listen = None;
        c.state_dir = absolute(&work.join("coordinator"))?;
        c.initial_model = Some(absolute(&self.model)?);
        c.enrollment.tokens = vec![token.into()];
        c.rounds.target_updates = self.devices;
        c.rounds.min_updates = self.devices;
        c.rounds.min_available = self.devices;
        c.rounds.over_selection = 0.0;
        c.rounds.max_rounds = self.rounds;
        c.validate()?;
        Ok(c)
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).map_err(|e| ExperimentError::Io { path: p.to_owned(), source: e })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_fleet_files_parse_and_a_bad_agent_section_is_refused_at_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../simulations/experiments/fleet");
        for name in ["smollm2.toml", "smollm2-dp.toml"] {
            let path = dir.join(name);
            FleetExperiment::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
        let err = FleetExperiment::from_toml("[agent]\ntrain-threads = 0\n", Path::new("bad.toml"))
            .expect_err("zero threads")
            .to_string();
        assert!(err.contains("agent") && err.contains("train-threads"), "{err}");
        let err =
            FleetExperiment::from_toml("devices = 0\n", Path::new("bad.toml")).expect_err("no devices").to_string();
        assert!(err.contains("devices"), "{err}");
    }
}
