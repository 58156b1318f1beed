//! The Parquet sink: one Hive-partitioned table per configured name
//! (`TABLE/date=YYYY-MM-DD/hour=HH/part-….parquet`), zstd-compressed, with page statistics.
//!
//! Files are written under a hidden temporary name (`.part-….parquet.tmp`, which DataFusion,
//! pyarrow and DuckDB all skip), then closed, fsynced, renamed and the directory fsynced: a
//! reader never sees a partial file, and a file that exists is durable.

use std::collections::BTreeMap;
use std::fs::File;
use std::num::{NonZeroU64, NonZeroUsize};
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray, RecordBatch, UInt32Array};
use arrow::compute::take_record_batch;
use arrow::datatypes::{SchemaRef, TimestampMillisecondType};
use citystream_operators::{Counter, Metrics};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use serde::Deserialize;

use crate::config::{EnvString, Inputs};

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
}

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
    #[error("table `{table}` has no `ts` or `received_at` timestamp column to partition by")]
    NoTimeColumn {
        /// The table.
        table: String,
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
    dest: PathBuf,
    writer: ArrowWriter<File>,
}

struct Table {
    name: String,
    schema: SchemaRef,
    time_column: usize,
    open: BTreeMap<i64, OpenFile>,
    seq: u64,
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
}

fn hour_dir(hour: i64) -> String {
    let t = chrono::DateTime::from_timestamp_millis(hour * 3_600_000).unwrap_or_default();
    t.format("date=%Y-%m-%d/hour=%H").to_string()
}

impl ParquetWriter {
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
        for (name, schema) in tables {
            let time_column = schema
                .index_of("ts")
                .or_else(|_| schema.index_of("received_at"))
                .map_err(|_| ParquetSinkError::NoTimeColumn { table: name.clone() })?;
            let labels = [("sink", sink), ("table", name.as_str())];
            out.insert(
                name.clone(),
                Table {
                    name: name.clone(),
                    schema: schema.clone(),
                    time_column,
                    open: BTreeMap::new(),
                    seq: 0,
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
            run_id: format!("{:x}-{:x}", nanos / 1_000_000, std::process::id()),
            tables: out,
        })
    }

    /// Appends `batch` to `table`, split by the hour of its time column.
    pub fn write(&mut self, table: &str, batch: &RecordBatch) -> Result<(), ParquetSinkError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let t = self.tables.get_mut(table).ok_or_else(|| ParquetSinkError::UnknownTable(table.to_owned()))?;
        let times = batch.column(t.time_column).as_primitive::<TimestampMillisecondType>();
        let hours: Vec<i64> = times.values().iter().map(|ms| ms.div_euclid(3_600_000)).collect();
        let first = hours[0];
        let mut parts: Vec<(i64, RecordBatch)> = Vec::new();
        if hours.iter().all(|h| *h == first) {
            parts.push((first, batch.clone()));
        } else {
            let mut groups: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
            for (i, h) in hours.iter().enumerate() {
                groups.entry(*h).or_default().push(i as u32);
            }
            for (h, idx) in groups {
                parts.push((h, take_record_batch(batch, &UInt32Array::from(idx))?));
            }
        }
        debug_assert_eq!(times.null_count(), 0);
        for (hour, part) in parts {
            Self::write_part(&self.root, &self.props, &self.run_id, t, hour, &part)?;
            let f = t.open.get(&hour).expect("just written");
            if f.writer.bytes_written() + f.writer.in_progress_size() >= self.target_bytes as usize {
                Self::close(t, hour)?;
            }
        }
        self.enforce_open_limit()
    }

    fn write_part(
        root: &Path,
        props: &WriterProperties,
        run_id: &str,
        t: &mut Table,
        hour: i64,
        part: &RecordBatch,
    ) -> Result<(), ParquetSinkError> {
        if !t.open.contains_key(&hour) {
            let dir = root.join(&t.name).join(hour_dir(hour));
            std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
            t.seq += 1;
            let name = format!("part-{run_id}-{:06}.parquet", t.seq);
            let tmp = dir.join(format!(".{name}.tmp"));
            let file = File::create(&tmp).map_err(io("create", &tmp))?;
            let writer = ArrowWriter::try_new(file, t.schema.clone(), Some(props.clone()))?;
            t.open.insert(hour, OpenFile { tmp, dest: dir.join(name), writer });
        }
        let f = t.open.get_mut(&hour).expect("inserted above");
        f.writer.write(part)?;
        t.rows.inc_by(part.num_rows() as u64);
        Ok(())
    }

    fn close(t: &mut Table, hour: i64) -> Result<(), ParquetSinkError> {
        let Some(mut f) = t.open.remove(&hour) else { return Ok(()) };
        f.writer.finish()?;
        f.writer.inner().sync_all().map_err(io("fsync", &f.tmp))?;
        let bytes = f.writer.bytes_written() as u64;
        drop(f.writer);
        std::fs::rename(&f.tmp, &f.dest).map_err(io("rename", &f.tmp))?;
        if let Some(dir) = f.dest.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io("fsync", dir))?;
        }
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
            let oldest = self.tables.values().filter_map(|t| t.open.keys().next().map(|h| (*h, t.name.clone()))).min();
            let Some((hour, table)) = oldest else { return Ok(()) };
            Self::close(self.tables.get_mut(&table).expect("exists"), hour)?;
        }
    }

    /// Closes files of hours that ended more than `grace_ms` before `watermark`: no more rows
    /// are expected there, except late ones, which open a new file.
    pub fn on_watermark(&mut self, watermark: i64, grace_ms: i64) -> Result<(), ParquetSinkError> {
        for t in self.tables.values_mut() {
            let done: Vec<i64> =
                t.open.keys().copied().filter(|h| (h + 1) * 3_600_000 + grace_ms < watermark).collect();
            for h in done {
                Self::close(t, h)?;
            }
        }
        Ok(())
    }

    /// Closes every open file: everything written so far is durable when this returns.
    pub fn flush(&mut self) -> Result<(), ParquetSinkError> {
        for t in self.tables.values_mut() {
            let hours: Vec<i64> = t.open.keys().copied().collect();
            for h in hours {
                Self::close(t, h)?;
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

#[cfg(test)]
mod tests {
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

    fn files(root: &Path) -> Vec<String> {
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
        w.write("t", &batch(&[h + 1, h + 3_600_000 + 5, h + 2])).unwrap();
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
    fn watermark_closes_finished_hours_only() {
        let dir = tempfile::tempdir().unwrap();
        let cfg: ParquetSinkConfig =
            serde_saphyr::from_str(&format!("path: {}\ntables: {{t: x}}\n", dir.path().display())).unwrap();
        let tables = BTreeMap::from([("t".to_owned(), schema())]);
        let mut w = ParquetWriter::try_new("lake", &cfg, &tables, &Metrics::new()).unwrap();
        let h = 1_772_409_600_000;
        w.write("t", &batch(&[h, h + 3_600_000])).unwrap();
        w.on_watermark(h + 3_600_000 + 5 * 60_000, 60_000).unwrap();
        let fs = files(dir.path());
        assert!(fs.iter().any(|f| f.contains("hour=00/part-") && f.ends_with(".parquet")), "{fs:?}");
        assert!(fs.iter().any(|f| f.contains("hour=01/.part-")), "{fs:?}");
    }

    #[test]
    fn bad_level_is_a_config_error() {
        let e =
            serde_saphyr::from_str::<ParquetSinkConfig>("path: x\ncompression_level: 30\ntables: {}\n").unwrap_err();
        assert!(e.to_string().contains("zstd compression level 30 is outside 1..=22"), "{e}");
    }
}
