//! The coordinator's memory under an upload flood: N clients (default 200), each on its own
//! connection, open an upload at once and try to stream M MiB (default 64) in 1 MiB chunks.
//! Wave 1 starts with a header signed by a key that never enrolled; wave 2 sends payload
//! without any header. Prints the coordinator process's peak RSS (VmHWM) before and after
//! each wave, how many MiB the clients got out, and the status codes they received.
//!
//! `cargo bench -p covey-coordinator-cli --bench upload_flood [-- CLIENTS MIB]` (Linux:
//! reads `/proc/<pid>/status`).

#[path = "../tests/process/binary.rs"]
mod binary;
#[allow(dead_code)]
#[path = "../../../coordinator/tests/fleet/support.rs"]
mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use covey_proto::keys::KeyPair;
use covey_proto::pb::{self, fleet_client::FleetClient};
use covey_proto::signing::UpdateHeader;
use tonic::transport::Channel;

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn stranger_header(mib: u64) -> pb::UpdateChunk {
    let key = KeyPair::generate().expect("key");
    let header = UpdateHeader {
        device_id: key.device_id(),
        round_id: 1,
        task_id: [1; 16],
        base_manifest_hash: [2; 32],
        nonce: [3; 32],
        payload_len: mib << 20,
        payload_sha256: [4; 32],
        clip_norm: 1.0,
        noise_multiplier: 0.0,
        num_examples: 160,
        within_clip: None,
    };
    let bytes = header.to_bytes();
    pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Header(pb::UpdateHeader {
            signature: key.sign(&bytes).to_vec(),
            signed_header: bytes,
            train_loss: 0.0,
        })),
    }
}

async fn wave(url: &str, clients: usize, mib: u64, with_header: bool) -> (u64, BTreeMap<String, usize>) {
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients {
        let (url, sent) = (url.to_owned(), sent.clone());
        tasks.push(tokio::spawn(async move {
            let channel = match Channel::from_shared(url).expect("url").connect().await {
                Ok(c) => c,
                Err(e) => return format!("connect: {e}"),
            };
            let mut c = FleetClient::new(channel);
            let first = with_header.then(|| stranger_header(mib));
            let data = (0..mib).map(move |_| {
                sent.fetch_add(1, Ordering::Relaxed);
                pb::UpdateChunk { part: Some(pb::update_chunk::Part::Data(vec![0u8; 1 << 20])) }
            });
            match c.submit_update(tokio_stream::iter(first.into_iter().chain(data))).await {
                Ok(_) => "OK".into(),
                Err(s) => format!("{:?}", s.code()),
            }
        }));
    }
    let mut codes = BTreeMap::new();
    for t in tasks {
        *codes.entry(t.await.unwrap_or_else(|e| format!("panic: {e}"))).or_insert(0) += 1;
    }
    (sent.load(Ordering::Relaxed), codes)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let numbers: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let clients = numbers.first().copied().unwrap_or(200) as usize;
    let mib = numbers.get(1).copied().unwrap_or(64);
    let root = tempfile::tempdir().expect("tmp");
    let mut config = support::config(root.path());
    config.limits.max_payload_bytes = 64 << 20;
    let path = root.path().join("coordinator.toml");
    std::fs::write(&path, toml::to_string(&config).expect("toml")).expect("write config");
    let (mut child, addr) = binary::spawn(&path);
    let pid = child.id();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let url = format!("http://{addr}");
    let start = peak_rss_mib(pid);
    println!("coordinator pid {pid}: peak RSS {start:.1} MiB after start");
    println!("{clients} clients, each on its own connection, each trying to send {mib} MiB");
    for (name, with_header) in [("header signed by an unknown key", true), ("payload without a header", false)] {
        let t = Instant::now();
        let (sent, codes) = wave(&url, clients, mib, with_header).await;
        let peak = peak_rss_mib(pid);
        println!(
            "{name:<32} {:>6.1} s  clients got {sent} of {} MiB out  peak RSS {peak:.1} MiB (+{:.1} over the start)  {codes:?}",
            t.elapsed().as_secs_f64(),
            clients as u64 * mib,
            peak - start
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}
