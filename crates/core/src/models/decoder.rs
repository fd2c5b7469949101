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
//!
//! DeepSeek-V3 adds a multi-token prediction (MTP) module after the main layers
//! (`model.layers.{num_layers}`), which guesses the token after next for speculative
//! decoding. At position i it sees the main model's final hidden state `h_i` and the
//! embedding of the token that followed, `t_{i+1}`:
//!
//! ```text
//! x = eh_proj([enorm(embed(t_{i+1})); hnorm(h_i)])
//! x = decoder_layer(x)                        # its own attention KV, in the same pool
//! draft_logits = shared_head.head(shared_head.norm(x))   # for t_{i+2}
//! ```

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Tensor};

use super::CausalLm;
use crate::backend::{AttnSeq, Backend};
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
    fn load(store: &WeightStore, i: usize, sparse: bool, cfg: &ModelConfig) -> Result<Self> {
        let prefix = format!("model.layers.{i}");
        let h = cfg.hidden_size;
        let feed_forward = match (&cfg.moe, sparse) {
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

    /// Attention and feed-forward of the layer on `h`, its normed input: the residual
    /// stream after attention and the feed-forward output (the caller adds them, fused
    /// with the next norm), and the tokens per expert.
    fn forward(
        &self,
        x: &Tensor,
        h: &Tensor,
        ctx: &AttentionContext,
        rope: &RotaryEmbedding,
        kv: &mut crate::kv::KvLayer,
    ) -> Result<(Tensor, Tensor, Vec<u32>)> {
        let a = match &self.self_attn {
            SelfAttention::Grouped(a) => a.forward(h, ctx, rope, kv)?,
            SelfAttention::Latent(a) => a.forward(h, ctx, rope, kv)?,
        };
        let (x_attn, h_ffn) = self.post_attention_layernorm.add_and_norm(x, &a)?;
        Ok(match &self.feed_forward {
            FeedForward::Dense(mlp) => (x_attn, mlp.forward(&h_ffn)?, Vec::new()),
            FeedForward::Sparse(moe) => {
                let (y, counts) = moe.forward(&h_ffn)?;
                (x_attn, y, counts)
            }
        })
    }
}

/// DeepSeek-V3's multi-token prediction module, as its release lays it out under
/// `model.layers.{N}` (N = the number of main layers): `enorm`, `hnorm`, `eh_proj`, a
/// full decoder layer, and `shared_head.norm`/`shared_head.head`. Its `embed_tokens` is
/// a copy of the main model's, which is used instead. GGUF files may leave out the shared
/// head (llama.cpp treats it as optional): then it is the main model's norm and head,
/// which the release's copies equal in meaning ("shared").
struct MtpLayer {
    enorm: RmsNorm,
    hnorm: RmsNorm,
    eh_proj: Linear,
    layer: DecoderLayer,
    head_norm: RmsNorm,
    head: Linear,
}

impl MtpLayer {
    fn load(
        store: &WeightStore,
        i: usize,
        sparse: bool,
        cfg: &ModelConfig,
        (main_norm, main_head): (&RmsNorm, &Linear),
    ) -> Result<Self> {
        let prefix = format!("model.layers.{i}");
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        let head_norm = format!("{prefix}.shared_head.norm");
        let head = format!("{prefix}.shared_head.head");
        Ok(Self {
            enorm: RmsNorm::load(store, &format!("{prefix}.enorm"), h, eps)?,
            hnorm: RmsNorm::load(store, &format!("{prefix}.hnorm"), h, eps)?,
            eh_proj: Linear::load(store, &format!("{prefix}.eh_proj"), 2 * h, h, false)?,
            layer: DecoderLayer::load(store, i, sparse, cfg)?,
            head_norm: if store.contains(&format!("{head_norm}.weight")) {
                RmsNorm::load(store, &head_norm, h, eps)?
            } else {
                main_norm.clone()
            },
            head: if store.contains(&format!("{head}.weight")) {
                Linear::load(store, &head, h, cfg.vocab_size, false)?
            } else {
                main_head.clone()
            },
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
    backend: Backend,
    /// The multi-token prediction module, when the checkpoint has its weights.
    mtp: Option<MtpLayer>,
}

impl DecoderModel {
    pub fn load(cfg: &ModelConfig, store: &WeightStore) -> Result<Self> {
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed_tokens = store.get("model.embed_tokens.weight", &[v, h])?;
        let layers = (0..cfg.num_layers)
            .map(|i| DecoderLayer::load(store, i, cfg.sparse_layers[i], cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(store, "model.norm", h, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings && !store.contains("lm_head.weight") {
            // Tied: the embedding matrix is the output projection. A quantized store hands
            // back its quantized form (the lookup needs it dense, the matmul does not).
            match store.get_matmul("model.embed_tokens.weight", v, h)? {
                QMatMul::Tensor(_) => {
                    Linear::new(QMatMul::Tensor(embed_tokens.clone()), None, store.backend())?
                }
                quantized => Linear::new(quantized, None, store.backend())?,
            }
        } else {
            Linear::load(store, "lm_head", h, v, false)?
        };
        // DeepSeek declares one MTP layer; checkpoints and conversions that drop its
        // weights still declare it, so it loads only where its weights are.
        let n = cfg.num_layers;
        let mtp = match cfg.mtp_sparse_layers.first() {
            Some(&sparse) if store.contains(&format!("model.layers.{n}.eh_proj.weight")) => {
                Some(MtpLayer::load(store, n, sparse, cfg, (&norm, &lm_head))?)
            }
            _ => None,
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope: RotaryEmbedding::new(
                &cfg.rope,
                cfg.max_position_embeddings,
                store.device(),
                store.backend(),
            )?,
            device: store.device().clone(),
            backend: store.backend(),
            mtp,
        })
    }
}

impl CausalLm for DecoderModel {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn backend(&self) -> Backend {
        self.backend
    }

    fn kv_layout(&self) -> KvLayout {
        let mut layout = super::kv_layout(&self.cfg);
        // The MTP layer keeps its attention KV as one more layer of the same pool.
        layout.num_layers += self.mtp.is_some() as usize;
        layout
    }

    fn forward(&self, batch: &ForwardBatch, kv: &mut KvStorage) -> Result<ForwardOutput> {
        // The backend's execution policy: on the CPU the whole pass runs on one of rayon's
        // workers with the others spinning for work (see `backend::cpu::pool`).
        self.backend.forward_pass(|| self.forward_in_pool(batch, kv))
    }

    fn has_mtp(&self) -> bool {
        self.mtp.is_some()
    }

    fn forward_mtp(
        &self,
        batch: &ForwardBatch,
        hidden: &Tensor,
        kv: &mut KvStorage,
    ) -> Result<ForwardOutput> {
        let Some(mtp) = &self.mtp else {
            return Err(Error::InvalidBatch(
                "the model has no multi-token prediction module".into(),
            ));
        };
        self.backend.forward_pass(|| {
            let plan = BatchPlan::new(batch, kv, &self.cfg)?;
            if hidden.dims() != [plan.token_ids.len(), self.cfg.hidden_size] {
                return Err(Error::InvalidBatch(format!(
                    "{} tokens but hidden states of shape {:?}",
                    plan.token_ids.len(),
                    hidden.dims()
                )));
            }
            let ctx = AttentionContext {
                positions: &plan.positions,
                slots: &plan.slots,
                seqs: &plan.seqs,
                block_size: kv.block_size(),
            };
            let ids = Tensor::new(plan.token_ids.as_slice(), &self.device)?;
            let e = mtp.enorm.forward(&self.embed_tokens.index_select(&ids, 0)?)?;
            let h = mtp.hnorm.forward(hidden)?;
            let x = mtp.eh_proj.forward(&Tensor::cat(&[&e, &h], 1)?)?;
            let h = mtp.layer.input_layernorm.forward(&x)?;
            let (x_attn, f, _) =
                mtp.layer
                    .forward(&x, &h, &ctx, &self.rope, kv.layer_mut(self.cfg.num_layers))?;
            let rows = Tensor::new(plan.logit_rows.as_slice(), &self.device)?;
            let x = (x_attn.index_select(&rows, 0)? + f.index_select(&rows, 0)?)?;
            let logits = mtp
                .head
                .forward(&mtp.head_norm.forward(&x)?)?
                .to_dtype(DType::F32)?;
            Ok(ForwardOutput {
                logits,
                rows: plan.row_ranges,
                expert_load: Vec::new(),
                hidden: None,
            })
        })
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
            let (x_attn, f, counts) = layer.forward(&x, &h, &ctx, &self.rope, kv.layer_mut(i))?;
            expert_load.push(counts);
            match self.layers.get(i + 1) {
                Some(next) => (x, h) = next.input_layernorm.add_and_norm(&x_attn, &f)?,
                None => x = (x_attn + f)?,
            }
        }
        // Only the rows whose logits are wanted go through the final norm and lm_head
        // (all rows through the norm when the hidden states are wanted).
        let rows = Tensor::new(plan.logit_rows.as_slice(), &self.device)?;
        let (x, hidden) = if batch.hidden {
            let hidden = self.norm.forward(&x)?;
            (hidden.index_select(&rows, 0)?, Some(hidden))
        } else {
            (self.norm.forward(&x.index_select(&rows, 0)?)?, None)
        };
        let logits = self.lm_head.forward(&x)?.to_dtype(DType::F32)?;
        Ok(ForwardOutput {
            logits,
            rows: plan.row_ranges,
            expert_load,
            hidden,
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
