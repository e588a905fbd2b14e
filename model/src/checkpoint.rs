//! Checkpoints in safetensors.
//!
//! * Base model directory: `model.safetensors` under Hugging Face Llama names
//!   (`model.layers.0.self_attn.q_proj.weight`, `[out, in]`), `config.json`, and
//!   `tokenizer.json` unless the model is byte-level.
//! * Adapter directory: `adapter_model.safetensors` under PEFT names
//!   (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, `[r, in]`;
//!   `lora_B.weight`, `[out, r]`), `adapter_config.json` as PEFT writes it, and
//!   `covey_lora.json` with what PEFT has no key for (FFA-LoRA, seed).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};
use covey_tensors::TensorError;
use serde::{Deserialize, Serialize};

use crate::config::{LlamaConfig, LoraConfig, LoraTarget};
use crate::error::{ModelError, Result};
use crate::llama::{DecoderLayer, Llama};
use crate::lora::LoraLinear;
use crate::tokenizer::Tokenizer;

pub use covey_artifact::CONFIG_FILE;
pub use covey_artifact::MODEL_FILE;
/// Weights file of an adapter directory.
pub const ADAPTER_FILE: &str = "adapter_model.safetensors";
/// PEFT config file of an adapter directory.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// Covey's extra adapter settings.
pub const COVEY_LORA_FILE: &str = "covey_lora.json";

pub use covey_tensors::{HostTensor, NamedTensors};

/// The values of a device tensor, read back to the host (a quantized tensor, such as a
/// QLoRA base weight, is dequantized).
pub fn host_tensor<const D: usize>(t: Tensor<D>) -> HostTensor {
    let shape = t.dims().to_vec();
    let data = t.dequantize().into_data().convert::<f32>().try_into_vec::<f32>().unwrap_or_default();
    HostTensor { shape, data }
}

/// A host tensor on `device`.
///
/// # Panics
/// If `h.shape` does not have `D` dimensions.
pub fn device_tensor<const D: usize>(h: &HostTensor, device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(h.data.clone(), h.shape.clone()), device)
}

fn layer_prefix(i: usize) -> String {
    format!("model.layers.{i}")
}

/// The base weights under Hugging Face Llama names and layout. Adapters are not included.
pub fn base_tensors(model: &Llama) -> NamedTensors {
    let mut out = NamedTensors::new();
    out.insert("model.embed_tokens.weight".into(), host_tensor(model.embed_tokens.val()));
    for (i, layer) in model.layers.iter().enumerate() {
        let p = layer_prefix(i);
        out.insert(format!("{p}.input_layernorm.weight"), host_tensor(layer.attn_norm.val()));
        out.insert(format!("{p}.post_attention_layernorm.weight"), host_tensor(layer.mlp_norm.val()));
        for t in LoraTarget::ALL {
            let w = host_tensor(layer.proj(t).weight.val()).transposed();
            out.insert(format!("{p}.{}.weight", t.hf_path()), w);
        }
    }
    out.insert("model.norm.weight".into(), host_tensor(model.norm.val()));
    if let Some(head) = &model.lm_head {
        out.insert("lm_head.weight".into(), host_tensor(head.val()).transposed());
    }
    out
}

/// PEFT name of the `A` (`lora_A`) or `B` (`lora_B`) factor of one projection.
pub fn peft_name(layer: usize, target: LoraTarget, factor: char) -> String {
    target.peft_name(layer, factor)
}

/// The adapter factors under PEFT names and layout (`lora_A: [r, in]`, `lora_B: [out, r]`).
pub fn adapter_tensors(model: &Llama) -> Result<NamedTensors> {
    let lora = model.lora.as_ref().ok_or_else(|| ModelError::Adapter("the model carries no adapters".into()))?;
    let mut out = NamedTensors::new();
    for (i, layer) in model.layers.iter().enumerate() {
        for &t in &lora.targets {
            if let Some(ad) = &layer.proj(t).lora {
                out.insert(peft_name(i, t, 'A'), host_tensor(ad.a.val()).transposed());
                out.insert(peft_name(i, t, 'B'), host_tensor(ad.b.val()).transposed());
            }
        }
    }
    Ok(out)
}

/// Replace the adapter factors of `model` with `tensors` (PEFT names and layout).
/// Every factor must be present with the right shape and finite values.
pub fn load_adapter_tensors(mut model: Llama, tensors: &NamedTensors, source: &Path) -> Result<Llama> {
    let lora = model.lora.clone().ok_or_else(|| ModelError::Adapter("the model carries no adapters".into()))?;
    let device = model.embed_tokens.val().device();
    for (i, layer) in model.layers.iter_mut().enumerate() {
        for &t in &lora.targets {
            let (d_in, d_out) = layer.proj(t).dims();
            let proj: &mut LoraLinear = layer.proj_mut(t);
            let Some(ad) = proj.lora.as_mut() else { continue };
            let a = take(tensors, &peft_name(i, t, 'A'), &[lora.rank, d_in], source)?.transposed();
            let b = take(tensors, &peft_name(i, t, 'B'), &[d_out, lora.rank], source)?.transposed();
            ad.a = Param::from_tensor(device_tensor::<2>(&a, &device)).set_require_grad(!lora.ffa);
            ad.b = Param::from_tensor(device_tensor::<2>(&b, &device));
        }
    }
    Ok(model)
}

fn take(tensors: &NamedTensors, name: &str, shape: &[usize], source: &Path) -> Result<HostTensor> {
    checked(tensors, name, shape, source).cloned()
}

/// The tensor `name` of `tensors`, checked to be present, of shape `shape` and finite;
/// errors name `source` and the tensor.
pub(crate) fn checked<'a>(
    tensors: &'a NamedTensors,
    name: &str,
    shape: &[usize],
    source: &Path,
) -> Result<&'a HostTensor> {
    let t = tensors
        .get(name)
        .ok_or_else(|| ModelError::MissingTensor { path: source.to_owned(), name: name.to_owned() })?;
    if t.shape != shape {
        return Err(ModelError::ShapeMismatch {
            path: source.to_owned(),
            name: name.to_owned(),
            expected: shape.to_vec(),
            found: t.shape.clone(),
        });
    }
    if t.data.iter().any(|x| !x.is_finite()) {
        return Err(ModelError::NonFinite { path: source.to_owned(), name: name.to_owned() });
    }
    Ok(t)
}

/// Write named tensors as an f32 safetensors file with optional string metadata.
pub fn write_safetensors(path: &Path, tensors: &NamedTensors, metadata: Option<HashMap<String, String>>) -> Result<()> {
    let bytes = covey_tensors::encode(tensors, metadata).map_err(|e| tensor_error(path, e))?;
    std::fs::write(path, bytes).map_err(|e| ModelError::io(path, e))
}

/// Read every tensor of a safetensors file as f32. F32, F16 and BF16 tensors are accepted,
/// and so are int8 model files written by [`covey_tensors::quant::encode_int8`], which are
/// dequantized transparently.
pub fn read_safetensors(path: &Path) -> Result<NamedTensors> {
    let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
    let (tensors, _) = covey_tensors::quant::decode_model(&bytes).map_err(|e| tensor_error(path, e))?;
    Ok(tensors)
}

/// A `covey-tensors` error as a [`ModelError`] naming `path`.
pub(crate) fn tensor_error(path: &Path, e: TensorError) -> ModelError {
    let path = path.to_owned();
    match e {
        TensorError::Safetensors(reason) => ModelError::Safetensors { path, reason },
        TensorError::UnsupportedDtype { name, dtype } => ModelError::UnsupportedDtype { path, name, dtype },
        TensorError::Missing(name) => ModelError::MissingTensor { path, name },
        TensorError::Shape { name, expected, found } => ModelError::ShapeMismatch { path, name, expected, found },
        TensorError::NonFinite(name) => ModelError::NonFinite { path, name },
        e => ModelError::Safetensors { path, reason: e.to_string() },
    }
}

/// Save the base model (adapters excluded) into `dir`, with its config and tokenizer.
pub fn save_model(model: &Llama, tokenizer: &Tokenizer, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_safetensors(&dir.join(MODEL_FILE), &base_tensors(model), Some(meta))?;
    model.config.save(&dir.join(CONFIG_FILE))?;
    Ok(tokenizer.save_to_dir(dir)?)
}

/// Load a base model directory onto `device`.
pub fn load_model(dir: &Path, device: &Device) -> Result<Llama> {
    let config = LlamaConfig::load(&dir.join(CONFIG_FILE))?;
    let path = dir.join(MODEL_FILE);
    let tensors = read_safetensors(&path)?;
    from_base_tensors(&config, &tensors, &path, device)
}

/// Build a model from Hugging Face-named base tensors, checking every shape.
pub fn from_base_tensors(config: &LlamaConfig, t: &NamedTensors, source: &Path, device: &Device) -> Result<Llama> {
    config.validate()?;
    let h = config.hidden_size;
    let param1 = |name: &str, n: usize| -> Result<Param<Tensor<1>>> {
        Ok(Param::from_tensor(device_tensor::<1>(&take(t, name, &[n], source)?, device)))
    };
    let param2 = |name: &str, shape: [usize; 2], transpose: bool| -> Result<Param<Tensor<2>>> {
        let x = take(t, name, &shape, source)?;
        let x = if transpose { x.transposed() } else { x };
        Ok(Param::from_tensor(device_tensor::<2>(&x, device)))
    };
    let proj = |p: &str, tgt: LoraTarget| -> Result<LoraLinear> {
        let (d_in, d_out) = config.lora_dims(tgt);
        let weight = param2(&format!("{p}.{}.weight", tgt.hf_path()), [d_out, d_in], true)?;
        Ok(LoraLinear { weight, lora: None })
    };
    let mut layers = Vec::with_capacity(config.num_hidden_layers);
    for i in 0..config.num_hidden_layers {
        let p = layer_prefix(i);
        layers.push(DecoderLayer {
            attn_norm: param1(&format!("{p}.input_layernorm.weight"), h)?,
            q_proj: proj(&p, LoraTarget::Q)?,
            k_proj: proj(&p, LoraTarget::K)?,
            v_proj: proj(&p, LoraTarget::V)?,
            o_proj: proj(&p, LoraTarget::O)?,
            mlp_norm: param1(&format!("{p}.post_attention_layernorm.weight"), h)?,
            gate_proj: proj(&p, LoraTarget::Gate)?,
            up_proj: proj(&p, LoraTarget::Up)?,
            down_proj: proj(&p, LoraTarget::Down)?,
        });
    }
    Ok(Llama {
        embed_tokens: param2("model.embed_tokens.weight", [config.vocab_size, h], false)?,
        layers,
        norm: param1("model.norm.weight", h)?,
        lm_head: if config.tie_word_embeddings {
            None
        } else {
            Some(param2("lm_head.weight", [config.vocab_size, h], true)?)
        },
        config: config.clone(),
        lora: None,
    })
}

/// `adapter_config.json` as PEFT writes it for a LoRA adapter on a causal LM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeftAdapterConfig {
    /// Always `LORA`.
    pub peft_type: String,
    /// Always `CAUSAL_LM`.
    pub task_type: String,
    /// Rank.
    pub r: usize,
    /// Scaling numerator.
    pub lora_alpha: f64,
    /// Dropout on the adapter input.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Module names carrying adapters (`q_proj`, ...).
    pub target_modules: Vec<String>,
    /// Always `none`.
    #[serde(default = "none")]
    pub bias: String,
    /// Always false: weights are `[out, in]`.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Where the base model lives, informative.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// True: the adapter is saved for inference.
    #[serde(default)]
    pub inference_mode: bool,
}

fn none() -> String {
    "none".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CoveyLora {
    ffa: bool,
    seed: u64,
}

/// Save the model's adapters (PEFT layout) into `dir`.
pub fn save_adapter(model: &Llama, dir: &Path, base: Option<&str>) -> Result<()> {
    let lora = model.lora.as_ref().ok_or_else(|| ModelError::Adapter("the model carries no adapters".into()))?;
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    write_safetensors(&dir.join(ADAPTER_FILE), &adapter_tensors(model)?, None)?;
    let cfg = PeftAdapterConfig {
        peft_type: "LORA".into(),
        task_type: "CAUSAL_LM".into(),
        r: lora.rank,
        lora_alpha: lora.alpha,
        lora_dropout: lora.dropout,
        target_modules: lora.targets.iter().map(|t| t.hf_name().to_string()).collect(),
        bias: none(),
        fan_in_fan_out: false,
        base_model_name_or_path: base.map(str::to_owned),
        inference_mode: true,
    };
    write_json(&dir.join(ADAPTER_CONFIG_FILE), &cfg)?;
    write_json(&dir.join(COVEY_LORA_FILE), &CoveyLora { ffa: lora.ffa, seed: lora.seed })
}

/// Read an adapter directory's LoRA configuration.
pub fn load_adapter_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join(ADAPTER_CONFIG_FILE);
    let cfg: PeftAdapterConfig = read_json(&path)?;
    if cfg.peft_type != "LORA" {
        return Err(ModelError::InvalidConfig {
            path: Some(path),
            field: "peft_type",
            reason: format!("{} is not LORA", cfg.peft_type),
        });
    }
    let targets = cfg
        .target_modules
        .iter()
        .map(|m| {
            LoraTarget::parse(m).ok_or_else(|| ModelError::InvalidConfig {
                path: Some(path.clone()),
                field: "target_modules",
                reason: format!("unknown module {m}"),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let extra_path = dir.join(COVEY_LORA_FILE);
    let extra: CoveyLora =
        if extra_path.exists() { read_json(&extra_path)? } else { CoveyLora { ffa: false, seed: 0 } };
    let lora = LoraConfig {
        rank: cfg.r,
        alpha: cfg.lora_alpha,
        dropout: cfg.lora_dropout,
        targets,
        ffa: extra.ffa,
        seed: extra.seed,
    };
    lora.validate().map_err(|e| e.in_file(&path))?;
    Ok(lora)
}

/// Attach the adapters saved in `dir` to a model without adapters.
pub fn load_adapter(model: Llama, dir: &Path, device: &Device) -> Result<Llama> {
    let lora = load_adapter_config(dir)?;
    let path = dir.join(ADAPTER_FILE);
    let tensors = read_safetensors(&path)?;
    let model = model.with_lora(&lora, device)?;
    load_adapter_tensors(model, &tensors, &path)
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text =
        serde_json::to_string_pretty(value).map_err(|source| ModelError::Json { path: path.to_owned(), source })?;
    std::fs::write(path, text).map_err(|e| ModelError::io(path, e))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| ModelError::Json { path: PathBuf::from(path), source })
}
