//! `sensor_health`: stuck and silent devices, found on event time, kept away from what reads
//! the healthy output (the models) and reported as changes of status.
//!
//! - A device (the `key` columns, e.g. `[sensor_id]`) is **stuck** once it has sent
//!   `stuck_after` readings in a row whose `values` are all equal (a null equals a null): a
//!   loop that repeats its last counts, a frozen radar. A reading whose values are all zero or
//!   null never counts (an empty road at night repeats itself legitimately). From the reading
//!   that makes it stuck on, the device's rows go to the `stuck` output instead of the main one,
//!   until a reading differs.
//! - A device is **silent** once the watermark is `silent_after` past its last reading, if it
//!   has sent at least `min_readings` readings; one heard fewer times is forgotten then
//!   without a row (a flood of invented ids holds state for `silent_after` only and raises no
//!   alert per id).
//!
//! Every change of status is a row on `health`: the device's `key` and `keep` columns (from its
//! latest row), `ts` (the reading that made it stuck or brought it back, or the moment it went
//! silent: its last reading plus `silent_after`), `status` (`stuck`, `silent` or `ok`),
//! `faulty` (1 or 0, the value for an `alert` rule) and `readings` (the identical readings in a
//! row, for `stuck`).
//!
//! Same input, same output: a device's readings are judged in the order they arrive, which is
//! its partition's order (its messages share a key, hence a partition) whether the stream is
//! live, a backlog or a replay. Silence is decided by whichever comes first: the watermark
//! passing the moment (after which no earlier reading can follow: `decode` routes it to
//! `late_events`), or the device's next reading arriving after the moment (a backlog read
//! before any watermark moved). Either way the same rows come out, and a silent row is never
//! behind the watermark the stage forwarded before it. A row at or before the watermark (which
//! `decode` never lets through) passes on untouched. A device silent for `forget_after`
//! is forgotten, so retired devices do not hold state for ever (decided the same two ways); if
//! it speaks again it starts as a new device, without an `ok` row: an `alert` rule on `health`
//! should resolve with `stale_after` no longer than `silent_after` plus `forget_after`.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, FixedSizeBinaryArray, Float64Array, Int64Array, RecordBatch, StringArray,
    TimestampMillisecondArray, UInt8Array, UInt32Array,
};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::row::{OwnedRow, RowConverter, SortField};
use serde::Deserialize;

use crate::common::{HashedKeys, KeyHash, as_f64, columns, time_column, times};
use crate::{
    BuildContext, Collector, Counter, Duration, Gauge, Operator, OperatorConfig, OperatorError, OutputSpec, PlanError,
};

fn d_stuck() -> u32 {
    10
}
fn d_silent() -> Option<Duration> {
    Some(Duration::from_secs(300))
}
fn d_forget() -> Duration {
    Duration::from_secs(7 * 86_400)
}
fn d_time() -> String {
    "ts".into()
}
fn d_min_readings() -> u32 {
    3
}

/// YAML of a `sensor_health` stage.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensorHealthConfig {
    /// The device's key columns, e.g. `[sensor_id]`.
    pub key: Vec<String>,
    /// The measurements that a stuck device repeats, e.g. `[flow, occupancy, speed_kmh]`.
    pub values: Vec<String>,
    /// Identical readings in a row that make a device stuck (at least 2). Default 10.
    #[serde(default = "d_stuck")]
    pub stuck_after: u32,
    /// How long past its last reading (behind the watermark) a device is silent; `null` turns
    /// silence off. Default `5m`.
    #[serde(default = "d_silent")]
    pub silent_after: Option<Duration>,
    /// How long a silent device is remembered. Default `7d`.
    #[serde(default = "d_forget")]
    pub forget_after: Duration,
    /// Readings a device must have sent before its silence is reported. One heard fewer times
    /// is forgotten `silent_after` after its last reading, without a row, so a flood of
    /// invented ids neither holds state for long nor raises an alert per id. Default 3.
    #[serde(default = "d_min_readings")]
    pub min_readings: u32,
    /// Columns of the device's latest row copied onto its `health` rows (e.g. `[segment_id]`).
    #[serde(default)]
    pub keep: Vec<String>,
    /// The event-time column. Default `ts`.
    #[serde(default = "d_time")]
    pub time_column: String,
}

/// The snapshot metadata entry holding the last input watermark.
const WATERMARK: &str = "watermark";

/// The columns a `health` row adds after the key and kept columns.
const ADDED: [&str; 4] = ["ts", "status", "faulty", "readings"];

/// The resolved plan: column indices and the output ports.
struct Plan {
    time: usize,
    ident: Vec<usize>,
    values: Vec<usize>,
    outputs: Vec<OutputSpec>,
}

impl SensorHealthConfig {
    fn check(&self, input: &SchemaRef) -> Result<Plan, Vec<PlanError>> {
        let mut errs = Vec::new();
        let time = time_column(input, &self.time_column, "time_column").map_err(|e| errs.push(e)).ok();
        if self.key.is_empty() {
            errs.push(PlanError::new("key", "name at least one key column (the device, e.g. `[sensor_id]`)"));
        }
        if self.values.is_empty() {
            errs.push(PlanError::new("values", "name the measurements a stuck device repeats"));
        }
        if self.stuck_after < 2 {
            errs.push(
                PlanError::new("stuck_after", "a device is stuck after at least 2 identical readings in a row")
                    .with_help("e.g. `stuck_after: 10` (five minutes of a loop reporting every 30 s)"),
            );
        }
        if let Some(s) = self.silent_after
            && s.as_millis_i64() <= 0
        {
            errs.push(PlanError::new("silent_after", "must be positive (or `null` to turn silence off)"));
        }
        if self.forget_after.as_millis_i64() <= 0 {
            errs.push(PlanError::new("forget_after", "must be positive"));
        }
        if self.min_readings == 0 {
            errs.push(PlanError::new("min_readings", "must be at least 1"));
        }
        let mut ident = columns(input, &self.key, "key", &mut errs);
        ident.extend(columns(input, &self.keep, "keep", &mut errs));
        let values = columns(input, &self.values, "values", &mut errs);
        for (i, k) in self.keep.iter().enumerate() {
            if self.key.contains(k) {
                errs.push(PlanError::new(format!("keep[{i}]"), format!("`{k}` is a key column: it is on every row")));
            }
        }
        for (i, name) in self.key.iter().chain(&self.keep).enumerate() {
            if ADDED.contains(&name.as_str()) {
                let key =
                    if i < self.key.len() { format!("key[{i}]") } else { format!("keep[{}]", i - self.key.len()) };
                errs.push(
                    PlanError::new(key, format!("`{name}` is a column that `health` rows add"))
                        .with_help(format!("health rows end with {}", ADDED.join(", "))),
                );
            }
        }
        for (i, &c) in ident.iter().enumerate() {
            if matches!(input.field(c).data_type(), DataType::Dictionary(..)) {
                let key =
                    if i < self.key.len() { format!("key[{i}]") } else { format!("keep[{}]", i - self.key.len()) };
                errs.push(
                    PlanError::new(key, format!("`{}` is dictionary-encoded", input.field(c).name()))
                        .with_help("cast it to its value type first (a `project` stage)"),
                );
            }
        }
        let Some(time) = time.filter(|_| errs.is_empty()) else { return Err(errs) };
        let mut fields: Vec<Field> = ident.iter().map(|&i| input.field(i).clone()).collect();
        fields.extend([
            Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())), false),
            Field::new("status", DataType::Utf8, false),
            Field::new("faulty", DataType::Float64, false),
            Field::new("readings", DataType::UInt32, false),
        ]);
        let outputs = vec![
            OutputSpec::new("main", input.clone()),
            OutputSpec::new("stuck", input.clone()),
            OutputSpec::new("health", Arc::new(Schema::new(fields))),
        ];
        Ok(Plan { time, ident, values, outputs })
    }
}

impl OperatorConfig for SensorHealthConfig {
    fn state_scopes(&self, _input: &SchemaRef) -> Vec<crate::partitioning::StateScope> {
        vec![crate::partitioning::StateScope::Keys(self.key.clone())]
    }

    fn passes_through(&self, input: &SchemaRef, port: usize) -> Vec<String> {
        match port {
            2 => self.key.iter().chain(&self.keep).cloned().collect(),
            _ => crate::partitioning::unchanged_columns(self.plan(input), input, port),
        }
    }

    fn plan(&self, input: &SchemaRef) -> Result<Vec<OutputSpec>, Vec<PlanError>> {
        self.check(input).map(|p| p.outputs)
    }

    fn build(&self, input: &SchemaRef, ctx: &BuildContext) -> Result<Box<dyn Operator>, Vec<PlanError>> {
        let Plan { time, ident, values, outputs } = self.check(input)?;
        let converter = |cols: &[usize], key: &str| {
            RowConverter::new(cols.iter().map(|&i| SortField::new(input.field(i).data_type().clone())).collect())
                .map_err(|e| vec![PlanError::new(key, e.to_string())])
        };
        let m = &ctx.metrics;
        let stage = [("stage", ctx.stage.as_str())];
        let status = |s: &'static str| {
            m.counter(
                "citystream_sensor_health_changes_total",
                "Devices that became stuck, silent or ok again.",
                &[("stage", ctx.stage.as_str()), ("status", s)],
            )
        };
        Ok(Box::new(SensorHealth {
            outputs,
            time,
            keys: self.key.len(),
            key_converter: converter(&ident[..self.key.len()], "key")?,
            ident_converter: converter(&ident, "key")?,
            values_converter: converter(&values, "values")?,
            ident,
            values,
            stuck_after: self.stuck_after,
            horizons: Horizons::new(self),
            last_wm: i64::MIN,
            hasher: KeyHash::random(),
            devices: HashMap::default(),
            changes: [status("stuck"), status("silent"), status("ok")],
            withheld: m.counter(
                "citystream_sensor_health_withheld_total",
                "Readings of stuck devices withheld.",
                &stage,
            ),
            held: m.gauge("citystream_sensor_health_devices", "Devices a sensor_health stage remembers.", &stage),
        }))
    }
}

/// What a device is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Status {
    Ok = 0,
    Stuck = 1,
    Silent = 2,
}

impl Status {
    fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Stuck => "stuck",
            Status::Silent => "silent",
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        [Status::Ok, Status::Stuck, Status::Silent].into_iter().find(|s| *s as u8 == v)
    }
}

/// One device's state.
#[derive(Debug, Clone)]
struct Device {
    /// Its key and kept columns, from its latest row.
    ident: OwnedRow,
    /// A hash of its latest reading's values (`None`: all zero or null, which never repeats
    /// into a fault).
    values: Option<u128>,
    /// Readings in a row with those values.
    run: u32,
    /// Readings since it was first heard (or heard again after being forgotten), at most
    /// `u32::MAX`.
    count: u32,
    status: Status,
    /// Its latest reading's event time.
    last_ts: i64,
}

/// A change of status, waiting to be written as a `health` row.
struct Change {
    ident: OwnedRow,
    ts: i64,
    status: Status,
    run: u32,
}

/// The `sensor_health` operator.
pub struct SensorHealth {
    outputs: Vec<OutputSpec>,
    time: usize,
    keys: usize,
    ident: Vec<usize>,
    values: Vec<usize>,
    key_converter: RowConverter,
    ident_converter: RowConverter,
    values_converter: RowConverter,
    stuck_after: u32,
    horizons: Horizons,
    /// The last input watermark: a row at or before it (which `decode` never lets through)
    /// passes on without touching any device.
    last_wm: i64,
    hasher: KeyHash,
    devices: HashMap<u128, Device, HashedKeys>,
    changes: [Counter; 3],
    withheld: Counter,
    held: Gauge,
}

/// When devices fall silent and are forgotten.
#[derive(Debug, Clone, Copy)]
struct Horizons {
    silent: Option<i64>,
    /// After its last reading, a device that has sent `min_readings` is forgotten this late…
    forget: i64,
    /// …and one that has not, this late.
    forget_unheard: i64,
    min_readings: u32,
}

impl Horizons {
    fn new(cfg: &SensorHealthConfig) -> Self {
        let silent = cfg.silent_after.map(|d| d.as_millis_i64());
        let forget_after = cfg.forget_after.as_millis_i64();
        Horizons {
            silent,
            forget: silent.unwrap_or(0).saturating_add(forget_after),
            forget_unheard: silent.unwrap_or(forget_after),
            min_readings: cfg.min_readings,
        }
    }
}

impl Device {
    /// Makes the device silent when a reading (or a watermark just before it) at `t` comes
    /// more than `silent` after its last one; the change, at its last reading plus `silent`.
    /// A device that has sent fewer than `min_readings` readings is never reported silent.
    fn fall_silent(&mut self, h: Horizons, t: i64) -> Option<Change> {
        let at = self.last_ts.saturating_add(h.silent?);
        if self.status == Status::Silent || at >= t || self.count < h.min_readings {
            return None;
        }
        self.status = Status::Silent;
        // a device back from silence starts a new run
        self.values = None;
        self.run = 0;
        Some(Change { ident: self.ident.clone(), ts: at, status: Status::Silent, run: 0 })
    }

    /// Whether the device is forgotten by time `t` (a reading's, or just past a watermark).
    fn forgotten_by(&self, h: Horizons, t: i64) -> bool {
        let after = if self.count < h.min_readings { h.forget_unheard } else { h.forget };
        self.last_ts.saturating_add(after) < t
    }
}

impl SensorHealth {
    fn health_rows(&self, changes: Vec<Change>) -> Result<RecordBatch, OperatorError> {
        let mut cols: Vec<ArrayRef> = self.ident_converter.convert_rows(changes.iter().map(|c| c.ident.row()))?;
        cols.push(Arc::new(
            TimestampMillisecondArray::from_iter_values(changes.iter().map(|c| c.ts)).with_timezone("UTC"),
        ));
        cols.push(Arc::new(StringArray::from_iter_values(changes.iter().map(|c| c.status.name()))));
        cols.push(Arc::new(Float64Array::from_iter_values(
            changes.iter().map(|c| if c.status == Status::Ok { 0.0 } else { 1.0 }),
        )));
        cols.push(Arc::new(UInt32Array::from_iter_values(changes.iter().map(|c| c.run))));
        for c in &changes {
            self.changes[c.status as usize].inc();
        }
        Ok(RecordBatch::try_new(self.outputs[2].schema.clone(), cols)?)
    }

    /// Per row, whether its values are all zero or null (numbers cast once per batch; a
    /// column of another type counts only its nulls).
    fn all_zero(values: &[ArrayRef], rows: usize) -> Vec<bool> {
        let mut zero = vec![true; rows];
        for a in values {
            let numbers = a.data_type().is_numeric().then(|| as_f64(a).ok()).flatten();
            for (row, z) in zero.iter_mut().enumerate() {
                *z &= a.is_null(row) || numbers.as_ref().is_some_and(|(v, _)| v[row] == 0.0);
            }
        }
        zero
    }
}

impl Operator for SensorHealth {
    fn kind(&self) -> &'static str {
        "sensor_health"
    }

    fn outputs(&self) -> &[OutputSpec] {
        &self.outputs
    }

    fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<(), OperatorError> {
        let n = batch.num_rows();
        let ts = times(&batch, self.time);
        let ident_cols: Vec<ArrayRef> = self.ident.iter().map(|&i| batch.column(i).clone()).collect();
        let value_cols: Vec<ArrayRef> = self.values.iter().map(|&i| batch.column(i).clone()).collect();
        // the key alone decides the device; the kept columns ride along
        let key_rows = self.key_converter.convert_columns(&ident_cols[..self.keys])?;
        let idents = self.ident_converter.convert_columns(&ident_cols)?;
        let h = self.horizons;
        let readings = self.values_converter.convert_columns(&value_cols)?;
        let zero = Self::all_zero(&value_cols, n);
        let mut healthy = Vec::with_capacity(n);
        let mut changes = Vec::new();
        for (row, &t) in ts.iter().enumerate() {
            if t <= self.last_wm {
                // behind the watermark (or without a time): nothing to judge a device by
                healthy.push(true);
                continue;
            }
            let key = self.hasher.hash(key_rows.row(row).as_ref());
            let values = (!zero[row]).then(|| self.hasher.hash(readings.row(row).as_ref()));
            if let Some(d) = self.devices.get_mut(&key) {
                // silent or forgotten since its last reading, though no watermark said so yet
                if let Some(change) = d.fall_silent(h, t) {
                    changes.push(change);
                }
                if d.forgotten_by(h, t) {
                    self.devices.remove(&key);
                }
            }
            let d = self.devices.entry(key).or_insert_with(|| Device {
                ident: idents.row(row).owned(),
                values: None,
                run: 0,
                count: 0,
                status: Status::Ok,
                last_ts: t,
            });
            // the kept columns from the latest row (copied only when they changed)
            if d.ident.row() != idents.row(row) {
                d.ident = idents.row(row).owned();
            }
            d.last_ts = d.last_ts.max(t);
            d.count = d.count.saturating_add(1);
            d.run = if values.is_some() && values == d.values { d.run.saturating_add(1) } else { 1 };
            d.values = values;
            let stuck = values.is_some() && d.run >= self.stuck_after;
            let now = if stuck { Status::Stuck } else { Status::Ok };
            if now != d.status {
                d.status = now;
                changes.push(Change { ident: d.ident.clone(), ts: t, status: now, run: d.run });
            }
            healthy.push(!stuck);
        }
        let keep = BooleanArray::from(healthy);
        let withheld = keep.false_count();
        if withheld == 0 {
            out.emit(0, batch);
        } else {
            self.withheld.inc_by(withheld as u64);
            out.emit(0, filter_record_batch(&batch, &keep)?);
            out.emit(1, filter_record_batch(&batch, &arrow::compute::not(&keep)?)?);
        }
        if !changes.is_empty() {
            out.emit(2, self.health_rows(changes)?);
        }
        self.held.set(self.devices.len() as f64);
        Ok(())
    }

    fn on_watermark(&mut self, watermark: i64, out: &mut Collector) -> Result<(), OperatorError> {
        // a reading after the watermark lies after it: silence up to it is final
        self.last_wm = self.last_wm.max(watermark);
        let (h, next) = (self.horizons, watermark.saturating_add(1));
        let mut changes: Vec<Change> = self.devices.values_mut().filter_map(|d| d.fall_silent(h, next)).collect();
        self.devices.retain(|_, d| !d.forgotten_by(h, next));
        if !changes.is_empty() {
            // the same rows in the same order on every run, whatever the map's order
            changes.sort_by(|a, b| (a.ts, a.ident.row()).cmp(&(b.ts, b.ident.row())));
            out.emit(2, self.health_rows(changes)?);
        }
        self.held.set(self.devices.len() as f64);
        Ok(())
    }

    fn is_stateful(&self) -> bool {
        true
    }

    fn snapshot(&self) -> Result<Option<RecordBatch>, OperatorError> {
        let mut devices: Vec<(&u128, &Device)> = self.devices.iter().collect();
        devices.sort_unstable_by_key(|(k, _)| **k);
        let mut cols: Vec<ArrayRef> = self.ident_converter.convert_rows(devices.iter().map(|(_, d)| d.ident.row()))?;
        let values = devices.iter().map(|(_, d)| d.values.unwrap_or(0).to_le_bytes());
        cols.push(Arc::new(
            FixedSizeBinaryArray::try_from_iter(values).unwrap_or_else(|_| FixedSizeBinaryArray::new_null(16, 0)),
        ));
        cols.push(Arc::new(BooleanArray::from_iter(devices.iter().map(|(_, d)| Some(d.values.is_some())))));
        cols.push(Arc::new(UInt32Array::from_iter_values(devices.iter().map(|(_, d)| d.run))));
        cols.push(Arc::new(UInt32Array::from_iter_values(devices.iter().map(|(_, d)| d.count))));
        cols.push(Arc::new(UInt8Array::from_iter_values(devices.iter().map(|(_, d)| d.status as u8))));
        cols.push(Arc::new(Int64Array::from_iter_values(devices.iter().map(|(_, d)| d.last_ts))));
        let metadata = [self.hasher.metadata(), (WATERMARK.to_owned(), self.last_wm.to_string())];
        let schema = self.state_schema().as_ref().clone().with_metadata(metadata.into());
        Ok(Some(RecordBatch::try_new(Arc::new(schema), cols)?))
    }

    fn restore(&mut self, state: RecordBatch) -> Result<(), OperatorError> {
        let bad = |detail: String| OperatorError::State { operator: "sensor_health", detail };
        if state.schema_ref().fields() != self.state_schema().fields() {
            return Err(bad(format!("unexpected state schema {:?}", state.schema())));
        }
        let Some(hasher) = KeyHash::from_snapshot("sensor_health", &state)? else { return Ok(()) };
        self.hasher = hasher;
        self.last_wm = match state.schema_ref().metadata().get(WATERMARK) {
            Some(w) => w.parse().map_err(|_| bad(format!("watermark `{w}` is not a number")))?,
            None => i64::MIN,
        };
        let k = self.ident.len();
        let idents = self.ident_converter.convert_columns(&state.columns()[..k])?;
        let key_rows = self.key_converter.convert_columns(&state.columns()[..self.keys])?;
        let values = state.column(k).as_fixed_size_binary();
        let has_values = state.column(k + 1).as_boolean();
        let runs = state.column(k + 2).as_primitive::<arrow::datatypes::UInt32Type>();
        let counts = state.column(k + 3).as_primitive::<arrow::datatypes::UInt32Type>();
        let statuses = state.column(k + 4).as_primitive::<arrow::datatypes::UInt8Type>();
        let last = state.column(k + 5).as_primitive::<arrow::datatypes::Int64Type>();
        self.devices.clear();
        for i in 0..state.num_rows() {
            let v = u128::from_le_bytes(
                values.value(i).try_into().map_err(|_| bad("a value hash is not 16 bytes".into()))?,
            );
            let status = Status::from_u8(statuses.value(i))
                .ok_or_else(|| bad(format!("unknown status {}", statuses.value(i))))?;
            self.devices.insert(
                self.hasher.hash(key_rows.row(i).as_ref()),
                Device {
                    ident: idents.row(i).owned(),
                    values: has_values.value(i).then_some(v),
                    run: runs.value(i),
                    count: counts.value(i),
                    status,
                    last_ts: last.value(i),
                },
            );
        }
        self.held.set(self.devices.len() as f64);
        Ok(())
    }
}

impl SensorHealth {
    /// The snapshot's schema: the key and kept columns, then the device's state.
    fn state_schema(&self) -> SchemaRef {
        let health = &self.outputs[2].schema;
        let mut fields: Vec<Field> = health.fields()[..self.ident.len()].iter().map(|f| f.as_ref().clone()).collect();
        fields.extend([
            Field::new("values_hash", DataType::FixedSizeBinary(16), false),
            Field::new("has_values", DataType::Boolean, false),
            Field::new("run", DataType::UInt32, false),
            Field::new("count", DataType::UInt32, false),
            Field::new("status", DataType::UInt8, false),
            Field::new("last_ts", DataType::Int64, false),
        ]);
        Arc::new(Schema::new(fields))
    }
}
