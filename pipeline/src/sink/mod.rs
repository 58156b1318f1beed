//! Sinks: where tables leave the pipeline.

pub mod compact;
pub mod export;
mod operator_errors;
pub mod parquet;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub(crate) use crate::atomic_file::write_atomic;
pub(crate) use operator_errors::{OperatorErrors, TABLE as OPERATOR_ERRORS};

/// The Parquet files under `dir` grouped by the directory holding them (sorted), skipping
/// hidden and `_`-prefixed names: temporary files, compaction staging, metadata.
pub(crate) fn parquet_files_by_dir(dir: &Path) -> BTreeMap<PathBuf, Vec<PathBuf>> {
    let mut out: BTreeMap<PathBuf, Vec<PathBuf>> = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name.starts_with('_') {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if name.ends_with(".parquet") {
                out.entry(d.clone()).or_default().push(p);
            }
        }
    }
    for files in out.values_mut() {
        files.sort();
    }
    out
}
