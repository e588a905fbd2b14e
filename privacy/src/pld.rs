//! Privacy-loss-distribution (PLD) accounting of the Poisson-subsampled Gaussian
//! mechanism under add/remove adjacency (Koskela et al. 2020; Doroshenko et al. 2022,
//! "Connect the Dots"), ported from Google's `dp_accounting` (`pld/`) and checked
//! against it (`tests/vectors/pld_vectors.json`).
//!
//! How it works, as in `dp_accounting`:
//! * one step's privacy loss, for the *remove* and for the *add* direction, is
//!   discretised on a grid of interval `h` (1e-4 by default) with the pessimistic
//!   connect-the-dots rule: the grid PMF's hockey-stick divergence upper-bounds the
//!   mechanism's at every ε (mass beyond the noise's `e^-50` tails goes to +∞);
//! * `T` steps compose by convolving the PMF with itself `T` times — one FFT, the
//!   spectrum raised to the `T`-th power, one inverse FFT — over a window that a
//!   Chernoff bound shows holds all but 1e-15 of the mass (the rest counts as +∞);
//! * ε at δ is read off the composed PMF, the larger of the two directions.
//!
//! Every approximation rounds towards more privacy loss, so the ε reported is an upper
//! bound on the true one; it is never above the RDP accountant's on the same point
//! (the RDP bound is looser), which the tests check over the whole vector grid.

use realfft::RealFftPlanner;
use realfft::num_complex::Complex;

use crate::error::{PrivacyError, Result};
use crate::rdp::log_erfc;

/// `dp_accounting`'s default discretisation interval of privacy losses.
pub const DEFAULT_VALUE_INTERVAL: f64 = 1e-4;
/// ln of the noise mass left out of each tail before discretisation (`dp_accounting`'s
/// `log_mass_truncation_bound`); that mass is counted as infinite loss.
const LOG_MASS_TRUNCATION: f64 = -50.0;
/// Mass a composition may drop from the PMF's tails; counted as infinite loss.
const TAIL_MASS_TRUNCATION: f64 = 1e-15;

fn norm_cdf(x: f64) -> f64 {
    0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
}

fn norm_log_cdf(x: f64) -> f64 {
    if x > 0.0 {
        (-0.5 * libm::erfc(x / std::f64::consts::SQRT_2)).ln_1p()
    } else {
        0.5f64.ln() + log_erfc(-x / std::f64::consts::SQRT_2)
    }
}

/// The standard normal quantile of a (tiny) probability `p`, by bisection on the log CDF.
fn norm_ppf(p: f64) -> f64 {
    let target = p.ln();
    let (mut lo, mut hi) = (-60.0f64, 0.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if norm_log_cdf(mid) < target { lo = mid } else { hi = mid }
    }
    0.5 * (lo + hi)
}

fn log_add(a: f64, b: f64) -> f64 {
    let (mn, mx) = if a < b { (a, b) } else { (b, a) };
    if mn == f64::NEG_INFINITY {
        return mx;
    }
    mx + (mn - mx).exp().ln_1p()
}

fn log_sub(a: f64, b: f64) -> f64 {
    if b >= a {
        return f64::NEG_INFINITY;
    }
    a + (-(b - a).exp()).ln_1p()
}

/// `ln(a·e^b + c)`, stable (`dp_accounting.pld.common.log_a_times_exp_b_plus_c`).
fn log_a_times_exp_b_plus_c(a: f64, b: f64, c: f64) -> f64 {
    if a == 0.0 {
        return c.ln();
    }
    if a < 0.0 {
        return log_sub(c.ln(), (-a).ln() + b);
    }
    if b == 0.0 {
        return (a + c).ln();
    }
    let d = b + a.ln();
    if c == 0.0 {
        d
    } else if c < 0.0 {
        log_sub(d, (-c).ln())
    } else {
        log_add(d, c.ln())
    }
}

fn is_close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

/// Which neighbour is the larger dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Adjacency {
    /// The real dataset has the device; the neighbour lacks it.
    Remove,
    /// The neighbour has one device more.
    Add,
}

/// The privacy loss of one step of the Poisson-subsampled Gaussian (sensitivity 1).
#[derive(Debug, Clone, Copy)]
struct SubsampledGaussian {
    sigma: f64,
    q: f64,
    adjacency: Adjacency,
}

impl SubsampledGaussian {
    fn loss_remove(&self, x: f64) -> f64 {
        let unsampled = (-0.5 - x) / (self.sigma * self.sigma);
        if self.q == 1.0 { unsampled } else { log_a_times_exp_b_plus_c(self.q, unsampled, 1.0 - self.q) }
    }

    fn loss(&self, x: f64) -> f64 {
        match self.adjacency {
            Adjacency::Remove => self.loss_remove(x),
            Adjacency::Add => -self.loss_remove(-x),
        }
    }

    fn inverse_unsampled_remove(&self, loss: f64) -> f64 {
        -0.5 - loss * self.sigma * self.sigma
    }

    /// The largest `x` whose privacy loss is at least `loss`.
    fn inverse(&self, loss: f64) -> f64 {
        let q = self.q;
        match self.adjacency {
            Adjacency::Remove => {
                if q == 1.0 {
                    self.inverse_unsampled_remove(loss)
                } else if is_close(loss, (-q).ln_1p()) {
                    f64::INFINITY
                } else {
                    self.inverse_unsampled_remove(log_a_times_exp_b_plus_c(1.0 / q, loss, 1.0 - 1.0 / q))
                }
            }
            Adjacency::Add => {
                let inverse_add = |l: f64| 1.0 + self.inverse_unsampled_remove(l);
                if q == 1.0 {
                    inverse_add(loss)
                } else if is_close(loss, -(-q).ln_1p()) {
                    f64::NEG_INFINITY
                } else {
                    inverse_add(-log_a_times_exp_b_plus_c(1.0 / q, -loss, 1.0 - 1.0 / q))
                }
            }
        }
    }

    fn mu_upper_cdf(&self, x: f64) -> f64 {
        let s = self.sigma;
        match self.adjacency {
            Adjacency::Add => norm_cdf(x / s),
            Adjacency::Remove if self.q == 1.0 => norm_cdf((x + 1.0) / s),
            Adjacency::Remove => (1.0 - self.q) * norm_cdf(x / s) + self.q * norm_cdf((x + 1.0) / s),
        }
    }

    fn mu_lower_log_cdf(&self, x: f64) -> f64 {
        let s = self.sigma;
        match self.adjacency {
            Adjacency::Remove => norm_log_cdf(x / s),
            Adjacency::Add if self.q == 1.0 => norm_log_cdf((x - 1.0) / s),
            Adjacency::Add => {
                log_add((-self.q).ln_1p() + norm_log_cdf(x / s), self.q.ln() + norm_log_cdf((x - 1.0) / s))
            }
        }
    }

    /// The ε-hockey-stick divergence of the mechanism (its δ at `epsilon`).
    fn delta(&self, epsilon: f64) -> f64 {
        let q = self.q;
        let d = if q < 1.0 && self.adjacency == Adjacency::Add && epsilon >= -(-q).ln_1p() {
            0.0
        } else if q < 1.0 && self.adjacency == Adjacency::Remove && epsilon <= (-q).ln_1p() {
            -epsilon.exp_m1()
        } else {
            let x = self.inverse(epsilon);
            self.mu_upper_cdf(x) - (epsilon + self.mu_lower_log_cdf(x)).exp()
        };
        d.clamp(0.0, 1.0)
    }

    /// The `x` range outside which the noise keeps `e^-50` of its mass.
    fn truncation(&self) -> (f64, f64) {
        let mut lower = self.sigma * norm_ppf(0.5 * LOG_MASS_TRUNCATION.exp());
        let mut upper = -lower;
        match self.adjacency {
            Adjacency::Add => upper += 1.0,
            Adjacency::Remove => lower -= 1.0,
        }
        (lower, upper)
    }

    /// The pessimistic connect-the-dots PMF on the grid `h·ℤ`.
    fn pmf(&self, h: f64) -> Pmf {
        let (lower_x, upper_x) = self.truncation();
        let top = (self.loss(lower_x) / h).ceil() as i64;
        let bottom = (self.loss(upper_x) / h).floor() as i64;
        let mut deltas: Vec<f64> = (bottom..=top).map(|i| self.delta(i as f64 * h)).collect();
        if bottom == top {
            return Pmf { lower: bottom, probs: vec![1.0 - deltas[0]], infinity: deltas[0] };
        }
        for i in 1..deltas.len() {
            deltas[i] = deltas[i].min(deltas[i - 1]);
        }
        let n = deltas.len();
        let diff = |i: usize| deltas[i + 1] - deltas[i];
        let (e, em1) = (h.exp(), h.exp_m1());
        let mut probs = vec![0.0; n];
        probs[0] = 1.0 - deltas[0] + diff(0) / em1;
        for (i, p) in probs.iter_mut().enumerate().take(n - 1).skip(1) {
            *p = (diff(i) - diff(i - 1) * e) / em1;
        }
        probs[n - 1] = diff(n - 2) / (-h).exp_m1();
        for p in &mut probs {
            *p = p.max(0.0);
        }
        Pmf { lower: bottom, probs, infinity: deltas[n - 1] }
    }
}

/// A discretised privacy loss distribution: mass `probs[i]` at loss `(lower + i)·h`,
/// and `infinity` at +∞.
#[derive(Debug, Clone, PartialEq)]
struct Pmf {
    lower: i64,
    probs: Vec<f64>,
    infinity: f64,
}

/// The smallest length ≥ `n` whose prime factors are 2, 3 and 5 (fast for rustfft).
fn fast_len(n: usize) -> usize {
    let mut best = n.next_power_of_two();
    let mut p5 = 1usize;
    while p5 < best {
        let mut p35 = p5;
        while p35 < best {
            let mut m = p35;
            while m < n {
                m *= 2;
            }
            best = best.min(m);
            p35 *= 3;
        }
        p5 *= 5;
    }
    best
}

/// The spectrum of `values` zero-padded to `n` (the `n/2 + 1` non-redundant bins).
fn fft_of(planner: &mut RealFftPlanner<f64>, values: &[f64], n: usize) -> Vec<Complex<f64>> {
    let fft = planner.plan_fft_forward(n);
    let mut input = vec![0.0; n];
    input[..values.len()].copy_from_slice(values);
    let mut spectrum = fft.make_output_vec();
    fft.process(&mut input, &mut spectrum).expect("buffer lengths come from the plan");
    spectrum
}

/// The length-`n` real signal of a spectrum made by [`fft_of`] (normalised).
fn inverse_real(planner: &mut RealFftPlanner<f64>, mut spectrum: Vec<Complex<f64>>, n: usize) -> Vec<f64> {
    let fft = planner.plan_fft_inverse(n);
    // The DC bin (and Nyquist, for even n) of a real signal are real; rounding in the
    // powers may leave a tiny imaginary part, which the inverse transform rejects.
    spectrum[0].im = 0.0;
    if n.is_multiple_of(2)
        && let Some(last) = spectrum.last_mut()
    {
        last.im = 0.0;
    }
    let mut out = fft.make_output_vec();
    fft.process(&mut spectrum, &mut out).expect("buffer lengths come from the plan");
    let scale = 1.0 / n as f64;
    out.iter_mut().for_each(|v| *v *= scale);
    out
}

/// Truncation window `[lo, hi]` (indices of the `times`-fold self-convolution of
/// `probs`) outside which at most `tail` of the mass lies, by a Chernoff bound
/// (`dp_accounting.pld.common.compute_self_convolve_bounds`).
fn self_convolve_bounds(probs: &[f64], times: u64, tail: f64) -> (i64, i64) {
    let len = probs.len() as f64;
    let mut upper = (probs.len() as i64 - 1) * times as i64;
    let mut lower = 0i64;
    let orders = (-20..0).chain(1..21).map(|o| f64::from(o) / len);
    for order in orders {
        let m = probs
            .iter()
            .enumerate()
            .filter(|(_, p)| **p > 0.0)
            .map(|(i, _)| i as f64 * order)
            .fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = probs.iter().enumerate().map(|(i, p)| p * (i as f64 * order - m).exp()).sum();
        let log_mgf = m + s.ln();
        let bound = (times as f64 * log_mgf + (2.0 / tail).ln()) / order;
        if !bound.is_finite() {
            continue;
        }
        if order > 0.0 {
            upper = upper.min(bound.ceil() as i64);
        } else {
            lower = lower.max(bound.floor() as i64);
        }
    }
    (lower, upper)
}

fn complex_pow(z: Complex<f64>, mut e: u64) -> Complex<f64> {
    let (mut base, mut acc) = (z, Complex::new(1.0, 0.0));
    while e > 0 {
        if e & 1 == 1 {
            acc *= base;
        }
        base *= base;
        e >>= 1;
    }
    acc
}

impl Pmf {
    /// `times` compositions of this PMF with itself.
    fn self_compose(&self, times: u64, planner: &mut RealFftPlanner<f64>) -> Pmf {
        if times == 1 {
            return self.clone();
        }
        let (lo, hi) = self_convolve_bounds(&self.probs, times, TAIL_MASS_TRUNCATION);
        let out_len = (hi - lo + 1).max(1) as usize;
        let n = fast_len(out_len.max(self.probs.len()));
        let spectrum: Vec<Complex<f64>> =
            fft_of(planner, &self.probs, n).into_iter().map(|z| complex_pow(z, times)).collect();
        let full = inverse_real(planner, spectrum, n);
        let start = lo.rem_euclid(n as i64) as usize;
        let probs: Vec<f64> = (0..out_len).map(|i| full[(start + i) % n]).collect();
        let infinity = TAIL_MASS_TRUNCATION - (times as f64 * (-self.infinity).ln_1p()).exp_m1();
        Pmf { lower: self.lower * times as i64 + lo, probs, infinity }
    }

    /// The composition of two PMFs on the same grid.
    fn compose(&self, other: &Pmf, planner: &mut RealFftPlanner<f64>) -> Pmf {
        let out_len = self.probs.len() + other.probs.len() - 1;
        let n = fast_len(out_len);
        let a = fft_of(planner, &self.probs, n);
        let b = fft_of(planner, &other.probs, n);
        let mut probs = inverse_real(planner, a.into_iter().zip(b).map(|(x, y)| x * y).collect(), n);
        probs.truncate(out_len);
        let infinity = self.infinity + other.infinity - self.infinity * other.infinity;
        // Drop tails of at most TAIL_MASS_TRUNCATION/2 each: the left one onto the
        // smallest loss kept, the right one to +∞ (pessimistic, as dp_accounting).
        let half = TAIL_MASS_TRUNCATION / 2.0;
        let prefix = |it: &mut dyn Iterator<Item = &f64>| {
            let (mut sum, mut k) = (0.0, 0usize);
            for p in it {
                if sum + p > half {
                    break;
                }
                sum += p;
                k += 1;
            }
            (k, sum)
        };
        let (left, left_mass) = prefix(&mut probs.iter());
        let (right, _) = prefix(&mut probs.iter().rev());
        let end = (probs.len() - right).max(left + 1);
        let mut kept = probs[left..end].to_vec();
        kept[0] += left_mass;
        let right_mass: f64 = probs[end..].iter().sum();
        Pmf { lower: self.lower + other.lower + left as i64, probs: kept, infinity: infinity + right_mass }
    }

    /// The smallest ε ≥ 0 whose hockey-stick divergence is at most `delta`.
    fn epsilon(&self, delta: f64, h: f64) -> f64 {
        if self.infinity > delta {
            return f64::INFINITY;
        }
        let (mut upper, mut lower) = (self.infinity, 0.0f64);
        let top = (self.lower + self.probs.len() as i64 - 1) as f64 * h;
        for (k, &p) in self.probs.iter().rev().enumerate() {
            let loss = top - k as f64 * h;
            if upper > delta && lower > 0.0 && ((upper - delta) / lower).ln() >= loss {
                break;
            }
            upper += p;
            lower += (-loss).exp() * p;
            if upper >= delta && lower == 0.0 {
                return loss.max(0.0);
            }
        }
        if upper <= lower + delta { 0.0 } else { ((upper - delta) / lower).ln() }
    }

    /// The hockey-stick divergence at `epsilon`.
    fn delta(&self, epsilon: f64, h: f64) -> f64 {
        let mut d = self.infinity;
        for (i, &p) in self.probs.iter().enumerate() {
            let loss = (self.lower + i as i64) as f64 * h;
            if loss > epsilon {
                d += -(epsilon - loss).exp_m1() * p;
            }
        }
        d.clamp(0.0, 1.0)
    }
}

/// The PLD of a (composed) mechanism: the remove direction, and the add direction
/// when it differs (sampling rate < 1).
#[derive(Debug, Clone)]
struct Pld {
    remove: Pmf,
    add: Option<Pmf>,
}

impl Pld {
    fn subsampled_gaussian(q: f64, sigma: f64, h: f64) -> Pld {
        let remove = SubsampledGaussian { sigma, q, adjacency: Adjacency::Remove }.pmf(h);
        let add = (q < 1.0).then(|| SubsampledGaussian { sigma, q, adjacency: Adjacency::Add }.pmf(h));
        Pld { remove, add }
    }

    fn self_compose(&self, times: u64, planner: &mut RealFftPlanner<f64>) -> Pld {
        Pld {
            remove: self.remove.self_compose(times, planner),
            add: self.add.as_ref().map(|a| a.self_compose(times, planner)),
        }
    }

    fn compose(&self, other: &Pld, planner: &mut RealFftPlanner<f64>) -> Pld {
        let add = match (&self.add, &other.add) {
            (None, None) => None,
            (a, b) => {
                let a = a.as_ref().unwrap_or(&self.remove);
                let b = b.as_ref().unwrap_or(&other.remove);
                Some(a.compose(b, planner))
            }
        };
        Pld { remove: self.remove.compose(&other.remove, planner), add }
    }

    fn epsilon(&self, delta: f64, h: f64) -> f64 {
        let remove = self.remove.epsilon(delta, h);
        self.add.as_ref().map_or(remove, |a| remove.max(a.epsilon(delta, h)))
    }

    fn delta(&self, epsilon: f64, h: f64) -> f64 {
        let remove = self.remove.delta(epsilon, h);
        self.add.as_ref().map_or(remove, |a| remove.max(a.delta(epsilon, h)))
    }
}

fn check_event(q: f64, noise_multiplier: f64) -> Result<()> {
    if !(q > 0.0 && q <= 1.0) {
        return Err(PrivacyError::param("sampling_rate", q, "must be in (0, 1] for the PLD accountant"));
    }
    if !(noise_multiplier.is_finite() && noise_multiplier > 0.0) {
        return Err(PrivacyError::param("noise_multiplier", noise_multiplier, "must be finite and > 0"));
    }
    Ok(())
}

fn check_delta(delta: f64) -> Result<()> {
    if !(delta > 0.0 && delta < 1.0) {
        return Err(PrivacyError::param("delta", delta, "must be in (0, 1)"));
    }
    Ok(())
}

/// A PLD accountant: composes Poisson-subsampled Gaussian steps (sampling rates and
/// multipliers may differ between calls) and reads (ε, δ) off the composed PLD.
#[derive(Debug, Clone)]
pub struct PldAccountant {
    interval: f64,
    pld: Option<Pld>,
    steps: u64,
}

impl Default for PldAccountant {
    fn default() -> Self {
        Self { interval: DEFAULT_VALUE_INTERVAL, pld: None, steps: 0 }
    }
}

impl PldAccountant {
    /// An accountant whose privacy losses are discretised on `interval` (smaller: tighter
    /// and slower; `dp_accounting` uses 1e-4, [`DEFAULT_VALUE_INTERVAL`]).
    pub fn new(interval: f64) -> Result<Self> {
        if !(interval.is_finite() && interval > 0.0 && interval <= 1.0) {
            return Err(PrivacyError::param("value_interval", interval, "must be in (0, 1]"));
        }
        Ok(Self { interval, pld: None, steps: 0 })
    }

    /// Compose `steps` steps of the Gaussian mechanism with noise multiplier
    /// `noise_multiplier` on a Poisson sample of rate `q` (0 steps or `q = 0` spend nothing).
    pub fn compose_subsampled_gaussian(&mut self, q: f64, noise_multiplier: f64, steps: u64) -> Result<()> {
        if q == 0.0 || steps == 0 {
            return check_event(1.0, noise_multiplier);
        }
        check_event(q, noise_multiplier)?;
        let mut planner = RealFftPlanner::new();
        let composed = Pld::subsampled_gaussian(q, noise_multiplier, self.interval).self_compose(steps, &mut planner);
        self.pld = Some(match self.pld.take() {
            None => composed,
            Some(before) => before.compose(&composed, &mut planner),
        });
        self.steps += steps;
        Ok(())
    }

    /// ε spent at `delta` (0 when nothing was composed).
    pub fn epsilon(&self, delta: f64) -> Result<f64> {
        check_delta(delta)?;
        Ok(self.pld.as_ref().map_or(0.0, |p| p.epsilon(delta, self.interval)))
    }

    /// δ at `epsilon`.
    pub fn delta(&self, epsilon: f64) -> Result<f64> {
        if epsilon.is_nan() || epsilon < 0.0 {
            return Err(PrivacyError::param("epsilon", epsilon, "must be >= 0"));
        }
        Ok(self.pld.as_ref().map_or(0.0, |p| p.delta(epsilon, self.interval)))
    }

    /// Steps composed so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }
}

/// The exact ε at `delta` of one Gaussian mechanism with sensitivity 1 and noise
/// standard deviation `sigma`, without sampling (the analytic Gaussian mechanism of Balle
/// and Wang 2018: `δ(ε) = Φ(μ/2 − ε/μ) − e^ε Φ(−μ/2 − ε/μ)`, `μ = 1/σ`), by bisection to a
/// relative 1e-12. The PLD of such a mechanism is a Gaussian: no discretisation needed.
pub fn gaussian_epsilon(sigma: f64, delta: f64) -> Result<f64> {
    check_event(1.0, sigma)?;
    check_delta(delta)?;
    let mu = 1.0 / sigma;
    let delta_at = |eps: f64| norm_cdf(mu / 2.0 - eps / mu) - (eps + norm_log_cdf(-mu / 2.0 - eps / mu)).exp();
    if delta_at(0.0) <= delta {
        return Ok(0.0);
    }
    let mut hi = 1.0;
    while delta_at(hi) > delta {
        hi *= 2.0;
    }
    let mut lo = 0.0;
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if delta_at(mid) > delta {
            lo = mid
        } else {
            hi = mid
        }
        if hi - lo <= 1e-12 * hi {
            break;
        }
    }
    Ok(hi)
}

/// ε of `steps` steps at sampling rate `q` and noise multiplier `z`, at `delta`, with
/// `dp_accounting`'s default discretisation.
pub fn epsilon(q: f64, noise_multiplier: f64, steps: u64, delta: f64) -> Result<f64> {
    check_delta(delta)?;
    let mut acc = PldAccountant::default();
    acc.compose_subsampled_gaussian(q, noise_multiplier, steps)?;
    acc.epsilon(delta)
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Deserialize)]
    struct Vector {
        q: f64,
        sigma: f64,
        steps: u64,
        delta: f64,
        epsilon: f64,
    }

    fn vectors() -> Vec<Vector> {
        #[derive(Deserialize)]
        struct File {
            vectors: Vec<Vector>,
        }
        let file: File = serde_json::from_str(include_str!("../tests/vectors/pld_vectors.json")).expect("vectors");
        file.vectors
    }

    /// Every vector of one sampling rate: ε within 1 % of `dp_accounting`'s PLD and never
    /// above the RDP accountant's ε on the same point. Split by `q` so that the test
    /// runner spreads the grid (≈ 25 s of one core in all) over the cores.
    fn check_grid_at(q: f64) {
        let vectors: Vec<Vector> = vectors().into_iter().filter(|v| v.q == q).collect();
        assert_eq!(vectors.len(), 40, "4 σ × 5 step counts × 2 δ at q = {q}");
        let mut worst = 0.0f64;
        for pair in vectors.chunks(2) {
            let (sigma, steps) = (pair[0].sigma, pair[0].steps);
            let mut acc = PldAccountant::default();
            acc.compose_subsampled_gaussian(q, sigma, steps).expect("compose");
            for v in pair {
                assert_eq!((v.sigma, v.steps), (sigma, steps), "vectors come in pairs of δ");
                let eps = acc.epsilon(v.delta).expect("epsilon");
                let rel = (eps - v.epsilon).abs() / v.epsilon;
                worst = worst.max(rel);
                assert!(
                    rel <= 0.01,
                    "q={q} σ={sigma} T={steps} δ={}: ε {eps} vs dp_accounting {} (rel {rel:e})",
                    v.delta,
                    v.epsilon
                );
                let (rdp, _) = crate::rdp::epsilon(q, sigma, steps, v.delta).expect("rdp");
                assert!(eps <= rdp, "q={q} σ={sigma} T={steps} δ={}: PLD ε {eps} above RDP ε {rdp}", v.delta);
            }
        }
        eprintln!("q = {q}: worst relative difference from dp_accounting {worst:e}");
    }

    #[test]
    fn grid_q_0_001_matches_dp_accounting_and_stays_below_rdp() {
        check_grid_at(0.001);
    }

    #[test]
    fn grid_q_0_01_matches_dp_accounting_and_stays_below_rdp() {
        check_grid_at(0.01);
    }

    #[test]
    fn grid_q_0_1_matches_dp_accounting_and_stays_below_rdp() {
        check_grid_at(0.1);
    }

    #[test]
    fn grid_q_0_5_matches_dp_accounting_and_stays_below_rdp() {
        check_grid_at(0.5);
    }

    #[test]
    fn grid_q_1_matches_dp_accounting_and_stays_below_rdp() {
        check_grid_at(1.0);
    }

    #[test]
    fn the_vector_grid_covers_the_acceptance_range() {
        let v = vectors();
        assert_eq!(v.len(), 200);
        let set = |f: fn(&Vector) -> f64| {
            let mut x: Vec<f64> = v.iter().map(f).collect();
            x.sort_by(f64::total_cmp);
            x.dedup();
            x
        };
        assert_eq!(set(|v| v.q), [0.001, 0.01, 0.1, 0.5, 1.0]);
        assert_eq!(set(|v| v.sigma), [0.5, 1.0, 2.0, 5.0]);
        assert_eq!(set(|v| v.steps as f64), [1.0, 10.0, 100.0, 1000.0, 10_000.0]);
        assert_eq!(set(|v| v.delta), [1e-6, 1e-5]);
    }

    #[test]
    fn the_full_batch_gaussian_matches_the_analytic_gaussian_mechanism() {
        // Balle & Wang 2018: δ(ε) = Φ(1/(2σ') − εσ') − e^ε Φ(−1/(2σ') − εσ'), σ' = σ/√T.
        for &(sigma, steps) in &[(1.0, 1u64), (2.0, 10), (5.0, 100)] {
            let s = sigma / (steps as f64).sqrt();
            let exact = |eps: f64| norm_cdf(0.5 / s - eps * s) - eps.exp() * norm_cdf(-0.5 / s - eps * s);
            let mut acc = PldAccountant::default();
            acc.compose_subsampled_gaussian(1.0, sigma, steps).expect("compose");
            for &eps in &[0.5, 1.0, 2.0] {
                let d = acc.delta(eps).expect("delta");
                let e = exact(eps);
                assert!(d >= e * (1.0 - 1e-9), "pessimistic: {d} < exact {e}");
                assert!(d <= e * 1.01 + 1e-12, "σ={sigma} T={steps} ε={eps}: {d} vs exact {e}");
            }
        }
    }

    #[test]
    fn the_analytic_gaussian_agrees_with_the_discretised_pld() {
        for &(sigma, delta) in &[(0.5, 1e-5), (1.0, 1e-5), (3.0, 1e-6), (0.1, 1e-5)] {
            let exact = gaussian_epsilon(sigma, delta).expect("analytic");
            let discretised = epsilon(1.0, sigma, 1, delta).expect("pld");
            assert!(exact <= discretised * (1.0 + 1e-9), "σ={sigma}: {exact} vs {discretised}");
            assert!((discretised - exact) / exact < 1e-3, "σ={sigma}: {exact} vs {discretised}");
        }
        assert!(gaussian_epsilon(0.0, 1e-5).is_err());
    }

    #[test]
    fn heterogeneous_steps_compose_in_any_order_and_add_up() {
        let mut ab = PldAccountant::default();
        ab.compose_subsampled_gaussian(0.01, 1.0, 100).expect("a");
        ab.compose_subsampled_gaussian(0.02, 1.5, 50).expect("b");
        let mut ba = PldAccountant::default();
        ba.compose_subsampled_gaussian(0.02, 1.5, 50).expect("b");
        ba.compose_subsampled_gaussian(0.01, 1.0, 100).expect("a");
        let (e1, e2) = (ab.epsilon(1e-5).expect("ab"), ba.epsilon(1e-5).expect("ba"));
        assert!((e1 - e2).abs() <= 1e-9 * e1, "{e1} vs {e2}");
        let only_a = epsilon(0.01, 1.0, 100, 1e-5).expect("a");
        assert!(e1 > only_a, "{e1} <= {only_a}");
        let mut split = PldAccountant::default();
        split.compose_subsampled_gaussian(0.01, 1.0, 60).expect("60");
        split.compose_subsampled_gaussian(0.01, 1.0, 40).expect("40");
        let joined = split.epsilon(1e-5).expect("split");
        assert!((joined - only_a).abs() <= 1e-6 * only_a, "{joined} vs {only_a}");
        assert_eq!(split.steps(), 100);
    }

    #[test]
    fn delta_and_epsilon_are_inverse() {
        let mut acc = PldAccountant::default();
        acc.compose_subsampled_gaussian(0.01, 1.1, 1000).expect("compose");
        let eps = acc.epsilon(1e-5).expect("eps");
        let d = acc.delta(eps).expect("delta");
        assert!(d <= 1e-5 * (1.0 + 1e-6) && d > 0.9e-5, "{d}");
        assert!(acc.delta(eps * 0.9).expect("delta") > 1e-5);
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert!(epsilon(1.5, 1.0, 10, 1e-5).is_err());
        assert!(epsilon(0.1, f64::NAN, 10, 1e-5).is_err());
        assert!(epsilon(0.1, -1.0, 10, 1e-5).is_err());
        assert!(epsilon(0.1, 1.0, 10, 0.0).is_err());
        assert!(epsilon(0.1, 1.0, 10, 1.0).is_err());
        assert!(PldAccountant::new(0.0).is_err());
        assert_eq!(epsilon(0.0, 1.0, 10, 1e-5).expect("nothing"), 0.0);
    }

    #[test]
    fn fast_lengths_are_five_smooth_and_not_below_the_request() {
        for n in [1usize, 7, 97, 1000, 65_537, 1_000_001] {
            let m = fast_len(n);
            assert!(m >= n && m <= n.next_power_of_two());
            let mut r = m;
            for p in [2, 3, 5] {
                while r.is_multiple_of(p) {
                    r /= p;
                }
            }
            assert_eq!(r, 1, "{m}");
        }
    }
}
