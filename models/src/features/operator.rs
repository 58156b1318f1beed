//! The `features` operator: per segment the last hour of minutes, rows held until the
//! watermark passes their minute, one feature row per (segment, minute), snapshots.

use std::collections::{BTreeMap, VecDeque};

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, FixedSizeListArray, Float32Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use arrow::buffer::ScalarBuffer;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimestampMillisecondType};
use citystream_operators::common::as_f64;
use citystream_operators::{Collector, Counter, Gauge, Operator, OperatorError, OutputSpec};

use super::config::Cols;
use super::{HISTORY_MINUTES, MINUTE_MS, RECENT_MINUTES};
use citystream_operators::road_graph::RoadGraph;
#[derive(Debug, Clone, Copy)]
pub(super) struct Minute {
    pub(super) t: i64,
    pub(super) speed: f64,
    pub(super) veh: f64,
    pub(super) occ: f64,
}

/// The `features` operator.
pub struct FeatureBuilder {
    pub(super) graph: RoadGraph,
    pub(super) cols: Cols,
    pub(super) outputs: Vec<OutputSpec>,
    /// per segment: minutes in time order (at most one per minute)
    pub(super) history: Vec<VecDeque<Minute>>,
    /// minute -> segments with a row for it, not yet emitted
    pub(super) pending: BTreeMap<i64, Vec<usize>>,
    pub(super) pending_rows: usize,
    /// per segment: the last minute emitted (rows of minutes up to the window's lateness behind
    /// the watermark still arrive, so this is per segment, not the watermark)
    pub(super) emitted: Vec<i64>,
    pub(super) rows: Counter,
    pub(super) unmatched: Counter,
    pub(super) pending_gauge: Gauge,
}

impl std::fmt::Debug for FeatureBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeatureBuilder").field("segments", &self.graph.segments.len()).finish_non_exhaustive()
    }
}

/// Mean of the values of minutes `t-hi ..= t-lo` of `h` that are present and not NaN (as in
/// the Python definition), or `None` when there is none. A history holds each minute once, in
/// order (see `process_batch`), so the span is found by binary search and summed in the
/// history's order: the same sum as a scan of the whole history, without visiting its other
/// minutes (up to two hours of them, for each of a row's dozen means).
pub(super) fn window_mean(
    h: &VecDeque<Minute>,
    t: i64,
    lo: i64,
    hi: i64,
    value: impl Fn(&Minute) -> f64,
) -> Option<f64> {
    let (from, to) = (t - hi * MINUTE_MS, t - lo * MINUTE_MS);
    let (mut sum, mut n) = (0.0, 0u32);
    let start = h.partition_point(|m| m.t < from);
    for m in h.range(start..).take_while(|m| m.t <= to) {
        let v = value(m);
        if !v.is_nan() {
            sum += v;
            n += 1;
        }
    }
    (n > 0).then(|| sum / f64::from(n))
}

/// Minute `t` of `h` (a history in order, each minute once).
pub(super) fn at(h: &VecDeque<Minute>, t: i64) -> Option<&Minute> {
    h.binary_search_by_key(&t, |m| m.t).ok().map(|i| &h[i])
}

impl FeatureBuilder {
    pub(super) fn new(
        graph: RoadGraph,
        cols: Cols,
        outputs: Vec<OutputSpec>,
        rows: Counter,
        unmatched: Counter,
        pending_gauge: Gauge,
    ) -> Self {
        let n = graph.segments.len();
        FeatureBuilder {
            graph,
            cols,
            outputs,
            history: vec![VecDeque::new(); n],
            pending: BTreeMap::new(),
            pending_rows: 0,
            emitted: vec![i64::MIN; n],
            rows,
            unmatched,
            pending_gauge,
        }
    }

    /// The feature row of segment `s` at minute `t` (its own row for `t` is in the history).
    pub(super) fn row(&self, s: usize, t: i64, out: &mut Vec<f32>) {
        let seg = &self.graph.segments[s];
        let h = &self.history[s];
        let own = at(h, t).copied().expect("a pending row is in the history");
        let speed = |m: &Minute| m.speed;
        let speed_5m = window_mean(h, t, 0, 4, speed).unwrap_or(f64::NAN);
        let speed_15m = window_mean(h, t, 0, 14, speed).unwrap_or(f64::NAN);
        let lag15 = window_mean(h, t, 15, 19, speed).unwrap_or(speed_5m);
        let lag30 = window_mean(h, t, 30, 34, speed).unwrap_or(speed_5m);
        let speed_60m = window_mean(h, t, 0, 59, speed).unwrap_or(f64::NAN);
        let flow = window_mean(h, t, 0, 4, |m| m.veh).unwrap_or(f64::NAN) * 60.0;
        let occ_5m = window_mean(h, t, 0, 4, |m| m.occ).unwrap_or(f64::NAN);
        let neighbour_speed =
            |n: Option<usize>| n.and_then(|n| window_mean(&self.history[n], t, 0, 4, speed)).unwrap_or(speed_5m);
        let neighbour_occ = |n: Option<usize>| self.neighbour_at(n, t, |m| m.occ).unwrap_or(own.occ);
        let up_speed = neighbour_speed(seg.upstream);
        let down_speed = neighbour_speed(seg.downstream);
        let up_occ = neighbour_occ(seg.upstream);
        let down_occ = neighbour_occ(seg.downstream);
        let occ_diff = own.occ - down_occ;
        let occ_rdiff = occ_diff / own.occ.max(0.01);
        let drop = window_mean(h, t, 5, 9, speed).unwrap_or(speed_5m) - speed_5m;
        let minute_of_day = (t.div_euclid(MINUTE_MS)).rem_euclid(1440);
        let angle = 2.0 * std::f64::consts::PI * minute_of_day as f64 / 1440.0;
        let weekday = (t.div_euclid(86_400_000) + 3).rem_euclid(7);
        let weekend = if weekday >= 5 { 1.0 } else { 0.0 };
        let values = [
            own.speed,
            speed_5m,
            speed_15m,
            lag15,
            lag30,
            speed_60m,
            flow,
            own.occ,
            occ_5m,
            up_speed,
            down_speed,
            up_occ,
            down_occ,
            occ_diff,
            occ_rdiff,
            drop,
            seg.free_speed_kmh,
            angle.sin(),
            angle.cos(),
            weekend,
        ];
        out.extend(values.iter().map(|&v| v as f32));
        self.recent(s, t, own.speed, out);
    }

    /// The `*_m{k}` and neighbours' `*_1m` features of segment `s` at minute `t` (`speed_1m` its
    /// own speed), in FEATURES order: minute t-k's value, the free speed and occupancy 0 for a
    /// minute without a row, the segment's own for a neighbour missing or without a row.
    fn recent(&self, s: usize, t: i64, speed_1m: f64, out: &mut Vec<f32>) {
        let seg = &self.graph.segments[s];
        let own = |k: i64| at(&self.history[s], t - k * MINUTE_MS).copied();
        let own_speed = |k: i64| own(k).map_or(seg.free_speed_kmh, |m| m.speed);
        let own_occ = |k: i64| own(k).map(|m| m.occ).filter(|v| !v.is_nan()).unwrap_or(0.0);
        let recent = 1..RECENT_MINUTES;
        out.extend(recent.clone().map(|k| own_speed(k) as f32));
        out.extend(recent.clone().map(|k| own_occ(k) as f32));
        for n in [seg.upstream, seg.downstream] {
            let theirs = |k: i64, value: fn(&Minute) -> f64| self.neighbour_at(n, t - k * MINUTE_MS, value);
            out.push(theirs(0, |m| m.speed).unwrap_or(speed_1m) as f32);
            out.extend(recent.clone().map(|k| theirs(k, |m| m.speed).unwrap_or_else(|| own_speed(k)) as f32));
            out.extend(recent.clone().map(|k| theirs(k, |m| m.occ).unwrap_or_else(|| own_occ(k)) as f32));
        }
    }

    /// Minute `t`'s value of neighbour `n` (`value` of its row), where it has a row for `t` and
    /// the value is not NaN.
    fn neighbour_at(&self, n: Option<usize>, t: i64, value: impl Fn(&Minute) -> f64) -> Option<f64> {
        n.and_then(|n| at(&self.history[n], t)).map(value).filter(|v| !v.is_nan())
    }

    pub(super) fn emit_through(&mut self, watermark: i64, out: &mut Collector) -> Result<(), OperatorError> {
        let ready: Vec<i64> = self.pending.range(..=watermark).map(|(t, _)| *t).collect();
        if ready.is_empty() {
            return Ok(());
        }
        let mut segs = Vec::new();
        let mut ts = Vec::new();
        let mut values = Vec::new();
        for t in ready {
            let mut list = self.pending.remove(&t).unwrap_or_default();
            list.sort_unstable();
            list.dedup();
            for s in list {
                self.row(s, t, &mut values);
                self.emitted[s] = self.emitted[s].max(t);
                segs.push(self.graph.segments[s].segment_id.as_str());
                ts.push(t);
            }
        }
        self.pending_rows = self.pending.values().map(Vec::len).sum();
        self.pending_gauge.set(self.pending_rows as f64);
        // Forget what no pending or future minute can look back to. Rows of minutes up to the
        // upstream window's lateness behind the watermark may still come, so the history reaches
        // a further HISTORY_MINUTES back (a row later than that gets a partial history).
        let oldest_needed = self.pending.keys().next().copied().unwrap_or(watermark).min(watermark)
            - (2 * HISTORY_MINUTES - 1) * MINUTE_MS;
        for h in &mut self.history {
            while h.front().is_some_and(|m| m.t < oldest_needed) {
                h.pop_front();
            }
        }
        let schema = self.outputs[0].schema.clone();
        let time_type = schema.field(1).data_type().clone();
        let DataType::FixedSizeList(item, width) = schema.field(2).data_type().clone() else {
            unreachable!("the planned schema has the list column third")
        };
        let n = segs.len();
        let time: ArrayRef = Arc::new(TimestampMillisecondArray::from(ts).with_data_type(time_type));
        let list = FixedSizeListArray::try_new(
            item,
            width,
            Arc::new(Float32Array::new(ScalarBuffer::from(values), None)),
            None,
        )?;
        self.rows.inc_by(n as u64);
        out.emit(0, RecordBatch::try_new(schema, vec![Arc::new(StringArray::from(segs)), time, Arc::new(list)])?);
        Ok(())
    }
}

impl Operator for FeatureBuilder {
    fn kind(&self) -> &'static str {
        "features"
    }

    fn outputs(&self) -> &[OutputSpec] {
        &self.outputs
    }

    fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<(), OperatorError> {
        let times = batch.column(self.cols.time).as_primitive::<TimestampMillisecondType>();
        let segs = batch.column(self.cols.segment).as_string::<i32>();
        let (veh, veh_nulls) = as_f64(batch.column(self.cols.vehicles))?;
        let (speed, speed_nulls) = as_f64(batch.column(self.cols.speed))?;
        let (occ, occ_nulls) = as_f64(batch.column(self.cols.occupancy))?;
        let present =
            |nulls: &Option<arrow::buffer::NullBuffer>, i: usize| nulls.as_ref().is_none_or(|n| n.is_valid(i));
        let mut unmatched = Vec::new();
        for i in 0..batch.num_rows() {
            let (Some(s), true) = (self.graph.index_of(segs.value(i)), times.is_valid(i)) else {
                unmatched.push(i as u32);
                continue;
            };
            let t = times.value(i);
            if t <= self.emitted[s] {
                // its minute was emitted already: one feature row per (segment, minute)
                unmatched.push(i as u32);
                continue;
            }
            let m = Minute {
                t,
                // no vehicle passed: the speed of an empty road (as the Python code does for null and NaN)
                speed: if present(&speed_nulls, i) && !speed[i].is_nan() {
                    speed[i]
                } else {
                    self.graph.segments[s].free_speed_kmh
                },
                veh: if present(&veh_nulls, i) { veh[i] } else { f64::NAN },
                occ: if present(&occ_nulls, i) { occ[i] } else { f64::NAN },
            };
            let h = &mut self.history[s];
            // keep minutes in order; a second row for the same minute replaces the first
            match h.iter().rposition(|x| x.t <= t) {
                Some(p) if h[p].t == t => h[p] = m,
                Some(p) => h.insert(p + 1, m),
                None => h.push_front(m),
            }
            self.pending.entry(t).or_default().push(s);
            self.pending_rows += 1;
        }
        self.pending_gauge.set(self.pending_rows as f64);
        if !unmatched.is_empty() {
            self.unmatched.inc_by(unmatched.len() as u64);
            let idx = arrow::array::UInt32Array::from(unmatched);
            out.emit(1, arrow::compute::take_record_batch(&batch, &idx)?);
        }
        Ok(())
    }

    fn on_watermark(&mut self, watermark: i64, out: &mut Collector) -> Result<(), OperatorError> {
        self.emit_through(watermark, out)
    }

    fn on_end(&mut self, out: &mut Collector) -> Result<(), OperatorError> {
        self.emit_through(i64::MAX, out)
    }

    fn is_stateful(&self) -> bool {
        true
    }

    /// One row per history minute (`kind` 0), per pending (segment, minute) (1) and per
    /// segment's last emitted minute (2), by segment id.
    fn snapshot(&self) -> Result<Option<RecordBatch>, OperatorError> {
        let (mut seg, mut kind, mut t, mut speed, mut veh, mut occ) =
            (Vec::new(), Vec::<u8>::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut push = |s: usize, k: u8, time: i64, m: Option<&Minute>| {
            seg.push(self.graph.segments[s].segment_id.clone());
            kind.push(k);
            t.push(time);
            speed.push(m.map(|m| m.speed));
            veh.push(m.map(|m| m.veh));
            occ.push(m.map(|m| m.occ));
        };
        for (s, h) in self.history.iter().enumerate() {
            for m in h {
                push(s, 0, m.t, Some(m));
            }
            if self.emitted[s] != i64::MIN {
                push(s, 2, self.emitted[s], None);
            }
        }
        for (&minute, segs) in &self.pending {
            for &s in segs {
                push(s, 1, minute, None);
            }
        }
        Ok(Some(RecordBatch::try_new(
            state_schema(),
            vec![
                Arc::new(StringArray::from(seg)),
                Arc::new(arrow::array::UInt8Array::from(kind)),
                Arc::new(arrow::array::Int64Array::from(t)),
                Arc::new(arrow::array::Float64Array::from(speed)),
                Arc::new(arrow::array::Float64Array::from(veh)),
                Arc::new(arrow::array::Float64Array::from(occ)),
            ],
        )?))
    }

    /// Restores a snapshot; rows of segments no longer in the road graph are dropped (their
    /// features can no longer be computed).
    fn restore(&mut self, state: RecordBatch) -> Result<(), OperatorError> {
        citystream_operators::common::check_state_schema("features", &state, &state_schema())?;
        let seg = state.column(0).as_string::<i32>();
        let kind = state.column(1).as_primitive::<arrow::datatypes::UInt8Type>();
        let t = state.column(2).as_primitive::<arrow::datatypes::Int64Type>();
        let f = |c: usize| state.column(c).as_primitive::<arrow::datatypes::Float64Type>().clone();
        let (speed, veh, occ) = (f(3), f(4), f(5));
        let n = self.graph.segments.len();
        self.history = vec![VecDeque::new(); n];
        self.pending.clear();
        self.pending_rows = 0;
        self.emitted = vec![i64::MIN; n];
        for i in 0..state.num_rows() {
            let Some(s) = self.graph.index_of(seg.value(i)) else { continue };
            match kind.value(i) {
                0 => self.history[s].push_back(Minute {
                    t: t.value(i),
                    speed: speed.value(i),
                    veh: veh.value(i),
                    occ: occ.value(i),
                }),
                1 => {
                    self.pending.entry(t.value(i)).or_default().push(s);
                    self.pending_rows += 1;
                }
                2 => self.emitted[s] = t.value(i),
                k => {
                    return Err(OperatorError::State { operator: "features", detail: format!("unknown row kind {k}") });
                }
            }
        }
        // the means binary-search each history: in minute order, each minute once (this
        // operator's snapshots are; a snapshot from elsewhere is put in that order, a later row
        // for the same minute winning as in `process_batch`)
        for h in &mut self.history {
            if h.iter().zip(h.iter().skip(1)).any(|(a, b)| a.t >= b.t) {
                let mut rows: Vec<Minute> = h.drain(..).collect();
                rows.sort_by_key(|m| m.t);
                for m in rows {
                    match h.back_mut() {
                        Some(last) if last.t == m.t => *last = m,
                        _ => h.push_back(m),
                    }
                }
            }
        }
        // a minute waiting to be emitted has its own row in the history (`row` relies on it)
        if let Some((t, s)) = self
            .pending
            .iter()
            .flat_map(|(t, ss)| ss.iter().map(move |s| (*t, *s)))
            .find(|(t, s)| at(&self.history[*s], *t).is_none())
        {
            return Err(OperatorError::State {
                operator: "features",
                detail: format!(
                    "minute {t} of segment {} waits to be emitted but is not in its history",
                    self.graph.segments[s].segment_id
                ),
            });
        }
        self.pending_gauge.set(self.pending_rows as f64);
        Ok(())
    }
}

pub(super) fn state_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("segment_id", DataType::Utf8, false),
        Field::new("kind", DataType::UInt8, false),
        Field::new("t", DataType::Int64, false),
        Field::new("speed", DataType::Float64, true),
        Field::new("veh", DataType::Float64, true),
        Field::new("occ", DataType::Float64, true),
    ]))
}

#[cfg(test)]
mod tests {
    use super::super::{FEATURES, FeaturesConfig};
    use super::*;
    use arrow::array::Float64Array;
    use arrow::datatypes::TimeUnit;
    use citystream_operators::Metrics;
    use citystream_operators::{BuildContext, OperatorConfig};

    /// The definition: every minute of the history in the span, scanned in order.
    fn scanned_mean(h: &VecDeque<Minute>, t: i64, lo: i64, hi: i64) -> Option<f64> {
        let (from, to) = (t - hi * MINUTE_MS, t - lo * MINUTE_MS);
        let v: Vec<f64> =
            h.iter().filter(|m| m.t >= from && m.t <= to).map(|m| m.speed).filter(|v| !v.is_nan()).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }

    #[test]
    fn span_means_and_lookups_equal_a_scan_of_the_whole_history() {
        // two hours with gaps (missing minutes) and NaN speeds, in order, each minute once
        let mut h = VecDeque::new();
        let mut x = 7u64;
        for minute in 0..120i64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            if x >> 61 == 0 {
                continue;
            }
            let speed = if x >> 59 & 3 == 1 { f64::NAN } else { (x >> 40) as f64 / 1e4 };
            h.push_back(Minute { t: minute * MINUTE_MS, speed, veh: 1.0, occ: 0.1 });
        }
        assert!(h.len() > 80 && h.len() < 120, "gaps: {}", h.len());
        for t in (-5..130).map(|m| m * MINUTE_MS) {
            for (lo, hi) in [(0, 0), (0, 4), (0, 14), (15, 19), (30, 34), (0, 59), (5, 9)] {
                let got = window_mean(&h, t, lo, hi, |m| m.speed);
                let want = scanned_mean(&h, t, lo, hi);
                // bit for bit: the same minutes summed in the same order
                assert_eq!(got.map(f64::to_bits), want.map(f64::to_bits), "t={t} lo={lo} hi={hi}");
            }
            assert_eq!(at(&h, t).map(|m| m.t), h.iter().find(|m| m.t == t).map(|m| m.t));
        }
    }

    fn input() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("window_end", DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())), false),
            Field::new("segment_id", DataType::Utf8, false),
            Field::new("vehicles", DataType::Float64, true),
            Field::new("mean_speed_kmh", DataType::Float64, true),
            Field::new("mean_occupancy", DataType::Float64, true),
        ]))
    }

    fn rows(r: &[(i64, &str, f64, Option<f64>, f64)]) -> RecordBatch {
        RecordBatch::try_new(
            input(),
            vec![
                Arc::new(
                    TimestampMillisecondArray::from_iter_values(r.iter().map(|x| x.0 * MINUTE_MS)).with_timezone("UTC"),
                ),
                Arc::new(StringArray::from_iter_values(r.iter().map(|x| x.1))),
                Arc::new(Float64Array::from_iter_values(r.iter().map(|x| x.2))),
                Arc::new(Float64Array::from(r.iter().map(|x| x.3).collect::<Vec<_>>())),
                Arc::new(Float64Array::from_iter_values(r.iter().map(|x| x.4))),
            ],
        )
        .unwrap()
    }

    /// A features operator over the road `a` (70 km/h) -> `b` (50 km/h), its graph file in `dir`.
    fn two_segments(dir: &std::path::Path) -> Box<dyn Operator> {
        let g = dir.join("g.csv");
        std::fs::write(&g, "segment_id,upstream,downstream,free_speed_kmh\na,,b,70\nb,a,,50\n").unwrap();
        let cfg: FeaturesConfig = serde_saphyr::from_str(&format!("road_graph: {}\n", g.display())).unwrap();
        cfg.build(&input(), &BuildContext { stage: "f".into(), metrics: Metrics::new(), ..Default::default() }).unwrap()
    }

    /// The feature values of a batch of feature rows, row-major.
    fn values(b: &RecordBatch) -> Vec<f32> {
        b.column(2).as_fixed_size_list().values().as_primitive::<arrow::datatypes::Float32Type>().values().to_vec()
    }

    #[test]
    fn a_minute_is_emitted_once_with_its_neighbours_and_later_rows_for_it_are_unmatched() {
        let dir = tempfile::tempdir().unwrap();
        let mut op = two_segments(dir.path());
        let mut out = Collector::new(2);
        // b had no vehicle (null speed) and a NaN one: both read as the free speed
        op.process_batch(
            rows(&[(1, "a", 10.0, Some(60.0), 0.3), (1, "b", 0.0, None, 0.1), (1, "x", 1.0, Some(1.0), 0.1)]),
            &mut out,
        )
        .unwrap();
        assert_eq!(out.port(1)[0].num_rows(), 1, "segment x is not in the graph");
        assert!(out.port(0).is_empty(), "waits for the watermark");
        op.on_watermark(MINUTE_MS, &mut out).unwrap();
        let b = &out.port(0)[0];
        assert_eq!(b.num_rows(), 2);
        let f = values(b);
        let w = FEATURES.len();
        let at = |row: usize, name: &str| f[row * w + FEATURES.iter().position(|n| *n == name).unwrap()];
        assert_eq!((at(0, "speed_1m"), at(1, "speed_1m")), (60.0, 50.0));
        assert_eq!(at(0, "down_speed_5m"), 50.0, "a's downstream is b");
        assert!((at(0, "occ_diff_1m") - 0.2).abs() < 1e-6);
        assert_eq!(at(1, "occ_diff_1m"), 0.0, "b has no downstream: its own occupancy");
        assert_eq!(at(0, "flow_5m_vph"), 600.0);
        // a second row for minute 1 after it was emitted: not a second feature row
        let mut out = Collector::new(2);
        op.process_batch(rows(&[(1, "a", 12.0, Some(f64::NAN), 0.3), (2, "b", 1.0, Some(f64::NAN), 0.1)]), &mut out)
            .unwrap();
        assert_eq!(out.port(1)[0].num_rows(), 1);
        op.on_end(&mut out).unwrap();
        let b = &out.port(0)[0];
        assert_eq!(b.num_rows(), 1);
        let v = b.column(2).as_fixed_size_list().values().as_primitive::<arrow::datatypes::Float32Type>().value(0);
        assert_eq!(v, 50.0, "a NaN speed reads as the free speed");
    }

    #[test]
    fn the_last_minutes_one_by_one_fall_back_to_the_free_speed_and_the_segments_own() {
        let dir = tempfile::tempdir().unwrap();
        let mut op = two_segments(dir.path());
        let mut out = Collector::new(2);
        // b has no row for minute 2; neither has one before minute 1
        op.process_batch(
            rows(&[
                (1, "a", 9.0, Some(60.0), 0.3),
                (1, "b", 9.0, Some(40.0), 0.2),
                (2, "a", 9.0, Some(55.0), 0.4),
                (3, "a", 9.0, Some(30.0), 0.5),
                (3, "b", 9.0, Some(45.0), 0.1),
            ]),
            &mut out,
        )
        .unwrap();
        op.on_end(&mut out).unwrap();
        let b = arrow::compute::concat_batches(&out.port(0)[0].schema(), out.port(0)).unwrap();
        let f = values(&b);
        let segs = b.column(0).as_string::<i32>();
        let times = b.column(1).as_primitive::<TimestampMillisecondType>();
        let row = |s: &str, m: i64| (0..b.num_rows()).find(|&i| segs.value(i) == s && times.value(i) == m * MINUTE_MS);
        let w = FEATURES.len();
        let at = |s: &str, m: i64, name: &str| {
            let r = row(s, m).unwrap_or_else(|| panic!("a row for {s} at minute {m}"));
            f[r * w + FEATURES.iter().position(|n| *n == name).unwrap()]
        };
        // a at minute 3: its own minutes 2 and 1, then no row (the free speed, occupancy 0)
        let own: Vec<f32> = ["speed_m1", "speed_m2", "speed_m3", "speed_m4"].iter().map(|n| at("a", 3, n)).collect();
        assert_eq!(own, [55.0, 60.0, 70.0, 70.0]);
        let occ: Vec<f32> = ["occ_m1", "occ_m2", "occ_m3"].iter().map(|n| at("a", 3, n)).collect();
        assert_eq!(occ, [0.4, 0.3, 0.0]);
        // its downstream b: this minute, its own where b has no row (minute 2), b's at minute 1
        assert_eq!(at("a", 3, "down_speed_1m"), 45.0);
        assert_eq!(
            (at("a", 3, "down_speed_m1"), at("a", 3, "down_speed_m2"), at("a", 3, "down_speed_m3")),
            (55.0, 40.0, 70.0)
        );
        assert_eq!((at("a", 3, "down_occ_m1"), at("a", 3, "down_occ_m2"), at("a", 3, "down_occ_m3")), (0.4, 0.2, 0.0));
        // no upstream: the segment's own
        assert_eq!((at("a", 3, "up_speed_1m"), at("a", 3, "up_speed_m1")), (30.0, 55.0));
        // b at minute 3: no row of its own at minute 2 (its free speed), its upstream a's
        assert_eq!((at("b", 3, "speed_m1"), at("b", 3, "occ_m1")), (50.0, 0.0));
        assert_eq!((at("b", 3, "up_speed_1m"), at("b", 3, "up_speed_m1"), at("b", 3, "up_occ_m1")), (30.0, 55.0, 0.4));
        assert!(row("b", 2).is_none(), "no feature row for a minute without a window row");
    }

    #[test]
    fn a_restored_snapshot_gives_the_uninterrupted_output() {
        let dir = tempfile::tempdir().unwrap();
        let build = || two_segments(dir.path());
        // 40 minutes of both segments; the watermark trails by two minutes
        let minute =
            |m: i64| rows(&[(m, "a", 5.0 + m as f64, Some(60.0 - m as f64), 0.3), (m, "b", 3.0, Some(40.0), 0.1)]);
        let run = |op: &mut Box<dyn Operator>, from: i64, to: i64, out: &mut Collector| {
            for m in from..to {
                op.process_batch(minute(m), out).unwrap();
                op.on_watermark((m - 2) * MINUTE_MS, out).unwrap();
            }
        };
        let mut whole = build();
        let mut expected = Collector::new(2);
        run(&mut whole, 1, 41, &mut expected);
        whole.on_end(&mut expected).unwrap();
        let mut first = build();
        let mut got = Collector::new(2);
        run(&mut first, 1, 21, &mut got);
        let state = first.snapshot().unwrap().unwrap();
        assert!(state.num_rows() > 40, "history, pending minutes and emitted marks");
        // the same snapshot with its rows in reverse order (not this operator's writing):
        // restored into minute order, it gives the same output
        let reversed = arrow::compute::take_record_batch(
            &state,
            &arrow::array::UInt32Array::from_iter_values((0..state.num_rows() as u32).rev()),
        )
        .unwrap();
        // without the history rows, the minutes still waiting are refused at restore
        let kinds = state.column(1).as_primitive::<arrow::datatypes::UInt8Type>();
        let pending_only =
            arrow::array::BooleanArray::from_iter((0..state.num_rows()).map(|i| Some(kinds.value(i) != 0)));
        let broken = arrow::compute::filter_record_batch(&state, &pending_only).unwrap();
        let e = build().restore(broken).unwrap_err();
        assert!(e.to_string().contains("waits to be emitted but is not in its history"), "{e}");
        let mut got_reversed = Collector::new(2);
        for c in 0..2 {
            for b in got.port(c) {
                got_reversed.emit(c, b.clone());
            }
        }
        let mut second = build();
        second.restore(state).unwrap();
        run(&mut second, 21, 41, &mut got);
        second.on_end(&mut got).unwrap();
        let cat = |c: &Collector| arrow::compute::concat_batches(&c.port(0)[0].schema(), c.port(0)).unwrap();
        assert_eq!(cat(&got), cat(&expected));
        let mut third = build();
        third.restore(reversed).unwrap();
        run(&mut third, 21, 41, &mut got_reversed);
        third.on_end(&mut got_reversed).unwrap();
        assert_eq!(cat(&got_reversed), cat(&expected), "a snapshot out of order");
    }
}
