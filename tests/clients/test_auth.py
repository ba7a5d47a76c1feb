"""herald's JWT authentication against Python clients: httpx + httpx-sse, tokens from PyJWT.

HS256 with a secret file (--auth-secret-file: the file's bytes, one trailing newline
stripped), the token in the Authorization header, the herald_token cookie or the query
parameter named by --auth-query-param; the expiry notice and the clean end before exp; the
access log (--access-log PATH) of streams and refused requests, and no token in any log.

Run: HERALD_BIN=target/release/herald HERALD_BACKEND=epoll tests/clients/.venv/bin/pytest tests/clients/test_auth.py
"""
import json
import re
import secrets
import time

import httpx
import jwt
import pytest
from httpx_sse import connect_sse

from conftest import TIMEOUT, Herald

CLIENT_TIMEOUT = httpx.Timeout(TIMEOUT, connect=5.0)
SECRET = ("herald-test-" + secrets.token_hex(24)).encode()  # 60 bytes: HS256 wants >= 32
QUERY_PARAM = "access_token"
NOTICE_S = 1  # --auth-expiry-notice


def mint(sub="42", subscribe=("user/{sub}/*",), lifetime=600, key=SECRET, iat=None, exp="default", **claims):
    """An HS256 token; exp=None leaves exp out."""
    now = int(time.time())
    iat = now if iat is None else iat
    payload = {"sub": sub, "iat": iat, "jti": secrets.token_hex(8), "herald": {"subscribe": list(subscribe)}, **claims}
    if exp == "default":
        payload["exp"] = iat + lifetime
    elif exp is not None:
        payload["exp"] = exp
    return jwt.encode(payload, key, algorithm="HS256")


def unsigned(sub="42"):
    """The same claims with alg none: must always be refused."""
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + 600, "herald": {"subscribe": ["*"]}}, None, algorithm="none")


def challenge(value):
    """`Bearer realm="herald", error="..."` -> {"scheme": "Bearer", "realm": "herald", ...}."""
    assert value, "WWW-Authenticate header present"
    scheme, _, rest = value.strip().partition(" ")
    out = {"scheme": scheme}
    for k, v in re.findall(r'([A-Za-z_]+)="((?:[^"\\]|\\.)*)"', rest):
        out[k] = v
    return out


def status_of(client, url, **kw):
    """(status, headers, body) of a GET; a 200 event stream is closed after its head."""
    with client.stream("GET", url, **kw) as r:
        if r.status_code == 200 and r.headers.get("content-type", "").startswith("text/event-stream"):
            return r.status_code, r.headers, ""
        return r.status_code, r.headers, r.read().decode("utf-8", "replace")


def read_until(es, stop, deadline_s=20.0):
    got = []
    deadline = time.monotonic() + deadline_s
    for sse in es.iter_sse():
        got.append(sse)
        if stop(sse):
            return got
        assert time.monotonic() < deadline, f"no stop event within {deadline_s}s: {[(e.event, e.data) for e in got]}"
    raise AssertionError(f"stream ended before the stop event: {[(e.event, e.data) for e in got]}")


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("herald-auth") / "hs256.secret"
    p.write_bytes(SECRET + b"\n")  # one trailing newline: herald strips it
    return p


def auth_args(secret_file, *more):
    return ["--auth-secret-file", str(secret_file), "--auth-query-param", QUERY_PARAM,
            "--auth-expiry-notice", f"{NOTICE_S}s", *more]


@pytest.fixture(scope="module")
def auth_herald(secret_file):
    h = Herald(extra_args=auth_args(secret_file)).start()
    yield h
    code = h.stop()
    assert code == 0, f"herald should exit 0 on SIGTERM, got {code}\n{h.logs()}"


def test_token_sources_and_refusals(auth_herald):
    h = auth_herald
    url = f"{h.base}/events/user/42/orders"
    good = mint()
    now = int(time.time())
    with httpx.Client(timeout=CLIENT_TIMEOUT) as client:
        # The three places a token may be; the query parameter only because it is configured.
        assert status_of(client, url, headers={"Authorization": f"Bearer {good}"})[0] == 200
        assert status_of(client, url, headers={"Cookie": f"herald_token={good}"})[0] == 200
        assert status_of(client, url, params={QUERY_PARAM: good})[0] == 200
        # First found wins: a bad Bearer is not rescued by a good cookie; a good cookie
        # is used before a bad query parameter.
        assert status_of(client, url, headers={"Authorization": "Bearer nope", "Cookie": f"herald_token={good}"})[0] == 401
        assert status_of(client, url, headers={"Cookie": f"herald_token={good}"}, params={QUERY_PARAM: "nope"})[0] == 200

        # No token: a bare challenge.
        status, headers, _ = status_of(client, url, headers={"Origin": "http://page.example"})
        assert status == 401
        c = challenge(headers.get("www-authenticate"))
        assert (c["scheme"], c.get("realm"), c.get("error")) == ("Bearer", "herald", None), headers.get("www-authenticate")
        assert headers.get("access-control-allow-origin") == "*", "CORS on the 401"

        bad = {
            "wrong secret": mint(key=b"another-secret-of-thirty-two-bytes-or-more"),
            "secret with its trailing newline (herald strips one)": mint(key=SECRET + b"\n"),
            "expired": mint(iat=now - 120, exp=now - 60),
            "exp now (must be strictly in the future)": mint(iat=now - 60, exp=now),
            "no exp": mint(exp=None),
            "nbf in a minute": mint(nbf=now + 60),
            "alg none": unsigned(),
            "garbage": "a.b.c",
        }
        for what, token in bad.items():
            status, headers, _ = status_of(client, url, headers={"Authorization": f"Bearer {token}"})
            assert status == 401, f"{what}: {status}"
            c = challenge(headers.get("www-authenticate"))
            assert c["scheme"] == "Bearer" and c.get("realm") == "herald", f"{what}: {headers.get('www-authenticate')}"
            assert c.get("error") == "invalid_token", f"{what}: {headers.get('www-authenticate')}"

        # Valid token, topic not granted.
        for topic in ("user/43/orders", "orders", "user/42"):
            status, headers, _ = status_of(client, f"{h.base}/events/{topic}", headers={"Authorization": f"Bearer {good}"})
            assert status == 403, f"{topic}: {status}"
            assert challenge(headers.get("www-authenticate")).get("error") == "insufficient_scope", headers.get("www-authenticate")
        # A query-parameter token is no token when herald is not configured for one: see
        # test_query_param_off_by_default.


def test_query_param_off_by_default(secret_file):
    h = Herald(extra_args=["--auth-secret-file", str(secret_file)]).start()
    try:
        with httpx.Client(timeout=CLIENT_TIMEOUT) as client:
            url = f"{h.base}/events/user/42/orders"
            for name in (QUERY_PARAM, "token", "herald_token"):
                status, headers, _ = status_of(client, url, params={name: mint()})
                assert status == 401, f"?{name}= must not authenticate without --auth-query-param"
            assert status_of(client, url, headers={"Authorization": f"Bearer {mint()}"})[0] == 200
    finally:
        assert h.stop() == 0


def test_expiry_notice_then_clean_end_before_exp(auth_herald):
    """A 5 s token, --auth-expiry-notice 1s: the notice, a retry: hint, a clean end before exp."""
    h = auth_herald
    topic = "user/42/expiry"
    now = int(time.time())
    exp = now + 5
    token = mint(iat=now, exp=exp)
    got = []  # (monotonic-free wall time, sse)
    with httpx.Client(timeout=CLIENT_TIMEOUT) as client:
        with connect_sse(client, "GET", f"{h.base}/events/{topic}", headers={"Authorization": f"Bearer {token}"}) as es:
            assert es.response.status_code == 200
            h.publish({"topic": topic, "data": "live"})
            # Iterate to the end: a stream cut without its last chunk raises httpx.RemoteProtocolError here.
            for sse in es.iter_sse():
                got.append((time.time(), sse))
                assert time.time() < exp + 5, f"stream still open 5 s after exp: {[(e.event, e.data) for _, e in got]}"
            ended = time.time()
    events = [(e.event, e.data) for _, e in got]
    assert ("message", "live") in events, events
    notices = [(t, e) for t, e in got if e.event == "herald-auth-expiring"]
    assert len(notices) == 1, f"one herald-auth-expiring: {events}"
    t_notice, notice = notices[0]
    assert json.loads(notice.data).get("exp") == exp, f"the notice names the token's exp {exp}: {notice.data}"
    assert any(e.retry is not None for _, e in got), f"a retry: hint before the end: {[(e.event, e.data, e.retry) for _, e in got]}"
    assert ended < exp + 0.15, f"stream ended {ended - exp:.3f} s after exp; must end before it"
    # Not much earlier either: spread over the last tenth of the lifetime (0.5 s), plus at most
    # a small safety margin before exp.
    assert ended >= exp - 0.5 - 1.5, f"stream ended {exp - ended:.3f} s before exp: expected within the last tenth of the 5 s lifetime and a margin"
    lead = ended - t_notice
    assert NOTICE_S - 0.6 <= lead <= NOTICE_S + 0.6, f"notice {lead:.3f} s before the end, expected ~{NOTICE_S} s"


def _lines(path):
    text = path.read_text() if path.exists() else ""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"access log line {n} is not JSON: {line!r}")
    return out


def _topics(rec):
    t = rec.get("topics")
    return t if isinstance(t, list) else [s for s in str(t).split(",") if s]


def test_access_log_and_no_token_in_any_log(secret_file, tmp_path, monkeypatch):
    """Query-parameter token, --access-log PATH, RUST_LOG=debug: the access log has the stream's
    start and end and the refused requests; no token (nor its signature) is in any log."""
    monkeypatch.setenv("RUST_LOG", "debug")
    access = tmp_path / "access.log"
    h = Herald(extra_args=auth_args(secret_file, "--access-log", str(access))).start()
    topic = "user/42/logged"
    token = mint()
    bad_query = mint(key=b"another-secret-of-thirty-two-bytes-or-more")
    bad_bearer = mint(key=b"yet-another-secret-of-thirty-two-bytes!!")
    forbidden = mint(subscribe=("user/{sub}/*",))
    secrets_seen = {"token": token, "bad query token": bad_query, "bad bearer token": bad_bearer, "forbidden token": forbidden}
    stopped = False
    try:
        baseline = h.metric("herald_connections_open")
        with httpx.Client(timeout=CLIENT_TIMEOUT) as client:
            with connect_sse(client, "GET", f"{h.base}/events/{topic}", params={QUERY_PARAM: token}) as es:
                assert es.response.status_code == 200
                h.publish([{"topic": topic, "data": f"d{i}"} for i in range(3)])
                got = read_until(es, lambda e: e.data == "d2")
            assert [e.data for e in got] == ["d0", "d1", "d2"]
            last_id = got[-1].id
            # A second stream resuming from the last id: the log names it.
            with connect_sse(client, "GET", f"{h.base}/events/{topic}", params={QUERY_PARAM: token},
                             headers={"Last-Event-ID": last_id}) as es:
                assert es.response.status_code == 200
                h.publish({"topic": topic, "data": "d3"})
                assert [e.data for e in read_until(es, lambda e: e.data == "d3")] == ["d3"]

            # Refused subscriptions: no token, bad query token, bad Bearer, topic not granted.
            assert status_of(client, f"{h.base}/events/{topic}")[0] == 401
            assert status_of(client, f"{h.base}/events/{topic}", params={QUERY_PARAM: bad_query})[0] == 401
            assert status_of(client, f"{h.base}/events/{topic}", headers={"Authorization": f"Bearer {bad_bearer}"})[0] == 401
            assert status_of(client, f"{h.base}/events/user/43/x", headers={"Cookie": f"herald_token={forbidden}"})[0] == 403

        # Both streams were left by the client: wait until herald closed them, so their end
        # reason is the client's, not the shutdown's.
        h.wait_metric("herald_connections_open", lambda v: v <= baseline, "the client's streams to close")
        code = h.stop()
        stopped = True
        assert code == 0, f"exit status on SIGTERM: {code}\n{h.logs()}"
    finally:
        if not stopped:
            h.stop()

    output = h.logs(tail=0)  # herald's stdout + stderr, RUST_LOG=debug
    # RUST_LOG=debug reached herald: it logs at DEBUG, or says DEBUG is compiled out of this build
    # (tracing's max_level_info), in which case the info level is the most it can log.
    assert re.search(r"\bDEBUG\b|static max level is `info`", output), \
        f"RUST_LOG=debug took effect:\n{output[-2000:]}"
    log_text = access.read_text()
    for what, t in secrets_seen.items():
        sig = t.rsplit(".", 1)[1]
        assert len(sig) >= 32, f"{what} has a signature to look for"
        for where, text in (("stderr", output), ("access log", log_text)):
            for n, line in enumerate(text.splitlines(), 1):
                assert t not in line, f"{what} in {where} line {n}: {line}"
                assert sig not in line, f"{what}'s signature in {where} line {n}: {line}"

    recs = _lines(access)
    starts = [r for r in recs if r.get("ev") == "start" and topic in _topics(r)]
    ends = [r for r in recs if r.get("ev") == "end" and topic in _topics(r)]
    requests = [r for r in recs if r.get("ev") == "request"]
    assert len(starts) == 2 and len(ends) == 2, f"a start and an end per stream: {recs}"
    for r in starts + ends:
        for k in ("ts", "worker", "conn", "remote", "proto", "topics", "sub", "last_event_id", "status"):
            assert k in r, f"{k} in {r}"
        assert r["sub"] == "42", r
        assert _topics(r) == [topic], r
        assert r["status"] == 200, r
        assert "127.0.0.1" in str(r["remote"]), r
    for r in ends:
        for k in ("duration_ms", "events", "bytes", "reason"):
            assert k in r, f"{k} in {r}"
        assert r["reason"] == "client", f"the client left: {r}"
        assert isinstance(r["duration_ms"], (int, float)) and r["duration_ms"] >= 0, r
        assert isinstance(r["bytes"], int) and r["bytes"] > 0, r
    assert sorted(r["last_event_id"] or "" for r in starts) == sorted(["", last_id]), \
        f"the resumed stream logs its Last-Event-ID {last_id!r}: {starts}"
    # Pair each start with the next end of the same (worker, conn), in log order.
    open_streams, pairs = {}, []
    for r in recs:
        if topic not in _topics(r):
            continue
        key = (r.get("worker"), r.get("conn"))
        if r.get("ev") == "start":
            assert key not in open_streams, f"two starts on one connection without an end: {recs}"
            open_streams[key] = r
        elif r.get("ev") == "end":
            assert key in open_streams, f"an end without its start: {r}\n{recs}"
            pairs.append((open_streams.pop(key), r))
    assert not open_streams and len(pairs) == 2, f"every start has its end: {recs}"
    for s, e in pairs:
        assert e["events"] == (1 if s["last_event_id"] else 3), f"events delivered: {s} -> {e}"
    statuses = sorted(r.get("status") for r in requests)
    assert statuses.count(401) >= 3, f"a request line per refused (401) subscription: {requests}"
    assert statuses.count(403) >= 1, f"a request line for the 403: {requests}"
    for r in requests:
        assert "status" in r and "ts" in r, r
