//! Four device agents reach the coordinator through a fault-injecting TCP proxy (delays,
//! a bandwidth cap, drops, resets and half-open connections, drawn per connection from a
//! seed; each agent's first connection after enrolment is dropped, reset or left half-open
//! mid-download): every
//! round completes, the agents back off and resume their downloads, and no update is
//! counted twice.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use covey_agent::RunUntil;
use covey_coordinator::server;
use covey_coordinator::store::RoundState;
use covey_model::{LlamaConfig, Tokenizer};

mod common;
use common::proxy::{Cut, FaultProxy, Faults};
use common::{TOKEN, coordinator_config, corpus, device_config, finished};

fn base_model(root: &Path) -> std::path::PathBuf {
    let config = LlamaConfig {
        // About 1.7 M parameters: the int8 release spans two 1 MiB download chunks, so an
        // interrupted download has an offset to resume from.
        hidden_size: 256,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        intermediate_size: 768,
        vocab_size: 256,
        max_position_embeddings: 128,
        ..LlamaConfig::default()
    };
    let base = covey_model::Llama::init(&config, 3, &covey_model::cpu_device()).expect("init");
    let dir = root.join("base");
    covey_model::checkpoint::save_model(&base, &Tokenizer::Bytes, &dir).expect("save base");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_complete_through_drops_resets_half_open_connections_and_slow_links() {
    // RUST_LOG=covey_agent=warn shows every interruption and resumption.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let seed: u64 = std::env::var("COVEY_FAULT_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(11);
    let root = tempfile::tempdir().expect("tmp");
    let model_dir = base_model(root.path());
    let mut config = coordinator_config(root.path(), &model_dir);
    config.rounds.max_rounds = 2;
    config.training.steps = 4;
    let engine = server::open_engine(config).await.expect("engine");
    let running = server::start(engine.clone()).await.expect("start");
    let proxy = FaultProxy::start(running.addr, Faults::none(), seed).await;
    let url = format!("http://{}", proxy.addr);

    let parts = corpus();
    let mut configs = Vec::new();
    for (i, part) in parts.iter().take(4).enumerate() {
        let mut cfg = device_config(root.path(), i, &url, part);
        // Short timeouts so that half-open connections end quickly; retries without limit.
        cfg.request_timeout = Duration::from_secs(3);
        cfg.connect_timeout = Duration::from_secs(2);
        cfg.backoff.base = Duration::from_millis(50);
        cfg.backoff.cap = Duration::from_millis(500);
        cfg.backoff.max_attempts = 0;
        covey_agent::enroll(&cfg, TOKEN, &format!("agent-{i}")).await.expect("enrol");
        configs.push(cfg);
    }
    let after_enrolment = proxy.stats.connections.load(Ordering::SeqCst);
    proxy.set(Faults {
        max_delay: Duration::from_millis(5),
        bandwidth: 2 << 20,
        drop: 0.15,
        reset: 0.1,
        half_open: 0.05,
        after_bytes: (4 << 10, 2 << 20),
        // Each agent's first connection is cut 1.3 MiB into what it receives, inside the
        // second chunk of the first model download: dropped, reset, left half-open.
        forced: vec![Cut::Drop, Cut::Reset, Cut::HalfOpen, Cut::Drop],
        forced_from: after_enrolment,
        forced_cut_bytes: 1300 << 10,
    });
    let agents: Vec<_> =
        configs.into_iter().map(|cfg| tokio::spawn(covey_agent::run(cfg, RunUntil::Updates(2)))).collect();
    for summary in finished(agents).await {
        assert_eq!(summary.submitted, 2, "every agent delivers both updates");
    }

    let store = engine.store().clone();
    for _ in 0..600 {
        if store.rounds(10).await.expect("rounds").iter().filter(|r| r.state == RoundState::Published).count() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rounds = store.rounds(10).await.expect("rounds");
    for round in [1, 2] {
        let r = rounds.iter().find(|r| r.id == round).expect("round");
        assert_eq!(r.state, RoundState::Published, "round {round} completes");
        let updates = store.updates(round).await.expect("updates");
        let mut devices: Vec<_> = updates.iter().map(|u| u.device_id).collect();
        devices.sort_unstable();
        devices.dedup();
        assert_eq!((updates.len(), devices.len()), (4, 4), "round {round}: one update per device, none twice");
    }
    assert_eq!(store.versions().await.expect("versions").len(), 3);
    let s = &proxy.stats;
    let (dropped, reset, half_open) =
        (s.dropped.load(Ordering::SeqCst), s.reset.load(Ordering::SeqCst), s.half_open.load(Ordering::SeqCst));
    let resumed = engine.metrics().downloads_resumed.get();
    eprintln!(
        "network faults (seed {seed}): {} connections, {dropped} dropped, {reset} reset, {half_open} half-open, \
         {resumed} downloads resumed, {} bytes to agents",
        s.connections.load(Ordering::SeqCst),
        s.bytes_down.load(Ordering::SeqCst)
    );
    assert!(dropped >= 2 && reset >= 1 && half_open >= 1, "the forced cuts happened");
    assert!(resumed >= 1, "an interrupted download resumed from its offset");
    running.abort();
}
