//! `citystream serve`: the Arrow Flight SQL endpoint over a lake, until SIGINT/SIGTERM.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context as _;
use citystream_pipeline::control::{Identity, parse_tokens};
use citystream_pipeline::flight::{ServeConfig, bind};

/// What `citystream serve` was asked.
pub(crate) struct Serve {
    pub(crate) data: PathBuf,
    pub(crate) addr: String,
    pub(crate) tokens_file: Option<PathBuf>,
    pub(crate) tokens_env: Option<String>,
    pub(crate) max_rows: u64,
    pub(crate) max_time: citystream_operators::Duration,
    pub(crate) max_memory_mb: u64,
    pub(crate) tls_cert: Option<PathBuf>,
    pub(crate) tls_key: Option<PathBuf>,
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
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        let _ = stop.send(());
    });
    #[cfg(unix)]
    let stopped = async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = stopped => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    };
    let (local, server) = bind(cfg, async move {
        let _ = stopped.await;
    })
    .await?;
    // the first line says where (tests and scripts read it when the port was 0)
    println!("serving Arrow Flight SQL on {scheme}://{local} over {}", s.data.display());
    server.await?;
    Ok(())
}
