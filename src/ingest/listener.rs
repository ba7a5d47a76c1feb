//! The ingest thread: NDJSON publishers over TCP (`--ingest`) and a Unix socket
//! (`--ingest-unix`). Each valid line is published through the hub; a bad line gets
//! `{"error":...,"line":N}` back and is skipped; a publisher that half-closes gets every
//! reply before the server closes. Publishing never waits on subscribers, only (rarely)
//! on a worker whose inbox is full. The thread also ages out topic history once a second.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use super::ndjson::{error_reply, parse_line, Command, Framed, LineError, LineFramer};
use crate::fanout::bus::Hub;

const TCP: Token = Token(usize::MAX - 1);
const UNIX: Token = Token(usize::MAX - 2);
const WAKER: Token = Token(usize::MAX - 3);
/// Unanswered reply bytes per publisher before we stop reading its lines.
const MAX_PENDING_REPLIES: usize = 1 << 20;

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
}

struct Publisher {
    stream: Stream,
    framer: LineFramer,
    out: VecDeque<u8>,
    eof: bool,
    max_line: usize,
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
pub fn spawn(hub: Arc<crate::core::Shared>, sockets: IngestSockets) -> io::Result<IngestHandle> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let stop = Arc::new(AtomicBool::new(false));
    let max_line = hub.config.max_event + 4096;
    let stop2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name("herald-ingest".into())
        .spawn(move || run(poll, &hub.hub, sockets, &stop2, max_line))?;
    Ok(IngestHandle {
        stop,
        waker,
        thread: Some(thread),
    })
}

fn run(
    mut poll: Poll,
    hub: &Hub,
    sockets: IngestSockets,
    stop: &AtomicBool,
    max_line: usize,
) -> io::Result<()> {
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
    let mut pubs: Slab<Publisher> = Slab::new();
    let mut events = Events::with_capacity(256);
    let mut buf = vec![0u8; 64 << 10];
    let mut janitor_at = Instant::now() + Duration::from_secs(1);
    loop {
        match poll.poll(&mut events, Some(Duration::from_millis(500))) {
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
                            Ok((s, _)) => add(&poll, &mut pubs, Stream::Tcp(s), max_line)?,
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
                            Ok((s, _)) => add(&poll, &mut pubs, Stream::Unix(s), max_line)?,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) => {
                                tracing::warn!(error = %e, "ingest accept failed");
                                break;
                            }
                        }
                    }
                }
                Token(k) => {
                    if pubs.contains(k) && !serve(hub, &mut pubs[k], &mut buf) {
                        let mut p = pubs.remove(k);
                        let _ = poll.registry().deregister(p.stream.source());
                    }
                }
            }
        }
        if Instant::now() >= janitor_at {
            hub.janitor();
            janitor_at = Instant::now() + Duration::from_secs(1);
        }
        if stop.load(Ordering::Acquire) {
            // Stop accepting; publishers already connected get their pending lines handled.
            if let Some(mut l) = tcp.take() {
                let _ = poll.registry().deregister(&mut l);
            }
            if let Some((mut l, path)) = unix.take() {
                let _ = poll.registry().deregister(&mut l);
                let _ = std::fs::remove_file(path);
            }
            let keys: Vec<usize> = pubs.iter().map(|(k, _)| k).collect();
            for k in keys {
                serve(hub, &mut pubs[k], &mut buf);
                let mut p = pubs.remove(k);
                let _ = flush(&mut p);
                let _ = poll.registry().deregister(p.stream.source());
            }
            tracing::info!("ingest stopped");
            return Ok(());
        }
    }
}

fn add(
    poll: &Poll,
    pubs: &mut Slab<Publisher>,
    mut stream: Stream,
    max_line: usize,
) -> io::Result<()> {
    let entry = pubs.vacant_entry();
    poll.registry().register(
        stream.source(),
        Token(entry.key()),
        Interest::READABLE | Interest::WRITABLE,
    )?;
    entry.insert(Publisher {
        stream,
        framer: LineFramer::new(max_line),
        out: VecDeque::new(),
        eof: false,
        max_line,
    });
    Ok(())
}

/// Read, publish, reply. Returns false when the publisher is finished.
fn serve(hub: &Hub, p: &mut Publisher, buf: &mut [u8]) -> bool {
    let max_line = p.max_line;
    while !p.eof && p.out.len() < MAX_PENDING_REPLIES {
        match p.stream.read(buf) {
            Ok(0) => p.eof = true,
            Ok(n) => {
                p.framer.push(&buf[..n]);
                while let Some(f) = p.framer.next_line() {
                    handle_line(hub, f, &mut p.out, max_line);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    if p.eof {
        if let Some(f) = p.framer.finish() {
            handle_line(hub, f, &mut p.out, max_line);
        }
    }
    match flush(p) {
        Ok(()) => !(p.eof && p.out.is_empty()),
        Err(_) => false,
    }
}

fn handle_line(hub: &Hub, f: Framed<'_>, out: &mut VecDeque<u8>, max_line: usize) {
    let (no, result) = match f {
        Framed::Line { no, line } => (no, parse_line(line)),
        Framed::TooLong { no } => (no, Err(LineError::LineTooLong { max: max_line })),
    };
    let err = match result {
        Ok(Command::Publish(p)) => hub.publish(p).err().map(LineError::Invalid),
        Ok(Command::CloseTopic(t)) => {
            hub.close_topic(&t);
            None
        }
        Err(e) => Some(e),
    };
    if let Some(e) = err {
        tracing::debug!(line = no, error = %e, "ingest line refused");
        out.extend(error_reply(&e, no));
    }
}

fn flush(p: &mut Publisher) -> io::Result<()> {
    while !p.out.is_empty() {
        let (a, _) = p.out.as_slices();
        match p.stream.write(a) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                p.out.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
