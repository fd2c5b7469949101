//! Model implementations and how a checkpoint becomes one.

mod decoder;

pub use decoder::DecoderModel;

use candle_core::{DType, Device};

use crate::batch::{ForwardBatch, ForwardOutput};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::kv::{KvCache, KvLayout};
use crate::weights::WeightStore;

/// A causal language model that runs over the paged KV cache.
pub trait CausalLm: Send + Sync {
    fn config(&self) -> &ModelConfig;

    /// What the KV cache must hold per token.
    fn kv_layout(&self) -> KvLayout;

    /// Runs the batch: writes the new tokens' keys and values into `kv` and returns logits.
    fn forward(&self, batch: &ForwardBatch, kv: &mut KvCache) -> Result<ForwardOutput>;
}

/// Builds the model for `cfg` from `store`.
pub fn build_model(cfg: &ModelConfig, store: &WeightStore) -> Result<Box<dyn CausalLm>> {
    // Every supported architecture is the pre-norm decoder; DeepSeek's latent attention
    // will be another implementation behind the same trait.
    let model = DecoderModel::load(cfg, store)?;
    store.finish();
    Ok(Box::new(model))
}

/// The compute dtype for `device` when the user does not choose one: f32 on CPUs, where
/// candle's bf16/f16 matmuls are slower than f32 (no native half-precision GEMM path).
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}
