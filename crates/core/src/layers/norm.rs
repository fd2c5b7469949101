use candle_core::Tensor;

use crate::backend::Backend;
use crate::error::Result;
use crate::weights::WeightStore;

/// Root-mean-square layer norm over the last dimension, computed in f32 whatever the
/// compute dtype (as the reference implementations do).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// f32.
    weight: Tensor,
    eps: f32,
    backend: Backend,
}

impl RmsNorm {
    pub fn load(store: &WeightStore, name: &str, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: store.get_f32(&format!("{name}.weight"), &[size])?,
            eps: eps as f32,
            backend: store.backend(),
        })
    }

    /// Normed rows of `x`'s last dimension (the weight's size).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.backend.rms_norm(x, &self.weight, self.eps)
    }

    /// `(x + residual, norm(x + residual))`: the residual stream after a sublayer and the
    /// next sublayer's input, in one pass over the rows.
    pub fn add_and_norm(&self, x: &Tensor, residual: &Tensor) -> Result<(Tensor, Tensor)> {
        self.backend.add_rms_norm(x, residual, &self.weight, self.eps)
    }
}
