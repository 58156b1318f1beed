//! The Kafka sink: rows as JSON objects, keyed by a column, on an idempotent producer with
//! zstd compression. Deliveries are awaited at every checkpoint barrier (and at the end), so a
//! barrier is acknowledged only once the broker has acknowledged every row before it; a
//! delivery that fails after librdkafka's own retries stops the pipeline with the error — rows
//! are never dropped silently.

use std::collections::BTreeMap;

use arrow::array::{Array, RecordBatch};
use citystream_operators::{Counter, Metrics};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};
use serde::Deserialize;

use super::rebootstrap::RebootstrapThread;
use crate::primitives::{EnvString, Inputs};
use crate::task::{PipelineError, Sink, SinkContext, sink_error};

/// Where one topic's rows come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicRoute {
    /// The streams written to the topic.
    pub input: Inputs,
    /// Column whose value is the message key (e.g. `segment_id`); absent: no key.
    #[serde(default)]
    pub key: Option<String>,
}

/// YAML of a `kafka` sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// `bootstrap.servers`.
    pub brokers: EnvString,
    /// Topic name to its inputs and key column.
    pub topics: BTreeMap<String, TopicRoute>,
    /// Any librdkafka producer property; `${VAR}` for secrets. `enable.idempotence=true` and
    /// `compression.type=zstd` are set unless given here, and `partitioner=murmur2_random` (a
    /// key goes to the partition a Java producer would choose).
    #[serde(default)]
    pub properties: BTreeMap<String, EnvString>,
}

/// Errors of the Kafka sink.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSinkError {
    /// The producer could not be created or a message not queued.
    #[error("kafka producer: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The producer's broker watch could not be started.
    #[error("starting the producer's broker watch: {0}")]
    Watch(#[from] std::io::Error),
    /// The broker did not acknowledge a message (after librdkafka's retries).
    #[error("delivery to {topic} failed: {reason}")]
    Delivery {
        /// The topic.
        topic: String,
        /// Why.
        reason: String,
    },
    /// Rows could not be encoded as JSON.
    #[error("encoding rows as JSON: {0}")]
    Json(#[from] arrow::error::ArrowError),
    /// The key column is missing.
    #[error("topic {topic}: no key column `{column}`")]
    NoKey {
        /// The topic.
        topic: String,
        /// The column.
        column: String,
    },
}

/// Produces rows to topics and tracks their deliveries.
pub struct KafkaWriter {
    /// Dropped before the producer (see [`RebootstrapThread`]).
    _rebootstrap: RebootstrapThread,
    producer: FutureProducer,
    inflight: Vec<(String, DeliveryFuture)>,
    sent: BTreeMap<String, Counter>,
}

impl KafkaWriter {
    /// A producer for `cfg`.
    pub fn try_new(sink: &str, cfg: &KafkaSinkConfig, metrics: &Metrics) -> Result<Self, KafkaSinkError> {
        let topics: Vec<&str> = cfg.topics.keys().map(String::as_str).collect();
        Self::for_topics(sink, &cfg.brokers, &cfg.properties, &topics, metrics)
    }

    /// A producer to `topics` on `brokers`.
    pub fn for_topics(
        sink: &str,
        brokers: &EnvString,
        properties: &BTreeMap<String, EnvString>,
        topics: &[&str],
        metrics: &Metrics,
    ) -> Result<Self, KafkaSinkError> {
        let cc = super::producer_config(brokers, properties);
        let sent = topics
            .iter()
            .map(|&t| {
                (
                    t.to_owned(),
                    metrics.counter(
                        "citystream_kafka_sink_messages_total",
                        "Messages acknowledged by the broker.",
                        &[("sink", sink), ("topic", t)],
                    ),
                )
            })
            .collect();
        let producer: FutureProducer = cc.create()?;
        let rebootstrap = RebootstrapThread::start(format!("the Kafka sink `{sink}`"), producer.clone(), |p| {
            p.client().native_ptr()
        })?;
        Ok(Self { _rebootstrap: rebootstrap, producer, inflight: Vec::new(), sent })
    }

    /// Queues every row of `batch` to `topic`, keyed by `key`.
    pub async fn write(&mut self, topic: &str, key: Option<&str>, batch: &RecordBatch) -> Result<(), KafkaSinkError> {
        let keys = match key {
            Some(k) => {
                let col = batch
                    .column_by_name(k)
                    .ok_or_else(|| KafkaSinkError::NoKey { topic: topic.into(), column: k.into() })?;
                Some(arrow::compute::cast(col, &arrow::datatypes::DataType::Utf8)?)
            }
            None => None,
        };
        let mut w = arrow::json::LineDelimitedWriter::new(Vec::with_capacity(batch.num_rows() * 200));
        w.write(batch)?;
        w.finish()?;
        let buf = w.into_inner();
        for (i, line) in buf.split(|b| *b == b'\n').filter(|l| !l.is_empty()).enumerate() {
            let key = keys.as_ref().and_then(|k| {
                let s = k.as_any().downcast_ref::<arrow::array::StringArray>()?;
                (!s.is_null(i)).then(|| s.value(i).to_owned())
            });
            let mut record = FutureRecord::to(topic).payload(line);
            if let Some(k) = &key {
                record = record.key(k.as_str());
            }
            // a full local queue is backpressure: wait for deliveries, then retry
            loop {
                match self.producer.send_result(record) {
                    Ok(f) => {
                        self.inflight.push((topic.to_owned(), f));
                        break;
                    }
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                        r,
                    )) => {
                        record = r;
                        self.flush().await?;
                    }
                    Err((e, _)) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    /// Waits until the broker acknowledged every queued row.
    pub async fn flush(&mut self) -> Result<(), KafkaSinkError> {
        for (topic, f) in self.inflight.drain(..) {
            match f.await {
                Ok(Ok(_)) => {
                    if let Some(c) = self.sent.get(&topic) {
                        c.inc();
                    }
                }
                Ok(Err((e, _))) => return Err(KafkaSinkError::Delivery { topic, reason: e.to_string() }),
                Err(_) => return Err(KafkaSinkError::Delivery { topic, reason: "the producer was dropped".into() }),
            }
        }
        Ok(())
    }
}

/// The Kafka sink as the runtime runs it (`task::Sink`): every input is a topic; a barrier is
/// acknowledged once the broker acknowledged every row before it.
pub(crate) struct KafkaSink {
    name: String,
    writer: KafkaWriter,
    /// Topic and key column of each input.
    inputs: Vec<(String, Option<String>)>,
}

impl KafkaSink {
    /// The sink `ctx.name` for `cfg`.
    pub(crate) fn try_new(cfg: &KafkaSinkConfig, ctx: SinkContext<'_>) -> Result<Self, PipelineError> {
        let writer = KafkaWriter::try_new(ctx.name, cfg, ctx.metrics).map_err(|e| ctx.error(e))?;
        let inputs = ctx
            .inputs
            .into_iter()
            .map(|topic| {
                let key = cfg.topics.get(&topic).and_then(|r| r.key.clone());
                (topic, key)
            })
            .collect();
        Ok(Self { name: ctx.name.to_owned(), writer, inputs })
    }
}

impl Sink for KafkaSink {
    fn write<'a>(&'a mut self, input: usize, batch: &'a RecordBatch) -> BoxFuture<'a, Result<(), PipelineError>> {
        async move {
            let (topic, key) = &self.inputs[input];
            self.writer.write(topic, key.as_deref(), batch).await.map_err(|e| sink_error(&self.name, e))
        }
        .boxed()
    }

    fn flush(&mut self) -> BoxFuture<'_, Result<(), PipelineError>> {
        async move { self.writer.flush().await.map_err(|e| sink_error(&self.name, e)) }.boxed()
    }
}
