//! `citystream serve`: the Arrow Flight SQL endpoint over a lake, until SIGINT/SIGTERM.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context as _;
use citystream_pipeline::control::{Identity, parse_tokens};
use citystream_pipeline::flight::{ServeConfig, bind};

/// What `citystream serve` was asked.
#[derive(Debug, clap::Args)]
pub(crate) struct Serve {
    /// The lake (the Parquet sink's `path`).
    #[arg(long, default_value = "data/lake")]
    data: PathBuf,
    /// Listen here (port 0: any free port; the first line printed says which).
    #[arg(long, default_value = "127.0.0.1:8815")]
    addr: String,
    /// The tokens file (`role name token` lines, owner-only), as the control center's.
    #[arg(long, default_value = "data/secrets/control_tokens")]
    tokens_file: Option<PathBuf>,
    /// Read the tokens from this environment variable instead.
    #[arg(long)]
    tokens_env: Option<String>,
    /// Results with more rows are cut with an error.
    #[arg(long, default_value_t = 1_000_000)]
    max_rows: u64,
    /// Queries running longer are stopped with an error.
    #[arg(long, default_value = "60s")]
    max_time: citystream_operators::Duration,
    /// Memory all running queries may hold together (hash tables, sorts), MiB; a query that
    /// needs more is stopped with an error (nothing spills to disk).
    #[arg(long, default_value_t = 1024)]
    max_memory_mb: u64,
    /// PEM certificate chain: serve TLS (with --tls-key).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long)]
    tls_key: Option<PathBuf>,
}

/// The tokens, from the control center's tokens file (owner-only, as it checks) or a variable.
fn tokens(s: &Serve) -> anyhow::Result<HashMap<String, Identity>> {
    let text = match (&s.tokens_env, &s.tokens_file) {
        (Some(v), _) => std::env::var(v).with_context(|| format!("--tokens-env: `{v}` is not set"))?,
        (None, Some(f)) => {
            citystream_operators::secret::check_permissions(f).map_err(|e| anyhow::anyhow!("--tokens-file: {e}"))?;
            std::fs::read_to_string(f).with_context(|| format!("reading the tokens file {}", f.display()))?
        }
        (None, None) => anyhow::bail!("give --tokens-file or --tokens-env (the control center's tokens)"),
    };
    parse_tokens(&text).map_err(anyhow::Error::msg)
}

pub(crate) async fn serve(s: Serve) -> anyhow::Result<()> {
    let addr = s.addr.parse().with_context(|| format!("--addr `{}` is not host:port", s.addr))?;
    let tls = match (&s.tls_cert, &s.tls_key) {
        (Some(c), Some(k)) => Some((c.clone(), k.clone())),
        (None, None) => None,
        _ => anyhow::bail!("--tls-cert and --tls-key go together"),
    };
    anyhow::ensure!(s.data.is_dir(), "{} is not a lake folder", s.data.display());
    anyhow::ensure!(s.max_rows > 0, "--max-rows must be at least 1");
    anyhow::ensure!(s.max_memory_mb > 0, "--max-memory-mb must be at least 1");
    let scheme = if tls.is_some() { "grpc+tls" } else { "grpc" };
    let cfg = ServeConfig {
        lake: s.data.clone(),
        addr,
        tokens: tokens(&s)?,
        max_rows: s.max_rows,
        max_time: s.max_time.to_std(),
        max_memory: usize::try_from(s.max_memory_mb.saturating_mul(1024 * 1024)).unwrap_or(usize::MAX),
        tls,
    };
    let (local, server) = bind(cfg, super::on_termination()).await?;
    // the first line says where (tests and scripts read it when the port was 0)
    println!("serving Arrow Flight SQL on {scheme}://{local} over {}", s.data.display());
    server.await?;
    Ok(())
}
