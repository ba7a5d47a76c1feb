//! herald: a Server-Sent Events fan-out engine. One event in, encoded once, pushed to
//! every subscriber by one pinned worker per core over io_uring (or epoll).
//!
//! [`start`] runs a server and returns a handle; `herald serve`, the integration tests
//! and the bench all go through it.
#![deny(unsafe_code, unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

pub mod access_log;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod core;
pub mod engine;
pub mod fanout;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod sse;
pub mod timer;
pub mod tls;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::core::Shared;
pub use config::{BackendChoice, Config};
use engine::Backend;
use ingest::listener::{Ingest, IngestSockets};

/// A running herald.
pub struct Server {
    shared: Arc<Shared>,
    /// The JWKS fetcher, with `--auth-jwks-url`.
    jwks: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<io::Result<()>>>,
    /// Told by the worker hosting ingest once it has stopped (or dropped when it exits).
    ingest_done: Option<std::sync::mpsc::Receiver<()>>,
    /// Where subscribers connect (the real port when 0 was asked for): the plaintext
    /// listener, or the TLS one with `--listen off`.
    pub listen_addr: SocketAddr,
    /// Where TLS subscribers connect, with `--tls-listen`.
    pub tls_addr: Option<SocketAddr>,
    /// Where NDJSON publishers connect, if TCP ingest is on.
    pub ingest_addr: Option<SocketAddr>,
    pub backend: Backend,
}

/// Bind every socket, choose the backend and start the workers (the first also serves
/// ingest).
pub fn start(config: Config) -> io::Result<Server> {
    let (backend, why) = engine::choose(config.backend).map_err(io::Error::other)?;
    tracing::info!(backend = backend.name(), reason = %why, "backend chosen");
    match engine::sys::raise_nofile_limit() {
        Ok(n) => tracing::info!(nofile = n, "open-files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot read the open-files limit"),
    }
    let tls = match config.tls_listen {
        Some(_) => Some(
            tls::Tls::new(&config.tls_certs, config.ktls, config.hsts)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("TLS: {e}")))?,
        ),
        None => None,
    };
    let plain = config
        .listen
        .map(|a| engine::bind_listeners(a, config.workers))
        .transpose()?;
    let secure = config
        .tls_listen
        .map(|a| engine::bind_listeners(a, config.workers))
        .transpose()?;
    let plain_addr = plain.as_ref().map(|l| l[0].local_addr()).transpose()?;
    let tls_addr = secure.as_ref().map(|l| l[0].local_addr()).transpose()?;
    if let Some(addr) = plain_addr {
        tracing::info!(addr = %addr, workers = config.workers, "listening for subscribers");
    }
    if let Some(addr) = tls_addr {
        tracing::info!(addr = %addr, workers = config.workers, certificates = config.tls_certs.len(), "listening for TLS subscribers");
    }
    let listen_addr = plain_addr.or(tls_addr).expect("config requires a listener");
    let listeners = engine::worker_listeners(plain, secure, config.workers);
    let sockets = IngestSockets::bind(
        config.ingest,
        config.ingest_unix.as_ref(),
        config.ingest_unix_mode,
    )?;
    let ingest_addr = sockets.tcp.as_ref().map(|l| l.local_addr()).transpose()?;
    let auth = auth::Auth::new(&config.auth)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("auth: {e}")))?
        .map(Arc::new);
    let access_log = config
        .access_log
        .as_ref()
        .map(access_log::AccessLog::start)
        .transpose()
        .map_err(|e| io::Error::new(e.kind(), format!("access log: {e}")))?;
    let cluster = config
        .cluster_config()
        .map(|c| cluster::Cluster::new(&c, config.history_age))
        .transpose()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?
        .map(Arc::new);
    let shared = Shared::with_all(config, tls, auth, access_log, cluster);
    let jwks = shared.auth.as_ref().and_then(|a| {
        let s = shared.clone();
        a.spawn_jwks(Box::new(move || s.hub.wake_all()))
    });
    let history_file = shared
        .config
        .history_file
        .as_ref()
        .filter(|_| shared.cluster.is_none());
    if shared.cluster.is_some() && shared.config.history_file.is_some() {
        tracing::warn!("--history-file is not used with --cluster: history comes from redis");
    }
    if let Some(path) = history_file {
        match shared.hub.load_history(path) {
            Ok(n) => tracing::info!(path = %path.display(), events = n, "history loaded"),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "history file unreadable; starting empty")
            }
        }
    }
    if let Some(c) = shared.cluster.as_ref() {
        tracing::info!(redis = %c.endpoint, prefix = %shared.config.cluster_prefix, "cluster: publishing and reading through redis");
        let start = c.catch_up(&shared);
        c.spawn(&shared, start)?;
    }
    let (done, ingest_done) = std::sync::mpsc::channel();
    let ingest = Ingest::new(shared.clone(), sockets, done)?;
    // With --cluster a publish waits on Redis: ingest gets a thread of its own, so no
    // worker ever waits on it.
    let ingest = match shared.cluster {
        Some(_) => {
            std::thread::Builder::new()
                .name("herald-ingest".into())
                .spawn(move || ingest.run_alone())?;
            None
        }
        None => Some(ingest),
    };
    let workers = engine::spawn_workers(&shared, backend, listeners, ingest)?;
    Ok(Server {
        shared,
        jwks,
        workers,
        ingest_done: Some(ingest_done),
        listen_addr,
        tls_addr,
        ingest_addr,
        backend,
    })
}

impl Server {
    /// Whether a worker has stopped on its own (an error, or shutdown has begun).
    pub fn is_stopping(&self) -> bool {
        self.shared.stop.load(Ordering::Acquire)
    }

    /// SIGHUP for the access log: reopen its file (after a rotation).
    pub fn reopen_access_log(&self) {
        if let Some(log) = self.shared.access_log.as_ref() {
            log.reopen();
        }
    }

    /// Read the TLS certificates and keys again (SIGHUP). New handshakes use them; open
    /// connections keep theirs. On an error the old ones stay in use.
    pub fn reload_tls(&self) -> Result<usize, String> {
        match self.shared.tls.as_ref() {
            Some(t) => t.certs.reload(),
            None => Err("TLS is not configured".into()),
        }
    }

    /// Graceful stop: ingest first (everything acknowledged is already in the workers'
    /// inboxes), then the workers drain their streams. Returns the first error seen.
    pub fn shutdown(mut self) -> io::Result<()> {
        tracing::info!("shutting down");
        let mut result = Ok(());
        if let Some(done) = self.ingest_done.take() {
            self.shared.ingest_stop.store(true, Ordering::Release);
            self.shared.hub.inbox(0).wake();
            // An error if the host worker exited first: its ingest went with it.
            let _ = done.recv();
        }
        // Then the Redis reader: the workers flush what it has handed them.
        if let Some(c) = self.shared.cluster.as_ref() {
            c.stop();
        }
        self.shared.stop.store(true, Ordering::Release);
        self.shared.hub.wake_all();
        for w in self.workers.drain(..) {
            let r = w
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("worker panicked")));
            if result.is_ok() {
                result = r;
            }
        }
        if let Some(auth) = self.shared.auth.as_ref() {
            auth.stop();
        }
        if let Some(t) = self.jwks.take() {
            let _ = t.join();
        }
        if let Some(log) = self.shared.access_log.as_ref() {
            log.finish();
        }
        let history_file = self
            .shared
            .config
            .history_file
            .as_ref()
            .filter(|_| self.shared.cluster.is_none());
        if let Some(path) = history_file {
            match self.shared.hub.save_history(path) {
                Ok(n) => tracing::info!(path = %path.display(), events = n, "history saved"),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "saving history failed");
                    if result.is_ok() {
                        result = Err(e);
                    }
                }
            }
        }
        tracing::info!("stopped");
        result
    }
}
