//! Verified model versions and artifacts, cached in the state directory.
//!
//! A version is a signed manifest naming a base release (quantized weights, config,
//! tokenizer, chat template), the frozen LoRA `A` factors and, unless the version cut the
//! release, the aggregated adapter (`B`, cumulative since the release). Nothing is trusted
//! before it is verified:
//! * a manifest is trusted only through [`VerifiedManifest::verify`] (the coordinator's
//!   Ed25519 signature over the exact bytes received, the expected version, the SHA-256 of
//!   the signed bytes that the task names, formats this agent reads);
//! * artifacts are content-addressed: [`ArtifactCache::put`] refuses bytes that do not
//!   hash to their name and [`ArtifactCache::get`] hashes them again when read, so a
//!   release downloaded once serves every adapter version on it and is never fetched again;
//! * a version is cached by [`ModelCache::store`] only once [`ModelCache::assemble`] has
//!   checked every artifact it names against the manifest's sizes and hashes and parsed
//!   them (config, tokenizer, factors of the shapes the layout says); cached versions are
//!   verified again when read ([`ModelCache::load`]), so a file altered on disk is refused.
//!
//! Layout: `models/v{n}/{manifest.json, manifest.sig}`, `artifacts/{sha256 hex}`, and
//! `artifacts/partial/{sha256 hex}` for downloads in progress ([`crate::download`]).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use covey_model::{LlamaConfig, LoadedModel, NamedTensors, Precision, Tokenizer};
use covey_proto::keys;
use covey_proto::manifest::{ArtifactRef, Manifest};
use covey_tensors::lora::LoraTarget;
use covey_tensors::quant::StoredTensor;

use crate::error::{AgentError, Result};
use crate::identity::{create_private_dir, write_atomic};

/// Directory of the verified model versions, under the state directory.
pub const MODELS_DIR: &str = "models";
/// Directory of the verified artifacts, under the state directory.
pub const ARTIFACTS_DIR: &str = "artifacts";
const MANIFEST_FILE: &str = "manifest.json";
const SIGNATURE_FILE: &str = "manifest.sig";
/// Directory of downloads in progress, under the artifacts directory.
const PARTIAL_DIR: &str = "partial";

/// Release weight formats the agent reads (all through `covey_tensors::quant`).
pub const MODEL_FORMATS: [&str; 3] = ["safetensors-int8", "safetensors-int4", "safetensors-f32"];
/// Format of the config artifact.
pub const CONFIG_FORMAT: &str = "llama-config-json";
/// Format of the tokenizer artifact.
pub const TOKENIZER_FORMAT: &str = "tokenizer-json";
/// Format of the LoRA factor artifacts.
pub const FACTORS_FORMAT: &str = "safetensors-f32";
/// Architectures the agent runs.
pub const ARCHITECTURES: [&str; 1] = ["llama"];

/// A manifest whose signature, version, hash and formats were checked.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedManifest {
    manifest: Manifest,
    bytes: Vec<u8>,
    signature: Vec<u8>,
    hash: [u8; 32],
}

impl VerifiedManifest {
    /// Verify `signature` over `bytes` with the coordinator's key, parse, and check that
    /// the manifest is of `version`, that this agent reads every format it names and,
    /// when given, that `sha256(bytes)` is `expected_hash` (the task's `base_manifest_hash`).
    pub fn verify(
        bytes: &[u8],
        signature: &[u8],
        coordinator_key: &[u8; 32],
        version: u64,
        expected_hash: Option<&[u8; 32]>,
    ) -> Result<Self> {
        let untrusted = |reason: String| AgentError::untrusted(version, reason);
        let manifest =
            Manifest::verify(bytes, signature, coordinator_key).map_err(|e| untrusted(format!("manifest: {e}")))?;
        let hash = keys::sha256(bytes);
        if let Some(expected) = expected_hash
            && &hash != expected
        {
            return Err(untrusted(format!(
                "manifest hashes to {}, the task names {}",
                hex::encode(hash),
                hex::encode(expected)
            )));
        }
        if manifest.version != version {
            return Err(untrusted(format!("the signed manifest is of version {}", manifest.version)));
        }
        let r = &manifest.release;
        if !ARCHITECTURES.contains(&r.architecture.as_str()) {
            return Err(untrusted(format!("architecture {} is not supported", r.architecture)));
        }
        let mut expected =
            vec![("release weights", &r.model, &MODEL_FORMATS[..]), ("config", &r.config, &[CONFIG_FORMAT])];
        if let Some(t) = &r.tokenizer {
            expected.push(("tokenizer", t, &[TOKENIZER_FORMAT]));
        }
        expected.push(("LoRA A factors", &manifest.lora.a, &[FACTORS_FORMAT]));
        if let Some(a) = &manifest.adapter {
            expected.push(("adapter", &a.b, &[FACTORS_FORMAT]));
        }
        for (what, a, formats) in expected {
            if !formats.contains(&a.format.as_str()) {
                return Err(untrusted(format!("{what}: format {} is not supported", a.format)));
            }
        }
        for t in &manifest.lora.targets {
            if LoraTarget::from_hf_name(t).is_none() {
                return Err(untrusted(format!("unknown LoRA target `{t}`")));
            }
        }
        Ok(Self { manifest, bytes: bytes.to_vec(), signature: signature.to_vec(), hash })
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// SHA-256 of the signed bytes.
    pub fn hash(&self) -> &[u8; 32] {
        &self.hash
    }

    /// Every artifact the version needs, with its SHA-256 (checked by [`Manifest::check`]).
    pub fn artifacts(&self) -> Vec<(&ArtifactRef, [u8; 32])> {
        self.manifest.artifacts().into_iter().map(|a| (a, a.sha256_bytes().unwrap_or_default())).collect()
    }
}

/// Check `bytes` against an artifact reference: size and SHA-256.
fn check_artifact(version: u64, what: &str, a: &ArtifactRef, bytes: &[u8]) -> Result<()> {
    if bytes.len() as u64 != a.size {
        return Err(AgentError::untrusted(
            version,
            format!("{what}: {} bytes, the manifest says {}", bytes.len(), a.size),
        ));
    }
    let got = hex::encode(keys::sha256(bytes));
    if !got.eq_ignore_ascii_case(&a.sha256) {
        return Err(AgentError::untrusted(
            version,
            format!("{what}: bytes hash to {got}, the manifest says {}", a.sha256),
        ));
    }
    Ok(())
}

/// A verified model version, read into memory: the release as stored (quantized), its
/// tokenizer, the `A` factors and the adapter.
#[derive(Debug, Clone)]
pub struct VerifiedModel {
    /// The version's manifest.
    pub manifest: Manifest,
    /// SHA-256 of its signed manifest bytes.
    pub manifest_hash: [u8; 32],
    /// The model's configuration.
    pub config: LlamaConfig,
    /// The model's tokenizer (byte-level when the release names none).
    pub tokenizer: Tokenizer,
    release: BTreeMap<String, StoredTensor>,
    a: NamedTensors,
    b: Option<NamedTensors>,
}

impl VerifiedModel {
    /// Version number.
    pub fn version(&self) -> u64 {
        self.manifest.version
    }

    /// The frozen `A` factors (PEFT names).
    pub fn a_factors(&self) -> &NamedTensors {
        &self.a
    }

    /// The aggregated adapter's `B` (PEFT names), cumulative since the release; `None` on
    /// the version that cut the release.
    pub fn adapter(&self) -> Option<&NamedTensors> {
        self.b.as_ref()
    }

    /// The release's weights as stored (int8 / int4 / f32), without the adapter.
    pub fn release_tensors(&self) -> &BTreeMap<String, StoredTensor> {
        &self.release
    }

    /// The version's weights in f32: the release dequantized, plus the adapter
    /// (`alpha / rank · B A`) merged in.
    pub fn base_tensors(&self) -> Result<NamedTensors> {
        let mut w: NamedTensors = self.release.iter().map(|(n, t)| (n.clone(), t.to_f32())).collect();
        self.merge_adapter(&mut w)?;
        Ok(w)
    }

    /// The release's weights as stored, handed over for training (the model can no
    /// longer give its release or run inference afterwards).
    pub fn take_release(&mut self) -> BTreeMap<String, StoredTensor> {
        std::mem::take(&mut self.release)
    }

    fn merge_adapter(&self, w: &mut NamedTensors) -> Result<()> {
        let Some(b) = &self.b else { return Ok(()) };
        let mut factors = self.a.clone();
        factors.extend(b.iter().map(|(n, t)| (n.clone(), t.clone())));
        let lora = &self.manifest.lora;
        covey_tensors::lora::merge(w, &factors, lora.alpha / lora.rank as f32)
            .map_err(|source| AgentError::Tensor { what: "adapter", source })
    }

    /// The version as `covey-infer` runs it: the release's quantized weights, with the
    /// projections the adapter changes merged in f32 and quantized again to the release's
    /// precision by the engine; the tokenizer, chat template and special tokens of the
    /// release.
    pub fn loaded(&self) -> Result<(LoadedModel, Precision)> {
        self.as_loaded(true, None)
    }

    /// The personal model: [`VerifiedModel::loaded`] with the device's local adapter
    /// merged too (after the global one, into the same f32 projections).
    pub fn loaded_with(&self, local: &covey_model::personal::LocalAdapter) -> Result<(LoadedModel, Precision)> {
        self.as_loaded(true, Some(local))
    }

    /// The release alone (no adapter), as [`VerifiedModel::loaded`] builds it.
    pub fn release_model(&self) -> Result<(LoadedModel, Precision)> {
        self.as_loaded(false, None)
    }

    fn as_loaded(
        &self,
        with_adapter: bool,
        local: Option<&covey_model::personal::LocalAdapter>,
    ) -> Result<(LoadedModel, Precision)> {
        let mut tensors = self.release.clone();
        let global = with_adapter && self.b.is_some();
        if global || local.is_some() {
            let factor_names = self.a.keys().filter(|_| global).chain(local.into_iter().flat_map(|l| l.a.keys()));
            let targets: HashSet<String> =
                factor_names.filter_map(|n| covey_tensors::lora::base_weight_of(n)).map(|(w, _)| w).collect();
            let mut touched: NamedTensors =
                tensors.iter().filter(|(n, _)| targets.contains(*n)).map(|(n, t)| (n.clone(), t.to_f32())).collect();
            if global {
                self.merge_adapter(&mut touched)?;
            }
            if let Some(local) = local {
                local.merge_into(&mut touched).map_err(AgentError::Inference)?;
            }
            tensors.extend(touched.into_iter().map(|(n, t)| (n, StoredTensor::F32(t))));
        }
        let r = &self.manifest.release;
        let precision = match r.model.format.as_str() {
            "safetensors-int4" => Precision::Int4,
            "safetensors-int8" => Precision::Int8,
            _ => Precision::F32,
        };
        let s = &r.special_tokens;
        let model = LoadedModel {
            source: PathBuf::from(format!("model version {}", self.version())),
            config: self.config.clone(),
            tensors,
            tokenizer: self.tokenizer.clone(),
            chat_template: r.chat_template.clone(),
            special: covey_model::gguf_import::SpecialTokens { bos: s.bos, eos: s.eos, add_bos: s.add_bos },
            description: format!(
                "release {} + {} adapter rounds",
                r.version,
                self.manifest.adapter.as_ref().map_or(0, |a| a.rounds)
            ),
        };
        Ok((model, precision))
    }
}

/// Parse and validate a `config.json`.
fn parse_config(version: u64, bytes: &[u8]) -> Result<LlamaConfig> {
    let config: LlamaConfig = serde_json::from_slice(bytes)
        .map_err(|e| AgentError::untrusted(version, format!("config.json does not parse: {e}")))?;
    config.validate().map_err(|e| AgentError::untrusted(version, format!("config.json: {e}")))?;
    Ok(config)
}

/// Parse LoRA factors and check them against the layout: one tensor per target and
/// layer, `A` of `[rank, in]`, `B` of `[out, rank]`.
fn parse_factors(
    version: u64,
    what: &str,
    bytes: &[u8],
    factor: char,
    manifest: &Manifest,
    release: &BTreeMap<String, StoredTensor>,
    layers: usize,
) -> Result<NamedTensors> {
    let untrusted = |reason: String| AgentError::untrusted(version, format!("{what}: {reason}"));
    let (t, _) = covey_tensors::decode(bytes).map_err(|e| untrusted(e.to_string()))?;
    let rank = manifest.lora.rank;
    let mut expected = 0;
    for target in manifest.lora.targets.iter().filter_map(|t| LoraTarget::from_hf_name(t)) {
        for l in 0..layers {
            let weight = target.weight_name(l);
            let (out, inp) = match release.get(&weight).map(StoredTensor::shape) {
                Some(&[out, inp]) => (out, inp),
                _ => return Err(untrusted(format!("the release has no 2-D `{weight}`"))),
            };
            let name = target.peft_name(l, factor);
            let shape = if factor == 'A' { vec![rank, inp] } else { vec![out, rank] };
            match t.get(&name) {
                Some(x) if x.shape == shape && x.is_finite() => expected += 1,
                Some(x) => return Err(untrusted(format!("`{name}` is {:?}, expected finite {shape:?}", x.shape))),
                None => return Err(untrusted(format!("`{name}` is missing"))),
            }
        }
    }
    if t.len() != expected {
        return Err(untrusted(format!("{} tensors, the layout names {expected}", t.len())));
    }
    Ok(t)
}

/// The verified versions of one state directory, over its artifact cache.
#[derive(Debug, Clone)]
pub struct ModelCache {
    root: PathBuf,
    artifacts: ArtifactCache,
}

impl ModelCache {
    /// The cache of `state_dir` (`state_dir/models`, `state_dir/artifacts`).
    pub fn new(state_dir: &Path) -> Self {
        Self { root: state_dir.join(MODELS_DIR), artifacts: ArtifactCache::new(state_dir) }
    }

    /// The artifact cache.
    pub fn artifacts(&self) -> &ArtifactCache {
        &self.artifacts
    }

    fn dir(&self, version: u64) -> PathBuf {
        self.root.join(format!("v{version}"))
    }

    /// Read every artifact `manifest` names from the artifact cache, check each against
    /// the manifest (size, SHA-256) and parse it. Fails with [`AgentError::Io`] when one is
    /// not cached.
    pub fn assemble(&self, manifest: &VerifiedManifest) -> Result<VerifiedModel> {
        let m = &manifest.manifest;
        let read = |what: &str, a: &ArtifactRef| -> Result<Vec<u8>> {
            let bytes = self.artifacts.read(&a.sha256)?;
            check_artifact(m.version, what, a, &bytes)?;
            Ok(bytes)
        };
        let r = &m.release;
        let config = parse_config(m.version, &read("config", &r.config)?)?;
        let tokenizer = match &r.tokenizer {
            Some(t) => Tokenizer::from_json_bytes(&read("tokenizer", t)?, "the release's tokenizer.json")
                .map_err(|e| AgentError::untrusted(m.version, e.to_string()))?,
            None => Tokenizer::Bytes,
        };
        if tokenizer.vocab_size() > config.vocab_size {
            return Err(AgentError::untrusted(
                m.version,
                format!("the tokenizer has {} tokens, the embedding {}", tokenizer.vocab_size(), config.vocab_size),
            ));
        }
        let (release, _) = covey_tensors::quant::decode_stored(&read("release weights", &r.model)?)
            .map_err(|e| AgentError::untrusted(m.version, format!("release weights: {e}")))?;
        let layers = config.num_hidden_layers;
        let a_bytes = read("LoRA A factors", &m.lora.a)?;
        let a = parse_factors(m.version, "LoRA A factors", &a_bytes, 'A', m, &release, layers)?;
        let b = match &m.adapter {
            Some(ad) => Some(parse_factors(m.version, "adapter", &read("adapter", &ad.b)?, 'B', m, &release, layers)?),
            None => None,
        };
        Ok(VerifiedModel { manifest: m.clone(), manifest_hash: manifest.hash, config, tokenizer, release, a, b })
    }

    /// Assemble the version (every artifact checked and parsed), then record its manifest
    /// in the cache (atomically: a temporary directory renamed into place). Nothing is
    /// recorded when a check fails.
    pub fn store(&self, manifest: &VerifiedManifest) -> Result<VerifiedModel> {
        let model = self.assemble(manifest)?;
        create_private_dir(&self.root)?;
        let dir = self.dir(manifest.manifest.version);
        let tmp = covey_fs::temp_path(&dir);
        let _ = std::fs::remove_dir_all(&tmp);
        create_private_dir(&tmp)?;
        write_atomic(&tmp.join(MANIFEST_FILE), &manifest.bytes)?;
        write_atomic(&tmp.join(SIGNATURE_FILE), &manifest.signature)?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| AgentError::io(&dir, e))?;
        }
        std::fs::rename(&tmp, &dir).map_err(|e| AgentError::io(&dir, e))?;
        Ok(model)
    }

    fn read_manifest(&self, version: u64, coordinator_key: &[u8; 32]) -> Result<VerifiedManifest> {
        let dir = self.dir(version);
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read(&p).map_err(|e| AgentError::io(p, e))
        };
        VerifiedManifest::verify(&read(MANIFEST_FILE)?, &read(SIGNATURE_FILE)?, coordinator_key, version, None)
    }

    /// Read `version` from the cache and verify it again (signature, hashes, parsing).
    pub fn load(&self, version: u64, coordinator_key: &[u8; 32]) -> Result<VerifiedModel> {
        self.assemble(&self.read_manifest(version, coordinator_key)?)
    }

    /// Cached version numbers, ascending.
    pub fn versions(&self) -> Vec<u64> {
        let mut v: Vec<u64> = std::fs::read_dir(&self.root)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().to_str()?.strip_prefix('v')?.parse::<u64>().ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort_unstable();
        v
    }

    /// The newest cached version that still verifies; versions that do not are logged and
    /// skipped.
    pub fn latest_verified(&self, coordinator_key: &[u8; 32]) -> Option<VerifiedModel> {
        for v in self.versions().into_iter().rev() {
            match self.load(v, coordinator_key) {
                Ok(m) => return Some(m),
                Err(e) => tracing::warn!(version = v, error = %e, "skipping a cached version that does not verify"),
            }
        }
        None
    }

    /// Delete all but the newest `1 + keep_older` versions, then every artifact none of the
    /// kept versions names (a release shared by kept versions stays).
    pub fn prune(&self, keep_older: usize) {
        let versions = self.versions();
        let drop = versions.len().saturating_sub(1 + keep_older);
        for v in &versions[..drop] {
            let dir = self.dir(*v);
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(path = %dir.display(), error = %e, "cannot remove an old version");
            }
        }
        let mut keep = Vec::new();
        for v in &versions[drop..] {
            // Only deciding what to keep: the manifests were verified when stored.
            let Ok(bytes) = std::fs::read(self.dir(*v).join(MANIFEST_FILE)) else { continue };
            match serde_json::from_slice::<Manifest>(&bytes) {
                Ok(m) => keep.extend(m.artifacts().into_iter().map(|a| a.sha256.to_ascii_lowercase())),
                // An unreadable manifest: keep every artifact rather than guess.
                Err(_) => return,
            }
        }
        self.artifacts.retain(&keep);
    }
}

/// Content-addressed artifacts (release weights, configs, tokenizers, LoRA factors),
/// verified both on the way in and on the way out.
#[derive(Debug, Clone)]
pub struct ArtifactCache {
    root: PathBuf,
}

impl ArtifactCache {
    /// The cache of `state_dir` (`state_dir/artifacts`).
    pub fn new(state_dir: &Path) -> Self {
        Self { root: state_dir.join(ARTIFACTS_DIR) }
    }

    /// The bytes of `sha256` if cached and still matching their hash.
    pub fn get(&self, sha256: &[u8; 32]) -> Option<Vec<u8>> {
        let bytes = std::fs::read(self.root.join(hex::encode(sha256))).ok()?;
        (&keys::sha256(&bytes) == sha256).then_some(bytes)
    }

    /// Whether `sha256` is cached (not re-hashed: [`ArtifactCache::get`] and every reader
    /// check the bytes).
    pub fn contains(&self, sha256: &[u8; 32]) -> bool {
        self.root.join(hex::encode(sha256)).is_file()
    }

    /// The bytes cached under a hex name, not checked (the caller checks them against
    /// its manifest); [`AgentError::Io`] when absent.
    fn read(&self, hex_sha256: &str) -> Result<Vec<u8>> {
        let p = self.root.join(hex_sha256.to_ascii_lowercase());
        std::fs::read(&p).map_err(|e| AgentError::io(p, e))
    }

    /// Where a download of `sha256` in progress keeps its verified pieces
    /// (`artifacts/partial/{sha256}`; the directory is created).
    pub fn partial_path(&self, sha256: &[u8; 32]) -> Result<PathBuf> {
        let dir = self.root.join(PARTIAL_DIR);
        create_private_dir(&self.root)?;
        create_private_dir(&dir)?;
        Ok(dir.join(hex::encode(sha256)))
    }

    /// Move a completed download (verified by [`crate::download::PieceWriter::finish`])
    /// into the cache under `sha256`.
    pub fn adopt(&self, sha256: &[u8; 32], completed: &Path) -> Result<()> {
        let to = self.root.join(hex::encode(sha256));
        std::fs::rename(completed, &to).map_err(|e| AgentError::io(&to, e))?;
        covey_fs::sync_dir(&self.root).map_err(|e| AgentError::io(&self.root, e))
    }

    /// Cache `bytes` under `sha256`, refusing bytes that do not hash to it.
    pub fn put(&self, sha256: &[u8; 32], bytes: &[u8]) -> Result<()> {
        let got = keys::sha256(bytes);
        if &got != sha256 {
            return Err(AgentError::ArtifactMismatch {
                sha256: hex::encode(sha256),
                reason: format!("bytes hash to {}", hex::encode(got)),
            });
        }
        create_private_dir(&self.root)?;
        write_atomic(&self.root.join(hex::encode(sha256)), bytes)
    }

    /// Delete every artifact, and every partial download, whose hex name is not in `keep`.
    pub fn retain(&self, keep: &[String]) {
        for dir in [self.root.clone(), self.root.join(PARTIAL_DIR)] {
            if let Ok(rd) = std::fs::read_dir(&dir) {
                for e in rd.filter_map(|e| e.ok()) {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if e.path().is_file() && !keep.contains(&name) {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use covey_proto::keys::KeyPair;
    use covey_proto::manifest::{Adapter, LoraLayout, MANIFEST_SCHEMA, PrivacySpent, Release, SpecialTokens};
    use covey_tensors::HostTensor;

    use super::*;

    /// A tiny version signed by `key`: its signed manifest bytes, signature and artifacts
    /// (hash, bytes). Versions above 1 carry an adapter on release 1 whose `B` is filled
    /// with `0.01 · version`.
    pub(crate) struct SignedVersion {
        pub bytes: Vec<u8>,
        pub signature: [u8; 64],
        pub artifacts: Vec<([u8; 32], Vec<u8>)>,
    }

    pub(crate) fn signed_version(key: &KeyPair, version: u64) -> SignedVersion {
        let config = LlamaConfig::tiny();
        let config_bytes = serde_json::to_vec(&config).expect("json");
        let base = covey_model::checkpoint::base_tensors(
            &covey_model::Llama::init(&config, 1, &covey_model::cpu_device()).expect("init"),
        );
        let model_bytes = covey_tensors::quant::encode_int8(&base, std::collections::HashMap::new()).expect("quantize");
        let targets = [LoraTarget::from_hf_name("q_proj").expect("q"), LoraTarget::from_hf_name("v_proj").expect("v")];
        let a = covey_tensors::lora::frozen_a(&base, 2, &targets, 7);
        let a_bytes = covey_tensors::encode(&a, None).expect("a");
        let b: NamedTensors = (0..config.num_hidden_layers)
            .flat_map(|l| targets.iter().map(move |t| (l, *t)))
            .map(|(l, t)| {
                let out = base[&t.weight_name(l)].shape[0];
                (t.peft_name(l, 'B'), HostTensor { shape: vec![out, 2], data: vec![0.01 * version as f32; out * 2] })
            })
            .collect();
        let b_bytes = covey_tensors::encode(&b, None).expect("b");
        let art = ArtifactRef::describe;
        let manifest = Manifest {
            schema: MANIFEST_SCHEMA,
            version,
            parent: version.saturating_sub(1),
            round_id: version - 1,
            release: Release {
                version: 1,
                architecture: "llama".into(),
                model: art(&model_bytes, "safetensors-int8"),
                quantization: "int8-per-channel-symmetric".into(),
                config: art(&config_bytes, CONFIG_FORMAT),
                tokenizer: None,
                chat_template: None,
                special_tokens: SpecialTokens::default(),
            },
            lora: LoraLayout {
                rank: 2,
                alpha: 4.0,
                targets: vec!["q_proj".into(), "v_proj".into()],
                a: art(&a_bytes, FACTORS_FORMAT),
            },
            adapter: (version > 1).then(|| Adapter { rounds: version - 1, b: art(&b_bytes, FACTORS_FORMAT) }),
            master_sha256: "00".repeat(32),
            privacy: PrivacySpent::nothing(),
            created_unix_ms: 1,
        };
        let (bytes, signature) = manifest.sign(key).expect("sign");
        let mut artifacts = vec![model_bytes, config_bytes, a_bytes];
        if version > 1 {
            artifacts.push(b_bytes);
        }
        SignedVersion { bytes, signature, artifacts: artifacts.into_iter().map(|b| (keys::sha256(&b), b)).collect() }
    }

    fn put_all(cache: &ModelCache, v: &SignedVersion) {
        for (sha, bytes) in &v.artifacts {
            cache.artifacts().put(sha, bytes).expect("put");
        }
    }

    #[test]
    fn a_verified_version_is_cached_and_reloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = KeyPair::generate().expect("key");
        let v = signed_version(&key, 2);
        let hash = keys::sha256(&v.bytes);
        let vm = VerifiedManifest::verify(&v.bytes, &v.signature, &key.public_key(), 2, Some(&hash)).expect("verify");
        let cache = ModelCache::new(dir.path());
        assert!(matches!(cache.store(&vm), Err(AgentError::Io { .. })), "artifacts not downloaded yet");
        assert!(cache.versions().is_empty());
        put_all(&cache, &v);
        let stored = cache.store(&vm).expect("store");
        assert_eq!(stored.config, LlamaConfig::tiny());
        let latest = cache.latest_verified(&key.public_key()).expect("cached");
        assert_eq!((latest.version(), latest.manifest_hash), (2, hash));

        // The version's weights are the release plus alpha/r · B A.
        let w = latest.base_tensors().expect("weights");
        let release = &latest.release_tensors()["model.layers.0.self_attn.q_proj.weight"].to_f32();
        let q = &w["model.layers.0.self_attn.q_proj.weight"];
        let a = &latest.a_factors()["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"];
        let cols = q.shape[1];
        let expected = release.data[0] + 2.0 * 0.02 * (a.data[0] + a.data[cols]);
        assert!((q.data[0] - expected).abs() < 1e-6, "{} vs {expected}", q.data[0]);
        assert_eq!(
            w["model.layers.0.mlp.up_proj.weight"],
            latest.release_tensors()["model.layers.0.mlp.up_proj.weight"].to_f32()
        );
        let (loaded, precision) = latest.loaded().expect("engine model");
        assert_eq!(precision, Precision::Int8);
        assert!(matches!(loaded.tensors["model.layers.0.self_attn.q_proj.weight"], StoredTensor::F32(_)));
        assert!(matches!(loaded.tensors["model.layers.0.mlp.up_proj.weight"], StoredTensor::Int8(_)));

        // An artifact altered on disk is refused when read back.
        let (sha, _) = &v.artifacts[0];
        let path = dir.path().join(ARTIFACTS_DIR).join(hex::encode(sha));
        let mut altered = std::fs::read(&path).expect("read");
        let last = altered.len() - 1;
        altered[last] ^= 0x55;
        std::fs::write(&path, altered).expect("write");
        assert!(matches!(cache.load(2, &key.public_key()), Err(AgentError::UntrustedModel { .. })));
        assert!(cache.latest_verified(&key.public_key()).is_none());
    }

    #[test]
    fn a_manifest_with_a_bad_signature_or_hash_is_refused() {
        let key = KeyPair::generate().expect("key");
        let v = signed_version(&key, 2);
        let (bytes, sig) = (&v.bytes, v.signature);
        let hash = keys::sha256(bytes);
        let other = KeyPair::generate().expect("key");
        let err = VerifiedManifest::verify(bytes, &sig, &other.public_key(), 2, Some(&hash)).expect_err("wrong key");
        assert!(err.to_string().contains("signature"), "{err}");
        let mut bad_sig = sig;
        bad_sig[0] ^= 1;
        assert!(VerifiedManifest::verify(bytes, &bad_sig, &key.public_key(), 2, Some(&hash)).is_err());
        let err = VerifiedManifest::verify(bytes, &sig, &key.public_key(), 2, Some(&[0; 32])).expect_err("task hash");
        assert!(err.to_string().contains("the task names"), "{err}");
        let err = VerifiedManifest::verify(bytes, &sig, &key.public_key(), 3, Some(&hash)).expect_err("version");
        assert!(err.to_string().contains("version 2"), "{err}");
    }

    #[test]
    fn an_adapter_for_another_base_is_refused_and_nothing_is_cached() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = KeyPair::generate().expect("key");
        let v = signed_version(&key, 3);
        let cache = ModelCache::new(dir.path());
        put_all(&cache, &v);
        // The same manifest, but naming a B of other shapes (trained for another base).
        let mut m: Manifest = serde_json::from_slice(&v.bytes).expect("json");
        let other: NamedTensors = [(
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight".to_string(),
            HostTensor::zeros(&[7, 2]),
        )]
        .into();
        let other_bytes = covey_tensors::encode(&other, None).expect("encode");
        let sha = keys::sha256(&other_bytes);
        cache.artifacts().put(&sha, &other_bytes).expect("put");
        m.adapter.as_mut().expect("adapter").b = ArtifactRef::describe(&other_bytes, FACTORS_FORMAT);
        let (bytes, sig) = m.sign(&key).expect("sign");
        let vm = VerifiedManifest::verify(&bytes, &sig, &key.public_key(), 3, None).expect("signed");
        let err = cache.store(&vm).expect_err("another base");
        assert!(matches!(err, AgentError::UntrustedModel { version: 3, .. }), "{err}");
        assert!(err.to_string().contains("adapter") && err.to_string().contains("[7, 2]"), "{err}");
        assert!(cache.versions().is_empty());

        let artifacts = ArtifactCache::new(dir.path());
        let sha = keys::sha256(b"factors");
        assert!(matches!(artifacts.put(&sha, b"factorz"), Err(AgentError::ArtifactMismatch { .. })));
        assert!(artifacts.get(&sha).is_none());
        artifacts.put(&sha, b"factors").expect("put");
        assert_eq!(artifacts.get(&sha).as_deref(), Some(&b"factors"[..]));
    }

    #[test]
    fn pruning_keeps_the_newest_versions_and_the_artifacts_they_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = KeyPair::generate().expect("key");
        let cache = ModelCache::new(dir.path());
        let mut all = Vec::new();
        for version in 1..=4 {
            let v = signed_version(&key, version);
            put_all(&cache, &v);
            let vm =
                VerifiedManifest::verify(&v.bytes, &v.signature, &key.public_key(), version, None).expect("verify");
            cache.store(&vm).expect("store");
            all.push(v);
        }
        cache.prune(1);
        assert_eq!(cache.versions(), vec![3, 4]);
        // The release is shared and stays; the adapter of version 2 goes.
        assert!(cache.artifacts().contains(&all[0].artifacts[0].0));
        assert!(!cache.artifacts().contains(&all[1].artifacts[3].0));
        assert!(cache.artifacts().contains(&all[2].artifacts[3].0));
        cache.load(3, &key.public_key()).expect("still complete");
    }
}
