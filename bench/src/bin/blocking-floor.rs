//! `blocking-floor`: the kernel floor for per-user events, where every event goes to one
//! subscriber. One thread per ingest connection blocks in `read` on it; for each NDJSON
//! line it builds the chunk-framed SSE frame and `write`s it, blocking, to the sockets
//! subscribed to the line's topic. An event costs one wake-up, one read and one write
//! per subscriber: the least any server can do for it on this kernel. Nothing else: no
//! poller, no timers, no history, no keep-alive, no disconnect detection beyond a failed
//! write. A second thread accepts subscribers (`GET /events/<topic>`), answers a fixed
//! head and files the socket under its topic; it is idle once the streams are open.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use anyhow::{Context, Result};
use clap::Parser;
use herald_bench::floor_frame;

static RESPONSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n9\r\n: floor\n\n\r\n";

/// Request heads longer than this are refused (the connection is dropped).
const HEAD_MAX: usize = 2048;

/// Blocking per-user SSE floor: one read and one write per event.
#[derive(Parser, Debug)]
#[command(name = "blocking-floor", version)]
struct Opt {
    /// Address for subscribers: `GET /events/<topic>`.
    #[arg(long, default_value = "127.0.0.1:8083")]
    listen: SocketAddr,
    /// NDJSON ingest address: lines {"topic":"t","data":"..."}.
    #[arg(long, default_value = "127.0.0.1:7073")]
    ingest: SocketAddr,
}

type Topics = Arc<Mutex<HashMap<String, Vec<TcpStream>>>>;

/// Read a request head; the topic is the path after `/events/`.
fn request_topic(s: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut chunk).ok().filter(|&n| n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > HEAD_MAX {
            return None;
        }
    }
    let line = buf.split(|&b| b == b'\r').next()?;
    let path = std::str::from_utf8(line).ok()?.split(' ').nth(1)?;
    let topic = path.strip_prefix("/events/")?;
    Some(topic.split('?').next()?.to_string())
}

fn accept(listener: TcpListener, topics: Topics) {
    for s in listener.incoming() {
        let Ok(mut s) = s else { continue };
        let _ = s.set_nodelay(true);
        let Some(topic) = request_topic(&mut s) else {
            continue;
        };
        if s.write_all(RESPONSE_HEAD).is_ok() {
            let mut t = topics.lock().unwrap_or_else(|e| e.into_inner());
            t.entry(topic).or_default().push(s);
        }
    }
}

#[derive(serde::Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    topic: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    data: std::borrow::Cow<'a, str>,
}

fn publish(s: TcpStream, topics: Topics, next_id: Arc<AtomicU64>) {
    let mut r = BufReader::with_capacity(64 * 1024, s);
    let (mut line, mut out) = (String::new(), Vec::with_capacity(512));
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let Ok(l) = serde_json::from_str::<Line>(line.trim_end()) else {
            continue;
        };
        floor_frame(&mut out, next_id.fetch_add(1, Ordering::Relaxed), &l.data);
        let mut t = topics.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(subs) = t.get_mut(l.topic.as_ref()) {
            // A failed write means the peer left: drop its socket.
            subs.retain_mut(|s| s.write_all(&out).is_ok());
        }
    }
}

fn main() -> Result<()> {
    let opt = Opt::parse();
    herald_bench::procfs::raise_nofile();
    let topics: Topics = Arc::default();
    let listener =
        TcpListener::bind(opt.listen).with_context(|| format!("listen {}", opt.listen))?;
    let ingest = TcpListener::bind(opt.ingest).with_context(|| format!("ingest {}", opt.ingest))?;
    let t = topics.clone();
    thread::Builder::new()
        .name("floor-accept".into())
        .spawn(move || accept(listener, t))?;
    eprintln!(
        "blocking-floor listening on {} (ingest {})",
        opt.listen, opt.ingest
    );
    let next_id = Arc::new(AtomicU64::new(1));
    for s in ingest.incoming() {
        let Ok(s) = s else { continue };
        let (t, id) = (topics.clone(), next_id.clone());
        thread::Builder::new()
            .name("floor-pub".into())
            .spawn(move || publish(s, t, id))?;
    }
    Ok(())
}
