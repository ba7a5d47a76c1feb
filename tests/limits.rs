//! What a stranger can make herald hold or do, over real sockets on both backends: ids
//! herald never assigned, multi-topic backlogs, mass resumes that never read, slow but
//! steady readers, an open-files limit lower than the connection limit.
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use socket2::{Domain, Socket, Type};

fn small_rcvbuf(addr: SocketAddr, request: &str) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.connect(&addr.into()).unwrap();
    let mut s: TcpStream = s.into();
    s.write_all(request.as_bytes()).unwrap();
    s
}

/// Read until EOF or `deadline`; returns the bytes and whether the server closed.
fn read_until_closed(s: &mut TcpStream, deadline: Instant) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (out, false);
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return (out, false),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return (out, false),
            Err(_) => return (out, true),
        }
    }
}

fn vm_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .expect("VmRSS")
}

#[test]
fn numeric_ids_herald_never_assigned_get_a_gap_not_a_silent_resume() {
    let Some(s) = start(|_| {}) else { return };
    let last = http_publish(s.addr, "n", "retained");
    let last: serde_json::Value = serde_json::from_slice(&last.body).unwrap();
    let ten_times = (last["id"].as_str().unwrap().parse::<u64>().unwrap() * 10).to_string();
    for id in ["18446744073709551615", "9999999999999999999", &ten_times] {
        let mut c = Client::get(s.addr, "/events/n", &format!("Last-Event-ID: {id}\r\n"));
        let evs = c.wait_events(2);
        assert_eq!(evs[0].event, "herald-gap", "{id}: {evs:?}");
        assert!(evs[0].data.contains(id));
        assert_eq!(evs[1].data, "retained", "{id}: the retained event follows");
    }
    s.stop();
}

#[test]
fn an_evicted_numeric_publisher_id_gets_a_gap_and_the_retained_events() {
    let Some(s) = start(|c| c.history_events = 3) else {
        return;
    };
    assert_eq!(
        http_publish(s.addr, "p?id=4000000000000000000", "old").status,
        200
    );
    for i in 0..3 {
        http_publish(s.addr, "p", &i.to_string());
    }
    let mut c = Client::get(
        s.addr,
        "/events/p",
        "Last-Event-ID: 4000000000000000000\r\n",
    );
    let got: Vec<String> = c.wait_events(4).iter().map(|e| e.data.clone()).collect();
    assert!(got[0].contains("4000000000000000000"), "{got:?}");
    assert_eq!(&got[1..], ["0", "1", "2"]);
    s.stop();
}

#[test]
fn the_backlog_cap_is_per_connection_not_per_topic() {
    let Some(s) = start(|c| c.max_backlog = 256 << 10) else {
        return;
    };
    // Never reads: each topic stays under the cap, the four together do not.
    let mut stalled = small_rcvbuf(
        s.addr,
        "GET /events?topic=a&topic=b&topic=c&topic=d HTTP/1.1\r\n\r\n",
    );
    wait_streams(s.addr, 1);
    let body = "x".repeat(60_000);
    for t in ["a", "b", "c", "d"] {
        for _ in 0..2 {
            assert_eq!(http_publish(s.addr, t, &body).status, 200);
        }
    }
    wait_for("the stalled subscriber to be cut", || {
        metric(s.addr, "herald_slow_consumer_disconnects_total") == 1
    });
    let (_, closed) = read_until_closed(&mut stalled, Instant::now() + WAIT);
    assert!(closed);
    s.stop();
}

#[test]
fn two_hundred_resumers_that_never_read_hold_one_batch_each_and_delay_no_one() {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let ingest_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let args = ["--workers", "1", "--history-events", "1000"];
    let Some((child, addr)) = spawn_at(listen, ingest_addr, &args) else {
        return;
    };
    let topics: Vec<String> = (0..32).map(|i| format!("r{i}")).collect();
    let first = http_publish(addr, &topics[0], "first");
    let first: serde_json::Value = serde_json::from_slice(&first.body).unwrap();
    let first = first["id"].as_str().unwrap().to_string();
    // 32 x 1000 retained events (the first one is evicted by its topic's 1000th).
    let lines: Vec<String> = (0..32_000)
        .map(|i| event_line(&topics[i % 32], &"h".repeat(100)))
        .collect();
    assert!(ingest(ingest_addr, &lines).is_empty());
    wait_for("history to fill", || {
        metric(addr, "herald_history_events") == 32_000
    });
    let first = {
        // The resume point: the oldest event still retained on r1.
        let _ = first;
        let mut c = Client::get(addr, "/events/r1", "Last-Event-ID: 0\r\n");
        let evs = c.wait_events(2);
        evs[1].id.clone().unwrap()
    };
    assert_eq!(metric(addr, "herald_history_events"), 32_000);
    let before = vm_rss_kb(child.id());
    let query: String = topics
        .iter()
        .map(|t| format!("topic={t}"))
        .collect::<Vec<_>>()
        .join("&");
    let request = format!("GET /events?{query} HTTP/1.1\r\nLast-Event-ID: {first}\r\n\r\n");
    let resumers: Vec<TcpStream> = (0..200).map(|_| small_rcvbuf(addr, &request)).collect();
    wait_streams(addr, 200);
    // A fresh subscriber elsewhere still gets its event at once.
    let mut fresh = Client::subscribe(addr, "/events/fresh");
    wait_streams(addr, 201);
    let t0 = Instant::now();
    assert_eq!(http_publish(addr, "fresh", "now").status, 200);
    assert_eq!(fresh.wait_events(1)[0].data, "now");
    let latency = t0.elapsed();
    let grown_mb = vm_rss_kb(child.id()).saturating_sub(before) / 1024;
    // Each resumer asked for 31,999 events (3.2 MB of frames): all queued at once that
    // is over 200 MB of herald memory; one batch each is a few MB in all.
    assert!(grown_mb < 60, "herald grew {grown_mb} MB for 200 resumers");
    assert!(
        latency < Duration::from_secs(1),
        "fresh event took {latency:?}"
    );
    assert_eq!(metric(addr, "herald_slow_consumer_disconnects_total"), 0);
    drop(resumers);
}

#[test]
fn a_slow_but_steady_reader_is_not_cut_as_a_stalled_one() {
    let Some(s) = start(|c| {
        c.write_timeout = Duration::from_secs(2);
        // Checked often, so a send that shows no progress for 2 s would be caught.
        c.keepalive = Duration::from_millis(500);
        c.max_backlog = 4 << 20;
    }) else {
        return;
    };
    let mut c = small_rcvbuf(s.addr, "GET /events/slow HTTP/1.1\r\n\r\n");
    wait_streams(s.addr, 1);
    // One 180 KB event: a single send far larger than the socket buffers.
    let body = "s".repeat(180_000);
    assert_eq!(http_publish(s.addr, "slow", &body).status, 200);
    // About 30 KB/s for 6 s: far slower than the socket, never stalled for 2 s (on uring,
    // a send waiting for all of its bytes made no progress for far longer).
    let mut total = 0;
    let mut buf = [0u8; 1500];
    let end = Instant::now() + Duration::from_secs(20);
    c.set_read_timeout(Some(WAIT)).unwrap();
    while Instant::now() < end && total < 180_000 {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "cut after {total} bytes");
        total += n;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(total >= 180_000, "read {total}");
    assert_eq!(metric(s.addr, "herald_slow_consumer_disconnects_total"), 0);
    assert!(
        metric(s.addr, "herald_writes_total") > 0,
        "writes are counted"
    );
    s.stop();
}

#[test]
fn a_stalled_reader_is_cut_at_the_write_timeout_not_the_keepalive() {
    let Some(s) = start(|c| {
        c.write_timeout = Duration::from_secs(1);
        c.keepalive = Duration::from_secs(15);
    }) else {
        return;
    };
    let c = small_rcvbuf(s.addr, "GET /events/stall HTTP/1.1\r\n\r\n");
    wait_streams(s.addr, 1);
    let t0 = Instant::now();
    assert_eq!(
        http_publish(s.addr, "stall", &"z".repeat(500_000)).status,
        200
    );
    wait_for("the stalled reader to be cut", || {
        metric(s.addr, "herald_slow_consumer_disconnects_total") == 1
    });
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    drop(c.set_nonblocking(true));
    s.stop();
}

#[test]
fn a_low_open_files_limit_gives_503s_and_keeps_healthz_and_ingest_alive() {
    let Some(backend) = backend() else { return };
    let backend = match backend {
        herald::BackendChoice::Uring => "uring",
        _ => "epoll",
    };
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let ingest_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = std::process::Command::new("prlimit")
        .args(["--nofile=1024:1024", "--"])
        .arg(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--listen", &listen.to_string()])
        .args(["--ingest", &ingest_addr.to_string()])
        .args(["--backend", backend, "--workers", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prlimit runs herald");
    let child = Spawned(child);
    wait_for("herald to listen", || TcpStream::connect(listen).is_ok());
    let mut subs = Vec::new();
    let mut refused = 0;
    for _ in 0..1100 {
        let mut s = TcpStream::connect(listen).unwrap();
        s.write_all(b"GET /events/many HTTP/1.1\r\n\r\n").unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).unwrap();
        match &head {
            b"HTTP/1.1 200" => subs.push(s),
            b"HTTP/1.1 503" => refused += 1,
            other => panic!("{:?}", String::from_utf8_lossy(other)),
        }
    }
    assert!(
        backend == "uring" || refused > 0,
        "epoll cannot hold 1,100 descriptors under a limit of 1,024: some must be refused"
    );
    assert_eq!(http_get(listen, "/healthz").status, 200);
    let replies = ingest(ingest_addr, &[event_line("many", "still here")]);
    assert!(replies.is_empty(), "{replies:?}");
    let mut first = subs.swap_remove(0);
    let (bytes, _) = read_until_closed(&mut first, Instant::now() + Duration::from_secs(2));
    assert!(String::from_utf8_lossy(&bytes).contains("still here"));
    drop(child);
}

#[test]
fn publishers_cannot_create_topics_past_the_cap() {
    let Some(s) = start(|c| c.history_topics = 3) else {
        return;
    };
    for t in ["t1", "t2", "t3"] {
        assert_eq!(http_publish(s.addr, t, "x").status, 200);
    }
    let r = http_publish(s.addr, "t4", "x");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("too many topics"));
    wait_for("the 503 counted by status", || {
        metric(s.addr, "herald_http_503_total") == 1
    });
    let replies = ingest(s.ingest, &[event_line("t5", "x"), event_line("t1", "ok")]);
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert!(replies[0].contains("too many topics") && replies[0].contains("\"line\":1"));
    assert_eq!(metric(s.addr, "herald_history_topics"), 3);
    assert_eq!(metric(s.addr, "herald_events_ingested_total"), 4);
    s.stop();
}
