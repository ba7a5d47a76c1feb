//! The write path of a worker's connections: which connections need a write, what goes
//! into it (every pending frame, up to the caps, as slices of the shared event bytes), and
//! how a completed or partial write moves the connection on. At most one write per
//! connection is in flight; `off` is the only state a partial write leaves behind.

use std::io::IoSlice;

use super::fanout::{consume_live, walk_live};
use super::{flag, frame_of, ConnId, Core, Phase};

/// Most frames in one write (`sendmsg`/`writev` iovecs).
pub const MAX_IOVECS: usize = 64;
/// Most bytes in one write.
const MAX_WRITE_BYTES: usize = 256 << 10;

impl<H: Default> Core<H> {
    /// Connections that need a write, in the order they became ready.
    pub fn take_ready(&mut self, out: &mut Vec<ConnId>) {
        out.clear();
        std::mem::swap(out, &mut self.ready);
    }

    /// Something is queued for the backend (writes or closes): do not block.
    pub fn has_work(&self) -> bool {
        !self.ready.is_empty() || !self.closing.is_empty()
    }

    pub(super) fn mark_ready(&mut self, c: ConnId) {
        if let Some(conn) = self.conns.get_mut(c as usize) {
            if conn.flags & (flag::READY | flag::WRITING) == 0 && conn.phase != Phase::Closing {
                conn.flags |= flag::READY;
                self.ready.push(c);
            }
        }
    }

    /// Start a write on `c` if it has anything pending and none in flight. Returns false
    /// when there is nothing to write (the connection may then move on or close).
    pub fn begin_write(&mut self, c: ConnId) -> bool {
        let now = self.now_tick;
        let stall = self.ticks(self.shared.config.write_timeout);
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return false;
        };
        if conn.has(flag::H2S) {
            // An h2 stream is written by its connection.
            return self.h2_stream_ready(c);
        }
        conn.flags &= !flag::READY;
        if conn.phase == Phase::Closing || conn.has(flag::WRITING) {
            return false;
        }
        if conn.has(flag::TLS) && self.ktls_hold(c) {
            return false;
        }
        let conn = &mut self.conns[c as usize];
        if conn.has(flag::H2) {
            self.h2_build(c);
        }
        self.feed_replay(c);
        if !self.has_pending(c) {
            self.after_idle(c);
            return false;
        }
        if self.conns[c as usize].has(flag::KTX) {
            self.ktls_begin(c);
        } else if self.conns[c as usize].has(flag::TLS) {
            self.tls_prepare(c);
            if self.tls_out(c).is_empty() {
                // rustls refused to encrypt: the session is broken.
                self.close(c);
                return false;
            }
        }
        let conn = &mut self.conns[c as usize];
        conn.flags |= flag::WRITING;
        conn.progress = now as u32;
        let stream = conn.phase == Phase::Stream
            || conn.phase == Phase::H2
            || (conn.phase == Phase::Drain && conn.has(flag::DRAIN_DUE));
        if stream && self.wheel.deadline(c).is_none_or(|d| d > now + stall) {
            // The stall check must not wait for a later keep-alive timer.
            self.wheel.insert(c, now + stall);
        }
        self.counters.writes += 1;
        true
    }

    /// Fill `iov` with the frames pending for `c`, up to the per-write caps, after
    /// [`Core::begin_write`]. Returns (slices used, bytes).
    pub fn fill<'a>(&'a self, c: ConnId, iov: &mut [IoSlice<'a>; MAX_IOVECS]) -> (usize, usize) {
        let Some(conn) = self.conns.get(c as usize) else {
            return (0, 0);
        };
        if conn.has(flag::KTX) && self.ktls_record_type(c).is_some() {
            let rec = self.ktls_record(c);
            iov[0] = IoSlice::new(rec);
            return (1, rec.len());
        }
        if conn.has(flag::TLS) && !conn.has(flag::KTX) {
            let out = self.tls_out(c);
            iov[0] = IoSlice::new(out);
            return (1, out.len());
        }
        let mut n = 0usize;
        let mut total = 0usize;
        self.walk_pending(c, |s| {
            iov[n] = IoSlice::new(s);
            n += 1;
            total += s.len();
            n < MAX_IOVECS && total < MAX_WRITE_BYTES
        });
        (n, total)
    }

    /// Walk the frames pending for `c` in write order: its `pre` frames, then (unless a
    /// replay is still running) its live frames merged across topics, the first cut by
    /// what is already written. Stops when `f` returns false. The plaintext write, the
    /// TLS gather and the TLS end check all read the connection through this one walk.
    pub(super) fn walk_pending<'a>(&'a self, c: ConnId, mut f: impl FnMut(&'a [u8]) -> bool) {
        let Some(conn) = self.conns.get(c as usize) else {
            return;
        };
        if conn.has(flag::H2) {
            return self.h2_walk(c, &mut f);
        }
        let mut skip = conn.off as usize;
        let mut push = |s: &'a [u8]| -> bool {
            let s = &s[skip.min(s.len())..];
            skip = 0;
            f(s)
        };
        for fr in conn.pre.iter() {
            if !push(fr) {
                return;
            }
        }
        if conn.replay.is_none() {
            let http10 = conn.has(flag::HTTP10);
            walk_live(conn.subs.as_slice(), &self.topics, |_, ev| {
                push(frame_of(ev, http10))
            });
        }
    }

    /// The socket of `c` has room again after a write would have blocked (epoll).
    pub fn handle_writable(&mut self, c: ConnId) {
        if let Some(conn) = self.conns.get_mut(c as usize) {
            if conn.has(flag::WRITING) {
                conn.flags &= !flag::WRITING;
                self.after_write(c);
            }
        }
    }

    /// Whether anything is pending for `c`, cheaply (no walk over the frames).
    pub(super) fn has_pending(&self, c: ConnId) -> bool {
        let plain = self.has_plain_pending(c);
        match self.conns.get(c as usize) {
            Some(conn) if conn.has(flag::KTX) => self.ktls_pending(c, plain),
            Some(conn) if conn.has(flag::TLS) => self.tls_pending(c, plain),
            _ => plain,
        }
    }

    /// Whether frames are pending for `c` (before any encryption).
    pub(super) fn has_plain_pending(&self, c: ConnId) -> bool {
        self.conns.get(c as usize).is_some_and(|conn| {
            if conn.has(flag::H2 | flag::H2S) {
                if conn.has(flag::H2) {
                    return self.h2_plain_pending(c);
                }
                if self.h2_head_pending(c) {
                    return true;
                }
            }
            !conn.pre.is_empty()
                // A replay asked of Redis has nothing to write until it comes back.
                || conn.replay.as_ref().is_some_and(|r| !r.asked)
                || conn
                    .subs
                    .as_slice()
                    .iter()
                    .any(|s| s.cursor < self.topics[s.topic as usize].end())
        })
    }

    /// `n` bytes of the write started by `begin_write` reached the socket. `done` says
    /// the write operation is over (uring: its completion; epoll: the `writev` call).
    pub fn handle_written(&mut self, c: ConnId, n: usize, done: bool) {
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return;
        };
        if done {
            conn.flags &= !flag::WRITING;
        }
        self.counters.bytes_written += n as u64;
        if !self.info.is_empty() {
            self.info_written(c, n);
        }
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return;
        };
        if conn.has(flag::KTX) {
            let data = self.ktls_written(c, n);
            if data > 0 {
                self.consume(c, data);
            }
        } else if conn.has(flag::TLS) {
            if n > 0 {
                conn.progress = self.now_tick as u32;
                // The frames count as written once all of their ciphertext is.
                let covered = self.tls_written(c, n);
                if covered > 0 {
                    self.consume(c, covered);
                }
            }
        } else if n > 0 {
            self.consume(c, n);
        }
        if done {
            self.after_write(c);
        }
    }

    /// Advance `c` past `n` written bytes: pre frames first, then live frames, in the
    /// order `fill` produced them.
    pub(super) fn consume(&mut self, c: ConnId, n: usize) {
        let now = self.now_tick as u32;
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return;
        };
        if conn.has(flag::H2) {
            return self.h2_consume(c, n);
        }
        conn.progress = now;
        let mut left = n + conn.off as usize;
        conn.off = 0;
        while let Some(f) = conn.pre.front() {
            if left < f.len() {
                conn.off = left as u32;
                left = 0;
                break;
            }
            left -= f.len();
            conn.pre.pop_front();
        }
        if left > 0 {
            let http10 = conn.has(flag::HTTP10);
            let (delivered, off) =
                consume_live(conn.subs.as_mut_slice(), &self.topics, left, http10);
            conn.off = off;
            self.counters.events_delivered += delivered;
            if let Some(l) = self
                .info
                .get_mut(c as usize)
                .and_then(|i| i.as_deref_mut()?.log_mut())
            {
                l.events += delivered;
            }
            // A topic with no other local subscriber needs nothing it has written: free
            // its log now rather than at the topic's next event (a per-user topic's next
            // event may be hours away).
            for s in conn.subs.as_slice() {
                let t = &mut self.topics[s.topic as usize];
                if t.subs.len() == 1 {
                    self.counters.fanout_backlog_bytes -= t.trim(s.cursor);
                }
            }
        }
    }

    /// A write operation finished: start the next one, or move on.
    pub(super) fn after_write(&mut self, c: ConnId) {
        if self.has_pending(c) {
            self.mark_ready(c);
        } else {
            self.after_idle(c);
        }
    }

    /// Nothing left to write for `c`: a response is done (next request, or close), a
    /// draining stream whose turn has come gets its trailer, a trailer written closes.
    pub(super) fn after_idle(&mut self, c: ConnId) {
        let head_ticks = self.ticks(self.shared.config.head_timeout);
        let draining = self.is_draining();
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return;
        };
        if conn.has(flag::TLS_CLOSE) {
            return self.close(c);
        }
        if conn.has(flag::KTX) && self.closes_when_idle(c) && self.ktls_close_notify_first(c) {
            return;
        }
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return;
        };
        if conn.has(flag::H2S) {
            return match conn.phase {
                Phase::Respond => self.h2_stream_done(c),
                Phase::Drain if conn.has(flag::FINAL) => self.h2_stream_done(c),
                Phase::Drain if conn.has(flag::DRAIN_DUE) => self.finish_drain(c),
                _ => {}
            };
        }
        match conn.phase {
            Phase::Respond if conn.has(flag::KEEP_ALIVE) && !draining => {
                conn.phase = Phase::Head;
                conn.flags &= !flag::KEEP_ALIVE;
                self.wheel.insert(c, self.now_tick + head_ticks);
                if conn.rbuf.as_ref().is_some_and(|rb| !rb.buf.is_empty()) {
                    self.process_input(c, None);
                }
                self.close_if_peer_done(c);
            }
            Phase::Respond => self.close(c),
            Phase::Drain if conn.has(flag::FINAL) => self.close(c),
            Phase::Drain if conn.has(flag::DRAIN_DUE) => self.finish_drain(c),
            _ => {}
        }
    }

    /// Whether `after_idle` is about to close `c` (its response or drain is done).
    fn closes_when_idle(&self, c: ConnId) -> bool {
        let Some(conn) = self.conns.get(c as usize) else {
            return false;
        };
        match conn.phase {
            Phase::Respond => !conn.has(flag::KEEP_ALIVE) || self.is_draining(),
            Phase::Drain => conn.has(flag::FINAL),
            _ => false,
        }
    }

    /// A write failed (peer gone): close.
    pub fn handle_write_error(&mut self, c: ConnId) {
        if let Some(conn) = self.conns.get_mut(c as usize) {
            conn.flags &= !flag::WRITING;
        }
        self.close_for(c, super::auth::EndReason::Error);
    }
}
