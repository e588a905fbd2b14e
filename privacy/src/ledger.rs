//! A per-device privacy ledger, persisted, that refuses participation beyond the
//! configured budget.
//!
//! Each device's spending is kept as an RDP curve (composition is exact there) and
//! reported as ε at the budget's δ. The file is JSON with a format tag and a checksum,
//! replaced atomically (write, fsync, rename) on every charge. A file that does not
//! parse, has the wrong format, inconsistent orders, negative or non-finite entries, or
//! a bad checksum is an error — never a silent reset to zero.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{PrivacyError, Result};
use crate::rdp::{RdpAccountant, default_orders, epsilon_from_rdp};

const FORMAT: &str = "covey-privacy-ledger/1";

/// A privacy budget: at most `epsilon` at `delta` over a device's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    /// Largest ε a device may spend.
    pub epsilon: f64,
    /// The δ at which ε is measured.
    pub delta: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct DeviceEntry {
    rdp: Vec<f64>,
    participations: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Content {
    format: String,
    budget: Budget,
    orders: Vec<f64>,
    devices: BTreeMap<String, DeviceEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct File {
    content: Content,
    checksum: String,
}

fn checksum(content: &Content) -> Result<String> {
    let bytes = serde_json::to_vec(content)
        .map_err(|e| PrivacyError::CorruptLedger { path: PathBuf::new(), reason: format!("cannot encode: {e}") })?;
    // FNV-1a, 64 bits: detects accidental corruption (this is not an authenticator).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    Ok(format!("{h:016x}"))
}

/// The ledger.
#[derive(Debug)]
pub struct BudgetLedger {
    path: PathBuf,
    content: Content,
}

impl BudgetLedger {
    /// Open the ledger at `path`, or create an empty one. The configured `budget` applies
    /// from now on (it is what the devices were configured with).
    pub fn open(path: &Path, budget: Budget) -> Result<Self> {
        if !(budget.epsilon.is_finite() && budget.epsilon > 0.0) {
            return Err(PrivacyError::param("budget.epsilon", budget.epsilon, "must be finite and > 0"));
        }
        if !(budget.delta > 0.0 && budget.delta < 1.0) {
            return Err(PrivacyError::param("budget.delta", budget.delta, "must be in (0, 1)"));
        }
        let content = match std::fs::read(path) {
            Ok(bytes) => {
                let mut c = Self::parse(path, &bytes)?;
                c.budget = budget;
                c
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Content { format: FORMAT.into(), budget, orders: default_orders(), devices: BTreeMap::new() }
            }
            Err(source) => return Err(PrivacyError::Io { path: path.to_owned(), source }),
        };
        Ok(Self { path: path.to_owned(), content })
    }

    fn parse(path: &Path, bytes: &[u8]) -> Result<Content> {
        let corrupt = |reason: String| PrivacyError::CorruptLedger { path: path.to_owned(), reason };
        let file: File = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
        let c = file.content;
        if c.format != FORMAT {
            return Err(corrupt(format!("unknown format `{}`", c.format)));
        }
        if checksum(&c)? != file.checksum {
            return Err(corrupt("checksum mismatch".into()));
        }
        if c.orders.is_empty() || c.orders.iter().any(|a| !(a.is_finite() && *a > 1.0)) {
            return Err(corrupt("invalid RDP orders".into()));
        }
        for (device, entry) in &c.devices {
            if entry.rdp.len() != c.orders.len() {
                return Err(corrupt(format!(
                    "device {device}: {} RDP values for {} orders",
                    entry.rdp.len(),
                    c.orders.len()
                )));
            }
            if entry.rdp.iter().any(|r| r.is_nan() || *r < 0.0) {
                return Err(corrupt(format!("device {device}: negative or NaN RDP value")));
            }
        }
        Ok(c)
    }

    /// The budget in force.
    pub fn budget(&self) -> Budget {
        self.content.budget
    }

    /// ε spent by `device` at the budget's δ (0 for an unknown device).
    pub fn spent(&self, device: &str) -> Result<f64> {
        match self.content.devices.get(device) {
            None => Ok(0.0),
            Some(e) => Ok(epsilon_from_rdp(&self.content.orders, &e.rdp, self.content.budget.delta)?.0),
        }
    }

    /// Number of charged participations of `device`.
    pub fn participations(&self, device: &str) -> u64 {
        self.content.devices.get(device).map_or(0, |e| e.participations)
    }

    fn after(&self, device: &str, cost: &RdpAccountant) -> Result<Vec<f64>> {
        if cost.orders() != self.content.orders.as_slice() {
            return Err(PrivacyError::param(
                "orders",
                cost.orders().len() as f64,
                "the cost uses other RDP orders than the ledger",
            ));
        }
        let zero = vec![0.0; self.content.orders.len()];
        let current = self.content.devices.get(device).map_or(&zero, |e| &e.rdp);
        Ok(current.iter().zip(cost.rdp()).map(|(a, b)| a + b).collect())
    }

    /// ε `device` would have spent after a participation costing `cost`.
    pub fn would_spend(&self, device: &str, cost: &RdpAccountant) -> Result<f64> {
        let rdp = self.after(device, cost)?;
        Ok(epsilon_from_rdp(&self.content.orders, &rdp, self.content.budget.delta)?.0)
    }

    /// Charge a participation costing `cost` to `device` and persist the ledger before
    /// returning the new ε spent. Over budget, nothing changes and the error says so.
    pub fn charge(&mut self, device: &str, cost: &RdpAccountant) -> Result<f64> {
        let rdp = self.after(device, cost)?;
        let (eps, _) = epsilon_from_rdp(&self.content.orders, &rdp, self.content.budget.delta)?;
        if eps > self.content.budget.epsilon {
            return Err(PrivacyError::BudgetExceeded {
                device: device.to_owned(),
                would_spend: eps,
                budget: self.content.budget.epsilon,
                delta: self.content.budget.delta,
            });
        }
        let mut next = self.content.clone();
        let entry = next.devices.entry(device.to_owned()).or_insert(DeviceEntry { rdp: vec![], participations: 0 });
        entry.rdp = rdp;
        entry.participations += 1;
        self.persist(&next)?;
        self.content = next;
        Ok(eps)
    }

    fn persist(&self, content: &Content) -> Result<()> {
        let io = |source| PrivacyError::Io { path: self.path.clone(), source };
        let file = File { content: content.clone(), checksum: checksum(content)? };
        let bytes = serde_json::to_vec_pretty(&file)
            .map_err(|e| PrivacyError::CorruptLedger { path: self.path.clone(), reason: e.to_string() })?;
        covey_fs::write_atomic(&self.path, &bytes).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_cost() -> RdpAccountant {
        let mut a = RdpAccountant::default();
        a.compose_subsampled_gaussian(1.0, 2.0, 1).expect("compose");
        a
    }

    #[test]
    fn a_device_at_its_budget_is_refused_and_the_ledger_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ledger.json");
        let budget = Budget { epsilon: 3.0, delta: 1e-5 };
        let mut ledger = BudgetLedger::open(&path, budget).expect("open");
        let cost = round_cost();
        let mut rounds = 0;
        loop {
            match ledger.charge("phone-1", &cost) {
                Ok(eps) => {
                    assert!(eps <= 3.0);
                    rounds += 1;
                }
                Err(PrivacyError::BudgetExceeded { would_spend, .. }) => {
                    assert!(would_spend > 3.0);
                    break;
                }
                Err(e) => panic!("{e}"),
            }
            assert!(rounds < 100);
        }
        assert!(rounds >= 1);
        let spent = ledger.spent("phone-1").expect("spent");
        assert_eq!(ledger.participations("phone-1"), rounds);
        drop(ledger);

        let reopened = BudgetLedger::open(&path, budget).expect("reopen");
        assert_eq!(reopened.spent("phone-1").expect("spent"), spent);
        assert_eq!(reopened.participations("phone-1"), rounds);
        assert_eq!(reopened.spent("phone-2").expect("spent"), 0.0);
        let mut reopened = reopened;
        assert!(matches!(reopened.charge("phone-1", &cost), Err(PrivacyError::BudgetExceeded { .. })));
        assert_eq!(reopened.participations("phone-1"), rounds, "a refused charge changes nothing");
    }

    #[test]
    fn a_corrupt_ledger_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ledger.json");
        let budget = Budget { epsilon: 10.0, delta: 1e-5 };
        let mut ledger = BudgetLedger::open(&path, budget).expect("open");
        ledger.charge("phone-1", &round_cost()).expect("charge");
        let good = std::fs::read_to_string(&path).expect("read");

        std::fs::write(&path, &good[..good.len() / 2]).expect("truncate");
        let err = BudgetLedger::open(&path, budget).expect_err("truncated").to_string();
        assert!(err.contains("ledger.json") && err.contains("corrupt privacy ledger"), "{err}");

        // Change one RDP value by hand: the checksum catches it.
        let tampered = good.replacen("\"participations\": 1", "\"participations\": 0", 1);
        assert_ne!(tampered, good);
        std::fs::write(&path, tampered).expect("write");
        let err = BudgetLedger::open(&path, budget).expect_err("tampered").to_string();
        assert!(err.contains("checksum"), "{err}");

        std::fs::write(&path, "not json").expect("write");
        assert!(matches!(BudgetLedger::open(&path, budget), Err(PrivacyError::CorruptLedger { .. })));
    }
}
