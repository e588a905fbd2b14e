//! Agent settings. The types — [`AgentConfig`] and its sections, serde structs with
//! documented defaults, loaded from TOML (kebab-case keys, unknown keys refused) and
//! checked by [`AgentConfig::validate`] — live in `covey-settings`, which does not link
//! burn, so that the file can be parsed, checked and fuzzed without the model; they are
//! re-exported here. The sealed local adapter's store a configuration names is opened by
//! [`crate::personal::open_store`].
//!
//! ```
//! use covey_agent::AgentConfig;
//! let cfg = AgentConfig::from_toml_str(r#"
//!     state-dir = "/var/lib/covey"
//!     data-dir = "/home/me/notes"
//!     coordinator = "https://coordinator.example:7443"
//!     [tls]
//!     ca-cert = "/etc/covey/ca.pem"
//!     [backoff]
//!     base = "200ms"
//!     cap = "30s"
//! "#).unwrap();
//! assert_eq!(cfg.backoff.cap, std::time::Duration::from_secs(30));
//! assert_eq!(cfg.train_threads, 1);
//! ```

pub use covey_settings::agent::{AgentConfig, BackoffConfig, PERSONAL_KEY_ENV, TlsConfig};
