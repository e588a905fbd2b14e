//! Folding PEFT LoRA factors into base weights, on the host.
//!
//! PEFT names a factor `base_model.model.<module>.lora_A.weight` (`[r, in]`) and
//! `base_model.model.<module>.lora_B.weight` (`[out, r]`); the base weight is
//! `<module>.weight` (`[out, in]`). Merging adds `scale · B · A` to it.
//!
//! [`LoraTarget`] names the projections an adapter can sit on, with their Hugging Face
//! and PEFT spellings: the one place these names are written.

use crate::{HostTensor, NamedTensors, Result, TensorError};

const PREFIX: &str = "base_model.model.";

/// A projection that can carry a LoRA adapter. The names are Hugging Face's module names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum LoraTarget {
    /// Query projection `self_attn.q_proj`.
    #[serde(rename = "q_proj")]
    Q,
    /// Key projection `self_attn.k_proj`.
    #[serde(rename = "k_proj")]
    K,
    /// Value projection `self_attn.v_proj`.
    #[serde(rename = "v_proj")]
    V,
    /// Output projection `self_attn.o_proj`.
    #[serde(rename = "o_proj")]
    O,
    /// SwiGLU gate projection `mlp.gate_proj`.
    #[serde(rename = "gate_proj")]
    Gate,
    /// SwiGLU up projection `mlp.up_proj`.
    #[serde(rename = "up_proj")]
    Up,
    /// Down projection `mlp.down_proj`.
    #[serde(rename = "down_proj")]
    Down,
}

impl LoraTarget {
    /// All seven projections, in layer order.
    pub const ALL: [LoraTarget; 7] = [Self::Q, Self::K, Self::V, Self::O, Self::Gate, Self::Up, Self::Down];

    /// The Hugging Face module name (`q_proj`, ...).
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::O => "o_proj",
            Self::Gate => "gate_proj",
            Self::Up => "up_proj",
            Self::Down => "down_proj",
        }
    }

    /// The module path inside a decoder layer (`self_attn.q_proj`, `mlp.up_proj`, ...).
    pub fn hf_path(self) -> &'static str {
        match self {
            Self::Q => "self_attn.q_proj",
            Self::K => "self_attn.k_proj",
            Self::V => "self_attn.v_proj",
            Self::O => "self_attn.o_proj",
            Self::Gate => "mlp.gate_proj",
            Self::Up => "mlp.up_proj",
            Self::Down => "mlp.down_proj",
        }
    }

    /// The target whose Hugging Face module name is exactly `name` (`q_proj`, ...).
    pub fn from_hf_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.hf_name() == name)
    }

    /// `self_attn` or `mlp`: the block of the decoder layer the projection is in.
    pub fn block(self) -> &'static str {
        match self {
            Self::Q | Self::K | Self::V | Self::O => "self_attn",
            Self::Gate | Self::Up | Self::Down => "mlp",
        }
    }

    /// Base weight name in `layer` (`model.layers.3.self_attn.q_proj.weight`).
    pub fn weight_name(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}.weight", self.hf_path())
    }

    /// PEFT name of the `A` (`lora_A`) or `B` (`lora_B`) factor in `layer`
    /// (`base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight`).
    pub fn peft_name(self, layer: usize, factor: char) -> String {
        format!("{PREFIX}model.layers.{layer}.{}.lora_{factor}.weight", self.hf_path())
    }

    /// Parse `q`, `q_proj`, `gate`, `gate_proj`, ...
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim().to_ascii_lowercase();
        let s = s.strip_suffix("_proj").unwrap_or(&s);
        Some(match s {
            "q" => Self::Q,
            "k" => Self::K,
            "v" => Self::V,
            "o" => Self::O,
            "gate" => Self::Gate,
            "up" => Self::Up,
            "down" => Self::Down,
            _ => return None,
        })
    }
}

/// The base weight name a PEFT factor name belongs to, and the factor (`'A'` or `'B'`).
pub fn base_weight_of(peft_name: &str) -> Option<(String, char)> {
    let rest = peft_name.strip_prefix(PREFIX)?;
    for factor in ['A', 'B'] {
        if let Some(module) = rest.strip_suffix(&format!(".lora_{factor}.weight")) {
            return Some((format!("{module}.weight"), factor));
        }
    }
    None
}

/// Number of decoder layers in a set of Hugging Face weights (`model.layers.{i}.…`).
pub fn num_layers(weights: &NamedTensors) -> usize {
    (0..).take_while(|i| weights.contains_key(&format!("model.layers.{i}.input_layernorm.weight"))).count()
}

/// The frozen `A` factors of FFA-LoRA (PEFT names, `[rank, in]`), uniform in ±1/√in
/// (PEFT's Kaiming-uniform), from one ChaCha8 stream seeded with `seed`, layer by layer
/// and target by target in the order given: public, identical for every device. The one
/// generator of `A`: the coordinator issues these, simulations and tests use the same.
pub fn frozen_a(weights: &NamedTensors, rank: usize, targets: &[LoraTarget], seed: u64) -> NamedTensors {
    use rand::{Rng, SeedableRng};
    let mut out = NamedTensors::new();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for l in 0..num_layers(weights) {
        for &t in targets {
            let Some(w) = weights.get(&t.weight_name(l)) else { continue };
            let d_in = w.shape[1];
            let bound = 1.0 / (d_in as f32).sqrt();
            let data =
                (0..rank * d_in).map(|_| (rng.next_u32() as f32 / u32::MAX as f32 * 2.0 - 1.0) * bound).collect();
            out.insert(t.peft_name(l, 'A'), HostTensor { shape: vec![rank, d_in], data });
        }
    }
    out
}

/// `W ← W + scale · B · A` for every `(A, B)` pair of `factors`. Every `B` needs its `A`
/// and a base weight of shape `[B.rows, A.cols]`.
pub fn merge(base: &mut NamedTensors, factors: &NamedTensors, scale: f32) -> Result<()> {
    for (name, b) in factors {
        let Some((weight, 'B')) = base_weight_of(name) else { continue };
        let a_name = name.replace(".lora_B.weight", ".lora_A.weight");
        let a = factors.get(&a_name).ok_or_else(|| TensorError::Missing(a_name.clone()))?;
        let w = base.get_mut(&weight).ok_or_else(|| TensorError::Missing(weight.clone()))?;
        check_pair(w, a, b, name)?;
        let (out, r, cols) = (b.shape[0], b.shape[1], a.shape[1]);
        for o in 0..out {
            let row = &mut w.data[o * cols..(o + 1) * cols];
            for k in 0..r {
                let coef = scale * b.data[o * r + k];
                if coef == 0.0 {
                    continue;
                }
                for (x, &av) in row.iter_mut().zip(&a.data[k * cols..(k + 1) * cols]) {
                    *x += coef * av;
                }
            }
        }
    }
    Ok(())
}

fn check_pair(w: &HostTensor, a: &HostTensor, b: &HostTensor, name: &str) -> Result<()> {
    let ok = a.shape.len() == 2
        && b.shape.len() == 2
        && w.shape.len() == 2
        && b.shape[1] == a.shape[0]
        && w.shape == [b.shape[0], a.shape[1]];
    if !ok {
        return Err(TensorError::Shape { name: name.to_owned(), expected: w.shape.clone(), found: b.shape.clone() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_adds_scaled_product() {
        let mut base = NamedTensors::new();
        base.insert("m.q.weight".into(), HostTensor::zeros(&[2, 3]));
        let mut f = NamedTensors::new();
        f.insert(
            "base_model.model.m.q.lora_A.weight".into(),
            HostTensor::new(vec![1, 3], vec![1.0, 2.0, 3.0]).expect("test value"),
        );
        f.insert(
            "base_model.model.m.q.lora_B.weight".into(),
            HostTensor::new(vec![2, 1], vec![1.0, -1.0]).expect("test value"),
        );
        merge(&mut base, &f, 2.0).expect("test value");
        assert_eq!(base["m.q.weight"].data, vec![2.0, 4.0, 6.0, -2.0, -4.0, -6.0]);
    }

    #[test]
    fn missing_a_or_wrong_shapes_are_errors() {
        let mut base = NamedTensors::new();
        base.insert("m.q.weight".into(), HostTensor::zeros(&[2, 3]));
        let mut f = NamedTensors::new();
        f.insert("base_model.model.m.q.lora_B.weight".into(), HostTensor::zeros(&[2, 1]));
        assert!(matches!(merge(&mut base, &f, 1.0), Err(TensorError::Missing(_))));
        f.insert("base_model.model.m.q.lora_A.weight".into(), HostTensor::zeros(&[1, 4]));
        assert!(matches!(merge(&mut base, &f, 1.0), Err(TensorError::Shape { .. })));
    }

    #[test]
    fn names_map_to_base_weights() {
        assert_eq!(
            base_weight_of("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"),
            Some(("model.layers.0.self_attn.q_proj.weight".into(), 'B'))
        );
        assert_eq!(base_weight_of("model.norm.weight"), None);
    }
}
