//! Shared test harness: start herald in-process on free ports with the backend named by
//! `HERALD_TEST_BACKEND` (epoll, uring; default auto), and talk to it over real sockets:
//! a raw SSE client that undoes chunked framing and parses events by the WHATWG rules,
//! a many-subscriber reader driven by mio, and NDJSON / HTTP publishers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use herald::{BackendChoice, Config};

pub mod h2;
pub mod redis;
pub mod tls;

pub const WAIT: Duration = Duration::from_secs(20);

/// The backend under test, or None (with the reason printed) if it cannot run here. With
/// `HERALD_REQUIRE_URING=1` (CI sets it) a missing io_uring fails the test instead.
pub fn backend() -> Option<BackendChoice> {
    let b = match std::env::var("HERALD_TEST_BACKEND").as_deref() {
        Ok("uring") => BackendChoice::Uring,
        Ok("epoll") => BackendChoice::Epoll,
        _ => BackendChoice::Auto,
    };
    if b == BackendChoice::Uring {
        if let Err(why) = herald::engine::probe::check() {
            if std::env::var("HERALD_REQUIRE_URING").as_deref() == Ok("1") {
                panic!("io_uring is required here (HERALD_REQUIRE_URING=1) but unavailable: {why}");
            }
            eprintln!("SKIPPED: io_uring backend unavailable here: {why}");
            return None;
        }
    }
    Some(b)
}

pub struct TestServer {
    pub server: Option<herald::Server>,
    pub addr: SocketAddr,
    pub ingest: SocketAddr,
    /// The TLS listener, when the config set one.
    pub tls: Option<SocketAddr>,
}

impl TestServer {
    pub fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().expect("clean shutdown");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            let _ = s.shutdown();
        }
    }
}

/// Config for tests: loopback, free ports, two workers.
pub fn config(backend: BackendChoice) -> Config {
    Config {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        ingest: Some("127.0.0.1:0".parse().unwrap()),
        workers: 2,
        backend,
        drain_window: Duration::from_millis(200),
        ..Config::default()
    }
}

/// Start herald, or None if the backend under test cannot run here.
pub fn start(tweak: impl FnOnce(&mut Config)) -> Option<TestServer> {
    let b = backend()?;
    if std::env::var_os("HERALD_TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                std::env::var("HERALD_TEST_LOG").unwrap(),
            ))
            .with_test_writer()
            .try_init();
    }
    let mut c = config(b);
    tweak(&mut c);
    let server = herald::start(c).expect("herald starts");
    let addr = server.listen_addr;
    let tls = server.tls_addr;
    let ingest = server
        .ingest_addr
        .unwrap_or_else(|| "127.0.0.1:9".parse().unwrap());
    Some(TestServer {
        server: Some(server),
        addr,
        ingest,
        tls,
    })
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

/// Incremental parser: HTTP/1.1 chunked body in, SSE events out (WHATWG rules).
#[derive(Default)]
pub struct SseParser {
    raw: Vec<u8>,
    body: Vec<u8>,
    pub chunked: bool,
    pub ended: bool,
    cur: Event,
    data_lines: Vec<String>,
    has_data: bool,
    pub comments: usize,
    pub retry: Option<u64>,
    pub last_id: String,
}

impl SseParser {
    pub fn new(chunked: bool) -> SseParser {
        SseParser {
            chunked,
            ..Default::default()
        }
    }

    /// Feed body bytes; complete events are appended to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<Event>) {
        if self.chunked {
            self.raw.extend_from_slice(bytes);
            while let Some(eol) = find(&self.raw, b"\r\n") {
                let size_line = std::str::from_utf8(&self.raw[..eol]).expect("chunk size is ASCII");
                let size = usize::from_str_radix(size_line.trim(), 16).expect("chunk size is hex");
                if size == 0 {
                    self.ended = true;
                    self.raw.clear();
                    break;
                }
                if self.raw.len() < eol + 2 + size + 2 {
                    break;
                }
                assert_eq!(
                    &self.raw[eol + 2 + size..eol + 4 + size],
                    b"\r\n",
                    "chunk ends with CRLF"
                );
                self.body
                    .extend_from_slice(&self.raw[eol + 2..eol + 2 + size]);
                self.raw.drain(..eol + 4 + size);
            }
        } else {
            self.body.extend_from_slice(bytes);
        }
        self.parse_lines(out);
    }

    fn parse_lines(&mut self, out: &mut Vec<Event>) {
        let body = std::mem::take(&mut self.body);
        let mut start = 0;
        while let Some(rel) = body[start..].iter().position(|&b| b == b'\n' || b == b'\r') {
            let pos = start + rel;
            // A lone CR at the end might be the first half of CRLF: wait for more.
            if body[pos] == b'\r' && pos + 1 == body.len() {
                break;
            }
            let line = std::str::from_utf8(&body[start..pos])
                .expect("UTF-8 stream")
                .to_string();
            start = pos
                + if body[pos] == b'\r' && body.get(pos + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
            self.line(&line, out);
        }
        self.body = body;
        self.body.drain(..start);
    }

    fn line(&mut self, line: &str, out: &mut Vec<Event>) {
        if line.is_empty() {
            if self.has_data {
                let mut ev = std::mem::take(&mut self.cur);
                ev.data = self.data_lines.join("\n");
                if ev.event.is_empty() {
                    ev.event = "message".into();
                }
                ev.id = Some(self.last_id.clone());
                out.push(ev);
            }
            self.cur = Event::default();
            self.data_lines.clear();
            self.has_data = false;
            return;
        }
        if line.starts_with(':') {
            self.comments += 1;
            return;
        }
        let (field, value) = match line.find(':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(' ').unwrap_or(v))
            }
            None => (line, ""),
        };
        match field {
            "event" => self.cur.event = value.to_string(),
            "data" => {
                self.data_lines.push(value.to_string());
                self.has_data = true;
            }
            "id" if !value.contains('\0') => self.last_id = value.to_string(),
            "retry" => self.retry = value.parse().ok(),
            _ => {}
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One subscriber over a blocking socket.
/// An SSE (or any HTTP) client over a blocking stream: TCP, or TLS (`common::tls`).
pub struct Client<S = TcpStream> {
    pub stream: S,
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub parser: SseParser,
    pub events: Vec<Event>,
}

impl Client {
    /// `GET path` with extra header lines; reads the response head.
    pub fn get(addr: SocketAddr, path: &str, extra: &str) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        Client::request(stream, "test", path, extra)
    }

    pub fn subscribe(addr: SocketAddr, path: &str) -> Client {
        let c = Client::get(addr, path, "");
        assert_eq!(c.status, 200, "subscribe {path}");
        assert_eq!(
            c.headers.get("content-type").map(String::as_str),
            Some("text/event-stream; charset=utf-8")
        );
        c
    }
}

impl<S: Read + Write> Client<S> {
    /// Send `GET path` (with extra header lines) on `stream` and read the response head.
    pub fn request(mut stream: S, host: &str, path: &str, extra: &str) -> Client<S> {
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n{extra}\r\n"
        )
        .unwrap();
        stream.flush().unwrap();
        let (status, headers, rest) = read_head(&mut stream);
        let chunked = headers
            .get("transfer-encoding")
            .is_some_and(|v| v.contains("chunked"));
        let mut c = Client {
            stream,
            status,
            headers,
            parser: SseParser::new(chunked),
            events: Vec::new(),
        };
        c.parser.feed(&rest, &mut c.events);
        c
    }

    /// Read until the server closes: Ok at a clean end of stream (for TLS: after the
    /// server's close_notify), else the error's kind.
    pub fn read_to_close(&mut self) -> Result<(), io::ErrorKind> {
        let mut buf = [0u8; 16384];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(k) => self.parser.feed(&buf[..k], &mut self.events),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.kind()),
            }
        }
    }

    /// Read until `n` events arrived (or panic after WAIT).
    pub fn wait_events(&mut self, n: usize) -> &[Event] {
        let deadline = Instant::now() + WAIT;
        let mut buf = [0u8; 16384];
        while self.events.len() < n {
            assert!(
                Instant::now() < deadline,
                "timed out with {} of {n} events: {:?}",
                self.events.len(),
                self.events
            );
            match self.stream.read(&mut buf) {
                Ok(0) => panic!(
                    "stream closed after {} of {n} events: {:?}",
                    self.events.len(),
                    self.events
                ),
                Ok(k) => self.parser.feed(&buf[..k], &mut self.events),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!("read failed after {} of {n} events: {e}", self.events.len()),
            }
        }
        &self.events
    }

    /// Read until the server ends the stream; returns all events.
    pub fn read_to_end(&mut self) -> &[Event] {
        let mut buf = [0u8; 16384];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => self.parser.feed(&buf[..k], &mut self.events),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!("read failed: {e}"),
            }
        }
        &self.events
    }

    /// Read until `cond` holds on the parser (e.g. comments seen).
    pub fn wait_until(&mut self, mut cond: impl FnMut(&SseParser, &[Event]) -> bool) {
        let deadline = Instant::now() + WAIT;
        let mut buf = [0u8; 4096];
        while !cond(&self.parser, &self.events) {
            assert!(Instant::now() < deadline, "condition not met in time");
            match self.stream.read(&mut buf) {
                Ok(0) => panic!("stream closed"),
                Ok(k) => self.parser.feed(&buf[..k], &mut self.events),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }
}

/// Read an HTTP response head; returns (status, lower-cased headers, bytes after it).
pub fn read_head(stream: &mut impl Read) -> (u16, HashMap<String, String>, Vec<u8>) {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let mut lines = head.split("\r\n");
            let status_line = lines.next().unwrap();
            let status = status_line
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .expect("status code");
            let headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            return (status, headers, buf[end + 4..].to_vec());
        }
        let n = match stream.read(&mut tmp) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => r.expect("read response head"),
        };
        assert!(
            n > 0,
            "connection closed before a response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&tmp[..n]);
    }
}

pub struct Response {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
}

/// Send raw request bytes; read one response (Content-Length body, or until close).
pub fn raw_request(addr: SocketAddr, request: &[u8]) -> Response {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(request).unwrap();
    let (status, headers, mut body) = read_head(&mut stream);
    let want = headers
        .get("content-length")
        .and_then(|v| v.parse::<usize>().ok());
    let mut tmp = [0u8; 8192];
    loop {
        if want.is_some_and(|w| body.len() >= w) {
            break;
        }
        match stream.read(&mut tmp) {
            Ok(0) => break,
            Ok(n) => body.extend_from_slice(&tmp[..n]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read body: {e}"),
        }
    }
    Response {
        status,
        headers,
        body,
    }
}

pub fn http_get(addr: SocketAddr, path: &str) -> Response {
    raw_request(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

pub fn http_publish(addr: SocketAddr, topic_and_query: &str, data: &str) -> Response {
    let req = format!(
        "POST /publish/{topic_and_query} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{data}",
        data.len()
    );
    raw_request(addr, req.as_bytes())
}

/// Send NDJSON lines to the ingest socket, half-close, return every reply line.
pub fn ingest(addr: SocketAddr, lines: &[String]) -> Vec<String> {
    let mut s = TcpStream::connect(addr).expect("connect ingest");
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut all = String::new();
    for l in lines {
        all.push_str(l);
        all.push('\n');
    }
    s.write_all(all.as_bytes()).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply)
        .expect("ingest replies, then closes");
    reply.lines().map(str::to_string).collect()
}

pub fn event_line(topic: &str, data: &str) -> String {
    serde_json::json!({ "topic": topic, "data": data }).to_string()
}

/// Poll `cond` until true (or panic after WAIT).
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Value of an unlabelled metric from /metrics.
pub fn metric(addr: SocketAddr, name: &str) -> u64 {
    let text = http_get(addr, "/metrics").text();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing in:\n{text}"))
}

/// Wait until `n` streams are open across workers (subscriptions are attached).
pub fn wait_streams(addr: SocketAddr, n: u64) {
    wait_for(&format!("{n} open streams"), || {
        metric(addr, "herald_streams_open") >= n
    });
}

/// Many subscribers read by one mio poller.
pub struct Crowd {
    poll: mio::Poll,
    pub conns: Vec<CrowdConn>,
}

pub struct CrowdConn {
    stream: mio::net::TcpStream,
    head: Option<Vec<u8>>,
    pub parser: SseParser,
    pub events: Vec<Event>,
    pub closed: bool,
}

impl Crowd {
    /// Open `n` subscribers to `path` (requests are sent; heads are read as they come).
    pub fn connect(addr: SocketAddr, path: &str, n: usize) -> Crowd {
        let poll = mio::Poll::new().unwrap();
        let mut conns = Vec::with_capacity(n);
        for i in 0..n {
            let mut s = std::net::TcpStream::connect(addr).expect("connect");
            write!(s, "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
            s.set_nonblocking(true).unwrap();
            let mut stream = mio::net::TcpStream::from_std(s);
            poll.registry()
                .register(&mut stream, mio::Token(i), mio::Interest::READABLE)
                .unwrap();
            conns.push(CrowdConn {
                stream,
                head: Some(Vec::new()),
                parser: SseParser::new(true),
                events: Vec::new(),
                closed: false,
            });
        }
        Crowd { poll, conns }
    }

    /// Pump sockets until `done(conns)` or WAIT passes; returns whether `done` held.
    pub fn pump_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&[CrowdConn]) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        let mut events = mio::Events::with_capacity(4096);
        let mut buf = vec![0u8; 1 << 16];
        while !done(&self.conns) {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            self.poll
                .poll(
                    &mut events,
                    Some((deadline - now).min(Duration::from_millis(100))),
                )
                .unwrap();
            for ev in events.iter() {
                let c = &mut self.conns[ev.token().0];
                loop {
                    match c.stream.read(&mut buf) {
                        Ok(0) => {
                            c.closed = true;
                            break;
                        }
                        Ok(n) => c.feed(&buf[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => {
                            c.closed = true;
                            break;
                        }
                    }
                }
            }
        }
        true
    }
}

impl Crowd {
    /// A crowd of connections registered on `poll` by the caller (token = index).
    pub fn from_parts(poll: mio::Poll, conns: Vec<CrowdConn>) -> Crowd {
        Crowd { poll, conns }
    }
}

impl CrowdConn {
    /// A subscriber whose request was sent; its head is read as it comes.
    pub fn new(stream: mio::net::TcpStream) -> CrowdConn {
        CrowdConn {
            stream,
            head: Some(Vec::new()),
            parser: SseParser::new(true),
            events: Vec::new(),
            closed: false,
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        feed_stream(&mut self.head, &mut self.parser, &mut self.events, bytes);
    }
}

/// Feed a subscriber's bytes: the response head first (it must be a 200), then the body
/// to the SSE parser.
pub fn feed_stream(
    head: &mut Option<Vec<u8>>,
    parser: &mut SseParser,
    events: &mut Vec<Event>,
    bytes: &[u8],
) {
    match head.as_mut() {
        Some(h) => {
            h.extend_from_slice(bytes);
            if let Some(end) = find(h, b"\r\n\r\n") {
                assert!(
                    h.starts_with(b"HTTP/1.1 200"),
                    "subscriber got {:?}",
                    String::from_utf8_lossy(h)
                );
                let rest = h[end + 4..].to_vec();
                *head = None;
                parser.feed(&rest, events);
            }
        }
        None => parser.feed(bytes, events),
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `herald serve` child process, killed if the test ends (or panics) while it runs.
pub struct Spawned(pub std::process::Child);

impl std::ops::Deref for Spawned {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Spawned {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Start the real `herald serve` binary on free ports with the backend under test.
pub fn spawn(args: &[&str]) -> Option<(Spawned, SocketAddr)> {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let ingest: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    spawn_at(listen, ingest, args)
}

/// Start `herald serve` on the given ports; returns once it accepts connections.
pub fn spawn_at(
    listen: SocketAddr,
    ingest: SocketAddr,
    args: &[&str],
) -> Option<(Spawned, SocketAddr)> {
    let backend = match backend()? {
        BackendChoice::Uring => "uring",
        BackendChoice::Epoll => "epoll",
        BackendChoice::Auto => "auto",
    };
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args([
            "serve",
            "--listen",
            &listen.to_string(),
            "--ingest",
            &ingest.to_string(),
        ])
        .args(["--backend", backend])
        .args(if args.contains(&"--workers") {
            &[][..]
        } else {
            &["--workers", "2"][..]
        })
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn herald");
    let child = Spawned(child);
    wait_for("herald to listen", || {
        TcpStream::connect(listen).is_ok() && TcpStream::connect(ingest).is_ok()
    });
    Some((child, listen))
}

pub fn signal(child: &std::process::Child, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success(), "kill {sig}");
}
