//! Turning the city's state into device messages: loop detectors, cameras and stations, each
//! with its own reporting schedule, measurement noise and wire format.

use std::io::Write as _;
use std::path::Path;

use citystream_schemas::EventKind;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::city::{City, DetectorFaultKind, EFFECTIVE_LENGTH_M, STEP_S};
use super::{SimulatorConfig, push_rfc3339};

/// (kind, Kafka key, payload, event time ms) of a freshly generated reading (keys: see
/// `SimMessage::key`); an empty key: a reading
/// a silent detector did not send (`Simulation::deliver` delivers nothing for it).
pub(super) type Generated = (EventKind, String, Vec<u8>, i64);

struct Camera {
    id: String,
    segment: usize,
    zone_id: String,
    phase_s: i64,
    pedestrians: bool,
    next_track: u64,
}

struct Station {
    id: String,
    segment: usize,
    phase_s: i64,
}

/// A loop detector's reading: vehicles, occupancy, mean speed.
type Loop = (u32, f64, Option<f64>);

/// Where the devices are, and their counters.
pub(super) struct Sites {
    cameras: Vec<Camera>,
    stations: Vec<Station>,
    /// Registered vehicles whose plates cameras read (the same vehicle passes several cameras).
    plates: Vec<String>,
    seq: [u64; 3],
    /// The reading a stuck detector repeats, per (segment, lane, fault start).
    frozen: std::collections::HashMap<(usize, u8, i64), Loop>,
}

impl Sites {
    pub(super) fn new(cfg: &SimulatorConfig, city: &City, rng: &mut ChaCha8Rng) -> Self {
        let n = city.segments.len();
        let cameras = (0..cfg.city.cameras)
            .map(|j| {
                let segment = j * n / cfg.city.cameras.max(1);
                Camera {
                    id: format!("cam-{j:03}"),
                    segment,
                    zone_id: city.segments[segment].zone_id.clone(),
                    phase_s: rng.random_range(0..60),
                    pedestrians: j % 2 == 0,
                    next_track: 0,
                }
            })
            .collect();
        let stations = (0..cfg.city.stations)
            .map(|j| Station {
                id: format!("env-{j:02}"),
                segment: j * n / cfg.city.stations.max(1),
                phase_s: rng.random_range(0..60),
            })
            .collect();
        let letters = b"ABCDEFGHJKLMNPRSTUVWXYZ";
        let plates = (0..5000)
            .map(|_| {
                let l = |rng: &mut ChaCha8Rng| letters[rng.random_range(0..letters.len())] as char;
                format!("{}{}-{}{}-{:04}", l(rng), l(rng), l(rng), l(rng), rng.random_range(1..10_000))
            })
            .collect();
        Sites { cameras, stations, plates, seq: [0; 3], frozen: Default::default() }
    }

    /// The next event id of `kind`: `tr-`, `cm-` or `ev-` and the kind's sequence number in
    /// hexadecimal, at least 8 digits.
    fn event_id(&mut self, kind: EventKind) -> EventId {
        let (i, prefix) = match kind {
            EventKind::Traffic => (0, b"tr-"),
            EventKind::Camera => (1, b"cm-"),
            EventKind::Environment => (2, b"ev-"),
        };
        self.seq[i] += 1;
        EventId::new(prefix, self.seq[i])
    }

    pub(super) fn write_csv(&self, dir: &Path) -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("cameras.csv"))?);
        writeln!(f, "camera_id,segment_index,zone_id")?;
        for c in &self.cameras {
            writeln!(f, "{},{},{}", c.id, c.segment, c.zone_id)?;
        }
        f.flush()?;
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("stations.csv"))?);
        writeln!(f, "station_id,segment_index")?;
        for s in &self.stations {
            writeln!(f, "{},{}", s.id, s.segment)?;
        }
        f.flush()
    }
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(1e-12);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A Poisson draw with mean `lambda` (Knuth below 30, a rounded normal above).
fn poisson(rng: &mut ChaCha8Rng, lambda: f64) -> u32 {
    if lambda <= 0.0 {
        return 0;
    }
    if lambda > 30.0 {
        return (lambda + lambda.sqrt() * normal(rng)).round().max(0.0) as u32;
    }
    let l = (-lambda).exp();
    let (mut k, mut p) = (0u32, 1.0);
    loop {
        p *= rng.random::<f64>();
        if p <= l {
            return k;
        }
        k += 1;
    }
}

/// Seconds `s` in `[t, t + STEP_S)` at which a device with `phase` and `period` reports.
fn report_times(t_ms: i64, phase_s: i64, period_s: i64) -> impl Iterator<Item = i64> {
    let t0 = t_ms / 1000;
    (t0..t0 + STEP_S).filter(move |s| (s - phase_s).rem_euclid(period_s) == 0).map(|s| s * 1000)
}

/// Generates every reading whose event time falls in the step starting at `t_ms`.
pub(super) fn generate(
    cfg: &SimulatorConfig,
    city: &City,
    sites: &mut Sites,
    rng: &mut ChaCha8Rng,
    t_ms: i64,
    out: &mut Vec<Generated>,
) {
    traffic(cfg, city, sites, rng, t_ms, out);
    cameras(cfg, city, sites, rng, t_ms, out);
    stations(city, sites, rng, t_ms, out);
}

fn traffic(
    cfg: &SimulatorConfig,
    city: &City,
    sites: &mut Sites,
    rng: &mut ChaCha8Rng,
    t_ms: i64,
    out: &mut Vec<Generated>,
) {
    let interval_s = (cfg.traffic_interval.as_millis() / 1000).max(1) as i64;
    for (i, seg) in city.segments.iter().enumerate() {
        let lanes = seg.lanes as usize;
        for lane in 1..=lanes {
            let phase = ((i * 7 + lane * 13) as i64) % interval_s;
            for ts in report_times(t_ms, phase, interval_s) {
                // the nearside lane carries more trucks and slower traffic
                let share = 1.0 + 0.15 * ((lanes as f64 + 1.0) / 2.0 - lane as f64) / lanes as f64;
                let q = city.outflow[i] * share;
                let flow = poisson(rng, q * interval_s as f64 / 3600.0);
                let k = city.density[i] * share;
                let occupancy = (k * EFFECTIVE_LENGTH_M / 1000.0 * (1.0 + 0.05 * normal(rng))).clamp(0.0, 1.0);
                let speed = (flow > 0).then(|| {
                    // the median lane runs at the segment's speed, nearside slower, offside faster
                    let v = city.speed(i, ts) * (1.0 + 0.04 * normal(rng))
                        + 2.0 * (lane as f64 - (lanes as f64 + 1.0) / 2.0);
                    v.clamp(1.0, 250.0)
                });
                let event_id = sites.event_id(EventKind::Traffic);
                // an injected detector fault (drawn like any reading first, so the others'
                // readings are the same with or without faults)
                let fault = city.detector_fault_at(i, lane as u8, ts);
                let (flow, occupancy, speed) = match fault {
                    Some(f) if f.kind == DetectorFaultKind::Stuck => {
                        *sites.frozen.entry((i, f.lane, f.start_ms)).or_insert((flow, occupancy, speed))
                    }
                    _ => (flow, occupancy, speed),
                };
                // a silent detector's reading is delivered to nobody (an empty key: `deliver`)
                let silent = fault.is_some_and(|f| f.kind == DetectorFaultKind::Silent);
                // {"event_id":"…","ts":"<RFC 3339>","schema_version":1,"sensor_id":"det-<segment>-<lane>",
                // "segment_id":"…","lane":…,"interval_s":…,"flow":…,"occupancy":…,"speed_kmh":…},
                // pushed piece by piece: the formatter cost as much as the city model
                let mut p = Vec::with_capacity(240);
                p.extend_from_slice(br#"{"event_id":""#);
                p.extend_from_slice(event_id.as_bytes());
                p.extend_from_slice(br#"","ts":""#);
                push_rfc3339(&mut p, ts);
                p.extend_from_slice(br#"","schema_version":1,"sensor_id":"det-"#);
                p.extend_from_slice(seg.segment_id.as_bytes());
                p.push(b'-');
                push_u64(&mut p, lane as u64);
                p.extend_from_slice(br#"","segment_id":""#);
                p.extend_from_slice(seg.segment_id.as_bytes());
                p.extend_from_slice(br#"","lane":"#);
                push_u64(&mut p, lane as u64);
                p.extend_from_slice(br#","interval_s":"#);
                push_i64(&mut p, interval_s);
                p.extend_from_slice(br#","flow":"#);
                push_u64(&mut p, u64::from(flow));
                p.extend_from_slice(br#","occupancy":"#);
                push_fixed(&mut p, occupancy, 4);
                p.extend_from_slice(br#","speed_kmh":"#);
                match speed {
                    Some(v) => {
                        push_fixed(&mut p, v, 1);
                        p.push(b'}');
                    }
                    None => p.extend_from_slice(b"null}"),
                }
                // keyed by corridor: a segment and its neighbours share a partition (co-partitioning)
                out.push((EventKind::Traffic, if silent { String::new() } else { seg.corridor.to_string() }, p, ts));
            }
        }
    }
}

/// A synthetic JPEG-like thumbnail: a fixed header, then rows of a small palette with noise,
/// so it compresses like real image payloads do (somewhat, and better with a dictionary).
fn thumbnail(rng: &mut ChaCha8Rng, class: &str) -> Vec<u8> {
    let mut img = Vec::with_capacity(1600);
    img.extend_from_slice(b"\xFF\xD8\xFF\xE0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00");
    img.extend_from_slice(b"\xFF\xDB\x00\x43\x00");
    img.extend((0..64u8).map(|i| 2 + i / 4));
    img.extend_from_slice(class.as_bytes());
    let rows = rng.random_range(12..24);
    let base: u8 = rng.random();
    for _ in 0..rows {
        let run = rng.random_range(24..64);
        for x in 0..run {
            let noise: u8 = if rng.random::<f64>() < 0.3 { rng.random() } else { 0 };
            img.push(base.wrapping_add((x / 8) as u8).wrapping_add(noise));
        }
    }
    img.extend_from_slice(b"\xFF\xD9");
    img
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[allow(clippy::too_many_arguments)]
fn camera_event(
    p: &mut Vec<u8>,
    event_id: &EventId,
    ts: i64,
    cam: &Camera,
    kind: &str,
    class: &str,
    count: u32,
    track: Option<&str>,
    plate: Option<&str>,
    confidence: f64,
    thumb: Option<&str>,
) {
    // {"event_id":"…","ts":…,"schema_version":1,"camera_id":"…","zone_id":"…","kind":"…",
    // "object_class":"…","count":…,"track_id":…,"plate":…,"confidence":…,"thumbnail":…}
    let opt = |p: &mut Vec<u8>, v: Option<&str>| match v {
        Some(s) => {
            p.push(b'"');
            p.extend_from_slice(s.as_bytes());
            p.push(b'"');
        }
        None => p.extend_from_slice(b"null"),
    };
    p.extend_from_slice(br#"{"event_id":""#);
    p.extend_from_slice(event_id.as_bytes());
    p.extend_from_slice(br#"","ts":"#);
    push_i64(p, ts);
    p.extend_from_slice(br#","schema_version":1,"camera_id":""#);
    p.extend_from_slice(cam.id.as_bytes());
    p.extend_from_slice(br#"","zone_id":""#);
    p.extend_from_slice(cam.zone_id.as_bytes());
    p.extend_from_slice(br#"","kind":""#);
    p.extend_from_slice(kind.as_bytes());
    p.extend_from_slice(br#"","object_class":""#);
    p.extend_from_slice(class.as_bytes());
    p.extend_from_slice(br#"","count":"#);
    push_u64(p, u64::from(count));
    p.extend_from_slice(br#","track_id":"#);
    opt(p, track);
    p.extend_from_slice(br#","plate":"#);
    opt(p, plate);
    p.extend_from_slice(br#","confidence":"#);
    push_fixed(p, confidence, 3);
    p.extend_from_slice(br#","thumbnail":"#);
    opt(p, thumb);
    p.push(b'}');
}

fn cameras(
    cfg: &SimulatorConfig,
    city: &City,
    sites: &mut Sites,
    rng: &mut ChaCha8Rng,
    t_ms: i64,
    out: &mut Vec<Generated>,
) {
    const CLASSES: [(&str, f64); 4] = [("car", 0.82), ("truck", 0.08), ("bus", 0.03), ("bicycle", 0.07)];
    let hour = t_ms.rem_euclid(86_400_000) as f64 / 3_600_000.0;
    for c in 0..sites.cameras.len() {
        let (seg, phase, pedestrians) = {
            let cam = &sites.cameras[c];
            (cam.segment, cam.phase_s, cam.pedestrians)
        };
        let lanes = city.segments[seg].lanes as f64;
        let veh_per_s = city.outflow[seg] * lanes / 3600.0;
        // counts per class every minute
        for ts in report_times(t_ms, phase, 60) {
            let mut classes: Vec<(&str, f64)> = CLASSES.iter().map(|(k, s)| (*k, veh_per_s * 60.0 * s)).collect();
            if pedestrians {
                classes.push(("pedestrian", 6.0 * super::city::daily_profile(hour, false)));
            }
            for (class, mean) in classes {
                let count = poisson(rng, mean);
                if count == 0 {
                    continue;
                }
                let thumb = (rng.random::<f64>() < cfg.thumbnail_rate).then(|| base64(&thumbnail(rng, class)));
                let id = sites.event_id(EventKind::Camera);
                let conf = 0.6 + 0.39 * rng.random::<f64>();
                let mut p = Vec::with_capacity(300);
                camera_event(
                    &mut p,
                    &id,
                    ts,
                    &sites.cameras[c],
                    "detection",
                    class,
                    count,
                    None,
                    None,
                    conf,
                    thumb.as_deref(),
                );
                out.push((EventKind::Camera, sites.cameras[c].zone_id.clone(), p, ts));
            }
        }
        // line crossings every five minutes
        for ts in report_times(t_ms, phase, 300) {
            let count = poisson(rng, veh_per_s * 300.0);
            let id = sites.event_id(EventKind::Camera);
            let mut p = Vec::with_capacity(300);
            camera_event(&mut p, &id, ts, &sites.cameras[c], "line_crossing", "car", count, None, None, 0.95, None);
            out.push((EventKind::Camera, sites.cameras[c].zone_id.clone(), p, ts));
        }
        // plate reads of passing vehicles
        let reads = poisson(rng, veh_per_s * STEP_S as f64 * cfg.plate_read_rate);
        for _ in 0..reads {
            let ts = t_ms + rng.random_range(0..STEP_S * 1000);
            let plate = sites.plates[rng.random_range(0..sites.plates.len())].clone();
            let class = if rng.random::<f64>() < 0.9 { "car" } else { "truck" };
            let cam = &mut sites.cameras[c];
            cam.next_track += 1;
            let track = format!("trk-{}-{}", cam.id, cam.next_track);
            let id = sites.event_id(EventKind::Camera);
            let conf = 0.7 + 0.29 * rng.random::<f64>();
            let mut p = Vec::with_capacity(300);
            camera_event(
                &mut p,
                &id,
                ts,
                &sites.cameras[c],
                "plate_read",
                class,
                1,
                Some(&track),
                Some(&plate),
                conf,
                None,
            );
            out.push((EventKind::Camera, sites.cameras[c].zone_id.clone(), p, ts));
        }
        // stalled vehicles: seen during incidents on the camera's segment, rarely a false one
        let incident = city.incident_at(seg, t_ms).is_some();
        let stalled = if incident {
            rng.random::<f64>() < STEP_S as f64 / 30.0
        } else {
            rng.random::<f64>() < STEP_S as f64 / 86_400.0
        };
        if stalled {
            let ts = t_ms + rng.random_range(0..STEP_S * 1000);
            let id = sites.event_id(EventKind::Camera);
            let conf = if incident { 0.75 + 0.2 * rng.random::<f64>() } else { 0.5 + 0.2 * rng.random::<f64>() };
            let thumb = base64(&thumbnail(rng, "stalled"));
            let mut p = Vec::with_capacity(1600);
            camera_event(
                &mut p,
                &id,
                ts,
                &sites.cameras[c],
                "stalled_vehicle",
                "car",
                1,
                None,
                None,
                conf,
                Some(&thumb),
            );
            out.push((EventKind::Camera, sites.cameras[c].zone_id.clone(), p, ts));
        }
    }
}

fn stations(city: &City, sites: &mut Sites, rng: &mut ChaCha8Rng, t_ms: i64, out: &mut Vec<Generated>) {
    let hour = t_ms.rem_euclid(86_400_000) as f64 / 3_600_000.0;
    let rain = city.weather.rain_mm_h;
    let daylight = (std::f64::consts::PI * (hour - 6.0) / 14.0).sin().max(0.0);
    for s in 0..sites.stations.len() {
        let (seg, phase) = (sites.stations[s].segment, sites.stations[s].phase_s);
        for ts in report_times(t_ms, phase, 60) {
            let traffic = (city.outflow[seg] / city.segments[seg].capacity_vphpl).clamp(0.0, 1.2);
            let congestion = (city.density[seg] / 60.0).min(1.5);
            let washout = if rain > 0.0 { 0.6 } else { 1.0 };
            let pm25 = ((8.0 + 14.0 * traffic + 10.0 * congestion) * washout + 1.5 * normal(rng)).max(0.5);
            let pm10 = (pm25 * 1.6 + 2.0 * normal(rng)).max(pm25);
            let no2 = (12.0 + 38.0 * traffic + 25.0 * congestion + 3.0 * normal(rng)).max(0.5);
            let o3 = (25.0 + 55.0 * daylight - 0.3 * no2 + 4.0 * normal(rng)).max(0.5);
            let vph = city.outflow[seg] * city.segments[seg].lanes as f64;
            let noise = (38.0 + 10.0 * (1.0 + vph).log10() + 1.5 * normal(rng)).clamp(20.0, 120.0);
            let temp = 7.0 + 6.0 * (std::f64::consts::TAU * (hour - 9.0) / 24.0).sin()
                - if rain > 0.0 { 2.0 } else { 0.0 }
                + 0.3 * normal(rng);
            let humidity = (68.0 - 15.0 * daylight + 4.0 * rain + 2.0 * normal(rng)).clamp(5.0, 100.0);
            let values = [pm25, pm10, no2, o3, noise, temp, humidity, rain];
            let names = ["pm25", "pm10", "no2", "o3", "noise_db", "temp_c", "humidity", "rain_mm_h"];
            let id = sites.event_id(EventKind::Environment);
            let station = sites.stations[s].id.clone();
            let mut p = Vec::with_capacity(260);
            p.extend_from_slice(br#"{"event_id":""#);
            p.extend_from_slice(id.as_bytes());
            p.extend_from_slice(br#"","ts":"#);
            push_i64(&mut p, ts);
            p.extend_from_slice(br#","schema_version":1,"station_id":""#);
            p.extend_from_slice(station.as_bytes());
            p.push(b'"');
            // each sensor of a station drops out now and then; the thermometer never does
            for (k, (name, v)) in names.iter().zip(values).enumerate() {
                p.extend_from_slice(b",\"");
                p.extend_from_slice(name.as_bytes());
                p.extend_from_slice(b"\":");
                if k != 5 && rng.random::<f64>() < 0.01 {
                    p.extend_from_slice(b"null");
                } else {
                    push_fixed(&mut p, v, 2);
                }
            }
            p.push(b'}');
            out.push((EventKind::Environment, station, p, ts));
        }
    }
}

/// The raw plate in a camera payload, if it carries one (for the privacy ground truth).
pub(super) fn plate_in(payload: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(payload).ok()?;
    let start = text.find(r#""plate":""#)? + 9;
    let end = text[start..].find('"')? + start;
    Some(text[start..end].to_owned())
}

/// Appends `v` with `decimals` (at most 4) digits after the point, the text `{v:.N}` writes:
/// rounding the scaled value gives the same digits except within a hair of a tie, where the
/// formatter (exact, and several times slower) decides.
fn push_fixed(out: &mut Vec<u8>, v: f64, decimals: usize) {
    const SCALE: [f64; 5] = [1.0, 10.0, 100.0, 1_000.0, 10_000.0];
    let Some(&factor) = SCALE.get(decimals) else {
        let _ = write!(out, "{v:.decimals$}");
        return;
    };
    let scaled = v * factor;
    let frac = (scaled - scaled.trunc()).abs();
    if !scaled.is_finite() || scaled.abs() >= 1e15 || (frac - 0.5).abs() < 1e-6 {
        let _ = write!(out, "{v:.decimals$}");
        return;
    }
    let units = scaled.abs().round() as u64;
    if v.is_sign_negative() {
        out.push(b'-');
    }
    let scale = factor as u64;
    let mut digits = itoa_buf(units / scale);
    out.extend_from_slice(digits.as_bytes());
    if decimals > 0 {
        out.push(b'.');
        digits = itoa_buf(units % scale);
        out.extend(std::iter::repeat_n(b'0', decimals - digits.len()));
        out.extend_from_slice(digits.as_bytes());
    }
}

/// Appends `n` in decimal.
fn push_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa_buf(n).as_bytes());
}

/// Appends `n` in decimal.
fn push_i64(out: &mut Vec<u8>, n: i64) {
    if n < 0 {
        out.push(b'-');
    }
    push_u64(out, n.unsigned_abs());
}

/// An event id on the stack: a three-byte prefix and a sequence number in lowercase
/// hexadecimal, zero-padded to 8 digits (`{prefix}{seq:08x}`).
struct EventId {
    buf: [u8; 19],
    len: usize,
}

impl EventId {
    fn new(prefix: &[u8; 3], seq: u64) -> Self {
        let mut hex = [b'0'; 16];
        let (mut n, mut at) = (seq, 16);
        while n > 0 {
            at -= 1;
            hex[at] = b"0123456789abcdef"[(n & 15) as usize];
            n >>= 4;
        }
        let digits = &hex[at.min(8)..];
        let mut buf = [0; 19];
        buf[..3].copy_from_slice(prefix);
        buf[3..3 + digits.len()].copy_from_slice(digits);
        EventId { buf, len: 3 + digits.len() }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// `n` in decimal, without the formatter.
fn itoa_buf(mut n: u64) -> Digits {
    let mut d = Digits { buf: [0; 20], start: 20 };
    loop {
        d.start -= 1;
        d.buf[d.start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return d;
        }
    }
}

struct Digits {
    buf: [u8; 20],
    start: usize,
}

impl Digits {
    fn as_bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    fn len(&self) -> usize {
        20 - self.start
    }
}

/// The same reading with a new event id, as a redundant gateway re-sends it.
pub(super) fn with_new_event_id(payload: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(payload);
    text.replacen(r#"{"event_id":""#, r#"{"event_id":"gw2-"#, 1).into_bytes()
}

/// A corrupted copy of a valid payload that the decoder must reject, one of six kinds of damage.
pub(super) fn corrupt(payload: &[u8], rng: &mut ChaCha8Rng) -> Vec<u8> {
    let text = String::from_utf8_lossy(payload).into_owned();
    // index of the `"ts"` key right after the event id
    let id_end = text.find(r#"","ts":"#).map(|i| i + 2);
    match rng.random_range(0..6) {
        0 => payload[..rng.random_range(1..payload.len() - 1)].to_vec(),
        1 => text.replacen(r#""schema_version":1"#, r#""schema_version":2"#, 1).into_bytes(),
        2 => match id_end {
            Some(end) => format!("{{{}", &text[end..]).into_bytes(),
            None => b"{}".to_vec(),
        },
        3 => text
            .replacen(r#"{"event_id":"#, r#"{"event_id":["#, 1)
            .replacen(r#"","ts":"#, r#""],"ts":"#, 1)
            .into_bytes(),
        4 => {
            let start = text.find(r#""ts":"#).expect("every payload has ts") + 5;
            let end = text.find(r#","schema_version""#).expect("every payload has schema_version");
            format!("{}\"yesterday\"{}", &text[..start], &text[end..]).into_bytes()
        }
        // random bytes, but never a newline, so JSON-lines output keeps one message per line
        _ => (0..rng.random_range(8..64))
            .map(|_| rng.random::<u8>())
            .map(|b| if b == b'\n' { b' ' } else { b })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    /// The pushed integers and event ids are the formatter's text.
    #[test]
    fn integers_and_event_ids_are_the_formatters() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut cases: Vec<u64> = vec![0, 1, 9, 10, 15, 16, 0xffff_ffff, 0x1_0000_0000, u64::MAX];
        cases.extend((0..10_000).map(|_| rng.random::<u64>() >> rng.random_range(0..64)));
        for n in cases {
            let mut got = Vec::new();
            super::push_u64(&mut got, n);
            assert_eq!(got, n.to_string().into_bytes());
            let i = n as i64;
            got.clear();
            super::push_i64(&mut got, i);
            assert_eq!(got, i.to_string().into_bytes());
            assert_eq!(super::EventId::new(b"tr-", n).as_bytes(), format!("tr-{n:08x}").as_bytes());
        }
    }

    /// `push_fixed` writes exactly what the formatter writes, for the simulator's magnitudes,
    /// negative values, values that round to zero and exact ties.
    #[test]
    fn fixed_decimals_are_the_formatters() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut cases: Vec<f64> = vec![
            0.0, -0.0, 0.5, 1.5, 2.5, 0.125, 0.375, 0.05, 0.35, -0.04, -0.05, 99.95, 1e-7, 123456.789, 0.00005, 0.00015,
        ];
        for _ in 0..300_000 {
            let scale = [1.0, 10.0, 130.0, 1000.0][rng.random_range(0..4)];
            cases.push((rng.random::<f64>() - 0.2) * scale);
            // on and next to the ties of each precision
            let d = rng.random_range(0..5);
            let tie = (rng.random_range(0..100_000) as f64 + 0.5) / 10f64.powi(d);
            cases.extend([tie, -tie, f64::from_bits(tie.to_bits() + 1), f64::from_bits(tie.to_bits() - 1)]);
        }
        for v in cases {
            for decimals in 0..=5 {
                let mut got = Vec::new();
                super::push_fixed(&mut got, v, decimals);
                assert_eq!(String::from_utf8(got).unwrap(), format!("{v:.decimals$}"), "{v:e} with {decimals}");
            }
        }
    }
}
