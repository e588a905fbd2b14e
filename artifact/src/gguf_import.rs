//! Import of llama.cpp GGUF files: config from metadata, weights under Hugging Face
//! names and layout, and the tokenizer rebuilt from `tokenizer.ggml.*` into the
//! `tokenizers` crate.
//!
//! Two things differ between a GGUF file and the Hugging Face checkpoint it was
//! converted from, and are undone here:
//! * names: `blk.N.attn_q.weight` → `model.layers.N.self_attn.q_proj.weight`, ...;
//! * the rows of `attn_q` and `attn_k`: llama.cpp's converter interleaves the two halves
//!   of every head (its RoPE rotates adjacent pairs, Hugging Face's rotates halves), so
//!   row `head·d + 2i + j` of the file is row `head·d + j·d/2 + i` of the model.

use std::path::Path;

use covey_gguf::{GgufFile, Value};
use covey_tensors::{HostTensor, NamedTensors};
use serde_json::json;

use crate::error::{ArtifactError, Result};
use covey_infer::LlamaConfig;

/// A model read from a GGUF file.
pub struct ImportedModel {
    /// Shape, from `llama.*` metadata.
    pub config: LlamaConfig,
    /// Dequantized weights under Hugging Face names, `[out, in]`.
    pub tensors: NamedTensors,
    /// The tokenizer rebuilt from `tokenizer.ggml.*`.
    pub tokenizer: tokenizers::Tokenizer,
    /// `tokenizer.chat_template` (Jinja), if the file has one.
    pub chat_template: Option<String>,
    /// Beginning- and end-of-sequence token ids, and whether a BOS is prepended.
    pub special: SpecialTokens,
    /// `general.name`, if present.
    pub name: Option<String>,
    /// How many tensors of each ggml type the file held (e.g. `Q4_1: 210`).
    pub source_types: Vec<(String, usize)>,
}

/// Special token ids of a model.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SpecialTokens {
    /// Beginning of sequence.
    pub bos: Option<u32>,
    /// End of sequence (generation stops there).
    pub eos: Option<u32>,
    /// Whether the tokenizer prepends BOS to a prompt.
    pub add_bos: bool,
}

fn gguf_err(path: &Path, e: covey_gguf::GgufError) -> ArtifactError {
    ArtifactError::Gguf { path: path.to_owned(), source: e }
}

fn bad(path: &Path, reason: impl Into<String>) -> ArtifactError {
    ArtifactError::UnsupportedModel { path: path.to_owned(), reason: reason.into() }
}

/// The Hugging Face name of a GGUF tensor name, or `None` for tensors Covey does not use.
pub fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let module = match part.strip_suffix(".weight")? {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{module}.weight"))
}

/// The GGUF name of a Hugging Face tensor name (inverse of [`hf_name`]).
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, module) = rest.split_once('.')?;
    let part = match module.strip_suffix(".weight")? {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{part}.weight"))
}

/// Reorder the rows of a q or k projection between llama.cpp's interleaved RoPE layout
/// and Hugging Face's half-split one. `to_hf` picks the direction.
pub fn permute_rope_rows(t: &HostTensor, heads: usize, to_hf: bool) -> HostTensor {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let hd = rows / heads.max(1);
    let half = hd / 2;
    let mut data = vec![0.0; t.data.len()];
    for head in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let interleaved = head * hd + 2 * i + j;
                let split = head * hd + j * half + i;
                let (src, dst) = if to_hf { (interleaved, split) } else { (split, interleaved) };
                data[dst * cols..(dst + 1) * cols].copy_from_slice(&t.data[src * cols..(src + 1) * cols]);
            }
        }
    }
    HostTensor { shape: t.shape.clone(), data }
}

fn meta_u64(file: &GgufFile, path: &Path, key: &str) -> Result<usize> {
    let v = file.require_u64(key).map_err(|e| gguf_err(path, e))?;
    usize::try_from(v).map_err(|_| bad(path, format!("`{key}` = {v} is too large")))
}

/// A float GGUF stores as f32, as the decimal it was written from (`1e-5`, not
/// `9.99999974e-6`): the shortest decimal that rounds to the same f32.
fn f32_decimal(v: f64) -> f64 {
    format!("{}", v as f32).parse().unwrap_or(v)
}

fn meta_u64_or(file: &GgufFile, key: &str, default: usize) -> usize {
    file.get(key).and_then(Value::as_u64).and_then(|v| usize::try_from(v).ok()).unwrap_or(default)
}

/// The model configuration a GGUF file describes.
pub fn config_from_gguf(file: &GgufFile, path: &Path) -> Result<LlamaConfig> {
    let arch = file.require_str("general.architecture").map_err(|e| gguf_err(path, e))?;
    if arch != "llama" {
        return Err(bad(path, format!("architecture `{arch}` is not supported (only `llama`)")));
    }
    let heads = meta_u64(file, path, "llama.attention.head_count")?;
    let hidden = meta_u64(file, path, "llama.embedding_length")?;
    let vocab = match file.get("llama.vocab_size").and_then(Value::as_u64) {
        Some(v) => usize::try_from(v).map_err(|_| bad(path, "vocab_size too large"))?,
        None => file
            .get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .map(<[Value]>::len)
            .ok_or_else(|| bad(path, "neither `llama.vocab_size` nor `tokenizer.ggml.tokens` is present"))?,
    };
    // llama.cpp's `key_length` is the head width when it is not hidden / heads.
    let head_dim = match file.get("llama.attention.key_length").and_then(Value::as_u64) {
        Some(k) if heads > 0 && (hidden % heads != 0 || k as usize != hidden / heads) => Some(k as usize),
        _ => None,
    };
    let config = LlamaConfig {
        head_dim,
        hidden_size: hidden,
        num_hidden_layers: meta_u64(file, path, "llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: meta_u64_or(file, "llama.attention.head_count_kv", heads),
        intermediate_size: meta_u64(file, path, "llama.feed_forward_length")?,
        vocab_size: vocab,
        rope_theta: f32_decimal(file.get("llama.rope.freq_base").and_then(Value::as_f64).unwrap_or(10_000.0)),
        max_position_embeddings: meta_u64_or(file, "llama.context_length", 2048),
        tie_word_embeddings: file.tensor_info("output.weight").is_none(),
        rms_norm_eps: f32_decimal(
            file.get("llama.attention.layer_norm_rms_epsilon").and_then(Value::as_f64).unwrap_or(1e-5),
        ),
    };
    config.validate().map_err(|e| ArtifactError::from(e).in_file(path))?;
    if let Some(rot) = file.get("llama.rope.dimension_count").and_then(Value::as_u64)
        && rot as usize != config.head_dim()
    {
        return Err(bad(path, format!("partial RoPE ({rot} of {} dimensions) is not supported", config.head_dim())));
    }
    if file.get("llama.rope.scaling.type").and_then(Value::as_str).is_some_and(|s| s != "none") {
        return Err(bad(path, "RoPE scaling is not supported"));
    }
    Ok(config)
}

/// Read a GGUF file: config, weights (dequantized to f32, Hugging Face names and row
/// order), tokenizer and chat template. Every tensor of the config must be present
/// with the right shape.
pub fn import_gguf(path: &Path) -> Result<ImportedModel> {
    let file = GgufFile::open(path).map_err(|e| gguf_err(path, e))?;
    let config = config_from_gguf(&file, path)?;
    let mut tensors = NamedTensors::new();
    let mut types = std::collections::BTreeMap::<String, usize>::new();
    for info in &file.tensors {
        let Some(name) = hf_name(&info.name) else {
            tracing::warn!(tensor = %info.name, "ignoring a tensor Covey does not use");
            continue;
        };
        *types.entry(info.ggml_type.to_string()).or_default() += 1;
        let mut t = file.tensor_f32(&info.name).map_err(|e| gguf_err(path, e))?;
        if t.shape.len() == 2 && name.ends_with("q_proj.weight") {
            t = permute_rope_rows(&t, config.num_attention_heads, true);
        } else if t.shape.len() == 2 && name.ends_with("k_proj.weight") {
            t = permute_rope_rows(&t, config.num_key_value_heads, true);
        }
        tensors.insert(name, t);
    }
    for (name, shape) in covey_infer::expected_shapes(&config) {
        match tensors.get(&name) {
            None => {
                return Err(ArtifactError::MissingTensor {
                    path: path.to_owned(),
                    name: gguf_name(&name).unwrap_or(name),
                });
            }
            Some(t) if t.shape != shape => {
                return Err(ArtifactError::ShapeMismatch {
                    path: path.to_owned(),
                    name: gguf_name(&name).unwrap_or(name),
                    expected: shape,
                    found: t.shape.clone(),
                });
            }
            Some(_) => {}
        }
    }
    let (tokenizer, special) = tokenizer_from_gguf(&file, path)?;
    Ok(ImportedModel {
        config,
        tensors,
        tokenizer,
        chat_template: file.get("tokenizer.chat_template").and_then(Value::as_str).map(str::to_owned),
        special,
        name: file.get("general.name").and_then(Value::as_str).map(str::to_owned),
        source_types: types.into_iter().collect(),
    })
}

/// ggml token types (`tokenizer.ggml.token_type`).
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

fn int_of(v: &Value) -> Option<i64> {
    match v {
        Value::I32(x) => Some(i64::from(*x)),
        Value::I64(x) => Some(*x),
        Value::U32(x) => Some(i64::from(*x)),
        Value::I8(x) => Some(i64::from(*x)),
        Value::U8(x) => Some(i64::from(*x)),
        Value::I16(x) => Some(i64::from(*x)),
        Value::U16(x) => Some(i64::from(*x)),
        _ => None,
    }
}

/// Rebuild the Hugging Face tokenizer of a GGUF file from `tokenizer.ggml.*`.
///
/// Supported: byte-level BPE (`tokenizer.ggml.model = gpt2`) with the pre-tokenizers
/// `smollm` (digits split one by one, then GPT-2's byte-level split, as SmolLM's
/// `tokenizer.json`), `gpt2`/`default` (byte-level split only) and `llama-bpe` (Llama 3's
/// split pattern). Control and user-defined tokens become added tokens, so
/// `<|im_start|>` in a chat prompt is one id.
pub fn tokenizer_from_gguf(file: &GgufFile, path: &Path) -> Result<(tokenizers::Tokenizer, SpecialTokens)> {
    let model = file.require_str("tokenizer.ggml.model").map_err(|e| gguf_err(path, e))?;
    if model != "gpt2" {
        return Err(bad(path, format!("tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`)")));
    }
    let tokens: Vec<&str> = file
        .get("tokenizer.ggml.tokens")
        .and_then(Value::as_array)
        .ok_or_else(|| bad(path, "`tokenizer.ggml.tokens` is missing or not an array"))?
        .iter()
        .map(|v| v.as_str().ok_or_else(|| bad(path, "`tokenizer.ggml.tokens` holds a non-string")))
        .collect::<Result<_>>()?;
    let merges: Vec<&str> = file
        .get("tokenizer.ggml.merges")
        .and_then(Value::as_array)
        .ok_or_else(|| bad(path, "`tokenizer.ggml.merges` is missing (byte-level BPE needs it)"))?
        .iter()
        .map(|v| v.as_str().ok_or_else(|| bad(path, "`tokenizer.ggml.merges` holds a non-string")))
        .collect::<Result<_>>()?;
    let types: Vec<i64> = match file.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
        Some(a) => a.iter().map(|v| int_of(v).unwrap_or(1)).collect(),
        None => vec![1; tokens.len()],
    };
    let pre = file.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre_tokenizer = match pre {
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level]}),
        "gpt2" | "default" => byte_level,
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
             "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}),
        other => return Err(bad(path, format!("pre-tokenizer `{other}` is not supported (smollm, gpt2, llama-bpe)"))),
    };
    let mut vocab = serde_json::Map::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert((*t).to_string(), json!(i));
    }
    let added: Vec<serde_json::Value> = types
        .iter()
        .enumerate()
        .filter(|(_, t)| matches!(**t, TOKEN_CONTROL | TOKEN_USER_DEFINED))
        .filter_map(|(i, t)| {
            tokens.get(i).map(|content| {
                json!({"id": i, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": *t == TOKEN_CONTROL})
            })
        })
        .collect();
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    });
    let tokenizer: tokenizers::Tokenizer = spec
        .to_string()
        .parse()
        .map_err(|e: tokenizers::Error| ArtifactError::Tokenizer { path: path.to_owned(), reason: e.to_string() })?;
    let id = |key: &str| file.get(key).and_then(int_of).and_then(|v| u32::try_from(v).ok());
    let special = SpecialTokens {
        bos: id("tokenizer.ggml.bos_token_id"),
        eos: id("tokenizer.ggml.eos_token_id"),
        add_bos: file.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(false),
    };
    Ok((tokenizer, special))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        for hf in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.7.self_attn.k_proj.weight",
            "model.layers.29.mlp.down_proj.weight",
            "model.layers.0.post_attention_layernorm.weight",
        ] {
            let g = gguf_name(hf).expect("mapped");
            assert_eq!(hf_name(&g).as_deref(), Some(hf), "{g}");
        }
        assert_eq!(hf_name("blk.3.attn_q.weight").as_deref(), Some("model.layers.3.self_attn.q_proj.weight"));
        assert_eq!(hf_name("rope_freqs.weight"), None);
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
    }

    #[test]
    fn rope_row_permutation_inverts_and_matches_llama_cpp() {
        // Two heads of dimension 4, one column: row r holds r.
        let t = HostTensor::new(vec![8, 1], (0..8).map(|r| r as f32).collect()).expect("tensor");
        let gguf = permute_rope_rows(&t, 2, false);
        // llama.cpp: per head, rows (0, 2, 1, 3): halves interleaved.
        assert_eq!(gguf.data, vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
        assert_eq!(permute_rope_rows(&gguf, 2, true), t);
    }
}
