//! The `covey-privacy` command line: JSON output and clear errors.

use std::process::Command;

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_covey-privacy")).args(args).output().expect("run covey-privacy");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn last_json(stdout: &str) -> serde_json::Value {
    let line = stdout.lines().last().expect("a line");
    serde_json::from_str(line).expect("the last line is JSON")
}

#[test]
fn epsilon_json_reports_epsilon_delta_accountant_and_order() {
    let (ok, out, err) = run(&[
        "epsilon",
        "--sampling-rate",
        "0.01",
        "--noise-multiplier",
        "1.1",
        "--steps",
        "1000",
        "--delta",
        "1e-5",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v = last_json(&out);
    let (eps, _) = covey_privacy::rdp::epsilon(0.01, 1.1, 1000, 1e-5).expect("eps");
    let printed = v["epsilon"].as_f64().expect("epsilon");
    assert!((printed - eps).abs() <= 1e-12 * eps, "{printed} vs {eps}");
    assert_eq!(v["delta"].as_f64(), Some(1e-5));
    assert_eq!(v["accountant"], "rdp");
    assert!(v["order"].as_f64().is_some_and(|o| o > 1.0));
}

#[test]
fn calibrate_json_round_trips_through_epsilon() {
    let (ok, out, err) = run(&[
        "calibrate",
        "--target-epsilon",
        "8",
        "--delta",
        "1e-5",
        "--sampling-rate",
        "0.1",
        "--steps",
        "100",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v = last_json(&out);
    let z = v["noise_multiplier"].as_f64().expect("z");
    let (eps, _) = covey_privacy::rdp::epsilon(0.1, z, 100, 1e-5).expect("eps");
    let printed = v["epsilon"].as_f64().expect("epsilon");
    assert!(eps <= 8.0 && (printed - eps).abs() <= 1e-12 * eps, "{printed} vs {eps}");
}

#[test]
fn bad_arguments_get_clear_errors() {
    let (ok, _, err) =
        run(&["epsilon", "--sampling-rate", "2", "--noise-multiplier", "1", "--steps", "1", "--delta", "1e-5"]);
    assert!(!ok && err.contains("sampling_rate"), "{err}");
    let (ok, _, err) = run(&[
        "epsilon",
        "--sampling-rate",
        "0.1",
        "--noise-multiplier",
        "1",
        "--steps",
        "1",
        "--delta",
        "1e-5",
        "--accountant",
        "moments",
    ]);
    assert!(!ok && err.contains("unknown accountant `moments`") && err.contains("pld"), "{err}");
    let (ok, _, err) = run(&[
        "epsilon",
        "--sampling-rate",
        "0.1",
        "--noise-multiplier",
        "NaN",
        "--steps",
        "1",
        "--delta",
        "1e-5",
        "--accountant",
        "pld",
    ]);
    assert!(!ok && err.contains("noise_multiplier"), "{err}");
    let (ok, _, err) =
        run(&["calibrate", "--target-epsilon=-1", "--delta", "1e-5", "--sampling-rate", "0.1", "--steps", "10"]);
    assert!(!ok && err.contains("target_epsilon"), "{err}");
}

#[test]
fn the_pld_accountant_answers_below_rdp_and_calibrates_with_less_noise() {
    let args = ["--sampling-rate", "0.01", "--noise-multiplier", "1.1", "--steps", "1000", "--delta", "1e-5", "--json"];
    let (ok, out, err) = run(&[&["epsilon", "--accountant", "pld"], &args[..]].concat());
    assert!(ok, "{err}");
    let v = last_json(&out);
    assert_eq!(v["accountant"], "pld");
    assert!(v.get("order").is_none());
    let pld = v["epsilon"].as_f64().expect("epsilon");
    assert_eq!(pld, covey_privacy::pld::epsilon(0.01, 1.1, 1000, 1e-5).expect("pld"));
    let (rdp, _) = covey_privacy::rdp::epsilon(0.01, 1.1, 1000, 1e-5).expect("rdp");
    assert!(pld < rdp, "{pld} vs {rdp}");

    let cal = ["calibrate", "--target-epsilon", "8", "--delta", "1e-5", "--sampling-rate", "0.1", "--steps", "100"];
    let (ok, out, err) = run(&[&cal[..], &["--accountant", "pld", "--json"]].concat());
    assert!(ok, "{err}");
    let z_pld = last_json(&out)["noise_multiplier"].as_f64().expect("z");
    let (ok, out, _) = run(&[&cal[..], &["--json"]].concat());
    assert!(ok);
    let z_rdp = last_json(&out)["noise_multiplier"].as_f64().expect("z");
    assert!(z_pld < z_rdp, "{z_pld} vs {z_rdp}");
    let eps = covey_privacy::pld::epsilon(0.1, z_pld, 100, 1e-5).expect("pld");
    assert!(eps <= 8.0, "{eps}");
}
