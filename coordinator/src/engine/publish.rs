//! Aggregation and publishing: stream a round's stored updates (verified again) to the
//! strategy, merge the step into the master weights, compose the round's privacy event,
//! build the f32 and int8 artifacts, sign the manifest and publish in one transaction.

use std::collections::HashMap;

use covey_proto::keys::{self, KeyPair};
use covey_proto::manifest::{ArtifactRef, Manifest, PrivacySpent};
use covey_proto::signing::UpdateHeader;
use covey_strategy::{ClientUpdate, Strategy};
use covey_tensors::NamedTensors;
use tracing::{error, info, warn};

use super::rounds::sampling_of;
use super::{Coordinator, KEY_A, KEY_CONFIG, KEY_PRIVACY, KEY_STRATEGY, now_wall_ms};
use crate::artifacts::Artifacts;
use crate::config::CoordinatorConfig;
use crate::error::{CoordinatorError, Result};
use crate::round::{PrivacyRecord, RoundPolicy, privacy_spent};
use crate::store::{RoundRecord, Store, UpdateRecord, VersionRecord};
use crate::weights;

/// What a new version is made of.
struct VersionInput<'a> {
    master: &'a NamedTensors,
    version: u64,
    parent: u64,
    round_id: u64,
    config_hash: [u8; 32],
    privacy: PrivacySpent,
}

/// Import `config.initial_model` as version 1, with the `A` factors, the model config
/// and an empty privacy ledger (first start).
pub(super) async fn import_initial_model(
    config: &CoordinatorConfig,
    store: &dyn Store,
    artifacts: &Artifacts,
    key: &KeyPair,
) -> Result<()> {
    let dir = config.initial_model.clone().ok_or_else(|| CoordinatorError::Config {
        field: "initial-model".into(),
        reason: "required on first start (a directory with config.json and model.safetensors)".into(),
    })?;
    let (config_json, master) = weights::read_initial_model(&dir, &config.lora)?;
    let a = weights::a_factors(&master, &config.lora);
    let a_hash = artifacts.put(&covey_tensors::encode(&a, None)?)?;
    let config_hash = artifacts.put(&config_json)?;
    let input = VersionInput {
        master: &master,
        version: 1,
        parent: 0,
        round_id: 0,
        config_hash,
        privacy: privacy_spent(&[], config.privacy.delta)?,
    };
    let (v, _) = build_version(artifacts, key, &input)?;
    let state = [
        (KEY_A.into(), a_hash.to_vec()),
        (KEY_CONFIG.into(), config_hash.to_vec()),
        (KEY_PRIVACY.into(), b"[]".to_vec()),
    ];
    store.publish(0, &v, &state).await?;
    info!(version = 1, "imported the initial model from {}", dir.display());
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
        let master = decode_blob(&self.artifacts, &base.master_sha256)?;
        let a = decode_blob(&self.artifacts, &self.a_hash)?;
        let aggregate = {
            let mut stream = StoredUpdates::new(&records, &self.uploads, &keys_by_device, plan.examples_per_update());
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
        let merged = weights::merge_step(&master, &a, &aggregate.step, &self.config.lora)?;
        let mut events = self.privacy_events().await?;
        events.extend(RoundPolicy::new(&self.config).privacy_event(&plan, &sampling, aggregate.privacy.as_ref()));
        let version = self.store.versions().await?.first().map_or(1, |v| v.version + 1);
        let input = VersionInput {
            master: &merged,
            version,
            parent: round.base_version,
            round_id: round.id,
            config_hash: self.config_hash,
            privacy: privacy_spent(&events, self.config.privacy.delta)?,
        };
        let (v, model_sha256) = build_version(&self.artifacts, &self.key, &input)?;
        let state = json(&strategy.state()?, "strategy state")?;
        let events = json(&events, "privacy events")?;
        let current =
            self.store.publish(round.id, &v, &[(KEY_STRATEGY.into(), state), (KEY_PRIVACY.into(), events)]).await?;
        // Served from now on, not before: an aggregate whose publish was refused never is.
        self.served.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(model_sha256);
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
        Ok(Some(version))
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

    /// ε spent so far at the configured δ.
    pub async fn epsilon(&self) -> Result<f64> {
        Ok(privacy_spent(&self.privacy_events().await?, self.config.privacy.delta)?.epsilon)
    }
}

/// Serialise durable state; a failure is a bug of this program, reported as such.
fn json<T: serde::Serialize>(value: &T, what: &'static str) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|source| CoordinatorError::Serialize { what, source })
}

/// Streams a round's stored updates to a strategy one at a time, re-verifying each
/// signature and payload hash (so the benchmark and a restarted coordinator trust nothing
/// they did not check); updates of revoked devices, and payloads missing or damaged on
/// disk, are left out and counted in `dropped`. Every update weighs `weight` (the
/// task's steps × batch size), whatever its header declares.
pub struct StoredUpdates<'a> {
    records: std::slice::Iter<'a, UpdateRecord>,
    uploads: &'a Artifacts,
    keys: &'a HashMap<[u8; 32], ([u8; 32], bool)>,
    weight: u64,
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
        Self { records: records.iter(), uploads, keys, weight, error: None, dropped: 0 }
    }
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
            match covey_tensors::decode(&payload) {
                Ok((delta, _)) => {
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

/// Store master (f32) and device (int8) weights, and sign a manifest for them; returns
/// the version and the SHA-256 of its int8 model.
fn build_version(artifacts: &Artifacts, key: &KeyPair, input: &VersionInput<'_>) -> Result<(VersionRecord, [u8; 32])> {
    let master_bytes = covey_tensors::encode(input.master, None)?;
    let master_sha256 = artifacts.put(&master_bytes)?;
    let int8 = covey_tensors::quant::encode_int8(input.master, HashMap::new())?;
    let model_sha256 = artifacts.put(&int8)?;
    let config_size = artifacts.size(&input.config_hash)?;
    let epsilon = input.privacy.epsilon;
    let manifest = Manifest {
        schema: 1,
        version: input.version,
        parent: input.parent,
        round_id: input.round_id,
        model: ArtifactRef {
            sha256: hex::encode(model_sha256),
            size: int8.len() as u64,
            format: "safetensors-int8".into(),
        },
        master_sha256: hex::encode(master_sha256),
        config: ArtifactRef {
            sha256: hex::encode(input.config_hash),
            size: config_size,
            format: "llama-config-json".into(),
        },
        quantization: covey_tensors::quant::INT8_SCHEME.into(),
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
    Ok((record, model_sha256))
}
