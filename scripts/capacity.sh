#!/usr/bin/env bash
# Capacity sweep: for each server, step through subscriber counts (1k, 10k, 50k, 100k, …
# up to --max), each step on a fresh server: connect, sample idle RSS / kernel memory per
# connection, hold idle briefly (keep-alives, drops, CPU %), publish a few events and
# record fan-out completion p99. A step that cannot connect everyone ends that server's
# sweep, and the reason (connect failures by cause, 503s, server log) is recorded.
# Every step is bounded by herald-bench's own timeouts and by `timeout`.
# TLS servers (herald-uring-tls, herald-epoll-tls, nchan-tls; see bench-lib.sh) work too:
# their connect timeout allows for the handshakes (30 s + N/500 s).
# Output: bench/results/<date>-<host>/{raw/*.json,results.md,*.svg,stops.json,env.md}
#
# usage: scripts/capacity.sh [--max N] [--steps "1000 10000 50000 100000 200000"]
#                            [--servers herald-uring,herald-epoll] [--workers 2]
#                            [--hold 5] [--events 5] [--out DIR]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/scripts/bench-lib.sh"

MAX=100000 STEPS="1000 10000 50000 100000 200000 400000 1000000" SERVERS=herald-uring,herald-epoll
WORKERS=2 HOLD=5 EVENTS=5 OUT=""
while [ $# -gt 0 ]; do
  case $1 in
    --max) MAX=$2; shift ;;
    --steps) STEPS=$2; shift ;;
    --servers) SERVERS=$2; shift ;;
    --workers) WORKERS=$2; shift ;;
    --hold) HOLD=$2; shift ;;
    --events) EVENTS=$2; shift ;;
    --out) OUT=$2; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$OUT" ] || OUT=$ROOT/bench/results/$(date +%Y%m%d-%H%M)-$(hostname)
mkdir -p "$OUT/raw" "$OUT/logs"
ensure_built
[[ ,$SERVERS, == *,nchan,* || ,$SERVERS, == *,nchan-tls,* ]] && ensure_nchan
sysctl -qw net.core.netdev_max_backlog=65536 2>/dev/null || true
{ "$ROOT/scripts/bench-env.sh"; echo "| servers | $SERVERS |"; echo "| workers | $WORKERS (CPUs 0-$((WORKERS - 1))) |"; } > "$OUT/env.md"
echo "results → $OUT" >&2

CPUS=0-$((WORKERS - 1))
STOPS="{}"
add_stop() { STOPS=$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d[sys.argv[2]]=sys.argv[3]; print(json.dumps(d))' "$STOPS" "$1" "$2"); }
port=18680 iport=17680
for srv in ${SERVERS//,/ }; do
  reached=0 why=""
  for n in $STEPS; do
    [ "$n" -le "$MAX" ] || { why="stopped at --max $MAX"; break; }
    port=$((port + 1)); iport=$((iport + 1))
    tag="${srv}__$n"
    echo "== $tag" >&2
    start_server "$srv" "$port" "$iport" "$WORKERS" "$CPUS" "$OUT/logs" || { why="server failed to start at $n"; break; }
    ctimeout=$((30 + n / 2000))
    [[ $srv == *-tls ]] && ctimeout=$((30 + n / 500))
    timeout $((ctimeout + HOLD + 120)) "$BIN/herald-bench" --url "$SUB_URL" "${SUB_ARGS[@]}" "${PUB_ARGS[@]}" -n "$n" \
      --events "$EVENTS" --rate 5 --hold "$HOLD" --server-pid "$SERVER_PID" --thread-prefix "$SERVER_THREADS" \
      --connect-timeout "$ctimeout" --drain-timeout 20 --label "$tag" --json "$OUT/raw/$tag.json" \
      >"$OUT/logs/$tag.txt" 2>&1 || echo "   herald-bench exit $?" >&2
    grep -E "^(run|subscribers connected|connect failures|server RSS|kernel per|fan-out)" "$OUT/logs/$tag.txt" | sed 's/^/   /' >&2 || true
    srvlog=$(grep -iE "limit|503|error|warn" "$OUT/logs/$srv.log" 2>/dev/null | tail -2 | sed 's/\x1b\[[0-9;]*m//g' | tr '\n' ' ' || true)
    stop_server
    if [ ! -s "$OUT/raw/$tag.json" ]; then why="no report at $n (herald-bench timed out or failed; see logs/$tag.txt)"; break; fi
    read -r connected failures < <(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); c=r["connect"]; print(c["connected"], json.dumps(c["failed"]).replace(" ",""))' "$OUT/raw/$tag.json")
    if [ "$connected" -lt "$n" ]; then
      why="reached $reached; at $n only $connected connected; failures $failures${srvlog:+; server log: $srvlog}"
      break
    fi
    reached=$n
  done
  [ -n "$why" ] || why="all steps up to $reached connected"
  echo "   $srv: $why" >&2
  add_stop "$srv" "$why"
done
echo "$STOPS" > "$OUT/stops.json"
python3 "$ROOT/bench/scripts/results.py" capacity "$OUT"
