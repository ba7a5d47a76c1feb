//! The sans-IO worker core, shared by both backends: the connection slab, HTTP state per
//! connection, the worker-local topic logs and subscriber cursors, the timer wheel, the
//! drain and accept policies and the counters. It never touches a socket or the clock: a
//! backend feeds it accepts, bytes, write completions and `now`, and asks it which
//! connections need a write (`take_ready` + `begin_write` + `fill`) or a close
//! (`take_closing`). `harness` drives it by hand in the unit tests.
//!
//! Fan-out without per-connection queues: each local topic keeps a log of the events this
//! worker received for it, and a subscriber is just a cursor into that log. Publishing an
//! event appends one `Arc<Event>` to the log and walks the dense subscriber list marking
//! connections ready; nothing is allocated, copied or locked per subscriber.
//!
//! The invariant that keeps streams whole: a connection's output is `pre` frames, then its
//! live frames, and `off` counts the bytes of the first of them already written. A frame is
//! added to `pre` only when nothing is pending or in flight (the response head, a gap signal
//! and replay at subscribe, a keep-alive on an idle stream, the drain trailer once flushed),
//! so no frame is ever queued in front of one that is partly written.

use std::collections::VecDeque;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use slab::Slab;

use crate::config::Config;
use crate::fanout::bus::{Hub, ReplayCursor};
use crate::fanout::table::NameTable;
use crate::fanout::topic::Event;
use crate::http::request::{Limits, Request};
use crate::http::response::Cors;
use crate::metrics::{Counters, WorkerStats};
use crate::timer::wheel::Wheel;

mod auth;
mod fanout;
mod h2;
#[cfg(test)]
mod harness;
mod http;
#[cfg(test)]
mod ktls_tests;
#[cfg(test)]
mod tests;
mod timers;
mod tls;
mod write;

use fanout::LocalTopic;
pub use write::MAX_IOVECS;

pub type ConnId = u32;

/// One timer tick.
pub const TICK: Duration = Duration::from_millis(10);
/// Wheel size: 4096 ticks of 10 ms = 41 s horizon; longer deadlines wait a lap.
const WHEEL_SLOTS: usize = 4096;
/// The demo page served at `GET /`.
const DEMO_PAGE: &str = include_str!("../demo/index.html");
/// How long an accept stays paused after the kernel ran out of descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// After the drain window, how long a worker waits for the closes it issued to complete
/// before it exits anyway.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// State shared by all workers (read-mostly; atomics only per connection, never per delivery).
pub struct Shared {
    pub config: Config,
    pub hub: Hub,
    pub stats: Vec<Arc<WorkerStats>>,
    pub cors: Cors,
    /// Connections open in the whole process (for `--max-connections`).
    pub open: AtomicUsize,
    /// The connection limit in force: `--max-connections`, lowered by a backend that can
    /// hold fewer (epoll: the open-files limit less a reserve).
    pub max_connections: AtomicUsize,
    /// Shutdown requested.
    pub stop: AtomicBool,
    /// Shutdown's first step: the worker hosting ingest stops it (see `Server::shutdown`).
    pub ingest_stop: AtomicBool,
    /// Backend the workers run ("uring"/"epoll"), for /metrics.
    pub backend: OnceLock<&'static str>,
    /// Certificates and rustls configuration, when `--tls-listen` is set.
    pub tls: Option<crate::tls::Tls>,
    /// Token verification, when a key source is configured.
    pub auth: Option<Arc<crate::auth::Auth>>,
    /// The access log's writer, with `--access-log`.
    pub access_log: Option<Arc<crate::access_log::AccessLog>>,
    /// The Redis link, with `--cluster`.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl Shared {
    pub fn new(config: Config) -> Arc<Shared> {
        Shared::with_tls(config, None)
    }

    /// Shared state with TLS set up (see [`crate::tls::Tls::new`]).
    pub fn with_tls(config: Config, tls: Option<crate::tls::Tls>) -> Arc<Shared> {
        let limits = crate::fanout::topic::Limits {
            max_events: config.history_events,
            max_bytes: config.history_bytes,
            max_age: config.history_age,
        };
        Arc::new(Shared {
            hub: Hub::new(config.workers, limits).with_max_topics(config.history_topics),
            stats: (0..config.workers).map(|_| Arc::default()).collect(),
            cors: Cors::new(&config.cors_origins, config.cors_credentials),
            open: AtomicUsize::new(0),
            max_connections: AtomicUsize::new(config.max_connections),
            stop: AtomicBool::new(false),
            ingest_stop: AtomicBool::new(false),
            backend: OnceLock::new(),
            tls,
            auth: None,
            access_log: None,
            cluster: None,
            config,
        })
    }

    /// Shared state with everything [`Shared::with_tls`] sets up, plus authentication and
    /// the access log.
    pub fn with_all(
        config: Config,
        tls: Option<crate::tls::Tls>,
        auth: Option<Arc<crate::auth::Auth>>,
        access_log: Option<Arc<crate::access_log::AccessLog>>,
        cluster: Option<Arc<crate::cluster::Cluster>>,
    ) -> Arc<Shared> {
        let mut s = Shared::with_tls(config, tls);
        let m = Arc::get_mut(&mut s).expect("just made");
        m.auth = auth;
        m.access_log = access_log;
        if cluster.is_some() {
            m.hub.set_cluster();
        }
        m.cluster = cluster;
        s
    }

    /// Lower the connection limit to what a backend can hold (never raise it).
    pub fn cap_connections(&self, most: usize) {
        self.max_connections.fetch_min(most, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the request head.
    Head,
    /// Reading a publish body.
    Body,
    /// A publish handed to the cluster's publisher thread, waiting for Redis's answer
    /// (`--cluster`).
    Await,
    /// Writing a one-off response.
    Respond,
    /// Streaming events.
    Stream,
    /// Shutdown or topic end: flush, then send the trailer and close.
    Drain,
    /// Handed to the backend to close; ignored until `release`.
    Closing,
    /// An HTTP/2 connection: its requests are its streams (see `h2`).
    H2,
}

mod flag {
    pub const HTTP10: u16 = 1;
    /// In `Core::ready`.
    pub const READY: u16 = 2;
    /// A write is in flight (uring) or blocked on a full socket buffer (epoll).
    pub const WRITING: u16 = 4;
    /// The peer shut down its sending side: answer what it sent, then close.
    pub const PEER_EOF: u16 = 8;
    /// Keep the connection for another request after this response.
    pub const KEEP_ALIVE: u16 = 16;
    /// May POST /publish (peer address in `publish-allow`).
    pub const PUBLISHER: u16 = 32;
    /// The drain trailer is queued: close once it is written.
    pub const FINAL: u16 = 64;
    /// Over a limit: answer 503 once the request head is in (closing before reading it
    /// could reset the connection and lose the answer).
    pub const REJECT: u16 = 128;
    /// A draining stream's turn to end has come: send the trailer once flushed.
    pub const DRAIN_DUE: u16 = 256;
    /// The drain is a shutdown (not a topic close): the trailer carries a `retry:` hint.
    pub const RETRY_HINT: u16 = 512;
    /// Accepted on the TLS listener: its session is in `Core::tls`.
    pub const TLS: u16 = 1024;
    /// TLS failed (an alert or the plain-HTTP answer is queued): close once written.
    pub const TLS_CLOSE: u16 = 2048;
    /// An HTTP/2 stream: a child of an `H2` connection, which writes for it.
    pub const H2S: u16 = 4096;
    /// An HTTP/2 connection: its state is in `Core::h2`.
    pub const H2: u16 = 8192;
    /// TLS whose sending the kernel does (kTLS `TLS_TX`): writes go out as plaintext.
    pub const KTX: u16 = 16384;
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

/// A connection's `pre` frames: boxed, made by the first frame and dropped with the last,
/// so an idle stream holds one pointer (a deque inline would be 32 bytes).
#[derive(Debug, Default)]
// Boxed on purpose: 8 bytes in every connection record instead of 32.
#[allow(clippy::box_collection)]
pub(crate) struct Pre(Option<Box<VecDeque<Bytes>>>);

impl Pre {
    fn push_back(&mut self, f: Bytes) {
        self.0.get_or_insert_with(Box::default).push_back(f);
    }

    /// INVARIANT: the box exists only while it holds a frame.
    fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    fn front(&self) -> Option<&Bytes> {
        self.0.as_ref()?.front()
    }

    fn pop_front(&mut self) -> Option<Bytes> {
        let q = self.0.as_mut()?;
        let f = q.pop_front();
        if q.is_empty() {
            self.0 = None;
        }
        f
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Bytes> {
        self.0.iter().flat_map(|q| q.iter())
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
    flags: u16,
    /// Bytes of the first pending frame already written.
    off: u32,
    /// Tick (low 32 bits) of the last write progress.
    progress: u32,
    subs: Subs,
    /// Per-connection frames written before live events: response head, gap signal,
    /// replay, keep-alive, trailer. Only appended to at a frame boundary (see the module
    /// comment).
    pre: Pre,
    rbuf: Option<Box<ReadBuf>>,
    /// A resume still being replayed: batches go into `pre` as it drains, and live frames
    /// wait until it is done.
    replay: Option<Box<ReplayCursor>>,
}

impl<H> Conn<H> {
    fn has(&self, f: u16) -> bool {
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

/// A per-connection frame as this connection's framing wants it: HTTP/1.0 streams get the
/// same bytes without the chunk framing (a sub-slice, no copy).
fn piece(f: &crate::sse::encode::Frame, http10: bool) -> Bytes {
    if http10 {
        f.body_bytes()
    } else {
        f.bytes.clone()
    }
}

/// What the backend must do after `handle_read`.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    Continue,
    /// Stop reading (publish body larger than allowed, connection closing).
    Stop,
}

/// What a backend does after an accept failed.
#[derive(Debug, PartialEq, Eq)]
pub enum AcceptAction {
    /// Transient (the peer left before the accept): accept again now.
    Retry,
    /// Out of descriptors or memory: accepts are paused for [`ACCEPT_BACKOFF`]; ask
    /// [`Core::accept_paused`] before arming again.
    Pause,
    /// The listener itself is broken.
    Fatal,
}

pub struct Core<H> {
    pub id: usize,
    shared: Arc<Shared>,
    conns: Slab<Conn<H>>,
    topics: NameTable<LocalTopic>,
    wheel: Wheel,
    ready: Vec<ConnId>,
    closing: Vec<ConnId>,
    expired: Vec<u32>,
    pub counters: Counters,
    start: Instant,
    now_tick: u64,
    /// Shutdown: the tick by which every stream must be done, and whether the ones that
    /// were not have been cut.
    drain_deadline: Option<u64>,
    drain_cut: bool,
    /// Accepts are paused until this tick (descriptors or memory ran out).
    accept_paused_until: Option<u64>,
    /// Per-worker share of `--accept-rate`: tokens and the tick they were last refilled.
    accept_tokens: f64,
    accept_refill_tick: u64,
    limits: Limits,
    next_gen: u32,
    /// TLS sessions by connection id (empty when TLS is off, so plain connections pay
    /// nothing), the write buffers they share, and handshakes in progress.
    tls: Vec<Option<Box<tls::TlsConn>>>,
    tls_bufs: tls::TlsBufs,
    tls_handshaking: usize,
    /// TLS connections whose sending keys the backend is to install in the kernel.
    ktls_installs: Vec<ConnId>,
    /// Bytes of buffers TLS connections hold (the pool's own are not counted).
    tls_held: usize,
    /// Authentication and access-log state by connection id (empty when neither is on).
    info: Vec<Option<Box<auth::ConnInfo>>>,
    /// Requests waiting for a JWKS refetch.
    parked: Vec<ConnId>,
    /// This worker's token streams by subject and by token id (for revocation).
    by_sub: std::collections::HashMap<Arc<str>, Vec<ConnId>>,
    by_jti: std::collections::HashMap<Arc<str>, Vec<ConnId>>,
    /// Access-log lines of this loop turn.
    log: crate::access_log::LineBuf,
    /// HTTP/2 connection and stream state by connection id (empty until the first h2
    /// connection).
    h2: Vec<Option<h2::H2Side>>,
    /// The h2 streams' records, side by side: one small allocation per stream scattered
    /// among a burst's short-lived ones would pin their freed memory for good.
    h2_streams: Slab<h2::H2Stream>,
    /// Connections and h2 streams opened or closed when the heap was last trimmed.
    churn_at_trim: u64,
    /// The last HTTP/1.1 response head turned into an HPACK block, and the block.
    #[allow(clippy::type_complexity)]
    h2_head: Option<Box<(Vec<u8>, Bytes)>>,
}

impl<H: Default> Core<H> {
    /// A core whose clock starts at `now`.
    pub fn new(id: usize, shared: Arc<Shared>, now: Instant) -> Core<H> {
        let cfg = &shared.config;
        let limits = Limits {
            max_head: cfg.max_head,
            max_topics: cfg.max_topics,
            max_body: cfg.max_event,
            token_cookie: shared.auth.as_ref().map(|_| cfg.auth.cookie.clone()),
            token_param: shared.auth.as_ref().and(cfg.auth.query_param.clone()),
            keep_path: shared.access_log.is_some(),
        };
        Core {
            id,
            conns: Slab::with_capacity(1024),
            topics: NameTable::default(),
            wheel: Wheel::new(WHEEL_SLOTS, 1024, 0),
            ready: Vec::new(),
            closing: Vec::new(),
            expired: Vec::new(),
            counters: Counters::default(),
            start: now,
            now_tick: 0,
            drain_deadline: None,
            drain_cut: false,
            accept_paused_until: None,
            // The bucket starts full: one second's worth of this worker's share.
            accept_tokens: (cfg.accept_rate as f64 / cfg.workers as f64).max(1.0),
            accept_refill_tick: 0,
            limits,
            next_gen: 1,
            tls: Vec::new(),
            tls_bufs: tls::TlsBufs::default(),
            tls_handshaking: 0,
            ktls_installs: Vec::new(),
            tls_held: 0,
            info: Vec::new(),
            parked: Vec::new(),
            by_sub: std::collections::HashMap::new(),
            by_jti: std::collections::HashMap::new(),
            log: Default::default(),
            h2: Vec::new(),
            h2_streams: Slab::new(),
            churn_at_trim: 0,
            h2_head: None,
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
        self.drain_deadline.is_some()
    }

    pub fn iter_ids(&self) -> Vec<ConnId> {
        self.conns.iter().map(|(k, _)| k as ConnId).collect()
    }

    fn ticks(&self, d: Duration) -> u64 {
        (d.as_millis() / TICK.as_millis()).max(1) as u64
    }

    /// Set the worker's clock; call once per loop turn, before anything else.
    pub fn set_now(&mut self, now: Instant) {
        let t = (now.saturating_duration_since(self.start).as_millis() / TICK.as_millis()) as u64;
        self.now_tick = self.now_tick.max(t);
    }

    /// How long the backend may block: until the next timer, capped.
    pub fn poll_timeout(&self) -> Duration {
        let mut next = self
            .wheel
            .next_expiry(self.now_tick)
            .unwrap_or(100)
            .min(100);
        for t in [self.drain_deadline, self.accept_paused_until]
            .into_iter()
            .flatten()
        {
            next = next.min(t.saturating_sub(self.now_tick).max(1));
        }
        TICK * next as u32
    }

    /// Publish this worker's counters for /metrics.
    pub fn publish_stats(&mut self) {
        // h2 streams live in the slab too, but they are not connections.
        self.counters.connections_open =
            (self.conns.len() as u64).saturating_sub(self.counters.h2_streams_open);
        self.counters.tls_handshakes_in_progress = self.tls_handshaking as u64;
        self.counters.tls_buffer_bytes = self.tls_held as u64;
        self.counters.loop_turns += 1;
        self.flush_log();
        self.shared.stats[self.id].store(&self.counters);
    }

    // ---- accept -------------------------------------------------------------------

    /// A connection was accepted (on the TLS listener if `tls`). Returns its id; over the
    /// limits it is answered 503; over `--tls-max-handshakes` it is closed at once.
    pub fn handle_accept(&mut self, handle: H, peer: Option<IpAddr>, tls: bool) -> ConnId {
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
            pre: Pre::default(),
            rbuf: None,
            replay: None,
        }) as ConnId;
        self.counters.connections_accepted += 1;
        let open = self.shared.open.fetch_add(1, Ordering::Relaxed) + 1;
        let max = self.shared.max_connections.load(Ordering::Relaxed);
        if open > max || !self.take_accept_token() {
            self.counters.connections_rejected += 1;
            self.conns[c as usize].flags |= flag::REJECT;
        }
        self.info_accepted(c, peer);
        // The TLS handshake counts against the head timeout.
        let deadline = self.now_tick + self.ticks(self.shared.config.head_timeout);
        self.wheel.insert(c, deadline);
        if tls && !self.start_tls(c) {
            self.close(c);
        }
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

    /// An accept failed: decide what the backend does, and pause accepting (logged once
    /// per pause, counted every time) when the kernel is out of descriptors or memory.
    pub fn handle_accept_error(&mut self, e: &io::Error) -> AcceptAction {
        match e.raw_os_error() {
            Some(libc::ECONNABORTED | libc::EINTR | libc::EAGAIN | libc::EPROTO | libc::EPERM) => {
                AcceptAction::Retry
            }
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                self.counters.accept_pauses += 1;
                if self.accept_paused_until.is_none() {
                    tracing::warn!(worker = self.id, error = %e, pause_ms = ACCEPT_BACKOFF.as_millis() as u64, "accept paused");
                }
                self.accept_paused_until = Some(self.now_tick + self.ticks(ACCEPT_BACKOFF));
                AcceptAction::Pause
            }
            _ => AcceptAction::Fatal,
        }
    }

    /// Whether accepting is paused (after [`AcceptAction::Pause`]). Ends the pause once
    /// it is over.
    pub fn accept_paused(&mut self) -> bool {
        match self.accept_paused_until {
            Some(t) if self.now_tick < t => true,
            Some(_) => {
                self.accept_paused_until = None;
                false
            }
            None => false,
        }
    }

    // ---- shutdown -----------------------------------------------------------------

    /// Shutdown was requested and the drain has not begun: the backend stops accepting
    /// and calls [`Core::begin_drain`].
    pub fn stop_requested(&self) -> bool {
        !self.is_draining() && self.shared.stop.load(Ordering::Acquire)
    }

    /// Whether the worker may exit: draining, and every connection released (or the
    /// drain window and a grace period for outstanding closes are over).
    pub fn poll_exit(&self) -> bool {
        let Some(deadline) = self.drain_deadline else {
            return false;
        };
        if self.conns.is_empty() {
            return true;
        }
        if self.now_tick >= deadline + self.ticks(EXIT_GRACE) {
            tracing::warn!(
                worker = self.id,
                left = self.conns.len(),
                "stopping with connections still closing"
            );
            return true;
        }
        false
    }

    // ---- close --------------------------------------------------------------------

    /// Ask the backend to close `c`.
    pub fn close(&mut self, c: ConnId) {
        if let Some(conn) = self.conns.get_mut(c as usize) {
            if conn.phase != Phase::Closing {
                conn.phase = Phase::Closing;
                let h2s = conn.has(flag::H2S);
                self.closing.push(c);
                if h2s {
                    self.h2_gone(c);
                }
            }
        }
    }

    /// Connections the backend must close (then call [`Core::release`]).
    pub fn take_closing(&mut self, out: &mut Vec<ConnId>) {
        out.clear();
        std::mem::swap(out, &mut self.closing);
        if !self.h2.is_empty() {
            // Streams end here; only connections go to the backend.
            self.h2_take_closing(out);
        }
    }

    /// The backend has closed `c` and no operation on it is in flight: forget it.
    pub fn release(&mut self, c: ConnId) -> Option<H> {
        let conn = self.conns.get(c as usize)?;
        if conn.has(flag::H2) {
            self.h2_release_conn(c);
        }
        self.info_released(c);
        self.detach(c);
        self.drop_tls(c);
        self.wheel.remove(c);
        let conn = self.conns.remove(c as usize);
        self.shared.open.fetch_sub(1, Ordering::Relaxed);
        self.counters.connections_closed += 1;
        Some(conn.handle)
    }
}
