//! `decode`: raw JSON messages of one event kind to typed Arrow rows, with every rejected
//! message routed to the `dead_letters` side output with its reason.

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::SchemaRef;
use citystream_schemas::{DecodeOptions, Decoder, EventKind, ReasonCode, dead_letter, raw};
use serde::Deserialize;

use crate::{
    BuildContext, Collector, Counter, Duration, Operator, OperatorConfig, OperatorError, OutputSpec, PlanError,
};

/// Output port of the decoded events.
pub const MAIN: usize = 0;
/// Output port of the rejected events.
pub const DEAD_LETTERS: usize = 1;

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
    /// Reject events whose `ts` is further than this after processing time; `null` for no
    /// bound. Default `5m`.
    #[serde(default = "default_max_future")]
    pub max_future: Option<Duration>,
    /// Reject events whose `ts` is further than this before processing time; `null` for no
    /// bound. Default `7d`.
    #[serde(default = "default_max_past")]
    pub max_past: Option<Duration>,
    /// Keep at most this many bytes of a rejected payload. Default 4096.
    #[serde(default = "default_payload_max")]
    pub dead_letter_payload_max_bytes: usize,
}

impl DecodeConfig {
    /// A config for `kind` with every default.
    pub fn new(kind: EventKind) -> Self {
        Self {
            kind,
            max_future: default_max_future(),
            max_past: default_max_past(),
            dead_letter_payload_max_bytes: default_payload_max(),
        }
    }

    fn options(&self) -> DecodeOptions {
        DecodeOptions {
            max_future_ms: self.max_future.map(Duration::as_millis_i64),
            max_past_ms: self.max_past.map(Duration::as_millis_i64),
            dead_letter_payload_max_bytes: self.dead_letter_payload_max_bytes,
        }
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
        Ok(vec![OutputSpec::new("main", self.kind.schema()), OutputSpec::new("dead_letters", dead_letter::schema())])
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
            decoder: Decoder::new(self.kind, self.options()),
            outputs,
            accepted: ctx.metrics.counter("citystream_events_valid_total", "Events decoded and valid.", &labels),
            bytes_in: ctx.metrics.counter("citystream_input_bytes_total", "JSON payload bytes received.", &labels),
            rejected,
        }))
    }
}

/// The `decode` operator.
pub struct Decode {
    decoder: Decoder,
    outputs: Vec<OutputSpec>,
    accepted: Counter,
    bytes_in: Counter,
    rejected: [Counter; ReasonCode::ALL.len()],
}

impl Decode {
    /// Replaces the decoding options (live tuning).
    pub fn set_options(&mut self, config: &DecodeConfig) {
        self.decoder.set_options(config.options());
    }
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
        self.accepted.inc_by(decoded.valid.num_rows() as u64);
        if decoded.dead_letters.num_rows() > 0 {
            let codes =
                decoded.dead_letters.column_by_name(dead_letter::REASON_CODE).expect("schema").as_string::<i32>();
            for code in codes.iter().flatten() {
                if let Some(i) = ReasonCode::ALL.iter().position(|c| c.as_str() == code) {
                    self.rejected[i].inc();
                }
            }
        }
        out.emit(MAIN, decoded.valid);
        out.emit(DEAD_LETTERS, decoded.dead_letters);
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
        let ctx = BuildContext { stage: "decode_env".into(), metrics: metrics.clone() };
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
