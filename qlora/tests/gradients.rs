//! The hand-written backward pass against finite differences of the loss, on a tiny
//! model with grouped-query attention, a frozen adapter on top of the base, loss
//! weights, and int8 / int4 bases (the comparison with burn's autodiff lives in
//! covey-model, which links burn).

use std::collections::BTreeMap;

use covey_infer::{LlamaConfig, random_tensors};
use covey_qlora::{AdamW, Base, FrozenAdapter, HostBatch, LoraSpec, Trainer};
use covey_tensors::lora::{LoraTarget, frozen_a};
use covey_tensors::quant::{Int4Tensor, Int8Tensor, StoredTensor};
use covey_tensors::{HostTensor, NamedTensors};
use rand::{RngExt, SeedableRng};

fn config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 97,
        hidden_size: 64,
        intermediate_size: 96,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 32,
        ..LlamaConfig::tiny()
    }
}

fn random_b(a: &NamedTensors, config: &LlamaConfig, seed: u64, std: f32) -> NamedTensors {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    a.iter()
        .map(|(name, t)| {
            let target = LoraTarget::ALL.iter().copied().find(|x| name.contains(x.hf_name())).expect("target");
            let (_, d_out) = config.lora_dims(target);
            let r = t.shape[0];
            let data = (0..d_out * r).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * std).collect();
            (name.replace("lora_A", "lora_B"), HostTensor { shape: vec![d_out, r], data })
        })
        .collect()
}

fn batch(config: &LlamaConfig, weighted: bool) -> HostBatch {
    let (b, t) = (2, 12);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let ids: Vec<u32> = (0..b * (t + 1)).map(|_| rng.random_range(0..config.vocab_size as u32)).collect();
    let mut inputs = Vec::new();
    let mut targets = Vec::new();
    for s in 0..b {
        inputs.extend(&ids[s * (t + 1)..s * (t + 1) + t]);
        targets.extend(&ids[s * (t + 1) + 1..(s + 1) * (t + 1)]);
    }
    let weights = weighted.then(|| (0..b * t).map(|i| if i % 3 == 0 { 0.0 } else { 1.5 }).collect());
    HostBatch { batch: b, seq: t, inputs, targets, weights }
}

fn check(base: &Base, frozen: Option<FrozenAdapter<'_>>, weighted: bool) {
    check_factors(base, frozen, weighted, false);
}

/// Finite differences of the loss against the analytic gradient of every `B` (and of
/// every `A` with `train_a`), at three entries each.
fn check_factors(base: &Base, frozen: Option<FrozenAdapter<'_>>, weighted: bool, train_a: bool) {
    let config = base.config().clone();
    let targets = LoraTarget::ALL.to_vec();
    let spec = LoraSpec { rank: 3, scale: 2.0, targets: targets.clone(), train_a };
    let a = frozen_a(&random_tensors(&config, 1), 3, &targets, 11);
    let b = random_b(&a, &config, 12, 0.05);
    let hb = batch(&config, weighted);
    // The analytic gradient: one accumulate, then an SGD step of a known size reveals
    // it: with lr = 1, beta_1 = 0, beta_2 → use the grads through a step of plain form.
    let mut trainer = Trainer::new(base, &spec, &a, Some(&b), frozen).expect("trainer");
    trainer.accumulate(&hb, 1.0).expect("loss");
    let grads = if train_a { trainer.gradients_a() } else { trainer.gradients() };
    assert_eq!(trainer.gradients_a().is_empty(), !train_a);
    let mut checked = 0;
    let mut worst: f64 = 0.0;
    for (name, g) in &grads {
        for &i in &[0usize, 7, g.data.len() - 1] {
            let eps = 2e-2f32;
            let nudged = |delta: f32| {
                let (mut a2, mut b2) = (a.clone(), b.clone());
                let t = if train_a { &mut a2 } else { &mut b2 };
                t.get_mut(name).expect("factor").data[i] += delta;
                let mut t = Trainer::new(base, &spec, &a2, Some(&b2), frozen).expect("trainer");
                f64::from(t.accumulate(&hb, 1.0).expect("loss"))
            };
            let numeric = (nudged(eps) - nudged(-eps)) / (2.0 * f64::from(eps));
            let analytic = f64::from(g.data[i]);
            let err = (numeric - analytic).abs();
            worst = worst.max(err / (numeric.abs().max(analytic.abs()) + 1e-3));
            assert!(err <= 2e-3 + 0.03 * numeric.abs(), "{name}[{i}]: analytic {analytic}, numeric {numeric}");
            checked += 1;
        }
    }
    assert_eq!(checked, 3 * 7 * config.num_hidden_layers);
    eprintln!("checked {checked} derivatives, worst relative error {worst:.2e}");
}

#[test]
fn gradients_match_finite_differences_on_an_f32_base() {
    let config = config();
    let base = Base::from_tensors(&config, &random_tensors(&config, 3)).expect("base");
    check(&base, None, false);
    check(&base, None, true);
}

#[test]
fn a_gradients_match_finite_differences_when_a_trains() {
    let config = config();
    let base = Base::from_tensors(&config, &random_tensors(&config, 3)).expect("base");
    check_factors(&base, None, true, true);
    // Per-example clipping is for B alone.
    let spec = LoraSpec { rank: 2, scale: 1.0, targets: vec![LoraTarget::Q], train_a: true };
    let a = frozen_a(&random_tensors(&config, 3), 2, &spec.targets, 1);
    let mut t = Trainer::new(&base, &spec, &a, None, None).expect("trainer");
    assert!(t.set_example_clip(Some(1.0)).is_err());
}

#[test]
fn gradients_match_finite_differences_with_a_frozen_adapter_on_a_quantized_base() {
    let config = config();
    let weights = random_tensors(&config, 3);
    let stored: BTreeMap<String, StoredTensor> = weights
        .iter()
        .map(|(n, t)| {
            let s = if t.shape.len() == 2 && n.contains("mlp") {
                StoredTensor::Int4(Int4Tensor::quantize(t).expect("int4"))
            } else if t.shape.len() == 2 {
                StoredTensor::Int8(Int8Tensor::quantize(t).expect("int8"))
            } else {
                StoredTensor::F32(t.clone())
            };
            (n.clone(), s)
        })
        .collect();
    let base = Base::from_stored(&config, stored).expect("base");
    let fa = frozen_a(&weights, 5, &[LoraTarget::Q, LoraTarget::Down], 21);
    let fb = random_b(&fa, &config, 22, 0.1);
    check(&base, Some(FrozenAdapter { a: &fa, b: &fb, scale: 0.7 }), true);
}

#[test]
fn training_lowers_the_loss_and_a_frozen_adapter_equals_a_merged_base() {
    let config = config();
    let weights = random_tensors(&config, 4);
    let targets = vec![LoraTarget::Q, LoraTarget::V];
    let spec = LoraSpec { rank: 4, scale: 4.0, targets: targets.clone(), train_a: false };
    let a = frozen_a(&weights, 4, &targets, 9);
    let hb = batch(&config, false);
    // A frozen adapter held apart gives the loss of the base with it merged in.
    let fa = frozen_a(&weights, 8, &targets, 10);
    let fb = random_b(&fa, &config, 13, 0.2);
    let mut merged = weights.clone();
    let mut factors = fa.clone();
    factors.extend(fb.clone());
    covey_tensors::lora::merge(&mut merged, &factors, 0.5).expect("merge");
    let apart = Base::from_tensors(&config, &weights).expect("base");
    let folded = Base::from_tensors(&config, &merged).expect("base");
    let with_frozen = Trainer::new(&apart, &spec, &a, None, Some(FrozenAdapter { a: &fa, b: &fb, scale: 0.5 }))
        .expect("trainer")
        .accumulate(&hb, 1.0)
        .expect("loss");
    let with_merged =
        Trainer::new(&folded, &spec, &a, None, None).expect("trainer").accumulate(&hb, 1.0).expect("loss");
    assert!((with_frozen - with_merged).abs() < 1e-4, "{with_frozen} vs {with_merged}");
    // Training lowers the loss on the batch it sees.
    let mut t = Trainer::new(&apart, &spec, &a, None, None).expect("trainer");
    let opt = AdamW { beta_1: 0.9, beta_2: 0.95, epsilon: 1e-8, weight_decay: 0.01 };
    let first = t.accumulate(&hb, 1.0).expect("loss");
    for _ in 0..30 {
        t.step(1e-2, &opt);
        t.zero_grad();
        t.accumulate(&hb, 1.0).expect("loss");
    }
    let last = t.accumulate(&hb, 1.0).expect("loss");
    assert!(last < first - 0.1, "{first} -> {last}");
}

#[test]
fn bad_inputs_are_refused_with_a_clear_error() {
    let config = config();
    let weights = random_tensors(&config, 4);
    let base = Base::from_tensors(&config, &weights).expect("base");
    let spec = LoraSpec { rank: 4, scale: 4.0, targets: vec![LoraTarget::Q], train_a: false };
    let a = frozen_a(&weights, 4, &spec.targets, 9);
    // A of another rank.
    let other = frozen_a(&weights, 2, &spec.targets, 9);
    let e = Trainer::new(&base, &spec, &other, None, None).expect_err("rank");
    assert!(e.to_string().contains("lora_A"), "{e}");
    // A token outside the vocabulary.
    let mut t = Trainer::new(&base, &spec, &a, None, None).expect("trainer");
    let hb = HostBatch { batch: 1, seq: 2, inputs: vec![1, 500], targets: vec![2, 3], weights: None };
    assert!(t.accumulate(&hb, 1.0).expect_err("token").to_string().contains("500"));
    // A missing base weight.
    let mut w = weights.clone();
    w.remove("model.layers.1.mlp.up_proj.weight");
    let e = Base::from_tensors(&config, &w).expect_err("missing");
    assert!(e.to_string().contains("model.layers.1.mlp.up_proj.weight"), "{e}");
}

#[test]
fn keeping_activations_gives_the_same_gradients_as_recomputing_them() {
    let config = config();
    let weights = random_tensors(&config, 6);
    let base = Base::from_tensors(&config, &weights).expect("base");
    let spec = LoraSpec { rank: 4, scale: 2.0, targets: LoraTarget::ALL.to_vec(), train_a: false };
    let a = frozen_a(&weights, 4, &spec.targets, 2);
    let b = random_b(&a, &config, 3, 0.1);
    let hb = batch(&config, true);
    let run = |budget: usize| {
        let mut t = Trainer::new(&base, &spec, &a, Some(&b), None).expect("trainer");
        t.set_activation_budget(budget);
        let loss = t.accumulate(&hb, 1.0).expect("loss");
        (loss, t.gradients(), t.kept_layers())
    };
    let (loss, grads, kept) = run(0);
    assert_eq!(kept, 0);
    for budget in [1 << 20, usize::MAX] {
        let (l, g, k) = run(budget);
        assert!(k > 0, "a budget of {budget} bytes keeps a layer");
        assert_eq!((l, &g), (loss, &grads), "kept {k} layers");
    }
}

#[test]
fn per_example_clipping_equals_clipping_each_example_alone() {
    let config = config();
    let weights = random_tensors(&config, 8);
    let base = Base::from_tensors(&config, &weights).expect("base");
    let spec =
        LoraSpec { rank: 4, scale: 2.0, targets: vec![LoraTarget::Q, LoraTarget::V, LoraTarget::Down], train_a: false };
    let a = frozen_a(&weights, 4, &spec.targets, 2);
    let b = random_b(&a, &config, 3, 0.1);
    let hb = batch(&config, false);
    let t = hb.seq;
    // Each example alone: the gradient of its own mean loss.
    let alone: Vec<NamedTensors> = (0..hb.batch)
        .map(|i| {
            let one = HostBatch {
                batch: 1,
                seq: t,
                inputs: hb.inputs[i * t..(i + 1) * t].to_vec(),
                targets: hb.targets[i * t..(i + 1) * t].to_vec(),
                weights: None,
            };
            let mut tr = Trainer::new(&base, &spec, &a, Some(&b), None).expect("trainer");
            tr.accumulate(&one, 1.0).expect("loss");
            tr.gradients()
        })
        .collect();
    let norm = |g: &NamedTensors| covey_tensors::global_norm(g);
    let smallest = alone.iter().map(norm).fold(f64::INFINITY, f64::min);
    for clip in [1e6f32, (smallest * 0.5) as f32] {
        let mut tr = Trainer::new(&base, &spec, &a, Some(&b), None).expect("trainer");
        tr.set_example_clip(Some(clip)).expect("clip");
        tr.accumulate(&hb, 0.5).expect("loss");
        let got = tr.gradients();
        for (i, g) in alone.iter().enumerate() {
            let n = tr.last_example_norms()[i];
            assert!((n - norm(g)).abs() < 1e-4 * norm(g), "example {i}: norm {n} vs {}", norm(g));
        }
        for (name, t) in &got {
            for (j, &v) in t.data.iter().enumerate() {
                let want: f64 = alone
                    .iter()
                    .map(|g| f64::from(g[name].data[j]) * (f64::from(clip) / norm(g)).min(1.0))
                    .sum::<f64>()
                    * 0.5
                    / hb.batch as f64;
                assert!(
                    (f64::from(v) - want).abs() < 1e-6 + 1e-4 * want.abs(),
                    "{name}[{j}]: {v} vs {want} (clip {clip})"
                );
            }
        }
    }
    // A clip that is not a positive number is refused.
    let mut tr = Trainer::new(&base, &spec, &a, Some(&b), None).expect("trainer");
    assert!(tr.set_example_clip(Some(f32::NAN)).is_err());
}
