//! The portable kernel: unpack the 16 rows of a block to 16-bit integers, exact integer
//! dot products, then the scales applied as the SIMD kernels apply them (one fused
//! multiply-add per block and row for the scale, one for the minimum). For CPUs with none
//! of the SIMD sets, and the reference every other kernel is tested against.

use std::ops::Range;

use super::activations::Activations;
use super::pack::weight_at;
use super::{PackedQuantMatrix, Target, GROUP};

/// # Safety
/// `out` is `[tokens, rows]` with every token of `ts` below `tokens`, and holds group `g`.
pub(super) unsafe fn group(m: &PackedQuantMatrix, g: usize, a: &Activations, ts: Range<usize>, out: Target) {
    let (blocks, bs) = (m.blocks(), m.block);
    let gbb = super::group_block_bytes(m.storage, bs);
    let valid = GROUP.min(m.rows - g * GROUP);
    let mut w = [[0i16; 32]; GROUP];
    let mut acc = vec![[0f32; GROUP]; ts.len()];
    assert!(a.cols == m.cols && a.block == bs && ts.end <= a.tokens);
    for b in 0..blocks {
        let at = g * blocks + b;
        let packed = &m.weights[at * gbb..(at + 1) * gbb];
        for (r, w) in w.iter_mut().enumerate() {
            for (j, w) in w[..bs].iter_mut().enumerate() {
                *w = weight_at(m.layout, m.storage, bs, packed, r, j);
            }
        }
        for (ti, t) in ts.clone().enumerate() {
            let x = &a.q[t * a.cols + b * bs..][..bs];
            let (xs, xsum) = (a.scale[t * blocks + b], a.sum[t * blocks + b]);
            for r in 0..GROUP {
                let dot: i32 = w[r][..bs].iter().zip(x).map(|(&w, &x)| w as i32 * x as i32).sum();
                let acc = &mut acc[ti][r];
                *acc = (dot as f32).mul_add(m.scales.get(at * GROUP + r) * xs, *acc);
                if let Some(mins) = &m.mins {
                    *acc = mins.get(at * GROUP + r).mul_add(xsum, *acc);
                }
            }
        }
    }
    for (ti, t) in ts.enumerate() {
        for (r, v) in acc[ti][..valid].iter().enumerate() {
            // SAFETY: the caller passes an output holding token `t` and group `g`;
            // `16g + r < rows`.
            unsafe { *out.at(t, g).add(r) = *v };
        }
    }
}
