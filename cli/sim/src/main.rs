//! `covey-sim`: federated simulations from the command line.
//!
//! ```text
//! covey-sim quickstart                       # the README's main command
//! covey-sim run EXPERIMENT.toml              # one experiment → report folder
//! covey-sim compare A.toml B.toml …          # several, side by side (report folders accepted too)
//! covey-sim data EXPERIMENT.toml             # the clients an experiment would see
//! covey-sim fleet FLEET.toml                 # a real coordinator and agent processes
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use covey_sim::attack::AttackKind;
use covey_sim::config::{Experiment, Mode};
use covey_sim::progress::{Progress, Silent};
use covey_sim::report::{self, Report, RoundMetrics};
use covey_sim::{audit, loopback, output, prepare, quickstart, runner, sweep};
use indicatif::{ProgressBar, ProgressStyle};

mod fleet;

/// Progress as a person sees it: a bar of the round's clients on a terminal, and one
/// plain line per round on a terminal or not (piped to a file, a run still reports).
struct TerminalProgress {
    bar: Option<ProgressBar>,
}

impl TerminalProgress {
    fn new() -> Self {
        let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template("round {msg} [{bar:30}] {pos}/{len} clients ({elapsed})")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar
        });
        Self { bar }
    }
}

impl Progress for TerminalProgress {
    fn client_done(&self, round: u64, done: usize, total: usize) {
        if let Some(bar) = &self.bar {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            bar.set_message(round.to_string());
        }
    }

    fn round_done(&self, m: &RoundMetrics, rounds: u64) {
        let line = format!(
            "round {}/{rounds}: {} clients, held-out perplexity {:.3}, top-1 {:.1} %, ε {:.2}, {:.1} s",
            m.round,
            m.clients,
            m.test_perplexity,
            m.top1 * 100.0,
            m.epsilon,
            m.wall_seconds
        );
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }
}

#[derive(Parser)]
#[command(name = "covey-sim", version, about = "Federated simulations with Covey: datasets, virtual clients, reports")]
struct Cli {
    /// Report no progress (no bars, no line per round).
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Federated LoRA fine-tuning with differential privacy through a real coordinator and
    /// agents over loopback gRPC, on Shakespeare roles the base model never saw; prints a
    /// before/after table and a sample, writes a report folder.
    Quickstart {
        /// Report folder.
        #[arg(long, default_value = "runs/quickstart")]
        out: PathBuf,
    },
    /// Run one experiment and write its report folder (report.json, metrics.csv,
    /// timing.csv, curves.svg).
    Run {
        /// Experiment file (TOML; see simulations/experiments/).
        config: PathBuf,
        /// Report folder (default: the experiment's report.dir, else runs/sim/NAME).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override the experiment's seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Override the number of rounds.
        #[arg(long)]
        rounds: Option<u64>,
        /// Override the `[strategy]` section, as TOML (e.g. 'kind = "multi-krum"').
        #[arg(long)]
        strategy: Option<String>,
        /// Override the `[attack]` section, as TOML (e.g. 'fraction = 0.1
        /// kind = "sign-flip"'), or `none` to remove it.
        #[arg(long)]
        attack: Option<String>,
        /// Override the experiment's name (and so its report folder).
        #[arg(long)]
        name: Option<String>,
        /// Override how devices encode their updates (f32, int8, int4).
        #[arg(long)]
        encoding: Option<String>,
    },
    /// Run several experiments (or read finished report folders) and compare them:
    /// comparison.csv, comparison.txt, compare.svg.
    Compare {
        /// Experiment files, or report folders / report.json files of finished runs.
        #[arg(required = true, num_args = 2..)]
        inputs: Vec<PathBuf>,
        /// Comparison folder.
        #[arg(long, default_value = "runs/sim/compare")]
        out: PathBuf,
    },
    /// Audit an experiment's privacy empirically with one training run (Steinke, Nasr and
    /// Jagielski 2023): plant canary clients (each included with probability 1/2), train in
    /// process with the experiment's mechanism, and print the audited lower bound on ε
    /// beside the claimed ε; writes audit.json.
    Audit {
        /// Experiment file (run in process whatever its mode).
        config: PathBuf,
        /// Canary clients (each included with probability 1/2).
        #[arg(long, default_value_t = 200)]
        canaries: usize,
        /// Canary kind: `update` (a random update direction at the clip norm: the worst
        /// case) or `sequence` (a random string the device trains on).
        #[arg(long, default_value = "update")]
        kind: String,
        /// Bytes of each canary string (sequence canaries).
        #[arg(long, default_value_t = 32)]
        canary_bytes: usize,
        /// Train without noise (the audit must find the leak).
        #[arg(long)]
        no_noise: bool,
        /// Override the number of rounds.
        #[arg(long)]
        rounds: Option<u64>,
        /// Report folder (default runs/audit/NAME).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The Byzantine matrix: run an experiment in process for each aggregation strategy,
    /// attack-free and under each attack at each fraction of attackers; writes each run's
    /// report folder, then sweep.csv and sweep.md (held-out perplexity, backdoor success).
    /// Run again on the same folder, it reads the cells already finished.
    Sweep {
        /// Experiment file (e.g. simulations/experiments/byzantine.toml).
        config: PathBuf,
        /// Strategies by kind, comma-separated (fed-avg, trimmed-mean, median, krum,
        /// multi-krum, geometric-median; robust ones set for 20 % attackers); default all.
        #[arg(long, value_delimiter = ',')]
        strategies: Vec<String>,
        /// Attacks, comma-separated (scaled, boosted, sign-flip, random, nan, backdoor).
        #[arg(long, value_delimiter = ',', default_value = "scaled,sign-flip,nan,random,backdoor")]
        attacks: Vec<String>,
        /// Fractions of attacking clients, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "0.1,0.2")]
        fractions: Vec<f64>,
        /// Update encoding of every run (f32, int8, int4; default the experiment's).
        #[arg(long)]
        encoding: Option<String>,
        /// Override the number of rounds.
        #[arg(long)]
        rounds: Option<u64>,
        /// Sweep folder.
        #[arg(long, default_value = "runs/sweep")]
        out: PathBuf,
    },
    /// Pace steering: replay a crowd of devices checking in at once against the
    /// coordinator's policy on a simulated clock, without and with steering; prints the
    /// peak and mean polls per second and writes pace.csv, pace.md, pace.json and pace.svg.
    Pace {
        /// Devices.
        #[arg(long, default_value_t = 10_000)]
        devices: usize,
        /// Their first polls fall within this window.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
        window: Duration,
        /// Simulated time.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "120s")]
        duration: Duration,
        /// The coordinator's rounds.poll-interval.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
        poll_interval: Duration,
        /// rounds.pace-polls-per-second when steering.
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
        /// rounds.pace-max-wait.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
        max_wait: Duration,
        /// Each return lands up to this much after the time the device was told.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "50ms")]
        max_delay: Duration,
        /// Seed of arrivals and delays.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output folder.
        #[arg(long, default_value = "runs/pace")]
        out: PathBuf,
    },
    /// Print the clients an experiment would use: counts and sizes, as JSON.
    Data {
        /// Experiment file.
        config: PathBuf,
    },
    /// Run a real fleet on this machine: a covey-coordinator process and one covey-agent
    /// process per device (built next to covey-sim) federating a real model, e.g.
    /// simulations/experiments/fleet/smollm2.toml; writes report.md and report.json.
    Fleet {
        /// Fleet experiment file.
        config: PathBuf,
        /// Parent of the run's folder.
        #[arg(long, default_value = "runs/fleet")]
        out: PathBuf,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log piped to a file stays plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let terminal = TerminalProgress::new();
    let progress: &dyn Progress = if cli.quiet { &Silent } else { &terminal };
    match cli.command {
        Command::Quickstart { out } => quickstart_command(&out, progress),
        Command::Run { config, out, seed, rounds, strategy, attack, name, encoding } => {
            let mut exp = Experiment::load(&config)?;
            if let Some(e) = encoding {
                exp.training.update_encoding = e.parse().map_err(|e: String| anyhow::anyhow!("--encoding: {e}"))?;
            }
            if let Some(text) = strategy {
                exp.strategy = toml::from_str(&text).with_context(|| format!("--strategy {text:?}"))?;
            }
            match attack.as_deref() {
                None => {}
                Some("none") => exp.attack = None,
                Some(text) => exp.attack = Some(toml::from_str(text).with_context(|| format!("--attack {text:?}"))?),
            }
            if let Some(name) = name {
                exp.name = name;
            }
            if let Some(seed) = seed {
                exp.seed = seed;
            }
            if let Some(rounds) = rounds {
                exp.rounds.rounds = rounds;
            }
            if let Some(out) = out {
                exp.report.dir = Some(out);
            }
            let report = run_experiment(&exp, progress)?;
            println!("{}", report::before_after_table(&report.summary));
            Ok(())
        }
        Command::Compare { inputs, out } => {
            let mut reports = Vec::new();
            for input in &inputs {
                let is_report = input.is_dir() || input.extension().is_some_and(|e| e == "json");
                let report = if is_report {
                    output::read_report(input)?
                } else {
                    run_experiment(&Experiment::load(input)?, progress)?
                };
                reports.push(report);
            }
            let files = output::write_comparison(&out, &reports)?;
            println!("{}", report::comparison_table(&reports));
            println!("comparison written to {} ({} files)", out.display(), files.paths.len());
            Ok(())
        }
        Command::Fleet { config, out } => fleet::run(&config, &out),
        Command::Sweep { config, strategies, attacks, fractions, encoding, rounds, out } => {
            sweep_command(&config, &strategies, &attacks, &fractions, encoding.as_deref(), rounds, &out, progress)
        }
        Command::Audit { config, canaries, kind, canary_bytes, no_noise, rounds, out } => {
            let kind = match kind.as_str() {
                "update" => audit::CanaryKind::Update,
                "sequence" => audit::CanaryKind::Sequence,
                other => bail!("--kind {other}: expected `update` or `sequence`"),
            };
            let mut exp = Experiment::load(&config)?;
            if let Some(rounds) = rounds {
                exp.rounds.rounds = rounds;
            }
            if no_noise {
                audit::without_noise(&mut exp);
            }
            let cfg = audit::AuditConfig { kind, canaries, canary_bytes, no_noise, ..audit::AuditConfig::default() };
            println!("{}: preparing the audit ({canaries} {kind:?} canaries)", exp.name);
            let mut prepared = prepare::prepare(&exp).with_context(|| format!("experiment {}", exp.name))?;
            for note in &prepared.notes {
                println!("  {note}");
            }
            let a = audit::run(&mut prepared, &cfg, progress)?;
            let dir = out.unwrap_or_else(|| PathBuf::from("runs/audit").join(&exp.name));
            audit::write(&a, &dir)?;
            println!("{}", audit::table(&a));
            println!("audit written to {}", dir.join("audit.json").display());
            Ok(())
        }
        Command::Pace { devices, window, duration, poll_interval, rate, max_wait, max_delay, seed, out } => {
            let options = covey_sim::pace::PaceOptions {
                devices,
                arrival_window: window,
                duration,
                poll_interval,
                polls_per_second: rate,
                max_wait,
                max_delay,
                seed,
            };
            let report = covey_sim::pace::compare(&options)?;
            report.write(&out)?;
            println!("{}", report.table());
            println!("written to {}", out.display());
            Ok(())
        }
        Command::Data { config } => {
            let exp = Experiment::load(&config)?;
            let prepared = prepare::prepare(&exp)?;
            let summary = prepared.dataset.summary();
            println!("{}", serde_json::to_string_pretty(&summary)?);
            Ok(())
        }
    }
}

/// Run `exp` in its mode, write its report folder, and return the report.
fn run_experiment(exp: &Experiment, progress: &dyn Progress) -> Result<Report> {
    let started = Instant::now();
    println!("{}: preparing ({} mode)", exp.name, exp.mode.name());
    let prepared = prepare::prepare(exp).with_context(|| format!("experiment {}", exp.name))?;
    for note in &prepared.notes {
        println!("  {note}");
    }
    let report = match exp.mode {
        Mode::InProcess => runner::run(&prepared, progress)?,
        Mode::LoopbackGrpc => {
            let work = tempfile::tempdir().context("temporary directory")?;
            let runtime = tokio::runtime::Runtime::new().context("tokio runtime")?;
            let prepared = Arc::new(prepared);
            runtime.block_on(loopback::run(prepared, work.path(), progress))?.report
        }
    };
    let dir = exp.report_dir();
    output::write_report(&dir, &report)?;
    println!(
        "{}: {} rounds in {:.1} s, peak RSS {}; report in {}",
        exp.name,
        exp.rounds.rounds,
        started.elapsed().as_secs_f64(),
        peak_rss().map_or_else(|| "unknown".to_owned(), |kib| format!("{:.1} MiB", kib as f64 / 1024.0)),
        dir.display()
    );
    if let Some(personal) = &report.personalisation {
        print!("{}", covey_sim::personal::table(personal));
    }
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
fn sweep_command(
    config: &Path,
    strategies: &[String],
    attacks: &[String],
    fractions: &[f64],
    encoding: Option<&str>,
    rounds: Option<u64>,
    out: &Path,
    progress: &dyn Progress,
) -> Result<()> {
    let mut base = Experiment::load(config)?;
    if let Some(e) = encoding {
        base.training.update_encoding = e.parse().map_err(|e: String| anyhow::anyhow!("--encoding: {e}"))?;
    }
    if let Some(r) = rounds {
        base.rounds.rounds = r;
    }
    let all = sweep::default_strategies();
    let chosen: Vec<_> = if strategies.is_empty() {
        all
    } else {
        let mut chosen = Vec::new();
        for kind in strategies {
            let found = all.iter().find(|(_, s)| s.kind() == kind).with_context(|| {
                let kinds: Vec<_> = all.iter().map(|(_, s)| s.kind()).collect();
                format!("--strategies: `{kind}` is not one of {kinds:?}")
            })?;
            chosen.push(found.clone());
        }
        chosen
    };
    let kinds = [
        AttackKind::Scaled,
        AttackKind::Boosted,
        AttackKind::SignFlip,
        AttackKind::Random,
        AttackKind::Nan,
        AttackKind::Backdoor,
    ];
    let mut parsed = Vec::new();
    for a in attacks {
        parsed.push(*kinds.iter().find(|k| k.name() == a).with_context(|| {
            format!("--attacks: `{a}` is not one of scaled, boosted, sign-flip, random, nan, backdoor")
        })?);
    }
    if let Some(f) = fractions.iter().find(|f| !(0.0..0.5).contains(*f)) {
        bail!("--fractions: {f} is not in [0, 0.5)");
    }
    let cells = sweep::cells(&base, &chosen, &parsed, fractions);
    let mut rows = Vec::new();
    for (i, cell) in cells.iter().enumerate() {
        println!("sweep {}/{}: {}", i + 1, cells.len(), cell.experiment.name);
        let mut exp = cell.experiment.clone();
        let dir = out.join(&exp.name);
        exp.report.dir = Some(dir.clone());
        // A cell whose report is there already (a sweep run again after an interruption)
        // is read, not run again.
        let report = if dir.join("report.json").is_file() {
            println!("  finished earlier: reading {}", dir.display());
            output::read_report(&dir)?
        } else {
            run_experiment(&exp, progress)?
        };
        rows.push(sweep::Row::of(cell, &report));
        sweep::write(out, &rows)?;
    }
    println!("{}", sweep::table(&rows));
    println!("sweep written to {} (sweep.csv, sweep.md)", out.display());
    Ok(())
}

/// The process's peak resident set size in KiB (`VmHWM`; Linux only).
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn quickstart_command(out: &Path, progress: &dyn Progress) -> Result<()> {
    let started = Instant::now();
    if !Path::new("data/shakespeare").is_dir() {
        bail!("run the quickstart from the repository root: data/shakespeare/ and models/ ship there");
    }
    println!("Covey quickstart: federated LoRA fine-tuning with differential privacy over loopback gRPC");
    let exp = quickstart::experiment()?;
    println!(
        "  base model: {} (byte-level, pretrained by `covey-model pretrain`; these plays held out)",
        exp.model.base.as_deref().unwrap_or(Path::new("-")).display()
    );
    println!(
        "  {} rounds, {} clients per round, central DP-FTRL at ε = 8 (at most 2 contributions per device), int8 publishing",
        exp.rounds.rounds, exp.rounds.clients_per_round
    );
    let runtime = tokio::runtime::Runtime::new().context("tokio runtime")?;
    let q = runtime.block_on(quickstart::run(out, progress))?;
    println!();
    println!("{}", report::before_after_table(&q.report.summary));
    println!();
    println!("Sample from the fine-tuned model on a device (temperature 0.7, top-k 40, seed 0):");
    println!("---");
    println!("{}{}", q.prompt, q.sample);
    println!("---");
    println!("Report folder: {} (report.json, metrics.csv, curves.svg)", out.display());
    println!("Done in {:.1} min.", started.elapsed().as_secs_f64() / 60.0);
    Ok(())
}
