//! Pace steering through the engine's `poll`: a crowd polling at once is told waits one
//! slot apart; with steering off, everyone is told the poll interval.

use std::sync::Arc;
use std::time::Duration;

use covey_coordinator::CoordinatorConfig;
use covey_coordinator::artifacts::Artifacts;
use covey_coordinator::engine::{Coordinator, PollOutcome};
use covey_coordinator::metrics::Metrics;
use covey_coordinator::store::MemoryStore;
use covey_proto::keys::KeyPair;
use covey_proto::signing::DeviceMethod;

use crate::support::{self, Device};

/// The waits `devices` enrolled devices are told when they all poll at once, no round open.
async fn crowd_waits(config: CoordinatorConfig, devices: usize) -> Vec<Duration> {
    let engine = Coordinator::open(
        config,
        Arc::new(MemoryStore::default()),
        Artifacts::memory(),
        KeyPair::generate().expect("key"),
        Arc::new(Metrics::default()),
    )
    .await
    .expect("engine");
    let crowd: Vec<Device> = (0..devices).map(|_| Device::new()).collect();
    for d in &crowd {
        engine.enroll(&d.key.public_key(), support::TOKEN, "d").await.expect("enroll");
    }
    let mut waits = Vec::new();
    for d in &crowd {
        let auth = d.auth(DeviceMethod::Poll, engine.now_ms());
        match engine.poll(&auth.device_id, auth.timestamp_ms, &auth.signature).await.expect("poll") {
            PollOutcome::Wait { retry_after, .. } => waits.push(retry_after),
            PollOutcome::Task(_) => panic!("no round is open"),
        }
    }
    waits
}

// Paused tokio time: the engine's clock stands still, so the crowd polls within the same
// millisecond however busy the machine running the test is.
#[tokio::test(start_paused = true)]
async fn a_crowd_is_told_to_come_back_one_slot_apart() {
    let root = tempfile::tempdir().expect("tmp");
    let mut config = support::config(root.path());
    config.rounds.poll_interval = Duration::from_secs(2);
    // 20 polls a second: slots 50 ms apart.
    config.rounds.pace_polls_per_second = 20.0;
    let waits = crowd_waits(config, 30).await;
    assert_eq!(waits[0], Duration::from_secs(2));
    let expected: Vec<Duration> = (0..30).map(|i| Duration::from_millis(2_000 + 50 * i)).collect();
    assert_eq!(waits, expected);
}

#[tokio::test(start_paused = true)]
async fn without_steering_everyone_is_told_the_poll_interval() {
    let root = tempfile::tempdir().expect("tmp");
    let mut config = support::config(root.path());
    config.rounds.poll_interval = Duration::from_secs(2);
    config.rounds.pace_polls_per_second = 0.0;
    let waits = crowd_waits(config, 30).await;
    assert!(waits.iter().all(|w| *w == Duration::from_secs(2)), "{waits:?}");
}
