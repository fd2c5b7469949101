//! The logical side of the KV cache: which blocks are free, who holds each, and the
//! prefix cache (full blocks findable by the chained hash of their tokens, kept until
//! evicted least recently released first).

use std::collections::{BTreeMap, HashMap};

/// Hands out block ids; blocks are reference-counted so that several sequences can share
/// one (a cached prefix, the `n` samples of one prompt).
///
/// Prefix caching: a full block can be registered under the hash of its tokens chained
/// with its parent block's hash. When its last owner releases it, a registered block is
/// not freed but kept, still findable by [`lookup`](Self::lookup), in a least-recently
/// released order, and evicted (forgotten) only when [`allocate`](Self::allocate) finds
/// no free block. [`num_free`](Self::num_free) counts both kinds.
#[derive(Debug, Clone)]
pub struct BlockPool {
    free: Vec<u32>,
    ref_counts: Vec<u32>,
    /// hash -> block
    cached: HashMap<u64, u32>,
    /// block -> (hash, tokens), for registered blocks
    registered: Vec<Option<(u64, Box<[u32]>)>>,
    /// Released registered blocks by release time (oldest first).
    evictable: BTreeMap<u64, u32>,
    released_at: Vec<u64>,
    clock: u64,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        Self {
            // Pop from the end: hand out low ids first (easier to read in tests and logs).
            free: (0..num_blocks as u32).rev().collect(),
            ref_counts: vec![0; num_blocks],
            cached: HashMap::new(),
            registered: vec![None; num_blocks],
            evictable: BTreeMap::new(),
            released_at: vec![0; num_blocks],
            clock: 0,
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks that [`allocate`](Self::allocate) can hand out: free ones plus cached
    /// blocks nobody holds.
    pub fn num_free(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks held by at least one sequence.
    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// One fresh block with a reference count of one, or `None` when every block is held.
    /// Evicts the least recently released cached block when no block is free.
    pub fn allocate(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.evictable.pop_first()?;
                if let Some((hash, _)) = self.registered[b as usize].take() {
                    self.cached.remove(&hash);
                }
                b
            }
        };
        self.ref_counts[b as usize] = 1;
        Some(b)
    }

    /// Another owner for a block (held, or cached and unheld).
    pub fn share(&mut self, block: u32) {
        let rc = &mut self.ref_counts[block as usize];
        if *rc == 0 {
            let at = self.released_at[block as usize];
            assert_eq!(
                self.evictable.remove(&at),
                Some(block),
                "sharing free block {block}"
            );
        }
        *rc += 1;
    }

    /// Drops one reference; with none left the block becomes free (or evictable, when
    /// registered). Returns whether no reference remains.
    pub fn release(&mut self, block: u32) -> bool {
        let rc = &mut self.ref_counts[block as usize];
        assert!(*rc > 0, "releasing free block {block}");
        *rc -= 1;
        if *rc > 0 {
            return false;
        }
        if self.registered[block as usize].is_some() {
            self.clock += 1;
            self.released_at[block as usize] = self.clock;
            self.evictable.insert(self.clock, block);
        } else {
            self.free.push(block);
        }
        true
    }

    pub fn ref_count(&self, block: u32) -> u32 {
        self.ref_counts[block as usize]
    }

    /// Makes a full, computed block findable by its chained hash. A hash that is already
    /// registered keeps its first block.
    pub fn register(&mut self, block: u32, hash: u64, tokens: &[u32]) {
        if self.cached.contains_key(&hash) || self.registered[block as usize].is_some() {
            return;
        }
        self.cached.insert(hash, block);
        self.registered[block as usize] = Some((hash, tokens.into()));
    }

    /// The cached block for `hash` holding exactly `tokens`, if any.
    pub fn lookup(&self, hash: u64, tokens: &[u32]) -> Option<u32> {
        let b = *self.cached.get(&hash)?;
        match &self.registered[b as usize] {
            Some((_, t)) if &t[..] == tokens => Some(b),
            _ => None,
        }
    }
}

/// The hash of a full block: its tokens chained with its parent block's hash. Stable
/// across builds and runs (FNV-1a, not std's `DefaultHasher`), because the disk tier
/// ([`super::disk`]) finds blocks by it after a restart.
pub fn block_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = super::disk::StableHasher::default();
    h.write_u64(parent);
    for t in tokens {
        h.write(&t.to_le_bytes());
    }
    h.finish()
}

/// The full blocks of a prompt that the prefix cache may hold (all but its last token,
/// whose logits are needed), in order: index, chained hash, tokens.
pub fn prefix_blocks(tokens: &[u32], block_size: usize) -> impl Iterator<Item = (usize, u64, &[u32])> {
    let mut parent = 0;
    tokens[..tokens.len().saturating_sub(1)]
        .chunks_exact(block_size)
        .enumerate()
        .map(move |(b, toks)| {
            parent = block_hash(parent, toks);
            (b, parent, toks)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::BlockTable;

    #[test]
    fn allocator_reuses_and_counts_references() {
        let mut a = BlockPool::new(4);
        let mut t1 = BlockTable::new();
        t1.reserve(&mut a, 17, 16).unwrap();
        assert_eq!(t1.blocks(), &[0, 1]);
        assert_eq!(a.num_free(), 2);
        let mut t2 = BlockTable::new();
        t2.push_shared(&mut a, t1.blocks()[0]);
        assert_eq!(a.ref_count(0), 2);
        t1.release_all(&mut a);
        assert_eq!(a.num_free(), 3, "block 0 is still held by t2");
        t2.release_all(&mut a);
        assert_eq!(a.num_free(), 4);
    }

    #[test]
    fn cached_blocks_survive_release_until_evicted() {
        let mut a = BlockPool::new(2);
        let b0 = a.allocate().unwrap();
        let h = block_hash(0, &[1, 2]);
        a.register(b0, h, &[1, 2]);
        a.release(b0);
        assert_eq!(a.num_free(), 2);
        assert_eq!(a.lookup(h, &[1, 2]), Some(b0));
        assert_eq!(
            a.lookup(h, &[1, 3]),
            None,
            "tokens are checked, not just the hash"
        );
        a.share(b0);
        assert_eq!(a.num_free(), 1);
        a.release(b0);
        // Two allocations: the free block first, then the cached one is evicted.
        let x = a.allocate().unwrap();
        assert_ne!(x, b0);
        assert_eq!(a.allocate(), Some(b0));
        assert_eq!(a.lookup(h, &[1, 2]), None);
        assert_eq!(a.allocate(), None);
    }
}
