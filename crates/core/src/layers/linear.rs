use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Tensor};

use crate::error::Result;
use crate::host::with_f32;
use crate::quant::PackedQuantMatrix;
use crate::weights::WeightStore;

/// `y = x W^T + b`, where `W` is dense or quantized: every projection in every model goes
/// through this one layer whatever the checkpoint format. GGUF's block formats from
/// Q4 to Q8 (Q4_0/1, Q5_0/1, Q8_0, Q4_K, Q5_K, Q6_K) run on our repacked integer kernel
/// with 16-bit activations ([`PackedQuantMatrix`]); dense f32 weights of a few rows (MoE
/// routers' gates) on plain dot products; the rest (Q2_K, Q3_K, dense f16/bf16/f32) on
/// candle's `QMatMul`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

#[derive(Debug, Clone)]
enum LinearWeight {
    Candle(QMatMul),
    Blocks(Box<PackedQuantMatrix>),
    /// A dense f32 weight of at most [`SMALL_ROWS`] rows (`[rows, cols]` row-major): an
    /// MoE router's gate, a shared expert's gate. Multiplied by [`small_matmul_f32`], not
    /// by candle's matmul: that is a thread-pool GEMM, which for a decode step's few
    /// tokens took ~50 us per layer on a 32x1024 router gate at batch 1 and ~110 us at
    /// batch 16, 15% and 6% of the medium MoE's decode steps.
    SmallF32 {
        w: Vec<f32>,
        cols: usize,
    },
}

/// Dense f32 weights up to this many rows take [`LinearWeight::SmallF32`].
const SMALL_ROWS: usize = 256;

impl Linear {
    pub fn new(weight: QMatMul, bias: Option<Tensor>) -> Result<Self> {
        let weight = match &weight {
            QMatMul::QTensor(q) => match PackedQuantMatrix::from_qtensor(q)? {
                Some(blocks) => LinearWeight::Blocks(Box::new(blocks)),
                None => LinearWeight::Candle(weight),
            },
            QMatMul::Tensor(t)
                if t.dtype() == DType::F32
                    && t.device().is_cpu()
                    && t.rank() == 2
                    && t.dim(0)? <= SMALL_ROWS =>
            {
                LinearWeight::SmallF32 {
                    w: t.flatten_all()?.to_vec1::<f32>()?,
                    cols: t.dim(1)?,
                }
            }
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

    /// One layer computing all of `parts` (projections of the same input: q/k/v,
    /// gate/up) in a single matmul, their outputs side by side; `None` unless all are
    /// packed quantized weights of one format with biases all present or all absent.
    /// One matmul instead of several quantizes the input once and splits the work over
    /// the threads once, which at batch 1 is a good part of a projection's cost.
    pub fn fuse(parts: &[&Linear]) -> Result<Option<Linear>> {
        let packed: Option<Vec<&PackedQuantMatrix>> = parts
            .iter()
            .map(|l| match &l.weight {
                LinearWeight::Blocks(m) => Some(m.as_ref()),
                LinearWeight::Candle(_) | LinearWeight::SmallF32 { .. } => None,
            })
            .collect();
        let Some(fused) = packed.and_then(|p| PackedQuantMatrix::concat(&p)) else {
            return Ok(None);
        };
        let bias = if parts.iter().all(|l| l.bias.is_some()) {
            let biases: Vec<&Tensor> = parts.iter().filter_map(|l| l.bias.as_ref()).collect();
            Some(Tensor::cat(&biases, 0)?)
        } else if parts.iter().all(|l| l.bias.is_none()) {
            None
        } else {
            return Ok(None);
        };
        Ok(Some(Self {
            weight: LinearWeight::Blocks(Box::new(fused)),
            bias,
        }))
    }

    /// `x`: `[tokens, in]` -> `[tokens, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Candle(w) => w.forward(x)?,
            LinearWeight::Blocks(w) => w.matmul(x)?.to_dtype(x.dtype())?,
            LinearWeight::SmallF32 { w, cols } => {
                // `[.., in]` -> `[.., out]`, like candle's matmul.
                let k = x.dim(candle_core::D::Minus1)?;
                if k != *cols {
                    return Err(crate::error::Error::InvalidBatch(format!(
                        "matmul input has {k} features, the weight {cols}"
                    )));
                }
                let mut shape = x.dims().to_vec();
                *shape.last_mut().expect("a last dimension") = w.len() / cols;
                let y = with_f32(x, |xs| small_matmul_f32(xs, w, *cols))?;
                Tensor::from_vec(y, shape, x.device())?.to_dtype(x.dtype())?
            }
        };
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

    /// Each part's output, in order.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Projections::Fused(l, widths) => {
                let y = l.forward(x)?;
                let mut at = 0;
                widths
                    .iter()
                    .map(|&w| {
                        let part = y.narrow(1, at, w)?.contiguous()?;
                        at += w;
                        Ok(part)
                    })
                    .collect()
            }
            Projections::Separate(parts) => parts.iter().map(|l| l.forward(x)).collect(),
        }
    }

    /// Each part's output as f32 values (`[tokens, width]` row-major), for CPU kernels
    /// that take plain buffers: the fused output is split row by row straight into the
    /// parts, with no intermediate tensors.
    pub fn forward_f32(&self, x: &Tensor) -> Result<Vec<Vec<f32>>> {
        match self {
            Projections::Fused(l, widths) => {
                let y = l.forward(x)?;
                let t = y.dim(0)?;
                with_f32(&y, |v| {
                    let mut parts: Vec<Vec<f32>> =
                        widths.iter().map(|&w| Vec::with_capacity(t * w)).collect();
                    for row in v.chunks_exact(widths.iter().sum()) {
                        let mut at = 0;
                        for (part, &w) in parts.iter_mut().zip(widths) {
                            part.extend_from_slice(&row[at..at + w]);
                            at += w;
                        }
                    }
                    parts
                })
            }
            Projections::Separate(parts) => parts
                .iter()
                .map(|l| with_f32(&l.forward(x)?, |v| v.to_vec()))
                .collect(),
        }
    }
}

/// `x W^T` for a [`LinearWeight::SmallF32`] weight: `x` is `[tokens, hidden]`, `w`
/// `[experts, hidden]` (named for the MoE router's gate, the main user), both f32; the
/// result is `[tokens, experts]`. Dot products vectorised for the CPU at hand; tokens split
/// over the pool only when there are many (a prompt).
fn small_matmul_f32(x: &[f32], w: &[f32], hidden: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let experts = w.len() / hidden;
    let mut out = vec![0f32; x.len() / hidden * experts];
    let rows = |(x, out): (&[f32], &mut [f32])| {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { small_matmul_rows_avx512(x, w, hidden, out) };
        }
        small_matmul_rows(x, w, hidden, out)
    };
    // About 2 M multiply-adds per task (64 tokens of a 32x1024 gate).
    let per_task = (1usize << 21).div_ceil(w.len()).max(1);
    if x.len() / hidden > per_task {
        x.par_chunks(per_task * hidden)
            .zip(out.par_chunks_mut(per_task * experts))
            .for_each(rows);
    } else {
        rows((x, &mut out));
    }
    out
}

/// [`small_matmul_rows`] with AVX-512: four experts at a time, so that each 16 values of the
/// token's input are loaded once for four rows of the gate and the four running sums
/// are independent chains of fused multiply-adds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn small_matmul_rows_avx512(x: &[f32], w: &[f32], hidden: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let experts = w.len() / hidden;
    let whole = hidden / 16 * 16;
    assert!(x.len() / hidden * experts <= out.len() && w.len() == experts * hidden);
    for (xr, or) in x.chunks_exact(hidden).zip(out.chunks_exact_mut(experts)) {
        let four = experts / 4 * 4;
        for e in (0..four).step_by(4) {
            let mut acc = [_mm512_setzero_ps(); 4];
            for c in (0..whole).step_by(16) {
                // SAFETY: `c + 16 <= whole <= hidden`, inside the token's row and inside
                // rows `e..e + 4` of the gate (`e + 4 <= experts`).
                unsafe {
                    let a = _mm512_loadu_ps(xr.as_ptr().add(c));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let b = _mm512_loadu_ps(w.as_ptr().add((e + r) * hidden + c));
                        *acc = _mm512_fmadd_ps(a, b, *acc);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let wr = &w[(e + r) * hidden..(e + r + 1) * hidden];
                let tail: f32 = xr[whole..].iter().zip(&wr[whole..]).map(|(a, b)| a * b).sum();
                or[e + r] = _mm512_reduce_add_ps(*acc) + tail;
            }
        }
        small_matmul_rows(xr, &w[four * hidden..], hidden, &mut or[four..]);
    }
}

/// Plain dot products, 16 lanes so that they vectorise.
#[inline(always)]
fn small_matmul_rows(x: &[f32], w: &[f32], hidden: usize, out: &mut [f32]) {
    let experts = w.len() / hidden;
    for (xr, or) in x.chunks_exact(hidden).zip(out.chunks_exact_mut(experts.max(1))) {
        for (wr, o) in w.chunks_exact(hidden).zip(or.iter_mut()) {
            let mut lanes = [0f32; 16];
            let (xc, wc) = (xr.chunks_exact(16), wr.chunks_exact(16));
            let tail: f32 = xc
                .remainder()
                .iter()
                .zip(wc.remainder())
                .map(|(a, b)| a * b)
                .sum();
            for (a, b) in xc.zip(wc) {
                for i in 0..16 {
                    lanes[i] += a[i] * b[i];
                }
            }
            *o = lanes.iter().sum::<f32>() + tail;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{DType, Device};

    /// The largest absolute difference between two tensors of one shape.
    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

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
            Linear::new(QMatMul::from_qtensor(q).unwrap(), b).unwrap()
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
            let linear = Linear::new(QMatMul::from_qtensor(q).unwrap(), None).unwrap();
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
        let l = Linear::new(QMatMul::Tensor(w.clone()), Some(b.clone())).unwrap();
        assert!(matches!(l.weight, LinearWeight::SmallF32 { .. }));
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

    /// The small f32 matmul is `x W^T` within f32 rounding, for gate sizes with and
    /// without a partial 16-lane chunk and expert counts with and without a partial
    /// group of four, through the serial and the split-over-the-pool forms.
    #[test]
    fn small_f32_matmul_matches_a_plain_one() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(7);
        for (tokens, experts, hidden) in [(1, 32, 1024), (3, 7, 40), (5, 60, 33), (300, 8, 2048)] {
            let x: Vec<f32> = (0..tokens * hidden)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let w: Vec<f32> = (0..experts * hidden)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            // The dispatched form (AVX-512 where the CPU has it) and the portable one.
            let mut portable = vec![0f32; tokens * experts];
            small_matmul_rows(&x, &w, hidden, &mut portable);
            for got in [small_matmul_f32(&x, &w, hidden), portable] {
                assert_eq!(got.len(), tokens * experts);
                for t in 0..tokens {
                    for e in 0..experts {
                        let want: f64 = (0..hidden)
                            .map(|k| x[t * hidden + k] as f64 * w[e * hidden + k] as f64)
                            .sum();
                        let g = got[t * experts + e] as f64;
                        assert!(
                            (g - want).abs() < 1e-4 * (hidden as f64).sqrt(),
                            "{tokens}x{experts}x{hidden} [{t},{e}]: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
