//! `citystream control`: a control center on its own, serving the book of the alerts topic
//! (`ControlCenter::start_shared`), until SIGINT/SIGTERM. Several of them behind one address
//! serve one book.

use std::path::PathBuf;

use anyhow::Context as _;
use citystream_operators::Metrics;
use citystream_pipeline::config;
use citystream_pipeline::control::{ControlCenter, ControlConfig};

/// What `citystream control` was asked.
#[derive(Debug, clap::Args)]
pub(crate) struct Control {
    /// The control center's YAML (the keys of a `control_center` sink, without `alerts`;
    /// `kafka.alerts_topic` is where its book comes from).
    #[arg(long, short, default_value = "deploy/control.yaml")]
    config: PathBuf,
    /// Serve Prometheus metrics here (`/metrics`).
    #[arg(long)]
    metrics_addr: Option<String>,
}

pub(crate) async fn control(c: Control) -> anyhow::Result<()> {
    let cfg: ControlConfig = config::parse_file(&c.config)?;
    anyhow::ensure!(
        cfg.alerts.0.is_empty(),
        "{}: `alerts` names a pipeline's streams; a control center on its own reads `kafka.alerts_topic`",
        c.config.display()
    );
    let metrics = Metrics::new();
    if let Some(addr) = &c.metrics_addr {
        let addr = addr.parse().with_context(|| format!("--metrics-addr `{addr}` is not host:port"))?;
        let m = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = citystream_pipeline::serve::metrics_endpoint(addr, m).await {
                tracing::error!("metrics endpoint on {addr} failed: {e}");
            }
        });
    }
    let center = ControlCenter::start_shared("control", &cfg, &metrics).map_err(anyhow::Error::msg)?;
    let terminated = super::on_termination();
    // the first line says where (tests and scripts read it when the port was 0)
    println!("control center on http://{}", center.addr);
    terminated.await;
    tracing::info!("signal received: stopping the control center");
    drop(center);
    Ok(())
}
