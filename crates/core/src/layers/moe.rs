use candle_core::Tensor;

use super::{GatedMlp, Linear};
use crate::backend::cpu::vmath::softmax_rows;
use crate::backend::{self, Backend, Routing, StackedMatrix, StackedMlp};
use crate::config::{ExpertNaming, MoeConfig, ScoringFunc, TopkMethod};
use crate::error::Result;
use crate::weights::WeightStore;

/// Scores every expert for every token and keeps the top k, with the architecture's
/// scoring (softmax or sigmoid), selection (greedy, DeepSeek-V2's group-limited, or
/// DeepSeek-V3's bias-corrected groups) and weight normalisation and scaling.
///
/// The scores come back to the host once per layer ([`backend::to_host`]): grouping
/// tokens by expert is data-dependent control flow, and it is the one round-trip the MoE
/// layer needs. (Softmax over a few dozen experts is host arithmetic here.)
#[derive(Debug, Clone)]
pub struct ExpertRouter {
    gate: Linear,
    num_experts: usize,
    top_k: usize,
    norm_topk_prob: bool,
    scoring: ScoringFunc,
    topk_method: TopkMethod,
    routed_scaling_factor: f32,
    /// DeepSeek-V3's `e_score_correction_bias`: added to the scores to choose experts,
    /// not to weight them.
    correction_bias: Option<Vec<f32>>,
}

impl ExpertRouter {
    pub fn load(store: &WeightStore, prefix: &str, hidden: usize, cfg: &MoeConfig) -> Result<Self> {
        let correction_bias = match cfg.topk_method {
            TopkMethod::NoAuxTc { .. } => Some(
                store
                    .get_f32(&format!("{prefix}.e_score_correction_bias"), &[cfg.num_experts])?
                    .to_vec1::<f32>()?,
            ),
            _ => None,
        };
        Ok(Self {
            gate: Linear::load(store, prefix, hidden, cfg.num_experts, false)?,
            num_experts: cfg.num_experts,
            top_k: cfg.top_k,
            norm_topk_prob: cfg.norm_topk_prob,
            scoring: cfg.scoring,
            topk_method: cfg.topk_method,
            routed_scaling_factor: cfg.routed_scaling_factor as f32,
            correction_bias,
        })
    }

    /// `x`: `[tokens, hidden]`.
    pub fn route(&self, x: &Tensor) -> Result<Routing> {
        let mut scores = backend::to_host(&self.gate.forward(x)?)?;
        match self.scoring {
            ScoringFunc::Softmax => softmax_rows(&mut scores, self.num_experts),
            ScoringFunc::Sigmoid => scores.iter_mut().for_each(|v| *v = 1.0 / (1.0 + (-*v).exp())),
        }
        let mut routing = Routing {
            tokens: vec![Vec::new(); self.num_experts],
            weights: vec![Vec::new(); self.num_experts],
        };
        let mut choice = vec![0f32; self.num_experts];
        let mut order: Vec<usize> = Vec::with_capacity(self.num_experts);
        for (t, p) in scores.chunks_exact(self.num_experts).enumerate() {
            for (e, c) in choice.iter_mut().enumerate() {
                *c = p[e] + self.correction_bias.as_ref().map_or(0.0, |b| b[e]);
            }
            order.clear();
            order.extend(self.eligible(&choice));
            order.sort_unstable_by(|&a, &b| choice[b].total_cmp(&choice[a]).then(a.cmp(&b)));
            let chosen = &order[..self.top_k];
            let norm = if self.norm_topk_prob {
                chosen.iter().map(|&e| p[e]).sum::<f32>() + 1e-20
            } else {
                1.0
            };
            for &e in chosen {
                routing.tokens[e].push(t as u32);
                routing.weights[e].push(p[e] / norm * self.routed_scaling_factor);
            }
        }
        Ok(routing)
    }

    /// The experts a token may choose from: all, or those in its best groups.
    fn eligible(&self, choice: &[f32]) -> Vec<usize> {
        let (n_group, topk_group, by_top2) = match self.topk_method {
            TopkMethod::Greedy => return (0..self.num_experts).collect(),
            TopkMethod::GroupLimited { n_group, topk_group } => (n_group, topk_group, false),
            TopkMethod::NoAuxTc { n_group, topk_group } => (n_group, topk_group, true),
        };
        let size = self.num_experts / n_group;
        let group_score = |g: usize| {
            let mut s: Vec<f32> = choice[g * size..(g + 1) * size].to_vec();
            s.sort_unstable_by(|a, b| b.total_cmp(a));
            if by_top2 {
                s.iter().take(2).sum()
            } else {
                s[0]
            }
        };
        let scores: Vec<f32> = (0..n_group).map(group_score).collect();
        let mut groups: Vec<usize> = (0..n_group).collect();
        groups.sort_unstable_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        groups[..topk_group]
            .iter()
            .flat_map(|&g| g * size..(g + 1) * size)
            .collect()
    }
}

/// An always-on expert next to the routed ones, optionally scaled by
/// `sigmoid(gate(x))` per token (Qwen2-MoE).
#[derive(Debug, Clone)]
struct SharedExpert {
    mlp: GatedMlp,
    gate: Option<Linear>,
}

/// Mixture-of-experts feed-forward block: route, then every routed expert over all of
/// its tokens in one grouped call on the stacked weights, then the shared expert.
#[derive(Debug, Clone)]
pub struct MoeBlock {
    router: ExpertRouter,
    experts: StackedMlp,
    shared: Option<SharedExpert>,
    backend: Backend,
}

impl MoeBlock {
    /// `prefix` is the block (`model.layers.N.mlp` or `model.layers.N.block_sparse_moe`).
    pub fn load(store: &WeightStore, prefix: &str, hidden: usize, cfg: &MoeConfig) -> Result<Self> {
        let router = ExpertRouter::load(store, &format!("{prefix}.gate"), hidden, cfg)?;
        let [gate, up, down] = match cfg.naming {
            ExpertNaming::Mixtral => ["w1", "w3", "w2"],
            ExpertNaming::Qwen | ExpertNaming::DeepSeek => ["gate_proj", "up_proj", "down_proj"],
        };
        let shared_name = match cfg.naming {
            ExpertNaming::DeepSeek => "shared_experts",
            _ => "shared_expert",
        };
        let width = cfg.expert_intermediate_size;
        // Each projection of every expert as one stacked `[experts, out, in]` matrix.
        let stacked = |proj: &str, out: usize, inp: usize| -> Result<StackedMatrix> {
            let names: Vec<String> = (0..cfg.num_experts)
                .map(|e| format!("{prefix}.experts.{e}.{proj}.weight"))
                .collect();
            StackedMatrix::new(store.get_stacked_matmul(&names, out, inp)?, store.backend())
        };
        let experts = StackedMlp::new(
            stacked(gate, width, hidden)?,
            stacked(up, width, hidden)?,
            stacked(down, hidden, width)?,
            store.backend(),
        )?;
        let shared = match cfg.shared_expert_intermediate_size {
            Some(width) => Some(SharedExpert {
                mlp: GatedMlp::load(store, &format!("{prefix}.{shared_name}"), hidden, width, false)?,
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
            backend: store.backend(),
        })
    }

    /// `x`: `[tokens, hidden]`. Returns the output and the number of tokens each expert
    /// received.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Vec<u32>)> {
        let routing = self.router.route(x)?;
        let routed = self.backend.grouped_experts(x, &routing, &self.experts)?;
        Ok((self.add_shared(x, routed)?, routing.counts()))
    }

    /// `routed` plus the shared expert's output, if the model has one.
    fn add_shared(&self, x: &Tensor, routed: Tensor) -> Result<Tensor> {
        let Some(shared) = &self.shared else {
            return Ok(routed);
        };
        let mut y = shared.mlp.forward(x)?;
        if let Some(gate) = &shared.gate {
            y = y.broadcast_mul(&candle_nn::ops::sigmoid(&gate.forward(x)?)?)?;
        }
        Ok((routed + y)?)
    }
}
