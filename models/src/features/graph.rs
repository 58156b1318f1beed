//! The road graph: segments, their neighbours up- and downstream, read from a CSV file.

use std::collections::HashMap;
use std::path::Path;

/// One segment of the road graph.
#[derive(Debug, Clone, PartialEq)]
pub struct RoadSegment {
    /// Its id.
    pub segment_id: String,
    /// Index of the upstream segment in the graph.
    pub upstream: Option<usize>,
    /// Index of the downstream segment in the graph.
    pub downstream: Option<usize>,
    /// Free-flow speed, km/h.
    pub free_speed_kmh: f64,
    /// Latitude and longitude of the segment (for maps), where the file has them.
    pub lat: Option<f64>,
    /// See `lat`.
    pub lon: Option<f64>,
}

/// The road graph: segments sorted by id, neighbours as indices.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RoadGraph {
    /// Segments, sorted by id.
    pub segments: Vec<RoadSegment>,
    /// Whether the file has `lat` and `lon` columns.
    pub has_coordinates: bool,
    pub(super) index: HashMap<String, usize>,
}

impl RoadGraph {
    /// Reads the CSV at `path` (header names the columns; `upstream`/`downstream` may be empty).
    pub fn read(path: &Path) -> Result<RoadGraph, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let mut lines = text.lines();
        let header: Vec<&str> =
            lines.next().ok_or_else(|| format!("{} is empty", path.display()))?.split(',').collect();
        let col = |name: &str| {
            header
                .iter()
                .position(|h| h.trim() == name)
                .ok_or_else(|| format!("{} has no column `{name}`", path.display()))
        };
        let (ci, cu, cd, cf) = (col("segment_id")?, col("upstream")?, col("downstream")?, col("free_speed_kmh")?);
        let (clat, clon) = (col("lat").ok(), col("lon").ok());
        let mut raw = Vec::new();
        for (n, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let f: Vec<&str> = line.split(',').collect();
            let get = |c: usize| {
                f.get(c).map(|s| s.trim()).ok_or_else(|| format!("{}:{}: too few fields", path.display(), n + 2))
            };
            let free: f64 =
                get(cf)?.parse().map_err(|e| format!("{}:{}: free_speed_kmh: {e}", path.display(), n + 2))?;
            let coord = |c: Option<usize>| c.and_then(|c| f.get(c)).and_then(|v| v.trim().parse::<f64>().ok());
            raw.push((get(ci)?.to_owned(), get(cu)?.to_owned(), get(cd)?.to_owned(), free, coord(clat), coord(clon)));
        }
        raw.sort_by(|a, b| a.0.cmp(&b.0));
        let index: HashMap<String, usize> = raw.iter().enumerate().map(|(i, r)| (r.0.clone(), i)).collect();
        if index.len() != raw.len() {
            return Err(format!("{}: a segment_id appears twice", path.display()));
        }
        let segments = raw
            .into_iter()
            .map(|(id, up, down, free, lat, lon)| RoadSegment {
                upstream: index.get(&up).copied(),
                downstream: index.get(&down).copied(),
                segment_id: id,
                free_speed_kmh: free,
                lat,
                lon,
            })
            .collect();
        Ok(RoadGraph { segments, has_coordinates: clat.is_some() && clon.is_some(), index })
    }

    /// The index of `segment_id`.
    pub fn index_of(&self, segment_id: &str) -> Option<usize> {
        self.index.get(segment_id).copied()
    }
}
