//! The grouped MoE kernel: the routed experts of one layer over all of their tokens, in
//! one call. Each active expert gathers its tokens' rows, runs its gated MLP on its slice
//! of the stacked weights, and the outputs are weighted and added back into the tokens'
//! rows. Experts run side by side on the pool (each matmul splits further over its rows):
//! at small batches one expert's matmul is too small to keep every thread busy, and one
//! after another they would each pay for a parallel split and join. The gather and the
//! scatter-add work on plain buffers, not on four or five small tensor ops per expert.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::host::with_f32;
use super::isa::Isa;
use super::rows::swiglu_host;
use crate::backend::matrix::{GateUp, Matrix, Routing, StackedMatrix, StackedMlp};
use crate::error::{Error, Result};

/// `sum over e of weight[e, t] * mlp_e(x[t])` for each token `t`, in `x`'s dtype.
pub(crate) fn forward(isa: Isa, x: &Tensor, routing: &Routing, experts: &StackedMlp) -> Result<Tensor> {
    let (t, hidden) = x.dims2()?;
    let active: Vec<usize> = (0..routing.tokens.len())
        .filter(|&e| !routing.tokens[e].is_empty())
        .collect();
    let outputs = with_f32(x, |xv| {
        active
            .par_iter()
            .map(|&e| {
                let rows = &routing.tokens[e];
                let mut gathered = Vec::with_capacity(rows.len() * hidden);
                for &r in rows {
                    let r = r as usize;
                    if r >= t {
                        return Err(Error::InvalidBatch(format!("token {r} routed, of {t}")));
                    }
                    gathered.extend_from_slice(&xv[r * hidden..][..hidden]);
                }
                expert_mlp(isa, experts, e, &gathered)
            })
            .collect::<Result<Vec<Vec<f32>>>>()
    })??;
    // The weighted sum in a fixed order (expert by expert), whatever the threads did.
    let mut out = vec![0f32; t * hidden];
    for (&e, y) in active.iter().zip(&outputs) {
        for ((&r, &w), y) in routing.tokens[e]
            .iter()
            .zip(&routing.weights[e])
            .zip(y.chunks_exact(hidden))
        {
            for (o, &v) in out[r as usize * hidden..][..hidden].iter_mut().zip(y) {
                *o += w * v;
            }
        }
    }
    Ok(Tensor::from_vec(out, (t, hidden), x.device())?.to_dtype(x.dtype())?)
}

/// Expert `e`'s `down(silu(gate x) * up x)` for rows `x` (`[n, hidden]`).
fn expert_mlp(isa: Isa, experts: &StackedMlp, e: usize, x: &[f32]) -> Result<Vec<f32>> {
    let w = experts.width;
    let h = match &experts.gate_up {
        GateUp::Fused(gate_up) => swiglu_host(isa, &expert_matmul(isa, gate_up, e, x)?, w),
        GateUp::Separate(gate, up) => {
            let (g, u) = (expert_matmul(isa, gate, e, x)?, expert_matmul(isa, up, e, x)?);
            let mut gate_up = Vec::with_capacity(g.len() * 2);
            for (g, u) in g.chunks_exact(w).zip(u.chunks_exact(w)) {
                gate_up.extend_from_slice(g);
                gate_up.extend_from_slice(u);
            }
            swiglu_host(isa, &gate_up, w)
        }
    };
    expert_matmul(isa, &experts.down, e, &h)
}

/// Rows `x` (`[n, in]`, f32) times expert `e`'s slice of `w`, `[n, out]` in f32.
fn expert_matmul(isa: Isa, w: &StackedMatrix, e: usize, x: &[f32]) -> Result<Vec<f32>> {
    match w {
        StackedMatrix::Packed { m, out } => m.matmul_rows(x, e * out..(e + 1) * out),
        StackedMatrix::Dense(t) => {
            let we = t.get(e)?;
            let (_, cols) = we.dims2()?;
            let xe =
                Tensor::from_vec(x.to_vec(), (x.len() / cols, cols), t.device())?.to_dtype(we.dtype())?;
            Ok(xe
                .matmul(&we.t()?)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?)
        }
        StackedMatrix::Quantized(_) => Err(Error::Backend(
            "quantized stacked experts on a GPU reached the CPU kernel".into(),
        )),
        StackedMatrix::PerExpert(ms) => {
            let m: &Matrix = ms
                .get(e)
                .ok_or_else(|| Error::InvalidBatch(format!("expert {e} of {}", ms.len())))?;
            let (_, cols) = m.shape()?;
            let xe = Tensor::from_vec(x.to_vec(), (x.len() / cols, cols), &candle_core::Device::Cpu)?;
            with_f32(&super::matmul(isa, m, &xe)?, |v| v.to_vec())
        }
    }
}
