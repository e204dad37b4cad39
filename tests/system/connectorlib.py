"""Helpers for the connector system tests: the `[connector]` part of a
server's configuration, `pop3connex connector ...` runs and their output
(the per-account summary line, error lines and JSON log events).

CLI contract (tests are written against it):
  connector run-once [NAME...]  stdout, one line per account:
      account=NAME fetched=N delivered=N forwarded=N duplicates=N quarantined=N
      deleted=N skipped=N deferred=N octets=N
    failures on stderr: account=NAME error=KIND: message; exit 0 if every
    account succeeded, else 1.
  Events: JSON log lines with target pop3connex::connector and field `event`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import syslib

MARK = "# ---- [connector] written by the system tests; everything below is replaced ----"
COUNTERS = ("fetched", "delivered", "forwarded", "duplicates", "quarantined", "deleted", "skipped",
            "deferred", "octets")
ERROR_KINDS = ("connect", "tls", "auth", "protocol", "timeout", "too_large", "server", "io", "downstream",
               "store", "config", "oauth")
SUMMARY_RE = re.compile(r"^account=(\S+)((?: [a-z_]+=\d+)+)\s*$")
ERROR_RE = re.compile(r"^account=(\S+) error=([a-z_]+): (.*)$")


# --------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------

def toml_inline(v) -> str:
    """TOML value; dicts become inline tables with quoted keys."""
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {toml_inline(x)}" for k, x in v.items()) + " }"
    if isinstance(v, Path):
        return syslib.toml_value(str(v))
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_inline(x) for x in v) + "]"
    return syslib.toml_value(v)


def render(settings: dict, accounts: list[dict], downstreams: list[dict]) -> str:
    out = [MARK, "[connector]"]
    out += [f"{k} = {toml_inline(v)}" for k, v in settings.items()]
    for d in downstreams:
        out += ["", "[[connector.downstreams]]"] + [f"{k} = {toml_inline(v)}" for k, v in d.items()]
    for a in accounts:
        out += ["", "[[connector.accounts]]"] + [f"{k} = {toml_inline(v)}" for k, v in a.items()]
    return "\n".join(out) + "\n"


def write_connector(srv: syslib.Server, accounts: list[dict], downstreams: list[dict] = (), **settings):
    """Replaces the test-written connector block of srv's configuration.
    The schedules inside `serve` stay off unless enabled=True is passed, so
    that only the test's `run-once` fetches."""
    text = srv.config.read_text()
    if MARK in text:
        text = text[: text.index(MARK)]
    text = drop_connector_tables(text)
    settings = {"enabled": False, **settings}
    srv.config.write_text(text.rstrip("\n") + "\n\n" + render(settings, accounts, list(downstreams)))


def drop_connector_tables(text: str) -> str:
    """The configuration without any [connector...] / [[connector...]] table
    (e.g. one written by `init`): the test writes the whole part itself."""
    out, skipping = [], False
    header = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.\-\" ]+?)\s*\]\]?\s*(#.*)?$")
    for line in text.split("\n"):
        m = header.match(line)
        if m:
            skipping = m.group(1).split(".")[0].strip('" ') == "connector"
        if not skipping:
            out.append(line)
    return "\n".join(out)


def secret_file(srv: syslib.Server, name: str, value: str) -> str:
    """A `file:` secret reference (0600) in the server's data directory."""
    d = srv.data_dir / "test-secrets"
    d.mkdir(mode=0o700, exist_ok=True)
    p = d / name
    p.write_text(value)
    os.chmod(p, 0o600)
    return f"file:{p}"


def account(name: str, *, host: str = "127.0.0.1", port: int, tls: str = "implicit", user: str,
            password: str | None, ca_file: Path | None, local: str | None = None, **kw) -> dict:
    a = {"name": name, "host": host, "port": port, "tls": tls, "user": user}
    if ca_file is not None:
        a["ca_file"] = str(ca_file)
    if password is not None:
        a["password"] = password
    a.update(kw)
    if local is not None:
        a.setdefault("route", {"deliver_to": {"local": local}})
    return a


# --------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------

@dataclass
class Run:
    cmd: list[str]
    rc: int
    stdout: str
    stderr: str
    seconds: float
    summary: dict[str, dict[str, int]] = field(default_factory=dict)
    errors: dict[str, tuple[str, str]] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)

    def describe(self) -> str:
        return (f"command: {' '.join(self.cmd)}\nexit: {self.rc} after {self.seconds:.1f}s\n"
                f"stdout:\n{self.stdout[-3000:]}\nstderr:\n{self.stderr[-5000:]}")

    def counts(self, name: str) -> dict[str, int]:
        assert name in self.summary, f"no summary line for account {name}\n{self.describe()}"
        return self.summary[name]

    def event_names(self) -> list[str]:
        return [e.get("event") for e in self.events]


def parse(cmd, rc, out: str, err: str, seconds: float) -> Run:
    r = Run(list(map(str, cmd)), rc, out, err, seconds)
    for line in out.splitlines():
        m = SUMMARY_RE.match(line.strip())
        if m:
            r.summary[m.group(1)] = {k: int(v) for k, v in (kv.split("=") for kv in m.group(2).split())}
    for line in (out + "\n" + err).splitlines():
        s = line.strip()
        m = ERROR_RE.match(s)
        if m:
            r.errors[m.group(1)] = (m.group(2), m.group(3))
            continue
        r.events += connector_events(s)
    return r


def connector_events(text: str) -> list[dict]:
    """JSON log records of target pop3connex::connector that carry `event`."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        flat = dict(rec)
        if isinstance(rec.get("fields"), dict):
            flat.update(rec["fields"])
        if str(flat.get("target", "")).startswith("pop3connex::connector") and "event" in flat:
            out.append(flat)
    return out


def connector(srv: syslib.Server, *args: str, timeout: float = 120, env: dict | None = None) -> Run:
    cmd = [str(srv.binary), "--config", str(srv.config), "connector", *args]
    e = srv.env()
    e.update(env or {})
    t0 = time.monotonic()
    try:
        cp = subprocess.run(cmd, capture_output=True, timeout=timeout, env=e, cwd=str(srv.data_dir),
                            stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as ex:
        raise AssertionError(f"`connector {' '.join(args)}` did not finish within {timeout}s\n"
                             f"stdout: {ex.stdout!r}\nstderr: {(ex.stderr or b'')[-3000:]!r}") from ex
    return parse(cmd, cp.returncode, cp.stdout.decode(errors="replace"), cp.stderr.decode(errors="replace"),
                 time.monotonic() - t0)


def run_once(srv: syslib.Server, *names: str, timeout: float = 120, env: dict | None = None) -> Run:
    return connector(srv, "run-once", *names, timeout=timeout, env=env)


def run_ok(srv: syslib.Server, name: str, **expect) -> dict[str, int]:
    """run-once NAME must succeed; `expect` are counters that must match."""
    r = run_once(srv, name)
    assert r.rc == 0 and name not in r.errors, f"run-once failed\n{r.describe()}"
    c = r.counts(name)
    for k, v in expect.items():
        assert c.get(k) == v, f"{name}: expected {k}={v}, got {c}\n{r.describe()}"
    return c


def run_fails(srv: syslib.Server, name: str, kinds: tuple[str, ...], timeout: float = 120) -> Run:
    """run-once NAME must exit 1 and report `account=NAME error=KIND: ...`
    with KIND in `kinds`."""
    r = run_once(srv, name, timeout=timeout)
    assert r.rc == 1, f"run-once must exit 1\n{r.describe()}"
    assert name in r.errors, f"no `account={name} error=KIND: message` line on stderr\n{r.describe()}"
    kind, msg = r.errors[name]
    assert kind in kinds, f"error kind {kind!r} (message {msg!r}), expected one of {kinds}\n{r.describe()}"
    assert msg.strip(), f"empty error message\n{r.describe()}"
    return r


# --------------------------------------------------------------------------
# the local side
# --------------------------------------------------------------------------

def local_messages(srv: syslib.Server, user: str, password: str) -> list[bytes]:
    """Every message of a local user, exactly as POP3 RETR serves it."""
    return srv.fetch_all(user, password, strip=False)


QUARANTINE_HDR = re.compile(rb"^X-POP3conneX-Quarantine:[ \t]*([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)\r\n")


def unquarantine(msg: bytes) -> tuple[str, bytes]:
    """Splits the one prepended X-POP3conneX-Quarantine header off."""
    m = QUARANTINE_HDR.match(msg)
    assert m, f"quarantined message does not start with X-POP3conneX-Quarantine: {msg[:300]!r}"
    rest = msg[m.end():]
    assert not QUARANTINE_HDR.match(rest), "two X-POP3conneX-Quarantine headers"
    return m.group(1).decode(errors="replace"), rest


def message_id(msg: bytes) -> str | None:
    return syslib.header_value(msg, "Message-ID")
