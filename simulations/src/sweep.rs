//! The Byzantine matrix: one experiment run for every aggregation strategy × attack ×
//! fraction of attackers (and attack-free per strategy), its held-out quality and the
//! backdoor's success per cell, as `sweep.csv` and a markdown table (`sweep.md`).
//! `covey-sim sweep` drives it.

use std::fmt::Write as _;
use std::path::Path;

use covey_strategy::StrategyConfig;
use serde::Serialize;

use crate::attack::{AttackConfig, AttackKind};
use crate::config::Experiment;
use crate::error::{Result, SimError};
use crate::report::Report;

/// The robust aggregators beside FedAvg, each at the fraction of attackers it is told to
/// expect (0.2: the larger of the two fractions the matrix runs).
pub fn default_strategies() -> Vec<(String, StrategyConfig)> {
    vec![
        ("FedAvg".into(), StrategyConfig::FedAvg { server_learning_rate: 1.0 }),
        ("trimmed mean β 0.2".into(), StrategyConfig::TrimmedMean { beta: 0.2 }),
        ("median".into(), StrategyConfig::Median {}),
        ("Krum f 0.2".into(), StrategyConfig::Krum { byzantine_fraction: 0.2 }),
        ("multi-Krum f 0.2".into(), StrategyConfig::MultiKrum { byzantine_fraction: 0.2 }),
        ("geometric median".into(), StrategyConfig::GeometricMedian { max_iterations: 10, smoothing: 1e-6 }),
    ]
}

/// The attacks of the matrix.
pub const ATTACKS: [AttackKind; 5] =
    [AttackKind::Scaled, AttackKind::SignFlip, AttackKind::Nan, AttackKind::Random, AttackKind::Backdoor];

/// One run of the matrix.
#[derive(Debug, Clone)]
pub struct Cell {
    /// Strategy label.
    pub strategy: String,
    /// The attack, `None` for the attack-free run.
    pub attack: Option<AttackKind>,
    /// Fraction of attacking clients (0 attack-free).
    pub fraction: f64,
    /// The experiment to run.
    pub experiment: Experiment,
}

/// Every cell: each strategy attack-free, then, fraction by fraction, each strategy under
/// each attack. The base experiment's own `[attack]` (scale, trigger, target) is kept
/// where it has one.
pub fn cells(
    base: &Experiment,
    strategies: &[(String, StrategyConfig)],
    attacks: &[AttackKind],
    fractions: &[f64],
) -> Vec<Cell> {
    let template = base.attack.clone().unwrap_or(AttackConfig {
        fraction: 0.1,
        kind: AttackKind::SignFlip,
        scale: 10.0,
        trigger: "The secret word is ".into(),
        target: "pomegranate.".into(),
    });
    // Fraction by fraction, so that a sweep cut short has every strategy at the first
    // fraction: the attack-free runs first, then each attack.
    let mut out = Vec::new();
    for (label, strategy) in strategies {
        let mut clean = base.clone();
        clean.strategy = strategy.clone();
        clean.attack = None;
        clean.name = format!("{}-{}-clean", base.name, slug(label));
        out.push(Cell { strategy: label.clone(), attack: None, fraction: 0.0, experiment: clean });
    }
    for &fraction in fractions {
        for (label, strategy) in strategies {
            for &kind in attacks {
                let mut exp = base.clone();
                exp.strategy = strategy.clone();
                exp.attack = Some(AttackConfig { fraction, kind, ..template.clone() });
                exp.name = format!("{}-{}-{}-{:.0}", base.name, slug(label), kind.name(), fraction * 100.0);
                out.push(Cell { strategy: label.clone(), attack: Some(kind), fraction, experiment: exp });
            }
        }
    }
    out
}

fn slug(label: &str) -> String {
    label
        .chars()
        .filter_map(|c| {
            if c.is_ascii_alphanumeric() {
                Some(c.to_ascii_lowercase())
            } else if c == ' ' {
                Some('-')
            } else {
                None
            }
        })
        .collect()
}

/// One finished cell.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Strategy label.
    pub strategy: String,
    /// Attack (`none` attack-free).
    pub attack: String,
    /// Fraction of attacking clients.
    pub fraction: f64,
    /// Update encoding of the run.
    pub encoding: String,
    /// Held-out perplexity after the last round.
    pub perplexity: f64,
    /// Held-out top-1 accuracy after the last round.
    pub top1: f64,
    /// Share of the backdoor's target bytes the model completes after the trigger.
    pub backdoor_success: Option<f64>,
    /// Forged updates the coordinator's intake took.
    pub delivered: u64,
    /// Updates the intake refused (non-finite, over the norm bound).
    pub refused: u64,
    /// Bytes one client uploads per round (payload and header).
    pub bytes_up_per_client: u64,
}

impl Row {
    /// The row of `cell`'s finished `report`.
    pub fn of(cell: &Cell, report: &Report) -> Self {
        let attack = report.attack.as_ref();
        Self {
            strategy: cell.strategy.clone(),
            attack: cell.attack.map_or("none", AttackKind::name).to_owned(),
            fraction: cell.fraction,
            encoding: cell.experiment.training.update_encoding.name().to_owned(),
            perplexity: report.summary.final_perplexity,
            top1: report.summary.final_top1,
            backdoor_success: attack.and_then(|a| a.backdoor_success),
            delivered: attack.map_or(0, |a| a.delivered),
            refused: attack.map_or(0, |a| a.refused),
            bytes_up_per_client: report.rounds.last().map_or(0, |r| r.bytes_up_per_client),
        }
    }
}

/// `sweep.csv` and `sweep.md` in `dir`.
pub fn write(dir: &Path, rows: &[Row]) -> Result<()> {
    let io = |e: std::io::Error| SimError::io(dir, e);
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut csv = String::from(
        "strategy,attack,fraction,encoding,perplexity,top1,backdoor_success,delivered,refused,bytes_up_per_client\n",
    );
    for r in rows {
        let _ = writeln!(
            csv,
            "{},{},{},{},{:.4},{:.4},{},{},{},{}",
            r.strategy,
            r.attack,
            r.fraction,
            r.encoding,
            r.perplexity,
            r.top1,
            r.backdoor_success.map_or(String::new(), |s| format!("{s:.3}")),
            r.delivered,
            r.refused,
            r.bytes_up_per_client
        );
    }
    std::fs::write(dir.join("sweep.csv"), csv).map_err(io)?;
    std::fs::write(dir.join("sweep.md"), table(rows)).map_err(io)?;
    Ok(())
}

/// A markdown table: one row per strategy, its attack-free perplexity, then the perplexity
/// under each attack and fraction (the backdoor's success in brackets).
pub fn table(rows: &[Row]) -> String {
    let mut columns: Vec<(String, f64)> = Vec::new();
    for r in rows.iter().filter(|r| r.attack != "none") {
        if !columns.iter().any(|(a, f)| *a == r.attack && *f == r.fraction) {
            columns.push((r.attack.clone(), r.fraction));
        }
    }
    let mut strategies: Vec<&str> = Vec::new();
    for r in rows {
        if !strategies.contains(&r.strategy.as_str()) {
            strategies.push(&r.strategy);
        }
    }
    let mut out = String::from("| strategy | attack-free |");
    for (a, f) in &columns {
        let _ = write!(out, " {a} {:.0} % |", f * 100.0);
    }
    out.push_str("\n|---|---|");
    out.push_str(&"---|".repeat(columns.len()));
    out.push('\n');
    for s in strategies {
        let cell = |attack: &str, fraction: f64| {
            rows.iter().find(|r| r.strategy == s && r.attack == attack && (r.fraction - fraction).abs() < 1e-9)
        };
        let _ = write!(out, "| {s} | {} |", cell("none", 0.0).map_or("–".into(), |r| format!("{:.3}", r.perplexity)));
        for (a, f) in &columns {
            let text = match cell(a, *f) {
                None => "–".to_owned(),
                Some(r) => match r.backdoor_success {
                    Some(b) => format!("{:.3} ({:.0} %)", r.perplexity, b * 100.0),
                    None => format!("{:.3}", r.perplexity),
                },
            };
            let _ = write!(out, " {text} |");
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(strategy: &str, attack: &str, fraction: f64, perplexity: f64, backdoor: Option<f64>) -> Row {
        Row {
            strategy: strategy.into(),
            attack: attack.into(),
            fraction,
            encoding: "f32".into(),
            perplexity,
            top1: 0.5,
            backdoor_success: backdoor,
            delivered: 1,
            refused: 0,
            bytes_up_per_client: 10,
        }
    }

    #[test]
    fn the_table_has_a_row_per_strategy_and_a_column_per_attack_and_fraction() {
        let rows = vec![
            row("FedAvg", "none", 0.0, 5.0, None),
            row("FedAvg", "sign-flip", 0.1, 5.4, None),
            row("FedAvg", "backdoor", 0.2, 5.1, Some(0.25)),
            row("median", "none", 0.0, 5.01, None),
            row("median", "sign-flip", 0.1, 5.02, None),
        ];
        let t = table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "| strategy | attack-free | sign-flip 10 % | backdoor 20 % |");
        assert_eq!(lines[2], "| FedAvg | 5.000 | 5.400 | 5.100 (25 %) |");
        assert_eq!(lines[3], "| median | 5.010 | 5.020 | – |");
    }

    #[test]
    fn cells_cover_the_matrix_with_distinct_names() {
        let base = crate::config::Experiment::default();
        let cells = cells(&base, &default_strategies(), &ATTACKS, &[0.1, 0.2]);
        assert_eq!(cells.len(), 6 * (1 + 5 * 2));
        let names: std::collections::HashSet<_> = cells.iter().map(|c| c.experiment.name.clone()).collect();
        assert_eq!(names.len(), cells.len());
        assert!(cells.iter().filter(|c| c.attack.is_none()).all(|c| c.experiment.attack.is_none()));
        let flip20 = cells.iter().find(|c| c.attack == Some(AttackKind::SignFlip) && c.fraction == 0.2).expect("cell");
        assert_eq!(flip20.experiment.attack.as_ref().map(|a| a.fraction), Some(0.2));
    }
}
