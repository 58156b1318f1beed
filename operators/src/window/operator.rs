//! The `window` operator: open windows per start, groups per key, emission on the watermark,
//! late rows, forgetting keys no open window holds, snapshot and restore.

use crate::LiveChangeError;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, FixedSizeBinaryArray, Float64Array, Int64Array, ListArray, RecordBatch,
    TimestampMillisecondArray, UInt32Array,
};
use arrow::buffer::NullBuffer;
use arrow::compute::take_record_batch;
use arrow::datatypes::{DataType, Field, Float32Type, Int64Type, Schema};
use arrow::row::OwnedRow;

use crate::common::{KeyEncoder, as_f64, times};
use crate::exact_sum::ExactSum;
use crate::{Collector, Counter, Duration, Gauge, Operator, OperatorError, OutputSpec};

use super::acc::{Acc, quantile};
use super::config::{AggFn, Plan, WindowConfig};
use super::snapshot::{SNAPSHOT_COLUMNS, SnapshotCells};
#[derive(Debug, Clone)]
pub(super) struct WindowState {
    /// group id -> slot
    pub(super) slots: HashMap<u32, u32>,
    /// slot -> group id, in arrival order
    pub(super) groups: Vec<u32>,
    pub(super) accs: Vec<Acc>,
}

/// The `window` operator (see the module docs).
pub struct Window {
    pub(super) plan: Plan,
    pub(super) size: i64,
    pub(super) slide: i64,
    pub(super) lateness: i64,
    pub(super) keys: KeyEncoder,
    /// encoded key bytes -> group id (looked up by borrowed bytes: no allocation per row)
    pub(super) group_of: HashMap<Box<[u8]>, u32>,
    pub(super) group_keys: Vec<OwnedRow>,
    pub(super) windows: BTreeMap<i64, WindowState>,
    pub(super) watermark: i64,
    pub(super) late: Counter,
    pub(super) emitted: Counter,
    pub(super) open: Gauge,
    pub(super) state_bytes: Gauge,
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
    pub(super) fn group_id(&mut self, row: arrow::row::Row<'_>) -> u32 {
        if let Some(g) = self.group_of.get(row.as_ref()) {
            return *g;
        }
        let g = self.group_keys.len() as u32;
        self.group_keys.push(row.owned());
        self.group_of.insert(row.as_ref().into(), g);
        g
    }

    /// Whether the window starting at `start` is still open at the current watermark.
    pub(super) fn is_open(&self, start: i64) -> bool {
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

    pub(super) fn emit_until(&mut self, wm: i64, out: &mut Collector) -> Result<(), OperatorError> {
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
    pub(super) fn forget_unused_keys(&mut self) {
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

    pub(super) fn render(&self, start: i64, w: &WindowState) -> Result<RecordBatch, OperatorError> {
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

    fn retune(&mut self, new: &dyn std::any::Any) -> Result<(), LiveChangeError> {
        let new = new.downcast_ref::<WindowConfig>().ok_or(LiveChangeError::WrongConfig("window"))?;
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
