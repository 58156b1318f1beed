//! Contribution bounding: per privacy unit at most `l0` partitions and `linf` rows each,
//! chosen uniformly at random.

use std::collections::{BTreeMap, HashMap};

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
pub fn bound_contributions<R: rand::Rng>(
    rows: Vec<(String, String, f64)>,
    l0: usize,
    linf: usize,
    rng: &mut R,
) -> (Vec<(String, String, f64)>, usize) {
    let n = rows.len();
    let mut by_unit: HashMap<String, BTreeMap<String, Vec<f64>>> = HashMap::new();
    for (u, p, v) in rows {
        by_unit.entry(u).or_default().entry(p).or_default().push(v);
    }
    let mut units: Vec<_> = by_unit.into_iter().collect();
    units.sort_by(|a, b| a.0.cmp(&b.0)); // deterministic order for a seeded generator
    let mut out = Vec::new();
    for (unit, parts) in units {
        let mut parts: Vec<(String, Vec<f64>)> = parts.into_iter().collect();
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
