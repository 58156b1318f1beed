//! Training exports: copies settled partitions of chosen lake tables (`traffic_minutes`,
//! `feedback`, `alerts`, …) into a separate tree that `models/train` reads (`feedback.py`,
//! `train.py --feedback-lake`), as deferrable work the carbon policy runs in low-carbon hours.
//!
//! Per table and partition directory (any directory holding Parquet files, e.g.
//! `date=…/hour=…`), in one run:
//! - skipped while any of its files is younger than `min_age` (a sink may still be writing);
//! - skipped when its row count (from the files' footers) equals the count recorded at its last
//!   export (compaction rewrites files but keeps rows, so it causes no re-export);
//! - otherwise all its rows are written to `TO/TABLE/PARTITION/export.parquet` (zstd) through a
//!   hidden temporary file, fsync, rename, fsync of the directory: a reader sees the old export
//!   or the new one, never a mix, and a partition has exactly one export file, so rows are never
//!   duplicated. Then the manifest (`TO/manifest.json`, written the same way) records the count.
//!
//! A partition that grows after its export (very late rows) is exported again in full.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::Serialize;

/// What one export run did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ExportReport {
    /// Partitions written (new or grown).
    pub partitions: usize,
    /// Rows written.
    pub rows: u64,
    /// Partitions left for a later run (files too young, or a file vanished under compaction).
    pub skipped: usize,
}

fn io(what: &str, p: &Path, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("{what} {}: {e}", p.display()))
}

/// When the last export run into `to` finished (UTC ms), as recorded by [`record_run`].
pub fn last_run(to: &Path) -> Option<i64> {
    let body = std::fs::read(to.join("last_run.json")).ok()?;
    serde_json::from_slice::<serde_json::Value>(&body).ok()?["finished_ms"].as_i64()
}

/// Records that an export run into `to` finished at `at_ms`, so that the schedule survives
/// restarts.
pub fn record_run(to: &Path, at_ms: i64) -> std::io::Result<()> {
    std::fs::create_dir_all(to).map_err(|e| io("creating", to, e))?;
    super::write_atomic(&to.join("last_run.json"), serde_json::json!({ "finished_ms": at_ms }).to_string().as_bytes())
}

/// Exports the settled partitions of `tables` under the lake `root` into `to`.
pub fn export(root: &Path, tables: &[String], to: &Path, min_age: Duration) -> std::io::Result<ExportReport> {
    std::fs::create_dir_all(to).map_err(|e| io("creating", to, e))?;
    let manifest_path = to.join("manifest.json");
    let mut manifest: BTreeMap<String, u64> = match std::fs::read(&manifest_path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| io("reading", &manifest_path, e))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => return Err(io("reading", &manifest_path, e)),
    };
    let mut report = ExportReport::default();
    let now = SystemTime::now();
    for table in tables {
        let src = root.join(table);
        for (dir, files) in super::parquet_files_by_dir(&src) {
            let rel = dir.strip_prefix(root).expect("under the root").to_owned();
            let key = rel.to_string_lossy().into_owned();
            let young = files.iter().any(|f| {
                std::fs::metadata(f)
                    .and_then(|m| m.modified())
                    .map(|t| now.duration_since(t).unwrap_or_default() < min_age)
                    .unwrap_or(true)
            });
            if young {
                report.skipped += 1;
                continue;
            }
            match export_partition(&files, &to.join(&rel), manifest.get(&key).copied()) {
                Ok(Some(rows)) => {
                    manifest.insert(key, rows);
                    super::write_atomic(
                        &manifest_path,
                        &serde_json::to_vec_pretty(&manifest).map_err(std::io::Error::other)?,
                    )?;
                    report.partitions += 1;
                    report.rows += rows;
                }
                Ok(None) => {}
                // a file compacted away between the listing and the read: next run
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => report.skipped += 1,
                // one bad partition (files of different schemas, say) must not stop the rest
                Err(e) => {
                    tracing::warn!(partition = %key, "training export skipped a partition: {e}");
                    report.skipped += 1;
                }
            }
        }
    }
    Ok(report)
}

/// Writes the partition's rows unless their count is `done`; returns the rows written.
fn export_partition(files: &[PathBuf], dest: &Path, done: Option<u64>) -> std::io::Result<Option<u64>> {
    let mut rows = 0u64;
    let mut readers = Vec::new();
    for f in files {
        let file = File::open(f)?;
        let b = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| io("reading", f, e))?;
        rows += b.metadata().file_metadata().num_rows() as u64;
        readers.push((f.clone(), b));
    }
    if done == Some(rows) {
        return Ok(None);
    }
    std::fs::create_dir_all(dest).map_err(|e| io("creating", dest, e))?;
    let (tmp, out) = (dest.join(".export.parquet.tmp"), dest.join("export.parquet"));
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).expect("a valid level")))
        .build();
    let mut writer: Option<ArrowWriter<File>> = None;
    for (f, b) in readers {
        for batch in b.build().map_err(|e| io("reading", &f, e))? {
            let batch = batch.map_err(|e| io("reading", &f, e))?;
            if writer.is_none() {
                let file = File::create(&tmp).map_err(|e| io("creating", &tmp, e))?;
                writer = Some(
                    ArrowWriter::try_new(file, batch.schema(), Some(props.clone()))
                        .map_err(|e| io("writing", &tmp, e))?,
                );
            }
            writer.as_mut().expect("created").write(&batch).map_err(|e| io("writing", &tmp, e))?;
        }
    }
    let Some(w) = writer else { return Ok(Some(0)) };
    let file = w.into_inner().map_err(|e| io("writing", &tmp, e))?;
    file.sync_all()?;
    std::fs::rename(&tmp, &out)?;
    File::open(dest)?.sync_all()?;
    Ok(Some(rows))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn write(dir: &Path, name: &str, values: &[i64]) {
        std::fs::create_dir_all(dir).unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let b = RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(values.to_vec()))]).unwrap();
        let mut w = ArrowWriter::try_new(File::create(dir.join(name)).unwrap(), schema, None).unwrap();
        w.write(&b).unwrap();
        w.close().unwrap();
    }

    fn read(p: &Path) -> Vec<i64> {
        let r = ParquetRecordBatchReaderBuilder::try_new(File::open(p).unwrap()).unwrap().build().unwrap();
        let mut v: Vec<i64> = r
            .flat_map(|b| {
                let b = b.unwrap();
                b.column(0).as_any().downcast_ref::<Int64Array>().unwrap().values().to_vec()
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn settled_partitions_are_exported_once_and_again_in_full_when_they_grow() {
        let lake = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        let (h0, h1) = (lake.path().join("t/date=2026-03-02/hour=00"), lake.path().join("t/date=2026-03-02/hour=01"));
        write(&h0, "part-a.parquet", &[1, 2]);
        write(&h0, "part-b.parquet", &[3]);
        write(&h1, "part-a.parquet", &[10]);
        write(&lake.path().join("other/date=2026-03-02/hour=00"), "x.parquet", &[99]);
        write(&h0, ".part-c.parquet.tmp", &[7]); // a file being written: not a table file yet
        let tables = vec!["t".to_owned()];
        // everything is too young at first
        let r = export(lake.path(), &tables, to.path(), Duration::from_secs(3600)).unwrap();
        assert_eq!((r.partitions, r.skipped), (0, 2));
        let r = export(lake.path(), &tables, to.path(), Duration::ZERO).unwrap();
        assert_eq!((r.partitions, r.rows), (2, 4));
        let out0 = to.path().join("t/date=2026-03-02/hour=00/export.parquet");
        assert_eq!(read(&out0), [1, 2, 3]);
        assert!(!to.path().join("other").exists(), "only the chosen tables");
        // nothing new: nothing written; compaction (same rows, other files) changes nothing
        assert_eq!(export(lake.path(), &tables, to.path(), Duration::ZERO).unwrap().partitions, 0);
        std::fs::remove_file(h0.join("part-a.parquet")).unwrap();
        std::fs::remove_file(h0.join("part-b.parquet")).unwrap();
        write(&h0, "merged.parquet", &[1, 2, 3]);
        assert_eq!(export(lake.path(), &tables, to.path(), Duration::ZERO).unwrap().partitions, 0);
        // a late row: the partition is exported again, in full, replacing the old export
        write(&h0, "late.parquet", &[4]);
        let r = export(lake.path(), &tables, to.path(), Duration::ZERO).unwrap();
        assert_eq!((r.partitions, r.rows), (1, 4));
        assert_eq!(read(&out0), [1, 2, 3, 4]);
        let files: Vec<_> =
            std::fs::read_dir(out0.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(files, ["export.parquet"], "one export file per partition, no temporary left");
    }

    #[test]
    fn the_last_run_is_recorded_for_the_next_start() {
        let to = tempfile::tempdir().unwrap();
        assert_eq!(last_run(to.path()), None);
        record_run(to.path(), 1_700_000_000_000).unwrap();
        assert_eq!(last_run(to.path()), Some(1_700_000_000_000));
        std::fs::write(to.path().join("last_run.json"), b"{").unwrap();
        assert_eq!(last_run(to.path()), None, "unreadable: treated as never (the export is incremental)");
    }
}
