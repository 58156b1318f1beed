//! Sink tasks: write batches, make everything before a barrier durable and acknowledge it.

use std::collections::BTreeMap;

use citystream_operators::{Message, Metrics};
use tokio::sync::mpsc;

use super::align::{Aligner, Next};
use super::{PipelineError, cpu_metered};
use crate::config::{SinkConfig, SinkNode};
use crate::sink::parquet::{ParquetWriter, TableStats};
use crate::task::SinkAck;

/// Files of an hour stay open this long after the watermark passes the hour's end, so that
/// events within the out-of-orderness bound still land in the same file.
const HOUR_GRACE_MS: i64 = 10 * 60_000;

enum Writer {
    Parquet(Box<ParquetWriter>),
    Control(Box<crate::control::ControlCenter>),
    #[cfg(feature = "kafka")]
    Kafka {
        writer: crate::kafka::KafkaWriter,
        /// Key column per topic.
        keys: BTreeMap<String, Option<String>>,
    },
}

pub(crate) struct SinkTask {
    name: String,
    /// Table (or topic) of each input.
    tables: Vec<String>,
    /// Source stream of each input.
    origins: Vec<String>,
    cpu_ns: citystream_operators::Counter,
    rows_in: citystream_operators::Counter,
    bytes_in: citystream_operators::Counter,
    writer: Writer,
    ack: SinkAck,
}

impl SinkTask {
    pub(crate) fn try_new(
        node: &SinkNode,
        ack: SinkAck,
        metrics: &Metrics,
        thresholds: &citystream_operators::alert::ThresholdBoard,
        state: Option<&super::StateStore>,
        holding: &[String],
    ) -> Result<Self, PipelineError> {
        let writer = match &node.config {
            SinkConfig::Parquet(cfg) => {
                let mut w = ParquetWriter::try_new(&node.name, cfg, &node.tables, metrics)
                    .map_err(|source| PipelineError::Parquet { sink: node.name.clone(), source })?
                    .with_merged_tables(
                        node.tables.keys().filter(|t| node.inputs.iter().filter(|(n, _)| n == *t).count() > 1).cloned(),
                    );
                if let Some(s) = state {
                    // rows before the first barrier belong to the epoch after the restored one
                    w = w.with_epochs(s.lineage(), s.restored_epoch() + 1);
                    // rows a stage held (compress) come out after newer rows: their offsets no
                    // longer say which checkpoint wrote them, so such tables are named by epoch
                    w = w.without_positions(holding.iter().cloned());
                }
                Writer::Parquet(Box::new(w))
            }
            SinkConfig::ControlCenter(cfg) => Writer::Control(Box::new(
                crate::control::ControlCenter::start_with(&node.name, cfg, metrics, thresholds)
                    .map_err(|message| PipelineError::Build { stage: node.name.clone(), message })?,
            )),
            #[cfg(feature = "kafka")]
            SinkConfig::Kafka(cfg) => Writer::Kafka {
                writer: crate::kafka::KafkaWriter::try_new(&node.name, cfg, metrics)
                    .map_err(|e| PipelineError::KafkaSink { sink: node.name.clone(), message: e.to_string() })?,
                keys: cfg.topics.iter().map(|(t, r)| (t.clone(), r.key.clone())).collect(),
            },
        };
        Ok(Self {
            name: node.name.clone(),
            tables: node.inputs.iter().map(|(t, _)| t.clone()).collect(),
            origins: node.origins.clone(),
            cpu_ns: metrics.counter(
                "citystream_stage_cpu_nanoseconds_total",
                "Thread CPU time spent in a stage's operator.",
                &[("stage", node.name.as_str())],
            ),
            rows_in: metrics.counter(
                "citystream_stage_rows_in_total",
                "Rows received by a stage.",
                &[("stage", node.name.as_str())],
            ),
            bytes_in: metrics.counter(
                "citystream_stage_bytes_in_total",
                "Arrow bytes received by a stage.",
                &[("stage", node.name.as_str())],
            ),
            writer,
            ack,
        })
    }

    async fn write(&mut self, input: usize, batch: &arrow::array::RecordBatch) -> Result<(), PipelineError> {
        let table = &self.tables[input];
        match &mut self.writer {
            Writer::Parquet(w) => {
                let origin = &self.origins[input];
                cpu_metered(&self.cpu_ns, || w.write(table, origin, batch))
                    .map_err(|source| PipelineError::Parquet { sink: self.name.clone(), source })
            }
            Writer::Control(c) => cpu_metered(&self.cpu_ns, || c.apply(batch))
                .map_err(|message| PipelineError::ControlSink { sink: self.name.clone(), message }),
            #[cfg(feature = "kafka")]
            Writer::Kafka { writer, keys } => {
                let key = keys.get(table).cloned().flatten();
                writer
                    .write(table, key.as_deref(), batch)
                    .await
                    .map_err(|e| PipelineError::KafkaSink { sink: self.name.clone(), message: e.to_string() })
            }
        }
    }

    /// Makes everything written so far durable.
    async fn flush(&mut self) -> Result<(), PipelineError> {
        match &mut self.writer {
            Writer::Parquet(w) => cpu_metered(&self.cpu_ns, || w.flush())
                .map_err(|source| PipelineError::Parquet { sink: self.name.clone(), source }),
            // the book is in memory; decisions are stored when they are made
            Writer::Control(_) => Ok(()),
            #[cfg(feature = "kafka")]
            Writer::Kafka { writer, .. } => writer
                .flush()
                .await
                .map_err(|e| PipelineError::KafkaSink { sink: self.name.clone(), message: e.to_string() }),
        }
    }

    pub(crate) async fn run(
        mut self,
        inputs: Vec<mpsc::Receiver<Message>>,
    ) -> Result<BTreeMap<String, TableStats>, PipelineError> {
        let mut watermarks = vec![i64::MIN; self.tables.len()];
        let mut inputs = Aligner::new(inputs);
        loop {
            match inputs.next().await? {
                Next::Message(input, Message::Batch(b)) => {
                    self.rows_in.inc_by(b.num_rows() as u64);
                    self.bytes_in.inc_by(super::batch_bytes(&b));
                    self.write(input, &b).await?
                }
                Next::Message(input, Message::Watermark(wm)) => {
                    let before = watermarks.iter().copied().min().unwrap_or(i64::MIN);
                    watermarks[input] = watermarks[input].max(wm);
                    let after = watermarks.iter().copied().min().unwrap_or(i64::MIN);
                    if after > before
                        && let Writer::Parquet(w) = &mut self.writer
                    {
                        cpu_metered(&self.cpu_ns, || w.on_watermark(after, HOUR_GRACE_MS))
                            .map_err(|source| PipelineError::Parquet { sink: self.name.clone(), source })?;
                    }
                }
                Next::Message(input, Message::End) => watermarks[input] = i64::MAX,
                Next::Message(_, Message::Barrier(_)) => unreachable!("the aligner reports barriers as `Aligned`"),
                Next::Aligned(b) => {
                    // everything before the barrier, and nothing after it, is made durable
                    self.flush().await?;
                    if let Writer::Parquet(w) = &mut self.writer {
                        w.set_epoch(b.epoch + 1);
                    }
                    self.ack.ack(b.epoch);
                }
                Next::Ended => {
                    self.flush().await?;
                    return Ok(match &self.writer {
                        Writer::Parquet(w) => w.stats(),
                        Writer::Control(_) => BTreeMap::new(),
                        #[cfg(feature = "kafka")]
                        Writer::Kafka { .. } => BTreeMap::new(),
                    });
                }
            }
        }
    }
}
