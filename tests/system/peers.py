"""Private peer servers for the system tests: a test CA (openssl CLI),
Dovecot (POP3 upstream with implicit TLS and STLS, LMTP to fill or to
receive), Postfix (SMTP downstream with STARTTLS and refusal maps), a
scripted misbehaving POP3 server and an OAuth 2.0 token endpoint.

Every peer listens on 127.0.0.1 only, lives under its own temporary
directory, and is stopped (and its master process reaped) by its `stop()`.
Dovecot and Postfix run their masters as root.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pwd
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import syslib
from syslib import CRLF, LOOPBACK

# --------------------------------------------------------------------------
# tools
# --------------------------------------------------------------------------

TOOLS: dict[str, str] = {}


def tool(name: str, package: str) -> str:
    """Full path of a command (also looked up in /usr/sbin, which a non-root
    PATH may lack); fails the test naming the Debian package if missing."""
    if name not in TOOLS:
        path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
        if not path:
            pytest.fail(f"`{name}` not found: install the Debian package `{package}`", pytrace=False)
        TOOLS[name] = path
    return TOOLS[name]


def need_root(what: str):
    if os.geteuid() != 0:
        pytest.fail(f"{what} runs a daemon's master process and must run as root", pytrace=False)


def run(cmd, timeout: float = 30, check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess:
    try:
        cp = subprocess.run([str(c) for c in cmd], capture_output=True, timeout=timeout,
                            input=input, stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"timed out after {timeout}s: {cmd}\nstdout: {e.stdout!r}\nstderr: {e.stderr!r}")
    if check and cp.returncode != 0:
        pytest.fail(f"command failed (exit {cp.returncode}): {' '.join(map(str, cmd))}\n"
                    f"stdout: {cp.stdout.decode(errors='replace')}\nstderr: {cp.stderr.decode(errors='replace')}")
    return cp


def world_readable_tmpdir(prefix: str) -> Path:
    """A directory under /tmp that unprivileged daemon processes can enter
    (pytest's tmp_path is 0700)."""
    import tempfile
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(root, 0o755)
    return root


# --------------------------------------------------------------------------
# test CA
# --------------------------------------------------------------------------

@contextlib.contextmanager
def running(prefix: str, make, *configure_args, **configure_kwargs):
    """A private daemon (`make(root)`: PrivateDovecot, PostfixDownstream, ...)
    in a fresh temporary root, configured and started for the `with` block,
    then stopped and its root removed."""
    root = world_readable_tmpdir(prefix)
    peer = make(root)
    try:
        peer.configure(*configure_args, **configure_kwargs)
        peer.start()
        yield peer
    finally:
        peer.stop()
        shutil.rmtree(root, ignore_errors=True)


class TestCA:
    """A throw-away CA made with the openssl CLI; issues server certificates
    for localhost / 127.0.0.1."""

    __test__ = False  # not a pytest class

    def __init__(self, root: Path, name: str = "ca"):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.cert = self.root / f"{name}.pem"
        self.key = self.root / f"{name}.key"
        openssl = tool("openssl", "openssl")
        run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", self.key, "-out", self.cert, "-days", "3", "-subj", f"/CN=POP3conneX test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        os.chmod(self.key, 0o600)
        os.chmod(self.cert, 0o644)

    def issue(self, name: str, sans: tuple[str, ...] = ("DNS:localhost", "IP:127.0.0.1")) -> tuple[Path, Path]:
        """A leaf certificate and key (root-only readable) signed by this CA."""
        openssl = tool("openssl", "openssl")
        cert, key, csr, ext = (self.root / f"{name}{s}" for s in (".pem", ".key", ".csr", ".ext"))
        ext.write_text(f"subjectAltName={','.join(sans)}\nbasicConstraints=critical,CA:FALSE\n"
                       "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
        run([openssl, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", key, "-out", csr, "-subj", f"/CN={name}"])
        run([openssl, "x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.key, "-CAcreateserial",
             "-days", "3", "-out", cert, "-extfile", ext])
        os.chmod(key, 0o600)
        os.chmod(cert, 0o644)
        return cert, key

    @staticmethod
    def spki_pin(cert: Path) -> str:
        """`sha256/<base64 of the SHA-256 of the SubjectPublicKeyInfo>`."""
        import hashlib
        openssl = tool("openssl", "openssl")
        pub = run([openssl, "x509", "-in", cert, "-noout", "-pubkey"]).stdout
        der = run([openssl, "pkey", "-pubin", "-outform", "DER"], input=pub).stdout
        return "sha256/" + base64.b64encode(hashlib.sha256(der).digest()).decode()

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.cert))
        ctx.check_hostname = True
        return ctx


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


# --------------------------------------------------------------------------
# Dovecot
# --------------------------------------------------------------------------

DOVECOT_CONF = """\
# private instance written by tests/system/peers.py
instance_name = pop3connex-test-{tag}
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
protocols = {protocols}
listen = 127.0.0.1
{ssl}
auth_mechanisms = {mechanisms}
auth_username_format = %Ln
disable_plaintext_auth = yes
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {root}/passwd
}}
userdb {{
  driver = passwd-file
  args = {root}/passwd
  default_fields = uid={uid} gid={gid} home={root}/home/%u
}}
mail_location = maildir:{root}/mail/%u
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {lmtp}
  }}
}}
{pop3}
"""

DOVECOT_POP3 = """\
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {pop3}
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {pop3s}
    ssl = yes
  }}
}}
"""


class PrivateDovecot:
    """A private Dovecot: LMTP on `port` (alias `lmtp_port`), and with
    `pop3=True` POP3 with STLS on `pop3_port` and implicit TLS on
    `pop3s_port`. Users live in a passwd-file (passwords stored as PLAIN, so
    SCRAM-SHA-256 works too); `aliases` maps further login/recipient names
    to another user's Maildir (a catch-all mailbox)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "dovecot.conf"
        self.port, self.pop3_port, self.pop3s_port = syslib.free_ports(3)
        self.lmtp_port = self.port
        self.started = False
        self.passwords: dict[str, str] = {}
        self.ca: TestCA | None = None

    def configure(self, users, *, pop3: bool = False, cert: tuple[Path, Path] | None = None,
                  ca: TestCA | None = None, mechanisms: str = "plain", aliases: dict[str, str] | None = None):
        """users: a list of names (unusable passwords) or {name: password}."""
        for name in ["dovecot", "doveadm"]:
            tool(name, "dovecot-core")
        if not Path("/usr/lib/dovecot/lmtp").exists():
            pytest.fail("Dovecot's LMTP server is missing: install the Debian package `dovecot-lmtpd`",
                        pytrace=False)
        if pop3 and not Path("/usr/lib/dovecot/pop3").exists():
            pytest.fail("Dovecot's POP3 server is missing: install the Debian package `dovecot-pop3d`",
                        pytrace=False)
        need_root("Dovecot")
        if isinstance(users, dict):
            self.passwords = dict(users)
        else:
            self.passwords = {u: f"unused-{u}" for u in users}
        self.ca = ca
        nobody = pwd.getpwnam("nobody")
        for d in ["mail", "home"]:
            (self.root / d).mkdir(exist_ok=True)
            os.chown(self.root / d, nobody.pw_uid, nobody.pw_gid)
        lines = [f"{u}:{{PLAIN}}{pw}::::::\n" for u, pw in self.passwords.items()]
        for alias, target in (aliases or {}).items():
            lines.append(f"{alias}:{{PLAIN}}unused-{alias}::::::userdb_mail=maildir:{self.root}/mail/{target}\n")
        (self.root / "passwd").write_text("".join(lines))
        if cert:
            ssl_conf = (f"ssl = yes\nssl_cert = <{cert[0]}\nssl_key = <{cert[1]}\n"
                        "ssl_min_protocol = TLSv1.2\n")
        else:
            ssl_conf = "ssl = no\n"
        protocols = "lmtp pop3" if pop3 else "lmtp"
        self.conf.write_text(DOVECOT_CONF.format(
            root=self.root, lmtp=self.port, uid=nobody.pw_uid, gid=nobody.pw_gid, tag=os.urandom(3).hex(),
            protocols=protocols, ssl=ssl_conf, mechanisms=mechanisms,
            pop3=DOVECOT_POP3.format(pop3=self.pop3_port, pop3s=self.pop3s_port) if pop3 else ""))
        self.has_pop3 = pop3

    def add_user(self, name: str, password: str | None = None) -> str:
        """A new mailbox (Dovecot re-reads the changed passwd-file)."""
        password = password or syslib.new_password()
        self.passwords[name] = password
        self._append_passwd([f"{name}:{{PLAIN}}{password}::::::\n"])
        return password

    def add_aliases(self, aliases: dict[str, str]):
        """LMTP recipient `alias@any` is stored in `target`'s Maildir."""
        self._append_passwd([f"{alias}:{{PLAIN}}unused-{alias}::::::userdb_mail=maildir:{self.root}/mail/{target}\n"
                             for alias, target in aliases.items()])

    def _append_passwd(self, lines: list[str]):
        with open(self.root / "passwd", "a") as f:
            f.write("".join(lines))
        # Dovecot looks at the passwd-file's mtime at most once a second:
        # the next lookup must come in a later second than the last one.
        time.sleep(1.1)

    # Ports found free may be taken by someone else before Dovecot binds
    # them: a start that fails with "address in use" moves to new ports.
    START_ATTEMPTS = 4

    def start(self):
        # The daemonized master keeps its stdio: give it a file, not a pipe.
        out = self.root / "dovecot-start.out"
        self.started = True
        for attempt in range(1, self.START_ATTEMPTS + 1):
            with open(out, "wb") as f:
                rc = subprocess.run([tool("dovecot", "dovecot-core"), "-c", str(self.conf)], stdout=f,
                                    stderr=subprocess.STDOUT, timeout=30, stdin=subprocess.DEVNULL).returncode
            said = out.read_text(errors="replace")
            if rc == 0 or "in use" not in said or attempt == self.START_ATTEMPTS:
                break
            self._move_ports()
        assert rc == 0, f"`dovecot -c {self.conf}` failed: {said}\n{self.log()}"
        syslib.wait_until(self.master_pid, 15, 0.05, "Dovecot master.pid")

        # Ready means: Dovecot's own master holds the listener, and it answers.
        def lmtp_up():
            if not syslib.listener_owned_by(self.master_pid() or -1, self.port):
                return False
            with syslib.Lmtp(LOOPBACK, self.port, timeout=5) as l:
                return l.greeting.code == 220
        syslib.wait_until(lmtp_up, 30, 0.1, f"Dovecot LMTP on port {self.port}")
        if getattr(self, "has_pop3", False):
            def pop3_up():
                if not all(syslib.listener_owned_by(self.master_pid() or -1, p)
                           for p in (self.pop3_port, self.pop3s_port)):
                    return False
                with socket.create_connection((LOOPBACK, self.pop3_port), timeout=5) as s:
                    s.settimeout(5)
                    return s.recv(256).startswith(b"+OK")
            syslib.wait_until(pop3_up, 30, 0.1, f"Dovecot POP3 on port {self.pop3_port}")

    def _move_ports(self):
        """Points every listener of the configuration at new free ports."""
        old = [self.port, self.pop3_port, self.pop3s_port]
        new = syslib.free_ports(3)
        text = self.conf.read_text()
        for o, n in zip(old, new):
            text = re.sub(rf"(?m)^(\s*port = ){o}$", rf"\g<1>{n}", text)
        self.conf.write_text(text)
        self.port, self.pop3_port, self.pop3s_port = new
        self.lmtp_port = self.port

    def master_pid(self) -> int | None:
        try:
            return int((self.root / "run" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self):
        if not self.started:
            return
        self.started = False
        pid = self.master_pid()
        subprocess.run([tool("doveadm", "dovecot-core"), "-c", str(self.conf), "stop"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=30, stdin=subprocess.DEVNULL)
        syslib.reap(pid)

    def maildir(self, user: str) -> Path:
        return self.root / "mail" / user

    def maildir_messages(self, user: str) -> list[bytes]:
        """The files of user's INBOX, LF made CRLF, in name order."""
        md = self.maildir(user)
        files = sorted(p for sub in ("new", "cur") if (md / sub).is_dir() for p in (md / sub).iterdir()
                       if p.is_file())
        return [crlf(f.read_bytes()) for f in files]

    def log(self) -> str:
        try:
            return (self.root / "dovecot.log").read_text(errors="replace")[-3000:]
        except OSError:
            return "(no Dovecot log)"

    # ---- filling and reading ----------------------------------------------
    def deliver(self, rcpts, msg: bytes, sender: str = "sender@example.org"):
        """Delivers over LMTP; asserts every recipient got 250."""
        if isinstance(rcpts, str):
            rcpts = [rcpts]
        with syslib.Lmtp(LOOPBACK, self.port) as l:
            r = l.send_mail(sender, rcpts, msg)
            l.quit()
        assert r == {rc: 250 for rc in rcpts}, f"Dovecot LMTP refused: {r}\n{self.log()}"

    def pop3(self, user: str, implicit: bool = True) -> syslib.Pop3:
        """A logged-in raw POP3 session over TLS (caller QUITs/closes)."""
        assert self.ca is not None, "configure(ca=...) first"
        if implicit:
            p = syslib.Pop3.connect(LOOPBACK, self.pop3s_port, self.ca.client_context(), timeout=30)
        else:
            p = syslib.Pop3.connect(LOOPBACK, self.pop3_port, None, timeout=30)
            p.stls(self.ca.client_context())
        p.login(user, self.passwords[user])
        return p

    def upstream(self, user: str) -> list[tuple[str, bytes]]:
        """(UIDL, message exactly as RETR serves it) for every message."""
        with self.pop3(user) as p:
            uidl = p.uidl()
            out = [(uidl[n], p.retr(n)) for n in sorted(uidl)]
            p.quit()
        return out

    def uidls(self, user: str) -> list[str]:
        with self.pop3(user) as p:
            u = p.uidl()
            p.quit()
        return [u[n] for n in sorted(u)]

    def clear(self, user: str):
        """Deletes every message of user (DELE all, QUIT)."""
        with self.pop3(user) as p:
            n, _ = p.stat()
            for i in range(1, n + 1):
                p.dele(i)
            p.quit()


def crlf(raw: bytes) -> bytes:
    out = re.sub(rb"(?<!\r)\n", b"\r\n", raw)
    return out if out.endswith(CRLF) or not out else out + CRLF


# --------------------------------------------------------------------------
# Postfix
# --------------------------------------------------------------------------

# Every service a mail system that receives over SMTP and delivers locally
# or over LMTP needs; no chroot (the tests do not populate a chroot jail).
MASTER_CF = """\
{listen} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

POSTFIX_BASE_CF = """\
# private test instance written by tests/system/peers.py
compatibility_level = 3.6
queue_directory = {root}/spool
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
maillog_file = {root}/postfix.log
maillog_file_prefixes = {root}
myhostname = postfix.test.invalid
mydomain = test.invalid
myorigin = $myhostname
mydestination =
relayhost =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_peername_lookup = no
alias_maps =
alias_database =
biff = no
# nothing may leave this machine: every other transport is an error
default_transport = error:5.7.1 this test instance delivers nowhere but to POP3conneX
relay_transport = error:5.7.1 this test instance delivers nowhere but to POP3conneX
local_transport = error:5.7.1 this test instance has no local delivery
# short retry times, so a deferred message is retried within the test
queue_run_delay = 2s
minimal_backoff_time = 2s
maximal_backoff_time = 4s
delay_warning_time = 0
"""

POSTFIX_DOWNSTREAM_CF = """\
# downstream: STARTTLS offered, virtual mailboxes delivered into Maildirs
smtpd_tls_security_level = may
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_loglevel = 1
smtpd_tls_received_header = yes
local_header_rewrite_clients =
virtual_mailbox_domains = {domain}
virtual_mailbox_base = {root}/vmail
virtual_mailbox_maps = hash:{conf}/vmailbox
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
smtpd_recipient_restrictions = check_recipient_access hash:{conf}/rcpt_access, permit_mynetworks, reject_unauth_destination
"""


class PrivatePostfix:
    """A private Postfix: own config, queue and data directories, smtpd on
    127.0.0.1:smtp_port. Subclasses or callers write main.cf."""

    def __init__(self, root: Path, smtp_port: int, domain: str):
        self.root = Path(root)
        self.domain = domain
        self.conf = self.root / "etc"
        self.smtp_port = smtp_port
        self.log_path = self.root / "postfix.log"
        self.started = False

    @staticmethod
    def check_installed():
        for name in ["postfix", "postconf", "postmap", "postqueue"]:
            tool(name, "postfix")
        need_root("Postfix")
        import grp
        for kind, name, lookup in [("user", "postfix", pwd.getpwnam), ("group", "postdrop", grp.getgrnam)]:
            try:
                lookup(name)
            except KeyError:
                pytest.fail(f"{kind} `{name}` missing: install the Debian package `postfix`", pytrace=False)

    def postconf(self, *args: str) -> str:
        return run([tool("postconf", "postfix"), "-c", self.conf, *args]).stdout.decode()

    def postmap(self, table: Path):
        run([tool("postmap", "postfix"), "-c", self.conf, f"hash:{table}"])

    def write_config(self, main_cf: str):
        self.conf.mkdir(exist_ok=True)
        (self.root / "spool").mkdir(exist_ok=True)
        (self.root / "data").mkdir(exist_ok=True)
        (self.conf / "main.cf").write_text(main_cf)
        (self.conf / "master.cf").write_text(MASTER_CF.format(listen=f"{LOOPBACK}:{self.smtp_port}"))

    def check(self):
        # data_directory must belong to the mail_owner before `postfix check`
        pw = pwd.getpwnam("postfix")
        os.chown(self.root / "data", pw.pw_uid, pw.pw_gid)
        cp = run([tool("postfix", "postfix"), "-c", self.conf, "check"], check=False)
        assert cp.returncode == 0, f"`postfix check` failed:\n{cp.stdout.decode()}{cp.stderr.decode()}\n{self.log()}"

    def start(self):
        # The daemonized master may keep its stdio: give it a file, not a pipe.
        out = self.root / "postfix-start.out"
        self.started = True
        # A port found free may be taken before the master binds it: a start
        # that fails with "address in use" moves smtpd to a new port.
        for attempt in range(1, 5):
            with open(out, "wb") as f:
                rc = subprocess.run([tool("postfix", "postfix"), "-c", str(self.conf), "start"], stdout=f,
                                    stderr=subprocess.STDOUT, timeout=60, stdin=subprocess.DEVNULL).returncode
            said = out.read_text(errors="replace") + self.log()
            if rc == 0 or "in use" not in said or attempt == 4:
                break
            self.smtp_port = syslib.free_port()
            (self.conf / "master.cf").write_text(MASTER_CF.format(listen=f"{LOOPBACK}:{self.smtp_port}"))
        assert rc == 0, f"`postfix start` failed:\n{out.read_text(errors='replace')}\nlog:\n{self.log()}"

        # Ready means: this instance's master holds the listener (not some
        # other SMTP server on the port), and smtpd answers.
        def banner():
            if not syslib.listener_owned_by(self.master_pid() or -1, self.smtp_port):
                return False
            with socket.create_connection((LOOPBACK, self.smtp_port), timeout=5) as s:
                s.settimeout(5)
                return s.recv(512).startswith(b"220 ")
        syslib.wait_until(banner, 30, 0.1, f"Postfix smtpd on port {self.smtp_port}")

    def reload(self):
        run([tool("postfix", "postfix"), "-c", self.conf, "reload"])

    def master_pid(self) -> int | None:
        try:
            return int((self.root / "spool" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self):
        if not self.started:
            return
        self.started = False
        pid = self.master_pid()
        subprocess.run([tool("postfix", "postfix"), "-c", str(self.conf), "stop"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=30, stdin=subprocess.DEVNULL)
        syslib.reap(pid)

    def flush(self):
        run([tool("postqueue", "postfix"), "-c", self.conf, "-f"], check=False)

    def queue(self) -> str:
        return run([tool("postqueue", "postfix"), "-c", self.conf, "-p"], check=False).stdout.decode(errors="replace")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no Postfix log)"


class PostfixDownstream(PrivatePostfix):
    """Postfix as a downstream MTA: STARTTLS with a certificate from the test
    CA (`smtpd_tls_security_level = may`), virtual mailboxes of `domain`
    delivered by Postfix's virtual(8) into Maildirs, and an access map that
    makes chosen recipients fail with 450 (temporary) or 550 (permanent)."""

    def configure(self, mailboxes: list[str], cert: tuple[Path, Path]):
        self.check_installed()
        nobody = pwd.getpwnam("nobody")
        vmail = self.root / "vmail"
        vmail.mkdir(exist_ok=True)
        os.chown(vmail, nobody.pw_uid, nobody.pw_gid)
        self.write_config(POSTFIX_BASE_CF.format(root=self.root) + POSTFIX_DOWNSTREAM_CF.format(
            root=self.root, conf=self.conf, cert=cert[0], key=cert[1], domain=self.domain,
            uid=nobody.pw_uid, gid=nobody.pw_gid))
        (self.conf / "vmailbox").write_text(
            "".join(f"{m}@{self.domain} {self.domain}/{m}/\n" for m in mailboxes))
        self.postmap(self.conf / "vmailbox")
        self.set_refusals({})
        self.check()

    def set_refusals(self, refusals: dict[str, str]):
        """{address: "450 4.2.1 text" | "550 5.1.1 text"}; applied at once
        (rebuilds the map and reloads a running Postfix)."""
        table = self.conf / "rcpt_access"
        table.write_text("".join(f"{a} {r}\n" for a, r in refusals.items()))
        self.postmap(table)
        if self.started:
            self.reload()
            time.sleep(0.5)

    def messages(self, mailbox: str) -> list[bytes]:
        md = self.root / "vmail" / self.domain / mailbox
        files = sorted(p for sub in ("new", "cur") if (md / sub).is_dir() for p in (md / sub).iterdir()
                       if p.is_file())
        return [crlf(f.read_bytes()) for f in files]


# --------------------------------------------------------------------------
# a scripted POP3 server (misbehaving on purpose)
# --------------------------------------------------------------------------

class ScriptedPop3:
    """A small POP3 server on 127.0.0.1 with TLS (implicit or STLS) that
    serves `messages` to any USER/PASS or AUTH PLAIN login and misbehaves as
    `fault` says:

      oversized-status  the greeting is a 100 KB status line
      endless-line      the UIDL reply never ends its first line
      retr-longer       LIST/UIDL claim 200 octets; RETR sends ~300 KB
      stls-err          STLS is answered with -ERR
      stls-inject       "+OK" to STLS and an injected "+OK" in the same packet
      invalid-status    the reply to STAT and UIDL is "200 OK"
      disconnect-retr   RETR sends half the message, then closes
      slow-drip         RETR is sent one byte per second
      none              behaves

    It records the commands it received in `commands`."""

    def __init__(self, cert: tuple[Path, Path], messages: list[bytes], fault: str = "none", implicit: bool = True):
        self.ctx = server_context(*cert)
        self.messages = messages
        self.fault = fault
        self.implicit = implicit
        self.commands: list[bytes] = []
        self.errors: list[str] = []
        self.deleted: set[int] = set()
        self.stopping = threading.Event()
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((LOOPBACK, 0))
        self.lsock.listen(8)
        self.lsock.settimeout(0.2)
        self.port = self.lsock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stopping.is_set():
            try:
                c, _ = self.lsock.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._serve_guarded, args=(c,), daemon=True).start()

    def stop(self):
        self.stopping.set()
        try:
            self.lsock.close()
        except OSError:
            pass
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass
        self.thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.stop()

    def _serve_guarded(self, c: socket.socket):
        try:
            self._serve(c)
        except (OSError, ssl.SSLError, syslib.Closed):
            pass
        except Exception as e:  # noqa: BLE001 - a harness bug: reported by the test
            self.errors.append(repr(e))
        finally:
            try:
                c.close()
            except OSError:
                pass

    def _size(self, i: int) -> int:
        return 200 if self.fault == "retr-longer" else len(self.messages[i])

    def _body(self, i: int) -> bytes:
        m = self.messages[i]
        if self.fault == "retr-longer":
            m = m + b"".join(b"padding line %06d %s\r\n" % (k, b"p" * 50) for k in range(4500))
        return syslib.dot_stuff(m) + b".\r\n"

    def _serve(self, c: socket.socket):
        c.settimeout(60)
        if self.implicit:
            c = self.ctx.wrap_socket(c, server_side=True)
        ls = syslib.LineSock(c, timeout=60)
        if self.fault == "oversized-status":
            ls.send(b"+OK " + b"A" * 100_000 + CRLF)
        else:
            ls.send(b"+OK scripted POP3 ready\r\n")
        while not self.stopping.is_set():
            line = ls.readline(limit=8192)
            self.commands.append(line)
            verb, _, arg = line.strip().partition(b" ")
            verb = verb.upper()
            live = [i for i in range(len(self.messages)) if i not in self.deleted]
            if verb == b"CAPA":
                caps = [b"USER", b"UIDL", b"TOP", b"SASL PLAIN"]
                if not self.implicit and not isinstance(ls.sock, ssl.SSLSocket):
                    caps.append(b"STLS")
                ls.send(b"+OK\r\n" + b"".join(x + CRLF for x in caps) + b".\r\n")
            elif verb == b"STLS":
                if self.fault == "stls-err":
                    ls.send(b"-ERR TLS not available today\r\n")
                    continue
                if self.fault == "stls-inject":
                    ls.send(b"+OK begin TLS\r\n+OK injected before the handshake\r\n")
                else:
                    ls.send(b"+OK begin TLS\r\n")
                c = self.ctx.wrap_socket(ls.sock, server_side=True)
                ls = syslib.LineSock(c, timeout=60)
            elif verb in (b"USER", b"PASS"):
                ls.send(b"+OK\r\n")
            elif verb == b"AUTH":
                if not arg.upper().startswith(b"PLAIN"):
                    ls.send(b"-ERR unsupported mechanism\r\n")
                elif len(arg.split()) == 1:
                    ls.send(b"+ \r\n")
                    self.commands.append(ls.readline(limit=8192))
                    ls.send(b"+OK logged in\r\n")
                else:
                    ls.send(b"+OK logged in\r\n")
            elif verb == b"STAT":
                if self.fault == "invalid-status":
                    ls.send(b"200 OK\r\n")
                else:
                    ls.send(b"+OK %d %d\r\n" % (len(live), sum(self._size(i) for i in live)))
            elif verb == b"LIST" and not arg:
                ls.send(b"+OK\r\n" + b"".join(b"%d %d\r\n" % (i + 1, self._size(i)) for i in live) + b".\r\n")
            elif verb == b"LIST":
                i = int(arg) - 1
                ls.send(b"+OK %d %d\r\n" % (i + 1, self._size(i)))
            elif verb == b"UIDL":
                if self.fault == "invalid-status":
                    ls.send(b"200 OK\r\n")
                elif self.fault == "endless-line":
                    ls.send(b"+OK ")
                    chunk = b"U" * 65536
                    sent = 0
                    while not self.stopping.is_set() and sent < (256 << 20):
                        ls.send(chunk)
                        sent += len(chunk)
                    return
                elif arg:
                    i = int(arg) - 1
                    ls.send(b"+OK %d scripted-%d\r\n" % (i + 1, i))
                else:
                    ls.send(b"+OK\r\n" + b"".join(b"%d scripted-%d\r\n" % (i + 1, i) for i in live) + b".\r\n")
            elif verb in (b"RETR", b"TOP"):
                i = int(arg.split()[0]) - 1
                data = b"+OK message follows\r\n" + self._body(i)
                if self.fault == "disconnect-retr":
                    ls.send(data[: len(data) // 2])
                    time.sleep(0.2)
                    return
                if self.fault == "slow-drip":
                    for k in range(len(data)):
                        if self.stopping.is_set():
                            return
                        ls.send(data[k:k + 1])
                        time.sleep(1)
                    continue
                ls.send(data)
            elif verb == b"DELE":
                self.deleted.add(int(arg) - 1)
                ls.send(b"+OK deleted\r\n")
            elif verb == b"NOOP":
                ls.send(b"+OK\r\n")
            elif verb == b"RSET":
                self.deleted.clear()
                ls.send(b"+OK\r\n")
            elif verb == b"QUIT":
                ls.send(b"+OK bye\r\n")
                return
            else:
                ls.send(b"-ERR unknown command\r\n")


# --------------------------------------------------------------------------
# OAuth 2.0 token endpoint
# --------------------------------------------------------------------------

class TokenEndpoint:
    """An HTTPS token endpoint (RFC 6749 section 6, refresh_token grant) on
    127.0.0.1 with a certificate from the test CA. `mint(user)` makes the
    access token; every successful refresh rotates the refresh token.
    Records every request in `requests` (form fields)."""

    def __init__(self, cert: tuple[Path, Path], client_id: str, refresh_token: str, mint,
                 client_secret: str | None = None, expires_in: int = 120):
        self.client_id = client_id
        self.client_secret = client_secret
        self.refresh_token = refresh_token
        self.mint = mint
        self.expires_in = expires_in
        self.requests: list[dict] = []
        self.issued: list[str] = []
        self.lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def reply(self, code: int, doc: dict):
                body = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self.reply(405, {"error": "invalid_request"})

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(min(n, 65536)).decode(errors="replace")
                form = {k: v[0] for k, v in urllib.parse.parse_qs(raw, keep_blank_values=True).items()}
                auth = self.headers.get("Authorization", "")
                if auth.lower().startswith("basic "):
                    try:
                        cid, _, sec = base64.b64decode(auth[6:]).decode().partition(":")
                        form.setdefault("client_id", urllib.parse.unquote_plus(cid))
                        form["client_secret"] = urllib.parse.unquote_plus(sec)
                    except ValueError:
                        pass
                with endpoint.lock:
                    endpoint.requests.append({"path": self.path, "content_type": self.headers.get("Content-Type"),
                                              **form})
                    if self.path != "/token":
                        return self.reply(404, {"error": "not_found"})
                    if form.get("grant_type") != "refresh_token":
                        return self.reply(400, {"error": "unsupported_grant_type"})
                    if form.get("client_id") != endpoint.client_id or (
                            endpoint.client_secret is not None and form.get("client_secret") != endpoint.client_secret):
                        return self.reply(401, {"error": "invalid_client"})
                    if form.get("refresh_token") != endpoint.refresh_token:
                        return self.reply(400, {"error": "invalid_grant"})
                    access = endpoint.mint()
                    new_refresh = "rt-" + os.urandom(12).hex()
                    endpoint.refresh_token = new_refresh
                    endpoint.issued.append(new_refresh)
                    return self.reply(200, {"access_token": access, "token_type": "Bearer",
                                            "expires_in": endpoint.expires_in, "refresh_token": new_refresh})

        self.httpd = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = server_context(*cert).wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}/token"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


# --------------------------------------------------------------------------
# trace headers added by the delivering peers
# --------------------------------------------------------------------------

PEER_TRACE = ("return-path", "delivered-to", "received", "x-original-to")
_HEADER_RE = re.compile(rb"([A-Za-z0-9-]+):([^\r\n]*)\r\n((?:[ \t][^\r\n]*\r\n)*)")


def split_trace(msg: bytes, names=PEER_TRACE) -> tuple[list[tuple[str, bytes]], bytes]:
    """Leading header fields named in `names` (name, raw field bytes) and
    the rest of the message."""
    found = []
    rest = msg
    while True:
        m = _HEADER_RE.match(rest)
        if not m or m.group(1).decode().lower() not in names:
            return found, rest
        found.append((m.group(1).decode().lower(), m.group(0)))
        rest = rest[m.end():]
