//! The Llama-style decoder: RMSNorm, rotary position embeddings (Hugging Face's
//! rotate-half convention), SwiGLU, grouped-query attention and a KV cache.

use burn::module::{Module, Param};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::module::{embedding, linear};
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::config::{LlamaConfig, LoraConfig, LoraTarget};
use crate::error::{ModelError, Result};
use crate::init::normal;
use crate::lora::LoraLinear;

/// Standard deviation of the initial weights (Hugging Face's `initializer_range`).
pub const INIT_STD: f32 = 0.02;

/// One decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    /// RMSNorm weight before attention (`input_layernorm`).
    pub attn_norm: Param<Tensor<1>>,
    /// Query projection `[hidden, hidden]`.
    pub q_proj: LoraLinear,
    /// Key projection `[hidden, kv_dim]`.
    pub k_proj: LoraLinear,
    /// Value projection `[hidden, kv_dim]`.
    pub v_proj: LoraLinear,
    /// Output projection `[hidden, hidden]`.
    pub o_proj: LoraLinear,
    /// RMSNorm weight before the MLP (`post_attention_layernorm`).
    pub mlp_norm: Param<Tensor<1>>,
    /// SwiGLU gate `[hidden, intermediate]`.
    pub gate_proj: LoraLinear,
    /// SwiGLU up `[hidden, intermediate]`.
    pub up_proj: LoraLinear,
    /// Down projection `[intermediate, hidden]`.
    pub down_proj: LoraLinear,
}

impl DecoderLayer {
    /// The projection named by `target`.
    pub fn proj(&self, target: LoraTarget) -> &LoraLinear {
        match target {
            LoraTarget::Q => &self.q_proj,
            LoraTarget::K => &self.k_proj,
            LoraTarget::V => &self.v_proj,
            LoraTarget::O => &self.o_proj,
            LoraTarget::Gate => &self.gate_proj,
            LoraTarget::Up => &self.up_proj,
            LoraTarget::Down => &self.down_proj,
        }
    }

    /// Mutable access to the projection named by `target`.
    pub fn proj_mut(&mut self, target: LoraTarget) -> &mut LoraLinear {
        match target {
            LoraTarget::Q => &mut self.q_proj,
            LoraTarget::K => &mut self.k_proj,
            LoraTarget::V => &mut self.v_proj,
            LoraTarget::O => &mut self.o_proj,
            LoraTarget::Gate => &mut self.gate_proj,
            LoraTarget::Up => &mut self.up_proj,
            LoraTarget::Down => &mut self.down_proj,
        }
    }
}

/// Keys and values of the positions seen so far, per layer: `[batch, kv_heads, len, head_dim]`.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    len: usize,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }
    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Where [`Llama::forward_probed`] shows activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeSite {
    /// The attention heads' outputs before `o_proj`: `[batch, seq, heads · head_dim]`,
    /// head `h` in columns `h · head_dim ..`.
    AttentionHeads,
    /// The SwiGLU activations `silu(gate) · up` before `down_proj`: `[batch, seq, intermediate]`.
    MlpHidden,
}

/// A callback shown each layer's activations: layer index, site, activation.
pub type Probe<'a> = dyn FnMut(usize, ProbeSite, &Tensor<3>) + 'a;

/// The Llama-style decoder with optional LoRA adapters on its projections.
#[derive(Module, Debug)]
pub struct Llama {
    /// Token embedding `[vocab, hidden]`.
    pub embed_tokens: Param<Tensor<2>>,
    /// The decoder layers.
    pub layers: Vec<DecoderLayer>,
    /// Final RMSNorm weight.
    pub norm: Param<Tensor<1>>,
    /// LM head `[hidden, vocab]`, absent when tied to the embedding.
    pub lm_head: Option<Param<Tensor<2>>>,
    /// The shape of the model.
    #[module(skip)]
    pub config: LlamaConfig,
    /// The LoRA configuration of the attached adapters, if any.
    #[module(skip)]
    pub lora: Option<LoraConfig>,
}

impl Llama {
    /// A freshly initialised model (weights `N(0, 0.02²)`, norms 1), seeded.
    pub fn init(config: &LlamaConfig, seed: u64, device: &Device) -> Result<Self> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut mat = |rows: usize, cols: usize| -> Tensor<2> {
            Tensor::from_data(TensorData::new(normal(&mut rng, rows * cols, INIT_STD), [rows, cols]), device)
        };
        let h = config.hidden_size;
        let ones = |n: usize| Param::from_tensor(Tensor::<1>::ones([n], device));
        let embed = mat(config.vocab_size, h);
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for _ in 0..config.num_hidden_layers {
            let mut proj = |t: LoraTarget| {
                let (i, o) = config.lora_dims(t);
                LoraLinear::new(mat(i, o))
            };
            layers.push(DecoderLayer {
                attn_norm: ones(h),
                q_proj: proj(LoraTarget::Q),
                k_proj: proj(LoraTarget::K),
                v_proj: proj(LoraTarget::V),
                o_proj: proj(LoraTarget::O),
                mlp_norm: ones(h),
                gate_proj: proj(LoraTarget::Gate),
                up_proj: proj(LoraTarget::Up),
                down_proj: proj(LoraTarget::Down),
            });
        }
        let lm_head = (!config.tie_word_embeddings).then(|| Param::from_tensor(mat(h, config.vocab_size)));
        Ok(Self {
            embed_tokens: Param::from_tensor(embed),
            layers,
            norm: ones(h),
            lm_head,
            config: config.clone(),
            lora: None,
        })
    }

    /// Freeze every base weight and attach fresh adapters (B = 0) to the configured
    /// projections of every layer. Only the adapters require gradients afterwards
    /// (with FFA-LoRA, only `B`).
    pub fn with_lora(self, lora: &LoraConfig, device: &Device) -> Result<Self> {
        lora.validate()?;
        if self.lora.is_some() {
            return Err(ModelError::Adapter("the model already carries adapters; merge them first".into()));
        }
        let mut model = self.no_grad();
        for (i, layer) in model.layers.iter_mut().enumerate() {
            for &target in &lora.targets {
                let stream = crate::lora::lora_stream(i, target);
                let proj = layer.proj_mut(target);
                let owned = std::mem::replace(proj, LoraLinear { weight: proj.weight.clone(), lora: None });
                *proj = owned.attach(lora, stream, device);
            }
        }
        model.lora = Some(lora.clone());
        Ok(model)
    }

    /// QLoRA: hold every projection's base weight quantized with burn's block
    /// quantization (symmetric, blocks of 32 along the output dimension — of 16 or 8
    /// where the output is narrower — f32 scales):
    /// `Q8S` for 8 bits, `Q4S` packed eight to a `u32` for 4 bits. The weights stay
    /// frozen; the adapters train in f32 on top. Embedding and norms stay f32.
    ///
    /// burn's CPU backend dequantizes a weight for each matmul that uses it, so at rest
    /// the model holds the quantized base, and during a training step the dequantized
    /// copies of the layers live until the backward pass has used them.
    pub fn quantize_base(mut self, bits: u8) -> Result<Self> {
        use burn::tensor::quantization::{QuantScheme, QuantStore, QuantValue, ScaleDtype};
        let value = match bits {
            8 => QuantValue::Q8S,
            4 => QuantValue::Q4S,
            other => {
                return Err(ModelError::Adapter(format!("QLoRA base of {other} bits: only 8 and 4 are supported")));
            }
        };
        // Blocks of 32 along the output dimension; narrower outputs (tiny test models) use
        // the largest of 16 and 8 that divides them, and are left in f32 otherwise.
        let scheme = |d_out: usize| {
            [32u8, 16, 8].into_iter().find(|&b| d_out.is_multiple_of(usize::from(b))).map(|b| {
                QuantScheme::default()
                    .with_value(value)
                    .with_store(QuantStore::PackedU32(0))
                    .per_block([b], ScaleDtype::F32)
            })
        };
        for layer in self.layers.iter_mut() {
            for target in LoraTarget::ALL {
                let proj = layer.proj_mut(target);
                let (_, d_out) = proj.dims();
                if let Some(scheme) = scheme(d_out) {
                    proj.weight = proj.weight.clone().map(|w| w.quantize_dynamic(&scheme));
                }
            }
        }
        Ok(self)
    }

    /// Fold every adapter into its base weight; the result has no adapters.
    pub fn merge_lora(mut self) -> Self {
        for layer in self.layers.iter_mut() {
            for target in LoraTarget::ALL {
                let proj = layer.proj_mut(target);
                let owned = std::mem::replace(proj, LoraLinear { weight: proj.weight.clone(), lora: None });
                *proj = owned.merge();
            }
        }
        self.lora = None;
        self
    }

    /// Logits `[batch, seq, vocab]` for tokens `[batch, seq]`, positions starting at 0.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        self.forward_inner(tokens, None, None)
    }

    /// Logits for `tokens`, which continue the sequence held in `cache`; the cache is extended.
    pub fn forward_cached(&self, tokens: Tensor<2, Int>, cache: &mut KvCache) -> Tensor<3> {
        self.forward_inner(tokens, Some(cache), None)
    }

    /// [`Llama::forward`], showing `probe` the activations of every layer (layer index,
    /// site, activation) as they are computed: what activation-based pruning scores.
    pub fn forward_probed(
        &self,
        tokens: Tensor<2, Int>,
        probe: &mut dyn FnMut(usize, ProbeSite, &Tensor<3>),
    ) -> Tensor<3> {
        self.forward_inner(tokens, None, Some(probe))
    }

    fn forward_inner(
        &self,
        tokens: Tensor<2, Int>,
        mut cache: Option<&mut KvCache>,
        mut probe: Option<&mut Probe<'_>>,
    ) -> Tensor<3> {
        let device = tokens.device();
        let [_, t] = tokens.dims();
        let start = cache.as_ref().map_or(0, |c| c.len);
        let (cos, sin) = rope_tables(&self.config, start, t, &device);
        let mut x = embedding(self.embed_tokens.val(), tokens);
        if let Some(c) = cache.as_mut()
            && c.layers.len() != self.layers.len()
        {
            c.layers = vec![None; self.layers.len()];
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_mut().map(|c| &mut c.layers[i]);
            let h = rms_norm(x.clone(), &layer.attn_norm, self.config.rms_norm_eps);
            let heads = self.attention(layer, h, &cos, &sin, start, slot);
            if let Some(p) = probe.as_mut() {
                p(i, ProbeSite::AttentionHeads, &heads);
            }
            x = x + layer.o_proj.forward(heads);
            let h = rms_norm(x.clone(), &layer.mlp_norm, self.config.rms_norm_eps);
            let hidden = silu(layer.gate_proj.forward(h.clone())) * layer.up_proj.forward(h);
            if let Some(p) = probe.as_mut() {
                p(i, ProbeSite::MlpHidden, &hidden);
            }
            x = x + layer.down_proj.forward(hidden);
        }
        if let Some(c) = cache {
            c.len += t;
        }
        let x = rms_norm(x, &self.norm, self.config.rms_norm_eps);
        match &self.lm_head {
            Some(head) => linear(x, head.val(), None),
            None => linear(x, self.embed_tokens.val().transpose(), None),
        }
    }

    /// The heads' outputs, concatenated: `[batch, seq, heads · head_dim]` (before `o_proj`).
    fn attention(
        &self,
        layer: &DecoderLayer,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        start: usize,
        cache: Option<&mut Option<(Tensor<4>, Tensor<4>)>>,
    ) -> Tensor<3> {
        let c = &self.config;
        let [b, t, _] = x.dims();
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim());
        let q = layer.q_proj.forward(x.clone()).reshape([b, t, nh, hd]).swap_dims(1, 2);
        let k = layer.k_proj.forward(x.clone()).reshape([b, t, nkv, hd]).swap_dims(1, 2);
        let v = layer.v_proj.forward(x).reshape([b, t, nkv, hd]).swap_dims(1, 2);
        let q = apply_rope(q, cos, sin);
        let k = apply_rope(k, cos, sin);
        let (k, v) = match cache {
            None => (k, v),
            Some(slot) => {
                let (k, v) = match slot.take() {
                    None => (k, v),
                    Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
        };
        let tk = k.dims()[2];
        let rep = nh / nkv;
        let (k, v) = if rep == 1 {
            (k, v)
        } else {
            let expand = |x: Tensor<4>| x.unsqueeze_dim::<5>(2).expand([b, nkv, rep, tk, hd]).reshape([b, nh, tk, hd]);
            (expand(k), expand(v))
        };
        let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(1.0 / (hd as f64).sqrt());
        let scores = if t > 1 {
            // Query i sits at absolute position start + i and sees keys 0..=start + i.
            let mask = Tensor::<2, Bool>::tril_mask([t, tk], start as i64, &scores.device());
            let mask = mask.unsqueeze_dims::<4>(&[0, 1]).expand([b, nh, t, tk]);
            scores.mask_fill(mask, f32::NEG_INFINITY)
        } else {
            scores
        };
        let out = softmax(scores, 3).matmul(v);
        out.swap_dims(1, 2).reshape([b, t, nh * hd])
    }
}

/// `x / sqrt(mean(x²) + eps) · w` over the last dimension.
fn rms_norm(x: Tensor<3>, weight: &Param<Tensor<1>>, eps: f64) -> Tensor<3> {
    let rms = (x.clone().square().mean_dim(2) + eps).sqrt();
    (x / rms) * weight.val().unsqueeze::<3>()
}

/// Cosine and sine tables `[1, 1, t, head_dim]` for positions `start..start + t`,
/// halves duplicated as in Hugging Face's `LlamaRotaryEmbedding`.
fn rope_tables(c: &LlamaConfig, start: usize, t: usize, device: &Device) -> (Tensor<4>, Tensor<4>) {
    let hd = c.head_dim();
    let half = hd / 2;
    let mut cos = Vec::with_capacity(t * hd);
    let mut sin = Vec::with_capacity(t * hd);
    for pos in start..start + t {
        let mut row_c = Vec::with_capacity(half);
        let mut row_s = Vec::with_capacity(half);
        for i in 0..half {
            let inv_freq = 1.0 / c.rope_theta.powf((2 * i) as f64 / hd as f64);
            let angle = pos as f64 * inv_freq;
            row_c.push(angle.cos() as f32);
            row_s.push(angle.sin() as f32);
        }
        cos.extend_from_slice(&row_c);
        cos.extend_from_slice(&row_c);
        sin.extend_from_slice(&row_s);
        sin.extend_from_slice(&row_s);
    }
    let cos = Tensor::<2>::from_data(TensorData::new(cos, [t, hd]), device).unsqueeze::<4>();
    let sin = Tensor::<2>::from_data(TensorData::new(sin, [t, hd]), device).unsqueeze::<4>();
    (cos, sin)
}

/// `x·cos + rotate_half(x)·sin` for `x: [b, heads, t, head_dim]`.
fn apply_rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let [_, _, _, hd] = x.dims();
    let half = hd / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone() + rotated * sin.clone()
}
