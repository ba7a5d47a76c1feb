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
//!
//! With `--h2` each socket is an HTTP/2 connection carrying `--streams-per-conn` streams,
//! and the subscriber is the stream: `streams` holds one decoder and one sequence tracker
//! per stream (row `conn × M + k` of the seen-bitset), the frames are parsed by
//! `h2::Conn` from the same shared buffers, DATA goes to the stream's decoder without
//! chunked framing. A connection is "in flight" until each of its streams has its 200
//! HEADERS or has failed; `--max-inflight`, `--connect-rate` and the source addresses
//! count connections.

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

use super::h2;
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
    /// --h2: the connection's framing state (its streams are in `Child::streams`).
    h2: Option<Box<h2::Conn>>,
    state: State,
    dec: Decoder,
    started_ns: u64,
    track: Track,
}

/// One --h2 subscriber: a stream of a connection. `state` is Head until its 200
/// HEADERS, then Streaming, then Closed.
struct Stream {
    state: State,
    dec: Decoder,
    track: Track,
}

/// What a connection's stream events leave for the child to count (after the feed).
enum Act {
    Opened,
    Ended { k: usize, was: State, cause: String },
}

/// The h2 sink of one connection's streams: decodes DATA into the stream's SSE decoder
/// and checks (as `read` does for HTTP/1.1), changes stream states at once and queues
/// the counting in `acts`.
struct StreamSink<'a> {
    streams: &'a mut [Stream],
    /// Row of the connection's first stream in the seen-bitset.
    base: usize,
    stats: &'a mut Stats,
    now: u64,
    acts: &'a mut Vec<Act>,
}

impl StreamSink<'_> {
    fn end(&mut self, k: usize, cause: String) {
        let s = &mut self.streams[k];
        if matches!(s.state, State::Head | State::Streaming) {
            self.acts.push(Act::Ended {
                k,
                was: s.state,
                cause,
            });
            s.state = State::Closed;
        }
    }
}

impl h2::Sink for StreamSink<'_> {
    fn stream(&mut self, k: usize, ev: h2::Event<'_>) {
        let state = self.streams[k].state;
        match ev {
            h2::Event::Status { status, end } => {
                if state == State::Head {
                    match status {
                        200 => {
                            self.streams[k].state = State::Streaming;
                            self.acts.push(Act::Opened);
                        }
                        100..=199 => return, // informational: the response follows
                        _ => return self.end(k, format!("http_{status}")),
                    }
                }
                if end {
                    self.end(k, "server_ended_stream".into());
                }
            }
            h2::Event::Data(d) => match state {
                State::Streaming => {
                    let StreamSink {
                        streams,
                        base,
                        stats,
                        now,
                        ..
                    } = self;
                    let s = &mut streams[k];
                    let track = &mut s.track;
                    let (row, now) = (*base + k, *now);
                    let res = s
                        .dec
                        .feed(d, &mut |item| stats.on_item(track, row, now, item));
                    if let Some(cause) = end_cause(res) {
                        self.end(k, cause);
                    }
                }
                State::Head => self.end(k, "h2_data_before_headers".into()),
                // An ended stream's late data is dropped.
                _ => {}
            },
            h2::Event::End => self.end(k, "server_ended_stream".into()),
            h2::Event::Reset(code) => self.end(k, format!("h2_rst_{}", h2::code_name(code))),
        }
    }
}

/// Feed received (or decrypted) bytes to an h2 connection; the connection-level failure,
/// if any, as a counter name.
fn h2_feed(
    h: &mut h2::Conn,
    streams: &mut [Stream],
    base: usize,
    stats: &mut Stats,
    acts: &mut Vec<Act>,
    now: u64,
    data: &[u8],
) -> Option<String> {
    let mut sink = StreamSink {
        streams,
        base,
        stats,
        now,
        acts,
    };
    h.feed(data, &mut sink).err().map(|e| e.name())
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
    /// --h2: streams per connection (0: HTTP/1.1), the HPACK request block per topic,
    /// the streams (M per connection, in connection order), the acts of the last feed.
    h2_m: usize,
    h2_blocks: Vec<Vec<u8>>,
    streams: Vec<Stream>,
    acts: Vec<Act>,
    /// h2 connections that had a stream open; GOAWAYs received by error code; the
    /// smallest SETTINGS_MAX_CONCURRENT_STREAMS seen; PINGs answered; WINDOW_UPDATEs sent.
    conns_ok: u64,
    h2_goaway: BTreeMap<String, u64>,
    h2_max_streams: Option<u32>,
    h2_pings: u64,
    h2_window_updates: u64,
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
    let h2_m = if opt.h2 { opt.streams_per_conn() } else { 0 };
    let h2_blocks = if opt.h2 {
        let fields = opt.auth_fields()?;
        let blocks: Vec<Vec<u8>> = target
            .topics(opt.topics)
            .iter()
            .map(|t| {
                let path = format!("{}{t}", target.prefix);
                h2::request_block(target.tls, &target.host, &path, &fields)
            })
            .collect();
        if blocks.iter().any(|b| b.len() > h2::MAX_FRAME) {
            anyhow::bail!("the h2 request header block exceeds one 16 KiB frame");
        }
        blocks
    } else {
        Vec::new()
    };
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
                h2: None,
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
        h2_m,
        h2_blocks,
        streams: (0..n * h2_m)
            .map(|_| Stream {
                state: State::Head,
                dec: Decoder::body(),
                track: Track::default(),
            })
            .collect(),
        acts: Vec::new(),
        conns_ok: 0,
        h2_goaway: BTreeMap::new(),
        h2_max_streams: None,
        h2_pings: 0,
        h2_window_updates: 0,
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
                if self.h2_m > 0 {
                    return self.h2_begin(idx);
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
            State::Head | State::Streaming if conn.h2.is_some() && conn.tls.is_none() => {
                self.h2_flush_plain(idx);
                self.read(idx);
                self.h2_flush_plain(idx);
            }
            State::Head | State::Streaming if conn.tls.is_some() => self.read_tls(idx),
            State::Head | State::Streaming => self.read(idx),
            State::NotStarted | State::Closed => {}
        }
    }

    fn read(&mut self, idx: usize) {
        loop {
            let Child {
                conns,
                stats,
                buf,
                streams,
                acts,
                h2_m,
                ..
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
            if let Some(h) = conn.h2.as_deref_mut() {
                let (base, m) = (idx * *h2_m, *h2_m);
                let streams = &mut streams[base..base + m];
                let end = h2_feed(h, streams, base, stats, acts, now, &buf[..n]);
                self.h2_after(idx, now);
                if self.conns[idx].state == State::Closed {
                    return;
                }
                if let Some(cause) = end {
                    return self.close(idx, &cause);
                }
                if n < RECV_BUF {
                    return;
                }
                continue;
            }
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
                streams,
                acts,
                h2_m,
                ..
            } = self;
            let Conn {
                stream,
                tls,
                h2: h2c,
                dec,
                track,
                ..
            } = &mut conns[idx];
            let (Some(stream), Some(tc)) = (stream.as_mut(), tls.as_deref_mut()) else {
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
                if let Some(h) = h2c.as_deref_mut() {
                    if !h.alpn_checked && !tc.is_handshaking() {
                        h.alpn_checked = true;
                        if tc.alpn_protocol() != Some(b"h2") {
                            end = Some("tls_alpn_not_h2".to_string());
                            break;
                        }
                    }
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
                    if let Some(h) = h2c.as_deref_mut() {
                        let (base, hm) = (idx * *h2_m, *h2_m);
                        let streams = &mut streams[base..base + hm];
                        if let Some(cause) =
                            h2_feed(h, streams, base, stats, acts, now, &plain[..m])
                        {
                            end = Some(cause);
                            break 'records;
                        }
                        if !h.out.is_empty() {
                            // ACKs, WINDOW_UPDATEs: written out by tls_flush below.
                            if let Err(e) = tc.writer().write_all(&h.out) {
                                end = Some(format!("tls_{}", io_error_name(&e)));
                                break 'records;
                            }
                            h.out.clear();
                        }
                        continue;
                    }
                    let res = dec.feed(&plain[..m], &mut |item| {
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
            if self.h2_m > 0 {
                self.h2_after(idx, now);
                if self.conns[idx].state == State::Closed {
                    return;
                }
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
        if self.h2_m > 0 {
            return self.h2_close(idx, cause);
        }
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
        if self.h2_m > 0 {
            return self.h2_close(idx, cause);
        }
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

    /// --h2, TCP connected: queue the preface, SETTINGS, the connection WINDOW_UPDATE and
    /// one HEADERS frame per stream (over TLS inside rustls until the handshake is done).
    fn h2_begin(&mut self, idx: usize) {
        let m = self.h2_m;
        let mut h = Box::new(h2::Conn::new(m));
        h2::client_start(&mut h.out);
        for k in 0..m {
            let topic = ((self.first + idx) * m + k) % self.h2_blocks.len();
            h2::request(&mut h.out, h2::stream_id(k), &self.h2_blocks[topic]);
        }
        if let Some(client) = &self.tls {
            let mut tc = match client.connect() {
                Ok(tc) => tc,
                Err(e) => return self.fail(idx, &tls::error_name(&e)),
            };
            // All M requests wait in rustls until the handshake is done, however many.
            tc.set_buffer_limit(None);
            if let Err(e) = tc.writer().write_all(&h.out) {
                return self.fail(idx, &io_error_name(&e));
            }
            h.out = Vec::new();
            let c = &mut self.conns[idx];
            c.tls = Some(Box::new(tc));
            c.h2 = Some(h);
            c.state = State::Head;
            return self.tls_flush(idx);
        }
        let c = &mut self.conns[idx];
        c.h2 = Some(h);
        c.state = State::Head;
        self.h2_flush_plain(idx);
    }

    /// Write what a cleartext h2 connection has queued, until done or the socket is full
    /// (the next writable edge calls this again).
    fn h2_flush_plain(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
        let (Some(stream), Some(h)) = (c.stream.as_mut(), c.h2.as_deref_mut()) else {
            return;
        };
        while !h.out.is_empty() {
            match stream.write(&h.out) {
                Ok(0) => return self.close(idx, "write_zero"),
                Ok(n) => {
                    h.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.close(idx, &io_error_name(&e)),
            }
        }
        // The start (M HEADERS frames) is the only large write: do not keep its capacity.
        if h.out.capacity() > 4096 {
            h.out = Vec::new();
        }
    }

    /// Count a stream's end: a failure if it never streamed, else a dropped stream.
    fn count_end(&mut self, row: usize, was: State, cause: &str) {
        if was == State::Streaming {
            self.dropped_total += 1;
            if self.streams[row].track.armed {
                self.dropped_since_arm += 1;
            }
            *self.dropped.entry(cause.to_string()).or_default() += 1;
        } else {
            self.failed += 1;
            *self.connect_fail.entry(cause.to_string()).or_default() += 1;
        }
    }

    /// After a feed of h2 connection `idx`: count the streams' acts, end the streams a
    /// GOAWAY left out, take the connection's counters, and settle its set-up (out of
    /// flight once no stream is pending; closed once no stream is left).
    fn h2_after(&mut self, idx: usize, now: u64) {
        let base = idx * self.h2_m;
        let mut acts = std::mem::take(&mut self.acts);
        for a in acts.drain(..) {
            match a {
                Act::Opened => {
                    let started = self.conns[idx].started_ns;
                    self.connect_hist
                        .saturating_record(now.saturating_sub(started).max(1));
                    self.last_open_ns = now;
                    self.ok += 1;
                    let c = &mut self.conns[idx];
                    if let Some(h) = c.h2.as_deref_mut() {
                        h.pending -= 1;
                        h.live += 1;
                        if !h.established {
                            h.established = true;
                            self.conns_ok += 1;
                            if let Some(tc) = c.tls.as_deref() {
                                self.sessions.add(Session::of(tc));
                            }
                        }
                    }
                }
                Act::Ended { k, was, cause } => {
                    self.count_end(base + k, was, &cause);
                    if let Some(h) = self.conns[idx].h2.as_deref_mut() {
                        if was == State::Streaming {
                            h.live -= 1;
                        } else {
                            h.pending -= 1;
                        }
                    }
                }
            }
        }
        self.acts = acts;
        let Some(h) = self.conns[idx].h2.as_deref_mut() else {
            return;
        };
        self.h2_pings += std::mem::take(&mut h.pings);
        self.h2_window_updates += std::mem::take(&mut h.window_updates);
        if let Some(v) = h.server_max_streams.take() {
            self.h2_max_streams = Some(self.h2_max_streams.map_or(v, |x| x.min(v)));
        }
        if let Some((last, code)) = h.goaway.take() {
            let cause = format!("h2_goaway_{}", h2::code_name(code));
            *self.h2_goaway.entry(cause.clone()).or_default() += 1;
            // Streams the server will not answer end now; the rest end with the
            // connection, under the same cause.
            h.end_cause = Some(cause.clone());
            for k in 0..self.h2_m {
                let row = base + k;
                let was = self.streams[row].state;
                if h2::stream_id(k) > last && matches!(was, State::Head | State::Streaming) {
                    self.streams[row].state = State::Closed;
                    self.count_end(row, was, &cause);
                    if let Some(h) = self.conns[idx].h2.as_deref_mut() {
                        if was == State::Streaming {
                            h.live -= 1;
                        } else {
                            h.pending -= 1;
                        }
                    }
                }
            }
        }
        self.h2_settle(idx);
    }

    /// A connection whose streams have all opened or failed is out of flight; one with no
    /// stream left is closed.
    fn h2_settle(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
        let Some(h) = c.h2.as_deref() else {
            return;
        };
        let (pending, live) = (h.pending, h.live);
        if c.state == State::Head && pending == 0 {
            c.state = State::Streaming;
            self.inflight -= 1;
        }
        if c.state == State::Streaming && live == 0 {
            self.h2_close(idx, "no_stream_left");
        }
    }

    /// End an h2 connection and every stream still on it (failed if not yet streaming,
    /// dropped if streaming), under the GOAWAY's cause if one came.
    fn h2_close(&mut self, idx: usize, cause: &str) {
        let c = &mut self.conns[idx];
        if c.state == State::Closed {
            return;
        }
        if matches!(c.state, State::Connecting | State::Head) {
            self.inflight -= 1;
        }
        let cause =
            c.h2.as_ref()
                .and_then(|h| h.end_cause.clone())
                .unwrap_or_else(|| cause.to_string());
        c.stream = None;
        c.tls = None;
        c.h2 = None;
        c.state = State::Closed;
        for row in idx * self.h2_m..(idx + 1) * self.h2_m {
            let was = self.streams[row].state;
            if matches!(was, State::Head | State::Streaming) {
                self.streams[row].state = State::Closed;
                self.count_end(row, was, &cause);
            }
        }
    }

    /// `abandon` for --h2: connections still connecting fail whole; on the others, the
    /// streams without a 200 yet fail as `timeout` and the connection keeps the rest.
    fn h2_abandon(&mut self) {
        for idx in 0..self.conns.len() {
            match self.conns[idx].state {
                State::Connecting => self.h2_close(idx, "timeout"),
                State::Head => {
                    for k in 0..self.h2_m {
                        let row = idx * self.h2_m + k;
                        if self.streams[row].state == State::Head {
                            self.streams[row].state = State::Closed;
                            self.count_end(row, State::Head, "timeout");
                            if let Some(h) = self.conns[idx].h2.as_deref_mut() {
                                h.pending -= 1;
                            }
                        }
                    }
                    self.h2_settle(idx);
                }
                _ => {}
            }
        }
        let left = (self.conns.len() - self.started) as u64 * self.h2_m as u64;
        if left > 0 {
            self.failed += left;
            *self.connect_fail.entry("not_started".into()).or_default() += left;
            self.started = self.conns.len();
        }
    }

    fn poll_milestones(&mut self) {
        if !self.connected_sent && self.started == self.conns.len() && self.inflight == 0 {
            self.connected_sent = true;
            send(&ChildMsg::Connected {
                ok: self.ok,
                failed: self.failed,
                conns: if self.h2_m > 0 {
                    self.conns_ok
                } else {
                    self.ok
                },
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
            live: if self.h2_m > 0 {
                self.streams
                    .iter()
                    .filter(|s| s.state == State::Streaming)
                    .count() as u64
            } else {
                self.conns
                    .iter()
                    .filter(|c| c.state == State::Streaming)
                    .count() as u64
            },
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
        s.seen = vec![0; s.words * self.conns.len() * self.h2_m.max(1)];
        s.seq_max = vec![0; events as usize];
        s.seq_min = vec![u64::MAX; events as usize];
        s.seq_count = vec![0; events as usize];
        s.complete = 0;
        self.live_at_arm = 0;
        self.dropped_since_arm = 0;
        let subs: Box<dyn Iterator<Item = (State, &mut Track)>> = if self.h2_m > 0 {
            Box::new(self.streams.iter_mut().map(|s| (s.state, &mut s.track)))
        } else {
            Box::new(self.conns.iter_mut().map(|c| (c.state, &mut c.track)))
        };
        for (state, track) in subs {
            *track = Track {
                armed: state == State::Streaming,
                ..Track::default()
            };
            self.live_at_arm += u64::from(track.armed);
        }
        s.armed = true;
        if events == 0 {
            self.done_sent = true;
        }
    }

    fn abandon(&mut self) {
        if self.h2_m > 0 {
            return self.h2_abandon();
        }
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
        let tracks: Box<dyn Iterator<Item = &Track>> = if self.h2_m > 0 {
            Box::new(self.streams.iter().map(|s| &s.track))
        } else {
            Box::new(self.conns.iter().map(|c| &c.track))
        };
        let missing = tracks
            .filter(|t| t.armed)
            .map(|t| s.events - u64::from(t.distinct).min(s.events))
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
            conns_ok: if self.h2_m > 0 {
                self.conns_ok
            } else {
                self.ok
            },
            h2_goaway: self.h2_goaway.clone(),
            h2_server_max_streams: self.h2_max_streams,
            h2_pings: self.h2_pings,
            h2_window_updates: self.h2_window_updates,
        }
    }
}
