use std::mem::MaybeUninit;

use candle_core::{DType, Tensor};

use super::{Linear, Projections};
use crate::error::Result;
use crate::host::{filled_vec, with_f32};
use crate::vmath::exp;
use crate::weights::WeightStore;

/// The SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`. Dense layers, routed
/// experts and shared experts are all this.
#[derive(Debug, Clone)]
pub struct GatedMlp {
    /// gate and up, fused into one matmul where the weights allow.
    gate_up: Projections,
    down: Linear,
}

impl GatedMlp {
    /// Hugging Face names: `{prefix}.gate_proj`, `up_proj`, `down_proj`.
    pub fn load(
        store: &WeightStore,
        prefix: &str,
        hidden: usize,
        intermediate: usize,
        bias: bool,
    ) -> Result<Self> {
        Self::load_named(
            store,
            prefix,
            ["gate_proj", "up_proj", "down_proj"],
            hidden,
            intermediate,
            bias,
        )
    }

    /// Explicit projection names (Mixtral's experts call them `w1`, `w3`, `w2`).
    pub fn load_named(
        store: &WeightStore,
        prefix: &str,
        [gate, up, down]: [&str; 3],
        hidden: usize,
        intermediate: usize,
        bias: bool,
    ) -> Result<Self> {
        let gate = Linear::load(store, &format!("{prefix}.{gate}"), hidden, intermediate, bias)?;
        let up = Linear::load(store, &format!("{prefix}.{up}"), hidden, intermediate, bias)?;
        Ok(Self {
            gate_up: Projections::new(vec![gate, up], vec![intermediate; 2])?,
            down: Linear::load(store, &format!("{prefix}.{down}"), intermediate, hidden, bias)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = match &self.gate_up {
            Projections::Fused(gate_up, widths) if x.dtype() == DType::F32 => {
                swiglu(&gate_up.forward(x)?, widths[0])?
            }
            _ => {
                let [gate, up]: [Tensor; 2] = self.gate_up.forward(x)?.try_into().expect("two projections");
                (gate.silu()? * up)?
            }
        };
        self.down.forward(&h)
    }
}

/// `silu(gate) * up` from the fused gate/up output (`[tokens, 2 * width]`, gate first),
/// in one pass over it: no split copies, no intermediate tensors.
fn swiglu(gate_up: &Tensor, width: usize) -> Result<Tensor> {
    let t = gate_up.dim(0)?;
    let h = with_f32(gate_up, |v| {
        assert_eq!(v.len(), t * 2 * width);
        // SAFETY: each of the `t` rows of `width` outputs is written (`swiglu_rows`).
        unsafe {
            filled_vec(t * width, |h| {
                #[cfg(target_arch = "x86_64")]
                if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features.
                    return swiglu_avx512(v, width, h);
                }
                swiglu_rows(v, width, h)
            })
        }
    })?;
    Ok(Tensor::from_vec(h, (t, width), gate_up.device())?)
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
        let got = swiglu(&gate_up, 37).unwrap().to_vec2::<f32>().unwrap();
        let want = (gate_up.narrow(1, 0, 37).unwrap().silu().unwrap() * gate_up.narrow(1, 37, 37).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!((g - w).abs() <= 1e-6 * (1.0 + w.abs()), "{g} vs {w}");
        }
    }
}
