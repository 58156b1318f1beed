//! `infer`: runs an ONNX model on feature rows, micro-batched across keys, with hot swap and
//! an optional shadow model.
//!
//! - **Input**: one `FixedSizeList<Float32, F>` column (its values buffer is handed to ONNX
//!   Runtime as the `[rows, F]` tensor without a copy when a micro-batch is one input batch;
//!   several buffered batches are concatenated once) or a list of numeric columns (copied into
//!   a row-major buffer).
//! - **Micro-batching**: rows are gathered until `batch.max_rows` or `batch.max_delay`
//!   (processing time, checked when a batch or a watermark arrives: the stage has no timer of
//!   its own) and always run before a watermark is forwarded, so no prediction is ever behind
//!   the watermark downstream. One model run never mixes rows of two event times, so a row's
//!   score does not depend on how the input was batched (see [`Infer::runs_of`]).
//! - **Outputs**: the `keep` columns, each model output mapped to named `Float32` columns, and
//!   `model` / `model_sha256` stamped on every row. Port `shadow` (when configured) carries the
//!   candidate model's predictions for the same rows, stamped with its own name and checksum.
//! - **Hot swap**: a watcher thread polls the model file; a changed file is loaded and checked
//!   in the background and the operator switches to it between two batches. A file that fails
//!   to load or check is rejected with a logged reason and the old model keeps serving.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration as StdDuration, Instant, SystemTime};

use arrow::array::{Array, ArrayRef, AsArray, FixedSizeListArray, Float32Array, RecordBatch, StringArray};
use arrow::buffer::ScalarBuffer;
use arrow::compute::concat_batches;
use arrow::datatypes::{DataType, Field, Float32Type, Schema, SchemaRef};
use citystream_operators::common::{as_f64, column};
use citystream_operators::{
    BuildContext, Collector, Counter, Duration, EnvString, Gauge, Metrics, Operator, OperatorConfig, OperatorError,
    OutputSpec, PlanError,
};
use serde::Deserialize;

use crate::onnx::{LoadOptions, Model, Provider};

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

fn d_max_rows() -> usize {
    1024
}
fn d_max_delay() -> Duration {
    "100ms".parse().expect("literal")
}
fn d_providers() -> Vec<Provider> {
    vec![Provider::Cpu]
}
fn d_threads() -> usize {
    1
}
fn d_poll() -> Duration {
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

fn d_calm_key() -> String {
    "segment_id".into()
}
fn d_calm_time() -> String {
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
    fn is_calm(&self, v: f32) -> bool {
        let v = f64::from(v);
        self.above.is_some_and(|a| v > a) || self.below.is_some_and(|b| v < b)
    }
}

fn calm_state_schema() -> SchemaRef {
    Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new("key", arrow::datatypes::DataType::Utf8, false),
        arrow::datatypes::Field::new("t", arrow::datatypes::DataType::Int64, false),
        arrow::datatypes::Field::new("calm", arrow::datatypes::DataType::Boolean, false),
    ]))
}

/// The calm keys of a stage.
struct Calm {
    cfg: CalmConfig,
    key: usize,
    time: usize,
    /// key -> (event time of its latest prediction, whether that prediction was calm)
    state: HashMap<String, (i64, bool)>,
    skipped: Counter,
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

struct Resolved {
    input: Vec<usize>,
    list: bool,
    width: usize,
    keep: Vec<usize>,
    schema: SchemaRef,
}

impl InferConfig {
    fn check(&self, input: &SchemaRef) -> Result<Resolved, Vec<PlanError>> {
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
        let keep = citystream_operators::common::columns(input, &self.keep, "keep", &mut errs);
        for (k, name) in self.keep.iter().enumerate() {
            if name == "model" || name == "model_sha256" || self.keep[..k].contains(name) {
                errs.push(PlanError::new(format!("keep[{k}]"), format!("column `{name}` appears twice in the output")));
            }
        }
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

    fn check_calm(&self, calm: &CalmConfig, input: &SchemaRef) -> Vec<PlanError> {
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

    fn load_options(&self, width: usize) -> LoadOptions {
        LoadOptions {
            providers: self.providers.clone(),
            intra_threads: self.intra_threads,
            input_width: width,
            outputs: self.outputs.iter().map(|(k, v)| (k.clone(), v.len())).collect(),
            library: self.library.as_ref().map(|l| PathBuf::from(l.as_str())),
        }
    }

    /// Live tuning: micro-batch limits may change; the model, its mapping and providers may not
    /// (replace the model file to swap it).
    pub fn live_change(&self, new: &InferConfig) -> Result<(), String> {
        let strip = |c: &InferConfig| InferConfig { batch: BatchConfig::default(), ..c.clone() };
        if strip(self) == strip(new) {
            Ok(())
        } else {
            Err("only `batch` can change while running; to swap the model, replace its file".into())
        }
    }
}

impl OperatorConfig for InferConfig {
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
            .map_err(|e| vec![PlanError::new(key, e)])
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
            shadow_errors: ctx.metrics.counter(
                "citystream_infer_shadow_errors_total",
                "Shadow model runs that failed.",
                &l,
            ),
            last_batch: ctx.metrics.gauge("citystream_infer_last_batch_rows", "Rows of the last micro-batch.", &l),
        }))
    }
}

/// A model that a background watcher may replace.
struct Slot {
    model: Model,
    next: Arc<Mutex<Option<Model>>>,
    swaps: Counter,
    info: Option<Gauge>,
    metrics: Metrics,
    stage: String,
    role: &'static str,
}

impl Slot {
    fn start(
        path: PathBuf,
        name: Option<String>,
        opts: LoadOptions,
        poll: StdDuration,
        metrics: &Metrics,
        stage: &str,
        role: &'static str,
    ) -> Result<Slot, String> {
        let stamp = file_stamp(&path);
        let model = Model::load(&path, name.as_deref(), &opts)?;
        tracing::info!(stage, role, model = %model.name, sha256 = %model.sha256, provider = model.provider.name(), "model loaded");
        let next = Arc::new(Mutex::new(None));
        let l = [("stage", stage), ("role", role)];
        let applied = metrics.counter("citystream_model_swaps_total", "Model files swapped in while running.", &l);
        let rejected = metrics.counter(
            "citystream_model_swaps_rejected_total",
            "Replacement model files rejected (the old model keeps serving).",
            &l,
        );
        if !poll.is_zero() {
            let weak = Arc::downgrade(&next);
            let stage = stage.to_owned();
            std::thread::Builder::new()
                .name(format!("model-watch-{stage}"))
                .spawn(move || watch(path, name, opts, poll, stamp, weak, rejected, stage, role))
                .map_err(|e| format!("starting the model file watcher: {e}"))?;
        }
        let mut s =
            Slot { model, next, swaps: applied, info: None, metrics: metrics.clone(), stage: stage.to_owned(), role };
        s.publish();
        Ok(s)
    }

    /// Points the `citystream_model_info` gauge at the serving model.
    fn publish(&mut self) {
        if let Some(old) = &self.info {
            old.set(0.0);
        }
        let g = self.metrics.gauge(
            "citystream_model_info",
            "1 for the model serving (name, checksum, provider).",
            &[
                ("stage", self.stage.as_str()),
                ("role", self.role),
                ("model", self.model.name.as_str()),
                ("sha256", self.model.sha256.as_str()),
                ("provider", self.model.provider.name()),
            ],
        );
        g.set(1.0);
        self.info = Some(g);
    }

    /// Switches to a model the watcher has loaded, if any.
    fn poll(&mut self) {
        let Some(new) = self.next.try_lock().ok().and_then(|mut g| g.take()) else { return };
        tracing::info!(stage = %self.stage, role = self.role, from = %self.model.sha256, to = %new.sha256, model = %new.name, "model swapped");
        self.model = new;
        self.swaps.inc();
        self.publish();
    }
}

/// What tells a replaced file: modification time, size and inode (a rename into place changes
/// the inode even when a copy kept the time and the size).
fn file_stamp(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len(), m.ino()))
}

#[allow(clippy::too_many_arguments)]
fn watch(
    path: PathBuf,
    name: Option<String>,
    opts: LoadOptions,
    poll: StdDuration,
    mut stamp: Option<(SystemTime, u64, u64)>,
    slot: Weak<Mutex<Option<Model>>>,
    rejected: Counter,
    stage: String,
    role: &'static str,
) {
    loop {
        // sleep in short steps so a dropped operator ends the thread soon
        let until = Instant::now() + poll;
        while Instant::now() < until {
            std::thread::sleep(poll.min(StdDuration::from_millis(100)));
            if slot.strong_count() == 0 {
                return;
            }
        }
        let now = file_stamp(&path);
        if now == stamp || now.is_none() {
            continue;
        }
        stamp = now;
        match Model::load(&path, name.as_deref(), &opts) {
            Ok(m) => {
                let Some(slot) = slot.upgrade() else { return };
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(m);
            }
            Err(e) => {
                rejected.inc();
                tracing::error!(stage = %stage, role, error = %e, "replacement model rejected; the current model keeps serving");
            }
        }
    }
}

/// The `infer` operator.
pub struct Infer {
    r: Resolved,
    outputs: Vec<OutputSpec>,
    live: Slot,
    shadow: Option<Slot>,
    carbon: Option<Slot>,
    /// Whether the stage follows the carbon policy at all.
    carbon_on: bool,
    calm: Option<Calm>,
    carbon_max_rows: Option<usize>,
    high_mode: bool,
    metrics: Metrics,
    stage: String,
    batch: BatchConfig,
    buffered: Vec<RecordBatch>,
    buffered_rows: usize,
    first_at: Option<Instant>,
    rows: Counter,
    runs: Counter,
    micros: Counter,
    shadow_errors: Counter,
    last_batch: Gauge,
}

impl std::fmt::Debug for Infer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Infer").field("model", &self.live.model).finish_non_exhaustive()
    }
}

fn ext(e: String) -> OperatorError {
    OperatorError::Arrow(arrow::error::ArrowError::ExternalError(e.into()))
}

/// Row-major features of `batch`: borrowed from the list column when its layout allows,
/// otherwise copied into `scratch`.
/// Which rows of `batch` have a null feature (`None`: none has).
fn null_features(r: &Resolved, batch: &RecordBatch) -> Option<arrow::array::BooleanArray> {
    let cols: Vec<&ArrayRef> = r.input.iter().map(|&c| batch.column(c)).collect();
    let list_values_null = r.list && {
        let list = batch.column(r.input[0]).as_fixed_size_list();
        list.values().null_count() > 0
    };
    if cols.iter().all(|c| c.null_count() == 0) && !list_values_null {
        return None;
    }
    let mask: arrow::array::BooleanArray = (0..batch.num_rows())
        .map(|i| {
            let null = if r.list {
                let list = batch.column(r.input[0]).as_fixed_size_list();
                list.is_null(i) || list.value(i).null_count() > 0
            } else {
                cols.iter().any(|c| c.is_null(i))
            };
            Some(null)
        })
        .collect();
    (mask.true_count() > 0).then_some(mask)
}

fn features<'a>(r: &Resolved, batch: &'a RecordBatch, scratch: &'a mut Vec<f32>) -> Result<&'a [f32], OperatorError> {
    let n = batch.num_rows();
    if r.list {
        let list: &FixedSizeListArray = batch.column(r.input[0]).as_fixed_size_list();
        if list.null_count() > 0 {
            return Err(ext("a feature row is null".into()));
        }
        let values = list.values().as_primitive::<Float32Type>();
        if values.null_count() > 0 {
            return Err(ext("a feature value is null".into()));
        }
        // arrow slices a FixedSizeList's values with it (offset() is 0); kept general
        let start = list.offset() * r.width;
        return Ok(&values.values()[start..start + n * r.width]);
    }
    scratch.clear();
    scratch.resize(n * r.width, 0.0);
    for (j, &c) in r.input.iter().enumerate() {
        let (v, nulls) = as_f64(batch.column(c))?;
        if nulls.is_some_and(|b| b.null_count() > 0) {
            return Err(ext(format!("feature column `{}` has nulls", batch.schema().field(c).name())));
        }
        for (i, x) in v.into_iter().enumerate() {
            scratch[i * r.width + j] = x as f32;
        }
    }
    Ok(scratch)
}

impl Calm {
    /// The rows to run in the high mode: all rows of keys at risk (or unseen), and a calm
    /// key's rows once per `every` after its latest prediction.
    fn thin(&self, batch: &RecordBatch) -> Result<RecordBatch, OperatorError> {
        let keys = batch.column(self.key).as_string::<i32>();
        let times = batch.column(self.time).as_primitive::<arrow::datatypes::TimestampMillisecondType>();
        let every = self.cfg.every.as_millis_i64();
        // rows kept in this batch move a calm key's clock too
        let mut last: HashMap<&str, i64> = HashMap::new();
        let keep: arrow::array::BooleanArray = (0..batch.num_rows())
            .map(|i| {
                if keys.is_null(i) || times.is_null(i) {
                    return Some(true);
                }
                let (k, t) = (keys.value(i), times.value(i));
                let Some(&(seen, calm)) = self.state.get(k) else { return Some(true) };
                let prev = last.get(k).copied().unwrap_or(seen);
                let run = !calm || t.saturating_sub(prev) >= every;
                if run && calm {
                    last.insert(k, t);
                }
                Some(run)
            })
            .collect();
        let skipped = keep.false_count();
        self.skipped.inc_by(skipped as u64);
        if skipped == 0 {
            return Ok(batch.clone());
        }
        Ok(arrow::compute::filter_record_batch(batch, &keep)?)
    }

    /// Records each key's latest prediction and whether it was calm.
    fn observe(&mut self, input: &RecordBatch, output: &RecordBatch) {
        let Some(col) = output.column_by_name(&self.cfg.column) else { return };
        let values = col.as_primitive::<Float32Type>();
        let keys = input.column(self.key).as_string::<i32>();
        let times = input.column(self.time).as_primitive::<arrow::datatypes::TimestampMillisecondType>();
        for i in 0..input.num_rows() {
            if keys.is_null(i) || times.is_null(i) {
                continue;
            }
            let calm = !values.value(i).is_nan() && self.cfg.is_calm(values.value(i));
            let e = self.state.entry(keys.value(i).to_owned()).or_insert((i64::MIN, calm));
            if times.value(i) >= e.0 {
                *e = (times.value(i), calm);
            }
        }
    }
}

impl Infer {
    fn stamp(
        schema: &SchemaRef,
        batch: &RecordBatch,
        keep: &[usize],
        model: &Model,
        outs: Vec<Vec<f32>>,
        widths: &[usize],
    ) -> Result<RecordBatch, OperatorError> {
        let n = batch.num_rows();
        let mut cols: Vec<ArrayRef> = keep.iter().map(|&i| batch.column(i).clone()).collect();
        for (values, &w) in outs.into_iter().zip(widths) {
            if w == 1 {
                cols.push(Arc::new(Float32Array::new(ScalarBuffer::from(values), None)));
            } else {
                for k in 0..w {
                    cols.push(Arc::new(Float32Array::from_iter_values((0..n).map(|i| values[i * w + k]))));
                }
            }
        }
        cols.push(Arc::new(StringArray::from_iter_values(std::iter::repeat_n(model.name.as_str(), n))));
        cols.push(Arc::new(StringArray::from_iter_values(std::iter::repeat_n(model.sha256.as_str(), n))));
        Ok(RecordBatch::try_new(schema.clone(), cols)?)
    }

    /// Whether the carbon policy reports a high-carbon grid (logged and counted on change).
    fn check_carbon(&mut self) -> bool {
        if !self.carbon_on {
            return false;
        }
        let high = self.metrics.value("citystream_carbon_high_mode", &[]) == Some(1.0);
        if high != self.high_mode {
            self.high_mode = high;
            let to = match (&self.carbon, high) {
                (Some(c), true) => c.model.name.clone(),
                _ => self.live.model.name.clone(),
            };
            let thin = self.calm.as_ref().filter(|_| high).map(|c| c.cfg.every.to_string());
            tracing::info!(stage = %self.stage, model = %to, high, calm_every = ?thin, max_rows = self.max_rows(), "carbon policy: {} mode", if high { "high-carbon" } else { "normal" });
            let action = match (self.carbon.is_some(), high) {
                (true, true) => "low_carbon_model",
                (true, false) => "full_model",
                (false, true) => "high_carbon_mode",
                (false, false) => "normal_mode",
            };
            self.metrics
                .counter(
                    "citystream_policy_actions_total",
                    "Actions of the carbon-aware policy.",
                    &[("policy", "model"), ("action", action)],
                )
                .inc();
        }
        high
    }

    fn max_rows(&self) -> usize {
        if self.high_mode { self.carbon_max_rows.unwrap_or(self.batch.max_rows) } else { self.batch.max_rows }
    }

    /// The model runs of a micro-batch, as (first row, rows): at most `max_rows` each, and never
    /// rows of two event times (the input's first timestamp column) in one run. A model whose
    /// results depend on the batch (int8 with dynamic quantization takes its scale from the
    /// batch's values) then scores a row the same whether the rows arrived live, minute by
    /// minute, or as a backlog of many minutes at once.
    fn runs_of(&self, all: &RecordBatch) -> Vec<(usize, usize)> {
        let max_rows = self.max_rows().max(1);
        let n = all.num_rows();
        let times = all
            .columns()
            .iter()
            .find(|c| matches!(c.data_type(), DataType::Timestamp(..)))
            .and_then(|c| c.as_primitive_opt::<arrow::datatypes::TimestampMillisecondType>());
        let mut runs = Vec::new();
        let mut start = 0;
        while start < n {
            let mut end = (start + max_rows).min(n);
            if let Some(t) = times {
                let first = t.is_valid(start).then(|| t.value(start));
                end = (start + 1..end).find(|&i| (t.is_valid(i).then(|| t.value(i))) != first).unwrap_or(end);
            }
            runs.push((start, end - start));
            start = end;
        }
        runs
    }

    fn flush(&mut self, out: &mut Collector) -> Result<(), OperatorError> {
        self.live.poll();
        if let Some(s) = &mut self.shadow {
            s.poll();
        }
        if let Some(s) = &mut self.carbon {
            s.poll();
        }
        let high = self.check_carbon();
        if self.buffered.is_empty() {
            return Ok(());
        }
        let input = self.buffered[0].schema();
        let mut all = concat_batches(&input, &std::mem::take(&mut self.buffered))?;
        self.buffered_rows = 0;
        self.first_at = None;
        if high && let Some(calm) = &self.calm {
            all = calm.thin(&all)?;
            if all.num_rows() == 0 {
                return Ok(());
            }
        }
        let widths: Vec<usize> = self.live.model.output_widths();
        for (start, len) in self.runs_of(&all) {
            let chunk = all.slice(start, len);
            let mut scratch = Vec::new();
            let t0 = Instant::now();
            let feats = features(&self.r, &chunk, &mut scratch)?;
            let model = match (&mut self.carbon, high) {
                (Some(c), true) => &mut c.model,
                _ => &mut self.live.model,
            };
            let outs = model.run(feats, len).map_err(ext)?;
            self.micros.inc_by(t0.elapsed().as_micros() as u64);
            self.rows.inc_by(len as u64);
            self.runs.inc();
            self.last_batch.set(len as f64);
            let stamped = Self::stamp(&self.outputs[0].schema, &chunk, &self.r.keep, model, outs, &widths)?;
            if let Some(calm) = &mut self.calm {
                calm.observe(&chunk, &stamped);
            }
            out.emit(0, stamped);
            if let Some(s) = &mut self.shadow {
                match s.model.run(feats, len) {
                    Ok(o) => {
                        out.emit(1, Self::stamp(&self.outputs[1].schema, &chunk, &self.r.keep, &s.model, o, &widths)?)
                    }
                    Err(e) => {
                        self.shadow_errors.inc();
                        tracing::warn!(error = %e, "shadow model run failed");
                    }
                }
            }
        }
        Ok(())
    }
}

impl Operator for Infer {
    fn kind(&self) -> &'static str {
        "infer"
    }

    fn outputs(&self) -> &[OutputSpec] {
        &self.outputs
    }

    fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<(), OperatorError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        // a row with a null feature cannot be scored: refused (recorded by the runtime), the
        // others go on
        let nulls = null_features(&self.r, &batch);
        let (batch, refused) = match nulls {
            Some(mask) => {
                let refused = arrow::compute::filter_record_batch(&batch, &mask)?;
                (arrow::compute::filter_record_batch(&batch, &arrow::compute::not(&mask)?)?, Some(refused))
            }
            None => (batch, None),
        };
        if batch.num_rows() > 0 {
            self.buffered_rows += batch.num_rows();
            self.buffered.push(batch);
            let first = *self.first_at.get_or_insert_with(Instant::now);
            if self.buffered_rows >= self.max_rows() || first.elapsed() >= self.batch.max_delay.to_std() {
                self.flush(out)?;
            }
        }
        match refused {
            Some(rows) => Err(OperatorError::Rejected { operator: "infer", detail: "a feature is null".into(), rows }),
            None => Ok(()),
        }
    }

    fn on_watermark(&mut self, _watermark: i64, out: &mut Collector) -> Result<(), OperatorError> {
        self.flush(out)
    }

    fn on_end(&mut self, out: &mut Collector) -> Result<(), OperatorError> {
        self.flush(out)
    }

    /// The micro-batch is work in progress, not state: it runs before the barrier passes.
    fn on_checkpoint(&mut self, out: &mut Collector) -> Result<(), OperatorError> {
        self.flush(out)
    }

    /// With `carbon.calm`, each key's latest prediction time and calmness is state.
    fn is_stateful(&self) -> bool {
        self.calm.is_some()
    }

    fn snapshot(&self) -> Result<Option<RecordBatch>, OperatorError> {
        let Some(calm) = &self.calm else { return Ok(None) };
        let mut keys: Vec<(&String, &(i64, bool))> = calm.state.iter().collect();
        keys.sort_unstable();
        Ok(Some(RecordBatch::try_new(
            calm_state_schema(),
            vec![
                Arc::new(arrow::array::StringArray::from_iter_values(keys.iter().map(|k| k.0.as_str()))),
                Arc::new(arrow::array::Int64Array::from_iter_values(keys.iter().map(|k| k.1.0))),
                Arc::new(arrow::array::BooleanArray::from(keys.iter().map(|k| k.1.1).collect::<Vec<_>>())),
            ],
        )?))
    }

    fn restore(&mut self, state: RecordBatch) -> Result<(), OperatorError> {
        let Some(calm) = &mut self.calm else {
            return Err(OperatorError::State { operator: "infer", detail: "this stage has no `carbon.calm`".into() });
        };
        citystream_operators::common::check_state_schema("infer", &state, &calm_state_schema())?;
        let keys = state.column(0).as_string::<i32>();
        let t = state.column(1).as_primitive::<arrow::datatypes::Int64Type>();
        let c = state.column(2).as_boolean();
        calm.state = (0..state.num_rows()).map(|i| (keys.value(i).to_owned(), (t.value(i), c.value(i)))).collect();
        Ok(())
    }

    fn retune(&mut self, config: &dyn std::any::Any) -> Result<(), String> {
        let c = config.downcast_ref::<InferConfig>().ok_or("not an infer config")?;
        self.batch = c.batch.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolved(width: usize) -> Resolved {
        Resolved { input: vec![0], list: true, width, keep: vec![], schema: Arc::new(Schema::empty()) }
    }

    #[test]
    fn list_features_are_borrowed_from_the_arrow_buffer_even_when_sliced() {
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        let values: Vec<f32> = (0..40).map(|v| v as f32).collect();
        let list = FixedSizeListArray::try_new(
            item.clone(),
            4,
            Arc::new(Float32Array::new(ScalarBuffer::from(values), None)),
            None,
        )
        .unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("f", DataType::FixedSizeList(item, 4), false)]));
        let batch = RecordBatch::try_new(schema, vec![Arc::new(list)]).unwrap();
        let base = batch.column(0).as_fixed_size_list().values().as_primitive::<Float32Type>().values().as_ptr();
        let sliced = batch.slice(3, 5);
        let mut scratch = Vec::new();
        let f = features(&resolved(4), &sliced, &mut scratch).unwrap();
        assert_eq!(f.len(), 20);
        assert_eq!(f[0], 12.0, "row 3 starts at value 12");
        assert_eq!(f.as_ptr(), base.wrapping_add(12), "no copy: the slice points into the Arrow buffer");
        assert!(scratch.is_empty());
    }
}
