//! The coordinator's view of the model: master weights on the host (no ML framework),
//! the frozen LoRA `A` factors it issues, the `B` shapes it expects back, merging and
//! quantizing for publication.

use std::collections::BTreeMap;
use std::path::Path;

use covey_proto::manifest::SpecialTokens;
use covey_tensors::NamedTensors;

use crate::config::LoraSection;
use crate::error::{CoordinatorError, Result};

/// Number of decoder layers in a set of master weights.
pub fn num_layers(master: &NamedTensors) -> usize {
    covey_tensors::lora::num_layers(master)
}

/// The initial model as the coordinator keeps it: f32 master weights and what a release
/// ships beside them.
#[derive(Debug, Clone)]
pub struct InitialModel {
    /// `config.json` (Hugging Face Llama names).
    pub config_json: Vec<u8>,
    /// The weights in f32 (quantized files are dequantized once, here).
    pub master: NamedTensors,
    /// `tokenizer.json`; `None` for the byte-level tokenizer.
    pub tokenizer_json: Option<Vec<u8>>,
    /// Jinja chat template.
    pub chat_template: Option<String>,
    /// BOS / EOS.
    pub special_tokens: SpecialTokens,
    /// One line on the origin.
    pub description: String,
}

/// Read the initial model: a `.gguf` file or a model directory (f32, int8 or int4
/// weights, tokenizer, chat template), through `covey-artifact` (no ML framework); checked
/// to hold every projection the LoRA targets name, and a tokenizer that fits the
/// embedding.
pub fn read_initial_model(path: &Path, lora: &LoraSection) -> Result<InitialModel> {
    let bad = |reason: String| CoordinatorError::Model { path: path.to_owned(), reason };
    let loaded = covey_artifact::LoadedModel::open(path).map_err(|e| bad(e.to_string()))?;
    let master = loaded.f32_tensors();
    let layers = num_layers(&master);
    if layers == 0 {
        return Err(bad("no decoder layers found".into()));
    }
    if loaded.config.num_hidden_layers != layers {
        return Err(bad(format!(
            "config.json says {} layers, the weights hold {layers}",
            loaded.config.num_hidden_layers
        )));
    }
    for l in 0..layers {
        for t in lora.lora_targets() {
            let name = t.weight_name(l);
            match master.get(&name) {
                Some(w) if w.shape.len() == 2 && w.is_finite() => {}
                Some(_) => return Err(bad(format!("`{name}` is not a finite 2-D tensor"))),
                None => return Err(bad(format!("`{name}` is missing"))),
            }
        }
    }
    let vocab = loaded.tokenizer.vocab_size();
    if vocab > loaded.config.vocab_size {
        return Err(bad(format!("the tokenizer has {vocab} tokens, the embedding only {}", loaded.config.vocab_size)));
    }
    let config_json = serde_json::to_vec_pretty(&loaded.config)
        .map_err(|source| CoordinatorError::Serialize { what: "model config", source })?;
    let tokenizer_json = loaded.tokenizer.to_json_bytes().map_err(|e| bad(e.to_string()))?;
    let s = &loaded.special;
    Ok(InitialModel {
        config_json,
        master,
        tokenizer_json,
        chat_template: loaded.chat_template.clone(),
        special_tokens: SpecialTokens { bos: s.bos, eos: s.eos, add_bos: s.add_bos },
        description: loaded.description.clone(),
    })
}

/// `prev + step`, tensor by tensor: the adapter's `B` after one more round. Both must hold
/// the same names and shapes.
pub fn accumulate(prev: &NamedTensors, step: &NamedTensors) -> Result<NamedTensors> {
    if prev.len() != step.len() {
        return Err(CoordinatorError::Corrupt(format!(
            "the adapter holds {} tensors, the round's step {}",
            prev.len(),
            step.len()
        )));
    }
    prev.iter()
        .map(|(name, p)| {
            let s = step
                .get(name)
                .filter(|s| s.shape == p.shape)
                .ok_or_else(|| CoordinatorError::Corrupt(format!("the round's step lacks `{name}` {:?}", p.shape)))?;
            let data = p.data.iter().zip(&s.data).map(|(a, b)| a + b).collect();
            Ok((name.clone(), covey_tensors::HostTensor { shape: p.shape.clone(), data }))
        })
        .collect()
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
        LoraSection {
            rank: 2,
            device_ranks: vec![],
            alpha: 4.0,
            targets: vec!["q_proj".into(), "down_proj".into()],
            seed: 3,
        }
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
