use candle_core::Tensor;

use super::Linear;
use crate::error::Result;
use crate::weights::WeightStore;

/// The SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`. Dense layers, routed
/// experts and shared experts are all this.
#[derive(Debug, Clone)]
pub struct GatedMlp {
    gate: Linear,
    up: Linear,
    down: Linear,
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
        Ok(Self {
            gate: Linear::load(store, &format!("{prefix}.{gate}"), hidden, intermediate, bias)?,
            up: Linear::load(store, &format!("{prefix}.{up}"), hidden, intermediate, bias)?,
            down: Linear::load(store, &format!("{prefix}.{down}"), intermediate, hidden, bias)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gated = (self.gate.forward(x)?.silu()? * self.up.forward(x)?)?;
        self.down.forward(&gated)
    }
}
