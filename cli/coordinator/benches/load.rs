//! Load: N protocol-only devices (default 1,000) against the `covey-coordinator` binary
//! for R rounds (default 5) on loopback. Every device enrols, then polls (signed) at the
//! pace the coordinator sets (its `retry_after`); when it has a task it fetches the
//! round's manifest and the `A` factors (the download) and uploads a signed update.
//! Devices share 100 HTTP/2 connections. Prints p50 / p99 latency of poll, download and
//! upload, every answer by status code (refusals of the configured limits counted, not
//! hidden), the polls the coordinator received per second (mean and busiest second), and
//! the coordinator process's peak RSS and CPU time.
//!
//! `cargo bench -p covey-coordinator-cli --bench load [-- DEVICES ROUNDS [PACE]]` (Linux:
//! reads `/proc/<pid>/`). PACE is `rounds.pace-polls-per-second`; the default 0 leaves
//! pace steering off, so every device polls every 200 ms, the load this bench has always
//! measured.

#[path = "../tests/process/binary.rs"]
mod binary;
#[allow(dead_code)]
#[path = "../../../coordinator/tests/fleet/support.rs"]
mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use covey_proto::pb::{self, admin_client::AdminClient, fleet_client::FleetClient};
use covey_proto::signing::DeviceMethod;
use tonic::transport::Channel;

const CONNECTIONS: usize = 100;

#[derive(Default)]
struct Tally {
    latencies: BTreeMap<&'static str, Vec<f64>>,
    codes: BTreeMap<String, usize>,
    /// Polls answered in each second since the devices started.
    polls_per_second: Vec<u64>,
}

/// Count a poll answered `since` the run started.
fn note_poll_time(t: &Mutex<Tally>, since: Duration) {
    let mut t = t.lock().expect("tally");
    let second = since.as_secs() as usize;
    if t.polls_per_second.len() <= second {
        t.polls_per_second.resize(second + 1, 0);
    }
    t.polls_per_second[second] += 1;
}

fn note(t: &Mutex<Tally>, op: &'static str, started: Instant, code: &str) {
    let mut t = t.lock().expect("tally");
    t.latencies.entry(op).or_default().push(started.elapsed().as_secs_f64() * 1e3);
    *t.codes.entry(format!("{op} {code}")).or_insert(0) += 1;
}

fn code_of(s: &tonic::Status) -> String {
    format!("{:?}", s.code())
}

fn proc_stat(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime, stime are 14 and 15.
    let after = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
    (rss, (ticks(11) + ticks(12)) / 100.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// One device's life: enrol, then poll / download / upload until `stop`.
async fn device(
    mut c: FleetClient<Channel>,
    tally: Arc<Mutex<Tally>>,
    stop: Arc<tokio::sync::Notify>,
    origin: Instant,
) {
    let d = support::Device::new();
    let started = Instant::now();
    let enrolled = c
        .enroll(pb::EnrollRequest {
            public_key: d.key.public_key().to_vec(),
            enrollment_token: support::TOKEN.into(),
            label: "load".into(),
        })
        .await;
    note(&tally, "enrol", started, &enrolled.as_ref().map_or_else(code_of, |_| "Ok".into()));
    if enrolled.is_err() {
        return;
    }
    loop {
        let started = Instant::now();
        let polled = c
            .poll_task(pb::PollTaskRequest { auth: Some(d.auth(DeviceMethod::Poll, support::now_ms())), max_rank: 0 })
            .await;
        note_poll_time(&tally, origin.elapsed());
        let wait = match polled {
            Err(s) => {
                note(&tally, "poll", started, &code_of(&s));
                Duration::from_secs(2)
            }
            Ok(r) => {
                note(&tally, "poll", started, "Ok");
                match r.into_inner().outcome {
                    Some(pb::poll_task_response::Outcome::Task(task)) => {
                        let started = Instant::now();
                        let downloaded = async {
                            let m = d.manifest(&mut c, task.base_version).await?;
                            let manifest: serde_json::Value = serde_json::from_slice(&m.manifest)
                                .map_err(|e| tonic::Status::internal(e.to_string()))?;
                            let a = manifest["lora"]["a"]["sha256"].as_str().unwrap_or_default().to_owned();
                            d.fetch(&mut c, &hex::decode(a).unwrap_or_default()).await
                        }
                        .await;
                        note(&tally, "download", started, &downloaded.as_ref().map_or_else(code_of, |_| "Ok".into()));
                        let (h, sig, payload) = d.update(&task, &support::delta(task.round_id as u32));
                        let started = Instant::now();
                        let up = support::submit(&mut c, &h.to_bytes(), &sig, &payload).await;
                        note(&tally, "upload", started, &up.as_ref().map_or_else(code_of, |_| "Ok".into()));
                        Duration::from_millis(200)
                    }
                    Some(pb::poll_task_response::Outcome::Wait(w)) => {
                        Duration::from_millis(w.retry_after_ms.clamp(200, 30_000))
                    }
                    None => Duration::from_secs(1),
                }
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.notified() => return,
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let numbers: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let devices = numbers.first().copied().unwrap_or(1000) as usize;
    let rounds = numbers.get(1).copied().unwrap_or(5);
    let pace = numbers.get(2).copied().unwrap_or(0);
    let root = tempfile::tempdir().expect("tmp");
    let mut config = support::config(root.path());
    // A tenth of the fleet per round; the round waits for every device to be online.
    config.rounds.target_updates = (devices / 10).max(1);
    config.rounds.min_updates = (devices / 20).max(1);
    config.rounds.min_available = devices;
    config.rounds.max_rounds = rounds;
    config.rounds.deadline = Duration::from_secs(120);
    config.rounds.poll_interval = Duration::from_millis(200);
    // By default unsteered: every device polls every 200 ms (5,000 polls/s at 1,000
    // devices), the load this bench has always measured.
    config.rounds.pace_polls_per_second = pace as f64;
    config.limits.device_requests_per_minute = 600;
    config.enrollment.per_minute = 100_000;
    config.enrollment.per_token_per_minute = 100_000;
    let path = root.path().join("coordinator.toml");
    std::fs::write(&path, toml::to_string(&config).expect("toml")).expect("write config");
    let (mut child, addr) = binary::spawn(&path);
    let pid = child.id();
    let url = format!("http://{addr}");
    let mut channels = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS.min(devices) {
        channels.push(Channel::from_shared(url.clone()).expect("url").connect().await.expect("connect"));
    }
    let (_, cpu_start) = proc_stat(pid);
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(tokio::sync::Notify::new());
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(devices);
    for i in 0..devices {
        let c = FleetClient::new(channels[i % channels.len()].clone())
            .max_decoding_message_size(covey_proto::MAX_MESSAGE_BYTES);
        tasks.push(tokio::spawn(device(c, tally.clone(), stop.clone(), started)));
    }
    let mut admin = AdminClient::new(channels[0].clone());
    let published = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut req = tonic::Request::new(pb::StatusRequest {});
        let bearer = format!("Bearer {}", support::ADMIN);
        req.metadata_mut().insert("authorization", bearer.parse().expect("header"));
        let s = admin.status(req).await.expect("status").into_inner();
        if s.published_rounds >= rounds || started.elapsed() > Duration::from_secs(1800) {
            break s.published_rounds;
        }
    };
    let elapsed = started.elapsed().as_secs_f64();
    stop.notify_waiters();
    for t in tasks {
        t.abort();
    }
    let (rss, cpu_end) = proc_stat(pid);
    let _ = child.kill();
    let _ = child.wait();
    let t = tally.lock().expect("tally");
    println!("{devices} devices on {} connections, {published} rounds published in {elapsed:.1} s", channels.len());
    println!("{:<10} {:>8} {:>10} {:>10}", "operation", "count", "p50 ms", "p99 ms");
    for (op, l) in &t.latencies {
        let mut l = l.clone();
        l.sort_by(f64::total_cmp);
        println!("{op:<10} {:>8} {:>10.1} {:>10.1}", l.len(), percentile(&l, 0.5), percentile(&l, 0.99));
    }
    println!("answers: {:?}", t.codes);
    let seconds = &t.polls_per_second[..t.polls_per_second.len().saturating_sub(1)];
    println!(
        "polls received per second (pace steering {}): mean {:.0}, busiest second {}",
        if pace == 0 { "off".to_string() } else { format!("at {pace}/s") },
        seconds.iter().sum::<u64>() as f64 / seconds.len().max(1) as f64,
        seconds.iter().max().copied().unwrap_or(0)
    );
    println!(
        "coordinator: peak RSS {rss:.1} MiB, CPU {:.1} s ({:.0} % of one core)",
        cpu_end - cpu_start,
        100.0 * (cpu_end - cpu_start) / elapsed
    );
}
