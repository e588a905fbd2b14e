//! The in-process runner: virtual clients trained in parallel on this machine's cores,
//! aggregated by the coordinator's strategy code.
//!
//! Each round is the coordinator's round: its round policy (`covey_coordinator::round`)
//! samples the cohort (Poisson at q = clients-per-round / population, keyed from the
//! seed) and plans the round (the strategy's clip norm and proximal term, the training
//! seed) into the very tasks a coordinator would issue; every client trains its task
//! exactly as a device agent does (`covey_agent::train::spec_for` →
//! `covey_model::train_local_adapter` on the published int8 model with the coordinator's
//! frozen `A`, then `covey_agent::update::PrivateUpdate` clips and noises `B`), aggregate
//! the updates in cohort order with the strategy (central DP included), merge into the
//! f32 master (`covey_coordinator::weights::merge_step`), the policy says what the round
//! spends in privacy, the model is published int8 and the published version evaluated.
//!
//! Memory is bounded by the clients training at once (`rounds.parallel` models) plus
//! the cohort's `B` factors, never by the population. A fixed seed gives the same
//! metrics: cohorts, batches, noise and aggregation order depend only on it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use covey_agent::update::PrivateUpdate;
use covey_coordinator::round::{PrivacyRecord, RoundFrame, RoundPolicy, privacy_spent};
use covey_coordinator::{CoordinatorConfig, weights};
use covey_model::{LocalRound, NamedTensors};
use covey_privacy::SecureRng;
use covey_proto::task::Task;
use covey_strategy::{ClientUpdate, Strategy};

use crate::attack::Attack;
use crate::config::Mode;
use crate::dataset::ClientData;
use crate::error::{Result, SimError};
use crate::prepare::{self, Prepared, seed_bytes};
use crate::progress::Progress;
use crate::report::{Report, RoundMetrics};

/// Bytes of the signed header and signature sent with every update (the wire format of
/// `covey_proto::signing`).
pub const UPDATE_OVERHEAD_BYTES: usize = covey_proto::signing::UPDATE_HEADER_LEN + 64;

/// What one virtual client produced in a round.
#[derive(Debug)]
pub struct Outcome {
    /// The update as the strategy receives it (clipped and noised as the task says).
    pub update: ClientUpdate,
    /// Training loss of the last step.
    pub loss_last: f32,
    /// Bytes the update would take on the wire.
    pub bytes_up: usize,
}

/// One round run in process.
#[derive(Debug)]
pub struct RoundOutcome {
    /// Indices of the clients sampled, in population order.
    pub members: Vec<usize>,
    /// Their tasks, as the coordinator's round policy issues them.
    pub tasks: Vec<Task>,
    /// Clients whose update was aggregated.
    pub clients: usize,
    /// Mean training loss of those clients, weighted by examples (NaN: none).
    pub train_loss: f64,
    /// Mean upload per client, bytes.
    pub bytes_up: usize,
    /// Mean download per sampled client, bytes (the model; the `A` factors once).
    pub bytes_down: usize,
}

/// The in-process federation: the coordinator's round policy, strategy, merge and
/// accountant over virtual clients, one round at a time.
pub struct InProcess<'a> {
    prepared: &'a Prepared,
    config: CoordinatorConfig,
    strategy: Box<dyn Strategy>,
    events: Vec<PrivacyRecord>,
    master: NamedTensors,
    published: NamedTensors,
    model_bytes: usize,
    a: NamedTensors,
    a_hash: [u8; 32],
    a_bytes: usize,
    seen: Vec<bool>,
    /// Per client: accepted updates, and the round of the latest (participation limits).
    contributions: Vec<(u64, Option<u64>)>,
    /// Clients whose update is given, not trained (the audit's canaries), by client id.
    crafted: BTreeMap<String, NamedTensors>,
    /// Byzantine updates that reached the strategy, and updates the intake refused.
    attack_delivered: u64,
    refused: u64,
    /// The step the last round applied to the adapter (what the version releases).
    last_step: Option<NamedTensors>,
}

impl<'a> InProcess<'a> {
    /// Before round 1: the base model published (int8), the `A` factors issued, the
    /// strategy seeded from the experiment's seed.
    pub fn new(prepared: &'a Prepared) -> Result<Self> {
        let config = prepared.fleet_config();
        let master = prepared.master.clone();
        let a = weights::a_factors(&master, &config.lora);
        let a_encoded = covey_tensors::encode(&a, None)?;
        let strategy = covey_strategy::build(
            &config.strategy,
            config.privacy.effective_central().as_ref(),
            covey_strategy::Randomness::Seeded(seed_bytes(prepared.experiment.seed, "strategy", 0)),
        )?;
        let (published, model_bytes) = prepare::publish(&master)?;
        Ok(Self {
            prepared,
            strategy,
            events: Vec::new(),
            master,
            published,
            model_bytes,
            a_hash: covey_proto::keys::sha256(&a_encoded),
            a_bytes: a_encoded.len(),
            a,
            seen: vec![false; prepared.population()],
            contributions: vec![(0, None); prepared.population()],
            crafted: BTreeMap::new(),
            attack_delivered: 0,
            refused: 0,
            last_step: None,
            config,
        })
    }

    /// The weights devices hold now (the last version, int8, decoded).
    pub fn published(&self) -> &NamedTensors {
        &self.published
    }

    /// The f32 master weights now.
    pub fn master(&self) -> &NamedTensors {
        &self.master
    }

    /// The privacy report so far (ε at the experiment's δ, mechanism, assumption, bound).
    pub fn privacy(&self) -> Result<covey_proto::manifest::PrivacySpent> {
        let most = self.contributions.iter().map(|c| c.0).max().unwrap_or(0);
        Ok(privacy_spent(&self.config, &self.events, most)?)
    }

    /// Give client `id` the update `b` (its `B` factors, before the device's clip and
    /// noise) instead of training it: the audit's canary clients.
    pub fn craft(&mut self, id: &str, b: NamedTensors) {
        self.crafted.insert(id.to_owned(), b);
    }

    /// Byzantine updates that reached the strategy, and updates the intake refused, so far.
    pub fn attack_counts(&self) -> (u64, u64) {
        (self.attack_delivered, self.refused)
    }

    /// The `B` step the last round applied (`None` before round 1 or after a round
    /// without an update).
    pub fn last_step(&self) -> Option<&NamedTensors> {
        self.last_step.as_ref()
    }

    /// ε spent so far at the experiment's δ.
    pub fn epsilon(&self) -> Result<f64> {
        Ok(self.privacy()?.epsilon)
    }

    /// Run round `round`: the policy samples the cohort and plans the round, every
    /// sampled client trains its task as a device would, the strategy aggregates in
    /// cohort order, the step is merged, the release accounted and the model published.
    pub fn round(&mut self, round: u64, progress: &dyn Progress) -> Result<RoundOutcome> {
        let policy = RoundPolicy::new(&self.config);
        // Clients over their participation limits are not sampled (as the coordinator does).
        let limits = self.config.privacy.participation;
        let eligible: Vec<usize> = (0..self.prepared.population())
            .filter(|&m| limits.allows(self.contributions[m].0, self.contributions[m].1, round))
            .collect();
        if eligible.is_empty() && limits != Default::default() {
            // As a coordinator waits: no client may contribute again; the model stays.
            tracing::warn!(round, "every client is at its participation limits: the round trains nothing");
            self.last_step = None;
            return Ok(RoundOutcome {
                members: Vec::new(),
                tasks: Vec::new(),
                clients: 0,
                train_loss: f64::NAN,
                bytes_up: 0,
                bytes_down: 0,
            });
        }
        let sampling = policy
            .sampling_among(self.prepared.population(), eligible.len())
            .map_err(|no| SimError::Data(format!("round {round} cannot open: {no:?}")))?;
        let members: Vec<usize> =
            policy.cohort(round, eligible.len(), &sampling)?.into_iter().map(|i| eligible[i]).collect();
        let frame = RoundFrame {
            round_id: round,
            base_version: round,
            base_manifest_hash: [0; 32],
            a_factors_sha256: self.a_hash,
            deadline_ms: 0,
            max_payload_bytes: 0,
        };
        let plan = policy.plan(&frame, &sampling, &mut *self.strategy);
        let tasks: Vec<Task> = members.iter().map(|&m| plan.task(task_id(m), [0; 32])).collect();
        let job = RoundJob { prepared: self.prepared, published: &self.published, a: &self.a, round };
        let trained: Vec<usize> = (0..members.len())
            .filter(|&i| !self.crafted.contains_key(&self.prepared.dataset.clients[members[i]].id))
            .collect();
        let trained_members: Vec<usize> = trained.iter().map(|&i| members[i]).collect();
        let trained_tasks: Vec<Task> = trained.iter().map(|&i| tasks[i].clone()).collect();
        let mut trained_outcomes = train_cohort(&job, &trained_members, &trained_tasks, progress)?.into_iter();
        let mut outcomes = Vec::with_capacity(members.len());
        for (i, &m) in members.iter().enumerate() {
            let client = &self.prepared.dataset.clients[m];
            match self.crafted.get(&client.id) {
                Some(b) => outcomes.push(Some(given_update(&job, client, &tasks[i], b.clone())?)),
                None => outcomes.push(trained_outcomes.next().flatten()),
            }
        }

        // Byzantine clients corrupt their update; the intake refuses what the coordinator
        // would (non-finite values, a norm above the round's bound).
        let values: usize = covey_coordinator::weights::expected_b_shapes(&self.master, &self.config.lora)
            .values()
            .map(|s| s.iter().product::<usize>())
            .sum();
        let bound = covey_coordinator::round::update_norm_bound(&self.config, &plan, values);
        if let Some(attack) = &self.prepared.experiment.attack {
            let mut rng = SecureRng::from_seed(seed_bytes(self.prepared.experiment.seed, "attack", round));
            for (o, &m) in outcomes.iter_mut().zip(&members) {
                if let Some(o) = o.as_mut()
                    && self.prepared.attackers.contains(&m)
                {
                    o.update.delta = attack.corrupt(&o.update.delta, bound, &mut rng);
                    // The forged update travels in the round's encoding too. Only non-finite
                    // values fail to encode; those stay as they are and are refused below.
                    let mut rounding = [0u8; 32];
                    rng.fill_bytes(&mut rounding);
                    let encoding = plan.training.update_encoding;
                    if let Ok((d, _)) = covey_tensors::compress::encode_update(
                        &o.update.delta,
                        encoding,
                        rounding,
                        plan.privacy.clip_norm,
                    )
                    .and_then(|p| covey_tensors::compress::decode_update(&p))
                    {
                        o.update.delta = d;
                    }
                }
            }
        }
        for (o, &m) in outcomes.iter_mut().zip(&members) {
            let refuse = o.as_ref().is_some_and(|o| {
                let finite = o.update.delta.values().all(|t| t.is_finite());
                let norm = covey_tensors::global_norm(&o.update.delta);
                !finite || bound.is_some_and(|b| norm > b)
            });
            if refuse {
                *o = None;
                self.refused += 1;
            } else if o.is_some() && self.prepared.attackers.contains(&m) {
                self.attack_delivered += 1;
            }
        }

        let mut down = 0usize;
        for &m in &members {
            down += self.model_bytes + if self.seen[m] { 0 } else { self.a_bytes };
            self.seen[m] = true;
        }
        for (&m, o) in members.iter().zip(&outcomes) {
            if o.is_some() {
                self.contributions[m] = (self.contributions[m].0 + 1, Some(round));
            }
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
        match self.strategy.aggregate(&sampling.context(round), &mut updates, failures)? {
            Some(aggregate) => {
                self.master = weights::merge_step(&self.master, &self.a, &aggregate.step, &self.config.lora)?;
                self.last_step = Some(aggregate.step.clone());
                self.events.extend(policy.privacy_event(&plan, &sampling, aggregate.privacy.as_ref()));
                (self.published, self.model_bytes) = prepare::publish(&self.master)?;
            }
            None => {
                self.last_step = None;
                tracing::warn!(round, "the strategy produced no update: the model is unchanged");
            }
        }
        let bytes_down = down / members.len().max(1);
        Ok(RoundOutcome { members, tasks, clients, train_loss, bytes_up, bytes_down })
    }
}

/// The task id of client `m` in simulations (they are not signed).
fn task_id(m: usize) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[8..].copy_from_slice(&(m as u64).to_be_bytes());
    id
}

/// Run a prepared experiment in this process; `progress` hears of each client trained
/// and each round done.
pub fn run(prepared: &Prepared, progress: &dyn Progress) -> Result<Report> {
    let exp = &prepared.experiment;
    let mut sim = InProcess::new(prepared)?;
    let started = Instant::now();
    let base = prepare::evaluate(prepared, sim.published())?;
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
    // Personalisation scores every evaluated device with the base model now, and with
    // the global and personal models after the last round.
    let devices = crate::personal::devices(prepared);
    let base_scores = match &exp.personalisation {
        Some(_) => crate::personal::score(prepared, sim.published(), &devices)?,
        None => Vec::new(),
    };

    for round in 1..=exp.rounds.rounds {
        let t0 = Instant::now();
        let out = sim.round(round, progress)?;
        let epsilon = sim.epsilon()?;
        let metrics = prepare::evaluate(prepared, sim.published())?;
        let m = RoundMetrics {
            round,
            clients: out.clients,
            train_loss: out.train_loss,
            test_loss: metrics.mean_nll,
            test_perplexity: metrics.perplexity,
            top1: metrics.top1,
            top3: metrics.top3,
            epsilon,
            bytes_up_per_client: out.bytes_up as u64,
            bytes_down_per_client: out.bytes_down as u64,
            wall_seconds: t0.elapsed().as_secs_f64(),
        };
        progress.round_done(&m, exp.rounds.rounds);
        rounds.push(m);
    }

    let mut notes = Vec::new();
    if !exp.report.sample_prompt.is_empty() {
        let text = prepare::sample(prepared, sim.published(), &exp.report.sample_prompt, exp.report.sample_bytes)?;
        notes.push(format!("sample after round {}: {}{}", exp.rounds.rounds, exp.report.sample_prompt, text));
    }
    let mut report = prepare::report(prepared, Mode::InProcess, rounds, notes)?;
    if let Some(cfg) = &exp.personalisation {
        let personal = crate::personal::personalise(prepared, cfg, &devices, &base_scores, sim.published())?;
        tracing::debug!("{}", crate::personal::table(&personal));
        report.personalisation = Some(personal);
    }
    if let Some(attack) = &exp.attack {
        let backdoor_success = match attack.kind {
            crate::attack::AttackKind::Backdoor => {
                let text = prepare::sample(prepared, sim.published(), &attack.trigger, attack.target.len())?;
                Some(crate::attack::match_share(&text, &attack.target))
            }
            _ => None,
        };
        let (delivered, refused) = sim.attack_counts();
        report.attack = Some(crate::attack::AttackSummary {
            kind: attack.kind,
            attackers: prepared.attackers.len(),
            delivered,
            refused,
            backdoor_success,
        });
    }
    Ok(report)
}

/// What every client of a round trains from.
pub struct RoundJob<'a> {
    /// The experiment.
    pub prepared: &'a Prepared,
    /// The weights devices hold (int8, decoded).
    pub published: &'a NamedTensors,
    /// The frozen `A` factors.
    pub a: &'a NamedTensors,
    /// The round (keys the local noise).
    pub round: u64,
}

/// Train the cohort's clients, `rounds.parallel` at a time, each on its task; outcomes in
/// cohort order, `None` for a client that could not train (too little text: a drop-out).
fn train_cohort(
    job: &RoundJob<'_>,
    members: &[usize],
    tasks: &[Task],
    progress: &dyn Progress,
) -> Result<Vec<Option<Outcome>>> {
    let prepared = job.prepared;
    let done = AtomicUsize::new(0);
    crate::parallel::map_in_order(members, prepared.experiment.rounds.parallel, "training a cohort", |i, &m| {
        let outcome = train_task(job, &prepared.dataset.clients[m], &tasks[i]);
        progress.client_done(job.round, done.fetch_add(1, Ordering::Relaxed) + 1, members.len());
        outcome
    })
}

/// A client whose update is given (`b`, before the device's privacy step), as the audit's
/// canaries: clipped and noised as the task says, like a trained one.
fn given_update(job: &RoundJob<'_>, client: &ClientData, task: &Task, b: NamedTensors) -> Result<Outcome> {
    let mut rng = SecureRng::from_seed(seed_bytes(job.prepared.experiment.seed, &client.id, job.round));
    let private = PrivateUpdate::with_rng(b, task.privacy, &mut rng)?;
    let within_clip = private.within_clip();
    let (delta, bytes_up) = as_uploaded(&private, task, &mut rng)?;
    let examples = (task.training.steps * task.training.batch_size) as u64;
    Ok(Outcome {
        update: ClientUpdate { client: client.id.clone(), num_examples: examples, delta, within_clip },
        loss_last: 0.0,
        bytes_up,
    })
}

/// The update as the coordinator decodes it, and the bytes sent: the private update
/// encoded as the task says (f32, or int8 / int4 by stochastic rounding keyed from the
/// client's generator), then decoded.
fn as_uploaded(private: &PrivateUpdate, task: &Task, rng: &mut SecureRng) -> Result<(NamedTensors, usize)> {
    let mut rounding = [0u8; 32];
    rng.fill_bytes(&mut rounding);
    let payload = covey_tensors::compress::encode_update(
        private.tensors(),
        task.training.update_encoding,
        rounding,
        task.privacy.clip_norm,
    )?;
    let (delta, _) = covey_tensors::compress::decode_update(&payload)?;
    Ok((delta, payload.len() + UPDATE_OVERHEAD_BYTES))
}

/// One virtual client's round, as a device agent runs it: train `task` on the client's
/// text from the published weights, then clip and noise `B` as the task says (the noise
/// keyed from the experiment's seed, the client and the round). `None`: the client has
/// too little text and drops out.
pub fn train_task(job: &RoundJob<'_>, client: &ClientData, task: &Task) -> Result<Option<Outcome>> {
    let RoundJob { prepared, published, a, round } = *job;
    let exp = &prepared.experiment;
    let device_id = covey_proto::keys::sha256(client.id.as_bytes());
    let spec = covey_model::LocalTrainSpec {
        example_dp: exp.rounds.example_dp,
        ..covey_agent::train::spec_for(&task.lora, &task.training, exp.rounds.training_threads, 0, &device_id)
    };
    let device = covey_model::cpu_device();
    let local = LocalRound {
        config: &prepared.config,
        base: covey_model::RoundBase::Tensors(std::borrow::Cow::Borrowed(published)),
        adapter: None,
        a,
        tokenizer: &prepared.tokenizer,
        corpus: &client.train,
        chats: &[],
        chat_format: None,
    };
    let trained = match spec.example_dp {
        None => covey_model::train_local_adapter(local, &spec, &device, None, |_| {}),
        Some(_) => {
            // The local DP-SGD noise, keyed apart from the update's noise below.
            let key = seed_bytes(exp.seed, &format!("example-dp/{}", client.id), round);
            let mut noise = covey_agent::train::SecureNoise(SecureRng::from_seed(key));
            covey_model::train_local_adapter_private(local, &spec, None, |_| {}, &mut noise)
        }
    };
    let result = match trained {
        Ok(r) => r,
        Err(e @ covey_model::ModelError::EmptyCorpus { .. }) => {
            tracing::warn!(client = %client.id, error = %e, "client drops out: too little text");
            return Ok(None);
        }
        Err(e) => return Err(SimError::Client { client: client.id.clone(), reason: e.to_string() }),
    };
    let mut rng = SecureRng::from_seed(seed_bytes(exp.seed, &client.id, round));
    let private = PrivateUpdate::with_rng(result.b, task.privacy, &mut rng)?;
    let within_clip = private.within_clip();
    let (delta, bytes_up) = as_uploaded(&private, task, &mut rng)?;
    Ok(Some(Outcome {
        update: ClientUpdate { client: client.id.clone(), num_examples: result.examples, delta, within_clip },
        loss_last: result.loss_last,
        bytes_up,
    }))
}
