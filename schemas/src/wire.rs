//! Wire structs: what one JSON event looks like, borrowed from the payload, and the rules that
//! accept or reject it. Each contract validates an event completely before it appends anything,
//! so a rejected event never leaves a partial row behind.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryBuilder, Float32Builder, Int32Builder, StringBuilder};
use base64::Engine as _;
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use crate::flat;
use crate::kind::{CAMERA_KINDS, OBJECT_CLASSES};
use crate::reason::{Reason, ReasonCode};

/// Longest accepted `event_id` and device/location id, in bytes.
pub(crate) const MAX_ID_BYTES: usize = 128;

/// `ts` as it arrives: epoch milliseconds or RFC 3339 text.
#[derive(Debug)]
pub(crate) enum TsWire<'a> {
    Millis(i64),
    Text(Cow<'a, str>),
}

impl<'de: 'a, 'a> Deserialize<'de> for TsWire<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TsWire<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("RFC 3339 text or integer epoch milliseconds")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(TsWire::Millis(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                i64::try_from(v).map(TsWire::Millis).map_err(|_| E::custom(format!("epoch milliseconds {v} overflow")))
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(TsWire::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(TsWire::Text(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'a> TsWire<'a> {
    /// `ts` as the fast path read it: an integer or a string (`None`: anything else).
    fn scanned(v: flat::Value<'a>) -> Option<Self> {
        match v {
            flat::Value::Str(s) => Some(TsWire::Text(Cow::Borrowed(s))),
            v => v.int().map(TsWire::Millis),
        }
    }

    /// Epoch milliseconds, or why the value is not a timestamp.
    pub(crate) fn to_millis(&self) -> Result<i64, Reason> {
        match self {
            TsWire::Millis(ms) => Ok(*ms),
            TsWire::Text(s) => chrono::DateTime::parse_from_rfc3339(s).map(|t| t.timestamp_millis()).map_err(|e| {
                Reason::new(ReasonCode::BadTimestamp, format!("ts `{}` is not RFC 3339: {e}", truncate(s, 64)))
            }),
        }
    }
}

/// The fields every event has.
pub(crate) struct Common<'a> {
    pub event_id: &'a str,
    pub ts: &'a TsWire<'a>,
    pub schema_version: i64,
}

/// One event contract: its wire struct, its validation rules and its Arrow builders.
/// What a contract may use while accepting one event.
pub(crate) struct Accept<'a> {
    /// The event's time (UTC ms), already validated.
    pub ts: i64,
    /// Identifier and image rules.
    pub privacy: &'a mut crate::privacy::Privacy,
}

pub(crate) trait Contract: Default {
    type Wire<'a>: Deserialize<'a>;
    /// The event read by the fast path ([`crate::flat`]); `None` leaves it to serde_json.
    /// Every field present must be read through `Value::str`, `int` or `float` (which check
    /// its form: `flat::scan` does not), and any it refuses must give `None`.
    fn scan(_text: &str) -> Option<Self::Wire<'_>> {
        None
    }
    fn common<'b>(w: &'b Self::Wire<'_>) -> Common<'b>;
    /// Validates the kind-specific fields, then appends them (never a partial row).
    fn accept(&mut self, w: &Self::Wire<'_>, ctx: &mut Accept<'_>) -> Result<(), Reason>;
    /// The kind-specific columns, in schema order.
    fn finish(&mut self) -> Vec<ArrayRef>;
}

pub(crate) fn truncate(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        Cow::Borrowed(s)
    } else {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        Cow::Owned(format!("{}…", &s[..end]))
    }
}

/// An identifier: non-empty, at most [`MAX_ID_BYTES`].
pub(crate) fn check_id(field: &str, v: &str) -> Result<(), Reason> {
    if v.is_empty() {
        return Err(Reason::new(ReasonCode::InvalidValue, format!("{field} is empty")));
    }
    if v.len() > MAX_ID_BYTES {
        return Err(Reason::new(
            ReasonCode::InvalidValue,
            format!("{field} is {} bytes long (at most {MAX_ID_BYTES})", v.len()),
        ));
    }
    Ok(())
}

/// An optional field as the fast path read it: missing or `null` is `None`, a value `read`
/// takes `Some`; the outer `None` means neither (left to serde_json).
fn optional<'a, T>(v: Option<flat::Value<'a>>, read: impl Fn(flat::Value<'a>) -> Option<T>) -> Option<Option<T>> {
    match v {
        None | Some(flat::Value::Null) => Some(None),
        Some(v) => read(v).map(Some),
    }
}

/// An optional number as the fast path read it (see [`optional`]).
fn optional_float(v: Option<flat::Value<'_>>) -> Option<Option<f64>> {
    optional(v, flat::Value::float)
}

/// An optional string as the fast path read it, borrowed from the payload (see [`optional`]).
fn optional_str(v: Option<flat::Value<'_>>) -> Option<Option<Cow<'_, str>>> {
    optional(v, |v| v.str().map(Cow::Borrowed))
}

fn check_f(field: &str, v: f64, lo: f64, hi: f64) -> Result<f32, Reason> {
    if v.is_finite() && (lo..=hi).contains(&v) {
        Ok(v as f32)
    } else {
        Err(Reason::new(ReasonCode::OutOfRange, format!("{field} {v} is outside {lo}..={hi}")))
    }
}

fn check_i(field: &str, v: i64, lo: i64, hi: i64) -> Result<i32, Reason> {
    if (lo..=hi).contains(&v) {
        Ok(v as i32)
    } else {
        Err(Reason::new(ReasonCode::OutOfRange, format!("{field} {v} is outside {lo}..={hi}")))
    }
}

fn one_of(field: &str, v: &str, allowed: &[&str]) -> Result<(), Reason> {
    if allowed.contains(&v) {
        Ok(())
    } else {
        Err(Reason::new(
            ReasonCode::InvalidValue,
            format!("{field} `{}` is not one of {}", truncate(v, 64), allowed.join(", ")),
        ))
    }
}

// ---------------------------------------------------------------- traffic

#[derive(Deserialize)]
#[cfg_attr(test, derive(Debug))]
pub(crate) struct TrafficWire<'a> {
    #[serde(borrow)]
    event_id: Cow<'a, str>,
    #[serde(borrow)]
    ts: TsWire<'a>,
    schema_version: i64,
    #[serde(borrow)]
    sensor_id: Cow<'a, str>,
    #[serde(borrow)]
    segment_id: Cow<'a, str>,
    lane: i64,
    interval_s: i64,
    flow: i64,
    occupancy: f64,
    speed_kmh: Option<f64>,
}

/// The keys of a traffic event, in the order the fast path expects them first.
const TRAFFIC_KEYS: [&str; 10] = [
    "event_id",
    "ts",
    "schema_version",
    "sensor_id",
    "segment_id",
    "lane",
    "interval_s",
    "flow",
    "occupancy",
    "speed_kmh",
];

/// Builders of the traffic-specific columns.
#[derive(Default)]
pub(crate) struct Traffic {
    sensor_id: StringBuilder,
    segment_id: StringBuilder,
    lane: Int32Builder,
    interval_s: Int32Builder,
    flow: Int32Builder,
    occupancy: Float32Builder,
    speed_kmh: Float32Builder,
}

/// Traffic rules: lanes 1..=16, intervals 1..=3600 s, flow 0..=10000 vehicles per interval,
/// occupancy 0..=1, speed 0..=250 km/h and null only when flow is 0.
impl Contract for Traffic {
    type Wire<'a> = TrafficWire<'a>;
    fn scan(text: &str) -> Option<TrafficWire<'_>> {
        let [event_id, ts, schema_version, sensor_id, segment_id, lane, interval_s, flow, occupancy, speed_kmh] =
            flat::scan(text, &TRAFFIC_KEYS)?;
        Some(TrafficWire {
            event_id: Cow::Borrowed(event_id?.str()?),
            ts: TsWire::scanned(ts?)?,
            schema_version: schema_version?.int()?,
            sensor_id: Cow::Borrowed(sensor_id?.str()?),
            segment_id: Cow::Borrowed(segment_id?.str()?),
            lane: lane?.int()?,
            interval_s: interval_s?.int()?,
            flow: flow?.int()?,
            occupancy: occupancy?.float()?,
            speed_kmh: optional_float(speed_kmh)?,
        })
    }
    fn common<'b>(w: &'b TrafficWire<'_>) -> Common<'b> {
        Common { event_id: &w.event_id, ts: &w.ts, schema_version: w.schema_version }
    }
    fn accept(&mut self, w: &TrafficWire<'_>, _ctx: &mut Accept<'_>) -> Result<(), Reason> {
        check_id("sensor_id", &w.sensor_id)?;
        check_id("segment_id", &w.segment_id)?;
        let lane = check_i("lane", w.lane, 1, 16)?;
        let interval_s = check_i("interval_s", w.interval_s, 1, 3600)?;
        let flow = check_i("flow", w.flow, 0, 10_000)?;
        let occupancy = check_f("occupancy", w.occupancy, 0.0, 1.0)?;
        let speed = match w.speed_kmh {
            Some(v) => Some(check_f("speed_kmh", v, 0.0, 250.0)?),
            None if flow == 0 => None,
            None => {
                return Err(Reason::new(
                    ReasonCode::InvalidValue,
                    format!("speed_kmh is null but flow is {flow} (null only when flow = 0)"),
                ));
            }
        };
        self.sensor_id.append_value(&w.sensor_id);
        self.segment_id.append_value(&w.segment_id);
        self.lane.append_value(lane);
        self.interval_s.append_value(interval_s);
        self.flow.append_value(flow);
        self.occupancy.append_value(occupancy);
        self.speed_kmh.append_option(speed);
        Ok(())
    }
    fn finish(&mut self) -> Vec<ArrayRef> {
        vec![
            Arc::new(self.sensor_id.finish()),
            Arc::new(self.segment_id.finish()),
            Arc::new(self.lane.finish()),
            Arc::new(self.interval_s.finish()),
            Arc::new(self.flow.finish()),
            Arc::new(self.occupancy.finish()),
            Arc::new(self.speed_kmh.finish()),
        ]
    }
}

// ---------------------------------------------------------------- camera

/// Largest accepted thumbnail after base64 decoding.
pub(crate) const MAX_THUMBNAIL_BYTES: usize = 256 * 1024;

#[derive(Deserialize)]
#[cfg_attr(test, derive(Debug))]
pub(crate) struct CameraWire<'a> {
    #[serde(borrow)]
    event_id: Cow<'a, str>,
    #[serde(borrow)]
    ts: TsWire<'a>,
    schema_version: i64,
    #[serde(borrow)]
    camera_id: Cow<'a, str>,
    #[serde(borrow)]
    zone_id: Cow<'a, str>,
    #[serde(borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    object_class: Cow<'a, str>,
    count: i64,
    /// Personal data, like `plate`.
    #[serde(borrow, default, deserialize_with = "borrowed_option")]
    track_id: Option<Cow<'a, str>>,
    /// Personal data: borrowed from the payload (copied only where it has escapes), hashed
    /// into a pseudonym, never stored.
    #[serde(borrow, default, deserialize_with = "borrowed_option")]
    plate: Option<Cow<'a, str>>,
    confidence: f64,
    #[serde(borrow, default, deserialize_with = "borrowed_option")]
    thumbnail: Option<Cow<'a, str>>,
}

/// An optional string borrowed from the payload where it has no escapes: serde borrows a bare
/// `Cow<str>` field marked `borrow` but copies one inside an `Option` (with `default`, a
/// missing field is `None` as before).
fn borrowed_option<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    #[derive(Deserialize)]
    struct Borrowed<'a>(#[serde(borrow)] Cow<'a, str>);
    Option::<Borrowed<'de>>::deserialize(d).map(|o| o.map(|b| b.0))
}

/// The keys of a camera event, in the order the fast path expects them first.
const CAMERA_KEYS: [&str; 12] = [
    "event_id",
    "ts",
    "schema_version",
    "camera_id",
    "zone_id",
    "kind",
    "object_class",
    "count",
    "track_id",
    "plate",
    "confidence",
    "thumbnail",
];

/// Builders of the camera-specific columns.
#[derive(Default)]
pub(crate) struct Camera {
    camera_id: StringBuilder,
    zone_id: StringBuilder,
    kind: StringBuilder,
    object_class: StringBuilder,
    count: Int32Builder,
    track_pseudonym: StringBuilder,
    plate_pseudonym: StringBuilder,
    confidence: Float32Builder,
    thumbnail: BinaryBuilder,
    scratch: Vec<u8>,
}

/// Camera rules: `kind` and `object_class` from their fixed lists, count 0..=10000,
/// confidence 0..=1, thumbnail valid standard base64 of at most 256 KiB.
impl Contract for Camera {
    type Wire<'a> = CameraWire<'a>;
    fn scan(text: &str) -> Option<CameraWire<'_>> {
        let [
            event_id,
            ts,
            schema_version,
            camera_id,
            zone_id,
            kind,
            object_class,
            count,
            track_id,
            plate,
            confidence,
            thumbnail,
        ] = flat::scan(text, &CAMERA_KEYS)?;
        Some(CameraWire {
            event_id: Cow::Borrowed(event_id?.str()?),
            ts: TsWire::scanned(ts?)?,
            schema_version: schema_version?.int()?,
            camera_id: Cow::Borrowed(camera_id?.str()?),
            zone_id: Cow::Borrowed(zone_id?.str()?),
            kind: Cow::Borrowed(kind?.str()?),
            object_class: Cow::Borrowed(object_class?.str()?),
            count: count?.int()?,
            track_id: optional_str(track_id)?,
            plate: optional_str(plate)?,
            confidence: confidence?.float()?,
            thumbnail: optional_str(thumbnail)?,
        })
    }
    fn common<'b>(w: &'b CameraWire<'_>) -> Common<'b> {
        Common { event_id: &w.event_id, ts: &w.ts, schema_version: w.schema_version }
    }
    fn accept(&mut self, w: &CameraWire<'_>, ctx: &mut Accept<'_>) -> Result<(), Reason> {
        check_id("camera_id", &w.camera_id)?;
        check_id("zone_id", &w.zone_id)?;
        one_of("kind", &w.kind, &CAMERA_KINDS)?;
        one_of("object_class", &w.object_class, &OBJECT_CLASSES)?;
        let count = check_i("count", w.count, 0, 10_000)?;
        if let Some(t) = &w.track_id {
            check_id("track_id", t)?;
        }
        if let Some(p) = &w.plate
            && (p.is_empty() || p.len() > 32)
        {
            // the reason never quotes the value
            return Err(Reason::new(ReasonCode::OutOfRange, format!("plate is {} bytes (1 to 32)", p.len())));
        }
        let drop_thumbnail = ctx.privacy.drop_thumbnail_classes.iter().any(|c| c.as_str() == w.object_class);
        let confidence = check_f("confidence", w.confidence, 0.0, 1.0)?;
        self.scratch.clear();
        if let Some(b64) = w.thumbnail.as_ref().filter(|_| !drop_thumbnail) {
            base64::engine::general_purpose::STANDARD
                .decode_vec(b64.as_bytes(), &mut self.scratch)
                .map_err(|e| Reason::new(ReasonCode::BadBase64, format!("thumbnail is not valid base64: {e}")))?;
            if self.scratch.len() > MAX_THUMBNAIL_BYTES {
                return Err(Reason::new(
                    ReasonCode::OutOfRange,
                    format!("thumbnail is {} bytes (at most {MAX_THUMBNAIL_BYTES})", self.scratch.len()),
                ));
            }
        }
        self.camera_id.append_value(&w.camera_id);
        self.zone_id.append_value(&w.zone_id);
        self.kind.append_value(&w.kind);
        self.object_class.append_value(&w.object_class);
        self.count.append_value(count);
        match ctx.privacy.pseudonymizer.as_mut() {
            Some(p) => {
                self.track_pseudonym.append_option(w.track_id.as_deref().map(|t| p.pseudonym(t, ctx.ts)));
                self.plate_pseudonym.append_option(w.plate.as_deref().map(|v| p.pseudonym(v, ctx.ts)));
            }
            None => {
                self.track_pseudonym.append_null();
                self.plate_pseudonym.append_null();
            }
        }
        self.confidence.append_value(confidence);
        if w.thumbnail.is_some() && !drop_thumbnail {
            self.thumbnail.append_value(&self.scratch);
        } else {
            self.thumbnail.append_null();
        }
        Ok(())
    }
    fn finish(&mut self) -> Vec<ArrayRef> {
        vec![
            Arc::new(self.camera_id.finish()),
            Arc::new(self.zone_id.finish()),
            Arc::new(self.kind.finish()),
            Arc::new(self.object_class.finish()),
            Arc::new(self.count.finish()),
            Arc::new(self.track_pseudonym.finish()),
            Arc::new(self.plate_pseudonym.finish()),
            Arc::new(self.confidence.finish()),
            Arc::new(self.thumbnail.finish()),
        ]
    }
}

// ---------------------------------------------------------------- environment

/// One environmental measurement: its column name and accepted range.
pub(crate) struct Measure {
    pub name: &'static str,
    lo: f64,
    hi: f64,
}

/// The measurements of an environment event, in schema order, with their ranges.
pub(crate) const ENVIRONMENT_MEASURES: [Measure; 8] = [
    Measure { name: "pm25", lo: 0.0, hi: 1000.0 },
    Measure { name: "pm10", lo: 0.0, hi: 2000.0 },
    Measure { name: "no2", lo: 0.0, hi: 2000.0 },
    Measure { name: "o3", lo: 0.0, hi: 1000.0 },
    Measure { name: "noise_db", lo: 0.0, hi: 200.0 },
    Measure { name: "temp_c", lo: -80.0, hi: 70.0 },
    Measure { name: "humidity", lo: 0.0, hi: 100.0 },
    Measure { name: "rain_mm_h", lo: 0.0, hi: 500.0 },
];

#[derive(Deserialize)]
#[cfg_attr(test, derive(Debug))]
pub(crate) struct EnvironmentWire<'a> {
    #[serde(borrow)]
    event_id: Cow<'a, str>,
    #[serde(borrow)]
    ts: TsWire<'a>,
    schema_version: i64,
    #[serde(borrow)]
    station_id: Cow<'a, str>,
    pm25: Option<f64>,
    pm10: Option<f64>,
    no2: Option<f64>,
    o3: Option<f64>,
    noise_db: Option<f64>,
    temp_c: Option<f64>,
    humidity: Option<f64>,
    rain_mm_h: Option<f64>,
}

/// The keys of an environment event, in the order the fast path expects them first.
const ENVIRONMENT_KEYS: [&str; 12] = [
    "event_id",
    "ts",
    "schema_version",
    "station_id",
    "pm25",
    "pm10",
    "no2",
    "o3",
    "noise_db",
    "temp_c",
    "humidity",
    "rain_mm_h",
];

/// Builders of the environment-specific columns.
#[derive(Default)]
pub(crate) struct Environment {
    station_id: StringBuilder,
    values: [Float32Builder; 8],
}

/// Environment rules: every measurement nullable, at least one present, each within the
/// physical range in [`ENVIRONMENT_MEASURES`].
impl Contract for Environment {
    type Wire<'a> = EnvironmentWire<'a>;
    fn scan(text: &str) -> Option<EnvironmentWire<'_>> {
        let [event_id, ts, schema_version, station_id, pm25, pm10, no2, o3, noise_db, temp_c, humidity, rain_mm_h] =
            flat::scan(text, &ENVIRONMENT_KEYS)?;
        Some(EnvironmentWire {
            event_id: Cow::Borrowed(event_id?.str()?),
            ts: TsWire::scanned(ts?)?,
            schema_version: schema_version?.int()?,
            station_id: Cow::Borrowed(station_id?.str()?),
            pm25: optional_float(pm25)?,
            pm10: optional_float(pm10)?,
            no2: optional_float(no2)?,
            o3: optional_float(o3)?,
            noise_db: optional_float(noise_db)?,
            temp_c: optional_float(temp_c)?,
            humidity: optional_float(humidity)?,
            rain_mm_h: optional_float(rain_mm_h)?,
        })
    }
    fn common<'b>(w: &'b EnvironmentWire<'_>) -> Common<'b> {
        Common { event_id: &w.event_id, ts: &w.ts, schema_version: w.schema_version }
    }
    fn accept(&mut self, w: &EnvironmentWire<'_>, _ctx: &mut Accept<'_>) -> Result<(), Reason> {
        check_id("station_id", &w.station_id)?;
        let raw = [w.pm25, w.pm10, w.no2, w.o3, w.noise_db, w.temp_c, w.humidity, w.rain_mm_h];
        if raw.iter().all(Option::is_none) {
            return Err(Reason::new(
                ReasonCode::NoMeasurement,
                "no measurement present (at least one of pm25, pm10, no2, o3, noise_db, temp_c, humidity, rain_mm_h)",
            ));
        }
        let mut checked = [None; 8];
        for ((m, v), out) in ENVIRONMENT_MEASURES.iter().zip(raw).zip(checked.iter_mut()) {
            if let Some(v) = v {
                *out = Some(check_f(m.name, v, m.lo, m.hi)?);
            }
        }
        self.station_id.append_value(&w.station_id);
        for (b, v) in self.values.iter_mut().zip(checked) {
            b.append_option(v);
        }
        Ok(())
    }
    fn finish(&mut self) -> Vec<ArrayRef> {
        let mut cols: Vec<ArrayRef> = vec![Arc::new(self.station_id.finish())];
        cols.extend(self.values.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
        cols
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_json_borrows_the_plate_and_track_id_too() {
        // an escape in `zone_id` leaves this payload to serde_json
        let text = r#"{"event_id":"c-1","ts":1772409600000,"schema_version":1,"camera_id":"cam-1","zone_id":"z\u0031",
            "kind":"plate_read","object_class":"car","count":1,"track_id":"trk-1","plate":"AB-1234","confidence":0.9}"#;
        assert!(Camera::scan(text).is_none());
        let w: CameraWire<'_> = serde_json::from_str(text).unwrap();
        assert!(matches!(w.plate, Some(Cow::Borrowed("AB-1234"))), "{:?}", w.plate);
        assert!(matches!(w.track_id, Some(Cow::Borrowed("trk-1"))), "{:?}", w.track_id);
        assert!(w.thumbnail.is_none());
        // an escaped plate is unescaped into a copy, as it must be
        let escaped = text.replace("AB-1234", r"AB\u002d1234");
        let w: CameraWire<'_> = serde_json::from_str(&escaped).unwrap();
        assert_eq!(w.plate.as_deref(), Some("AB-1234"));
    }
}
