//! `covey-agent`: enrol a device, run it against a coordinator, show its state, and
//! generate text, chat or suggest next words with the newest verified model (its release
//! and adapter, with this device's own local adapter on top when it has one, on the
//! int8 / int4 inference engine, with the model's tokenizer and chat template).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use covey_agent::{AgentConfig, RunUntil};
use covey_model::SamplingConfig;
use covey_model::chat::Message;

#[derive(Parser)]
#[command(name = "covey-agent", version, about = "Covey device agent: private federated LoRA fine-tuning")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate this device's key and register it with a coordinator.
    Enroll(EnrollArgs),
    /// Poll for tasks, train, and upload updates.
    Run(RunArgs),
    /// Show the identity, cached versions, pending tasks and submitted updates.
    Status(StatusArgs),
    /// Continue a prompt with the newest verified model version.
    Generate(GenerateArgs),
    /// Chat with the newest verified model version (its chat template): one reply to
    /// --prompt, or a conversation read from standard input, one message per line.
    Chat(ChatArgs),
    /// Write the newest verified version's adapter as a llama.cpp LoRA GGUF (apply it
    /// with `llama-cli -m BASE.gguf --lora ADAPTER.gguf`), and optionally its base release.
    ExportAdapter(ExportAdapterArgs),
    /// The keyboard path: the k most likely next tokens after a prefix, and the word each
    /// begins, from the personal model (the global one without a local adapter).
    Suggest(SuggestArgs),
    /// Fit this device's local adapter now, on the newest verified version and the local
    /// text (`run` does so after each update it sends), and seal it.
    Personalise(PersonaliseArgs),
    /// Delete this device's local adapter (it is fitted again after the next update when
    /// personalisation stays on).
    Forget(ForgetArgs),
}

#[derive(Args)]
struct PersonaliseArgs {
    /// State directory of an enrolled device.
    #[arg(long)]
    state: PathBuf,
    /// Local text: a .txt / .jsonl file or a directory of them.
    #[arg(long)]
    data: PathBuf,
    /// Agent configuration (its `[personalisation]` section; defaults otherwise).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Key file of the sealed local adapter (or COVEY_PERSONAL_KEY, 64 hex characters).
    #[arg(long, env = "COVEY_PERSONAL_KEY_FILE")]
    personal_key_file: Option<PathBuf>,
    /// Training threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

/// Which model answers: the personal one (the device's sealed local adapter on the
/// global model) unless turned off or unreadable.
#[derive(Args)]
struct PersonalArgs {
    /// Answer with the global model, without the local adapter.
    #[arg(long)]
    no_personal: bool,
    /// Key file of the sealed local adapter (or COVEY_PERSONAL_KEY, 64 hex characters).
    #[arg(long, env = "COVEY_PERSONAL_KEY_FILE")]
    personal_key_file: Option<PathBuf>,
    /// Data directory (only to refuse a key file kept inside it).
    #[arg(long, default_value = "covey-data")]
    data: PathBuf,
}

impl PersonalArgs {
    /// The store to read the local adapter from; `None` (the global model) when turned
    /// off, or when no key is given.
    fn store(&self, state: &std::path::Path) -> Result<Option<covey_agent::personal::PersonalStore>> {
        if self.no_personal {
            return Ok(None);
        }
        let key = covey_agent::personal::key_from(self.personal_key_file.as_deref(), state, &self.data)?;
        if key.is_none() && state.join(covey_agent::personal::SEALED_FILE).exists() {
            eprintln!(
                "(this device has a local adapter, sealed: give its key with --personal-key-file or \
                 COVEY_PERSONAL_KEY to use it)"
            );
        }
        Ok(key.map(|k| covey_agent::personal::PersonalStore::new(state, k)))
    }
}

fn say_personal(p: &covey_agent::PersonalUse) {
    match (&p.used, &p.note) {
        (true, _) => eprintln!("(personal model: the local adapter on the global one)"),
        (false, Some(note)) => eprintln!("(global model: {note})"),
        (false, None) => eprintln!("(global model)"),
    }
}

#[derive(Args)]
struct SuggestArgs {
    /// State directory.
    #[arg(long)]
    state: PathBuf,
    /// The text typed so far.
    #[arg(long)]
    prefix: String,
    /// Suggestions offered.
    #[arg(long, default_value_t = 3)]
    top_k: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    personal: PersonalArgs,
}

#[derive(Args)]
struct ForgetArgs {
    /// State directory.
    #[arg(long)]
    state: PathBuf,
}

/// Connection settings shared by `enroll` and `run`.
#[derive(Args)]
struct Connection {
    /// Agent configuration file (TOML); command-line flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// PEM of the CA that signed the coordinator's certificate (https:// URLs).
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// PEM certificate of this device, for mutual TLS.
    #[arg(long, requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// PEM private key of --client-cert.
    #[arg(long, requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Name to check the coordinator's certificate against.
    #[arg(long)]
    domain_name: Option<String>,
}

impl Connection {
    fn config(&self) -> Result<AgentConfig> {
        let mut cfg = match &self.config {
            Some(path) => AgentConfig::load(path).with_context(|| format!("loading {}", path.display()))?,
            None => AgentConfig::default(),
        };
        if self.ca_cert.is_some() {
            cfg.tls.ca_cert.clone_from(&self.ca_cert);
        }
        if self.client_cert.is_some() {
            cfg.tls.client_cert.clone_from(&self.client_cert);
            cfg.tls.client_key.clone_from(&self.client_key);
        }
        if self.domain_name.is_some() {
            cfg.tls.domain_name.clone_from(&self.domain_name);
        }
        Ok(cfg)
    }
}

#[derive(Args)]
struct EnrollArgs {
    /// Coordinator URL, e.g. http://127.0.0.1:7070 or https://coordinator:7443.
    #[arg(long)]
    coordinator: String,
    /// Enrolment token issued by the operator.
    #[arg(long)]
    token: String,
    /// State directory to create.
    #[arg(long)]
    state: PathBuf,
    /// Free-form label for operators (at most 128 bytes).
    #[arg(long, default_value = "")]
    label: String,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Args)]
struct RunArgs {
    /// State directory of an enrolled device.
    #[arg(long)]
    state: PathBuf,
    /// Local training data: a .txt / .jsonl file or a directory of them (JSONL lines are
    /// {"text": ...} or chat transcripts {"messages": [{"role", "content"}, ...]}).
    #[arg(long)]
    data: PathBuf,
    /// Stop after this many accepted updates (default: run until Ctrl-C).
    #[arg(long)]
    updates: Option<u64>,
    /// Coordinator URL (default: the one enrolled with).
    #[arg(long)]
    coordinator: Option<String>,
    /// Data-parallel training threads.
    #[arg(long)]
    threads: Option<usize>,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Args)]
struct StatusArgs {
    /// State directory.
    #[arg(long)]
    state: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct GenerateArgs {
    /// State directory.
    #[arg(long)]
    state: PathBuf,
    /// Text to continue.
    #[arg(long)]
    prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    /// Softmax temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Keep only the k most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    personal: PersonalArgs,
}

#[derive(Args)]
struct ExportAdapterArgs {
    /// State directory.
    #[arg(long)]
    state: PathBuf,
    /// Adapter GGUF to write.
    #[arg(long)]
    out: PathBuf,
    /// Also write the base release as a GGUF here (Q8_0 for int8 releases, Q4_1 for int4).
    #[arg(long)]
    base_out: Option<PathBuf>,
}

#[derive(Args)]
struct ChatArgs {
    /// State directory.
    #[arg(long)]
    state: PathBuf,
    /// One user message to answer (default: read a conversation from standard input).
    #[arg(long)]
    prompt: Option<String>,
    /// System message opening the conversation.
    #[arg(long)]
    system: Option<String>,
    /// Tokens to generate per reply.
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    /// Softmax temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.7)]
    temperature: f64,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    personal: PersonalArgs,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "covey_agent=info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log piped to a file stays plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Enroll(a) => enroll(a).await,
        Command::Run(a) => run(a).await,
        Command::Status(a) => status(a),
        Command::Generate(a) => generate(a).await,
        Command::Chat(a) => chat(a),
        Command::Suggest(a) => suggest(a),
        Command::Personalise(a) => personalise(a),
        Command::Forget(a) => {
            // Deleting needs no key: the file is removed whatever it holds.
            let path = a.state.join(covey_agent::personal::SEALED_FILE);
            match std::fs::remove_file(&path) {
                Ok(()) => println!("local adapter deleted ({})", path.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    println!("no local adapter in {}", a.state.display())
                }
                Err(e) => return Err(e).with_context(|| format!("deleting {}", path.display())),
            }
            Ok(())
        }
        Command::ExportAdapter(a) => {
            let e = covey_agent::export_adapter(&a.state, &a.out, a.base_out.as_deref())?;
            println!(
                "adapter of version {} (release {} + {} rounds, rank {}, alpha {}) written to {}",
                e.version,
                e.release,
                e.rounds,
                e.rank,
                e.alpha,
                a.out.display()
            );
            if let Some(b) = &a.base_out {
                println!("base release {} written to {}", e.release, b.display());
            }
            Ok(())
        }
    }
}

async fn enroll(a: EnrollArgs) -> Result<()> {
    let mut cfg = a.connection.config()?;
    cfg.coordinator = Some(a.coordinator);
    cfg.state_dir = a.state;
    let identity = covey_agent::enroll(&cfg, &a.token, &a.label).await.context("enrolment failed")?;
    println!("enrolled: device id {}", identity.device_id_hex());
    println!("coordinator key {}", hex::encode(identity.coordinator_public_key));
    println!("state written to {}", cfg.state_dir.display());
    Ok(())
}

async fn run(a: RunArgs) -> Result<()> {
    let mut cfg = a.connection.config()?;
    cfg.state_dir = a.state;
    cfg.data_dir = a.data;
    if a.coordinator.is_some() {
        cfg.coordinator = a.coordinator;
    }
    if let Some(t) = a.threads {
        cfg.train_threads = t;
    }
    let until = a.updates.map_or(RunUntil::Forever, RunUntil::Updates);
    let shutdown = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let summary = covey_agent::run_with_shutdown(cfg, until, shutdown).await.context("the agent stopped")?;
    println!(
        "{} updates accepted (rounds {:?}), {} tasks failed, {} polls",
        summary.submitted, summary.rounds, summary.failed_tasks, summary.polls
    );
    Ok(())
}

fn status(a: StatusArgs) -> Result<()> {
    let s = covey_agent::status(&a.state)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!("device id     {}", s.identity.device_id);
    println!("coordinator   {} (key {})", s.identity.coordinator_url, s.identity.coordinator_public_key);
    if !s.identity.label.is_empty() {
        println!("label         {}", s.identity.label);
    }
    println!("versions      {:?}", s.cached_versions);
    println!("pending tasks {:?}", s.pending_tasks);
    println!("submitted     {}", s.submitted);
    if let Some(u) = &s.last_update {
        println!(
            "last update   round {} on version {}, {} examples, loss {:.4}, C {} z {}",
            u.round_id, u.base_version, u.examples, u.train_loss, u.clip_norm, u.noise_multiplier
        );
    }
    Ok(())
}

async fn generate(a: GenerateArgs) -> Result<()> {
    let sampling = SamplingConfig {
        max_new_tokens: a.max_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: None,
        seed: a.seed,
    };
    let state = a.state.clone();
    let prompt = a.prompt.clone();
    let store = a.personal.store(&a.state)?;
    let out = tokio::task::spawn_blocking(move || covey_agent::generate(&state, &prompt, &sampling, store.as_ref()))
        .await??;
    eprintln!("(model version {}, release {})", out.version, out.release);
    say_personal(&out.personal);
    println!("{}{}", a.prompt, out.text);
    Ok(())
}

fn chat(a: ChatArgs) -> Result<()> {
    use std::io::BufRead;
    let sampling = SamplingConfig {
        max_new_tokens: a.max_tokens,
        temperature: a.temperature,
        top_k: None,
        top_p: None,
        seed: a.seed,
    };
    let mut history: Vec<Message> = a.system.iter().map(|s| Message::new("system", s)).collect();
    let store = a.personal.store(&a.state)?;
    let reply = |history: &mut Vec<Message>, text: &str| -> Result<()> {
        history.push(Message::new("user", text));
        let out = covey_agent::chat(&a.state, history, &sampling, store.as_ref())?;
        eprintln!("(model version {}, release {})", out.version, out.release);
        say_personal(&out.personal);
        println!("{}", out.text);
        history.push(Message::new("assistant", &out.text));
        Ok(())
    };
    if let Some(p) = &a.prompt {
        return reply(&mut history, p);
    }
    eprintln!("chatting with the model of {} — one message per line, Ctrl-D to end", a.state.display());
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let line = line.trim();
        if !line.is_empty() {
            reply(&mut history, line)?;
        }
    }
    Ok(())
}

fn suggest(a: SuggestArgs) -> Result<()> {
    let store = a.personal.store(&a.state)?;
    let s = covey_agent::suggest(&a.state, &a.prefix, a.top_k, store.as_ref())?;
    if a.json {
        println!("{}", serde_json::to_string(&s)?);
        return Ok(());
    }
    say_personal(&s.personal);
    for (t, w) in s.tokens.iter().zip(&s.words) {
        println!("{:>6.2} %  {:?}  → {:?} ({:.2} %)", 100.0 * t.probability, t.text, w.text, 100.0 * w.probability);
    }
    eprintln!(
        "(model version {}; suggestions in {:.1} ms after {:.0} ms loading the model)",
        s.version, s.suggest_ms, s.load_ms
    );
    Ok(())
}

fn personalise(a: PersonaliseArgs) -> Result<()> {
    let mut cfg = match &a.config {
        Some(path) => AgentConfig::load(path).with_context(|| format!("loading {}", path.display()))?,
        None => AgentConfig::default(),
    };
    cfg.state_dir = a.state;
    cfg.data_dir = a.data;
    if a.personal_key_file.is_some() {
        cfg.personal_key_file = a.personal_key_file;
    }
    let personal = cfg.personalisation.get_or_insert_with(Default::default).clone();
    let store = covey_agent::personal::open_store(&cfg)?.context("personalisation needs a key")?;
    let identity = covey_agent::Identity::load(&cfg.state_dir)?;
    let model = covey_agent::models::ModelCache::new(&cfg.state_dir)
        .latest_verified(&identity.coordinator_public_key)
        .with_context(|| format!("{}: no verified model version", cfg.state_dir.display()))?;
    let started = std::time::Instant::now();
    let meta = covey_agent::personal::fit(model, &personal, &cfg.data_dir, &store, &identity.device_id, a.threads)?;
    println!(
        "local adapter ({}, rank {}) fitted on version {} in {:.1} s ({} training tokens in all), sealed in {}",
        personal.method,
        personal.rank,
        meta.version,
        started.elapsed().as_secs_f64(),
        meta.train_tokens,
        store.path().display()
    );
    Ok(())
}
