//! Privacy in simulations on the tiny model: DP-FTRL with participation limits, and the
//! empirical audit (canaries found without noise, never above the claim with it).

use std::path::PathBuf;

use covey_privacy::Accountant;
use covey_sim::audit::{self, AuditConfig};
use covey_sim::config::Experiment;
use covey_sim::progress::Silent;
use covey_sim::{prepare, runner};

fn shakespeare() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../data/shakespeare"))
}

fn experiment(privacy: &str, rounds: u64, clients_per_round: usize) -> Experiment {
    let text = format!(
        r#"
name = "privacy"
seed = 3
[data]
path = "{data}"
eval-bytes = 2000
[data.leaf]
plays = ["macbeth"]
[data.partitioner]
kind = "iid"
clients = 8
[training]
steps = 2
batch-size = 4
seq-len = 32
[rounds]
rounds = {rounds}
clients-per-round = {clients_per_round}
parallel = 2
{privacy}
"#,
        data = shakespeare().display()
    );
    Experiment::from_toml(&text, std::path::Path::new("privacy.toml")).expect("experiment")
}

#[test]
fn a_dp_ftrl_run_keeps_to_its_limits_and_reports_the_bound() {
    let exp = experiment(
        r#"
[privacy]
clip-norm = 0.5
[privacy.participation]
min-separation = 2
max-participations = 1
[privacy.central]
mechanism = "dp-ftrl"
noise_multiplier = 2.0
clip = { kind = "fixed", norm = 0.5 }
"#,
        4,
        4,
    );
    let prepared = prepare::prepare(&exp).expect("prepare");
    let report = runner::run(&prepared, &Silent).expect("run");
    let depth = f64::from(covey_privacy::tree::depth(2));
    let one = Accountant::Rdp.epsilon_without_sampling(2.0, depth, 1e-5).expect("eps");
    // One contribution per client at most: ε is that of one tree leaf per client, and it
    // does not grow with the rounds.
    let eps: Vec<f64> = report.rounds.iter().skip(1).map(|r| r.epsilon).collect();
    assert!(eps.iter().all(|&e| e == one), "ε by round {eps:?}, expected {one}");
    // 8 clients, one contribution each: at most 8 updates over the run.
    let clients: usize = report.rounds.iter().map(|r| r.clients).sum();
    assert!(clients <= 8 && clients > 0, "{clients} contributions");
}

#[test]
fn the_audit_finds_the_leak_without_noise_and_stays_below_the_claim_with_it() {
    let dp = r#"
[privacy]
clip-norm = 0.5
[privacy.central]
noise_multiplier = 3.0
clip = { kind = "fixed", norm = 0.5 }
"#;
    let cfg = AuditConfig { canaries: 64, ..AuditConfig::default() };
    let mut open = experiment(dp, 4, 40);
    audit::without_noise(&mut open);
    let mut prepared = prepare::prepare(&open).expect("prepare");
    let leak = audit::run(&mut prepared, &cfg, &Silent).expect("audit");
    assert_eq!(leak.mechanism, "none");
    assert!(leak.claimed_epsilon.is_infinite());
    assert!(leak.audited_lower_bound > 1.0, "no noise, yet {leak:?}");
    assert!(leak.mean_score_included > leak.mean_score_excluded);

    let mut prepared = prepare::prepare(&experiment(dp, 4, 40)).expect("prepare");
    let private = audit::run(&mut prepared, &cfg, &Silent).expect("audit");
    assert_eq!(private.mechanism, "dp-fedavg");
    assert!(private.claimed_epsilon.is_finite());
    assert!(
        private.audited_lower_bound <= private.claimed_epsilon,
        "the audit found more than the accountant claims: {private:?}"
    );
    assert!(private.audited_lower_bound < leak.audited_lower_bound, "noise must hide the canaries: {private:?}");
    // The canaries are the experiment's seed's: the same audit twice is the same audit.
    let mut again = prepare::prepare(&experiment(dp, 4, 40)).expect("prepare");
    assert_eq!(audit::run(&mut again, &cfg, &Silent).expect("audit"), private);
}

#[test]
fn a_delta_not_below_one_over_the_population_is_refused() {
    let mut exp = experiment(
        r#"
[privacy]
clip-norm = 0.5
delta = 0.2
local-noise-multiplier = 1.0
"#,
        2,
        4,
    );
    let Err(err) = prepare::prepare(&exp) else { panic!("δ = 0.2 with 8 clients was accepted") };
    let err = err.to_string();
    assert!(err.contains("privacy.delta") && err.contains("1 / 8"), "{err}");
    exp.privacy.delta = 1e-3;
    prepare::prepare(&exp).expect("δ below 1/8");
}
