"""Crash consistency of the connector: `connector run-once` fetching from a
private Dovecot with delete = "after-delivery" is killed with SIGKILL many
times: at random moments from start-up on, or right after its k-th
message was committed (k random; followed from its JSON log), so that
kills land during login, RETR, the commit and DELE/QUIT. Then one clean
run.

Invariants:
- after every kill, every message missing upstream is in the local mailbox
  (nothing is deleted upstream before it is durable locally);
- no message is ever stored twice locally, and duplicate detection never
  fires (no `connector_duplicate` event in any run, `duplicates=0` in the
  summaries): a message is never fetched again after its commit, so the
  seen-list is committed together with the mail; duplicate detection
  alone would also keep the mailbox free of copies and hide a seen-list
  committed separately;
- after the final clean run the upstream mailbox is empty and every message
  is in the local mailbox exactly once, byte for byte as Dovecot served it.

Needs root and the Debian packages dovecot-core, dovecot-lmtpd,
dovecot-pop3d, openssl.
"""

from __future__ import annotations

import random
import subprocess
import threading
import time
from collections import Counter

import pytest

import connectorlib as cl
import peers
import syslib
from syslib import make_message

TEST_TIMEOUT = 240
SERVER_SETTINGS = {("log", "format"): "json"}
ROUNDS = 40
BATCH = 8
KILL_PHASE_SECONDS = 120


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    ca = peers.TestCA(tmp_path_factory.mktemp("ca"))
    with peers.running("pop3connex-crash-upstream-", peers.PrivateDovecot,
                       {"crash": syslib.new_password()}, pop3=True, cert=ca.issue("upstream"), ca=ca) as d:
        yield d


def crash_message(tag: str, rng: random.Random) -> bytes:
    size = rng.choice([0, 0, 0, 2_000, 20_000, 150_000, 400_000])
    filler = b"".join(b"%s fill %06d %s\r\n" % (tag.encode(), i, b"q" * 60) for i in range(size // 80))
    return make_message(tag, body_lines=3, extra_body=filler, eight_bit=rng.random() < 0.3)


def ids_via_top(p: syslib.Pop3) -> list[str]:
    n, _ = p.stat()
    out = []
    for i in range(1, n + 1):
        mid = cl.message_id(p.top(i, 0))
        assert mid, f"message {i} without Message-ID"
        out.append(mid)
    return out


def upstream_ids(up: peers.PrivateDovecot) -> list[str]:
    with up.pop3("crash") as p:
        ids = ids_via_top(p)
        p.quit()
    return ids


def local_ids(srv: syslib.Server, user: str, pw: str) -> list[str]:
    with srv.pop3s() as p:
        p.login(user, pw)
        ids = ids_via_top(p)
        p.quit()
    return ids


class Progress:
    """Counts connector_fetched events on a run-once's stderr (JSON log) and
    keeps its connector_duplicate events."""

    def __init__(self, proc: subprocess.Popen):
        self.count = 0
        self.duplicates: list[str] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        self.thread.start()

    def _read(self, pipe):
        for line in pipe:
            if b'"connector_fetched"' in line:
                with self.cond:
                    self.count += 1
                    self.cond.notify_all()
            elif b'"connector_duplicate"' in line:
                self.duplicates.append(line.decode(errors="replace").strip())
        with self.cond:
            self.count = 1 << 30  # EOF: the process is gone
            self.cond.notify_all()

    def wait_for(self, k: int, timeout: float):
        with self.cond:
            self.cond.wait_for(lambda: self.count >= k, timeout)


def test_kill9_during_fetch_loses_and_duplicates_nothing(module_server, server, upstream):
    srv = module_server
    rng = random.Random(20261129)
    local, local_pw = syslib.unique_name("crash"), syslib.new_password()
    srv.add_user(local, local_pw)
    sent: dict[str, bytes] = {}   # Message-ID -> upstream copy (as Dovecot serves it)

    def fill(k: int, prefix: str):
        for i in range(k):
            upstream.deliver("crash@upstream.test", crash_message(f"{prefix}-{i:02d}", rng))
        for _, m in upstream.upstream("crash"):
            sent.setdefault(cl.message_id(m), m)

    acct = cl.account("crashacct", port=upstream.pop3s_port, user="crash",
                      password=cl.secret_file(srv, "crashacct", upstream.passwords["crash"]),
                      ca_file=upstream.ca.cert, local=local, delete="after-delivery")
    cl.write_connector(srv, [acct])
    cmd = [str(srv.binary), "--config", str(srv.config), "connector", "run-once", "crashacct"]

    # calibration: how long one run over a batch takes, uninterrupted
    fill(BATCH, "crash-cal")
    t_cal = time.monotonic()
    r = cl.run_once(srv, "crashacct")
    t_cal = time.monotonic() - t_cal
    assert r.rc == 0, f"calibration run failed\n{r.describe()}"
    assert r.counts("crashacct")["duplicates"] == 0, f"calibration run saw duplicates\n{r.describe()}"

    t0 = time.monotonic()
    kills = finished = 0
    for rnd in range(ROUNDS):
        if time.monotonic() - t0 > KILL_PHASE_SECONDS:
            break
        fill(BATCH, f"crash-r{rnd}")  # every run has a batch to fetch
        backlog = len(upstream_ids(upstream))
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, env=srv.env(), cwd=str(srv.data_dir))
        fetched = Progress(proc)
        if rng.random() < 0.25:
            # anywhere from start-up to the first messages
            time.sleep(rng.uniform(0.0, 1.5) * t_cal)
        else:
            # right after the k-th message was committed: during the next
            # RETR, or (k = backlog) during DELE/QUIT
            k = rng.randint(1, max(1, backlog))
            fetched.wait_for(k, timeout=30)
            time.sleep(rng.uniform(0.0, 0.004))
        if proc.poll() is None:
            proc.kill()
            kills += 1
        else:
            finished += 1
        proc.wait(10)
        fetched.thread.join(10)
        proc.stderr.close()
        assert not fetched.duplicates, (f"round {rnd}: a committed message was fetched again (the seen-list "
                                        f"was not committed with it): {fetched.duplicates}")
        up = set(upstream_ids(upstream))
        loc = local_ids(srv, local, local_pw)
        dup = [m for m, n in Counter(loc).items() if n > 1]
        assert not dup, f"round {rnd}: messages stored twice locally: {dup}"
        lost = set(sent) - up - set(loc)
        assert not lost, (f"round {rnd}: deleted upstream but not in the local mailbox: {sorted(lost)}\n"
                          f"upstream {len(up)}, local {len(loc)}, sent {len(sent)}")
        unknown = set(loc) - set(sent)
        assert not unknown, f"round {rnd}: unexpected local messages {unknown}"
    print(f"\n{kills} runs killed, {finished} finished; calibration run {t_cal:.3f}s, {len(sent)} messages")
    assert kills >= 5, f"only {kills} runs were killed mid-way ({finished} finished): timing off"

    r = cl.run_once(srv, "crashacct", timeout=120)
    assert r.rc == 0, f"the clean run after the kills failed\n{r.describe()}"
    assert r.counts("crashacct")["duplicates"] == 0, f"the clean run refetched committed mail\n{r.describe()}"
    assert "connector_duplicate" not in r.event_names(), r.describe()
    assert upstream_ids(upstream) == [], "upstream not empty after the clean run"
    got = cl.local_messages(srv, local, local_pw)
    by_id: dict[str, list[bytes]] = {}
    for m in got:
        by_id.setdefault(cl.message_id(m), []).append(m)
    assert set(by_id) == set(sent), (f"missing locally: {sorted(set(sent) - set(by_id))}; "
                                     f"unexpected: {sorted(set(by_id) - set(sent))}")
    for mid, copies in by_id.items():
        assert len(copies) == 1, f"{mid} stored {len(copies)} times"
        assert copies[0] == sent[mid], f"{mid}: local copy differs from the upstream copy"
