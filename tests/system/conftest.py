"""Fixtures for the POP3conneX system tests.

Environment:
  POP3CONNEX_BIN   path of the server binary (default: <repo>/target/release/pop3connex)

Each test module gets its own data directory (created with `pop3connex init`)
and its own `serve` process on fresh loopback ports; tests that need special
settings or kill the server use `server_factory` for private instances.
A module can set SERVER_SETTINGS = {("section", "key"): value} and
TEST_TIMEOUT = seconds (per-test watchdog, default 240).

A server counts as started once its own process holds each listener; a
start that meets a port taken meanwhile retries on new ports (syslib.Server).
Lines passed to syslib.summary() (e.g. where the crash tests' kills landed)
are repeated in an "exercised" section of the terminal summary.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import syslib  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

# Raise the open-files limit for this process (and so for the servers it
# starts) so the 1,000-connection test can run. Bounded by the hard limit.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
_want = 8192 if _hard == resource.RLIM_INFINITY else min(8192, _hard)
if _soft < _want:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_want, _hard))


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.fail(f"required tool `{name}` is not installed (Debian package needed for the system tests)",
                    pytrace=False)
    return path


@pytest.fixture(scope="session")
def binary() -> Path:
    b = Path(os.environ.get("POP3CONNEX_BIN", REPO / "target" / "release" / "pop3connex")).resolve()
    if not b.is_file() or not os.access(b, os.X_OK):
        pytest.fail(f"server binary not found at {b}: build it with "
                    f"`cargo build --release -p pop3connex` or set POP3CONNEX_BIN", pytrace=False)
    return b


def pytest_terminal_summary(terminalreporter):
    """Shows what randomised tests exercised (syslib.summary)."""
    if syslib.SUMMARY:
        terminalreporter.section("exercised")
        for line in syslib.SUMMARY:
            terminalreporter.write_line(line)


# --------------------------------------------------------------------------
# per-test watchdog: no test may hang the suite
# --------------------------------------------------------------------------

class TestTimeout(Exception):
    pass


@pytest.fixture(autouse=True)
def _watchdog(request):
    limit = getattr(request.module, "TEST_TIMEOUT", 240)

    def on_alarm(signum, frame):
        raise TestTimeout(f"test exceeded its {limit}s time limit")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --------------------------------------------------------------------------
# servers
# --------------------------------------------------------------------------

class ServerFactory:
    def __init__(self, binary: Path, base: Path):
        self.binary = binary
        self.base = base
        self.servers: list[syslib.Server] = []

    def __call__(self, settings: dict | None = None, start: bool = True, name: str | None = None) -> syslib.Server:
        name = name or f"srv{len(self.servers)}"
        srv = syslib.Server(self.binary, self.base / name, settings)
        self.servers.append(srv)
        srv.init()
        if start:
            srv.start()
        return srv

    def close(self):
        for s in self.servers:
            try:
                s.stop()
            except Exception:  # noqa: BLE001 - best effort at teardown
                s.kill9()


@pytest.fixture
def server_factory(binary, tmp_path):
    f = ServerFactory(binary, tmp_path)
    yield f
    f.close()


@pytest.fixture(scope="module")
def module_server(binary, tmp_path_factory, request):
    settings = getattr(request.module, "SERVER_SETTINGS", {})
    f = ServerFactory(binary, tmp_path_factory.mktemp(request.module.__name__.split(".")[-1]))
    srv = f(settings, name="data")
    yield srv
    f.close()


@pytest.fixture
def server(module_server):
    """The module's shared server; a test that finds it dead fails, and the
    next test gets a restarted one."""
    if not module_server.alive():
        module_server.start()
    yield module_server
    if not module_server.alive():
        code = module_server.proc.returncode
        module_server.proc = None
        pytest.fail(f"server process died during the test (exit code {code}); log tail:\n"
                    + module_server.log_text()[-3000:], pytrace=False)


@pytest.fixture
def make_user(server):
    """make_user(prefix='u') -> (name, password), created with
    `user add NAME --password-stdin` on the module server."""
    def make(prefix: str = "u", srv: syslib.Server | None = None):
        name = syslib.unique_name(prefix)
        pw = syslib.new_password()
        (srv or server).add_user(name, pw)
        return name, pw
    return make


@pytest.fixture
def user(make_user):
    return make_user()
