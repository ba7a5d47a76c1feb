#!/usr/bin/env bash
# Install everything herald's real-client tests need (tests/clients/):
#   - Debian's chromium (/usr/bin/chromium), plus curl and socat if missing
#   - for the HTTP/2 client tests: nghttp2-client (`nghttp`, `h2load`)
#   - for the TLS client tests: openssl (test CA, `openssl s_client`) and libnss3-tools
#     (`certutil`, to trust the test CA in a temporary NSS database for Chromium)
#   - npm packages of tests/clients (playwright-core, eventsource) via `npm ci`
#   - a Python venv at tests/clients/.venv with httpx[http2] (h2), httpx-sse, pytest
#   - for the cluster tests (tests/cluster.rs): Debian's redis-server (`redis-server`,
#     `redis-cli`); the tests start their own servers on free ports, so the system
#     service it comes with is stopped and disabled, never left on port 6379
#
# Idempotent, quiet on success, fast when everything is already present.
# Works from any cwd. Never downloads a browser of its own (no `playwright install`).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLIENTS="$ROOT/tests/clients"
cd "$ROOT"

LOG="$(mktemp -t herald-install-test-deps.XXXXXX)"
trap 'rm -f "$LOG"' EXIT

# Run a command quietly; on failure print its output and stop.
run() {
    if ! "$@" >>"$LOG" 2>&1; then
        echo "install-test-deps: FAILED: $*" >&2
        tail -n 60 "$LOG" >&2
        exit 1
    fi
}

# Serialize concurrent runs (e.g. two client-test runs started at once).
if command -v flock >/dev/null 2>&1; then
    exec 9>"/tmp/herald-install-test-deps.lock"
    flock -w 900 9 || { echo "install-test-deps: could not take lock" >&2; exit 1; }
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

# ---------------------------------------------------------------- Debian packages
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v socat >/dev/null 2>&1 || missing+=(socat)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v certutil >/dev/null 2>&1 || missing+=(libnss3-tools)
{ command -v nghttp >/dev/null 2>&1 && command -v h2load >/dev/null 2>&1; } || missing+=(nghttp2-client)
{ [ -x /usr/bin/redis-server ] && command -v redis-cli >/dev/null 2>&1; } || missing+=(redis-server)
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    missing+=(python3-venv)
fi

if [ "${#missing[@]}" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt_install() {
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$LOG" 2>&1
    }
    # `apt-get update` only when the package lists don't know every package yet.
    need_update=0
    for p in "${missing[@]}"; do
        cand="$(apt-cache policy "$p" 2>/dev/null | awk '/Candidate:/ {print $2}')"
        if [ -z "$cand" ] || [ "$cand" = "(none)" ]; then
            need_update=1
        fi
    done
    if [ "$need_update" -eq 1 ]; then
        run $SUDO apt-get update -qq
    fi
    if ! apt_install; then
        # Stale lists (404 on a superseded .deb): refresh once and retry.
        run $SUDO apt-get update -qq
        run apt_install
    fi
    [ -x /usr/bin/chromium ] || { echo "install-test-deps: /usr/bin/chromium still missing" >&2; exit 1; }
    for c in curl openssl certutil nghttp h2load redis-server redis-cli; do
        command -v "$c" >/dev/null 2>&1 || { echo "install-test-deps: $c still missing" >&2; exit 1; }
    done
fi

# ---------------------------------------------------------------- redis-server service
# Debian's package starts a system redis on 127.0.0.1:6379 where services may start (no
# policy-rc.d forbidding it). The cluster tests run their own redis-server processes; a
# system one would only hold a port and memory, so stop it and keep it from booting.
# Checked on every run (cheap), not only right after the install.
if [ -x /usr/bin/redis-server ]; then
    if command -v systemctl >/dev/null 2>&1 && systemctl is-enabled redis-server >/dev/null 2>&1; then
        $SUDO systemctl disable --now redis-server >>"$LOG" 2>&1 || true
    fi
    if [ -x /etc/init.d/redis-server ] && command -v update-rc.d >/dev/null 2>&1 \
        && ls /etc/rc[2-5].d/S*redis-server >/dev/null 2>&1; then
        $SUDO update-rc.d redis-server disable >>"$LOG" 2>&1 || true
    fi
    if [ -f /run/redis/redis-server.pid ] && kill -0 "$(cat /run/redis/redis-server.pid)" 2>/dev/null; then
        if command -v service >/dev/null 2>&1; then
            $SUDO service redis-server stop >>"$LOG" 2>&1 || true
        fi
        if [ -f /run/redis/redis-server.pid ] && kill -0 "$(cat /run/redis/redis-server.pid)" 2>/dev/null; then
            $SUDO kill "$(cat /run/redis/redis-server.pid)" >>"$LOG" 2>&1 || true
        fi
    fi
fi

# ---------------------------------------------------------------- npm packages
command -v node >/dev/null 2>&1 || { echo "install-test-deps: node is not installed" >&2; exit 1; }
command -v npm >/dev/null 2>&1 || { echo "install-test-deps: npm is not installed" >&2; exit 1; }

lock_sum="$(sha256sum "$CLIENTS/package-lock.json" | cut -d' ' -f1)"
stamp="$CLIENTS/node_modules/.herald-lock.sha256"
if [ ! -d "$CLIENTS/node_modules" ] || [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$lock_sum" ]; then
    # PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD: belt and braces, playwright-core never downloads anyway.
    (cd "$CLIENTS" && run env PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)
    echo "$lock_sum" >"$stamp"
fi

# ---------------------------------------------------------------- Python venv
VENV="$CLIENTS/.venv"
req_sum="$( (cat "$CLIENTS/requirements.txt"; python3 --version) | sha256sum | cut -d' ' -f1)"
req_stamp="$VENV/.herald-requirements.sha256"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    rm -rf "$VENV"
    run python3 -m venv "$VENV"
fi
if [ ! -f "$req_stamp" ] || [ "$(cat "$req_stamp")" != "$req_sum" ]; then
    run "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-input -r "$CLIENTS/requirements.txt"
    echo "$req_sum" >"$req_stamp"
fi
