//! Contribution bounding: per privacy unit at most `l0` partitions and `linf` rows each,
//! chosen uniformly at random.

use rand::seq::SliceRandom;

/// One buffered contribution.
#[derive(Debug, Clone)]
pub(super) struct Row {
    pub(super) unit: String,
    pub(super) partition: String,
    pub(super) value: f64,
}

/// Bounds contributions: per unit at most `l0` partitions and per (unit, partition) at most
/// `linf` rows, each chosen uniformly at random. Returns the kept rows and how many were cut.
///
/// Units are taken in order of their id, a unit's partitions in order of their name before
/// they are shuffled (the draws of a seeded generator depend on it). Rows are grouped by a sort
/// (already sorted rows, as a release hands them, cost one pass), not by maps of strings; a
/// unit with one row, which draws nothing, is kept as it is.
pub fn bound_contributions<R: rand::Rng>(
    mut rows: Vec<(String, String, f64)>,
    l0: usize,
    linf: usize,
    rng: &mut R,
) -> (Vec<(String, String, f64)>, usize) {
    let n = rows.len();
    let order = |a: &(String, String, f64), b: &(String, String, f64)| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1));
    if !rows.is_sorted_by(|a, b| order(a, b).is_le()) {
        // stable: the values of one (unit, partition) keep their order, as the maps kept it
        rows.sort_by(order);
    }
    let mut out = Vec::with_capacity(n);
    let mut rows = rows.into_iter().peekable();
    while let Some(first) = rows.next() {
        let single = rows.peek().is_none_or(|next| next.0 != first.0);
        if single {
            // one partition, one value: shuffling either draws nothing
            if l0 > 0 && linf > 0 {
                out.push(first);
            }
            continue;
        }
        let unit = first.0.clone();
        let mut parts: Vec<(String, Vec<f64>)> = vec![(first.1, vec![first.2])];
        while let Some(r) = rows.next_if(|r| r.0 == unit) {
            match parts.last_mut() {
                Some((p, vals)) if *p == r.1 => vals.push(r.2),
                _ => parts.push((r.1, vec![r.2])),
            }
        }
        parts.shuffle(rng);
        parts.truncate(l0);
        for (p, mut vals) in parts {
            vals.shuffle(rng);
            vals.truncate(linf);
            out.extend(vals.into_iter().map(|v| (unit.clone(), p.clone(), v)));
        }
    }
    let cut = n - out.len();
    (out, cut)
}
