//! CONTRACT "Subscribing" and "Wire format": topics, headers, framing, field order,
//! line splitting, injection, keep-alives.
mod common;

use common::*;
use std::time::Duration;

#[test]
fn one_topic_and_multi_topic_subscriptions_get_their_events_in_order() {
    let Some(s) = start(|_| {}) else { return };
    let mut a = Client::subscribe(s.addr, "/events/a");
    let mut ab = Client::subscribe(s.addr, "/events?topic=a&topic=b");
    let mut b = Client::subscribe(s.addr, "/events/b");
    wait_streams(s.addr, 3);
    assert_eq!(
        a.headers.get("cache-control").map(String::as_str),
        Some("no-cache")
    );
    assert_eq!(
        a.headers.get("x-accel-buffering").map(String::as_str),
        Some("no")
    );
    assert_eq!(
        a.headers.get("transfer-encoding").map(String::as_str),
        Some("chunked")
    );
    let lines: Vec<String> = ["a1", "b1", "a2", "b2"]
        .iter()
        .map(|d| event_line(&d[..1], d))
        .collect();
    assert!(ingest(s.ingest, &lines).is_empty());
    let data = |c: &mut Client, n| {
        c.wait_events(n)
            .iter()
            .map(|e| e.data.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(data(&mut a, 2), ["a1", "a2"]);
    assert_eq!(data(&mut b, 2), ["b1", "b2"]);
    assert_eq!(data(&mut ab, 4), ["a1", "b1", "a2", "b2"]);
    // Ids herald assigns increase.
    let ids: Vec<u64> = ab
        .events
        .iter()
        .map(|e| e.id.clone().unwrap().parse().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    s.stop();
}

#[test]
fn fields_come_in_contract_order_and_data_splits_on_every_line_break() {
    let Some(s) = start(|_| {}) else { return };
    let mut c = Client::subscribe(s.addr, "/events/t");
    wait_streams(s.addr, 1);
    let line = serde_json::json!({
        "topic": "t", "event": "goal", "id": "42", "retry": 2500,
        "data": "lf\ncrlf\r\ncr\rend"
    })
    .to_string();
    assert!(ingest(s.ingest, &[line]).is_empty());
    // Read the raw chunk: the wire order is fixed by the contract.
    c.wait_events(1);
    let ev = &c.events[0];
    assert_eq!(ev.event, "goal");
    assert_eq!(ev.id.as_deref(), Some("42"));
    assert_eq!(ev.data, "lf\ncrlf\ncr\nend");
    assert_eq!(c.parser.retry, Some(2500));
    let raw =
        herald::sse::encode::encode_event(Some("goal"), "42", Some(2500), "lf\ncrlf\r\ncr\rend");
    assert_eq!(
        std::str::from_utf8(raw.body()).unwrap(),
        "event: goal\nid: 42\nretry: 2500\ndata: lf\ndata: crlf\ndata: cr\ndata: end\n\n"
    );
    s.stop();
}

#[test]
fn data_cannot_inject_fields_or_end_an_event_early() {
    let Some(s) = start(|_| {}) else { return };
    let mut c = Client::subscribe(s.addr, "/events/t");
    wait_streams(s.addr, 1);
    let evil = "\n\nevent: evil\ndata: x";
    assert!(ingest(s.ingest, &[event_line("t", evil), event_line("t", "after")]).is_empty());
    let evs = c.wait_events(2);
    assert_eq!(evs[0].event, "message");
    assert_eq!(evs[0].data, evil);
    assert_eq!(evs[1].data, "after");
    // Same through HTTP POST.
    let r = http_publish(s.addr, "t", evil);
    assert_eq!(r.status, 200, "{}", r.text());
    let evs = c.wait_events(3);
    assert_eq!(
        (evs[2].event.as_str(), evs[2].data.as_str()),
        ("message", evil)
    );
    s.stop();
}

#[test]
fn idle_streams_get_keepalive_comments() {
    let Some(s) = start(|c| c.keepalive = Duration::from_millis(100)) else {
        return;
    };
    let mut c = Client::subscribe(s.addr, "/events/quiet");
    let first = c.parser.comments;
    c.wait_until(|p, _| p.comments >= first + 3);
    assert!(c.events.is_empty());
    assert!(metric(s.addr, "herald_keepalives_total") >= 3);
    s.stop();
}

#[test]
fn an_idle_stream_hears_from_the_server_within_one_keepalive_interval() {
    // The contract: a stream idle for --keepalive gets a comment. (Measured with a margin
    // for a busy machine; a server that waits a second interval fails it.)
    let interval = Duration::from_millis(1000);
    let Some(s) = start(|c| c.keepalive = interval) else {
        return;
    };
    let mut c = Client::subscribe(s.addr, "/events/quiet");
    let start = std::time::Instant::now();
    let first = c.parser.comments;
    c.wait_until(|p, _| p.comments > first);
    let waited = start.elapsed();
    assert!(
        waited < interval * 18 / 10,
        "first keep-alive after {waited:?}"
    );
    s.stop();
}

#[test]
fn http10_clients_get_a_close_delimited_body() {
    let Some(s) = start(|_| {}) else { return };
    let mut stream = std::net::TcpStream::connect(s.addr).unwrap();
    use std::io::{Read, Write};
    stream
        .write_all(b"GET /events/old HTTP/1.0\r\n\r\n")
        .unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let (status, headers, mut body) = read_head(&mut stream);
    assert_eq!(status, 200);
    assert!(!headers.contains_key("transfer-encoding"));
    wait_streams(s.addr, 1);
    assert!(ingest(s.ingest, &[event_line("old", "hi")]).is_empty());
    let mut buf = [0u8; 4096];
    while !body.ends_with(b"data: hi\n\n") {
        let n = stream.read(&mut buf).expect("event arrives");
        assert!(
            n > 0,
            "stream ended early: {:?}",
            String::from_utf8_lossy(&body)
        );
        body.extend_from_slice(&buf[..n]);
    }
    // The exact bytes: SSE text only, no chunk-size lines and no CRLF anywhere.
    let text = String::from_utf8(body).unwrap();
    let id = text
        .lines()
        .find_map(|l| l.strip_prefix("id: "))
        .expect("an id line")
        .to_string();
    assert_eq!(text, format!(": herald\n\nid: {id}\ndata: hi\n\n"));
    s.stop();
}

#[test]
fn cors_and_preflight() {
    let Some(s) = start(|_| {}) else { return };
    let c = Client::get(s.addr, "/events/x", "Origin: https://app.example\r\n");
    assert_eq!(
        c.headers
            .get("access-control-allow-origin")
            .map(String::as_str),
        Some("*")
    );
    let r = raw_request(
        s.addr,
        b"OPTIONS /events/x HTTP/1.1\r\nHost: t\r\nOrigin: https://app.example\r\nAccess-Control-Request-Method: GET\r\nAccess-Control-Request-Headers: last-event-id\r\nConnection: close\r\n\r\n",
    );
    assert!(r.status == 204 || r.status == 200, "{}", r.status);
    let allow = r
        .headers
        .get("access-control-allow-headers")
        .cloned()
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(
        allow.contains("last-event-id") && allow.contains("cache-control"),
        "{allow}"
    );
    drop(c);
    s.stop();

    let Some(s) = start(|c| {
        c.cors_origins = vec!["https://good.example".into()];
        c.cors_credentials = true;
    }) else {
        return;
    };
    let good = Client::get(s.addr, "/events/x", "Origin: https://good.example\r\n");
    assert_eq!(
        good.headers
            .get("access-control-allow-origin")
            .map(String::as_str),
        Some("https://good.example")
    );
    assert_eq!(
        good.headers
            .get("access-control-allow-credentials")
            .map(String::as_str),
        Some("true")
    );
    let bad = Client::get(s.addr, "/events/x", "Origin: https://evil.example\r\n");
    assert!(!bad.headers.contains_key("access-control-allow-origin"));
    s.stop();
}
