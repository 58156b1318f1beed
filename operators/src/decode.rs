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
        match (&self.secret_env, &self.secret_file) {
            (Some(var), None) => std::env::var(var).map(String::into_bytes).map_err(|_| {
                PlanError::new("pseudonymize.secret_env", format!("the environment variable `{var}` is not set"))
                    .with_help("export it with a secret of at least 32 bytes, e.g. `openssl rand -base64 48`")
            }),
            (None, Some(path)) => {
                let path = path.as_str();
                let p = std::path::Path::new(path);
                if !p.exists() && self.create_secret_file {
                    create_secret(p).map_err(|e| {
                        PlanError::new("pseudonymize.secret_file", format!("cannot create `{path}`: {e}"))
                    })?;
                }
                std::fs::read(p).map_err(|e| {
                    PlanError::new("pseudonymize.secret_file", format!("cannot read the secret file `{path}`: {e}"))
                        .with_help("provision it, or set `create_secret_file: true` on a single machine")
                })
            }
            _ => Err(PlanError::new("pseudonymize", "give exactly one of `secret_env` and `secret_file`")),
        }
    }

    fn pseudonymizer(&self) -> Result<citystream_schemas::privacy::Pseudonymizer, PlanError> {
        let secret = self.load_secret()?;
        citystream_schemas::privacy::Pseudonymizer::new(secret, self.rotate.as_millis_i64())
            .map_err(|e| PlanError::new("pseudonymize", e.to_string()))
    }
}

fn create_secret(path: &std::path::Path) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut secret = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact_into(&mut secret)?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path)?;
    f.write_all(&secret)?;
    f.sync_all()
}

trait ReadExact {
    fn read_exact_into(&mut self, buf: &mut [u8]) -> std::io::Result<()>;
}

impl ReadExact for std::fs::File {
    fn read_exact_into(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        std::io::Read::read_exact(self, buf)
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
            decoder: Decoder::new(self.kind, self.options().map_err(|e| vec![e])?),
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
    pub fn set_options(&mut self, config: &DecodeConfig) -> Result<(), PlanError> {
        self.decoder.set_options(config.options()?);
        Ok(())
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
