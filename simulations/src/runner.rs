//! The in-process runner: virtual clients trained in parallel on this machine's cores,
//! aggregated by the coordinator's strategy code.
//!
//! Each round mirrors the coordinator: sample a cohort (Poisson sampling at
//! q = clients-per-round / population, keyed from the seed), ask the strategy for the round's clip norm and proximal term, train
//! every client exactly as a device agent does (`covey_agent::train::spec_for` →
//! `covey_model::train_local_adapter` on the published int8 model with the coordinator's
//! frozen `A`, then `covey_agent::update::PrivateUpdate` clips and noises `B`), aggregate
//! the updates in cohort order with the strategy (central DP included), merge into the
//! f32 master (`covey_coordinator::weights::merge_step`), account the privacy spent as
//! the coordinator does, publish int8 and evaluate the published version.
//!
//! Memory is bounded by the clients training at once (`rounds.parallel` models) plus
//! the cohort's `B` factors, never by the population. A fixed seed gives the same
//! metrics: cohorts, batches, noise and aggregation order depend only on it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use covey_agent::task::{LoraSpec, PrivacySpec, TrainingSpec};
use covey_agent::update::PrivateUpdate;
use covey_coordinator::weights;
use covey_model::{LoraTarget, NamedTensors, Tokenizer};
use covey_privacy::{RdpAccountant, SecureRng};
use covey_strategy::{ClientUpdate, RoundContext};
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::Mode;
use crate::dataset::ClientData;
use crate::error::{Result, SimError};
use crate::prepare::{self, Prepared, seed_bytes};
use crate::report::{Report, RoundMetrics};

/// Bytes of the signed header and signature sent with every update (the wire format of
/// `covey_proto::signing`).
pub const UPDATE_OVERHEAD_BYTES: usize = covey_proto::signing::UPDATE_HEADER_LEN + 64;

/// What one virtual client produced in a round.
#[derive(Debug)]
struct Outcome {
    update: ClientUpdate,
    loss_last: f32,
    bytes_up: usize,
}

/// Run a prepared experiment in this process; `progress` shows a bar per round.
pub fn run(prepared: &Prepared, progress: bool) -> Result<Report> {
    let exp = &prepared.experiment;
    let population = prepared.population();
    let cohort = prepared.cohort();
    let mut master = prepared.master.clone();
    let a = weights::a_factors(&master, &exp.lora);
    let a_bytes = covey_tensors::encode(&a, None)?.len();
    let lora = lora_spec(exp, &a)?;
    let mut strategy = covey_strategy::build(
        &exp.strategy,
        exp.privacy.central.as_ref(),
        SecureRng::from_seed(seed_bytes(exp.seed, "strategy", 0)),
    )?;
    let mut accountant = RdpAccountant::new(covey_privacy::rdp::default_orders());
    let mut seen = vec![false; population];

    let started = Instant::now();
    let (mut published, mut model_bytes) = prepare::publish(&master)?;
    let base = prepare::evaluate(prepared, &published)?;
    let mut rounds = vec![RoundMetrics {
        round: 0,
        clients: 0,
        train_loss: f64::NAN,
        test_loss: base.mean_nll,
        test_perplexity: base.perplexity,
        top1: base.top1,
        top3: base.top3,
        epsilon: 0.0,
        bytes_up_per_client: 0,
        bytes_down_per_client: 0,
        wall_seconds: started.elapsed().as_secs_f64(),
    }];
    tracing::info!(perplexity = base.perplexity, top1 = base.top1, "round 0 (base model)");

    for round in 1..=exp.rounds.rounds {
        let t0 = Instant::now();
        // Poisson sampling at q = cohort / population, as the coordinator samples and as
        // the accountant assumes; keyed from the experiment's seed (simulations only).
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&exp.seed.to_be_bytes());
        key[8..16].copy_from_slice(&round.to_be_bytes());
        let q = cohort as f64 / population.max(1) as f64;
        let members = covey_privacy::sampling::poisson(population, q.min(1.0), &mut SecureRng::from_seed(key))?;
        let ctx = RoundContext { round, expected_clients: cohort, population };
        let round_config = strategy.configure_round(&ctx);
        let privacy = PrivacySpec {
            clip_norm: round_config.clip_norm.unwrap_or(exp.privacy.clip_norm),
            noise_multiplier: exp.privacy.local_noise_multiplier,
        };
        let training = TrainingSpec {
            steps: local_steps(prepared),
            batch_size: exp.training.batch_size as usize,
            seq_len: exp.training.seq_len as usize,
            learning_rate: f64::from(exp.training.learning_rate),
            proximal_mu: round_config.proximal_mu,
            seed: exp.training.seed ^ exp.seed ^ round,
        };
        let bar = progress.then(|| round_bar(round, exp.rounds.rounds, members.len()));
        let job = RoundJob { prepared, published: &published, a: &a, lora: &lora, training: &training, privacy, round };
        let outcomes = train_cohort(&job, &members, bar.as_ref())?;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }

        let mut down = 0usize;
        for &m in &members {
            down += model_bytes + if seen[m] { 0 } else { a_bytes };
            seen[m] = true;
        }
        let ok: Vec<Outcome> = outcomes.into_iter().flatten().collect();
        let failures = members.len() - ok.len();
        let examples: u64 = ok.iter().map(|o| o.update.num_examples).sum();
        let train_loss = if examples == 0 {
            f64::NAN
        } else {
            ok.iter().map(|o| f64::from(o.loss_last) * o.update.num_examples as f64).sum::<f64>() / examples as f64
        };
        let bytes_up = ok.iter().map(|o| o.bytes_up).sum::<usize>() / ok.len().max(1);
        let clients = ok.len();
        let mut updates = ok.into_iter().map(|o| o.update);
        match strategy.aggregate(&ctx, &mut updates, failures)? {
            Some(aggregate) => {
                master = weights::merge_step(&master, &a, &aggregate.step, &exp.lora)?;
                if let Some(e) = aggregate.privacy {
                    accountant.compose_subsampled_gaussian(e.sampling_rate.clamp(0.0, 1.0), e.noise_multiplier, 1)?;
                } else if exp.privacy.local_noise_multiplier > 0.0 {
                    let q = cohort as f64 / population as f64;
                    accountant.compose_subsampled_gaussian(q, exp.privacy.local_noise_multiplier, 1)?;
                }
                (published, model_bytes) = prepare::publish(&master)?;
            }
            None => tracing::warn!(round, "the strategy produced no update: the model is unchanged"),
        }
        let epsilon =
            if accountant.rdp().iter().all(|&r| r == 0.0) { 0.0 } else { accountant.epsilon(exp.privacy.delta)?.0 };
        let metrics = prepare::evaluate(prepared, &published)?;
        tracing::info!(
            round,
            clients,
            train_loss,
            perplexity = metrics.perplexity,
            top1 = metrics.top1,
            epsilon,
            "round done"
        );
        rounds.push(RoundMetrics {
            round,
            clients,
            train_loss,
            test_loss: metrics.mean_nll,
            test_perplexity: metrics.perplexity,
            top1: metrics.top1,
            top3: metrics.top3,
            epsilon,
            bytes_up_per_client: bytes_up as u64,
            bytes_down_per_client: (down / members.len().max(1)) as u64,
            wall_seconds: t0.elapsed().as_secs_f64(),
        });
    }

    let mut notes = Vec::new();
    if !exp.report.sample_prompt.is_empty() {
        let text = prepare::sample(prepared, &published, &exp.report.sample_prompt, exp.report.sample_bytes)?;
        notes.push(format!("sample after round {}: {}{}", exp.rounds.rounds, exp.report.sample_prompt, text));
    }
    prepare::report(prepared, Mode::InProcess, rounds, notes)
}

/// Local steps of one client: `training.steps`, times the cohort for a centralised run.
fn local_steps(prepared: &Prepared) -> usize {
    let exp = &prepared.experiment;
    let steps = exp.training.steps as usize;
    if exp.rounds.centralised { steps * exp.rounds.clients_per_round } else { steps }
}

/// The task's LoRA layout, as a device receives it.
fn lora_spec(exp: &crate::config::Experiment, a: &NamedTensors) -> Result<LoraSpec> {
    let targets = exp
        .lora
        .targets
        .iter()
        .map(|t| LoraTarget::parse(t).ok_or_else(|| SimError::config("lora.targets", format!("unknown target `{t}`"))))
        .collect::<Result<Vec<_>>>()?;
    Ok(LoraSpec {
        rank: exp.lora.rank,
        alpha: f64::from(exp.lora.alpha),
        targets,
        a_factors_sha256: covey_proto::keys::sha256(&covey_tensors::encode(a, None)?),
    })
}

fn round_bar(round: u64, rounds: u64, clients: usize) -> ProgressBar {
    let bar = ProgressBar::new(clients as u64);
    bar.set_style(
        ProgressStyle::with_template("round {msg} [{bar:30}] {pos}/{len} clients ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(format!("{round}/{rounds}"));
    bar
}

/// What every client of a round trains from.
struct RoundJob<'a> {
    prepared: &'a Prepared,
    published: &'a NamedTensors,
    a: &'a NamedTensors,
    lora: &'a LoraSpec,
    training: &'a TrainingSpec,
    privacy: PrivacySpec,
    round: u64,
}

/// Train the cohort's clients, `rounds.parallel` at a time; outcomes in cohort order,
/// `None` for a client that could not train (too little text: a drop-out).
fn train_cohort(job: &RoundJob<'_>, members: &[usize], bar: Option<&ProgressBar>) -> Result<Vec<Option<Outcome>>> {
    let prepared = job.prepared;
    let exp = &prepared.experiment;
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<Option<Outcome>>>>> = Mutex::new((0..members.len()).map(|_| None).collect());
    let workers = exp.rounds.parallel.min(members.len()).max(1);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= members.len() {
                        break;
                    }
                    let client = &prepared.dataset.clients[members[i]];
                    let outcome = train_client(job, client);
                    let failed = outcome.is_err();
                    if let Ok(mut r) = results.lock() {
                        r[i] = Some(outcome);
                    }
                    if let Some(bar) = bar {
                        bar.inc(1);
                    }
                    if failed {
                        // Stop handing out work; the error is reported below.
                        next.store(members.len(), Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let results = results.into_inner().map_err(|_| SimError::Data("a training thread panicked".into()))?;
    results.into_iter().map(|r| r.unwrap_or(Ok(None))).collect::<Result<Vec<_>>>()
}

/// One virtual client's round, as a device agent runs it.
fn train_client(job: &RoundJob<'_>, client: &ClientData) -> Result<Option<Outcome>> {
    let RoundJob { prepared, published, a, lora, training, privacy, round } = *job;
    let exp = &prepared.experiment;
    let device_id = covey_proto::keys::sha256(client.id.as_bytes());
    let spec = covey_agent::train::spec_for(lora, training, exp.rounds.training_threads, 0, &device_id);
    let device = covey_model::cpu_device();
    let result = match covey_model::train_local_adapter(
        &prepared.config,
        published,
        a,
        &Tokenizer::Bytes,
        &client.train,
        &spec,
        &device,
        None,
        |_| {},
    ) {
        Ok(r) => r,
        Err(e @ covey_model::ModelError::EmptyCorpus { .. }) => {
            tracing::warn!(client = %client.id, error = %e, "client drops out: too little text");
            return Ok(None);
        }
        Err(e) => return Err(SimError::Client { client: client.id.clone(), reason: e.to_string() }),
    };
    let mut rng = SecureRng::from_seed(seed_bytes(exp.seed, &client.id, round));
    let private = PrivateUpdate::with_rng(result.b, privacy, &mut rng)?;
    let within_clip = private.within_clip();
    let delta = private.tensors().clone();
    let bytes_up = covey_tensors::encode(&delta, None)?.len() + UPDATE_OVERHEAD_BYTES;
    Ok(Some(Outcome {
        update: ClientUpdate { client: client.id.clone(), num_examples: result.examples, delta, within_clip },
        loss_last: result.loss_last,
        bytes_up,
    }))
}
