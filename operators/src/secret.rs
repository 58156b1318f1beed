//! Secrets a stage needs (the pseudonymization secret, the key of differentially private
//! noise): read from an environment variable or a file, never from the config itself.
//!
//! A secret file must be readable by its owner only (mode `0600` or stricter) and lie in a
//! directory that nobody else can write to (anyone who can write the directory can replace
//! the file). Created files get 32 random bytes, mode `0600`, in a directory created `0700`.

use serde::Deserialize;

use crate::{EnvString, PlanError};

/// Where a secret comes from, in YAML: exactly one of `secret_env` and `secret_file`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretConfig {
    /// An environment variable holding the secret (at least 32 bytes).
    #[serde(default)]
    pub secret_env: Option<String>,
    /// A file holding the secret (at least 32 bytes, mode `0600`).
    #[serde(default)]
    pub secret_file: Option<EnvString>,
    /// Create `secret_file` with 32 random bytes (mode 0600) if it does not exist. For
    /// single-machine set-ups; a fleet shares one provisioned secret. Default false.
    #[serde(default)]
    pub create_secret_file: bool,
}

impl SecretConfig {
    /// Reads the secret; problems are reported at `key` (the config key of this block).
    pub fn load(&self, key: &str) -> Result<Vec<u8>, PlanError> {
        load_secret(self.secret_env.as_deref(), self.secret_file.as_ref(), self.create_secret_file, key)
    }

    /// Whether the secret is a file that will be created when the stage is built.
    pub fn to_be_created(&self) -> bool {
        self.create_secret_file && self.secret_file.as_ref().is_some_and(|f| !std::path::Path::new(f.as_str()).exists())
    }
}

/// Reads a secret from `env` or `file` (exactly one), creating `file` when `create` is set and
/// it does not exist. A missing secret is an error, never a fallback.
pub fn load_secret(env: Option<&str>, file: Option<&EnvString>, create: bool, key: &str) -> Result<Vec<u8>, PlanError> {
    let secret = match (env, file) {
        (Some(var), None) => std::env::var(var).map(String::into_bytes).map_err(|_| {
            PlanError::new(format!("{key}.secret_env"), format!("the environment variable `{var}` is not set"))
                .with_help("export it with a secret of at least 32 bytes, e.g. `openssl rand -base64 48`")
        })?,
        (None, Some(path)) => {
            let path = path.as_str();
            let p = std::path::Path::new(path);
            let at = format!("{key}.secret_file");
            if !p.exists() && create {
                create_secret(p).map_err(|e| PlanError::new(&at, format!("cannot create `{path}`: {e}")))?;
            }
            check_permissions(p).map_err(|m| PlanError::new(&at, m))?;
            std::fs::read(p).map_err(|e| {
                PlanError::new(&at, format!("cannot read the secret file `{path}`: {e}"))
                    .with_help("provision it, or set `create_secret_file: true` on a single machine")
            })?
        }
        _ => return Err(PlanError::new(key, "give exactly one of `secret_env` and `secret_file`")),
    };
    if secret.len() < citystream_schemas::privacy::MIN_SECRET_BYTES {
        return Err(PlanError::new(
            key,
            format!(
                "the secret is {} bytes; at least {} are needed",
                secret.len(),
                citystream_schemas::privacy::MIN_SECRET_BYTES
            ),
        ));
    }
    Ok(secret)
}

/// Refuses a secret file that others can read or a directory that others can write.
#[cfg(unix)]
pub fn check_permissions(path: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read the secret file `{}`: {e}", path.display()))?;
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "the secret file `{}` is accessible to other users (mode {:o}); run `chmod 600` on it",
            path.display(),
            meta.mode() & 0o777
        ));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let dmeta = std::fs::metadata(dir).map_err(|e| format!("cannot read the directory `{}`: {e}", dir.display()))?;
    // a sticky directory (/tmp) lets nobody replace another user's file
    if dmeta.mode() & 0o022 != 0 && dmeta.mode() & 0o1000 == 0 {
        return Err(format!(
            "the directory `{}` of the secret file can be written by other users (mode {:o}), who could replace \
             the secret; run `chmod go-w` on it",
            dir.display(),
            dmeta.mode() & 0o777
        ));
    }
    Ok(())
}

/// Refuses a secret file that others can read or a directory that others can write.
#[cfg(not(unix))]
pub fn check_permissions(_: &std::path::Path) -> Result<(), String> {
    Ok(())
}

fn create_secret(path: &std::path::Path) -> std::io::Result<()> {
    use std::io::{Read, Write};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        let mut b = std::fs::DirBuilder::new();
        b.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
        b.create(dir)?;
    }
    let mut secret = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut secret)?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path)?;
    f.write_all(&secret)?;
    f.sync_all()
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn file(p: &std::path::Path) -> EnvString {
        EnvString::literal(p.to_str().unwrap())
    }

    #[test]
    fn creates_reads_and_refuses_loose_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/secret.key");
        let s = load_secret(None, Some(&file(&path)), true, "noise_key").unwrap();
        assert_eq!(s.len(), 32);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(load_secret(None, Some(&file(&path)), false, "noise_key").unwrap(), s, "read again");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_secret(None, Some(&file(&path)), false, "noise_key").unwrap_err();
        assert!(e.message.contains("accessible to other users") && e.key == "noise_key.secret_file", "{e:?}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(path.parent().unwrap(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = load_secret(None, Some(&file(&path)), false, "noise_key").unwrap_err();
        assert!(e.message.contains("can be written by other users"), "{e:?}");
    }

    #[test]
    fn short_or_missing_secrets_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("short.key");
        std::fs::write(&path, b"too short").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(load_secret(None, Some(&file(&path)), false, "k").unwrap_err().message.contains("at least 32"));
        assert!(load_secret(None, None, false, "k").unwrap_err().message.contains("exactly one"));
        let e = load_secret(Some("CITYSTREAM_TEST_NO_SUCH_VAR"), None, false, "k").unwrap_err();
        assert_eq!(e.key, "k.secret_env");
    }
}
