//! A coordinator and four device agents over real gRPC on 127.0.0.1 for three rounds:
//! the global model's held-out loss falls, every published version is signed, and an
//! agent refuses a version whose signature or bytes do not match.

use std::path::Path;
use std::time::Duration;

use covey_agent::{AgentConfig, RunUntil};
use covey_coordinator::server;
use covey_coordinator::store::RoundState;
use covey_model::{LlamaConfig, Tokenizer};
use covey_proto::manifest::Manifest;

mod common;
use common::{TOKEN, coordinator_config, corpus, device_config, finished};

fn model_config() -> LlamaConfig {
    LlamaConfig {
        hidden_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        intermediate_size: 128,
        vocab_size: 256,
        max_position_embeddings: 128,
        ..LlamaConfig::default()
    }
}

/// A randomly initialised byte-level model saved under `root/base`.
fn base_model(root: &Path, seed: u64) -> std::path::PathBuf {
    let base = covey_model::Llama::init(&model_config(), seed, &covey_model::cpu_device()).expect("init");
    let dir = root.join("base");
    covey_model::checkpoint::save_model(&base, &Tokenizer::Bytes, &dir).expect("save base");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_federated_rounds_lower_the_held_out_loss() {
    let root = tempfile::tempdir().expect("tmp");
    let device = covey_model::cpu_device();
    let config = model_config();
    let model_dir = base_model(root.path(), 7);

    let parts = corpus();
    let held_out = vec![parts[4].clone()];
    let engine = server::open_engine(coordinator_config(root.path(), &model_dir)).await.expect("engine");
    let running = server::start(engine.clone()).await.expect("start");
    let url = format!("http://{}", running.addr);

    let mut agents = Vec::new();
    for (i, part) in parts.iter().take(4).enumerate() {
        let cfg = device_config(root.path(), i, &url, part);
        covey_agent::enroll(&cfg, TOKEN, &format!("agent-{i}")).await.expect("enrol");
        agents.push(tokio::spawn(covey_agent::run(cfg, RunUntil::Updates(3))));
    }
    for summary in finished(agents).await {
        assert_eq!(summary.submitted, 3);
        assert_eq!(summary.rounds, vec![1, 2, 3]);
    }
    let store = engine.store().clone();
    for _ in 0..600 {
        if store.rounds(10).await.expect("rounds").iter().filter(|r| r.state == RoundState::Published).count() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let versions = store.versions().await.expect("versions");
    assert_eq!(versions.len(), 4, "the initial version and one per round");

    // Every version is signed by the coordinator; the held-out loss falls.
    let mut losses = Vec::new();
    for v in versions.iter().rev() {
        let m = Manifest::verify(&v.manifest, &v.signature, &engine.public_key()).expect("signed manifest");
        assert_eq!(m.version, v.version);
        // The weights devices run: the int8 release plus the adapter.
        let (weights, _) = engine.device_weights(v.version).await.expect("weights");
        let metrics =
            covey_model::evaluate_texts(&config, &weights, &Tokenizer::Bytes, &held_out, 64, &device).expect("eval");
        losses.push(metrics.mean_nll);
    }
    eprintln!("held-out NLL by version: {losses:?}");
    assert!(losses[3] < losses[0] - 0.05, "held-out loss did not fall: {losses:?}");

    // An agent refuses a manifest whose signature does not match ...
    let v = &versions[0];
    let mut tampered = v.manifest.clone();
    let i = tampered.iter().position(|&b| b == b'1').expect("a digit");
    tampered[i] = b'2';
    let key = engine.public_key();
    let err = covey_agent::models::VerifiedManifest::verify(&tampered, &v.signature, &key, v.version, None)
        .expect_err("tampered manifest");
    assert!(err.to_string().contains("manifest"), "{err}");
    let other = covey_proto::keys::KeyPair::generate().expect("key");
    let forged = other.sign(&v.manifest);
    assert!(covey_agent::models::VerifiedManifest::verify(&v.manifest, &forged, &key, v.version, None).is_err());
    // ... and an artifact whose bytes do not match the hash it was asked for.
    let manifest = Manifest::verify(&v.manifest, &v.signature, &key).expect("manifest");
    let model_hash = manifest.release.model.sha256_bytes().expect("hash");
    let blob = root.path().join("coordinator/artifacts").join(&manifest.release.model.sha256);
    let mut bytes = std::fs::read(&blob).expect("blob");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&blob, &bytes).expect("corrupt the blob");
    let mut cfg = AgentConfig::new(root.path().join("agent-x"), root.path().join("data-0"));
    cfg.backoff.max_attempts = 1;
    let client = covey_agent::CoordinatorClient::connect(&url, &cfg).expect("client");
    let identity = covey_agent::Identity::load(&root.path().join("agent-0")).expect("an enrolled agent");
    let err = client.fetch_artifact(&identity, &model_hash, None, 1 << 30).await.expect_err("corrupted artifact");
    // The coordinator re-hashes what it streams and ends with DATA_LOSS; the agent checks
    // the hash itself too (ArtifactMismatch) whatever a coordinator sends.
    assert!(
        matches!(err, covey_agent::AgentError::ArtifactMismatch { .. }) || err.code() == Some(tonic::Code::DataLoss),
        "{err}"
    );
    running.abort();
}

/// A device with a lifetime budget that covers one noised update but not two: it takes
/// part once, then stops with a clear error; its ledger holds the ε spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_never_exceeds_its_privacy_budget() {
    let root = tempfile::tempdir().expect("tmp");
    let model_dir = base_model(root.path(), 3);
    let mut c = coordinator_config(root.path(), &model_dir);
    c.rounds.target_updates = 1;
    c.rounds.min_updates = 1;
    c.rounds.min_available = 1;
    c.training.steps = 2;
    c.privacy.clip_norm = 1.0;
    c.privacy.local_noise_multiplier = 1.0;
    let engine = server::open_engine(c).await.expect("engine");
    let running = server::start(engine.clone()).await.expect("start");

    let delta = 1e-5;
    let (one, _) = covey_privacy::rdp::epsilon(1.0, 1.0, 1, delta).expect("epsilon");
    let (two, _) = covey_privacy::rdp::epsilon(1.0, 1.0, 2, delta).expect("epsilon");
    let data = root.path().join("data");
    std::fs::create_dir_all(&data).expect("mkdir");
    std::fs::write(data.join("local.txt"), &corpus()[0]).expect("write");
    let mut cfg = AgentConfig::new(root.path().join("agent"), data);
    cfg.coordinator = Some(format!("http://{}", running.addr));
    cfg.max_poll_wait = Duration::from_millis(300);
    cfg.privacy_budget = Some(covey_privacy::Budget { epsilon: (one + two) / 2.0, delta });
    let identity = covey_agent::enroll(&cfg, TOKEN, "budgeted").await.expect("enrol");
    let err = tokio::time::timeout(Duration::from_secs(300), covey_agent::run(cfg, RunUntil::Updates(3)))
        .await
        .expect("the agent stops")
        .expect_err("the budget stops the agent");
    assert!(
        matches!(err, covey_agent::AgentError::Privacy(covey_privacy::PrivacyError::BudgetExceeded { .. })),
        "{err}"
    );
    let ledger = covey_privacy::BudgetLedger::open(
        &root.path().join("agent").join(covey_agent::run::LEDGER_FILE),
        covey_privacy::Budget { epsilon: (one + two) / 2.0, delta },
    )
    .expect("ledger");
    let spent = ledger.spent(&identity.device_id_hex()).expect("spent");
    assert!((spent - one).abs() < 1e-9, "spent {spent}, one release costs {one}");
    assert_eq!(engine.store().device_update_count(&identity.device_id).await.expect("count"), 1);
    running.abort();
}
