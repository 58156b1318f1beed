//! `admit`: admission control with rate limits (GCRA, from `governor`) per stream and per key,
//! so that one faulty sensor flooding the bus cannot starve the rest.
//!
//! Limits are written `N/s`, `N/m` or `N/h` with an optional `burst` (default: one period's
//! worth, at least 1). The clock is the stream's **event time** by default — the newest event
//! time seen — so a limit means "events per second of the sensor's own time" whatever the
//! replay speed; `processing_time` uses the wall clock instead.
//!
//! Policies for rows over a limit:
//! - `drop`: to the `dead_letters` output with reason code `rate_limited`, the limit that was
//!   exceeded, and the row as JSON for a payload;
//! - `flag`: passed on with `rate_limited = true` in an added column;
//! - `delay`: held until the limit allows it (processing time only; the wait backpressures
//!   the upstream, nothing is dropped).
//!
//! Per key the limit is GCRA (the generic cell rate algorithm) with one "theoretical arrival
//! time" per active key, on the key's own event times: a row is judged by its `ts` against the
//! key's earlier rows only, so the same rows of a key give the same verdicts however the
//! partitions of a stream were interleaved (a backlog, a restart: the cells are snapshotted).
//! A key whose bucket is full again by the watermark is forgotten (no later row could tell).
//! The stream-wide limit sees every key, so its verdicts follow the arrival order. Per-key
//! state: a 16-byte key and a 16-byte time per active key.

use crate::LiveChangeError;
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{ArrayRef, AsArray, BooleanArray, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use citystream_schemas::dead_letter::{DeadLetterBuilder, Position};
use citystream_schemas::{Reason, ReasonCode};
use governor::clock::FakeRelativeClock;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use serde::Deserialize;

use crate::common::{HashedKeys, KeyEncoder, KeyHash, columns, time_column, times};
use crate::{BuildContext, Collector, Counter, Operator, OperatorConfig, OperatorError, OutputSpec, PlanError};

/// A rate: `N/s`, `N/m` or `N/h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Events per period.
    pub n: u32,
    /// The period in milliseconds.
    pub per_ms: u64,
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid rate `{s}`: expected `N/s`, `N/m` or `N/h` with N > 0 (e.g. `10/s`)");
        let (n, unit) = s.split_once('/').ok_or_else(bad)?;
        let n: u32 = n.trim().parse().map_err(|_| bad())?;
        let per_ms = match unit.trim() {
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return Err(bad()),
        };
        if n == 0 {
            return Err(bad());
        }
        Ok(Rate { n, per_ms })
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.per_ms {
            1000 => "s",
            60_000 => "m",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.n)
    }
}

/// A limit: a rate and a burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    /// The sustained rate.
    pub rate: Rate,
    /// Events allowed at once. Default: the rate's `N`.
    #[serde(default)]
    pub burst: Option<u32>,
}

impl Limit {
    fn quota(&self) -> Quota {
        let period = std::time::Duration::from_nanos(self.rate.per_ms * 1_000_000 / u64::from(self.rate.n));
        let burst = NonZeroU32::new(self.burst.unwrap_or(self.rate.n).max(1)).expect("at least 1");
        Quota::with_period(period.max(std::time::Duration::from_nanos(1))).expect("positive period").allow_burst(burst)
    }
}

/// A per-key limit.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyLimit {
    /// The key columns (e.g. `[sensor_id]`).
    pub key: Vec<String>,
    /// The sustained rate per key.
    pub rate: Rate,
    /// Events allowed at once per key. Default: the rate's `N`.
    #[serde(default)]
    pub burst: Option<u32>,
}

/// What happens to rows over a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// To `dead_letters` with the reason.
    Drop,
    /// Passed on with `rate_limited = true`.
    Flag,
    /// Held until allowed (processing time only).
    Delay,
}

/// Which clock limits are measured against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClockKind {
    /// The newest event time seen.
    #[default]
    EventTime,
    /// The wall clock.
    ProcessingTime,
}

fn d_time() -> String {
    "ts".into()
}

/// YAML of an `admit` stage.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmitConfig {
    /// A limit on the whole stream. Live-tunable.
    #[serde(default)]
    pub per_stream: Option<Limit>,
    /// A limit per key. The rate and burst are live-tunable.
    #[serde(default)]
    pub per_key: Option<KeyLimit>,
    /// What happens to rows over a limit.
    pub policy: Policy,
    /// The clock. Default `event_time`.
    #[serde(default)]
    pub clock: ClockKind,
    /// The event-time column. Default `ts`.
    #[serde(default = "d_time")]
    pub time_column: String,
    /// Bytes of each dropped row kept as its dead-letter payload (JSON). Default 4096.
    #[serde(default = "d_payload")]
    pub max_payload_bytes: usize,
}

fn d_payload() -> usize {
    4096
}

impl AdmitConfig {
    /// Rates and bursts change live; the policy, clock and key columns do not.
    pub fn live_change(&self, new: &Self) -> Result<(), LiveChangeError> {
        let same_shape = new.policy == self.policy
            && new.clock == self.clock
            && new.time_column == self.time_column
            && new.per_stream.is_some() == self.per_stream.is_some()
            && new.per_key.as_ref().map(|k| &k.key) == self.per_key.as_ref().map(|k| &k.key);
        if same_shape {
            Ok(())
        } else {
            Err(LiveChangeError::NeedsRestart(
                "rates and bursts of an admit stage change live; adding or removing a limit, its key, \
                 the policy or the clock need a restart",
            ))
        }
    }

    fn check(&self, input: &SchemaRef) -> Result<(usize, Vec<usize>, Vec<OutputSpec>), Vec<PlanError>> {
        let mut errs = Vec::new();
        let time = time_column(input, &self.time_column, "time_column").map_err(|e| errs.push(e)).ok();
        let mut keys = Vec::new();
        if let Some(k) = &self.per_key {
            if k.key.is_empty() {
                errs.push(PlanError::new("per_key.key", "name at least one key column"));
            }
            keys = columns(input, &k.key, "per_key.key", &mut errs);
        }
        if self.per_stream.is_none() && self.per_key.is_none() {
            errs.push(
                PlanError::new("per_key", "an admit stage needs `per_stream` and/or `per_key`")
                    .with_help("e.g. per_key: {key: [sensor_id], rate: 2/s}"),
            );
        }
        if self.policy == Policy::Delay && self.clock == ClockKind::EventTime {
            errs.push(
                PlanError::new("policy", "`delay` waits on the wall clock, but this stage's clock is event time")
                    .with_help("use `clock: processing_time` with `delay`, or the `drop` or `flag` policy"),
            );
        }
        let mut outputs = vec![];
        match self.policy {
            Policy::Flag => {
                let mut fields: Vec<Field> = input.fields().iter().map(|f| f.as_ref().clone()).collect();
                if input.index_of("rate_limited").is_ok() {
                    errs.push(PlanError::new("policy", "the input already has a `rate_limited` column"));
                }
                fields.push(Field::new("rate_limited", DataType::Boolean, false));
                outputs.push(OutputSpec::new("main", Arc::new(Schema::new(fields))));
            }
            Policy::Drop => {
                outputs.push(OutputSpec::new("main", input.clone()));
                outputs.push(OutputSpec::new("dead_letters", citystream_schemas::dead_letter::schema()));
            }
            Policy::Delay => outputs.push(OutputSpec::new("main", input.clone())),
        }
        match (time, errs.is_empty()) {
            (Some(t), true) => Ok((t, keys, outputs)),
            _ => Err(errs),
        }
    }
}

type Mw = governor::middleware::NoOpMiddleware<governor::nanos::Nanos>;
type Direct = RateLimiter<NotKeyed, InMemoryState, FakeRelativeClock, Mw>;

/// GCRA per key on a clock the caller gives with each check (event time: the row's own).
#[derive(Debug, Clone)]
struct KeyedGcra {
    /// Time between conforming rows, ns.
    interval: i128,
    /// How far ahead of its time a key's next row may come (burst − 1 intervals), ns.
    tolerance: i128,
    /// Theoretical arrival time per key, ns.
    tat: HashMap<u128, i128, HashedKeys>,
}

impl KeyedGcra {
    fn new(limit: Limit) -> Self {
        let interval = i128::from(limit.rate.per_ms) * 1_000_000 / i128::from(limit.rate.n.max(1));
        let burst = i128::from(limit.burst.unwrap_or(limit.rate.n).max(1));
        Self { interval: interval.max(1), tolerance: (burst - 1) * interval.max(1), tat: HashMap::default() }
    }

    /// Whether a row of `key` at `t_ms` conforms; a conforming row takes its place.
    fn check(&mut self, key: u128, t_ms: i64) -> bool {
        let t = i128::from(t_ms) * 1_000_000;
        let tat = self.tat.get(&key).copied().unwrap_or(t);
        if t < tat - self.tolerance {
            return false;
        }
        self.tat.insert(key, tat.max(t) + self.interval);
        true
    }

    /// Forgets keys whose bucket is full at `t_ms`: for any later row they read as absent.
    fn forget_full(&mut self, t_ms: i64) {
        let t = i128::from(t_ms) * 1_000_000;
        self.tat.retain(|_, tat| *tat > t);
        if self.tat.capacity() > 4 * self.tat.len().max(1024) {
            self.tat.shrink_to_fit();
        }
    }
}

impl OperatorConfig for AdmitConfig {
    fn state_scopes(&self, _input: &SchemaRef) -> Vec<crate::partitioning::StateScope> {
        let mut s = Vec::new();
        if self.per_stream.is_some() {
            s.push(crate::partitioning::StateScope::City("`per_stream` limits the whole stream's rate".into()));
        }
        if let Some(k) = &self.per_key {
            s.push(crate::partitioning::StateScope::Keys(k.key.clone()));
        }
        s
    }

    fn plan(&self, input: &SchemaRef) -> Result<Vec<OutputSpec>, Vec<PlanError>> {
        self.check(input).map(|(_, _, o)| o)
    }

    fn build(&self, input: &SchemaRef, ctx: &BuildContext) -> Result<Box<dyn Operator>, Vec<PlanError>> {
        let (time, keys, outputs) = self.check(input)?;
        let encoder = if keys.is_empty() {
            None
        } else {
            Some(KeyEncoder::new(input, keys).map_err(|e| vec![PlanError::new("per_key", e.to_string())])?)
        };
        let clock = FakeRelativeClock::default();
        let m = &ctx.metrics;
        let policy = match self.policy {
            Policy::Drop => "drop",
            Policy::Flag => "flag",
            Policy::Delay => "delay",
        };
        let l = |limit: &'static str| [("stage", ctx.stage.as_str()), ("limit", limit), ("policy", policy)];
        Ok(Box::new(Admit {
            stage: ctx.stage.clone(),
            outputs,
            time,
            encoder,
            hasher: KeyHash::random(),
            policy: self.policy,
            clock_kind: self.clock,
            started: Instant::now(),
            clock_ms: 0,
            epoch_ms: None,
            stream: self.per_stream.map(|l| (l, Direct::direct_with_clock(l.quota(), clock.clone()))),
            keyed: self.per_key.as_ref().map(|k| {
                let lim = Limit { rate: k.rate, burst: k.burst };
                (lim, KeyedGcra::new(lim))
            }),
            keys_gauge: m.gauge(
                "citystream_admit_keys",
                "Keys an admit stage holds a rate cell for.",
                &[("stage", ctx.stage.as_str())],
            ),
            clock,
            max_payload: self.max_payload_bytes,
            over: [
                m.counter(
                    "citystream_admit_over_limit_total",
                    "Rows over a rate limit, per limit and policy.",
                    &l("stream"),
                ),
                m.counter(
                    "citystream_admit_over_limit_total",
                    "Rows over a rate limit, per limit and policy.",
                    &l("key"),
                ),
            ],
            admitted: m.counter(
                "citystream_admit_rows_total",
                "Rows admitted within limits.",
                &[("stage", ctx.stage.as_str())],
            ),
            delayed_ns: m.counter(
                "citystream_admit_delay_nanoseconds_total",
                "Time spent holding rows under the delay policy.",
                &[("stage", ctx.stage.as_str())],
            ),
        }))
    }
}

/// The `admit` operator (see the module docs).
pub struct Admit {
    stage: String,
    outputs: Vec<OutputSpec>,
    time: usize,
    encoder: Option<KeyEncoder>,
    /// hashes per-key cells' keys (random per operator, kept in the snapshot)
    hasher: KeyHash,
    policy: Policy,
    clock_kind: ClockKind,
    started: Instant,
    /// the clock's reading, ms since `epoch_ms`
    clock_ms: u64,
    /// event time at which the clock reads 0
    epoch_ms: Option<i64>,
    clock: FakeRelativeClock,
    stream: Option<(Limit, Direct)>,
    keyed: Option<(Limit, KeyedGcra)>,
    keys_gauge: crate::Gauge,
    max_payload: usize,
    over: [Counter; 2],
    admitted: Counter,
    delayed_ns: Counter,
}

impl std::fmt::Debug for Admit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admit").field("stage", &self.stage).field("policy", &self.policy).finish_non_exhaustive()
    }
}

impl Admit {
    /// Moves the clock forward to `ms` (since the epoch); never backward.
    fn advance_to(&mut self, ms: u64) {
        if ms > self.clock_ms {
            self.clock.advance(std::time::Duration::from_millis(ms - self.clock_ms));
            self.clock_ms = ms;
        }
    }

    fn tick(&mut self, event_ms: i64) {
        match self.clock_kind {
            ClockKind::EventTime => {
                let epoch = *self.epoch_ms.get_or_insert(event_ms);
                self.advance_to(event_ms.saturating_sub(epoch).max(0) as u64);
            }
            ClockKind::ProcessingTime => self.advance_to(self.started.elapsed().as_millis() as u64),
        }
    }

    /// The per-key clock for a row at event time `event_ms`.
    fn key_time(&self, event_ms: i64) -> i64 {
        match self.clock_kind {
            ClockKind::EventTime => event_ms,
            ClockKind::ProcessingTime => self.started.elapsed().as_millis() as i64,
        }
    }

    /// Which limit a row of `key` at `event_ms` exceeds now, if any (0 = stream, 1 = key).
    fn over_limit(&mut self, key: Option<u128>, event_ms: i64) -> Option<usize> {
        let t = self.key_time(event_ms);
        if let (Some((_, k)), Some(key)) = (&mut self.keyed, key)
            && !k.check(key, t)
        {
            return Some(1);
        }
        if let Some((_, s)) = &self.stream
            && s.check().is_err()
        {
            return Some(0);
        }
        None
    }

    fn limit_text(&self, which: usize) -> String {
        match which {
            0 => format!("the stream limit {}", self.stream.as_ref().expect("set").0.rate),
            _ => format!("the per-key limit {}", self.keyed.as_ref().expect("set").0.rate),
        }
    }
}

impl Operator for Admit {
    /// `delay` sleeps until the rate allows a row.
    fn waits(&self) -> bool {
        self.policy == Policy::Delay
    }

    fn kind(&self) -> &'static str {
        "admit"
    }

    fn outputs(&self) -> &[OutputSpec] {
        &self.outputs
    }

    fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<(), OperatorError> {
        let n = batch.num_rows();
        let ts = times(&batch, self.time);
        let keys: Option<Vec<u128>> = match &self.encoder {
            Some(e) => {
                let rows = e.encode(&batch)?;
                Some((0..n).map(|i| self.hasher.hash(rows.row(i).as_ref())).collect())
            }
            None => None,
        };
        let mut ok = Vec::with_capacity(n);
        let mut reasons: Vec<(usize, usize)> = Vec::new();
        for i in 0..n {
            self.tick(ts[i]);
            let key = keys.as_ref().map(|k| k[i]);
            let mut over = self.over_limit(key, ts[i]);
            if self.policy == Policy::Delay {
                let t0 = Instant::now();
                while over.is_some() {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    self.tick(ts[i]);
                    over = self.over_limit(key, ts[i]);
                }
                self.delayed_ns.inc_by(t0.elapsed().as_nanos() as u64);
            }
            match over {
                None => ok.push(true),
                Some(w) => {
                    self.over[w].inc();
                    ok.push(false);
                    reasons.push((i, w));
                }
            }
        }
        self.admitted.inc_by(ok.iter().filter(|o| **o).count() as u64);
        match self.policy {
            Policy::Delay => out.emit(0, batch),
            Policy::Flag => {
                let flags: BooleanArray = ok.iter().map(|o| Some(!o)).collect();
                let mut cols: Vec<ArrayRef> = batch.columns().to_vec();
                cols.push(Arc::new(flags));
                out.emit(0, RecordBatch::try_new(self.outputs[0].schema.clone(), cols)?);
            }
            Policy::Drop => {
                if reasons.is_empty() {
                    out.emit(0, batch);
                    return Ok(());
                }
                out.emit(0, filter_record_batch(&batch, &BooleanArray::from(ok.clone()))?);
                let dropped =
                    filter_record_batch(&batch, &BooleanArray::from(ok.iter().map(|o| !o).collect::<Vec<_>>()))?;
                let mut json = arrow::json::LineDelimitedWriter::new(Vec::new());
                json.write(&dropped)?;
                json.finish()?;
                let text = json.into_inner();
                let partition = batch
                    .column_by_name("src_partition")
                    .map(|c| c.as_primitive::<arrow::datatypes::Int32Type>().clone());
                let offset =
                    batch.column_by_name("src_offset").map(|c| c.as_primitive::<arrow::datatypes::Int64Type>().clone());
                let mut dl = DeadLetterBuilder::new(self.max_payload);
                for ((i, w), line) in reasons.iter().zip(text.split(|b| *b == b'\n')) {
                    // a decoded row no longer knows when it arrived: its event time stands in
                    // (the same on every replay, unlike the wall clock)
                    let pos = Position {
                        source: &self.stage,
                        partition: partition.as_ref().map_or(-1, |p| p.value(*i)),
                        offset: offset.as_ref().map_or(-1, |o| o.value(*i)),
                        received_at_ms: ts[*i],
                    };
                    let reason = Reason::new(ReasonCode::RateLimited, format!("over {}", self.limit_text(*w)));
                    dl.append(pos, "admit", &reason, line);
                }
                out.emit(1, dl.finish());
            }
        }
        Ok(())
    }

    fn on_watermark(&mut self, watermark: i64, _out: &mut Collector) -> Result<(), OperatorError> {
        if let Some((_, k)) = &mut self.keyed {
            // later rows come after the watermark (event time) or now (processing time)
            let now = match self.clock_kind {
                ClockKind::EventTime => watermark,
                ClockKind::ProcessingTime => self.started.elapsed().as_millis() as i64,
            };
            k.forget_full(now);
            self.keys_gauge.set(k.tat.len() as f64);
        }
        Ok(())
    }

    fn retune(&mut self, new: &dyn std::any::Any) -> Result<(), LiveChangeError> {
        let new = new.downcast_ref::<AdmitConfig>().ok_or(LiveChangeError::WrongConfig("admit"))?;
        // new limiters start full: a retune never punishes rows for the old limit's debt
        if let (Some((l, s)), Some(nl)) = (&mut self.stream, new.per_stream)
            && *l != nl
        {
            *l = nl;
            *s = Direct::direct_with_clock(nl.quota(), self.clock.clone());
        }
        if let (Some((l, k)), Some(nk)) = (&mut self.keyed, &new.per_key) {
            let nl = Limit { rate: nk.rate, burst: nk.burst };
            if *l != nl {
                *l = nl;
                *k = KeyedGcra::new(nl);
            }
        }
        Ok(())
    }

    /// Per-key cells on event time are state: a restore gives the same verdicts as an
    /// uninterrupted run. (The stream-wide limit and the processing-time clock restart full.)
    fn is_stateful(&self) -> bool {
        self.keyed.is_some() && self.clock_kind == ClockKind::EventTime
    }

    fn snapshot(&self) -> Result<Option<RecordBatch>, OperatorError> {
        let Some((_, k)) = &self.keyed else { return Ok(None) };
        let mut cells: Vec<(&u128, &i128)> = k.tat.iter().collect();
        cells.sort_unstable();
        let keys = arrow::array::FixedSizeBinaryArray::try_from_iter(cells.iter().map(|(key, _)| key.to_le_bytes()))
            .unwrap_or_else(|_| arrow::array::FixedSizeBinaryArray::new_null(16, 0));
        let tats = arrow::array::FixedSizeBinaryArray::try_from_iter(cells.iter().map(|(_, t)| t.to_le_bytes()))
            .unwrap_or_else(|_| arrow::array::FixedSizeBinaryArray::new_null(16, 0));
        let schema = Arc::new(admit_state_schema().as_ref().clone().with_metadata([self.hasher.metadata()].into()));
        Ok(Some(RecordBatch::try_new(schema, vec![Arc::new(keys), Arc::new(tats)])?))
    }

    fn restore(&mut self, state: RecordBatch) -> Result<(), OperatorError> {
        if state.schema_ref().fields() != admit_state_schema().fields() {
            return Err(OperatorError::State {
                operator: "admit",
                detail: format!("unexpected state schema {:?}", state.schema()),
            });
        }
        let Some(hasher) = KeyHash::from_snapshot("admit", &state)? else { return Ok(()) };
        self.hasher = hasher;
        let Some((_, k)) = &mut self.keyed else { return Ok(()) };
        let bad = || OperatorError::State { operator: "admit", detail: "a cell is not 16 bytes".into() };
        let (keys, tats) = (state.column(0).as_fixed_size_binary(), state.column(1).as_fixed_size_binary());
        k.tat.clear();
        for i in 0..state.num_rows() {
            let key = u128::from_le_bytes(keys.value(i).try_into().map_err(|_| bad())?);
            let tat = i128::from_le_bytes(tats.value(i).try_into().map_err(|_| bad())?);
            k.tat.insert(key, tat);
        }
        Ok(())
    }
}

fn admit_state_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("key", DataType::FixedSizeBinary(16), false),
        Field::new("tat_ns", DataType::FixedSizeBinary(16), false),
    ]))
}
