#!/usr/bin/env bash
# What authentication costs herald: stream starts per second and server CPU per start
# without auth, with HS256 tokens (--auth-secret-file) and with ES256 tokens
# (--auth-keys, a PEM public key), and fan-out CPU per delivery with auth off vs on
# (every subscriber holding an ES256 Bearer token). Interleaved rounds, a fresh server
# per run: herald on CPU0 with one worker, the load generator on CPU1.
#
#   scripts/auth-bench.sh [--rounds 3] [--starts 20000] [--concurrency 8]
#                         [--subscribers 10000] [--rate 10] [--duration 60]
#                         [--backend uring] [--workloads starts,fanout] [--out DIR]
#                         [--herald PATH]
#
# Keys are made with the openssl CLI in a temp dir (removed at the end, with the tokens
# and the private copy of the herald binary the runs use), tokens with bench's mint-token (sub "bench", herald.subscribe
# ["bench"], 2 h). Before measuring, each auth server is checked to answer 401 without a
# token and 200 with one. Output: OUT/starts/*.json, OUT/fanout/*.json, OUT/logs/,
# OUT/env.md, OUT/results.md and OUT/summary.json (bench/scripts/auth_results.py).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$ROOT/target/release
ROUNDS=3 STARTS=20000 CONC=8 N=10000 RATE=10 DUR=60 BACKEND=uring WORKLOADS=starts,fanout
HERALD=$BIN/herald OUT= SERVER_PID=
PORT=19080 IPORT=17070
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) ROUNDS=$2; shift ;;
    --starts) STARTS=$2; shift ;;
    --concurrency) CONC=$2; shift ;;
    --subscribers) N=$2; shift ;;
    --rate) RATE=$2; shift ;;
    --duration) DUR=$2; shift ;;
    --backend) BACKEND=$2; shift ;;
    --workloads) WORKLOADS=$2; shift ;;
    --out) OUT=$2; shift ;;
    --herald) HERALD=$2; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
OUT=${OUT:-$ROOT/bench/results/$(date -u +%Y%m%d-%H%M)-auth}
mkdir -p "$OUT/starts" "$OUT/fanout" "$OUT/logs"
TMPD=$(mktemp -d /tmp/herald-auth-bench.XXXXXX)
trap 'stop_herald; rm -rf "$TMPD"' EXIT
for b in herald-bench mint-token; do
  [ -x "$BIN/$b" ] || { echo "$BIN/$b missing: cargo build --release -p herald-bench" >&2; exit 2; }
done
command -v openssl >/dev/null || { echo "needs the openssl CLI" >&2; exit 2; }
# A private copy: a rebuild of target/release/herald during the run changes nothing.
cp "$HERALD" "$TMPD/herald" || exit 2
HERALD=$TMPD/herald

K=$TMPD
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$K/es256.key" 2>/dev/null &&
  openssl pkey -in "$K/es256.key" -pubout -out "$K/es256.pub" &&
  openssl rand -hex 32 > "$K/hs256.secret" || { echo "openssl failed" >&2; exit 1; }
for alg in HS256 ES256; do
  key=$K/es256.key; [ $alg = HS256 ] && key=$K/hs256.secret
  "$BIN/mint-token" --alg $alg --key "$key" --sub bench --ttl 2h --subscribe bench \
    > "$K/${alg,,}.token" || exit 1
done

"$ROOT/scripts/bench-env.sh" > "$OUT/env.md" 2>/dev/null
"$HERALD" --version >> "$OUT/env.md" 2>&1 || true
echo "results → $OUT" >&2

start_herald() { # config tag
  local flags=()
  case $1 in
    noauth) ;;
    hs256) flags=(--auth-secret-file "$K/hs256.secret") ;;
    es256) flags=(--auth-keys "$K/es256.pub") ;;
    *) echo "unknown config $1" >&2; return 1 ;;
  esac
  taskset -c 0 "$HERALD" serve --listen "127.0.0.1:$PORT" --ingest "127.0.0.1:$IPORT" \
    --workers 1 --backend "$BACKEND" --keepalive 15s "${flags[@]}" >"$OUT/logs/$2.log" 2>&1 &
  SERVER_PID=$!
  local end=$((SECONDS + 10))
  while [ $SECONDS -lt $end ]; do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  echo "herald ($1) did not open port $PORT:" >&2; tail -5 "$OUT/logs/$2.log" >&2
  stop_herald; return 1
}
stop_herald() {
  [ -n "$SERVER_PID" ] || return 0
  kill -TERM "$SERVER_PID" 2>/dev/null
  local end=$((SECONDS + 15))
  while kill -0 "$SERVER_PID" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 0.1; done
  kill -KILL "$SERVER_PID" 2>/dev/null
  wait "$SERVER_PID" 2>/dev/null
  SERVER_PID=
  sleep 1
}
token_args() { # config → herald-bench flags
  case $1 in
    hs256) echo "--bearer-file $K/hs256.token" ;;
    es256) echo "--bearer-file $K/es256.token" ;;
  esac
}
# An auth server must refuse a missing token and accept the minted one.
check_auth() { # config tag
  [ "$1" = noauth ] && return 0
  local url="http://127.0.0.1:$PORT/events/bench"
  timeout 30 taskset -c 1 "$BIN/herald-bench" --url "$url" --starts 3 --concurrency 1 \
    --json "$OUT/logs/$2.check-none.json" >"$OUT/logs/$2.check-none.txt" 2>&1
  # shellcheck disable=SC2046
  timeout 30 taskset -c 1 "$BIN/herald-bench" --url "$url" --starts 3 --concurrency 1 \
    $(token_args "$1") --json "$OUT/logs/$2.check-token.json" >"$OUT/logs/$2.check-token.txt" 2>&1
  local none tok
  none=$(grep '^responses' "$OUT/logs/$2.check-none.txt"); tok=$(grep '^responses' "$OUT/logs/$2.check-token.txt")
  echo "   check: no token → $none; token → $tok" >&2
  [[ $none == *'"401": 3'* && $tok == *'"200": 3'* ]] || {
    echo "   $1: unexpected answers (see $OUT/logs/$2.check-*.txt)" >&2; return 1; }
}

for r in $(seq "$ROUNDS"); do
  for wl in ${WORKLOADS//,/ }; do
    cfgs="noauth hs256 es256"; [ "$wl" = fanout ] && cfgs="noauth es256"
    for cfg in $cfgs; do
      tag="${wl}__${cfg}__r$r"
      echo "== $tag" >&2
      start_herald "$cfg" "$tag" || continue
      if ! check_auth "$cfg" "$tag"; then stop_herald; continue; fi
      quiet_wait
      # shellcheck disable=SC2046
      case $wl in
        starts)
          timeout 300 taskset -c 1 "$BIN/herald-bench" --url "http://127.0.0.1:$PORT/events/bench" \
            --starts "$STARTS" --concurrency "$CONC" $(token_args "$cfg") \
            --server-pid "$SERVER_PID" --server-cpus 0 --label "$tag" \
            --json "$OUT/starts/$tag.json" >"$OUT/logs/$tag.txt" 2>&1 \
            || echo "   herald-bench failed (exit $?)" >&2
          grep -E "^(run|warning|stream starts|start failures|server CPU per)" "$OUT/logs/$tag.txt" | sed 's/^/   /' >&2 ;;
        fanout)
          timeout $((DUR + 300)) taskset -c 1 "$BIN/herald-bench" --url "http://127.0.0.1:$PORT/events/bench" \
            --publish ingest --ingest "127.0.0.1:$IPORT" -n "$N" \
            --events "$(python3 -c "print(max(1, round($RATE * $DUR)))")" --rate "$RATE" \
            $(token_args "$cfg") --server-pid "$SERVER_PID" --thread-prefix herald-w \
            --server-cpus 0 --connect-timeout 60 --drain-timeout 30 --label "$tag" \
            --json "$OUT/fanout/$tag.json" >"$OUT/logs/$tag.txt" 2>&1 \
            || echo "   herald-bench failed (exit $?)" >&2
          grep -E "^(run|warning|subscribers connected|connect failures|deliveries|server CPU per|fan-out)" "$OUT/logs/$tag.txt" | sed 's/^/   /' >&2 ;;
      esac
      stop_herald
    done
  done
done
python3 "$ROOT/bench/scripts/auth_results.py" "$OUT" > "$OUT/results.md" && cat "$OUT/results.md"
