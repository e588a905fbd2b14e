//! `covey-sim quickstart`: the project's first command. Federated LoRA fine-tuning of the
//! pretrained byte-level model the repository ships (`models/shakespeare-byte`, made by
//! `covey-model pretrain`) on speaking roles of the four plays it never saw, with
//! central differential privacy, through a real coordinator and real agents over
//! loopback gRPC. It publishes int8 versions, and reports before and after.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::Experiment;
use crate::error::{Result, SimError};
use crate::loopback;
use crate::output::{self, ReportFiles};
use crate::prepare;
use crate::report::Report;

/// The quickstart experiment, embedded in the binary (the file in the repository is the
/// documentation of every setting).
pub const QUICKSTART_TOML: &str = include_str!("../experiments/quickstart.toml");

/// What the quickstart produced.
#[derive(Debug)]
pub struct Quickstart {
    /// The run's report (also written to `files`).
    pub report: Report,
    /// The files written.
    pub files: ReportFiles,
    /// Text the final model generated on a device (the first agent's local inference on
    /// its verified int8 model), after the experiment's sample prompt.
    pub sample: String,
    /// The prompt.
    pub prompt: String,
}

/// The embedded quickstart experiment.
pub fn experiment() -> Result<Experiment> {
    Ok(Experiment::from_toml(QUICKSTART_TOML, Path::new("quickstart.toml (embedded)"))?)
}

/// Run the quickstart, writing the report folder to `out`.
pub async fn run(out: &Path, progress: &dyn crate::progress::Progress) -> Result<Quickstart> {
    let mut exp = experiment()?;
    exp.report.dir = Some(out.to_owned());
    let base = exp.model.base.clone().unwrap_or_else(|| PathBuf::from("models/shakespeare-byte"));
    if !base.join("model.safetensors").is_file() {
        return Err(SimError::Data(format!(
            "the base model {} is missing: run from the repository root (it ships there), or make one with \
             `cargo run --release -p covey-model-cli -- pretrain --out {}`",
            base.display(),
            base.display()
        )));
    }
    let prepared = Arc::new(tokio::task::spawn_blocking(move || prepare::prepare(&exp)).await.map_err(join)??);
    for note in &prepared.notes {
        println!("  {note}");
    }
    let work = tempfile::tempdir().map_err(|e| SimError::io(Path::new("temporary directory"), e))?;
    let outcome = loopback::run(prepared.clone(), work.path(), progress).await?;
    let prompt = prepared.experiment.report.sample_prompt.clone();
    let sampling = covey_model::SamplingConfig {
        max_new_tokens: prepared.experiment.report.sample_bytes,
        temperature: 0.7,
        top_k: Some(40),
        seed: 0,
        ..covey_model::SamplingConfig::default()
    };
    let state = outcome.agent_state.clone();
    let p = prompt.clone();
    let generated = tokio::task::spawn_blocking(move || covey_agent::generate(&state, &p, &sampling, None))
        .await
        .map_err(join)??;
    let mut report = outcome.report;
    report.notes.push(format!(
        "sample from agent 0's verified model version {}: {}{}",
        generated.version, prompt, generated.text
    ));
    let files = output::write_report(out, &report)?;
    Ok(Quickstart { report, files, sample: generated.text, prompt })
}

fn join(e: tokio::task::JoinError) -> SimError {
    SimError::Data(format!("a worker thread failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_quickstart_is_valid_and_federated_over_grpc_with_dp() {
        let e = experiment().expect("quickstart.toml");
        assert_eq!(e.mode, crate::config::Mode::LoopbackGrpc);
        assert!(e.privacy.central.is_some(), "the quickstart runs with differential privacy");
        assert!(!e.rounds.centralised);
        assert!(!e.report.sample_prompt.is_empty());
    }
}
