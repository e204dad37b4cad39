//! Shared fixtures for the in-process tests: a temporary store with users,
//! contexts for POP3 and LMTP sessions, and a line-oriented test client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pop3connex_core::auth::Authenticator;
use pop3connex_core::config::{AbuseConfig, AuthConfig, LmtpConfig, Network, PasswordScheme, Pop3Config, TlsConfig};
use pop3connex_core::crypto::MasterKey;
use pop3connex_core::lmtp::LmtpContext;
use pop3connex_core::mailstore::MailStore;
use pop3connex_core::pop3::{ListenerKind, Pop3Context};
use pop3connex_core::secret::SecretRef;
use pop3connex_core::security::{system_clock, Guard};
use pop3connex_core::store::sqlite::SqliteStore;
use pop3connex_core::tls::TlsAcceptor;
use pop3connex_core::types::UserName;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, DuplexStream};
use tokio::sync::watch;

pub const PASSWORD: &str = "correct horse battery staple";

pub struct Fixture {
    pub dir: PathBuf,
    pub mail: Arc<MailStore>,
    pub auth: Arc<Authenticator>,
    pub tls: Arc<TlsAcceptor>,
    pub ca_pem: String,
    pub shutdown: watch::Sender<bool>,
}

pub fn cheap_auth() -> AuthConfig {
    AuthConfig {
        password_scheme: PasswordScheme::Argon2id,
        argon2_memory_kib: 8192,
        argon2_iterations: 1,
        failure_delay_ms: 0,
        ..AuthConfig::default()
    }
}

impl Fixture {
    pub async fn new(name: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("p3x-{name}-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Arc::new(SqliteStore::open(&dir.join("t.db")).unwrap());
        let key = MasterKey::decode(MasterKey::generate_base64().as_bytes()).unwrap();
        let mail = Arc::new(MailStore::with_store(store, key).await.unwrap());
        let auth = Arc::new(Authenticator::new(mail.clone(), cheap_auth()).unwrap());
        let generated = pop3connex_core::tls::generate_local_ca("localhost").unwrap();
        std::fs::write(dir.join("cert.pem"), &generated.cert_pem).unwrap();
        let key_path = dir.join("key.pem");
        std::fs::write(&key_path, generated.key_pem.as_bytes()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let tls = Arc::new(
            TlsAcceptor::load(&TlsConfig { certificate: dir.join("cert.pem"), private_key: SecretRef::File(key_path) })
                .unwrap(),
        );
        let (shutdown, _) = watch::channel(false);
        Fixture { dir, mail, auth, tls, ca_pem: generated.ca_pem, shutdown }
    }

    pub async fn add_user(&self, name: &str) {
        self.auth.add_user(&UserName::parse(name).unwrap(), PASSWORD.as_bytes()).await.unwrap();
    }

    /// Delivers `body` (CRLF text) to `user` directly through the store.
    pub async fn deliver(&self, user: &str, body: &[u8]) {
        let rec = self.mail.store().user(&UserName::parse(user).unwrap()).await.unwrap().unwrap();
        let msg = self.mail.seal(&rec, body, None).unwrap();
        self.mail.commit(vec![msg]).await.unwrap();
    }

    pub async fn count(&self, user: &str) -> usize {
        let rec = self.mail.store().user(&UserName::parse(user).unwrap()).await.unwrap().unwrap();
        self.mail.store().messages(rec.mailbox.id).await.unwrap().len()
    }

    pub fn pop3_ctx(&self, cfg: Pop3Config) -> Arc<Pop3Context> {
        Arc::new(Pop3Context {
            cfg,
            auth: self.auth.clone(),
            tls: self.tls.clone(),
            security: Arc::new(Guard::new(AbuseConfig::default(), Duration::ZERO, system_clock())),
            max_commands_per_second: 1000,
            oauth: None,
        })
    }

    /// A POP3 config that allows plaintext credentials from the test peer.
    pub fn trusting_cfg() -> Pop3Config {
        Pop3Config { plaintext_auth_networks: vec![network("127.0.0.0/8")], ..Pop3Config::default() }
    }

    /// Starts a session on an in-memory pipe and returns the client end.
    pub fn connect_pop3(&self, ctx: Arc<Pop3Context>, kind: ListenerKind) -> Client<DuplexStream> {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let rx = self.shutdown.subscribe();
        tokio::spawn(pop3connex_core::pop3::serve(ctx, server, peer, kind, rx));
        Client::new(client)
    }

    pub fn connect_lmtp(&self, cfg: LmtpConfig) -> Client<DuplexStream> {
        self.connect_lmtp_to(self.lmtp_ctx(cfg))
    }

    /// An LMTP context to share between connections (connection count,
    /// in-flight DATA budget).
    pub fn lmtp_ctx(&self, cfg: LmtpConfig) -> Arc<LmtpContext> {
        Arc::new(LmtpContext::new(cfg, "mx.test".into(), self.auth.clone()))
    }

    pub fn connect_lmtp_to(&self, ctx: Arc<LmtpContext>) -> Client<DuplexStream> {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let rx = self.shutdown.subscribe();
        tokio::spawn(pop3connex_core::lmtp::serve(ctx, server, "test".into(), rx));
        Client::new(client)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn network(s: &str) -> Network {
    Network(s.parse().unwrap())
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A line-oriented client for transcripts.
pub struct Client<S> {
    pub io: BufReader<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    pub fn new(s: S) -> Self {
        Self { io: BufReader::new(s) }
    }

    pub async fn send(&mut self, raw: &str) {
        self.io.get_mut().write_all(raw.as_bytes()).await.unwrap();
    }

    /// Reads one line without its CRLF; "" on EOF.
    pub async fn line(&mut self) -> String {
        let mut v = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(30), self.io.read_until(b'\n', &mut v))
            .await
            .expect("server did not answer")
            .unwrap();
        if n == 0 {
            return String::new();
        }
        assert!(v.ends_with(b"\r\n"), "line not CRLF-terminated: {v:?}");
        String::from_utf8(v[..v.len() - 2].to_vec()).unwrap()
    }

    /// Sends a command and returns the status line.
    pub async fn cmd(&mut self, c: &str) -> String {
        self.send(&format!("{c}\r\n")).await;
        self.line().await
    }

    /// Reads a multi-line body up to ".", returns the raw lines (still stuffed).
    pub async fn body(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let l = self.line().await;
            if l == "." {
                return out;
            }
            assert!(!l.is_empty() || out.len() < 100_000, "EOF inside multi-line response");
            out.push(l);
        }
    }

    pub async fn login(&mut self, user: &str) {
        assert!(self.cmd(&format!("USER {user}")).await.starts_with("+OK"));
        let r = self.cmd(&format!("PASS {PASSWORD}")).await;
        assert!(r.starts_with("+OK"), "{r}");
    }
}
