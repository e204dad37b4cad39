//! Client side of SCRAM-SHA-256 (RFC 5802, RFC 7677), without channel binding (`n,,`).
//!
//! The PBKDF2 salted password is cached per (password, salt, iterations) for the life of the
//! process: the load generator must stay cheap, so only the first login of each user pays for
//! the 4096 (or whatever the server announces) PBKDF2 iterations on the client side. The server
//! side still does its full work on every login. `pbkdf2_runs()` reports how many were computed.

use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

type HmacSha256 = Hmac<Sha256>;

static PBKDF2_RUNS: AtomicU64 = AtomicU64::new(0);
static NONCE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// ClientKey and ServerKey derived from one salted password.
#[derive(Clone, Copy)]
struct Keys {
    client_key: [u8; 32],
    server_key: [u8; 32],
}

/// (password, salt, iterations) -> keys.
type CacheKey = (String, Vec<u8>, u32);

thread_local! {
    static CACHE: RefCell<HashMap<CacheKey, Keys>> = RefCell::new(HashMap::new());
}

pub fn pbkdf2_runs() -> u64 {
    PBKDF2_RUNS.load(Ordering::Relaxed)
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    m.update(data);
    m.finalize().into_bytes().into()
}

fn keys(password: &str, salt: &[u8], iterations: u32) -> Keys {
    let k = (password.to_owned(), salt.to_vec(), iterations);
    if let Some(v) = CACHE.with(|c| c.borrow().get(&k).copied()) {
        return v;
    }
    let mut salted = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, iterations, &mut salted);
    PBKDF2_RUNS.fetch_add(1, Ordering::Relaxed);
    let v = Keys { client_key: hmac(&salted, b"Client Key"), server_key: hmac(&salted, b"Server Key") };
    CACHE.with(|c| c.borrow_mut().insert(k, v));
    v
}

/// A fresh printable client nonce (no ','), without a random number generator crate: SHA-256 of
/// the process id, the clock and a counter. Uniqueness is all the benchmark needs.
fn nonce() -> String {
    let n = NONCE_COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let mut h = Sha256::new();
    h.update(std::process::id().to_le_bytes());
    h.update(t.to_le_bytes());
    h.update(n.to_le_bytes());
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(&h.finalize()[..18])
}

fn sasl_name(user: &str) -> String {
    user.replace('=', "=3D").replace(',', "=2C")
}

/// One exchange in progress.
pub struct ScramClient {
    password: String,
    nonce: String,
    client_first_bare: String,
    server_signature: Option<[u8; 32]>,
}

impl ScramClient {
    pub fn new(user: &str, password: &str) -> Self {
        let nonce = nonce();
        let client_first_bare = format!("n={},r={nonce}", sasl_name(user));
        Self { password: password.to_owned(), nonce, client_first_bare, server_signature: None }
    }

    /// client-first-message (gs2 header `n,,`: no channel binding).
    pub fn client_first(&self) -> String {
        format!("n,,{}", self.client_first_bare)
    }

    /// Takes server-first-message, returns client-final-message.
    pub fn client_final(&mut self, server_first: &str) -> Result<String> {
        let (mut r, mut s, mut i) = (None, None, None);
        for attr in server_first.split(',') {
            match attr.split_once('=') {
                Some(("r", v)) => r = Some(v),
                Some(("s", v)) => s = Some(v),
                Some(("i", v)) => i = Some(v),
                Some(("m", _)) => bail!("server-first: unsupported mandatory extension"),
                _ => {}
            }
        }
        let r = r.context("server-first: no r=")?;
        if !r.starts_with(&self.nonce) || r.len() <= self.nonce.len() {
            bail!("server-first: nonce does not extend the client nonce");
        }
        let salt = B64.decode(s.context("server-first: no s=")?).context("server-first: bad salt")?;
        let iterations: u32 = i.context("server-first: no i=")?.parse().context("server-first: bad i=")?;
        if iterations == 0 {
            bail!("server-first: i=0");
        }
        let k = keys(&self.password, &salt, iterations);
        let without_proof = format!("c=biws,r={r}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let stored_key: [u8; 32] = Sha256::digest(k.client_key).into();
        let client_signature = hmac(&stored_key, auth_message.as_bytes());
        let mut proof = k.client_key;
        for (p, s) in proof.iter_mut().zip(client_signature) {
            *p ^= s;
        }
        self.server_signature = Some(hmac(&k.server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks server-final-message (`v=`).
    pub fn verify_server_final(&self, server_final: &str) -> Result<()> {
        if let Some(e) = server_final.strip_prefix("e=") {
            bail!("server-final: error {e}");
        }
        let v = server_final.split(',').find_map(|a| a.strip_prefix("v=")).context("server-final: no v=")?;
        let v = B64.decode(v).context("server-final: bad v=")?;
        match &self.server_signature {
            Some(expected) if v.as_slice() == expected.as_slice() => Ok(()),
            _ => bail!("server-final: wrong server signature"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677 section 3 test vector.
    #[test]
    fn rfc7677_vector() {
        let mut c = ScramClient::new("user", "pencil");
        c.nonce = "rOprNGfwEbeRWgbNEkqO".into();
        c.client_first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO".into();
        let fin = c
            .client_final("r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
            .unwrap();
        assert_eq!(
            fin,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        c.verify_server_final("v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=").unwrap();
        assert!(c.verify_server_final("v=AAAA").is_err());
    }
}
