//! Byzantine clients in simulation on the tiny model: the intake refuses what the
//! coordinator would, hostile updates within the bound reach the strategy, and
//! configurations that cannot run are refused.

use std::path::PathBuf;

use covey_sim::attack::AttackKind;
use covey_sim::config::Experiment;
use covey_sim::progress::Silent;
use covey_sim::{prepare, runner};

fn shakespeare() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../data/shakespeare"))
}

fn experiment(strategy: &str, attack: &str) -> String {
    format!(
        r#"
name = "attack"
seed = 5
[data]
path = "{data}"
eval-bytes = 2000
[data.leaf]
plays = ["macbeth"]
[data.partitioner]
kind = "iid"
clients = 10
[training]
steps = 2
batch-size = 4
seq-len = 32
[rounds]
rounds = 3
clients-per-round = 10
parallel = 2
[privacy]
clip-norm = 0.5
[strategy]
{strategy}
[attack]
{attack}
"#,
        data = shakespeare().display()
    )
}

fn run(text: &str) -> covey_sim::report::Report {
    let exp = Experiment::from_toml(text, std::path::Path::new("attack.toml")).expect("experiment");
    let prepared = prepare::prepare(&exp).expect("prepare");
    assert_eq!(prepared.attackers.len(), 3);
    runner::run(&prepared, &Silent).expect("run")
}

#[test]
fn nan_and_oversized_updates_are_refused_and_the_rest_is_aggregated() {
    for kind in ["nan", "scaled"] {
        let r = run(&experiment("kind = \"fed-avg\"", &format!("fraction = 0.3\nkind = \"{kind}\"")));
        let a = r.attack.expect("attack summary");
        assert!(a.refused > 0 && a.delivered == 0, "{kind}: {a:?}");
        assert!(r.rounds.iter().all(|m| m.test_perplexity.is_finite()), "{kind}: the model stayed finite");
    }
}

#[test]
fn updates_within_the_bound_reach_the_strategy() {
    for strategy in ["kind = \"fed-avg\"", "kind = \"multi-krum\"\nbyzantine_fraction = 0.3"] {
        let r = run(&experiment(strategy, "fraction = 0.3\nkind = \"sign-flip\""));
        let a = r.attack.expect("attack summary");
        assert_eq!(a.kind, AttackKind::SignFlip);
        assert!(a.delivered > 0 && a.refused == 0, "{strategy}: {a:?}");
    }
    let r = run(&experiment("kind = \"fed-avg\"", "fraction = 0.3\nkind = \"backdoor\""));
    let success = r.attack.expect("attack summary").backdoor_success.expect("measured");
    assert!((0.0..=1.0).contains(&success));
}

#[test]
fn attacks_outside_the_in_process_mode_or_out_of_range_are_refused() {
    let text = experiment("kind = \"fed-avg\"", "fraction = 0.3\nkind = \"random\"");
    let loopback = format!("mode = \"loopback-grpc\"\n{text}");
    let err = Experiment::from_toml(&loopback, std::path::Path::new("a.toml")).expect_err("loopback").to_string();
    assert!(err.contains("attack"), "{err}");
    let bad = experiment("kind = \"fed-avg\"", "fraction = 1.5\nkind = \"random\"");
    let err = Experiment::from_toml(&bad, std::path::Path::new("a.toml")).expect_err("fraction").to_string();
    assert!(err.contains("attack.fraction"), "{err}");
    let unknown = experiment("kind = \"fed-avg\"", "fraction = 0.1\nkind = \"gaslight\"");
    let err = Experiment::from_toml(&unknown, std::path::Path::new("a.toml")).expect_err("kind").to_string();
    assert!(err.contains("gaslight"), "{err}");
}
