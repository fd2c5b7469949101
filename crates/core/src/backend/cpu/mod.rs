//! The CPU backend: kernels on host memory, hand-written where no crate does the job well
//! (each file says why), and the thread-pool policy of a forward pass. Each kernel runs
//! in the kernel set ([`isa::Isa`]) the model chose at load: AVX-512, AVX2, NEON or
//! portable.
//! Activations are candle tensors in CPU memory; a kernel reads a contiguous f32 tensor
//! in place ([`host::with_f32`]) and takes candle's own ops for other dtypes.

pub mod attention;
pub(crate) mod experts;
pub(crate) mod host;
pub mod isa;
pub mod kv_buffer;
pub(crate) mod norm;
pub(crate) mod pool;
pub mod quant;
pub(crate) mod rotary;
pub(crate) mod rows;
pub(crate) mod simd;
pub(crate) mod small_gemm;
pub(crate) mod vmath;

use candle_core::{Module, Tensor};

use super::Matrix;
use crate::error::{Error, Result};
use host::with_f32;

/// `x W^T` for `x` of any rank (`[.., in]` -> `[.., out]`), as candle's matmul.
pub(crate) fn matmul(isa: isa::Isa, w: &Matrix, x: &Tensor) -> Result<Tensor> {
    let (cols, rows) = match w {
        Matrix::Candle(q) => return Ok(q.forward(x)?),
        Matrix::Packed(p) => (p.cols(), p.rows()),
        Matrix::SmallF32 { w, cols } => (*cols, w.len() / cols),
    };
    let k = x.dim(candle_core::D::Minus1)?;
    if k != cols {
        return Err(Error::InvalidBatch(format!(
            "matmul input has {k} features, the weight {cols}"
        )));
    }
    let mut shape = x.dims().to_vec();
    *shape.last_mut().expect("a last dimension") = rows;
    let y = match w {
        Matrix::Packed(p) => with_f32(x, |xs| p.matmul(xs))??,
        Matrix::SmallF32 { w, cols } => with_f32(x, |xs| small_gemm::matmul(isa, xs, w, *cols))?,
        Matrix::Candle(_) => unreachable!("returned above"),
    };
    Ok(Tensor::from_vec(y, shape, x.device())?.to_dtype(x.dtype())?)
}

/// The column ranges of `x` (`[tokens, sum(widths)]`) as their own tensors, row by row
/// straight into each part.
pub(crate) fn split_columns(x: &Tensor, widths: &[usize]) -> Result<Vec<Tensor>> {
    let (t, total) = x.dims2()?;
    if total != widths.iter().sum::<usize>() {
        return Err(Error::InvalidBatch(format!(
            "{total} columns do not split into {widths:?}"
        )));
    }
    let parts = with_f32(x, |v| {
        let mut parts: Vec<Vec<f32>> = widths.iter().map(|&w| Vec::with_capacity(t * w)).collect();
        for row in v.chunks_exact(total) {
            let mut at = 0;
            for (part, &w) in parts.iter_mut().zip(widths) {
                part.extend_from_slice(&row[at..at + w]);
                at += w;
            }
        }
        parts
    })?;
    parts
        .into_iter()
        .zip(widths)
        .map(|(p, &w)| Ok(Tensor::from_vec(p, (t, w), x.device())?.to_dtype(x.dtype())?))
        .collect()
}
