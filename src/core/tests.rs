//! The worker core driven by hand (`harness`): the states a real socket reaches only by
//! luck (a write in flight, a short write, a full socket, a shutdown in the middle of it),
//! staged exactly, with every stream read back by a strict chunked parser.

use std::time::Duration;

use proptest::prelude::*;

use super::harness::{event_data, parse_chunked_stream, sse_blocks, Harness};
use super::ConnId;

const SUB: &[u8] = b"GET /events/t HTTP/1.1\r\nHost: x\r\n\r\n";

/// A subscriber to `path` whose response head has been written.
fn subscriber(h: &mut Harness, path: &str) -> ConnId {
    let c = h.connect();
    h.send(
        c,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    );
    h.settle();
    assert!(h.is_open(c));
    c
}

fn payload(i: usize, len: usize) -> String {
    let tag = format!("{i}:");
    format!("{tag}{}", "x".repeat(len - tag.len()))
}

/// The `retry:` values that stand alone in a body (the drain hint, not the head's).
fn retry_hints(body: &[u8]) -> Vec<u32> {
    sse_blocks(body)
        .iter()
        .filter(|b| b.len() == 1)
        .filter_map(|b| b[0].strip_prefix("retry: ")?.parse().ok())
        .collect()
}

/// The scenario of a deploy under load: big events fill the socket, a write is in flight
/// (or was short), SIGTERM arrives, the client then reads at its own pace.
fn drain_mid_write(short_first: bool, epoll: bool) {
    let mut h = Harness::new(|c| {
        c.drain_window = Duration::from_secs(10);
    });
    let c = subscriber(&mut h, "/events/t");
    let sent: Vec<String> = (0..20).map(|i| payload(i, 30_000)).collect();
    for d in &sent {
        h.publish("t", d, None);
    }
    h.turn();
    let first = h.inflight_len(c);
    assert!(first > 0, "a write is in flight");
    if short_first {
        // Part of a frame went out; the rest waits.
        if epoll {
            h.block(c, 4_097);
        } else {
            h.complete(c, 4_097);
        }
    }
    h.stop();
    h.turn();
    assert!(h.core.is_draining());
    // The client now reads in odd-sized pieces, with time passing between them.
    let mut step = 0usize;
    while h.is_open(c) {
        step += 1;
        assert!(step < 10_000, "the drain never finished");
        if epoll && h.inflight_len(c) == 0 {
            h.writable(c);
        }
        if h.inflight_len(c) > 0 {
            let n = 1 + (step * 7_919) % 9_000;
            if epoll && step % 2 == 0 {
                h.block(c, n);
            } else {
                h.complete(c, n);
            }
        }
        h.advance(Duration::from_millis(20));
        h.turn();
    }
    let s = parse_chunked_stream(h.output(c)).expect("strict chunked framing");
    assert_eq!(event_data(&s.body), sent, "every event, whole and in order");
    assert!(s.ended, "the last chunk");
    let hints = retry_hints(&s.body);
    assert_eq!(hints.len(), 1, "one drain hint");
    assert!(hints[0] >= 1000);
    let blocks = sse_blocks(&s.body);
    assert_eq!(
        blocks.last().unwrap(),
        &vec![format!("retry: {}", hints[0])],
        "the hint comes after every event"
    );
    assert_eq!(h.core.counters.drain_cut, 0);
}

#[test]
fn a_drain_with_a_write_in_flight_keeps_every_frame_whole() {
    drain_mid_write(false, false);
}

#[test]
fn a_drain_after_a_short_write_keeps_every_frame_whole() {
    drain_mid_write(true, false);
}

#[test]
fn a_drain_with_a_full_socket_keeps_every_frame_whole() {
    drain_mid_write(true, true);
}

#[test]
fn the_drain_hint_is_never_shorter_than_the_topics_retry() {
    let mut h = Harness::new(|c| c.retry = Some(700));
    let a = subscriber(&mut h, "/events/t");
    let b = subscriber(&mut h, "/events?topic=t&topic=u");
    let plain = subscriber(&mut h, "/events/other");
    h.publish("t", "one", Some(5000));
    h.publish("u", "two", Some(9000));
    h.settle();
    h.stop();
    for _ in 0..1000 {
        h.advance(Duration::from_millis(50));
        h.settle();
    }
    for (c, base) in [(a, 5000), (b, 9000), (plain, 700)] {
        let s = parse_chunked_stream(h.output(c)).unwrap();
        // The head's own `retry: 700` may come first; the drain hint is the last block.
        let hint = *retry_hints(&s.body).last().expect("a drain hint");
        assert_eq!(
            sse_blocks(&s.body).last().unwrap(),
            &vec![format!("retry: {hint}")]
        );
        let spread = (base / 2).max(1000);
        assert!(
            hint >= base && hint < base + spread,
            "hint {hint} for a stream that carried {base}"
        );
        assert!(s.ended);
    }
}

#[test]
fn a_stream_not_done_by_the_end_of_the_window_is_cut_and_counted() {
    let mut h = Harness::new(|c| c.drain_window = Duration::from_secs(1));
    let c = subscriber(&mut h, "/events/t");
    h.publish("t", &payload(0, 50_000), None);
    h.turn();
    assert!(h.inflight_len(c) > 0);
    h.stop();
    h.turn();
    // The send never completes.
    for _ in 0..150 {
        h.advance(Duration::from_millis(10));
        h.turn();
    }
    assert!(!h.is_open(c));
    assert_eq!(h.core.counters.drain_cut, 1);
    assert!(h.core.poll_exit());
}

/// A worker that falls behind can see a stream's turn to end and the end of the window
/// in the same tick: the stream, flushed, gets its trailer queued at its turn, and the
/// window's end must not cut it before the trailer is written.
#[test]
fn a_turn_due_in_the_same_tick_as_the_window_end_still_gets_its_trailer() {
    let mut h = Harness::new(|c| c.drain_window = Duration::from_secs(1));
    let first = subscriber(&mut h, "/events/t");
    let last = subscriber(&mut h, "/events/t");
    h.publish("t", "before", None);
    h.settle();
    h.stop();
    h.turn();
    // The worker is late: the last stream's turn (half the window in) and the window's
    // end pass together.
    h.advance(Duration::from_millis(1_500));
    h.settle();
    for c in [first, last] {
        let s = parse_chunked_stream(h.output(c)).expect("a whole chunked stream");
        assert!(s.ended, "stream {c} ended with its last chunk");
        assert_eq!(event_data(&s.body), ["before"]);
    }
    assert_eq!(h.core.counters.drain_cut, 0);
}

#[test]
fn a_stalled_write_is_cut_after_the_write_timeout_not_the_keepalive() {
    let mut h = Harness::new(|c| {
        c.write_timeout = Duration::from_secs(2);
        c.keepalive = Duration::from_secs(15);
    });
    let c = subscriber(&mut h, "/events/t");
    h.publish("t", "x", None);
    h.turn();
    assert!(h.inflight_len(c) > 0);
    h.advance(Duration::from_millis(1_900));
    h.turn();
    assert!(h.is_open(c), "not before the timeout");
    h.advance(Duration::from_millis(200));
    h.turn();
    assert!(!h.is_open(c), "cut at the write timeout");
    assert_eq!(h.core.counters.slow_consumer_disconnects, 1);
}

#[test]
fn a_slow_but_steady_reader_is_not_a_stalled_one() {
    let mut h = Harness::new(|c| c.write_timeout = Duration::from_secs(2));
    let c = subscriber(&mut h, "/events/t");
    let sent: Vec<String> = (0..10).map(|i| payload(i, 30_000)).collect();
    for d in &sent {
        h.publish("t", d, None);
    }
    // 10 KB a second: every short send is progress.
    for _ in 0..60 {
        h.turn();
        if h.inflight_len(c) > 0 {
            h.complete(c, 10_000);
        }
        h.advance(Duration::from_secs(1));
    }
    h.settle();
    assert!(h.is_open(c));
    let s = parse_chunked_stream(h.output(c)).unwrap();
    assert_eq!(event_data(&s.body), sent);
}

#[test]
fn a_keepalive_falling_due_mid_frame_waits_for_the_frame_boundary() {
    let mut h = Harness::new(|c| {
        c.keepalive = Duration::from_secs(1);
        c.write_timeout = Duration::from_secs(30);
    });
    let c = subscriber(&mut h, "/events/t");
    h.publish("t", &payload(0, 20_000), None);
    h.turn();
    // A short send leaves the frame half written; the next write has not started when
    // the keep-alive falls due.
    h.complete(c, 5_000);
    h.advance(Duration::from_secs(3));
    h.core.set_now(h.now);
    h.core.handle_tick();
    h.settle();
    // Idle now: the next keep-alive is a whole frame after the event.
    h.advance(Duration::from_secs(3));
    h.settle();
    let s = parse_chunked_stream(h.output(c)).expect("no frame split");
    assert_eq!(event_data(&s.body), vec![payload(0, 20_000)]);
    assert!(s.body.ends_with(b":\n\n"), "a keep-alive after the event");
}

#[test]
fn pipelined_requests_after_a_publish_are_answered_in_order_and_keep_the_connection() {
    let mut h = Harness::new(|_| {});
    let req = b"POST /publish/t HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /healthz HTTP/1.1\r\n\r\nPOST /publish/t HTTP/1.1\r\nContent-Length: 3\r\n\r\nbyeGET /healthz HTTP/1.1\r\n\r\n";
    // Whole, and split at every byte boundary.
    for split in std::iter::once(req.len()).chain(1..req.len()) {
        let c = h.connect();
        h.send(c, &req[..split]);
        h.settle();
        h.send(c, &req[split..]);
        h.settle();
        let out = String::from_utf8(h.output(c).to_vec()).unwrap();
        let statuses: Vec<&str> = out.matches("HTTP/1.1 200 OK").collect();
        assert_eq!(statuses.len(), 4, "split {split}: {out}");
        let healthz = out.find("ok\n").unwrap();
        assert!(out.find("{\"id\":").unwrap() < healthz);
        assert!(h.is_open(c), "keep-alive");
        // The client half-closes with a last request: it is still answered.
        h.send(c, b"GET /healthz HTTP/1.1\r\n\r\n");
        h.eof(c);
        h.settle();
        assert!(!h.is_open(c), "closed after the last answer");
        let out = String::from_utf8(h.output(c).to_vec()).unwrap();
        assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 5);
    }
}

#[test]
fn a_request_sent_with_its_fin_gets_its_answer() {
    let mut h = Harness::new(|_| {});
    let c = h.connect();
    h.send(
        c,
        b"POST /publish/t HTTP/1.1\r\nContent-Length: 2\r\n\r\nhiGET /healthz HTTP/1.1\r\n\r\n",
    );
    h.eof(c);
    h.settle();
    let out = String::from_utf8(h.output(c).to_vec()).unwrap();
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
    assert!(out.ends_with("ok\n"));
    assert!(!h.is_open(c));
}

#[test]
fn a_subscriber_that_leaves_is_closed() {
    let mut h = Harness::new(|_| {});
    let c = h.connect();
    h.send(c, SUB);
    h.settle();
    h.eof(c);
    h.turn();
    assert!(!h.is_open(c));
}

#[test]
fn a_multi_topic_backlog_counts_every_topic() {
    let mut h = Harness::new(|c| c.max_backlog = 100_000);
    let c = subscriber(&mut h, "/events?topic=a&topic=b&topic=c&topic=d");
    h.turn();
    // Never reads: 4 topics x 30 KB is over the cap though no single topic is.
    for t in ["a", "b", "c", "d"] {
        h.publish(t, &payload(0, 30_000), None);
        h.turn();
    }
    assert!(!h.is_open(c), "cut past the per-connection backlog");
    assert_eq!(h.core.counters.slow_consumer_disconnects, 1);
}

#[test]
fn a_per_user_topics_log_is_freed_once_its_only_subscriber_has_written_it_all() {
    let mut h = Harness::new(|_| {});
    let user = subscriber(&mut h, "/events/u1");
    let (a, b) = (
        subscriber(&mut h, "/events/shared"),
        subscriber(&mut h, "/events/shared"),
    );
    for i in 0..3 {
        h.publish("u1", &payload(i, 1_000), None);
    }
    h.publish("shared", &payload(9, 1_000), None);
    h.turn();
    let u1 = h.core.topics.id("u1").unwrap() as usize;
    let shared = h.core.topics.id("shared").unwrap() as usize;
    // A short write: what is not yet written stays in the log.
    let n = h.inflight_len(user);
    h.complete(user, n / 2);
    assert!(h.core.topics[u1].has_log());
    h.turn();
    h.complete(user, usize::MAX);
    assert!(
        !h.core.topics[u1].has_log(),
        "nothing left to write, no log kept"
    );
    // A topic with another local subscriber keeps its log for the one still writing.
    h.complete(a, usize::MAX);
    assert!(h.core.topics[shared].has_log());
    h.complete(b, usize::MAX);
    let want: Vec<String> = (0..3).map(|i| payload(i, 1_000)).collect();
    assert_eq!(event_data(h.output(user)), want);
    assert_eq!(event_data(h.output(b)), [payload(9, 1_000)]);
    // A shared topic is trimmed at its next event (the broadcast path); the backlog
    // counter agrees with what the logs hold.
    h.publish("u1", &payload(3, 1_000), None);
    h.settle();
    assert!(!h.core.topics[u1].has_log());
    assert_eq!(
        h.core.counters.fanout_backlog_bytes,
        h.core.topics[shared].pending_bytes()
    );
    assert!(h.core.topics[shared].pending_bytes() > 0);
}

/// One step of the merge property test.
#[derive(Debug, Clone)]
enum Op {
    Publish { topic: usize, len: usize },
    Write { fraction: u8, block: bool },
    Turn,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0usize..4, 1usize..3000).prop_map(|(topic, len)| Op::Publish { topic, len }),
        (any::<u8>(), any::<bool>()).prop_map(|(fraction, block)| Op::Write { fraction, block }),
        Just(Op::Turn),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A subscriber to three of four topics, written to in arbitrary short writes (uring
    /// short completions and epoll full sockets mixed), receives exactly the reference
    /// merge: every event of its topics, once, in publish order, every frame whole.
    #[test]
    fn multi_topic_merges_survive_arbitrary_partial_writes(ops in proptest::collection::vec(op(), 1..120)) {
        let topics = ["a", "b", "c", "z"];
        let mut h = Harness::new(|c| c.max_backlog = 64 << 20);
        let c = subscriber(&mut h, "/events?topic=a&topic=b&topic=c");
        let mut reference = Vec::new();
        let mut n = 0;
        for op in ops {
            match op {
                Op::Publish { topic, len } => {
                    n += 1;
                    let d = payload(n, len.max(8));
                    h.publish(topics[topic], &d, None);
                    if topic < 3 {
                        reference.push(d);
                    }
                }
                Op::Write { fraction, block } => {
                    let len = h.inflight_len(c);
                    if len > 0 {
                        let k = len * fraction as usize / 255;
                        if block { h.block(c, k); h.writable(c); } else { h.complete(c, k); }
                    }
                }
                Op::Turn => h.turn(),
            }
        }
        h.settle();
        let s = parse_chunked_stream(h.output(c)).map_err(TestCaseError::fail)?;
        prop_assert_eq!(event_data(&s.body), reference);
    }
}

#[test]
fn a_resume_is_fed_as_the_client_reads_then_live_events_follow() {
    let mut h = Harness::new(|c| {
        c.history_events = 5000;
        c.max_backlog = 1 << 20;
    });
    // Something must be subscribed for the worker to have seen the events.
    let _other = subscriber(&mut h, "/events/t");
    let first = h.publish("t", &payload(0, 1000), None);
    let mut want = Vec::new();
    for i in 1..2000 {
        let d = payload(i, 1000);
        h.publish("t", &d, None);
        want.push(d);
    }
    h.settle();
    let c = h.connect();
    h.send(
        c,
        format!(
            "GET /events/t HTTP/1.1\r\nLast-Event-ID: {}\r\n\r\n",
            first.id
        )
        .as_bytes(),
    );
    h.turn();
    // 2 MB retained, but the client holds one batch at a time.
    let held: usize = h.core.conn(c).unwrap().pre.iter().map(|b| b.len()).sum();
    assert!(held <= 80 << 10, "{held} bytes queued at once");
    for i in 2000..2010 {
        let d = payload(i, 1000);
        h.publish("t", &d, None);
        want.push(d);
        h.turn();
        if h.inflight_len(c) > 0 {
            h.complete(c, 3000);
        }
    }
    h.settle();
    let s = parse_chunked_stream(h.output(c)).unwrap();
    assert_eq!(
        event_data(&s.body),
        want,
        "replay, then live, no gap, no duplicate"
    );
}
