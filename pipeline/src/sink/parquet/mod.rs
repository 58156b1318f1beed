//! The Parquet sink: one Hive-partitioned table per configured name
//! (`TABLE/date=YYYY-MM-DD/hour=HH/part-….parquet`), zstd-compressed, with page statistics.
//!
//! Files are written under a hidden temporary name (`.….parquet.tmp`, which DataFusion,
//! pyarrow and DuckDB all skip), then closed, fsynced, renamed and the directory fsynced: a
//! reader never sees a partial file, and a file that exists is durable.
//!
//! Rows that carry their source position (`src_partition`, `src_offset`) are written per
//! source partition, and each file is named after what it holds:
//! `{origin}-p{partition}-o{first offset}-{last offset}.parquet`. Files are closed at every
//! checkpoint barrier, so after a crash every file with offsets at or beyond a partition's
//! committed offset is one the replay will write again: [`remove_uncommitted`] deletes those
//! before the partition is consumed, and the output ends identical to an uninterrupted run.
//!
//! With operator state, closed files wait under a hidden pending name until the state manifest
//! of their epoch exists, and are published after it ([`resolve_pending`] finishes the job
//! after a crash): a process that lost its state to another never publishes (see
//! `writer::Staging`). A process killed between the manifest and publishing leaves its
//! committed files pending on its own disk; where that disk is no other process's (a pod's
//! volume), the process publishes them when it starts again ([`publish_committed`]).
//!
//! Files: [`config`] (the YAML and the errors), [`writer`] (tables, open files, rolling and
//! naming them, the layout on disk), [`names`] (parsing file names, and removing what a
//! replay writes again), [`task`] (the sink as the runtime runs it).

mod config;
mod names;
mod task;
#[cfg(test)]
pub(crate) mod tests;
mod writer;

pub use crate::task::TableStats;
pub use config::{Level, ParquetSinkConfig, ParquetSinkError};
pub(crate) use names::{parse_epoch_name, parse_position_name};
pub use names::{publish_committed, remove_after_epoch, remove_uncommitted, resolve_pending};
pub(crate) use task::{ParquetSink, discard_after_restored, publish_stranded};
pub use writer::ParquetWriter;
#[cfg(feature = "sql")]
pub(crate) use writer::layout_on_disk;
pub(crate) use writer::unique_columns;
