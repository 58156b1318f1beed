//! Tests of the Parquet sink (helpers shared with the compaction tests).

#![allow(unused_imports)]

use std::collections::BTreeMap;
use std::fs::File;
use std::num::{NonZeroU64, NonZeroUsize};
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray, RecordBatch, UInt32Array};
use arrow::datatypes::{Int32Type, Int64Type, SchemaRef, TimestampMillisecondType};
use citystream_operators::{Counter, Metrics};
use parquet::basic::Compression;

use super::config::*;
use super::names::*;
use super::writer::*;
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
    // the open file's name carries the writer's run id: another process never touches it
    let open = &fs[0];
    assert!(
        open.starts_with("t/date=2026-03-02/hour=00/.city.traffic-p0-o000000000014.") && open.ends_with(".parquet.tmp")
    );
    assert_eq!(parse_position_name(open.rsplit('/').next().unwrap()), Some(("city.traffic", 0, 14)));
    assert_eq!(
        fs[1..],
        [
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
    let epochs: Vec<_> =
        names.iter().map(|n| base(n)).filter_map(|n| parse_epoch_name(&n).map(|(l, e)| (l.to_owned(), e))).collect();
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
fn with_staging_files_are_published_only_once_their_epoch_is_committed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg: ParquetSinkConfig =
        serde_saphyr::from_str(&format!("path: {}\ntables: {{t: x}}\n", dir.path().display())).unwrap();
    let tables = BTreeMap::from([("t".to_owned(), schema())]);
    let writer = |lineage: &str, epoch: u64, id: &str| {
        ParquetWriter::try_new("lake", &cfg, &tables, &Metrics::new())
            .unwrap()
            .with_epochs(lineage, epoch)
            .with_staging(id)
    };
    let visible = || files(dir.path()).into_iter().filter(|n| n.ends_with(".parquet")).count();
    let pending = || files(dir.path()).into_iter().filter(|n| n.ends_with(".pending")).count();
    let mut w = writer("ab12", 3, "w1");
    w.write("t", "x", &batch(&[1_000])).unwrap();
    w.flush().unwrap();
    assert_eq!((visible(), pending()), (0, 1), "closed but not committed: hidden");
    assert_eq!(w.publish(2).unwrap(), 0);
    w.set_epoch(4);
    w.write("t", "x", &batch(&[2_000])).unwrap();
    w.flush().unwrap();
    assert_eq!(w.publish(3).unwrap(), 1, "epoch 3 is committed");
    assert_eq!((visible(), pending()), (1, 1));
    // a crash now: epoch 4's file is pending; a process that lost the state wrote one too
    let mut zombie = writer("ab12", 4, "w0");
    zombie.write("t", "x", &batch(&[3_000])).unwrap();
    zombie.flush().unwrap();
    let mut other = writer("cd34", 9, "w9");
    other.write("t", "x", &batch(&[4_000])).unwrap();
    other.flush().unwrap();
    let names = files(dir.path());
    let parsed: Vec<_> = names
        .iter()
        .filter_map(|n| {
            parse_pending_name(n.rsplit('/').next().unwrap()).map(|(_, l, w, e)| (l.to_owned(), w.to_owned(), e))
        })
        .collect();
    assert_eq!(parsed.len(), 3, "{names:?}");
    assert!(parsed.contains(&("ab12".into(), "w1".into(), 4)) && parsed.contains(&("ab12".into(), "w0".into(), 4)));
    // the restored manifest commits w1's epoch 4: it is published; w0's is removed; another
    // lineage's pending file is not this recovery's business
    assert_eq!(resolve_pending(dir.path(), "ab12", &[("w1".into(), 4)]).unwrap(), (1, 1));
    assert_eq!((visible(), pending()), (2, 1));
    // a later writer's file of the same epoch and table publishes beside it, under its own name
    let mut again = writer("ab12", 4, "w1");
    again.write("t", "x", &batch(&[5_000])).unwrap();
    again.flush().unwrap();
    assert_eq!(again.publish(4).unwrap(), 1);
    assert_eq!(visible(), 3);
}

/// A process killed between its manifest and publishing leaves committed files pending on its
/// own disk; started again there, it publishes the ones a task's manifest lists as committed
/// (by any lineage it knows), and leaves every other pending file alone: it may be the work of
/// a process still running on the same disk.
#[test]
fn committed_files_left_pending_by_a_killed_process_are_published_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg: ParquetSinkConfig =
        serde_saphyr::from_str(&format!("path: {}\ntables: {{t: x}}\n", dir.path().display())).unwrap();
    let tables = BTreeMap::from([("t".to_owned(), schema())]);
    let pending_of = |lineage: &str, epoch: u64, id: &str, ts: i64| {
        let mut w = ParquetWriter::try_new("lake", &cfg, &tables, &Metrics::new())
            .unwrap()
            .with_epochs(lineage, epoch)
            .with_staging(id);
        w.write("t", "x", &batch(&[ts])).unwrap();
        w.flush().unwrap();
    };
    pending_of("ab12", 3, "w1", 1_000); // committed (w1 up to 3), never published: the kill
    pending_of("ab12", 4, "w1", 2_000); // not committed
    pending_of("cd34", 7, "w5", 3_000); // committed in another task's lineage
    pending_of("ef56", 1, "w6", 4_000); // a lineage no manifest names
    let visible = || files(dir.path()).into_iter().filter(|n| n.ends_with(".parquet")).count();
    let pending = || files(dir.path()).into_iter().filter(|n| n.ends_with(".pending")).count();
    assert_eq!((visible(), pending()), (0, 4));
    let committed = BTreeMap::from([
        ("ab12".to_owned(), vec![("w2".to_owned(), 9), ("w1".to_owned(), 3)]),
        ("cd34".to_owned(), vec![("w5".to_owned(), 7)]),
    ]);
    assert_eq!(publish_committed(dir.path(), &committed).unwrap(), 2);
    assert_eq!((visible(), pending()), (2, 2));
    assert_eq!(publish_committed(dir.path(), &committed).unwrap(), 0, "once");
}

#[test]
fn bad_level_is_a_config_error() {
    let e = serde_saphyr::from_str::<ParquetSinkConfig>("path: x\ncompression_level: 30\ntables: {}\n").unwrap_err();
    assert!(e.to_string().contains("zstd compression level 30 is outside 1..=22"), "{e}");
}

/// Beyond `max_open_files` the least recently written file is closed: a day's file written all
/// along stays one file while hourly files come and go (closing by partition start closed the
/// day's file, which starts first, at every new hour: hundreds of small files a day).
#[test]
fn the_open_file_limit_closes_the_least_recently_written() {
    let dir = tempfile::tempdir().unwrap();
    let cfg: ParquetSinkConfig = serde_saphyr::from_str(&format!(
        "path: {}\nmax_open_files: 2\ndaily: [d]\ntables: {{h: hs, d: ds}}\n",
        dir.path().display()
    ))
    .unwrap();
    let tables = BTreeMap::from([("h".to_owned(), schema()), ("d".to_owned(), schema())]);
    let mut w = ParquetWriter::try_new("lake", &cfg, &tables, &Metrics::new()).unwrap();
    let h = 1_772_409_600_000; // 2026-03-02T00:00Z
    for hour in 0..6 {
        let t = h + hour * 3_600_000;
        w.write("h", "sim.x", &batch(&[t + 1])).unwrap();
        w.write("d", "sim.y", &batch(&[t + 2])).unwrap();
    }
    w.flush().unwrap();
    let all = files(dir.path());
    let daily: Vec<&String> = all.iter().filter(|f| f.starts_with("d/")).collect();
    let hourly: Vec<&String> = all.iter().filter(|f| f.starts_with("h/")).collect();
    assert_eq!(daily.len(), 1, "{all:?}");
    assert_eq!(hourly.len(), 6, "one file per hour: {all:?}");
}

/// Columns unique per row are written without a dictionary, source offsets delta-encoded (in
/// the sink's files; compaction uses the same properties).
#[test]
fn unique_columns_skip_the_dictionary() {
    use arrow::array::{Int64Array, StringArray};
    use parquet::basic::Encoding;
    use parquet::file::reader::FileReader;
    let dir = tempfile::tempdir().unwrap();
    let cfg: ParquetSinkConfig =
        serde_saphyr::from_str(&format!("path: {}\ntables: {{t: xs}}\n", dir.path().display())).unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("event_id", DataType::Utf8, false),
        Field::new("ts", citystream_schemas::timestamp_type(), false),
        Field::new("segment_id", DataType::Utf8, false),
        Field::new("src_offset", DataType::Int64, false),
    ]));
    let n = 5000i64;
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from((0..n).map(|i| format!("e-{i:08x}")).collect::<Vec<_>>())),
            Arc::new(TimestampMillisecondArray::from(vec![1_772_409_600_000i64; n as usize]).with_timezone("UTC")),
            Arc::new(StringArray::from((0..n).map(|i| format!("seg-{:02}", i % 24)).collect::<Vec<_>>())),
            Arc::new(Int64Array::from((0..n).collect::<Vec<_>>())),
        ],
    )
    .unwrap();
    let mut w =
        ParquetWriter::try_new("lake", &cfg, &BTreeMap::from([("t".to_owned(), schema)]), &Metrics::new()).unwrap();
    w.write("t", "sim.xs", &batch).unwrap();
    w.flush().unwrap();
    let f = files(dir.path()).into_iter().find(|f| f.ends_with(".parquet")).unwrap();
    let reader = parquet::file::reader::SerializedFileReader::new(File::open(dir.path().join(f)).unwrap()).unwrap();
    let rg = reader.metadata().row_group(0);
    let encodings = |i: usize| rg.column(i).encodings().collect::<Vec<_>>();
    let dictionary =
        |e: &[Encoding]| e.iter().any(|e| matches!(e, Encoding::RLE_DICTIONARY | Encoding::PLAIN_DICTIONARY));
    assert!(!dictionary(&encodings(0)), "event_id: {:?}", encodings(0));
    assert!(dictionary(&encodings(2)), "segment_id keeps its dictionary: {:?}", encodings(2));
    assert!(encodings(3).contains(&Encoding::DELTA_BINARY_PACKED), "src_offset: {:?}", encodings(3));
}
