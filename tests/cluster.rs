//! Cluster (`--cluster redis://...`): several herald nodes share one Redis Stream. Every
//! node delivers every event, in one order, with the same ids and the same bytes; a client
//! resumes on any node; Redis going away costs publishers a clear error and subscribers
//! nothing but a `herald-gap` where data was really lost. Every test runs real
//! `redis-server` processes (tests/common/redis.rs), on the backend the harness selects.
mod common;

use common::redis::{Redis, Resp};
use common::*;
use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PREFIX: &str = "herald";

// ------------------------------------------------------------------------------ nodes

/// An in-process node of the cluster behind `redis`, with a short keep-alive (so a test
/// sees streams stay alive while Redis is away) and room for every event in history.
fn node(redis: &Redis, tweak: impl FnOnce(&mut herald::Config)) -> Option<TestServer> {
    let url = redis.url();
    start(move |c| {
        c.cluster = Some(url);
        c.keepalive = Duration::from_millis(200);
        c.history_events = 10_000;
        tweak(c);
    })
}

fn nodes(redis: &Redis, n: usize) -> Option<Vec<TestServer>> {
    (0..n).map(|_| node(redis, |_| {})).collect()
}

fn addr_pair() -> (SocketAddr, SocketAddr) {
    (
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
    )
}

/// A node as a separate `herald serve` process (for `kill -9` and SIGSTOP).
fn spawn_node(redis: &Redis, listen: SocketAddr, ingest: SocketAddr) -> Option<Spawned> {
    let url = redis.url();
    spawn_at(
        listen,
        ingest,
        &[
            "--cluster",
            &url,
            "--keepalive",
            "200ms",
            "--history-events",
            "10000",
        ],
    )
    .map(|(child, _)| child)
}

// ------------------------------------------------------------------------------ ids

/// `{ms}-{n}-{epoch}` split into its Redis stream id and its epoch; panics on any other
/// shape (a plain decimal id means the cluster is not in the path).
fn cluster_id(id: &str) -> ((u64, u64), String) {
    let mut it = id.splitn(3, '-');
    let (ms, n, epoch) = (it.next(), it.next(), it.next());
    let parsed = (|| {
        let ms: u64 = ms?.parse().ok()?;
        let n: u64 = n?.parse().ok()?;
        let epoch = epoch.filter(|e| !e.is_empty())?;
        Some(((ms, n), epoch.to_string()))
    })();
    parsed.unwrap_or_else(|| panic!("id {id:?} is not {{ms}}-{{n}}-{{epoch}}"))
}

fn assert_increasing(ids: &[String]) {
    for w in ids.windows(2) {
        assert!(
            cluster_id(&w[0]).0 < cluster_id(&w[1]).0,
            "ids increase: {} then {}",
            w[0],
            w[1]
        );
    }
}

/// Ids (`ms-n`) Redis holds in the events stream.
fn redis_ids(redis: &Redis, key: &str) -> HashSet<String> {
    match redis.cmd(&["XRANGE", key, "-", "+"]) {
        Resp::Array(Some(entries)) => entries
            .into_iter()
            .map(|e| match e {
                Resp::Array(Some(mut kv)) => kv.swap_remove(0).text().expect("entry id"),
                other => panic!("XRANGE entry {other:?}"),
            })
            .collect(),
        other => panic!("XRANGE {key}: {other:?}"),
    }
}

// ------------------------------------------------------------------------------ subscriber

/// A subscriber that keeps the (de-chunked) body bytes as well as the parsed events, so
/// streams on different nodes can be compared byte for byte; reads with a short timeout so
/// a test can pump several of them.
struct Sub {
    stream: TcpStream,
    raw: Vec<u8>,
    body: Vec<u8>,
    parser: SseParser,
    events: Vec<Event>,
    closed: bool,
    ended: bool,
}

impl Sub {
    fn open(addr: SocketAddr, path: &str, last_id: Option<&str>) -> Sub {
        Sub::answer(Sub::request(addr, path, last_id))
    }

    /// Connect and send the subscribe request (a stopped server's kernel queues both).
    fn request(addr: SocketAddr, path: &str, last_id: Option<&str>) -> TcpStream {
        let mut stream = TcpStream::connect(addr).expect("connect");
        let extra = last_id
            .map(|id| format!("Last-Event-ID: {id}\r\n"))
            .unwrap_or_default();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n{extra}\r\n"
        )
        .unwrap();
        stream
    }

    /// Read the answer to `request`: a 200 event stream.
    fn answer(mut stream: TcpStream) -> Sub {
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let (status, headers, rest) = read_head(&mut stream);
        assert_eq!(status, 200, "subscribe");
        assert!(
            headers
                .get("transfer-encoding")
                .is_some_and(|v| v.contains("chunked")),
            "chunked stream"
        );
        stream
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let mut s = Sub {
            stream,
            raw: Vec::new(),
            body: Vec::new(),
            parser: SseParser::new(false),
            events: Vec::new(),
            closed: false,
            ended: false,
        };
        s.feed(&rest);
        s
    }

    fn feed(&mut self, bytes: &[u8]) {
        self.raw.extend_from_slice(bytes);
        let start = self.body.len();
        while let Some(eol) = self.raw.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(std::str::from_utf8(&self.raw[..eol]).unwrap(), 16)
                .expect("chunk size");
            if size == 0 {
                self.ended = true;
                self.raw.clear();
                break;
            }
            if self.raw.len() < eol + 4 + size {
                break;
            }
            self.body
                .extend_from_slice(&self.raw[eol + 2..eol + 2 + size]);
            self.raw.drain(..eol + 4 + size);
        }
        let new = self.body[start..].to_vec();
        self.parser.feed(&new, &mut self.events);
    }

    /// One read (at most ~20 ms); false when nothing came.
    fn pump(&mut self) -> bool {
        if self.closed {
            return false;
        }
        let mut buf = [0u8; 65536];
        match self.stream.read(&mut buf) {
            Ok(0) => {
                self.closed = true;
                false
            }
            Ok(n) => {
                self.feed(&buf[..n]);
                true
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                false
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => false,
            Err(_) => {
                self.closed = true;
                false
            }
        }
    }

    /// Read until `cond` holds; panics (with what was received) after WAIT or if the
    /// stream closes first.
    fn wait(&mut self, what: &str, cond: impl Fn(&Sub) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !cond(self) {
            assert!(
                !self.closed,
                "stream closed while waiting for {what}; got {:?}",
                self.events
            );
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; got {:?}",
                self.events
            );
            self.pump();
        }
    }

    /// Read until the server closes the connection (a killed node).
    fn read_until_closed(&mut self) {
        let deadline = Instant::now() + WAIT;
        while !self.closed {
            assert!(Instant::now() < deadline, "stream not closed in time");
            self.pump();
        }
    }

    /// Data events (not herald-gap), as the publisher's sequence numbers.
    fn seqs(&self) -> Vec<usize> {
        self.events
            .iter()
            .filter(|e| e.event != "herald-gap")
            .map(|e| {
                e.data
                    .parse()
                    .unwrap_or_else(|_| panic!("unexpected event {e:?}"))
            })
            .collect()
    }

    fn has_seq(&self, seq: usize) -> bool {
        let want = seq.to_string();
        self.events.iter().any(|e| e.data == want)
    }

    fn gaps(&self) -> Vec<&Event> {
        self.events
            .iter()
            .filter(|e| e.event == "herald-gap")
            .collect()
    }

    /// Each event's wire bytes (comment lines taken out), in order.
    fn blocks(&self) -> Vec<String> {
        String::from_utf8(self.body.clone())
            .expect("UTF-8 stream")
            .split("\n\n")
            .map(|b| {
                b.lines()
                    .filter(|l| !l.starts_with(':'))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .filter(|b| !b.is_empty())
            .collect()
    }
}

fn wait_all(subs: &mut [Sub], what: &str, cond: impl Fn(&Sub) -> bool) {
    for s in subs.iter_mut() {
        s.wait(what, &cond);
    }
}

// ------------------------------------------------------------------------------ publishing

fn publish_http(addr: SocketAddr, topic: &str, data: &str) -> Result<String, String> {
    let r = http_publish(addr, topic, data);
    match r.status {
        200 => {
            let v: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON answer");
            Ok(v["id"].as_str().expect("an id").to_string())
        }
        503 => {
            assert!(
                r.headers.contains_key("retry-after"),
                "a 503 for a publish says when to retry"
            );
            Err(format!("503 {}", r.text()))
        }
        s => panic!("POST /publish/{topic}: unexpected {s} {}", r.text()),
    }
}

/// One ingest line on its own connection: no reply line means Redis accepted it.
fn publish_ingest(ingest_addr: SocketAddr, line: String) -> Result<(), String> {
    let replies = ingest(ingest_addr, &[line]);
    match replies.as_slice() {
        [] => Ok(()),
        [one] => {
            let v: serde_json::Value = serde_json::from_str(one).expect("error line is JSON");
            let err = v["error"].as_str().expect("error line has error");
            assert!(
                err.starts_with("cluster unavailable"),
                "ingest error while Redis is away: {one}"
            );
            assert_eq!(v["line"], 1, "{one}");
            Err(one.clone())
        }
        more => panic!("one line, several replies: {more:?}"),
    }
}

#[derive(Debug, Clone)]
struct Attempt {
    seq: usize,
    http: bool,
    sent: Instant,
    done: Instant,
    result: Result<Option<String>, String>,
}

/// A publisher thread: sequence numbers 0, 1, 2... as the data of `topic`, spread over
/// the given nodes (http, ingest), alternating ingest lines and `POST /publish`, one at a
/// time, each recorded with its outcome.
struct Publisher {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Attempt>>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Publisher {
    fn start(
        targets: Vec<(SocketAddr, SocketAddr)>,
        topic: &'static str,
        pace: Duration,
        max: usize,
    ) -> Publisher {
        Publisher::start_at(0, targets, topic, pace, max)
    }

    /// The same, from sequence number `first` (up to `max`, exclusive).
    fn start_at(
        first: usize,
        targets: Vec<(SocketAddr, SocketAddr)>,
        topic: &'static str,
        pace: Duration,
        max: usize,
    ) -> Publisher {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (stop2, log2) = (stop.clone(), log.clone());
        let handle = std::thread::spawn(move || {
            let mut seq = first;
            while seq < max && !stop2.load(Ordering::Relaxed) {
                let (http, ingest_addr) = targets[seq % targets.len()];
                let via_http = seq % 2 == 1;
                let sent = Instant::now();
                let result = if via_http {
                    publish_http(http, topic, &seq.to_string()).map(Some)
                } else {
                    publish_ingest(ingest_addr, event_line(topic, &seq.to_string())).map(|_| None)
                };
                log2.lock().unwrap().push(Attempt {
                    seq,
                    http: via_http,
                    sent,
                    done: Instant::now(),
                    result,
                });
                seq += 1;
                // A steady rate, not a flood: the outage windows stay a few hundred
                // attempts long.
                std::thread::sleep(pace);
            }
        });
        Publisher {
            stop,
            log,
            handle: Some(handle),
        }
    }

    fn attempts(&self) -> Vec<Attempt> {
        self.log.lock().unwrap().clone()
    }

    fn acked(&self) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.result.is_ok())
            .count()
    }

    fn errors(&self) -> Vec<Attempt> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.result.is_err())
            .cloned()
            .collect()
    }

    /// Stop after the attempt in flight; returns every attempt.
    fn finish(mut self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .unwrap()
            .join()
            .expect("publisher thread");
        self.attempts()
    }

    fn join(mut self) -> Vec<Attempt> {
        self.handle
            .take()
            .unwrap()
            .join()
            .expect("publisher thread");
        self.attempts()
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Every gap in a stream's sequence numbers is announced: between two consecutive data
/// events whose numbers are not consecutive in `order` (the acknowledged publishes, in
/// publish order), a `herald-gap` event stands. No number twice, and the order kept.
fn assert_no_silent_loss(s: &Sub, order: &[usize], who: &str) {
    let pos: HashMap<usize, usize> = order.iter().enumerate().map(|(i, &q)| (q, i)).collect();
    let mut last: Option<usize> = None;
    let mut gap_since_last = false;
    let mut seen = HashSet::new();
    for e in &s.events {
        if e.event == "herald-gap" {
            serde_json::from_str::<serde_json::Value>(&e.data)
                .unwrap_or_else(|_| panic!("{who}: herald-gap data is JSON: {:?}", e.data));
            gap_since_last = true;
            continue;
        }
        let q: usize = e.data.parse().unwrap();
        assert!(
            seen.insert(q),
            "{who}: event {q} delivered twice: {:?}",
            s.events
        );
        let Some(&p) = pos.get(&q) else {
            // Not acknowledged (its publish got an error): allowed once, where it fell.
            continue;
        };
        if let Some(l) = last {
            assert!(p > l, "{who}: event {q} out of order: {:?}", s.events);
            assert!(
                p == l + 1 || gap_since_last,
                "{who}: silent loss between {} and {q}: {:?}",
                order[l],
                s.events
            );
        }
        last = Some(p);
        gap_since_last = false;
    }
}

fn healthz(addr: SocketAddr) -> (u16, String) {
    let r = http_get(addr, "/healthz");
    (r.status, r.text().trim_end().to_string())
}

// ------------------------------------------------------------------------------ tests

#[test]
fn three_nodes_deliver_every_publish_with_the_same_ids_and_bytes() {
    let redis = Redis::start();
    let Some(ns) = nodes(&redis, 3) else { return };
    let mut subs: Vec<Sub> = ns
        .iter()
        .flat_map(|n| {
            [
                Sub::open(n.addr, "/events/news", None),
                Sub::open(n.addr, "/events/news", None),
            ]
        })
        .collect();
    for n in &ns {
        wait_streams(n.addr, 2);
        assert_eq!(healthz(n.addr), (200, "ok".to_string()));
    }
    // Node 1 publishes, over ingest and HTTP: plain, typed, multi-line, with retry, and
    // one with an id of the publisher's own. A publish is answered only once Redis holds
    // it: the stream is one entry longer as soon as the ingest connection ends without an
    // error line, and a POST's id is an entry's id by the time it is answered.
    let key = format!("{PREFIX}:events");
    let published = std::cell::Cell::new(0);
    let via_ingest = |n: &TestServer, line: String| {
        assert!(ingest(n.ingest, &[line]).is_empty());
        published.set(published.get() + 1);
        assert_eq!(
            redis.xlen(&key),
            published.get(),
            "in Redis once acknowledged"
        );
    };
    let n1 = &ns[0];
    via_ingest(n1, event_line("news", "0"));
    via_ingest(
        n1,
        serde_json::json!({"topic":"news","event":"goal","data":"1"}).to_string(),
    );
    via_ingest(
        n1,
        serde_json::json!({"topic":"news","data":"2","retry":1500}).to_string(),
    );
    let via_http = |n: &TestServer, q: &str, data: &str| {
        let id = publish_http(n.addr, q, data).expect("published");
        let ((ms, seq), _) = cluster_id(&id);
        let entry = format!("{ms}-{seq}");
        match redis.cmd(&["XRANGE", &key, &entry, &entry]) {
            Resp::Array(Some(v)) => assert_eq!(v.len(), 1, "{id} is in Redis once answered"),
            other => panic!("XRANGE: {other:?}"),
        }
        published.set(published.get() + 1);
        id
    };
    let mut http_ids = vec![];
    http_ids.push(via_http(n1, "news?event=score", "3"));
    http_ids.push(via_http(n1, "news", "4"));
    via_ingest(
        n1,
        serde_json::json!({"topic":"news","data":"5","id":"own-id-42"}).to_string(),
    );
    // Publishes on nodes 2 and 3 join the same order.
    http_ids.push(via_http(&ns[1], "news", "6"));
    via_ingest(&ns[2], event_line("news", "7"));
    let multi = "8\nsecond line";
    http_ids.push(via_http(&ns[2], "news", multi));

    wait_all(&mut subs, "9 events", |s| s.events.len() >= 9);
    let first = &subs[0];
    let ids: Vec<String> = first.events.iter().map(|e| e.id.clone().unwrap()).collect();
    assert_eq!(
        first
            .events
            .iter()
            .map(|e| e.data.as_str())
            .collect::<Vec<_>>(),
        ["0", "1", "2", "3", "4", "5", "6", "7", multi]
    );
    assert_eq!(first.events[1].event, "goal");
    assert_eq!(first.events[3].event, "score");
    assert_eq!(ids[5], "own-id-42", "a publisher's id is kept as given");
    assert_eq!(
        [&ids[3], &ids[4], &ids[6], &ids[8]],
        [&http_ids[0], &http_ids[1], &http_ids[2], &http_ids[3]],
        "POST /publish answers the id every node delivers"
    );
    let assigned: Vec<String> = ids.iter().filter(|i| *i != "own-id-42").cloned().collect();
    assert_increasing(&assigned);
    let epochs: HashSet<String> = assigned.iter().map(|i| cluster_id(i).1).collect();
    assert_eq!(epochs.len(), 1, "one epoch: {assigned:?}");
    let blocks = first.blocks();
    assert_eq!(blocks.len(), 9, "{blocks:?}");
    for (i, s) in subs.iter().enumerate() {
        assert_eq!(
            s.events, first.events,
            "subscriber {i}: same events, same ids"
        );
        assert_eq!(s.blocks(), blocks, "subscriber {i}: same bytes");
        assert!(s.gaps().is_empty());
    }
    // Each assigned id is the Redis stream entry's id: Redis had every event before any
    // node delivered it.
    let in_redis = redis_ids(&redis, &format!("{PREFIX}:events"));
    assert_eq!(
        in_redis.len(),
        9,
        "one stream entry per publish: {in_redis:?}"
    );
    for id in &assigned {
        let ((ms, n), _) = cluster_id(id);
        assert!(in_redis.contains(&format!("{ms}-{n}")), "{id} is in Redis");
    }
    assert_eq!(
        redis.cmd(&["EXISTS", &format!("{PREFIX}:epoch")]),
        Resp::Int(1),
        "the epoch key exists"
    );
    let mut published_here: Vec<u64> = vec![];
    for n in &ns {
        assert_eq!(metric(n.addr, "herald_cluster_link_up"), 1);
        assert!(metric(n.addr, "herald_cluster_events_read_total") >= 9);
        metric(n.addr, "herald_cluster_lag_ms");
        published_here.push(metric(n.addr, "herald_cluster_publishes_total"));
        assert_eq!(metric(n.addr, "herald_cluster_reconnects_total"), 0);
        assert_eq!(metric(n.addr, "herald_cluster_gaps_total"), 0);
        assert_eq!(metric(n.addr, "herald_cluster_publish_errors_total"), 0);
    }
    assert_eq!(
        published_here,
        [6, 1, 2],
        "publishes Redis accepted, per node"
    );
    for n in ns {
        n.stop();
    }
}

#[test]
fn cluster_prefix_names_the_redis_keys() {
    let redis = Redis::start();
    let Some(a) = node(&redis, |c| c.cluster_prefix = "app7".into()) else {
        return;
    };
    let Some(b) = node(&redis, |c| c.cluster_prefix = "app7".into()) else {
        return;
    };
    // A node of another prefix on the same Redis is another cluster.
    let Some(other) = node(&redis, |c| c.cluster_prefix = "other".into()) else {
        return;
    };
    let mut sb = Sub::open(b.addr, "/events/p", None);
    let mut so = Sub::open(other.addr, "/events/p", None);
    wait_streams(b.addr, 1);
    wait_streams(other.addr, 1);
    let id = publish_http(a.addr, "p", "x").unwrap();
    sb.wait("the event on b", |s| !s.events.is_empty());
    assert_eq!(sb.events[0].id.as_deref(), Some(id.as_str()));
    assert_eq!(redis.xlen("app7:events"), 1);
    assert_eq!(redis.cmd(&["EXISTS", "app7:epoch"]), Resp::Int(1));
    assert_eq!(redis.cmd(&["EXISTS", "herald:events"]), Resp::Int(0));
    // The other cluster gets its own events only.
    publish_http(other.addr, "p", "y").unwrap();
    so.wait("its own event", |s| !s.events.is_empty());
    assert_eq!(so.events[0].data, "y");
    assert_eq!(redis.xlen("other:events"), 1);
    a.stop();
    b.stop();
    other.stop();
}

#[test]
fn multi_topic_streams_have_one_order_on_every_node() {
    let redis = Redis::start();
    let Some(ns) = nodes(&redis, 3) else { return };
    let mut multi: Vec<Sub> = ns
        .iter()
        .map(|n| Sub::open(n.addr, "/events?topic=a&topic=b", None))
        .collect();
    let mut only_a = Sub::open(ns[2].addr, "/events/a", None);
    wait_streams(ns[0].addr, 1);
    wait_streams(ns[1].addr, 1);
    wait_streams(ns[2].addr, 2);
    // Three publishers at once, one per node, to both topics: Redis decides one order.
    const PER: usize = 60;
    let publishers: Vec<_> = ns
        .iter()
        .enumerate()
        .map(|(k, n)| {
            let (addr, ing) = (n.addr, n.ingest);
            std::thread::spawn(move || {
                for i in 0..PER {
                    let topic = if (i + k) % 2 == 0 { "a" } else { "b" };
                    let data = format!("{k}:{i}");
                    if i % 2 == 0 {
                        assert!(ingest(ing, &[event_line(topic, &data)]).is_empty());
                    } else {
                        publish_http(addr, topic, &data).unwrap();
                    }
                }
            })
        })
        .collect();
    for p in publishers {
        p.join().unwrap();
    }
    wait_all(&mut multi, "every event", |s| s.events.len() >= 3 * PER);
    let a_count = (0..3)
        .map(|k| (0..PER).filter(|i| (i + k) % 2 == 0).count())
        .sum::<usize>();
    only_a.wait("every a event", |s| s.events.len() >= a_count);
    let order = multi[0].events.clone();
    for (i, s) in multi.iter().enumerate() {
        assert_eq!(s.events, order, "node {}: the same order and ids", i + 1);
        assert_eq!(s.blocks(), multi[0].blocks(), "node {}: same bytes", i + 1);
    }
    let ids: Vec<String> = order.iter().map(|e| e.id.clone().unwrap()).collect();
    assert_increasing(&ids);
    // Each publisher's events in its own order, each exactly once.
    for k in 0..3 {
        let mine: Vec<String> = order
            .iter()
            .filter(|e| e.data.starts_with(&format!("{k}:")))
            .map(|e| e.data.clone())
            .collect();
        assert_eq!(
            mine,
            (0..PER).map(|i| format!("{k}:{i}")).collect::<Vec<_>>()
        );
    }
    // The a-only stream is the a-part of the same order, with the same ids.
    let a_part: Vec<Event> = order
        .iter()
        .filter(|e| {
            let (k, i) = e.data.split_once(':').unwrap();
            (k.parse::<usize>().unwrap() + i.parse::<usize>().unwrap()) % 2 == 0
        })
        .cloned()
        .collect();
    assert_eq!(only_a.events, a_part);
    for n in ns {
        n.stop();
    }
}

#[test]
fn resume_on_another_node_while_publishing_has_no_gap_and_no_duplicate() {
    const TOTAL: usize = 500;
    let redis = Redis::start();
    let Some(ns) = nodes(&redis, 3) else { return };
    let mut watcher = Sub::open(ns[1].addr, "/events/r", None);
    wait_streams(ns[1].addr, 1);
    // Continuous publishing through node 1.
    let publisher = Publisher::start(
        vec![(ns[0].addr, ns[0].ingest)],
        "r",
        Duration::from_millis(1),
        TOTAL,
    );
    // Ids received on node 2, at several points of the run, resumed on node 3 (and node 1)
    // while events keep coming.
    let mut resumed: Vec<(usize, Sub)> = Vec::new();
    for at in [50, 150, 300] {
        watcher.wait("events on node 2", |s| s.events.len() > at);
        let from = watcher.events.len() - 1;
        let id = watcher.events[from].id.clone().unwrap();
        let seq: usize = watcher.events[from].data.parse().unwrap();
        for _ in 0..5 {
            resumed.push((seq, Sub::open(ns[2].addr, "/events/r", Some(&id))));
        }
        resumed.push((
            seq,
            Sub::open(ns[2].addr, &format!("/events/r?lastEventId={id}"), None),
        ));
        resumed.push((seq, Sub::open(ns[0].addr, "/events/r", Some(&id))));
    }
    let attempts = publisher.join();
    assert!(
        attempts.iter().all(|a| a.result.is_ok()),
        "every publish acknowledged"
    );
    watcher.wait("all events on node 2", |s| s.events.len() >= TOTAL);
    assert_eq!(watcher.seqs(), (0..TOTAL).collect::<Vec<_>>());
    for (i, (seq, s)) in resumed.iter_mut().enumerate() {
        s.wait("the resumed stream to reach the end", |s| {
            s.has_seq(TOTAL - 1)
        });
        assert!(
            s.gaps().is_empty(),
            "resumer {i} (after {seq}): no herald-gap: {:?}",
            s.gaps()
        );
        assert_eq!(
            s.seqs(),
            (*seq + 1..TOTAL).collect::<Vec<_>>(),
            "resumer {i}: everything after {seq}, once, in order"
        );
        // The same ids as node 2 delivered.
        let tail = &watcher.events[*seq + 1..];
        assert_eq!(s.events, tail, "resumer {i}: same ids");
    }
    for n in ns {
        n.stop();
    }
}

#[test]
fn a_resume_past_a_nodes_own_history_is_replayed_from_redis() {
    const BEFORE: usize = 200;
    const TOTAL: usize = 400;
    let redis = Redis::start();
    // Node a keeps 5 events of a topic; node b and Redis keep them all.
    let Some(a) = node(&redis, |c| c.history_events = 5) else {
        return;
    };
    let Some(b) = node(&redis, |_| {}) else {
        return;
    };
    let mut watch = Sub::open(b.addr, "/events/h", None);
    wait_streams(b.addr, 1);
    let targets = vec![(a.addr, a.ingest), (b.addr, b.ingest)];
    let first = Publisher::start(targets.clone(), "h", Duration::ZERO, BEFORE).join();
    assert!(first.iter().all(|x| x.result.is_ok()));
    watch.wait("the first events", |s| s.has_seq(BEFORE - 1));
    // Resumes on node a from ids it no longer holds, while publishing goes on.
    let publisher = Publisher::start_at(BEFORE, targets, "h", Duration::from_millis(1), TOTAL);
    let mut resumed: Vec<(usize, Sub)> = [0, 10, 150, BEFORE - 7]
        .into_iter()
        .map(|k| {
            let id = watch.events[k].id.clone().unwrap();
            (k, Sub::open(a.addr, "/events/h", Some(&id)))
        })
        .collect();
    assert!(publisher.join().iter().all(|x| x.result.is_ok()));
    watch.wait("every event", |s| s.has_seq(TOTAL - 1));
    assert_eq!(watch.seqs(), (0..TOTAL).collect::<Vec<_>>());
    for (k, s) in resumed.iter_mut() {
        s.wait("the resumed stream to reach the end", |s| {
            s.has_seq(TOTAL - 1)
        });
        assert!(
            s.gaps().is_empty(),
            "resume after {k}: Redis still has the range, so no gap: {:?}",
            s.gaps()
        );
        assert_eq!(
            s.events,
            watch.events[*k + 1..],
            "resume after {k}: every later event once, in order, same ids"
        );
    }
    a.stop();
    b.stop();
}

#[test]
fn a_resume_from_an_id_this_node_has_not_read_yet_is_no_gap() {
    // Node c is stopped (SIGSTOP) while node p publishes; clients then resume on c from an
    // id they got on p. Their requests are queued by c's kernel, so c may answer them
    // before its reader has caught up: an id of the current epoch beyond c's position is
    // still a position in the stream, not an unknown id.
    let redis = Redis::start();
    let Some(p) = node(&redis, |_| {}) else {
        return;
    };
    let (lc, ic) = addr_pair();
    let Some(mut c) = spawn_node(&redis, lc, ic) else {
        return;
    };
    let mut watch = Sub::open(p.addr, "/events/ahead", None);
    let mut on_c = Sub::open(lc, "/events/ahead", None);
    wait_streams(p.addr, 1);
    wait_streams(lc, 1);
    for i in 0..3 {
        assert!(ingest(p.ingest, &[event_line("ahead", &i.to_string())]).is_empty());
    }
    on_c.wait("the first events on c", |s| s.has_seq(2));
    signal(&c, "-STOP");
    for i in 3..40 {
        assert!(ingest(p.ingest, &[event_line("ahead", &i.to_string())]).is_empty());
    }
    watch.wait("every event on p", |s| s.has_seq(39));
    let requests: Vec<(usize, TcpStream)> = [10, 20, 30, 38]
        .into_iter()
        .map(|k| {
            let id = watch.events[k].id.clone().unwrap();
            (k, Sub::request(lc, "/events/ahead", Some(&id)))
        })
        .collect();
    signal(&c, "-CONT");
    for (k, req) in requests {
        let mut r = Sub::answer(req);
        r.wait("the resumed events", |s| s.has_seq(39));
        assert!(
            r.gaps().is_empty(),
            "resume on c after {k}, an id p had delivered: no herald-gap: {:?}",
            r.events
        );
        assert_eq!(r.events, watch.events[k + 1..], "resume after {k}");
    }
    on_c.wait("every event on c", |s| s.has_seq(39));
    assert_eq!(on_c.events, watch.events);
    signal(&c, "-TERM");
    assert!(c.wait().unwrap().success());
    p.stop();
}

#[test]
fn kill_9_a_node_its_clients_resume_on_another_node_and_miss_nothing() {
    const TOTAL: usize = 400;
    const CLIENTS: usize = 10;
    let redis = Redis::start();
    let (la, ia) = addr_pair();
    let Some(mut a) = spawn_node(&redis, la, ia) else {
        return;
    };
    let Some(b) = node(&redis, |_| {}) else {
        return;
    };
    let mut on_a: Vec<Sub> = (0..CLIENTS)
        .map(|_| Sub::open(la, "/events/k", None))
        .collect();
    let mut on_b = Sub::open(b.addr, "/events/k", None);
    wait_streams(la, CLIENTS as u64);
    wait_streams(b.addr, 1);
    let publisher = Publisher::start(
        vec![(b.addr, b.ingest)],
        "k",
        Duration::from_millis(2),
        TOTAL,
    );
    wait_all(&mut on_a, "events on node a", |s| s.events.len() >= 60);
    signal(&a, "-KILL");
    a.wait().unwrap();
    // Each client of the dead node reconnects to node b with the last id it got.
    let mut moved = Vec::new();
    for s in on_a.iter_mut() {
        s.read_until_closed();
        assert!(!s.ended, "a killed node does not end streams cleanly");
        let last = s.events.last().unwrap().id.clone().unwrap();
        moved.push(Sub::open(b.addr, "/events/k", Some(&last)));
    }
    let attempts = publisher.join();
    assert!(attempts.iter().all(|x| x.result.is_ok()));
    on_b.wait("every event on b", |s| s.has_seq(TOTAL - 1));
    assert_eq!(on_b.seqs(), (0..TOTAL).collect::<Vec<_>>());
    for (i, (before, after)) in on_a.iter().zip(moved.iter_mut()).enumerate() {
        after.wait("the moved client to catch up", |s| s.has_seq(TOTAL - 1));
        assert!(after.gaps().is_empty(), "client {i}: no gap on the move");
        let mut all = before.seqs();
        all.extend(after.seqs());
        assert_eq!(
            all,
            (0..TOTAL).collect::<Vec<_>>(),
            "client {i}: every event once, in order, across the move"
        );
        let mut ids: Vec<Event> = before.events.clone();
        ids.extend(after.events.iter().cloned());
        assert_eq!(ids, on_b.events, "client {i}: the same ids on both nodes");
    }
    // A fresh process for node a: its history comes from Redis, so it serves a resume
    // from an id it never saw at once (no herald-gap), then live events.
    let Some(mut a2) = spawn_node(&redis, la, ia) else {
        return;
    };
    let from = 10;
    let id = on_b.events[from].id.clone().unwrap();
    let mut r = Sub::open(la, "/events/k", Some(&id));
    r.wait("the replay from Redis history", |s| s.has_seq(TOTAL - 1));
    assert!(r.gaps().is_empty(), "no gap: {:?}", r.gaps());
    assert_eq!(r.events, on_b.events[from + 1..], "same ids and events");
    wait_streams(la, 1);
    // Publishes on the restarted node reach everyone.
    assert!(ingest(ia, &[event_line("k", &TOTAL.to_string())]).is_empty());
    for s in moved.iter_mut().chain([&mut on_b, &mut r]) {
        s.wait("the event published on the restarted node", |s| {
            s.has_seq(TOTAL)
        });
    }
    assert_eq!(r.events.last(), on_b.events.last());
    signal(&a2, "-TERM");
    assert!(a2.wait().unwrap().success());
    b.stop();
}

/// Redis goes away mid-stream and comes back (same port, same AOF): publishers get errors
/// only meanwhile, every acknowledged event reaches every node exactly once, no event
/// twice, streams stay open (keep-alives continue), `/healthz` says so.
fn redis_restart_mid_stream(crash: bool) {
    let mut redis = Redis::start();
    let Some(ns) = nodes(&redis, 3) else { return };
    let mut subs: Vec<Sub> = ns
        .iter()
        .flat_map(|n| {
            [
                Sub::open(n.addr, "/events/x", None),
                Sub::open(n.addr, "/events/x", None),
            ]
        })
        .collect();
    for n in &ns {
        wait_streams(n.addr, 2);
    }
    let publisher = Publisher::start(
        ns.iter().map(|n| (n.addr, n.ingest)).collect(),
        "x",
        Duration::from_millis(3),
        usize::MAX,
    );
    wait_all(&mut subs, "events before the outage", |s| {
        s.events.len() >= 30
    });

    let t_stop = Instant::now();
    if crash {
        redis.kill9();
    } else {
        redis.stop();
    }
    // Down: health degraded everywhere, publishes fail (both ways), streams kept alive.
    for n in &ns {
        wait_for("/healthz degraded", || {
            let (status, body) = healthz(n.addr);
            status == 503 && body.starts_with("degraded")
        });
        wait_for("herald_cluster_link_up 0", || {
            metric(n.addr, "herald_cluster_link_up") == 0
        });
    }
    wait_for("ingest and HTTP publish errors", || {
        let e = publisher.errors();
        e.iter().filter(|a| a.http).count() >= 3 && e.iter().filter(|a| !a.http).count() >= 3
    });
    // Several lines on one connection: an error line for each, numbered.
    let down: Vec<String> = (0..3)
        .map(|i| event_line("x-down", &i.to_string()))
        .collect();
    let replies = ingest(ns[0].ingest, &down);
    assert_eq!(replies.len(), 3, "{replies:?}");
    for (i, r) in replies.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_str(r).unwrap();
        assert!(
            v["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("cluster unavailable")),
            "{r}"
        );
        assert_eq!(v["line"], i + 1, "{r}");
    }
    for s in subs.iter_mut() {
        // Drain what was delivered before, then count keep-alives while Redis is down.
        while s.pump() {}
        let before = s.parser.comments;
        s.wait("keep-alives while Redis is down", |s| {
            s.parser.comments >= before + 2
        });
    }
    let in_outage = publisher.acked();
    redis.restart();
    let t_up = Instant::now();
    for n in &ns {
        wait_for("/healthz ok again", || {
            healthz(n.addr) == (200, "ok".into())
        });
    }
    let t_healthy = Instant::now();
    for n in &ns {
        assert_eq!(metric(n.addr, "herald_cluster_link_up"), 1);
        assert!(metric(n.addr, "herald_cluster_reconnects_total") >= 1);
    }
    let errors_total: u64 = ns
        .iter()
        .map(|n| metric(n.addr, "herald_cluster_publish_errors_total"))
        .sum();
    assert!(errors_total >= 6, "publish errors are counted");
    wait_for("publishes acknowledged after the restart", || {
        publisher.acked() >= in_outage + 60
    });
    let attempts = publisher.finish();
    let acked: Vec<usize> = attempts
        .iter()
        .filter(|a| a.result.is_ok())
        .map(|a| a.seq)
        .collect();
    let last_acked = *acked.last().unwrap();
    for a in &attempts {
        if let Err(e) = &a.result {
            assert!(
                a.done >= t_stop && a.sent <= t_healthy,
                "publish {} failed outside the outage (sent {:?} after the stop, {:?} after \
                 Redis answered PING again, {:?} after /healthz said ok on every node): {e}",
                a.seq,
                a.sent.saturating_duration_since(t_stop),
                a.sent.saturating_duration_since(t_up),
                a.sent.saturating_duration_since(t_healthy),
            );
        }
    }
    wait_all(&mut subs, "the last acknowledged event", |s| {
        s.has_seq(last_acked)
    });
    // Let anything extra (a duplicate) arrive before judging.
    let settle = Instant::now() + Duration::from_millis(300);
    while Instant::now() < settle {
        for s in subs.iter_mut() {
            s.pump();
        }
    }
    let acked_set: HashSet<usize> = acked.iter().copied().collect();
    let reference = subs[0].events.clone();
    for (i, s) in subs.iter().enumerate() {
        assert!(
            !s.closed && !s.ended,
            "subscriber {i}: stream open across the restart"
        );
        assert!(
            s.gaps().is_empty(),
            "subscriber {i}: Redis kept its data (AOF), so no herald-gap: {:?}",
            s.gaps()
        );
        assert_no_silent_loss(s, &acked, &format!("subscriber {i}"));
        let got: HashSet<usize> = s.seqs().into_iter().collect();
        assert!(
            acked_set.is_subset(&got),
            "subscriber {i}: every acknowledged event, missing {:?}",
            acked_set.difference(&got).collect::<Vec<_>>()
        );
        assert_eq!(
            s.events, reference,
            "subscriber {i}: same events and ids everywhere"
        );
    }
    // HTTP-acknowledged ids are the delivered ones.
    let by_seq: HashMap<usize, String> = reference
        .iter()
        .map(|e| (e.data.parse().unwrap(), e.id.clone().unwrap()))
        .collect();
    for a in &attempts {
        if let Ok(Some(id)) = &a.result {
            assert_eq!(by_seq.get(&a.seq), Some(id), "publish {}", a.seq);
        }
    }
    let ids: Vec<String> = reference.iter().map(|e| e.id.clone().unwrap()).collect();
    assert_increasing(&ids);
    for n in ns {
        n.stop();
    }
}

#[test]
fn a_close_control_line_on_one_node_ends_the_topic_on_every_node() {
    let redis = Redis::start();
    let Some(ns) = nodes(&redis, 3) else { return };
    let mut subs: Vec<Sub> = ns
        .iter()
        .map(|n| Sub::open(n.addr, "/events/done", None))
        .collect();
    for n in &ns {
        wait_streams(n.addr, 1);
    }
    let lines = [
        event_line("done", "0"),
        r#"{"topic":"done","control":"close"}"#.to_string(),
    ];
    assert!(ingest(ns[0].ingest, &lines).is_empty());
    for (i, s) in subs.iter_mut().enumerate() {
        s.read_until_closed();
        assert!(
            s.ended,
            "node {}: the stream ends with its last chunk",
            i + 1
        );
        assert_eq!(s.seqs(), [0], "node {}: the last event first", i + 1);
    }
    for n in &ns {
        assert_eq!(Client::get(n.addr, "/events/done", "").status, 204);
    }
    // The next publish, on another node, reopens the topic everywhere.
    publish_http(ns[1].addr, "done", "1").unwrap();
    for n in &ns {
        wait_for("the topic reopened", || {
            Client::get(n.addr, "/events/done", "").status == 200
        });
    }
    for n in ns {
        n.stop();
    }
}

#[test]
fn a_node_started_while_redis_is_down_serves_and_catches_up_once_it_is_back() {
    let mut redis = Redis::start();
    let Some(a) = node(&redis, |_| {}) else {
        return;
    };
    let mut sa = Sub::open(a.addr, "/events/late", None);
    wait_streams(a.addr, 1);
    let ids: Vec<String> = (0..5)
        .map(|i| publish_http(a.addr, "late", &i.to_string()).unwrap())
        .collect();
    sa.wait("the first events", |s| s.has_seq(4));
    redis.stop();
    // Node b starts with no Redis: it serves, degraded, and refuses publishes.
    let Some(b) = node(&redis, |_| {}) else {
        return;
    };
    let (status, body) = healthz(b.addr);
    assert!(
        status == 503 && body.starts_with("degraded"),
        "{status} {body}"
    );
    assert!(publish_http(b.addr, "late", "refused").is_err());
    let mut sb = Sub::open(b.addr, "/events/late", None);
    // A client of node a moves to node b with the last id it got, while b has no Redis.
    let mut moved = Sub::open(b.addr, "/events/late", Some(&ids[4]));
    wait_streams(b.addr, 2);
    redis.restart();
    for n in [&a, &b] {
        wait_for("/healthz ok", || healthz(n.addr) == (200, "ok".into()));
    }
    // This test is about what b's streams get: publish once a publish goes through (that
    // the first ones after Redis is back may fail is the next test's subject).
    wait_for("a publish accepted", || {
        publish_http(a.addr, "late-probe", "x").is_ok()
    });
    let id5 = publish_http(a.addr, "late", "5").unwrap();
    for s in [&mut sa, &mut sb] {
        s.wait("the event published after Redis came back", |s| {
            s.has_seq(5)
        });
    }
    moved.wait("the event published after Redis came back", |s| {
        s.has_seq(5)
    });
    assert_eq!(
        moved.seqs(),
        [5],
        "a resume after the last event gets nothing twice (a herald-gap is allowed: b could \
         not know the id): {:?}",
        moved.events
    );
    assert_eq!(
        sb.seqs(),
        [5],
        "a subscriber without Last-Event-ID gets only what was published after it came"
    );
    assert_eq!(sb.events[0].id.as_deref(), Some(id5.as_str()));
    assert_eq!(sa.seqs(), [0, 1, 2, 3, 4, 5]);
    // What Redis kept from before b started is resumable on b.
    let mut r = Sub::open(b.addr, "/events/late", Some(&ids[1]));
    r.wait("the resumed events", |s| s.has_seq(5));
    assert!(r.gaps().is_empty(), "{:?}", r.events);
    assert_eq!(r.events, sa.events[2..]);
    a.stop();
    b.stop();
}

#[test]
fn the_first_publishes_after_redis_is_back_are_accepted() {
    for crash in [false, true] {
        let mut redis = Redis::start();
        let Some(n) = node(&redis, |_| {}) else {
            return;
        };
        let mut s = Sub::open(n.addr, "/events/back", None);
        wait_streams(n.addr, 1);
        publish_http(n.addr, "back", "0").unwrap();
        assert!(ingest(n.ingest, &[event_line("back", "1")]).is_empty());
        if crash {
            redis.kill9();
        } else {
            redis.stop();
        }
        wait_for("/healthz degraded", || healthz(n.addr).0 == 503);
        redis.restart();
        wait_for("/healthz ok", || healthz(n.addr) == (200, "ok".into()));
        // Redis is up and the node says so: a publisher has no reason to see an error.
        let how = if crash { "kill -9" } else { "SIGTERM" };
        publish_http(n.addr, "back", "2")
            .unwrap_or_else(|e| panic!("POST after a Redis restart ({how}): {e}"));
        publish_ingest(n.ingest, event_line("back", "3"))
            .unwrap_or_else(|e| panic!("ingest after a Redis restart ({how}): {e}"));
        s.wait("the events after the restart", |s| s.has_seq(3));
        assert_eq!(s.seqs(), [0, 1, 2, 3]);
        n.stop();
    }
}

#[test]
fn redis_restart_mid_stream_loses_no_acknowledged_event() {
    redis_restart_mid_stream(false);
}

#[test]
fn redis_kill_9_mid_stream_loses_no_acknowledged_event() {
    redis_restart_mid_stream(true);
}

#[test]
fn flushall_mid_stream_is_never_a_silent_loss() {
    let redis = Redis::start();
    let Some(ns) = nodes(&redis, 2) else { return };
    let mut subs: Vec<Sub> = ns
        .iter()
        .map(|n| Sub::open(n.addr, "/events/f", None))
        .collect();
    for n in &ns {
        wait_streams(n.addr, 1);
    }
    let publisher = Publisher::start(
        ns.iter().map(|n| (n.addr, n.ingest)).collect(),
        "f",
        Duration::from_millis(2),
        usize::MAX,
    );
    wait_all(&mut subs, "events before the flush", |s| {
        s.events.len() >= 40
    });
    let before_flush = subs[0].events.clone();
    redis.flushall();
    let at_flush = publisher.acked();
    wait_for("publishes after the flush", || {
        publisher.acked() >= at_flush + 60
    });
    let attempts = publisher.finish();
    assert!(
        attempts.iter().all(|a| a.result.is_ok()),
        "a flush is not an outage: {:?}",
        attempts.iter().find(|a| a.result.is_err())
    );
    let last = attempts.last().unwrap().seq;
    wait_all(&mut subs, "the last event", |s| s.has_seq(last));
    let order: Vec<usize> = attempts.iter().map(|a| a.seq).collect();
    let old_epoch = cluster_id(before_flush[0].id.as_ref().unwrap()).1;
    let max_before = before_flush
        .iter()
        .map(|e| cluster_id(e.id.as_ref().unwrap()).0)
        .max()
        .unwrap();
    for (i, s) in subs.iter().enumerate() {
        assert_no_silent_loss(s, &order, &format!("subscriber {i}"));
        // What came after the flush: a new epoch, ids still increasing.
        let tail = s
            .events
            .iter()
            .find(|e| e.data == last.to_string())
            .unwrap();
        let (rid, epoch) = cluster_id(tail.id.as_ref().unwrap());
        assert_ne!(epoch, old_epoch, "a flushed Redis starts a new epoch");
        assert!(rid > max_before, "ids after the flush are greater");
    }
    // A resume from the old epoch is told it is one.
    for n in &ns {
        let old = before_flush[5].id.clone().unwrap();
        let mut r = Sub::open(n.addr, "/events/f", Some(&old));
        r.wait("the first event", |s| !s.events.is_empty());
        assert_eq!(
            r.events[0].event, "herald-gap",
            "old-epoch resume: {:?}",
            r.events
        );
        let gap: serde_json::Value = serde_json::from_str(&r.events[0].data).unwrap();
        assert_eq!(gap["requested"], old.as_str());
        // New events reach it live.
        wait_streams(n.addr, 2);
        let id = publish_http(n.addr, "f", "after").unwrap();
        r.wait("a live event", |s| {
            s.events.iter().any(|e| e.data == "after")
        });
        assert!(cluster_id(&id).0 > max_before);
    }
    for n in ns {
        n.stop();
    }
}

/// A node that could not read while Redis lost what it had not read yet (it was stopped
/// with SIGSTOP meanwhile) tells its live streams with a herald-gap, then continues.
fn lost_while_a_node_was_stopped(lose: impl FnOnce(&Redis)) {
    let redis = Redis::start();
    let Some(p) = node(&redis, |_| {}) else {
        return;
    };
    let (lc, ic) = addr_pair();
    let Some(mut c) = spawn_node(&redis, lc, ic) else {
        return;
    };
    let mut s = Sub::open(lc, "/events/s", None);
    wait_streams(lc, 1);
    for i in 0..3 {
        assert!(ingest(p.ingest, &[event_line("s", &i.to_string())]).is_empty());
    }
    s.wait("the first events", |s| s.events.len() >= 3);
    signal(&c, "-STOP");
    for i in 3..20 {
        assert!(ingest(p.ingest, &[event_line("s", &i.to_string())]).is_empty());
    }
    lose(&redis);
    for i in 20..25 {
        assert!(ingest(p.ingest, &[event_line("s", &i.to_string())]).is_empty());
    }
    signal(&c, "-CONT");
    s.wait("the events after the loss", |s| s.has_seq(24));
    let order: Vec<usize> = (0..25).collect();
    assert_no_silent_loss(&s, &order, "the stopped node's subscriber");
    assert!(
        !s.gaps().is_empty(),
        "events 3..20 were lost before the node read them: {:?}",
        s.events
    );
    assert!(metric(lc, "herald_cluster_gaps_total") >= 1);
    // The live gap says after which id it fell: the last event the stream had before it.
    let at = s
        .events
        .iter()
        .position(|e| e.event == "herald-gap")
        .unwrap();
    let gap: serde_json::Value = serde_json::from_str(&s.events[at].data).unwrap();
    if at > 0 {
        assert_eq!(
            gap["after"].as_str(),
            s.events[at - 1].id.as_deref(),
            "gap data {gap}"
        );
    }
    // A resume from before the loss is told too, on that node.
    let before = s.events[2].id.clone().unwrap();
    let mut r = Sub::open(lc, "/events/s", Some(&before));
    r.wait("the resumed stream to reach the end", |s| s.has_seq(24));
    assert_eq!(
        r.events[0].event, "herald-gap",
        "resume from before the loss: {:?}",
        r.events
    );
    assert_no_silent_loss(&r, &order[3..], "the resumed subscriber");
    signal(&c, "-TERM");
    assert!(c.wait().unwrap().success());
    p.stop();
}

#[test]
fn flushall_while_a_node_is_stopped_gives_its_streams_a_live_gap() {
    lost_while_a_node_was_stopped(|r| r.flushall());
}

#[test]
fn entries_trimmed_before_a_node_read_them_give_its_streams_a_live_gap() {
    lost_while_a_node_was_stopped(|r| {
        // Keep 2 of the 17 entries the stopped node has not read.
        r.cmd(&["XTRIM", &format!("{PREFIX}:events"), "MAXLEN", "2"]);
    });
}

#[test]
fn without_cluster_ids_stay_plain_decimal() {
    let Some(s) = start(|_| {}) else { return };
    let mut c = Sub::open(s.addr, "/events/plain", None);
    wait_streams(s.addr, 1);
    let id = publish_http(s.addr, "plain", "x").unwrap();
    assert!(id.parse::<u64>().is_ok(), "plain decimal id, got {id:?}");
    c.wait("the event", |s| !s.events.is_empty());
    assert_eq!(c.events[0].id.as_deref(), Some(id.as_str()));
    assert_eq!(healthz(s.addr), (200, "ok".into()));
    s.stop();
}

#[test]
fn the_redis_harness_keeps_acknowledged_writes_across_stop_and_kill_9() {
    let mut redis = Redis::start();
    redis.cmd(&["XADD", "h:events", "*", "k", "1"]);
    redis.stop();
    assert!(!redis.is_running());
    redis.restart();
    assert_eq!(redis.xlen("h:events"), 1, "the AOF survives SIGTERM");
    redis.cmd(&["XADD", "h:events", "*", "k", "2"]);
    redis.kill9();
    redis.restart();
    assert_eq!(
        redis.xlen("h:events"),
        2,
        "fsync-always AOF survives SIGKILL"
    );
    redis.flushall();
    assert_eq!(redis.xlen("h:events"), 0);
    assert_eq!(redis.starts, 3);
}

#[test]
fn a_password_from_a_file_or_from_the_url_and_a_database_number_are_used() {
    let redis = Redis::start_with_password("s3cret-pw");
    let pw_file = redis.dir.join("cluster-password");
    std::fs::write(&pw_file, "s3cret-pw").unwrap();
    let url_db = format!("redis://127.0.0.1:{}/3", redis.port);
    let Some(a) = start(|c| {
        c.cluster = Some(url_db);
        c.cluster_password_file = Some(pw_file);
    }) else {
        return;
    };
    let url_pw = format!("redis://:s3cret-pw@127.0.0.1:{}/3", redis.port);
    let Some(b) = start(|c| c.cluster = Some(url_pw)) else {
        return;
    };
    for n in [&a, &b] {
        wait_for("linked to Redis", || healthz(n.addr) == (200, "ok".into()));
    }
    let mut sb = Sub::open(b.addr, "/events/pw", None);
    let mut sa = Sub::open(a.addr, "/events/pw", None);
    wait_streams(b.addr, 1);
    wait_streams(a.addr, 1);
    let id = publish_http(a.addr, "pw", "1").unwrap();
    assert!(ingest(b.ingest, &[event_line("pw", "2")]).is_empty());
    for s in [&mut sa, &mut sb] {
        s.wait("both events", |s| s.events.len() >= 2);
        assert_eq!(s.seqs(), [1, 2]);
        assert_eq!(s.events[0].id.as_deref(), Some(id.as_str()));
    }
    assert_eq!(sa.events, sb.events);
    // In database 3, not 0.
    assert_eq!(
        redis.cmd_in(3, &["XLEN", &format!("{PREFIX}:events")]),
        Resp::Int(2)
    );
    assert_eq!(redis.xlen(&format!("{PREFIX}:events")), 0);
    a.stop();
    b.stop();
}
