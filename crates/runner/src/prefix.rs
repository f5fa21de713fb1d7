//! Prefix reuse: the KV entries of prompts already computed, kept so that a
//! prompt sharing their start (a system prompt, the earlier turns of a
//! conversation) skips recomputing it.
//!
//! Rank 0 decides everything with a [`PrefixIndex`] (pure: token sequences,
//! sizes, use order); every rank keeps the KV of each entry for its own
//! layers and heads in a [`PrefixStore`], told by rank 0 through the step
//! messages which entry a new sequence starts from and which prompt to keep,
//! and through `Forget` which entries to drop.
//!
//! Invariants:
//! * **Same answer as a cold run.** A reused prefix is a whole number of
//!   attention blocks (`engine::model::ATTENTION_BLOCK`) and only ever
//!   prompt positions, computed as prompt chunks: by chunking independence
//!   the rest of the prompt then gets exactly the logits it gets computed
//!   from position 0. At least the prompt's last token is always computed
//!   (it gives the first token's logits).
//! * **Bounded.** The entries hold at most `budget` positions together;
//!   inserting evicts the least recently used first, and an entry longer
//!   than the whole budget is not kept.
//! * **Never dropped while needed.** An entry a task was started from is
//!   pinned until that task's first step has gone out to every rank, so a
//!   `Forget` can never reach a rank before the step that copies from it.

use std::collections::HashMap;

use engine::model::{KvCache, ATTENTION_BLOCK};

/// Which entry a sequence starts from, and how many of its positions.
pub type Reuse = (u64, u32);

#[derive(Debug)]
struct Entry {
    id: u64,
    tokens: Vec<u32>,
    last_use: u64,
    pins: usize,
}

/// Rank 0's index of the kept prefixes.
#[derive(Debug)]
pub struct PrefixIndex {
    entries: Vec<Entry>,
    /// Positions all entries may hold together.
    budget: usize,
    used: usize,
    next_id: u64,
    clock: u64,
    pub hits: u64,
    pub misses: u64,
}

/// The longest prefix of `len` positions a prompt of `prompt_len` tokens
/// may take from an entry it shares `common` tokens with: whole blocks,
/// leaving the prompt's last token to compute.
pub fn reusable(common: usize, prompt_len: usize) -> usize {
    let most = common.min(prompt_len.saturating_sub(1));
    most / ATTENTION_BLOCK * ATTENTION_BLOCK
}

/// How much of a prompt of `prompt_len` tokens is worth keeping: its whole
/// blocks.
pub fn keepable(prompt_len: usize) -> usize {
    prompt_len / ATTENTION_BLOCK * ATTENTION_BLOCK
}

impl PrefixIndex {
    pub fn new(budget: usize) -> PrefixIndex {
        PrefixIndex {
            entries: Vec::new(),
            budget,
            used: 0,
            next_id: 1,
            clock: 0,
            hits: 0,
            misses: 0,
        }
    }

    pub fn used(&self) -> usize {
        self.used
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The entry sharing the longest reusable prefix with `prompt`, pinned
    /// (see [`PrefixIndex::unpin`]), counted as a hit; `None` (a miss) when
    /// no entry shares a whole block.
    pub fn lookup(&mut self, prompt: &[u32]) -> Option<Reuse> {
        let best = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let common = e
                    .tokens
                    .iter()
                    .zip(prompt)
                    .take_while(|(a, b)| a == b)
                    .count();
                (i, reusable(common, prompt.len()))
            })
            .filter(|&(_, n)| n > 0)
            .max_by_key(|&(i, n)| (n, self.entries[i].last_use));
        let now = self.tick();
        match best {
            Some((i, n)) => {
                self.hits += 1;
                let e = &mut self.entries[i];
                e.last_use = now;
                e.pins += 1;
                Some((e.id, n as u32))
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// Drops entry `id` (it could not be kept after all).
    pub fn remove(&mut self, id: u64) {
        if let Some(at) = self.entries.iter().position(|e| e.id == id) {
            let e = self.entries.swap_remove(at);
            self.used -= e.tokens.len();
        }
    }

    /// The task started from `id` has sent its first step to every rank.
    pub fn unpin(&mut self, id: u64) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.id == id) {
            e.pins = e.pins.saturating_sub(1);
        }
    }

    /// Keeps `tokens` (a prompt's whole blocks) as a new entry, unless an
    /// entry already holds them as its start (it is then only marked used)
    /// or they do not fit the budget. Returns the new entry's id, if any,
    /// and the ids of the entries evicted to make room.
    pub fn insert(&mut self, tokens: &[u32]) -> (Option<u64>, Vec<u64>) {
        let now = self.tick();
        if tokens.is_empty() || tokens.len() > self.budget {
            return (None, Vec::new());
        }
        if let Some(e) = self
            .entries
            .iter_mut()
            .find(|e| e.tokens.starts_with(tokens))
        {
            e.last_use = now;
            return (None, Vec::new());
        }
        // An entry this one extends is redundant: every prompt that shares
        // a block with it shares as much with this one.
        let mut evicted = Vec::new();
        while let Some(at) = self
            .entries
            .iter()
            .position(|e| e.pins == 0 && tokens.starts_with(&e.tokens))
        {
            let e = self.entries.swap_remove(at);
            self.used -= e.tokens.len();
            evicted.push(e.id);
        }
        while self.used + tokens.len() > self.budget {
            let Some(at) = self
                .entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.pins == 0)
                .min_by_key(|(_, e)| e.last_use)
                .map(|(i, _)| i)
            else {
                // Everything left is pinned: keep nothing new now.
                return (None, evicted);
            };
            let e = self.entries.swap_remove(at);
            self.used -= e.tokens.len();
            evicted.push(e.id);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.used += tokens.len();
        self.entries.push(Entry {
            id,
            tokens: tokens.to_vec(),
            last_use: now,
            pins: 0,
        });
        (Some(id), evicted)
    }
}

/// A rank's KV of the kept prefixes, by entry id.
#[derive(Debug, Default)]
pub struct PrefixStore {
    entries: HashMap<u64, KvCache>,
}

impl PrefixStore {
    /// A new sequence's cache: a copy of `len` positions of entry `id`.
    pub fn start(&self, (id, len): Reuse) -> Result<KvCache, String> {
        let entry = self
            .entries
            .get(&id)
            .ok_or_else(|| format!("prefix entry {id} is not held on this rank"))?;
        entry.prefix(len as usize).map_err(|e| e.to_string())
    }

    /// Keeps the first `len` positions of `cache` as entry `id`.
    pub fn keep(&mut self, id: u64, len: u32, cache: &KvCache) -> Result<(), String> {
        let kept = cache.prefix(len as usize).map_err(|e| e.to_string())?;
        self.entries.insert(id, kept);
        Ok(())
    }

    pub fn forget(&mut self, ids: &[u64]) {
        for id in ids {
            self.entries.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: usize = ATTENTION_BLOCK;

    fn seq(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + salt).collect()
    }

    #[test]
    fn reuse_is_whole_blocks_and_leaves_the_last_token() {
        assert_eq!(reusable(B - 1, 100), 0);
        assert_eq!(reusable(B, 100), B);
        assert_eq!(reusable(3 * B + 5, 100), 3 * B);
        // The prompt is exactly the prefix: its last token is computed, so
        // only the blocks before it are taken.
        assert_eq!(reusable(2 * B, 2 * B), B);
        assert_eq!(reusable(2 * B, 2 * B + 1), 2 * B);
        assert_eq!(keepable(2 * B + 3), 2 * B);
        assert_eq!(keepable(B - 1), 0);
    }

    #[test]
    fn a_second_turn_hits_the_first_turns_prompt() {
        let mut index = PrefixIndex::new(1000);
        let turn1 = seq(3 * B + 4, 1);
        assert_eq!(index.lookup(&turn1), None, "cold");
        let (id, evicted) = index.insert(&turn1[..keepable(turn1.len())]);
        let id = id.expect("kept");
        assert!(evicted.is_empty());
        let mut turn2 = turn1.clone();
        turn2.extend(seq(40, 900));
        assert_eq!(index.lookup(&turn2), Some((id, 3 * B as u32)));
        assert_eq!((index.hits, index.misses), (1, 1));
        // A prompt sharing less than a block misses.
        let mut other = seq(B - 2, 1);
        other.extend(seq(50, 5000));
        assert_eq!(index.lookup(&other), None);
        assert_eq!((index.hits, index.misses), (1, 2));
    }

    #[test]
    fn the_longest_shared_prefix_wins() {
        let mut index = PrefixIndex::new(1000);
        let system = seq(2 * B, 3);
        let mut long = system.clone();
        long.extend(seq(2 * B, 77));
        let (short_id, _) = index.insert(&system);
        let (long_id, evicted) = index.insert(&long);
        assert_eq!(
            evicted,
            vec![short_id.unwrap()],
            "the system prompt alone is redundant"
        );
        assert_eq!((index.len(), index.used()), (1, 4 * B));
        let mut prompt = long.clone();
        prompt.push(1);
        assert_eq!(
            index.lookup(&prompt),
            Some((long_id.unwrap(), 4 * B as u32))
        );
        let mut prompt = system.clone();
        prompt.extend(seq(B, 500));
        assert_eq!(
            index.lookup(&prompt),
            Some((long_id.unwrap(), 2 * B as u32)),
            "the longer entry gives the system prompt"
        );
        // A pinned entry stays even when a longer one covers it.
        let mut index = PrefixIndex::new(1000);
        let (short_id, _) = index.insert(&system);
        let mut p = system.clone();
        p.push(1);
        assert!(index.lookup(&p).is_some());
        let (_, evicted) = index.insert(&long);
        assert!(evicted.is_empty());
        index.unpin(short_id.unwrap());
    }

    #[test]
    fn a_prompt_already_held_is_not_kept_twice() {
        let mut index = PrefixIndex::new(1000);
        let long = seq(4 * B, 3);
        index.insert(&long);
        assert_eq!(index.insert(&long[..2 * B]), (None, vec![]));
        assert_eq!(index.insert(&long), (None, vec![]));
        assert_eq!((index.len(), index.used()), (1, 4 * B));
    }

    #[test]
    fn the_budget_evicts_the_least_recently_used_and_spares_the_pinned() {
        let mut index = PrefixIndex::new(3 * B);
        let a = seq(B, 1);
        let b = seq(B, 2);
        let c = seq(B, 3);
        let (ia, _) = index.insert(&a);
        let (ib, _) = index.insert(&b);
        let (ic, _) = index.insert(&c);
        assert_eq!(index.used(), 3 * B);
        // a is used again (and pinned by the task that starts from it).
        let mut pa = a.clone();
        pa.push(0);
        assert_eq!(index.lookup(&pa), Some((ia.unwrap(), B as u32)));
        // d needs one entry's room: b is the least recently used.
        let (id, evicted) = index.insert(&seq(B, 4));
        assert!(id.is_some());
        assert_eq!(evicted, vec![ib.unwrap()]);
        // e needs two: c, then a is pinned, then d.
        let (_, evicted) = index.insert(&seq(2 * B, 5));
        assert_eq!(evicted[0], ic.unwrap());
        assert!(!evicted.contains(&ia.unwrap()), "a is pinned: {evicted:?}");
        assert!(index.used() <= 3 * B);
        index.unpin(ia.unwrap());
        // Longer than the whole budget: not kept, nothing evicted.
        assert_eq!(index.insert(&seq(4 * B, 6)), (None, vec![]));
    }

    #[test]
    fn everything_pinned_keeps_nothing_new() {
        let mut index = PrefixIndex::new(B);
        let a = seq(B, 1);
        index.insert(&a);
        let mut pa = a.clone();
        pa.push(9);
        assert!(index.lookup(&pa).is_some());
        assert_eq!(index.insert(&seq(B, 2)), (None, vec![]));
        assert_eq!(index.len(), 1);
    }
}
