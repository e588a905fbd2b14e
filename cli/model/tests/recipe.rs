//! The on-device recipe through the command line: `distill` (teacher live, cached, or
//! absent), `prune` with a recovery fine-tune, and the pruned model's export, on small
//! models written at test time and text from the repository's Shakespeare.

use std::path::{Path, PathBuf};

mod common;

use common::{covey_model, tiny_model_dir};
use covey_model::artifact::LoadedModel;
use covey_model::{LlamaConfig, Precision};

/// Training and held-out text cut from Macbeth.
fn texts(dir: &Path) -> (PathBuf, PathBuf) {
    let play = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/shakespeare/macbeth_gut.txt");
    let text = std::fs::read_to_string(&play).expect("Macbeth ships with the repository");
    let (train, held) = (dir.join("train.txt"), dir.join("held.txt"));
    std::fs::write(&train, &text[20_000..40_000]).expect("write");
    std::fs::write(&held, &text[40_000..42_000]).expect("write");
    (train, held)
}

fn metrics(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("metrics.json")).expect("metrics.json")).expect("json")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[rustfmt::skip]
const STUDENT: &[&str] = &[
    "--hidden", "32", "--layers", "1", "--heads", "4", "--kv-heads", "2", "--intermediate", "64", "--max-seq",
    "64", "--steps", "3", "--batch-size", "4", "--seq-len", "32", "--threads", "1", "--eval-every", "0",
];

/// `distill` on 12 windows of the training text (unless `extra` sets `--max-windows`).
fn distill(teacher: &Path, train: &Path, held: &Path, out: &Path, extra: &[&str]) -> (bool, String, String) {
    let mut args =
        vec!["distill", "--teacher", s(teacher), "--data", s(train), "--eval-data", s(held), "--out", s(out)];
    args.extend_from_slice(STUDENT);
    if !extra.contains(&"--max-windows") {
        args.extend_from_slice(&["--max-windows", "12"]);
    }
    args.extend_from_slice(extra);
    covey_model(&args)
}

#[test]
fn a_cache_of_every_logit_trains_the_student_as_the_live_teacher_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let teacher = dir.path().join("teacher");
    tiny_model_dir(&teacher);
    let (train, held) = texts(dir.path());
    // In a directory that does not exist yet: the cache creates it.
    let cache = dir.path().join("caches/teacher.topk");

    let live = dir.path().join("live");
    let (ok, stdout, stderr) = distill(&teacher, &train, &held, &live, &[]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("teacher: live"), "{stdout}");
    // With all 256 logits kept, the cached objective is the live one up to f16 rounding.
    let cached = dir.path().join("cached");
    let (ok, stdout, stderr) =
        distill(&teacher, &train, &held, &cached, &["--teacher-cache", s(&cache), "--top-k", "256"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("cached top-k") && stdout.contains("teacher cache built"), "{stdout}");
    let (l, c) = (metrics(&live), metrics(&cached));
    assert_eq!(l["windows"], 12);
    let losses = |m: &serde_json::Value| -> Vec<f64> {
        m["curve"].as_array().expect("curve").iter().map(|p| p["loss"].as_f64().expect("loss")).collect()
    };
    for (a, b) in losses(&l).iter().zip(losses(&c)) {
        assert!((a - b).abs() < 1e-3 * a.abs(), "live {a} against cached {b}");
    }
    let ppl = |m: &serde_json::Value| m["student"]["perplexity"].as_f64().expect("perplexity");
    assert!((ppl(&l) / ppl(&c) - 1.0).abs() < 1e-3, "{} {}", ppl(&l), ppl(&c));
    assert_eq!(l["teacher"]["params"], LlamaConfig::tiny().num_params());

    // A second run reuses the cache and lands on the same student.
    let again = dir.path().join("again");
    let (ok, stdout, stderr) =
        distill(&teacher, &train, &held, &again, &["--teacher-cache", s(&cache), "--top-k", "256"]);
    assert!(ok, "{stderr}");
    assert!(!stdout.contains("teacher cache built"), "{stdout}");
    assert_eq!(ppl(&metrics(&again)), ppl(&c));
    let student = LoadedModel::open(&again).expect("the student is a model directory");
    assert_eq!(student.config.hidden_size, 32);
    assert_eq!(student.config.num_hidden_layers, 1);

    // The cache belongs to those windows: other windows are refused, clearly.
    let (ok, _, stderr) =
        distill(&teacher, &train, &held, &again, &["--teacher-cache", s(&cache), "--max-windows", "10"]);
    assert!(!ok);
    assert!(stderr.contains("built for other data"), "{stderr}");

    // Alpha 0 needs no teacher logits: the from-scratch baseline on the same windows.
    let scratch = dir.path().join("scratch");
    let (ok, stdout, stderr) = distill(&teacher, &train, &held, &scratch, &["--alpha", "0"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("teacher: none"), "{stdout}");
    let before = metrics(&scratch)["student_before"]["perplexity"].as_f64().expect("before");
    assert!(ppl(&metrics(&scratch)) < before, "training did not lower perplexity");

    // Bad settings are named.
    let (ok, _, stderr) = distill(&teacher, &train, &held, &scratch, &["--alpha", "1.5"]);
    assert!(!ok && stderr.contains("alpha"), "{stderr}");
    let (ok, _, stderr) = distill(&teacher, &train, &held, &scratch, &["--temperature", "0"]);
    assert!(!ok && stderr.contains("temperature"), "{stderr}");
}

#[test]
fn pruning_gives_a_smaller_model_that_runs_and_exports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let teacher = dir.path().join("model");
    tiny_model_dir(&teacher);
    let (train, held) = texts(dir.path());
    let pruned = dir.path().join("pruned");
    let (ok, stdout, stderr) = covey_model(&[
        "prune",
        "--model",
        s(&teacher),
        "--out",
        s(&pruned),
        "--heads",
        "0.5",
        "--mlp",
        "0.3",
        "--data",
        s(&train),
        "--eval-data",
        s(&held),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--threads",
        "1",
        "--calibration-windows",
        "4",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("recovered"), "{stdout}");
    let m = LoadedModel::open(&pruned).expect("pruned model");
    let c = &m.config;
    // 4 heads over 2 KV heads at 50 %: one per group; 64 channels at 30 % → 32 (a multiple of 32).
    assert_eq!((c.num_attention_heads, c.num_key_value_heads, c.head_dim(), c.intermediate_size), (2, 2, 8, 32));
    assert!(c.num_params() < LlamaConfig::tiny().num_params());
    let size = |d: &Path| std::fs::metadata(d.join("model.safetensors")).expect("file").len();
    assert!(size(&pruned) < size(&teacher));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pruned.join("prune.json")).expect("prune.json")).expect("json");
    assert_eq!(report["plan"]["layers"].as_array().expect("layers").len(), 2);

    // It runs, quantizes and exports like any model.
    let (ok, _, stderr) =
        covey_model(&["generate", "--model", s(&pruned), "--prompt", "MACBETH.", "--max-new-tokens", "8"]);
    assert!(ok, "{stderr}");
    let gguf = dir.path().join("pruned.q8_0.gguf");
    let (ok, _, stderr) =
        covey_model(&["export", "--model", s(&pruned), "--format", "gguf", "--gguf-type", "q8_0", "--out", s(&gguf)]);
    assert!(ok, "{stderr}");
    let back = LoadedModel::open(&gguf).expect("GGUF re-import");
    assert_eq!(back.config.head_dim(), 8, "the head width travels as llama.attention.key_length");
    assert_eq!(back.config.num_attention_heads, 2);
    let ids: Vec<u32> = "Fair is foul".bytes().map(u32::from).collect();
    let a = m.engine(Precision::F32).expect("engine").logits(&ids).expect("logits");
    let b = back.engine(Precision::F32).expect("engine").logits(&ids).expect("logits");
    let worst = a.concat().iter().zip(b.concat()).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(worst < 0.05, "Q8_0 round trip moved a logit by {worst}");
    let onnx = dir.path().join("pruned.int8.onnx");
    let (ok, _, stderr) =
        covey_model(&["export", "--model", s(&pruned), "--format", "onnx", "--int8", "--out", s(&onnx)]);
    assert!(ok, "{stderr}");

    // A quantized model cannot be pruned; the error says what to do.
    let q = dir.path().join("int8");
    let (ok, _, stderr) = covey_model(&["quantize", "--model", s(&teacher), "--out", s(&q), "--precision", "int8"]);
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = covey_model(&[
        "prune",
        "--model",
        s(&q),
        "--out",
        s(&dir.path().join("x")),
        "--data",
        s(&train),
        "--eval-data",
        s(&held),
    ]);
    assert!(!ok && stderr.contains("prune an f32 model"), "{stderr}");
}
