//! The `compress` operator: per series, the kept anchor, the candidate and the door of feasible
//! slopes; rows held until the watermark passes them.

use crate::LiveChangeError;
use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, Int64Array, ListArray, RecordBatch, StructArray, UInt8Array,
};
use arrow::compute::interleave_record_batch;
use arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema, SchemaRef, UInt8Type};

use crate::common::{KeyEncoder, as_f64, times};
use crate::{BuildContext, Collector, Counter, Operator, OperatorError, OutputSpec};

use super::config::{CompressConfig, FieldTolerance, Method};

/// A row held by the operator: (arena batch, row).
type RowRef = (usize, usize);

#[derive(Debug, Clone)]
struct Point {
    t: i64,
    /// per field; `None` for null
    v: Vec<Option<f64>>,
    at: RowRef,
}

#[derive(Debug, Clone, Default)]
struct Series {
    anchor: Option<Point>,
    candidate: Option<Point>,
    /// per field: for swinging door the feasible slopes (lo, hi) from the anchor over the
    /// dropped points; for deadband (half-band, unused)
    door: Vec<(f64, f64)>,
}

/// The `compress` operator (see the module docs).
pub struct Compress {
    outputs: Vec<OutputSpec>,
    schema: SchemaRef,
    time: usize,
    keys: KeyEncoder,
    fields: Vec<(usize, FieldTolerance)>,
    max_gap: i64,
    watermark: i64,
    /// batches referenced by held rows and candidates
    arena: Vec<RecordBatch>,
    /// rows waiting for the watermark: (series, point)
    pending: Vec<(usize, Point)>,
    /// encoded key bytes -> series (looked up by borrowed bytes: no allocation per row)
    series: HashMap<Box<[u8]>, usize>,
    states: Vec<Series>,
    rows_in: Counter,
    rows_kept: Counter,
    late: Counter,
    series_gauge: crate::Gauge,
}

impl std::fmt::Debug for Compress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compress").field("fields", &self.fields.len()).finish_non_exhaustive()
    }
}

const OPEN: (f64, f64) = (f64::NEG_INFINITY, f64::INFINITY);

impl Compress {
    /// A compress stage over `input`: time column `time`, series keys `keys`, the `fields` it
    /// compresses and their tolerances; a silence over `max_gap` ms is not bridged.
    pub(super) fn new(
        input: &SchemaRef,
        time: usize,
        keys: KeyEncoder,
        fields: Vec<(usize, FieldTolerance)>,
        max_gap: i64,
        ctx: &BuildContext,
    ) -> Self {
        let l = [("stage", ctx.stage.as_str())];
        Compress {
            outputs: vec![OutputSpec::new("main", input.clone()), OutputSpec::new("late_events", input.clone())],
            schema: input.clone(),
            time,
            keys,
            fields,
            max_gap,
            watermark: i64::MIN,
            arena: Vec::new(),
            pending: Vec::new(),
            series: HashMap::new(),
            states: Vec::new(),
            rows_in: ctx.metrics.counter("citystream_compress_rows_in_total", "Rows into a compress stage.", &l),
            rows_kept: ctx.metrics.counter("citystream_compress_rows_kept_total", "Rows a compress stage kept.", &l),
            late: ctx.metrics.counter("citystream_compress_late_rows_total", "Rows behind their series' time.", &l),
            series_gauge: ctx.metrics.gauge("citystream_compress_series", "Series a compress stage holds.", &l),
        }
    }

    fn snapshot_schema(&self) -> SchemaRef {
        let floats = |name: &str| Field::new_list(name, Field::new_list_field(DataType::Float64, true), true);
        Arc::new(Schema::new(vec![
            Field::new("kind", DataType::UInt8, false),
            Field::new("row", DataType::Struct(self.schema.fields().clone()), true),
            Field::new("series", DataType::Binary, true),
            Field::new("anchor_t", DataType::Int64, true),
            floats("anchor_v"),
            floats("door_lo"),
            floats("door_hi"),
        ]))
    }

    /// Decides `p` for its series; pushes rows to keep / late.
    fn step(&mut self, s: usize, p: Point, kept: &mut Vec<RowRef>, late: &mut Vec<RowRef>) {
        let fields = &self.fields;
        let st = &mut self.states[s];
        let Some(a) = &st.anchor else {
            kept.push(p.at);
            st.door = vec![OPEN; fields.len()];
            st.anchor = Some(p);
            return;
        };
        let last_t = st.candidate.as_ref().map_or(a.t, |c| c.t);
        if p.t <= last_t {
            late.push(p.at);
            return;
        }
        if st.candidate.is_none() && p.t.saturating_sub(a.t) > self.max_gap {
            // after a silence longer than max_gap the series starts again: the row is kept,
            // as it would be for a series the operator had forgotten (`forget_silent`)
            kept.push(p.at);
            st.door = vec![OPEN; fields.len()];
            st.anchor = Some(p);
            return;
        }
        let Some(c) = st.candidate.take() else {
            st.candidate = Some(p);
            return;
        };
        if p.t.saturating_sub(c.t) > self.max_gap {
            // a silence longer than max_gap after the undecided row: it is kept, and the
            // series starts again at `p`, exactly as when the watermark passed `c` first
            kept.push(c.at);
            kept.push(p.at);
            st.door = vec![OPEN; fields.len()];
            st.anchor = Some(p);
            return;
        }
        let mut door = st.door.clone();
        let mut droppable = true;
        for (f, (_, tol)) in fields.iter().enumerate() {
            if !droppable {
                break;
            }
            let (Some(av), Some(cv), Some(pv)) = (a.v[f], c.v[f], p.v[f]) else {
                droppable = false;
                break;
            };
            let tc = tol.of(cv);
            match tol.method {
                Method::SwingingDoor => {
                    let dt_c = (c.t - a.t) as f64;
                    let (lo, hi) = door[f];
                    let lo = lo.max((cv - tc - av) / dt_c);
                    let hi = hi.min((cv + tc - av) / dt_c);
                    let slope = (pv - av) / (p.t - a.t) as f64;
                    droppable = lo <= slope && slope <= hi;
                    door[f] = (lo, hi);
                }
                Method::Deadband => {
                    // door.1 is the narrowest half-band over the dropped readings
                    let half = door[f].1.min(tc / 2.0);
                    droppable = (cv - av).abs() <= tc / 2.0 && (pv - av).abs() <= half;
                    door[f] = (f64::NEG_INFINITY, half);
                }
            }
        }
        if droppable {
            st.door = door;
        } else {
            kept.push(c.at);
            st.door = vec![OPEN; fields.len()];
            st.anchor = Some(c);
        }
        st.candidate = Some(p);
    }

    /// Processes held rows up to `wm` in event-time order per series and emits what is kept.
    fn release(&mut self, wm: i64, flush: bool, out: &mut Collector) -> Result<(), OperatorError> {
        let (mut ready, rest): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.pending).into_iter().partition(|(_, p)| p.t <= wm);
        self.pending = rest;
        ready.sort_by_key(|(s, p)| (*s, p.t));
        let mut kept = Vec::new();
        let mut late = Vec::new();
        for (s, p) in ready {
            self.step(s, p, &mut kept, &mut late);
        }
        for st in &mut self.states {
            // at the end everything undecided is kept; before that, an undecided row more than
            // `max_gap` behind the watermark is kept whatever comes next (the gap to any later
            // row exceeds `max_gap`): decided now, it does not hold the output watermark back
            if st.candidate.as_ref().is_some_and(|c| flush || wm.saturating_sub(c.t) > self.max_gap) {
                let c = st.candidate.take().expect("checked");
                kept.push(c.at);
                st.anchor = Some(c);
                st.door = vec![OPEN; self.fields.len()];
            }
        }
        let refs: Vec<&RecordBatch> = self.arena.iter().collect();
        if !kept.is_empty() {
            kept.sort_unstable();
            self.rows_kept.inc_by(kept.len() as u64);
            out.emit(0, interleave_record_batch(&refs, &kept)?);
        }
        if !late.is_empty() {
            self.late.inc_by(late.len() as u64);
            out.emit(1, interleave_record_batch(&refs, &late)?);
        }
        // compact: keep only the rows still referenced, in one batch
        let mut live: Vec<RowRef> = self.pending.iter().map(|(_, p)| p.at).collect();
        live.extend(self.states.iter().filter_map(|s| s.candidate.as_ref().map(|c| c.at)));
        let compacted = if live.is_empty() { None } else { Some(interleave_record_batch(&refs, &live)?) };
        let mut k = 0;
        for (_, p) in &mut self.pending {
            p.at = (0, k);
            k += 1;
        }
        for st in &mut self.states {
            if let Some(c) = &mut st.candidate {
                c.at = (0, k);
                k += 1;
            }
            // anchors are only read for their values
            if let Some(a) = &mut st.anchor {
                a.at = (usize::MAX, 0);
            }
        }
        self.arena = compacted.into_iter().collect();
        self.forget_silent(wm);
        self.series_gauge.set(self.states.len() as f64);
        Ok(())
    }

    /// Forgets the series with nothing undecided or waiting whose last kept row is more than
    /// `max_gap` behind the watermark: every later row of theirs is more than `max_gap` after
    /// it, and `step` treats such a row exactly as the first row of a new series, so forgetting
    /// changes no output. (That rows reaching this stage are ahead of the watermark is the
    /// pipeline's guarantee: `decode` routes rows behind their partition's watermark to
    /// `late_events`. Fed rows behind the watermark directly, a forgotten series would keep a
    /// row an unforgotten one sends to `late_events`.) Compacts
    /// when at least a quarter of the series (and 1024) can go, so the cost is amortized.
    fn forget_silent(&mut self, wm: i64) {
        if self.states.len() < 1024 {
            // fewer series than the least that is ever compacted: nothing to count
            return;
        }
        let mut waiting = vec![false; self.states.len()];
        for (s, _) in &self.pending {
            waiting[*s] = true;
        }
        let silent = |s: usize, st: &Series| {
            !waiting[s]
                && st.candidate.is_none()
                && st.anchor.as_ref().is_none_or(|a| wm.saturating_sub(a.t) > self.max_gap)
        };
        let n = self.states.iter().enumerate().filter(|(s, st)| silent(*s, st)).count();
        if n == 0 || n < 1024.max(self.states.len() / 4) {
            return;
        }
        let mut remap = vec![usize::MAX; self.states.len()];
        let mut kept = Vec::with_capacity(self.states.len() - n);
        for (s, st) in std::mem::take(&mut self.states).into_iter().enumerate() {
            if !silent(s, &st) {
                remap[s] = kept.len();
                kept.push(st);
            }
        }
        self.states = kept;
        self.series.retain(|_, s| {
            *s = remap[*s];
            *s != usize::MAX
        });
        self.series.shrink_to_fit();
        for (s, _) in &mut self.pending {
            *s = remap[*s];
        }
    }
}

impl Operator for Compress {
    fn kind(&self) -> &'static str {
        "compress"
    }

    fn outputs(&self) -> &[OutputSpec] {
        &self.outputs
    }

    fn process_batch(&mut self, batch: RecordBatch, _out: &mut Collector) -> Result<(), OperatorError> {
        if batch.schema().fields() != self.schema.fields() {
            return Err(OperatorError::SchemaMismatch { operator: "compress", detail: "unexpected columns".into() });
        }
        let n = batch.num_rows();
        self.rows_in.inc_by(n as u64);
        let ts = times(&batch, self.time);
        let keys = self.keys.encode(&batch)?;
        let values = self.fields.iter().map(|(c, _)| as_f64(batch.column(*c))).collect::<Result<Vec<_>, _>>()?;
        let b = self.arena.len();
        for i in 0..n {
            let row = keys.row(i);
            let s = match self.series.get(row.as_ref()) {
                Some(s) => *s,
                None => {
                    let s = self.states.len();
                    self.series.insert(row.as_ref().into(), s);
                    self.states.push(Series::default());
                    s
                }
            };
            let v =
                values.iter().map(|(v, nulls)| nulls.as_ref().is_none_or(|nb| nb.is_valid(i)).then(|| v[i])).collect();
            self.pending.push((s, Point { t: ts[i], v, at: (b, i) }));
        }
        self.arena.push(batch);
        Ok(())
    }

    fn on_watermark(&mut self, watermark: i64, out: &mut Collector) -> Result<(), OperatorError> {
        self.watermark = self.watermark.max(watermark);
        self.release(self.watermark, false, out)
    }

    fn on_end(&mut self, out: &mut Collector) -> Result<(), OperatorError> {
        self.release(i64::MAX, true, out)
    }

    fn retune(&mut self, new: &dyn std::any::Any) -> Result<(), LiveChangeError> {
        let new = new.downcast_ref::<CompressConfig>().ok_or(LiveChangeError::WrongConfig("compress"))?;
        // fields are in the same (sorted) order: the set of names did not change
        for ((_, tol), (_, new_tol)) in self.fields.iter_mut().zip(&new.fields) {
            *tol = *new_tol;
        }
        self.max_gap = new.max_gap.as_millis_i64();
        // doors opened under the old tolerances restart at the next kept row
        Ok(())
    }

    fn is_stateful(&self) -> bool {
        true
    }

    /// One row per held input row (`kind` 0: waiting for the watermark, 1: a series' undecided
    /// row) with the row itself in `row`, and one per series with a kept row (`kind` 2: its key,
    /// the last kept point and the door), so a restore continues every series exactly.
    fn snapshot(&self) -> Result<Option<RecordBatch>, OperatorError> {
        let refs: Vec<&RecordBatch> = self.arena.iter().collect();
        let mut held: Vec<RowRef> = self.pending.iter().map(|(_, p)| p.at).collect();
        let mut kinds: Vec<u8> = vec![0; held.len()];
        for st in &self.states {
            if let Some(c) = &st.candidate {
                held.push(c.at);
                kinds.push(1);
            }
        }
        let rows = if held.is_empty() {
            RecordBatch::new_empty(self.schema.clone())
        } else {
            interleave_record_batch(&refs, &held)?
        };
        let mut keys: Vec<Option<&[u8]>> = vec![None; held.len()];
        let n_fields = self.fields.len();
        let mut anchor_t: Vec<Option<i64>> = vec![None; held.len()];
        let mut anchor_v: Vec<Option<Vec<Option<f64>>>> = vec![None; held.len()];
        let mut lo: Vec<Option<Vec<Option<f64>>>> = vec![None; held.len()];
        let mut hi: Vec<Option<Vec<Option<f64>>>> = vec![None; held.len()];
        let mut by_series: Vec<(&[u8], usize)> = self.series.iter().map(|(k, s)| (k.as_ref(), *s)).collect();
        by_series.sort_unstable();
        for (key, s) in by_series {
            let st = &self.states[s];
            let Some(a) = &st.anchor else { continue };
            kinds.push(2);
            keys.push(Some(key));
            anchor_t.push(Some(a.t));
            anchor_v.push(Some(a.v.clone()));
            let door = if st.door.len() == n_fields { st.door.clone() } else { vec![OPEN; n_fields] };
            lo.push(Some(door.iter().map(|d| Some(d.0)).collect()));
            hi.push(Some(door.iter().map(|d| Some(d.1)).collect()));
        }
        // the held rows, padded with nulls for the series rows
        let pad = kinds.len() - rows.num_rows();
        let row_col: ArrayRef = if pad == 0 {
            Arc::new(StructArray::from(rows))
        } else {
            let fill = RecordBatch::new_empty(self.schema.clone());
            let nulls = arrow::array::new_null_array(&DataType::Struct(self.schema.fields().clone()), pad);
            let held = StructArray::from(if rows.num_rows() == 0 { fill } else { rows });
            arrow::compute::concat(&[&held, nulls.as_ref()])?
        };
        let list = |v: Vec<Option<Vec<Option<f64>>>>| -> ArrayRef {
            Arc::new(ListArray::from_iter_primitive::<Float64Type, _, _>(v))
        };
        let cols: Vec<ArrayRef> = vec![
            Arc::new(UInt8Array::from(kinds)),
            row_col,
            Arc::new(BinaryArray::from(keys)),
            Arc::new(Int64Array::from(anchor_t)),
            list(anchor_v),
            list(lo),
            list(hi),
        ];
        Ok(Some(RecordBatch::try_new(self.snapshot_schema(), cols)?))
    }

    fn restore(&mut self, state: RecordBatch) -> Result<(), OperatorError> {
        let bad = |detail: &str| OperatorError::State { operator: "compress", detail: detail.into() };
        crate::common::check_state_schema("compress", &state, &self.snapshot_schema())?;
        self.arena.clear();
        self.pending.clear();
        self.series.clear();
        self.states.clear();
        let kinds = state.column(0).as_primitive::<UInt8Type>();
        let keys = state.column(2).as_binary::<i32>();
        let anchor_t = state.column(3).as_primitive::<Int64Type>();
        let floats = |c: usize, i: usize| -> Vec<Option<f64>> {
            state.column(c).as_list::<i32>().value(i).as_primitive::<Float64Type>().iter().collect()
        };
        // series first: their kept point and door
        for i in (0..state.num_rows()).filter(|&i| kinds.value(i) == 2) {
            if keys.is_null(i) || anchor_t.is_null(i) {
                return Err(bad("a series row without its key or kept point"));
            }
            let door: Vec<(f64, f64)> = floats(5, i)
                .into_iter()
                .zip(floats(6, i))
                .map(|(l, h)| (l.unwrap_or(OPEN.0), h.unwrap_or(OPEN.1)))
                .collect();
            let anchor = Point { t: anchor_t.value(i), v: floats(4, i), at: (usize::MAX, 0) };
            if anchor.v.len() != self.fields.len() || door.len() != self.fields.len() {
                return Err(bad("the snapshot has another number of fields"));
            }
            let s = self.states.len();
            self.series.insert(keys.value(i).into(), s);
            self.states.push(Series { anchor: Some(anchor), candidate: None, door });
        }
        // then the held rows: waiting ones as input, undecided ones back in their series
        // (the series rows are nulls in `row`: pick the held rows before making them a batch)
        let rows = state.column(1);
        let pick = |k: u8| -> Result<RecordBatch, OperatorError> {
            let mask: arrow::array::BooleanArray = kinds.iter().map(|x| Some(x == Some(k))).collect();
            let held = arrow::compute::filter(rows, &mask)?;
            let held = held.as_struct();
            Ok(RecordBatch::try_new(self.schema.clone(), held.columns().to_vec())?)
        };
        let candidates = pick(1)?;
        if candidates.num_rows() > 0 {
            let ts = times(&candidates, self.time);
            let enc = self.keys.encode(&candidates)?;
            let values =
                self.fields.iter().map(|(c, _)| as_f64(candidates.column(*c))).collect::<Result<Vec<_>, _>>()?;
            let b = self.arena.len();
            for (i, &t) in ts.iter().enumerate() {
                let s =
                    *self.series.get(enc.row(i).as_ref()).ok_or_else(|| bad("an undecided row without its series"))?;
                let v = values.iter().map(|(v, n)| n.as_ref().is_none_or(|nb| nb.is_valid(i)).then(|| v[i])).collect();
                self.states[s].candidate = Some(Point { t, v, at: (b, i) });
            }
            self.arena.push(candidates);
        }
        let mut out = Collector::new(2);
        self.process_batch(pick(0)?, &mut out)
    }

    /// Rows held for the watermark come out before it is forwarded; a series' undecided row
    /// may come out later, so the output watermark stays behind the oldest one.
    fn output_watermark(&self, input: i64) -> i64 {
        let oldest = self.states.iter().filter_map(|s| s.candidate.as_ref().map(|c| c.t)).min();
        oldest.map_or(input, |t| input.min(t.saturating_sub(1)))
    }
}
