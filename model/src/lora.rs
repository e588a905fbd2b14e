//! A linear projection that can carry a LoRA adapter.
//!
//! burn 0.22 has LoRA built in (`Module::apply_lora`), but it lacks what a
//! federated, differentially private setting needs: dropout on the adapter
//! input, FFA-LoRA (a frozen `A` drawn from a seed shared by every client),
//! a seeded PEFT-style initialisation that is identical on every device, and
//! direct access to the factors for PEFT names and per-example gradients.
//! So the projection and its adapter are written here, as plain burn modules.

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::module::linear;
use burn::tensor::{Device, Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::config::{LoraConfig, LoraTarget};
use crate::init::uniform;

/// The random stream of the adapter on `target` of decoder layer `layer`.
pub(crate) fn lora_stream(layer: usize, target: LoraTarget) -> u64 {
    (layer as u64) * 16 + target as u64
}

/// The seeded initial `A: [d_in, r]` (row-major) of the adapter on `stream`: uniform in
/// ±1/√d_in from a ChaCha8 stream seeded by `config.seed`.
pub(crate) fn initial_a(config: &LoraConfig, stream: u64, d_in: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    rng.set_stream(stream);
    uniform(&mut rng, d_in * config.rank, 1.0 / (d_in as f32).sqrt())
}

/// `y = x·W (+ scale · dropout(x)·A·B)` with `W: [d_in, d_out]`, `A: [d_in, r]`, `B: [r, d_out]`.
///
/// Weights are stored in burn's `[d_in, d_out]` layout; checkpoints transpose to
/// Hugging Face's `[d_out, d_in]`.
#[derive(Module, Debug)]
pub struct LoraLinear {
    /// Base weight `[d_in, d_out]`; frozen while an adapter trains.
    pub weight: Param<Tensor<2>>,
    /// The adapter, when one is attached.
    pub lora: Option<LoraAdapter>,
}

/// The low-rank factors of one projection.
#[derive(Module, Debug)]
pub struct LoraAdapter {
    /// `A: [d_in, r]`, initialised uniformly in ±1/√d_in (PEFT's Kaiming-uniform).
    pub a: Param<Tensor<2>>,
    /// `B: [r, d_out]`, initialised to zero so a fresh adapter is the identity.
    pub b: Param<Tensor<2>>,
    /// `alpha / rank`.
    pub scale: f64,
    /// Dropout on the adapter's input (training only).
    pub dropout: Dropout,
}

impl LoraLinear {
    /// A projection without adapter.
    pub fn new(weight: Tensor<2>) -> Self {
        Self { weight: Param::from_tensor(weight), lora: None }
    }

    /// Apply the projection to `[.., d_in]`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let base = linear(x.clone(), self.weight.val(), None);
        match &self.lora {
            None => base,
            Some(adapter) => {
                let x = adapter.dropout.forward(x);
                let low = linear(linear(x, adapter.a.val(), None), adapter.b.val(), None);
                base + low.mul_scalar(adapter.scale)
            }
        }
    }

    /// `(d_in, d_out)`.
    pub fn dims(&self) -> (usize, usize) {
        let [i, o] = self.weight.val().dims();
        (i, o)
    }

    /// Attach a fresh adapter: `A` from a stream seeded by `(config.seed, stream)`, `B = 0`.
    /// With FFA-LoRA, `A` does not require gradients.
    pub fn attach(mut self, config: &LoraConfig, stream: u64, device: &Device) -> Self {
        let (d_in, d_out) = self.dims();
        let r = config.rank;
        let a = initial_a(config, stream, d_in);
        let a = Param::from_data(TensorData::new(a, [d_in, r]), device).set_require_grad(!config.ffa);
        let b = Param::from_data(TensorData::new(vec![0.0f32; r * d_out], [r, d_out]), device);
        self.lora =
            Some(LoraAdapter { a, b, scale: config.scale(), dropout: DropoutConfig::new(config.dropout).init() });
        self
    }

    /// Fold the adapter into the base weight: `W ← W + scale·A·B`; the adapter is removed.
    pub fn merge(self) -> Self {
        match self.lora {
            None => self,
            Some(adapter) => {
                let delta = adapter.a.val().matmul(adapter.b.val()).mul_scalar(adapter.scale);
                let w = self.weight.val() + delta;
                Self { weight: Param::from_tensor(w.detach()), lora: None }
            }
        }
    }
}
