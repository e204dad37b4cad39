//! SCRAM-SHA-256 (RFC 5802, RFC 7677) server side, with optional
//! `tls-exporter` channel binding (RFC 9266) for SCRAM-SHA-256-PLUS.
//!
//! Sans-IO: [`ScramServer`] consumes decoded client messages and produces
//! server messages. The server stores only salt, iteration count, StoredKey
//! and ServerKey ([`ScramCredentials`], RFC 5803 text form), derived when a
//! password is set; it never needs the password at login.
//!
//! Hand-written because no maintained crate provides a server-side SCRAM
//! with RFC 9266 channel binding and downgrade detection; the primitives
//! (HMAC, SHA-256, PBKDF2, SASLprep) come from RustCrypto and `stringprep`.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Default PBKDF2 iterations for new SCRAM keys. RFC 7677's 4096 is a
/// minimum; 200,000 costs a client about 35 ms per login and makes each
/// guess against stolen keys ~50 times dearer (measurements in
/// docs/specifications.md). The server's own login work does not depend on it.
pub const DEFAULT_ITERATIONS: u32 = 200_000;
const SALT_LEN: usize = 16;
const NONCE_LEN: usize = 24;
/// Limits on what a client may send, so parsing cost stays bounded.
const MAX_MESSAGE: usize = 2048;

/// What the server stores for a user.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramCredentials {
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for ScramCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramCredentials").field("iterations", &self.iterations).finish_non_exhaustive()
    }
}

pub(crate) fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    m.update(data);
    m.finalize().into_bytes().into()
}

/// SASLprep (RFC 4013) of a password, falling back to the raw bytes for
/// strings SASLprep rejects only if they are not valid UTF-8 at all.
fn normalize(password: &[u8]) -> Option<Vec<u8>> {
    let s = std::str::from_utf8(password).ok()?;
    stringprep::saslprep(s).ok().map(|c| c.as_bytes().to_vec())
}

impl ScramCredentials {
    /// Derives credentials from a password (when it is set or verified).
    pub fn derive(password: &[u8], iterations: u32) -> Option<Self> {
        let mut salt = vec![0u8; SALT_LEN];
        getrandom::getrandom(&mut salt).ok()?;
        Self::derive_with_salt(password, salt, iterations)
    }

    fn derive_with_salt(password: &[u8], salt: Vec<u8>, iterations: u32) -> Option<Self> {
        let normalized = zeroize::Zeroizing::new(normalize(password)?);
        let mut salted = zeroize::Zeroizing::new([0u8; 32]);
        pbkdf2::pbkdf2_hmac::<Sha256>(&normalized, &salt, iterations, &mut *salted);
        let client_key = hmac(&*salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let server_key = hmac(&*salted, b"Server Key");
        Some(Self { salt, iterations, stored_key, server_key })
    }

    /// RFC 5803 form: `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn encode(&self) -> String {
        format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }

    pub fn decode(s: &str) -> Option<Self> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iter, salt) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(Self {
            salt: B64.decode(salt).ok()?,
            iterations: iter.parse().ok()?,
            stored_key: B64.decode(stored).ok()?.try_into().ok()?,
            server_key: B64.decode(server).ok()?.try_into().ok()?,
        })
    }

    /// Plausible but useless credentials for an unknown user: the salt is
    /// derived from the name with a server secret, so repeated attempts see
    /// the same salt and cannot tell the user does not exist. `user` must be
    /// the normalised name ([`fake_salt_name`]), so every spelling of one
    /// name gets one salt.
    pub fn fake(secret: &[u8; 32], user: &str, iterations: u32) -> Self {
        let salt = hmac(secret, user.as_bytes())[..SALT_LEN].to_vec();
        let mut keys = [0u8; 32];
        let _ = getrandom::getrandom(&mut keys);
        Self { salt, iterations, stored_key: keys, server_key: keys }
    }
}

/// The name a fake salt is derived from: the normalised account name when
/// the name is valid (so `carol`, `CAROL` and `Carol` share one salt, known
/// or not), the ASCII lower-case form otherwise.
pub fn fake_salt_name(user: &str) -> String {
    crate::types::UserName::parse(user).map_or_else(|_| user.to_ascii_lowercase(), |n| n.as_str().to_owned())
}

/// Why an exchange failed (for logs; the client sees `-ERR [AUTH]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScramError {
    Malformed(&'static str),
    /// Channel binding mismatch or a downgrade (`y` flag while -PLUS is
    /// offered).
    ChannelBinding(&'static str),
    NonceMismatch,
    InvalidProof,
}

/// Channel-binding situation of the connection.
#[derive(Debug, Clone)]
pub struct ChannelBinding {
    /// Whether this exchange runs as SCRAM-SHA-256-PLUS.
    pub plus: bool,
    /// `tls-exporter` data if the connection can bind (TLS 1.3), which is
    /// also when -PLUS is advertised.
    pub exporter: Option<Vec<u8>>,
}

/// State after client-first.
pub struct ScramServer {
    gs2_header: String,
    client_first_bare: String,
    server_first: String,
    nonce: String,
    creds: ScramCredentials,
    cb_data: Option<Vec<u8>>,
    pub user: String,
}

/// Decodes a saslname (RFC 5801/5802: "=2C" is ",", "=3D" is "=", no
/// other "="); `None` for a bad escape.
pub(crate) fn unescape_saslname(s: &str) -> Option<String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(p) = rest.find('=') {
        out.push_str(&rest[..p]);
        match rest.get(p..p + 3) {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return None,
        }
        rest = &rest[p + 3..];
    }
    out.push_str(rest);
    Some(out)
}

/// Parses client-first and returns (gs2 header, bare, user, client nonce,
/// channel-binding flag).
pub fn parse_client_first(msg: &[u8], cb: &ChannelBinding) -> Result<(String, String, String, String), ScramError> {
    if msg.len() > MAX_MESSAGE {
        return Err(ScramError::Malformed("client-first too long"));
    }
    let msg = std::str::from_utf8(msg).map_err(|_| ScramError::Malformed("not UTF-8"))?;
    let mut parts = msg.splitn(3, ',');
    let flag = parts.next().ok_or(ScramError::Malformed("no gs2 flag"))?;
    let authzid = parts.next().ok_or(ScramError::Malformed("no authzid field"))?;
    let bare = parts.next().ok_or(ScramError::Malformed("no client-first-bare"))?;
    match (flag, cb.plus) {
        ("p=tls-exporter", true) if cb.exporter.is_some() => {}
        ("p=tls-exporter", true) => return Err(ScramError::ChannelBinding("no exporter on this connection")),
        (f, true) if !f.starts_with("p=") => return Err(ScramError::ChannelBinding("-PLUS requires channel binding")),
        (f, _) if f.starts_with("p=") => return Err(ScramError::ChannelBinding("unsupported channel binding type")),
        // The client supports binding but thinks we do not, while we
        // advertise -PLUS on this connection: someone stripped it.
        ("y", false) if cb.exporter.is_some() => return Err(ScramError::ChannelBinding("downgrade detected")),
        ("y" | "n", false) => {}
        _ => return Err(ScramError::Malformed("bad gs2 flag")),
    }
    let authzid = match authzid {
        "" => None,
        a => Some(
            unescape_saslname(a.strip_prefix("a=").ok_or(ScramError::Malformed("bad authzid"))?)
                .ok_or(ScramError::Malformed("bad authzid escape"))?,
        ),
    };
    let mut fields = bare.split(',');
    let user = fields
        .next()
        .and_then(|f| f.strip_prefix("n="))
        .and_then(unescape_saslname)
        .ok_or(ScramError::Malformed("bad user name"))?;
    let nonce = fields.next().and_then(|f| f.strip_prefix("r=")).ok_or(ScramError::Malformed("no nonce"))?;
    if nonce.is_empty() || !nonce.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',') {
        return Err(ScramError::Malformed("bad nonce"));
    }
    if bare.starts_with("m=") {
        return Err(ScramError::Malformed("mandatory extension not supported"));
    }
    if let Some(a) = &authzid {
        if !a.eq_ignore_ascii_case(&user) {
            return Err(ScramError::Malformed("authorization identity differs"));
        }
    }
    let gs2_len = flag.len() + 1 + authzid_len(msg, flag) + 1;
    Ok((msg[..gs2_len].to_owned(), bare.to_owned(), user, nonce.to_owned()))
}

fn authzid_len(msg: &str, flag: &str) -> usize {
    msg[flag.len() + 1..].find(',').unwrap_or(0)
}

impl ScramServer {
    /// Starts the exchange for a parsed client-first with the user's (or
    /// fake) credentials; returns the state and the server-first message.
    pub fn start(
        gs2_header: String,
        client_first_bare: String,
        user: String,
        client_nonce: &str,
        creds: ScramCredentials,
        cb: &ChannelBinding,
    ) -> (Self, Vec<u8>) {
        let mut raw = [0u8; NONCE_LEN];
        let _ = getrandom::getrandom(&mut raw);
        let nonce = format!("{client_nonce}{}", B64.encode(raw));
        let server_first = format!("r={nonce},s={},i={}", B64.encode(&creds.salt), creds.iterations);
        let cb_data = if cb.plus { cb.exporter.clone() } else { None };
        let out = server_first.clone().into_bytes();
        (Self { gs2_header, client_first_bare, server_first, nonce, creds, cb_data, user }, out)
    }

    /// Replaces the keys with random ones, so the proof fails exactly as a
    /// wrong one does (same checks, same work) and no server signature is
    /// ever computed from the real ServerKey: used when the account refuses
    /// logins (locked, disabled, password expired).
    pub fn blind(&mut self) {
        let mut keys = [0u8; 32];
        let _ = getrandom::getrandom(&mut keys);
        self.creds.stored_key = keys;
        self.creds.server_key = keys;
    }

    /// Verifies client-final; returns server-final on success.
    pub fn finish(self, msg: &[u8]) -> Result<Vec<u8>, ScramError> {
        if msg.len() > MAX_MESSAGE {
            return Err(ScramError::Malformed("client-final too long"));
        }
        let msg = std::str::from_utf8(msg).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = msg.rsplit_once(",p=").ok_or(ScramError::Malformed("no proof"))?;
        let mut fields = without_proof.split(',');
        let c = fields.next().and_then(|f| f.strip_prefix("c=")).ok_or(ScramError::Malformed("no c="))?;
        let r = fields.next().and_then(|f| f.strip_prefix("r=")).ok_or(ScramError::Malformed("no r="))?;
        let mut expected_c = self.gs2_header.as_bytes().to_vec();
        if let Some(cb) = &self.cb_data {
            expected_c.extend_from_slice(cb);
        }
        let c = B64.decode(c).map_err(|_| ScramError::Malformed("bad c= base64"))?;
        if !bool::from(c.ct_eq(&expected_c)) {
            return Err(ScramError::ChannelBinding("channel binding data mismatch"));
        }
        if r != self.nonce {
            return Err(ScramError::NonceMismatch);
        }
        let proof = B64.decode(proof).map_err(|_| ScramError::Malformed("bad proof base64"))?;
        if proof.len() != 32 {
            return Err(ScramError::InvalidProof);
        }
        let auth_message = format!("{},{},{}", self.client_first_bare, self.server_first, without_proof);
        let client_signature = hmac(&self.creds.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for i in 0..32 {
            client_key[i] = proof[i] ^ client_signature[i];
        }
        let computed: [u8; 32] = Sha256::digest(client_key).into();
        if !bool::from(computed.ct_eq(&self.creds.stored_key)) {
            return Err(ScramError::InvalidProof);
        }
        let server_signature = hmac(&self.creds.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)).into_bytes())
    }
}

/// Escapes a user name for `n=`/`a=` (RFC 5802: "," is "=2C", "=" is "=3D").
pub(crate) fn escape_saslname(s: &str) -> String {
    s.replace('=', "=3D").replace(',', "=2C")
}

/// Iteration counts a client accepts from a server: RFC 7677's minimum, and
/// a ceiling so a hostile server cannot make the client burn CPU.
pub const CLIENT_MIN_ITERATIONS: u32 = 4096;
pub const CLIENT_MAX_ITERATIONS: u32 = 1_000_000;

/// SCRAM-SHA-256 client (RFC 5802, RFC 7677) without channel binding
/// (gs2 flag `n`). Sans-IO, like the server. The password is kept only in
/// its SASLprep'd form and wiped on drop; `Debug` shows nothing secret.
pub struct ScramClient {
    password: zeroize::Zeroizing<Vec<u8>>,
    client_first_bare: String,
    nonce: String,
}

impl std::fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramClient").finish_non_exhaustive()
    }
}

/// The client after client-final: it still has to verify the server.
pub struct ScramClientFinal {
    server_signature: [u8; 32],
}

impl std::fmt::Debug for ScramClientFinal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramClientFinal").finish_non_exhaustive()
    }
}

impl ScramClient {
    /// Starts an exchange; returns the state and client-first (`n,,n=..,r=..`).
    pub fn new(user: &str, password: &str) -> Result<(Self, Vec<u8>), ScramError> {
        let user = stringprep::saslprep(user).map_err(|_| ScramError::Malformed("user name fails SASLprep"))?;
        let password = zeroize::Zeroizing::new(
            normalize(password.as_bytes()).ok_or(ScramError::Malformed("password fails SASLprep"))?,
        );
        let mut raw = [0u8; NONCE_LEN];
        getrandom::getrandom(&mut raw).map_err(|_| ScramError::Malformed("no randomness for the nonce"))?;
        let nonce = B64.encode(raw);
        let client_first_bare = format!("n={},r={nonce}", escape_saslname(&user));
        let first = format!("n,,{client_first_bare}").into_bytes();
        Ok((Self { password, client_first_bare, nonce }, first))
    }

    /// Consumes server-first; returns the verifier state and client-final.
    /// Runs PBKDF2 (up to [`CLIENT_MAX_ITERATIONS`]): call it off the async
    /// executor.
    pub fn server_first(self, msg: &[u8]) -> Result<(ScramClientFinal, Vec<u8>), ScramError> {
        if msg.len() > MAX_MESSAGE {
            return Err(ScramError::Malformed("server-first too long"));
        }
        let server_first = std::str::from_utf8(msg).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        if server_first.starts_with("m=") {
            return Err(ScramError::Malformed("mandatory extension not supported"));
        }
        if server_first.starts_with("e=") {
            return Err(ScramError::Malformed("server reported an error"));
        }
        let mut fields = server_first.split(',');
        let nonce = fields.next().and_then(|f| f.strip_prefix("r=")).ok_or(ScramError::Malformed("no nonce"))?;
        let salt = fields.next().and_then(|f| f.strip_prefix("s=")).ok_or(ScramError::Malformed("no salt"))?;
        let iter = fields.next().and_then(|f| f.strip_prefix("i=")).ok_or(ScramError::Malformed("no iterations"))?;
        if nonce.len() <= self.nonce.len()
            || !nonce.starts_with(&self.nonce)
            || !nonce.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
        {
            return Err(ScramError::NonceMismatch);
        }
        let salt = B64.decode(salt).map_err(|_| ScramError::Malformed("bad salt base64"))?;
        if salt.is_empty() {
            return Err(ScramError::Malformed("empty salt"));
        }
        let iterations: u32 = iter.parse().map_err(|_| ScramError::Malformed("bad iteration count"))?;
        if !(CLIENT_MIN_ITERATIONS..=CLIENT_MAX_ITERATIONS).contains(&iterations) {
            return Err(ScramError::Malformed("iteration count out of range"));
        }
        let mut salted = zeroize::Zeroizing::new([0u8; 32]);
        pbkdf2::pbkdf2_hmac::<Sha256>(&self.password, &salt, iterations, &mut *salted);
        let client_key = zeroize::Zeroizing::new(hmac(&*salted, b"Client Key"));
        let stored_key: [u8; 32] = Sha256::digest(*client_key).into();
        let server_key = zeroize::Zeroizing::new(hmac(&*salted, b"Server Key"));
        // gs2 header "n,," base64-encoded is "biws".
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let client_signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(client_signature).map(|(k, s)| k ^ s).collect();
        let server_signature = hmac(&*server_key, auth_message.as_bytes());
        let out = format!("{without_proof},p={}", B64.encode(proof)).into_bytes();
        Ok((ScramClientFinal { server_signature }, out))
    }
}

impl ScramClientFinal {
    /// Checks server-final (`v=<ServerSignature>`): proof that the server
    /// knows the credentials, not just a relay that says "+OK".
    pub fn verify(self, msg: &[u8]) -> Result<(), ScramError> {
        if msg.len() > MAX_MESSAGE {
            return Err(ScramError::Malformed("server-final too long"));
        }
        let msg = std::str::from_utf8(msg).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        if msg.starts_with("e=") {
            return Err(ScramError::Malformed("server reported an error"));
        }
        let v = msg.split(',').next().and_then(|f| f.strip_prefix("v=")).ok_or(ScramError::Malformed("no v="))?;
        let v = B64.decode(v).map_err(|_| ScramError::Malformed("bad v= base64"))?;
        if !bool::from(v.as_slice().ct_eq(&self.server_signature[..])) {
            return Err(ScramError::InvalidProof);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client, written from RFC 5802 independently of the server code.
    fn client_final(password: &str, client_first_bare: &str, server_first: &str, gs2: &str, cb: &[u8]) -> String {
        let fields: Vec<&str> = server_first.split(',').collect();
        let nonce = &fields[0][2..];
        let salt = B64.decode(&fields[1][2..]).unwrap();
        let iter: u32 = fields[2][2..].parse().unwrap();
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), &salt, iter, &mut salted);
        let client_key = hmac(&salted, b"Client Key");
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        let c = B64.encode([gs2.as_bytes(), cb].concat());
        let without = format!("c={c},r={nonce}");
        let auth = format!("{client_first_bare},{server_first},{without}");
        let sig = hmac(&stored, auth.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(sig).map(|(a, b)| a ^ b).collect();
        format!("{without},p={}", B64.encode(proof))
    }

    fn run(password: &str, client_first: &str, cb: &ChannelBinding, cb_data: &[u8]) -> Result<Vec<u8>, ScramError> {
        let creds = ScramCredentials::derive(b"pencil", 4096).unwrap();
        let (gs2, bare, user, nonce) = parse_client_first(client_first.as_bytes(), cb)?;
        assert_eq!(user, "user");
        let (server, first) = ScramServer::start(gs2.clone(), bare.clone(), user, &nonce, creds, cb);
        let first = String::from_utf8(first).unwrap();
        server.finish(client_final(password, &bare, &first, &gs2, cb_data).as_bytes())
    }

    #[test]
    fn rfc7677_vector_matches_derivation() {
        // RFC 7677 section 3: user "user", password "pencil",
        // salt W22ZaJ0SNY7soEsUEjb6gQ==, 4096 iterations.
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let creds = ScramCredentials::derive_with_salt(b"pencil", salt, 4096).unwrap();
        let server = ScramServer {
            gs2_header: "n,,".into(),
            client_first_bare: "n=user,r=rOprNGfwEbeRWgbNEkqO".into(),
            server_first: "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
                .into(),
            nonce: "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into(),
            creds,
            cb_data: None,
            user: "user".into(),
        };
        let out = server
            .finish(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
            .unwrap();
        assert_eq!(out, b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
    }

    #[test]
    fn good_and_bad_proofs_and_channel_binding() {
        let no_cb = ChannelBinding { plus: false, exporter: None };
        assert!(run("pencil", "n,,n=user,r=abc", &no_cb, b"").is_ok());
        assert_eq!(run("pencil2", "n,,n=user,r=abc", &no_cb, b""), Err(ScramError::InvalidProof));
        let tls13 = ChannelBinding { plus: false, exporter: Some(vec![7; 32]) };
        assert!(run("pencil", "n,,n=user,r=abc", &tls13, b"").is_ok(), "client without binding support");
        assert_eq!(
            run("pencil", "y,,n=user,r=abc", &tls13, b"").unwrap_err(),
            ScramError::ChannelBinding("downgrade detected")
        );
        assert!(run("pencil", "y,,n=user,r=abc", &no_cb, b"").is_ok(), "y is fine where -PLUS is not offered");
        let plus = ChannelBinding { plus: true, exporter: Some(vec![7; 32]) };
        assert!(run("pencil", "p=tls-exporter,,n=user,r=abc", &plus, &[7; 32]).is_ok());
        assert_eq!(
            run("pencil", "p=tls-exporter,,n=user,r=abc", &plus, &[8; 32]).unwrap_err(),
            ScramError::ChannelBinding("channel binding data mismatch")
        );
        assert!(run("pencil", "n,,n=user,r=abc", &plus, b"").is_err(), "-PLUS without binding");
        assert!(run("pencil", "p=tls-unique,,n=user,r=abc", &plus, b"").is_err());
    }

    #[test]
    fn nonce_replay_and_tampering_fail() {
        let cb = ChannelBinding { plus: false, exporter: None };
        let creds = ScramCredentials::derive(b"pencil", 4096).unwrap();
        let (gs2, bare, user, nonce) = parse_client_first(b"n,,n=user,r=abc", &cb).unwrap();
        let (s1, first1) = ScramServer::start(gs2.clone(), bare.clone(), user.clone(), &nonce, creds.clone(), &cb);
        let final1 = client_final("pencil", &bare, &String::from_utf8(first1).unwrap(), &gs2, b"");
        assert!(s1.finish(final1.as_bytes()).is_ok());
        // Replaying the same client-final against a new exchange fails: the
        // server nonce differs.
        let (s2, _) = ScramServer::start(gs2, bare, user, &nonce, creds, &cb);
        assert_eq!(s2.finish(final1.as_bytes()), Err(ScramError::NonceMismatch));
    }

    #[test]
    fn parsing_edge_cases() {
        let cb = ChannelBinding { plus: false, exporter: None };
        assert_eq!(parse_client_first(b"n,a=user,n=user,r=x", &cb).unwrap().0, "n,a=user,");
        assert!(parse_client_first(b"n,a=other,n=user,r=x", &cb).is_err());
        assert_eq!(parse_client_first(b"n,,n=a=2Cb=3Dc,r=x", &cb).unwrap().2, "a,b=c");
        for bad in [&b""[..], b"n", b"n,,", b"x,,n=u,r=x", b"n,,n=u", b"n,,n=a=ZZ,r=x", b"n,,m=x,n=u,r=x"] {
            assert!(parse_client_first(bad, &cb).is_err(), "{bad:?}");
        }
        let creds = ScramCredentials::derive(b"pencil", 4096).unwrap();
        assert_eq!(ScramCredentials::decode(&creds.encode()), Some(creds));
        let s = [1u8; 32];
        assert_eq!(ScramCredentials::fake(&s, "bob", 4096).salt, ScramCredentials::fake(&s, "bob", 4096).salt);
    }
    #[test]
    fn client_against_server_and_rfc7677_vector() {
        let cb = ChannelBinding { plus: false, exporter: None };
        let creds = ScramCredentials::derive(b"pencil", 4096).unwrap();
        let (client, first) = ScramClient::new("us,er", "pencil").unwrap();
        let (gs2, bare, user, nonce) = parse_client_first(&first, &cb).unwrap();
        assert_eq!(user, "us,er");
        let (server, server_first) = ScramServer::start(gs2, bare, user, &nonce, creds.clone(), &cb);
        let (fin, client_final) = client.server_first(&server_first).unwrap();
        let server_final = server.finish(&client_final).unwrap();
        fin.verify(&server_final).unwrap();

        // A server that does not know the key cannot forge v=.
        let (client, first) = ScramClient::new("user", "pencil").unwrap();
        let (gs2, bare, user, nonce) = parse_client_first(&first, &cb).unwrap();
        let (_, server_first) = ScramServer::start(gs2, bare, user, &nonce, creds, &cb);
        let (fin, _) = client.server_first(&server_first).unwrap();
        assert_eq!(fin.verify(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="), Err(ScramError::InvalidProof));

        // RFC 7677 section 3, with the client nonce fixed.
        let client = ScramClient {
            password: zeroize::Zeroizing::new(b"pencil".to_vec()),
            client_first_bare: "n=user,r=rOprNGfwEbeRWgbNEkqO".into(),
            nonce: "rOprNGfwEbeRWgbNEkqO".into(),
        };
        let (fin, out) = client
            .server_first(b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
            .unwrap();
        assert_eq!(
            out,
            b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        fin.verify(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=").unwrap();
    }

    #[test]
    fn client_refuses_bad_server_first() {
        for bad in [
            &b"r=other,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"[..],
            b"r=NONCEx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=1",
            b"r=NONCEx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4000000000",
            b"r=NONCEx,s=!!,i=4096",
            b"r=NONCE,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            b"m=x,r=NONCEx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            b"e=other-error",
        ] {
            let client = ScramClient {
                password: zeroize::Zeroizing::new(b"pencil".to_vec()),
                client_first_bare: "n=user,r=NONCE".into(),
                nonce: "NONCE".into(),
            };
            assert!(client.server_first(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
