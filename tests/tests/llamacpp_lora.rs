//! A Covey adapter, exported as a llama.cpp LoRA GGUF, applied by llama.cpp to the base
//! GGUF it was trained on, chooses the same next tokens as Covey's merged model.
//!
//! The base is given to llama.cpp twice: as Covey's own f32 GGUF export of the base
//! weights (the same values Covey merges into: the check asserts ≥ 99 % top-1 agreement
//! there), and as the original Q4_1 file, whose quantized arithmetic (activations rounded
//! to 8 bits) moves some near-ties by itself; for that one the report also gives how
//! often llama.cpp's base alone agrees with Covey's base alone, and the adapter must at
//! least bring llama.cpp closer to Covey's merged model than the base alone is.
//!
//! Runs with SmolLM2-135M-Instruct (`scripts/fetch-smollm2.sh`, `COVEY_SMOLLM2_GGUF`, or
//! `../shared/models`) and skips with a message without it. The llama.cpp half runs when
//! `COVEY_LLAMA_PYTHON` names a Python with llama-cpp-python (built as in
//! `../shared/bench/llamacpp/build.sh`; set `LLAMA_CPP_LIB_PATH` as that README says);
//! without it, the adapter and Covey's choices are written and the comparison is skipped
//! with a message. `COVEY_LORA_CHECK_OUT` keeps the files in a directory of your choice.

use std::path::{Path, PathBuf};

mod common;

use covey_model::LoadedModel;
use covey_model::Precision;
use covey_tensors::lora::LoraTarget;
use covey_tensors::quant::StoredTensor;
use covey_tensors::{HostTensor, NamedTensors};

const PROMPTS: [&str; 4] = [
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
];

fn argmax(row: &[f32]) -> u32 {
    row.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0 as u32
}

#[test]
fn an_exported_adapter_matches_covey_in_llama_cpp() {
    let Some(gguf) = common::smollm2() else { return };
    let model = LoadedModel::open(&gguf).expect("the SmolLM2 GGUF imports");
    let base = model.f32_tensors();
    // An adapter on every projection, large enough to change what the model predicts.
    let targets = LoraTarget::ALL;
    let (rank, alpha) = (8usize, 16.0f32);
    let mut factors = covey_tensors::lora::frozen_a(&base, rank, &targets, 7);
    for l in 0..model.config.num_hidden_layers {
        for t in targets {
            let out = base[&t.weight_name(l)].shape[0];
            let data = (0..out * rank).map(|i| ((i * 31 + l * 7) as f32 * 0.618).sin() * 0.08).collect();
            factors.insert(t.peft_name(l, 'B'), HostTensor { shape: vec![out, rank], data });
        }
    }
    let keep = std::env::var_os("COVEY_LORA_CHECK_OUT").map(PathBuf::from);
    let tmp = tempfile::tempdir().expect("tmp");
    let out = keep.unwrap_or_else(|| tmp.path().to_owned());
    std::fs::create_dir_all(&out).expect("out dir");
    let adapter = out.join("adapter.gguf");
    covey_model::export::export_lora_gguf(&model.config, &factors, alpha, "llama.cpp check", &adapter)
        .expect("export the adapter");

    // Covey's merged model (f32 engine) and the base alone.
    let mut merged: NamedTensors = base.clone();
    covey_tensors::lora::merge(&mut merged, &factors, alpha / rank as f32).expect("merge");
    let engine = |w: NamedTensors| {
        covey_infer::Model::from_stored(
            model.config.clone(),
            w.into_iter().map(|(n, t)| (n, StoredTensor::F32(t))).collect(),
            Precision::F32,
        )
        .expect("engine")
    };
    let (with_adapter, plain) = (engine(merged), engine(base));
    let mut tokens = Vec::new();
    let mut covey_top1 = Vec::new();
    let mut covey_base_top1 = Vec::new();
    let (mut changed, mut total) = (0, 0);
    for p in PROMPTS {
        let ids = model.encode_prompt(p, false).expect("encode");
        let got: Vec<u32> = with_adapter.logits(&ids).expect("logits").iter().map(|r| argmax(r)).collect();
        let before: Vec<u32> = plain.logits(&ids).expect("logits").iter().map(|r| argmax(r)).collect();
        changed += got.iter().zip(&before).filter(|(a, b)| a != b).count();
        total += ids.len();
        tokens.push(ids);
        covey_top1.push(got);
        covey_base_top1.push(before);
    }
    eprintln!("the adapter changes Covey's top-1 at {changed} of {total} positions");
    assert!(changed * 10 >= total, "the adapter must matter for the check to mean anything");
    let expected = out.join("covey_top1.json");
    let json = serde_json::json!({ "tokens": tokens, "covey_top1": covey_top1, "covey_base_top1": covey_base_top1 });
    std::fs::write(&expected, json.to_string()).expect("write");
    let f32_base = out.join("base-f32.gguf");
    covey_model::export::export_gguf(&model, &f32_base, covey_model::export::GgmlType::F32).expect("export the base");

    let Some(python) = std::env::var_os("COVEY_LLAMA_PYTHON") else {
        eprintln!(
            "skipping the llama.cpp half: set COVEY_LLAMA_PYTHON to a Python with llama-cpp-python \
             (../shared/bench/llamacpp/build.sh) to run it"
        );
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/llamacpp_lora_check.py");
    let check = |base: &Path| -> serde_json::Value {
        let run = std::process::Command::new(&python)
            .arg(&script)
            .arg("--base")
            .arg(base)
            .arg("--lora")
            .arg(&adapter)
            .arg("--expected")
            .arg(&expected)
            .output()
            .expect("run the llama.cpp check");
        let stdout = String::from_utf8_lossy(&run.stdout);
        assert!(run.status.success(), "llama.cpp check failed: {stdout}\n{}", String::from_utf8_lossy(&run.stderr));
        eprintln!("llama.cpp: {stdout}");
        serde_json::from_str(stdout.trim()).expect("JSON")
    };
    let exact = check(&f32_base);
    let agreement = exact["top1_agreement_with_lora"].as_f64().expect("agreement");
    assert!(agreement >= 0.99, "top-1 agreement {agreement} < 0.99: {exact}");
    let original = check(&gguf);
    let (with, without) = (
        original["top1_agreement_with_lora"].as_f64().expect("agreement"),
        original["top1_agreement_without_lora"].as_f64().expect("agreement"),
    );
    assert!(with > without, "on the Q4_1 file the adapter is not applied: {original}");
}
