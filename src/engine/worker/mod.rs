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
use crate::fanout::bus::Hub;
use crate::fanout::topic::Event;
use crate::http::request::{Limits, Request};
use crate::http::response::Cors;
use crate::metrics::{Counters, WorkerStats};
use crate::sse::encode::{encode_retry, KEEPALIVE_BODY, KEEPALIVE_CHUNKED};
use crate::timer::wheel::Wheel;

mod fanout;
mod http;

use fanout::{consume_live, walk_live, LocalTopic};

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
const DEMO_PAGE: &str = include_str!("../../demo/index.html");
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
                f.body_bytes()
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
                // Idle for its due time (the interval less this connection's jitter):
                // send the shared keep-alive. Silence never exceeds the interval, and
                // streams that went quiet together after a broadcast spread out again.
                let due = ka - keepalive_jitter(c, ka);
                let idle = (now as u32).wrapping_sub(conn.progress) as u64;
                let writing = conn.has(flag::WRITING);
                let next = if writing {
                    due.min(stall)
                } else if idle >= due && conn.pre.is_empty() {
                    let ka_bytes = if conn.has(flag::HTTP10) {
                        KEEPALIVE_BODY
                    } else {
                        KEEPALIVE_CHUNKED
                    };
                    conn.pre.push_back(Bytes::from_static(ka_bytes));
                    self.counters.keepalives += 1;
                    self.mark_ready(c);
                    due
                } else {
                    due.saturating_sub(idle).max(1)
                };
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

/// Up to an eighth of the keep-alive interval, fixed per connection id: enough to spread
/// streams that went idle together, at the cost of at most 1/8 more keep-alives.
fn keepalive_jitter(c: ConnId, ka: u64) -> u64 {
    ((c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) % (ka / 8 + 1)
}
