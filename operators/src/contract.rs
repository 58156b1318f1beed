//! The operator contract.

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;

/// A checkpoint barrier. Everything before it on a stream belongs to checkpoint `epoch`;
/// sinks make their output durable when all their inputs have passed it, and sources commit
/// the positions they recorded for it once every sink has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Barrier {
    /// Monotonically increasing checkpoint number.
    pub epoch: u64,
}

/// What flows on an edge of the stage graph, in order.
#[derive(Debug, Clone)]
pub enum Message {
    /// A batch of rows.
    Batch(RecordBatch),
    /// No event with an event time (UTC ms) at or before this value will follow on this edge,
    /// except late events, which operators route to a side output.
    Watermark(i64),
    /// A checkpoint barrier.
    Barrier(Barrier),
    /// The upstream finished; nothing follows.
    End,
}

/// A named output of an operator with its schema. Port 0 is the main output.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputSpec {
    /// Name of the port (`main`, `dead_letters`, `late_events`, …).
    pub name: String,
    /// Schema of every batch emitted on this port.
    pub schema: SchemaRef,
}

impl OutputSpec {
    /// An output spec from its parts.
    pub fn new(name: impl Into<String>, schema: SchemaRef) -> Self {
        Self { name: name.into(), schema }
    }
}

/// Collects what an operator emits during one call, per output port.
#[derive(Debug, Default)]
pub struct Collector {
    ports: Vec<Vec<RecordBatch>>,
}

impl Collector {
    /// A collector for an operator with `ports` outputs.
    pub fn new(ports: usize) -> Self {
        Self { ports: vec![Vec::new(); ports] }
    }

    /// Emits `batch` on output `port` (empty batches are dropped).
    ///
    /// # Panics
    /// If `port` is not one of the operator's declared outputs — a bug in the operator.
    pub fn emit(&mut self, port: usize, batch: RecordBatch) {
        if batch.num_rows() > 0 {
            self.ports[port].push(batch);
        }
    }

    /// Takes everything emitted so far as `(port, batch)` pairs, in port order.
    pub fn drain(&mut self) -> impl Iterator<Item = (usize, RecordBatch)> + '_ {
        self.ports.iter_mut().enumerate().flat_map(|(p, v)| v.drain(..).map(move |b| (p, b)))
    }

    /// Everything emitted on `port` so far (for tests).
    pub fn port(&self, port: usize) -> &[RecordBatch] {
        &self.ports[port]
    }

    /// Forgets everything emitted so far (what a call that failed half-way had emitted).
    pub fn clear(&mut self) {
        self.ports.iter_mut().for_each(Vec::clear);
    }
}

/// Why a running stage cannot take a new configuration (the reloader then keeps the old one
/// and says why; a restart applies it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LiveChangeError {
    /// The stage's type changed.
    #[error("the type changed from `{from}` to `{to}`")]
    TypeChanged {
        /// The running type.
        from: &'static str,
        /// The new type.
        to: &'static str,
    },
    /// The stage's type has no parameters that can change while running.
    #[error("a `{0}` stage has no parameters that can change while running")]
    NotTunable(&'static str),
    /// A parameter that shapes the stage's state or output changed; what can change live.
    #[error("{0}")]
    NeedsRestart(&'static str),
    /// The operator was handed a configuration of another type (a bug in the caller).
    #[error("not a `{0}` config")]
    WrongConfig(&'static str),
    /// The new values do not fit the stage's input.
    #[error("{0}")]
    Invalid(String),
}

/// The class of an error, which decides what the runtime does with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Bad input the operator refused: the runtime records the batch in `operator_errors`
    /// and goes on.
    User,
    /// A dependency failed (disk, network, broker): the pipeline stops, and a restart retries
    /// from the last checkpoint.
    External,
    /// A bug in citystream: the pipeline stops.
    Internal,
}

/// An error raised by an operator while processing.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// An Arrow kernel failed.
    #[error("arrow: {0}")]
    Arrow(#[from] ArrowError),
    /// A batch arrived with a schema the operator was not planned for.
    #[error("operator `{operator}` received a batch whose schema does not match its plan: {detail}")]
    SchemaMismatch {
        /// The operator's kind.
        operator: &'static str,
        /// What differs.
        detail: String,
    },
    /// `restore` was called on an operator that keeps no state, or with state of the wrong shape.
    #[error("operator `{operator}` cannot restore state: {detail}")]
    State {
        /// The operator's kind.
        operator: &'static str,
        /// Why.
        detail: String,
    },
    /// The operator refused some rows of the batch it was given (and handled the others): the
    /// runtime records `rows` in `operator_errors` with `detail` and goes on.
    #[error("operator `{operator}` refused {} rows: {detail}", rows.num_rows())]
    Rejected {
        /// The operator's kind.
        operator: &'static str,
        /// Why, without the values (the rows themselves are recorded).
        detail: String,
        /// The refused rows, with the operator's input schema.
        rows: RecordBatch,
    },
}

impl OperatorError {
    /// How the runtime should treat this error.
    pub fn class(&self) -> ErrorClass {
        match self {
            OperatorError::Arrow(ArrowError::IoError(..)) => ErrorClass::External,
            OperatorError::Arrow(_) | OperatorError::SchemaMismatch { .. } => ErrorClass::Internal,
            // a state file of another shape, an unreadable budget: the pipeline cannot go on
            OperatorError::State { .. } => ErrorClass::External,
            OperatorError::Rejected { .. } => ErrorClass::User,
        }
    }
}

/// A synchronous stream operator over Arrow batches.
///
/// The runtime calls the hooks in stream order from one task, so an operator needs no
/// locking. Operators transform what they are given and emit through the [`Collector`]; the
/// runtime calls them on its async worker threads, so one that must wait (a rate limit's
/// sleep, a ledger's fsync) says so with [`waits`](Operator::waits).
pub trait Operator: Send {
    /// The operator's kind, e.g. `decode` (for logs, metrics and errors).
    fn kind(&self) -> &'static str;

    /// The output ports, main first. Fixed for the life of the operator.
    fn outputs(&self) -> &[OutputSpec];

    /// Processes one batch of the input.
    fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<(), OperatorError>;

    /// The input watermark advanced to `watermark` (UTC ms). Windowed operators emit what it
    /// closes. The runtime forwards the watermark downstream after this returns.
    fn on_watermark(&mut self, _watermark: i64, _out: &mut Collector) -> Result<(), OperatorError> {
        Ok(())
    }

    /// A checkpoint barrier is about to pass: emit what is held only to batch work (an
    /// inference micro-batch), so that the snapshot taken next holds real state only. Rows
    /// emitted here still belong to the checkpoint. The default holds nothing.
    fn on_checkpoint(&mut self, _out: &mut Collector) -> Result<(), OperatorError> {
        Ok(())
    }

    /// The watermark the operator's outputs honour once [`on_watermark`](Self::on_watermark)
    /// handled `input`: no row it emits later has an event time at or before it. The runtime
    /// forwards this (never lower than what it forwarded before). An operator that emits rows
    /// behind its input watermark — a window emitted `allowed_lateness` after its end, a row
    /// held back — lowers it. The default is the input watermark.
    fn output_watermark(&self, input: i64) -> i64 {
        input
    }

    /// Whether the operator can go on with the next batch after it panicked on one (the
    /// runtime then records the batch in `operator_errors`). An operator whose state could be
    /// left half-changed in a way that matters (a privacy budget) says no, and the pipeline
    /// stops instead. Default: yes.
    fn recovers_from_panic(&self) -> bool {
        true
    }

    /// Whether a call may wait on a clock or a disk rather than compute: the runtime then
    /// hands its worker thread's other tasks over before each call (`block_in_place`), which
    /// costs a thread wake-up per call. Default: no.
    fn waits(&self) -> bool {
        false
    }

    /// The input ended: emit everything still held.
    fn on_end(&mut self, _out: &mut Collector) -> Result<(), OperatorError> {
        Ok(())
    }

    /// Applies new values of live-tunable parameters, between two calls, keeping all state.
    /// `config` is the operator's own configuration type (the runtime checked beforehand that
    /// only tunable parameters changed). The default accepts nothing.
    fn retune(&mut self, _config: &dyn std::any::Any) -> Result<(), LiveChangeError> {
        Err(LiveChangeError::NotTunable(self.kind()))
    }

    /// Whether the operator keeps state between batches. A stateful operator must implement
    /// [`snapshot`](Self::snapshot) and [`restore`](Self::restore).
    fn is_stateful(&self) -> bool {
        false
    }

    /// The operator's state as a batch (written by the runtime at a checkpoint).
    fn snapshot(&self) -> Result<Option<RecordBatch>, OperatorError> {
        Ok(None)
    }

    /// Restores state written by [`snapshot`](Self::snapshot). The default fails loudly so a
    /// stateful operator that forgot to implement it never silently starts empty.
    fn restore(&mut self, _state: RecordBatch) -> Result<(), OperatorError> {
        Err(OperatorError::State { operator: self.kind(), detail: "this operator keeps no state to restore".into() })
    }
}

/// A problem found while planning an operator against its input schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PlanError {
    /// The config key the problem is about, relative to the stage (e.g. `where[1].column`).
    pub key: String,
    /// What is wrong.
    pub message: String,
    /// How to fix it, if known.
    pub help: Option<String>,
}

impl PlanError {
    /// A plan error at `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self { key: key.into(), message: message.into(), help: None }
    }

    /// Adds a help line.
    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

/// The configuration of an operator: plans it against an input schema and builds it. It is
/// `Any` so that [`Operator::retune`] can take it back as its concrete type.
pub trait OperatorConfig: std::any::Any {
    /// The output ports this operator would have for `input` (main first), or every problem
    /// found. Runs before any data moves.
    fn plan(&self, input: &SchemaRef) -> Result<Vec<OutputSpec>, Vec<PlanError>>;

    /// Builds the operator for `input` (call [`plan`](Self::plan) first).
    fn build(&self, input: &SchemaRef, ctx: &BuildContext) -> Result<Box<dyn Operator>, Vec<PlanError>>;

    /// What each part of the stage's state spans (for scale-out: the planner checks it against
    /// how the topics are keyed, see [`crate::partitioning`]). Default: nothing across rows.
    fn state_scopes(&self, _input: &SchemaRef) -> Vec<crate::partitioning::StateScope> {
        Vec::new()
    }

    /// The input columns output `port` carries unchanged, under the same name (for the
    /// co-partitioning proof: a column that determines the topic's key still does downstream).
    /// Default: every column when the port has the input's schema (a stage that passes or
    /// drops rows), else none.
    fn passes_through(&self, input: &SchemaRef, port: usize) -> Vec<String> {
        crate::partitioning::unchanged_columns(self.plan(input), input, port)
    }
}

/// What an operator may use from its surroundings when it is built.
#[derive(Debug, Clone, Default)]
pub struct BuildContext {
    /// The stage's name in the pipeline (a label on every metric it registers).
    pub stage: String,
    /// The pipeline's metrics registry.
    pub metrics: crate::Metrics,
    /// Live alert thresholds (calibration), shared with the control center.
    pub thresholds: crate::alert::ThresholdBoard,
    /// The event-time clock of the source stream the stage reads, when it reads one directly
    /// (a `decode` stage): see [`crate::event_time`].
    pub event_clock: Option<crate::event_time::EventClock>,
    /// How the source stream is keyed, when a `decode` stage reads a keyed topic: rows on the
    /// wrong partition are dead letters (see [`crate::partitioning`]).
    pub routing: Option<crate::partitioning::Routing>,
}

/// The closest of `candidates` to `name`, when one is close enough to be a likely typo.
pub fn did_you_mean<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::levenshtein(name, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}
