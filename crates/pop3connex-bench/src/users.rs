//! Credential and recipient list files.

use anyhow::{bail, Context, Result};
use std::path::Path;

/// One POP3 account: `name:password` in the users file.
#[derive(Clone)]
pub struct User {
    pub name: String,
    pub password: String,
}

/// Reads `name:password` lines (split at the first ':'); blank lines and `#` comments are skipped.
pub fn load_users(path: &Path) -> Result<Vec<User>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut users = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, password)) = line.split_once(':') else {
            bail!("{}:{}: expected name:password", path.display(), n + 1);
        };
        users.push(User { name: name.to_owned(), password: password.to_owned() });
    }
    if users.is_empty() {
        bail!("{}: no users", path.display());
    }
    Ok(users)
}

/// Reads one recipient address per line; blank lines and `#` comments are skipped.
pub fn load_recipients(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let rcpts: Vec<String> =
        text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned).collect();
    if rcpts.is_empty() {
        bail!("{}: no recipients", path.display());
    }
    Ok(rcpts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_users() {
        let dir = std::env::temp_dir().join(format!("bench-users-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("u");
        std::fs::write(&f, "# c\nalice:pw:with:colons\r\n\nbob:x\n").unwrap();
        let u = load_users(&f).unwrap();
        assert_eq!(u.len(), 2);
        assert_eq!(u[0].name, "alice");
        assert_eq!(u[0].password, "pw:with:colons");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
