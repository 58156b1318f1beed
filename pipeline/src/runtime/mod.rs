//! The runtime: turns a [`PipelinePlan`] into tokio tasks joined by bounded channels.
//!
//! Every source, stage and sink is one task. Each stage and sink owns one bounded receiver per
//! input, so the task knows which upstream each [`Message`] came from (for watermark minimums,
//! barrier alignment and end of data). Channels hold at most `runtime.channel_capacity`
//! messages: a slow sink slows its stages, which slow the sources (backpressure, bounded
//! memory). What sources, sinks and services are handed by the runtime lives in
//! [`crate::task`].
//!
//! Operators are synchronous; their calls run on the worker thread of their stage's task, and
//! what waits on a disk or the network (snapshots, file closes, operators whose `waits()` says
//! so) goes through `block_in_place` ([`crate::task::blocking`]).

mod align;
pub mod reload;
mod sinks;
mod stage;
mod tasks;

pub use crate::task::{CheckpointAcks, PipelineError, StateStore};
pub(crate) use crate::task::{Edge, Outputs, blocking, blocking_metered, cpu_metered};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use citystream_operators::event_time::EventClock;
use citystream_operators::partitioning::Routing;
use citystream_operators::{BuildContext, Message, Metrics};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::config::PipelinePlan;
use crate::simulator::SimReport;
use crate::task::{ServiceContext, SinkContext, TableStats};

/// What a finished run did.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    /// Wall-clock seconds from start to the last flush.
    pub elapsed_s: f64,
    /// Messages each source emitted.
    pub source_messages: BTreeMap<String, u64>,
    /// The simulator's account, per simulator source.
    pub simulations: BTreeMap<String, SimReport>,
    /// Totals per sink and table.
    pub tables: BTreeMap<String, BTreeMap<String, TableStats>>,
    /// Per sink and table: the events and JSON bytes read from the source streams its rows
    /// come from (the denominator of its compression ratio).
    pub table_inputs: BTreeMap<String, BTreeMap<String, StreamTotals>>,
}

/// Events and payload bytes read from source streams.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StreamTotals {
    /// Messages read.
    pub events: u64,
    /// Payload (JSON) bytes read.
    pub bytes: u64,
}

/// `(sink, table)` → the `(source, stream)` counters its rows come from.
type TableSources = Vec<((String, String), Vec<(String, String)>)>;

fn table_sources(plan: &PipelinePlan) -> TableSources {
    let mut by_origin: BTreeMap<String, (String, String)> = BTreeMap::new();
    for src in &plan.sources {
        for (p, out) in src.outputs.iter().enumerate() {
            if let Some(o) = crate::config::plan::origin_name(&plan.sources, &src.name, p) {
                by_origin.insert(o, (src.name.clone(), out.name.clone()));
            }
        }
    }
    let mut out = Vec::new();
    for sk in &plan.sinks {
        let mut per_table: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        for ((table, _), origin) in sk.inputs.iter().zip(&sk.origins) {
            if let Some(s) = by_origin.get(origin) {
                let v = per_table.entry(table.clone()).or_default();
                if !v.contains(s) {
                    v.push(s.clone());
                }
            }
        }
        out.extend(per_table.into_iter().map(|(t, v)| ((sk.name.clone(), t), v)));
    }
    out
}

fn stream_totals(metrics: &Metrics, streams: &[(String, String)]) -> StreamTotals {
    let mut t = StreamTotals::default();
    for (source, stream) in streams {
        let l = [("source", source.as_str()), ("stream", stream.as_str())];
        t.events += metrics.value("citystream_source_events_total", &l).unwrap_or(0.0) as u64;
        t.bytes += metrics.value("citystream_source_bytes_total", &l).unwrap_or(0.0) as u64;
    }
    t
}

/// Publishes, per table, the JSON bytes its source streams carried and the ratio to the
/// bytes committed to disk, once a second.
async fn account_tables(tables: TableSources, metrics: Metrics) {
    let gauges: Vec<_> = tables
        .iter()
        .map(|((sink, table), _)| {
            let l = [("sink", sink.as_str()), ("table", table.as_str())];
            (
                metrics.gauge(
                    "citystream_table_input_bytes",
                    "JSON bytes of the source streams a table is built from.",
                    &l,
                ),
                metrics.gauge(
                    "citystream_table_input_events",
                    "Events of the source streams a table is built from.",
                    &l,
                ),
                metrics.gauge(
                    "citystream_table_compression_ratio",
                    "Input JSON bytes per byte committed to the table.",
                    &l,
                ),
            )
        })
        .collect();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        for (((sink, table), streams), (bytes, events, ratio)) in tables.iter().zip(&gauges) {
            let t = stream_totals(&metrics, streams);
            bytes.set(t.bytes as f64);
            events.set(t.events as f64);
            let disk =
                metrics.value("citystream_sink_bytes_total", &[("sink", sink.as_str()), ("table", table.as_str())]);
            if let Some(d) = disk.filter(|d| *d > 0.0) {
                ratio.set(t.bytes as f64 / d);
            }
        }
    }
}

enum Finished {
    Source { name: String, messages: u64, sim: Option<SimReport> },
    Stage,
    Sink { name: String, tables: BTreeMap<String, TableStats> },
}

/// The Arrow bytes a batch holds (its slices of the buffers; the whole buffers where the
/// layout does not allow slicing the count).
pub(crate) fn batch_bytes(b: &arrow::array::RecordBatch) -> u64 {
    b.columns()
        .iter()
        .map(|c| c.to_data().get_slice_memory_size().unwrap_or_else(|_| c.get_array_memory_size()) as u64)
        .sum()
}

/// Asks a running pipeline to stop: sources stop reading, everything in flight drains and is
/// flushed, then [`run`] returns.
#[derive(Debug, Clone)]
pub struct StopHandle(Arc<watch::Sender<bool>>);

impl StopHandle {
    /// A handle and the receiver sources watch.
    pub fn new() -> (Self, watch::Receiver<bool>) {
        let (tx, rx) = watch::channel(false);
        (Self(Arc::new(tx)), rx)
    }

    /// Requests a graceful stop.
    pub fn stop(&self) {
        let _ = self.0.send(true);
    }
}

/// Runs `plan` to completion (sources exhausted, or stopped through `stop`).
pub async fn run(
    plan: PipelinePlan,
    metrics: Metrics,
    stop: watch::Receiver<bool>,
) -> Result<RunReport, PipelineError> {
    run_with_reload(plan, metrics, stop, None).await
}

/// What every task of a process shares (one stage graph, or one per partition).
#[derive(Clone, Default)]
pub(crate) struct ProcessShared {
    /// Live alert levels: the control center calibrates, the alert rules read.
    thresholds: citystream_operators::alert::ThresholdBoard,
    /// Offsets and epochs committed by the sources of every task: compaction merges only
    /// files wholly before them.
    commits: crate::task::CommitLog,
}

/// Like [`run`], and applies new configurations sent on `reload` live where they only change
/// tunable parameters (see [`reload`]).
pub async fn run_with_reload(
    plan: PipelinePlan,
    metrics: Metrics,
    stop: watch::Receiver<bool>,
    reload: Option<mpsc::Receiver<PipelinePlan>>,
) -> Result<RunReport, PipelineError> {
    let started = Instant::now();
    let layout = check_state_layout(&plan).await?;
    let process = ProcessShared::default();
    let parquet_roots: Vec<std::path::PathBuf> = plan.sinks.iter().filter_map(|s| s.config.files_root()).collect();
    let services = plan.runtime.services(ServiceContext {
        metrics: &metrics,
        table_roots: &parquet_roots,
        commits: crate::config::plan::any_committing(&plan.sources).then(|| process.commits.clone()),
        tasks: task_outputs(&plan),
    })?;
    let sources_of_tables = table_sources(&plan);
    let accountant = tokio::spawn(account_tables(sources_of_tables.clone(), metrics.clone()));
    let result = match plan.runtime.tasks {
        crate::config::TaskMode::Process => run_graph(plan, metrics.clone(), stop, reload, process).await,
        crate::config::TaskMode::Partition => {
            let committed = layout.map(|l| l.committed).unwrap_or_default();
            tasks::run(plan, metrics.clone(), stop, reload, process, committed).await
        }
    };
    accountant.abort();
    for s in services {
        s.stop().await;
    }
    let mut report = result?;
    for ((sink, table), streams) in &sources_of_tables {
        report.table_inputs.entry(sink.clone()).or_default().insert(table.clone(), stream_totals(&metrics, streams));
    }
    report.elapsed_s = started.elapsed().as_secs_f64();
    Ok(report)
}

/// What the state URL holds (`None`: no state), after refusing to run `runtime.tasks:
/// partition` on the state of a whole process, or `process` on the tasks' states: every window
/// would start empty (the state of the other mode is never read), so a switch is the
/// operator's explicit choice of a new `state_url`.
async fn check_state_layout(plan: &PipelinePlan) -> Result<Option<crate::task::StateLayout>, PipelineError> {
    let Some(url) = plan.runtime.state().map_err(|e| PipelineError::Task(format!("runtime state: {e}")))? else {
        return Ok(None);
    };
    let mode = plan.runtime.tasks;
    let layout = {
        let url = url.clone();
        tokio::task::spawn_blocking(move || crate::task::layout(&url))
            .await
            .map_err(|e| PipelineError::Task(e.to_string()))?
            .map_err(|source| PipelineError::State { stage: "runtime".into(), source })?
    };
    let switch = "point `runtime.state_url` at a new place to switch (the group's committed offsets \
                  are kept; windows, deduplication and alert state start empty), or go back";
    // both layouts: a deployment that switched on the same URL once (the Helm chart did) runs
    // on the one of its mode; the other's manifests are left, unread
    if layout.process && !layout.tasks.is_empty() {
        tracing::warn!(state = %url, tasks = ?layout.tasks, "the state URL holds a whole process's state and tasks' states: this run reads only those of `tasks: {}`", if mode == crate::config::TaskMode::Partition { "partition" } else { "process" });
        return Ok(Some(layout));
    }
    match mode {
        crate::config::TaskMode::Partition if layout.process => Err(PipelineError::Task(format!(
            "`runtime.tasks: partition`, but {url} holds the state of a whole process (written with `tasks: \
             process`), which no task would read: {switch} to `tasks: process`"
        ))),
        crate::config::TaskMode::Process if !layout.tasks.is_empty() => Err(PipelineError::Task(format!(
            "`runtime.tasks: process`, but {url} holds the state of per-partition tasks ({}; written with \
             `tasks: partition`), which a whole process would not read: {switch} to `tasks: partition`",
            layout.tasks.join(", ")
        ))),
        _ => Ok(Some(layout)),
    }
}

/// Runs one stage graph of `plan` (the whole pipeline, or one task of it) to completion.
pub(crate) async fn run_graph(
    plan: PipelinePlan,
    metrics: Metrics,
    stop: watch::Receiver<bool>,
    reload: Option<mpsc::Receiver<PipelinePlan>>,
    process: ProcessShared,
) -> Result<RunReport, PipelineError> {
    let cap = plan.runtime.channel_capacity.get();
    let mut subscribers: BTreeMap<(String, usize), Vec<Edge>> = BTreeMap::new();
    let mut queues: Vec<(String, Vec<mpsc::WeakSender<Message>>)> = Vec::new();
    // one bounded channel per input of every task (see `align`)
    let mut connect = |task: &str, inputs: &mut dyn Iterator<Item = &crate::config::StreamRef>| {
        let mut rxs = Vec::new();
        let mut weak = Vec::new();
        for r in inputs {
            let (tx, rx) = mpsc::channel(cap);
            weak.push(tx.downgrade());
            subscribers.entry((r.node.clone(), r.port)).or_default().push(Edge { tx });
            rxs.push(rx);
        }
        queues.push((task.to_owned(), weak));
        rxs
    };
    let stage_rx: Vec<_> = plan.stages.iter().map(|st| connect(&st.name, &mut st.inputs.iter())).collect();
    let sink_rx: Vec<_> =
        plan.sinks.iter().map(|sk| connect(&sk.name, &mut sk.inputs.iter().map(|(_, r)| r))).collect();
    let outputs_of = |node: &str, n: usize, subs: &mut BTreeMap<(String, usize), Vec<Edge>>| Outputs {
        ports: (0..n).map(|p| subs.remove(&(node.to_owned(), p)).unwrap_or_default()).collect(),
    };

    let (sink_acks, acks) = CheckpointAcks::new(plan.sinks.len());
    let state_url = plan.runtime.state().map_err(|e| PipelineError::Task(format!("runtime state: {e}")))?;
    let state = match state_url.clone() {
        Some(url) => {
            // reading the store (a disk, object storage) must not stall the other tasks'
            // stages on this worker thread
            let store = blocking(|| StateStore::open(&url))
                .map_err(|source| PipelineError::State { stage: "runtime".into(), source })?;
            tracing::info!(
                state = %url,
                restored_epoch = store.restored_epoch(),
                first_epoch = store.first_epoch(),
                "took over the operator state"
            );
            Some(store)
        }
        None => None,
    };
    let parquet_roots: Vec<std::path::PathBuf> = plan.sinks.iter().filter_map(|s| s.config.files_root()).collect();
    let mut tasks: JoinSet<Result<Finished, PipelineError>> = JoinSet::new();
    let ProcessShared { thresholds, commits: commit_log } = process;
    // with a restored checkpoint, what sinks wrote after it goes first: before any sink starts
    // (the control center reads the lake when it starts) and before anything runs
    if let Some(state) = &state {
        for sk in &plan.sinks {
            blocking(|| sk.config.discard_after_restored(state))?;
        }
    }
    let clocks = event_clocks(&plan);
    for ((sk, rx), ack) in plan.sinks.iter().zip(sink_rx).zip(sink_acks) {
        let ctx = SinkContext {
            name: &sk.name,
            inputs: sk.inputs.iter().map(|(t, _)| t.clone()).collect(),
            origins: &sk.origins,
            tables: &sk.tables,
            holding: sk
                .inputs
                .iter()
                .filter(|(_, r)| holds_rows_upstream(&plan, &r.node))
                .map(|(t, _)| t.clone())
                .collect(),
            upstream_clocks: sk.inputs.iter().map(|(_, r)| upstream_clocks(&plan, r, &clocks)).collect(),
            metrics: &metrics,
            thresholds: &thresholds,
            state: state.as_ref(),
            stop: stop.clone(),
            cpu_ns: metrics.counter(
                "citystream_stage_cpu_nanoseconds_total",
                "Thread CPU time spent in a stage's operator.",
                &[("stage", sk.name.as_str())],
            ),
        };
        let sink = sinks::SinkTask::new(&sk.name, sk.inputs.len(), sk.config.build(ctx)?, ack, &metrics);
        let name = sk.name.clone();
        tasks.spawn(async move { sink.run(rx).await.map(|tables| Finished::Sink { name, tables }) });
    }
    if let Some(state) = &state {
        commit_log.lock().expect("commit log").record(state.lineage(), state.restored_epoch(), []);
    }
    let mut retune_senders = BTreeMap::new();
    let routings = routings(&plan);
    // batches an operator fails on go to `operator_errors` beside the first Parquet sink's tables
    let operator_errors = plan.error_table(state.as_ref(), &metrics)?;
    let mut stateful: Vec<&str> = Vec::new();
    // the Arrow bytes of state restored, and the time reading and restoring them took
    let mut restored = (0u64, std::time::Duration::ZERO);
    for (st, rx) in plan.stages.iter().zip(stage_rx) {
        let (event_clock, routing) = match (&st.op, st.inputs.as_slice()) {
            (crate::config::OperatorSpec::Decode(_), [r]) => {
                let at = (r.node.clone(), r.port);
                (clocks.get(&at).cloned(), routings.get(&at).cloned())
            }
            _ => (None, None),
        };
        let ctx = BuildContext {
            stage: st.name.clone(),
            metrics: metrics.clone(),
            thresholds: thresholds.clone(),
            event_clock,
            routing,
        };
        let mut op = st.op.config().build(&st.input_schema, &ctx).map_err(|errs| PipelineError::Build {
            stage: st.name.clone(),
            message: errs.iter().map(|e| format!("{}: {}", e.key, e.message)).collect::<Vec<_>>().join("; "),
        })?;
        let mut restored_wm = None;
        let loading = Instant::now();
        if let Some(state) = &state
            && op.is_stateful()
            && let Some((batch, wm)) = blocking(|| state.load(&st.name, op.kind()))
                .map_err(|source| PipelineError::State { stage: st.name.clone(), source })?
        {
            let rows = batch.num_rows();
            restored.0 += batch_bytes(&batch);
            op.restore(batch).map_err(|source| PipelineError::Operator { stage: st.name.clone(), source })?;
            restored.1 += loading.elapsed();
            tracing::info!(stage = st.name, rows, epoch = state.restored_epoch(), watermark = wm, "restored state");
            restored_wm = Some(wm);
        }
        let outputs = outputs_of(&st.name, st.outputs.len(), &mut subscribers);
        if op.is_stateful() {
            stateful.push(st.name.as_str());
        }
        let mut task = stage::StageTask::new(st.name.clone(), op, st.inputs.len(), outputs, &metrics);
        if let Some(e) = &operator_errors {
            task = task.with_errors(e.clone());
        }
        if let Some(state) = &state {
            task = task.with_state(state.clone(), &metrics);
        }
        if let Some(wm) = restored_wm {
            task = task.with_restored_watermark(wm);
        }
        if reload.is_some() {
            let (tx, rx) = watch::channel(None);
            retune_senders.insert(st.name.clone(), tx);
            task = task.with_retune(rx);
        }
        tasks.spawn(async move { task.run(rx).await.map(|()| Finished::Stage) });
    }
    if let Some(state) = &state
        && restored.0 > 0
    {
        let (bytes, took) = restored;
        tracing::info!(
            state = %state_url.as_ref().map(ToString::to_string).unwrap_or_default(),
            epoch = state.restored_epoch(),
            bytes,
            seconds = took.as_secs_f64(),
            mb_per_s = bytes as f64 / 1e6 / took.as_secs_f64().max(1e-9),
            "restored the operator state"
        );
    }
    for (stage, what) in &plan.city_wide_state {
        tracing::warn!(
            stage,
            "{what}: with several instances in one group, each does this on its own partitions (`runtime.tasks: \
             partition` with `global_task: true` does it once, in the global task)"
        );
    }
    if state.is_none() && crate::config::plan::any_committing(&plan.sources) && !stateful.is_empty() {
        tracing::warn!(
            ?stateful,
            "no `runtime.state_dir`: after a crash these stages restart empty, and tables derived from them may miss \
             or repeat rows"
        );
    }
    for src in &plan.sources {
        let outputs = outputs_of(&src.name, src.outputs.len(), &mut subscribers);
        let name = src.name.clone();
        let stop = stop.clone();
        let metrics = metrics.clone();
        let port_clocks: Vec<Option<EventClock>> =
            (0..src.outputs.len()).map(|p| clocks.get(&(src.name.clone(), p)).cloned()).collect();
        let ctx = crate::task::SourceContext {
            name: src.name.clone(),
            outputs,
            clocks: port_clocks,
            routing: (0..src.outputs.len()).map(|p| routings.get(&(src.name.clone(), p)).cloned()).collect(),
            stop,
            metrics,
            acks: acks.clone(),
            recovery: crate::task::Recovery {
                state: state.clone(),
                sink_roots: parquet_roots.clone(),
                commits: commit_log.clone(),
            },
        };
        let source = src.config.build();
        tasks.spawn(async move {
            let r = source.run(ctx).await?;
            let sim = r.account.and_then(|a| a.downcast::<SimReport>().ok()).map(|s| *s);
            Ok(Finished::Source { name, messages: r.messages, sim })
        });
    }
    debug_assert!(subscribers.is_empty(), "every edge has a producer");
    drop(acks);

    let monitor = tokio::spawn(monitor_queues(queues, metrics.clone()));
    let reloader = reload.map(|rx| tokio::spawn(reload::reloader(plan.clone(), rx, retune_senders, metrics.clone())));
    let (report, mut first_error) = collect(&mut tasks).await;
    if let Some(e) = &operator_errors
        && let Err(error) = e.publish_committed()
    {
        first_error.get_or_insert(PipelineError::OperatorErrors { stage: "runtime".into(), error });
    }
    monitor.abort();
    if let Some(r) = reloader {
        r.abort();
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

/// Waits for every task; the report of what finished, and the first error (its root cause,
/// not the `Disconnected` errors it causes downstream), after which the others are aborted.
async fn collect(tasks: &mut JoinSet<Result<Finished, PipelineError>>) -> (RunReport, Option<PipelineError>) {
    let mut report = RunReport::default();
    let mut first_error = None;
    // after a `Disconnected` (a consequence), the task that failed first gets a moment to
    // report its cause before everything is aborted
    let mut grace: Option<tokio::time::Instant> = None;
    loop {
        let joined = match grace {
            Some(until) => match tokio::time::timeout_at(until, tasks.join_next()).await {
                Ok(j) => j,
                Err(_) => {
                    grace = None;
                    tasks.abort_all();
                    continue;
                }
            },
            None => tasks.join_next().await,
        };
        let Some(joined) = joined else { break };
        match joined {
            Ok(Ok(Finished::Source { name, messages, sim })) => {
                report.source_messages.insert(name.clone(), messages);
                if let Some(s) = sim {
                    report.simulations.insert(name, s);
                }
            }
            Ok(Ok(Finished::Stage)) => {}
            Ok(Ok(Finished::Sink { name, tables })) => {
                report.tables.insert(name, tables);
            }
            Ok(Err(PipelineError::Disconnected)) => {
                if first_error.is_none() {
                    first_error = Some(PipelineError::Disconnected);
                    grace = Some(tokio::time::Instant::now() + std::time::Duration::from_secs(2));
                }
            }
            Ok(Err(e)) => {
                // keep the root cause, not the `Disconnected` errors it causes elsewhere
                if first_error.is_none() || matches!(first_error, Some(PipelineError::Disconnected)) {
                    first_error = Some(e);
                }
                grace = None;
                tasks.abort_all();
            }
            Err(e) if e.is_cancelled() => {}
            Err(e) => {
                first_error.get_or_insert(PipelineError::Task(e.to_string()));
                grace = None;
                tasks.abort_all();
            }
        }
    }
    (report, first_error)
}

/// Every task of `plan` and the `(counter, output)` pairs that count the rows it hands on (for
/// the energy account).
fn task_outputs(plan: &PipelinePlan) -> Vec<(String, Vec<(String, String)>)> {
    let mut tasks = Vec::new();
    for s in &plan.sources {
        let outs = s.outputs.iter().map(|o| ("citystream_source_events_total".to_owned(), o.name.clone())).collect();
        tasks.push((s.name.clone(), outs));
    }
    for st in &plan.stages {
        let outs = st.outputs.iter().map(|o| ("citystream_stage_rows_out_total".to_owned(), o.name.clone())).collect();
        tasks.push((st.name.clone(), outs));
    }
    for sk in &plan.sinks {
        tasks.push((sk.name.clone(), Vec::new()));
    }
    tasks
}

/// One event-time clock per source output that a `decode` stage reads (see
/// [`citystream_operators::event_time`]), keyed by (source, port).
fn event_clocks(plan: &PipelinePlan) -> BTreeMap<(String, usize), EventClock> {
    let mut clocks = BTreeMap::new();
    for st in &plan.stages {
        let (crate::config::OperatorSpec::Decode(_), [r]) = (&st.op, st.inputs.as_slice()) else { continue };
        let Some(src) = plan.sources.iter().find(|s| s.name == r.node) else { continue };
        let lag = src.config.max_out_of_orderness();
        clocks.entry((r.node.clone(), r.port)).or_insert_with(|| EventClock::new(lag.as_millis_i64()));
    }
    clocks
}

/// The event clocks of the source streams whose rows reach `r`, each once.
fn upstream_clocks(
    plan: &PipelinePlan,
    r: &crate::config::StreamRef,
    clocks: &BTreeMap<(String, usize), EventClock>,
) -> Vec<EventClock> {
    let mut found = BTreeMap::new();
    let mut todo = vec![r.clone()];
    while let Some(r) = todo.pop() {
        match plan.stages.iter().find(|s| s.name == r.node) {
            Some(st) => todo.extend(st.inputs.iter().cloned()),
            None => {
                if let Some(c) = clocks.get(&(r.node.clone(), r.port)) {
                    found.insert((r.node, r.port), c.clone());
                }
            }
        }
    }
    found.into_values().collect()
}

/// How each keyed source stream is keyed, keyed by (source, port): the source learns the
/// topic's partition count, `decode` checks each row against it.
fn routings(plan: &PipelinePlan) -> BTreeMap<(String, usize), Routing> {
    plan.topic_keys.iter().map(|(at, key)| (at.clone(), Routing::new(key.as_ref().clone()))).collect()
}

/// Whether rows reaching `node` pass through a stage that holds rows and emits them after newer
/// ones (`compress`), so their source positions come out of order.
fn holds_rows_upstream(plan: &PipelinePlan, node: &str) -> bool {
    let Some(st) = plan.stages.iter().find(|s| s.name == node) else {
        // the global task's rows come in epochs of several tasks, not in source order
        #[cfg(feature = "kafka")]
        return plan
            .sources
            .iter()
            .any(|s| s.name == node && matches!(s.config, crate::config::SourceConfig::Global(_)));
        #[cfg(not(feature = "kafka"))]
        return false;
    };
    matches!(st.op, crate::config::OperatorSpec::Compress(_))
        || st.inputs.iter().any(|r| holds_rows_upstream(plan, &r.node))
}

/// Publishes the depth of every stage's input queue as a gauge, twice a second.
async fn monitor_queues(queues: Vec<(String, Vec<mpsc::WeakSender<Message>>)>, metrics: Metrics) {
    let gauges: Vec<_> = queues
        .iter()
        .map(|(name, _)| {
            metrics.gauge(
                "citystream_queue_depth",
                "Messages waiting in a stage's input queue.",
                &[("stage", name.as_str())],
            )
        })
        .collect();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tick.tick().await;
        for ((_, weak), g) in queues.iter().zip(&gauges) {
            let depth: usize =
                weak.iter().filter_map(mpsc::WeakSender::upgrade).map(|tx| tx.max_capacity() - tx.capacity()).sum();
            g.set(depth as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tables_behind_compress_are_found() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let repo = root.display().to_string();
        let text = std::fs::read_to_string(root.join("deploy/local.yaml"))
            .unwrap()
            .replace("deploy/road_graph.csv", &format!("{repo}/deploy/road_graph.csv"))
            .replace("models/onnx/", &format!("{repo}/models/onnx/"));
        let raw = crate::config::load_str(&text, "local.yaml").unwrap();
        let plan = crate::config::plan::plan(raw, "local.yaml").unwrap();
        // traffic_stored compresses traffic_unique, which dedups traffic
        assert!(super::holds_rows_upstream(&plan, "traffic_stored"));
        assert!(!super::holds_rows_upstream(&plan, "traffic_unique"));
        assert!(!super::holds_rows_upstream(&plan, "city"), "a source holds nothing");
    }

    /// A process (`tasks: process`) on state that per-partition tasks wrote would start every
    /// window empty: it stops before it reads anything, and says how to switch.
    #[tokio::test]
    async fn a_process_refuses_the_state_of_per_partition_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let input = dir.path().join("traffic.jsonl");
        std::fs::write(&input, "{\"not\": \"a reading\"}\n").unwrap();
        let text = format!(
            "name: t\nsources:\n  city: {{type: files, paths: {{traffic: {}}}}}\nstages:\n  traffic: {{type: decode, \
             input: city.traffic, kind: traffic}}\nsinks:\n  lake: {{type: parquet, path: {}, tables: {{traffic: \
             traffic, dead: traffic.dead_letters, late: traffic.late_events}}}}\nruntime:\n  state_dir: {}\n  \
             status_interval: null\n",
            input.display(),
            dir.path().join("lake").display(),
            state.display()
        );
        let plan = || crate::config::plan::plan(crate::config::load_str(&text, "t.yaml").unwrap(), "t.yaml").unwrap();
        let url = crate::task::StateUrl::Local(state.clone());
        crate::task::StateStore::open(&url.child("task-2")).unwrap().commit(1, &Default::default()).unwrap();
        let (_stop, rx) = super::StopHandle::new();
        let e = super::run(plan(), citystream_operators::Metrics::new(), rx).await.unwrap_err().to_string();
        assert!(e.contains("holds the state of per-partition tasks (task-2;") && e.contains("state_url"), "{e}");
        assert!(!dir.path().join("lake").exists(), "nothing ran");
        // on a state of its own it runs
        std::fs::remove_dir_all(&state).unwrap();
        let (_stop, rx) = super::StopHandle::new();
        super::run(plan(), citystream_operators::Metrics::new(), rx).await.unwrap();
        let layout = crate::task::layout(&url).unwrap();
        assert!(layout.process && layout.tasks.is_empty(), "{layout:?}");
        // a URL holding both (switched once on the same place) runs in its mode's layout
        crate::task::StateStore::open(&url.child("task-2")).unwrap().commit(1, &Default::default()).unwrap();
        let (_stop, rx) = super::StopHandle::new();
        super::run(plan(), citystream_operators::Metrics::new(), rx).await.unwrap();
    }
}
