//! The ingest thread: NDJSON publishers over TCP (`--ingest`) and a Unix socket
//! (`--ingest-unix`). Each valid line is published through the hub; a bad line gets
//! `{"error":...,"line":N}` back and is skipped; a publisher that half-closes gets every
//! reply before the server closes. Publishing never waits on subscribers, only (rarely)
//! on a worker whose inbox is full. The thread also ages out topic history once a second.
//! Invariant: a publisher we stopped reading (reply cap, or its turn's budget) is in the
//! run queue or waits for a writable edge, never for a readable edge that will not come.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use super::ndjson::{error_reply, parse_line, Command, Framed, LineError, LineFramer};
use crate::core::Shared;
use crate::fanout::bus::{Hub, PublishBatch};
use crate::metrics::IngestStats;

const TCP: Token = Token(usize::MAX - 1);
const UNIX: Token = Token(usize::MAX - 2);
const WAKER: Token = Token(usize::MAX - 3);
/// Unanswered reply bytes per publisher before we stop handling its lines.
const MAX_PENDING_REPLIES: usize = 1 << 20;
/// Bytes read from one publisher per loop turn before the others get theirs (fairness).
const READ_BUDGET: usize = 256 << 10;
/// Longest wait in `poll`, so the janitor and the idle sweep run on time.
const MAX_POLL_WAIT: Duration = Duration::from_millis(500);
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

/// Handle to stop the ingest thread.
pub struct IngestHandle {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<std::thread::JoinHandle<io::Result<()>>>,
}

impl IngestHandle {
    /// Stop accepting publishers, answer what was already read, and join the thread.
    pub fn stop(mut self) -> io::Result<()> {
        self.stop.store(true, Ordering::Release);
        let _ = self.waker.wake();
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(io::Error::other("ingest thread panicked")),
            None => Ok(()),
        }
    }
}

/// Bound ingest sockets (bound before the thread starts so errors surface at startup).
pub struct IngestSockets {
    pub tcp: Option<std::net::TcpListener>,
    pub unix: Option<(std::os::unix::net::UnixListener, PathBuf)>,
}

impl IngestSockets {
    pub fn bind(
        tcp: Option<std::net::SocketAddr>,
        unix: Option<&PathBuf>,
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
                Some((std::os::unix::net::UnixListener::bind(path)?, path.clone()))
            }
            None => None,
        };
        Ok(IngestSockets { tcp, unix })
    }
}

/// Start the ingest thread.
pub fn spawn(shared: Arc<Shared>, sockets: IngestSockets) -> io::Result<IngestHandle> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name("herald-ingest".into())
        .spawn(move || {
            let fallback = IngestStats::default();
            let stats = shared.stats.first().map_or(&fallback, |w| &w.ingest);
            let limits = Limits {
                max_line: shared.config.max_event + 4096,
                max_connections: shared.config.ingest_max_connections,
                idle_timeout: shared.config.ingest_idle_timeout,
            };
            let mut ingest = Ingest {
                poll,
                hub: &shared.hub,
                stats,
                limits,
                pubs: Slab::new(),
                run_queue: VecDeque::new(),
                buf: vec![0u8; 64 << 10],
            };
            ingest.run(sockets, &stop2)
        })?;
    Ok(IngestHandle {
        stop,
        waker,
        thread: Some(thread),
    })
}

struct Limits {
    /// Longest line, in bytes.
    max_line: usize,
    max_connections: usize,
    idle_timeout: Option<Duration>,
}

/// The ingest thread's state.
struct Ingest<'a> {
    poll: Poll,
    hub: &'a Hub,
    stats: &'a IngestStats,
    limits: Limits,
    pubs: Slab<Publisher>,
    /// Publishers to visit without waiting for an event, in turn order.
    run_queue: VecDeque<usize>,
    buf: Vec<u8>,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Ingest<'_> {
    fn run(&mut self, sockets: IngestSockets, stop: &AtomicBool) -> io::Result<()> {
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
            self.poll.registry().register(l, TCP, Interest::READABLE)?;
            tracing::info!(addr = %l.local_addr()?, "ingest listening (tcp)");
        }
        if let Some((l, path)) = unix.as_mut() {
            self.poll.registry().register(l, UNIX, Interest::READABLE)?;
            tracing::info!(path = %path.display(), "ingest listening (unix)");
        }
        let mut events = Events::with_capacity(256);
        let mut janitor_at = Instant::now() + Duration::from_secs(1);
        // Sweep often enough that a connection is cut within a quarter of the timeout.
        let sweep_every = self
            .limits
            .idle_timeout
            .map(|t| (t / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)));
        let mut sweep_at = Instant::now();
        loop {
            let now = Instant::now();
            let wait = if self.run_queue.is_empty() {
                let next = sweep_every.map_or(janitor_at, |_| sweep_at.min(janitor_at));
                next.saturating_duration_since(now).min(MAX_POLL_WAIT)
            } else {
                Duration::ZERO
            };
            match self.poll.poll(&mut events, Some(wait)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for ev in events.iter() {
                match ev.token() {
                    WAKER => {}
                    TCP => {
                        while let Some(l) = tcp.as_ref() {
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
                        while let Some((l, _)) = unix.as_ref() {
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
                    Token(k) => self.schedule(k),
                }
            }
            self.turn(READ_BUDGET);
            let now = Instant::now();
            if let (Some(every), Some(idle)) = (sweep_every, self.limits.idle_timeout) {
                if now >= sweep_at {
                    self.close_idle(now, idle);
                    sweep_at = now + every;
                }
            }
            if now >= janitor_at {
                self.hub.janitor();
                janitor_at = Instant::now() + Duration::from_secs(1);
            }
            if stop.load(Ordering::Acquire) {
                // Stop accepting; publishers already connected get their pending lines handled.
                if let Some(mut l) = tcp.take() {
                    let _ = self.poll.registry().deregister(&mut l);
                }
                if let Some((mut l, path)) = unix.take() {
                    let _ = self.poll.registry().deregister(&mut l);
                    let _ = std::fs::remove_file(path);
                }
                let keys: Vec<usize> = self.pubs.iter().map(|(k, _)| k).collect();
                for k in keys {
                    let _ = self.serve(k, usize::MAX);
                    let _ = flush(&mut self.pubs[k]);
                    self.close(k);
                }
                tracing::info!("ingest stopped");
                return Ok(());
            }
        }
    }

    /// A new connection: served, or over `--ingest-max-connections` told so and closed.
    fn admit(&mut self, mut stream: Stream) {
        if self.pubs.len() >= self.limits.max_connections {
            bump(&self.stats.connections_refused);
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
        });
        bump(&self.stats.connections_accepted);
        self.stats.connections_open.fetch_add(1, Ordering::Relaxed);
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
    fn turn(&mut self, budget: usize) {
        for _ in 0..self.run_queue.len() {
            let Some(k) = self.run_queue.pop_front() else {
                break;
            };
            let Some(p) = self.pubs.get_mut(k) else {
                continue;
            };
            p.queued = false;
            match self.serve(k, budget) {
                Next::Wait => {}
                Next::Again => self.schedule(k),
                Next::Close => self.close(k),
            }
        }
    }

    /// Read (up to `budget` bytes), publish, reply.
    fn serve(&mut self, k: usize, budget: usize) -> Next {
        let now = Instant::now();
        let (hub, stats) = (self.hub, self.stats);
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
            handle_lines(hub, stats, p);
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
                    handle_lines(hub, stats, p);
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
            let mut batch = hub.batch();
            while let Some(f) = p.framer.finish() {
                handle_line(&mut batch, hub, stats, f, &mut p.out, max_line);
            }
        }
        match flush(p) {
            Ok(0) => {}
            Ok(_) => p.active_at = now,
            Err(_) => return Next::Close,
        }
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
            bump(&self.stats.idle_timeouts);
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
            self.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Handle the framer's complete lines until the reply cap; past it the rest wait in the
/// framer (`lines_pending`), so replies held stay near the cap.
/// Handle the lines framed so far as one batch: each worker is woken once for them.
fn handle_lines(hub: &Hub, stats: &IngestStats, p: &mut Publisher) {
    let max_line = p.max_line;
    let mut batch = hub.batch();
    loop {
        if p.out.len() >= MAX_PENDING_REPLIES {
            p.lines_pending = true;
            return;
        }
        let Some(f) = p.framer.next_line() else {
            p.lines_pending = false;
            return;
        };
        handle_line(&mut batch, hub, stats, f, &mut p.out, max_line);
    }
}

fn handle_line(
    batch: &mut PublishBatch<'_>,
    hub: &Hub,
    stats: &IngestStats,
    f: Framed<'_>,
    out: &mut VecDeque<u8>,
    max_line: usize,
) {
    let (no, result) = match f {
        Framed::Line { no, line } => (no, parse_line(line)),
        Framed::TooLong { no } => (no, Err(LineError::LineTooLong { max: max_line })),
    };
    let err = match result {
        Ok(Command::Publish(p)) => batch.publish(p).err().map(LineError::Invalid),
        Ok(Command::CloseTopic(t)) => {
            // In order with the events before it: those workers are woken first.
            batch.flush();
            hub.close_topic(&t);
            None
        }
        Err(e) => Some(e),
    };
    if let Some(e) = err {
        tracing::trace!(line = no, error = %e, "ingest line refused");
        bump(&stats.lines_refused);
        out.extend(error_reply(&e, no));
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
