"""Brute force with a real attacker tool (nmap's pop3-brute) and the
fail2ban filter checked with fail2ban-regex against logs the server wrote."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import syslib
from conftest import require_tool

REPO = Path(__file__).resolve().parents[2]
FILTER = REPO / "contrib" / "fail2ban" / "pop3connex.conf"
TEST_TIMEOUT = 200

# Plaintext logins from loopback keep nmap simple (the ban logic is the same
# on the TLS port); a short failure delay keeps the test fast.
BRUTE = {
    ("pop3", "plaintext_auth_networks"): ["127.0.0.0/8"],
    ("pop3", "max_auth_failures"): 100,
    ("auth", "failure_delay_ms"): 10,
    ("abuse", "ban_after_auth_failures"): 5,
}


def run_pop3_brute(srv: syslib.Server, tmp: Path) -> str:
    nmap = require_tool("nmap")
    users = tmp / "users.txt"
    users.write_text("alice\nbob\n")
    passwords = tmp / "passwords.txt"
    passwords.write_text("".join(f"wrong-{i}\n" for i in range(40)))
    cp = subprocess.run(
        [nmap, "-Pn", "-n", "-sV", "--version-light", "-p", str(srv.ports.pop3), "--script", "pop3-brute",
         "--script-args", f"userdb={users},passdb={passwords},unpwdb.timelimit=60s,brute.retries=1",
         "127.0.0.1"],
        capture_output=True, timeout=150)
    return cp.stdout.decode(errors="replace") + cp.stderr.decode(errors="replace")


def refused_at_accept(port: int, source: str | None = None) -> bool:
    """True if the server closes the connection without a greeting."""
    try:
        s = syslib.connect(syslib.LOOPBACK, port, timeout=5, source=source)
    except OSError:
        return True
    ls = syslib.LineSock(s, 5)
    try:
        return ls.is_closed(2.0)
    finally:
        ls.close()


def test_nmap_pop3_brute_is_banned_and_others_are_not(server_factory, tmp_path):
    srv = server_factory(BRUTE)
    pw = syslib.new_password()
    srv.add_user("alice", pw)
    out = run_pop3_brute(srv, tmp_path)
    assert "Valid credentials" not in out, out
    log = srv.log_text()
    assert 'event="ban"' in log and "peer=127.0.0.1 " in log, log[-3000:]
    assert refused_at_accept(srv.ports.pop3), "the attacking address is refused before any protocol work"
    assert refused_at_accept(srv.ports.pop3s), "on every listener"
    # Another address is served as usual.
    with syslib.Pop3.connect(syslib.LOOPBACK, srv.ports.pop3s, srv.tls_context(), source="127.0.0.2") as p:
        p.cmd("USER alice")
        p.cmd(f"PASS {pw}")
        p.cmd("QUIT")
    listed = srv.cli("ban", "list").stdout.decode()
    assert "127.0.0.1/32" in listed and "authentication failures" in listed, listed
    srv.cli("ban", "remove", "127.0.0.1")
    syslib.wait_until(lambda: not refused_at_accept(srv.ports.pop3), timeout=30,
                      what="ban removal reaching the running server")


def test_allowlisted_address_is_never_banned(server_factory, tmp_path):
    srv = server_factory({**BRUTE, ("abuse", "allowlist"): ["127.0.0.1/32"]})
    srv.add_user("alice", syslib.new_password())
    run_pop3_brute(srv, tmp_path)
    log = srv.log_text()
    assert log.count('event="auth_failure"') >= 10, "the attack really ran"
    assert 'event="ban"' not in log
    assert not refused_at_accept(srv.ports.pop3)


def fail2ban_regex(log: Path) -> str:
    tool = require_tool("fail2ban-regex")
    cp = subprocess.run([tool, str(log), str(FILTER)], capture_output=True, timeout=60)
    out = cp.stdout.decode(errors="replace")
    assert cp.returncode == 0, out + cp.stderr.decode(errors="replace")
    return out


def matched(out: str) -> int:
    for line in out.splitlines():
        if line.startswith("Lines:"):
            return int(line.split(",")[2].split()[0])
    raise AssertionError(f"no summary in fail2ban-regex output:\n{out}")


def test_fail2ban_filter_matches_real_logs_in_both_formats(server_factory, tmp_path):
    for fmt in ("human", "json"):
        srv = server_factory({("log", "format"): fmt, ("auth", "failure_delay_ms"): 0,
                              ("pop3", "max_auth_failures"): 100}, name=f"f2b-{fmt}")
        pw = syslib.new_password()
        srv.add_user("alice", pw)
        with syslib.Pop3.connect(syslib.LOOPBACK, srv.ports.pop3s, srv.tls_context(), source="127.0.0.3") as p:
            for u in ("alice", "nobody", "alice"):
                p.cmd(f"USER {u}")
                p.cmd("PASS wrong", expect_ok=False)
            p.cmd("USER alice")
            p.cmd(f"PASS {pw}")
            p.cmd("QUIT")
        time.sleep(0.3)
        srv.stop()
        out = fail2ban_regex(srv.log_path)
        assert matched(out) == 3, f"{fmt}: exactly the three failures match\n{out}"
        assert "127.0.0.3" in subprocess.run(
            [require_tool("fail2ban-regex"), "-v", str(srv.log_path), str(FILTER)],
            capture_output=True, timeout=60).stdout.decode(errors="replace"), f"{fmt}: host extracted"
