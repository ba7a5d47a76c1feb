//! A published event and a topic's retained history for `Last-Event-ID` resume.
//! The history holds the very `Arc<Event>` the fan-out sends (one encoded frame, no second
//! copy) and stays within its count, byte and age limits; it remembers the newest sequence
//! it ever evicted so a resume that reaches past it is reported as a gap, never silently.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::table::{EventId, TopicName};
use crate::sse::encode::Frame;

/// One published event, encoded once. Shared by the history and every worker.
#[derive(Debug)]
pub struct Event {
    /// Process-wide publish order; time-based so it keeps increasing across restarts.
    pub seq: u64,
    /// Topic name, shared with the hub's registry.
    pub topic: TopicName,
    /// The `id:` sent on the wire (publisher's own, or `seq` in decimal).
    pub id: EventId,
    /// SSE wire bytes with their chunk framing.
    pub frame: Frame,
    /// The `retry:` the event carries, in ms.
    pub retry: Option<u32>,
    /// When it was published (history age, latency).
    pub at: Instant,
}

impl Event {
    /// Bytes this event adds to a stream (chunked framing included).
    pub fn wire_len(&self) -> usize {
        self.frame.len()
    }
}

/// Retention limits, per topic.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_events: usize,
    pub max_bytes: usize,
    pub max_age: Duration,
}

/// A topic's retained events, oldest first, in `seq` order. A topic with none (an idle
/// per-user topic, say) holds 16 bytes here: the events live in a box made by the first
/// push and freed when the last one is evicted.
#[derive(Debug, Default)]
pub struct History {
    retained: Option<Box<Retained>>,
    /// Highest `seq` ever evicted (0 = none): anything at or below it may be missing.
    evicted_upto: u64,
}

#[derive(Debug, Default)]
struct Retained {
    events: VecDeque<Arc<Event>>,
    bytes: usize,
    /// Publisher-supplied ids (ones that are not the event's own `seq`) → newest `seq`
    /// with that id, so a resume finds any id without walking the history (empty, with
    /// no allocation, for a topic that carries herald's own ids).
    custom_ids: HashMap<EventId, u64>,
}

/// Bits of a cluster sequence below the entry's millisecond: entries per ms, at most.
const CLUSTER_N_BITS: u32 = 20;

/// The hub sequence of Redis stream entry `ms-n` (`--cluster`): ordered like the entry
/// ids (no Redis appends a million entries in one millisecond).
pub fn cluster_seq(ms: u64, n: u64) -> u64 {
    (ms << CLUSTER_N_BITS) | n.min((1 << CLUSTER_N_BITS) - 1)
}

/// The Redis stream entry `(ms, n)` a cluster sequence stands for.
pub fn cluster_entry(seq: u64) -> (u64, u64) {
    (seq >> CLUSTER_N_BITS, seq & ((1 << CLUSTER_N_BITS) - 1))
}

/// The sequence an id herald assigned stands for: its decimal `seq`, or (`--cluster`)
/// `{ms}-{n}-{epoch}`, whose epoch the caller checks.
pub fn position_of(id: &str) -> Option<u64> {
    if let Ok(seq) = id.parse::<u64>() {
        return Some(seq);
    }
    let mut parts = id.splitn(3, '-');
    let ms = parts.next()?.parse().ok()?;
    let n = parts.next()?.parse().ok()?;
    let epoch = parts.next()?;
    (!epoch.is_empty() && epoch.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then(|| cluster_seq(ms, n))
}

/// Whether `ev`'s id is herald's own (the one its `seq` stands for), found by binary
/// search.
fn own_id(ev: &Event) -> bool {
    position_of(&ev.id) == Some(ev.seq)
}

impl History {
    pub fn push(&mut self, ev: Arc<Event>, limits: &Limits, now: Instant) {
        let r = self.retained.get_or_insert_with(Box::default);
        r.bytes += ev.wire_len();
        if !own_id(&ev) {
            r.custom_ids.insert(ev.id.clone(), ev.seq);
        }
        r.events.push_back(ev);
        self.evict(limits, now);
    }

    /// Drop events beyond the count/byte limits or older than the age limit.
    pub fn evict(&mut self, limits: &Limits, now: Instant) {
        let Some(r) = self.retained.as_mut() else {
            return;
        };
        while let Some(front) = r.events.front() {
            let over = r.events.len() > limits.max_events
                || r.bytes > limits.max_bytes
                || now.saturating_duration_since(front.at) > limits.max_age;
            if !over {
                break;
            }
            r.bytes -= front.wire_len();
            self.evicted_upto = front.seq;
            if r.custom_ids.get(&front.id) == Some(&front.seq) {
                r.custom_ids.remove(&front.id);
            }
            r.events.pop_front();
        }
        if r.events.is_empty() {
            self.retained = None;
        }
    }

    fn events(&self) -> Option<&VecDeque<Arc<Event>>> {
        self.retained.as_ref().map(|r| &r.events)
    }

    pub fn is_empty(&self) -> bool {
        self.retained.is_none()
    }

    pub fn len(&self) -> usize {
        self.events().map_or(0, VecDeque::len)
    }

    pub fn bytes(&self) -> usize {
        self.retained.as_ref().map_or(0, |r| r.bytes)
    }

    pub fn oldest(&self) -> Option<&Arc<Event>> {
        self.events()?.front()
    }

    pub fn evicted_upto(&self) -> u64 {
        self.evicted_upto
    }

    /// The `seq` of the retained event whose wire id is `id`, newest match first.
    pub fn find_id(&self, id: &str) -> Option<u64> {
        let r = self.retained.as_ref()?;
        if let Some(&seq) = r.custom_ids.get(id) {
            return Some(seq);
        }
        let seq = position_of(id)?;
        let k = r.events.partition_point(|e| e.seq < seq);
        r.events
            .get(k)
            .filter(|e| e.seq == seq && &*e.id == id)
            .map(|e| e.seq)
    }

    /// Every retained event, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Event>> {
        self.events().into_iter().flatten()
    }

    /// Rebuild a history from a snapshot (events in `seq` order).
    pub fn restored(events: Vec<Arc<Event>>, evicted_upto: u64) -> History {
        if events.is_empty() {
            return History {
                retained: None,
                evicted_upto,
            };
        }
        let bytes = events.iter().map(|e| e.wire_len()).sum();
        let custom_ids = events
            .iter()
            .filter(|e| !own_id(e))
            .map(|e| (e.id.clone(), e.seq))
            .collect();
        History {
            retained: Some(Box::new(Retained {
                events: events.into(),
                bytes,
                custom_ids,
            })),
            evicted_upto,
        }
    }

    /// Retained events with `after < seq <= upto`, in order.
    pub fn range(&self, after: u64, upto: u64) -> impl Iterator<Item = &Arc<Event>> {
        self.events().into_iter().flat_map(move |events| {
            let start = events.partition_point(|e| e.seq <= after);
            events.range(start..).take_while(move |e| e.seq <= upto)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::encode::encode_event;

    fn ev(seq: u64, at: Instant) -> Arc<Event> {
        let id = seq.to_string();
        Arc::new(Event {
            seq,
            topic: "t".into(),
            frame: encode_event(None, &id, None, "0123456789"),
            retry: None,
            id: id.into(),
            at,
        })
    }

    #[test]
    fn eviction_by_count_bytes_and_age_records_the_gap() {
        let now = Instant::now();
        let limits = Limits {
            max_events: 3,
            max_bytes: usize::MAX,
            max_age: Duration::from_secs(60),
        };
        let mut h = History::default();
        for s in 1..=5 {
            h.push(ev(s, now), &limits, now);
        }
        assert_eq!(h.len(), 3);
        assert_eq!(h.evicted_upto(), 2);
        assert_eq!(
            h.range(3, u64::MAX).map(|e| e.seq).collect::<Vec<_>>(),
            [4, 5]
        );
        assert_eq!(h.range(0, 4).map(|e| e.seq).collect::<Vec<_>>(), [3, 4]);
        assert_eq!(h.find_id("4"), Some(4));
        assert_eq!(h.find_id("1"), None);

        let one = ev(9, now).wire_len();
        let by_bytes = Limits {
            max_events: 100,
            max_bytes: one * 2,
            ..limits
        };
        h.evict(&by_bytes, now);
        assert_eq!(h.len(), 2);
        assert_eq!(h.bytes(), 2 * one);

        let later = now + Duration::from_secs(61);
        h.evict(&limits, later);
        assert!(h.is_empty());
        assert_eq!(h.evicted_upto(), 5);
    }
}
