//! Operator state at checkpoints (`runtime.state_dir`).
//!
//! At every checkpoint barrier each stateful stage writes its [`snapshot`] as an Arrow IPC file
//! `chk-{epoch}/{stage}.arrow` (write, fsync, rename), with its input watermark in the file's
//! metadata, before it forwards the barrier, so once
//! every sink has acknowledged an epoch, every stage's state for it is on disk. The Kafka
//! source then writes the manifest `CHECKPOINT.json` (epoch and the next offset of every
//! partition, atomically replaced) and only then commits the offsets to Kafka. The manifest is
//! the truth: on start every stage restores the manifest's epoch, the source resumes each
//! partition at the manifest's offset (or Kafka's committed one, if that is further), and files
//! that derived tables wrote after the epoch are removed, so the replay writes them again once.
//!
//! A state directory belongs to one *lineage* (a random id written into the manifest and into
//! the names of derived tables' files): files of another lineage — an earlier state directory,
//! a run without one — are never removed.
//!
//! [`snapshot`]: citystream_operators::Operator::snapshot

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use serde::{Deserialize, Serialize};

const MANIFEST: &str = "CHECKPOINT.json";
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
    /// The newest epoch whose state and output are durable (0: none yet).
    epoch: u64,
    positions: Vec<Position>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    lineage: String,
    /// The epoch restored at start.
    restored: u64,
    manifest: Mutex<Manifest>,
}

/// A pipeline's state directory (cheap to clone; one per run).
#[derive(Debug, Clone)]
pub struct StateStore(Arc<Inner>);

/// Why operator state could not be written or restored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The disk refused (full, permissions, gone): worth retrying once fixed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// What is on disk is not state this pipeline can use (damaged, or written for another
    /// operator): the message says how to start from empty state.
    #[error("{action} {}: {detail}", path.display())]
    Unusable {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong, and what to do.
        detail: String,
    },
    /// State could not be encoded (a bug).
    #[error("encoding the state for {}: {detail}", path.display())]
    Encode {
        /// The file or directory.
        path: PathBuf,
        /// The encoder's error.
        detail: String,
    },
}

impl StateError {
    /// Who can fix it: the disk (external), or a bug (internal, encoding).
    pub fn class(&self) -> citystream_operators::ErrorClass {
        match self {
            StateError::Io { .. } | StateError::Unusable { .. } => citystream_operators::ErrorClass::External,
            StateError::Encode { .. } => citystream_operators::ErrorClass::Internal,
        }
    }
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StateError + 'a {
    move |source| StateError::Io { action, path: path.to_owned(), source }
}

fn unusable(action: &'static str, path: &Path, detail: impl std::fmt::Display) -> StateError {
    StateError::Unusable { action, path: path.to_owned(), detail: detail.to_string() }
}

fn encode(path: &Path) -> impl FnOnce(arrow::error::ArrowError) -> StateError + '_ {
    move |e| StateError::Encode { path: path.to_owned(), detail: e.to_string() }
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

impl StateStore {
    /// Opens `dir` (created if missing). Without a manifest a new lineage starts at epoch 0,
    /// and its manifest is written at once, so that a crash before the first checkpoint still
    /// finds which derived files are its own.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        std::fs::create_dir_all(dir).map_err(io("creating the state directory", dir))?;
        let path = dir.join(MANIFEST);
        let manifest = match std::fs::read(&path) {
            Ok(body) => serde_json::from_slice::<Manifest>(&body).map_err(|e| {
                unusable(
                    "reading the state manifest",
                    &path,
                    format!("{e} (remove the directory to start from empty state)"),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let m = Manifest { lineage: new_lineage(), epoch: 0, positions: Vec::new() };
                write_manifest(dir, &m)?;
                m
            }
            Err(e) => return Err(io("reading the state manifest", &path)(e)),
        };
        if manifest.lineage.is_empty() || !manifest.lineage.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(unusable("reading the state manifest", &path, "the lineage is not a hex id"));
        }
        Ok(Self(Arc::new(Inner {
            dir: dir.to_owned(),
            lineage: manifest.lineage.clone(),
            restored: manifest.epoch,
            manifest: Mutex::new(manifest),
        })))
    }

    /// The lineage id (in the names of derived tables' files).
    pub fn lineage(&self) -> &str {
        &self.0.lineage
    }

    /// The epoch restored at start (0: no state).
    pub fn restored_epoch(&self) -> u64 {
        self.0.restored
    }

    /// The newest durable epoch.
    pub fn epoch(&self) -> u64 {
        self.0.manifest.lock().expect("manifest").epoch
    }

    /// The next offset of every partition as of the newest durable epoch.
    pub fn positions(&self) -> BTreeMap<(String, i32), i64> {
        let m = self.0.manifest.lock().expect("manifest");
        m.positions.iter().map(|p| ((p.topic.clone(), p.partition), p.next)).collect()
    }

    fn epoch_dir(&self, epoch: u64) -> PathBuf {
        self.0.dir.join(format!("chk-{epoch:012}"))
    }

    /// `stage`'s state as of the restored epoch, if it wrote one, with the stage's input
    /// watermark at that checkpoint. `kind` is the stage's operator now: state another kind of
    /// operator wrote (the config gave the name to another stage) is refused.
    pub fn load(&self, stage: &str, kind: &str) -> Result<Option<(RecordBatch, i64)>, StateError> {
        if self.0.restored == 0 {
            return Ok(None);
        }
        let path = self.epoch_dir(self.0.restored).join(file_name(stage));
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("opening the state of", &path)(e)),
        };
        let reader = arrow::ipc::reader::FileReader::try_new(std::io::BufReader::new(file), None)
            .map_err(|e| unusable("reading the state of", &path, e))?;
        let schema = reader.schema();
        let watermark = reader
            .custom_metadata()
            .get(WATERMARK)
            .and_then(|w| w.parse::<i64>().ok())
            .ok_or_else(|| unusable("reading the state of", &path, "no watermark in the file"))?;
        match reader.custom_metadata().get(KIND) {
            Some(k) if k == kind => {}
            k => {
                return Err(unusable(
                    "restoring",
                    &path,
                    format!(
                        "it was written by a `{}` operator and stage `{stage}` is `{kind}` now; give the new stage \
                         another name, or remove the state directory to start from empty state",
                        k.map_or("?", |k| k.as_str())
                    ),
                ));
            }
        }
        let batches = reader.collect::<Result<Vec<_>, _>>().map_err(|e| unusable("reading the state of", &path, e))?;
        let batch = arrow::compute::concat_batches(&schema, &batches)
            .map_err(|e| unusable("reading the state of", &path, e))?;
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
        let dir = self.epoch_dir(epoch);
        std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        let mut body = Vec::new();
        {
            let mut w = arrow::ipc::writer::FileWriter::try_new(&mut body, &state.schema()).map_err(encode(&dir))?;
            w.write_metadata(WATERMARK, watermark.to_string());
            w.write_metadata(KIND, kind);
            w.write(state).map_err(encode(&dir))?;
            w.finish().map_err(encode(&dir))?;
        }
        let path = dir.join(file_name(stage));
        crate::atomic_file::write_atomic(&path, &body).map_err(io("writing", &path))?;
        Ok(body.len() as u64)
    }

    /// Records `epoch` as durable with `positions` (merged into the known ones), then removes
    /// older epochs' state. Call only once every sink has acknowledged `epoch`, and before
    /// committing the offsets anywhere else.
    pub fn commit(&self, epoch: u64, positions: &BTreeMap<(String, i32), i64>) -> Result<(), StateError> {
        let mut m = self.0.manifest.lock().expect("manifest");
        if epoch <= m.epoch {
            return Ok(());
        }
        let mut all: BTreeMap<(String, i32), i64> =
            m.positions.iter().map(|p| ((p.topic.clone(), p.partition), p.next)).collect();
        all.extend(positions.iter().map(|(k, v)| (k.clone(), *v)));
        let next = Manifest {
            lineage: m.lineage.clone(),
            epoch,
            positions: all.into_iter().map(|((topic, partition), next)| Position { topic, partition, next }).collect(),
        };
        write_manifest(&self.0.dir, &next)?;
        *m = next;
        drop(m);
        // the manifest no longer points at older epochs: their state can go
        if let Ok(rd) = std::fs::read_dir(&self.0.dir) {
            for e in rd.flatten() {
                let name = e.file_name();
                let old = name
                    .to_str()
                    .and_then(|n| n.strip_prefix("chk-"))
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_some_and(|n| n < epoch);
                if old && let Err(e) = std::fs::remove_dir_all(e.path()) {
                    tracing::warn!("removing old state {}: {e}", e.to_string());
                }
            }
        }
        Ok(())
    }
}

fn write_manifest(dir: &Path, m: &Manifest) -> Result<(), StateError> {
    let path = dir.join(MANIFEST);
    let body =
        serde_json::to_vec_pretty(m).map_err(|e| StateError::Encode { path: path.clone(), detail: e.to_string() })?;
    crate::atomic_file::write_atomic(&path, &body).map_err(io("writing", &path))
}

fn new_lineage() -> String {
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

    #[test]
    fn state_of_a_committed_epoch_is_restored_and_older_epochs_go() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(dir.path()).unwrap();
        assert_eq!((s.restored_epoch(), s.epoch()), (0, 0));
        let lineage = s.lineage().to_owned();
        assert_eq!(lineage.len(), 16);
        s.save(1, "a/b c", "window", &batch(&[1, 2]), 42).unwrap();
        s.commit(1, &BTreeMap::from([(("t".into(), 0), 10)])).unwrap();
        s.save(2, "a/b c", "window", &batch(&[3]), 43).unwrap();
        // epoch 2 is written but never committed (a crash before every sink acknowledged it)
        let r = StateStore::open(dir.path()).unwrap();
        assert_eq!((r.restored_epoch(), r.lineage()), (1, lineage.as_str()));
        assert_eq!(r.load("a/b c", "window").unwrap().unwrap(), (batch(&[1, 2]), 42));
        assert_eq!(r.load("other", "window").unwrap(), None);
        let e = r.load("a/b c", "dedup").unwrap_err();
        let e = e.to_string();
        assert!(e.contains("written by a `window` operator") && e.contains("`dedup` now"), "{e}");
        assert_eq!(r.positions(), BTreeMap::from([(("t".into(), 0), 10)]));
        // positions merge: a partition not in this commit keeps its last position
        r.save(2, "a/b c", "window", &batch(&[4]), i64::MIN).unwrap();
        r.commit(2, &BTreeMap::from([(("t".into(), 1), 5)])).unwrap();
        assert_eq!(r.positions(), BTreeMap::from([(("t".into(), 0), 10), (("t".into(), 1), 5)]));
        assert!(!dir.path().join("chk-000000000001").exists(), "the older epoch is removed");
        let r2 = StateStore::open(dir.path()).unwrap();
        assert_eq!(r2.load("a/b c", "window").unwrap().unwrap(), (batch(&[4]), i64::MIN));
        // an old epoch never moves the manifest back
        r2.commit(1, &BTreeMap::new()).unwrap();
        assert_eq!(r2.epoch(), 2);
    }

    #[test]
    fn a_damaged_manifest_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(MANIFEST), b"{").unwrap();
        let e = StateStore::open(dir.path()).unwrap_err();
        assert!(matches!(e, StateError::Unusable { .. }), "{e:?}");
        assert_eq!(e.class(), citystream_operators::ErrorClass::External);
        let e = e.to_string();
        assert!(e.contains("CHECKPOINT.json") && e.contains("remove the directory"), "{e}");
    }
}
