//! Batch-wise decoding of raw JSON messages into typed Arrow batches and dead letters.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, AsArray, BinaryArray, Int32Array, Int32Builder, Int64Array, Int64Builder, RecordBatch, StringArray,
    StringBuilder, TimestampMillisecondArray, TimestampMillisecondBuilder,
};
use arrow::datatypes::{ArrowNativeType, Int32Type, Int64Type, TimestampMillisecondType};
use serde::Deserialize;

use crate::dead_letter::{DeadLetterBuilder, Position};
use crate::kind::{EventKind, SCHEMA_VERSION};
use crate::reason::{Reason, ReasonCode};
use crate::wire::{self, Contract};

/// The latest event time accepted, 9999-12-31T23:59:59.999Z (UTC ms); the earliest is the
/// epoch. Every later stage computes with event times (window bounds, durations, partitions by
/// hour) and never has to meet one it cannot represent.
pub const MAX_TS_MS: i64 = 253_402_300_799_999;

/// Tunables of decoding and validation.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeOptions {
    /// Reject events whose `ts` is more than this many milliseconds *after* the message's
    /// arrival time (`received_at`: for Kafka, when the message reached the broker unless that
    /// is ahead of our clock; `None`: no bound). Default: 5 minutes, for clock skew between
    /// devices.
    pub max_future_ms: Option<i64>,
    /// Reject events whose `ts` is more than this many milliseconds *before* the message's
    /// arrival time (`None`: no bound). Default: 7 days, for gateways that buffer while
    /// offline.
    pub max_past_ms: Option<i64>,
    /// Keep at most this many bytes of a rejected payload in `dead_letters.payload`.
    /// The original length is always kept in `payload_bytes`. Default: 4096.
    pub dead_letter_payload_max_bytes: usize,
    /// Pseudonyms and dropped images (camera events). Default: identifiers dropped (no
    /// pseudonymizer), pedestrian thumbnails dropped.
    pub privacy: crate::privacy::Privacy,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self {
            max_future_ms: Some(5 * 60 * 1000),
            max_past_ms: Some(7 * 24 * 3600 * 1000),
            dead_letter_payload_max_bytes: 4096,
            privacy: crate::privacy::Privacy { pseudonymizer: None, drop_thumbnail_classes: vec!["pedestrian".into()] },
        }
    }
}

/// A raw batch that does not have the raw schema: a bug in a source, never bad data.
#[derive(Debug, thiserror::Error)]
#[error("raw batch column `{column}` is missing or not of type {expected}")]
pub struct SchemaError {
    /// The offending column.
    pub column: &'static str,
    /// The Arrow type it must have.
    pub expected: &'static str,
}

/// What one raw batch decoded to.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// The accepted events, in input order, with the kind's schema.
    pub valid: RecordBatch,
    /// The rejected events, in input order, with the dead-letter schema.
    pub dead_letters: RecordBatch,
}

/// Decodes raw batches of one [`EventKind`].
#[derive(Debug, Clone)]
pub struct Decoder {
    kind: EventKind,
    options: DecodeOptions,
}

struct RawColumns<'a> {
    source: &'a StringArray,
    partition: &'a Int32Array,
    offset: &'a Int64Array,
    received_at: &'a TimestampMillisecondArray,
    payload: &'a BinaryArray,
}

fn column<'a, T: 'static>(
    batch: &'a RecordBatch,
    name: &'static str,
    expected: &'static str,
    cast: impl Fn(&'a ArrayRef) -> Option<&'a T>,
) -> Result<&'a T, SchemaError> {
    batch.column_by_name(name).and_then(cast).ok_or(SchemaError { column: name, expected })
}

impl<'a> RawColumns<'a> {
    fn try_new(b: &'a RecordBatch) -> Result<Self, SchemaError> {
        use crate::raw::*;
        Ok(Self {
            source: column(b, SOURCE, "Utf8", |a| a.as_string_opt::<i32>())?,
            partition: column(b, PARTITION, "Int32", |a| a.as_primitive_opt::<Int32Type>())?,
            offset: column(b, OFFSET, "Int64", |a| a.as_primitive_opt::<Int64Type>())?,
            received_at: column(b, RECEIVED_AT, "Timestamp(ms)", |a| a.as_primitive_opt::<TimestampMillisecondType>())?,
            payload: column(b, PAYLOAD, "Binary", |a| a.as_binary_opt::<i32>())?,
        })
    }
}

/// Columns common to every kind.
struct CommonBuilders {
    event_id: StringBuilder,
    ts: TimestampMillisecondBuilder,
    version: Int32Builder,
    partition: Int32Builder,
    offset: Int64Builder,
}

#[derive(Deserialize)]
struct VersionOnly {
    schema_version: Option<i64>,
}

fn json_reason(kind: EventKind, e: &serde_json::Error, payload: &[u8]) -> Reason {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            Reason::new(ReasonCode::BadJson, format!("malformed JSON: {e}"))
        }
        Category::Data => {
            // A newer producer may send a version whose fields differ: name the version, which
            // is the real cause, rather than the first field that no longer matches.
            if let Ok(VersionOnly { schema_version: Some(v) }) = serde_json::from_slice::<VersionOnly>(payload)
                && v != SCHEMA_VERSION
            {
                return unknown_version(v);
            }
            let msg = e.to_string();
            let msg =
                msg.replace(&format!("struct {}Wire", capitalized(kind)), &format!("a JSON object (a {kind} event)"));
            let code = if msg.starts_with("missing field") { ReasonCode::MissingField } else { ReasonCode::WrongType };
            // serde quotes the offending value (a plate sent as a number, say): a reason names
            // the field and the rule, never the value
            let msg = without_values(&msg);
            match field_before(payload, e.line(), e.column()).filter(|_| code == ReasonCode::WrongType) {
                Some(field) => Reason::new(code, format!("`{field}`: {msg}")),
                None => Reason::new(code, msg),
            }
        }
    }
}

/// `msg` without the values serde quotes in it (`` `…` `` and `"…"`), except the name in
/// "missing field `x`" and the list after "expected one of", which are our contract's words.
fn without_values(msg: &str) -> String {
    // our contract's own words: a missing field's name, the accepted values of an enum
    let keep_next = |before: &str| before.ends_with("missing field ") || before.contains("expected one of ");
    let mut out = String::with_capacity(msg.len());
    let mut chars = msg.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if (c == '`' || c == '"') && keep_next(&msg[..i]) {
            // copied through to the closing quote
            out.push(c);
            for (_, d) in chars.by_ref() {
                out.push(d);
                if d == c {
                    break;
                }
            }
            continue;
        }
        if c == '`' || c == '"' {
            // skip to the closing quote (a backslash escapes inside double quotes)
            while let Some((_, d)) = chars.next() {
                if d == '\\' && c == '"' {
                    chars.next();
                } else if d == c {
                    break;
                }
            }
            // "integer `5`, expected" -> "integer, expected"
            while out.ends_with(' ') {
                out.pop();
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The JSON key whose value is at `line`:`column` (1-based, as serde_json reports errors), if
/// it looks like a field name.
fn field_before(payload: &[u8], line: usize, column: usize) -> Option<String> {
    let mut offset = 0;
    for (n, l) in payload.split(|b| *b == b'\n').enumerate() {
        if n + 1 == line {
            offset += column.min(l.len());
            break;
        }
        offset += l.len() + 1;
    }
    let text = &payload[..offset.min(payload.len())];
    // the last string followed by a colon is the key of the value being read
    let (mut key, mut i, mut last) = (None, 0, None::<(usize, usize)>);
    while i < text.len() {
        match text[i] {
            b'"' => {
                let start = i + 1;
                i += 1;
                while i < text.len() && text[i] != b'"' {
                    i += if text[i] == b'\\' { 2 } else { 1 };
                }
                last = Some((start, i.min(text.len())));
            }
            b':' => key = last.take(),
            b' ' | b'\t' | b'\r' | b'\n' => {}
            _ => last = None,
        }
        i += 1;
    }
    let (a, b) = key?;
    let name = std::str::from_utf8(&text[a..b]).ok()?;
    (name.len() <= 64 && !name.is_empty() && name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_'))
        .then(|| name.to_owned())
}

/// Parses one payload (`text`: the same bytes as a `str`, where the caller already knows them
/// to be UTF-8). Only a JSON object is an event: serde would otherwise also accept an array,
/// filling the fields by position.
fn parse<'a, C: Contract>(kind: EventKind, payload: &'a [u8], text: Option<&'a str>) -> Result<C::Wire<'a>, Reason> {
    let first = payload.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(match serde_json::from_slice::<serde::de::IgnoredAny>(payload) {
            Ok(_) => Reason::new(
                ReasonCode::WrongType,
                format!("payload is valid JSON but not an object (a {kind} event is a JSON object)"),
            ),
            Err(e) => Reason::new(ReasonCode::BadJson, format!("malformed JSON: {e}")),
        });
    }
    // UTF-8 checked once for the whole payload, not string by string (serde_json's `from_str`
    // skips its own check); a payload that is not UTF-8 gets `from_slice`'s error
    match text.map_or_else(|| std::str::from_utf8(payload), Ok) {
        Ok(text) => match C::scan(text) {
            Some(wire) => return Ok(wire),
            None => serde_json::from_str::<C::Wire<'_>>(text),
        },
        Err(_) => serde_json::from_slice::<C::Wire<'_>>(payload),
    }
    .map_err(|e| json_reason(kind, &e, payload))
}

fn capitalized(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Traffic => "Traffic",
        EventKind::Camera => "Camera",
        EventKind::Environment => "Environment",
    }
}

fn unknown_version(v: i64) -> Reason {
    Reason::new(
        ReasonCode::UnknownSchemaVersion,
        format!("schema_version {v} is not supported (supported: {SCHEMA_VERSION})"),
    )
}

impl Decoder {
    /// A decoder for `kind` with `options`.
    pub fn new(kind: EventKind, options: DecodeOptions) -> Self {
        Self { kind, options }
    }

    /// The kind this decoder accepts.
    pub fn kind(&self) -> EventKind {
        self.kind
    }

    /// The options in force.
    pub fn options(&self) -> &DecodeOptions {
        &self.options
    }

    /// Replaces the options (live tuning).
    pub fn set_options(&mut self, options: DecodeOptions) {
        self.options = options;
    }

    /// Decodes one raw batch (see [`crate::raw`]). Every input row ends up in exactly one of
    /// the two outputs.
    pub fn decode(&self, raw: &RecordBatch) -> Result<Decoded, SchemaError> {
        match self.kind {
            EventKind::Traffic => self.decode_with::<wire::Traffic>(raw),
            EventKind::Camera => self.decode_with::<wire::Camera>(raw),
            EventKind::Environment => self.decode_with::<wire::Environment>(raw),
        }
    }

    fn check_common(&self, c: &wire::Common<'_>, received_at: i64) -> Result<i64, Reason> {
        wire::check_id("event_id", c.event_id)?;
        if c.schema_version != SCHEMA_VERSION {
            return Err(unknown_version(c.schema_version));
        }
        let ts = c.ts.to_millis()?;
        if !(0..=MAX_TS_MS).contains(&ts) {
            return Err(Reason::new(
                ReasonCode::TimestampOutOfBounds,
                "ts is outside the supported range (1970-01-01 to 9999-12-31)".to_owned(),
            ));
        }
        // in i128: `received_at` is anything a source put there
        let skew = i64::try_from(i128::from(ts) - i128::from(received_at)).unwrap_or(i64::MAX);
        if let Some(max) = self.options.max_future_ms
            && skew > max
        {
            return Err(Reason::new(
                ReasonCode::TimestampOutOfBounds,
                format!("ts is {} s after the message's arrival time (bound {} s)", skew / 1000, max / 1000),
            ));
        }
        if let Some(max) = self.options.max_past_ms
            && skew.saturating_neg() > max
        {
            return Err(Reason::new(
                ReasonCode::TimestampOutOfBounds,
                format!(
                    "ts is {} s before the message's arrival time (bound {} s)",
                    skew.saturating_neg() / 1000,
                    max / 1000
                ),
            ));
        }
        Ok(ts)
    }

    fn decode_with<C: Contract>(&self, raw: &RecordBatch) -> Result<Decoded, SchemaError> {
        let cols = RawColumns::try_new(raw)?;
        let n = raw.num_rows();
        let mut contract = C::default();
        let mut common = CommonBuilders {
            event_id: StringBuilder::with_capacity(n, n * 24),
            ts: TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC"),
            version: Int32Builder::with_capacity(n),
            partition: Int32Builder::with_capacity(n),
            offset: Int64Builder::with_capacity(n),
        };
        let mut dead = DeadLetterBuilder::new(self.options.dead_letter_payload_max_bytes);
        let mut privacy = self.options.privacy.clone();
        // the payloads' bytes (this batch's: an array sliced from a larger one has others
        // around them) checked for UTF-8 in one call rather than one per payload; a payload
        // whose ends fall on character boundaries of valid text is valid text
        let offsets = cols.payload.value_offsets();
        let start = offsets[0].as_usize();
        let whole = std::str::from_utf8(&cols.payload.values()[start..offsets[n].as_usize()]).ok();
        for i in 0..n {
            let payload = cols.payload.value(i);
            let text = whole.and_then(|w| w.get(offsets[i].as_usize() - start..offsets[i + 1].as_usize() - start));
            let received_at = cols.received_at.value(i);
            let outcome = match parse::<C>(self.kind, payload, text) {
                Err(reason) => Err(reason),
                Ok(w) => {
                    let c = C::common(&w);
                    let accepted = self.check_common(&c, received_at).and_then(|ts| {
                        contract.accept(&w, &mut wire::Accept { ts, privacy: &mut privacy }).map(|()| ts)
                    });
                    accepted.map(|ts| {
                        common.event_id.append_value(c.event_id);
                        common.ts.append_value(ts);
                        common.version.append_value(SCHEMA_VERSION as i32);
                        common.partition.append_value(cols.partition.value(i));
                        common.offset.append_value(cols.offset.value(i));
                    })
                }
            };
            if let Err(reason) = outcome {
                let pos = Position {
                    source: cols.source.value(i),
                    partition: cols.partition.value(i),
                    offset: cols.offset.value(i),
                    received_at_ms: received_at,
                };
                // identifiers in rejected payloads are redacted before they can reach a table
                let payload = crate::privacy::redact_identifiers(payload);
                dead.append(pos, self.kind.as_str(), &reason, &payload);
            }
        }
        let mut columns: Vec<ArrayRef> =
            vec![Arc::new(common.event_id.finish()), Arc::new(common.ts.finish()), Arc::new(common.version.finish())];
        columns.extend(contract.finish());
        columns.push(Arc::new(common.partition.finish()));
        columns.push(Arc::new(common.offset.finish()));
        let valid = RecordBatch::try_new(self.kind.schema(), columns)
            .expect("decoded columns match the kind's schema by construction");
        debug_assert_eq!(valid.num_rows() + dead.len(), n);
        Ok(Decoded { valid, dead_letters: dead.finish() })
    }
}
