//! # citystream-pipeline
//!
//! The runnable part of citystream:
//!
//! - [`config`]: YAML text → [`config::RawPipeline`] → validated [`config::PipelinePlan`];
//! - [`runtime`]: runs a plan as tokio tasks joined by bounded channels ([`runtime::run`]);
//! - [`simulator`]: the embedded, seeded city simulator (a source and `citystream simulate`);
//! - [`sink`]: the zstd Parquet sink;
//! - [`kafka`] (feature `kafka`): the Kafka source and sink;
//! - [`files`]: the files source (JSON lines and Parquet archives, for backfills);
//! - [`sql`] (feature `sql`): DataFusion SQL over the Parquet tables;
//! - [`flight`] (feature `sql`): the Arrow Flight SQL endpoint over them (`citystream serve`);
//! - [`serve`]: the Prometheus endpoint and the status line;
//! - [`energy`]: the energy and carbon account per task.
//!
//! The `citystream` binary (`src/main.rs`) is a thin CLI over these.

#![deny(missing_docs)]

mod atomic_file;
pub mod config;
pub mod control;
pub mod energy;
pub mod files;
#[cfg(feature = "sql")]
pub mod flight;
pub mod gpu;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod primitives;
pub mod runtime;
pub mod serve;
pub mod simulator;
pub mod sink;
#[cfg(feature = "sql")]
pub mod sql;
pub mod task;

use citystream_operators::Metrics;

/// The allocator of every program built on this crate (the `citystream` binary, the
/// benchmarks, the tests): jemalloc. Operators allocate Arrow buffers, strings and hash-map
/// entries per batch, often freed on another thread than the one that allocated them; under
/// glibc's allocator about 12% of the embedded default's CPU went to `malloc` and `free`, and
/// more to page faults of buffers returned to the kernel and mapped again. jemalloc cut the
/// embedded default's CPU per event by about 6% (medians, README "Benchmarks"); mimalloc,
/// tried too, cost 10% more CPU and tripled peak RSS. Its symbols are prefixed, so memory of C
/// libraries (librdkafka, ONNX Runtime) stays with glibc.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

pub use runtime::{PipelineError, RunReport, StopHandle};

/// Why [`run_file`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RunFileError {
    /// The configuration has errors (all of them, with file, line and key).
    #[error(transparent)]
    Config(#[from] config::ConfigErrors),
    /// The pipeline stopped with an error.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
}

/// Loads, validates and runs the pipeline in `path` until its sources end or `stop` fires.
pub async fn run_file(
    path: &std::path::Path,
    metrics: Metrics,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<RunReport, RunFileError> {
    let file = path.display().to_string();
    let raw = config::load_file(path)?;
    let plan = config::plan::plan(raw, &file)?;
    Ok(runtime::run(plan, metrics, stop).await?)
}

#[cfg(test)]
mod layering {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// The top-level modules each module's files name (`crate::x`), read from the sources.
    fn imports() -> BTreeMap<String, BTreeSet<String>> {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut stack = vec![src.clone()];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                    continue;
                }
                let rel = p.strip_prefix(&src).unwrap();
                let first = rel.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
                let module = first.trim_end_matches(".rs").to_owned();
                if matches!(module.as_str(), "lib" | "main") {
                    continue;
                }
                let text = std::fs::read_to_string(&p).unwrap();
                let deps = out.entry(module.clone()).or_default();
                for (i, _) in text.match_indices("crate::") {
                    let name: String =
                        text[i + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                    if name != module && (src.join(&name).is_dir() || src.join(format!("{name}.rs")).exists()) {
                        deps.insert(name);
                    }
                }
            }
        }
        out
    }

    /// Dependencies between the pipeline's modules point one way: no module reaches itself
    /// through others (the planner imports the connectors, never the reverse; connectors take
    /// shared config from `primitives` and the runtime's handles from `task`).
    #[test]
    fn module_imports_have_no_loops() {
        let graph = imports();
        fn visit<'a>(
            m: &'a str,
            graph: &'a BTreeMap<String, BTreeSet<String>>,
            path: &mut Vec<&'a str>,
            done: &mut BTreeSet<&'a str>,
        ) {
            if let Some(i) = path.iter().position(|p| *p == m) {
                panic!("import loop: {} -> {m}", path[i..].join(" -> "));
            }
            if !done.insert(m) {
                return;
            }
            path.push(m);
            for d in graph.get(m).into_iter().flatten() {
                visit(d, graph, path, done);
            }
            path.pop();
        }
        let mut done = BTreeSet::new();
        for m in graph.keys() {
            visit(m, &graph, &mut Vec::new(), &mut done);
        }
        assert!(graph["primitives"].is_empty(), "primitives is a leaf: {:?}", graph["primitives"]);
        for connector in ["kafka", "files", "sink", "simulator", "control", "energy"] {
            let deps = &graph[connector];
            assert!(!deps.contains("config") && !deps.contains("runtime"), "{connector} imports {deps:?}");
        }
        // the contracts import no component; the runtime runs components only through them
        // (the simulator's report is the one component type it names: plain data in `RunReport`)
        let task: Vec<&String> =
            graph["task"].iter().filter(|d| !["primitives", "atomic_file"].contains(&d.as_str())).collect();
        assert!(task.is_empty(), "task imports {task:?}");
        for component in ["kafka", "files", "sink", "control", "energy", "flight", "sql"] {
            assert!(!graph["runtime"].contains(component), "runtime imports {component}");
        }
    }

    /// Library code returns typed errors; `anyhow` is for the binary (`main.rs`, `cli/`).
    #[test]
    fn libraries_do_not_use_anyhow() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut stack: Vec<_> =
            ["src", "../operators/src", "../models/src", "../schemas/src"].map(|d| root.join(d)).into();
        let mut found = Vec::new();
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap().flatten() {
                let p = e.path();
                if p.ends_with("src/cli") || p.ends_with("src/main.rs") {
                    continue;
                }
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs")
                    && std::fs::read_to_string(&p).unwrap().contains(concat!("any", "how::"))
                {
                    found.push(p);
                }
            }
        }
        assert!(found.is_empty(), "library files using anyhow: {found:?}");
    }
}
