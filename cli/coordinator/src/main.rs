//! `covey-coordinator`: serve a fleet, or talk to a running coordinator's Admin service.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use covey_coordinator::{CoordinatorConfig, server};
use covey_proto::pb::{self, admin_client::AdminClient};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

#[derive(Parser)]
#[command(
    name = "covey-coordinator",
    version,
    about = "Covey coordinator: rounds, verification, aggregation, publishing"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct AdminArgs {
    /// Coordinator address.
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    addr: String,
    /// Admin token (or the environment variable COVEY_ADMIN_TOKEN).
    #[arg(long, env = "COVEY_ADMIN_TOKEN", hide_env_values = true)]
    token: String,
    /// PEM CA certificate of a TLS coordinator.
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// PEM client certificate, for a coordinator that requires mutual TLS.
    #[arg(long, requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// PEM private key of `--client-cert`.
    #[arg(long, requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Server name to verify in the coordinator's certificate (default: the host of --addr).
    #[arg(long)]
    domain_name: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the coordinator.
    Serve {
        /// TOML configuration (see coordinator.example.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Overall state.
    Status(AdminArgs),
    /// Recent rounds.
    Rounds(AdminArgs),
    /// Model versions.
    Versions(AdminArgs),
    /// Enrolled devices.
    Devices(AdminArgs),
    /// Revoke a device (hex id).
    Revoke {
        /// Device id (hex).
        device_id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Make a version current.
    Promote {
        /// Version.
        version: u64,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Merge the adapter of VERSION (default: the current one) into a new int8 / int4 base
    /// release now, and make it current.
    CutRelease {
        /// Adapter version (default: the current one).
        version: Option<u64>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Go back to the parent of the current version, or to VERSION.
    Rollback {
        /// Version (default: the parent of the current one).
        version: Option<u64>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Fail the round in progress without publishing.
    FailRound {
        /// Round id (see `rounds`).
        round_id: u64,
        /// Why (recorded with the round).
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Mint an enrolment token (printed once; the coordinator keeps only its hash).
    MintToken {
        /// Devices it may enrol (at least 1).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        uses: u32,
        /// Lifetime ("30m", "24h", "7d").
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// Operator note.
        #[arg(long, default_value = "")]
        label: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

async fn admin(args: &AdminArgs) -> Result<(AdminClient<Channel>, String)> {
    let mut endpoint = Channel::from_shared(args.addr.clone()).context("--addr is not a URL")?;
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    if let Some(ca) = &args.ca_cert {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let (Some(cert), Some(key)) = (&args.client_cert, &args.client_key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        if let Some(name) = &args.domain_name {
            tls = tls.domain_name(name.clone());
        }
        endpoint = endpoint.tls_config(tls)?;
    } else if args.client_cert.is_some() {
        anyhow::bail!("--client-cert needs --ca-cert (mutual TLS runs over TLS)");
    }
    let channel = endpoint.connect().await.with_context(|| format!("connecting to {}", args.addr))?;
    Ok((AdminClient::new(channel), format!("Bearer {}", args.token)))
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("the coordinator refused: {:?}: {}", s.code(), s.message())
}

fn authed<T>(msg: T, token: &str) -> Result<tonic::Request<T>> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("authorization", token.parse().context("the admin token is not valid metadata")?);
    Ok(r)
}

fn print<T: serde::Serialize>(json: bool, value: &T, table: impl FnOnce()) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        table();
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct Round<'a> {
    round_id: u64,
    state: &'a str,
    base_version: u64,
    published_version: u64,
    cohort_size: u64,
    updates: u64,
    declined: u64,
    failure: &'a str,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log piped to a file stays plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => serve(&config).await?,
        Command::Status(a) => status(&a).await?,
        Command::Rounds(a) => rounds(&a).await?,
        Command::Versions(a) => versions(&a).await?,
        Command::Devices(a) => devices(&a).await?,
        Command::Revoke { device_id, admin: a } => {
            let (mut c, t) = admin(&a).await?;
            let r = c
                .revoke_device(authed(pb::RevokeDeviceRequest { device_id: device_id.clone() }, &t)?)
                .await
                .map_err(status_error)?;
            let r = r.into_inner();
            println!("{device_id}: {}", if r.changed { "revoked" } else { "was already revoked" });
            if r.token_burned {
                println!(
                    "its enrolment token is withdrawn: devices it enrolled stay enrolled, new ones need a new token"
                );
            }
        }
        Command::Promote { version, admin: a } => {
            let (mut c, t) = admin(&a).await?;
            let r = c.promote(authed(pb::PromoteRequest { version }, &t)?).await.map_err(status_error)?.into_inner();
            print_promoted(&r);
        }
        Command::CutRelease { version, admin: a } => {
            let (mut c, t) = admin(&a).await?;
            let r = c
                .cut_release(authed(pb::CutReleaseRequest { version: version.unwrap_or(0) }, &t)?)
                .await
                .map_err(status_error)?
                .into_inner();
            print_promoted(&r);
        }
        Command::Rollback { version, admin: a } => {
            let (mut c, t) = admin(&a).await?;
            let r = c
                .rollback(authed(pb::RollbackRequest { version: version.unwrap_or(0) }, &t)?)
                .await
                .map_err(status_error)?
                .into_inner();
            print_promoted(&r);
        }
        Command::FailRound { round_id, reason, admin: a } => {
            let (mut c, t) = admin(&a).await?;
            let r = c
                .fail_round(authed(pb::FailRoundRequest { round_id, reason }, &t)?)
                .await
                .map_err(status_error)?
                .into_inner();
            println!("round {round_id} failed (it was {})", r.previous_state);
        }
        Command::MintToken { uses, ttl, label, admin: a } => {
            let (mut c, t) = admin(&a).await?;
            let r = c
                .mint_enrollment_token(authed(
                    pb::MintEnrollmentTokenRequest { uses, ttl_seconds: ttl.as_secs().max(1), label },
                    &t,
                )?)
                .await
                .map_err(status_error)?
                .into_inner();
            println!("{}", r.token);
            eprintln!("enrols {uses} device(s) until {} ms since the epoch; shown once", r.expires_unix_ms);
        }
    }
    Ok(())
}

/// `serve`: run the coordinator on `config` until Ctrl-C.
async fn serve(config: &std::path::Path) -> Result<()> {
    let mut c = CoordinatorConfig::load(config)?;
    if let Ok(token) = std::env::var("COVEY_ADMIN_TOKEN") {
        c.admin.token = token;
    }
    let engine = server::open_engine(c).await?;
    let running = server::start(engine).await?;
    eprintln!("covey-coordinator listening on {}", running.addr);
    if let Some(m) = running.metrics_addr {
        eprintln!("metrics on http://{m}/metrics");
    }
    tokio::select! {
        r = running.server => r??,
        r = running.rounds => { r??; eprintln!("all rounds done; still serving until Ctrl-C"); tokio::signal::ctrl_c().await?; }
        _ = tokio::signal::ctrl_c() => eprintln!("shutting down"),
    }
    Ok(())
}

/// `status`: versions, devices, rounds and the privacy spent.
async fn status(a: &AdminArgs) -> Result<()> {
    let (mut c, t) = admin(a).await?;
    let s = c.status(authed(pb::StatusRequest {}, &t)?).await.map_err(status_error)?.into_inner();
    let p = s.privacy.clone().unwrap_or_default();
    let json = serde_json::json!({
        "current_version": s.current_version, "latest_version": s.latest_version,
        "active_devices": s.active_devices, "revoked_devices": s.revoked_devices,
        "published_rounds": s.published_rounds, "epsilon": s.epsilon, "delta": s.delta,
        "open_round": s.open_round.as_ref().map(|r| r.round_id),
        "coordinator_public_key": s.coordinator_public_key,
        "privacy": {
            "accountant": p.accountant, "mechanism": p.mechanism, "assumption": p.assumption,
            "max_participations": p.max_participations, "min_separation": p.min_separation,
            "epsilon_bound": p.epsilon_bound, "max_contributions": p.max_contributions,
        },
    });
    print(a.json, &json, || {
        println!("current version   {}", s.current_version);
        println!("latest version    {}", s.latest_version);
        println!("devices           {} active, {} revoked", s.active_devices, s.revoked_devices);
        println!("published rounds  {}", s.published_rounds);
        println!(
            "privacy spent     ε = {:.4} at δ = {:e} ({}, {} accountant)",
            s.epsilon, s.delta, p.mechanism, p.accountant
        );
        let limit = |n: u64| if n == 0 { "none".to_string() } else { n.to_string() };
        println!(
            "assumes           {}; at most {} contributions per device, {} rounds apart (most so far: {})",
            p.assumption,
            limit(p.max_participations),
            limit(p.min_separation),
            p.max_contributions
        );
        if let Some(bound) = p.epsilon_bound {
            println!("privacy bound     ε ≤ {bound:.4} at δ = {:e} once every device is at its limits", s.delta);
        }
        match &s.open_round {
            Some(r) => {
                println!("open round        {} ({}, {} of {} updates)", r.round_id, r.state, r.updates, r.cohort_size)
            }
            None => println!("open round        none"),
        }
        println!("coordinator key   {}", s.coordinator_public_key);
    })?;
    Ok(())
}

/// `rounds`: the latest rounds.
async fn rounds(a: &AdminArgs) -> Result<()> {
    let (mut c, t) = admin(a).await?;
    let r = c.list_rounds(authed(pb::ListRoundsRequest { limit: 0 }, &t)?).await.map_err(status_error)?.into_inner();
    let rows: Vec<Round> = r
        .rounds
        .iter()
        .map(|r| Round {
            round_id: r.round_id,
            state: &r.state,
            base_version: r.base_version,
            published_version: r.published_version,
            cohort_size: r.cohort_size,
            updates: r.updates,
            declined: r.declined,
            failure: &r.failure,
        })
        .collect();
    print(a.json, &rows, || {
        println!(
            "{:>6} {:<12} {:>5} {:>10} {:>7} {:>8} {:>9}  failure",
            "round", "state", "base", "published", "cohort", "updates", "declined"
        );
        for r in &rows {
            println!(
                "{:>6} {:<12} {:>5} {:>10} {:>7} {:>8} {:>9}  {}",
                r.round_id,
                r.state,
                r.base_version,
                r.published_version,
                r.cohort_size,
                r.updates,
                r.declined,
                r.failure
            );
        }
    })?;
    Ok(())
}

/// `versions`: every published version.
async fn versions(a: &AdminArgs) -> Result<()> {
    let (mut c, t) = admin(a).await?;
    let v = c.list_versions(authed(pb::ListVersionsRequest {}, &t)?).await.map_err(status_error)?.into_inner();
    let rows: Vec<_> = v
        .versions
        .iter()
        .map(|v| {
            serde_json::json!({"version": v.version, "parent": v.parent, "round_id": v.round_id,
            "current": v.current, "epsilon": v.epsilon, "manifest_sha256": v.manifest_sha256,
            "release_version": v.release_version, "adapter_rounds": v.adapter_rounds,
            "download_bytes": v.download_bytes})
        })
        .collect();
    print(a.json, &rows, || {
        println!(
            "{:>7} {:>6} {:>6} {:>8} {:>9} {:>8} {:>14} {:>12}  manifest sha256",
            "version", "parent", "round", "current", "epsilon", "release", "what", "download"
        );
        for v in &v.versions {
            let what =
                if v.adapter_rounds == 0 { "release".to_string() } else { format!("adapter ({} r)", v.adapter_rounds) };
            println!(
                "{:>7} {:>6} {:>6} {:>8} {:>9.4} {:>8} {:>14} {:>9.2} MB  {}",
                v.version,
                v.parent,
                v.round_id,
                if v.current { "*" } else { "" },
                v.epsilon,
                v.release_version,
                what,
                v.download_bytes as f64 / 1e6,
                v.manifest_sha256
            );
        }
    })?;
    Ok(())
}

/// `devices`: every enrolled device.
async fn devices(a: &AdminArgs) -> Result<()> {
    let (mut c, t) = admin(a).await?;
    let d = c.list_devices(authed(pb::ListDevicesRequest {}, &t)?).await.map_err(status_error)?.into_inner();
    let rows: Vec<_> = d
        .devices
        .iter()
        .map(|d| {
            serde_json::json!({"device_id": d.device_id, "label": d.label, "revoked": d.revoked,
            "updates": d.updates, "last_seen_unix_ms": d.last_seen_unix_ms})
        })
        .collect();
    print(a.json, &rows, || {
        println!("{:<64} {:<16} {:>8} {:>8}", "device", "label", "revoked", "updates");
        for d in &d.devices {
            // Labels come from devices: print them escaped, never raw.
            let label = d.label.escape_debug().to_string();
            println!("{:<64} {:<16} {:>8} {:>8}", d.device_id, label, d.revoked, d.updates);
        }
    })?;
    Ok(())
}

fn print_promoted(r: &pb::PromoteResponse) {
    println!("current version: {}", r.current_version);
    if r.failed_round > 0 {
        println!("round {} was failed: it trained on another version", r.failed_round);
    }
}
