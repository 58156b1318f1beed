//! YAML of a `window` stage and its planning.

use crate::LiveChangeError;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use serde::Deserialize;

use crate::common::{KeyEncoder, columns, numeric_column, time_column};

use crate::{BuildContext, Duration, Operator, OperatorConfig, OutputSpec, PlanError};

use super::operator::Window;

/// An aggregate function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AggFn {
    /// Rows (or non-null values of `column`).
    Count,
    /// Sum of `column`.
    Sum,
    /// Arithmetic mean of `column`.
    Mean,
    /// Minimum of `column`.
    Min,
    /// Maximum of `column`.
    Max,
    /// The `q` quantile of `column` (exact).
    Quantile,
    /// Mean of `column` weighted by `weight`.
    WeightedMean,
    /// Sum of `column` per hour of window.
    RatePerHour,
    /// Values of `column` strictly above `above`.
    CountAbove,
}

/// One aggregate in YAML: `{fn: quantile, column: speed_kmh, q: 0.85, as: p85_speed_kmh}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateConfig {
    /// The function.
    #[serde(rename = "fn")]
    pub func: AggFn,
    /// The input column (optional for `count`).
    #[serde(default)]
    pub column: Option<String>,
    /// The output column name. Default `{fn}_{column}` (or `count`).
    #[serde(default, rename = "as")]
    pub name: Option<String>,
    /// For `quantile`: the quantile in 0..=1.
    #[serde(default)]
    pub q: Option<f64>,
    /// For `weighted_mean`: the weight column.
    #[serde(default)]
    pub weight: Option<String>,
    /// For `count_above`: the threshold.
    #[serde(default)]
    pub above: Option<f64>,
}

impl AggregateConfig {
    pub(super) fn output_name(&self) -> String {
        let f = serde_name(self.func);
        match (&self.name, &self.column) {
            (Some(n), _) => n.clone(),
            (None, Some(c)) => format!("{f}_{c}"),
            (None, None) => f.to_owned(),
        }
    }
}

pub(super) fn serde_name(f: AggFn) -> &'static str {
    match f {
        AggFn::Count => "count",
        AggFn::Sum => "sum",
        AggFn::Mean => "mean",
        AggFn::Min => "min",
        AggFn::Max => "max",
        AggFn::Quantile => "quantile",
        AggFn::WeightedMean => "weighted_mean",
        AggFn::RatePerHour => "rate_per_hour",
        AggFn::CountAbove => "count_above",
    }
}

pub(super) fn d_time() -> String {
    "ts".into()
}

/// YAML of a `window` stage.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    /// Key columns (e.g. `[segment_id]`); empty for one city-wide series.
    #[serde(default)]
    pub key: Vec<String>,
    /// Window length.
    pub size: Duration,
    /// Hop between window starts, for sliding windows (must divide `size`). Default: `size`
    /// (tumbling).
    #[serde(default)]
    pub slide: Option<Duration>,
    /// How long after a window's end rows are still accepted (it is emitted then). Live-tunable.
    #[serde(default)]
    pub allowed_lateness: Duration,
    /// The event-time column. Default `ts`.
    #[serde(default = "d_time")]
    pub time_column: String,
    /// The aggregates, in output order.
    pub aggregates: Vec<AggregateConfig>,
}

#[derive(Debug, Clone)]
pub(super) struct Plan {
    pub(super) time: usize,
    pub(super) keys: Vec<usize>,
    /// Per aggregate: (function, value column, weight column, q or threshold).
    pub(super) aggs: Vec<(AggFn, Option<usize>, Option<usize>, f64)>,
    pub(super) outputs: Vec<OutputSpec>,
}

impl WindowConfig {
    pub(super) fn check(&self, input: &SchemaRef) -> Result<Plan, Vec<PlanError>> {
        let mut errs = Vec::new();
        let time = time_column(input, &self.time_column, "time_column").map_err(|e| errs.push(e)).ok();
        if self.size.as_millis() == 0 {
            errs.push(PlanError::new("size", "a window needs a positive size"));
        }
        if let Some(s) = self.slide
            && (s.as_millis() == 0 || !self.size.as_millis().is_multiple_of(s.as_millis()))
        {
            errs.push(
                PlanError::new("slide", format!("slide {s} must be positive and divide the window size {}", self.size))
                    .with_help("e.g. size: 15m with slide: 5m"),
            );
        }
        let keys = columns(input, &self.key, "key", &mut errs);
        if self.aggregates.is_empty() {
            errs.push(PlanError::new("aggregates", "a window needs at least one aggregate"));
        }
        let mut fields = vec![
            Field::new("window_start", citystream_schemas::timestamp_type(), false),
            Field::new("window_end", citystream_schemas::timestamp_type(), false),
        ];
        for &k in &keys {
            fields.push(input.field(k).as_ref().clone());
        }
        let mut aggs = Vec::new();
        let mut names: Vec<String> = fields.iter().map(|f| f.name().clone()).collect();
        for (i, a) in self.aggregates.iter().enumerate() {
            let key = |k: &str| format!("aggregates[{i}].{k}");
            let col = match (&a.column, a.func) {
                (None, AggFn::Count) => None,
                (None, _) => {
                    errs.push(PlanError::new(key("column"), format!("`{}` needs a `column`", serde_name(a.func))));
                    None
                }
                (Some(c), _) => numeric_column(input, c, &key("column")).map_err(|e| errs.push(e)).ok(),
            };
            let weight = match (&a.weight, a.func) {
                (Some(w), AggFn::WeightedMean) => {
                    numeric_column(input, w, &key("weight")).map_err(|e| errs.push(e)).ok()
                }
                (None, AggFn::WeightedMean) => {
                    errs.push(PlanError::new(key("weight"), "`weighted_mean` needs a `weight` column"));
                    None
                }
                (Some(_), _) => {
                    errs.push(PlanError::new(key("weight"), "only `weighted_mean` takes a `weight`"));
                    None
                }
                (None, _) => None,
            };
            let param = match a.func {
                AggFn::Quantile => match a.q {
                    Some(q) if (0.0..=1.0).contains(&q) => q,
                    Some(q) => {
                        errs.push(PlanError::new(key("q"), format!("quantile {q} is outside 0..=1")));
                        0.0
                    }
                    None => {
                        errs.push(PlanError::new(key("q"), "`quantile` needs `q` (e.g. 0.85)"));
                        0.0
                    }
                },
                AggFn::CountAbove => a.above.unwrap_or_else(|| {
                    errs.push(PlanError::new(key("above"), "`count_above` needs `above` (the threshold)"));
                    0.0
                }),
                _ => 0.0,
            };
            if a.q.is_some() && a.func != AggFn::Quantile {
                errs.push(PlanError::new(key("q"), "only `quantile` takes `q`"));
            }
            if a.above.is_some() && a.func != AggFn::CountAbove {
                errs.push(PlanError::new(key("above"), "only `count_above` takes `above`"));
            }
            let name = a.output_name();
            if names.contains(&name) {
                errs.push(
                    PlanError::new(key("as"), format!("output column `{name}` appears twice"))
                        .with_help("give each aggregate its own name with `as`"),
                );
            }
            names.push(name.clone());
            let dt = match a.func {
                AggFn::Count | AggFn::CountAbove => DataType::Int64,
                _ => DataType::Float64,
            };
            let nullable = !matches!(a.func, AggFn::Count | AggFn::CountAbove);
            fields.push(Field::new(name, dt, nullable));
            aggs.push((a.func, col, weight, param));
        }
        let (Some(time), true) = (time, errs.is_empty()) else { return Err(errs) };
        let outputs =
            vec![OutputSpec::new("main", Arc::new(Schema::new(fields))), OutputSpec::new("late_events", input.clone())];
        Ok(Plan { time, keys, aggs, outputs })
    }
}

impl WindowConfig {
    /// Whether the pipeline may switch from `self` to `new` without a restart: only
    /// `allowed_lateness` can change live.
    pub fn live_change(&self, new: &Self) -> Result<(), LiveChangeError> {
        let mut masked = new.clone();
        masked.allowed_lateness = self.allowed_lateness;
        if &masked == self {
            Ok(())
        } else {
            Err(LiveChangeError::NeedsRestart(
                "only `allowed_lateness` of a window can change live; key, size, slide, time column and \
                 aggregates shape its state and need a restart",
            ))
        }
    }
}

impl OperatorConfig for WindowConfig {
    fn state_scopes(&self, _input: &SchemaRef) -> Vec<crate::partitioning::StateScope> {
        vec![crate::partitioning::StateScope::Keys(self.key.clone())]
    }

    fn passes_through(&self, input: &SchemaRef, port: usize) -> Vec<String> {
        match port {
            0 => self.key.clone(),
            _ => crate::partitioning::unchanged_columns(self.plan(input), input, port),
        }
    }

    fn plan(&self, input: &SchemaRef) -> Result<Vec<OutputSpec>, Vec<PlanError>> {
        self.check(input).map(|p| p.outputs)
    }

    fn build(&self, input: &SchemaRef, ctx: &BuildContext) -> Result<Box<dyn Operator>, Vec<PlanError>> {
        let plan = self.check(input)?;
        let keys = KeyEncoder::new(input, plan.keys.clone()).map_err(|e| vec![PlanError::new("key", e.to_string())])?;
        let l = [("stage", ctx.stage.as_str())];
        Ok(Box::new(Window {
            size: self.size.as_millis_i64(),
            slide: self.slide.unwrap_or(self.size).as_millis_i64(),
            lateness: self.allowed_lateness.as_millis_i64(),
            keys,
            group_of: HashMap::new(),
            group_keys: Vec::new(),
            windows: BTreeMap::new(),
            watermark: i64::MIN,
            late: ctx.metrics.counter(
                "citystream_window_late_rows_total",
                "Rows that arrived after their windows closed.",
                &l,
            ),
            emitted: ctx.metrics.counter("citystream_window_rows_emitted_total", "Window rows emitted.", &l),
            open: ctx.metrics.gauge("citystream_window_open_windows", "Windows held open.", &l),
            state_bytes: ctx.metrics.gauge("citystream_window_state_bytes", "Bytes of window state held.", &l),
            plan,
        }))
    }
}
