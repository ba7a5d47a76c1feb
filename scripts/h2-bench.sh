#!/usr/bin/env bash
# HTTP/2 against HTTP/1.1 over TLS, herald against Nginx + Nchan: memory per idle stream
# and server CPU per delivery, in one session on this box, loopback only.
#
#   herald-h2      herald, --tls-listen, ALPN h2: N connections × M streams
#   herald-h1-tls  the same herald, HTTP/1.1 over TLS: N×M connections
#   nchan-h2       nginx + nchan, `listen … ssl http2`, ALPN h2: N connections × M streams
# and on request (--servers): herald-h2c (--listen, prior knowledge), nchan-h2c
# (`listen … http2` without ssl, prior knowledge), nchan-h1-tls (`listen … ssl`).
#
#   scripts/h2-bench.sh [--conns 100] [--streams 100] [--rounds 3] [--rate 5]
#                       [--duration 20] [--servers herald-h2,herald-h1-tls,nchan-h2]
#                       [--backend epoll|uring] [--out DIR] [--herald PATH] [--no-netns]
#                       [--quick] [--report-only]
#
# Each run starts a fresh server pinned to CPU0 with one worker, the load generator on
# CPU1: herald-bench opens the subscribers (h2: --h2 --streams-per-conn M -n N; h1:
# -n N×M), waits --settle 2 s, samples the server's RSS (idle memory: ΔRSS ÷ streams),
# then publishes --rate events/s to the one topic for --duration s (fan-out to every
# stream) and takes the server's CPU (schedstat of its process) ÷ deliveries. Loss,
# duplicates and order are checked on every stream. herald is published to over its
# NDJSON ingest, Nchan over HTTP POST on a plain port (see bench/README.md, fairness).
# Rounds are interleaved (A B C A B C …). herald's --h2-max-streams and nginx's
# http2_max_concurrent_streams are raised to M when M is above their default of 128.
# TLS: a throwaway CA + leaf (ECDSA P-256) made with the openssl CLI in OUT/logs/tls.
# Nchan: Debian nginx-light + libnginx-mod-nchan, installed by bench-lib.sh's
# ensure_nchan if missing (nginx-light has ssl and http2).
#
# By default the runs are in a private network namespace (unshare -n, lo up, backlog and
# port range raised, delayed ACKs off on lo's routes: `quickack 1`, see below), so other
# loopback traffic on a shared box moves neither ports nor the retransmit counters. Before each run the script waits (up to QUIET_MAX, 120 s)
# until no core was more than 15 % busy over 3 s. Every run is under `timeout`; the
# script stops by itself. --quick: 20 connections × 50 streams, 1 round, 5 s.
# Output (default bench/results/<date>-h2/): raw/<server>__r<k>.json, logs/, env.md,
# results.md, summary.json (medians, min–max over the VALID runs, ratios to herald-h2;
# a server with no valid run is summarised over all and marked). --report-only --out DIR
# rewrites results.md and summary.json from DIR/raw without running anything.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/scripts/bench-lib.sh"
CONNS=100 STREAMS=100 ROUNDS=3 RATE=5 DUR=20 BACKEND=epoll NETNS=1 INSIDE=0 QUICK=0 REPORT_ONLY=0
SERVERS=herald-h2,herald-h1-tls,nchan-h2 OUT= HERALD=$BIN/herald
PORT=19443 PPORT=19080 IPORT=17070
ARGS=("$@")
while [ $# -gt 0 ]; do
  case $1 in
    --conns) CONNS=$2; shift ;;
    --streams) STREAMS=$2; shift ;;
    --rounds) ROUNDS=$2; shift ;;
    --rate) RATE=$2; shift ;;
    --duration) DUR=$2; shift ;;
    --servers) SERVERS=$2; shift ;;
    --backend) BACKEND=$2; shift ;;
    --out) OUT=$2; shift ;;
    --herald) HERALD=$2; shift ;;
    --no-netns) NETNS=0 ;;
    --quick) QUICK=1 ;;
    --report-only) REPORT_ONLY=1 ;;
    --inside-netns) INSIDE=1 ;;   # internal
    -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [ "$QUICK" = 1 ]; then CONNS=20 STREAMS=50 ROUNDS=1 DUR=5; fi
OUT=${OUT:-$ROOT/bench/results/$(date -u +%Y%m%d-%H%M)-h2$([ "$QUICK" = 1 ] && echo -quick)}
if [ "$REPORT_ONLY" = 1 ]; then NETNS=0 ROUNDS=0; fi
if [ "$NETNS" = 1 ] && [ "$INSIDE" = 0 ]; then
  # Install what is missing while the host's network is there (apt), then re-run inside.
  [[ $SERVERS == *nchan* ]] && { ensure_nchan || { echo "Nchan unavailable" >&2; exit 2; }; }
  mkdir -p "$OUT"
  exec unshare -n -- "$0" "${ARGS[@]}" --inside-netns --out "$OUT"
fi
if [ "$INSIDE" = 1 ]; then
  ip link set lo up || exit 1
  # No delayed ACKs on loopback here: an h2 connection has several segments in flight
  # (one per stream and event), and then the sender's tail-loss probe (2 srtt + 2
  # jiffies) fires before a delayed ACK (40 ms) and counts as a retransmit, which makes
  # a run INVALID. With quickack there are none; it applies to every server alike.
  for dst in 127.0.0.0/8 127.0.0.1; do
    ip route replace table local local "$dst" dev lo proto kernel scope host src 127.0.0.1 quickack 1 \
      || echo "cannot set quickack on $dst" >&2
  done
  sysctl -qw net.core.somaxconn=65535 net.ipv4.tcp_max_syn_backlog=65535 \
    net.ipv4.ip_local_port_range="1024 65535" 2>/dev/null || true
  echo "private network namespace: lo up, somaxconn $(cat /proc/sys/net/core/somaxconn)" >&2
fi
N2=$((CONNS * STREAMS))
[ "$N2" -le 19000 ] || echo "warning: $N2 HTTP/1.1 connections exceed one process's 20,000 open files (herald epoll, nginx worker_connections 19900)" >&2
EVENTS=$(python3 -c "print(max(1, round($RATE * $DUR)))")
mkdir -p "$OUT/raw" "$OUT/logs"
if [ "$REPORT_ONLY" = 0 ]; then
TMPD=$(mktemp -d /tmp/herald-h2-bench.XXXXXX)
SRV_PID= NGINX_PID=
stop_srv() {
  local p
  for p in $NGINX_PID $SRV_PID; do
    if kill -0 "$p" 2>/dev/null; then
      kill -TERM "$p" 2>/dev/null
      for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null
      wait "$p" 2>/dev/null
    fi
  done
  SRV_PID= NGINX_PID=
  sleep 0.5
}
trap 'stop_srv; rm -rf "$TMPD"' EXIT
trap 'exit 143' INT TERM
[ -x "$BIN/herald-bench" ] || { echo "$BIN/herald-bench missing: cargo build --release -p herald-bench" >&2; exit 2; }
[[ $SERVERS != *herald* ]] || [ -x "$HERALD" ] || { echo "$HERALD missing: cargo build --release -p herald" >&2; exit 2; }
command -v openssl >/dev/null || { echo "needs the openssl CLI" >&2; exit 2; }
if [[ $SERVERS == *nchan* ]]; then
  command -v nginx >/dev/null && [ -f "$NGINX_MOD" ] || ensure_nchan || { echo "Nchan unavailable" >&2; exit 2; }
fi
TLSD=$OUT/logs/tls
make_certs "$TLSD" || exit 1
if [[ $SERVERS == *herald* ]]; then
  # A private copy: a rebuild of target/release/herald during the run changes nothing.
  cp "$HERALD" "$TMPD/herald" || exit 2
  HERALD_SRC=$HERALD HERALD=$TMPD/herald
fi

"$ROOT/scripts/bench-env.sh" > "$OUT/env.md" 2>/dev/null
{
  [ -n "${HERALD_SRC:-}" ] && echo "| herald under test | $HERALD_SRC, $("$HERALD" --version 2>&1), sha256 $(sha256sum "$HERALD" | cut -c1-16)… |"
  command -v nginx >/dev/null && echo "| nginx | $(nginx -v 2>&1 | sed 's/.*: //'), nchan $(dpkg-query -W -f '${Version}' libnginx-mod-nchan 2>/dev/null) |"
  echo "| network namespace | $([ "$INSIDE" = 1 ] && echo "private (unshare -n)" || echo "the host's") |"
  echo "| workload | $CONNS connections × $STREAMS streams (h1: $N2 connections), $EVENTS events at $RATE/s, 1 topic, $ROUNDS round(s), herald --backend $BACKEND |"
} >> "$OUT/env.md"
echo "results → $OUT" >&2

QUIET_MAX=${QUIET_MAX:-120}
. "$ROOT/scripts/quiet-wait.sh"

# start NAME: sets SRV_PID (the process measured), NGINX_PID, URL, LOAD (herald-bench
# subscriber and publish flags), THREADS.
start() {
  local name=$1 log=$OUT/logs/$1.server.log
  local h2max=()
  [ "$STREAMS" -gt 128 ] && h2max=(--h2-max-streams "$STREAMS")
  case $name in
    herald-h2|herald-h1-tls|herald-h2c)
      local listen=(--listen off --tls-listen "127.0.0.1:$PORT" --tls-cert "$TLSD/leaf.pem" --tls-key "$TLSD/leaf.key")
      [ "$name" = herald-h2c ] && listen=(--listen "127.0.0.1:$PORT")
      taskset -c 0 "$HERALD" serve "${listen[@]}" --ingest "127.0.0.1:$IPORT" --workers 1 \
        --backend "$BACKEND" --keepalive 15s "${h2max[@]}" >"$log" 2>&1 &
      SRV_PID=$! THREADS=herald-w
      wait_port 127.0.0.1 "$IPORT" 10 || { echo "$name: no ingest port" >&2; tail -3 "$log" >&2; return 1; }
      LOAD=(--publish ingest --ingest "127.0.0.1:$IPORT") ;;
    nchan-h2|nchan-h1-tls|nchan-h2c)
      local d=$TMPD/nginx-$name listen
      case $name in
        nchan-h2) listen="listen 127.0.0.1:$PORT ssl http2 backlog=4096 reuseport;" ;;
        nchan-h1-tls) listen="listen 127.0.0.1:$PORT ssl backlog=4096 reuseport;" ;;
        nchan-h2c) listen="listen 127.0.0.1:$PORT http2 backlog=4096 reuseport;" ;;
      esac
      mkdir -p "$d/tmp" "$d/logs"
      cat >"$d/nginx.conf" <<CONF
load_module $NGINX_MOD;
daemon off;
worker_processes 1;
worker_rlimit_nofile 20000;
pid $d/nginx.pid;
error_log $d/logs/error.log warn;
events { worker_connections 19900; multi_accept on; }
http {
  access_log off;
  client_body_temp_path $d/tmp/body; proxy_temp_path $d/tmp/proxy; fastcgi_temp_path $d/tmp/fcgi;
  uwsgi_temp_path $d/tmp/uwsgi; scgi_temp_path $d/tmp/scgi;
  nchan_shared_memory_size 256M;
  http2_max_concurrent_streams $((STREAMS > 128 ? STREAMS : 128));
  server {
    $listen
    listen 127.0.0.1:$PPORT backlog=4096 reuseport;
    ssl_certificate $TLSD/leaf.pem; ssl_certificate_key $TLSD/leaf.key;
    ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache off;
    location ~ ^/publish/(.+)\$ { nchan_publisher; nchan_channel_id \$1; nchan_message_buffer_length 1024; nchan_message_timeout 10m; }
    location ~ ^/events/(.+)\$ { nchan_subscriber eventsource; nchan_channel_id \$1; nchan_subscriber_timeout 0; nchan_eventsource_ping_interval 15; }
  }
}
CONF
      taskset -c 0 nginx -p "$d" -c "$d/nginx.conf" >"$log" 2>&1 &
      NGINX_PID=$! THREADS=nginx
      wait_port 127.0.0.1 "$PPORT" 10 || { echo "$name: no publish port" >&2; tail -3 "$log" "$d/logs/error.log" >&2; return 1; }
      sleep 0.3
      SRV_PID=$(pgrep -P "$NGINX_PID" | head -1)
      [ -n "$SRV_PID" ] || { echo "nginx has no worker" >&2; return 1; }
      LOAD=(--publish http --publish-url "http://127.0.0.1:$PPORT/publish/{topic}") ;;
    *) echo "unknown server $name" >&2; return 1 ;;
  esac
  wait_port 127.0.0.1 "$PORT" 10 || { echo "$name did not open port $PORT" >&2; tail -3 "$log" >&2; return 1; }
  case $name in
    *-h2c) URL="http://127.0.0.1:$PORT/events/bench" SUBS=(--h2 --streams-per-conn "$STREAMS" -n "$CONNS") ;;
    *-h2) URL="https://127.0.0.1:$PORT/events/bench" SUBS=(--cacert "$TLSD/ca.pem" --h2 --streams-per-conn "$STREAMS" -n "$CONNS") ;;
    *) URL="https://127.0.0.1:$PORT/events/bench" SUBS=(--cacert "$TLSD/ca.pem" -n "$N2") ;;
  esac
}

CTIMEOUT=$((60 + N2 / 500))
for r in $(seq "$ROUNDS"); do
  for srv in ${SERVERS//,/ }; do
    tag="${srv}__r$r"
    echo "== $tag" >&2
    quiet_wait
    if ! start "$srv"; then echo "   $srv failed to start, skipped" >&2; stop_srv; continue; fi
    timeout $((CTIMEOUT + DUR + 120)) taskset -c 1 "$BIN/herald-bench" --url "$URL" "${SUBS[@]}" \
      "${LOAD[@]}" --events "$EVENTS" --rate "$RATE" --server-pid "$SRV_PID" \
      --thread-prefix "$THREADS" --server-cpus 0 --connect-timeout "$CTIMEOUT" --settle 2 \
      --drain-timeout 30 --label "$tag" --json "$OUT/raw/$tag.json" >"$OUT/logs/$tag.txt" 2>&1 \
      || echo "   herald-bench failed (exit $?), see $OUT/logs/$tag.txt" >&2
    grep -E "^(run|warning|subscribers connected|h2 |server RSS per|deliveries|checks|server CPU per)" \
      "$OUT/logs/$tag.txt" | sed 's/^/   /' >&2
    stop_srv
  done
done
fi

python3 - "$OUT" <<'PY' | tee "$OUT/results.md"
import glob, json, os, statistics, sys
out = sys.argv[1]
runs = {}
for f in sorted(glob.glob(os.path.join(out, "raw", "*.json"))):
    server = os.path.basename(f)[:-5].split("__")[0]
    runs.setdefault(server, []).append(json.load(open(f)))
# INVALID runs (softnet drops, retransmits while measuring) are not quoted.
all_runs = runs
runs = {k: ([r for r in v if r.get("valid")] or v) for k, v in all_runs.items()}
def get(r, path):
    for k in path.split("."):
        r = (r or {}).get(k)
    return r
FIG = [  # key, json path, label, format
    ("rss_stream", "memory.server_rss_per_stream_bytes", "server RSS per idle stream, B", "{:,.0f}"),
    ("rss_conn", "memory.server_rss_per_conn_bytes", "server RSS per TCP connection, B", "{:,.0f}"),
    ("slab_stream", "memory.kernel_slab_per_stream_bytes", "kernel slab per stream (both ends), B", "{:,.0f}"),
    ("cpu", "publish.server_cpu_us_per_delivery", "server CPU per delivery, µs", "{:.2f}"),
    ("cores", "publish.server_cores_busy_us_per_delivery", "CPU0 busy per delivery, µs", "{:.2f}"),
    ("lg_cpu", "publish.loadgen_cpu_us_per_delivery", "load generator CPU per delivery, µs", "{:.2f}"),
    ("p50", "publish.latency_us.p50", "delivery latency p50, µs", "{:,.0f}"),
    ("p99", "publish.latency_us.p99", "delivery latency p99, µs", "{:,.0f}"),
]
summary = {}
for server, rs in runs.items():
    s = {"runs": len(all_runs[server]), "valid": sum(bool(r.get("valid")) for r in all_runs[server])}
    s["medians_over"] = "valid runs" if s["valid"] else "all runs (none valid)"
    for key, path, _, _ in FIG:
        v = [x for x in (get(r, path) for r in rs) if isinstance(x, (int, float))]
        s[key] = {"median": statistics.median(v), "min": min(v), "max": max(v)} if v else None
    s["streams"] = [get(r, "connect.connected") for r in rs]
    s["requested"] = [get(r, "connect.requested") for r in rs]
    s["tcp_connections"] = [get(r, "memory.tcp_connections") for r in rs]
    s["loss"] = sum((get(r, "publish.missing") or 0) + (get(r, "publish.duplicates") or 0)
                    + (get(r, "publish.out_of_order") or 0) for r in rs)
    s["dropped"] = sum(sum((get(r, "publish.streams_dropped") or {}).values()) for r in rs)
    s["warnings"] = sorted({w for r in all_runs[server] for w in r.get("warnings", [])} |
                           {"INVALID run: " + w for r in all_runs[server] for w in r.get("invalid_reasons", [])})
    summary[server] = s
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
servers = list(summary)
print("## h2 vs HTTP/1.1 over TLS, herald vs Nginx + Nchan\n")
print("Medians over the VALID runs (min–max). Memory: server ΔRSS after connecting and 2 s of settling ÷ streams")
print("(÷ TCP connections for the per-connection row); CPU: server schedstat over the publish window ÷ deliveries.\n")
print("| figure | " + " | ".join(servers) + " |")
print("|---|" + "---|" * len(servers))
def cell(s, key, fmt):
    v = s.get(key)
    if not v:
        return "–"
    return (fmt.format(v["median"]) + " (" + fmt.format(v["min"]) + "–" + fmt.format(v["max"]) + ")")
for key, _, label, fmt in FIG:
    print(f"| {label} | " + " | ".join(cell(summary[x], key, fmt) for x in servers) + " |")
print("| runs (valid) | " + " | ".join(f"{summary[x]['runs']} ({summary[x]['valid']})" for x in servers) + " |")
print("| streams / requested | " + " | ".join(
    f"{min(summary[x]['streams'] or [0])}/{max(summary[x]['requested'] or [0])}" for x in servers) + " |")
print("| TCP connections | " + " | ".join(str(max(summary[x]['tcp_connections'] or [0])) for x in servers) + " |")
print("| missing+dup+out-of-order, dropped | " + " | ".join(
    f"{summary[x]['loss']}, {summary[x]['dropped']}" for x in servers) + " |")
base = "herald-h2" if "herald-h2" in summary else (servers[0] if servers else None)
if base:
    print(f"\n### ratios: {base} ÷ each (below 1: {base} uses less)\n")
    print("| figure | " + " | ".join(f"{base} ÷ {x}" for x in servers if x != base) + " |")
    print("|---|" + "---|" * (len(servers) - 1))
    for key, _, label, _ in FIG[:5]:
        row = []
        for x in servers:
            if x == base:
                continue
            a, b = summary[base].get(key), summary[x].get(key)
            row.append(f"{a['median'] / b['median']:.2f}" if a and b and b["median"] else "–")
        print(f"| {label} | " + " | ".join(row) + " |")
for x in servers:
    for w in summary[x]["warnings"]:
        print(f"\n- {x}: {w}")
PY
