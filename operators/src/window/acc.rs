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
    v.sort_unstable_by(f32::total_cmp);
    let h = (v.len() - 1) as f64 * q;
    let lo = h.floor() as usize;
    let hi = h.ceil() as usize;
    let (a, b) = (v[lo] as f64, v[hi] as f64);
    Some(a + (h - lo as f64) * (b - a))
}
