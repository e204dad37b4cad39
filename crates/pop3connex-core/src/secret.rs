//! Secret references: how every credential or key in the configuration is
//! named without being written down.
//!
//! A reference is `env:NAME` (an environment variable) or `file:PATH` (a file
//! that must not be readable by "other"). A `vault:` scheme joins later; it is
//! a new variant here and nothing else changes for callers. Literal secrets
//! are rejected at parse time so they cannot end up in a config file, a
//! backup of it, or a log line that prints it.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// Where a secret lives. `Debug`/`Display` show the reference, never the value.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretRef {
    Env(String),
    File(PathBuf),
}

/// Why a secret could not be parsed or loaded. Never contains the secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("not a secret reference: use env:NAME or file:/path (literal secrets are not allowed)")]
    NotAReference,
    #[error("invalid environment variable name in secret reference")]
    BadEnvName,
    #[error("environment variable {0} is not set")]
    EnvMissing(String),
    #[error("cannot read secret file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("secret file {0} is readable or writable by other users (mode {1:o}); run: chmod 600 {0}")]
    WorldAccessible(PathBuf, u32),
    #[error("secret {0} is empty")]
    Empty(String),
}

impl SecretRef {
    /// Parses `env:NAME` or `file:PATH`.
    pub fn parse(s: &str) -> Result<Self, SecretError> {
        if let Some(name) = s.strip_prefix("env:") {
            let ok = !name.is_empty()
                && name.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit());
            if !ok {
                return Err(SecretError::BadEnvName);
            }
            return Ok(SecretRef::Env(name.to_owned()));
        }
        if let Some(path) = s.strip_prefix("file:") {
            if path.is_empty() {
                return Err(SecretError::NotAReference);
            }
            return Ok(SecretRef::File(PathBuf::from(path)));
        }
        Err(SecretError::NotAReference)
    }

    /// Makes a relative `file:` path relative to `base` (the config's folder).
    pub fn resolve_against(&mut self, base: &Path) {
        if let SecretRef::File(p) = self {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// Reads the secret. File secrets must not be accessible to "other".
    pub fn load(&self) -> Result<Zeroizing<Vec<u8>>, SecretError> {
        let value = match self {
            SecretRef::Env(name) => Zeroizing::new(
                std::env::var_os(name).ok_or_else(|| SecretError::EnvMissing(name.clone()))?.into_encoded_bytes(),
            ),
            SecretRef::File(path) => {
                let io = |source| SecretError::Io { path: path.clone(), source };
                let meta = std::fs::metadata(path).map_err(io)?;
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o007 != 0 {
                    return Err(SecretError::WorldAccessible(path.clone(), mode));
                }
                Zeroizing::new(std::fs::read(path).map_err(io)?)
            }
        };
        if value.iter().all(u8::is_ascii_whitespace) {
            return Err(SecretError::Empty(self.to_string()));
        }
        Ok(value)
    }
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::Env(n) => write!(f, "env:{n}"),
            SecretRef::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

impl fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl TryFrom<String> for SecretRef {
    type Error = SecretError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        SecretRef::parse(&s)
    }
}

impl<'de> serde::Deserialize<'de> for SecretRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SecretRef::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn parses_references_and_refuses_literals() {
        assert_eq!(SecretRef::parse("env:MASTER_KEY").unwrap(), SecretRef::Env("MASTER_KEY".into()));
        assert_eq!(SecretRef::parse("file:/etc/k").unwrap(), SecretRef::File("/etc/k".into()));
        for bad in ["hunter2", "env:", "env:lower", "env:1X", "file:", "vault:x"] {
            assert!(SecretRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn refuses_world_readable_file() {
        let dir = std::env::temp_dir().join(format!("p3x-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(b"abc").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let r = SecretRef::File(path.clone());
        let err = r.load().unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        assert!(!err.contains("abc"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(&**r.load().unwrap(), b"abc");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
