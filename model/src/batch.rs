//! What the training loop consumes: micro-batches of token ids, with the teacher's view
//! of the same positions when distilling, and the sources that produce them.

use burn::tensor::{Device, Int, Tensor};

use crate::data::Batcher;
use crate::error::Result;

/// One micro-batch: inputs and next-token targets `[batch, seq]`, and for distillation
/// the teacher's view of the same positions.
pub struct Batch {
    /// Input token ids.
    pub inputs: Tensor<2, Int>,
    /// Target token ids (the inputs shifted by one).
    pub targets: Tensor<2, Int>,
    /// Per-target loss weights averaging 1 over the batch (0: not learned), for chat
    /// transcripts whose loss counts the assistant's turns only; `None`: every target.
    pub weights: Option<Tensor<2>>,
    /// The teacher's logits at each position, when distilling.
    pub teacher: Option<TeacherTargets>,
}

/// Where the training loop draws its micro-batches from.
pub trait BatchSource {
    /// The next micro-batch of `batch` sequences, on `device`.
    fn next_batch(&mut self, batch: usize, device: &Device) -> Result<Batch>;
}

impl BatchSource for Batcher {
    fn next_batch(&mut self, batch: usize, device: &Device) -> Result<Batch> {
        let (inputs, targets, weights) = Batcher::next_weighted_batch(self, batch, device);
        Ok(Batch { inputs, targets, weights, teacher: None })
    }
}

/// What the teacher says about a batch's positions.
// Two tensor handles against one: one per batch, not worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum TeacherTargets {
    /// Every logit: `[batch, seq, vocab]`.
    Dense(Tensor<3>),
    /// The `k` largest logits and their token ids: `[batch, seq, k]` each.
    TopK {
        /// Token ids.
        ids: Tensor<3, Int>,
        /// Their logits.
        logits: Tensor<3>,
    },
}

impl TeacherTargets {
    /// Rows `start..start + rows` of the batch.
    pub fn narrow(&self, start: usize, rows: usize) -> Self {
        match self {
            Self::Dense(t) => Self::Dense(t.clone().narrow(0, start, rows)),
            Self::TopK { ids, logits } => {
                Self::TopK { ids: ids.clone().narrow(0, start, rows), logits: logits.clone().narrow(0, start, rows) }
            }
        }
    }
}
