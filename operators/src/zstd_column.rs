//! `zstd`: compresses a binary column (camera thumbnails) with zstd, optionally with a
//! dictionary trained on a sample (`citystream train-dict`). The column is replaced by
//! `{column}_zstd`, holding one zstd frame per value (nulls stay null); a frame names its
//! dictionary by id, so readers know which one to load.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BinaryArray, BinaryBuilder, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use serde::Deserialize;

use crate::common::column;
use crate::{BuildContext, Collector, Counter, Operator, OperatorConfig, OperatorError, OutputSpec, PlanError};

fn d_level() -> i32 {
    3
}

/// YAML of a `zstd` stage.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZstdConfig {
    /// The binary column to compress.
    pub column: String,
    /// zstd level, 1..=22. Default 3.
    #[serde(default = "d_level")]
    pub level: i32,
    /// A dictionary file from `citystream train-dict`.
    #[serde(default)]
    pub dictionary: Option<crate::EnvString>,
}

impl ZstdConfig {
    fn check(&self, input: &SchemaRef) -> Result<(usize, SchemaRef), Vec<PlanError>> {
        let mut errs = Vec::new();
        let c = column(input, &self.column, "column").map_err(|e| errs.push(e)).ok();
        if let Some(c) = c
            && input.field(c).data_type() != &DataType::Binary
        {
            errs.push(PlanError::new(
                "column",
                format!("`{}` is {}, not binary", self.column, input.field(c).data_type()),
            ));
        }
        if !(1..=22).contains(&self.level) {
            errs.push(PlanError::new("level", format!("zstd level {} is outside 1..=22", self.level)));
        }
        if let Some(d) = &self.dictionary
            && !std::path::Path::new(d.as_str()).is_file()
        {
            errs.push(
                PlanError::new("dictionary", format!("no dictionary file at `{}`", d.as_str()))
                    .with_help("train one with `citystream train-dict --out <file>`"),
            );
        }
        let (Some(c), true) = (c, errs.is_empty()) else { return Err(errs) };
        let fields: Vec<Field> = input
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| {
                if i == c {
                    Field::new(format!("{}_zstd", f.name()), DataType::Binary, f.is_nullable())
                } else {
                    f.as_ref().clone()
                }
            })
            .collect();
        Ok((c, Arc::new(Schema::new(fields))))
    }
}

impl OperatorConfig for ZstdConfig {
    /// Every column but the compressed one.
    fn passes_through(&self, input: &SchemaRef, _port: usize) -> Vec<String> {
        input.fields().iter().map(|f| f.name().clone()).filter(|n| *n != self.column).collect()
    }

    fn plan(&self, input: &SchemaRef) -> Result<Vec<OutputSpec>, Vec<PlanError>> {
        self.check(input).map(|(_, s)| vec![OutputSpec::new("main", s)])
    }

    fn build(&self, input: &SchemaRef, ctx: &BuildContext) -> Result<Box<dyn Operator>, Vec<PlanError>> {
        let (col, schema) = self.check(input)?;
        let dict = match &self.dictionary {
            Some(p) => std::fs::read(p.as_str())
                .map_err(|e| vec![PlanError::new("dictionary", format!("reading `{}`: {e}", p.as_str()))])?,
            None => Vec::new(),
        };
        let compressor = zstd::bulk::Compressor::with_dictionary(self.level, &dict)
            .map_err(|e| vec![PlanError::new("dictionary", format!("zstd rejected the dictionary: {e}"))])?;
        let l = [("stage", ctx.stage.as_str()), ("column", self.column.as_str())];
        Ok(Box::new(ZstdColumn {
            outputs: vec![OutputSpec::new("main", schema)],
            col,
            compressor,
            bytes_in: ctx.metrics.counter("citystream_zstd_bytes_in_total", "Bytes before zstd.", &l),
            bytes_out: ctx.metrics.counter("citystream_zstd_bytes_out_total", "Bytes after zstd.", &l),
        }))
    }
}

/// The `zstd` operator.
pub struct ZstdColumn {
    outputs: Vec<OutputSpec>,
    col: usize,
    compressor: zstd::bulk::Compressor<'static>,
    bytes_in: Counter,
    bytes_out: Counter,
}

impl std::fmt::Debug for ZstdColumn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZstdColumn").field("col", &self.col).finish_non_exhaustive()
    }
}

impl Operator for ZstdColumn {
    fn kind(&self) -> &'static str {
        "zstd"
    }

    fn outputs(&self) -> &[OutputSpec] {
        &self.outputs
    }

    fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<(), OperatorError> {
        let values: &BinaryArray = batch.column(self.col).as_binary::<i32>();
        let mut b = BinaryBuilder::with_capacity(values.len(), values.value_data().len() / 2);
        let (mut bin, mut bout) = (0u64, 0u64);
        for v in values.iter() {
            match v {
                None => b.append_null(),
                Some(v) => {
                    let z = self
                        .compressor
                        .compress(v)
                        .map_err(|e| OperatorError::Arrow(arrow::error::ArrowError::ExternalError(Box::new(e))))?;
                    bin += v.len() as u64;
                    bout += z.len() as u64;
                    b.append_value(&z);
                }
            }
        }
        self.bytes_in.inc_by(bin);
        self.bytes_out.inc_by(bout);
        let mut cols: Vec<ArrayRef> = batch.columns().to_vec();
        cols[self.col] = Arc::new(b.finish());
        out.emit(0, RecordBatch::try_new(self.outputs[0].schema.clone(), cols)?);
        Ok(())
    }
}

/// Trains a zstd dictionary of at most `max_bytes` on `samples`.
pub fn train_dictionary(samples: &[Vec<u8>], max_bytes: usize) -> std::io::Result<Vec<u8>> {
    zstd::dict::from_samples(samples, max_bytes)
}
