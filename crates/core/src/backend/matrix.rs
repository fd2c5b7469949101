//! Weight matrices in the forms the kernels multiply them in.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Tensor};

use super::cpu::quant::PackedQuantMatrix;
use super::Backend;
use crate::error::{Error, Result};

/// The weights of one linear layer, `[out, in]`, chosen once at load for the kernel that
/// multiplies them fastest: GGUF's block formats from Q4 to Q8 (Q4_0/1, Q5_0/1, Q8_0,
/// Q4_K, Q5_K, Q6_K) repacked for the integer kernel with 16-bit activations
/// ([`PackedQuantMatrix`]); dense f32 weights of a few rows (MoE routers' gates) for plain
/// dot products; everything else (Q2_K, Q3_K, dense f16/bf16/f32) for candle's `QMatMul`.
/// For the GPU backend every weight is candle's (cuBLAS for dense weights, candle's CUDA
/// quantized matmul for GGUF's).
#[derive(Debug, Clone)]
pub enum Matrix {
    Packed(Box<PackedQuantMatrix>),
    /// A dense f32 weight of at most [`SMALL_ROWS`] rows (`[rows, cols]` row-major):
    /// multiplied by the CPU backend's small GEMM, not by candle's thread-pool GEMM, whose
    /// setup dominates at a decode step's few tokens (a router's gate in every MoE layer).
    SmallF32 {
        w: Vec<f32>,
        cols: usize,
    },
    Candle(QMatMul),
}

/// Dense f32 weights up to this many rows become [`Matrix::SmallF32`].
const SMALL_ROWS: usize = 256;

impl Matrix {
    /// The form `backend`'s kernels multiply `weight` in.
    pub fn new(weight: QMatMul, backend: Backend) -> Result<Self> {
        let Backend::Cpu(isa) = backend else {
            return Ok(Matrix::Candle(weight));
        };
        Ok(match &weight {
            QMatMul::QTensor(q) => match PackedQuantMatrix::from_qtensor(q, isa)? {
                Some(packed) => Matrix::Packed(Box::new(packed)),
                None => Matrix::Candle(weight),
            },
            QMatMul::Tensor(t)
                if t.dtype() == DType::F32
                    && t.device().is_cpu()
                    && t.rank() == 2
                    && t.dim(0)? <= SMALL_ROWS =>
            {
                Matrix::SmallF32 {
                    w: t.flatten_all()?.to_vec1::<f32>()?,
                    cols: t.dim(1)?,
                }
            }
            _ => Matrix::Candle(weight),
        })
    }

    /// `(out, in)`.
    pub fn shape(&self) -> Result<(usize, usize)> {
        Ok(match self {
            Matrix::Packed(p) => (p.rows(), p.cols()),
            Matrix::SmallF32 { w, cols } => (w.len() / cols, *cols),
            Matrix::Candle(QMatMul::QTensor(t)) => t.shape().dims2()?,
            Matrix::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => t.dims2()?,
        })
    }

    /// Several matrices of one input as one (their outputs side by side), when they are
    /// all packed alike and fill whole row groups: one matmul quantizes the input once
    /// and splits the work over the threads once, which at batch 1 is a good part of a
    /// projection's cost.
    pub fn fuse(parts: &[&Matrix], backend: Backend) -> Option<Matrix> {
        // Dense weights of the GPU backend: one weight of their rows stacked.
        let dense: Option<Vec<&Tensor>> = parts
            .iter()
            .map(|m| match m {
                Matrix::Candle(QMatMul::Tensor(t)) if backend == Backend::Gpu => Some(t),
                _ => None,
            })
            .collect();
        if let Some(dense) = dense.filter(|d| d.iter().all(|t| t.dtype() == d[0].dtype())) {
            return Tensor::cat(&dense, 0)
                .ok()
                .map(|t| Matrix::Candle(QMatMul::Tensor(t)));
        }
        let packed: Option<Vec<&PackedQuantMatrix>> = parts
            .iter()
            .map(|m| match m {
                Matrix::Packed(p) => Some(p.as_ref()),
                _ => None,
            })
            .collect();
        PackedQuantMatrix::concat(&packed?).map(|m| Matrix::Packed(Box::new(m)))
    }
}

/// The weights of one projection of every routed expert of a layer: `[experts, out, in]`,
/// as GGUF stores them (`ffn_gate_exps`, ...) and as safetensors checkpoints' per-expert
/// matrices are stacked at load. The grouped kernel multiplies each expert's tokens by
/// its slice.
#[derive(Debug, Clone)]
pub enum StackedMatrix {
    /// One packed matrix of `experts * out` rows; expert `e` is rows `e * out..`. Needs
    /// `out` in whole row groups of 16 (every real model's expert widths are).
    Packed { m: Box<PackedQuantMatrix>, out: usize },
    /// A dense `[experts, out, in]` tensor; an expert is a view of it.
    Dense(Tensor),
    /// Formats without a stacked kernel (Q2_K, Q3_K, or packed widths not in whole row
    /// groups): one matrix per expert, cut at load.
    PerExpert(Vec<Matrix>),
    /// GGUF's stacked tensor as it is, on a CUDA device, for candle's indexed MoE kernel
    /// (the formats in [`gpu::experts::INDEXED_MOE_DTYPES`](super::gpu::experts)).
    Quantized(std::sync::Arc<candle_core::quantized::QTensor>),
}

impl StackedMatrix {
    /// The expert count and each expert's `[out, in]`.
    pub fn shape(&self) -> Result<(usize, usize, usize)> {
        Ok(match self {
            StackedMatrix::Packed { m, out } => (m.rows() / out, *out, m.cols()),
            StackedMatrix::Dense(t) => t.dims3()?,
            StackedMatrix::Quantized(q) => q.shape().dims3()?,
            StackedMatrix::PerExpert(ms) => {
                let (out, cols) = match ms.first() {
                    Some(m) => m.shape()?,
                    None => (0, 0),
                };
                (ms.len(), out, cols)
            }
        })
    }

    /// Expert by expert, `a`'s rows then `b`'s (the gate and up projections of each
    /// expert side by side, for one matmul per expert), when both are stacked alike.
    pub fn interleave(
        a: &StackedMatrix,
        b: &StackedMatrix,
        backend: Backend,
    ) -> Result<Option<StackedMatrix>> {
        Ok(match (a, b) {
            (StackedMatrix::Packed { m: ma, out: oa }, StackedMatrix::Packed { m: mb, out: ob }) => {
                let experts = ma.rows() / oa;
                let parts: Vec<(&PackedQuantMatrix, std::ops::Range<usize>)> = (0..experts)
                    .flat_map(|e| {
                        [
                            (ma.as_ref(), e * oa..(e + 1) * oa),
                            (mb.as_ref(), e * ob..(e + 1) * ob),
                        ]
                    })
                    .collect();
                (oa == ob)
                    .then(|| PackedQuantMatrix::concat_rows(&parts))
                    .flatten()
                    .map(|m| StackedMatrix::Packed {
                        m: Box::new(m),
                        out: oa + ob,
                    })
            }
            (StackedMatrix::Dense(ta), StackedMatrix::Dense(tb)) => {
                Some(StackedMatrix::Dense(Tensor::cat(&[ta, tb], 1)?))
            }
            (StackedMatrix::PerExpert(ma), StackedMatrix::PerExpert(mb)) => {
                let fused: Option<Vec<Matrix>> = ma
                    .iter()
                    .zip(mb)
                    .map(|(x, y)| Matrix::fuse(&[x, y], backend))
                    .collect();
                fused.map(StackedMatrix::PerExpert)
            }
            _ => None,
        })
    }
}

impl StackedMatrix {
    /// The stacked `[experts, out, in]` weight `w` in the form its kernel wants.
    pub fn new(w: QMatMul, backend: Backend) -> Result<Self> {
        Ok(match (w, backend) {
            // The GPU backend: kept quantized where candle's CUDA kernel reads the format,
            // else dense (bf16 on a GPU, f32 when checked on the CPU).
            (QMatMul::QTensor(q), Backend::Gpu) => {
                q.shape().dims3()?;
                let device = q.device();
                if device.is_cuda() && super::gpu::experts::INDEXED_MOE_DTYPES.contains(&q.dtype()) {
                    StackedMatrix::Quantized(q)
                } else {
                    let dense = q.dequantize(&device)?;
                    let dtype = if device.is_cpu() { DType::F32 } else { DType::BF16 };
                    StackedMatrix::Dense(dense.to_dtype(dtype)?)
                }
            }
            (QMatMul::QTensor(q), Backend::Cpu(isa)) => {
                let (experts, out, _) = q.shape().dims3()?;
                match PackedQuantMatrix::from_qtensor(&q, isa)? {
                    Some(m) if out.is_multiple_of(16) => StackedMatrix::Packed { m: Box::new(m), out },
                    _ => StackedMatrix::PerExpert(
                        (0..experts)
                            .map(|e| Matrix::new(QMatMul::from_qtensor(expert_slice(&q, e)?)?, backend))
                            .collect::<Result<_>>()?,
                    ),
                }
            }
            (QMatMul::Tensor(t) | QMatMul::TensorF16(t), _) => {
                t.dims3()?;
                StackedMatrix::Dense(t)
            }
        })
    }
}

/// Expert `e` of a stacked quantized `[experts, out, in]` tensor, as its own `[out, in]`.
fn expert_slice(q: &candle_core::quantized::QTensor, e: usize) -> Result<candle_core::quantized::QTensor> {
    use candle_core::quantized::{QStorage, QTensor};
    let (experts, out, cols) = q.shape().dims3()?;
    let data = q.data()?;
    if e >= experts || !data.len().is_multiple_of(experts) {
        return Err(Error::InvalidBatch(format!(
            "expert {e} of a stacked tensor of {experts} experts ({} bytes)",
            data.len()
        )));
    }
    let per = data.len() / experts;
    let storage = QStorage::from_data(
        std::borrow::Cow::Owned(data[e * per..(e + 1) * per].to_vec()),
        &q.device(),
        q.dtype(),
    )?;
    Ok(QTensor::new(storage, (out, cols))?)
}

/// Which tokens go to which routed expert: the tokens routed to expert `e` are
/// `tokens[e]`, with routing weights `weights[e]` (same order). Chosen on the host by the
/// router, read by the grouped kernel.
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

/// The routed experts of one MoE layer: each a SwiGLU MLP `down(silu(gate x) * up x)`,
/// the three projections stacked over the experts.
#[derive(Debug, Clone)]
pub struct StackedMlp {
    /// Gate and up side by side per expert when they stack alike, else apart.
    pub(crate) gate_up: GateUp,
    pub(crate) down: StackedMatrix,
    /// Each expert's intermediate width.
    pub(crate) width: usize,
}

#[derive(Debug, Clone)]
pub(crate) enum GateUp {
    Fused(StackedMatrix),
    Separate(StackedMatrix, StackedMatrix),
}

impl StackedMlp {
    pub fn new(
        gate: StackedMatrix,
        up: StackedMatrix,
        down: StackedMatrix,
        backend: Backend,
    ) -> Result<Self> {
        let (experts, width, _) = gate.shape()?;
        let (down_experts, _, down_in) = down.shape()?;
        if up.shape()?.0 != experts || down_experts != experts || down_in != width {
            return Err(Error::InvalidBatch(format!(
                "stacked experts disagree: gate {:?}, up {:?}, down {:?}",
                gate.shape()?,
                up.shape()?,
                down.shape()?
            )));
        }
        let gate_up = match StackedMatrix::interleave(&gate, &up, backend)? {
            Some(fused) => GateUp::Fused(fused),
            None => GateUp::Separate(gate, up),
        };
        Ok(Self { gate_up, down, width })
    }

    pub fn num_experts(&self) -> Result<usize> {
        Ok(self.down.shape()?.0)
    }
}
