//! Per-core worker state, shared by both backends: the connection slab, the worker-local
//! topic logs, the timer wheel and the subscriber lists. Sans-IO: a backend feeds it
//! accepts, bytes, write completions and ticks, and asks it which connections need a write
//! (`take_ready` + `fill_write`) or a close (`take_closing`).
//!
//! Fan-out without per-connection queues: each local topic keeps a log of the events this
//! worker received for it, and a subscriber is just a cursor into that log. Publishing an
//! event appends one `Arc<Event>` to the log and walks the dense subscriber list marking
//! connections ready; nothing is allocated, copied or locked per subscriber. A log entry is
//! dropped once every cursor (including those of writes still in flight) has passed it, and
//! a subscriber whose backlog passes `max_backlog` is disconnected, so a log is bounded.

use std::collections::{HashMap, VecDeque};
use std::io::IoSlice;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use slab::Slab;

use crate::config::Config;
use crate::fanout::bus::{BusMsg, Hub, PublishFailure};
use crate::fanout::topic::Event;
use crate::http::request::{parse_head, HttpError, Limits, Parsed, Request, Route};
use crate::http::response::{self, Cors};
use crate::metrics::{Counters, WorkerStats};
use crate::sse::encode::{encode_retry, KEEPALIVE_BODY, KEEPALIVE_CHUNKED};
use crate::sse::event::Publish;
use crate::timer::wheel::Wheel;

pub type ConnId = u32;

/// One timer tick.
pub const TICK: Duration = Duration::from_millis(10);
/// Wheel size: 4096 ticks of 10 ms = 41 s horizon; longer deadlines wait a lap.
const WHEEL_SLOTS: usize = 4096;
/// Most frames in one write (`sendmsg`/`writev` iovecs).
pub const MAX_IOVECS: usize = 64;
/// Most bytes in one write.
const MAX_WRITE_BYTES: usize = 256 << 10;
/// The demo page served at `GET /`.
const DEMO_PAGE: &str = include_str!("../demo/index.html");
/// Chunked-encoding end of body, sent when a stream ends cleanly.
const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// State shared by all workers (read-mostly; atomics only per connection, never per delivery).
pub struct Shared {
    pub config: Config,
    pub hub: Hub,
    pub stats: Vec<Arc<WorkerStats>>,
    pub cors: Cors,
    /// Connections open in the whole process (for `--max-connections`).
    pub open: AtomicUsize,
    /// Shutdown requested.
    pub stop: AtomicBool,
    /// Backend the workers run ("uring"/"epoll"), for /metrics.
    pub backend: OnceLock<&'static str>,
}

impl Shared {
    pub fn new(config: Config) -> Arc<Shared> {
        let limits = crate::fanout::topic::Limits {
            max_events: config.history_events,
            max_bytes: config.history_bytes,
            max_age: config.history_age,
        };
        Arc::new(Shared {
            hub: Hub::new(config.workers, limits),
            stats: (0..config.workers).map(|_| Arc::default()).collect(),
            cors: Cors::new(&config.cors_origins, config.cors_credentials),
            open: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            backend: OnceLock::new(),
            config,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the request head.
    Head,
    /// Reading a publish body.
    Body,
    /// Writing a one-off response.
    Respond,
    /// Streaming events.
    Stream,
    /// Shutdown or topic end: flush, then send the last chunk and close.
    Drain,
    /// Handed to the backend to close; ignored until `release`.
    Closing,
}

mod flag {
    pub const HTTP10: u8 = 1;
    /// In `Core::ready`.
    pub const READY: u8 = 2;
    /// A write is in flight (uring) or blocked on a full socket buffer (epoll).
    pub const WRITING: u8 = 4;
    /// Something was written since the last keep-alive check.
    pub const WROTE: u8 = 8;
    /// Keep the connection for another request after this response.
    pub const KEEP_ALIVE: u8 = 16;
    /// May POST /publish (peer address in `publish-allow`).
    pub const PUBLISHER: u8 = 32;
    /// The drain trailer is queued: close once it is written.
    pub const FINAL: u8 = 64;
    /// Over a limit: answer 503 once the request head is in (closing before reading it
    /// could reset the connection and lose the answer).
    pub const REJECT: u8 = 128;
}

/// One subscription of a connection: a cursor into a local topic log.
#[derive(Debug, Clone, Copy)]
struct Sub {
    topic: u32,
    /// Index of this subscription in the topic's `subs`.
    pos: u32,
    /// Absolute index of the next log entry to send.
    cursor: u64,
}

#[derive(Debug)]
enum Subs {
    None,
    One(Sub),
    Many(Box<[Sub]>),
}

impl Subs {
    fn as_slice(&self) -> &[Sub] {
        match self {
            Subs::None => &[],
            Subs::One(s) => std::slice::from_ref(s),
            Subs::Many(v) => v,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [Sub] {
        match self {
            Subs::None => &mut [],
            Subs::One(s) => std::slice::from_mut(s),
            Subs::Many(v) => v,
        }
    }
}

/// Bytes read but not yet consumed (partial head, publish body, pipelined request).
#[derive(Debug, Default)]
struct ReadBuf {
    buf: Vec<u8>,
    /// The publish request whose body is being read.
    publish: Option<Box<Request>>,
}

/// A connection. Idle subscribers hold nothing on the heap besides this record.
pub struct Conn<H> {
    pub handle: H,
    /// Bumped on every reuse of the slab slot, so late completions can be told apart.
    pub gen: u32,
    phase: Phase,
    flags: u8,
    /// Bytes of the first pending frame already written.
    off: u32,
    /// Tick (low 32 bits) of the last write progress.
    progress: u32,
    subs: Subs,
    /// Per-connection frames written before live events: response head, gap signal,
    /// replay, keep-alive, trailer.
    pre: VecDeque<Bytes>,
    rbuf: Option<Box<ReadBuf>>,
}

impl<H> Conn<H> {
    fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }
}

struct LogEntry {
    ev: Arc<Event>,
    /// Cumulative wire bytes of the log up to and including this entry.
    end: u64,
}

#[derive(Debug, Clone, Copy)]
struct SubRef {
    conn: ConnId,
    /// Index into the connection's `subs`.
    slot: u32,
}

/// A topic as one worker sees it: its local subscribers and recent events.
struct LocalTopic {
    name: Arc<str>,
    subs: Vec<SubRef>,
    log: VecDeque<LogEntry>,
    /// Absolute index of `log[0]`.
    base: u64,
    /// Cumulative bytes before `log[0]`.
    base_bytes: u64,
}

impl LocalTopic {
    fn end(&self) -> u64 {
        self.base + self.log.len() as u64
    }

    fn end_bytes(&self) -> u64 {
        self.log.back().map_or(self.base_bytes, |e| e.end)
    }

    /// Cumulative bytes before absolute index `i`.
    fn bytes_before(&self, i: u64) -> u64 {
        match i.checked_sub(self.base + 1) {
            Some(k) => self.log[k as usize].end,
            None => self.base_bytes,
        }
    }

    fn entry(&self, i: u64) -> Option<&Arc<Event>> {
        let k = i.checked_sub(self.base)?;
        self.log.get(k as usize).map(|e| &e.ev)
    }

    /// Drop entries below absolute index `upto`.
    fn trim(&mut self, upto: u64) {
        if upto <= self.base {
            return;
        }
        let k = (upto - self.base) as usize;
        self.base_bytes = self.log[k - 1].end;
        self.log.drain(..k);
        self.base = upto;
    }
}

fn frame_of(ev: &Event, http10: bool) -> &[u8] {
    if http10 {
        ev.frame.body()
    } else {
        ev.frame.chunked()
    }
}

/// What the backend must do after `handle_read`.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    Continue,
    /// Stop reading (publish body larger than allowed, connection closing).
    Stop,
}

pub struct Core<H> {
    pub id: usize,
    shared: Arc<Shared>,
    conns: Slab<Conn<H>>,
    topics: Slab<LocalTopic>,
    topic_ids: HashMap<Arc<str>, u32>,
    wheel: Wheel,
    /// Sequence of the last event taken from the inbox.
    seen_seq: u64,
    ready: Vec<ConnId>,
    closing: Vec<ConnId>,
    expired: Vec<u32>,
    pub counters: Counters,
    start: Instant,
    now_tick: u64,
    draining: bool,
    /// Per-worker share of `--accept-rate`: tokens and the tick they were last refilled.
    accept_tokens: f64,
    accept_refill_tick: u64,
    limits: Limits,
    next_gen: u32,
}

impl<H> Core<H> {
    pub fn new(id: usize, shared: Arc<Shared>) -> Core<H> {
        let cfg = &shared.config;
        let limits = Limits {
            max_head: cfg.max_head,
            max_topics: cfg.max_topics,
            max_body: cfg.max_event,
        };
        Core {
            id,
            conns: Slab::with_capacity(1024),
            topics: Slab::new(),
            topic_ids: HashMap::new(),
            wheel: Wheel::new(WHEEL_SLOTS, 1024, 0),
            seen_seq: 0,
            ready: Vec::new(),
            closing: Vec::new(),
            expired: Vec::new(),
            counters: Counters::default(),
            start: Instant::now(),
            now_tick: 0,
            draining: false,
            // The bucket starts full: one second's worth of this worker's share.
            accept_tokens: (cfg.accept_rate as f64 / cfg.workers as f64).max(1.0),
            accept_refill_tick: 0,
            limits,
            next_gen: 1,
            shared,
        }
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn conn(&self, c: ConnId) -> Option<&Conn<H>> {
        self.conns.get(c as usize)
    }

    pub fn conn_mut(&mut self, c: ConnId) -> Option<&mut Conn<H>> {
        self.conns.get_mut(c as usize)
    }

    pub fn conn_count(&self) -> usize {
        self.conns.len()
    }

    pub fn is_draining(&self) -> bool {
        self.draining
    }

    pub fn iter_ids(&self) -> Vec<ConnId> {
        self.conns.iter().map(|(k, _)| k as ConnId).collect()
    }

    fn ticks(&self, d: Duration) -> u64 {
        (d.as_millis() / TICK.as_millis()).max(1) as u64
    }

    /// Refresh the worker's clock; call once per loop turn.
    pub fn update_clock(&mut self) {
        self.now_tick = (self.start.elapsed().as_millis() / TICK.as_millis()) as u64;
    }

    /// How long the backend may block: until the next timer, capped.
    pub fn poll_timeout(&self) -> Duration {
        match self.wheel.next_expiry(self.now_tick) {
            Some(t) => TICK * (t.min(100) as u32),
            None => Duration::from_secs(1),
        }
    }

    /// Publish this worker's counters for /metrics.
    pub fn publish_stats(&mut self) {
        self.counters.connections_open = self.conns.len() as u64;
        self.counters.loop_turns += 1;
        self.shared.stats[self.id].store(&self.counters);
    }

    // ---- accept -------------------------------------------------------------------

    /// A connection was accepted. Returns its id; over the limits it is answered 503.
    pub fn handle_accept(&mut self, handle: H, peer: Option<IpAddr>) -> ConnId {
        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        let publisher = peer.is_some_and(|ip| {
            let ip = match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
                v4 => v4,
            };
            self.shared
                .config
                .publish_allow
                .iter()
                .any(|n| n.contains(&ip))
        });
        let c = self.conns.insert(Conn {
            handle,
            gen,
            phase: Phase::Head,
            flags: if publisher { flag::PUBLISHER } else { 0 },
            off: 0,
            progress: 0,
            subs: Subs::None,
            pre: VecDeque::new(),
            rbuf: None,
        }) as ConnId;
        self.wheel.ensure_capacity(self.conns.capacity() as u32);
        self.counters.connections_accepted += 1;
        let open = self.shared.open.fetch_add(1, Ordering::Relaxed) + 1;
        if open > self.shared.config.max_connections || !self.take_accept_token() {
            self.counters.connections_rejected += 1;
            self.conns[c as usize].flags |= flag::REJECT;
        }
        let deadline = self.now_tick + self.ticks(self.shared.config.head_timeout);
        self.wheel.insert(c, deadline);
        c
    }

    fn take_accept_token(&mut self) -> bool {
        let rate = self.shared.config.accept_rate;
        if rate == 0 {
            return true;
        }
        let per_tick = rate as f64 / self.shared.config.workers as f64 * TICK.as_secs_f64();
        let elapsed = self.now_tick.saturating_sub(self.accept_refill_tick) as f64;
        let burst = (rate as f64 / self.shared.config.workers as f64).max(1.0);
        self.accept_tokens = (self.accept_tokens + elapsed * per_tick).min(burst);
        self.accept_refill_tick = self.now_tick;
        if self.accept_tokens >= 1.0 {
            self.accept_tokens -= 1.0;
            true
        } else {
            false
        }
    }

    // ---- read ---------------------------------------------------------------------

    /// Bytes arrived on connection `c`.
    pub fn handle_read(&mut self, c: ConnId, data: &[u8]) -> ReadOutcome {
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return ReadOutcome::Stop;
        };
        match conn.phase {
            Phase::Closing => return ReadOutcome::Stop,
            // A subscriber has nothing more to say; whatever it sends is dropped.
            Phase::Stream | Phase::Drain => return ReadOutcome::Continue,
            Phase::Respond => {
                // Pipelined request: keep it (bounded) until the response is written.
                let rb = conn.rbuf.get_or_insert_with(Box::default);
                if rb.buf.len() + data.len() > self.limits.max_head + self.limits.max_body {
                    self.close(c);
                    return ReadOutcome::Stop;
                }
                rb.buf.extend_from_slice(data);
                return ReadOutcome::Continue;
            }
            Phase::Head | Phase::Body => {}
        }
        match conn.rbuf.as_mut() {
            Some(rb) => rb.buf.extend_from_slice(data),
            None if conn.phase == Phase::Head => {
                // Fast path: the whole head arrived in one read, nothing is buffered.
                return self.process_input(c, Some(data));
            }
            None => {
                conn.rbuf = Some(Box::new(ReadBuf {
                    buf: data.to_vec(),
                    publish: None,
                }))
            }
        }
        self.process_input(c, None)
    }

    /// Peer closed its side (or the read failed).
    pub fn handle_eof(&mut self, c: ConnId) {
        if let Some(conn) = self.conns.get(c as usize) {
            if conn.phase == Phase::Respond && conn.has(flag::WRITING) {
                // Half-closed after sending its request: let the response finish.
                if let Some(conn) = self.conns.get_mut(c as usize) {
                    conn.flags &= !flag::KEEP_ALIVE;
                }
                return;
            }
            self.close(c);
        }
    }

    /// Parse and act on buffered input (or `direct` bytes when nothing is buffered).
    fn process_input(&mut self, c: ConnId, direct: Option<&[u8]>) -> ReadOutcome {
        match self.conns.get(c as usize).map(|cn| cn.phase) {
            Some(Phase::Head) => self.process_head(c, direct),
            Some(Phase::Body) => self.process_body(c),
            Some(Phase::Closing) | None => ReadOutcome::Stop,
            Some(_) => ReadOutcome::Continue,
        }
    }

    fn process_head(&mut self, c: ConnId, direct: Option<&[u8]>) -> ReadOutcome {
        enum Step {
            More(Option<Vec<u8>>),
            Request(Request, Vec<u8>),
            Refuse(HttpError),
        }
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return ReadOutcome::Stop;
        };
        let step = {
            let buf: &[u8] = match (direct, conn.rbuf.as_ref()) {
                (Some(d), _) => d,
                (None, Some(rb)) => &rb.buf,
                (None, None) => return ReadOutcome::Continue,
            };
            if buf.is_empty() {
                return ReadOutcome::Continue;
            }
            match parse_head(buf, &self.limits) {
                Ok(Parsed::Partial) => Step::More(direct.map(<[u8]>::to_vec)),
                Ok(Parsed::Done(req)) => {
                    let rest = buf[req.head_len..].to_vec();
                    Step::Request(req, rest)
                }
                Err(e) => Step::Refuse(e),
            }
        };
        match step {
            Step::More(copy) => {
                if let Some(buf) = copy {
                    conn.rbuf = Some(Box::new(ReadBuf { buf, publish: None }));
                }
                ReadOutcome::Continue
            }
            Step::Request(req, rest) => {
                conn.rbuf = (!rest.is_empty()).then(|| {
                    Box::new(ReadBuf {
                        buf: rest,
                        publish: None,
                    })
                });
                if !self.handle_request(c, req) {
                    return ReadOutcome::Stop;
                }
                // A publish body or a pipelined request may follow.
                self.process_input(c, None)
            }
            Step::Refuse(e) => {
                self.fail(c, e);
                ReadOutcome::Stop
            }
        }
    }

    fn process_body(&mut self, c: ConnId) -> ReadOutcome {
        let Some(rb) = self
            .conns
            .get_mut(c as usize)
            .and_then(|cn| cn.rbuf.as_mut())
        else {
            return ReadOutcome::Continue;
        };
        let Some(want) = rb.publish.as_ref().map(|r| r.content_length) else {
            self.close(c);
            return ReadOutcome::Stop;
        };
        if rb.buf.len() < want {
            return ReadOutcome::Continue;
        }
        let mut body = std::mem::take(&mut rb.buf);
        rb.buf = body.split_off(want);
        let req = rb.publish.take().expect("checked above");
        self.finish_publish(c, *req, body);
        ReadOutcome::Continue
    }

    /// Act on a parsed request head. Returns false if the connection is done.
    fn handle_request(&mut self, c: ConnId, req: Request) -> bool {
        if self
            .conns
            .get(c as usize)
            .is_some_and(|cn| cn.has(flag::REJECT))
        {
            self.respond(c, response::unavailable(1), false);
            return false;
        }
        let keep = req.keep_alive;
        let head_only = req.head_only;
        let simple =
            |status, ct: &str, body: &[u8]| response::simple(status, ct, body, "", keep, head_only);
        match req.route {
            Route::Health => self.respond(c, simple(200, "text/plain", b"ok\n"), keep),
            Route::Metrics => {
                let backend = self.shared.backend.get().copied().unwrap_or("unknown");
                let text = crate::metrics::render(&self.shared.hub, &self.shared.stats, backend);
                let ct = "text/plain; version=0.0.4; charset=utf-8";
                self.respond(c, simple(200, ct, text.as_bytes()), keep)
            }
            Route::Demo if self.shared.config.demo => {
                let page = simple(200, "text/html; charset=utf-8", DEMO_PAGE.as_bytes());
                self.respond(c, page, keep)
            }
            Route::Demo => self.fail(c, HttpError::NotFound),
            Route::Preflight => {
                let cors = self.shared.cors.headers(req.origin.as_deref());
                self.respond(c, response::preflight(&cors), keep)
            }
            Route::Publish { .. } => return self.start_publish(c, req),
            Route::Subscribe { .. } => self.subscribe(c, req),
        }
        keep && self
            .conns
            .get(c as usize)
            .is_some_and(|cn| cn.phase != Phase::Closing)
    }

    /// A publish head: check who may publish and how big, then read the body.
    fn start_publish(&mut self, c: ConnId, req: Request) -> bool {
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return false;
        };
        let refusal: Option<(u16, &[u8])> = if !conn.has(flag::PUBLISHER) {
            Some((403, b"publishing is not allowed from this address\n"))
        } else if req.chunked_body {
            Some((411, b"send the event data with a Content-Length\n"))
        } else {
            None
        };
        if let Some((status, body)) = refusal {
            self.counters.http_errors += 1;
            self.respond(
                c,
                response::simple(status, "text/plain", body, "", false, false),
                false,
            );
            return false;
        }
        if req.content_length > self.limits.max_body {
            self.fail(c, HttpError::PayloadTooLarge);
            return false;
        }
        conn.phase = Phase::Body;
        conn.rbuf.get_or_insert_with(Box::default).publish = Some(Box::new(req));
        true
    }

    fn finish_publish(&mut self, c: ConnId, req: Request, body: Vec<u8>) {
        let Route::Publish {
            topic,
            event,
            id,
            retry,
        } = req.route
        else {
            return;
        };
        let Ok(data) = String::from_utf8(body) else {
            self.counters.http_errors += 1;
            let b = b"event data must be UTF-8\n";
            return self.respond(
                c,
                response::simple(400, "text/plain", b, "", false, false),
                false,
            );
        };
        let p = Publish {
            topic,
            data,
            event,
            id,
            retry,
        };
        let keep = req.keep_alive;
        let cors = self.shared.cors.headers(req.origin.as_deref());
        match self.shared.hub.try_publish(&p) {
            Ok(done) => {
                self.counters.http_publishes += 1;
                let body = format!("{}\n", serde_json::json!({ "id": &*done.id }));
                let r =
                    response::simple(200, "application/json", body.as_bytes(), &cors, keep, false);
                self.respond(c, r, keep);
            }
            Err(PublishFailure::Invalid(e)) => {
                self.counters.http_errors += 1;
                let body = format!("{}\n", serde_json::json!({ "error": e.to_string() }));
                let r =
                    response::simple(400, "application/json", body.as_bytes(), &cors, keep, false);
                self.respond(c, r, keep);
            }
            Err(PublishFailure::Busy) => {
                self.counters.http_errors += 1;
                self.respond(c, response::unavailable(1), false);
            }
        }
    }

    /// Answer with an HTTP error and close.
    fn fail(&mut self, c: ConnId, e: HttpError) {
        self.counters.http_errors += 1;
        tracing::trace!(
            worker = self.id,
            conn = c,
            status = e.status(),
            "request refused"
        );
        self.respond(c, response::error(&e), false);
    }

    /// Queue a one-off response; then close, or wait for the next request if `keep`.
    fn respond(&mut self, c: ConnId, bytes: Vec<u8>, keep: bool) {
        let write_ticks = self.ticks(self.shared.config.write_timeout);
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return;
        };
        conn.phase = Phase::Respond;
        if keep {
            conn.flags |= flag::KEEP_ALIVE;
        } else {
            conn.flags &= !flag::KEEP_ALIVE;
        }
        conn.pre.push_back(Bytes::from(bytes));
        self.wheel.insert(c, self.now_tick + write_ticks);
        self.mark_ready(c);
    }

    fn mark_ready(&mut self, c: ConnId) {
        if let Some(conn) = self.conns.get_mut(c as usize) {
            if conn.flags & (flag::READY | flag::WRITING) == 0 && conn.phase != Phase::Closing {
                conn.flags |= flag::READY;
                self.ready.push(c);
            }
        }
    }

    // ---- subscribe ----------------------------------------------------------------

    fn subscribe(&mut self, c: ConnId, req: Request) {
        let Route::Subscribe {
            topics,
            last_event_id,
        } = req.route
        else {
            return;
        };
        let cors = self.shared.cors.headers(req.origin.as_deref());
        let attach = self
            .shared
            .hub
            .attach(&topics, last_event_id.as_deref(), self.seen_seq);
        if attach.closed {
            return self.respond(c, response::no_content(&cors), false);
        }
        let http10 = req.http10;
        let head = response::stream_head(http10, &cors, self.shared.config.retry);
        let subs: Vec<Sub> = topics
            .iter()
            .map(|name| {
                let t = self.local_topic(name);
                Sub {
                    topic: t,
                    pos: 0,
                    cursor: self.topics[t as usize].end(),
                }
            })
            .collect();
        let ka = self.ticks(self.shared.config.keepalive);
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return;
        };
        conn.phase = Phase::Stream;
        if http10 {
            conn.flags |= flag::HTTP10;
        }
        conn.rbuf = None;
        conn.pre.push_back(Bytes::from(head));
        let piece = |f: &crate::sse::encode::Frame| {
            if http10 {
                let start = f.body_start as usize;
                f.bytes.slice(start..f.bytes.len() - 2)
            } else {
                f.bytes.clone()
            }
        };
        if let Some(gap) = &attach.gap {
            conn.pre.push_back(piece(gap));
        }
        for ev in &attach.replay {
            conn.pre.push_back(piece(&ev.frame));
        }
        conn.subs = if subs.len() == 1 {
            Subs::One(subs[0])
        } else {
            Subs::Many(subs.into())
        };
        for (slot, s) in conn.subs.as_mut_slice().iter_mut().enumerate() {
            let t = &mut self.topics[s.topic as usize];
            s.pos = t.subs.len() as u32;
            t.subs.push(SubRef {
                conn: c,
                slot: slot as u32,
            });
        }
        self.counters.streams_started += 1;
        self.counters.streams_open += 1;
        self.wheel.insert(c, self.now_tick + ka);
        self.mark_ready(c);
    }

    fn local_topic(&mut self, name: &str) -> u32 {
        if let Some(&t) = self.topic_ids.get(name) {
            return t;
        }
        let name: Arc<str> = name.into();
        let t = self.topics.insert(LocalTopic {
            name: name.clone(),
            subs: Vec::new(),
            log: VecDeque::new(),
            base: 0,
            base_bytes: 0,
        }) as u32;
        self.topic_ids.insert(name, t);
        t
    }

    /// Remove connection `c`'s subscriptions (its cursors no longer pin log entries).
    fn detach(&mut self, c: ConnId) {
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return;
        };
        let subs = std::mem::replace(&mut conn.subs, Subs::None);
        if subs.as_slice().is_empty() {
            return;
        }
        self.counters.streams_open = self.counters.streams_open.saturating_sub(1);
        for s in subs.as_slice() {
            let t = &mut self.topics[s.topic as usize];
            t.subs.swap_remove(s.pos as usize);
            if let Some(moved) = t.subs.get(s.pos as usize).copied() {
                if let Some(mc) = self.conns.get_mut(moved.conn as usize) {
                    mc.subs.as_mut_slice()[moved.slot as usize].pos = s.pos;
                }
            }
            if t.subs.is_empty() {
                let t = self.topics.remove(s.topic as usize);
                self.counters.fanout_backlog_bytes -= t.end_bytes() - t.base_bytes;
                self.topic_ids.remove(&t.name);
            }
        }
    }

    // ---- fan-out ------------------------------------------------------------------

    /// Take everything the hub queued for this worker.
    pub fn drain_inbox(&mut self) {
        let shared = self.shared.clone();
        let inbox = shared.hub.inbox(self.id);
        inbox.unpark();
        while let Some(msg) = inbox.pop() {
            match msg {
                BusMsg::Event(ev) => self.handle_event(ev),
                BusMsg::Close(name) => self.handle_topic_close(&name),
            }
        }
    }

    /// Block-ready check: returns false if the inbox got something meanwhile.
    pub fn park(&self) -> bool {
        self.shared.hub.inbox(self.id).park()
    }

    fn handle_event(&mut self, ev: Arc<Event>) {
        self.seen_seq = ev.seq;
        self.counters.events_received += 1;
        let Some(&t) = self.topic_ids.get(&ev.topic) else {
            return;
        };
        let max_backlog = self.shared.config.max_backlog as u64;
        let topic = &mut self.topics[t as usize];
        self.counters.fanout_backlog_bytes += ev.wire_len() as u64;
        let end = topic.end_bytes() + ev.wire_len() as u64;
        topic.log.push_back(LogEntry { ev, end });
        let mut min_cursor = topic.end();
        for sref in &topic.subs {
            let Some(conn) = self.conns.get_mut(sref.conn as usize) else {
                continue;
            };
            let sub = conn.subs.as_slice()[sref.slot as usize];
            min_cursor = min_cursor.min(sub.cursor);
            if conn.phase == Phase::Closing {
                continue;
            }
            if end - topic.bytes_before(sub.cursor) > max_backlog {
                // Too slow: it resumes with Last-Event-ID after reconnecting.
                if conn.phase != Phase::Closing {
                    conn.phase = Phase::Closing;
                    self.closing.push(sref.conn);
                    self.counters.slow_consumer_disconnects += 1;
                }
                continue;
            }
            if conn.flags & (flag::READY | flag::WRITING) == 0 {
                conn.flags |= flag::READY;
                self.ready.push(sref.conn);
            }
        }
        let before = topic.base_bytes;
        topic.trim(min_cursor);
        self.counters.fanout_backlog_bytes -= topic.base_bytes - before;
    }

    fn handle_topic_close(&mut self, name: &str) {
        let Some(&t) = self.topic_ids.get(name) else {
            return;
        };
        let conns: Vec<ConnId> = self.topics[t as usize]
            .subs
            .iter()
            .map(|s| s.conn)
            .collect();
        for c in conns {
            self.counters.topics_closed_streams += 1;
            self.start_drain(c, None, 0);
        }
    }

    // ---- shutdown -----------------------------------------------------------------

    /// Stop: every stream gets a `retry:` hint and its last chunk, spread over the drain
    /// window so clients do not all reconnect in the same millisecond.
    pub fn begin_drain(&mut self) {
        if self.draining {
            return;
        }
        self.draining = true;
        let window = self.ticks(self.shared.config.drain_window);
        let base_retry = self.shared.config.retry.unwrap_or(1000);
        let ids = self.iter_ids();
        let n = ids.len().max(1) as u64;
        for (i, c) in ids.into_iter().enumerate() {
            let phase = self.conns[c as usize].phase;
            match phase {
                Phase::Stream => {
                    // Jitter the reconnect delay as well as the close time.
                    let jitter = (c as u64).wrapping_mul(2654435761) % 1000;
                    let retry = base_retry + jitter as u32;
                    self.start_drain(c, Some(retry), i as u64 * window / n);
                }
                Phase::Head | Phase::Body => self.close(c),
                Phase::Respond => {
                    if let Some(conn) = self.conns.get_mut(c as usize) {
                        conn.flags &= !flag::KEEP_ALIVE;
                    }
                }
                Phase::Drain | Phase::Closing => {}
            }
        }
    }

    fn start_drain(&mut self, c: ConnId, retry: Option<u32>, delay_ticks: u64) {
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return;
        };
        if !matches!(conn.phase, Phase::Stream | Phase::Drain) {
            return;
        }
        conn.phase = Phase::Drain;
        if let Some(r) = retry {
            let f = encode_retry(r);
            let piece = if conn.has(flag::HTTP10) {
                Bytes::copy_from_slice(f.body())
            } else {
                f.bytes
            };
            conn.pre.push_back(piece);
        }
        self.wheel.insert(c, self.now_tick + delay_ticks);
        self.mark_ready(c);
    }

    /// A draining stream whose time has come: once flushed, end it.
    fn finish_drain(&mut self, c: ConnId) {
        let idle = !self.has_pending(c)
            && self
                .conns
                .get(c as usize)
                .is_some_and(|cn| !cn.has(flag::WRITING));
        if !idle {
            self.wheel.insert(c, self.now_tick + 1);
            return;
        }
        self.detach(c);
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return;
        };
        conn.flags |= flag::FINAL;
        if conn.has(flag::HTTP10) {
            // Close-delimited body: closing is the end.
            self.close(c);
        } else {
            conn.pre.push_back(Bytes::from_static(LAST_CHUNK));
            let stall = self.ticks(self.shared.config.write_timeout);
            self.wheel.insert(c, self.now_tick + stall);
            self.mark_ready(c);
        }
    }

    // ---- timers -------------------------------------------------------------------

    pub fn handle_tick(&mut self) {
        let mut expired = std::mem::take(&mut self.expired);
        self.wheel.advance(self.now_tick, &mut expired);
        for c in expired.drain(..) {
            self.handle_timer(c);
        }
        self.expired = expired;
    }

    fn handle_timer(&mut self, c: ConnId) {
        let ka = self.ticks(self.shared.config.keepalive);
        let stall = self.ticks(self.shared.config.write_timeout);
        let now = self.now_tick;
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return;
        };
        let stalled =
            conn.has(flag::WRITING) && (now as u32).wrapping_sub(conn.progress) as u64 >= stall;
        match conn.phase {
            Phase::Head | Phase::Body => {
                self.counters.head_timeouts += 1;
                self.close(c);
            }
            // A response, or a drained stream's last chunk, that is not getting out.
            Phase::Respond => self.check_final_write(c, stalled, now + stall),
            Phase::Drain if conn.has(flag::FINAL) => {
                self.check_final_write(c, stalled, now + stall)
            }
            Phase::Drain => self.finish_drain(c),
            Phase::Stream if stalled => {
                self.counters.slow_consumer_disconnects += 1;
                self.close(c);
            }
            Phase::Stream => {
                let writing = conn.has(flag::WRITING);
                if !conn.has(flag::WROTE) && !writing && conn.pre.is_empty() {
                    let ka_bytes = if conn.has(flag::HTTP10) {
                        KEEPALIVE_BODY
                    } else {
                        KEEPALIVE_CHUNKED
                    };
                    conn.pre.push_back(Bytes::from_static(ka_bytes));
                    self.counters.keepalives += 1;
                    self.mark_ready(c);
                }
                let conn = &mut self.conns[c as usize];
                conn.flags &= !flag::WROTE;
                let next = if writing { ka.min(stall) } else { ka };
                self.wheel.insert(c, now + next);
            }
            Phase::Closing => {}
        }
    }

    fn check_final_write(&mut self, c: ConnId, stalled: bool, next: u64) {
        let Some(conn) = self.conns.get(c as usize) else {
            return;
        };
        if stalled || (!conn.has(flag::WRITING) && conn.pre.is_empty()) {
            self.close(c);
        } else {
            self.wheel.insert(c, next);
        }
    }

    // ---- writes -------------------------------------------------------------------

    /// Connections that need a write, in the order they became ready.
    pub fn take_ready(&mut self, out: &mut Vec<ConnId>) {
        out.clear();
        std::mem::swap(out, &mut self.ready);
    }

    /// Connections the backend must close (then call [`Core::release`]).
    pub fn take_closing(&mut self, out: &mut Vec<ConnId>) {
        out.clear();
        std::mem::swap(out, &mut self.closing);
    }

    /// Start a write on `c` if it has anything pending and none in flight. Returns false
    /// when there is nothing to write (the connection may then move on or close).
    pub fn begin_write(&mut self, c: ConnId) -> bool {
        let now = self.now_tick as u32;
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return false;
        };
        conn.flags &= !flag::READY;
        if conn.phase == Phase::Closing || conn.has(flag::WRITING) {
            return false;
        }
        if !self.has_pending(c) {
            self.after_idle(c);
            return false;
        }
        let conn = &mut self.conns[c as usize];
        conn.flags |= flag::WRITING;
        conn.progress = now;
        true
    }

    /// Fill `iov` with the frames pending for `c`, up to the per-write caps, after
    /// [`Core::begin_write`]. Returns (slices used, bytes).
    pub fn fill<'a>(&'a self, c: ConnId, iov: &mut [IoSlice<'a>; MAX_IOVECS]) -> (usize, usize) {
        let Some(conn) = self.conns.get(c as usize) else {
            return (0, 0);
        };
        let mut n = 0usize;
        let mut total = 0usize;
        let mut skip = conn.off as usize;
        let mut push = |s: &'a [u8]| -> bool {
            let s = &s[skip.min(s.len())..];
            skip = 0;
            iov[n] = IoSlice::new(s);
            n += 1;
            total += s.len();
            n < MAX_IOVECS && total < MAX_WRITE_BYTES
        };
        let mut room = true;
        for f in &conn.pre {
            room = push(f);
            if !room {
                break;
            }
        }
        if room {
            let http10 = conn.has(flag::HTTP10);
            walk_live(conn.subs.as_slice(), &self.topics, |_, ev| {
                push(frame_of(ev, http10))
            });
        }
        (n, total)
    }

    /// Something is queued for the backend (writes or closes): do not block.
    pub fn has_work(&self) -> bool {
        !self.ready.is_empty() || !self.closing.is_empty()
    }

    /// The socket of `c` has room again after a write would have blocked (epoll).
    pub fn handle_writable(&mut self, c: ConnId) {
        if let Some(conn) = self.conns.get_mut(c as usize) {
            if conn.has(flag::WRITING) {
                conn.flags &= !flag::WRITING;
                self.after_write(c);
            }
        }
    }

    /// Whether anything is pending for `c`, cheaply (no walk over the frames).
    fn has_pending(&self, c: ConnId) -> bool {
        self.conns.get(c as usize).is_some_and(|conn| {
            !conn.pre.is_empty()
                || conn
                    .subs
                    .as_slice()
                    .iter()
                    .any(|s| s.cursor < self.topics[s.topic as usize].end())
        })
    }

    /// `n` bytes of the write started by `begin_write` reached the socket. `done` says
    /// the write operation is over (uring: its completion; epoll: the `writev` call).
    pub fn handle_written(&mut self, c: ConnId, n: usize, done: bool) {
        let now = self.now_tick as u32;
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return;
        };
        if done {
            conn.flags &= !flag::WRITING;
        }
        if n > 0 {
            self.consume(c, n, now);
        }
        if done {
            self.after_write(c);
        }
    }

    /// Advance `c` past `n` written bytes: pre frames first, then live frames.
    fn consume(&mut self, c: ConnId, n: usize, now: u32) {
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return;
        };
        conn.progress = now;
        conn.flags |= flag::WROTE;
        self.counters.bytes_written += n as u64;
        let mut left = n + conn.off as usize;
        conn.off = 0;
        while let Some(f) = conn.pre.front() {
            if left < f.len() {
                conn.off = left as u32;
                left = 0;
                break;
            }
            left -= f.len();
            conn.pre.pop_front();
        }
        if conn.pre.is_empty() && conn.pre.capacity() > 0 {
            // An idle subscriber keeps no buffer: give the deque's allocation back.
            conn.pre = VecDeque::new();
        }
        if left > 0 {
            let http10 = conn.has(flag::HTTP10);
            let (delivered, off) =
                consume_live(conn.subs.as_mut_slice(), &self.topics, left, http10);
            conn.off = off;
            self.counters.events_delivered += delivered;
        }
    }

    /// A write operation finished: start the next one, or move on from a response.
    fn after_write(&mut self, c: ConnId) {
        if self.has_pending(c) {
            self.mark_ready(c);
        } else {
            self.after_idle(c);
        }
    }

    /// Nothing left to write for `c`.
    fn after_idle(&mut self, c: ConnId) {
        let head_ticks = self.ticks(self.shared.config.head_timeout);
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return;
        };
        match conn.phase {
            Phase::Respond if conn.has(flag::KEEP_ALIVE) && !self.draining => {
                conn.phase = Phase::Head;
                conn.flags &= !flag::KEEP_ALIVE;
                self.wheel.insert(c, self.now_tick + head_ticks);
                if conn.rbuf.as_ref().is_some_and(|rb| !rb.buf.is_empty()) {
                    self.process_input(c, None);
                }
            }
            Phase::Respond => self.close(c),
            Phase::Drain if conn.has(flag::FINAL) => self.close(c),
            _ => {}
        }
    }

    /// A write failed (peer gone): close.
    pub fn handle_write_error(&mut self, c: ConnId) {
        if let Some(conn) = self.conns.get_mut(c as usize) {
            conn.flags &= !flag::WRITING;
        }
        self.close(c);
    }

    // ---- close --------------------------------------------------------------------

    /// Ask the backend to close `c`.
    pub fn close(&mut self, c: ConnId) {
        if let Some(conn) = self.conns.get_mut(c as usize) {
            if conn.phase != Phase::Closing {
                conn.phase = Phase::Closing;
                self.closing.push(c);
            }
        }
    }

    /// The backend has closed `c` and no operation on it is in flight: forget it.
    pub fn release(&mut self, c: ConnId) -> Option<H> {
        self.conns.get(c as usize)?;
        self.detach(c);
        self.wheel.remove(c);
        let conn = self.conns.remove(c as usize);
        self.shared.open.fetch_sub(1, Ordering::Relaxed);
        self.counters.connections_closed += 1;
        Some(conn.handle)
    }
}

/// Visit the live frames pending for a set of subscriptions in publish (`seq`) order,
/// calling `f(slot, event)` until it returns false. One subscription walks its log
/// directly; several are merged by sequence.
fn walk_live<'a>(
    subs: &[Sub],
    topics: &'a Slab<LocalTopic>,
    mut f: impl FnMut(usize, &'a Event) -> bool,
) {
    match subs {
        [] => {}
        [s] => {
            let t = &topics[s.topic as usize];
            let mut i = s.cursor;
            while let Some(ev) = t.entry(i) {
                if !f(0, ev) {
                    return;
                }
                i += 1;
            }
        }
        many => {
            // Merge by sequence over copies of the cursors (no allocation up to 64 topics).
            let mut small = [0u64; 64];
            let mut large = Vec::new();
            let cur: &mut [u64] = if many.len() <= small.len() {
                &mut small[..many.len()]
            } else {
                large.resize(many.len(), 0);
                &mut large
            };
            for (k, s) in many.iter().enumerate() {
                cur[k] = s.cursor;
            }
            while let Some(k) = next_in_order(many, cur, topics) {
                let ev = topics[many[k].topic as usize]
                    .entry(cur[k])
                    .expect("checked");
                cur[k] += 1;
                if !f(k, ev) {
                    return;
                }
            }
        }
    }
}

/// The subscription whose next pending event has the lowest sequence.
fn next_in_order(subs: &[Sub], cur: &[u64], topics: &Slab<LocalTopic>) -> Option<usize> {
    let mut best: Option<(usize, u64)> = None;
    for (k, s) in subs.iter().enumerate() {
        if let Some(ev) = topics[s.topic as usize].entry(cur[k]) {
            if best.is_none_or(|(_, seq)| ev.seq < seq) {
                best = Some((k, ev.seq));
            }
        }
    }
    best.map(|(k, _)| k)
}

/// Advance the cursors of `subs` over `left` written bytes of live frames, in the same
/// order [`walk_live`] produced them. Returns (events completed, bytes into the next one).
fn consume_live(
    subs: &mut [Sub],
    topics: &Slab<LocalTopic>,
    mut left: usize,
    http10: bool,
) -> (u64, u32) {
    let mut delivered = 0;
    loop {
        let k = match subs.len() {
            0 => return (delivered, 0),
            1 => 0,
            _ => {
                let mut small = [0u64; 64];
                let mut large = Vec::new();
                let cur: &mut [u64] = if subs.len() <= small.len() {
                    &mut small[..subs.len()]
                } else {
                    large.resize(subs.len(), 0);
                    &mut large
                };
                for (k, s) in subs.iter().enumerate() {
                    cur[k] = s.cursor;
                }
                match next_in_order(subs, cur, topics) {
                    Some(k) => k,
                    None => return (delivered, 0),
                }
            }
        };
        let Some(ev) = topics[subs[k].topic as usize].entry(subs[k].cursor) else {
            return (delivered, 0);
        };
        let len = frame_of(ev, http10).len();
        if left < len {
            return (delivered, left as u32);
        }
        left -= len;
        subs[k].cursor += 1;
        delivered += 1;
        if left == 0 {
            return (delivered, 0);
        }
    }
}
