//! The pre-norm decoder-only transformer: Llama, Qwen2, Qwen3, Mixtral, Qwen2-MoE,
//! Qwen3-MoE, OLMoE, DeepSeek-V2 and DeepSeek-V3.
//!
//! These architectures differ only in options that [`ModelConfig`] resolves (q/k/v
//! biases, q/k norms, tied embeddings, rope scaling, which layers are sparse and how
//! their experts are routed) and in the attention: grouped-query attention, or
//! DeepSeek's multi-head latent attention with its compressed cache. So they share this
//! one implementation:
//!
//! ```text
//! x = embed(tokens)
//! for each layer:
//!     x = x + attention(rms_norm(x))          # GQA or MLA over the paged KV cache
//!     x = x + feed_forward(rms_norm(x))       # dense SwiGLU or mixture of experts
//! logits = lm_head(rms_norm(x[last tokens]))
//! ```

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Tensor};

use super::CausalLm;
use crate::backend::{self, AttnSeq};
use crate::batch::{ForwardBatch, ForwardOutput, LogitRows};
use crate::config::{ExpertNaming, ModelConfig};
use crate::error::{Error, Result};
use crate::kv::{KvLayout, KvStorage};
use crate::layers::{
    Attention, AttentionContext, GatedMlp, LatentAttention, Linear, MoeBlock, RmsNorm, RotaryEmbedding,
};
use crate::weights::WeightStore;

enum FeedForward {
    Dense(GatedMlp),
    Sparse(Box<MoeBlock>),
}

enum SelfAttention {
    Grouped(Attention),
    Latent(LatentAttention),
}

struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: SelfAttention,
    post_attention_layernorm: RmsNorm,
    feed_forward: FeedForward,
}

impl DecoderLayer {
    fn load(store: &WeightStore, i: usize, cfg: &ModelConfig) -> Result<Self> {
        let prefix = format!("model.layers.{i}");
        let h = cfg.hidden_size;
        let feed_forward = match (&cfg.moe, cfg.sparse_layers[i]) {
            (Some(moe), true) => {
                let block = match moe.naming {
                    ExpertNaming::Mixtral => "block_sparse_moe",
                    ExpertNaming::Qwen | ExpertNaming::DeepSeek => "mlp",
                };
                FeedForward::Sparse(Box::new(MoeBlock::load(
                    store,
                    &format!("{prefix}.{block}"),
                    h,
                    moe,
                )?))
            }
            _ => FeedForward::Dense(GatedMlp::load(
                store,
                &format!("{prefix}.mlp"),
                h,
                cfg.intermediate_size,
                cfg.mlp_bias,
            )?),
        };
        Ok(Self {
            input_layernorm: RmsNorm::load(store, &format!("{prefix}.input_layernorm"), h, cfg.rms_norm_eps)?,
            self_attn: match cfg.mla {
                Some(_) => {
                    SelfAttention::Latent(LatentAttention::load(store, &format!("{prefix}.self_attn"), cfg)?)
                }
                None => SelfAttention::Grouped(Attention::load(store, &format!("{prefix}.self_attn"), cfg)?),
            },
            post_attention_layernorm: RmsNorm::load(
                store,
                &format!("{prefix}.post_attention_layernorm"),
                h,
                cfg.rms_norm_eps,
            )?,
            feed_forward,
        })
    }
}

pub struct DecoderModel {
    cfg: ModelConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: RotaryEmbedding,
    device: Device,
}

impl DecoderModel {
    pub fn load(cfg: &ModelConfig, store: &WeightStore) -> Result<Self> {
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed_tokens = store.get("model.embed_tokens.weight", &[v, h])?;
        let layers = (0..cfg.num_layers)
            .map(|i| DecoderLayer::load(store, i, cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(store, "model.norm", h, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings && !store.contains("lm_head.weight") {
            // Tied: the embedding matrix is the output projection. A quantized store hands
            // back its quantized form (the lookup needs it dense, the matmul does not).
            match store.get_matmul("model.embed_tokens.weight", v, h)? {
                QMatMul::Tensor(_) => Linear::new(QMatMul::Tensor(embed_tokens.clone()), None)?,
                quantized => Linear::new(quantized, None)?,
            }
        } else {
            Linear::load(store, "lm_head", h, v, false)?
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope: RotaryEmbedding::new(&cfg.rope, cfg.max_position_embeddings, store.device())?,
            device: store.device().clone(),
        })
    }
}

impl CausalLm for DecoderModel {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn kv_layout(&self) -> KvLayout {
        super::kv_layout(&self.cfg)
    }

    fn forward(&self, batch: &ForwardBatch, kv: &mut KvStorage) -> Result<ForwardOutput> {
        // The backend's execution policy: on the CPU the whole pass runs on one of rayon's
        // workers with the others spinning for work (see `backend::cpu::pool`).
        backend::forward_pass(&self.device, || self.forward_in_pool(batch, kv))
    }
}

impl DecoderModel {
    fn forward_in_pool(&self, batch: &ForwardBatch, kv: &mut KvStorage) -> Result<ForwardOutput> {
        let plan = BatchPlan::new(batch, kv, &self.cfg)?;
        let ctx = AttentionContext {
            positions: &plan.positions,
            slots: &plan.slots,
            seqs: &plan.seqs,
            block_size: kv.block_size(),
        };
        let ids = Tensor::new(plan.token_ids.as_slice(), &self.device)?;
        let mut x = self.embed_tokens.index_select(&ids, 0)?;
        let mut expert_load = Vec::with_capacity(self.layers.len());
        // `x` is the residual stream and `h` the normed input of the next sublayer; each
        // residual add is fused with the norm that follows it (one pass over the rows).
        let mut h = match self.layers.first() {
            Some(first) => first.input_layernorm.forward(&x)?,
            None => x.clone(),
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let a = match &layer.self_attn {
                SelfAttention::Grouped(a) => a.forward(&h, &ctx, &self.rope, kv.layer_mut(i))?,
                SelfAttention::Latent(a) => a.forward(&h, &ctx, &self.rope, kv.layer_mut(i))?,
            };
            let (x_attn, h_ffn) = layer.post_attention_layernorm.add_and_norm(&x, &a)?;
            let f = match &layer.feed_forward {
                FeedForward::Dense(mlp) => {
                    expert_load.push(Vec::new());
                    mlp.forward(&h_ffn)?
                }
                FeedForward::Sparse(moe) => {
                    let (y, counts) = moe.forward(&h_ffn)?;
                    expert_load.push(counts);
                    y
                }
            };
            match self.layers.get(i + 1) {
                Some(next) => (x, h) = next.input_layernorm.add_and_norm(&x_attn, &f)?,
                None => x = (x_attn + f)?,
            }
        }
        // Only the rows whose logits are wanted go through the final norm and lm_head.
        let rows = Tensor::new(plan.logit_rows.as_slice(), &self.device)?;
        let x = self.norm.forward(&x.index_select(&rows, 0)?)?;
        let logits = self.lm_head.forward(&x)?.to_dtype(DType::F32)?;
        Ok(ForwardOutput {
            logits,
            rows: plan.row_ranges,
            expert_load,
        })
    }
}

/// A batch flattened into per-token arrays, validated against the model and the cache.
struct BatchPlan<'a> {
    token_ids: Vec<u32>,
    positions: Vec<usize>,
    slots: Vec<usize>,
    seqs: Vec<AttnSeq<'a>>,
    /// Token indices whose logits are returned, and which of them belong to each sequence.
    logit_rows: Vec<u32>,
    row_ranges: Vec<std::ops::Range<usize>>,
}

impl<'a> BatchPlan<'a> {
    fn new(batch: &ForwardBatch<'a>, kv: &KvStorage, cfg: &ModelConfig) -> Result<Self> {
        if batch.seqs.is_empty() {
            return Err(Error::InvalidBatch("empty batch".into()));
        }
        let n = batch.num_tokens();
        let mut plan = BatchPlan {
            token_ids: Vec::with_capacity(n),
            positions: Vec::with_capacity(n),
            slots: Vec::with_capacity(n),
            seqs: Vec::with_capacity(batch.seqs.len()),
            logit_rows: Vec::new(),
            row_ranges: Vec::with_capacity(batch.seqs.len()),
        };
        for (i, s) in batch.seqs.iter().enumerate() {
            if s.tokens.is_empty() {
                return Err(Error::InvalidBatch(format!("sequence {i} has no tokens")));
            }
            let end = s.start_pos + s.tokens.len();
            if end > cfg.max_position_embeddings {
                return Err(Error::InvalidBatch(format!(
                    "sequence {i} reaches position {end}, beyond the model's context of {}",
                    cfg.max_position_embeddings
                )));
            }
            if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(Error::InvalidBatch(format!(
                    "token id {bad} is outside the vocabulary of {}",
                    cfg.vocab_size
                )));
            }
            let first_token = plan.token_ids.len();
            plan.token_ids.extend_from_slice(s.tokens);
            for p in s.start_pos..end {
                plan.positions.push(p);
                plan.slots.push(kv.slot(s.block_table, p)?);
            }
            plan.seqs.push(AttnSeq {
                first_token,
                len: s.tokens.len(),
                start_pos: s.start_pos,
                block_table: s.block_table,
            });
            let first_row = plan.logit_rows.len();
            match s.logits {
                LogitRows::None => {}
                LogitRows::Last => plan.logit_rows.push((first_token + s.tokens.len() - 1) as u32),
                LogitRows::All => plan
                    .logit_rows
                    .extend(first_token as u32..(first_token + s.tokens.len()) as u32),
                LogitRows::Tail(n) => {
                    let end = first_token + s.tokens.len();
                    plan.logit_rows
                        .extend((end - n.min(s.tokens.len())) as u32..end as u32)
                }
            }
            plan.row_ranges.push(first_row..plan.logit_rows.len());
        }
        Ok(plan)
    }
}
