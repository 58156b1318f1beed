//! `dp_aggregate`: differentially private counts, sums and means per partition and event-time
//! window, with contribution bounding, exact discrete noise from a cryptographically secure
//! generator, and a persistent budget per release stream.
//!
//! Per window, every privacy unit (e.g. a vehicle pseudonym or a device) is bounded to at most
//! `max_partitions` partitions (L0) and `max_contributions` rows per partition (L∞), chosen
//! uniformly at random among its rows — not the first ones. Values are clamped to `bounds` and
//! put on a grid of `granularity`, so sums are integers and the noise is exact discrete
//! Laplace (ε-DP, sensitivity L0·L∞·M) or discrete Gaussian (ρ-zCDP with ρ from the release's
//! (ε, δ), L2 sensitivity sqrt(L0)·L∞·M), where M is the largest grid value. A mean is a noisy
//! sum over a noisy count, each with half the release's budget.
//!
//! Partitions are public (`public`: every listed partition is released every window, empty or
//! not; rows of other partitions are dropped and counted) or, for counts with Laplace noise,
//! selected privately: a partition is released only if its noisy count reaches
//! τ = Δ + (Δ/ε)·ln(L0 / (2δ)) (Laplace thresholding).
//!
//! Each window release is charged to the release's [`Accountant`] — persisted before the rows
//! are emitted — and once the period's budget is spent, releases stop with an error log and the
//! metric `citystream_dp_releases_refused_total`, never silently.
//!
//! With `noise_key`, the random draws of a window (contribution bounding and noise) come from
//! ChaCha20 seeded with `HMAC-SHA256(key, release ‖ window ‖ the window's rows in a canonical
//! order)`: the same rows give the same release, whatever order they arrived in — a backlog
//! replay, a restore after a crash — and the accountant charges a replayed release once. Other
//! rows give unrelated noise, as fresh noise would be to anyone without the key. The key is as
//! sensitive as the pseudonymization secret: with it, guesses about the data can be checked
//! against a release. Without `noise_key`, each release draws from the operating system.

pub mod accountant;
pub mod noise;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray, UInt32Array,
};
use arrow::compute::take_record_batch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha20Rng;
use serde::Deserialize;

use crate::common::{as_f64, column, numeric_column, time_column, times};
use crate::{
    BuildContext, Collector, Counter, Duration, EnvString, Operator, OperatorConfig, OperatorError, OutputSpec,
    PlanError,
};
use accountant::{Accountant, BudgetError, Cost, zcdp_rho_for};

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

fn d_delta() -> f64 {
    1e-6
}
fn d_period() -> Duration {
    Duration::from_secs(86_400)
}
fn d_time() -> String {
    "ts".into()
}
fn d_one() -> usize {
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

struct Planned {
    time: usize,
    unit: usize,
    partition: usize,
    value: Option<usize>,
    outputs: Vec<OutputSpec>,
}

impl DpConfig {
    fn check(&self, input: &SchemaRef) -> Result<Planned, Vec<PlanError>> {
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

    fn granularity(&self) -> f64 {
        let [lo, hi] = self.bounds.unwrap_or([0.0, 1.0]);
        self.granularity.unwrap_or((hi - lo) / 1000.0).max(f64::MIN_POSITIVE)
    }
}

impl OperatorConfig for DpConfig {
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

fn tracing_free_warn(msg: &str) {
    eprintln!("WARNING: {msg}");
}

/// One buffered contribution.
#[derive(Debug, Clone)]
struct Row {
    unit: String,
    partition: String,
    value: f64,
}

/// Bounds contributions: per unit at most `l0` partitions and per (unit, partition) at most
/// `linf` rows, each chosen uniformly at random. Returns the kept rows and how many were cut.
pub fn bound_contributions<R: rand::Rng>(
    rows: Vec<(String, String, f64)>,
    l0: usize,
    linf: usize,
    rng: &mut R,
) -> (Vec<(String, String, f64)>, usize) {
    let n = rows.len();
    let mut by_unit: HashMap<String, BTreeMap<String, Vec<f64>>> = HashMap::new();
    for (u, p, v) in rows {
        by_unit.entry(u).or_default().entry(p).or_default().push(v);
    }
    let mut units: Vec<_> = by_unit.into_iter().collect();
    units.sort_by(|a, b| a.0.cmp(&b.0)); // deterministic order for a seeded generator
    let mut out = Vec::new();
    for (unit, parts) in units {
        let mut parts: Vec<(String, Vec<f64>)> = parts.into_iter().collect();
        parts.shuffle(rng);
        parts.truncate(l0);
        for (p, mut vals) in parts {
            vals.shuffle(rng);
            vals.truncate(linf);
            out.extend(vals.into_iter().map(|v| (unit.clone(), p.clone(), v)));
        }
    }
    let cut = n - out.len();
    (out, cut)
}

/// The `dp_aggregate` operator (see the module docs).
pub struct DpAggregateOp {
    cfg: DpConfig,
    planned: Planned,
    accountant: Accountant,
    /// Randomness without a `noise_key` (the OS's, or a test seed).
    rng: StdRng,
    noise_key: Option<Vec<u8>>,
    windows: BTreeMap<i64, Vec<Row>>,
    watermark: i64,
    released: Counter,
    refused: Counter,
    bounded_out: Counter,
    unlisted: Counter,
    late: Counter,
    spent: crate::Gauge,
    held: crate::Gauge,
    deferred: Counter,
    released_late: Counter,
    metrics: crate::Metrics,
    /// Whether closed windows are being held (the policy's high mode, with `defer`).
    holding: bool,
    /// The latest window start counted as deferred.
    deferred_upto: Option<i64>,
    stage: String,
}

impl std::fmt::Debug for DpAggregateOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpAggregateOp").field("release", &self.cfg.release).finish_non_exhaustive()
    }
}

/// Noise of one quantity: draws in grid units, and its scale and 95% bound in grid units.
struct Noise {
    mechanism: Mechanism,
    /// Laplace: (t, s) with scale t/s; Gaussian: variance num/den.
    a: u128,
    b: u128,
    scale: f64,
    bound95: f64,
}

impl Noise {
    /// Noise for a query with L1 sensitivity `l1` and L2 sensitivity `l2` (grid units) at
    /// (ε, δ); returns it with its cost.
    fn new(mechanism: Mechanism, l1: f64, l2: f64, epsilon: f64, delta: f64) -> (Self, Cost) {
        match mechanism {
            Mechanism::Laplace => {
                // scale t/s ≥ l1/ε, rounded up on a 1e-6 grid (conservative)
                let s: u128 = 1_000_000;
                let t = ((l1 / epsilon) * s as f64).ceil().max(1.0) as u128;
                let scale = t as f64 / s as f64;
                (Noise { mechanism, a: t, b: s, scale, bound95: scale * 20f64.ln() }, Cost::Pure { epsilon })
            }
            Mechanism::Gaussian => {
                let rho = zcdp_rho_for(epsilon, delta);
                let sigma = l2 / (2.0 * rho).sqrt();
                let (num, den) = noise::rational_variance(sigma);
                let sigma = (num as f64 / den as f64).sqrt();
                // the variance was rounded up, so the release costs at most ρ
                (Noise { mechanism, a: num, b: den, scale: sigma, bound95: 1.96 * sigma }, Cost::Zcdp { rho })
            }
        }
    }

    fn draw(&self, rng: &mut ChaCha20Rng) -> i64 {
        match self.mechanism {
            Mechanism::Laplace => noise::discrete_laplace_rational(rng, self.a, self.b),
            Mechanism::Gaussian => noise::discrete_gaussian(rng, self.a, self.b),
        }
    }
}

impl DpAggregateOp {
    /// The generator of one window's draws and, with a `noise_key`, the id of its content.
    fn window_rng(&mut self, start: i64, rows: &[(String, String, f64)]) -> (ChaCha20Rng, Option<String>) {
        let Some(key) = &self.noise_key else { return (ChaCha20Rng::from_rng(&mut self.rng), None) };
        let mut h = citystream_schemas::privacy::KeyedDigest::new(key, "citystream/dp-release/v1");
        h.update(self.cfg.release.as_bytes());
        h.update(&start.to_le_bytes());
        for (u, p, v) in rows {
            h.update(u.as_bytes());
            h.update(p.as_bytes());
            h.update(&v.to_bits().to_le_bytes());
        }
        let seed = h.finish();
        let id = seed[..16].iter().map(|b| format!("{b:02x}")).collect::<String>();
        (ChaCha20Rng::from_seed(seed), Some(format!("{start}:{id}")))
    }

    fn release(&mut self, start: i64, rows: Vec<Row>, out: &mut Collector) -> Result<(), OperatorError> {
        let mut raw: Vec<(String, String, f64)> = rows.into_iter().map(|r| (r.unit, r.partition, r.value)).collect();
        // a canonical order: what is drawn must not depend on the order rows arrived in
        raw.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)).then(a.2.total_cmp(&b.2)));
        let (mut rng, content) = self.window_rng(start, &raw);
        let cfg = &self.cfg;
        let (l0, linf) = (cfg.max_partitions, cfg.max_contributions);
        let (kept, cut) = bound_contributions(raw, l0, linf, &mut rng);
        self.bounded_out.inc_by(cut as u64);
        let g = cfg.granularity();
        let [lo, hi] = cfg.bounds.unwrap_or([0.0, 1.0]);
        let m = (lo.abs().max(hi.abs()) / g).ceil().max(1.0);
        // exact per-partition integer aggregates
        let mut count: BTreeMap<String, i64> = BTreeMap::new();
        let mut sum: BTreeMap<String, i64> = BTreeMap::new();
        for (_, p, v) in &kept {
            let c = count.entry(p.clone()).or_default();
            *c = c.saturating_add(1);
            let k = (v.clamp(lo, hi) / g).round() as i64;
            let e = sum.entry(p.clone()).or_default();
            *e = e.saturating_add(k);
        }
        let partitions: Vec<String> = match &cfg.partitions.public {
            Some(list) => {
                let unlisted = count.iter().filter(|(p, _)| !list.contains(p)).map(|(_, c)| *c).sum::<i64>();
                self.unlisted.inc_by(unlisted as u64);
                list.clone()
            }
            None => count.keys().cloned().collect(),
        };
        let (l0f, linff) = (l0 as f64, linf as f64);
        let (eps, delta) = match cfg.aggregate {
            DpAggregate::Mean => (cfg.epsilon / 2.0, cfg.delta / 2.0),
            _ => (cfg.epsilon, cfg.delta),
        };
        let (count_noise, count_cost) = Noise::new(cfg.mechanism, l0f * linff, l0f.sqrt() * linff, eps, delta);
        let (sum_noise, sum_cost) = Noise::new(cfg.mechanism, l0f * linff * m, l0f.sqrt() * linff * m, eps, delta);
        let cost = match (cfg.aggregate, count_cost, sum_cost) {
            (DpAggregate::Count, c, _) => c,
            (DpAggregate::Sum, _, c) => c,
            (DpAggregate::Mean, Cost::Pure { epsilon: a }, Cost::Pure { epsilon: b }) => Cost::Pure { epsilon: a + b },
            (DpAggregate::Mean, Cost::Zcdp { rho: a }, Cost::Zcdp { rho: b }) => Cost::Zcdp { rho: a + b },
            _ => unreachable!("both halves use one mechanism"),
        };
        // charge (and persist) before anything is emitted
        match self.accountant.charge_release(start, content.as_deref(), cost) {
            Ok((spent, _)) => {
                self.spent.set(spent.epsilon_at(self.accountant.delta));
                self.released.inc();
            }
            Err(e @ BudgetError::Exhausted { .. }) => {
                self.refused.inc();
                eprintln!(
                    "ERROR: dp release `{}` window {start}: {e}; releases stop until the next period",
                    cfg.release
                );
                return Ok(());
            }
            Err(e) => {
                return Err(OperatorError::State { operator: "dp_aggregate", detail: e.to_string() });
            }
        }
        let threshold = if cfg.partitions.private {
            let d = l0f * linff;
            Some(d + (d / cfg.epsilon) * (l0f / (2.0 * cfg.delta)).ln())
        } else {
            None
        };
        let mut names = Vec::new();
        let mut values = Vec::new();
        let mut bounds = Vec::new();
        for p in partitions {
            let c = *count.get(&p).unwrap_or(&0);
            let s = *sum.get(&p).unwrap_or(&0);
            let noisy_c = c.saturating_add(count_noise.draw(&mut rng));
            let (value, bound) = match cfg.aggregate {
                DpAggregate::Count => (noisy_c as f64, count_noise.bound95),
                DpAggregate::Sum => (s.saturating_add(sum_noise.draw(&mut rng)) as f64 * g, sum_noise.bound95 * g),
                DpAggregate::Mean => {
                    let noisy_s = s.saturating_add(sum_noise.draw(&mut rng)) as f64 * g;
                    let n = (noisy_c as f64).max(1.0);
                    let mean = (noisy_s / n).clamp(lo, hi);
                    (mean, ((sum_noise.bound95 * g + mean.abs() * count_noise.bound95) / n).min(hi - lo))
                }
            };
            if threshold.is_some_and(|t| (noisy_c as f64) < t) {
                continue;
            }
            names.push(p);
            values.push(value);
            bounds.push(bound);
        }
        let n = names.len();
        let scale = match cfg.aggregate {
            DpAggregate::Count => count_noise.scale,
            _ => sum_noise.scale * g,
        };
        let agg = match cfg.aggregate {
            DpAggregate::Count => "count",
            DpAggregate::Sum => "sum",
            DpAggregate::Mean => "mean",
        };
        let mech = match cfg.mechanism {
            Mechanism::Laplace => "discrete_laplace",
            Mechanism::Gaussian => "discrete_gaussian",
        };
        let delta_out = if cfg.mechanism == Mechanism::Gaussian || cfg.partitions.private { cfg.delta } else { 0.0 };
        let cols: Vec<ArrayRef> = vec![
            Arc::new(TimestampMillisecondArray::from(vec![start; n]).with_timezone("UTC")),
            Arc::new(TimestampMillisecondArray::from(vec![start + cfg.window.as_millis_i64(); n]).with_timezone("UTC")),
            Arc::new(StringArray::from(names)),
            Arc::new(Float64Array::from(values)),
            Arc::new(StringArray::from(vec![agg; n])),
            Arc::new(StringArray::from(vec![mech; n])),
            Arc::new(Float64Array::from(vec![cfg.epsilon; n])),
            Arc::new(Float64Array::from(vec![delta_out; n])),
            Arc::new(Float64Array::from(vec![scale; n])),
            Arc::new(Float64Array::from(bounds)),
        ];
        out.emit(0, RecordBatch::try_new(self.planned.outputs[0].schema.clone(), cols)?);
        Ok(())
    }

    /// Releases the windows `wm` closes (those the carbon policy holds stay, unless `all`).
    fn close_until(&mut self, wm: i64, all: bool, out: &mut Collector) -> Result<(), OperatorError> {
        let size = self.cfg.window.as_millis_i64();
        // until the policy has published its mode (at start), windows are held too
        let hold = match &self.cfg.defer {
            Some(_) => !all && self.metrics.value(CARBON_HIGH_MODE_GAUGE, &[]) != Some(0.0),
            None => false,
        };
        // held windows are released once the grid is clean, or when they are `max_delay` old
        let until = match (&self.cfg.defer, hold) {
            (Some(d), true) => wm.saturating_sub(d.max_delay.as_millis_i64()),
            _ => wm,
        };
        let ready: Vec<i64> = self.windows.keys().copied().take_while(|s| s.saturating_add(size) <= until).collect();
        let held_now: Vec<i64> =
            self.windows.keys().copied().skip(ready.len()).take_while(|s| s.saturating_add(size) <= wm).collect();
        if hold != self.holding {
            self.holding = hold;
            tracing::info!(
                stage = %self.stage,
                release = %self.cfg.release,
                held = held_now.len(),
                "carbon policy: {}",
                if hold { "holding DP releases for a cleaner grid" } else { "releasing held DP windows" }
            );
        }
        for &s in &held_now {
            if self.deferred_upto.is_none_or(|d| s > d) {
                self.deferred.inc();
                self.deferred_upto = Some(s);
            }
        }
        for start in ready {
            if self.deferred_upto.is_some_and(|d| start <= d) {
                self.released_late.inc();
            }
            let rows = self.windows.remove(&start).expect("listed");
            self.release(start, rows, out)?;
        }
        self.held.set(held_now.len() as f64);
        Ok(())
    }
}

impl Operator for DpAggregateOp {
    fn kind(&self) -> &'static str {
        "dp_aggregate"
    }

    fn outputs(&self) -> &[OutputSpec] {
        &self.planned.outputs
    }

    fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<(), OperatorError> {
        let ts = times(&batch, self.planned.time);
        let units = arrow::compute::cast(batch.column(self.planned.unit), &DataType::Utf8)?;
        let units = units.as_string::<i32>();
        let parts = batch.column(self.planned.partition).as_string::<i32>();
        let values = self.planned.value.map(|c| as_f64(batch.column(c))).transpose()?;
        let size = self.cfg.window.as_millis_i64();
        let mut late = Vec::new();
        for (i, &t) in ts.iter().enumerate() {
            let start = t.div_euclid(size) * size;
            if self.watermark != i64::MIN && start + size <= self.watermark {
                late.push(i as u32);
                continue;
            }
            // rows without a unit or partition cannot be bounded: they are not released
            if units.is_null(i) || parts.is_null(i) {
                continue;
            }
            let value = match &values {
                None => 1.0,
                Some((v, nulls)) if nulls.as_ref().is_none_or(|n| n.is_valid(i)) => v[i],
                Some(_) => continue,
            };
            self.windows.entry(start).or_default().push(Row {
                unit: units.value(i).to_owned(),
                partition: parts.value(i).to_owned(),
                value,
            });
        }
        if !late.is_empty() {
            self.late.inc_by(late.len() as u64);
            out.emit(1, take_record_batch(&batch, &UInt32Array::from(late))?);
        }
        Ok(())
    }

    fn on_watermark(&mut self, watermark: i64, out: &mut Collector) -> Result<(), OperatorError> {
        self.watermark = self.watermark.max(watermark);
        self.close_until(self.watermark, false, out)
    }

    /// A panic half-way through a release could leave the budget and the emitted rows apart:
    /// the pipeline stops and restarts from its checkpoint instead.
    fn recovers_from_panic(&self) -> bool {
        false
    }

    /// Held windows come out later with their own `window_end`: the output watermark stays
    /// behind the earliest window still held.
    fn output_watermark(&self, input: i64) -> i64 {
        let size = self.cfg.window.as_millis_i64();
        match self.windows.keys().next() {
            Some(start) => input.min(start.saturating_add(size).saturating_sub(1)),
            None => input,
        }
    }

    /// At every checkpoint a deferring stage looks at the grid again: held windows go out in a
    /// clean interval even while no watermark moves (idle partitions).
    fn on_checkpoint(&mut self, out: &mut Collector) -> Result<(), OperatorError> {
        if self.cfg.defer.is_some() && self.watermark != i64::MIN {
            self.close_until(self.watermark, false, out)?;
        }
        Ok(())
    }

    fn on_end(&mut self, out: &mut Collector) -> Result<(), OperatorError> {
        // the input ended: nothing held stays behind
        self.close_until(i64::MAX, true, out)
    }

    fn is_stateful(&self) -> bool {
        true
    }

    fn snapshot(&self) -> Result<Option<RecordBatch>, OperatorError> {
        let mut starts = Vec::new();
        let (mut us, mut ps, mut vs) = (Vec::new(), Vec::new(), Vec::new());
        for (s, rows) in &self.windows {
            for r in rows {
                starts.push(*s);
                us.push(r.unit.clone());
                ps.push(r.partition.clone());
                vs.push(r.value);
            }
        }
        let schema = Arc::new(Schema::new(vec![
            Field::new("window_start", DataType::Int64, false),
            Field::new("unit", DataType::Utf8, false),
            Field::new("partition", DataType::Utf8, false),
            Field::new("value", DataType::Float64, false),
        ]));
        Ok(Some(RecordBatch::try_new(
            schema,
            vec![
                Arc::new(arrow::array::Int64Array::from(starts)),
                Arc::new(StringArray::from(us)),
                Arc::new(StringArray::from(ps)),
                Arc::new(Float64Array::from(vs)),
            ],
        )?))
    }

    fn restore(&mut self, state: RecordBatch) -> Result<(), OperatorError> {
        let names: Vec<&str> = state.schema_ref().fields().iter().map(|f| f.name().as_str()).collect();
        if names != ["window_start", "unit", "partition", "value"] {
            return Err(OperatorError::State {
                operator: "dp_aggregate",
                detail: "not a dp_aggregate snapshot".into(),
            });
        }
        self.windows.clear();
        let s = state.column(0).as_primitive::<arrow::datatypes::Int64Type>();
        let u = state.column(1).as_string::<i32>();
        let p = state.column(2).as_string::<i32>();
        let v = state.column(3).as_primitive::<arrow::datatypes::Float64Type>();
        for i in 0..state.num_rows() {
            self.windows.entry(s.value(i)).or_default().push(Row {
                unit: u.value(i).to_owned(),
                partition: p.value(i).to_owned(),
                value: v.value(i),
            });
        }
        Ok(())
    }
}
