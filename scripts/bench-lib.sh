#!/usr/bin/env bash
# Shared by compare.sh and capacity.sh: start/stop one server under test on loopback.
# Servers: herald-uring, herald-epoll, axum, nchan, floor, blocking-floor, and over TLS herald-uring-tls,
# herald-epoll-tls, nchan-tls (subscribers on https://, publishing stays plaintext: ingest
# for herald, HTTP POST on a second, plain port for Nchan). Each start prints nothing and
# sets SERVER_PID (the process to measure: nginx's worker for nchan), SERVER_THREADS
# (thread-name prefix), SUB_URL, SUB_ARGS (herald-bench TLS flags: --cacert) and PUB_ARGS
# (herald-bench publish flags). TLS servers use a throwaway CA + leaf certificate made
# with openssl in LOGDIR/tls (TLS_KEY_TYPE=ec, the default: P-256; or rsa: RSA-2048).

ROOT=${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
BIN=$ROOT/target/release
NGINX_MOD=/usr/lib/nginx/modules/ngx_nchan_module.so

ensure_built() {
  [ -x "$BIN/herald" ] || cargo build --release --locked -p herald
  [ -x "$BIN/herald-bench" ] && [ -x "$BIN/axum-sse" ] && [ -x "$BIN/uring-floor" ] \
    && [ -x "$BIN/blocking-floor" ] \
    || cargo build --release --locked -p herald-bench
}

# Debian packages nginx-light + libnginx-mod-nchan; never starts the system service
# (policy-rc.d), and our instance runs from its own prefix and config.
ensure_nchan() {
  if command -v nginx >/dev/null && [ -f "$NGINX_MOD" ]; then return 0; fi
  echo "installing nginx-light + libnginx-mod-nchan (apt)" >&2
  local had_policy=1
  [ -e /usr/sbin/policy-rc.d ] || { had_policy=0; printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx-light libnginx-mod-nchan >&2 || {
    apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx-light libnginx-mod-nchan >&2; }
  local rc=$?
  [ $had_policy = 1 ] || rm -f /usr/sbin/policy-rc.d
  return $rc
}

# make_certs DIR: CA + leaf for DNS:localhost, IP:127.0.0.1 (once per DIR).
make_certs() {
  local d=$1
  [ -s "$d/leaf.pem" ] && [ -s "$d/leaf.key" ] && [ -s "$d/ca.pem" ] && return 0
  mkdir -p "$d"
  local alg=(-algorithm EC -pkeyopt ec_paramgen_curve:P-256)
  [ "${TLS_KEY_TYPE:-ec}" = rsa ] && alg=(-algorithm RSA -pkeyopt rsa_keygen_bits:2048)
  {
    openssl genpkey "${alg[@]}" -out "$d/ca.key" &&
    openssl req -x509 -new -key "$d/ca.key" -sha256 -days 7 -subj "/CN=herald bench CA" \
      -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
      -out "$d/ca.pem" &&
    openssl genpkey "${alg[@]}" -out "$d/leaf.key" &&
    openssl req -new -key "$d/leaf.key" -subj "/CN=localhost" -out "$d/leaf.csr" &&
    printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" "basicConstraints=critical,CA:FALSE" \
      "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" > "$d/leaf.ext" &&
    openssl x509 -req -in "$d/leaf.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
      -days 7 -sha256 -extfile "$d/leaf.ext" -out "$d/leaf.pem"
  } >"$d/openssl.log" 2>&1 || { echo "openssl failed; see $d/openssl.log" >&2; return 1; }
}

wait_port() { # host port timeout_s
  local end=$((SECONDS + $3))
  while [ $SECONDS -lt $end ]; do
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

# start_server NAME PORT INGEST_PORT WORKERS CPUS LOGDIR
start_server() {
  local name=$1 port=$2 iport=$3 workers=$4 cpus=$5 logdir=$6 tlsdir=$6/tls
  SUB_URL="http://127.0.0.1:$port/events/bench"
  SUB_ARGS=()
  PUB_ARGS=(--publish ingest --ingest "127.0.0.1:$iport")
  if [[ $name == *-tls ]]; then
    make_certs "$tlsdir" || return 1
    SUB_URL="https://127.0.0.1:$port/events/bench"
    SUB_ARGS=(--cacert "$tlsdir/ca.pem")
  fi
  case $name in
    herald-uring|herald-epoll)
      taskset -c "$cpus" "$BIN/herald" serve --listen "127.0.0.1:$port" --ingest "127.0.0.1:$iport" \
        --workers "$workers" --backend "${name#herald-}" --keepalive 15s >"$logdir/$name.log" 2>&1 &
      SERVER_PID=$!; SERVER_THREADS=herald-w ;;
    herald-uring-tls|herald-epoll-tls)
      local backend=${name#herald-}; backend=${backend%-tls}
      taskset -c "$cpus" "$BIN/herald" serve --listen off --tls-listen "127.0.0.1:$port" \
        --tls-cert "$tlsdir/leaf.pem" --tls-key "$tlsdir/leaf.key" --ingest "127.0.0.1:$iport" \
        --workers "$workers" --backend "$backend" --keepalive 15s >"$logdir/$name.log" 2>&1 &
      SERVER_PID=$!; SERVER_THREADS=herald-w ;;
    axum)
      taskset -c "$cpus" "$BIN/axum-sse" --listen "127.0.0.1:$port" --ingest "127.0.0.1:$iport" \
        --workers "$workers" >"$logdir/$name.log" 2>&1 &
      SERVER_PID=$!; SERVER_THREADS=axum-w ;;
    floor)
      taskset -c "$cpus" "$BIN/uring-floor" --listen "127.0.0.1:$port" --ingest "127.0.0.1:$iport" \
        --workers "$workers" --subscribers 1000000 >"$logdir/$name.log" 2>&1 &
      SERVER_PID=$!; SERVER_THREADS=floor-w ;;
    blocking-floor)
      # Per-user floor: one blocking read and one write per event, one thread, no poller.
      taskset -c "$cpus" "$BIN/blocking-floor" --listen "127.0.0.1:$port" --ingest "127.0.0.1:$iport" \
        >"$logdir/$name.log" 2>&1 &
      SERVER_PID=$!; SERVER_THREADS=floor- ;;
    nchan|nchan-tls)
      local d listen; d=$(mktemp -d /tmp/nchan-bench.XXXXXX)
      listen="listen 127.0.0.1:$port backlog=4096 reuseport;"
      if [ "$name" = nchan-tls ]; then
        # Subscribers on TLS; the publisher location also answers on a plain port.
        listen="listen 127.0.0.1:$port ssl backlog=4096 reuseport;
    listen 127.0.0.1:$iport backlog=4096 reuseport;
    ssl_certificate $tlsdir/leaf.pem; ssl_certificate_key $tlsdir/leaf.key;
    ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache off;"
      fi
      mkdir -p "$d/tmp" "$d/logs"
      cat >"$d/nginx.conf" <<CONF
load_module $NGINX_MOD;
daemon off;
worker_processes $workers;
worker_rlimit_nofile 20000;
pid $d/nginx.pid;
error_log $d/logs/error.log warn;
events { worker_connections 19900; multi_accept on; }
http {
  access_log off;
  client_body_temp_path $d/tmp/body; proxy_temp_path $d/tmp/proxy; fastcgi_temp_path $d/tmp/fcgi;
  uwsgi_temp_path $d/tmp/uwsgi; scgi_temp_path $d/tmp/scgi;
  nchan_shared_memory_size 256M;
  server {
    $listen
    location ~ ^/publish/(.+)\$ { nchan_publisher; nchan_channel_id \$1; nchan_message_buffer_length 1024; nchan_message_timeout 10m; }
    location ~ ^/events/(.+)\$ { nchan_subscriber eventsource; nchan_channel_id \$1; nchan_subscriber_timeout 0; nchan_eventsource_ping_interval 15; }
  }
}
CONF
      taskset -c "$cpus" nginx -p "$d" -c "$d/nginx.conf" >"$logdir/$name.log" 2>&1 &
      NGINX_MASTER=$!; NGINX_DIR=$d
      local pport=$port; [ "$name" = nchan-tls ] && pport=$iport
      PUB_ARGS=(--publish http --publish-url "http://127.0.0.1:$pport/publish/{topic}")
      SERVER_THREADS=nginx ;;
    *) echo "unknown server $name" >&2; return 1 ;;
  esac
  if ! wait_port 127.0.0.1 "$port" 10; then
    echo "$name did not open port $port; log:" >&2; tail -5 "$logdir/$name.log" >&2; stop_server; return 1
  fi
  if [[ $name == nchan* ]]; then
    [ "$name" = nchan ] || wait_port 127.0.0.1 "$iport" 10 || { echo "$name: no publish port" >&2; stop_server; return 1; }
    sleep 0.3
    SERVER_PID=$(pgrep -d, -P "$NGINX_MASTER")
    [ -n "$SERVER_PID" ] || { echo "nginx has no worker" >&2; stop_server; return 1; }
  else
    wait_port 127.0.0.1 "$iport" 10 || { echo "$name: no ingest port" >&2; stop_server; return 1; }
  fi
}

stop_server() {
  local pid=${NGINX_MASTER:-${SERVER_PID:-}}
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null || true
  fi
  if [ -n "${NGINX_DIR:-}" ]; then rm -rf "$NGINX_DIR"; fi
  unset SERVER_PID NGINX_MASTER NGINX_DIR
  sleep 0.5   # let TIME_WAIT/FIN processing settle before the next server
}
