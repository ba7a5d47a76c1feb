//! The hub: the only cross-thread synchronisation in herald. A publish assigns the event's
//! sequence, encodes it once, appends it to the topic history and hands one `Arc<Event>`
//! to every worker's bounded inbox, all under one short lock, so every inbox sees events
//! in sequence order and everything a worker has seen is already in the history. A worker
//! is woken only when it is parked.

use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_queue::ArrayQueue;

use super::table::{EventId, NameTable, TopicName};
use super::topic::{Event, History, Limits};
use crate::sse::encode::{chunk, encode_event, Frame};
use crate::sse::event::{Publish, PublishError};

/// Topic slots the janitor visits per call.
pub const JANITOR_SLICE: usize = 4096;

/// Events a worker may have queued before publishers wait for it.
pub const INBOX_CAPACITY: usize = 1 << 16;

/// What the hub hands to workers.
#[derive(Debug)]
pub enum BusMsg {
    Event(Arc<Event>),
    /// End every stream of this topic.
    Close(TopicName),
    /// End the streams a revocation covers (made at the unix second given).
    Revoke(crate::auth::Revoke, u64),
    /// `--cluster`: events were lost upstream; every stream gets this `herald-gap`.
    Gap(Arc<Event>),
    /// `--cluster`: Redis's answer to a `POST /publish` this worker handed over.
    Answer(Box<crate::cluster::Answer>),
    /// `--cluster`: a batch of a replay fetched from Redis for one connection.
    Replay(Box<crate::cluster::Fetched>),
}

/// How a parked worker is woken (an eventfd write, a mio `Waker`).
pub trait Wake: Send + Sync {
    fn wake(&self);
}

/// One worker's inbox: bounded, single consumer.
pub struct Inbox {
    queue: ArrayQueue<BusMsg>,
    parked: AtomicBool,
    waker: OnceLock<Box<dyn Wake>>,
}

impl Inbox {
    fn new() -> Inbox {
        Inbox {
            queue: ArrayQueue::new(INBOX_CAPACITY),
            parked: AtomicBool::new(false),
            waker: OnceLock::new(),
        }
    }

    pub fn pop(&self) -> Option<BusMsg> {
        self.queue.pop()
    }

    pub fn set_waker(&self, waker: Box<dyn Wake>) {
        // A second registration (a backend restarted on the same inbox) keeps the first.
        let _ = self.waker.set(waker);
    }

    /// Called by the worker before it blocks. Returns false if it must not block because
    /// something arrived; the SeqCst pair with [`Inbox::notify`] closes the race.
    pub fn park(&self) -> bool {
        self.parked.store(true, Ordering::SeqCst);
        if self.queue.is_empty() {
            true
        } else {
            self.parked.store(false, Ordering::SeqCst);
            false
        }
    }

    pub fn unpark(&self) {
        self.parked.store(false, Ordering::Relaxed);
    }

    /// Wake the worker if it is parked; returns whether it was.
    fn notify(&self) -> bool {
        let parked = self.parked.swap(false, Ordering::SeqCst);
        if parked {
            self.wake();
        }
        parked
    }

    pub fn wake(&self) {
        if let Some(w) = self.waker.get() {
            w.wake();
        }
    }
}

/// Publishes whose wake-ups are sent together; see [`Hub::batch`].
pub struct PublishBatch<'h> {
    hub: &'h Hub,
    /// Workers sent something since the last wake-up.
    wake: u64,
}

impl PublishBatch<'_> {
    /// Publish, waiting (without the lock) while a target worker's inbox is full.
    pub fn publish(&mut self, p: Publish) -> Result<Published, PublishError> {
        self.publish_making_room(p, &mut || {})
    }

    /// [`PublishBatch::publish`] from a worker: while it waits, `make_room` empties the
    /// worker's own inbox, which nobody else can.
    pub fn publish_making_room(
        &mut self,
        p: Publish,
        make_room: &mut dyn FnMut(),
    ) -> Result<Published, PublishError> {
        loop {
            match self.hub.try_publish_deferred(&p, &mut self.wake) {
                Ok(done) => return Ok(done),
                Err(PublishFailure::Invalid(e)) => return Err(e),
                Err(PublishFailure::Busy) => {
                    // The full worker must be awake to make room.
                    self.flush();
                    make_room();
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        }
    }

    /// Publish an event whose sequence and id were given upstream (`--cluster`: the
    /// Redis stream entry), waiting while a target worker's inbox is full. A `past`
    /// event (published before this process started serving) goes into the history
    /// only: no stream here was open when it was published, so it is resume material,
    /// not news.
    pub fn publish_at(
        &mut self,
        seq: u64,
        id: EventId,
        p: Publish,
        past: bool,
    ) -> Result<(), PublishError> {
        let given = Some((seq, id, past));
        loop {
            match self.hub.publish_deferred(&p, given.clone(), &mut self.wake) {
                Ok(_) => return Ok(()),
                Err(PublishFailure::Invalid(e)) => return Err(e),
                Err(PublishFailure::Busy) => {
                    self.flush();
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        }
    }

    /// Wake the workers sent something so far.
    pub fn flush(&mut self) {
        self.hub.notify(std::mem::take(&mut self.wake));
    }
}

impl Drop for PublishBatch<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Publisher-side outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub id: EventId,
    pub seq: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PublishFailure {
    #[error(transparent)]
    Invalid(#[from] PublishError),
    #[error("a worker is {INBOX_CAPACITY} events behind; retry")]
    Busy,
}

/// Events a replay hands a worker per [`Hub::replay_batch`], at most (bytes, then count):
/// a resumer holds at most one batch besides its live backlog, and the hub lock is held
/// for one batch's work, never for the whole history.
pub const REPLAY_BATCH_BYTES: usize = 64 << 10;
pub const REPLAY_BATCH_EVENTS: usize = 256;

/// What a new subscription starts with.
#[derive(Debug, Default)]
pub struct Attach {
    /// A requested topic was ended by a control message: answer 204.
    pub closed: bool,
    /// `event: herald-gap` frame to send before the replay.
    pub gap: Option<Frame>,
    /// Where the replay of retained events starts and ends; fetched batch by batch.
    pub replay: Option<ReplayCursor>,
    /// The last `retry` an event of the requested topics carried (their highest).
    pub last_retry: Option<u32>,
    /// What was in the worker's inbox: handle it before the new stream starts.
    pub pending: Vec<BusMsg>,
    /// The hub's shared name of each requested topic, in order (one allocation per
    /// topic name in the process, not one per worker).
    pub names: Vec<TopicName>,
}

/// A replay in progress: everything retained with `after < seq <= upto` is still to come.
#[derive(Debug)]
pub struct ReplayCursor {
    pub after: u64,
    pub upto: u64,
    /// The id of the last event the client has been given (for a gap signal).
    pub last_id: EventId,
    /// `--cluster`: this node's history lost part of the range, Redis may still have it:
    /// batches are fetched from Redis off the worker ([`crate::cluster::Fetch`]).
    pub remote: bool,
    /// A remote batch has been asked for and not come back yet.
    pub asked: bool,
    /// A remote batch came back already (Redis's losses are checked on the first).
    pub started: bool,
}

/// One batch of a replay.
#[derive(Debug, Default)]
pub struct ReplayBatch {
    /// Events that were evicted while the replay ran: the client is told before the rest.
    pub gap: Option<Frame>,
    pub events: Vec<Arc<Event>>,
    /// Nothing is left to replay.
    pub done: bool,
}

/// Counters the hub keeps (per event or per subscription, never per delivery).
#[derive(Debug, Default)]
pub struct HubStats {
    pub published: AtomicU64,
    pub rejected: AtomicU64,
    pub replays: AtomicU64,
    pub replayed_events: AtomicU64,
    pub gaps: AtomicU64,
    pub topics_closed: AtomicU64,
    /// Parked workers woken by a publisher (once per batch, never per delivery).
    pub wakeups: AtomicU64,
    /// How long the last history janitor pass held the lock, in µs.
    pub janitor_micros: AtomicU64,
}

/// One line of a history file.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum Snapshot {
    Header {
        start_seq: u64,
        last_seq: u64,
    },
    Topic {
        topic: String,
        evicted_upto: u64,
        closed: bool,
    },
    Event {
        seq: u64,
        id: String,
        age_ms: u64,
        sse: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry: Option<u32>,
    },
}

/// 32 bytes for a topic with no retained event (an idle per-user topic).
struct TopicState {
    history: History,
    /// Workers with a subscriber for this topic (bit k = worker k): only they are sent
    /// its events. Unused (everyone gets everything) with more than 64 workers.
    interest: u64,
    /// The last `retry` published on this topic, if `has_retry` (an `Option<u32>` and a
    /// bool would take 8 bytes more).
    retry: u32,
    has_retry: bool,
    closed: bool,
}

impl TopicState {
    fn last_retry(&self) -> Option<u32> {
        self.has_retry.then_some(self.retry)
    }

    fn set_retry(&mut self, retry: Option<u32>) {
        if let Some(r) = retry {
            (self.retry, self.has_retry) = (r, true);
        }
    }

    /// A topic herald has no state for: it may have lost anything up to `forgotten`
    /// (see [`State::forgotten_upto`]).
    fn fresh(forgotten: u64) -> TopicState {
        TopicState {
            history: History::restored(Vec::new(), forgotten),
            interest: 0,
            retry: 0,
            has_retry: false,
            closed: false,
        }
    }
}

struct State {
    topics: NameTable<TopicState>,
    last_seq: u64,
    /// The highest `evicted_upto` of the topics the janitor forgot: a topic with no state
    /// may have lost anything up to it.
    forgotten_upto: u64,
    /// Where the janitor's next slice starts (a topic slot).
    janitor_at: usize,
    /// Anything at or below this may have been lost upstream (`--cluster`: Redis lost or
    /// trimmed entries this node had not read), in every topic.
    gap_floor: u64,
    /// The id of the newest event.
    last_id: EventId,
    /// `--cluster`: the epoch of the Redis data ids carry (None before any).
    epoch: Option<EventId>,
    /// Retained events and bytes over all topics, kept as they change (so /metrics does
    /// not walk the topics under the lock).
    events: usize,
    bytes: usize,
}

impl State {
    /// How far `topic` may have lost events (nothing after it was evicted).
    fn evicted_upto(&self, topic: &str) -> u64 {
        self.topics
            .get(topic)
            .map_or(self.forgotten_upto, |t| t.history.evicted_upto())
            .max(self.gap_floor)
    }

    /// The position a resume id stands for, if it is one herald assigned (in this epoch,
    /// with `--cluster`).
    fn position(&self, id: &str, cluster: bool) -> Option<u64> {
        if !cluster {
            return id.parse::<u64>().ok();
        }
        let epoch = self.epoch.as_deref()?;
        let (_, e) = id.rsplit_once('-')?;
        (e == epoch)
            .then(|| super::topic::position_of(id))
            .flatten()
    }
}

pub struct Hub {
    state: Mutex<State>,
    inboxes: Box<[Inbox]>,
    limits: Limits,
    /// Most topics with state (history or a close marker); publishes that would create
    /// another are refused.
    max_topics: usize,
    /// First sequence whose events this process knows about (its own start, or the start
    /// of the run whose history it restored): ids below it come from an earlier run.
    start_seq: AtomicU64,
    /// `--cluster`: sequences and ids come from the Redis stream, not from here.
    cluster: AtomicBool,
    pub stats: HubStats,
}

/// The registry's shared name for `topic`, or a new one.
fn intern(st: &State, topic: &str) -> TopicName {
    match st.topics.get_key_value(topic) {
        Some((k, _)) => k.clone(),
        None => topic.into(),
    }
}

/// `event: herald-gap` naming the id the client asked for and the oldest one retained.
pub(crate) fn gap_frame(requested: &str, oldest: Option<&str>) -> Frame {
    let data = serde_json::json!({ "requested": requested, "oldest": oldest }).to_string();
    // No `id:` line: an empty one would reset the client's lastEventId. serde_json
    // output has no raw newline, so it is one `data:` line.
    chunk(format!("event: herald-gap\ndata: {data}\n\n").as_bytes())
}

/// Microseconds since the Unix epoch: the base of herald's ids.
fn wall_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl Hub {
    pub fn new(workers: usize, limits: Limits) -> Hub {
        Hub {
            state: Mutex::new(State {
                topics: NameTable::default(),
                last_seq: 0,
                forgotten_upto: 0,
                janitor_at: 0,
                gap_floor: 0,
                last_id: EventId::default(),
                epoch: None,
                events: 0,
                bytes: 0,
            }),
            inboxes: (0..workers).map(|_| Inbox::new()).collect(),
            limits,
            max_topics: usize::MAX,
            start_seq: AtomicU64::new(wall_micros()),
            cluster: AtomicBool::new(false),
            stats: HubStats::default(),
        }
    }

    /// Cap the number of topics the hub keeps state for.
    pub fn with_max_topics(mut self, max: usize) -> Hub {
        self.max_topics = max;
        self
    }

    /// `--cluster`: events come from the Redis stream with their sequence and id (see
    /// [`PublishBatch::publish_at`]); every position in the epoch is one herald can
    /// place, what Redis no longer retains being marked with [`Hub::mark_lost_upto`].
    pub fn set_cluster(&self) {
        self.cluster.store(true, Ordering::Relaxed);
        self.start_seq.store(0, Ordering::Relaxed);
    }

    pub fn is_cluster(&self) -> bool {
        self.cluster.load(Ordering::Relaxed)
    }

    /// The epoch of the Redis data (`--cluster`); ids of any other resume with a gap.
    pub fn set_epoch(&self, epoch: Option<&str>) {
        self.lock().epoch = epoch.map(EventId::new);
    }

    /// The newest sequence this hub has.
    pub fn newest_seq(&self) -> u64 {
        self.lock().last_seq
    }

    /// `--cluster`: the sequence `id` stands for, if it is a position of this epoch the
    /// reader has not reached yet (the client got it from a node that is ahead).
    pub fn ahead_of_reader(&self, id: &str) -> Option<u64> {
        if !self.is_cluster() {
            return None;
        }
        let st = self.lock();
        st.position(id, true).filter(|&seq| seq > st.last_seq)
    }

    /// The epoch of the Redis data (`--cluster`).
    pub fn epoch(&self) -> Option<EventId> {
        self.lock().epoch.clone()
    }

    /// Anything up to `seq` may be lost (Redis no longer retains it).
    pub fn mark_lost_upto(&self, seq: u64) {
        let mut st = self.lock();
        st.gap_floor = st.gap_floor.max(seq);
    }

    /// Events were lost upstream after the newest one here: every open stream gets an
    /// `event: herald-gap` (data: the reason and the last id before the gap), and a resume
    /// from before this point gets a gap signal too.
    pub fn live_gap(&self, reason: &str) {
        let all = self.all_workers();
        let st = loop {
            let st = self.lock();
            if self.has_room(all) {
                break st;
            }
            drop(st);
            std::thread::sleep(Duration::from_micros(200));
        };
        let mut st = st;
        // The gap takes a sequence of its own: whatever was lost lies at or below it, so a
        // resume from the last event before it is told (and the next event is above it).
        st.last_seq += 1;
        st.gap_floor = st.last_seq;
        let after = (!st.last_id.is_empty()).then(|| st.last_id.to_string());
        let data = serde_json::json!({ "reason": reason, "after": after }).to_string();
        let ev = Arc::new(Event {
            seq: st.last_seq,
            topic: TopicName::default(),
            id: EventId::default(),
            frame: chunk(format!("event: herald-gap\ndata: {data}\n\n").as_bytes()),
            retry: None,
            at: Instant::now(),
        });
        self.send_to(st, all, || BusMsg::Gap(ev.clone()));
        self.notify(all);
        self.stats.gaps.fetch_add(1, Ordering::Relaxed);
    }

    /// Hand `msg` to one worker (waiting while its inbox is full) and wake it.
    pub fn deliver(&self, worker: usize, msg: BusMsg) {
        let st = loop {
            let st = self.lock();
            if self.inboxes[worker].queue.len() < INBOX_CAPACITY {
                break st;
            }
            drop(st);
            std::thread::sleep(Duration::from_micros(200));
        };
        let pushed = self.inboxes[worker].queue.push(msg);
        debug_assert!(pushed.is_ok());
        drop(st);
        if self.inboxes[worker].notify() {
            self.stats.wakeups.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn all_workers(&self) -> u64 {
        match self.inboxes.len() {
            n if n >= 64 => u64::MAX,
            n => (1u64 << n) - 1,
        }
    }

    pub fn inbox(&self, worker: usize) -> &Inbox {
        &self.inboxes[worker]
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-updated in a way that
        // matters more than stopping: keep serving with what is there.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publish, waiting (without holding the lock) while a worker's inbox is full.
    /// For threads that are not workers: a worker must use [`Hub::try_publish`].
    pub fn publish(&self, p: Publish) -> Result<Published, PublishError> {
        self.batch().publish(p)
    }

    /// A batch of publishes: each worker the batch sends events to is woken once, when the
    /// batch ends (or before the batch waits for room), not once per event; a worker that
    /// is awake (the one hosting ingest, say) is not woken at all. No timer is involved: a batch is what the caller
    /// already has in hand, such as the lines of one read.
    pub fn batch(&self) -> PublishBatch<'_> {
        PublishBatch { hub: self, wake: 0 }
    }

    /// Publish if every inbox has room; never blocks.
    pub fn try_publish(&self, p: &Publish) -> Result<Published, PublishFailure> {
        let mut wake = 0;
        let r = self.try_publish_deferred(p, &mut wake);
        self.notify(wake);
        r
    }

    /// [`Hub::try_publish`], adding the workers to wake to `wake` instead of waking them.
    fn try_publish_deferred(
        &self,
        p: &Publish,
        wake: &mut u64,
    ) -> Result<Published, PublishFailure> {
        self.publish_deferred(p, None, wake)
    }

    /// Publish with the sequence and id assigned here, or `given` upstream (with
    /// whether it is history only).
    fn publish_deferred(
        &self,
        p: &Publish,
        given: Option<(u64, EventId, bool)>,
        wake: &mut u64,
    ) -> Result<Published, PublishFailure> {
        if let Err(e) = p.validate() {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(e.into());
        }
        let now = Instant::now();
        let mut st = self.lock();
        let past = given.as_ref().is_some_and(|g| g.2);
        let targets = match past {
            true => 0,
            false => self.targets(st.topics.get(p.topic.as_str())),
        };
        if !self.has_room(targets) {
            return Err(PublishFailure::Busy);
        }
        if st.topics.len() >= self.max_topics && !st.topics.contains(p.topic.as_str()) {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            let max = self.max_topics;
            return Err(PublishError::TooManyTopics { max }.into());
        }
        let (seq, id) = match given {
            // An upstream sequence that does not move forward (a Redis whose clock went
            // back across a new epoch) still gets a place after everything here.
            Some((seq, id, _)) => (seq.max(st.last_seq + 1), id),
            None => {
                let seq = (st.last_seq + 1).max(wall_micros());
                let id = match &p.id {
                    Some(id) => EventId::new(id),
                    None => smol_str::ToSmolStr::to_smolstr(&seq),
                };
                (seq, id)
            }
        };
        st.last_seq = seq;
        st.last_id = id.clone();
        let frame = encode_event(p.event.as_deref(), &id, p.retry, &p.data);
        let topic = intern(&st, &p.topic);
        let ev = Arc::new(Event {
            seq,
            topic: topic.clone(),
            id: id.clone(),
            frame,
            retry: p.retry,
            at: now,
        });
        let forgotten = st.forgotten_upto;
        let i = st
            .topics
            .get_or_insert_with(&topic, || TopicState::fresh(forgotten));
        let t = &mut st.topics[i as usize];
        t.closed = false;
        t.set_retry(p.retry);
        let (n0, b0) = (t.history.len(), t.history.bytes());
        t.history.push(ev.clone(), &self.limits, now);
        let (n1, b1) = (t.history.len(), t.history.bytes());
        st.events = st.events + n1 - n0;
        st.bytes = st.bytes + b1 - b0;
        self.send_to(st, targets, || BusMsg::Event(ev.clone()));
        *wake |= targets;
        self.stats.published.fetch_add(1, Ordering::Relaxed);
        Ok(Published { id, seq })
    }

    /// End every stream of `topic`; until the next publish, subscribing answers 204.
    pub fn close_topic(&self, topic: &str) {
        let (mut st, targets) = loop {
            let st = self.lock();
            let targets = self.targets(st.topics.get(topic));
            if self.has_room(targets) {
                break (st, targets);
            }
            drop(st);
            std::thread::sleep(Duration::from_micros(200));
        };
        let name = intern(&st, topic);
        // At the topic cap a topic herald has no state for gets no close marker (its
        // streams still end); every known one does.
        if st.topics.len() < self.max_topics || st.topics.contains(topic) {
            let forgotten = st.forgotten_upto;
            let i = st
                .topics
                .get_or_insert_with(&name, || TopicState::fresh(forgotten));
            st.topics[i as usize].closed = true;
        }
        self.send_to(st, targets, || BusMsg::Close(name.clone()));
        self.notify(targets);
        self.stats.topics_closed.fetch_add(1, Ordering::Relaxed);
    }

    /// Tell every worker about a revocation (already recorded by [`crate::auth::Auth`], so
    /// no stream it covers can start after this).
    pub fn revoke(&self, what: &crate::auth::Revoke, at: u64) {
        let all = self.all_workers();
        let st = loop {
            let st = self.lock();
            if self.has_room(all) {
                break st;
            }
            drop(st);
            std::thread::sleep(Duration::from_micros(200));
        };
        self.send_to(st, all, || BusMsg::Revoke(what.clone(), at));
        self.notify(all);
    }

    /// The workers a message for `topic` goes to: those with a subscriber for it.
    fn targets(&self, topic: Option<&TopicState>) -> u64 {
        if self.inboxes.len() > 64 {
            return u64::MAX;
        }
        topic.map_or(0, |t| t.interest)
    }

    /// The inboxes in `targets`, in worker order.
    fn inboxes_in(&self, targets: u64) -> impl Iterator<Item = &Inbox> {
        self.inboxes
            .iter()
            .enumerate()
            .filter(move |(k, _)| *k >= 64 || targets & (1 << k) != 0)
            .map(|(_, i)| i)
    }

    /// Every inbox in `targets` can take one more message. Only publishers push, and they
    /// hold the lock, so room seen under the lock is still there when they push.
    fn has_room(&self, targets: u64) -> bool {
        self.inboxes_in(targets)
            .all(|i| i.queue.len() < INBOX_CAPACITY)
    }

    /// Push one message to each inbox in `targets` (room checked with [`Hub::has_room`]
    /// under the same lock) and release the lock; the caller then wakes them
    /// ([`Hub::notify`]). A worker with no subscriber for the topic is neither sent nor
    /// woken.
    fn send_to(&self, st: MutexGuard<'_, State>, targets: u64, msg: impl Fn() -> BusMsg) {
        for inbox in self.inboxes_in(targets) {
            let pushed = inbox.queue.push(msg());
            debug_assert!(pushed.is_ok());
        }
        drop(st);
    }

    /// Wake the workers in `targets` that are parked.
    fn notify(&self, targets: u64) {
        for inbox in self.inboxes_in(targets) {
            if inbox.notify() {
                self.stats.wakeups.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Worker `worker` has no subscriber for `topic` any more: stop sending it its events.
    /// A topic left with no history, no close marker and no interest is forgotten.
    pub fn unsubscribe(&self, worker: usize, topic: &str) {
        if worker >= 64 {
            return;
        }
        let mut st = self.lock();
        let st = &mut *st;
        if let Some(t) = st.topics.get_mut(topic) {
            t.interest &= !(1 << worker);
            if t.interest == 0 && !t.closed && t.history.is_empty() {
                st.forgotten_upto = st.forgotten_upto.max(t.history.evicted_upto());
                st.topics.remove(topic);
            }
        }
    }

    /// Start a subscription on worker `worker`. Under the lock, the worker is registered
    /// for every requested topic and its inbox is emptied into [`Attach::pending`]: the
    /// worker handles those first, so it has then seen everything published up to the
    /// replay's `upto` (the newest sequence) for its topics, and everything after reaches
    /// its inbox. The replay covers `(client's id, upto]` and live delivery continues
    /// after it: no gap and no duplicate at the hand-over, even for a worker that gains
    /// its first subscriber for a topic while events are published. The events themselves
    /// come in batches from [`Hub::replay_batch`].
    ///
    /// The client's id resumes without a gap only if it is one herald retains for a
    /// requested topic, or a number it can prove is a position within the retained range:
    /// at or after this run's start, not past the newest sequence, and with nothing after
    /// it evicted from any requested topic.
    pub fn attach(&self, worker: usize, topics: &[String], last_id: Option<&str>) -> Attach {
        let mut st = self.lock();
        let pending: Vec<BusMsg> =
            std::iter::from_fn(|| self.inboxes[worker].queue.pop()).collect();
        let upto = st.last_seq;
        let closed = topics
            .iter()
            .any(|t| st.topics.get(t.as_str()).is_some_and(|s| s.closed));
        if worker < 64 && !closed {
            let forgotten = st.forgotten_upto;
            for t in topics {
                let name = intern(&st, t);
                let i = st
                    .topics
                    .get_or_insert_with(&name, || TopicState::fresh(forgotten));
                st.topics[i as usize].interest |= 1 << worker;
            }
        }
        let st = st;
        let known = || topics.iter().filter_map(|t| st.topics.get(t.as_str()));
        let mut out = Attach {
            closed,
            last_retry: known().filter_map(TopicState::last_retry).max(),
            pending,
            names: topics.iter().map(|t| intern(&st, t)).collect(),
            ..Attach::default()
        };
        let Some(last_id) = last_id else {
            return out;
        };
        if out.closed {
            return out;
        }
        // With --cluster, an id of herald's own from another epoch is from data Redis no
        // longer has: never a position, even if an event here still carries it.
        let foreign = self.is_cluster()
            && super::topic::position_of(last_id).is_some()
            && st.position(last_id, true).is_none();
        let found = known()
            .filter(|_| !foreign)
            .find_map(|t| t.history.find_id(last_id));
        let (after, known_id) = match found {
            Some(seq) => (seq, true),
            None => match st.position(last_id, self.is_cluster()) {
                Some(seq) => {
                    let start = self.start_seq.load(Ordering::Relaxed);
                    (seq, seq >= start && seq <= st.last_seq)
                }
                None => (0, false),
            },
        };
        let lost = topics.iter().any(|t| st.evicted_upto(t) > after);
        if self.is_cluster() && known_id && lost && st.gap_floor <= after {
            // Evicted here, not lost upstream: Redis may still retain the range.
            out.replay = Some(ReplayCursor {
                after,
                upto,
                last_id: last_id.into(),
                remote: true,
                asked: false,
                started: false,
            });
            self.stats.replays.fetch_add(1, Ordering::Relaxed);
            return out;
        }
        if !known_id || lost {
            let oldest = known()
                .filter_map(|t| t.history.range(st.gap_floor, u64::MAX).next())
                .min_by_key(|e| e.seq);
            out.gap = Some(gap_frame(last_id, oldest.map(|e| &*e.id)));
            self.stats.gaps.fetch_add(1, Ordering::Relaxed);
        }
        // An unknown id replays everything retained, a known one what came after it; the
        // cursor starts past what is already lost, so only later evictions are news.
        let lost_upto = topics.iter().map(|t| st.evicted_upto(t)).max().unwrap_or(0);
        let after = if known_id { after } else { 0 }.max(lost_upto);
        out.replay = Some(ReplayCursor {
            after,
            upto,
            last_id: last_id.into(),
            remote: false,
            asked: false,
            started: false,
        });
        self.stats.replays.fetch_add(1, Ordering::Relaxed);
        out
    }

    /// The next batch of a replay over `topics`, merged in publish order, advancing
    /// `cur`. The lock is held for one batch: a binary search per topic, then the batch.
    pub fn replay_batch(&self, topics: &[&str], cur: &mut ReplayCursor) -> ReplayBatch {
        let st = self.lock();
        let mut out = ReplayBatch::default();
        let hist: Vec<&History> = topics
            .iter()
            .filter_map(|t| st.topics.get(t).map(|s| &s.history))
            .collect();
        if topics.iter().any(|t| st.evicted_upto(t) > cur.after) {
            // Evicted while the client was still being replayed to.
            let oldest = hist
                .iter()
                .filter_map(|h| h.range(st.gap_floor, u64::MAX).next())
                .min_by_key(|e| e.seq);
            out.gap = Some(gap_frame(&cur.last_id, oldest.map(|e| &*e.id)));
            self.stats.gaps.fetch_add(1, Ordering::Relaxed);
        }
        let mut iters: Vec<_> = hist
            .iter()
            .map(|h| h.range(cur.after, cur.upto).peekable())
            .collect();
        let mut bytes = 0;
        while bytes < REPLAY_BATCH_BYTES && out.events.len() < REPLAY_BATCH_EVENTS {
            let next = iters
                .iter_mut()
                .enumerate()
                .filter_map(|(k, it)| it.peek().map(|e| (e.seq, k)))
                .min();
            let Some((_, k)) = next else {
                out.done = true;
                break;
            };
            let ev = iters[k].next().expect("peeked").clone();
            bytes += ev.wire_len();
            out.events.push(ev);
        }
        if !out.done && iters.iter_mut().all(|it| it.peek().is_none()) {
            out.done = true;
        }
        if let Some(last) = out.events.last() {
            cur.after = last.seq;
            cur.last_id = last.id.clone();
        }
        self.stats
            .replayed_events
            .fetch_add(out.events.len() as u64, Ordering::Relaxed);
        out
    }

    /// Every batch of `at`'s replay (tests).
    #[cfg(test)]
    pub fn replay_all(&self, topics: &[String], at: &mut Attach) -> Vec<Arc<Event>> {
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let mut out = Vec::new();
        if let Some(cur) = at.replay.as_mut() {
            loop {
                let b = self.replay_batch(&names, cur);
                assert!(b.events.len() <= REPLAY_BATCH_EVENTS);
                out.extend(b.events);
                if b.done {
                    break;
                }
            }
        }
        out
    }

    /// Age out history and forget topics with nothing left, [`JANITOR_SLICE`] topic slots
    /// per call (the lock is never held for time proportional to the number of topics).
    /// Returns whether this call ended a lap of the topic table; if not, the caller comes
    /// back in 50 ms for the next slice (80,000 slots a second), else in a second. So a
    /// lap starts once a second at most: with 100,000 topics (25 slices), a topic no one
    /// publishes to loses its old events within about 2.5 s of their passing
    /// `--history-age` (publishing to a topic ages it out at once), and with 15,000 the
    /// janitor runs 4 times a second, not 20.
    pub fn janitor(&self) -> bool {
        let now = Instant::now();
        let mut st = self.lock();
        let held = Instant::now();
        let st = &mut *st;
        let (mut events, mut bytes, mut forgotten) = (st.events, st.bytes, st.forgotten_upto);
        let start = st.janitor_at;
        let (next, lap_done) = st.topics.retain_slice(start, JANITOR_SLICE, |_, t| {
            let (n0, b0) = (t.history.len(), t.history.bytes());
            t.history.evict(&self.limits, now);
            events -= n0 - t.history.len();
            bytes -= b0 - t.history.bytes();
            let keep = t.closed || !t.history.is_empty() || t.interest != 0;
            if !keep {
                forgotten = forgotten.max(t.history.evicted_upto());
            }
            keep
        });
        st.janitor_at = next;
        (st.events, st.bytes, st.forgotten_upto) = (events, bytes, forgotten);
        self.stats
            .janitor_micros
            .store(held.elapsed().as_micros() as u64, Ordering::Relaxed);
        lap_done
    }

    /// (topics, retained events, retained bytes) for /metrics, in O(1) under the lock.
    pub fn history_size(&self) -> (usize, usize, usize) {
        let st = self.lock();
        (st.topics.len(), st.events, st.bytes)
    }

    /// Write every retained event to `path` (through a temporary file and a rename), so
    /// the next run can resume clients without a gap. Returns the number of events.
    pub fn save_history(&self, path: &Path) -> std::io::Result<usize> {
        let st = self.lock();
        let tmp = path.with_extension("tmp");
        let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        let now = Instant::now();
        let header = Snapshot::Header {
            start_seq: self.start_seq.load(Ordering::Relaxed),
            last_seq: st.last_seq,
        };
        serde_json::to_writer(&mut out, &header)?;
        out.write_all(b"\n")?;
        let mut n = 0;
        for (name, t) in st.topics.iter() {
            let topic = Snapshot::Topic {
                topic: name.to_string(),
                evicted_upto: t.history.evicted_upto(),
                closed: t.closed,
            };
            serde_json::to_writer(&mut out, &topic)?;
            out.write_all(b"\n")?;
            for e in t.history.iter() {
                let ev = Snapshot::Event {
                    seq: e.seq,
                    id: e.id.to_string(),
                    age_ms: now.saturating_duration_since(e.at).as_millis() as u64,
                    // The body is SSE text built from UTF-8 strings.
                    sse: String::from_utf8_lossy(e.frame.body()).into_owned(),
                    retry: e.retry,
                };
                serde_json::to_writer(&mut out, &ev)?;
                out.write_all(b"\n")?;
                n += 1;
            }
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(n)
    }

    /// Load a history written by [`Hub::save_history`], then delete the file: after a
    /// crash the next start must not revive an old snapshot as if nothing happened since.
    pub fn load_history(&self, path: &Path) -> std::io::Result<usize> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        std::fs::remove_file(path)?;
        let now = Instant::now();
        let mut st = self.lock();
        struct Loaded {
            name: TopicName,
            evicted_upto: u64,
            closed: bool,
            events: Vec<Arc<Event>>,
        }
        let mut current: Option<Loaded> = None;
        let mut topics = Vec::new();
        let mut n = 0;
        for line in text.lines().filter(|l| !l.is_empty()) {
            let rec: Snapshot = serde_json::from_str(line).map_err(std::io::Error::other)?;
            match rec {
                Snapshot::Header {
                    start_seq,
                    last_seq,
                } => {
                    self.start_seq.fetch_min(start_seq, Ordering::Relaxed);
                    st.last_seq = st.last_seq.max(last_seq);
                }
                Snapshot::Topic {
                    topic,
                    evicted_upto,
                    closed,
                } => {
                    topics.extend(current.take());
                    current = Some(Loaded {
                        name: topic.into(),
                        evicted_upto,
                        closed,
                        events: Vec::new(),
                    });
                }
                Snapshot::Event {
                    seq,
                    id,
                    age_ms,
                    sse,
                    retry,
                } => {
                    let Some(Loaded { name, events, .. }) = current.as_mut() else {
                        return Err(std::io::Error::other(
                            "history file: event before its topic",
                        ));
                    };
                    let at = now
                        .checked_sub(Duration::from_millis(age_ms))
                        .unwrap_or(now);
                    events.push(Arc::new(Event {
                        seq,
                        topic: name.clone(),
                        id: id.into(),
                        frame: chunk(sse.as_bytes()),
                        retry,
                        at,
                    }));
                    n += 1;
                }
            }
        }
        topics.extend(current.take());
        for t in topics {
            let last_retry = t.events.iter().rev().find_map(|e| e.retry);
            let mut history = History::restored(t.events, t.evicted_upto);
            history.evict(&self.limits, now);
            st.events += history.len();
            st.bytes += history.bytes();
            let i = st
                .topics
                .get_or_insert_with(&t.name, || TopicState::fresh(0));
            let mut state = TopicState::fresh(0);
            state.history = history;
            state.closed = t.closed;
            state.set_retry(last_retry);
            st.topics[i as usize] = state;
        }
        Ok(n)
    }

    /// Wake every worker (shutdown).
    pub fn wake_all(&self) {
        for inbox in self.inboxes.iter() {
            inbox.parked.store(false, Ordering::SeqCst);
            inbox.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> Hub {
        Hub::new(
            2,
            Limits {
                max_events: 3,
                max_bytes: 1 << 20,
                max_age: Duration::from_secs(3600),
            },
        )
    }

    fn publish(h: &Hub, topic: &str, id: Option<&str>) -> Published {
        h.publish(Publish {
            topic: topic.into(),
            data: "x".into(),
            event: None,
            id: id.map(Into::into),
            retry: None,
        })
        .unwrap()
    }

    fn drain(h: &Hub, w: usize) -> Vec<u64> {
        std::iter::from_fn(|| h.inbox(w).pop())
            .filter_map(|m| match m {
                BusMsg::Event(e) => Some(e.seq),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn events_go_only_to_the_workers_subscribed_to_their_topic_in_sequence_order() {
        let h = hub();
        // Nobody subscribed: history only, no worker is sent (or woken for) anything.
        publish(&h, "a", None);
        assert!(drain(&h, 0).is_empty() && drain(&h, 1).is_empty());
        assert!(h.attach(0, &["a".into()], None).pending.is_empty());
        assert!(h
            .attach(1, &["a".into(), "b".into()], None)
            .pending
            .is_empty());
        let seqs: Vec<u64> = (0..10)
            .map(|i| publish(&h, ["a", "b"][i % 2], None).seq)
            .collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]));
        let a_only: Vec<u64> = seqs.iter().copied().step_by(2).collect();
        assert_eq!(drain(&h, 0), a_only);
        assert_eq!(drain(&h, 1), seqs);
        h.unsubscribe(1, "b");
        publish(&h, "b", None);
        assert!(drain(&h, 1).is_empty(), "unsubscribed");
    }

    #[test]
    fn a_batch_wakes_each_parked_worker_once_and_only_the_subscribed_ones() {
        struct Count(Arc<AtomicU64>);
        impl Wake for Count {
            fn wake(&self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let h = hub();
        let woken: Vec<Arc<AtomicU64>> = (0..2).map(|_| Arc::default()).collect();
        for (w, n) in woken.iter().enumerate() {
            h.inbox(w).set_waker(Box::new(Count(n.clone())));
        }
        h.attach(0, &["a".into()], None);
        assert!(h.inbox(0).park() && h.inbox(1).park());
        {
            let mut batch = h.batch();
            for i in 0..10 {
                batch
                    .publish(Publish {
                        topic: "a".into(),
                        data: i.to_string(),
                        event: None,
                        id: None,
                        retry: None,
                    })
                    .unwrap();
            }
            assert_eq!(woken[0].load(Ordering::SeqCst), 0, "not per event");
        }
        assert_eq!(woken[0].load(Ordering::SeqCst), 1, "once for the batch");
        assert_eq!(
            woken[1].load(Ordering::SeqCst),
            0,
            "not subscribed: never woken"
        );
        assert_eq!(drain(&h, 0).len(), 10);
        assert!(drain(&h, 1).is_empty());
    }

    #[test]
    fn attach_hands_over_the_inbox_and_replays_up_to_the_newest_event() {
        let h = hub();
        let a = publish(&h, "a", Some("p1"));
        let b = publish(&h, "b", None);
        let ab: Vec<String> = vec!["a".into(), "b".into()];
        // Worker 0 already streams "a": c sits in its inbox when the resume arrives.
        h.attach(0, &["a".into()], None);
        let c = publish(&h, "a", None);
        let mut at = h.attach(0, &ab, Some("p1"));
        assert!(at.gap.is_none());
        let pending: Vec<u64> = at
            .pending
            .iter()
            .filter_map(|m| match m {
                BusMsg::Event(e) => Some(e.seq),
                _ => None,
            })
            .collect();
        assert_eq!(pending, [c.seq], "the inbox is handed over under the lock");
        let seqs = |v: Vec<Arc<Event>>| v.iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(seqs(h.replay_all(&ab, &mut at)), [b.seq, c.seq]);
        let mut at = h.attach(1, &ab, Some(a.id.as_str()));
        assert_eq!(seqs(h.replay_all(&ab, &mut at)), [b.seq, c.seq]);
        let d = publish(&h, "b", None);
        assert_eq!(drain(&h, 1), [d.seq], "live after the replay's end");
    }

    #[test]
    fn unknown_or_evicted_ids_get_a_gap_signal() {
        let h = hub();
        let first = publish(&h, "a", None);
        for _ in 0..4 {
            publish(&h, "a", None);
        }
        for id in ["nope", "0", &*first.id] {
            let mut at = h.attach(0, &["a".into()], Some(id));
            let gap = at.gap.take().expect("gap signalled");
            let body = std::str::from_utf8(gap.body()).unwrap();
            assert!(body.starts_with("event: herald-gap\n"), "{body}");
            assert!(body.contains(&format!("\"requested\":\"{id}\"")), "{body}");
            assert_eq!(h.replay_all(&["a".into()], &mut at).len(), 3);
        }
        assert_eq!(h.stats.gaps.load(Ordering::Relaxed), 3);
    }

    /// A cluster node's hub fed entry `ms-n` of epoch `epoch`, as the reader does.
    fn feed(h: &Hub, ms: u64, n: u64, epoch: &str) -> String {
        let id = format!("{ms}-{n}-{epoch}");
        let p = Publish {
            topic: "a".into(),
            data: "x".into(),
            event: None,
            id: None,
            retry: None,
        };
        let seq = crate::fanout::topic::cluster_seq(ms, n);
        h.batch()
            .publish_at(seq, id.as_str().into(), p, false)
            .unwrap();
        id
    }

    #[test]
    fn cluster_ids_resume_only_within_their_epoch_and_never_past_what_was_read() {
        let h = hub();
        h.set_cluster();
        h.set_epoch(Some("e1"));
        let ids: Vec<String> = (0..3)
            .map(|n| feed(&h, 1_764_000_000_000, n, "e1"))
            .collect();
        // Retained ids, including one whose event was not kept by herald but is a position
        // in the epoch at or after what is retained: no gap.
        let mut at = h.attach(0, &["a".into()], Some(&ids[0]));
        assert!(at.gap.is_none());
        let got: Vec<String> = h
            .replay_all(&["a".into()], &mut at)
            .iter()
            .map(|e| e.id.to_string())
            .collect();
        assert_eq!(got, ids[1..]);
        // Another epoch's id, a position not read yet, a plain number: gap, then all.
        for id in [
            "1764000000000-0-e0",
            "1764000000001-0-e1",
            "1764000000000000000",
        ] {
            let mut at = h.attach(0, &["a".into()], Some(id));
            assert!(at.gap.is_some(), "{id} resumed without a gap");
            assert_eq!(h.replay_all(&["a".into()], &mut at).len(), 3, "{id}");
        }
    }

    #[test]
    fn a_live_gap_reaches_every_worker_and_a_resume_from_before_it_is_told() {
        let h = hub();
        h.set_cluster();
        h.set_epoch(Some("e1"));
        let _ = h.attach(0, &["a".into()], None);
        let before = feed(&h, 1_764_000_000_000, 0, "e1");
        h.live_gap("epoch");
        h.set_epoch(Some("e2"));
        let after = feed(&h, 1_764_000_000_005, 0, "e2");
        let msgs: Vec<BusMsg> = std::iter::from_fn(|| h.inbox(1).pop()).collect();
        assert!(
            matches!(msgs.as_slice(), [BusMsg::Gap(_)]),
            "a worker with no subscriber still gets the gap, and nothing else: {msgs:?}"
        );
        let msgs: Vec<BusMsg> = std::iter::from_fn(|| h.inbox(0).pop()).collect();
        let kinds: Vec<&str> = msgs
            .iter()
            .map(|m| match m {
                BusMsg::Event(_) => "event",
                BusMsg::Gap(g) => std::str::from_utf8(g.frame.body())
                    .unwrap()
                    .split('\n')
                    .next()
                    .unwrap(),
                _ => "other",
            })
            .collect();
        assert_eq!(kinds, ["event", "event: herald-gap", "event"]);
        // The old epoch's id is told about the gap; the replay is what came after it.
        let mut at = h.attach(0, &["a".into()], Some(&before));
        let gap = at.gap.take().expect("gap signalled");
        let body = std::str::from_utf8(gap.body()).unwrap();
        assert!(body.contains(&format!("\"oldest\":\"{after}\"")), "{body}");
        let got: Vec<String> = h
            .replay_all(&["a".into()], &mut at)
            .iter()
            .map(|e| e.id.to_string())
            .collect();
        assert_eq!(got, std::slice::from_ref(&after));
        let mut at = h.attach(0, &["a".into()], Some(&after));
        assert!(at.gap.is_none());
        assert!(h.replay_all(&["a".into()], &mut at).is_empty());
    }

    #[test]
    fn a_number_herald_never_assigned_is_not_a_position() {
        let h = hub();
        let last = publish(&h, "a", None);
        let big = (last.seq * 10).to_string();
        for id in ["18446744073709551615", "9999999999999999999", &big] {
            let mut at = h.attach(0, &["a".into()], Some(id));
            assert!(at.gap.is_some(), "{id} resumed silently");
            assert_eq!(h.replay_all(&["a".into()], &mut at).len(), 1, "{id}");
        }
        // A publisher's numeric id that was evicted: a gap, then what is retained.
        let h = hub();
        publish(&h, "a", Some("4000000000000000000"));
        for _ in 0..3 {
            publish(&h, "a", None);
        }
        let mut at = h.attach(0, &["a".into()], Some("4000000000000000000"));
        assert!(at.gap.is_some());
        assert_eq!(h.replay_all(&["a".into()], &mut at).len(), 3);
        // Its own id, still retained, resumes silently, found without a scan.
        let own = publish(&h, "a", None);
        publish(&h, "a", None);
        let mut at = h.attach(0, &["a".into()], Some(own.id.as_str()));
        assert!(at.gap.is_none());
        assert_eq!(h.replay_all(&["a".into()], &mut at).len(), 1);
    }

    #[test]
    fn a_topic_the_janitor_forgot_still_reports_what_it_lost() {
        let h = Hub::new(
            1,
            Limits {
                max_events: 10,
                max_bytes: 1 << 20,
                max_age: Duration::ZERO,
            },
        );
        let first = publish(&h, "a", None);
        publish(&h, "a", None);
        std::thread::sleep(Duration::from_millis(2));
        h.janitor();
        assert_eq!(h.history_size(), (0, 0, 0));
        let at = h.attach(0, &["a".into()], Some(first.id.as_str()));
        assert!(at.gap.is_some(), "events after the id were aged out");
    }

    #[test]
    fn a_worker_publishing_into_its_own_full_inbox_makes_room_instead_of_waiting_forever() {
        let h = hub();
        h.attach(0, &["t".into()], None);
        for _ in 0..INBOX_CAPACITY {
            publish(&h, "t", None);
        }
        let one = || Publish {
            topic: "t".into(),
            data: "one more".into(),
            event: None,
            id: None,
            retry: None,
        };
        assert!(matches!(h.try_publish(&one()), Err(PublishFailure::Busy)));
        // Only worker 0 can empty its inbox; the publish asks it to and then goes through.
        let mut taken = 0;
        let mut batch = h.batch();
        let done = batch.publish_making_room(one(), &mut || {
            while h.inbox(0).pop().is_some() {
                taken += 1;
            }
        });
        drop(batch);
        assert!(done.is_ok());
        assert_eq!(taken, INBOX_CAPACITY);
        assert_eq!(
            drain(&h, 0).len(),
            1,
            "the new event is queued after the room was made"
        );
    }

    #[test]
    fn the_janitor_works_in_slices_and_keeps_the_totals_exact() {
        let h = Hub::new(
            1,
            Limits {
                max_events: 10,
                max_bytes: 1 << 20,
                max_age: Duration::from_millis(50),
            },
        );
        let n = JANITOR_SLICE * 3 + 17;
        for i in 0..n {
            publish(&h, &format!("t{i}"), None);
        }
        // One subscribed topic outlives its history; the rest are forgotten.
        h.attach(0, &["t5".into()], None);
        assert_eq!(h.history_size(), (n, n, h.history_size().2));
        std::thread::sleep(Duration::from_millis(60));
        // A call covers one slice: the table is visited in several, never all at once.
        let mut covered_all = Vec::new();
        while h.history_size().1 > 0 {
            let (_, events_before, _) = h.history_size();
            covered_all.push(h.janitor());
            let (topics, events, bytes) = h.history_size();
            assert!(events_before - events <= JANITOR_SLICE);
            assert_eq!(topics, events + 1, "empty topics forgotten, t5 kept");
            assert_eq!(bytes == 0, events == 0);
            assert!(covered_all.len() < 100);
        }
        // Four slices make the lap, and only the last says so: the caller rests after it.
        assert_eq!(covered_all, [false, false, false, true]);
        // What is left fits one slice: a call then covers everything.
        assert!(h.janitor());
        assert_eq!(h.history_size(), (1, 0, 0));
    }

    #[test]
    fn a_replay_comes_in_bounded_batches_and_reports_evictions_midway() {
        let h = Hub::new(
            1,
            Limits {
                max_events: 2000,
                max_bytes: 64 << 20,
                max_age: Duration::from_secs(3600),
            },
        );
        let first = publish(&h, "a", None);
        for _ in 0..999 {
            publish(&h, "a", None);
        }
        let mut at = h.attach(0, &["a".into()], Some(first.id.as_str()));
        assert!(at.gap.is_none());
        let cur = at.replay.as_mut().unwrap();
        let b = h.replay_batch(&["a"], cur);
        assert_eq!(b.events.len(), REPLAY_BATCH_EVENTS);
        assert!(!b.done && b.gap.is_none());
        // 2,000 more evict what the client has not been given yet.
        for _ in 0..2000 {
            publish(&h, "a", None);
        }
        let b = h.replay_batch(&["a"], cur);
        assert!(b.gap.is_some(), "no silent gap mid-replay");
    }

    #[test]
    fn publishes_that_would_create_a_topic_past_the_cap_are_refused() {
        let h = hub().with_max_topics(2);
        publish(&h, "a", None);
        publish(&h, "b", None);
        let p = |t: &str| Publish {
            topic: t.into(),
            data: "x".into(),
            event: None,
            id: None,
            retry: None,
        };
        assert_eq!(
            h.try_publish(&p("c")),
            Err(PublishFailure::Invalid(PublishError::TooManyTopics {
                max: 2
            }))
        );
        assert!(h.try_publish(&p("a")).is_ok(), "known topics still publish");
        assert_eq!(h.history_size().0, 2);
    }

    #[test]
    fn closed_topic_reopens_on_publish() {
        let h = hub();
        h.close_topic("a");
        assert!(h.attach(0, &["a".into()], None).closed);
        publish(&h, "a", None);
        assert!(!h.attach(0, &["a".into()], None).closed);
    }
}

#[cfg(test)]
mod snapshot_tests {
    use super::*;

    #[test]
    fn a_saved_history_resumes_without_a_gap_in_the_next_run() {
        let limits = Limits {
            max_events: 100,
            max_bytes: 1 << 20,
            max_age: Duration::from_secs(3600),
        };
        let a = Hub::new(1, limits);
        let p = |topic: &str, data: &str| Publish {
            topic: topic.into(),
            data: data.into(),
            event: Some("e".into()),
            id: None,
            retry: None,
        };
        let first = a.publish(p("t", "one\ntwo")).unwrap();
        let second = a.publish(p("t", "three")).unwrap();
        a.close_topic("gone");
        let path = std::env::temp_dir().join(format!("herald-hist-{}.ndjson", std::process::id()));
        assert_eq!(a.save_history(&path).unwrap(), 2);

        let b = Hub::new(1, limits);
        assert_eq!(b.load_history(&path).unwrap(), 2);
        assert!(!path.exists(), "the file is consumed");
        let t: Vec<String> = vec!["t".into()];
        let mut at = b.attach(0, &t, Some(first.id.as_str()));
        assert!(at.gap.is_none(), "the previous run's ids are known");
        let got = b.replay_all(&t, &mut at);
        assert_eq!(got.len(), 1);
        let mut before = a.attach(0, &t, Some(first.id.as_str()));
        assert_eq!(
            got[0].frame.chunked(),
            a.replay_all(&t, &mut before)[0].frame.chunked()
        );
        assert!(b.attach(0, &["gone".into()], None).closed);
        let third = b.publish(p("t", "four")).unwrap();
        assert!(third.seq > second.seq, "sequence continues");
        // Without a file, nothing is loaded and an old id is a gap.
        let c = Hub::new(1, limits);
        assert_eq!(c.load_history(&path).unwrap(), 0);
        assert!(c
            .attach(0, &["t".into()], Some(first.id.as_str()))
            .gap
            .is_some());
    }
}
