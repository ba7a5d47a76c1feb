//! Hostile clients (issue 9): request smuggling and RFC 9112 §6 framing, pipelining and
//! keep-alive after every kind of request, the ingest stall under a flood of bad lines,
//! the ingest idle timeout and connection cap, and responses to clients that half-close.
mod common;

use common::*;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Longest silence tolerated from herald while a reply is still due.
const QUIET: Duration = Duration::from_secs(10);

/// One HTTP response as read off the wire.
#[derive(Debug)]
struct Resp {
    status: u16,
    head: String,
    body: Vec<u8>,
}

/// Parses the first complete response in `buf` (Content-Length framed, or a bodiless
/// 204); returns it and the bytes it took.
fn parse_response(buf: &[u8]) -> Option<(Resp, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
    let len = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, v)| {
            v.trim().parse::<usize>().expect("numeric length")
        });
    let total = end + 4 + len;
    (buf.len() >= total).then(|| {
        let body = buf[end + 4..total].to_vec();
        (Resp { status, head, body }, total)
    })
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(QUIET)).unwrap();
    s
}

/// Reads until herald closes; panics if it goes quiet for `QUIET` first.
fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return all,
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return all,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!(
                "herald went quiet for {QUIET:?} ({e}) without closing, after {} bytes ending {:?}",
                all.len(),
                String::from_utf8_lossy(&all[all.len().saturating_sub(120)..])
            ),
        }
    }
}

/// Every response herald sends on this connection until it closes it.
fn responses_until_close(s: &mut TcpStream) -> Vec<Resp> {
    let mut raw = read_to_close(s);
    let mut out = Vec::new();
    while let Some((r, n)) = parse_response(&raw) {
        out.push(r);
        raw.drain(..n);
    }
    assert!(
        raw.is_empty(),
        "trailing bytes: {:?}",
        String::from_utf8_lossy(&raw)
    );
    out
}

/// Reads exactly one response, keeping what follows in `pending`.
fn read_one(s: &mut TcpStream, pending: &mut Vec<u8>) -> Resp {
    let mut buf = [0u8; 65536];
    loop {
        if let Some((r, n)) = parse_response(pending) {
            pending.drain(..n);
            return r;
        }
        match s.read(&mut buf) {
            Ok(0) => panic!(
                "closed before a whole response: {:?}",
                String::from_utf8_lossy(pending)
            ),
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("no response: {e}"),
        }
    }
}

/// A request that, if executed, would show as a second response.
const SMUGGLED: &str = "GET /healthz?smuggled HTTP/1.1\r\nHost: t\r\n\r\n";

#[test]
fn bodies_on_bodiless_methods_and_ambiguous_framing_get_one_400_and_a_close() {
    let Some(s) = start(|_| {}) else { return };
    let n = SMUGGLED.len();
    let chunk = format!("{n:x}\r\n{SMUGGLED}\r\n0\r\n\r\n");
    let cases: Vec<(&str, String)> = vec![
        (
            "GET with a Content-Length body",
            format!("GET /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: {n}\r\n\r\n{SMUGGLED}"),
        ),
        (
            "HEAD with a Content-Length body",
            format!("HEAD /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: {n}\r\n\r\n{SMUGGLED}"),
        ),
        (
            "OPTIONS preflight with a body",
            format!(
                "OPTIONS /events/a HTTP/1.1\r\nHost: t\r\nContent-Length: {n}\r\n\r\n{SMUGGLED}"
            ),
        ),
        (
            "DELETE with a body",
            format!("DELETE /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: {n}\r\n\r\n{SMUGGLED}"),
        ),
        (
            "GET with a chunked body",
            format!("GET /healthz HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}"),
        ),
        (
            "GET with an empty chunked body",
            format!(
                "GET /healthz HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
        ),
        (
            "GET with chunked applied twice",
            format!(
                "GET /healthz HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, chunked\r\n\r\n{chunk}"
            ),
        ),
        (
            "GET with Content-Length and Transfer-Encoding",
            format!(
                "GET /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: {n}\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}"
            ),
        ),
        (
            "POST with Content-Length and Transfer-Encoding",
            format!(
                "POST /publish/t HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n{chunk}"
            ),
        ),
        (
            "POST with differing Content-Lengths",
            format!(
                "POST /publish/t HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nContent-Length: {}\r\n\r\nab{SMUGGLED}",
                n + 2
            ),
        ),
        (
            "POST with an overflowing Content-Length",
            format!(
                "POST /publish/t HTTP/1.1\r\nHost: t\r\nContent-Length: 18446744073709551617\r\n\r\n{SMUGGLED}"
            ),
        ),
        (
            "POST with a signed Content-Length",
            format!("POST /publish/t HTTP/1.1\r\nHost: t\r\nContent-Length: +2\r\n\r\nab{SMUGGLED}"),
        ),
        (
            "obs-fold hiding a Content-Length",
            format!(
                "GET /healthz HTTP/1.1\r\nHost: t\r\nX-A: a\r\n Content-Length: {n}\r\n\r\n{SMUGGLED}"
            ),
        ),
        (
            "bare CR hiding a Content-Length",
            format!("GET /healthz HTTP/1.1\r\nHost: t\rContent-Length: {n}\r\n\r\n{SMUGGLED}"),
        ),
        (
            "whitespace before the colon",
            format!("GET /healthz HTTP/1.1\r\nHost: t\r\nContent-Length : {n}\r\n\r\n{SMUGGLED}"),
        ),
    ];
    let mut failures = Vec::new();
    for (what, req) in &cases {
        let mut c = connect(s.addr);
        c.write_all(req.as_bytes()).unwrap();
        let got = responses_until_close(&mut c);
        let statuses: Vec<u16> = got.iter().map(|r| r.status).collect();
        if statuses != [400] || !got[0].head.contains("Connection: close") {
            failures.push(format!("{what}: {statuses:?}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    // The server is still fine, and a harmless `Content-Length: 0` on a GET is served.
    let ok = raw_request(
        s.addr,
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert_eq!((ok.status, ok.text().as_str()), (200, "ok\n"));
    s.stop();
}

#[test]
fn a_publish_smuggled_in_a_get_body_is_not_published() {
    let Some(s) = start(|_| {}) else { return };
    let mut sub = Client::subscribe(s.addr, "/events/smug");
    wait_streams(s.addr, 1);
    let ingested = metric(s.addr, "herald_events_ingested_total");
    let inner = "POST /publish/smug HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\n\r\nsecret";
    let mut c = connect(s.addr);
    write!(
        c,
        "GET /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{inner}",
        inner.len()
    )
    .unwrap();
    let statuses: Vec<u16> = responses_until_close(&mut c)
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, [400]);
    // A marker published afterwards is the first (and only) thing the subscriber sees.
    ingest(s.ingest, &[event_line("smug", "marker")]);
    let first = sub.wait_events(1)[0].data.clone();
    assert_eq!(first, "marker", "{:?}", sub.events);
    assert_eq!(
        metric(s.addr, "herald_events_ingested_total"),
        ingested + 1,
        "only the marker was ingested"
    );
    s.stop();
}

/// One of each kind of request, and what it must answer.
fn kinds() -> Vec<(&'static str, String, u16)> {
    vec![
        (
            "healthz",
            "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n".into(),
            200,
        ),
        (
            "metrics",
            "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n".into(),
            200,
        ),
        (
            "publish",
            "POST /publish/pk HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello".into(),
            200,
        ),
        (
            "preflight",
            "OPTIONS /events/pk HTTP/1.1\r\nHost: t\r\nOrigin: https://a.example\r\n\
             Access-Control-Request-Method: GET\r\n\r\n"
                .into(),
            204,
        ),
        ("demo", "GET / HTTP/1.1\r\nHost: t\r\n\r\n".into(), 200),
    ]
}

#[test]
fn pipelining_after_every_kind_of_request() {
    let Some(s) = start(|_| {}) else { return };
    let mut sub = Client::subscribe(s.addr, "/events/pk");
    wait_streams(s.addr, 1);
    let kinds = kinds();
    // All kinds in one write, twice over, then a 404 (which closes): answered in order.
    let mut batch = String::new();
    for _ in 0..2 {
        for (_, req, _) in &kinds {
            batch.push_str(req);
        }
    }
    batch.push_str("GET /nope HTTP/1.1\r\nHost: t\r\n\r\n");
    let mut c = connect(s.addr);
    c.write_all(batch.as_bytes()).unwrap();
    let got: Vec<(u16, bool)> = responses_until_close(&mut c)
        .iter()
        .map(|r| (r.status, r.head.contains("Connection: close")))
        .collect();
    let mut want: Vec<(u16, bool)> = Vec::new();
    for _ in 0..2 {
        want.extend(kinds.iter().map(|(_, _, st)| (*st, false)));
    }
    want.push((404, true));
    assert_eq!(got, want);
    // Each pipelined publish reached the subscriber, once.
    let evs = sub.wait_events(2);
    assert_eq!(evs.len(), 2);
    assert!(evs.iter().all(|e| e.data == "hello"), "{evs:?}");
    s.stop();
}

#[test]
fn keep_alive_after_every_kind_of_request() {
    let Some(s) = start(|_| {}) else { return };
    let mut c = connect(s.addr);
    let mut pending = Vec::new();
    // After each kind (and after a 404 on a fresh connection) a /healthz on the same
    // connection is still answered.
    for (what, req, status) in kinds() {
        c.write_all(req.as_bytes()).unwrap();
        let r = read_one(&mut c, &mut pending);
        assert_eq!(r.status, status, "{what}: {}", r.head);
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let r = read_one(&mut c, &mut pending);
        assert_eq!(
            (r.status, r.body.as_slice()),
            (200, &b"ok\n"[..]),
            "after {what}"
        );
    }
    assert!(pending.is_empty());
    // A refused request closes its connection; the server serves the next one.
    let mut bad = connect(s.addr);
    bad.write_all(b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let got = responses_until_close(&mut bad);
    assert_eq!(got.iter().map(|r| r.status).collect::<Vec<_>>(), [404]);
    assert_eq!(http_get(s.addr, "/healthz").status, 200);
    s.stop();
}

/// The `line` number of each `{"error":...,"line":N}` reply.
fn reply_lines(raw: &[u8]) -> Vec<u64> {
    String::from_utf8(raw.to_vec())
        .expect("UTF-8 replies")
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("JSON reply");
            assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{l}");
            v["line"].as_u64().expect("line number")
        })
        .collect()
}

#[test]
fn a_flood_of_bad_lines_never_stalls_ingest() {
    const BAD: u64 = 200_000;
    let Some(s) = start(|_| {}) else { return };
    let mut sub = Client::subscribe(s.addr, "/events/stall");
    wait_streams(s.addr, 1);
    let mut publisher = connect(s.ingest);
    let mut writer = publisher.try_clone().unwrap();
    let feed = std::thread::spawn(move || {
        let mut all = "x\n".repeat(BAD as usize);
        all.push_str(&event_line("stall", "made it"));
        all.push('\n');
        writer.write_all(all.as_bytes()).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let t = Instant::now();
    // Every reply, then EOF: read_to_close fails if herald goes quiet instead.
    let raw = read_to_close(&mut publisher);
    feed.join().unwrap();
    let lines = reply_lines(&raw);
    assert_eq!(lines.len() as u64, BAD, "replies before EOF");
    assert!(
        lines.iter().copied().eq(1..=BAD),
        "line numbers in order, each once"
    );
    assert!(t.elapsed() < Duration::from_secs(120));
    assert_eq!(sub.wait_events(1)[0].data, "made it");
    assert!(metric(s.addr, "herald_ingest_lines_refused_total") >= BAD);
    s.stop();
}

#[test]
fn an_idle_ingest_connection_is_closed_with_an_error_line() {
    let Some(s) = start(|c| c.ingest_idle_timeout = Some(Duration::from_millis(300))) else {
        return;
    };
    let mut sub = Client::subscribe(s.addr, "/events/idle");
    wait_streams(s.addr, 1);
    let mut idle = connect(s.ingest);
    // A publisher that sent one line and then nothing is cut too, after its reply.
    writeln!(idle, "{}", event_line("idle", "before")).unwrap();
    let t = Instant::now();
    let raw = read_to_close(&mut idle);
    assert_eq!(
        String::from_utf8_lossy(&raw),
        "{\"error\":\"idle timeout\"}\n"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(sub.wait_events(1)[0].data, "before");
    assert!(metric(s.addr, "herald_ingest_idle_timeouts_total") >= 1);
    // Ingest still works.
    assert!(ingest(s.ingest, &[event_line("idle", "after")]).is_empty());
    assert_eq!(sub.wait_events(2)[1].data, "after");
    s.stop();
}

/// Proves an ingest connection is being served: a bad line gets its numbered reply.
fn served(s: &mut TcpStream) -> bool {
    if s.write_all(b"nope\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 256];
    let mut got = Vec::new();
    while !got.ends_with(b"\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).contains("\"line\":")
}

#[test]
fn ingest_connections_over_the_cap_get_one_error_line_and_a_close() {
    let Some(s) = start(|c| c.ingest_max_connections = 2) else {
        return;
    };
    let mut a = connect(s.ingest);
    let mut b = connect(s.ingest);
    assert!(served(&mut a) && served(&mut b));
    let mut extra = connect(s.ingest);
    let raw = read_to_close(&mut extra);
    assert_eq!(
        String::from_utf8_lossy(&raw),
        "{\"error\":\"too many ingest connections\"}\n"
    );
    assert!(metric(s.addr, "herald_ingest_connections_refused_total") >= 1);
    assert_eq!(metric(s.addr, "herald_ingest_connections_open"), 2);
    // The held ones still publish; once one leaves, a newcomer gets in.
    let mut sub = Client::subscribe(s.addr, "/events/cap");
    wait_streams(s.addr, 1);
    writeln!(a, "{}", event_line("cap", "held")).unwrap();
    assert_eq!(sub.wait_events(1)[0].data, "held");
    drop(b);
    wait_for("a free ingest slot", || served(&mut connect(s.ingest)));
    s.stop();
}

// ---- defect 2: half-close (fixed in the worker core, not here) --------------------

/// Sends `req`, half-closes, and returns every response until herald closes.
fn half_close(addr: SocketAddr, req: &str) -> Vec<Resp> {
    let mut c = connect(addr);
    c.write_all(req.as_bytes()).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    responses_until_close(&mut c)
}

#[test]
fn a_half_closed_get_gets_its_response() {
    let Some(s) = start(|_| {}) else { return };
    for i in 0..20 {
        let got = half_close(s.addr, "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
        let got: Vec<(u16, &[u8])> = got.iter().map(|r| (r.status, r.body.as_slice())).collect();
        assert_eq!(got, [(200, &b"ok\n"[..])], "request {i}");
    }
    s.stop();
}

#[test]
fn a_half_closed_publish_gets_its_id() {
    let Some(s) = start(|_| {}) else { return };
    for i in 0..10 {
        let got = half_close(
            s.addr,
            "POST /publish/hc HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\ndata",
        );
        assert_eq!(got.len(), 1, "publish {i}: {got:?}");
        assert_eq!(got[0].status, 200);
        let v: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
        assert!(v["id"].as_str().is_some_and(|id| !id.is_empty()), "{v}");
    }
    s.stop();
}

#[test]
fn three_pipelined_requests_then_half_close_get_three_answers() {
    let Some(s) = start(|_| {}) else { return };
    let req = "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n\
               POST /publish/hc HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\nx\
               GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n";
    for i in 0..10 {
        let got: Vec<u16> = half_close(s.addr, req).iter().map(|r| r.status).collect();
        assert_eq!(got, [200, 200, 200], "round {i}");
    }
    s.stop();
}
