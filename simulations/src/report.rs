//! Per-round metrics, run summaries and the report folder.
//!
//! A run writes one folder: `report.json` (everything), `metrics.csv` (the per-round
//! figures, byte-identical between two runs with the same seed), `timing.csv` (wall time,
//! which is not reproducible and so kept apart) and `curves.svg`. Several runs compare into
//! `comparison.csv`, `comparison.txt` and `compare.svg`.
//!
//! JSON cannot hold NaN or infinities: non-finite `f64` fields are written as `null` and
//! read back as NaN (an infinity therefore comes back as NaN).

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// The metrics of one round; round 0 is the model before any training (baseline).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundMetrics {
    /// The round number; 0 is the baseline evaluation before any training.
    pub round: u64,
    /// How many client updates were aggregated this round (0 for round 0).
    pub clients: usize,
    /// Mean of the clients' last local training loss, weighted by examples (NaN for round 0).
    #[serde(with = "nullable_f64")]
    pub train_loss: f64,
    /// Held-out mean negative log-likelihood, in nats per token.
    #[serde(with = "nullable_f64")]
    pub test_loss: f64,
    /// Held-out perplexity, `exp(test_loss)`.
    #[serde(with = "nullable_f64")]
    pub test_perplexity: f64,
    /// Held-out next-token accuracy, in `[0, 1]`.
    #[serde(with = "nullable_f64")]
    pub top1: f64,
    /// Held-out top-3 next-token accuracy, in `[0, 1]`.
    #[serde(with = "nullable_f64")]
    pub top3: f64,
    /// Cumulative ε at the run's δ after this round (0 without differential privacy).
    #[serde(with = "nullable_f64")]
    pub epsilon: f64,
    /// Bytes one client uploaded this round (mean over the round's clients).
    pub bytes_up_per_client: u64,
    /// Bytes one client downloaded this round (mean over the round's clients).
    pub bytes_down_per_client: u64,
    /// Wall time of this round, in seconds.
    #[serde(with = "nullable_f64")]
    pub wall_seconds: f64,
}

/// The headline figures of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Training rounds run (rounds numbered 1 and up).
    pub rounds: u64,
    /// Clients sampled per round.
    pub clients_per_round: usize,
    /// Clients in the population.
    pub population: usize,
    /// Held-out perplexity before training.
    #[serde(with = "nullable_f64")]
    pub baseline_perplexity: f64,
    /// Held-out perplexity after the last round.
    #[serde(with = "nullable_f64")]
    pub final_perplexity: f64,
    /// Top-1 accuracy before training, in `[0, 1]`.
    #[serde(with = "nullable_f64")]
    pub baseline_top1: f64,
    /// Top-1 accuracy after the last round, in `[0, 1]`.
    #[serde(with = "nullable_f64")]
    pub final_top1: f64,
    /// Top-3 accuracy before training, in `[0, 1]`.
    #[serde(with = "nullable_f64")]
    pub baseline_top3: f64,
    /// Top-3 accuracy after the last round, in `[0, 1]`.
    #[serde(with = "nullable_f64")]
    pub final_top3: f64,
    /// Cumulative ε at `delta` after the last round (0 without differential privacy).
    #[serde(with = "nullable_f64")]
    pub epsilon: f64,
    /// The δ at which `epsilon` is stated.
    #[serde(with = "nullable_f64")]
    pub delta: f64,
    /// Mean bytes one client uploaded per training round.
    pub bytes_up_per_client_round: u64,
    /// Mean bytes one client downloaded per training round.
    pub bytes_down_per_client_round: u64,
    /// Total wall time of all rounds (baseline included), in seconds.
    #[serde(with = "nullable_f64")]
    pub wall_seconds: f64,
}

impl Summary {
    /// Summarises `rounds`: the baseline is round 0 (or the first round when there is no
    /// round 0), the final figures and ε are the last round's, bytes are the mean over the
    /// training rounds (numbered 1 and up; 0 when there are none) and wall time is the sum
    /// over all rounds. Figures with no round to come from are NaN.
    pub fn from_rounds(rounds: &[RoundMetrics], clients_per_round: usize, population: usize, delta: f64) -> Summary {
        let baseline = rounds.iter().find(|r| r.round == 0).or_else(|| rounds.first());
        let last = rounds.last();
        let pick = |r: Option<&RoundMetrics>, f: fn(&RoundMetrics) -> f64| r.map_or(f64::NAN, f);
        let training: Vec<&RoundMetrics> = rounds.iter().filter(|r| r.round >= 1).collect();
        let mean_bytes = |f: fn(&RoundMetrics) -> u64| -> u64 {
            let n = training.len() as u128;
            if n == 0 {
                return 0;
            }
            let sum: u128 = training.iter().map(|r| u128::from(f(r))).sum();
            // Rounded to the nearest byte; a mean of u64 values always fits a u64.
            u64::try_from((sum + n / 2) / n).unwrap_or(u64::MAX)
        };
        Summary {
            rounds: training.len() as u64,
            clients_per_round,
            population,
            baseline_perplexity: pick(baseline, |r| r.test_perplexity),
            final_perplexity: pick(last, |r| r.test_perplexity),
            baseline_top1: pick(baseline, |r| r.top1),
            final_top1: pick(last, |r| r.top1),
            baseline_top3: pick(baseline, |r| r.top3),
            final_top3: pick(last, |r| r.top3),
            epsilon: pick(last, |r| r.epsilon),
            delta,
            bytes_up_per_client_round: mean_bytes(|r| r.bytes_up_per_client),
            bytes_down_per_client_round: mean_bytes(|r| r.bytes_down_per_client),
            wall_seconds: rounds.iter().map(|r| r.wall_seconds).filter(|w| w.is_finite()).sum(),
        }
    }
}

/// Everything a run reports: written as `report.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The run's name.
    pub name: String,
    /// How clients ran: `"in-process"` or `"loopback-grpc"`.
    pub mode: String,
    /// The experiment config as run.
    pub config: serde_json::Value,
    /// The per-round metrics, round 0 (baseline) first.
    pub rounds: Vec<RoundMetrics>,
    /// The headline figures.
    pub summary: Summary,
    /// Free-form remarks about the run.
    #[serde(default)]
    pub notes: Vec<String>,
    /// Per-device base, global and personal figures, when the experiment personalises.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub personalisation: Option<crate::personal::PersonalReport>,
    /// What the Byzantine clients did, when the experiment has them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attack: Option<crate::attack::AttackSummary>,
}

/// (De)serialises an `f64` as a JSON number, or `null` when it is not finite (read back as NaN).
pub(crate) mod nullable_f64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &f64, serializer: S) -> Result<S::Ok, S::Error> {
        if value.is_finite() { serializer.serialize_f64(*value) } else { serializer.serialize_none() }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
    }
}

/// The per-round metrics as CSV, one row per round, without wall time so that two runs
/// with the same seed give identical bytes. Floats use Rust's shortest round-trip
/// formatting; NaN is an empty field.
pub fn metrics_csv(rounds: &[RoundMetrics]) -> String {
    let mut out = String::from(
        "round,clients,train_loss,test_loss,test_perplexity,top1,top3,epsilon,bytes_up_per_client,bytes_down_per_client\n",
    );
    for r in rounds {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{}",
            r.round,
            r.clients,
            csv_f64(r.train_loss),
            csv_f64(r.test_loss),
            csv_f64(r.test_perplexity),
            csv_f64(r.top1),
            csv_f64(r.top3),
            csv_f64(r.epsilon),
            r.bytes_up_per_client,
            r.bytes_down_per_client,
        );
    }
    out
}

/// The wall time of each round as CSV: `round,wall_seconds`.
pub fn timing_csv(rounds: &[RoundMetrics]) -> String {
    let mut out = String::from("round,wall_seconds\n");
    for r in rounds {
        let _ = writeln!(out, "{},{}", r.round, csv_f64(r.wall_seconds));
    }
    out
}

/// One CSV row per run: name, rounds, clients per round, baseline and final perplexity,
/// final top-1 and top-3, ε, bytes uploaded per client-round and wall seconds.
pub fn comparison_csv(reports: &[Report]) -> String {
    let mut out = String::from(
        "name,rounds,clients_per_round,baseline_perplexity,final_perplexity,final_top1,final_top3,epsilon,bytes_up_per_client_round,wall_seconds\n",
    );
    for r in reports {
        let s = &r.summary;
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{}",
            csv_text(&r.name),
            s.rounds,
            s.clients_per_round,
            csv_f64(s.baseline_perplexity),
            csv_f64(s.final_perplexity),
            csv_f64(s.final_top1),
            csv_f64(s.final_top3),
            csv_f64(s.epsilon),
            s.bytes_up_per_client_round,
            csv_f64(s.wall_seconds),
        );
    }
    out
}

/// The figures of [`comparison_csv`] as a fixed-width plain-text table for the terminal.
pub fn comparison_table(reports: &[Report]) -> String {
    let header =
        ["run", "rounds", "clients", "ppl before", "ppl after", "top-1", "top-3", "ε", "up/client/round", "wall"];
    let rows: Vec<Vec<String>> = reports
        .iter()
        .map(|r| {
            let s = &r.summary;
            vec![
                r.name.clone(),
                s.rounds.to_string(),
                s.clients_per_round.to_string(),
                fixed(s.baseline_perplexity, 3),
                fixed(s.final_perplexity, 3),
                percent(s.final_top1),
                percent(s.final_top3),
                epsilon_text(s.epsilon),
                human_bytes(s.bytes_up_per_client_round),
                seconds(s.wall_seconds),
            ]
        })
        .collect();
    // The run name is left-aligned, every figure right-aligned.
    let mut align = [Align::Right; 10];
    align[0] = Align::Left;
    render_table(&header, &rows, &align)
}

/// A small before/after table of a run: perplexity, top-1 and top-3 with the change
/// (perplexity in percent, accuracy in percentage points), then ε at δ and the bytes
/// each client moved per round.
pub fn before_after_table(s: &Summary) -> String {
    let header = ["", "before", "after", "change"];
    let rows = vec![
        vec![
            "perplexity".to_owned(),
            fixed(s.baseline_perplexity, 3),
            fixed(s.final_perplexity, 3),
            relative_change(s.baseline_perplexity, s.final_perplexity),
        ],
        vec![
            "top-1".to_owned(),
            percent(s.baseline_top1),
            percent(s.final_top1),
            point_change(s.baseline_top1, s.final_top1),
        ],
        vec![
            "top-3".to_owned(),
            percent(s.baseline_top3),
            percent(s.final_top3),
            point_change(s.baseline_top3, s.final_top3),
        ],
    ];
    let mut out = render_table(&header, &rows, &[Align::Left, Align::Right, Align::Right, Align::Right]);
    out.push('\n');
    let privacy = if s.epsilon.is_finite() && s.epsilon > 0.0 {
        format!("{:.2} at δ = {:e}", s.epsilon, s.delta)
    } else {
        "- (no differential privacy)".to_owned()
    };
    let _ = writeln!(out, "ε           {privacy}");
    let _ = writeln!(out, "upload      {} per client per round", human_bytes(s.bytes_up_per_client_round));
    let _ = writeln!(out, "download    {} per client per round", human_bytes(s.bytes_down_per_client_round));
    let _ = writeln!(out, "rounds      {} × {} of {} clients", s.rounds, s.clients_per_round, s.population);
    out
}

/// A float for CSV: shortest round-trip form, NaN as an empty field.
fn csv_f64(value: f64) -> String {
    if value.is_nan() { String::new() } else { value.to_string() }
}

/// A text field for CSV, quoted when it holds a comma, quote or line break.
fn csv_text(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) { format!("\"{}\"", text.replace('"', "\"\"")) } else { text.to_owned() }
}

/// `value` with `decimals` decimals, or "-" when it is not finite.
fn fixed(value: f64, decimals: usize) -> String {
    if value.is_finite() { format!("{value:.decimals$}") } else { "-".to_owned() }
}

/// An accuracy in `[0, 1]` as a percentage with one decimal.
fn percent(accuracy: f64) -> String {
    if accuracy.is_finite() { format!("{:.1}%", accuracy * 100.0) } else { "-".to_owned() }
}

/// ε with two decimals, or "-" when there is no differential privacy.
fn epsilon_text(epsilon: f64) -> String {
    if epsilon.is_finite() && epsilon != 0.0 { format!("{epsilon:.2}") } else { "-".to_owned() }
}

/// Seconds with one decimal and an `s`.
fn seconds(value: f64) -> String {
    if value.is_finite() { format!("{value:.1}s") } else { "-".to_owned() }
}

/// The relative change from `before` to `after`, in percent with a sign.
fn relative_change(before: f64, after: f64) -> String {
    let change = (after - before) / before * 100.0;
    if before != 0.0 && change.is_finite() { format!("{change:+.1}%") } else { "-".to_owned() }
}

/// The change from `before` to `after` (accuracies in `[0, 1]`) in percentage points.
fn point_change(before: f64, after: f64) -> String {
    let change = (after - before) * 100.0;
    if change.is_finite() { format!("{change:+.1} pp") } else { "-".to_owned() }
}

/// A byte count in B, KiB, MiB or GiB.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 3] = ["KiB", "MiB", "GiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// How a table column is aligned.
#[derive(Debug, Clone, Copy)]
enum Align {
    Left,
    Right,
}

/// A plain-text table: a header, a rule, then the rows, columns two spaces apart and
/// padded to their widest cell (counted in characters).
fn render_table(header: &[&str], rows: &[Vec<String>], align: &[Align]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| -> String {
        let mut out = String::new();
        for (i, cell) in cells.enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            let pad = widths[i].saturating_sub(cell.chars().count());
            match align.get(i).copied().unwrap_or(Align::Left) {
                Align::Left => {
                    out.push_str(cell);
                    out.extend(std::iter::repeat_n(' ', pad));
                }
                Align::Right => {
                    out.extend(std::iter::repeat_n(' ', pad));
                    out.push_str(cell);
                }
            }
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
        out
    };
    let mut out = line(&mut header.iter().copied());
    let rule_width = widths.iter().sum::<usize>() + 2 * widths.len().saturating_sub(1);
    out.extend(std::iter::repeat_n('-', rule_width));
    out.push('\n');
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use std::fs;

    use super::*;
    use crate::error::SimError;
    use crate::output::{read_report, write_comparison, write_report};

    /// A hand-built round.
    pub(crate) fn round(n: u64, ppl: f64, top1: f64, top3: f64, epsilon: f64, up: u64, wall: f64) -> RoundMetrics {
        RoundMetrics {
            round: n,
            clients: if n == 0 { 0 } else { 10 },
            train_loss: if n == 0 { f64::NAN } else { ppl.ln() + 0.1 },
            test_loss: ppl.ln(),
            test_perplexity: ppl,
            top1,
            top3,
            epsilon,
            bytes_up_per_client: up,
            bytes_down_per_client: 2 * up,
            wall_seconds: wall,
        }
    }

    /// Three rounds: baseline then two training rounds.
    pub(crate) fn three_rounds() -> Vec<RoundMetrics> {
        vec![
            round(0, 20.0, 0.30, 0.50, 0.0, 0, 0.5),
            round(1, 19.0, 0.32, 0.55, 1.25, 1000, 2.0),
            round(2, 18.0, 0.35, 0.60, 2.5, 2001, 2.25),
        ]
    }

    /// A report named `name` over `rounds`.
    pub(crate) fn report(name: &str, rounds: Vec<RoundMetrics>) -> Report {
        let summary = Summary::from_rounds(&rounds, 10, 100, 1e-5);
        Report {
            name: name.to_owned(),
            mode: "in-process".to_owned(),
            config: serde_json::json!({ "rounds": rounds.len().saturating_sub(1), "seed": 7 }),
            rounds,
            summary,
            notes: vec!["a note".to_owned()],
            personalisation: None,
            attack: None,
        }
    }

    #[test]
    fn summary_from_rounds_takes_baseline_final_mean_bytes_and_wall_sum() {
        let s = Summary::from_rounds(&three_rounds(), 10, 100, 1e-5);
        assert_eq!(s.rounds, 2);
        assert_eq!((s.clients_per_round, s.population), (10, 100));
        assert_eq!(s.baseline_perplexity, 20.0);
        assert_eq!(s.final_perplexity, 18.0);
        assert_eq!((s.baseline_top1, s.final_top1), (0.30, 0.35));
        assert_eq!((s.baseline_top3, s.final_top3), (0.50, 0.60));
        assert_eq!(s.epsilon, 2.5);
        assert_eq!(s.delta, 1e-5);
        // (1000 + 2001) / 2 = 1500.5, rounded; round 0 is left out of the mean.
        assert_eq!(s.bytes_up_per_client_round, 1501);
        assert_eq!(s.bytes_down_per_client_round, 3001);
        assert_eq!(s.wall_seconds, 4.75);
    }

    #[test]
    fn summary_without_round_zero_uses_the_first_round_and_empty_input_is_nan() {
        let rounds = three_rounds()[1..].to_vec();
        let s = Summary::from_rounds(&rounds, 10, 100, 1e-5);
        assert_eq!(s.baseline_perplexity, 19.0);
        assert_eq!(s.final_perplexity, 18.0);

        let empty = Summary::from_rounds(&[], 10, 100, 1e-5);
        assert_eq!(empty.rounds, 0);
        assert!(empty.final_perplexity.is_nan());
        assert_eq!(empty.bytes_up_per_client_round, 0);
        assert_eq!(empty.wall_seconds, 0.0);
    }

    #[test]
    fn metrics_csv_has_header_rows_empty_nan_and_no_wall_time() {
        let csv = metrics_csv(&three_rounds());
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "round,clients,train_loss,test_loss,test_perplexity,top1,top3,epsilon,bytes_up_per_client,bytes_down_per_client"
        );
        assert_eq!(lines.len(), 4);
        assert!(!csv.contains("wall"));
        // Round 0's train loss is NaN: an empty third field.
        let fields: Vec<&str> = lines[1].split(',').collect();
        assert_eq!(fields.len(), 10);
        assert_eq!(fields[2], "");
        assert_eq!(fields[4], "20");
        assert_eq!(fields[5], "0.3");
        assert!(!csv.contains("NaN"));
        // Shortest round-trip formatting reads back exactly.
        let row2: Vec<&str> = lines[3].split(',').collect();
        assert_eq!(row2[3].parse::<f64>().expect("a float"), 18f64.ln());
        // Wall times differ, the metrics CSV does not.
        let mut other = three_rounds();
        for r in &mut other {
            r.wall_seconds *= 3.0;
        }
        assert_eq!(metrics_csv(&three_rounds()).as_bytes(), metrics_csv(&other).as_bytes());
    }

    #[test]
    fn timing_csv_lists_wall_seconds() {
        assert_eq!(timing_csv(&three_rounds()), "round,wall_seconds\n0,0.5\n1,2\n2,2.25\n");
    }

    #[test]
    fn report_round_trips_through_the_folder_with_nan() {
        let dir = tempfile::tempdir().expect("temp dir");
        let run_dir = dir.path().join("runs").join("a");
        let report = report("baseline-run", three_rounds());
        let files = write_report(&run_dir, &report).expect("write report");
        let names: Vec<String> =
            files.paths.iter().map(|p| p.file_name().expect("name").to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["report.json", "metrics.csv", "timing.csv", "curves.svg"]);
        for file in &files.paths {
            assert!(file.is_file(), "{} missing", file.display());
        }
        // No temporary file is left behind.
        let leftovers = fs::read_dir(&run_dir).expect("list").filter_map(|e| e.ok()).count();
        assert_eq!(leftovers, 4);
        let json = fs::read_to_string(run_dir.join("report.json")).expect("read json");
        assert!(json.contains("\"train_loss\": null"));

        for path in [run_dir.clone(), run_dir.join("report.json")] {
            let back = read_report(&path).expect("read report");
            assert!(back.rounds[0].train_loss.is_nan());
            assert_eq!(back.rounds[1..], report.rounds[1..]);
            assert_eq!(back.summary, report.summary);
            assert_eq!((back.name.as_str(), back.mode.as_str()), ("baseline-run", "in-process"));
            assert_eq!(back.config, report.config);
            assert_eq!(back.notes, report.notes);
        }
        assert_eq!(fs::read_to_string(run_dir.join("metrics.csv")).expect("csv"), metrics_csv(&report.rounds));
    }

    #[test]
    fn notes_default_to_empty() {
        let mut value = serde_json::to_value(report("r", three_rounds())).expect("to value");
        value.as_object_mut().expect("object").remove("notes");
        let back: Report = serde_json::from_value(value).expect("from value");
        assert!(back.notes.is_empty());
    }

    #[test]
    fn read_report_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let err = read_report(dir.path()).expect_err("no report.json");
        assert!(matches!(err, SimError::Io { .. }));
        assert!(err.to_string().contains("report.json"), "{err}");

        let bad = dir.path().join("report.json");
        fs::write(&bad, "{ not json").expect("write");
        let err = read_report(dir.path()).expect_err("malformed");
        match err {
            SimError::Json { path, .. } => assert_eq!(path, bad),
            other => panic!("expected a JSON error, got {other}"),
        }
    }

    #[test]
    fn before_after_table_shows_changes() {
        let s = Summary::from_rounds(&three_rounds(), 10, 100, 1e-5);
        let table = before_after_table(&s);
        // Perplexity 20 → 18 is -10.0%; top-1 30% → 35% is +5.0 pp; top-3 +10.0 pp.
        let ppl = table.lines().find(|l| l.starts_with("perplexity")).expect("perplexity row");
        assert!(ppl.contains("20.000") && ppl.contains("18.000") && ppl.ends_with("-10.0%"), "{ppl}");
        let top1 = table.lines().find(|l| l.starts_with("top-1")).expect("top-1 row");
        assert!(top1.contains("30.0%") && top1.contains("35.0%") && top1.ends_with("+5.0 pp"), "{top1}");
        let top3 = table.lines().find(|l| l.starts_with("top-3")).expect("top-3 row");
        assert!(top3.ends_with("+10.0 pp"), "{top3}");
        assert!(table.contains("2.50 at δ = 1e-5"), "{table}");
        // 1501 bytes up, 3001 down.
        assert!(table.contains("upload      1.5 KiB per client per round"), "{table}");
        assert!(table.contains("download    2.9 KiB per client per round"), "{table}");

        let no_dp = Summary { epsilon: 0.0, ..s };
        assert!(before_after_table(&no_dp).contains("no differential privacy"));
    }

    #[test]
    fn comparison_table_aligns_and_formats() {
        let mut dp = three_rounds();
        dp[2].test_perplexity = 18.12345;
        let plain: Vec<RoundMetrics> = three_rounds()
            .into_iter()
            .map(|r| RoundMetrics { epsilon: 0.0, bytes_up_per_client: r.bytes_up_per_client * 2048, ..r })
            .collect();
        let reports = [report("dp", dp), report("a-longer-run-name", plain)];
        let table = comparison_table(&reports);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[1].chars().all(|c| c == '-'));
        let dp_row = lines[2];
        assert!(dp_row.starts_with("dp "));
        for figure in ["20.000", "18.123", "35.0%", "60.0%", "2.50", "1.5 KiB", "4.8s"] {
            assert!(dp_row.contains(figure), "{figure} not in {dp_row}");
        }
        let plain_row = lines[3];
        assert!(plain_row.contains("  -  "), "ε shown as '-': {plain_row}");
        assert!(plain_row.contains("2.9 MiB"), "{plain_row}");
        // Right-aligned columns: every row ends in the same column.
        let width = lines[0].chars().count();
        assert!(lines.iter().all(|l| l.chars().count() == width), "{table}");
    }

    #[test]
    fn comparison_csv_has_one_row_per_run_and_quotes_names() {
        let reports = [report("plain", three_rounds()), report("with,comma", three_rounds())];
        let csv = comparison_csv(&reports);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(
            lines[0],
            "name,rounds,clients_per_round,baseline_perplexity,final_perplexity,final_top1,final_top3,epsilon,bytes_up_per_client_round,wall_seconds"
        );
        assert_eq!(lines[1], "plain,2,10,20,18,0.35,0.6,2.5,1501,4.75");
        assert!(lines[2].starts_with("\"with,comma\",2,"));
    }

    #[test]
    fn write_comparison_writes_three_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        let reports = [report("run-a", three_rounds()), report("run-b", three_rounds())];
        let files = write_comparison(dir.path(), &reports).expect("write comparison");
        assert_eq!(files.paths.len(), 3);
        assert_eq!(fs::read_to_string(dir.path().join("comparison.csv")).expect("csv"), comparison_csv(&reports));
        assert_eq!(fs::read_to_string(dir.path().join("comparison.txt")).expect("txt"), comparison_table(&reports));
        let svg = fs::read_to_string(dir.path().join("compare.svg")).expect("svg");
        assert!(svg.starts_with("<svg"));
    }

    #[test]
    fn human_bytes_picks_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024), "5.0 MiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }
}
