//! A task's side of the global topic: the sink that publishes each committed epoch of the
//! streams the global task reads (see the module docs of [`super`]).

use std::collections::VecDeque;
use std::sync::Arc;

use arrow::array::{Array, BinaryArray, BooleanArray, Int64Array, RecordBatch, StringArray, UInt16Array, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use citystream_operators::event_time::EventClock;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};

use super::PublishConfig;
use super::wire::{self, Epoch, Marker};
use crate::kafka::rebootstrap::RebootstrapThread;
use crate::task::{PipelineError, Sink, SinkContext, StateStore, blocking_metered, sink_error};

/// The operator kind of the publisher's saved epochs in the state store.
const KIND: &str = "global_publish";

/// Publishes a task's epochs to the global topic once they are committed.
pub(crate) struct GlobalPublisher {
    name: String,
    cfg: PublishConfig,
    /// Dropped before the producer (see [`RebootstrapThread`]).
    _rebootstrap: RebootstrapThread,
    producer: FutureProducer,
    state: StateStore,
    cpu_ns: citystream_operators::Counter,
    /// The epoch rows written now belong to.
    epoch: u64,
    /// This epoch's rows, per stream.
    rows: Vec<Vec<RecordBatch>>,
    /// Each stream's name (`stage.port`), as chunks, markers and stored epochs name them.
    names: Vec<String>,
    /// Each stream's watermark.
    watermarks: Vec<i64>,
    /// Per stream, the event clocks of the source streams it comes from: idle when all are.
    clocks: Vec<Vec<EventClock>>,
    /// Stored epochs whose manifest may not exist yet, oldest first.
    unpublished: VecDeque<Epoch>,
    /// The newest epoch published, and its marker (which goes again, `ended`, at the end).
    last: Option<(u64, Marker)>,
    /// Every input ended: the next flush is the last.
    ending: bool,
    /// The input ended by itself (`stop_when_idle`), not because the task was stopped (a
    /// revocation moves it: whoever runs it next goes on).
    input_ended: bool,
    stop: tokio::sync::watch::Receiver<bool>,
    topic_ready: bool,
    inflight: Vec<DeliveryFuture>,
}

impl GlobalPublisher {
    /// The publisher `ctx.name` for `cfg`; with restored state, the restored epoch is published
    /// again first.
    pub(crate) fn try_new(cfg: &PublishConfig, ctx: SinkContext<'_>) -> Result<Self, PipelineError> {
        let state = ctx.state.cloned().ok_or_else(|| ctx.error("the global topic needs operator state"))?;
        let producer: FutureProducer =
            crate::kafka::producer_config(&cfg.brokers, &cfg.properties).create().map_err(|e| ctx.error(e))?;
        let rebootstrap =
            RebootstrapThread::start(format!("the global publisher `{}`", ctx.name), producer.clone(), |p| {
                p.client().native_ptr()
            })
            .map_err(|e| ctx.error(e))?;
        let streams = ctx.inputs.len();
        let names = ctx.inputs.clone();
        let mut unpublished = VecDeque::new();
        if state.restored_epoch() > 0 {
            let loaded = state.load(ctx.name, KIND).map_err(|e| ctx.error(e))?;
            if let Some((batch, _)) = loaded {
                unpublished.extend(from_batch(&batch, &names).map_err(|e| ctx.error(e))?);
            }
        }
        Ok(Self {
            name: ctx.name.to_owned(),
            cfg: cfg.clone(),
            _rebootstrap: rebootstrap,
            producer,
            epoch: state.first_epoch(),
            state,
            cpu_ns: ctx.cpu_ns,
            rows: vec![Vec::new(); streams],
            names,
            watermarks: vec![i64::MIN; streams],
            clocks: ctx.upstream_clocks,
            unpublished,
            last: None,
            ending: false,
            input_ended: false,
            stop: ctx.stop,
            topic_ready: false,
            inflight: Vec::new(),
        })
    }

    fn err(&self, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> PipelineError {
        sink_error(&self.name, e)
    }

    /// Encodes this epoch's rows and stores them with the task's state of the epoch.
    fn store_epoch(&mut self) -> Result<(), PipelineError> {
        // a stream nothing upstream says of (no event clock) is never idle
        let idle = self.clocks.iter().map(|c| !c.is_empty() && c.iter().all(EventClock::is_idle)).collect();
        let mut e = Epoch { epoch: self.epoch, chunks: Vec::new(), watermarks: self.watermarks.clone(), idle };
        for (s, batches) in self.rows.iter_mut().enumerate() {
            for b in batches.drain(..) {
                wire::encode(s as u16, &b, &mut e.chunks).map_err(|m| sink_error(&self.name, m))?;
            }
        }
        let epoch = e.epoch;
        self.unpublished.push_back(e);
        // every epoch not published yet goes into this epoch's state: a checkpoint whose
        // manifest was never written (a stop takes its final checkpoint without committing the
        // one in flight) is published only once a later one commits, and whoever restores
        // that later one publishes them all
        let batch = to_batch(self.unpublished.iter(), &self.names).map_err(|m| self.err(m))?;
        self.state.save(epoch, &self.name, KIND, &batch, i64::MIN).map_err(|m| self.err(m))?;
        Ok(())
    }

    /// Queues one message of this task on the topic's partition 0.
    async fn send(&mut self, payload: &[u8], headers: OwnedHeaders) -> Result<(), PipelineError> {
        let key = self.cfg.task.to_string();
        let topic = self.cfg.topic.clone();
        let mut record = FutureRecord::to(&topic).partition(0).key(key.as_str()).payload(payload).headers(headers);
        loop {
            match self.producer.send_result(record) {
                Ok(f) => {
                    self.inflight.push(f);
                    return Ok(());
                }
                Err((
                    rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                    r,
                )) => {
                    // a full local queue is backpressure: wait for the deliveries so far
                    record = r;
                    self.delivered().await?;
                }
                Err((e, _)) => return Err(self.err(e)),
            }
        }
    }

    /// Queues epoch `e`'s chunks and marker; returns the marker.
    async fn queue(&mut self, e: &Epoch, ended: bool) -> Result<Marker, PipelineError> {
        for (i, (stream, body)) in e.chunks.iter().enumerate() {
            let headers = wire::chunk_headers(self.cfg.task, e.epoch, i as u32, *stream, &self.names[*stream as usize]);
            self.send(body, headers).await?;
        }
        let marker = Marker {
            chunks: e.chunks.len() as u32,
            streams: self.names.clone(),
            watermarks: e.watermarks.clone(),
            idle: e.idle.clone(),
            ended,
        };
        self.send_marker(e.epoch, &marker).await?;
        Ok(marker)
    }

    async fn send_marker(&mut self, epoch: u64, marker: &Marker) -> Result<(), PipelineError> {
        let body = serde_json::to_vec(marker).map_err(|m| self.err(m))?;
        self.send(&body, wire::marker_headers(self.cfg.task, epoch)).await
    }

    /// Waits until the broker has every message queued.
    async fn delivered(&mut self) -> Result<(), PipelineError> {
        for f in std::mem::take(&mut self.inflight) {
            match f.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(sink_error(&self.name, format!("publishing to the global topic: {e}"))),
                Err(_) => {
                    return Err(sink_error(&self.name, "publishing to the global topic: the producer was dropped"));
                }
            }
        }
        Ok(())
    }

    /// Publishes the stored epochs the state manifest commits (with the end: the last one
    /// says the input ended) and waits until the broker has them all.
    async fn publish(&mut self) -> Result<(), PipelineError> {
        if !self.topic_ready {
            super::ensure_topic(&self.cfg.brokers, &self.cfg.properties, &self.cfg.topic)
                .await
                .map_err(|e| self.err(e))?;
            self.topic_ready = true;
        }
        let committed = self.state.committed_epoch();
        let mut sent = false;
        while self.unpublished.front().is_some_and(|e| e.epoch <= committed) {
            let e = self.unpublished.pop_front().expect("front");
            let last = self.input_ended && self.unpublished.front().is_none_or(|n| n.epoch > committed);
            let marker = self.queue(&e, last).await?;
            self.last = Some((e.epoch, marker));
            sent = true;
        }
        if self.input_ended && !sent {
            // the input ended with nothing new to publish: say so in the newest epoch's marker
            // (its chunks went before it)
            let (epoch, mut marker) = self.last.clone().unwrap_or((
                committed,
                Marker {
                    chunks: 0,
                    streams: self.names.clone(),
                    watermarks: self.watermarks.clone(),
                    idle: Vec::new(),
                    ended: true,
                },
            ));
            marker.ended = true;
            self.send_marker(epoch, &marker).await?;
        }
        self.delivered().await
    }
}

impl Sink for GlobalPublisher {
    fn write<'a>(&'a mut self, input: usize, batch: &'a RecordBatch) -> BoxFuture<'a, Result<(), PipelineError>> {
        if batch.num_rows() > 0 {
            self.rows[input].push(batch.clone());
        }
        std::future::ready(Ok(())).boxed()
    }

    fn on_input_watermark(&mut self, input: usize, watermark: i64) {
        self.watermarks[input] = self.watermarks[input].max(watermark);
    }

    fn flush(&mut self) -> BoxFuture<'_, Result<(), PipelineError>> {
        async move {
            // at the end, rows after the final checkpoint are not committed: whoever runs the
            // task next replays them
            if !self.ending {
                let cpu = self.cpu_ns.clone();
                blocking_metered(&cpu, || self.store_epoch())?;
            }
            self.publish().await
        }
        .boxed()
    }

    fn on_checkpoint(&mut self, epoch: u64) {
        self.epoch = epoch + 1;
    }

    fn on_end(&mut self) {
        self.ending = true;
        self.input_ended = !*self.stop.borrow();
    }
}

fn stored_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("epoch", DataType::UInt64, false),
        Field::new("stream", DataType::UInt16, false),
        Field::new("watermark", DataType::Int64, false),
        Field::new("chunk", DataType::Binary, true),
        Field::new("idle", DataType::Boolean, true),
        Field::new("name", DataType::Utf8, true),
    ]))
}

/// Epochs as stored: per epoch, one row per stream with its watermark and idleness, then one
/// per chunk; every row names its stream (`names`, by position).
fn to_batch<'a>(epochs: impl Iterator<Item = &'a Epoch>, names: &[String]) -> Result<RecordBatch, String> {
    let (mut ep, mut streams, mut wms, mut chunks, mut idle) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for e in epochs {
        for (s, w) in e.watermarks.iter().enumerate() {
            ep.push(e.epoch);
            streams.push(s as u16);
            wms.push(*w);
            chunks.push(None);
            idle.push(Some(e.idle.get(s).copied().unwrap_or(false)));
        }
        for (s, c) in &e.chunks {
            ep.push(e.epoch);
            streams.push(*s);
            wms.push(e.watermarks[*s as usize]);
            chunks.push(Some(c.as_slice()));
            idle.push(None);
        }
    }
    RecordBatch::try_new(
        stored_schema(),
        vec![
            Arc::new(UInt64Array::from(ep)),
            Arc::new(UInt16Array::from(streams.clone())),
            Arc::new(Int64Array::from(wms)),
            Arc::new(BinaryArray::from_iter(chunks)),
            Arc::new(BooleanArray::from(idle)),
            Arc::new(StringArray::from_iter_values(streams.iter().map(|s| names[*s as usize].as_str()))),
        ],
    )
    .map_err(|e| e.to_string())
}

/// The stored epochs, oldest first, their streams placed by name among `names` (the task's
/// streams now; epochs stored without names: by position).
fn from_batch(b: &RecordBatch, names: &[String]) -> Result<Vec<Epoch>, String> {
    let streams = names.len();
    let col = |name: &str| b.column_by_name(name).ok_or_else(|| format!("the stored epochs have no `{name}`"));
    let (e, s, w, c) = (col("epoch")?, col("stream")?, col("watermark")?, col("chunk")?);
    let (Some(e), Some(s), Some(w), Some(c)) = (
        e.as_any().downcast_ref::<UInt64Array>(),
        s.as_any().downcast_ref::<UInt16Array>(),
        w.as_any().downcast_ref::<Int64Array>(),
        c.as_any().downcast_ref::<BinaryArray>(),
    ) else {
        return Err("the stored epochs' columns have other types".into());
    };
    // epochs stored before idleness was recorded have no `idle`: none idle
    let idle = b.column_by_name("idle").and_then(|c| c.as_any().downcast_ref::<BooleanArray>());
    let named = b.column_by_name("name").and_then(|c| c.as_any().downcast_ref::<StringArray>());
    let mut out: Vec<Epoch> = Vec::new();
    for i in 0..b.num_rows() {
        let stream = match named {
            Some(n) => {
                let name = n.value(i);
                let at = names.iter().position(|x| x == name).ok_or_else(|| {
                    format!(
                        "a stored epoch has stream `{name}`, which the task no longer publishes ({}): remove the \
                         tasks' state to change which streams reach the global task",
                        names.join(", ")
                    )
                })?;
                at as u16
            }
            None => s.value(i),
        };
        if stream as usize >= streams {
            return Err(format!("a stored epoch has stream {stream}; the task publishes {streams}"));
        }
        if out.last().is_none_or(|l| l.epoch != e.value(i)) {
            out.push(Epoch {
                epoch: e.value(i),
                chunks: Vec::new(),
                watermarks: vec![i64::MIN; streams],
                idle: vec![false; streams],
            });
        }
        let last = out.last_mut().expect("pushed");
        last.watermarks[stream as usize] = last.watermarks[stream as usize].max(w.value(i));
        if c.is_valid(i) {
            last.chunks.push((stream, c.value(i).to_vec()));
        } else if let Some(idle) = idle.filter(|x| x.is_valid(i)) {
            last.idle[stream as usize] = idle.value(i);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_epochs_read_back_the_same() {
        let e = Epoch {
            epoch: 7,
            chunks: vec![(1, vec![1, 2, 3]), (0, vec![4]), (1, vec![5, 6])],
            watermarks: vec![100, i64::MIN, 300],
            idle: vec![false, true, false],
        };
        let f = Epoch { epoch: 8, chunks: vec![(2, vec![9])], watermarks: vec![110, 5, 310], idle: vec![true; 3] };
        let both = [e.clone(), f];
        let names: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let stored = to_batch(both.iter(), &names).unwrap();
        assert_eq!(from_batch(&stored, &names).unwrap(), both);
        let one = to_batch([&e].into_iter(), &names).unwrap();
        assert_eq!(from_batch(&one, &names).unwrap(), std::slice::from_ref(&e));
        // streams are placed by name: a config that reorders them reads the same rows
        let reordered: Vec<String> = ["c", "a", "b"].map(String::from).to_vec();
        let back = from_batch(&one, &reordered).unwrap();
        assert_eq!(back[0].watermarks, [300, 100, i64::MIN]);
        assert_eq!(back[0].chunks, [(2, vec![1, 2, 3]), (1, vec![4]), (2, vec![5, 6])]);
        let e2 = from_batch(&one, &names[..2]).unwrap_err();
        assert!(e2.contains("`c`") && e2.contains("remove the tasks' state"), "a stream the task no longer has: {e2}");
        // stored before names and idleness were recorded: by position, none idle
        let old = one.project(&[0, 1, 2, 3]).unwrap();
        assert_eq!(from_batch(&old, &names).unwrap()[0].idle, vec![false; 3]);
        assert!(from_batch(&old, &names[..1]).is_err(), "a position the task no longer has");
    }
}
