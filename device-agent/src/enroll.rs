//! Enrolment: a new device identity registered with the coordinator.

use covey_proto::keys::KeyPair;

use crate::client::CoordinatorClient;
use crate::config::AgentConfig;
use crate::error::{AgentError, Result};
use crate::identity::{self, Identity};

pub use covey_proto::signing::MAX_LABEL_BYTES;

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
    let coordinator = CoordinatorClient::connect(&url, cfg)?;
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
