//! Who may do what: bearer tokens with a role and a name, and rate limits.
//!
//! Tokens come from a file or an environment variable, never the YAML: one `role name token`
//! entry per line (or `;`-separated), role `viewer` (read) or `operator` (read and decide);
//! the name is who acts, and a decision records it. Requests are rate-limited per token, and
//! failed attempts per client address; the limiter forgets keys whose budget is full again, so
//! its memory stays bounded however many addresses try.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::config::ControlConfig;
use super::routes::error;

/// Why the tokens cannot be loaded (the control center, or the Flight SQL server, does not
/// start).
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    /// An entry is not `role name token`.
    #[error("token entry {entry}: expected `role name token`")]
    Shape {
        /// The entry's number (1-based).
        entry: usize,
    },
    /// An entry names a role that does not exist.
    #[error("token entry {entry}: unknown role `{role}` (viewer or operator)")]
    Role {
        /// The entry's number (1-based).
        entry: usize,
        /// The role written.
        role: String,
    },
    /// An entry's name has characters a decision record does not take.
    #[error("token entry {entry}: name `{name}`: 1 to 64 characters of letters, digits and . _ @ -")]
    Name {
        /// The entry's number (1-based).
        entry: usize,
        /// The name written.
        name: String,
    },
    /// A token is too short to be a secret.
    #[error("token entry {entry}: tokens need at least 16 characters")]
    Short {
        /// The entry's number (1-based).
        entry: usize,
    },
    /// There are no tokens at all.
    #[error("no tokens: the control center would refuse every request")]
    Empty,
    /// The tokens file cannot be read, created or written.
    #[error("{action} `{}`: {source}", path.display())]
    Io {
        /// What failed, e.g. `reading tokens_file`.
        action: &'static str,
        /// The file (or its directory).
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The tokens file is readable by others.
    #[error("tokens_file: {0}")]
    Permissions(String),
    /// `tokens_env` names a variable that is not set.
    #[error("tokens_env: the environment variable `{0}` is not set")]
    NotSet(String),
    /// Neither or both of `tokens_file` and `tokens_env` are set.
    #[error("set exactly one of `tokens_file` and `tokens_env` (tokens never go in the YAML)")]
    NoSource,
}

/// A role a token grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Reads alerts, the map, health and the stream.
    Viewer,
    /// Also acknowledges, resolves and marks false alarms.
    Operator,
}

/// What a token stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// What it may do.
    pub role: Role,
    /// Who it is (recorded with every decision).
    pub name: String,
}

/// Parses `role name token` entries (one per line or `;`-separated; `#` starts a comment). An
/// older `role token` entry is accepted, named after its role and its place in the list
/// (`operator-2`).
pub fn parse_tokens(text: &str) -> Result<HashMap<String, Identity>, TokensError> {
    let mut out = HashMap::new();
    for (n, entry) in text.split(['\n', ';']).enumerate() {
        let entry = entry.split('#').next().unwrap_or("").trim();
        if entry.is_empty() {
            continue;
        }
        let parts: Vec<&str> = entry.split_whitespace().collect();
        let entry = n + 1;
        let (role, name, token) = match parts.as_slice() {
            [role, name, token] => (*role, (*name).to_owned(), *token),
            [role, token] => (*role, format!("{role}-{entry}"), *token),
            _ => return Err(TokensError::Shape { entry }),
        };
        let role = match role {
            "viewer" => Role::Viewer,
            "operator" => Role::Operator,
            other => return Err(TokensError::Role { entry, role: other.to_owned() }),
        };
        if !valid_name(&name) {
            return Err(TokensError::Name { entry, name });
        }
        if token.len() < 16 {
            return Err(TokensError::Short { entry });
        }
        out.insert(token.to_owned(), Identity { role, name });
    }
    if out.is_empty() {
        return Err(TokensError::Empty);
    }
    Ok(out)
}

/// A name recorded with decisions: 1 to 64 letters, digits and `. _ @ -`.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c))
}

impl ControlConfig {
    /// Loads the tokens from the file or the environment.
    pub fn tokens(&self) -> Result<HashMap<String, Identity>, TokensError> {
        match (&self.tokens_file, &self.tokens_env) {
            (Some(f), None) => {
                let path = std::path::Path::new(f.as_str());
                if self.create_tokens_file && !path.exists() {
                    create_tokens_file(path)?;
                    tracing::info!(file = f.as_str(), "control center: created a viewer and an operator token");
                }
                citystream_operators::secret::check_permissions(path).map_err(TokensError::Permissions)?;
                let io = |source| TokensError::Io { action: "reading tokens_file", path: path.to_owned(), source };
                parse_tokens(&std::fs::read_to_string(path).map_err(io)?)
            }
            (None, Some(v)) => parse_tokens(&std::env::var(v).map_err(|_| TokensError::NotSet(v.clone()))?),
            _ => Err(TokensError::NoSource),
        }
    }
}

fn create_tokens_file(path: &std::path::Path) -> Result<(), TokensError> {
    use base64::Engine;
    use rand::Rng;
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let token = || base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::rng().random::<[u8; 24]>());
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|source| TokensError::Io {
            action: "creating",
            path: dir.to_owned(),
            source,
        })?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| TokensError::Io { action: "creating tokens_file", path: path.to_owned(), source })?;
    writeln!(
        f,
        "# citystream control-center tokens: `role name token` per line (roles viewer, operator)\nviewer viewer-1 {}\noperator operator-1 {}",
        token(),
        token()
    )
    .and_then(|()| f.sync_all())
    .map_err(|source| TokensError::Io { action: "writing tokens_file", path: path.to_owned(), source })
}

/// Tokens and rate limits.
#[derive(Clone)]
pub(crate) struct Guard {
    tokens: Arc<HashMap<String, Identity>>,
    limiter: Arc<DefaultKeyedRateLimiter<String>>,
}

impl Guard {
    pub(crate) fn new(tokens: HashMap<String, Identity>, per_minute: NonZeroU32) -> Self {
        Self { tokens: Arc::new(tokens), limiter: Arc::new(RateLimiter::keyed(Quota::per_minute(per_minute))) }
    }

    /// Checks the bearer token (or `?token=` where `query_token` is allowed), the role and the
    /// rate; returns who is asking.
    pub(crate) fn authorize(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
        peer: SocketAddr,
        need: Role,
    ) -> Result<Identity, Box<Response>> {
        let bearer = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let token = bearer.or(query_token);
        let Some((token, who)) = token.and_then(|t| self.tokens.get(t).map(|w| (t, w))) else {
            // failed attempts are limited per client address, so guessing is slow
            if self.limiter.check_key(&format!("ip:{}", peer.ip())).is_err() {
                return Err(Box::new(error(StatusCode::TOO_MANY_REQUESTS, "too many requests")));
            }
            return Err(Box::new(error(StatusCode::UNAUTHORIZED, "a valid bearer token is required")));
        };
        if self.limiter.check_key(&format!("token:{token}")).is_err() {
            return Err(Box::new(error(StatusCode::TOO_MANY_REQUESTS, "too many requests")));
        }
        if need == Role::Operator && who.role != Role::Operator {
            return Err(Box::new(error(StatusCode::FORBIDDEN, "this token is read-only (role viewer)")));
        }
        Ok(who.clone())
    }

    /// Forgets the rate state of keys whose budget is full again (call now and then).
    pub(crate) fn forget_idle(&self) -> usize {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        self.limiter.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_who_acts() {
        let t = parse_tokens("viewer vic 0123456789abcdefgh; operator op.anna abcdefghijklmnop0\n# c\n").unwrap();
        assert_eq!(t["abcdefghijklmnop0"], Identity { role: Role::Operator, name: "op.anna".into() });
        let legacy = parse_tokens("viewer 0123456789abcdef-one; operator 0123456789abcdef-two").unwrap();
        assert_eq!(legacy["0123456789abcdef-two"].name, "operator-2");
        assert!(parse_tokens("operator a b c d").unwrap_err().to_string().contains("expected `role name token`"));
        let e = parse_tokens("operator bad!name 0123456789abcdefgh").unwrap_err();
        assert!(matches!(&e, TokensError::Name { entry: 1, name } if name == "bad!name"), "{e:?}");
        assert!(parse_tokens("admin short").unwrap_err().to_string().contains("unknown role"));
    }

    #[test]
    fn the_limiter_forgets_addresses_whose_budget_is_full_again() {
        let g = Guard::new(HashMap::new(), NonZeroU32::new(6000).unwrap());
        for i in 0..500 {
            let peer: SocketAddr = format!("10.0.{}.{}:1", i / 250, i % 250).parse().unwrap();
            assert!(g.authorize(&HeaderMap::new(), None, peer, Role::Viewer).is_err());
        }
        assert!(g.limiter.len() >= 500);
        // 6000 a minute: each key's one cell is replenished within 10 ms
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(g.forget_idle(), 0, "nothing is kept for addresses that stopped");
    }
}
