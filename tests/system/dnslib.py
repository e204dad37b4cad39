"""A real authoritative DNS server (NSD) with DNSSEC-signed test zones, and a
small HTTPS server for MTA-STS policies, for the connector's DNS tests.

Zones (all served by one NSD on 127.0.0.1, which answers the connector's
recursive-style queries authoritatively):

  test.           signed; its key is the trust anchor (written to a file)
  secure.test.    signed, DS in test.: MX, A, AAAA, TLSA, MTA-STS records
  insecure.test.  unsigned, delegated without DS: provably insecure
  bogus.test.     signed, DS in test., but the MX RRSIG is corrupted, and
                  so is the NSEC RRSIG that denies mail.bogus.test's TLSA

Zones are signed with ldns-signzone (package ldnsutils) before NSD (package
nsd) starts; the HTTPS server's certificates come from the openssl CLI.
Every wait is bounded; everything listens on loopback only.
"""

from __future__ import annotations

import base64
import http.server
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import syslib

# A TLSA association (3 1 1) published for mx1.secure.test port 25.
TLSA_HEX = "8cb0fc6c527506a053f4f14c8464bebbd6dede2738d11468dd953d7d6a3021f1"
STS_ID = "20261129T1200"


def run(cmd: list[str], cwd: Path) -> str:
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout


SOA = "{z} 300 IN SOA ns.test. hostmaster.test. 1 3600 600 86400 300\n{z} 300 IN NS ns.test.\n"


def zone_texts(ds: dict[str, str], extra: dict[str, str] | None = None) -> dict[str, str]:
    """The zone files' text; `extra` maps a zone ("secure.test.") to more
    records (zone-file lines) that a test adds to it before signing."""
    parent = SOA.format(z="test.") + "ns.test. 300 IN A 127.0.0.1\n"
    for child in ("secure", "insecure", "bogus"):
        parent += f"{child}.test. 300 IN NS ns.test.\n"
    for child, lines in ds.items():
        parent += lines
    secure = SOA.format(z="secure.test.") + (
        "secure.test. 300 IN MX 20 mx2.secure.test.\n"
        "secure.test. 300 IN MX 10 mx1.secure.test.\n"
        "mx1.secure.test. 300 IN A 127.0.0.1\n"
        "mx1.secure.test. 300 IN AAAA ::1\n"
        "mx2.secure.test. 300 IN A 127.0.0.2\n"
        f"_25._tcp.mx1.secure.test. 300 IN TLSA 3 1 1 {TLSA_HEX}\n"
        f'_mta-sts.secure.test. 300 IN TXT "v=STSv1; id={STS_ID}"\n'
        "mta-sts.secure.test. 300 IN A 127.0.0.1\n"
        "nullmx.secure.test. 300 IN MX 0 .\n"
        "implicit.secure.test. 300 IN A 127.0.0.3\n"
    )
    insecure = SOA.format(z="insecure.test.") + (
        "insecure.test. 300 IN MX 10 mail.insecure.test.\n"
        "mail.insecure.test. 300 IN A 127.0.0.1\n"
    )
    bogus = SOA.format(z="bogus.test.") + (
        "bogus.test. 300 IN MX 10 mail.bogus.test.\n"
        "mail.bogus.test. 300 IN A 127.0.0.1\n"
        # Valid MX, but the NSEC that denies its TLSA records is corrupted:
        # a forged "no TLSA" must not downgrade DANE.
        "downgrade.bogus.test. 300 IN MX 10 mail.bogus.test.\n"
    )
    texts = {"test.": parent, "secure.test.": secure, "insecure.test.": insecure, "bogus.test.": bogus}
    for zone, records in (extra or {}).items():
        if zone not in texts:
            raise ValueError(f"no zone {zone} to add records to")
        texts[zone] += records.rstrip("\n") + "\n"
    return texts


def keygen(zone: str, d: Path) -> str:
    """A combined signing key (KSK flag, 257) for zone; returns its base name."""
    return run(["ldns-keygen", "-a", "ECDSAP256SHA256", "-k", zone], d).strip()


def sign(zone: str, text: str, key: str, d: Path) -> Path:
    src = d / f"{zone}zone"
    src.write_text(text)
    out = d / f"{zone}zone.signed"
    # Inception an hour ago against clock skew; valid for 30 days.
    inception = time.strftime("%Y%m%d%H%M%S", time.gmtime(time.time() - 3600))
    expiration = time.strftime("%Y%m%d%H%M%S", time.gmtime(time.time() + 30 * 86400))
    run(["ldns-signzone", "-i", inception, "-e", expiration, "-f", str(out), "-o", zone, str(src), key], d)
    return out


def corrupt_rrsig(path: Path, owner: str, covered: str) -> None:
    """Flips bytes in the signature of the RRSIG covering (owner, covered)."""
    lines = path.read_text().splitlines()
    done = False
    for i, line in enumerate(lines):
        f = line.split()
        if len(f) > 5 and f[0] == owner and f[3] == "RRSIG" and f[4] == covered:
            sig = bytearray(base64.b64decode("".join(f[12:])))
            for j in range(8, 16):
                sig[j] ^= 0xFF
            lines[i] = " ".join(f[:12] + [base64.b64encode(bytes(sig)).decode()])
            done = True
    if not done:
        raise RuntimeError(f"no RRSIG {owner} {covered} in {path}")
    path.write_text("\n".join(lines) + "\n")


class Nsd:
    """NSD serving the signed test zones on 127.0.0.1:port (UDP and TCP);
    `extra` adds records to zones (see zone_texts)."""

    def __init__(self, base: Path, extra: dict[str, str] | None = None):
        self.dir = base / "nsd"
        self.dir.mkdir(parents=True)
        d = self.dir
        keys = {z: keygen(z, d) for z in ("test.", "secure.test.", "bogus.test.")}
        ds = {}
        for z in ("secure.test.", "bogus.test."):
            ds_out = run(["ldns-key2ds", "-n", "-2", f"{keys[z]}.key"], d)
            ds[z] = ds_out
        texts = zone_texts(ds, extra)
        files = {}
        for z, text in texts.items():
            if z in keys:
                files[z] = sign(z, text, keys[z], d)
            else:
                files[z] = d / f"{z}zone"
                files[z].write_text(text)
        corrupt_rrsig(files["bogus.test."], "bogus.test.", "MX")
        corrupt_rrsig(files["bogus.test."], "mail.bogus.test.", "NSEC")
        # The trust anchor: the DNSKEY of test. in zone-file form.
        self.anchor = d / "anchor.key"
        self.anchor.write_text((d / f"{keys['test.']}.key").read_text())
        self.anchor_ds = d / "anchor.ds"
        self.anchor_ds.write_text(run(["ldns-key2ds", "-n", "-2", f"{keys['test.']}.key"], d))
        self.port = syslib.free_port()
        conf = d / "nsd.conf"
        zones = "".join(f"zone:\n  name: {z}\n  zonefile: {files[z]}\n" for z in files)
        conf.write_text(
            "server:\n"
            f"  ip-address: 127.0.0.1@{self.port}\n"
            "  do-ip6: no\n"
            f"  zonesdir: {d}\n"
            '  database: ""\n'
            f"  pidfile: {d}/nsd.pid\n"
            f"  xfrdfile: {d}/xfrd.state\n"
            f"  xfrdir: {d}\n"
            f"  zonelistfile: {d}/zone.list\n"
            f"  logfile: {d}/nsd.log\n"
            '  username: ""\n'
            '  chroot: ""\n'
            "  server-count: 1\n"
            "  verbosity: 1\n"
            "remote-control:\n"
            "  control-enable: no\n" + zones
        )
        run(["nsd-checkconf", str(conf)], d)
        self.stderr = open(d / "nsd.stderr", "wb")
        self.proc = subprocess.Popen(["nsd", "-d", "-c", str(conf)], cwd=d, stdout=subprocess.DEVNULL,
                                     stderr=self.stderr, start_new_session=True)
        try:
            syslib.wait_until(self.answers, 20, 0.1, "NSD to answer")
        except Exception:
            self.stop()
            raise

    def answers(self) -> bool:
        if self.proc.poll() is not None:
            logs = [self.dir / "nsd.stderr", self.dir / "nsd.log"]
            raise RuntimeError("nsd exited: " + "".join(p.read_text(errors="replace") for p in logs if p.exists()))
        q = b"\x12\x34\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x04test\x00\x00\x06\x00\x01"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.3)
            try:
                s.sendto(q, ("127.0.0.1", self.port))
                r, _ = s.recvfrom(4096)
            except OSError:
                return False
        return r[:2] == b"\x12\x34" and (r[3] & 0x0F) == 0 and r[7] >= 1

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        # NSD's server process exits a moment after the main one; wait for
        # the whole process group (its own session) to be gone.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.stderr.close()


def make_ca(d: Path) -> Path:
    """A test CA (openssl CLI) in d; returns ca.pem (ca.key beside it)."""
    d.mkdir(parents=True, exist_ok=True)
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=POP3conneX test CA",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"], d)
    return d / "ca.pem"


def make_cert(ca: Path, d: Path, names: list[str]) -> tuple[Path, Path]:
    """A server certificate for `names` issued by the CA at `ca`; returns
    (cert.pem, key.pem) in d."""
    d.mkdir(parents=True, exist_ok=True)
    run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", "srv.key", "-out", "srv.csr", "-subj", f"/CN={names[0]}"], d)
    (d / "ext.cnf").write_text("subjectAltName=" + ",".join(f"DNS:{n}" for n in names)
                               + "\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    run(["openssl", "x509", "-req", "-in", "srv.csr", "-CA", str(ca), "-CAkey", str(ca.with_suffix(".key")),
         "-CAcreateserial", "-out", "srv.pem", "-days", "2", "-extfile", "ext.cnf"], d)
    return d / "srv.pem", d / "srv.key"


class PolicyServer:
    """HTTPS on 127.0.0.1:port serving /.well-known/mta-sts.txt."""

    def __init__(self, cert: Path, key: Path, policy: str, content_type: str = "text/plain"):
        self.policy, self.content_type, self.hits = policy, content_type, 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                outer.hits += 1
                if self.path != "/.well-known/mta-sts.txt":
                    self.send_error(404)
                    return
                body = outer.policy.encode()
                self.send_response(200)
                self.send_header("Content-Type", outer.content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.httpd.timeout = 5
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


