//! `covey-sim audit`: an empirical privacy audit of an experiment with one training run
//! (Steinke, Nasr and Jagielski 2023; statistics in [`covey_privacy::audit`]).
//!
//! `canaries` extra clients are made; each joins the population with probability ½ (from
//! the experiment's seed). The federation runs in process with the experiment's
//! mechanism; every version is released to devices, so the auditor sees each round's
//! step and scores each canary by its strongest trace in one round, then guesses "in"
//! for the highest scores. The report puts the audited lower bound on ε beside the ε the
//! accountant claims. With the noise off (`--no-noise`) the audit must find the leak;
//! with the noise on, a lower bound above the claimed ε would mean the implementation
//! leaks more than it accounts for.
//!
//! Two kinds of canary:
//! * `update` (the default; Andrew et al. 2024, "One-shot empirical privacy estimation
//!   for federated learning"): the canary device's update is a random direction at the
//!   clip norm, the worst case a DP guarantee must cover (a device's data decides its
//!   update); its score is the largest projection of one round's released step on that
//!   direction.
//! * `sequence`: the canary device holds one random string, repeated as its training
//!   text (a user who typed a secret often), and trains like any device; its score is
//!   its largest one-round loss drop above that round's median over all canaries. A
//!   weak attack on small adapters: it shows what typed secrets leak, not the worst case.

use std::path::Path;

use covey_privacy::SecureRng;
use serde::{Deserialize, Serialize};

use crate::dataset::ClientData;
use crate::error::{Result, SimError};
use crate::prepare::{Prepared, seed_bytes};
use crate::progress::Progress;
use crate::runner::InProcess;

/// The kind of canary (see the [module documentation](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CanaryKind {
    /// A random update direction at the clip norm.
    #[default]
    Update,
    /// A random string the device trains on.
    Sequence,
}

/// What to audit with.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AuditConfig {
    /// The kind of canary.
    pub kind: CanaryKind,
    /// Canary clients made (each included with probability ½).
    pub canaries: usize,
    /// Bytes of each canary string.
    pub canary_bytes: usize,
    /// Confidence of the lower bound.
    pub confidence: f64,
    /// Train without any noise (central and local removed): the audit must find the leak.
    pub no_noise: bool,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self { kind: CanaryKind::Update, canaries: 200, canary_bytes: 32, confidence: 0.95, no_noise: false }
    }
}

/// The audit's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditReport {
    /// Experiment audited.
    pub experiment: String,
    /// Mechanism (`dp-fedavg`, `dp-ftrl`, `local-gaussian`, `none`).
    pub mechanism: String,
    /// The kind of canary.
    pub kind: CanaryKind,
    /// ε the accountant reports for the run (∞ without noise).
    pub claimed_epsilon: f64,
    /// Its δ.
    pub delta: f64,
    /// The empirical lower bound on ε.
    pub audited_lower_bound: f64,
    /// Confidence of the bound.
    pub confidence: f64,
    /// Canaries planted and how many were included.
    pub canaries: usize,
    /// Canaries included.
    pub included: usize,
    /// Guesses ("in") of the best choice and how many were right.
    pub guesses: u64,
    /// Correct guesses.
    pub correct: u64,
    /// Rounds run.
    pub rounds: u64,
    /// Mean score of the included canaries (update canaries: largest one-round
    /// projection; sequence canaries: largest one-round loss drop above the median, nats
    /// per token).
    pub mean_score_included: f64,
    /// Mean score of the excluded canaries.
    pub mean_score_excluded: f64,
}

/// The guess counts the auditor may use, fixed before any score is seen.
fn guess_counts(canaries: usize) -> Vec<usize> {
    [canaries / 16, canaries / 8, canaries / 4].into_iter().filter(|&k| k > 0).collect()
}

/// A random lowercase string (letters and spaces) of `len` bytes.
fn canary_text(rng: &mut SecureRng, len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz ";
    (0..len).map(|_| ALPHABET[(rng.uniform() * ALPHABET.len() as f64) as usize % ALPHABET.len()] as char).collect()
}

/// Plant the canaries into `prepared` (the included ones become clients) and run it.
pub fn run(prepared: &mut Prepared, cfg: &AuditConfig, progress: &dyn Progress) -> Result<AuditReport> {
    if cfg.canaries < 16 {
        return Err(SimError::config("--canaries", "at least 16 canaries are needed to guess anything"));
    }
    if cfg.kind == CanaryKind::Sequence && cfg.canary_bytes < 8 {
        return Err(SimError::config("--canary-bytes", "at least 8 bytes"));
    }
    if !(cfg.confidence > 0.0 && cfg.confidence < 1.0) {
        return Err(SimError::config("--confidence", "must be in (0, 1)"));
    }
    let exp = &prepared.experiment;
    let mut rng = SecureRng::from_seed(seed_bytes(exp.seed, "audit-canaries", 0));
    let seq_len = exp.training.seq_len as usize;
    let clip = exp.privacy.central.as_ref().map_or(exp.privacy.clip_norm, |c| match c.clip {
        covey_strategy::ClipConfig::Fixed { norm } => norm,
        covey_strategy::ClipConfig::Adaptive { initial, .. } => initial,
    });
    let shapes = covey_coordinator::weights::expected_b_shapes(&prepared.master, &exp.lora);
    // Per canary: its id, its text or direction, and whether it was included.
    let mut canaries: Vec<(String, Canary, bool)> = Vec::with_capacity(cfg.canaries);
    for i in 0..cfg.canaries {
        let id = format!("~canary/{i:05}");
        let canary = match cfg.kind {
            CanaryKind::Sequence => Canary::Text(canary_text(&mut rng, cfg.canary_bytes)),
            CanaryKind::Update => Canary::Direction(random_direction(&shapes, clip, &mut rng)?),
        };
        let included = rng.uniform() < 0.5;
        if included {
            let train = match &canary {
                // The canary, repeated to fill several training windows.
                Canary::Text(t) => t.repeat((4 * seq_len).div_ceil(cfg.canary_bytes).max(2)),
                // Never trained on: its update is given.
                Canary::Direction(_) => String::new(),
            };
            prepared.dataset.clients.push(ClientData { id: id.clone(), train: vec![train], test: Vec::new() });
        }
        canaries.push((id, canary, included));
    }
    let rounds = prepared.experiment.rounds.rounds;
    let mut sim = InProcess::new(prepared)?;
    for (id, canary, included) in &canaries {
        if let (Canary::Direction(d), true) = (canary, included) {
            sim.craft(id, d.clone());
        }
    }
    let texts: Vec<String> = canaries
        .iter()
        .filter_map(|(_, c, _)| match c {
            Canary::Text(t) => Some(t.clone()),
            Canary::Direction(_) => None,
        })
        .collect();
    let mut before = if texts.is_empty() { Vec::new() } else { canary_nlls(prepared, sim.published(), &texts)? };
    let mut scores: Vec<f64> = vec![f64::NEG_INFINITY; canaries.len()];
    for r in 1..=rounds {
        sim.round(r, progress)?;
        let round_scores: Vec<f64> = match cfg.kind {
            CanaryKind::Update => {
                let Some(step) = sim.last_step() else { continue };
                canaries
                    .iter()
                    .map(|(_, c, _)| match c {
                        Canary::Direction(d) => projection(step, d),
                        Canary::Text(_) => 0.0,
                    })
                    .collect()
            }
            CanaryKind::Sequence => {
                let after = canary_nlls(prepared, sim.published(), &texts)?;
                let drops: Vec<f64> = before.iter().zip(&after).map(|(b, a)| b - a).collect();
                let mut sorted = drops.clone();
                sorted.sort_by(f64::total_cmp);
                let median = sorted[sorted.len() / 2];
                before = after;
                drops.iter().map(|d| d - median).collect()
            }
        };
        for (s, x) in scores.iter_mut().zip(round_scores) {
            *s = s.max(x);
        }
    }
    let privacy = sim.privacy()?;
    let claimed = if privacy.mechanism == "none" { f64::INFINITY } else { privacy.epsilon };
    let scores: Vec<(f64, bool)> = scores
        .into_iter()
        .map(|s| if s.is_finite() { s } else { 0.0 })
        .zip(canaries.iter().map(|(_, _, i)| *i))
        .collect();
    let a = covey_privacy::audit::audit(&scores, &guess_counts(cfg.canaries), privacy.delta, cfg.confidence)?;
    let mean = |want: bool| {
        let xs: Vec<f64> = scores.iter().filter(|(_, i)| *i == want).map(|(s, _)| *s).collect();
        xs.iter().sum::<f64>() / xs.len().max(1) as f64
    };
    Ok(AuditReport {
        experiment: prepared.experiment.name.clone(),
        mechanism: privacy.mechanism,
        kind: cfg.kind,
        claimed_epsilon: claimed,
        delta: privacy.delta,
        audited_lower_bound: a.lower_bound,
        confidence: cfg.confidence,
        canaries: cfg.canaries,
        included: canaries.iter().filter(|(_, _, i)| *i).count(),
        guesses: a.guesses,
        correct: a.correct,
        rounds,
        mean_score_included: mean(true),
        mean_score_excluded: mean(false),
    })
}

/// A canary: a string to train on, or an update direction.
enum Canary {
    Text(String),
    Direction(covey_model::NamedTensors),
}

/// A Gaussian direction over the `B` shapes, scaled to L2 norm `norm`.
fn random_direction(
    shapes: &std::collections::BTreeMap<String, Vec<usize>>,
    norm: f64,
    rng: &mut SecureRng,
) -> Result<covey_model::NamedTensors> {
    let mut out = covey_model::NamedTensors::new();
    let mut sq = 0.0;
    for (name, shape) in shapes {
        let mut x = vec![0.0f64; shape.iter().product()];
        rng.fill_standard_normal(&mut x);
        sq += x.iter().map(|v| v * v).sum::<f64>();
        out.insert(name.clone(), covey_model::HostTensor::new(shape.clone(), x.iter().map(|&v| v as f32).collect())?);
    }
    let scale = (norm / sq.sqrt()) as f32;
    for t in out.values_mut() {
        t.data.iter_mut().for_each(|v| *v *= scale);
    }
    Ok(out)
}

/// `<step, direction> / |direction|`: the step's component along the canary.
fn projection(step: &covey_model::NamedTensors, direction: &covey_model::NamedTensors) -> f64 {
    let (mut dot, mut sq) = (0.0f64, 0.0f64);
    for (name, d) in direction {
        if let Some(s) = step.get(name) {
            dot += s.data.iter().zip(&d.data).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>();
        }
        sq += d.data.iter().map(|&b| f64::from(b) * f64::from(b)).sum::<f64>();
    }
    dot / sq.sqrt().max(f64::MIN_POSITIVE)
}

/// Mean NLL per token of each of `texts` under `weights` (one model build for all).
fn canary_nlls(prepared: &Prepared, weights: &covey_model::NamedTensors, texts: &[String]) -> Result<Vec<f64>> {
    let device = covey_model::cpu_device();
    let model = covey_model::checkpoint::from_base_tensors(&prepared.config, weights, Path::new("published"), &device)?;
    let seq_len = prepared.experiment.training.seq_len as usize;
    texts
        .iter()
        .map(|t| {
            let tokens = prepared.tokenizer.encode(t).map_err(covey_model::ModelError::from)?;
            let bytes_per_token = t.len() as f64 / tokens.len().max(1) as f64;
            Ok(covey_model::eval::evaluate(&model, &tokens, seq_len, 1, bytes_per_token, None, &device)?.mean_nll)
        })
        .collect()
}

/// The experiment with its noise removed (`--no-noise`): no central DP, no local noise,
/// no calibration; clipping stays.
pub fn without_noise(exp: &mut crate::config::Experiment) {
    exp.privacy.central = None;
    exp.privacy.local_noise_multiplier = 0.0;
    exp.privacy.target_epsilon = None;
    exp.privacy.participation = Default::default();
    exp.calibrate.target_epsilon = None;
    exp.name = format!("{}-no-noise", exp.name);
}

/// The audit as a short table.
pub fn table(a: &AuditReport) -> String {
    let claimed =
        if a.claimed_epsilon.is_finite() { format!("{:.2}", a.claimed_epsilon) } else { "∞ (no noise)".into() };
    format!(
        "canaries         {} ({:?})\nmechanism        {}\nclaimed ε        {claimed} at δ = {:e}\naudited ε ≥      {:.2} at {:.0} % confidence \
         ({} of {} \"in\" guesses right; {} of {} canaries included)\ncanary score     {:.4} included, {:.4} \
         excluded",
        a.canaries,
        a.kind,
        a.mechanism,
        a.delta,
        a.audited_lower_bound,
        a.confidence * 100.0,
        a.correct,
        a.guesses,
        a.included,
        a.canaries,
        a.mean_score_included,
        a.mean_score_excluded
    )
}

/// Write `report` as `audit.json` under `dir`.
pub fn write(report: &AuditReport, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| SimError::io(dir, e))?;
    let path = dir.join("audit.json");
    let json = serde_json::to_vec_pretty(report).map_err(|e| SimError::Data(format!("audit as JSON: {e}")))?;
    covey_fs::write_atomic(&path, &json).map_err(|e| SimError::io(&path, e))
}
