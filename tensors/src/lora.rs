//! Folding PEFT LoRA factors into base weights, on the host.
//!
//! PEFT names a factor `base_model.model.<module>.lora_A.weight` (`[r, in]`) and
//! `base_model.model.<module>.lora_B.weight` (`[out, r]`); the base weight is
//! `<module>.weight` (`[out, in]`). Merging adds `scale · B · A` to it.

use crate::{HostTensor, NamedTensors, Result, TensorError};

const PREFIX: &str = "base_model.model.";

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
