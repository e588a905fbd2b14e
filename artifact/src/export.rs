//! Export for deployment: safetensors under Hugging Face names, GGUF that llama.cpp
//! loads, and ONNX for ONNX Runtime (through `covey-onnx`).

use std::path::Path;

use covey_gguf::{GgmlType, GgufWriter, Value};
use covey_tensors::quant::StoredTensor;

use crate::artifact::LoadedModel;
use crate::error::{ArtifactError, Result};
use crate::gguf_import::{gguf_name, permute_rope_rows};
use crate::tokenizer::Tokenizer;

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
