"""Events to a SIEM: a real rsyslog (Debian `rsyslog` + `rsyslog-gnutls`),
started by the test on loopback with its own CA, receives RFC 5424 over
TLS (RFC 5425) from POP3conneX with a verified certificate. The test reads
what rsyslog wrote and checks the structured data of a login failure, a
ban and a delivery; a second sink with the wrong server_name delivers
nothing and says why. With rsyslog stopped, mail keeps flowing, drops are
counted and reported (`sink_dropping`), and when rsyslog is back the sink
delivers what it held and reports `sink_recovered`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

import syslib
from peers import TestCA, tool, world_readable_tmpdir
from syslib import ALT_LOOPBACK, LOOPBACK, addr, make_message

TEST_TIMEOUT = 240

SETTINGS = {
    ("auth", "failure_delay_ms"): 50,
    ("abuse", "max_failure_delay_ms"): 200,
    ("abuse", "ban_after_auth_failures"): 3,
    ("abuse", "lockout_after_failures"): 1000,
}

RSYSLOG_CONF = """\
# private instance written by tests/system/test_syslog.py
global(
  workDirectory="{work}"
  maxMessageSize="64k"
  DefaultNetstreamDriver="gtls"
  DefaultNetstreamDriverCAFile="{ca}"
  DefaultNetstreamDriverCertFile="{cert}"
  DefaultNetstreamDriverKeyFile="{key}"
)
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="anon")
input(type="imtcp" address="127.0.0.1" port="{port}")
template(name="raw" type="string" string="%rawmsg%\\n")
action(type="omfile" file="{out}" template="raw")
"""


class Rsyslog:
    """A private rsyslogd in the foreground (-n) with its own config,
    pid file and work directory."""

    def __init__(self, root: Path, ca: Path, cert: Path, key: Path, port: int):
        self.root = root
        self.port = port
        self.out = root / "received.log"
        self.conf = root / "rsyslog.conf"
        self.pidfile = root / "rsyslogd.pid"
        self.log = root / "rsyslogd.stderr"
        work = root / "work"
        work.mkdir(exist_ok=True)
        self.conf.write_text(RSYSLOG_CONF.format(work=work, ca=ca, cert=cert, key=key, port=port, out=self.out))
        self.proc: subprocess.Popen | None = None

    def start(self):
        rsyslogd = tool("rsyslogd", "rsyslog")
        check = subprocess.run([rsyslogd, "-N1", "-f", self.conf], capture_output=True, timeout=30)
        assert check.returncode == 0, f"rsyslog rejects its config: {check.stderr.decode(errors='replace')}"
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen([rsyslogd, "-n", "-f", str(self.conf), "-i", str(self.pidfile)],
                                         stdin=subprocess.DEVNULL, stdout=err, stderr=err)

        def listening():
            assert self.proc.poll() is None, f"rsyslogd exited: {self.log.read_text(errors='replace')}"
            return syslib.listener_owned_by(self.proc.pid, self.port)
        syslib.wait_until(listening, 20, 0.1, f"rsyslogd to listen on {self.port}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def lines(self) -> list[str]:
        try:
            return self.out.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return []


SD_RE = re.compile(r'\[pop3connex@32473((?: [^=\s\]"]+="(?:[^"\\]|\\.)*")*)\]')
PARAM_RE = re.compile(r'([^=\s\]"]+)="((?:[^"\\]|\\.)*)"')
HEADER_RE = re.compile(r"^<(\d+)>1 (\S+) (\S+) (\S+) (\S+) (\S+) ")


def parse(line: str) -> dict | None:
    """Header and SD params of one of our RFC 5424 messages, or None."""
    h = HEADER_RE.match(line)
    sd = SD_RE.search(line)
    if not (h and sd):
        return None
    params = {k: re.sub(r"\\(.)", r"\1", v) for k, v in PARAM_RE.findall(sd.group(1))}
    return {"pri": int(h.group(1)), "timestamp": h.group(2), "hostname": h.group(3), "app": h.group(4),
            "procid": h.group(5), "msgid": h.group(6), "sd": params, "msg": line[sd.end():].strip()}


def events(rs: Rsyslog, name: str, app: str = "pop3connex") -> list[dict]:
    out = []
    for line in rs.lines():
        p = parse(line)
        if p and p["app"] == app and p["msgid"] == name:
            out.append(p)
    return out


def sink_toml(name: str, port: int, ca: Path, server_name: str, app: str, queue: int) -> str:
    return (f'\n[[log.sink]]\nname = "{name}"\ntype = "syslog"\ntransport = "tls"\n'
            f'address = "127.0.0.1:{port}"\nca_file = "{ca}"\nserver_name = "{server_name}"\n'
            f'app_name = "{app}"\nqueue = {queue}\n')


@pytest.fixture
def pki():
    root = world_readable_tmpdir("p3x-syslog-")
    try:
        ca = TestCA(root / "pki")
        cert, key = ca.issue("siem", sans=("DNS:siem.test",))
        yield root, ca, cert, key
    finally:
        shutil.rmtree(root, ignore_errors=True)


def failed_logins_until_banned(srv: syslib.Server, user: str) -> int:
    failures = 0
    for i in range(10):
        try:
            p = srv.pop3s(timeout=15)
        except (syslib.Closed, OSError):
            return failures  # banned: dropped at accept
        with p:
            p.cmd(f"USER {user}", expect_ok=None)
            p.cmd(f"PASS wrong-{i}", expect_ok=False)
            failures += 1
    pytest.fail(f"no ban after {failures} failed logins")


def test_events_reach_rsyslog_over_verified_tls_and_a_dead_siem_never_blocks_mail(server_factory, pki):
    root, ca, cert, key = pki
    port = syslib.free_port()
    rs = Rsyslog(root, ca.cert, cert, key, port)
    rs.start()
    try:
        srv = server_factory(SETTINGS, start=False)
        with open(srv.config, "a") as f:
            f.write(sink_toml("siem", port, ca.cert, "siem.test", "pop3connex", 5))
            # Same receiver, a name its certificate does not carry.
            f.write(sink_toml("wrongname", port, ca.cert, "wrong.test", "badsink", 5))
        srv.start()
        name, pw = syslib.unique_name("sl"), syslib.new_password()
        srv.add_user(name, pw)

        # A delivery, a failed login, a ban.
        token = f"secret-body-{os.urandom(4).hex()}"
        msg = make_message(token)
        assert srv.deliver(addr(name), msg) == {addr(name): 250}
        failed_logins_until_banned(srv, name)

        def arrived():
            return all(events(rs, n) for n in ("lmtp_delivered", "auth_failure", "ban"))
        syslib.wait_until(arrived, 30, 0.2, "rsyslog to write the delivery, login failure and ban events:\n"
                          + "\n".join(rs.lines()[-20:]))

        fail = events(rs, "auth_failure")[0]
        assert fail["pri"] == 2 * 8 + 4, fail  # facility mail, severity warning
        assert fail["hostname"] == "localhost" and fail["procid"] == str(srv.pid()), fail
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", fail["timestamp"]), fail
        sd = fail["sd"]
        assert (sd["id"], sd["name"], sd["severity"]) == ("101", "auth_failure", "warning"), sd
        assert sd["peer"] == LOOPBACK and sd["user"] == name, sd
        assert sd.get("mechanism") and sd.get("reason"), sd
        assert fail["msg"] == "authentication failed", fail

        ban = events(rs, "ban")[0]["sd"]
        assert (ban["id"], ban["peer"]) == ("204", LOOPBACK), ban
        assert int(ban["seconds"]) > 0 and ban.get("reason"), ban

        deliv = events(rs, "lmtp_delivered")[0]
        assert deliv["pri"] == 2 * 8 + 6, deliv
        d = deliv["sd"]
        assert (d["id"], d["recipients"]) == ("304", "1"), d
        assert abs(int(d["bytes"]) - len(msg)) <= 2, (d, len(msg))
        text = "\n".join(rs.lines())
        assert token not in text and pw not in text, "message content or a password reached the SIEM"

        # The wrongly named sink delivered nothing and said why.
        assert not [l for l in rs.lines() if " badsink " in l], "a sink with an unverified name delivered"
        log = srv.log_text()
        bad = [l for l in log.splitlines() if "sink_unavailable" in l and "wrongname" in l]
        assert bad, f"no sink_unavailable for the wrongly named sink:\n{log[-3000:]}"
        assert "wrong.test" in bad[0] and "certificate" in bad[0], bad[0]
        assert not [l for l in log.splitlines() if "sink_unavailable" in l and "sink=\"siem\"" in l], \
            "the correctly configured sink reported a failure"

        # rsyslog goes away: mail keeps flowing, quickly.
        delivered_before = len(events(rs, "lmtp_delivered"))
        rs.stop()
        for i in range(12):
            t0 = time.monotonic()
            assert srv.deliver(addr(name), make_message(f"while-down-{i}")) == {addr(name): 250}
            assert time.monotonic() - t0 < 3, "an LMTP delivery waited on the dead SIEM"
        t0 = time.monotonic()
        with syslib.Pop3.connect(LOOPBACK, srv.ports.pop3s, tls_ctx=srv.tls_context(), source=ALT_LOOPBACK) as p:
            p.login(name, pw)
            assert p.stat()[0] == 13
            p.quit()
        assert time.monotonic() - t0 < 5, "a POP3 session waited on the dead SIEM"

        def dropping():
            return re.search(r'sink_dropping.*sink="?siem"?.*dropped=\d+', srv.log_text())
        syslib.wait_until(dropping, 10, 0.2, "the sink_dropping alert in the server log")
        down = [l for l in srv.log_text().splitlines() if "sink_unavailable" in l and re.search(r'sink="?siem"?', l)]
        assert down, "the siem sink did not report its receiver gone"
        # One report per episode, not one per dropped event.
        assert len([l for l in srv.log_text().splitlines()
                    if "sink_dropping" in l and re.search(r'sink="?siem"?\b', l)]) == 1

        # rsyslog is back on the same port: the held events arrive and the
        # sink says it recovered.
        rs.start()
        assert srv.deliver(addr(name), make_message("after")) == {addr(name): 250}
        syslib.wait_until(lambda: re.search(r'sink_recovered.*sink="?siem"?', srv.log_text()), 90, 0.5,
                          "sink_recovered after rsyslog came back")
        syslib.wait_until(lambda: len(events(rs, "lmtp_delivered")) > delivered_before, 30, 0.2,
                          "held delivery events to reach rsyslog")
        got = len(events(rs, "lmtp_delivered")) - delivered_before
        # 13 deliveries since the stop; the queue holds 5 and the writer one batch:
        # some arrive, the rest were dropped and counted.
        assert 1 <= got < 13, got
    finally:
        rs.stop()
