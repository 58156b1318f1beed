//! Operator state at checkpoints (`runtime.state_dir` or `runtime.state_url`).
//!
//! At every checkpoint barrier each stateful stage writes its [`snapshot`] as an Arrow IPC
//! object `snapshots/{epoch}-{writer}/{stage}.arrow`, with its input watermark in the file's
//! metadata, before it forwards the barrier, so once every sink has acknowledged an epoch,
//! every stage's state for it is stored. The source then **creates** the next manifest
//! `manifests/{seq}.json` (epoch, the next offset of every partition, and where the epoch's
//! snapshots are) and only then commits the offsets to Kafka. The manifest is the truth: on
//! start every stage restores the newest manifest's snapshots, the source resumes each
//! partition at the manifest's offset (or Kafka's committed one, if that is further), and files
//! that derived tables wrote after the epoch are removed, so the replay writes them again once.
//!
//! **One writer.** Manifests are numbered in a chain (`manifests/{seq}.json`, the epoch
//! inside), and a process only ever creates its last manifest's successor, only if absent (a
//! hard link locally, `If-None-Match` on S3), listing the manifests before and after: of two
//! processes on the same state exactly one wins a number. A process that restores state
//! *takes it over* at once: it creates the next manifest (same positions, same snapshots)
//! under its own writer id and numbers its epochs after it. A process that was presumed dead
//! and comes back (a paused VM, a partitioned pod) then finds its next manifest taken, or a
//! newer one listed, and stops with [`StateError::Fenced`] before it commits an offset. Its
//! snapshots went under its own writer id, so they never replace the live ones, and with
//! state the Parquet sinks publish a file only once its epoch's manifest exists
//! (`sink::parquet`'s staging), so its files never show either.
//!
//! A state store belongs to one *lineage* (a random id written into the manifest and into the
//! names of derived tables' files): files of another lineage — an earlier state store, a run
//! without one — are never removed. Stores written before manifests were numbered
//! (`CHECKPOINT.json` and `chk-{epoch}/`) are read and taken over the same way.
//!
//! [`snapshot`]: citystream_operators::Operator::snapshot

mod backend;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use serde::{Deserialize, Serialize};

use backend::Backend;
pub use backend::{StateUrl, StoreError};

const MANIFESTS: &str = "manifests";
const SNAPSHOTS: &str = "snapshots";
/// The single manifest of stores written before manifests were numbered.
const LEGACY_MANIFEST: &str = "CHECKPOINT.json";
/// Custom metadata key of a state file: the stage's input watermark at the checkpoint.
const WATERMARK: &str = "citystream.watermark";
/// Custom metadata key of a state file: the kind of operator that wrote it.
const KIND: &str = "citystream.operator";

/// One partition's next offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Position {
    topic: String,
    partition: i32,
    next: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Manifest {
    lineage: String,
    /// The manifest's place in the chain (its object's name): each writer creates its last
    /// one's successor, so a writer that lost the state always finds its next one taken.
    #[serde(default)]
    seq: u64,
    /// The newest epoch number used (sources number their barriers on from it).
    epoch: u64,
    /// The epoch whose state and output this manifest holds (0: none yet); a takeover carries
    /// the one it took over.
    #[serde(default)]
    base: u64,
    /// The process that created this manifest (random per start).
    #[serde(default)]
    writer: String,
    /// Where this epoch's snapshots are (a key prefix; empty: no state yet).
    #[serde(default)]
    snapshots: String,
    positions: Vec<Position>,
    /// Whose pending output this manifest commits: per state writer, the newest epoch of it
    /// (the writer's own epoch; a takeover carries the list of the manifest it took over,
    /// since the files it covers may not be published yet).
    #[serde(default)]
    committed: Vec<Committed>,
}

/// A state writer and the newest of its epochs a manifest commits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Committed {
    writer: String,
    epoch: u64,
}

#[derive(Debug)]
struct Inner {
    backend: Backend,
    url: StateUrl,
    lineage: String,
    writer: String,
    /// The epoch restored at start, and where its snapshots are.
    restored: u64,
    restored_snapshots: String,
    /// The restored manifest's `committed`.
    restored_committed: Vec<(String, u64)>,
    /// The first epoch this process numbers (after its takeover manifest).
    first: u64,
    /// The newest epoch whose output is committed (read by sinks without waiting for a commit
    /// in progress).
    committed_epoch: std::sync::atomic::AtomicU64,
    manifest: Mutex<Manifest>,
}

/// A pipeline's operator state store (cheap to clone; one per run).
#[derive(Debug, Clone)]
pub struct StateStore(Arc<Inner>);

/// Why operator state could not be written or restored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A local file or directory refused (full, permissions, gone): worth retrying once fixed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The state store refused (disk, network, credentials, the server): worth retrying once
    /// fixed.
    #[error("{action} {location}: {source}")]
    Store {
        /// What was being done.
        action: &'static str,
        /// The object or directory.
        location: String,
        /// The error.
        #[source]
        source: StoreError,
    },
    /// What is stored is not state this pipeline can use (damaged, or written for another
    /// operator): the message says how to start from empty state.
    #[error("{action} {location}: {detail}")]
    Unusable {
        /// What was being done.
        action: &'static str,
        /// The object or file.
        location: String,
        /// What is wrong, and what to do.
        detail: String,
    },
    /// Another process took this state over: this one must stop without committing anything.
    #[error(
        "another process owns the state at {location} now (its manifest {taken} is in the way of this process's \
         {seq}): this process stops without committing; its work is redone by the owner"
    )]
    Fenced {
        /// The state store.
        location: String,
        /// The manifest this process tried to create.
        seq: u64,
        /// The manifest found in its way (the same one, or a newer).
        taken: u64,
    },
    /// State could not be encoded (a bug).
    #[error("encoding the state for {location}: {detail}")]
    Encode {
        /// The object or directory.
        location: String,
        /// The encoder's error.
        detail: String,
    },
}

impl StateError {
    /// Who can fix it: the store or another process (external), or a bug (internal, encoding).
    pub fn class(&self) -> citystream_operators::ErrorClass {
        match self {
            StateError::Io { .. }
            | StateError::Store { .. }
            | StateError::Unusable { .. }
            | StateError::Fenced { .. } => citystream_operators::ErrorClass::External,
            StateError::Encode { .. } => citystream_operators::ErrorClass::Internal,
        }
    }
}

/// A stage name as a file name (stage names are YAML keys: anything may be in them).
fn file_name(stage: &str) -> String {
    let mut s = String::with_capacity(stage.len() + 6);
    for b in stage.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s + ".arrow"
}

fn manifest_key(seq: u64) -> String {
    format!("{MANIFESTS}/{seq:012}.json")
}

fn snapshots_key(epoch: u64, writer: &str) -> String {
    format!("{SNAPSHOTS}/{epoch:012}-{writer}")
}

/// The number a manifest's name (its seq) or a snapshot directory's name (its epoch) starts
/// with.
fn number_of(name: &str) -> Option<u64> {
    name.get(..12)?.parse().ok()
}

/// The error of `action` on `key` of `backend`, for the store's answer.
fn store_err<'a>(
    backend: &'a Backend,
    action: &'static str,
    key: &'a str,
) -> impl FnOnce(StoreError) -> StateError + 'a {
    move |source| StateError::Store { action, location: backend.location(key), source }
}

fn open_backend(url: &StateUrl) -> Result<Backend, StateError> {
    Backend::open(url).map_err(|source| StateError::Store {
        action: "opening the state store",
        location: url.to_string(),
        source,
    })
}

/// How many earlier state writers a manifest keeps the newest committed epoch of (see
/// [`with_history`]).
const COMMITTED_HISTORY: usize = 64;

/// What a manifest of `writer` committing `epoch` records as committed: its own epoch, then
/// the writers `before` names (its last manifest's list, carried from the state it took
/// over), the [`COMMITTED_HISTORY`] newest. A writer killed between its manifest and publishing
/// that epoch's files leaves them pending where it wrote them, which may be a disk the next
/// owner never sees (a pod's own volume): kept in the list, they are still known committed
/// when that disk's process starts again ([`layout`]), however many epochs later.
fn with_history(writer: &str, epoch: u64, before: &[Committed]) -> Vec<Committed> {
    let own = Committed { writer: writer.to_owned(), epoch };
    let all: Vec<Committed> =
        std::iter::once(own).chain(before.iter().filter(|c| c.writer != writer).cloned()).collect();
    if all.len() > COMMITTED_HISTORY {
        // files such a writer left pending on a disk of its own, unpublished, stay hidden
        tracing::warn!(
            dropped = ?all[COMMITTED_HISTORY..].iter().map(|c| c.writer.as_str()).collect::<Vec<_>>(),
            "the state's manifest keeps the committed epochs of the {COMMITTED_HISTORY} newest writers only"
        );
    }
    all.into_iter().take(COMMITTED_HISTORY).collect()
}

/// What a state URL holds at its root: a whole process's state (`runtime.tasks: process`:
/// manifests at the root) and the tasks' states (`tasks: partition`: `task-{p}` and `global`,
/// each with a manifest).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateLayout {
    /// A whole process's state is there.
    pub process: bool,
    /// The tasks whose state is there (`task-0`, `global`, …).
    pub tasks: Vec<String>,
    /// Per lineage of those tasks, the committed epochs of each state writer (see
    /// [`with_history`]) in its newest manifest. A process publishes with them the files its
    /// killed predecessor on the same disk committed but did not publish
    /// (`sink::parquet::publish_committed`).
    pub committed: BTreeMap<String, Vec<(String, u64)>>,
}

/// The names under a state root that are tasks' states.
fn is_task_dir(name: &str) -> bool {
    name == "global"
        || name.strip_prefix("task-").is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// What `url` holds (see [`StateLayout`]), read once at start: the runtime refuses to run one
/// task mode on the state of the other, where every window would start empty, and publishes
/// what the tasks' manifests commit.
pub fn layout(url: &StateUrl) -> Result<StateLayout, StateError> {
    let root = open_backend(url)?;
    let names = root.list("").map_err(store_err(&root, "listing", ""))?;
    let mut layout = StateLayout { process: newest(&root)?.is_some(), ..StateLayout::default() };
    for name in names.iter().filter(|n| is_task_dir(n)) {
        if let Some(m) = newest(&open_backend(&url.child(name))?)? {
            layout.tasks.push(name.clone());
            layout.committed.insert(m.lineage, m.committed.into_iter().map(|c| (c.writer, c.epoch)).collect());
        }
    }
    Ok(layout)
}

impl Manifest {
    /// The next offset of every partition.
    fn position_map(&self) -> BTreeMap<(String, i32), i64> {
        self.positions.iter().map(|p| ((p.topic.clone(), p.partition), p.next)).collect()
    }
}

/// What the newest manifest of a state store records (see [`StateStore::inspect`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointSummary {
    /// The lineage id.
    pub lineage: String,
    /// The epoch whose state and positions the newest manifest holds.
    pub epoch: u64,
    /// The newest manifest's number (a takeover counts).
    pub seq: u64,
    /// The next offset of every partition.
    pub positions: BTreeMap<(String, i32), i64>,
    /// Where the epoch's snapshots are, relative to the store (`snapshots/{epoch}-{writer}`;
    /// empty before the first checkpoint): one `{stage}.arrow` per stateful stage.
    pub snapshots: String,
}

/// The newest manifest's number in `backend`, if any.
fn newest_manifest(backend: &Backend) -> Result<Option<u64>, StateError> {
    let names = backend.list(MANIFESTS).map_err(store_err(backend, "listing", MANIFESTS))?;
    Ok(names.iter().filter(|n| n.ends_with(".json")).filter_map(|n| number_of(n)).max())
}

/// The newest manifest in `backend` (or the single one of a store from before numbered
/// manifests), if any. A manifest removed between the listing and the read (a newer one was
/// just committed) is looked for again.
fn newest(backend: &Backend) -> Result<Option<Manifest>, StateError> {
    for _ in 0..5 {
        match newest_manifest(backend)? {
            Some(seq) => match read_manifest(backend, &manifest_key(seq))? {
                Some(m) => return Ok(Some(Manifest { seq, ..m })),
                None => continue,
            },
            None => {
                return Ok(read_manifest(backend, LEGACY_MANIFEST)?.map(|m| Manifest {
                    snapshots: format!("chk-{:012}", m.epoch),
                    base: m.epoch,
                    ..m
                }));
            }
        }
    }
    Err(vanished(backend))
}

fn vanished(backend: &Backend) -> StateError {
    StateError::Store {
        action: "reading the newest manifest of",
        location: backend.location(MANIFESTS),
        source: StoreError::Io(std::io::Error::other("manifests keep changing: is another process committing?")),
    }
}

/// Creates manifest `m` as the successor of this process's last one, or finds that another
/// process owns the state: a newer manifest listed before, the same one created first, or a
/// newer one listed after (the slot was free because its first owner had pruned it).
fn claim(backend: &Backend, url: &StateUrl, m: &Manifest) -> Result<(), StateError> {
    let fenced = |taken| StateError::Fenced { location: url.to_string(), seq: m.seq, taken };
    if let Some(newer) = newest_manifest(backend)?.filter(|&s| s >= m.seq) {
        return Err(fenced(newer));
    }
    if !create_manifest(backend, m)? {
        return Err(fenced(m.seq));
    }
    match newest_manifest(backend)?.filter(|&s| s > m.seq) {
        Some(newer) => Err(fenced(newer)),
        None => Ok(()),
    }
}

impl StateStore {
    /// Reads the newest manifest at `url` without taking the state over (for tools and
    /// tests); `None` if there is no state.
    pub fn inspect(url: &StateUrl) -> Result<Option<CheckpointSummary>, StateError> {
        let Some(m) = newest(&open_backend(url)?)? else { return Ok(None) };
        Ok(Some(CheckpointSummary {
            positions: m.position_map(),
            lineage: m.lineage,
            epoch: m.base,
            seq: m.seq,
            snapshots: m.snapshots,
        }))
    }

    /// Opens the store at `url` (a directory is created if missing) and takes it over. Without
    /// a manifest a new lineage starts at epoch 0, and its manifest is created at once, so that
    /// a crash before the first checkpoint still finds which derived files are its own.
    pub fn open(url: &StateUrl) -> Result<Self, StateError> {
        let backend = open_backend(url)?;
        let writer = new_id();
        let (manifest, own) = match newest(&backend)? {
            Some(m) => (m, false),
            None => {
                let m = Manifest {
                    lineage: new_id(),
                    seq: 0,
                    epoch: 0,
                    base: 0,
                    writer: writer.clone(),
                    snapshots: String::new(),
                    positions: Vec::new(),
                    committed: Vec::new(),
                };
                match create_manifest(&backend, &m)? {
                    true => (m, true),
                    // another process started on the same empty store at the same moment
                    false => (newest(&backend)?.ok_or_else(|| vanished(&backend))?, false),
                }
            }
        };
        if manifest.lineage.is_empty() || !manifest.lineage.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StateError::Unusable {
                action: "reading the state manifest",
                location: backend.location(&manifest_key(manifest.seq)),
                detail: "the lineage is not a hex id".into(),
            });
        }
        let restored = manifest.base;
        let restored_snapshots = manifest.snapshots.clone();
        let restored_committed = manifest.committed.iter().map(|c| (c.writer.clone(), c.epoch)).collect();
        let current = if own {
            manifest
        } else {
            // take the state over: a process still writing to it finds this manifest in its way
            let takeover =
                Manifest { seq: manifest.seq + 1, epoch: manifest.epoch + 1, writer: writer.clone(), ..manifest };
            claim(&backend, url, &takeover)?;
            takeover
        };
        Ok(Self(Arc::new(Inner {
            backend,
            url: url.clone(),
            lineage: current.lineage.clone(),
            writer,
            restored,
            restored_snapshots,
            restored_committed,
            first: current.epoch + 1,
            committed_epoch: std::sync::atomic::AtomicU64::new(current.base),
            manifest: Mutex::new(current),
        })))
    }

    /// Where the state lives.
    pub fn url(&self) -> &StateUrl {
        &self.0.url
    }

    /// The lineage id (in the names of derived tables' files).
    pub fn lineage(&self) -> &str {
        &self.0.lineage
    }

    /// The epoch restored at start (0: no state): derived files of later epochs are removed.
    pub fn restored_epoch(&self) -> u64 {
        self.0.restored
    }

    /// This process's state writer id (in the names of its pending files).
    pub fn writer(&self) -> &str {
        &self.0.writer
    }

    /// Whose pending output the restored manifest commits: per state writer, its newest
    /// committed epoch (see `sink::parquet::resolve_pending`).
    pub fn committed(&self) -> &[(String, u64)] {
        &self.0.restored_committed
    }

    /// The first epoch this process numbers: rows before the first barrier belong to it.
    pub fn first_epoch(&self) -> u64 {
        self.0.first
    }

    /// The newest epoch number used (a source's barriers number on from it).
    pub fn epoch(&self) -> u64 {
        self.0.manifest.lock().expect("manifest").epoch
    }

    /// The newest epoch whose state and output are committed (files of epochs up to it may be
    /// published).
    pub fn committed_epoch(&self) -> u64 {
        self.0.committed_epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The next offset of every partition as of the newest durable epoch.
    pub fn positions(&self) -> BTreeMap<(String, i32), i64> {
        self.0.manifest.lock().expect("manifest").position_map()
    }

    /// `stage`'s state as of the restored epoch, if it wrote one, with the stage's input
    /// watermark at that checkpoint. `kind` is the stage's operator now: state another kind of
    /// operator wrote (the config gave the name to another stage) is refused.
    pub fn load(&self, stage: &str, kind: &str) -> Result<Option<(RecordBatch, i64)>, StateError> {
        if self.0.restored_snapshots.is_empty() {
            return Ok(None);
        }
        let key = format!("{}/{}", self.0.restored_snapshots, file_name(stage));
        let location = || self.0.backend.location(&key);
        let unusable =
            |detail: String| StateError::Unusable { action: "reading the state of", location: location(), detail };
        let Some(body) = self.0.backend.get(&key).map_err(store_err(&self.0.backend, "reading the state of", &key))?
        else {
            return Ok(None);
        };
        let reader = arrow::ipc::reader::FileReader::try_new(std::io::Cursor::new(body), None)
            .map_err(|e| unusable(e.to_string()))?;
        let schema = reader.schema();
        let watermark = reader
            .custom_metadata()
            .get(WATERMARK)
            .and_then(|w| w.parse::<i64>().ok())
            .ok_or_else(|| unusable("no watermark in the file".into()))?;
        match reader.custom_metadata().get(KIND) {
            Some(k) if k == kind => {}
            k => {
                return Err(StateError::Unusable {
                    action: "restoring",
                    location: location(),
                    detail: format!(
                        "it was written by a `{}` operator and stage `{stage}` is `{kind}` now; give the new stage \
                         another name, or remove the state to start from empty state",
                        k.map_or("?", |k| k.as_str())
                    ),
                });
            }
        }
        let batches = reader.collect::<Result<Vec<_>, _>>().map_err(|e| unusable(e.to_string()))?;
        let batch = arrow::compute::concat_batches(&schema, &batches).map_err(|e| unusable(e.to_string()))?;
        Ok(Some((batch, watermark)))
    }

    /// Writes `stage`'s state for `epoch` durably, with the stage's input watermark at the
    /// barrier. Returns the bytes written.
    pub fn save(
        &self,
        epoch: u64,
        stage: &str,
        kind: &str,
        state: &RecordBatch,
        watermark: i64,
    ) -> Result<u64, StateError> {
        let key = format!("{}/{}", snapshots_key(epoch, &self.0.writer), file_name(stage));
        let encode = |e: arrow::error::ArrowError| StateError::Encode {
            location: self.0.backend.location(&key),
            detail: e.to_string(),
        };
        let mut body = Vec::new();
        {
            let mut w = arrow::ipc::writer::FileWriter::try_new(&mut body, &state.schema()).map_err(encode)?;
            w.write_metadata(WATERMARK, watermark.to_string());
            w.write_metadata(KIND, kind);
            w.write(state).map_err(encode)?;
            w.finish().map_err(encode)?;
        }
        let len = body.len() as u64;
        self.0.backend.put(&key, body).map_err(store_err(&self.0.backend, "writing", &key))?;
        Ok(len)
    }

    /// Records `epoch` as durable with `positions` (merged into the known ones), then removes
    /// older epochs' state. Call only once every sink has acknowledged `epoch`, and before
    /// committing the offsets anywhere else. [`StateError::Fenced`] if another process took
    /// the state over: commit nothing then.
    pub fn commit(&self, epoch: u64, positions: &BTreeMap<(String, i32), i64>) -> Result<(), StateError> {
        let mut m = self.0.manifest.lock().expect("manifest");
        if epoch <= m.epoch {
            return Ok(());
        }
        let mut all = m.position_map();
        all.extend(positions.iter().map(|(k, v)| (k.clone(), *v)));
        let next = Manifest {
            lineage: m.lineage.clone(),
            seq: m.seq + 1,
            epoch,
            base: epoch,
            writer: self.0.writer.clone(),
            snapshots: snapshots_key(epoch, &self.0.writer),
            positions: all.into_iter().map(|((topic, partition), next)| Position { topic, partition, next }).collect(),
            committed: with_history(&self.0.writer, epoch, &m.committed),
        };
        claim(&self.0.backend, &self.0.url, &next)?;
        let seq = next.seq;
        *m = next;
        self.0.committed_epoch.store(epoch, std::sync::atomic::Ordering::Release);
        drop(m);
        self.prune(seq, epoch);
        Ok(())
    }

    /// Removes what manifest `seq` (of `epoch`) no longer needs: older manifests and snapshots
    /// (best effort: what is left is removed by a later commit).
    fn prune(&self, seq: u64, epoch: u64) {
        let b = &self.0.backend;
        let mut old = Vec::new();
        // stores from before numbered manifests are local directories
        let legacy = matches!(b, Backend::Local(_));
        let places: &[(&str, &str)] = if legacy {
            &[(MANIFESTS, ""), (SNAPSHOTS, ""), ("", "chk-")]
        } else {
            &[(MANIFESTS, ""), (SNAPSHOTS, "")]
        };
        for &(dir, prefix) in places {
            let names = b.list(dir).unwrap_or_default();
            let below = if dir == MANIFESTS { seq } else { epoch };
            for n in names.iter().filter_map(|n| n.strip_prefix(prefix).map(|e| (n, e))) {
                if number_of(n.1).is_some_and(|e| e < below) {
                    old.push(if dir.is_empty() { n.0.clone() } else { format!("{dir}/{}", n.0) });
                }
            }
        }
        if legacy {
            old.push(LEGACY_MANIFEST.into());
        }
        for key in old {
            if let Err(e) = b.delete_all(&key) {
                tracing::warn!("removing old state {}: {e}", b.location(&key));
            }
        }
    }
}

/// The manifest at `key`, if there is one.
fn read_manifest(backend: &Backend, key: &str) -> Result<Option<Manifest>, StateError> {
    let Some(body) = backend.get(key).map_err(store_err(backend, "reading the state manifest", key))? else {
        return Ok(None);
    };
    serde_json::from_slice::<Manifest>(&body).map(Some).map_err(|e| StateError::Unusable {
        action: "reading the state manifest",
        location: backend.location(key),
        detail: format!("{e} (remove the state to start from empty state)"),
    })
}

/// Creates manifest `m.seq`: `false` if another process created it first.
fn create_manifest(backend: &Backend, m: &Manifest) -> Result<bool, StateError> {
    let key = manifest_key(m.seq);
    let body = serde_json::to_vec_pretty(m)
        .map_err(|e| StateError::Encode { location: backend.location(&key), detail: e.to_string() })?;
    backend.create(&key, body).map_err(store_err(backend, "creating the state manifest", &key))
}

/// A random 64-bit id in hex (lineages, writers).
fn new_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use std::sync::Arc;

    fn batch(v: &[i64]) -> RecordBatch {
        RecordBatch::try_from_iter([
            ("k", Arc::new(StringArray::from_iter_values(v.iter().map(|x| format!("k{x}")))) as _),
            ("v", Arc::new(Int64Array::from(v.to_vec())) as _),
        ])
        .unwrap()
    }

    fn local(dir: &tempfile::TempDir) -> StateUrl {
        StateUrl::Local(dir.path().to_owned())
    }

    fn names(dir: &std::path::Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    }

    #[test]
    fn state_of_a_committed_epoch_is_restored_and_older_epochs_go() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(&local(&dir)).unwrap();
        assert_eq!((s.restored_epoch(), s.epoch(), s.first_epoch()), (0, 0, 1));
        let lineage = s.lineage().to_owned();
        assert_eq!(lineage.len(), 16);
        s.save(1, "a/b c", "window", &batch(&[1, 2]), 42).unwrap();
        s.commit(1, &BTreeMap::from([(("t".into(), 0), 10)])).unwrap();
        s.save(2, "a/b c", "window", &batch(&[3]), 43).unwrap();
        // epoch 2 is written but never committed (a crash before every sink acknowledged it)
        let r = StateStore::open(&local(&dir)).unwrap();
        assert_eq!((r.restored_epoch(), r.lineage()), (1, lineage.as_str()));
        // the restart took the state over with manifest 2, and numbers on from 3
        assert_eq!((r.epoch(), r.first_epoch()), (2, 3));
        assert_eq!(r.load("a/b c", "window").unwrap().unwrap(), (batch(&[1, 2]), 42));
        assert_eq!(r.load("other", "window").unwrap(), None);
        let e = r.load("a/b c", "dedup").unwrap_err();
        let e = e.to_string();
        assert!(e.contains("written by a `window` operator") && e.contains("`dedup` now"), "{e}");
        assert_eq!(r.positions(), BTreeMap::from([(("t".into(), 0), 10)]));
        // positions merge: a partition not in this commit keeps its last position
        r.save(3, "a/b c", "window", &batch(&[4]), i64::MIN).unwrap();
        r.commit(3, &BTreeMap::from([(("t".into(), 1), 5)])).unwrap();
        assert_eq!(r.positions(), BTreeMap::from([(("t".into(), 0), 10), (("t".into(), 1), 5)]));
        assert_eq!(names(&dir.path().join(MANIFESTS)), ["000000000003.json"], "older manifests go");
        let snaps = names(&dir.path().join(SNAPSHOTS));
        assert_eq!(snaps.len(), 1, "older snapshots go, and the uncommitted epoch 2's too: {snaps:?}");
        assert!(snaps[0].starts_with("000000000003-"), "{snaps:?}");
        let r2 = StateStore::open(&local(&dir)).unwrap();
        assert_eq!(r2.load("a/b c", "window").unwrap().unwrap(), (batch(&[4]), i64::MIN));
        // an old epoch never moves the manifest back
        r2.commit(1, &BTreeMap::new()).unwrap();
        assert_eq!(r2.epoch(), 4);
    }

    #[test]
    fn a_process_that_lost_the_state_to_another_is_fenced_and_cannot_publish() {
        let dir = tempfile::tempdir().unwrap();
        let a = StateStore::open(&local(&dir)).unwrap();
        a.save(1, "w", "window", &batch(&[1]), 1).unwrap();
        a.commit(1, &BTreeMap::from([(("t".into(), 0), 10)])).unwrap();
        // `a` is presumed dead (a paused machine); `b` starts on the same state and takes it over
        let b = StateStore::open(&local(&dir)).unwrap();
        assert_eq!((b.restored_epoch(), b.first_epoch()), (1, 3));
        // the files `a` closed up to epoch 1 are committed, whether or not it published them
        assert_eq!(b.committed(), [(a.writer().to_owned(), 1)]);
        assert_eq!(b.load("w", "window").unwrap().unwrap().0, batch(&[1]));
        // `a` wakes up: its next commit finds `b`'s manifest in its way, whatever epoch it tries
        a.save(2, "w", "window", &batch(&[666]), 2).unwrap();
        for epoch in [2, 3, 9] {
            let e = a.commit(epoch, &BTreeMap::from([(("t".into(), 0), 99)])).unwrap_err();
            assert!(matches!(e, StateError::Fenced { taken: 2, .. }), "{epoch}: {e:?}");
            assert!(e.to_string().contains("another process owns the state"), "{e}");
        }
        // `b` goes on; what `a` wrote under its own id is never restored
        b.save(3, "w", "window", &batch(&[2]), 3).unwrap();
        b.commit(3, &BTreeMap::from([(("t".into(), 0), 20)])).unwrap();
        let c = StateStore::open(&local(&dir)).unwrap();
        assert_eq!(c.load("w", "window").unwrap().unwrap(), (batch(&[2]), 3));
        // `b`'s epoch, and `a`'s before it: files `a` left pending where only its own process
        // looks are still known committed
        assert_eq!(c.committed(), [(b.writer().to_owned(), 3), (a.writer().to_owned(), 1)]);
        assert_eq!(c.positions(), BTreeMap::from([(("t".into(), 0), 20)]));
        // and `b`, in turn, lost it to `c`
        assert!(matches!(b.commit(5, &BTreeMap::new()), Err(StateError::Fenced { .. })));
    }

    #[test]
    fn a_process_that_lost_the_state_is_fenced_even_when_its_epochs_skip_or_its_slot_was_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let a = StateStore::open(&local(&dir)).unwrap();
        a.commit(1, &BTreeMap::new()).unwrap();
        let b = StateStore::open(&local(&dir)).unwrap();
        // `a` commits epoch 5 next (a rebalance skipped some): its manifest is the successor of
        // its last one, which `b`'s takeover took
        assert!(matches!(a.commit(5, &BTreeMap::new()), Err(StateError::Fenced { seq: 2, .. })));
        // `b` commits twice and prunes the slot `a` would want: `a` still finds a newer one
        b.commit(3, &BTreeMap::new()).unwrap();
        b.commit(4, &BTreeMap::new()).unwrap();
        assert!(!dir.path().join(manifest_key(2)).exists(), "pruned");
        assert!(matches!(a.commit(6, &BTreeMap::new()), Err(StateError::Fenced { seq: 2, taken: 4, .. })));
        assert_eq!(StateStore::inspect(&local(&dir)).unwrap().unwrap().epoch, 4);
        // what a takeover records as restored is the epoch whose state it carries
        let c = StateStore::open(&local(&dir)).unwrap();
        drop(c);
        let d = StateStore::open(&local(&dir)).unwrap();
        assert_eq!((d.restored_epoch(), d.first_epoch()), (4, 7), "two takeovers after epoch 4");
        assert_eq!(d.committed(), [(b.writer().to_owned(), 4), (a.writer().to_owned(), 1)]);
    }

    /// The tasks' states under one URL (`task-{p}`, `global`): per lineage, what the newest
    /// manifest commits, older writers' epochs included; other entries are not states.
    #[test]
    fn layout_reads_every_tasks_newest_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let root = local(&dir);
        let a = StateStore::open(&root.child("task-0")).unwrap();
        a.commit(2, &BTreeMap::new()).unwrap();
        let b = StateStore::open(&root.child("task-0")).unwrap();
        b.commit(5, &BTreeMap::new()).unwrap();
        let g = StateStore::open(&root.child("global")).unwrap();
        g.commit(1, &BTreeMap::new()).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a task").unwrap();
        std::fs::create_dir(dir.path().join("task-x")).unwrap();
        let got = layout(&root).unwrap();
        assert_eq!(
            got.committed,
            BTreeMap::from([
                (b.lineage().to_owned(), vec![(b.writer().to_owned(), 5), (a.writer().to_owned(), 2)]),
                (g.lineage().to_owned(), vec![(g.writer().to_owned(), 1)]),
            ])
        );
        assert_eq!((got.process, got.tasks), (false, vec!["global".to_owned(), "task-0".to_owned()]));
    }

    #[test]
    fn two_processes_starting_on_an_empty_store_agree_on_one_lineage() {
        let dir = tempfile::tempdir().unwrap();
        let a = StateStore::open(&local(&dir)).unwrap();
        // a second start that lost the race for the first manifest reads it and takes over
        let b = StateStore::open(&local(&dir)).unwrap();
        assert_eq!(a.lineage(), b.lineage());
        assert!(matches!(a.commit(1, &BTreeMap::new()), Err(StateError::Fenced { seq: 1, taken: 1, .. })));
        b.commit(2, &BTreeMap::new()).unwrap();
    }

    #[test]
    fn a_store_from_before_numbered_manifests_is_restored_and_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let old = Manifest {
            lineage: "00000000000000ab".into(),
            seq: 0,
            epoch: 7,
            base: 0,
            writer: String::new(),
            snapshots: String::new(),
            positions: vec![Position { topic: "t".into(), partition: 0, next: 70 }],
            committed: vec![],
        };
        std::fs::write(dir.path().join(LEGACY_MANIFEST), serde_json::to_vec(&old).unwrap()).unwrap();
        // the old layout: `chk-{epoch}/{stage}.arrow`
        let s = StateStore::open(&local(&dir)).unwrap();
        s.save(7, "w", "window", &batch(&[7]), 7).unwrap();
        let from = dir.path().join(snapshots_key(7, &s.0.writer));
        std::fs::create_dir_all(dir.path().join("chk-000000000007")).unwrap();
        std::fs::rename(from.join("w.arrow"), dir.path().join("chk-000000000007/w.arrow")).unwrap();
        std::fs::remove_dir_all(dir.path().join(MANIFESTS)).unwrap();
        let r = StateStore::open(&local(&dir)).unwrap();
        assert_eq!((r.lineage(), r.restored_epoch(), r.first_epoch()), ("00000000000000ab", 7, 9));
        assert_eq!(r.load("w", "window").unwrap().unwrap(), (batch(&[7]), 7));
        assert_eq!(r.positions(), BTreeMap::from([(("t".into(), 0), 70)]));
        r.commit(9, &BTreeMap::new()).unwrap();
        assert_eq!(names(dir.path()), [MANIFESTS, SNAPSHOTS], "the old layout is gone once a new epoch is stored");
    }

    #[test]
    fn a_damaged_manifest_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(MANIFESTS)).unwrap();
        std::fs::write(dir.path().join(manifest_key(4)), b"{").unwrap();
        let e = StateStore::open(&local(&dir)).unwrap_err();
        assert!(matches!(e, StateError::Unusable { .. }), "{e:?}");
        assert_eq!(e.class(), citystream_operators::ErrorClass::External);
        let e = e.to_string();
        assert!(e.contains("000000000004.json") && e.contains("remove the state"), "{e}");
    }
}
