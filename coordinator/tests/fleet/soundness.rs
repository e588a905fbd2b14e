//! Trust no number a device sends: aggregation weights, the sampling rate behind ε, the
//! privacy ledger, the target ε, and operator actions that must hold.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use covey_coordinator::artifacts::Artifacts;
use covey_coordinator::engine::{Coordinator, Opening, PollOutcome, SignedTask, StoredUpdates};
use covey_coordinator::metrics::Metrics;
use covey_coordinator::round::NoRound;
use covey_coordinator::store::{
    Assignment, DeviceRecord, EnrollOutcome, MemoryStore, Participation, RevokeOutcome, RoundRecord, RoundState,
    SqliteStore, Store, TokenRecord, UpdateRecord, VersionRecord,
};
use covey_coordinator::{CoordinatorConfig, CoordinatorError, Rejection, Result};
use covey_proto::keys::KeyPair;
use covey_proto::signing::DeviceMethod;

use crate::support::{self, Device};

pub(crate) async fn open(config: CoordinatorConfig, store: Arc<dyn Store>, artifacts: Artifacts) -> Arc<Coordinator> {
    let key = KeyPair::generate().expect("key");
    Coordinator::open(config, store, artifacts, key, Arc::new(Metrics::default())).await.expect("engine")
}

pub(crate) async fn enrolled(engine: &Coordinator, n: usize) -> Vec<Device> {
    let devices: Vec<Device> = (0..n).map(|_| Device::new()).collect();
    for d in &devices {
        engine.enroll(&d.key.public_key(), support::TOKEN, "d").await.expect("enroll");
    }
    devices
}

pub(crate) async fn task_for(engine: &Coordinator, d: &Device) -> SignedTask {
    for _ in 0..1000 {
        let auth = d.auth(DeviceMethod::Poll, engine.now_ms());
        match engine.poll(&auth.device_id, auth.timestamp_ms, &auth.signature).await.expect("poll") {
            PollOutcome::Task(t) => return *t,
            PollOutcome::Wait { retry_after, .. } => tokio::time::sleep(retry_after).await,
        }
    }
    panic!("no task");
}

pub(crate) fn pb(t: &SignedTask) -> covey_proto::pb::Task {
    covey_coordinator::service::task_message(t)
}

/// C1: one device declaring 2^62 examples is refused, and the aggregate weighs every
/// update by the task's steps × batch size whatever a stored header says.
#[tokio::test(start_paused = true)]
async fn a_huge_declared_example_count_does_not_weigh_more_than_an_honest_one() {
    let root = tempfile::tempdir().expect("tmp");
    let engine = open(support::config(root.path()), Arc::new(MemoryStore::default()), Artifacts::memory()).await;
    let devices = enrolled(&engine, 4).await;
    engine.open_round().await.expect("open").round().expect("round");
    let t = task_for(&engine, &devices[0]).await;
    let (mut h, _, p) = devices[0].update(&pb(&t), &support::delta(1));
    assert_eq!(h.num_examples, engine.examples_per_update(), "honest devices declare steps × batch");
    h.num_examples = 1 << 62;
    let s = devices[0].key.sign(&h.to_bytes());
    let refused = engine.accept_update(&h.to_bytes(), &s, &p, 1.0).await;
    assert!(
        matches!(refused.as_ref().map_err(|e| e.rejection()), Err(Some(Rejection::ExamplesMismatch { found, .. })) if *found == 1 << 62),
        "{refused:?}"
    );
    assert_eq!(engine.store().update_count(1).await.expect("count"), 0);

    // A stored record that claims 2^62 (a forged row, an old database) still weighs the
    // task's steps × batch size when streamed to the strategy.
    let uploads = Artifacts::memory();
    let payload = covey_tensors::encode(&support::delta(2), None).expect("encode");
    let hash = uploads.put(&payload).expect("put");
    let mut header = h.clone();
    header.payload_sha256 = hash;
    header.payload_len = payload.len() as u64;
    let record = UpdateRecord {
        id: 1,
        round_id: 1,
        device_id: devices[0].id(),
        header: header.to_bytes(),
        signature: devices[0].key.sign(&header.to_bytes()).to_vec(),
        payload_sha256: hash,
        num_examples: 1 << 62,
        within_clip: None,
        train_loss: None,
        received_ms: 0,
    };
    let keys = HashMap::from([(devices[0].id(), (devices[0].key.public_key(), false))]);
    let records = [record];
    let streamed: Vec<_> = StoredUpdates::new(&records, &uploads, &keys, 160).collect();
    assert_eq!(streamed.len(), 1);
    assert_eq!(streamed[0].num_examples, 160);
}

/// H2: every eligible device is sampled with probability q = cohort / N, N the eligible
/// devices (or a larger configured population), and the round records that q.
#[tokio::test(start_paused = true)]
async fn cohorts_are_poisson_samples_at_the_accounted_rate() {
    let root = tempfile::tempdir().expect("tmp");
    let mut config = support::config(root.path());
    config.rounds.target_updates = 4;
    config.rounds.min_updates = 1;
    config.rounds.min_available = 1;
    config.privacy.population = 20;
    let engine = open(config.clone(), Arc::new(MemoryStore::default()), Artifacts::memory()).await;
    let devices = enrolled(&engine, 4).await;
    let rounds = 400;
    let mut included = 0usize;
    let mut sizes = std::collections::BTreeSet::new();
    for _ in 0..rounds {
        let round = match engine.open_round().await.expect("open") {
            Opening::Opened(r) => *r,
            other => panic!("{other:?}"),
        };
        assert_eq!((round.population, round.expected_cohort), (20, 4), "q = 4 / 20 is recorded with the round");
        sizes.insert(round.cohort_size);
        for d in &devices {
            included += usize::from(engine.store().assignment(round.id, &d.id()).await.expect("a").is_some());
        }
        if engine.store().active_round().await.expect("active").is_some() {
            engine.fail_round(round.id, "test").await.expect("fail");
        }
    }
    let rate = included as f64 / (rounds * devices.len()) as f64;
    // q = 0.2; the standard error over 1,600 draws is 0.01.
    assert!((rate - 0.2).abs() < 0.05, "inclusion rate {rate}, expected 0.2");
    assert!(sizes.len() >= 3, "Poisson cohorts vary in size: {sizes:?}");

    // A configured population below the eligible devices is refused.
    let mut small = config.clone();
    small.privacy.population = 2;
    let engine = open(small, Arc::new(MemoryStore::default()), Artifacts::memory()).await;
    enrolled(&engine, 4).await;
    assert_eq!(
        engine.open_round().await.expect("open"),
        Opening::NotOpened(NoRound::PopulationTooSmall { population: 2, eligible: 4 })
    );
}

/// M10: a missing privacy ledger while published rounds exist is corruption, not ε = 0;
/// and `target-epsilon` stops the rounds before ε passes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_ledger_is_corruption_and_target_epsilon_stops_rounds() {
    let root = tempfile::tempdir().expect("tmp");
    let mut config = support::config(root.path());
    config.privacy.central =
        Some(covey_strategy::DpConfig::fed_avg(1.0, covey_strategy::ClipConfig::Fixed { norm: 0.5 }));
    // A target between the ε of one and of two rounds at q = 1, z = 1.
    let (one_round, _) = covey_privacy::rdp::epsilon(1.0, 1.0, 1, 1e-5).expect("eps");
    let (two_rounds, _) = covey_privacy::rdp::epsilon(1.0, 1.0, 2, 1e-5).expect("eps");
    let target = (one_round + two_rounds) / 2.0;
    config.privacy.target_epsilon = Some(target);
    config.rounds.pause = Duration::from_millis(1);
    let db = root.path().join("state.sqlite");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&db).await.expect("sqlite"));
    let artifacts = Artifacts::dir(&root.path().join("artifacts")).expect("artifacts");
    let engine = open(config.clone(), store.clone(), artifacts.clone()).await;
    let devices = enrolled(&engine, 4).await;
    let driver = tokio::spawn(engine.clone().run_rounds());
    for d in &devices {
        let t = task_for(&engine, d).await;
        let mut delta = support::delta(5);
        let scale = (0.4 / covey_tensors::global_norm(&delta)) as f32;
        delta.values_mut().for_each(|t| t.data.iter_mut().for_each(|x| *x *= scale));
        let (h, s, p) = d.update(&pb(&t), &delta);
        engine.accept_update(&h.to_bytes(), &s, &p, 1.0).await.expect("accepted");
    }
    let ended = tokio::time::timeout(Duration::from_secs(30), driver).await.expect("the driver stops by itself");
    ended.expect("join").expect("no error");
    let epsilon = engine.epsilon().await.expect("epsilon");
    assert!((epsilon - one_round).abs() < 1e-9 && epsilon <= target, "ε {epsilon}");
    assert_eq!(store.versions().await.expect("versions").len(), 2, "exactly one round was published");
    assert_eq!(
        engine.open_round().await.expect("open"),
        Opening::NotOpened(NoRound::BudgetReached { epsilon, next: two_rounds })
    );

    // Delete the ledger row: ε must not silently restart from 0.
    drop(engine);
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display())).await.expect("pool");
    sqlx::query("DELETE FROM kv WHERE key = 'privacy_events'").execute(&pool).await.expect("delete");
    pool.close().await;
    let engine = open(config, store, artifacts).await;
    let err = engine.epsilon().await.expect_err("missing ledger");
    assert!(matches!(err, CoordinatorError::Corrupt(ref m) if m.contains("privacy_events")), "{err}");
}

/// M4: a promote (or rollback) fails the round in progress on another base, and the next
/// publish does not move `current` back.
#[tokio::test(start_paused = true)]
async fn a_rollback_is_not_undone_by_the_next_publish() {
    let root = tempfile::tempdir().expect("tmp");
    let config = support::config(root.path());
    let engine = open(config, Arc::new(MemoryStore::default()), Artifacts::memory()).await;
    let devices = enrolled(&engine, 4).await;
    let driver = tokio::spawn(engine.clone().run_rounds());
    // Round 1 publishes version 2.
    for d in &devices {
        let t = task_for(&engine, d).await;
        let (h, s, p) = d.update(&pb(&t), &support::delta(3));
        engine.accept_update(&h.to_bytes(), &s, &p, 1.0).await.expect("accepted");
    }
    for _ in 0..200 {
        if engine.store().current_version().await.expect("v") == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(engine.store().current_version().await.expect("v"), 2);
    // Round 2 opens on version 2; the operator rolls back to 1 while it collects.
    let t = task_for(&engine, &devices[0]).await;
    assert_eq!(t.binding.base_version, 2);
    let (h, s, p) = devices[0].update(&pb(&t), &support::delta(4));
    engine.accept_update(&h.to_bytes(), &s, &p, 1.0).await.expect("accepted");
    let (current, failed) = engine.rollback(0).await.expect("rollback");
    assert_eq!((current, failed), (1, Some(t.binding.round_id)));
    let r = engine.store().rounds(1).await.expect("rounds").remove(0);
    assert_eq!(r.state, RoundState::Failed);
    assert!(r.failure.contains("version 1"), "{}", r.failure);
    // The next round trains on version 1, and publishing it keeps the lineage 1 → 3.
    for d in &devices {
        let t = task_for(&engine, d).await;
        assert_eq!(t.binding.base_version, 1);
        let (h, s, p) = d.update(&pb(&t), &support::delta(5));
        engine.accept_update(&h.to_bytes(), &s, &p, 1.0).await.expect("accepted");
    }
    for _ in 0..200 {
        if engine.store().versions().await.expect("v").len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let v3 = engine.store().version(3).await.expect("v").expect("version 3");
    assert_eq!(v3.parent, 1);
    assert_eq!(engine.store().current_version().await.expect("v"), 3);
    driver.abort();
}

/// `fail-round` closes the round in progress; the driver goes on with the next one.
#[tokio::test(start_paused = true)]
async fn an_operator_can_fail_the_round_in_progress() {
    let root = tempfile::tempdir().expect("tmp");
    let engine = open(support::config(root.path()), Arc::new(MemoryStore::default()), Artifacts::memory()).await;
    let devices = enrolled(&engine, 4).await;
    let driver = tokio::spawn(engine.clone().run_rounds());
    let t = task_for(&engine, &devices[0]).await;
    let round = t.binding.round_id;
    assert!(matches!(engine.fail_round(round + 5, "no").await, Err(CoordinatorError::Refused(_))));
    assert_eq!(engine.fail_round(round, "bad data").await.expect("fail"), RoundState::Open);
    let (h, s, p) = devices[0].update(&pb(&t), &support::delta(1));
    let refused = engine.accept_update(&h.to_bytes(), &s, &p, 1.0).await;
    assert!(refused.as_ref().is_err_and(|e| e.rejection().is_some()), "a failed round takes no update: {refused:?}");
    let next = task_for(&engine, &devices[0]).await;
    assert!(next.binding.round_id > round, "the driver opened the next round");
    let r = engine.store().rounds(10).await.expect("rounds").into_iter().find(|r| r.id == round).expect("round");
    assert_eq!(r.state, RoundState::Failed);
    assert!(r.failure.contains("failed by the operator: bad data"), "{}", r.failure);
    driver.abort();
}

/// A store that fails its first `n` round insertions, as a full disk or a locked database
/// would.
struct Flaky {
    inner: MemoryStore,
    failures: AtomicU32,
}

#[async_trait]
impl Store for Flaky {
    async fn insert_device(&self, d: &DeviceRecord) -> Result<bool> {
        self.inner.insert_device(d).await
    }
    async fn insert_token(&self, t: &TokenRecord) -> Result<bool> {
        self.inner.insert_token(t).await
    }
    async fn enroll(&self, d: &DeviceRecord, token: &[u8; 32], now: u64) -> Result<EnrollOutcome> {
        self.inner.enroll(d, token, now).await
    }
    async fn device(&self, id: &[u8; 32]) -> Result<Option<DeviceRecord>> {
        self.inner.device(id).await
    }
    async fn devices(&self) -> Result<Vec<DeviceRecord>> {
        self.inner.devices().await
    }
    async fn revoke(&self, id: &[u8; 32]) -> Result<RevokeOutcome> {
        self.inner.revoke(id).await
    }
    async fn touch(&self, id: &[u8; 32], now_ms: u64) -> Result<()> {
        self.inner.touch(id, now_ms).await
    }
    async fn insert_round(&self, r: &RoundRecord, a: &[Assignment]) -> Result<()> {
        if self.failures.load(Ordering::SeqCst) > 0 {
            self.failures.fetch_sub(1, Ordering::SeqCst);
            return Err(CoordinatorError::Corrupt("database or disk is full (injected)".into()));
        }
        self.inner.insert_round(r, a).await
    }
    async fn active_round(&self) -> Result<Option<RoundRecord>> {
        self.inner.active_round().await
    }
    async fn rounds(&self, limit: usize) -> Result<Vec<RoundRecord>> {
        self.inner.rounds(limit).await
    }
    async fn set_round_state(&self, id: u64, state: RoundState, failure: &str) -> Result<bool> {
        self.inner.set_round_state(id, state, failure).await
    }
    async fn assignment(&self, round_id: u64, device_id: &[u8; 32]) -> Result<Option<Assignment>> {
        self.inner.assignment(round_id, device_id).await
    }
    async fn insert_update(&self, u: &UpdateRecord, nonce: &[u8; 32]) -> Result<u64> {
        self.inner.insert_update(u, nonce).await
    }
    async fn updates(&self, round_id: u64) -> Result<Vec<UpdateRecord>> {
        self.inner.updates(round_id).await
    }
    async fn update_count(&self, round_id: u64) -> Result<u64> {
        self.inner.update_count(round_id).await
    }
    async fn decline(&self, round_id: u64, device_id: &[u8; 32], reason: &str) -> Result<bool> {
        self.inner.decline(round_id, device_id, reason).await
    }
    async fn declined_count(&self, round_id: u64) -> Result<u64> {
        self.inner.declined_count(round_id).await
    }
    async fn device_update_count(&self, device_id: &[u8; 32]) -> Result<u64> {
        self.inner.device_update_count(device_id).await
    }
    async fn participations(&self) -> Result<std::collections::BTreeMap<[u8; 32], Participation>> {
        self.inner.participations().await
    }
    async fn participation(&self, device_id: &[u8; 32]) -> Result<Option<Participation>> {
        self.inner.participation(device_id).await
    }
    async fn publish(&self, round_id: u64, v: &VersionRecord, state: &[(String, Vec<u8>)]) -> Result<bool> {
        self.inner.publish(round_id, v, state).await
    }
    async fn version(&self, version: u64) -> Result<Option<VersionRecord>> {
        self.inner.version(version).await
    }
    async fn versions(&self) -> Result<Vec<VersionRecord>> {
        self.inner.versions().await
    }
    async fn current_version(&self) -> Result<u64> {
        self.inner.current_version().await
    }
    async fn set_current_version(&self, version: u64) -> Result<()> {
        self.inner.set_current_version(version).await
    }
    async fn get_state(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.inner.get_state(key).await
    }
}

/// M5: store errors in the round driver are retried with back-off; the driver does not
/// end (before, `run_rounds` returned the error and the process exited).
#[tokio::test(start_paused = true)]
async fn store_errors_in_the_round_driver_are_retried() {
    let root = tempfile::tempdir().expect("tmp");
    let store = Arc::new(Flaky { inner: MemoryStore::default(), failures: AtomicU32::new(3) });
    let engine = open(support::config(root.path()), store.clone(), Artifacts::memory()).await;
    let devices = enrolled(&engine, 4).await;
    let driver = tokio::spawn(engine.clone().run_rounds());
    let t = task_for(&engine, &devices[0]).await;
    assert_eq!(t.binding.round_id, 1);
    assert_eq!(store.failures.load(Ordering::SeqCst), 0, "three failed insertions were retried");
    assert!(!driver.is_finished(), "the driver is still running");
    driver.abort();
}

/// M6: a master blob damaged on disk is refused when read, never merged and re-signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_master_is_refused_not_re_signed() {
    let root = tempfile::tempdir().expect("tmp");
    let config = support::config(root.path());
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let dir = root.path().join("artifacts");
    let artifacts = Artifacts::dir(&dir).expect("artifacts");
    let engine = open(config, store.clone(), artifacts).await;
    let devices = enrolled(&engine, 4).await;
    let master = store.version(1).await.expect("v").expect("v1").master_sha256;
    let path = dir.join(hex::encode(master));
    let mut bytes = std::fs::read(&path).expect("master");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, bytes).expect("damage");
    let round = engine.open_round().await.expect("open").round().expect("round");
    for d in &devices {
        let t = task_for(&engine, d).await;
        let (h, s, p) = d.update(&pb(&t), &support::delta(2));
        engine.accept_update(&h.to_bytes(), &s, &p, 1.0).await.expect("accepted");
    }
    let active = store.active_round().await.expect("active").expect("round");
    let err = engine.drive(active).await.expect_err("damaged master");
    assert!(matches!(err, CoordinatorError::CorruptArtifact(_)), "{err}");
    assert_eq!(store.versions().await.expect("versions").len(), 1, "nothing was signed");
    assert_eq!(
        store.active_round().await.expect("a").map(|r| (r.id, r.state)),
        Some((round.id, RoundState::Aggregating))
    );
}

/// M13: restarting on a state directory with another `[lora]` is refused at start.
#[tokio::test]
async fn a_changed_lora_layout_is_refused_at_start() {
    let root = tempfile::tempdir().expect("tmp");
    let config = support::config(root.path());
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let artifacts = Artifacts::memory();
    drop(open(config.clone(), store.clone(), artifacts.clone()).await);
    let mut changed = config;
    changed.lora.rank += 1;
    let err =
        Coordinator::open(changed, store, artifacts, KeyPair::generate().expect("k"), Arc::new(Metrics::default()))
            .await
            .expect_err("changed rank");
    assert!(err.to_string().contains("lora"), "{err}");
}
