#!/usr/bin/env bash
# Same workloads against herald (uring, epoll), Nginx + Nchan, axum-sse and the io_uring
# floor, interleaved (A B C … for each round), in two set-ups:
#   plain   — server pinned to CPU0 (--workers 1), load generator pinned to CPU1;
#   steered — the same inside a private network namespace whose lo delivers received
#             packets (RPS) on the load generator's CPU, so the server's CPU pays only
#             for sending.
# Workloads: fanout (1 topic × N subscribers, 20 events/s for 60 s, 10 s with --quick),
# burst (200 events back-to-back), idle memory (sampled in every run after connecting),
# hold (idle subscribers for --hold seconds: keep-alives received, streams dropped and the
# server's CPU %, then 5 events), peruser (every subscriber on its own topic, 4 events to
# each topic round-robin, paced at --peruser-rate events/s in total) and peruser-burst
# (the same back to back).
# Output: bench/results/<date>-<host>-compare/{raw/*.json,results.md,summary.json,env.md}
#
# usage: scripts/compare.sh [--quick] [--subscribers N] [--rounds R] [--setups plain,steered]
#                           [--servers herald-uring,herald-epoll,nchan,axum,floor]
#                           [--workloads fanout,burst,hold,peruser,peruser-burst]
#                           [--rate EV_PER_S] [--peruser-rate EV_PER_S] [--hold SECS]
#                           [--out DIR]
# --rate (default 20) sets the fan-out publish rate; at 10k subscribers 20/s saturates one
# core for every server here, and in the steered set-up also the load generator's core
# (softnet drops → INVALID): use --rate 5 there, and for floor comparisons.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/scripts/bench-lib.sh"

QUICK=0 N=10000 ROUNDS=3 RATE=20 PU_RATE=3000 HOLD=60 SETUPS=plain,steered WORKLOADS=fanout,burst
SERVERS=herald-uring,herald-epoll,nchan,axum,floor OUT="" INSIDE=""
while [ $# -gt 0 ]; do
  case $1 in
    --quick) QUICK=1 ;;
    --subscribers) N=$2; shift ;;
    --rounds) ROUNDS=$2; shift ;;
    --setups) SETUPS=$2; shift ;;
    --servers) SERVERS=$2; shift ;;
    --workloads) WORKLOADS=$2; shift ;;
    --rate) RATE=$2; shift ;;
    --peruser-rate) PU_RATE=$2; shift ;;
    --hold) HOLD=$2; shift ;;
    --out) OUT=$2; shift ;;
    --inside-netns) INSIDE=$2; shift ;;   # internal: run one set-up in this (new) netns
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
DUR=$([ $QUICK = 1 ] && echo 10 || echo 60)
[ -n "$OUT" ] || OUT=$ROOT/bench/results/$(date +%Y%m%d-%H%M)-$(hostname)-compare$([ $QUICK = 1 ] && echo -quick)
mkdir -p "$OUT/raw" "$OUT/logs"

run_setup() { # setup
  local setup=$1 r wl srv port=18480 iport=17480
  for r in $(seq "$ROUNDS"); do
    for wl in ${WORKLOADS//,/ }; do
      for srv in ${SERVERS//,/ }; do
        port=$((port + 1)); iport=$((iport + 1))
        local tag="${setup}__${wl}__${srv}__r$r"
        echo "== $tag" >&2
        if ! start_server "$srv" "$port" "$iport" 1 0 "$OUT/logs"; then
          echo "   $srv failed to start, skipped" >&2; continue
        fi
        local load=()
        case $wl in
          fanout) load=(--events "$(python3 -c "print(max(1, round($RATE * $DUR)))")" --rate "$RATE") ;;
          burst) load=(--events 200 --burst) ;;
          hold) load=(--events 5 --rate 5 --hold "$HOLD") ;;
          peruser) load=(--topics "$N" --events 4 --total-rate "$PU_RATE") ;;
          peruser-burst) load=(--topics "$N" --events 4 --burst) ;;
        esac
        timeout $((DUR + HOLD + 180)) taskset -c 1 "$BIN/herald-bench" --url "$SUB_URL" "${PUB_ARGS[@]}" \
          -n "$N" "${load[@]}" --server-pid "$SERVER_PID" --thread-prefix "$SERVER_THREADS" \
          --server-cpus 0 --connect-timeout 60 --drain-timeout 30 --label "$tag" \
          --json "$OUT/raw/$tag.json" >"$OUT/logs/$tag.txt" 2>&1 \
          || echo "   herald-bench failed (exit $?), see $OUT/logs/$tag.txt" >&2
        grep -E "^(run|deliveries|server CPU per|fan-out)" "$OUT/logs/$tag.txt" | sed 's/^/   /' >&2 || true
        stop_server
      done
    done
  done
}

prepare_netns_inside() {
  mount -t sysfs sysfs /sys
  ip link set lo up
  # Per-netns knobs (the defaults of a new netns are small).
  sysctl -qw net.core.somaxconn=65535 net.ipv4.tcp_max_syn_backlog=65535 \
    net.ipv4.ip_local_port_range="1024 65535" 2>/dev/null || true
  echo 2 > /sys/class/net/lo/queues/rx-0/rps_cpus     # CPU1 = load generator
}

if [ -n "$INSIDE" ]; then
  prepare_netns_inside
  echo "netns: lo rps_cpus=$(cat /sys/class/net/lo/queues/rx-0/rps_cpus)" >&2
  run_setup "$INSIDE"
  exit 0
fi

ensure_built
[[ ,$SERVERS, == *,nchan,* ]] && { ensure_nchan || { echo "Nchan unavailable; dropping it" >&2; SERVERS=$(echo ",$SERVERS," | sed 's/,nchan,/,/; s/^,//; s/,$//'); }; }
"$ROOT/scripts/bench-env.sh" > "$OUT/env.md"
echo "results → $OUT" >&2
for setup in ${SETUPS//,/ }; do
  case $setup in
    plain)
      sysctl -qw net.core.netdev_max_backlog=65536 2>/dev/null || true
      run_setup plain ;;
    steered)
      # Global knob, set first or RPS-steered loopback packets drop.
      sysctl -qw net.core.netdev_max_backlog=65536 || echo "cannot raise netdev_max_backlog" >&2
      unshare -n -m -- "$0" --inside-netns steered --rounds "$ROUNDS" --subscribers "$N" \
        --servers "$SERVERS" --workloads "$WORKLOADS" --rate "$RATE" --peruser-rate "$PU_RATE" \
        --hold "$HOLD" --out "$OUT" $([ $QUICK = 1 ] && echo --quick) ;;
    *) echo "unknown set-up $setup" >&2 ;;
  esac
done
python3 "$ROOT/bench/scripts/results.py" compare "$OUT"
