//! `project`: keeps, orders and renames columns (zero-copy: columns are shared, not copied).

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{Field, Schema, SchemaRef};
use serde::Deserialize;

use crate::{BuildContext, Collector, Operator, OperatorConfig, OperatorError, OutputSpec, PlanError, did_you_mean};

/// YAML of a `project` stage.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectConfig {
    /// The columns to keep, in output order.
    pub columns: Vec<String>,
    /// Optional renames, `old: new`, of kept columns.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
}

impl ProjectConfig {
    fn compile(&self, input: &SchemaRef) -> Result<(Vec<usize>, SchemaRef), Vec<PlanError>> {
        let mut errors = Vec::new();
        let mut indices = Vec::new();
        let mut fields = Vec::new();
        if self.columns.is_empty() {
            errors.push(PlanError::new("columns", "keep at least one column"));
        }
        for (i, name) in self.columns.iter().enumerate() {
            match input.index_of(name) {
                Ok(idx) => {
                    indices.push(idx);
                    let f = input.field(idx);
                    let out_name = self.rename.get(name).unwrap_or(name);
                    fields.push(
                        Field::new(out_name, f.data_type().clone(), f.is_nullable())
                            .with_metadata(f.metadata().clone()),
                    );
                }
                Err(_) => {
                    let mut e = PlanError::new(format!("columns[{i}]"), format!("no column `{name}` in the input"));
                    if let Some(s) = did_you_mean(name, input.fields().iter().map(|f| f.name().as_str())) {
                        e = e.with_help(format!("did you mean `{s}`?"));
                    }
                    errors.push(e);
                }
            }
        }
        for old in self.rename.keys() {
            if !self.columns.contains(old) {
                errors.push(PlanError::new(
                    format!("rename.{old}"),
                    format!("`{old}` is renamed but not kept in `columns`"),
                ));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for f in &fields {
            if !seen.insert(f.name().clone()) {
                errors
                    .push(PlanError::new("columns", format!("the output would have two columns named `{}`", f.name())));
            }
        }
        if errors.is_empty() { Ok((indices, Arc::new(Schema::new(fields)))) } else { Err(errors) }
    }
}

impl OperatorConfig for ProjectConfig {
    /// The kept columns that are not renamed (a rename puts other values under a name).
    fn passes_through(&self, _input: &SchemaRef, _port: usize) -> Vec<String> {
        self.columns
            .iter()
            .filter(|c| !self.rename.contains_key(*c) && !self.rename.values().any(|v| v == *c))
            .cloned()
            .collect()
    }

    fn plan(&self, input: &SchemaRef) -> Result<Vec<OutputSpec>, Vec<PlanError>> {
        let (_, schema) = self.compile(input)?;
        Ok(vec![OutputSpec::new("main", schema)])
    }

    fn build(&self, input: &SchemaRef, _ctx: &BuildContext) -> Result<Box<dyn Operator>, Vec<PlanError>> {
        let (indices, schema) = self.compile(input)?;
        Ok(Box::new(Project { indices, outputs: vec![OutputSpec::new("main", schema)] }))
    }
}

/// The `project` operator.
pub struct Project {
    indices: Vec<usize>,
    outputs: Vec<OutputSpec>,
}

impl Operator for Project {
    fn kind(&self) -> &'static str {
        "project"
    }

    fn outputs(&self) -> &[OutputSpec] {
        &self.outputs
    }

    fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<(), OperatorError> {
        let columns = self.indices.iter().map(|&i| batch.column(i).clone()).collect();
        out.emit(0, RecordBatch::try_new(self.outputs[0].schema.clone(), columns)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{column_str, traffic_batch};

    #[test]
    fn keeps_orders_and_renames() {
        let cfg: ProjectConfig =
            serde_saphyr::from_str("columns: [segment_id, sensor_id]\nrename: {sensor_id: detector}\n").unwrap();
        let input = traffic_batch();
        let mut op = cfg.build(&input.schema(), &BuildContext::default()).unwrap();
        let mut out = Collector::new(1);
        op.process_batch(input, &mut out).unwrap();
        let b = &out.port(0)[0];
        let names: Vec<_> = b.schema().fields().iter().map(|f| f.name().clone()).collect();
        assert_eq!(names, ["segment_id", "detector"]);
        assert_eq!(column_str(b, "detector"), vec!["s1", "s2", "s3"]);
    }

    #[test]
    fn plan_errors() {
        let cfg: ProjectConfig =
            serde_saphyr::from_str("columns: [segmnt_id, flow]\nrename: {speed_kmh: v, flow: flow2}\n").unwrap();
        let errs = cfg.plan(&traffic_batch().schema()).unwrap_err();
        assert_eq!(errs[0].key, "columns[0]");
        assert_eq!(errs[0].help.as_deref(), Some("did you mean `segment_id`?"));
        assert_eq!(errs[1].key, "rename.speed_kmh");
        assert_eq!(errs.len(), 2);
    }
}
