//! Report folders on disk: a run's `report.json`, `metrics.csv`, `timing.csv` and
//! `curves.svg`; a comparison's `comparison.csv`, `comparison.txt` and `compare.svg`.
//! Every file is written atomically ([`covey_fs::write_atomic`]).

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Result, SimError};
use crate::plot;
use crate::report::{Report, comparison_csv, comparison_table, metrics_csv, timing_csv};

/// The files a report or a comparison wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportFiles {
    /// The folder written into.
    pub dir: PathBuf,
    /// Every file written, in the order written.
    pub paths: Vec<PathBuf>,
}

/// Writes a run's report folder: `report.json`, `metrics.csv`, `timing.csv` and
/// `curves.svg` (and `personal.csv`, `personal.svg` for a personalised run), creating
/// `dir` if needed. Each file is written atomically.
pub fn write_report(dir: &Path, report: &Report) -> Result<ReportFiles> {
    fs::create_dir_all(dir).map_err(|e| SimError::io(dir, e))?;
    let json_path = dir.join("report.json");
    let mut json =
        serde_json::to_string_pretty(report).map_err(|source| SimError::Json { path: json_path.clone(), source })?;
    json.push('\n');
    write_atomic(&json_path, json.as_bytes())?;

    let metrics_path = dir.join("metrics.csv");
    write_atomic(&metrics_path, metrics_csv(&report.rounds).as_bytes())?;
    let timing_path = dir.join("timing.csv");
    write_atomic(&timing_path, timing_csv(&report.rounds).as_bytes())?;
    let curves_path = dir.join("curves.svg");
    let svg = plot::plot_run(report).map_err(|reason| SimError::Plot { path: curves_path.clone(), reason })?;
    write_atomic(&curves_path, svg.as_bytes())?;

    let mut paths = vec![json_path, metrics_path, timing_path, curves_path];
    if let Some(personal) = &report.personalisation {
        let csv_path = dir.join("personal.csv");
        write_atomic(&csv_path, crate::personal::devices_csv(personal).as_bytes())?;
        let svg_path = dir.join("personal.svg");
        let svg = plot::plot_personal(&report.name, personal)
            .map_err(|reason| SimError::Plot { path: svg_path.clone(), reason })?;
        write_atomic(&svg_path, svg.as_bytes())?;
        paths.extend([csv_path, svg_path]);
    }
    tracing::debug!(dir = %dir.display(), run = %report.name, "wrote report");
    Ok(ReportFiles { dir: dir.to_owned(), paths })
}

/// Reads a report from a `report.json` file, or from a directory that holds one.
pub fn read_report(path: &Path) -> Result<Report> {
    let file = if path.is_dir() { path.join("report.json") } else { path.to_owned() };
    let text = fs::read_to_string(&file).map_err(|e| SimError::io(&file, e))?;
    serde_json::from_str(&text).map_err(|source| SimError::Json { path: file, source })
}

/// Writes `comparison.csv`, `comparison.txt` and `compare.svg` for `reports` into `dir`,
/// creating it if needed. Each file is written atomically.
pub fn write_comparison(dir: &Path, reports: &[Report]) -> Result<ReportFiles> {
    fs::create_dir_all(dir).map_err(|e| SimError::io(dir, e))?;
    let csv_path = dir.join("comparison.csv");
    write_atomic(&csv_path, comparison_csv(reports).as_bytes())?;
    let table_path = dir.join("comparison.txt");
    write_atomic(&table_path, comparison_table(reports).as_bytes())?;
    let svg_path = dir.join("compare.svg");
    let svg = plot::plot_compare(reports).map_err(|reason| SimError::Plot { path: svg_path.clone(), reason })?;
    write_atomic(&svg_path, svg.as_bytes())?;
    Ok(ReportFiles { dir: dir.to_owned(), paths: vec![csv_path, table_path, svg_path] })
}

/// Writes `bytes` to `path` atomically.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    covey_fs::write_atomic(path, bytes).map_err(|e| SimError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unwritable_path_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("missing-dir").join("curves.svg");
        let err = write_atomic(&path, b"<svg/>").expect_err("no such directory");
        assert!(err.to_string().contains("curves.svg"), "{err}");
    }
}
