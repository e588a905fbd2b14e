//! [`StrategyState`]: what a strategy persists so a coordinator can resume after a crash.
//!
//! # Format
//!
//! A serde struct, so the coordinator picks the format (JSON, a binary format, ...), and
//! every format round-trips it exactly:
//!
//! * `scalars` (round counter, adaptive clip norm) are written as strings in Rust's
//!   shortest round-trip notation (`"0.1"`, `"1e-9"`), because serde_json's default float
//!   parser may be off by one unit in the last place;
//! * `tensors` (optimiser moments) are written as one f32 safetensors blob
//!   ([`covey_tensors::encode`]) through `serialize_bytes`: raw bytes in binary formats,
//!   an array of byte values in JSON (four times larger: prefer a binary format for
//!   large adapters);
//! * `texts`: structured state as text (DP-FTRL's noise tree, as JSON);
//! * `inner`: the state of a wrapped strategy ([`crate::DpFedAvg`], [`crate::DpFtrl`]).

use std::collections::BTreeMap;
use std::fmt;

use covey_tensors::NamedTensors;
use serde::{Deserialize, Serialize};

use crate::StrategyError;

/// `state` and `restore` of a strategy whose only state is its round counter
/// (`self.rounds`), for its `impl Strategy` block.
macro_rules! rounds_only_state {
    () => {
        fn state(&self) -> Result<StrategyState, StrategyError> {
            Ok(StrategyState::rounds_only(self.name(), self.rounds))
        }

        fn restore(&mut self, state: StrategyState) -> Result<(), StrategyError> {
            self.rounds = state.restore_rounds(&self.name())?;
            Ok(())
        }
    };
}
pub(crate) use rounds_only_state;

/// The persistent state of a strategy. See the [module documentation](self) for the format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StrategyState {
    /// [`crate::Strategy::name`] of the strategy that wrote it.
    pub strategy: String,
    /// Named scalars.
    #[serde(with = "exact_scalars")]
    pub scalars: BTreeMap<String, f64>,
    /// Named tensors.
    #[serde(with = "tensor_bytes")]
    pub tensors: NamedTensors,
    /// Named texts (structured state such as DP-FTRL's noise tree, as JSON).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub texts: BTreeMap<String, String>,
    /// State of a wrapped strategy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inner: Option<Box<StrategyState>>,
}

impl StrategyState {
    /// The state of a strategy whose only state is its round counter.
    pub(crate) fn rounds_only(strategy: impl Into<String>, rounds: u64) -> Self {
        let mut s = Self::new(strategy);
        s.scalars.insert(crate::fedavg::ROUNDS.into(), rounds as f64);
        s
    }

    /// The round counter of a [`StrategyState::rounds_only`] state written by `strategy`.
    pub(crate) fn restore_rounds(&self, strategy: &str) -> Result<u64, StrategyError> {
        self.expect_strategy(strategy)?;
        self.count(crate::fedavg::ROUNDS)
    }

    /// An empty state of the strategy named `strategy`.
    pub fn new(strategy: impl Into<String>) -> Self {
        Self {
            strategy: strategy.into(),
            scalars: BTreeMap::new(),
            tensors: NamedTensors::new(),
            texts: BTreeMap::new(),
            inner: None,
        }
    }

    /// Check that this state was written by `name`.
    pub fn expect_strategy(&self, name: &str) -> Result<(), StrategyError> {
        if self.strategy == name {
            Ok(())
        } else {
            Err(StrategyError::StateMismatch { expected: name.to_string(), found: self.strategy.clone() })
        }
    }

    /// The scalar `key`, or [`StrategyError::StateMissing`].
    pub fn scalar(&self, key: &str) -> Result<f64, StrategyError> {
        self.scalars
            .get(key)
            .copied()
            .ok_or_else(|| StrategyError::StateMissing { strategy: self.strategy.clone(), key: key.to_string() })
    }

    /// The scalar `key` as a count (a non-negative integer), or an error.
    pub fn count(&self, key: &str) -> Result<u64, StrategyError> {
        let x = self.scalar(key)?;
        if x >= 0.0 && x.fract() == 0.0 && x <= 2f64.powi(53) {
            Ok(x as u64)
        } else {
            Err(StrategyError::StateInvalid {
                strategy: self.strategy.clone(),
                key: key.to_string(),
                reason: "is not a non-negative integer",
            })
        }
    }
}

mod exact_scalars {
    use super::*;
    use serde::de::Error as _;
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(map: &BTreeMap<String, f64>, s: S) -> Result<S::Ok, S::Error> {
        let strings: BTreeMap<&String, String> = map.iter().map(|(k, v)| (k, format!("{v:?}"))).collect();
        strings.serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f64>, D::Error> {
        let strings = BTreeMap::<String, String>::deserialize(d)?;
        strings
            .into_iter()
            .map(|(k, v)| match v.parse::<f64>() {
                Ok(x) => Ok((k, x)),
                Err(_) => Err(D::Error::custom(format!("scalar `{k}`: `{v}` is not a number"))),
            })
            .collect()
    }
}

mod tensor_bytes {
    use super::*;
    use serde::de::{Error as _, SeqAccess, Visitor};
    use serde::ser::Error as _;
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(tensors: &NamedTensors, s: S) -> Result<S::Ok, S::Error> {
        let bytes = covey_tensors::encode(tensors, None).map_err(S::Error::custom)?;
        s.serialize_bytes(&bytes)
    }

    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("safetensors bytes")
        }

        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<NamedTensors, D::Error> {
        let bytes = d.deserialize_byte_buf(BytesVisitor)?;
        let (tensors, _) = covey_tensors::decode(&bytes).map_err(D::Error::custom)?;
        Ok(tensors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use covey_tensors::HostTensor;

    fn sample() -> StrategyState {
        let mut s = StrategyState::new("dp-adaptive(fed-adam)");
        s.scalars.insert("clip_norm".into(), 0.1 + 0.2);
        s.scalars.insert("tiny".into(), 1e-300 / 3.0);
        s.scalars.insert("rounds".into(), 17.0);
        let mut inner = StrategyState::new("fed-adam");
        let vals: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() / 3.0 + f32::EPSILON * i as f32).collect();
        inner.tensors.insert("m/a".into(), HostTensor::new(vec![37], vals).expect("t"));
        inner.tensors.insert("v/a".into(), HostTensor::new(vec![1, 2], vec![1e-38, 3.4e38]).expect("t"));
        s.inner = Some(Box::new(inner));
        s
    }

    #[test]
    fn json_round_trip_is_exact() {
        let s = sample();
        let json = serde_json::to_string(&s).expect("ser");
        let back: StrategyState = serde_json::from_str(&json).expect("de");
        assert_eq!(back, s);
        let bits = |st: &StrategyState| st.scalars.values().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back), bits(&s));
        // Empty tensors and no inner state round-trip too.
        let empty = StrategyState::new("fed-avg");
        let back: StrategyState = serde_json::from_str(&serde_json::to_string(&empty).expect("ser")).expect("de");
        assert_eq!(back, empty);
    }

    #[test]
    fn accessors_report_what_is_missing() {
        let s = sample();
        assert_eq!(s.count("rounds").expect("rounds"), 17);
        assert!(s.count("clip_norm").is_err());
        assert!(matches!(s.scalar("nope"), Err(StrategyError::StateMissing { key, .. }) if key == "nope"));
        assert!(matches!(s.expect_strategy("fed-avg"), Err(StrategyError::StateMismatch { .. })));
        let bad = r#"{"strategy":"x","scalars":{"a":"zz"},"tensors":[]}"#;
        assert!(serde_json::from_str::<StrategyState>(bad).is_err());
    }
}
