//! The global task's side of the global topic: the source that applies each task's committed
//! epochs once, in order, and gives every stream the minimum watermark over the tasks (see
//! the module docs of [`super`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, BooleanArray, Int32Array, Int64Array, RecordBatch, UInt16Array, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use citystream_operators::{Barrier, Message};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;

use super::ReceiveConfig;
use super::wire::{self, Marker, Wire};
use crate::kafka::rebootstrap::Rebootstrap;
use crate::task::{CheckpointAcks, Outputs, PipelineError, Source, SourceContext, SourceReport, StateStore};

/// The operator kind of the receiver's state in the state store.
const KIND: &str = "global_receive";

impl Source for ReceiveConfig {
    fn run(self: Box<Self>, ctx: SourceContext) -> BoxFuture<'static, Result<SourceReport, PipelineError>> {
        async move {
            let name = ctx.name.clone();
            let err = |m: String| PipelineError::Source { source_name: name.clone(), message: m };
            let state = ctx.recovery.state.clone().ok_or_else(|| err("the global task needs operator state".into()))?;
            let props = super::client_properties(&self.source.properties);
            super::ensure_topic(&self.source.brokers, &props, &self.topic)
                .await
                .map_err(|e| err(format!("creating the global topic: {e}")))?;
            let rt = tokio::runtime::Handle::current();
            let (tx, rx) = tokio::sync::oneshot::channel();
            let cfg = *self;
            std::thread::Builder::new()
                .name("kafka-global".into())
                .spawn(move || {
                    let _ = tx.send(Receiver::open(cfg, ctx, state, rt).and_then(Receiver::run));
                })
                .map_err(|e| err(format!("starting the global task's thread: {e}")))?;
            let messages = rx.await.map_err(|_| err("the global task's thread died".into()))??;
            Ok(SourceReport { messages, account: None })
        }
        .boxed()
    }
}

/// What the global task applied of one task.
#[derive(Debug, Clone, PartialEq)]
struct Applied {
    /// The newest epoch applied.
    epoch: Option<u64>,
    /// Each stream's watermark as of that epoch.
    watermarks: Vec<i64>,
    /// Per stream, whether it was idle in the task then (it holds no watermark back).
    idle: Vec<bool>,
    /// Whether the task's input ended there.
    ended: bool,
}

impl Applied {
    /// Nothing applied yet, of `streams` streams.
    fn new(streams: usize) -> Self {
        Applied { epoch: None, watermarks: vec![i64::MIN; streams], idle: vec![false; streams], ended: false }
    }
}

/// An epoch read in part.
#[derive(Default)]
struct Pending {
    /// The offset of its first message read.
    first: i64,
    chunks: BTreeMap<u32, (u16, RecordBatch)>,
    marker: Option<Marker>,
}

struct Receiver {
    name: String,
    cfg: ReceiveConfig,
    consumer: BaseConsumer,
    outputs: Outputs,
    acks: CheckpointAcks,
    stop: watch::Receiver<bool>,
    state: StateStore,
    rt: tokio::runtime::Handle,
    streams: usize,
    applied: Vec<Applied>,
    pending: BTreeMap<(i32, u64), Pending>,
    /// The watermark sent on each stream.
    sent: Vec<i64>,
    /// The next offset to read, and the one the last checkpoint resumes at.
    next: i64,
    checkpointed: i64,
    /// Whether an epoch was applied since the last checkpoint.
    changed: bool,
    epoch: u64,
    messages: u64,
    skipped: citystream_operators::Counter,
    /// Keeps a broker known to the consumer.
    rebootstrap: Rebootstrap,
}

impl Receiver {
    fn open(
        cfg: ReceiveConfig,
        ctx: SourceContext,
        state: StateStore,
        rt: tokio::runtime::Handle,
    ) -> Result<Self, PipelineError> {
        let name = ctx.name.clone();
        let err = |m: String| PipelineError::Source { source_name: name.clone(), message: m };
        let streams = ctx.outputs.ports.len();
        let (_, tasks) = crate::kafka::membership::lead_topic(&cfg.source).map_err(err)?;
        let mut applied = vec![Applied::new(streams); tasks as usize];
        if let Some((b, _)) = state.load(&name, KIND).map_err(|e| err(e.to_string()))? {
            restore(&b, &cfg.names, &mut applied).map_err(|m| err(format!("restoring the global task: {m}")))?;
        }
        let resume = state.positions().get(&(cfg.topic.clone(), 0)).copied();
        let consumer: BaseConsumer =
            crate::kafka::client_config(&cfg.source.brokers, &super::client_properties(&cfg.source.properties))
                .set("group.id", format!("{}.global", cfg.source.group_id.as_str()))
                .set("enable.auto.commit", "false")
                .set("auto.offset.reset", "earliest")
                .create()
                .map_err(|e| err(format!("creating the consumer: {e}")))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&cfg.topic, 0, resume.map_or(Offset::Beginning, Offset::Offset))
            .map_err(|e| err(e.to_string()))?;
        consumer.assign(&tpl).map_err(|e| err(format!("reading {}: {e}", cfg.topic)))?;
        tracing::info!(source = name, topic = cfg.topic, tasks, resume, "global task reading the tasks' epochs");
        let rebootstrap = Rebootstrap::new(format!("the global task `{name}`"));
        Ok(Self {
            skipped: ctx.metrics.counter(
                "citystream_global_messages_skipped_total",
                "Messages of the global topic that could not be read.",
                &[("source", name.as_str())],
            ),
            name,
            cfg,
            consumer,
            outputs: ctx.outputs,
            acks: ctx.acks,
            stop: ctx.stop,
            epoch: state.epoch(),
            state,
            rt,
            streams,
            applied,
            pending: BTreeMap::new(),
            sent: vec![i64::MIN; streams],
            next: resume.unwrap_or(0),
            checkpointed: resume.unwrap_or(-1),
            changed: false,
            messages: 0,
            rebootstrap,
        })
    }

    fn err(&self, m: impl std::fmt::Display) -> PipelineError {
        PipelineError::Source { source_name: self.name.clone(), message: m.to_string() }
    }

    fn run(mut self) -> Result<u64, PipelineError> {
        let interval = self.cfg.source.checkpoint_interval.to_std();
        let idle = self.cfg.source.stop_when_idle.map(|d| d.to_std());
        let (mut last_checkpoint, mut last_message) = (Instant::now(), Instant::now());
        // the restored watermarks hold until every task has spoken again
        self.advance()?;
        while !*self.stop.borrow() {
            self.rebootstrap.keep_known(self.consumer.client().native_ptr());
            let read = self.consumer.poll(Duration::from_millis(100)).map(|r| r.map(|m| (m.offset(), wire::read(&m))));
            match read {
                Some(Ok((offset, parsed))) => {
                    last_message = Instant::now();
                    self.next = offset + 1;
                    self.messages += 1;
                    match parsed {
                        Ok(w) => self.take(w, offset)?,
                        Err(e) => self.skip(offset, e),
                    }
                }
                Some(Err(e)) => tracing::warn!(source = self.name, "reading the global topic: {e}"),
                None => {}
            }
            if last_checkpoint.elapsed() >= interval {
                self.checkpoint()?;
                last_checkpoint = Instant::now();
            }
            if let Some(idle) = idle
                && self.applied.iter().all(|a| a.ended)
                && self.pending.is_empty()
                && last_message.elapsed() >= idle
            {
                tracing::info!(source = self.name, "every task's input ended: ending");
                break;
            }
        }
        self.checkpoint()?;
        self.outputs.blocking_broadcast(Message::End)?;
        Ok(self.messages)
    }

    fn skip(&self, offset: i64, why: impl std::fmt::Display) {
        self.skipped.inc();
        tracing::warn!(source = self.name, offset, "skipping a message of the global topic: {why}");
    }

    fn take(&mut self, w: Wire, offset: i64) -> Result<(), PipelineError> {
        let (task, epoch) = match &w {
            Wire::Chunk { task, epoch, .. } | Wire::Marker { task, epoch, .. } => (*task, *epoch),
        };
        // streams by name, in this plan's order (a task on another config names others)
        let Some(w) = in_plan_order(w, &self.cfg.names) else {
            self.skip(offset, format!("task {task}, epoch {epoch}: a stream this plan does not have"));
            return Ok(());
        };
        // what does not fit this plan is skipped before it is kept anywhere
        let Some(t) = usize::try_from(task).ok().filter(|t| *t < self.applied.len()) else {
            self.skip(offset, format!("task {task}: the lead topic has {} partitions", self.applied.len()));
            return Ok(());
        };
        let fits = match &w {
            Wire::Chunk { stream, batch, .. } => {
                self.cfg.schemas.get(*stream as usize).is_some_and(|s| s.fields() == batch.schema().fields())
            }
            Wire::Marker { marker, .. } => {
                marker.watermarks.len() == self.streams && (marker.idle.is_empty() || marker.idle.len() == self.streams)
            }
        };
        if !fits {
            self.skip(offset, format!("task {task}, epoch {epoch}: not of this plan's streams"));
            return Ok(());
        }
        let a = &mut self.applied[t];
        if a.epoch.is_some_and(|e| e > epoch) {
            return Ok(());
        }
        if a.epoch == Some(epoch) {
            // a copy of the newest applied epoch: the task was restored from it, or its input
            // ended there
            if let Wire::Marker { marker, .. } = &w {
                a.ended = marker.ended;
            }
            return Ok(());
        }
        let p = self.pending.entry((task, epoch)).or_insert_with(|| Pending { first: offset, ..Default::default() });
        p.first = p.first.min(offset);
        match w {
            Wire::Chunk { index, stream, batch, .. } => {
                p.chunks.insert(index, (stream, batch));
            }
            Wire::Marker { marker, .. } => p.marker = Some(marker),
        }
        let complete = p.marker.as_ref().is_some_and(|m| m.chunks as usize == p.chunks.len());
        if complete {
            self.apply(task, epoch)?;
        }
        Ok(())
    }

    /// Hands on epoch `epoch` of `task`, complete, and moves the watermarks.
    fn apply(&mut self, task: i32, epoch: u64) -> Result<(), PipelineError> {
        let Some(p) = self.pending.remove(&(task, epoch)) else { return Ok(()) };
        let marker = p.marker.expect("a complete epoch has its marker");
        for (stream, batch) in p.chunks.into_values() {
            let port = stream as usize;
            if self.outputs.is_connected(port) {
                self.outputs.blocking_send(port, Message::Batch(batch))?;
            }
        }
        let a = &mut self.applied[task as usize];
        a.epoch = Some(epoch);
        for (w, m) in a.watermarks.iter_mut().zip(&marker.watermarks) {
            *w = (*w).max(*m);
        }
        a.idle = if marker.idle.is_empty() { vec![false; self.streams] } else { marker.idle };
        a.ended = marker.ended;
        // older epochs of the task, read in part, were replaced by this one
        self.pending.retain(|(t, e), _| *t != task || *e > epoch);
        self.changed = true;
        self.advance()
    }

    /// Sends each stream's watermark where the minimum over the tasks moved.
    fn advance(&mut self) -> Result<(), PipelineError> {
        for s in 0..self.streams {
            let Some(w) = stream_watermark(&self.applied, s) else { continue };
            if w > self.sent[s] {
                self.sent[s] = w;
                self.outputs.blocking_send(s, Message::Watermark(w))?;
            }
        }
        Ok(())
    }

    /// A barrier, every sink's acknowledgement, then the state and the offset to resume at.
    fn checkpoint(&mut self) -> Result<(), PipelineError> {
        let resume = self.pending.values().map(|p| p.first).min().unwrap_or(self.next);
        if resume == self.checkpointed && !self.changed {
            return Ok(());
        }
        self.changed = false;
        self.epoch += 1;
        let epoch = self.epoch;
        self.outputs.blocking_broadcast(Message::Barrier(Barrier { epoch }))?;
        let snapshot = snapshot(&self.applied, &self.cfg.names).map_err(|m| self.err(m))?;
        if !self.rt.block_on(self.acks.wait(epoch)) {
            return Err(PipelineError::Disconnected);
        }
        let state_err = |source| PipelineError::State { stage: self.name.clone(), source };
        self.state.save(epoch, &self.name, KIND, &snapshot, i64::MIN).map_err(state_err)?;
        let positions = std::iter::once(((self.cfg.topic.clone(), 0), resume)).collect();
        self.state.commit(epoch, &positions).map_err(state_err)?;
        self.checkpointed = resume;
        Ok(())
    }
}

/// `w` with its streams placed by name among `names` (this plan's streams, in port order), or
/// by position where the publisher did not name them; `None` when it names a stream `names`
/// lacks, or a marker lacks one of `names`.
fn in_plan_order(w: Wire, names: &[String]) -> Option<Wire> {
    let at = |name: &str| names.iter().position(|n| n == name);
    match w {
        Wire::Chunk { task, epoch, index, stream, name, batch } => {
            let stream = match &name {
                Some(n) => u16::try_from(at(n)?).ok()?,
                None => stream,
            };
            Some(Wire::Chunk { task, epoch, index, stream, name, batch })
        }
        Wire::Marker { task, epoch, mut marker } if !marker.streams.is_empty() => {
            let from: Vec<usize> =
                names.iter().map(|n| marker.streams.iter().position(|m| m == n)).collect::<Option<_>>()?;
            if marker.watermarks.len() != marker.streams.len()
                || !(marker.idle.is_empty() || marker.idle.len() == marker.streams.len())
            {
                return None;
            }
            marker.watermarks = from.iter().map(|&i| marker.watermarks[i]).collect();
            if !marker.idle.is_empty() {
                marker.idle = from.iter().map(|&i| marker.idle[i]).collect();
            }
            marker.streams = names.to_vec();
            Some(Wire::Marker { task, epoch, marker })
        }
        w => Some(w),
    }
}

/// Stream `s`'s watermark over the tasks, by the rule a source applies to its partitions
/// (`event_time::stream_watermark`): the minimum over the tasks not idle on it, a task not
/// heard from holding it at its start; while every task is idle on it, the minimum over the
/// tasks whose stream spoke (`None` if none did).
fn stream_watermark(applied: &[Applied], s: usize) -> Option<i64> {
    citystream_operators::event_time::stream_watermark(applied.iter().map(|a| match a.epoch {
        None => (true, Some(i64::MIN)),
        Some(_) if !a.idle[s] => (true, Some(a.watermarks[s])),
        // `i64::MIN`: the stream never spoke in that task
        Some(_) => (false, Some(a.watermarks[s]).filter(|&w| w > i64::MIN)),
    }))
}

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("task", DataType::Int32, false),
        Field::new("epoch", DataType::UInt64, true),
        Field::new("ended", DataType::Boolean, false),
        Field::new("stream", DataType::UInt16, false),
        Field::new("watermark", DataType::Int64, false),
        Field::new("idle", DataType::Boolean, false),
        Field::new("name", DataType::Utf8, false),
    ]))
}

/// What was applied of each task: a row per task and stream, the stream named (`names`).
fn snapshot(applied: &[Applied], names: &[String]) -> Result<RecordBatch, String> {
    let rows =
        applied.iter().enumerate().flat_map(|(t, a)| a.watermarks.iter().enumerate().map(move |(s, w)| (t, a, s, *w)));
    let rows: Vec<_> = rows.collect();
    RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.0 as i32))),
            Arc::new(UInt64Array::from_iter(rows.iter().map(|r| r.1.epoch))),
            Arc::new(BooleanArray::from_iter(rows.iter().map(|r| Some(r.1.ended)))),
            Arc::new(UInt16Array::from_iter_values(rows.iter().map(|r| r.2 as u16))),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.3))),
            Arc::new(BooleanArray::from_iter(rows.iter().map(|r| Some(r.1.idle[r.2])))),
            Arc::new(arrow::array::StringArray::from_iter_values(rows.iter().map(|r| names[r.2].as_str()))),
        ],
    )
    .map_err(|e| e.to_string())
}

/// Restores what was applied, each stream placed by name among `names` (saved without names:
/// by position); a stream the plan no longer has is dropped, one it gained starts unheard of.
fn restore(b: &RecordBatch, names: &[String], applied: &mut Vec<Applied>) -> Result<(), String> {
    let streams = names.len();
    let col = |i: usize| b.column(i).as_any();
    let (Some(t), Some(e), Some(x), Some(s), Some(w)) = (
        col(0).downcast_ref::<Int32Array>(),
        col(1).downcast_ref::<UInt64Array>(),
        col(2).downcast_ref::<BooleanArray>(),
        col(3).downcast_ref::<UInt16Array>(),
        col(4).downcast_ref::<Int64Array>(),
    ) else {
        return Err("its columns have other types".into());
    };
    // saved before idleness was recorded: none idle
    let idle = (b.num_columns() > 5).then(|| col(5).downcast_ref::<BooleanArray>()).flatten();
    let named = (b.num_columns() > 6).then(|| col(6).downcast_ref::<arrow::array::StringArray>()).flatten();
    for i in 0..b.num_rows() {
        let task = t.value(i) as usize;
        let stream = match named {
            Some(n) => match names.iter().position(|x| x == n.value(i)) {
                Some(at) => at,
                None => continue,
            },
            None => s.value(i) as usize,
        };
        if stream >= streams {
            return Err(format!("it has stream {stream}; the plan has {streams}: remove the state of the global task"));
        }
        if task >= applied.len() {
            applied.resize(task + 1, Applied::new(streams));
        }
        let a = &mut applied[task];
        a.epoch = e.is_valid(i).then(|| e.value(i));
        a.ended = x.value(i);
        a.watermarks[stream] = w.value(i);
        a.idle[stream] = idle.is_some_and(|x| x.value(i));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_was_applied_restores_the_same() {
        let a = vec![
            Applied { epoch: Some(4), watermarks: vec![10, 20], idle: vec![false, true], ended: false },
            Applied { epoch: None, watermarks: vec![i64::MIN, i64::MIN], idle: vec![false; 2], ended: false },
            Applied { epoch: Some(9), watermarks: vec![30, 5], idle: vec![true, false], ended: true },
        ];
        let names: Vec<String> = ["x", "y"].map(String::from).to_vec();
        let saved = snapshot(&a, &names).unwrap();
        let mut back = vec![Applied::new(2); 2];
        restore(&saved, &names, &mut back).unwrap();
        assert_eq!(back, a);
        // by name: a plan that reorders its streams, or dropped one and gained another
        let mut back = vec![Applied::new(2); 3];
        restore(&saved, &["y".to_owned(), "x".to_owned()], &mut back).unwrap();
        assert_eq!(back[0].watermarks, [20, 10]);
        let mut back = vec![Applied::new(2); 3];
        restore(&saved, &["new".to_owned(), "x".to_owned()], &mut back).unwrap();
        assert_eq!(back[2].watermarks, [i64::MIN, 30], "the new stream is not heard of yet");
        // saved before names and idleness were recorded: by position, none idle
        let old = saved.project(&[0, 1, 2, 3, 4]).unwrap();
        let mut back = vec![Applied::new(2); 3];
        restore(&old, &names, &mut back).unwrap();
        assert!(back.iter().all(|b| b.idle == [false, false]));
        assert!(restore(&old, &names[..1], &mut back).is_err(), "a position the plan no longer has");
    }

    #[test]
    fn streams_are_placed_by_name_whatever_their_order_on_the_publisher() {
        let names: Vec<String> = ["traffic", "alerts"].map(String::from).to_vec();
        let marker = |streams: &[&str], watermarks: Vec<i64>, idle: Vec<bool>| Wire::Marker {
            task: 1,
            epoch: 3,
            marker: Marker {
                chunks: 0,
                streams: streams.iter().map(|s| s.to_string()).collect(),
                watermarks,
                idle,
                ended: false,
            },
        };
        let Some(Wire::Marker { marker: m, .. }) =
            in_plan_order(marker(&["alerts", "traffic", "other"], vec![1, 2, 3], vec![true, false, true]), &names)
        else {
            panic!("a marker naming every stream of the plan fits");
        };
        assert_eq!((m.watermarks, m.idle, m.streams), (vec![2, 1], vec![false, true], names.clone()));
        assert!(in_plan_order(marker(&["traffic"], vec![1], vec![]), &names).is_none(), "a stream missing");
        // unnamed (an older publisher): by position, as it came
        assert!(in_plan_order(marker(&[], vec![1, 2], vec![]), &names).is_some());
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int32, false)]));
        let batch = RecordBatch::try_new(schema, vec![Arc::new(Int32Array::from(vec![1]))]).unwrap();
        let chunk = |stream: u16, name: Option<&str>| Wire::Chunk {
            task: 0,
            epoch: 1,
            index: 0,
            stream,
            name: name.map(str::to_owned),
            batch: batch.clone(),
        };
        let stream_of = |w: Option<Wire>| match w {
            Some(Wire::Chunk { stream, .. }) => Some(stream),
            _ => None,
        };
        assert_eq!(stream_of(in_plan_order(chunk(0, Some("alerts")), &names)), Some(1));
        assert_eq!(stream_of(in_plan_order(chunk(1, None), &names)), Some(1));
        assert_eq!(stream_of(in_plan_order(chunk(0, Some("gone")), &names)), None);
    }

    #[test]
    fn a_stream_idle_in_a_task_does_not_wait_for_it() {
        let task = |epoch, watermarks: [i64; 2], idle: [bool; 2]| Applied {
            epoch,
            watermarks: watermarks.to_vec(),
            idle: idle.to_vec(),
            ended: false,
        };
        // stream 1 has no partition in task 1 (idle there from its first epoch)
        let mut a = vec![task(Some(3), [100, 200], [false, false]), task(Some(2), [90, i64::MIN], [false, true])];
        assert_eq!(stream_watermark(&a, 0), Some(90));
        assert_eq!(stream_watermark(&a, 1), Some(200), "task 1 does not hold stream 1");
        // a task not heard from holds every stream, idle or not
        a.push(task(None, [0, 0], [true, true]));
        assert_eq!(stream_watermark(&a, 1), Some(i64::MIN));
        a.pop();
        // every task idle on a stream: the slowest task whose stream spoke (task 1 never
        // did), as in one process whose partitions all went idle
        a[0].idle[1] = true;
        assert_eq!(stream_watermark(&a, 1), Some(200));
        a[0].watermarks[1] = i64::MIN;
        assert_eq!(stream_watermark(&a, 1), None, "no task's stream spoke");
        a[0].watermarks[1] = 200;
        // a task whose stream speaks again holds it again (the minimum may go back: nothing
        // sent goes back, `advance` sends only what passes the last one)
        a[1].idle[1] = false;
        assert_eq!(stream_watermark(&a, 1), Some(i64::MIN));
    }
}
