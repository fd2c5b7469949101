use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::weights::WeightStore;

/// Root-mean-square layer norm over the last dimension, computed in f32 whatever the
/// compute dtype (as the reference implementations do).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn load(store: &WeightStore, name: &str, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: store.get_f32(&format!("{name}.weight"), &[size])?,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let y = candle_nn::ops::rms_norm(&x.to_dtype(DType::F32)?.contiguous()?, &self.weight, self.eps)?;
        Ok(y.to_dtype(dtype)?)
    }
}
