//! The files source task: reads each kind's files in path order on a thread of its own,
//! hands on raw batches, and records its positions at checkpoints.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use citystream_operators::event_time::EventClock;
use citystream_operators::{Barrier, Counter, Message};
use citystream_schemas::EventKind;
use citystream_schemas::raw::RawBatchBuilder;
use futures_util::future::BoxFuture;
use tokio::sync::watch;

use super::lines::{LineReader, ReadError};
use super::{FilesSourceConfig, OnBadFile, ReceivedAt, list};
use crate::task::{CheckpointAcks, Outputs, PipelineError, Recovery, Source, SourceContext, SourceReport};

impl Source for FilesSourceConfig {
    fn run(self: Box<Self>, ctx: SourceContext) -> BoxFuture<'static, Result<SourceReport, PipelineError>> {
        Box::pin(async move {
            let name = ctx.name.clone();
            let err = |message: String| PipelineError::Source { source_name: name.clone(), message };
            let runtime = tokio::runtime::Handle::current();
            let (tx, rx) = tokio::sync::oneshot::channel();
            std::thread::Builder::new()
                .name(format!("files-{}", ctx.name))
                .spawn(move || {
                    let _ = tx.send(Reader::new(*self, ctx, runtime).and_then(Reader::run));
                })
                .map_err(|e| err(format!("starting the reader thread: {e}")))?;
            let messages = rx.await.map_err(|_| err("the reader thread died".into()))??;
            Ok(SourceReport { messages, account: None })
        })
    }
}

/// A checkpoint's epoch and the next position of every stream.
type Checkpoint = (u64, BTreeMap<(String, i32), i64>);

/// One event kind's files, read one after the other as one stream.
struct Stream {
    port: usize,
    /// `{source}.{kind}`: the stream's name in lineage columns and positions.
    topic: String,
    pattern: String,
    files: Vec<PathBuf>,
    /// Index in `files` of the next file to open.
    next_file: usize,
    /// The open file, its arrival time (`received_at: modified`) and size as stored.
    open: Option<(LineReader, i64, u64)>,
    /// The position (line number over all files) of the next line.
    line: i64,
    /// Lines before this position were delivered by an earlier run.
    resume_at: i64,
    done: bool,
    /// New files that sorted before files already read (`stop_when_done: false`).
    skipped: std::collections::BTreeSet<PathBuf>,
    events: Counter,
    bytes: Counter,
}

struct Reader {
    name: String,
    cfg: FilesSourceConfig,
    streams: Vec<Stream>,
    builders: Vec<RawBatchBuilder>,
    outputs: Outputs,
    clocks: Vec<Option<EventClock>>,
    last_wm: Vec<i64>,
    stop: watch::Receiver<bool>,
    acks: CheckpointAcks,
    recovery: Recovery,
    epoch: u64,
    runtime: tokio::runtime::Handle,
    files_read: Counter,
    /// Files that could not be opened or read to their end (`on_bad_file: skip`).
    bad_files: Counter,
    /// Bytes (as stored) of the files read to their end, and of every file listed: progress.
    bytes_read: Counter,
    listed: (citystream_operators::Gauge, citystream_operators::Gauge),
}

impl Reader {
    fn new(cfg: FilesSourceConfig, ctx: SourceContext, runtime: tokio::runtime::Handle) -> Result<Self, PipelineError> {
        let SourceContext { name, outputs, clocks, stop, metrics, acks, recovery, .. } = ctx;
        let err = |message: String| PipelineError::Source { source_name: name.clone(), message };
        let state = recovery
            .state
            .as_ref()
            .ok_or_else(|| err("a files source needs `runtime.state_dir` or `state_url`".into()))?;
        let resumed = state.positions();
        let mut streams = Vec::new();
        for (port, kind) in EventKind::ALL.iter().enumerate() {
            let Some(pattern) = cfg.paths.get(*kind) else { continue };
            if !outputs.is_connected(port) {
                continue;
            }
            let topic = format!("{name}.{kind}");
            let files = list(pattern).map_err(|e| err(e.to_string()))?;
            let resume_at = resumed.get(&(topic.clone(), 0)).copied().unwrap_or(0);
            // files a run that died wrote after its last checkpoint: this run writes them again
            for root in &recovery.sink_roots {
                let n = crate::sink::parquet::remove_uncommitted(root, &topic, 0, resume_at).map_err(|e| {
                    err(format!("removing files after the last checkpoint under {}: {e}", root.display()))
                })?;
                if n > 0 {
                    tracing::info!(
                        source = name,
                        topic,
                        removed = n,
                        "removed files written after the last checkpoint"
                    );
                }
            }
            tracing::info!(source = name, topic, pattern, files = files.len(), resume_at, "reading files");
            let labels = [("source", name.as_str()), ("stream", kind.as_str())];
            streams.push(Stream {
                port,
                topic,
                pattern: pattern.to_owned(),
                files,
                next_file: 0,
                open: None,
                line: 0,
                resume_at,
                done: false,
                skipped: Default::default(),
                events: metrics.counter("citystream_source_events_total", "Messages read by a source.", &labels),
                bytes: metrics.counter("citystream_source_bytes_total", "Payload bytes read by a source.", &labels),
            });
        }
        let batch_rows = cfg.batch_rows.get();
        let l = [("source", name.as_str())];
        let listed = (
            metrics.gauge("citystream_source_files_listed", "Files a files source has listed.", &l),
            metrics.gauge("citystream_source_file_bytes_listed", "Bytes (as stored) of the files listed.", &l),
        );
        let reader = Self {
            files_read: metrics.counter("citystream_source_files_total", "Files a files source read to their end.", &l),
            bad_files: metrics.counter(
                "citystream_source_bad_files_total",
                "Files a files source could not open or read to their end (skipped).",
                &l,
            ),
            bytes_read: metrics.counter(
                "citystream_source_file_bytes_total",
                "Bytes (as stored) of the files a files source read to their end.",
                &l,
            ),
            listed,
            builders: EventKind::ALL
                .iter()
                .map(|_| RawBatchBuilder::with_capacity(batch_rows, batch_rows * 256))
                .collect(),
            last_wm: vec![i64::MIN; clocks.len()],
            epoch: state.epoch(),
            name,
            cfg,
            streams,
            outputs,
            clocks,
            stop,
            acks,
            recovery,
            runtime,
        };
        reader.count_listed();
        Ok(reader)
    }

    /// Publishes how many files (and bytes) are listed.
    fn count_listed(&self) {
        let files = self.streams.iter().flat_map(|s| &s.files);
        let (n, bytes) =
            files.fold((0u64, 0u64), |(n, b), f| (n + 1, b + std::fs::metadata(f).map(|m| m.len()).unwrap_or(0)));
        self.listed.0.set(n as f64);
        self.listed.1.set(bytes as f64);
    }

    fn err(&self, message: String) -> PipelineError {
        PipelineError::Source { source_name: self.name.clone(), message }
    }

    fn run(mut self) -> Result<u64, PipelineError> {
        let checkpoint_every = self.cfg.checkpoint_interval.to_std().max(Duration::from_millis(10));
        let mut next_checkpoint = Instant::now() + checkpoint_every;
        let mut pending: Option<Checkpoint> = None;
        let started = Instant::now();
        let mut total = 0u64;
        let mut buf = Vec::new();
        loop {
            if *self.stop.borrow() {
                tracing::info!(source = self.name, "stop requested: draining");
                break;
            }
            if Instant::now() >= next_checkpoint {
                next_checkpoint = Instant::now() + checkpoint_every;
                self.periodic_checkpoint(&mut pending)?;
            }
            // the stream furthest behind in event time reads next, so multi-input stages hold
            // a bounded span of event time
            let next = self
                .streams
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.done)
                .min_by_key(|(_, s)| self.clocks[s.port].as_ref().and_then(|c| c.watermark(0)).unwrap_or(i64::MIN))
                .map(|(i, _)| i);
            let Some(i) = next else {
                if self.cfg.stop_when_done {
                    break;
                }
                self.hand_on()?;
                self.wait(self.cfg.poll_interval.to_std());
                self.relist()?;
                continue;
            };
            total += self.read_batch(i, &mut buf)?;
            self.hand_on()?;
            if let Some(rate) = self.cfg.rate.filter(|r| *r > 0.0) {
                let due = Duration::from_secs_f64(total as f64 / rate);
                self.wait(due.saturating_sub(started.elapsed()));
            }
        }
        // hand on the rest behind a barrier; once every sink has it, every decoder has seen
        // every line read, so the streams' watermarks are final: send them, then a last
        // checkpoint records what they closed, and the run ends (what is still open stays in
        // the checkpoint, for files to come)
        for _ in 0..2 {
            let (epoch, positions) = self.barrier()?;
            if !self.runtime.block_on(self.acks.wait(epoch)) {
                return Err(PipelineError::Disconnected);
            }
            self.commit(epoch, &positions)?;
        }
        self.outputs.blocking_broadcast(Message::End)?;
        Ok(total)
    }

    /// Reads up to a batch of lines from stream `i`; returns the lines handed to its builder.
    fn read_batch(&mut self, i: usize, buf: &mut Vec<u8>) -> Result<u64, PipelineError> {
        let batch_rows = self.cfg.batch_rows.get();
        let max_line = self.cfg.max_line_bytes.get();
        let received_at = self.cfg.received_at;
        let on_bad = self.cfg.on_bad_file;
        let range = self.cfg.event_time;
        let name = self.name.clone();
        let s = &mut self.streams[i];
        let builder = &mut self.builders[s.port];
        let mut n = 0u64;
        while builder.len() < batch_rows {
            if s.open.is_none() {
                let Some(path) = s.files.get(s.next_file) else {
                    s.done = true;
                    break;
                };
                s.next_file += 1;
                let reader = match LineReader::open(path, max_line) {
                    Ok(r) => r,
                    Err(e) if on_bad == OnBadFile::Skip => {
                        skip_bad_file(&name, &e, &self.bad_files);
                        continue;
                    }
                    Err(e) => return Err(read_error(&name, e)),
                };
                let meta = std::fs::metadata(path).ok();
                let now = chrono::Utc::now().timestamp_millis();
                let modified = meta
                    .as_ref()
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(now, |d| (d.as_millis() as i64).min(now));
                s.open = Some((reader, modified, meta.map_or(0, |m| m.len())));
            }
            let (reader, modified, size) = s.open.as_mut().expect("opened above");
            let more = match reader.next_line(buf) {
                Ok(more) => more,
                Err(e) if on_bad == OnBadFile::Skip => {
                    // the lines before the damage are delivered, the rest of the file cannot be read
                    skip_bad_file(&name, &e, &self.bad_files);
                    false
                }
                Err(e) => return Err(read_error(&name, e)),
            };
            if !more {
                self.files_read.inc();
                self.bytes_read.inc_by(*size);
                s.open = None;
                continue;
            }
            let offset = s.line;
            s.line += 1;
            if offset < s.resume_at || buf.iter().all(u8::is_ascii_whitespace) || !range.admits(buf) {
                continue;
            }
            let arrived = match received_at {
                ReceivedAt::Modified => *modified,
                ReceivedAt::Now => chrono::Utc::now().timestamp_millis(),
            };
            builder.append(&s.topic, 0, offset, arrived, buf);
            s.events.inc();
            s.bytes.inc_by(buf.len() as u64);
            n += 1;
        }
        Ok(n)
    }

    /// Hands on every batch being built, then each stream's watermark where it moved.
    fn hand_on(&mut self) -> Result<(), PipelineError> {
        for (p, b) in self.builders.iter_mut().enumerate() {
            if !b.is_empty() {
                self.outputs.blocking_send(p, Message::Batch(b.finish()))?;
            }
        }
        for (p, clock) in self.clocks.iter().enumerate() {
            if let Some(wm) = clock.as_ref().and_then(|c| c.watermark(0)).filter(|wm| *wm > self.last_wm[p]) {
                self.last_wm[p] = wm;
                self.outputs.blocking_send(p, Message::Watermark(wm))?;
            }
        }
        Ok(())
    }

    /// Hands on what was read and sends the next barrier; the epoch and the positions it covers.
    fn barrier(&mut self) -> Result<Checkpoint, PipelineError> {
        self.hand_on()?;
        self.epoch += 1;
        self.outputs.blocking_broadcast(Message::Barrier(Barrier { epoch: self.epoch }))?;
        let positions = self.streams.iter().map(|s| ((s.topic.clone(), 0), s.line.max(s.resume_at))).collect();
        Ok((self.epoch, positions))
    }

    /// Records the previous checkpoint if every sink has made it durable, then starts the next.
    fn periodic_checkpoint(&mut self, pending: &mut Option<Checkpoint>) -> Result<(), PipelineError> {
        if let Some((epoch, positions)) = pending.take() {
            if self.acks.acked() < epoch {
                *pending = Some((epoch, positions));
                return Ok(());
            }
            self.commit(epoch, &positions)?;
        }
        *pending = Some(self.barrier()?);
        Ok(())
    }

    /// Records checkpoint `epoch` in the state manifest, and tells compaction.
    fn commit(&self, epoch: u64, positions: &BTreeMap<(String, i32), i64>) -> Result<(), PipelineError> {
        if let Some(state) = &self.recovery.state {
            state
                .commit(epoch, positions)
                .map_err(|source| PipelineError::State { stage: self.name.clone(), source })?;
        }
        let mut log = self.recovery.commits.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let lineage = self.recovery.state.as_ref().map_or("", |s| s.lineage());
        log.record(lineage, epoch, positions.iter().map(|(k, v)| (k.clone(), *v)));
        Ok(())
    }

    /// Sleeps up to `d`, waking early when a stop is requested.
    fn wait(&mut self, d: Duration) {
        let deadline = Instant::now() + d;
        while !*self.stop.borrow() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
    }

    /// Lists every stream's paths again; files that sort after the last one read are added
    /// (one that sorts before it arrived too late to keep the order: it is skipped, logged).
    fn relist(&mut self) -> Result<(), PipelineError> {
        for i in 0..self.streams.len() {
            let found = list(&self.streams[i].pattern).map_err(|e| self.err(e.to_string()))?;
            let s = &mut self.streams[i];
            for f in found {
                if s.files.contains(&f) || s.skipped.contains(&f) {
                    continue;
                }
                if s.files.last().is_some_and(|last| f < *last) {
                    tracing::warn!(source = self.name, file = %f.display(), "a new file sorts before files already read: skipped");
                    s.skipped.insert(f);
                } else {
                    s.files.push(f);
                    s.done = false;
                }
            }
        }
        self.count_listed();
        Ok(())
    }
}

/// Logs a file that cannot be (wholly) read, and counts it.
fn skip_bad_file(source: &str, e: &ReadError, bad_files: &Counter) {
    tracing::error!(source, "skipping the rest of a file: {e}");
    bad_files.inc();
}

fn read_error(source: &str, e: ReadError) -> PipelineError {
    PipelineError::Source { source_name: source.to_owned(), message: e.to_string() }
}
