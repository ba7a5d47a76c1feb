//! The engine: one pinned worker thread per core, each with its own `SO_REUSEPORT`
//! listener and its own ring (uring) or poller (epoll) driving the shared worker core.
//! The backend is chosen once, at start, and logged with the reason.

pub mod affinity;
pub mod epoll;
pub mod probe;
pub mod sys;
pub mod uring;

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread::JoinHandle;

use socket2::{Domain, Protocol, Socket, Type};

use crate::config::BackendChoice;
use crate::core::Shared;
use crate::ingest::listener::Ingest;

/// Listen backlog per worker listener.
const BACKLOG: i32 = 4096;
/// Send buffer per connection, set on the listener and inherited by accepted sockets:
/// enough for a burst of coalesced events, small enough that a stalled subscriber holds
/// little kernel memory.
pub const SNDBUF: usize = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Uring,
    Epoll,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Uring => "uring",
            Backend::Epoll => "epoll",
        }
    }
}

/// Pick the backend; `Err` only when uring was demanded and cannot run.
pub fn choose(choice: BackendChoice) -> Result<(Backend, String), String> {
    match choice {
        BackendChoice::Epoll => Ok((Backend::Epoll, "requested with --backend epoll".into())),
        BackendChoice::Uring => match probe::check() {
            Ok(()) => Ok((Backend::Uring, "requested with --backend uring".into())),
            Err(why) => Err(format!("--backend uring: {why}")),
        },
        BackendChoice::Auto => match probe::check() {
            Ok(()) => Ok((Backend::Uring, "io_uring probe passed".into())),
            Err(why) => Ok((Backend::Epoll, format!("io_uring unavailable: {why}"))),
        },
    }
}

/// One `SO_REUSEPORT` listener per worker on `addr`. With port 0 the first listener's
/// port is used for the rest.
pub fn bind_listeners(addr: SocketAddr, n: usize) -> io::Result<Vec<TcpListener>> {
    let mut out = Vec::with_capacity(n);
    let mut addr = addr;
    for _ in 0..n {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.set_tcp_nodelay(true)?;
        s.set_send_buffer_size(SNDBUF)?;
        if addr.is_ipv6() {
            s.set_only_v6(false)?;
        }
        s.bind(&addr.into())?;
        s.listen(BACKLOG)?;
        let l: TcpListener = s.into();
        addr = l.local_addr()?;
        out.push(l);
    }
    Ok(out)
}

/// A worker's listening socket and whether it serves TLS.
pub struct Listener {
    pub socket: TcpListener,
    pub tls: bool,
}

/// Per worker, its listeners: the plaintext one (unless `--listen off`), then the TLS
/// one (with `--tls-listen`).
pub fn worker_listeners(
    plain: Option<Vec<TcpListener>>,
    tls: Option<Vec<TcpListener>>,
    workers: usize,
) -> Vec<Vec<Listener>> {
    let mut out: Vec<Vec<Listener>> = (0..workers).map(|_| Vec::new()).collect();
    for (set, is_tls) in [(plain, false), (tls, true)] {
        for (w, socket) in set.into_iter().flatten().enumerate() {
            out[w].push(Listener {
                socket,
                tls: is_tls,
            });
        }
    }
    out
}

/// Start the workers; each pins itself, then runs its backend until drained. The first
/// also serves `ingest`, if given.
pub fn spawn_workers(
    shared: &Arc<Shared>,
    backend: Backend,
    listeners: Vec<Vec<Listener>>,
    ingest: Option<Ingest>,
) -> io::Result<Vec<JoinHandle<io::Result<()>>>> {
    let _ = shared.backend.set(backend.name());
    let mut ingest = ingest;
    listeners
        .into_iter()
        .enumerate()
        .map(|(id, listener)| {
            let shared = shared.clone();
            let ingest = ingest.take().map(Box::new);
            std::thread::Builder::new()
                .name(format!("herald-w{id}"))
                .spawn(move || {
                    let cpu = affinity::pin(id);
                    tracing::info!(worker = id, cpu, backend = backend.name(), "worker started");
                    let r = match backend {
                        Backend::Uring => uring::run(id, shared.clone(), listener, ingest),
                        Backend::Epoll => epoll::run(id, shared.clone(), listener, ingest),
                    };
                    if let Err(e) = &r {
                        tracing::error!(worker = id, error = %e, "worker failed");
                        // One worker down means its connections are gone: stop the rest too.
                        shared
                            .stop
                            .store(true, std::sync::atomic::Ordering::Release);
                        shared.hub.wake_all();
                    }
                    r
                })
        })
        .collect()
}
