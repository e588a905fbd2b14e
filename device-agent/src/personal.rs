//! The device's own adapter (`covey_model::personal`): fitted on the local text after
//! each global update, stacked on the global model for the device's own generation and
//! suggestions, stored encrypted at rest, never uploaded.
//!
//! **At rest.** `state/personal/local-adapter.sealed` is AES-256-GCM (`ring`) under a
//! 32-byte key kept apart from the state and data directories: handed over by the host
//! app ([`PersonalKey::from_hex`], e.g. from the platform keystore) or read from a key file
//! with owner-only permissions outside both directories ([`PersonalKey::from_file`],
//! created on first use). A fresh random nonce per write; the file's header is
//! authenticated with it. A file that does not decrypt (another key, a flipped byte, a
//! truncation) is an error naming the file, and the device falls back to the global model.
//!
//! **Never uploaded.** Nothing here is reachable from the upload path: an update is built
//! from the task's `B` only (`crate::update`), and the local adapter's tensors carry the
//! `local.` prefix of `covey_model::personal::LOCAL_PREFIX` everywhere they are stored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use covey_model::personal::{LOCAL_PREFIX, LocalAdapter, PersonalConfig, PersonalMethod, PersonalTraining};
use covey_model::{LlamaConfig, NamedTensors};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::error::{AgentError, Result};

/// The sealed file, under the state directory.
pub const SEALED_FILE: &str = "personal/local-adapter.sealed";
/// First bytes of the sealed file (format version 1), authenticated with the contents.
const MAGIC: &[u8; 8] = b"COVEYLA1";

/// The key the local adapter is sealed with.
pub struct PersonalKey(LessSafeKey);

impl std::fmt::Debug for PersonalKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PersonalKey(..)")
    }
}

fn bad_key(reason: impl Into<String>) -> AgentError {
    AgentError::Config { field: "personal-key", reason: reason.into() }
}

impl PersonalKey {
    /// A key from 32 raw bytes.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self> {
        let key = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| bad_key("AES-256-GCM refused the key"))?;
        Ok(Self(LessSafeKey::new(key)))
    }

    /// A key the host app hands over as 64 hex characters.
    pub fn from_hex(text: &str) -> Result<Self> {
        let bytes = hex::decode(text.trim()).map_err(|e| bad_key(format!("not hex: {e}")))?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| bad_key(format!("{} bytes; a key is 32 (64 hex characters)", b.len())))?;
        Self::from_bytes(&bytes)
    }

    /// The key in `path` (64 hex characters), created with a random key and owner-only
    /// permissions when missing. Refused: a file inside `state_dir` or `data_dir` (the key
    /// would travel with what it protects), or readable by anyone but its owner.
    pub fn from_file(path: &Path, state_dir: &Path, data_dir: &Path) -> Result<Self> {
        let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
        let (file, state, data) = (absolute(path), absolute(state_dir), absolute(data_dir));
        if file.starts_with(&state) || file.starts_with(&data) {
            return Err(bad_key(format!(
                "{} is inside the state or data directory; keep the key apart from what it protects",
                path.display()
            )));
        }
        if !path.exists() {
            let mut bytes = [0u8; 32];
            SystemRandom::new().fill(&mut bytes).map_err(|_| bad_key("the system random source failed"))?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|source| AgentError::Io { path: dir.to_owned(), source })?;
            }
            covey_fs::write_atomic_private(path, hex::encode(bytes).as_bytes())
                .map_err(|source| AgentError::Io { path: path.to_owned(), source })?;
            tracing::info!(path = %path.display(), "created the key of the local adapter");
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)
                .map_err(|source| AgentError::Io { path: path.to_owned(), source })?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(bad_key(format!(
                    "{} is readable by others (mode {:o}); chmod 600 it",
                    path.display(),
                    mode & 0o777
                )));
            }
        }
        let text = std::fs::read_to_string(path).map_err(|source| AgentError::Io { path: path.to_owned(), source })?;
        Self::from_hex(&text).map_err(|e| bad_key(format!("{}: {e}", path.display())))
    }
}

/// The key of the local adapter: the host app's (`COVEY_PERSONAL_KEY`, hex) if set, else
/// the one in `file`; `None` when neither is given.
pub fn key_from(file: Option<&Path>, state_dir: &Path, data_dir: &Path) -> Result<Option<PersonalKey>> {
    if let Ok(hex) = std::env::var(crate::config::PERSONAL_KEY_ENV) {
        return PersonalKey::from_hex(&hex).map(Some);
    }
    file.map(|f| PersonalKey::from_file(f, state_dir, data_dir)).transpose()
}

/// The sealed local adapter's store `cfg` names, when this device personalises: the key
/// from `COVEY_PERSONAL_KEY` if the host app set it, else from `personal-key-file`.
pub fn open_store(cfg: &crate::config::AgentConfig) -> Result<Option<PersonalStore>> {
    if cfg.personalisation.is_none() {
        return Ok(None);
    }
    let key = key_from(cfg.personal_key_file.as_deref(), &cfg.state_dir, &cfg.data_dir)?.ok_or_else(|| {
        AgentError::Config {
            field: "personalisation",
            reason: "needs a key (personal-key-file or COVEY_PERSONAL_KEY)".into(),
        }
    })?;
    Ok(Some(PersonalStore::new(&cfg.state_dir, key)))
}

/// What the sealed file says of its adapter, authenticated with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalMeta {
    /// How it was trained.
    pub config: PersonalConfig,
    /// The seed of its `A` factors.
    pub seed: u64,
    /// The global model version it was last fitted on.
    pub version: u64,
    /// SHA-256 of the model shape it fits (`config.json` as the version states it): a
    /// local adapter applies to any version of the same model, and to no other.
    pub model_sha256: String,
    /// Training tokens behind it (all fits).
    pub train_tokens: u64,
    /// When it was written (Unix ms).
    pub written_unix_ms: u64,
}

/// The hash [`LocalMeta::model_sha256`] holds for a model shape.
pub fn model_fingerprint(config: &LlamaConfig) -> String {
    let json = serde_json::to_vec(config).unwrap_or_default();
    hex::encode(covey_proto::keys::sha256(&json))
}

/// The sealed local adapter of one state directory.
#[derive(Debug)]
pub struct PersonalStore {
    path: PathBuf,
    key: PersonalKey,
}

fn corrupt(path: &Path, reason: impl Into<String>) -> AgentError {
    AgentError::LocalAdapter { path: path.to_owned(), reason: reason.into() }
}

impl PersonalStore {
    /// The store of `state_dir`, sealed with `key`.
    pub fn new(state_dir: &Path, key: PersonalKey) -> Self {
        Self { path: state_dir.join(SEALED_FILE), key }
    }

    /// The sealed file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Seal `adapter` with `meta` and write it atomically (owner-only permissions).
    pub fn save(&self, meta: &LocalMeta, adapter: &LocalAdapter) -> Result<()> {
        let meta_json =
            serde_json::to_vec(meta).map_err(|source| AgentError::Json { path: self.path.clone(), source })?;
        let tensors = covey_tensors::encode(&adapter.to_tensors(), None)
            .map_err(|source| AgentError::Tensor { what: "local adapter", source })?;
        let mut plain = Vec::with_capacity(8 + meta_json.len() + tensors.len());
        plain.extend_from_slice(&(meta_json.len() as u64).to_le_bytes());
        plain.extend_from_slice(&meta_json);
        plain.extend_from_slice(&tensors);
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).map_err(|_| corrupt(&self.path, "the system random source failed"))?;
        self.key
            .0
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(MAGIC), &mut plain)
            .map_err(|_| corrupt(&self.path, "sealing failed"))?;
        let mut file = Vec::with_capacity(MAGIC.len() + NONCE_LEN + plain.len());
        file.extend_from_slice(MAGIC);
        file.extend_from_slice(&nonce);
        file.extend_from_slice(&plain);
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| AgentError::Io { path: dir.to_owned(), source })?;
        }
        covey_fs::write_atomic_private(&self.path, &file)
            .map_err(|source| AgentError::Io { path: self.path.clone(), source })
    }

    /// The stored adapter, `None` when there is none. A file that does not open with this
    /// key, or holds anything but a local adapter, is an error naming it.
    pub fn load(&self) -> Result<Option<(LocalMeta, LocalAdapter)>> {
        let mut file = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(AgentError::Io { path: self.path.clone(), source }),
        };
        if file.len() < MAGIC.len() + NONCE_LEN + AES_256_GCM.tag_len() || &file[..MAGIC.len()] != MAGIC {
            return Err(corrupt(&self.path, "not a sealed local adapter (bad header or truncated)"));
        }
        let nonce: [u8; NONCE_LEN] = file[MAGIC.len()..MAGIC.len() + NONCE_LEN].try_into().unwrap_or([0; NONCE_LEN]);
        let sealed = &mut file[MAGIC.len() + NONCE_LEN..];
        let plain =
            self.key.0.open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(MAGIC), sealed).map_err(|_| {
                corrupt(&self.path, "does not decrypt with this device's key (another key, or altered)")
            })?;
        let meta_len = plain.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]))).unwrap_or(u64::MAX);
        let meta_end = usize::try_from(meta_len).ok().and_then(|l| l.checked_add(8)).filter(|&e| e <= plain.len());
        let Some(meta_end) = meta_end else { return Err(corrupt(&self.path, "truncated metadata")) };
        let meta: LocalMeta = serde_json::from_slice(&plain[8..meta_end])
            .map_err(|source| AgentError::Json { path: self.path.clone(), source })?;
        let (tensors, _) = covey_tensors::decode(&plain[meta_end..])
            .map_err(|source| AgentError::Tensor { what: "local adapter", source })?;
        let mut a = NamedTensors::new();
        let mut b = NamedTensors::new();
        for (name, t) in tensors {
            let Some(peft) = name.strip_prefix(LOCAL_PREFIX) else {
                return Err(corrupt(&self.path, format!("tensor {name} is not a local adapter's")));
            };
            match peft {
                n if n.ends_with(".lora_A.weight") => a.insert(n.to_owned(), t),
                n if n.ends_with(".lora_B.weight") => b.insert(n.to_owned(), t),
                n => return Err(corrupt(&self.path, format!("tensor {n} is not a LoRA factor"))),
            };
        }
        let scale = (meta.config.alpha / meta.config.rank as f64) as f32;
        Ok(Some((meta, LocalAdapter { a, b, scale })))
    }

    /// Delete the local adapter (`covey-agent forget`); whether there was one.
    pub fn forget(&self) -> Result<bool> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(AgentError::Io { path: self.path.clone(), source }),
        }
    }
}

/// Why a stored local adapter does not apply to a model, `None` when it does: another
/// model (shape hash), or factors whose shapes do not fit the model's projections.
pub fn mismatch(meta: &LocalMeta, adapter: &LocalAdapter, config: &LlamaConfig) -> Option<String> {
    if meta.model_sha256 != model_fingerprint(config) {
        return Some("it was fitted to another model".into());
    }
    let shapes: BTreeMap<String, Vec<usize>> =
        meta.config.a_factors(config, meta.seed).into_iter().map(|(n, t)| (n, t.shape)).collect();
    for (name, t) in &adapter.a {
        if shapes.get(name) != Some(&t.shape) {
            return Some(format!("{name} has shape {:?}, the model needs {:?}", t.shape, shapes.get(name)));
        }
    }
    if adapter.a.len() != shapes.len() || adapter.b.len() != adapter.a.len() {
        return Some("its factors do not cover the model's adapted projections".into());
    }
    None
}

/// The previous `B` to continue from: Ditto's, when the stored adapter applies to
/// `config` and was trained alike; otherwise none (FedRecon, or a fresh start).
pub fn previous_b(
    stored: Option<&(LocalMeta, LocalAdapter)>,
    cfg: &PersonalConfig,
    config: &LlamaConfig,
) -> Option<NamedTensors> {
    let (meta, adapter) = stored?;
    if cfg.method != PersonalMethod::Ditto {
        return None;
    }
    if let Some(why) = mismatch(meta, adapter, config) {
        tracing::info!(reason = why, "the stored local adapter does not apply: fitting a new one");
        return None;
    }
    if meta.config.rank != cfg.rank || meta.config.targets != cfg.targets {
        tracing::info!("the local adapter's rank or targets changed: fitting a new one");
        return None;
    }
    Some(adapter.b.clone())
}

/// The seed of a device's local `A` factors: its own, from its id.
pub fn device_seed(device_id: &[u8; 32]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&device_id[8..16]);
    u64::from_be_bytes(b)
}

/// Fit the local adapter on `model` (a verified global version, its adapter frozen on
/// top of its release) and the text of `data_dir`, and seal it in `store`. Ditto continues
/// from the stored adapter where it applies; FedRecon (or an adapter that no longer
/// applies, or one that cannot be read) starts from zero. Blocking.
pub fn fit(
    mut model: crate::models::VerifiedModel,
    cfg: &PersonalConfig,
    data_dir: &Path,
    store: &PersonalStore,
    device_id: &[u8; 32],
    threads: usize,
) -> Result<LocalMeta> {
    cfg.validate().map_err(|e| AgentError::Config { field: "personalisation", reason: e.to_string() })?;
    let stored = match store.load() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "the stored local adapter cannot be read: fitting a new one");
            None
        }
    };
    let previous = previous_b(stored.as_ref(), cfg, &model.config);
    let prior_tokens = if previous.is_some() { stored.as_ref().map_or(0, |(m, _)| m.train_tokens) } else { 0 };
    let seed = device_seed(device_id);
    let text = crate::train::LocalText::load(data_dir, &model)?;
    let weights = model.take_release();
    let lora = &model.manifest.lora;
    let global = model.adapter().map(|b| covey_model::FrozenAdapter {
        a: model.a_factors(),
        b,
        scale: lora.alpha / lora.rank as f32,
    });
    let a = cfg.a_factors(&model.config, seed);
    let round = covey_model::LocalRound {
        config: &model.config,
        base: covey_model::RoundBase::Stored(weights),
        adapter: global,
        a: &a,
        tokenizer: &model.tokenizer,
        corpus: &text.corpus,
        chats: &text.chats,
        chat_format: text.chat_format(&model),
    };
    let (adapter, result) = covey_model::personal::train_local(round, cfg, seed, threads, previous.as_ref())?;
    let meta = LocalMeta {
        config: cfg.clone(),
        seed,
        version: model.version(),
        model_sha256: model_fingerprint(&model.config),
        train_tokens: prior_tokens + result.tokens,
        written_unix_ms: covey_proto::signing::unix_ms(),
    };
    store.save(&meta, &adapter)?;
    tracing::info!(version = meta.version, method = %cfg.method, loss_first = result.loss_first,
        loss_last = result.loss_last, "local adapter fitted and sealed");
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use covey_model::HostTensor;

    fn adapter() -> (LocalMeta, LocalAdapter) {
        let config = LlamaConfig::tiny();
        let cfg = PersonalConfig::default();
        let a = cfg.a_factors(&config, 5);
        let b = a
            .iter()
            .map(|(n, t)| {
                let out = if n.contains("q_proj") { config.q_dim() } else { config.kv_dim() };
                let data = (0..out * t.shape[0]).map(|i| i as f32 * 0.01).collect();
                (n.replace("lora_A", "lora_B"), HostTensor { shape: vec![out, t.shape[0]], data })
            })
            .collect();
        let meta = LocalMeta {
            config: cfg,
            seed: 5,
            version: 3,
            model_sha256: model_fingerprint(&config),
            train_tokens: 100,
            written_unix_ms: 1,
        };
        (meta, LocalAdapter { a, b, scale: 2.0 })
    }

    fn key(byte: u8) -> PersonalKey {
        PersonalKey::from_bytes(&[byte; 32]).expect("key")
    }

    #[test]
    fn a_sealed_adapter_round_trips_and_holds_no_plaintext() {
        let dir = tempfile::tempdir().expect("dir");
        let store = PersonalStore::new(dir.path(), key(1));
        assert!(store.load().expect("empty").is_none());
        let (meta, adapter) = adapter();
        store.save(&meta, &adapter).expect("save");
        assert_eq!(store.load().expect("load"), Some((meta.clone(), adapter.clone())));
        let bytes = std::fs::read(store.path()).expect("read");
        for needle in [b"lora_B".as_slice(), b"local.".as_slice(), b"model_sha256".as_slice()] {
            assert!(!bytes.windows(needle.len()).any(|w| w == needle), "plaintext {needle:?} in the sealed file");
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(store.path()).expect("meta").permissions().mode();
            assert_eq!(mode & 0o077, 0, "mode {mode:o}");
        }
        assert!(store.forget().expect("forget"));
        assert!(!store.forget().expect("forget again"));
        assert!(store.load().expect("gone").is_none());
    }

    #[test]
    fn another_key_a_flipped_byte_or_a_truncation_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("dir");
        let (meta, adapter) = adapter();
        PersonalStore::new(dir.path(), key(1)).save(&meta, &adapter).expect("save");
        let other = PersonalStore::new(dir.path(), key(2));
        let err = other.load().expect_err("wrong key").to_string();
        assert!(err.contains("local-adapter.sealed") && err.contains("does not decrypt"), "{err}");
        let store = PersonalStore::new(dir.path(), key(1));
        let mut bytes = std::fs::read(store.path()).expect("read");
        let middle = bytes.len() / 2;
        bytes[middle] ^= 1;
        std::fs::write(store.path(), &bytes).expect("write");
        assert!(store.load().expect_err("flipped").to_string().contains("does not decrypt"));
        std::fs::write(store.path(), &bytes[..20]).expect("write");
        assert!(store.load().expect_err("truncated").to_string().contains("truncated"));
    }

    #[test]
    fn an_adapter_of_another_model_does_not_apply_and_ditto_alone_continues() {
        let (meta, adapter) = adapter();
        let tiny = LlamaConfig::tiny();
        assert_eq!(mismatch(&meta, &adapter, &tiny), None);
        let wider = LlamaConfig { hidden_size: 64, ..LlamaConfig::tiny() };
        assert!(mismatch(&meta, &adapter, &wider).expect("another model").contains("another model"));
        let stored = Some((meta.clone(), adapter.clone()));
        let ditto = PersonalConfig { method: PersonalMethod::Ditto, ..PersonalConfig::default() };
        assert_eq!(previous_b(stored.as_ref(), &ditto, &tiny), Some(adapter.b.clone()));
        assert_eq!(previous_b(stored.as_ref(), &ditto, &wider), None);
        assert_eq!(previous_b(stored.as_ref(), &PersonalConfig::default(), &tiny), None);
        let rank8 = PersonalConfig { rank: 8, ..ditto };
        assert_eq!(previous_b(stored.as_ref(), &rank8, &tiny), None);
    }

    #[test]
    fn a_key_file_is_created_private_and_kept_apart_from_the_data() {
        let dir = tempfile::tempdir().expect("dir");
        let (state, data) = (dir.path().join("state"), dir.path().join("data"));
        let file = dir.path().join("keys/personal.key");
        PersonalKey::from_file(&file, &state, &data).expect("created");
        let again = std::fs::read_to_string(&file).expect("key");
        PersonalKey::from_file(&file, &state, &data).expect("read back");
        assert_eq!(std::fs::read_to_string(&file).expect("key"), again, "an existing key is kept");
        let inside = state.join("personal.key");
        let err = PersonalKey::from_file(&inside, &state, &data).expect_err("inside").to_string();
        assert!(err.contains("inside the state or data directory"), "{err}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
            let err = PersonalKey::from_file(&file, &state, &data).expect_err("readable").to_string();
            assert!(err.contains("chmod 600"), "{err}");
        }
        assert!(PersonalKey::from_hex("abcd").expect_err("short").to_string().contains("32"));
    }
}
