//! One round policy: the same seeded round run by the in-process simulator and by the
//! coordinator's engine (in-memory store, no network) samples the same devices, issues
//! them the same tasks, and publishes the same aggregate, bit for bit.

use std::path::PathBuf;
use std::sync::Arc;

use covey_coordinator::artifacts::Artifacts;
use covey_coordinator::engine::PollOutcome;
use covey_coordinator::metrics::Metrics;
use covey_coordinator::store::{MemoryStore, Store};
use covey_coordinator::{Coordinator, weights};
use covey_proto::keys::{self, KeyPair};
use covey_proto::manifest::Manifest;
use covey_proto::signing::{self, DeviceMethod, UpdateHeader};
use covey_sim::config::Experiment;
use covey_sim::progress::Silent;
use covey_sim::{prepare, runner};

fn experiment(strategy: &str) -> Experiment {
    let data = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../data/shakespeare"));
    let text = format!(
        r#"
name = "shared-policy"
seed = 11
[data]
path = "{data}"
eval-bytes = 2000
[data.leaf]
plays = ["macbeth"]
[data.partitioner]
kind = "iid"
clients = 6
[training]
steps = 2
batch-size = 2
seq-len = 32
[rounds]
rounds = 1
clients-per-round = 3
parallel = 2
[privacy]
clip-norm = 0.5
[strategy]
{strategy}
"#,
        data = data.display()
    );
    Experiment::from_toml(&text, std::path::Path::new("shared-policy.toml")).expect("experiment")
}

async fn same_round(strategy: &str) {
    let prepared = prepare::prepare(&experiment(strategy)).expect("prepare");

    // The simulator's round 1.
    let mut sim = runner::InProcess::new(&prepared).expect("simulator");
    let simulated = sim.round(1, &Silent).expect("simulated round");
    assert!(!simulated.members.is_empty(), "nobody sampled");

    // The coordinator's round 1 on the same configuration: one device per client,
    // enrolled in population order.
    let work = tempfile::tempdir().expect("tmp");
    let base = work.path().join("base");
    std::fs::create_dir_all(&base).expect("base dir");
    std::fs::write(base.join("config.json"), &prepared.config_json).expect("config");
    std::fs::write(base.join("model.safetensors"), covey_tensors::encode(&prepared.master, None).expect("encode"))
        .expect("weights");
    let mut config = prepared.fleet_config();
    config.initial_model = Some(base);
    config.state_dir = work.path().join("state");
    config.enrollment.tokens = vec!["shared-policy".into()];
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let key = KeyPair::generate().expect("key");
    let engine =
        Coordinator::open(config, store, Artifacts::memory(), key, Arc::new(Metrics::default())).await.expect("engine");
    let devices: Vec<KeyPair> = (0..prepared.population()).map(|_| KeyPair::generate().expect("key")).collect();
    for d in &devices {
        engine.enroll(&d.public_key(), "shared-policy", "device").await.expect("enrol");
    }
    let round = engine.open_round().await.expect("open").round().expect("a round opens");
    let mut sampled = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        let ts = engine.now_ms();
        let signature = d.sign(&signing::device_request_bytes_for(DeviceMethod::Poll, &d.device_id(), ts, &[]));
        if let PollOutcome::Task(t) = engine.poll(&d.device_id(), ts, &signature).await.expect("poll") {
            sampled.push((i, *t));
        }
    }

    // The same devices, the same tasks.
    assert_eq!(sampled.iter().map(|(i, _)| *i).collect::<Vec<_>>(), simulated.members, "cohorts differ");
    for ((_, served), simulated) in sampled.iter().zip(&simulated.tasks) {
        assert_eq!(served.task.round_id, simulated.round_id);
        assert_eq!(served.task.lora, simulated.lora, "LoRA layout");
        assert_eq!(served.task.training, simulated.training, "training (seed, steps, rates)");
        assert_eq!(served.task.privacy, simulated.privacy, "clip norm and noise");
    }

    // Each sampled device trains its task as the simulator trains its client, from the
    // int8 model and the `A` factors the coordinator serves, and uploads it signed.
    let v1 = engine.store().version(1).await.expect("store").expect("version 1");
    let manifest = Manifest::verify(&v1.manifest, &v1.signature, &engine.public_key()).expect("manifest");
    let model_hash: [u8; 32] = hex::decode(&manifest.release.model.sha256).expect("hex").try_into().expect("32 bytes");
    let (published, _) =
        covey_tensors::quant::decode_model(&engine.artifacts().get(&model_hash).expect("model")).expect("int8");
    let a = weights::a_factors(&prepared.master, &engine.config().lora);
    let job = runner::RoundJob { prepared: &prepared, published: &published, a: &a, round: 1 };
    for (i, served) in &sampled {
        let t = &served.task;
        let out = runner::train_task(&job, &prepared.dataset.clients[*i], t).expect("train").expect("has text");
        let payload = covey_tensors::encode(&out.update.delta, None).expect("encode");
        let header = UpdateHeader {
            device_id: devices[*i].device_id(),
            round_id: t.round_id,
            task_id: t.task_id,
            base_manifest_hash: t.base_manifest_hash,
            nonce: t.nonce,
            payload_len: payload.len() as u64,
            payload_sha256: keys::sha256(&payload),
            clip_norm: t.privacy.clip_norm,
            noise_multiplier: t.privacy.noise_multiplier,
            num_examples: t.training.examples(),
            within_clip: out.update.within_clip,
        };
        let bytes = header.to_bytes();
        let signature = devices[*i].sign(&bytes);
        engine.accept_update(&bytes, &signature, &payload, out.loss_last).await.expect("accepted");
    }
    engine.drive(round).await.expect("aggregate and publish");

    // The same aggregate: the published master weights are the simulator's, bit for bit.
    let v2 = engine.store().version(2).await.expect("store").expect("version 2 published");
    let (master, _) = covey_tensors::decode(&engine.artifacts().get(&v2.master_sha256).expect("master")).expect("f32");
    assert!(master == *sim.master(), "the coordinator's aggregate differs from the simulator's");
    assert_ne!(master, prepared.master, "the round changed the model");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_fedavg_round_is_the_same_round_in_the_simulator_and_the_coordinator() {
    same_round(r#"kind = "fed-avg""#).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_fedadam_round_is_the_same_round_in_the_simulator_and_the_coordinator() {
    same_round("kind = \"fed-adam\"\neta = 0.01").await;
}
