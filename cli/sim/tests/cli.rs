//! The `covey-sim` binary: run, compare, data, and clear errors for bad input.

use std::path::Path;
use std::process::{Command, Output};

fn covey_sim(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_covey-sim")).args(args).current_dir(dir).output().expect("run covey-sim")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn write_experiment(dir: &Path, name: &str, strategy: &str) -> std::path::PathBuf {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/shakespeare");
    let path = dir.join(format!("{name}.toml"));
    let body = format!(
        "name = \"{name}\"\n[data]\npath = \"{}\"\neval-bytes = 2000\n[data.leaf]\nplays = [\"tempest\"]\n\
         [training]\nsteps = 2\nbatch-size = 2\nseq-len = 32\n[rounds]\nrounds = 2\nclients-per-round = 3\n\
         [strategy]\n{strategy}\n",
        data.display()
    );
    std::fs::write(&path, body).expect("write experiment");
    path
}

#[test]
fn run_then_compare_report_folders() {
    let dir = tempfile::tempdir().expect("tmp");
    let a = write_experiment(dir.path(), "avg", "kind = \"fed-avg\"");
    let b = write_experiment(dir.path(), "adam", "kind = \"fed-adam\"");
    for (exp, out) in [(&a, "runs/avg"), (&b, "runs/adam")] {
        let o = covey_sim(&["--quiet", "run", exp.to_str().expect("utf-8"), "--out", out], dir.path());
        assert!(o.status.success(), "{}", text(&o));
        assert!(text(&o).contains("perplexity"), "{}", text(&o));
        for file in ["report.json", "metrics.csv", "timing.csv", "curves.svg"] {
            assert!(dir.path().join(out).join(file).is_file(), "{out}/{file} missing");
        }
    }
    let o = covey_sim(&["compare", "runs/avg", "runs/adam", "--out", "cmp"], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    let table = std::fs::read_to_string(dir.path().join("cmp/comparison.txt")).expect("comparison.txt");
    assert!(table.contains("avg") && table.contains("adam"), "{table}");
    assert!(dir.path().join("cmp/compare.svg").is_file());

    let o = covey_sim(&["data", a.to_str().expect("utf-8")], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON summary");
    assert!(summary["clients"].as_u64().expect("clients") >= 3);
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("bad.toml"), "[rounds]\nrounds = \"many\"\n").expect("write");
    let o = covey_sim(&["run", "bad.toml"], dir.path());
    assert!(!o.status.success());
    assert!(text(&o).contains("bad.toml") && text(&o).contains("rounds"), "{}", text(&o));

    let o = covey_sim(&["run", "missing.toml"], dir.path());
    assert!(!o.status.success());
    assert!(text(&o).contains("missing.toml"), "{}", text(&o));

    let o = covey_sim(&["compare", "only-one.toml"], dir.path());
    assert!(!o.status.success(), "compare needs two inputs");

    let o = covey_sim(&["quickstart"], dir.path());
    assert!(!o.status.success());
    assert!(text(&o).contains("repository root"), "{}", text(&o));
}

#[test]
fn section_overrides_are_parsed_and_bad_ones_named() {
    let dir = tempfile::tempdir().expect("tmp");
    let exp = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../simulations/experiments/byzantine.toml");
    let exp = exp.to_str().expect("utf-8");
    let o = covey_sim(&["run", exp, "--strategy", "kind = \"nope\""], dir.path());
    assert!(!o.status.success());
    assert!(text(&o).contains("--strategy") && text(&o).contains("nope"), "{}", text(&o));
    let o = covey_sim(&["run", exp, "--attack", "fraction = 0.1\nkind = \"gaslight\""], dir.path());
    assert!(!o.status.success());
    assert!(text(&o).contains("--attack") && text(&o).contains("gaslight"), "{}", text(&o));
    let o = covey_sim(&["run", exp, "--attack", "fraction = 1.5\nkind = \"random\""], dir.path());
    assert!(!o.status.success());
    assert!(text(&o).contains("attack.fraction"), "{}", text(&o));
}

#[test]
fn a_sweep_writes_its_matrix_resumes_and_names_bad_arguments() {
    let dir = tempfile::tempdir().expect("tmp");
    let exp = write_experiment(dir.path(), "tiny", "kind = \"fed-avg\"");
    let exp = exp.to_str().expect("utf-8");
    let args =
        ["--quiet", "sweep", exp, "--strategies", "fed-avg,median", "--attacks", "sign-flip", "--fractions", "0.2"];
    let args_out: Vec<&str> = args.iter().copied().chain(["--out", "sweep"]).collect();
    let o = covey_sim(&args_out, dir.path());
    assert!(o.status.success(), "{}", text(&o));
    let csv = std::fs::read_to_string(dir.path().join("sweep/sweep.csv")).expect("sweep.csv");
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), 4, "two strategies, attack-free and under one attack: {csv}");
    assert!(rows.iter().any(|r| r.starts_with("median,sign-flip,0.2,f32,")), "{csv}");
    let table = std::fs::read_to_string(dir.path().join("sweep/sweep.md")).expect("sweep.md");
    assert!(table.contains("| strategy | attack-free | sign-flip 20 % |"), "{table}");
    // Run again: every cell is read back, none trained again, the same matrix.
    let o = covey_sim(&args_out, dir.path());
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(text(&o).matches("finished earlier").count(), 4, "{}", text(&o));
    assert_eq!(std::fs::read_to_string(dir.path().join("sweep/sweep.csv")).expect("sweep.csv"), csv);

    for (flag, value, named) in [
        ("--strategies", "fed-avg,nope", "nope"),
        ("--attacks", "gaslight", "gaslight"),
        ("--fractions", "0.7", "0.7"),
        ("--encoding", "int3", "int3"),
    ] {
        let o = covey_sim(&["sweep", exp, flag, value, "--out", "bad"], dir.path());
        assert!(!o.status.success(), "{flag} {value}");
        assert!(text(&o).contains(flag) && text(&o).contains(named), "{}", text(&o));
        assert!(!dir.path().join("bad/sweep.csv").exists(), "nothing run for bad arguments");
    }
}
