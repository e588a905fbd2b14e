//! # covey-agent
//!
//! The on-device runtime of Covey: the device's Ed25519 identity, a gRPC client of the
//! coordinator with retry, verified model downloads, local FFA-LoRA fine-tuning on local
//! text (through `covey-model`), clipping and local-DP noise (through `covey-privacy`),
//! signed uploads, crash-resumable tasks, and local inference.
//!
//! ## Quick start
//!
//! ```no_run
//! # async fn demo() -> Result<(), covey_agent::AgentError> {
//! use covey_agent::{AgentConfig, RunUntil};
//!
//! let mut cfg = AgentConfig::new("/var/lib/covey", "/home/me/notes");
//! cfg.coordinator = Some("http://127.0.0.1:7070".into());
//! let identity = covey_agent::enroll(&cfg, "enrolment-token", "pixel-8").await?;
//! println!("enrolled as {}", identity.device_id_hex());
//! let summary = covey_agent::run(cfg, RunUntil::Updates(3)).await?;
//! println!("{} updates accepted, rounds {:?}", summary.submitted, summary.rounds);
//! # Ok(()) }
//! ```
//!
//! ## One task
//!
//! 1. `PollTask`, signed with the device key, returns a task (or a time to wait).
//! 2. The base version is taken from the cache or fetched: the manifest's signature is
//!    checked with the coordinator key recorded at enrolment, its SHA-256 against the
//!    task, and every artifact against the manifest, before anything is written
//!    ([`models`]).
//! 3. `B` is trained on a blocking thread with `A` frozen, checkpointed every
//!    `checkpoint_every` steps under `state/checkpoint/{task id}` ([`task`]).
//! 4. `B` is clipped to `C` and noised (`z·C`) as the task says, encoded, bound to the
//!    task in a signed header, persisted, and streamed to the coordinator ([`update`]).
//!
//! ## State directory
//!
//! `device.key` (PKCS#8, mode 0600), `identity.json`, `ca.pem` (optional),
//! `models/v{n}/`, `artifacts/{sha256}`, `checkpoint/{task id}/`, `history.jsonl`.
//!
//! Architecture invariant: the agent never links the coordinator, its storage stack or
//! the aggregation strategies; it speaks to the coordinator only through `covey-proto`.

pub mod backoff;
pub mod checkpoint;
pub mod client;
pub mod config;
pub mod error;
pub mod identity;
pub mod infer;
pub mod models;
pub mod run;
pub mod task;
pub mod train;
pub mod update;

pub use client::Coordinator;
pub use config::{AgentConfig, BackoffConfig, TlsConfig};
pub use error::{AgentError, Result};
pub use identity::Identity;
pub use infer::{AgentStatus, Generated, generate, status};
pub use run::{RunSummary, RunUntil, run, run_with_shutdown};

use covey_proto::keys::KeyPair;

/// Longest enrolment label the coordinator accepts, in bytes.
pub const MAX_LABEL_BYTES: usize = 128;

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Enrol this device with the coordinator of `cfg.coordinator`: generate a key pair,
/// register its public key with `token`, and write the identity into `cfg.state_dir`
/// (`device.key` with mode 0600, `identity.json`; `cfg.tls.ca_cert` is copied to
/// `ca.pem` and pinned for later runs). Refuses a state directory that already holds an
/// identity.
pub async fn enroll(cfg: &AgentConfig, token: &str, label: &str) -> Result<Identity> {
    cfg.validate()?;
    let url = cfg.coordinator.clone().ok_or_else(|| AgentError::Config {
        field: "coordinator",
        reason: "enrolment needs the coordinator's URL".into(),
    })?;
    if label.len() > MAX_LABEL_BYTES {
        return Err(AgentError::Config { field: "label", reason: format!("longer than {MAX_LABEL_BYTES} bytes") });
    }
    if let Ok(existing) = Identity::load(&cfg.state_dir) {
        return Err(AgentError::AlreadyEnrolled {
            state_dir: cfg.state_dir.clone(),
            device_id: existing.device_id_hex(),
        });
    }
    let key = KeyPair::generate().map_err(|source| AgentError::Proto { what: "device key", source })?;
    let coordinator = Coordinator::connect(&url, cfg)?;
    let (device_id, coordinator_key) = coordinator.enroll(key.public_key(), token, label).await?;
    let identity = Identity::new(key, coordinator_key, url, label.to_owned());
    debug_assert_eq!(identity.device_id, device_id);
    identity.save(&cfg.state_dir)?;
    if let Some(ca) = &cfg.tls.ca_cert {
        let pem = std::fs::read(ca).map_err(|e| AgentError::io(ca, e))?;
        identity::write_atomic(&cfg.state_dir.join(identity::CA_FILE), &pem)?;
    }
    tracing::info!(device = %identity.device_id_hex(), "enrolled");
    Ok(identity)
}
