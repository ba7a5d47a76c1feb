//! Ingest: NDJSON publishers over TCP (`--ingest`) and a Unix socket (`--ingest-unix`),
//! served inside the first worker's loop (no thread of its own, so an event costs no
//! wake-up of another thread on its way to that worker's subscribers). Each valid line
//! is published through the hub; a bad line gets `{"error":...,"line":N}` back and is
//! skipped; a publisher that half-closes gets every reply before the server closes.
//! Publishing never waits on subscribers, only (rarely) on a worker whose inbox is full.
//! The loop also runs the hub's history janitor: once a second, or a slice of topics every
//! 50 ms when there are many.
//! Invariant: a publisher we stopped reading (reply cap, or its turn's budget) is in the
//! run queue or waits for a writable edge, never for a readable edge that will not come.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use super::ndjson::{error_reply, parse_line, Command, Framed, LineError, LineFramer};
use crate::cluster::{self, Item, PubError};
use crate::core::Shared;
use crate::fanout::bus::PublishBatch;
use crate::metrics::IngestStats;

const TCP: Token = Token(usize::MAX - 1);
const UNIX: Token = Token(usize::MAX - 2);
/// Unanswered reply bytes per publisher before we stop handling its lines.
const MAX_PENDING_REPLIES: usize = 1 << 20;
/// Bytes read from one publisher per loop turn before the others get theirs (fairness).
const READ_BUDGET: usize = 256 << 10;
/// How often the hub's janitor runs when one call covers every topic ...
const JANITOR_EVERY: Duration = Duration::from_secs(1);
/// ... and how soon it visits its next slice of topics when there are more.
const JANITOR_NEXT_SLICE: Duration = Duration::from_millis(50);
/// Readiness events taken per turn.
const EVENTS: usize = 256;
/// Input taken in one host step while publishers have more waiting (see
/// [`Ingest::host_step`]).
const STEP_BUDGET: usize = 4 << 20;
/// The one line a connection over `--ingest-max-connections` gets.
const TOO_MANY: &[u8] = b"{\"error\":\"too many ingest connections\"}\n";
/// The last line of a connection closed by `--ingest-idle-timeout`.
const IDLE: &[u8] = b"{\"error\":\"idle timeout\"}\n";

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            Stream::Tcp(s) => s,
            Stream::Unix(s) => s,
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn shutdown_write(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
        };
    }
}

struct Publisher {
    stream: Stream,
    framer: LineFramer,
    out: VecDeque<u8>,
    eof: bool,
    max_line: usize,
    /// Input may be waiting in the socket: the last read stopped before `WouldBlock`,
    /// so no readable edge will announce it.
    unread: bool,
    /// The framer holds complete lines not handled yet (the reply cap was reached).
    lines_pending: bool,
    /// In the run queue (so it is queued once).
    queued: bool,
    /// Last byte read from or written to the peer (`--ingest-idle-timeout`).
    active_at: Instant,
    /// The poller reported the peer's FIN: no later edge will, so reads go on to EOF.
    fin_seen: bool,
}

/// What a publisher needs after a visit.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// A readable or writable edge will come.
    Wait,
    /// More to do without any event: visit again next turn.
    Again,
    /// Finished or failed: close it.
    Close,
}

/// Bound ingest sockets (bound before the workers start so errors surface at startup).
pub struct IngestSockets {
    pub tcp: Option<std::net::TcpListener>,
    pub unix: Option<(std::os::unix::net::UnixListener, PathBuf)>,
}

impl IngestSockets {
    /// `unix_mode`: the Unix socket's permission bits (`--ingest-unix-mode`), set right
    /// after the bind, before anything is accepted.
    pub fn bind(
        tcp: Option<std::net::SocketAddr>,
        unix: Option<&PathBuf>,
        unix_mode: Option<u32>,
    ) -> io::Result<IngestSockets> {
        let tcp = tcp.map(std::net::TcpListener::bind).transpose()?;
        let unix = match unix {
            Some(path) => {
                // A stale socket file from an earlier run would make bind fail.
                if std::fs::symlink_metadata(path).is_ok_and(|m| {
                    use std::os::unix::fs::FileTypeExt;
                    m.file_type().is_socket()
                }) {
                    std::fs::remove_file(path)?;
                }
                let l = std::os::unix::net::UnixListener::bind(path)?;
                if let Some(mode) = unix_mode {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
                }
                Some((l, path.clone()))
            }
            None => None,
        };
        Ok(IngestSockets { tcp, unix })
    }
}

struct Limits {
    /// Longest line, in bytes.
    max_line: usize,
    max_connections: usize,
    idle_timeout: Option<Duration>,
}

/// The ingest loop, hosted by a worker: the worker polls [`Ingest::fd`] with its own ring
/// or poller and calls [`Ingest::turn`] when it is readable or [`Ingest::wait`] says so.
/// Publishing from the worker that holds a topic's subscribers then costs no wake-up at
/// all: the worker is awake, and takes the event from its own inbox in the same loop turn.
pub struct Ingest {
    poll: Poll,
    shared: Arc<Shared>,
    limits: Limits,
    tcp: Option<TcpListener>,
    unix: Option<(UnixListener, PathBuf)>,
    pubs: Slab<Publisher>,
    /// Publishers to visit without waiting for an event, in turn order.
    run_queue: VecDeque<usize>,
    events: Events,
    /// The last poll filled `events`: more may be ready, and an edge-triggered host will
    /// not be told again.
    more_events: bool,
    buf: Vec<u8>,
    /// Bytes read in the current host step.
    step_read: usize,
    janitor_at: Instant,
    /// Sweep often enough that a connection is cut within a quarter of the timeout.
    sweep_every: Option<Duration>,
    sweep_at: Instant,
    /// Told once everything read before the stop is published (see [`Ingest::stop`]).
    done: Option<mpsc::Sender<()>>,
    /// `--cluster`: lines are published through Redis on this link.
    cluster: Option<cluster::Publisher>,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The counters ingest bumps (the first worker's block: one set for the process).
fn stats(shared: &Shared) -> &IngestStats {
    &shared.stats[0].ingest
}

impl Ingest {
    /// Register the listeners; `done` is told when [`Ingest::stop`] has finished.
    pub fn new(
        shared: Arc<Shared>,
        sockets: IngestSockets,
        done: mpsc::Sender<()>,
    ) -> io::Result<Ingest> {
        let poll = Poll::new()?;
        let mut tcp = sockets
            .tcp
            .map(|l| l.set_nonblocking(true).map(|_| TcpListener::from_std(l)))
            .transpose()?;
        let mut unix = match sockets.unix {
            Some((l, path)) => {
                l.set_nonblocking(true)?;
                Some((UnixListener::from_std(l), path))
            }
            None => None,
        };
        if let Some(l) = tcp.as_mut() {
            poll.registry().register(l, TCP, Interest::READABLE)?;
            tracing::info!(addr = %l.local_addr()?, "ingest listening (tcp)");
        }
        if let Some((l, path)) = unix.as_mut() {
            poll.registry().register(l, UNIX, Interest::READABLE)?;
            tracing::info!(path = %path.display(), "ingest listening (unix)");
        }
        let limits = Limits {
            max_line: shared.config.max_event + 4096,
            max_connections: shared.config.ingest_max_connections,
            idle_timeout: shared.config.ingest_idle_timeout,
        };
        let now = Instant::now();
        let shared_cluster = shared.cluster.as_ref().map(|c| c.publisher());
        Ok(Ingest {
            poll,
            sweep_every: limits
                .idle_timeout
                .map(|t| (t / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))),
            limits,
            shared,
            tcp,
            unix,
            pubs: Slab::new(),
            run_queue: VecDeque::new(),
            events: Events::with_capacity(EVENTS),
            more_events: false,
            buf: vec![0u8; 64 << 10],
            step_read: 0,
            janitor_at: now + JANITOR_EVERY,
            sweep_at: now,
            done: Some(done),
            cluster: shared_cluster,
        })
    }

    /// The descriptor the host polls for readability (the ingest's own epoll set).
    pub fn fd(&self) -> RawFd {
        self.poll.as_raw_fd()
    }

    /// How long the host may wait before the next [`Ingest::turn`] if [`Ingest::fd`]
    /// stays quiet: zero while publishers wait for their turn.
    pub fn wait(&self, now: Instant) -> Duration {
        if !self.run_queue.is_empty() || self.more_events {
            return Duration::ZERO;
        }
        let next = match self.sweep_every {
            Some(_) => self.sweep_at.min(self.janitor_at),
            None => self.janitor_at,
        };
        next.saturating_duration_since(now)
    }

    /// One turn: take the ready events without blocking, give every queued publisher its
    /// read budget, sweep idle connections and age out history when due. `make_room` is
    /// called while a publish waits for room in a full inbox (the host's own, which only
    /// the host can empty).
    pub fn turn(&mut self, make_room: &mut dyn FnMut()) -> io::Result<()> {
        self.turn_waiting(Duration::ZERO, make_room)
    }

    /// [`Ingest::turn`], first waiting up to `wait` for something to be ready.
    fn turn_waiting(&mut self, wait: Duration, make_room: &mut dyn FnMut()) -> io::Result<()> {
        match self.poll.poll(&mut self.events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => self.events.clear(),
            Err(e) => return Err(e),
        }
        let mut n = 0;
        let mut tokens = [(Token(0), false); EVENTS];
        for ev in self.events.iter() {
            tokens[n] = (ev.token(), ev.is_read_closed());
            n += 1;
        }
        self.more_events = n == EVENTS;
        for &(token, fin) in &tokens[..n] {
            match token {
                TCP => {
                    while let Some(l) = self.tcp.as_ref() {
                        match l.accept() {
                            Ok((s, _)) => self.admit(Stream::Tcp(s)),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) => {
                                tracing::warn!(error = %e, "ingest accept failed");
                                break;
                            }
                        }
                    }
                }
                UNIX => {
                    while let Some((l, _)) = self.unix.as_ref() {
                        match l.accept() {
                            Ok((s, _)) => self.admit(Stream::Unix(s)),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) => {
                                tracing::warn!(error = %e, "ingest accept failed");
                                break;
                            }
                        }
                    }
                }
                Token(k) => {
                    if let Some(p) = self.pubs.get_mut(k) {
                        p.fin_seen |= fin;
                    }
                    self.schedule(k)
                }
            }
        }
        self.visit(READ_BUDGET, make_room);
        let now = Instant::now();
        if let (Some(every), Some(idle)) = (self.sweep_every, self.limits.idle_timeout) {
            if now >= self.sweep_at {
                self.close_idle(now, idle);
                self.sweep_at = now + every;
            }
        }
        if now >= self.janitor_at {
            let all = self.shared.hub.janitor();
            self.janitor_at = Instant::now()
                + if all {
                    JANITOR_EVERY
                } else {
                    JANITOR_NEXT_SLICE
                };
        }
        Ok(())
    }

    /// The host's step, once per loop turn and before it takes its own inbox: stop when
    /// shutdown asks for it, else turn when [`Ingest::fd`] was `readable` or timed work is
    /// due. Returns false once stopped; the host then drops it.
    pub fn host_step(
        &mut self,
        readable: bool,
        now: Instant,
        make_room: &mut dyn FnMut(),
    ) -> io::Result<bool> {
        if self.shared.ingest_stop.load(Ordering::Acquire)
            || self.shared.stop.load(Ordering::Acquire)
        {
            self.stop(make_room);
            return Ok(false);
        }
        if readable || self.wait(now).is_zero() {
            self.step_read = 0;
            self.turn(make_room)?;
            // Behind (publishers still have input waiting): keep taking it, up to
            // STEP_BUDGET, before the host writes. A backlog's events then leave together,
            // several to a stream in one write where a stream has several, instead of one
            // write per event. A lone event still goes out at once: nothing waits for more.
            while !self.run_queue.is_empty() && self.step_read < STEP_BUDGET {
                self.visit(READ_BUDGET, make_room);
            }
        }
        Ok(true)
    }

    /// `--cluster`: serve ingest on a thread of its own (see [`crate::cluster`]), so a
    /// Redis round trip never holds up a worker; until shutdown asks it to stop.
    pub fn run_alone(mut self) {
        let mut none = || {};
        loop {
            if self.shared.ingest_stop.load(Ordering::Acquire)
                || self.shared.stop.load(Ordering::Acquire)
            {
                return self.stop(&mut none);
            }
            // Stop flags are looked at at least every 50 ms.
            let wait = self.wait(Instant::now()).min(Duration::from_millis(50));
            self.step_read = 0;
            if let Err(e) = self.turn_waiting(wait, &mut none) {
                tracing::error!(error = %e, "ingest failed");
                return self.stop(&mut none);
            }
            while !self.run_queue.is_empty() && self.step_read < STEP_BUDGET {
                self.visit(READ_BUDGET, &mut none);
            }
        }
    }

    /// Stop accepting; the lines publishers already sent are handled and answered, then
    /// every ingest connection is closed and `done` is told.
    pub fn stop(&mut self, make_room: &mut dyn FnMut()) {
        if let Some(mut l) = self.tcp.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        if let Some((mut l, path)) = self.unix.take() {
            let _ = self.poll.registry().deregister(&mut l);
            let _ = std::fs::remove_file(path);
        }
        let keys: Vec<usize> = self.pubs.iter().map(|(k, _)| k).collect();
        for k in keys {
            let _ = self.serve(k, usize::MAX, make_room);
            let _ = flush(&mut self.pubs[k]);
            self.close(k);
        }
        self.run_queue.clear();
        tracing::info!("ingest stopped");
        if let Some(done) = self.done.take() {
            let _ = done.send(());
        }
    }

    /// A new connection: served, or over `--ingest-max-connections` told so and closed.
    fn admit(&mut self, mut stream: Stream) {
        if self.pubs.len() >= self.limits.max_connections {
            bump(&stats(&self.shared).connections_refused);
            // A fresh socket's send buffer is empty: the line goes out in one write.
            let _ = stream.write(TOO_MANY);
            stream.shutdown_write();
            // Whatever the peer already sent is read, so closing sends FIN, not RST
            // (which could destroy the error line before the peer reads it).
            let mut sink = [0u8; 4096];
            for _ in 0..16 {
                if !matches!(stream.read(&mut sink), Ok(n) if n > 0) {
                    break;
                }
            }
            return;
        }
        let entry = self.pubs.vacant_entry();
        let key = entry.key();
        if let Err(e) = self.poll.registry().register(
            stream.source(),
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::warn!(error = %e, "ingest connection not registered; closed");
            return;
        }
        entry.insert(Publisher {
            stream,
            framer: LineFramer::new(self.limits.max_line),
            out: VecDeque::new(),
            eof: false,
            max_line: self.limits.max_line,
            unread: false,
            lines_pending: false,
            queued: false,
            active_at: Instant::now(),
            fin_seen: false,
        });
        let st = stats(&self.shared);
        bump(&st.connections_accepted);
        st.connections_open.fetch_add(1, Ordering::Relaxed);
    }

    /// Queue publisher `k` for this turn (once).
    fn schedule(&mut self, k: usize) {
        if let Some(p) = self.pubs.get_mut(k) {
            if !p.queued {
                p.queued = true;
                self.run_queue.push_back(k);
            }
        }
    }

    /// Visit every queued publisher once, each with `budget` bytes of reading; those with
    /// more to do go to the back of the queue for the next turn.
    fn visit(&mut self, budget: usize, make_room: &mut dyn FnMut()) {
        for _ in 0..self.run_queue.len() {
            let Some(k) = self.run_queue.pop_front() else {
                break;
            };
            let Some(p) = self.pubs.get_mut(k) else {
                continue;
            };
            p.queued = false;
            match self.serve(k, budget, make_room) {
                Next::Wait => {}
                Next::Again => self.schedule(k),
                Next::Close => self.close(k),
            }
        }
    }

    /// Read (up to `budget` bytes), publish, reply.
    fn serve(&mut self, k: usize, budget: usize, make_room: &mut dyn FnMut()) -> Next {
        let now = Instant::now();
        let (shared, stats) = (&*self.shared, stats(&self.shared));
        let cluster = &mut self.cluster;
        let Some(p) = self.pubs.get_mut(k) else {
            return Next::Close;
        };
        // Replies first: that makes room for the lines they hold back.
        match flush(p) {
            Ok(0) => {}
            Ok(_) => p.active_at = now,
            Err(_) => return Next::Close,
        }
        if p.lines_pending {
            handle_lines(shared, stats, p, make_room, cluster.as_mut());
        }
        let mut read = 0usize;
        while !p.eof && !p.lines_pending {
            if read >= budget {
                p.unread = true;
                break;
            }
            match p.stream.read(&mut self.buf) {
                Ok(0) => {
                    p.eof = true;
                    p.unread = false;
                }
                Ok(n) => {
                    read += n;
                    p.active_at = now;
                    p.framer.push(&self.buf[..n]);
                    handle_lines(shared, stats, p, make_room, cluster.as_mut());
                    if n < self.buf.len() && !p.fin_seen {
                        // A short read emptied the socket: whatever arrives later (a FIN
                        // too) raises a new edge, so the read that would only say
                        // `WouldBlock` is saved (one syscall per event at low rates).
                        p.unread = false;
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    p.unread = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Next::Close,
            }
        }
        if p.lines_pending {
            // Nothing will announce the lines held back, nor input behind them.
            p.unread = true;
        } else if p.eof {
            let max_line = p.max_line;
            let mut lines = Vec::new();
            while let Some(f) = p.framer.finish() {
                lines.push(parse(f, max_line));
            }
            if !lines.is_empty() {
                run(
                    shared,
                    stats,
                    lines,
                    &mut p.out,
                    make_room,
                    cluster.as_mut(),
                );
            }
        }
        match flush(p) {
            Ok(0) => {}
            Ok(_) => p.active_at = now,
            Err(_) => return Next::Close,
        }
        self.step_read += read;
        if p.eof && !p.lines_pending && p.out.is_empty() {
            Next::Close
        } else if p.unread && p.out.len() < MAX_PENDING_REPLIES {
            Next::Again
        } else {
            // Waiting on input (the read saw `WouldBlock`) or on room for replies (the
            // flush saw `WouldBlock`, so a writable edge follows).
            Next::Wait
        }
    }

    /// Close publishers that moved no byte for `idle`, with a last error line.
    fn close_idle(&mut self, now: Instant, idle: Duration) {
        let idle_keys: Vec<usize> = self
            .pubs
            .iter()
            .filter(|(_, p)| now.duration_since(p.active_at) >= idle)
            .map(|(k, _)| k)
            .collect();
        for k in idle_keys {
            bump(&stats(&self.shared).idle_timeouts);
            let p = &mut self.pubs[k];
            p.out.extend(IDLE);
            let _ = flush(p);
            self.close(k);
        }
    }

    fn close(&mut self, k: usize) {
        if self.pubs.contains(k) {
            let mut p = self.pubs.remove(k);
            let _ = self.poll.registry().deregister(p.stream.source());
            stats(&self.shared)
                .connections_open
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Lines taken from the framer per batch at most (one Redis round trip with `--cluster`).
const LINES_PER_BATCH: usize = 4096;

/// Handle the lines framed so far, batch by batch (each worker is woken once per batch;
/// with `--cluster` each batch is one Redis round trip), up to the reply cap; past it the
/// rest wait in the framer (`lines_pending`), so replies held stay near the cap.
fn handle_lines(
    shared: &Shared,
    stats: &IngestStats,
    p: &mut Publisher,
    make_room: &mut dyn FnMut(),
    cluster: Option<&mut cluster::Publisher>,
) {
    let max_line = p.max_line;
    let mut cluster = cluster;
    loop {
        if p.out.len() >= MAX_PENDING_REPLIES {
            p.lines_pending = true;
            return;
        }
        let mut lines = Vec::new();
        while lines.len() < LINES_PER_BATCH {
            let Some(f) = p.framer.next_line() else {
                break;
            };
            lines.push(parse(f, max_line));
        }
        if lines.is_empty() {
            p.lines_pending = false;
            return;
        }
        run(
            shared,
            stats,
            lines,
            &mut p.out,
            make_room,
            cluster.as_deref_mut(),
        );
    }
}

/// A framed line, parsed.
fn parse(f: Framed<'_>, max_line: usize) -> (u64, Result<Command, LineError>) {
    match f {
        Framed::Line { no, line } => (no, parse_line(line)),
        Framed::TooLong { no } => (no, Err(LineError::LineTooLong { max: max_line })),
    }
}

/// Carry out a batch of lines in order; refusals get their error line.
fn run(
    shared: &Shared,
    stats: &IngestStats,
    lines: Vec<(u64, Result<Command, LineError>)>,
    out: &mut VecDeque<u8>,
    make_room: &mut dyn FnMut(),
    cluster: Option<&mut cluster::Publisher>,
) {
    let mut refuse = |no: u64, e: LineError| {
        tracing::trace!(line = no, error = %e, "ingest line refused");
        bump(&stats.lines_refused);
        out.extend(error_reply(&e, no));
    };
    let Some(cluster) = cluster else {
        let mut batch = shared.hub.batch();
        for (no, cmd) in lines {
            if let Some(e) = run_local(&mut batch, shared, cmd, make_room) {
                refuse(no, e);
            }
        }
        return;
    };
    // Through Redis: every line that is an action goes in one pipeline, in order; the
    // reader thread of every node (this one too) then delivers it.
    let mut items = Vec::new();
    let mut order = Vec::with_capacity(lines.len());
    for (no, cmd) in lines {
        let item = match cmd {
            Ok(Command::Publish(p)) => Ok(Item::Publish(p)),
            Ok(Command::CloseTopic(t)) => Ok(Item::Close(t)),
            Ok(Command::Disconnect(what)) => match shared.auth.as_deref() {
                None => Err(no_auth()),
                Some(_) => Ok(Item::Revoke(what)),
            },
            Err(e) => Err(e),
        };
        match item {
            Ok(it) => {
                items.push(it);
                order.push((no, None));
            }
            Err(e) => order.push((no, Some(e))),
        }
    }
    let mut results = cluster.publish(&items).into_iter();
    for (no, err) in order {
        let err = match err {
            Some(e) => Some(e),
            None => match results.next() {
                Some(Ok(_)) => None,
                Some(Err(PubError::Invalid(e))) => Some(LineError::Invalid(e)),
                Some(Err(e @ PubError::Unavailable(_))) => Some(LineError::Refused(e.to_string())),
                None => Some(LineError::Refused("cluster unavailable".into())),
            },
        };
        if let Some(e) = err {
            refuse(no, e);
        }
    }
}

fn no_auth() -> LineError {
    LineError::Refused(
        "disconnect needs authentication (--auth-keys, --auth-secret-file or --auth-jwks-url)"
            .into(),
    )
}

/// One line, published through the hub; the error it gets, if refused.
fn run_local(
    batch: &mut PublishBatch<'_>,
    shared: &Shared,
    cmd: Result<Command, LineError>,
    make_room: &mut dyn FnMut(),
) -> Option<LineError> {
    match cmd {
        Ok(Command::Publish(p)) => batch
            .publish_making_room(p, make_room)
            .err()
            .map(LineError::Invalid),
        Ok(Command::CloseTopic(t)) => {
            // In order with the events before it: those workers are woken first.
            batch.flush();
            shared.hub.close_topic(&t);
            None
        }
        Ok(Command::Disconnect(what)) => match shared.auth.as_deref() {
            None => Some(no_auth()),
            // Recorded first: from here on no covered token starts a stream, and the
            // workers end the ones open.
            Some(auth) => match auth.revoke(&what) {
                Ok(at) => {
                    batch.flush();
                    shared.hub.revoke(&what, at);
                    None
                }
                Err(e) => Some(LineError::Refused(e)),
            },
        },
        Err(e) => Some(e),
    }
}

/// Write queued replies until done or `WouldBlock`; returns the bytes written.
fn flush(p: &mut Publisher) -> io::Result<usize> {
    let mut written = 0;
    while !p.out.is_empty() {
        let (a, _) = p.out.as_slices();
        match p.stream.write(a) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                written += n;
                p.out.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}
