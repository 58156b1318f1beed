//! Backfill configs: a pipeline config rewritten to run over archived files instead of its
//! source, into a lake of its own (`citystream replay`, the e2e bench's files mode).

use std::path::{Path, PathBuf};

use citystream_schemas::EventKind;

use super::{OperatorSpec, RawPipeline, SinkConfig, SourceConfig};
use crate::files::{FilesPaths, FilesSourceConfig, ListError};
use crate::primitives::EnvString;

/// What to backfill, and where.
#[derive(Debug, Clone, Default)]
pub struct Backfill {
    /// The folder of archived files: `traffic*`, `camera*`, `environment*` (files or folders).
    pub files: PathBuf,
    /// Every Parquet table goes here instead of the config's lake.
    pub out: Option<PathBuf>,
    /// Checkpoints. Default: `<lake>.replay-state`.
    pub state: Option<PathBuf>,
    /// Lines per second at most.
    pub rate: Option<f64>,
    /// Only events in this range of event time.
    pub event_time: crate::files::EventTimeRange,
}

/// Why a config cannot be turned into a backfill.
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    /// It has no source or several: which one to replace is unclear.
    #[error("the config has {0} sources; a backfill replaces exactly one")]
    Sources(usize),
    /// The folder has no files of any kind.
    #[error("{} holds no `traffic*`, `camera*` or `environment*` files", .0.display())]
    NoFiles(PathBuf),
    /// The folder could not be listed.
    #[error(transparent)]
    List(#[from] ListError),
    /// No Parquet sink to put the state beside, and no `state` given.
    #[error("no Parquet sink: give a state folder for the checkpoints")]
    NoState,
}

/// `raw` with its one source replaced by a files source over `files/{kind}*` (the names
/// `citystream simulate` writes, a directory per kind, or any extension after the kind), its
/// Parquet sinks, energy table and control center feedback moved to `out`, endpoints on free
/// ports, no `max_past` bound in `decode` (archived events are old by nature), and its state in
/// `state`.
pub fn backfill(mut raw: RawPipeline, r: &Backfill) -> Result<RawPipeline, BackfillError> {
    if raw.sources.len() != 1 {
        return Err(BackfillError::Sources(raw.sources.len()));
    }
    let (name, old) = raw.sources.pop_first().expect("one source");
    // every kind gets its pattern (a kind without files is a stream that ends at once, so the
    // config's stages all plan); at least one must match
    let mut paths = FilesPaths::default();
    let mut found = 0;
    for kind in EventKind::ALL {
        let pattern = format!("{}/{kind}*", glob_escape(&r.files));
        let n = crate::files::list(&pattern)?.len();
        if n == 0 {
            tracing::warn!(kind = kind.as_str(), folder = %r.files.display(), "no `{kind}*` files to backfill");
        }
        found += n;
        let p = Some(EnvString::literal(pattern));
        match kind {
            EventKind::Traffic => paths.traffic = p,
            EventKind::Camera => paths.camera = p,
            EventKind::Environment => paths.environment = p,
        }
    }
    if found == 0 {
        return Err(BackfillError::NoFiles(r.files.clone()));
    }
    let mut files = FilesSourceConfig::new(paths);
    files.max_out_of_orderness = old.max_out_of_orderness();
    files.rate = r.rate;
    files.event_time = r.event_time;
    raw.sources.insert(name, SourceConfig::Files(Box::new(files)));
    // history: the files were written long after the events, so decode's bound on how far an
    // event may lie before its arrival (default 7 days) does not apply
    for st in raw.stages.values_mut() {
        if let OperatorSpec::Decode(d) = &mut st.op {
            d.max_past = None;
        }
    }
    let mut first_lake = None;
    for sink in raw.sinks.values_mut() {
        match sink {
            SinkConfig::Parquet(p) => {
                if let Some(out) = &r.out {
                    p.path = EnvString::literal(out.display().to_string());
                }
                first_lake.get_or_insert_with(|| PathBuf::from(p.path.as_str()));
            }
            SinkConfig::ControlCenter(c) => {
                // beside a live control center: a port of its own, decisions in the replay's lake
                c.addr = EnvString::literal("127.0.0.1:0");
                if let (Some(out), Some(f)) = (&r.out, c.feedback_path.as_mut()) {
                    *f = EnvString::literal(out.display().to_string());
                }
            }
            #[allow(unreachable_patterns)]
            _ => {}
        }
    }
    if let (Some(out), Some(e)) = (&r.out, raw.runtime.energy.as_mut()) {
        e.path = EnvString::literal(out.display().to_string());
    }
    raw.runtime.metrics_addr = None;
    raw.runtime.status_interval = None;
    let state = match (&r.state, &first_lake) {
        (Some(s), _) => s.clone(),
        (None, Some(lake)) => PathBuf::from(format!("{}.replay-state", lake.display())),
        (None, None) => return Err(BackfillError::NoState),
    };
    // a replay's state is its own, beside its lake: never the live pipeline's
    raw.runtime.state_dir = Some(EnvString::literal(state.display().to_string()));
    raw.runtime.state_url = None;
    Ok(raw)
}

/// `path` with glob characters escaped.
fn glob_escape(path: &Path) -> String {
    glob::Pattern::escape(&path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_reads_the_files_simulate_writes_into_its_own_lake() {
        let dir = tempfile::tempdir().unwrap();
        let files = dir.path().join("sim");
        std::fs::create_dir_all(&files).unwrap();
        std::fs::write(files.join("traffic.jsonl"), "{}\n").unwrap();
        std::fs::write(files.join("camera.jsonl.zst"), zstd::encode_all(&b"{}\n"[..], 1).unwrap()).unwrap();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let text = std::fs::read_to_string(root.join("deploy/local.yaml"))
            .unwrap()
            .replace("deploy/road_graph.csv", &format!("{}/deploy/road_graph.csv", root.display()))
            .replace("models/onnx/", &format!("{}/models/onnx/", root.display()));
        let raw = super::super::load_str(&text, "local.yaml").unwrap();
        let out = dir.path().join("backfill");
        let r = Backfill {
            files: files.clone(),
            out: Some(out.clone()),
            state: None,
            rate: None,
            event_time: Default::default(),
        };
        let raw = backfill(raw, &r).unwrap();
        let SourceConfig::Files(f) = &raw.sources["city"] else { panic!("a files source") };
        assert!(f.paths.traffic.as_ref().unwrap().as_str().ends_with("sim/traffic*"));
        assert!(f.paths.camera.is_some() && f.paths.environment.is_some(), "a kind without files reads nothing");
        for s in raw.sinks.values() {
            if let SinkConfig::Parquet(p) = s {
                assert_eq!(p.path.as_str(), out.display().to_string());
            }
        }
        assert_eq!(raw.runtime.state_dir.as_ref().unwrap().as_str(), format!("{}.replay-state", out.display()));
        assert!(raw.runtime.metrics_addr.is_none());
        let decoders: Vec<_> = raw
            .stages
            .values()
            .filter_map(|s| match &s.op {
                OperatorSpec::Decode(d) => Some(d.max_past),
                _ => None,
            })
            .collect();
        assert_eq!(decoders, [None, None, None], "archived events are old: no max_past");
    }

    #[test]
    fn replay_without_files_says_where_it_looked() {
        let dir = tempfile::tempdir().unwrap();
        let raw = super::super::load_str(
            "sources: {city: {type: simulator}}\nsinks: {lake: {type: parquet, path: x, tables: {t: city.traffic}}}",
            "x.yaml",
        )
        .unwrap();
        let r =
            Backfill { files: dir.path().into(), out: None, state: None, rate: None, event_time: Default::default() };
        let err = backfill(raw, &r).unwrap_err().to_string();
        assert!(err.contains("no `traffic*`"), "{err}");
    }
}
