//! Minimal LMTP client (RFC 2033) over plain TCP.

use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

pub struct LmtpClient {
    io: BufReader<TcpStream>,
    line: Vec<u8>,
}

/// A complete (possibly multi-line) reply: code and the text of the last line.
pub struct Reply {
    pub code: u16,
    pub text: String,
}

impl LmtpClient {
    /// Connects, reads the 220 greeting and sends LHLO.
    pub async fn connect(addr: SocketAddr, lhlo: &str) -> Result<Self> {
        let tcp = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
        tcp.set_nodelay(true)?;
        let mut c = Self { io: BufReader::with_capacity(8 * 1024, tcp), line: Vec::with_capacity(256) };
        c.expect(220, "greeting").await?;
        c.send(format!("LHLO {lhlo}\r\n").as_bytes()).await?;
        c.expect(250, "LHLO").await?;
        Ok(c)
    }

    async fn send(&mut self, data: &[u8]) -> Result<()> {
        let s = self.io.get_mut();
        s.write_all(data).await?;
        s.flush().await?;
        Ok(())
    }

    pub async fn reply(&mut self) -> Result<Reply> {
        loop {
            self.line.clear();
            if self.io.read_until(b'\n', &mut self.line).await? == 0 {
                bail!("connection closed by server");
            }
            let l = String::from_utf8_lossy(&self.line);
            let l = l.trim_end();
            let code: u16 =
                l.get(..3).and_then(|c| c.parse().ok()).with_context(|| format!("bad LMTP reply line: {l}"))?;
            if l.as_bytes().get(3) != Some(&b'-') {
                return Ok(Reply { code, text: l.chars().take(160).collect() });
            }
        }
    }

    async fn expect(&mut self, code: u16, what: &str) -> Result<()> {
        let r = self.reply().await?;
        if r.code != code {
            bail!("{what}: {}", r.text);
        }
        Ok(())
    }

    /// One transaction: MAIL FROM, one RCPT TO per recipient, DATA, the (already dot-stuffed)
    /// message and ".". Every recipient must get a 250 after the data.
    pub async fn deliver(&mut self, from: &str, rcpts: &[&str], stuffed: &[u8]) -> Result<()> {
        self.send(format!("MAIL FROM:<{from}>\r\n").as_bytes()).await?;
        self.expect(250, "MAIL FROM").await?;
        for r in rcpts {
            self.send(format!("RCPT TO:<{r}>\r\n").as_bytes()).await?;
            self.expect(250, &format!("RCPT TO:<{r}>")).await?;
        }
        self.send(b"DATA\r\n").await?;
        self.expect(354, "DATA").await?;
        {
            let s = self.io.get_mut();
            s.write_all(stuffed).await?;
            s.write_all(b".\r\n").await?;
            s.flush().await?;
        }
        for r in rcpts {
            self.expect(250, &format!("delivery to <{r}>")).await?;
        }
        Ok(())
    }

    pub async fn quit(mut self) -> Result<()> {
        self.send(b"QUIT\r\n").await?;
        self.expect(221, "QUIT").await
    }
}
