//! Helpers shared by the command-line tests.

use std::path::Path;
use std::process::Command;

use covey_model::Tokenizer;
use covey_model::artifact::LoadedModel;
use covey_model::gguf_import::SpecialTokens;
use covey_tensors::quant::StoredTensor;

/// A random byte-level model directory (`LlamaConfig::tiny()`: hidden 32, 4 heads over 2
/// KV heads, 2 layers, vocabulary 256).
pub fn tiny_model_dir(dir: &Path) -> LoadedModel {
    let config = covey_infer::LlamaConfig::tiny();
    let tensors = covey_infer::random_tensors(&config, 21);
    let m = LoadedModel {
        source: dir.to_owned(),
        config,
        tensors: tensors.into_iter().map(|(n, t)| (n, StoredTensor::F32(t))).collect(),
        tokenizer: Tokenizer::Bytes,
        chat_template: None,
        special: SpecialTokens::default(),
        description: "test".into(),
    };
    m.save_dir(dir).expect("save");
    m
}

/// Run the `covey-model` binary: (success, stdout, stderr).
pub fn covey_model(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_covey-model")).args(args).output().expect("run covey-model");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}
