//! Schema flow: every stage planned against the schema of its inputs, in topological order.

use arrow::datatypes::SchemaRef;

use super::{Planner, StageNode};

impl Planner<'_> {
    /// Plans the stages in `order`; a stage whose inputs did not resolve is left out.
    pub(super) fn plan_stages(&mut self, order: &[&str]) -> Vec<StageNode> {
        let raw = self.raw;
        let mut stages = Vec::new();
        for name in order {
            let st = &raw.stages[*name];
            let mut inputs = Vec::new();
            let mut schema: Option<SchemaRef> = None;
            for (i, inp) in st.input.0.iter().enumerate() {
                let path = if st.input.0.len() == 1 {
                    format!("stages.{name}.input")
                } else {
                    format!("stages.{name}.input[{i}]")
                };
                if let Some((r, s)) = self.resolve(&inp.value, inp.referenced, &path) {
                    match &schema {
                        Some(prev) if prev != &s => {
                            self.ck.error(
                                inp.referenced,
                                &path,
                                format!("`{r}` has a different schema from the stage's other inputs"),
                                Some("all inputs of a stage must carry the same columns".into()),
                            );
                        }
                        _ => schema = Some(s),
                    }
                    inputs.push(r);
                }
            }
            if st.input.0.is_empty() {
                self.ck.error(st.location, format!("stages.{name}.input"), "a stage needs at least one input", None);
            }
            let Some(input_schema) = schema else { continue };
            if inputs.len() != st.input.0.len() {
                continue;
            }
            match st.op.config().plan(&input_schema) {
                Ok(outputs) => {
                    self.ports.insert((*name).to_owned(), outputs.clone());
                    stages.push(StageNode {
                        name: (*name).to_owned(),
                        op: st.op.clone(),
                        inputs,
                        input_schema,
                        outputs,
                    });
                }
                Err(errs) => {
                    for e in errs {
                        self.ck.error(st.location, format!("stages.{name}.{}", e.key), e.message, e.help);
                    }
                }
            }
        }
        stages
    }
}
