//! Raw identifiers never reach disk: a simulated day with many plate reads and malformed
//! camera messages (whose payloads become dead letters) is run with pseudonymization, then every
//! string and binary value of every Parquet file is scanned for every plate the simulator
//! emitted.

use std::collections::HashSet;
use std::path::Path;

use arrow::array::{Array, AsArray};
use arrow::datatypes::DataType;
use citystream_operators::Metrics;
use citystream_pipeline::config::{self, plan::plan};
use citystream_pipeline::runtime::{self, StopHandle};
use citystream_pipeline::sql;

fn yaml(data: &Path, secret: &Path) -> String {
    format!(
        "\
name: privacy
sources:
  city:
    type: simulator
    seed: 11
    duration: 1d
    plate_read_rate: 0.2
    faults: {{malformed_rate: 0.05, duplicate_rate: 0.01}}
    ground_truth: {data}/truth
stages:
  camera:
    type: decode
    input: city.camera
    kind: camera
    pseudonymize: {{secret_file: {secret}, rotate: 1d}}
sinks:
  lake:
    type: parquet
    path: {data}/lake
    tables: {{camera: camera, dead_letters: camera.dead_letters, camera_late: camera.late_events}}
runtime: {{status_interval: null}}
",
        data = data.display(),
        secret = secret.display()
    )
}

/// Every string and binary value in every Parquet file under `root`, as bytes.
fn every_value(root: &Path, each: &mut dyn FnMut(&[u8])) -> usize {
    let mut files = 0;
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            files += 1;
            let f = std::fs::File::open(&p).unwrap();
            let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(f, 8192).unwrap();
            for batch in reader {
                let batch = batch.unwrap();
                for col in batch.columns() {
                    match col.data_type() {
                        DataType::Utf8 => col.as_string::<i32>().iter().flatten().for_each(|v| each(v.as_bytes())),
                        DataType::Binary => col.as_binary::<i32>().iter().flatten().for_each(&mut *each),
                        _ => {}
                    }
                }
            }
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_raw_plate_reaches_any_output_file() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("pseudonym.key");
    std::fs::write(&secret, [42u8; 32]).unwrap();
    // a secret file readable by others is refused: provision it as an operator would
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let text = yaml(dir.path(), &secret);
    let p = plan(config::load_str(&text, "privacy.yaml").unwrap(), "privacy.yaml").unwrap();
    let (_stop, rx) = StopHandle::new();
    runtime::run(p, Metrics::new(), rx).await.unwrap();

    let plates: HashSet<String> =
        std::fs::read_to_string(dir.path().join("truth/plates.txt")).unwrap().lines().map(str::to_owned).collect();
    assert!(plates.len() > 1000, "the simulator read many plates: {}", plates.len());
    let len = plates.iter().next().unwrap().len();
    assert!(plates.iter().all(|p| p.len() == len), "plates have one length, so a sliding window finds them");
    let lake = dir.path().join("lake");
    let (mut hits, mut values, mut redacted) = (0, 0, 0);
    let needle = b"\"plate\":\"<redacted>\"";
    let files = every_value(&lake, &mut |v| {
        values += 1;
        if v.windows(needle.len()).any(|w| w == needle) {
            redacted += 1;
        }
        if v.len() >= len {
            hits += v.windows(len).filter(|w| std::str::from_utf8(w).is_ok_and(|s| plates.contains(s))).count();
        }
    });
    assert!(files > 0 && values > 10_000, "{files} files, {values} values scanned");
    assert_eq!(hits, 0, "raw plates found in output files");
    // the dead letters did carry camera payloads, with identifiers redacted
    assert!(redacted > 10, "dead letters keep camera payloads with the plate redacted: {redacted}");

    let q = |s: &'static str| {
        let lake = lake.clone();
        async move { sql::query(&lake, s).await.unwrap() }
    };

    // pseudonyms are there for every plate read, and link reads of one vehicle within the day
    let r = q("SELECT COUNT(*), COUNT(plate_pseudonym), COUNT(DISTINCT plate_pseudonym) FROM camera WHERE kind = 'plate_read'").await;
    let c = |i: usize| r[0].column(i).as_primitive::<arrow::datatypes::Int64Type>().value(0);
    assert!(c(0) > 1000 && c(1) == c(0), "every plate read has a pseudonym: {} of {}", c(1), c(0));
    assert!(c(2) < c(1), "a vehicle read twice in a day has one pseudonym: {} distinct of {}", c(2), c(1));
    assert!(c(2) <= plates.len() as i64);

    // pedestrian thumbnails are dropped at ingest, others kept
    let t = q("SELECT COUNT(thumbnail) FILTER (WHERE object_class = 'pedestrian'), COUNT(thumbnail) FILTER (WHERE object_class <> 'pedestrian') FROM camera").await;
    let tc = |i: usize| t[0].column(i).as_primitive::<arrow::datatypes::Int64Type>().value(0);
    assert_eq!(tc(0), 0, "no pedestrian thumbnail is stored");
    assert!(tc(1) > 0, "other thumbnails are kept");
}
