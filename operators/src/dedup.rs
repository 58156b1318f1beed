//! `dedup`: removes duplicate events within an event-time horizon.
//!
//! - **Exact**: a row whose `id_column` (default `event_id`) was already seen.
//! - **Content**: a row equal, on the content columns, to one already seen — the same reading
//!   re-sent by a redundant gateway under a new `event_id`. By default the content columns
//!   are every column except the id and the source position (`src_partition`, `src_offset`):
//!   same device, same `ts`, same values.
//!
//! The first arrival is kept. Keys are keyed 128-bit hashes (SipHash-1-3, a random hash key per
//! operator kept in its snapshot) of the id bytes or of the row in Arrow's row format, so a
//! false match between distinct events has probability below 1e-20 even for a billion keys
//! held at once, and a producer cannot craft ids that collide. A key is kept while its event time is within
//! `horizon` of the watermark, then evicted; a row older than that can no longer be checked and
//! goes to the `late_events` output instead of passing unchecked. State is about 16 bytes of
//! key, 8 of event time and hash-table overhead per key per mode (see [`Dedup::state_bytes`]).

use crate::LiveChangeError;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{Array, AsArray, BooleanArray, Int64Array, RecordBatch, UInt8Array, UInt64Array};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef, UInt8Type, UInt64Type};
use serde::Deserialize;

use crate::common::{HashedKeys, KeyEncoder, KeyHash, column, columns, time_column, times};
use crate::partitioning::StateScope;
use crate::{
    BuildContext, Collector, Counter, Duration, Gauge, Operator, OperatorConfig, OperatorError, OutputSpec, PlanError,
};

/// Which columns make two readings "the same content".
#[derive(Debug, Clone, PartialEq)]
pub enum ContentSpec {
    /// `auto` (every column but the id and the source position) or `off`.
    Named(String),
    /// These columns.
    Columns(Vec<String>),
}

/// `auto`, `off` (YAML may read an unquoted `off` as the boolean false: accepted, as is
/// `false`), or a list of column names; anything else is refused naming these forms.
impl<'de> Deserialize<'de> for ContentSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = ContentSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("`auto`, `off`, or a list of column names")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<ContentSpec, E> {
                Ok(ContentSpec::Named(if v { "auto" } else { "off" }.into()))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ContentSpec, E> {
                Ok(ContentSpec::Named(v.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<ContentSpec, A::Error> {
                let mut cols = Vec::new();
                while let Some(c) = seq.next_element::<String>()? {
                    cols.push(c);
                }
                Ok(ContentSpec::Columns(cols))
            }
        }
        d.deserialize_any(V)
    }
}

impl Default for ContentSpec {
    fn default() -> Self {
        ContentSpec::Named("auto".into())
    }
}

fn d_id() -> Option<String> {
    Some("event_id".into())
}
fn d_time() -> String {
    "ts".into()
}

/// YAML of a `dedup` stage.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupConfig {
    /// How long (event time, behind the watermark) a key is remembered. Live-tunable.
    pub horizon: Duration,
    /// The event id column for exact deduplication; `null` to turn it off. Default `event_id`.
    #[serde(default = "d_id")]
    pub id_column: Option<String>,
    /// Content deduplication: `auto` (default), `off`, or a list of columns.
    #[serde(default)]
    pub content: ContentSpec,
    /// The event-time column. Default `ts`.
    #[serde(default = "d_time")]
    pub time_column: String,
    /// Exact deduplication matches ids only among rows with equal values of these columns
    /// (e.g. `[segment_id]`: ids are unique per segment). Its state is then per these
    /// columns, which lets the planner prove it splits with the topic's partitions (scale-out:
    /// [`crate::partitioning`]). Default: none (ids match across the whole stream).
    #[serde(default)]
    pub within: Vec<String>,
}

/// (time column, id column, content columns, `within` columns)
type Checked = (usize, Option<usize>, Option<Vec<usize>>, Vec<usize>);

impl DedupConfig {
    /// Only `horizon` can change live.
    pub fn live_change(&self, new: &Self) -> Result<(), LiveChangeError> {
        let mut masked = new.clone();
        masked.horizon = self.horizon;
        if &masked == self {
            Ok(())
        } else {
            Err(LiveChangeError::NeedsRestart(
                "only `horizon` of a dedup can change live; the key columns shape its state",
            ))
        }
    }

    fn check(&self, input: &SchemaRef) -> Result<Checked, Vec<PlanError>> {
        let mut errs = Vec::new();
        let time = time_column(input, &self.time_column, "time_column").map_err(|e| errs.push(e)).ok();
        let id = match &self.id_column {
            None => None,
            Some(c) => match column(input, c, "id_column") {
                Ok(i) if matches!(input.field(i).data_type(), DataType::Utf8) => Some(i),
                Ok(i) => {
                    errs.push(PlanError::new(
                        "id_column",
                        format!("`{c}` is {}, not text", input.field(i).data_type()),
                    ));
                    None
                }
                Err(e) => {
                    errs.push(e);
                    None
                }
            },
        };
        let content = match &self.content {
            ContentSpec::Named(n) if n == "off" => None,
            ContentSpec::Named(n) if n == "auto" => Some(
                input
                    .fields()
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| {
                        Some(f.name()) != self.id_column.as_ref()
                            && f.name() != citystream_schemas::columns::SRC_PARTITION
                            && f.name() != citystream_schemas::columns::SRC_OFFSET
                    })
                    .map(|(i, _)| i)
                    .collect(),
            ),
            ContentSpec::Named(n) => {
                errs.push(
                    PlanError::new("content", format!("`{n}` is not a content mode"))
                        .with_help("use `auto`, `off`, or a list of columns"),
                );
                None
            }
            ContentSpec::Columns(cols) => Some(columns(input, cols, "content", &mut errs)),
        };
        if id.is_none() && content.is_none() && errs.is_empty() {
            errs.push(PlanError::new("content", "both exact (`id_column`) and content deduplication are off"));
        }
        if !self.within.is_empty() && self.id_column.is_none() {
            errs.push(PlanError::new(
                "within",
                "`within` scopes exact deduplication, which is off (`id_column: null`)",
            ));
        }
        let within = columns(input, &self.within, "within", &mut errs);
        match (time, errs.is_empty()) {
            (Some(t), true) => Ok((t, id, content, within)),
            _ => Err(errs),
        }
    }
}

impl OperatorConfig for DedupConfig {
    fn plan(&self, input: &SchemaRef) -> Result<Vec<OutputSpec>, Vec<PlanError>> {
        self.check(input)?;
        Ok(vec![OutputSpec::new("main", input.clone()), OutputSpec::new("late_events", input.clone())])
    }

    fn state_scopes(&self, input: &SchemaRef) -> Vec<StateScope> {
        let mut scopes = Vec::new();
        if let Some(id) = &self.id_column {
            scopes.push(StateScope::Keys(self.within.iter().cloned().chain([id.clone()]).collect()));
        }
        match &self.content {
            ContentSpec::Columns(c) => scopes.push(StateScope::Keys(c.clone())),
            ContentSpec::Named(n) if n == "auto" => scopes.push(StateScope::Keys(
                input
                    .fields()
                    .iter()
                    .map(|f| f.name().clone())
                    .filter(|n| {
                        Some(n) != self.id_column.as_ref()
                            && n != citystream_schemas::columns::SRC_PARTITION
                            && n != citystream_schemas::columns::SRC_OFFSET
                    })
                    .collect(),
            )),
            ContentSpec::Named(_) => {}
        }
        scopes
    }

    fn build(&self, input: &SchemaRef, ctx: &BuildContext) -> Result<Box<dyn Operator>, Vec<PlanError>> {
        let (time, id, content, within) = self.check(input)?;
        let content = content
            .map(|c| KeyEncoder::new(input, c))
            .transpose()
            .map_err(|e| vec![PlanError::new("content", e.to_string())])?;
        let within = (!within.is_empty())
            .then(|| KeyEncoder::new(input, within))
            .transpose()
            .map_err(|e| vec![PlanError::new("within", e.to_string())])?;
        let l = |mode: &'static str| [("stage", ctx.stage.as_str()), ("mode", mode)];
        let m = &ctx.metrics;
        let st = [("stage", ctx.stage.as_str())];
        Ok(Box::new(Dedup {
            outputs: vec![OutputSpec::new("main", input.clone()), OutputSpec::new("late_events", input.clone())],
            time,
            id,
            content,
            within,
            within_names: self.within.join(","),
            key_buf: Vec::new(),
            horizon: self.horizon.as_millis_i64(),
            watermark: i64::MIN,
            hasher: KeyHash::random(),
            seen: [KeySet::default(), KeySet::default()],
            removed: [
                m.counter("citystream_dedup_removed_total", "Duplicates removed, per mode.", &l("exact")),
                m.counter("citystream_dedup_removed_total", "Duplicates removed, per mode.", &l("content")),
            ],
            late: m.counter(
                "citystream_dedup_late_rows_total",
                "Rows older than the horizon (sent to late_events).",
                &st,
            ),
            keys: m.gauge("citystream_dedup_state_keys", "Keys remembered.", &st),
            bytes: m.gauge("citystream_dedup_state_bytes", "Bytes of dedup state (accounted).", &st),
        }))
    }
}

/// Remembered keys with their event time, evicted by minute bucket.
#[derive(Default)]
struct KeySet {
    map: HashMap<u128, i64, HashedKeys>,
    buckets: BTreeMap<i64, Vec<u128>>,
}

const BUCKET_MS: i64 = 60_000;

/// An eviction that removes at least this share of the keys (1 / n) sweeps the table once
/// instead of looking each key up: a sweep reads the slots in memory order, a lookup per key
/// misses the cache. With a 10-minute horizon each minute's eviction removes about a tenth.
const SWEEP_SHARE: usize = 16;

impl KeySet {
    /// Inserts `key` unless present; true if it was new.
    fn insert(&mut self, key: u128, ts: i64) -> bool {
        match self.map.entry(key) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(ts);
                self.remember(key, ts);
                true
            }
        }
    }

    /// Lists `key` in the eviction bucket of `ts` (most keys go to the newest bucket: looked at
    /// first, without a search).
    fn remember(&mut self, key: u128, ts: i64) {
        let bucket = ts.div_euclid(BUCKET_MS);
        match self.buckets.last_entry() {
            Some(mut last) if *last.key() == bucket => last.get_mut().push(key),
            _ => self.buckets.entry(bucket).or_default().push(key),
        }
    }

    /// Forgets keys whose event time is before `cutoff` (whole buckets only, so a key is kept
    /// up to one bucket longer than needed — never shorter).
    fn evict_before(&mut self, cutoff: i64) {
        let keep_from = cutoff.div_euclid(BUCKET_MS);
        let kept = self.buckets.split_off(&keep_from);
        let old = std::mem::replace(&mut self.buckets, kept);
        let evicted: usize = old.values().map(Vec::len).sum();
        if evicted == 0 {
            return;
        }
        if evicted * SWEEP_SHARE >= self.map.len() {
            // the same keys: those listed in the buckets before `keep_from`
            self.map.retain(|_, ts| ts.div_euclid(BUCKET_MS) >= keep_from);
        } else {
            for k in old.into_values().flatten() {
                self.map.remove(&k);
            }
        }
        // give memory back after a burst (a table keeps its peak size otherwise)
        if self.map.capacity() > 1024 && self.map.len() * 4 < self.map.capacity() {
            self.map.shrink_to(self.map.len() * 2);
        }
    }

    /// Accounted bytes: hash-table slots (16-byte key, 8-byte time, 1 control byte) at the
    /// table's bucket count, plus 16 bytes per key in the eviction buckets.
    fn bytes(&self) -> usize {
        let slots = (self.map.capacity() * 8).div_ceil(7).next_power_of_two();
        slots * 25 + self.buckets.values().map(|v| v.capacity() * 16 + 48).sum::<usize>()
    }
}

/// The `dedup` operator (see the module docs).
pub struct Dedup {
    outputs: Vec<OutputSpec>,
    time: usize,
    id: Option<usize>,
    content: Option<KeyEncoder>,
    /// The `within` columns (their row bytes go before the id in its key).
    within: Option<KeyEncoder>,
    /// The `within` columns, in the snapshot: exact keys of another scope do not restore.
    within_names: String,
    key_buf: Vec<u8>,
    horizon: i64,
    watermark: i64,
    hasher: KeyHash,
    /// [exact, content]
    seen: [KeySet; 2],
    removed: [Counter; 2],
    late: Counter,
    keys: Gauge,
    bytes: Gauge,
}

impl Dedup {
    /// Keys remembered, over both modes.
    pub fn state_keys(&self) -> usize {
        self.seen.iter().map(|s| s.map.len()).sum()
    }

    /// Accounted bytes of state, over both modes.
    pub fn state_bytes(&self) -> usize {
        self.seen.iter().map(KeySet::bytes).sum()
    }

    fn cutoff(&self) -> i64 {
        self.watermark.saturating_sub(self.horizon)
    }
}

impl Operator for Dedup {
    fn kind(&self) -> &'static str {
        "dedup"
    }

    fn outputs(&self) -> &[OutputSpec] {
        &self.outputs
    }

    fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<(), OperatorError> {
        let n = batch.num_rows();
        let ts = times(&batch, self.time);
        let ids = self.id.map(|c| batch.column(c).as_string::<i32>().clone());
        let rows = self.content.as_ref().map(|e| e.encode(&batch)).transpose()?;
        let scopes = self.within.as_ref().map(|e| e.encode(&batch)).transpose()?;
        let cutoff = self.cutoff();
        let mut keep = Vec::with_capacity(n);
        let mut late = Vec::with_capacity(n);
        let mut removed = [0u64; 2];
        for (i, &t) in ts.iter().enumerate() {
            if t < cutoff {
                keep.push(false);
                late.push(true);
                continue;
            }
            late.push(false);
            let id = ids.as_ref().filter(|a| a.is_valid(i)).map(|a| match &scopes {
                // the row format is self-delimiting: scope bytes then id bytes are unambiguous
                Some(s) => {
                    self.key_buf.clear();
                    self.key_buf.extend_from_slice(s.row(i).as_ref());
                    self.key_buf.extend_from_slice(a.value(i).as_bytes());
                    self.hasher.hash(&self.key_buf)
                }
                None => self.hasher.hash(a.value(i).as_bytes()),
            });
            let content = rows.as_ref().map(|r| self.hasher.hash(r.row(i).as_ref()));
            // one lookup per key: inserting answers whether it was there. A row whose id is
            // new but whose content was seen leaves its id remembered too, so that the
            // gateway's own exact re-sends are caught
            if id.is_some_and(|k| !self.seen[0].insert(k, t)) {
                removed[0] += 1;
                keep.push(false);
            } else if content.is_some_and(|k| !self.seen[1].insert(k, t)) {
                removed[1] += 1;
                keep.push(false);
            } else {
                keep.push(true);
            }
        }
        self.removed[0].inc_by(removed[0]);
        self.removed[1].inc_by(removed[1]);
        let late_n = late.iter().filter(|l| **l).count();
        if late_n > 0 {
            self.late.inc_by(late_n as u64);
            out.emit(1, filter_record_batch(&batch, &BooleanArray::from(late))?);
        }
        if keep.iter().all(|k| *k) {
            out.emit(0, batch);
        } else {
            out.emit(0, filter_record_batch(&batch, &BooleanArray::from(keep))?);
        }
        self.keys.set(self.state_keys() as f64);
        Ok(())
    }

    fn on_watermark(&mut self, watermark: i64, _out: &mut Collector) -> Result<(), OperatorError> {
        self.watermark = self.watermark.max(watermark);
        let cutoff = self.cutoff();
        self.seen.iter_mut().for_each(|s| s.evict_before(cutoff));
        self.keys.set(self.state_keys() as f64);
        self.bytes.set(self.state_bytes() as f64);
        Ok(())
    }

    fn retune(&mut self, new: &dyn std::any::Any) -> Result<(), LiveChangeError> {
        let new = new.downcast_ref::<DedupConfig>().ok_or(LiveChangeError::WrongConfig("dedup"))?;
        // a longer horizon applies to keys still held; a shorter one evicts at the next watermark
        self.horizon = new.horizon.as_millis_i64();
        Ok(())
    }

    fn is_stateful(&self) -> bool {
        true
    }

    fn snapshot(&self) -> Result<Option<RecordBatch>, OperatorError> {
        let mut mode = Vec::new();
        let (mut hi, mut lo, mut t) = (Vec::new(), Vec::new(), Vec::new());
        for (m, s) in self.seen.iter().enumerate() {
            for (k, ts) in &s.map {
                mode.push(m as u8);
                hi.push((k >> 64) as u64);
                lo.push(*k as u64);
                t.push(*ts);
            }
        }
        let schema = Arc::new(Schema::new_with_metadata(
            vec![
                Field::new("mode", DataType::UInt8, false),
                Field::new("key_hi", DataType::UInt64, false),
                Field::new("key_lo", DataType::UInt64, false),
                Field::new("ts", DataType::Int64, false),
            ],
            [
                ("watermark".to_owned(), self.watermark.to_string()),
                ("within".to_owned(), self.within_names.clone()),
                self.hasher.metadata(),
            ]
            .into(),
        ));
        Ok(Some(RecordBatch::try_new(
            schema,
            vec![
                Arc::new(UInt8Array::from(mode)),
                Arc::new(UInt64Array::from(hi)),
                Arc::new(UInt64Array::from(lo)),
                Arc::new(Int64Array::from(t)),
            ],
        )?))
    }

    fn restore(&mut self, state: RecordBatch) -> Result<(), OperatorError> {
        let names: Vec<&str> = state.schema_ref().fields().iter().map(|f| f.name().as_str()).collect();
        if names != ["mode", "key_hi", "key_lo", "ts"] {
            return Err(OperatorError::State { operator: "dedup", detail: "not a dedup snapshot".into() });
        }
        self.watermark = state.schema().metadata().get("watermark").and_then(|w| w.parse().ok()).unwrap_or(i64::MIN);
        self.seen = [KeySet::default(), KeySet::default()];
        let Some(hasher) = KeyHash::from_snapshot("dedup", &state)? else { return Ok(()) };
        self.hasher = hasher;
        let mode = state.column(0).as_primitive::<UInt8Type>();
        let hi = state.column(1).as_primitive::<UInt64Type>();
        let lo = state.column(2).as_primitive::<UInt64Type>();
        let ts = state.column(3).as_primitive::<Int64Type>();
        // exact keys hash the `within` columns too: keys of another scope would never match
        let same_scope = state.schema().metadata().get("within").map_or("", String::as_str) == self.within_names;
        if !same_scope {
            tracing::warn!(
                "dedup: `within` changed since the snapshot: exact-id keys start empty, content keys restore"
            );
        }
        for i in 0..state.num_rows() {
            let k = (u128::from(hi.value(i)) << 64) | u128::from(lo.value(i));
            if mode.value(i) == 0 && !same_scope {
                continue;
            }
            self.seen[usize::from(mode.value(i).min(1))].insert(k, ts.value(i));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Eviction keeps exactly the keys whose bucket is not before the cutoff's, whether it
    /// removes them one by one (a small share) or sweeps the table (a large one).
    #[test]
    fn eviction_by_lookup_and_by_sweep_keep_the_same_keys() {
        let mut set = KeySet::default();
        let mut model: HashMap<u128, i64> = HashMap::new();
        let mut x = 11u64;
        // 100 minutes of keys, in arrival order slightly shuffled across minutes
        for i in 0..20_000i64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let ts = (i * 300 + (x >> 40) as i64 % 90_000 - 45_000).max(0);
            let key = u128::from(x) << 7 | (i as u128 & 0x7f);
            assert_eq!(set.insert(key, ts), model.insert(key, ts).is_none());
        }
        // a key inserted twice keeps its first time
        let (&k, &t) = model.iter().next().unwrap();
        assert!(!set.insert(k, t + 1));
        // one minute at a time (about 1% of the keys: looked up), then half at once (swept)
        for cutoff in [60_000, 120_000, 130_000, 3_000_000, 3_000_000, 6_100_000] {
            set.evict_before(cutoff);
            model.retain(|_, ts| ts.div_euclid(BUCKET_MS) >= cutoff.div_euclid(BUCKET_MS));
            let mut got: Vec<(u128, i64)> = set.map.iter().map(|(k, t)| (*k, *t)).collect();
            let mut want: Vec<(u128, i64)> = model.iter().map(|(k, t)| (*k, *t)).collect();
            got.sort_unstable();
            want.sort_unstable();
            assert_eq!(got, want, "after evicting before {cutoff}");
            let listed: usize = set.buckets.values().map(Vec::len).sum();
            assert_eq!(listed, set.map.len(), "every key kept is listed in one bucket");
            assert!(set.buckets.keys().all(|b| *b >= cutoff.div_euclid(BUCKET_MS)));
        }
        assert!(set.map.is_empty());
    }
}
