"""herald over TLS against clients nobody here wrote: Python's `ssl` module (raw sockets),
httpx + httpx-sse, `curl` and `openssl s_client`.

Every client trusts only a test CA made fresh for this run (tests/clients/tls-fixture.sh,
the `pki` fixture); verification is never turned off, and a client without the CA is shown
to fail.

Run: HERALD_BIN=target/release/herald HERALD_BACKEND=epoll tests/clients/.venv/bin/pytest tests/clients/test_tls.py
"""
import os
import queue
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import warnings

import httpx
import pytest
from httpx_sse import connect_sse

from conftest import TIMEOUT, Herald

CLIENT_TIMEOUT = httpx.Timeout(TIMEOUT, connect=5.0)
PLAIN_400_BODY = "This port speaks TLS: use https:// to reach it here."


@pytest.fixture(scope="module")
def th(pki):
    """herald with the plaintext listener, a TLS listener with two pairs (localhost first,
    the default; other.test second) and --hsts 1d."""
    h = Herald(tls={"pairs": [pki.pair("localhost"), pki.pair("other")], "ca": pki.ca, "hsts": "1d"}).start()
    yield h
    code = h.stop()
    assert code == 0, f"herald should exit 0 on SIGTERM, got {code}\n{h.logs()}"


# ---------------------------------------------------------------- helpers

def tls_connect(port, server_hostname, ctx, timeout=5.0):
    """TCP connect to 127.0.0.1:port and run the TLS handshake; returns the SSLSocket."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        return ctx.wrap_socket(sock, server_hostname=server_hostname)
    except BaseException:
        sock.close()
        raise


def read_to_eof(sock, deadline_s=5.0, reset_ok=True):
    """Read until the peer closes; a reset counts as closed unless reset_ok=False. Fails if still
    open at the deadline."""
    data = b""
    deadline = time.monotonic() + deadline_s
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"connection still open after {deadline_s}s; got {data[:200]!r}"
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            if not reset_ok:
                raise
            return data
        except socket.timeout:
            continue
        if not chunk:
            return data
        data += chunk


def http_over(sock, path, extra=b""):
    """One HTTP/1.1 request with Connection: close on an open (TLS) socket; returns (status, headers, body)."""
    sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + extra + b"\r\n")
    raw = read_to_eof(sock)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
    return status, headers, body


def peer(sock):
    """(serial, [SAN values], subject CN) of the certificate the server sent."""
    cert = sock.getpeercert()
    sans = [v for _, v in cert.get("subjectAltName", ())]
    cn = dict(x[0] for x in cert["subject"]).get("commonName", "")
    return cert["serialNumber"], sans, cn


def chain_only_ctx(ca):
    """Trusts the CA and verifies the chain, but does not check the name: for SNI tests, where the
    question is which certificate herald picks for a name, not whether the client accepts it."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def read_until(events, stop, deadline_s=20.0):
    got = []
    deadline = time.monotonic() + deadline_s
    for sse in events:
        got.append(sse)
        if stop(sse):
            return got
        assert time.monotonic() < deadline, f"no stop event within {deadline_s}s: {[(e.event, e.data) for e in got]}"
    raise AssertionError(f"stream ended before the stop event: {[(e.event, e.data) for e in got]}")


def counter_bump(h, name):
    """Remember a counter now; returns a function that waits until it has grown by n."""
    base = h.metric(name)

    def wait(n=1, what=""):
        return h.wait_metric(name, lambda v: v >= base + n, what or f"{name} to grow by {n}")

    return wait


def tls11_context(ca):
    """A client context that offers TLS 1.0/1.1 only, or None if the local OpenSSL cannot."""
    ctx = ssl.create_default_context(cafile=str(ca))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
            # OpenSSL 3 forbids TLS < 1.2 at the default security level: lower it, or the client
            # never sends a ClientHello and the test would prove nothing about herald.
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        except (ValueError, ssl.SSLError):
            return None
    return ctx


# ---------------------------------------------------------------- httpx / httpx-sse

def test_httpx_sse_over_tls_events_ids_hsts_resume(th, topic):
    handshakes = counter_bump(th, "herald_tls_handshakes_total")
    with httpx.Client(timeout=CLIENT_TIMEOUT, verify=th.tls_context()) as client:
        with connect_sse(client, "GET", f"{th.tls_base}/events/{topic}") as es:
            r = es.response
            assert r.status_code == 200
            assert r.http_version == "HTTP/1.1"
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers.get("strict-transport-security") == "max-age=86400", \
                f"--hsts 1d on a TLS response: {dict(r.headers)}"
            th.publish([{"topic": topic, "data": "tls-1"}, {"topic": topic, "data": "a\nb"}])
            # POST /publish over TLS too (from 127.0.0.1, so allowed)
            pr = client.post(f"{th.tls_base}/publish/{topic}", content=b"tls-3")
            assert pr.status_code == 200, pr.text
            pub_id = pr.json()["id"]
            got = read_until(es.iter_sse(), lambda e: e.data == "tls-3")
    assert [(e.event, e.data) for e in got] == [("message", "tls-1"), ("message", "a\nb"), ("message", "tls-3")]
    ids = [e.id for e in got]
    assert all(ids) and len(set(ids)) == 3, ids
    assert ids[-1] == pub_id, "lastEventId is the id POST /publish answered over TLS"
    handshakes(1, "the stream was served over a TLS handshake herald counted")

    # Resume over a new TLS connection with Last-Event-ID: exactly the later events.
    th.publish([{"topic": topic, "data": f"later-{i}"} for i in (1, 2)])
    with httpx.Client(timeout=CLIENT_TIMEOUT, verify=th.tls_context()) as client:
        with connect_sse(client, "GET", f"{th.tls_base}/events/{topic}", headers={"Last-Event-ID": ids[-1]}) as es:
            th.publish({"topic": topic, "data": "live"})
            got2 = read_until(es.iter_sse(), lambda e: e.data == "live")
    assert [(e.event, e.data) for e in got2] == [("message", "later-1"), ("message", "later-2"), ("message", "live")]


def test_multi_topic_stream_and_demo_page_over_tls(th, topic):
    with httpx.Client(timeout=CLIENT_TIMEOUT, verify=th.tls_context()) as client:
        page = client.get(f"{th.tls_base}/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        with connect_sse(client, "GET", f"{th.tls_base}/events", params=[("topic", f"{topic}-a"), ("topic", f"{topic}-b")]) as es:
            assert es.response.status_code == 200
            th.publish([{"topic": f"{topic}-a", "data": "A"}, {"topic": f"{topic}-b", "data": "B"},
                        {"topic": f"{topic}-a", "data": "end"}])
            got = read_until(es.iter_sse(), lambda e: e.data == "end")
    assert [e.data for e in got] == ["A", "B", "end"]


def test_hsts_only_on_tls_responses(th):
    plain = httpx.get(f"{th.base}/healthz", timeout=TIMEOUT)
    assert plain.status_code == 200 and plain.text.strip() == "ok"
    assert "strict-transport-security" not in plain.headers, "no HSTS over plain HTTP (RFC 6797 7.2)"
    tls = httpx.get(f"{th.tls_base}/healthz", timeout=TIMEOUT, verify=th.tls_context())
    assert tls.status_code == 200 and tls.text.strip() == "ok"
    assert tls.headers.get("strict-transport-security") == "max-age=86400"


def test_httpx_without_the_test_ca_refuses_the_certificate(th):
    """Negative control: the system trust store does not know the test CA, so verification is real."""
    with pytest.raises(httpx.ConnectError) as ei:
        httpx.get(f"{th.tls_base}/healthz", timeout=TIMEOUT)  # default verify=True (certifi)
    assert "CERTIFICATE_VERIFY_FAILED" in str(ei.value), str(ei.value)


# ---------------------------------------------------------------- ssl module, raw sockets

def test_ssl_alpn_http11_tls13_and_tls12(th):
    ctx = th.tls_context()
    ctx.set_alpn_protocols(["http/1.1"])
    with tls_connect(th.tls_port, "localhost", ctx) as s:
        assert s.selected_alpn_protocol() == "http/1.1"
        assert s.version() == "TLSv1.3"
        status, headers, body = http_over(s, "/healthz")
        assert (status, body.strip()) == (200, b"ok"), (status, body)
    ctx12 = th.tls_context()
    ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx12.set_alpn_protocols(["http/1.1"])
    with tls_connect(th.tls_port, "localhost", ctx12) as s:
        assert s.version() == "TLSv1.2", "TLS 1.2 is still served"
        assert s.selected_alpn_protocol() == "http/1.1"
        status, _, body = http_over(s, "/healthz")
        assert status == 200 and body.strip() == b"ok"


def test_ssl_alpn_prefers_h2_and_refuses_unknown_protocols(th):
    ctx = th.tls_context()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with tls_connect(th.tls_port, "localhost", ctx) as s:
        assert s.selected_alpn_protocol() == "h2", "herald offers h2 first"
    ctx = th.tls_context()
    ctx.set_alpn_protocols(["h3"])
    with pytest.raises(ssl.SSLError) as ei:
        with tls_connect(th.tls_port, "localhost", ctx) as s:
            pytest.fail(f"agreed to {s.selected_alpn_protocol()!r}")
    assert "NO_APPLICATION_PROTOCOL" in str(ei.value) or "alert" in str(ei.value).lower(), str(ei.value)


def test_ssl_tls11_and_lower_refused(th, pki):
    ctx = tls11_context(pki.ca)
    if ctx is None:
        pytest.skip("the local OpenSSL cannot set maximum_version=TLSv1_1; TLS 1.1 refusal not checked")
    incompatible = counter_bump(th, "herald_tls_incompatible_total")
    try:
        with tls_connect(th.tls_port, "localhost", ctx) as s:
            pytest.fail(f"a TLS 1.1-only client completed a handshake: {s.version()}")
    except ssl.SSLError as e:
        if any(x in str(e) for x in ("NO_PROTOCOLS_AVAILABLE", "NO_CIPHERS_AVAILABLE", "no protocols available")):
            pytest.skip(f"the local OpenSSL refuses to offer TLS 1.1 at all ({e}); TLS 1.1 refusal not checked")
        assert "alert" in str(e).lower(), f"herald should refuse with an alert: {e}"
    incompatible(1, "herald counted the TLS 1.1 ClientHello as incompatible")


def test_sni_selects_the_certificate(th, pki):
    ctx = chain_only_ctx(pki.ca)
    with tls_connect(th.tls_port, "other.test", ctx) as s:
        serial, sans, cn = peer(s)
        assert (serial, sans) == (pki.serial("other"), ["other.test"]), (serial, sans, cn)
    with tls_connect(th.tls_port, "localhost", ctx) as s:
        serial, sans, _ = peer(s)
        assert (serial, sans) == (pki.serial("localhost"), ["localhost", "127.0.0.1"]), (serial, sans)
    # Hostname checking on: each name verifies against the certificate herald picked for it.
    for name in ("other.test", "localhost"):
        with tls_connect(th.tls_port, name, th.tls_context()) as s:
            status, _, body = http_over(s, "/healthz")
            assert status == 200 and body.strip() == b"ok"


def test_no_sni_gets_the_first_pair(th, pki):
    # Python sends no SNI for an IP address; hostname checking still verifies the IP SAN.
    with tls_connect(th.tls_port, "127.0.0.1", th.tls_context()) as s:
        assert peer(s)[0] == pki.serial("localhost"), "no SNI: the first --tls-cert"
    # Swap the order: now other.test is the default.
    h = Herald(tls={"pairs": [pki.pair("other"), pki.pair("localhost")], "ca": pki.ca}).start()
    try:
        with tls_connect(h.tls_port, None, chain_only_ctx(pki.ca)) as s:
            assert peer(s)[0] == pki.serial("other"), "no SNI: the first --tls-cert (other.test this time)"
        with tls_connect(h.tls_port, "localhost", th.tls_context()) as s:
            assert peer(s)[0] == pki.serial("localhost"), "SNI localhost still picks the second pair"
    finally:
        assert h.stop() == 0, h.logs()


def test_unknown_sni_fails_the_handshake(th, pki):
    unknown = counter_bump(th, "herald_tls_unknown_name_total")
    # No hostname check: if herald fell back to the default certificate, this handshake would succeed.
    with pytest.raises(ssl.SSLError) as ei:
        with tls_connect(th.tls_port, "nope.test", chain_only_ctx(pki.ca)) as s:
            pytest.fail(f"handshake for an unknown name succeeded, cert {peer(s)}")
    assert "alert" in str(ei.value).lower(), str(ei.value)
    unknown(1, "herald counted the unknown SNI name")


def test_plain_http_to_the_tls_port_gets_400(th):
    plain = counter_bump(th, "herald_tls_plain_http_total")
    with socket.create_connection(("127.0.0.1", th.tls_port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        raw = read_to_eof(s)  # herald closes after the answer
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), raw[:200]
    assert b"connection: close" in head.lower(), head
    assert body.decode().strip() == PLAIN_400_BODY
    plain(1, "plain HTTP on the TLS port was counted")


GARBAGE = [
    ("binary junk", b"\x00\xff" * 64),
    ("a handshake record too short for a ClientHello", b"\x16\x03\x01\x00\x05hello"),
    ("an application-data record before any handshake", b"\x17\x03\x03\x00\x10" + b"x" * 16),
    ("an SSLv2-style hello", b"\x80\x2e\x01\x00\x02" + b"\x00" * 46),
]


def test_garbage_and_plain_http_do_not_disturb_a_tls_subscriber(th, topic):
    errors = counter_bump(th, "herald_tls_protocol_errors_total")
    plain = counter_bump(th, "herald_tls_plain_http_total")
    with httpx.Client(timeout=CLIENT_TIMEOUT, verify=th.tls_context()) as client:
        with connect_sse(client, "GET", f"{th.tls_base}/events/{topic}") as es:
            events = es.iter_sse()
            th.publish({"topic": topic, "data": "before"})
            assert next(events).data == "before"
            for what, junk in GARBAGE:
                with socket.create_connection(("127.0.0.1", th.tls_port), timeout=5) as s:
                    s.sendall(junk)
                    reply = read_to_eof(s)  # closed (maybe after an alert record), within the deadline
                    assert reply == b"" or reply[:1] == b"\x15", f"{what}: expected nothing or a TLS alert, got {reply[:50]!r}"
            errors(len(GARBAGE), "every garbage connection counted as a TLS protocol error")
            with socket.create_connection(("127.0.0.1", th.tls_port), timeout=5) as s:
                s.sendall(b"GET /events/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert read_to_eof(s).startswith(b"HTTP/1.1 400")
            plain(1)
            th.publish([{"topic": topic, "data": "after-1"}, {"topic": topic, "data": "after-2"}])
            assert [next(events).data, next(events).data] == ["after-1", "after-2"], \
                "the established TLS stream keeps receiving, in order"


def test_incomplete_handshake_is_closed_by_head_timeout(pki):
    h = Herald(tls={"pairs": [pki.pair("localhost")], "ca": pki.ca}, extra_args=["--head-timeout", "500ms"]).start()
    try:
        timeouts = counter_bump(h, "herald_tls_handshake_timeouts_total")
        with socket.create_connection(("127.0.0.1", h.tls_port), timeout=5) as s:
            s.sendall(b"\x16\x03\x01\x02\x00\x01")  # a record header promising 512 bytes, never sent
            t0 = time.monotonic()
            read_to_eof(s, deadline_s=5.0)
            assert time.monotonic() - t0 < 4.0
        timeouts(1, "the stalled handshake was counted as a handshake timeout")
    finally:
        assert h.stop() == 0, h.logs()


def test_listen_off_serves_everything_over_tls(pki, topic):
    h = Herald(plain=False, tls={"pairs": [pki.pair("localhost")], "ca": pki.ca}).start()
    try:
        assert h.listen_port is None and "--listen" in h.args and h.args[h.args.index("--listen") + 1] == "off"
        with httpx.Client(timeout=CLIENT_TIMEOUT, verify=h.tls_context()) as client:
            with connect_sse(client, "GET", f"{h.tls_base}/events/{topic}") as es:
                h.publish({"topic": topic, "data": "only-tls"})
                assert h.publish_http(topic, "via-https")["id"]
                got = read_until(es.iter_sse(), lambda e: e.data == "via-https")
        assert [e.data for e in got] == ["only-tls", "via-https"]
        assert h.metric("herald_tls_handshakes_total") >= 1  # /metrics itself over TLS
    finally:
        assert h.stop() == 0, h.logs()


def test_shutdown_ends_a_tls_stream_with_close_notify(pki, topic):
    """On SIGTERM herald drains streams; a TLS stream must end with close_notify, not a bare TCP close
    (which a TLS client cannot tell from a truncation attack)."""
    h = Herald(tls={"pairs": [pki.pair("localhost")], "ca": pki.ca}, extra_args=["--drain-window", "200ms"]).start()
    stopped = False
    try:
        sock = socket.create_connection(("127.0.0.1", h.tls_port), timeout=5)
        s = h.tls_context().wrap_socket(sock, server_hostname="localhost", suppress_ragged_eofs=False)
        with s:
            s.sendall(f"GET /events/{topic} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            data = b""
            while b"\r\n\r\n" not in data:  # the response head: subscribed
                chunk = s.recv(65536)
                assert chunk, f"no response head: {data!r}"
                data += chunk
            assert data.startswith(b"HTTP/1.1 200"), data
            h.publish({"topic": topic, "data": "last-one"})
            while b"last-one" not in data:
                chunk = s.recv(65536)
                assert chunk, f"stream ended early: {data!r}"
                data += chunk
            h.proc.send_signal(signal.SIGTERM)
            try:
                rest = read_to_eof(s, deadline_s=8.0, reset_ok=False)
            except (ssl.SSLEOFError, ConnectionResetError) as e:
                pytest.fail(f"herald closed the TLS stream without close_notify on shutdown: {e!r}")
            assert (data + rest).endswith(b"\r\n0\r\n\r\n"), \
                f"the chunked stream ends with its last chunk, then close_notify: {(data + rest)[-120:]!r}"
        code = h.stop()
        stopped = True
        assert code == 0, h.logs()
    finally:
        if not stopped:
            h.stop()


def test_close_notify_from_the_client_is_answered(th):
    s = tls_connect(th.tls_port, "localhost", th.tls_context())
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        data = b""
        while b"ok" not in data:
            data += s.recv(4096)
        s.unwrap()  # sends close_notify, waits for herald's; SSLEOFError if herald just closes
    finally:
        s.close()


# ---------------------------------------------------------------- curl

def curl(*args, timeout=15):
    return subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=timeout)


def test_curl_healthz_with_cacert(th, pki):
    r = curl("--cacert", str(pki.ca), "-w", "\n%{http_version} %{ssl_verify_result} %{response_code}",
             f"{th.tls_base}/healthz")
    assert r.returncode == 0, r.stderr
    body, _, info = r.stdout.rpartition("\n")
    assert body.strip() == "ok"
    assert info == "2 0 200", f"HTTP/2 (curl offers h2 and http/1.1: herald picks h2), verified, 200: {info!r}"
    # By name, with SNI: both certificates verify for their own name.
    for name in ("localhost", "other.test"):
        r = curl("--cacert", str(pki.ca), "--resolve", f"{name}:{th.tls_port}:127.0.0.1",
                 f"https://{name}:{th.tls_port}/healthz")
        assert r.returncode == 0 and r.stdout.strip() == "ok", (name, r.returncode, r.stderr)
    # Negative control: without --cacert curl refuses (exit 60: peer certificate cannot be authenticated).
    r = curl(f"{th.tls_base}/healthz")
    assert r.returncode == 60, (r.returncode, r.stderr)


def test_curl_reads_an_sse_stream_over_tls(th, pki, topic):
    started = th.metric("herald_streams_started_total")
    proc = subprocess.Popen(["curl", "-sS", "-N", "--cacert", str(pki.ca), "--max-time", "30",
                             f"{th.tls_base}/events/{topic}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l.rstrip("\n")) for l in proc.stdout], daemon=True).start()
    try:
        th.wait_metric("herald_streams_started_total", lambda v: v > started, "curl's stream to start")
        th.publish([{"topic": topic, "data": "curl-1", "id": "c-1"}, {"topic": topic, "data": "curl-2"}])
        seen = []
        deadline = time.monotonic() + 15
        while "data: curl-2" not in seen:
            try:
                seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                pytest.fail(f"curl got no curl-2 within 15s: {seen}; stderr {proc.stderr.read() if proc.poll() is not None else ''}")
        data = [l for l in seen if l.startswith("data:")]
        assert data == ["data: curl-1", "data: curl-2"], seen
        assert "id: c-1" in seen, seen
    finally:
        proc.kill()
        proc.wait(5)


# ---------------------------------------------------------------- openssl s_client

def s_client(port, *args, timeout=15):
    r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
                       input="", capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout + r.stderr


def test_openssl_s_client_alpn_sni_versions(th, pki):
    ca = str(pki.ca)
    rc, out = s_client(th.tls_port, "-CAfile", ca, "-verify_return_error", "-alpn", "http/1.1", "-servername", "localhost")
    assert rc == 0, out
    assert "ALPN protocol: http/1.1" in out, out
    assert "Verify return code: 0 (ok)" in out, out
    assert "localhost" in out.split("subject=", 1)[1].splitlines()[0], out

    rc, out = s_client(th.tls_port, "-CAfile", ca, "-verify_return_error", "-servername", "other.test")
    assert rc == 0, out
    assert "other.test" in out.split("subject=", 1)[1].splitlines()[0], f"-servername other.test selects its certificate: {out}"

    rc, out = s_client(th.tls_port, "-CAfile", ca, "-verify_return_error", "-servername", "localhost", "-tls1_2")
    assert rc == 0 and "Protocol  : TLSv1.2" in out, out

    unknown = counter_bump(th, "herald_tls_unknown_name_total")
    rc, out = s_client(th.tls_port, "-CAfile", ca, "-servername", "nope.test")
    assert rc != 0 and "alert" in out and "BEGIN CERTIFICATE" not in out, out
    unknown(1)


def test_openssl_s_client_tls11_refused(th, pki):
    incompatible = counter_bump(th, "herald_tls_incompatible_total")
    rc, out = s_client(th.tls_port, "-CAfile", str(pki.ca), "-servername", "localhost",
                       "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0")
    if "no protocols available" in out or "unknown option" in out or "no ciphers available" in out:
        pytest.skip(f"this openssl cannot offer TLS 1.1: {out.strip()[:200]}")
    assert rc != 0, f"s_client -tls1_1 should fail: {out}"
    # (s_client prints the version it tried even on failure; "Cipher is (NONE)" says none was agreed)
    assert "alert" in out and "Cipher is (NONE)" in out and "BEGIN CERTIFICATE" not in out, out
    incompatible(1, "herald counted the TLS 1.1 hello")


# ---------------------------------------------------------------- SIGHUP reload

def test_sighup_reloads_certificates_without_closing_streams(pki, tmp_path, topic):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"

    def install(name):
        src_cert, src_key = pki.pair(name)
        for src, dst in ((src_cert, cert), (src_key, key)):
            tmp = dst.with_suffix(".tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)

    install("localhost")
    h = Herald(tls={"pairs": [(cert, key)], "ca": pki.ca}).start()
    ctx = h.tls_context()

    def new_conn_serial():
        with tls_connect(h.tls_port, "localhost", ctx) as s:
            status, _, body = http_over(s, "/healthz")
            assert status == 200 and body.strip() == b"ok"
            return peer(s)

    def hup_and_wait(log_line):
        n = h.logs(tail=0).count(log_line)
        h.proc.send_signal(signal.SIGHUP)
        h.wait_log(log_line, count=n + 1)

    try:
        assert new_conn_serial()[0] == pki.serial("localhost")
        with httpx.Client(timeout=CLIENT_TIMEOUT, verify=ctx) as client:
            with connect_sse(client, "GET", f"{h.tls_base}/events/{topic}") as es:
                events = es.iter_sse()
                h.publish({"topic": topic, "data": "e1"})
                assert next(events).data == "e1"

                # 1. a new certificate (other subject, serial and key; same CA, same names)
                install("reloaded")
                hup_and_wait("TLS certificates reloaded")
                serial, sans, cn = new_conn_serial()
                assert serial == pki.serial("reloaded"), f"a new connection after SIGHUP sees the new certificate: {cn}"
                assert "reloaded" in cn and "127.0.0.1" in sans
                h.publish({"topic": topic, "data": "e2"})
                assert next(events).data == "e2", "the stream opened before the reload is still open and receiving"

                # 2. a broken certificate file: the reload fails, the last good certificate stays
                cert.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
                hup_and_wait("TLS reload failed")
                assert new_conn_serial()[0] == pki.serial("reloaded"), "after a failed reload: the previous good certificate"

                # 3. a valid certificate with a key that does not match it: refused too
                shutil.copyfile(pki.pair("other")[0], cert)
                hup_and_wait("TLS reload failed")
                assert new_conn_serial()[0] == pki.serial("reloaded"), "a mismatched key is not loaded"

                # 4. an empty file
                cert.write_text("")
                hup_and_wait("TLS reload failed")
                assert new_conn_serial()[0] == pki.serial("reloaded")

                h.publish({"topic": topic, "data": "e3"})
                assert next(events).data == "e3", "the old stream survived three failed reloads"
        assert h.proc.poll() is None, f"herald still running after the reloads\n{h.logs()}"
    finally:
        code = h.stop()
    assert code == 0, h.logs()
