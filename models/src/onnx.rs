//! ONNX Runtime through `ort`: finding and loading the shared library once per process, and
//! loading a model file into a checked, ready-to-run [`Model`].
//!
//! The library is the one in the PyPI `onnxruntime` wheel (`load-dynamic`): nothing is
//! downloaded at build or run time. It is found, in order, at the path a stage configures, at
//! `ORT_DYLIB_PATH`, or in a `.venv` (from `scripts/setup-python.sh`) in the working directory,
//! an ancestor of it, or an ancestor of the executable.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::environment::Environment;
use ort::session::Session;
use ort::value::{TensorRef, ValueType};
use sha2::{Digest, Sha256};

static ENV: OnceLock<Environment> = OnceLock::new();
static INIT: Mutex<()> = Mutex::new(());

/// Where the ONNX Runtime library is looked for, in order (see the module docs).
pub fn library_candidates(configured: Option<&Path>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = configured {
        out.push(p.to_path_buf());
        return out;
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        out.push(PathBuf::from(p));
        return out;
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    for root in roots {
        let lib = root.join(".venv").join("lib");
        let Ok(pythons) = std::fs::read_dir(&lib) else { continue };
        let mut found: Vec<PathBuf> = pythons
            .flatten()
            .filter_map(|e| {
                let capi = e.path().join("site-packages/onnxruntime/capi");
                let files = std::fs::read_dir(&capi).ok()?;
                files
                    .flatten()
                    .map(|f| f.path())
                    .filter(|p| {
                        p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libonnxruntime.so."))
                    })
                    .max_by_key(|p| version_key(p))
            })
            .collect();
        found.sort();
        out.extend(found);
    }
    out
}

/// `libonnxruntime.so.1.31.1` -> `[1, 31, 1]`, so versions compare as numbers.
fn version_key(p: &Path) -> Vec<u64> {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    name.trim_start_matches("libonnxruntime.so.").split('.').map(|v| v.parse().unwrap_or(0)).collect()
}

/// Why ONNX Runtime or a model cannot be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// No ONNX Runtime library was found.
    #[error(
        "no ONNX Runtime library found (looked at {looked}); install it with `scripts/setup-python.sh` \
         (the onnxruntime wheel in .venv), or set ORT_DYLIB_PATH to libonnxruntime.so"
    )]
    NoRuntime {
        /// Where it looked.
        looked: String,
    },
    /// The ONNX Runtime library failed to load or start.
    #[error("{action} ONNX Runtime from {}: {source}", library.display())]
    Runtime {
        /// `loading` or `starting`.
        action: &'static str,
        /// The library.
        library: PathBuf,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The model file cannot be read.
    #[error("reading model {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// ONNX Runtime refused the model (on the CPU provider, which always exists).
    #[error("model {}: {source}", path.display())]
    Session {
        /// The file.
        path: PathBuf,
        /// Why.
        source: ort::Error,
    },
    /// None of the configured execution providers could load the model.
    #[error("model {}: no configured execution provider works ({})", path.display(), failures.join("; "))]
    NoProvider {
        /// The file.
        path: PathBuf,
        /// `provider: why`, per provider tried.
        failures: Vec<String>,
    },
    /// The model's inputs or outputs do not fit the stage, or a probe row gives non-finite
    /// outputs.
    #[error("model {}: {problem}", path.display())]
    Contract {
        /// The file.
        path: PathBuf,
        /// What does not fit.
        problem: String,
    },
    /// A run failed.
    #[error("model {model}: {source}")]
    Run {
        /// The model's name.
        model: String,
        /// Why.
        source: ort::Error,
    },
    /// The thread that watches the model file for hot swaps could not start.
    #[error("starting the model file watcher: {0}")]
    Watcher(std::io::Error),
    /// An output came back with another shape than the model declares.
    #[error("model {model}: output `{output}` came back with shape {shape:?}")]
    OutputShape {
        /// The model's name.
        model: String,
        /// The output.
        output: String,
        /// Its shape.
        shape: Vec<i64>,
    },
}

static LOADED_FROM: OnceLock<PathBuf> = OnceLock::new();

/// The process's ONNX Runtime environment, loading the library on first use. Later calls
/// reuse it (a different configured path is then ignored, with a warning).
pub fn environment(configured: Option<&Path>) -> Result<&'static Environment, ModelError> {
    if let Some(env) = ENV.get() {
        if let (Some(want), Some(have)) = (configured, LOADED_FROM.get())
            && want != have
        {
            tracing::warn!(configured = %want.display(), loaded = %have.display(), "ONNX Runtime is loaded once per process; the configured library is ignored");
        }
        return Ok(env);
    }
    let _guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(env) = ENV.get() {
        return Ok(env);
    }
    let candidates = library_candidates(configured);
    let Some(lib) = candidates.iter().find(|p| p.is_file()) else {
        return Err(ModelError::NoRuntime {
            looked: if candidates.is_empty() {
                "ORT_DYLIB_PATH and .venv folders".to_string()
            } else {
                candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            },
        });
    };
    let builder = ort::init_from(lib).map_err(|source| ModelError::Runtime {
        action: "loading",
        library: lib.clone(),
        source: source.into(),
    })?;
    let env = builder.with_name("citystream").with_telemetry(false).build().map_err(|source| ModelError::Runtime {
        action: "starting",
        library: lib.clone(),
        source: source.into(),
    })?;
    tracing::info!(library = %lib.display(), "ONNX Runtime loaded");
    let _ = LOADED_FROM.set(lib.clone());
    Ok(ENV.get_or_init(|| env))
}

/// An execution provider a stage may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// NVIDIA CUDA (needs the build feature `cuda` and the onnxruntime-gpu libraries).
    Cuda,
    /// The CPU provider (always available).
    Cpu,
}

impl Provider {
    /// The YAML name.
    pub fn name(self) -> &'static str {
        match self {
            Provider::Cuda => "cuda",
            Provider::Cpu => "cpu",
        }
    }
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Providers in order of preference; the first that registers is used.
    pub providers: Vec<Provider>,
    /// Threads inside one operator (`intra_op`).
    pub intra_threads: usize,
    /// Width of the input (features per row).
    pub input_width: usize,
    /// Output tensors to read and how many columns each must have.
    pub outputs: Vec<(String, usize)>,
    /// The library path, if configured.
    pub library: Option<PathBuf>,
    /// With the CUDA provider, runs of fewer rows than this go to a CPU session of the same
    /// file: a CUDA run costs 80-175 µs of launches and copies whatever its size, more than
    /// these models take on a CPU core below several hundred rows (`deploy/gpu/check.sh`).
    /// 0 or 1: every run on CUDA.
    pub cuda_min_rows: usize,
}

/// A loaded, checked model.
pub struct Model {
    /// Display name (file stem unless configured).
    pub name: String,
    /// SHA-256 of the file's bytes, hex.
    pub sha256: String,
    /// The file it came from.
    pub path: PathBuf,
    /// The provider that runs it.
    pub provider: Provider,
    /// Shared with every model of the same bytes, provider and threads in the process.
    session: crate::sessions::Shared,
    /// On CUDA, the CPU session that runs the runs of fewer rows than the first value.
    small_runs: Option<(usize, crate::sessions::Shared)>,
    input: String,
    outputs: Vec<(String, usize)>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.name)
            .field("sha256", &self.sha256)
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

/// SHA-256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn session(env: &Environment, bytes: &[u8], provider: Provider, threads: usize) -> ort::Result<Session> {
    let mut b = Session::builder(env)?.with_intra_threads(threads)?.with_inter_threads(1)?;
    if provider == Provider::Cuda {
        #[cfg(feature = "cuda")]
        {
            // full fp32 as on the CPU, whatever the library's default (TF32 would round the
            // matrix products to a 10-bit mantissa)
            b = b.with_execution_providers([ort::ep::CUDA::default().with_tf32(false).build().error_on_failure()])?;
        }
        #[cfg(not(feature = "cuda"))]
        {
            return Err(ort::Error::new("this build has no CUDA support (cargo feature `cuda`)"));
        }
    }
    b.commit_from_memory(bytes)
}

/// Whether a run of `rows` rows of a model on `provider` goes to the CPU instead: on CUDA,
/// below `cuda_min_rows` (0 and 1 send every run to CUDA). The split depends on the run's size
/// alone, and the infer stage's runs are the rows of one event time, so a row is scored by the
/// same provider live, in a backlog and after a restart.
fn cpu_for_small_runs(provider: Provider, cuda_min_rows: usize, rows: usize) -> bool {
    provider == Provider::Cuda && cuda_min_rows > 1 && rows < cuda_min_rows
}

impl Model {
    /// Loads `path` with the first provider of `opts.providers` that works, logging each
    /// fallback, then checks its input and outputs against `opts` and runs one probe row.
    pub fn load(path: &Path, name: Option<&str>, opts: &LoadOptions) -> Result<Model, ModelError> {
        let env = environment(opts.library.as_deref())?;
        let bytes = std::fs::read(path).map_err(|source| ModelError::Read { path: path.to_owned(), source })?;
        let sha256 = sha256_hex(&bytes);
        let name = name
            .map(str::to_owned)
            .unwrap_or_else(|| path.file_stem().and_then(|s| s.to_str()).unwrap_or("model").to_owned());
        let mut failures = Vec::new();
        let mut chosen = None;
        let threads = opts.intra_threads.max(1);
        for &p in &opts.providers {
            let key = crate::sessions::Key { sha256: sha256.clone(), provider: p.name(), intra_threads: threads };
            match crate::sessions::get_or_create(key, || session(env, &bytes, p, threads)) {
                Ok((s, shared)) => {
                    if shared {
                        tracing::debug!(model = %name, provider = p.name(), "sharing the session of the same model file");
                    }
                    chosen = Some((p, s));
                    break;
                }
                Err(source) => {
                    let msg = source.to_string();
                    if p == Provider::Cpu {
                        return Err(ModelError::Session { path: path.to_owned(), source });
                    }
                    tracing::warn!(model = %name, provider = p.name(), error = %msg, "execution provider unavailable, trying the next one");
                    failures.push(format!("{}: {msg}", p.name()));
                }
            }
        }
        let Some((provider, session)) = chosen else {
            return Err(ModelError::NoProvider { path: path.to_owned(), failures });
        };
        if !failures.is_empty() {
            tracing::warn!(model = %name, provider = provider.name(), "model runs on a fallback provider");
        }
        let small_runs = if cpu_for_small_runs(provider, opts.cuda_min_rows, 1) {
            let key =
                crate::sessions::Key { sha256: sha256.clone(), provider: Provider::Cpu.name(), intra_threads: threads };
            let (cpu, _) = crate::sessions::get_or_create(key, || self::session(env, &bytes, Provider::Cpu, threads))
                .map_err(|source| ModelError::Session { path: path.to_owned(), source })?;
            Some((opts.cuda_min_rows, cpu))
        } else {
            None
        };
        let mut model = Model {
            name,
            sha256,
            path: path.to_path_buf(),
            provider,
            session,
            small_runs,
            input: String::new(),
            outputs: Vec::new(),
        };
        model.check(opts)?;
        // a probe row of zeros through the chosen provider's session and the small runs' one
        let probe = vec![0f32; opts.input_width];
        for shared in std::iter::once(&model.session).chain(model.small_runs.as_ref().map(|s| &s.1)) {
            let out = model.run_on(shared, &probe, 1)?;
            if out.iter().flatten().any(|v| !v.is_finite()) {
                return Err(ModelError::Contract {
                    path: path.to_owned(),
                    problem: "a probe row of zeros gives non-finite outputs".into(),
                });
            }
        }
        Ok(model)
    }

    fn check(&mut self, opts: &LoadOptions) -> Result<(), ModelError> {
        self.check_contract(opts).map_err(|problem| ModelError::Contract { path: self.path.clone(), problem })
    }

    /// What does not fit in the model's input and outputs.
    fn check_contract(&mut self, opts: &LoadOptions) -> Result<(), String> {
        let session = crate::sessions::lock(&self.session);
        let inputs = session.inputs();
        if inputs.len() != 1 {
            return Err(format!("has {} inputs; a citystream model has exactly one", inputs.len()));
        }
        let input = &inputs[0];
        match input.dtype() {
            ValueType::Tensor { ty, shape, .. } => {
                if *ty != ort::value::TensorElementType::Float32 {
                    return Err(format!("input `{}` is {ty}, not float32", input.name()));
                }
                let dims: Vec<i64> = shape.iter().copied().collect();
                if dims.len() != 2 || dims[0] >= 0 || dims[1] != opts.input_width as i64 {
                    return Err(format!(
                        "input `{}` has shape {dims:?}; the stage feeds [batch, {}] (a dynamic batch dimension)",
                        input.name(),
                        opts.input_width
                    ));
                }
            }
            other => return Err(format!("input `{}` is {other:?}, not a tensor", input.name())),
        }
        let input = input.name().to_owned();
        for (name, width) in &opts.outputs {
            let Some(o) = session.outputs().iter().find(|o| o.name() == name) else {
                let have: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
                return Err(format!("no output `{name}` (outputs: {})", have.join(", ")));
            };
            match o.dtype() {
                ValueType::Tensor { ty, shape, .. }
                    if *ty == ort::value::TensorElementType::Float32
                        && shape.len() == 2
                        && shape[0] < 0
                        && (shape[1] == *width as i64 || shape[1] < 0) => {}
                ValueType::Tensor { ty, shape, .. } => {
                    return Err(format!(
                        "output `{name}` is {ty} {:?}; the stage maps it to {width} float32 column(s)",
                        shape.iter().collect::<Vec<_>>()
                    ));
                }
                other => return Err(format!("output `{name}` is {other:?}, not a tensor")),
            }
        }
        drop(session);
        self.input = input;
        self.outputs = opts.outputs.clone();
        Ok(())
    }

    /// Whether `self` and `other` run on one ONNX Runtime session (same bytes, provider and
    /// threads, loaded in one process).
    pub fn shares_session_with(&self, other: &Model) -> bool {
        std::sync::Arc::ptr_eq(&self.session, &other.session)
    }

    /// The column count of each configured output.
    pub fn output_widths(&self) -> Vec<usize> {
        self.outputs.iter().map(|o| o.1).collect()
    }

    /// The provider a run of `rows` rows goes to: `provider`, except the runs below
    /// `cuda_min_rows` of a model on CUDA, which run on the CPU.
    pub fn runs_on(&self, rows: usize) -> Provider {
        match &self.small_runs {
            Some((min, _)) if cpu_for_small_runs(self.provider, *min, rows) => Provider::Cpu,
            _ => self.provider,
        }
    }

    /// Runs `rows` rows of row-major features (`rows * width` values, borrowed: no copy) and
    /// returns each configured output as row-major values.
    pub fn run(&mut self, features: &[f32], rows: usize) -> Result<Vec<Vec<f32>>, ModelError> {
        let shared = match &self.small_runs {
            Some((_, cpu)) if self.runs_on(rows) == Provider::Cpu => cpu,
            _ => &self.session,
        };
        self.run_on(shared, features, rows)
    }

    fn run_on(
        &self,
        shared: &crate::sessions::Shared,
        features: &[f32],
        rows: usize,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let width = features.len().checked_div(rows).unwrap_or(0);
        let failed = |source| ModelError::Run { model: self.name.clone(), source };
        let tensor = TensorRef::from_array_view(([rows, width], features)).map_err(failed)?;
        let mut session = crate::sessions::lock(shared);
        let outs = session.run(ort::inputs![self.input.as_str() => tensor]).map_err(failed)?;
        let mut result = Vec::with_capacity(self.outputs.len());
        for (name, w) in &self.outputs {
            let (shape, data) = outs[name.as_str()].try_extract_tensor::<f32>().map_err(failed)?;
            if shape.len() != 2 || shape[0] != rows as i64 || shape[1] != *w as i64 {
                return Err(ModelError::OutputShape {
                    model: self.name.clone(),
                    output: name.clone(),
                    shape: shape.to_vec(),
                });
            }
            result.push(data.to_vec());
        }
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_small_runs_of_a_cuda_model_go_to_the_cpu() {
        assert!(cpu_for_small_runs(Provider::Cuda, 1024, 24));
        assert!(cpu_for_small_runs(Provider::Cuda, 1024, 1023));
        assert!(!cpu_for_small_runs(Provider::Cuda, 1024, 1024), "from cuda_min_rows on: CUDA");
        assert!(!cpu_for_small_runs(Provider::Cuda, 0, 1), "0: every run on CUDA");
        assert!(!cpu_for_small_runs(Provider::Cuda, 1, 1), "1: every run on CUDA");
        assert!(!cpu_for_small_runs(Provider::Cpu, 1024, 24), "a CPU model has nothing to move");
    }
}
