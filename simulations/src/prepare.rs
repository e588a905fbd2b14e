//! What both runners need before round 1: the base model as master weights, the clients'
//! data, the held-out evaluation texts, the noise calibrated to a target ε, and the
//! helpers that publish (int8) and evaluate a version as the coordinator would.

use std::path::Path;

use covey_model::{LlamaConfig, NamedTensors, Tokenizer};
use covey_tensors::quant;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::attack::Attack;
use crate::config::{Experiment, Mode, Source};
use crate::dataset::{self, ClientData, Dataset};
use crate::error::{Result, SimError};
use crate::partition;
use crate::report::{Report, RoundMetrics, Summary};

/// Seed of the choice of evaluation clients: fixed, so runs with different seeds (and
/// the centralised baseline) are scored on the same texts.
const EVAL_SEED: u64 = 0x5EED_E7A1;

/// An experiment ready to run.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The experiment, with any calibrated noise multiplier filled in.
    pub experiment: Experiment,
    /// Shape of the model.
    pub config: LlamaConfig,
    /// `config.json` of the model (what the coordinator imports).
    pub config_json: Vec<u8>,
    /// f32 master weights, Hugging Face names.
    pub master: NamedTensors,
    /// The model's tokenizer (byte-level for a model directory without `tokenizer.json`).
    pub tokenizer: Tokenizer,
    /// `tokenizer_config.json` for the model directory the loopback coordinator imports
    /// (chat template, BOS / EOS); `None` for the byte-level tokenizer.
    pub tokenizer_config_json: Option<Vec<u8>>,
    /// The clients (after partitioning; one pooled client for a centralised run).
    pub dataset: Dataset,
    /// Held-out texts every version is scored on.
    pub eval_texts: Vec<String>,
    /// Ids of the clients whose test texts make up `eval_texts`.
    pub eval_clients: Vec<String>,
    /// Lines describing what was prepared, for the report.
    pub notes: Vec<String>,
    /// The Byzantine clients (`[attack]`), by index; a backdoor attacker's training text
    /// is already poisoned.
    pub attackers: std::collections::BTreeSet<usize>,
}

impl Prepared {
    /// The coordinator configuration of this experiment, for both runners: its LoRA,
    /// training, privacy and strategy sections verbatim; a population of every client, a
    /// cohort of `clients-per-round` (Poisson: each client joins with probability
    /// cohort / population), no over-selection, cohorts from the experiment's seed, the
    /// training seed mixed with it. A centralised run trains its one client for
    /// `steps × clients-per-round` steps. The in-process runner hands it to the
    /// coordinator's round policy; the loopback runner to a real coordinator.
    pub fn fleet_config(&self) -> covey_coordinator::CoordinatorConfig {
        let exp = &self.experiment;
        let mut c = covey_coordinator::CoordinatorConfig {
            lora: exp.lora.clone(),
            training: exp.training.clone(),
            privacy: exp.privacy.clone(),
            strategy: exp.strategy.clone(),
            ..covey_coordinator::CoordinatorConfig::default()
        };
        c.privacy.population = self.population();
        if c.privacy.mechanism() == Some(covey_strategy::Mechanism::DpFtrl) {
            // No sampling assumption: the cohort is drawn from the devices within their
            // participation limits, and m = the target cohort.
            c.privacy.population = 0;
        }
        c.training.seed ^= exp.seed;
        if exp.rounds.centralised {
            let cohort = u32::try_from(exp.rounds.clients_per_round).unwrap_or(u32::MAX);
            c.training.steps = c.training.steps.saturating_mul(cohort);
        }
        c.rounds.target_updates = self.cohort();
        c.rounds.over_selection = 0.0;
        // Poisson cohorts vary around `cohort`; a round publishes with whoever was sampled.
        c.rounds.min_updates = 1;
        // Every client online before round 1 (the loopback agents start one by one).
        c.rounds.min_available = self.population();
        c.rounds.max_rounds = exp.rounds.rounds;
        // A simulation: cohorts from the experiment's seed (a coordinator of devices draws
        // them from the OS CSPRNG).
        c.rounds.seed = Some(exp.seed);
        // Every round publishes a base release, so devices hold the merged int8 weights
        // the in-process runner scores.
        c.publish.release_every = 1;
        c
    }

    /// Clients in the population.
    pub fn population(&self) -> usize {
        self.dataset.clients.len()
    }

    /// Clients per round, at most the population.
    pub fn cohort(&self) -> usize {
        self.experiment.rounds.clients_per_round.min(self.population())
    }
}

/// Load the model and the data of `exp`, partition, choose the evaluation texts, and
/// calibrate the noise if asked.
pub fn prepare(exp: &Experiment) -> Result<Prepared> {
    exp.validate()?;
    let mut exp = exp.clone();
    let mut notes = Vec::new();
    let LoadedBase { config, config_json, master, tokenizer, tokenizer_config_json } = load_model(&exp)?;
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(SimError::config(
            "model.base",
            format!("the tokenizer has {} tokens, the model {}", tokenizer.vocab_size(), config.vocab_size),
        ));
    }
    let raw = match exp.data.source {
        Source::LeafShakespeare => dataset::leaf_shakespeare(&exp.data.path, &exp.data.leaf)?,
        Source::ClientDirs => dataset::client_dirs(&exp.data.path, exp.data.train_fraction)?,
        Source::Jsonl => dataset::jsonl_clients(&exp.data.path, exp.data.train_fraction)?,
    };
    let partitioned = partition::partition(&raw, &exp.data.partitioner, exp.seed)?;
    let (eval_texts, eval_clients) = eval_texts(&partitioned, exp.data.eval_bytes, &exp.data.eval_client_prefixes);
    if eval_texts.is_empty() {
        return Err(SimError::config("data.eval-client-prefixes", "no client's test texts match"));
    }
    notes.push(format!(
        "{} clients ({} training bytes); evaluation on the test texts of {} clients ({} bytes)",
        partitioned.clients.len(),
        partitioned.train_bytes(),
        eval_clients.len(),
        eval_texts.iter().map(String::len).sum::<usize>(),
    ));
    let dataset = if exp.rounds.centralised {
        notes.push("centralised baseline: every client's training text pooled into one client".into());
        Dataset {
            name: format!("{} (pooled)", partitioned.name),
            clients: vec![ClientData {
                id: "centralised".into(),
                train: partitioned.clients.iter().flat_map(|c| c.train.iter().cloned()).collect(),
                test: partitioned.clients.iter().flat_map(|c| c.test.iter().cloned()).collect(),
            }],
        }
    } else {
        partitioned
    };
    let population = dataset.clients.len();
    let noisy = exp.privacy.central.is_some() || exp.privacy.local_noise_multiplier > 0.0;
    if (noisy || exp.calibrate.target_epsilon.is_some()) && exp.privacy.delta >= 1.0 / population as f64 {
        return Err(SimError::config(
            "privacy.delta",
            format!(
                "{} is not below 1 / {population} clients: such a guarantee allows one client's data to be published",
                exp.privacy.delta
            ),
        ));
    }
    if let Some(target) = exp.calibrate.target_epsilon {
        let accountant = exp.privacy.accountant;
        let delta = exp.privacy.delta;
        let rounds = exp.rounds.rounds;
        let z = match exp.privacy.effective_central() {
            Some(c) if c.mechanism == covey_strategy::Mechanism::DpFtrl => {
                let period = c.tree_period.unwrap_or(1).max(1);
                let limit = exp.privacy.participation.max_participations;
                let trees = rounds.div_ceil(period);
                let k = if limit > 0 { limit.min(trees) } else { trees };
                let s2 = k as f64 * f64::from(covey_privacy::tree::depth(period));
                let z = covey_privacy::calibrate::noise_multiplier_without_sampling(accountant, target, delta, s2)?;
                notes.push(format!(
                    "DP-FTRL noise multiplier {z:.4} calibrated for ε = {target} at δ = {delta}: at most {k} \
                     contributions per client, trees of {period} rounds ({accountant})"
                ));
                z
            }
            _ => {
                let q = exp.rounds.clients_per_round.min(population) as f64 / population as f64;
                let z = covey_privacy::calibrate::noise_multiplier_for(accountant, target, delta, q, rounds)?;
                notes.push(format!(
                    "noise multiplier {z:.4} calibrated for ε = {target} at δ = {delta} over {rounds} rounds at \
                     q = {q:.4} ({accountant})"
                ));
                z
            }
        };
        match exp.privacy.central.as_mut() {
            Some(central) => central.noise_multiplier = z,
            None => exp.privacy.local_noise_multiplier = z,
        }
    }
    let mut dataset = dataset;
    let attackers = match &exp.attack {
        Some(a) => {
            let attackers = a.attackers(dataset.clients.len(), exp.seed);
            if a.kind == crate::attack::AttackKind::Backdoor {
                for &i in &attackers {
                    let c = &mut dataset.clients[i];
                    c.train = a.poison(&c.train);
                }
            }
            notes.push(format!(
                "{} of {} clients attack ({:?}, scale {})",
                attackers.len(),
                dataset.clients.len(),
                a.kind,
                a.scale
            ));
            attackers
        }
        None => Default::default(),
    };
    Ok(Prepared {
        experiment: exp,
        config,
        config_json,
        master,
        tokenizer,
        tokenizer_config_json,
        dataset,
        eval_texts,
        eval_clients,
        notes,
        attackers,
    })
}

/// What [`load_model`] reads.
struct LoadedBase {
    config: LlamaConfig,
    config_json: Vec<u8>,
    master: NamedTensors,
    tokenizer: Tokenizer,
    tokenizer_config_json: Option<Vec<u8>>,
}

/// The model of `exp`: a model directory or a GGUF file (as the coordinator reads its
/// initial model: the weights, the tokenizer, the chat template), or a random
/// initialisation of its preset (byte-level).
fn load_model(exp: &Experiment) -> Result<LoadedBase> {
    let dir_holder;
    let path: &Path = match &exp.model.base {
        Some(path) => path,
        None => {
            let config = exp.model.preset_config()?;
            let device = covey_model::cpu_device();
            let model = covey_model::Llama::init(&config, exp.model.init_seed, &device)?;
            dir_holder = tempfile::tempdir().map_err(|e| SimError::io(Path::new("temporary directory"), e))?;
            covey_model::checkpoint::save_model(&model, &Tokenizer::Bytes, dir_holder.path())?;
            dir_holder.path()
        }
    };
    let initial = covey_coordinator::weights::read_initial_model(path, &exp.lora)?;
    let config: LlamaConfig = serde_json::from_slice(&initial.config_json)
        .map_err(|e| SimError::config("model.base", format!("config.json: {e}")))?;
    let (tokenizer, tokenizer_config_json) = match &initial.tokenizer_json {
        None => (Tokenizer::Bytes, None),
        Some(json) => {
            let tokenizer =
                Tokenizer::from_json_bytes(json, "tokenizer.json").map_err(covey_model::ModelError::from)?;
            let token = |id: Option<u32>| match (&tokenizer, id) {
                (Tokenizer::HuggingFace(t), Some(id)) => t.id_to_token(id),
                _ => None,
            };
            let s = &initial.special_tokens;
            let tc = serde_json::json!({
                "chat_template": initial.chat_template,
                "bos_token": token(s.bos),
                "eos_token": token(s.eos),
                "add_bos_token": s.add_bos,
            });
            (tokenizer, Some(tc.to_string().into_bytes()))
        }
    };
    Ok(LoadedBase {
        config,
        config_json: initial.config_json,
        master: initial.master,
        tokenizer,
        tokenizer_config_json,
    })
}

/// Test texts of clients (those whose id starts with one of `prefixes`, or all) taken in
/// a fixed shuffled order until `max_bytes`, the last client's texts cut to fit;
/// returned with the clients' ids, in id order.
fn eval_texts(dataset: &Dataset, max_bytes: usize, prefixes: &[String]) -> (Vec<String>, Vec<String>) {
    let mut order: Vec<usize> = (0..dataset.clients.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(EVAL_SEED));
    order.retain(|&i| prefixes.is_empty() || prefixes.iter().any(|p| dataset.clients[i].id.starts_with(p.as_str())));
    let mut chosen = Vec::new();
    let mut total = 0;
    for i in order {
        if total >= max_bytes {
            break;
        }
        chosen.push(i);
        total += dataset.clients[i].test.iter().map(String::len).sum::<usize>();
    }
    chosen.sort_unstable();
    let mut texts = Vec::new();
    let mut budget = max_bytes;
    for &i in &chosen {
        for t in &dataset.clients[i].test {
            if budget == 0 {
                break;
            }
            let cut = floor_char_boundary(t, budget);
            texts.push(t[..cut].to_owned());
            budget -= cut;
        }
    }
    (texts, chosen.iter().map(|&i| dataset.clients[i].id.clone()).collect())
}

fn floor_char_boundary(s: &str, max: usize) -> usize {
    if max >= s.len() {
        return s.len();
    }
    (0..=max).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0)
}

/// A version as devices receive it: the master quantized to int8 per output channel and
/// decoded again, with the artifact's size in bytes.
pub fn publish(master: &NamedTensors) -> Result<(NamedTensors, usize)> {
    let bytes = quant::encode_int8(master, Default::default())?;
    let (published, _) = quant::decode_model(&bytes)?;
    Ok((published, bytes.len()))
}

/// Held-out metrics of `weights` on the prepared evaluation texts.
pub fn evaluate(prepared: &Prepared, weights: &NamedTensors) -> Result<covey_model::EvalMetrics> {
    let device = covey_model::cpu_device();
    Ok(covey_model::evaluate_texts(
        &prepared.config,
        weights,
        &prepared.tokenizer,
        &prepared.eval_texts,
        prepared.experiment.eval_seq_len(),
        &device,
    )?)
}

/// `count` bytes generated greedily by `weights` after `prompt`.
pub fn sample(prepared: &Prepared, weights: &NamedTensors, prompt: &str, count: usize) -> Result<String> {
    let device = covey_model::cpu_device();
    let model = covey_model::checkpoint::from_base_tensors(&prepared.config, weights, Path::new("published"), &device)?;
    let tokenizer = &prepared.tokenizer;
    let ids = tokenizer.encode(prompt).map_err(covey_model::ModelError::from)?;
    let sampling = covey_model::SamplingConfig {
        max_new_tokens: count,
        temperature: 0.0,
        ..covey_model::SamplingConfig::default()
    };
    let out = covey_model::generate::generate(&model, &ids, &sampling, None, &device)?;
    Ok(tokenizer.decode(&out).map_err(covey_model::ModelError::from)?)
}

/// The report of a finished run of `prepared` in `mode`: its rounds, the summary, and
/// the preparation notes followed by `notes`.
pub fn report(prepared: &Prepared, mode: Mode, rounds: Vec<RoundMetrics>, notes: Vec<String>) -> Result<Report> {
    let exp = &prepared.experiment;
    let summary = Summary::from_rounds(&rounds, prepared.cohort(), prepared.population(), exp.privacy.delta);
    Ok(Report {
        name: exp.name.clone(),
        mode: mode.name().into(),
        config: serde_json::to_value(exp).map_err(|e| SimError::Data(format!("experiment as JSON: {e}")))?,
        rounds,
        summary,
        notes: prepared.notes.iter().cloned().chain(notes).collect(),
        personalisation: None,
        attack: None,
    })
}

/// A 32-byte seed for [`covey_privacy::SecureRng::from_seed`] from the experiment seed
/// and a purpose.
pub fn seed_bytes(seed: u64, purpose: &str, index: u64) -> [u8; 32] {
    let mut material = Vec::with_capacity(24 + purpose.len());
    material.extend_from_slice(&seed.to_be_bytes());
    material.extend_from_slice(&index.to_be_bytes());
    material.extend_from_slice(purpose.as_bytes());
    covey_proto::keys::sha256(&material)
}
