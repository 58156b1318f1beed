//! `window`: tumbling and sliding (hop) event-time windows per key, emitted when the watermark
//! passes a window's end plus the allowed lateness.
//!
//! Each window is emitted once, complete: rows may arrive out of order up to `allowed_lateness`
//! after the window's end. A row whose every window has already been emitted is late and goes
//! to the `late_events` output (same schema as the input), counted — never dropped silently.
//!
//! Aggregates: `count`, `sum`, `mean`, `min`, `max`, `quantile` (exact, `q` in 0..=1, linear
//! interpolation between order statistics as in numpy's default), `weighted_mean` (e.g.
//! vehicle-weighted mean speed: `column: speed_kmh, weight: flow`), `rate_per_hour` (sum scaled
//! to one hour: flow per hour) and `count_above` (`above: 15`: exceedances). Nulls are skipped
//! by every aggregate; an aggregate over no values is null (`count` and `count_above` are 0).
//!
//! State: per open window, one accumulator slot per key; quantiles keep their values (4 bytes
//! each). Windows close on watermark, so state is bounded by the keys active within
//! `size + allowed_lateness` (plus out-of-orderness upstream).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, FixedSizeBinaryArray, Float64Array, Int64Array, ListArray, RecordBatch,
    TimestampMillisecondArray, UInt32Array,
};
use arrow::buffer::NullBuffer;
use arrow::compute::take_record_batch;
use arrow::datatypes::{DataType, Field, Float32Type, Int64Type, Schema, SchemaRef};
use arrow::row::OwnedRow;
use serde::Deserialize;

use crate::common::{KeyEncoder, as_f64, columns, numeric_column, time_column, times};
use crate::exact_sum::ExactSum;
use crate::{
    BuildContext, Collector, Counter, Duration, Gauge, Operator, OperatorConfig, OperatorError, OutputSpec, PlanError,
};

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
    fn output_name(&self) -> String {
        let f = serde_name(self.func);
        match (&self.name, &self.column) {
            (Some(n), _) => n.clone(),
            (None, Some(c)) => format!("{f}_{c}"),
            (None, None) => f.to_owned(),
        }
    }
}

fn serde_name(f: AggFn) -> &'static str {
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

fn d_time() -> String {
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
struct Plan {
    time: usize,
    keys: Vec<usize>,
    /// Per aggregate: (function, value column, weight column, q or threshold).
    aggs: Vec<(AggFn, Option<usize>, Option<usize>, f64)>,
    outputs: Vec<OutputSpec>,
}

impl WindowConfig {
    fn check(&self, input: &SchemaRef) -> Result<Plan, Vec<PlanError>> {
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
    pub fn live_change(&self, new: &Self) -> Result<(), String> {
        let mut masked = new.clone();
        masked.allowed_lateness = self.allowed_lateness;
        if &masked == self {
            Ok(())
        } else {
            Err("only `allowed_lateness` of a window can change live; key, size, slide, time column and \
                 aggregates shape its state and need a restart"
                .into())
        }
    }
}

impl OperatorConfig for WindowConfig {
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

/// Accumulators of one aggregate for every group of one window, column-wise.
#[derive(Debug, Clone)]
enum Acc {
    /// count / count_above
    Count(Vec<i64>),
    /// sum, mean, rate_per_hour: (sum, n)
    Sum(Vec<ExactSum>, Vec<u64>),
    Min(Vec<f64>),
    Max(Vec<f64>),
    Values(Vec<Vec<f32>>),
    /// (sum of w*v, sum of w)
    Weighted(Vec<ExactSum>, Vec<ExactSum>),
}

impl Acc {
    fn new(f: AggFn) -> Self {
        match f {
            AggFn::Count | AggFn::CountAbove => Acc::Count(Vec::new()),
            AggFn::Sum | AggFn::Mean | AggFn::RatePerHour => Acc::Sum(Vec::new(), Vec::new()),
            AggFn::Min => Acc::Min(Vec::new()),
            AggFn::Max => Acc::Max(Vec::new()),
            AggFn::Quantile => Acc::Values(Vec::new()),
            AggFn::WeightedMean => Acc::Weighted(Vec::new(), Vec::new()),
        }
    }

    fn push_slot(&mut self) {
        match self {
            Acc::Count(c) => c.push(0),
            Acc::Sum(s, n) => {
                s.push(ExactSum::default());
                n.push(0);
            }
            Acc::Min(m) => m.push(f64::INFINITY),
            Acc::Max(m) => m.push(f64::NEG_INFINITY),
            Acc::Values(v) => v.push(Vec::new()),
            Acc::Weighted(a, b) => {
                a.push(ExactSum::default());
                b.push(ExactSum::default());
            }
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Acc::Count(c) => c.capacity() * 8,
            Acc::Sum(s, n) => s.capacity() * 32 + n.capacity() * 8,
            Acc::Min(m) | Acc::Max(m) => m.capacity() * 8,
            Acc::Values(v) => v.iter().map(|x| x.capacity() * 4 + 24).sum(),
            Acc::Weighted(a, b) => (a.capacity() + b.capacity()) * 32,
        }
    }
}

#[derive(Debug, Clone)]
struct WindowState {
    /// group id -> slot
    slots: HashMap<u32, u32>,
    /// slot -> group id, in arrival order
    groups: Vec<u32>,
    accs: Vec<Acc>,
}

/// The `window` operator (see the module docs).
pub struct Window {
    plan: Plan,
    size: i64,
    slide: i64,
    lateness: i64,
    keys: KeyEncoder,
    /// encoded key bytes -> group id (looked up by borrowed bytes: no allocation per row)
    group_of: HashMap<Box<[u8]>, u32>,
    group_keys: Vec<OwnedRow>,
    windows: BTreeMap<i64, WindowState>,
    watermark: i64,
    late: Counter,
    emitted: Counter,
    open: Gauge,
    state_bytes: Gauge,
}

impl std::fmt::Debug for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Window").field("size", &self.size).field("slide", &self.slide).finish_non_exhaustive()
    }
}

impl Window {
    /// Changes the allowed lateness (live tuning). Windows already emitted stay emitted.
    pub fn set_allowed_lateness(&mut self, lateness: Duration) {
        self.lateness = lateness.as_millis_i64();
    }

    /// The group id of an encoded key, registering a new group on first sight.
    fn group_id(&mut self, row: arrow::row::Row<'_>) -> u32 {
        if let Some(g) = self.group_of.get(row.as_ref()) {
            return *g;
        }
        let g = self.group_keys.len() as u32;
        self.group_keys.push(row.owned());
        self.group_of.insert(row.as_ref().into(), g);
        g
    }

    /// Whether the window starting at `start` is still open at the current watermark.
    fn is_open(&self, start: i64) -> bool {
        self.watermark == i64::MIN || start.saturating_add(self.size + self.lateness) > self.watermark
    }

    /// Bytes of state held (accumulators, slot maps and distinct keys).
    pub fn state_bytes(&self) -> usize {
        let keys: usize = self.group_keys.iter().map(|k| k.as_ref().len() + 48).sum();
        let wins: usize = self
            .windows
            .values()
            .map(|w| w.slots.capacity() * 9 + w.groups.capacity() * 4 + w.accs.iter().map(Acc::bytes).sum::<usize>())
            .sum();
        keys + wins
    }

    fn emit_until(&mut self, wm: i64, out: &mut Collector) -> Result<(), OperatorError> {
        let closable: Vec<i64> =
            self.windows.keys().copied().take_while(|s| s.saturating_add(self.size + self.lateness) <= wm).collect();
        for start in closable {
            let w = self.windows.remove(&start).expect("listed");
            let batch = self.render(start, &w)?;
            self.emitted.inc_by(batch.num_rows() as u64);
            out.emit(0, batch);
        }
        self.forget_unused_keys();
        self.open.set(self.windows.len() as f64);
        self.state_bytes.set(self.state_bytes() as f64);
        Ok(())
    }

    /// Forgets the keys no open window holds, so a stream of ever new keys (a flood of
    /// invented segment ids) cannot grow the key table without bound. Runs when at least half
    /// the keys (and 1024) are unused, so its cost is amortized over the rows that made them.
    /// Group ids are internal: output is in key order, and snapshots store the keys.
    fn forget_unused_keys(&mut self) {
        if self.group_keys.len() < 1024 {
            // (a window without key columns has one group and registers no key)
            return;
        }
        let mut used = vec![false; self.group_keys.len()];
        for w in self.windows.values() {
            for g in &w.groups {
                used[*g as usize] = true;
            }
        }
        let unused = used.iter().filter(|u| !**u).count();
        if unused < 1024.max(self.group_keys.len() / 2) {
            return;
        }
        let mut remap = vec![u32::MAX; self.group_keys.len()];
        let mut kept = Vec::with_capacity(self.group_keys.len() - unused);
        for (g, key) in std::mem::take(&mut self.group_keys).into_iter().enumerate() {
            if used[g] {
                remap[g] = kept.len() as u32;
                kept.push(key);
            }
        }
        self.group_keys = kept;
        self.group_of.retain(|_, g| {
            *g = remap[*g as usize];
            *g != u32::MAX
        });
        self.group_of.shrink_to_fit();
        for w in self.windows.values_mut() {
            w.groups.iter_mut().for_each(|g| *g = remap[*g as usize]);
            w.slots = w.groups.iter().enumerate().map(|(slot, g)| (*g, slot as u32)).collect();
        }
    }

    fn render(&self, start: i64, w: &WindowState) -> Result<RecordBatch, OperatorError> {
        let n = w.groups.len();
        let schema = self.plan.outputs[0].schema.clone();
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(TimestampMillisecondArray::from(vec![start; n]).with_timezone("UTC")),
            Arc::new(TimestampMillisecondArray::from(vec![start + self.size; n]).with_timezone("UTC")),
        ];
        // rows in key order: the output does not depend on the order keys first arrived in
        let mut slots: Vec<usize> = (0..n).collect();
        slots.sort_by(|&a, &b| {
            self.group_keys[w.groups[a] as usize].as_ref().cmp(self.group_keys[w.groups[b] as usize].as_ref())
        });
        if !self.plan.keys.is_empty() {
            let rows = slots.iter().map(|&i| self.group_keys[w.groups[i] as usize].row());
            cols.extend(self.keys.converter.convert_rows(rows)?);
        }
        let hours = self.size as f64 / 3_600_000.0;
        for ((f, _, _, q), acc) in self.plan.aggs.iter().zip(&w.accs) {
            let col: ArrayRef = match (f, acc) {
                (_, Acc::Count(c)) => Arc::new(slots.iter().map(|&i| c[i]).collect::<Int64Array>()),
                (AggFn::Sum, Acc::Sum(s, k)) => {
                    Arc::new(slots.iter().map(|&i| (k[i] > 0).then(|| s[i].value())).collect::<Float64Array>())
                }
                (AggFn::RatePerHour, Acc::Sum(s, k)) => {
                    Arc::new(slots.iter().map(|&i| (k[i] > 0).then(|| s[i].value() / hours)).collect::<Float64Array>())
                }
                (_, Acc::Sum(s, k)) => Arc::new(
                    slots.iter().map(|&i| (k[i] > 0).then(|| s[i].value() / k[i] as f64)).collect::<Float64Array>(),
                ),
                (_, Acc::Min(m)) | (_, Acc::Max(m)) => {
                    Arc::new(slots.iter().map(|&i| m[i].is_finite().then_some(m[i])).collect::<Float64Array>())
                }
                (_, Acc::Values(v)) => Arc::new(slots.iter().map(|&i| quantile(&v[i], *q)).collect::<Float64Array>()),
                (_, Acc::Weighted(a, b)) => Arc::new(
                    slots
                        .iter()
                        .map(|&i| (b[i].value() > 0.0).then(|| a[i].value() / b[i].value()))
                        .collect::<Float64Array>(),
                ),
            };
            cols.push(col);
        }
        Ok(RecordBatch::try_new(schema, cols)?)
    }
}

/// The `q` quantile of `values` with linear interpolation between order statistics (numpy's
/// default, "type 7"); `None` for no values.
pub fn quantile(values: &[f32], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v: Vec<f32> = values.to_vec();
    v.sort_unstable_by(f32::total_cmp);
    let h = (v.len() - 1) as f64 * q;
    let lo = h.floor() as usize;
    let hi = h.ceil() as usize;
    let (a, b) = (v[lo] as f64, v[hi] as f64);
    Some(a + (h - lo as f64) * (b - a))
}

impl Operator for Window {
    fn kind(&self) -> &'static str {
        "window"
    }

    fn outputs(&self) -> &[OutputSpec] {
        &self.plan.outputs
    }

    fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<(), OperatorError> {
        let ts = times(&batch, self.plan.time);
        // group id per row
        let gids: Vec<u32> = if self.plan.keys.is_empty() {
            // one city-wide group, which has no key to keep
            vec![0; batch.num_rows()]
        } else {
            let rows = self.keys.encode(&batch)?;
            rows.iter().map(|r| self.group_id(r)).collect()
        };
        // rows per open window they belong to; late rows aside
        let per_window = (self.size / self.slide) as usize;
        let mut by_window: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
        let mut late = Vec::new();
        for (i, &t) in ts.iter().enumerate() {
            let last_start = t.div_euclid(self.slide) * self.slide;
            let mut any = false;
            for k in 0..per_window as i64 {
                let start = last_start - k * self.slide;
                if self.is_open(start) {
                    by_window.entry(start).or_default().push(i as u32);
                    any = true;
                }
            }
            if !any {
                late.push(i as u32);
            }
        }
        if !late.is_empty() {
            self.late.inc_by(late.len() as u64);
            out.emit(1, take_record_batch(&batch, &UInt32Array::from(late))?);
        }
        if by_window.is_empty() {
            return Ok(());
        }
        // values per aggregate, cast once
        let mut values = Vec::with_capacity(self.plan.aggs.len());
        for (_, col, weight, _) in &self.plan.aggs {
            let v = col.map(|c| as_f64(batch.column(c))).transpose()?;
            let w = weight.map(|c| as_f64(batch.column(c))).transpose()?;
            values.push((v, w));
        }
        let valid = |n: &Option<NullBuffer>, i: usize| n.as_ref().is_none_or(|n| n.is_valid(i));
        let aggs = self.plan.aggs.clone();
        for (start, rows) in by_window {
            let w = self.windows.entry(start).or_insert_with(|| WindowState {
                slots: HashMap::new(),
                groups: Vec::new(),
                accs: aggs.iter().map(|a| Acc::new(a.0)).collect(),
            });
            let slots: Vec<usize> = rows
                .iter()
                .map(|&i| {
                    let g = gids[i as usize];
                    let next = w.groups.len() as u32;
                    let s = *w.slots.entry(g).or_insert(next);
                    if s == next {
                        w.groups.push(g);
                        w.accs.iter_mut().for_each(Acc::push_slot);
                    }
                    s as usize
                })
                .collect();
            for ((acc, (f, _, _, param)), (v, wt)) in w.accs.iter_mut().zip(&aggs).zip(&values) {
                match (acc, v) {
                    (Acc::Count(c), None) => rows.iter().zip(&slots).for_each(|(_, &s)| c[s] += 1),
                    (Acc::Count(c), Some((v, n))) => {
                        for (&i, &s) in rows.iter().zip(&slots) {
                            let i = i as usize;
                            if valid(n, i) && (*f == AggFn::Count || v[i] > *param) {
                                c[s] += 1;
                            }
                        }
                    }
                    (Acc::Sum(sum, k), Some((v, n))) => {
                        for (&i, &s) in rows.iter().zip(&slots) {
                            if valid(n, i as usize) {
                                sum[s].add(v[i as usize]);
                                k[s] += 1;
                            }
                        }
                    }
                    (Acc::Min(m), Some((v, n))) => {
                        for (&i, &s) in rows.iter().zip(&slots) {
                            if valid(n, i as usize) {
                                m[s] = m[s].min(v[i as usize]);
                            }
                        }
                    }
                    (Acc::Max(m), Some((v, n))) => {
                        for (&i, &s) in rows.iter().zip(&slots) {
                            if valid(n, i as usize) {
                                m[s] = m[s].max(v[i as usize]);
                            }
                        }
                    }
                    (Acc::Values(vals), Some((v, n))) => {
                        for (&i, &s) in rows.iter().zip(&slots) {
                            if valid(n, i as usize) {
                                vals[s].push(v[i as usize] as f32);
                            }
                        }
                    }
                    (Acc::Weighted(a, b), Some((v, n))) => {
                        let (wv, wn) = wt.as_ref().expect("planned with a weight");
                        for (&i, &s) in rows.iter().zip(&slots) {
                            let i = i as usize;
                            if valid(n, i) && valid(wn, i) && wv[i] > 0.0 {
                                a[s].add(wv[i] * v[i]);
                                b[s].add(wv[i]);
                            }
                        }
                    }
                    _ => unreachable!("aggregates with a column were planned with one"),
                }
            }
        }
        self.open.set(self.windows.len() as f64);
        Ok(())
    }

    fn on_watermark(&mut self, watermark: i64, out: &mut Collector) -> Result<(), OperatorError> {
        self.watermark = self.watermark.max(watermark);
        self.emit_until(self.watermark, out)
    }

    /// Windows come out `allowed_lateness` after their end: the output's event time
    /// (`window_end`) trails the input watermark by that much.
    fn output_watermark(&self, input: i64) -> i64 {
        input.saturating_sub(self.lateness)
    }

    fn retune(&mut self, new: &dyn std::any::Any) -> Result<(), String> {
        let new = new.downcast_ref::<WindowConfig>().ok_or("not a window config")?;
        self.set_allowed_lateness(new.allowed_lateness);
        Ok(())
    }

    fn on_end(&mut self, out: &mut Collector) -> Result<(), OperatorError> {
        self.emit_until(i64::MAX, out)
    }

    fn is_stateful(&self) -> bool {
        true
    }

    fn snapshot(&self) -> Result<Option<RecordBatch>, OperatorError> {
        // one row per (window, group): start, encoded key, then per aggregate two numbers, two
        // exact sums and a value list (enough to rebuild every accumulator exactly)
        let n_aggs = self.plan.aggs.len();
        let mut starts = Vec::new();
        let mut keys: Vec<&[u8]> = Vec::new();
        let mut cells: Vec<SnapshotCells> = (0..n_aggs).map(|_| SnapshotCells::default()).collect();
        for (start, w) in &self.windows {
            for (slot, g) in w.groups.iter().enumerate() {
                starts.push(*start);
                keys.push(if self.plan.keys.is_empty() { &[] } else { self.group_keys[*g as usize].as_ref() });
                for (acc, c) in w.accs.iter().zip(&mut cells) {
                    c.push(acc, slot);
                }
            }
        }
        let mut fields =
            vec![Field::new("window_start", DataType::Int64, false), Field::new("key", DataType::Binary, false)];
        let mut cols: Vec<ArrayRef> = vec![Arc::new(Int64Array::from(starts)), Arc::new(BinaryArray::from(keys))];
        for (a, c) in cells.into_iter().enumerate() {
            fields.push(Field::new(format!("a{a}_x"), DataType::Float64, true));
            fields.push(Field::new(format!("a{a}_y"), DataType::Float64, true));
            fields.push(Field::new(format!("a{a}_exact_x"), DataType::FixedSizeBinary(16), true));
            fields.push(Field::new(format!("a{a}_exact_y"), DataType::FixedSizeBinary(16), true));
            fields.push(Field::new_list(format!("a{a}_values"), Field::new_list_field(DataType::Float32, true), true));
            cols.push(Arc::new(Float64Array::from(c.x)));
            cols.push(Arc::new(Float64Array::from(c.y)));
            cols.push(Arc::new(FixedSizeBinaryArray::try_from_sparse_iter_with_size(c.exact_x.into_iter(), 16)?));
            cols.push(Arc::new(FixedSizeBinaryArray::try_from_sparse_iter_with_size(c.exact_y.into_iter(), 16)?));
            cols.push(Arc::new(ListArray::from_iter_primitive::<Float32Type, _, _>(c.values)));
        }
        let mut md = std::collections::HashMap::new();
        md.insert("watermark".to_owned(), self.watermark.to_string());
        let schema = Arc::new(Schema::new_with_metadata(fields, md));
        Ok(Some(RecordBatch::try_new(schema, cols)?))
    }

    fn restore(&mut self, state: RecordBatch) -> Result<(), OperatorError> {
        let bad = |detail: String| OperatorError::State { operator: "window", detail };
        if state.num_columns() != 2 + SNAPSHOT_COLUMNS * self.plan.aggs.len() {
            return Err(bad(format!(
                "the snapshot has {} columns; this window has {} aggregates",
                state.num_columns(),
                self.plan.aggs.len()
            )));
        }
        self.watermark = state.schema().metadata().get("watermark").and_then(|w| w.parse().ok()).unwrap_or(i64::MIN);
        let starts = state.column(0).as_primitive::<Int64Type>();
        let keys = state.column(1).as_binary::<i32>();
        self.windows.clear();
        let parser = self.keys.converter.parser();
        let f64_at = |c: usize, r: usize| {
            let a = state.column(c).as_primitive::<arrow::datatypes::Float64Type>();
            a.is_valid(r).then(|| a.value(r))
        };
        let exact_at = |c: usize, r: usize, float: Option<f64>| -> Result<ExactSum, OperatorError> {
            let a = state.column(c).as_fixed_size_binary();
            let bytes: [u8; 16] = if a.is_valid(r) {
                a.value(r).try_into().map_err(|_| bad("an exact sum is not 16 bytes".into()))?
            } else {
                [0; 16]
            };
            Ok(ExactSum::from_parts(bytes, float))
        };
        for r in 0..state.num_rows() {
            let g = if self.plan.keys.is_empty() { 0 } else { self.group_id(parser.parse(keys.value(r))) };
            let aggs = &self.plan.aggs;
            let w = self.windows.entry(starts.value(r)).or_insert_with(|| WindowState {
                slots: HashMap::new(),
                groups: Vec::new(),
                accs: aggs.iter().map(|a| Acc::new(a.0)).collect(),
            });
            let slot = w.groups.len();
            w.slots.insert(g, slot as u32);
            w.groups.push(g);
            for (a, acc) in w.accs.iter_mut().enumerate() {
                acc.push_slot();
                let base = 2 + SNAPSHOT_COLUMNS * a;
                let (x, y) = (f64_at(base, r), f64_at(base + 1, r));
                match acc {
                    Acc::Count(c) => c[slot] = x.unwrap_or(0.0) as i64,
                    Acc::Sum(s, k) => {
                        s[slot] = exact_at(base + 2, r, x)?;
                        k[slot] = y.unwrap_or(0.0) as u64;
                    }
                    Acc::Min(m) => m[slot] = x.unwrap_or(f64::INFINITY),
                    Acc::Max(m) => m[slot] = x.unwrap_or(f64::NEG_INFINITY),
                    Acc::Values(v) => {
                        let l = state.column(base + 4).as_list::<i32>();
                        let vals = l.value(r);
                        v[slot] = vals.as_primitive::<Float32Type>().values().to_vec();
                    }
                    Acc::Weighted(p, q) => {
                        p[slot] = exact_at(base + 2, r, x)?;
                        q[slot] = exact_at(base + 3, r, y)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Snapshot columns per aggregate: x, y, exact x, exact y, values.
const SNAPSHOT_COLUMNS: usize = 5;

/// One aggregate's snapshot columns being built.
#[derive(Default)]
struct SnapshotCells {
    x: Vec<Option<f64>>,
    y: Vec<Option<f64>>,
    exact_x: Vec<Option<[u8; 16]>>,
    exact_y: Vec<Option<[u8; 16]>>,
    values: Vec<Option<Vec<Option<f32>>>>,
}

impl SnapshotCells {
    fn push(&mut self, acc: &Acc, slot: usize) {
        let (x, y, ex, ey, l) = match acc {
            Acc::Count(c) => (Some(c[slot] as f64), None, None, None, None),
            Acc::Sum(s, k) => {
                let (fixed, float) = s[slot].to_parts();
                (float, Some(k[slot] as f64), Some(fixed), None, None)
            }
            Acc::Min(m) | Acc::Max(m) => (Some(m[slot]), None, None, None, None),
            Acc::Values(v) => (None, None, None, None, Some(v[slot].iter().map(|x| Some(*x)).collect())),
            Acc::Weighted(p, q) => {
                let ((fp, xp), (fq, xq)) = (p[slot].to_parts(), q[slot].to_parts());
                (xp, xq, Some(fp), Some(fq), None)
            }
        };
        self.x.push(x);
        self.y.push(y);
        self.exact_x.push(ex);
        self.exact_y.push(ey);
        self.values.push(l);
    }
}
