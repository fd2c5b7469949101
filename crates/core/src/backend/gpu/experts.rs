//! The routed experts of one MoE layer in tensor ops.
//!
//! Dense stacked weights (`[experts, out, in]`, bf16 from safetensors): the tokens are
//! sorted by expert into a padded `[experts, rows, hidden]` batch (one gather), and each
//! projection is one batched matmul over all experts (one cuBLAS call per projection per
//! layer, not one per expert); the outputs are weighted and added back into their tokens'
//! rows (one scatter-add). When only a few experts are active (a small decode batch) the
//! padded batch would read every expert's weights for nothing, so each active expert
//! runs on its own tokens instead, reading only its slice.
//!
//! Quantized stacked weights on a CUDA device (GGUF's Q8_0 and k-quants) go through
//! candle's indexed MoE kernel, which reads each token's experts by id: one launch per
//! projection per layer.

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Tensor};

use crate::backend::matrix::{GateUp, Routing, StackedMatrix, StackedMlp};
use crate::error::{Error, Result};

/// The quantized formats candle's indexed MoE kernel reads.
pub(crate) const INDEXED_MOE_DTYPES: [GgmlDType; 6] = [
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// `sum over e of weight[e, t] * mlp_e(x[t])` for each token `t`, in `x`'s dtype.
pub(crate) fn forward(x: &Tensor, routing: &Routing, experts: &StackedMlp) -> Result<Tensor> {
    let (t, _) = x.dims2()?;
    if let Some(&bad) = routing.tokens.iter().flatten().find(|&&r| r as usize >= t) {
        return Err(Error::InvalidBatch(format!("token {bad} routed, of {t}")));
    }
    let gate_up = match &experts.gate_up {
        GateUp::Fused(StackedMatrix::Dense(gu)) => Some(DenseGateUp::Fused(gu)),
        GateUp::Separate(StackedMatrix::Dense(g), StackedMatrix::Dense(u)) => {
            Some(DenseGateUp::Separate(g, u))
        }
        _ => None,
    };
    match (gate_up, &experts.gate_up, &experts.down) {
        (Some(gate_up), _, StackedMatrix::Dense(down)) => {
            let dense = DenseExperts {
                gate_up,
                down,
                width: experts.width,
            };
            let active = routing.tokens.iter().filter(|r| !r.is_empty()).count();
            let y = if active * 4 <= routing.tokens.len() {
                dense.one_by_one(x, routing)?
            } else {
                dense.padded_batch(x, routing)?
            };
            Ok(y.to_dtype(x.dtype())?)
        }
        (
            None,
            GateUp::Separate(StackedMatrix::Quantized(g), StackedMatrix::Quantized(u)),
            StackedMatrix::Quantized(d),
        ) => indexed_quantized(x, routing, [g, u, d]),
        _ => Err(Error::Backend(format!(
            "expert weights in a CPU-only form reached the GPU backend on {:?}",
            x.device()
        ))),
    }
}

enum DenseGateUp<'a> {
    /// `[experts, 2 * width, in]`, each expert's gate rows then its up rows.
    Fused(&'a Tensor),
    Separate(&'a Tensor, &'a Tensor),
}

struct DenseExperts<'a> {
    gate_up: DenseGateUp<'a>,
    /// `[experts, hidden, width]`.
    down: &'a Tensor,
    width: usize,
}

impl DenseExperts<'_> {
    /// `silu(gate x) * up x` for rows `x` (`[.., rows, in]`) and weights `[.., out, in]`
    /// of one expert or of all (a batched matmul), `[.., rows, width]`.
    fn hidden(&self, x: &Tensor, pick: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let mm = |w: &Tensor| -> Result<Tensor> {
            let w = pick(w)?;
            let r = w.rank();
            Ok(x.matmul(&w.transpose(r - 2, r - 1)?)?)
        };
        match self.gate_up {
            DenseGateUp::Fused(gu) => super::swiglu(&mm(gu)?, self.width),
            DenseGateUp::Separate(g, u) => Ok((mm(g)?.silu()? * mm(u)?)?),
        }
    }

    /// Each active expert over its own tokens: gather, gated MLP on its slice of the
    /// weights, weighted add back (f32).
    fn one_by_one(&self, x: &Tensor, routing: &Routing) -> Result<Tensor> {
        let (t, hidden) = x.dims2()?;
        let x = x.to_dtype(self.down.dtype())?;
        let mut out = Tensor::zeros((t, hidden), DType::F32, x.device())?;
        for (e, (rows, weights)) in routing.tokens.iter().zip(&routing.weights).enumerate() {
            if rows.is_empty() {
                continue;
            }
            let ids = Tensor::new(rows.as_slice(), x.device())?;
            let h = self.hidden(&x.index_select(&ids, 0)?, |w| Ok(w.get(e)?))?;
            let y = h.matmul(&self.down.get(e)?.t()?)?.to_dtype(DType::F32)?;
            let w = Tensor::new(weights.as_slice(), x.device())?.reshape((rows.len(), 1))?;
            out = out.index_add(&ids, &y.broadcast_mul(&w)?, 0)?;
        }
        Ok(out)
    }

    /// All experts at once: tokens sorted by expert into `[experts, rows, hidden]`
    /// (padded with a zero row, weighted 0), one batched matmul per projection, one
    /// scatter-add back (f32).
    fn padded_batch(&self, x: &Tensor, routing: &Routing) -> Result<Tensor> {
        let (t, hidden) = x.dims2()?;
        let experts = routing.tokens.len();
        let rows = routing.tokens.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = vec![t as u32; experts * rows];
        let mut weights = vec![0f32; experts * rows];
        for (e, (tokens, w)) in routing.tokens.iter().zip(&routing.weights).enumerate() {
            ids[e * rows..][..tokens.len()].copy_from_slice(tokens);
            weights[e * rows..][..w.len()].copy_from_slice(w);
        }
        let dev = x.device();
        let ids = Tensor::from_vec(ids, experts * rows, dev)?;
        let weights = Tensor::from_vec(weights, (experts * rows, 1), dev)?;
        let x = x.to_dtype(self.down.dtype())?;
        let padded = Tensor::cat(&[&x, &Tensor::zeros((1, hidden), x.dtype(), dev)?], 0)?;
        let xs = padded.index_select(&ids, 0)?.reshape((experts, rows, hidden))?;
        let h = self.hidden(&xs, |w| Ok(w.clone()))?;
        let y = h
            .matmul(&self.down.transpose(1, 2)?)?
            .reshape((experts * rows, hidden))?
            .to_dtype(DType::F32)?
            .broadcast_mul(&weights)?;
        let out = Tensor::zeros((t + 1, hidden), DType::F32, dev)?.index_add(&ids, &y, 0)?;
        Ok(out.narrow(0, 0, t)?)
    }
}

/// Quantized stacked experts through candle's indexed MoE kernel (CUDA only): each
/// token's `k` experts by id, `[tokens, k, out]` per projection, then the weighted sum.
fn indexed_quantized(
    x: &Tensor,
    routing: &Routing,
    [gate, up, down]: [&std::sync::Arc<candle_core::quantized::QTensor>; 3],
) -> Result<Tensor> {
    if !x.device().is_cuda() {
        return Err(Error::Backend(format!(
            "quantized stacked experts run on a CUDA device only, not {:?}",
            x.device()
        )));
    }
    let (t, hidden) = x.dims2()?;
    // Per token: its experts and their weights (every token has the same number).
    let mut per_token: Vec<Vec<(u32, f32)>> = vec![Vec::new(); t];
    for (e, (tokens, weights)) in routing.tokens.iter().zip(&routing.weights).enumerate() {
        for (&tok, &w) in tokens.iter().zip(weights) {
            per_token[tok as usize].push((e as u32, w));
        }
    }
    let k = per_token.first().map_or(0, Vec::len);
    if k == 0 || per_token.iter().any(|p| p.len() != k) {
        return Err(Error::InvalidBatch(
            "every token must be routed to the same number of experts".into(),
        ));
    }
    let ids: Vec<u32> = per_token.iter().flatten().map(|&(e, _)| e).collect();
    let weights: Vec<f32> = per_token.iter().flatten().map(|&(_, w)| w).collect();
    let ids = Tensor::from_vec(ids, (t, k), x.device())?;
    let weights = Tensor::from_vec(weights, (t, k, 1), x.device())?;
    let x3 = x.to_dtype(DType::F32)?.reshape((t, 1, hidden))?.contiguous()?;
    let g = gate.indexed_moe_forward(&x3, &ids)?;
    let u = up.indexed_moe_forward(&x3, &ids)?;
    let h = (g.silu()? * u)?.contiguous()?;
    let y = down.indexed_moe_forward(&h, &ids)?;
    Ok(y.broadcast_mul(&weights)?.sum(1)?.to_dtype(x.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::test_util::{max_abs, max_diff, random};
    use crate::backend::{Backend, StackedMatrix, StackedMlp};
    use candle_core::quantized::QMatMul;

    /// Both dense paths (one expert at a time, the padded batch) agree with the CPU
    /// kernel, with gate and up fused or apart, in f32 and bf16 weights.
    #[test]
    fn grouped_experts_match_the_cpu_kernel() {
        let (experts, hidden, width, t) = (8, 32, 16, 6);
        let stacked = |shape: &[usize], seed, dtype| {
            StackedMatrix::new(
                QMatMul::Tensor(random(shape, seed).to_dtype(dtype).unwrap()),
                Backend::Gpu,
            )
            .unwrap()
        };
        let x = random(&[t, hidden], 9);
        // Two experts active (the one-by-one path), then most (the padded batch).
        let few = Routing {
            tokens: (0..experts)
                .map(|e| match e {
                    2 => vec![0, 3, 5],
                    6 => vec![1, 2, 3, 4],
                    _ => vec![],
                })
                .collect(),
            weights: (0..experts)
                .map(|e| match e {
                    2 => vec![0.5, 0.25, 1.0],
                    6 => vec![0.1, 0.9, 0.75, 0.3],
                    _ => vec![],
                })
                .collect(),
        };
        let many = Routing {
            tokens: (0..experts)
                .map(|e| {
                    (0..t as u32)
                        .filter(|&r| !(r as usize + e).is_multiple_of(3))
                        .collect()
                })
                .collect(),
            weights: (0..experts)
                .map(|e| {
                    (0..t)
                        .filter(|&r| !(r + e).is_multiple_of(3))
                        .map(|r| 0.1 * (r + e) as f32)
                        .collect()
                })
                .collect(),
        };
        for dtype in [DType::F32, DType::BF16] {
            let mlp = StackedMlp::new(
                stacked(&[experts, width, hidden], 1, dtype),
                stacked(&[experts, width, hidden], 2, dtype),
                stacked(&[experts, hidden, width], 3, dtype),
                Backend::Gpu,
            )
            .unwrap();
            let separate = StackedMlp {
                gate_up: GateUp::Separate(
                    stacked(&[experts, width, hidden], 1, dtype),
                    stacked(&[experts, width, hidden], 2, dtype),
                ),
                ..mlp.clone()
            };
            assert!(matches!(mlp.gate_up, GateUp::Fused(_)));
            for routing in [&few, &many] {
                let want =
                    crate::backend::cpu::experts::forward(crate::backend::Isa::best(), &x, routing, &mlp)
                        .unwrap();
                for m in [&mlp, &separate] {
                    let got = forward(&x, routing, m).unwrap();
                    let (diff, scale) = (max_diff(&want, &got), max_abs(&want));
                    // bf16 keeps 8 bits: the two paths round at different places (the
                    // CPU kernel's SwiGLU is in f32).
                    let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
                    assert!(diff < tol * scale, "{dtype:?}: {diff} of {scale}");
                }
            }
        }
        let bad = Routing {
            tokens: vec![vec![t as u32]; experts],
            weights: vec![vec![1.0]; experts],
        };
        let mlp = StackedMlp::new(
            stacked(&[experts, width, hidden], 1, DType::F32),
            stacked(&[experts, width, hidden], 2, DType::F32),
            stacked(&[experts, hidden, width], 3, DType::F32),
            Backend::Gpu,
        )
        .unwrap();
        assert!(forward(&x, &bad, &mlp).is_err());
    }
}
