//! The road graph: segments, their neighbours up- and downstream, read from a CSV file (the
//! `features` stage of the models crate and the `alert` stage's `join` read it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Why a road graph file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// The file cannot be read.
    #[error("reading {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file has no header line.
    #[error("{} is empty", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// A column the graph needs is missing from the header.
    #[error("{} has no column `{column}`", path.display())]
    NoColumn {
        /// The file.
        path: PathBuf,
        /// The column.
        column: &'static str,
    },
    /// A line cannot be read.
    #[error("{}:{line}: {problem}", path.display())]
    Line {
        /// The file.
        path: PathBuf,
        /// Its line number (1-based).
        line: usize,
        /// What is wrong.
        problem: String,
    },
    /// Two rows have the same `segment_id`.
    #[error("{}: a segment_id appears twice", path.display())]
    DuplicateSegment {
        /// The file.
        path: PathBuf,
    },
}

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
    index: HashMap<String, usize>,
}

impl RoadGraph {
    /// Reads the CSV at `path` (header names the columns; `upstream`/`downstream` may be empty).
    pub fn read(path: &Path) -> Result<RoadGraph, GraphError> {
        let text = std::fs::read_to_string(path).map_err(|source| GraphError::Io { path: path.to_owned(), source })?;
        let mut lines = text.lines();
        let header: Vec<&str> =
            lines.next().ok_or_else(|| GraphError::Empty { path: path.to_owned() })?.split(',').collect();
        let col = |name: &'static str| {
            header
                .iter()
                .position(|h| h.trim() == name)
                .ok_or_else(|| GraphError::NoColumn { path: path.to_owned(), column: name })
        };
        let (ci, cu, cd, cf) = (col("segment_id")?, col("upstream")?, col("downstream")?, col("free_speed_kmh")?);
        let (clat, clon) = (col("lat").ok(), col("lon").ok());
        let mut raw = Vec::new();
        for (n, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let f: Vec<&str> = line.split(',').collect();
            let get = |c: usize| {
                f.get(c).map(|s| s.trim()).ok_or_else(|| GraphError::Line {
                    path: path.to_owned(),
                    line: n + 2,
                    problem: "too few fields".into(),
                })
            };
            let free: f64 = get(cf)?.parse().map_err(|e| GraphError::Line {
                path: path.to_owned(),
                line: n + 2,
                problem: format!("free_speed_kmh: {e}"),
            })?;
            let coord = |c: Option<usize>| c.and_then(|c| f.get(c)).and_then(|v| v.trim().parse::<f64>().ok());
            raw.push((get(ci)?.to_owned(), get(cu)?.to_owned(), get(cd)?.to_owned(), free, coord(clat), coord(clon)));
        }
        raw.sort_by(|a, b| a.0.cmp(&b.0));
        let index: HashMap<String, usize> = raw.iter().enumerate().map(|(i, r)| (r.0.clone(), i)).collect();
        if index.len() != raw.len() {
            return Err(GraphError::DuplicateSegment { path: path.to_owned() });
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

    /// The segments at most `reach` segments upstream or downstream of the segment at `index`
    /// (following one direction at a time, as `models/train/train.py`'s `neighbourhood`; a
    /// loop in the graph is followed no further than the segment itself).
    pub fn within(&self, index: usize, reach: usize) -> Vec<usize> {
        let mut out = Vec::new();
        for step in [|s: &RoadSegment| s.upstream, |s: &RoadSegment| s.downstream] {
            let mut at = index;
            for _ in 0..reach {
                match step(&self.segments[at]) {
                    Some(n) if n != index => {
                        if !out.contains(&n) {
                            out.push(n);
                        }
                        at = n;
                    }
                    _ => break,
                }
            }
        }
        out
    }
}
