//! ONNX Runtime sessions shared within a process.
//!
//! Every model loaded from the same bytes, for the same execution provider and thread count,
//! runs on one session: the per-partition tasks of one process, and a stage's primary, shadow or
//! carbon-mode model when they are the same file. A session is created by the first load and
//! dropped with the last model using it (a hot swap to other bytes gets a session of its own).
//! ONNX Runtime's `run` needs the session exclusively (`ort` takes `&mut`), so the sharers take
//! turns: on this project's small models a run holds it for 0.1-0.3 ms per batch of 1024 rows.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use ort::session::Session;

/// A session, shared.
pub(crate) type Shared = Arc<Mutex<Session>>;

/// What makes two loads share a session.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Key {
    /// SHA-256 of the model file's bytes, hex.
    pub(crate) sha256: String,
    /// The execution provider's name.
    pub(crate) provider: &'static str,
    /// Threads inside one run.
    pub(crate) intra_threads: usize,
}

static SESSIONS: Mutex<BTreeMap<Key, Weak<Mutex<Session>>>> = Mutex::new(BTreeMap::new());

/// The session of `key`, made by `create` unless one is alive; true when it was shared.
pub(crate) fn get_or_create(key: Key, create: impl FnOnce() -> ort::Result<Session>) -> ort::Result<(Shared, bool)> {
    // held while creating: two tasks loading one model at once make one session
    let mut all = SESSIONS.lock().unwrap_or_else(PoisonError::into_inner);
    all.retain(|_, w| w.strong_count() > 0);
    if let Some(s) = all.get(&key).and_then(Weak::upgrade) {
        return Ok((s, true));
    }
    let s = Arc::new(Mutex::new(create()?));
    all.insert(key, Arc::downgrade(&s));
    Ok((s, false))
}

/// The session, for one use (a run that panicked leaves it usable).
pub(crate) fn lock(s: &Shared) -> MutexGuard<'_, Session> {
    s.lock().unwrap_or_else(PoisonError::into_inner)
}
