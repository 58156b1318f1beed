//! Accumulators of one aggregate for every group of a window, and the exact quantile.

use crate::exact_sum::ExactSum;

use super::config::AggFn;

/// Accumulators of one aggregate for every group of one window, column-wise.
#[derive(Debug, Clone)]
pub(super) enum Acc {
    /// count / count_above
    Count(Vec<i64>),
    /// sum, mean, rate_per_hour: (sum, n)
    Sum(Vec<ExactSum>, Vec<u64>),
    Min(Vec<f64>),
    Max(Vec<f64>),
    Values(Vec<Vec<f32>>),
    /// (sum of w*v, sum of w)
    Weighted(Vec<ExactSum>, Vec<ExactSum>),
}

impl Acc {
    pub(super) fn new(f: AggFn) -> Self {
        match f {
            AggFn::Count | AggFn::CountAbove => Acc::Count(Vec::new()),
            AggFn::Sum | AggFn::Mean | AggFn::RatePerHour => Acc::Sum(Vec::new(), Vec::new()),
            AggFn::Min => Acc::Min(Vec::new()),
            AggFn::Max => Acc::Max(Vec::new()),
            AggFn::Quantile => Acc::Values(Vec::new()),
            AggFn::WeightedMean => Acc::Weighted(Vec::new(), Vec::new()),
        }
    }

    pub(super) fn push_slot(&mut self) {
        match self {
            Acc::Count(c) => c.push(0),
            Acc::Sum(s, n) => {
                s.push(ExactSum::default());
                n.push(0);
            }
            Acc::Min(m) => m.push(f64::INFINITY),
            Acc::Max(m) => m.push(f64::NEG_INFINITY),
            Acc::Values(v) => v.push(Vec::new()),
            Acc::Weighted(a, b) => {
                a.push(ExactSum::default());
                b.push(ExactSum::default());
            }
        }
    }

    pub(super) fn bytes(&self) -> usize {
        match self {
            Acc::Count(c) => c.capacity() * 8,
            Acc::Sum(s, n) => s.capacity() * 32 + n.capacity() * 8,
            Acc::Min(m) | Acc::Max(m) => m.capacity() * 8,
            Acc::Values(v) => v.iter().map(|x| x.capacity() * 4 + 24).sum(),
            Acc::Weighted(a, b) => (a.capacity() + b.capacity()) * 32,
        }
    }
}

/// The `q` quantile of `values` with linear interpolation between order statistics (numpy's
/// default, "type 7"); `None` for no values.
pub fn quantile(values: &[f32], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v: Vec<f32> = values.to_vec();
    let h = (v.len() - 1) as f64 * q;
    let lo = h.floor() as usize;
    let hi = h.ceil() as usize;
    // the two order statistics by selection (linear time) rather than a sort: the `lo`-th,
    // then the smallest of those after it
    let (_, &mut a, above) = v.select_nth_unstable_by(lo, f32::total_cmp);
    let b = if hi == lo { a } else { above.iter().copied().min_by(f32::total_cmp).expect("hi < len") };
    let (a, b) = (a as f64, b as f64);
    Some(a + (h - lo as f64) * (b - a))
}

#[cfg(test)]
mod tests {
    use super::quantile;

    /// numpy's "type 7" on a sorted copy: what [`quantile`] computes by selection.
    fn sorted_quantile(values: &[f32], q: f64) -> f64 {
        let mut v = values.to_vec();
        v.sort_by(f32::total_cmp);
        let h = (v.len() - 1) as f64 * q;
        let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
        let (a, b) = (f64::from(v[lo]), f64::from(v[hi]));
        a + (h - lo as f64) * (b - a)
    }

    #[test]
    fn selection_gives_the_quantile_of_the_sorted_values() {
        assert_eq!(quantile(&[], 0.5), None);
        // numpy.quantile([1, 2, 3, 4], 0.85) = 3.55; one value is every quantile
        assert!((quantile(&[4.0, 1.0, 3.0, 2.0], 0.85).unwrap() - 3.55).abs() < 1e-12);
        assert_eq!(quantile(&[7.5], 0.85), Some(7.5));
        let mut x = 3u64;
        for n in 1..300usize {
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    // few distinct values (ties), a negative zero now and then
                    match x >> 58 {
                        0 => -0.0,
                        r => (r % 23) as f32 * 2.5,
                    }
                })
                .collect();
            for q in [0.0, 0.05, 0.5, 0.85, 0.95, 0.999, 1.0] {
                let got = quantile(&values, q).unwrap();
                let want = sorted_quantile(&values, q);
                assert!(got.to_bits() == want.to_bits(), "n {n}, q {q}: {got} against {want}");
            }
        }
    }
}
