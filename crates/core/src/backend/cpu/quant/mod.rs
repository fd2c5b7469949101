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
//! Every format is brought to one form, `w = d * q + m` per block of 16 or 32 weights:
//! Q4_0 (`m = -8d`), Q4_1, Q4_K (sub-block scales folded into `d` and `m`), Q5_0, Q5_1,
//! Q5_K, Q6_K (16-weight sub-blocks), Q8_0. Scales stay f16 for the 32-wide formats (as
//! stored) and are f32 for k-quants (`d * sub_scale`, exact), so the weights are exactly
//! the GGUF's. 4-bit formats stay 4 bits in memory (nibbles) and 5- to 8-bit formats
//! become one byte per weight, so batch-1 decode reads about as many bytes as the GGUF
//! holds. Rows are interleaved in groups of 16, so that the per-block scales of 16 rows
//! are contiguous and applying them is a few vector instructions per block per token;
//! each block is unpacked once and used for a tile of several tokens.
//!
//! One file per kernel set ([`Isa`]), each with the layout its dot products want
//! ([`Layout`], built by [`pack`]):
//! - [`avx512`]: a 512-bit register holds the same two weights of 16 rows; one
//!   `vpdpwssd` (VNNI; `vpmaddwd` + `vpaddd` without) multiplies them with a pair of
//!   activations broadcast from memory into 16 per-row sums. Tiles of 8 tokens.
//! - [`avx2`]: the same layout read as two halves of 8 rows, one 256-bit register each
//!   (`vpmaddwd`, or `vpdpwssd` with AVX-VNNI). Tiles of 4 tokens, what 16 registers hold.
//! - [`neon`]: 16-byte vectors of 8 consecutive weights of two rows, the operand of
//!   `smmla` (i8mm), which multiplies them with a token's activations split into high and
//!   low bytes (`x = 256 hi + lo`, exact) as a 2x8 matrix: four sums per instruction.
//!   Without i8mm, `sdot` (dotprod) reads the same vectors, and without either, `smlal`
//!   on the 16-bit activations.
//! - [`portable`]: plain loops over either layout (for CPUs with none of these, and as
//!   the reference the others are tested against).
//!
//! The integer sums are exact and every form applies the scales in the same order, so
//! the kernels agree to float rounding (the SIMD ones bit for bit).

mod activations;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;
mod pack;
mod portable;
#[cfg(test)]
mod tests;

use candle_core::quantized::{GgmlDType, QTensor};
use rayon::prelude::*;

use super::isa::{Isa, QuantKernel};
use crate::error::{Error, Result};
use activations::Activations;
use pack::{decode_row, group_block_bytes, pack_group_block, source, DecodedRow, KFactors, Scales};

/// Rows interleaved together: one 512-bit register of f32 per-row sums.
const GROUP: usize = 16;
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

/// Where the weights of a block of 16 rows sit, for the kernel that reads them (see
/// [`pack_group_block`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// The x86 kernels': 32-byte chunks, each holding the same pair of weights of the 16
    /// rows.
    Pairs,
    /// NEON's: 16-byte vectors, each holding 8 consecutive weights of two rows.
    RowPairs,
}

impl Layout {
    fn of(kernel: QuantKernel) -> Layout {
        match kernel {
            QuantKernel::NeonI8mm | QuantKernel::NeonDot | QuantKernel::Neon => Layout::RowPairs,
            _ => Layout::Pairs,
        }
    }
}

/// A `[rows, cols]` weight matrix in a GGUF quantized format, multiplied as `x W^T`.
#[derive(Debug, Clone)]
pub struct PackedQuantMatrix {
    /// The kernel it was packed for (chosen once, at load).
    kernel: QuantKernel,
    layout: Layout,
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

/// What a packed matrix's blocks look like, as constants, so that each format gets its
/// own kernel: block loops fully unrolled, no per-block branch on the format, and
/// pointers stepped rather than indices bounds-checked per block and token (with one or
/// two tokens per call, as in batch-1 decode and most experts of a MoE layer, that scalar
/// work had been a large share of the kernel's instructions).
trait BlockFormat {
    const NIBBLES: bool;
    const BLOCK: usize;
    /// k-quant scales (`i8` per block times `f32` per 256-wide super-block) rather than
    /// f16 per block.
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

    /// Whether `m` is in this format, with activations `a` for it.
    fn matches(m: &PackedQuantMatrix, a: &Activations) -> bool {
        let in_format = |s: &Scales| match s {
            Scales::F16(_) => !Self::FACTORED,
            Scales::Factored { per_outer, .. } => Self::FACTORED && *per_outer == Self::PER_OUTER,
        };
        m.block == Self::BLOCK
            && (m.storage == Storage::Nibbles) == Self::NIBBLES
            && in_format(&m.scales)
            && m.mins.as_ref().is_none_or(in_format)
            && m.mins.is_some() == Self::MIN
            && m.mins.as_ref().is_none_or(|s| s.len() == m.scales.len())
            && a.cols == m.cols
            && a.block == m.block
    }
}

macro_rules! block_formats {
    ($($name:ident: $nibbles:literal, $block:literal, $factored:literal, $min:literal;)*) => {
        $(
            struct $name;
            impl BlockFormat for $name {
                const NIBBLES: bool = $nibbles;
                const BLOCK: usize = $block;
                const FACTORED: bool = $factored;
                const MIN: bool = $min;
            }
        )*

    };
}

block_formats! {
    Nib32F16Min: true, 32, false, true;     // Q4_0, Q4_1
    Nib32FactMin: true, 32, true, true;     // Q4_K
    Byte32F16: false, 32, false, false;     // Q5_0, Q8_0
    Byte32F16Min: false, 32, false, true;   // Q5_1
    Byte32FactMin: false, 32, true, true;   // Q5_K
    Byte16Fact: false, 16, true, false;     // Q6_K, Q3_K
    Byte16FactMin: false, 16, true, true;   // Q2_K
}

/// Calls `$run::<F>(args)` for the block format `F` of matrix `$m`.
macro_rules! for_format {
    ($m:expr, $run:ident($($arg:expr),*)) => {{
        let m: &PackedQuantMatrix = $m;
        let factored = matches!(m.scales, Scales::Factored { .. });
        match (m.storage, m.block, factored, m.mins.is_some()) {
            (Storage::Nibbles, 32, false, true) => $run::<Nib32F16Min>($($arg),*),
            (Storage::Nibbles, 32, true, true) => $run::<Nib32FactMin>($($arg),*),
            (Storage::Bytes, 32, false, false) => $run::<Byte32F16>($($arg),*),
            (Storage::Bytes, 32, false, true) => $run::<Byte32F16Min>($($arg),*),
            (Storage::Bytes, 32, true, true) => $run::<Byte32FactMin>($($arg),*),
            (Storage::Bytes, 16, true, false) => $run::<Byte16Fact>($($arg),*),
            (Storage::Bytes, 16, true, true) => $run::<Byte16FactMin>($($arg),*),
            other => unreachable!("no packed block format {other:?}"),
        }
    }};
}
use for_format;

/// Per-block scales of a group, read block after block by the SIMD kernels.
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
    /// The scales have `(g + 1) * blocks * 16` entries, in `F`'s form.
    #[inline(always)]
    unsafe fn at<F: BlockFormat>(s: &Scales, g: usize, blocks: usize) -> Self {
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
                    outer: outer.as_ptr().add(i / F::PER_OUTER),
                },
            }
        }
    }

    /// Where block `b`'s scale of row `r` is: its f16, or its `i8` factor and the
    /// super-block's 16 `f32`s (from row 0).
    #[inline(always)]
    fn entry<F: BlockFormat>(self, b: usize, r: usize) -> (*const u8, *const f32) {
        if F::FACTORED {
            (
                self.sub.wrapping_add(b * GROUP + r),
                self.outer.wrapping_add(b / F::PER_OUTER * GROUP + r),
            )
        } else {
            (self.sub.wrapping_add(2 * (b * GROUP + r)), std::ptr::null())
        }
    }

    /// Block `b`'s scales' first byte (for prefetching; may be past the end).
    #[inline(always)]
    fn block_start<F: BlockFormat>(self, b: usize) -> *const u8 {
        self.entry::<F>(b, 0).0
    }
}

/// Checks a kernel's bounds once per tile: group `g`'s `blocks` blocks of weights, scales
/// and minimums, and tokens `t0..t0 + t` of the activations.
#[inline(always)]
fn check_tile<F: BlockFormat>(m: &PackedQuantMatrix, g: usize, a: &Activations, t0: usize, t: usize) {
    let blocks = m.blocks();
    assert!(
        F::matches(m, a)
            && m.weights.len() >= (g + 1) * blocks * F::BYTES
            && m.scales.len() >= (g + 1) * blocks * GROUP
            && t0 + t <= a.tokens
            && (t0 + t) * a.cols <= a.q.len()
            && (t0 + t) * blocks <= a.scale.len()
            && (t0 + t) * blocks <= a.sum.len()
    );
}

/// Whether candle's own quantized matmul runs on this CPU (see
/// [`PackedQuantMatrix::from_qtensor`]).
pub fn candle_quantized_runs() -> bool {
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("dotprod")
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        true
    }
}

/// The largest tile of tokens a kernel keeps in registers.
fn token_tile(kernel: QuantKernel) -> usize {
    match kernel {
        QuantKernel::Avx512Vnni | QuantKernel::Avx512 => 8,
        QuantKernel::Avx2Vnni | QuantKernel::Avx2 => 4,
        QuantKernel::NeonI8mm | QuantKernel::NeonDot | QuantKernel::Neon => 2,
        QuantKernel::Portable => 8,
    }
}

/// The entry point of `kernel`.
fn group_kernel(kernel: QuantKernel) -> GroupKernel {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        QuantKernel::Avx512Vnni => avx512::group_vnni,
        #[cfg(target_arch = "x86_64")]
        QuantKernel::Avx512 => avx512::group_bw,
        #[cfg(target_arch = "x86_64")]
        QuantKernel::Avx2Vnni => avx2::group_vnni,
        #[cfg(target_arch = "x86_64")]
        QuantKernel::Avx2 => avx2::group,
        #[cfg(target_arch = "aarch64")]
        QuantKernel::NeonI8mm => neon::group_i8mm,
        #[cfg(target_arch = "aarch64")]
        QuantKernel::NeonDot => neon::group_dot,
        #[cfg(target_arch = "aarch64")]
        QuantKernel::Neon => neon::group_base,
        QuantKernel::Portable => portable::group,
        #[allow(unreachable_patterns)]
        other => unreachable!("{other:?} is not a kernel of this architecture"),
    }
}

impl PackedQuantMatrix {
    /// The packed matrix for `q` when its format has a kernel here. A stacked
    /// `[experts, out, in]` tensor becomes one matrix of `experts * out` rows.
    ///
    /// Q2_K and Q3_K are left to candle's quantized matmul (8-bit activations, but 2.6 and
    /// 3.4 bits per weight in memory, where this form takes 8), except where candle's
    /// kernels cannot run: its aarch64 code uses `sdot` whatever the CPU, so on an aarch64
    /// CPU without dotprod (Cortex-A72: Raspberry Pi 4, Graviton 1) they are unpacked to a
    /// byte per weight here.
    pub fn from_qtensor(q: &QTensor, isa: Isa) -> Result<Option<Self>> {
        if matches!(q.dtype(), GgmlDType::Q2K | GgmlDType::Q3K) && candle_quantized_runs() {
            return Ok(None);
        }
        Self::pack(q, isa.quant_kernel())
    }

    /// [`from_qtensor`](Self::from_qtensor) for one kernel (the tests run each one the
    /// CPU has).
    pub(crate) fn pack(q: &QTensor, kernel: QuantKernel) -> Result<Option<Self>> {
        if !kernel.supported() {
            // The kernels run unchecked on the matrices packed for them.
            return Err(Error::Backend(format!(
                "this CPU cannot run the {kernel:?} kernel"
            )));
        }
        let layout = Layout::of(kernel);
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
                pack_group_block(
                    layout,
                    src.storage,
                    src.block,
                    &q,
                    &mut weights[at * gbb..(at + 1) * gbb],
                );
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
            kernel,
            layout,
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
                && m.kernel == first.kernel
                && m.layout == first.layout
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
            kernel: first.kernel,
            layout: first.layout,
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
        let acts = Activations::quantize(x, t, k, self.block, self.kernel);
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
        let kernel = group_kernel(self.kernel);
        let tile = token_tile(self.kernel);
        let n = groups.len();
        // A few tasks per thread: enough to balance, few enough that scheduling them costs
        // little next to the work (a decode step makes ~200 of these calls). With many
        // tokens a single row group is work enough for a task (a 16x1536 group against
        // 64 tokens is 1.5 M multiply-adds), and finer tasks balance better: 36 groups in
        // tasks of 5 would split 20:16 between two threads.
        let per_task = if acts.tokens >= tile {
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
