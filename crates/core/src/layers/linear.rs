use candle_core::quantized::QMatMul;
use candle_core::Tensor;

use crate::backend::{Backend, Matrix};
use crate::error::Result;
use crate::weights::WeightStore;

/// `y = x W^T + b`, where `W` is dense or quantized: every projection in every model goes
/// through this one layer whatever the checkpoint format. The weight's form (packed for
/// our integer kernel, small dense, candle's) is the backend's choice ([`Matrix`]).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Matrix,
    bias: Option<Tensor>,
    backend: Backend,
}

impl Linear {
    pub fn new(weight: QMatMul, bias: Option<Tensor>, backend: Backend) -> Result<Self> {
        Ok(Self {
            weight: Matrix::new(weight, backend)?,
            bias,
            backend,
        })
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
        Self::new(weight, bias, store.backend())
    }

    /// One layer computing all of `parts` (projections of the same input: q/k/v,
    /// gate/up) in a single matmul, their outputs side by side; `None` unless the backend
    /// can fuse their weights and their biases are all present or all absent.
    pub fn fuse(parts: &[&Linear]) -> Result<Option<Linear>> {
        let bias = if parts.iter().all(|l| l.bias.is_some()) {
            let biases: Vec<&Tensor> = parts.iter().filter_map(|l| l.bias.as_ref()).collect();
            Some(Tensor::cat(&biases, 0)?)
        } else if parts.iter().all(|l| l.bias.is_none()) {
            None
        } else {
            return Ok(None);
        };
        let Some(backend) = parts.first().map(|l| l.backend) else {
            return Ok(None);
        };
        if parts.iter().any(|l| l.backend != backend) {
            return Ok(None);
        }
        let weights: Vec<&Matrix> = parts.iter().map(|l| &l.weight).collect();
        Ok(Matrix::fuse(&weights, backend).map(|weight| Self {
            weight,
            bias,
            backend,
        }))
    }

    /// `x`: `[.., in]` -> `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.backend.matmul(&self.weight, x)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Several projections of one input, fused into one matmul when [`Linear::fuse`] can.
#[derive(Debug, Clone)]
pub enum Projections {
    /// The fused layer and each part's output width.
    Fused(Linear, Vec<usize>),
    Separate(Vec<Linear>),
}

impl Projections {
    pub fn new(parts: Vec<Linear>, widths: Vec<usize>) -> Result<Self> {
        let refs: Vec<&Linear> = parts.iter().collect();
        Ok(match Linear::fuse(&refs)? {
            Some(fused) => Projections::Fused(fused, widths),
            None => Projections::Separate(parts),
        })
    }

    /// Each part's output (`[tokens, width]`), in order.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Projections::Fused(l, widths) => l.backend.split_columns(&l.forward(x)?, widths),
            Projections::Separate(parts) => parts.iter().map(|l| l.forward(x)).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::test_util::max_diff;
    use crate::backend::Isa;

    fn cpu() -> Backend {
        Backend::Cpu(Isa::best())
    }
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{DType, Device};

    /// Fused projections give each part's output exactly as the separate layers do, and
    /// layers that cannot be fused (dense weights, ragged row groups) stay separate.
    #[test]
    fn fused_projections_match_separate_ones() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 64), &dev).unwrap();
        let layer = |rows: usize, dtype: GgmlDType, bias: bool| {
            let w = Tensor::randn(0f32, 1.0, (rows, 64), &dev).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let b = bias.then(|| Tensor::randn(0f32, 1.0, rows, &dev).unwrap());
            Linear::new(QMatMul::from_qtensor(q).unwrap(), b, cpu()).unwrap()
        };
        for bias in [false, true] {
            let parts = vec![layer(32, GgmlDType::Q4_1, bias), layer(16, GgmlDType::Q4_1, bias)];
            let want: Vec<Tensor> = parts.iter().map(|l| l.forward(&x).unwrap()).collect();
            let fused = Projections::new(parts, vec![32, 16]).unwrap();
            assert!(matches!(fused, Projections::Fused(..)));
            for (got, want) in fused.forward(&x).unwrap().iter().zip(&want) {
                let err = max_diff(got, want);
                assert!(err < 1e-5, "bias {bias}: {err}");
            }
        }
        let unfusable = [
            vec![
                layer(32, GgmlDType::Q4_1, false),
                layer(32, GgmlDType::Q8_0, false),
            ],
            vec![
                layer(20, GgmlDType::Q4_1, false),
                layer(32, GgmlDType::Q4_1, false),
            ],
            vec![layer(32, GgmlDType::F32, false), layer(32, GgmlDType::F32, false)],
        ];
        for parts in unfusable {
            let widths = vec![0; parts.len()];
            assert!(matches!(
                Projections::new(parts, widths).unwrap(),
                Projections::Separate(_)
            ));
        }
    }

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
            let linear = Linear::new(QMatMul::from_qtensor(q).unwrap(), None, cpu()).unwrap();
            let got = linear.forward(&x).unwrap().to_dtype(DType::F32).unwrap();
            let rel = norm(&(&got - &want).unwrap()) / norm(&want);
            eprintln!("{dtype:?}: relative error {rel:.5}");
            assert!(rel < bound, "{dtype:?}: relative error {rel} above {bound}");
            assert!(rel > 0.0 || dtype == F32, "{dtype:?}: suspiciously exact");
        }
    }

    /// A small dense f32 weight takes the plain dot products, for inputs of any rank
    /// (`[.., in]`), and a wrong input width is an error, not a panic.
    #[test]
    fn small_f32_weights_take_the_dot_products() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (8, 64), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 8, &dev).unwrap();
        let l = Linear::new(QMatMul::Tensor(w.clone()), Some(b.clone()), cpu()).unwrap();
        assert!(matches!(l.weight, Matrix::SmallF32 { .. }));
        let x = Tensor::randn(0f32, 1.0, (2, 3, 64), &dev).unwrap();
        let got = l.forward(&x).unwrap();
        assert_eq!(got.dims(), &[2, 3, 8]);
        let want = x
            .reshape((6, 64))
            .unwrap()
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap()
            .reshape((2, 3, 8))
            .unwrap();
        let err = max_diff(&got, &want);
        assert!(err < 1e-4, "{err}");
        assert!(l
            .forward(&Tensor::zeros((2, 63), DType::F32, &dev).unwrap())
            .is_err());
    }
}
