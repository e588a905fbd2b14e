//! L2 clipping: of a whole update (user-level DP, as in DP-FedAvg) and per example
//! (DP-SGD on micro-batches).

use std::fmt;

use crate::error::{PrivacyError, Result};

/// A clipping bound `C > 0`, checked at construction.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct ClipNorm(f64);

impl ClipNorm {
    /// A finite, strictly positive bound.
    pub fn new(c: f64) -> Result<Self> {
        if c.is_finite() && c > 0.0 {
            Ok(Self(c))
        } else {
            Err(PrivacyError::param("clip_norm", c, "must be finite and > 0"))
        }
    }
    /// The bound.
    pub fn get(self) -> f64 {
        self.0
    }
}

/// An update whose L2 norm is at most its clip norm: the only input noise accepts.
///
/// `Debug` prints shape and norms, never values.
#[derive(Clone, PartialEq)]
pub struct Clipped {
    pub(crate) values: Vec<f32>,
    pub(crate) clip_norm: ClipNorm,
    pub(crate) original_norm: f64,
    pub(crate) examples: usize,
}

impl fmt::Debug for Clipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Clipped")
            .field("len", &self.values.len())
            .field("clip_norm", &self.clip_norm.0)
            .field("original_norm", &self.original_norm)
            .field("examples", &self.examples)
            .finish()
    }
}

impl Clipped {
    /// The clipped values.
    pub fn values(&self) -> &[f32] {
        &self.values
    }
    /// The bound applied (the L2 sensitivity of one contribution).
    pub fn clip_norm(&self) -> ClipNorm {
        self.clip_norm
    }
    /// Norm before clipping (for a per-example sum: the largest example norm).
    pub fn original_norm(&self) -> f64 {
        self.original_norm
    }
    /// Whether clipping scaled the update down.
    pub fn was_clipped(&self) -> bool {
        self.original_norm > self.clip_norm.0
    }
    /// Number of per-example contributions summed (1 for a whole update).
    pub fn examples(&self) -> usize {
        self.examples
    }
}

/// L2 norm, accumulated in f64.
pub fn l2_norm(values: &[f32]) -> f64 {
    values.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt()
}

fn check_finite(values: &[f32]) -> Result<()> {
    match values.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(PrivacyError::NonFinite { index }),
        None => Ok(()),
    }
}

fn scale_into(values: &mut [f32], norm: f64, c: f64) {
    if norm > c {
        let factor = c / norm;
        for v in values.iter_mut() {
            *v = (f64::from(*v) * factor) as f32;
        }
        // f32 rounding can leave the norm a hair above C: shrink until it is not.
        let mut n = l2_norm(values);
        while n > c {
            let f = (c / n) * (1.0 - 1e-7);
            for v in values.iter_mut() {
                *v = (f64::from(*v) * f) as f32;
            }
            n = l2_norm(values);
        }
    }
}

/// Scale `values` so that their L2 norm is at most `c` (unchanged if already inside).
pub fn clip(mut values: Vec<f32>, c: ClipNorm) -> Result<Clipped> {
    check_finite(&values)?;
    let norm = l2_norm(&values);
    scale_into(&mut values, norm, c.0);
    Ok(Clipped { values, clip_norm: c, original_norm: norm, examples: 1 })
}

/// Clip each example's gradient to `c` and sum them (DP-SGD). The sum has
/// add/remove sensitivity `c`.
pub fn clip_per_example<'a>(examples: impl IntoIterator<Item = &'a [f32]>, c: ClipNorm) -> Result<Clipped> {
    let mut sum: Vec<f64> = Vec::new();
    let mut max_norm = 0.0f64;
    let mut count = 0;
    for (i, ex) in examples.into_iter().enumerate() {
        check_finite(ex)?;
        if i == 0 {
            sum = vec![0.0; ex.len()];
        } else if ex.len() != sum.len() {
            return Err(PrivacyError::LengthMismatch { index: i, found: ex.len(), expected: sum.len() });
        }
        let mut v = ex.to_vec();
        let norm = l2_norm(&v);
        scale_into(&mut v, norm, c.0);
        max_norm = max_norm.max(norm);
        for (s, x) in sum.iter_mut().zip(&v) {
            *s += f64::from(*x);
        }
        count += 1;
    }
    Ok(Clipped {
        values: sum.into_iter().map(|x| x as f32).collect(),
        clip_norm: c,
        original_norm: max_norm,
        examples: count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn clipped_norms_never_exceed_the_bound() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for trial in 0..200 {
            let n = 1 + (rng.next_u32() % 5000) as usize;
            let scale = 10f32.powi((trial % 9) - 4);
            let v: Vec<f32> = (0..n).map(|_| ((rng.next_u32() as f32 / u32::MAX as f32) - 0.5) * scale).collect();
            let c = ClipNorm::new(0.1 + (trial as f64) * 0.05).expect("c");
            let before = l2_norm(&v);
            let out = clip(v.clone(), c).expect("clip");
            assert!(l2_norm(out.values()) <= c.get(), "trial {trial}");
            if before <= c.get() {
                assert_eq!(out.values(), &v[..], "inside the ball nothing changes");
            } else {
                assert!((l2_norm(out.values()) - c.get()).abs() < 1e-5 * c.get());
            }
        }
    }

    #[test]
    fn per_example_clipping_bounds_each_contribution() {
        let big = [3.0f32, 4.0]; // norm 5
        let small = [0.3f32, 0.4]; // norm 0.5
        let c = ClipNorm::new(1.0).expect("c");
        let out = clip_per_example([&big[..], &small[..]], c).expect("clip");
        assert_eq!(out.examples(), 2);
        assert!((out.values()[0] - (0.6 + 0.3)).abs() < 1e-6);
        assert!((out.values()[1] - (0.8 + 0.4)).abs() < 1e-6);
        assert_eq!(out.original_norm(), 5.0);
        let bad = [1.0f32];
        assert!(matches!(
            clip_per_example([&big[..], &bad[..]], c),
            Err(PrivacyError::LengthMismatch { index: 1, .. })
        ));
    }

    #[test]
    fn bad_inputs_are_refused() {
        assert!(ClipNorm::new(0.0).is_err());
        assert!(ClipNorm::new(f64::NAN).is_err());
        let c = ClipNorm::new(1.0).expect("c");
        assert!(matches!(clip(vec![1.0, f32::NAN], c), Err(PrivacyError::NonFinite { index: 1 })));
        let dbg = format!("{:?}", clip(vec![0.123_456_7; 4], c).expect("clip"));
        assert!(!dbg.contains("0.123"), "Debug must not print values: {dbg}");
    }
}
