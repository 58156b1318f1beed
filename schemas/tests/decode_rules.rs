//! One test per validation rule of the event contracts, plus a property test that decoding
//! never panics and never loses a message on arbitrary bytes.

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float32Type, Int32Type, Int64Type, TimestampMillisecondType};
use citystream_schemas::raw::RawBatchBuilder;
use citystream_schemas::{DecodeOptions, Decoded, Decoder, EventKind, ReasonCode, dead_letter};
use proptest::prelude::*;

/// 2026-03-02T08:00:00Z, the processing time of every message below.
const NOW: i64 = 1_772_438_400_000;

fn raw(payloads: &[&str]) -> RecordBatch {
    let mut b = RawBatchBuilder::with_capacity(payloads.len(), 1024);
    for (i, p) in payloads.iter().enumerate() {
        b.append("test", 2, 100 + i as i64, NOW, p.as_bytes());
    }
    b.finish()
}

fn decode(kind: EventKind, payloads: &[&str]) -> Decoded {
    Decoder::new(kind, DecodeOptions::default()).decode(&raw(payloads)).unwrap()
}

/// Decodes one payload that must be rejected; returns (code, reason).
fn reject(kind: EventKind, payload: &str) -> (String, String) {
    let d = decode(kind, &[payload]);
    assert_eq!(d.valid.num_rows(), 0, "{payload} was accepted");
    assert_eq!(d.dead_letters.num_rows(), 1);
    let col = |name| d.dead_letters.column_by_name(name).unwrap().as_string::<i32>().value(0).to_owned();
    (col(dead_letter::REASON_CODE), col(dead_letter::REASON))
}

fn traffic(overrides: &str) -> String {
    let mut base = serde_json::json!({
        "event_id": "t-1", "ts": "2026-03-02T07:59:30Z", "schema_version": 1,
        "sensor_id": "S1", "segment_id": "seg-1", "lane": 1, "interval_s": 30,
        "flow": 12, "occupancy": 0.2, "speed_kmh": 54.5
    });
    let patch: serde_json::Value = serde_json::from_str(overrides).unwrap();
    for (k, v) in patch.as_object().unwrap() {
        if v.is_string() && v.as_str() == Some("<absent>") {
            base.as_object_mut().unwrap().remove(k);
        } else {
            base[k] = v.clone();
        }
    }
    base.to_string()
}

fn camera(overrides: &str) -> String {
    let mut base = serde_json::json!({
        "event_id": "c-1", "ts": NOW - 1000, "schema_version": 1, "camera_id": "C1", "zone_id": "z1",
        "kind": "detection", "object_class": "car", "count": 2, "track_id": "trk-9",
        "plate": "AB-123-CD", "confidence": 0.9, "thumbnail": "aGVsbG8="
    });
    let patch: serde_json::Value = serde_json::from_str(overrides).unwrap();
    for (k, v) in patch.as_object().unwrap() {
        base[k] = v.clone();
    }
    base.to_string()
}

fn environment(overrides: &str) -> String {
    let mut base = serde_json::json!({
        "event_id": "e-1", "ts": NOW, "schema_version": 1, "station_id": "E1", "pm25": 12.5, "humidity": 40.0
    });
    let patch: serde_json::Value = serde_json::from_str(overrides).unwrap();
    for (k, v) in patch.as_object().unwrap() {
        base[k] = v.clone();
    }
    base.to_string()
}

#[test]
fn valid_traffic_decodes_every_column() {
    let d = decode(EventKind::Traffic, &[&traffic("{}")]);
    assert_eq!(d.dead_letters.num_rows(), 0);
    let b = &d.valid;
    assert_eq!(b.schema(), EventKind::Traffic.schema());
    assert_eq!(b.column_by_name("event_id").unwrap().as_string::<i32>().value(0), "t-1");
    assert_eq!(b.column_by_name("ts").unwrap().as_primitive::<TimestampMillisecondType>().value(0), NOW - 30_000);
    assert_eq!(b.column_by_name("flow").unwrap().as_primitive::<Int32Type>().value(0), 12);
    assert_eq!(b.column_by_name("speed_kmh").unwrap().as_primitive::<Float32Type>().value(0), 54.5);
    assert_eq!(b.column_by_name("src_partition").unwrap().as_primitive::<Int32Type>().value(0), 2);
    assert_eq!(b.column_by_name("src_offset").unwrap().as_primitive::<Int64Type>().value(0), 100);
}

#[test]
fn ts_accepts_epoch_millis_and_offsets() {
    let d = decode(
        EventKind::Traffic,
        &[&traffic(&format!(r#"{{"ts": {}}}"#, NOW - 5)), &traffic(r#"{"ts": "2026-03-02T09:00:00+01:00"}"#)],
    );
    let ts = d.valid.column_by_name("ts").unwrap().as_primitive::<TimestampMillisecondType>();
    assert_eq!(ts.value(0), NOW - 5);
    assert_eq!(ts.value(1), NOW);
}

#[test]
fn speed_may_be_null_only_when_flow_is_zero() {
    let ok = decode(EventKind::Traffic, &[&traffic(r#"{"flow": 0, "speed_kmh": null}"#)]);
    assert_eq!(ok.valid.num_rows(), 1);
    assert!(ok.valid.column_by_name("speed_kmh").unwrap().is_null(0));
    let (code, reason) = reject(EventKind::Traffic, &traffic(r#"{"flow": 3, "speed_kmh": null}"#));
    assert_eq!(code, "invalid_value");
    assert_eq!(reason, "speed_kmh is null but flow is 3 (null only when flow = 0)");
}

#[test]
fn malformed_json_is_bad_json() {
    let (code, reason) = reject(EventKind::Traffic, r#"{"event_id": "x", "#);
    assert_eq!(code, "bad_json");
    assert!(reason.starts_with("malformed JSON: EOF while parsing"), "{reason}");
    assert_eq!(reject(EventKind::Environment, "not json").0, "bad_json");
    assert_eq!(reject(EventKind::Environment, &(environment("{}") + " trailing")).0, "bad_json");
}

#[test]
fn a_payload_cut_inside_a_character_is_not_text_even_when_the_batch_is() {
    // "é" (C3 A9) split between two payloads: the batch's bytes together are valid UTF-8,
    // neither payload is; the valid payloads beside them, one with an "é" of its own, decode
    let plain = traffic(r#"{"segment_id": "rue-é"}"#);
    let split = traffic(r#"{"sensor_id": "S1é"}"#).into_bytes();
    let at = split.iter().position(|&c| c == 0xc3).unwrap() + 1;
    let mut b = RawBatchBuilder::with_capacity(4, 1024);
    b.append("test", 2, 100, NOW, plain.as_bytes());
    b.append("test", 2, 101, NOW, &split[..at]);
    b.append("test", 2, 102, NOW, &split[at..]);
    b.append("test", 2, 103, NOW, traffic("{}").as_bytes());
    let batch = b.finish();
    let values = batch.column(4).as_binary::<i32>().values().to_vec();
    assert!(std::str::from_utf8(&values).is_ok(), "the batch's bytes are text");
    let d = Decoder::new(EventKind::Traffic, DecodeOptions::default()).decode(&batch).unwrap();
    assert_eq!(d.valid.num_rows(), 2);
    let segments = d.valid.column_by_name("segment_id").unwrap().as_string::<i32>();
    assert_eq!(segments.value(0), "rue-é");
    let codes = d.dead_letters.column_by_name(dead_letter::REASON_CODE).unwrap().as_string::<i32>();
    assert_eq!(codes.iter().flatten().collect::<Vec<_>>(), ["bad_json", "bad_json"]);
}

#[test]
fn a_sliced_batch_decodes_its_own_rows_whatever_lies_around_them() {
    // bytes that are not text before and after the slice
    let mut b = RawBatchBuilder::with_capacity(4, 1024);
    b.append("test", 2, 100, NOW, b"\xff\xfe");
    b.append("test", 2, 101, NOW, traffic(r#"{"segment_id": "rue-é"}"#).as_bytes());
    b.append("test", 2, 102, NOW, traffic("{}").as_bytes());
    b.append("test", 2, 103, NOW, b"{\"event_id\": \"\xc3\"}");
    let batch = b.finish();
    let decoder = Decoder::new(EventKind::Traffic, DecodeOptions::default());
    let d = decoder.decode(&batch.slice(1, 2)).unwrap();
    assert_eq!((d.valid.num_rows(), d.dead_letters.num_rows()), (2, 0));
    let offsets = d.valid.column_by_name("src_offset").unwrap().as_primitive::<Int64Type>();
    assert_eq!(offsets.values(), &[101, 102]);
    assert_eq!(d.valid.column_by_name("segment_id").unwrap().as_string::<i32>().value(0), "rue-é");
    // the whole batch: the same two rows, the others dead letters
    let all = decoder.decode(&batch).unwrap();
    assert_eq!((all.valid.num_rows(), all.dead_letters.num_rows()), (2, 2));
}

#[test]
fn non_object_payload_is_wrong_type() {
    let (code, reason) = reject(EventKind::Camera, "[1, 2]");
    assert_eq!(code, "wrong_type");
    assert_eq!(reason, "payload is valid JSON but not an object (a camera event is a JSON object)");
    // an array holding valid values by position is still not an event
    let positional = r#"["t-1", 1772438400000, 1, "S1", "seg-1", 1, 30, 12, 0.2, 54.5]"#;
    assert_eq!(reject(EventKind::Traffic, positional).0, "wrong_type");
    assert_eq!(reject(EventKind::Traffic, "  \"text\"").0, "wrong_type");
    assert_eq!(reject(EventKind::Traffic, "").0, "bad_json");
}

#[test]
fn missing_field_is_named() {
    let (code, reason) = reject(EventKind::Traffic, &traffic(r#"{"occupancy": "<absent>"}"#));
    assert_eq!(code, "missing_field");
    assert!(reason.starts_with("missing field `occupancy`"), "{reason}");
}

#[test]
fn wrong_type_is_named_with_position() {
    let (code, reason) = reject(EventKind::Traffic, &traffic(r#"{"flow": "twelve"}"#));
    assert_eq!(code, "wrong_type");
    // the field and the rule, never the value
    assert!(reason.starts_with("`flow`: invalid type: string, expected i64 at line 1 column"), "{reason}");
    let (code, _) = reject(EventKind::Traffic, &traffic(r#"{"lane": null}"#));
    assert_eq!(code, "wrong_type");
    let (code, _) = reject(EventKind::Traffic, &traffic(r#"{"ts": 1.5}"#));
    assert_eq!(code, "wrong_type");
}

#[test]
fn a_plate_of_the_wrong_type_never_reaches_the_reason() {
    for (patch, value) in [
        (r#"{"plate": 4711080815}"#, "4711080815"),
        (r#"{"plate": 47.1108}"#, "47.1108"),
        (r#"{"track_id": ["TR-99-SECRET"]}"#, "TR-99-SECRET"),
        (r#"{"plate": {"nr": "AB-SECRET-1"}}"#, "AB-SECRET-1"),
        (r#"{"plate": true}"#, "true"),
    ] {
        let (code, reason) = reject(EventKind::Camera, &camera(patch));
        assert_eq!(code, "wrong_type", "{patch}");
        assert!(!reason.contains(value), "{patch}: the value leaked into the reason: {reason}");
        if !patch.contains('{') || patch.matches('{').count() == 1 {
            assert!(reason.starts_with("`plate`") || reason.starts_with("`track_id`"), "names the field: {reason}");
        }
    }
    // and never into the stored payload either
    let d = decode(EventKind::Camera, &[&camera(r#"{"plate": 4711080815}"#)]);
    let payload = d.dead_letters.column_by_name("payload").unwrap().as_binary::<i32>().value(0);
    assert!(!String::from_utf8_lossy(payload).contains("4711080815"));
}

#[test]
fn extreme_timestamps_are_dead_letters_not_overflows() {
    for ts in [i64::MIN, -1, i64::MAX, 253_402_300_800_000] {
        let (code, reason) = reject(EventKind::Traffic, &traffic(&format!(r#"{{"ts": {ts}}}"#)));
        assert_eq!(code, "timestamp_out_of_bounds", "{ts}");
        assert!(reason.contains("supported range"), "{reason}");
    }
    // and with the clock bounds off, the same
    let opts = DecodeOptions { max_future_ms: None, max_past_ms: None, ..DecodeOptions::default() };
    let d = Decoder::new(EventKind::Traffic, opts)
        .decode(&raw(&[
            &traffic(&format!(r#"{{"ts": {}}}"#, i64::MIN)),
            &traffic(r#"{"ts": "+262143-01-01T00:00:00Z"}"#),
        ]))
        .unwrap();
    assert_eq!((d.valid.num_rows(), d.dead_letters.num_rows()), (0, 2));
}

#[test]
fn unknown_schema_version_wins_over_field_errors() {
    let (code, reason) = reject(EventKind::Traffic, &traffic(r#"{"schema_version": 2}"#));
    assert_eq!(
        (code.as_str(), reason.as_str()),
        ("unknown_schema_version", "schema_version 2 is not supported (supported: 1)")
    );
    // A v2 event whose fields changed shape is still reported as a version problem.
    let (code, _) = reject(EventKind::Traffic, &traffic(r#"{"schema_version": 2, "flow": "many"}"#));
    assert_eq!(code, "unknown_schema_version");
}

#[test]
fn bad_timestamps() {
    let (code, reason) = reject(EventKind::Traffic, &traffic(r#"{"ts": "yesterday"}"#));
    assert_eq!(code, "bad_timestamp");
    assert!(reason.starts_with("ts `yesterday` is not RFC 3339"), "{reason}");
    let (code, reason) = reject(EventKind::Traffic, &traffic(r#"{"ts": "2026-03-02T09:00:00Z"}"#));
    assert_eq!(
        (code.as_str(), reason.as_str()),
        ("timestamp_out_of_bounds", "ts is 3600 s after the message's arrival time (bound 300 s)")
    );
    let (code, reason) = reject(EventKind::Traffic, &traffic(r#"{"ts": "2026-02-01T08:00:00Z"}"#));
    assert_eq!(code, "timestamp_out_of_bounds");
    assert_eq!(reason, "ts is 2505600 s before the message's arrival time (bound 604800 s)");
}

#[test]
fn timestamp_bounds_are_configurable() {
    let opts = DecodeOptions { max_future_ms: None, max_past_ms: Some(1000), ..DecodeOptions::default() };
    let d = Decoder::new(EventKind::Traffic, opts)
        .decode(&raw(&[&traffic(r#"{"ts": "2030-01-01T00:00:00Z"}"#), &traffic(r#"{"ts": "2026-03-02T07:59:58Z"}"#)]))
        .unwrap();
    assert_eq!(d.valid.num_rows(), 1, "far future allowed when unbounded");
    assert_eq!(d.dead_letters.num_rows(), 1, "2 s in the past exceeds a 1 s bound");
}

#[test]
fn traffic_ranges() {
    for (patch, msg) in [
        (r#"{"occupancy": 1.7}"#, "occupancy 1.7 is outside 0..=1"),
        (r#"{"occupancy": -0.1}"#, "occupancy -0.1 is outside 0..=1"),
        (r#"{"speed_kmh": 251}"#, "speed_kmh 251 is outside 0..=250"),
        (r#"{"flow": -1}"#, "flow -1 is outside 0..=10000"),
        (r#"{"lane": 0}"#, "lane 0 is outside 1..=16"),
        (r#"{"interval_s": 0}"#, "interval_s 0 is outside 1..=3600"),
    ] {
        let (code, reason) = reject(EventKind::Traffic, &traffic(patch));
        assert_eq!((code.as_str(), reason.as_str()), ("out_of_range", msg), "{patch}");
    }
}

#[test]
fn ids_must_be_present_and_short() {
    let (code, reason) = reject(EventKind::Traffic, &traffic(r#"{"event_id": ""}"#));
    assert_eq!((code.as_str(), reason.as_str()), ("invalid_value", "event_id is empty"));
    let long = "x".repeat(129);
    let (code, reason) = reject(EventKind::Traffic, &traffic(&format!(r#"{{"segment_id": "{long}"}}"#)));
    assert_eq!((code.as_str(), reason.as_str()), ("invalid_value", "segment_id is 129 bytes long (at most 128)"));
}

#[test]
fn camera_rules_and_plate_never_stored() {
    let d = decode(EventKind::Camera, &[&camera("{}")]);
    assert_eq!(d.valid.num_rows(), 1);
    assert!(d.valid.schema().field_with_name("plate").is_err());
    assert_eq!(d.valid.column_by_name("thumbnail").unwrap().as_binary::<i32>().value(0), b"hello");
    let csv = format!("{:?}", d.valid);
    assert!(!csv.contains("AB-123-CD"), "the plate leaked into the batch");

    let (code, reason) = reject(EventKind::Camera, &camera(r#"{"kind": "selfie"}"#));
    assert_eq!(code, "invalid_value");
    assert_eq!(reason, "kind `selfie` is not one of detection, plate_read, stalled_vehicle, line_crossing");
    let (code, _) = reject(EventKind::Camera, &camera(r#"{"object_class": "horse"}"#));
    assert_eq!(code, "invalid_value");
    let (code, reason) = reject(EventKind::Camera, &camera(r#"{"confidence": 1.2}"#));
    assert_eq!((code.as_str(), reason.as_str()), ("out_of_range", "confidence 1.2 is outside 0..=1"));
    let (code, _) = reject(EventKind::Camera, &camera(r#"{"count": -2}"#));
    assert_eq!(code, "out_of_range");
    let (code, reason) = reject(EventKind::Camera, &camera(r#"{"thumbnail": "***"}"#));
    assert_eq!(code, "bad_base64");
    assert!(reason.starts_with("thumbnail is not valid base64"), "{reason}");
    let ok = decode(EventKind::Camera, &[&camera(r#"{"thumbnail": null, "track_id": null}"#)]);
    assert_eq!(ok.valid.num_rows(), 1);
}

#[test]
fn environment_needs_one_measurement_in_range() {
    let (code, _) = reject(
        EventKind::Environment,
        r#"{"event_id": "e", "ts": 1772438400000, "schema_version": 1, "station_id": "E1"}"#,
    );
    assert_eq!(code, "no_measurement");
    let (code, reason) = reject(EventKind::Environment, &environment(r#"{"humidity": 101}"#));
    assert_eq!((code.as_str(), reason.as_str()), ("out_of_range", "humidity 101 is outside 0..=100"));
    let (code, _) = reject(EventKind::Environment, &environment(r#"{"temp_c": -100}"#));
    assert_eq!(code, "out_of_range");
    let d = decode(EventKind::Environment, &[&environment(r#"{"pm25": null, "humidity": null, "noise_db": 61}"#)]);
    assert_eq!(d.valid.num_rows(), 1);
    assert!(d.valid.column_by_name("pm25").unwrap().is_null(0));
}

#[test]
fn dead_letters_keep_position_and_truncate_payload() {
    let opts = DecodeOptions { dead_letter_payload_max_bytes: 8, ..DecodeOptions::default() };
    let bad = "{\"event_id\": 1234567890}";
    let d = Decoder::new(EventKind::Traffic, opts).decode(&raw(&[&traffic("{}"), bad])).unwrap();
    assert_eq!(d.valid.num_rows(), 1);
    let dl = &d.dead_letters;
    assert_eq!(dl.schema(), dead_letter::schema());
    assert_eq!(dl.column_by_name("src_offset").unwrap().as_primitive::<Int64Type>().value(0), 101);
    assert_eq!(dl.column_by_name("src_partition").unwrap().as_primitive::<Int32Type>().value(0), 2);
    assert_eq!(dl.column_by_name("source").unwrap().as_string::<i32>().value(0), "test");
    assert_eq!(dl.column_by_name("payload").unwrap().as_binary::<i32>().value(0), &bad.as_bytes()[..8]);
    assert_eq!(dl.column_by_name("payload_bytes").unwrap().as_primitive::<Int64Type>().value(0), bad.len() as i64);
}

#[test]
fn every_reason_code_has_a_distinct_name() {
    let names: std::collections::BTreeSet<_> = ReasonCode::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(names.len(), ReasonCode::ALL.len());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    /// Arbitrary bytes never panic the decoder, and every message lands in exactly one output.
    #[test]
    fn decoding_never_panics_nor_loses(payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..20)) {
        let mut b = RawBatchBuilder::with_capacity(payloads.len(), 1024);
        for (i, p) in payloads.iter().enumerate() {
            b.append("fuzz", 0, i as i64, NOW, p);
        }
        let batch = b.finish();
        for kind in EventKind::ALL {
            let d = Decoder::new(kind, DecodeOptions::default()).decode(&batch).unwrap();
            prop_assert_eq!(d.valid.num_rows() + d.dead_letters.num_rows(), payloads.len());
            let reasons = d.dead_letters.column_by_name(dead_letter::REASON).unwrap().as_string::<i32>();
            prop_assert!(reasons.iter().all(|r| !r.unwrap().is_empty()));
        }
    }

    /// Mutated valid events (a byte flipped or cut) never panic and are never lost.
    #[test]
    fn decoding_mutated_events_never_panics(pos in 0usize..400, byte in any::<u8>(), cut in any::<bool>()) {
        for (kind, base) in [(EventKind::Traffic, traffic("{}")), (EventKind::Camera, camera("{}")), (EventKind::Environment, environment("{}"))] {
            let mut p = base.into_bytes();
            let i = pos % p.len();
            if cut { p.truncate(i) } else { p[i] = byte }
            let mut b = RawBatchBuilder::with_capacity(1, p.len());
            b.append("fuzz", 0, 0, NOW, &p);
            let d = Decoder::new(kind, DecodeOptions::default()).decode(&b.finish()).unwrap();
            prop_assert_eq!(d.valid.num_rows() + d.dead_letters.num_rows(), 1);
        }
    }
}
