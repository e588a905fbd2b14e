//! Behavioural tests of the model, LoRA, training, caching and checkpoints.

use std::path::Path;

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Int, Tensor, TensorData};

use crate::checkpoint::{self, HostTensor, NamedTensors};
use crate::data::Batcher;
use crate::llama::KvCache;
use crate::train::{TrainConfig, clip_global_norm, global_grad_norm, lm_loss, train};
use crate::{Llama, LlamaConfig, LoraConfig, LoraTarget, Tokenizer, cpu_device};

fn tokens(seq: &[u32]) -> Tensor<2, Int> {
    let v: Vec<i64> = seq.iter().map(|&t| t as i64).collect();
    Tensor::from_data(TensorData::new(v, [1, seq.len()]), &cpu_device())
}

fn host(t: Tensor<3>) -> Vec<f32> {
    t.into_data().try_into_vec::<f32>().expect("f32")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn corpus() -> Vec<u32> {
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer \
     the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. "
        .repeat(20)
        .bytes()
        .map(u32::from)
        .collect()
}

fn all_lora() -> LoraConfig {
    LoraConfig { rank: 4, alpha: 8.0, targets: LoraTarget::ALL.to_vec(), seed: 3, ..LoraConfig::default() }
}

fn quick_train(model: Llama, steps: usize) -> Llama {
    let device = cpu_device().autodiff();
    let mut batcher = Batcher::new(corpus(), 32, 1, Path::new("test")).expect("batcher");
    let cfg = TrainConfig { steps, batch_size: 4, seq_len: 32, warmup_steps: 2, lr: 1e-2, ..TrainConfig::default() };
    train(model, &mut batcher, &cfg, &device, |_, _| {}).expect("train").0
}

#[test]
fn lora_with_zero_b_gives_exactly_the_base_logits() {
    let device = cpu_device();
    let base = Llama::init(&LlamaConfig::tiny(), 1, &device).expect("init");
    let x = tokens(&[1, 50, 99, 200, 7, 7, 31]);
    let expected = host(base.forward(x.clone()));
    let tuned = base.with_lora(&all_lora(), &device).expect("lora");
    assert_eq!(host(tuned.forward(x)), expected);
}

#[test]
fn twenty_lora_steps_move_only_the_adapters() {
    let device = cpu_device().autodiff();
    let model =
        Llama::init(&LlamaConfig::tiny(), 2, &device).expect("init").with_lora(&all_lora(), &device).expect("lora");
    let base_before = checkpoint::base_tensors(&model);
    let adapters_before = checkpoint::adapter_tensors(&model).expect("adapters");
    let trained = quick_train(model, 20);
    let base_after = checkpoint::base_tensors(&trained);
    for (name, before) in &base_before {
        let after = &base_after[name];
        let same_bits = before.data.iter().zip(&after.data).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same_bits, "base tensor {name} changed");
    }
    let adapters_after = checkpoint::adapter_tensors(&trained).expect("adapters");
    assert_eq!(adapters_after.len(), 2 * 7 * LlamaConfig::tiny().num_hidden_layers);
    for (name, before) in &adapters_before {
        assert_ne!(before.data, adapters_after[name].data, "adapter tensor {name} did not change");
    }
}

#[test]
fn ffa_lora_never_changes_a() {
    let device = cpu_device().autodiff();
    let lora = LoraConfig { ffa: true, ..all_lora() };
    let model = Llama::init(&LlamaConfig::tiny(), 2, &device).expect("init").with_lora(&lora, &device).expect("lora");
    let before = checkpoint::adapter_tensors(&model).expect("adapters");
    let trained = quick_train(model, 10);
    let after = checkpoint::adapter_tensors(&trained).expect("adapters");
    for (name, t) in &before {
        if name.contains("lora_A") {
            assert_eq!(t, &after[name], "{name} changed under FFA-LoRA");
        } else {
            assert_ne!(t, &after[name], "{name} did not train");
        }
    }
    // Two clients with the same LoRA seed start from the same A.
    let other = Llama::init(&LlamaConfig::tiny(), 9, &device).expect("init").with_lora(&lora, &device).expect("lora");
    let other = checkpoint::adapter_tensors(&other).expect("adapters");
    assert!(before.keys().filter(|k| k.contains("lora_A")).all(|k| before[k] == other[k]));
}

#[test]
fn merged_model_matches_the_adapter_model() {
    let device = cpu_device().autodiff();
    let model =
        Llama::init(&LlamaConfig::tiny(), 4, &device).expect("init").with_lora(&all_lora(), &device).expect("lora");
    let trained = quick_train(model, 8).valid();
    let x = tokens(&[10, 20, 30, 40, 50, 60, 70, 80]);
    let with_adapter = host(trained.forward(x.clone()));
    let merged = trained.merge_lora();
    assert!(merged.lora.is_none());
    let diff = max_abs_diff(&host(merged.forward(x)), &with_adapter);
    assert!(diff < 1e-4, "merged differs by {diff}");
}

#[test]
fn kv_cache_decoding_matches_full_recomputation() {
    let device = cpu_device();
    let model = Llama::init(&LlamaConfig::tiny(), 5, &device).expect("init");
    let seq: Vec<u32> = (0..24).map(|i| (i * 37 % 256) as u32).collect();
    let full = host(model.forward(tokens(&seq)));
    let vocab = model.config.vocab_size;
    let mut cache = KvCache::new();
    // A prompt of 10 tokens, then one token at a time.
    let mut got = host(model.forward_cached(tokens(&seq[..10]), &mut cache));
    for &t in &seq[10..] {
        got.extend(host(model.forward_cached(tokens(&[t]), &mut cache)));
    }
    assert_eq!(cache.len(), seq.len());
    assert_eq!(got.len(), seq.len() * vocab);
    let diff = max_abs_diff(&got, &full);
    assert!(diff < 1e-4, "cached logits differ by {diff}");
}

#[test]
fn training_reduces_the_loss() {
    let device = cpu_device().autodiff();
    let model = Llama::init(&LlamaConfig::tiny(), 6, &device).expect("init");
    let mut batcher = Batcher::new(corpus(), 32, 2, Path::new("test")).expect("batcher");
    let cfg =
        TrainConfig { steps: 40, batch_size: 4, seq_len: 32, warmup_steps: 4, lr: 1e-2, ..TrainConfig::default() };
    let (_, report) = train(model, &mut batcher, &cfg, &device, |_, _| {}).expect("train");
    let first = report.steps[0].loss;
    let last = report.steps.last().expect("steps").loss;
    assert!((first - (256f32).ln()).abs() < 0.3, "initial loss {first} is not ≈ ln 256");
    assert!(last < 0.6 * first, "loss went from {first} to {last}");
}

#[test]
fn training_is_reproducible_with_a_seed() {
    let device = cpu_device().autodiff();
    let run = || {
        let model =
            Llama::init(&LlamaConfig::tiny(), 7, &device).expect("init").with_lora(&all_lora(), &device).expect("lora");
        checkpoint::adapter_tensors(&quick_train(model, 3)).expect("adapters")
    };
    assert_eq!(run(), run());
}

#[test]
fn global_norm_clipping_bounds_the_whole_gradient() {
    let device = cpu_device().autodiff();
    let model = Llama::init(&LlamaConfig::tiny(), 8, &device).expect("init");
    let mut batcher = Batcher::new(corpus(), 16, 0, Path::new("test")).expect("batcher");
    let (x, y) = batcher.next_batch(2, &device);
    let loss = lm_loss(model.forward(x), y);
    let mut grads = GradientsParams::from_grads(loss.backward(), &model);
    let norm = global_grad_norm(&model, &grads);
    assert!(norm > 0.01, "{norm}");
    let before = clip_global_norm(&model, &mut grads, norm / 4.0);
    assert!((before - norm).abs() < 1e-9);
    let after = global_grad_norm(&model, &grads);
    assert!((after - norm / 4.0).abs() < 1e-4 * norm, "{after} vs {}", norm / 4.0);
}

#[test]
fn base_checkpoint_round_trips_exactly() {
    let device = cpu_device();
    let config = LlamaConfig { tie_word_embeddings: false, ..LlamaConfig::tiny() };
    let model = Llama::init(&config, 9, &device).expect("init");
    let dir = tempfile::tempdir().expect("tempdir");
    checkpoint::save_model(&model, &Tokenizer::Bytes, dir.path()).expect("save");
    let loaded = checkpoint::load_model(dir.path(), &device).expect("load");
    assert_eq!(loaded.config, config);
    assert_eq!(checkpoint::base_tensors(&loaded), checkpoint::base_tensors(&model));
    let x = tokens(&[3, 1, 4, 1, 5, 9, 2, 6]);
    assert_eq!(host(loaded.forward(x.clone())), host(model.forward(x)));
    // Hugging Face layout: q_proj.weight is [out, in].
    let t = checkpoint::read_safetensors(&dir.path().join(checkpoint::MODEL_FILE)).expect("read");
    assert_eq!(t["model.layers.0.self_attn.k_proj.weight"].shape, vec![config.kv_dim(), config.hidden_size]);
    assert_eq!(t["lm_head.weight"].shape, vec![config.vocab_size, config.hidden_size]);
}

#[test]
fn int8_quantized_model_file_loads_close_to_the_f32_model() {
    let device = cpu_device();
    let config = LlamaConfig { tie_word_embeddings: false, ..LlamaConfig::tiny() };
    let model = Llama::init(&config, 16, &device).expect("init");
    let dir = tempfile::tempdir().expect("tempdir");
    checkpoint::save_model(&model, &Tokenizer::Bytes, dir.path()).expect("save");
    let bytes = covey_tensors::quant::encode_int8(&checkpoint::base_tensors(&model), Default::default()).expect("int8");
    let path = dir.path().join(checkpoint::MODEL_FILE);
    assert!(bytes.len() < std::fs::metadata(&path).expect("size").len() as usize / 2);
    std::fs::write(&path, bytes).expect("write");
    let loaded = checkpoint::load_model(dir.path(), &device).expect("load int8");
    let x = tokens(&[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]);
    let (q, f) = (host(loaded.forward(x.clone())), host(model.forward(x)));
    let diff = max_abs_diff(&q, &f);
    assert!(diff > 0.0, "int8 logits are bit-identical to f32: not quantized?");
    assert!(diff < 5e-2, "int8 logits differ by {diff}");
    // Norms stay f32.
    let t = checkpoint::read_safetensors(&path).expect("read");
    assert_eq!(t["model.norm.weight"], checkpoint::base_tensors(&model)["model.norm.weight"]);
}

#[test]
fn peft_adapter_round_trips_exactly() {
    let device = cpu_device().autodiff();
    let base = Llama::init(&LlamaConfig::tiny(), 10, &device).expect("init");
    let lora = LoraConfig { targets: vec![LoraTarget::Q, LoraTarget::V, LoraTarget::Down], ..all_lora() };
    let trained = quick_train(base.clone().with_lora(&lora, &device).expect("lora"), 5);
    let dir = tempfile::tempdir().expect("tempdir");
    checkpoint::save_adapter(&trained, dir.path(), Some("covey-base")).expect("save");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("adapter_config.json")).expect("read"))
            .expect("json");
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["target_modules"], serde_json::json!(["q_proj", "v_proj", "down_proj"]));
    let t = checkpoint::read_safetensors(&dir.path().join(checkpoint::ADAPTER_FILE)).expect("read");
    let a = &t["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"];
    let b = &t["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"];
    assert_eq!(a.shape, vec![4, LlamaConfig::tiny().intermediate_size]);
    assert_eq!(b.shape, vec![LlamaConfig::tiny().hidden_size, 4]);

    let loaded = checkpoint::load_adapter(base, dir.path(), &device).expect("load");
    assert_eq!(loaded.lora.as_ref(), Some(&lora));
    assert_eq!(checkpoint::adapter_tensors(&loaded).expect("a"), checkpoint::adapter_tensors(&trained).expect("b"));
    let x = tokens(&[5, 6, 7, 8]);
    assert_eq!(host(loaded.valid().forward(x.clone())), host(trained.valid().forward(x)));
}

#[test]
fn truncated_or_malformed_safetensors_get_a_clear_error() {
    let device = cpu_device();
    let model = Llama::init(&LlamaConfig::tiny(), 11, &device).expect("init");
    let dir = tempfile::tempdir().expect("tempdir");
    checkpoint::save_model(&model, &Tokenizer::Bytes, dir.path()).expect("save");
    let path = dir.path().join(checkpoint::MODEL_FILE);
    let bytes = std::fs::read(&path).expect("read");

    std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("truncate");
    let err = checkpoint::load_model(dir.path(), &device).expect_err("truncated").to_string();
    assert!(err.contains("model.safetensors") && err.contains("not a valid safetensors"), "{err}");

    std::fs::write(&path, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").expect("garbage");
    let err = checkpoint::load_model(dir.path(), &device).expect_err("garbage").to_string();
    assert!(err.contains("model.safetensors"), "{err}");

    std::fs::write(&path, []).expect("empty");
    assert!(checkpoint::load_model(dir.path(), &device).is_err());
}

#[test]
fn checkpoint_with_wrong_shapes_or_missing_tensors_is_refused() {
    let device = cpu_device();
    let model = Llama::init(&LlamaConfig::tiny(), 12, &device).expect("init");
    let mut t: NamedTensors = checkpoint::base_tensors(&model);
    let path = Path::new("bad.safetensors");
    t.insert("model.norm.weight".into(), HostTensor { shape: vec![7], data: vec![1.0; 7] });
    let err = checkpoint::from_base_tensors(&model.config, &t, path, &device).expect_err("shape").to_string();
    assert!(err.contains("bad.safetensors") && err.contains("model.norm.weight") && err.contains("[7]"), "{err}");
    t.remove("model.norm.weight");
    let err = checkpoint::from_base_tensors(&model.config, &t, path, &device).expect_err("missing").to_string();
    assert!(err.contains("missing tensor `model.norm.weight`"), "{err}");
    let mut t = checkpoint::base_tensors(&model);
    if let Some(w) = t.get_mut("model.embed_tokens.weight") {
        w.data[3] = f32::NAN;
    }
    let err = checkpoint::from_base_tensors(&model.config, &t, path, &device).expect_err("nan").to_string();
    assert!(err.contains("non-finite"), "{err}");
}

#[test]
fn greedy_generation_is_deterministic_and_uses_the_cache_consistently() {
    let device = cpu_device();
    let model = Llama::init(&LlamaConfig::tiny(), 13, &device).expect("init");
    let cfg = crate::SamplingConfig { max_new_tokens: 12, temperature: 0.0, ..crate::SamplingConfig::default() };
    let prompt = [72u32, 101, 108, 108, 111];
    let a = crate::generate::generate(&model, &prompt, &cfg, None, &device).expect("gen");
    let b = crate::generate::generate(&model, &prompt, &cfg, None, &device).expect("gen");
    assert_eq!(a, b);
    assert_eq!(a.len(), 12);
    // Greedy decoding equals repeated argmax over full recomputation.
    let mut seq = prompt.to_vec();
    for &expected in &a {
        let logits = host(model.forward(tokens(&seq)));
        let v = model.config.vocab_size;
        let last = &logits[(seq.len() - 1) * v..];
        let argmax =
            last.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0;
        assert_eq!(argmax as u32, expected);
        seq.push(expected);
    }
}

#[test]
fn data_parallel_shards_give_the_same_training_as_one_thread() {
    let device = cpu_device().autodiff();
    let run = |threads: usize| {
        let model = Llama::init(&LlamaConfig::tiny(), 14, &device).expect("init");
        let mut batcher = Batcher::new(corpus(), 16, 3, Path::new("test")).expect("batcher");
        let cfg =
            TrainConfig { steps: 3, batch_size: 5, seq_len: 16, warmup_steps: 1, threads, ..TrainConfig::default() };
        let (m, report) = train(model, &mut batcher, &cfg, &device, |_, _| {}).expect("train");
        (checkpoint::base_tensors(&m), report.steps.iter().map(|s| s.loss).collect::<Vec<_>>())
    };
    let (a, la) = run(1);
    let (b, lb) = run(2);
    for (x, y) in la.iter().zip(&lb) {
        assert!((x - y).abs() < 1e-4, "losses {la:?} vs {lb:?}");
    }
    for (name, t) in &a {
        let diff = t.data.iter().zip(&b[name].data).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(diff < 1e-4, "{name} differs by {diff}");
    }
}

/// Runs on wgpu when built with `--features gpu` and `COVEY_GPU_TESTS=1` is set (a
/// machine with a Vulkan/Metal/DX12 adapter, or Mesa's lavapipe); skipped otherwise.
#[cfg(feature = "gpu")]
#[test]
fn gpu_forward_and_lora_training_match_the_cpu() {
    if std::env::var_os("COVEY_GPU_TESTS").is_none() {
        eprintln!("skipped: set COVEY_GPU_TESTS=1 to run the wgpu test");
        return;
    }
    let cpu = cpu_device();
    let gpu = crate::gpu_device();
    let model = Llama::init(&LlamaConfig::tiny(), 15, &cpu).expect("init");
    let dir = tempfile::tempdir().expect("tempdir");
    checkpoint::save_model(&model, &Tokenizer::Bytes, dir.path()).expect("save");
    let on_gpu = checkpoint::load_model(dir.path(), &gpu).expect("load on gpu");
    let seq: Vec<i64> = (0..20).map(|i| (i * 13 % 256) as i64).collect();
    let x_cpu = Tensor::<2, Int>::from_data(TensorData::new(seq.clone(), [1, 20]), &cpu);
    let x_gpu = Tensor::<2, Int>::from_data(TensorData::new(seq, [1, 20]), &gpu);
    let diff = max_abs_diff(&host(model.forward(x_cpu)), &host(on_gpu.forward(x_gpu)));
    assert!(diff < 1e-3, "gpu logits differ by {diff}");
    // A few LoRA steps on the GPU move only the adapters.
    let ad = gpu.autodiff();
    let m = checkpoint::load_model(dir.path(), &ad).expect("load").with_lora(&all_lora(), &ad).expect("lora");
    let before = checkpoint::base_tensors(&m);
    let mut batcher = Batcher::new(corpus(), 16, 1, Path::new("test")).expect("batcher");
    let cfg = TrainConfig { steps: 3, batch_size: 2, seq_len: 16, warmup_steps: 1, ..TrainConfig::default() };
    let (m, report) = train(m, &mut batcher, &cfg, &ad, |_, _| {}).expect("train");
    assert!(report.steps.iter().all(|s| s.loss.is_finite()));
    assert_eq!(checkpoint::base_tensors(&m), before);
}
fn logits_rows(model: &Llama, ids: &[u32]) -> Vec<Vec<f32>> {
    let device = cpu_device();
    let v: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(v, [1, ids.len()]), &device);
    let out = checkpoint::host_tensor(model.forward(tokens));
    out.data.chunks(model.config.vocab_size).map(<[f32]>::to_vec).collect()
}

#[test]
fn the_inference_engine_computes_what_the_burn_model_computes() {
    let device = cpu_device();
    let config = LlamaConfig { tie_word_embeddings: false, ..LlamaConfig::tiny() };
    let model = Llama::init(&config, 5, &device).expect("init");
    let ids = [3u32, 250, 17, 17, 99, 0, 128];
    let want = logits_rows(&model, &ids);
    let engine = covey_infer::Model::from_tensors(config, &checkpoint::base_tensors(&model), crate::Precision::F32)
        .expect("engine");
    let got = engine.logits(&ids).expect("logits");
    for (p, (a, b)) in got.iter().zip(&want).enumerate() {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-4, "position {p}: engine {x} vs burn {y}");
        }
    }
}

#[test]
fn qlora_trains_adapters_on_a_quantized_base_and_leaves_it_untouched() {
    let device = cpu_device().autodiff();
    let config = LlamaConfig::tiny();
    let lora = LoraConfig { rank: 4, ..LoraConfig::default() };
    let f32_model = Llama::init(&config, 9, &device).expect("init").with_lora(&lora, &device).expect("lora");
    let ids: Vec<u32> = (0..64).map(|i| (i * 7 % 50) as u32).collect();
    let before = logits_rows(&f32_model.clone().valid(), &ids);
    for bits in [8u8, 4] {
        let model = f32_model.clone().quantize_base(bits).expect("quantize");
        let q = logits_rows(&model.clone().valid(), &ids);
        let err = q.iter().flatten().zip(before.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(err > 0.0 && err < if bits == 8 { 0.02 } else { 0.3 }, "{bits}-bit base: max logit change {err}");
        let base_before = checkpoint::base_tensors(&model);
        let mut batcher = Batcher::new(ids.repeat(8), 16, 0, Path::new("qlora")).expect("batcher");
        let tc =
            TrainConfig { steps: 4, batch_size: 4, seq_len: 16, lr: 1e-2, warmup_steps: 1, ..TrainConfig::default() };
        let (trained, report) = train(model, &mut batcher, &tc, &device, |_, _| {}).expect("train");
        assert!(report.steps.last().is_some_and(|s| s.loss.is_finite()));
        let b_norm: f64 = checkpoint::adapter_tensors(&trained)
            .expect("adapters")
            .iter()
            .filter(|(n, _)| n.contains("lora_B"))
            .map(|(_, t)| t.l2_norm())
            .sum();
        assert!(b_norm > 0.0, "{bits}-bit: the adapters moved");
        assert_eq!(checkpoint::base_tensors(&trained), base_before, "{bits}-bit: the quantized base is frozen");
    }
}

/// A model directory written by `covey-artifact`'s exporter loads in burn, as trained.
#[test]
fn a_safetensors_export_loads_in_burn() {
    use covey_tensors::quant::StoredTensor;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = LlamaConfig { tie_word_embeddings: false, ..LlamaConfig::tiny() };
    let m = crate::LoadedModel {
        source: "tiny".into(),
        config: config.clone(),
        tensors: covey_infer::random_tensors(&config, 11).into_iter().map(|(n, t)| (n, StoredTensor::F32(t))).collect(),
        tokenizer: Tokenizer::Bytes,
        chat_template: None,
        special: Default::default(),
        description: "tiny".into(),
    };
    crate::export::export_safetensors(&m, dir.path()).expect("export");
    let burn = checkpoint::load_model(dir.path(), &cpu_device()).expect("burn loads it");
    assert_eq!(burn.config, config);
}
