//! What the end-to-end tests share: the repository's Macbeth cut into parts, a
//! coordinator configuration for four devices on loopback, and SmolLM2's GGUF when it is
//! present.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use covey_agent::{AgentConfig, RunSummary};
use covey_coordinator::CoordinatorConfig;

/// The fault-injecting TCP proxy of the network-fault tests.
pub mod proxy;

/// The enrolment token of every test coordinator.
pub const TOKEN: &str = "end-to-end-token";

/// Macbeth, from the repository's data, cut into five parts: four devices' local text and
/// a held-out part.
pub fn corpus() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/shakespeare/macbeth_gut.txt");
    let text = std::fs::read_to_string(&path).expect("data/shakespeare/macbeth_gut.txt ships with the repository");
    let lines: Vec<&str> = text.lines().collect();
    lines.chunks(lines.len().div_ceil(5)).map(|c| c.join("\n")).collect()
}

/// A coordinator on 127.0.0.1 (any port) with its state under `root/coordinator`,
/// `model` as its initial model, rounds of exactly four devices, three rounds.
pub fn coordinator_config(root: &Path, model: &Path) -> CoordinatorConfig {
    let mut c = CoordinatorConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        metrics_listen: None,
        state_dir: root.join("coordinator"),
        initial_model: Some(model.to_owned()),
        ..CoordinatorConfig::default()
    };
    c.enrollment.tokens = vec![TOKEN.into()];
    c.enrollment.per_token_per_minute = 100;
    c.lora.rank = 4;
    c.lora.alpha = 8.0;
    c.rounds.target_updates = 4;
    c.rounds.over_selection = 0.0;
    c.rounds.min_updates = 4;
    c.rounds.min_available = 4;
    c.rounds.max_rounds = 3;
    c.rounds.deadline = Duration::from_secs(600);
    c.rounds.pause = Duration::from_millis(10);
    c.rounds.poll_interval = Duration::from_millis(200);
    c.training.steps = 12;
    c.training.batch_size = 4;
    c.training.seq_len = 64;
    c.training.learning_rate = 1e-2;
    c.privacy.clip_norm = 10.0;
    c
}

/// SmolLM2-135M-Instruct's GGUF, when present (`scripts/fetch-smollm2.sh`,
/// `COVEY_SMOLLM2_GGUF`, or `../shared/models`); says so and returns `None` when not.
pub fn smollm2() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let candidates = [
        std::env::var_os("COVEY_SMOLLM2_GGUF").map(PathBuf::from),
        Some(root.join("../models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")),
        Some(root.join("../../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf")),
    ];
    let found = candidates.into_iter().flatten().find(|p| p.is_file());
    if found.is_none() {
        eprintln!(
            "skipping: SmolLM2-135M-Instruct.Q4_1.gguf not found (run scripts/fetch-smollm2.sh, or set COVEY_SMOLLM2_GGUF)"
        );
    }
    found
}

/// Device `i` of a test fleet: its local text in `root/data-{i}/local.txt`, its state in
/// `root/agent-{i}`, the coordinator at `url`, polls at most every half second.
pub fn device_config(root: &Path, i: usize, url: &str, text: &str) -> AgentConfig {
    let data = root.join(format!("data-{i}"));
    std::fs::create_dir_all(&data).expect("mkdir");
    std::fs::write(data.join("local.txt"), text).expect("write data");
    let mut cfg = AgentConfig::new(root.join(format!("agent-{i}")), data);
    cfg.coordinator = Some(url.to_owned());
    cfg.max_poll_wait = Duration::from_millis(500);
    cfg
}

/// Wait for every agent run (at most 15 minutes each) and return their summaries.
pub async fn finished(agents: Vec<tokio::task::JoinHandle<covey_agent::Result<RunSummary>>>) -> Vec<RunSummary> {
    let mut out = Vec::new();
    for a in agents {
        out.push(
            tokio::time::timeout(Duration::from_secs(900), a)
                .await
                .expect("agents finish")
                .expect("join")
                .expect("run"),
        );
    }
    out
}

/// SplitMix64: a small seeded generator for the tests' fault plans and mutations.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n) (0 when n is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// Uniform in [lo, hi].
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo { lo } else { lo + self.next() % (hi - lo + 1) }
    }
}
