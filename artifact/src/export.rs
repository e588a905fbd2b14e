//! Export for deployment: safetensors under Hugging Face names, GGUF that llama.cpp
//! loads, and ONNX for ONNX Runtime (through `covey-onnx`).

use std::path::Path;

pub use covey_gguf::GgmlType;
use covey_gguf::{GgufWriter, Value};
use covey_tensors::quant::StoredTensor;

use crate::artifact::LoadedModel;
use crate::error::{ArtifactError, Result};
use crate::gguf_import::{gguf_name, permute_rope_rows};
use crate::tokenizer::Tokenizer;
use covey_infer::LlamaConfig;

fn gguf_err(path: &Path, e: covey_gguf::GgufError) -> ArtifactError {
    ArtifactError::Gguf { path: path.to_owned(), source: e }
}

/// Write an f32 model directory under Hugging Face names (`model.safetensors`,
/// `config.json`, `tokenizer.json`, `tokenizer_config.json`), loadable by
/// `transformers`' `LlamaForCausalLM.from_pretrained`.
pub fn export_safetensors(model: &LoadedModel, dir: &Path) -> Result<()> {
    let plain = LoadedModel {
        source: model.source.clone(),
        config: model.config.clone(),
        tensors: model.tensors.iter().map(|(n, t)| (n.clone(), StoredTensor::F32(t.to_f32()))).collect(),
        tokenizer: model.tokenizer.clone(),
        chat_template: model.chat_template.clone(),
        special: model.special.clone(),
        description: model.description.clone(),
    };
    plain.save_dir(dir)
}

/// GPT-2's byte → printable character map (the alphabet of byte-level BPE vocabularies).
fn bytes_to_unicode() -> Vec<char> {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut out = vec![' '; 256];
    for (b, c) in printable.iter().zip(chars) {
        out[*b as usize] = char::from_u32(c).unwrap_or(' ');
    }
    out
}

struct GgufVocab {
    tokens: Vec<String>,
    types: Vec<i32>,
    merges: Vec<String>,
    pre: String,
}

fn vocab_for_gguf(tokenizer: &Tokenizer, vocab_size: usize, path: &Path) -> Result<GgufVocab> {
    match tokenizer {
        Tokenizer::Bytes => {
            // Byte-level model: a byte-level BPE vocabulary with no merges is exactly one
            // token per byte.
            let map = bytes_to_unicode();
            let tokens: Vec<String> =
                (0..vocab_size).map(|i| map.get(i).map_or(format!("<unused{i}>"), |c| c.to_string())).collect();
            Ok(GgufVocab { types: vec![1; tokens.len()], tokens, merges: Vec::new(), pre: "gpt2".into() })
        }
        Tokenizer::HuggingFace(t) => {
            let spec: serde_json::Value = serde_json::from_str(
                &t.to_string(false)
                    .map_err(|e| ArtifactError::Tokenizer { path: path.to_owned(), reason: e.to_string() })?,
            )
            .map_err(|source| ArtifactError::Json { path: path.to_owned(), source })?;
            let model = &spec["model"];
            if model["type"] != "BPE" {
                return Err(ArtifactError::UnsupportedModel {
                    path: path.to_owned(),
                    reason: "GGUF export needs a byte-level BPE tokenizer".into(),
                });
            }
            let mut tokens = vec![String::new(); vocab_size];
            let mut types = vec![1i32; vocab_size];
            for (tok, id) in t.get_vocab(true) {
                if let Some(slot) = tokens.get_mut(id as usize) {
                    *slot = tok;
                }
            }
            for (i, slot) in tokens.iter_mut().enumerate() {
                if slot.is_empty() {
                    *slot = format!("<unused{i}>");
                    types[i] = 5;
                }
            }
            if let Some(added) = spec["added_tokens"].as_array() {
                for a in added {
                    if let Some(id) = a["id"].as_u64().and_then(|i| usize::try_from(i).ok())
                        && id < vocab_size
                    {
                        types[id] = if a["special"].as_bool().unwrap_or(false) { 3 } else { 4 };
                    }
                }
            }
            let merges = model["merges"]
                .as_array()
                .map(|m| {
                    m.iter()
                        .filter_map(|x| match x {
                            serde_json::Value::String(s) => Some(s.clone()),
                            serde_json::Value::Array(p) => {
                                Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?))
                            }
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
            let pre = spec["pre_tokenizer"].to_string();
            let pre = if pre.contains("\"Digits\"") {
                "smollm"
            } else if pre.contains("\"Split\"") {
                "llama-bpe"
            } else {
                "gpt2"
            };
            Ok(GgufVocab { tokens, types, merges, pre: pre.into() })
        }
    }
}

/// Write a GGUF v3 file llama.cpp loads: `llama` architecture metadata, the tokenizer
/// as `tokenizer.ggml.*`, the chat template, and every weight in `ty` (F32, F16, Q8_0,
/// Q4_0 or Q4_1; norms stay F32). The q and k rows are put back into llama.cpp's
/// interleaved RoPE order.
pub fn export_gguf(model: &LoadedModel, path: &Path, ty: GgmlType) -> Result<()> {
    if !matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1) {
        return Err(ArtifactError::UnsupportedModel {
            path: path.to_owned(),
            reason: format!("GGUF export writes F32, F16, Q8_0, Q4_0 or Q4_1, not {ty}"),
        });
    }
    let c = &model.config;
    let mut w = GgufWriter::new();
    let mut meta: Vec<(&str, Value)> = Vec::new();
    let u32v = |v: usize| Value::U32(u32::try_from(v).unwrap_or(u32::MAX));
    meta.push(("general.architecture", Value::String("llama".into())));
    meta.push(("general.name", Value::String(format!("covey export of {}", model.source.display()))));
    meta.push(("general.alignment", Value::U32(32)));
    let file_type = match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        _ => 7, // Q8_0
    };
    meta.push(("general.file_type", Value::U32(file_type)));
    meta.push(("general.quantization_version", Value::U32(2)));
    meta.push(("llama.block_count", u32v(c.num_hidden_layers)));
    meta.push(("llama.context_length", u32v(c.max_position_embeddings)));
    meta.push(("llama.embedding_length", u32v(c.hidden_size)));
    meta.push(("llama.feed_forward_length", u32v(c.intermediate_size)));
    meta.push(("llama.attention.head_count", u32v(c.num_attention_heads)));
    meta.push(("llama.attention.head_count_kv", u32v(c.num_key_value_heads)));
    meta.push(("llama.rope.freq_base", Value::F32(c.rope_theta as f32)));
    meta.push(("llama.rope.dimension_count", u32v(c.head_dim())));
    meta.push(("llama.attention.key_length", u32v(c.head_dim())));
    meta.push(("llama.attention.value_length", u32v(c.head_dim())));
    meta.push(("llama.attention.layer_norm_rms_epsilon", Value::F32(c.rms_norm_eps as f32)));
    meta.push(("llama.vocab_size", u32v(c.vocab_size)));
    let vocab = vocab_for_gguf(&model.tokenizer, c.vocab_size, path)?;
    meta.push(("tokenizer.ggml.model", Value::String("gpt2".into())));
    meta.push(("tokenizer.ggml.pre", Value::String(vocab.pre)));
    meta.push(("tokenizer.ggml.tokens", Value::Array(vocab.tokens.into_iter().map(Value::String).collect())));
    meta.push(("tokenizer.ggml.token_type", Value::Array(vocab.types.into_iter().map(Value::I32).collect())));
    meta.push(("tokenizer.ggml.merges", Value::Array(vocab.merges.into_iter().map(Value::String).collect())));
    if let Some(bos) = model.special.bos {
        meta.push(("tokenizer.ggml.bos_token_id", Value::U32(bos)));
    }
    if let Some(eos) = model.special.eos {
        meta.push(("tokenizer.ggml.eos_token_id", Value::U32(eos)));
    }
    meta.push(("tokenizer.ggml.add_bos_token", Value::Bool(model.special.add_bos)));
    if let Some(t) = &model.chat_template {
        meta.push(("tokenizer.chat_template", Value::String(t.clone())));
    }
    for (key, value) in meta {
        w.add_metadata(key, value).map_err(|e| gguf_err(path, e))?;
    }
    for (name, stored) in &model.tensors {
        let Some(gname) = gguf_name(name) else { continue };
        let mut t = stored.to_f32();
        if name.ends_with("q_proj.weight") {
            t = permute_rope_rows(&t, c.num_attention_heads, false);
        } else if name.ends_with("k_proj.weight") {
            t = permute_rope_rows(&t, c.num_key_value_heads, false);
        }
        let this_ty = if t.shape.len() == 1 || !t.shape[1].is_multiple_of(32) { GgmlType::F32 } else { ty };
        w.add_tensor_f32(&gname, &t.shape, &t.data, this_ty).map_err(|e| gguf_err(path, e))?;
    }
    w.write(path).map_err(|e| gguf_err(path, e))
}

/// Write a LoRA adapter as llama.cpp reads it with `--lora` on top of the base model's
/// GGUF (`general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`): PEFT
/// factors `…{q,k,v,o,gate,up,down}_proj.lora_A.weight` `[r, in]` and `lora_B.weight`
/// `[out, r]` become `blk.{i}.{attn_q,…}.weight.lora_a` / `.lora_b` in f32. `B` of `q_proj`
/// and `k_proj` gets the same row permutation the base weights get in GGUF (llama.cpp's
/// rotary layout), so the adapter adds exactly `alpha / r · B A` to what the base holds.
pub fn export_lora_gguf(
    config: &LlamaConfig,
    factors: &covey_tensors::NamedTensors,
    alpha: f32,
    name: &str,
    path: &Path,
) -> Result<()> {
    let bad = |reason: String| ArtifactError::UnsupportedModel { path: path.to_owned(), reason };
    let mut w = GgufWriter::new();
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("general.type", Value::String("adapter".into())),
        ("general.name", Value::String(name.into())),
        ("general.alignment", Value::U32(32)),
        ("adapter.type", Value::String("lora".into())),
        ("adapter.lora.alpha", Value::F32(alpha)),
    ];
    for (key, value) in meta {
        w.add_metadata(key, value).map_err(|e| gguf_err(path, e))?;
    }
    let mut pairs = 0;
    for (peft, t) in factors {
        let Some((weight, factor)) = covey_tensors::lora::base_weight_of(peft) else {
            return Err(bad(format!("`{peft}` is not a PEFT LoRA factor name")));
        };
        let gname = gguf_name(&weight).ok_or_else(|| bad(format!("`{weight}` has no GGUF name")))?;
        if t.shape.len() != 2 {
            return Err(bad(format!("`{peft}` is not 2-D")));
        }
        let mut t = t.clone();
        let suffix = if factor == 'A' {
            "lora_a"
        } else {
            pairs += 1;
            if weight.ends_with("q_proj.weight") {
                t = permute_rope_rows(&t, config.num_attention_heads, false);
            } else if weight.ends_with("k_proj.weight") {
                t = permute_rope_rows(&t, config.num_key_value_heads, false);
            }
            "lora_b"
        };
        w.add_tensor_f32(format!("{gname}.{suffix}"), &t.shape, &t.data, GgmlType::F32)
            .map_err(|e| gguf_err(path, e))?;
    }
    if pairs == 0 || factors.len() != 2 * pairs {
        return Err(bad(format!("{} factors do not pair up as A and B", factors.len())));
    }
    w.write(path).map_err(|e| gguf_err(path, e))
}

/// Write an ONNX model (opset 17): f32, or with int8 per-channel weights.
pub fn export_onnx(model: &LoadedModel, path: &Path, int8: bool) -> Result<()> {
    let options = covey_onnx::ExportOptions {
        weights: if int8 { covey_onnx::WeightFormat::Int8 } else { covey_onnx::WeightFormat::F32 },
        ..covey_onnx::ExportOptions::default()
    };
    covey_onnx::export_to_file(&model.config, &model.f32_tensors(), &options, path)
        .map(|_| ())
        .map_err(ArtifactError::Onnx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf_import::SpecialTokens;
    use covey_infer::{LlamaConfig, Precision, random_tensors};

    fn tiny_model() -> LoadedModel {
        let config = LlamaConfig { tie_word_embeddings: false, ..LlamaConfig::tiny() };
        let tensors = random_tensors(&config, 11);
        LoadedModel {
            source: "tiny".into(),
            config,
            tensors: tensors.into_iter().map(|(n, t)| (n, StoredTensor::F32(t))).collect(),
            tokenizer: Tokenizer::Bytes,
            chat_template: Some("{% for m in messages %}{{ m['content'] }}{% endfor %}".into()),
            special: SpecialTokens { bos: None, eos: Some(10), add_bos: false },
            description: "test".into(),
        }
    }

    #[test]
    fn gguf_export_then_import_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = tiny_model();
        let ids = [72u32, 105, 33, 10, 200];
        let want = m.engine(Precision::F32).expect("engine").logits(&ids).expect("logits");
        for (ty, tol) in [(GgmlType::F32, 0.0f32), (GgmlType::F16, 2e-3), (GgmlType::Q8_0, 1e-2), (GgmlType::Q4_1, 0.1)]
        {
            let path = dir.path().join(format!("m-{ty}.gguf"));
            export_gguf(&m, &path, ty).expect("export");
            let back = LoadedModel::open(&path).expect("import");
            assert_eq!(back.config, m.config, "{ty}");
            assert_eq!(back.special.eos, Some(10));
            assert_eq!(back.chat_template, m.chat_template);
            // The byte tokenizer comes back as an equivalent byte-level BPE.
            assert_eq!(back.tokenizer.encode("Hi!\n").expect("encode"), vec![72, 105, 33, 10]);
            let mut worst = 0.0f32;
            for (name, t) in &m.tensors {
                let a = t.to_f32();
                let b = back.tensors[name].to_f32();
                assert_eq!(a.shape, b.shape, "{name}");
                for (x, y) in a.data.iter().zip(&b.data) {
                    worst = worst.max((x - y).abs());
                }
            }
            assert!(worst <= tol, "{ty}: worst weight error {worst} > {tol}");
            let got = back.engine(Precision::F32).expect("engine").logits(&ids).expect("logits");
            let err = got.iter().flatten().zip(want.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(err <= tol * 20.0 + 1e-5, "{ty}: logits differ by {err}");
        }
    }

    #[test]
    fn safetensors_export_is_a_loadable_model_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut m = tiny_model();
        m.quantize(covey_tensors::quant::Scheme::Int4).expect("quantize");
        export_safetensors(&m, dir.path()).expect("export");
        let back = LoadedModel::open(dir.path()).expect("open");
        assert!(back.tensors.values().all(|t| matches!(t, StoredTensor::F32(_))), "exported in f32");
        assert_eq!(back.chat_template, m.chat_template);
        let config = LlamaConfig::load(&dir.path().join(crate::CONFIG_FILE)).expect("config.json");
        assert_eq!(config, m.config);
    }

    #[test]
    fn a_lora_adapter_exports_as_llama_cpp_reads_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = tiny_model();
        let base = m.f32_tensors();
        let targets = [covey_tensors::lora::LoraTarget::Q, covey_tensors::lora::LoraTarget::Down];
        let mut factors = covey_tensors::lora::frozen_a(&base, 4, &targets, 1);
        for l in 0..m.config.num_hidden_layers {
            for t in targets {
                let out = base[&t.weight_name(l)].shape[0];
                let data = (0..out * 4).map(|i| (i as f32 * 0.37).sin() * 0.1).collect();
                factors.insert(t.peft_name(l, 'B'), covey_tensors::HostTensor { shape: vec![out, 4], data });
            }
        }
        let path = dir.path().join("adapter.gguf");
        export_lora_gguf(&m.config, &factors, 8.0, "test adapter", &path).expect("export");
        let file = covey_gguf::GgufFile::open(&path).expect("read back");
        assert_eq!(file.require_str("general.type").expect("type"), "adapter");
        assert_eq!(file.require_str("adapter.type").expect("adapter.type"), "lora");
        assert_eq!(file.require_f64("adapter.lora.alpha").expect("alpha"), 8.0);
        // ggml dims: A is ne = [in, r], B is ne = [r, out], as llama.cpp checks them.
        let a = file.tensor_info("blk.0.attn_q.weight.lora_a").expect("A");
        let b = file.tensor_info("blk.0.attn_q.weight.lora_b").expect("B");
        let q = &base["model.layers.0.self_attn.q_proj.weight"];
        assert_eq!(a.shape(), vec![4, q.shape[1]]);
        assert_eq!(b.shape(), vec![q.shape[0], 4]);
        // Merged in GGUF layout, it equals the GGUF export of the merged HF weights.
        let qa = file.tensor_f32("blk.0.attn_q.weight.lora_a").expect("A");
        let qb = file.tensor_f32("blk.0.attn_q.weight.lora_b").expect("B");
        let mut merged = base.clone();
        covey_tensors::lora::merge(&mut merged, &factors, 2.0).expect("merge");
        let hf_merged =
            permute_rope_rows(&merged["model.layers.0.self_attn.q_proj.weight"], m.config.num_attention_heads, false);
        let gguf_base = permute_rope_rows(q, m.config.num_attention_heads, false);
        let cols = q.shape[1];
        for row in 0..q.shape[0] {
            for col in 0..cols {
                let delta: f32 = (0..4).map(|k| qb.data[row * 4 + k] * qa.data[k * cols + col]).sum::<f32>() * 2.0;
                let (x, y) = (gguf_base.data[row * cols + col] + delta, hf_merged.data[row * cols + col]);
                assert!((x - y).abs() < 1e-5, "row {row} col {col}: {x} vs {y}");
            }
        }
        assert!(file.tensor_info("blk.1.ffn_down.weight.lora_b").is_some());
        let mut lone = factors.clone();
        lone.remove("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight");
        assert!(export_lora_gguf(&m.config, &lone, 8.0, "x", &path).is_err(), "unpaired factors");
    }

    #[test]
    fn gguf_export_refuses_k_quants() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = export_gguf(&tiny_model(), &dir.path().join("x.gguf"), GgmlType::Q4K).expect_err("unsupported");
        assert!(err.to_string().contains("Q4_K"), "{err}");
    }

    #[test]
    fn the_byte_alphabet_is_gpt2s() {
        let m = bytes_to_unicode();
        assert_eq!(m[b'A' as usize], 'A');
        assert_eq!(m[b' ' as usize], 'Ġ');
        assert_eq!(m[b'\n' as usize], 'Ċ');
        let mut sorted = m.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 256);
    }
}
