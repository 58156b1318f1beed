//! Sink tasks.

use std::collections::BTreeMap;

use citystream_operators::{Message, Metrics};
use tokio::sync::mpsc;

use super::{Envelope, PipelineError, cpu};
use crate::config::{SinkConfig, SinkNode};
use crate::sink::parquet::{ParquetWriter, TableStats};

/// Files of an hour stay open this long after the watermark passes the hour's end, so that
/// events within the out-of-orderness bound still land in the same file.
const HOUR_GRACE_MS: i64 = 10 * 60_000;

pub(crate) struct SinkTask {
    name: String,
    /// Table of each input.
    tables: Vec<String>,
    writer: ParquetWriter,
}

impl SinkTask {
    pub(crate) fn try_new(node: &SinkNode, metrics: &Metrics) -> Result<Self, PipelineError> {
        let SinkConfig::Parquet(cfg) = &node.config;
        let writer = ParquetWriter::try_new(&node.name, cfg, &node.tables, metrics)
            .map_err(|source| PipelineError::Parquet { sink: node.name.clone(), source })?;
        Ok(Self { name: node.name.clone(), tables: node.inputs.iter().map(|(t, _)| t.clone()).collect(), writer })
    }

    fn err(&self) -> impl FnOnce(crate::sink::parquet::ParquetSinkError) -> PipelineError + '_ {
        |source| PipelineError::Parquet { sink: self.name.clone(), source }
    }

    pub(crate) async fn run(
        mut self,
        mut rx: mpsc::Receiver<Envelope>,
    ) -> Result<BTreeMap<String, TableStats>, PipelineError> {
        let n = self.tables.len();
        let mut watermarks = vec![i64::MIN; n];
        let mut ended = vec![false; n];
        let mut barriers: BTreeMap<u64, usize> = BTreeMap::new();
        loop {
            let Some(Envelope { input, msg }) = rx.recv().await else {
                return Err(PipelineError::Disconnected);
            };
            match msg {
                Message::Batch(b) => {
                    let table = &self.tables[input];
                    let writer = &mut self.writer;
                    cpu(|| writer.write(table, &b))
                        .map_err(|source| PipelineError::Parquet { sink: self.name.clone(), source })?;
                }
                Message::Watermark(wm) => {
                    let before = watermarks.iter().copied().min().unwrap_or(i64::MIN);
                    watermarks[input] = watermarks[input].max(wm);
                    let after = watermarks.iter().copied().min().unwrap_or(i64::MIN);
                    if after > before {
                        let writer = &mut self.writer;
                        cpu(|| writer.on_watermark(after, HOUR_GRACE_MS)).map_err(self.err())?;
                    }
                }
                Message::Barrier(b) => {
                    let seen = barriers.entry(b.epoch).or_insert(0);
                    *seen += 1;
                    if *seen == n {
                        barriers.remove(&b.epoch);
                        let writer = &mut self.writer;
                        cpu(|| writer.flush()).map_err(self.err())?;
                    }
                }
                Message::End => {
                    ended[input] = true;
                    watermarks[input] = i64::MAX;
                    if ended.iter().all(|e| *e) {
                        let writer = &mut self.writer;
                        cpu(|| writer.flush()).map_err(self.err())?;
                        return Ok(self.writer.stats());
                    }
                }
            }
        }
    }
}
