//! Personalisation: a device's own adapter, stacked on the global model (base + global
//! adapter), trained only on the device's text and never uploaded.
//!
//! The personal model is `W + ΔW_global + ΔW_local` with `ΔW_local = (α/r) · B_l · A_l`:
//! `A_l` is drawn from the device's own seed and frozen, `B_l` trains (the FFA-LoRA
//! structure of the global adapter, at its own rank and targets). Two methods:
//! - [`PersonalMethod::FedRecon`] (Singhal et al. 2021): after every global update the
//!   local adapter is reconstructed from zero on the device's text, the global model
//!   frozen; nothing local outlives the global version it was fitted to.
//! - [`PersonalMethod::Ditto`] (Li et al. 2021): the local adapter is kept across global
//!   updates and trained further, with Ditto's proximal coupling
//!   `λ/2 · ‖W_personal − W_global‖²`. Stacked on the global model, the personal model's
//!   distance to the global one is the local adapter itself, so the coupling is
//!   `λ/2 · ‖B_l‖²` (with `A_l` fixed): λ = 0 is free local fine-tuning, a large λ pins
//!   the device to the global model.
//!
//! The local adapter lives under its own names ([`LOCAL_PREFIX`]), so that it can never be
//! mistaken for, or merged into, the global adapter a device uploads.

use crate::checkpoint::NamedTensors;
use crate::config::{LlamaConfig, LoraConfig};
use crate::error::{ModelError, Result};
use crate::local_round::{LocalResult, LocalRound, LocalTrainSpec, Resume, seeded_a, train_local_adapter};
use crate::train::TrainConfig;

/// Prefix of every tensor of a local adapter, before its PEFT name.
pub const LOCAL_PREFIX: &str = "local.";

pub use covey_settings::{PersonalConfig, PersonalMethod};

/// What a [`PersonalConfig`] means to the model: the local adapter's LoRA shape, its frozen
/// `A` factors and its training run. (The settings themselves live in `covey-settings`, which
/// does not link burn.)
pub trait PersonalTraining {
    /// The local adapter's LoRA shape, `A` drawn from `seed` (the device's own).
    fn lora(&self, seed: u64) -> LoraConfig;
    /// The local adapter's frozen `A` factors for a model of shape `config`, PEFT names.
    fn a_factors(&self, config: &LlamaConfig, seed: u64) -> NamedTensors;
    /// The local training run: the method's coupling as the proximal term (centre
    /// `B_l = 0`), batches drawn from `seed`.
    fn spec(&self, seed: u64, threads: usize) -> LocalTrainSpec;
}

impl PersonalTraining for PersonalConfig {
    fn lora(&self, seed: u64) -> LoraConfig {
        LoraConfig { rank: self.rank, alpha: self.alpha, dropout: 0.0, targets: self.targets.clone(), ffa: true, seed }
    }

    fn a_factors(&self, config: &LlamaConfig, seed: u64) -> NamedTensors {
        seeded_a(config, &self.lora(seed))
    }

    fn spec(&self, seed: u64, threads: usize) -> LocalTrainSpec {
        LocalTrainSpec {
            lora: self.lora(seed),
            train: TrainConfig {
                steps: self.steps,
                batch_size: self.batch_size,
                seq_len: self.seq_len,
                grad_accum: 1,
                lr: self.learning_rate,
                warmup_steps: self.steps / 10,
                seed,
                threads,
                ..TrainConfig::default()
            },
            proximal_mu: match self.method {
                PersonalMethod::FedRecon => 0.0,
                PersonalMethod::Ditto => self.lambda,
            },
            checkpoint_every: 0,
            example_dp: None,
        }
    }
}

/// A trained local adapter: its factors under PEFT names, and its scale.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalAdapter {
    /// The frozen `A` factors (`[r, in]`).
    pub a: NamedTensors,
    /// The trained `B` factors (`[out, r]`).
    pub b: NamedTensors,
    /// `alpha / rank`.
    pub scale: f32,
}

impl LocalAdapter {
    /// Add the local adapter to `weights` (`W ← W + scale · B · A`): the personal model
    /// from the global one, for scoring or for the engine.
    pub fn merge_into(&self, weights: &mut NamedTensors) -> Result<()> {
        let factors: NamedTensors = self.a.iter().chain(&self.b).map(|(n, t)| (n.clone(), t.clone())).collect();
        covey_tensors::lora::merge(weights, &factors, self.scale)
            .map_err(|e| ModelError::config("local adapter", format!("does not fit the model: {e}")))
    }

    /// Every factor under [`LOCAL_PREFIX`] names: what a device stores, never what it sends.
    pub fn to_tensors(&self) -> NamedTensors {
        self.a.iter().chain(&self.b).map(|(n, t)| (format!("{LOCAL_PREFIX}{n}"), t.clone())).collect()
    }
}

/// Train the local adapter of one device on `round`'s text, on top of `round.base`
/// (and `round.adapter`, the global adapter kept frozen). `round.a` must be
/// `cfg.a_factors(config, seed)`. Ditto continues from `previous` (the device's last
/// local `B`) where it is given; FedRecon always starts from zero.
pub fn train_local(
    round: LocalRound<'_>,
    cfg: &PersonalConfig,
    seed: u64,
    threads: usize,
    previous: Option<&NamedTensors>,
) -> Result<(LocalAdapter, LocalResult)> {
    cfg.validate().map_err(ModelError::from)?;
    let spec = cfg.spec(seed, threads);
    let resume = match (cfg.method, previous) {
        (PersonalMethod::Ditto, Some(b)) => Some(Resume { step: 0, b: b.clone() }),
        _ => None,
    };
    let a = round.a.clone();
    let result = train_local_adapter(round, &spec, &crate::cpu_device(), resume, |_| {})?;
    let adapter = LocalAdapter { a, b: result.b.clone(), scale: (cfg.alpha / cfg.rank as f64) as f32 };
    Ok((adapter, result))
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;
    use crate::checkpoint;
    use crate::cpu_device;
    use crate::llama::Llama;
    use crate::local_round::{RoundBase, evaluate_texts};
    use crate::tokenizer::Tokenizer;

    fn base(config: &LlamaConfig) -> NamedTensors {
        checkpoint::base_tensors(&Llama::init(config, 17, &cpu_device()).expect("init"))
    }

    fn text() -> Vec<String> {
        ["Now is the winter of our discontent made glorious summer by this sun of York; ".repeat(6)].to_vec()
    }

    fn cfg(method: PersonalMethod, lambda: f64) -> PersonalConfig {
        PersonalConfig { method, lambda, steps: 12, seq_len: 32, learning_rate: 3e-2, ..PersonalConfig::default() }
    }

    fn fit(
        config: &LlamaConfig,
        global: &NamedTensors,
        cfg: &PersonalConfig,
        previous: Option<&NamedTensors>,
    ) -> (LocalAdapter, LocalResult) {
        let a = cfg.a_factors(config, 9);
        let corpus = text();
        let round = LocalRound {
            config,
            base: RoundBase::Tensors(Cow::Borrowed(global)),
            adapter: None,
            a: &a,
            tokenizer: &Tokenizer::Bytes,
            corpus: &corpus,
            chats: &[],
            chat_format: None,
        };
        train_local(round, cfg, 9, 1, previous).expect("train")
    }

    fn norm(t: &NamedTensors) -> f32 {
        t.values().flat_map(|x| &x.data).map(|v| v * v).sum::<f32>().sqrt()
    }

    #[test]
    fn a_local_adapter_fits_the_devices_text_and_lives_under_its_own_names() {
        let config = LlamaConfig::tiny();
        let global = base(&config);
        let (adapter, result) = fit(&config, &global, &cfg(PersonalMethod::FedRecon, 0.0), None);
        assert!(result.loss_last < result.loss_first, "{} -> {}", result.loss_first, result.loss_last);
        let mut personal = global.clone();
        adapter.merge_into(&mut personal).expect("merge");
        let score = |w: &NamedTensors| {
            evaluate_texts(&config, w, &Tokenizer::Bytes, &text(), 32, &cpu_device()).expect("eval").mean_nll
        };
        assert!(score(&personal) < score(&global), "the personal model does not fit the device's text better");
        let stored = adapter.to_tensors();
        assert_eq!(stored.len(), adapter.a.len() + adapter.b.len());
        assert!(stored.keys().all(|n| n.starts_with(LOCAL_PREFIX)), "{:?}", stored.keys().collect::<Vec<_>>());
    }

    #[test]
    fn dittos_coupling_keeps_the_local_adapter_near_the_global_model_and_continues_it() {
        let config = LlamaConfig::tiny();
        let global = base(&config);
        let free = fit(&config, &global, &cfg(PersonalMethod::Ditto, 0.0), None).0;
        let coupled = fit(&config, &global, &cfg(PersonalMethod::Ditto, 200.0), None).0;
        assert!(norm(&coupled.b) < 0.5 * norm(&free.b), "{} vs {}", norm(&coupled.b), norm(&free.b));
        // Ditto continues from the device's last local adapter; FedRecon starts again.
        let again = fit(&config, &global, &cfg(PersonalMethod::Ditto, 0.0), Some(&free.b)).0;
        let fresh = fit(&config, &global, &cfg(PersonalMethod::FedRecon, 0.0), Some(&free.b)).0;
        assert_eq!(fresh.b, free.b, "FedRecon must ignore the previous adapter (same seed, same run)");
        assert_ne!(again.b, free.b);
    }

    #[test]
    fn a_local_adapter_of_another_shape_is_a_clear_error() {
        let config = LlamaConfig::tiny();
        let adapter = fit(&config, &base(&config), &cfg(PersonalMethod::FedRecon, 0.0), None).0;
        let wider = LlamaConfig { hidden_size: 64, ..LlamaConfig::tiny() };
        let mut other = base(&wider);
        let err = adapter.merge_into(&mut other).expect_err("shapes differ").to_string();
        assert!(err.contains("local adapter") && err.contains("does not fit"), "{err}");
    }

    #[test]
    fn bad_settings_name_their_field() {
        for (bad, field) in [
            (PersonalConfig { rank: 0, ..PersonalConfig::default() }, "rank"),
            (PersonalConfig { lambda: -1.0, ..PersonalConfig::default() }, "lambda"),
            (PersonalConfig { learning_rate: f64::NAN, ..PersonalConfig::default() }, "learning-rate"),
            (PersonalConfig { targets: Vec::new(), ..PersonalConfig::default() }, "targets"),
        ] {
            let err = bad.validate().expect_err("invalid").to_string();
            assert!(err.contains(field), "{err}");
        }
        let parsed: PersonalConfig = serde_json::from_str(r#"{"method": "ditto", "lambda": 0.5}"#).expect("json");
        assert_eq!((parsed.method, parsed.lambda, parsed.rank), (PersonalMethod::Ditto, 0.5, 4));
        assert!(serde_json::from_str::<PersonalConfig>(r#"{"method": "other"}"#).is_err());
        assert!(serde_json::from_str::<PersonalConfig>(r#"{"lamda": 1}"#).is_err(), "unknown fields are errors");
    }
}
