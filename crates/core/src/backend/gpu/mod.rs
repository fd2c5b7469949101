//! The GPU backend: every kernel of the interface as candle tensor ops, which candle runs
//! on an NVIDIA GPU through cuBLAS (matmuls, batched for the experts) and its own CUDA
//! kernels (norms, rotary, softmax, gathers and scatters). Weights stay in the dtype they
//! were loaded in (bf16 for safetensors by default) or quantized for candle's CUDA
//! quantized matmuls (GGUF), activations live on the device, and the KV pool is one flat
//! tensor per layer on the device ([`KvBuffer::Device`](super::KvBuffer::Device)).
//!
//! Nothing here is device-specific, which is what lets CI check it on the CPU against
//! the reference fixtures (a model loaded with [`Backend::Gpu`](super::Backend::Gpu) on the CPU device). Fused CUDA kernels of our
//! own (paged attention reading the blocks in place, a grouped expert GEMM over sorted
//! tokens) would replace the gathers in [`attention`] and the padded batch in
//! [`experts`]; these are the reference they must match.

pub(crate) mod attention;
pub(crate) mod experts;

use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Tensor};

use super::Matrix;
use crate::error::{Error, Result};

/// `x W^T` (`[.., in]` -> `[.., out]`): candle's matmul (cuBLAS on a GPU), or its
/// quantized matmul for GGUF weights kept quantized. A CPU-only form (weights packed for
/// the CPU's integer kernel) is an error: a model loaded for this backend has none.
pub(crate) fn matmul(w: &Matrix, x: &Tensor) -> Result<Tensor> {
    match w {
        Matrix::Candle(QMatMul::QTensor(q)) if x.dtype() != DType::F32 => {
            // Candle's quantized kernels take f32 activations.
            let y = QMatMul::QTensor(q.clone()).forward(&x.to_dtype(DType::F32)?)?;
            Ok(y.to_dtype(x.dtype())?)
        }
        Matrix::Candle(m) => Ok(m.forward(x)?),
        _ => Err(Error::Backend(format!(
            "a weight in a CPU-only form reached the GPU backend on {:?}",
            x.device()
        ))),
    }
}

/// RMS norm of each row in f32 (candle's fused kernel), back in `x`'s dtype: as the
/// reference implementations norm in f32 whatever the compute dtype.
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    let y = candle_nn::ops::rms_norm(&x.to_dtype(DType::F32)?.contiguous()?, weight, eps)?;
    Ok(y.to_dtype(x.dtype())?)
}

/// The column ranges of `x` as their own contiguous tensors.
pub(crate) fn split_columns(x: &Tensor, widths: &[usize]) -> Result<Vec<Tensor>> {
    let total = x.dim(1)?;
    if total != widths.iter().sum::<usize>() {
        return Err(Error::InvalidBatch(format!(
            "{total} columns do not split into {widths:?}"
        )));
    }
    let mut at = 0;
    widths
        .iter()
        .map(|&w| {
            let part = x.narrow(1, at, w)?.contiguous()?;
            at += w;
            Ok(part)
        })
        .collect()
}

/// `silu(gate) * up` from a fused `[.., 2 * width]` output, gate first.
pub(crate) fn swiglu(gate_up: &Tensor, width: usize) -> Result<Tensor> {
    let last = gate_up.rank() - 1;
    let gate = gate_up.narrow(last, 0, width)?;
    let up = gate_up.narrow(last, width, width)?;
    Ok((gate.silu()? * up)?)
}

/// Rotary embedding of `x` (`[tokens, heads * head_dim]`) by each token's own position,
/// in f32: the tables' rows gathered by position, then candle's fused rope kernel with
/// one "batch" per token (`[tokens, heads, 1, rotary_dim]`, the cos/sin rows batched
/// alike), so a mixed batch needs no transpose.
pub(crate) fn rotary(
    x: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    heads: usize,
    positions: &[usize],
    interleaved: bool,
) -> Result<Tensor> {
    let (head_dim, half) = crate::backend::check_rotary(x, cos, heads, positions)?;
    let t = positions.len();
    let ids: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
    let ids = Tensor::from_vec(ids, t, x.device())?;
    let cos = cos.index_select(&ids, 0)?.reshape((t, 1, half))?;
    let sin = sin.index_select(&ids, 0)?.reshape((t, 1, half))?;
    let x = x.to_dtype(DType::F32)?.reshape((t, heads, 1, head_dim))?;
    let rope = |r: &Tensor| -> Result<Tensor> {
        let r = r.contiguous()?;
        Ok(if interleaved {
            candle_nn::rotary_emb::rope_i(&r, &cos, &sin)?
        } else {
            candle_nn::rotary_emb::rope(&r, &cos, &sin)?
        })
    };
    let out = if 2 * half == head_dim {
        rope(&x)?
    } else {
        let rotated = rope(&x.narrow(3, 0, 2 * half)?)?;
        Tensor::cat(&[&rotated, &x.narrow(3, 2 * half, head_dim - 2 * half)?], 3)?
    };
    Ok(out.reshape((t, heads * head_dim))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::test_util::{max_diff, random};

    /// Rotary, full and partial, interleaved or not, agrees with the CPU kernel.
    #[test]
    fn rotary_matches_the_cpu_kernel() {
        let positions = [0usize, 7, 3, 30, 31];
        for (heads, head_dim, half) in [(4, 16, 8), (2, 24, 4), (3, 8, 4)] {
            let x = random(&[positions.len(), heads * head_dim], 1);
            let cos = random(&[32, half], 2);
            let sin = random(&[32, half], 3);
            for interleaved in [false, true] {
                let want =
                    crate::backend::cpu::rotary::rotate(&x, (&cos, &sin), heads, &positions, interleaved)
                        .unwrap();
                let got = rotary(&x, (&cos, &sin), heads, &positions, interleaved).unwrap();
                assert!(
                    max_diff(&want, &got) < 1e-6,
                    "{heads}x{head_dim}/{half} {interleaved}"
                );
            }
        }
        let x = random(&[1, 16], 1);
        let table = random(&[4, 8], 2);
        assert!(rotary(&x, (&table, &table), 1, &[4], false).is_err());
    }

    /// Norm, split and SwiGLU agree with the CPU kernels, in f32 and bf16.
    #[test]
    fn row_kernels_match_the_cpu_kernels() {
        let x = random(&[5, 48], 4);
        let w = random(&[48], 5);
        for dtype in [DType::F32, DType::BF16] {
            let x = x.to_dtype(dtype).unwrap();
            let want =
                crate::backend::cpu::norm::rms_norm(crate::backend::Isa::best(), &x, &w, 1e-6).unwrap();
            let got = rms_norm(&x, &w, 1e-6).unwrap();
            assert_eq!(got.dtype(), dtype);
            assert!(max_diff(&want, &got) < 1e-5, "{dtype:?}");
            let want = crate::backend::cpu::rows::swiglu(crate::backend::Isa::best(), &x, 24).unwrap();
            let got = swiglu(&x, 24).unwrap();
            assert!(max_diff(&want, &got) < 1e-5, "{dtype:?}");
            let want = crate::backend::cpu::split_columns(&x, &[16, 8, 24]).unwrap();
            let got = split_columns(&x, &[16, 8, 24]).unwrap();
            for (a, b) in want.iter().zip(&got) {
                assert_eq!(max_diff(a, b), 0.0);
            }
        }
        assert!(split_columns(&x, &[16, 16]).is_err());
    }
}
