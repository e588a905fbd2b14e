//! A store in memory.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::{
    Assignment, DeviceRecord, EnrollOutcome, Participation, RevokeOutcome, RoundRecord, RoundState, Store, TokenRecord,
    UpdateRecord, VersionRecord, decode_current, decode_u64,
};
use crate::error::{CoordinatorError, Rejection, Result};

/// State in memory (lost on exit): tests, simulations, and paused-clock tests (it never
/// leaves the async runtime for another thread).
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Memory>,
}

#[derive(Debug, Default)]
struct Memory {
    devices: Vec<DeviceRecord>,
    device_tokens: BTreeMap<[u8; 32], [u8; 32]>,
    tokens: BTreeMap<[u8; 32], TokenRecord>,
    rounds: BTreeMap<u64, RoundRecord>,
    assignments: BTreeMap<(u64, [u8; 32]), Assignment>,
    updates: Vec<UpdateRecord>,
    versions: BTreeMap<u64, VersionRecord>,
    kv: BTreeMap<String, Vec<u8>>,
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn insert_device(&self, d: &DeviceRecord) -> Result<bool> {
        let mut m = self.lock();
        if m.devices.iter().any(|x| x.id == d.id) {
            return Ok(false);
        }
        m.devices.push(d.clone());
        Ok(true)
    }

    async fn device(&self, id: &[u8; 32]) -> Result<Option<DeviceRecord>> {
        Ok(self.lock().devices.iter().find(|d| &d.id == id).cloned())
    }

    async fn devices(&self) -> Result<Vec<DeviceRecord>> {
        Ok(self.lock().devices.clone())
    }

    async fn insert_token(&self, t: &TokenRecord) -> Result<bool> {
        let mut m = self.lock();
        if m.tokens.contains_key(&t.hash) {
            return Ok(false);
        }
        m.tokens.insert(t.hash, t.clone());
        Ok(true)
    }

    async fn enroll(&self, d: &DeviceRecord, token_hash: &[u8; 32], now_ms: u64) -> Result<EnrollOutcome> {
        let mut m = self.lock();
        if let Some(existing) = m.devices.iter().find(|x| x.id == d.id) {
            return Ok(if existing.revoked { EnrollOutcome::DeviceRevoked } else { EnrollOutcome::AlreadyEnrolled });
        }
        let Some(t) = m.tokens.get_mut(token_hash) else { return Ok(EnrollOutcome::TokenUnknown) };
        if t.burned {
            return Ok(EnrollOutcome::TokenBurned);
        }
        if t.expires_ms > 0 && t.expires_ms <= now_ms {
            return Ok(EnrollOutcome::TokenExpired);
        }
        if t.uses_left == 0 {
            return Ok(EnrollOutcome::TokenUsedUp);
        }
        if t.uses_left > 0 {
            t.uses_left -= 1;
        }
        m.devices.push(d.clone());
        m.device_tokens.insert(d.id, *token_hash);
        Ok(EnrollOutcome::Enrolled)
    }

    async fn revoke(&self, id: &[u8; 32]) -> Result<RevokeOutcome> {
        let mut m = self.lock();
        let changed = match m.devices.iter_mut().find(|d| &d.id == id) {
            Some(d) if !d.revoked => {
                d.revoked = true;
                true
            }
            _ => false,
        };
        let token = m.device_tokens.get(id).copied();
        let token_burned = match token.and_then(|h| m.tokens.get_mut(&h)) {
            Some(t) if !t.burned => {
                t.burned = true;
                true
            }
            _ => false,
        };
        Ok(RevokeOutcome { changed, token_burned })
    }

    async fn touch(&self, id: &[u8; 32], now_ms: u64) -> Result<()> {
        if let Some(d) = self.lock().devices.iter_mut().find(|d| &d.id == id) {
            d.last_seen_ms = now_ms;
        }
        Ok(())
    }

    async fn insert_round(&self, r: &RoundRecord, assignments: &[Assignment]) -> Result<()> {
        let mut m = self.lock();
        if m.rounds.contains_key(&r.id) {
            return Err(CoordinatorError::Corrupt(format!("round {} exists", r.id)));
        }
        m.rounds.insert(r.id, r.clone());
        for a in assignments {
            m.assignments.insert((a.round_id, a.device_id), a.clone());
        }
        Ok(())
    }

    async fn active_round(&self) -> Result<Option<RoundRecord>> {
        Ok(self
            .lock()
            .rounds
            .values()
            .rev()
            .find(|r| matches!(r.state, RoundState::Open | RoundState::Collecting | RoundState::Aggregating))
            .cloned())
    }

    async fn rounds(&self, limit: usize) -> Result<Vec<RoundRecord>> {
        Ok(self.lock().rounds.values().rev().take(limit).cloned().collect())
    }

    async fn set_round_state(&self, id: u64, state: RoundState, failure: &str) -> Result<bool> {
        Ok(match self.lock().rounds.get_mut(&id) {
            Some(r) if matches!(r.state, RoundState::Open | RoundState::Collecting | RoundState::Aggregating) => {
                r.state = state;
                r.failure = failure.to_owned();
                true
            }
            _ => false,
        })
    }

    async fn assignment(&self, round_id: u64, device_id: &[u8; 32]) -> Result<Option<Assignment>> {
        Ok(self.lock().assignments.get(&(round_id, *device_id)).cloned())
    }

    async fn insert_update(&self, up: &UpdateRecord, nonce: &[u8; 32]) -> Result<u64> {
        let mut m = self.lock();
        if !m.rounds.get(&up.round_id).is_some_and(|r| r.state.accepts_updates()) {
            return Err(Rejection::RoundClosed.into());
        }
        match m.assignments.get_mut(&(up.round_id, up.device_id)) {
            Some(a) if &a.nonce == nonce && !a.used && a.declined.is_none() => a.used = true,
            _ => return Err(Rejection::Replay.into()),
        }
        let id = m.updates.len() as u64 + 1;
        m.updates.push(UpdateRecord { id, ..up.clone() });
        if let Some(r) = m.rounds.get_mut(&up.round_id)
            && r.state == RoundState::Open
        {
            r.state = RoundState::Collecting;
        }
        Ok(id)
    }

    async fn updates(&self, round_id: u64) -> Result<Vec<UpdateRecord>> {
        Ok(self.lock().updates.iter().filter(|x| x.round_id == round_id).cloned().collect())
    }

    async fn decline(&self, round_id: u64, device_id: &[u8; 32], reason: &str) -> Result<bool> {
        Ok(match self.lock().assignments.get_mut(&(round_id, *device_id)) {
            Some(a) if !a.used && a.declined.is_none() => {
                a.declined = Some(reason.into());
                true
            }
            _ => false,
        })
    }

    async fn declined_count(&self, round_id: u64) -> Result<u64> {
        Ok(self.lock().assignments.values().filter(|a| a.round_id == round_id && a.declined.is_some()).count() as u64)
    }

    async fn update_count(&self, round_id: u64) -> Result<u64> {
        Ok(self.lock().updates.iter().filter(|x| x.round_id == round_id).count() as u64)
    }

    async fn device_update_count(&self, device_id: &[u8; 32]) -> Result<u64> {
        Ok(self.lock().updates.iter().filter(|x| &x.device_id == device_id).count() as u64)
    }

    async fn participations(&self) -> Result<BTreeMap<[u8; 32], Participation>> {
        let mut out: BTreeMap<[u8; 32], Participation> = BTreeMap::new();
        for x in &self.lock().updates {
            let p = out.entry(x.device_id).or_insert(Participation { count: 0, last_round: 0 });
            p.count += 1;
            p.last_round = p.last_round.max(x.round_id);
        }
        Ok(out)
    }

    async fn participation(&self, device_id: &[u8; 32]) -> Result<Option<Participation>> {
        Ok(self.participations().await?.get(device_id).copied())
    }

    async fn publish(&self, round_id: u64, v: &VersionRecord, state: &[(String, Vec<u8>)]) -> Result<bool> {
        let mut m = self.lock();
        if round_id != 0 {
            let found = m.rounds.get(&round_id).map(|r| r.state);
            if found != Some(RoundState::Aggregating) {
                return Err(CoordinatorError::Refused(format!(
                    "round {round_id} is {} and not aggregating: its version is not published",
                    found.map_or("missing", RoundState::as_str)
                )));
            }
        }
        let becomes_current = m.kv.get("current_version").map_or(0, |b| decode_u64(b)) == v.parent;
        m.versions.insert(v.version, v.clone());
        if let Some(r) = m.rounds.get_mut(&round_id) {
            r.state = RoundState::Published;
            r.published_version = v.version;
        }
        for (k, val) in state {
            m.kv.insert(k.clone(), val.clone());
        }
        if becomes_current {
            m.kv.insert("current_version".into(), v.version.to_be_bytes().to_vec());
        }
        Ok(becomes_current)
    }

    async fn version(&self, version: u64) -> Result<Option<VersionRecord>> {
        Ok(self.lock().versions.get(&version).cloned())
    }

    async fn versions(&self) -> Result<Vec<VersionRecord>> {
        Ok(self.lock().versions.values().rev().cloned().collect())
    }

    async fn current_version(&self) -> Result<u64> {
        match self.lock().kv.get("current_version") {
            None => Ok(0),
            Some(b) => decode_current(b),
        }
    }

    async fn set_current_version(&self, version: u64) -> Result<()> {
        self.lock().kv.insert("current_version".into(), version.to_be_bytes().to_vec());
        Ok(())
    }

    async fn get_state(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.lock().kv.get(key).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::store_conformance;

    #[tokio::test]
    async fn memory_store_conforms() {
        store_conformance(&MemoryStore::default()).await;
    }
}
