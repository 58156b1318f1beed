//! `california7`: the California incident detection algorithm #7 (Payne and Tignor, 1978), a
//! model-free fallback beside the learned detector. It compares a segment's occupancy with its
//! downstream neighbour's, minute by minute:
//!
//! - `OCCDF = occ - down_occ`, `OCCRDF = OCCDF / occ`, `DOCC = down_occ`;
//! - free → tentative when `OCCDF ≥ t1 ∧ OCCRDF ≥ t2 ∧ DOCC < t3` (a queue upstream, free
//!   flow downstream: #7's downstream-occupancy test suppresses compression waves);
//! - tentative → incident when `OCCRDF ≥ t2` holds the next minute (persistence), else free;
//! - incident continues while `OCCRDF ≥ t2`, else free.
//!
//! A gap in a segment's minutes starts it over in the free state. `keep` hands on input columns
//! beside the alarm (the features, for the incident model after it: its alert rule reads the
//! score and the alarm on one row, `confirm`). `models/train/train.py`
//! has the same state machine (used to calibrate the thresholds, reported in the incident
//! model card) and the tests compare the two.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Float32Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Float32Type, Schema, SchemaRef, TimestampMillisecondType};
use citystream_operators::common::{column, time_column};
use citystream_operators::{
    BuildContext, Collector, Counter, Gauge, Operator, OperatorConfig, OperatorError, OutputSpec, PlanError,
};
use serde::Deserialize;

use crate::features::FEATURES;

fn d_features() -> String {
    "features".into()
}
fn d_key() -> String {
    "segment_id".into()
}
fn d_time() -> String {
    "window_end".into()
}

/// YAML of a `california7` stage (reads the `features` stage's output).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct California7Config {
    /// OCCDF threshold (occupancy difference, 0..1).
    pub t1: f64,
    /// OCCRDF threshold (relative difference).
    pub t2: f64,
    /// DOCC threshold (downstream occupancy must be below it to start).
    pub t3: f64,
    /// The feature list column. Default `features`.
    #[serde(default = "d_features")]
    pub features: String,
    /// Default `segment_id`.
    #[serde(default = "d_key")]
    pub key: String,
    /// Default `window_end`.
    #[serde(default = "d_time")]
    pub time: String,
    /// Input columns handed on after the detector's own, unchanged (zero-copy): the
    /// `features` for a model stage after it, or a score for an alert rule that reads both.
    /// Default: none.
    #[serde(default)]
    pub keep: Vec<String>,
}

/// A planned stage: its input's feature, key and time columns, `keep`'s, and its output.
struct Planned {
    cols: (usize, usize, usize),
    kept: Vec<usize>,
    schema: SchemaRef,
}

/// The detector's own output columns, after the key and the time.
const OWN: [&str; 5] = ["occdf", "occrdf", "docc", "state", "incident"];

const OCC: usize = 7;
const DOWN_OCC: usize = 12;

impl California7Config {
    fn check(&self, input: &SchemaRef) -> Result<Planned, Vec<PlanError>> {
        debug_assert_eq!((FEATURES[OCC], FEATURES[DOWN_OCC]), ("occ_1m", "down_occ_1m"));
        let mut errs = Vec::new();
        let f = column(input, &self.features, "features").map_err(|e| errs.push(e)).ok();
        let k = column(input, &self.key, "key").map_err(|e| errs.push(e)).ok();
        let t = time_column(input, &self.time, "time").map_err(|e| errs.push(e)).ok();
        let own: Vec<&str> = [self.key.as_str(), self.time.as_str()].into_iter().chain(OWN).collect();
        let kept = citystream_operators::common::kept_columns(input, &self.keep, &own, &mut errs);
        if let Some(f) = f {
            let field = input.field(f);
            let ok = matches!(field.data_type(), DataType::FixedSizeList(item, w)
                if item.data_type() == &DataType::Float32 && *w as usize == FEATURES.len());
            let names = field.metadata().get("features");
            if !ok || names.is_some_and(|n| *n != serde_json::to_string(&FEATURES[..]).unwrap_or_default()) {
                errs.push(PlanError::new(
                    "features",
                    format!("`{}` is not the `features` stage's output", self.features),
                ));
            }
        }
        if let Some(k) = k
            && input.field(k).data_type() != &DataType::Utf8
        {
            errs.push(PlanError::new("key", format!("`{}` is not a string column", self.key)));
        }
        for (name, v) in [("t1", self.t1), ("t2", self.t2), ("t3", self.t3)] {
            if !(v.is_finite() && v > 0.0) {
                errs.push(PlanError::new(name, format!("{name} = {v}: must be a positive number")));
            }
        }
        let (Some(f), Some(k), Some(t), true) = (f, k, t, errs.is_empty()) else { return Err(errs) };
        let mut fields = vec![
            input.field(k).as_ref().clone(),
            input.field(t).as_ref().clone(),
            Field::new(OWN[0], DataType::Float32, false),
            Field::new(OWN[1], DataType::Float32, false),
            Field::new(OWN[2], DataType::Float32, false),
            Field::new(OWN[3], DataType::Utf8, false),
            Field::new(OWN[4], DataType::Boolean, false),
        ];
        fields.extend(kept.iter().map(|&c| input.field(c).as_ref().clone()));
        Ok(Planned { cols: (f, k, t), kept, schema: Arc::new(Schema::new(fields)) })
    }
}

impl OperatorConfig for California7Config {
    fn passes_through(&self, _input: &SchemaRef, _port: usize) -> Vec<String> {
        [&self.key].into_iter().chain(&self.keep).cloned().collect()
    }

    fn state_scopes(&self, _input: &SchemaRef) -> Vec<citystream_operators::partitioning::StateScope> {
        vec![citystream_operators::partitioning::StateScope::Keys(vec![self.key.clone()])]
    }

    fn plan(&self, input: &SchemaRef) -> Result<Vec<OutputSpec>, Vec<PlanError>> {
        Ok(vec![OutputSpec::new("main", self.check(input)?.schema)])
    }

    fn build(&self, input: &SchemaRef, ctx: &BuildContext) -> Result<Box<dyn Operator>, Vec<PlanError>> {
        let Planned { cols, kept, schema } = self.check(input)?;
        let l = [("stage", ctx.stage.as_str())];
        Ok(Box::new(California7 {
            cfg: self.clone(),
            cols,
            kept,
            outputs: vec![OutputSpec::new("main", schema)],
            states: HashMap::new(),
            alarms: ctx.metrics.counter(
                "citystream_california7_alarm_minutes_total",
                "Segment-minutes in the incident state.",
                &l,
            ),
            open: ctx.metrics.gauge("citystream_california7_open_incidents", "Segments now in the incident state.", &l),
        }))
    }
}

/// The detector's state for one segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// No incident.
    Free,
    /// Thresholds crossed once.
    Tentative,
    /// Incident declared.
    Incident,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Free => "free",
            State::Tentative => "tentative",
            State::Incident => "incident",
        }
    }
}

/// One step of the state machine (see the module docs).
pub fn step(state: State, occ: f64, down_occ: f64, t1: f64, t2: f64, t3: f64) -> (State, f64, f64) {
    let occdf = occ - down_occ;
    let occrdf = if occ > 0.0 { occdf / occ } else { 0.0 };
    let next = match state {
        State::Free if occdf >= t1 && occrdf >= t2 && down_occ < t3 => State::Tentative,
        State::Free => State::Free,
        State::Tentative | State::Incident if occrdf >= t2 => State::Incident,
        State::Tentative | State::Incident => State::Free,
    };
    (next, occdf, occrdf)
}

/// The `california7` operator.
pub struct California7 {
    cfg: California7Config,
    cols: (usize, usize, usize),
    /// `keep`'s columns
    kept: Vec<usize>,
    outputs: Vec<OutputSpec>,
    /// segment -> (state, minute of its last row)
    states: HashMap<String, (State, i64)>,
    alarms: Counter,
    open: Gauge,
}

impl std::fmt::Debug for California7 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("California7").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

impl Operator for California7 {
    fn kind(&self) -> &'static str {
        "california7"
    }

    fn outputs(&self) -> &[OutputSpec] {
        &self.outputs
    }

    fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<(), OperatorError> {
        let (fc, kc, tc) = self.cols;
        let list = batch.column(fc).as_fixed_size_list();
        if list.null_count() > 0 {
            return Err(OperatorError::Arrow(arrow::error::ArrowError::InvalidArgumentError(
                "a feature row is null".into(),
            )));
        }
        let values = list.values().as_primitive::<Float32Type>().values();
        let keys = batch.column(kc).as_string::<i32>();
        let times = batch.column(tc).as_primitive::<TimestampMillisecondType>();
        let w = FEATURES.len();
        let n = batch.num_rows();
        let (mut occdfs, mut occrdfs, mut doccs, mut names, mut alarm) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for i in 0..n {
            let row = (list.offset() + i) * w;
            let (occ, docc) = (f64::from(values[row + OCC]), f64::from(values[row + DOWN_OCC]));
            let t = times.value(i);
            let entry = self.states.entry(keys.value(i).to_owned()).or_insert((State::Free, i64::MIN));
            let prev = if entry.1 != i64::MIN && t - entry.1 == 60_000 { entry.0 } else { State::Free };
            let (next, occdf, occrdf) = step(prev, occ, docc, self.cfg.t1, self.cfg.t2, self.cfg.t3);
            *entry = (next, t);
            occdfs.push(occdf as f32);
            occrdfs.push(occrdf as f32);
            doccs.push(docc as f32);
            names.push(next.name());
            alarm.push(next == State::Incident);
        }
        let alarms = alarm.iter().filter(|a| **a).count();
        self.alarms.inc_by(alarms as u64);
        self.open.set(self.states.values().filter(|s| s.0 == State::Incident).count() as f64);
        let mut cols: Vec<ArrayRef> = vec![
            batch.column(kc).clone(),
            batch.column(tc).clone(),
            Arc::new(Float32Array::from(occdfs)),
            Arc::new(Float32Array::from(occrdfs)),
            Arc::new(Float32Array::from(doccs)),
            Arc::new(StringArray::from(names)),
            Arc::new(BooleanArray::from(alarm)),
        ];
        cols.extend(self.kept.iter().map(|&c| batch.column(c).clone()));
        out.emit(0, RecordBatch::try_new(self.outputs[0].schema.clone(), cols)?);
        Ok(())
    }

    fn is_stateful(&self) -> bool {
        true
    }

    /// Each segment's state and the minute of its last row.
    fn snapshot(&self) -> Result<Option<RecordBatch>, OperatorError> {
        let mut rows: Vec<(&String, &(State, i64))> = self.states.iter().collect();
        rows.sort_unstable_by(|a, b| a.0.cmp(b.0));
        Ok(Some(RecordBatch::try_new(
            state_schema(),
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0.as_str()))),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1.0.name()))),
                Arc::new(arrow::array::Int64Array::from_iter_values(rows.iter().map(|r| r.1.1))),
            ],
        )?))
    }

    fn restore(&mut self, state: RecordBatch) -> Result<(), OperatorError> {
        let bad = |detail: String| OperatorError::State { operator: "california7", detail };
        citystream_operators::common::check_state_schema("california7", &state, &state_schema())?;
        let (keys, names) = (state.column(0).as_string::<i32>(), state.column(1).as_string::<i32>());
        let t = state.column(2).as_primitive::<arrow::datatypes::Int64Type>();
        self.states.clear();
        for i in 0..state.num_rows() {
            let s = match names.value(i) {
                "free" => State::Free,
                "tentative" => State::Tentative,
                "incident" => State::Incident,
                other => return Err(bad(format!("unknown state `{other}`"))),
            };
            self.states.insert(keys.value(i).to_owned(), (s, t.value(i)));
        }
        self.open.set(self.states.values().filter(|s| s.0 == State::Incident).count() as f64);
        Ok(())
    }
}

fn state_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("segment_id", DataType::Utf8, false),
        Field::new("state", DataType::Utf8, false),
        Field::new("t", DataType::Int64, false),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: (f64, f64, f64) = (0.05, 0.3, 0.2);

    fn run(minutes: &[(f64, f64)]) -> Vec<State> {
        let mut s = State::Free;
        minutes
            .iter()
            .map(|&(o, d)| {
                s = step(s, o, d, T.0, T.1, T.2).0;
                s
            })
            .collect()
    }

    #[test]
    fn a_persistent_queue_above_free_flow_is_declared_after_two_minutes_and_cleared_when_it_goes() {
        use State::*;
        let queue = (0.35, 0.08); // OCCDF 0.27, OCCRDF 0.77, DOCC 0.08
        let clear = (0.10, 0.09);
        assert_eq!(
            run(&[clear, queue, queue, queue, clear, clear]),
            vec![Free, Tentative, Incident, Incident, Free, Free]
        );
        // one minute is not enough
        assert_eq!(run(&[queue, clear, queue, clear]), vec![Tentative, Free, Tentative, Free]);
    }

    #[test]
    fn a_compression_wave_with_heavy_downstream_occupancy_does_not_start_one() {
        // upstream heavier than downstream by enough, but downstream itself is congested (>= t3)
        assert_eq!(run(&[(0.6, 0.3), (0.6, 0.3), (0.6, 0.3)]), vec![State::Free; 3]);
    }

    /// `keep` hands on input columns after the detector's own, the same arrays; a column of its
    /// own output is refused.
    #[test]
    fn kept_columns_follow_the_detectors_own_unchanged() {
        use arrow::array::{FixedSizeListArray, Float64Array, TimestampMillisecondArray};
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        let list = DataType::FixedSizeList(item.clone(), FEATURES.len() as i32);
        let ts = DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, Some("UTC".into()));
        let input = Arc::new(Schema::new(vec![
            Field::new("segment_id", DataType::Utf8, false),
            Field::new("window_end", ts, false),
            Field::new("features", list, false)
                .with_metadata([("features".to_owned(), serde_json::to_string(&FEATURES[..]).unwrap())].into()),
            Field::new("score", DataType::Float64, true),
        ]));
        let cfg = |keep: &str| -> California7Config {
            serde_saphyr::from_str(&format!("t1: 0.05\nt2: 0.3\nt3: 0.2\nkeep: [{keep}]\n")).unwrap()
        };
        let mut values = vec![0f32; 2 * FEATURES.len()];
        (values[OCC], values[DOWN_OCC]) = (0.35, 0.08);
        let features = FixedSizeListArray::new(item, FEATURES.len() as i32, Arc::new(Float32Array::from(values)), None);
        let batch = RecordBatch::try_new(
            input.clone(),
            vec![
                Arc::new(StringArray::from(vec!["s1", "s2"])),
                Arc::new(TimestampMillisecondArray::from(vec![60_000, 60_000]).with_timezone("UTC")),
                Arc::new(features),
                Arc::new(Float64Array::from(vec![Some(0.9), None])),
            ],
        )
        .unwrap();
        let mut op = cfg("score, features").build(&input, &BuildContext::default()).unwrap();
        let mut out = Collector::new(1);
        op.process_batch(batch.clone(), &mut out).unwrap();
        let (_, got) = out.drain().next().unwrap();
        let names: Vec<String> = got.schema().fields().iter().map(|f| f.name().clone()).collect();
        assert_eq!(
            names,
            ["segment_id", "window_end", "occdf", "occrdf", "docc", "state", "incident", "score", "features"]
        );
        // the same arrays, not copies, with the features' metadata (the model stage reads it)
        assert!(Arc::ptr_eq(got.column(7), batch.column(3)) && Arc::ptr_eq(got.column(8), batch.column(2)));
        assert_eq!(got.schema().field(8), input.field(2));
        assert_eq!(cfg("score, features").passes_through(&input, 0), ["segment_id", "score", "features"]);
        assert_eq!(got.column(5).as_string::<i32>().value(0), "tentative");
        for own in ["incident", "segment_id"] {
            let errs = cfg(own).plan(&input).unwrap_err();
            assert!(errs.iter().any(|e| e.key == "keep[0]" && e.message.contains(own)), "{errs:?}");
        }
        let errs = cfg("scores").plan(&input).unwrap_err();
        assert!(errs.iter().any(|e| e.key == "keep[0]"), "{errs:?}");
        let errs = cfg("score, score").plan(&input).unwrap_err();
        assert!(errs.iter().any(|e| e.key == "keep[1]" && e.message.contains("twice")), "{errs:?}");
    }

    #[test]
    fn empty_road_and_equal_occupancies_never_alarm() {
        assert_eq!(run(&[(0.0, 0.0), (0.2, 0.2), (0.0, 0.3)]), vec![State::Free; 3]);
    }
}
