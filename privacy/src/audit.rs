//! Empirical privacy auditing with one training run (Steinke, Nasr and Jagielski,
//! NeurIPS 2023): `m` canaries, each included independently with probability ½; after
//! training, an auditor guesses "in" or "out" for `r` of them and gets `v` right. If the
//! mechanism is (ε, δ)-DP, `v` is stochastically dominated by `Binomial(r, e^ε/(1+e^ε))`
//! up to a δ term (their Theorem 3.3), so a large `v` rules out small ε: the largest ε
//! whose p-value is below `1 − confidence` is a lower bound on the true ε, at that
//! confidence. A correct implementation never has an audited lower bound above its
//! claimed ε (beyond the chance the confidence allows); with the noise off the bound
//! shows how much the canaries leak.

use crate::error::{PrivacyError, Result};

fn log_binom_pmf(k: u64, n: u64, q: f64) -> f64 {
    let lg = |x: f64| libm::lgamma_r(x).0;
    let (k, n) = (k as f64, n as f64);
    let log_choose = lg(n + 1.0) - lg(k + 1.0) - lg(n - k + 1.0);
    let term = |count: f64, p: f64| if count == 0.0 { 0.0 } else { count * p.ln() };
    log_choose + term(k, q) + term(n - k, 1.0 - q)
}

fn binom_pmf(k: u64, n: u64, q: f64) -> f64 {
    log_binom_pmf(k, n, q).exp()
}

/// `P[Binomial(n, q) ≥ v]`.
fn binom_sf(v: u64, n: u64, q: f64) -> f64 {
    (v..=n).map(|k| binom_pmf(k, n, q)).sum::<f64>().min(1.0)
}

fn check(m: u64, r: u64, v: u64, delta: f64) -> Result<()> {
    if !(v <= r && r <= m) {
        return Err(PrivacyError::param("guesses", r as f64, "need correct ≤ guesses ≤ canaries"));
    }
    if !(0.0..=1.0).contains(&delta) {
        return Err(PrivacyError::param("delta", delta, "must be in [0, 1]"));
    }
    Ok(())
}

/// The p-value of `v` or more correct guesses out of `r` (with `m` canaries) under the
/// hypothesis that the mechanism is (ε, δ)-DP: `P[Binomial(r, q_ε) ≥ v] + 2mδ·α`, with
/// `q_ε = e^ε/(1+e^ε)` and `α = max_i P[v − i ≤ Binomial(r, q_ε) < v] / i`.
pub fn p_value(m: u64, r: u64, v: u64, epsilon: f64, delta: f64) -> Result<f64> {
    check(m, r, v, delta)?;
    if epsilon.is_nan() || epsilon < 0.0 {
        return Err(PrivacyError::param("epsilon", epsilon, "must be >= 0"));
    }
    let q = 1.0 / (1.0 + (-epsilon).exp());
    let beta = binom_sf(v, r, q);
    let (mut alpha, mut sum) = (0.0f64, 0.0f64);
    for i in 1..=v {
        sum += binom_pmf(v - i, r, q);
        alpha = alpha.max(sum / i as f64);
    }
    Ok((beta + alpha * delta * 2.0 * m as f64).min(1.0))
}

/// The largest ε (to 1e-6) such that `v` correct guesses out of `r` would have a
/// p-value below `1 − confidence` if the mechanism were (ε, δ)-DP: an empirical lower
/// bound on ε at that confidence (0 when nothing is ruled out).
pub fn lower_bound(m: u64, r: u64, v: u64, delta: f64, confidence: f64) -> Result<f64> {
    check(m, r, v, delta)?;
    if !(confidence > 0.0 && confidence < 1.0) {
        return Err(PrivacyError::param("confidence", confidence, "must be in (0, 1)"));
    }
    let p = 1.0 - confidence;
    if p_value(m, r, v, 0.0, delta)? >= p {
        return Ok(0.0);
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    while p_value(m, r, v, hi, delta)? < p {
        hi *= 2.0;
        if hi > 1e3 {
            return Ok(f64::INFINITY);
        }
    }
    while hi - lo > 1e-6 {
        let mid = 0.5 * (lo + hi);
        if p_value(m, r, v, mid, delta)? < p { lo = mid } else { hi = mid }
    }
    Ok(lo)
}

/// The audit of one run: canaries' scores (higher: more likely trained on) and whether
/// each was included. The auditor guesses "in" for the `k` highest scores, for each `k`
/// of `guess_counts` chosen before looking at the scores, and keeps the best bound, with
/// the confidence split over the choices (Bonferroni).
#[derive(Debug, Clone, PartialEq)]
pub struct Audit {
    /// Canaries planted.
    pub canaries: u64,
    /// Guesses of the best choice.
    pub guesses: u64,
    /// Correct guesses of the best choice.
    pub correct: u64,
    /// The empirical lower bound on ε at `confidence`.
    pub lower_bound: f64,
}

/// Audit `scores` (one per canary, paired with whether it was included) at `delta` and
/// `confidence`, guessing "in" for the top `k` of each `guess_counts`.
pub fn audit(scores: &[(f64, bool)], guess_counts: &[usize], delta: f64, confidence: f64) -> Result<Audit> {
    if scores.iter().any(|(s, _)| !s.is_finite()) {
        return Err(PrivacyError::param("score", f64::NAN, "canary scores must be finite"));
    }
    let mut sorted: Vec<(f64, bool)> = scores.to_vec();
    sorted.sort_by(|a, b| b.0.total_cmp(&a.0));
    let m = sorted.len() as u64;
    let choices: Vec<usize> = guess_counts.iter().copied().filter(|&k| k > 0 && k <= sorted.len()).collect();
    let per_choice = 1.0 - (1.0 - confidence) / choices.len().max(1) as f64;
    let mut best = Audit { canaries: m, guesses: 0, correct: 0, lower_bound: 0.0 };
    for k in choices {
        let v = sorted[..k].iter().filter(|(_, included)| *included).count() as u64;
        let bound = lower_bound(m, k as u64, v, delta, per_choice)?;
        if bound > best.lower_bound || best.guesses == 0 {
            best = Audit { canaries: m, guesses: k as u64, correct: v, lower_bound: bound };
        }
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[test]
    fn p_values_and_bounds_match_the_papers_formula() {
        #[derive(Deserialize)]
        struct Vector {
            m: u64,
            r: u64,
            v: u64,
            epsilon: f64,
            delta: f64,
            p_value: f64,
        }
        #[derive(Deserialize)]
        struct Bound {
            m: u64,
            r: u64,
            v: u64,
            delta: f64,
            confidence: f64,
            lower_bound: f64,
        }
        #[derive(Deserialize)]
        struct File {
            p_values: Vec<Vector>,
            bounds: Vec<Bound>,
        }
        let file: File = serde_json::from_str(include_str!("../tests/vectors/audit_vectors.json")).expect("vectors");
        assert!(file.p_values.len() >= 20 && file.bounds.len() >= 10);
        for x in &file.p_values {
            let p = p_value(x.m, x.r, x.v, x.epsilon, x.delta).expect("p");
            assert!(
                (p - x.p_value).abs() <= 1e-9 + 1e-7 * x.p_value,
                "{} {} {} ε={}: {p} vs {}",
                x.m,
                x.r,
                x.v,
                x.epsilon,
                x.p_value
            );
        }
        for b in &file.bounds {
            let e = lower_bound(b.m, b.r, b.v, b.delta, b.confidence).expect("bound");
            assert!((e - b.lower_bound).abs() < 1e-4, "{} {} {}: {e} vs {}", b.m, b.r, b.v, b.lower_bound);
        }
    }

    #[test]
    fn perfect_guesses_give_a_bound_that_grows_with_their_number_and_chance_gives_none() {
        let e20 = lower_bound(200, 20, 20, 0.0, 0.95).expect("20");
        let e50 = lower_bound(200, 50, 50, 0.0, 0.95).expect("50");
        // q^r = 0.05: ε = ln(q / (1 − q)).
        let q = 0.05f64.powf(1.0 / 20.0);
        assert!((e20 - (q / (1.0 - q)).ln()).abs() < 1e-5, "{e20}");
        assert!(e50 > e20 && e50 > 2.0, "{e50}");
        assert_eq!(lower_bound(200, 50, 25, 1e-5, 0.95).expect("chance"), 0.0);
        assert!(lower_bound(10, 20, 5, 0.0, 0.95).is_err());
        assert!(lower_bound(100, 20, 5, 0.0, 1.0).is_err());
    }

    #[test]
    fn the_audit_guesses_the_top_scores_and_splits_its_confidence() {
        // 100 canaries: the 40 highest scores were all included, the rest at random.
        let scores: Vec<(f64, bool)> = (0..100).map(|i| (100.0 - i as f64, i < 40 || i % 2 == 0)).collect();
        let a = audit(&scores, &[10, 40, 80], 1e-5, 0.95).expect("audit");
        assert_eq!((a.guesses, a.correct), (40, 40));
        let alone = lower_bound(100, 40, 40, 1e-5, 1.0 - 0.05 / 3.0).expect("bound");
        assert_eq!(a.lower_bound, alone);
        assert!(audit(&[(f64::NAN, true)], &[1], 1e-5, 0.95).is_err());
    }
}
