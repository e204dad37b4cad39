#!/usr/bin/env bash
# The whole POP3conneX test suite, on a fresh Debian machine with Rust.
# Installs what the tests need (Debian packages, pytest), builds, runs:
#   1. format and lint checks,
#   2. unit, in-process session and store conformance tests (cargo test),
#   3. system tests against the real binary with real clients and peers
#      (curl, mpop, fetchmail, Python poplib, swaks, testssl.sh, Postfix,
#      Dovecot for migration and as connector upstream/downstream, NSD with
#      DNSSEC-signed zones), abuse and kill -9 crash tests (pytest,
#      tests/system).
# Everything listens on 127.0.0.1 only and stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(curl mpop fetchmail swaks testssl.sh openssl ca-certificates python3 postfix dovecot-core dovecot-lmtpd
                 dovecot-pop3d nmap fail2ban nsd ldnsutils libssl-dev pkg-config chromium chromium-driver libnss3-tools
                 rsyslog rsyslog-gnutls prometheus)
missing=()
for p in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "==> installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -q
    # The tests run their own private Postfix; keep the package from
    # configuring (and on a normal init system starting) a system-wide one.
    echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
    # Daemons (NSD, Dovecot, Postfix) are started privately by the tests on
    # loopback ports; keep the packages from starting system-wide instances
    # (NSD would try to take port 53) while they are installed.
    policy_added=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
        $SUDO chmod 755 /usr/sbin/policy-rc.d
        policy_added=1
    fi
    rc=0
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" || rc=$?
    [ -z "$policy_added" ] || $SUDO rm -f /usr/sbin/policy-rc.d
    [ "$rc" -eq 0 ] || exit "$rc"
fi
python3 -c 'import pytest, scramp, jwt, cryptography, selenium' 2>/dev/null \
    || python3 -m pip install --quiet 'pytest>=7,<9' 'scramp>=1.4,<2' 'pyjwt[crypto]>=2.8,<3' 'selenium>=4.11,<5'

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> module cycle check"
python3 scripts/check-module-cycles.py
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --release -- -D warnings
echo "==> cargo test"
cargo test --workspace --release
echo "==> system tests (real binary, real clients)"
cargo build --release -p pop3connex
POP3CONNEX_BIN="$PWD/target/release/pop3connex" python3 -m pytest -q -p no:cacheprovider tests/system "$@"
