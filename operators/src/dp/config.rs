//! YAML of a `dp_aggregate` stage and its planning (bounds, grid, budget, partitions).

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use rand::SeedableRng;
use rand::rngs::StdRng;

use serde::Deserialize;

use super::accountant::Accountant;
use crate::common::{column, numeric_column, time_column};
use crate::{BuildContext, Duration, EnvString, Operator, OperatorConfig, OutputSpec, PlanError};

use super::operator::DpAggregateOp;

/// Set to `1` to allow `insecure_seed` (tests only).
pub const INSECURE_SEED_ENV: &str = "CITYSTREAM_ALLOW_INSECURE_DP_SEED";

/// The aggregate released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpAggregate {
    /// Rows per partition.
    Count,
    /// Sum of `column` per partition.
    Sum,
    /// Mean of `column` per partition.
    Mean,
}

/// The noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mechanism {
    /// Discrete Laplace, ε-DP.
    Laplace,
    /// Discrete Gaussian, ρ-zCDP.
    Gaussian,
}

/// Which partitions are released.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partitions {
    /// Every one of these, every window (e.g. the road registry's segments).
    #[serde(default)]
    pub public: Option<Vec<String>>,
    /// Partitions from the data, released only above the private threshold (counts, Laplace).
    #[serde(default)]
    pub private: bool,
}

/// The budget of a release stream per period, per privacy unit.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Total ε per period.
    pub epsilon: f64,
    /// δ of the period's guarantee. Default 1e-6.
    #[serde(default = "d_delta")]
    pub delta: f64,
    /// The period. Default `1d`.
    #[serde(default = "d_period")]
    pub period: Duration,
}

pub(super) fn d_delta() -> f64 {
    1e-6
}
pub(super) fn d_period() -> Duration {
    Duration::from_secs(86_400)
}
pub(super) fn d_time() -> String {
    "ts".into()
}
pub(super) fn d_one() -> usize {
    1
}

/// YAML of a `dp_aggregate` stage.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpConfig {
    /// Name of the release stream (its budget file is `{budget_dir}/{release}.json`).
    pub release: String,
    /// The privacy unit column (a pseudonym, a device id, or `event_id` for event-level DP).
    pub privacy_unit: String,
    /// The partition column (e.g. `segment_id`).
    pub partition: String,
    /// What is released.
    pub aggregate: DpAggregate,
    /// The value column for `sum` and `mean`.
    #[serde(default)]
    pub column: Option<String>,
    /// Clamp values to `[lo, hi]` (`sum`, `mean`).
    #[serde(default)]
    pub bounds: Option<[f64; 2]>,
    /// Grid step of values (`sum`, `mean`). Default: (hi - lo) / 1000.
    #[serde(default)]
    pub granularity: Option<f64>,
    /// Window length.
    pub window: Duration,
    /// L0: partitions per unit per window. Default 1.
    #[serde(default = "d_one")]
    pub max_partitions: usize,
    /// L∞: rows per unit per partition per window. Default 1.
    #[serde(default = "d_one")]
    pub max_contributions: usize,
    /// The noise.
    pub mechanism: Mechanism,
    /// ε of each window's release.
    pub epsilon: f64,
    /// δ of each window's release (Gaussian noise, private partitions). Default 1e-6.
    #[serde(default = "d_delta")]
    pub delta: f64,
    /// The budget per period.
    pub budget: Budget,
    /// Where spent budgets are kept.
    pub budget_dir: EnvString,
    /// Which partitions are released.
    pub partitions: Partitions,
    /// The event-time column. Default `ts`.
    #[serde(default = "d_time")]
    pub time_column: String,
    /// A fixed noise seed — for tests only (refused unless `CITYSTREAM_ALLOW_INSECURE_DP_SEED=1`);
    /// absent, noise comes from the OS's secure source.
    #[serde(default)]
    pub insecure_seed: Option<u64>,
    /// Carbon-aware releases: while the carbon policy is in its high mode
    /// (`runtime.carbon_policy`), closed windows are held — with the rest of the stage's
    /// state, in checkpoints — and released together once the grid is clean again, or once a
    /// window ended `max_delay` before the watermark. Absent: every window is released as soon
    /// as the watermark closes it.
    #[serde(default)]
    pub defer: Option<DeferConfig>,
    /// The key that makes each window's noise a function of its rows (see the module docs);
    /// absent: fresh randomness per release, so a replay releases other values and is charged
    /// again.
    #[serde(default)]
    pub noise_key: Option<crate::secret::SecretConfig>,
}

/// `dp_aggregate.defer`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeferConfig {
    /// The longest a closed window is held, in event time behind the watermark.
    pub max_delay: Duration,
}

/// The metrics gauge the carbon policy sets to 1 in its high mode.
pub const CARBON_HIGH_MODE_GAUGE: &str = "citystream_carbon_high_mode";

pub(super) struct Planned {
    pub(super) time: usize,
    pub(super) unit: usize,
    pub(super) partition: usize,
    pub(super) value: Option<usize>,
    pub(super) outputs: Vec<OutputSpec>,
}

impl DpConfig {
    pub(super) fn check(&self, input: &SchemaRef) -> Result<Planned, Vec<PlanError>> {
        let mut errs = Vec::new();
        let mut col = |name: &str, key: &str| column(input, name, key).map_err(|e| errs.push(e)).ok();
        let unit = col(&self.privacy_unit, "privacy_unit");
        let partition = col(&self.partition, "partition");
        let time = time_column(input, &self.time_column, "time_column").map_err(|e| errs.push(e)).ok();
        let value = match (self.aggregate, &self.column) {
            (DpAggregate::Count, None) => None,
            (DpAggregate::Count, Some(_)) => {
                errs.push(PlanError::new("column", "a count takes no `column`"));
                None
            }
            (_, None) => {
                errs.push(PlanError::new("column", "`sum` and `mean` need a `column`"));
                None
            }
            (_, Some(c)) => numeric_column(input, c, "column").map_err(|e| errs.push(e)).ok(),
        };
        if self.aggregate != DpAggregate::Count {
            match self.bounds {
                Some([lo, hi]) if lo.is_finite() && hi.is_finite() && lo < hi => {}
                _ => errs.push(
                    PlanError::new("bounds", "`sum` and `mean` need finite `bounds: [lo, hi]` with lo < hi")
                        .with_help("values are clamped to the bounds; the noise scales with them"),
                ),
            }
        }
        if let Some(p) = partition
            && input.field(p).data_type() != &DataType::Utf8
        {
            errs.push(PlanError::new("partition", "the partition column must be text"));
        }
        if !(self.epsilon > 0.0 && self.epsilon.is_finite()) {
            errs.push(PlanError::new("epsilon", "ε must be positive"));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) && (self.mechanism == Mechanism::Gaussian || self.partitions.private)
        {
            errs.push(PlanError::new("delta", "δ must be in (0, 1)"));
        }
        if self.epsilon > self.budget.epsilon {
            errs.push(PlanError::new(
                "budget.epsilon",
                format!("one release (ε = {}) exceeds the period's budget", self.epsilon),
            ));
        }
        if self.max_partitions == 0 || self.max_contributions == 0 {
            errs.push(PlanError::new("max_partitions", "contribution bounds must be at least 1"));
        }
        if self.window.as_millis() == 0 {
            errs.push(PlanError::new("window", "the window must be positive"));
        }
        match (&self.partitions.public, self.partitions.private) {
            (Some(_), true) | (None, false) => errs.push(
                PlanError::new("partitions", "give either `public: [...]` or `private: true`")
                    .with_help("public partitions (a registry) are released every window; private ones only above a noisy threshold"),
            ),
            (None, true) if self.aggregate != DpAggregate::Count || self.mechanism != Mechanism::Laplace => errs.push(
                PlanError::new("partitions.private", "private partition selection is implemented for Laplace counts only")
                    .with_help("use public partitions for sums, means and Gaussian noise"),
            ),
            _ => {}
        }
        if let Some(k) = &self.noise_key {
            if self.insecure_seed.is_some() {
                errs.push(PlanError::new("noise_key", "give `noise_key` or `insecure_seed`, not both"));
            } else if !k.to_be_created()
                && let Err(e) = k.load("noise_key")
            {
                errs.push(e);
            }
        }
        if self.insecure_seed.is_some() && std::env::var(INSECURE_SEED_ENV).as_deref() != Ok("1") {
            errs.push(
                PlanError::new("insecure_seed", "a fixed noise seed makes the noise predictable and is for tests only")
                    .with_help(format!("remove it; tests set {INSECURE_SEED_ENV}=1 to allow it")),
            );
        }
        let (Some(time), Some(unit), Some(partition), true) = (time, unit, partition, errs.is_empty()) else {
            return Err(errs);
        };
        let fields = vec![
            Field::new("window_start", citystream_schemas::timestamp_type(), false),
            Field::new("window_end", citystream_schemas::timestamp_type(), false),
            Field::new(&self.partition, DataType::Utf8, false),
            Field::new("value", DataType::Float64, false),
            Field::new("aggregate", DataType::Utf8, false),
            Field::new("mechanism", DataType::Utf8, false),
            Field::new("epsilon", DataType::Float64, false),
            Field::new("delta", DataType::Float64, false),
            Field::new("noise_scale", DataType::Float64, false),
            Field::new("error_bound_95", DataType::Float64, false),
        ];
        Ok(Planned {
            time,
            unit,
            partition,
            value,
            outputs: vec![
                OutputSpec::new("main", Arc::new(Schema::new(fields))),
                OutputSpec::new("late_events", input.clone()),
            ],
        })
    }

    pub(super) fn granularity(&self) -> f64 {
        let [lo, hi] = self.bounds.unwrap_or([0.0, 1.0]);
        self.granularity.unwrap_or((hi - lo) / 1000.0).max(f64::MIN_POSITIVE)
    }
}

impl OperatorConfig for DpConfig {
    fn state_scopes(&self, _input: &SchemaRef) -> Vec<crate::partitioning::StateScope> {
        let mut s = vec![
            crate::partitioning::StateScope::Keys(vec![self.partition.clone()]),
            // a unit's contributions are bounded over all its rows: several instances would
            // each allow the bound, and spend the budget, for one unit
            crate::partitioning::StateScope::Keys(vec![self.privacy_unit.clone()]),
        ];
        if self.partitions.public.is_some() {
            s.push(crate::partitioning::StateScope::City(
                "`partitions.public` releases every listed partition, also those whose rows another instance reads"
                    .into(),
            ));
        }
        s
    }

    fn passes_through(&self, input: &SchemaRef, port: usize) -> Vec<String> {
        match port {
            0 => vec![self.partition.clone()],
            _ => crate::partitioning::unchanged_columns(self.plan(input), input, port),
        }
    }

    fn plan(&self, input: &SchemaRef) -> Result<Vec<OutputSpec>, Vec<PlanError>> {
        self.check(input).map(|p| p.outputs)
    }

    fn build(&self, input: &SchemaRef, ctx: &BuildContext) -> Result<Box<dyn Operator>, Vec<PlanError>> {
        let planned = self.check(input)?;
        let path = std::path::Path::new(self.budget_dir.as_str()).join(format!("{}.json", self.release));
        let accountant =
            Accountant::open(&path, self.budget.epsilon, self.budget.delta, self.budget.period.as_millis_i64())
                .map_err(|e| vec![PlanError::new("budget_dir", e.to_string())])?;
        let rng = match self.insecure_seed {
            Some(s) => {
                tracing_free_warn(&format!(
                    "dp_aggregate `{}` uses a fixed noise seed: its noise is predictable",
                    self.release
                ));
                StdRng::seed_from_u64(s)
            }
            None => StdRng::from_os_rng(),
        };
        let noise_key = self.noise_key.as_ref().map(|k| k.load("noise_key")).transpose().map_err(|e| vec![e])?;
        let l = [("stage", ctx.stage.as_str()), ("release", self.release.as_str())];
        let m = &ctx.metrics;
        Ok(Box::new(DpAggregateOp {
            cfg: self.clone(),
            planned,
            accountant,
            rng,
            noise_key,
            windows: BTreeMap::new(),
            watermark: i64::MIN,
            released: m.counter("citystream_dp_releases_total", "Window releases made.", &l),
            refused: m.counter("citystream_dp_releases_refused_total", "Window releases refused: budget spent.", &l),
            bounded_out: m.counter(
                "citystream_dp_rows_bounded_out_total",
                "Rows removed by contribution bounding.",
                &l,
            ),
            unlisted: m.counter(
                "citystream_dp_rows_unlisted_partition_total",
                "Rows of partitions not in the public list.",
                &l,
            ),
            late: m.counter("citystream_dp_late_rows_total", "Rows after their window was released.", &l),
            spent: m.gauge("citystream_dp_epsilon_spent", "ε spent in the current period.", &l),
            held: m.gauge("citystream_dp_windows_held", "Closed windows held for a low-carbon hour.", &l),
            deferred: m.counter(
                "citystream_policy_actions_total",
                "Actions of the carbon-aware policy.",
                &[("policy", "dp_release"), ("action", "deferred")],
            ),
            released_late: m.counter(
                "citystream_policy_actions_total",
                "Actions of the carbon-aware policy.",
                &[("policy", "dp_release"), ("action", "released")],
            ),
            metrics: m.clone(),
            holding: false,
            deferred_upto: None,
            stage: ctx.stage.clone(),
        }))
    }
}

pub(super) fn tracing_free_warn(msg: &str) {
    eprintln!("WARNING: {msg}");
}
