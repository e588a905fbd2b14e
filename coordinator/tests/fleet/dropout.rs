//! With paused tokio time (no real sleeps): one of four devices vanishes mid-round; the
//! round closes at its deadline with the minimum and publishes.

use std::sync::Arc;
use std::time::Duration;

use covey_coordinator::CoordinatorConfig;
use covey_coordinator::artifacts::Artifacts;
use covey_coordinator::engine::{Coordinator, PollOutcome, SignedTask};
use covey_coordinator::metrics::Metrics;
use covey_coordinator::store::{MemoryStore, RoundState, Store};
use covey_proto::keys::KeyPair;
use covey_proto::pb;
use covey_proto::signing::DeviceMethod;

use crate::support::{self, Device};

/// An in-memory coordinator (no thread leaves the runtime) with four enrolled devices.
async fn engine(config: CoordinatorConfig) -> (Arc<Coordinator>, Arc<dyn Store>, [u8; 32], Vec<Device>) {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let key = KeyPair::generate().expect("key");
    let public = key.public_key();
    let engine = Coordinator::open(config, store.clone(), Artifacts::memory(), key, Arc::new(Metrics::default()))
        .await
        .expect("engine");
    let devices: Vec<Device> = (0..4).map(|_| Device::new()).collect();
    for d in &devices {
        engine.enroll(&d.key.public_key(), support::TOKEN, "d").await.expect("enroll");
    }
    (engine, store, public, devices)
}

/// Poll until the device has a task.
async fn task_for(engine: &Coordinator, d: &Device) -> SignedTask {
    loop {
        let auth = d.auth(DeviceMethod::Poll, engine.now_ms());
        match engine.poll(&auth.device_id, auth.timestamp_ms, &auth.signature).await.expect("poll") {
            PollOutcome::Task(t) => return *t,
            PollOutcome::Wait { retry_after, .. } => tokio::time::sleep(retry_after).await,
        }
    }
}

/// The protobuf task, as a device receives it.
fn as_pb(t: &SignedTask) -> pb::Task {
    covey_coordinator::service::task_message(t)
}

#[tokio::test(start_paused = true)]
async fn a_vanished_device_does_not_block_the_round() {
    let root = tempfile::tempdir().expect("tmp");
    let config = support::config(root.path());
    let deadline = config.rounds.deadline;
    let (engine, store, _, devices) = engine(config).await;
    let driver = tokio::spawn(engine.clone().run_rounds());
    let started = tokio::time::Instant::now();

    // Every device gets its task (the driver opens the round within a poll interval).
    let mut tasks = Vec::new();
    for d in &devices {
        tasks.push(task_for(&engine, d).await);
    }
    assert!(tasks.iter().all(|t| t.binding.round_id == 1));

    // Three devices deliver; the fourth vanishes.
    for (d, t) in devices.iter().zip(&tasks).take(3) {
        let (h, s, p) = d.update(&as_pb(t), &support::delta(3));
        engine.accept_update(&h.to_bytes(), &s, &p, 1.0).await.expect("accepted");
    }
    assert_eq!(store.active_round().await.expect("round").expect("open").state, RoundState::Collecting);

    // Half-way to the deadline the round is still collecting.
    tokio::time::sleep(deadline / 2).await;
    assert_eq!(store.active_round().await.expect("round").map(|r| r.id), Some(1));

    // After the deadline it has published with the three updates.
    tokio::time::sleep(deadline / 2 + Duration::from_secs(1)).await;
    let rounds = store.rounds(10).await.expect("rounds");
    let r1 = rounds.iter().find(|r| r.id == 1).expect("round 1");
    assert_eq!(r1.state, RoundState::Published, "{r1:?}");
    assert_eq!(store.update_count(1).await.expect("count"), 3);
    assert_eq!(store.current_version().await.expect("version"), 2);
    assert!(started.elapsed() >= deadline, "closed at the deadline, not before");
    driver.abort();
}

#[tokio::test(start_paused = true)]
async fn too_few_updates_fail_the_round_at_the_deadline() {
    let root = tempfile::tempdir().expect("tmp");
    let config = support::config(root.path());
    let deadline = config.rounds.deadline;
    let (engine, store, _, _devices) = engine(config).await;
    let driver = tokio::spawn(engine.clone().run_rounds());
    tokio::time::sleep(deadline + Duration::from_secs(5)).await;
    let rounds = store.rounds(10).await.expect("rounds");
    let r1 = rounds.iter().find(|r| r.id == 1).expect("round 1");
    assert_eq!(r1.state, RoundState::Failed);
    assert!(r1.failure.contains("0 of the 3"), "{}", r1.failure);
    assert_eq!(store.current_version().await.expect("version"), 1, "nothing published");
    driver.abort();
}

#[tokio::test(start_paused = true)]
async fn central_dp_is_accounted_in_the_published_manifest() {
    let root = tempfile::tempdir().expect("tmp");
    let mut config = support::config(root.path());
    config.privacy.delta = 1e-5;
    config.privacy.central =
        Some(covey_strategy::DpConfig::fed_avg(1.0, covey_strategy::ClipConfig::Fixed { norm: 0.5 }));
    let (engine, store, public, devices) = engine(config).await;
    let driver = tokio::spawn(engine.clone().run_rounds());
    for d in &devices {
        let t = task_for(&engine, d).await;
        assert_eq!(t.binding.clip_norm, 0.5, "devices clip to the DP-FedAvg clip norm");
        // The device clips to C before signing.
        let mut delta = support::delta(5);
        let scale = (0.4 / covey_tensors::global_norm(&delta)) as f32;
        delta.values_mut().for_each(|t| t.data.iter_mut().for_each(|x| *x *= scale));
        let (h, s, p) = d.update(&as_pb(&t), &delta);
        engine.accept_update(&h.to_bytes(), &s, &p, 1.0).await.expect("accepted");
    }
    for _ in 0..100 {
        if store.current_version().await.expect("version") == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let v = store.version(2).await.expect("version").expect("published");
    let m = covey_proto::manifest::Manifest::verify(&v.manifest, &v.signature, &public).expect("signed");
    // The cohort was drawn from the 4 eligible devices with q = 4 / 4: no amplification.
    let (expected, _) = covey_privacy::rdp::epsilon(1.0, 1.0, 1, 1e-5).expect("epsilon");
    assert_eq!(m.privacy.accountant, "rdp-subsampled-gaussian");
    assert_eq!(m.privacy.rounds, 1);
    assert!((m.privacy.epsilon - expected).abs() < 1e-9, "{} vs {expected}", m.privacy.epsilon);
    assert!((engine.epsilon().await.expect("epsilon") - expected).abs() < 1e-9);
    driver.abort();
}

/// A coordinator that stopped after closing a round to uploads but before publishing
/// (state `aggregating`) publishes it when it starts again on the same state.
#[tokio::test(start_paused = true)]
async fn a_round_left_aggregating_is_published_after_a_restart() {
    let root = tempfile::tempdir().expect("tmp");
    let config = support::config(root.path());
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let artifacts = Artifacts::memory();
    let key = KeyPair::generate().expect("key");
    let pkcs8 = key.pkcs8().to_vec();
    let first = Coordinator::open(config.clone(), store.clone(), artifacts.clone(), key, Arc::new(Metrics::default()))
        .await
        .expect("engine");
    let devices: Vec<Device> = (0..4).map(|_| Device::new()).collect();
    for d in &devices {
        first.enroll(&d.key.public_key(), support::TOKEN, "d").await.expect("enroll");
    }
    let round = first.open_round().await.expect("open").round().expect("a round");
    for d in &devices {
        let t = task_for(&first, d).await;
        let (h, s, p) = d.update(&as_pb(&t), &support::delta(7));
        first.accept_update(&h.to_bytes(), &s, &p, 1.0).await.expect("accepted");
    }
    // The "crash": the round was moved to aggregating, nothing was published.
    store.set_round_state(round.id, RoundState::Aggregating, "").await.expect("state");
    drop(first);

    let second = Coordinator::open(
        config,
        store.clone(),
        artifacts,
        KeyPair::from_pkcs8(&pkcs8).expect("same key"),
        Arc::new(Metrics::default()),
    )
    .await
    .expect("restart");
    let active = store.active_round().await.expect("active").expect("the round is still there");
    assert_eq!(active.state, RoundState::Aggregating);
    second.drive(active).await.expect("drive");
    let r = store.rounds(1).await.expect("rounds").remove(0);
    assert_eq!((r.state, r.published_version), (RoundState::Published, 2));
    assert_eq!(store.update_count(round.id).await.expect("count"), 4);
}
