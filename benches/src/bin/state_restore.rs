//! Restore time per MB of operator state, on a local disk and (with `AWS_ENDPOINT_URL` set, e.g.
//! by `scripts/start-s3.sh`) on S3: a stage's state of each size is saved and committed, then a
//! new process-like store opens it (takeover) and loads it; median of `--runs`.
//!
//!   cargo run --release -p citystream-benches --bin state_restore -- --mb 1,8,32 --s3 s3://citystate/bench

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{Int64Array, RecordBatch, StringArray};
use citystream_benches::median;
use citystream_pipeline::task::{StateStore, StateUrl};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// State sizes, in MB of Arrow IPC.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    mb: Vec<usize>,
    /// Runs per size and store (the median is printed).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// An S3 state URL to measure too.
    #[arg(long)]
    s3: Option<String>,
}

/// About `mb` MB of window-like state: a key column and two numbers.
fn state(mb: usize) -> RecordBatch {
    let rows = mb * 1024 * 1024 / 40;
    let keys = StringArray::from_iter_values((0..rows).map(|i| format!("segment-{i:08}")));
    let a = Int64Array::from_iter_values((0..rows as i64).map(|i| i * 7));
    let b = Int64Array::from_iter_values((0..rows as i64).map(|i| i ^ 0x5555));
    RecordBatch::try_from_iter([("key", Arc::new(keys) as _), ("count", Arc::new(a) as _), ("sum", Arc::new(b) as _)])
        .expect("batch")
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    // (name, the URL of the n-th store)
    type Stores<'a> = Vec<(String, Box<dyn Fn(usize) -> StateUrl + 'a>)>;
    let mut stores: Stores =
        vec![("local disk".into(), Box::new(|i| StateUrl::Local(dir.path().join(format!("s{i}")))))];
    if let Some(s3) = &args.s3 {
        let base = s3.trim_end_matches('/').to_owned();
        let tag = std::process::id();
        stores.push((
            "s3".into(),
            Box::new(move |i| StateUrl::parse(&format!("{base}/{tag}-{i}")).expect("an s3:// URL")),
        ));
    }
    println!("| store | state MB | save+commit ms | open+restore ms | restore ms per MB |");
    println!("|---|---|---|---|---|");
    let mut n = 0;
    for (name, url) in &stores {
        for &mb in &args.mb {
            let batch = state(mb);
            let (mut saves, mut restores, mut bytes) = (Vec::new(), Vec::new(), 0);
            for _ in 0..args.runs {
                n += 1;
                let u = url(n);
                let s = StateStore::open(&u)?;
                let t0 = Instant::now();
                bytes = s.save(1, "windows", "window", &batch, 0)?;
                s.commit(1, &BTreeMap::from([(("t".to_owned(), 0), 1)]))?;
                saves.push(t0.elapsed().as_secs_f64() * 1e3);
                let t0 = Instant::now();
                let r = StateStore::open(&u)?;
                let (got, _) = r.load("windows", "window")?.expect("state");
                restores.push(t0.elapsed().as_secs_f64() * 1e3);
                assert_eq!(got.num_rows(), batch.num_rows());
            }
            let mb_written = bytes as f64 / 1048576.0;
            let restore = median(restores);
            println!(
                "| {name} | {mb_written:.1} | {:.1} | {restore:.1} | {:.2} |",
                median(saves),
                restore / mb_written
            );
        }
    }
    Ok(())
}
