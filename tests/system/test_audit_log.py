"""The audit log through the real binary: every CLI subcommand that changes
something lands in `audit-log export` as an attempt and an outcome record,
`audit-log verify` passes on the untouched log, and a database edited with
sqlite3 (a middle record changed, the newest records deleted) makes verify
exit 1 naming the record, and a checkpoint taken from the log verifies
offline with the printed public key.
"""

from __future__ import annotations

import base64
import json
import mailbox
import re
import sqlite3
import struct
import subprocess

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

import syslib

TEST_TIMEOUT = 180
PASSWORD = "Audit-Trail-Passw0rd-42!"


def export(srv: syslib.Server) -> list[dict]:
    cp = srv.cli("audit-log", "export")
    return [json.loads(line) for line in cp.stdout.decode().splitlines()]


def test_every_cli_change_is_recorded_and_tampering_is_named(server_factory, tmp_path):
    srv = server_factory(start=False)
    pw = (PASSWORD + "\n").encode()
    passwd = tmp_path / "passwd"
    passwd.write_text("bob:{SHA512-CRYPT}$6$DAEBdnbM6x1qs1Zp$61UH.TYqGe1o4wPuELC1PJHFGN.eczraTrksAeTWd3"
                      "Gpnaim7hyGbXA9b1rP4wGtu.AQHqM8B1R0wQa3Hyamc1::::::\n")
    mbox_path = tmp_path / "in.mbox"
    box = mailbox.mbox(str(mbox_path))
    box.add(b"From: a@example.org\nSubject: one\n\nbody\n")
    box.flush()
    maildir = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    (maildir / "new" / "1.host").write_bytes(b"From: a@example.org\nSubject: two\n\nbody\n")
    account = tmp_path / "account.toml"
    account.write_text(
        'name = "audited"\nhost = "127.0.0.1"\nport = 9\ntls = "implicit"\nuser = "u"\n'
        'password = "env:AUDIT_TEST_UNUSED"\n[route.deliver_to]\nlocal = "alice"\n')

    srv.cli("user", "add", "alice", "--password-stdin", input=pw)
    srv.cli("user", "passwd", "alice", "--password-stdin", input=("New-" + PASSWORD + "\n").encode())
    srv.cli("user", "set-class", "alice", "staff")
    srv.cli("user", "require-modern-auth", "alice", "on")
    srv.cli("user", "disable", "alice")
    srv.cli("user", "enable", "alice")
    srv.cli("user", "unlock", "alice")
    added = srv.cli("user", "app-password", "add", "alice", "phone").stdout.decode()
    app_id = added.split()[2]
    srv.cli("user", "app-password", "revoke", "alice", app_id)
    srv.cli("user", "import-passwd", str(passwd))
    srv.cli("import", "mbox", "alice", str(mbox_path))
    srv.cli("import", "maildir", "alice", str(maildir))
    srv.cli("ban", "add", "192.0.2.0/24", "--reason", "audit test")
    srv.cli("ban", "remove", "192.0.2.0/24")
    srv.cli("connector", "add", "--file", str(account))
    srv.cli("connector", "remove", "audited")
    srv.cli("user", "delete", "bob", "--yes")
    # A refused operation is recorded with its error kind.
    refused = srv.cli("user", "delete", "alice", check=False)
    assert refused.returncode != 0

    changes = [
        ("user.add", "alice"), ("user.passwd", "alice"), ("user.set_class", "alice"),
        ("user.require_modern_auth", "alice"), ("user.disable", "alice"), ("user.enable", "alice"),
        ("user.unlock", "alice"), ("app_password.add", "alice"), ("app_password.revoke", f"alice/{app_id}"),
        ("user.import_passwd", "passwd-file"), ("import.mbox", "alice"), ("import.maildir", "alice"),
        ("ban.add", "192.0.2.0/24"),
        ("ban.remove", "192.0.2.0/24"), ("connector.add", "audited"), ("connector.remove", "audited"),
        ("user.delete", "bob"),
    ]
    records = export(srv)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    for action, target in changes:
        outcomes = [r["outcome"] for r in records if r["action"] == action and r["target"] == target]
        assert outcomes == ["attempt", "ok"], f"{action} {target}: {outcomes}"
    outcomes = [r["outcome"] for r in records if r["action"] == "user.delete" and r["target"] == "alice"]
    assert outcomes == ["attempt", "refused"], outcomes
    by_action = {r["action"]: r for r in records if r["outcome"] == "attempt"}
    assert by_action["user.set_class"]["before"] == {"class": None}
    assert by_action["user.set_class"]["after"] == {"class": "staff"}
    assert by_action["user.disable"]["before"] == {"disabled": False}
    assert by_action["ban.remove"]["before"]["reason"] == "audit test"
    assert by_action["connector.remove"]["before"]["host"] == "127.0.0.1"
    assert all(r["actor"].startswith("cli") for r in records)
    assert len({r["mac"] for r in records}) == len(records)
    # No secret is ever recorded.
    text = json.dumps(records)
    for secret in (PASSWORD, "61UH.TYqGe1o4wPuELC1PJHFGN", added.split()[-1]):
        assert secret not in text

    # The export itself was recorded as a read of the log.
    reads = [r for r in export(srv) if r["action"] == "audit.read"]
    assert [r["outcome"] for r in reads[:2]] == ["attempt", "ok"], reads
    shown = srv.cli("audit-log", "show", "--action", "ban", "--limit", "5").stdout.decode()
    assert "ban.remove" in shown and "ban.add" in shown and "user.add" not in shown, shown

    # An auditor checks a logged checkpoint offline with the public key alone.
    key_b64 = srv.cli("audit-log", "public-key").stdout.decode().split()[1]
    env = {**srv.env(), "POP3CONNEX_LOG": "pop3connex::audit=info"}
    for _ in range(100):  # appends until the next checkpoint is due
        cp = subprocess.run([str(srv.binary), "--config", str(srv.config), "ban", "list"], env=env,
                            capture_output=True, timeout=60, check=True)
        line = next((l for l in cp.stderr.decode().splitlines() if "audit checkpoint" in l), None)
        if line:
            break
    assert line, "no checkpoint was logged within 100 records"
    fields = dict(re.findall(r"(seq|mac|time|signature)=(\S+)", re.sub(r"\x1b\[[0-9;]*m", "", line)))
    message = (b"pop3connex/audit-checkpoint/v1" + struct.pack(">qq", int(fields["seq"]), int(fields["time"]))
               + bytes.fromhex(fields["mac"]))
    Ed25519PublicKey.from_public_bytes(base64.b64decode(key_b64)).verify(
        base64.b64decode(fields["signature"]), message)
    logged = next(r for r in export(srv) if r["seq"] == int(fields["seq"]))
    assert logged["mac"] == fields["mac"]
    records = export(srv)

    ok = srv.cli("audit-log", "verify")
    assert ok.stdout.decode().startswith("audit log intact: "), ok.stdout
    key = srv.cli("audit-log", "public-key").stdout.decode()
    assert key.startswith("ed25519 ") and "BEGIN PUBLIC KEY" in key

    db = srv.data_dir / "pop3connex.db"
    target = next(r["seq"] for r in records if r["action"] == "ban.add" and r["outcome"] == "attempt")
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE audit_log SET target = '198.51.100.0/24' WHERE seq = ?", (target,))
    bad = srv.cli("audit-log", "verify", check=False)
    out = bad.stdout.decode()
    assert bad.returncode == 1, out
    assert f"first bad record seq {target}: MAC mismatch" in out, out
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE audit_log SET target = '192.0.2.0/24' WHERE seq = ?", (target,))
    assert srv.cli("audit-log", "verify", check=False).returncode == 0

    # Deleting the newest records: the head file still knows the length.
    with sqlite3.connect(db) as conn:
        last = conn.execute("SELECT max(seq) FROM audit_log").fetchone()[0]
        conn.execute("DELETE FROM audit_log WHERE seq > ?", (last - 3,))
    bad = srv.cli("audit-log", "verify", check=False)
    out = bad.stdout.decode()
    assert bad.returncode == 1, out
    assert f"first bad record seq {last - 2}: tail shorter than head" in out, out
    # Fail closed: no admin operation runs on a log that lost its tail.
    refused = srv.cli("ban", "add", "203.0.113.7", check=False)
    assert refused.returncode != 0 and b"audit log" in refused.stderr, refused.stderr
    assert "203.0.113.7" not in srv.cli("ban", "list", check=False).stdout.decode()
    # The operator accepts the log as it is; that is recorded, and work goes on.
    srv.cli("audit-log", "reset-head", "--yes")
    assert srv.cli("audit-log", "verify").returncode == 0
    assert any(r["action"] == "audit.head_reset" for r in export(srv))


def test_cli_admin_changes_reach_the_alert_hook(server_factory, tmp_path):
    """Role changes and a second-factor reset made with the CLI page the
    operator through [connector] alert_command, before the command returns."""
    alerts = tmp_path / "alerts.jsonl"
    srv = server_factory({("connector", "alert_command"): ["sh", "-c", f"cat >> '{alerts}'"]}, start=False)
    srv.cli("admin", "add", "carol", "--role", "auditor", "--password-stdin", input=(PASSWORD + "\n").encode())
    srv.cli("admin", "set-roles", "carol", "--role", "superadmin")
    srv.cli("admin", "reset-mfa", "carol")
    got = [json.loads(line) for line in alerts.read_text().splitlines()]
    by_message = {a["message"]: a for a in got}
    assert {"administrator roles changed", "administrator second factors reset"} <= set(by_message), got
    roles = by_message["administrator roles changed"]
    assert roles["admin"] == "carol" and "superadmin" in roles["roles"] and roles["source"] == "admin", roles
    assert all(PASSWORD not in line for line in alerts.read_text().splitlines())
