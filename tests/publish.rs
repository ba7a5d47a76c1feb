//! CONTRACT "Publishing": TCP and Unix ingest, HTTP POST, error lines, validation.
mod common;

use common::*;
use std::io::{Read, Write};

#[test]
fn tcp_ingest_publishes_valid_lines_and_answers_bad_ones_with_their_line_number() {
    let Some(s) = start(|_| {}) else { return };
    let mut c = Client::subscribe(s.addr, "/events/t");
    wait_streams(s.addr, 1);
    let lines = vec![
        event_line("t", "one"),
        "not json".to_string(),
        r#"{"data":"no topic"}"#.to_string(),
        String::new(),
        r#"{"topic":"bad topic!","data":"x"}"#.to_string(),
        r#"{"topic":"t","data":"x","id":"a\nb"}"#.to_string(),
        r#"{"topic":"t","data":"x","event":"a\rb"}"#.to_string(),
        r#"{"topic":"t","data":"x","id":"a\u0000b"}"#.to_string(),
        r#"{"topic":"t","data":7}"#.to_string(),
        event_line("t", "two"),
    ];
    let replies = ingest(s.ingest, &lines);
    let lines_with_errors: Vec<u64> = replies
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_str(r).expect("error replies are JSON");
            assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{r}");
            v["line"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(lines_with_errors, [2, 3, 5, 6, 7, 8, 9]);
    let evs = c.wait_events(2);
    assert_eq!(
        evs.iter().map(|e| e.data.as_str()).collect::<Vec<_>>(),
        ["one", "two"]
    );
    s.stop();
}

#[test]
fn unix_socket_ingest_publishes() {
    let dir = std::env::temp_dir().join(format!("herald-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ingest.sock");
    let p2 = path.clone();
    let Some(s) = start(move |c| c.ingest_unix = Some(p2)) else {
        return;
    };
    let mut c = Client::subscribe(s.addr, "/events/u");
    wait_streams(s.addr, 1);
    let mut u = std::os::unix::net::UnixStream::connect(&path).unwrap();
    writeln!(u, "{}", event_line("u", "over unix")).unwrap();
    writeln!(u, "{{oops").unwrap();
    u.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = String::new();
    u.read_to_string(&mut reply).unwrap();
    assert!(reply.contains("\"line\":2"), "{reply}");
    assert_eq!(c.wait_events(1)[0].data, "over unix");
    s.stop();
    assert!(!path.exists(), "socket file removed on shutdown");
}

#[test]
fn the_unix_socket_gets_the_mode_asked_for() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("herald-test-mode-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for mode in [0o600, 0o660] {
        let path = dir.join(format!("ingest-{mode:o}.sock"));
        let p2 = path.clone();
        let Some(s) = start(move |c| {
            c.ingest_unix = Some(p2);
            c.ingest_unix_mode = Some(mode);
        }) else {
            return;
        };
        let got = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(got, mode, "{mode:o}");
        s.stop();
    }
}

#[test]
fn http_publish_returns_the_id_and_reaches_subscribers() {
    let Some(s) = start(|_| {}) else { return };
    let mut c = Client::subscribe(s.addr, "/events/h");
    wait_streams(s.addr, 1);
    let r = http_publish(s.addr, "h?event=note&id=abc", "posted\nbody");
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["id"], "abc");
    let r = http_publish(s.addr, "h", "auto id");
    let auto: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let evs = c.wait_events(2);
    assert_eq!(
        (
            evs[0].event.as_str(),
            evs[0].data.as_str(),
            evs[0].id.as_deref()
        ),
        ("note", "posted\nbody", Some("abc"))
    );
    assert_eq!(evs[1].id.as_deref(), auto["id"].as_str());
    // Bad id over HTTP: 400, and nothing is published.
    let r = http_publish(s.addr, "h?id=a%0Ab", "x");
    assert_eq!(r.status, 400, "{}", r.text());
    // The next event the subscriber gets is the one after the refusal.
    assert_eq!(http_publish(s.addr, "h", "after").status, 200);
    let evs = c.wait_events(3);
    assert_eq!(
        evs[2].data, "after",
        "the refused event never arrived: {evs:?}"
    );
    assert_eq!(metric(s.addr, "herald_events_ingested_total"), 3);
    s.stop();
}

#[test]
fn http_publish_is_refused_from_addresses_not_allowed() {
    let Some(s) = start(|c| c.publish_allow = vec!["10.0.0.0/8".parse().unwrap()]) else {
        return;
    };
    let r = http_publish(s.addr, "t", "x");
    assert_eq!(r.status, 403);
    assert_eq!(http_get(s.addr, "/healthz").status, 200);
    wait_for("the 403 counted by status", || {
        metric(s.addr, "herald_http_403_total") == 1
            && metric(s.addr, "herald_http_errors_total") == 1
    });
    s.stop();
}

#[test]
fn an_overlong_ingest_line_gets_an_error_and_the_connection_survives() {
    let Some(s) = start(|c| c.max_event = 1024) else {
        return;
    };
    let mut c = Client::subscribe(s.addr, "/events/t");
    wait_streams(s.addr, 1);
    let big = event_line("t", &"x".repeat(64 * 1024));
    let replies = ingest(s.ingest, &[big, event_line("t", "small")]);
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert!(replies[0].contains("\"line\":1"));
    assert_eq!(c.wait_events(1)[0].data, "small");
    s.stop();
}

/// The worker that hosts ingest publishes for its own subscribers without waking anyone:
/// no other thread is on the path, and it skips its own eventfd (it is awake).
#[test]
fn events_for_the_ingest_workers_own_subscribers_wake_no_thread() {
    const N: usize = 500;
    let Some(s) = start(|c| c.workers = 1) else {
        return;
    };
    let mut c = Client::subscribe(s.addr, "/events/own");
    wait_streams(s.addr, 1);
    // Several connections and reads, so several batches.
    for chunk in (0..N).collect::<Vec<_>>().chunks(100) {
        let lines: Vec<String> = chunk
            .iter()
            .map(|i| event_line("own", &i.to_string()))
            .collect();
        assert!(ingest(s.ingest, &lines).is_empty());
    }
    let got: Vec<String> = c.wait_events(N).iter().map(|e| e.data.clone()).collect();
    assert_eq!(got, (0..N).map(|i| i.to_string()).collect::<Vec<_>>());
    assert_eq!(metric(s.addr, "herald_events_ingested_total"), N as u64);
    assert_eq!(metric(s.addr, "herald_worker_wakeups_total"), 0);
    s.stop();
}

/// One publisher sends more events than a worker's inbox holds, to the ingest worker's
/// own subscriber, in one write: every event arrives once, in order, and nobody is cut.
/// (Whether a step fills the inbox depends on how much the socket holds when it reads;
/// the hub's unit test stages the full inbox itself.)
#[test]
fn a_flood_larger_than_an_inbox_reaches_the_ingest_workers_own_subscriber_whole() {
    let n = herald::fanout::bus::INBOX_CAPACITY + 34_464; // 100,000
    let Some(s) = start(|c| {
        c.workers = 1;
        c.max_backlog = 64 << 20;
    }) else {
        return;
    };
    let mut c = Client::subscribe(s.addr, "/events/full");
    wait_streams(s.addr, 1);
    let lines: Vec<String> = (0..n).map(|i| event_line("full", &i.to_string())).collect();
    assert!(ingest(s.ingest, &lines).is_empty());
    let got = c.wait_events(n);
    assert_eq!(got.len(), n);
    assert!(
        got.iter().enumerate().all(|(i, e)| e.data == i.to_string()),
        "every event once, in order"
    );
    assert_eq!(metric(s.addr, "herald_slow_consumer_disconnects_total"), 0);
    s.stop();
}
