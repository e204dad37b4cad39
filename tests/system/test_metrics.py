"""Prometheus metrics ([metrics], GET /metrics) against the real binary:
real POP3S logins and an LMTP delivery move the counters; the bearer token
is required; `promtool` checks the live scrape and the shipped alert rules;
a real Prometheus server (Debian `prometheus`) scrapes the endpoint with the
token and its query API returns the login counter the test incremented."""

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

import syslib
from conftest import require_tool

REPO = Path(__file__).resolve().parents[2]
CONTRIB = REPO / "contrib" / "prometheus"
TEST_TIMEOUT = 180

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> list[tuple[str, dict, float]]:
    """The samples of a Prometheus text exposition."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, f"unparsable exposition line: {line!r}"
        labels = dict(LABEL.findall(m.group(2) or ""))
        out.append((m.group(1), labels, float(m.group(3))))
    return out


def total(samples, name: str, **want) -> float:
    return sum(v for n, l, v in samples if n == name and all(l.get(k) == x for k, x in want.items()))


def scrape(port: int, token: str | None, accept: str | None = None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    if accept:
        req.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


@pytest.fixture
def metrics_server(server_factory):
    srv = server_factory(start=False, name="metrics")
    token = secrets.token_urlsafe(24)
    tok = srv.data_dir / "metrics.token"
    tok.write_text(token + "\n")
    tok.chmod(0o600)
    port = syslib.free_port()
    srv.set_option("metrics", "listen", [f"127.0.0.1:{port}"])
    srv.set_option("metrics", "bearer_token", "file:metrics.token")
    # A mailbox that exists before start: the store totals count it.
    srv.user = (syslib.unique_name("metrics"), syslib.new_password())
    srv.add_user(*srv.user)
    srv.start()
    syslib.wait_until(lambda: syslib.listener_owned_by(srv.pid(), port), 15, what="metrics listener")
    srv.metrics_port = port
    srv.metrics_token = token
    srv.metrics_token_file = tok
    return srv


def test_metrics_move_with_real_sessions_and_prometheus_scrapes_them(metrics_server, tmp_path):
    srv = metrics_server
    port, token = srv.metrics_port, srv.metrics_token
    promtool = require_tool("promtool")
    prometheus = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not os.access(prometheus, os.X_OK):
        pytest.fail("Debian package `prometheus` is not installed (/usr/bin/prometheus)", pytrace=False)

    assert re.search(rf"listening metrics.*address=127\.0\.0\.1:{port}", srv.log_text()), srv.log_text()[-2000:]

    # Without (or with a wrong) token: 401, and the token never shows.
    code, headers, body = scrape(port, None)
    assert code == 401, (code, body)
    assert "bearer" in headers.get("WWW-Authenticate", "").lower()
    code, _, body = scrape(port, "wrong-" + token)
    assert code == 401, (code, body)
    # Only GET /metrics is served.
    req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Authorization": f"Bearer {token}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 404

    code, _, before_text = scrape(port, token)
    assert code == 200, before_text
    before = parse(before_text)

    # A real failed and a real successful POP3S login, one delivery, one RETR.
    name, pw = srv.user
    with srv.pop3s() as p:
        p.cmd(f"USER {name}")
        p.cmd("PASS not-the-password", expect_ok=False)
    msg = b"Subject: metrics\r\n\r\nhello metrics\r\n"
    assert srv.deliver(syslib.addr(name), msg) == {syslib.addr(name): 250}
    with srv.pop3s() as p:
        p.login(name, pw)
        assert p.stat()[0] == 1
        assert b"hello metrics" in p.retr(1)
        p.quit()

    def moved():
        code, _, text = scrape(port, token)
        assert code == 200
        s = parse(text)
        ok = (total(s, "pop3connex_logins_total", outcome="failure")
              > total(before, "pop3connex_logins_total", outcome="failure")
              and total(s, "pop3connex_logins_total", outcome="success")
              > total(before, "pop3connex_logins_total", outcome="success"))
        return (s, text) if ok else None

    after, text = syslib.wait_until(moved, 10, what="login counters to move")
    assert total(after, "pop3connex_login_failures_total", mechanism="USER") >= 1, text
    assert total(after, "pop3connex_connections_total", listener="pop3s", outcome="accepted") >= 2
    assert total(after, "pop3connex_tls_handshakes_total", listener="pop3s") >= 2
    assert total(after, "pop3connex_lmtp_deliveries_total", outcome="delivered") >= 1
    assert total(after, "pop3connex_lmtp_delivered_bytes_total") >= len(msg)
    assert total(after, "pop3connex_retr_messages_total") >= 1
    assert total(after, "pop3connex_retr_bytes_total") >= len(msg)
    assert total(after, "pop3connex_store_writable") == 1
    # The delivery and the session waited on the store: its latency histogram saw them.
    assert total(after, "pop3connex_store_operation_duration_seconds_count", op="write") >= 1, text
    assert total(after, "pop3connex_store_operation_duration_seconds_count", op="read") >= 1, text
    assert total(after, "pop3connex_store_operation_duration_seconds_bucket", op="write", le="+Inf") >= 1, text
    assert any(n == "pop3connex_bans_active" for n, _, _ in after), text
    # Store totals, counted when the endpoint starts (before the delivery).
    assert total(after, "pop3connex_store_mailboxes") >= 1, text
    assert total(after, "process_resident_memory_bytes") > 0
    assert total(after, "process_open_fds") > 0
    # Bounded labels: no user names, no addresses, no token.
    assert name not in text and token not in text
    assert "127.0.0.1" not in text

    # OpenMetrics when asked for.
    code, headers, om = scrape(port, token, accept="application/openmetrics-text; version=1.0.0")
    assert code == 200 and headers["Content-Type"].startswith("application/openmetrics-text"), headers
    assert om.rstrip().endswith("# EOF")

    dashboard = (REPO / "contrib" / "grafana" / "pop3connex.json").read_text()

    # promtool: the live scrape and the shipped rules.
    cp = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    assert cp.returncode == 0, cp.stdout.decode() + cp.stderr.decode()
    cp = subprocess.run([promtool, "check", "rules", str(CONTRIB / "alerts.yml")], capture_output=True, timeout=60)
    assert cp.returncode == 0, cp.stdout.decode() + cp.stderr.decode()
    cp = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=CONTRIB, capture_output=True,
                        timeout=120)
    assert cp.returncode == 0, cp.stdout.decode() + cp.stderr.decode()

    # A real Prometheus scrapes us every second with the token, with our rules.
    prom_port = syslib.free_port()
    prom_dir = tmp_path / "prometheus"
    (prom_dir / "data").mkdir(parents=True)
    config = prom_dir / "prometheus.yml"
    config.write_text(json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(CONTRIB / "alerts.yml")],
        "scrape_configs": [{
            "job_name": "pop3connex",
            "scrape_interval": "1s",
            "scrape_timeout": "1s",
            "authorization": {"type": "Bearer", "credentials_file": str(srv.metrics_token_file)},
            "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
        }],
    }))
    log = open(prom_dir / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={prom_dir / 'data'}",
         f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=prom_dir)
    api = f"http://127.0.0.1:{prom_port}/api/v1"

    def query(q: str):
        url = f"{api}/query?" + urllib.parse.urlencode({"query": q})
        with urllib.request.urlopen(url, timeout=5) as r:
            data = json.load(r)
        assert data["status"] == "success", data
        return data["data"]["result"]

    def logged() -> str:
        return (prom_dir / "prometheus.log").read_text(errors="replace")[-3000:]

    try:
        def scraped():
            assert proc.poll() is None, "prometheus exited:\n" + logged()
            try:
                r = query('sum(pop3connex_logins_total{job="pop3connex",outcome="success"})')
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return None
            return r if r and float(r[0]["value"][1]) >= 1 else None

        try:
            result = syslib.wait_until(scraped, 30, interval=0.5, what="prometheus to scrape the login counter")
        except TimeoutError as e:
            pytest.fail(f"prometheus never saw the login counter ({e}); its log:\n" + logged(), pytrace=False)
        assert float(result[0]["value"][1]) >= 1
        failures = query('sum(pop3connex_logins_total{job="pop3connex",outcome="failure"})')
        assert failures and float(failures[0]["value"][1]) >= 1, failures
        up = query('up{job="pop3connex"}')
        assert up and up[0]["value"][1] == "1", up
        # Every dashboard query is valid PromQL and finds the server.
        exprs = [t["expr"] for p in json.loads(dashboard)["panels"] for t in p.get("targets", [])]
        assert len(exprs) > 20
        for expr in exprs:
            q = expr.replace("$__rate_interval", "1m").replace("$job", ".*").replace("$instance", ".*")
            query(q)
        assert query('pop3connex_build_info{job=~".*",instance=~".*"}')
        with urllib.request.urlopen(f"{api}/rules", timeout=5) as r:
            groups = json.load(r)["data"]["groups"]
        names = {rule["name"] for g in groups for rule in g["rules"]}
        assert {"Pop3connexFailedLoginSpike", "Pop3connexStoreReadOnly"} <= names, names
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def test_metrics_listener_stops_with_the_server(metrics_server):
    srv = metrics_server
    code, _, _ = scrape(srv.metrics_port, srv.metrics_token)
    assert code == 200
    assert srv.stop() == 0
    with pytest.raises(OSError):
        syslib.connect("127.0.0.1", srv.metrics_port, timeout=2).close()
