//! The hub: the only cross-thread synchronisation in herald. A publish assigns the event's
//! sequence, encodes it once, appends it to the topic history and hands one `Arc<Event>`
//! to every worker's bounded inbox, all under one short lock, so every inbox sees events
//! in sequence order and everything a worker has seen is already in the history. A worker
//! is woken only when it is parked.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_queue::ArrayQueue;

use super::topic::{Event, History, Limits};
use crate::sse::encode::{chunk, encode_event, Frame};
use crate::sse::event::{Publish, PublishError};

/// Events a worker may have queued before publishers wait for it.
pub const INBOX_CAPACITY: usize = 1 << 16;

/// What the hub hands to workers.
#[derive(Debug)]
pub enum BusMsg {
    Event(Arc<Event>),
    /// End every stream of this topic.
    Close(Arc<str>),
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

    fn notify(&self) {
        if self.parked.swap(false, Ordering::SeqCst) {
            self.wake();
        }
    }

    pub fn wake(&self) {
        if let Some(w) = self.waker.get() {
            w.wake();
        }
    }
}

/// Publisher-side outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub id: Box<str>,
    pub seq: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PublishFailure {
    #[error(transparent)]
    Invalid(#[from] PublishError),
    #[error("a worker is {INBOX_CAPACITY} events behind; retry")]
    Busy,
}

/// What a new subscription starts with.
#[derive(Debug, Default)]
pub struct Attach {
    /// A requested topic was ended by a control message: answer 204.
    pub closed: bool,
    /// `event: herald-gap` frame to send before the replay.
    pub gap: Option<Frame>,
    /// Retained events after the client's id, in publish order.
    pub replay: Vec<Arc<Event>>,
    /// The last `retry` an event of the requested topics carried (their highest).
    pub last_retry: Option<u32>,
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

struct TopicState {
    history: History,
    closed: bool,
    /// The last `retry` published on this topic.
    last_retry: Option<u32>,
}

struct State {
    topics: HashMap<Arc<str>, TopicState>,
    last_seq: u64,
}

pub struct Hub {
    state: Mutex<State>,
    inboxes: Box<[Inbox]>,
    limits: Limits,
    /// First sequence whose events this process knows about (its own start, or the start
    /// of the run whose history it restored): ids below it come from an earlier run.
    start_seq: AtomicU64,
    pub stats: HubStats,
}

/// The registry's shared name for `topic`, or a new one.
fn intern(st: &State, topic: &str) -> Arc<str> {
    match st.topics.get_key_value(topic) {
        Some((k, _)) => k.clone(),
        None => topic.into(),
    }
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
                topics: HashMap::new(),
                last_seq: 0,
            }),
            inboxes: (0..workers).map(|_| Inbox::new()).collect(),
            limits,
            start_seq: AtomicU64::new(wall_micros()),
            stats: HubStats::default(),
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
        loop {
            match self.try_publish(&p) {
                Ok(done) => return Ok(done),
                Err(PublishFailure::Invalid(e)) => return Err(e),
                Err(PublishFailure::Busy) => {
                    std::thread::sleep(std::time::Duration::from_micros(200))
                }
            }
        }
    }

    /// Publish if every inbox has room; never blocks.
    pub fn try_publish(&self, p: &Publish) -> Result<Published, PublishFailure> {
        if let Err(e) = p.validate() {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(e.into());
        }
        let now = Instant::now();
        let mut st = self.lock();
        if !self.has_room() {
            return Err(PublishFailure::Busy);
        }
        let seq = (st.last_seq + 1).max(wall_micros());
        st.last_seq = seq;
        let id: Box<str> = match &p.id {
            Some(id) => id.as_str().into(),
            None => seq.to_string().into(),
        };
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
        let t = st.topics.entry(topic).or_insert_with(|| TopicState {
            history: History::default(),
            closed: false,
            last_retry: None,
        });
        t.closed = false;
        if p.retry.is_some() {
            t.last_retry = p.retry;
        }
        t.history.push(ev.clone(), &self.limits, now);
        self.send_all(st, || BusMsg::Event(ev.clone()));
        self.stats.published.fetch_add(1, Ordering::Relaxed);
        Ok(Published { id, seq })
    }

    /// End every stream of `topic`; until the next publish, subscribing answers 204.
    pub fn close_topic(&self, topic: &str) {
        let mut st = loop {
            let st = self.lock();
            if self.has_room() {
                break st;
            }
            drop(st);
            std::thread::sleep(Duration::from_micros(200));
        };
        let name = intern(&st, topic);
        st.topics
            .entry(name.clone())
            .or_insert_with(|| TopicState {
                history: History::default(),
                closed: false,
                last_retry: None,
            })
            .closed = true;
        self.send_all(st, || BusMsg::Close(name.clone()));
        self.stats.topics_closed.fetch_add(1, Ordering::Relaxed);
    }

    /// Every inbox can take one more message. Only publishers push, and they hold the
    /// lock, so room seen under the lock is still there when they push.
    fn has_room(&self) -> bool {
        self.inboxes.iter().all(|i| i.queue.len() < INBOX_CAPACITY)
    }

    /// Push one message to every inbox (room checked with [`Hub::has_room`] under the
    /// same lock), release the lock, then wake the workers that are parked.
    fn send_all(&self, st: MutexGuard<'_, State>, msg: impl Fn() -> BusMsg) {
        for inbox in self.inboxes.iter() {
            let pushed = inbox.queue.push(msg());
            debug_assert!(pushed.is_ok());
        }
        drop(st);
        for inbox in self.inboxes.iter() {
            inbox.notify();
        }
    }

    /// Start a subscription on a worker that has consumed every event up to `upto`:
    /// the replay covers `(client's id, upto]` and live delivery continues after `upto`,
    /// so the hand-over has no gap and no duplicate.
    pub fn attach(&self, topics: &[String], last_id: Option<&str>, upto: u64) -> Attach {
        let st = self.lock();
        let known = || topics.iter().filter_map(|t| st.topics.get(t.as_str()));
        let mut out = Attach {
            closed: known().any(|s| s.closed),
            last_retry: known().filter_map(|s| s.last_retry).max(),
            ..Attach::default()
        };
        let Some(last_id) = last_id else {
            return out;
        };
        if out.closed {
            return out;
        }
        let found = topics
            .iter()
            .filter_map(|t| st.topics.get(t.as_str()))
            .find_map(|t| t.history.find_id(last_id));
        let (after, known) = match found {
            Some(seq) => (seq, true),
            None => match last_id.parse::<u64>() {
                // One of our own ids (or a publisher's numeric one) that is not retained.
                Ok(seq) => (seq, seq >= self.start_seq.load(Ordering::Relaxed)),
                Err(_) => (0, false),
            },
        };
        let mut gap = !known;
        let mut oldest: Option<&Arc<Event>> = None;
        for t in topics.iter().filter_map(|t| st.topics.get(t.as_str())) {
            if t.history.evicted_upto() > after {
                gap = true;
            }
            if let Some(o) = t.history.oldest() {
                if oldest.is_none_or(|cur| o.seq < cur.seq) {
                    oldest = Some(o);
                }
            }
            out.replay.extend(t.history.range(after, upto).cloned());
        }
        if topics.len() > 1 {
            out.replay.sort_unstable_by_key(|e| e.seq);
        }
        if gap {
            let data = serde_json::json!({
                "requested": last_id,
                "oldest": oldest.map(|e| &*e.id),
            })
            .to_string();
            // No `id:` line: an empty one would reset the client's lastEventId.
            // serde_json output has no raw newline, so it is one `data:` line.
            let body = format!("event: herald-gap\ndata: {data}\n\n");
            out.gap = Some(chunk(body.as_bytes()));
            self.stats.gaps.fetch_add(1, Ordering::Relaxed);
        }
        self.stats.replays.fetch_add(1, Ordering::Relaxed);
        self.stats
            .replayed_events
            .fetch_add(out.replay.len() as u64, Ordering::Relaxed);
        out
    }

    /// Age out history and forget topics with nothing left. Called about once a second.
    pub fn janitor(&self) {
        let now = Instant::now();
        let mut st = self.lock();
        st.topics.retain(|_, t| {
            t.history.evict(&self.limits, now);
            t.closed || !t.history.is_empty()
        });
    }

    /// (topics, retained events, retained bytes) for /metrics.
    pub fn history_size(&self) -> (usize, usize, usize) {
        let st = self.lock();
        st.topics
            .values()
            .fold((st.topics.len(), 0, 0), |(n, e, b), t| {
                (n, e + t.history.len(), b + t.history.bytes())
            })
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
        for (name, t) in &st.topics {
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
            name: Arc<str>,
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
            st.topics.insert(
                t.name,
                TopicState {
                    history,
                    closed: t.closed,
                    last_retry,
                },
            );
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
                BusMsg::Close(_) => None,
            })
            .collect()
    }

    #[test]
    fn every_worker_sees_every_event_in_sequence_order() {
        let h = hub();
        let seqs: Vec<u64> = (0..10)
            .map(|i| publish(&h, ["a", "b"][i % 2], None).seq)
            .collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(drain(&h, 0), seqs);
        assert_eq!(drain(&h, 1), seqs);
    }

    #[test]
    fn resume_replays_after_the_id_up_to_what_the_worker_has_seen() {
        let h = hub();
        let a = publish(&h, "a", Some("p1"));
        let b = publish(&h, "b", None);
        let c = publish(&h, "a", None);
        let at = h.attach(&["a".into(), "b".into()], Some("p1"), c.seq);
        assert!(at.gap.is_none());
        assert_eq!(
            at.replay.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [b.seq, c.seq]
        );
        // The worker has only seen up to b: c will reach it live, so it is not replayed.
        let at = h.attach(&["a".into(), "b".into()], Some(&a.id), b.seq);
        assert_eq!(at.replay.iter().map(|e| e.seq).collect::<Vec<_>>(), [b.seq]);
    }

    #[test]
    fn unknown_or_evicted_ids_get_a_gap_signal() {
        let h = hub();
        let first = publish(&h, "a", None);
        for _ in 0..4 {
            publish(&h, "a", None);
        }
        for id in ["nope", "0", &*first.id] {
            let at = h.attach(&["a".into()], Some(id), u64::MAX);
            let gap = at.gap.expect("gap signalled");
            let body = std::str::from_utf8(gap.body()).unwrap();
            assert!(body.starts_with("event: herald-gap\n"), "{body}");
            assert!(body.contains(&format!("\"requested\":\"{id}\"")), "{body}");
            assert_eq!(at.replay.len(), 3);
        }
        assert_eq!(h.stats.gaps.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn closed_topic_reopens_on_publish() {
        let h = hub();
        h.close_topic("a");
        assert!(h.attach(&["a".into()], None, 0).closed);
        publish(&h, "a", None);
        assert!(!h.attach(&["a".into()], None, 0).closed);
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
        let at = b.attach(&["t".into()], Some(&first.id), u64::MAX);
        assert!(at.gap.is_none(), "the previous run's ids are known");
        assert_eq!(at.replay.len(), 1);
        assert_eq!(
            at.replay[0].frame.chunked(),
            a.attach(&["t".into()], Some(&first.id), u64::MAX).replay[0]
                .frame
                .chunked()
        );
        assert!(b.attach(&["gone".into()], None, 0).closed);
        let third = b.publish(p("t", "four")).unwrap();
        assert!(third.seq > second.seq, "sequence continues");
        // Without a file, nothing is loaded and an old id is a gap.
        let c = Hub::new(1, limits);
        assert_eq!(c.load_history(&path).unwrap(), 0);
        assert!(c
            .attach(&["t".into()], Some(&first.id), u64::MAX)
            .gap
            .is_some());
    }
}
