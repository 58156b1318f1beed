//! What reading a Kafka backlog costs at the least: the Kafka source's native fetch
//! (`fetch: native`) without its consumer group, commits, pipeline or leader lookup. One TCP
//! connection sends Fetch requests (version 11, no fetch session) for every partition of a topic
//! from offset 0 to the high watermark; each record set is read with the source's own reader
//! (`citystream_pipeline::kafka::fetch::wire`: every codec) and every record appended to a
//! `RawBatchBuilder` of 1024 rows, as the source does. The broker named must lead every partition
//! (the single-broker `deploy/kafka/`), and a partition it does not lead is an error.
//!
//!   cargo run --release -p citystream-benches --features kafka --bin fetch_floor -- --broker 127.0.0.1:9092 \
//!       --topic prof3m --partitions 2 [--check lines.jsonl] [--repeat 3]
//!
//! Prints messages, wall and CPU seconds and CPU-seconds per million messages (median of
//! `--repeat`); `--check FILE` also compares the count, the bytes and an order-free digest of
//! the values with the file's lines (the produced events).

use std::io::Write;
use std::net::TcpStream;
use std::time::Instant;

use anyhow::{Context, anyhow, bail};
use citystream_benches::{median, usage};
use citystream_pipeline::kafka::fetch::{self, Decoders, FetchLimits, RecordSet, wire};
use citystream_schemas::raw::RawBatchBuilder;
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// The broker that leads every partition of the topic.
    #[arg(long, default_value = "127.0.0.1:9092")]
    broker: String,
    /// The topic to read from its start to its high watermark.
    #[arg(long)]
    topic: String,
    /// Partitions of the topic (0..n).
    #[arg(long, default_value_t = 2)]
    partitions: i32,
    /// Bytes asked per partition and fetch.
    #[arg(long, default_value_t = 8 << 20)]
    partition_bytes: i32,
    /// A file of the produced values, one per line: count, bytes and digest are compared.
    #[arg(long)]
    check: Option<std::path::PathBuf>,
    /// Reads of the whole topic; the median is printed.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
}

const ROWS: usize = 1024;
/// Payload bytes per row a raw batch builder starts with room for (the Kafka source's
/// `PAYLOAD_BYTES_PER_ROW`).
const PAYLOAD_BYTES_PER_ROW: usize = 256;
/// Fetches in a row that move no partition forward before the read gives up.
const STALLED_FETCHES: u32 = 100;

struct Conn {
    s: TcpStream,
    correlation: i32,
    req: Vec<u8>,
    resp: Vec<u8>,
}

impl Conn {
    fn fetch(&mut self, topic: &str, offsets: &[(i32, i64)], partition_bytes: i32) -> anyhow::Result<&[u8]> {
        self.correlation += 1;
        let limits = FetchLimits { max_wait_ms: 100, max_bytes: 64 << 20, partition_bytes, read_committed: false };
        wire::encode_fetch(&mut self.req, self.correlation, "fetch_floor", limits, &[(topic, offsets.to_vec())]);
        self.s.write_all(&self.req)?;
        fetch::receive(&mut self.s, self.correlation, &mut self.resp, limits.max_bytes)?;
        Ok(&self.resp[4..])
    }
}

/// What one read of the topic saw.
#[derive(Default)]
struct Seen {
    messages: u64,
    bytes: u64,
    digest: u64,
    batches: u64,
}

/// FNV-1a of one value, summed over values: the same whatever the order.
fn fnv(v: &[u8]) -> u64 {
    v.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3))
}

struct Reader {
    builder: RawBatchBuilder,
    decoders: Decoders,
    digest: bool,
}

impl Reader {
    /// Appends the records of one partition's record set at or after `from` (the source's
    /// record reader: `citystream_pipeline::kafka::fetch::wire`); returns the next offset to
    /// fetch.
    fn records(&mut self, topic: &str, partition: i32, set: &[u8], from: i64, seen: &mut Seen) -> anyhow::Result<i64> {
        let mut records = RecordSet::new(set, from, &[], &mut self.decoders);
        while let Some(r) = records.next()? {
            self.builder.append(topic, partition, r.offset, r.timestamp.unwrap_or(0), r.value);
            seen.messages += 1;
            seen.bytes += r.value.len() as u64;
            if self.digest {
                seen.digest = seen.digest.wrapping_add(fnv(r.value));
            }
            if self.builder.len() >= ROWS {
                std::hint::black_box(self.builder.finish());
                seen.batches += 1;
            }
        }
        if let Some((first, last, why)) = records.skipped.first() {
            bail!("the batch of offsets {first}..={last} does not decompress: {why}");
        }
        Ok(records.next_offset())
    }
}

fn read_topic(args: &Args) -> anyhow::Result<(Seen, f64, f64)> {
    let t0 = Instant::now();
    let cpu0 = usage().cpu_s;
    let s = TcpStream::connect(&args.broker).with_context(|| format!("connect {}", args.broker))?;
    s.set_nodelay(true)?;
    let mut conn = Conn { s, correlation: 0, req: Vec::new(), resp: Vec::new() };
    let mut reader = Reader {
        builder: RawBatchBuilder::with_capacity(ROWS, ROWS * PAYLOAD_BYTES_PER_ROW),
        decoders: Decoders::new()?,
        digest: args.check.is_some(),
    };
    let mut offsets: Vec<(i32, i64)> = (0..args.partitions).map(|p| (p, 0)).collect();
    let mut end: Vec<Option<i64>> = vec![None; offsets.len()];
    let mut seen = Seen::default();
    let mut stalled = 0;
    loop {
        let want: Vec<(i32, i64)> =
            offsets.iter().zip(&end).filter(|(o, e)| e.is_none_or(|e| o.1 < e)).map(|(o, _)| *o).collect();
        if want.is_empty() {
            break;
        }
        let before: i64 = offsets.iter().map(|o| o.1).sum();
        let resp = conn.fetch(&args.topic, &want, args.partition_bytes)?;
        let (error, parts) = wire::parse_fetch_response(resp)?;
        if error != 0 {
            bail!("fetch error {error}");
        }
        for p in parts {
            if p.error != 0 {
                bail!("partition {}: error {} (6: this broker does not lead it)", p.partition, p.error);
            }
            let k = usize::try_from(p.partition)
                .ok()
                .filter(|&k| k < offsets.len() && p.topic == args.topic)
                .ok_or_else(|| anyhow!("partition {} was not asked for", p.partition))?;
            end[k] = Some(p.high_watermark);
            offsets[k].1 = reader.records(p.topic, p.partition, p.records, offsets[k].1, &mut seen)?;
        }
        if offsets.iter().map(|o| o.1).sum::<i64>() == before {
            stalled += 1;
            if stalled >= STALLED_FETCHES {
                bail!("{STALLED_FETCHES} fetches in a row moved no partition forward: {offsets:?}, ends {end:?}");
            }
        } else {
            stalled = 0;
        }
    }
    if !reader.builder.is_empty() {
        std::hint::black_box(reader.builder.finish());
        seen.batches += 1;
    }
    Ok((seen, t0.elapsed().as_secs_f64(), usage().cpu_s - cpu0))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut walls = Vec::new();
    let mut cpus = Vec::new();
    let mut last = Seen::default();
    for _ in 0..args.repeat.max(1) {
        let (seen, wall, cpu) = read_topic(&args)?;
        println!(
            "read {} messages ({} bytes of values, {} batches of at most {ROWS}) in {wall:.3} s wall, {cpu:.3} CPU-s: {:.3} CPU-s per million",
            seen.messages,
            seen.bytes,
            seen.batches,
            cpu / seen.messages.max(1) as f64 * 1e6
        );
        walls.push(wall);
        cpus.push(cpu / seen.messages.max(1) as f64 * 1e6);
        last = seen;
    }
    println!("median: {:.3} s wall, {:.3} CPU-s per million messages", median(walls), median(cpus));
    if let Some(path) = &args.check {
        let text = std::fs::read(path)?;
        let (mut n, mut bytes, mut digest) = (0u64, 0u64, 0u64);
        for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            n += 1;
            bytes += line.len() as u64;
            digest = digest.wrapping_add(fnv(line));
        }
        if (n, bytes, digest) != (last.messages, last.bytes, last.digest) {
            bail!("the topic's values differ from {}: {n} lines of {bytes} bytes", path.display());
        }
        println!("the values are the lines of {} (count, bytes and digest)", path.display());
    }
    Ok(())
}
