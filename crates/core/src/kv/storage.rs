//! The physical KV cache: per-layer buffers in the backend's memory, preallocated from a
//! byte budget. Which block holds what is the block pool's and the block tables' business;
//! this only stores, and maps a position to its slot.

use super::KvLayout;
use crate::backend::KvBuffer;
use crate::error::{Error, Result};

/// One layer's share of the pool: `[num_blocks, num_kv_heads, block_size, dim]` row-major,
/// keys transposed within each block and head (see [`AttnGeometry::keys_transposed`](crate::backend::AttnGeometry::keys_transposed)).
pub struct KvLayer {
    pub keys: KvBuffer,
    pub values: KvBuffer,
}

pub struct KvStorage {
    layout: KvLayout,
    block_size: usize,
    num_blocks: usize,
    layers: Vec<KvLayer>,
}

impl KvStorage {
    pub fn new(layout: KvLayout, block_size: usize, num_blocks: usize) -> Result<Self> {
        if block_size == 0 || num_blocks == 0 {
            return Err(Error::KvCache(format!(
                "block size ({block_size}) and block count ({num_blocks}) must be positive"
            )));
        }
        let slots = block_size * num_blocks;
        let layers = (0..layout.num_layers)
            .map(|_| KvLayer {
                keys: KvBuffer::zeros(layout.dtype, slots * layout.num_kv_heads * layout.key_dim),
                values: KvBuffer::zeros(layout.dtype, slots * layout.num_kv_heads * layout.value_dim),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvDtype;

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
        let kv = KvStorage::with_memory_budget(layout, 16, 256 * 16 * 10 + 100).unwrap();
        assert_eq!(kv.num_blocks(), 10);
        assert!(KvStorage::with_memory_budget(layout, 16, 100).is_err());
        // f16 halves the bytes per token: twice the blocks.
        let half = KvLayout {
            dtype: KvDtype::F16,
            ..layout
        };
        assert_eq!(half.bytes_per_token(), 128);
        let kv = KvStorage::with_memory_budget(half, 16, 256 * 16 * 10 + 100).unwrap();
        assert_eq!(kv.num_blocks(), 20);
    }
}
