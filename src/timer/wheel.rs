//! Hashed timer wheel over caller-supplied `u64` ticks, keyed by connection
//! slab index, with intrusive doubly-linked slot lists (16 bytes per key, no
//! allocation per insert). Invariant: an armed entry with deadline `d > cursor`
//! sits in slot `d & mask`; one with `d <= cursor` sits in the `due` list.

use std::cell::Cell;

/// "No entry" in a link field.
const NIL: u32 = u32::MAX;
/// Deadline value marking an unarmed key; real deadlines are clamped below it.
const UNARMED: u64 = u64::MAX;

/// Per-key link cell. INVARIANT: `deadline == UNARMED` iff the key is in no list.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Absolute deadline, in ticks.
    deadline: u64,
    next: u32,
    /// `NIL` when this entry is the head of its list.
    prev: u32,
}

const EMPTY: Entry = Entry {
    deadline: UNARMED,
    next: NIL,
    prev: NIL,
};

/// A hashed wheel: `slots` lists covering one revolution of ticks, plus a
/// `due` list for deadlines already reached when they were armed.
#[derive(Debug)]
pub struct Wheel {
    /// List heads; index `slots` (the last) is the `due` list.
    heads: Vec<u32>,
    mask: u64,
    entries: Vec<Entry>,
    /// Last tick advanced to: every deadline `<= cursor` armed before the last
    /// `advance` has fired.
    cursor: u64,
    armed: usize,
    /// A lower bound on every armed deadline: [`Wheel::next_expiry`] starts its scan
    /// there instead of at the cursor, and leaves the exact minimum behind. Without it a
    /// wheel whose nearest deadline is seconds away (every per-user stream was written to
    /// recently) walked hundreds of empty slots on every loop turn.
    floor: Cell<u64>,
}

impl Wheel {
    /// `slots` is rounded up to a power of two (at least 1).
    pub fn new(slots: usize, capacity: u32, now_tick: u64) -> Self {
        let slots = slots.max(1).next_power_of_two();
        Wheel {
            heads: vec![NIL; slots + 1],
            mask: slots as u64 - 1,
            entries: vec![EMPTY; capacity as usize],
            cursor: now_tick,
            armed: 0,
            floor: Cell::new(0),
        }
    }

    /// Grows the per-key storage so keys `< capacity` are valid; never shrinks.
    pub fn ensure_capacity(&mut self, capacity: u32) {
        if self.entries.len() < capacity as usize {
            self.entries.resize(capacity as usize, EMPTY);
        }
    }

    /// Arms `key` (re-arming it if already armed). A deadline `<=` the current
    /// tick fires at the next `advance`. Keys past the capacity grow it.
    pub fn insert(&mut self, key: u32, deadline_tick: u64) {
        if key == NIL {
            // NIL is the link sentinel; a slab never gets this large.
            debug_assert!(false, "key u32::MAX is reserved");
            return;
        }
        self.ensure_capacity(key + 1);
        self.remove(key);
        let deadline = deadline_tick.min(UNARMED - 1);
        let list = self.list_of(deadline);
        let head = self.heads[list];
        self.entries[key as usize] = Entry {
            deadline,
            next: head,
            prev: NIL,
        };
        if head != NIL {
            self.entries[head as usize].prev = key;
        }
        self.heads[list] = key;
        self.armed += 1;
        self.floor.set(self.floor.get().min(deadline));
    }

    /// Disarms `key`; a no-op if it is not armed.
    pub fn remove(&mut self, key: u32) {
        let Some(entry) = self.entries.get(key as usize).copied() else {
            return;
        };
        if entry.deadline == UNARMED {
            return;
        }
        if entry.prev == NIL {
            let list = self.list_of(entry.deadline);
            debug_assert_eq!(self.heads[list], key, "head mismatch");
            self.heads[list] = entry.next;
        } else {
            self.entries[entry.prev as usize].next = entry.next;
        }
        if entry.next != NIL {
            self.entries[entry.next as usize].prev = entry.prev;
        }
        self.entries[key as usize] = EMPTY;
        self.armed -= 1;
    }

    pub fn is_armed(&self, key: u32) -> bool {
        self.deadline(key).is_some()
    }

    /// The armed deadline of `key`, in ticks.
    pub fn deadline(&self, key: u32) -> Option<u64> {
        match self.entries.get(key as usize) {
            Some(e) if e.deadline != UNARMED => Some(e.deadline),
            _ => None,
        }
    }

    /// Advance to `now_tick`, pushing every key whose deadline <= now_tick
    /// into `out` (disarmed). Costs O(slots passed + entries visited); a jump
    /// of a full revolution or more is one sweep of every slot.
    pub fn advance(&mut self, now_tick: u64, out: &mut Vec<u32>) {
        let due = self.heads.len() - 1;
        self.fire_list(due, UNARMED - 1, out);
        if now_tick <= self.cursor {
            return;
        }
        let slots = self.mask + 1;
        if now_tick - self.cursor >= slots {
            for slot in 0..due {
                self.fire_list(slot, now_tick, out);
            }
        } else {
            for tick in self.cursor + 1..=now_tick {
                self.fire_list((tick & self.mask) as usize, now_tick, out);
            }
        }
        self.cursor = now_tick;
    }

    /// Ticks from `now_tick` until the earliest armed deadline (0 if overdue),
    /// or `None` if nothing is armed. O(1) when empty or something is due, else a
    /// scan from the last minimum it found (or the cursor) to the new one: at most
    /// one pass over the slots and their entries.
    pub fn next_expiry(&self, now_tick: u64) -> Option<u64> {
        if self.armed == 0 {
            return None;
        }
        if self.heads[self.heads.len() - 1] != NIL {
            return Some(0);
        }
        // No armed deadline is below `start`, so an entry in the slot of tick `t` (visited
        // in order from `start`) has a deadline of at least `t`.
        let start = (self.cursor + 1).max(self.floor.get());
        let mut earliest = UNARMED;
        for tick in start..=start + self.mask {
            let mut key = self.heads[(tick & self.mask) as usize];
            while key != NIL {
                let e = self.entries[key as usize];
                earliest = earliest.min(e.deadline);
                // Nothing here or in a later slot is below `tick`: stop at the first entry
                // due at it, not after a walk of the whole list (a cache miss per entry).
                if earliest <= tick {
                    self.floor.set(earliest);
                    return Some(earliest.saturating_sub(now_tick));
                }
                key = e.next;
            }
        }
        self.floor.set(earliest);
        Some(earliest.saturating_sub(now_tick))
    }

    /// Number of armed keys.
    pub fn len(&self) -> usize {
        self.armed
    }

    pub fn is_empty(&self) -> bool {
        self.armed == 0
    }

    /// Which list an entry with `deadline` belongs in right now.
    fn list_of(&self, deadline: u64) -> usize {
        if deadline <= self.cursor {
            self.heads.len() - 1
        } else {
            (deadline & self.mask) as usize
        }
    }

    /// Fires every entry of list `list` with deadline `<= now`.
    fn fire_list(&mut self, list: usize, now: u64, out: &mut Vec<u32>) {
        let mut key = self.heads[list];
        while key != NIL {
            let e = self.entries[key as usize];
            if e.deadline <= now {
                self.remove(key);
                out.push(key);
            }
            key = e.next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn entry_is_16_bytes() {
        assert_eq!(std::mem::size_of::<Entry>(), 16);
    }

    #[derive(Debug, Clone, Copy)]
    enum Op {
        Insert(u32, i64),
        Remove(u32),
        Advance(u64),
    }

    /// Naive oracle: a map of deadlines and a clock.
    struct Oracle {
        deadlines: BTreeMap<u32, u64>,
        now: u64,
    }

    impl Oracle {
        fn advance(&mut self, now: u64) -> Vec<u32> {
            self.now = self.now.max(now);
            let fired: Vec<u32> = self
                .deadlines
                .iter()
                .filter(|(_, &d)| d <= self.now)
                .map(|(&k, _)| k)
                .collect();
            for k in &fired {
                self.deadlines.remove(k);
            }
            fired
        }
    }

    /// Applies `ops` to both and compares after every step.
    fn check(slots: usize, start: u64, ops: &[Op]) {
        let mut wheel = Wheel::new(slots, 4, start);
        let mut oracle = Oracle {
            deadlines: BTreeMap::new(),
            now: start,
        };
        let mut out = Vec::new();
        for (step, &op) in ops.iter().enumerate() {
            match op {
                Op::Insert(k, delta) => {
                    let d = oracle.now.saturating_add_signed(delta);
                    wheel.insert(k, d);
                    oracle.deadlines.insert(k, d);
                }
                Op::Remove(k) => {
                    wheel.remove(k);
                    oracle.deadlines.remove(&k);
                }
                Op::Advance(delta) => {
                    let now = oracle.now + delta;
                    out.clear();
                    wheel.advance(now, &mut out);
                    out.sort_unstable();
                    assert_eq!(out, oracle.advance(now), "step {step} {op:?}");
                }
            }
            assert_eq!(wheel.len(), oracle.deadlines.len(), "len at step {step}");
            assert_eq!(wheel.is_empty(), oracle.deadlines.is_empty());
            for k in 0..16 {
                assert_eq!(
                    wheel.deadline(k),
                    oracle.deadlines.get(&k).copied(),
                    "key {k}"
                );
                assert_eq!(wheel.is_armed(k), oracle.deadlines.contains_key(&k));
            }
            let want = oracle
                .deadlines
                .values()
                .min()
                .map(|d| d.saturating_sub(oracle.now));
            assert_eq!(
                wheel.next_expiry(oracle.now),
                want,
                "next_expiry at step {step}"
            );
        }
    }

    #[test]
    fn scenarios() {
        use Op::*;
        let cases: &[(usize, u64, &[Op])] = &[
            // The remembered minimum: its key re-armed later, an earlier insert, a
            // deadline more than a lap away, and the cursor moving past the minimum.
            (
                64,
                0,
                &[
                    Insert(1, 5),
                    Insert(2, 40),
                    Remove(1),
                    Insert(3, 2),
                    Advance(2),
                    Insert(1, 100),
                    Remove(2),
                    Advance(30),
                    Insert(2, 1),
                ],
            ),
            (8, 0, &[Insert(1, 3), Advance(2), Advance(1)]),
            (8, 0, &[Insert(1, 0), Advance(0)]),
            (
                8,
                100,
                &[Insert(1, -50), Insert(2, 1), Advance(0), Advance(1)],
            ),
            (
                8,
                0,
                &[
                    Insert(1, 20),
                    Advance(8),
                    Advance(8),
                    Advance(3),
                    Advance(1),
                ],
            ),
            (8, 0, &[Insert(1, 20), Advance(100)]),
            (8, 0, &[Insert(1, 5), Insert(1, 2), Advance(2), Advance(10)]),
            (
                8,
                0,
                &[
                    Insert(1, 5),
                    Insert(2, 5),
                    Insert(3, 5),
                    Remove(2),
                    Advance(5),
                ],
            ),
            (
                8,
                0,
                &[
                    Insert(1, 5),
                    Insert(2, 13),
                    Insert(3, 21),
                    Advance(5),
                    Advance(8),
                    Advance(8),
                ],
            ),
            (
                1,
                0,
                &[
                    Insert(1, 3),
                    Insert(2, 1),
                    Advance(1),
                    Advance(1),
                    Advance(1),
                ],
            ),
            (8, 0, &[Remove(3), Insert(9, 1), Advance(1)]),
        ];
        for (slots, start, ops) in cases {
            check(*slots, *start, ops);
        }
    }

    #[test]
    fn capacity_grows_and_clamps() {
        let mut w = Wheel::new(4, 0, 0);
        w.insert(10, u64::MAX);
        assert_eq!(w.deadline(10), Some(u64::MAX - 1));
        assert_eq!(w.next_expiry(0), Some(u64::MAX - 1));
        w.ensure_capacity(2);
        assert!(w.is_armed(10));
        let mut out = Vec::new();
        w.advance(u64::MAX - 1, &mut out);
        assert_eq!(out, vec![10]);
        assert_eq!(w.next_expiry(0), None);
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u32..12, -5i64..40).prop_map(|(k, d)| Op::Insert(k, d)),
            1 => (0u32..12).prop_map(Op::Remove),
            2 => prop_oneof![0u64..4, 0u64..40].prop_map(Op::Advance),
        ]
    }

    proptest! {
        #[test]
        fn matches_oracle(
            slots in prop_oneof![Just(1usize), Just(4), Just(8), Just(16)],
            start in prop_oneof![Just(0u64), 0u64..1000],
            ops in proptest::collection::vec(op(), 0..80),
        ) {
            check(slots, start, &ops);
        }
    }
}
