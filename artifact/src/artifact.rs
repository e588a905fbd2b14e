//! Model artifacts on disk, whatever their format: a GGUF file, or a Covey model
//! directory (`config.json`, `model.safetensors` in f32, int8 or int4,
//! `tokenizer.json`, `tokenizer_config.json` with the chat template and special tokens,
//! as Hugging Face lays a model out).
//!
//! [`LoadedModel`] keeps quantized weights quantized until an engine or an exporter
//! asks for something else.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use covey_infer::{Model, Precision};
use covey_tensors::NamedTensors;
use covey_tensors::quant::{Scheme, StoredTensor};
use serde::{Deserialize, Serialize};

use crate::chat::{self, Message};
use crate::error::tensor_error;
use crate::error::{ArtifactError, Result};
use crate::gguf_import::{self, SpecialTokens};
use crate::tokenizer::{TOKENIZER_FILE, Tokenizer};
use crate::{CONFIG_FILE, MODEL_FILE};
use covey_infer::LlamaConfig;

/// Hugging Face's file for the chat template and special tokens.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// A model read from disk, weights as stored.
pub struct LoadedModel {
    /// Where it came from.
    pub source: PathBuf,
    /// Shape.
    pub config: LlamaConfig,
    /// Weights under Hugging Face names: f32, or int8 / int4 as the file holds them.
    pub tensors: BTreeMap<String, StoredTensor>,
    /// Tokenizer.
    pub tokenizer: Tokenizer,
    /// Jinja chat template, for instruct models.
    pub chat_template: Option<String>,
    /// BOS / EOS.
    pub special: SpecialTokens,
    /// One line on the origin (e.g. `GGUF Q4_1 ×210, F32 ×61, Q8_0 ×1`).
    pub description: String,
}

/// The part of `tokenizer_config.json` Covey reads and writes.
#[derive(Debug, Default, Serialize, Deserialize)]
struct TokenizerConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    chat_template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bos_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    eos_token: Option<String>,
    #[serde(default)]
    add_bos_token: bool,
}

fn is_gguf(path: &Path) -> bool {
    path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

impl LoadedModel {
    /// Read a `.gguf` file or a model directory.
    pub fn open(path: &Path) -> Result<Self> {
        if is_gguf(path) {
            return Self::open_gguf(path);
        }
        if path.is_file() {
            return Err(ArtifactError::UnsupportedModel {
                path: path.to_owned(),
                reason: "expected a .gguf file or a model directory (config.json + model.safetensors)".into(),
            });
        }
        let config = LlamaConfig::load(&path.join(CONFIG_FILE))?;
        let file = path.join(MODEL_FILE);
        let bytes = std::fs::read(&file).map_err(|e| ArtifactError::io(&file, e))?;
        let (tensors, meta) = covey_tensors::quant::decode_stored(&bytes).map_err(|e| tensor_error(&file, e))?;
        let tokenizer = Tokenizer::for_model_dir(path)?;
        let tc_path = path.join(TOKENIZER_CONFIG_FILE);
        let tc: TokenizerConfig = if tc_path.exists() {
            let text = std::fs::read_to_string(&tc_path).map_err(|e| ArtifactError::io(&tc_path, e))?;
            serde_json::from_str(&text).map_err(|source| ArtifactError::Json { path: tc_path.clone(), source })?
        } else {
            TokenizerConfig::default()
        };
        let id = |tok: &Option<String>| match (&tokenizer, tok) {
            (Tokenizer::HuggingFace(t), Some(s)) => t.token_to_id(s),
            _ => None,
        };
        let special = SpecialTokens { bos: id(&tc.bos_token), eos: id(&tc.eos_token), add_bos: tc.add_bos_token };
        let scheme = meta.get(covey_tensors::quant::SCHEME_KEY).cloned().unwrap_or_else(|| "f32".into());
        Ok(Self {
            source: path.to_owned(),
            config,
            tensors,
            tokenizer,
            chat_template: tc.chat_template,
            special,
            description: format!("Covey model directory ({scheme})"),
        })
    }

    fn open_gguf(path: &Path) -> Result<Self> {
        let m = gguf_import::import_gguf(path)?;
        let types: Vec<String> = m.source_types.iter().map(|(t, n)| format!("{t} ×{n}")).collect();
        Ok(Self {
            source: path.to_owned(),
            config: m.config,
            tensors: m.tensors.into_iter().map(|(n, t)| (n, StoredTensor::F32(t))).collect(),
            tokenizer: Tokenizer::HuggingFace(Box::new(m.tokenizer)),
            chat_template: m.chat_template,
            special: m.special,
            description: format!(
                "GGUF{} ({})",
                m.name.map(|n| format!(" `{n}`")).unwrap_or_default(),
                types.join(", ")
            ),
        })
    }

    /// The weights as f32 (dequantizing quantized ones).
    pub fn f32_tensors(&self) -> NamedTensors {
        self.tensors.iter().map(|(n, t)| (n.clone(), t.to_f32())).collect()
    }

    /// An inference engine over these weights: f32 weights are quantized to `precision`;
    /// weights the file already holds quantized are used as they are.
    pub fn engine(&self, precision: Precision) -> Result<Model> {
        Ok(Model::from_stored(self.config.clone(), self.tensors.clone(), precision)?)
    }

    /// [`LoadedModel::engine`] without a second copy of the weights: they move into the
    /// engine, and this model keeps its tokenizer, template and config but no tensors
    /// (what `generate`, `chat` and `logits` need; an f32 model then needs half the memory).
    pub fn take_engine(&mut self, precision: Precision) -> Result<Model> {
        Ok(Model::from_stored(self.config.clone(), std::mem::take(&mut self.tensors), precision)?)
    }

    /// Quantize the f32 weights with `scheme` (already quantized ones are kept).
    pub fn quantize(&mut self, scheme: Scheme) -> Result<()> {
        let plain: NamedTensors = self
            .tensors
            .iter()
            .filter_map(|(n, t)| match t {
                StoredTensor::F32(t) => Some((n.clone(), t.clone())),
                _ => None,
            })
            .collect();
        let quantized =
            covey_tensors::quant::quantize_model(&plain, scheme).map_err(|e| tensor_error(&self.source, e))?;
        self.tensors.extend(quantized);
        Ok(())
    }

    /// Token ids of a prompt; with `chat`, the prompt is the user's turn rendered with
    /// the model's chat template (an error if it has none).
    pub fn encode_prompt(&self, prompt: &str, chat: bool) -> Result<Vec<u32>> {
        let text = if chat { self.chat_prompt(&[Message::new("user", prompt)])? } else { prompt.to_string() };
        let mut ids = self.tokenizer.encode(&text)?;
        if self.special.add_bos
            && let Some(bos) = self.special.bos
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// A conversation rendered with the model's chat template, ready for the
    /// assistant's reply.
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| ArtifactError::UnsupportedModel {
            path: self.source.clone(),
            reason: "the model has no chat template".into(),
        })?;
        let token = |id: Option<u32>| match (&self.tokenizer, id) {
            (Tokenizer::HuggingFace(t), Some(id)) => t.id_to_token(id).unwrap_or_default(),
            _ => String::new(),
        };
        chat::render(template, messages, true, &token(self.special.bos), &token(self.special.eos))
    }

    /// Token ids generation stops at: EOS, and for chat models `<|im_end|>`-style turn ends.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut out: Vec<u32> = self.special.eos.into_iter().collect();
        if let Tokenizer::HuggingFace(t) = &self.tokenizer {
            for s in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"] {
                if let Some(id) = t.token_to_id(s)
                    && !out.contains(&id)
                {
                    out.push(id);
                }
            }
        }
        out
    }

    /// Write a model directory: `config.json`, `model.safetensors` (the weights as held
    /// now: f32, int8 or int4), `tokenizer.json`, `tokenizer_config.json`.
    pub fn save_dir(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ArtifactError::io(dir, e))?;
        self.config.save(&dir.join(CONFIG_FILE))?;
        let file = dir.join(MODEL_FILE);
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let any_quantized = self.tensors.values().any(|t| !matches!(t, StoredTensor::F32(_)));
        let bytes = if any_quantized {
            covey_tensors::quant::encode_stored(&self.tensors, meta)
        } else {
            covey_tensors::encode(&self.f32_tensors(), Some(meta))
        }
        .map_err(|e| tensor_error(&file, e))?;
        std::fs::write(&file, bytes).map_err(|e| ArtifactError::io(&file, e))?;
        self.tokenizer.save_to_dir(dir)?;
        let token = |id: Option<u32>| match (&self.tokenizer, id) {
            (Tokenizer::HuggingFace(t), Some(id)) => t.id_to_token(id),
            _ => None,
        };
        let tc = TokenizerConfig {
            chat_template: self.chat_template.clone(),
            bos_token: token(self.special.bos),
            eos_token: token(self.special.eos),
            add_bos_token: self.special.add_bos,
        };
        let path = dir.join(TOKENIZER_CONFIG_FILE);
        let text =
            serde_json::to_string_pretty(&tc).map_err(|source| ArtifactError::Json { path: path.clone(), source })?;
        std::fs::write(&path, text).map_err(|e| ArtifactError::io(&path, e))?;
        if !matches!(self.tokenizer, Tokenizer::HuggingFace(_)) && dir.join(TOKENIZER_FILE).exists() {
            tracing::warn!("a stale tokenizer.json is left in {}", dir.display());
        }
        Ok(())
    }
}
