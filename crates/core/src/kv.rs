//! The paged KV cache.
//!
//! Keys and values live in a pool of fixed-size blocks, preallocated once from a memory
//! budget. Every layer has the same number of blocks and a sequence uses the same block
//! ids in every layer, so one [`BlockTable`] (the list of block ids that hold a sequence's
//! positions, in order) describes a sequence's cache in all layers. Position `p` of a
//! sequence lives in block `table[p / block_size]`, slot `p % block_size`.
//!
//! [`BlockAllocator`] hands out block ids and reference-counts them, so that sequences
//! can share the blocks of a common prefix. Which sequence gets blocks when is the
//! scheduler's business.
//!
//! Storage is f32 or f16 ([`KvDtype`]); attention reads it through the hand-written
//! kernel in [`crate::attention`], which widens to f32 and accumulates in f32. f16 halves
//! the bytes every decode step reads (at 16 streams of a few hundred tokens that is more
//! than the weights) and doubles the tokens a memory budget holds; f32 keeps the exact
//! reference numerics for unquantized checkpoints.

use std::collections::{BTreeMap, HashMap};

use crate::error::{Error, Result};

/// The element type of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    #[default]
    F32,
    F16,
}

impl KvDtype {
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(KvDtype::F32),
            "f16" | "float16" => Ok(KvDtype::F16),
            other => Err(format!("unknown KV cache dtype {other:?} (use f32 or f16)")),
        }
    }
}

/// What one token stores per layer. Standard attention stores `num_kv_heads` key and value
/// vectors; latent attention (DeepSeek) stores one latent vector and no values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub key_dim: usize,
    /// 0 when the cache holds no separate values.
    pub value_dim: usize,
    pub dtype: KvDtype,
}

impl KvLayout {
    /// Values (keys and values together) per token per layer.
    pub fn floats_per_token_layer(&self) -> usize {
        self.num_kv_heads * (self.key_dim + self.value_dim)
    }

    pub fn bytes_per_token(&self) -> usize {
        self.num_layers * self.floats_per_token_layer() * self.dtype.size()
    }
}

/// Cached vectors in the cache's element type.
pub enum KvBuf {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
}

impl KvBuf {
    fn zeros(dtype: KvDtype, len: usize) -> Self {
        // Fresh zeroed memory is not touched until written, so the huge-page hint still
        // applies to all of it.
        match dtype {
            KvDtype::F32 => {
                let mut v = vec![0.0; len];
                crate::host::advise_huge_pages(&mut v);
                KvBuf::F32(v)
            }
            KvDtype::F16 => {
                // Zero bits, allocated as integers so that the allocator hands over
                // fresh zeroed pages (a `vec![f16::ZERO; len]` writes every value).
                use half::vec::HalfBitsVecExt;
                let mut v = vec![0u16; len];
                crate::host::advise_huge_pages(&mut v);
                KvBuf::F16(v.reinterpret_into())
            }
        }
    }

    pub fn len(&self) -> usize {
        match self {
            KvBuf::F32(v) => v.len(),
            KvBuf::F16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stores `src` at `at..at + src.len()`.
    pub fn write(&mut self, at: usize, src: &[f32]) {
        use half::slice::HalfFloatSliceExt;
        match self {
            KvBuf::F32(v) => v[at..at + src.len()].copy_from_slice(src),
            KvBuf::F16(v) => v[at..at + src.len()].convert_from_f32_slice(src),
        }
    }

    /// Stores `src[i]` at `at + i * stride`.
    pub fn write_strided(&mut self, at: usize, stride: usize, src: &[f32]) {
        if stride == 1 {
            return self.write(at, src);
        }
        match self {
            KvBuf::F32(v) => {
                for (i, &x) in src.iter().enumerate() {
                    v[at + i * stride] = x;
                }
            }
            KvBuf::F16(v) => {
                // Converted as one slice first: that uses the CPU's F16C when it has
                // it, where `f16::from_f32` per value is a software conversion.
                use half::slice::HalfFloatSliceExt;
                let mut halves = [half::f16::ZERO; 64];
                for (c, chunk) in src.chunks(64).enumerate() {
                    let h = &mut halves[..chunk.len()];
                    h.convert_from_f32_slice(chunk);
                    for (i, &x) in h.iter().enumerate() {
                        v[at + (64 * c + i) * stride] = x;
                    }
                }
            }
        }
    }

    /// Appends `len` values from `at`, widened to f32, to `out`.
    pub fn read_into(&self, at: usize, len: usize, out: &mut Vec<f32>) {
        match self {
            KvBuf::F32(v) => out.extend_from_slice(&v[at..at + len]),
            KvBuf::F16(v) => out.extend(v[at..at + len].iter().map(|x| x.to_f32())),
        }
    }
}

/// One layer's share of the pool: `[num_blocks, num_kv_heads, block_size, dim]` row-major,
/// keys transposed within each block and head (see [`AttnGeometry::keys_transposed`](crate::attention::AttnGeometry::keys_transposed)).
pub struct KvLayer {
    pub keys: KvBuf,
    pub values: KvBuf,
}

pub struct KvCache {
    layout: KvLayout,
    block_size: usize,
    num_blocks: usize,
    layers: Vec<KvLayer>,
}

impl KvCache {
    pub fn new(layout: KvLayout, block_size: usize, num_blocks: usize) -> Result<Self> {
        if block_size == 0 || num_blocks == 0 {
            return Err(Error::KvCache(format!(
                "block size ({block_size}) and block count ({num_blocks}) must be positive"
            )));
        }
        let slots = block_size * num_blocks;
        let layers = (0..layout.num_layers)
            .map(|_| KvLayer {
                keys: KvBuf::zeros(layout.dtype, slots * layout.num_kv_heads * layout.key_dim),
                values: KvBuf::zeros(layout.dtype, slots * layout.num_kv_heads * layout.value_dim),
            })
            .collect();
        Ok(Self {
            layout,
            block_size,
            num_blocks,
            layers,
        })
    }

    /// As many blocks as fit in `memory_bytes`.
    pub fn with_memory_budget(layout: KvLayout, block_size: usize, memory_bytes: usize) -> Result<Self> {
        let per_block = layout.bytes_per_token() * block_size;
        let num_blocks = memory_bytes / per_block.max(1);
        if num_blocks == 0 {
            return Err(Error::KvCache(format!(
                "a budget of {memory_bytes} bytes holds no block: one block of {block_size} tokens needs {per_block} bytes"
            )));
        }
        Self::new(layout, block_size, num_blocks)
    }

    pub fn layout(&self) -> KvLayout {
        self.layout
    }
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
    pub fn layer(&self, i: usize) -> &KvLayer {
        &self.layers[i]
    }
    pub fn layer_mut(&mut self, i: usize) -> &mut KvLayer {
        &mut self.layers[i]
    }

    /// The cache slot of position `pos` of a sequence with block table `table`.
    pub fn slot(&self, table: &[u32], pos: usize) -> Result<usize> {
        let block = table.get(pos / self.block_size).ok_or_else(|| {
            Error::InvalidBatch(format!(
                "position {pos} is beyond the block table ({} blocks of {})",
                table.len(),
                self.block_size
            ))
        })?;
        if *block as usize >= self.num_blocks {
            return Err(Error::InvalidBatch(format!(
                "block id {block} is outside the pool of {} blocks",
                self.num_blocks
            )));
        }
        Ok(*block as usize * self.block_size + pos % self.block_size)
    }
}

/// Hands out block ids; blocks are reference-counted so that several sequences can share
/// one (a cached prefix, the `n` samples of one prompt).
///
/// Prefix caching: a full block can be registered under the hash of its tokens chained
/// with its parent block's hash. When its last owner releases it, a registered block is
/// not freed but kept, still findable by [`lookup`](Self::lookup), in a least-recently
/// released order, and evicted (forgotten) only when [`allocate`](Self::allocate) finds
/// no free block. [`num_free`](Self::num_free) counts both kinds.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
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

impl BlockAllocator {
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

/// The hash of a full block: its tokens chained with its parent block's hash.
pub fn block_hash(parent: u64, tokens: &[u32]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

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
    pub fn reserve(
        &mut self,
        alloc: &mut BlockAllocator,
        num_tokens: usize,
        block_size: usize,
    ) -> Result<()> {
        let need = Self::blocks_for(num_tokens, block_size).saturating_sub(self.blocks.len());
        if need > alloc.num_free() {
            return Err(Error::KvCache(format!(
                "out of blocks: need {need} more, {} free of {}",
                alloc.num_free(),
                alloc.num_blocks()
            )));
        }
        for _ in 0..need {
            self.blocks.push(alloc.allocate().expect("checked free count"));
        }
        Ok(())
    }

    /// Appends an already allocated (shared) block.
    pub fn push_shared(&mut self, alloc: &mut BlockAllocator, block: u32) {
        alloc.share(block);
        self.blocks.push(block);
    }

    /// Gives every block back.
    pub fn release_all(&mut self, alloc: &mut BlockAllocator) {
        for b in self.blocks.drain(..) {
            alloc.release(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Strided writes land every value (past a whole chunk of conversion) where it
    /// belongs, and touch nothing between.
    #[test]
    fn strided_writes_place_each_value() {
        let src: Vec<f32> = (0..130).map(|i| i as f32 * 0.5 - 20.0).collect();
        for dtype in [KvDtype::F32, KvDtype::F16] {
            let mut buf = KvBuf::zeros(dtype, 2 + 3 * src.len());
            buf.write_strided(2, 3, &src);
            let mut all = Vec::new();
            buf.read_into(0, buf.len(), &mut all);
            for (i, v) in all.iter().enumerate() {
                let want = if i >= 2 && (i - 2) % 3 == 0 {
                    src[(i - 2) / 3]
                } else {
                    0.0
                };
                assert_eq!(*v, want, "{dtype:?} at {i}");
            }
        }
    }

    #[test]
    fn allocator_reuses_and_counts_references() {
        let mut a = BlockAllocator::new(4);
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
        let mut a = BlockAllocator::new(2);
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

    #[test]
    fn reserve_is_all_or_nothing() {
        let mut a = BlockAllocator::new(2);
        let mut t = BlockTable::new();
        let err = t.reserve(&mut a, 33, 16).unwrap_err();
        assert!(err.to_string().contains("need 3 more"), "{err}");
        assert_eq!(a.num_free(), 2);
        assert!(t.is_empty());
    }

    #[test]
    fn budget_sizes_the_pool() {
        let layout = KvLayout {
            num_layers: 2,
            num_kv_heads: 2,
            key_dim: 8,
            value_dim: 8,
            dtype: KvDtype::F32,
        };
        // 2 layers * 2 heads * 16 floats * 4 bytes = 256 bytes per token.
        let kv = KvCache::with_memory_budget(layout, 16, 256 * 16 * 10 + 100).unwrap();
        assert_eq!(kv.num_blocks(), 10);
        assert!(KvCache::with_memory_budget(layout, 16, 100).is_err());
        // f16 halves the bytes per token: twice the blocks.
        let half = KvLayout {
            dtype: KvDtype::F16,
            ..layout
        };
        assert_eq!(half.bytes_per_token(), 128);
        let kv = KvCache::with_memory_budget(half, 16, 256 * 16 * 10 + 100).unwrap();
        assert_eq!(kv.num_blocks(), 20);
    }
}
