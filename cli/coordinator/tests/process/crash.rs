//! The crash suite: 50 protocol-level agents run rounds against the `covey-coordinator`
//! binary, which is stopped at seeded crash points (enrolment, uploads, round opening,
//! aggregation, publishing: `covey_coordinator::crashpoint`) and killed there with SIGKILL,
//! then restarted on the same state. At the end, from the state itself:
//!
//! * 0 acknowledged updates lost: every update an agent got an acknowledgement for is
//!   stored in its round;
//! * every round aggregated exactly once: no round is named by two versions, versions are
//!   numbered without a gap, every published round names its version;
//! * privacy spent never under-counted: each version's manifest accounts every published
//!   round before it, and ε never decreases;
//! * no debris: no temporary file, no payload of a finished round, no unnamed artifact.
//!
//! CI kills at 4 points; `COVEY_CRASH_POINTS=20 cargo test -p covey-coordinator-cli --test
//! process crash -- --nocapture` runs the full 20 (README, "Reliability").

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use covey_coordinator::crashpoint::POINTS;
use covey_coordinator::store::{RoundState, SqliteStore, Store};
use covey_proto::manifest::Manifest;
use covey_proto::pb::{self, fleet_client::FleetClient};
use covey_proto::signing::DeviceMethod;
use tonic::transport::{Channel, Endpoint};

use crate::support::{self, Device};

const AGENTS: usize = 50;

/// A coordinator process, its address, and the crash point it stopped at (if any).
struct Process {
    child: Child,
    addr: SocketAddr,
    crashed: std::sync::mpsc::Receiver<String>,
}

fn spawn(config: &Path, crash_at: Option<&str>) -> Process {
    let mut command = Command::new(env!("CARGO_BIN_EXE_covey-coordinator"));
    command.args(["serve", "--config"]).arg(config).env("RUST_LOG", "error").stderr(Stdio::piped());
    if let Some(point) = crash_at {
        command.env("COVEY_CRASH_AT", point);
    }
    let mut child = command.spawn().expect("spawn covey-coordinator");
    let stderr = child.stderr.take().expect("stderr");
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (crash_tx, crashed) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("covey-coordinator listening on ") {
                let _ = addr_tx.send(addr.trim().to_owned());
            } else if let Some(point) = line.strip_prefix("covey: crash point ") {
                let _ = crash_tx.send(point.trim_end_matches(" reached").to_owned());
            } else if line.contains("ERROR") {
                eprintln!("coordinator: {line}");
            }
        }
    });
    let addr = addr_rx.recv_timeout(Duration::from_secs(60)).expect("the coordinator did not start");
    Process { child, addr: addr.parse().expect("address"), crashed }
}

fn sigkill(mut p: Process) {
    p.child.kill().expect("SIGKILL");
    p.child.wait().expect("reap");
}

/// What the agents saw.
#[derive(Default)]
struct Ledger {
    /// (round, device) of every acknowledged update.
    acked: Vec<(u64, [u8; 32])>,
    /// Requests that failed (connection refused or reset while the coordinator was down).
    failed: u64,
}

async fn client(addr: SocketAddr) -> Option<FleetClient<Channel>> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}")).ok()?.connect_timeout(Duration::from_secs(2));
    let channel = endpoint.connect().await.ok()?;
    Some(FleetClient::new(channel).max_decoding_message_size(covey_proto::MAX_MESSAGE_BYTES))
}

/// One agent: enrol, then poll and upload for every task, reconnecting to whichever
/// process is current whenever a request fails.
async fn agent(i: u32, current: Arc<Mutex<Option<SocketAddr>>>, ledger: Arc<Mutex<Ledger>>, stop: Arc<AtomicBool>) {
    let device = Device::new();
    let mut enrolled = false;
    let mut conn: Option<(SocketAddr, FleetClient<Channel>)> = None;
    while !stop.load(Ordering::Relaxed) {
        let Some(addr) = *current.lock().expect("addr") else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if conn.as_ref().is_none_or(|(a, _)| *a != addr) {
            conn = client(addr).await.map(|c| (addr, c));
        }
        let Some((_, c)) = conn.as_mut() else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let outcome: Result<(), tonic::Status> = async {
            if !enrolled {
                c.enroll(pb::EnrollRequest {
                    public_key: device.key.public_key().to_vec(),
                    enrollment_token: support::TOKEN.into(),
                    label: format!("agent-{i}"),
                })
                .await?;
                enrolled = true;
            }
            let auth = device.auth(DeviceMethod::Poll, support::now_ms());
            let polled = c.poll_task(pb::PollTaskRequest { auth: Some(auth), max_rank: 0 }).await?.into_inner();
            match polled.outcome {
                Some(pb::poll_task_response::Outcome::Task(task)) => {
                    let (h, s, p) = device.update(&task, &support::delta(i + 1));
                    match support::submit(c, &h.to_bytes(), &s, &p).await {
                        Ok(_) => ledger.lock().expect("ledger").acked.push((task.round_id, device.id())),
                        // Stored before a crash cut the acknowledgement: the nonce is spent.
                        Err(e) if e.code() == tonic::Code::AlreadyExists => {}
                        Err(e) => return Err(e),
                    }
                }
                Some(pb::poll_task_response::Outcome::Wait(w)) => {
                    tokio::time::sleep(Duration::from_millis(w.retry_after_ms.clamp(20, 300))).await;
                }
                None => tokio::time::sleep(Duration::from_millis(100)).await,
            }
            Ok(())
        }
        .await;
        if let Err(e) = outcome {
            ledger.lock().expect("ledger").failed += 1;
            if matches!(e.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled) {
                conn = None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The seeded crash plan: the first kill during enrolment, then points of the rounds, with
/// the hit count at which to stop (uploads reach their points many times a round).
fn plan(points: usize, seed: u64) -> Vec<String> {
    // SplitMix64.
    let mut state = seed;
    let mut next = move |n: u64| {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n
    };
    let mut out = vec![format!("enroll-stored:{}", 1 + next(AGENTS as u64 - 1))];
    while out.len() < points {
        let point = POINTS[1 + next(POINTS.len() as u64 - 1) as usize];
        let hits = if point.starts_with("upload") { 1 + next(12) } else { 1 + next(2) };
        out.push(format!("{point}:{hits}"));
    }
    out
}

async fn published_rounds(state: &Path) -> usize {
    let store = SqliteStore::open(&state.join("state.sqlite")).await.expect("open state");
    store.rounds(10_000).await.expect("rounds").iter().filter(|r| r.state == RoundState::Published).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_seeded_points_loses_no_acknowledged_update() {
    let points: usize = std::env::var("COVEY_CRASH_POINTS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let seed: u64 = std::env::var("COVEY_CRASH_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(7);
    let root = tempfile::tempdir().expect("tmp");
    let mut config = support::config(root.path());
    config.rounds.target_updates = 10;
    config.rounds.min_updates = 6;
    config.rounds.min_available = 10;
    config.rounds.over_selection = 0.3;
    config.rounds.deadline = Duration::from_secs(15);
    config.privacy.local_noise_multiplier = 0.3;
    config.limits.max_payload_bytes = 64 << 10;
    let config_path = root.path().join("coordinator.toml");
    std::fs::write(&config_path, toml::to_string(&config).expect("toml")).expect("write config");
    let state = config.state_dir.clone();

    let current = Arc::new(Mutex::new(None));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let agents: Vec<_> =
        (0..AGENTS as u32).map(|i| tokio::spawn(agent(i, current.clone(), ledger.clone(), stop.clone()))).collect();

    let started = Instant::now();
    let mut reached = Vec::new();
    for point in plan(points, seed) {
        let p = spawn(&config_path, Some(&point));
        *current.lock().expect("addr") = Some(p.addr);
        let crashed = tokio::task::spawn_blocking(move || {
            let got = p.crashed.recv_timeout(Duration::from_secs(60)).ok();
            (p, got)
        })
        .await
        .expect("wait");
        *current.lock().expect("addr") = None;
        let (p, got) = crashed;
        sigkill(p);
        eprintln!(
            "crash plan {point}: {}",
            if got.is_some() { "reached, SIGKILL" } else { "not reached in 60 s, SIGKILL" }
        );
        reached.push((point, got.is_some()));
    }

    // A last process runs without a crash plan until 3 more rounds are published.
    let before = published_rounds(&state).await;
    let p = spawn(&config_path, None);
    *current.lock().expect("addr") = Some(p.addr);
    let deadline = Instant::now() + Duration::from_secs(240);
    while published_rounds(&state).await < before + 3 {
        assert!(Instant::now() < deadline, "rounds stopped completing after the restarts");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for a in agents {
        a.await.expect("agent");
    }
    sigkill(p);

    // From the state itself. Opening the engine once more runs the start-up repair; then
    // nothing but the round in progress may hold payloads.
    let final_check = spawn(&config_path, None);
    sigkill(final_check);
    let store = SqliteStore::open(&state.join("state.sqlite")).await.expect("open state");
    let rounds = store.rounds(10_000).await.expect("rounds");
    let (acked, failed) = {
        let l = ledger.lock().expect("ledger");
        (l.acked.clone(), l.failed)
    };
    let mut lost = Vec::new();
    for &(round, device) in &acked {
        let stored = store.updates(round).await.expect("updates");
        if !stored.iter().any(|u| u.device_id == device) {
            lost.push((round, hex::encode(&device[..4])));
        }
    }
    let versions = store.versions().await.expect("versions");
    let mut numbers: Vec<u64> = versions.iter().map(|v| v.version).collect();
    numbers.sort_unstable();
    assert_eq!(numbers, (1..=numbers.len() as u64).collect::<Vec<_>>(), "versions numbered without a gap");
    let mut by_round: BTreeMap<u64, u64> = BTreeMap::new();
    for v in versions.iter().filter(|v| v.round_id > 0) {
        assert!(by_round.insert(v.round_id, v.version).is_none(), "round {} aggregated twice", v.round_id);
    }
    let published: Vec<u64> = rounds.iter().filter(|r| r.state == RoundState::Published).map(|r| r.id).collect();
    for r in rounds.iter().filter(|r| r.state == RoundState::Published) {
        assert_eq!(by_round.get(&r.id), Some(&r.published_version), "round {} names its version", r.id);
    }
    assert_eq!(by_round.len(), published.len(), "every version's round is published");
    let mut ordered: Vec<_> = versions.iter().collect();
    ordered.sort_by_key(|v| v.version);
    let mut last_epsilon = 0.0;
    for v in &ordered {
        let m: Manifest = serde_json::from_slice(&v.manifest).expect("manifest");
        let rounds_before = by_round.values().filter(|&&version| version <= v.version).count() as u64;
        assert_eq!(m.privacy.rounds, rounds_before, "version {} accounts every published round", v.version);
        assert!(m.privacy.epsilon >= last_epsilon, "ε never decreases (version {})", v.version);
        last_epsilon = m.privacy.epsilon;
    }
    let artifacts = state.join("artifacts");
    let active: HashSet<String> = match store.active_round().await.expect("active") {
        Some(r) => store.updates(r.id).await.expect("updates").iter().map(|u| hex::encode(u.payload_sha256)).collect(),
        None => HashSet::new(),
    };
    for entry in std::fs::read_dir(artifacts.join("uploads")).expect("uploads") {
        let name = entry.expect("entry").file_name().to_string_lossy().into_owned();
        assert!(active.contains(&name), "debris in uploads: {name}");
    }
    for entry in std::fs::read_dir(&artifacts).expect("artifacts") {
        let name = entry.expect("entry").file_name().to_string_lossy().into_owned();
        assert!(!name.ends_with(".tmp"), "debris in artifacts: {name}");
    }

    let reached_count = reached.iter().filter(|(_, r)| *r).count();
    eprintln!(
        "crash suite: {reached_count} of {} crash points reached and survived, {} updates acknowledged, {} lost, \
         {} rounds published in {:.0} s ({} requests failed while the coordinator was down)",
        reached.len(),
        acked.len(),
        lost.len(),
        published.len(),
        started.elapsed().as_secs_f64(),
        failed
    );
    assert!(lost.is_empty(), "acknowledged updates lost: {lost:?}");
    assert!(reached_count * 4 >= reached.len() * 3, "most crash points must be reached: {reached:?}");
}
