//! The sink's writer: per table and partition (hour or day, source partition) one open file,
//! rolled on size, on the watermark passing an hour, on a barrier or at the end; written hidden,
//! fsynced and renamed.

use std::collections::BTreeMap;
use std::fs::File;

use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray, RecordBatch, UInt32Array};
use arrow::compute::take_record_batch;
use arrow::datatypes::{Int32Type, Int64Type, SchemaRef, TimestampMillisecondType};
use citystream_operators::{Counter, Metrics};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use super::config::{DAY_MS, HOUR_MS, ParquetSinkConfig, ParquetSinkError, io};
use crate::task::TableStats;

/// Writers made by this process (part of each writer's file names).
pub(super) static WRITERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub(super) struct OpenFile {
    pub(super) tmp: PathBuf,
    pub(super) dir: PathBuf,
    /// `Some((origin, partition, first offset))` for position-named files.
    pub(super) position: Option<(String, i32, i64)>,
    pub(super) last_offset: i64,
    pub(super) seq_name: String,
    pub(super) writer: ArrowWriter<File>,
    /// When it was last written to (the writer's write count): beyond `max_open_files` the
    /// least recently written file is closed.
    pub(super) touched: u64,
}

/// A closed file waiting, hidden, for the checkpoint its rows belong to (see [`Staging`]).
pub(super) struct PendingFile {
    pub(super) pending: PathBuf,
    pub(super) dest: PathBuf,
    pub(super) epoch: u64,
}

/// Two-phase publishing, with operator state: a closed file is renamed to a hidden pending
/// name `.{name}.{lineage}.{writer}.e{epoch}.pending` and published (renamed to its name) only
/// once the state manifest of its epoch exists. A process that lost its state to another (a
/// fenced zombie) therefore never publishes a file; after a crash, the next owner publishes
/// the pending files the manifest covers and removes the rest (`names::resolve_pending`).
pub(super) struct Staging {
    /// The state writer id of this process (in pending names).
    pub(super) writer: String,
    pub(super) pending: Vec<PendingFile>,
}

/// Key of an open file: hour (or day, for daily tables), origin, source partition (`-1` for rows
/// without a position).
pub(super) type FileKey = (i64, String, i32);

pub(super) struct Table {
    pub(super) name: String,
    pub(super) schema: SchemaRef,
    pub(super) time_column: usize,
    /// `(src_partition, src_offset)` columns, when the table carries source positions.
    pub(super) position_columns: Option<(usize, usize)>,
    pub(super) open: BTreeMap<FileKey, OpenFile>,
    pub(super) seq: u64,
    /// Several streams feed the table (late events of several stages): one source position
    /// may legitimately come twice, so a second file with the same offset range gets a suffix.
    pub(super) merged: bool,
    /// The partition span: an hour, or a day for `daily` tables.
    pub(super) span_ms: i64,
    pub(super) rows: Counter,
    pub(super) files: Counter,
    pub(super) bytes: Counter,
}

/// The sink's writer (synchronous; the runtime calls it off the async threads).
pub struct ParquetWriter {
    pub(super) root: PathBuf,
    pub(super) props: WriterProperties,
    pub(super) target_bytes: u64,
    pub(super) max_open: usize,
    pub(super) run_id: String,
    pub(super) tables: BTreeMap<String, Table>,
    /// `(lineage, epoch)` with operator state checkpoints: files without source positions are
    /// named after the checkpoint epoch their rows belong to (see `task::state`).
    pub(super) epochs: Option<(String, u64)>,
    /// With operator state: closed files wait, hidden, for their epoch's commit.
    pub(super) staging: Option<Staging>,
    /// Writes so far (the clock of `OpenFile::touched`).
    pub(super) writes: u64,
}

/// Encodings for the columns unique per row, in every table that has them (the sink's files
/// and compaction's): a dictionary of every event id costs hashing and bytes for nothing, and
/// source offsets, rising within a file, take a few bits each delta-encoded. Measured on the
/// embedded default's day: the traffic table 1.34 -> 1.00 MB, the lake 6.99 -> 6.34 MB.
pub(crate) fn unique_columns(
    props: parquet::file::properties::WriterPropertiesBuilder,
) -> parquet::file::properties::WriterPropertiesBuilder {
    props
        .set_column_dictionary_enabled(ColumnPath::from("event_id"), false)
        .set_column_dictionary_enabled(ColumnPath::from("src_offset"), false)
        .set_column_encoding(ColumnPath::from("src_offset"), Encoding::DELTA_BINARY_PACKED)
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
pub(super) fn partition_dir(bucket: i64, span_ms: i64) -> String {
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
            .set_statistics_enabled(EnabledStatistics::Page);
        let props = unique_columns(props).set_created_by(format!("citystream {}", env!("CARGO_PKG_VERSION"))).build();
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
            staging: None,
            writes: 0,
        })
    }

    /// Names files without source positions after the checkpoint epoch their rows belong to,
    /// starting at `epoch`, in state lineage `lineage`.
    pub fn with_epochs(mut self, lineage: &str, epoch: u64) -> Self {
        self.epochs = Some((lineage.to_owned(), epoch));
        self
    }

    /// Publishes closed files only once their epoch is committed ([`publish`](Self::publish)),
    /// naming the pending ones after state writer `writer` (with [`with_epochs`](Self::with_epochs)).
    pub fn with_staging(mut self, writer: &str) -> Self {
        self.staging = Some(Staging { writer: writer.to_owned(), pending: Vec::new() });
        self
    }

    /// Publishes the pending files of epochs up to `committed`; returns how many.
    pub fn publish(&mut self, committed: u64) -> Result<usize, ParquetSinkError> {
        let Some(s) = self.staging.as_mut() else { return Ok(0) };
        if s.pending.iter().all(|p| p.epoch > committed) {
            return Ok(0);
        }
        let (ready, rest): (Vec<_>, Vec<_>) =
            std::mem::take(&mut s.pending).into_iter().partition(|p| p.epoch <= committed);
        s.pending = rest;
        let mut dirs = std::collections::BTreeSet::new();
        for p in &ready {
            super::names::publish_pending(&p.pending, &p.dest)?;
            dirs.extend(p.dest.parent());
        }
        for d in dirs {
            File::open(d).and_then(|d| d.sync_all()).map_err(io("fsync", d))?;
        }
        Ok(ready.len())
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
            self.writes += 1;
            let f = t.open.get_mut(&k).expect("just written");
            f.touched = self.writes;
            if f.writer.bytes_written() + f.writer.in_progress_size() >= self.target_bytes as usize {
                Self::close(t, &k, self.staging.as_mut().zip(self.epochs.as_ref()))?;
            }
        }
        self.enforce_open_limit()
    }

    pub(super) fn write_part(
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
                        // the run id keeps two processes writing one range apart (a zombie and
                        // its replacement): neither touches the other's open file
                        dir.join(format!(".{origin}-p{partition}-o{first:012}.{run_id}.parquet.tmp")),
                        Some((origin.clone(), *partition, first)),
                    )
                }
                None => (dir.join(format!(".{seq_name}.parquet.tmp")), None),
            };
            let file = File::create(&tmp).map_err(io("create", &tmp))?;
            let writer = ArrowWriter::try_new(file, t.schema.clone(), Some(props.clone()))?;
            let touched = 0;
            t.open.insert(key.clone(), OpenFile { tmp, dir, position, last_offset: -1, seq_name, writer, touched });
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

    /// Closes the file at `key`: published at once, or with `staging` (and the current epoch)
    /// left pending until its epoch is committed.
    pub(super) fn close(
        t: &mut Table,
        key: &FileKey,
        staging: Option<(&mut Staging, &(String, u64))>,
    ) -> Result<(), ParquetSinkError> {
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
        let taken = |d: &Path, s: &Option<(&mut Staging, &(String, u64))>| {
            d.exists() || s.as_ref().is_some_and(|(s, _)| s.pending.iter().any(|p| p.dest == d))
        };
        if t.merged && f.position.is_some() {
            let stem = dest.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_owned();
            let mut k = 1;
            while taken(&dest, &staging) {
                dest = f.dir.join(format!("{stem}-{k}.parquet"));
                k += 1;
            }
        }
        if taken(&dest, &staging) {
            return Err(ParquetSinkError::Io {
                action: "rename onto",
                path: dest.clone(),
                source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "a file with this offset range exists"),
            });
        }
        match staging {
            Some((s, (lineage, epoch))) => {
                let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                let pending = f.dir.join(super::names::pending_name(name, lineage, &s.writer, *epoch));
                std::fs::rename(&f.tmp, &pending).map_err(io("rename", &f.tmp))?;
                s.pending.push(PendingFile { pending, dest, epoch: *epoch });
            }
            None => std::fs::rename(&f.tmp, &dest).map_err(io("rename", &f.tmp))?,
        }
        File::open(&f.dir).and_then(|d| d.sync_all()).map_err(io("fsync", &f.dir))?;
        t.files.inc();
        t.bytes.inc_by(bytes);
        Ok(())
    }

    pub(super) fn enforce_open_limit(&mut self) -> Result<(), ParquetSinkError> {
        loop {
            let open: usize = self.tables.values().map(|t| t.open.len()).sum();
            if open <= self.max_open {
                return Ok(());
            }
            // the least recently written: by the time a partition starts, a day's file (which
            // starts before every hour of it) was closed and reopened at every new hour's file
            let oldest = self
                .tables
                .values()
                .flat_map(|t| t.open.iter().map(|(k, f)| (f.touched, k.clone(), t.name.clone())))
                .min();
            let Some((_, key, table)) = oldest else { return Ok(()) };
            let staging = self.staging.as_mut().zip(self.epochs.as_ref());
            Self::close(self.tables.get_mut(&table).expect("exists"), &key, staging)?;
        }
    }

    /// Whether [`on_watermark`](Self::on_watermark) has files to close at `watermark`.
    pub fn closes_at(&self, watermark: i64, grace_ms: i64) -> bool {
        self.tables.values().any(|t| t.open.keys().any(|k| Self::done(k, t.span_ms, grace_ms, watermark)))
    }

    fn done(key: &FileKey, span_ms: i64, grace_ms: i64, watermark: i64) -> bool {
        (key.0 + 1) * span_ms + grace_ms < watermark
    }

    /// Closes files of hours that ended more than `grace_ms` before `watermark`: no more rows
    /// are expected there, except late ones, which open a new file.
    pub fn on_watermark(&mut self, watermark: i64, grace_ms: i64) -> Result<(), ParquetSinkError> {
        for t in self.tables.values_mut() {
            let done: Vec<FileKey> =
                t.open.keys().filter(|k| Self::done(k, t.span_ms, grace_ms, watermark)).cloned().collect();
            for k in done {
                Self::close(t, &k, self.staging.as_mut().zip(self.epochs.as_ref()))?;
            }
        }
        Ok(())
    }

    /// Closes every open file: everything written so far is durable when this returns.
    pub fn flush(&mut self) -> Result<(), ParquetSinkError> {
        for t in self.tables.values_mut() {
            let keys: Vec<FileKey> = t.open.keys().cloned().collect();
            for k in keys {
                Self::close(t, &k, self.staging.as_mut().zip(self.epochs.as_ref()))?;
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
