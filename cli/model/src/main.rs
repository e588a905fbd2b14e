//! `covey-model`: pretrain, fine-tune, evaluate, merge and inspect Covey student
//! models; import real ones (GGUF), quantize, export (safetensors, GGUF, ONNX), generate,
//! chat, print logits; measure training and inference speed.

mod bench;
mod deploy;
mod pipeline;
mod progress;
mod recipe;

use std::path::{Path, PathBuf};

use crate::pipeline::{FinetuneOptions, PretrainOptions};
use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::tensor::Device;
use clap::{Args, Parser, Subcommand, ValueEnum};
use covey_model::checkpoint;
use covey_model::data;
use covey_model::{LlamaConfig, LoraConfig, LoraTarget, SamplingConfig, Tokenizer, TrainConfig};

#[derive(Parser)]
#[command(name = "covey-model", version, about = "Covey student LM: pretrain, LoRA fine-tune, evaluate, generate")]
struct Cli {
    /// Compute device (training commands).
    #[arg(long, value_enum, default_value_t = Backend::Cpu, global = true)]
    device: Backend,
    /// Threads of the inference engine (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    /// burn's flex CPU backend.
    Cpu,
    /// wgpu (needs the `gpu` cargo feature).
    Gpu,
}

#[derive(Subcommand)]
enum Command {
    /// Pretrain a byte-level model from scratch, holding out whole plays.
    Pretrain(PretrainArgs),
    /// Fine-tune LoRA adapters on a corpus or one Shakespeare role.
    Finetune(FinetuneArgs),
    /// Held-out NLL, perplexity, bits per byte, top-1 and top-3 accuracy.
    Eval(EvalArgs),
    /// Import a GGUF file (llama.cpp) into a model directory.
    Import(deploy::ImportArgs),
    /// Quantize a model's weights to int8 or int4.
    Quantize(deploy::QuantizeArgs),
    /// Export to safetensors (Hugging Face), GGUF (llama.cpp) or ONNX (ONNX Runtime).
    Export(deploy::ExportArgs),
    /// Generate text from a prompt (model directory or GGUF file).
    Generate(deploy::GenerateArgs),
    /// Chat with an instruct model through its chat template.
    Chat(deploy::ChatArgs),
    /// Print the top-k logits at every prompt position (`--json` for scripts).
    Logits(deploy::LogitsArgs),
    /// Held-out perplexity of a model in f32, int8 and int4.
    Perplexity(deploy::PerplexityArgs),
    /// Decode and prompt tokens/s of a model in f32, int8 and int4.
    BenchInfer(deploy::InferBenchArgs),
    /// Distil a teacher (GGUF or model directory) into a smaller student.
    Distill(recipe::DistillArgs),
    /// Remove attention heads and MLP channels; optionally fine-tune to recover.
    Prune(recipe::PruneArgs),
    /// Distillation tokens/s with the teacher live, cached, and absent.
    BenchDistill(recipe::DistillBenchArgs),
    /// Merge an adapter into the base weights and save the merged model.
    Merge(MergeArgs),
    /// Describe a model (and adapter) directory.
    Info(InfoArgs),
    /// Training tokens/s and peak RSS of the fixed LoRA benchmark configuration.
    Bench(BenchArgs),
    /// Pretrain, then fine-tune on a held-out role, and show before/after figures.
    Demo(DemoArgs),
}

#[derive(Args, Clone)]
struct ModelShape {
    /// Width of the residual stream.
    #[arg(long, default_value_t = 192)]
    hidden: usize,
    /// Decoder layers.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Key/value heads (grouped-query attention).
    #[arg(long, default_value_t = 4)]
    kv_heads: usize,
    /// SwiGLU width.
    #[arg(long, default_value_t = 512)]
    intermediate: usize,
    /// Context length.
    #[arg(long, default_value_t = 512)]
    max_seq: usize,
}

/// A model shape from the command line's six numbers (hidden, layers, heads, KV heads,
/// SwiGLU width, context); the rest are the defaults.
fn shape(
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    intermediate: usize,
    max_seq: usize,
) -> LlamaConfig {
    LlamaConfig {
        hidden_size: hidden,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        intermediate_size: intermediate,
        max_position_embeddings: max_seq,
        ..LlamaConfig::default()
    }
}

impl ModelShape {
    fn config(&self) -> LlamaConfig {
        shape(self.hidden, self.layers, self.heads, self.kv_heads, self.intermediate, self.max_seq)
    }
}

#[derive(Args, Clone)]
struct TrainArgs {
    /// Optimizer steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Warm-up steps.
    #[arg(long)]
    warmup: Option<usize>,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Global gradient-norm clip (0 disables).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Seed of initialisation, batches and hold-out choice.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Data-parallel shards of each batch, one thread each.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// LoRA: MiB of layer activations kept between the passes instead of recomputed
    /// (more is faster; 0 is the least memory).
    #[arg(long, default_value_t = 64)]
    activation_memory_mib: usize,
}

impl TrainArgs {
    fn config(&self, default_steps: usize, default_lr: f64) -> TrainConfig {
        let steps = self.steps.unwrap_or(default_steps);
        TrainConfig {
            steps,
            batch_size: self.batch_size,
            seq_len: self.seq_len,
            grad_accum: self.grad_accum,
            lr: self.lr.unwrap_or(default_lr),
            min_lr_ratio: 0.1,
            warmup_steps: self.warmup.unwrap_or((steps / 20).max(1)),
            weight_decay: self.weight_decay,
            max_grad_norm: (self.max_grad_norm > 0.0).then_some(self.max_grad_norm),
            seed: self.seed,
            threads: self.threads,
            activation_memory_mib: self.activation_memory_mib,
        }
    }
}

#[derive(Args, Clone)]
struct LoraArgs {
    /// Adapter rank.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// Adapter alpha (scale = alpha / rank).
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// Dropout on the adapter input.
    #[arg(long, default_value_t = 0.0)]
    lora_dropout: f64,
    /// Projections with adapters, comma-separated: q,k,v,o,gate,up,down.
    #[arg(long, default_value = "q,k,v,o,gate,up,down")]
    targets: String,
    /// FFA-LoRA: freeze A, train only B.
    #[arg(long)]
    ffa: bool,
    /// Seed of the A initialisation (shared by all clients of a federation).
    #[arg(long, default_value_t = 0)]
    lora_seed: u64,
}

impl LoraArgs {
    fn config(&self) -> Result<LoraConfig> {
        let targets = self
            .targets
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                LoraTarget::parse(s)
                    .with_context(|| format!("--targets: unknown projection `{s}` (use q,k,v,o,gate,up,down)"))
            })
            .collect::<Result<Vec<_>>>()?;
        let cfg = LoraConfig {
            rank: self.rank,
            alpha: self.alpha,
            dropout: self.lora_dropout,
            targets,
            ffa: self.ffa,
            seed: self.lora_seed,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[derive(Args)]
struct PretrainArgs {
    /// Corpus: a .txt / .jsonl file or a directory of them.
    #[arg(long, default_value = "data/shakespeare")]
    data: PathBuf,
    /// Output model directory.
    #[arg(long, default_value = "runs/base")]
    out: PathBuf,
    /// Whole plays held out for evaluation.
    #[arg(long, default_value_t = 4)]
    holdout: usize,
    /// Cap on held-out tokens scored.
    #[arg(long, default_value_t = 200_000)]
    eval_tokens: usize,
    #[command(flatten)]
    shape: ModelShape,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(Args)]
struct FinetuneArgs {
    /// Base model directory.
    #[arg(long, default_value = "runs/base")]
    base: PathBuf,
    /// Training corpus (.txt / .jsonl / directory); with --role, the Shakespeare directory.
    #[arg(long, default_value = "data/shakespeare")]
    data: PathBuf,
    /// Fine-tune on one speaking role: PLAY:SPEAKER, e.g. `hamlet_gut.txt:Ham`. Every
    /// tenth speech is held out.
    #[arg(long)]
    role: Option<String>,
    /// Held-out corpus (without --role; default: the last 10% of the corpus).
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Output adapter directory.
    #[arg(long, default_value = "runs/adapter")]
    out: PathBuf,
    #[command(flatten)]
    lora: LoraArgs,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(Args)]
struct EvalArgs {
    /// Model directory.
    #[arg(long, default_value = "runs/base")]
    model: PathBuf,
    /// Adapter directory to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Text to score (.txt / .jsonl / directory).
    #[arg(long)]
    data: PathBuf,
    /// Window length.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Cap on tokens scored.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct MergeArgs {
    /// Base model directory.
    #[arg(long)]
    model: PathBuf,
    /// Adapter directory.
    #[arg(long)]
    adapter: PathBuf,
    /// Output directory of the merged model.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct InfoArgs {
    /// Model directory.
    #[arg(long, default_value = "runs/base")]
    model: PathBuf,
    /// Adapter directory.
    #[arg(long)]
    adapter: Option<PathBuf>,
}

#[derive(Args)]
struct BenchArgs {
    /// Timed optimizer steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Data-parallel shards of each batch, one thread each.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Fine-tune this real model (GGUF file or model directory) instead: sequence 128,
    /// batch 4, rank 8.
    #[arg(long)]
    model: Option<PathBuf>,
    /// With --model: the base held in f32 (LoRA) or quantized (QLoRA; int8 is what a
    /// coordinator releases by default).
    #[arg(long, value_enum, default_value_t = BaseArg::Int8)]
    base: BaseArg,
    /// MiB of layer activations the trainer keeps between the passes instead of
    /// recomputing them (the agents' default is 64; 0 is the least memory).
    #[arg(long, default_value_t = 64)]
    activation_memory_mib: usize,
    /// Example-level DP-SGD: clip every sequence's gradient to this L2 norm (and add
    /// noise, `--example-noise`).
    #[arg(long)]
    example_clip: Option<f64>,
    /// With --example-clip: the noise multiplier.
    #[arg(long, default_value_t = 1.0)]
    example_noise: f64,
    /// Which trainer: covey (what agents run) or burn (autodiff reference).
    #[arg(long, value_enum, default_value_t = EngineArg::Covey)]
    engine: EngineArg,
    /// With --model: the text to train on.
    #[arg(long, default_value = "data/shakespeare/hamlet_gut.txt")]
    data: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum EngineArg {
    Covey,
    Burn,
}

#[derive(Clone, Copy, ValueEnum)]
enum BaseArg {
    F32,
    Int8,
    Int4,
}

#[derive(Args)]
struct DemoArgs {
    /// The Shakespeare directory shipped with the repository.
    #[arg(long, default_value = "data/shakespeare")]
    data: PathBuf,
    /// Where the base model and the adapter are written.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// Pretraining steps (batch 16 × 128 bytes).
    #[arg(long, default_value_t = 400)]
    pretrain_steps: usize,
    /// Fine-tuning steps.
    #[arg(long, default_value_t = 60)]
    finetune_steps: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log piped to a file stays plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new().num_threads(n.max(1)).build_global().context("starting the thread pool")?;
    }
    let device = device(cli.device)?;
    match cli.command {
        Command::Pretrain(a) => pretrain(a, &device),
        Command::Finetune(a) => finetune(a, &device),
        Command::Eval(a) => eval(a, &device),
        Command::Import(a) => deploy::import(a),
        Command::Quantize(a) => deploy::quantize(a),
        Command::Export(a) => deploy::export(a),
        Command::Generate(a) => deploy::generate(a),
        Command::Chat(a) => deploy::chat(a),
        Command::Logits(a) => deploy::logits(a),
        Command::Perplexity(a) => deploy::perplexity(a),
        Command::BenchInfer(a) => deploy::infer_bench(a).map(|_| ()),
        Command::Distill(a) => recipe::distill(a, &device),
        Command::Prune(a) => recipe::prune(a, &device),
        Command::BenchDistill(a) => recipe::bench(a, &device),
        Command::Merge(a) => merge(a, &device),
        Command::Info(a) => info(a, &device),
        Command::Bench(a) => bench(a),
        Command::Demo(a) => demo(a, &device),
    }
}

fn device(backend: Backend) -> Result<Device> {
    match backend {
        Backend::Cpu => Ok(covey_model::cpu_device()),
        #[cfg(feature = "gpu")]
        Backend::Gpu => Ok(covey_model::gpu_device()),
        #[cfg(not(feature = "gpu"))]
        Backend::Gpu => bail!("--device gpu needs a build with `--features gpu`"),
    }
}

fn print_metrics(label: &str, m: &covey_model::EvalMetrics) {
    println!(
        "{label:<12} nll {:.4}  ppl {:>8.3}  bits/byte {:.4}  top-1 {:>5.1}%  top-3 {:>5.1}%  ({} tokens)",
        m.mean_nll,
        m.perplexity,
        m.bits_per_byte,
        100.0 * m.top1,
        100.0 * m.top3,
        m.tokens
    );
}

fn pretrain(a: PretrainArgs, device: &Device) -> Result<()> {
    let opts = PretrainOptions {
        data: a.data,
        out: a.out.clone(),
        holdout: a.holdout,
        model: a.shape.config(),
        train: a.train.config(1400, 3e-3),
        eval_tokens: a.eval_tokens,
        progress: true,
    };
    println!("pretraining {} parameters for {} steps", opts.model.num_params(), opts.train.steps);
    let r = pipeline::pretrain(&opts, device)?;
    println!("held out: {}", r.holdout.join(", "));
    println!(
        "trained on {} tokens in {:.0} s ({:.0} tokens/s), final loss {:.3}",
        r.train_tokens,
        r.train_seconds,
        r.train_tokens as f64 / r.train_seconds,
        r.final_train_loss
    );
    print_metrics("held-out", &r.heldout);
    println!("model written to {}", a.out.display());
    Ok(())
}

fn role_texts(dir: &Path, role: &str) -> Result<(String, String)> {
    let (play, speaker) = role.split_once(':').context("--role must be PLAY:SPEAKER, e.g. hamlet_gut.txt:Ham")?;
    let path = dir.join(play);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let (train, test) = data::role_split(&text, speaker);
    if train.is_empty() || test.is_empty() {
        let known = data::roles_by_size(&text).into_iter().take(8).map(|(s, _)| s).collect::<Vec<_>>().join(", ");
        bail!("{}: speaker `{speaker}` has too few speeches (largest roles: {known})", path.display());
    }
    Ok((train, test))
}

fn finetune(a: FinetuneArgs, device: &Device) -> Result<()> {
    let (train_text, eval_text) = match (&a.role, &a.eval_data) {
        (Some(role), _) => role_texts(&a.data, role)?,
        (None, Some(eval)) => (join(&data::load_corpus(&a.data)?), join(&data::load_corpus(eval)?)),
        (None, None) => {
            let text = join(&data::load_corpus(&a.data)?);
            let mut cut = text.len() * 9 / 10;
            while !text.is_char_boundary(cut) {
                cut += 1;
            }
            (text[..cut].to_string(), text[cut..].to_string())
        }
    };
    let opts = FinetuneOptions {
        base: a.base,
        train_text,
        eval_text,
        lora: a.lora.config()?,
        train: a.train.config(100, 3e-3),
        out: a.out.clone(),
        progress: true,
    };
    let r = pipeline::finetune(&opts, device)?;
    println!("{} trainable parameters, {} tokens in {:.1} s", r.trainable_params, r.train_tokens, r.train_seconds);
    print_metrics("base", &r.base);
    print_metrics("fine-tuned", &r.tuned);
    println!("held-out perplexity {:+.1}%", -100.0 * r.perplexity_gain());
    println!("adapter written to {}", a.out.display());
    Ok(())
}

fn join(docs: &[data::Document]) -> String {
    docs.iter().map(|d| d.text.as_str()).collect::<Vec<_>>().join("\n\n")
}

fn load(model: &Path, adapter: Option<&Path>, device: &Device) -> Result<(covey_model::Llama, Tokenizer)> {
    let tokenizer = Tokenizer::for_model_dir(model)?;
    let mut m = checkpoint::load_model(model, device)?;
    if let Some(dir) = adapter {
        m = checkpoint::load_adapter(m, dir, device)?;
    }
    if m.config.vocab_size < tokenizer.vocab_size() {
        bail!(
            "{}: the tokenizer has {} entries but the model only {}",
            model.display(),
            tokenizer.vocab_size(),
            m.config.vocab_size
        );
    }
    Ok((m, tokenizer))
}

fn eval(a: EvalArgs, device: &Device) -> Result<()> {
    let (model, tokenizer) = load(&a.model, a.adapter.as_deref(), device)?;
    let text = join(&data::load_corpus(&a.data)?);
    let tokens = tokenizer.encode(&text)?;
    let m = covey_model::eval::evaluate(
        &model,
        &tokens,
        a.seq_len,
        8,
        text.len() as f64 / tokens.len().max(1) as f64,
        a.max_tokens,
        device,
    )?;
    if a.json {
        println!("{}", serde_json::to_string(&m)?);
    } else {
        print_metrics("eval", &m);
    }
    Ok(())
}

fn merge(a: MergeArgs, device: &Device) -> Result<()> {
    let (model, tokenizer) = load(&a.model, Some(&a.adapter), device)?;
    let merged = model.merge_lora();
    checkpoint::save_model(&merged, &tokenizer, &a.out)?;
    println!("merged model written to {}", a.out.display());
    Ok(())
}

fn info(a: InfoArgs, device: &Device) -> Result<()> {
    let (model, tokenizer) = load(&a.model, a.adapter.as_deref(), device)?;
    let c = &model.config;
    println!("model       {}", a.model.display());
    println!("parameters  {}", c.num_params());
    println!(
        "shape       hidden {} · layers {} · heads {} (kv {}) · intermediate {} · vocab {} · context {}",
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.intermediate_size,
        c.vocab_size,
        c.max_position_embeddings
    );
    println!("rope theta  {}  · tied embeddings {}", c.rope_theta, c.tie_word_embeddings);
    println!(
        "tokenizer   {}",
        match tokenizer {
            Tokenizer::Bytes => "bytes (built in)".to_string(),
            Tokenizer::HuggingFace(_) => format!("tokenizer.json, {} entries", tokenizer.vocab_size()),
        }
    );
    let size = std::fs::metadata(a.model.join(checkpoint::MODEL_FILE)).map(|m| m.len()).unwrap_or(0);
    println!("file        {} ({:.2} MB)", checkpoint::MODEL_FILE, size as f64 / 1e6);
    if let Some(lora) = &model.lora {
        let n: usize = checkpoint::adapter_tensors(&model)?.values().map(|t| t.data.len()).sum();
        let targets: Vec<_> = lora.targets.iter().map(|t| t.hf_name()).collect();
        println!(
            "adapter     rank {} · alpha {} · targets {} · FFA {} · {} parameters",
            lora.rank,
            lora.alpha,
            targets.join(","),
            lora.ffa,
            n
        );
    }
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    let engine = match a.engine {
        EngineArg::Covey => crate::bench::Engine::Covey,
        EngineArg::Burn => crate::bench::Engine::Burn,
    };
    let run = crate::bench::BenchRun {
        steps: a.steps,
        warmup: a.warmup,
        threads: a.threads,
        keep_mib: a.activation_memory_mib,
        engine,
        example_dp: a.example_clip.map(|clip| covey_model::ExampleDp { clip, noise_multiplier: a.example_noise }),
    };
    let r = match &a.model {
        None => crate::bench::lora_training(run)?,
        Some(path) => {
            let text = std::fs::read_to_string(&a.data).with_context(|| format!("reading {}", a.data.display()))?;
            let base = match a.base {
                BaseArg::F32 => crate::bench::BaseWeights::F32,
                BaseArg::Int8 => crate::bench::BaseWeights::Int8,
                BaseArg::Int4 => crate::bench::BaseWeights::Int4,
            };
            crate::bench::lora_real(path, &text, base, run)?
        }
    };
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("config            {}", r.config);
        println!("parameters        {} base, {} trainable", r.params, r.trainable);
        println!(
            "training          {:.0} tokens/s ({:.1} ms/step over {} steps)",
            r.tokens_per_second, r.ms_per_step, r.steps
        );
        match r.peak_rss_mib {
            Some(m) => println!(
                "peak RSS          {m:.1} MiB (whole process; {:.1} MiB resident when training started)",
                r.rss_before_training_mib.unwrap_or(f64::NAN)
            ),
            None => println!("peak RSS          not reported on this OS"),
        }
    }
    Ok(())
}

fn demo(a: DemoArgs, device: &Device) -> Result<()> {
    let base_dir = a.out.join("base");
    let opts = PretrainOptions {
        data: a.data.clone(),
        out: base_dir.clone(),
        holdout: 4,
        model: LlamaConfig { hidden_size: 192, intermediate_size: 512, ..LlamaConfig::default() },
        train: TrainConfig {
            steps: a.pretrain_steps,
            batch_size: 16,
            warmup_steps: (a.pretrain_steps / 20).max(1),
            seed: a.seed,
            threads: 2,
            ..TrainConfig::default()
        },
        eval_tokens: 100_000,
        progress: true,
    };
    println!(
        "1/2  pretraining a {}-parameter byte-level model on Shakespeare ({} steps)",
        opts.model.num_params(),
        opts.train.steps
    );
    let p = pipeline::pretrain(&opts, device)?;
    println!("     held-out plays: {}", p.holdout.join(", "));
    print_metrics("     held-out", &p.heldout);
    let play = p.holdout.first().context("no play was held out")?;
    let text = std::fs::read_to_string(a.data.join(play)).with_context(|| format!("reading {play}"))?;
    let (speaker, _) = data::roles_by_size(&text).into_iter().next().context("the held-out play has no speeches")?;
    let (train_text, eval_text) = role_texts(&a.data, &format!("{play}:{speaker}"))?;
    println!("2/2  LoRA fine-tuning on the role `{speaker}` of {play} (unseen in pretraining)");
    let f = pipeline::finetune(
        &FinetuneOptions {
            base: base_dir.clone(),
            train_text,
            eval_text,
            lora: LoraConfig { targets: LoraTarget::ALL.to_vec(), ..LoraConfig::default() },
            train: TrainConfig {
                steps: a.finetune_steps,
                batch_size: 16,
                warmup_steps: 5,
                seed: a.seed,
                threads: 2,
                ..TrainConfig::default()
            },
            out: a.out.join("adapter"),
            progress: true,
        },
        device,
    )?;
    print_metrics("     base", &f.base);
    print_metrics("     tuned", &f.tuned);
    println!(
        "     role perplexity {:.3} → {:.3} ({:+.1}%)",
        f.base.perplexity,
        f.tuned.perplexity,
        -100.0 * f.perplexity_gain()
    );
    let (model, tokenizer) = load(&base_dir, Some(&a.out.join("adapter")), device)?;
    let prompt = format!("{speaker}.\n");
    let cfg = SamplingConfig {
        max_new_tokens: 240,
        temperature: 0.7,
        top_k: Some(40),
        seed: a.seed,
        ..SamplingConfig::default()
    };
    let out = covey_model::generate::generate(&model.valid(), &tokenizer.encode(&prompt)?, &cfg, None, device)?;
    println!("\nsample:\n{prompt}{}", tokenizer.decode(&out)?);
    println!("\nbase model in {}, adapter in {}", base_dir.display(), a.out.join("adapter").display());
    Ok(())
}
