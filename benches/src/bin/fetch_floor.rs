//! What reading a Kafka backlog costs without librdkafka's op per message: a measurement for
//! issue 19, not a consumer. One TCP connection sends Fetch requests (version 11, no fetch
//! session) for every partition of a topic from offset 0 to the high watermark, decompresses
//! each record batch (zstd, lz4 frames are refused: the producer's codec is asked for) and
//! appends every record to a `RawBatchBuilder` of 1024 rows, as the Kafka source does with what
//! librdkafka hands it. No group, no offsets committed, no leader lookup: the broker named must
//! lead every partition (the single-broker `deploy/kafka/`), and a partition it does not lead is
//! an error.
//!
//!   cargo run --release -p citystream-benches --bin fetch_floor -- --broker 127.0.0.1:9092 \
//!       --topic prof3m --partitions 2 [--check lines.jsonl] [--repeat 3]
//!
//! Prints messages, wall and CPU seconds and CPU-seconds per million messages (median of
//! `--repeat`); `--check FILE` also compares the count, the bytes and an order-free digest of
//! the values with the file's lines (the produced events).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use anyhow::{Context, anyhow, bail};
use citystream_benches::{median, usage};
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

const FETCH: i16 = 1;
const FETCH_VERSION: i16 = 11;
const ROWS: usize = 1024;
/// Payload bytes per row a raw batch builder starts with room for (the Kafka source's
/// `PAYLOAD_BYTES_PER_ROW`).
const PAYLOAD_BYTES_PER_ROW: usize = 256;
/// Fetches in a row that move no partition forward before the read gives up.
const STALLED_FETCHES: u32 = 100;

/// A cursor over a response; every read is bounds-checked.
struct Cur<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> anyhow::Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len()).ok_or_else(|| anyhow!("truncated"))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn i8(&mut self) -> anyhow::Result<i8> {
        Ok(self.take(1)?[0] as i8)
    }
    fn i16(&mut self) -> anyhow::Result<i16> {
        Ok(i16::from_be_bytes(self.take(2)?.try_into()?))
    }
    fn i32(&mut self) -> anyhow::Result<i32> {
        Ok(i32::from_be_bytes(self.take(4)?.try_into()?))
    }
    fn i64(&mut self) -> anyhow::Result<i64> {
        Ok(i64::from_be_bytes(self.take(8)?.try_into()?))
    }
    fn string(&mut self) -> anyhow::Result<&'a [u8]> {
        let n = self.i16()?;
        if n < 0 {
            return Ok(&[]);
        }
        self.take(n as usize)
    }
    /// A zigzag varint (Kafka's record fields).
    fn varint(&mut self) -> anyhow::Result<i64> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.take(1)?[0];
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok((v >> 1) as i64 ^ -((v & 1) as i64));
            }
        }
        bail!("varint longer than 10 bytes")
    }
    /// Bytes of a varint length (-1: null).
    fn var_bytes(&mut self) -> anyhow::Result<&'a [u8]> {
        let n = self.varint()?;
        if n < 0 {
            return Ok(&[]);
        }
        self.take(usize::try_from(n)?)
    }
    fn done(&self) -> bool {
        self.at >= self.b.len()
    }
}

struct Conn {
    s: TcpStream,
    correlation: i32,
    req: Vec<u8>,
    resp: Vec<u8>,
}

impl Conn {
    fn fetch(&mut self, topic: &str, offsets: &[(i32, i64)], partition_bytes: i32) -> anyhow::Result<&[u8]> {
        let r = &mut self.req;
        r.clear();
        r.extend_from_slice(&[0; 4]);
        r.extend_from_slice(&FETCH.to_be_bytes());
        r.extend_from_slice(&FETCH_VERSION.to_be_bytes());
        self.correlation += 1;
        r.extend_from_slice(&self.correlation.to_be_bytes());
        let client = b"fetch_floor";
        r.extend_from_slice(&(client.len() as i16).to_be_bytes());
        r.extend_from_slice(client);
        r.extend_from_slice(&(-1i32).to_be_bytes()); // replica_id
        r.extend_from_slice(&100i32.to_be_bytes()); // max_wait_ms
        r.extend_from_slice(&1i32.to_be_bytes()); // min_bytes
        r.extend_from_slice(&(64i32 << 20).to_be_bytes()); // max_bytes
        r.push(0); // isolation_level: read_uncommitted
        r.extend_from_slice(&0i32.to_be_bytes()); // session_id
        r.extend_from_slice(&(-1i32).to_be_bytes()); // session_epoch: no session
        r.extend_from_slice(&1i32.to_be_bytes()); // topics
        r.extend_from_slice(&(topic.len() as i16).to_be_bytes());
        r.extend_from_slice(topic.as_bytes());
        r.extend_from_slice(&(offsets.len() as i32).to_be_bytes());
        for &(p, o) in offsets {
            r.extend_from_slice(&p.to_be_bytes());
            r.extend_from_slice(&(-1i32).to_be_bytes()); // current_leader_epoch
            r.extend_from_slice(&o.to_be_bytes());
            r.extend_from_slice(&(-1i64).to_be_bytes()); // log_start_offset
            r.extend_from_slice(&partition_bytes.to_be_bytes());
        }
        r.extend_from_slice(&0i32.to_be_bytes()); // forgotten_topics_data
        r.extend_from_slice(&0i16.to_be_bytes()); // rack_id ""
        let n = (r.len() - 4) as i32;
        r[..4].copy_from_slice(&n.to_be_bytes());
        self.s.write_all(r)?;
        let mut len = [0u8; 4];
        self.s.read_exact(&mut len)?;
        let len = usize::try_from(i32::from_be_bytes(len))?;
        self.resp.resize(len, 0);
        self.s.read_exact(&mut self.resp)?;
        if self.resp.len() < 4 {
            bail!("a response of {} bytes", self.resp.len());
        }
        let got = i32::from_be_bytes(self.resp[..4].try_into()?);
        if got != self.correlation {
            bail!("correlation id {got}, sent {}", self.correlation);
        }
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
    /// zstd record batches decoded without their size known up front
    streamed: u64,
}

/// FNV-1a of one value, summed over values: the same whatever the order.
fn fnv(v: &[u8]) -> u64 {
    v.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3))
}

struct Reader {
    builder: RawBatchBuilder,
    zstd: zstd::bulk::Decompressor<'static>,
    plain: Vec<u8>,
    digest: bool,
}

impl Reader {
    /// Appends the records of one partition's record set at or after `from`; returns the next
    /// offset to fetch.
    fn records(&mut self, topic: &str, partition: i32, set: &[u8], from: i64, seen: &mut Seen) -> anyhow::Result<i64> {
        let mut c = Cur { b: set, at: 0 };
        let mut next = from;
        while set.len() - c.at >= 12 {
            let base = c.i64()?;
            let len = usize::try_from(c.i32()?)?;
            if set.len() - c.at < len {
                break; // the broker cuts the last batch at the byte limit
            }
            let mut b = Cur { b: c.take(len)?, at: 0 };
            let _leader_epoch = b.i32()?;
            let magic = b.i8()?;
            if magic != 2 {
                bail!("record batch magic {magic}");
            }
            let _crc = b.i32()?;
            let attributes = b.i16()?;
            let last_delta = b.i32()?;
            let base_ts = b.i64()?;
            let max_ts = b.i64()?;
            let _producer = (b.i64()?, b.i16()?, b.i32()?);
            let count = b.i32()?;
            next = base + i64::from(last_delta) + 1;
            if attributes & 0x20 != 0 {
                continue; // a control batch (transaction markers)
            }
            let body = &b.b[b.at..];
            let body = match attributes & 0x7 {
                0 => body,
                4 => {
                    self.plain.clear();
                    // one context for every batch; a frame without its size (or more than
                    // one frame) goes through a decoder of its own
                    let size = zstd::zstd_safe::get_frame_content_size(body).ok().flatten().filter(|&n| n <= 1 << 28);
                    let bulk = size.is_some_and(|n| {
                        self.plain.reserve(n as usize);
                        self.zstd.decompress_to_buffer(body, &mut self.plain).is_ok()
                    });
                    if !bulk {
                        self.plain.clear();
                        zstd::stream::copy_decode(body, &mut self.plain).context("zstd")?;
                        seen.streamed += 1;
                    }
                    &self.plain[..]
                }
                codec => bail!("codec {codec}: only zstd and uncompressed are read"),
            };
            let mut r = Cur { b: body, at: 0 };
            for _ in 0..count {
                let _len = r.varint()?;
                let _attr = r.i8()?;
                // the record's time stands in for the arrival time the source records (same
                // cost): its create time, or the broker's append time where the batch says so
                let delta = r.varint()?;
                let ts = if attributes & 0x8 != 0 { max_ts } else { base_ts + delta };
                let offset = base + r.varint()?;
                let _key = r.var_bytes()?;
                let value = r.var_bytes()?;
                for _ in 0..r.varint()? {
                    r.var_bytes()?;
                    r.var_bytes()?;
                }
                if offset < from {
                    continue;
                }
                self.builder.append(topic, partition, offset, ts, value);
                seen.messages += 1;
                seen.bytes += value.len() as u64;
                if self.digest {
                    seen.digest = seen.digest.wrapping_add(fnv(value));
                }
                if self.builder.len() >= ROWS {
                    std::hint::black_box(self.builder.finish());
                    seen.batches += 1;
                }
            }
            if !r.done() {
                bail!("{} bytes after the batch's {count} records", r.b.len() - r.at);
            }
        }
        Ok(next)
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
        zstd: zstd::bulk::Decompressor::new()?,
        plain: Vec::new(),
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
        let mut c = Cur { b: resp, at: 0 };
        let _throttle = c.i32()?;
        let error = c.i16()?;
        if error != 0 {
            bail!("fetch error {error}");
        }
        let _session = c.i32()?;
        for _ in 0..c.i32()? {
            let topic = std::str::from_utf8(c.string()?)?.to_owned();
            for _ in 0..c.i32()? {
                let partition = c.i32()?;
                let error = c.i16()?;
                let high = c.i64()?;
                let _last_stable = c.i64()?;
                let _log_start = c.i64()?;
                let aborted = c.i32()?;
                for _ in 0..aborted.max(0) {
                    c.i64()?;
                    c.i64()?;
                }
                let _preferred = c.i32()?;
                let n = c.i32()?;
                let set = if n > 0 { c.take(n as usize)? } else { &[][..] };
                if error != 0 {
                    bail!("partition {partition}: error {error} (6: this broker does not lead it)");
                }
                let k = usize::try_from(partition)
                    .ok()
                    .filter(|&k| k < offsets.len())
                    .ok_or_else(|| anyhow!("partition {partition} was not asked for"))?;
                end[k] = Some(high);
                offsets[k].1 = reader.records(&topic, partition, set, offsets[k].1, &mut seen)?;
            }
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
            "read {} messages ({} bytes of values, {} batches of at most {ROWS}; {} zstd batches streamed) in {wall:.3} s wall, {cpu:.3} CPU-s: {:.3} CPU-s per million",
            seen.messages,
            seen.bytes,
            seen.batches,
            seen.streamed,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(out: &mut Vec<u8>, v: i64) {
        let mut z = ((v << 1) ^ (v >> 63)) as u64;
        loop {
            let b = (z & 0x7f) as u8;
            z >>= 7;
            if z == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    /// A record batch (magic 2) of `values` from `base`, `attributes` as given (4: zstd).
    fn batch(base: i64, values: &[&[u8]], attributes: i16) -> Vec<u8> {
        let mut records = Vec::new();
        for (i, v) in values.iter().enumerate() {
            let mut r = vec![0u8]; // attributes
            varint(&mut r, i as i64 * 10); // timestamp delta
            varint(&mut r, i as i64); // offset delta
            varint(&mut r, -1); // no key
            varint(&mut r, v.len() as i64);
            r.extend_from_slice(v);
            varint(&mut r, 1); // one header
            varint(&mut r, 1);
            r.push(b'h');
            varint(&mut r, 0);
            varint(&mut records, r.len() as i64);
            records.extend_from_slice(&r);
        }
        if attributes & 0x7 == 4 {
            records = zstd::bulk::compress(&records, 3).unwrap();
        }
        let mut b = Vec::new();
        b.extend_from_slice(&0i32.to_be_bytes()); // partition leader epoch
        b.push(2);
        b.extend_from_slice(&0i32.to_be_bytes()); // crc (not checked)
        b.extend_from_slice(&attributes.to_be_bytes());
        b.extend_from_slice(&(values.len() as i32 - 1).to_be_bytes());
        b.extend_from_slice(&1_000i64.to_be_bytes());
        b.extend_from_slice(&1_000i64.to_be_bytes());
        b.extend_from_slice(&(-1i64).to_be_bytes());
        b.extend_from_slice(&(-1i16).to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b.extend_from_slice(&(values.len() as i32).to_be_bytes());
        b.extend_from_slice(&records);
        let mut out = base.to_be_bytes().to_vec();
        out.extend_from_slice(&(b.len() as i32).to_be_bytes());
        out.extend_from_slice(&b);
        out
    }

    fn reader() -> Reader {
        Reader {
            builder: RawBatchBuilder::with_capacity(8, 256),
            zstd: zstd::bulk::Decompressor::new().unwrap(),
            plain: Vec::new(),
            digest: true,
        }
    }

    #[test]
    fn plain_and_zstd_batches_are_read_and_a_cut_last_batch_is_left_for_the_next_fetch() {
        let mut set = batch(0, &[b"a", b"bb"], 0);
        set.extend(batch(2, &[b"ccc", b"dddd", b"e"], 4));
        let cut = batch(5, &[b"ff"], 0);
        set.extend_from_slice(&cut[..cut.len() - 3]);
        let mut r = reader();
        let mut seen = Seen::default();
        let next = r.records("t", 0, &set, 0, &mut seen).unwrap();
        assert_eq!(next, 5, "the cut batch is fetched again from its start");
        assert_eq!((seen.messages, seen.bytes), (5, 11));
        let sum = [&b"a"[..], b"bb", b"ccc", b"dddd", b"e"].iter().fold(0u64, |d, v| d.wrapping_add(fnv(v)));
        assert_eq!(seen.digest, sum);
        let b = r.builder.finish();
        let offsets = b.column_by_name("offset").unwrap().as_any().downcast_ref::<arrow::array::Int64Array>().unwrap();
        assert_eq!(offsets.values().to_vec(), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn records_before_the_fetch_offset_and_control_batches_are_skipped() {
        let mut set = batch(10, &[b"x", b"y", b"z"], 0);
        set.extend(batch(13, &[b"marker"], 0x20));
        set.extend(batch(14, &[b"w"], 0));
        let mut r = reader();
        let mut seen = Seen::default();
        assert_eq!(r.records("t", 1, &set, 11, &mut seen).unwrap(), 15);
        assert_eq!((seen.messages, seen.bytes), (3, 3), "y, z and w");
    }

    #[test]
    fn a_batch_claiming_more_records_than_it_holds_is_an_error() {
        let mut set = batch(0, &[b"a"], 0);
        let count_at = 12 + 4 + 1 + 4 + 2 + 4 + 8 + 8 + 8 + 2 + 4;
        set[count_at..count_at + 4].copy_from_slice(&2i32.to_be_bytes());
        let e = reader().records("t", 0, &set, 0, &mut Seen::default()).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
    }
}
