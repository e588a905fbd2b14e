//! The frozen base: every weight held as the release stores it (int8, int4 or f32), and
//! turned into f32 one layer at a time, into a scratch buffer, when a product needs it.

use std::collections::BTreeMap;

use covey_infer::{LlamaConfig, Weight};
use covey_tensors::lora::LoraTarget;
use covey_tensors::quant::StoredTensor;
use covey_tensors::{HostTensor, NamedTensors};
use rayon::prelude::*;

use crate::error::{QloraError, Result};

const SOURCE: &str = "base weights";

/// One decoder layer's weights.
#[derive(Debug, Clone)]
pub(crate) struct LayerBase {
    pub attn_norm: Vec<f32>,
    pub mlp_norm: Vec<f32>,
    /// In [`LoraTarget::ALL`] order, Hugging Face layout `[out, in]`.
    pub proj: [Weight; 7],
}

/// A frozen Llama base, weights as stored.
#[derive(Debug, Clone)]
pub struct Base {
    pub(crate) config: LlamaConfig,
    pub(crate) embed: Weight,
    pub(crate) layers: Vec<LayerBase>,
    pub(crate) norm: Vec<f32>,
    pub(crate) lm_head: Option<Weight>,
}

fn to_weight(name: &str, t: StoredTensor, shape: [usize; 2]) -> Result<Weight> {
    if t.shape() != shape {
        return Err(QloraError::Shape {
            source_name: SOURCE,
            name: name.into(),
            expected: shape.to_vec(),
            found: t.shape().to_vec(),
        });
    }
    let w = match t {
        StoredTensor::F32(h) => {
            if !h.is_finite() {
                return Err(QloraError::NonFinite { source_name: SOURCE, name: name.into() });
            }
            Weight::F32 { rows: shape[0], cols: shape[1], data: h.data }
        }
        StoredTensor::Int8(q) => Weight::Int8(q),
        StoredTensor::Int4(q) => Weight::Int4(q),
    };
    Ok(w)
}

fn take(tensors: &mut BTreeMap<String, StoredTensor>, name: &str) -> Result<StoredTensor> {
    tensors.remove(name).ok_or_else(|| QloraError::MissingTensor(name.into()))
}

fn take_vector(tensors: &mut BTreeMap<String, StoredTensor>, name: &str, len: usize) -> Result<Vec<f32>> {
    let t = take(tensors, name)?;
    if t.shape() != [len] {
        return Err(QloraError::Shape {
            source_name: SOURCE,
            name: name.into(),
            expected: vec![len],
            found: t.shape().to_vec(),
        });
    }
    let v = t.to_f32();
    if !v.is_finite() {
        return Err(QloraError::NonFinite { source_name: SOURCE, name: name.into() });
    }
    Ok(v.data)
}

impl Base {
    /// The base from tensors as a release stores them (Hugging Face names), taken over
    /// without conversion: quantized weights stay quantized. Extra tensors are ignored.
    pub fn from_stored(config: &LlamaConfig, mut tensors: BTreeMap<String, StoredTensor>) -> Result<Self> {
        config.validate()?;
        let (h, v) = (config.hidden_size, config.vocab_size);
        let embed_name = "model.embed_tokens.weight";
        let embed = to_weight(embed_name, take(&mut tensors, embed_name)?, [v, h])?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let mut proj = Vec::with_capacity(7);
            for t in LoraTarget::ALL {
                let name = t.weight_name(i);
                let (d_in, d_out) = config.lora_dims(t);
                proj.push(to_weight(&name, take(&mut tensors, &name)?, [d_out, d_in])?);
            }
            let proj: [Weight; 7] = proj.try_into().map_err(|_| QloraError::MissingTensor(format!("layer {i}")))?;
            layers.push(LayerBase {
                attn_norm: take_vector(&mut tensors, &format!("model.layers.{i}.input_layernorm.weight"), h)?,
                mlp_norm: take_vector(&mut tensors, &format!("model.layers.{i}.post_attention_layernorm.weight"), h)?,
                proj,
            });
        }
        let norm = take_vector(&mut tensors, "model.norm.weight", h)?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(to_weight("lm_head.weight", take(&mut tensors, "lm_head.weight")?, [v, h])?)
        };
        Ok(Self { config: config.clone(), embed, layers, norm, lm_head })
    }

    /// The base from f32 tensors (copied).
    pub fn from_tensors(config: &LlamaConfig, tensors: &NamedTensors) -> Result<Self> {
        let stored = tensors.iter().map(|(n, t)| (n.clone(), StoredTensor::F32(t.clone()))).collect();
        Self::from_stored(config, stored)
    }

    /// The model's shape.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Every weight in f32 under its Hugging Face name (allocates the whole model: for
    /// callers that need a plain copy, not for training).
    pub fn to_tensors(&self) -> NamedTensors {
        let full = |w: &Weight| {
            let mut data = vec![0.0; w.rows() * w.cols()];
            dequantize_rows(w, 0, w.rows(), &mut data);
            HostTensor { shape: vec![w.rows(), w.cols()], data }
        };
        let vec = |v: &[f32]| HostTensor { shape: vec![v.len()], data: v.to_vec() };
        let mut out = NamedTensors::new();
        out.insert("model.embed_tokens.weight".into(), full(&self.embed));
        for (i, l) in self.layers.iter().enumerate() {
            for (t, w) in LoraTarget::ALL.iter().zip(&l.proj) {
                out.insert(t.weight_name(i), full(w));
            }
            out.insert(format!("model.layers.{i}.input_layernorm.weight"), vec(&l.attn_norm));
            out.insert(format!("model.layers.{i}.post_attention_layernorm.weight"), vec(&l.mlp_norm));
        }
        out.insert("model.norm.weight".into(), vec(&self.norm));
        if let Some(h) = &self.lm_head {
            out.insert("lm_head.weight".into(), full(h));
        }
        out
    }

    /// The output head `[vocab, hidden]`: the LM head, or the embedding when tied.
    pub(crate) fn head(&self) -> &Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}

/// Rows `r0..r1` of `w` in f32 into `out` (`(r1 - r0) × cols`), in parallel.
pub(crate) fn dequantize_rows(w: &Weight, r0: usize, r1: usize, out: &mut [f32]) {
    let cols = w.cols();
    let out = &mut out[..(r1 - r0) * cols];
    if let Weight::F32 { data, .. } = w {
        out.copy_from_slice(&data[r0 * cols..r1 * cols]);
        return;
    }
    out.par_chunks_mut(cols * 16).enumerate().for_each(|(block, chunk)| {
        for (j, row) in chunk.chunks_mut(cols).enumerate() {
            w.row_into(r0 + block * 16 + j, row);
        }
    });
}

/// `w` as an f32 `[rows, cols]` slice: its own data when it is f32, otherwise decoded
/// into `scratch`.
pub(crate) fn f32_view<'a>(w: &'a Weight, scratch: &'a mut Vec<f32>) -> &'a [f32] {
    match w {
        Weight::F32 { data, .. } => data,
        _ => {
            scratch.resize(w.rows() * w.cols(), 0.0);
            dequantize_rows(w, 0, w.rows(), scratch);
            scratch
        }
    }
}
