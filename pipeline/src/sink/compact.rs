//! Compaction: merges the small Parquet files of each `date=/hour=` partition into files of
//! about a target size, without a reader ever seeing a row twice or missing one.
//!
//! Per partition directory `D`:
//! 1. List `D`'s files older than `min_age`. Files named after source positions
//!    (`{origin}-p{P}-o{first}-{last}.parquet`) are merged only with files of the same origin
//!    and partition, in offset order, and the merged file is named after the whole range, so a
//!    Kafka restart's cleanup still finds what lies beyond the committed offset. Other files
//!    (windows, dead letters of the simulator) are merged together.
//! 2. Build the new content in a staging directory `S` on the same file system: the merged
//!    files, and hard links to every file left as is. Everything is fsynced.
//! 3. Record the plan in a journal, then swap `D` and `S` with one atomic
//!    `renameat2(RENAME_EXCHANGE)`: a reader listing `D` sees either the old files or the new
//!    ones, never both; a reader that already opened old files keeps reading them. A reader
//!    that listed the old files but opens one by path only after the swap gets "file not
//!    found" — an error to retry, never a wrong result (tested with a concurrent reader).
//! 4. Files that a running sink committed into `D` between the listing and the swap are now in
//!    `S` (the old directory); they are moved into `D`. Then `S` and the journal are removed.
//!
//! A crash at any point is repaired by the next run from the journal: before the swap, the
//! staging directory is discarded; after it, late files are moved and the rest discarded.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use serde::{Deserialize, Serialize};

use super::parquet::parse_position_name;

pub use crate::task::{CommitLog, Commits};

/// Which files named after source positions may be merged. A merged file is named after the
/// whole range, so merging a file beyond the committed offset with one before it would hide
/// it from the cleanup after a crash (and duplicate its rows on the replay).
#[derive(Debug, Clone, Default)]
pub enum Positioned {
    /// None of them (the safe default when nothing is known about commits).
    #[default]
    Skip,
    /// All of them: the caller knows every file is committed (e.g. the pipeline stopped
    /// cleanly, or its source has no commits).
    All,
    /// Those wholly before the committed offset of their topic and partition.
    Committed(CommitLog),
}

/// What to compact.
#[derive(Debug, Clone)]
pub struct CompactOptions {
    /// Merged files grow up to about this many bytes (compressed input size).
    pub target_bytes: u64,
    /// Only files older than this are touched (the sink may still be closing newer ones).
    pub min_age: Duration,
    /// zstd level of merged files.
    pub zstd_level: i32,
    /// Which position-named files may be merged.
    pub positioned: Positioned,
}

impl Default for CompactOptions {
    fn default() -> Self {
        Self { target_bytes: 128 << 20, min_age: Duration::from_secs(300), zstd_level: 3, positioned: Positioned::Skip }
    }
}

/// The last offset in a position-named file's name.
fn last_offset(name: &str) -> Option<i64> {
    name.strip_suffix(".parquet")?.rsplit('-').next()?.parse().ok()
}

/// What a compaction did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CompactReport {
    /// Partition directories rewritten.
    pub partitions: usize,
    /// Files merged away.
    pub files_in: usize,
    /// Files written.
    pub files_out: usize,
    /// Bytes of the merged-away files.
    pub bytes_in: u64,
    /// Bytes of the files written.
    pub bytes_out: u64,
    /// Rows moved (equal before and after, checked).
    pub rows: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Journal {
    /// The partition directory.
    dir: PathBuf,
    /// The staging directory.
    staging: PathBuf,
    /// Names in the partition when it was listed.
    listed: BTreeSet<String>,
    /// Names of the merged files written.
    written: BTreeSet<String>,
}

fn io_err(what: &str, p: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()))
}

fn fsync_dir(p: &Path) -> std::io::Result<()> {
    File::open(p).and_then(|d| d.sync_all()).map_err(|e| io_err("fsync", p, e))
}

/// Swaps two directory entries atomically.
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let ca = std::ffi::CString::new(a.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let cb = std::ffi::CString::new(b.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: both paths are valid NUL-terminated strings; AT_FDCWD resolves them relative to
    // the working directory, as `rename` does.
    let rc =
        unsafe { libc::renameat2(libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), libc::RENAME_EXCHANGE) };
    if rc == 0 { Ok(()) } else { Err(io_err("exchange", a, std::io::Error::last_os_error())) }
}

/// Compacts every table under `root` (the Parquet sink's `path`).
pub fn compact(root: &Path, opts: &CompactOptions) -> std::io::Result<CompactReport> {
    let work = root.join(".compact");
    recover(&work)?;
    let mut report = CompactReport::default();
    let mut parts = Vec::new();
    for table in std::fs::read_dir(root)?.flatten() {
        let name = table.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !table.path().is_dir() {
            continue;
        }
        for date in std::fs::read_dir(table.path())?.flatten().filter(|d| d.path().is_dir()) {
            // an hourly table's partitions are `date=…/hour=…`, a daily table's `date=…`
            let mut hourly = false;
            for hour in std::fs::read_dir(date.path())?.flatten().filter(|d| d.path().is_dir()) {
                parts.push(hour.path());
                hourly = true;
            }
            if !hourly {
                parts.push(date.path());
            }
        }
    }
    parts.sort();
    for dir in parts {
        compact_partition(root, &dir, &work, opts, &mut report)?;
    }
    // every partition finished: nothing in the work folder is needed any more
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    Ok(report)
}

/// A merge group's member: name, first offset (or 0), size.
type Member = (String, i64, u64);

/// Files merged together: positioned ones by (origin, partition), the rest under `None`.
type GroupKey = Option<(String, i32)>;

fn compact_partition(
    root: &Path,
    dir: &Path,
    work: &Path,
    opts: &CompactOptions,
    report: &mut CompactReport,
) -> std::io::Result<()> {
    let now = SystemTime::now();
    let mut listed = BTreeSet::new();
    // group key: Some((origin, partition)) for positioned files, None for the rest
    let mut groups: BTreeMap<GroupKey, Vec<Member>> = BTreeMap::new();
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !name.ends_with(".parquet") {
            continue;
        }
        listed.insert(name.clone());
        let md = e.metadata()?;
        let old = md.modified().ok().and_then(|m| now.duration_since(m).ok()).is_some_and(|a| a >= opts.min_age);
        if !old || md.len() >= opts.target_bytes {
            continue;
        }
        let key = parse_position_name(&name).map(|(o, p, _)| (o.to_owned(), p));
        let first = parse_position_name(&name).map_or(0, |(_, _, f)| f);
        if let Some((origin, partition)) = &key {
            let allowed = match &opts.positioned {
                Positioned::Skip => false,
                Positioned::All => true,
                Positioned::Committed(log) => {
                    let committed = log.lock().expect("commit log").offsets.get(&(origin.clone(), *partition)).copied();
                    matches!((committed, last_offset(&name)), (Some(c), Some(last)) if last < c)
                }
            };
            if !allowed {
                continue;
            }
        }
        // a derived table's file of a checkpoint not yet committed may be removed by a
        // recovery: never hide it in a merged file
        if let Some((lineage, epoch)) = super::parquet::parse_epoch_name(&name) {
            let allowed = match &opts.positioned {
                Positioned::Skip => false,
                Positioned::All => true,
                Positioned::Committed(log) => epoch <= log.lock().expect("commit log").committed_epoch(lineage),
            };
            if !allowed {
                continue;
            }
        }
        groups.entry(key).or_default().push((name, first, md.len()));
    }
    // contiguous runs up to the target size, in offset order
    let mut merges: Vec<(GroupKey, Vec<Member>)> = Vec::new();
    for (key, mut members) in groups {
        members.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        let mut run: Vec<Member> = Vec::new();
        let mut size = 0;
        for m in members {
            if !run.is_empty() && size + m.2 > opts.target_bytes {
                merges.push((key.clone(), std::mem::take(&mut run)));
                size = 0;
            }
            size += m.2;
            run.push(m);
        }
        merges.push((key, run));
    }
    merges.retain(|(_, run)| run.len() > 1);
    if merges.is_empty() {
        return Ok(());
    }
    let rel = dir.strip_prefix(root).unwrap_or(dir);
    let staging = work.join(rel);
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    std::fs::create_dir_all(&staging).map_err(|e| io_err("create", &staging, e))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(opts.zstd_level).map_err(std::io::Error::other)?))
        .set_statistics_enabled(EnabledStatistics::Page);
    let props = crate::sink::parquet::unique_columns(props)
        .set_created_by(format!("citystream {} (compaction)", env!("CARGO_PKG_VERSION")))
        .build();
    let merged: BTreeSet<&str> = merges.iter().flat_map(|(_, r)| r.iter().map(|m| m.0.as_str())).collect();
    let mut written = BTreeSet::new();
    for (i, (key, run)) in merges.iter().enumerate() {
        let name = match key {
            Some((origin, partition)) => {
                let first = run.iter().map(|m| m.1).min().unwrap_or(0);
                let last = run.iter().filter_map(|m| last_offset(&m.0)).max().unwrap_or(first);
                format!("{origin}-p{partition}-o{first:012}-{last:012}.parquet")
            }
            None => format!("compacted-{:06}-{}.parquet", i, run[0].0.trim_end_matches(".parquet")),
        };
        let out_path = staging.join(&name);
        let mut rows_in = 0u64;
        let mut writer: Option<ArrowWriter<File>> = None;
        for (m, _, size) in run {
            let f = File::open(dir.join(m))?;
            let reader = ParquetRecordBatchReaderBuilder::try_new(f)
                .map_err(std::io::Error::other)?
                .build()
                .map_err(std::io::Error::other)?;
            for batch in reader {
                let batch = batch.map_err(std::io::Error::other)?;
                rows_in += batch.num_rows() as u64;
                let w = match writer.as_mut() {
                    Some(w) => w,
                    None => writer.insert(
                        ArrowWriter::try_new(File::create(&out_path)?, batch.schema(), Some(props.clone()))
                            .map_err(std::io::Error::other)?,
                    ),
                };
                w.write(&batch).map_err(std::io::Error::other)?;
            }
            report.bytes_in += size;
        }
        let Some(w) = writer else { continue };
        let md = w.close().map_err(std::io::Error::other)?;
        if md.file_metadata().num_rows() as u64 != rows_in {
            return Err(std::io::Error::other(format!(
                "merged {name} holds {} rows, read {rows_in}",
                md.file_metadata().num_rows()
            )));
        }
        File::open(&out_path)?.sync_all()?;
        report.bytes_out += std::fs::metadata(&out_path)?.len();
        report.rows += rows_in;
        report.files_in += run.len();
        report.files_out += 1;
        written.insert(name);
    }
    for name in listed.iter().filter(|n| !merged.contains(n.as_str())) {
        std::fs::hard_link(dir.join(name), staging.join(name)).map_err(|e| io_err("link", &dir.join(name), e))?;
    }
    // a sink's files in progress (open `.tmp`, or closed and waiting for their checkpoint as
    // `.pending`) stay where the sink will look for them: linked (same inode) into the new
    // directory; those a sink creates before the swap are moved over by `finish`
    for name in hidden_files(dir)? {
        match std::fs::hard_link(dir.join(&name), staging.join(&name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err("link", &dir.join(&name), e)),
            _ => {}
        }
    }
    fsync_dir(&staging)?;
    let journal = Journal { dir: dir.to_owned(), staging: staging.clone(), listed, written };
    let jpath = work.join(format!("{}.journal", rel.display().to_string().replace('/', "~")));
    std::fs::write(&jpath, serde_json::to_vec(&journal).map_err(std::io::Error::other)?)?;
    File::open(&jpath)?.sync_all()?;
    fsync_dir(work)?;
    exchange(dir, &staging)?;
    if let Some(parent) = dir.parent() {
        fsync_dir(parent)?;
    }
    finish(&journal, &jpath, true)?;
    report.partitions += 1;
    Ok(())
}

/// Whether `name` is a sink's hidden file: open (`.tmp`) or waiting for its checkpoint
/// (`.pending`).
fn is_sinks_hidden(name: &str) -> bool {
    name.starts_with('.') && (name.ends_with(".tmp") || name.ends_with(".pending"))
}

/// A sink's hidden files in `dir` (see [`is_sinks_hidden`]).
fn hidden_files(dir: &Path) -> std::io::Result<Vec<String>> {
    Ok(std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| is_sinks_hidden(n))
        .collect())
}

/// After the swap: moves files committed during the compaction into the partition, and a
/// sink's hidden files the new directory lacks, then removes the staging directory (the old
/// files) and the journal.
fn finish(j: &Journal, jpath: &Path, exchanged: bool) -> std::io::Result<()> {
    if exchanged && j.staging.exists() {
        for e in std::fs::read_dir(&j.staging)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let committed = name.ends_with(".parquet") && !name.starts_with('.') && !j.listed.contains(&name);
            if committed || (is_sinks_hidden(&name) && !j.dir.join(&name).exists()) {
                // committed by a sink while we worked, or still the sink's: it belongs to the
                // partition
                std::fs::rename(e.path(), j.dir.join(&name))?;
            }
        }
        fsync_dir(&j.dir)?;
    }
    if j.staging.exists() {
        std::fs::remove_dir_all(&j.staging)?;
    }
    std::fs::remove_file(jpath)?;
    Ok(())
}

/// Repairs compactions a crash interrupted (see the module docs).
fn recover(work: &Path) -> std::io::Result<()> {
    let Ok(rd) = std::fs::read_dir(work) else { return Ok(()) };
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "journal") {
            let j: Journal = serde_json::from_slice(&std::fs::read(&p)?).map_err(std::io::Error::other)?;
            // the swap happened iff the partition now holds the merged files
            let exchanged = !j.written.is_empty() && j.written.iter().all(|w| j.dir.join(w).exists());
            tracing::warn!(dir = %j.dir.display(), exchanged, "repairing an interrupted compaction");
            finish(&j, &p, exchanged)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::parquet::tests::{files, positioned};
    use crate::sink::parquet::{ParquetSinkConfig, ParquetWriter};
    use arrow::array::{Int64Array, RecordBatch};
    use citystream_operators::Metrics;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn batch(h: i64, offsets: std::ops::Range<i64>) -> RecordBatch {
        let o: Vec<i64> = offsets.collect();
        positioned(&vec![h; o.len()], &vec![0; o.len()], &o)
    }

    /// Files and sorted offsets of a partition, as a reader that lists then opens by path sees
    /// them; `None` when a listed file vanished before it was opened (the reader retries).
    fn try_rows_and_offsets(dir: &Path) -> Option<(usize, Vec<i64>)> {
        let mut offsets = Vec::new();
        let mut files = 0;
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !name.ends_with(".parquet") {
                continue;
            }
            files += 1;
            let f = match File::open(e.path()) {
                Ok(f) => f,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => return None,
                Err(err) => panic!("{err}"),
            };
            let r = ParquetRecordBatchReaderBuilder::try_new(f).unwrap().build().unwrap();
            for b in r {
                let b = b.unwrap();
                let o = b.column(2).as_any().downcast_ref::<Int64Array>().unwrap();
                offsets.extend(o.values().iter().copied());
            }
        }
        offsets.sort_unstable();
        Some((files, offsets))
    }

    /// Every small file merged, whatever its age, positioned ones too.
    fn merge_everything() -> CompactOptions {
        CompactOptions { target_bytes: 1 << 20, min_age: Duration::ZERO, zstd_level: 3, positioned: Positioned::All }
    }

    fn rows_and_offsets(dir: &Path) -> (usize, Vec<i64>) {
        try_rows_and_offsets(dir).expect("no compaction running")
    }

    /// A lake under `base` whose one partition holds `n` committed files of 10 offsets each
    /// (city.traffic, partition 0, offsets 0..10n); returns the lake's root and the partition.
    fn lake_of_small_files(base: &Path, n: i64) -> (PathBuf, PathBuf) {
        let root = base.join("lake");
        let cfg: ParquetSinkConfig =
            serde_saphyr::from_str(&format!("path: {}\ntables: {{t: x}}\n", root.display())).unwrap();
        let h = 1_772_409_600_000;
        let tables = BTreeMap::from([("t".to_owned(), batch(h, 0..1).schema())]);
        let mut w = ParquetWriter::try_new("lake", &cfg, &tables, &Metrics::new()).unwrap();
        for i in 0..n {
            w.write("t", "city.traffic", &batch(h, i * 10..i * 10 + 10)).unwrap();
            w.flush().unwrap();
        }
        let dir = root.join("t/date=2026-03-02/hour=00");
        (root, dir)
    }

    #[test]
    fn a_sinks_open_and_pending_files_survive_a_compaction_of_their_partition() {
        let tmp = tempfile::tempdir().unwrap();
        let (root, dir) = lake_of_small_files(tmp.path(), 5);
        // a sink with operator state: one file closed and waiting for its checkpoint, one open
        let cfg: ParquetSinkConfig =
            serde_saphyr::from_str(&format!("path: {}\ntables: {{t: x}}\n", root.display())).unwrap();
        let h = 1_772_409_600_000;
        let tables = BTreeMap::from([("t".to_owned(), batch(h, 0..1).schema())]);
        let mut w = ParquetWriter::try_new("lake", &cfg, &tables, &Metrics::new())
            .unwrap()
            .with_epochs("ab12", 7)
            .with_staging("w1");
        w.write("t", "city.traffic", &batch(h, 50..60)).unwrap();
        w.flush().unwrap();
        w.write("t", "city.traffic", &batch(h, 60..70)).unwrap();
        let opts = merge_everything();
        let r = compact(&root, &opts).unwrap();
        assert_eq!((r.files_in, r.files_out), (5, 1));
        let hidden = hidden_files(&dir).unwrap();
        assert_eq!(hidden.len(), 2, "{hidden:?}");
        // the sink goes on as if nothing happened: its files end up published, no row lost
        w.flush().unwrap();
        assert_eq!(w.publish(7).unwrap(), 2);
        let (files, offsets) = rows_and_offsets(&dir);
        assert_eq!((files, offsets), (3, (0..70).collect::<Vec<_>>()));
    }

    #[test]
    fn daily_partitions_are_compacted_too() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("lake");
        let cfg: ParquetSinkConfig =
            serde_saphyr::from_str(&format!("path: {}\ntables: {{t: x}}\ndaily: [t]\n", root.display())).unwrap();
        let h = 1_772_409_600_000;
        let tables = BTreeMap::from([("t".to_owned(), batch(h, 0..1).schema())]);
        let mut w = ParquetWriter::try_new("lake", &cfg, &tables, &Metrics::new()).unwrap();
        for i in 0..5 {
            w.write("t", "city.traffic", &batch(h, i * 10..i * 10 + 10)).unwrap();
            w.flush().unwrap();
        }
        let dir = root.join("t/date=2026-03-02");
        assert_eq!(files(&dir).len(), 5);
        let opts = merge_everything();
        let r = compact(&root, &opts).unwrap();
        assert_eq!((r.partitions, r.files_in, r.files_out, r.rows), (1, 5, 1, 50));
        assert_eq!(files(&dir), ["city.traffic-p0-o000000000000-000000000049.parquet"]);
    }

    #[test]
    fn merges_small_files_keeping_offset_names_and_readers_never_see_a_row_twice_or_miss_one() {
        let tmp = tempfile::tempdir().unwrap();
        let (root, dir) = lake_of_small_files(tmp.path(), 40);
        let (count, before) = rows_and_offsets(&dir);
        assert_eq!((count, before.len()), (40, 400));
        // a reader lists and reads the partition over and over while it is compacted
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (dir, stop) = (dir.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut reads, mut retries) = (0, 0);
                while !stop.load(Ordering::Relaxed) {
                    match try_rows_and_offsets(&dir) {
                        Some((_, seen)) => {
                            assert_eq!(seen, (0..400).collect::<Vec<_>>(), "a reader saw rows twice or missed some");
                            reads += 1;
                        }
                        None => retries += 1,
                    }
                }
                (reads, retries)
            })
        };
        let opts = merge_everything();
        let report = compact(&root, &opts).unwrap();
        stop.store(true, Ordering::Relaxed);
        let (reads, retries) = reader.join().unwrap();
        assert!(reads > 0, "{reads} complete reads, {retries} retried");
        assert_eq!((report.partitions, report.files_in, report.files_out, report.rows), (1, 40, 1, 400));
        let (count, after) = rows_and_offsets(&dir);
        assert_eq!((count, after), (1, before));
        assert_eq!(files(&dir), ["city.traffic-p0-o000000000000-000000000399.parquet"]);
        // the Kafka cleanup still works on merged names
        assert_eq!(crate::sink::parquet::remove_uncommitted(&root, "city.traffic", 0, 400).unwrap(), 0);
        assert!(!root.join(".compact").exists(), "no staging left");
        // nothing left to do the second time
        assert_eq!(compact(&root, &opts).unwrap().partitions, 0);
    }

    #[test]
    fn only_files_wholly_before_the_committed_offset_are_merged() {
        let tmp = tempfile::tempdir().unwrap();
        let (root, dir) = lake_of_small_files(tmp.path(), 6);
        let base = CompactOptions { target_bytes: 1 << 20, min_age: Duration::ZERO, ..Default::default() };
        // nothing known about commits: position-named files are left alone
        assert_eq!(compact(&root, &base).unwrap().files_in, 0);
        // committed up to offset 30: files 0-9, 10-19, 20-29 merge; 30.. stay as they are
        let log: CommitLog = Default::default();
        log.lock().unwrap().offsets.insert(("city.traffic".into(), 0), 30);
        let r = compact(&root, &CompactOptions { positioned: Positioned::Committed(log), ..base }).unwrap();
        assert_eq!((r.files_in, r.files_out), (3, 1));
        assert_eq!(
            files(&dir),
            [
                "city.traffic-p0-o000000000000-000000000029.parquet",
                "city.traffic-p0-o000000000030-000000000039.parquet",
                "city.traffic-p0-o000000000040-000000000049.parquet",
                "city.traffic-p0-o000000000050-000000000059.parquet",
            ]
        );
        assert_eq!(rows_and_offsets(&dir).1, (0..60).collect::<Vec<_>>());
    }

    #[test]
    fn files_committed_during_a_compaction_are_kept_and_a_crash_is_repaired() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("t/date=2026-03-02/hour=00");
        let staging = tmp.path().join(".compact/t/date=2026-03-02/hour=00");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&staging).unwrap();
        // state after the swap: `dir` has the merged file, `staging` the old files plus one a
        // sink committed between the listing and the swap
        std::fs::write(dir.join("m.parquet"), b"merged").unwrap();
        std::fs::write(staging.join("old.parquet"), b"old").unwrap();
        std::fs::write(staging.join("late.parquet"), b"late").unwrap();
        let j = Journal {
            dir: dir.clone(),
            staging: staging.clone(),
            listed: ["old.parquet".to_owned()].into(),
            written: ["m.parquet".to_owned()].into(),
        };
        let jpath = tmp.path().join(".compact/t~x.journal");
        std::fs::write(&jpath, serde_json::to_vec(&j).unwrap()).unwrap();
        recover(&tmp.path().join(".compact")).unwrap();
        assert_eq!(files(&dir), ["late.parquet", "m.parquet"]);
        assert!(!staging.exists() && !jpath.exists());
    }
}
