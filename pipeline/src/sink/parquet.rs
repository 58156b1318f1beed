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

use std::collections::BTreeMap;
use std::fs::File;
use std::num::{NonZeroU64, NonZeroUsize};
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray, RecordBatch, UInt32Array};
use arrow::compute::take_record_batch;
use arrow::datatypes::{Int32Type, Int64Type, SchemaRef, TimestampMillisecondType};
use citystream_operators::{Counter, Metrics};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use serde::Deserialize;

use crate::primitives::{EnvString, Inputs};

/// Writers made by this process (part of each writer's file names).
static WRITERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

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

fn d_level() -> Level {
    Level(3)
}
fn d_row_group() -> NonZeroUsize {
    NonZeroUsize::new(128 * 1024).expect("non-zero")
}
fn d_file_mb() -> NonZeroU64 {
    NonZeroU64::new(128).expect("non-zero")
}
fn d_open() -> NonZeroUsize {
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

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

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

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ParquetSinkError + 'a {
    move |source| ParquetSinkError::Io { action, path: path.to_owned(), source }
}

struct OpenFile {
    tmp: PathBuf,
    dir: PathBuf,
    /// `Some((origin, partition, first offset))` for position-named files.
    position: Option<(String, i32, i64)>,
    last_offset: i64,
    seq_name: String,
    writer: ArrowWriter<File>,
}

/// Key of an open file: hour (or day, for daily tables), origin, source partition (`-1` for rows
/// without a position).
type FileKey = (i64, String, i32);

struct Table {
    name: String,
    schema: SchemaRef,
    time_column: usize,
    /// `(src_partition, src_offset)` columns, when the table carries source positions.
    position_columns: Option<(usize, usize)>,
    open: BTreeMap<FileKey, OpenFile>,
    seq: u64,
    /// Several streams feed the table (late events of several stages): one source position
    /// may legitimately come twice, so a second file with the same offset range gets a suffix.
    merged: bool,
    /// The partition span: an hour, or a day for `daily` tables.
    span_ms: i64,
    rows: Counter,
    files: Counter,
    bytes: Counter,
}

/// What a table holds after the sink closed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableStats {
    /// Rows written.
    pub rows: u64,
    /// Files written.
    pub files: u64,
    /// Bytes on disk.
    pub bytes: u64,
}

/// The sink's writer (synchronous; the runtime calls it off the async threads).
pub struct ParquetWriter {
    root: PathBuf,
    props: WriterProperties,
    target_bytes: u64,
    max_open: usize,
    run_id: String,
    tables: BTreeMap<String, Table>,
    /// `(lineage, epoch)` with operator state checkpoints: files without source positions are
    /// named after the checkpoint epoch their rows belong to (see `task::state`).
    epochs: Option<(String, u64)>,
}

/// Whether the table at `dir` is laid out by day (`Some(true)`: Parquet files directly in
/// `date=…`), by hour (`Some(false)`: `date=…/hour=…`), or has no partitions yet (`None`).
pub(crate) fn layout_on_disk(dir: &Path) -> Option<bool> {
    for date in std::fs::read_dir(dir).ok()?.flatten() {
        if !date.file_name().to_string_lossy().starts_with("date=") {
            continue;
        }
        for e in std::fs::read_dir(date.path()).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("hour=") {
                return Some(false);
            }
            if n.ends_with(".parquet") {
                return Some(true);
            }
        }
    }
    None
}

/// The directory of partition `bucket` (hours or days since the epoch, by `span_ms`).
fn partition_dir(bucket: i64, span_ms: i64) -> String {
    let t = chrono::DateTime::from_timestamp_millis(bucket * span_ms).unwrap_or_default();
    if span_ms == DAY_MS {
        t.format("date=%Y-%m-%d").to_string()
    } else {
        t.format("date=%Y-%m-%d/hour=%H").to_string()
    }
}

impl ParquetWriter {
    /// Marks `tables` as fed by several streams (see [`Table::merged`]).
    pub fn with_merged_tables(mut self, tables: impl IntoIterator<Item = String>) -> Self {
        for t in tables {
            if let Some(t) = self.tables.get_mut(&t) {
                t.merged = true;
            }
        }
        self
    }

    /// A writer for `tables` (name to schema) under the sink's `path`.
    pub fn try_new(
        sink: &str,
        cfg: &ParquetSinkConfig,
        tables: &BTreeMap<String, SchemaRef>,
        metrics: &Metrics,
    ) -> Result<Self, ParquetSinkError> {
        let root = PathBuf::from(cfg.path.as_str());
        std::fs::create_dir_all(&root).map_err(io("create", &root))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(cfg.compression_level.0)?))
            .set_max_row_group_row_count(Some(cfg.row_group_rows.get()))
            .set_statistics_enabled(EnabledStatistics::Page)
            .set_created_by(format!("citystream {}", env!("CARGO_PKG_VERSION")))
            .build();
        let mut out = BTreeMap::new();
        for name in tables.keys() {
            let daily = cfg.daily.contains(name);
            if let Some(found) = layout_on_disk(&root.join(name))
                && found != daily
            {
                let l = |d: bool| if d { "day" } else { "hour" };
                return Err(ParquetSinkError::Layout {
                    table: name.clone(),
                    root: root.clone(),
                    found: l(found),
                    configured: l(daily),
                });
            }
        }
        for (name, schema) in tables {
            let time_column = schema
                .index_of("ts")
                .or_else(|_| schema.index_of("received_at"))
                .or_else(|_| schema.index_of("window_start"))
                .or_else(|_| schema.index_of("window_end"))
                .map_err(|_| ParquetSinkError::NoTimeColumn { table: name.clone() })?;
            let labels = [("sink", sink), ("table", name.as_str())];
            let position_columns = match (schema.index_of("src_partition"), schema.index_of("src_offset")) {
                (Ok(p), Ok(o)) => Some((p, o)),
                _ => None,
            };
            out.insert(
                name.clone(),
                Table {
                    name: name.clone(),
                    schema: schema.clone(),
                    time_column,
                    position_columns,
                    open: BTreeMap::new(),
                    seq: 0,
                    merged: false,
                    span_ms: if cfg.daily.contains(name) { DAY_MS } else { HOUR_MS },
                    rows: metrics.counter("citystream_sink_rows_total", "Rows written to a sink table.", &labels),
                    files: metrics.counter("citystream_sink_files_total", "Files committed to a sink table.", &labels),
                    bytes: metrics.counter("citystream_sink_bytes_total", "Bytes committed to a sink table.", &labels),
                },
            );
        }
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        Ok(Self {
            root,
            props,
            target_bytes: cfg.target_file_mb.get() * 1024 * 1024,
            max_open: cfg.max_open_files.get(),
            // writers of one process may share a table (the control center's decision events
            // land in `alerts` too): a process-wide counter keeps their file names apart
            run_id: format!(
                "{:x}-{:x}-{}",
                nanos / 1_000_000,
                std::process::id(),
                WRITERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ),
            tables: out,
            epochs: None,
        })
    }

    /// Names files without source positions after the checkpoint epoch their rows belong to,
    /// starting at `epoch`, in state lineage `lineage`.
    pub fn with_epochs(mut self, lineage: &str, epoch: u64) -> Self {
        self.epochs = Some((lineage.to_owned(), epoch));
        self
    }

    /// Names the files of `tables` after their epoch even where the rows carry source
    /// positions (with [`with_epochs`](Self::with_epochs)).
    pub fn without_positions(mut self, tables: impl IntoIterator<Item = String>) -> Self {
        for t in tables {
            if let Some(t) = self.tables.get_mut(&t) {
                t.position_columns = None;
            }
        }
        self
    }

    /// Rows written from now on belong to checkpoint `epoch` (call after [`flush`](Self::flush)
    /// at a barrier).
    pub fn set_epoch(&mut self, epoch: u64) {
        if let Some((_, e)) = self.epochs.as_mut() {
            *e = epoch;
        }
    }

    /// Appends `batch` to `table`, split by the hour of its time column and by source partition.
    /// `origin` names the source stream the rows came from (the file-name prefix).
    pub fn write(&mut self, table: &str, origin: &str, batch: &RecordBatch) -> Result<(), ParquetSinkError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let t = self.tables.get_mut(table).ok_or_else(|| ParquetSinkError::UnknownTable(table.to_owned()))?;
        let times = batch.column(t.time_column).as_primitive::<TimestampMillisecondType>();
        debug_assert_eq!(times.null_count(), 0);
        let partitions = t.position_columns.map(|(p, _)| batch.column(p).as_primitive::<Int32Type>().values().clone());
        let span = t.span_ms;
        let key = |i: usize| (times.value(i).div_euclid(span), partitions.as_ref().map_or(-1, |p| p[i]));
        let first = key(0);
        let mut parts: Vec<((i64, i32), RecordBatch)> = Vec::new();
        if (1..batch.num_rows()).all(|i| key(i) == first) {
            parts.push((first, batch.clone()));
        } else {
            let mut groups: BTreeMap<(i64, i32), Vec<u32>> = BTreeMap::new();
            for i in 0..batch.num_rows() {
                groups.entry(key(i)).or_default().push(i as u32);
            }
            for (k, idx) in groups {
                parts.push((k, take_record_batch(batch, &UInt32Array::from(idx))?));
            }
        }
        for ((hour, partition), part) in parts {
            let k: FileKey = (hour, origin.to_owned(), partition);
            Self::write_part(&self.root, &self.props, &self.run_id, self.epochs.as_ref(), t, &k, &part)?;
            let f = t.open.get(&k).expect("just written");
            if f.writer.bytes_written() + f.writer.in_progress_size() >= self.target_bytes as usize {
                Self::close(t, &k)?;
            }
        }
        self.enforce_open_limit()
    }

    fn write_part(
        root: &Path,
        props: &WriterProperties,
        run_id: &str,
        epochs: Option<&(String, u64)>,
        t: &mut Table,
        key: &FileKey,
        part: &RecordBatch,
    ) -> Result<(), ParquetSinkError> {
        let offsets = t.position_columns.map(|(_, o)| part.column(o).as_primitive::<Int64Type>());
        if !t.open.contains_key(key) {
            let (hour, origin, partition) = key;
            let dir = root.join(&t.name).join(partition_dir(*hour, t.span_ms));
            std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
            t.seq += 1;
            let seq_name = match epochs {
                Some((lineage, epoch)) => format!("part-{lineage}-e{epoch:012}-{run_id}-{:06}", t.seq),
                None => format!("part-{run_id}-{:06}", t.seq),
            };
            let (tmp, position) = match offsets {
                Some(o) => {
                    let first = arrow::compute::min(o).unwrap_or(0);
                    (
                        dir.join(format!(".{origin}-p{partition}-o{first:012}.parquet.tmp")),
                        Some((origin.clone(), *partition, first)),
                    )
                }
                None => (dir.join(format!(".{seq_name}.parquet.tmp")), None),
            };
            let file = File::create(&tmp).map_err(io("create", &tmp))?;
            let writer = ArrowWriter::try_new(file, t.schema.clone(), Some(props.clone()))?;
            t.open.insert(key.clone(), OpenFile { tmp, dir, position, last_offset: -1, seq_name, writer });
        }
        let f = t.open.get_mut(key).expect("inserted above");
        f.writer.write(part)?;
        if let Some(o) = offsets {
            f.last_offset = f.last_offset.max(arrow::compute::max(o).unwrap_or(-1));
            // later parts may hold older offsets (out-of-order hours): the name covers them all
            if let (Some((_, _, first)), Some(min)) = (f.position.as_mut(), arrow::compute::min(o)) {
                *first = (*first).min(min);
            }
        }
        t.rows.inc_by(part.num_rows() as u64);
        Ok(())
    }

    fn close(t: &mut Table, key: &FileKey) -> Result<(), ParquetSinkError> {
        let Some(mut f) = t.open.remove(key) else { return Ok(()) };
        f.writer.finish()?;
        f.writer.inner().sync_all().map_err(io("fsync", &f.tmp))?;
        let bytes = f.writer.bytes_written() as u64;
        drop(f.writer);
        let dest = match &f.position {
            Some((origin, partition, first)) => {
                f.dir.join(format!("{origin}-p{partition}-o{first:012}-{:012}.parquet", f.last_offset))
            }
            None => f.dir.join(format!("{}.parquet", f.seq_name)),
        };
        // Never replace a finished file. In a table fed by several streams the same rows may
        // come from two of them (an event late for two windows): the second file is suffixed,
        // which the position parser ignores. Elsewhere two files claiming one offset range is
        // a bug upstream.
        let mut dest = dest;
        if t.merged && f.position.is_some() {
            let stem = dest.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_owned();
            let mut k = 1;
            while dest.exists() {
                dest = f.dir.join(format!("{stem}-{k}.parquet"));
                k += 1;
            }
        }
        if dest.exists() {
            return Err(ParquetSinkError::Io {
                action: "rename onto",
                path: dest.clone(),
                source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "a file with this offset range exists"),
            });
        }
        std::fs::rename(&f.tmp, &dest).map_err(io("rename", &f.tmp))?;
        File::open(&f.dir).and_then(|d| d.sync_all()).map_err(io("fsync", &f.dir))?;
        t.files.inc();
        t.bytes.inc_by(bytes);
        Ok(())
    }

    fn enforce_open_limit(&mut self) -> Result<(), ParquetSinkError> {
        loop {
            let open: usize = self.tables.values().map(|t| t.open.len()).sum();
            if open <= self.max_open {
                return Ok(());
            }
            // by the time a partition starts (days and hours compared as times)
            let oldest = self
                .tables
                .values()
                .filter_map(|t| t.open.keys().next().map(|k| (k.0 * t.span_ms, k.clone(), t.name.clone())))
                .min();
            let Some((_, key, table)) = oldest else { return Ok(()) };
            Self::close(self.tables.get_mut(&table).expect("exists"), &key)?;
        }
    }

    /// Closes files of hours that ended more than `grace_ms` before `watermark`: no more rows
    /// are expected there, except late ones, which open a new file.
    pub fn on_watermark(&mut self, watermark: i64, grace_ms: i64) -> Result<(), ParquetSinkError> {
        for t in self.tables.values_mut() {
            let done: Vec<FileKey> =
                t.open.keys().filter(|k| (k.0 + 1) * t.span_ms + grace_ms < watermark).cloned().collect();
            for k in done {
                Self::close(t, &k)?;
            }
        }
        Ok(())
    }

    /// Closes every open file: everything written so far is durable when this returns.
    pub fn flush(&mut self) -> Result<(), ParquetSinkError> {
        for t in self.tables.values_mut() {
            let keys: Vec<FileKey> = t.open.keys().cloned().collect();
            for k in keys {
                Self::close(t, &k)?;
            }
        }
        Ok(())
    }

    /// Per-table totals.
    pub fn stats(&self) -> BTreeMap<String, TableStats> {
        self.tables
            .iter()
            .map(|(n, t)| (n.clone(), TableStats { rows: t.rows.get(), files: t.files.get(), bytes: t.bytes.get() }))
            .collect()
    }
}

/// Parses `{origin}-p{partition}-o{first}-{last}.parquet` (or the temporary
/// `.{origin}-p{partition}-o{first}.parquet.tmp`) into `(origin, partition, first)`.
pub(crate) fn parse_position_name(name: &str) -> Option<(&str, i32, i64)> {
    let stem = name
        .strip_suffix(".parquet")
        .or_else(|| name.strip_prefix('.').and_then(|n| n.strip_suffix(".parquet.tmp")))?;
    let (head, rest) = stem.rsplit_once("-o").map(|(h, r)| (h, r.split('-').next().unwrap_or(r)))?;
    let (origin, partition) = head.rsplit_once("-p")?;
    Some((origin, partition.parse().ok()?, rest.parse().ok()?))
}

/// Parses `part-{lineage}-e{epoch}-….parquet` (or its hidden temporary name) into
/// `(lineage, epoch)`.
pub(crate) fn parse_epoch_name(name: &str) -> Option<(&str, u64)> {
    let stem = name
        .strip_suffix(".parquet")
        .or_else(|| name.strip_prefix('.').and_then(|n| n.strip_suffix(".parquet.tmp")))?;
    let (lineage, rest) = stem.strip_prefix("part-")?.split_once("-e")?;
    let epoch = rest.get(..12)?;
    (rest.as_bytes().get(12) == Some(&b'-') && lineage.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some(())
        .and_then(|()| Some((lineage, epoch.parse().ok()?)))
}

/// Removes every file under `root` whose name `remove` picks, and fsyncs each directory it
/// removed something from. Errors are collected: every file is visited.
fn remove_files_where(root: &Path, mut remove: impl FnMut(&str) -> bool) -> std::io::Result<usize> {
    let mut removed = 0;
    let mut first_error: Option<std::io::Error> = None;
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                first_error.get_or_insert(std::io::Error::new(e.kind(), format!("{}: {e}", dir.display())));
                continue;
            }
        };
        let mut removed_here = false;
        for e in rd {
            let e = match e {
                Ok(e) => e,
                Err(e) => {
                    first_error.get_or_insert(e);
                    continue;
                }
            };
            let path = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
                continue;
            }
            if !remove(&e.file_name().to_string_lossy()) {
                continue;
            }
            // keep going after a failure: remove everything we can, then report
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    removed += 1;
                    removed_here = true;
                }
                Err(e) => {
                    first_error.get_or_insert(std::io::Error::new(e.kind(), format!("{}: {e}", path.display())));
                }
            }
        }
        // make the removals durable before the replay writes their rows again
        if removed_here && let Err(e) = File::open(&dir).and_then(|d| d.sync_all()) {
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(removed),
    }
}

/// Deletes, under a sink's `root`, the files of state lineage `lineage` written for epochs after
/// `epoch` (their rows come again when the stages replay from the state of `epoch`). Returns
/// how many files were removed.
pub fn remove_after_epoch(root: &Path, lineage: &str, epoch: u64) -> std::io::Result<usize> {
    remove_files_where(root, |name| parse_epoch_name(name).is_some_and(|(l, e)| l == lineage && e > epoch))
}

/// Deletes, under a sink's `root`, every file of `origin`'s `partition` whose first offset is at
/// or beyond `committed` (and every temporary file of it): rows the source will deliver again.
/// Returns how many files were removed.
pub fn remove_uncommitted(root: &Path, origin: &str, partition: i32, committed: i64) -> std::io::Result<usize> {
    remove_files_where(root, |name| {
        parse_position_name(name).is_some_and(|(o, p, first)| {
            o == origin && p == partition && (name.ends_with(".tmp") || first >= committed)
        })
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use arrow::array::{Int32Array, TimestampMillisecondArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("ts", citystream_schemas::timestamp_type(), false),
            Field::new("v", DataType::Int32, false),
        ]))
    }

    fn batch(ts: &[i64]) -> RecordBatch {
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(TimestampMillisecondArray::from(ts.to_vec()).with_timezone("UTC")),
                Arc::new(Int32Array::from((0..ts.len() as i32).collect::<Vec<_>>())),
            ],
        )
        .unwrap()
    }

    /// Every file under `root`, relative to it, sorted.
    pub(crate) fn files(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_owned()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() { stack.push(p) } else { out.push(p.strip_prefix(root).unwrap().display().to_string()) }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn splits_by_hour_and_commits_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let cfg: ParquetSinkConfig =
            serde_saphyr::from_str(&format!("path: {}\ntables: {{t: x}}\n", dir.path().display())).unwrap();
        let tables = BTreeMap::from([("t".to_owned(), schema())]);
        let m = Metrics::new();
        let mut w = ParquetWriter::try_new("lake", &cfg, &tables, &m).unwrap();
        let h = 1_772_409_600_000; // 2026-03-02T00:00Z
        w.write("t", "sim.x", &batch(&[h + 1, h + 3_600_000 + 5, h + 2])).unwrap();
        let before = files(dir.path());
        assert_eq!(before.len(), 2);
        assert!(before.iter().all(|f| f.ends_with(".parquet.tmp") && f.contains("/.part-")), "{before:?}");
        w.flush().unwrap();
        let after = files(dir.path());
        assert_eq!(after.len(), 2);
        assert!(after[0].starts_with("t/date=2026-03-02/hour=00/part-") && after[0].ends_with(".parquet"), "{after:?}");
        assert!(after[1].starts_with("t/date=2026-03-02/hour=01/part-"), "{after:?}");
        assert_eq!(w.stats()["t"].rows, 3);
        assert_eq!(w.stats()["t"].files, 2);
        // the files are complete Parquet with zstd
        let f = File::open(dir.path().join(&after[0])).unwrap();
        let reader = parquet::file::reader::SerializedFileReader::new(f).unwrap();
        use parquet::file::reader::FileReader;
        let md = reader.metadata();
        assert_eq!(md.file_metadata().num_rows(), 2);
        assert!(matches!(md.row_group(0).column(0).compression(), Compression::ZSTD(_)));
        assert!(md.row_group(0).column(1).statistics().is_some());
    }

    #[test]
    fn daily_tables_keep_a_day_in_one_partition_and_close_it_after_the_day() {
        let dir = tempfile::tempdir().unwrap();
        let cfg: ParquetSinkConfig =
            serde_saphyr::from_str(&format!("path: {}\ntables: {{t: x, h: z}}\ndaily: [t]\n", dir.path().display()))
                .unwrap();
        let tables = BTreeMap::from([("t".to_owned(), schema()), ("h".to_owned(), schema())]);
        let mut w = ParquetWriter::try_new("lake", &cfg, &tables, &Metrics::new()).unwrap();
        let d = 1_772_409_600_000; // 2026-03-02T00:00Z
        let rows: Vec<i64> = (0..24).map(|h| d + h * HOUR_MS + 7).collect();
        w.write("t", "sim.x", &batch(&rows)).unwrap();
        w.write("h", "sim.x", &batch(&rows)).unwrap();
        // the hourly table's finished hours close as the watermark passes them; the day stays open
        w.on_watermark(d + 20 * HOUR_MS, 10 * 60_000).unwrap();
        let closed = |p: &str| files(dir.path()).iter().filter(|f| f.starts_with(p) && f.ends_with(".parquet")).count();
        assert_eq!((closed("t/"), closed("h/")), (0, 19));
        w.on_watermark(d + DAY_MS + 11 * 60_000, 10 * 60_000).unwrap();
        assert_eq!((closed("t/"), closed("h/")), (1, 24));
        let daily: Vec<String> = files(dir.path()).into_iter().filter(|f| f.starts_with("t/")).collect();
        assert!(daily[0].starts_with("t/date=2026-03-02/part-"), "{daily:?}");
        // a table keeps its layout: switching either way is refused with a clear error
        let swapped: ParquetSinkConfig =
            serde_saphyr::from_str(&format!("path: {}\ntables: {{t: x, h: z}}\ndaily: [h]\n", dir.path().display()))
                .unwrap();
        let e = ParquetWriter::try_new("lake", &swapped, &tables, &Metrics::new()).err().unwrap().to_string();
        assert!(e.contains("table `h`") && e.contains("partitioned by hour") && e.contains("by day"), "{e}");
    }

    #[test]
    fn watermark_closes_finished_hours_only() {
        let dir = tempfile::tempdir().unwrap();
        let cfg: ParquetSinkConfig =
            serde_saphyr::from_str(&format!("path: {}\ntables: {{t: x}}\n", dir.path().display())).unwrap();
        let tables = BTreeMap::from([("t".to_owned(), schema())]);
        let mut w = ParquetWriter::try_new("lake", &cfg, &tables, &Metrics::new()).unwrap();
        let h = 1_772_409_600_000;
        w.write("t", "sim.x", &batch(&[h, h + 3_600_000])).unwrap();
        w.on_watermark(h + 3_600_000 + 5 * 60_000, 60_000).unwrap();
        let fs = files(dir.path());
        assert!(fs.iter().any(|f| f.contains("hour=00/part-") && f.ends_with(".parquet")), "{fs:?}");
        assert!(fs.iter().any(|f| f.contains("hour=01/.part-")), "{fs:?}");
    }

    /// A batch with `ts`, `src_partition` and `src_offset` columns.
    pub(crate) fn positioned(ts: &[i64], partitions: &[i32], offsets: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("ts", citystream_schemas::timestamp_type(), false),
            Field::new("src_partition", DataType::Int32, false),
            Field::new("src_offset", DataType::Int64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(TimestampMillisecondArray::from(ts.to_vec()).with_timezone("UTC")),
                Arc::new(Int32Array::from(partitions.to_vec())),
                Arc::new(arrow::array::Int64Array::from(offsets.to_vec())),
            ],
        )
        .unwrap()
    }

    #[test]
    fn files_are_named_by_partition_and_offsets_and_uncommitted_ones_removed() {
        let dir = tempfile::tempdir().unwrap();
        let cfg: ParquetSinkConfig =
            serde_saphyr::from_str(&format!("path: {}\ntables: {{t: x}}\n", dir.path().display())).unwrap();
        let h = 1_772_409_600_000;
        let b = positioned(&[h, h, h, h], &[0, 1, 0, 1], &[10, 20, 11, 21]);
        let tables = BTreeMap::from([("t".to_owned(), b.schema())]);
        let mut w = ParquetWriter::try_new("lake", &cfg, &tables, &Metrics::new()).unwrap();
        w.write("t", "city.traffic", &b).unwrap();
        w.flush().unwrap();
        w.write("t", "city.traffic", &positioned(&[h, h], &[0, 0], &[12, 13])).unwrap();
        w.flush().unwrap();
        w.write("t", "city.traffic", &positioned(&[h], &[0], &[14])).unwrap();
        let fs = files(dir.path());
        assert_eq!(
            fs,
            [
                "t/date=2026-03-02/hour=00/.city.traffic-p0-o000000000014.parquet.tmp",
                "t/date=2026-03-02/hour=00/city.traffic-p0-o000000000010-000000000011.parquet",
                "t/date=2026-03-02/hour=00/city.traffic-p0-o000000000012-000000000013.parquet",
                "t/date=2026-03-02/hour=00/city.traffic-p1-o000000000020-000000000021.parquet",
            ]
        );
        // partition 0 committed up to offset 12: the file starting at 12 and the open one go
        assert_eq!(remove_uncommitted(dir.path(), "city.traffic", 0, 12).unwrap(), 2);
        assert_eq!(remove_uncommitted(dir.path(), "city.camera", 1, 0).unwrap(), 0, "other origins are kept");
        let fs = files(dir.path());
        assert_eq!(fs.len(), 2);
        assert!(fs[0].ends_with("p0-o000000000010-000000000011.parquet") && fs[1].contains("-p1-"), "{fs:?}");
    }

    #[test]
    fn a_file_is_named_after_the_lowest_offset_of_all_its_parts_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let cfg: ParquetSinkConfig =
            serde_saphyr::from_str(&format!("path: {}\ntables: {{t: x}}\n", dir.path().display())).unwrap();
        let h = 1_772_409_600_000;
        let b = positioned(&[h, h], &[0, 0], &[30, 31]);
        let tables = BTreeMap::from([("t".to_owned(), b.schema())]);
        let mut w = ParquetWriter::try_new("lake", &cfg, &tables, &Metrics::new()).unwrap();
        w.write("t", "city.traffic", &b).unwrap();
        // an older offset of the same hour arrives later (it was held in another hour's batch)
        w.write("t", "city.traffic", &positioned(&[h], &[0], &[25])).unwrap();
        w.flush().unwrap();
        assert_eq!(files(dir.path()), ["t/date=2026-03-02/hour=00/city.traffic-p0-o000000000025-000000000031.parquet"]);
        // the same range again (a replay that skipped cleanup) is refused, not overwritten
        w.write("t", "city.traffic", &positioned(&[h, h], &[0, 0], &[25, 31])).unwrap();
        let e = w.flush().unwrap_err();
        assert!(e.to_string().contains("rename onto"), "{e}");
    }

    #[test]
    fn a_table_fed_by_several_streams_suffixes_a_repeated_offset_range() {
        // the same late event reaches `traffic_late` from two windows, in two files
        let dir = tempfile::tempdir().unwrap();
        let cfg: ParquetSinkConfig =
            serde_saphyr::from_str(&format!("path: {}\ntables: {{t: x}}\n", dir.path().display())).unwrap();
        let h = 1_772_409_600_000;
        let b = positioned(&[h, h], &[0, 0], &[25, 31]);
        let tables = BTreeMap::from([("t".to_owned(), b.schema())]);
        let mut w =
            ParquetWriter::try_new("lake", &cfg, &tables, &Metrics::new()).unwrap().with_merged_tables(["t".into()]);
        for _ in 0..3 {
            w.write("t", "city.traffic", &b).unwrap();
            w.flush().unwrap();
        }
        let fs = files(dir.path());
        let stem = "t/date=2026-03-02/hour=00/city.traffic-p0-o000000000025-000000000031";
        assert_eq!(fs, [format!("{stem}-1.parquet"), format!("{stem}-2.parquet"), format!("{stem}.parquet")]);
        // the suffix does not hide a file from recovery
        assert_eq!(
            parse_position_name("city.traffic-p0-o000000000025-000000000031-2.parquet"),
            Some(("city.traffic", 0, 25))
        );
    }

    #[test]
    fn files_without_positions_carry_their_epoch_and_later_epochs_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let cfg: ParquetSinkConfig =
            serde_saphyr::from_str(&format!("path: {}\ntables: {{t: x}}\n", dir.path().display())).unwrap();
        let tables = BTreeMap::from([("t".to_owned(), schema())]);
        let mut w = ParquetWriter::try_new("lake", &cfg, &tables, &Metrics::new()).unwrap().with_epochs("ab12", 3);
        w.write("t", "x", &batch(&[1_000])).unwrap();
        w.flush().unwrap();
        w.set_epoch(4);
        w.write("t", "x", &batch(&[2_000])).unwrap();
        w.flush().unwrap();
        w.set_epoch(5);
        w.write("t", "x", &batch(&[3_000])).unwrap(); // open at the crash: a temporary file
        let mut other = ParquetWriter::try_new("lake", &cfg, &tables, &Metrics::new()).unwrap().with_epochs("cd34", 9);
        other.write("t", "x", &batch(&[4_000])).unwrap();
        other.flush().unwrap();
        let names = files(dir.path());
        let base = |n: &str| n.rsplit('/').next().unwrap().to_owned();
        let epochs: Vec<_> = names
            .iter()
            .map(|n| base(n))
            .filter_map(|n| parse_epoch_name(&n).map(|(l, e)| (l.to_owned(), e)))
            .collect();
        let want = [("ab12", 5), ("ab12", 3), ("ab12", 4), ("cd34", 9)].map(|(l, e)| (l.to_owned(), e));
        assert_eq!(epochs, want, "{names:?}");
        // recovery to epoch 3 of lineage ab12: epoch 4 and the open file go, the other lineage stays
        assert_eq!(remove_after_epoch(dir.path(), "ab12", 3).unwrap(), 2);
        let left: Vec<_> = files(dir.path())
            .iter()
            .map(|n| base(n))
            .filter_map(|n| parse_epoch_name(&n).map(|(l, e)| (l.to_owned(), e)))
            .collect();
        assert_eq!(left, [("ab12".to_owned(), 3), ("cd34".to_owned(), 9)]);
        assert_eq!(parse_epoch_name("part-18c-1f-000001.parquet"), None, "files of runs without state");
    }

    #[test]
    fn bad_level_is_a_config_error() {
        let e =
            serde_saphyr::from_str::<ParquetSinkConfig>("path: x\ncompression_level: 30\ntables: {}\n").unwrap_err();
        assert!(e.to_string().contains("zstd compression level 30 is outside 1..=22"), "{e}");
    }
}
