//! One child process: a single-threaded mio (epoll, edge-triggered) loop owning up to
//! `--per-child` subscriber sockets. Per event it only scans for `\n\n`, parses the data's
//! seq and timestamp, and updates preallocated counters, a bitset and a histogram: no
//! allocation on the per-event path, one shared receive buffer for every socket.
//!
//! Over TLS (https:// --url) each connection also holds a buffered rustls
//! `ClientConnection`: the same one `recv` into the shared buffer, whose ciphertext is
//! handed to rustls (`read_tls` from the slice, `process_new_packets`), and the plaintext
//! is read out into a second shared buffer and decoded as above. rustls keeps each
//! decrypted record in a buffer of its own until it is read out (one allocation per
//! record: that is the buffered API's cost, counted in the load generator's CPU).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::Result;
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Protocol, Socket, Type};

use rustls::ClientConnection;

use super::proto::{buckets, new_hist, ChildMsg, ChildReport, ChildStatus};
use super::tls::{self, Session, SessionTally, TlsClient};
use super::{subscribe_request, Opt, Target};
use crate::procfs::{io_error_name, mono_ns, raise_nofile, vm_rss_kib};
use crate::sse::{Decoder, Fail, Flow, Item};

const STDIN: Token = Token(usize::MAX);
/// Shared receive buffer, bytes: large enough to drain a burst in one recv.
const RECV_BUF: usize = 256 * 1024;
/// Shared plaintext buffer for TLS connections (rustls holds at most 16 KiB of plaintext
/// per connection before it must be read out).
const PLAIN_BUF: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    NotStarted,
    Connecting,
    Head,
    Streaming,
    Closed,
}

/// Per-subscriber sequence tracking.
#[derive(Default)]
struct Track {
    armed: bool,
    distinct: u32,
    /// Highest seq seen + 1.
    next: u64,
}

struct Conn {
    stream: Option<TcpStream>,
    /// The TLS session of an https:// subscriber, from TCP connect on.
    tls: Option<Box<ClientConnection>>,
    state: State,
    dec: Decoder,
    started_ns: u64,
    track: Track,
}

/// Counters, histograms and the seen-bitset; everything the per-event path touches.
struct Stats {
    events: u64,
    armed: bool,
    words: usize,
    seen: Vec<u64>,
    seq_max: Vec<u64>,
    seq_min: Vec<u64>,
    seq_count: Vec<u64>,
    lat: Histogram<u64>,
    deliveries: u64,
    last_delivery_ns: u64,
    bytes: u64,
    comments: u64,
    foreign: u64,
    early: u64,
    out_of_range: u64,
    duplicates: u64,
    out_of_order: u64,
    complete: u64,
}

impl Stats {
    fn on_item(&mut self, track: &mut Track, conn: usize, now: u64, item: Item) {
        match item {
            Item::Opened => {}
            Item::Comment => self.comments += 1,
            Item::Foreign => self.foreign += 1,
            Item::Event { seq, ts_ns } => {
                if !self.armed || !track.armed {
                    self.early += 1;
                    return;
                }
                self.deliveries += 1;
                self.last_delivery_ns = now;
                let lat = now.saturating_sub(ts_ns).max(1);
                self.lat.saturating_record(lat);
                if seq >= self.events {
                    self.out_of_range += 1;
                    return;
                }
                let s = seq as usize;
                self.seq_max[s] = self.seq_max[s].max(lat);
                self.seq_min[s] = self.seq_min[s].min(lat);
                self.seq_count[s] += 1;
                let w = conn * self.words + s / 64;
                let bit = 1u64 << (s % 64);
                if self.seen[w] & bit != 0 {
                    self.duplicates += 1;
                    return;
                }
                self.seen[w] |= bit;
                if seq < track.next {
                    self.out_of_order += 1;
                } else {
                    track.next = seq + 1;
                }
                track.distinct += 1;
                if u64::from(track.distinct) == self.events {
                    self.complete += 1;
                }
            }
        }
    }
}

struct Child {
    poll: Poll,
    conns: Vec<Conn>,
    stats: Stats,
    buf: Box<[u8]>,
    /// Plaintext read out of rustls (TLS only; empty otherwise).
    plain: Box<[u8]>,
    tls: Option<TlsClient>,
    sessions: SessionTally,
    rss_start_kib: u64,
    target: SocketAddr,
    /// Request bytes per topic, built once.
    requests: Vec<Vec<u8>>,
    first: usize,
    sources: usize,
    rcvbuf: usize,
    rate: f64,
    max_inflight: usize,
    t0_ns: u64,
    started: usize,
    inflight: usize,
    ok: u64,
    failed: u64,
    first_connect_ns: u64,
    last_open_ns: u64,
    connect_hist: Histogram<u64>,
    connect_fail: BTreeMap<String, u64>,
    dropped: BTreeMap<String, u64>,
    dropped_total: u64,
    dropped_since_arm: u64,
    live_at_arm: u64,
    connected_sent: bool,
    done_sent: bool,
    stdin_buf: Vec<u8>,
}

pub fn run(opt: &Opt) -> Result<()> {
    raise_nofile();
    let target = Target::parse(&opt.url)?;
    let extra = opt.auth_headers()?;
    let requests = target
        .topics(opt.topics)
        .iter()
        .map(|t| subscribe_request(&target, t, &extra))
        .collect();
    let children = opt.subscribers.div_ceil(opt.per_child.max(1)).max(1);
    let tls = TlsClient::from_opt(opt, &target)?;
    // TLS: the handshakes in flight over all children stay within --tls-inflight.
    let max_inflight = match tls {
        Some(_) => opt
            .max_inflight
            .min(opt.tls_inflight.div_ceil(children))
            .max(1),
        None => opt.max_inflight.max(1),
    };
    let poll = Poll::new()?;
    // Commands arrive on stdin; nonblocking so a partial line never stalls the loop.
    set_nonblocking(0)?;
    poll.registry()
        .register(&mut SourceFd(&0), STDIN, Interest::READABLE)?;
    let n = opt.child_count;
    let mut child = Child {
        poll,
        conns: (0..n)
            .map(|_| Conn {
                stream: None,
                tls: None,
                state: State::NotStarted,
                dec: Decoder::default(),
                started_ns: 0,
                track: Track::default(),
            })
            .collect(),
        stats: Stats {
            events: 0,
            armed: false,
            words: 0,
            seen: Vec::new(),
            seq_max: Vec::new(),
            seq_min: Vec::new(),
            seq_count: Vec::new(),
            lat: new_hist(),
            deliveries: 0,
            last_delivery_ns: 0,
            bytes: 0,
            comments: 0,
            foreign: 0,
            early: 0,
            out_of_range: 0,
            duplicates: 0,
            out_of_order: 0,
            complete: 0,
        },
        buf: vec![0u8; RECV_BUF].into_boxed_slice(),
        plain: vec![0u8; if tls.is_some() { PLAIN_BUF } else { 0 }].into_boxed_slice(),
        tls,
        sessions: SessionTally::default(),
        rss_start_kib: 0,
        target: target.addr,
        requests,
        first: opt.child_first,
        sources: if target.addr.ip().is_loopback() {
            usize::from(opt.sources)
        } else {
            0
        },
        rcvbuf: opt.rcvbuf,
        rate: opt.connect_rate as f64 / children as f64,
        max_inflight,
        t0_ns: mono_ns(),
        started: 0,
        inflight: 0,
        ok: 0,
        failed: 0,
        first_connect_ns: 0,
        last_open_ns: 0,
        connect_hist: new_hist(),
        connect_fail: BTreeMap::new(),
        dropped: BTreeMap::new(),
        dropped_total: 0,
        dropped_since_arm: 0,
        live_at_arm: 0,
        connected_sent: false,
        done_sent: false,
        stdin_buf: Vec::new(),
    };
    child.rss_start_kib = vm_rss_kib(std::process::id()).unwrap_or(0);
    child.run()
}

/// What ends a stream after a `Decoder::feed`, if anything.
fn end_cause(res: Result<Flow, Fail>) -> Option<String> {
    match res {
        Ok(Flow::More) => None,
        Ok(Flow::End) => Some("server_ended_stream".into()),
        Err(Fail::Status(code)) => Some(format!("http_{code}")),
        Err(Fail::Malformed) => Some("malformed_response".into()),
    }
}

/// A TCP socket for subscriber (or handshake) number `i`: bound to source address
/// 127.0.0.(2 + i mod `sources`) with IP_BIND_ADDRESS_NO_PORT when `sources` > 0, so the
/// ephemeral ports are per source address.
pub(crate) fn new_socket(
    i: usize,
    sources: usize,
    rcvbuf: usize,
    nonblocking: bool,
) -> io::Result<Socket> {
    let ty = if nonblocking {
        Type::STREAM.nonblocking()
    } else {
        Type::STREAM
    };
    let sock = Socket::new(Domain::IPV4, ty, Some(Protocol::TCP))?;
    if sources > 0 {
        let one: libc::c_int = 1;
        // SAFETY: valid fd, option value points at a live c_int of the given size.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let host = 2 + (i % sources) as u8;
        let src = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, host), 0);
        sock.bind(&SocketAddr::V4(src).into())?;
    }
    if rcvbuf > 0 {
        sock.set_recv_buffer_size(rcvbuf)?;
    }
    Ok(sock)
}

fn set_nonblocking(fd: i32) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own with integer arguments only.
    let r = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK)
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn send(msg: &ChildMsg) {
    let mut out = io::stdout().lock();
    // The parent reads line by line; if it is gone there is nobody to tell.
    let _ = serde_json::to_writer(&mut out, msg);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

impl Child {
    fn run(&mut self) -> Result<()> {
        let mut events = Events::with_capacity(4096);
        loop {
            self.start_connects();
            let timeout = if self.started < self.conns.len() && self.rate > 0.0 {
                Duration::from_millis(2)
            } else {
                Duration::from_millis(200)
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            for ev in events.iter() {
                if ev.token() == STDIN {
                    if !self.handle_stdin()? {
                        return Ok(());
                    }
                } else {
                    self.handle_conn(ev.token().0);
                }
            }
            self.poll_milestones();
        }
    }

    fn start_connects(&mut self) {
        let n = self.conns.len();
        let now = mono_ns();
        while self.started < n && self.inflight < self.max_inflight {
            if self.rate > 0.0 {
                let allowed =
                    (now.saturating_sub(self.t0_ns) as f64 / 1e9 * self.rate) as usize + 1;
                if self.started >= allowed {
                    break;
                }
            }
            let idx = self.started;
            self.started += 1;
            if self.first_connect_ns == 0 {
                self.first_connect_ns = now;
            }
            match self.connect(idx) {
                Ok(mut stream) => {
                    let reg = self.poll.registry().register(
                        &mut stream,
                        Token(idx),
                        Interest::READABLE | Interest::WRITABLE,
                    );
                    if let Err(e) = reg {
                        self.fail(idx, &io_error_name(&e));
                        continue;
                    }
                    let c = &mut self.conns[idx];
                    c.stream = Some(stream);
                    c.state = State::Connecting;
                    c.started_ns = now;
                    self.inflight += 1;
                }
                Err(e) => self.fail(idx, &io_error_name(&e)),
            }
        }
    }

    fn connect(&self, idx: usize) -> io::Result<TcpStream> {
        let sock = new_socket(self.first + idx, self.sources, self.rcvbuf, true)?;
        match sock.connect(&self.target.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        Ok(TcpStream::from_std(std::net::TcpStream::from(sock)))
    }

    fn handle_conn(&mut self, idx: usize) {
        let Some(conn) = self.conns.get_mut(idx) else {
            return;
        };
        match conn.state {
            State::Connecting => {
                let Some(stream) = conn.stream.as_mut() else {
                    return;
                };
                match stream.take_error() {
                    Ok(Some(e)) | Err(e) => return self.fail(idx, &io_error_name(&e)),
                    Ok(None) => {}
                }
                match stream.peer_addr() {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => return, // spurious
                    Err(e) => return self.fail(idx, &io_error_name(&e)),
                }
                let topic = (self.first + idx) % self.requests.len();
                let req = &self.requests[topic];
                if let Some(client) = &self.tls {
                    // The request waits in rustls until the handshake is done.
                    let mut tc = match client.connect() {
                        Ok(tc) => tc,
                        Err(e) => return self.fail(idx, &tls::error_name(&e)),
                    };
                    if let Err(e) = tc.writer().write_all(req) {
                        return self.fail(idx, &io_error_name(&e));
                    }
                    conn.tls = Some(Box::new(tc));
                    conn.state = State::Head;
                    return self.tls_flush(idx);
                }
                match stream.write(req) {
                    Ok(n) if n == req.len() => conn.state = State::Head,
                    Ok(_) => self.fail(idx, "short_request_write"),
                    Err(e) => self.fail(idx, &io_error_name(&e)),
                }
            }
            State::Head | State::Streaming if conn.tls.is_some() => self.read_tls(idx),
            State::Head | State::Streaming => self.read(idx),
            State::NotStarted | State::Closed => {}
        }
    }

    fn read(&mut self, idx: usize) {
        loop {
            let Child {
                conns, stats, buf, ..
            } = self;
            let conn = &mut conns[idx];
            let Some(stream) = conn.stream.as_mut() else {
                return;
            };
            let n = match stream.read(buf) {
                Ok(0) => return self.close(idx, "eof"),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.close(idx, &io_error_name(&e)),
            };
            // One clock read per recv: every event in it was in the socket by now.
            let now = mono_ns();
            stats.bytes += n as u64;
            let mut opened = false;
            let track = &mut conn.track;
            let res = conn.dec.feed(&buf[..n], &mut |item| {
                if item == Item::Opened {
                    opened = true;
                }
                stats.on_item(track, idx, now, item);
            });
            if opened {
                self.opened(idx, now);
            }
            if let Some(cause) = end_cause(res) {
                return self.close(idx, &cause);
            }
            // Edge-triggered: a short read drained the socket, and data arriving later
            // raises a new edge, so the extra recv that would return EAGAIN is skipped.
            if n < RECV_BUF {
                return;
            }
        }
    }

    /// A readiness event on a TLS subscriber: receive ciphertext (same shared buffer and
    /// short-read rule as `read`), let rustls decrypt it, decode the plaintext, then
    /// write whatever rustls has queued (handshake flights, the request).
    fn read_tls(&mut self, idx: usize) {
        loop {
            let Child {
                conns,
                stats,
                buf,
                plain,
                ..
            } = self;
            let conn = &mut conns[idx];
            let (Some(stream), Some(tc)) = (conn.stream.as_mut(), conn.tls.as_deref_mut()) else {
                return;
            };
            let n = match stream.read(buf) {
                // No close_notify before the TCP FIN (that one is seen as plaintext EOF).
                Ok(0) => return self.close(idx, "eof"),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.close(idx, &io_error_name(&e)),
            };
            let now = mono_ns();
            stats.bytes += n as u64;
            let mut input = &buf[..n];
            let mut opened = false;
            let mut end = None;
            let track = &mut conn.track;
            'records: while !input.is_empty() {
                // Takes at most one 4 KiB step of `input` per call.
                match tc.read_tls(&mut input) {
                    Ok(0) => {
                        // rustls takes nothing after the server's close_notify.
                        end = Some("tls_close_notify".to_string());
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        end = Some(format!("tls_read_{}", io_error_name(&e)));
                        break;
                    }
                }
                if let Err(e) = tc.process_new_packets() {
                    // The alert rustls queued for the server, if any: best effort.
                    let _ = tc.write_tls(stream);
                    end = Some(tls::error_name(&e));
                    break;
                }
                loop {
                    let m = match tc.reader().read(plain) {
                        Ok(0) => {
                            end = Some("tls_close_notify".to_string());
                            break 'records;
                        }
                        Ok(m) => m,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            end = Some(format!("tls_{}", io_error_name(&e)));
                            break 'records;
                        }
                    };
                    let res = conn.dec.feed(&plain[..m], &mut |item| {
                        if item == Item::Opened {
                            opened = true;
                        }
                        stats.on_item(track, idx, now, item);
                    });
                    if let Some(cause) = end_cause(res) {
                        end = Some(cause);
                        break 'records;
                    }
                }
            }
            if opened {
                self.sessions.add(Session::of(tc));
                self.opened(idx, now);
            }
            if let Some(cause) = end {
                return self.close(idx, &cause);
            }
            if n < RECV_BUF {
                break;
            }
        }
        self.tls_flush(idx);
    }

    /// Write what rustls has queued until it is all out or the socket is full (the next
    /// writable edge calls this again).
    fn tls_flush(&mut self, idx: usize) {
        let conn = &mut self.conns[idx];
        let (Some(stream), Some(tc)) = (conn.stream.as_mut(), conn.tls.as_deref_mut()) else {
            return;
        };
        while tc.wants_write() {
            match tc.write_tls(stream) {
                Ok(0) => return self.close(idx, "write_zero"),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.close(idx, &io_error_name(&e)),
            }
        }
    }

    fn opened(&mut self, idx: usize, now: u64) {
        let c = &mut self.conns[idx];
        c.state = State::Streaming;
        self.connect_hist
            .saturating_record(now.saturating_sub(c.started_ns).max(1));
        self.last_open_ns = now;
        self.ok += 1;
        self.inflight -= 1;
    }

    /// A subscriber that never reached streaming.
    fn fail(&mut self, idx: usize, cause: &str) {
        let c = &mut self.conns[idx];
        if matches!(c.state, State::Connecting | State::Head) {
            self.inflight -= 1;
        }
        c.stream = None;
        c.tls = None;
        c.state = State::Closed;
        self.failed += 1;
        *self.connect_fail.entry(cause.to_string()).or_default() += 1;
    }

    fn close(&mut self, idx: usize, cause: &str) {
        if self.conns[idx].state != State::Streaming {
            return self.fail(idx, cause);
        }
        let c = &mut self.conns[idx];
        c.stream = None;
        c.tls = None;
        c.state = State::Closed;
        self.dropped_total += 1;
        if c.track.armed {
            self.dropped_since_arm += 1;
        }
        *self.dropped.entry(cause.to_string()).or_default() += 1;
    }

    fn poll_milestones(&mut self) {
        if !self.connected_sent && self.started == self.conns.len() && self.inflight == 0 {
            self.connected_sent = true;
            send(&ChildMsg::Connected {
                ok: self.ok,
                failed: self.failed,
            });
        }
        if self.stats.armed
            && !self.done_sent
            && self.stats.complete + self.dropped_since_arm >= self.live_at_arm
        {
            self.done_sent = true;
            send(&ChildMsg::Done);
        }
    }

    /// Returns false on `quit` or EOF.
    fn handle_stdin(&mut self) -> Result<bool> {
        let mut tmp = [0u8; 1024];
        loop {
            match io::stdin().lock().read(&mut tmp) {
                Ok(0) => return Ok(false),
                Ok(n) => self.stdin_buf.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        while let Some(p) = self.stdin_buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.stdin_buf.drain(..=p).collect();
            let line = String::from_utf8_lossy(&line);
            let mut words = line.split_whitespace();
            match words.next() {
                Some("status") => send(&ChildMsg::Status(self.status())),
                Some("arm") => {
                    let e = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
                    self.arm(e);
                    send(&ChildMsg::Armed);
                }
                Some("abandon") => self.abandon(),
                Some("report") => send(&ChildMsg::Report(Box::new(self.report()))),
                Some("quit") => return Ok(false),
                _ => {}
            }
        }
        Ok(true)
    }

    fn status(&self) -> ChildStatus {
        ChildStatus {
            live: self
                .conns
                .iter()
                .filter(|c| c.state == State::Streaming)
                .count() as u64,
            comments: self.stats.comments,
            dropped: self.dropped_total,
            deliveries: self.stats.deliveries,
        }
    }

    /// Prepare sequence tracking for `events` seqs: the only allocation of the run.
    fn arm(&mut self, events: u64) {
        let s = &mut self.stats;
        s.events = events;
        s.words = (events as usize).div_ceil(64);
        s.seen = vec![0; s.words * self.conns.len()];
        s.seq_max = vec![0; events as usize];
        s.seq_min = vec![u64::MAX; events as usize];
        s.seq_count = vec![0; events as usize];
        s.complete = 0;
        self.live_at_arm = 0;
        self.dropped_since_arm = 0;
        for c in &mut self.conns {
            c.track = Track {
                armed: c.state == State::Streaming,
                ..Track::default()
            };
            self.live_at_arm += u64::from(c.track.armed);
        }
        s.armed = true;
        if events == 0 {
            self.done_sent = true;
        }
    }

    fn abandon(&mut self) {
        for idx in 0..self.conns.len() {
            if matches!(self.conns[idx].state, State::Connecting | State::Head) {
                self.fail(idx, "timeout");
            }
        }
        let left = self.conns.len() - self.started;
        if left > 0 {
            self.failed += left as u64;
            *self.connect_fail.entry("not_started".into()).or_default() += left as u64;
            self.started = self.conns.len();
        }
    }

    fn report(&self) -> ChildReport {
        let s = &self.stats;
        let missing = self
            .conns
            .iter()
            .filter(|c| c.track.armed)
            .map(|c| s.events - u64::from(c.track.distinct).min(s.events))
            .sum();
        ChildReport {
            connected: self.ok,
            connect_fail: self.connect_fail.clone(),
            first_connect_ns: self.first_connect_ns,
            last_open_ns: self.last_open_ns,
            connect_hist: buckets(&self.connect_hist),
            tls_sessions: self.sessions.to_map(),
            rss_start_kib: self.rss_start_kib,
            bytes: s.bytes,
            comments: s.comments,
            foreign: s.foreign,
            early: s.early,
            out_of_range: s.out_of_range,
            dropped: self.dropped.clone(),
            deliveries: s.deliveries,
            missing,
            duplicates: s.duplicates,
            out_of_order: s.out_of_order,
            complete: s.complete,
            live_at_arm: self.live_at_arm,
            last_delivery_ns: s.last_delivery_ns,
            latency_hist: buckets(&s.lat),
            seq_max_ns: s.seq_max.clone(),
            seq_min_ns: s.seq_min.clone(),
            seq_count: s.seq_count.clone(),
        }
    }
}
