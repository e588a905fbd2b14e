//! Aggregation and publishing: stream a round's stored updates (verified again) to the
//! strategy, add the step to the adapter (cumulative since the base release), compose the
//! round's privacy event, and publish either an adapter version (its `B` only) or, every
//! `publish.release-every` rounds, a new base release (the adapter merged into the f32
//! master, quantized int8 or int4); sign the manifest and publish in one transaction.

use std::collections::{HashMap, HashSet};

use covey_proto::keys::{self, KeyPair};
use covey_proto::manifest::{Adapter, ArtifactRef, LoraLayout, MANIFEST_SCHEMA, Manifest, PrivacySpent, Release};
use covey_proto::signing::UpdateHeader;
use covey_strategy::{ClientUpdate, Strategy};
use covey_tensors::NamedTensors;
use tracing::{error, info, warn};

use super::rounds::sampling_of;
use super::{Coordinator, KEY_A, KEY_PRIVACY, KEY_STRATEGY, now_wall_ms};
use crate::artifacts::Artifacts;
use crate::config::{CoordinatorConfig, ReleaseQuantization};
use crate::error::{CoordinatorError, Result};
use crate::round::{PrivacyRecord, RoundPolicy, privacy_spent};
use crate::store::{RoundRecord, Store, UpdateRecord, VersionRecord};
use crate::weights;

/// Format of the `config.json` artifact.
pub const CONFIG_FORMAT: &str = "llama-config-json";
/// Format of the `tokenizer.json` artifact.
pub const TOKENIZER_FORMAT: &str = "tokenizer-json";
/// Format of f32 safetensors artifacts (the LoRA factors).
pub const F32_FORMAT: &str = "safetensors-f32";

/// Where a new version sits in the chain and what it spent.
struct VersionInput {
    version: u64,
    parent: u64,
    round_id: u64,
    privacy: PrivacySpent,
}

/// What a new version publishes.
enum Publication<'a> {
    /// A base release: `master` merged, quantized, with the parent's config, tokenizer,
    /// template and special tokens (`template.version` and `model` are replaced).
    Release { master: &'a NamedTensors, template: Release },
    /// An adapter on the parent's release: its `B`, cumulative since the release.
    Adapter { release: Release, master_sha256: [u8; 32], b: &'a NamedTensors, rounds: u64 },
}

/// Store `bytes` and describe them (hash, size, piece hashes) for a manifest.
fn put_described(artifacts: &Artifacts, bytes: &[u8], format: &str) -> Result<([u8; 32], ArtifactRef)> {
    let hash = artifacts.put(bytes)?;
    Ok((hash, ArtifactRef::describe(bytes, format)))
}

/// Import `config.initial_model` as version 1 (a base release), with the `A` factors and
/// an empty privacy ledger (first start).
pub(super) async fn import_initial_model(
    config: &CoordinatorConfig,
    store: &dyn Store,
    artifacts: &Artifacts,
    key: &KeyPair,
) -> Result<()> {
    let path = config.initial_model.clone().ok_or_else(|| CoordinatorError::Config {
        field: "initial-model".into(),
        reason: "required on first start (a .gguf file, or a model directory with config.json and \
                 model.safetensors)"
            .into(),
    })?;
    let model = weights::read_initial_model(&path, &config.lora)?;
    let a = weights::a_factors(&model.master, &config.lora);
    let a_bytes = covey_tensors::encode(&a, None)?;
    let (a_hash, a_ref) = put_described(artifacts, &a_bytes, F32_FORMAT)?;
    let (_, config_ref) = put_described(artifacts, &model.config_json, CONFIG_FORMAT)?;
    let tokenizer = match &model.tokenizer_json {
        Some(bytes) => Some(put_described(artifacts, bytes, TOKENIZER_FORMAT)?.1),
        None => None,
    };
    let template = Release {
        version: 1,
        architecture: "llama".into(),
        model: ArtifactRef::describe(&[], ""),
        quantization: String::new(),
        config: config_ref,
        tokenizer,
        chat_template: model.chat_template.clone(),
        special_tokens: model.special_tokens.clone(),
    };
    let lora =
        LoraLayout { rank: config.lora.rank, alpha: config.lora.alpha, targets: config.lora.targets.clone(), a: a_ref };
    let input = VersionInput { version: 1, parent: 0, round_id: 0, privacy: privacy_spent(config, &[], 0)? };
    let publication = Publication::Release { master: &model.master, template };
    let (v, _) = build_version(artifacts, key, config, &lora, &input, publication)?;
    let state = [(KEY_A.into(), a_hash.to_vec()), (KEY_PRIVACY.into(), b"[]".to_vec())];
    store.publish(0, &v, &state).await?;
    info!(version = 1, model = %model.description, "imported the initial model from {}", path.display());
    Ok(())
}

impl Coordinator {
    pub(super) async fn aggregate_and_publish(&self, round: &RoundRecord) -> Result<Option<u64>> {
        let mut strategy = self.strategy.lock().await;
        // The strategy's state as persisted: put back if anything fails, so a retried
        // aggregation does not apply a server step (FedAdam moments, adaptive clip) twice.
        let snapshot = strategy.state()?;
        let outcome = self.aggregate_locked(&mut **strategy, round).await;
        if outcome.is_err()
            && let Err(e) = strategy.restore(snapshot)
        {
            error!(error = %e, "cannot restore the strategy's state after a failed aggregation");
        }
        outcome
    }

    async fn aggregate_locked(&self, strategy: &mut dyn Strategy, round: &RoundRecord) -> Result<Option<u64>> {
        let records = self.store.updates(round.id).await?;
        let mut keys_by_device = HashMap::new();
        for r in &records {
            if let Some(d) = self.store.device(&r.device_id).await? {
                keys_by_device.insert(d.id, (d.public_key, d.revoked));
            }
        }
        let plan = self.plan_of(round).await?;
        let sampling = sampling_of(round);
        let failures = (round.cohort_size as usize).saturating_sub(records.len());
        let base = self.version(round.base_version).await?;
        let parent = parse_manifest(&base)?;
        let aggregate = {
            let mut stream = StoredUpdates::new(&records, &self.uploads, &keys_by_device, plan.examples_per_update())
                .padded_to(self.config.lora.rank);
            let aggregate = strategy.aggregate(&sampling.context(round.id), &mut stream, failures)?;
            if let Some(e) = stream.error.take() {
                return Err(e);
            }
            if stream.dropped > 0 {
                warn!(
                    round = round.id,
                    dropped = stream.dropped,
                    stored = records.len(),
                    "updates left out of the aggregate"
                );
            }
            aggregate
        };
        let Some(aggregate) = aggregate else { return Ok(None) };
        // The adapter after this round, cumulative since the release (the first round on
        // a release takes the step as it is).
        let (b, rounds) = match &parent.adapter {
            Some(adapter) => {
                let prev = decode_blob(&self.artifacts, &adapter.b.sha256_bytes()?)?;
                (weights::accumulate(&prev, &aggregate.step)?, adapter.rounds + 1)
            }
            None => (aggregate.step.clone(), 1),
        };
        let merged;
        let publication = if rounds >= self.config.publish.release_every {
            let release_master = decode_blob(&self.artifacts, &base.master_sha256)?;
            let a = decode_blob(&self.artifacts, &self.a_hash)?;
            merged = weights::merge_step(&release_master, &a, &b, &self.config.lora)?;
            Publication::Release { master: &merged, template: parent.release.clone() }
        } else {
            Publication::Adapter { release: parent.release.clone(), master_sha256: base.master_sha256, b: &b, rounds }
        };
        let mut events = self.privacy_events().await?;
        events.extend(RoundPolicy::new(&self.config).privacy_event(&plan, &sampling, aggregate.privacy.as_ref()));
        let version = self.store.versions().await?.first().map_or(1, |v| v.version + 1);
        let input = VersionInput {
            version,
            parent: round.base_version,
            round_id: round.id,
            privacy: self.privacy_report(&events).await?,
        };
        let (v, new_artifacts) =
            build_version(&self.artifacts, &self.key, &self.config, &parent.lora, &input, publication)?;
        let state = json(&strategy.state()?, "strategy state")?;
        let events = json(&events, "privacy events")?;
        crate::crashpoint::reach("publish-artifacts-written");
        let current =
            self.store.publish(round.id, &v, &[(KEY_STRATEGY.into(), state), (KEY_PRIVACY.into(), events)]).await?;
        crate::crashpoint::reach("publish-committed");
        // Served from now on, not before: an aggregate whose publish was refused never is.
        self.served.write().unwrap_or_else(std::sync::PoisonError::into_inner).extend(new_artifacts);
        if current {
            self.metrics.current_version.set(version as i64);
        } else {
            warn!(
                version,
                parent = round.base_version,
                "published without making it current: the operator made another version current meanwhile"
            );
        }
        self.versions.send_replace(version);
        if new_artifacts_are_a_release(&v)? {
            self.collect_releases().await?;
        }
        Ok(Some(version))
    }

    /// Publish a new base release from `version` (operators): its adapter merged into its
    /// release's f32 master and quantized, a new version whose parent is `version`, made
    /// current (a round in progress on another version is failed, as by `promote`).
    /// Returns the new version and the round failed, if any.
    pub async fn cut_release(&self, version: u64) -> Result<(u64, Option<u64>)> {
        // Serialises with aggregation: one publisher picks the next version number.
        let strategy = self.strategy.lock().await;
        let record = self.store.version(version).await?.ok_or(CoordinatorError::NoSuchVersion(version))?;
        let parent = parse_manifest(&record)?;
        let Some(adapter) = &parent.adapter else {
            return Err(CoordinatorError::Refused(format!("version {version} is a base release already")));
        };
        self.check_available(&record, &parent)?;
        let master = decode_blob(&self.artifacts, &record.master_sha256)?;
        let a = decode_blob(&self.artifacts, &self.a_hash)?;
        let b = decode_blob(&self.artifacts, &adapter.b.sha256_bytes()?)?;
        let merged = weights::merge_step(&master, &a, &b, &self.config.lora)?;
        let events = self.privacy_events().await?;
        let new = self.store.versions().await?.first().map_or(1, |v| v.version + 1);
        let input =
            VersionInput { version: new, parent: version, round_id: 0, privacy: self.privacy_report(&events).await? };
        let publication = Publication::Release { master: &merged, template: parent.release.clone() };
        let (v, added) = build_version(&self.artifacts, &self.key, &self.config, &parent.lora, &input, publication)?;
        self.store.publish(0, &v, &[]).await?;
        self.served.write().unwrap_or_else(std::sync::PoisonError::into_inner).extend(added);
        drop(strategy);
        info!(version = new, from = version, "base release cut by the operator");
        let outcome = self.promote(new).await?;
        self.collect_releases().await?;
        Ok(outcome)
    }

    /// Refuse a version whose artifacts were deleted (an older release under
    /// `publish.keep-releases`).
    pub(super) fn check_available(&self, record: &VersionRecord, m: &Manifest) -> Result<()> {
        let mut hashes = vec![record.master_sha256];
        for a in m.artifacts() {
            hashes.push(a.sha256_bytes()?);
        }
        if hashes.iter().any(|h| self.artifacts.size(h).is_err()) {
            return Err(CoordinatorError::Refused(format!(
                "version {} cannot be used: the files of its release {} were deleted (publish.keep-releases)",
                m.version, m.release.version
            )));
        }
        Ok(())
    }

    /// Apply `publish.keep-releases`: keep the newest releases and the current version's,
    /// and every artifact a version on them names; delete the rest (release weights,
    /// masters, adapters) and stop serving it.
    pub(super) async fn collect_releases(&self) -> Result<()> {
        let keep = self.config.publish.keep_releases;
        if keep == 0 {
            return Ok(());
        }
        let records = self.store.versions().await?;
        let mut manifests = Vec::with_capacity(records.len());
        for r in &records {
            manifests.push(parse_manifest(r)?);
        }
        let current = self.store.current_version().await?;
        let mut releases: Vec<u64> = manifests.iter().filter(|m| m.adapter.is_none()).map(|m| m.version).collect();
        releases.sort_unstable_by(|a, b| b.cmp(a));
        let mut kept: HashSet<u64> = releases.into_iter().take(keep).collect();
        if let Some(m) = manifests.iter().find(|m| m.version == current) {
            kept.insert(m.release.version);
        }
        let hashes = |r: &VersionRecord, m: &Manifest| -> Result<Vec<[u8; 32]>> {
            let mut out = vec![r.master_sha256];
            for a in m.artifacts() {
                out.push(a.sha256_bytes()?);
            }
            Ok(out)
        };
        let mut live: HashSet<[u8; 32]> = HashSet::from([self.a_hash]);
        for (r, m) in records.iter().zip(&manifests) {
            if kept.contains(&m.release.version) {
                live.extend(hashes(r, m)?);
            }
        }
        let mut removed = 0usize;
        for (r, m) in records.iter().zip(&manifests) {
            if kept.contains(&m.release.version) {
                continue;
            }
            for h in hashes(r, m)? {
                if !live.contains(&h) && self.artifacts.size(&h).is_ok() {
                    self.artifacts.remove(&h)?;
                    self.served.write().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&h);
                    removed += 1;
                }
            }
        }
        if removed > 0 {
            info!(removed, kept = ?kept, "deleted the files of older releases (publish.keep-releases)");
        }
        Ok(())
    }

    /// The weights devices run at `version`, in f32: its release's quantized weights
    /// dequantized, plus `alpha / rank · B A` of its adapter. Also returns the manifest.
    pub async fn device_weights(&self, version: u64) -> Result<(NamedTensors, Manifest)> {
        let record = self.store.version(version).await?.ok_or(CoordinatorError::NoSuchVersion(version))?;
        let manifest = parse_manifest(&record)?;
        let (mut weights, _) =
            covey_tensors::quant::decode_model(&self.artifacts.get(&manifest.release.model.sha256_bytes()?)?)?;
        if let Some(adapter) = &manifest.adapter {
            let mut factors = decode_blob(&self.artifacts, &manifest.lora.a.sha256_bytes()?)?;
            factors.extend(decode_blob(&self.artifacts, &adapter.b.sha256_bytes()?)?);
            covey_tensors::lora::merge(&mut weights, &factors, manifest.lora.alpha / manifest.lora.rank as f32)?;
        }
        Ok((weights, manifest))
    }

    /// The accountant's events. A missing ledger while published rounds exist is
    /// corruption, never ε = 0.
    pub(super) async fn privacy_events(&self) -> Result<Vec<PrivacyRecord>> {
        if let Some(b) = self.store.get_state(KEY_PRIVACY).await? {
            return serde_json::from_slice(&b).map_err(|e| CoordinatorError::Corrupt(format!("privacy events: {e}")));
        }
        if self.store.versions().await?.iter().any(|v| v.round_id != 0) {
            return Err(CoordinatorError::Corrupt(
                "the privacy ledger (privacy_events) is missing while published rounds exist; ε is not restarted \
                 from 0"
                    .into(),
            ));
        }
        Ok(Vec::new())
    }

    /// The most contributions any device has made (DP-FTRL's accountant counts them).
    pub async fn max_contributions(&self) -> Result<u64> {
        Ok(self.store.participations().await?.values().map(|p| p.count).max().unwrap_or(0))
    }

    /// The privacy report for `events` as of now ([`privacy_spent`]).
    pub(super) async fn privacy_report(&self, events: &[PrivacyRecord]) -> Result<PrivacySpent> {
        privacy_spent(&self.config, events, self.max_contributions().await?)
    }

    /// The privacy report so far (ε at the configured δ, mechanism, assumption, bound).
    pub async fn privacy(&self) -> Result<PrivacySpent> {
        self.privacy_report(&self.privacy_events().await?).await
    }

    /// ε spent so far at the configured δ.
    pub async fn epsilon(&self) -> Result<f64> {
        Ok(self.privacy().await?.epsilon)
    }
}

/// Whether a stored version cut a release.
fn new_artifacts_are_a_release(v: &VersionRecord) -> Result<bool> {
    Ok(parse_manifest(v)?.adapter.is_none())
}

/// Serialise durable state; a failure is a bug of this program, reported as such.
fn json<T: serde::Serialize>(value: &T, what: &'static str) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|source| CoordinatorError::Serialize { what, source })
}

/// Streams a round's stored updates to a strategy one at a time, re-verifying each
/// signature and payload hash (so the benchmark and a restarted coordinator trust nothing
/// they did not check); updates of revoked devices, and payloads missing or damaged on
/// disk, are left out and counted in `dropped`. Every update weighs `weight` (the
/// task's steps × batch size), whatever its header declares. An update of a smaller rank
/// (HetLoRA; its shape was checked at intake) is zero-padded to `rank` columns first.
pub struct StoredUpdates<'a> {
    records: std::slice::Iter<'a, UpdateRecord>,
    uploads: &'a Artifacts,
    keys: &'a HashMap<[u8; 32], ([u8; 32], bool)>,
    weight: u64,
    rank: Option<usize>,
    /// A storage failure met while streaming (the stream ends early).
    pub error: Option<CoordinatorError>,
    /// Updates left out (revoked device, failed re-verification, missing or damaged payload).
    pub dropped: usize,
}

impl<'a> StoredUpdates<'a> {
    /// Stream `records`, whose payloads are in `uploads`.
    pub fn new(
        records: &'a [UpdateRecord],
        uploads: &'a Artifacts,
        keys: &'a HashMap<[u8; 32], ([u8; 32], bool)>,
        weight: u64,
    ) -> Self {
        Self { records: records.iter(), uploads, keys, weight, rank: None, error: None, dropped: 0 }
    }

    /// Zero-pad every update's `B` to `rank` columns.
    pub fn padded_to(mut self, rank: usize) -> Self {
        self.rank = Some(rank);
        self
    }
}

/// `B` of `[out, r]` as `[out, rank]`, columns `r..rank` zero (`None` when `r > rank`).
pub fn zero_pad(b: &NamedTensors, rank: usize) -> Option<NamedTensors> {
    b.iter()
        .map(|(name, t)| {
            let (out, r) = match t.shape[..] {
                [out, r] if r <= rank => (out, r),
                _ => return None,
            };
            if r == rank {
                return Some((name.clone(), t.clone()));
            }
            let mut data = vec![0.0; out * rank];
            for (row, src) in data.chunks_exact_mut(rank).zip(t.data.chunks_exact(r)) {
                row[..r].copy_from_slice(src);
            }
            Some((name.clone(), covey_tensors::HostTensor { shape: vec![out, rank], data }))
        })
        .collect()
}

impl Iterator for StoredUpdates<'_> {
    type Item = ClientUpdate;

    fn next(&mut self) -> Option<ClientUpdate> {
        loop {
            let r = self.records.next()?;
            let Some((pk, revoked)) = self.keys.get(&r.device_id) else {
                self.dropped += 1;
                continue;
            };
            let header = UpdateHeader::parse(&r.header).ok();
            let payload = match self.uploads.get(&r.payload_sha256) {
                Ok(p) => p,
                Err(e @ (CoordinatorError::MissingArtifact(_) | CoordinatorError::CorruptArtifact(_))) => {
                    warn!(update = r.id, error = %e, "stored update payload unusable; left out");
                    self.dropped += 1;
                    continue;
                }
                Err(e) => {
                    self.error = Some(e);
                    return None;
                }
            };
            let ok = !revoked
                && keys::verify(pk, &r.header, &r.signature).is_ok()
                && header.as_ref().is_some_and(|h| h.payload_sha256 == keys::sha256(&payload));
            if !ok {
                warn!(update = r.id, "stored update fails re-verification or its device is revoked; left out");
                self.dropped += 1;
                continue;
            }
            // f32, int8 or int4 (checked against the task at intake; decoding is deterministic).
            let decoded = covey_tensors::compress::decode_update(&payload).map(|(delta, _)| match self.rank {
                Some(rank) => zero_pad(&delta, rank),
                None => Some(delta),
            });
            match decoded {
                Ok(None) => {
                    warn!(update = r.id, "stored update of a rank above the layout's; left out");
                    self.dropped += 1;
                }
                Ok(Some(delta)) => {
                    return Some(ClientUpdate {
                        client: hex::encode(&r.device_id[..8]),
                        num_examples: self.weight,
                        delta,
                        within_clip: r.within_clip,
                    });
                }
                Err(e) => {
                    warn!(update = r.id, error = %e, "stored update does not decode; left out");
                    self.dropped += 1;
                }
            }
        }
    }
}

fn decode_blob(artifacts: &Artifacts, hash: &[u8; 32]) -> Result<NamedTensors> {
    Ok(covey_tensors::decode(&artifacts.get(hash)?)?.0)
}

pub(super) async fn load_master(store: &dyn Store, artifacts: &Artifacts, version: u64) -> Result<NamedTensors> {
    let v =
        store.version(version).await?.ok_or_else(|| CoordinatorError::Corrupt(format!("version {version} missing")))?;
    decode_blob(artifacts, &v.master_sha256)
}

/// The manifest a stored version signed.
pub(super) fn parse_manifest(v: &VersionRecord) -> Result<Manifest> {
    let m: Manifest = serde_json::from_slice(&v.manifest).map_err(|e| {
        CoordinatorError::Corrupt(format!(
            "manifest of version {}: {e} (a state directory of an older Covey: start a new one)",
            v.version
        ))
    })?;
    m.check().map_err(|e| CoordinatorError::Corrupt(format!("manifest of version {}: {e}", v.version)))?;
    Ok(m)
}

/// Store what `publication` needs (a release: its f32 master and quantized weights; an
/// adapter: its `B`), and sign a manifest for it. Returns the version and the artifacts it
/// adds (served once published).
fn build_version(
    artifacts: &Artifacts,
    key: &KeyPair,
    config: &CoordinatorConfig,
    lora: &LoraLayout,
    input: &VersionInput,
    publication: Publication<'_>,
) -> Result<(VersionRecord, Vec<[u8; 32]>)> {
    let (release, adapter, master_sha256, added) = match publication {
        Publication::Release { master, mut template } => {
            let master_sha256 = artifacts.put(&covey_tensors::encode(master, None)?)?;
            let quantization = config.publish.quantization;
            let bytes = covey_tensors::quant::encode_quantized(master, quantization.scheme(), HashMap::new())?;
            let (format, scheme) = match quantization {
                ReleaseQuantization::Int8 => ("safetensors-int8", covey_tensors::quant::INT8_SCHEME),
                ReleaseQuantization::Int4 => ("safetensors-int4", covey_tensors::quant::INT4_SCHEME),
            };
            let (model_sha256, model_ref) = put_described(artifacts, &bytes, format)?;
            template.version = input.version;
            template.model = model_ref;
            template.quantization = scheme.into();
            (template, None, master_sha256, vec![model_sha256])
        }
        Publication::Adapter { release, master_sha256, b, rounds } => {
            let bytes = covey_tensors::encode(b, None)?;
            let (b_sha256, b_ref) = put_described(artifacts, &bytes, F32_FORMAT)?;
            let adapter = Adapter { rounds, b: b_ref };
            (release, Some(adapter), master_sha256, vec![b_sha256])
        }
    };
    let epsilon = input.privacy.epsilon;
    let manifest = Manifest {
        schema: MANIFEST_SCHEMA,
        version: input.version,
        parent: input.parent,
        round_id: input.round_id,
        release,
        lora: lora.clone(),
        adapter,
        master_sha256: hex::encode(master_sha256),
        privacy: input.privacy.clone(),
        created_unix_ms: now_wall_ms(),
    };
    let (bytes, signature) = manifest.sign(key)?;
    let record = VersionRecord {
        version: input.version,
        parent: input.parent,
        round_id: input.round_id,
        manifest_sha256: keys::sha256(&bytes),
        manifest: bytes,
        signature: signature.to_vec(),
        master_sha256,
        epsilon,
        created_ms: now_wall_ms(),
    };
    Ok((record, added))
}
