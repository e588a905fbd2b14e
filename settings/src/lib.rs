//! # covey-settings
//!
//! What a device is configured with, as serde structs with documented defaults and one
//! validation each, free of burn:
//!
//! * [`agent`]: the agent's configuration file ([`AgentConfig`], `agent.toml`).
//! * [`training`]: the training options that file (and a simulator experiment) carries:
//!   example-level DP-SGD ([`ExampleDp`]) and personalisation ([`PersonalConfig`]).
//!
//! `covey-model` and `covey-agent` re-export these types at their old paths and add the
//! behaviour that needs the model (a [`PersonalConfig`]'s LoRA factors and training run
//! live in `covey_model::personal`). Keeping the parsing here means the agent's file can
//! be parsed, checked and fuzzed (`fuzz/`, target `agent_config`) without compiling the
//! model.
//!
//! ```
//! let cfg = covey_settings::AgentConfig::from_toml_str("train-threads = 2\n").unwrap();
//! assert_eq!(cfg.train_threads, 2);
//! ```

pub mod agent;
pub mod error;
pub mod training;

pub use agent::{AgentConfig, BackoffConfig, PERSONAL_KEY_ENV, TlsConfig};
pub use error::{Result, SettingsError};
pub use training::{ExampleDp, PersonalConfig, PersonalMethod};
