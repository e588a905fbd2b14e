//! Ed25519 keys (ring), device ids and SHA-256.

use ring::rand::SecureRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};

use crate::{ProtoError, Result};

/// Length of an Ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Incremental SHA-256 (for streamed payloads).
#[derive(Clone)]
pub struct Sha256(ring::digest::Context);

impl Default for Sha256 {
    fn default() -> Self {
        Self(ring::digest::Context::new(&ring::digest::SHA256))
    }
}

impl Sha256 {
    /// Feed bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The digest.
    pub fn finish(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.0.finish().as_ref());
        out
    }
}

/// The device id of a public key: its SHA-256.
pub fn device_id(public_key: &[u8]) -> [u8; 32] {
    sha256(public_key)
}

/// `n` bytes from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut out = [0u8; N];
    ring::rand::SystemRandom::new().fill(&mut out).map_err(|_| ProtoError::Key("no system randomness".into()))?;
    Ok(out)
}

/// An Ed25519 key pair, kept as its PKCS#8 v2 document.
pub struct KeyPair {
    pkcs8: Vec<u8>,
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyPair(public {})", hex::encode(self.public_key()))
    }
}

impl KeyPair {
    /// A fresh key pair from the system CSPRNG.
    pub fn generate() -> Result<Self> {
        let doc = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .map_err(|_| ProtoError::Key("key generation failed".into()))?;
        Self::from_pkcs8(doc.as_ref())
    }

    /// A key pair from a PKCS#8 v2 document (with its public key, which ring checks
    /// against the private one).
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8)
            .map_err(|e| ProtoError::Key(format!("not an Ed25519 PKCS#8 v2 document: {e}")))?;
        Ok(Self { pkcs8: pkcs8.to_vec(), pair })
    }

    /// The signing-only key pair of a raw 32-byte Ed25519 seed (RFC 8032), for published
    /// test vectors: it has no PKCS#8 document ([`KeyPair::pkcs8`] is empty).
    pub fn from_seed(seed: &[u8; 32]) -> Result<Self> {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed)
            .map_err(|e| ProtoError::Key(format!("not an Ed25519 seed: {e}")))?;
        Ok(Self { pkcs8: Vec::new(), pair })
    }

    /// The PKCS#8 document (secret: store with owner-only permissions).
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The raw 32-byte public key.
    pub fn public_key(&self) -> [u8; PUBLIC_KEY_LEN] {
        let mut out = [0u8; PUBLIC_KEY_LEN];
        out.copy_from_slice(self.pair.public_key().as_ref());
        out
    }

    /// SHA-256 of the public key.
    pub fn device_id(&self) -> [u8; 32] {
        device_id(&self.public_key())
    }

    /// Sign `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_LEN] {
        let mut out = [0u8; SIGNATURE_LEN];
        out.copy_from_slice(self.pair.sign(message).as_ref());
        out
    }
}

/// Verify an Ed25519 signature.
pub fn verify(public_key: &[u8], message: &[u8], signature: &[u8]) -> Result<()> {
    UnparsedPublicKey::new(&ED25519, public_key).verify(message, signature).map_err(|_| ProtoError::BadSignature)
}

/// Whether `a` and `b` are equal, in time that depends only on their lengths (for
/// secrets such as bearer tokens).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_pkcs8_and_sign() {
        let k = KeyPair::generate().expect("key");
        let k2 = KeyPair::from_pkcs8(k.pkcs8()).expect("reload");
        assert_eq!(k.public_key(), k2.public_key());
        let sig = k2.sign(b"msg");
        assert!(verify(&k.public_key(), b"msg", &sig).is_ok());
        assert!(verify(&k.public_key(), b"msg!", &sig).is_err());
        let other = KeyPair::generate().expect("key");
        assert!(verify(&other.public_key(), b"msg", &sig).is_err());
        assert!(KeyPair::from_pkcs8(b"junk").is_err());
    }

    #[test]
    fn incremental_hash_matches_one_shot() {
        let mut h = Sha256::default();
        h.update(b"hel");
        h.update(b"lo");
        assert_eq!(h.finish(), sha256(b"hello"));
        assert_eq!(hex::encode(sha256(b"")), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }
}
