//! The files source (`type: files`): archived events in JSON lines (plain, `.gz`, `.zst`) and
//! Parquet files, replayed through the same stages as a live stream — to backfill tables,
//! re-score with another model, or reproduce a result.
//!
//! Each event kind reads its own list of files (a path, a directory or a glob), in path order:
//! name the files so that path order is time order (`2026-11-30T10.jsonl.zst`). All files of a
//! kind form one stream with one partition (0); a line's position in it (counted over the
//! stream's files, from 0) is its offset, so the exactly-once rules of the Kafka source hold:
//! derived files are named after positions, every checkpoint records the next position of each
//! stream in the state manifest (`runtime.state_dir`, required), and a killed backfill resumes
//! there, removing what was written after the checkpoint, so no row is written twice.
//!
//! Files: [`listing`] resolves the paths, [`lines`] reads lines from each format, [`source`]
//! runs the task.

mod lines;
mod listing;
mod range;
mod source;

use std::num::NonZeroUsize;

use citystream_operators::Duration;
use citystream_schemas::EventKind;
use serde::Deserialize;

use crate::primitives::EnvString;

pub use lines::{Format, LineReader, ReadError};
pub use listing::ListError;
pub use listing::list;
pub use range::{EventTimeRange, event_time};

/// Files per event kind.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesPaths {
    /// Traffic events.
    #[serde(default)]
    pub traffic: Option<EnvString>,
    /// Camera events.
    #[serde(default)]
    pub camera: Option<EnvString>,
    /// Environment events.
    #[serde(default)]
    pub environment: Option<EnvString>,
}

impl FilesPaths {
    /// The paths of `kind`, if it is read.
    pub fn get(&self, kind: EventKind) -> Option<&str> {
        match kind {
            EventKind::Traffic => self.traffic.as_ref().map(EnvString::as_str),
            EventKind::Camera => self.camera.as_ref().map(EnvString::as_str),
            EventKind::Environment => self.environment.as_ref().map(EnvString::as_str),
        }
    }
}

/// What a line's arrival time (`received_at`, which `decode` bounds event times against) is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceivedAt {
    /// The file's modification time (or now, if that is earlier): when the archive recorded
    /// it, like a Kafka message's log time. `decode`'s `max_past` (default 7 days) then rejects
    /// events older than that before their file was written: set it to `null` on the `decode`
    /// stages of a backfill whose files were copied long after the events.
    #[default]
    Modified,
    /// When the source reads the line.
    Now,
}

/// What a files source does with a file it cannot open or read to its end (truncated,
/// corrupt, unknown format).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBadFile {
    /// Log it (file and line), count it (`citystream_source_bad_files_total`) and go on with
    /// the next file; the lines before the damage are delivered.
    #[default]
    Skip,
    /// Stop the run with an error naming the file and line.
    Stop,
}

/// YAML of a `files` source.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesSourceConfig {
    /// Per event kind: a file, a directory (every file under it) or a glob (`*`, `?`, `[…]`,
    /// `**`). Formats by extension: `.jsonl`/`.json`/`.ndjson` (one event per line), the same
    /// with `.gz` or `.zst` appended, and `.parquet` (each row becomes one JSON event).
    pub paths: FilesPaths,
    /// Largest raw batch handed on, rows. Default 8192.
    #[serde(default = "d_batch_rows")]
    pub batch_rows: NonZeroUsize,
    /// How often a checkpoint barrier is sent; the positions are recorded once every sink made
    /// the data before it durable. Default `5s`.
    #[serde(default = "d_checkpoint")]
    pub checkpoint_interval: Duration,
    /// How far behind the newest event of its stream an event may arrive and still be on time.
    /// Default `2m`.
    #[serde(default = "d_ooo")]
    pub max_out_of_orderness: Duration,
    /// Lines per second at most, all kinds together; absent: as fast as the pipeline takes them.
    #[serde(default)]
    pub rate: Option<f64>,
    /// End the source once every file is read (default). `false`: keep listing the paths every
    /// `poll_interval` and read files that sort after the last one read.
    #[serde(default = "d_true")]
    pub stop_when_done: bool,
    /// How often the paths are listed again when `stop_when_done` is false. Default `5s`.
    #[serde(default = "d_poll")]
    pub poll_interval: Duration,
    /// A line's arrival time. Default `modified`.
    #[serde(default)]
    pub received_at: ReceivedAt,
    /// Longer lines are cut to this many bytes (and so rejected by `decode`, never held whole
    /// in memory). Default 1048576.
    #[serde(default = "d_max_line")]
    pub max_line_bytes: NonZeroUsize,
    /// A file that cannot be opened or read to its end: `skip` (default: logged with file and
    /// line, counted, the rest goes on) or `stop`.
    #[serde(default)]
    pub on_bad_file: OnBadFile,
    /// Only events whose `ts` lies in `{from, until}` (RFC 3339; `until` exclusive; either may
    /// be left out) are read: a backfill of a date range. Lines without a readable `ts` are
    /// read (and rejected by `decode` with their reason). Default: all.
    #[serde(default)]
    pub event_time: EventTimeRange,
}

impl FilesSourceConfig {
    /// A files source over `paths`, every other setting at its default.
    pub fn new(paths: FilesPaths) -> Self {
        Self {
            paths,
            batch_rows: d_batch_rows(),
            checkpoint_interval: d_checkpoint(),
            max_out_of_orderness: d_ooo(),
            rate: None,
            stop_when_done: true,
            poll_interval: d_poll(),
            received_at: ReceivedAt::default(),
            max_line_bytes: d_max_line(),
            on_bad_file: OnBadFile::default(),
            event_time: EventTimeRange::default(),
        }
    }
}

fn d_batch_rows() -> NonZeroUsize {
    NonZeroUsize::new(8192).expect("non-zero")
}
fn d_checkpoint() -> Duration {
    Duration::from_secs(5)
}
fn d_ooo() -> Duration {
    Duration::from_secs(120)
}
fn d_true() -> bool {
    true
}
fn d_poll() -> Duration {
    Duration::from_secs(5)
}
fn d_max_line() -> NonZeroUsize {
    NonZeroUsize::new(1 << 20).expect("non-zero")
}
