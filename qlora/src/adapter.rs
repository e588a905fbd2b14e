//! The low-rank terms on each projection: the adapter being trained and, optionally,
//! the version's own adapter, frozen and kept apart from the base (so the base stays
//! quantized as released).

use covey_infer::LlamaConfig;
use covey_tensors::NamedTensors;
use covey_tensors::lora::LoraTarget;

use crate::error::{QloraError, Result, invalid};

/// What is trained: rank, scale (`alpha / rank`) and the projections that carry it.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// Rank `r`.
    pub rank: usize,
    /// `alpha / rank`: the factor on `B A`.
    pub scale: f32,
    /// Projections that carry the adapter.
    pub targets: Vec<LoraTarget>,
    /// Train `A` too (plain LoRA). Off: FFA-LoRA, `A` frozen as given (what federated
    /// rounds use).
    pub train_a: bool,
}

/// An adapter folded into the version trained on, held apart from the base: the
/// version's weights are `W + scale · B A` on every projection it names.
#[derive(Debug, Clone, Copy)]
pub struct FrozenAdapter<'a> {
    /// `A` factors, PEFT names, `[r, in]`.
    pub a: &'a NamedTensors,
    /// `B` factors, PEFT names, `[out, r]`.
    pub b: &'a NamedTensors,
    /// `alpha / rank` of this adapter.
    pub scale: f32,
}

/// `scale · B A` on one projection: `a` `[r, in]`, `b` `[out, r]`, row-major.
#[derive(Debug, Clone)]
pub(crate) struct LowRank {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub rank: usize,
    pub scale: f32,
}

/// The low-rank terms of one projection.
#[derive(Debug, Clone, Default)]
pub(crate) struct Slot {
    /// The version's adapter, `b` pre-multiplied by its scale.
    pub frozen: Option<LowRank>,
    /// The adapter being trained.
    pub train: Option<LowRank>,
}

fn factor<'a>(
    tensors: &'a NamedTensors,
    source: &'static str,
    name: &str,
    shape: [usize; 2],
) -> Result<&'a covey_tensors::HostTensor> {
    let t = tensors.get(name).ok_or_else(|| invalid("lora", format!("{source}: `{name}` is missing")))?;
    if t.shape != shape {
        return Err(QloraError::Shape {
            source_name: source,
            name: name.into(),
            expected: shape.to_vec(),
            found: t.shape.clone(),
        });
    }
    if !t.is_finite() {
        return Err(QloraError::NonFinite { source_name: source, name: name.into() });
    }
    Ok(t)
}

/// The rank of the `A` factors in `a` (all the same), checked against `config`.
fn rank_of(a: &NamedTensors, source: &'static str) -> Result<usize> {
    let mut ranks = a.values().map(|t| t.shape.first().copied().unwrap_or(0));
    let r = ranks.next().ok_or_else(|| invalid("lora", format!("{source}: no factors")))?;
    if r == 0 || ranks.any(|x| x != r) {
        return Err(invalid("lora", format!("{source}: the A factors disagree on the rank")));
    }
    Ok(r)
}

/// Every layer's slots, in [`LoraTarget::ALL`] order.
pub(crate) fn build_slots(
    config: &LlamaConfig,
    spec: &LoraSpec,
    a: &NamedTensors,
    b: Option<&NamedTensors>,
    frozen: Option<FrozenAdapter<'_>>,
) -> Result<Vec<[Slot; 7]>> {
    if spec.rank == 0 || spec.targets.is_empty() {
        return Err(invalid("lora", "rank 0 or no target"));
    }
    if !(spec.scale.is_finite() && spec.scale > 0.0) {
        return Err(invalid("lora.scale", format!("{} is not a positive number", spec.scale)));
    }
    let expected_a = config.num_hidden_layers * spec.targets.len();
    if a.len() != expected_a {
        return Err(invalid("lora", format!("LoRA A tensors: {} factors given, {expected_a} expected", a.len())));
    }
    if let Some(b) = b
        && b.len() != expected_a
    {
        return Err(invalid("lora", format!("LoRA B tensors: {} factors given, {expected_a} expected", b.len())));
    }
    let frozen_rank = match frozen {
        Some(f) => {
            if !(f.scale.is_finite() && f.scale > 0.0) {
                return Err(invalid("frozen adapter scale", format!("{} is not a positive number", f.scale)));
            }
            Some(rank_of(f.a, "frozen adapter A")?)
        }
        None => None,
    };
    let mut layers = Vec::with_capacity(config.num_hidden_layers);
    for l in 0..config.num_hidden_layers {
        let mut slots: [Slot; 7] = Default::default();
        for (ti, &t) in LoraTarget::ALL.iter().enumerate() {
            let (d_in, d_out) = config.lora_dims(t);
            if spec.targets.contains(&t) {
                let r = spec.rank;
                let at = factor(a, "LoRA A tensors", &t.peft_name(l, 'A'), [r, d_in])?;
                let bt = match b {
                    Some(b) => factor(b, "LoRA B tensors", &t.peft_name(l, 'B'), [d_out, r])?.data.clone(),
                    None => vec![0.0; d_out * r],
                };
                slots[ti].train = Some(LowRank { a: at.data.clone(), b: bt, rank: r, scale: spec.scale });
            }
            if let (Some(f), Some(rf)) = (frozen, frozen_rank) {
                let an = t.peft_name(l, 'A');
                if f.a.contains_key(&an) {
                    let fa = factor(f.a, "frozen adapter A", &an, [rf, d_in])?;
                    let fb = factor(f.b, "frozen adapter B", &t.peft_name(l, 'B'), [d_out, rf])?;
                    let b = fb.data.iter().map(|v| v * f.scale).collect();
                    slots[ti].frozen = Some(LowRank { a: fa.data.clone(), b, rank: rf, scale: 1.0 });
                }
            }
        }
        layers.push(slots);
    }
    if let Some(f) = frozen {
        let used: usize = layers.iter().map(|s| s.iter().filter(|x| x.frozen.is_some()).count()).sum();
        if used != f.a.len() || f.b.len() != f.a.len() {
            return Err(invalid("frozen adapter", "its factors name projections this model does not have"));
        }
    }
    Ok(layers)
}
