//! The on-device recipe's commands: `distill`, `prune`, `bench-distill`.

use std::path::PathBuf;

use crate::pipeline::{self, DistillOptions, DistillResult, ModelFigures, PruneOptions, StudentInit};
use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use clap::{Args, ValueEnum};
use covey_model::distill::DistillLoss;
use covey_model::prune::{Importance, PruneConfig};
use covey_model::{LlamaConfig, TrainConfig};

use crate::TrainArgs;
use crate::deploy::PrecisionArg;

/// The student's shape when it starts fresh.
#[derive(Args, Clone)]
pub struct StudentShape {
    /// Width of the residual stream.
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    /// Decoder layers.
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 8)]
    heads: usize,
    /// Key/value heads (grouped-query attention).
    #[arg(long, default_value_t = 2)]
    kv_heads: usize,
    /// SwiGLU width.
    #[arg(long, default_value_t = 384)]
    intermediate: usize,
    /// Context length.
    #[arg(long, default_value_t = 512)]
    max_seq: usize,
}

impl StudentShape {
    fn config(&self) -> LlamaConfig {
        crate::shape(self.hidden, self.layers, self.heads, self.kv_heads, self.intermediate, self.max_seq)
    }
}

/// Temperature and α.
#[derive(Args, Clone)]
pub struct LossArgs {
    /// Softening temperature T of the teacher and student distributions.
    #[arg(long, default_value_t = 2.0)]
    temperature: f64,
    /// Weight of the teacher term (1 − alpha weighs the cross-entropy with the text);
    /// 0 trains on the text alone, the from-scratch baseline.
    #[arg(long, default_value_t = 0.5)]
    alpha: f64,
}

impl LossArgs {
    fn loss(&self) -> DistillLoss {
        DistillLoss { temperature: self.temperature, alpha: self.alpha }
    }
}

/// Where the text comes from.
#[derive(Args, Clone)]
pub struct DataArgs {
    /// Training corpus (.txt / .jsonl / directory).
    #[arg(long, default_value = "data/shakespeare")]
    data: PathBuf,
    /// Held-out corpus (default: `--holdout` whole plays of --data, as `pretrain` holds
    /// them out, so the shipped model's held-out plays stay unseen).
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Whole plays held out when --eval-data is absent.
    #[arg(long, default_value_t = 4)]
    holdout: usize,
    /// Held-out tokens scored.
    #[arg(long, default_value_t = 32_768)]
    eval_tokens: usize,
}

#[derive(Args)]
pub struct DistillArgs {
    /// Teacher: a GGUF file or a model directory; it also gives the tokenizer.
    #[arg(long, default_value = "models/shakespeare-byte")]
    teacher: PathBuf,
    /// Weights the teacher runs with.
    #[arg(long, value_enum, default_value_t = PrecisionArg::F32)]
    teacher_precision: PrecisionArg,
    /// Start from this model directory instead of a fresh student.
    #[arg(long)]
    student: Option<PathBuf>,
    #[command(flatten)]
    shape: StudentShape,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    loss: LossArgs,
    /// Cache the teacher's top-k logits per position in this file (built on the first
    /// run, reused by later runs on the same windows); without it the teacher runs on
    /// every batch.
    #[arg(long)]
    teacher_cache: Option<PathBuf>,
    /// Logits per position kept in the cache.
    #[arg(long, default_value_t = 16)]
    top_k: usize,
    /// Train on at most this many windows of the corpus (a seeded choice).
    #[arg(long)]
    max_windows: Option<usize>,
    /// Score the held-out text every this many steps.
    #[arg(long, default_value_t = 100)]
    eval_every: usize,
    /// Output model directory.
    #[arg(long, default_value = "runs/student")]
    out: PathBuf,
    #[command(flatten)]
    train: TrainArgs,
}

fn print_figures(label: &str, f: &ModelFigures) {
    println!("{label:<18} {:>10} parameters   held-out perplexity {:.4}", f.params, f.perplexity);
}

fn print_distill(r: &DistillResult) {
    if let Some(t) = &r.teacher {
        print_figures("teacher", t);
    }
    print_figures("student (start)", &r.student_before);
    print_figures("student", &r.student);
    println!(
        "{} windows, {} tokens in {:.1} s: {:.0} tokens/s (teacher: {}, {:.1} s of it)",
        r.windows, r.train_tokens, r.train_seconds, r.tokens_per_second, r.teacher_mode, r.teacher_seconds
    );
    if r.cache_build_seconds > 0.0 {
        println!("teacher cache built in {:.1} s", r.cache_build_seconds);
    }
}

pub fn distill(a: DistillArgs, device: &Device) -> Result<()> {
    let opts = DistillOptions {
        teacher: Some(a.teacher.clone()),
        teacher_precision: a.teacher_precision.into(),
        student: match &a.student {
            Some(dir) => StudentInit::From(dir.clone()),
            None => StudentInit::Fresh(a.shape.config()),
        },
        data: a.data.data.clone(),
        eval_data: a.data.eval_data.clone(),
        holdout: a.data.holdout,
        loss: a.loss.loss(),
        cache: a.teacher_cache.clone(),
        top_k: a.top_k,
        max_windows: a.max_windows,
        train: a.train.config(400, 3e-3),
        eval_tokens: a.data.eval_tokens,
        eval_every: a.eval_every,
        out: a.out.clone(),
        progress: true,
    };
    let what = if opts.loss.alpha > 0.0 { "distilling" } else { "training on the text alone (alpha 0)" };
    println!("{what}: {} steps of {} × {} tokens", opts.train.steps, opts.train.batch_size, opts.train.seq_len);
    let r = pipeline::distill(&opts, device)?;
    print_distill(&r);
    println!("student written to {} (metrics.json, train_log.csv)", a.out.display());
    Ok(())
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ImportanceArg {
    /// Weight norms.
    Magnitude,
    /// Activations on calibration text times outgoing weight norms.
    Activation,
    /// First-order Taylor estimate of the loss change (weights × gradients) on calibration text.
    Gradient,
}

#[derive(Args)]
pub struct PruneArgs {
    /// The model to prune (model directory or GGUF file).
    #[arg(long)]
    model: PathBuf,
    /// Output model directory.
    #[arg(long)]
    out: PathBuf,
    /// Fraction of attention heads to remove (whole GQA groups or the same number per group).
    #[arg(long, default_value_t = 0.3)]
    heads: f64,
    /// Fraction of MLP channels to remove.
    #[arg(long, default_value_t = 0.3)]
    mlp: f64,
    /// Keep a multiple of this many channels (int4 groups and GGUF blocks need 32).
    #[arg(long, default_value_t = 32)]
    channel_multiple: usize,
    /// How heads and channels are ranked.
    #[arg(long, value_enum, default_value_t = ImportanceArg::Activation)]
    importance: ImportanceArg,
    /// Windows of calibration text for activation and gradient scores.
    #[arg(long, default_value_t = 64)]
    calibration_windows: usize,
    #[command(flatten)]
    data: DataArgs,
    /// Recovery: distil from this teacher instead of training on the text alone.
    #[arg(long)]
    teacher: Option<PathBuf>,
    #[command(flatten)]
    loss: LossArgs,
    /// Recovery fine-tune: --steps N (all weights; 0 skips it).
    #[command(flatten)]
    train: TrainArgs,
}

pub fn prune(a: PruneArgs, device: &Device) -> Result<()> {
    let recover = a.train.config(0, 1e-3);
    let opts = PruneOptions {
        model: a.model.clone(),
        out: a.out.clone(),
        prune: PruneConfig { head_ratio: a.heads, mlp_ratio: a.mlp, channel_multiple: a.channel_multiple },
        importance: match a.importance {
            ImportanceArg::Magnitude => Importance::Magnitude,
            ImportanceArg::Activation => Importance::Activation,
            ImportanceArg::Gradient => Importance::Gradient,
        },
        data: a.data.data.clone(),
        eval_data: a.data.eval_data.clone(),
        holdout: a.data.holdout,
        calibration_windows: a.calibration_windows,
        recover,
        teacher: a.teacher.clone(),
        loss: a.loss.loss(),
        eval_tokens: a.data.eval_tokens,
        progress: true,
    };
    let r = pipeline::prune(&opts, device)?;
    println!("{}", r.summary);
    print_figures("before", &r.before);
    print_figures("pruned", &r.pruned);
    if let Some(f) = &r.recovered {
        print_figures("recovered", f);
        println!(
            "held-out perplexity {:+.2}% against the unpruned model",
            100.0 * (f.perplexity / r.before.perplexity - 1.0)
        );
    }
    println!(
        "model.safetensors {:.2} MB → {:.2} MB; written to {} (prune.json)",
        r.file_bytes.0 as f64 / 1e6,
        r.file_bytes.1 as f64 / 1e6,
        a.out.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct DistillBenchArgs {
    /// Teacher (GGUF file or model directory).
    #[arg(long, default_value = "models/shakespeare-byte")]
    teacher: PathBuf,
    /// Timed optimizer steps of each mode.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Logits per position in the cache.
    #[arg(long, default_value_t = 16)]
    top_k: usize,
    /// Data-parallel shards of each batch, one thread each.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[command(flatten)]
    shape: StudentShape,
    /// Training corpus.
    #[arg(long, default_value = "data/shakespeare")]
    data: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Distillation tokens/s with the teacher run live and read from a cache (and without
/// teacher, for scale), over the same windows.
pub fn bench(a: DistillBenchArgs, device: &Device) -> Result<()> {
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let dir = std::env::temp_dir().join(format!("covey-bench-distill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let windows = a.steps * a.batch_size;
    let run = |alpha: f64, cache: Option<PathBuf>, tag: &str| -> Result<DistillResult> {
        Ok(pipeline::distill(
            &DistillOptions {
                teacher: Some(a.teacher.clone()),
                teacher_precision: covey_model::Precision::F32,
                student: StudentInit::Fresh(a.shape.config()),
                data: a.data.clone(),
                eval_data: None,
                holdout: 4,
                loss: DistillLoss { temperature: 2.0, alpha },
                cache,
                top_k: a.top_k,
                max_windows: Some(windows),
                train: TrainConfig {
                    steps: a.steps,
                    batch_size: a.batch_size,
                    seq_len: a.seq_len,
                    warmup_steps: 1,
                    threads: a.threads,
                    ..TrainConfig::default()
                },
                eval_tokens: 2_048,
                eval_every: 0,
                out: dir.join(tag),
                progress: false,
            },
            device,
        )?)
    };
    let cache = dir.join("teacher.topk");
    let live = run(0.5, None, "live")?;
    let built = run(0.5, Some(cache.clone()), "build")?;
    let cached = run(0.5, Some(cache), "cached")?;
    let none = run(0.0, None, "none")?;
    let _ = std::fs::remove_dir_all(&dir);
    if a.json {
        let j = serde_json::json!({
            "steps": a.steps, "batch_size": a.batch_size, "seq_len": a.seq_len, "top_k": a.top_k,
            "live_tokens_per_second": live.tokens_per_second,
            "cached_tokens_per_second": cached.tokens_per_second,
            "no_teacher_tokens_per_second": none.tokens_per_second,
            "live_teacher_seconds": live.teacher_seconds,
            "cached_teacher_seconds": cached.teacher_seconds,
            "cache_build_seconds": built.cache_build_seconds,
        });
        println!("{j}");
    } else {
        println!(
            "distillation, {} steps of {} × {} tokens, student {} parameters, teacher {}",
            a.steps,
            a.batch_size,
            a.seq_len,
            live.student.params,
            live.teacher.as_ref().map_or(0, |t| t.params)
        );
        println!(
            "teacher live         {:>8.0} tokens/s  ({:.1} s in the teacher)",
            live.tokens_per_second, live.teacher_seconds
        );
        println!(
            "teacher cached top-{:<2} {:>8.0} tokens/s  ({:.2} s reading the cache; built once in {:.1} s)",
            a.top_k, cached.tokens_per_second, cached.teacher_seconds, built.cache_build_seconds
        );
        println!("no teacher (alpha 0) {:>8.0} tokens/s", none.tokens_per_second);
    }
    Ok(())
}
