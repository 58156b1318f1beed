//! `runtime.tasks: partition`: one task per partition number, whose state moves with it.
//!
//! A task is the whole stage graph of the plan over partition `p` of every topic: its own
//! Kafka consumer (assigned by hand), watermark, barriers, epochs, sinks' files and state store
//! at `{state}/task-{p}` — the unit Kafka Streams calls a task. The process's member of the
//! group (a [`crate::task::Membership`], built by the planner: Kafka's consumer group) decides
//! which tasks run here: an assigned partition of the lead topic starts its task, which
//! restores the task's state from wherever the last owner checkpointed it (its manifest chain
//! fences that owner, should it still run); a revoked one checkpoints, commits and stops
//! before the member lets it go. One process running every task writes exactly what several
//! processes sharing them write: the tasks are the same either way, only where they run
//! differs.
//!
//! Stages holding city-wide state run in the *global task* (`kafka::global`), with the task of
//! partition 0: it starts, stops and moves with it (key [`GLOBAL_TASK`] here).
//!
//! Shared by the tasks of a process: the alert thresholds board, the record of commits
//! (compaction), the metrics (counters add up across tasks; gauges carry a `task` label), the energy
//! services.

// only a Kafka source has a group to share tasks through
#![cfg_attr(not(feature = "kafka"), allow(dead_code))]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use citystream_operators::Metrics;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::{ProcessShared, RunReport, StopHandle, run_graph};
use crate::config::PipelinePlan;
use crate::task::{Assignments, PipelineError};

/// The key of the global task among the running ones.
const GLOBAL_TASK: i32 = -1;

/// The tasks among `partitions` and, with partition 0, the global task.
fn with_global(partitions: &[i32]) -> Vec<i32> {
    let mut v = partitions.to_vec();
    if partitions.contains(&0) {
        v.push(GLOBAL_TASK);
    }
    v
}

/// The `task` label of a task's gauges: its partition, or `global`.
fn task_label(partition: i32) -> String {
    if partition == GLOBAL_TASK { "global".to_owned() } else { partition.to_string() }
}

/// Runs the tasks the group assigns this process until `stop` (then each checkpoints and
/// stops), or — with `stop_when_idle` — until every task it ran ended idle and no task came
/// for a session timeout.
pub(super) async fn run(
    plan: PipelinePlan,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
    mut reload: Option<mpsc::Receiver<PipelinePlan>>,
    process: ProcessShared,
    committed: Committed,
) -> Result<RunReport, PipelineError> {
    let source = plan.sources.first().map(|s| s.name.clone()).unwrap_or_default();
    let err = |message: String| PipelineError::Source { source_name: source.clone(), message };
    let Some((member, stop_when_idle)) = plan.sources.first().and_then(|s| s.config.membership()) else {
        return Err(PipelineError::Task("`runtime.tasks: partition` needs a kafka source".into()));
    };
    publish_stranded(&plan, committed).await?;
    // a bounded run leaves once its tasks ended idle and none came for a session timeout: the
    // tasks of a member that died (or came back from a pause and failed) reach the survivors
    // only after the group gave up on it, and leaving before would leave them unrun
    let grace = member.session_timeout();
    let set = Arc::new(TaskSet {
        template: Mutex::new(plan.clone()),
        metrics,
        process,
        runtime: tokio::runtime::Handle::current(),
        running: Mutex::new(BTreeMap::new()),
        ended: Mutex::new(RunReport::default()),
        error: Mutex::new(None),
        started_any: AtomicBool::new(false),
        closing: AtomicBool::new(false),
    });
    let leave = Arc::new(AtomicBool::new(false));
    let member = {
        let (set, leave) = (set.clone(), leave.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("group-member".into())
            .spawn(move || {
                let tasks: Arc<dyn Assignments> = set;
                let _ = tx.send(member.run(tasks, Box::new(move || leave.load(Ordering::Relaxed))));
            })
            .map_err(|e| err(format!("starting the group member's thread: {e}")))?;
        rx
    };
    let began = Instant::now();
    let mut idle_since: Option<Instant> = None;
    let mut member = std::pin::pin!(member);
    let mut member_result: Option<Result<(), String>> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = stop.changed() => if changed.is_err() || *stop.borrow() { break },
            Some(new) = async { reload.as_mut()?.recv().await } => set.reload(new),
            r = &mut member, if member_result.is_none() => {
                member_result = Some(r.unwrap_or_else(|_| Err("the group member's thread died".into())));
                break;
            }
        }
        set.reap();
        if set.lock_error().is_some() {
            break;
        }
        let idle_now = set.lock_running().is_empty();
        idle_since = if idle_now { idle_since.or(Some(Instant::now())) } else { None };
        if let Some(idle) = stop_when_idle
            && idle_since.is_some_and(|t| t.elapsed() >= grace)
            // with no task yet, joining the group may take a while: a minute at least
            && (set.started_any.load(Ordering::Relaxed) || began.elapsed() >= idle.max(Duration::from_secs(60)))
        {
            tracing::info!("every task of this process ended idle: leaving the group");
            break;
        }
    }
    // no task starts from here on; after a failure the tasks stop at once, without a
    // checkpoint; otherwise the member's leaving revokes them, so each checkpoints and stops
    // before its partition can go to another process
    set.closing.store(true, Ordering::Relaxed);
    if set.lock_error().is_some() {
        let running: Vec<i32> = set.lock_running().keys().copied().collect();
        set.abort(&running);
    }
    leave.store(true, Ordering::Relaxed);
    if member_result.is_none() {
        member_result = Some(member.await.unwrap_or_else(|_| Err("the group member's thread died".into())));
    }
    // what the member could not revoke (it failed, or leaving timed out) stops the same way
    let running: Vec<i32> = set.lock_running().keys().copied().collect();
    if !running.is_empty() {
        let set = set.clone();
        tokio::task::spawn_blocking(move || set.revoked(&running))
            .await
            .map_err(|e| PipelineError::Task(e.to_string()))?;
    }
    set.reap();
    if let Some(e) = set.error.lock().expect("error").take() {
        return Err(e);
    }
    if let Some(Err(e)) = member_result {
        return Err(err(e));
    }
    let report = std::mem::take(&mut *set.ended.lock().expect("ended"));
    Ok(report)
}

/// Before this process runs any task: publishes the files that an earlier process on the same
/// disk (this pod before it was killed) committed in a task's manifest and had no time to
/// publish. A task's next owner publishes such files at its restore only where it sees them,
/// and a pod's lake is on a volume of its own.
/// `committed`: per lineage, what the tasks' newest manifests commit (`StateLayout::committed`,
/// read at start).
async fn publish_stranded(plan: &PipelinePlan, committed: Committed) -> Result<(), PipelineError> {
    if committed.is_empty() {
        return Ok(());
    }
    let sinks: Vec<crate::config::SinkConfig> = plan.sinks.iter().map(|s| s.config.clone()).collect();
    tokio::task::spawn_blocking(move || sinks.iter().try_for_each(|s| s.publish_stranded(&committed)))
        .await
        .map_err(|e| PipelineError::Task(e.to_string()))?
}

/// Per state lineage, each writer's newest committed epoch.
type Committed = BTreeMap<String, Vec<(String, u64)>>;

/// Adds a task's report to the process's: messages are the task's own; a sink's table
/// totals are the process's metrics counters (shared by its tasks), so the newest is the
/// largest.
fn merge(into: &mut RunReport, r: RunReport) {
    for (source, n) in r.source_messages {
        *into.source_messages.entry(source).or_default() += n;
    }
    for (sink, tables) in r.tables {
        let to = into.tables.entry(sink).or_default();
        for (table, t) in tables {
            let e = to.entry(table).or_default();
            e.rows = e.rows.max(t.rows);
            e.files = e.files.max(t.files);
            e.bytes = e.bytes.max(t.bytes);
        }
    }
}

struct Running {
    stop: StopHandle,
    reload: mpsc::Sender<PipelinePlan>,
    join: JoinHandle<Result<RunReport, PipelineError>>,
    started: Instant,
}

/// The tasks of this process, started and stopped by the group member's callbacks.
struct TaskSet {
    /// The plan tasks are made from (the newest reloaded one).
    template: Mutex<PipelinePlan>,
    metrics: Metrics,
    process: ProcessShared,
    runtime: tokio::runtime::Handle,
    running: Mutex<BTreeMap<i32, Running>>,
    /// The reports of the tasks that ended, merged.
    ended: Mutex<RunReport>,
    /// The first error of a task, or of the membership: the process stops.
    error: Mutex<Option<PipelineError>>,
    /// Whether any task started here yet.
    started_any: AtomicBool,
    /// Set once the process is leaving: assignments start nothing.
    closing: AtomicBool,
}

impl TaskSet {
    fn lock_running(&self) -> MutexGuard<'_, BTreeMap<i32, Running>> {
        self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_error(&self) -> MutexGuard<'_, Option<PipelineError>> {
        self.error.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn fail(&self, e: PipelineError) {
        self.lock_error().get_or_insert(e);
    }

    /// Records how a task ended.
    fn ended(&self, partition: i32, result: Result<Result<RunReport, PipelineError>, tokio::task::JoinError>) {
        // its gauges go with it, unless it runs here again already
        if !self.lock_running().contains_key(&partition) {
            self.metrics.forget_task(&task_label(partition));
        }
        match result {
            Ok(Ok(report)) => merge(&mut self.ended.lock().expect("ended"), report),
            Ok(Err(e)) => {
                tracing::error!(task = partition, "the task failed: {e}");
                self.fail(e);
            }
            Err(e) if e.is_cancelled() => {}
            Err(e) => self.fail(PipelineError::Task(format!("task {partition}: {e}"))),
        }
    }

    /// Collects the tasks that ended by themselves (idle, or failed).
    fn reap(&self) {
        let done: Vec<(i32, Running)> = {
            let mut running = self.lock_running();
            let ps: Vec<i32> = running.iter().filter(|(_, r)| r.join.is_finished()).map(|(p, _)| *p).collect();
            ps.into_iter().filter_map(|p| Some((p, running.remove(&p)?))).collect()
        };
        for (p, r) in done {
            // finished: its output is ready, polling once does not wait
            let Some(result) = futures_util::FutureExt::now_or_never(r.join) else { continue };
            tracing::info!(task = p, ran_s = r.started.elapsed().as_secs_f64(), "task ended");
            self.ended(p, result);
        }
    }

    /// The plan of task `key` (the global task's for [`GLOBAL_TASK`]; `None`: there is none).
    fn plan_of(template: &PipelinePlan, key: i32) -> Result<Option<PipelinePlan>, String> {
        if key == GLOBAL_TASK { template.global_plan() } else { template.task_plan(key).map(Some) }
    }

    fn start(&self, partition: i32) -> Result<(), PipelineError> {
        let plan = Self::plan_of(&self.template.lock().expect("template"), partition).map_err(PipelineError::Task)?;
        let Some(plan) = plan else { return Ok(()) };
        let (stop, stop_rx) = StopHandle::new();
        let (reload, reload_rx) = mpsc::channel(1);
        // the task's gauges carry its label; its counters add up with the other tasks'
        let (metrics, process) = (self.metrics.for_task(&task_label(partition)), self.process.clone());
        let join = self.runtime.spawn(run_graph(plan, metrics, stop_rx, Some(reload_rx), process));
        self.lock_running().insert(partition, Running { stop, reload, join, started: Instant::now() });
        self.started_any.store(true, Ordering::Relaxed);
        tracing::info!(task = partition, "task started");
        Ok(())
    }

    /// Sends a reloaded plan to every running task, and keeps it for tasks started later,
    /// unless it cannot be applied live (then every task keeps the plan it runs).
    fn reload(&self, plan: PipelinePlan) {
        let outcome = super::reload::compare(&self.template.lock().expect("template"), &plan);
        if let super::reload::ReloadOutcome::Rejected(reasons) = outcome {
            tracing::warn!(?reasons, "the new configuration cannot be applied live: the tasks keep theirs");
            return;
        }
        for (p, r) in self.lock_running().iter() {
            match Self::plan_of(&plan, *p) {
                Ok(None) => {}
                Ok(Some(tp)) => {
                    if r.reload.try_send(tp).is_err() {
                        tracing::warn!(task = p, "a reload is still being applied: this one is skipped for the task");
                    }
                }
                Err(e) => tracing::warn!(task = p, "reload: {e}"),
            }
        }
        *self.template.lock().expect("template") = plan;
    }

    /// Stops tasks at once, without a checkpoint (their state and files stay as the last
    /// commit left them: whoever runs them next replays from there).
    fn abort(&self, partitions: &[i32]) {
        let mut running = self.lock_running();
        for p in partitions {
            if let Some(r) = running.remove(p) {
                r.join.abort();
                tracing::warn!(task = p, "task stopped without a checkpoint");
            }
        }
    }
}

impl Assignments for TaskSet {
    fn assigned(&self, partitions: &[i32]) {
        // a process that failed (a lost assignment, a failed task) starts nothing more: its
        // main loop is about to abort what runs and leave
        if self.closing.load(Ordering::Relaxed) || self.lock_error().is_some() {
            tracing::info!(?partitions, "assigned while leaving: not started");
            return;
        }
        for p in with_global(partitions) {
            if self.lock_running().contains_key(&p) {
                continue;
            }
            if let Err(e) = self.start(p) {
                self.fail(e);
            }
        }
    }

    fn revoked(&self, partitions: &[i32]) {
        let partitions = with_global(partitions);
        let stopping: Vec<(i32, Running)> = {
            let mut running = self.lock_running();
            partitions.iter().filter_map(|p| Some((*p, running.remove(p)?))).collect()
        };
        for (_, r) in &stopping {
            r.stop.stop();
        }
        for (p, r) in stopping {
            let at = Instant::now();
            let result = self.runtime.block_on(r.join);
            tracing::info!(task = p, stop_s = at.elapsed().as_secs_f64(), "task revoked: checkpointed and stopped");
            self.ended(p, result);
        }
    }

    fn lost(&self, partitions: &[i32]) {
        self.closing.store(true, Ordering::Relaxed);
        self.abort(&with_global(partitions));
        self.fail(PipelineError::Task(
            "the consumer group revoked our tasks after a session timeout (assignment lost): another process may \
             already run them; stopping (their state is fenced by the next owner's checkpoint)"
                .into(),
        ));
    }
}
