//! Time in the worker core: head deadlines, keep-alives, the write-stall check and the
//! drain. Every connection has at most one timer in the wheel; what it means depends on the
//! connection's phase. The drain ends each stream at a frame boundary, after everything
//! published to it, with a `retry:` hint no shorter than the last one the stream carried.

use bytes::Bytes;

use super::auth::{EndReason, ExpiryStep};
use super::{flag, piece, ConnId, Core, Phase};
use crate::sse::encode::{encode_retry, KEEPALIVE_BODY, KEEPALIVE_CHUNKED};

/// Chunked-encoding end of body, sent when a stream ends cleanly.
const LAST_CHUNK: &[u8] = b"0\r\n\r\n";
/// The drain's `retry:` hint when neither the stream's topics nor `--retry` set one.
const DEFAULT_RETRY_MS: u32 = 1000;

impl<H: Default> Core<H> {
    // ---- shutdown -----------------------------------------------------------------

    /// Stop: every stream is flushed, then gets a `retry:` hint and its last chunk; the
    /// streams end spread over the drain window so clients do not all reconnect in the
    /// same millisecond. Whatever is not done by the end of the window is cut.
    pub fn begin_drain(&mut self) {
        if self.is_draining() {
            return;
        }
        let window = self.ticks(self.shared.config.drain_window);
        self.drain_deadline = Some(self.now_tick + window);
        let ids = self.iter_ids();
        let n = ids.len().max(1) as u64;
        tracing::info!(worker = self.id, connections = ids.len(), "draining");
        for (i, c) in ids.into_iter().enumerate() {
            match self.conns[c as usize].phase {
                Phase::Stream => {
                    self.set_reason(c, super::auth::EndReason::Drain);
                    self.start_drain(c, true, i as u64 * window / n)
                }
                Phase::Head | Phase::Body => self.close(c),
                Phase::Respond | Phase::Await => self.conns[c as usize].flags &= !flag::KEEP_ALIVE,
                // GOAWAY now; its streams drain like any other, then it closes.
                Phase::H2 => self.h2_drain(c),
                Phase::Drain | Phase::Closing => {}
            }
        }
    }

    /// End stream `c` in `delay_ticks`, once everything pending for it is written; with
    /// `retry_hint` (a shutdown, not a topic close) the trailer carries a `retry:` hint.
    pub(super) fn start_drain(&mut self, c: ConnId, retry_hint: bool, delay_ticks: u64) {
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return;
        };
        if !matches!(conn.phase, Phase::Stream | Phase::Drain) {
            return;
        }
        conn.phase = Phase::Drain;
        if retry_hint {
            conn.flags |= flag::RETRY_HINT;
        }
        self.wheel.insert(c, self.now_tick + delay_ticks);
    }

    /// A draining stream whose time has come: once flushed, queue its trailer.
    pub(super) fn finish_drain(&mut self, c: ConnId) {
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return;
        };
        conn.flags |= flag::DRAIN_DUE;
        if conn.has(flag::WRITING) || conn.has(flag::FINAL) || self.has_pending(c) {
            // A frame is partly written or in flight: the trailer waits for the boundary
            // (`after_idle` calls back here), or for the end of the window.
            return;
        }
        let hint = self.conns[c as usize]
            .has(flag::RETRY_HINT)
            .then(|| self.drain_retry(c));
        self.detach(c);
        let stall = self.ticks(self.shared.config.write_timeout);
        let conn = &mut self.conns[c as usize];
        conn.flags |= flag::FINAL;
        let http10 = conn.has(flag::HTTP10);
        if let Some(ms) = hint {
            conn.pre.push_back(piece(&encode_retry(ms), http10));
        }
        if !http10 {
            conn.pre.push_back(Bytes::from_static(LAST_CHUNK));
        }
        if conn.pre.is_empty() {
            // A close-delimited body with nothing to add: closing is the end.
            return self.close(c);
        }
        self.wheel.insert(c, self.now_tick + stall);
        self.mark_ready(c);
    }

    /// The drain's `retry:` for `c`: at least the last `retry` its topics carried (else
    /// `--retry`, else 1 s), spread upward per connection by up to half of it (at least a
    /// second) so reconnects spread out and never come sooner than the application asked.
    fn drain_retry(&self, c: ConnId) -> u32 {
        let conn = &self.conns[c as usize];
        let base = conn
            .subs
            .as_slice()
            .iter()
            .filter_map(|s| self.topics[s.topic as usize].last_retry)
            .max()
            .or(self.shared.config.retry)
            .unwrap_or(DEFAULT_RETRY_MS);
        let spread = (base / 2).max(1000) as u64;
        let jitter =
            ((c as u64 ^ conn.gen as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % spread;
        base.saturating_add(jitter as u32)
    }

    /// The drain window is over: cut what is still open, counting the streams that did not
    /// get their trailer out.
    fn cut_drain(&mut self) {
        self.drain_cut = true;
        for c in self.iter_ids() {
            let conn = &self.conns[c as usize];
            match conn.phase {
                Phase::Closing => continue,
                // Its trailer is queued or being written (its turn came, perhaps in this
                // very tick): it is done, and closes once that is written. A stalled one
                // is cut by its write timeout, and the exit grace bounds the rest.
                Phase::Drain if conn.has(flag::FINAL) => continue,
                Phase::Stream | Phase::Drain => self.counters.drain_cut += 1,
                _ => {}
            }
            self.close_for(c, super::auth::EndReason::Drain);
        }
        if self.counters.drain_cut > 0 {
            tracing::warn!(
                worker = self.id,
                cut = self.counters.drain_cut,
                "drain window over; streams not done were closed"
            );
        }
    }

    // ---- timers -------------------------------------------------------------------

    pub fn handle_tick(&mut self) {
        let mut expired = std::mem::take(&mut self.expired);
        self.wheel.advance(self.now_tick, &mut expired);
        for c in expired.drain(..) {
            self.handle_timer(c);
        }
        self.expired = expired;
        if !self.drain_cut && self.drain_deadline.is_some_and(|d| self.now_tick >= d) {
            self.cut_drain();
        }
    }

    fn handle_timer(&mut self, c: ConnId) {
        let ka = self.ticks(self.shared.config.keepalive);
        let stall = self.ticks(self.shared.config.write_timeout);
        let now = self.now_tick;
        // A token's stream: its expiry notice and end share the connection's timer.
        let mut token_next = u64::MAX;
        if !self.info.is_empty()
            && self
                .conns
                .get(c as usize)
                .is_some_and(|cn| cn.phase == Phase::Stream)
        {
            match self.expiry_step(c, now) {
                Some(ExpiryStep::Ended) => return,
                Some(ExpiryStep::Next(t)) => token_next = t,
                None => {}
            }
        }
        if !self.info.is_empty() && self.check_read_wait(c) {
            return;
        }
        if self.is_parked(c) {
            // Waited for the JWKS refetch as long as a head may take: answer now.
            return self.resume(c);
        }
        let pending = self.has_pending(c);
        let Some(conn) = self.conns.get_mut(c as usize) else {
            return;
        };
        let waited = (now as u32).wrapping_sub(conn.progress) as u64 >= stall;
        // An h2 stream's write waits on flow-control windows as much as on its socket.
        let h2s = conn.has(flag::H2S);
        let stalled = waited && (conn.has(flag::WRITING) || (h2s && pending));
        match conn.phase {
            Phase::H2 => self.h2_conn_timer(c, stalled),
            Phase::Stream | Phase::Drain if stalled && h2s && !conn.has(flag::FINAL) => {
                self.h2_stream_stalled(c)
            }
            Phase::Head | Phase::Body => {
                self.counters.head_timeouts += 1;
                if self.tls_handshaking(c) {
                    self.counters.tls_handshake_timeouts += 1;
                }
                self.close(c);
            }
            // Redis answers (or fails) within the publisher's timeouts.
            Phase::Await => self.wheel.insert(c, now + stall),
            // A response, or a drained stream's trailer, that is not getting out.
            Phase::Respond => self.check_final_write(c, stalled, now + stall),
            Phase::Drain if conn.has(flag::FINAL) => {
                self.check_final_write(c, stalled, now + stall)
            }
            Phase::Drain if stalled => {
                self.counters.slow_consumer_disconnects += 1;
                self.close_for(c, EndReason::Stall);
            }
            Phase::Drain if conn.has(flag::WRITING) => {
                conn.flags |= flag::DRAIN_DUE;
                self.wheel.insert(c, now + stall);
            }
            Phase::Drain => self.finish_drain(c),
            Phase::Stream if stalled => {
                self.counters.slow_consumer_disconnects += 1;
                self.close_for(c, EndReason::Stall);
            }
            Phase::Stream => {
                // Idle for its due time (the interval less this connection's jitter):
                // send the shared keep-alive. Silence never exceeds the interval, and
                // streams that went quiet together after a broadcast spread out again.
                // Only a stream with nothing pending gets one: a keep-alive queued behind
                // a partly written frame would split it.
                let due = ka - keepalive_jitter(c, ka);
                let idle = (now as u32).wrapping_sub(conn.progress) as u64;
                let next = if conn.has(flag::WRITING) || pending {
                    due.min(stall)
                } else if idle >= due {
                    let ka_bytes = if conn.has(flag::HTTP10) {
                        KEEPALIVE_BODY
                    } else {
                        KEEPALIVE_CHUNKED
                    };
                    conn.pre.push_back(Bytes::from_static(ka_bytes));
                    self.counters.keepalives += 1;
                    self.mark_ready(c);
                    due
                } else {
                    due.saturating_sub(idle).max(1)
                };
                self.wheel
                    .insert(c, (now + next).min(token_next).max(now + 1));
            }
            Phase::Closing => {}
        }
    }

    fn check_final_write(&mut self, c: ConnId, stalled: bool, next: u64) {
        let Some(conn) = self.conns.get(c as usize) else {
            return;
        };
        if stalled || (!conn.has(flag::WRITING) && conn.pre.is_empty()) {
            self.close(c);
        } else {
            self.wheel.insert(c, next);
        }
    }
}

/// Up to an eighth of the keep-alive interval, fixed per connection id: enough to spread
/// streams that went idle together, at the cost of at most 1/8 more keep-alives.
fn keepalive_jitter(c: ConnId, ka: u64) -> u64 {
    ((c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) % (ka / 8 + 1)
}
