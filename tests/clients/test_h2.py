"""herald over HTTP/2 against clients nobody here wrote: `curl --http2` (ALPN h2 over TLS) and
`curl --http2-prior-knowledge` (cleartext h2c on --listen), `nghttp` (100 concurrent streams on
one connection), `h2load` (a load smoke run), Python httpx with `h2` (http2=True) + httpx-sse, and
the `h2` package itself for what no ordinary client does (streams past --h2-max-streams).

Every test asserts that HTTP/2 really was spoken (curl's %{http_version}, httpx's
response.http_version, nghttp's and h2load's negotiated protocol, h2 frames), so a server that
answers over HTTP/1.1 fails instead of passing on a fallback. TLS clients trust only the test CA
made fresh for this run (the `pki` fixture); the one exception is h2load, which has no option to
verify a certificate (it never does; nghttp and curl verify against the test CA).

Run: HERALD_BIN=target/release/herald HERALD_BACKEND=epoll tests/clients/.venv/bin/pytest tests/clients/test_h2.py
"""
import asyncio
import json
import os
import re
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import httpx
import pytest
from httpx_sse import aconnect_sse, connect_sse

from conftest import TIMEOUT, Herald

CLIENT_TIMEOUT = httpx.Timeout(TIMEOUT, connect=5.0)
ORIGIN = "https://app.example.com"
OTHER_ORIGIN = "https://elsewhere.example"
WAIT = 20.0  # seconds: every condition wait is bounded by this


@pytest.fixture(scope="module")
def hh(pki):
    """herald with the plaintext listener (h2c with prior knowledge, and HTTP/1.1) and a TLS
    listener (ALPN h2 / http/1.1), CORS limited to one listed origin."""
    h = Herald(tls={"pairs": [pki.pair("localhost")], "ca": pki.ca},
               extra_args=["--cors-origins", ORIGIN]).start()
    yield h
    code = h.stop()
    assert code == 0, f"herald should exit 0 on SIGTERM, got {code}\n{h.logs()}"


# Both ways to reach HTTP/2 on herald: (curl flags, base URL of the fixture).
MODES = {
    "tls": lambda h: (["--http2", "--cacert", str(h.tls["ca"])], h.tls_base),
    "h2c": lambda h: (["--http2-prior-knowledge"], h.base),
}


# ---------------------------------------------------------------- helpers

def run(cmd, timeout=30, **kw):
    """Run a command to completion (bounded); returns the CompletedProcess (text)."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)


WOUT = "\n__W__ %{http_version} %{http_code} %{content_type}"


def curl(h, mode, path, *extra, method=None, data=None, headers=()):
    """One request with curl over HTTP/2 (`mode`: tls or h2c). Returns
    (http_version, status, content_type, response headers {lower name: value}, body)."""
    flags, base = MODES[mode](h)
    with tempfile.NamedTemporaryFile("r", suffix=".hdr") as hdr:
        cmd = ["curl", "-sS", "--max-time", "10", *flags, "-D", hdr.name, "-w", WOUT]
        if method:
            cmd += ["-X", method]
        if data is not None:
            cmd += ["--data-binary", data]
        for hv in headers:
            cmd += ["-H", hv]
        cmd += [*extra, base + path]
        p = run(cmd)
        assert p.returncode == 0, f"{cmd} exited {p.returncode}: {p.stderr}\n{h.logs()}"
        body, _, w = p.stdout.rpartition("\n__W__ ")
        version, status, ctype = (w.split(" ", 2) + ["", ""])[:3]
        return version, int(status), ctype, parse_head(Path(hdr.name).read_text()), body


def parse_head(text):
    """The last response head in a curl -D file: {lower-case name: value} plus ':status-line'."""
    blocks = [b for b in text.replace("\r\n", "\n").split("\n\n") if b.strip()]
    lines = blocks[-1].split("\n")
    out = {":status-line": lines[0].strip()}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        out[name.strip().lower()] = value.strip()
    return out


class Reader:
    """A child process whose stdout is collected by a thread; wait_for() polls it."""

    def __init__(self, cmd, env=None):
        self.cmd = cmd
        self.buf = bytearray()
        self.lock = threading.Lock()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, env=env)
        self.err = b""
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._pump_err, daemon=True).start()

    def _pump(self):
        for chunk in iter(lambda: self.proc.stdout.read1(65536), b""):
            with self.lock:
                self.buf += chunk

    def _pump_err(self):
        self.err = self.proc.stderr.read()

    def data(self) -> bytes:
        with self.lock:
            return bytes(self.buf)

    def wait_for(self, pred, what, timeout=WAIT):
        deadline = time.monotonic() + timeout
        while True:
            d = self.data()
            if pred(d):
                return d
            if self.proc.poll() is not None:
                time.sleep(0.1)
                d = self.data()
                if pred(d):
                    return d
                raise AssertionError(f"{what}: {self.cmd[0]} exited {self.proc.returncode} first; "
                                     f"stderr {self.err[-2000:]!r}; stdout tail {d[-3000:]!r}")
            assert time.monotonic() < deadline, f"{what}: not within {timeout}s; stdout tail {d[-3000:]!r}"
            time.sleep(0.05)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def sse_events(raw: bytes):
    """Parse an event stream into [{"event", "id", "data"}] (comments and retry dropped);
    only complete events (ended by a blank line)."""
    text = raw.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")
    out = []
    for block in text.split("\n\n")[:-1]:
        ev = {"event": "message", "id": None, "data": []}
        seen = False
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                ev["data"].append(value)
                seen = True
            elif name in ("event", "id"):
                ev[name] = value
                seen = True
        if seen and ev["data"]:
            ev["data"] = "\n".join(ev["data"])
            out.append(ev)
    return out


def has_data(*datas):
    return lambda raw: all(d in [e["data"] for e in sse_events(raw)] for d in datas)


# ---------------------------------------------------------------- curl

def test_curl_tls_alpn_h2_healthz_metrics(hh):
    """curl --http2 over TLS negotiates h2 by ALPN; /healthz and /metrics answer over it."""
    version, status, _, head, body = curl(hh, "tls", "/healthz")
    assert (version, status, body.strip()) == ("2", 200, "ok"), (version, status, body, head)
    assert head[":status-line"].startswith("HTTP/2 200"), head
    version, status, ctype, head, body = curl(hh, "tls", "/metrics")
    assert (version, status) == ("2", 200), (version, status, head)
    assert ctype.startswith("text/plain"), ctype
    assert re.search(r"^herald_connections_open \d+$", body, re.M), body[:500]
    for name in ("connection", "keep-alive", "transfer-encoding", "upgrade"):
        assert name not in head, f"connection-specific header {name} on an h2 response: {head}"
    # The same listener still speaks HTTP/1.1 to a client that offers only http/1.1.
    p = run(["curl", "-sS", "--http1.1", "--cacert", str(hh.tls["ca"]), "-w", WOUT, f"{hh.tls_base}/healthz"])
    assert "__W__ 1.1 200" in p.stdout, f"an http/1.1-only client still gets HTTP/1.1: {p.stdout!r} {p.stderr}"


def test_curl_h2c_prior_knowledge_healthz_metrics(hh):
    """curl --http2-prior-knowledge on the plaintext listener: h2c; no Upgrade dance is needed,
    and a client that offers `Upgrade: h2c` is answered over HTTP/1.1 (herald does not upgrade)."""
    version, status, _, head, body = curl(hh, "h2c", "/healthz")
    assert (version, status, body.strip()) == ("2", 200, "ok"), (version, status, body, head)
    version, status, ctype, _, body = curl(hh, "h2c", "/metrics")
    assert (version, status) == ("2", 200) and ctype.startswith("text/plain"), (version, status, ctype)
    assert "herald_streams_open" in body
    p = run(["curl", "-sS", "--http2", "-w", WOUT, f"{hh.base}/healthz"])
    assert p.returncode == 0 and "__W__ 1.1 200" in p.stdout, f"Upgrade: h2c answered as HTTP/1.1: {p.stdout!r} {p.stderr}"
    p = run(["curl", "-sS", "-w", WOUT, f"{hh.base}/healthz"])
    assert "__W__ 1.1 200" in p.stdout, p.stdout


@pytest.mark.parametrize("mode", ["tls", "h2c"])
def test_curl_sse_over_h2_same_bytes_as_http11(hh, mode, topic):
    """An event stream over h2 (curl -N), fed by POST /publish over h2 and by the ingest socket:
    the events arrive with the ids the publishes answered, and the body is byte for byte what an
    HTTP/1.1 subscriber of the same topic gets."""
    flags, base = MODES[mode](hh)
    url = f"{base}/events/{topic}"
    with tempfile.NamedTemporaryFile("r", suffix=".hdr") as hdr:
        s2 = Reader(["curl", "-sS", "-N", "--max-time", "60", *flags, "-D", hdr.name, url])
        s1 = Reader(["curl", "-sS", "-N", "--max-time", "60", "--http1.1", f"{hh.base}/events/{topic}"])
        try:
            s2.wait_for(lambda d: d.startswith(b":"), "h2 stream flushed its first comment")
            s1.wait_for(lambda d: d.startswith(b":"), "HTTP/1.1 stream flushed its first comment")
            head = parse_head(Path(hdr.name).read_text())
            assert head[":status-line"].startswith("HTTP/2 200"), head
            assert head["content-type"].startswith("text/event-stream"), head
            assert "no-cache" in head["cache-control"], head
            assert head.get("x-accel-buffering") == "no", head
            for name in ("connection", "keep-alive", "transfer-encoding"):
                assert name not in head, f"connection-specific header {name} on h2: {head}"

            ids = []
            version, status, ctype, _, body = curl(hh, mode, f"/publish/{topic}", method="POST", data="one")
            assert (version, status) == ("2", 200), (version, status, body)
            ids.append(json.loads(body)["id"])
            version, status, _, _, body = curl(hh, mode, f"/publish/{topic}?event=typed&id=h2-{mode}-7",
                                               method="POST", data="two\nlines")
            assert (version, status) == ("2", 200) and json.loads(body) == {"id": f"h2-{mode}-7"}, body
            ids.append(f"h2-{mode}-7")
            reply = hh.publish({"topic": topic, "data": "three"})
            assert reply.strip() == "", reply

            raw2 = s2.wait_for(has_data("three"), "h2 stream got the three events")
            raw1 = s1.wait_for(has_data("three"), "HTTP/1.1 stream got the three events")
            got = sse_events(raw2)
            assert [(e["event"], e["data"]) for e in got] == [
                ("message", "one"), ("typed", "two\nlines"), ("message", "three")], got
            assert [e["id"] for e in got[:2]] == ids, (got, ids)
            assert got[2]["id"] and len({e["id"] for e in got}) == 3, got
            assert raw2 == raw1, f"h2 body differs from the HTTP/1.1 body:\nh2:  {raw2!r}\nh1:  {raw1!r}"
        finally:
            s2.stop()
            s1.stop()


@pytest.mark.parametrize("mode", ["tls", "h2c", "tls-http1.1"])
def test_curl_h2_large_event_both_ways(hh, mode, topic, tmp_path):
    """A 300 KB event, streamed over h2 (DATA frames of at most 16 KB, past the 65,535-byte stream
    window, so curl's WINDOW_UPDATEs must be honoured), then POSTed over h2 (a request body past the
    initial window, so herald must send WINDOW_UPDATE): each arrives whole. tls-http1.1 is the same
    over HTTP/1.1 on the TLS listener, to tell an h2 fault from a TLS one."""
    if mode == "tls-http1.1":
        flags, base, want = ["--http1.1", "--cacert", str(hh.tls["ca"])], hh.tls_base, "1.1"
    else:
        (flags, base), want = MODES[mode](hh), "2"
    data = "".join(chr(ord("a") + i % 26) for i in range(300_000))
    body = tmp_path / "big.txt"
    body.write_text(data)
    s = Reader(["curl", "-sS", "-N", "--max-time", "60", *flags, f"{base}/events/{topic}"])
    try:
        s.wait_for(lambda d: d.startswith(b":"), "stream flushed")
        # Server to client: published on the ingest socket.
        hh.publish([{"topic": topic, "data": data}, {"topic": topic, "data": "after-ingest"}])
        raw = s.wait_for(has_data("after-ingest"), "the large event from ingest, then 'after-ingest'")
        got = sse_events(raw)
        assert [len(e["data"]) for e in got] == [len(data), len("after-ingest")], [len(e["data"]) for e in got]
        assert got[0]["data"] == data
        # Client to server: the same event as a POST body, 5 times (each its own connection).
        ids = []
        for attempt in range(5):
            p = run(["curl", "-sS", "--max-time", "10", *flags, "-w", WOUT, "-X", "POST", "--data-binary", f"@{body}",
                     f"{base}/publish/{topic}"])
            answer, _, w = p.stdout.rpartition("\n__W__ ")
            assert p.returncode == 0 and w.startswith(f"{want} 200"), \
                f"POST {attempt + 1}/5 of {len(data)} bytes: curl exit {p.returncode} {p.stderr.strip()!r}, {w!r}; " + \
                "herald: " + str({k: v for k, v in hh.metrics().items() if k.endswith("errors_total") and v})
            ids.append(json.loads(answer)["id"])
        hh.publish({"topic": topic, "data": "after-post"})
        raw = s.wait_for(has_data("after-post"), "the large events from POST, then 'after-post'")
        got = sse_events(raw)
        assert [(e["id"], e["data"] == data) for e in got[2:7]] == [(i, True) for i in ids], \
            [(e["id"], len(e["data"])) for e in got]
    finally:
        s.stop()


def test_curl_h2_multi_topic_subscription(hh, topic):
    """GET /events?topic=a&topic=b over h2: events of a and b, none of c."""
    a, b, c = f"{topic}-a", f"{topic}-b", f"{topic}-c"
    flags, base = MODES["h2c"](hh)
    s = Reader(["curl", "-sS", "-N", "--max-time", "60", *flags, "-w", "%{http_version}",
                f"{base}/events?topic={a}&topic={b}"])
    try:
        s.wait_for(lambda d: d.startswith(b":"), "multi-topic stream flushed")
        hh.publish([{"topic": c, "data": "c1"}, {"topic": a, "data": "a1"}, {"topic": c, "data": "c2"},
                    {"topic": b, "data": "b1"}, {"topic": a, "data": "end"}])
        raw = s.wait_for(has_data("end"), "a1, b1, end")
        assert [e["data"] for e in sse_events(raw)] == ["a1", "b1", "end"], raw
    finally:
        s.stop()


@pytest.mark.parametrize("mode", ["tls", "h2c"])
def test_curl_cors_over_h2(hh, mode, topic):
    """CORS over h2 with --cors-origins: the preflight for an EventSource with Last-Event-ID is
    answered for the listed origin (same status and CORS headers as over HTTP/1.1), a stream
    answers Access-Control-Allow-Origin for it, an unlisted origin gets none."""
    pre = ["-H", f"Origin: {ORIGIN}", "-H", "Access-Control-Request-Method: GET",
           "-H", "Access-Control-Request-Headers: last-event-id, cache-control"]
    version, status, _, head, _ = curl(hh, mode, f"/events/{topic}", *pre, method="OPTIONS")
    assert version == "2" and 200 <= status < 300, (version, status, head)
    assert head.get("access-control-allow-origin") == ORIGIN, head
    allowed = {x.strip().lower() for x in head.get("access-control-allow-headers", "").split(",")}
    assert {"last-event-id", "cache-control"} <= allowed, head
    assert "GET" in head.get("access-control-allow-methods", ""), head

    # The same preflight over HTTP/1.1: same status, same CORS headers.
    with tempfile.NamedTemporaryFile("r", suffix=".hdr") as hdr:
        p = run(["curl", "-sS", "--http1.1", "-X", "OPTIONS", "-D", hdr.name, "-o", os.devnull,
                 *pre, f"{hh.base}/events/{topic}"])
        assert p.returncode == 0, p.stderr
        h1 = parse_head(Path(hdr.name).read_text())
    assert h1[":status-line"].split()[1] == str(status), (h1, status)
    cors = lambda hd: {k: v for k, v in hd.items() if k.startswith("access-control-") or k == "vary"}
    assert cors(head) == cors(h1), f"h2 {cors(head)} != HTTP/1.1 {cors(h1)}"

    # A GET stream with the listed Origin (curl --max-time ends it; we want only the head).
    flags, base = MODES[mode](hh)
    for origin, want in ((ORIGIN, ORIGIN), (OTHER_ORIGIN, None)):
        with tempfile.NamedTemporaryFile("r", suffix=".hdr") as hdr:
            p = run(["curl", "-sS", "-N", "--max-time", "1", *flags, "-D", hdr.name, "-o", os.devnull,
                     "-H", f"Origin: {origin}", f"{base}/events/{topic}"])
            assert p.returncode == 28, f"the stream stays open until --max-time: {p.returncode} {p.stderr}"
            gh = parse_head(Path(hdr.name).read_text())
        assert gh[":status-line"].startswith("HTTP/2 200"), gh
        assert gh.get("access-control-allow-origin") == want, (origin, gh)


@pytest.mark.parametrize("mode", ["tls", "h2c"])
def test_curl_h2_error_statuses(hh, mode):
    """Bad requests get the HTTP/1.1 statuses over h2 too."""
    assert curl(hh, mode, "/nope")[:2] == ("2", 404)
    assert curl(hh, mode, "/events")[:2] == ("2", 400)
    assert curl(hh, mode, "/events/bad%20topic")[:2] == ("2", 400)
    assert curl(hh, mode, "/events/x", method="DELETE")[:2] == ("2", 405)
    version, status, ctype, _, body = curl(hh, mode, "/")
    assert (version, status) == ("2", 200) and ctype.startswith("text/html"), (version, status, ctype)
    assert "EventSource" in body


# ---------------------------------------------------------------- nghttp, h2load

NG_DATA = re.compile(rb"\[\s*[\d.]+\] recv DATA frame <length=(\d+), flags=(0x[0-9a-f]+), stream_id=(\d+)>\n")
NG_SEND_HEADERS = re.compile(r"send HEADERS frame <[^>]*stream_id=(\d+)>\n(?:\s+[;(].*\n)*(?:\s+:method: GET\n)\s+:path: (\S+)\n")
NG_STATUS = re.compile(rb"recv \(stream_id=(\d+)\) :status: (\d+)")


def nghttp_streams(raw: bytes):
    """From `nghttp -v` output: {stream_id: bytes of its DATA frames}. nghttp writes a DATA frame's
    payload to stdout, then logs the frame (with its length and stream): the payload is the
    `length` bytes right before that log line."""
    out = {}
    for m in NG_DATA.finditer(raw):
        n, flags, sid = int(m.group(1)), int(m.group(2), 16), int(m.group(3))
        assert not flags & 0x8, f"padded DATA frame: {m.group(0)!r}"
        out.setdefault(sid, bytearray()).extend(raw[m.start() - n:m.start()])
    return {k: bytes(v) for k, v in out.items()}


@pytest.mark.parametrize("mode", ["h2c", "tls"])
def test_nghttp_100_streams_on_one_connection(hh, mode, topic):
    """nghttp opens 100 event streams on ONE connection, each to its own topic; two events
    are published to every topic; every stream gets exactly its own topic's two events."""
    n = 100
    topics = [f"{topic}-{i}" for i in range(n)]
    base = f"https://localhost:{hh.tls_port}" if mode == "tls" else hh.base
    # nghttp verifies the certificate against the default store: point it at the test CA.
    env = {**os.environ, "SSL_CERT_FILE": str(hh.tls["ca"])}
    ng = Reader(["nghttp", "-v", "--no-dep", "-t", "60s", *[f"{base}/events/{t}" for t in topics]], env=env)
    try:
        opened = lambda d: len({s for s, st in NG_STATUS.findall(d) if st == b"200"}) >= n and \
            sum(1 for v in nghttp_streams(d).values() if v.startswith(b":")) >= n
        raw = ng.wait_for(opened, f"{n} streams answered 200 and flushed")
        text = raw.decode("utf-8", "replace")
        assert text.count("] Connected") == 1, "one connection"
        assert "The negotiated protocol: h2" in text or mode == "h2c", text[:2000]
        assert "Certificate verification failed" not in text, "nghttp must verify herald's certificate"
        paths = {int(sid): p for sid, p in NG_SEND_HEADERS.findall(text)}
        assert sorted(paths.values()) == sorted(f"/events/{t}" for t in topics), f"{len(paths)} requests"
        statuses = {int(s): int(st) for s, st in NG_STATUS.findall(raw)}
        assert all(statuses.get(sid) == 200 for sid in paths), statuses

        events = []
        for i, t in enumerate(topics):
            events += [{"topic": t, "data": f"{t}:first"}, {"topic": t, "data": f"{t}:second\nline"}]
        reply = hh.publish(events)
        assert reply.strip() == "", reply
        want = {sid: [f"{p.rsplit('/', 1)[1]}:first", f"{p.rsplit('/', 1)[1]}:second\nline"] for sid, p in paths.items()}

        def all_in(d):
            got = nghttp_streams(d)
            return all([e["data"] for e in sse_events(got.get(sid, b""))][-1:] == w[-1:] for sid, w in want.items())
        raw = ng.wait_for(all_in, "every stream got its topic's second event")
        got = nghttp_streams(raw)
        for sid, w in want.items():
            evs = sse_events(got[sid])
            assert [e["data"] for e in evs] == w, f"stream {sid} ({paths[sid]}): {evs}"
            assert all(e["id"] for e in evs), evs
        assert set(got) == set(paths), f"DATA only on the 100 request streams: {sorted(set(got) - set(paths))}"
    finally:
        ng.stop()


NG_END = re.compile(rb"\[\s*[\d.]+\] recv (?:DATA|HEADERS) frame <[^>]*flags=(0x[0-9a-f]+), stream_id=(\d+)>")
NG_RST = re.compile(rb"recv RST_STREAM frame <[^>]*stream_id=(\d+)>\n\s+\(error_code=(\w+)")


@pytest.mark.parametrize("mode", ["h2c", "tls"])
def test_nghttp_streams_end_cleanly_on_sigterm(pki, mode):
    """SIGTERM drains h2 streams like HTTP/1.1 ones: after what was published, each stream of one
    connection gets a retry: hint no shorter than --retry, then ends with END_STREAM (not
    RST_STREAM), and nghttp finishes every request and exits 0."""
    h = Herald(tls={"pairs": [pki.pair("localhost")], "ca": pki.ca},
               extra_args=["--drain-window", "300ms", "--retry", "1500"]).start()
    base = f"https://localhost:{h.tls_port}" if mode == "tls" else h.base
    topics = [f"drain-{mode}-{i}" for i in range(5)]
    ng = Reader(["nghttp", "-v", "--no-dep", "-t", "60s", *[f"{base}/events/{t}" for t in topics]],
                env={**os.environ, "SSL_CERT_FILE": str(pki.ca)})
    try:
        ng.wait_for(lambda d: len(NG_STATUS.findall(d)) >= len(topics), "5 streams answered")
        h.publish([{"topic": t, "data": f"{t}:last"} for t in topics])
        ng.wait_for(lambda d: all(f"{t}:last".encode() in d for t in topics), "events before the drain")
        code = h.stop()
        assert code == 0, f"herald exit {code}\n{h.logs()}"
        assert ng.proc.wait(WAIT) == 0, f"nghttp exit {ng.proc.returncode}: {ng.err[-2000:]!r}"
        raw = ng.data()
        assert not NG_RST.findall(raw), f"streams reset instead of ended: {NG_RST.findall(raw)}"
        text = raw.decode("utf-8", "replace")
        paths = {int(sid): p for sid, p in NG_SEND_HEADERS.findall(text)}
        ended = {int(sid) for flags, sid in NG_END.findall(raw) if int(flags, 16) & 0x1}
        assert set(paths) <= ended, f"END_STREAM on every stream: {sorted(ended)} of {sorted(paths)}"
        for sid, body in nghttp_streams(raw).items():
            tail = body.decode().split(":last\n\n", 1)[-1]
            retries = [int(x) for x in re.findall(r"^retry: (\d+)$", tail, re.M)]
            assert retries and max(retries) >= 1500, f"stream {sid} ({paths.get(sid)}): retry hint after the events: {body!r}"
    finally:
        ng.stop()
        if h.proc is not None:
            h.stop()


@pytest.mark.parametrize("mode", ["h2c", "tls"])
def test_h2load_smoke(hh, mode):
    """h2load -n 200 -c 4 -m 10 against /healthz: every request succeeds, over h2 (h2c)."""
    url = f"https://localhost:{hh.tls_port}/healthz" if mode == "tls" else f"{hh.base}/healthz"
    p = run(["h2load", "-n", "200", "-c", "4", "-m", "10", url], timeout=60)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    proto = re.search(r"Application protocol: (\S+)", out)
    assert proto and proto.group(1) == ("h2" if mode == "tls" else "h2c"), out
    assert "requests: 200 total, 200 started, 200 done, 200 succeeded, 0 failed, 0 errored, 0 timeout" in out, out
    assert "status codes: 200 2xx, 0 3xx, 0 4xx, 0 5xx" in out, out


# ---------------------------------------------------------------- httpx (h2)

def h2_client_kwargs(h, mode):
    if mode == "tls":
        return {"http2": True, "verify": h.tls_context()}, h.tls_base
    # Cleartext: httpx speaks h2 with prior knowledge when HTTP/1.1 is off.
    return {"http1": False, "http2": True}, h.base


def pool_connections(client):
    """The open connections of an httpx client's pool (httpcore internals, for the one-connection check)."""
    return list(client._transport._pool.connections)


@pytest.mark.parametrize("mode", ["tls", "h2c"])
def test_httpx_h2_concurrent_streams_one_connection(hh, mode, topic):
    """Several SSE streams at once on one httpx AsyncClient (http2=True): all HTTP/2, all on one
    connection, each gets its own topic's events (published by POST over a second h2 client).

    The POSTs use a client of their own on purpose: httpcore's async HTTP/2 lets one stream's
    reader hold the connection's read lock while it waits for the socket, so on a connection whose
    other streams are idle event streams a queued POST response can wait for a read timeout
    (an httpcore limitation, seen on the wire: herald had sent the response)."""
    kwargs, base = h2_client_kwargs(hh, mode)
    n = 8
    topics = [f"{topic}-{i}" for i in range(n)]

    async def main():
        async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT, **kwargs) as client, \
                httpx.AsyncClient(timeout=CLIENT_TIMEOUT, **kwargs) as publisher:
            opened = asyncio.Event()
            ready = []

            async def sub(t):
                async with aconnect_sse(client, "GET", f"{base}/events/{t}") as es:
                    assert es.response.http_version == "HTTP/2", es.response.http_version
                    assert es.response.status_code == 200
                    assert es.response.headers["content-type"].startswith("text/event-stream")
                    ready.append(t)
                    if len(ready) == n:
                        opened.set()
                    got = []
                    async for sse in es.aiter_sse():
                        got.append((sse.data, sse.id))
                        if sse.data == f"{t}:end":
                            return got

            tasks = [asyncio.create_task(sub(t)) for t in topics]
            await asyncio.wait_for(opened.wait(), WAIT)
            conns = pool_connections(client)
            assert len(conns) == 1, f"one connection for {n} streams: {conns}"
            ids = {}
            for t in topics:
                r = await publisher.post(f"{base}/publish/{t}", content=f"{t}:hello".encode())
                assert r.http_version == "HTTP/2" and r.status_code == 200, (r.http_version, r.status_code, r.text)
                ids[t] = r.json()["id"]
            hh.publish([{"topic": t, "data": f"{t}:end"} for t in topics])
            results = await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
            assert len(pool_connections(client)) == 1
            assert len(pool_connections(publisher)) == 1, "the POSTs shared one h2 connection too"
            return ids, results

    ids, results = asyncio.run(main())
    for t, got in zip(topics, results):
        assert [d for d, _ in got] == [f"{t}:hello", f"{t}:end"], (t, got)
        assert got[0][1] == ids[t], (t, got, ids[t])


@pytest.mark.parametrize("mode", ["tls", "h2c"])
def test_httpx_h2_resume_with_last_event_id(hh, mode, topic):
    """Resume over h2 with Last-Event-ID: exactly the events after it, then live; no gap, no duplicate."""
    kwargs, base = h2_client_kwargs(hh, mode)
    with httpx.Client(timeout=CLIENT_TIMEOUT, **kwargs) as client:
        with connect_sse(client, "GET", f"{base}/events/{topic}") as es:
            assert es.response.http_version == "HTTP/2"
            hh.publish({"topic": topic, "data": "r0"})
            for sse in es.iter_sse():
                if sse.data == "r0":
                    x = sse.id
                    break
        assert x, "r0 carries an id"
        hh.publish([{"topic": topic, "data": f"r{i}"} for i in (1, 2, 3)])
        r = client.post(f"{base}/publish/{topic}", content=b"r4")
        assert r.http_version == "HTTP/2" and r.status_code == 200 and r.json().get("id"), r.text
        got = []
        with connect_sse(client, "GET", f"{base}/events/{topic}", headers={"Last-Event-ID": x}) as es:
            assert es.response.http_version == "HTTP/2"
            assert es.response.status_code == 200
            hh.publish({"topic": topic, "data": "live"})
            deadline = time.monotonic() + WAIT
            for sse in es.iter_sse():
                got.append(sse)
                if sse.data == "live":
                    break
                assert time.monotonic() < deadline, got
        assert len(pool_connections(client)) == 1, "both streams and the publish on one h2 connection"
    assert [(e.event, e.data) for e in got] == [
        ("message", "r1"), ("message", "r2"), ("message", "r3"), ("message", "r4"), ("message", "live")], \
        [(e.event, e.data, e.id) for e in got]
    ids = [x] + [e.id for e in got]
    assert len(set(ids)) == len(ids), ids


# ---------------------------------------------------------------- h2 frames: --h2-max-streams

class RawH2:
    """A bare HTTP/2 client on the `h2` package, for what ordinary clients never do (open more
    streams than the server allows, reset and open in one write). Collects what it receives."""

    def __init__(self, h, initial_window=None):
        self.h = h
        self.sock = socket.create_connection(("127.0.0.1", h.listen_port), timeout=5)
        self.conn = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        if initial_window is not None:
            self.conn.local_settings = h2.settings.Settings(
                client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: initial_window})
        self.conn.initiate_connection()
        self.no_ack = set()  # streams whose DATA is never acknowledged (their window stays shut)
        self.status, self.refused, self.other_resets, self.body, self.settings = {}, {}, {}, {}, {}
        self.pings = 0

    def get(self, sid, path):
        """Queue a GET on stream `sid` (nothing is sent until flush())."""
        self.conn.send_headers(sid, [(":method", "GET"), (":scheme", "http"),
                                     (":authority", f"127.0.0.1:{self.h.listen_port}"), (":path", path)],
                               end_stream=True)

    def flush(self):
        out = self.conn.data_to_send()
        if out:
            self.sock.sendall(out)

    def pump(self, until, what):
        deadline = time.monotonic() + WAIT
        while not until():
            assert time.monotonic() < deadline, \
                f"{what}: status {self.status} refused {self.refused} resets {self.other_resets}\n{self.h.logs()}"
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            assert data, f"{what}: server closed the connection\n{self.h.logs()}"
            for ev in self.conn.receive_data(data):
                if isinstance(ev, h2.events.RemoteSettingsChanged):
                    self.settings.update({k: v.new_value for k, v in ev.changed_settings.items()})
                elif isinstance(ev, h2.events.ResponseReceived):
                    self.status[ev.stream_id] = dict(ev.headers)[":status"]
                elif isinstance(ev, h2.events.DataReceived):
                    self.body[ev.stream_id] = self.body.get(ev.stream_id, b"") + ev.data
                    if ev.stream_id not in self.no_ack:
                        self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamReset):
                    bucket = self.refused if ev.error_code == h2.errors.ErrorCodes.REFUSED_STREAM else self.other_resets
                    bucket[ev.stream_id] = ev.error_code
                elif isinstance(ev, h2.events.PingAckReceived):
                    self.pings += 1
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    raise AssertionError(f"{what}: GOAWAY {ev.error_code}: {ev.additional_data}\n{self.h.logs()}")
            self.flush()

    def round_trip(self):
        """PING and wait for its ACK: herald has read everything sent before it."""
        n = self.pings
        self.conn.ping(b"herald!!")
        self.flush()
        self.pump(lambda: self.pings > n, "PING ACK")

    def open_six_of_four(self):
        """Open streams 1..11 (6 event streams) in one write, before reading the server's SETTINGS."""
        for i in range(6):
            self.get(1 + 2 * i, f"/events/max-{i}")
        self.flush()
        self.pump(lambda: len(self.status) + len(self.refused) + len(self.other_resets) >= 6,
                  "6 streams answered or refused")
        self.pump(lambda: all(self.body.get(s, b"").startswith(b":") for s in self.status), "open streams flushed")

    def close(self):
        self.sock.close()


@pytest.fixture
def max4():
    h = Herald(extra_args=["--h2-max-streams", "4"]).start()
    yield h
    code = h.stop()
    assert code == 0, f"herald exit {code}\n{h.logs()}"


def test_h2_max_streams_refuses_extra_streams(max4):
    """With --h2-max-streams 4 (announced in SETTINGS), a client that opens 6 streams at once
    (before it has read the server's SETTINGS) gets 4 event streams and RST_STREAM REFUSED_STREAM
    for the other 2; the connection stays usable: once herald has read a client's RST_STREAM on one
    stream (a PING round trip later), a new stream is answered 200 and streams."""
    c = RawH2(max4)
    try:
        c.open_six_of_four()
        assert c.settings.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS) == 4, c.settings
        assert sorted(c.status) == [1, 3, 5, 7] and set(c.status.values()) == {"200"}, c.status
        assert sorted(c.refused) == [9, 11] and not c.other_resets, (c.refused, c.other_resets)
        c.conn.reset_stream(3, h2.errors.ErrorCodes.CANCEL)
        c.flush()
        c.round_trip()
        c.get(13, "/events/max-again")
        c.flush()
        c.pump(lambda: 13 in c.status or 13 in c.refused, "stream 13 answered")
        assert c.status.get(13) == "200", (c.status, c.refused)
        max4.publish([{"topic": "max-again", "data": "fits"}, {"topic": "max-0", "data": "still"}])
        c.pump(lambda: b"data: fits" in c.body.get(13, b"") and b"data: still" in c.body.get(1, b""),
               "streams 13 and 1 got their events")
    finally:
        c.close()


def test_h2_reset_frees_its_slot_within_the_same_read(max4):
    """At the --h2-max-streams limit, RST_STREAM on one stream followed by HEADERS for a new one in
    the SAME write: the reset stream is closed when its RST_STREAM is read (RFC 9113 5.1.2: closed
    streams do not count), so the new stream fits and must be answered 200, not REFUSED_STREAM."""
    c = RawH2(max4)
    try:
        c.open_six_of_four()
        assert sorted(c.status) == [1, 3, 5, 7], c.status
        c.conn.reset_stream(3, h2.errors.ErrorCodes.CANCEL)
        c.get(13, "/events/max-same-write")
        c.flush()  # one write: RST_STREAM(3) + HEADERS(13)
        c.pump(lambda: 13 in c.status or 13 in c.refused, "stream 13 answered")
        assert c.status.get(13) == "200", \
            f"stream 13 refused although stream 3 was reset just before it: status {c.status} refused {c.refused}"
    finally:
        c.close()


def test_h2_stream_with_shut_window_does_not_block_its_connection():
    """Flow control per stream: on one connection, a stream whose window the client never reopens
    (initial window 256 bytes) does not hold up the other stream's events; past --write-timeout
    herald resets that stream alone (RST_STREAM, no GOAWAY) and the other one keeps streaming."""
    h = Herald(extra_args=["--write-timeout", "2s"]).start()
    c = RawH2(h, initial_window=256)
    try:
        c.no_ack.add(1)
        c.get(1, "/events/shut-a")
        c.get(3, "/events/open-b")
        c.flush()
        c.pump(lambda: c.status.get(1) == "200" and c.status.get(3) == "200", "both streams answered")
        h.publish([{"topic": "shut-a", "data": f"a{i:03d}-" + "x" * 100} for i in range(40)])
        h.publish([{"topic": "open-b", "data": f"b{i}-" + "y" * 100} for i in range(20)])
        c.pump(lambda: b"data: b19-" in c.body.get(3, b""), "stream 3 got all 20 events while stream 1 is shut")
        assert len(c.body.get(1, b"")) <= 256, f"stream 1 got more than its window: {len(c.body[1])} bytes"
        c.pump(lambda: 1 in c.other_resets or 1 in c.refused, "herald resets the shut stream after --write-timeout")
        assert 3 not in c.other_resets, c.other_resets
        h.publish({"topic": "open-b", "data": "after"})
        c.pump(lambda: b"data: after" in c.body.get(3, b""), "stream 3 still streams after stream 1's reset")
        evs = sse_events(c.body[3])
        assert [e["data"].split("-")[0] for e in evs] == [f"b{i}" for i in range(20)] + ["after"], evs
        c.close()
    finally:
        code = h.stop()
        assert code == 0, f"herald exit {code}\n{h.logs()}"
