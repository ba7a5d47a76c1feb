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
# (the same back to back), handshake (--handshakes TLS connections, each a full handshake,
# GET /healthz and the server's close: handshakes/s and server CPU per handshake; herald
# and nchan servers only, plaintext ones give the no-TLS baseline of the same exchange).
# TLS servers: herald-uring-tls, herald-epoll-tls, nchan-tls serve subscribers on https://
# with a throwaway CA + leaf certificate (LOGDIR/tls, ECDSA P-256, --tls-key rsa for
# RSA-2048); publishing stays plaintext. Mix them freely with the plaintext ones.
# Output: bench/results/<date>-<host>-compare/{raw/*.json,handshake/*.json,results.md,
#         summary.json,env.md}
#
# usage: scripts/compare.sh [--quick] [--subscribers N] [--rounds R] [--setups plain,steered]
#                           [--servers herald-uring,herald-epoll,nchan,axum,floor,blocking-floor,
#                                      herald-uring-tls,herald-epoll-tls,nchan-tls]
#                           [--workloads fanout,burst,hold,peruser,peruser-burst,handshake]
#                           [--rate EV_PER_S] [--peruser-rate EV_PER_S] [--hold SECS]
#                           [--handshakes N] [--tls-key ec|rsa] [--out DIR]
# --rate (default 20) sets the fan-out publish rate; at 10k subscribers 20/s saturates one
# core for every server here, and in the steered set-up also the load generator's core
# (softnet drops → INVALID): use --rate 5 there, and for floor comparisons.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/scripts/bench-lib.sh"

QUICK=0 N=10000 ROUNDS=3 RATE=20 PU_RATE=3000 HOLD=60 SETUPS=plain,steered WORKLOADS=fanout,burst HS_N=5000
export TLS_KEY_TYPE=${TLS_KEY_TYPE:-ec}
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
    --handshakes) HS_N=$2; shift ;;
    --tls-key) TLS_KEY_TYPE=$2; shift ;;
    --out) OUT=$2; shift ;;
    --inside-netns) INSIDE=$2; shift ;;   # internal: run one set-up in this (new) netns
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
DUR=$([ $QUICK = 1 ] && echo 10 || echo 60)
[ -n "$OUT" ] || OUT=$ROOT/bench/results/$(date +%Y%m%d-%H%M)-$(hostname)-compare$([ $QUICK = 1 ] && echo -quick)
mkdir -p "$OUT/raw" "$OUT/handshake" "$OUT/logs"

run_setup() { # setup
  local setup=$1 r wl srv port=18480 iport=17480
  for r in $(seq "$ROUNDS"); do
    for wl in ${WORKLOADS//,/ }; do
      for srv in ${SERVERS//,/ }; do
        port=$((port + 1)); iport=$((iport + 1))
        local tag="${setup}__${wl}__${srv}__r$r"
        if [ "$wl" = handshake ] && [[ $srv != herald* && $srv != nchan* ]]; then
          continue   # floor never answers /healthz; axum's 404 path is not what is compared
        fi
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
          handshake) load=(--handshakes "$HS_N" --handshake-concurrency 8) ;;
        esac
        # TLS handshakes cost server CPU (a few thousand per second per core): give the
        # connect phase 1 s per 1,000 subscribers on top.
        # handshake reports go to handshake/: results.py's tables (raw/) are subscriber runs.
        local json=$OUT/raw/$tag.json
        [ "$wl" = handshake ] && json=$OUT/handshake/$tag.json
        local ctimeout=60
        [[ $srv == *-tls ]] && ctimeout=$((60 + N / 1000))
        timeout $((DUR + HOLD + ctimeout + 180)) taskset -c 1 "$BIN/herald-bench" --url "$SUB_URL" \
          "${SUB_ARGS[@]}" "${PUB_ARGS[@]}" \
          -n "$N" "${load[@]}" --server-pid "$SERVER_PID" --thread-prefix "$SERVER_THREADS" \
          --server-cpus 0 --connect-timeout "$ctimeout" --drain-timeout 30 --label "$tag" \
          --json "$json" >"$OUT/logs/$tag.txt" 2>&1 \
          || echo "   herald-bench failed (exit $?), see $OUT/logs/$tag.txt" >&2
        grep -E "^(run|deliveries|server CPU per|fan-out|handshakes )" "$OUT/logs/$tag.txt" | sed 's/^/   /' >&2 || true
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
[[ ,$SERVERS, == *,nchan,* || ,$SERVERS, == *,nchan-tls,* ]] && { ensure_nchan || { echo "Nchan unavailable; dropping it" >&2; SERVERS=$(echo ",$SERVERS," | sed 's/,nchan,/,/; s/,nchan-tls,/,/; s/^,//; s/,$//'); }; }
[[ ,$SERVERS, == *-tls,* ]] && { command -v openssl >/dev/null || { echo "TLS servers need the openssl CLI" >&2; exit 2; }; }
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
        --hold "$HOLD" --handshakes "$HS_N" --tls-key "$TLS_KEY_TYPE" --out "$OUT" \
        $([ $QUICK = 1 ] && echo --quick) ;;
    *) echo "unknown set-up $setup" >&2 ;;
  esac
done
python3 "$ROOT/bench/scripts/results.py" compare "$OUT"
# The handshake workload's figures are not in results.py's tables: summarise them here.
if ls "$OUT"/handshake/*.json >/dev/null 2>&1; then
  python3 - "$OUT" <<'PY' | tee -a "$OUT/results.md"
import glob, json, os, statistics, sys
out = sys.argv[1]
rows = {}
for f in sorted(glob.glob(os.path.join(out, "handshake", "*.json"))):
    setup, _, server = os.path.basename(f)[:-5].split("__")[:3]
    h = (json.load(open(f)).get("handshakes") or {})
    rows.setdefault((setup, server), []).append(h)
def med(hs, key, sub=None):
    v = [(h.get(key) or {}).get(sub) if sub else h.get(key) for h in hs]
    v = [x for x in v if isinstance(x, (int, float))]
    return statistics.median(v) if v else float("nan")
print("\n### workload: handshake (connect, TLS handshake, GET /healthz, server's close)\n")
print("| set-up | server | runs | ok | handshakes/s | server CPU µs/handshake | handshakes per server CPU-s | handshake p50 µs | p99 µs | loadgen CPU µs/handshake | session | failures | closed without close_notify |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for (setup, server), hs in rows.items():
    sess = ", ".join(sorted({k for h in hs for k in (h.get("tls_sessions") or {})})) or "plain"
    fails = {}
    for h in hs:
        for k, v in (h.get("failed") or {}).items():
            fails[k] = fails.get(k, 0) + v
    print(f"| {setup} | {server} | {len(hs)} | {sum(h.get('ok', 0) for h in hs)}/{sum(h.get('requested', 0) for h in hs)} "
          f"| {med(hs, 'per_second'):,.0f} | {med(hs, 'server_cpu_us_per_handshake'):.1f} "
          f"| {med(hs, 'server_handshakes_per_cpu_second'):,.0f} "
          f"| {med(hs, 'handshake_us', 'p50'):,.0f} | {med(hs, 'handshake_us', 'p99'):,.0f} "
          f"| {med(hs, 'loadgen_cpu_us_per_handshake'):.1f} | {sess} | {fails or ''} "
          f"| {sum(h.get('server_close_unclean', 0) for h in hs)} |")
print("\nServer CPU per handshake covers the whole exchange (accept, handshake, one request, close);"
      " the plaintext servers' row is the same exchange without TLS. handshakes/s is bounded by whichever"
      " core is full first: when the load generator's CPU per handshake is the larger, it is the load"
      " generator's; handshakes per server CPU-second (1 s / server CPU per handshake) is the server's.")
PY
fi
