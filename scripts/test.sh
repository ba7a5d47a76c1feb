#!/usr/bin/env bash
# Every herald test, as CI runs it: formatting and lints, unit tests, the integration
# suite once per backend (epoll, then io_uring), then the real-client tests (npm
# eventsource, headless Chromium, Python httpx-sse) against the release binary on both
# backends. Installs what the integration tests (redis-server for tests/cluster.rs) and the
# client tests need by itself (scripts/install-test-deps.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n== %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --locked --release --all-targets -- -D warnings

step "build"
cargo build --locked --release

step "unit tests"
cargo test --locked --release --lib --bins

step "test dependencies (scripts/install-test-deps.sh)"
scripts/install-test-deps.sh

for backend in epoll uring; do
    step "integration tests, backend $backend"
    HERALD_TEST_BACKEND=$backend cargo test --locked --release --test '*' -- --test-threads 2
done

for backend in epoll uring; do
    step "real-client tests, backend $backend"
    scripts/client-tests.sh target/release/herald "$backend"
done

echo
echo "scripts/test.sh: all test stages passed"
