//! Rényi-DP accounting of the Poisson-subsampled Gaussian mechanism (Mironov, Talwar
//! and Zhang 2019), converted to (ε, δ) with the bound of Balle et al. 2020
//! (Proposition 12 of Canonne, Kamath and Steinke 2020) — the computation of
//! Google's `dp_accounting` (`rdp_privacy_accountant.py`) and Opacus, ported term by
//! term and checked against it (tests/vectors).

use serde::{Deserialize, Serialize};

use crate::error::{PrivacyError, Result};

/// dp_accounting's default order grid: 1.1, 1.2, …, 10.9, then 11..=63, 128, 256, 512, 1024.
pub fn default_orders() -> Vec<f64> {
    let mut orders: Vec<f64> = (1..100).map(|x| 1.0 + x as f64 / 10.0).collect();
    orders.extend((11..64).map(f64::from));
    orders.extend([128.0, 256.0, 512.0, 1024.0]);
    orders
}

fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = if x < y { (x, y) } else { (y, x) };
    if a == f64::NEG_INFINITY {
        return b;
    }
    (a - b).exp().ln_1p() + b
}

fn lgamma(x: f64) -> f64 {
    libm::lgamma_r(x).0
}

fn log_comb(n: f64, k: f64) -> f64 {
    lgamma(n + 1.0) - lgamma(k + 1.0) - lgamma(n - k + 1.0)
}

/// `ln(erfc(x))`, accurate where `erfc` underflows.
pub fn log_erfc(x: f64) -> f64 {
    let r = libm::erfc(x);
    if r > 1e-300 {
        r.ln()
    } else {
        // Asymptotic expansion at +∞ (as dp_accounting's fallback).
        -std::f64::consts::PI.ln() / 2.0 - x.ln() - x * x - 0.5 * x.powi(-2) + 0.625 * x.powi(-4)
            - 37.0 / 24.0 * x.powi(-6)
            + 353.0 / 64.0 * x.powi(-8)
    }
}

fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let mut log_a = f64::NEG_INFINITY;
    let log1mq = (-q).ln_1p();
    let a = alpha as f64;
    for i in 0..=alpha {
        let i = i as f64;
        let coef = log_comb(a, i) + i * q.ln() + (a - i) * log1mq;
        log_a = log_add(log_a, coef + (i * i - i) / (2.0 * sigma * sigma));
    }
    log_a
}

const MAX_STEPS_LOG_A_FRAC: usize = 1000;

fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let log1mq = (-q).ln_1p();
    let (mut last_s0, mut last_s1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let s2 = std::f64::consts::SQRT_2 * sigma;
    for i in 0..MAX_STEPS_LOG_A_FRAC {
        let i = i as f64;
        let coef = log_comb(alpha, i);
        let j = alpha - i;
        let log_t0 = coef + i * q.ln() + j * log1mq;
        let log_t1 = coef + j * q.ln() + i * log1mq;
        let log_e0 = 0.5f64.ln() + log_erfc((i - z0) / s2);
        let log_e1 = 0.5f64.ln() + log_erfc((z0 - j) / s2);
        let log_s0 = log_t0 + (i * i - i) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        log_a0 = log_add(log_a0, log_s0);
        log_a1 = log_add(log_a1, log_s1);
        let total = log_add(log_a0, log_a1);
        if log_s0 < last_s0 && log_s1 < last_s1 && log_s0.max(log_s1) < total - 30.0 {
            return total;
        }
        last_s0 = log_s0;
        last_s1 = log_s1;
    }
    // Not converged: the order is excluded (ε(α) = ∞), which is sound.
    f64::INFINITY
}

fn check_q_sigma(q: f64, noise_multiplier: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&q) {
        return Err(PrivacyError::param("sampling_rate", q, "must be in [0, 1]"));
    }
    if noise_multiplier.is_nan() || noise_multiplier < 0.0 {
        return Err(PrivacyError::param("noise_multiplier", noise_multiplier, "must be >= 0"));
    }
    Ok(())
}

/// RDP ε(α) of one step of the Poisson-subsampled Gaussian mechanism with sampling
/// rate `q` and noise multiplier `z`, at each order (add/remove adjacency).
pub fn rdp_subsampled_gaussian(q: f64, noise_multiplier: f64, orders: &[f64]) -> Result<Vec<f64>> {
    check_q_sigma(q, noise_multiplier)?;
    Ok(orders
        .iter()
        .map(|&alpha| {
            if q == 0.0 {
                0.0
            } else if alpha.is_infinite() || noise_multiplier == 0.0 {
                f64::INFINITY
            } else if q == 1.0 {
                alpha / (2.0 * noise_multiplier * noise_multiplier)
            } else if alpha.fract() == 0.0 {
                log_a_int(q, noise_multiplier, alpha as u64) / (alpha - 1.0)
            } else {
                log_a_frac(q, noise_multiplier, alpha) / (alpha - 1.0)
            }
        })
        .collect())
}

/// The smallest ε over the orders for a given δ, and the order that attains it.
pub fn epsilon_from_rdp(orders: &[f64], rdp: &[f64], delta: f64) -> Result<(f64, f64)> {
    if !(delta > 0.0 && delta < 1.0) {
        return Err(PrivacyError::param("delta", delta, "must be in (0, 1)"));
    }
    let mut best = (f64::INFINITY, orders.first().copied().unwrap_or(0.0));
    for (&a, &r) in orders.iter().zip(rdp) {
        let eps = if r < 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
            0.0
        } else if a > 1.01 {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            f64::INFINITY
        };
        if eps < best.0 {
            best = (eps, a);
        }
    }
    Ok((best.0.max(0.0), best.1))
}

/// The smallest δ over the orders for a given ε, and the order that attains it.
pub fn delta_from_rdp(orders: &[f64], rdp: &[f64], epsilon: f64) -> Result<(f64, f64)> {
    if epsilon.is_nan() || epsilon < 0.0 {
        return Err(PrivacyError::param("epsilon", epsilon, "must be >= 0"));
    }
    let mut best = (f64::INFINITY, orders.first().copied().unwrap_or(0.0));
    for (&a, &r) in orders.iter().zip(rdp) {
        let mut log_delta = if r <= 0.0 { f64::NEG_INFINITY } else { 0.5 * (-(-r).exp()).ln_1p() };
        if a > 1.01 {
            let bound = (a - 1.0) * (r - epsilon + (-1.0 / a).ln_1p()) - a.ln();
            log_delta = log_delta.min(bound);
        }
        if log_delta < best.0 {
            best = (log_delta, a);
        }
    }
    Ok((best.0.exp().min(1.0), best.1))
}

/// An RDP accountant: composes mechanisms by adding their RDP curves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RdpAccountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        Self::new(default_orders())
    }
}

impl RdpAccountant {
    /// An accountant over the given orders, with nothing spent.
    pub fn new(orders: Vec<f64>) -> Self {
        let rdp = vec![0.0; orders.len()];
        Self { orders, rdp }
    }

    /// Compose `steps` steps of the subsampled Gaussian (σ or q may differ between calls).
    pub fn compose_subsampled_gaussian(&mut self, q: f64, noise_multiplier: f64, steps: u64) -> Result<()> {
        let one = rdp_subsampled_gaussian(q, noise_multiplier, &self.orders)?;
        for (acc, r) in self.rdp.iter_mut().zip(one) {
            *acc += steps as f64 * r;
        }
        Ok(())
    }

    /// Add another accountant's spending (same orders).
    pub fn compose(&mut self, other: &RdpAccountant) {
        for (acc, r) in self.rdp.iter_mut().zip(&other.rdp) {
            *acc += r;
        }
    }

    /// ε spent at `delta`, with the optimal order.
    pub fn epsilon(&self, delta: f64) -> Result<(f64, f64)> {
        epsilon_from_rdp(&self.orders, &self.rdp, delta)
    }

    /// δ at `epsilon`, with the optimal order.
    pub fn delta(&self, epsilon: f64) -> Result<(f64, f64)> {
        delta_from_rdp(&self.orders, &self.rdp, epsilon)
    }

    /// The orders.
    pub fn orders(&self) -> &[f64] {
        &self.orders
    }

    /// The accumulated RDP curve.
    pub fn rdp(&self) -> &[f64] {
        &self.rdp
    }
}

/// ε of `steps` steps at sampling rate `q` and noise multiplier `z`, at `delta`
/// (default orders); returns `(ε, optimal order)`.
pub fn epsilon(q: f64, noise_multiplier: f64, steps: u64, delta: f64) -> Result<(f64, f64)> {
    let mut acc = RdpAccountant::default();
    acc.compose_subsampled_gaussian(q, noise_multiplier, steps)?;
    acc.epsilon(delta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Vector {
        q: f64,
        sigma: f64,
        steps: u64,
        delta: f64,
        epsilon: f64,
        order: f64,
    }

    #[test]
    fn epsilon_matches_dp_accounting_to_one_part_in_a_million() {
        #[derive(Deserialize)]
        struct File {
            vectors: Vec<Vector>,
        }
        let file: File = serde_json::from_str(include_str!("../tests/vectors/rdp_vectors.json")).expect("vectors");
        let vectors = file.vectors;
        assert!(vectors.len() >= 200);
        let mut checked = 0;
        for v in &vectors {
            let (eps, order) = epsilon(v.q, v.sigma, v.steps, v.delta).expect("epsilon");
            if v.epsilon.is_infinite() {
                assert!(eps.is_infinite(), "q={} σ={} T={}: expected ∞, got {eps}", v.q, v.sigma, v.steps);
                continue;
            }
            let rel = ((eps - v.epsilon) / v.epsilon.max(1e-300)).abs();
            assert!(
                rel <= 1e-6 || (eps - v.epsilon).abs() < 1e-12,
                "q={} σ={} T={} δ={}: ε {eps} vs dp_accounting {} (rel {rel:e})",
                v.q,
                v.sigma,
                v.steps,
                v.delta,
                v.epsilon
            );
            assert_eq!(order, v.order, "optimal order for q={} σ={} T={}", v.q, v.sigma, v.steps);
            checked += 1;
        }
        assert!(checked >= 150, "{checked}");
    }

    #[test]
    fn epsilon_grows_with_steps_and_q_and_shrinks_with_sigma() {
        let d = 1e-5;
        let e = |q, s, t| epsilon(q, s, t, d).expect("eps").0;
        for &q in &[0.001, 0.01, 0.1, 1.0] {
            for &s in &[0.6, 1.0, 2.0, 4.0] {
                let mut last = 0.0;
                for &t in &[1u64, 10, 100, 1000] {
                    let x = e(q, s, t);
                    assert!(x >= last, "steps: q={q} σ={s} T={t}");
                    last = x;
                }
                assert!(e(q, s, 100) >= e(q, s * 1.1, 100), "σ: q={q} σ={s}");
            }
        }
        for &s in &[0.7, 1.5, 3.0] {
            let mut last = 0.0;
            for &q in &[0.001, 0.01, 0.05, 0.2, 0.6, 1.0] {
                let x = e(q, s, 50);
                assert!(x >= last, "q: q={q} σ={s}");
                last = x;
            }
        }
    }

    #[test]
    fn full_batch_gaussian_has_the_closed_form_rdp() {
        let orders = default_orders();
        let rdp = rdp_subsampled_gaussian(1.0, 2.0, &orders).expect("rdp");
        for (a, r) in orders.iter().zip(rdp) {
            assert!((r - a / 8.0).abs() < 1e-12);
        }
        assert!(rdp_subsampled_gaussian(1.5, 1.0, &orders).is_err());
        assert!(epsilon(0.1, 1.0, 10, 0.0).is_err());
    }

    #[test]
    fn delta_and_epsilon_conversions_are_consistent() {
        let mut acc = RdpAccountant::default();
        acc.compose_subsampled_gaussian(0.01, 1.1, 1000).expect("compose");
        let (eps, _) = acc.epsilon(1e-5).expect("eps");
        let (delta, _) = acc.delta(eps).expect("delta");
        assert!(delta <= 1e-5 * (1.0 + 1e-6), "{delta}");
        let (delta_smaller_eps, _) = acc.delta(eps * 0.9).expect("delta");
        assert!(delta_smaller_eps > 1e-5);
    }
}
