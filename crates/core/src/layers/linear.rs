use candle_core::quantized::QMatMul;
use candle_core::{Module, Tensor};

use crate::error::Result;
use crate::quant::PackedQuantMatrix;
use crate::weights::WeightStore;

/// `y = x W^T + b`, where `W` is dense or quantized: every projection in every model goes
/// through this one layer whatever the checkpoint format. GGUF's block formats from
/// Q4 to Q8 (Q4_0/1, Q5_0/1, Q8_0, Q4_K, Q5_K, Q6_K) run on our repacked integer kernel
/// with 16-bit activations ([`PackedQuantMatrix`]); the rest (Q2_K, Q3_K, dense f16/bf16/f32)
/// on candle's `QMatMul`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

#[derive(Debug, Clone)]
enum LinearWeight {
    Candle(QMatMul),
    Blocks(Box<PackedQuantMatrix>),
}

impl Linear {
    pub fn new(weight: QMatMul, bias: Option<Tensor>) -> Result<Self> {
        let weight = match &weight {
            QMatMul::QTensor(q) => match PackedQuantMatrix::from_qtensor(q)? {
                Some(blocks) => LinearWeight::Blocks(Box::new(blocks)),
                None => LinearWeight::Candle(weight),
            },
            _ => LinearWeight::Candle(weight),
        };
        Ok(Self { weight, bias })
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
        Self::new(weight, bias)
    }

    /// `x`: `[tokens, in]` -> `[tokens, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Candle(w) => w.forward(x)?,
            LinearWeight::Blocks(w) => w.matmul(x)?.to_dtype(x.dtype())?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{DType, Device};

    /// Every weight type a GGUF file may hold goes through `Linear` and lands within the
    /// type's expected error of the f32 matmul (relative L2 error of the output).
    #[test]
    fn every_quantization_type_matches_f32_within_its_error() {
        use GgmlDType::*;
        let dev = Device::Cpu;
        // k-quants work on 256-wide super-blocks, so the input dimension is 256.
        let w = Tensor::randn(0f32, 1.0, (96, 256), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (5, 256), &dev).unwrap();
        let want = x.matmul(&w.t().unwrap()).unwrap();
        let norm = |t: &Tensor| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .sqrt()
        };
        // Bounds: a little above what each format's bits per weight give on Gaussian
        // weights (activations are quantized to 8 bits for the quantized dot products).
        let cases = [
            (F32, 1e-6),
            (F16, 1e-3),
            (BF16, 1e-2),
            (Q8_0, 0.015),
            (Q6K, 0.03),
            (Q5_0, 0.06),
            (Q5_1, 0.06),
            (Q5K, 0.06),
            (Q4_0, 0.12),
            (Q4_1, 0.12),
            (Q4K, 0.12),
            (Q3K, 0.22),
            (Q2K, 0.38),
        ];
        for (dtype, bound) in cases {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let linear = Linear::new(QMatMul::from_qtensor(q).unwrap(), None).unwrap();
            let got = linear.forward(&x).unwrap().to_dtype(DType::F32).unwrap();
            let rel = norm(&(&got - &want).unwrap()) / norm(&want);
            eprintln!("{dtype:?}: relative error {rel:.5}");
            assert!(rel < bound, "{dtype:?}: relative error {rel} above {bound}");
            assert!(rel > 0.0 || dtype == F32, "{dtype:?}: suspiciously exact");
        }
    }
}
