#!/usr/bin/env bash
# The cluster (--cluster, Redis Streams) against one single-node herald, on this box,
# loopback only, in one session:
#
#   single   one herald (--workers 1), subscribers and publisher on it
#   cluster  one redis-server + 3 herald nodes (--workers 1 each, --cluster): the
#            subscribers on node 2, the publisher on node 1's ingest, so every delivery
#            went node 1 → Redis → node 2; node 3 only reads the stream (the cost of a
#            node that has no subscriber for what it reads)
#
# Workloads, each run against both set-ups, rounds interleaved (single cluster single …):
#   fanout   N subscribers (default 1000) on one topic, --rate events/s (default 20) for
#            --duration s (default 20): publish-to-delivery latency p50/p99, server CPU per
#            delivery
#   burst    10 subscribers, --burst-events (default 50000) events back to back: events/s
#            through the path (first publish → last delivery)
#
# --rate 20 keeps the delivering node well below one core (about 10 µs per delivery in
# this set-up, where loopback receive work is charged to the sender's core): at 100/s to
# 1,000 subscribers the single node alone fills CPU0 and latency measures the queue.
# Every server process (redis-server and the herald nodes) is pinned to CPU0, the load
# generator (herald-bench) to CPU1. herald-bench measures the delivering herald's CPU
# (node 2, or the single node) over its publish window (schedstat ÷ deliveries). This
# script also reads /proc/PID/stat (utime+stime) and /proc/PID/task/*/schedstat of every
# server process before and after each run: node 1 (ingest + XADD + its own read), node 3
# (read only) and redis-server per event published, and the whole cluster per delivery.
# Those whole-run samples include the connect phase, when only the delivering node works
# (the others block in XREAD): each process's idle rate, measured over 3 s before the run,
# is taken out of them ("net of idle"), and reported as idle CPU %. redis-server runs with
# no persistence (--save "", --appendonly no) unless --redis-aof (appendfsync everysec).
#
# Every delivery is checked by herald-bench (loss, duplicates, order).
#
#   scripts/cluster-bench.sh [--subscribers 1000] [--rate 20] [--duration 20]
#                            [--burst-events 50000] [--rounds 3] [--backend epoll|uring]
#                            [--workloads fanout,burst] [--redis-aof] [--out DIR]
#                            [--no-netns] [--quick] [--report-only]
#
# By default the runs are in a private network namespace (unshare -n, lo up), so other
# loopback traffic on a shared box moves neither ports nor the retransmit counters. Before
# each run the script waits (up to QUIET_MAX, 120 s) until no core was more than 15 % busy
# over 3 s. Every run is under `timeout`; the script stops by itself. --quick: 200
# subscribers, 5 s, 10000 burst events, 1 round.
# Output (default bench/results/<date>-cluster/): raw/<setup>__<workload>__r<k>.json
# (herald-bench), raw/<...>.procs.json (per-process CPU), raw/<...>.redis-commandstats.txt
# (INFO commandstats after a cluster run), logs/, env.md, results.md,
# summary.json. --report-only --out DIR rewrites results.md and summary.json from DIR/raw.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/scripts/bench-lib.sh"
N=1000 RATE=20 DUR=20 BURST_EVENTS=50000 ROUNDS=3 BACKEND=epoll NETNS=1 INSIDE=0 QUICK=0
REPORT_ONLY=0 REDIS_AOF=0 WORKLOADS=fanout,burst OUT=
ARGS=("$@")
while [ $# -gt 0 ]; do
  case $1 in
    --subscribers) N=$2; shift ;;
    --rate) RATE=$2; shift ;;
    --duration) DUR=$2; shift ;;
    --burst-events) BURST_EVENTS=$2; shift ;;
    --rounds) ROUNDS=$2; shift ;;
    --backend) BACKEND=$2; shift ;;
    --workloads) WORKLOADS=$2; shift ;;
    --redis-aof) REDIS_AOF=1 ;;
    --out) OUT=$2; shift ;;
    --no-netns) NETNS=0 ;;
    --quick) QUICK=1 ;;
    --report-only) REPORT_ONLY=1 ;;
    --inside-netns) INSIDE=1 ;;   # internal
    -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [ "$QUICK" = 1 ]; then N=200 DUR=5 BURST_EVENTS=10000 ROUNDS=1; fi
OUT=${OUT:-$ROOT/bench/results/$(date -u +%Y%m%d-%H%M)-cluster$([ "$QUICK" = 1 ] && echo -quick)}
# Absolute: redis-server resolves its --logfile after changing into its --dir.
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
if [ "$REPORT_ONLY" = 1 ]; then NETNS=0 ROUNDS=0; fi
if [ "$NETNS" = 1 ] && [ "$INSIDE" = 0 ]; then
  exec unshare -n -- "$0" "${ARGS[@]}" --inside-netns --out "$OUT"
fi
if [ "$INSIDE" = 1 ]; then
  ip link set lo up || exit 1
  # No delayed ACKs on loopback (as h2-bench.sh): a burst has several segments in flight
  # per connection, and the sender's tail-loss probe would fire before a delayed ACK and
  # count as a retransmit (an INVALID run). It applies to both set-ups alike.
  for dst in 127.0.0.0/8 127.0.0.1; do
    ip route replace table local local "$dst" dev lo proto kernel scope host src 127.0.0.1 quickack 1 \
      || echo "cannot set quickack on $dst" >&2
  done
  sysctl -qw net.core.somaxconn=65535 net.ipv4.tcp_max_syn_backlog=65535 \
    net.ipv4.ip_local_port_range="1024 65535" 2>/dev/null || true
  echo "private network namespace: lo up" >&2
fi
EVENTS=$(python3 -c "print(max(1, round($RATE * $DUR)))")
mkdir -p "$OUT/raw" "$OUT/logs"

if [ "$REPORT_ONLY" = 0 ]; then
REDIS_BIN=$(command -v redis-server || true)
[ -n "$REDIS_BIN" ] || { echo "redis-server missing: run scripts/install-test-deps.sh" >&2; exit 2; }
[ -x "$BIN/herald-bench" ] || { echo "$BIN/herald-bench missing: cargo build --release -p herald-bench" >&2; exit 2; }
[ -x "$BIN/herald" ] || { echo "$BIN/herald missing: cargo build --release -p herald" >&2; exit 2; }
TMPD=$(mktemp -d /tmp/herald-cluster-bench.XXXXXX)
# A private copy: a rebuild of target/release/herald during the run changes nothing.
cp "$BIN/herald" "$TMPD/herald" || exit 2
HERALD=$TMPD/herald
PIDS=()
stop_all() {
  local p
  for p in "${PIDS[@]}"; do
    kill -TERM "$p" 2>/dev/null
  done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null
    wait "$p" 2>/dev/null
  done
  PIDS=()
  sleep 0.5
}
trap 'stop_all; rm -rf "$TMPD"' EXIT
trap 'exit 143' INT TERM

"$ROOT/scripts/bench-env.sh" > "$OUT/env.md" 2>/dev/null
{
  echo "| herald under test | $BIN/herald, $("$HERALD" --version 2>&1), sha256 $(sha256sum "$HERALD" | cut -c1-16)… |"
  echo "| redis-server | $("$REDIS_BIN" --version | sed 's/ sha=.*//'), persistence $([ "$REDIS_AOF" = 1 ] && echo "AOF everysec" || echo "none") |"
  echo "| network namespace | $([ "$INSIDE" = 1 ] && echo "private (unshare -n)" || echo "the host's") |"
  echo "| workload | fanout: $N subscribers, $EVENTS events at $RATE/s; burst: 10 subscribers, $BURST_EVENTS events back to back; $ROUNDS round(s), herald --backend $BACKEND --workers 1 per node, servers on CPU0, herald-bench on CPU1 |"
} >> "$OUT/env.md"
echo "results → $OUT" >&2

QUIET_MAX=${QUIET_MAX:-120}
. "$ROOT/scripts/quiet-wait.sh"

RPORT=16379 PORT=(0 18081 18082 18083) IPORT=(0 17071 17072 17073)

# herald_node K [cluster]: node K on PORT[K]/IPORT[K], pinned to CPU0; sets NODE_PID[K].
NODE_PID=()
herald_node() {
  local k=$1 extra=()
  [ "${2:-}" = cluster ] && extra=(--cluster "redis://127.0.0.1:$RPORT")
  taskset -c 0 "$HERALD" serve --listen "127.0.0.1:${PORT[$k]}" --ingest "127.0.0.1:${IPORT[$k]}" \
    --workers 1 --backend "$BACKEND" --keepalive 15s "${extra[@]}" \
    >"$OUT/logs/$TAG.node$k.log" 2>&1 &
  NODE_PID[$k]=$!
  PIDS+=("$!")
  wait_port 127.0.0.1 "${PORT[$k]}" 20 && wait_port 127.0.0.1 "${IPORT[$k]}" 5 \
    || { echo "node $k did not start:" >&2; tail -5 "$OUT/logs/$TAG.node$k.log" >&2; return 1; }
}

start_setup() { # single|cluster
  NODE_PID=() REDIS_PID=
  case $1 in
    single)
      herald_node 2 || return 1 ;;
    cluster)
      local persist=(--appendonly no)
      [ "$REDIS_AOF" = 1 ] && persist=(--appendonly yes --appendfsync everysec)
      rm -rf "$TMPD/redis" && mkdir -p "$TMPD/redis"
      taskset -c 0 "$REDIS_BIN" --port "$RPORT" --bind 127.0.0.1 --save "" "${persist[@]}" \
        --dir "$TMPD/redis" --daemonize no --logfile "$OUT/logs/$TAG.redis.log" &
      REDIS_PID=$!
      PIDS+=("$!")
      local t=$((SECONDS + 10))
      until [ "$(redis-cli -p "$RPORT" ping 2>/dev/null)" = PONG ]; do
        [ $SECONDS -lt $t ] || { echo "redis-server did not answer PING" >&2; return 1; }
        sleep 0.05
      done
      herald_node 1 cluster && herald_node 2 cluster && herald_node 3 cluster || return 1
      local t=$((SECONDS + 20))
      for k in 1 2 3; do
        until curl -sf "http://127.0.0.1:${PORT[$k]}/healthz" >/dev/null; do
          [ $SECONDS -lt $t ] || { echo "node $k not linked to Redis" >&2; return 1; }
          sleep 0.05
        done
      done ;;
  esac
}

# procs_sample NAME=PID...: one JSON object {"t": CLOCK_MONOTONIC s, "procs": {name:
# {pid, stat_ticks, sched_ns}}} for the given server processes.
procs_sample() {
  python3 - "$@" <<'PY'
import glob, json, sys, time
out = {}
for arg in sys.argv[1:]:
    name, pid = arg.split("=")
    try:
        stat = open(f"/proc/{pid}/stat").read()
        f = stat[stat.rindex(")") + 2:].split()
        ticks = int(f[11]) + int(f[12])      # utime + stime
        ns = 0
        for t in glob.glob(f"/proc/{pid}/task/*/schedstat"):
            try:
                ns += int(open(t).read().split()[0])
            except OSError:
                pass
        out[name] = {"pid": int(pid), "stat_ticks": ticks, "sched_ns": ns}
    except OSError:
        out[name] = None
print(json.dumps({"t": time.monotonic(), "procs": out}))
PY
}

TICK_HZ=$(getconf CLK_TCK) IDLE_SECS=3
CTIMEOUT=$((30 + N / 500))
for r in $(seq "$ROUNDS"); do
  for wl in ${WORKLOADS//,/ }; do
    for setup in single cluster; do
      TAG="${setup}__${wl}__r$r"
      echo "== $TAG" >&2
      quiet_wait
      if ! start_setup "$setup"; then echo "   $setup failed to start, skipped" >&2; stop_all; continue; fi
      # Subscribers on node 2 (the single node is node 2 too); publishes to node 1's
      # ingest in the cluster, to the node itself when single.
      pub=2; [ "$setup" = cluster ] && pub=1
      case $wl in
        fanout) load=(-n "$N" --events "$EVENTS" --rate "$RATE") ;;
        burst) load=(-n 10 --events "$BURST_EVENTS" --burst) ;;
      esac
      procs=("node2=${NODE_PID[2]}")
      [ "$setup" = cluster ] && procs=("node1=${NODE_PID[1]}" "node2=${NODE_PID[2]}" "node3=${NODE_PID[3]}" "redis=$REDIS_PID")
      # Each process's idle cost (the readers' blocking XREADs, timers), taken out of the
      # whole-run figures below: a measurement window, not a wait.
      idle0=$(procs_sample "${procs[@]}")
      sleep "$IDLE_SECS"
      before=$(procs_sample "${procs[@]}")
      timeout $((CTIMEOUT + DUR + 150)) taskset -c 1 "$BIN/herald-bench" \
        --url "http://127.0.0.1:${PORT[2]}/events/bench" \
        --publish ingest --ingest "127.0.0.1:${IPORT[$pub]}" "${load[@]}" \
        --server-pid "${NODE_PID[2]}" --thread-prefix herald-w --server-cpus 0 \
        --connect-timeout "$CTIMEOUT" --settle 1 --drain-timeout 30 --label "$TAG" \
        --json "$OUT/raw/$TAG.json" >"$OUT/logs/$TAG.txt" 2>&1 \
        || echo "   herald-bench failed (exit $?), see $OUT/logs/$TAG.txt" >&2
      after=$(procs_sample "${procs[@]}")
      xlen=null
      if [ "$setup" = cluster ]; then
        xlen=$(redis-cli -p "$RPORT" xlen herald:events 2>/dev/null || echo null)
        # Where Redis spent its time (calls, µs per call by command).
        redis-cli -p "$RPORT" info commandstats >"$OUT/raw/$TAG.redis-commandstats.txt" 2>&1
      fi
      printf '{"tick_hz": %s, "idle": %s, "before": %s, "after": %s, "redis_xlen": %s}\n' \
        "$TICK_HZ" "$idle0" "$before" "$after" "${xlen:-null}" >"$OUT/raw/$TAG.procs.json"
      grep -E "^(run|warning|deliveries|checks|server CPU per|delivery latency)" "$OUT/logs/$TAG.txt" | sed 's/^/   /' >&2
      stop_all
    done
  done
done
fi

python3 - "$OUT" <<'PY' | tee "$OUT/results.md"
import glob, json, os, statistics, sys
out = sys.argv[1]
def get(r, path):
    for k in path.split("."):
        r = (r or {}).get(k) if isinstance(r, dict) else None
    return r
runs = {}
for f in sorted(glob.glob(os.path.join(out, "raw", "*__r*.json"))):
    if f.endswith(".procs.json"):
        continue
    setup, wl, _ = os.path.basename(f)[:-5].split("__")
    r = json.load(open(f))
    pf = f[:-5] + ".procs.json"
    r["_procs"] = json.load(open(pf)) if os.path.exists(pf) else None
    runs.setdefault((wl, setup), []).append(r)

def us(p, a, b, name, key):
    a, b = (p.get(a) or {}), (p.get(b) or {})
    x, y = (a.get("procs") or {}).get(name), (b.get("procs") or {}).get(name)
    if not x or not y:
        return None, None
    dt = b["t"] - a["t"]
    if key == "sched_ns":
        return (y["sched_ns"] - x["sched_ns"]) / 1000, dt
    return (y["stat_ticks"] - x["stat_ticks"]) * 1e6 / p["tick_hz"], dt

def proc_us(r, name, key="sched_ns", net=True):
    """CPU µs of one server process over the run, less its idle rate × the run's length."""
    p = r.get("_procs") or {}
    run, dt = us(p, "before", "after", name, key)
    if run is None:
        return None
    if not net:
        return run
    idle, idt = us(p, "idle", "before", name, key)
    if idle is None or not idt:
        return run
    return max(0.0, run - idle / idt * dt)

def idle_pct(r, name):
    p = r.get("_procs") or {}
    idle, idt = us(p, "idle", "before", name, "sched_ns")
    return 100 * idle / (idt * 1e6) if idle is not None and idt else None

def derived(r):
    pub = r.get("publish") or {}
    ev = (pub.get("events_per_topic") or 0) * (pub.get("topics") or 1)
    dl = pub.get("deliveries") or 0
    win = pub.get("window_seconds") or 0
    d = {"events": ev, "deliveries": dl,
         "events_per_s": ev / win if win else None,
         "p50": get(pub, "latency_us.p50"), "p99": get(pub, "latency_us.p99"),
         "node_cpu_us_per_delivery": pub.get("server_cpu_us_per_delivery")}
    for name in ("node1", "node3", "redis"):
        u = proc_us(r, name)
        d[f"{name}_us_per_event"] = u / ev if u is not None and ev else None
        st = proc_us(r, name, "stat")
        d[f"{name}_stat_us_per_event"] = st / ev if st is not None and ev else None
        st = proc_us(r, name, "stat", net=False)
        d[f"{name}_stat_gross_us_per_event"] = st / ev if st is not None and ev else None
    for name in ("node1", "node2", "node3", "redis"):
        d[f"{name}_idle_pct"] = idle_pct(r, name)
    # The delivering node over the publish window (herald-bench) plus the others, net of
    # idle, over the run.
    others = [proc_us(r, n) for n in ("node1", "node3", "redis")]
    node = pub.get("server_cpu_ms")
    if all(t is not None for t in others) and dl and node is not None:
        d["cluster_us_per_delivery"] = (node * 1000 + sum(others)) / dl
    return d

FIG = [
    ("events_per_s", "events/s (first publish → last delivery)", "{:,.0f}"),
    ("p50", "publish → delivery latency p50, µs", "{:,.0f}"),
    ("p99", "publish → delivery latency p99, µs", "{:,.0f}"),
    ("node_cpu_us_per_delivery", "delivering node CPU per delivery, µs (herald-bench, publish window)", "{:.2f}"),
    ("cluster_us_per_delivery", "all 4 server processes' CPU per delivery, µs (node 2 + others net of idle)", "{:.2f}"),
    ("node1_us_per_event", "node 1 (publisher's node) CPU per event, µs (net of idle)", "{:.1f}"),
    ("node3_us_per_event", "node 3 (reads only) CPU per event, µs (net of idle)", "{:.1f}"),
    ("redis_us_per_event", "redis-server CPU per event, µs (schedstat, net of idle)", "{:.1f}"),
    ("redis_stat_us_per_event", "redis-server CPU per event, µs (/proc/PID/stat ticks, net of idle)", "{:.1f}"),
    ("redis_stat_gross_us_per_event", "redis-server CPU per event, µs (/proc/PID/stat ticks, gross)", "{:.1f}"),
    ("node2_idle_pct", "delivering node idle CPU, % of a core", "{:.2f}"),
    ("node1_idle_pct", "node 1 idle CPU, % of a core", "{:.2f}"),
    ("redis_idle_pct", "redis-server idle CPU, % of a core", "{:.2f}"),
]
summary = {}
for (wl, setup), rs in sorted(runs.items()):
    valid = [r for r in rs if r.get("valid")]
    use = valid or rs
    ds = [derived(r) for r in use]
    s = {"runs": len(rs), "valid": len(valid),
         "medians_over": "valid runs" if valid else "all runs (none valid)"}
    for key, _, _ in FIG:
        v = [d[key] for d in ds if isinstance(d.get(key), (int, float))]
        s[key] = {"median": statistics.median(v), "min": min(v), "max": max(v)} if v else None
    s["loss"] = sum((get(r, "publish.missing") or 0) + (get(r, "publish.duplicates") or 0)
                    + (get(r, "publish.out_of_order") or 0) for r in rs)
    s["complete"] = all(get(r, "publish.complete") for r in rs)
    s["warnings"] = sorted({w for r in rs for w in r.get("warnings", [])} |
                           {"INVALID run: " + w for r in rs for w in r.get("invalid_reasons", [])})
    summary.setdefault(wl, {})[setup] = s
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
print("## cluster (1 redis-server + 3 herald nodes) vs one herald\n")
print("Medians over the VALID runs (min–max). cluster: published on node 1, delivered on node 2;")
print("single: the same load on one node. All servers on CPU0, herald-bench on CPU1.\n")
def cell(s, key, fmt):
    v = (s or {}).get(key)
    if not v:
        return "–"
    return fmt.format(v["median"]) + " (" + fmt.format(v["min"]) + "–" + fmt.format(v["max"]) + ")"
for wl, by in summary.items():
    print(f"### {wl}\n")
    setups = [x for x in ("single", "cluster") if x in by]
    print("| figure | " + " | ".join(setups) + " | cluster ÷ single |")
    print("|---|" + "---|" * (len(setups) + 1))
    for key, label, fmt in FIG:
        vals = [cell(by[x], key, fmt) for x in setups]
        if all(v == "–" for v in vals):
            continue
        a, b = (by.get("cluster") or {}).get(key), (by.get("single") or {}).get(key)
        ratio = f"{a['median'] / b['median']:.2f}" if a and b and b["median"] else "–"
        print(f"| {label} | " + " | ".join(vals) + f" | {ratio} |")
    print("| runs (valid) | " + " | ".join(f"{by[x]['runs']} ({by[x]['valid']})" for x in setups) + " | |")
    print("| missing+dup+out-of-order, all runs complete | " + " | ".join(
        f"{by[x]['loss']}, {'yes' if by[x]['complete'] else 'NO'}" for x in setups) + " | |")
    for x in setups:
        for w in by[x]["warnings"]:
            print(f"\n- {x}: {w}")
    print()
PY
