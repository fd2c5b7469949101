//! Matmuls over GGUF block-quantized weights, repacked at load time for integer dot
//! products with 16-bit activations.
//!
//! Hand-written because no crate does this well for us:
//! - candle's (and llama.cpp's) quantized matmul quantizes the activations to 8 bits per
//!   value before its integer dot products. Over the 200-odd matmuls of a forward pass
//!   that drifts far enough from the float reference to flip near-tied greedy choices
//!   (docs/MEASUREMENTS.md). Here activations are quantized to 16 bits per value with
//!   one scale per weight block (error about 1/65000 of the block's largest value, below
//!   f32 rounding of a 32-term sum in practice), and the model agrees with the reference
//!   at every position.
//! - Dequantizing every weight to f32 in registers (the previous kernel) spent about 30
//!   instructions per 32 weights per token; batch-1 decode was bound by that, not by
//!   memory.
//!
//! The layout, built once when the weights load: rows are interleaved in groups of 16,
//! so that one 512-bit register holds the same two weights of 16 rows. One `vpdpwssd`
//! (AVX-512 VNNI) multiplies those 16x2 weights with a pair of activations broadcast
//! straight from memory and accumulates into 16 per-row sums, so the per-block scales of
//! 16 rows are one vector (`vcvtph2ps`) and applying them is one fused multiply-add per
//! block per token. Each block is unpacked once and used for up to [`TOKEN_TILE`] tokens;
//! per token a 32-weight block of 16 rows is then 16 `vpdpwssd` and a handful of scale
//! instructions.
//! 4-bit formats stay 4 bits in memory (nibbles) and 5- to 8-bit formats become one byte
//! per weight, so batch-1 decode reads about as many bytes as the GGUF holds.
//!
//! Every format is brought to one form, `w = d * q + m` per block of 16 or 32 weights:
//! Q4_0 (`m = -8d`), Q4_1, Q4_K (sub-block scales folded into `d` and `m`), Q5_0, Q5_1,
//! Q5_K, Q6_K (16-weight sub-blocks), Q8_0. Scales stay f16 for the 32-wide formats (as
//! stored) and are f32 for k-quants (`d * sub_scale`, exact), so the weights are exactly
//! the GGUF's.
//!
//! The AVX-512 kernels come with and without VNNI; other CPUs run a portable form of the
//! same arithmetic (compiled for AVX2+FMA and baseline, chosen at run time). Integer sums
//! are exact, so the forms agree to float rounding.

use std::cell::Cell;
use std::sync::OnceLock;

use candle_core::quantized::{GgmlDType, QTensor};

use rayon::prelude::*;

use super::vmath::fold16;
use crate::error::{Error, Result};

/// Rows interleaved together: one 512-bit register of f32 per-row sums.
const GROUP: usize = 16;
/// Tokens whose accumulators live in registers at once.
const TOKEN_TILE: usize = 8;
/// Tokens whose quantized activations are walked by one task before moving on, so they
/// stay in cache while the task's row groups pass over them.
const TOKEN_CHUNK: usize = 64;
/// How far ahead in a task's weights the kernels prefetch, in bytes.
const PREFETCH_AHEAD: usize = 2048;

/// How a packed block stores its integer weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Storage {
    /// 4-bit unsigned (0..=15); always 32-wide blocks with a minimum.
    Nibbles,
    /// 8-bit signed.
    Bytes,
}

/// A `[rows, cols]` weight matrix in a GGUF quantized format, multiplied as `x W^T`.
#[derive(Debug, Clone)]
pub struct PackedQuantMatrix {
    storage: Storage,
    /// Weights per block (one scale, one minimum): 16 or 32.
    block: usize,
    rows: usize,
    cols: usize,
    /// `[group][block][weights of 16 rows]`, see [`pack_group_block`].
    weights: Vec<u8>,
    /// `[group][block][16]`.
    scales: Scales,
    /// `[group][block][16]`, for formats with an additive term.
    mins: Option<Scales>,
}

/// Per-row block scales (`[group][block][16 rows]`, flat index `i`), kept as compact as
/// the GGUF keeps them, since batch-1 decode reads them with the weights: f16 for the
/// 32-wide formats (as stored), and for k-quants the same two factors as the file, a
/// small integer per block times an f32 per 256-wide super-block (`d * sub_scale`; the
/// product is exact in f32). Either way the weights are exactly the GGUF's.
#[derive(Debug, Clone)]
enum Scales {
    F16(Vec<u16>),
    Factored {
        /// Per block and row.
        sub: Vec<i8>,
        /// Per super-block and row: `[group][super-block][16 rows]`.
        outer: Vec<f32>,
        /// Blocks per super-block.
        per_outer: usize,
    },
}

impl Scales {
    fn f16(len: usize) -> Self {
        Scales::F16(vec![0; len])
    }

    fn factored(len: usize, per_outer: usize) -> Self {
        Scales::Factored {
            sub: vec![0; len],
            outer: vec![0.0; len / per_outer],
            per_outer,
        }
    }

    /// Where the outer factor of entry `i` is.
    fn outer_index(i: usize, per_outer: usize) -> usize {
        (i / GROUP / per_outer) * GROUP + i % GROUP
    }

    fn set_f16(&mut self, i: usize, v: f32) {
        if let Scales::F16(s) = self {
            s[i] = half::f16::from_f32(v).to_bits();
        }
    }

    fn set_factored(&mut self, i: usize, sub_factor: i8, outer_factor: f32) {
        if let Scales::Factored {
            sub,
            outer,
            per_outer,
        } = self
        {
            sub[i] = sub_factor;
            outer[Self::outer_index(i, *per_outer)] = outer_factor;
        }
    }

    fn get(&self, i: usize) -> f32 {
        match self {
            Scales::F16(s) => half::f16::from_bits(s[i]).to_f32(),
            Scales::Factored {
                sub,
                outer,
                per_outer,
            } => sub[i] as f32 * outer[Self::outer_index(i, *per_outer)],
        }
    }

    fn len(&self) -> usize {
        match self {
            Scales::F16(s) => s.len(),
            Scales::Factored { sub, .. } => sub.len(),
        }
    }
}

/// One row of a GGUF matrix brought to `w = d * q + m` per block.
struct DecodedRow {
    q: Vec<i8>,
    d: Vec<f32>,
    m: Vec<f32>,
    /// k-quants: `d[b] = d_sub[b] * d_outer[b / per_outer]`, and likewise `m`.
    factors: Option<KFactors>,
}

#[derive(Default, Clone)]
struct KFactors {
    d_sub: Vec<i8>,
    d_outer: Vec<f32>,
    m_sub: Vec<i8>,
    m_outer: Vec<f32>,
}

/// The source formats handled here, with their packed form.
#[derive(Debug, Clone, Copy)]
struct Source {
    dtype: GgmlDType,
    /// Weights and bytes per GGUF block.
    elems: usize,
    bytes: usize,
    storage: Storage,
    block: usize,
    has_min: bool,
}

fn source(dtype: GgmlDType) -> Option<Source> {
    use GgmlDType::*;
    let s = |elems, bytes, storage, block, has_min| Source {
        dtype,
        elems,
        bytes,
        storage,
        block,
        has_min,
    };
    Some(match dtype {
        Q4_0 => s(32, 18, Storage::Nibbles, 32, true),
        Q4_1 => s(32, 20, Storage::Nibbles, 32, true),
        Q4K => s(256, 144, Storage::Nibbles, 32, true),
        Q5_0 => s(32, 22, Storage::Bytes, 32, false),
        Q5_1 => s(32, 24, Storage::Bytes, 32, true),
        Q5K => s(256, 176, Storage::Bytes, 32, true),
        Q6K => s(256, 210, Storage::Bytes, 16, false),
        Q8_0 => s(32, 34, Storage::Bytes, 32, false),
        _ => return None,
    })
}

#[inline(always)]
fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// ggml's packing of the 8 six-bit (scale, min) pairs of a k-quant super-block.
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Integer weights and per-block scales of one GGUF row (the same arithmetic as ggml's
/// `dequantize_row_*`, stopping before the multiplication).
fn decode_row(src: &Source, row: &[u8], cols: usize) -> DecodedRow {
    let blocks = cols / src.block;
    let mut out = DecodedRow {
        q: vec![0; cols],
        d: vec![0.0; blocks],
        m: vec![0.0; blocks],
        factors: (src.elems == 256).then(KFactors::default),
    };
    for (i, b) in row.chunks_exact(src.bytes).enumerate() {
        let q = &mut out.q[i * src.elems..(i + 1) * src.elems];
        let sub = i * src.elems / src.block;
        let (d, m) = (&mut out.d[sub..], &mut out.m[sub..]);
        match src.dtype {
            GgmlDType::Q4_0 | GgmlDType::Q4_1 => {
                let (scale, min, qs) = if src.dtype == GgmlDType::Q4_0 {
                    (f16_at(b, 0), -8.0 * f16_at(b, 0), &b[2..18])
                } else {
                    (f16_at(b, 0), f16_at(b, 2), &b[4..20])
                };
                for j in 0..16 {
                    q[j] = (qs[j] & 0x0F) as i8;
                    q[j + 16] = (qs[j] >> 4) as i8;
                }
                (d[0], m[0]) = (scale, min);
            }
            GgmlDType::Q5_0 | GgmlDType::Q5_1 => {
                let (scale, min, qh, qs) = if src.dtype == GgmlDType::Q5_0 {
                    (f16_at(b, 0), 0.0, &b[2..6], &b[6..22])
                } else {
                    (f16_at(b, 0), f16_at(b, 2), &b[4..8], &b[8..24])
                };
                let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
                // Q5_0 stores q + 16; folding the offset into q keeps it in i8 range.
                let offset = if src.dtype == GgmlDType::Q5_0 { 16 } else { 0 };
                for j in 0..16 {
                    let h0 = ((qh >> j) & 1) as u8;
                    let h1 = ((qh >> (j + 16)) & 1) as u8;
                    q[j] = ((qs[j] & 0x0F) | (h0 << 4)) as i8 - offset;
                    q[j + 16] = ((qs[j] >> 4) | (h1 << 4)) as i8 - offset;
                }
                (d[0], m[0]) = (scale, min);
            }
            GgmlDType::Q8_0 => {
                for j in 0..32 {
                    q[j] = b[2 + j] as i8;
                }
                d[0] = f16_at(b, 0);
            }
            GgmlDType::Q4K | GgmlDType::Q5K => {
                let (scale, dmin, sc) = (f16_at(b, 0), f16_at(b, 2), &b[4..16]);
                let f = out.factors.as_mut().expect("k-quant");
                f.d_outer.push(scale);
                f.m_outer.push(-dmin);
                let (qh, qs) = if src.dtype == GgmlDType::Q5K {
                    (Some(&b[16..48]), &b[48..176])
                } else {
                    (None, &b[16..144])
                };
                for j in 0..4 {
                    let qs = &qs[j * 32..(j + 1) * 32];
                    for half in 0..2 {
                        let s = 2 * j + half;
                        let (sc, mn) = scale_min_k4(s, sc);
                        (d[s], m[s]) = (scale * sc as f32, -dmin * mn as f32);
                        f.d_sub.push(sc as i8);
                        f.m_sub.push(mn as i8);
                        for l in 0..32 {
                            let low = if half == 0 { qs[l] & 0x0F } else { qs[l] >> 4 };
                            let high = qh.map_or(0, |qh| ((qh[l] >> s) & 1) << 4);
                            q[s * 32 + l] = (low | high) as i8;
                        }
                    }
                }
            }
            GgmlDType::Q6K => {
                let (ql, qh, sc, scale) = (&b[0..128], &b[128..192], &b[192..208], f16_at(b, 208));
                for n in 0..2 {
                    let (ql, qh) = (&ql[64 * n..], &qh[32 * n..]);
                    let q = &mut q[128 * n..];
                    for l in 0..32 {
                        q[l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
                        q[l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                        q[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                        q[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                    }
                }
                let f = out.factors.as_mut().expect("k-quant");
                f.d_outer.push(scale);
                for s in 0..16 {
                    d[s] = scale * sc[s] as i8 as f32;
                    f.d_sub.push(sc[s] as i8);
                }
            }
            other => unreachable!("no decoder for {other:?}"),
        }
    }
    out
}

/// Bytes of one packed `[16 rows, block]` tile.
const fn group_block_bytes(storage: Storage, block: usize) -> usize {
    match storage {
        Storage::Nibbles => GROUP * block / 2,
        Storage::Bytes => GROUP * block,
    }
}

/// Lays out one block of 16 rows (`q[r]` is row `r`'s block) so that each 32-byte chunk
/// widens (`vpmovzxbw`/`vpmovsxbw`) into 32 16-bit lanes holding, for every row `r`, the
/// pair of weights `(2c, 2c+1)` in lanes `2r, 2r+1`:
/// - bytes: chunk `c` (of `block / 2`) is that pair of every row;
/// - nibbles: chunk `c` (of 8) holds pair `c` in the low nibbles and pair `c + 8` (weights
///   `2c + 16, 2c + 17`) in the high nibbles.
fn pack_group_block(storage: Storage, block: usize, q: &[&[i8]; GROUP], out: &mut [u8]) {
    match storage {
        Storage::Bytes => {
            for c in 0..block / 2 {
                for r in 0..GROUP {
                    for e in 0..2 {
                        out[c * 32 + 2 * r + e] = q[r][2 * c + e] as u8;
                    }
                }
            }
        }
        Storage::Nibbles => {
            for c in 0..8 {
                for r in 0..GROUP {
                    for e in 0..2 {
                        let (lo, hi) = (q[r][2 * c + e] as u8, q[r][2 * c + e + 16] as u8);
                        out[c * 32 + 2 * r + e] = lo | (hi << 4);
                    }
                }
            }
        }
    }
}

impl PackedQuantMatrix {
    /// The packed matrix for `q` when its format has a kernel here. A stacked
    /// `[experts, out, in]` tensor becomes one matrix of `experts * out` rows.
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        let Some(src) = source(q.dtype()) else {
            return Ok(None);
        };
        let dims = q.shape().dims();
        if dims.len() < 2 {
            return Ok(None);
        }
        let (&cols, lead) = dims.split_last().expect("two or more dimensions");
        let rows: usize = lead.iter().product();
        if cols % src.elems != 0 || !q.device().is_cpu() {
            return Ok(None);
        }
        let data = q.data()?;
        let row_bytes = cols / src.elems * src.bytes;
        if data.len() != rows * row_bytes {
            return Err(Error::InvalidBatch(format!(
                "quantized matrix [{rows}, {cols}] holds {} bytes",
                data.len()
            )));
        }
        let groups = rows.div_ceil(GROUP);
        let blocks = cols / src.block;
        let gbb = group_block_bytes(src.storage, src.block);
        let mut weights = vec![0u8; groups * blocks * gbb];
        crate::backend::cpu::host::advise_huge_pages(&mut weights);
        let per_outer = src.elems / src.block;
        let new_scales = || {
            if src.elems == 32 {
                Scales::f16(groups * blocks * GROUP)
            } else {
                Scales::factored(groups * blocks * GROUP, per_outer)
            }
        };
        let mut scales = new_scales();
        let mut mins = src.has_min.then(new_scales);
        let zero = DecodedRow {
            q: vec![0; cols],
            d: vec![0.0; blocks],
            m: vec![0.0; blocks],
            factors: (src.elems == 256).then(|| KFactors {
                d_sub: vec![0; blocks],
                d_outer: vec![0.0; blocks / per_outer],
                m_sub: vec![0; blocks],
                m_outer: vec![0.0; blocks / per_outer],
            }),
        };
        for g in 0..groups {
            // Rows past the end pad the last group with zeros.
            let decoded: Vec<DecodedRow> = (0..GROUP)
                .map(|r| {
                    let row = g * GROUP + r;
                    if row < rows {
                        decode_row(&src, &data[row * row_bytes..(row + 1) * row_bytes], cols)
                    } else {
                        DecodedRow {
                            q: zero.q.clone(),
                            d: zero.d.clone(),
                            m: zero.m.clone(),
                            factors: zero.factors.clone(),
                        }
                    }
                })
                .collect();
            for b in 0..blocks {
                let at = g * blocks + b;
                let q: [&[i8]; GROUP] =
                    std::array::from_fn(|r| &decoded[r].q[b * src.block..(b + 1) * src.block]);
                pack_group_block(src.storage, src.block, &q, &mut weights[at * gbb..(at + 1) * gbb]);
                for (r, row) in decoded.iter().enumerate() {
                    let i = at * GROUP + r;
                    match &row.factors {
                        None => {
                            scales.set_f16(i, row.d[b]);
                            if let Some(mins) = mins.as_mut() {
                                mins.set_f16(i, row.m[b]);
                            }
                        }
                        Some(f) => {
                            scales.set_factored(i, f.d_sub[b], f.d_outer[b / per_outer]);
                            if let Some(mins) = mins.as_mut() {
                                mins.set_factored(i, f.m_sub[b], f.m_outer[b / per_outer]);
                            }
                        }
                    }
                }
            }
        }
        Ok(Some(Self {
            storage: src.storage,
            block: src.block,
            rows,
            cols,
            weights,
            scales,
            mins,
        }))
    }

    /// The row-wise concatenation of `parts` (projections of one input, multiplied at
    /// once), when they are packed alike and each fills whole row groups.
    pub fn concat(parts: &[&PackedQuantMatrix]) -> Option<Self> {
        let ranges: Vec<(&PackedQuantMatrix, std::ops::Range<usize>)> =
            parts.iter().map(|&m| (m, 0..m.rows)).collect();
        Self::concat_rows(&ranges)
    }

    /// Rows `range` of each of `parts`, one after another, when the parts are packed
    /// alike and every range is whole row groups: how the gate and up projections of each
    /// expert of a stacked pair come to sit side by side.
    pub fn concat_rows(parts: &[(&PackedQuantMatrix, std::ops::Range<usize>)]) -> Option<Self> {
        let (first, _) = parts.first()?;
        let alike = |(m, rows): &(&PackedQuantMatrix, std::ops::Range<usize>)| {
            m.storage == first.storage
                && m.block == first.block
                && m.cols == first.cols
                && rows.start.is_multiple_of(GROUP)
                && rows.len().is_multiple_of(GROUP)
                && rows.end <= m.rows
                && std::mem::discriminant(&m.scales) == std::mem::discriminant(&first.scales)
                && m.mins.is_some() == first.mins.is_some()
        };
        if !parts.iter().all(alike) {
            return None;
        }
        let blocks = first.blocks();
        let groups = |rows: &std::ops::Range<usize>| rows.start / GROUP..rows.end / GROUP;
        // Each array holds `per_group` values per row group, groups in order.
        fn cut<T: Copy>(v: &[T], per_group: usize, g: std::ops::Range<usize>, out: &mut Vec<T>) {
            out.extend_from_slice(&v[g.start * per_group..g.end * per_group]);
        }
        let cat = |get: &dyn Fn(&PackedQuantMatrix) -> &Scales| {
            let mut out = match get(first) {
                Scales::F16(_) => Scales::F16(Vec::new()),
                Scales::Factored { per_outer, .. } => Scales::Factored {
                    sub: Vec::new(),
                    outer: Vec::new(),
                    per_outer: *per_outer,
                },
            };
            for (m, rows) in parts {
                match (&mut out, get(m)) {
                    (Scales::F16(a), Scales::F16(b)) => cut(b, blocks * GROUP, groups(rows), a),
                    (
                        Scales::Factored {
                            sub,
                            outer,
                            per_outer,
                        },
                        Scales::Factored {
                            sub: sub_b,
                            outer: outer_b,
                            per_outer: per_outer_b,
                        },
                    ) if per_outer == per_outer_b => {
                        cut(sub_b, blocks * GROUP, groups(rows), sub);
                        cut(outer_b, blocks / *per_outer * GROUP, groups(rows), outer);
                    }
                    _ => return None,
                }
            }
            Some(out)
        };
        let gbb = group_block_bytes(first.storage, first.block);
        let rows: usize = parts.iter().map(|(_, r)| r.len()).sum();
        let len = rows / GROUP * blocks * gbb;
        let mut weights = Vec::with_capacity(len);
        crate::backend::cpu::host::advise_huge_pages(&mut weights.spare_capacity_mut()[..len]);
        for (m, r) in parts {
            cut(&m.weights, blocks * gbb, groups(r), &mut weights);
        }
        Some(Self {
            storage: first.storage,
            block: first.block,
            rows,
            cols: first.cols,
            weights,
            scales: cat(&|m| &m.scales)?,
            mins: match first.mins {
                Some(_) => Some(cat(&|m| m.mins.as_ref().expect("checked alike"))?),
                None => None,
            },
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    fn blocks(&self) -> usize {
        self.cols / self.block
    }

    /// `x`: `[tokens, cols]` -> `[tokens, rows]`, in f32.
    pub fn matmul(&self, x: &[f32]) -> Result<Vec<f32>> {
        self.matmul_rows(x, 0..self.rows)
    }

    /// `x` (`[tokens, cols]`) times rows `rows` of the weights: `[tokens, rows.len()]`, in
    /// f32. The range starts on a row group (a multiple of 16) and ends on one or at the
    /// last row: one expert of a stacked matrix.
    pub fn matmul_rows(&self, x: &[f32], rows: std::ops::Range<usize>) -> Result<Vec<f32>> {
        let k = self.cols;
        if !x.len().is_multiple_of(k) {
            return Err(Error::InvalidBatch(format!(
                "matmul input of {} values is not rows of the weight's {k} features",
                x.len()
            )));
        }
        if !rows.start.is_multiple_of(GROUP)
            || !(rows.end.is_multiple_of(GROUP) || rows.end == self.rows)
            || rows.start > rows.end
            || rows.end > self.rows
        {
            return Err(Error::InvalidBatch(format!(
                "rows {rows:?} of a packed matrix of {} rows are not whole row groups",
                self.rows
            )));
        }
        let t = x.len() / k;
        let acts = Activations::quantize(x, t, k, self.block);
        let n = t * rows.len();
        let mut out: Vec<f32> = Vec::with_capacity(n);
        let target = Target {
            ptr: out.as_mut_ptr(),
            stride: rows.len(),
            first_group: rows.start / GROUP,
        };
        // SAFETY: `out` has room for `[t, rows.len()]`, and the kernels write every
        // element of it (each task all tokens of its row groups; the groups cover the
        // rows), so nothing is read uninitialised; no zeroing pass over the output first.
        unsafe {
            self.matmul_into(&acts, target, rows.start / GROUP..rows.end.div_ceil(GROUP));
            out.set_len(n);
        }
        Ok(out)
    }

    /// `out` = activations x W^T over row groups `groups`, spread over rayon's pool.
    ///
    /// # Safety
    /// `out` is valid for writes of `[acts.tokens, stride]` f32 covering `groups`.
    unsafe fn matmul_into(&self, acts: &Activations, out: Target, groups: std::ops::Range<usize>) {
        let kernel = kernel();
        let n = groups.len();
        // A few tasks per thread: enough to balance, few enough that scheduling them costs
        // little next to the work (a decode step makes ~200 of these calls). With many
        // tokens a single row group is work enough for a task (a 16x1536 group against
        // 64 tokens is 1.5 M multiply-adds), and finer tasks balance better: 36 groups in
        // tasks of 5 would split 20:16 between two threads.
        let per_task = if acts.tokens >= TOKEN_TILE {
            1
        } else {
            n.div_ceil(4 * rayon::current_num_threads()).max(1)
        };
        (0..n.div_ceil(per_task)).into_par_iter().for_each(|task| {
            let gs = groups.start + task * per_task..groups.start + ((task + 1) * per_task).min(n);
            for t0 in (0..acts.tokens).step_by(TOKEN_CHUNK) {
                let tokens = t0..(t0 + TOKEN_CHUNK).min(acts.tokens);
                for g in gs.clone() {
                    // SAFETY: each task writes only the columns of its own row groups.
                    unsafe { kernel(self, g, acts, tokens.clone(), out) };
                }
            }
        });
    }
}

/// Activations quantized to 16 bits per value, one scale per weight block. The buffers
/// may be longer than `tokens` rows (reused from an earlier matmul); only the first
/// `tokens` rows are meaningful.
struct Activations {
    tokens: usize,
    cols: usize,
    /// `[tokens, cols]`
    q: Vec<i16>,
    /// `[tokens, blocks]`: value = q * scale.
    scale: Vec<f32>,
    /// `[tokens, blocks]`: the block's exact f32 sum, for the minimum term.
    sum: Vec<f32>,
}

impl Activations {
    fn quantize(x: &[f32], tokens: usize, cols: usize, block: usize) -> Self {
        let blocks = cols / block;
        // This thread's buffers from its last matmul, when it has them: every value is
        // overwritten below, so there is no zeroing pass.
        let (mut q, mut scale, mut sum) = SPARE_ACTIVATIONS.take().unwrap_or_default();
        let (values, scales) = (tokens * cols, tokens * blocks);
        for (v, n) in [(&mut scale, scales), (&mut sum, scales)] {
            if v.len() < n {
                v.resize(n, 0.0);
            }
        }
        if q.len() < values {
            q.resize(values, 0);
        }
        let mut a = Activations {
            tokens,
            cols,
            q,
            scale,
            sum,
        };
        let (q, scale, sum) = (&mut a.q[..values], &mut a.scale[..scales], &mut a.sum[..scales]);
        // Row by row: the vector quantizer takes 16 blocks at a time and leaves the rest
        // to the scalar one, whose block sums add in another order, so a span running
        // across rows would make a token's activations depend on the tokens beside it
        // (speculative decoding needs a token's logits the same in any batch, bit for bit).
        let rows = |(x, (q, (scale, sum))): TokenRows| {
            let per_row = x.chunks(cols).zip(q.chunks_mut(cols));
            for ((x, q), (scale, sum)) in per_row.zip(scale.chunks_mut(blocks).zip(sum.chunks_mut(blocks))) {
                #[cfg(target_arch = "x86_64")]
                if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
                    // SAFETY: the CPU has the features.
                    unsafe { quantize_avx512(x, q, scale, sum, block) };
                    continue;
                }
                quantize_blocks(x, q, scale, sum, block)
            }
        };
        // Token rows in parallel when there are many (a prompt chunk, a large decode
        // batch); a matmul's quantization is otherwise a serial stretch before it.
        let per_task = 4;
        if tokens >= 2 * per_task {
            x.par_chunks(per_task * cols)
                .zip(
                    q.par_chunks_mut(per_task * cols).zip(
                        scale
                            .par_chunks_mut(per_task * blocks)
                            .zip(sum.par_chunks_mut(per_task * blocks)),
                    ),
                )
                .for_each(rows);
        } else {
            rows((x, (q, (scale, sum))));
        }
        a
    }
}

/// An [`Activations`]' values, scales and sums.
type ActivationBuffers = (Vec<i16>, Vec<f32>, Vec<f32>);

thread_local! {
    /// The buffers of the last [`Activations`] dropped on this thread, for the next one
    /// to reuse.
    static SPARE_ACTIVATIONS: Cell<Option<ActivationBuffers>> = const { Cell::new(None) };
}

impl Drop for Activations {
    fn drop(&mut self) {
        // A long prompt's buffers are not worth keeping for every pool thread's lifetime.
        const KEEP: usize = 1 << 22;
        if self.q.len() > KEEP {
            return;
        }
        let bufs = (
            std::mem::take(&mut self.q),
            std::mem::take(&mut self.scale),
            std::mem::take(&mut self.sum),
        );
        SPARE_ACTIVATIONS.set(Some(bufs));
    }
}

/// Some token rows of the input and of [`Activations`]' values, scales and sums.
type TokenRows<'a> = (&'a [f32], (&'a mut [i16], (&'a mut [f32], &'a mut [f32])));

/// [`quantize_blocks`] for AVX-512, 16 blocks at a time when blocks are 16 or 32 wide
/// (every packed format): the maxima and sums of 16 blocks come out of one transposing
/// reduction ([`fold_each16`](crate::vmath::avx512::fold_each16)) instead of two
/// horizontal reductions per block, which made this a tenth of a decode step with
/// 16-wide blocks. Values, scales and rounding are those of [`quantize_blocks`]; only
/// the sums add in another order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
unsafe fn quantize_avx512(x: &[f32], q: &mut [i16], scale: &mut [f32], sum: &mut [f32], block: usize) {
    use crate::backend::cpu::vmath::avx512::{fold_each16, Add, Max};
    use std::arch::x86_64::*;
    let span = 16 * block;
    let whole = if block == 16 || block == 32 {
        x.len() / span * span
    } else {
        0
    };
    assert!(q.len() >= x.len() && scale.len() >= x.len() / block && sum.len() >= x.len() / block);
    let vectors = block / 16;
    for g in 0..whole / span {
        let base = g * span;
        // SAFETY (loads and stores): `base + span <= whole <= x.len() <= q.len()`, and
        // the 16 scales and sums of this span are inside `scale` and `sum` (assert).
        let (mut maxes, mut sums) = ([_mm512_setzero_ps(); 16], [_mm512_setzero_ps(); 16]);
        for b in 0..16 {
            let p = unsafe { x.as_ptr().add(base + b * block) };
            let v0 = unsafe { _mm512_loadu_ps(p) };
            let (mut m, mut s) = (_mm512_abs_ps(v0), v0);
            if vectors == 2 {
                let v1 = unsafe { _mm512_loadu_ps(p.add(16)) };
                m = _mm512_max_ps(m, _mm512_abs_ps(v1));
                s = _mm512_add_ps(s, v1);
            }
            maxes[b] = m;
            sums[b] = s;
        }
        let amax = fold_each16::<Max>(&maxes);
        let sc = _mm512_div_ps(amax, _mm512_set1_ps(i16::MAX as f32));
        let nonzero = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(sc, _mm512_setzero_ps());
        let inv = _mm512_maskz_div_ps(nonzero, _mm512_set1_ps(1.0), sc);
        let first = base / block;
        unsafe {
            _mm512_storeu_ps(scale.as_mut_ptr().add(first), sc);
            _mm512_storeu_ps(sum.as_mut_ptr().add(first), fold_each16::<Add>(&sums));
        }
        let mut invs = [0f32; 16];
        unsafe { _mm512_storeu_ps(invs.as_mut_ptr(), inv) };
        for (b, &iv) in invs.iter().enumerate() {
            let iv = _mm512_set1_ps(iv);
            for v in 0..vectors {
                let at = base + b * block + 16 * v;
                unsafe {
                    // Round to nearest even (the default rounding mode), as the scalar
                    // form; |value * inv| <= 32767, so narrowing to 16 bits is exact.
                    let r = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x.as_ptr().add(at)), iv));
                    _mm256_storeu_si256(q.as_mut_ptr().add(at) as *mut __m256i, _mm512_cvtepi32_epi16(r));
                }
            }
        }
    }
    let done = whole / block;
    quantize_blocks(
        &x[whole..],
        &mut q[whole..],
        &mut scale[done..],
        &mut sum[done..],
        block,
    )
}

/// Each block of `block` values becomes 16-bit integers with one scale (`x ~ q * scale`)
/// and its f32 sum.
#[inline(always)]
fn quantize_blocks(x: &[f32], q: &mut [i16], scale: &mut [f32], sum: &mut [f32], block: usize) {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    for (i, (xb, qb)) in x.chunks_exact(block).zip(q.chunks_exact_mut(block)).enumerate() {
        let amax = fold16(xb, 0.0, f32::abs, f32::max);
        let s = amax / i16::MAX as f32;
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        for (q, v) in qb.iter_mut().zip(xb) {
            // Round to nearest even by adding 1.5 * 2^23, and read the integer from the
            // mantissa bits (|v * inv| <= 32767): vectorises, where `round_ties_even`
            // is a libm call and `as i16` a saturating conversion per value.
            *q = (v * inv + MAGIC).to_bits().wrapping_sub(MAGIC.to_bits()) as i16;
        }
        scale[i] = s;
        sum[i] = fold16(xb, 0.0, |v| v, |a, b| a + b);
    }
}

/// Writes row group `g`'s 16 columns of `out` for the tokens in `tokens`.
type GroupKernel = unsafe fn(&PackedQuantMatrix, usize, &Activations, std::ops::Range<usize>, Target);

/// Where a matmul's output goes: `[tokens, stride]` f32 at `ptr`, whose column 0 is row
/// `16 * first_group` of the weights (a whole matrix, or the row groups of one expert of a
/// stacked one). A raw pointer because tasks share the output, each writing its own
/// columns.
#[derive(Clone, Copy)]
struct Target {
    ptr: *mut f32,
    stride: usize,
    first_group: usize,
}

impl Target {
    /// Where token `t`'s outputs of row group `g` start.
    ///
    /// # Safety
    /// `t` is a token of the output and `g` one of its row groups.
    #[inline(always)]
    unsafe fn at(self, t: usize, g: usize) -> *mut f32 {
        // SAFETY: by the caller's contract the offset is inside the output.
        unsafe { self.ptr.add(t * self.stride + (g - self.first_group) * GROUP) }
    }
}

// SAFETY: tasks write disjoint columns of the output (see `matmul_into`).
unsafe impl Sync for Target {}
unsafe impl Send for Target {}

fn kernel() -> GroupKernel {
    static KERNEL: OnceLock<GroupKernel> = OnceLock::new();
    *KERNEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("f16c") && has!("fma") {
                if std::arch::is_x86_feature_detected!("avx512vnni") {
                    return avx512::group_vnni;
                }
                return avx512::group_bw;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return group_avx2;
            }
        }
        group_portable
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_avx2(
    m: &PackedQuantMatrix,
    g: usize,
    a: &Activations,
    ts: std::ops::Range<usize>,
    out: Target,
) {
    // SAFETY: forwarded from the caller.
    unsafe { group_impl(m, g, a, ts, out) }
}

unsafe fn group_portable(
    m: &PackedQuantMatrix,
    g: usize,
    a: &Activations,
    ts: std::ops::Range<usize>,
    out: Target,
) {
    // SAFETY: forwarded from the caller.
    unsafe { group_impl(m, g, a, ts, out) }
}

/// The portable form: unpack the 16 rows of a block to i16, exact integer dot products,
/// then the same scaling as the vector kernels.
#[inline(always)]
unsafe fn group_impl(
    m: &PackedQuantMatrix,
    g: usize,
    a: &Activations,
    ts: std::ops::Range<usize>,
    out: Target,
) {
    let (blocks, bs) = (m.blocks(), m.block);
    let gbb = group_block_bytes(m.storage, bs);
    let valid = GROUP.min(m.rows - g * GROUP);
    let mut w = [[0i16; 32]; GROUP];
    let mut acc = vec![[0f32; GROUP]; ts.len()];
    for b in 0..blocks {
        let at = g * blocks + b;
        let packed = &m.weights[at * gbb..(at + 1) * gbb];
        for r in 0..GROUP {
            for c in 0..bs / 2 {
                for e in 0..2 {
                    w[r][2 * c + e] = match m.storage {
                        Storage::Bytes => packed[c * 32 + 2 * r + e] as i8 as i16,
                        Storage::Nibbles => {
                            let byte = packed[(c % 8) * 32 + 2 * r + e];
                            (if c < 8 { byte & 0x0F } else { byte >> 4 }) as i16
                        }
                    };
                }
            }
        }
        for (ti, t) in ts.clone().enumerate() {
            let x = &a.q[t * a.cols + b * bs..][..bs];
            let (xs, xsum) = (a.scale[t * blocks + b], a.sum[t * blocks + b]);
            for r in 0..GROUP {
                let dot: i32 = w[r][..bs].iter().zip(x).map(|(&w, &x)| w as i32 * x as i32).sum();
                acc[ti][r] += dot as f32 * (m.scales.get(at * GROUP + r) * xs);
                if let Some(mins) = &m.mins {
                    acc[ti][r] += mins.get(at * GROUP + r) * xsum;
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

/// The AVX-512 kernels, with (`vpdpwssd`) and without (`vpmaddwd` + `vpaddd`) VNNI.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{
        group_block_bytes, Activations, PackedQuantMatrix, Scales, Storage, Target, GROUP, PREFETCH_AHEAD,
        TOKEN_TILE,
    };

    /// 16 lanes of `acc + w.lo * x.lo + w.hi * x.hi` over 16-bit pairs, `x` the pair of
    /// activations at `p` broadcast to every lane: one `vpdpwssd` with its broadcast
    /// folded into the memory operand. (The intrinsic, given a broadcast register,
    /// compiles to a separate broadcast, or to `vpmaddwd` + `vpaddd`: three instructions
    /// where one does.)
    ///
    /// # Safety
    /// `p..p + 2` is readable.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn dot_vnni(acc: __m512i, w: __m512i, p: *const i16) -> __m512i {
        let mut acc = acc;
        // SAFETY: reads 4 bytes at `p`, readable by the caller's contract.
        unsafe {
            std::arch::asm!(
                "vpdpwssd {acc}, {w}, dword ptr [{p}]{{1to16}}",
                acc = inout(zmm_reg) acc,
                w = in(zmm_reg) w,
                p = in(reg) p,
                options(pure, readonly, nostack, preserves_flags),
            )
        };
        acc
    }

    /// [`dot_vnni`] for CPUs without VNNI.
    ///
    /// # Safety
    /// As [`dot_vnni`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn dot_bw(acc: __m512i, w: __m512i, p: *const i16) -> __m512i {
        // SAFETY: by the caller's contract.
        let x = _mm512_set1_epi32(unsafe { (p as *const i32).read_unaligned() });
        _mm512_add_epi32(acc, _mm512_madd_epi16(w, x))
    }

    /// What a packed matrix's blocks look like, as constants, so that each layout gets
    /// its own kernel: block loops fully unrolled, no per-block branch on the format, and
    /// pointers stepped rather than indices bounds-checked per block and token (with one
    /// or two tokens per call, as in batch-1 decode and most experts of a MoE layer, that
    /// scalar work had been a large share of the kernel's instructions).
    pub(super) trait Layout {
        const NIBBLES: bool;
        const BLOCK: usize;
        /// k-quant scales (`i8` per block times `f32` per 256-wide super-block) rather
        /// than f16 per block.
        const FACTORED: bool;
        const MIN: bool;
        /// Bytes of one packed block of 16 rows.
        const BYTES: usize = group_block_bytes(
            if Self::NIBBLES {
                Storage::Nibbles
            } else {
                Storage::Bytes
            },
            Self::BLOCK,
        );
        /// Blocks per super-block, for factored scales.
        const PER_OUTER: usize = 256 / Self::BLOCK;
    }

    macro_rules! layouts {
        ($($name:ident: $nibbles:literal, $block:literal, $factored:literal, $min:literal;)*) => {
            $(
                pub(super) struct $name;
                impl Layout for $name {
                    const NIBBLES: bool = $nibbles;
                    const BLOCK: usize = $block;
                    const FACTORED: bool = $factored;
                    const MIN: bool = $min;
                }
            )*
        };
    }

    layouts! {
        Nib32F16Min: true, 32, false, true;     // Q4_0, Q4_1
        Nib32FactMin: true, 32, true, true;     // Q4_K
        Byte32F16: false, 32, false, false;     // Q5_0, Q8_0
        Byte32F16Min: false, 32, false, true;   // Q5_1
        Byte32FactMin: false, 32, true, true;   // Q5_K
        Byte16Fact: false, 16, true, false;     // Q6_K
    }

    /// Per-block scales of a group, read block after block.
    #[derive(Clone, Copy)]
    struct ScaleCursor {
        /// f16 scales, or the `i8` factors of k-quants: 16 per block.
        sub: *const u8,
        /// k-quants: 16 `f32` per super-block.
        outer: *const f32,
    }

    impl ScaleCursor {
        /// The cursor at group `g`'s first block.
        ///
        /// # Safety
        /// The scales have `(g + 1) * blocks * 16` entries, in `L`'s form.
        #[inline(always)]
        unsafe fn at<L: Layout>(s: &Scales, g: usize, blocks: usize) -> Self {
            let i = g * blocks * GROUP;
            // SAFETY: inside the scales by the caller's contract.
            unsafe {
                match s {
                    Scales::F16(v) => ScaleCursor {
                        sub: v.as_ptr().add(i) as *const u8,
                        outer: std::ptr::null(),
                    },
                    Scales::Factored { sub, outer, .. } => ScaleCursor {
                        sub: sub.as_ptr().add(i) as *const u8,
                        outer: outer.as_ptr().add(i / L::PER_OUTER),
                    },
                }
            }
        }

        /// Block `b`'s 16 scales as f32.
        ///
        /// # Safety
        /// Block `b` is one of the group's.
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load<L: Layout>(self, b: usize) -> __m512 {
            // SAFETY: inside the group's scales by the caller's contract.
            unsafe {
                if L::FACTORED {
                    _mm512_mul_ps(
                        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                            self.sub.add(b * GROUP) as *const __m128i
                        ))),
                        _mm512_loadu_ps(self.outer.add(b / L::PER_OUTER * GROUP)),
                    )
                } else {
                    _mm512_cvtph_ps(_mm256_loadu_si256(self.sub.add(2 * b * GROUP) as *const __m256i))
                }
            }
        }

        /// Hints block `b`'s scales (which may be past the end) into L1.
        #[inline(always)]
        fn prefetch<L: Layout>(self, b: usize) {
            let bytes = if L::FACTORED { 1 } else { 2 };
            // SAFETY: prefetching is a hint; it never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(self.sub.wrapping_add(bytes * b * GROUP) as *const i8) };
        }
    }

    macro_rules! group_kernel {
        ($name:ident, $run:ident, $tile:ident, $features:literal, $dot:ident) => {
            /// # Safety
            /// `out` is `[tokens, rows]` with every token of `ts` below `tokens`; the CPU
            /// has the enabled features.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name(
                m: &PackedQuantMatrix,
                g: usize,
                a: &Activations,
                ts: Range<usize>,
                out: Target,
            ) {
                let factored = matches!(m.scales, Scales::Factored { .. });
                // SAFETY (each arm): forwarded from the caller; the layout is `m`'s.
                unsafe {
                    match (m.storage, m.block, factored, m.mins.is_some()) {
                        (Storage::Nibbles, 32, false, true) => $run::<Nib32F16Min>(m, g, a, ts, out),
                        (Storage::Nibbles, 32, true, true) => $run::<Nib32FactMin>(m, g, a, ts, out),
                        (Storage::Bytes, 32, false, false) => $run::<Byte32F16>(m, g, a, ts, out),
                        (Storage::Bytes, 32, false, true) => $run::<Byte32F16Min>(m, g, a, ts, out),
                        (Storage::Bytes, 32, true, true) => $run::<Byte32FactMin>(m, g, a, ts, out),
                        (Storage::Bytes, 16, true, false) => $run::<Byte16Fact>(m, g, a, ts, out),
                        other => unreachable!("no packed layout {other:?}"),
                    }
                }
            }

            /// # Safety
            /// As the kernel's; `m` is in layout `L`.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn $run<L: Layout>(
                m: &PackedQuantMatrix,
                g: usize,
                a: &Activations,
                ts: Range<usize>,
                out: Target,
            ) {
                let mut t = ts.start;
                while t < ts.end {
                    let n = TOKEN_TILE.min(ts.end - t);
                    // SAFETY: forwarded from the caller.
                    unsafe {
                        match n {
                            8 => $tile::<8, L>(m, g, a, t, out),
                            7 => $tile::<7, L>(m, g, a, t, out),
                            6 => $tile::<6, L>(m, g, a, t, out),
                            5 => $tile::<5, L>(m, g, a, t, out),
                            4 => $tile::<4, L>(m, g, a, t, out),
                            3 => $tile::<3, L>(m, g, a, t, out),
                            2 => $tile::<2, L>(m, g, a, t, out),
                            _ => $tile::<1, L>(m, g, a, t, out),
                        }
                    }
                    t += n;
                }
            }

            /// `T` tokens from `t0` against row group `g`.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn $tile<const T: usize, L: Layout>(
                m: &PackedQuantMatrix,
                g: usize,
                a: &Activations,
                t0: usize,
                out: Target,
            ) {
                let blocks = m.blocks();
                let in_layout = |s: &Scales| match s {
                    Scales::F16(_) => !L::FACTORED,
                    Scales::Factored { per_outer, .. } => L::FACTORED && *per_outer == L::PER_OUTER,
                };
                let per_outer_ok = in_layout(&m.scales) && m.mins.as_ref().is_none_or(in_layout);
                assert!(
                    m.block == L::BLOCK
                        && per_outer_ok
                        && a.cols == m.cols
                        && m.weights.len() >= (g + 1) * blocks * L::BYTES
                        && m.scales.len() >= (g + 1) * blocks * GROUP
                        && m.mins.as_ref().is_some() == L::MIN
                        && m.mins.as_ref().is_none_or(|s| s.len() == m.scales.len())
                        && t0 + T <= a.tokens
                        && (t0 + T) * a.cols <= a.q.len()
                        && (t0 + T) * blocks <= a.scale.len()
                        && (t0 + T) * blocks <= a.sum.len()
                );
                // SAFETY (all pointer arithmetic and loads below): by the assert, group
                // `g`'s `blocks` blocks of weights, scales and minimums are in bounds, and
                // each token `t0 + t` has `cols = blocks * BLOCK` activations and `blocks`
                // scales and sums.
                let w0 = unsafe { m.weights.as_ptr().add(g * blocks * L::BYTES) };
                let scales = unsafe { ScaleCursor::at::<L>(&m.scales, g, blocks) };
                let mins = m
                    .mins
                    .as_ref()
                    .map(|s| unsafe { ScaleCursor::at::<L>(s, g, blocks) });
                let mut xq = [std::ptr::null::<i16>(); T];
                let mut xs = [std::ptr::null::<f32>(); T];
                let mut xsum = [std::ptr::null::<f32>(); T];
                for t in 0..T {
                    unsafe {
                        xq[t] = a.q.as_ptr().add((t0 + t) * a.cols);
                        xs[t] = a.scale.as_ptr().add((t0 + t) * blocks);
                        xsum[t] = a.sum.as_ptr().add((t0 + t) * blocks);
                    }
                }
                let mut acc = [_mm512_setzero_ps(); T];
                let low_nibbles = _mm512_set1_epi16(0x0F);
                for b in 0..blocks {
                    let w = unsafe { w0.add(b * L::BYTES) };
                    // Software prefetch a fixed distance ahead in the weights: a task
                    // streams one stretch of row groups, and the hardware prefetchers
                    // alone left batch-1 decode well short of the memory bandwidth.
                    for line in 0..L::BYTES / 64 {
                        _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(PREFETCH_AHEAD + 64 * line) as *const i8);
                    }
                    let ahead = b + PREFETCH_AHEAD / L::BYTES;
                    scales.prefetch::<L>(ahead);
                    if let Some(mins) = mins {
                        mins.prefetch::<L>(ahead);
                    }
                    // Two accumulators per token, so that with few tokens the dot
                    // products are not one serial chain of multiply-add latencies.
                    let mut sums = [[_mm512_setzero_si512(); 2]; T];
                    if L::NIBBLES {
                        for c in 0..8 {
                            let raw = unsafe {
                                _mm512_cvtepu8_epi16(_mm256_loadu_si256(w.add(c * 32) as *const __m256i))
                            };
                            let lo = _mm512_and_si512(raw, low_nibbles);
                            let hi = _mm512_srli_epi16::<4>(raw);
                            for t in 0..T {
                                let x = unsafe { xq[t].add(b * L::BLOCK) };
                                sums[t][0] = unsafe { $dot(sums[t][0], lo, x.add(2 * c)) };
                                sums[t][1] = unsafe { $dot(sums[t][1], hi, x.add(2 * c + 16)) };
                            }
                        }
                    } else {
                        // Chunks two at a time, one per accumulator (blocks are 16 or 32
                        // wide, so the chunk count is even).
                        for c in (0..L::BLOCK / 2).step_by(2) {
                            let (w0, w1) = unsafe {
                                (
                                    _mm512_cvtepi8_epi16(_mm256_loadu_si256(w.add(c * 32) as *const __m256i)),
                                    _mm512_cvtepi8_epi16(_mm256_loadu_si256(
                                        w.add(c * 32 + 32) as *const __m256i
                                    )),
                                )
                            };
                            for t in 0..T {
                                let x = unsafe { xq[t].add(b * L::BLOCK) };
                                sums[t][0] = unsafe { $dot(sums[t][0], w0, x.add(2 * c)) };
                                sums[t][1] = unsafe { $dot(sums[t][1], w1, x.add(2 * c + 2)) };
                            }
                        }
                    }
                    let d = unsafe { scales.load::<L>(b) };
                    for t in 0..T {
                        let total = _mm512_add_epi32(sums[t][0], sums[t][1]);
                        let xscale = _mm512_set1_ps(unsafe { *xs[t].add(b) });
                        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), _mm512_mul_ps(d, xscale), acc[t]);
                    }
                    if let Some(mins) = mins {
                        let mv = unsafe { mins.load::<L>(b) };
                        for t in 0..T {
                            let xsum = _mm512_set1_ps(unsafe { *xsum[t].add(b) });
                            acc[t] = _mm512_fmadd_ps(mv, xsum, acc[t]);
                        }
                    }
                }
                let valid = GROUP.min(m.rows - g * GROUP);
                let mask: __mmask16 = if valid == GROUP {
                    !0
                } else {
                    (1u16 << valid) - 1
                };
                for t in 0..T {
                    // SAFETY: token `t0 + t` and row group `g` of the output, `valid`
                    // columns.
                    unsafe { _mm512_mask_storeu_ps(out.at(t0 + t, g), mask, acc[t]) };
                }
            }
        };
    }

    group_kernel!(
        group_vnni,
        run_vnni,
        tile_vnni,
        "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c",
        dot_vnni
    );
    group_kernel!(
        group_bw,
        run_bw,
        tile_bw,
        "avx512f,avx512bw,avx512vl,avx2,fma,f16c",
        dot_bw
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn packed(dtype: GgmlDType, w: &Tensor) -> (QTensor, PackedQuantMatrix) {
        let q = QTensor::quantize(w, dtype).unwrap();
        let m = PackedQuantMatrix::from_qtensor(&q).unwrap().unwrap();
        (q, m)
    }

    /// The AVX-512 quantizer gives the scalar one's values and scales exactly, and its
    /// sums to rounding, over rows with a ragged tail of blocks (576 = 18 blocks of 32),
    /// zero blocks and values from tiny to large.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_quantizer_matches_scalar() {
        if !is_x86_feature_detected!("avx512f") || !is_x86_feature_detected!("avx512bw") {
            return;
        }
        for (cols, block, tokens) in [
            (576, 32, 3),
            (1024, 32, 2),
            (512, 16, 5),
            (48, 16, 1),
            (2048, 16, 2),
        ] {
            let blocks = cols / block;
            let x: Vec<f32> = (0..tokens * cols)
                .map(|i| {
                    if (i / block) % 7 == 3 {
                        0.0
                    } else {
                        let v = ((i * 7919) % 1000) as f32 / 500.0 - 1.0;
                        v * [1e-3, 1.0, 40.0, 3e4][(i / block) % 4]
                    }
                })
                .collect();
            let run = |vector: bool| {
                let (mut q, mut scale, mut sum) = (
                    vec![0i16; x.len()],
                    vec![0f32; tokens * blocks],
                    vec![0f32; tokens * blocks],
                );
                if vector {
                    // SAFETY: the CPU has the features (checked above).
                    unsafe { quantize_avx512(&x, &mut q, &mut scale, &mut sum, block) };
                } else {
                    quantize_blocks(&x, &mut q, &mut scale, &mut sum, block);
                }
                (q, scale, sum)
            };
            let (want, got) = (run(false), run(true));
            assert_eq!(got.0, want.0, "values, cols {cols} block {block}");
            assert_eq!(got.1, want.1, "scales, cols {cols} block {block}");
            for (b, (g, w)) in got.2.iter().zip(&want.2).enumerate() {
                let bound: f32 = x[b * block..(b + 1) * block].iter().map(|v| v.abs()).sum();
                assert!((g - w).abs() <= 1e-6 * bound, "sum of block {b}: {g} vs {w}");
            }
        }
    }

    const FORMATS: [GgmlDType; 8] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];

    /// The integer weights and scales reproduce candle's dequantization of every format.
    #[test]
    fn decoded_rows_match_candle_dequantization() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (3, 512), &dev).unwrap();
        for dtype in FORMATS {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let want: Vec<f32> = q
                .dequantize(&dev)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let src = source(dtype).unwrap();
            let data = q.data().unwrap();
            let row_bytes = data.len() / 3;
            for r in 0..3 {
                let dec = decode_row(&src, &data[r * row_bytes..(r + 1) * row_bytes], 512);
                for j in 0..512 {
                    let b = j / src.block;
                    let got = dec.d[b] * dec.q[j] as f32 + dec.m[b];
                    let want = want[r * 512 + j];
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{dtype:?} [{r},{j}]: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// The portable build of the kernel (what CPUs without AVX-512 run) agrees with the
    /// dispatched one on every format, tile size and a ragged last row group.
    #[test]
    fn portable_and_dispatched_kernels_agree() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (21, 512), &dev).unwrap();
        for t in [1usize, 3, 8, 11] {
            let x: Vec<f32> = Tensor::randn(0f32, 1.0, (t, 512), &dev)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for dtype in FORMATS {
                let (_, m) = packed(dtype, &w);
                let acts = Activations::quantize(&x, t, 512, m.block);
                let (mut a, mut b) = (vec![0f32; t * 21], vec![0f32; t * 21]);
                let target = |out: &mut Vec<f32>| Target {
                    ptr: out.as_mut_ptr(),
                    stride: 21,
                    first_group: 0,
                };
                for g in 0..21usize.div_ceil(GROUP) {
                    // SAFETY: both outputs are `[t, 21]`; group `g` is one of the matrix's.
                    unsafe {
                        group_portable(&m, g, &acts, 0..t, target(&mut a));
                        kernel()(&m, g, &acts, 0..t, target(&mut b));
                    }
                }
                for (p, q) in a.iter().zip(&b) {
                    assert!((p - q).abs() < 1e-3, "{dtype:?}, {t} tokens: {p} vs {q}");
                }
            }
        }
    }

    /// Against the f32 matmul of the dequantized weights: only the 16-bit activation
    /// rounding separates them.
    #[test]
    fn packed_matmul_matches_dequantized_f32_matmul() {
        let dev = Device::Cpu;
        // Three k-quant super-blocks per row, so the per-super-block scales step within
        // a row as well as from group to group.
        let w = Tensor::randn(0f32, 1.0, (40, 768), &dev).unwrap();
        // Large before small: later matmuls reuse the longer activation buffers.
        for t in [70usize, 1, 9, 3] {
            let x = Tensor::randn(0f32, 1.0, (t, 768), &dev).unwrap();
            for dtype in FORMATS {
                let (q, m) = packed(dtype, &w);
                let want = x.matmul(&q.dequantize(&dev).unwrap().t().unwrap()).unwrap();
                let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let got = Tensor::from_vec(m.matmul(&xs).unwrap(), (t, 40), &dev).unwrap();
                let max_abs = |t: &Tensor| t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                let err = max_abs(&(got - &want).unwrap()) / max_abs(&want);
                // 16-bit activations: a few 1e-5 of the largest output.
                let bound = 2e-4;
                eprintln!("{dtype:?} with {t} tokens: max error {err:.2e} of the largest output");
                assert!(
                    err < bound,
                    "{dtype:?} with {t} tokens: max error {err} of the largest output"
                );
            }
        }
    }

    /// A token's output does not depend on the other tokens of the call, bit for bit:
    /// speculative decoding checks drafted tokens several to a call and must get what one
    /// token per call gives.
    #[test]
    fn each_tokens_output_is_independent_of_the_batch() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (80, 768), &dev).unwrap();
        let x: Vec<f32> = Tensor::randn(0f32, 1.0, (70, 768), &dev)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for dtype in FORMATS {
            let (_, m) = packed(dtype, &w);
            let whole = m.matmul(&x).unwrap();
            for t in [0usize, 1, 5, 8, 9, 69] {
                let alone = m.matmul(&x[t * 768..(t + 1) * 768]).unwrap();
                assert!(
                    alone
                        .iter()
                        .zip(&whole[t * 80..(t + 1) * 80])
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{dtype:?}: token {t} alone differs from token {t} of 70"
                );
            }
        }
    }

    /// The rows of one expert of a stacked matrix are those rows of the whole product, and
    /// rows gathered from several matrices (gate and up of each expert, side by side) are
    /// those rows of each; ranges that are not whole row groups are refused.
    #[test]
    fn row_ranges_and_gathered_rows_match_the_whole_product() {
        let dev = Device::Cpu;
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::Q8_0] {
            let (experts, per, cols) = (3usize, 32usize, 256usize);
            let w = Tensor::randn(0f32, 1.0, (experts, per, cols), &dev).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let stacked = PackedQuantMatrix::from_qtensor(&q).unwrap().unwrap();
            assert_eq!((stacked.rows(), stacked.cols()), (experts * per, cols));
            let x: Vec<f32> = Tensor::randn(0f32, 1.0, (5, cols), &dev)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let whole = stacked.matmul(&x).unwrap();
            let column = |out: &[f32], width: usize, t: usize, c: usize| out[t * width + c];
            for e in 0..experts {
                let part = stacked.matmul_rows(&x, e * per..(e + 1) * per).unwrap();
                for t in 0..5 {
                    for c in 0..per {
                        assert_eq!(
                            column(&part, per, t, c),
                            column(&whole, experts * per, t, e * per + c)
                        );
                    }
                }
            }
            assert!(stacked.matmul_rows(&x, 8..40).is_err());
            // Expert 2's rows, then expert 0's.
            let gathered =
                PackedQuantMatrix::concat_rows(&[(&stacked, 2 * per..3 * per), (&stacked, 0..per)]).unwrap();
            let out = gathered.matmul(&x).unwrap();
            for t in 0..5 {
                for c in 0..per {
                    assert_eq!(
                        column(&out, 2 * per, t, c),
                        column(&whole, experts * per, t, 2 * per + c)
                    );
                    assert_eq!(
                        column(&out, 2 * per, t, per + c),
                        column(&whole, experts * per, t, c)
                    );
                }
            }
            assert!(PackedQuantMatrix::concat_rows(&[(&stacked, 0..20)]).is_none());
        }
    }
}
