//! A hand-driven backend for the core's unit tests, in the spirit of quinn-proto's test
//! `Pair`: the test feeds requests and completions ("a send of N bytes completed", "the
//! socket is full", "time advanced") and reads back exactly what the core asked the backend
//! to write. A write the core starts is copied into the peer's `inflight` and reaches its
//! `out` only when the test completes it, so every interleaving can be staged.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{ConnId, Core, Shared, MAX_IOVECS};
use crate::config::Config;
use crate::fanout::bus::Published;
use crate::sse::event::Publish;
use crate::tls::record::kernel_model::KernelModel;

/// The far end of one connection, as the fake backend sees it.
#[derive(Debug, Default)]
pub struct Peer {
    /// Bytes that reached the client.
    pub out: Vec<u8>,
    /// The write the core started and the test has not completed yet.
    pub inflight: Option<Vec<u8>>,
    /// Its record type, if it is one of herald's own records on a kernel-TLS socket.
    pub inflight_type: Option<u8>,
    /// Kernel TLS: the model of the kernel sealing what this socket sends, once the core
    /// installed keys on it.
    pub kernel: Option<KernelModel>,
}

pub struct Harness {
    pub core: Core<Peer>,
    pub shared: Arc<Shared>,
    pub now: Instant,
    /// Connections the core closed and released, with what their client received.
    pub closed: Vec<(ConnId, Peer)>,
    /// Kernel TLS: refuse the key installs the core asks for (as a kernel might).
    pub refuse_ktls: bool,
}

impl Harness {
    /// One worker with `config` (workers forced to 1), its clock at an arbitrary start.
    pub fn new(tweak: impl FnOnce(&mut Config)) -> Harness {
        let mut config = Config {
            workers: 1,
            ..Config::default()
        };
        tweak(&mut config);
        config.workers = 1;
        Harness::with_shared(Shared::new(config))
    }

    /// One worker that also serves TLS with `tls` (its `mode` as the test set it).
    pub fn with_tls(tweak: impl FnOnce(&mut Config), tls: crate::tls::Tls) -> Harness {
        let mut config = Config {
            workers: 1,
            ..Config::default()
        };
        tweak(&mut config);
        config.workers = 1;
        Harness::with_shared(Shared::with_tls(config, Some(tls)))
    }

    fn with_shared(shared: Arc<Shared>) -> Harness {
        let now = Instant::now();
        Harness {
            core: Core::new(0, shared.clone(), now),
            shared,
            now,
            closed: Vec::new(),
            refuse_ktls: false,
        }
    }

    /// A client connects to the TLS listener from loopback.
    pub fn connect_tls(&mut self) -> ConnId {
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        self.core.handle_accept(Peer::default(), Some(ip), true)
    }

    /// A client connects from loopback (allowed to publish by default).
    pub fn connect(&mut self) -> ConnId {
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        self.core.handle_accept(Peer::default(), Some(ip), false)
    }

    /// The client sends `bytes` (one read).
    pub fn send(&mut self, c: ConnId, bytes: &[u8]) {
        let _ = self.core.handle_read(c, bytes);
    }

    /// The client shuts down its sending side.
    pub fn eof(&mut self, c: ConnId) {
        self.core.handle_eof(c);
    }

    /// Publish through the hub, as ingest would.
    pub fn publish(&mut self, topic: &str, data: &str, retry: Option<u32>) -> Published {
        self.shared
            .hub
            .try_publish(&Publish {
                topic: topic.into(),
                data: data.into(),
                event: None,
                id: None,
                retry,
            })
            .expect("valid publish")
    }

    pub fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    /// Ask for shutdown; the next `turn` begins the drain.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
    }

    /// One backend loop turn: clock, inbox, timers, drain start, then a write started on
    /// every ready connection (left in flight), then closes.
    pub fn turn(&mut self) {
        self.core.set_now(self.now);
        self.core.drain_inbox();
        self.core.handle_tick();
        if self.core.stop_requested() {
            self.core.begin_drain();
        }
        let mut ready = Vec::new();
        self.core.take_ready(&mut ready);
        for c in ready {
            if !self.core.begin_write(c) {
                continue;
            }
            let mut iov = [std::io::IoSlice::new(&[]); MAX_IOVECS];
            let (n, _) = self.core.fill(c, &mut iov);
            let bytes: Vec<u8> = iov[..n].iter().flat_map(|s| s.iter().copied()).collect();
            let typ = self.core.ktls_record_type(c);
            let peer = &mut self.core.conn_mut(c).expect("ready conn exists").handle;
            assert!(peer.inflight.is_none(), "two writes in flight on {c}");
            assert!(
                typ.is_none() || peer.kernel.is_some(),
                "a typed record on a socket without kernel TLS"
            );
            peer.inflight = Some(bytes);
            peer.inflight_type = typ;
        }
        // Kernel TLS: install what the core hands over, as the backends do after writes.
        let mut due = Vec::new();
        self.core.take_ktls_installs(&mut due);
        for (c, keys, _ulp) in due {
            let peer = &mut self.core.conn_mut(c).expect("conn exists").handle;
            assert!(
                peer.inflight.is_none(),
                "keys installed under a write in flight"
            );
            if !self.refuse_ktls {
                peer.kernel = Some(KernelModel::install(keys.as_bytes()));
            }
            self.core.ktls_installed(c, !self.refuse_ktls);
        }
        self.reap_closes();
    }

    /// Close what the core asked to close. A write still in flight is cancelled first
    /// (its bytes never arrive), as the uring backend does.
    fn reap_closes(&mut self) {
        let mut closing = Vec::new();
        self.core.take_closing(&mut closing);
        for c in closing {
            if let Some(mut peer) = self.core.release(c) {
                peer.inflight = None;
                self.closed.push((c, peer));
            }
        }
    }

    /// Bytes of the write in flight on `c` (0 if none).
    pub fn inflight_len(&self, c: ConnId) -> usize {
        self.core
            .conn(c)
            .and_then(|cn| cn.handle.inflight.as_ref())
            .map_or(0, Vec::len)
    }

    /// The write in flight on `c` completes having sent its first `n` bytes (a short send
    /// when `n` is less than its length).
    pub fn complete(&mut self, c: ConnId, n: usize) {
        self.end_write(c, n, true);
    }

    /// epoll's view of the same write: `n` bytes went out and the socket is now full, so
    /// the connection waits for writability.
    pub fn block(&mut self, c: ConnId, n: usize) {
        self.end_write(c, n, false);
    }

    /// The first `n` bytes of the write in flight reach the client; `done` as in
    /// [`Core::handle_written`].
    fn end_write(&mut self, c: ConnId, n: usize, done: bool) {
        let conn = self.core.conn_mut(c).expect("conn exists");
        let bytes = conn.handle.inflight.take().expect("a write in flight");
        let n = n.min(bytes.len());
        let peer = &mut conn.handle;
        match peer.kernel.as_mut() {
            // The kernel seals what the socket took, as records of at most 16 KiB.
            Some(k) => {
                let typ = peer.inflight_type.take().unwrap_or(23);
                for rec in bytes[..n].chunks(16 << 10) {
                    k.seal(typ, rec, &mut peer.out);
                }
            }
            None => peer.out.extend_from_slice(&bytes[..n]),
        }
        self.core.handle_written(c, n, done);
        self.reap_closes();
    }

    /// The socket of a blocked connection has room again (epoll).
    pub fn writable(&mut self, c: ConnId) {
        self.core.handle_writable(c);
    }

    /// Turn and complete every write in full until nothing is in flight or ready.
    pub fn settle(&mut self) {
        for _ in 0..10_000 {
            self.turn();
            let busy: Vec<ConnId> = self
                .core
                .iter_ids()
                .into_iter()
                .filter(|&c| self.inflight_len(c) > 0)
                .collect();
            if busy.is_empty() && !self.core.has_work() {
                return;
            }
            for c in busy {
                self.complete(c, usize::MAX);
            }
        }
        panic!("the core never settled");
    }

    /// Everything client `c` received, whether it is still open or was closed.
    pub fn output(&self, c: ConnId) -> &[u8] {
        match self.core.conn(c) {
            Some(cn) => &cn.handle.out,
            None => self
                .closed
                .iter()
                .rev()
                .find(|(k, _)| *k == c)
                .map(|(_, p)| p.out.as_slice())
                .unwrap_or(&[]),
        }
    }

    pub fn is_open(&self, c: ConnId) -> bool {
        self.core.conn(c).is_some()
    }
}

/// A stream as a strict client reads it: the response head, the body with its chunk
/// framing undone (every size line, CRLF and the last chunk checked), and whether the
/// last chunk came. Any framing error is an `Err` naming the offset.
#[derive(Debug)]
pub struct Stream {
    #[allow(dead_code)] // for a test's failure message
    pub head: String,
    pub body: Vec<u8>,
    pub ended: bool,
}

pub fn parse_chunked_stream(raw: &[u8]) -> Result<Stream, String> {
    let end = find(raw, b"\r\n\r\n").ok_or("no complete response head")?;
    let head = String::from_utf8(raw[..end].to_vec()).map_err(|e| e.to_string())?;
    let mut rest = &raw[end + 4..];
    let mut body = Vec::new();
    let mut at = end + 4;
    loop {
        if rest.is_empty() {
            return Ok(Stream {
                head,
                body,
                ended: false,
            });
        }
        let eol = find(rest, b"\r\n").ok_or(format!("unterminated chunk size at {at}"))?;
        let line = std::str::from_utf8(&rest[..eol]).map_err(|_| format!("binary size at {at}"))?;
        let size = usize::from_str_radix(line, 16)
            .map_err(|_| format!("bad chunk size {line:?} at {at}"))?;
        if size == 0 {
            if &rest[eol..] != b"\r\n\r\n" {
                return Err(format!("bytes after the last chunk at {at}"));
            }
            return Ok(Stream {
                head,
                body,
                ended: true,
            });
        }
        let data_end = eol + 2 + size;
        if rest.len() < data_end + 2 {
            return Err(format!("chunk of {size} cut short at {at}"));
        }
        if &rest[data_end..data_end + 2] != b"\r\n" {
            return Err(format!("chunk of {size} not followed by CRLF at {at}"));
        }
        body.extend_from_slice(&rest[eol + 2..data_end]);
        at += data_end + 2;
        rest = &rest[data_end + 2..];
    }
}

/// SSE blocks of a body (the text between blank lines), each as its lines.
pub fn sse_blocks(body: &[u8]) -> Vec<Vec<String>> {
    let text = std::str::from_utf8(body).expect("UTF-8 event stream");
    text.split("\n\n")
        .filter(|b| !b.is_empty())
        .map(|b| b.lines().map(str::to_string).collect())
        .collect()
}

/// The `data:` of every event in a body, in order.
pub fn event_data(body: &[u8]) -> Vec<String> {
    sse_blocks(body)
        .iter()
        .filter(|b| b.iter().any(|l| l.starts_with("data:")))
        .map(|b| {
            b.iter()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect()
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}
