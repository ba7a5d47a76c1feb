//! Fan-out inside a worker: each local topic keeps a log of the events this worker took
//! for it, and a subscriber is a cursor into that log. An event is appended once and the
//! dense subscriber list is walked, marking connections ready; entries are dropped once
//! every cursor has passed them, and a subscriber too far behind is disconnected.

use std::collections::VecDeque;
use std::sync::Arc;

use super::{flag, frame_of, ConnId, Core, Phase, Sub, Subs};
use crate::fanout::bus::BusMsg;
use crate::fanout::table::NameTable;
use crate::fanout::topic::Event;

pub(super) struct LogEntry {
    pub(super) ev: Arc<Event>,
    /// Cumulative wire bytes of the log up to and including this entry.
    pub(super) end: u64,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct SubRef {
    pub(super) conn: ConnId,
    /// Index into the connection's `subs`.
    pub(super) slot: u32,
}

/// A topic as one worker sees it: its local subscribers and recent events. (Its name is
/// the hub's, kept by the worker's [`NameTable`].) A per-user topic whose subscriber is
/// caught up holds no allocation: one subscriber is inline and the log is boxed, made by
/// the first event and dropped once every local cursor has passed its last entry.
pub(super) struct LocalTopic {
    pub(super) subs: SubList,
    log: Option<Box<Log>>,
    /// Absolute index of the log's first entry (the end, when there is no log).
    base: u64,
    /// The last `retry` an event of this topic carried (the drain hint never goes below).
    pub(super) last_retry: Option<u32>,
}

/// A local topic's subscribers: one inline (16 bytes, the per-user case), more boxed.
#[derive(Debug)]
pub(super) enum SubList {
    Empty,
    One(SubRef),
    // Boxed on purpose: the inline record stays 16 bytes (a `Vec` would make it 24).
    #[allow(clippy::box_collection)]
    Many(Box<Vec<SubRef>>),
}

impl SubList {
    pub(super) fn len(&self) -> usize {
        match self {
            SubList::Empty => 0,
            SubList::One(_) => 1,
            SubList::Many(v) => v.len(),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(super) fn get(&self, i: usize) -> Option<&SubRef> {
        match self {
            SubList::Empty => None,
            SubList::One(s) => (i == 0).then_some(s),
            SubList::Many(v) => v.get(i),
        }
    }

    pub(super) fn iter(&self) -> std::slice::Iter<'_, SubRef> {
        match self {
            SubList::Empty => [].iter(),
            SubList::One(s) => std::slice::from_ref(s).iter(),
            SubList::Many(v) => v.iter(),
        }
    }

    pub(super) fn push(&mut self, s: SubRef) {
        match self {
            SubList::Empty => *self = SubList::One(s),
            SubList::One(first) => *self = SubList::Many(Box::new(vec![*first, s])),
            SubList::Many(v) => v.push(s),
        }
    }

    pub(super) fn swap_remove(&mut self, i: usize) {
        match self {
            SubList::Empty => debug_assert!(false, "swap_remove on no subscribers"),
            SubList::One(_) => {
                debug_assert_eq!(i, 0);
                *self = SubList::Empty;
            }
            SubList::Many(v) => {
                v.swap_remove(i);
                if v.len() == 1 {
                    *self = SubList::One(v[0]);
                }
            }
        }
    }
}

#[derive(Default)]
struct Log {
    entries: VecDeque<LogEntry>,
    /// Cumulative bytes before `entries[0]` (counted from the log's making).
    base_bytes: u64,
}

impl LocalTopic {
    pub(super) fn new(last_retry: Option<u32>) -> LocalTopic {
        LocalTopic {
            subs: SubList::Empty,
            log: None,
            base: 0,
            last_retry,
        }
    }

    pub(super) fn end(&self) -> u64 {
        self.base + self.log.as_ref().map_or(0, |l| l.entries.len() as u64)
    }

    pub(super) fn end_bytes(&self) -> u64 {
        self.log
            .as_ref()
            .map_or(0, |l| l.entries.back().map_or(l.base_bytes, |e| e.end))
    }

    /// Whether the log's box exists (it is dropped with its last entry).
    #[cfg(test)]
    pub(super) fn has_log(&self) -> bool {
        self.log.is_some()
    }

    /// Bytes held in the log (not yet written to every local subscriber).
    pub(super) fn pending_bytes(&self) -> u64 {
        self.log
            .as_ref()
            .map_or(0, |l| self.end_bytes() - l.base_bytes)
    }

    /// Cumulative bytes before absolute index `i`.
    pub(super) fn bytes_before(&self, i: u64) -> u64 {
        let Some(l) = self.log.as_ref() else {
            return 0;
        };
        match i.checked_sub(self.base + 1) {
            Some(k) => l.entries[k as usize].end,
            None => l.base_bytes,
        }
    }

    pub(super) fn entry(&self, i: u64) -> Option<&Arc<Event>> {
        let k = i.checked_sub(self.base)?;
        self.log.as_ref()?.entries.get(k as usize).map(|e| &e.ev)
    }

    pub(super) fn push(&mut self, ev: Arc<Event>) {
        let end = self.end_bytes() + ev.wire_len() as u64;
        self.log
            .get_or_insert_with(Box::default)
            .entries
            .push_back(LogEntry { ev, end });
    }

    /// Drop entries below absolute index `upto`; returns the bytes dropped.
    pub(super) fn trim(&mut self, upto: u64) -> u64 {
        let before = self.pending_bytes();
        if upto <= self.base {
            return 0;
        }
        let Some(l) = self.log.as_mut() else {
            return 0;
        };
        let k = (upto - self.base) as usize;
        if k >= l.entries.len() {
            self.log = None;
        } else {
            l.base_bytes = l.entries[k - 1].end;
            l.entries.drain(..k);
        }
        self.base = upto;
        before - self.pending_bytes()
    }
}

/// Connection and stream churn between two heap trims, at least.
pub const TRIM_CHURN: u64 = 1024;

impl<H: Default> Core<H> {
    // ---- fan-out ------------------------------------------------------------------

    /// Take everything the hub queued for this worker.
    pub fn drain_inbox(&mut self) {
        let shared = self.shared.clone();
        let inbox = shared.hub.inbox(self.id);
        inbox.unpark();
        while let Some(msg) = inbox.pop() {
            self.handle_msg(msg);
        }
        if !self.parked.is_empty() {
            self.resume_parked();
        }
    }

    pub(super) fn handle_msg(&mut self, msg: BusMsg) {
        match msg {
            BusMsg::Event(ev) => self.handle_event(ev),
            BusMsg::Close(name) => self.handle_topic_close(&name),
            BusMsg::Revoke(what, at) => self.handle_revoke(&what, at),
            BusMsg::Gap(ev) => self.handle_gap(ev),
            BusMsg::Answer(a) => self.handle_answer(*a),
            BusMsg::Replay(r) => self.handle_fetched(*r),
        }
    }

    /// A replay batch fetched from Redis (`--cluster`), for a stream still waiting for it.
    fn handle_fetched(&mut self, f: crate::cluster::Fetched) {
        let Some(conn) = self.conns.get_mut(f.conn as usize) else {
            return;
        };
        let waiting = conn.gen == f.gen
            && matches!(conn.phase, Phase::Stream | Phase::Drain)
            && conn.replay.as_ref().is_some_and(|r| r.remote && r.asked);
        if !waiting {
            return;
        }
        let http10 = conn.has(flag::HTTP10);
        // Appended behind whatever `pre` holds (a keep-alive, perhaps partly written):
        // live frames wait until the replay is over, so nothing is queued in front.
        if let Some(gap) = &f.batch.gap {
            conn.pre.push_back(super::piece(gap, http10));
        }
        for ev in &f.batch.events {
            conn.pre.push_back(super::piece(&ev.frame, http10));
        }
        match conn.replay.as_mut() {
            Some(cur) if !f.batch.done => {
                cur.after = f.after;
                cur.last_id = f.last_id;
                cur.asked = false;
                cur.started = true;
            }
            _ => conn.replay = None,
        }
        self.mark_ready(f.conn);
    }

    /// Events were lost upstream (`--cluster`): every stream here gets `ev`, the
    /// `herald-gap`, in order after what it was sent before.
    fn handle_gap(&mut self, ev: Arc<Event>) {
        let live: Vec<u32> = self
            .topics
            .ids()
            .filter(|&t| !self.topics[t as usize].subs.is_empty())
            .collect();
        for t in live {
            self.fan_out(t, ev.clone());
        }
    }

    /// Redis's answer to a `POST /publish` handed over (`--cluster`), for a connection
    /// still waiting for it.
    fn handle_answer(&mut self, a: crate::cluster::Answer) {
        let waiting = self
            .conns
            .get(a.conn as usize)
            .is_some_and(|cn| cn.gen == a.gen && cn.phase == Phase::Await);
        if !waiting {
            return;
        }
        if a.ok {
            self.counters.http_publishes += 1;
        }
        self.respond(a.conn, a.response, a.keep);
    }

    /// Whether the backend should hand freed heap pages back to the kernel before it
    /// blocks (`engine::sys::release_free_heap`): once at least [`TRIM_CHURN`] connections
    /// and h2 streams have opened or closed since the last time. The memory of a burst of
    /// arrivals (or departures) is returned once the burst is over, at a cost of about a
    /// microsecond per connection, and a steady trickle or a busy worker never pays it.
    pub fn heap_trim_due(&mut self) -> bool {
        let c = &self.counters;
        let churn = c.connections_accepted + c.connections_closed + 2 * c.h2_streams;
        if churn.saturating_sub(self.churn_at_trim) < TRIM_CHURN {
            return false;
        }
        self.churn_at_trim = churn;
        true
    }

    /// Block-ready check: returns false if the inbox got something meanwhile.
    pub fn park(&self) -> bool {
        self.shared.hub.inbox(self.id).park()
    }

    /// The worker is running again after a block: publishers (ingest, hosted here) need
    /// not wake it. Call first thing after the wait returns.
    pub fn unpark(&self) {
        self.shared.hub.inbox(self.id).unpark();
    }

    pub(super) fn handle_event(&mut self, ev: Arc<Event>) {
        self.counters.events_received += 1;
        let Some(t) = self.topics.id(&ev.topic) else {
            return;
        };
        self.fan_out(t, ev);
    }

    /// Append `ev` to local topic `t`'s log and mark its subscribers ready (or cut the
    /// ones too far behind).
    fn fan_out(&mut self, t: u32, ev: Arc<Event>) {
        let max_backlog = self.shared.config.max_backlog as u64;
        let topic = &mut self.topics[t as usize];
        self.counters.fanout_backlog_bytes += ev.wire_len() as u64;
        if ev.retry.is_some() {
            topic.last_retry = ev.retry;
        }
        topic.push(ev);
        let end = topic.end_bytes();
        let topic = &self.topics[t as usize];
        let mut min_cursor = topic.end();
        for sref in topic.subs.iter() {
            let Some(conn) = self.conns.get_mut(sref.conn as usize) else {
                continue;
            };
            let sub = conn.subs.as_slice()[sref.slot as usize];
            min_cursor = min_cursor.min(sub.cursor);
            if conn.phase == Phase::Closing {
                continue;
            }
            // The backlog is per connection: a multi-topic subscriber's topics add up.
            let backlog = match &conn.subs {
                Subs::Many(subs) => subs.iter().map(|s| backlog_of(&self.topics, s)).sum(),
                _ => end - topic.bytes_before(sub.cursor),
            };
            if backlog > max_backlog {
                // Too slow: it resumes with Last-Event-ID after reconnecting.
                conn.phase = Phase::Closing;
                self.closing.push(sref.conn);
                self.counters.slow_consumer_disconnects += 1;
                if conn.has(flag::H2S) {
                    self.counters.h2_slow_streams += 1;
                }
                if let Some(Some(i)) = self.info.get_mut(sref.conn as usize) {
                    i.slow();
                }
                continue;
            }
            if conn.flags & (flag::READY | flag::WRITING) == 0 {
                conn.flags |= flag::READY;
                self.ready.push(sref.conn);
            }
        }
        self.counters.fanout_backlog_bytes -= self.topics[t as usize].trim(min_cursor);
    }

    pub(super) fn handle_topic_close(&mut self, name: &str) {
        let Some(t) = self.topics.id(name) else {
            return;
        };
        let conns: Vec<ConnId> = self.topics[t as usize]
            .subs
            .iter()
            .map(|s| s.conn)
            .collect();
        for c in conns {
            self.counters.topics_closed_streams += 1;
            self.set_reason(c, super::auth::EndReason::TopicClosed);
            self.start_drain(c, false, 0);
        }
    }
}

/// Bytes between a subscription's cursor and its topic's log end.
fn backlog_of(topics: &NameTable<LocalTopic>, s: &Sub) -> u64 {
    let t = &topics[s.topic as usize];
    t.end_bytes() - t.bytes_before(s.cursor)
}

/// Visit the live frames pending for a set of subscriptions in publish (`seq`) order,
/// calling `f(slot, event)` until it returns false. One subscription walks its log
/// directly; several are merged by sequence.
pub(super) fn walk_live<'a>(
    subs: &[Sub],
    topics: &'a NameTable<LocalTopic>,
    mut f: impl FnMut(usize, &'a Event) -> bool,
) {
    match subs {
        [] => {}
        [s] => {
            let t = &topics[s.topic as usize];
            let mut i = s.cursor;
            while let Some(ev) = t.entry(i) {
                if !f(0, ev) {
                    return;
                }
                i += 1;
            }
        }
        many => {
            // Merge by sequence over copies of the cursors (no allocation up to 64 topics).
            let mut small = [0u64; 64];
            let mut large = Vec::new();
            let cur: &mut [u64] = if many.len() <= small.len() {
                &mut small[..many.len()]
            } else {
                large.resize(many.len(), 0);
                &mut large
            };
            for (k, s) in many.iter().enumerate() {
                cur[k] = s.cursor;
            }
            while let Some(k) = next_in_order(many, |k| cur[k], topics) {
                let ev = topics[many[k].topic as usize]
                    .entry(cur[k])
                    .expect("checked");
                cur[k] += 1;
                if !f(k, ev) {
                    return;
                }
            }
        }
    }
}

/// The subscription whose next pending event (at `cursor(k)` in its log) has the lowest
/// sequence.
pub(super) fn next_in_order(
    subs: &[Sub],
    cursor: impl Fn(usize) -> u64,
    topics: &NameTable<LocalTopic>,
) -> Option<usize> {
    let mut best: Option<(usize, u64)> = None;
    for (k, s) in subs.iter().enumerate() {
        if let Some(ev) = topics[s.topic as usize].entry(cursor(k)) {
            if best.is_none_or(|(_, seq)| ev.seq < seq) {
                best = Some((k, ev.seq));
            }
        }
    }
    best.map(|(k, _)| k)
}

/// Advance the cursors of `subs` over `left` written bytes of live frames, in the same
/// order [`walk_live`] produced them. Returns (events completed, bytes into the next one).
pub(super) fn consume_live(
    subs: &mut [Sub],
    topics: &NameTable<LocalTopic>,
    mut left: usize,
    http10: bool,
) -> (u64, u32) {
    let mut delivered = 0;
    loop {
        let k = match subs.len() {
            0 => return (delivered, 0),
            1 => 0,
            // The cursors themselves move here, so no copy is needed.
            _ => match next_in_order(subs, |k| subs[k].cursor, topics) {
                Some(k) => k,
                None => return (delivered, 0),
            },
        };
        let Some(ev) = topics[subs[k].topic as usize].entry(subs[k].cursor) else {
            return (delivered, 0);
        };
        let len = frame_of(ev, http10).len();
        if left < len {
            return (delivered, left as u32);
        }
        left -= len;
        subs[k].cursor += 1;
        delivered += 1;
        if left == 0 {
            return (delivered, 0);
        }
    }
}
