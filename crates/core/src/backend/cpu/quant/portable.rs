//! The portable kernel: unpack the 16 rows of a block to 16-bit integers, exact integer
//! dot products (plain loops the compiler vectorises for the target's baseline), then
//! the scales applied as the SIMD kernels apply them. For CPUs with none of the SIMD sets,
//! and the reference every other kernel is tested against.

use std::ops::Range;

use super::activations::Activations;
use super::{Layout, PackedQuantMatrix, Storage, Target, GROUP};

/// # Safety
/// `out` is `[tokens, rows]` with every token of `ts` below `tokens`, and holds group `g`.
pub(super) unsafe fn group(m: &PackedQuantMatrix, g: usize, a: &Activations, ts: Range<usize>, out: Target) {
    // SAFETY: forwarded.
    unsafe { group_with::<{ cfg!(target_feature = "fma") }>(m, g, a, ts, out) }
}

/// [`group`] with the scales applied by fused multiply-adds, whatever the target: bit for
/// bit what every SIMD kernel computes (a target without FMA, such as baseline x86-64,
/// would call a software `fmaf` per block and row, so [`group`] multiplies and adds
/// there, a rounding apart).
///
/// # Safety
/// As [`group`].
#[cfg(test)]
pub(super) unsafe fn group_fused(
    m: &PackedQuantMatrix,
    g: usize,
    a: &Activations,
    ts: Range<usize>,
    out: Target,
) {
    // SAFETY: forwarded.
    unsafe { group_with::<true>(m, g, a, ts, out) }
}

#[inline(always)]
fn mul_add<const FUSED: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FUSED {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// # Safety
/// As [`group`].
#[inline(always)]
unsafe fn group_with<const FUSED: bool>(
    m: &PackedQuantMatrix,
    g: usize,
    a: &Activations,
    ts: Range<usize>,
    out: Target,
) {
    let (blocks, bs) = (m.blocks(), m.block);
    let gbb = super::group_block_bytes(m.storage, bs);
    let mut w = [[0i16; 32]; GROUP];
    let mut acc = vec![[0f32; GROUP]; ts.len()];
    assert!(a.cols == m.cols && a.block == bs && ts.end <= a.tokens);
    for b in 0..blocks {
        let at = g * blocks + b;
        unpack(
            m.layout,
            m.storage,
            bs,
            &m.weights[at * gbb..(at + 1) * gbb],
            &mut w,
        );
        // The block's scales once for all tokens.
        let d: [f32; GROUP] = std::array::from_fn(|r| m.scales.get(at * GROUP + r));
        let mins: Option<[f32; GROUP]> = m
            .mins
            .as_ref()
            .map(|s| std::array::from_fn(|r| s.get(at * GROUP + r)));
        for (ti, t) in ts.clone().enumerate() {
            let x = &a.q[t * a.cols + b * bs..][..bs];
            let (xs, xsum) = (a.scale[t * blocks + b], a.sum[t * blocks + b]);
            let dots = match bs {
                16 => dots::<16>(&w, x),
                _ => dots::<32>(&w, x),
            };
            for r in 0..GROUP {
                let acc = &mut acc[ti][r];
                *acc = mul_add::<FUSED>(dots[r] as f32, d[r] * xs, *acc);
                if let Some(mins) = &mins {
                    *acc = mul_add::<FUSED>(mins[r], xsum, *acc);
                }
            }
        }
    }
    let valid = GROUP.min(m.rows - g * GROUP);
    for (ti, t) in ts.enumerate() {
        for (r, v) in acc[ti][..valid].iter().enumerate() {
            // SAFETY: the caller passes an output holding token `t` and group `g`;
            // `16g + r < rows`.
            unsafe { *out.at(t, g).add(r) = *v };
        }
    }
}

/// Each row's exact integer dot product with `x` over a block of `BS` weights, a row at a
/// time (so that each is a few `pmaddwd` on SSE2, rather than a gather across rows).
#[inline(always)]
fn dots<const BS: usize>(w: &[[i16; 32]; GROUP], x: &[i16]) -> [i32; GROUP] {
    let x: &[i16; BS] = x.try_into().expect("a block of activations");
    let mut out = [0i32; GROUP];
    for (o, w) in out.iter_mut().zip(w) {
        let w: &[i16; BS] = w[..BS].try_into().expect("a block of weights");
        *o = dot(w, x);
    }
    out
}

/// Written as adjacent pairs summed into 4 lanes, the shape of `pmaddwd`, and not inlined:
/// inlined into the loop over rows, it was vectorised across rows instead (a gather of
/// each vector, a value at a time).
#[inline(never)]
fn dot<const BS: usize>(w: &[i16; BS], x: &[i16; BS]) -> i32 {
    let mut lanes = [0i32; 4];
    for c in (0..BS).step_by(8) {
        for (l, lane) in lanes.iter_mut().enumerate() {
            let j = c + 2 * l;
            *lane += w[j] as i32 * x[j] as i32 + w[j + 1] as i32 * x[j + 1] as i32;
        }
    }
    lanes.iter().sum()
}

/// The 16 rows of a packed block as 16-bit integers (`w[r][..block]`): [`pack_group_block`]
/// (super::pack::pack_group_block) backwards, a loop per layout. Not inlined: inlined, the
/// compiler fused it with the dot products and built each vector of weights a value at a
/// time from the packed bytes (2 GMAC/s on one core; the rows in memory, then `pmaddwd`
/// over each, run several times as fast).
#[inline(never)]
fn unpack(layout: Layout, storage: Storage, block: usize, packed: &[u8], w: &mut [[i16; 32]; GROUP]) {
    match (layout, storage) {
        (Layout::Pairs, Storage::Bytes) => {
            for (c, chunk) in packed.chunks_exact(32).take(block / 2).enumerate() {
                for r in 0..GROUP {
                    w[r][2 * c] = chunk[2 * r] as i8 as i16;
                    w[r][2 * c + 1] = chunk[2 * r + 1] as i8 as i16;
                }
            }
        }
        (Layout::Pairs, Storage::Nibbles) => {
            for (c, chunk) in packed.chunks_exact(32).take(8).enumerate() {
                for r in 0..GROUP {
                    for e in 0..2 {
                        let byte = chunk[2 * r + e];
                        w[r][2 * c + e] = (byte & 0x0F) as i16;
                        w[r][2 * c + e + 16] = (byte >> 4) as i16;
                    }
                }
            }
        }
        (Layout::RowPairs, Storage::Bytes) => {
            for (v, vector) in packed.chunks_exact(16).take(block).enumerate() {
                let (k, p) = (v / 8, v % 8);
                for (j, &byte) in vector.iter().enumerate() {
                    w[2 * p + j / 8][8 * k + j % 8] = byte as i8 as i16;
                }
            }
        }
        (Layout::RowPairs, Storage::Nibbles) => {
            for (v, vector) in packed.chunks_exact(16).take(16).enumerate() {
                let (k, p) = (v / 8, v % 8);
                for (j, &byte) in vector.iter().enumerate() {
                    let row = &mut w[2 * p + j / 8];
                    row[8 * k + j % 8] = (byte & 0x0F) as i16;
                    row[8 * (k + 2) + j % 8] = (byte >> 4) as i16;
                }
            }
        }
    }
}
