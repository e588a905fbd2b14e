//! Shared pieces: update validation and the streamed f64 accumulator.

use std::collections::BTreeMap;

use covey_tensors::{HostTensor, NamedTensors};

use crate::{ClientUpdate, StrategyError};

/// Check that every tensor of `update` is well formed (values fill the shape) and finite.
pub(crate) fn check_tensors(update: &ClientUpdate) -> Result<(), StrategyError> {
    for (name, t) in &update.delta {
        let expected: usize = t.shape.iter().product();
        if expected != t.data.len() {
            return Err(StrategyError::MalformedTensor {
                client: update.client.clone(),
                tensor: name.clone(),
                shape: t.shape.clone(),
                values: t.data.len(),
            });
        }
        if !t.is_finite() {
            return Err(StrategyError::NonFinite { client: update.client.clone(), tensor: name.clone() });
        }
    }
    Ok(())
}

/// Check that `update` is well formed and has exactly the tensors and shapes of
/// `reference` (whose shapes `shape_of` gives).
pub(crate) fn check_update<T>(
    update: &ClientUpdate,
    reference: &BTreeMap<String, T>,
    shape_of: impl Fn(&T) -> &[usize],
) -> Result<(), StrategyError> {
    check_tensors(update)?;
    for (name, r) in reference {
        let expected = shape_of(r);
        match update.delta.get(name) {
            None => {
                return Err(StrategyError::MissingTensor { client: update.client.clone(), tensor: name.clone() });
            }
            Some(t) if t.shape != expected => {
                return Err(StrategyError::ShapeMismatch {
                    client: update.client.clone(),
                    tensor: name.clone(),
                    expected: expected.to_vec(),
                    found: t.shape.clone(),
                });
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = update.delta.keys().find(|k| !reference.contains_key(*k)) {
        return Err(StrategyError::UnexpectedTensor { client: update.client.clone(), tensor: extra.clone() });
    }
    Ok(())
}

/// One tensor's running sum.
pub(crate) struct Sum {
    shape: Vec<usize>,
    data: Vec<f64>,
}

/// A running, scaled sum of deltas in f64: one accumulator, whatever the number of updates.
#[derive(Default)]
pub(crate) struct Accumulator {
    sums: BTreeMap<String, Sum>,
    /// Updates added.
    pub(crate) count: usize,
    /// Sum of their `num_examples`.
    pub(crate) total_examples: u64,
    /// Sum of the weights passed to [`Accumulator::add`].
    pub(crate) total_weight: f64,
}

impl Accumulator {
    /// Validate `update` against the first one and add `weight · scale · delta`; `weight`
    /// counts towards [`Accumulator::total_weight`], `scale` (clipping) does not.
    pub(crate) fn add(&mut self, update: &ClientUpdate, weight: f64, scale: f64) -> Result<(), StrategyError> {
        if self.count == 0 {
            check_tensors(update)?;
            self.sums = update
                .delta
                .iter()
                .map(|(n, t)| (n.clone(), Sum { shape: t.shape.clone(), data: vec![0.0; t.data.len()] }))
                .collect();
        } else {
            check_update(update, &self.sums, |s| &s.shape)?;
        }
        let factor = weight * scale;
        for (name, t) in &update.delta {
            if let Some(sum) = self.sums.get_mut(name) {
                for (s, &x) in sum.data.iter_mut().zip(&t.data) {
                    *s += factor * f64::from(x);
                }
            }
        }
        self.count += 1;
        self.total_examples = self.total_examples.saturating_add(update.num_examples);
        self.total_weight += weight;
        Ok(())
    }

    /// Mutable access to the sums, tensor by tensor (for adding noise).
    pub(crate) fn sums_mut(&mut self) -> impl Iterator<Item = &mut [f64]> {
        self.sums.values_mut().map(|s| s.data.as_mut_slice())
    }

    /// The sums divided by `divisor`, as f32 tensors.
    pub(crate) fn finish(self, divisor: f64) -> NamedTensors {
        self.sums
            .into_iter()
            .map(|(n, s)| {
                let data = s.data.iter().map(|&x| (x / divisor) as f32).collect();
                (n, HostTensor { shape: s.shape, data })
            })
            .collect()
    }
}

/// The fixed denominator `m = expected_clients` of a private mean, which must be > 0.
pub(crate) fn private_denominator(ctx: &crate::RoundContext) -> Result<usize, StrategyError> {
    match ctx.expected_clients {
        0 => Err(StrategyError::InvalidContext {
            field: "expected_clients",
            value: 0,
            reason: "a private mean divides by the expected number of clients, which must be > 0",
        }),
        m => Ok(m),
    }
}

/// Every update clipped to global L2 norm `c` and summed with uniform weights (the
/// sensitivity of the sum is `c`); also how many were within `c` (a client's own report
/// if present, else the norm the server sees), for adaptive clipping.
pub(crate) fn clipped_sum(
    updates: &mut dyn Iterator<Item = ClientUpdate>,
    c: f64,
) -> Result<(Accumulator, usize), StrategyError> {
    let mut acc = Accumulator::default();
    let mut unclipped = 0usize;
    for u in updates {
        let norm = covey_tensors::global_norm(&u.delta);
        // Non-finite norms fail in `add`, before anything is summed.
        let scale = if norm > c { c / norm } else { 1.0 };
        acc.add(&u, 1.0, scale)?;
        if u.within_clip.unwrap_or(norm <= c) {
            unclipped += 1;
        }
    }
    Ok((acc, unclipped))
}

/// `tensors` scaled by `factor` (computed in f64).
pub(crate) fn scaled(mut tensors: NamedTensors, factor: f64) -> NamedTensors {
    if factor != 1.0 {
        for t in tensors.values_mut() {
            for x in &mut t.data {
                *x = (f64::from(*x) * factor) as f32;
            }
        }
    }
    tensors
}

/// Collect and validate all updates (for the robust aggregators).
pub(crate) fn collect_checked(
    updates: &mut dyn Iterator<Item = ClientUpdate>,
) -> Result<Vec<ClientUpdate>, StrategyError> {
    let mut out: Vec<ClientUpdate> = Vec::new();
    for u in updates {
        match out.first() {
            None => check_tensors(&u)?,
            Some(first) => check_update(&u, &first.delta, |t| &t.shape)?,
        }
        out.push(u);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(client: &str, tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> ClientUpdate {
        let delta =
            tensors.iter().map(|(n, s, d)| (n.to_string(), HostTensor { shape: s.clone(), data: d.clone() })).collect();
        ClientUpdate { client: client.into(), num_examples: 1, delta, within_clip: None }
    }

    #[test]
    fn accumulator_reports_each_kind_of_mismatch() {
        let first = update("a", &[("x", vec![2], vec![1.0, 2.0]), ("y", vec![1], vec![3.0])]);
        let mut acc = Accumulator::default();
        acc.add(&first, 1.0, 1.0).expect("first");
        let missing = update("b", &[("x", vec![2], vec![1.0, 2.0])]);
        assert!(
            matches!(acc.add(&missing, 1.0, 1.0), Err(StrategyError::MissingTensor { client, tensor }) if client == "b" && tensor == "y")
        );
        let extra = update("c", &[("x", vec![2], vec![0.0; 2]), ("y", vec![1], vec![0.0]), ("z", vec![1], vec![0.0])]);
        assert!(
            matches!(acc.add(&extra, 1.0, 1.0), Err(StrategyError::UnexpectedTensor { tensor, .. }) if tensor == "z")
        );
        let shape = update("d", &[("x", vec![1, 2], vec![0.0; 2]), ("y", vec![1], vec![0.0])]);
        assert!(matches!(acc.add(&shape, 1.0, 1.0), Err(StrategyError::ShapeMismatch { tensor, .. }) if tensor == "x"));
        let malformed = update("e", &[("x", vec![2], vec![0.0; 3]), ("y", vec![1], vec![0.0])]);
        assert!(matches!(acc.add(&malformed, 1.0, 1.0), Err(StrategyError::MalformedTensor { values: 3, .. })));
        let nan = update("f", &[("x", vec![2], vec![0.0, f32::NAN]), ("y", vec![1], vec![0.0])]);
        assert!(matches!(acc.add(&nan, 1.0, 1.0), Err(StrategyError::NonFinite { client, .. }) if client == "f"));
        // Failed adds leave the accumulator as it was.
        assert_eq!(acc.count, 1);
        let mean = acc.finish(1.0);
        assert_eq!(mean["x"].data, vec![1.0, 2.0]);
    }
}
