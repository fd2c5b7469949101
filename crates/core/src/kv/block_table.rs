//! A sequence's block table: the blocks that hold its positions, in order.

use super::BlockPool;
use crate::error::{Error, Result};

/// The blocks that hold one sequence's positions, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTable {
    blocks: Vec<u32>,
}

impl BlockTable {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Blocks needed to hold `num_tokens` positions.
    pub fn blocks_for(num_tokens: usize, block_size: usize) -> usize {
        num_tokens.div_ceil(block_size)
    }

    /// Grows the table to hold `num_tokens` positions. All-or-nothing: when the pool runs
    /// out, the blocks taken by this call are returned and an error says how many were
    /// missing.
    pub fn reserve(&mut self, pool: &mut BlockPool, num_tokens: usize, block_size: usize) -> Result<()> {
        let need = Self::blocks_for(num_tokens, block_size).saturating_sub(self.blocks.len());
        if need > pool.num_free() {
            return Err(Error::KvCache(format!(
                "out of blocks: need {need} more, {} free of {}",
                pool.num_free(),
                pool.num_blocks()
            )));
        }
        for _ in 0..need {
            self.blocks.push(pool.allocate().expect("checked free count"));
        }
        Ok(())
    }

    /// Appends an already allocated (shared) block.
    pub fn push_shared(&mut self, pool: &mut BlockPool, block: u32) {
        pool.share(block);
        self.blocks.push(block);
    }

    /// Appends a block this table already holds the one reference of (just allocated).
    pub fn push_owned(&mut self, block: u32) {
        self.blocks.push(block);
    }

    /// Gives back the blocks beyond those that hold `num_tokens` positions (the slots
    /// of drafted tokens that verification rejected).
    pub fn truncate(&mut self, pool: &mut BlockPool, num_tokens: usize, block_size: usize) {
        let keep = Self::blocks_for(num_tokens, block_size);
        while self.blocks.len() > keep {
            pool.release(self.blocks.pop().expect("more blocks than kept"));
        }
    }

    /// Gives every block back.
    pub fn release_all(&mut self, pool: &mut BlockPool) {
        for b in self.blocks.drain(..) {
            pool.release(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_is_all_or_nothing() {
        let mut a = BlockPool::new(2);
        let mut t = BlockTable::new();
        let err = t.reserve(&mut a, 33, 16).unwrap_err();
        assert!(err.to_string().contains("need 3 more"), "{err}");
        assert_eq!(a.num_free(), 2);
        assert!(t.is_empty());
    }

    #[test]
    fn truncate_returns_only_the_blocks_past_the_kept_positions() {
        let mut a = BlockPool::new(4);
        let mut t = BlockTable::new();
        t.reserve(&mut a, 49, 16).unwrap();
        assert_eq!((t.len(), a.num_free()), (4, 0));
        t.truncate(&mut a, 33, 16);
        assert_eq!((t.len(), a.num_free()), (3, 1));
        t.truncate(&mut a, 48, 16);
        assert_eq!((t.len(), a.num_free()), (3, 1));
        t.truncate(&mut a, 0, 16);
        assert_eq!((t.len(), a.num_free()), (0, 4));
    }
}
