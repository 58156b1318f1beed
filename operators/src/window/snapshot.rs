//! The columns of a window operator's snapshot, built one aggregate at a time.

use super::acc::Acc;

/// Snapshot columns per aggregate: x, y, exact x, exact y, values.
pub(super) const SNAPSHOT_COLUMNS: usize = 5;

/// One aggregate's snapshot columns being built.
#[derive(Default)]
pub(super) struct SnapshotCells {
    pub(super) x: Vec<Option<f64>>,
    pub(super) y: Vec<Option<f64>>,
    pub(super) exact_x: Vec<Option<[u8; 16]>>,
    pub(super) exact_y: Vec<Option<[u8; 16]>>,
    pub(super) values: Vec<Option<Vec<Option<f32>>>>,
}

impl SnapshotCells {
    pub(super) fn push(&mut self, acc: &Acc, slot: usize) {
        let (x, y, ex, ey, l) = match acc {
            Acc::Count(c) => (Some(c[slot] as f64), None, None, None, None),
            Acc::Sum(s, k) => {
                let (fixed, float) = s[slot].to_parts();
                (float, Some(k[slot] as f64), Some(fixed), None, None)
            }
            Acc::Min(m) | Acc::Max(m) => (Some(m[slot]), None, None, None, None),
            Acc::Values(v) => (None, None, None, None, Some(v[slot].iter().map(|x| Some(*x)).collect())),
            Acc::Weighted(p, q) => {
                let ((fp, xp), (fq, xq)) = (p[slot].to_parts(), q[slot].to_parts());
                (xp, xq, Some(fp), Some(fq), None)
            }
        };
        self.x.push(x);
        self.y.push(y);
        self.exact_x.push(ex);
        self.exact_y.push(ey);
        self.values.push(l);
    }
}
