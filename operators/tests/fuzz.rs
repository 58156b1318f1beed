//! Structure-aware fuzzing of the ingest path: almost-valid JSON events of all three kinds
//! (extreme numbers, wrong types, missing, duplicated and escaped keys, huge and empty
//! strings, unicode, truncated and corrupted bytes, replays) through decode and the stateful
//! operators behind it (admit, dedup, windows, compress), with a snapshot and restore of every
//! operator half way.
//!
//! Asserted for every generated message: nothing panics and no operator fails; each message
//! comes out of decode exactly once (a row, a late event or a dead letter); every row an
//! operator takes in is accounted for downstream (windows count exactly what reached them, admit
//! passes or dead-letters every row); no plate or track id — in any spelling it was sent — is in
//! any column of any output or in any log line.
//!
//! `CITYSTREAM_FUZZ_EVENTS` sets the number of messages per kind (default 20,000; the README
//! gives the command for a million) and `CITYSTREAM_FUZZ_SEED` the seed.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{DataType, Int32Type, Int64Type};
use citystream_operators::decode::{self, DecodeConfig};
use citystream_operators::event_time::EventClock;
use citystream_operators::{BuildContext, Collector, Metrics, Operator, OperatorConfig};
use citystream_schemas::{EventKind, raw};

/// Markers inside every identifier the generator sends; none may come out.
const MARKERS: [&str; 3] = ["QPLATE", "QTRACK", "3141592600"];

const HOSTILE: &[&str] = &[
    "-9223372036854775808",
    "9223372036854775807",
    "18446744073709551615",
    "184467440737095516150",
    "2147483648",
    "-2147483649",
    "-1",
    "0",
    "4.5",
    "1e308",
    "-1e308",
    "1e400",
    "5e-324",
    "-0.0",
    "NaN",
    "Infinity",
    "\"NaN\"",
    "\"12\"",
    "true",
    "null",
    "[]",
    "{}",
    "[1,2]",
    "{\"a\":{\"b\":[null]}}",
    "\"\"",
    "\"\\u0000\"",
    "\"\\ud800\"",
    "\"🚦🚗\u{202e}rtl\"",
    "\"2026-13-45T99:99:99Z\"",
    "\"+275760-09-13T00:00:00Z\"",
    "\"-271821-04-20T00:00:00Z\"",
    "\"0000-01-01T00:00:00Z\"",
    "\"9999-12-31T23:59:59.999Z\"",
    "\"2026-03-02T10:00:60Z\"",
    "\"1970-01-01T00:00:00Z\"",
    "\"2026-03-02T10:00:00+25:00\"",
    "\"2026-03-02\"",
];

/// splitmix64: a small, fast, seedable generator (the test must not depend on a crate's
/// stream staying the same across versions).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
    fn f(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * ((self.next() >> 11) as f64 / (1u64 << 53) as f64)
    }
}

/// One event as key/value pairs of JSON text, so keys can repeat and values can be anything.
struct Event(Vec<(String, String)>);

impl Event {
    fn text(&self) -> Vec<u8> {
        let mut s = String::from("{");
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push('"');
            s.push_str(k);
            s.push_str("\":");
            s.push_str(v);
        }
        s.push('}');
        s.into_bytes()
    }
}

fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

fn ts_value(rng: &mut Rng, ts: i64) -> String {
    if rng.chance(0.5) {
        ts.to_string()
    } else {
        let t = chrono_free_rfc3339(ts);
        quoted(&t)
    }
}

/// RFC 3339 text of epoch milliseconds (civil-from-days, so the test needs no date crate).
fn chrono_free_rfc3339(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let rem = ms.rem_euclid(86_400_000);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

fn valid(kind: EventKind, rng: &mut Rng, n: u64, ts: i64) -> Event {
    let mut e = vec![
        ("event_id".to_owned(), quoted(&format!("{}-{n}", kind.as_str()))),
        ("ts".to_owned(), ts_value(rng, ts)),
        ("schema_version".to_owned(), "1".to_owned()),
    ];
    let device = rng.below(40);
    match kind {
        EventKind::Traffic => {
            e.push(("sensor_id".into(), quoted(&format!("loop-{device}"))));
            e.push(("segment_id".into(), quoted(&format!("seg-{}", device / 4))));
            e.push(("lane".into(), (1 + rng.below(3)).to_string()));
            e.push(("interval_s".into(), "30".into()));
            e.push(("flow".into(), rng.below(50).to_string()));
            e.push(("occupancy".into(), format!("{:.3}", rng.f(0.0, 1.0))));
            let speed = if rng.chance(0.1) { "null".to_owned() } else { format!("{:.1}", rng.f(0.0, 130.0)) };
            e.push(("speed_kmh".into(), speed));
        }
        EventKind::Camera => {
            let kinds = ["detection", "plate_read", "stalled_vehicle", "line_crossing"];
            let classes = ["car", "truck", "bus", "bicycle", "pedestrian", "other"];
            let k = *rng.pick(&kinds);
            e.push(("camera_id".into(), quoted(&format!("cam-{device}"))));
            e.push(("zone_id".into(), quoted(&format!("zone-{}", device / 5))));
            e.push(("kind".into(), quoted(k)));
            let class = classes[rng.below(classes.len())];
            e.push(("object_class".into(), quoted(class)));
            e.push(("count".into(), (1 + rng.below(4)).to_string()));
            e.push(("track_id".into(), quoted(&format!("ZQTRACK{n}"))));
            if k == "plate_read" {
                e.push(("plate".into(), quoted(&format!("ZQPLATE{n}"))));
            }
            e.push(("confidence".into(), format!("{:.3}", rng.f(0.0, 1.0))));
            if rng.chance(0.2) {
                e.push(("thumbnail".into(), quoted("aGVsbG8gd29ybGQ=")));
            }
        }
        EventKind::Environment => {
            e.push(("station_id".into(), quoted(&format!("env-{device}"))));
            for (m, hi) in [("pm25", 200.0), ("no2", 300.0), ("noise_db", 120.0), ("temp_c", 40.0)] {
                e.push((m.into(), format!("{:.2}", rng.f(0.0, hi))));
            }
        }
    }
    Event(e)
}

/// An identifier value in a hostile form; every form carries a marker.
fn hostile_identifier(rng: &mut Rng, n: u64) -> String {
    match rng.below(6) {
        0 => format!("{}", 31_415_926_000u64 * 10 + n % 10),
        1 => format!("[\"ZQPLATE{n}\",\"ZQPLATE{n}b\"]"),
        2 => format!("{{\"v\":\"ZQPLATE{n}\",\"w\":\"ZQTRACK{n}\"}}"),
        3 => quoted(&format!("ZQPLATE{n}{}", "x".repeat(rng.below(300)))),
        4 => format!("\"\\u005aQPLATE{n}\""),
        _ => quoted(&format!("ZQPLATE{n}\u{1f697}\u{0}")),
    }
}

fn mutate(kind: EventKind, rng: &mut Rng, e: &mut Event, n: u64) {
    let len = e.0.len();
    match rng.below(9) {
        // a field goes missing
        0 => {
            e.0.remove(rng.below(len));
        }
        // a value of the wrong type or out of any range
        1 | 2 => {
            let i = rng.below(len);
            e.0[i].1 = (*rng.pick(HOSTILE)).to_owned();
        }
        // a string of extreme length
        3 => {
            let i = rng.below(len);
            let s = if rng.chance(0.5) { String::new() } else { "é".repeat(5_000 + rng.below(20_000)) };
            e.0[i].1 = quoted(&s);
        }
        // a key repeated with another value, or an unknown key
        4 => {
            let i = rng.below(len);
            let (k, _) = e.0[i].clone();
            e.0.push((k, (*rng.pick(HOSTILE)).to_owned()));
            if rng.chance(0.3) {
                e.0.push(("unexpected".into(), "1".into()));
            }
        }
        // identifiers: escaped or re-cased keys, other types, inside lists and objects
        5 | 6 if kind == EventKind::Camera => {
            let key = match rng.below(5) {
                0 => "pl\\u0061te",
                1 => "Plate",
                2 => "track\\u005fid",
                3 => "TRACK_ID",
                _ => "plate",
            };
            e.0.push((key.into(), hostile_identifier(rng, n)));
        }
        // an identifier sent on a stream that has none
        5 | 6 => {
            e.0.push(("plate".into(), hostile_identifier(rng, n)));
        }
        // the timestamp at the edges
        7 => {
            let t =
                *rng.pick(&[i64::MIN, i64::MAX, -1, 0, 253_402_300_799_999, 253_402_300_800_000, -62_135_596_800_000]);
            if let Some(ts) = e.0.iter_mut().find(|(k, _)| k == "ts") {
                ts.1 = ts_value(rng, t);
            }
        }
        // an id of extreme length
        _ => {
            if let Some(id) = e.0.iter_mut().find(|(k, _)| k == "event_id") {
                id.1 = quoted(&"i".repeat(*rng.pick(&[0usize, 1, 128, 129, 4096])));
            }
        }
    }
}

/// Byte-level damage to a message. Flips and insertions stay clear of identifier keys and
/// values: a damaged key is no identifier key to any parser (`"plat\xffe"` is another field),
/// so its value is not an identifier by the definition the redaction implements.
fn corrupt(rng: &mut Rng, bytes: &mut Vec<u8>) {
    let marked: Vec<usize> = MARKERS
        .iter()
        .flat_map(|m| {
            bytes.windows(m.len()).enumerate().filter(|(_, w)| *w == m.as_bytes()).map(|(i, _)| i).collect::<Vec<_>>()
        })
        .collect();
    let guarded = match (marked.iter().min(), marked.iter().max()) {
        (Some(lo), Some(hi)) => lo.saturating_sub(24)..hi + 40,
        _ => 0..0,
    };
    let spot = |rng: &mut Rng, len: usize| {
        let i = rng.below(len);
        (!guarded.contains(&i)).then_some(i)
    };
    match rng.below(8) {
        0 if !bytes.is_empty() => bytes.truncate(rng.below(bytes.len())),
        1 if !bytes.is_empty() => {
            if let Some(i) = spot(rng, bytes.len()) {
                bytes[i] ^= 1 << rng.below(8);
            }
        }
        2 => {
            if let Some(i) = spot(rng, bytes.len() + 1) {
                bytes.insert(i, *rng.pick(&[0xff, 0xc3, b'\\', b'"', b'{', 0]));
            }
        }
        3 => {
            bytes.insert(0, b'[');
            bytes.push(b']');
        }
        4 => *bytes = rng.pick(&[&b""[..], b"null", b"{}", b"[]", b"{\"a\":"]).to_vec(),
        // double-encoded (a producer that serialized twice), or sent as UTF-16
        6 => *bytes = serde_json::to_vec(&String::from_utf8_lossy(bytes)).unwrap(),
        7 => *bytes = String::from_utf8_lossy(bytes).encode_utf16().flat_map(u16::to_le_bytes).collect(),
        _ => bytes.extend_from_slice(b" trailing"),
    }
}

/// The messages of one kind: (partition, payload), in the order they arrive.
fn messages(kind: EventKind, rng: &mut Rng, count: u64) -> Vec<(i32, Vec<u8>)> {
    let start = 1_772_409_600_000i64; // 2026-03-02T00:00Z
    let mut out: Vec<(i32, Vec<u8>)> = Vec::with_capacity(count as usize);
    let mut clock = [start; 3];
    for n in 0..count {
        let p = rng.below(3) as i32;
        clock[p as usize] += rng.below(400) as i64;
        // a replay of an earlier message, byte for byte, on the same partition
        if n > 10 && rng.chance(0.03) {
            let (q, bytes) = out[out.len() - 1 - rng.below(out.len().min(50))].clone();
            out.push((q, bytes));
            continue;
        }
        let jitter = rng.below(20_000) as i64 - 10_000;
        let mut e = valid(kind, rng, n, clock[p as usize] + jitter);
        let mut bytes = if rng.chance(0.45) {
            e.text()
        } else {
            for _ in 0..1 + rng.below(3) {
                mutate(kind, rng, &mut e, n);
            }
            e.text()
        };
        if rng.chance(0.08) {
            corrupt(rng, &mut bytes);
        }
        out.push((p, bytes));
    }
    out
}

/// Log lines written while the test runs, at every level.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every string and byte value in `b`, for the identifier scan.
fn scan(b: &RecordBatch, what: &str) {
    for (f, col) in b.schema().fields().iter().zip(b.columns()) {
        let values: Vec<&[u8]> = match f.data_type() {
            DataType::Utf8 => col.as_string::<i32>().iter().flatten().map(str::as_bytes).collect(),
            DataType::Binary => col.as_binary::<i32>().iter().flatten().collect(),
            _ => continue,
        };
        for v in values {
            for m in MARKERS {
                assert!(
                    !v.windows(m.len()).any(|w| w == m.as_bytes()),
                    "an identifier reached {what}.{}: {}",
                    f.name(),
                    String::from_utf8_lossy(&v[..v.len().min(300)])
                );
            }
        }
    }
}

fn positions(batches: &[RecordBatch]) -> Vec<(i32, i64)> {
    let mut out = Vec::new();
    for b in batches {
        let p = b.column_by_name("src_partition").unwrap().as_primitive::<Int32Type>();
        let o = b.column_by_name("src_offset").unwrap().as_primitive::<Int64Type>();
        out.extend(p.values().iter().copied().zip(o.values().iter().copied()));
    }
    out
}

fn rows(batches: &[RecordBatch]) -> usize {
    batches.iter().map(RecordBatch::num_rows).sum()
}

/// One operator and everything it emitted, per port.
struct Node {
    name: &'static str,
    cfg: Box<dyn OperatorConfig>,
    input: arrow::datatypes::SchemaRef,
    ctx: BuildContext,
    op: Box<dyn Operator>,
    out: Vec<Vec<RecordBatch>>,
    taken: usize,
}

impl Node {
    fn new(
        name: &'static str,
        cfg: Box<dyn OperatorConfig>,
        input: arrow::datatypes::SchemaRef,
        ctx: BuildContext,
    ) -> Self {
        let op = cfg.build(&input, &ctx).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let ports = op.outputs().len();
        Self { name, cfg, input, ctx, op, out: vec![Vec::new(); ports], taken: 0 }
    }

    fn collect(&mut self, c: &mut Collector) -> Vec<RecordBatch> {
        let mut main = Vec::new();
        for (p, b) in c.drain() {
            scan(&b, self.name);
            if p == 0 {
                main.push(b.clone());
            }
            self.out[p].push(b);
        }
        main
    }

    fn process(&mut self, batch: RecordBatch) -> Vec<RecordBatch> {
        self.taken += batch.num_rows();
        let mut c = Collector::new(self.out.len());
        self.op.process_batch(batch, &mut c).unwrap_or_else(|e| panic!("{}: {e}", self.name));
        self.collect(&mut c)
    }

    fn watermark(&mut self, wm: i64) -> Vec<RecordBatch> {
        let mut c = Collector::new(self.out.len());
        self.op.on_watermark(wm, &mut c).unwrap_or_else(|e| panic!("{}: {e}", self.name));
        self.collect(&mut c)
    }

    fn end(&mut self) -> Vec<RecordBatch> {
        let mut c = Collector::new(self.out.len());
        self.op.on_end(&mut c).unwrap_or_else(|e| panic!("{}: {e}", self.name));
        self.collect(&mut c)
    }

    /// Snapshot, then a fresh operator restored from it (a restart).
    fn restart(&mut self) {
        let mut c = Collector::new(self.out.len());
        self.op.on_checkpoint(&mut c).unwrap_or_else(|e| panic!("{}: {e}", self.name));
        assert_eq!(c.drain().count(), 0, "{}: a checkpoint emitted rows (they would be lost here)", self.name);
        let state = self.op.snapshot().unwrap_or_else(|e| panic!("{}: {e}", self.name));
        self.op = self.cfg.build(&self.input, &self.ctx).unwrap();
        if let Some(state) = state {
            scan(&state, &format!("{} state", self.name));
            self.op.restore(state).unwrap_or_else(|e| panic!("{}: restore: {e}", self.name));
        }
    }
}

fn yaml<T: serde::de::DeserializeOwned>(text: &str) -> T {
    serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn kind_setup(kind: EventKind) -> (&'static str, &'static str, &'static str) {
    match kind {
        EventKind::Traffic => ("sensor_id", "segment_id", "{speed_kmh: {abs: 5.0}, occupancy: {abs: 0.02}}"),
        EventKind::Camera => ("camera_id", "zone_id", "{confidence: {abs: 0.1}}"),
        EventKind::Environment => ("station_id", "station_id", "{pm25: {abs: 2.0}, noise_db: {abs: 1.0}}"),
    }
}

fn fuzz_kind(kind: EventKind, count: u64, seed: u64) -> String {
    let mut rng = Rng(seed ^ kind as u64);
    let msgs = messages(kind, &mut rng, count);
    let metrics = Metrics::new();
    let clock = EventClock::new(30_000);
    let ctx = |stage: &str| BuildContext { stage: stage.into(), metrics: metrics.clone(), ..Default::default() };
    let mut dcfg = DecodeConfig::new(kind);
    if kind == EventKind::Camera {
        dcfg.pseudonymize = Some(yaml("{secret_env: CITYSTREAM_FUZZ_SECRET, rotate: 1d}"));
    }
    let (device, group, fields) = kind_setup(kind);
    let mut decode = Node::new(
        "decode",
        Box::new(dcfg),
        raw::schema(),
        BuildContext { event_clock: Some(clock.clone()), ..ctx("decode") },
    );
    let typed = kind.schema();
    let admit_cfg: citystream_operators::admit::AdmitConfig =
        yaml(&format!("{{per_key: {{key: [{device}], rate: 60/m, burst: 20}}, policy: drop}}"));
    let mut admit = Node::new("admit", Box::new(admit_cfg), typed.clone(), ctx("admit"));
    let dedup_cfg: citystream_operators::dedup::DedupConfig = yaml("{horizon: 10m}");
    let mut dedup = Node::new("dedup", Box::new(dedup_cfg), typed.clone(), ctx("dedup"));
    let window_cfg: citystream_operators::window::WindowConfig = match kind {
        EventKind::Traffic => yaml(&format!(
            "{{key: [{group}], size: 5m, allowed_lateness: 1m, aggregates: [{{fn: count, as: n}}, \
             {{fn: sum, column: flow, as: vehicles}}, {{fn: quantile, column: speed_kmh, q: 0.85, as: p85}}, \
             {{fn: mean, column: occupancy, as: occ}}, {{fn: rate_per_hour, column: flow, as: flow_h}}]}}"
        )),
        EventKind::Environment => yaml(&format!(
            "{{key: [{group}], size: 1h, allowed_lateness: 2m, aggregates: [{{fn: count, as: n}}, \
             {{fn: mean, column: pm25, as: pm25}}, {{fn: max, column: noise_db, as: noise}}]}}"
        )),
        EventKind::Camera => yaml(&format!(
            "{{key: [{group}, kind, object_class], size: 5m, allowed_lateness: 1m, aggregates: \
             [{{fn: count, as: n}}, {{fn: sum, column: count, as: objects}}]}}"
        )),
    };
    let mut window = Node::new("window", Box::new(window_cfg), typed.clone(), ctx("window"));
    let compress_cfg: citystream_operators::compress::CompressConfig =
        yaml(&format!("{{key: [{device}], fields: {fields}, max_gap: 10m}}"));
    let mut compress = Node::new("compress", Box::new(compress_cfg), typed.clone(), ctx("compress"));

    let source = format!("city.{}", kind.as_str());
    let mut offsets = [0i64; 3];
    let batch_size = 512;
    let chunks: Vec<_> = msgs.chunks(batch_size).collect();
    let started = std::time::Instant::now();
    for (i, chunk) in chunks.iter().enumerate() {
        let mut b = raw::RawBatchBuilder::with_capacity(chunk.len(), chunk.len() * 300);
        for (p, bytes) in chunk.iter() {
            let o = &mut offsets[*p as usize];
            // arrival time: the partition's newest event time so far (a calm live run)
            b.append(&source, *p, *o, 1_772_409_600_000 + *o * 200 + 86_400_000, bytes);
            *o += 1;
        }
        let typed_rows = decode.process(b.finish());
        // the stream's watermark: the slowest partition's (partitions that spoke only)
        let wm = clock.watermarks().values().copied().min();
        let mut pass = |rows: Vec<RecordBatch>| {
            let mut admitted = Vec::new();
            for r in rows {
                admitted.extend(admit.process(r));
            }
            let mut unique = Vec::new();
            for r in admitted {
                unique.extend(dedup.process(r));
            }
            for r in unique {
                window.process(r.clone());
                compress.process(r);
            }
        };
        pass(typed_rows);
        if let Some(wm) = wm {
            let mut flushed = admit.watermark(wm);
            let mut unique = Vec::new();
            for r in flushed.drain(..) {
                unique.extend(dedup.process(r));
            }
            unique.extend(dedup.watermark(wm));
            for r in unique {
                window.process(r.clone());
                compress.process(r);
            }
            window.watermark(wm);
            compress.watermark(wm);
        }
        if i == chunks.len() / 2 {
            for n in [&mut decode, &mut admit, &mut dedup, &mut window, &mut compress] {
                n.restart();
            }
        }
    }
    let mut tail = admit.end();
    let mut unique = Vec::new();
    for r in tail.drain(..) {
        unique.extend(dedup.process(r));
    }
    unique.extend(dedup.end());
    for r in unique {
        window.process(r.clone());
        compress.process(r);
    }
    decode.end();
    window.end();
    compress.end();
    let elapsed = started.elapsed();

    // decode: every message exactly once, as a row, a late event or a dead letter
    let mut seen = positions(&decode.out[decode::MAIN]);
    seen.extend(positions(&decode.out[decode::LATE_EVENTS]));
    seen.extend(positions(&decode.out[decode::DEAD_LETTERS]));
    let total = seen.len();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), total, "{kind:?}: a message came out of decode twice");
    assert_eq!(total as u64, count, "{kind:?}: decode lost messages");
    // admit passes or dead-letters every row it took
    assert_eq!(rows(&admit.out[0]) + rows(&admit.out[1]), admit.taken, "{kind:?}: admit");
    // dedup: what it passes or calls late comes from what it took, each at most once
    let mut kept = positions(&dedup.out[0]);
    kept.extend(positions(&dedup.out[1]));
    let n = kept.len();
    kept.sort_unstable();
    kept.dedup();
    assert_eq!(kept.len(), n, "{kind:?}: dedup emitted a row twice");
    assert!(n <= dedup.taken);
    // windows count exactly what reached them, on time or late
    let counted: i64 = window.out[0]
        .iter()
        .map(|b| b.column_by_name("n").unwrap().as_primitive::<Int64Type>().iter().flatten().sum::<i64>())
        .sum();
    assert_eq!(counted as usize + rows(&window.out[1]), window.taken, "{kind:?}: windows lost or doubled rows");
    // compress keeps a subset, each row at most once
    let mut stored = positions(&compress.out[0]);
    stored.extend(positions(&compress.out[1]));
    let n = stored.len();
    stored.sort_unstable();
    stored.dedup();
    assert_eq!(stored.len(), n, "{kind:?}: compress emitted a row twice");

    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for b in &decode.out[decode::DEAD_LETTERS] {
        for r in b.column_by_name("reason_code").unwrap().as_string::<i32>().iter().flatten() {
            *reasons.entry(r.to_owned()).or_default() += 1;
        }
    }
    format!(
        "{kind:?}: {count} messages in {:.2} s ({:.0}/s): {} rows, {} late, {} dead letters {reasons:?}; \
         admit dropped {}; dedup kept {}; {} windows; compress kept {}",
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64(),
        rows(&decode.out[decode::MAIN]),
        rows(&decode.out[decode::LATE_EVENTS]),
        rows(&decode.out[decode::DEAD_LETTERS]),
        rows(&admit.out[1]),
        rows(&dedup.out[0]),
        rows(&window.out[0]),
        rows(&compress.out[0]),
    )
}

#[test]
fn hostile_events_are_data_never_crashes_and_never_leak_an_identifier() {
    let count: u64 = std::env::var("CITYSTREAM_FUZZ_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let seed: u64 = std::env::var("CITYSTREAM_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed);
    // SAFETY: set before any thread of this test reads the environment
    unsafe { std::env::set_var("CITYSTREAM_FUZZ_SECRET", "fuzz-secret-of-at-least-thirty-two-bytes!!") };
    let logs = Logs::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    let summary = tracing::subscriber::with_default(subscriber, || {
        EventKind::ALL.iter().map(|k| fuzz_kind(*k, count, seed)).collect::<Vec<_>>()
    });
    let logs = logs.0.lock().unwrap();
    for m in MARKERS {
        assert!(!logs.windows(m.len()).any(|w| w == m.as_bytes()), "an identifier reached the log");
    }
    eprintln!("seed {seed:#x}\n{}", summary.join("\n"));
}
