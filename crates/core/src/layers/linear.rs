use candle_core::quantized::QMatMul;
use candle_core::{Module, Tensor};

use crate::error::Result;
use crate::weights::WeightStore;

/// `y = x W^T + b`, where `W` is either a dense tensor or a quantized one: candle's
/// [`QMatMul`] is exactly that sum type, so every projection in every model goes through
/// this one layer whatever the checkpoint format.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: QMatMul,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: QMatMul, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// Loads `{prefix}.weight` (`[out, in]`) and, when `bias`, `{prefix}.bias`.
    pub fn load(
        store: &WeightStore,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = store.get_matmul(&format!("{prefix}.weight"), out_features, in_features)?;
        let bias = if bias {
            Some(store.get(&format!("{prefix}.bias"), &[out_features])?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// `x`: `[tokens, in]` -> `[tokens, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.weight.forward(x)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}
