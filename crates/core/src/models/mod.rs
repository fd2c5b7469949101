//! Model implementations and how a checkpoint becomes one.

mod decoder;

pub use decoder::DecoderModel;

use candle_core::{DType, Device};

use crate::batch::{ForwardBatch, ForwardOutput};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::kv::{KvLayout, KvStorage};
use crate::weights::WeightStore;

/// A causal language model that runs over the paged KV cache.
pub trait CausalLm: Send + Sync {
    fn config(&self) -> &ModelConfig;

    /// Where the weights live and the forward pass runs; the KV pool is allocated there.
    fn device(&self) -> &Device;

    /// The kernels its layers run (chosen at load); the KV pool takes their form.
    fn backend(&self) -> crate::backend::Backend;

    /// What the KV cache must hold per token.
    fn kv_layout(&self) -> KvLayout;

    /// Runs the batch: writes the new tokens' keys and values into `kv` and returns logits.
    fn forward(&self, batch: &ForwardBatch, kv: &mut KvStorage) -> Result<ForwardOutput>;

    /// Whether the model has a multi-token prediction module ([`CausalLm::forward_mtp`]).
    fn has_mtp(&self) -> bool {
        false
    }

    /// The multi-token prediction module over `batch`, whose tokens at position i are
    /// each sequence's *next* tokens (t_{i+1}), with `hidden` the main model's final
    /// hidden states at those positions (`[tokens, hidden]`, from a forward that asked
    /// for them). Writes the module's own KV (the last layer of the pool) and returns
    /// its logits, which guess t_{i+2}.
    fn forward_mtp(
        &self,
        _batch: &ForwardBatch,
        _hidden: &candle_core::Tensor,
        _kv: &mut KvStorage,
    ) -> Result<ForwardOutput> {
        Err(crate::Error::InvalidBatch(
            "the model has no multi-token prediction module".into(),
        ))
    }
}

/// What the KV cache holds per token for `cfg`: per-head keys and values, or for latent
/// attention one latent vector (rotary key and compressed KV) serving as both.
pub fn kv_layout(cfg: &ModelConfig) -> KvLayout {
    match &cfg.mla {
        Some(mla) => KvLayout {
            num_layers: cfg.num_layers,
            num_kv_heads: 1,
            key_dim: crate::layers::LatentAttention::cache_width(mla),
            value_dim: 0,
            dtype: cfg.kv_cache_dtype,
        },
        None => KvLayout {
            num_layers: cfg.num_layers,
            num_kv_heads: cfg.num_kv_heads,
            key_dim: cfg.head_dim,
            value_dim: cfg.head_dim,
            dtype: cfg.kv_cache_dtype,
        },
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HfConfig;

    /// DeepSeek-V2-Lite's shape: the latent cache stores 576 values per token and layer
    /// where per-head keys and values would take 16 x (192 + 128) = 5,120, so the same
    /// memory holds 8.9 times as many tokens.
    #[test]
    fn latent_cache_holds_many_times_more_tokens() {
        let hf: HfConfig = serde_json::from_value(serde_json::json!({
            "architectures": ["DeepseekV2ForCausalLM"], "vocab_size": 102400, "hidden_size": 2048,
            "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
            "num_attention_heads": 16, "num_key_value_heads": 16, "max_position_embeddings": 163840,
            "kv_lora_rank": 512, "q_lora_rank": null, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
            "v_head_dim": 128, "n_routed_experts": 64, "num_experts_per_tok": 6, "n_shared_experts": 2,
            "first_k_dense_replace": 1, "topk_method": "greedy"
        }))
        .unwrap();
        let cfg = ModelConfig::from_hf(&hf).unwrap();
        let latent = kv_layout(&cfg);
        assert_eq!(latent.floats_per_token_layer(), 576);
        assert_eq!(latent.bytes_per_token(), 27 * 576 * 4);
        let full = KvLayout {
            num_layers: 27,
            num_kv_heads: 16,
            key_dim: 128 + 64,
            value_dim: 128,
            dtype: crate::kv::KvDtype::F32,
        };
        assert_eq!(full.bytes_per_token(), 27 * 16 * 320 * 4);
        let gib = 1 << 30;
        let latent_tokens = KvStorage::with_memory_budget(latent, 16, gib)
            .unwrap()
            .num_blocks()
            * 16;
        let full_tokens = KvStorage::with_memory_budget(full, 16, gib).unwrap().num_blocks() * 16;
        let ratio = latent_tokens as f64 / full_tokens as f64;
        assert!(
            (ratio - 5120.0 / 576.0).abs() < 0.05,
            "{latent_tokens} vs {full_tokens} tokens: {ratio}"
        );
    }
}
