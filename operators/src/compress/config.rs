//! The YAML of a `compress` stage: methods, tolerances, planning, what may change live.

use arrow::datatypes::SchemaRef;
use serde::Deserialize;

use crate::common::{KeyEncoder, columns, numeric_column, time_column};
use crate::{BuildContext, Duration, LiveChangeError, Operator, OperatorConfig, OutputSpec, PlanError};

use super::Compress;

/// A compression method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Swinging door trending.
    SwingingDoor,
    /// Deadband (half the tolerance around the last kept value).
    Deadband,
}

/// The tolerance of one field.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldTolerance {
    /// The method. Default `swinging_door`.
    #[serde(default = "d_method")]
    pub method: Method,
    /// Absolute tolerance, in the field's unit.
    #[serde(default)]
    pub abs: f64,
    /// Relative tolerance, a fraction of the reading's magnitude.
    #[serde(default)]
    pub rel: f64,
}

fn d_method() -> Method {
    Method::SwingingDoor
}
fn d_time() -> String {
    "ts".into()
}

impl FieldTolerance {
    /// The tolerance of a reading `v`: `max(abs, rel * |v|)`.
    pub(super) fn of(&self, v: f64) -> f64 {
        self.abs.max(self.rel * v.abs())
    }
}

/// YAML of a `compress` stage.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressConfig {
    /// The series key (e.g. `[station_id]`).
    pub key: Vec<String>,
    /// Fields and their tolerances. Tolerances are live-tunable.
    pub fields: std::collections::BTreeMap<String, FieldTolerance>,
    /// Keep the row before a silence longer than this. Default `15m`. Live-tunable; a longer
    /// gap applies to the series that spoke within the old one (a series already forgotten
    /// starts afresh at its next row, as it would have under the old gap).
    #[serde(default = "d_gap")]
    pub max_gap: Duration,
    /// The event-time column. Default `ts`.
    #[serde(default = "d_time")]
    pub time_column: String,
}

fn d_gap() -> Duration {
    Duration::from_secs(900)
}

/// (time column, key columns, (field column, tolerance))
type Checked = (usize, Vec<usize>, Vec<(usize, FieldTolerance)>);

impl CompressConfig {
    /// Tolerances and `max_gap` change live; the key and the set of fields do not.
    pub fn live_change(&self, new: &Self) -> Result<(), LiveChangeError> {
        if new.key != self.key || new.time_column != self.time_column || !new.fields.keys().eq(self.fields.keys()) {
            return Err(LiveChangeError::NeedsRestart(
                "the key, time column and set of fields of a compress stage need a restart; \
                        tolerances, methods and max_gap change live",
            ));
        }
        Ok(())
    }

    fn check(&self, input: &SchemaRef) -> Result<Checked, Vec<PlanError>> {
        let mut errs = Vec::new();
        let time = time_column(input, &self.time_column, "time_column").map_err(|e| errs.push(e)).ok();
        let keys = columns(input, &self.key, "key", &mut errs);
        if self.fields.is_empty() {
            errs.push(PlanError::new("fields", "list at least one field with its tolerance"));
        }
        let mut fields = Vec::new();
        for (name, tol) in &self.fields {
            let key = format!("fields.{name}");
            match numeric_column(input, name, &key) {
                Ok(c) => fields.push((c, *tol)),
                Err(e) => errs.push(e),
            }
            if !(tol.abs >= 0.0 && tol.rel >= 0.0 && tol.abs.is_finite() && tol.rel.is_finite()) {
                errs.push(PlanError::new(&key, "tolerances must be finite and non-negative"));
            }
            if tol.abs == 0.0 && tol.rel == 0.0 {
                errs.push(
                    PlanError::new(&key, format!("`{name}` has no tolerance: every reading would be kept"))
                        .with_help("set `abs` and/or `rel`"),
                );
            }
        }
        match (time, errs.is_empty()) {
            (Some(t), true) => Ok((t, keys, fields)),
            _ => Err(errs),
        }
    }
}

impl OperatorConfig for CompressConfig {
    fn state_scopes(&self, _input: &SchemaRef) -> Vec<crate::partitioning::StateScope> {
        vec![crate::partitioning::StateScope::Keys(self.key.clone())]
    }

    fn plan(&self, input: &SchemaRef) -> Result<Vec<OutputSpec>, Vec<PlanError>> {
        self.check(input)?;
        Ok(vec![OutputSpec::new("main", input.clone()), OutputSpec::new("late_events", input.clone())])
    }

    fn build(&self, input: &SchemaRef, ctx: &BuildContext) -> Result<Box<dyn Operator>, Vec<PlanError>> {
        let (time, keys, fields) = self.check(input)?;
        let keys = KeyEncoder::new(input, keys).map_err(|e| vec![PlanError::new("key", e.to_string())])?;
        Ok(Box::new(Compress::new(input, time, keys, fields, self.max_gap.as_millis_i64(), ctx)))
    }
}
