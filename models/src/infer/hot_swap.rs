//! The model slot a background watcher may replace: a changed file is loaded and checked off
//! the stream, and the operator switches between two batches; a bad file keeps the old model.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration as StdDuration, Instant, SystemTime};

use citystream_operators::{Counter, Gauge, Metrics};

use crate::onnx::{LoadOptions, Model};

/// A model that a background watcher may replace.
pub(super) struct Slot {
    pub(super) model: Model,
    pub(super) next: Arc<Mutex<Option<Model>>>,
    pub(super) swaps: Counter,
    pub(super) info: Option<Gauge>,
    pub(super) metrics: Metrics,
    pub(super) stage: String,
    pub(super) role: &'static str,
}

impl Slot {
    pub(super) fn start(
        path: PathBuf,
        name: Option<String>,
        opts: LoadOptions,
        poll: StdDuration,
        metrics: &Metrics,
        stage: &str,
        role: &'static str,
    ) -> Result<Slot, crate::ModelError> {
        let stamp = file_stamp(&path);
        let model = Model::load(&path, name.as_deref(), &opts)?;
        tracing::info!(stage, role, model = %model.name, sha256 = %model.sha256, provider = model.provider.name(), "model loaded");
        let next = Arc::new(Mutex::new(None));
        let l = [("stage", stage), ("role", role)];
        let applied = metrics.counter("citystream_model_swaps_total", "Model files swapped in while running.", &l);
        let rejected = metrics.counter(
            "citystream_model_swaps_rejected_total",
            "Replacement model files rejected (the old model keeps serving).",
            &l,
        );
        if !poll.is_zero() {
            let weak = Arc::downgrade(&next);
            let stage = stage.to_owned();
            std::thread::Builder::new()
                .name(format!("model-watch-{stage}"))
                .spawn(move || watch(path, name, opts, poll, stamp, weak, rejected, stage, role))
                .map_err(crate::ModelError::Watcher)?;
        }
        let mut s =
            Slot { model, next, swaps: applied, info: None, metrics: metrics.clone(), stage: stage.to_owned(), role };
        s.publish();
        Ok(s)
    }

    /// Points the `citystream_model_info` gauge at the serving model.
    pub(super) fn publish(&mut self) {
        if let Some(old) = &self.info {
            old.set(0.0);
        }
        let g = self.metrics.gauge(
            "citystream_model_info",
            "1 for the model serving (name, checksum, provider).",
            &[
                ("stage", self.stage.as_str()),
                ("role", self.role),
                ("model", self.model.name.as_str()),
                ("sha256", self.model.sha256.as_str()),
                ("provider", self.model.provider.name()),
            ],
        );
        g.set(1.0);
        self.info = Some(g);
    }

    /// Switches to a model the watcher has loaded, if any.
    pub(super) fn poll(&mut self) {
        let Some(new) = self.next.try_lock().ok().and_then(|mut g| g.take()) else { return };
        tracing::info!(stage = %self.stage, role = self.role, from = %self.model.sha256, to = %new.sha256, model = %new.name, "model swapped");
        self.model = new;
        self.swaps.inc();
        self.publish();
    }
}

/// What tells a replaced file: modification time, size and inode (a rename into place changes
/// the inode even when a copy kept the time and the size).
pub(super) fn file_stamp(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len(), m.ino()))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn watch(
    path: PathBuf,
    name: Option<String>,
    opts: LoadOptions,
    poll: StdDuration,
    mut stamp: Option<(SystemTime, u64, u64)>,
    slot: Weak<Mutex<Option<Model>>>,
    rejected: Counter,
    stage: String,
    role: &'static str,
) {
    loop {
        // sleep in short steps so a dropped operator ends the thread soon
        let until = Instant::now() + poll;
        while Instant::now() < until {
            std::thread::sleep(poll.min(StdDuration::from_millis(100)));
            if slot.strong_count() == 0 {
                return;
            }
        }
        let now = file_stamp(&path);
        if now == stamp || now.is_none() {
            continue;
        }
        stamp = now;
        match Model::load(&path, name.as_deref(), &opts) {
            Ok(m) => {
                let Some(slot) = slot.upgrade() else { return };
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(m);
            }
            Err(e) => {
                rejected.inc();
                tracing::error!(stage = %stage, role, error = %e, "replacement model rejected; the current model keeps serving");
            }
        }
    }
}
