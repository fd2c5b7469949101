use candle_core::{DType, Tensor, D};

use super::{GatedMlp, Linear};
use crate::config::{ExpertNaming, MoeConfig};
use crate::error::Result;
use crate::weights::WeightStore;

/// Which experts each token goes to, grouped by expert: the tokens routed to expert `e`
/// are `tokens[e]`, with routing weights `weights[e]` (same order).
#[derive(Debug, Clone, Default)]
pub struct Routing {
    pub tokens: Vec<Vec<u32>>,
    pub weights: Vec<Vec<f32>>,
}

impl Routing {
    /// Tokens routed to each expert (per-expert load, exported as metrics).
    pub fn counts(&self) -> Vec<u32> {
        self.tokens.iter().map(|t| t.len() as u32).collect()
    }
}

/// Scores every expert for every token and keeps the top k.
///
/// The scores come back to the host once per layer: grouping tokens by expert is
/// data-dependent control flow, and it is the one round-trip the MoE layer needs.
/// (DeepSeek's sigmoid scoring and group-limited selection extend this type.)
#[derive(Debug, Clone)]
pub struct ExpertRouter {
    gate: Linear,
    num_experts: usize,
    top_k: usize,
    norm_topk_prob: bool,
}

impl ExpertRouter {
    pub fn load(store: &WeightStore, prefix: &str, hidden: usize, cfg: &MoeConfig) -> Result<Self> {
        Ok(Self {
            gate: Linear::load(store, prefix, hidden, cfg.num_experts, false)?,
            num_experts: cfg.num_experts,
            top_k: cfg.top_k,
            norm_topk_prob: cfg.norm_topk_prob,
        })
    }

    /// `x`: `[tokens, hidden]`. Softmax over all experts (in f32), top-k, optionally
    /// renormalised to sum to one.
    pub fn route(&self, x: &Tensor) -> Result<Routing> {
        let logits = self.gate.forward(x)?.to_dtype(DType::F32)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?.to_vec2::<f32>()?;
        let mut routing = Routing {
            tokens: vec![Vec::new(); self.num_experts],
            weights: vec![Vec::new(); self.num_experts],
        };
        let mut order: Vec<usize> = (0..self.num_experts).collect();
        for (t, p) in probs.iter().enumerate() {
            order.sort_unstable_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            let chosen = &order[..self.top_k];
            let norm = if self.norm_topk_prob {
                chosen.iter().map(|&e| p[e]).sum::<f32>()
            } else {
                1.0
            };
            for &e in chosen {
                routing.tokens[e].push(t as u32);
                routing.weights[e].push(p[e] / norm);
            }
        }
        Ok(routing)
    }
}

/// An always-on expert next to the routed ones, optionally scaled by
/// `sigmoid(gate(x))` per token (Qwen2-MoE).
#[derive(Debug, Clone)]
struct SharedExpert {
    mlp: GatedMlp,
    gate: Option<Linear>,
}

/// Mixture-of-experts feed-forward block: route, run each active expert once over all of
/// its tokens (gather, one batched MLP, weight), scatter-add the results back.
#[derive(Debug, Clone)]
pub struct MoeBlock {
    router: ExpertRouter,
    experts: Vec<GatedMlp>,
    shared: Option<SharedExpert>,
}

impl MoeBlock {
    /// `prefix` is the block (`model.layers.N.mlp` or `model.layers.N.block_sparse_moe`).
    pub fn load(store: &WeightStore, prefix: &str, hidden: usize, cfg: &MoeConfig) -> Result<Self> {
        let router = ExpertRouter::load(store, &format!("{prefix}.gate"), hidden, cfg)?;
        let names = match cfg.naming {
            ExpertNaming::Mixtral => ["w1", "w3", "w2"],
            ExpertNaming::Qwen => ["gate_proj", "up_proj", "down_proj"],
        };
        let experts = (0..cfg.num_experts)
            .map(|e| {
                GatedMlp::load_named(
                    store,
                    &format!("{prefix}.experts.{e}"),
                    names,
                    hidden,
                    cfg.expert_intermediate_size,
                    false,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let shared = match cfg.shared_expert_intermediate_size {
            Some(width) => Some(SharedExpert {
                mlp: GatedMlp::load(store, &format!("{prefix}.shared_expert"), hidden, width, false)?,
                gate: if cfg.shared_expert_gated {
                    Some(Linear::load(
                        store,
                        &format!("{prefix}.shared_expert_gate"),
                        hidden,
                        1,
                        false,
                    )?)
                } else {
                    None
                },
            }),
            None => None,
        };
        Ok(Self {
            router,
            experts,
            shared,
        })
    }

    /// `x`: `[tokens, hidden]`. Returns the output and the number of tokens each expert
    /// received.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Vec<u32>)> {
        let routing = self.router.route(x)?;
        let device = x.device();
        let mut outputs = Vec::new();
        let mut rows: Vec<u32> = Vec::new();
        for (e, expert) in self.experts.iter().enumerate() {
            let tokens = &routing.tokens[e];
            if tokens.is_empty() {
                continue;
            }
            let idx = Tensor::new(tokens.as_slice(), device)?;
            let w = Tensor::new(routing.weights[e].as_slice(), device)?
                .to_dtype(x.dtype())?
                .unsqueeze(D::Minus1)?;
            let y = expert.forward(&x.index_select(&idx, 0)?)?;
            outputs.push(y.broadcast_mul(&w)?);
            rows.extend_from_slice(tokens);
        }
        // One scatter-add for all experts (per-expert index_add would copy the output
        // once per active expert).
        let routed = Tensor::cat(&outputs, 0)?;
        let rows = Tensor::new(rows.as_slice(), device)?;
        let mut out = x.zeros_like()?.index_add(&rows, &routed, 0)?;
        if let Some(shared) = &self.shared {
            let mut y = shared.mlp.forward(x)?;
            if let Some(gate) = &shared.gate {
                y = y.broadcast_mul(&candle_nn::ops::sigmoid(&gate.forward(x)?)?)?;
            }
            out = (out + y)?;
        }
        Ok((out, routing.counts()))
    }
}
