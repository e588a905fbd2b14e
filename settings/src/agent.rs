//! The agent's configuration file: serde structs with documented defaults, loaded from TOML (kebab-case
//! keys, unknown keys refused) and checked by [`AgentConfig::validate`].
//!
//! ```
//! use covey_settings::AgentConfig;
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

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Result, SettingsError};
use crate::training::{ExampleDp, PersonalConfig};

/// Everything the agent needs to run. Every field has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct AgentConfig {
    /// Coordinator URL (`http://host:port` or `https://host:port`). Required to enrol;
    /// when running, `None` uses the URL recorded at enrolment. Default none.
    pub coordinator: Option<String>,
    /// State directory: identity, key, verified models, checkpoints. Default `covey-state`.
    pub state_dir: PathBuf,
    /// Local training data: a `.txt` / `.jsonl` file or a directory of them. It never
    /// leaves the device. Default `covey-data`.
    pub data_dir: PathBuf,
    /// TLS towards the coordinator.
    pub tls: TlsConfig,
    /// Retry of failed calls.
    pub backoff: BackoffConfig,
    /// Data-parallel training threads (burn's CPU kernels use about one core each).
    /// Default 1.
    pub train_threads: usize,
    /// Save the adapter every this many optimizer steps, so a crash resumes the task
    /// there; 0 never. Default 10.
    pub checkpoint_every: usize,
    /// Time limit of one unary call. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Time limit to open a connection. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest wait between polls, whatever the coordinator asks. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub max_poll_wait: Duration,
    /// Largest artifact (model, factors) accepted, in bytes. Default 2 GiB.
    pub max_artifact_bytes: u64,
    /// Stop with an error after this many tasks failed in a row; `None` never gives up.
    /// Default none.
    pub max_task_failures: Option<u32>,
    /// Model versions kept in the cache besides the newest. Default 1.
    pub keep_versions: usize,
    /// Lifetime privacy budget of this device (`{ epsilon = 8.0, delta = 1e-5 }`): every
    /// task is charged to `state/privacy-ledger.json` before training (RDP of the local
    /// Gaussian, z = the task's noise multiplier, no subsampling credit), tasks without
    /// local noise are refused, and once the budget would be exceeded the agent stops.
    /// Default none (no device-side accounting; rely on the coordinator's central DP).
    pub privacy_budget: Option<covey_privacy::Budget>,
    /// The largest LoRA rank this device trains, told to the coordinator with each poll; a
    /// coordinator that allows smaller ranks (`lora.device-ranks`) gives it the largest
    /// one not above this. 0: follow `max-memory-bytes` (the largest rank whose task would
    /// fit it, on the model and training shape of the last task), or any rank without a
    /// memory limit. Default 0.
    pub max_lora_rank: u32,
    /// Memory a task may use, in bytes (`None`: no limit). Before it downloads a version's
    /// weights the agent estimates what training the task needs (`covey_agent::budget`) and
    /// declines a task that would not fit, telling the coordinator why. Default none.
    pub max_memory_bytes: Option<u64>,
    /// Example-level DP-SGD in local training (`{ clip = 1.0, noise-multiplier = 1.0 }`):
    /// each training sequence's gradient clipped, Gaussian noise on every step, so that
    /// the uploaded adapter protects each sequence of the local text on top of what the
    /// task's update-level clipping and noise protect. Default none.
    pub example_dp: Option<ExampleDp>,
    /// Personalisation (`[personalisation]`: method `fed-recon` or `ditto`, rank, steps,
    /// learning rate, λ): after each update it sends, the device fits its own adapter on
    /// its text, stacked on the version it trained on, and seals it under
    /// `state/personal/` (`covey_agent::personal`). It is used for this device's generation and
    /// suggestions and never uploaded. Needs a key: `personal-key-file`, or the host app's
    /// in `COVEY_PERSONAL_KEY`. Default none.
    pub personalisation: Option<PersonalConfig>,
    /// File of the local adapter's key (64 hex characters; created owner-only when
    /// missing), outside the state and data directories. Default none.
    pub personal_key_file: Option<PathBuf>,
}

/// The environment variable a host app hands the local adapter's key over in (64 hex
/// characters), instead of a key file.
pub const PERSONAL_KEY_ENV: &str = "COVEY_PERSONAL_KEY";

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            coordinator: None,
            state_dir: PathBuf::from("covey-state"),
            data_dir: PathBuf::from("covey-data"),
            tls: TlsConfig::default(),
            backoff: BackoffConfig::default(),
            train_threads: 1,
            checkpoint_every: 10,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_poll_wait: Duration::from_secs(60),
            max_artifact_bytes: 2 << 30,
            max_task_failures: None,
            keep_versions: 1,
            privacy_budget: None,
            max_lora_rank: 0,
            max_memory_bytes: None,
            example_dp: None,
            personalisation: None,
            personal_key_file: None,
        }
    }
}

/// TLS settings. Without any of them, `http://` URLs are used in the clear and
/// `https://` URLs need `ca-cert` (no system roots are compiled in).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct TlsConfig {
    /// PEM of the CA that signed the coordinator's certificate. When absent, the CA
    /// pinned at enrolment (`state/ca.pem`) is used if there is one.
    pub ca_cert: Option<PathBuf>,
    /// PEM certificate of this device, for mutual TLS (with `client-key`).
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client-cert`.
    pub client_key: Option<PathBuf>,
    /// Name to check the coordinator's certificate against, when it differs from the
    /// URL's host.
    pub domain_name: Option<String>,
}

impl TlsConfig {
    /// Whether any TLS setting is given.
    pub fn is_configured(&self) -> bool {
        self.ca_cert.is_some() || self.client_cert.is_some() || self.client_key.is_some() || self.domain_name.is_some()
    }
}

/// Exponential backoff with jitter for transient failures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct BackoffConfig {
    /// First delay. Default 200 ms.
    #[serde(with = "humantime_serde")]
    pub base: Duration,
    /// Largest delay. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub cap: Duration,
    /// Attempts of one call before its task is given up; 0 retries forever. Default 12.
    pub max_attempts: u32,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self { base: Duration::from_millis(200), cap: Duration::from_secs(30), max_attempts: 12 }
    }
}

impl AgentConfig {
    /// A configuration for `state_dir` and `data_dir`, everything else default.
    pub fn new(state_dir: impl Into<PathBuf>, data_dir: impl Into<PathBuf>) -> Self {
        Self { state_dir: state_dir.into(), data_dir: data_dir.into(), ..Self::default() }
    }

    /// Parse TOML (defaults for what is absent) and validate.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        Self::parse_toml(text, Path::new("<string>"))
    }

    /// Read a TOML file (defaults for what is absent) and validate.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| SettingsError::Io { path: path.to_owned(), source: e })?;
        Self::parse_toml(&text, path)
    }

    fn parse_toml(text: &str, path: &Path) -> Result<Self> {
        let cfg: Self =
            toml::from_str(text).map_err(|e| SettingsError::Toml { path: path.to_owned(), source: Box::new(e) })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check that every value is possible; returns the first problem found.
    pub fn validate(&self) -> Result<()> {
        if let Some(url) = &self.coordinator
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(SettingsError::invalid("coordinator", format!("{url} is not an http:// or https:// URL")));
        }
        if self.train_threads == 0 {
            return Err(SettingsError::invalid("train-threads", "must be at least 1"));
        }
        if let Some(dp) = &self.example_dp
            && let Err(e) = dp.validate()
        {
            return Err(SettingsError::invalid("example-dp", e.to_string()));
        }
        if self.backoff.base.is_zero() || self.backoff.cap < self.backoff.base {
            return Err(SettingsError::invalid("backoff", "base must be > 0 and cap >= base"));
        }
        if self.tls.client_cert.is_some() != self.tls.client_key.is_some() {
            return Err(SettingsError::invalid("tls", "client-cert and client-key go together"));
        }
        if self.request_timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(SettingsError::invalid("request-timeout", "timeouts must be > 0"));
        }
        if self.max_artifact_bytes == 0 {
            return Err(SettingsError::invalid("max-artifact-bytes", "must be > 0"));
        }
        if let Some(b) = &self.privacy_budget
            && !(b.epsilon.is_finite() && b.epsilon > 0.0 && b.delta > 0.0 && b.delta < 1.0)
        {
            return Err(SettingsError::invalid("privacy-budget", "epsilon must be > 0 and delta in (0, 1)"));
        }
        if let Some(p) = &self.personalisation {
            p.validate().map_err(|e| SettingsError::invalid("personalisation", e.to_string()))?;
            if self.personal_key_file.is_none() && std::env::var_os(PERSONAL_KEY_ENV).is_none() {
                return Err(SettingsError::invalid(
                    "personalisation",
                    format!("needs a key: personal-key-file, or {PERSONAL_KEY_ENV} from the host app"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_toml_overrides_them() {
        AgentConfig::default().validate().expect("defaults");
        let cfg = AgentConfig::from_toml_str("train-threads = 2\n[backoff]\nmax-attempts = 3\n").expect("parse");
        assert_eq!(cfg.train_threads, 2);
        assert_eq!(cfg.backoff.max_attempts, 3);
        assert_eq!(cfg.backoff.base, Duration::from_millis(200));
    }

    #[test]
    fn the_example_config_parses_and_validates() {
        let cfg = AgentConfig::from_toml_str(include_str!("../../device-agent/agent.example.toml")).expect("example");
        assert_eq!(cfg.coordinator.as_deref(), Some("https://coordinator.example:7443"));
        assert_eq!(cfg.tls.ca_cert, Some(PathBuf::from("/etc/covey/ca.pem")));
        let defaults = AgentConfig {
            coordinator: cfg.coordinator.clone(),
            tls: TlsConfig { ca_cert: cfg.tls.ca_cert.clone(), ..TlsConfig::default() },
            ..AgentConfig::default()
        };
        assert_eq!(cfg, defaults, "the example shows the defaults");
    }

    #[test]
    fn personalisation_parses_and_needs_a_key() {
        let text = "personal-key-file = \"/keys/p.key\"\n[personalisation]\nmethod = \"ditto\"\nlambda = 0.5\n";
        let cfg = AgentConfig::from_toml_str(text).expect("parse");
        cfg.validate().expect("valid");
        let p = cfg.personalisation.expect("section");
        assert_eq!((p.method, p.lambda, p.rank), (crate::training::PersonalMethod::Ditto, 0.5, 4));
        if std::env::var_os(PERSONAL_KEY_ENV).is_none() {
            let err = AgentConfig::from_toml_str("[personalisation]\nsteps = 5\n")
                .and_then(|c| c.validate())
                .expect_err("no key");
            assert!(err.to_string().contains("personal-key-file"), "{err}");
        }
        let err = AgentConfig::from_toml_str("personal-key-file = \"/k\"\n[personalisation]\nrank = 0\n")
            .and_then(|c| c.validate())
            .expect_err("rank 0");
        assert!(err.to_string().contains("personalisation") && err.to_string().contains("rank"), "{err}");
    }

    #[test]
    fn a_privacy_budget_parses_and_is_checked() {
        let cfg = AgentConfig::from_toml_str("[privacy-budget]\nepsilon = 8.0\ndelta = 1e-5\n").expect("budget");
        assert_eq!(cfg.privacy_budget.map(|b| b.epsilon), Some(8.0));
        let bad = AgentConfig::from_toml_str("[privacy-budget]\nepsilon = -1.0\ndelta = 1e-5\n")
            .and_then(|c| c.validate())
            .expect_err("negative budget");
        assert!(bad.to_string().contains("privacy-budget"), "{bad}");
    }

    #[test]
    fn typos_and_impossible_values_are_refused() {
        let err = AgentConfig::from_toml_str("train-thread = 2").expect_err("typo").to_string();
        assert!(err.contains("train-thread"), "{err}");
        let err = AgentConfig::from_toml_str("coordinator = \"ftp://x\"").expect_err("scheme").to_string();
        assert!(err.contains("coordinator"), "{err}");
        let err = AgentConfig::from_toml_str("[tls]\nclient-cert = \"c.pem\"").expect_err("no key").to_string();
        assert!(err.contains("client-key"), "{err}");
        let err = AgentConfig::from_toml_str("example-dp = { clip = 0.0, noise-multiplier = 1.0 }")
            .expect_err("zero clip")
            .to_string();
        assert!(err.contains("example-dp") && err.contains("clip"), "{err}");
        let ok = AgentConfig::from_toml_str("example-dp = { clip = 1.0, noise-multiplier = 0.5 }").expect("valid");
        assert_eq!(ok.example_dp.map(|d| (d.clip, d.noise_multiplier)), Some((1.0, 0.5)));
    }
}
