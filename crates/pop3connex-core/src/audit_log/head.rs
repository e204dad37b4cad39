//! The head file: the newest seq and MAC of the chain, tagged with a key
//! derived from the master key, next to the database.
//!
//! Deleting the newest records leaves a chain that verifies by itself; the
//! head file says how long it was. It is rewritten after every append,
//! atomically (temporary file, fsync, rename, fsync of the directory), and
//! appends take an exclusive `flock` on a lock file beside it, so the
//! server and CLI commands append and update the head one at a time.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::chain::AuditKeys;

/// Largest head file read (it holds one short line).
const MAX_HEAD_BYTES: u64 = 1024;
const MAGIC: &str = "pop3connex-audit-head v1";

/// What a head file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub seq: i64,
    pub mac: Vec<u8>,
}

/// The state of the head file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadState {
    Missing,
    /// Present but unreadable or with a wrong tag: edited, or written under
    /// another master key.
    Invalid(String),
    Valid(Head),
}

/// The head file of the database at `db`.
pub fn head_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(".audit-head");
    PathBuf::from(p)
}

fn lock_path(head: &Path) -> PathBuf {
    let mut p = head.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// An exclusive lock on the head file, held while appending; released on
/// drop (and by the kernel if the process dies).
pub struct HeadLock {
    _file: File,
}

/// Takes the append lock, waiting for another process that holds it
/// (blocking: call it on the blocking pool).
pub fn lock(head: &Path) -> std::io::Result<HeadLock> {
    let file = OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(lock_path(head))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)?;
    Ok(HeadLock { _file: file })
}

pub fn read(path: &Path, keys: &AuditKeys) -> std::io::Result<HeadState> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HeadState::Missing),
        Err(e) => return Err(e),
    };
    let mut text = String::new();
    use std::io::Read;
    if file.take(MAX_HEAD_BYTES).read_to_string(&mut text).is_err() {
        return Ok(HeadState::Invalid("not text".into()));
    }
    Ok(parse(&text, keys))
}

fn parse(text: &str, keys: &AuditKeys) -> HeadState {
    let Some(rest) = text.trim_end().strip_prefix(MAGIC) else {
        return HeadState::Invalid("unknown format".into());
    };
    let parts: Vec<&str> = rest.split_whitespace().collect();
    let [seq, mac, tag] = parts.as_slice() else {
        return HeadState::Invalid("malformed".into());
    };
    let (Ok(seq), Some(mac), Some(tag)) = (seq.parse::<i64>(), hex_decode(mac), hex_decode(tag)) else {
        return HeadState::Invalid("malformed".into());
    };
    if !keys.head_tag_ok(seq, &mac, &tag) {
        return HeadState::Invalid("tag does not match (edited, or another master key)".into());
    }
    HeadState::Valid(Head { seq, mac })
}

/// Replaces the head file atomically and durably.
pub fn write(path: &Path, keys: &AuditKeys, head: &Head) -> std::io::Result<()> {
    let text =
        format!("{MAGIC} {} {} {}\n", head.seq, hex_encode(&head.mac), hex_encode(&keys.head_tag(head.seq, &head.mac)));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(if dir.as_os_str().is_empty() { Path::new(".") } else { dir })?.sync_all()?;
    }
    Ok(())
}

pub fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len() / 2).map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()).collect()
}
