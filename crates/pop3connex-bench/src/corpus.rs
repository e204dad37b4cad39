//! Deterministic test messages: the same seed, count and size always give the same bytes.

use anyhow::{bail, Context, Result};
use std::path::Path;

const WORDS: &[&str] = &[
    "the", "mail", "server", "message", "account", "delivery", "protocol", "secure", "client", "inbox", "report",
    "meeting", "invoice", "project", "schedule", "review", "update", "please", "thanks", "regards", "attached",
    "document", "tomorrow", "morning", "quarter", "budget", "release", "version", "notes", "question", "answer",
    "team", "office", "travel", "system", "network", "password", "storage", "backup", "service", "customer", "order",
    "shipping", "payment", "support", "ticket", "status", "pending", "approved", "draft", "final", "summary", "a",
    "of", "to", "and", "in", "for", "on", "with", "is", "we", "you", "it",
];

/// xorshift64*: tiny, deterministic, good enough for filler text.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn word(&mut self) -> &'static str {
        WORDS[(self.next() % WORDS.len() as u64) as usize]
    }
}

/// Fills a line of exactly `len` characters with words (no leading '.', no leading space).
fn fill_line(rng: &mut Rng, len: usize, out: &mut Vec<u8>) {
    let start = out.len();
    while out.len() - start < len {
        if out.len() > start {
            out.push(b' ');
        }
        out.extend_from_slice(rng.word().as_bytes());
    }
    out.truncate(start + len);
    if let Some(last) = out.last_mut() {
        if *last == b' ' {
            *last = b'x';
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// Message number `index` of a corpus: an RFC 5322 text/plain message of exactly `size` octets
/// with CRLF line endings. No line starts with '.', so it needs no dot-stuffing.
pub fn message(seed: u64, index: u64, size: usize) -> Result<Vec<u8>> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (index + 1) ^ 0xA5A5_5A5A);
    for _ in 0..4 {
        rng.next();
    }
    let subject: Vec<&str> = (0..5).map(|_| rng.word()).collect();
    let mut out = format!(
        "From: Bench Sender <sender{s}@bench.invalid>\r\n\
         To: Bench Recipient <rcpt@bench.invalid>\r\n\
         Subject: [bench {index}] {subj}\r\n\
         Date: Mon, 01 Jan 2024 {h:02}:{m:02}:{sec:02} +0000\r\n\
         Message-ID: <bench-{seed}-{index}@bench.invalid>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         Content-Transfer-Encoding: 7bit\r\n\
         \r\n",
        s = index % 97,
        subj = subject.join(" "),
        h = (index / 3600) % 24,
        m = (index / 60) % 60,
        sec = index % 60,
    )
    .into_bytes();
    let min = out.len() + 160;
    if size < min {
        bail!("message size {size} too small (minimum {min})");
    }
    // Body lines of 60..=72 characters, then two final lines that land exactly on `size`.
    while size - out.len() > 150 {
        let len = 60 + (rng.next() % 13) as usize;
        fill_line(&mut rng, len, &mut out);
    }
    let rest = size - out.len(); // 77..=150
    let first = rest / 2;
    fill_line(&mut rng, first - 2, &mut out);
    fill_line(&mut rng, rest - first - 2, &mut out);
    debug_assert_eq!(out.len(), size);
    Ok(out)
}

/// Writes `count` messages as DIR/msg-NNNNN.eml.
pub fn write_corpus(dir: &Path, seed: u64, count: u64, size: usize) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for i in 0..count {
        let path = dir.join(format!("msg-{i:05}.eml"));
        std::fs::write(&path, message(seed, i, size)?).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Reads every `*.eml` file of DIR in name order.
pub fn read_corpus(dir: &Path) -> Result<Vec<Vec<u8>>> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "eml"))
        .collect();
    names.sort();
    if names.is_empty() {
        bail!("{}: no .eml files", dir.display());
    }
    names.iter().map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display()))).collect()
}

/// SMTP/LMTP DATA transparency (RFC 5321 4.5.2): a line starting with '.' gets one more '.'.
/// Also guarantees a final CRLF.
pub fn dot_stuff(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + 16);
    let mut at_line_start = true;
    for &b in msg {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_size_and_deterministic() {
        for size in [600usize, 1000, 4400, 4401, 65536] {
            for i in 0..20 {
                let m = message(7, i, size).unwrap();
                assert_eq!(m.len(), size);
                assert_eq!(m, message(7, i, size).unwrap());
                assert!(m.ends_with(b"\r\n"));
                for line in m.split(|&b| b == b'\n') {
                    assert!(!line.starts_with(b"."));
                    assert!(line.len() < 998);
                }
                assert_eq!(dot_stuff(&m), m);
            }
        }
        assert_ne!(message(7, 1, 4400).unwrap(), message(7, 2, 4400).unwrap());
        assert!(message(7, 1, 100).is_err());
    }

    #[test]
    fn stuffing() {
        assert_eq!(dot_stuff(b".a\r\nb\r\n..c"), b"..a\r\nb\r\n...c\r\n");
    }
}
