//! Connecting to an upstream server and logging in.
//!
//! Connecting: TCP, then implicit TLS or mandatory STLS (a refused STLS or
//! plaintext pipelined behind its `+OK` ends the attempt), then greeting
//! and CAPA. Logging in: USER/PASS, AUTH PLAIN, SCRAM-SHA-256 (the server
//! must prove it knows the credentials), XOAUTH2 and OAUTHBEARER, chosen by
//! `auth` and what CAPA offers. APOP is never used. Every failure poisons
//! the session: the server may be in any state, even logged in.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use pop3_proto::client::{self, ClientCommand};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use zeroize::Zeroizing;

use super::framing::{decode_challenge, refused, Status, B64};
use super::io::{Conn, Session};
use super::{Credential, UpstreamError};
use crate::config::connector::{AccountConfig, UpstreamAuth, UpstreamTls};
use crate::logtext::sanitize;
use crate::scram::{ScramClient, ScramError};

async fn handshake(
    connector: &TlsConnector,
    name: ServerName<'static>,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, UpstreamError> {
    match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
        Err(_) => Err(UpstreamError::Timeout("in the TLS handshake")),
        Ok(Err(e)) => Err(UpstreamError::Tls(e.to_string())),
        Ok(Ok(s)) => Ok(s),
    }
}

fn scram_error(e: ScramError) -> String {
    match e {
        ScramError::Malformed(what) | ScramError::ChannelBinding(what) => format!("SCRAM-SHA-256: {what}"),
        ScramError::NonceMismatch => "SCRAM-SHA-256: the server nonce does not extend ours".into(),
        ScramError::InvalidProof => "SCRAM-SHA-256: the server signature is wrong (not the real server?)".into(),
    }
}

/// Refuses CR, LF and NUL in anything put on a command line.
fn check_arg(what: &str, value: &str) -> Result<(), UpstreamError> {
    if value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
        return Err(UpstreamError::Auth(format!("the {what} contains a line break or NUL")));
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Method {
    Scram,
    Plain,
    User,
    Xoauth2,
    Oauthbearer,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Scram => "SCRAM-SHA-256",
            Method::Plain => "PLAIN",
            Method::User => "USER",
            Method::Xoauth2 => "XOAUTH2",
            Method::Oauthbearer => "OAUTHBEARER",
        }
    }
}

impl Session<TlsStream<TcpStream>> {
    /// Connects, reads the greeting, establishes verified TLS (implicit or
    /// mandatory STLS) and reads CAPA.
    pub async fn connect(account: &AccountConfig, tls: Arc<rustls::ClientConfig>) -> Result<Session, UpstreamError> {
        let timeout = Duration::from_secs(account.timeout_secs);
        let port = account.port();
        let host = account.host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let name = ServerName::try_from(host.clone())
            .map_err(|_| UpstreamError::Connect(format!("`{host}` is not a valid host name or address")))?;
        let tcp = match tokio::time::timeout(timeout, TcpStream::connect((host.as_str(), port))).await {
            Err(_) => return Err(UpstreamError::Timeout("connecting")),
            Ok(Err(e)) => return Err(UpstreamError::Connect(format!("{host} port {port}: {e}"))),
            Ok(Ok(s)) => s,
        };
        let _ = tcp.set_nodelay(true);
        let connector = TlsConnector::from(tls);
        let (stream, greeted) = match account.tls {
            UpstreamTls::Implicit => (handshake(&connector, name, tcp, timeout).await?, false),
            UpstreamTls::Starttls => {
                let mut plain = Conn::new(tcp, timeout);
                plain.greeting().await?;
                plain.send(&ClientCommand::Stls).await?;
                match plain.status(false).await? {
                    Status::Ok(_) => {}
                    Status::Err(t) => {
                        return Err(UpstreamError::Tls(format!("the server refused STLS: {}", sanitize(&t))))
                    }
                    Status::Challenge(_) => unreachable!("challenges are not allowed here"),
                }
                // Anything already received after "+OK" was sent in the
                // clear and would be read as if it came over TLS.
                if plain.buf.pending() > 0 {
                    return Err(UpstreamError::Protocol(
                        "plaintext data after the STLS response (response injection)".into(),
                    ));
                }
                (handshake(&connector, name, plain.stream, timeout).await?, true)
            }
        };
        Session::open(Conn::new(stream, timeout), greeted, host, port).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    fn sasl_mechanisms(&self) -> Vec<String> {
        client::sasl_mechanisms(&self.capabilities)
    }

    /// Logs in per `account.auth`; returns the mechanism used.
    pub async fn login(&mut self, account: &AccountConfig, cred: &Credential) -> Result<&'static str, UpstreamError> {
        self.usable()?;
        if self.logged_in {
            return Err(UpstreamError::Auth("already logged in".into()));
        }
        let r = self.login_inner(account, cred).await;
        if r.is_err() {
            // The server may be in any state, even logged in (a SCRAM
            // server that failed verification): never go on.
            self.poisoned = true;
        } else {
            self.logged_in = true;
        }
        r
    }

    async fn login_inner(&mut self, account: &AccountConfig, cred: &Credential) -> Result<&'static str, UpstreamError> {
        let mechs = self.sasl_mechanisms();
        let offered = |m: &str| mechs.iter().any(|x| x == m);
        let method = match (account.auth, cred) {
            (UpstreamAuth::Auto, Credential::Password(_)) if offered("SCRAM-SHA-256") => Method::Scram,
            (UpstreamAuth::Auto, Credential::Password(_)) if offered("PLAIN") => Method::Plain,
            (UpstreamAuth::Auto, Credential::Password(_)) => Method::User,
            (UpstreamAuth::Auto, Credential::AccessToken(_)) if offered("XOAUTH2") => Method::Xoauth2,
            (UpstreamAuth::Auto, Credential::AccessToken(_)) => Method::Oauthbearer,
            (UpstreamAuth::ScramSha256, Credential::Password(_)) => Method::Scram,
            (UpstreamAuth::Plain, Credential::Password(_)) => Method::Plain,
            (UpstreamAuth::User, Credential::Password(_)) => Method::User,
            (UpstreamAuth::Xoauth2, Credential::AccessToken(_)) => Method::Xoauth2,
            (UpstreamAuth::Oauthbearer, Credential::AccessToken(_)) => Method::Oauthbearer,
            (UpstreamAuth::Xoauth2 | UpstreamAuth::Oauthbearer, Credential::Password(_)) => {
                return Err(UpstreamError::Auth("XOAUTH2/OAUTHBEARER need an access token, not a password".into()))
            }
            (_, Credential::AccessToken(_)) => {
                return Err(UpstreamError::Auth("an access token needs auth = xoauth2, oauthbearer or auto".into()))
            }
        };
        let user = account.user.as_str();
        check_arg("user name", user)?;
        match cred {
            Credential::Password(pw) => {
                check_arg("password", pw)?;
                match method {
                    Method::Scram => self.scram(user, pw).await?,
                    Method::Plain => self.plain(user, pw).await?,
                    _ => self.user_pass(user, pw).await?,
                }
            }
            Credential::AccessToken(token) => {
                if token.is_empty() || !token.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
                    return Err(UpstreamError::Auth("the access token is empty or has invalid characters".into()));
                }
                if user.contains('\x01') {
                    return Err(UpstreamError::Auth("the user name contains ^A".into()));
                }
                self.oauth(method, user, token).await?
            }
        }
        Ok(method.name())
    }

    /// `AUTH <mech>` with an initial response: inline when the command
    /// stays within 255 octets (RFC 5034 section 4), else after an empty
    /// challenge. Returns the server's answer to it.
    async fn auth_start(&mut self, mech: &str, initial: &[u8]) -> Result<Status, UpstreamError> {
        let encoded = Zeroizing::new(B64.encode(initial));
        let inline = ClientCommand::Auth { mechanism: mech, initial_response: Some(encoded.as_str()) };
        if inline.encoded_len() <= 255 {
            self.conn.send(&inline).await?;
        } else {
            self.conn.send(&ClientCommand::Auth { mechanism: mech, initial_response: None }).await?;
            match self.conn.status(true).await? {
                Status::Challenge(c) if c.is_empty() => {}
                Status::Err(t) => return Err(refused(&t)),
                _ => return Err(UpstreamError::Protocol("expected an empty SASL challenge".into())),
            }
            self.conn.send(&ClientCommand::AuthResponse(encoded.as_str())).await?;
        }
        self.conn.status(true).await
    }

    /// Cancels an exchange with "*" and reads the server's (-ERR) answer.
    async fn auth_cancel(&mut self, err: UpstreamError) -> UpstreamError {
        if self.conn.send(&ClientCommand::AuthCancel).await.is_ok() {
            let _ = self.conn.status(true).await;
        }
        err
    }

    async fn plain(&mut self, user: &str, pw: &str) -> Result<(), UpstreamError> {
        let payload = Zeroizing::new(format!("\0{user}\0{pw}"));
        match self.auth_start("PLAIN", payload.as_bytes()).await? {
            Status::Ok(_) => Ok(()),
            Status::Err(t) => Err(refused(&t)),
            Status::Challenge(_) => {
                Err(self.auth_cancel(UpstreamError::Protocol("unexpected challenge to AUTH PLAIN".into())).await)
            }
        }
    }

    async fn user_pass(&mut self, user: &str, pw: &str) -> Result<(), UpstreamError> {
        self.conn.send(&ClientCommand::User(user)).await?;
        if let Status::Err(t) = self.conn.status(false).await? {
            return Err(refused(&t));
        }
        self.conn.send(&ClientCommand::Pass(pw)).await?;
        match self.conn.status(false).await? {
            Status::Ok(_) => Ok(()),
            Status::Err(t) => Err(refused(&t)),
            Status::Challenge(_) => unreachable!("challenges are not allowed here"),
        }
    }

    async fn scram(&mut self, user: &str, pw: &str) -> Result<(), UpstreamError> {
        let (client, first) = ScramClient::new(user, pw).map_err(|e| UpstreamError::Auth(scram_error(e)))?;
        let server_first = match self.auth_start("SCRAM-SHA-256", &first).await? {
            Status::Challenge(c) => decode_challenge(&c)?,
            Status::Err(t) => return Err(refused(&t)),
            Status::Ok(_) => return Err(UpstreamError::Protocol("+OK before the SCRAM exchange finished".into())),
        };
        // PBKDF2 with up to a million iterations: off the executor.
        let computed = tokio::task::spawn_blocking(move || client.server_first(&server_first))
            .await
            .map_err(|_| UpstreamError::Auth("SCRAM-SHA-256: computation failed".into()))?;
        let (verifier, client_final) = match computed {
            Ok(v) => v,
            Err(e) => return Err(self.auth_cancel(UpstreamError::Auth(scram_error(e))).await),
        };
        let response = Zeroizing::new(B64.encode(&client_final));
        self.conn.send(&ClientCommand::AuthResponse(response.as_str())).await?;
        match self.conn.status(true).await? {
            Status::Challenge(c) => {
                let server_final = decode_challenge(&c)?;
                if let Err(e) = verifier.verify(&server_final) {
                    return Err(self.auth_cancel(UpstreamError::Auth(scram_error(e))).await);
                }
                self.conn.send(&ClientCommand::AuthResponse("")).await?;
                match self.conn.status(true).await? {
                    Status::Ok(_) => Ok(()),
                    Status::Err(t) => Err(refused(&t)),
                    Status::Challenge(_) => Err(UpstreamError::Protocol("challenge after SCRAM server-final".into())),
                }
            }
            Status::Err(t) => Err(refused(&t)),
            Status::Ok(_) => Err(UpstreamError::Auth(
                "SCRAM-SHA-256: the server did not prove it knows the credentials (no server signature)".into(),
            )),
        }
    }

    async fn oauth(&mut self, method: Method, user: &str, token: &str) -> Result<(), UpstreamError> {
        let (payload, dummy): (Zeroizing<String>, &str) = if method == Method::Xoauth2 {
            (Zeroizing::new(format!("user={user}\x01auth=Bearer {token}\x01\x01")), "")
        } else {
            let gs2 = format!("n,a={},", crate::scram::escape_saslname(user));
            let port = self.port;
            let host = &self.host;
            (Zeroizing::new(format!("{gs2}\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01")), "AQ==")
        };
        match self.auth_start(method.name(), payload.as_bytes()).await? {
            Status::Ok(_) => Ok(()),
            Status::Err(t) => Err(refused(&t)),
            Status::Challenge(c) => {
                // The error details come as a challenge (RFC 7628 3.2.2);
                // the client answers with a dummy response, then gets -ERR.
                let detail = B64.decode(&c).map(|d| sanitize(&d)).unwrap_or_default();
                self.conn.send(&ClientCommand::AuthResponse(dummy)).await?;
                match self.conn.status(true).await? {
                    Status::Ok(_) => {
                        Err(UpstreamError::Protocol(format!("{} succeeded after an error", method.name())))
                    }
                    Status::Err(t) if detail.is_empty() => Err(refused(&t)),
                    Status::Err(t) => Err(UpstreamError::Auth(format!("{} ({detail})", sanitize(&t)))),
                    Status::Challenge(_) => Err(UpstreamError::Protocol("second challenge after an error".into())),
                }
            }
        }
    }
}
