//! SVG learning curves with plotters.
//!
//! [`plot_run`] draws one run's curves (perplexity, accuracy, train loss, ε) and
//! [`plot_compare`] overlays several runs, each as an SVG document in memory (the
//! `output` module writes them). Non-finite points are left out, and flat or one-point series get a padded
//! y range so every panel has a drawable extent.

use std::error::Error;
use std::ops::Range;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::personal::{DeviceScores, PersonalReport, Scores};
use crate::report::{Report, RoundMetrics};

/// Size of a run's plot, in pixels.
const RUN_SIZE: (u32, u32) = (1200, 800);
/// Size of a comparison plot, in pixels.
const COMPARE_SIZE: (u32, u32) = (1200, 500);
/// Line colours, in order (Tableau 10).
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
/// The font family of every text.
const FONT: &str = "sans-serif";
/// Series with more points than this are drawn without point markers.
const MAX_MARKERS: usize = 60;

/// What drawing returns; converted to [`SimError::Plot`] at the edge.
type DrawResult<T = ()> = std::result::Result<T, Box<dyn Error>>;
/// The SVG drawing area everything is drawn on.
type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// Draws a run's curves into one SVG at `path`: a 2×2 grid of held-out perplexity,
/// top-1 and top-3 accuracy, train loss and cumulative ε by round, titled with the run's
/// name.
pub fn plot_run(report: &Report) -> std::result::Result<String, String> {
    render(RUN_SIZE, |root| draw_run(root, report)).map_err(|e| e.to_string())
}

/// Draws two panels side by side, held-out perplexity and top-1 accuracy by round, with
/// one line per run in a different colour and the run names in a legend.
pub fn plot_compare(reports: &[Report]) -> std::result::Result<String, String> {
    render(COMPARE_SIZE, |root| draw_compare(root, reports)).map_err(|e| e.to_string())
}

/// Draws the personalisation of a run: each device's top-1 accuracy and perplexity on its
/// held-out text with the base, global and personal models, every curve sorted (worst
/// device on the left), so that the curves are the distributions over devices.
pub fn plot_personal(name: &str, report: &PersonalReport) -> std::result::Result<String, String> {
    render(COMPARE_SIZE, |root| draw_personal(root, name, report)).map_err(|e| e.to_string())
}

/// Which model's scores of a device a curve shows.
type Pick = fn(&DeviceScores) -> Scores;

fn draw_personal(root: &Area<'_>, name: &str, report: &PersonalReport) -> DrawResult {
    let title = format!("{name}: personalisation ({}), {} devices", report.config.method, report.devices.len());
    let body = root.titled(&title, (FONT, 24).into_font())?;
    let cells = body.split_evenly((1, 2));
    let sorted = |label: &str, color: RGBColor, value: &dyn Fn(&DeviceScores) -> f64, descending: bool| {
        let mut v: Vec<f64> = report.devices.iter().map(value).filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        if descending {
            v.reverse();
        }
        Series {
            label: label.to_owned(),
            color,
            points: v.into_iter().enumerate().map(|(i, y)| (i as u64, y)).collect(),
        }
    };
    let x_range = 0..(report.devices.len() as u64).max(1);
    let models: [(&str, Pick); 3] = [("base", |d| d.base), ("global", |d| d.global), ("personal", |d| d.personal)];
    let accuracy = Panel {
        caption: "next-token top-1 accuracy per device",
        y_desc: "top-1 (%)",
        series: models
            .iter()
            .enumerate()
            .map(|(i, (label, pick))| sorted(label, PALETTE[i], &|d| pick(d).top1 * 100.0, false))
            .collect(),
        y_range: None,
        legend: Some(SeriesLabelPosition::LowerRight),
    };
    let perplexity = Panel {
        caption: "held-out perplexity per device",
        y_desc: "perplexity",
        series: models
            .iter()
            .enumerate()
            .map(|(i, (label, pick))| sorted(label, PALETTE[i], &|d| pick(d).perplexity, true))
            .collect(),
        y_range: None,
        legend: Some(SeriesLabelPosition::UpperRight),
    };
    draw_panel_along(&cells[0], &accuracy, x_range.clone(), "devices, worst first")?;
    draw_panel_along(&cells[1], &perplexity, x_range, "devices, worst first")?;
    Ok(())
}

/// Draws pace steering's replay ([`crate::pace`]): polls received per second, without
/// and with steering.
pub fn plot_pace(report: &crate::pace::PaceReport) -> std::result::Result<String, String> {
    render(COMPARE_SIZE, |root| {
        let line = |run: &crate::pace::PaceRun, color| Series {
            label: run.label.clone(),
            color,
            points: run.per_second.iter().enumerate().map(|(s, &n)| (s as u64, n as f64)).collect(),
        };
        let seconds = report.unsteered.per_second.len() as u64;
        let caption = format!(
            "{} devices checking in within {:?}: polls per second",
            report.options.devices, report.options.arrival_window
        );
        let panel = Panel {
            caption: &caption,
            y_desc: "polls / s",
            series: vec![line(&report.unsteered, PALETTE[3]), line(&report.steered, PALETTE[0])],
            y_range: Some(0.0..(report.unsteered.peak.max(report.steered.peak) as f64 * 1.05).max(1.0)),
            legend: Some(SeriesLabelPosition::UpperRight),
        };
        draw_panel_along(root, &panel, 0..seconds.max(1), "simulated second")
    })
    .map_err(|e| e.to_string())
}

/// Renders an SVG document of `size` pixels on a white background.
fn render(size: (u32, u32), draw: impl FnOnce(&Area<'_>) -> DrawResult) -> DrawResult<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE)?;
        draw(&root)?;
        root.present()?;
    }
    Ok(svg)
}

/// One line on a panel.
struct Series {
    label: String,
    color: RGBColor,
    /// `(round, value)`, finite values only.
    points: Vec<(u64, f64)>,
}

impl Series {
    /// The series of `value` over `rounds`, leaving out non-finite values.
    fn new(label: &str, color: RGBColor, rounds: &[RoundMetrics], value: impl Fn(&RoundMetrics) -> f64) -> Self {
        let points = rounds.iter().map(|r| (r.round, value(r))).filter(|(_, v)| v.is_finite()).collect();
        Self { label: label.to_owned(), color, points }
    }
}

/// A panel: its caption, y-axis label, lines, a fixed y range (fitted to the lines when
/// `None`) and where the legend goes (no legend when `None`).
struct Panel<'a> {
    caption: &'a str,
    y_desc: &'a str,
    series: Vec<Series>,
    y_range: Option<Range<f64>>,
    legend: Option<SeriesLabelPosition>,
}

fn draw_run(root: &Area<'_>, report: &Report) -> DrawResult {
    let body = root.titled(&report.name, (FONT, 28).into_font())?;
    let cells = body.split_evenly((2, 2));
    let rounds = &report.rounds;
    // Every panel spans all rounds, so that the panels line up.
    let x_range = round_range(rounds.iter().map(|r| r.round));
    let color = |i: usize| PALETTE[i % PALETTE.len()];

    let private = rounds.iter().any(|r| r.epsilon.is_finite() && r.epsilon != 0.0);
    let panels = [
        Panel {
            caption: "held-out perplexity",
            y_desc: "perplexity",
            series: vec![Series::new("perplexity", color(0), rounds, |r| r.test_perplexity)],
            y_range: None,
            legend: None,
        },
        Panel {
            caption: "next-token accuracy",
            y_desc: "accuracy (%)",
            series: vec![
                Series::new("top-1", color(0), rounds, |r| r.top1 * 100.0),
                Series::new("top-3", color(1), rounds, |r| r.top3 * 100.0),
            ],
            y_range: None,
            legend: Some(SeriesLabelPosition::LowerRight),
        },
        Panel {
            caption: "train loss",
            y_desc: "loss (nats/token)",
            series: vec![Series::new("train loss", color(2), rounds, |r| r.train_loss)],
            y_range: None,
            legend: None,
        },
        if private {
            Panel {
                caption: "cumulative ε",
                y_desc: "ε",
                series: vec![Series::new("ε", color(3), rounds, |r| r.epsilon)],
                y_range: None,
                legend: None,
            }
        } else {
            // ε stays 0: a flat grey line on a 0..1 axis.
            Panel {
                caption: "cumulative ε: no differential privacy",
                y_desc: "ε",
                series: vec![Series::new("ε", color(7), rounds, |_| 0.0)],
                y_range: Some(0.0..1.0),
                legend: None,
            }
        },
    ];
    for (cell, panel) in cells.iter().zip(&panels) {
        draw_panel(cell, panel, x_range.clone())?;
    }
    Ok(())
}

fn draw_compare(root: &Area<'_>, reports: &[Report]) -> DrawResult {
    let body = root.titled(&format!("comparison of {} runs", reports.len()), (FONT, 28).into_font())?;
    let (left, right) = body.split_horizontally(body.dim_in_pixel().0 / 2);
    let x_range = round_range(reports.iter().flat_map(|r| r.rounds.iter().map(|m| m.round)));
    let per_run = |value: fn(&RoundMetrics) -> f64| -> Vec<Series> {
        reports
            .iter()
            .enumerate()
            .map(|(i, r)| Series::new(&r.name, PALETTE[i % PALETTE.len()], &r.rounds, value))
            .collect()
    };
    draw_panel(
        &left,
        &Panel {
            caption: "held-out perplexity",
            y_desc: "perplexity",
            series: per_run(|r| r.test_perplexity),
            y_range: None,
            legend: Some(SeriesLabelPosition::UpperRight),
        },
        x_range.clone(),
    )?;
    draw_panel(
        &right,
        &Panel {
            caption: "top-1 accuracy",
            y_desc: "top-1 accuracy (%)",
            series: per_run(|r| r.top1 * 100.0),
            y_range: None,
            legend: Some(SeriesLabelPosition::LowerRight),
        },
        x_range,
    )
}

/// Draws one panel over `x_range`: axes, lines (with a marker at each point when there
/// are few enough to tell apart, so a one-point series shows) and the legend.
fn draw_panel(area: &Area<'_>, panel: &Panel<'_>, x_range: Range<u64>) -> DrawResult {
    draw_panel_along(area, panel, x_range, "round")
}

/// [`draw_panel`] with `x_desc` under the x axis.
fn draw_panel_along(area: &Area<'_>, panel: &Panel<'_>, x_range: Range<u64>, x_desc: &str) -> DrawResult {
    let y_range = panel
        .y_range
        .clone()
        .unwrap_or_else(|| padded_range(panel.series.iter().flat_map(|s| s.points.iter().map(|&(_, y)| y))));

    let mut chart = ChartBuilder::on(area)
        .caption(panel.caption, (FONT, 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x_range, y_range)?;
    chart.configure_mesh().x_desc(x_desc).y_desc(panel.y_desc).draw()?;

    for series in &panel.series {
        let color = series.color;
        let line = chart.draw_series(LineSeries::new(series.points.iter().copied(), color.stroke_width(2)))?;
        if panel.legend.is_some() {
            line.label(series.label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
        if series.points.len() <= MAX_MARKERS {
            chart.draw_series(series.points.iter().map(|&point| Circle::new(point, 3, color.filled())))?;
        }
    }
    if let Some(position) = &panel.legend {
        chart
            .configure_series_labels()
            .position(position.clone())
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    Ok(())
}

/// The x range covering `rounds`, at least one round wide.
fn round_range(rounds: impl Iterator<Item = u64>) -> Range<u64> {
    let (lo, hi) = rounds.fold((u64::MAX, 0), |(lo, hi), x| (lo.min(x), hi.max(x)));
    if lo > hi { 0..1 } else { lo..hi.max(lo + 1) }
}

/// A y range covering `values` with 5% padding; a flat or single value gets a band around
/// it, and no values give `0..1`.
fn padded_range(values: impl Iterator<Item = f64>) -> Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return 0.0..1.0;
    }
    let span = hi - lo;
    let scale = lo.abs().max(hi.abs());
    let pad = if span > scale * 1e-9 { span * 0.05 } else { (scale * 0.05).max(0.5) };
    lo - pad..hi + pad
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::Path;

    use super::*;
    use crate::report::tests::{report, round, three_rounds};

    /// Draw a run's curves into `path`.
    fn plot_run(path: &Path, r: &Report) -> std::result::Result<(), String> {
        fs::write(path, super::plot_run(r)?).map_err(|e| e.to_string())
    }

    /// Draw a comparison into `path`.
    fn plot_compare(path: &Path, reports: &[Report]) -> std::result::Result<(), String> {
        fs::write(path, super::plot_compare(reports)?).map_err(|e| e.to_string())
    }

    fn svg_of(path: &Path) -> String {
        let svg = fs::read_to_string(path).expect("read svg");
        assert!(svg.starts_with("<svg"), "not an SVG: {}", &svg[..svg.len().min(80)]);
        assert!(svg.trim_end().ends_with("</svg>"));
        svg
    }

    #[test]
    fn run_plot_has_title_panels_and_legend() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("curves.svg");
        plot_run(&path, &report("shakespeare-fedavg", three_rounds())).expect("plot");
        let svg = svg_of(&path);
        for text in [
            "shakespeare-fedavg",
            "held-out perplexity",
            "next-token accuracy",
            "train loss",
            "cumulative ε",
            "top-1",
            "top-3",
            "round",
            "accuracy (%)",
        ] {
            assert!(svg.contains(text), "{text} missing");
        }
        assert!(!svg.contains("no differential privacy"));
        assert!(!dir.path().join("curves.svg.tmp").exists());
    }

    #[test]
    fn run_plot_without_privacy_says_so() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("curves.svg");
        let rounds = three_rounds().into_iter().map(|r| RoundMetrics { epsilon: 0.0, ..r }).collect();
        plot_run(&path, &report("no-dp", rounds)).expect("plot");
        assert!(svg_of(&path).contains("no differential privacy"));
    }

    #[test]
    fn one_point_constant_and_empty_series_plot() {
        let dir = tempfile::tempdir().expect("temp dir");
        // Only the baseline: one point per series and a train loss that is all NaN.
        let path = dir.path().join("one.svg");
        plot_run(&path, &report("baseline-only", vec![round(0, 20.0, 0.3, 0.5, 0.0, 0, 0.1)])).expect("one point");
        assert!(svg_of(&path).contains("baseline-only"));
        // Constant series, including a constant zero.
        let flat = (0..4).map(|n| round(n, 7.0, 0.0, 0.0, 1.0, 10, 0.1)).collect();
        let path = dir.path().join("flat.svg");
        plot_run(&path, &report("flat", flat)).expect("constant");
        svg_of(&path);
        // No rounds at all.
        let path = dir.path().join("empty.svg");
        plot_run(&path, &report("empty", Vec::new())).expect("empty");
        svg_of(&path);
    }

    #[test]
    fn compare_plot_names_every_run() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("compare.svg");
        let short = vec![round(0, 25.0, 0.2, 0.4, 0.0, 0, 0.1), round(1, 22.0, 0.25, 0.45, 0.0, 5, 0.1)];
        let reports = [report("fedavg-iid", three_rounds()), report("fedprox-dirichlet", short)];
        plot_compare(&path, &reports).expect("plot");
        let svg = svg_of(&path);
        for text in ["fedavg-iid", "fedprox-dirichlet", "held-out perplexity", "top-1 accuracy", "comparison of 2 runs"]
        {
            assert!(svg.contains(text), "{text} missing");
        }
        // Each run has its own colour.
        assert!(svg.contains("#1F77B4"), "first palette colour missing");
        assert!(svg.contains("#FF7F0E"), "second palette colour missing");
        plot_compare(&dir.path().join("none.svg"), &[]).expect("no runs");
    }

    #[test]
    fn ranges_are_never_empty() {
        assert_eq!(round_range([3].into_iter()), 3..4);
        assert_eq!(round_range(std::iter::empty()), 0..1);
        assert_eq!(round_range([0, 5, 2].into_iter()), 0..5);
        assert_eq!(padded_range(std::iter::empty()), 0.0..1.0);
        assert_eq!(padded_range([0.0].into_iter()), -0.5..0.5);
        let r = padded_range([100.0, 100.0].into_iter());
        assert_eq!(r, 95.0..105.0);
        let r = padded_range([10.0, 20.0].into_iter());
        assert_eq!(r, 9.5..20.5);
    }
}
