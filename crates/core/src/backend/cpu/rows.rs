//! Row passes of the feed-forward block: SwiGLU over a fused gate/up output in one pass,
//! with no split copies and no intermediate tensors (candle would take a narrow, a copy,
//! a silu and a multiply, each a pass over memory).

use std::mem::MaybeUninit;

use candle_core::{DType, Tensor};

use super::host::{filled_vec, with_f32};
use super::isa::Isa;
use super::vmath::exp;
use crate::error::Result;

/// `silu(gate) * up` from `[tokens, 2 * width]` (gate first): the row kernel for f32,
/// candle's ops for other dtypes.
pub(crate) fn swiglu(isa: Isa, gate_up: &Tensor, width: usize) -> Result<Tensor> {
    if gate_up.dtype() == DType::F32 {
        return swiglu_f32(isa, gate_up, width);
    }
    let gate = gate_up.narrow(1, 0, width)?;
    let up = gate_up.narrow(1, width, width)?;
    Ok((gate.silu()? * up)?)
}

/// `silu(gate) * up` from the fused gate/up output (`[tokens, 2 * width]`, gate first),
/// in one pass over it: no split copies, no intermediate tensors.
fn swiglu_f32(isa: Isa, gate_up: &Tensor, width: usize) -> Result<Tensor> {
    let (t, cols) = gate_up.dims2()?;
    if cols != 2 * width {
        return Err(crate::error::Error::InvalidBatch(format!(
            "a gate/up output of {cols} columns for a width of {width}"
        )));
    }
    let h = with_f32(gate_up, |v| swiglu_host(isa, v, width))?;
    Ok(Tensor::from_vec(h, (t, width), gate_up.device())?)
}

/// [`swiglu_rows`] compiled for AVX2 (8 values per instruction rather than 4).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_avx2(gate_up: &[f32], width: usize, h: &mut [MaybeUninit<f32>]) {
    swiglu_rows(gate_up, width, h)
}

/// [`swiglu_rows`] compiled for AVX-512 (16 values per instruction rather than 4).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn swiglu_avx512(gate_up: &[f32], width: usize, h: &mut [MaybeUninit<f32>]) {
    swiglu_rows(gate_up, width, h)
}

/// `h[r] = silu(gate[r]) * up[r]` row by row; `silu(g) = g / (1 + e^-g)` with the
/// vectorisable exp shared with attention.
#[inline(always)]
fn swiglu_rows(gate_up: &[f32], width: usize, h: &mut [MaybeUninit<f32>]) {
    for (row, out) in gate_up.chunks_exact(2 * width).zip(h.chunks_exact_mut(width)) {
        let (gate, up) = row.split_at(width);
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            o.write(g / (1.0 + exp(-g)) * u);
        }
    }
}

/// `silu(gate) * up` for host rows of `[tokens, 2 * width]` (the grouped experts' gate/up
/// outputs).
pub(crate) fn swiglu_host(isa: Isa, gate_up: &[f32], width: usize) -> Vec<f32> {
    let t = gate_up.len() / (2 * width);
    // SAFETY: each of the `t` rows of `width` outputs is written; the model's kernel set
    // is one the CPU runs.
    unsafe {
        filled_vec(t * width, |h| match isa.runnable() {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => swiglu_avx512(gate_up, width, h),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => swiglu_avx2(gate_up, width, h),
            // NEON is the baseline of every aarch64 build: the plain loops use it.
            _ => swiglu_rows(gate_up, width, h),
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// The one-pass SwiGLU equals candle's `silu(gate) * up` on the split halves, over
    /// ordinary values and large ones of either sign (where e^-g under- or overflows).
    #[test]
    fn fused_swiglu_matches_candle() {
        let dev = Device::Cpu;
        let mut gate_up = (Tensor::randn(0f32, 3.0, (5, 2 * 37), &dev).unwrap())
            .to_vec2::<f32>()
            .unwrap();
        gate_up[0][..4].copy_from_slice(&[-120.0, -88.5, 90.0, 200.0]);
        let gate_up = Tensor::new(gate_up, &dev).unwrap();
        let want = (gate_up.narrow(1, 0, 37).unwrap().silu().unwrap() * gate_up.narrow(1, 37, 37).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for isa in Isa::available() {
            let got = swiglu(isa, &gate_up, 37).unwrap().to_vec2::<f32>().unwrap();
            for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                assert!((g - w).abs() <= 1e-6 * (1.0 + w.abs()), "{isa}: {g} vs {w}");
            }
        }
    }
}
