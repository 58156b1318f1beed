//! YAML of a `parquet` sink and the sink's errors.

use std::collections::BTreeMap;

use std::num::{NonZeroU64, NonZeroUsize};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::primitives::{EnvString, Inputs};

/// zstd level, 1 (fastest) to 22 (smallest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Level(pub i32);

impl<'de> Deserialize<'de> for Level {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = i64::deserialize(d)?;
        if (1..=22).contains(&v) {
            Ok(Level(v as i32))
        } else {
            Err(serde::de::Error::custom(format!("zstd compression level {v} is outside 1..=22")))
        }
    }
}

pub(super) fn d_level() -> Level {
    Level(3)
}
pub(super) fn d_row_group() -> NonZeroUsize {
    NonZeroUsize::new(128 * 1024).expect("non-zero")
}
pub(super) fn d_file_mb() -> NonZeroU64 {
    NonZeroU64::new(128).expect("non-zero")
}
pub(super) fn d_open() -> NonZeroUsize {
    NonZeroUsize::new(64).expect("non-zero")
}

/// YAML of a `parquet` sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParquetSinkConfig {
    /// Root folder of the tables.
    pub path: EnvString,
    /// zstd level, 1..=22. Default 3.
    #[serde(default = "d_level")]
    pub compression_level: Level,
    /// Rows per row group. Default 131072.
    #[serde(default = "d_row_group")]
    pub row_group_rows: NonZeroUsize,
    /// A file is closed once it reaches this size, MiB. Default 128.
    #[serde(default = "d_file_mb")]
    pub target_file_mb: NonZeroU64,
    /// Open files across all tables and hours; the oldest hour is closed beyond it. Default 64.
    #[serde(default = "d_open")]
    pub max_open_files: NonZeroUsize,
    /// Tables: name to the streams written into it.
    pub tables: BTreeMap<String, Inputs>,
    /// Tables partitioned by day (`date=…/`) instead of by hour (`date=…/hour=…/`): for small
    /// tables, 24 times fewer files and directories, which is most of what a small table costs
    /// to write. A table keeps its layout for life (readers expect one).
    #[serde(default)]
    pub daily: Vec<String>,
}

impl ParquetSinkConfig {
    /// The defaults, writing under `root`: for the tables the pipeline writes of its own
    /// (operator errors, the energy account, decisions), which no YAML routes.
    pub(crate) fn internal(root: &Path) -> Self {
        Self {
            path: EnvString::literal(root.to_string_lossy()),
            compression_level: d_level(),
            row_group_rows: d_row_group(),
            target_file_mb: d_file_mb(),
            max_open_files: d_open(),
            tables: BTreeMap::new(),
            daily: Vec::new(),
        }
    }
}

pub(super) const HOUR_MS: i64 = 3_600_000;
pub(super) const DAY_MS: i64 = 24 * HOUR_MS;

/// Errors of the Parquet sink (all external: disk or encoder).
#[derive(Debug, thiserror::Error)]
pub enum ParquetSinkError {
    /// A file system operation failed.
    #[error("cannot {action} {path}")]
    Io {
        /// What was attempted.
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The Parquet encoder failed.
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    /// An Arrow kernel failed while splitting a batch.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// A batch has no usable time column.
    #[error(
        "table `{table}` has no `ts`, `received_at`, `window_start` or `window_end` timestamp column to partition by"
    )]
    NoTimeColumn {
        /// The table.
        table: String,
    },
    /// A table on disk has the other partition layout (hourly vs `daily`).
    #[error(
        "table `{table}` under {root} is partitioned by {found}, but the sink is configured to partition it by \
         {configured}: readers expect one layout per table (write to a new table, or move the old one away)"
    )]
    Layout {
        /// The table.
        table: String,
        /// The sink's root.
        root: PathBuf,
        /// The layout on disk.
        found: &'static str,
        /// The configured layout.
        configured: &'static str,
    },
    /// A batch arrived for a table the sink does not have.
    #[error("no table `{0}` in this sink")]
    UnknownTable(String),
}

pub(super) fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ParquetSinkError + 'a {
    move |source| ParquetSinkError::Io { action, path: path.to_owned(), source }
}
