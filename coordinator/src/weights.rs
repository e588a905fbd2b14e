//! The coordinator's view of the model: master weights on the host (no ML framework),
//! the frozen LoRA `A` factors it issues, the `B` shapes it expects back, merging and
//! quantizing for publication.

use std::collections::BTreeMap;
use std::path::Path;

use covey_tensors::NamedTensors;

use crate::config::LoraSection;
use crate::error::{CoordinatorError, Result};

/// Number of decoder layers in a set of master weights.
pub fn num_layers(master: &NamedTensors) -> usize {
    covey_tensors::lora::num_layers(master)
}

/// Read the initial model directory: `config.json` bytes and the f32 master weights, checked
/// to hold every projection the LoRA targets name.
pub fn read_initial_model(dir: &Path, lora: &LoraSection) -> Result<(Vec<u8>, NamedTensors)> {
    let config_path = dir.join("config.json");
    let config = std::fs::read(&config_path).map_err(|e| CoordinatorError::io(&config_path, e))?;
    serde_json::from_slice::<serde_json::Value>(&config)
        .map_err(|e| CoordinatorError::Model { path: config_path.clone(), reason: format!("not JSON: {e}") })?;
    let weights_path = dir.join("model.safetensors");
    let bytes = std::fs::read(&weights_path).map_err(|e| CoordinatorError::io(&weights_path, e))?;
    let (master, _) = covey_tensors::quant::decode_model(&bytes)
        .map_err(|e| CoordinatorError::Model { path: weights_path.clone(), reason: e.to_string() })?;
    let layers = num_layers(&master);
    if layers == 0 {
        return Err(CoordinatorError::Model { path: weights_path, reason: "no decoder layers found".into() });
    }
    for l in 0..layers {
        for t in lora.lora_targets() {
            let name = t.weight_name(l);
            match master.get(&name) {
                Some(w) if w.shape.len() == 2 && w.is_finite() => {}
                Some(_) => {
                    return Err(CoordinatorError::Model {
                        path: weights_path,
                        reason: format!("`{name}` is not a finite 2-D tensor"),
                    });
                }
                None => {
                    return Err(CoordinatorError::Model { path: weights_path, reason: format!("`{name}` is missing") });
                }
            }
        }
    }
    Ok((config, master))
}

/// The frozen `A` factors devices train against ([`covey_tensors::lora::frozen_a`]).
pub fn a_factors(master: &NamedTensors, lora: &LoraSection) -> NamedTensors {
    covey_tensors::lora::frozen_a(master, lora.rank, &lora.lora_targets(), lora.seed)
}

/// The `B` tensors an update must hold: name → `[out, r]`.
pub fn expected_b_shapes(master: &NamedTensors, lora: &LoraSection) -> BTreeMap<String, Vec<usize>> {
    let mut out = BTreeMap::new();
    for l in 0..num_layers(master) {
        for t in lora.lora_targets() {
            if let Some(w) = master.get(&t.weight_name(l)) {
                out.insert(t.peft_name(l, 'B'), vec![w.shape[0], lora.rank]);
            }
        }
    }
    out
}

/// `master + (alpha/r) · step · A` for every target.
pub fn merge_step(
    master: &NamedTensors,
    a: &NamedTensors,
    step: &NamedTensors,
    lora: &LoraSection,
) -> Result<NamedTensors> {
    let mut merged = master.clone();
    let mut factors = a.clone();
    for (name, t) in step {
        factors.insert(name.clone(), t.clone());
    }
    covey_tensors::lora::merge(&mut merged, &factors, lora.alpha / lora.rank as f32)?;
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use covey_tensors::HostTensor;

    fn master() -> NamedTensors {
        let mut m = NamedTensors::new();
        m.insert("model.layers.0.input_layernorm.weight".into(), HostTensor::zeros(&[4]));
        m.insert("model.layers.0.self_attn.q_proj.weight".into(), HostTensor::zeros(&[4, 4]));
        m.insert("model.layers.0.mlp.down_proj.weight".into(), HostTensor::zeros(&[4, 6]));
        m
    }

    fn lora() -> LoraSection {
        LoraSection { rank: 2, alpha: 4.0, targets: vec!["q_proj".into(), "down_proj".into()], seed: 3 }
    }

    #[test]
    fn a_is_seeded_bounded_and_b_shapes_follow_the_weights() {
        let a = a_factors(&master(), &lora());
        assert_eq!(a, a_factors(&master(), &lora()));
        let down = &a["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"];
        assert_eq!(down.shape, vec![2, 6]);
        assert!(down.data.iter().all(|x| x.abs() <= 1.0 / 6f32.sqrt()));
        let b = expected_b_shapes(&master(), &lora());
        assert_eq!(b["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"], vec![4, 2]);
        assert_eq!(b.len(), 2);
    }

    #[test]
    fn merging_a_zero_step_changes_nothing() {
        let m = master();
        let a = a_factors(&m, &lora());
        let step: NamedTensors =
            expected_b_shapes(&m, &lora()).into_iter().map(|(n, s)| (n, HostTensor::zeros(&s))).collect();
        assert_eq!(merge_step(&m, &a, &step, &lora()).expect("merge"), m);
    }
}
