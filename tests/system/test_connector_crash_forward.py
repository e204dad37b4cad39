"""Crash consistency of the connector when it forwards: `connector run-once`
fetching from a private Dovecot (POP3S) and forwarding every message to a
private Postfix (SMTP, STARTTLS verified against the test CA, delivering
into a Maildir) with delete = "after-delivery" is killed with SIGKILL many
times, then one clean run.

Kills land at random moments from start-up on, right after its k-th
`connector_fetched` event (the k-th commit; the kill then lands in the
next message's RETR or SMTP session, or in DELE/QUIT), or right after
Postfix accepted the k-th message of the run: Postfix asks a policy server
of the test at end-of-data (smtpd_end_of_data_restrictions), and the kill
follows the policy answer by a few milliseconds, so that it lands around
Postfix's 250 and the connector's commit -- the window in which forwarding
is at-least-once (docs/operator-guide.md section 12.6).

Invariants (messages matched by Message-ID):
- after every kill, once Postfix's queue is empty, every message missing
  upstream has arrived downstream (nothing is deleted upstream before the
  downstream accepted it);
- after the final clean run the upstream mailbox is empty and every message
  has arrived at least once; every copy is the upstream copy (without the
  Return-Path that Postfix's cleanup drops) preceded by Postfix's trace
  headers and exactly one Received line from POP3conneX;
- duplicates downstream: at most one extra copy per kill (cumulative, after
  every round and at the end); the observed number is printed;
- nothing is quarantined locally and no run logs connector_refused.

Needs root and the Debian packages postfix, dovecot-core, dovecot-lmtpd,
dovecot-pop3d, openssl.
"""

from __future__ import annotations

import random
import re
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter

import pytest

import connectorlib as cl
import peers
import syslib
from syslib import make_message

TEST_TIMEOUT = 300
SERVER_SETTINGS = {("log", "format"): "json"}
DOMAIN = "down.test"
MAILBOX = "crashfwd"
QUARANTINE = "quarantine"
ROUNDS = 25
BATCH = 8
KILL_PHASE_SECONDS = 90
QUEUE_WAIT = 60
BAD_EVENTS = (b'"connector_refused"', b'"connector_quarantined"', b'"connector_loop"')


# --------------------------------------------------------------------------
# peers
# --------------------------------------------------------------------------

class EodPolicy:
    """A Postfix policy server (SMTPD_POLICY_README) on 127.0.0.1 that
    answers DUNNO to everything and counts END-OF-MESSAGE requests: each one
    is a message Postfix is about to queue and answer 250 for."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.count = 0
        self.times: list[float] = []   # monotonic time of each END-OF-MESSAGE answer
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stopping:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket):
        with c, c.makefile("rb") as f:
            attrs: dict[bytes, bytes] = {}
            for line in f:
                line = line.rstrip(b"\r\n")
                if line:
                    k, _, v = line.partition(b"=")
                    attrs[k] = v
                    continue
                try:
                    c.sendall(b"action=DUNNO\n\n")
                except OSError:
                    return
                if attrs.get(b"protocol_state") == b"END-OF-MESSAGE":
                    with self.cond:
                        self.count += 1
                        self.times.append(time.monotonic())
                        self.cond.notify_all()
                attrs = {}

    def wait_for(self, n: int, proc: subprocess.Popen, timeout: float):
        """Until the n-th END-OF-MESSAGE request or proc's exit."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.count < n and proc.poll() is None and time.monotonic() < deadline:
                self.cond.wait(0.05)

    def stop(self):
        self.stopping = True
        self.sock.close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return peers.TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def upstream(ca):
    with peers.running("pop3connex-crashfwd-upstream-", peers.PrivateDovecot,
                       {"crash": syslib.new_password()}, pop3=True, cert=ca.issue("upstream"), ca=ca) as d:
        yield d


@pytest.fixture(scope="module")
def policy():
    p = EodPolicy()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def postfix(ca, policy):
    peers.PrivatePostfix.check_installed()
    root = peers.world_readable_tmpdir("pop3connex-crashfwd-postfix-")
    pf = peers.PostfixDownstream(root, syslib.free_port(), DOMAIN)
    try:
        pf.configure([MAILBOX], ca.issue("postfix", ("DNS:localhost", "IP:127.0.0.1")))
        pf.postconf("-e", f"smtpd_end_of_data_restrictions = check_policy_service inet:127.0.0.1:{policy.port}")
        pf.check()
        pf.start()
        yield pf
    finally:
        pf.stop()
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def crash_message(tag: str, rng: random.Random) -> bytes:
    size = rng.choice([0, 0, 0, 2_000, 20_000, 150_000, 400_000])
    filler = b"".join(b"%s fill %06d %s\r\n" % (tag.encode(), i, b"q" * 60) for i in range(size // 80))
    return make_message(tag, body_lines=3, extra_body=filler, eight_bit=rng.random() < 0.3)


def upstream_ids(up: peers.PrivateDovecot) -> list[str]:
    with up.pop3("crash") as p:
        n, _ = p.stat()
        ids = []
        for i in range(1, n + 1):
            mid = cl.message_id(p.top(i, 0))
            assert mid, f"upstream message {i} without Message-ID"
            ids.append(mid)
        p.quit()
    return ids


_RETURN_PATH = re.compile(rb"(?im)^Return-Path:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")


def without_return_path(msg: bytes) -> bytes:
    """Postfix's cleanup(8) drops Return-Path headers from incoming mail."""
    head, sep, body = msg.partition(b"\r\n\r\n")
    head = _RETURN_PATH.sub(b"", head + b"\r\n")[:-2]
    return head + sep + body


def check_forwarded(arrived: bytes, original: bytes):
    """arrived = Postfix's trace headers (one Received) + one Received from
    POP3conneX + original, exactly."""
    mid = cl.message_id(original)
    assert arrived.endswith(original), (f"{mid}: the forwarded copy is not the upstream copy\n"
                                        f"arrived head: {arrived[:800]!r}\nupstream head: {original[:400]!r}")
    found, rest = peers.split_trace(arrived[: len(arrived) - len(original)])
    assert rest == b"", f"{mid}: unexpected bytes before the original message: {rest[:500]!r}"
    received = [raw for name, raw in found if name == "received"]
    assert len(received) == 2, f"{mid}: expected Postfix's and POP3conneX's Received, got {received}"
    assert b"(POP3conneX connector)" in found[-1][1], f"{mid}: last trace header is not POP3conneX's: {found}"


def queue_empty(pf: peers.PostfixDownstream, what: str):
    """Waits until Postfix has delivered everything it accepted."""
    try:
        syslib.wait_until(lambda: "Mail queue is empty" in pf.queue(), QUEUE_WAIT, 0.1, what)
    except TimeoutError as e:
        raise AssertionError(f"{e}\nqueue:\n{pf.queue()[-2000:]}\nPostfix log:\n{pf.log()}") from None


class RunLog:
    """Follows a run-once's stderr (JSON log): counts connector_fetched
    events and keeps lines with events that must never happen here."""

    def __init__(self, proc: subprocess.Popen):
        self.count = 0
        self.times: list[float] = []   # monotonic time of each connector_fetched
        self.bad: list[bytes] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        self.thread.start()

    def _read(self, pipe):
        for line in pipe:
            if any(b in line for b in BAD_EVENTS):
                self.bad.append(line)
            if b'"connector_fetched"' in line:
                with self.cond:
                    self.count += 1
                    self.times.append(time.monotonic())
                    self.cond.notify_all()
        with self.cond:
            self.count = 1 << 30  # EOF: the process is gone
            self.cond.notify_all()

    def wait_for(self, k: int, timeout: float):
        with self.cond:
            self.cond.wait_for(lambda: self.count >= k, timeout)


# --------------------------------------------------------------------------
# the test
# --------------------------------------------------------------------------

def test_kill9_during_forwarding_loses_nothing(module_server, server, upstream, postfix, policy, ca):
    srv = module_server
    rng = random.Random(20261130)
    qpw = syslib.new_password()
    srv.add_user(QUARANTINE, qpw)
    sent: dict[str, bytes] = {}   # Message-ID -> upstream copy (as Dovecot serves it)

    def fill(k: int, prefix: str):
        for i in range(k):
            upstream.deliver("crash@upstream.test", crash_message(f"{prefix}-{i:02d}", rng))
        for _, m in upstream.upstream("crash"):
            sent.setdefault(cl.message_id(m), m)

    def arrived() -> dict[str, list[bytes]]:
        by_id: dict[str, list[bytes]] = {}
        for m in postfix.messages(MAILBOX):
            by_id.setdefault(cl.message_id(peers.split_trace(m)[1]), []).append(m)
        return by_id

    def extras(by_id: dict[str, list[bytes]]) -> int:
        return sum(len(c) - 1 for c in by_id.values())

    ds = {"name": "postfix", "protocol": "smtp", "host": "127.0.0.1", "port": postfix.smtp_port,
          "helo": "connector.test", "timeout_secs": 30, "tls": "verify", "ca_file": str(ca.cert)}
    acct = cl.account("crashfwd", port=upstream.pop3s_port, user="crash",
                      password=cl.secret_file(srv, "crashfwd", upstream.passwords["crash"]),
                      ca_file=upstream.ca.cert, delete="after-delivery",
                      route={"deliver_to": {"forward": f"{MAILBOX}@{DOMAIN}", "via": "postfix"}})
    cl.write_connector(srv, [acct], [ds])
    cmd = [str(srv.binary), "--config", str(srv.config), "connector", "run-once", "crashfwd"]

    # calibration: how long one run over a batch takes, uninterrupted, and
    # how long from Postfix's end-of-data policy answer to the commit
    fill(BATCH, "cfwd-cal")
    eod_base = policy.count
    t_cal = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=srv.env(), cwd=str(srv.data_dir))
    log = RunLog(proc)
    out = proc.stdout.read()  # stderr belongs to RunLog's thread
    proc.stdout.close()
    proc.wait(120)
    t_cal = time.monotonic() - t_cal
    log.thread.join(10)
    proc.stderr.close()
    r = cl.parse(cmd, proc.returncode, out.decode(errors="replace"), "", t_cal)
    assert r.rc == 0 and not log.bad, f"calibration run failed\n{r.describe()}\n{log.bad}"
    assert r.counts("crashfwd")["forwarded"] == BATCH, r.describe()
    per_msg = t_cal / BATCH
    eod_times = policy.times[eod_base:]
    assert len(eod_times) == BATCH == len(log.times), (len(eod_times), len(log.times))
    commit_gap = sorted(f - e for e, f in zip(eod_times, log.times))[BATCH // 2]
    assert 0 < commit_gap < t_cal, (commit_gap, t_cal)

    t0 = time.monotonic()
    kills = finished = 0
    modes: Counter[str] = Counter()
    for rnd in range(ROUNDS):
        if time.monotonic() - t0 > KILL_PHASE_SECONDS:
            break
        fill(BATCH, f"cfwd-r{rnd}")  # every run has a batch to forward
        backlog = len(upstream_ids(upstream))
        eod_base = policy.count
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, env=srv.env(), cwd=str(srv.data_dir))
        log = RunLog(proc)
        dice = rng.random()
        k = rng.randint(1, max(1, backlog))
        if dice < 0.2:
            mode = "random"     # anywhere from start-up on
            time.sleep(rng.uniform(0.0, 1.5) * t_cal)
        elif dice < 0.5:
            mode = "fetched"    # after the k-th commit: next RETR/SMTP, or DELE/QUIT
            log.wait_for(k, timeout=30)
            time.sleep(rng.uniform(0.0, 1.0) * per_msg)
        else:
            mode = "accepted"   # around Postfix's 250 for the k-th message and the commit
            policy.wait_for(eod_base + k, proc, timeout=30)
            time.sleep(rng.uniform(0.0, 1.5) * commit_gap)
        if proc.poll() is None:
            proc.kill()
            kills += 1
            modes[mode] += 1
        else:
            finished += 1
        proc.wait(10)
        log.thread.join(10)
        proc.stderr.close()
        assert not log.bad, f"round {rnd}: unexpected events:\n" + b"".join(log.bad).decode(errors="replace")

        # upstream first: whatever is missing there was accepted by Postfix
        # before the kill, so it is delivered once the queue is empty
        up = set(upstream_ids(upstream))
        queue_empty(postfix, f"Postfix's queue to drain after round {rnd}")
        down = arrived()
        lost = set(sent) - up - set(down)
        assert not lost, (f"round {rnd} ({mode}): deleted upstream but never arrived downstream: {sorted(lost)}\n"
                          f"upstream {len(up)}, downstream {len(down)}, sent {len(sent)}\n{postfix.log()}")
        unknown = set(down) - set(sent)
        assert not unknown, f"round {rnd}: unexpected downstream messages {sorted(unknown)}"
        assert extras(down) <= kills, (f"round {rnd}: {extras(down)} duplicate copies downstream after only "
                                       f"{kills} kills: {[(m, len(c)) for m, c in down.items() if len(c) > 1]}")
    print(f"\n{kills} runs killed ({dict(modes)}), {finished} finished; calibration run {t_cal:.3f}s, "
          f"end-of-data to commit {commit_gap * 1000:.1f}ms, {len(sent)} messages")
    assert kills >= 5, f"only {kills} runs were killed mid-way ({finished} finished): timing off"

    r = cl.run_once(srv, "crashfwd", timeout=120)
    assert r.rc == 0, f"the clean run after the kills failed\n{r.describe()}"
    ev = r.event_names()
    assert not {"connector_refused", "connector_quarantined", "connector_loop"} & set(ev), r.describe()
    assert upstream_ids(upstream) == [], "upstream not empty after the clean run"
    queue_empty(postfix, "Postfix's queue to drain after the clean run")
    down = arrived()
    assert set(down) == set(sent), (f"never arrived downstream: {sorted(set(sent) - set(down))}; "
                                    f"unexpected: {sorted(set(down) - set(sent))}")
    for mid, copies in down.items():
        for c in copies:
            check_forwarded(c, without_return_path(sent[mid]))
    assert policy.count >= len(sent), f"Postfix asked the end-of-data policy only {policy.count} times"
    dups = {m: len(c) for m, c in down.items() if len(c) > 1}
    print(f"duplicates downstream: {extras(down)} extra copies of {len(dups)} message(s) after {kills} kills "
          f"(at-least-once bound: <= {kills}): {dups}")
    assert extras(down) <= kills, f"{extras(down)} duplicate copies after {kills} kills: {dups}"
    q = cl.local_messages(srv, QUARANTINE, qpw)
    assert q == [], f"{len(q)} message(s) quarantined locally: {[m[:200] for m in q]}"
