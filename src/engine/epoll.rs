//! The epoll backend (mio), for kernels or containers without io_uring. Same worker core
//! as the uring backend: edge-triggered readiness, reads drained to `WouldBlock`, and one
//! vectored write per ready connection per loop turn, done synchronously (the kernel copies
//! during the call, so nothing outlives it). Connections are limited to RLIMIT_NOFILE.

use std::io::{self, IoSlice, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use crate::core::{AcceptAction, ConnId, Core, ReadOutcome, Shared, MAX_IOVECS};
use crate::fanout::bus::Wake;
use crate::ingest::listener::Ingest;

/// Listener `i` of the worker is token `LISTENER - i`.
const LISTENER: Token = Token(usize::MAX - 1);
const LISTENERS_MAX: usize = 8;
const WAKER: Token = Token(usize::MAX - 1 - LISTENERS_MAX);
/// The hosted ingest's epoll set.
const INGEST: Token = Token(usize::MAX - 2 - LISTENERS_MAX);
/// Accepts per loop turn, so a connect storm cannot starve established streams.
const ACCEPT_BATCH: usize = 512;
/// Reads per connection per turn before yielding to the others.
const READ_BUDGET: usize = 16;

struct MioWake(Waker);

impl Wake for MioWake {
    fn wake(&self) {
        if let Err(e) = self.0.wake() {
            tracing::warn!(error = %e, "waking a worker failed");
        }
    }
}

/// Connection id in the low half, its generation in the high half: a late event for a
/// reused slot is recognised and dropped.
fn token(c: ConnId, gen: u32) -> Token {
    Token(c as usize | (gen as usize) << 32)
}

struct Loop {
    core: Core<Option<TcpStream>>,
    poll: Poll,
    buf: Vec<u8>,
    /// Connections whose read budget ran out: edge-triggered epoll will not report them
    /// again, so they are read next turn.
    reread: Vec<ConnId>,
    /// TLS accepting is paused at the handshake limit (counted once per pause).
    tls_deferred: bool,
    /// Kernel-TLS key installs of this turn (reused).
    ktls_due: Vec<(ConnId, crate::tls::record::KernelKeys, bool)>,
}

/// Descriptors kept out of the connection limit: listeners, pollers, wakers, the ingest
/// socket and its publishers, files, and the excess connections that are accepted only to
/// be answered 503.
const FD_RESERVE: usize = 256;

/// Run worker `id` on the epoll backend until shutdown has drained it.
pub fn run(
    id: usize,
    shared: Arc<Shared>,
    listeners: Vec<super::Listener>,
    mut ingest: Option<Box<Ingest>>,
) -> io::Result<()> {
    // Every epoll connection holds a descriptor: the limit follows the open-files limit.
    if let Ok(nofile) = super::sys::raise_nofile_limit() {
        let most = (nofile as usize).saturating_sub(FD_RESERVE).max(1);
        shared.cap_connections(most);
    }
    let poll = Poll::new()?;
    let waker = Waker::new(poll.registry(), WAKER)?;
    shared.hub.inbox(id).set_waker(Box::new(MioWake(waker)));
    let mut listeners = listeners
        .into_iter()
        .take(LISTENERS_MAX)
        .enumerate()
        .map(|(i, l)| {
            l.socket.set_nonblocking(true)?;
            let mut sock = TcpListener::from_std(l.socket);
            poll.registry()
                .register(&mut sock, Token(LISTENER.0 - i), Interest::READABLE)?;
            Ok((sock, l.tls))
        })
        .collect::<io::Result<Vec<_>>>()?;
    if let Some(ing) = ingest.as_ref() {
        let fd = ing.fd();
        poll.registry()
            .register(&mut mio::unix::SourceFd(&fd), INGEST, Interest::READABLE)?;
    }
    let mut ingest_readable = true;
    let mut lp = Loop {
        core: Core::new(id, shared.clone(), Instant::now()),
        poll,
        buf: vec![0u8; 64 << 10],
        reread: Vec::new(),
        tls_deferred: false,
        ktls_due: Vec::new(),
    };
    let mut events = Events::with_capacity(1024);
    let mut ready = Vec::new();
    let mut closing = Vec::new();
    let mut reread = Vec::new();
    // Edge-triggered: a listener with connections waiting is not reported again, so its
    // flag stays set until an accept finds the queue empty (also across an accept pause).
    let mut accept_more = [false; LISTENERS_MAX];
    loop {
        lp.core.set_now(Instant::now());
        std::mem::swap(&mut reread, &mut lp.reread);
        for c in reread.drain(..) {
            lp.read_ready(c);
        }
        for ev in events.iter() {
            match ev.token() {
                WAKER => {}
                INGEST => ingest_readable = true,
                Token(t) if t > LISTENER.0 - LISTENERS_MAX && t <= LISTENER.0 => {
                    accept_more[LISTENER.0 - t] = true
                }
                Token(t) => {
                    let c = t as u32 as ConnId;
                    let gen = (t >> 32) as u32;
                    if lp.core.conn(c).is_none_or(|conn| conn.gen != gen) {
                        continue;
                    }
                    if ev.is_writable() {
                        lp.core.handle_writable(c);
                    }
                    if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                        lp.read_ready(c);
                    }
                }
            }
        }
        for (i, (l, tls)) in listeners.iter().enumerate() {
            if accept_more[i] && !lp.core.accept_paused() && (!tls || lp.core.tls_accept_room() > 0)
            {
                accept_more[i] = lp.accept_some(l, *tls)?;
            }
        }
        // Ingest before the inbox, so what it published goes out this turn.
        if let Some(ing) = ingest.as_mut() {
            let core = &mut lp.core;
            let readable = std::mem::take(&mut ingest_readable);
            if !ing.host_step(readable, Instant::now(), &mut || core.drain_inbox())? {
                let fd = ing.fd();
                let _ = lp.poll.registry().deregister(&mut mio::unix::SourceFd(&fd));
                ingest = None;
            }
        }
        lp.core.drain_inbox();
        lp.core.handle_tick();
        if lp.core.stop_requested() {
            for (mut l, _) in listeners.drain(..) {
                lp.poll.registry().deregister(&mut l)?;
            }
            accept_more = [false; LISTENERS_MAX];
            lp.core.begin_drain();
        }
        lp.flush(&mut ready);
        lp.core.take_closing(&mut closing);
        for &c in &closing {
            // Dropping the stream closes the socket, which also removes it from epoll.
            drop(lp.core.release(c));
        }
        lp.core.publish_stats();
        if lp.core.poll_exit() {
            tracing::info!(worker = id, "worker stopped");
            return Ok(());
        }
        let ingest_wait = ingest
            .as_ref()
            .map_or(Duration::MAX, |i| i.wait(Instant::now()));
        let busy = lp.core.has_work()
            || (!lp.core.accept_paused()
                && listeners.iter().enumerate().any(|(i, (_, tls))| {
                    // A TLS listener at the handshake limit waits for a handshake to end
                    // (a read or a timer wakes the loop), not in a spin.
                    accept_more[i] && (!tls || lp.core.tls_accept_room() > 0)
                }))
            || !lp.reread.is_empty()
            || ingest_wait.is_zero();
        if !busy && lp.core.heap_trim_due() {
            super::sys::release_free_heap();
        }
        let timeout = if busy || !lp.core.park() {
            Duration::ZERO
        } else {
            lp.core.poll_timeout().min(ingest_wait)
        };
        match lp.poll.poll(&mut events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => events.clear(),
            Err(e) => return Err(e),
        }
        lp.core.unpark();
    }
}

impl Loop {
    /// Accept up to a batch; returns true if more may be waiting.
    fn accept_some(&mut self, l: &TcpListener, tls: bool) -> io::Result<bool> {
        for _ in 0..ACCEPT_BATCH {
            if tls && self.core.tls_accept_room() == 0 {
                if !self.tls_deferred {
                    self.tls_deferred = true;
                    self.core.note_tls_accepts_deferred();
                }
                return Ok(true);
            }
            self.tls_deferred &= !tls;
            match l.accept() {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let c = self.core.handle_accept(Some(stream), Some(peer.ip()), tls);
                    let Some(conn) = self.core.conn_mut(c) else {
                        continue;
                    };
                    let tok = token(c, conn.gen);
                    let interest = Interest::READABLE | Interest::WRITABLE;
                    let Some(stream) = conn.handle.as_mut() else {
                        continue;
                    };
                    if let Err(e) = self.poll.registry().register(stream, tok, interest) {
                        tracing::warn!(error = %e, "epoll registration failed");
                        self.core.close(c);
                        continue;
                    }
                    // Edge-triggered: the request may already be waiting.
                    self.read_ready(c);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => match self.core.handle_accept_error(&e) {
                    AcceptAction::Retry => {}
                    // Still waiting in the queue: accepted once the pause is over.
                    AcceptAction::Pause => return Ok(true),
                    AcceptAction::Fatal => return Err(e),
                },
            }
        }
        Ok(true)
    }

    fn read_ready(&mut self, c: ConnId) {
        for _ in 0..READ_BUDGET {
            let Some(conn) = self.core.conn(c) else {
                return;
            };
            // Only h2 streams have no socket, and the core never reports them here.
            let Some(mut stream) = conn.handle.as_ref() else {
                return;
            };
            match stream.read(&mut self.buf) {
                Ok(0) => return self.core.handle_eof(c),
                Ok(n) => {
                    if self.core.handle_read(c, &self.buf[..n]) == ReadOutcome::Stop {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.core.handle_eof(c),
            }
        }
        self.reread.push(c);
    }

    /// One vectored write per ready connection.
    fn flush(&mut self, ready: &mut Vec<ConnId>) {
        self.core.take_ready(ready);
        for &c in ready.iter() {
            if !self.core.begin_write(c) {
                continue;
            }
            let result = {
                let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
                let (n, _) = self.core.fill(c, &mut iov);
                let record = self.core.ktls_record_type(c);
                match self.core.conn(c) {
                    Some(conn) => match (conn.handle.as_ref(), record) {
                        // One of herald's own records on a kernel-TLS socket.
                        (Some(s), Some(typ)) => {
                            super::sys::send_record(s.as_raw_fd(), typ, &iov[0])
                        }
                        (Some(mut s), None) => s.write_vectored(&iov[..n]),
                        (None, _) => Err(io::ErrorKind::NotConnected.into()),
                    },
                    None => Err(io::ErrorKind::NotConnected.into()),
                }
            };
            match result {
                Ok(n) => self.core.handle_written(c, n, true),
                // Stays "writing" until epoll reports the socket writable.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.core.handle_written(c, 0, false)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    self.core.handle_written(c, 0, true)
                }
                Err(_) => self.core.handle_write_error(c),
            }
        }
        self.install_ktls();
    }

    /// Install the sending keys of sessions handed to the kernel (kTLS), at once.
    fn install_ktls(&mut self) {
        let mut due = std::mem::take(&mut self.ktls_due);
        self.core.take_ktls_installs(&mut due);
        for (c, keys, ulp) in due.drain(..) {
            let ok = match self.core.conn(c).and_then(|conn| conn.handle.as_ref()) {
                Some(s) => match super::sys::install_ktls_tx(s.as_raw_fd(), ulp, keys.as_bytes()) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(worker = self.core.id, conn = c, error = %e, "kernel TLS hand-over refused");
                        false
                    }
                },
                None => false,
            };
            self.core.ktls_installed(c, ok);
        }
        self.ktls_due = due;
    }
}
