//! `filter`: keeps the rows that satisfy every condition of a conjunction, evaluated with Arrow
//! comparison kernels. Rows where a compared value is null do not pass (SQL semantics).

use crate::LiveChangeError;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, Datum, RecordBatch, Scalar, StringArray};
use arrow::compute::kernels::{boolean, cmp};
use arrow::compute::{cast, filter_record_batch, is_not_null, is_null};
use arrow::datatypes::{DataType, SchemaRef};
use serde::Deserialize;

use crate::{BuildContext, Collector, Operator, OperatorConfig, OperatorError, OutputSpec, PlanError, did_you_mean};

/// A literal in a condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    /// `true` / `false`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A number with a fraction.
    Float(f64),
    /// Text (also RFC 3339 timestamps for timestamp columns).
    Text(String),
    /// A list, for `in`.
    List(Vec<Literal>),
}

/// A boolean, an integer, a number, text or a list of these; anything else is refused naming
/// these forms.
impl<'de> Deserialize<'de> for Literal {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Literal;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a boolean, an integer, a number, text, or a list of these")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Literal, E> {
                Ok(Literal::Bool(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Literal, E> {
                Ok(Literal::Int(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Literal, E> {
                i64::try_from(v).map(Literal::Int).map_err(|_| E::custom("an integer beyond the 64-bit signed range"))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Literal, E> {
                Ok(Literal::Float(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Literal, E> {
                Ok(Literal::Text(v.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Literal, A::Error> {
                let mut items = Vec::new();
                while let Some(l) = seq.next_element::<Literal>()? {
                    items.push(l);
                }
                Ok(Literal::List(items))
            }
        }
        d.deserialize_any(V)
    }
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// `=`
    Eq,
    /// `<>`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// The value is null (takes no `value`).
    IsNull,
    /// The value is not null (takes no `value`).
    IsNotNull,
    /// The value equals one of a list.
    In,
}

/// One condition: `column op value`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// The column compared.
    pub column: String,
    /// The comparison.
    pub op: Op,
    /// The literal compared with (absent for `is_null` / `is_not_null`, a list for `in`).
    #[serde(default)]
    pub value: Option<Literal>,
}

/// YAML of a `filter` stage: rows pass when every condition holds.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// The conditions, all of which must hold.
    #[serde(rename = "where")]
    pub conditions: Vec<Condition>,
}

enum Compiled {
    Cmp { column: usize, op: Op, value: Scalar<ArrayRef> },
    Null { column: usize, negate: bool },
    In { column: usize, values: Vec<Scalar<ArrayRef>> },
}

fn literal_array(lit: &Literal, to: &DataType) -> Result<ArrayRef, String> {
    let text = |s: &str| Arc::new(StringArray::from(vec![s])) as ArrayRef;
    let source: ArrayRef = match (lit, to) {
        (Literal::Bool(b), DataType::Boolean) => Arc::new(BooleanArray::from(vec![*b])),
        (Literal::Int(i), t) if t.is_numeric() => Arc::new(arrow::array::Int64Array::from(vec![*i])),
        (Literal::Float(f), t) if t.is_floating() || t.is_numeric() => {
            Arc::new(arrow::array::Float64Array::from(vec![*f]))
        }
        (Literal::Int(i), DataType::Timestamp(..)) => Arc::new(arrow::array::Int64Array::from(vec![*i])),
        (Literal::Text(s), DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Timestamp(..)) => {
            text(s)
        }
        (Literal::List(_), _) => return Err("a list is only allowed with `op: in`".into()),
        (lit, t) => return Err(format!("the literal {lit:?} cannot be compared with a column of type {t}")),
    };
    let casted = cast(&source, to).map_err(|e| format!("the literal {lit:?} does not convert to {to}: {e}"))?;
    if casted.null_count() > 0 {
        return Err(format!("the literal {lit:?} does not convert to {to}"));
    }
    Ok(casted)
}

impl FilterConfig {
    fn compile(&self, input: &SchemaRef) -> Result<Vec<Compiled>, Vec<PlanError>> {
        let mut errors = Vec::new();
        let mut compiled = Vec::new();
        if self.conditions.is_empty() {
            errors.push(PlanError::new("where", "a filter needs at least one condition"));
        }
        for (i, c) in self.conditions.iter().enumerate() {
            let Ok(column) = input.index_of(&c.column) else {
                let names = input.fields().iter().map(|f| f.name().as_str());
                let mut e =
                    PlanError::new(format!("where[{i}].column"), format!("no column `{}` in the input", c.column));
                if let Some(s) = did_you_mean(&c.column, names) {
                    e = e.with_help(format!("did you mean `{s}`?"));
                }
                errors.push(e);
                continue;
            };
            let ty = input.field(column).data_type();
            let key = format!("where[{i}].value");
            match (c.op, &c.value) {
                (Op::IsNull | Op::IsNotNull, None) => {
                    compiled.push(Compiled::Null { column, negate: c.op == Op::IsNotNull });
                }
                (Op::IsNull | Op::IsNotNull, Some(_)) => {
                    errors.push(PlanError::new(key, "`is_null` and `is_not_null` take no value"))
                }
                (_, None) => errors.push(PlanError::new(key, "this comparison needs a `value`")),
                (Op::In, Some(Literal::List(items))) => {
                    let mut values = Vec::new();
                    for item in items {
                        match literal_array(item, ty) {
                            Ok(a) => values.push(Scalar::new(a)),
                            Err(m) => errors.push(PlanError::new(key.clone(), m)),
                        }
                    }
                    compiled.push(Compiled::In { column, values });
                }
                (Op::In, Some(_)) => errors.push(PlanError::new(key, "`op: in` needs a list value, e.g. `[car, bus]`")),
                (op, Some(lit)) => match literal_array(lit, ty) {
                    Ok(a) => compiled.push(Compiled::Cmp { column, op, value: Scalar::new(a) }),
                    Err(m) => errors.push(PlanError::new(key, m)),
                },
            }
        }
        if errors.is_empty() { Ok(compiled) } else { Err(errors) }
    }
}

impl FilterConfig {
    /// Values (thresholds) change live; the columns and comparisons do not.
    pub fn live_change(&self, new: &Self) -> Result<(), LiveChangeError> {
        let same_shape = self.conditions.len() == new.conditions.len()
            && self.conditions.iter().zip(&new.conditions).all(|(a, b)| a.column == b.column && a.op == b.op);
        if same_shape {
            Ok(())
        } else {
            Err(LiveChangeError::NeedsRestart(
                "the values of a filter's conditions change live; adding, removing or changing the column or \
                 comparison of a condition needs a restart",
            ))
        }
    }
}

impl OperatorConfig for FilterConfig {
    fn plan(&self, input: &SchemaRef) -> Result<Vec<OutputSpec>, Vec<PlanError>> {
        self.compile(input)?;
        Ok(vec![OutputSpec::new("main", input.clone())])
    }

    fn build(&self, input: &SchemaRef, _ctx: &BuildContext) -> Result<Box<dyn Operator>, Vec<PlanError>> {
        let conditions = self.compile(input)?;
        Ok(Box::new(Filter { conditions, input: input.clone(), outputs: vec![OutputSpec::new("main", input.clone())] }))
    }
}

/// The `filter` operator.
pub struct Filter {
    conditions: Vec<Compiled>,
    input: SchemaRef,
    outputs: Vec<OutputSpec>,
}

fn compare(op: Op, l: &dyn Datum, r: &dyn Datum) -> Result<BooleanArray, arrow::error::ArrowError> {
    match op {
        Op::Eq | Op::In => cmp::eq(l, r),
        Op::Ne => cmp::neq(l, r),
        Op::Lt => cmp::lt(l, r),
        Op::Le => cmp::lt_eq(l, r),
        Op::Gt => cmp::gt(l, r),
        Op::Ge => cmp::gt_eq(l, r),
        Op::IsNull | Op::IsNotNull => unreachable!("null tests are compiled separately"),
    }
}

impl Operator for Filter {
    fn kind(&self) -> &'static str {
        "filter"
    }

    fn outputs(&self) -> &[OutputSpec] {
        &self.outputs
    }

    fn retune(&mut self, config: &dyn std::any::Any) -> Result<(), LiveChangeError> {
        let new = config.downcast_ref::<FilterConfig>().ok_or(LiveChangeError::WrongConfig("filter"))?;
        self.conditions = new.compile(&self.input).map_err(|errs| {
            LiveChangeError::Invalid(
                errs.iter().map(|e| format!("{}: {}", e.key, e.message)).collect::<Vec<_>>().join("; "),
            )
        })?;
        Ok(())
    }

    fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<(), OperatorError> {
        let mut mask: Option<BooleanArray> = None;
        for c in &self.conditions {
            let m = match c {
                Compiled::Cmp { column, op, value } => compare(*op, batch.column(*column), value)?,
                Compiled::Null { column, negate: false } => is_null(batch.column(*column))?,
                Compiled::Null { column, negate: true } => is_not_null(batch.column(*column))?,
                Compiled::In { column, values } => {
                    let mut any: Option<BooleanArray> = None;
                    for v in values {
                        let m = compare(Op::Eq, batch.column(*column), v)?;
                        any = Some(match any {
                            None => m,
                            Some(a) => boolean::or_kleene(&a, &m)?,
                        });
                    }
                    any.unwrap_or_else(|| BooleanArray::from(vec![false; batch.num_rows()]))
                }
            };
            mask = Some(match mask {
                None => m,
                Some(prev) => boolean::and_kleene(&prev, &m)?,
            });
        }
        match mask {
            Some(m) => out.emit(0, filter_record_batch(&batch, &m)?),
            None => out.emit(0, batch),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{column_f32, column_str, traffic_batch};

    fn run(yaml: &str) -> RecordBatch {
        let cfg: FilterConfig = serde_saphyr::from_str(yaml).unwrap();
        let input = traffic_batch();
        let mut op = cfg.build(&input.schema(), &BuildContext::default()).unwrap();
        let mut out = Collector::new(1);
        op.process_batch(input, &mut out).unwrap();
        arrow::compute::concat_batches(&op.outputs()[0].schema, out.port(0)).unwrap()
    }

    #[test]
    fn conjunction_of_comparisons() {
        let b =
            run("where:\n  - {column: speed_kmh, op: lt, value: 50}\n  - {column: segment_id, op: eq, value: seg-1}\n");
        assert_eq!(column_str(&b, "sensor_id"), vec!["s1"]);
        assert_eq!(column_f32(&b, "speed_kmh"), vec![Some(20.0)]);
    }

    #[test]
    fn nulls_do_not_pass_comparisons_but_match_is_null() {
        let b = run("where:\n  - {column: speed_kmh, op: ge, value: 0}\n");
        assert_eq!(b.num_rows(), 2, "the null speed row is dropped");
        let b = run("where:\n  - {column: speed_kmh, op: is_null}\n");
        assert_eq!(column_str(&b, "sensor_id"), vec!["s3"]);
    }

    #[test]
    fn in_list() {
        let b = run("where:\n  - {column: sensor_id, op: in, value: [s1, s3]}\n");
        assert_eq!(column_str(&b, "sensor_id"), vec!["s1", "s3"]);
    }

    #[test]
    fn plan_reports_every_problem_with_its_key() {
        let cfg: FilterConfig = serde_saphyr::from_str(
            "where:\n  - {column: sped_kmh, op: lt, value: 5}\n  - {column: flow, op: gt}\n  - {column: flow, op: lt, value: abc}\n  - {column: flow, op: in, value: 3}\n",
        )
        .unwrap();
        let errs = cfg.plan(&traffic_batch().schema()).unwrap_err();
        let got: Vec<_> = errs.iter().map(|e| (e.key.as_str(), e.message.as_str(), e.help.as_deref())).collect();
        assert_eq!(got[0], ("where[0].column", "no column `sped_kmh` in the input", Some("did you mean `speed_kmh`?")));
        assert_eq!(got[1], ("where[1].value", "this comparison needs a `value`", None));
        assert_eq!(got[2].0, "where[2].value");
        assert!(got[2].1.contains("cannot be compared with a column of type Int32"), "{}", got[2].1);
        assert_eq!(got[3], ("where[3].value", "`op: in` needs a list value, e.g. `[car, bus]`", None));
    }
}
