//! The paged KV cache.
//!
//! Keys and values live in a pool of fixed-size blocks, preallocated once from a memory
//! budget. Every layer has the same number of blocks and a sequence uses the same block
//! ids in every layer, so one [`BlockTable`] (the list of block ids that hold a sequence's
//! positions, in order) describes a sequence's cache in all layers. Position `p` of a
//! sequence lives in block `table[p / block_size]`, slot `p % block_size`.
//!
//! [`BlockPool`] hands out block ids and reference-counts them, so that sequences
//! can share the blocks of a common prefix. Which sequence gets blocks when is the
//! scheduler's business.
//!
//! Storage is f32 or f16 ([`KvDtype`]); attention reads it through the hand-written
//! kernel in [`crate::backend`], which widens to f32 and accumulates in f32. f16 halves
//! the bytes every decode step reads (at 16 streams of a few hundred tokens that is more
//! than the weights) and doubles the tokens a memory budget holds; f32 keeps the exact
//! reference numerics for unquantized checkpoints.

mod block_pool;
mod block_table;
pub mod disk;
mod layout;
mod storage;

pub use block_pool::{block_hash, prefix_blocks, BlockPool};
pub use block_table::BlockTable;
pub use layout::{KvDtype, KvLayout};
pub use storage::{KvLayer, KvStorage};
