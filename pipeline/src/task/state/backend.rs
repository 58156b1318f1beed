//! Where operator state is kept: a local directory (`runtime.state_dir`, or `state_url:
//! file:///…`) or S3-compatible object storage (`state_url: s3://bucket/prefix`, through the
//! `object_store` crate). The state protocol ([`super::StateStore`]) needs five things of a
//! store, all on keys relative to its root: read, replace, **create only if absent** (exactly
//! one of several writers wins; the others learn they lost), list one level, delete a prefix.
//!
//! The local backend is the filesystem itself rather than `object_store`'s local one, because
//! state must survive a power cut: every write is fsynced before it is renamed (or, for a
//! create, hard-linked) into place, and the directory after it. On S3 a create is a `PUT` with
//! `If-None-Match: *`, which the server refuses with 412 when the key exists.
//!
//! `object_store` is async and the state protocol is called from sources' threads and stages'
//! tasks alike, so the object backend runs its requests on a runtime of its own (one thread)
//! and the caller waits for the answer: the same blocking a local fsync costs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path as Key;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};

/// A parsed `runtime.state_url` (or `state_dir`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateUrl {
    /// A local directory.
    Local(PathBuf),
    /// `s3://bucket/prefix`: credentials, region and endpoint come from the standard `AWS_*`
    /// environment variables (`AWS_ENDPOINT_URL` and `AWS_ALLOW_HTTP=true` for a server of
    /// your own).
    S3 {
        /// The bucket.
        bucket: String,
        /// The key prefix under which this pipeline's state lives (may be empty).
        prefix: String,
    },
}

impl StateUrl {
    /// Parses `file:///absolute/dir` or `s3://bucket[/prefix]`.
    pub fn parse(url: &str) -> Result<Self, String> {
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(format!(
                    "`{url}`: a file URL needs an absolute path (`file:///var/lib/citystream/state`); for a relative \
                     one use `state_dir`"
                ));
            }
            return Ok(StateUrl::Local(PathBuf::from(path)));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!("`{url}`: no bucket (`s3://bucket/prefix`)"));
            }
            let prefix = prefix.trim_matches('/');
            if prefix.split('/').any(|p| p == "." || p == "..") || prefix.contains("//") {
                return Err(format!("`{url}`: the prefix has an empty, `.` or `..` part"));
            }
            return Ok(StateUrl::S3 { bucket: bucket.to_owned(), prefix: prefix.to_owned() });
        }
        Err(format!("`{url}`: state URLs are `file:///absolute/dir` or `s3://bucket/prefix`"))
    }
}

impl StateUrl {
    /// The state under directory `dir` of this one (a task's: `task-3`).
    pub fn child(&self, dir: &str) -> StateUrl {
        match self {
            StateUrl::Local(root) => StateUrl::Local(root.join(dir)),
            StateUrl::S3 { bucket, prefix } if prefix.is_empty() => {
                StateUrl::S3 { bucket: bucket.clone(), prefix: dir.to_owned() }
            }
            StateUrl::S3 { bucket, prefix } => {
                StateUrl::S3 { bucket: bucket.clone(), prefix: format!("{prefix}/{dir}") }
            }
        }
    }
}

impl std::fmt::Display for StateUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateUrl::Local(dir) => write!(f, "{}", dir.display()),
            StateUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            StateUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// What a store refused.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The local disk.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The object store (network, credentials, the server); boxed: it is large.
    #[error("{0}")]
    Object(Box<object_store::Error>),
}

impl From<object_store::Error> for StoreError {
    fn from(e: object_store::Error) -> Self {
        StoreError::Object(Box::new(e))
    }
}

/// An open store.
#[derive(Debug)]
pub(super) enum Backend {
    Local(PathBuf),
    Object { store: Arc<dyn ObjectStore>, prefix: String, io: IoRuntime },
}

/// The object backend's own runtime; shut down without blocking (it may be dropped on a
/// runtime thread).
#[derive(Debug)]
pub(super) struct IoRuntime(Option<tokio::runtime::Runtime>);

impl Drop for IoRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl IoRuntime {
    /// Runs `f` on the store's runtime and waits for it (from any thread, async or not).
    fn run<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.0.as_ref().expect("runtime").spawn(async move {
            let _ = tx.send(f.await);
        });
        rx.recv().expect("the state store's runtime stopped")
    }
}

impl Backend {
    pub(super) fn open(url: &StateUrl) -> Result<Self, StoreError> {
        match url {
            StateUrl::Local(dir) => {
                std::fs::create_dir_all(dir)?;
                Ok(Backend::Local(dir.clone()))
            }
            StateUrl::S3 { bucket, prefix } => {
                let store = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket).build()?;
                let io = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("state-io")
                    .enable_all()
                    .build()?;
                Ok(Backend::Object { store: Arc::new(store), prefix: prefix.clone(), io: IoRuntime(Some(io)) })
            }
        }
    }

    /// Where `key` lives, for messages.
    pub(super) fn location(&self, key: &str) -> String {
        match self {
            Backend::Local(dir) => dir.join(key).display().to_string(),
            Backend::Object { store, prefix, .. } => format!("{store}/{}", object_key(prefix, key)),
        }
    }

    /// The bytes at `key`, or `None` if there is nothing.
    pub(super) fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Backend::Local(dir) => match std::fs::read(dir.join(key)) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e.into()),
            },
            Backend::Object { store, prefix, io } => {
                let (store, key) = (store.clone(), object_key(prefix, key));
                io.run(async move {
                    match store.get_opts(&key, Default::default()).await {
                        Ok(r) => Ok(Some(r.bytes().await?.to_vec())),
                        Err(object_store::Error::NotFound { .. }) => Ok(None),
                        Err(e) => Err(e.into()),
                    }
                })
            }
        }
    }

    /// Writes `body` at `key`, replacing what was there, durably.
    pub(super) fn put(&self, key: &str, body: Vec<u8>) -> Result<(), StoreError> {
        match self {
            Backend::Local(dir) => {
                let path = dir.join(key);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                Ok(crate::atomic_file::write_atomic(&path, &body)?)
            }
            Backend::Object { store, prefix, io } => {
                let (store, key) = (store.clone(), object_key(prefix, key));
                io.run(async move {
                    store.put_opts(&key, PutPayload::from(body), PutOptions::default()).await?;
                    Ok(())
                })
            }
        }
    }

    /// Writes `body` at `key` only if nothing is there: `false` if something was (another
    /// writer won).
    pub(super) fn create(&self, key: &str, body: Vec<u8>) -> Result<bool, StoreError> {
        match self {
            Backend::Local(dir) => create_local(&dir.join(key), &body),
            Backend::Object { store, prefix, io } => {
                let (store, key) = (store.clone(), object_key(prefix, key));
                io.run(async move {
                    let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
                    match store.put_opts(&key, PutPayload::from(body), opts).await {
                        Ok(_) => Ok(true),
                        Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
                        Err(e) => Err(e.into()),
                    }
                })
            }
        }
    }

    /// The names directly under `dir` (files and directories), sorted.
    pub(super) fn list(&self, dir: &str) -> Result<Vec<String>, StoreError> {
        let mut names = match self {
            Backend::Local(root) => match std::fs::read_dir(root.join(dir)) {
                Ok(rd) => {
                    rd.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| !n.starts_with('.')).collect()
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(e.into()),
            },
            Backend::Object { store, prefix, io } => {
                let (store, key) = (store.clone(), object_key(prefix, dir));
                io.run(async move {
                    let r = store.list_with_delimiter(Some(&key)).await?;
                    let objects = r.objects.into_iter().map(|o| o.location);
                    Ok::<_, StoreError>(
                        objects.chain(r.common_prefixes).filter_map(|p| p.filename().map(str::to_owned)).collect(),
                    )
                })?
            }
        };
        names.sort();
        Ok(names)
    }

    /// Removes `key` and everything under it.
    pub(super) fn delete_all(&self, key: &str) -> Result<(), StoreError> {
        match self {
            Backend::Local(root) => {
                let path = root.join(key);
                let r = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
                match r {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
                    _ => Ok(()),
                }
            }
            Backend::Object { store, prefix, io } => {
                let (store, key) = (store.clone(), object_key(prefix, key));
                io.run(async move {
                    let under = store.list(Some(&key)).map_ok(|m| m.location);
                    let exact = futures_util::stream::iter([Ok(key.clone())]);
                    store.delete_stream(exact.chain(under).boxed()).try_for_each(|_| async { Ok(()) }).await.or_else(
                        |e| match e {
                            object_store::Error::NotFound { .. } => Ok(()),
                            e => Err(e.into()),
                        },
                    )
                })
            }
        }
    }
}

/// `key` under the store's `prefix`.
fn object_key(prefix: &str, key: &str) -> Key {
    if prefix.is_empty() { Key::from(key) } else { Key::from(format!("{prefix}/{key}")) }
}

/// Creates `path` with `body` unless it exists: written and fsynced under a hidden name, then
/// hard-linked into place (the link fails if the name is taken, atomically), directory fsynced.
fn create_local(path: &Path, body: &[u8]) -> Result<bool, StoreError> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("x");
    // a random part: two containers sharing the directory may both be PID 1
    let tmp = dir.join(format!(".{name}.{}.create", super::new_id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(body)?;
    f.sync_all()?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            std::fs::File::open(dir)?.sync_all()?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_urls_parse_with_clear_errors() {
        assert_eq!(StateUrl::parse("file:///var/state").unwrap(), StateUrl::Local("/var/state".into()));
        assert_eq!(
            StateUrl::parse("s3://city/state/north/").unwrap(),
            StateUrl::S3 { bucket: "city".into(), prefix: "state/north".into() }
        );
        assert_eq!(StateUrl::parse("s3://city").unwrap(), StateUrl::S3 { bucket: "city".into(), prefix: "".into() });
        assert_eq!(StateUrl::parse("s3://city/a/b").unwrap().to_string(), "s3://city/a/b");
        for (bad, why) in [
            ("file://state", "absolute path"),
            ("s3:///x", "no bucket"),
            ("s3://b/a/../c", "`..`"),
            ("gs://b/x", "`s3://bucket/prefix`"),
            ("/var/state", "`file:///absolute/dir`"),
        ] {
            let e = StateUrl::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn a_local_create_is_won_once() {
        let dir = tempfile::tempdir().unwrap();
        let b = Backend::open(&StateUrl::Local(dir.path().into())).unwrap();
        assert!(b.create("m/1.json", b"first".to_vec()).unwrap());
        assert!(!b.create("m/1.json", b"second".to_vec()).unwrap());
        assert_eq!(b.get("m/1.json").unwrap().unwrap(), b"first");
        assert_eq!(b.get("m/2.json").unwrap(), None);
        b.put("s/3-w/a.arrow", b"x".to_vec()).unwrap();
        assert_eq!(b.list("").unwrap(), ["m", "s"]);
        assert_eq!(b.list("m").unwrap(), ["1.json"], "no temporary file is left");
        b.delete_all("s/3-w").unwrap();
        b.delete_all("s/9-w").unwrap();
        assert_eq!(b.list("s").unwrap(), Vec::<String>::new());
    }
}
