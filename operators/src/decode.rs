//! `decode`: raw JSON messages of one event kind to typed Arrow rows, with every rejected
//! message routed to the `dead_letters` side output with its reason.
//!
//! Decode is also where event time enters the pipeline. Per source partition it keeps the
//! newest valid event time; an event at or before its own partition's watermark (that time
//! minus the source's `max_out_of_orderness`) goes to `late_events`, decided in the order of
//! the partition's own events, so the same topic gives the same late rows however its
//! partitions were interleaved (a backlog, a restart, a paced live run). The partitions'
//! watermarks are published to the source's [`EventClock`](crate::event_time::EventClock),
//! from which the source derives the stream's watermark. Every row a later stage receives is
//! therefore ahead of the watermark it has seen.

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::SchemaRef;
use citystream_schemas::{DecodeOptions, Decoder, EventKind, ReasonCode, dead_letter, raw};
use serde::Deserialize;

use crate::event_time::{EventClock, PartitionTime};
use crate::partitioning::Routing;
use crate::{
    BuildContext, Collector, Counter, Duration, Operator, OperatorConfig, OperatorError, OutputSpec, PlanError,
};

/// Output port of the decoded events.
pub const MAIN: usize = 0;
/// Output port of the rejected events.
pub const DEAD_LETTERS: usize = 1;
/// Output port of the events behind their partition's watermark.
pub const LATE_EVENTS: usize = 2;

fn default_max_future() -> Option<Duration> {
    Some(Duration::from_secs(300))
}
fn default_max_past() -> Option<Duration> {
    Some(Duration::from_secs(7 * 86_400))
}
fn default_payload_max() -> usize {
    4096
}

/// YAML of a `decode` stage.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeConfig {
    /// The event kind to decode: `traffic`, `camera` or `environment`.
    pub kind: EventKind,
    /// Reject events whose `ts` is further than this after the message's arrival time (for
    /// Kafka, when it reached the broker, or our clock if that is earlier); `null` for no
    /// bound. Default `5m`.
    #[serde(default = "default_max_future")]
    pub max_future: Option<Duration>,
    /// Reject events whose `ts` is further than this before the message's arrival time; `null`
    /// for no bound (replaying an archive whose messages arrived long after their events).
    /// Default `7d`.
    #[serde(default = "default_max_past")]
    pub max_past: Option<Duration>,
    /// Keep at most this many bytes of a rejected payload. Default 4096.
    #[serde(default = "default_payload_max")]
    pub dead_letter_payload_max_bytes: usize,
    /// Camera events: replace plates and track ids by keyed pseudonyms. Absent: identifiers
    /// are dropped (the pseudonym columns stay null).
    #[serde(default)]
    pub pseudonymize: Option<PseudonymizeConfig>,
    /// Camera events: object classes whose thumbnails are dropped at ingest. Default
    /// `[pedestrian]`.
    #[serde(default = "default_drop_thumbnails")]
    pub drop_thumbnails_of: Vec<String>,
}

fn default_drop_thumbnails() -> Vec<String> {
    vec!["pedestrian".into()]
}

fn default_rotate() -> Duration {
    Duration::from_secs(86_400)
}

/// Where the pseudonymization secret comes from — never the config file itself — and how
/// often the pseudonym key rotates.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PseudonymizeConfig {
    /// An environment variable holding the secret (at least 32 bytes).
    #[serde(default)]
    pub secret_env: Option<String>,
    /// A file holding the secret (at least 32 bytes; keep it readable by the pipeline only).
    #[serde(default)]
    pub secret_file: Option<crate::EnvString>,
    /// Create `secret_file` with 32 random bytes (mode 0600) if it does not exist. For
    /// single-machine set-ups; a fleet shares one provisioned secret. Default false.
    #[serde(default)]
    pub create_secret_file: bool,
    /// Event-time period after which pseudonyms change (vehicles cannot be linked across
    /// periods). Default `1d`.
    #[serde(default = "default_rotate")]
    pub rotate: Duration,
}

impl PseudonymizeConfig {
    /// Reads the secret. A missing secret is an error, never a fallback.
    pub fn load_secret(&self) -> Result<Vec<u8>, PlanError> {
        crate::secret::load_secret(
            self.secret_env.as_deref(),
            self.secret_file.as_ref(),
            self.create_secret_file,
            "pseudonymize",
        )
    }

    fn pseudonymizer(&self) -> Result<citystream_schemas::privacy::Pseudonymizer, PlanError> {
        let secret = self.load_secret()?;
        citystream_schemas::privacy::Pseudonymizer::new(secret, self.rotate.as_millis_i64())
            .map_err(|e| PlanError::new("pseudonymize", e.to_string()))
    }
}

impl DecodeConfig {
    /// A config for `kind` with every default.
    pub fn new(kind: EventKind) -> Self {
        Self {
            kind,
            max_future: default_max_future(),
            max_past: default_max_past(),
            dead_letter_payload_max_bytes: default_payload_max(),
            pseudonymize: None,
            drop_thumbnails_of: default_drop_thumbnails(),
        }
    }

    fn options(&self) -> Result<DecodeOptions, PlanError> {
        Ok(DecodeOptions {
            max_future_ms: self.max_future.map(Duration::as_millis_i64),
            max_past_ms: self.max_past.map(Duration::as_millis_i64),
            dead_letter_payload_max_bytes: self.dead_letter_payload_max_bytes,
            privacy: citystream_schemas::privacy::Privacy {
                pseudonymizer: self.pseudonymize.as_ref().map(PseudonymizeConfig::pseudonymizer).transpose()?,
                drop_thumbnail_classes: self.drop_thumbnails_of.clone(),
            },
        })
    }
}

impl OperatorConfig for DecodeConfig {
    fn plan(&self, input: &SchemaRef) -> Result<Vec<OutputSpec>, Vec<PlanError>> {
        if input.as_ref() != raw::schema().as_ref() {
            return Err(vec![
                PlanError::new(
                    "input",
                    "`decode` needs a raw message stream (a source output), but its input carries typed rows",
                )
                .with_help("point `input` at a source output such as `city.traffic`"),
            ]);
        }
        if self.dead_letter_payload_max_bytes == 0 {
            return Err(vec![PlanError::new("dead_letter_payload_max_bytes", "must be at least 1")]);
        }
        if let Some(p) = &self.pseudonymize {
            if self.kind != EventKind::Camera {
                return Err(vec![PlanError::new("pseudonymize", "only camera events carry identifiers")]);
            }
            // a missing or short secret is a startup error (a file still to be created is
            // created when the stage is built, not while a config is only checked)
            let to_create = p.create_secret_file
                && p.secret_file.as_ref().is_some_and(|f| !std::path::Path::new(f.as_str()).exists());
            if !to_create {
                p.pseudonymizer().map_err(|e| vec![e])?;
            }
        }
        for (i, c) in self.drop_thumbnails_of.iter().enumerate() {
            if !citystream_schemas::OBJECT_CLASSES.contains(&c.as_str()) {
                return Err(vec![PlanError::new(
                    format!("drop_thumbnails_of[{i}]"),
                    format!("`{c}` is not an object class ({})", citystream_schemas::OBJECT_CLASSES.join(", ")),
                )]);
            }
        }
        Ok(vec![
            OutputSpec::new("main", self.kind.schema()),
            OutputSpec::new("dead_letters", dead_letter::schema()),
            OutputSpec::new("late_events", self.kind.schema()),
        ])
    }

    fn build(&self, input: &SchemaRef, ctx: &BuildContext) -> Result<Box<dyn Operator>, Vec<PlanError>> {
        let outputs = self.plan(input)?;
        let kind = self.kind.as_str();
        let labels = [("stage", ctx.stage.as_str()), ("kind", kind)];
        let rejected = ReasonCode::ALL.map(|code| {
            ctx.metrics.counter(
                "citystream_dead_letters_total",
                "Events rejected, by stage, kind and reason.",
                &[("stage", ctx.stage.as_str()), ("kind", kind), ("reason", code.as_str())],
            )
        });
        Ok(Box::new(Decode {
            decoder: Decoder::new(self.kind, self.options().map_err(|e| vec![e])?),
            clock: ctx.event_clock.clone(),
            routing: ctx.routing.clone(),
            payload_max: self.dead_letter_payload_max_bytes,
            time: PartitionTime::default(),
            watermark: i64::MIN,
            outputs,
            accepted: ctx.metrics.counter("citystream_events_valid_total", "Events decoded and valid.", &labels),
            bytes_in: ctx.metrics.counter("citystream_input_bytes_total", "JSON payload bytes received.", &labels),
            late: ctx.metrics.counter(
                "citystream_decode_late_rows_total",
                "Events behind their partition's watermark.",
                &labels,
            ),
            rejected,
        }))
    }
}

/// The `decode` operator.
pub struct Decode {
    decoder: Decoder,
    /// The event clock of the source stream read (absent: lateness only against the watermark).
    clock: Option<EventClock>,
    /// How the source topic is keyed (absent: rows are not checked against their partition).
    routing: Option<Routing>,
    payload_max: usize,
    time: PartitionTime,
    /// The input watermark.
    watermark: i64,
    outputs: Vec<OutputSpec>,
    accepted: Counter,
    bytes_in: Counter,
    late: Counter,
    rejected: [Counter; ReasonCode::ALL.len()],
}

impl Decode {
    /// Replaces the decoding options (live tuning).
    pub fn set_options(&mut self, config: &DecodeConfig) -> Result<(), PlanError> {
        self.decoder.set_options(config.options()?);
        Ok(())
    }

    /// Takes the rows that arrived on a partition their key does not belong to out of `valid`,
    /// as dead letters (`misrouted`) built from their raw messages in `raw`.
    fn split_misrouted(
        &self,
        raw: &RecordBatch,
        valid: RecordBatch,
    ) -> Result<(RecordBatch, Option<RecordBatch>), OperatorError> {
        let Some(routing) = &self.routing else { return Ok((valid, None)) };
        let wrong = routing.misrouted(&valid);
        if wrong.iter().all(Option::is_none) {
            return Ok((valid, None));
        }
        let cols = |b: &RecordBatch, p: &str, o: &str| {
            let part = b.column_by_name(p).and_then(|c| c.as_primitive_opt::<arrow::datatypes::Int32Type>()).cloned();
            let off = b.column_by_name(o).and_then(|c| c.as_primitive_opt::<arrow::datatypes::Int64Type>()).cloned();
            part.zip(off)
                .ok_or_else(|| OperatorError::SchemaMismatch { operator: "decode", detail: format!("no {p}/{o}") })
        };
        let (vp, vo) =
            cols(&valid, citystream_schemas::columns::SRC_PARTITION, citystream_schemas::columns::SRC_OFFSET)?;
        let (rp, ro) = cols(raw, raw::PARTITION, raw::OFFSET)?;
        let source = raw.column_by_name(raw::SOURCE).and_then(|c| c.as_string_opt::<i32>());
        let payload = raw.column_by_name(raw::PAYLOAD).and_then(|c| c.as_binary_opt::<i32>());
        let received = raw
            .column_by_name(raw::RECEIVED_AT)
            .and_then(|c| c.as_primitive_opt::<arrow::datatypes::TimestampMillisecondType>());
        let (Some(source), Some(payload), Some(received)) = (source, payload, received) else {
            return Err(OperatorError::SchemaMismatch { operator: "decode", detail: "not a raw batch".into() });
        };
        let mut dead = dead_letter::DeadLetterBuilder::new(self.payload_max);
        let n = routing.partitions();
        // valid rows are a subsequence of the raw rows, in order
        let mut j = 0;
        for (i, w) in wrong.iter().enumerate() {
            while j < raw.num_rows() && (rp.value(j), ro.value(j)) != (vp.value(i), vo.value(i)) {
                j += 1;
            }
            let Some(want) = w else { continue };
            if j == raw.num_rows() {
                return Err(OperatorError::SchemaMismatch {
                    operator: "decode",
                    detail: "a decoded row has no raw message".into(),
                });
            }
            let reason = citystream_schemas::Reason::new(
                ReasonCode::Misrouted,
                format!(
                    "its key ({}) belongs on partition {want} of {n}, and it arrived on partition {}",
                    routing.key.describe(),
                    rp.value(j)
                ),
            );
            let pos = dead_letter::Position {
                source: source.value(j),
                partition: rp.value(j),
                offset: ro.value(j),
                received_at_ms: received.value(j),
            };
            dead.append(
                pos,
                self.decoder.kind().as_str(),
                &reason,
                &citystream_schemas::privacy::redact_identifiers(payload.value(j)),
            );
        }
        let keep: arrow::array::BooleanArray = wrong.iter().map(|w| Some(w.is_none())).collect();
        Ok((arrow::compute::filter_record_batch(&valid, &keep)?, Some(dead.finish())))
    }

    /// Splits decoded rows into those on time and those behind their partition's watermark,
    /// and publishes the partitions' new watermarks.
    fn split_late(&mut self, valid: RecordBatch) -> Result<(RecordBatch, Option<RecordBatch>), OperatorError> {
        let lag = self.clock.as_ref().map_or(i64::MAX, EventClock::lag_ms);
        let ts = valid.column(1).as_primitive::<arrow::datatypes::TimestampMillisecondType>();
        let part = valid
            .column_by_name(citystream_schemas::columns::SRC_PARTITION)
            .and_then(|c| c.as_primitive_opt::<arrow::datatypes::Int32Type>())
            .ok_or_else(|| OperatorError::SchemaMismatch { operator: "decode", detail: "no src_partition".into() })?;
        let on_time: arrow::array::BooleanArray = (0..valid.num_rows())
            .map(|i| Some(self.time.admit(part.value(i), ts.value(i), lag, self.watermark)))
            .collect();
        let changes = self.time.take_changes();
        if let Some(c) = &self.clock
            && !changes.is_empty()
        {
            c.publish(changes);
        }
        if on_time.true_count() == valid.num_rows() {
            return Ok((valid, None));
        }
        let late = arrow::compute::filter_record_batch(&valid, &arrow::compute::not(&on_time)?)?;
        Ok((arrow::compute::filter_record_batch(&valid, &on_time)?, Some(late)))
    }
}

fn decode_state_schema() -> arrow::datatypes::SchemaRef {
    use arrow::datatypes::{DataType, Field, Schema};
    std::sync::Arc::new(Schema::new(vec![
        Field::new("partition", DataType::Int32, false),
        Field::new("newest_ts", DataType::Int64, false),
    ]))
}

impl Operator for Decode {
    fn kind(&self) -> &'static str {
        "decode"
    }

    fn outputs(&self) -> &[OutputSpec] {
        &self.outputs
    }

    fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<(), OperatorError> {
        let decoded = self
            .decoder
            .decode(&batch)
            .map_err(|e| OperatorError::SchemaMismatch { operator: "decode", detail: e.to_string() })?;
        if let Some(p) = batch.column_by_name(raw::PAYLOAD).and_then(|c| c.as_binary_opt::<i32>()) {
            self.bytes_in.inc_by(p.values().len() as u64);
        }
        if decoded.dead_letters.num_rows() > 0 {
            let codes =
                decoded.dead_letters.column_by_name(dead_letter::REASON_CODE).expect("schema").as_string::<i32>();
            for code in codes.iter().flatten() {
                if let Some(i) = ReasonCode::ALL.iter().position(|c| c.as_str() == code) {
                    self.rejected[i].inc();
                }
            }
        }
        // a misrouted row still counts in the event time of the partition it arrived on (so a
        // partition a producer fills with misrouted rows alone does not hold the watermark);
        // then it leaves, on time or late, for the dead letters
        let (on_time, late) = self.split_late(decoded.valid)?;
        let (on_time, misrouted) = self.split_misrouted(&batch, on_time)?;
        let (late, misrouted_late) = match late {
            Some(l) => {
                let (l, m) = self.split_misrouted(&batch, l)?;
                (Some(l), m)
            }
            None => (None, None),
        };
        for m in [misrouted, misrouted_late].into_iter().flatten() {
            self.rejected[ReasonCode::ALL.iter().position(|c| *c == ReasonCode::Misrouted).expect("listed")]
                .inc_by(m.num_rows() as u64);
            out.emit(DEAD_LETTERS, m);
        }
        self.accepted.inc_by((on_time.num_rows() + late.as_ref().map_or(0, RecordBatch::num_rows)) as u64);
        if let Some(late) = late.filter(|l| l.num_rows() > 0) {
            self.late.inc_by(late.num_rows() as u64);
            out.emit(LATE_EVENTS, late);
        }
        out.emit(MAIN, on_time);
        out.emit(DEAD_LETTERS, decoded.dead_letters);
        Ok(())
    }

    fn on_watermark(&mut self, watermark: i64, _out: &mut Collector) -> Result<(), OperatorError> {
        self.watermark = self.watermark.max(watermark);
        Ok(())
    }

    fn is_stateful(&self) -> bool {
        true
    }

    /// The newest event time per partition: after a restore, the same events are late.
    fn snapshot(&self) -> Result<Option<RecordBatch>, OperatorError> {
        let (p, t): (Vec<i32>, Vec<i64>) = self.time.newest().iter().map(|(p, t)| (*p, *t)).unzip();
        Ok(Some(RecordBatch::try_new(
            decode_state_schema(),
            vec![
                std::sync::Arc::new(arrow::array::Int32Array::from(p)),
                std::sync::Arc::new(arrow::array::Int64Array::from(t)),
            ],
        )?))
    }

    fn restore(&mut self, state: RecordBatch) -> Result<(), OperatorError> {
        crate::common::check_state_schema("decode", &state, &decode_state_schema())?;
        let p = state.column(0).as_primitive::<arrow::datatypes::Int32Type>();
        let t = state.column(1).as_primitive::<arrow::datatypes::Int64Type>();
        let lag = self.clock.as_ref().map_or(0, EventClock::lag_ms);
        self.time.restore(p.values().iter().copied().zip(t.values().iter().copied()), lag);
        if let Some(c) = &self.clock {
            c.publish(self.time.take_changes());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Metrics;

    #[test]
    fn routes_valid_and_invalid_and_counts_reasons() {
        let metrics = Metrics::new();
        let ctx = BuildContext { stage: "decode_env".into(), metrics: metrics.clone(), ..Default::default() };
        let cfg = DecodeConfig::new(EventKind::Environment);
        let mut op = cfg.build(&raw::schema(), &ctx).unwrap();
        let mut b = raw::RawBatchBuilder::with_capacity(3, 256);
        let ok = br#"{"event_id":"e1","ts":1000,"schema_version":1,"station_id":"E1","pm25":3}"#;
        b.append("sim", 0, 0, 1000, ok);
        b.append("sim", 0, 1, 1000, b"{oops");
        b.append(
            "sim",
            0,
            2,
            1000,
            br#"{"event_id":"e2","ts":1000,"schema_version":1,"station_id":"E1","humidity":300}"#,
        );
        let mut out = Collector::new(op.outputs().len());
        op.process_batch(b.finish(), &mut out).unwrap();
        assert_eq!(out.port(MAIN)[0].num_rows(), 1);
        assert_eq!(out.port(DEAD_LETTERS)[0].num_rows(), 2);
        let l = |r| [("stage", "decode_env"), ("kind", "environment"), ("reason", r)];
        assert_eq!(metrics.value("citystream_dead_letters_total", &l("bad_json")), Some(1.0));
        assert_eq!(metrics.value("citystream_dead_letters_total", &l("out_of_range")), Some(1.0));
        assert_eq!(metrics.sum("citystream_events_valid_total"), 1.0);
    }

    /// Traffic payloads at `ts` (seconds) on `partition`, as a raw batch.
    fn traffic(rows: &[(i32, i64)]) -> RecordBatch {
        let mut b = raw::RawBatchBuilder::with_capacity(rows.len(), 256 * rows.len());
        for (i, (p, ts)) in rows.iter().enumerate() {
            let json = format!(
                r#"{{"event_id":"e{i}","ts":{},"schema_version":1,"sensor_id":"d{p}","segment_id":"s","lane":1,"interval_s":30,"flow":1,"occupancy":0.1,"speed_kmh":50}}"#,
                ts * 1000
            );
            b.append("t", *p, i as i64, ts * 1000, json.as_bytes());
        }
        b.finish()
    }

    fn late_ids(batches: &[RecordBatch]) -> Vec<String> {
        let clock = crate::event_time::EventClock::new(120_000);
        let ctx = BuildContext { stage: "d".into(), event_clock: Some(clock.clone()), ..Default::default() };
        let mut op = DecodeConfig { max_past: None, max_future: None, ..DecodeConfig::new(EventKind::Traffic) }
            .build(&raw::schema(), &ctx)
            .unwrap();
        let mut out = Collector::new(3);
        for b in batches {
            op.process_batch(b.clone(), &mut out).unwrap();
        }
        let mut ids: Vec<String> = out
            .port(LATE_EVENTS)
            .iter()
            .flat_map(|b| b.column(0).as_string::<i32>().iter().map(|s| s.unwrap().to_owned()).collect::<Vec<_>>())
            .collect();
        ids.sort();
        ids
    }

    #[test]
    fn late_is_decided_per_partition_whatever_the_interleaving() {
        // partition 0 runs an hour ahead of partition 1; each has one event 3 minutes behind
        // its own newest (late) and one 1 minute behind (on time)
        let p0 = [(0, 4600), (0, 4700), (0, 4520), (0, 4640)];
        let p1 = [(1, 1000), (1, 1100), (1, 920), (1, 1040)];
        let ids = |rows: &[(i32, i64)]| -> Vec<String> {
            // event ids are per position in the batch: name them by (partition, ts) instead
            let b = traffic(rows);
            let late = late_ids(&[b]);
            let mut named: Vec<String> = late
                .iter()
                .map(|id| {
                    let i: usize = id[1..].parse().unwrap();
                    format!("{}@{}", rows[i].0, rows[i].1)
                })
                .collect();
            named.sort();
            named
        };
        let one_then_other: Vec<(i32, i64)> = p0.iter().chain(p1.iter()).copied().collect();
        let other_then_one: Vec<(i32, i64)> = p1.iter().chain(p0.iter()).copied().collect();
        let alternating: Vec<(i32, i64)> = p0.iter().zip(p1.iter()).flat_map(|(a, b)| [*a, *b]).collect();
        let expected = vec!["0@4520".to_owned(), "1@920".to_owned()];
        assert_eq!(ids(&one_then_other), expected);
        assert_eq!(ids(&other_then_one), expected);
        assert_eq!(ids(&alternating), expected);
    }

    #[test]
    fn the_partitions_watermarks_reach_the_clock_and_survive_a_restore() {
        let clock = crate::event_time::EventClock::new(120_000);
        let ctx = BuildContext { stage: "d".into(), event_clock: Some(clock.clone()), ..Default::default() };
        let cfg = DecodeConfig { max_past: None, max_future: None, ..DecodeConfig::new(EventKind::Traffic) };
        let mut op = cfg.build(&raw::schema(), &ctx).unwrap();
        let mut out = Collector::new(3);
        op.process_batch(traffic(&[(0, 1000), (2, 500)]), &mut out).unwrap();
        assert_eq!(clock.watermark(0), Some(1_000_000 - 120_000));
        assert_eq!(clock.watermark(2), Some(500_000 - 120_000));
        let state = op.snapshot().unwrap().unwrap();
        let clock2 = crate::event_time::EventClock::new(120_000);
        let ctx2 = BuildContext { event_clock: Some(clock2.clone()), ..ctx };
        let mut op2 = cfg.build(&raw::schema(), &ctx2).unwrap();
        op2.restore(state).unwrap();
        assert_eq!(clock2.watermarks(), clock.watermarks(), "a restored stage publishes its partitions at once");
        let mut out2 = Collector::new(3);
        op2.process_batch(traffic(&[(0, 800)]), &mut out2).unwrap();
        assert_eq!(out2.port(LATE_EVENTS).iter().map(RecordBatch::num_rows).sum::<usize>(), 1, "still late");
    }

    /// A row on a partition its key does not belong to is a dead letter (`misrouted`) built
    /// from its own message, between rejected and valid neighbours; it counts in the event time
    /// of the partition it arrived on (a partition of misrouted rows alone must not hold the
    /// watermark back); until the source knows the partition count nothing is checked.
    #[test]
    fn rows_on_the_wrong_partition_are_dead_letters() {
        use crate::partitioning::{Routing, TopicKey, partition_of};
        let home = |seg: &str| partition_of(seg.as_bytes(), 4);
        let away = |seg: &str| (home(seg) + 1) % 4;
        let json = |i: usize, seg: &str, ts: i64| {
            format!(
                r#"{{"event_id":"e{i}","ts":{ts},"schema_version":1,"sensor_id":"d","segment_id":"{seg}","lane":1,"interval_s":30,"flow":1,"occupancy":0.1,"speed_kmh":50}}"#
            )
        };
        let mut b = raw::RawBatchBuilder::with_capacity(4, 1024);
        b.append("t", home("a"), 10, 1_000_000, json(0, "a", 1_000_000).as_bytes());
        b.append("t", away("a"), 11, 1_000_000, b"{oops");
        b.append("t", away("b"), 12, 9_000_000, json(2, "b", 9_000_000).as_bytes());
        b.append("t", home("c"), 13, 1_000_000, json(3, "c", 1_000_000).as_bytes());
        let batch = b.finish();
        let routing = Routing::new(TopicKey { column: "segment_id".into(), group: None });
        let clock = crate::event_time::EventClock::new(0);
        let metrics = crate::Metrics::new();
        let ctx = BuildContext {
            stage: "d".into(),
            metrics: metrics.clone(),
            event_clock: Some(clock.clone()),
            routing: Some(routing.clone()),
            ..Default::default()
        };
        let cfg = DecodeConfig { max_past: None, max_future: None, ..DecodeConfig::new(EventKind::Traffic) };
        let run = |batch: &RecordBatch| {
            let mut op = cfg.build(&raw::schema(), &ctx).unwrap();
            let mut out = Collector::new(3);
            op.process_batch(batch.clone(), &mut out).unwrap();
            out
        };
        // the partition count is not known yet: nothing is checked
        let out = run(&batch);
        assert_eq!(out.port(MAIN).iter().map(RecordBatch::num_rows).sum::<usize>(), 3);
        routing.set_partitions(4);
        let out = run(&batch);
        let ids: Vec<&str> =
            out.port(MAIN).iter().flat_map(|b| b.column(0).as_string::<i32>().iter().flatten()).collect();
        assert_eq!(ids, ["e0", "e3"]);
        let dead = arrow::compute::concat_batches(&dead_letter::schema(), out.port(DEAD_LETTERS)).unwrap();
        let col = |n: &str| dead.column_by_name(n).unwrap().clone();
        let codes = col(dead_letter::REASON_CODE);
        let mut sorted: Vec<&str> = codes.as_string::<i32>().iter().flatten().collect();
        sorted.sort();
        assert_eq!(sorted, ["bad_json", "misrouted"]);
        let offsets = col("src_offset");
        let (offsets, codes) = (offsets.as_primitive::<arrow::datatypes::Int64Type>(), codes.as_string::<i32>());
        let at = (0..dead.num_rows()).find(|&i| codes.value(i) == "misrouted").unwrap();
        assert_eq!(offsets.value(at), 12, "the misrouted message's own position");
        let reason = col(dead_letter::REASON);
        assert_eq!(
            reason.as_string::<i32>().value(at),
            format!(
                "its key (`segment_id`) belongs on partition {} of 4, and it arrived on partition {}",
                home("b"),
                away("b")
            )
        );
        let payload = col("payload");
        assert!(std::str::from_utf8(payload.as_binary::<i32>().value(at)).unwrap().contains(r#""event_id":"e2""#));
        assert_eq!(clock.watermark(away("b")), Some(9_000_000), "its partition's event time moved");
        let l = [("stage", "d"), ("kind", "traffic"), ("reason", "misrouted")];
        assert_eq!(metrics.value("citystream_dead_letters_total", &l), Some(1.0));
        assert_eq!(metrics.sum("citystream_events_valid_total"), 3.0 + 2.0, "3 in the first run, 2 in the second");
    }

    #[test]
    fn plan_rejects_typed_input() {
        let errs = DecodeConfig::new(EventKind::Traffic).plan(&EventKind::Traffic.schema()).unwrap_err();
        assert_eq!(errs[0].key, "input");
        assert!(errs[0].message.contains("needs a raw message stream"));
    }

    #[test]
    fn yaml_defaults_and_null_bounds() {
        let c: DecodeConfig = serde_saphyr::from_str("kind: camera\nmax_future: null\nmax_past: 1h\n").unwrap();
        assert_eq!(c.kind, EventKind::Camera);
        assert_eq!(c.max_future, None);
        assert_eq!(c.max_past, Some(Duration::from_secs(3600)));
        assert_eq!(c.dead_letter_payload_max_bytes, 4096);
    }
}
