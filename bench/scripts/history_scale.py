#!/usr/bin/env python3
"""History at scale: what a retained topic costs herald, and what /metrics costs with many.

Starts `herald serve` (one worker, pinned to CPU0), measures its RSS, publishes E events
to each of N topics over the ingest socket (nobody subscribed, so every topic is kept for
its history alone), waits until /metrics reports them all retained, measures RSS again,
then times GET /metrics (median and p99 of K requests on one keep-alive connection) and
reads how long the once-a-second history janitor held the hub lock. Standard library only.

    history_scale.py [--herald target/release/herald] [--topics 100000] [--events 3]
                     [--data-bytes 64] [--requests 200] [--backend uring]
"""
import argparse
import http.client
import os
import re
import socket
import statistics
import subprocess
import sys
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def metrics(conn):
    conn.request("GET", "/metrics")
    r = conn.getresponse()
    body = r.read().decode()
    if r.status != 200:
        raise RuntimeError(f"/metrics answered {r.status}")
    return body


def metric(text, name):
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def wait_port(port, deadline):
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--herald", default="target/release/herald")
    ap.add_argument("--topics", type=int, default=100_000)
    ap.add_argument("--events", type=int, default=3)
    ap.add_argument("--data-bytes", type=int, default=64)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--backend", default="uring")
    a = ap.parse_args()

    port, iport = free_port(), free_port()
    cmd = ["taskset", "-c", "0", a.herald, "serve", "--listen", f"127.0.0.1:{port}",
           "--ingest", f"127.0.0.1:{iport}", "--workers", "1", "--backend", a.backend,
           "--history-topics", str(max(a.topics * 2, 250_000)),
           "--history-events", str(max(a.events, 1))]
    srv = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 10
        wait_port(port, deadline)
        wait_port(iport, deadline)
        http_conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        base_times = []
        for _ in range(a.requests):
            t = time.perf_counter()
            metrics(http_conn)
            base_times.append(time.perf_counter() - t)
        rss0 = rss_kib(srv.pid)

        data = "x" * a.data_bytes
        ing = socket.create_connection(("127.0.0.1", iport))
        batch = []
        for e in range(a.events):
            for t in range(a.topics):
                batch.append(f'{{"topic":"user-{t}","data":"{data}"}}\n')
                if len(batch) >= 4096:
                    ing.sendall("".join(batch).encode())
                    batch.clear()
        ing.sendall("".join(batch).encode())
        ing.shutdown(socket.SHUT_WR)
        replies = b""
        while True:
            chunk = ing.recv(65536)
            if not chunk:
                break
            replies += chunk
        if replies:
            raise RuntimeError(f"ingest refused lines: {replies[:200]!r}")
        want = a.topics * a.events
        deadline = time.time() + 60
        while True:
            text = metrics(http_conn)
            if metric(text, "herald_history_events") == want:
                break
            if time.time() > deadline:
                raise RuntimeError(f"history never reached {want} events")
            time.sleep(0.1)
        # Let the janitor run at least twice over the full table.
        time.sleep(2.5)
        rss1 = rss_kib(srv.pid)
        times = []
        for _ in range(a.requests):
            t = time.perf_counter()
            text = metrics(http_conn)
            times.append(time.perf_counter() - t)
        # The janitor's last lock hold, sampled over a few seconds of its calls.
        janitor_samples = []
        for _ in range(100):
            j = metric(metrics(http_conn), "herald_history_janitor_last_microseconds")
            if j is not None:
                janitor_samples.append(j)
            time.sleep(0.03)
        topics = metric(text, "herald_history_topics")
        hist_bytes = metric(text, "herald_history_bytes")

        def q(xs, p):
            xs = sorted(xs)
            return xs[min(len(xs) - 1, int(p * len(xs)))]

        per_topic = (rss1 - rss0) * 1024 / a.topics
        print(f"herald {a.backend}: {a.topics} topics x {a.events} events of {a.data_bytes} B data")
        print(f"history_topics {topics:.0f}  history_events {want}  history_bytes {hist_bytes:.0f}")
        print(f"RSS {rss0} -> {rss1} KiB: {per_topic:.0f} B per topic "
              f"({(hist_bytes or 0) / a.topics:.0f} B of it the events' wire bytes)")
        print(f"GET /metrics, {a.requests} requests: empty median {statistics.median(base_times)*1e6:.0f} µs "
              f"p99 {q(base_times, 0.99)*1e6:.0f} µs; with {a.topics} topics median "
              f"{statistics.median(times)*1e6:.0f} µs p99 {q(times, 0.99)*1e6:.0f} µs")
        if janitor_samples:
            print(f"history janitor: a call held the hub lock median "
                  f"{statistics.median(janitor_samples)/1e3:.2f} ms, max {max(janitor_samples)/1e3:.2f} ms "
                  f"({len(janitor_samples)} samples over 3 s)")
    finally:
        srv.terminate()
        try:
            srv.wait(timeout=15)
        except subprocess.TimeoutExpired:
            srv.kill()


if __name__ == "__main__":
    sys.exit(main())
