//! The real-model commands of `covey-model`: import, quantize, export, generate, chat,
//! logits and the inference benchmark. They run on `covey-infer` (no burn).

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use covey_gguf::GgmlType;
use covey_model::artifact::LoadedModel;
use covey_model::chat::Message;
use covey_model::{KernelPath, Precision, SamplingConfig, checkpoint, export};
use covey_tensors::quant::Scheme;

#[derive(Clone, Copy, ValueEnum)]
pub enum PrecisionArg {
    /// f32 weights.
    F32,
    /// int8 per output channel.
    Int8,
    /// int4 group-wise (group 32); embedding int8.
    Int4,
}

impl From<PrecisionArg> for Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::Int8 => Precision::Int8,
            PrecisionArg::Int4 => Precision::Int4,
        }
    }
}

#[derive(Args)]
pub struct ImportArgs {
    /// A GGUF file (e.g. SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(long)]
    pub model: PathBuf,
    /// Output model directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Store the weights as f32 (default), int8 or int4.
    #[arg(long, value_enum, default_value_t = PrecisionArg::F32)]
    pub precision: PrecisionArg,
}

#[derive(Args)]
pub struct QuantizeArgs {
    /// Model directory or GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    /// Output model directory.
    #[arg(long)]
    pub out: PathBuf,
    /// int8 per output channel, or int4 group-wise.
    #[arg(long, value_enum, default_value_t = PrecisionArg::Int8)]
    pub precision: PrecisionArg,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ExportFormat {
    /// Hugging Face directory: model.safetensors, config.json, tokenizer files.
    Safetensors,
    /// One GGUF file for llama.cpp.
    Gguf,
    /// One ONNX file (opset 17) for ONNX Runtime.
    Onnx,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum GgufTypeArg {
    /// 32-bit floats.
    F32,
    /// 16-bit floats.
    F16,
    /// 8-bit blocks of 32.
    #[value(name = "q8_0")]
    Q8_0,
    /// 4-bit symmetric blocks of 32.
    #[value(name = "q4_0")]
    Q4_0,
    /// 4-bit blocks of 32 with a minimum.
    #[value(name = "q4_1")]
    Q4_1,
}

#[derive(Args)]
pub struct ExportArgs {
    /// Model directory or GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    /// Output: a directory for safetensors, a file for gguf and onnx.
    #[arg(long)]
    pub out: PathBuf,
    /// Target format.
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    /// GGUF weight type.
    #[arg(long, value_enum, default_value_t = GgufTypeArg::F16)]
    pub gguf_type: GgufTypeArg,
    /// ONNX with int8 per-channel weights (default f32).
    #[arg(long)]
    pub int8: bool,
}

#[derive(Args, Clone)]
pub struct RunArgs {
    /// Model directory or GGUF file.
    #[arg(long, default_value = "runs/base")]
    pub model: PathBuf,
    /// Adapter directory (PEFT) to merge before running.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Weights in memory: f32, int8 or int4 (quantized files run as stored).
    #[arg(long, value_enum, default_value_t = PrecisionArg::F32)]
    pub precision: PrecisionArg,
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user turn with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Tokens to generate.
    #[arg(long, default_value_t = 200)]
    pub max_new_tokens: usize,
    /// Softmax temperature (0 = greedy, deterministic).
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// Keep the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling threshold.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the prompt's and the output's token ids too.
    #[arg(long)]
    pub show_ids: bool,
}

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// System prompt (default: the template's own).
    #[arg(long)]
    pub system: Option<String>,
    /// One message, answered once (default: read turns from standard input).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Tokens per reply.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Softmax temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// The text whose positions are scored.
    #[arg(long)]
    pub prompt: String,
    /// Highest logits kept per position.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    /// Print one JSON object (the documented interface).
    #[arg(long)]
    pub json: bool,
    /// Wrap the prompt with the chat template first.
    #[arg(long)]
    pub chat: bool,
}

#[derive(Args)]
pub struct InferBenchArgs {
    /// Model directory or GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    /// Tokens decoded per measurement.
    #[arg(long, default_value_t = 32)]
    pub decode_tokens: usize,
    /// Prompt length for the prompt-processing measurement.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Measurements of each figure; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Precisions measured, comma-separated (all three unless given).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub precision: Vec<PrecisionArg>,
    /// Run the portable kernels (what a CPU without AVX2, such as a phone's ARM core,
    /// runs) instead of the native ones.
    #[arg(long)]
    pub portable_kernels: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Load a model (and merge an adapter into it on the host).
pub fn load(run: &RunArgs) -> Result<LoadedModel> {
    // Every load error names the file already.
    let mut m = LoadedModel::open(&run.model)?;
    if let Some(dir) = &run.adapter {
        let lora = checkpoint::load_adapter_config(dir)?;
        let factors = checkpoint::read_safetensors(&dir.join(checkpoint::ADAPTER_FILE))?;
        let mut base = m.f32_tensors();
        covey_tensors::lora::merge(&mut base, &factors, lora.scale() as f32)
            .with_context(|| format!("merging the adapter of {}", dir.display()))?;
        m.tensors = base.into_iter().map(|(n, t)| (n, covey_tensors::quant::StoredTensor::F32(t))).collect();
    }
    Ok(m)
}

pub fn import(a: ImportArgs) -> Result<()> {
    let start = Instant::now();
    let mut m = LoadedModel::open(&a.model)?;
    match a.precision {
        PrecisionArg::F32 => {}
        PrecisionArg::Int8 => m.quantize(Scheme::Int8)?,
        PrecisionArg::Int4 => m.quantize(Scheme::Int4)?,
    }
    m.save_dir(&a.out)?;
    println!("imported {} — {}", a.model.display(), m.description);
    println!(
        "{} parameters, {} layers, vocabulary {}, chat template {}",
        m.config.num_params(),
        m.config.num_hidden_layers,
        m.config.vocab_size,
        if m.chat_template.is_some() { "yes" } else { "no" }
    );
    println!("written to {} in {:.1} s", a.out.display(), start.elapsed().as_secs_f64());
    Ok(())
}

pub fn quantize(a: QuantizeArgs) -> Result<()> {
    let mut m = LoadedModel::open(&a.model)?;
    let scheme = match a.precision {
        PrecisionArg::F32 => bail!("--precision f32 is not a quantization; use `export --format safetensors`"),
        PrecisionArg::Int8 => Scheme::Int8,
        PrecisionArg::Int4 => Scheme::Int4,
    };
    m.quantize(scheme)?;
    m.save_dir(&a.out)?;
    let size = std::fs::metadata(a.out.join(checkpoint::MODEL_FILE)).map(|m| m.len()).unwrap_or(0);
    println!("{} written ({:.1} MB)", a.out.join(checkpoint::MODEL_FILE).display(), size as f64 / 1e6);
    Ok(())
}

pub fn export(a: ExportArgs) -> Result<()> {
    let m = LoadedModel::open(&a.model)?;
    match a.format {
        ExportFormat::Safetensors => export::export_safetensors(&m, &a.out)?,
        ExportFormat::Gguf => {
            let ty = match a.gguf_type {
                GgufTypeArg::F32 => GgmlType::F32,
                GgufTypeArg::F16 => GgmlType::F16,
                GgufTypeArg::Q8_0 => GgmlType::Q8_0,
                GgufTypeArg::Q4_0 => GgmlType::Q4_0,
                GgufTypeArg::Q4_1 => GgmlType::Q4_1,
            };
            export::export_gguf(&m, &a.out, ty)?;
        }
        ExportFormat::Onnx => export::export_onnx(&m, &a.out, a.int8)?,
    }
    let size: u64 = if a.out.is_dir() {
        std::fs::read_dir(&a.out)?.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum()
    } else {
        std::fs::metadata(&a.out).map(|m| m.len()).unwrap_or(0)
    };
    println!("exported to {} ({:.1} MB)", a.out.display(), size as f64 / 1e6);
    Ok(())
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    let mut m = load(&a.run)?;
    let engine = m.take_engine(a.run.precision.into())?;
    let cfg = SamplingConfig {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    };
    let prompt = m.encode_prompt(&a.prompt, a.chat)?;
    let start = Instant::now();
    let out = engine.generate(&prompt, &cfg, &m.stop_ids())?;
    let secs = start.elapsed().as_secs_f64();
    let text = m.tokenizer.decode(&out)?;
    if a.chat {
        println!("{}", text.trim_end());
    } else {
        println!("{}{}", a.prompt, text);
    }
    if a.show_ids {
        println!("prompt ids: {prompt:?}");
        println!("output ids: {out:?}");
    }
    eprintln!("[{} prompt + {} new tokens in {:.2} s]", prompt.len(), out.len(), secs);
    Ok(())
}

pub fn chat(a: ChatArgs) -> Result<()> {
    let mut m = load(&a.run)?;
    let engine = m.take_engine(a.run.precision.into())?;
    let cfg = SamplingConfig {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        seed: a.seed,
        ..SamplingConfig::default()
    };
    let mut history: Vec<Message> = a.system.iter().map(|s| Message::new("system", s)).collect();
    let stop = m.stop_ids();
    let reply = |history: &mut Vec<Message>, text: String| -> Result<()> {
        history.push(Message::new("user", &text));
        let prompt = m.tokenizer.encode(&m.chat_prompt(history)?)?;
        let mut pending = Vec::new();
        let mut printed = 0;
        let out = engine.generate_with(&prompt, &cfg, &stop, |tok| {
            if stop.contains(&tok) {
                return;
            }
            pending.push(tok);
            if let Ok(s) = m.tokenizer.decode(&pending)
                && !s.ends_with('\u{FFFD}')
            {
                print!("{}", &s[printed.min(s.len())..]);
                printed = s.len();
                let _ = std::io::stdout().flush();
            }
        })?;
        println!();
        let answer: Vec<u32> = out.into_iter().filter(|t| !stop.contains(t)).collect();
        history.push(Message::new("assistant", m.tokenizer.decode(&answer)?.trim()));
        Ok(())
    };
    if let Some(p) = a.prompt {
        return reply(&mut history, p);
    }
    eprintln!("chatting with {} — one message per line, Ctrl-D to end", a.run.model.display());
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim();
        if !line.is_empty() {
            reply(&mut history, line.to_string())?;
        }
    }
    Ok(())
}

/// The `logits` JSON: `{"token_ids": [...], "positions": [{"top": [[id, logit], ...]}, ...]}`.
pub fn logits_json(token_ids: &[u32], logits: &[Vec<f32>], top_k: usize) -> serde_json::Value {
    let positions: Vec<serde_json::Value> = logits
        .iter()
        .map(|row| {
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let top: Vec<serde_json::Value> =
                order.iter().take(top_k).map(|&i| serde_json::json!([i, f64::from(row[i])])).collect();
            serde_json::json!({ "top": top })
        })
        .collect();
    serde_json::json!({ "token_ids": token_ids, "positions": positions })
}

pub fn logits(a: LogitsArgs) -> Result<()> {
    let mut m = load(&a.run)?;
    let engine = m.take_engine(a.run.precision.into())?;
    let ids = m.encode_prompt(&a.prompt, a.chat)?;
    if ids.is_empty() {
        bail!("the prompt has no tokens");
    }
    let logits = engine.logits(&ids)?;
    let out = logits_json(&ids, &logits, a.top_k);
    if a.json {
        println!("{out}");
    } else {
        for (i, (id, row)) in ids.iter().zip(&out["positions"].as_array().cloned().unwrap_or_default()).enumerate() {
            let tok = m.tokenizer.decode(&[*id]).unwrap_or_default();
            let top: Vec<String> = row["top"]
                .as_array()
                .map(|t| {
                    t.iter()
                        .map(|p| {
                            let id = p[0].as_u64().unwrap_or(0) as u32;
                            format!(
                                "{:?} {:.3}",
                                m.tokenizer.decode(&[id]).unwrap_or_default(),
                                p[1].as_f64().unwrap_or(0.0)
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            println!("{i:4} {id:6} {tok:?} → {}", top.join(", "));
        }
    }
    Ok(())
}

/// One measured inference configuration.
#[derive(serde::Serialize)]
pub struct InferFigures {
    precision: String,
    weight_mib: f64,
    decode_tokens_per_s: f64,
    prompt_tokens_per_s: f64,
}

pub fn infer_bench(a: InferBenchArgs) -> Result<Vec<InferFigures>> {
    let m = LoadedModel::open(&a.model)?;
    let threads = rayon::current_num_threads();
    let prompt: Vec<u32> = m
        .tokenizer
        .encode(&"To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer ".repeat(20))?
        .into_iter()
        .take(a.prompt_tokens)
        .collect();
    let precisions: Vec<Precision> = if a.precision.is_empty() {
        vec![Precision::F32, Precision::Int8, Precision::Int4]
    } else {
        a.precision.iter().map(|&p| p.into()).collect()
    };
    let kernels = if a.portable_kernels { KernelPath::Portable } else { KernelPath::Native };
    let mut rows = Vec::new();
    for p in precisions {
        let mut engine = m.engine(p)?;
        engine.set_kernel_path(kernels);
        let (mut prompt_runs, mut decode_runs) = (Vec::new(), Vec::new());
        for _ in 0..a.repeat.max(1) {
            // Prompt processing: one forward over the whole prompt.
            let mut s = engine.session();
            let t = Instant::now();
            engine.forward(&mut s, &prompt, true)?;
            prompt_runs.push(prompt.len() as f64 / t.elapsed().as_secs_f64());
            // Decode: one token at a time after an 8-token prefix.
            let mut s = engine.session();
            engine.forward(&mut s, &prompt[..8.min(prompt.len())], true)?;
            let t = Instant::now();
            let mut tok = prompt[0];
            for _ in 0..a.decode_tokens {
                let l = engine.forward(&mut s, &[tok], true)?;
                tok = l.iter().enumerate().fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0 as u32;
            }
            decode_runs.push(a.decode_tokens as f64 / t.elapsed().as_secs_f64());
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (prompt_tps, decode_tps) = (median(&mut prompt_runs), median(&mut decode_runs));
        rows.push(InferFigures {
            precision: p.to_string(),
            weight_mib: engine.weight_bytes() as f64 / (1024.0 * 1024.0),
            decode_tokens_per_s: decode_tps,
            prompt_tokens_per_s: prompt_tps,
        });
    }
    if a.json {
        println!("{}", serde_json::json!({ "threads": threads, "kernels": format!("{kernels:?}"), "inference": rows }));
    } else {
        println!("model             {} ({threads} threads, {kernels:?} kernels)", a.model.display());
        for r in &rows {
            println!(
                "{:<5} weights {:7.1} MiB   decode {:6.1} tokens/s   prompt {:7.1} tokens/s",
                r.precision, r.weight_mib, r.decode_tokens_per_s, r.prompt_tokens_per_s
            );
        }
    }
    Ok(rows)
}

#[derive(Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Text to score (.txt / .jsonl / directory).
    #[arg(long, default_value = "data/shakespeare/hamlet_gut.txt")]
    pub data: PathBuf,
    /// Tokens skipped at the start of the text (headers).
    #[arg(long, default_value_t = 1000)]
    pub skip_tokens: usize,
    /// Tokens scored.
    #[arg(long, default_value_t = 8192)]
    pub max_tokens: usize,
    /// Window length: each window starts with an empty cache.
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Held-out perplexity of one model in f32, int8 and int4.
pub fn perplexity(a: PerplexityArgs) -> Result<()> {
    let m = load(&a.run)?;
    let docs = covey_model::data::load_corpus(&a.data)?;
    let text: String = docs.iter().map(|d| d.text.as_str()).collect::<Vec<_>>().join("\n\n");
    let ids = m.tokenizer.encode(&text)?;
    if ids.len() <= a.skip_tokens + 2 {
        bail!("{} has only {} tokens", a.data.display(), ids.len());
    }
    let ids = &ids[a.skip_tokens..(a.skip_tokens + a.max_tokens).min(ids.len())];
    let mut rows = Vec::new();
    for p in [Precision::F32, Precision::Int8, Precision::Int4] {
        let start = Instant::now();
        let engine = m.engine(p)?;
        let (nll, n) = engine.nll(ids, a.window)?;
        rows.push(serde_json::json!({
            "precision": p.to_string(),
            "nll": nll,
            "perplexity": nll.exp(),
            "tokens": n,
            "weight_mib": engine.weight_bytes() as f64 / (1024.0 * 1024.0),
            "seconds": start.elapsed().as_secs_f64(),
        }));
    }
    let base = rows[0]["perplexity"].as_f64().unwrap_or(f64::NAN);
    for r in &mut rows {
        let ppl = r["perplexity"].as_f64().unwrap_or(f64::NAN);
        r["vs_f32_percent"] = serde_json::json!(100.0 * (ppl / base - 1.0));
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "model": a.run.model, "data": a.data, "window": a.window, "results": rows })
        );
    } else {
        println!("{} on {} ({} tokens, windows of {})", a.run.model.display(), a.data.display(), ids.len(), a.window);
        for r in &rows {
            println!(
                "{:<5} perplexity {:8.3}  ({:+.2}% vs f32)  weights {:6.1} MiB  {:.1} s",
                r["precision"].as_str().unwrap_or(""),
                r["perplexity"].as_f64().unwrap_or(f64::NAN),
                r["vs_f32_percent"].as_f64().unwrap_or(f64::NAN),
                r["weight_mib"].as_f64().unwrap_or(f64::NAN),
                r["seconds"].as_f64().unwrap_or(f64::NAN),
            );
        }
    }
    Ok(())
}
