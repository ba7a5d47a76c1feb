//! A deploy under load, over real sockets: subscribers with small receive buffers and
//! hundreds of KB pending each, SIGTERM while every connection has a write in flight or a
//! full socket, then every client reads to EOF and its stream is checked byte for byte by a
//! strict chunked parser: every event whole and in order, then the `retry:` hint, then the
//! last chunk, and nothing else.
mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use socket2::{Domain, Socket, Type};

/// A subscriber socket with a 4 KB receive buffer (set before connect, so the window the
/// server sees is small from the start).
fn small_subscriber(addr: SocketAddr, path: &str) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.connect(&addr.into()).unwrap();
    let mut s: TcpStream = s.into();
    use std::io::Write;
    write!(s, "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

/// Read to EOF, `pause` between reads (a slow reader).
fn read_all(mut s: TcpStream, pause: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => panic!("read failed after {} bytes: {e}", out.len()),
        }
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
}

/// The strict reading: the status line, the head, then chunks (hex size, CRLF, exactly
/// that many bytes, CRLF) up to a last chunk that ends the bytes. Returns the body.
fn strict_body(raw: &[u8]) -> Result<Vec<u8>, String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no response head")?;
    if !raw.starts_with(b"HTTP/1.1 200 OK\r\n") {
        return Err("not a 200".into());
    }
    let mut rest = &raw[end + 4..];
    let mut body = Vec::new();
    loop {
        let eol = rest.windows(2).position(|w| w == b"\r\n").ok_or(format!(
            "stream ended without its last chunk after {} body bytes",
            body.len()
        ))?;
        let line = std::str::from_utf8(&rest[..eol]).map_err(|_| "binary chunk size")?;
        let size = usize::from_str_radix(line, 16).map_err(|_| {
            format!(
                "{line:?} where a chunk size must be, after {} body bytes",
                body.len()
            )
        })?;
        if size == 0 {
            return if &rest[eol..] == b"\r\n\r\n" {
                Ok(body)
            } else {
                Err("bytes after the last chunk".into())
            };
        }
        let data = eol + 2;
        if rest.len() < data + size + 2 || &rest[data + size..data + size + 2] != b"\r\n" {
            return Err(format!(
                "chunk of {size} cut short after {} body bytes",
                body.len()
            ));
        }
        body.extend_from_slice(&rest[data..data + size]);
        rest = &rest[data + size + 2..];
    }
}

/// The body must be exactly: the greeting (with `--retry`'s hint), `want` (each event's exact SSE text), the
/// drain's `retry:` hint; keep-alive comments may sit between frames.
fn check_stream(raw: &[u8], want: &[String]) -> Result<u32, String> {
    let body = strict_body(raw)?;
    let text = String::from_utf8(body).map_err(|_| "not UTF-8")?;
    let text = text.strip_prefix(": herald\n\n").ok_or("no greeting")?;
    // With --retry the greeting carries it too.
    let text = match text.strip_prefix("retry: ") {
        Some(t) => &t[t.find("\n\n").ok_or("bad greeting retry")? + 2..],
        None => text,
    };
    let text = text.replace(":\n\n", "");
    let events: String = want.concat();
    let tail = text
        .strip_prefix(&events)
        .ok_or("the events differ from what was published")?;
    let hint = tail
        .strip_prefix("retry: ")
        .and_then(|t| t.strip_suffix("\n\n"))
        .ok_or(format!("{tail:?} where the retry hint must end the stream"))?;
    hint.parse().map_err(|_| format!("bad retry {hint:?}"))
}

fn publish(addr: SocketAddr, topic: &str, i: usize, len: usize) -> String {
    let data = format!("{i:04}{}", "x".repeat(len - 4));
    let r = http_publish(addr, topic, &data);
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    format!("id: {}\ndata: {data}\n\n", v["id"].as_str().unwrap())
}

#[test]
fn sigterm_with_writes_pending_on_every_stream_corrupts_nothing() {
    let Some((mut child, addr)) = spawn(&["--workers", "1", "--drain-window", "10s"]) else {
        return;
    };
    let subs: Vec<TcpStream> = (0..50)
        .map(|_| small_subscriber(addr, "/events/big"))
        .collect();
    wait_streams(addr, 50);
    // 20 x 30 KB: under the 1 MiB backlog, far over the socket buffers.
    let want: Vec<String> = (0..20).map(|i| publish(addr, "big", i, 30_000)).collect();
    // Writes are pending on every stream: the first event alone fills 4 KB + 64 KB.
    wait_for("writes pending", || {
        metric(addr, "herald_fanout_backlog_bytes") > 0
    });
    signal(&child, "-TERM");
    let readers: Vec<_> = subs
        .into_iter()
        .map(|s| std::thread::spawn(move || read_all(s, Duration::ZERO)))
        .collect();
    for (i, r) in readers.into_iter().enumerate() {
        let raw = r.join().unwrap();
        match check_stream(&raw, &want) {
            Ok(hint) => assert!(hint >= 1000, "stream {i}: hint {hint}"),
            Err(e) => panic!("stream {i}: {e}"),
        }
    }
    assert!(child.wait().unwrap().success());
}

#[test]
fn two_hundred_mixed_readers_and_multi_topic_streams_drain_whole_on_the_default_window() {
    let Some((mut child, addr)) = spawn(&["--workers", "1", "--retry", "3000"]) else {
        return;
    };
    // 100 on one topic, 100 on two; every other one reads slowly.
    let subs: Vec<(TcpStream, bool)> = (0..200)
        .map(|i| {
            let path = if i % 2 == 0 {
                "/events/a"
            } else {
                "/events?topic=a&topic=b"
            };
            (small_subscriber(addr, path), i % 2 == 1)
        })
        .collect();
    wait_streams(addr, 200);
    let mut only_a = Vec::new();
    let mut both = Vec::new();
    for i in 0..12 {
        let topic = if i % 3 == 2 { "b" } else { "a" };
        let frame = publish(addr, topic, i, 20_000);
        if topic == "a" {
            only_a.push(frame.clone());
        }
        both.push(frame);
    }
    let started = Instant::now();
    signal(&child, "-TERM");
    let readers: Vec<_> = subs
        .into_iter()
        .enumerate()
        .map(|(i, (s, multi))| {
            // Slow readers take 8 KB per 2 ms: 4 MB/s, done well within the window.
            let pause = if i % 4 < 2 {
                Duration::from_millis(2)
            } else {
                Duration::ZERO
            };
            std::thread::spawn(move || (read_all(s, pause), multi))
        })
        .collect();
    for (i, r) in readers.into_iter().enumerate() {
        let (raw, multi) = r.join().unwrap();
        let want = if multi { &both } else { &only_a };
        match check_stream(&raw, want) {
            Ok(hint) => assert!(hint >= 3000, "stream {i}: hint {hint} below --retry"),
            Err(e) => panic!("stream {i} ({} bytes): {e}", raw.len()),
        }
    }
    assert!(child.wait().unwrap().success());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "drained within the window and its grace"
    );
}
