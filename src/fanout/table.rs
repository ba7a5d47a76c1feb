//! A table of topics by name, for the hub and for each worker: entries live in a slab
//! (dense, stable `u32` ids) and a hash index holds only those ids, 4 bytes a bucket.
//! A `HashMap<name, T>` would hold the name and the whole value in every bucket, and a
//! hash table is never full: at a typical load its empty buckets cost more than the
//! entries themselves. Here the empty buckets cost 5 bytes each, and the slab's capacity
//! beyond its last entry is never touched, so it takes no resident memory.
//!
//! Names are [`TopicName`]s: up to 23 bytes inline (a per-user topic such as `user-12345`
//! needs no allocation at all), longer ones shared by reference count.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::ops::{Index, IndexMut};

use hashbrown::HashTable;
use slab::Slab;

/// A topic name: cheap to clone, inline up to 23 bytes.
pub type TopicName = smol_str::SmolStr;

/// An event id (herald's own are 16 digits): inline, so a publish allocates no id string.
pub type EventId = smol_str::SmolStr;

pub struct NameTable<T> {
    index: HashTable<u32>,
    slots: Slab<(TopicName, T)>,
    hasher: RandomState,
}

impl<T> Default for NameTable<T> {
    fn default() -> Self {
        NameTable {
            index: HashTable::new(),
            slots: Slab::new(),
            hasher: RandomState::new(),
        }
    }
}

impl<T> NameTable<T> {
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The id of `name`, if it has an entry.
    pub fn id(&self, name: &str) -> Option<u32> {
        let h = self.hasher.hash_one(name);
        self.index
            .find(h, |&i| &*self.slots[i as usize].0 == name)
            .copied()
    }

    /// The ids of every entry, in slot order.
    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.slots.iter().map(|(i, _)| i as u32)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.id(name).is_some()
    }

    pub fn get(&self, name: &str) -> Option<&T> {
        self.id(name).map(|i| &self.slots[i as usize].1)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut T> {
        self.id(name).map(|i| &mut self.slots[i as usize].1)
    }

    /// The table's shared name for `name`, and its entry.
    pub fn get_key_value(&self, name: &str) -> Option<(&TopicName, &T)> {
        self.id(name).map(|i| {
            let (k, v) = &self.slots[i as usize];
            (k, v)
        })
    }

    /// The name of entry `id`.
    pub fn name(&self, id: u32) -> &TopicName {
        &self.slots[id as usize].0
    }

    /// The entry for `name`, made with `make` if there is none; returns its id.
    pub fn get_or_insert_with(&mut self, name: &TopicName, make: impl FnOnce() -> T) -> u32 {
        if let Some(i) = self.id(name) {
            return i;
        }
        let i = self.slots.insert((name.clone(), make())) as u32;
        let h = self.hasher.hash_one(&**name);
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.index
            .insert_unique(h, i, |&j| hasher.hash_one(&*slots[j as usize].0));
        i
    }

    /// Remove entry `id`, returning its name and value.
    pub fn remove_at(&mut self, id: u32) -> (TopicName, T) {
        let h = self.hasher.hash_one(&*self.slots[id as usize].0);
        if let Ok(e) = self.index.find_entry(h, |&i| i == id) {
            e.remove();
        }
        self.slots.remove(id as usize)
    }

    pub fn remove(&mut self, name: &str) -> Option<T> {
        self.id(name).map(|i| self.remove_at(i).1)
    }

    /// Keep only the entries `keep` returns true for.
    pub fn retain(&mut self, mut keep: impl FnMut(&TopicName, &mut T) -> bool) {
        let gone: Vec<u32> = self
            .slots
            .iter_mut()
            .filter_map(|(i, (k, v))| (!keep(k, v)).then_some(i as u32))
            .collect();
        for i in gone {
            self.remove_at(i);
        }
    }

    /// [`NameTable::retain`] over at most `max` entries, starting at slot `start` and
    /// wrapping around (never visiting a slot twice; vacant slots are passed over). Returns
    /// where the next slice starts, and whether this one passed the table's last slot (a
    /// caller going round in slices from 0 has then visited every entry).
    pub fn retain_slice(
        &mut self,
        start: usize,
        max: usize,
        mut keep: impl FnMut(&TopicName, &mut T) -> bool,
    ) -> (usize, bool) {
        let cap = self.slots.capacity();
        if cap == 0 {
            return (0, true);
        }
        let mut id = start % cap;
        let (mut seen, mut wrapped) = (0, false);
        for _ in 0..cap {
            if seen == max {
                break;
            }
            if let Some((k, v)) = self.slots.get_mut(id) {
                seen += 1;
                if !keep(k, v) {
                    self.remove_at(id as u32);
                }
            }
            id = (id + 1) % cap;
            wrapped |= id == 0;
        }
        (id, wrapped)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&TopicName, &T)> {
        self.slots.iter().map(|(_, (k, v))| (k, v))
    }
}

impl<T> Index<usize> for NameTable<T> {
    type Output = T;
    fn index(&self, id: usize) -> &T {
        &self.slots[id].1
    }
}

impl<T> IndexMut<usize> for NameTable<T> {
    fn index_mut(&mut self, id: usize) -> &mut T {
        &mut self.slots[id].1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_stay_put_across_removals_and_names_are_found_again() {
        let mut t = NameTable::default();
        let names: Vec<TopicName> = (0..1000)
            .map(|i| TopicName::new(format!("user-{i}")))
            .collect();
        let ids: Vec<u32> = names
            .iter()
            .map(|n| t.get_or_insert_with(n, || n.len()))
            .collect();
        assert_eq!(t.len(), 1000);
        assert_eq!(
            t.get_or_insert_with(&names[7], || 0),
            ids[7],
            "no second entry"
        );
        for (i, n) in names.iter().enumerate().filter(|(i, _)| i % 3 == 0) {
            assert_eq!(t.remove(n), Some(n.len()), "{i}");
        }
        t.retain(|k, _| !k.ends_with('5'));
        for (i, n) in names.iter().enumerate() {
            let kept = i % 3 != 0 && !n.ends_with('5');
            assert_eq!(t.id(n), kept.then_some(ids[i]), "{n}");
            if kept {
                assert_eq!(&**t.name(ids[i]), &**n);
                assert_eq!(t[ids[i] as usize], n.len());
            }
        }
        assert_eq!(t.len(), t.iter().count());
        // Slices of 100 from anywhere visit every entry once per full turn.
        let mut seen = std::collections::HashMap::new();
        let (mut at, mut laps) = (517, 0);
        for _ in 0..(t.slots.capacity() / 100 + 1) {
            let wrapped;
            (at, wrapped) = t.retain_slice(at, 100, |k, _| {
                *seen.entry(k.clone()).or_insert(0) += 1;
                true
            });
            laps += usize::from(wrapped);
        }
        assert!(laps >= 1, "no slice said it passed the last slot");
        assert_eq!(seen.len(), t.len());
        assert!(seen.values().all(|&n| n <= 2));
        t.retain_slice(0, usize::MAX, |k, _| !k.ends_with('7'));
        assert!(t.iter().all(|(k, _)| !k.ends_with('7')));
        assert!(t.get("user-1000").is_none());
    }
}
