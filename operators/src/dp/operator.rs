//! The `dp_aggregate` operator: buffers rows per window, releases a window once the watermark
//! passes it (deferred in the high-carbon mode), with noise keyed to the window and a charge
//! on the accountant.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray, UInt32Array,
};
use arrow::compute::take_record_batch;
use arrow::datatypes::{DataType, Field, Schema};
use rand::SeedableRng;
use rand::rngs::StdRng;

use rand_chacha::ChaCha20Rng;

use super::accountant::{Accountant, BudgetError, Cost, zcdp_rho_for};
use super::noise;
use crate::common::{as_f64, times};
use crate::{Collector, Counter, Operator, OperatorError, OutputSpec};

use super::bounding::{Row, bound_contributions};
use super::config::{CARBON_HIGH_MODE_GAUGE, DpAggregate, DpConfig, Mechanism, Planned};

/// The `dp_aggregate` operator (see the module docs).
pub struct DpAggregateOp {
    pub(super) cfg: DpConfig,
    pub(super) planned: Planned,
    pub(super) accountant: Accountant,
    /// Randomness without a `noise_key` (the OS's, or a test seed).
    pub(super) rng: StdRng,
    pub(super) noise_key: Option<Vec<u8>>,
    pub(super) windows: BTreeMap<i64, Vec<Row>>,
    pub(super) watermark: i64,
    pub(super) released: Counter,
    pub(super) refused: Counter,
    pub(super) bounded_out: Counter,
    pub(super) unlisted: Counter,
    pub(super) late: Counter,
    pub(super) spent: crate::Gauge,
    pub(super) held: crate::Gauge,
    pub(super) deferred: Counter,
    pub(super) released_late: Counter,
    pub(super) metrics: crate::Metrics,
    /// Whether closed windows are being held (the policy's high mode, with `defer`).
    pub(super) holding: bool,
    /// The latest window start counted as deferred.
    pub(super) deferred_upto: Option<i64>,
    pub(super) stage: String,
}

impl std::fmt::Debug for DpAggregateOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpAggregateOp").field("release", &self.cfg.release).finish_non_exhaustive()
    }
}

/// Noise of one quantity: draws in grid units, and its scale and 95% bound in grid units.
pub(super) struct Noise {
    pub(super) mechanism: Mechanism,
    /// Laplace: (t, s) with scale t/s; Gaussian: variance num/den.
    pub(super) a: u128,
    pub(super) b: u128,
    pub(super) scale: f64,
    bound95: f64,
}

impl Noise {
    /// Noise for a query with L1 sensitivity `l1` and L2 sensitivity `l2` (grid units) at
    /// (ε, δ); returns it with its cost.
    pub(super) fn new(mechanism: Mechanism, l1: f64, l2: f64, epsilon: f64, delta: f64) -> (Self, Cost) {
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

    pub(super) fn draw(&self, rng: &mut ChaCha20Rng) -> i64 {
        match self.mechanism {
            Mechanism::Laplace => noise::discrete_laplace_rational(rng, self.a, self.b),
            Mechanism::Gaussian => noise::discrete_gaussian(rng, self.a, self.b),
        }
    }
}

impl DpAggregateOp {
    /// The generator of one window's draws and, with a `noise_key`, the id of its content.
    pub(super) fn window_rng(&mut self, start: i64, rows: &[(String, String, f64)]) -> (ChaCha20Rng, Option<String>) {
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

    pub(super) fn release(&mut self, start: i64, rows: Vec<Row>, out: &mut Collector) -> Result<(), OperatorError> {
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
        let mut count: BTreeMap<&str, i64> = BTreeMap::new();
        let mut sum: BTreeMap<&str, i64> = BTreeMap::new();
        for (_, p, v) in &kept {
            let c = count.entry(p.as_str()).or_default();
            *c = c.saturating_add(1);
            let k = (v.clamp(lo, hi) / g).round() as i64;
            let e = sum.entry(p.as_str()).or_default();
            *e = e.saturating_add(k);
        }
        let partitions: Vec<String> = match &cfg.partitions.public {
            Some(list) => {
                let unlisted =
                    count.iter().filter(|(p, _)| !list.iter().any(|l| l == *p)).map(|(_, c)| *c).sum::<i64>();
                self.unlisted.inc_by(unlisted as u64);
                list.clone()
            }
            None => count.keys().map(|p| (*p).to_owned()).collect(),
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
            let c = *count.get(p.as_str()).unwrap_or(&0);
            let s = *sum.get(p.as_str()).unwrap_or(&0);
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
    pub(super) fn close_until(&mut self, wm: i64, all: bool, out: &mut Collector) -> Result<(), OperatorError> {
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
    /// Each release is charged to the budget file, fsynced, before it is emitted.
    fn waits(&self) -> bool {
        true
    }

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

    /// The rows of open windows, and one more row (`budget`, JSON) with the accountant's
    /// ledger: the budget moves with the state to wherever it is restored.
    fn snapshot(&self) -> Result<Option<RecordBatch>, OperatorError> {
        let mut starts = Vec::new();
        let (mut us, mut ps, mut vs, mut bs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (s, rows) in &self.windows {
            for r in rows {
                starts.push(*s);
                us.push(r.unit.clone());
                ps.push(r.partition.clone());
                vs.push(r.value);
                bs.push(None);
            }
        }
        let ledger = serde_json::to_string(self.accountant.ledger()).expect("plain numbers and strings serialize");
        starts.push(i64::MIN);
        us.push(String::new());
        ps.push(String::new());
        vs.push(0.0);
        bs.push(Some(ledger));
        let schema = Arc::new(Schema::new(vec![
            Field::new("window_start", DataType::Int64, false),
            Field::new("unit", DataType::Utf8, false),
            Field::new("partition", DataType::Utf8, false),
            Field::new("value", DataType::Float64, false),
            Field::new("budget", DataType::Utf8, true),
        ]));
        Ok(Some(RecordBatch::try_new(
            schema,
            vec![
                Arc::new(arrow::array::Int64Array::from(starts)),
                Arc::new(StringArray::from(us)),
                Arc::new(StringArray::from(ps)),
                Arc::new(Float64Array::from(vs)),
                Arc::new(StringArray::from(bs)),
            ],
        )?))
    }

    fn restore(&mut self, state: RecordBatch) -> Result<(), OperatorError> {
        let names: Vec<&str> = state.schema_ref().fields().iter().map(|f| f.name().as_str()).collect();
        // snapshots taken before the ledger was kept have no `budget`
        if names[..names.len().min(4)] != ["window_start", "unit", "partition", "value"]
            || !matches!(names.get(4..), Some([] | ["budget"]))
        {
            return Err(OperatorError::State {
                operator: "dp_aggregate",
                detail: "not a dp_aggregate snapshot".into(),
            });
        }
        let bad = |detail: String| OperatorError::State { operator: "dp_aggregate", detail };
        self.windows.clear();
        let s = state.column(0).as_primitive::<arrow::datatypes::Int64Type>();
        let u = state.column(1).as_string::<i32>();
        let p = state.column(2).as_string::<i32>();
        let v = state.column(3).as_primitive::<arrow::datatypes::Float64Type>();
        let b = (state.num_columns() > 4).then(|| state.column(4).as_string::<i32>());
        for i in 0..state.num_rows() {
            if let Some(ledger) = b.filter(|b| b.is_valid(i)).map(|b| b.value(i)) {
                let spent = serde_json::from_str(ledger).map_err(|e| bad(format!("the budget ledger: {e}")))?;
                if self.accountant.adopt(spent).map_err(|e| bad(e.to_string()))? {
                    tracing::info!(release = %self.cfg.release, "privacy budget taken from the restored state");
                }
                continue;
            }
            self.windows.entry(s.value(i)).or_default().push(Row {
                unit: u.value(i).to_owned(),
                partition: p.value(i).to_owned(),
                value: v.value(i),
            });
        }
        self.spent.set(self.accountant.ledger().epsilon_at(self.accountant.delta));
        Ok(())
    }
}
