//! `covey-privacy`: ε of a training run, and the noise multiplier for a target ε.

use anyhow::{Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use covey_privacy::{calibrate, rdp};

#[derive(Parser)]
#[command(name = "covey-privacy", version, about = "Differential-privacy accounting for Covey runs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Accountant {
    /// Rényi DP of the Poisson-subsampled Gaussian (Mironov et al. 2019).
    Rdp,
    /// Privacy loss distributions (not built yet).
    Pld,
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
        /// Accountant.
        #[arg(long, value_enum, default_value_t = Accountant::Rdp)]
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
        /// Print one JSON object as the last line.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Epsilon { sampling_rate, noise_multiplier, steps, delta, accountant, json } => {
            if let Accountant::Pld = accountant {
                bail!("the PLD accountant is not built yet; use --accountant rdp");
            }
            let (epsilon, order) = rdp::epsilon(sampling_rate, noise_multiplier, steps, delta)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"epsilon": epsilon, "delta": delta, "accountant": "rdp", "order": order,
                        "sampling_rate": sampling_rate, "noise_multiplier": noise_multiplier, "steps": steps})
                );
            } else {
                println!("ε = {epsilon:.6} at δ = {delta:e} (RDP, optimal order {order})");
            }
        }
        Command::Calibrate { target_epsilon, delta, sampling_rate, steps, json } => {
            let z = calibrate::noise_multiplier(target_epsilon, delta, sampling_rate, steps)?;
            let (epsilon, order) = rdp::epsilon(sampling_rate, z, steps, delta)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"noise_multiplier": z, "epsilon": epsilon, "target_epsilon": target_epsilon,
                        "delta": delta, "accountant": "rdp", "order": order, "sampling_rate": sampling_rate, "steps": steps})
                );
            } else {
                println!("noise multiplier z = {z:.6} gives ε = {epsilon:.6} ≤ {target_epsilon} at δ = {delta:e}");
            }
        }
    }
    Ok(())
}
