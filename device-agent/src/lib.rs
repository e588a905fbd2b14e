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
//!    `checkpoint_every` steps under `state/checkpoint/{task id}` ([`checkpoint`]).
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
pub mod budget;
pub mod checkpoint;
pub mod client;
pub mod config;
pub mod download;
pub mod enroll;
pub mod error;
pub mod identity;
pub mod infer;
pub mod models;
pub mod personal;
pub mod run;
pub mod task;
pub mod train;
pub mod update;

pub use client::CoordinatorClient;
pub use config::{AgentConfig, BackoffConfig, TlsConfig};
pub use enroll::{MAX_LABEL_BYTES, enroll};
pub use error::{AgentError, Result};
pub use identity::Identity;
pub use infer::{
    AgentStatus, ExportedAdapter, Generated, PersonalUse, Suggestion, Suggestions, chat, export_adapter, generate,
    status, suggest,
};
pub use run::{RunSummary, RunUntil, run, run_with_shutdown};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub use covey_proto::signing::unix_ms as now_ms;
