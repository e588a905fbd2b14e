//! Aggregation benchmark: FedAvg over N stored updates of 1M parameters each, streamed
//! from the artifact directory with every signature and payload hash verified, as the
//! coordinator does at the end of a round. Prints time and peak RSS for N = 25 and
//! N = 100: memory must not grow with N.
//!
//! `cargo bench -p covey-coordinator --bench aggregate` (add `-- --quick` for N = 10, 20).

use std::collections::HashMap;
use std::time::Instant;

use covey_coordinator::artifacts::Artifacts;
use covey_coordinator::engine::StoredUpdates;
use covey_coordinator::store::UpdateRecord;
use covey_proto::keys::{self, KeyPair};
use covey_proto::signing::UpdateHeader;
use covey_strategy::RoundContext;
use covey_tensors::{HostTensor, NamedTensors};

const PARAMS: usize = 1 << 20;

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|k| k.parse::<f64>().ok()))
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn reset_peak_rss() {
    // Linux: writing 5 to clear_refs resets VmHWM to the current RSS.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn delta(seed: u64) -> NamedTensors {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    (0..8)
        .map(|i| {
            let data = (0..PARAMS / 8).map(|_| next() * 1e-3).collect();
            (
                format!("base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight"),
                HostTensor { shape: vec![PARAMS / 64, 8], data },
            )
        })
        .collect()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let sizes: &[usize] = if quick { &[10, 20] } else { &[25, 100] };
    let dir = tempfile::tempdir().expect("tmp");
    let artifacts = Artifacts::dir(dir.path()).expect("artifacts");
    let max = *sizes.iter().max().expect("sizes");
    let mut records = Vec::new();
    let mut keys_by_device = HashMap::new();
    let t = Instant::now();
    for n in 0..max {
        let key = KeyPair::generate().expect("key");
        let payload = covey_tensors::encode(&delta(n as u64), None).expect("encode");
        let hash = artifacts.put(&payload).expect("put");
        let header = UpdateHeader {
            device_id: key.device_id(),
            round_id: 1,
            task_id: [0; 16],
            base_manifest_hash: [0; 32],
            nonce: keys::random_bytes().expect("nonce"),
            payload_len: payload.len() as u64,
            payload_sha256: hash,
            clip_norm: 1.0,
            noise_multiplier: 0.0,
            num_examples: 64,
            within_clip: Some(true),
        }
        .to_bytes();
        let signature = key.sign(&header).to_vec();
        keys_by_device.insert(key.device_id(), (key.public_key(), false));
        records.push(UpdateRecord {
            id: n as u64 + 1,
            round_id: 1,
            device_id: key.device_id(),
            header,
            signature,
            payload_sha256: hash,
            num_examples: 64,
            within_clip: Some(true),
            train_loss: Some(1.0),
            received_ms: 0,
        });
    }
    println!(
        "prepared {max} signed updates of {PARAMS} parameters ({:.1} MiB each) in {:.1} s",
        PARAMS as f64 * 4.0 / 1048576.0,
        t.elapsed().as_secs_f64()
    );
    println!("{:>8} {:>10} {:>14} {:>14}", "updates", "seconds", "updates/s", "peak RSS MiB");
    for &n in sizes {
        let mut strategy = covey_strategy::build(
            &covey_strategy::StrategyConfig::FedAvg { server_learning_rate: 1.0 },
            None,
            covey_strategy::Randomness::Seeded([0; 32]),
        )
        .expect("fedavg");
        reset_peak_rss();
        let t = Instant::now();
        let mut stream = StoredUpdates::new(&records[..n], &artifacts, &keys_by_device, 160);
        let ctx = RoundContext { round: 1, expected_clients: n, population: n };
        let aggregate = strategy.aggregate(&ctx, &mut stream, 0).expect("aggregate").expect("some");
        let secs = t.elapsed().as_secs_f64();
        assert!(stream.error.is_none() && stream.dropped == 0);
        assert_eq!(aggregate.num_updates, n);
        println!("{n:>8} {secs:>10.2} {:>14.1} {:>14.1}", n as f64 / secs, peak_rss_mib());
    }
}
