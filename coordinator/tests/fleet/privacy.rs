//! DP-FTRL and participation limits, in process (memory store, paused clock): devices over
//! their limits get no task and their uploads are refused; every manifest carries the
//! privacy report the participation bound implies.

use std::collections::BTreeMap;
use std::sync::Arc;

use covey_coordinator::artifacts::Artifacts;
use covey_coordinator::config::ParticipationLimits;
use covey_coordinator::engine::{Coordinator, PollOutcome, SignedTask};
use covey_coordinator::metrics::Metrics;
use covey_coordinator::store::{MemoryStore, RoundState, Store};
use covey_coordinator::{CoordinatorConfig, CoordinatorError, Rejection};
use covey_privacy::Accountant;
use covey_proto::keys::KeyPair;
use covey_proto::manifest::Manifest;
use covey_proto::signing::DeviceMethod;

use crate::support::{self, Device};

async fn open(config: CoordinatorConfig, store: Arc<dyn Store>, artifacts: &Artifacts, key: &[u8]) -> Arc<Coordinator> {
    Coordinator::open(
        config,
        store,
        artifacts.clone(),
        KeyPair::from_pkcs8(key).expect("key"),
        Arc::new(Metrics::default()),
    )
    .await
    .expect("engine")
}

/// The task a device gets when it polls once (`None`: told to wait).
async fn poll_once(engine: &Coordinator, d: &Device) -> Option<SignedTask> {
    let auth = d.auth(DeviceMethod::Poll, engine.now_ms());
    match engine.poll(&auth.device_id, auth.timestamp_ms, &auth.signature).await.expect("poll") {
        PollOutcome::Task(t) => Some(*t),
        PollOutcome::Wait { .. } => None,
    }
}

async fn upload(engine: &Coordinator, d: &Device, t: &SignedTask, seed: u32) -> covey_coordinator::Result<(u64, u64)> {
    // Clipped to 0.4 < C = 0.5 before signing, as a device does.
    let mut delta = support::delta(seed);
    let scale = (0.4 / covey_tensors::global_norm(&delta)) as f32;
    delta.values_mut().for_each(|t| t.data.iter_mut().for_each(|x| *x *= scale));
    let (h, s, p) = d.update(&covey_coordinator::service::task_message(t), &delta);
    engine.accept_update(&h.to_bytes(), &s, &p, 1.0).await
}

fn ftrl_config(root: &std::path::Path) -> CoordinatorConfig {
    let mut c = support::config(root);
    c.privacy.delta = 1e-5;
    c.privacy.central = Some(covey_strategy::DpConfig {
        clip: covey_strategy::ClipConfig::Fixed { norm: 0.5 },
        tree_period: None,
        ..covey_strategy::DpConfig::ftrl(1.5, 0.5, 0)
    });
    c.privacy.participation = ParticipationLimits { min_separation: 2, max_participations: 2 };
    c.rounds.target_updates = 3;
    c.rounds.min_updates = 1;
    c.rounds.min_available = 1;
    c.rounds.max_rounds = 6;
    c.rounds.seed = Some(11);
    c
}

#[tokio::test(start_paused = true)]
async fn dp_ftrl_rounds_respect_the_limits_and_report_their_bound() {
    let root = tempfile::tempdir().expect("tmp");
    let config = ftrl_config(root.path());
    config.validate().expect("valid");
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let key = KeyPair::generate().expect("key");
    let public = key.public_key();
    let engine = open(config.clone(), store.clone(), &Artifacts::memory(), key.pkcs8()).await;
    let devices: Vec<Device> = (0..6).map(|_| Device::new()).collect();
    for d in &devices {
        engine.enroll(&d.key.public_key(), support::TOKEN, "d").await.expect("enroll");
    }
    // Per device (by index): the rounds it contributed to.
    let mut contributed: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
    let mut published = 0;
    while published < 6 {
        let Some(round) = engine.open_round().await.expect("open").round() else {
            break; // every device at its limits: no round can open
        };
        for (i, d) in devices.iter().enumerate() {
            let Some(t) = poll_once(&engine, d).await else { continue };
            assert_eq!(t.binding.round_id, round.id);
            let mine = contributed.entry(i).or_default();
            if let Some(&last) = mine.last() {
                assert!(round.id >= last + 2, "device {i} tasked in round {} after {last}", round.id);
            }
            assert!(mine.len() < 2, "device {i} tasked a third time");
            upload(&engine, d, &t, round.id as u32).await.expect("accepted");
            mine.push(round.id);
        }
        engine.drive(round).await.expect("drive");
        let r = store.rounds(1).await.expect("rounds").remove(0);
        if r.state == RoundState::Published {
            published += 1;
        }
    }
    assert!(published >= 3, "only {published} rounds published");
    let most = contributed.values().map(Vec::len).max().expect("someone contributed") as u64;
    assert!((1..=2).contains(&most));

    let depth = f64::from(covey_privacy::tree::depth(2));
    let eps = |k: u64| Accountant::Rdp.epsilon_without_sampling(1.5, k as f64 * depth, 1e-5).expect("eps");
    let latest = store.versions().await.expect("versions").remove(0);
    let m = Manifest::verify(&latest.manifest, &latest.signature, &public).expect("signed");
    assert_eq!((m.privacy.mechanism.as_str(), m.privacy.assumption.as_str()), ("dp-ftrl", "participation-limits"));
    assert_eq!((m.privacy.max_participations, m.privacy.min_separation), (2, 2));
    assert_eq!(m.privacy.epsilon, eps(most), "ε follows the most contributions of one device");
    assert_eq!(m.privacy.epsilon_bound, Some(eps(2)));
    assert_eq!(engine.privacy().await.expect("report"), m.privacy);
    assert_eq!(engine.max_contributions().await.expect("most"), most);
}

#[tokio::test(start_paused = true)]
async fn an_upload_over_the_limits_is_refused_and_nothing_is_stored() {
    let root = tempfile::tempdir().expect("tmp");
    // First without limits: every device is sampled in rounds 1 and 2.
    let mut loose = support::config(root.path());
    loose.rounds.min_available = 4;
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let key = KeyPair::generate().expect("key");
    let pkcs8 = key.pkcs8().to_vec();
    let artifacts = Artifacts::memory();
    let engine = open(loose.clone(), store.clone(), &artifacts, &pkcs8).await;
    let devices: Vec<Device> = (0..4).map(|_| Device::new()).collect();
    for d in &devices {
        engine.enroll(&d.key.public_key(), support::TOKEN, "d").await.expect("enroll");
    }
    let round = engine.open_round().await.expect("open").round().expect("round 1");
    for d in &devices {
        let t = poll_once(&engine, d).await.expect("task");
        upload(&engine, d, &t, 1).await.expect("accepted");
    }
    engine.drive(round).await.expect("drive");
    let round = engine.open_round().await.expect("open").round().expect("round 2");
    let mut tasks = Vec::new();
    for d in &devices {
        tasks.push(poll_once(&engine, d).await.expect("task"));
    }
    drop(engine);

    // The operator restarts with one contribution per device: the tasks already handed out
    // for round 2 can no longer be used.
    let mut strict = loose;
    strict.privacy.participation.max_participations = 1;
    let engine = open(strict, store.clone(), &artifacts, &pkcs8).await;
    for (d, t) in devices.iter().zip(&tasks) {
        match upload(&engine, d, t, 2).await {
            Err(CoordinatorError::Rejected(Rejection::ParticipationLimit { contributions: 1, last_round: 1 })) => {}
            other => panic!("expected a participation-limit refusal, got {other:?}"),
        }
    }
    assert_eq!(store.update_count(round.id).await.expect("count"), 0, "nothing stored");
    assert_eq!(store.update_count(1).await.expect("count"), 4, "round 1 is untouched");
    assert!(engine.metrics().render().contains("participation_limit"), "refusals are counted");
}

#[test]
fn limits_the_accountant_cannot_honour_are_refused_with_their_field() {
    let root = tempfile::tempdir().expect("tmp");
    let base = ftrl_config(root.path());
    let mut c = base.clone();
    c.privacy.participation.min_separation = 0;
    assert!(c.validate().expect_err("no separation").to_string().contains("min-separation"));
    let mut c = base.clone();
    c.privacy.central.as_mut().expect("central").tree_period = Some(4);
    assert!(c.validate().expect_err("tree longer than separation").to_string().contains("tree_period"));
    let mut c = base.clone();
    c.privacy.participation.max_participations = 0;
    c.rounds.max_rounds = 0;
    assert!(c.validate().expect_err("unbounded").to_string().contains("max-participations"));
    let mut c = base.clone();
    c.privacy.central.as_mut().expect("central").noise_multiplier = f64::NAN;
    assert!(c.validate().expect_err("NaN").to_string().contains("noise_multiplier"));
    let mut c = base;
    c.privacy.central.as_mut().expect("central").noise_multiplier = -1.0;
    assert!(c.validate().expect_err("negative").to_string().contains("noise_multiplier"));
}

/// The noise tree lives in the strategy state: a coordinator started again on the same
/// state continues the tree where the round before left it (the same live node seeds),
/// and the report is unchanged by the restart.
#[tokio::test(start_paused = true)]
async fn a_restarted_coordinator_continues_the_noise_tree() {
    let root = tempfile::tempdir().expect("tmp");
    let mut config = ftrl_config(root.path());
    config.privacy.participation = ParticipationLimits { min_separation: 4, max_participations: 2 };
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let artifacts = Artifacts::memory();
    let key = KeyPair::generate().expect("key");
    let pkcs8 = key.pkcs8().to_vec();
    let tree_of = |bytes: Vec<u8>| -> covey_privacy::tree::TreeState {
        let state: covey_strategy::StrategyState = serde_json::from_slice(&bytes).expect("strategy state");
        serde_json::from_str(&state.texts["tree"]).expect("tree")
    };
    let devices: Vec<Device> = (0..6).map(|_| Device::new()).collect();
    let run_round = |engine: Arc<Coordinator>| {
        let devices = &devices;
        async move {
            let round = engine.open_round().await.expect("open").round().expect("a round");
            for d in devices {
                if let Some(t) = poll_once(&engine, d).await {
                    upload(&engine, d, &t, round.id as u32).await.expect("accepted");
                }
            }
            engine.drive(round.clone()).await.expect("drive");
            round.id
        }
    };
    let first = open(config.clone(), store.clone(), &artifacts, &pkcs8).await;
    for d in &devices {
        first.enroll(&d.key.public_key(), support::TOKEN, "d").await.expect("enroll");
    }
    let r1 = run_round(first.clone()).await;
    let before = tree_of(store.get_state("strategy").await.expect("state").expect("stored"));
    assert_eq!((before.last, before.nodes.len()), (r1, 1));
    let report = first.privacy().await.expect("report");
    drop(first);

    let second = open(config, store.clone(), &artifacts, &pkcs8).await;
    assert_eq!(second.privacy().await.expect("report"), report, "the restart changes no ε");
    let r2 = run_round(second.clone()).await;
    assert_eq!(r2, r1 + 1);
    let after = tree_of(store.get_state("strategy").await.expect("state").expect("stored"));
    // Round 2 = [1, 2]: the level-1 node, fresh; the leaf of round 1 left the prefix.
    assert_eq!((after.tree, after.last), (0, 2));
    assert_eq!(after.nodes.iter().map(|n| (n.level, n.index)).collect::<Vec<_>>(), [(1, 1)]);
    assert_ne!(after.nodes[0].seed, before.nodes[0].seed);
}
