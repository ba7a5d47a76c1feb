//! HTTP/2 on the backend under test, over real sockets with a client written from the RFC
//! (tests/common/h2.rs): every route over prior-knowledge h2c and over TLS with ALPN,
//! many streams on one connection, frames split and windows shut, the drain, and each
//! attack of the h2 threat list answered with the right GOAWAY while a bystander on
//! another connection keeps receiving.
mod common;

use std::time::Duration;

use common::h2::*;
use common::*;

fn server(tweak: impl FnOnce(&mut herald::Config)) -> Option<TestServer> {
    start(tweak)
}

fn publish(s: &TestServer, topic: &str, data: &str) {
    let r = ingest(s.ingest, &[event_line(topic, data)]);
    assert!(r.iter().all(|l| l.contains("\"id\"")), "published: {r:?}");
}

#[test]
fn every_route_works_over_prior_knowledge_h2() {
    let Some(s) = server(|c| c.cors_origins = vec!["https://app.example".into()]) else {
        return;
    };
    let mut h = H2::connect(s.addr);
    let health = h.get("/healthz", &[]);
    let metrics = h.get("/metrics", &[]);
    let missing = h.get("/nope", &[]);
    let demo = h.get("/", &[]);
    h.until("four answers", |h| {
        [health, metrics, missing, demo]
            .iter()
            .all(|&sid| h.streams.get(&sid).is_some_and(|st| st.ended))
    });
    assert_eq!(h.stream(health).status, Some(200));
    assert_eq!(h.stream(health).body, b"ok\n");
    assert_eq!(h.stream(metrics).status, Some(200));
    assert!(String::from_utf8_lossy(&h.stream(metrics).body).contains("herald_h2_streams_total"));
    assert_eq!(h.stream(missing).status, Some(404));
    assert_eq!(h.stream(demo).status, Some(200));
    // No connection-specific header crosses into h2.
    for sid in [health, metrics, missing, demo] {
        for (n, _) in &h.stream(sid).headers {
            assert!(
                !["connection", "keep-alive", "transfer-encoding"].contains(&n.as_str()),
                "{n} on stream {sid}"
            );
        }
    }
    // A CORS preflight.
    let sid = h.next_sid;
    h.next_sid += 2;
    let block = request_block(
        "OPTIONS",
        "/events/a",
        &[
            ("origin", "https://app.example"),
            ("access-control-request-method", "GET"),
        ],
    );
    h.send_frame(HEADERS, END_HEADERS | END_STREAM, sid, &block);
    h.until("the preflight", |h| {
        h.streams.get(&sid).is_some_and(|st| st.ended)
    });
    assert_eq!(h.stream(sid).status, Some(204));
    assert_eq!(
        h.stream(sid).header("access-control-allow-origin"),
        Some("https://app.example")
    );

    // Subscribe, then publish over h2 with and without Content-Length.
    let sub = h.get("/events/t", &[("origin", "https://app.example")]);
    h.until("the stream head", |h| h.stream(sub).status.is_some());
    assert_eq!(h.stream(sub).status, Some(200));
    assert_eq!(
        h.stream(sub).header("content-type"),
        Some("text/event-stream; charset=utf-8")
    );
    wait_streams(s.addr, 1);
    let p1 = h.post("/publish/t", b"one", true);
    let p2 = h.post("/publish/t", b"two", false);
    h.until("both events", |h| h.events(sub) == 2);
    for p in [p1, p2] {
        assert_eq!(h.stream(p).status, Some(200));
        assert!(String::from_utf8_lossy(&h.stream(p).body).contains("\"id\""));
    }
    let evs = &h.stream(sub).events;
    assert_eq!((evs[0].data.as_str(), evs[1].data.as_str()), ("one", "two"));
    assert!(!h.stream(sub).ended);
    assert!(h.goaway.is_none());
}

#[test]
fn a_hundred_streams_on_one_connection_each_get_their_own_topic_and_resume() {
    let Some(s) = server(|_| {}) else {
        return;
    };
    let mut h = H2::connect(s.addr);
    let sids: Vec<u32> = (0..100)
        .map(|i| h.get(&format!("/events/u{i}"), &[]))
        .collect();
    h.until("100 stream heads", |h| {
        sids.iter().all(|sid| h.stream(*sid).status == Some(200))
    });
    wait_streams(s.addr, 100);
    let lines: Vec<String> = (0..100)
        .flat_map(|i| (0..3).map(move |k| event_line(&format!("u{i}"), &format!("u{i}-{k}"))))
        .collect();
    ingest(s.ingest, &lines);
    h.until("3 events on every stream", |h| {
        sids.iter().all(|sid| h.events(*sid) >= 3)
    });
    for (i, sid) in sids.iter().enumerate() {
        let evs = &h.stream(*sid).events;
        assert_eq!(evs.len(), 3, "stream {i}");
        for (k, e) in evs.iter().enumerate() {
            assert_eq!(e.data, format!("u{i}-{k}"));
        }
    }
    // Resume stream 7 on a new stream from its first event: exactly the two after it.
    let first = h.stream(sids[7]).events[0].id.clone().unwrap();
    let again = h.get("/events/u7", &[("last-event-id", &first)]);
    h.until("the replay", |h| h.events(again) >= 2);
    let evs: Vec<&str> = h
        .stream(again)
        .events
        .iter()
        .map(|e| e.data.as_str())
        .collect();
    assert_eq!(evs, ["u7-1", "u7-2"]);
    let open = metric(s.addr, "herald_h2_streams_open");
    assert!(
        open >= 101,
        "{open} streams open; goaway {:?} closed {}",
        h.goaway,
        h.closed
    );
}

#[test]
fn tls_negotiates_h2_by_alpn_and_http11_still_works() {
    use common::tls::*;
    let pki = Pki::new();
    let (cert, key, _) = pki.leaf(&["localhost", "127.0.0.1"], "leaf");
    let Some(s) = server(|c| {
        c.tls_listen = Some("127.0.0.1:0".parse().unwrap());
        c.tls_certs = vec![herald::tls::CertPair { cert, key }];
    }) else {
        return;
    };
    let tls = s.tls.unwrap();
    let cfg = pki.client().alpn(&[b"h2", b"http/1.1"]).build();
    let t = connect(tls, "localhost", &cfg).expect("handshake");
    assert_eq!(t.conn.alpn_protocol(), Some(&b"h2"[..]));
    t.sock
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut h = H2::handshake(t, &[(INITIAL_WINDOW_SIZE, 1 << 30)], 1 << 30);
    let a = h.get("/events/sa", &[]);
    let b = h.get("/events/sb", &[]);
    h.until("heads", |h| {
        h.stream(a).status.is_some() && h.stream(b).status.is_some()
    });
    wait_streams(s.addr, 2);
    publish(&s, "sa", "over-tls-a");
    publish(&s, "sb", "over-tls-b");
    h.until("events", |h| h.events(a) == 1 && h.events(b) == 1);
    assert_eq!(h.stream(a).events[0].data, "over-tls-a");
    assert_eq!(h.stream(b).events[0].data, "over-tls-b");

    // A client offering only http/1.1 gets HTTP/1.1.
    let cfg = pki.client().alpn(&[b"http/1.1"]).build();
    let t = connect(tls, "localhost", &cfg).expect("handshake");
    assert_eq!(t.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    let c = Client::request(t, "localhost", "/healthz", "");
    assert_eq!(c.status, 200);
}

#[test]
fn large_events_are_split_into_frames_and_arrive_whole_through_a_small_socket() {
    let Some(s) = server(|_| {}) else {
        return;
    };
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&s.addr.into()).unwrap();
    let tcp: std::net::TcpStream = sock.into();
    short_timeouts(&tcp);
    let mut h = H2::handshake(tcp, &[(INITIAL_WINDOW_SIZE, 1 << 30)], 1 << 30);
    let big = h.get("/events/big", &[]);
    let small = h.get("/events/small", &[]);
    h.until("heads", |h| {
        h.stream(big).status.is_some() && h.stream(small).status.is_some()
    });
    wait_streams(s.addr, 2);
    let payloads: Vec<String> = (0..20)
        .map(|i| format!("{i}:{}", "x".repeat(50_000 + i * 101)))
        .collect();
    let mut lines: Vec<String> = payloads.iter().map(|p| event_line("big", p)).collect();
    lines.push(event_line("small", "tiny"));
    ingest(s.ingest, &lines);
    h.until("every event", |h| {
        h.events(big) == 20 && h.events(small) == 1
    });
    for (i, e) in h.stream(big).events.iter().enumerate() {
        assert_eq!(e.data, payloads[i], "event {i} whole and in order");
    }
}

#[test]
fn a_reset_while_its_frames_are_in_a_blocked_write_corrupts_no_sibling() {
    // The server's socket fills (a 4 KiB receive buffer, nothing read), so its write of
    // the big stream's frames is in flight or blocked when the client resets that
    // stream; the stream must stay whole in the plan until written, then go.
    let Some(s) = server(|_| {}) else {
        return;
    };
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&s.addr.into()).unwrap();
    let tcp: std::net::TcpStream = sock.into();
    short_timeouts(&tcp);
    let mut h = H2::handshake(tcp, &[(INITIAL_WINDOW_SIZE, 1 << 30)], 1 << 30);
    let big = h.get("/events/rbig", &[]);
    let small = h.get("/events/rsmall", &[]);
    h.until("heads", |h| {
        h.stream(big).status.is_some() && h.stream(small).status.is_some()
    });
    wait_streams(s.addr, 2);
    let lines: Vec<String> = (0..10)
        .map(|i| event_line("rbig", &format!("{i}:{}", "y".repeat(60_000))))
        .collect();
    ingest(s.ingest, &lines);
    // Nothing read: the server's write is stuck on a full socket. Reset the big stream.
    wait_for("the big stream's events pending", || {
        metric(s.addr, "herald_fanout_backlog_bytes") > 0
    });
    h.send_frame(RST_STREAM, 0, big, &CANCEL.to_be_bytes());
    for i in 0..3 {
        publish(&s, "rsmall", &format!("small-{i}"));
    }
    h.until("the small stream's events", |h| h.events(small) == 3);
    let evs: Vec<&str> = h
        .stream(small)
        .events
        .iter()
        .map(|e| e.data.as_str())
        .collect();
    assert_eq!(evs, ["small-0", "small-1", "small-2"]);
    // Whatever of the big stream arrived is whole events (its frames were not cut).
    for e in &h.stream(big).events {
        assert_eq!(e.data.len(), 2 + 60_000, "a whole event");
    }
    assert!(h.goaway.is_none());
    wait_for("the reset stream released", || {
        metric(s.addr, "herald_h2_streams_open") == 1
    });
}

#[test]
fn drain_with_a_stream_window_shut_ends_the_others_cleanly_and_cuts_it() {
    let Some(s) = server(|c| c.drain_window = Duration::from_millis(400)) else {
        return;
    };
    let mut h = H2::connect_with(s.addr, &[(INITIAL_WINDOW_SIZE, 300)], 1 << 30);
    let stuck = h.get("/events/dstuck", &[]);
    let live = h.get("/events/dlive", &[]);
    h.hold.push(stuck);
    h.until("heads", |h| {
        h.stream(stuck).status.is_some() && h.stream(live).status.is_some()
    });
    wait_streams(s.addr, 2);
    for _ in 0..4 {
        publish(&s, "dstuck", &"s".repeat(200));
    }
    publish(&s, "dlive", "live");
    h.until("the live event", |h| h.events(live) == 1);
    let stopper = std::thread::spawn(move || s.stop());
    h.until("the connection to end", |h| h.closed);
    stopper.join().unwrap();
    assert_eq!(h.goaway.map(|g| g.1), Some(NO_ERROR));
    let l = h.stream(live);
    assert!(
        l.ended && l.reset.is_none() && l.parser.retry.is_some(),
        "live stream ended cleanly"
    );
    let st = h.stream(stuck);
    assert!(
        !st.ended || st.reset.is_some(),
        "the stuck stream was not ended as if complete"
    );
    assert!(h.events(stuck) < 4, "its window held it back");
}

#[test]
fn a_stream_with_its_window_shut_is_reset_and_its_siblings_keep_receiving() {
    let Some(s) = server(|c| c.write_timeout = Duration::from_millis(600)) else {
        return;
    };
    // Stream windows of 300 bytes; the stalled stream's window is never given back.
    let mut h = H2::connect_with(s.addr, &[(INITIAL_WINDOW_SIZE, 300)], 1 << 30);
    let stuck = h.get("/events/stuck", &[]);
    let live = h.get("/events/live", &[]);
    h.hold.push(stuck);
    h.until("heads", |h| {
        h.stream(stuck).status.is_some() && h.stream(live).status.is_some()
    });
    wait_streams(s.addr, 2);
    for i in 0..5 {
        publish(&s, "stuck", &"s".repeat(200));
        publish(&s, "live", &format!("live-{i}"));
    }
    h.until("the live stream's events", |h| h.events(live) == 5);
    h.until("the stuck stream's reset", |h| {
        h.stream(stuck).reset.is_some()
    });
    assert_eq!(h.stream(stuck).reset, Some(CANCEL));
    assert!(h.events(stuck) < 5, "its window held it back");
    publish(&s, "live", "after");
    h.until("one more on the live stream", |h| h.events(live) == 6);
    assert!(h.goaway.is_none(), "only the stream was slow");
    assert!(metric(s.addr, "herald_h2_slow_streams_total") >= 1);
}

#[test]
fn a_connection_window_held_shut_gets_goaway_and_costs_others_nothing() {
    let Some(s) = server(|c| c.write_timeout = Duration::from_millis(600)) else {
        return;
    };
    let mut bystander = Client::subscribe(s.addr, "/events/by");
    // No connection WINDOW_UPDATE ever: 65,535 bytes, then nothing.
    let mut h = H2::connect_with(s.addr, &[(INITIAL_WINDOW_SIZE, 1 << 30)], 0);
    h.auto_window = false;
    let sid = h.get("/events/zero", &[]);
    h.until("head", |h| h.stream(sid).status.is_some());
    wait_streams(s.addr, 2);
    for _ in 0..8 {
        publish(&s, "zero", &"z".repeat(10_000));
    }
    publish(&s, "by", "bystander");
    bystander.wait_events(1);
    assert_eq!(h.until_closed(), Some((sid, ENHANCE_YOUR_CALM)));
    assert!(h.stream(sid).body.len() <= 65_535);
    publish(&s, "by", "still here");
    assert_eq!(bystander.wait_events(2)[1].data, "still here");
}

#[test]
fn streams_over_the_limit_are_refused_and_the_rest_work() {
    let Some(s) = server(|c| c.h2_max_streams = 4) else {
        return;
    };
    let mut h = H2::connect(s.addr);
    h.until("settings", |h| h.settings_acks > 0);
    assert!(
        h.settings.contains(&(3, 4)),
        "MAX_CONCURRENT_STREAMS advertised"
    );
    let sids: Vec<u32> = (0..5)
        .map(|i| h.get(&format!("/events/l{i}"), &[]))
        .collect();
    h.until("the fifth refused", |h| h.stream(sids[4]).reset.is_some());
    assert_eq!(h.stream(sids[4]).reset, Some(REFUSED_STREAM));
    wait_streams(s.addr, 4);
    publish(&s, "l3", "ok");
    h.until("an event on the fourth", |h| h.events(sids[3]) == 1);
    assert!(metric(s.addr, "herald_h2_streams_refused_total") >= 1);
}

#[test]
fn drain_sends_goaway_then_every_stream_gets_retry_and_end_stream() {
    let Some(s) = server(|c| c.drain_window = Duration::from_millis(500)) else {
        return;
    };
    let mut h = H2::connect(s.addr);
    let sids: Vec<u32> = (0..20)
        .map(|i| h.get(&format!("/events/d{i}"), &[]))
        .collect();
    h.until("heads", |h| {
        sids.iter().all(|sid| h.stream(*sid).status.is_some())
    });
    wait_streams(s.addr, 20);
    let lines: Vec<String> = (0..20)
        .map(|i| event_line(&format!("d{i}"), "last"))
        .collect();
    ingest(s.ingest, &lines);
    h.until("events", |h| sids.iter().all(|sid| h.events(*sid) == 1));
    let stopper = std::thread::spawn(move || s.stop());
    h.until("every stream ended", |h| {
        sids.iter()
            .all(|sid| h.stream(*sid).ended || h.stream(*sid).reset.is_some())
    });
    stopper.join().unwrap();
    let (last, code) = h.goaway.expect("GOAWAY");
    assert_eq!(code, NO_ERROR);
    assert!(last >= *sids.last().unwrap());
    for sid in &sids {
        let st = h.stream(*sid);
        assert!(st.ended && st.reset.is_none(), "stream {sid} ended cleanly");
        assert!(st.parser.retry.is_some(), "stream {sid} got its retry hint");
        assert_eq!(st.events.len(), 1);
    }
}

/// Run `attack` on a fresh h2 connection and expect GOAWAY `code` and a close, while a
/// subscriber on another connection keeps receiving.
fn attack(
    s: &TestServer,
    bystander: &mut Client,
    name: &str,
    code: u32,
    attack: impl FnOnce(&mut H2),
) {
    let mut h = H2::connect(s.addr);
    h.until("settings", |h| h.settings_acks > 0);
    attack(&mut h);
    let got = h.until_closed();
    assert_eq!(got.map(|g| g.1), Some(code), "{name}: GOAWAY code");
    let n = bystander.wait_events(0).len();
    publish(s, "by", name);
    assert_eq!(
        bystander.wait_events(n + 1)[n].data,
        name,
        "{name}: bystander"
    );
}

#[test]
fn attacks_get_goaway_with_the_right_code_are_counted_and_cost_others_nothing() {
    let Some(s) = server(|_| {}) else {
        return;
    };
    let mut by = Client::subscribe(s.addr, "/events/by");
    wait_streams(s.addr, 1);

    attack(&s, &mut by, "rapid reset", ENHANCE_YOUR_CALM, |h| {
        let mut out = Vec::new();
        for _ in 0..2000 {
            let sid = h.next_sid;
            h.next_sid += 2;
            out.extend(frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                sid,
                &request_block("GET", "/events/rr", &[]),
            ));
            out.extend(frame(RST_STREAM, 0, sid, &CANCEL.to_be_bytes()));
        }
        h.send(&out);
    });
    attack(&s, &mut by, "continuation flood", ENHANCE_YOUR_CALM, |h| {
        let mut out = frame(HEADERS, 0, 1, &request_block("GET", "/events/cf", &[]));
        for _ in 0..200 {
            out.extend(frame(CONTINUATION, 0, 1, &[0u8; 0]));
            let mut b = Vec::new();
            literal(&mut b, "x-pad", &[b'a'; 900]);
            out.extend(frame(CONTINUATION, 0, 1, &b));
        }
        h.send(&out);
    });
    for (name, kind, flags, payload) in [
        ("ping flood", PING, 0, vec![0u8; 8]),
        ("settings flood", SETTINGS, 0, vec![]),
        (
            "window update flood",
            WINDOW_UPDATE,
            0,
            1u32.to_be_bytes().to_vec(),
        ),
    ] {
        attack(&s, &mut by, name, ENHANCE_YOUR_CALM, |h| {
            let mut out = Vec::new();
            for _ in 0..2000 {
                out.extend(frame(kind, flags, 0, &payload));
            }
            h.send(&out);
        });
    }
    attack(&s, &mut by, "hpack bomb", ENHANCE_YOUR_CALM, |h| {
        let mut b = request_block("GET", "/events/bomb", &[]);
        literal_indexed(&mut b, "x-bomb", &[b'b'; 4000]);
        for _ in 0..11_000 {
            indexed(&mut b, 62);
        }
        h.send_frame(HEADERS, END_HEADERS | END_STREAM, 1, &b);
    });
    attack(&s, &mut by, "made you reset", ENHANCE_YOUR_CALM, |h| {
        let mut out = Vec::new();
        for _ in 0..1000 {
            let sid = h.next_sid;
            h.next_sid += 2;
            out.extend(frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                sid,
                &request_block("GET", "/healthz", &[]),
            ));
            out.extend(frame(WINDOW_UPDATE, 0, sid, &0u32.to_be_bytes()));
        }
        h.send(&out);
    });
    attack(&s, &mut by, "oversized frame", FRAME_SIZE_ERROR, |h| {
        h.send_frame(PING, 0, 0, &[0u8; 20_000]);
    });
    attack(&s, &mut by, "even stream id", PROTOCOL_ERROR, |h| {
        h.send_frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            2,
            &request_block("GET", "/healthz", &[]),
        );
    });
    attack(&s, &mut by, "decreasing stream id", PROTOCOL_ERROR, |h| {
        h.send_frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            5,
            &request_block("GET", "/healthz", &[]),
        );
        h.send_frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            3,
            &request_block("GET", "/healthz", &[]),
        );
    });
    attack(
        &s,
        &mut by,
        "headers on a closed stream",
        STREAM_CLOSED,
        |h| {
            let sid = h.get("/healthz", &[]);
            h.until("the answer", |h| h.stream(sid).ended);
            h.send_frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                sid,
                &request_block("GET", "/healthz", &[]),
            );
        },
    );
    attack(&s, &mut by, "data on an idle stream", PROTOCOL_ERROR, |h| {
        h.send_frame(DATA, 0, 99, b"x");
    });
    attack(
        &s,
        &mut by,
        "push promise from a client",
        PROTOCOL_ERROR,
        |h| {
            h.send_frame(PUSH_PROMISE, END_HEADERS, 1, &[0, 0, 0, 2]);
        },
    );
    attack(
        &s,
        &mut by,
        "undecodable header block",
        COMPRESSION_ERROR,
        |h| {
            h.send_frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                1,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
            );
        },
    );
    attack(&s, &mut by, "window overflow", FLOW_CONTROL_ERROR, |h| {
        h.send_frame(WINDOW_UPDATE, 0, 0, &0x7fff_ffffu32.to_be_bytes());
    });

    // First frame not SETTINGS.
    let raw = std::net::TcpStream::connect(s.addr).unwrap();
    short_timeouts(&raw);
    let mut h = H2::wrap(raw);
    let mut out = PREFACE.to_vec();
    out.extend(frame(PING, 0, 0, &[0; 8]));
    h.send(&out);
    assert_eq!(h.until_closed().map(|g| g.1), Some(PROTOCOL_ERROR));

    for m in [
        "herald_h2_flood_reset_total",
        "herald_h2_flood_continuation_total",
        "herald_h2_flood_control_total",
        "herald_h2_flood_hpack_total",
        "herald_h2_flood_made_you_reset_total",
        "herald_h2_goaway_calm_total",
        "herald_h2_goaway_protocol_total",
        "herald_h2_goaway_frame_size_total",
        "herald_h2_goaway_compression_total",
        "herald_h2_goaway_flow_control_total",
    ] {
        assert!(metric(s.addr, m) >= 1, "{m} counted");
    }
}

#[test]
fn a_header_list_over_the_limit_is_answered_431_and_the_connection_lives() {
    let Some(s) = server(|_| {}) else {
        return;
    };
    let mut h = H2::connect(s.addr);
    let big = "v".repeat(10_000);
    let sid = h.get("/events/x", &[("x-big", &big)]);
    h.until("the answer", |h| h.stream(sid).ended);
    assert_eq!(h.stream(sid).status, Some(431));
    let ok = h.get("/healthz", &[]);
    h.until("the next answer", |h| h.stream(ok).ended);
    assert_eq!(h.stream(ok).status, Some(200));
    assert!(h.goaway.is_none());
}

#[test]
fn malformed_requests_get_rst_stream_protocol_error_and_the_connection_lives() {
    let Some(s) = server(|_| {}) else {
        return;
    };
    let mut h = H2::connect(s.addr);
    let mut bad = Vec::new();
    for extra in [
        vec![("connection", "keep-alive")],
        vec![("Upper-Case", "x")],
        vec![("te", "gzip")],
    ] {
        let sid = h.next_sid;
        h.next_sid += 2;
        h.send_frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            sid,
            &request_block("GET", "/healthz", &extra),
        );
        bad.push(sid);
    }
    // No :path.
    let sid = h.next_sid;
    h.next_sid += 2;
    let mut b = Vec::new();
    literal(&mut b, ":method", b"GET");
    literal(&mut b, ":scheme", b"http");
    h.send_frame(HEADERS, END_HEADERS | END_STREAM, sid, &b);
    bad.push(sid);
    h.until("resets", |h| {
        bad.iter()
            .all(|sid| h.streams.get(sid).is_some_and(|st| st.reset.is_some()))
    });
    for sid in &bad {
        assert_eq!(h.stream(*sid).reset, Some(PROTOCOL_ERROR), "stream {sid}");
    }
    let ok = h.get("/healthz", &[]);
    h.until("the next answer", |h| h.stream(ok).ended);
    assert_eq!(h.stream(ok).status, Some(200));
    assert!(metric(s.addr, "herald_h2_stream_errors_total") >= 4);
}
