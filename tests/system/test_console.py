"""The admin web console in a real browser: headless Chromium (Debian
`chromium` + `chromium-driver`) driven by Selenium against the real server.

One administrator, bootstrapped with `pop3connex admin add`, goes through the
whole life of a console session: password login, TOTP enrolment (the secret
read from the page, codes computed here by RFC 6238), logout, login with
password + TOTP, passkey enrolment through Chrome's virtual authenticator
(CTAP2, internal transport, resident keys, user verification), logout, login
with password + passkey, step-up with the passkey, adding a user, banning an
address, and finding those actions in the audit log. Every main page is then
loaded again on a 390x844 phone screen and must not scroll sideways.

Certificates: Chrome refuses WebAuthn on a page with a certificate error, so
the server's test CA is made a trusted root for this Chrome only: a private
HOME whose NSS database (`certutil`, Debian `libnss3-tools`) holds the CA;
chromedriver passes HOME on to Chrome. No `--ignore-certificate-errors`.

Screenshots of the main pages go to $POP3CONNEX_ARTIFACTS (default: a fresh
temporary directory; its path is printed). With POP3CONNEX_DOCS_IMG=1 a few
are also copied to docs/img/console-*.png for the README.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import syslib
from conftest import require_tool
from syslib import LOOPBACK

# Python selenium is installed by scripts/test.sh (for the interpreter that runs pytest).
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.virtual_authenticator import Protocol, Transport, VirtualAuthenticatorOptions
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

REPO = Path(__file__).resolve().parents[2]
TEST_TIMEOUT = 180
WAIT = 15  # seconds for one page to appear
CHROMEDRIVER = "/usr/bin/chromedriver"

# Pages checked on the phone screen: (path, page id).
MAIN_PAGES = [
    ("/", "dashboard"),
    ("/users", "users"),
    ("/bans", "bans"),
    ("/connector", "connector"),
    ("/events", "events"),
    ("/audit", "audit"),
    ("/config", "config"),
    ("/admins", "admins"),
    ("/tokens", "tokens"),
    ("/account", "account"),
]
# Screenshots worth showing in the README.
DOCS_SHOTS = {"dashboard-1280": "console-dashboard.png", "audit-1280": "console-audit.png",
              "users-390": "console-users-phone.png"}


# --------------------------------------------------------------------------
# RFC 6238 TOTP (SHA-1, 6 digits, 30 s): what an authenticator app computes
# --------------------------------------------------------------------------

def totp(secret_base32: str, step: int) -> str:
    key = base64.b32decode(secret_base32.strip().replace(" ", "").upper() + "=" * (-len(secret_base32.strip()) % 8))
    mac = hmac.new(key, struct.pack(">Q", step), hashlib.sha1).digest()
    off = mac[-1] & 0x0F
    value = struct.unpack(">I", mac[off:off + 4])[0] & 0x7FFFFFFF
    return f"{value % 1_000_000:06d}"


class Authenticator:
    """An authenticator app: hands out codes for steps the server has not
    seen yet (a used step is never accepted again), waiting for the next
    30-second step only when it must."""

    def __init__(self, secret: str):
        self.secret = secret
        self.last_step = -1

    def code(self) -> str:
        now_step = int(time.time()) // 30
        step = max(now_step, self.last_step + 1)
        # the server accepts one step either side of its clock
        while step > int(time.time()) // 30 + 1:
            time.sleep(0.5)
        self.last_step = step
        return totp(self.secret, step)


def test_totp_matches_rfc6238_vectors():
    # RFC 6238 appendix B, SHA-1 seed "12345678901234567890", truncated to 6 digits
    secret = base64.b32encode(b"12345678901234567890").decode()
    assert totp(secret, 59 // 30) == "287082"
    assert totp(secret, 1111111109 // 30) == "081804"
    assert totp(secret, 2000000000 // 30) == "279037"


# --------------------------------------------------------------------------
# browser
# --------------------------------------------------------------------------

def artifacts_dir() -> Path:
    d = os.environ.get("POP3CONNEX_ARTIFACTS")
    path = Path(d) if d else Path(tempfile.mkdtemp(prefix="pop3connex-console-"))
    path.mkdir(parents=True, exist_ok=True)
    print(f"console screenshots: {path}")
    syslib.summary(f"console screenshots saved in {path}")
    return path


def trusting_home(ca: Path) -> Path:
    """A HOME whose NSS database trusts `ca` as a root for TLS servers."""
    home = Path(tempfile.mkdtemp(prefix="pop3connex-chrome-"))
    nss = home / ".pki" / "nssdb"
    nss.mkdir(parents=True)
    certutil = require_tool("certutil")
    subprocess.run([certutil, "-d", f"sql:{nss}", "-N", "--empty-password"], check=True, timeout=30,
                   capture_output=True)
    subprocess.run([certutil, "-d", f"sql:{nss}", "-A", "-t", "C,,", "-n", "pop3connex-test-ca", "-i", str(ca)],
                   check=True, timeout=30, capture_output=True)
    return home


def start_chrome(home: Path) -> webdriver.Chrome:
    chromium = require_tool("chromium")
    if not Path(CHROMEDRIVER).is_file():
        pytest.fail(f"{CHROMEDRIVER} missing (Debian package chromium-driver)", pytrace=False)
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,800", "--no-first-run", "--no-default-browser-check",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--password-store=basic", f"--user-data-dir={home / 'profile'}"):
        opts.add_argument(arg)
    env = dict(os.environ, HOME=str(home))
    service = Service(executable_path=CHROMEDRIVER, env=env, log_output=str(home / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=opts)
    driver.set_page_load_timeout(WAIT)
    return driver


class Console:
    """The browser on the admin console of one server."""

    def __init__(self, driver: webdriver.Chrome, base: str, server: syslib.Server, shots: Path):
        self.d = driver
        self.base = base
        self.server = server
        self.shots = shots

    def diagnose(self) -> str:
        try:
            body = self.d.find_element(By.TAG_NAME, "body").text[:1500]
        except Exception:  # noqa: BLE001 - best effort for the failure message
            body = "(no body)"
        return (f"url: {self.d.current_url}\npage text:\n{body}\nserver log tail:\n"
                + self.server.log_text()[-2500:])

    def expect_page(self, name: str):
        try:
            WebDriverWait(self.d, WAIT).until(EC.presence_of_element_located((By.ID, f"page-{name}")))
        except TimeoutException:
            pytest.fail(f"expected the page `{name}`\n{self.diagnose()}", pytrace=False)

    def open(self, path: str, name: str):
        self.d.get(self.base + path)
        self.expect_page(name)

    def fill(self, element_id: str, value: str):
        el = self.d.find_element(By.ID, element_id)
        el.clear()
        el.send_keys(value)

    def click(self, element_id: str):
        self.d.find_element(By.ID, element_id).click()

    def text(self, element_id: str) -> str:
        return self.d.find_element(By.ID, element_id).text

    def notice(self) -> str:
        found = self.d.find_elements(By.ID, "notice")
        return found[0].text if found else ""

    def shot(self, name: str):
        self.d.save_screenshot(str(self.shots / f"{name}.png"))

    def login_password(self, name: str, password: str):
        self.open("/login", "login")
        self.fill("name", name)
        self.fill("password", password)
        self.click("login")

    def logout(self):
        self.click("logout")
        self.expect_page("login")

    def wait_url(self, pred, what: str):
        try:
            WebDriverWait(self.d, WAIT).until(lambda d: pred(d.current_url))
        except TimeoutException:
            pytest.fail(f"waited for {what}\n{self.diagnose()}", pytrace=False)


def wait_admin_listener(port: int, timeout: float = 20):
    def connects():
        with socket.create_connection((LOOPBACK, port), timeout=1):
            return True
    syslib.wait_until(connects, timeout, what=f"the admin listener on port {port}")


@pytest.fixture
def console_server(server_factory, tmp_path):
    port = syslib.free_port()
    alerts = tmp_path / "alerts.jsonl"
    srv = server_factory({
        # the operator's alert hook: one JSON object per alert on stdin
        ("connector", "alert_command"): ["sh", "-c", f"cat >> '{alerts}'"],
        ("admin", "listen"): [f"{LOOPBACK}:{port}"],
        ("admin", "public_origin"): f"https://localhost:{port}",
        # the test logs in several times from 127.0.0.1 on purpose
        ("abuse", "ban_after_auth_failures"): 1000,
    }, start=False)
    srv.start()
    wait_admin_listener(port)
    srv.alerts_file = alerts
    return srv, f"https://localhost:{port}"


# --------------------------------------------------------------------------
# the test
# --------------------------------------------------------------------------

def test_console_in_a_real_browser(console_server):
    srv, base = console_server
    shots = artifacts_dir()
    admin, admin_pw = "root-" + syslib.unique_name("a"), syslib.new_password()
    srv.cli("admin", "add", admin, "--role", "superadmin", "--password-stdin", input=admin_pw.encode() + b"\n")

    home = trusting_home(srv.ca)
    driver = start_chrome(home)
    try:
        c = Console(driver, base, srv, shots)

        # 1. password only: an admin without a second factor can only enrol
        c.login_password(admin, admin_pw)
        c.expect_page("enrol")
        assert "read-only" in c.text("mode-badge")
        c.shot("enrol-1280")
        app = Authenticator(c.text("totp-secret"))
        c.d.get(base + "/users")
        c.expect_page("enrol")  # no way around enrolment
        app = Authenticator(c.text("totp-secret"))  # the page began a new enrolment
        c.fill("totp-code", app.code())
        c.click("totp-enrol")
        c.expect_page("recovery-codes")
        codes = [li.text for li in c.d.find_elements(By.CSS_SELECTOR, "#recovery-codes li")]
        assert len(codes) >= 8 and len(set(codes)) == len(codes), codes
        c.shot("recovery-codes-1280")
        c.click("continue")
        c.expect_page("dashboard")
        c.logout()

        # 2. password + TOTP; a wrong code first
        c.login_password(admin, admin_pw)
        c.expect_page("mfa")
        wrong = f"{(int(totp(app.secret, int(time.time()) // 30)) + 1) % 1_000_000:06d}"
        c.fill("code", wrong)
        c.click("verify")
        c.expect_page("mfa")
        assert c.notice(), "a wrong code is reported"
        c.fill("code", app.code())
        c.click("verify")
        c.expect_page("dashboard")
        c.shot("dashboard-1280")

        # 3. a passkey through Chrome's virtual authenticator
        c.d.add_virtual_authenticator(VirtualAuthenticatorOptions(
            protocol=Protocol.CTAP2, transport=Transport.INTERNAL, has_resident_key=True,
            has_user_verification=True, is_user_consenting=True, is_user_verified=True))
        c.open("/account", "account")
        c.click("add-factor")
        # adding a factor to an account that has one needs a fresh one first
        c.expect_page("step-up")
        c.fill("code", app.code())
        c.click("verify")
        c.expect_page("enrol")
        c.fill("passkey-label", "virtual key")
        c.click("passkey-enrol")
        c.wait_url(lambda u: "/enrol" not in u, "the passkey enrolment to finish")
        assert len(c.d.get_credentials()) == 1, "the virtual authenticator holds the new passkey"
        c.open("/account", "account")
        factors = c.text("factors-table")
        assert "virtual key" in factors, factors
        c.shot("account-1280")
        c.logout()

        # 4. password + passkey
        c.login_password(admin, admin_pw)
        c.expect_page("mfa")
        c.shot("mfa-1280")
        c.click("use-passkey")
        c.expect_page("dashboard")
        assert "read-only" in c.text("mode-badge"), "a new session starts read-only"

        # 5. step-up with the passkey, back to the page asked for
        c.open("/step-up?next=/users", "step-up")
        c.click("use-passkey")
        c.expect_page("users")
        assert c.text("mode-badge").startswith("elevated until"), c.text("mode-badge")

        # 6. add a user
        user, user_pw = syslib.unique_name("web"), syslib.new_password()
        c.fill("new-user-name", user)
        c.fill("new-user-password", user_pw)
        c.click("add-user")
        c.expect_page("users")
        assert user in c.text("users-table"), c.diagnose()
        assert user in srv.cli("user", "list").stdout.decode(), "the CLI sees the console's user"
        c.shot("users-1280")

        # 7. ban an address
        c.open("/bans", "bans")
        c.fill("ban-network", "192.0.2.77")
        c.fill("ban-reason", "console test")
        c.click("add-ban")
        c.expect_page("bans")
        assert "192.0.2.77" in c.text("bans-table"), c.diagnose()
        assert "192.0.2.77" in srv.cli("ban", "list").stdout.decode(), "the CLI sees the console's ban"
        c.shot("bans-1280")

        # 8. the audit log holds those actions, by this admin
        c.open("/audit", "audit")
        rows = [r.text for r in c.d.find_elements(By.CSS_SELECTOR, "#audit-table tbody tr")]
        def logged(action: str, target: str) -> bool:
            return any(action in r and target in r and admin in r for r in rows)
        assert logged("user.add", user), rows[:20]
        assert logged("ban.add", "192.0.2.77"), rows[:20]
        assert any("admin.login" in r for r in rows), rows[:20]
        assert any("admin.mfa.enrol" in r for r in rows), rows[:20]
        c.shot("audit-1280")

        # the other main pages open at 1280x800
        for path, name in MAIN_PAGES:
            c.open(path, name)
            c.shot(f"{name}-1280")

        # 9. a phone screen: every main page fits its width
        c.d.set_window_size(390, 844)
        for path, name in MAIN_PAGES:
            c.open(path, name)
            overflow = c.d.execute_script(
                "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
            assert overflow <= 1, f"{path} scrolls sideways by {overflow}px on a 390-px screen"
            c.shot(f"{name}-390")
    finally:
        driver.quit()
        shutil.rmtree(home, ignore_errors=True)

    # the admin plane's alerts reached the operator's hook (run in the
    # background by serve: give the last ones a moment)
    want = {"admin login", "administrator second factor enrolled"}
    deadline = time.monotonic() + 10
    while True:
        lines = srv.alerts_file.read_text().splitlines() if srv.alerts_file.exists() else []
        alerts = [json.loads(line) for line in lines if line.strip()]
        if want <= {a.get("message") for a in alerts} or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert want <= {a.get("message") for a in alerts}, alerts
    login = next(a for a in alerts if a["message"] == "admin login")
    assert (login["admin"], login["peer"], login["source"]) == (admin, "127.0.0.1", "admin"), login

    if os.environ.get("POP3CONNEX_DOCS_IMG") == "1":
        img = REPO / "docs" / "img"
        img.mkdir(parents=True, exist_ok=True)
        for shot, target in DOCS_SHOTS.items():
            shutil.copyfile(shots / f"{shot}.png", img / target)
