//! The io_uring backend: all io_uring code lives here. Connections are accepted straight
//! into a ring's fixed-file table (direct descriptors, so a process can hold more
//! connections than its fd limit), read with one multishot `RECV` each from a provided-buffer
//! ring (an idle subscriber holds no read buffer, and the recv's EOF tells us the peer
//! left), and written with at most one send in flight per connection (`SEND` for one frame,
//! `SENDMSG` for several) carrying every pending frame. SQEs are submitted in batches, once
//! per loop turn.
//!
//! A fixed-file table is capped by the open-files limit, so a worker owns one or more
//! *shards* (a ring, its table, its provided buffers) and opens another when the current
//! ones are full. The worker blocks on shard 0, which polls the eventfd every other shard
//! signals when it has completions.
//!
//! Memory the kernel may touch is owned here until its completion arrives: the iovec block
//! of a send (`SendBuf`, boxed, pooled), the accept address slots, the wake-up read buffer,
//! and the provided buffers. The frames a send points at are kept alive by the worker core:
//! a connection's cursor does not move, and its `pre` frames are not dropped, until the
//! send's completion; a closing connection stays subscribed until all its ops completed.
#![allow(unsafe_code)]

use std::alloc::{self, Layout};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::mem::ManuallyDrop;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::types::{BufRingEntry, CancelBuilder, Fd, Fixed, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring};

use super::{probe, sys};
use crate::core::{AcceptAction, ConnId, Core, Shared, MAX_IOVECS};
use crate::fanout::bus::Wake;
use crate::ingest::listener::Ingest;

/// Submission queue size (completion queue is 4x).
const SQ_ENTRIES: u32 = 4096;
/// Single-shot accepts kept armed per worker and listener, each with its own address
/// slot: listener `l` owns slots `l * ACCEPTS ..`.
const ACCEPTS: usize = 16;
/// Provided read buffers per worker: request heads are small and are consumed at once.
const BUF_COUNT: u16 = 256;
const BUF_SIZE: usize = 2048;
const BGID: u16 = 7;
/// Completions taken from a ring at a time.
const CQE_CHUNK: usize = 1024;
/// Iovec blocks kept for reuse; beyond this a burst's blocks are freed when it is over.
const SEND_POOL_MAX: usize = 1024;
/// How long a worker's exit waits for cancelled operations to complete.
const TEARDOWN_WAIT: Duration = Duration::from_secs(2);
/// Largest fixed-file table (kernel cap).
const MAX_TABLE: u64 = 1 << 20;

/// `user_data`: op kind in the top byte, connection generation (24 bits), connection id.
mod op {
    pub const ACCEPT: u8 = 1;
    pub const RECV: u8 = 2;
    pub const SEND: u8 = 3;
    pub const CLOSE: u8 = 4;
    pub const WAKE: u8 = 5;
    pub const CANCEL: u8 = 6;
    /// Shard 0's poll on another shard's eventfd; the id is the shard index.
    pub const SHARD: u8 = 7;
    /// Shard 0's poll on the hosted ingest's epoll set.
    pub const INGEST: u8 = 8;
    /// Kernel TLS: attaching the `tls` ULP (linked to the `KTLS` that follows it).
    pub const KTLS_ULP: u8 = 9;
    /// Kernel TLS: installing the sending keys (`TLS_TX`).
    pub const KTLS: u8 = 10;
}

/// `setsockopt(TCP_ULP)`'s value for kernel TLS; static, so it outlives any SQE.
static TLS_ULP_NAME: [u8; 3] = *b"tls";

fn user_data(kind: u8, gen: u32, c: u32) -> u64 {
    (kind as u64) << 56 | ((gen & 0xff_ffff) as u64) << 32 | c as u64
}

fn split(ud: u64) -> (u8, u32, u32) {
    ((ud >> 56) as u8, ((ud >> 32) & 0xff_ffff) as u32, ud as u32)
}

/// The uring side of a connection (an h2 stream has the default one: no socket).
#[derive(Default)]
pub struct UConn {
    /// The shard (ring) whose fixed-file table holds it.
    shard: u16,
    /// Index in that table.
    slot: u32,
    /// Operations submitted whose final completion has not arrived.
    ops: u8,
    /// `RECV_ARMED` | `CLOSING` (one byte, so the record is 16 bytes, not 24).
    state: u8,
    /// The iovec block of the send in flight, if it has more than one frame.
    send: Option<Box<SendBuf>>,
}

/// `UConn::state`: a multishot recv is armed.
const RECV_ARMED: u8 = 1;
/// `UConn::state`: the close has started; nothing new is armed.
const CLOSING: u8 = 2;

impl UConn {
    fn closing(&self) -> bool {
        self.state & CLOSING != 0
    }
}

/// What a `SENDMSG` points at. Boxed so its address is stable while the kernel reads it.
struct SendBuf {
    iov: [libc::iovec; MAX_IOVECS],
    msg: libc::msghdr,
    /// The record type of a kernel-TLS connection's own record (`msg`'s control data).
    cmsg: super::sys::RecordTypeCmsg,
    /// Kernel TLS: the sending keys being installed (the block then carries no send),
    /// zeroed once the install completes.
    keys: [u8; 56],
}

impl SendBuf {
    fn new() -> Box<SendBuf> {
        Box::new(SendBuf {
            iov: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; MAX_IOVECS],
            // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
            msg: unsafe { std::mem::zeroed() },
            cmsg: super::sys::RecordTypeCmsg::new(),
            keys: [0; 56],
        })
    }
}

struct AcceptSlot {
    addr: libc::sockaddr_storage,
    len: libc::socklen_t,
    armed: bool,
}

/// A provided-buffer ring (IORING_REGISTER_PBUF_RING) and its buffers.
struct BufRing {
    ring: *mut BufRingEntry,
    layout: Layout,
    bufs: Box<[u8]>,
    tail: u16,
}

impl BufRing {
    fn new(uring: &IoUring) -> io::Result<BufRing> {
        let layout = Layout::from_size_align(
            BUF_COUNT as usize * std::mem::size_of::<BufRingEntry>(),
            4096,
        )
        .map_err(io::Error::other)?;
        // SAFETY: the layout has a non-zero size.
        let ring = unsafe { alloc::alloc_zeroed(layout) } as *mut BufRingEntry;
        if ring.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        let mut br = BufRing {
            ring,
            layout,
            bufs: vec![0u8; BUF_COUNT as usize * BUF_SIZE].into_boxed_slice(),
            tail: 0,
        };
        // SAFETY: `ring` is page-aligned, BUF_COUNT entries long, and lives until `Drop`,
        // which runs only after the ring was unregistered (see `Driver::finish`) or leaks it.
        unsafe {
            uring
                .submitter()
                .register_buf_ring_with_flags(ring as u64, BUF_COUNT, BGID, 0)?
        };
        for bid in 0..BUF_COUNT {
            br.recycle(bid);
        }
        Ok(br)
    }

    /// Hand buffer `bid` back to the kernel.
    fn recycle(&mut self, bid: u16) {
        let idx = (self.tail & (BUF_COUNT - 1)) as usize;
        // SAFETY: idx < BUF_COUNT, inside the allocation; the kernel reads entries only
        // up to the published tail, and this one is past it until the store below.
        let entry = unsafe { &mut *self.ring.add(idx) };
        entry.set_addr(self.bufs[bid as usize * BUF_SIZE..].as_ptr() as u64);
        entry.set_len(BUF_SIZE as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail field lives in the first entry of our allocation and is only
        // accessed atomically by the kernel; Release publishes the entry written above.
        unsafe {
            let tail = BufRingEntry::tail(self.ring) as *mut u16;
            AtomicU16::from_ptr(tail).store(self.tail, Ordering::Release);
        }
    }

    fn data(&self, bid: u16, len: usize) -> &[u8] {
        let start = bid as usize * BUF_SIZE;
        &self.bufs[start..start + len.min(BUF_SIZE)]
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; the kernel no longer uses it (the
        // ring was unregistered, or the driver leaked us instead of dropping).
        unsafe { alloc::dealloc(self.ring as *mut u8, self.layout) };
    }
}

struct EventfdWake(File);

impl Wake for EventfdWake {
    fn wake(&self) {
        if let Err(e) = (&self.0).write(&1u64.to_ne_bytes()) {
            if e.kind() != io::ErrorKind::WouldBlock {
                tracing::warn!(error = %e, "waking a worker failed");
            }
        }
    }
}

/// One ring and what is registered on it.
struct Shard {
    // Field order matters: the ring (and its registrations) goes before the memory it uses.
    ring: IoUring,
    bufs: BufRing,
    accepts: Box<[AcceptSlot]>,
    /// SQEs that did not fit in the submission queue, pushed first next time.
    backlog: VecDeque<squeue::Entry>,
    /// Connections whose descriptor lives in this table (until their CLOSE completes).
    open: u32,
    /// Shards other than 0: the eventfd registered with this ring, polled by shard 0.
    notify: Option<File>,
    notify_armed: bool,
}

impl Shard {
    fn new(table: u32, listeners: usize) -> io::Result<Shard> {
        let ring = probe::build_ring(SQ_ENTRIES)?;
        ring.submitter().register_files_sparse(table)?;
        let bufs = BufRing::new(&ring)?;
        Ok(Shard {
            ring,
            bufs,
            accepts: (0..ACCEPTS * listeners.max(1))
                .map(|_| AcceptSlot {
                    // SAFETY: sockaddr_storage is plain old data; zero is a valid value.
                    addr: unsafe { std::mem::zeroed() },
                    len: 0,
                    armed: false,
                })
                .collect(),
            backlog: VecDeque::new(),
            open: 0,
            notify: None,
            notify_armed: false,
        })
    }

    /// Push an SQE, spilling to the local backlog if the submission queue is full.
    ///
    /// # Safety
    ///
    /// Every pointer in `entry` (buffers, iovecs, `msghdr`, address slots) must stay valid
    /// and unmoved until the operation's final completion has been reaped: the kernel may
    /// read or write it at any time before that, including after a cancel.
    unsafe fn push(&mut self, entry: squeue::Entry) {
        if self.backlog.is_empty() {
            // SAFETY: the caller keeps what `entry` points at alive until its completion.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            // Full: hand the batch to the kernel and try once more.
            let _ = self.ring.submit();
            // SAFETY: as above.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
        }
        self.backlog.push_back(entry);
    }

    fn flush_backlog(&mut self) {
        while let Some(e) = self.backlog.pop_front() {
            // SAFETY: every backlog entry came through `push`, whose caller keeps its
            // memory alive until the completion, which cannot come before submission.
            if unsafe { self.ring.submission().push(&e) }.is_err() {
                self.backlog.push_front(e);
                break;
            }
        }
    }

    /// Submit queued SQEs and wait for `want` completions or `timeout`. With
    /// DEFER_TASKRUN this is also what runs the ring's completion work.
    fn submit(&mut self, want: usize, timeout: Duration) -> io::Result<()> {
        self.flush_backlog();
        let want = if self.backlog.is_empty() { want } else { 0 };
        let ts = Timespec::new()
            .sec(timeout.as_secs())
            .nsec(timeout.subsec_nanos());
        let args = SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(want, &args) {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

struct Driver {
    /// The rings and the memory registered with them. Dropped only by `Drop for Driver`
    /// after every operation completed, otherwise leaked (see `teardown`).
    shards: ManuallyDrop<Vec<Shard>>,
    /// The core holds the connections' iovec blocks and the frames sends point at: the
    /// same rule as `shards`.
    core: ManuallyDrop<Core<UConn>>,
    /// The worker's listeners (emptied when accepting stops) and, kept for the accepts
    /// still completing, which of them serve TLS.
    listeners: Vec<TcpListener>,
    listener_tls: Vec<bool>,
    /// Direct descriptors per shard.
    table: u32,
    max_shards: usize,
    efd: OwnedFd,
    /// The eventfd read target: the same rule as `shards`.
    wake_buf: ManuallyDrop<Box<u64>>,
    wake_armed: bool,
    /// Boxed on purpose: a block moves between this pool and a connection while the
    /// kernel may hold its address, so it must not live inline in a growable Vec.
    #[allow(clippy::vec_box)]
    send_pool: Vec<Box<SendBuf>>,
    /// Kernel-TLS key installs of this turn (reused).
    ktls_due: Vec<(ConnId, crate::tls::record::KernelKeys, bool)>,
    /// Connections whose multishot recv ended for lack of buffers: re-armed next turn.
    rearm: Vec<ConnId>,
    /// Accepts could not all be armed (paused, or every table full): try again when the
    /// core's pause is over or a slot frees.
    accept_stalled: bool,
    /// A TLS listener's accepts were held back at the handshake limit: armed again once a
    /// handshake ends.
    tls_accept_waiting: bool,
    cqes: Vec<(u64, i32, u32)>,
    /// The ingest loop, on the first worker until shutdown stops it.
    ingest: Option<Box<Ingest>>,
    ingest_armed: bool,
    ingest_readable: bool,
}

/// Run worker `id` on io_uring until shutdown has drained it.
pub fn run(
    id: usize,
    shared: Arc<Shared>,
    listeners: Vec<super::Listener>,
    ingest: Option<Box<Ingest>>,
) -> io::Result<()> {
    let nofile = sys::raise_nofile_limit().unwrap_or(1024);
    let table = shared
        .config
        .uring_table
        .map_or(nofile.min(MAX_TABLE) as u32, |t| t.min(nofile as u32));
    let listener_tls: Vec<bool> = listeners.iter().map(|l| l.tls).collect();
    let listeners: Vec<TcpListener> = listeners.into_iter().map(|l| l.socket).collect();
    let first = Shard::new(table, listeners.len())?;
    let efd = sys::eventfd()?;
    shared
        .hub
        .inbox(id)
        .set_waker(Box::new(EventfdWake(File::from(efd.try_clone()?))));
    tracing::info!(
        worker = id,
        direct_descriptors_per_ring = table,
        max_rings = shared.config.uring_rings,
        "io_uring ready"
    );
    let mut d = Driver {
        shards: ManuallyDrop::new(vec![first]),
        core: ManuallyDrop::new(Core::new(id, shared.clone(), Instant::now())),
        listeners,
        listener_tls,
        table,
        max_shards: shared.config.uring_rings,
        efd,
        wake_buf: ManuallyDrop::new(Box::new(0)),
        wake_armed: false,
        send_pool: Vec::new(),
        ktls_due: Vec::new(),
        rearm: Vec::new(),
        accept_stalled: false,
        tls_accept_waiting: false,
        cqes: Vec::with_capacity(CQE_CHUNK),
        ingest,
        ingest_armed: false,
        ingest_readable: true,
    };
    d.arm_accepts();
    d.arm_wake();
    d.arm_ingest();
    // `Drop for Driver` cancels and drains whatever is still in flight, on this path, on
    // an error and on a panic alike.
    d.run_loop()
}

impl Driver {
    fn run_loop(&mut self) -> io::Result<()> {
        let mut ready = Vec::new();
        let mut closing = Vec::new();
        loop {
            self.core.set_now(Instant::now());
            self.reap_all()?;
            self.step_ingest()?;
            self.core.drain_inbox();
            self.core.handle_tick();
            if self.core.stop_requested() {
                self.stop_accepting();
                self.core.begin_drain();
            }
            if (self.accept_stalled && !self.core.accept_paused())
                || (self.tls_accept_waiting && self.core.tls_accept_room() > 0)
            {
                self.arm_accepts();
            }
            for c in std::mem::take(&mut self.rearm) {
                self.arm_recv(c);
            }
            self.flush_writes(&mut ready);
            self.core.take_closing(&mut closing);
            for &c in &closing {
                self.start_close(c);
            }
            self.core.publish_stats();
            if self.core.poll_exit() {
                tracing::info!(worker = self.core.id, "worker stopped");
                return Ok(());
            }
            for sh in self.shards.iter_mut().skip(1) {
                sh.submit(0, Duration::ZERO)?;
            }
            let mut timeout = self.core.poll_timeout();
            if let Some(ing) = self.ingest.as_ref() {
                timeout = timeout.min(ing.wait(Instant::now()));
            }
            let busy = self.core.has_work() || !self.rearm.is_empty() || timeout.is_zero();
            if !busy && self.core.heap_trim_due() {
                super::sys::release_free_heap();
            }
            let wait = !busy && self.core.park();
            self.shards[0].submit(usize::from(wait), timeout)?;
            self.core.unpark();
        }
    }

    /// Serve ingest when its epoll set was readable or its timed work is due (before the
    /// inbox is taken, so what it published goes out this turn), and keep its poll armed.
    fn step_ingest(&mut self) -> io::Result<()> {
        let Some(ing) = self.ingest.as_mut() else {
            return Ok(());
        };
        let core = &mut *self.core;
        let readable = std::mem::take(&mut self.ingest_readable);
        if ing.host_step(readable, Instant::now(), &mut || core.drain_inbox())? {
            self.arm_ingest();
        } else {
            // Stopped. An armed poll holds its own reference to the epoll set and ends
            // with the ring's teardown.
            self.ingest = None;
        }
        Ok(())
    }

    fn arm_ingest(&mut self) {
        let Some(fd) = self.ingest.as_ref().map(|i| i.fd()) else {
            return;
        };
        if self.ingest_armed {
            return;
        }
        self.ingest_armed = true;
        // Multishot: armed once, it completes at every wake-up of the ingest's epoll set
        // (each new readiness of a publisher or listener there: mio registers them edge-
        // triggered, and the ingest keeps its own queue of what it has not finished
        // reading). Arming checks readiness first, so nothing that became ready while it
        // was not armed is missed. No poll to re-arm per event.
        let entry = opcode::PollAdd::new(Fd(fd), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(user_data(op::INGEST, 0, 0));
        // SAFETY: a poll SQE points at no memory of ours.
        unsafe { self.shards[0].push(entry) };
    }

    /// Take every completion now in every shard and act on it.
    fn reap_all(&mut self) -> io::Result<()> {
        for k in 0..self.shards.len() {
            if k > 0 {
                // Runs the shard's deferred completion work (DEFER_TASKRUN).
                self.shards[k].submit(0, Duration::ZERO)?;
            }
            // In chunks: a connect storm can fill the whole completion queue, and a
            // buffer sized for it would stay resident for good.
            let mut cqes = std::mem::take(&mut self.cqes);
            loop {
                cqes.extend(
                    self.shards[k]
                        .ring
                        .completion()
                        .take(CQE_CHUNK)
                        .map(|e| (e.user_data(), e.result(), e.flags())),
                );
                if cqes.is_empty() {
                    break;
                }
                for &(ud, res, flags) in &cqes {
                    self.dispatch(k, ud, res, flags);
                }
                cqes.clear();
            }
            self.cqes = cqes;
        }
        Ok(())
    }

    fn dispatch(&mut self, shard: usize, ud: u64, res: i32, flags: u32) {
        let (kind, gen, c) = split(ud);
        match kind {
            op::ACCEPT => self.on_accept(shard, c as usize, res),
            op::RECV => self.on_recv(shard, c, gen, res, flags),
            op::SEND => self.on_send(c, res),
            op::CLOSE => {
                if let Some(conn) = self.core.conn_mut(c) {
                    conn.handle.ops -= 1;
                }
                self.shards[shard].open = self.shards[shard].open.saturating_sub(1);
                // A slot freed: accepts that were short of room can be armed again.
                self.arm_accepts();
                self.maybe_release(c);
            }
            op::INGEST => {
                // The last completion of the multishot poll (cancelled, failed, or the
                // completion queue overflowed): armed again at the next step.
                if !cqueue::more(flags) {
                    self.ingest_armed = false;
                }
                self.ingest_readable = true;
            }
            op::KTLS_ULP => {
                if let Some(conn) = self.core.conn_mut(c) {
                    conn.handle.ops -= 1;
                }
                if res < 0 {
                    let e = io::Error::from_raw_os_error(-res);
                    tracing::warn!(worker = self.core.id, conn = c, error = %e, "tls ULP refused");
                }
                self.maybe_release(c);
            }
            op::KTLS => self.on_ktls(c, res),
            op::WAKE => {
                self.wake_armed = false;
                if !self.core.is_draining() {
                    self.arm_wake();
                }
            }
            op::SHARD => {
                let k = c as usize;
                if let Some(f) = self.shards.get(k).and_then(|sh| sh.notify.as_ref()) {
                    // Reset the counter; the shard itself is reaped at the top of the loop.
                    let mut buf = [0u8; 8];
                    let _ = (&*f).read(&mut buf);
                }
                if !cqueue::more(flags) {
                    if let Some(sh) = self.shards.get_mut(k) {
                        sh.notify_armed = false;
                    }
                    if res != -libc::ECANCELED {
                        self.arm_shard_notify(k);
                    }
                }
            }
            _ => {} // CANCEL results need no action: the cancelled ops report themselves.
        }
    }

    fn on_accept(&mut self, shard: usize, i: usize, res: i32) {
        self.shards[shard].accepts[i].armed = false;
        if res >= 0 {
            let peer = sockaddr_ip(&self.shards[shard].accepts[i].addr);
            self.shards[shard].open += 1;
            let conn = UConn {
                shard: shard as u16,
                slot: res as u32,
                ops: 0,
                state: 0,
                send: None,
            };
            let tls = self.listener_tls.get(i / ACCEPTS).copied().unwrap_or(false);
            let c = self.core.handle_accept(conn, peer, tls);
            self.arm_recv(c);
            self.arm_accepts();
            return;
        }
        match -res {
            libc::ECANCELED => {}
            libc::ENFILE => {
                // Should not happen (see `arm_accepts`): someone else filled the table.
                tracing::warn!(
                    worker = self.core.id,
                    ring = shard,
                    "fixed-file table full; a connection was lost"
                );
                self.shards[shard].open = self.table;
                self.arm_accepts();
            }
            e => {
                let err = io::Error::from_raw_os_error(e);
                match self.core.handle_accept_error(&err) {
                    AcceptAction::Retry => {}
                    AcceptAction::Pause => {}
                    AcceptAction::Fatal => {
                        // An accept SQE fails on its own; pause rather than spin on it.
                        tracing::warn!(worker = self.core.id, error = %err, "accept failed");
                        self.core
                            .handle_accept_error(&io::Error::from_raw_os_error(libc::ENOMEM));
                    }
                }
                self.arm_accepts();
            }
        }
    }

    fn on_recv(&mut self, shard: usize, c: ConnId, gen: u32, res: i32, flags: u32) {
        let more = cqueue::more(flags);
        let bid = cqueue::buffer_select(flags);
        let live = self
            .core
            .conn(c)
            .is_some_and(|cn| cn.gen & 0xff_ffff == gen);
        if !live {
            // Cannot happen while `ops` counts the recv; recycle the buffer regardless.
            if let Some(bid) = bid {
                self.shards[shard].bufs.recycle(bid);
            }
            return;
        }
        if !more {
            if let Some(conn) = self.core.conn_mut(c) {
                conn.handle.ops -= 1;
                conn.handle.state &= !RECV_ARMED;
            }
        }
        let closing = self.core.conn(c).is_some_and(|cn| cn.handle.closing());
        if res > 0 {
            if let Some(bid) = bid {
                if !closing {
                    // Copy-free: the core parses straight out of the provided buffer.
                    let data = self.shards[shard].bufs.data(bid, res as usize);
                    let _ = self.core.handle_read(c, data);
                }
                self.shards[shard].bufs.recycle(bid);
            }
            if !more && !closing {
                self.arm_recv(c);
            }
        } else if res == 0 {
            self.core.handle_eof(c);
        } else if -res == libc::ENOBUFS {
            if !closing {
                self.rearm.push(c);
            }
        } else if -res != libc::ECANCELED {
            self.core.handle_eof(c);
        }
        self.maybe_release(c);
    }

    fn on_send(&mut self, c: ConnId, res: i32) {
        let Some(conn) = self.core.conn_mut(c) else {
            return;
        };
        conn.handle.ops -= 1;
        let buf = conn.handle.send.take();
        let closing = conn.handle.closing();
        if let Some(buf) = buf {
            self.recycle_send_buf(buf);
        }
        if res >= 0 {
            self.core.handle_written(c, res as usize, true);
        } else if !closing {
            self.core.handle_write_error(c);
        }
        self.maybe_release(c);
    }

    /// Keep `ACCEPTS` accepts armed, each on a shard whose table is sure to have a slot
    /// for it (open + armed < table), opening a new shard when all are taken. A table must
    /// never overflow: the kernel would accept the connection and then reset it (ENFILE).
    fn arm_accepts(&mut self) {
        self.tls_accept_waiting = false;
        if self.listeners.is_empty() {
            return;
        }
        if self.core.accept_paused() {
            self.accept_stalled = true;
            return;
        }
        self.accept_stalled = false;
        for l in 0..self.listeners.len() {
            if !self.arm_accepts_for(l) {
                self.accept_stalled = true;
                return;
            }
        }
    }

    /// Arm listener `l`'s accepts; false if they could not all be armed.
    fn arm_accepts_for(&mut self, l: usize) -> bool {
        let range = l * ACCEPTS..(l + 1) * ACCEPTS;
        let armed = |sh: &Shard| sh.accepts.iter().filter(|a| a.armed).count() as u32;
        let mine = |sh: &Shard| sh.accepts[range.clone()].iter().filter(|a| a.armed).count();
        let armed_here = self.shards.iter().map(mine).sum::<usize>();
        let mut want = ACCEPTS - armed_here;
        if self.listener_tls[l] {
            // Every armed TLS accept may become a handshake: arm only what the limit allows.
            let room = self.core.tls_accept_room().saturating_sub(armed_here);
            if room < want {
                if room == 0 && !self.tls_accept_waiting {
                    self.core.note_tls_accepts_deferred();
                }
                self.tls_accept_waiting = true;
                want = room;
            }
        }
        for k in 0..self.shards.len() {
            for i in range.clone() {
                let sh = &self.shards[k];
                if want == 0 || sh.open + armed(sh) >= self.table {
                    break;
                }
                if !sh.accepts[i].armed {
                    self.arm_accept(k, i);
                    want -= 1;
                }
            }
        }
        if want == 0 {
            return true;
        }
        if self.shards.len() >= self.max_shards {
            // Every ring is full: a close re-arms (`op::CLOSE`).
            return false;
        }
        match self.open_shard() {
            Ok(k) => {
                for i in range.take(want) {
                    self.arm_accept(k, i);
                }
                true
            }
            Err(e) => {
                tracing::warn!(worker = self.core.id, error = %e, "cannot open another io_uring ring");
                self.core
                    .handle_accept_error(&io::Error::from_raw_os_error(libc::ENOMEM));
                false
            }
        }
    }

    fn open_shard(&mut self) -> io::Result<usize> {
        let mut sh = Shard::new(self.table, self.listener_tls.len())?;
        let notify = sys::eventfd()?;
        sh.ring.submitter().register_eventfd(notify.as_raw_fd())?;
        sh.notify = Some(File::from(notify));
        self.shards.push(sh);
        let k = self.shards.len() - 1;
        self.arm_shard_notify(k);
        tracing::info!(
            worker = self.core.id,
            ring = k,
            direct_descriptors = self.table,
            "opened another io_uring ring"
        );
        Ok(k)
    }

    /// Shard 0 polls shard `k`'s eventfd, so the worker wakes for its completions.
    fn arm_shard_notify(&mut self, k: usize) {
        let Some(sh) = self.shards.get_mut(k) else {
            return;
        };
        let Some(fd) = sh.notify.as_ref().map(|f| f.as_raw_fd()) else {
            return;
        };
        if sh.notify_armed {
            return;
        }
        sh.notify_armed = true;
        let entry = opcode::PollAdd::new(Fd(fd), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(user_data(op::SHARD, 0, k as u32));
        // SAFETY: a poll SQE points at no memory of ours (the eventfd is owned by the
        // shard, which outlives every op on its ring).
        unsafe { self.shards[0].push(entry) };
    }

    fn arm_accept(&mut self, shard: usize, i: usize) {
        let Some(l) = self.listeners.get(i / ACCEPTS) else {
            return;
        };
        let fd = l.as_raw_fd();
        let sh = &mut self.shards[shard];
        if sh.accepts[i].armed {
            return;
        }
        let slot = &mut sh.accepts[i];
        slot.len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        slot.armed = true;
        let entry = opcode::Accept::new(
            Fd(fd),
            &mut slot.addr as *mut _ as *mut libc::sockaddr,
            &mut slot.len,
        )
        .file_index(Some(io_uring::types::DestinationSlot::auto_target()))
        .build()
        .user_data(user_data(op::ACCEPT, 0, i as u32));
        // SAFETY: the address slot is in `sh.accepts`, a boxed slice that lives as long as
        // the shard and is not re-armed (`armed`) until this accept's completion.
        unsafe { sh.push(entry) };
    }

    fn stop_accepting(&mut self) {
        for l in std::mem::take(&mut self.listeners) {
            for sh in self.shards.iter_mut() {
                let cancel = opcode::AsyncCancel2::new(CancelBuilder::fd(Fd(l.as_raw_fd())).all())
                    .build()
                    .user_data(user_data(op::CANCEL, 0, 0));
                // SAFETY: a cancel SQE points at no memory.
                unsafe { sh.push(cancel) };
                // Submit the cancel before the listener closes; armed accepts hold their
                // own reference to the socket until they complete.
                let _ = sh.submit(0, Duration::ZERO);
            }
        }
    }

    fn arm_recv(&mut self, c: ConnId) {
        let Some(conn) = self.core.conn_mut(c) else {
            return;
        };
        if conn.handle.state & (RECV_ARMED | CLOSING) != 0 {
            return;
        }
        conn.handle.state |= RECV_ARMED;
        conn.handle.ops += 1;
        let entry = opcode::RecvMulti::new(Fixed(conn.handle.slot), BGID)
            .build()
            .user_data(user_data(op::RECV, conn.gen, c));
        let shard = conn.handle.shard as usize;
        // SAFETY: a buffer-select recv points at no memory of ours: the kernel picks a
        // provided buffer, which lives in the shard until the buf ring is unregistered.
        unsafe { self.shards[shard].push(entry) };
    }

    fn arm_wake(&mut self) {
        if self.wake_armed {
            return;
        }
        self.wake_armed = true;
        let buf: *mut u64 = &mut **self.wake_buf;
        let entry = opcode::Read::new(Fd(self.efd.as_raw_fd()), buf as *mut u8, 8)
            .build()
            .user_data(user_data(op::WAKE, 0, 0));
        // SAFETY: `wake_buf` is boxed (stable address), freed only after the worker's
        // teardown saw this read complete, and not re-armed before (`wake_armed`).
        unsafe { self.shards[0].push(entry) };
    }

    /// One send per ready connection, carrying everything pending for it.
    fn flush_writes(&mut self, ready: &mut Vec<ConnId>) {
        self.core.take_ready(ready);
        for &c in ready.iter() {
            if !self.core.begin_write(c) {
                continue;
            }
            let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
            let (n, _) = self.core.fill(c, &mut iov);
            let record = self.core.ktls_record_type(c);
            let mut sb = None;
            let single = (iov[0].as_ptr(), iov[0].len() as u32);
            if n > 1 || record.is_some() {
                let mut b = self.send_pool.pop().unwrap_or_else(SendBuf::new);
                for (dst, src) in b.iov.iter_mut().zip(&iov[..n]) {
                    *dst = libc::iovec {
                        iov_base: src.as_ptr() as *mut libc::c_void,
                        iov_len: src.len(),
                    };
                }
                b.msg.msg_iov = b.iov.as_mut_ptr();
                b.msg.msg_iovlen = n as _;
                let SendBuf { msg, cmsg, .. } = &mut *b;
                match record {
                    // One of herald's own records on a kernel-TLS socket: its type goes
                    // in a control message.
                    Some(typ) => cmsg.attach(msg, typ),
                    None => {
                        msg.msg_control = std::ptr::null_mut();
                        msg.msg_controllen = 0;
                    }
                }
                sb = Some(b);
            }
            let Some(conn) = self.core.conn_mut(c) else {
                continue;
            };
            // No MSG_WAITALL: a short send completes with what the kernel took, so progress
            // is bytes accepted by the socket, as on epoll, and a slow but steady reader is
            // never mistaken for a stalled one.
            let flags = libc::MSG_NOSIGNAL;
            let ud = user_data(op::SEND, conn.gen, c);
            // One frame (the usual case: an event or a keep-alive) needs no iovec block.
            let entry = match &sb {
                Some(b) => opcode::SendMsg::new(Fixed(conn.handle.slot), &b.msg)
                    .flags(flags as u32)
                    .build(),
                None => opcode::Send::new(Fixed(conn.handle.slot), single.0, single.1)
                    .flags(flags)
                    .build(),
            };
            conn.handle.ops += 1;
            conn.handle.send = sb;
            let shard = conn.handle.shard as usize;
            // SAFETY: the iovec block (if any) is boxed and held in `conn.handle.send` until
            // this send's completion; the frames it (or the single SEND) points at are kept
            // alive by the core, which moves the connection's cursor and drops its `pre`
            // frames only in `handle_written`, after the completion. On a TLS connection
            // the single SEND points at the session's ciphertext buffer, which the core
            // neither grows nor returns to its pool before `handle_written` says all of it
            // is out, and frees only in `release`, after every op on the connection ended.
            // On an h2 connection the iovecs also point at the frame headers of its plan,
            // which is neither grown nor cleared while a write of it is in flight, and at
            // its streams' frames, whose streams are released only once their part of the
            // plan is written (or with the connection, after its last op).
            unsafe { self.shards[shard].push(entry.user_data(ud)) };
        }
        self.install_ktls();
    }

    /// Install the sending keys of sessions handed to the kernel (kTLS): the `tls` ULP
    /// (first time only) linked to `TLS_TX`, both on the direct descriptor. The core
    /// holds the connection's writes until the result comes back.
    fn install_ktls(&mut self) {
        let mut due = std::mem::take(&mut self.ktls_due);
        self.core.take_ktls_installs(&mut due);
        for (c, keys, ulp) in due.drain(..) {
            let Some(conn) = self.core.conn_mut(c) else {
                continue;
            };
            if conn.handle.closing() || conn.handle.send.is_some() {
                // Closing (or, never expected, a send still holding the block).
                self.core.ktls_installed(c, false);
                continue;
            }
            let mut b = self.send_pool.pop().unwrap_or_else(SendBuf::new);
            let k = keys.as_bytes();
            b.keys[..k.len()].copy_from_slice(k);
            let (slot, gen, shard) = (conn.handle.slot, conn.gen, conn.handle.shard as usize);
            let tx = opcode::SetSockOpt::new(
                Fixed(slot),
                libc::SOL_TLS as u32,
                libc::TLS_TX as u32,
                b.keys.as_ptr().cast(),
                k.len() as u32,
            )
            .build()
            .user_data(user_data(op::KTLS, gen, c));
            conn.handle.send = Some(b);
            conn.handle.ops += 1;
            if ulp {
                conn.handle.ops += 1;
                let ulp = opcode::SetSockOpt::new(
                    Fixed(slot),
                    libc::SOL_TCP as u32,
                    libc::TCP_ULP as u32,
                    TLS_ULP_NAME.as_ptr().cast(),
                    TLS_ULP_NAME.len() as u32,
                )
                .build()
                .flags(squeue::Flags::IO_LINK)
                .user_data(user_data(op::KTLS_ULP, gen, c));
                // SAFETY: the option value is a static.
                unsafe { self.shards[shard].push(ulp) };
            }
            // SAFETY: the keys are in the boxed block held in `conn.handle.send` until
            // this op's completion (`on_ktls`), which is the only place that takes it.
            unsafe { self.shards[shard].push(tx) };
        }
        self.ktls_due = due;
    }

    /// A kernel-TLS key install completed (`res` < 0: refused, or cancelled because the
    /// ULP linked before it failed).
    fn on_ktls(&mut self, c: ConnId, res: i32) {
        let Some(conn) = self.core.conn_mut(c) else {
            return;
        };
        conn.handle.ops -= 1;
        if let Some(mut b) = conn.handle.send.take() {
            zeroize::Zeroize::zeroize(&mut b.keys);
            self.recycle_send_buf(b);
        }
        if res < 0 {
            let e = io::Error::from_raw_os_error(-res);
            tracing::warn!(worker = self.core.id, conn = c, error = %e, "kernel TLS hand-over refused");
        }
        self.core.ktls_installed(c, res >= 0);
        self.maybe_release(c);
    }

    /// Return an iovec block to the pool, keeping the pool bounded after a burst.
    fn recycle_send_buf(&mut self, buf: Box<SendBuf>) {
        if self.send_pool.len() < SEND_POOL_MAX {
            self.send_pool.push(buf);
        }
    }

    /// Cancel whatever is in flight on `c`, then close its direct descriptor.
    fn start_close(&mut self, c: ConnId) {
        let Some(conn) = self.core.conn_mut(c) else {
            return;
        };
        if conn.handle.closing() {
            return;
        }
        conn.handle.state |= CLOSING;
        let (slot, gen, shard) = (conn.handle.slot, conn.gen, conn.handle.shard as usize);
        let had_ops = conn.handle.ops > 0;
        conn.handle.ops += 1;
        if had_ops {
            let cancel = opcode::AsyncCancel2::new(CancelBuilder::fd(Fixed(slot)).all())
                .build()
                .user_data(user_data(op::CANCEL, gen, c));
            // SAFETY: a cancel SQE points at no memory.
            unsafe { self.shards[shard].push(cancel) };
        }
        let close = opcode::Close::new(Fixed(slot))
            .build()
            .user_data(user_data(op::CLOSE, gen, c));
        // SAFETY: a close SQE points at no memory.
        unsafe { self.shards[shard].push(close) };
    }

    /// Forget `c` once it is closed and nothing of it is in flight.
    fn maybe_release(&mut self, c: ConnId) {
        if self
            .core
            .conn(c)
            .is_some_and(|cn| cn.handle.closing() && cn.handle.ops == 0)
        {
            if let Some(buf) = self.core.release(c).and_then(|h| h.send) {
                self.recycle_send_buf(buf);
            }
        }
    }

    /// Cancel everything still armed and wait (bounded) for the completions. Returns
    /// whether the kernel is done with every buffer of ours.
    fn teardown(&mut self) -> bool {
        self.listeners.clear();
        for sh in self.shards.iter_mut() {
            let cancel = opcode::AsyncCancel2::new(CancelBuilder::any())
                .build()
                .user_data(user_data(op::CANCEL, 0, 0));
            // SAFETY: a cancel SQE points at no memory.
            unsafe { sh.push(cancel) };
        }
        let deadline = Instant::now() + TEARDOWN_WAIT;
        while Instant::now() < deadline {
            for sh in self.shards.iter_mut().skip(1) {
                let _ = sh.submit(0, Duration::ZERO);
            }
            let _ = self.shards[0].submit(1, Duration::from_millis(20));
            let _ = self.reap_all();
            for c in self.core.iter_ids() {
                self.core.close(c);
            }
            let mut closing = Vec::new();
            self.core.take_closing(&mut closing);
            for c in closing {
                self.start_close(c);
            }
            let armed = self.wake_armed
                || self.ingest_armed
                || self
                    .shards
                    .iter()
                    .any(|sh| sh.notify_armed || sh.accepts.iter().any(|a| a.armed));
            if !armed && self.core.conn_count() == 0 {
                for sh in self.shards.iter() {
                    let _ = sh.ring.submitter().unregister_buf_ring(BGID);
                }
                return true;
            }
        }
        false
    }
}

/// The worker's exit, whatever the path (return, error, panic): nothing the kernel may
/// still touch is freed under it.
impl Drop for Driver {
    fn drop(&mut self) {
        if self.teardown() {
            // SAFETY: `teardown` saw the final completion of every op and unregistered the
            // buffer rings, so the kernel holds no pointer into these any more; each field
            // is dropped exactly once, here, and never used after.
            unsafe {
                ManuallyDrop::drop(&mut self.shards);
                ManuallyDrop::drop(&mut self.core);
                ManuallyDrop::drop(&mut self.wake_buf);
            }
        } else {
            tracing::warn!(
                worker = self.core.id,
                "io_uring ops still in flight at exit; leaking their buffers"
            );
        }
    }
}

/// The peer address an accept wrote.
fn sockaddr_ip(ss: &libc::sockaddr_storage) -> Option<IpAddr> {
    match ss.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in (family AF_INET) into this storage,
            // which is larger and suitably aligned.
            let sin =
                unsafe { &*(ss as *const libc::sockaddr_storage as *const libc::sockaddr_in) };
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                sin.sin_addr.s_addr,
            ))))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6 (family AF_INET6).
            let sin6 =
                unsafe { &*(ss as *const libc::sockaddr_storage as *const libc::sockaddr_in6) };
            Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips() {
        for (kind, gen, c) in [
            (op::SEND, 0xff_ffff, u32::MAX),
            (op::RECV, 1, 0),
            (op::CLOSE, 0x12_3456, 77),
        ] {
            assert_eq!(split(user_data(kind, gen, c)), (kind, gen, c));
        }
        // Generations wrap within 24 bits instead of bleeding into the kind.
        assert_eq!(
            split(user_data(op::SEND, 0x1ff_ffff, 5)),
            (op::SEND, 0xff_ffff, 5)
        );
    }

    #[test]
    fn an_idle_connection_record_is_small() {
        // The whole per-connection record, as the slab stores it; the budget for an idle
        // subscriber (record + wheel entry + subscriber slot) is 256 bytes.
        let record = std::mem::size_of::<crate::core::Conn<UConn>>();
        eprintln!(
            "Conn<UConn>: {record} bytes; UConn {} pre {}",
            std::mem::size_of::<UConn>(),
            std::mem::size_of::<std::collections::VecDeque<bytes::Bytes>>()
        );
        assert!(record <= 128, "Conn<UConn> is {record} bytes");
    }
}
