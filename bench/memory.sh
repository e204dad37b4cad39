#!/usr/bin/env bash
# Memory figures of POP3conneX (docs/BENCHMARKS.md, "Memory after load"): peak RSS growth for one
# 25 MB message to 100 LMTP recipients, idle memory per TLS session, and RSS once the load is gone.
# Runs tests/system/test_memory.py (which also asserts the bounds) against a release build and
# prints its measurement lines. About 1-3 minutes, depending on how busy the machine is.
#
#   bench/memory.sh                              # builds the release binary first
#   POP3CONNEX_BIN=path/to/pop3connex bench/memory.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [[ -z ${POP3CONNEX_BIN:-} ]]; then
    cargo build --release -p pop3connex
    POP3CONNEX_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/pop3connex"
fi
export POP3CONNEX_BIN
out=$(mktemp)
trap 'rm -f "$out"' EXIT
status=0
python3 -m pytest -q -s -p no:cacheprovider tests/system/test_memory.py >"$out" 2>&1 || status=$?
grep -E '^(LMTP|burst) ' "$out" || true
tail -n 1 "$out"
if [[ $status -ne 0 ]]; then
    echo "--- test output ---"
    cat "$out"
fi
exit "$status"
