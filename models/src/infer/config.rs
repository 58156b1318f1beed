//! YAML of an `infer` stage (model, features, micro-batching, shadow, high-carbon mode) and
//! its planning: the input resolved against the schema, the model checked, the outputs named.

use citystream_operators::LiveChangeError;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use citystream_operators::common::column;
use citystream_operators::{BuildContext, Duration, EnvString, Operator, OperatorConfig, OutputSpec, PlanError};
use serde::Deserialize;

use crate::onnx::{LoadOptions, Provider};

use super::calm::Calm;
use super::hot_swap::Slot;
use super::operator::Infer;

/// The feature input: one list column or several scalar columns.
#[derive(Debug, Clone, PartialEq)]
pub enum FeatureInput {
    /// A `FixedSizeList<Float32>` column: zero-copy.
    List(String),
    /// Numeric columns, in model-input order.
    Columns(Vec<String>),
}

/// A column name or a list of them; anything else is refused naming both forms.
impl<'de> Deserialize<'de> for FeatureInput {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = FeatureInput;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("the name of a list column, or a list of numeric column names")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<FeatureInput, E> {
                Ok(FeatureInput::List(v.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<FeatureInput, A::Error> {
                let mut cols = Vec::new();
                while let Some(c) = seq.next_element::<String>()? {
                    cols.push(c);
                }
                Ok(FeatureInput::Columns(cols))
            }
        }
        d.deserialize_any(V)
    }
}

pub(super) fn d_max_rows() -> usize {
    1024
}
pub(super) fn d_max_delay() -> Duration {
    "100ms".parse().expect("literal")
}
pub(super) fn d_providers() -> Vec<Provider> {
    vec![Provider::Cpu]
}
pub(super) fn d_cuda_min_rows() -> usize {
    1024
}
pub(super) fn d_threads() -> usize {
    1
}
pub(super) fn d_poll() -> Duration {
    "2s".parse().expect("literal")
}

/// Micro-batching limits.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Most rows per model run. Default 1024.
    #[serde(default = "d_max_rows")]
    pub max_rows: usize,
    /// Longest a row waits for others (processing time). Default `100ms`.
    #[serde(default = "d_max_delay")]
    pub max_delay: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig { max_rows: d_max_rows(), max_delay: d_max_delay() }
    }
}

/// A candidate model run beside the live one.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowConfig {
    /// Its ONNX file (same input and outputs as the live model).
    pub model: EnvString,
    /// Its name in the output. Default: the file stem.
    #[serde(default)]
    pub name: Option<String>,
}

/// High-carbon operation: while `runtime.carbon_policy` reports the high mode (the grid above
/// its threshold, or the pipeline above its energy budget: the `citystream_carbon_high_mode`
/// gauge), the stage runs `model` instead of the live one, in batches of up to `max_rows`, and
/// with `calm` predicts segments with no recent risk less often. A stage without it is never
/// switched: leave it off the stages whose quality is the floor (the incident detector that
/// alerts read); `runtime.carbon_policy.alert_floor` bounds `calm.every` on stages alerts read.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CarbonConfig {
    /// The cheaper ONNX file (same input and outputs), e.g. the small variant. Default: none
    /// (the live model keeps serving).
    #[serde(default)]
    pub model: Option<EnvString>,
    /// Its name in the output. Default: the file stem.
    #[serde(default)]
    pub name: Option<String>,
    /// Micro-batch rows while the grid is high (wider batches, fewer runs). Default: `batch.max_rows`.
    #[serde(default)]
    pub max_rows: Option<usize>,
    /// A lower prediction rate for calm keys in the high mode.
    #[serde(default)]
    pub calm: Option<CalmConfig>,
}

pub(super) fn d_calm_key() -> String {
    "segment_id".into()
}
pub(super) fn d_calm_time() -> String {
    "window_end".into()
}

/// Which keys are calm and how often they are predicted in the high mode. A key is calm while
/// its latest prediction in `column` is beyond the level (`above` or `below`); its rows are then
/// run once per `every` of event time and the rest skipped (counted, never emitted). A key whose
/// prediction shows risk is predicted every row again from its next run.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalmConfig {
    /// An output column of the model, e.g. `speed_15m_kmh`.
    pub column: String,
    /// Calm while the prediction is above this (e.g. a speed in km/h).
    #[serde(default)]
    pub above: Option<f64>,
    /// Calm while the prediction is below this (e.g. a probability).
    #[serde(default)]
    pub below: Option<f64>,
    /// How often a calm key is still predicted (event time), e.g. `5m`.
    pub every: Duration,
    /// The key column. Default `segment_id`.
    #[serde(default = "d_calm_key")]
    pub key: String,
    /// The event-time column. Default `window_end`.
    #[serde(default = "d_calm_time")]
    pub time: String,
}

impl CalmConfig {
    pub(super) fn is_calm(&self, v: f32) -> bool {
        let v = f64::from(v);
        self.above.is_some_and(|a| v > a) || self.below.is_some_and(|b| v < b)
    }
}

/// YAML of an `infer` stage.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferConfig {
    /// The ONNX file.
    pub model: EnvString,
    /// Its name in the output. Default: the file stem.
    #[serde(default)]
    pub name: Option<String>,
    /// The feature column(s) fed to the model's single input.
    pub features: FeatureInput,
    /// Model output tensor -> the column names of its columns, in order.
    pub outputs: std::collections::BTreeMap<String, Vec<String>>,
    /// Input columns copied to the output (keys, time).
    #[serde(default)]
    pub keep: Vec<String>,
    /// Execution providers in order of preference (`cuda`, `cpu`). Default `[cpu]`.
    #[serde(default = "d_providers")]
    pub providers: Vec<Provider>,
    /// On CUDA, runs of fewer rows go to the CPU (a session of the same file). Measured on an
    /// H200 (`deploy/gpu/check.sh`, three series): a CUDA run costs 80-175 µs of launches and
    /// copies whatever its size, so at 256 rows CUDA gave 0.2-0.66x the rows/s of one CPU core
    /// and at 1024 rows 1.05-3x. A run holds one event time's rows (a task's segments in one
    /// minute, at most `batch.max_rows`), so the split is the same live, in a backlog and after
    /// a restart. 0: every run on CUDA. Default 1024.
    #[serde(default = "d_cuda_min_rows")]
    pub cuda_min_rows: usize,
    /// ONNX Runtime intra-op threads. Default 1 (the pipeline runs stages in parallel).
    #[serde(default = "d_threads")]
    pub intra_threads: usize,
    /// Micro-batching.
    #[serde(default)]
    pub batch: BatchConfig,
    /// How often the model file is checked for a replacement; `0s` turns hot swap off. Default `2s`.
    #[serde(default = "d_poll")]
    pub reload_poll: Duration,
    /// A candidate model whose predictions go to port `shadow`.
    #[serde(default)]
    pub shadow: Option<ShadowConfig>,
    /// A cheaper model while the grid is high-carbon (`runtime.carbon_policy`).
    #[serde(default)]
    pub carbon: Option<CarbonConfig>,
    /// The ONNX Runtime library (default: `ORT_DYLIB_PATH`, then `.venv`).
    #[serde(default)]
    pub library: Option<EnvString>,
}

pub(super) struct Resolved {
    pub(super) input: Vec<usize>,
    pub(super) list: bool,
    pub(super) width: usize,
    pub(super) keep: Vec<usize>,
    pub(super) schema: SchemaRef,
}

impl InferConfig {
    pub(super) fn check(&self, input: &SchemaRef) -> Result<Resolved, Vec<PlanError>> {
        let mut errs = Vec::new();
        let (idx, list, width) = match &self.features {
            FeatureInput::List(name) => match column(input, name, "features") {
                Ok(i) => match input.field(i).data_type() {
                    DataType::FixedSizeList(item, w) if item.data_type() == &DataType::Float32 => {
                        (vec![i], true, *w as usize)
                    }
                    other => {
                        errs.push(
                            PlanError::new(
                                "features",
                                format!("`{name}` is {other}, not a fixed-size list of float32"),
                            )
                            .with_help("name the numeric feature columns as a list instead"),
                        );
                        (vec![], true, 0)
                    }
                },
                Err(e) => {
                    errs.push(e);
                    (vec![], true, 0)
                }
            },
            FeatureInput::Columns(names) => {
                let mut idx = Vec::new();
                for (k, n) in names.iter().enumerate() {
                    match citystream_operators::common::numeric_column(input, n, &format!("features[{k}]")) {
                        Ok(i) => idx.push(i),
                        Err(e) => errs.push(e),
                    }
                }
                if names.is_empty() {
                    errs.push(PlanError::new("features", "no feature columns"));
                }
                let w = idx.len();
                (idx, false, w)
            }
        };
        let keep = citystream_operators::common::kept_columns(input, &self.keep, &["model", "model_sha256"], &mut errs);
        if self.outputs.is_empty() {
            errs.push(PlanError::new(
                "outputs",
                "map at least one model output to columns, e.g. `{speed_kmh: [speed_15m]}`",
            ));
        }
        let mut fields: Vec<Field> = keep.iter().map(|&i| input.field(i).as_ref().clone()).collect();
        for (tensor, cols) in &self.outputs {
            if cols.is_empty() {
                errs.push(PlanError::new(format!("outputs.{tensor}"), "no column names"));
            }
            for c in cols {
                if fields.iter().any(|f| f.name() == c) || c == "model" || c == "model_sha256" {
                    errs.push(PlanError::new(
                        format!("outputs.{tensor}"),
                        format!("column `{c}` appears twice in the output"),
                    ));
                }
                fields.push(Field::new(c, DataType::Float32, false));
            }
        }
        fields.push(Field::new("model", DataType::Utf8, false));
        fields.push(Field::new("model_sha256", DataType::Utf8, false));
        if !Path::new(self.model.as_str()).is_file() {
            errs.push(
                PlanError::new("model", format!("no model file at `{}`", self.model.as_str()))
                    .with_help("committed models are in models/onnx/; `models/train/train.py` makes them"),
            );
        }
        if let Some(s) = &self.shadow
            && !Path::new(s.model.as_str()).is_file()
        {
            errs.push(PlanError::new("shadow.model", format!("no model file at `{}`", s.model.as_str())));
        }
        if let Some(c) = &self.carbon {
            if let Some(m) = &c.model
                && !Path::new(m.as_str()).is_file()
            {
                errs.push(PlanError::new("carbon.model", format!("no model file at `{}`", m.as_str())));
            }
            if c.max_rows == Some(0) {
                errs.push(PlanError::new("carbon.max_rows", "must be at least 1"));
            }
            if c.model.is_none() && c.calm.is_none() && c.max_rows.is_none() {
                errs.push(PlanError::new("carbon", "set `model`, `max_rows`, `calm` or several"));
            }
            if let Some(calm) = &c.calm {
                errs.extend(self.check_calm(calm, input));
            }
        }
        if self.batch.max_rows == 0 {
            errs.push(PlanError::new("batch.max_rows", "must be at least 1"));
        }
        if self.providers.is_empty() {
            errs.push(
                PlanError::new("providers", "name at least one execution provider")
                    .with_help("`[cpu]`, or `[cuda, cpu]`"),
            );
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(Resolved { input: idx, list, width, keep, schema: Arc::new(Schema::new(fields)) })
    }

    pub(super) fn check_calm(&self, calm: &CalmConfig, input: &SchemaRef) -> Vec<PlanError> {
        let mut errs = Vec::new();
        if !self.outputs.values().flatten().any(|c| c == &calm.column) {
            let names: Vec<&str> = self.outputs.values().flatten().map(String::as_str).collect();
            errs.push(PlanError::new(
                "carbon.calm.column",
                format!("`{}` is not an output column ({})", calm.column, names.join(", ")),
            ));
        }
        if calm.above.is_some() == calm.below.is_some() {
            errs.push(PlanError::new("carbon.calm", "set exactly one of `above` and `below`"));
        }
        if calm.every.as_millis_i64() <= 0 {
            errs.push(PlanError::new("carbon.calm.every", "must be positive"));
        }
        match input.index_of(&calm.key).map(|i| input.field(i).data_type().clone()) {
            Ok(DataType::Utf8) => {}
            Ok(t) => errs.push(PlanError::new("carbon.calm.key", format!("`{}` is {t}, not a string", calm.key))),
            Err(_) => errs.push(PlanError::new("carbon.calm.key", format!("no input column `{}`", calm.key))),
        }
        match input.index_of(&calm.time).map(|i| input.field(i).data_type().clone()) {
            Ok(DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, _)) => {}
            Ok(t) => errs.push(PlanError::new(
                "carbon.calm.time",
                format!("`{}` is {t}, not a millisecond timestamp", calm.time),
            )),
            Err(_) => errs.push(PlanError::new("carbon.calm.time", format!("no input column `{}`", calm.time))),
        }
        errs
    }

    pub(super) fn load_options(&self, width: usize) -> LoadOptions {
        LoadOptions {
            providers: self.providers.clone(),
            intra_threads: self.intra_threads,
            input_width: width,
            outputs: self.outputs.iter().map(|(k, v)| (k.clone(), v.len())).collect(),
            library: self.library.as_ref().map(|l| PathBuf::from(l.as_str())),
            cuda_min_rows: self.cuda_min_rows,
        }
    }

    /// Live tuning: micro-batch limits may change; the model, its mapping and providers may not
    /// (replace the model file to swap it).
    pub fn live_change(&self, new: &InferConfig) -> Result<(), LiveChangeError> {
        let strip = |c: &InferConfig| InferConfig { batch: BatchConfig::default(), ..c.clone() };
        if strip(self) == strip(new) {
            Ok(())
        } else {
            Err(LiveChangeError::NeedsRestart(
                "only `batch` can change while running; to swap the model, replace its file",
            ))
        }
    }
}

impl OperatorConfig for InferConfig {
    fn passes_through(&self, _input: &SchemaRef, _port: usize) -> Vec<String> {
        self.keep.clone()
    }

    fn state_scopes(&self, _input: &SchemaRef) -> Vec<citystream_operators::partitioning::StateScope> {
        match self.carbon.as_ref().and_then(|c| c.calm.as_ref()) {
            Some(calm) => vec![citystream_operators::partitioning::StateScope::Keys(vec![calm.key.clone()])],
            None => Vec::new(),
        }
    }

    fn plan(&self, input: &SchemaRef) -> Result<Vec<OutputSpec>, Vec<PlanError>> {
        let r = self.check(input)?;
        let mut outs = vec![OutputSpec::new("main", r.schema.clone())];
        if self.shadow.is_some() {
            outs.push(OutputSpec::new("shadow", r.schema));
        }
        Ok(outs)
    }

    fn build(&self, input: &SchemaRef, ctx: &BuildContext) -> Result<Box<dyn Operator>, Vec<PlanError>> {
        let r = self.check(input)?;
        let opts = self.load_options(r.width);
        // the live, shadow and carbon models load and hot-swap the same way
        let start = |model: &EnvString, name: &Option<String>, role: &'static str, key: &str| {
            Slot::start(
                PathBuf::from(model.as_str()),
                name.clone(),
                opts.clone(),
                self.reload_poll.to_std(),
                &ctx.metrics,
                &ctx.stage,
                role,
            )
            .map_err(|e| vec![PlanError::new(key, e.to_string())])
        };
        let live = start(&self.model, &self.name, "live", "model")?;
        let shadow = self.shadow.as_ref().map(|s| start(&s.model, &s.name, "shadow", "shadow.model")).transpose()?;
        let carbon = self
            .carbon
            .as_ref()
            .and_then(|c| c.model.as_ref().map(|m| start(m, &c.name, "carbon", "carbon.model")))
            .transpose()?;
        let calm = self.carbon.as_ref().and_then(|c| c.calm.clone()).map(|cfg| Calm {
            key: input.index_of(&cfg.key).expect("checked"),
            time: input.index_of(&cfg.time).expect("checked"),
            cfg,
            state: HashMap::new(),
            skipped: ctx.metrics.counter(
                "citystream_infer_rows_skipped_total",
                "Rows of calm keys not predicted in the high-carbon mode.",
                &[("stage", ctx.stage.as_str())],
            ),
        });
        let mut outputs = vec![OutputSpec::new("main", r.schema.clone())];
        if shadow.is_some() {
            outputs.push(OutputSpec::new("shadow", r.schema.clone()));
        }
        let l = [("stage", ctx.stage.as_str())];
        Ok(Box::new(Infer {
            r,
            outputs,
            live,
            shadow,
            carbon,
            carbon_on: self.carbon.is_some(),
            calm,
            carbon_max_rows: self.carbon.as_ref().and_then(|c| c.max_rows),
            high_mode: false,
            metrics: ctx.metrics.clone(),
            stage: ctx.stage.clone(),
            batch: self.batch.clone(),
            buffered: Vec::new(),
            buffered_rows: 0,
            first_at: None,
            rows: ctx.metrics.counter("citystream_infer_rows_total", "Rows run through the model.", &l),
            runs: ctx.metrics.counter("citystream_infer_runs_total", "Model runs (micro-batches).", &l),
            micros: ctx.metrics.counter(
                "citystream_infer_micros_total",
                "Wall time inside the model runs, microseconds.",
                &l,
            ),
            cuda_runs: ctx.metrics.counter(
                "citystream_infer_cuda_runs_total",
                "Model runs on the CUDA provider (runs below `cuda_min_rows` run on the CPU).",
                &l,
            ),
            cuda_micros: ctx.metrics.counter(
                "citystream_infer_cuda_micros_total",
                "Wall time inside the model runs on the CUDA provider, microseconds.",
                &l,
            ),
            shadow_errors: ctx.metrics.counter(
                "citystream_infer_shadow_errors_total",
                "Shadow model runs that failed.",
                &l,
            ),
            last_batch: ctx.metrics.gauge("citystream_infer_last_batch_rows", "Rows of the last micro-batch.", &l),
        }))
    }
}
