"""Helpers for the POP3conneX system tests: server control, raw POP3 and LMTP
clients, message builders. Standard library only.

Every network call has a timeout and every wait loop is bounded in time.
Tests only ever talk to loopback addresses.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"
ALT_LOOPBACK = "127.0.0.2"
CRLF = b"\r\n"


# --------------------------------------------------------------------------
# small utilities
# --------------------------------------------------------------------------

def free_port(host: str = LOOPBACK) -> int:
    """A port that was free a moment ago (bind to :0, close, reuse)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(n: int, host: str = LOOPBACK) -> list[int]:
    """n distinct ports that were free a moment ago: all bound at once, so
    the kernel cannot hand out the same one twice."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tcp_listen_inodes(port: int) -> set[int]:
    """Socket inodes of TCP sockets in LISTEN state on `port` (any local
    address), from /proc/net/tcp and /proc/net/tcp6."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            cols = row.split()
            # sl local_address rem_address st ... uid timeout inode
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(int(cols[9]))
    return inodes


def _socket_inodes(pid: int) -> set[int]:
    """Socket inodes among the open file descriptors of process `pid`."""
    out = set()
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except (FileNotFoundError, ProcessLookupError):
        return out
    for fd in fds:
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def listener_owned_by(pid: int, port: int) -> bool:
    """True if the process `pid` itself holds a socket listening on TCP
    `port`: a listener of someone else on that port does not count."""
    listening = _tcp_listen_inodes(port)
    return bool(listening) and bool(listening & _socket_inodes(pid))


# Lines a test wants in the pytest terminal summary (conftest.py prints
# them): what a randomised test actually exercised, visible without -s.
SUMMARY: list[str] = []


def summary(line: str) -> None:
    """Prints `line` now and again in the terminal summary at the end."""
    print(line)
    SUMMARY.append(line)


def reap(pid: int | None, timeout: float = 15) -> None:
    """Waits for a daemon we started (and asked to stop) to exit; SIGKILLs
    it if it has not exited within `timeout` seconds."""
    if pid is None:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_until(pred, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Polls pred() until it returns a truthy value; bounded by timeout."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - reported on timeout
            last_exc = e
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}; last error: {last_exc!r}")


def new_password() -> str:
    # URL-safe alphabet: safe inside mpop/fetchmail config quoting.
    return "pw" + secrets.token_urlsafe(18)


def unique_name(prefix: str = "u") -> str:
    return f"{prefix}{secrets.token_hex(4)}"


# --------------------------------------------------------------------------
# TOML editing (the generated config is edited in place; unknown keys are
# errors for the server, so only keys from the contract are ever set)
# --------------------------------------------------------------------------

def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        # an inline table; keys quoted, so any string is a valid key
        return "{ " + ", ".join(f"{toml_value(str(k))} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"unsupported TOML value {v!r}")


def toml_set(text: str, section: str, key: str, value) -> str:
    """Sets `key = value` inside `[section]`, replacing an existing
    (possibly multi-line array) value, or appending the key to the section,
    or appending the section."""
    rendered = f"{key} = {toml_value(value)}"
    lines = text.split("\n")
    sec_re = re.compile(r"^\s*\[([^\[\]]+)\]\s*(#.*)?$")
    start = None
    end = len(lines)
    for i, line in enumerate(lines):
        m = sec_re.match(line)
        if m:
            if start is not None:
                end = i
                break
            if m.group(1).strip() == section:
                start = i
    if start is None:
        if lines and lines[-1].strip() != "":
            lines.append("")
        lines += [f"[{section}]", rendered, ""]
        return "\n".join(lines)
    key_re = re.compile(r"^\s*" + re.escape(key) + r"\s*=")
    for i in range(start + 1, end):
        if key_re.match(lines[i]):
            j = i
            rhs = lines[i].split("=", 1)[1]
            rhs_code = rhs.split("#", 1)[0]
            if rhs_code.strip().startswith("[") and rhs_code.count("[") > rhs_code.count("]"):
                depth = rhs_code.count("[") - rhs_code.count("]")
                while depth > 0 and j + 1 < end:
                    j += 1
                    code = lines[j].split("#", 1)[0]
                    depth += code.count("[") - code.count("]")
            lines[i : j + 1] = [rendered]
            return "\n".join(lines)
    # insert after the last non-blank line of the section
    ins = end
    while ins - 1 > start and lines[ins - 1].strip() == "":
        ins -= 1
    lines.insert(ins, rendered)
    return "\n".join(lines)


# --------------------------------------------------------------------------
# server control
# --------------------------------------------------------------------------

@dataclass
class Ports:
    pop3s: int
    pop3: int
    lmtp: int


class ServerError(AssertionError):
    pass


class Server:
    """One POP3conneX data directory and (at most) one running `serve`."""

    def __init__(self, binary: Path, data_dir: Path, settings: dict | None = None):
        self.binary = Path(binary)
        self.data_dir = Path(data_dir)
        self.config = self.data_dir / "pop3connex.toml"
        self.ca = self.data_dir / "tls" / "ca.pem"
        self.log_path = self.data_dir.parent / (self.data_dir.name + "-server.log")
        self.proc: subprocess.Popen | None = None
        self.ports: Ports | None = None
        self.settings = settings or {}
        self.starts = 0

    # ---- CLI -------------------------------------------------------------
    def env(self) -> dict:
        env = dict(os.environ)
        env["POP3CONNEX_CONFIG"] = str(self.config)
        env.setdefault("RUST_BACKTRACE", "1")
        return env

    def cli(self, *args: str, input: bytes | None = None, timeout: float = 60,
            check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.binary), "--config", str(self.config), *args]
        try:
            cp = subprocess.run(cmd, input=input if input is not None else b"",
                                capture_output=True, timeout=timeout, env=self.env(),
                                cwd=str(self.data_dir))
        except subprocess.TimeoutExpired as e:
            raise ServerError(f"command timed out after {timeout}s: {cmd}") from e
        if check and cp.returncode != 0:
            raise ServerError(
                f"command failed (exit {cp.returncode}): {' '.join(cmd)}\n"
                f"stdout: {cp.stdout.decode(errors='replace')}\n"
                f"stderr: {cp.stderr.decode(errors='replace')}")
        return cp

    def init(self, hostname: str = "localhost"):
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        cmd = [str(self.binary), "init", "--data-dir", str(self.data_dir), "--hostname", hostname]
        try:
            cp = subprocess.run(cmd, capture_output=True, timeout=60, cwd=str(self.data_dir.parent),
                                stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise ServerError(f"init timed out: {cmd}") from e
        if cp.returncode != 0:
            raise ServerError(f"init failed (exit {cp.returncode}): {' '.join(cmd)}\n"
                              f"stdout: {cp.stdout.decode(errors='replace')}\n"
                              f"stderr: {cp.stderr.decode(errors='replace')}")
        if not self.config.is_file():
            raise ServerError(f"init did not create {self.config}; stdout: {cp.stdout!r}")
        self.init_output = cp.stdout.decode(errors="replace")
        self.configure()
        return cp

    def configure(self, **extra):
        """Rewrites listener addresses to fresh loopback ports and applies
        settings: {("section", "key"): value}."""
        self.assign_ports()
        text = self.config.read_text()
        for (section, key), value in {**self.settings, **extra}.items():
            text = toml_set(text, section, key, value)
        self.config.write_text(text)

    def assign_ports(self):
        """Points the three listeners at ports that were free a moment ago."""
        pop3s, pop3, lmtp = free_ports(3)
        self.ports = Ports(pop3s=pop3s, pop3=pop3, lmtp=lmtp)
        text = self.config.read_text()
        text = toml_set(text, "pop3", "implicit_tls", [f"{LOOPBACK}:{self.ports.pop3s}"])
        text = toml_set(text, "pop3", "starttls", [f"{LOOPBACK}:{self.ports.pop3}"])
        text = toml_set(text, "lmtp", "listen", [f"{LOOPBACK}:{self.ports.lmtp}"])
        self.config.write_text(text)

    def set_option(self, section: str, key: str, value):
        self.config.write_text(toml_set(self.config.read_text(), section, key, value))

    def add_user(self, name: str, password: str):
        self.cli("user", "add", name, "--password-stdin", input=password.encode() + b"\n")

    def mailbox_stat(self, name: str) -> tuple[int, int]:
        out = self.cli("mailbox", "stat", name).stdout.decode()
        m1 = re.search(r"messages:\s*(\d+)", out)
        m2 = re.search(r"octets:\s*(\d+)", out)
        if not (m1 and m2):
            raise ServerError(f"`mailbox stat {name}` output not as contracted: {out!r}")
        return int(m1.group(1)), int(m2.group(1))

    # ---- process ---------------------------------------------------------
    # A port found free is only free until someone else binds it (another
    # test, another suite on the machine): starts that fail with "address in
    # use" are retried on new ports, a bounded number of times.
    START_ATTEMPTS = 4

    def start(self, timeout: float = 30):
        assert self.proc is None or self.proc.poll() is not None, "server already running"
        first_start = self.starts == 0
        for attempt in range(1, self.START_ATTEMPTS + 1):
            log_from = len(self.log_bytes())
            self._spawn()
            try:
                self.wait_ready(timeout)
                return self
            except ServerError:
                log = self.log_bytes()[log_from:].decode(errors="replace")
                in_use = self.proc.poll() is not None and (
                    "Address already in use" in log or "os error 98" in log)
                if not in_use or attempt == self.START_ATTEMPTS:
                    raise
            # Only a first start moves to new ports: after that, tests may
            # have handed the ports to clients, so a restart retries the
            # same ones (whoever took them may let go again).
            if first_start:
                self.assign_ports()
            else:
                time.sleep(0.5 * attempt)
        raise AssertionError("unreachable: the last attempt raises")

    def _spawn(self):
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== test harness: start #{self.starts} ====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [str(self.binary), "--config", str(self.config), "serve"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=str(self.data_dir), env=self.env())

    def wait_ready(self, timeout: float = 30):
        """Waits until each port accepts connections AND the listening socket
        belongs to our server process (not to whoever else may hold the
        port), while the process is alive."""
        deadline = time.monotonic() + timeout
        pending = [self.ports.pop3s, self.ports.pop3, self.ports.lmtp]
        while pending:
            if self.proc.poll() is not None:
                raise ServerError(f"server exited with {self.proc.returncode} during startup; log:\n"
                                  + self.log_text()[-4000:])
            if time.monotonic() > deadline:
                foreign = [p for p in pending if _tcp_listen_inodes(p)]
                raise ServerError(f"server ports {pending} not accepting after {timeout}s"
                                  + (f" (held by another process: {foreign})" if foreign else "")
                                  + "; log:\n" + self.log_text()[-4000:])
            port = pending[0]
            if not listener_owned_by(self.proc.pid, port):
                time.sleep(0.05)
                continue
            try:
                with socket.create_connection((LOOPBACK, port), timeout=1):
                    pass
                pending.pop(0)
            except OSError:
                time.sleep(0.05)
        if self.proc.poll() is not None:
            raise ServerError(f"server exited with {self.proc.returncode} right after binding; log:\n"
                              + self.log_text()[-4000:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM, then SIGKILL after timeout. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def kill9(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self):
        self.stop()
        return self.start()

    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise ServerError("no VmRSS")

    def log_text(self) -> str:
        try:
            return self.log_path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_bytes(self) -> bytes:
        try:
            return self.log_path.read_bytes()
        except FileNotFoundError:
            return b""

    # ---- clients ---------------------------------------------------------
    def tls_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        return ctx

    def pop3s(self, **kw) -> "Pop3":
        return Pop3.connect(LOOPBACK, self.ports.pop3s, tls_ctx=self.tls_context(), **kw)

    def pop3(self, **kw) -> "Pop3":
        return Pop3.connect(LOOPBACK, self.ports.pop3, **kw)

    def pop3_stls(self, **kw) -> "Pop3":
        p = self.pop3(**kw)
        p.stls(self.tls_context())
        return p

    def lmtp(self, **kw) -> "Lmtp":
        return Lmtp(LOOPBACK, self.ports.lmtp, **kw)

    def deliver(self, rcpts, msg: bytes, sender: str = "sender@example.org") -> dict:
        """Delivers msg over LMTP; returns {rcpt: reply code}. Asserts the
        transaction itself works."""
        if isinstance(rcpts, str):
            rcpts = [rcpts]
        with self.lmtp() as l:
            return l.send_mail(sender, rcpts, msg)

    def fetch_all(self, user: str, password: str, strip: bool = True) -> list[bytes]:
        """All messages of user, via POP3S, without deleting; with the
        delivery trace headers removed (and checked) unless strip=False."""
        with self.pop3s() as p:
            p.login(user, password)
            n, _ = p.stat()
            msgs = p.retr_many(range(1, n + 1))
            p.quit()
        return [strip_trace(m, rcpt=addr(user)) for m in msgs] if strip else msgs


def addr(user: str) -> str:
    return f"{user}@localhost"


# The server, as the final delivery agent, may prepend trace headers
# (RFC 5321 4.4: Return-Path; Delivered-To; Received). Everything after them
# must be the delivered message byte for byte.
TRACE_HEADERS = ("return-path", "delivered-to", "received")
_HEADER_RE = re.compile(rb"([A-Za-z0-9-]+):([^\r\n]*)\r\n((?:[ \t][^\r\n]*\r\n)*)")


def trace_headers(got: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """Splits leading trace headers off a stored message."""
    rest = got
    found = []
    while True:
        m = _HEADER_RE.match(rest)
        if not m or m.group(1).decode().lower() not in TRACE_HEADERS:
            return found, rest
        found.append((m.group(1).decode().lower(), (m.group(2) + m.group(3)).decode(errors="replace").strip()))
        rest = rest[m.end():]


def strip_trace(got: bytes, sender: str | None = "sender@example.org", rcpt: str | None = None) -> bytes:
    found, rest = trace_headers(got)
    for name, value in found:
        if name == "return-path" and sender is not None:
            assert value == f"<{sender}>", f"Return-Path {value!r} does not match MAIL FROM <{sender}>"
        if name == "delivered-to" and rcpt is not None:
            assert rcpt.lower() in value.lower(), f"Delivered-To {value!r} does not name {rcpt}"
    return rest


# --------------------------------------------------------------------------
# line-oriented socket
# --------------------------------------------------------------------------

class Closed(Exception):
    """The peer closed the connection (or reset it)."""


class LineSock:
    def __init__(self, sock: socket.socket, timeout: float = 15):
        self.sock = sock
        self.sock.settimeout(timeout)
        self.buf = b""

    def send(self, data: bytes):
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError) as e:
            raise Closed(repr(e)) from e

    def _fill(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError) as e:
            raise Closed(repr(e)) from e
        if not chunk:
            raise Closed("EOF")
        self.buf += chunk

    def readline(self, limit: int = 1 << 20) -> bytes:
        """One line including its terminator (LF-terminated)."""
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line, self.buf = self.buf[: i + 1], self.buf[i + 1 :]
                return line
            if len(self.buf) > limit:
                raise AssertionError(f"line longer than {limit} bytes from server")
            self._fill()

    def read_available(self, wait: float) -> bytes:
        """Whatever arrives within `wait` seconds (b'' if nothing). Raises
        Closed on EOF."""
        if self.buf:
            b, self.buf = self.buf, b""
            return b
        old = self.sock.gettimeout()
        self.sock.settimeout(wait)
        try:
            chunk = self.sock.recv(65536)
        except (socket.timeout, TimeoutError):
            return b""
        except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError) as e:
            raise Closed(repr(e)) from e
        finally:
            self.sock.settimeout(old)
        if not chunk:
            raise Closed("EOF")
        return chunk

    def is_closed(self, wait: float) -> bool:
        """True if the peer closes within `wait` seconds (data is drained)."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                self.read_available(max(0.01, deadline - time.monotonic()))
            except Closed:
                return True
            except OSError:
                return True
        return False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def connect(host: str, port: int, timeout: float = 15, source: str | None = None) -> socket.socket:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout)
    if source:
        s.bind((source, 0))
    s.connect((host, port))
    return s


# --------------------------------------------------------------------------
# POP3
# --------------------------------------------------------------------------

class PopError(AssertionError):
    def __init__(self, line: str):
        super().__init__(line)
        self.line = line


class Pop3:
    """A strict raw POP3 client. Every reply line is recorded in `transcript`."""

    def __init__(self, ls: LineSock, host: str):
        self.ls = ls
        self.host = host
        self.transcript: list[bytes] = []
        self.tls = isinstance(ls.sock, ssl.SSLSocket)
        self.greeting = self.status(expect_ok=True)

    @classmethod
    def connect(cls, host: str, port: int, tls_ctx: ssl.SSLContext | None = None,
                timeout: float = 15, source: str | None = None) -> "Pop3":
        s = connect(host, port, timeout, source)
        if tls_ctx is not None:
            try:
                s = tls_ctx.wrap_socket(s, server_hostname="localhost")
            except Exception:
                s.close()
                raise
        return cls(LineSock(s, timeout), host)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.ls.close()

    def close(self):
        self.ls.close()

    def send(self, data: bytes):
        self.ls.send(data)

    def line(self) -> bytes:
        l = self.ls.readline()
        self.transcript.append(l)
        return l

    def status(self, expect_ok: bool | None = None) -> str:
        raw = self.line()
        assert raw.endswith(b"\r\n"), f"status line not CRLF-terminated: {raw!r}"
        s = raw[:-2].decode("utf-8", "replace")
        assert s.startswith("+OK") or s.startswith("-ERR") or s.startswith("+ ") or s == "+", \
            f"not a POP3 status line: {raw!r}"
        if expect_ok is True and not s.startswith("+OK"):
            raise PopError(s)
        if expect_ok is False and not s.startswith("-ERR"):
            raise AssertionError(f"expected -ERR, got {s!r}")
        return s

    def cmd(self, line: str | bytes, expect_ok: bool | None = True) -> str:
        if isinstance(line, str):
            line = line.encode()
        self.send(line + CRLF)
        return self.status(expect_ok)

    def multiline_raw(self) -> bytes:
        """The body of a multi-line response, dot-unstuffed, with each line's
        terminator kept exactly as sent."""
        out = []
        while True:
            l = self.line()
            assert l.endswith(b"\r\n"), f"multi-line response line without CRLF: {l[-80:]!r}"
            if l == b".\r\n":
                return b"".join(out)
            if l.startswith(b"."):
                l = l[1:]
            out.append(l)

    def multiline(self) -> list[str]:
        return [l.decode("utf-8", "replace") for l in self.multiline_raw().split(b"\r\n")[:-1]]

    # commands
    def capa(self) -> list[str]:
        self.cmd("CAPA")
        return self.multiline()

    def stls(self, ctx: ssl.SSLContext):
        self.cmd("STLS")
        assert not self.ls.buf, f"server sent bytes after STLS +OK: {self.ls.buf!r}"
        self.ls.sock = ctx.wrap_socket(self.ls.sock, server_hostname="localhost")
        self.tls = True

    def login(self, user: str, password: str):
        self.cmd(f"USER {user}")
        return self.cmd(f"PASS {password}")

    def auth_plain(self, user: str, password: str, initial: bool = True, authzid: str = ""):
        token = base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()
        if initial:
            return self.cmd(f"AUTH PLAIN {token}")
        s = self.cmd("AUTH PLAIN", expect_ok=None)
        assert s.startswith("+"), f"expected continuation, got {s!r}"
        return self.cmd(token)

    def stat(self) -> tuple[int, int]:
        s = self.cmd("STAT")
        m = re.match(r"\+OK (\d+) (\d+)", s)
        assert m, f"bad STAT reply {s!r}"
        return int(m.group(1)), int(m.group(2))

    def list(self) -> dict[int, int]:
        self.cmd("LIST")
        out = {}
        for l in self.multiline():
            n, size = l.split()
            out[int(n)] = int(size)
        return out

    def uidl(self) -> dict[int, str]:
        self.cmd("UIDL")
        out = {}
        for l in self.multiline():
            n, uid = l.split(" ", 1)
            out[int(n)] = uid
        return out

    def retr(self, n: int) -> bytes:
        self.cmd(f"RETR {n}")
        return self.multiline_raw()

    def retr_many(self, nums, batch: int = 32) -> list[bytes]:
        """RETR pipelined in batches (RFC 2449 PIPELINING)."""
        nums = list(nums)
        out = []
        for i in range(0, len(nums), batch):
            chunk = nums[i:i + batch]
            self.send(b"".join(b"RETR %d\r\n" % n for n in chunk))
            for _ in chunk:
                self.status(expect_ok=True)
                out.append(self.multiline_raw())
        return out

    def top(self, n: int, lines: int) -> bytes:
        self.cmd(f"TOP {n} {lines}")
        return self.multiline_raw()

    def dele(self, n: int) -> str:
        return self.cmd(f"DELE {n}")

    def quit(self) -> str:
        s = self.cmd("QUIT")
        return s


# --------------------------------------------------------------------------
# LMTP
# --------------------------------------------------------------------------

@dataclass
class Reply:
    code: int
    lines: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def __str__(self):
        return f"{self.code} {self.text}"


def dot_stuff(msg: bytes) -> bytes:
    """SMTP transparency (RFC 5321 4.5.2) for a CRLF message."""
    assert msg.endswith(CRLF), "message must end with CRLF"
    out = []
    for line in msg.split(CRLF)[:-1]:
        out.append(b"." + line if line.startswith(b".") else line)
    return CRLF.join(out) + CRLF


class Lmtp:
    def __init__(self, host: str, port: int, timeout: float = 30, source: str | None = None,
                 lhlo: bool = True):
        self.ls = LineSock(connect(host, port, timeout, source), timeout)
        self.greeting = self.reply()
        assert self.greeting.code == 220, f"LMTP greeting: {self.greeting}"
        self.ext: list[str] = []
        if lhlo:
            r = self.cmd("LHLO client.test")
            assert r.code == 250, f"LHLO: {r}"
            self.ext = [l.upper() for l in r.lines[1:]]

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.ls.close()

    def reply(self) -> Reply:
        lines = []
        while True:
            raw = self.ls.readline(limit=65536)
            assert raw.endswith(b"\r\n"), f"LMTP reply line without CRLF: {raw!r}"
            s = raw[:-2].decode("utf-8", "replace")
            assert len(s) >= 3 and s[:3].isdigit() and (len(s) == 3 or s[3] in " -"), \
                f"malformed LMTP reply line {raw!r}"
            lines.append(s[4:])
            if len(s) == 3 or s[3] == " ":
                return Reply(int(s[:3]), lines)

    def cmd(self, line: str | bytes) -> Reply:
        if isinstance(line, str):
            line = line.encode()
        self.ls.send(line + CRLF)
        return self.reply()

    def send_mail(self, sender: str, rcpts: list[str], msg: bytes) -> dict:
        r = self.cmd(f"MAIL FROM:<{sender}>")
        assert r.code == 250, f"MAIL FROM: {r}"
        accepted = []
        result = {}
        for rc in rcpts:
            r = self.cmd(f"RCPT TO:<{rc}>")
            result[rc] = r.code
            if r.code == 250:
                accepted.append(rc)
        if not accepted:
            self.cmd("RSET")
            return result
        r = self.cmd("DATA")
        assert r.code == 354, f"DATA: {r}"
        self.ls.send(dot_stuff(msg) + b".\r\n")
        for rc in accepted:
            result[rc] = self.reply().code
        return result

    def quit(self):
        try:
            return self.cmd("QUIT")
        except Closed:
            return None

    def close(self):
        self.ls.close()


# --------------------------------------------------------------------------
# messages
# --------------------------------------------------------------------------

def make_message(tag: str, body_lines: int = 6, to: str = "rcpt@localhost",
                 extra_body: bytes = b"", eight_bit: bool = False) -> bytes:
    """A CRLF message with a unique X-Test-Id header and body lines that
    exercise dot-stuffing and mbox quoting. Contains no '%' (swaks tokens)."""
    h = [
        b"From: Sender <sender@example.org>",
        b"To: <" + to.encode() + b">",
        b"Subject: system test " + tag.encode(),
        b"Message-ID: <" + tag.encode() + b"@test.invalid>",
        b"Date: Mon, 01 Jan 2024 00:00:00 +0000",
        b"X-Test-Id: " + tag.encode(),
        b"MIME-Version: 1.0",
        b"Content-Type: text/plain; charset=utf-8",
    ]
    body = [
        b"Hello, this is message " + tag.encode() + b".",
        b"",
        b".a line starting with one dot",
        b"..two dots",
        b"From the start of a line (mbox quoting bait)",
        b"trailing spaces   ",
        b"\ttab-indented",
    ]
    if eight_bit:
        body.append("Grüße, ünïcødé ✓".encode())
    for i in range(body_lines):
        body.append(b"line %d of %s: " % (i, tag.encode()) + b"x" * (i * 7 % 61))
    body.append(b"-- ")
    body.append(b"sha256 " + hashlib.sha256(tag.encode()).hexdigest().encode())
    msg = CRLF.join(h) + CRLF + CRLF + CRLF.join(body) + CRLF
    if extra_body:
        assert extra_body.endswith(CRLF)
        msg += extra_body
    return msg


def header_value(msg: bytes, name: str) -> str | None:
    head = msg.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    for line in re.split(rb"\r?\n", head):
        if line.lower().startswith(name.lower().encode() + b":"):
            return line.split(b":", 1)[1].strip().decode()
    return None


def lf(msg: bytes) -> bytes:
    return msg.replace(b"\r\n", b"\n")
