//! Sums whose result does not depend on the order of their terms.
//!
//! Floating-point addition is not associative: the same readings summed in another order can
//! differ in the last bits, so a window fed by several partitions would give other bits after
//! a backlog than in a live run. [`ExactSum`] adds every term as a fixed-point integer with
//! 2^-60 resolution in an `i128` (integer addition is associative), and rounds to `f64` only
//! when read. A term is rounded once, on its own, to that grid (exact for any `f64` of
//! magnitude ≥ 2^-8 with 52 significant bits; an absolute error below 1e-18 otherwise). Terms
//! beyond ±2^66 (about 7e19), or a total that would leave the `i128`, switch the sum to plain
//! `f64` addition for the rest of its life — order-dependent again, and counted by the caller
//! where it matters; no sensor reading comes near.

/// Fixed-point scale: 2^60.
const SCALE: f64 = 1_152_921_504_606_846_976.0;
/// The largest term magnitude added exactly: 2^66.
const MAX_TERM: f64 = 73_786_976_294_838_206_464.0;

/// An order-independent sum of `f64` terms (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ExactSum {
    fixed: i128,
    /// `Some` once the sum left the exact range: the float sum of every term so far.
    float: Option<f64>,
}

impl ExactSum {
    /// Adds `v` (a non-finite `v` makes the sum non-finite, as `f64` addition would).
    pub fn add(&mut self, v: f64) {
        if let Some(f) = &mut self.float {
            *f += v;
            return;
        }
        if v.is_finite() && v.abs() < MAX_TERM {
            // exact: scaling by a power of two, then one rounding of this term alone
            let term = (v * SCALE).round() as i128;
            if let Some(s) = self.fixed.checked_add(term) {
                self.fixed = s;
                return;
            }
        }
        self.float = Some(self.value() + v);
    }

    /// The sum, rounded to `f64`.
    pub fn value(&self) -> f64 {
        self.float.unwrap_or(self.fixed as f64 / SCALE)
    }

    /// Whether every term was added exactly (the result is independent of their order).
    pub fn is_exact(&self) -> bool {
        self.float.is_none()
    }

    /// The state as 16 bytes of fixed point and the float fallback (for snapshots).
    pub fn to_parts(&self) -> ([u8; 16], Option<f64>) {
        (self.fixed.to_le_bytes(), self.float)
    }

    /// The sum from [`to_parts`](Self::to_parts).
    pub fn from_parts(fixed: [u8; 16], float: Option<f64>) -> Self {
        Self { fixed: i128::from_le_bytes(fixed), float }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn small_terms_in_any_order_give_the_same_bits() {
        let terms = [0.1, 57.3, 1e-3, 0.2, 3.0e5, 0.1234, 12.5];
        let mut a = ExactSum::default();
        terms.iter().for_each(|t| a.add(*t));
        let mut b = ExactSum::default();
        terms.iter().rev().for_each(|t| b.add(*t));
        assert_eq!(a.value().to_bits(), b.value().to_bits());
        assert!((a.value() - terms.iter().sum::<f64>()).abs() < 1e-9);
        // plain f64 addition in these two orders differs in the last bits
        let fwd: f64 = terms.iter().sum();
        let rev: f64 = terms.iter().rev().sum();
        assert_ne!(fwd.to_bits(), rev.to_bits(), "the terms were chosen so that order matters for f64");
    }

    #[test]
    fn huge_terms_fall_back_to_float_addition() {
        let mut s = ExactSum::default();
        s.add(1.0);
        s.add(1e30);
        assert!(!s.is_exact());
        assert_eq!(s.value(), 1e30 + 1.0);
        let mut t = ExactSum::default();
        t.add(f64::INFINITY);
        assert!(t.value().is_infinite());
        let (fixed, float) = s.to_parts();
        assert_eq!(ExactSum::from_parts(fixed, float), s);
    }

    proptest! {
        #[test]
        fn the_sum_is_order_independent(mut v in proptest::collection::vec(-1e6f64..1e6, 0..50), seed in 0u64..1000) {
            let mut a = ExactSum::default();
            v.iter().for_each(|x| a.add(*x));
            // a fixed pseudo-random permutation
            let n = v.len();
            for i in 0..n {
                let j = (seed as usize * 31 + i * 17) % n;
                v.swap(i, j);
            }
            let mut b = ExactSum::default();
            v.iter().for_each(|x| b.add(*x));
            prop_assert_eq!(a.value().to_bits(), b.value().to_bits());
            prop_assert!((a.value() - v.iter().sum::<f64>()).abs() <= 1e-6);
        }
    }
}
