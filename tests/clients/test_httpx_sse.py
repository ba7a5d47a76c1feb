"""herald against the Python `httpx-sse` client (httpx streaming + SSE decoder).

Run: HERALD_BIN=target/release/herald HERALD_BACKEND=epoll tests/clients/.venv/bin/pytest tests/clients
"""
import time

import httpx
from httpx_sse import connect_sse

from conftest import TIMEOUT

# connect: fail fast; read: a stream with no event for 10 s fails the test (keep-alives come every 15 s).
CLIENT_TIMEOUT = httpx.Timeout(TIMEOUT, connect=5.0)


def read_until(event_source, stop, deadline_s=20.0):
    """Collect events until stop(event) is true; bounded by read timeouts and an overall deadline."""
    got = []
    deadline = time.monotonic() + deadline_s
    for sse in event_source.iter_sse():
        got.append(sse)
        if stop(sse):
            return got
        assert time.monotonic() < deadline, f"no stop event within {deadline_s}s: {[(e.event, e.data) for e in got]}"
    raise AssertionError(f"stream ended before the stop event: {[(e.event, e.data) for e in got]}")


def check_stream_response(resp):
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert "no-cache" in resp.headers.get("cache-control", "")


def test_receive_plain_and_multiline(herald, topic):
    with httpx.Client(timeout=CLIENT_TIMEOUT) as client:
        with connect_sse(client, "GET", f"{herald.base}/events/{topic}") as es:
            check_stream_response(es.response)
            reply = herald.publish([
                {"topic": topic, "data": "hello"},
                {"topic": topic, "data": "a\nb\nc"},
                {"topic": topic, "data": "x\r\ny\rz"},
                {"topic": topic, "data": "end"},
            ])
            assert reply.strip() == "", f"valid ingest lines get no error reply: {reply!r}"
            got = read_until(es, lambda e: e.data == "end")
    assert [(e.event, e.data) for e in got] == [
        ("message", "hello"), ("message", "a\nb\nc"), ("message", "x\ny\nz"), ("message", "end")]
    ids = [e.id for e in got]
    assert all(ids) and len(set(ids)) == len(ids), ids
    if all(i.isdigit() for i in ids):
        assert [int(i) for i in ids] == sorted(int(i) for i in ids), f"ids increase: {ids}"


def test_typed_event(herald, topic):
    with httpx.Client(timeout=CLIENT_TIMEOUT) as client:
        with connect_sse(client, "GET", f"{herald.base}/events/{topic}") as es:
            check_stream_response(es.response)
            herald.publish([
                {"topic": topic, "event": "goal", "data": "El Shaarawy", "id": "py-goal-42"},
                {"topic": topic, "data": "sentinel"},
            ])
            got = read_until(es, lambda e: e.data == "sentinel")
    assert [(e.event, e.data) for e in got] == [("goal", "El Shaarawy"), ("message", "sentinel")]
    assert got[0].id == "py-goal-42", "the publisher's id is on the wire"


def test_resume_with_last_event_id(herald, topic):
    with httpx.Client(timeout=CLIENT_TIMEOUT) as client:
        with connect_sse(client, "GET", f"{herald.base}/events/{topic}") as es:
            herald.publish({"topic": topic, "data": "r0"})
            got = read_until(es, lambda e: e.data == "r0")
            x = got[-1].id
            assert x, "r0 carries an id"

        herald.publish([{"topic": topic, "data": f"r{i}"} for i in (1, 2, 3)])
        # also check the HTTP publish path answers the id
        assert herald.publish_http(topic, "r4").get("id")

        with connect_sse(client, "GET", f"{herald.base}/events/{topic}",
                         headers={"Last-Event-ID": x}) as es:
            check_stream_response(es.response)
            herald.publish({"topic": topic, "data": "live"})
            got = read_until(es, lambda e: e.data == "live")
    assert [(e.event, e.data) for e in got] == [
        ("message", "r1"), ("message", "r2"), ("message", "r3"), ("message", "r4"), ("message", "live")], \
        "exactly the later events, in order, no gap or duplicate at the hand-over to live"
    ids = [x] + [e.id for e in got]
    assert len(set(ids)) == len(ids), ids
