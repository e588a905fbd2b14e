//! `covey-privacy`: ε of a training run, and the noise multiplier for a target ε.

use anyhow::Result;
use clap::{Parser, Subcommand};
use covey_privacy::{Accountant, SampledGaussian, calibrate, rdp};

#[derive(Parser)]
#[command(name = "covey-privacy", version, about = "Differential-privacy accounting for Covey runs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// ε spent by T steps of the subsampled Gaussian mechanism.
    Epsilon {
        /// Sampling rate q (expected cohort / population), in [0, 1].
        #[arg(long)]
        sampling_rate: f64,
        /// Noise multiplier z (noise std = z · clip norm).
        #[arg(long)]
        noise_multiplier: f64,
        /// Number of steps (rounds).
        #[arg(long)]
        steps: u64,
        /// Target δ.
        #[arg(long)]
        delta: f64,
        /// Accountant: `rdp` (Rényi DP) or `pld` (privacy loss distributions, tighter).
        #[arg(long, default_value = "rdp")]
        accountant: Accountant,
        /// Print one JSON object as the last line.
        #[arg(long)]
        json: bool,
    },
    /// The smallest noise multiplier that spends at most the target ε.
    Calibrate {
        /// Target ε.
        #[arg(long)]
        target_epsilon: f64,
        /// Target δ.
        #[arg(long)]
        delta: f64,
        /// Sampling rate q, in [0, 1].
        #[arg(long)]
        sampling_rate: f64,
        /// Number of steps (rounds).
        #[arg(long)]
        steps: u64,
        /// Accountant: `rdp` or `pld`.
        #[arg(long, default_value = "rdp")]
        accountant: Accountant,
        /// Print one JSON object as the last line.
        #[arg(long)]
        json: bool,
    },
}

/// ε, and the optimal RDP order when the accountant is RDP.
fn epsilon(accountant: Accountant, q: f64, z: f64, steps: u64, delta: f64) -> Result<(f64, Option<f64>)> {
    Ok(match accountant {
        Accountant::Rdp => {
            let (e, order) = rdp::epsilon(q, z, steps, delta)?;
            (e, Some(order))
        }
        _ => (accountant.epsilon(&[SampledGaussian { q, z, steps }], delta)?, None),
    })
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Epsilon { sampling_rate, noise_multiplier, steps, delta, accountant, json } => {
            let (eps, order) = epsilon(accountant, sampling_rate, noise_multiplier, steps, delta)?;
            if json {
                let mut v = serde_json::json!({"epsilon": eps, "delta": delta, "accountant": accountant.name(),
                    "sampling_rate": sampling_rate, "noise_multiplier": noise_multiplier, "steps": steps});
                if let Some(order) = order {
                    v["order"] = order.into();
                }
                println!("{v}");
            } else if let Some(order) = order {
                println!("ε = {eps:.6} at δ = {delta:e} (RDP, optimal order {order})");
            } else {
                println!("ε = {eps:.6} at δ = {delta:e} (PLD)");
            }
        }
        Command::Calibrate { target_epsilon, delta, sampling_rate, steps, accountant, json } => {
            let z = calibrate::noise_multiplier_for(accountant, target_epsilon, delta, sampling_rate, steps)?;
            let (eps, order) = epsilon(accountant, sampling_rate, z, steps, delta)?;
            if json {
                let mut v = serde_json::json!({"noise_multiplier": z, "epsilon": eps, "target_epsilon": target_epsilon,
                    "delta": delta, "accountant": accountant.name(), "sampling_rate": sampling_rate, "steps": steps});
                if let Some(order) = order {
                    v["order"] = order.into();
                }
                println!("{v}");
            } else {
                println!(
                    "noise multiplier z = {z:.6} gives ε = {eps:.6} ≤ {target_epsilon} at δ = {delta:e} ({})",
                    accountant.name().to_uppercase()
                );
            }
        }
    }
    Ok(())
}
