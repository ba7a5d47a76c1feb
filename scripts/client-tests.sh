#!/usr/bin/env bash
# Run herald's real-client tests against one binary and one backend: npm eventsource,
# headless Chromium and Python httpx-sse, over plain HTTP and over TLS; for TLS also
# Python's ssl module, curl and openssl s_client (tests/clients/test_tls.py); for HTTP/2
# (ALPN h2 and cleartext h2c) curl, nghttp, h2load, httpx[http2] and raw h2 frames
# (tests/clients/test_h2.py) and Chromium with 20 EventSources on one connection
# (tests/clients/browser-h2.test.mjs). Every TLS client trusts a test CA made fresh per
# run (tests/clients/tls-fixture.sh), never with verification turned off (h2load, which
# cannot verify, is the one exception).
#
#   scripts/client-tests.sh [BIN] [BACKEND]
#     BIN      herald binary (default: target/release/herald, else target/debug/herald)
#     BACKEND  auto|uring|epoll (default: auto)
#
# Exits non-zero if any test failed. Installs what the tests need first
# (scripts/install-test-deps.sh: Debian chromium, curl, openssl, certutil, nghttp2-client,
# npm packages, a Python venv).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

BIN="${1:-}"
BACKEND="${2:-auto}"
if [ -z "$BIN" ]; then
    for b in "$ROOT/target/release/herald" "$ROOT/target/debug/herald"; do
        if [ -x "$b" ]; then BIN="$b"; break; fi
    done
fi
if [ -z "$BIN" ] || [ ! -x "$BIN" ]; then
    echo "client-tests: herald binary not found or not executable: '${BIN}'" >&2
    echo "usage: $0 BIN [auto|uring|epoll]" >&2
    exit 2
fi
BIN="$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")"
case "$BACKEND" in auto|uring|epoll) ;; *) echo "client-tests: bad backend '$BACKEND'" >&2; exit 2 ;; esac

"$ROOT/scripts/install-test-deps.sh"

export HERALD_BIN="$BIN" HERALD_BACKEND="$BACKEND"
cd "$ROOT"

OUT="$(mktemp -d -t herald-client-tests.XXXXXX)"
trap 'rm -rf "$OUT"' EXIT

echo "== client tests: $BIN (backend $BACKEND)"

# ---- node: npm eventsource + headless Chromium (HTTP/1.1, TLS, h2)
echo "== node --test tests/clients/*.test.mjs"
node_rc=0
timeout -k 10 600 node --test --test-concurrency=1 --test-reporter=spec \
    tests/clients/*.test.mjs 2>&1 | tee "$OUT/node.log" || node_rc=$?
# (pipefail: node_rc is node's status, or 124 on timeout)

# ---- python: httpx-sse; TLS: ssl module, httpx-sse, curl, openssl s_client; h2: curl, nghttp, h2load, httpx, h2
echo "== pytest tests/clients"
py_rc=0
timeout -k 10 300 "$ROOT/tests/clients/.venv/bin/python" -m pytest -q -rsx --tb=short -p no:cacheprovider \
    tests/clients 2>&1 | tee "$OUT/pytest.log" || py_rc=$?

# ---- summary
strip() { sed -e 's/\x1b\[[0-9;]*m//g' "$1"; }
node_pass="$(strip "$OUT/node.log" | awk '/^(ℹ|#) pass [0-9]+/ {n=$3} END {print n+0}')"
node_fail="$(strip "$OUT/node.log" | awk '/^(ℹ|#) fail [0-9]+/ {n=$3} END {print n+0}')"
py_pass="$(strip "$OUT/pytest.log" | grep -Eo '[0-9]+ passed' | tail -1 | cut -d' ' -f1 || true)"
py_fail="$(strip "$OUT/pytest.log" | grep -Eo '[0-9]+ (failed|error|errors)' | awk '{s+=$1} END {print s+0}' || true)"
py_skip="$(strip "$OUT/pytest.log" | grep -Eo '[0-9]+ (skipped|xfailed)' | awk '{s+=$1} END {print s+0}' || true)"
node_skip="$(strip "$OUT/node.log" | awk '/^(ℹ|#) (skipped|todo) [0-9]+/ {s+=$3} END {print s+0}')"
py_pass="${py_pass:-0}"
py_fail="${py_fail:-0}"
py_skip="${py_skip:-0}"
# A runner that crashed or timed out without reporting counts as one failure.
if [ "$node_rc" -ne 0 ] && [ "$node_fail" -eq 0 ]; then node_fail=1; fi
if [ "$py_rc" -ne 0 ] && [ "$py_fail" -eq 0 ]; then py_fail=1; fi

status() { if [ "$1" -eq 0 ]; then echo PASS; else echo "FAIL (exit $1)"; fi; }
echo
echo "== client test summary: $BIN (backend $BACKEND)"
echo "   node (eventsource, chromium; http, https, h2):     $(status "$node_rc")  passed $node_pass, failed $node_fail, skipped $node_skip"
echo "   pytest (httpx-sse; TLS: ssl, curl, openssl;"
echo "           h2: curl, nghttp, h2load, httpx, h2):      $(status "$py_rc")  passed $py_pass, failed $py_fail, skipped/xfailed $py_skip"
if [ "$py_skip" -gt 0 ]; then
    strip "$OUT/pytest.log" | grep -E '^(SKIPPED|XFAIL)' | sed 's/^/     /' || true
fi
echo "client-tests: $((node_pass + py_pass)) passed, $((node_fail + py_fail)) failed"

if [ "$node_rc" -ne 0 ] || [ "$py_rc" -ne 0 ]; then
    exit 1
fi
