"""TLS configuration audit with testssl.sh (Debian package testssl.sh,
binary `testssl`) against the implicit-TLS port and the STLS port.

Checks run: protocols (-p), standard cipher lists (-s), forward secrecy
(-f), each cipher per protocol (-E) and vulnerabilities (-U). Results are
read from testssl's JSON output.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from conftest import require_tool
from syslib import LOOPBACK

TEST_TIMEOUT = 420
# testssl opens hundreds of connections a minute and sends deliberately odd
# handshakes; a ban halfway through would make ciphers and protocols look
# "not offered". Bans are tested in test_abuse.py; the TLS setup is default.
SERVER_SETTINGS = {
    ("abuse", "ban_after_connections_per_minute"): 1000000,
    ("abuse", "ban_after_protocol_abuse"): 1000,
}


def run_testssl(tmp_path, target: str, starttls: bool) -> list[dict]:
    exe = require_tool("testssl")
    out = tmp_path / ("stls.json" if starttls else "implicit.json")
    cmd = [exe, "--quiet", "--warnings", "off", "--color", "0", "--ip", "one",
           "--connect-timeout", "10", "--openssl-timeout", "10",
           "--jsonfile", str(out), "-p", "-s", "-f", "-E", "-U"]
    if starttls:
        cmd += ["-t", "pop3"]
    cmd.append(target)
    try:
        cp = subprocess.run(cmd, capture_output=True, timeout=360, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"testssl did not finish in 360s: {cmd}\n{(e.stdout or b'')[-3000:]!r}")
    transcript = cp.stdout.decode(errors="replace")[-4000:] + cp.stderr.decode(errors="replace")[-2000:]
    assert out.is_file(), f"testssl wrote no JSON (exit {cp.returncode}):\n{transcript}"
    findings = json.loads(out.read_text())
    assert isinstance(findings, list) and findings, f"empty testssl JSON:\n{transcript}"
    fatal = [f for f in findings if f.get("severity") == "FATAL" or f.get("id") == "scanProblem"]
    assert not fatal, f"testssl could not scan: {fatal}\n{transcript}"
    return findings


def check_findings(findings: list[dict], starttls: bool):
    by_id = {f["id"]: f for f in findings}
    missing = [i for i in ["SSLv2", "SSLv3", "TLS1", "TLS1_1", "TLS1_2", "TLS1_3", "FS" if "FS" in by_id else "PFS"]
               if i not in by_id]
    assert not missing, f"testssl did not report {missing}; ids: {sorted(by_id)}"
    if starttls:
        assert by_id.get("service", {}).get("finding", "").lower() == "pop3", by_id.get("service")

    for proto in ["SSLv2", "SSLv3", "TLS1", "TLS1_1"]:
        assert "not offered" in by_id[proto]["finding"], f"{proto}: {by_id[proto]}"
    for proto in ["TLS1_2", "TLS1_3"]:
        fnd = by_id[proto]["finding"]
        assert fnd.startswith("offered"), f"{proto} not offered: {by_id[proto]}"

    for weak in ["cipherlist_NULL", "cipherlist_aNULL", "cipherlist_EXPORT", "cipherlist_LOW",
                 "cipherlist_3DES_IDEA"]:
        if weak in by_id:
            assert "not offered" in by_id[weak]["finding"], f"{weak}: {by_id[weak]}"
    fs = by_id.get("FS") or by_id.get("PFS")
    assert fs["finding"].startswith("offered"), f"forward secrecy: {fs}"

    # Every cipher the server accepted (from -E) must use an ephemeral key
    # exchange. Finding format: "TLS 1.2   xc02b   ECDHE-ECDSA-AES128-GCM-SHA256   ECDH 253   AESGCM ..."
    per_proto = [f for f in findings if re.match(r"^cipher-(ssl2|ssl3|tls1|tls1_1|tls1_2|tls1_3)_x[0-9a-f]+$", f["id"])]
    old = [f["id"] for f in per_proto if re.match(r"^cipher-(ssl2|ssl3|tls1|tls1_1)_x", f["id"])]
    assert not old, f"ciphers accepted with an obsolete protocol: {old}"
    assert any(f["id"].startswith("cipher-tls1_2_") for f in per_proto), "no TLS 1.2 cipher accepted"
    assert any(f["id"].startswith("cipher-tls1_3_") for f in per_proto), "no TLS 1.3 cipher accepted"
    non_fs = []
    for f in per_proto:
        cols = f["finding"].split()
        # cols: TLS, 1.x, hexcode, openssl-name, kx, kx-bits, enc, bits, iana-name
        kx = cols[4] if len(cols) > 4 else ""
        if not (kx.startswith("ECDH") or kx.startswith("DH") or kx.startswith("X25519") or kx.startswith("X448")):
            non_fs.append(f["finding"])
    assert not non_fs, "ciphers without forward secrecy accepted:\n" + "\n".join(non_fs)

    bad = [f for f in findings if f.get("severity") in ("HIGH", "CRITICAL")]
    assert not bad, "testssl findings with severity HIGH/CRITICAL:\n" + "\n".join(
        f"{f['id']}: {f['severity']}: {f['finding']}" for f in bad)


def test_testssl_implicit_tls(server, tmp_path):
    findings = run_testssl(tmp_path, f"{LOOPBACK}:{server.ports.pop3s}", starttls=False)
    check_findings(findings, starttls=False)


def test_testssl_stls(server, tmp_path):
    findings = run_testssl(tmp_path, f"{LOOPBACK}:{server.ports.pop3}", starttls=True)
    check_findings(findings, starttls=True)
