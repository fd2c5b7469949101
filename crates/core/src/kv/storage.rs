//! The physical KV cache: per-layer buffers in the backend's memory, preallocated from a
//! byte budget. Which block holds what is the block pool's and the block tables' business;
//! this only stores, and maps a position to its slot.

use super::KvLayout;
use crate::backend::{Backend, Isa, KvBuffer};

/// Host buffers: what every CPU kernel set reads.
const HOST: Backend = Backend::Cpu(Isa::Portable);
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
    /// A pool in host memory, for the CPU kernels.
    pub fn new(layout: KvLayout, block_size: usize, num_blocks: usize) -> Result<Self> {
        Self::new_on(layout, block_size, num_blocks, &candle_core::Device::Cpu, HOST)
    }

    /// A pool for `model`'s kernels, where they run.
    pub fn for_model(model: &dyn crate::CausalLm, block_size: usize, num_blocks: usize) -> Result<Self> {
        Self::new_on(
            model.kv_layout(),
            block_size,
            num_blocks,
            model.device(),
            model.backend(),
        )
    }

    /// A pool for `backend`'s kernels on `device` ([`Backend::kv_buffer`]).
    pub fn new_on(
        layout: KvLayout,
        block_size: usize,
        num_blocks: usize,
        device: &candle_core::Device,
        backend: Backend,
    ) -> Result<Self> {
        if block_size == 0 || num_blocks == 0 {
            return Err(Error::KvCache(format!(
                "block size ({block_size}) and block count ({num_blocks}) must be positive"
            )));
        }
        let slots = block_size * num_blocks;
        let layers = (0..layout.num_layers)
            .map(|_| {
                Ok(KvLayer {
                    keys: backend.kv_buffer(
                        device,
                        layout.dtype,
                        slots * layout.num_kv_heads * layout.key_dim,
                    )?,
                    values: backend.kv_buffer(
                        device,
                        layout.dtype,
                        slots * layout.num_kv_heads * layout.value_dim,
                    )?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            layout,
            block_size,
            num_blocks,
            layers,
        })
    }

    /// As many blocks as fit in `memory_bytes`, in host memory.
    pub fn with_memory_budget(layout: KvLayout, block_size: usize, memory_bytes: usize) -> Result<Self> {
        Self::with_memory_budget_on(layout, block_size, memory_bytes, &candle_core::Device::Cpu, HOST)
    }

    /// As many blocks as fit in `memory_bytes`, for `backend`'s kernels on `device`.
    pub fn with_memory_budget_on(
        layout: KvLayout,
        block_size: usize,
        memory_bytes: usize,
        device: &candle_core::Device,
        backend: Backend,
    ) -> Result<Self> {
        let per_block = layout.bytes_per_token() * block_size;
        let num_blocks = memory_bytes / per_block.max(1);
        if num_blocks == 0 {
            return Err(Error::KvCache(format!(
                "a budget of {memory_bytes} bytes holds no block: one block of {block_size} tokens needs {per_block} bytes"
            )));
        }
        Self::new_on(layout, block_size, num_blocks, device, backend)
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

    /// Elements of one block in one layer: (keys, values).
    fn block_elements(&self) -> (usize, usize) {
        let per_slot = self.block_size * self.layout.num_kv_heads;
        (per_slot * self.layout.key_dim, per_slot * self.layout.value_dim)
    }

    /// The bytes of one block's record: every layer's keys and values.
    pub fn block_record_len(&self) -> usize {
        self.layout.bytes_per_token() * self.block_size
    }

    /// A block's keys and values in every layer, as bytes (the disk tier's payload). A
    /// block is contiguous in each layer's buffer (`[num_blocks, ..]` row-major).
    pub fn block_bytes(&self, block: u32) -> Result<Vec<u8>> {
        let (k, v) = self.block_elements();
        let b = block as usize;
        let mut out = Vec::with_capacity(self.block_record_len());
        for layer in &self.layers {
            layer.keys.bytes_into(b * k, k, &mut out)?;
            layer.values.bytes_into(b * v, v, &mut out)?;
        }
        Ok(out)
    }

    /// How a block's record lays out its values: the kernels' layout. The CPU kernels
    /// store keys transposed within a block ([`AttnGeometry::keys_transposed`](crate::backend::AttnGeometry::keys_transposed)),
    /// the GPU backend stores every vector as a row; records of one are not the other's,
    /// so the disk tier keys them apart.
    pub fn record_format(&self) -> &'static str {
        match self.layers.first().map(|l| &l.keys) {
            Some(KvBuffer::Device(_)) => "rows",
            _ => "host",
        }
    }

    /// Fills a block from [`block_bytes`](Self::block_bytes)'s output.
    pub fn set_block_bytes(&mut self, block: u32, bytes: &[u8]) -> Result<()> {
        if bytes.len() != self.block_record_len() || block as usize >= self.num_blocks {
            return Err(Error::KvCache(format!(
                "a block record of {} bytes for block {block}; expected {} bytes and a block below {}",
                bytes.len(),
                self.block_record_len(),
                self.num_blocks
            )));
        }
        let (k, v) = self.block_elements();
        let size = self.layout.dtype.size();
        let b = block as usize;
        let mut at = 0;
        for layer in &mut self.layers {
            layer.keys.set_bytes(b * k, &bytes[at..at + k * size])?;
            at += k * size;
            layer.values.set_bytes(b * v, &bytes[at..at + v * size])?;
            at += v * size;
        }
        Ok(())
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

    /// A block's bytes, copied into another block, give that block the same keys and
    /// values in every layer, and touch no other block.
    #[test]
    fn a_block_round_trips_through_its_bytes() {
        for dtype in [KvDtype::F32, KvDtype::F16] {
            let layout = KvLayout {
                num_layers: 3,
                num_kv_heads: 2,
                key_dim: 8,
                value_dim: 4,
                dtype,
            };
            let mut kv = KvStorage::new(layout, 4, 3).unwrap();
            let slots = 4 * 3 * 2;
            for l in 0..3 {
                let layer = kv.layer_mut(l);
                let keys: Vec<f32> = (0..slots * 8).map(|i| (i + 1000 * l) as f32 * 0.25).collect();
                let values: Vec<f32> = (0..slots * 4).map(|i| -((i + 1000 * l) as f32)).collect();
                layer.keys.write(0, &keys);
                layer.values.write(0, &values);
            }
            let record = kv.block_bytes(1).unwrap();
            assert_eq!(record.len(), kv.block_record_len());
            assert_eq!(record.len(), 4 * layout.bytes_per_token());
            let read = |kv: &KvStorage, l: usize| {
                let (mut k, mut v) = (Vec::new(), Vec::new());
                kv.layer(l).keys.read_into(0, slots * 8, &mut k);
                kv.layer(l).values.read_into(0, slots * 4, &mut v);
                (k, v)
            };
            let before: Vec<_> = (0..3).map(|l| read(&kv, l)).collect();
            kv.set_block_bytes(2, &record).unwrap();
            for (l, (k0, v0)) in before.iter().enumerate() {
                let (k, v) = read(&kv, l);
                let (kb, vb) = (4 * 2 * 8, 4 * 2 * 4);
                assert_eq!(k[2 * kb..3 * kb], k0[kb..2 * kb], "{dtype:?} layer {l} keys");
                assert_eq!(v[2 * vb..3 * vb], v0[vb..2 * vb], "{dtype:?} layer {l} values");
                assert_eq!(k[..2 * kb], k0[..2 * kb], "blocks 0 and 1 untouched");
            }
            assert!(kv.set_block_bytes(0, &record[1..]).is_err());
            assert!(kv.set_block_bytes(3, &record).is_err());
        }
    }
}
