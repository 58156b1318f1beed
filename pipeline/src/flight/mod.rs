//! `citystream serve`: an Arrow Flight SQL endpoint over the lake, for the tools analysts
//! already use (ADBC from Python and R notebooks, JDBC/ODBC drivers built on Flight SQL,
//! DBeaver, Superset, Grafana).
//!
//! Every query runs on DataFusion over the same table registration as `citystream sql`
//! ([`crate::sql::context`]), renewed when it is more than a second old, so new partitions
//! and files are seen without a restart. The endpoint is read-only (no DDL, DML or `SET`), needs a bearer
//! token from the control center's tokens file (either role reads), cuts results at a row limit
//! and queries at a time limit with clear errors, and serves TLS when given a certificate.
//! Prepared statements are stateless: the handle carries the SQL and its bound parameters, so
//! any instance behind one address can run it.
//!
//! Files: [`auth`] checks tokens, [`handle`] encodes prepared statements, [`service`]
//! implements the Flight SQL calls.

mod auth;
mod handle;
mod service;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use arrow_flight::flight_service_server::FlightServiceServer;

use crate::control::Identity;

/// What `citystream serve` serves, and how.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The lake (a Parquet sink's `path`).
    pub lake: PathBuf,
    /// Where to listen (port 0: any free port).
    pub addr: SocketAddr,
    /// Bearer tokens (the control center's): either role may read.
    pub tokens: HashMap<String, Identity>,
    /// Results with more rows are cut with an error.
    pub max_rows: u64,
    /// Queries running longer are stopped with an error.
    pub max_time: Duration,
    /// Bytes all running queries may hold together (hash tables, sorts: what DataFusion's
    /// memory pool tracks); a query that needs more is stopped with an error, nothing spills.
    pub max_memory: usize,
    /// A PEM certificate chain and key: serve TLS (`grpc+tls://`).
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// Why the endpoint could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The query engine could not be set up.
    #[error("query engine: {0}")]
    Engine(#[from] datafusion::error::DataFusionError),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The certificate or key could not be read.
    #[error("reading {}: {source}", path.display())]
    Tls {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("the Flight SQL server failed: {0}")]
    Server(#[from] tonic::transport::Error),
}

/// A bound endpoint: its address, and the future that serves until `shutdown` resolves.
pub async fn bind(
    cfg: ServeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, impl std::future::Future<Output = Result<(), ServeError>>), ServeError> {
    let listener =
        tokio::net::TcpListener::bind(cfg.addr).await.map_err(|source| ServeError::Bind { addr: cfg.addr, source })?;
    let local = listener.local_addr().map_err(|source| ServeError::Bind { addr: cfg.addr, source })?;
    let mut server = tonic::transport::Server::builder();
    if let Some((cert, key)) = &cfg.tls {
        let read = |p: &PathBuf| std::fs::read(p).map_err(|source| ServeError::Tls { path: p.clone(), source });
        let identity = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
        server = server.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
    }
    let service = FlightServiceServer::new(service::LakeService::new(cfg)?);
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let fut = async move {
        server.add_service(service).serve_with_incoming_shutdown(incoming, shutdown).await.map_err(ServeError::from)
    };
    Ok((local, fut))
}
