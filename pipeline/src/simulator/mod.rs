//! The embedded city simulator: a deterministic (seeded) synthetic city that emits traffic,
//! camera and environment events as the devices would send them — JSON, with realistic
//! network delays and injected faults (exact duplicates, re-sent readings, out-of-order and late
//! delivery, malformed messages) — and writes the ground truth (road graph, incidents, what it
//! emitted) so tests and model training can check against it.
//!
//! [`Simulation`] is a plain iterator over simulated time (no runtime, no I/O); the
//! `simulator` source and `citystream simulate` drive it.

mod city;
mod emit;
mod source;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::fmt;
use std::io::Write as _;
use std::path::Path;

use citystream_operators::Duration;
use citystream_schemas::EventKind;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use city::{City, CityConfig, Incident, STEP_S, Segment, daily_profile};

/// How fast simulated time runs.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Speed {
    /// As fast as the pipeline takes events.
    #[default]
    Max,
    /// Simulated time runs `factor` times as fast as wall-clock time (1 = real time).
    Factor(f64),
}

impl<'de> Deserialize<'de> for Speed {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Speed;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`max`, `realtime`, or a positive speed-up factor such as 60")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Speed, E> {
                match v {
                    "max" => Ok(Speed::Max),
                    "realtime" => Ok(Speed::Factor(1.0)),
                    _ => Err(E::custom(format!(
                        "invalid speed `{v}`: expected `max`, `realtime`, or a positive factor such as 60"
                    ))),
                }
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Speed, E> {
                if v.is_finite() && v > 0.0 {
                    Ok(Speed::Factor(v))
                } else {
                    Err(E::custom(format!("invalid speed {v}: a factor must be positive")))
                }
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Speed, E> {
                self.visit_f64(v as f64)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Speed, E> {
                self.visit_f64(v as f64)
            }
        }
        d.deserialize_any(V)
    }
}

/// Rates of injected faults, each a probability per emitted event.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultConfig {
    /// The same message (same bytes) delivered twice. Default 0.01.
    pub duplicate_rate: f64,
    /// The same reading re-sent by a redundant gateway with a new `event_id`. Default 0.005.
    pub resend_rate: f64,
    /// Delivered 5 to 90 s late (within usual watermark bounds). Default 0.02.
    pub out_of_order_rate: f64,
    /// Delivered 10 to 40 minutes late. Default 0.002.
    pub late_rate: f64,
    /// Corrupted so that decoding must reject it. Default 0.003.
    pub malformed_rate: f64,
}

impl Default for FaultConfig {
    fn default() -> Self {
        Self {
            duplicate_rate: 0.01,
            resend_rate: 0.005,
            out_of_order_rate: 0.02,
            late_rate: 0.002,
            malformed_rate: 0.003,
        }
    }
}

impl FaultConfig {
    /// No faults at all.
    pub fn none() -> Self {
        Self { duplicate_rate: 0.0, resend_rate: 0.0, out_of_order_rate: 0.0, late_rate: 0.0, malformed_rate: 0.0 }
    }
}

/// A point in time written as RFC 3339 text in YAML, or `now` (the current minute).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartTime(pub Option<i64>);

impl StartTime {
    /// RFC 3339 text, or `now`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "now" {
            return Ok(StartTime(None));
        }
        chrono::DateTime::parse_from_rfc3339(s)
            .map(|t| StartTime(Some(t.timestamp_millis())))
            .map_err(|e| format!("invalid start `{s}`: expected RFC 3339 text or `now` ({e})"))
    }
}

impl<'de> Deserialize<'de> for StartTime {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        StartTime::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Default for StartTime {
    fn default() -> Self {
        StartTime(Some(DEFAULT_START_MS))
    }
}

/// 2026-03-02T00:00:00Z, a Monday: the default simulated start.
pub const DEFAULT_START_MS: i64 = 1_772_409_600_000;

fn d_seed() -> u64 {
    42
}
fn d_duration() -> Duration {
    Duration::from_secs(86_400)
}
fn d_batch_rows() -> usize {
    8192
}
fn d_traffic_interval() -> Duration {
    Duration::from_secs(30)
}
fn d_ooo() -> Duration {
    Duration::from_secs(120)
}
fn d_thumbnail_rate() -> f64 {
    0.05
}
fn d_plate_rate() -> f64 {
    0.03
}

/// YAML of a `simulator` source.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatorConfig {
    /// Seed of every random draw: the same seed and config give the same events. Default 42.
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// First simulated instant: RFC 3339 or `now`. Default 2026-03-02T00:00:00Z (a Monday).
    #[serde(default)]
    pub start: StartTime,
    /// Simulated time span. Default `1d`.
    #[serde(default = "d_duration")]
    pub duration: Duration,
    /// `max` (default), `realtime`, or a speed-up factor.
    #[serde(default)]
    pub speed: Speed,
    /// Largest raw batch handed to the pipeline, rows. Default 8192.
    #[serde(default = "d_batch_rows")]
    pub batch_rows: usize,
    /// Reporting interval of traffic detectors. Default `30s`.
    #[serde(default = "d_traffic_interval")]
    pub traffic_interval: Duration,
    /// Watermark lag behind the newest simulated time: the out-of-orderness bound. Default `2m`.
    #[serde(default = "d_ooo")]
    pub max_out_of_orderness: Duration,
    /// Share of camera detections that carry a thumbnail. Default 0.05.
    #[serde(default = "d_thumbnail_rate")]
    pub thumbnail_rate: f64,
    /// Share of passing vehicles whose plate a camera reads. Default 0.03.
    #[serde(default = "d_plate_rate")]
    pub plate_read_rate: f64,
    /// The city's size and shape.
    #[serde(default)]
    pub city: CityConfig,
    /// Injected faults.
    #[serde(default)]
    pub faults: FaultConfig,
    /// Folder for the ground truth (road graph, incidents, emitted counts); none if absent.
    #[serde(default)]
    pub ground_truth: Option<crate::primitives::EnvString>,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        serde_saphyr::from_str("{}").expect("defaults deserialize")
    }
}

/// One message as a device would put it on the wire.
#[derive(Debug, Clone)]
pub struct SimMessage {
    /// Its event kind (the topic).
    pub kind: EventKind,
    /// The Kafka key: what the topics are keyed by (`deploy/kafka.yaml`'s `keys`) — a traffic
    /// reading's corridor (as in `road_graph.csv`), a camera's zone, a station's id.
    pub key: String,
    /// The JSON payload (or garbage, for malformed ones).
    pub payload: Vec<u8>,
    /// When it reaches the pipeline (UTC ms): event time plus network delay.
    pub arrival_ms: i64,
}

/// What the simulator emitted, per kind: the ground truth for counts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KindCounts {
    /// Readings generated (before faults).
    pub generated: u64,
    /// Messages emitted that decode as valid (including duplicates and re-sends).
    pub valid: u64,
    /// Messages corrupted so that decoding rejects them.
    pub malformed: u64,
    /// Exact duplicates emitted (each also counted in `valid`).
    pub duplicates: u64,
    /// Re-sent readings with a new event id (each also counted in `valid`).
    pub resent: u64,
    /// Messages delivered out of order (5 to 90 s late).
    pub out_of_order: u64,
    /// Messages delivered 10 to 40 minutes late.
    pub late: u64,
}

impl KindCounts {
    fn add(&mut self, o: &KindCounts) {
        self.generated += o.generated;
        self.valid += o.valid;
        self.malformed += o.malformed;
        self.duplicates += o.duplicates;
        self.resent += o.resent;
        self.out_of_order += o.out_of_order;
        self.late += o.late;
    }
}

/// The simulator's account of a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SimReport {
    /// Seed used.
    pub seed: u64,
    /// First simulated instant (UTC ms).
    pub start_ms: i64,
    /// End of the simulated span (UTC ms).
    pub end_ms: i64,
    /// Counts per kind name.
    pub kinds: BTreeMap<String, KindCounts>,
    /// Injected incidents.
    pub incidents: usize,
    /// Distinct plates read (raw values are written to `plates.txt`, never to the data).
    pub distinct_plates: usize,
}

impl SimReport {
    /// Counts of `kind`.
    pub fn counts(&self, kind: EventKind) -> KindCounts {
        self.kinds.get(kind.as_str()).cloned().unwrap_or_default()
    }
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Pending {
    arrival_ms: i64,
    seq: u64,
    kind: EventKind,
    key: String,
    payload: Vec<u8>,
}

/// A running simulation.
pub struct Simulation {
    cfg: SimulatorConfig,
    rng: ChaCha8Rng,
    city: City,
    sites: emit::Sites,
    t_ms: i64,
    start_ms: i64,
    end_ms: i64,
    pending: BinaryHeap<Reverse<Pending>>,
    seq: u64,
    counts: [KindCounts; 3],
    plates: std::collections::BTreeSet<String>,
    /// The showers so far: (start, end, mm/h), the last one open (`end` i64::MAX) while it rains.
    rain: Vec<(i64, i64, f64)>,
}

fn kind_index(kind: EventKind) -> usize {
    match kind {
        EventKind::Traffic => 0,
        EventKind::Camera => 1,
        EventKind::Environment => 2,
    }
}

impl Simulation {
    /// A simulation of `cfg`; `now_ms` resolves a `start: now`.
    pub fn new(cfg: SimulatorConfig, now_ms: i64) -> Self {
        let start_ms = cfg.start.0.unwrap_or(now_ms - now_ms.rem_euclid(60_000));
        let end_ms = start_ms + cfg.duration.as_millis_i64();
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let mut city = City::new(&cfg.city, &mut rng, start_ms, end_ms);
        city.plan_detector_faults(cfg.city.detector_faults_per_day, cfg.seed, start_ms, end_ms);
        let sites = emit::Sites::new(&cfg, &city, &mut rng);
        Self {
            cfg,
            rng,
            city,
            sites,
            t_ms: start_ms,
            start_ms,
            end_ms,
            pending: BinaryHeap::new(),
            seq: 0,
            rain: Vec::new(),
            counts: Default::default(),
            plates: Default::default(),
        }
    }

    /// The simulated clock: the start of the next step.
    pub fn now_ms(&self) -> i64 {
        self.t_ms
    }

    /// First simulated instant.
    pub fn start_ms(&self) -> i64 {
        self.start_ms
    }

    /// The city (road graph, incidents).
    pub fn city(&self) -> &City {
        &self.city
    }

    /// The configuration.
    pub fn config(&self) -> &SimulatorConfig {
        &self.cfg
    }

    /// True once every message has been delivered.
    pub fn is_done(&self) -> bool {
        self.t_ms >= self.end_ms && self.pending.is_empty()
    }

    /// Advances one step of [`STEP_S`] seconds and appends every message that has arrived by
    /// its end to `out`, in arrival order. After the simulated span it drains what is still in
    /// flight. Returns false when there is nothing left.
    pub fn step(&mut self, out: &mut Vec<SimMessage>) -> bool {
        if self.is_done() {
            return false;
        }
        let horizon = if self.t_ms < self.end_ms {
            self.city.step(&mut self.rng, self.t_ms);
            self.record_rain();
            let mut batch = Vec::new();
            emit::generate(&self.cfg, &self.city, &mut self.sites, &mut self.rng, self.t_ms, &mut batch);
            for (kind, key, payload, ts) in batch {
                self.deliver(kind, key, payload, ts);
            }
            self.t_ms += STEP_S * 1000;
            self.t_ms
        } else {
            i64::MAX
        };
        while let Some(Reverse(p)) = self.pending.peek() {
            if p.arrival_ms > horizon {
                break;
            }
            let Reverse(p) = self.pending.pop().expect("peeked");
            out.push(SimMessage { kind: p.kind, key: p.key, payload: p.payload, arrival_ms: p.arrival_ms });
        }
        true
    }

    fn push(&mut self, kind: EventKind, key: &str, payload: Vec<u8>, arrival_ms: i64) {
        self.seq += 1;
        self.pending.push(Reverse(Pending { arrival_ms, seq: self.seq, kind, key: key.to_owned(), payload }));
    }

    /// Delivers a reading with the configured faults. An empty `key` is a reading a silent
    /// detector did not send: it takes the same random draws as any reading, so every other
    /// message is the same with or without detector faults, and nothing is delivered.
    fn deliver(&mut self, kind: EventKind, key: String, payload: Vec<u8>, ts: i64) {
        let f = self.cfg.faults.clone();
        let ki = kind_index(kind);
        let sent = !key.is_empty();
        let mut counts = KindCounts::default();
        counts.generated += 1;
        // only camera messages carry plates
        if kind == EventKind::Camera
            && let Some(plate) = emit::plate_in(&payload)
        {
            self.plates.insert(plate);
        }
        let mut out = Vec::new();
        if self.rng.random::<f64>() < f.malformed_rate {
            let bad = emit::corrupt(&payload, &mut self.rng);
            let delay = self.rng.random_range(50..2000);
            counts.malformed += 1;
            out.push((bad, ts + delay));
        } else {
            let r = self.rng.random::<f64>();
            let delay = if r < f.late_rate {
                counts.late += 1;
                self.rng.random_range(600_000..2_400_000)
            } else if r < f.late_rate + f.out_of_order_rate {
                counts.out_of_order += 1;
                self.rng.random_range(5_000..90_000)
            } else {
                self.rng.random_range(50..2_000)
            };
            let arrival = ts + delay;
            counts.valid += 1;
            if self.rng.random::<f64>() < f.duplicate_rate {
                let again = arrival + self.rng.random_range(500..120_000);
                counts.valid += 1;
                counts.duplicates += 1;
                out.push((payload.clone(), again));
            }
            if self.rng.random::<f64>() < f.resend_rate {
                let again = arrival + self.rng.random_range(1_000..60_000);
                counts.valid += 1;
                counts.resent += 1;
                out.push((emit::with_new_event_id(&payload), again));
            }
            out.push((payload, arrival));
        }
        if sent {
            self.counts[ki].add(&counts);
            for (payload, arrival) in out {
                self.push(kind, &key, payload, arrival);
            }
        }
    }

    /// The account of everything emitted so far.
    pub fn report(&self) -> SimReport {
        SimReport {
            seed: self.cfg.seed,
            start_ms: self.start_ms,
            end_ms: self.end_ms,
            kinds: EventKind::ALL
                .iter()
                .map(|k| (k.as_str().to_owned(), self.counts[kind_index(*k)].clone()))
                .collect(),
            incidents: self.city.incidents.len(),
            distinct_plates: self.plates.len(),
        }
    }

    /// Notes a shower's start or end: the weather of the step just taken, from `t_ms`.
    fn record_rain(&mut self) {
        let raining = self.city.weather.rain_mm_h > 0.0;
        match self.rain.last_mut() {
            Some(shower) if shower.1 == i64::MAX && !raining => shower.1 = self.t_ms,
            Some(shower) if shower.1 == i64::MAX => {}
            _ if raining => self.rain.push((self.t_ms, i64::MAX, self.city.weather.rain_mm_h)),
            _ => {}
        }
    }

    /// The showers so far, (start, end, mm/h) in UTC ms; one still falling ends at the
    /// simulated span's end.
    pub fn rain_spans(&self) -> Vec<(i64, i64, f64)> {
        self.rain.iter().map(|&(start, end, mm)| (start, end.min(self.end_ms), mm)).collect()
    }

    /// Writes the ground truth into `dir`: the plan ([`write_plan`](Self::write_plan)), then
    /// `weather.csv` (the showers so far; only its header when it stayed dry), `plates.txt`
    /// (raw plates: for privacy tests only) and `report.json`.
    pub fn write_ground_truth(&self, dir: &Path) -> std::io::Result<()> {
        self.write_plan(dir)?;
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("weather.csv"))?);
        writeln!(f, "start,end,rain_mm_h")?;
        for (start, end, mm) in self.rain_spans() {
            writeln!(f, "{},{},{mm:.2}", rfc3339(start), rfc3339(end))?;
        }
        f.flush()?;
        std::fs::write(dir.join("plates.txt"), self.plates.iter().map(|p| format!("{p}\n")).collect::<String>())?;
        std::fs::write(
            dir.join("report.json"),
            serde_json::to_vec_pretty(&self.report()).map_err(std::io::Error::other)?,
        )?;
        Ok(())
    }

    /// Writes what is known before the first event: `road_graph.csv`, `incidents.csv` (the
    /// injected incidents), `detector_faults.csv`, `cameras.csv` and `stations.csv` (so a live
    /// test can score alerts while the simulation runs).
    pub fn write_plan(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("road_graph.csv"))?);
        writeln!(
            f,
            "segment_id,corridor,upstream,downstream,lat,lon,length_m,lanes,free_speed_kmh,capacity_vphpl,zone_id"
        )?;
        for s in &self.city.segments {
            writeln!(
                f,
                "{},{},{},{},{:.6},{:.6},{:.1},{},{},{},{}",
                s.segment_id,
                s.corridor,
                s.upstream.as_deref().unwrap_or(""),
                s.downstream.as_deref().unwrap_or(""),
                s.lat,
                s.lon,
                s.length_m,
                s.lanes,
                s.free_speed_kmh,
                s.capacity_vphpl,
                s.zone_id
            )?;
        }
        f.flush()?;
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("detector_faults.csv"))?);
        writeln!(f, "sensor_id,kind,start,end")?;
        for d in &self.city.detector_faults {
            let kind = match d.kind {
                city::DetectorFaultKind::Stuck => "stuck",
                city::DetectorFaultKind::Silent => "silent",
            };
            writeln!(f, "{},{kind},{},{}", d.sensor_id, rfc3339(d.start_ms), rfc3339(d.end_ms))?;
        }
        f.flush()?;
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("incidents.csv"))?);
        writeln!(f, "incident_id,segment_id,start,end,capacity_factor")?;
        for i in &self.city.incidents {
            writeln!(
                f,
                "{},{},{},{},{:.3}",
                i.incident_id,
                i.segment_id,
                rfc3339(i.start_ms),
                rfc3339(i.end_ms),
                i.capacity_factor
            )?;
        }
        f.flush()?;
        self.sites.write_csv(dir)
    }
}

/// `ms` as RFC 3339 text with milliseconds, UTC (`2026-03-02T07:45:00.250Z`).
pub fn rfc3339(ms: i64) -> String {
    let mut out = Vec::with_capacity(24);
    push_rfc3339(&mut out, ms);
    out.iter().map(|&c| c as char).collect()
}

/// Appends [`rfc3339`]'s text.
pub(crate) fn push_rfc3339(out: &mut Vec<u8>, ms: i64) {
    use chrono::{Datelike, Timelike};
    let Some(t) = chrono::DateTime::from_timestamp_millis(ms) else {
        out.extend_from_slice(ms.to_string().as_bytes());
        return;
    };
    let year = t.year();
    let Ok(year @ 0..=9999) = u32::try_from(year) else {
        out.extend_from_slice(t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string().as_bytes());
        return;
    };
    // digit by digit: chrono's formatter parses its pattern at every call, and the simulator
    // writes a timestamp per traffic event
    let mut b = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut v: u32| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, t.month());
    put(8, 2, t.day());
    put(11, 2, t.hour());
    put(14, 2, t.minute());
    put(17, 2, t.second());
    put(20, 3, t.timestamp_subsec_millis());
    out.extend_from_slice(&b);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_writes_what_chrono_writes() {
        let chrono_text =
            |ms: i64| chrono::DateTime::from_timestamp_millis(ms).unwrap().format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        // 2024-02-29 (a leap day), the epoch, before it, year 1 and year 9999, and random times
        let mut cases = vec![1_709_164_800_123, 0, -1, -62_135_596_800_000, 253_402_300_799_999];
        cases.extend((0..10_000).map(|_| rng.random_range(-62_135_596_800_000..253_402_300_799_999)));
        for ms in cases {
            assert_eq!(rfc3339(ms), chrono_text(ms), "{ms}");
        }
        // outside four-digit years chrono's text stands
        assert_eq!(rfc3339(253_402_300_800_000), chrono_text(253_402_300_800_000));
    }
    use citystream_schemas::raw::RawBatchBuilder;
    use citystream_schemas::{DecodeOptions, Decoder};

    fn small(seed: u64, hours: u64) -> SimulatorConfig {
        SimulatorConfig {
            seed,
            duration: Duration::from_secs(hours * 3600),
            city: CityConfig { segments: 8, cameras: 3, stations: 2, ..CityConfig::default() },
            ..SimulatorConfig::default()
        }
    }

    fn run(cfg: SimulatorConfig) -> (Vec<SimMessage>, SimReport) {
        let mut sim = Simulation::new(cfg, 0);
        let mut all = Vec::new();
        while sim.step(&mut all) {}
        (all, sim.report())
    }

    #[test]
    fn detector_faults_change_the_faulty_detectors_readings_and_nothing_else() {
        let with_faults = |per_day: f64| {
            let mut cfg = small(7, 24);
            cfg.city.detector_faults_per_day = per_day;
            let sim = Simulation::new(cfg.clone(), 0);
            let faults = sim.city.detector_faults.clone();
            (run(cfg).0, faults)
        };
        let (clean, none) = with_faults(0.0);
        let (faulty, faults) = with_faults(8.0);
        assert!(none.is_empty());
        assert!(faults.iter().any(|f| f.kind == city::DetectorFaultKind::Stuck));
        assert!(faults.iter().any(|f| f.kind == city::DetectorFaultKind::Silent));
        let of = |m: &SimMessage| {
            let text = String::from_utf8_lossy(&m.payload).into_owned();
            faults.iter().find(|f| text.contains(&format!("\"sensor_id\":\"{}\"", f.sensor_id))).cloned()
        };
        let others = |msgs: &[SimMessage]| -> Vec<(EventKind, String, Vec<u8>, i64)> {
            msgs.iter()
                .filter(|m| of(m).is_none())
                .map(|m| (m.kind, m.key.clone(), m.payload.clone(), m.arrival_ms))
                .collect()
        };
        assert_eq!(others(&clean), others(&faulty), "the other devices' messages, byte for byte");
        // a silent detector sends nothing during its fault; a stuck one repeats one reading
        let ts_of = |m: &SimMessage| {
            let text = String::from_utf8_lossy(&m.payload).into_owned();
            let at = text.find("\"ts\":\"")? + 6;
            chrono::DateTime::parse_from_rfc3339(&text[at..at + 24]).ok().map(|t| t.timestamp_millis())
        };
        let values = |m: &SimMessage| {
            let text = String::from_utf8_lossy(&m.payload).into_owned();
            text.find("\"flow\":").map(|at| text[at..].to_owned())
        };
        for f in &faults {
            let during: Vec<&SimMessage> = faulty
                .iter()
                .filter(|m| of(m).is_some_and(|g| g.sensor_id == f.sensor_id))
                .filter(|m| ts_of(m).is_some_and(|t| f.start_ms <= t && t < f.end_ms))
                // a stuck detector's messages can still be corrupted on the way
                .filter(|m| serde_json::from_slice::<serde_json::Value>(&m.payload).is_ok())
                .collect();
            match f.kind {
                city::DetectorFaultKind::Silent => assert!(during.is_empty(), "{f:?}"),
                city::DetectorFaultKind::Stuck => {
                    let distinct: std::collections::BTreeSet<_> = during.iter().filter_map(|m| values(m)).collect();
                    assert!(during.len() > 10 && distinct.len() == 1, "{f:?}: {distinct:?}");
                }
            }
        }
    }

    #[test]
    fn ground_truth_weather_lists_every_step_it_rained() {
        let mut sim = Simulation::new(small(3, 96), 0);
        let mut out = Vec::new();
        let mut raining_steps = Vec::new();
        while sim.t_ms < sim.end_ms {
            let t = sim.t_ms;
            sim.step(&mut out);
            out.clear();
            raining_steps.push((t, sim.city.weather.rain_mm_h > 0.0));
        }
        let spans = sim.rain_spans();
        assert!(spans.len() >= 2, "four days with showers about every 17 hours: {spans:?}");
        for (t, raining) in raining_steps {
            let listed = spans.iter().any(|&(start, end, _)| start <= t && t < end);
            assert_eq!(listed, raining, "step at {}", rfc3339(t));
        }
        assert!(spans.windows(2).all(|w| w[0].1 < w[1].0) && spans.iter().all(|s| s.0 < s.1 && s.1 <= sim.end_ms));
        let dir = tempfile::tempdir().unwrap();
        sim.write_ground_truth(dir.path()).unwrap();
        let csv = std::fs::read_to_string(dir.path().join("weather.csv")).unwrap();
        let rows: Vec<&str> = csv.lines().skip(1).collect();
        assert_eq!(rows.len(), spans.len());
        assert!(rows[0].starts_with(&format!("{},{},", rfc3339(spans[0].0), rfc3339(spans[0].1))), "{csv}");
    }

    #[test]
    fn same_seed_same_events_other_seed_other_events() {
        let (a, ra) = run(small(5, 2));
        let (b, rb) = run(small(5, 2));
        let (c, _) = run(small(6, 2));
        assert_eq!(ra, rb);
        assert_eq!(a.len(), b.len());
        assert!(a.iter().zip(&b).all(|(x, y)| x.payload == y.payload && x.arrival_ms == y.arrival_ms));
        assert!(a.len() != c.len() || a.iter().zip(&c).any(|(x, y)| x.payload != y.payload));
    }

    #[test]
    fn arrivals_are_ordered_and_counts_match_what_decodes() {
        let (msgs, report) = run(small(11, 6));
        assert!(msgs.windows(2).all(|w| w[0].arrival_ms <= w[1].arrival_ms));
        assert!(msgs.iter().all(|m| !m.payload.contains(&b'\n')), "one message per JSON line, malformed ones too");
        for kind in EventKind::ALL {
            let mut b = RawBatchBuilder::with_capacity(1024, 1 << 20);
            for (i, m) in msgs.iter().filter(|m| m.kind == kind).enumerate() {
                b.append("sim", 0, i as i64, m.arrival_ms, &m.payload);
            }
            let d = Decoder::new(kind, DecodeOptions::default()).decode(&b.finish()).unwrap();
            let c = report.counts(kind);
            assert_eq!(d.valid.num_rows() as u64, c.valid, "{kind}: valid");
            assert_eq!(d.dead_letters.num_rows() as u64, c.malformed, "{kind}: malformed");
            assert!(c.generated > 0 && c.duplicates > 0, "{kind}: {c:?}");
        }
    }
}
