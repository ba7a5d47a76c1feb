//! Fan-out at scale: every subscriber gets every event exactly once, in order; stalled
//! subscribers are cut off without holding up anyone else.
mod common;

use common::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[test]
fn two_thousand_subscribers_get_two_hundred_events_each_exactly_once_in_order() {
    const SUBS: usize = 2000;
    const EVENTS: usize = 200;
    // Small io_uring tables: the subscribers spread over several rings per worker.
    let Some(s) = start(|c| c.uring_table = Some(256)) else {
        return;
    };
    let mut crowd = Crowd::connect(s.addr, "/events/bulk", SUBS);
    wait_streams(s.addr, SUBS as u64);
    let lines: Vec<String> = (0..EVENTS)
        .map(|i| event_line("bulk", &i.to_string()))
        .collect();
    for chunk in lines.chunks(20) {
        assert!(ingest(s.ingest, chunk).is_empty());
    }
    let all = crowd.pump_until(Duration::from_secs(60), |cs| {
        cs.iter().all(|c| c.events.len() >= EVENTS)
    });
    let short = crowd
        .conns
        .iter()
        .filter(|c| c.events.len() < EVENTS)
        .count();
    assert!(all, "{short} subscribers missed events");
    // A little longer: nothing extra may arrive (no duplicates).
    crowd.pump_until(Duration::from_millis(200), |_| false);
    for (i, c) in crowd.conns.iter().enumerate() {
        assert_eq!(c.events.len(), EVENTS, "subscriber {i} event count");
        for (k, e) in c.events.iter().enumerate() {
            assert_eq!(
                e.data,
                k.to_string(),
                "subscriber {i} event {k} out of order"
            );
        }
        assert!(!c.closed);
    }
    assert_eq!(
        metric(s.addr, "herald_events_delivered_total"),
        (SUBS * EVENTS) as u64
    );
    s.stop();
}

#[test]
fn stalled_subscribers_are_disconnected_and_fast_ones_get_everything() {
    const FAST: usize = 2000;
    const STALLED: usize = 200;
    const EVENTS: usize = 1000;
    const BURST: usize = 20;
    const BACKLOG: u64 = 64 << 10;
    let Some(s) = start(|c| {
        c.max_backlog = BACKLOG as usize;
        c.uring_table = Some(1024);
    }) else {
        return;
    };
    // Stalled: tiny receive buffers, never read.
    let stalled: Vec<std::net::TcpStream> = (0..STALLED)
        .map(|_| {
            let sock =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            sock.set_recv_buffer_size(4096).unwrap();
            sock.connect(&s.addr.into()).unwrap();
            let mut t: std::net::TcpStream = sock.into();
            use std::io::Write;
            t.write_all(b"GET /events/load HTTP/1.1\r\nHost: t\r\n\r\n")
                .unwrap();
            t
        })
        .collect();
    let mut crowd = Crowd::connect(s.addr, "/events/load", FAST);
    wait_streams(s.addr, (FAST + STALLED) as u64);
    // 1,000 events of 1 KB: each stalled subscriber would need 1 MB kept for it.
    let payload = "p".repeat(1000);
    let lines: Vec<String> = (0..EVENTS)
        .map(|i| event_line("load", &format!("{i} {payload}")))
        .collect();
    let ingest_addr = s.ingest;
    let addr = s.addr;
    // Publish in bursts while the fast crowd is read, never more than one burst ahead of
    // the slowest fast reader (this test's reader is one thread; herald is not the limit),
    // and watch what herald holds for its subscribers as it goes.
    let fast_min = Arc::new(AtomicUsize::new(0));
    let seen = fast_min.clone();
    let publisher = std::thread::spawn(move || {
        let mut peak = 0;
        for (k, chunk) in lines.chunks(BURST).enumerate() {
            wait_for("the fast crowd to catch up", || {
                seen.load(Ordering::Acquire) + BURST >= k * BURST
            });
            assert!(ingest(ingest_addr, chunk).is_empty());
            peak = peak.max(metric(addr, "herald_fanout_backlog_bytes"));
        }
        peak
    });
    let all = crowd.pump_until(Duration::from_secs(90), |cs| {
        let min = cs.iter().map(|c| c.events.len()).min().unwrap_or(0);
        fast_min.store(min, Ordering::Release);
        min >= EVENTS
    });
    if !all {
        let closed = crowd.conns.iter().filter(|c| c.closed).count();
        let min = crowd.conns.iter().map(|c| c.events.len()).min();
        panic!(
            "fast subscribers missed events: {closed} closed, fewest events {min:?}, slow disconnects {}",
            metric(s.addr, "herald_slow_consumer_disconnects_total")
        );
    }
    let peak = publisher.join().unwrap();
    for c in &crowd.conns {
        assert!(!c.closed, "a fast subscriber was disconnected");
        for (k, e) in c.events.iter().enumerate() {
            assert!(e.data.starts_with(&format!("{k} ")));
        }
    }
    wait_for("stalled subscribers cut off", || {
        metric(s.addr, "herald_slow_consumer_disconnects_total") >= STALLED as u64
    });
    wait_for("stalled streams closed", || {
        metric(s.addr, "herald_streams_open") == FAST as u64
    });
    // Bounded: never more than the backlog cap (plus a burst in flight to the fast ones)
    // per worker, against the 1 MB per stalled subscriber an unbounded queue would hold.
    let bound = 2 * (BACKLOG + (BURST as u64 + 1) * 1100);
    assert!(
        peak <= bound,
        "fan-out backlog peaked at {peak} bytes (bound {bound})"
    );
    drop(stalled);
    s.stop();
}
