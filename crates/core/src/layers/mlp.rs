use candle_core::Tensor;

use super::{Linear, Projections};
use crate::backend::Backend;
use crate::error::Result;
use crate::weights::WeightStore;

/// The SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`. Dense layers, routed
/// experts and shared experts are all this.
#[derive(Debug, Clone)]
pub struct GatedMlp {
    /// gate and up, fused into one matmul where the weights allow.
    gate_up: Projections,
    down: Linear,
    backend: Backend,
}

impl GatedMlp {
    /// Hugging Face names: `{prefix}.gate_proj`, `up_proj`, `down_proj`.
    pub fn load(
        store: &WeightStore,
        prefix: &str,
        hidden: usize,
        intermediate: usize,
        bias: bool,
    ) -> Result<Self> {
        Self::load_named(
            store,
            prefix,
            ["gate_proj", "up_proj", "down_proj"],
            hidden,
            intermediate,
            bias,
        )
    }

    /// Explicit projection names (Mixtral's experts call them `w1`, `w3`, `w2`).
    pub fn load_named(
        store: &WeightStore,
        prefix: &str,
        [gate, up, down]: [&str; 3],
        hidden: usize,
        intermediate: usize,
        bias: bool,
    ) -> Result<Self> {
        let gate = Linear::load(store, &format!("{prefix}.{gate}"), hidden, intermediate, bias)?;
        let up = Linear::load(store, &format!("{prefix}.{up}"), hidden, intermediate, bias)?;
        Ok(Self {
            gate_up: Projections::new(vec![gate, up], vec![intermediate; 2])?,
            down: Linear::load(store, &format!("{prefix}.{down}"), intermediate, hidden, bias)?,
            backend: store.backend(),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = match &self.gate_up {
            Projections::Fused(gate_up, widths) => self.backend.swiglu(&gate_up.forward(x)?, widths[0])?,
            Projections::Separate(parts) => self
                .backend
                .silu_mul(&parts[0].forward(x)?, &parts[1].forward(x)?)?,
        };
        self.down.forward(&h)
    }
}
