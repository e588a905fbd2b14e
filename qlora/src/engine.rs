//! One training step: forward and backward of a Llama with LoRA on every configured
//! projection, written out by hand.
//!
//! Memory is what decides whether fine-tuning runs on a phone, so the step keeps little:
//! - **Layer recomputation.** The forward pass keeps only each layer's input
//!   (`[tokens, hidden]`); the backward pass runs each layer's forward again, keeping its
//!   activations for that layer only, then its backward.
//! - **Quantized base.** A layer's weights are decoded into one f32 scratch buffer when
//!   the layer runs (once in the forward pass, once for its recomputation and backward).
//! - **Chunked cross-entropy.** The logits are never materialised for the whole
//!   vocabulary: the head runs over blocks of vocabulary rows in one pass, with an online
//!   log-sum-exp and the softmax-weighted sum of the head's rows rescaled as the running
//!   maximum grows (as flash attention does), which gives the gradient without a
//!   second pass.
//! - Only `B` of the trained adapter receives a gradient (FFA-LoRA: `A` is frozen), so
//!   no base weight ever has a gradient buffer.

use covey_infer::LlamaConfig;
use covey_tensors::NamedTensors;
use covey_tensors::lora::LoraTarget;
use rayon::prelude::*;

use crate::adapter::{FrozenAdapter, LoraSpec, Slot, build_slots};
use crate::base::{Base, dequantize_rows, f32_view};
use crate::error::{Result, invalid};
use covey_infer::gemm::{Mat, MatMut, Threads, matmul};

/// Values in a block of logits (`tokens × vocabulary rows`): 2 Mi f32, 8 MiB.
const LOGIT_BLOCK_VALUES: usize = 1 << 21;

/// One micro-batch on the host: `batch` sequences of `seq` tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct HostBatch {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Input ids, `[batch, seq]` row-major.
    pub inputs: Vec<u32>,
    /// Next-token targets, `[batch, seq]`.
    pub targets: Vec<u32>,
    /// Per-target loss weights averaging 1 (0: not learned); `None`: all 1.
    pub weights: Option<Vec<f32>>,
}

/// AdamW's constants.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    /// First-moment decay.
    pub beta_1: f32,
    /// Second-moment decay.
    pub beta_2: f32,
    /// Added to the root of the second moment.
    pub epsilon: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
}

#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    t: usize,
    n: usize,
    d: usize,
    qd: usize,
    kvd: usize,
    f: usize,
    h: usize,
    kvh: usize,
    hd: usize,
}

impl Dims {
    fn new(c: &LlamaConfig, b: usize, t: usize) -> Self {
        Self {
            b,
            t,
            n: b * t,
            d: c.hidden_size,
            qd: c.q_dim(),
            kvd: c.kv_dim(),
            f: c.intermediate_size,
            h: c.num_attention_heads,
            kvh: c.num_key_value_heads,
            hd: c.head_dim(),
        }
    }
}

/// One layer's activations, recomputed in the backward pass.
#[derive(Default)]
struct Acts {
    h1: Vec<f32>,
    rstd1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    p: Vec<f32>,
    heads: Vec<f32>,
    o: Vec<f32>,
    xmid: Vec<f32>,
    h2: Vec<f32>,
    rstd2: Vec<f32>,
    g: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
    /// `x · Aᵀ` of the trained adapter of each projection, `[tokens, r]`.
    u: [Vec<f32>; 7],
    tmp: Vec<f32>,
}

/// Gradient buffers of one layer's backward pass.
#[derive(Default)]
struct Back {
    dx: Vec<f32>,
    dxmid: Vec<f32>,
    dh: Vec<f32>,
    dact: Vec<f32>,
    dg: Vec<f32>,
    dup: Vec<f32>,
    dout: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    dqh: Vec<f32>,
    dkh: Vec<f32>,
    dvh: Vec<f32>,
}

/// Everything a step allocates, kept between steps of the same shape.
#[derive(Default)]
struct Work {
    dims: Option<(usize, usize)>,
    xs: Vec<Vec<f32>>,
    x_tmp: Vec<f32>,
    acts: Acts,
    /// Activations kept from the forward pass for layers `first_kept..`.
    kept: Vec<Acts>,
    first_kept: usize,
    back: Back,
    hf: Vec<f32>,
    rstd_f: Vec<f32>,
    dhf: Vec<f32>,
    logits: Vec<f32>,
    head_rows: Vec<f32>,
    weights: [Vec<f32>; 7],
    cos: Vec<f32>,
    sin: Vec<f32>,
}

fn sized(v: &mut Vec<f32>, len: usize) {
    v.clear();
    v.resize(len, 0.0);
}

/// LoRA training of `B` on a frozen base. Build one per round; call
/// [`Trainer::accumulate`] for each micro-batch, then [`Trainer::step`].
pub struct Trainer<'b> {
    base: &'b Base,
    spec: LoraSpec,
    slots: Vec<[Slot; 7]>,
    grads: Vec<[Vec<f32>; 7]>,
    m: Vec<[Vec<f32>; 7]>,
    v: Vec<[Vec<f32>; 7]>,
    /// Gradients and AdamW moments of `A` (empty unless `spec.train_a`).
    grads_a: Vec<[Vec<f32>; 7]>,
    m_a: Vec<[Vec<f32>; 7]>,
    v_a: Vec<[Vec<f32>; 7]>,
    time: i32,
    activation_budget: usize,
    /// DP-SGD: clip each example's gradient to this L2 norm.
    example_clip: Option<f32>,
    /// Per-example gradients of the current micro-batch, `[examples × out × r]` per `B`.
    per_example: Vec<[Vec<f32>; 7]>,
    last_example_norms: Vec<f64>,
    work: Work,
}

impl std::fmt::Debug for Trainer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer").field("spec", &self.spec).field("time", &self.time).finish_non_exhaustive()
    }
}

impl<'b> Trainer<'b> {
    /// A trainer of the adapter `spec` on `base`: `A = a` (frozen, PEFT names `[r, in]`),
    /// `B = b` or zero. `frozen` is the version's own adapter, applied on top of the
    /// base and never trained.
    pub fn new(
        base: &'b Base,
        spec: &LoraSpec,
        a: &NamedTensors,
        b: Option<&NamedTensors>,
        frozen: Option<FrozenAdapter<'_>>,
    ) -> Result<Self> {
        let slots = build_slots(&base.config, spec, a, b, frozen)?;
        let zeros = |slots: &[[Slot; 7]]| -> Vec<[Vec<f32>; 7]> {
            slots
                .iter()
                .map(|s| std::array::from_fn(|i| s[i].train.as_ref().map_or(Vec::new(), |t| vec![0.0; t.b.len()])))
                .collect()
        };
        let (grads, m, v) = (zeros(&slots), zeros(&slots), zeros(&slots));
        let zeros_a = |slots: &[[Slot; 7]]| -> Vec<[Vec<f32>; 7]> {
            slots
                .iter()
                .map(|s| {
                    std::array::from_fn(|i| match (&s[i].train, spec.train_a) {
                        (Some(t), true) => vec![0.0; t.a.len()],
                        _ => Vec::new(),
                    })
                })
                .collect()
        };
        let (grads_a, m_a, v_a) = (zeros_a(&slots), zeros_a(&slots), zeros_a(&slots));
        Ok(Self {
            base,
            spec: spec.clone(),
            slots,
            grads,
            m,
            v,
            grads_a,
            m_a,
            v_a,
            time: 0,
            activation_budget: 0,
            example_clip: None,
            per_example: Vec::new(),
            last_example_norms: Vec::new(),
            work: Work::default(),
        })
    }

    /// Let the activations of up to `bytes` worth of layers stay from the forward to the
    /// backward pass, so that those layers are not recomputed (a step of a layer kept
    /// costs two passes instead of three). 0, the default, recomputes every layer: the
    /// least memory.
    pub fn set_activation_budget(&mut self, bytes: usize) {
        self.activation_budget = bytes;
        self.work.dims = None;
    }

    /// DP-SGD: clip every example's gradient (over all `B` together) to L2 norm `clip`
    /// before it joins the batch's; `None` (the default) clips nothing. The noise is the
    /// caller's to add ([`Trainer::add_to_gradients`]).
    pub fn set_example_clip(&mut self, clip: Option<f32>) -> Result<()> {
        if let Some(c) = clip
            && !(c.is_finite() && c > 0.0)
        {
            return Err(invalid("example clip", format!("{c} is not a positive number")));
        }
        if clip.is_some() && self.spec.train_a {
            return Err(invalid("example clip", "per-example clipping trains B only (FFA-LoRA)"));
        }
        self.example_clip = clip;
        self.work.dims = None;
        Ok(())
    }

    /// The norms of the last micro-batch's per-example gradients, before clipping.
    pub fn last_example_norms(&self) -> &[f64] {
        &self.last_example_norms
    }

    /// Let `f` change every accumulated gradient buffer (DP-SGD's noise).
    pub fn add_to_gradients(&mut self, mut f: impl FnMut(&mut [f32])) {
        for g in self.grads.iter_mut().chain(self.grads_a.iter_mut()).flatten().filter(|g| !g.is_empty()) {
            f(g);
        }
    }

    /// Layers whose activations stay between the passes (known after the first step).
    pub fn kept_layers(&self) -> usize {
        self.work.kept.len()
    }

    /// The trained `B` factors, PEFT names, `[out, r]`.
    pub fn b_tensors(&self) -> NamedTensors {
        let mut out = NamedTensors::new();
        for (l, slots) in self.slots.iter().enumerate() {
            for (ti, s) in slots.iter().enumerate() {
                if let Some(t) = &s.train {
                    let (_, d_out) = self.base.config.lora_dims(LoraTarget::ALL[ti]);
                    out.insert(
                        LoraTarget::ALL[ti].peft_name(l, 'B'),
                        covey_tensors::HostTensor { shape: vec![d_out, t.rank], data: t.b.clone() },
                    );
                }
            }
        }
        out
    }

    /// The accumulated gradients of the `B` factors, PEFT `lora_B` names, `[out, r]`.
    pub fn gradients(&self) -> NamedTensors {
        let mut out = NamedTensors::new();
        for (l, (slots, grads)) in self.slots.iter().zip(&self.grads).enumerate() {
            for (ti, (s, g)) in slots.iter().zip(grads).enumerate() {
                if let Some(t) = &s.train {
                    let shape = vec![g.len() / t.rank, t.rank];
                    out.insert(
                        LoraTarget::ALL[ti].peft_name(l, 'B'),
                        covey_tensors::HostTensor { shape, data: g.clone() },
                    );
                }
            }
        }
        out
    }

    /// The `A` factors, PEFT names, `[r, in]` (trained when `spec.train_a`).
    pub fn a_tensors(&self) -> NamedTensors {
        let mut out = NamedTensors::new();
        for (l, slots) in self.slots.iter().enumerate() {
            for (ti, s) in slots.iter().enumerate() {
                if let Some(t) = &s.train {
                    let d_in = t.a.len() / t.rank;
                    out.insert(
                        LoraTarget::ALL[ti].peft_name(l, 'A'),
                        covey_tensors::HostTensor { shape: vec![t.rank, d_in], data: t.a.clone() },
                    );
                }
            }
        }
        out
    }

    /// The accumulated gradients of the `A` factors (empty unless `spec.train_a`).
    pub fn gradients_a(&self) -> NamedTensors {
        let mut out = NamedTensors::new();
        for (l, (slots, grads)) in self.slots.iter().zip(&self.grads_a).enumerate() {
            for (ti, (s, g)) in slots.iter().zip(grads).enumerate() {
                if let (Some(t), false) = (&s.train, g.is_empty()) {
                    let shape = vec![t.rank, g.len() / t.rank];
                    out.insert(
                        LoraTarget::ALL[ti].peft_name(l, 'A'),
                        covey_tensors::HostTensor { shape, data: g.clone() },
                    );
                }
            }
        }
        out
    }

    /// Forget the accumulated gradients.
    pub fn zero_grad(&mut self) {
        for g in self.grads.iter_mut().chain(self.grads_a.iter_mut()).flatten() {
            g.fill(0.0);
        }
    }

    /// Add the gradient of `(mu / 2) · Σ ||B||²` (FedProx, centred at `B = 0`).
    pub fn add_proximal(&mut self, mu: f32) {
        if mu == 0.0 {
            return;
        }
        for (gs, ss) in self.grads.iter_mut().zip(&self.slots) {
            for (g, s) in gs.iter_mut().zip(ss) {
                if let Some(t) = &s.train {
                    g.iter_mut().zip(&t.b).for_each(|(g, b)| *g += mu * b);
                }
            }
        }
    }

    /// L2 norm of all accumulated gradients together.
    pub fn grad_norm(&self) -> f64 {
        self.grads
            .iter()
            .chain(&self.grads_a)
            .flatten()
            .flat_map(|g| g.iter())
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt()
    }

    /// Multiply every gradient by `factor`.
    pub fn scale_grads(&mut self, factor: f32) {
        for g in self.grads.iter_mut().chain(self.grads_a.iter_mut()).flatten() {
            g.iter_mut().for_each(|x| *x *= factor);
        }
    }

    /// One AdamW update of every `B` with the accumulated gradients (burn's AdamW:
    /// bias-corrected moments, decoupled decay `B ← B · (1 − lr · decay)`).
    pub fn step(&mut self, lr: f64, opt: &AdamW) {
        self.time += 1;
        let (b1, b2) = (opt.beta_1, opt.beta_2);
        let c1 = 1.0 - b1.powi(self.time);
        let c2 = 1.0 - b2.powi(self.time);
        let decay = (1.0 - lr * f64::from(opt.weight_decay)) as f32;
        let lr = lr as f32;
        let adam = |p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]| {
            for i in 0..p.len() {
                m[i] = m[i] * b1 + g[i] * (1.0 - b1);
                v[i] = v[i] * b2 + g[i] * g[i] * (1.0 - b2);
                let update = (m[i] / c1) / ((v[i] / c2).sqrt() + opt.epsilon);
                p[i] = p[i] * decay - update * lr;
            }
        };
        for l in 0..self.slots.len() {
            for ti in 0..7 {
                let Some(t) = self.slots[l][ti].train.as_mut() else { continue };
                adam(&mut t.b, &self.grads[l][ti], &mut self.m[l][ti], &mut self.v[l][ti]);
                if !self.grads_a[l][ti].is_empty() {
                    adam(&mut t.a, &self.grads_a[l][ti], &mut self.m_a[l][ti], &mut self.v_a[l][ti]);
                }
            }
        }
    }

    /// Forward and backward of one micro-batch: returns its mean (weighted) next-token
    /// loss in nats, and adds `weight ×` its gradient to the accumulated gradients.
    pub fn accumulate(&mut self, batch: &HostBatch, weight: f32) -> Result<f32> {
        let c = &self.base.config;
        let (b, t) = (batch.batch, batch.seq);
        let n = b * t;
        if n == 0 || batch.inputs.len() != n || batch.targets.len() != n {
            return Err(invalid(
                "batch",
                format!("{} inputs and {} targets for {b} × {t}", batch.inputs.len(), batch.targets.len()),
            ));
        }
        if batch.weights.as_ref().is_some_and(|w| w.len() != n) {
            return Err(invalid("batch", "the loss weights do not match the batch"));
        }
        if t > c.max_position_embeddings {
            return Err(invalid(
                "seq_len",
                format!("{t} is longer than the model's {} positions", c.max_position_embeddings),
            ));
        }
        if let Some(&id) = batch.inputs.iter().chain(&batch.targets).find(|&&id| id as usize >= c.vocab_size) {
            return Err(invalid("batch", format!("token {id} is outside the vocabulary of {}", c.vocab_size)));
        }
        let dims = Dims::new(c, b, t);
        self.prepare(dims);
        let mut work = std::mem::take(&mut self.work);
        let loss = self.run(&mut work, dims, batch, weight);
        self.work = work;
        Ok(loss)
    }

    fn prepare(&mut self, dm: Dims) {
        let w = &mut self.work;
        if w.dims == Some((dm.b, dm.t)) {
            return;
        }
        let c = &self.base.config;
        let layers = c.num_hidden_layers;
        let max_r = self
            .slots
            .iter()
            .flatten()
            .flat_map(|s| [s.frozen.as_ref().map_or(0, |x| x.rank), s.train.as_ref().map_or(0, |x| x.rank)])
            .max()
            .unwrap_or(0);
        w.xs = (0..=layers).map(|_| vec![0.0; dm.n * dm.d]).collect();
        sized(&mut w.x_tmp, dm.n * dm.d);
        let train_ranks: [usize; 7] =
            std::array::from_fn(|ti| self.slots.first().and_then(|s| s[ti].train.as_ref()).map_or(0, |x| x.rank));
        size_acts(&mut w.acts, dm, max_r, &train_ranks);
        let per_layer = acts_bytes(&w.acts);
        let keep = (self.activation_budget / per_layer.max(1)).min(layers);
        w.first_kept = layers - keep;
        w.kept = (0..keep)
            .map(|_| {
                let mut a = Acts::default();
                size_acts(&mut a, dm, max_r, &train_ranks);
                a
            })
            .collect();
        let g = &mut w.back;
        for (v, len) in [
            (&mut g.dx, dm.n * dm.d),
            (&mut g.dxmid, dm.n * dm.d),
            (&mut g.dh, dm.n * dm.d),
            (&mut g.dact, dm.n * dm.f),
            (&mut g.dg, dm.n * dm.f),
            (&mut g.dup, dm.n * dm.f),
            (&mut g.dout, dm.n * dm.qd),
            (&mut g.dq, dm.n * dm.qd),
            (&mut g.dk, dm.n * dm.kvd),
            (&mut g.dv, dm.n * dm.kvd),
            (&mut g.dqh, dm.n * dm.qd),
            (&mut g.dkh, dm.n * dm.kvd),
            (&mut g.dvh, dm.n * dm.kvd),
        ] {
            sized(v, len);
        }
        sized(&mut w.hf, dm.n * dm.d);
        sized(&mut w.rstd_f, dm.n);
        sized(&mut w.dhf, dm.n * dm.d);
        let block = (LOGIT_BLOCK_VALUES / dm.n).clamp(64, c.vocab_size);
        sized(&mut w.logits, dm.n * block);
        if !matches!(self.base.head(), covey_infer::Weight::F32 { .. }) {
            sized(&mut w.head_rows, block * dm.d);
        }
        // RoPE tables as the burn model computes them: angles in f64.
        let half = dm.hd / 2;
        w.cos.clear();
        w.sin.clear();
        for pos in 0..dm.t {
            for i in 0..half {
                let inv_freq = 1.0 / c.rope_theta.powf((2 * i) as f64 / dm.hd as f64);
                let angle = pos as f64 * inv_freq;
                w.cos.push(angle.cos() as f32);
                w.sin.push(angle.sin() as f32);
            }
        }
        self.per_example = match self.example_clip {
            Some(_) => self.grads.iter().map(|gs| std::array::from_fn(|i| vec![0.0; gs[i].len() * dm.b])).collect(),
            None => Vec::new(),
        };
        self.work.dims = Some((dm.b, dm.t));
    }

    fn run(&mut self, w: &mut Work, dm: Dims, batch: &HostBatch, weight: f32) -> f32 {
        let base = self.base;
        let layers = base.layers.len();
        // Embedding lookup.
        let embed = &base.embed;
        w.xs[0].par_chunks_mut(dm.d).zip(&batch.inputs).for_each(|(row, &id)| embed.row_into(id as usize, row));
        // Forward, keeping only each layer's input.
        for l in 0..layers {
            let views = layer_views(base, l, &mut w.weights);
            let (done, rest) = w.xs.split_at_mut(l + 1);
            let acts = if l >= w.first_kept { &mut w.kept[l - w.first_kept] } else { &mut w.acts };
            self.layer_forward(l, &views, dm, &done[l], acts, &mut rest[0], &w.cos, &w.sin);
        }
        // Final norm and the chunked cross-entropy.
        rms_norm(&w.xs[layers], &base.norm, base.config.rms_norm_eps as f32, dm.d, &mut w.hf, &mut w.rstd_f);
        let head_weight = if self.example_clip.is_some() { 1.0 } else { weight };
        let loss = head_loss(base, dm, &w.hf, batch, head_weight, &mut w.logits, &mut w.head_rows, &mut w.dhf);
        w.back.dx.fill(0.0);
        rms_backward(&w.xs[layers], &w.rstd_f, &base.norm, &w.dhf, dm.d, &mut w.back.dx);
        // Backward, layer by layer, recomputing each layer's activations.
        for l in (0..layers).rev() {
            let views = layer_views(base, l, &mut w.weights);
            let acts = if l >= w.first_kept {
                &mut w.kept[l - w.first_kept]
            } else {
                self.layer_forward(l, &views, dm, &w.xs[l], &mut w.acts, &mut w.x_tmp, &w.cos, &w.sin);
                &mut w.acts
            };
            let (b, examples) = match self.example_clip {
                Some(_) => (&mut self.per_example[l], dm.b),
                None => (&mut self.grads[l], 1),
            };
            let sinks = Sinks { b, a: &mut self.grads_a[l], examples };
            layer_backward(base, &self.slots[l], l, &views, dm, &w.xs[l], acts, &mut w.back, sinks, &w.cos, &w.sin);
        }
        if let Some(clip) = self.example_clip {
            self.add_clipped_examples(dm.b, clip, weight);
        }
        loss
    }

    /// DP-SGD's per-example clipping: the batch gradient holds `(1 / b) Σ g_i` with `g_i`
    /// the gradient of example `i`'s own (mean) loss; each `g_i` is clipped to L2 norm
    /// `clip` over every `B` together, and `weight · (1 / b) Σ clip(g_i)` is added to the
    /// accumulated gradients.
    fn add_clipped_examples(&mut self, b: usize, clip: f32, weight: f32) {
        let norms: Vec<f64> = (0..b)
            .map(|i| {
                self.per_example
                    .iter()
                    .flatten()
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let len = p.len() / b;
                        p[i * len..(i + 1) * len].iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>()
                    })
                    .sum::<f64>()
                    .sqrt()
                    * b as f64
            })
            .collect();
        let factors: Vec<f32> = norms.iter().map(|&g| weight * (f64::from(clip) / g).min(1.0) as f32).collect();
        for (gs, ps) in self.grads.iter_mut().zip(&self.per_example) {
            for (g, p) in gs.iter_mut().zip(ps) {
                if g.is_empty() {
                    continue;
                }
                for (i, f) in factors.iter().enumerate() {
                    let part = &p[i * g.len()..(i + 1) * g.len()];
                    g.iter_mut().zip(part).for_each(|(g, x)| *g += f * x);
                }
            }
        }
        self.last_example_norms = norms;
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        l: usize,
        wv: &[&[f32]; 7],
        dm: Dims,
        x: &[f32],
        a: &mut Acts,
        x_out: &mut [f32],
        cos: &[f32],
        sin: &[f32],
    ) {
        let base = self.base;
        let lb = &base.layers[l];
        let slots = &self.slots[l];
        let eps = base.config.rms_norm_eps as f32;
        let (n, d, f) = (dm.n, dm.d, dm.f);
        rms_norm(x, &lb.attn_norm, eps, d, &mut a.h1, &mut a.rstd1);
        proj_forward(&slots[0], wv[0], &a.h1, n, d, dm.qd, &mut a.q, &mut a.u[0], &mut a.tmp);
        proj_forward(&slots[1], wv[1], &a.h1, n, d, dm.kvd, &mut a.k, &mut a.u[1], &mut a.tmp);
        proj_forward(&slots[2], wv[2], &a.h1, n, d, dm.kvd, &mut a.v, &mut a.u[2], &mut a.tmp);
        rope(&mut a.q, dm, dm.h, cos, sin, false);
        rope(&mut a.k, dm, dm.kvh, cos, sin, false);
        attention_forward(dm, &a.q, &a.k, &a.v, &mut a.p, &mut a.heads);
        from_heads(dm, dm.h, &a.heads, &mut a.o);
        proj_forward(&slots[3], wv[3], &a.o, n, dm.qd, d, &mut a.xmid, &mut a.u[3], &mut a.tmp);
        a.xmid.par_iter_mut().zip(x).for_each(|(m, x)| *m += x);
        rms_norm(&a.xmid, &lb.mlp_norm, eps, d, &mut a.h2, &mut a.rstd2);
        proj_forward(&slots[4], wv[4], &a.h2, n, d, f, &mut a.g, &mut a.u[4], &mut a.tmp);
        proj_forward(&slots[5], wv[5], &a.h2, n, d, f, &mut a.up, &mut a.u[5], &mut a.tmp);
        a.act.par_chunks_mut(f).zip(a.g.par_chunks(f).zip(a.up.par_chunks(f))).for_each(|(act, (g, up))| {
            for ((o, &g), &u) in act.iter_mut().zip(g).zip(up) {
                *o = g / (1.0 + (-g).exp()) * u;
            }
        });
        proj_forward(&slots[6], wv[6], &a.act, n, f, d, x_out, &mut a.u[6], &mut a.tmp);
        x_out.par_iter_mut().zip(&a.xmid).for_each(|(o, m)| *o += m);
    }
}

/// Size every buffer of `a` for a batch of shape `dm`.
fn size_acts(a: &mut Acts, dm: Dims, max_r: usize, train_ranks: &[usize; 7]) {
    for (v, len) in [
        (&mut a.h1, dm.n * dm.d),
        (&mut a.rstd1, dm.n),
        (&mut a.q, dm.n * dm.qd),
        (&mut a.k, dm.n * dm.kvd),
        (&mut a.v, dm.n * dm.kvd),
        (&mut a.p, dm.b * dm.h * dm.t * dm.t),
        (&mut a.heads, dm.n * dm.qd),
        (&mut a.o, dm.n * dm.qd),
        (&mut a.xmid, dm.n * dm.d),
        (&mut a.h2, dm.n * dm.d),
        (&mut a.rstd2, dm.n),
        (&mut a.g, dm.n * dm.f),
        (&mut a.up, dm.n * dm.f),
        (&mut a.act, dm.n * dm.f),
        (&mut a.tmp, dm.n * max_r),
    ] {
        sized(v, len);
    }
    for (u, &r) in a.u.iter_mut().zip(train_ranks) {
        sized(u, dm.n * r);
    }
}

/// Bytes held by one layer's activations.
fn acts_bytes(a: &Acts) -> usize {
    let vecs = [
        &a.h1, &a.rstd1, &a.q, &a.k, &a.v, &a.p, &a.heads, &a.o, &a.xmid, &a.h2, &a.rstd2, &a.g, &a.up, &a.act, &a.tmp,
    ];
    4 * (vecs.iter().map(|v| v.len()).sum::<usize>() + a.u.iter().map(Vec::len).sum::<usize>())
}

/// Layer `l`'s projection weights in f32: the base's own when f32, otherwise decoded
/// into `scratch`.
fn layer_views<'a>(base: &'a Base, l: usize, scratch: &'a mut [Vec<f32>; 7]) -> [&'a [f32]; 7] {
    let mut it = base.layers[l].proj.iter().zip(scratch.iter_mut()).map(|(w, s)| f32_view(w, s));
    std::array::from_fn(|_| it.next().unwrap_or(&[]))
}

/// `y = x · Wᵀ + x · A_fᵀ · B_fᵀ + scale · (x · Aᵀ) · Bᵀ`, keeping `u = x · Aᵀ`.
#[allow(clippy::too_many_arguments)]
fn proj_forward(
    slot: &Slot,
    w: &[f32],
    x: &[f32],
    n: usize,
    d_in: usize,
    d_out: usize,
    y: &mut [f32],
    u: &mut [f32],
    tmp: &mut [f32],
) {
    let xm = Mat::new(x, n, d_in);
    matmul(MatMut::new(y, n, d_out), xm, Mat::new(w, d_out, d_in).t(), false, 1.0, Threads::Pool);
    if let Some(fz) = &slot.frozen {
        let r = fz.rank;
        let tmp = &mut tmp[..n * r];
        matmul(MatMut::new(tmp, n, r), xm, Mat::new(&fz.a, r, d_in).t(), false, 1.0, Threads::Pool);
        matmul(MatMut::new(y, n, d_out), Mat::new(tmp, n, r), Mat::new(&fz.b, d_out, r).t(), true, 1.0, Threads::Pool);
    }
    if let Some(tr) = &slot.train {
        let r = tr.rank;
        matmul(MatMut::new(u, n, r), xm, Mat::new(&tr.a, r, d_in).t(), false, 1.0, Threads::Pool);
        matmul(
            MatMut::new(y, n, d_out),
            Mat::new(u, n, r),
            Mat::new(&tr.b, d_out, r).t(),
            true,
            tr.scale,
            Threads::Pool,
        );
    }
}

/// Where one projection's adapter gradients go: `B`'s (`[out, r]`, or one per example
/// `[examples × out × r]` when `examples > 1`, overwritten), and `A`'s (`[r, in]`; empty
/// when `A` is frozen).
struct ProjGrads<'a> {
    b: &'a mut [f32],
    a: &'a mut [f32],
    examples: usize,
}

/// Backward of [`proj_forward`] with input `x`: `dx (+)= dy · W + (dy · B_f) · A_f +
/// scale · (dy · B) · A`, `grad_b += scale · dyᵀ · u`, and when `A` trains
/// `grad_a += scale · (dy · B)ᵀ · x`.
#[allow(clippy::too_many_arguments)]
fn proj_backward(
    slot: &Slot,
    w: &[f32],
    x: &[f32],
    dy: &[f32],
    u: &[f32],
    (n, d_in, d_out): (usize, usize, usize),
    dx: &mut [f32],
    accumulate: bool,
    tmp: &mut [f32],
    grads: ProjGrads<'_>,
) {
    let dym = Mat::new(dy, n, d_out);
    matmul(MatMut::new(dx, n, d_in), dym, Mat::new(w, d_out, d_in), accumulate, 1.0, Threads::Pool);
    if let Some(fz) = &slot.frozen {
        let r = fz.rank;
        let tmp = &mut tmp[..n * r];
        matmul(MatMut::new(tmp, n, r), dym, Mat::new(&fz.b, d_out, r), false, 1.0, Threads::Pool);
        matmul(MatMut::new(dx, n, d_in), Mat::new(tmp, n, r), Mat::new(&fz.a, r, d_in), true, 1.0, Threads::Pool);
    }
    if let Some(tr) = &slot.train {
        let r = tr.rank;
        let tmp = &mut tmp[..n * r];
        matmul(MatMut::new(tmp, n, r), dym, Mat::new(&tr.b, d_out, r), false, 1.0, Threads::Pool);
        if !grads.a.is_empty() {
            let xm = Mat::new(x, n, d_in);
            matmul(MatMut::new(grads.a, r, d_in), Mat::new(tmp, n, r).t(), xm, true, tr.scale, Threads::Pool);
        }
        matmul(MatMut::new(dx, n, d_in), Mat::new(tmp, n, r), Mat::new(&tr.a, r, d_in), true, tr.scale, Threads::Pool);
        if grads.examples <= 1 {
            matmul(MatMut::new(grads.b, d_out, r), dym.t(), Mat::new(u, n, r), true, tr.scale, Threads::Pool);
        } else {
            // One gradient per example (its rows of `dy` and `u`), overwritten each call.
            let t = n / grads.examples;
            for (i, g) in grads.b.chunks_mut(d_out * r).take(grads.examples).enumerate() {
                let dyi = Mat::new(&dy[i * t * d_out..(i + 1) * t * d_out], t, d_out);
                let ui = Mat::new(&u[i * t * r..(i + 1) * t * r], t, r);
                matmul(MatMut::new(g, d_out, r), dyi.t(), ui, false, tr.scale, Threads::Pool);
            }
        }
    }
}

/// `y = x / sqrt(mean(x²) + eps) · w` per row, keeping `1 / sqrt(mean(x²) + eps)`.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, d: usize, y: &mut [f32], rstd: &mut [f32]) {
    y.par_chunks_mut(d).zip(x.par_chunks(d)).zip(rstd.par_iter_mut()).for_each(|((y, x), r)| {
        let ms = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
        *r = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &w) in y.iter_mut().zip(x).zip(w) {
            *o = v * *r * w;
        }
    });
}

/// `dx += ∂(rms_norm)/∂x · dy`.
fn rms_backward(x: &[f32], rstd: &[f32], w: &[f32], dy: &[f32], d: usize, dx: &mut [f32]) {
    dx.par_chunks_mut(d).zip(x.par_chunks(d)).zip(dy.par_chunks(d).zip(rstd.par_iter())).for_each(
        |((dx, x), (dy, &r))| {
            let dot: f32 = x.iter().zip(dy).zip(w).map(|((x, dy), w)| x * dy * w).sum();
            let c = r * r * r * dot / d as f32;
            for (((o, &x), &dy), &w) in dx.iter_mut().zip(x).zip(dy).zip(w) {
                *o += r * w * dy - x * c;
            }
        },
    );
}

/// Rotate-half RoPE of `heads` heads per row (or its transpose, for the gradient).
fn rope(x: &mut [f32], dm: Dims, heads: usize, cos: &[f32], sin: &[f32], backward: bool) {
    let (hd, half) = (dm.hd, dm.hd / 2);
    x.par_chunks_mut(heads * hd).enumerate().for_each(|(row, xr)| {
        let pos = row % dm.t;
        let (c, s) = (&cos[pos * half..(pos + 1) * half], &sin[pos * half..(pos + 1) * half]);
        for head in xr.chunks_exact_mut(hd) {
            let (lo, hi) = head.split_at_mut(half);
            for j in 0..half {
                let (a, b) = (lo[j], hi[j]);
                if backward {
                    lo[j] = a * c[j] + b * s[j];
                    hi[j] = b * c[j] - a * s[j];
                } else {
                    lo[j] = a * c[j] - b * s[j];
                    hi[j] = b * c[j] + a * s[j];
                }
            }
        }
    });
}

/// Token-major `[tokens, heads · hd]` from head-major `[b, heads, t, hd]`.
fn from_heads(dm: Dims, heads: usize, hm: &[f32], out: &mut [f32]) {
    let (t, hd) = (dm.t, dm.hd);
    out.par_chunks_mut(heads * hd).enumerate().for_each(|(row, o)| {
        let (bi, i) = (row / t, row % t);
        for h in 0..heads {
            let src = ((bi * heads + h) * t + i) * hd;
            o[h * hd..(h + 1) * hd].copy_from_slice(&hm[src..src + hd]);
        }
    });
}

/// Causal softmax attention per (sequence, head): probabilities into `p`
/// (`[b, heads, t, t]`), outputs head-major into `heads_out`.
fn attention_forward(dm: Dims, q: &[f32], k: &[f32], v: &[f32], p: &mut [f32], heads_out: &mut [f32]) {
    let (t, hd, qd, kvd) = (dm.t, dm.hd, dm.qd, dm.kvd);
    let rep = dm.h / dm.kvh;
    let scale = 1.0 / (hd as f32).sqrt();
    p.par_chunks_mut(t * t).zip(heads_out.par_chunks_mut(t * hd)).enumerate().for_each(|(bh, (pc, oc))| {
        let (bi, hi) = (bh / dm.h, bh % dm.h);
        let kh = hi / rep;
        let qv = Mat::strided(&q[bi * t * qd + hi * hd..], t, hd, qd);
        let kv = Mat::strided(&k[bi * t * kvd + kh * hd..], t, hd, kvd);
        let vv = Mat::strided(&v[bi * t * kvd + kh * hd..], t, hd, kvd);
        matmul(MatMut::new(pc, t, t), qv, kv.t(), false, scale, Threads::One);
        for (i, row) in pc.chunks_mut(t).enumerate() {
            let max = row[..=i].iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let mut sum = 0.0;
            for x in &mut row[..=i] {
                *x = (*x - max).exp();
                sum += *x;
            }
            let inv = 1.0 / sum;
            row[..=i].iter_mut().for_each(|x| *x *= inv);
            row[i + 1..].fill(0.0);
        }
        matmul(MatMut::new(oc, t, hd), Mat::new(pc, t, t), vv, false, 1.0, Threads::One);
    });
}

/// Backward of [`attention_forward`]: `dq` head-major `[b, h, t, hd]`, `dk`, `dv`
/// head-major `[b, kv, t, hd]`, from `dout` token-major.
#[allow(clippy::too_many_arguments)]
fn attention_backward(
    dm: Dims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    p: &[f32],
    dout: &[f32],
    dqh: &mut [f32],
    dkh: &mut [f32],
    dvh: &mut [f32],
) {
    let (t, hd, qd, kvd) = (dm.t, dm.hd, dm.qd, dm.kvd);
    let rep = dm.h / dm.kvh;
    let scale = 1.0 / (hd as f32).sqrt();
    dqh.par_chunks_mut(rep * t * hd)
        .zip(dkh.par_chunks_mut(t * hd).zip(dvh.par_chunks_mut(t * hd)))
        .enumerate()
        .for_each(|(bk, (dq, (dk, dv)))| {
            let (bi, kh) = (bk / dm.kvh, bk % dm.kvh);
            let kv = Mat::strided(&k[bi * t * kvd + kh * hd..], t, hd, kvd);
            let vv = Mat::strided(&v[bi * t * kvd + kh * hd..], t, hd, kvd);
            let mut ds = vec![0.0f32; t * t];
            for r in 0..rep {
                let hi = kh * rep + r;
                let pc = &p[(bi * dm.h + hi) * t * t..(bi * dm.h + hi + 1) * t * t];
                let pm = Mat::new(pc, t, t);
                let dom = Mat::strided(&dout[bi * t * qd + hi * hd..], t, hd, qd);
                let qv = Mat::strided(&q[bi * t * qd + hi * hd..], t, hd, qd);
                // dP = dO · Vᵀ; dV += Pᵀ · dO.
                matmul(MatMut::new(&mut ds, t, t), dom, vv.t(), false, 1.0, Threads::One);
                matmul(MatMut::new(dv, t, hd), pm.t(), dom, r > 0, 1.0, Threads::One);
                // dS = P ⊙ (dP − rowsum(dP ⊙ P)).
                for (drow, prow) in ds.chunks_mut(t).zip(pc.chunks(t)) {
                    let dot: f32 = drow.iter().zip(prow).map(|(a, b)| a * b).sum();
                    for (dd, &pp) in drow.iter_mut().zip(prow) {
                        *dd = pp * (*dd - dot);
                    }
                }
                let dsm = Mat::new(&ds, t, t);
                matmul(MatMut::new(&mut dq[r * t * hd..(r + 1) * t * hd], t, hd), dsm, kv, false, scale, Threads::One);
                matmul(MatMut::new(dk, t, hd), dsm.t(), qv, r > 0, scale, Threads::One);
            }
        });
}

/// The adapter gradient buffers of one layer: `B`'s (or per example), `A`'s.
struct Sinks<'a> {
    b: &'a mut [Vec<f32>; 7],
    a: &'a mut [Vec<f32>; 7],
    examples: usize,
}

impl Sinks<'_> {
    fn of(&mut self, ti: usize) -> ProjGrads<'_> {
        ProjGrads { b: &mut self.b[ti], a: &mut self.a[ti], examples: self.examples }
    }
}

#[allow(clippy::too_many_arguments)]
fn layer_backward(
    base: &Base,
    slots: &[Slot; 7],
    l: usize,
    wv: &[&[f32]; 7],
    dm: Dims,
    x: &[f32],
    a: &mut Acts,
    g: &mut Back,
    mut sinks: Sinks<'_>,
    cos: &[f32],
    sin: &[f32],
) {
    let lb = &base.layers[l];
    let (n, d, f) = (dm.n, dm.d, dm.f);
    // MLP.
    proj_backward(&slots[6], wv[6], &a.act, &g.dx, &a.u[6], (n, f, d), &mut g.dact, false, &mut a.tmp, sinks.of(6));
    g.dg.par_chunks_mut(f).zip(g.dup.par_chunks_mut(f)).enumerate().for_each(|(row, (dg, dup))| {
        let o = row * f;
        for j in 0..f {
            let (gv, up, da) = (a.g[o + j], a.up[o + j], g.dact[o + j]);
            let s = 1.0 / (1.0 + (-gv).exp());
            dg[j] = da * up * s * (1.0 + gv * (1.0 - s));
            dup[j] = da * gv * s;
        }
    });
    proj_backward(&slots[4], wv[4], &a.h2, &g.dg, &a.u[4], (n, d, f), &mut g.dh, false, &mut a.tmp, sinks.of(4));
    proj_backward(&slots[5], wv[5], &a.h2, &g.dup, &a.u[5], (n, d, f), &mut g.dh, true, &mut a.tmp, sinks.of(5));
    g.dxmid.copy_from_slice(&g.dx);
    rms_backward(&a.xmid, &a.rstd2, &lb.mlp_norm, &g.dh, d, &mut g.dxmid);
    // Attention.
    proj_backward(
        &slots[3],
        wv[3],
        &a.o,
        &g.dxmid,
        &a.u[3],
        (n, dm.qd, d),
        &mut g.dout,
        false,
        &mut a.tmp,
        sinks.of(3),
    );
    attention_backward(dm, &a.q, &a.k, &a.v, &a.p, &g.dout, &mut g.dqh, &mut g.dkh, &mut g.dvh);
    from_heads(dm, dm.h, &g.dqh, &mut g.dq);
    from_heads(dm, dm.kvh, &g.dkh, &mut g.dk);
    from_heads(dm, dm.kvh, &g.dvh, &mut g.dv);
    rope(&mut g.dq, dm, dm.h, cos, sin, true);
    rope(&mut g.dk, dm, dm.kvh, cos, sin, true);
    proj_backward(&slots[0], wv[0], &a.h1, &g.dq, &a.u[0], (n, d, dm.qd), &mut g.dh, false, &mut a.tmp, sinks.of(0));
    proj_backward(&slots[1], wv[1], &a.h1, &g.dk, &a.u[1], (n, d, dm.kvd), &mut g.dh, true, &mut a.tmp, sinks.of(1));
    proj_backward(&slots[2], wv[2], &a.h1, &g.dv, &a.u[2], (n, d, dm.kvd), &mut g.dh, true, &mut a.tmp, sinks.of(2));
    g.dx.copy_from_slice(&g.dxmid);
    rms_backward(x, &a.rstd1, &lb.attn_norm, &g.dh, d, &mut g.dx);
}

/// Mean (weighted) next-token loss of `hf` (the final normed hidden states), and its
/// gradient times `weight` into `dhf`, over blocks of vocabulary rows.
#[allow(clippy::too_many_arguments)]
fn head_loss(
    base: &Base,
    dm: Dims,
    hf: &[f32],
    batch: &HostBatch,
    weight: f32,
    logits: &mut [f32],
    rows: &mut [f32],
    dhf: &mut [f32],
) -> f32 {
    let (n, d) = (dm.n, dm.d);
    let head = base.head();
    let vocab = head.rows();
    let block = logits.len() / n;
    let mut max = vec![f32::NEG_INFINITY; n];
    let mut sum = vec![0.0f32; n];
    let mut target_logit = vec![0.0f32; n];
    let hm = Mat::new(hf, n, d);
    // One pass over blocks of the vocabulary, as flash attention does: a running max and
    // sum per row, and `dhf` accumulating `Σ_j exp(l_j − max) · e_j`, rescaled whenever the
    // max grows. At the end `softmax · E = dhf / sum`, and the gradient is that minus the
    // target's row, times the row's weight.
    dhf.fill(0.0);
    let mut v0 = 0;
    while v0 < vocab {
        let v1 = (v0 + block).min(vocab);
        let vb = v1 - v0;
        let e = head_block(head, v0, v1, d, rows);
        let lg = &mut logits[..n * vb];
        matmul(MatMut::new(lg, n, vb), hm, Mat::new(e, vb, d).t(), false, 1.0, Threads::Pool);
        lg.par_chunks_mut(vb)
            .zip(dhf.par_chunks_mut(d))
            .zip(max.par_iter_mut().zip(sum.par_iter_mut()))
            .zip(target_logit.par_iter_mut().zip(batch.targets.par_iter()))
            .for_each(|(((row, acc), (m, s)), (tl, &tg))| {
                let tg = tg as usize;
                if (v0..v1).contains(&tg) {
                    *tl = row[tg - v0];
                }
                let bm = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
                let nm = m.max(bm);
                let rescale = (*m - nm).exp();
                let mut block_sum = 0.0f32;
                for x in row.iter_mut() {
                    *x = (*x - nm).exp();
                    block_sum += *x;
                }
                *s = *s * rescale + block_sum;
                if rescale != 1.0 {
                    acc.iter_mut().for_each(|a| *a *= rescale);
                }
                *m = nm;
            });
        matmul(MatMut::new(dhf, n, d), Mat::new(lg, n, vb), Mat::new(e, vb, d), true, 1.0, Threads::Pool);
        v0 = v1;
    }
    let w = |i: usize| batch.weights.as_ref().map_or(1.0, |w| w[i]);
    let loss = (0..n).map(|i| f64::from(w(i) * (max[i] + sum[i].ln() - target_logit[i]))).sum::<f64>() / n as f64;
    dhf.par_chunks_mut(d).enumerate().for_each(|(i, acc)| {
        let c = w(i) * weight / n as f32;
        let mut target_row = vec![0.0f32; d];
        head.row_into(batch.targets[i] as usize, &mut target_row);
        let inv = 1.0 / sum[i];
        for (a, t) in acc.iter_mut().zip(&target_row) {
            *a = c * (*a * inv - t);
        }
    });
    loss as f32
}

/// Rows `v0..v1` of the head in f32: in place when f32, otherwise decoded into `rows`.
fn head_block<'a>(head: &'a covey_infer::Weight, v0: usize, v1: usize, d: usize, rows: &'a mut [f32]) -> &'a [f32] {
    match head {
        covey_infer::Weight::F32 { data, .. } => &data[v0 * d..v1 * d],
        _ => {
            dequantize_rows(head, v0, v1, rows);
            &rows[..(v1 - v0) * d]
        }
    }
}
