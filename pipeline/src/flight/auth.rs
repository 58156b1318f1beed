//! Bearer tokens on every call (Basic auth in the handshake, for JDBC tools that send a user
//! and a password: the password is the token), and a budget of failed attempts per client.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use tonic::{Request, Status};

use crate::control::Identity;

/// Failed attempts a client address may make per minute before every call of it is refused.
const FAILURES_PER_MINUTE: u32 = 20;
/// Client addresses remembered at most (older windows are forgotten first).
const MAX_CLIENTS: usize = 10_000;

/// Checks tokens.
#[derive(Clone)]
pub(super) struct Tokens {
    tokens: Arc<HashMap<String, Identity>>,
    /// Per client address: the start of its current minute and its failures in it.
    failures: Arc<Mutex<HashMap<IpAddr, (Instant, u32)>>>,
}

impl Tokens {
    pub(super) fn new(tokens: HashMap<String, Identity>) -> Self {
        Self { tokens: Arc::new(tokens), failures: Default::default() }
    }

    /// Who sends `request`, from its `authorization: Bearer <token>` header.
    pub(super) fn check<T>(&self, request: &Request<T>) -> Result<Identity, Status> {
        let token = header(request)?
            .and_then(|h| h.strip_prefix("Bearer ").map(str::to_owned))
            .ok_or_else(|| self.failed(request, "a bearer token is required (`authorization: Bearer <token>`)"))?;
        self.identify(request, &token)
    }

    /// The handshake: a bearer token, or Basic credentials whose password is a token; returns
    /// the token to use on the following calls.
    pub(super) fn handshake<T>(&self, request: &Request<T>) -> Result<(Identity, String), Status> {
        let h =
            header(request)?.ok_or_else(|| self.failed(request, "a bearer token or Basic credentials are required"))?;
        let token = if let Some(t) = h.strip_prefix("Bearer ") {
            t.to_owned()
        } else if let Some(b) = h.strip_prefix("Basic ") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
                .and_then(|d| String::from_utf8(d).ok())
                .ok_or_else(|| self.failed(request, "Basic credentials are not base64 of `user:token`"))?;
            decoded.split_once(':').map(|(_, pass)| pass.to_owned()).unwrap_or(decoded)
        } else {
            return Err(self.failed(request, "unknown authorization scheme (Bearer or Basic)"));
        };
        Ok((self.identify(request, &token)?, token))
    }

    fn identify<T>(&self, request: &Request<T>, token: &str) -> Result<Identity, Status> {
        self.refuse_if_over_budget(request)?;
        self.tokens.get(token).cloned().ok_or_else(|| self.failed(request, "unknown token"))
    }

    fn refuse_if_over_budget<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(ip) = peer(request) else { return Ok(()) };
        let failures = self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match failures.get(&ip) {
            Some((since, n)) if since.elapsed() < Duration::from_secs(60) && *n >= FAILURES_PER_MINUTE => {
                Err(Status::resource_exhausted("too many failed attempts from this address: wait a minute"))
            }
            _ => Ok(()),
        }
    }

    /// Counts a failed attempt of the request's address; the error to answer.
    fn failed<T>(&self, request: &Request<T>, why: &str) -> Status {
        if let Some(ip) = peer(request) {
            let mut failures = self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if failures.len() >= MAX_CLIENTS && !failures.contains_key(&ip) {
                failures.retain(|_, (since, _)| since.elapsed() < Duration::from_secs(60));
                if failures.len() >= MAX_CLIENTS {
                    failures.clear();
                }
            }
            let e = failures.entry(ip).or_insert((Instant::now(), 0));
            if e.0.elapsed() >= Duration::from_secs(60) {
                *e = (Instant::now(), 0);
            }
            e.1 += 1;
        }
        tracing::warn!(peer = ?request.remote_addr(), "flight sql: refused: {why}");
        Status::unauthenticated(why.to_owned())
    }
}

fn header<T>(request: &Request<T>) -> Result<Option<String>, Status> {
    match request.metadata().get("authorization") {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim().to_owned()))
            .map_err(|_| Status::unauthenticated("unreadable authorization")),
    }
}

fn peer<T>(request: &Request<T>) -> Option<IpAddr> {
    request.remote_addr().map(|a| a.ip())
}
