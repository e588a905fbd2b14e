//! From trained `B` factors to the bytes uploaded, in typed steps:
//!
//! `NamedTensors` → [`PrivateUpdate::new`] (clip to C, add noise z·C, as the task demands)
//! → [`SignedUpdate::sign`] (encode, bind to the task, sign) → `CoordinatorClient::submit`.
//!
//! Each type can only be built by the step before it, and the uploader only takes a
//! [`SignedUpdate`], so an update that skipped clipping or noising cannot be sent.
//! `Debug` of both prints shapes and norms, never values.

use std::fmt;

use covey_privacy::clip::{ClipNorm, clip};
use covey_privacy::noise::{NoiseMultiplier, SecureRng, privatize};
use covey_proto::keys;
use covey_proto::signing::UpdateHeader;
use covey_tensors::compress::encode_update;
use covey_tensors::{HostTensor, NamedTensors, TensorError, global_norm};

use crate::error::{AgentError, Result};
use crate::identity::Identity;
use crate::task::{PrivacySpec, Task};

/// `B` factors after the task's privacy step: clipped to `C` when `C > 0`, then noised
/// with standard deviation `z·C` when `z > 0`. Only [`PrivateUpdate::new`] builds one.
#[derive(Clone)]
pub struct PrivateUpdate {
    tensors: NamedTensors,
    privacy: PrivacySpec,
    pre_clip_norm: f64,
}

impl fmt::Debug for PrivateUpdate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateUpdate")
            .field("tensors", &self.tensors.len())
            .field("values", &covey_tensors::num_values(&self.tensors))
            .field("clip_norm", &self.privacy.clip_norm)
            .field("noise_multiplier", &self.privacy.noise_multiplier)
            .field("pre_clip_norm", &self.pre_clip_norm)
            .field("norm", &global_norm(&self.tensors))
            .finish()
    }
}

impl PrivateUpdate {
    /// Apply `privacy` to `b`: flatten in name order, clip to `C` (when `C > 0`), add
    /// Gaussian noise `N(0, (z·C)²)` from the OS-keyed generator (when `z > 0`), and
    /// reshape. Non-finite values are refused.
    pub fn new(b: NamedTensors, privacy: PrivacySpec) -> Result<Self> {
        Self::build(b, privacy, None)
    }

    /// [`PrivateUpdate::new`] with the noise drawn from `rng` instead of a fresh OS-keyed
    /// generator: for simulations that must be reproducible from a seed
    /// ([`SecureRng::from_seed`]). A device never calls this.
    pub fn with_rng(b: NamedTensors, privacy: PrivacySpec, rng: &mut SecureRng) -> Result<Self> {
        Self::build(b, privacy, Some(rng))
    }

    fn build(b: NamedTensors, privacy: PrivacySpec, rng: Option<&mut SecureRng>) -> Result<Self> {
        privacy.validate().map_err(|e| AgentError::InvalidTask {
            task_id: String::new(),
            field: e.field(),
            reason: e.to_string(),
        })?;
        if let Some((name, _)) = b.iter().find(|(_, t)| !t.is_finite()) {
            return Err(AgentError::Tensor { what: "trained update", source: TensorError::NonFinite(name.clone()) });
        }
        let pre_clip_norm = global_norm(&b);
        if privacy.clip_norm == 0.0 {
            return Ok(Self { tensors: b, privacy, pre_clip_norm });
        }
        let shapes: Vec<(String, Vec<usize>, usize)> =
            b.iter().map(|(n, t)| (n.clone(), t.shape.clone(), t.len())).collect();
        let flat: Vec<f32> = b.into_values().flat_map(|t| t.data).collect();
        let clipped = clip(flat, ClipNorm::new(privacy.clip_norm)?)?;
        let values = if privacy.noise_multiplier > 0.0 {
            let z = NoiseMultiplier::new(privacy.noise_multiplier)?;
            match rng {
                Some(rng) => privatize(clipped, z, rng).into_values(),
                None => privatize(clipped, z, &mut SecureRng::from_os()?).into_values(),
            }
        } else {
            clipped.values().to_vec()
        };
        let mut tensors = NamedTensors::new();
        let mut rest = values.as_slice();
        for (name, shape, len) in shapes {
            let (head, tail) = rest.split_at(len);
            rest = tail;
            let t = HostTensor::new(shape, head.to_vec())
                .map_err(|source| AgentError::Tensor { what: "update", source })?;
            tensors.insert(name, t);
        }
        Ok(Self { tensors, privacy, pre_clip_norm })
    }

    /// The factors as they will be sent.
    pub fn tensors(&self) -> &NamedTensors {
        &self.tensors
    }

    /// The privacy applied.
    pub fn privacy(&self) -> PrivacySpec {
        self.privacy
    }

    /// Global L2 norm of `B` before clipping.
    pub fn pre_clip_norm(&self) -> f64 {
        self.pre_clip_norm
    }

    /// Whether the pre-clip norm was within `C`, when clipping applied (adaptive
    /// clipping's signal); `None` without clipping.
    pub fn within_clip(&self) -> Option<bool> {
        (self.privacy.clip_norm > 0.0).then_some(self.pre_clip_norm <= self.privacy.clip_norm)
    }
}

/// A private update encoded as safetensors (PEFT `lora_B` names; f32, or int8 / int4 codes
/// as the task says: covey-tensors `compress`), with the signed
/// header that binds it to its task. What the uploader takes.
#[derive(Clone)]
pub struct SignedUpdate {
    header: UpdateHeader,
    header_bytes: Vec<u8>,
    signature: [u8; 64],
    payload: Vec<u8>,
    train_loss: f32,
}

impl fmt::Debug for SignedUpdate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedUpdate")
            .field("round_id", &self.header.round_id)
            .field("task_id", &hex::encode(self.header.task_id))
            .field("payload_len", &self.payload.len())
            .field("num_examples", &self.header.num_examples)
            .finish()
    }
}

impl SignedUpdate {
    /// Encode `update`, build its header for `task` (round, task id, manifest hash, nonce,
    /// payload length and hash, C, z, examples, within-clip) and sign it with the device
    /// key. Refuses a payload over the task's `max_payload_bytes`.
    pub fn sign(
        update: PrivateUpdate,
        task: &Task,
        identity: &Identity,
        num_examples: u64,
        train_loss: f32,
    ) -> Result<Self> {
        if update.privacy != task.privacy {
            return Err(AgentError::InvalidTask {
                task_id: task.id_hex(),
                field: "privacy",
                reason: "the update was privatized with other settings than the task's".into(),
            });
        }
        let local_noise = task.privacy.noise_multiplier > 0.0;
        // int8 / int4 codes by stochastic rounding, keyed from the OS: post-processing of
        // the private update, and the decoded norm never exceeds the clipped one.
        let mut rounding = [0u8; 32];
        SecureRng::from_os()?.fill_bytes(&mut rounding);
        let payload = encode_update(update.tensors(), task.training.update_encoding, rounding, task.privacy.clip_norm)
            .map_err(|source| AgentError::Tensor { what: "update payload", source })?;
        if task.max_payload_bytes > 0 && payload.len() as u64 > task.max_payload_bytes {
            return Err(AgentError::PayloadTooLarge {
                task_id: task.id_hex(),
                len: payload.len() as u64,
                max: task.max_payload_bytes,
            });
        }
        let header = UpdateHeader {
            device_id: identity.device_id,
            round_id: task.round_id,
            task_id: task.task_id,
            base_manifest_hash: task.base_manifest_hash,
            nonce: task.nonce,
            payload_len: payload.len() as u64,
            payload_sha256: keys::sha256(&payload),
            clip_norm: task.privacy.clip_norm,
            noise_multiplier: task.privacy.noise_multiplier,
            num_examples,
            // Under local noise the exact within-clip bit and loss of private data would
            // bypass the noise: neither is sent.
            within_clip: if local_noise { None } else { update.within_clip() },
        };
        let header_bytes = header.to_bytes();
        let signature = identity.key().sign(&header_bytes);
        let train_loss = if local_noise { 0.0 } else { sanitize_loss(train_loss) };
        Ok(Self { header, header_bytes, signature, payload, train_loss })
    }

    /// A persisted update, accepted only if its signature verifies with this device's key,
    /// it is bound to `task`, and the payload matches its length and hash.
    pub(crate) fn reload(
        header_bytes: &[u8],
        signature: &[u8],
        payload: Vec<u8>,
        train_loss: f32,
        task: &Task,
        identity: &Identity,
    ) -> Result<Self> {
        let proto = |what, source| AgentError::Proto { what, source };
        keys::verify(&identity.key().public_key(), header_bytes, signature)
            .map_err(|e| proto("persisted update", e))?;
        let header = UpdateHeader::parse(header_bytes).map_err(|e| proto("persisted update", e))?;
        let bound = header.device_id == identity.device_id
            && header.round_id == task.round_id
            && header.task_id == task.task_id
            && header.nonce == task.nonce
            && header.base_manifest_hash == task.base_manifest_hash
            && header.clip_norm == task.privacy.clip_norm
            && header.noise_multiplier == task.privacy.noise_multiplier
            && header.payload_len == payload.len() as u64
            && header.payload_sha256 == keys::sha256(&payload);
        if !bound {
            return Err(AgentError::InvalidTask {
                task_id: task.id_hex(),
                field: "persisted update",
                reason: "does not match the task or its payload".into(),
            });
        }
        let signature =
            covey_proto::signing::fixed::<64>("signature", signature).map_err(|e| proto("persisted update", e))?;
        Ok(Self {
            header,
            header_bytes: header_bytes.to_vec(),
            signature,
            payload,
            train_loss: sanitize_loss(train_loss),
        })
    }

    /// The header.
    pub fn header(&self) -> &UpdateHeader {
        &self.header
    }

    /// The signed header bytes (`UpdateHeader::to_bytes`).
    pub fn header_bytes(&self) -> &[u8] {
        &self.header_bytes
    }

    /// The device's signature over [`Self::header_bytes`].
    pub fn signature(&self) -> &[u8; 64] {
        &self.signature
    }

    /// The safetensors payload.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// Mean training loss reported beside the update (informational).
    pub fn train_loss(&self) -> f32 {
        self.train_loss
    }
}

/// A finite loss, 0 when training did not report one.
fn sanitize_loss(loss: f32) -> f32 {
    if loss.is_finite() { loss } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use covey_proto::keys::KeyPair;

    use super::*;
    use crate::checkpoint::sample_b;
    use crate::task::{sample_task, validate};

    fn identity() -> Identity {
        Identity::new(KeyPair::generate().expect("key"), [0; 32], "http://x".into(), String::new())
    }

    #[test]
    fn clipped_update_has_norm_at_most_c() {
        let b = sample_b();
        assert_eq!(global_norm(&b), 13.0);
        for c in [0.5, 1.0, 12.99] {
            let p = PrivateUpdate::new(b.clone(), PrivacySpec { clip_norm: c, noise_multiplier: 0.0 }).expect("clip");
            assert!(global_norm(p.tensors()) <= c, "{c}: {}", global_norm(p.tensors()));
            assert_eq!(p.within_clip(), Some(false));
            assert_eq!(p.pre_clip_norm(), 13.0);
            for (name, t) in p.tensors() {
                assert_eq!(t.shape, b[name].shape, "{name}");
            }
        }
        // Inside the ball: unchanged.
        let p = PrivateUpdate::new(b.clone(), PrivacySpec { clip_norm: 20.0, noise_multiplier: 0.0 }).expect("clip");
        assert_eq!(p.tensors(), &b);
        assert_eq!(p.within_clip(), Some(true));
        // No clipping asked: unchanged, nothing reported.
        let p = PrivateUpdate::new(b.clone(), PrivacySpec { clip_norm: 0.0, noise_multiplier: 0.0 }).expect("none");
        assert_eq!((p.tensors(), p.within_clip()), (&b, None));
    }

    #[test]
    fn noise_is_added_after_clipping_and_debug_hides_values() {
        let p = PrivateUpdate::new(sample_b(), PrivacySpec { clip_norm: 1.0, noise_multiplier: 2.0 }).expect("noise");
        let q = PrivateUpdate::new(sample_b(), PrivacySpec { clip_norm: 1.0, noise_multiplier: 2.0 }).expect("noise");
        assert_ne!(p.tensors(), q.tensors(), "fresh noise each time");
        assert!(global_norm(p.tensors()) > 1.0, "noise of std 2 on 6 values exceeds the clip norm");
        let dbg = format!("{p:?}");
        assert!(dbg.contains("clip_norm: 1.0") && !dbg.contains("data"), "{dbg}");
        let mut bad = sample_b();
        if let Some(t) = bad.values_mut().next() {
            t.data[0] = f32::NAN;
        }
        assert!(PrivateUpdate::new(bad, PrivacySpec { clip_norm: 1.0, noise_multiplier: 0.0 }).is_err());
        assert!(PrivateUpdate::new(sample_b(), PrivacySpec { clip_norm: 0.0, noise_multiplier: 1.0 }).is_err());
    }

    #[test]
    fn the_signed_header_parses_and_verifies() {
        let id = identity();
        let task = validate(&sample_task()).expect("task");
        let private = PrivateUpdate::new(sample_b(), task.privacy).expect("private");
        let signed = SignedUpdate::sign(private, &task, &id, 40, 2.5).expect("sign");
        keys::verify(&id.key().public_key(), signed.header_bytes(), signed.signature()).expect("verifies");
        let h = UpdateHeader::parse(signed.header_bytes()).expect("parses");
        assert_eq!(&h, signed.header());
        assert_eq!(h.device_id, keys::sha256(&id.key().public_key()));
        assert_eq!((h.round_id, h.task_id, h.nonce, h.base_manifest_hash), (4, [1; 16], [2; 32], [5; 32]));
        assert_eq!((h.clip_norm, h.noise_multiplier, h.num_examples, h.within_clip), (1.0, 0.0, 40, Some(false)));
        assert_eq!(h.payload_len, signed.payload().len() as u64);
        assert_eq!(h.payload_sha256, keys::sha256(signed.payload()));
        let (decoded, _) = covey_tensors::decode(signed.payload()).expect("payload decodes");
        assert!(global_norm(&decoded) <= 1.0);
        // Tampering with the header breaks the signature.
        let mut tampered = signed.header_bytes().to_vec();
        tampered[40] ^= 1;
        assert!(keys::verify(&id.key().public_key(), &tampered, signed.signature()).is_err());
        // Reloading checks the binding.
        let again =
            SignedUpdate::reload(signed.header_bytes(), signed.signature(), signed.payload().to_vec(), 2.5, &task, &id)
                .expect("reload");
        assert_eq!(again.header(), signed.header());
        let other = Task { nonce: [8; 32], ..task.clone() };
        assert!(
            SignedUpdate::reload(
                signed.header_bytes(),
                signed.signature(),
                signed.payload().to_vec(),
                2.5,
                &other,
                &id
            )
            .is_err()
        );
    }

    #[test]
    fn an_update_privatized_otherwise_or_too_large_is_refused() {
        let id = identity();
        let task = validate(&sample_task()).expect("task");
        let unclipped =
            PrivateUpdate::new(sample_b(), PrivacySpec { clip_norm: 0.0, noise_multiplier: 0.0 }).expect("p");
        let err = SignedUpdate::sign(unclipped, &task, &id, 1, 0.0).expect_err("task demands clipping");
        assert!(err.to_string().contains("privacy"), "{err}");
        let small = Task { max_payload_bytes: 10, ..task.clone() };
        let p = PrivateUpdate::new(sample_b(), task.privacy).expect("p");
        assert!(matches!(SignedUpdate::sign(p, &small, &id, 1, 0.0), Err(AgentError::PayloadTooLarge { .. })));
    }
}
