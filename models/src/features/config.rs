//! YAML of a `features` stage, its planning and the output schema.

use std::path::Path;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use citystream_operators::common::{column, numeric_column, time_column};
use citystream_operators::{BuildContext, EnvString, Operator, OperatorConfig, OutputSpec, PlanError};
use serde::Deserialize;

use super::FEATURES;
use super::operator::FeatureBuilder;
use citystream_operators::road_graph::RoadGraph;
pub(super) fn d_time() -> String {
    "window_end".into()
}
pub(super) fn d_segment() -> String {
    "segment_id".into()
}
pub(super) fn d_vehicles() -> String {
    "vehicles".into()
}
pub(super) fn d_speed() -> String {
    "mean_speed_kmh".into()
}
pub(super) fn d_occupancy() -> String {
    "mean_occupancy".into()
}
pub(super) fn d_output() -> String {
    "features".into()
}

/// YAML of a `features` stage.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeaturesConfig {
    /// The road graph CSV (`segment_id,upstream,downstream,...,free_speed_kmh,...`), as the
    /// simulator's ground truth writes it.
    pub road_graph: EnvString,
    /// The minute's end (millisecond timestamp). Default `window_end`.
    #[serde(default = "d_time")]
    pub time: String,
    /// Default `segment_id`.
    #[serde(default = "d_segment")]
    pub segment: String,
    /// Vehicles counted in the minute. Default `vehicles`.
    #[serde(default = "d_vehicles")]
    pub vehicles: String,
    /// Mean speed, km/h (null when no vehicle passed). Default `mean_speed_kmh`.
    #[serde(default = "d_speed")]
    pub speed: String,
    /// Mean occupancy, 0..1. Default `mean_occupancy`.
    #[serde(default = "d_occupancy")]
    pub occupancy: String,
    /// Name of the output column. Default `features`.
    #[serde(default = "d_output")]
    pub output: String,
}

pub(super) struct Cols {
    pub(super) time: usize,
    pub(super) segment: usize,
    pub(super) vehicles: usize,
    pub(super) speed: usize,
    pub(super) occupancy: usize,
}

impl FeaturesConfig {
    pub(super) fn check(&self, input: &SchemaRef) -> Result<(Cols, SchemaRef), Vec<PlanError>> {
        let mut errs = Vec::new();
        let mut ok = |r: Result<usize, PlanError>| r.map_err(|e| errs.push(e)).ok();
        let time = ok(time_column(input, &self.time, "time"));
        let segment = ok(column(input, &self.segment, "segment"));
        let vehicles = ok(numeric_column(input, &self.vehicles, "vehicles"));
        let speed = ok(numeric_column(input, &self.speed, "speed"));
        let occupancy = ok(numeric_column(input, &self.occupancy, "occupancy"));
        if let Some(s) = segment
            && input.field(s).data_type() != &DataType::Utf8
        {
            errs.push(PlanError::new(
                "segment",
                format!("`{}` is {}, not a string", self.segment, input.field(s).data_type()),
            ));
        }
        if !Path::new(self.road_graph.as_str()).is_file() {
            errs.push(
                PlanError::new("road_graph", format!("no road graph at `{}`", self.road_graph.as_str()))
                    .with_help("`citystream simulate --out DIR` writes the simulated city's graph to DIR/ground_truth/road_graph.csv"),
            );
        }
        let (Some(time), Some(segment), Some(vehicles), Some(speed), Some(occupancy), true) =
            (time, segment, vehicles, speed, occupancy, errs.is_empty())
        else {
            return Err(errs);
        };
        Ok((Cols { time, segment, vehicles, speed, occupancy }, features_schema(input, segment, time, &self.output)))
    }
}

/// The output schema: segment, time, and the feature list column (names in its metadata).
pub fn features_schema(input: &SchemaRef, segment: usize, time: usize, output: &str) -> SchemaRef {
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let list = Field::new(output, DataType::FixedSizeList(item, FEATURES.len() as i32), false).with_metadata(
        [("features".to_string(), serde_json::to_string(&FEATURES[..]).expect("names serialize"))].into(),
    );
    Arc::new(Schema::new(vec![
        input.field(segment).as_ref().clone().with_nullable(false),
        input.field(time).as_ref().clone().with_nullable(false),
        list,
    ]))
}

impl OperatorConfig for FeaturesConfig {
    /// A segment's rows and its upstream and downstream neighbours' (from the road graph; an
    /// unreadable graph is reported by `plan`).
    fn passes_through(&self, input: &SchemaRef, port: usize) -> Vec<String> {
        match port {
            0 => vec![self.segment.clone()],
            _ => citystream_operators::partitioning::unchanged_columns(self.plan(input), input, port),
        }
    }

    fn state_scopes(&self, _input: &SchemaRef) -> Vec<citystream_operators::partitioning::StateScope> {
        let pairs = match RoadGraph::read(Path::new(self.road_graph.as_str())) {
            Ok(g) => g
                .segments
                .iter()
                .flat_map(|s| {
                    [s.upstream, s.downstream]
                        .into_iter()
                        .flatten()
                        .map(|n| (s.segment_id.clone(), g.segments[n].segment_id.clone()))
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        vec![citystream_operators::partitioning::StateScope::Neighbours { key: self.segment.clone(), pairs }]
    }

    fn plan(&self, input: &SchemaRef) -> Result<Vec<OutputSpec>, Vec<PlanError>> {
        let (_, schema) = self.check(input)?;
        Ok(vec![OutputSpec::new("main", schema), OutputSpec::new("unmatched", input.clone())])
    }

    fn build(&self, input: &SchemaRef, ctx: &BuildContext) -> Result<Box<dyn Operator>, Vec<PlanError>> {
        let (cols, schema) = self.check(input)?;
        let graph = RoadGraph::read(Path::new(self.road_graph.as_str()))
            .map_err(|e| vec![PlanError::new("road_graph", e.to_string())])?;
        let l = [("stage", ctx.stage.as_str())];
        Ok(Box::new(FeatureBuilder::new(
            graph,
            cols,
            vec![OutputSpec::new("main", schema), OutputSpec::new("unmatched", input.clone())],
            ctx.metrics.counter("citystream_features_rows_total", "Feature rows emitted.", &l),
            ctx.metrics.counter("citystream_features_unmatched_total", "Rows of segments not in the road graph.", &l),
            ctx.metrics.gauge("citystream_features_pending_rows", "Rows waiting for the watermark.", &l),
        )))
    }
}
