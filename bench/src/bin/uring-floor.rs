//! `uring-floor`: the kernel floor for SSE fan-out. One pinned thread per worker with its
//! own io_uring and SO_REUSEPORT listener: accept, read one request head, answer a fixed
//! chunked `text/event-stream` head, then for every NDJSON line arriving on the ingest
//! socket build one chunk-framed frame `id: k\ndata: ..\n\n` once and SEND that one shared
//! buffer to every connection, one SQE each, batched. Nothing else: no parsing beyond the
//! head terminator, no timers, no per-connection queues; a peer that left is noticed
//! only by a failed SEND. Start a fresh instance per run: fds are not generation-tagged.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread;

use anyhow::{Context, Result};
use clap::Parser;
use herald_bench::floor_frame;
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use socket2::{Domain, Protocol, Socket, Type};

/// Bytes kept per connection while its request head arrives; freed once it has.
const HEAD_BUF: usize = 2048;
const SQ_ENTRIES: u32 = 4096;
const CQ_ENTRIES: u32 = 16384;
static RESPONSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n9\r\n: floor\n\n\r\n";

const KIND_ACCEPT: u64 = 1;
const KIND_RECV: u64 = 2;
const KIND_HEAD: u64 = 3;
const KIND_FRAME: u64 = 4;
const KIND_WAKE: u64 = 5;

/// Bare io_uring SSE fan-out: the floor herald is measured against.
#[derive(Parser, Debug)]
#[command(name = "uring-floor", version)]
struct Opt {
    /// Address for subscribers (any request path is accepted).
    #[arg(long, default_value = "127.0.0.1:8082")]
    listen: SocketAddr,
    /// NDJSON ingest address: lines {"topic":"t","data":"..."} (topic ignored: every
    /// event goes to every connection).
    #[arg(long, default_value = "127.0.0.1:7072")]
    ingest: SocketAddr,
    /// Connections to keep open at most (over all workers); further ones are closed at once.
    #[arg(long, default_value_t = 10_000)]
    subscribers: usize,
    /// Worker threads, each pinned to CPU i with its own ring and listener.
    #[arg(long, default_value_t = 1)]
    workers: usize,
}

/// kind (8 bits) | frame slot (24 bits) | connection index (32 bits).
fn user_data(kind: u64, slot: u64, idx: u64) -> u64 {
    kind << 56 | (slot & 0xff_ffff) << 32 | idx
}

/// Pin the calling thread to one CPU.
fn pin(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set, and the pointer
    // passed to sched_setaffinity is to that live local.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// One frame being sent: the buffer and how many SENDs still reference it.
struct Frame {
    bytes: Arc<Vec<u8>>,
    outstanding: u32,
}

struct Conn {
    fd: OwnedFd,
    /// Request head bytes while waiting for `\r\n\r\n`; `None` once streaming.
    head: Option<Box<[u8; HEAD_BUF]>>,
    head_len: usize,
    /// Position in `Worker::streaming` once the response head is sent.
    pos: Option<usize>,
}

struct Worker {
    ring: IoUring,
    listener: TcpListener,
    conns: Vec<Option<Conn>>,
    streaming: Vec<u32>,
    frames: Vec<Option<Frame>>,
    free_frames: Vec<u32>,
    wake_fd: OwnedFd,
    wake_buf: Box<u64>,
    rx: Receiver<Arc<Vec<u8>>>,
    limit: usize,
    /// Open connections over all workers.
    open: Arc<AtomicU64>,
    short_sends: u64,
    send_errors: u64,
}

impl Worker {
    /// Queue an SQE, submitting (and reaping) first when the SQ is full.
    ///
    /// # Safety
    /// Every buffer `sqe` points at must stay alive and unmoved until its CQE is reaped.
    unsafe fn push(&mut self, sqe: &squeue::Entry) -> Result<()> {
        loop {
            // SAFETY: forwarded from this function's contract.
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
            self.reap()?;
        }
    }

    fn arm_accept(&mut self) -> Result<()> {
        let sqe = opcode::AcceptMulti::new(types::Fd(self.listener.as_raw_fd()))
            .build()
            .user_data(user_data(KIND_ACCEPT, 0, 0));
        // SAFETY: multishot accept points at no buffer; the listener lives as long as the worker.
        unsafe { self.push(&sqe) }
    }

    fn arm_wake(&mut self) -> Result<()> {
        let ptr = (&mut *self.wake_buf as *mut u64).cast::<u8>();
        let sqe = opcode::Read::new(types::Fd(self.wake_fd.as_raw_fd()), ptr, 8)
            .build()
            .user_data(user_data(KIND_WAKE, 0, 0));
        // SAFETY: `wake_buf` is a Box owned by the worker for its whole life; at most one
        // read is in flight on it (re-armed only from its own CQE).
        unsafe { self.push(&sqe) }
    }

    fn arm_recv(&mut self, idx: usize) -> Result<()> {
        let Some(c) = self.conns[idx].as_mut() else {
            return Ok(());
        };
        let Some(buf) = c.head.as_mut() else {
            return Ok(());
        };
        let off = c.head_len;
        let ptr = buf[off..].as_mut_ptr();
        let sqe = opcode::Recv::new(types::Fd(c.fd.as_raw_fd()), ptr, (HEAD_BUF - off) as u32)
            .build()
            .user_data(user_data(KIND_RECV, 0, idx as u64));
        // SAFETY: the head buffer is boxed in the connection and only dropped from the
        // RECV CQE handler (one RECV in flight per connection), so it outlives the op.
        unsafe { self.push(&sqe) }
    }

    fn run(&mut self) -> Result<()> {
        self.arm_accept()?;
        self.arm_wake()?;
        loop {
            self.ring.submit_and_wait(1)?;
            self.reap()?;
        }
    }

    fn reap(&mut self) -> Result<()> {
        loop {
            let batch: Vec<cqueue::Entry> = self.ring.completion().take(1024).collect();
            if batch.is_empty() {
                return Ok(());
            }
            for cqe in batch {
                self.handle(cqe)?;
            }
        }
    }

    fn handle(&mut self, cqe: cqueue::Entry) -> Result<()> {
        let ud = cqe.user_data();
        let (kind, slot, idx) = (
            ud >> 56,
            ((ud >> 32) & 0xff_ffff) as usize,
            (ud & 0xffff_ffff) as usize,
        );
        let res = cqe.result();
        match kind {
            KIND_ACCEPT => {
                if res >= 0 {
                    // SAFETY: a successful accept CQE carries a new fd that nobody else owns.
                    let fd = unsafe { OwnedFd::from_raw_fd(res as RawFd) };
                    if self.open.fetch_add(1, Ordering::Relaxed) as usize >= self.limit {
                        self.open.fetch_sub(1, Ordering::Relaxed);
                        drop(fd);
                    } else {
                        self.add_conn(fd)?;
                    }
                }
                if !cqueue::more(cqe.flags()) {
                    self.arm_accept()?;
                }
            }
            KIND_RECV => self.handle_recv(idx, res)?,
            KIND_HEAD => {
                if res as usize == RESPONSE_HEAD.len() {
                    if let Some(c) = self.conns[idx].as_mut() {
                        c.pos = Some(self.streaming.len());
                        self.streaming.push(idx as u32);
                    }
                } else {
                    self.close(idx);
                }
            }
            KIND_FRAME => {
                if res < 0 {
                    // The peer is gone (EPIPE/ECONNRESET): the only disconnect detection.
                    self.send_errors += 1;
                    if self.send_errors.is_power_of_two() {
                        eprintln!(
                            "uring-floor: {} failed sends (peers gone)",
                            self.send_errors
                        );
                    }
                    self.close(idx);
                } else if let Some(f) = self.frames[slot].as_ref() {
                    if (res as usize) < f.bytes.len() {
                        self.short_sends += 1;
                        if self.short_sends.is_power_of_two() {
                            eprintln!(
                                "uring-floor: {} short sends (stream corrupted)",
                                self.short_sends
                            );
                        }
                    }
                }
                self.release(slot);
            }
            KIND_WAKE => {
                self.arm_wake()?;
                while let Ok(frame) = self.rx.try_recv() {
                    self.fan_out(frame)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Drop a connection (closing its fd); in-flight SENDs on it fail harmlessly.
    fn close(&mut self, idx: usize) {
        // `streaming` is compacted at the next fan-out, never while one is being pushed.
        if self.conns[idx].take().is_some() {
            self.open.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn add_conn(&mut self, fd: OwnedFd) -> Result<()> {
        let idx = self
            .conns
            .iter()
            .position(Option::is_none)
            .unwrap_or_else(|| {
                self.conns.push(None);
                self.conns.len() - 1
            });
        self.conns[idx] = Some(Conn {
            fd,
            head: Some(Box::new([0; HEAD_BUF])),
            head_len: 0,
            pos: None,
        });
        self.arm_recv(idx)
    }

    fn handle_recv(&mut self, idx: usize, res: i32) -> Result<()> {
        let Some(c) = self.conns[idx].as_mut() else {
            return Ok(());
        };
        if res <= 0 {
            self.close(idx);
            return Ok(());
        }
        c.head_len += res as usize;
        let buf = c.head.as_ref().map_or(&[][..], |b| &b[..c.head_len]);
        if !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            if c.head_len == HEAD_BUF {
                self.close(idx);
                return Ok(());
            }
            return self.arm_recv(idx);
        }
        c.head = None;
        let sqe = opcode::Send::new(
            types::Fd(c.fd.as_raw_fd()),
            RESPONSE_HEAD.as_ptr(),
            RESPONSE_HEAD.len() as u32,
        )
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(user_data(KIND_HEAD, 0, idx as u64));
        // SAFETY: RESPONSE_HEAD is 'static.
        unsafe { self.push(&sqe) }
    }

    /// One SEND SQE per streaming connection, all pointing at the same buffer.
    fn fan_out(&mut self, bytes: Arc<Vec<u8>>) -> Result<()> {
        // Connections closed since the last event leave holes; compact once per event.
        self.streaming.retain(|&i| self.conns[i as usize].is_some());
        for (p, &i) in self.streaming.iter().enumerate() {
            if let Some(c) = self.conns[i as usize].as_mut() {
                c.pos = Some(p);
            }
        }
        if self.streaming.is_empty() {
            return Ok(());
        }
        let slot = self.free_frames.pop().map_or_else(
            || {
                self.frames.push(None);
                self.frames.len() - 1
            },
            |s| s as usize,
        );
        let (ptr, len) = (bytes.as_ptr(), bytes.len() as u32);
        // One guard reference while SQEs are pushed (CQEs may be reaped meanwhile).
        self.frames[slot] = Some(Frame {
            bytes,
            outstanding: 1,
        });
        for i in 0..self.streaming.len() {
            let idx = self.streaming[i] as usize;
            let Some(c) = self.conns[idx].as_ref() else {
                continue;
            };
            let sqe = opcode::Send::new(types::Fd(c.fd.as_raw_fd()), ptr, len)
                .flags(libc::MSG_NOSIGNAL | libc::MSG_WAITALL)
                .build()
                .user_data(user_data(KIND_FRAME, slot as u64, idx as u64));
            if let Some(f) = self.frames[slot].as_mut() {
                f.outstanding += 1;
            }
            // SAFETY: the frame's Arc sits in `frames[slot]` until its `outstanding`
            // count (the guard plus one per SEND pushed here) drops to zero, so the
            // buffer stays alive and unmoved (heap Vec, never mutated) until the last
            // SEND completes.
            unsafe { self.push(&sqe)? };
        }
        self.release(slot);
        Ok(())
    }

    /// Drop one reference to a frame; the last one frees the buffer.
    fn release(&mut self, slot: usize) {
        let done = match self.frames[slot].as_mut() {
            Some(f) => {
                f.outstanding -= 1;
                f.outstanding == 0
            }
            None => false,
        };
        if done {
            self.frames[slot] = None;
            self.free_frames.push(slot as u32);
        }
    }
}

fn listener(addr: SocketAddr) -> Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

#[derive(serde::Deserialize)]
struct Line {
    data: String,
}

/// Ingest: blocking reads on a plain thread; each frame is built once and handed to
/// every worker (channel + eventfd wake).
fn ingest(addr: SocketAddr, workers: Vec<(Sender<Arc<Vec<u8>>>, RawFd)>) -> Result<()> {
    let l = TcpListener::bind(addr).with_context(|| format!("ingest {addr}"))?;
    let workers = Arc::new(workers);
    let next_id = Arc::new(AtomicU64::new(1));
    for s in l.incoming() {
        let Ok(s) = s else { continue };
        let (workers, next_id) = (workers.clone(), next_id.clone());
        thread::spawn(move || {
            for line in BufReader::new(s).lines() {
                let Ok(line) = line else { break };
                let Ok(l) = serde_json::from_str::<Line>(&line) else {
                    continue;
                };
                let mut f = Vec::new();
                floor_frame(&mut f, next_id.fetch_add(1, Ordering::Relaxed), &l.data);
                let f = Arc::new(f);
                for (tx, efd) in workers.iter() {
                    let _ = tx.send(f.clone());
                    let one = 1u64;
                    // SAFETY: writes 8 bytes from a live local to an eventfd the worker keeps open.
                    unsafe { libc::write(*efd, (&one as *const u64).cast(), 8) };
                }
            }
        });
    }
    Ok(())
}

fn main() -> Result<()> {
    let opt = Opt::parse();
    herald_bench::procfs::raise_nofile();
    let open = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    let mut wakers = Vec::new();
    for w in 0..opt.workers.max(1) {
        // SAFETY: eventfd takes integer arguments only.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        anyhow::ensure!(efd >= 0, "eventfd: {}", std::io::Error::last_os_error());
        // SAFETY: `efd` is a fresh descriptor owned by nobody else.
        let wake_fd = unsafe { OwnedFd::from_raw_fd(efd) };
        let (tx, rx) = channel();
        wakers.push((tx, wake_fd.as_raw_fd()));
        let l = listener(opt.listen)?;
        let (limit, open) = (opt.subscribers, open.clone());
        let h =
            thread::Builder::new()
                .name(format!("floor-w{w}"))
                .spawn(move || -> Result<()> {
                    let ncpu = thread::available_parallelism().map_or(1, |n| n.get());
                    pin(w % ncpu);
                    let ring = IoUring::builder()
                        .setup_single_issuer()
                        .setup_defer_taskrun()
                        .setup_coop_taskrun()
                        .setup_taskrun_flag()
                        .setup_submit_all()
                        .setup_cqsize(CQ_ENTRIES)
                        .build(SQ_ENTRIES)?;
                    let mut wk = Worker {
                        ring,
                        listener: l,
                        conns: Vec::new(),
                        streaming: Vec::new(),
                        frames: Vec::new(),
                        free_frames: Vec::new(),
                        wake_fd,
                        wake_buf: Box::new(0),
                        rx,
                        limit,
                        open,
                        short_sends: 0,
                        send_errors: 0,
                    };
                    wk.run()
                })?;
        handles.push(h);
    }
    eprintln!(
        "uring-floor listening on {} (ingest {}), {} worker(s)",
        opt.listen, opt.ingest, opt.workers
    );
    // The eventfds stay owned by the workers; the ingest thread only writes to them.
    ingest(opt.ingest, wakers)?;
    for h in handles {
        h.join().map_err(|_| anyhow::anyhow!("worker panicked"))??;
    }
    Ok(())
}
