//! Knowledge distillation: a student learns from a teacher's softened next-token
//! distribution as well as from the text (Hinton, Vinyals and Dean, 2015).
//!
//! The objective at temperature `T` with weight `α` is
//!
//! ```text
//! L = α · T² · KL(softmax(t / T) ‖ softmax(s / T)) + (1 − α) · CE(s, target)
//! ```
//!
//! for teacher logits `t` and student logits `s`, averaged over positions. `T²` keeps
//! the soft term's gradient on the scale of the hard term's: the gradient of
//! `T² · KL` with respect to `s` is `T · (softmax(s / T) − softmax(t / T))`.
//!
//! The teacher's logits come either straight from a teacher model run on each batch
//! (covey-infer's engine, so a GGUF or quantized teacher works), or from a
//! [`TeacherCache`]: the `k` largest logits of every position, computed once and stored on
//! disk. With a cache the soft term runs over those `k` tokens: the teacher's
//! distribution renormalised over its top `k`, against the student's log-probabilities of
//! the same tokens (what the teacher puts outside its top `k` is dropped; for `k` of 16
//! to 64 that is a small share of its mass).
//!
//! Both modes, and a run without teacher (`α = 0`), draw the same fixed windows of the
//! corpus ([`Windows`]) in the same seeded order, so their results compare step for step.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{Device, Int, Tensor, TensorData};
use covey_infer::Model;
use half::f16;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use crate::batch::TeacherTargets;
use crate::batch::{Batch, BatchSource};
use crate::error::{ModelError, Result};

/// Temperature and mixing weight of the distillation objective.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DistillLoss {
    /// Softening temperature `T` (> 0). Default 2.
    pub temperature: f64,
    /// Weight `α` of the soft (teacher) term, in [0, 1]; `1 − α` weighs the
    /// cross-entropy with the text. Default 0.5.
    pub alpha: f64,
}

impl Default for DistillLoss {
    fn default() -> Self {
        Self { temperature: 2.0, alpha: 0.5 }
    }
}

impl DistillLoss {
    /// Check that both values are possible.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(ModelError::config("temperature", format!("{} is not a positive number", self.temperature)));
        }
        if !(self.alpha.is_finite() && (0.0..=1.0).contains(&self.alpha)) {
            return Err(ModelError::config("alpha", format!("{} is not in [0, 1]", self.alpha)));
        }
        Ok(())
    }
}

/// The distillation objective (see the module docs), averaged over positions:
/// `student: [batch, seq, vocab]`, `targets: [batch, seq]`.
pub fn distillation_loss(
    student: Tensor<3>,
    teacher: &TeacherTargets,
    targets: Tensor<2, Int>,
    loss: &DistillLoss,
) -> Tensor<1> {
    let [b, t, v] = student.dims();
    let n = b * t;
    let s = student.reshape([n, v]);
    let ce = log_softmax(s.clone(), 1).gather(1, targets.reshape([n, 1])).neg().mean();
    if loss.alpha == 0.0 {
        return ce;
    }
    let inv_t = 1.0 / loss.temperature;
    let log_q = log_softmax(s.mul_scalar(inv_t), 1);
    let (teacher_logits, log_q) = match teacher {
        TeacherTargets::Dense(tl) => (tl.clone().reshape([n, v]), log_q),
        TeacherTargets::TopK { ids, logits } => {
            let k = ids.dims()[2];
            (logits.clone().reshape([n, k]), log_q.gather(1, ids.clone().reshape([n, k])))
        }
    };
    let scaled = teacher_logits.mul_scalar(inv_t);
    let p = softmax(scaled.clone(), 1);
    let log_p = log_softmax(scaled, 1);
    let kl = (p * (log_p - log_q)).sum_dim(1).mean();
    let t2 = loss.temperature * loss.temperature;
    kl.mul_scalar(loss.alpha * t2) + ce.mul_scalar(1.0 - loss.alpha)
}

/// The training windows of a corpus: `seq_len + 1` tokens each, starting every
/// `seq_len` tokens (non-overlapping predictions), optionally a seeded subset.
#[derive(Debug, Clone)]
pub struct Windows {
    tokens: Vec<u32>,
    seq_len: usize,
    starts: Vec<usize>,
}

impl Windows {
    /// Cut `tokens` into windows; with `max_windows`, keep that many chosen by a seeded
    /// shuffle (in corpus order). Fails when not even one window fits.
    pub fn new(tokens: Vec<u32>, seq_len: usize, max_windows: Option<usize>, seed: u64, source: &Path) -> Result<Self> {
        if seq_len == 0 || tokens.len() < seq_len + 1 {
            return Err(ModelError::EmptyCorpus { path: source.to_owned(), needed: Some(seq_len + 1) });
        }
        let mut starts: Vec<usize> = (0..=tokens.len() - seq_len - 1).step_by(seq_len).collect();
        if let Some(m) = max_windows
            && m < starts.len()
        {
            starts.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x5749_4e44));
            starts.truncate(m.max(1));
            starts.sort_unstable();
        }
        Ok(Self { tokens, seq_len, starts })
    }

    /// Number of windows.
    pub fn len(&self) -> usize {
        self.starts.len()
    }

    /// Whether there is none (never, once built).
    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// Predictions per window.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Window `i`: `seq_len + 1` tokens.
    pub fn window(&self, i: usize) -> &[u32] {
        &self.tokens[self.starts[i]..self.starts[i] + self.seq_len + 1]
    }

    /// SHA-256 over the windows' tokens and length: what a teacher cache was built for.
    pub fn fingerprint(&self) -> String {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(&(self.seq_len as u64).to_le_bytes());
        for i in 0..self.len() {
            for &t in self.window(i) {
                ctx.update(&t.to_le_bytes());
            }
        }
        ctx.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }
}

const CACHE_MAGIC: &[u8; 8] = b"COVEYTK1";

/// What a teacher cache file says about itself (JSON after the magic).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheHeader {
    /// Format version (1).
    pub version: u32,
    /// Vocabulary of the teacher.
    pub vocab_size: usize,
    /// Logits kept per position.
    pub top_k: usize,
    /// Predictions per window.
    pub seq_len: usize,
    /// Windows stored, in [`Windows`] order.
    pub windows: usize,
    /// [`Windows::fingerprint`] of the windows.
    pub fingerprint: String,
    /// The teacher it came from (one line).
    pub teacher: String,
}

/// The teacher's top-`k` logits at every position of every window, on disk: after the
/// magic `COVEYTK1` and a little-endian `u32` header length, the [`CacheHeader`] as
/// JSON, then per window and position `k` token ids (`u32` LE) followed by their `k`
/// logits (IEEE half, LE), largest first.
pub struct TeacherCache {
    file: File,
    path: PathBuf,
    /// The header.
    pub header: CacheHeader,
    data_offset: u64,
}

impl TeacherCache {
    fn entry_bytes(k: usize) -> usize {
        k * 6
    }

    fn window_bytes(&self) -> usize {
        Self::entry_bytes(self.header.top_k) * self.header.seq_len
    }

    /// Run `teacher` over every window and store its top-`k` logits at `path`
    /// (written to a temporary name, synced, then renamed: an interrupted build leaves no
    /// cache, and a crash after it leaves a whole one).
    /// `on_window(done, total)` hears of each window (how a caller shows progress).
    pub fn build(
        path: &Path,
        teacher: &Model,
        description: &str,
        windows: &Windows,
        k: usize,
        on_window: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let vocab = teacher.config().vocab_size;
        if k == 0 || k > vocab {
            return Err(ModelError::config("top_k", format!("{k} is not in 1..={vocab}")));
        }
        let header = CacheHeader {
            version: 1,
            vocab_size: vocab,
            top_k: k,
            seq_len: windows.seq_len(),
            windows: windows.len(),
            fingerprint: windows.fingerprint(),
            teacher: description.to_string(),
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| ModelError::io(parent, e))?;
        }
        let tmp = covey_fs::temp_path(path);
        let file = File::create(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
        let mut out = BufWriter::new(file);
        let json = serde_json::to_vec(&header).map_err(|source| ModelError::Json { path: path.to_owned(), source })?;
        let io = |e| ModelError::io(&tmp, e);
        out.write_all(CACHE_MAGIC).map_err(io)?;
        out.write_all(&(json.len() as u32).to_le_bytes()).map_err(io)?;
        out.write_all(&json).map_err(io)?;
        let n = windows.seq_len();
        let mut order: Vec<u32> = (0..vocab as u32).collect();
        for i in 0..windows.len() {
            let logits = teacher_logits(teacher, &windows.window(i)[..n])?;
            for row in logits.chunks_exact(vocab) {
                top_k_ids(row, k, &mut order);
                for &id in &order[..k] {
                    out.write_all(&id.to_le_bytes()).map_err(io)?;
                }
                for &id in &order[..k] {
                    out.write_all(&f16::from_f32(row[id as usize]).to_le_bytes()).map_err(io)?;
                }
            }
            on_window(i + 1, windows.len());
        }
        let file = out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        covey_fs::sync_dir(dir).map_err(|e| ModelError::io(dir, e))?;
        Self::open(path, windows)
    }

    /// Open a cache and check that it was built for `windows`, and is complete.
    pub fn open(path: &Path, windows: &Windows) -> Result<Self> {
        let bad = |reason: String| ModelError::TeacherCache { path: path.to_owned(), reason };
        let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
        let mut magic = [0u8; 12];
        file.read_exact(&mut magic).map_err(|_| bad("too short to be a teacher cache".into()))?;
        if &magic[..8] != CACHE_MAGIC {
            return Err(bad("not a Covey teacher cache (wrong magic)".into()));
        }
        let header_len = u32::from_le_bytes([magic[8], magic[9], magic[10], magic[11]]) as u64;
        if header_len > 1 << 20 || 12 + header_len > len {
            return Err(bad(format!("header of {header_len} bytes does not fit the file")));
        }
        let mut json = vec![0u8; header_len as usize];
        file.read_exact(&mut json).map_err(|e| ModelError::io(path, e))?;
        let header: CacheHeader = serde_json::from_slice(&json).map_err(|e| bad(format!("bad header: {e}")))?;
        if header.version != 1 {
            return Err(bad(format!("format version {} (this build reads 1)", header.version)));
        }
        if header.top_k == 0 || header.top_k > header.vocab_size {
            return Err(bad(format!("top_k {} for a vocabulary of {}", header.top_k, header.vocab_size)));
        }
        if header.seq_len != windows.seq_len()
            || header.windows != windows.len()
            || header.fingerprint != windows.fingerprint()
        {
            return Err(bad(format!(
                "built for other data ({} windows of {} tokens, fingerprint {}…); this run has {} windows of {}: \
                 delete it or pass another --teacher-cache path",
                header.windows,
                header.seq_len,
                header.fingerprint.get(..12).unwrap_or(""),
                windows.len(),
                windows.seq_len()
            )));
        }
        let data_offset = 12 + header_len;
        let need = (Self::entry_bytes(header.top_k) as u64)
            .checked_mul(header.seq_len as u64)
            .and_then(|x| x.checked_mul(header.windows as u64))
            .ok_or_else(|| bad("sizes overflow".into()))?;
        if len != data_offset + need {
            return Err(bad(format!("{} bytes of logits, expected {need} (truncated?)", len - data_offset)));
        }
        Ok(Self { file, path: path.to_owned(), header, data_offset })
    }

    /// Token ids and logits `[seq_len · k]` each of window `i`.
    pub fn read_window(&mut self, i: usize) -> Result<(Vec<u32>, Vec<f32>)> {
        if i >= self.header.windows {
            return Err(ModelError::config("window", format!("{i} of {} windows", self.header.windows)));
        }
        let k = self.header.top_k;
        let mut buf = vec![0u8; self.window_bytes()];
        let at = self.data_offset + (i * self.window_bytes()) as u64;
        self.file.seek(SeekFrom::Start(at)).map_err(|e| ModelError::io(&self.path, e))?;
        self.file.read_exact(&mut buf).map_err(|e| ModelError::io(&self.path, e))?;
        let mut ids = Vec::with_capacity(self.header.seq_len * k);
        let mut logits = Vec::with_capacity(self.header.seq_len * k);
        for entry in buf.chunks_exact(Self::entry_bytes(k)) {
            let (id_bytes, logit_bytes) = entry.split_at(4 * k);
            for c in id_bytes.chunks_exact(4) {
                let id = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                if id as usize >= self.header.vocab_size {
                    return Err(ModelError::TeacherCache {
                        path: self.path.clone(),
                        reason: format!("token id {id} of window {i} is outside the vocabulary"),
                    });
                }
                ids.push(id);
            }
            logits.extend(logit_bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()));
        }
        Ok((ids, logits))
    }
}

/// Ids of the `k` largest values of `row`, largest first (ties: lower id first), in
/// `order[..k]`.
fn top_k_ids(row: &[f32], k: usize, order: &mut Vec<u32>) {
    order.clear();
    order.extend(0..row.len() as u32);
    let cmp = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
    if k < order.len() {
        order.select_nth_unstable_by(k - 1, cmp);
    }
    order[..k].sort_unstable_by(cmp);
}

/// Logits `[ids.len(), vocab]` of the teacher over one window, from an empty cache.
fn teacher_logits(teacher: &Model, ids: &[u32]) -> Result<Vec<f32>> {
    let mut session = teacher.session();
    Ok(teacher.forward(&mut session, ids, false)?)
}

/// Where the teacher's logits come from.
pub enum Teacher {
    /// No teacher: plain next-token training on the same windows (`α = 0`).
    None,
    /// A teacher model run on every batch.
    Live(Box<Model>),
    /// A cache of its top-`k` logits.
    Cached(TeacherCache),
}

/// Batches of windows drawn uniformly with a seeded generator, each with the teacher's
/// logits; it also times the teacher.
pub struct DistillBatches<'a> {
    windows: &'a Windows,
    teacher: &'a mut Teacher,
    rng: ChaCha8Rng,
    /// Seconds spent computing (or reading) teacher logits.
    pub teacher_seconds: f64,
}

impl<'a> DistillBatches<'a> {
    /// Batches over `windows`, seeded.
    pub fn new(windows: &'a Windows, teacher: &'a mut Teacher, seed: u64) -> Self {
        Self { windows, teacher, rng: ChaCha8Rng::seed_from_u64(seed), teacher_seconds: 0.0 }
    }
}

impl BatchSource for DistillBatches<'_> {
    fn next_batch(&mut self, batch: usize, device: &Device) -> Result<Batch> {
        let n = self.windows.seq_len();
        let picks: Vec<usize> = (0..batch).map(|_| self.rng.random_range(0..self.windows.len())).collect();
        let mut inputs = Vec::with_capacity(batch * n);
        let mut targets = Vec::with_capacity(batch * n);
        for &i in &picks {
            let w = self.windows.window(i);
            inputs.extend(w[..n].iter().map(|&t| i64::from(t)));
            targets.extend(w[1..].iter().map(|&t| i64::from(t)));
        }
        let started = Instant::now();
        let teacher = match &mut *self.teacher {
            Teacher::None => None,
            Teacher::Live(model) => {
                let vocab = model.config().vocab_size;
                let mut all = Vec::with_capacity(batch * n * vocab);
                for &i in &picks {
                    all.extend(teacher_logits(model, &self.windows.window(i)[..n])?);
                }
                Some(TeacherTargets::Dense(Tensor::from_data(TensorData::new(all, [batch, n, vocab]), device)))
            }
            Teacher::Cached(cache) => {
                let k = cache.header.top_k;
                let mut ids = Vec::with_capacity(batch * n * k);
                let mut logits = Vec::with_capacity(batch * n * k);
                for &i in &picks {
                    let (wi, wl) = cache.read_window(i)?;
                    ids.extend(wi.into_iter().map(i64::from));
                    logits.extend(wl);
                }
                Some(TeacherTargets::TopK {
                    ids: Tensor::from_data(TensorData::new(ids, [batch, n, k]), device),
                    logits: Tensor::from_data(TensorData::new(logits, [batch, n, k]), device),
                })
            }
        };
        self.teacher_seconds += started.elapsed().as_secs_f64();
        Ok(Batch {
            inputs: Tensor::from_data(TensorData::new(inputs, [batch, n]), device),
            targets: Tensor::from_data(TensorData::new(targets, [batch, n]), device),
            weights: None,
            teacher,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_device;
    use crate::train::lm_loss;

    fn logits(values: Vec<f32>, shape: [usize; 3], device: &Device) -> Tensor<3> {
        Tensor::from_data(TensorData::new(values, shape), device)
    }

    #[test]
    fn with_a_one_hot_teacher_the_loss_is_the_cross_entropy() {
        let device = cpu_device();
        let student: Vec<f32> = (0..2 * 3 * 5).map(|i| ((i * 7919) % 13) as f32 / 3.0 - 2.0).collect();
        let targets = vec![1i64, 4, 0, 2, 2, 3];
        let targets_t = Tensor::<2, Int>::from_data(TensorData::new(targets.clone(), [2, 3]), &device);
        // A teacher sure of the target: one huge logit, as a dense row and as its top-1.
        let mut dense = vec![-1e4f32; 2 * 3 * 5];
        for (pos, &t) in targets.iter().enumerate() {
            dense[pos * 5 + t as usize] = 1e4;
        }
        let ce = lm_loss(logits(student.clone(), [2, 3, 5], &device), targets_t.clone()).into_scalar::<f32>();
        for alpha in [0.0, 0.3, 1.0] {
            let loss = DistillLoss { temperature: 1.0, alpha };
            let teacher = TeacherTargets::Dense(logits(dense.clone(), [2, 3, 5], &device));
            let d = distillation_loss(logits(student.clone(), [2, 3, 5], &device), &teacher, targets_t.clone(), &loss)
                .into_scalar::<f32>();
            assert!((d - ce).abs() < 1e-5, "alpha {alpha}: {d} against cross-entropy {ce}");
            let top1 = TeacherTargets::TopK {
                ids: Tensor::from_data(TensorData::new(targets.clone(), [2, 3, 1]), &device),
                logits: logits(vec![3.0; 6], [2, 3, 1], &device),
            };
            let d = distillation_loss(logits(student.clone(), [2, 3, 5], &device), &top1, targets_t.clone(), &loss)
                .into_scalar::<f32>();
            assert!((d - ce).abs() < 1e-5, "top-1 cache, alpha {alpha}: {d} against {ce}");
        }
        // At another temperature the soft term is T² · (−log softmax(s/T)[target]): not CE.
        let hot = DistillLoss { temperature: 3.0, alpha: 1.0 };
        let teacher = TeacherTargets::Dense(logits(dense, [2, 3, 5], &device));
        let d = distillation_loss(logits(student, [2, 3, 5], &device), &teacher, targets_t, &hot).into_scalar::<f32>();
        assert!((d - ce).abs() > 1e-2, "{d} {ce}");
    }

    /// The objective on one position as plain f64 arithmetic.
    fn reference_loss(s: &[f64], t: &[f64], target: usize, temp: f64, alpha: f64) -> f64 {
        let log_softmax = |x: &[f64], temp: f64| {
            let m = x.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b / temp));
            let lse = x.iter().map(|&v| (v / temp - m).exp()).sum::<f64>().ln() + m;
            x.iter().map(|&v| v / temp - lse).collect::<Vec<_>>()
        };
        let (lq, lp, l1) = (log_softmax(s, temp), log_softmax(t, temp), log_softmax(s, 1.0));
        let kl: f64 = lp.iter().zip(&lq).map(|(p, q)| p.exp() * (p - q)).sum();
        alpha * temp * temp * kl - (1.0 - alpha) * l1[target]
    }

    #[test]
    fn the_gradient_is_scaled_by_the_temperature_as_finite_differences_say() {
        let device = cpu_device().autodiff();
        let s = [0.3f64, -1.2, 2.0, 0.5, -0.4];
        let t = [1.5f64, 0.2, -0.7, 2.2, 0.0];
        let target = 3usize;
        for (temp, alpha) in [(1.0, 0.5), (2.0, 0.5), (4.0, 0.9), (0.5, 1.0)] {
            let student = Tensor::<3>::from_data(
                TensorData::new(s.iter().map(|&x| x as f32).collect::<Vec<_>>(), [1, 1, 5]),
                &device,
            )
            .require_grad();
            let teacher = TeacherTargets::Dense(Tensor::from_data(
                TensorData::new(t.iter().map(|&x| x as f32).collect::<Vec<_>>(), [1, 1, 5]),
                &device,
            ));
            let targets = Tensor::<2, Int>::from_data(TensorData::new(vec![target as i64], [1, 1]), &device);
            let loss = DistillLoss { temperature: temp, alpha };
            let value = distillation_loss(student.clone(), &teacher, targets, &loss);
            assert!(
                (f64::from(value.clone().into_scalar::<f32>()) - reference_loss(&s, &t, target, temp, alpha)).abs()
                    < 1e-5
            );
            let grads = value.backward();
            let g: Vec<f32> = student.grad(&grads).expect("gradient").into_data().try_into_vec::<f32>().expect("f32");
            let softmax = |x: &[f64], temp: f64| {
                let e: Vec<f64> = x.iter().map(|v| (v / temp).exp()).collect();
                let z: f64 = e.iter().sum();
                e.into_iter().map(|v| v / z).collect::<Vec<_>>()
            };
            let (q_t, p_t, q_1) = (softmax(&s, temp), softmax(&t, temp), softmax(&s, 1.0));
            for j in 0..5 {
                // Central finite difference of the f64 reference.
                let h = 1e-5;
                let (mut up, mut down) = (s, s);
                up[j] += h;
                down[j] -= h;
                let fd = (reference_loss(&up, &t, target, temp, alpha)
                    - reference_loss(&down, &t, target, temp, alpha))
                    / (2.0 * h);
                // The closed form: α·T·(q_T − p_T) + (1 − α)·(q − onehot).
                let onehot = if j == target { 1.0 } else { 0.0 };
                let closed = alpha * temp * (q_t[j] - p_t[j]) + (1.0 - alpha) * (q_1[j] - onehot);
                assert!((fd - closed).abs() < 1e-6, "T {temp}: finite difference {fd}, closed form {closed}");
                assert!((f64::from(g[j]) - fd).abs() < 1e-4, "T {temp}, logit {j}: autodiff {} vs {fd}", g[j]);
            }
        }
    }

    #[test]
    fn windows_are_seeded_and_the_cache_refuses_other_data_and_truncation() {
        let tokens: Vec<u32> = (0..1000).map(|i| (i * 31 % 256) as u32).collect();
        let w = Windows::new(tokens.clone(), 16, None, 0, Path::new("t")).expect("windows");
        assert_eq!(w.len(), (1000 - 17) / 16 + 1);
        assert_eq!(w.window(1), &tokens[16..33]);
        let a = Windows::new(tokens.clone(), 16, Some(10), 3, Path::new("t")).expect("windows");
        let b = Windows::new(tokens.clone(), 16, Some(10), 3, Path::new("t")).expect("windows");
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), w.fingerprint());
        assert!(Windows::new(vec![1, 2], 16, None, 0, Path::new("short.txt")).is_err());

        let config = covey_infer::LlamaConfig::tiny();
        let teacher =
            Model::from_tensors(config.clone(), &covey_infer::random_tensors(&config, 1), covey_infer::Precision::F32)
                .expect("teacher");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("teacher.topk");
        let mut cache = TeacherCache::build(&path, &teacher, "tiny", &a, 8, &mut |_, _| {}).expect("build");
        // The cached ids and logits are the teacher's 8 largest, largest first.
        let (ids, vals) = cache.read_window(2).expect("read");
        let full = teacher_logits(&teacher, &a.window(2)[..16]).expect("logits");
        for pos in 0..16 {
            let row = &full[pos * 256..(pos + 1) * 256];
            let mut sorted: Vec<f32> = row.to_vec();
            sorted.sort_by(|x, y| y.total_cmp(x));
            for j in 0..8 {
                let id = ids[pos * 8 + j] as usize;
                assert!((vals[pos * 8 + j] - row[id]).abs() <= row[id].abs() * 1e-3 + 1e-3);
                assert!((row[id] - sorted[j]).abs() < 1e-6, "position {pos}, rank {j}");
            }
        }
        let err = TeacherCache::open(&path, &w).err().expect("other windows").to_string();
        assert!(err.contains("built for other data"), "{err}");
        let bytes = std::fs::read(&path).expect("read");
        std::fs::write(&path, &bytes[..bytes.len() - 7]).expect("write");
        let err = TeacherCache::open(&path, &a).err().expect("truncated").to_string();
        assert!(err.contains("truncated"), "{err}");
        std::fs::write(&path, b"not a cache at all").expect("write");
        assert!(TeacherCache::open(&path, &a).err().expect("magic").to_string().contains("magic"));
    }
}
