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
#                         [--herald PATH] [--round-start K] [--no-netns]
#
# By default everything runs in a private network namespace (unshare -n, lo up, the
# per-netns backlog and port-range knobs raised), so loopback traffic of other programs
# on a shared box neither shares the ports nor moves the TCP retransmit counters the
# load generator checks. Around each measurement the whole machine's busy time
# (/proc/stat) is recorded next to herald's and the load generator's own CPU:
# auth_results.py reports the rest as foreign CPU; a disturbed run (foreign CPU above
# 5 % of a core) is repeated up to RETRIES (3) times, and left out of the medians.
# --round-start K numbers the rounds from K, to add rounds to an existing --out.
#
# Keys are made with the openssl CLI in a temp dir (removed at the end, with the tokens
# and the private copy of the herald binary the runs use), tokens with bench's mint-token (sub "bench", herald.subscribe
# ["bench"], 2 h). Before measuring, each auth server is checked to answer 401 without a
# token and 200 with one. Output: OUT/starts/*.json, OUT/fanout/*.json, OUT/logs/,
# OUT/env.md, OUT/results.md and OUT/summary.json (bench/scripts/auth_results.py).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$ROOT/target/release
ROUNDS=3 ROUND0=1 RETRIES=${RETRIES:-3} NETNS=1 INSIDE=0 STARTS=20000 CONC=8 N=10000 RATE=10 DUR=60 BACKEND=uring WORKLOADS=starts,fanout
HERALD=$BIN/herald OUT= SERVER_PID=
PORT=19080 IPORT=17070
ARGS=("$@")
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
    --round-start) ROUND0=$2; shift ;;
    --no-netns) NETNS=0 ;;
    --inside-netns) INSIDE=1 ;;   # internal
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
OUT=${OUT:-$ROOT/bench/results/$(date -u +%Y%m%d-%H%M)-auth}
if [ "$NETNS" = 1 ] && [ "$INSIDE" = 0 ]; then
  mkdir -p "$OUT"
  exec unshare -n -- "$0" "${ARGS[@]}" --inside-netns --out "$OUT"
fi
if [ "$INSIDE" = 1 ]; then
  ip link set lo up || exit 1
  sysctl -qw net.core.somaxconn=65535 net.ipv4.tcp_max_syn_backlog=65535 \
    net.ipv4.ip_local_port_range="1024 65535" 2>/dev/null || true
  echo "private network namespace: lo up, somaxconn $(cat /proc/sys/net/core/somaxconn)" >&2
fi
mkdir -p "$OUT/starts" "$OUT/fanout" "$OUT/logs"
TMPD=$(mktemp -d /tmp/herald-auth-bench.XXXXXX)
trap 'stop_herald; rm -rf "$TMPD"' EXIT
trap 'exit 143' INT TERM
for b in herald-bench mint-token; do
  [ -x "$BIN/$b" ] || { echo "$BIN/$b missing: cargo build --release -p herald-bench" >&2; exit 2; }
done
command -v openssl >/dev/null || { echo "needs the openssl CLI" >&2; exit 2; }
# A private copy: a rebuild of target/release/herald during the run changes nothing.
HERALD_SRC=$HERALD
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
{
  echo "| herald under test | $HERALD_SRC, $("$HERALD" --version 2>&1), file time $(date -u -r "$HERALD_SRC" +%FT%TZ), sha256 $(sha256sum "$HERALD" | cut -c1-16)… |"
  echo "| network namespace | $([ "$INSIDE" = 1 ] && echo "private (unshare -n)" || echo "the host's") |"
} >> "$OUT/env.md"
echo "results → $OUT" >&2

# The box is shared: before each measurement wait (up to QUIET_MAX s) until neither core
# was more than 15 % busy over 3 seconds, and log how long that took.
QUIET_MAX=${QUIET_MAX:-300}
. "$ROOT/scripts/quiet-wait.sh"

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

# cpu_mark TAG before|after: the machine's /proc/stat CPU lines, herald's schedstat run
# time (ns, all its threads) and this shell's children's CPU (the load generator and its children).
cpu_mark() {
  local f=$OUT/logs/$1.cpu
  [ "$2" = before ] && : > "$f"
  {
    echo "$2 wall_ns $(date +%s%N)"
    grep -E '^cpu[0-9]* ' /proc/stat | sed "s/^/$2 /"
    echo "$2 herald_ns $(cat "/proc/$SERVER_PID"/task/*/schedstat 2>/dev/null | awk '{s += $1} END {printf "%.0f\n", s}')"
    # cutime + cstime (ticks) of this shell: its waited-for children, the load generator.
    echo "$2 children_ticks $(sed 's/.*) //' "/proc/$$/stat" | cut -d' ' -f14,15)"
  } >> "$f"
}

for r in $(seq "$ROUND0" $((ROUND0 + ROUNDS - 1))); do
  for wl in ${WORKLOADS//,/ }; do
    cfgs="noauth hs256 es256"; [ "$wl" = fanout ] && cfgs="noauth es256"
    for cfg in $cfgs; do
      tag="${wl}__${cfg}__r$r"
      echo "== $tag" >&2
      for try in $(seq 0 "$RETRIES"); do
        if [ "$try" -gt 0 ]; then
          echo "   disturbed by other programs: again ($try of $RETRIES); the disturbed run is in logs/" >&2
        fi
        start_herald "$cfg" "$tag" || break
        if ! check_auth "$cfg" "$tag"; then stop_herald; break; fi
        quiet_wait
        cpu_mark "$tag" before
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
        cpu_mark "$tag" after
        stop_herald
        verdict=$(python3 "$ROOT/bench/scripts/auth_results.py" --disturbed "$OUT" "$tag") && d=1 || d=0
        echo "   $verdict" >&2
        [ $d = 1 ] && [ "$try" -lt "$RETRIES" ] || break
        mv "$OUT/$wl/$tag.json" "$OUT/logs/$tag.disturbed$((try + 1)).json" 2>/dev/null
        cp "$OUT/logs/$tag.cpu" "$OUT/logs/$tag.disturbed$((try + 1)).cpu"
        cp "$OUT/logs/$tag.txt" "$OUT/logs/$tag.disturbed$((try + 1)).txt"
      done
    done
  done
done
python3 "$ROOT/bench/scripts/auth_results.py" "$OUT" > "$OUT/results.md" && cat "$OUT/results.md"
