"""The administration CLI through the real binary: each subcommand's effect
is checked where it matters, over POP3 and LMTP against a running server
(or through the CLI's own listings), not only by its exit code.

Covered: `user delete`, `user app-password add/list/revoke`,
`user require-modern-auth`, `user set-class` (the class's password policy
applies), `user list` (columns align), `ban add/list/remove`,
`config example` (passes `config check`, documents every section), and the
harness itself: a server start that finds its port taken moves to new ports,
and only a listener of the server's own process counts as ready.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import sqlite3
import tomllib
from pathlib import Path

import pytest
import scramp

import syslib
from syslib import LOOPBACK, addr, make_message

REPO = Path(__file__).resolve().parents[2]
TEST_TIMEOUT = 120
# Failed logins are made on purpose below; they must not get 127.0.0.1
# banned or the accounts locked (bans are tested in test_abuse.py).
SERVER_SETTINGS = {
    ("abuse", "ban_after_auth_failures"): 1000,
    ("abuse", "lockout_after_failures"): 1000,
    ("auth", "failure_delay_ms"): 0,
    ("pop3", "max_auth_failures"): 20,
    # accounts in class "staff" must change their password daily; others never
    ("auth.password_policy", "max_age_days"): 0,
    ("auth.password_policy", "max_age_days_by_class"): {"staff": 1},
}
AUTH_FAILED = "-ERR [AUTH] Authentication failed"


def pass_login(server: syslib.Server, name: str, password: str) -> str:
    """USER/PASS over implicit TLS; the PASS reply."""
    with server.pop3s() as p:
        p.cmd(f"USER {name}", expect_ok=None)
        r = p.cmd(f"PASS {password}", expect_ok=None)
        if r.startswith("+OK"):
            p.quit()
        return r


def plain_login(server: syslib.Server, name: str, password: str) -> str:
    """AUTH PLAIN over implicit TLS; the reply."""
    token = base64.b64encode(f"\0{name}\0{password}".encode()).decode()
    with server.pop3s() as p:
        r = p.cmd(f"AUTH PLAIN {token}", expect_ok=None)
        if r.startswith("+OK"):
            p.quit()
        return r


def scram_login(server: syslib.Server, name: str, password: str) -> str:
    """AUTH SCRAM-SHA-256 (Python's scramp as the client); the final status."""
    c = scramp.ScramClient(["SCRAM-SHA-256"], name, password)
    with server.pop3s() as p:
        r = p.cmd(f"AUTH SCRAM-SHA-256 {base64.b64encode(c.get_client_first().encode()).decode()}",
                  expect_ok=None)
        assert r.startswith("+ "), f"expected a SCRAM challenge, got {r!r}"
        c.set_server_first(base64.b64decode(r[2:]).decode())
        r = p.cmd(base64.b64encode(c.get_client_final().encode()).decode(), expect_ok=None)
        if not r.startswith("+ "):
            return r
        c.set_server_final(base64.b64decode(r[2:]).decode())  # raises if the server's signature is wrong
        r = p.cmd("", expect_ok=None)
        if r.startswith("+OK"):
            p.quit()
        return r


def test_user_delete_refuses_login_and_delivery(server, make_user):
    name, pw = make_user("del")
    assert server.deliver(addr(name), make_message(f"del-{name}")) == {addr(name): 250}
    # without --yes nothing happens
    cp = server.cli("user", "delete", name, check=False)
    assert cp.returncode != 0 and b"--yes" in cp.stderr, cp
    assert pass_login(server, name, pw).startswith("+OK")
    assert server.mailbox_stat(name)[0] == 1

    out = server.cli("user", "delete", name, "--yes").stdout.decode()
    assert f"deleted {name}" in out, out
    assert pass_login(server, name, pw) == AUTH_FAILED
    with server.lmtp() as l:
        assert l.cmd("MAIL FROM:<sender@example.org>").code == 250
        r = l.cmd(f"RCPT TO:<{addr(name)}>")
        assert r.code == 550 and r.text.startswith("5.1.1"), f"RCPT to a deleted user: {r}"
    assert server.cli("mailbox", "stat", name, check=False).returncode != 0
    listed = [line.split()[0] for line in server.cli("user", "list").stdout.decode().splitlines()[1:]]
    assert name not in listed, listed
    assert server.cli("user", "delete", name, "--yes", check=False).returncode != 0, \
        "deleting a user that no longer exists succeeded"
    # the mail went with the user: the same name added again starts empty
    server.add_user(name, pw)
    with server.pop3s() as p:
        p.login(name, pw)
        assert p.stat() == (0, 0), "a re-created user sees the deleted user's mail"
        p.quit()


def test_app_password_add_login_revoke(server, make_user):
    name, pw = make_user("app")
    out = server.cli("user", "app-password", "add", name, "Thunderbird on laptop").stdout.decode()
    m = re.search(rf"app password (\d+) for {re.escape(name)} \(Thunderbird on laptop\): (\S+)", out)
    assert m, f"`user app-password add` output: {out!r}"
    app_id, app_pw = m.group(1), m.group(2)
    assert app_pw != pw
    listing = server.cli("user", "app-password", "list", name).stdout.decode()
    assert re.search(rf"^\s*{app_id}\s+Thunderbird on laptop\s", listing, re.M), listing
    assert app_pw not in listing, "`app-password list` shows the secret"

    assert pass_login(server, name, app_pw).startswith("+OK")
    assert plain_login(server, name, app_pw).startswith("+OK")
    assert pass_login(server, name, pw).startswith("+OK"), "the account password stopped working"

    out = server.cli("user", "app-password", "revoke", name, app_id).stdout.decode()
    assert f"revoked app password {app_id}" in out, out
    assert pass_login(server, name, app_pw) == AUTH_FAILED
    assert plain_login(server, name, app_pw) == AUTH_FAILED
    assert pass_login(server, name, pw).startswith("+OK")
    assert not re.search(rf"^\s*{app_id}\s", server.cli("user", "app-password", "list", name).stdout.decode(),
                         re.M)
    assert server.cli("user", "app-password", "revoke", name, app_id, check=False).returncode != 0


def test_require_modern_auth_refuses_password_over_plain_allows_scram(server, make_user):
    name, pw = make_user("mod")
    assert scram_login(server, name, pw).startswith("+OK")  # SCRAM keys exist
    out = server.cli("user", "app-password", "add", name, "phone").stdout.decode()
    app_pw = re.search(r": (\S+)$", out.splitlines()[0]).group(1)

    server.cli("user", "require-modern-auth", name, "on")
    refused = ("-ERR [AUTH] This account requires SCRAM, OAuth or an app password; "
               "update your client settings")
    assert pass_login(server, name, pw) == refused
    assert plain_login(server, name, pw) == refused
    # the refusal is told only after the password was verified
    assert pass_login(server, name, pw + "x") == AUTH_FAILED
    assert scram_login(server, name, pw).startswith("+OK")
    assert pass_login(server, name, app_pw).startswith("+OK"), "app passwords must still work"

    server.cli("user", "require-modern-auth", name, "off")
    assert pass_login(server, name, pw).startswith("+OK")
    assert plain_login(server, name, pw).startswith("+OK")
    assert server.cli("user", "require-modern-auth", name, "maybe", check=False).returncode != 0


def backdate_password(server: syslib.Server, name: str, days: int):
    """Makes name's account password `days` days older (in the live store)."""
    db = sqlite3.connect(server.data_dir / "pop3connex.db", timeout=30)
    try:
        with db:
            n = db.execute("UPDATE users SET password_changed_at = password_changed_at - ? WHERE name = ?",
                           (days * 86_400, name)).rowcount
        assert n == 1, f"no users row for {name}"
    finally:
        db.close()


def test_set_class_applies_the_class_password_policy(server, make_user):
    (staff, staff_pw), (other, other_pw) = make_user("cls"), make_user("cls")
    for n in (staff, other):
        backdate_password(server, n, 3)
    # without a class the global max_age_days (0: off) applies
    assert pass_login(server, staff, staff_pw).startswith("+OK")

    out = server.cli("user", "set-class", staff, "staff").stdout.decode()
    assert f"{staff}: class staff" in out, out
    # An expired password is refused exactly like a wrong one (no oracle for
    # a correct guess); the reason is in the security event only.
    log_from = len(server.log_text())
    assert pass_login(server, staff, staff_pw) == AUTH_FAILED
    assert pass_login(server, staff, staff_pw + "x") == AUTH_FAILED
    syslib.wait_until(
        lambda: re.search(rf'event="?auth_failure"?.*user="?{re.escape(staff)}"?.*reason="?password expired',
                          server.log_text()[log_from:]),
        10, 0.2, "an auth_failure event with reason `password expired` for the class member")
    assert pass_login(server, other, other_pw).startswith("+OK"), "the class policy hit a user outside the class"

    server.cli("user", "set-class", staff, "-")
    assert pass_login(server, staff, staff_pw).startswith("+OK")
    bad = server.cli("user", "set-class", staff, "bad class!", check=False)
    assert bad.returncode != 0 and b"class names" in bad.stderr, bad
    assert server.cli("user", "set-class", "nobody-" + staff, "staff", check=False).returncode != 0


def test_user_list_columns_align(server, make_user):
    short = syslib.unique_name("s")
    long = syslib.unique_name("l" + "o" * 60) + "@very-long-domain.example.org"
    for n in (short, long):
        server.add_user(n, syslib.new_password())
    assert server.deliver(addr(short), make_message(f"list-{short}")) == {addr(short): 250}
    lines = server.cli("user", "list").stdout.decode().splitlines()
    assert lines[0].split() == ["user", "messages", "octets", "status"], lines[0]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert short in rows and long in rows, lines

    def spans(line: str) -> list[tuple[int, int]]:
        return [m.span() for m in re.finditer(r"\S+", line)]
    head = spans(lines[0])
    for n in (short, long):
        row = spans(rows[n])
        assert len(row) == 4, rows[n]
        assert row[0][0] == head[0][0], lines
        assert row[1][1] == head[1][1], f"message counts not right-aligned under the header:\n" + "\n".join(lines)
        assert row[2][1] == head[2][1], f"octets not right-aligned under the header:\n" + "\n".join(lines)
        assert row[3][0] == head[3][0], f"status not aligned with the header:\n" + "\n".join(lines)
    assert rows[short].split()[1:] == ["1", str(server.mailbox_stat(short)[1]), "active"], rows[short]


def pop3_refused(server: syslib.Server, source: str) -> bool:
    """A banned address is dropped at accept, before any greeting."""
    try:
        s = syslib.connect(LOOPBACK, server.ports.pop3, timeout=5, source=source)
    except OSError:
        return True
    ls = syslib.LineSock(s, timeout=5)
    try:
        line = ls.readline()
    except (syslib.Closed, OSError):
        return True
    finally:
        ls.close()
    assert line.startswith(b"+OK"), f"neither served nor dropped: {line!r}"
    return False


def test_ban_add_refuses_the_address_only(server, make_user):
    banned, other = "127.0.0.5", "127.0.0.6"
    assert not pop3_refused(server, banned)
    out = server.cli("ban", "add", banned, "--reason", "cli test").stdout.decode()
    assert f"banned {banned}" in out, out
    listing = server.cli("ban", "list").stdout.decode()
    assert re.search(rf"^{re.escape(banned)}/32\s+never\s+\d+\s+cli test$", listing, re.M), listing
    # running servers pick bans up from the store (within 15 s)
    syslib.wait_until(lambda: pop3_refused(server, banned), 25, 0.5, f"{banned} to be refused after `ban add`")
    # implicit TLS too: dropped before the handshake
    with pytest.raises((syslib.Closed, OSError)):
        syslib.Pop3.connect(LOOPBACK, server.ports.pop3s, tls_ctx=server.tls_context(), timeout=5, source=banned)
    assert not pop3_refused(server, other), "a ban on one address refused another"

    server.cli("ban", "remove", banned)
    syslib.wait_until(lambda: not pop3_refused(server, banned), 25, 0.5, f"{banned} to be served after `ban remove`")
    assert server.cli("ban", "add", "not-an-address", check=False).returncode != 0


# Sections the documentation names that belong to other programs (getmail's,
# in the migration table of the operator guide).
FOREIGN_SECTIONS = {"destination", "retriever"}


def documented_sections() -> set[str]:
    found = set()
    for doc in [REPO / "README.md", REPO / "docs" / "operator-guide.md", REPO / "docs" / "specifications.md"]:
        found |= set(re.findall(r"`\[\[?([a-z_][a-z0-9_.]*)\]\]?", doc.read_text()))
    return found - FOREIGN_SECTIONS


def test_config_example_checks_and_documents_every_section(server_factory):
    srv = server_factory(start=False)
    example = srv.cli("config", "example").stdout.decode()
    assert example == (REPO / "docs" / "pop3connex.example.toml").read_text()
    parsed = tomllib.loads(example)

    # every section the documentation or the generated config names is in it
    generated = tomllib.loads(srv.config.read_text())
    wanted = documented_sections() | set(generated)
    assert {"server", "store", "tls", "pop3", "lmtp", "auth", "abuse", "log", "connector"} <= wanted, wanted
    headers = set(re.findall(r"^#?\s*\[\[?([a-z_][a-z0-9_.]*)\]\]?\s*$", example, re.M))
    missing = sorted(s for s in wanted if s not in headers)
    assert not missing, f"sections missing from `config example`: {missing}"
    for s in generated:
        assert s in parsed, f"[{s}] of the generated config is not an active section of the example"

    # as written, in a data directory (its paths are relative to the file),
    # it passes `config check` and serves
    srv.config.write_text(example)
    srv.assign_ports()
    cp = srv.cli("config", "check", check=False)
    assert cp.returncode == 0, f"`config check` refuses `config example`:\n{cp.stderr.decode()}"
    assert cp.stdout.decode().strip().endswith(": OK"), cp.stdout
    srv.start()
    with srv.pop3s() as p:
        assert "USER" in [c.split()[0] for c in p.capa()]


# --------------------------------------------------------------------------
# the harness (syslib.Server) does not mistake someone else's listener for
# the server's
# --------------------------------------------------------------------------

def test_harness_start_moves_off_a_taken_port(server_factory):
    srv = server_factory(start=False)
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        squatter.bind((LOOPBACK, srv.ports.lmtp))
        squatter.listen(1)
        taken = srv.ports.lmtp
        srv.start()
        assert srv.ports.lmtp != taken, "the server claims a port another process listens on"
        assert "Address already in use" in srv.log_text(), "the first start did not meet the taken port"
        for port in (srv.ports.pop3s, srv.ports.pop3, srv.ports.lmtp):
            assert syslib.listener_owned_by(srv.pid(), port)
        assert syslib.listener_owned_by(os.getpid(), taken)
        assert not syslib.listener_owned_by(srv.pid(), taken)
        with srv.lmtp() as l:
            assert l.greeting.code == 220
    finally:
        squatter.close()
