//! From a GGUF row to the packed form: each format's blocks decoded to integer weights
//! and per-block scales (`w = d * q + m`), then laid out for a kernel set
//! ([`Layout`]).

use candle_core::quantized::GgmlDType;

use super::{Layout, Storage, GROUP};

/// Per-row block scales (`[group][block][16 rows]`, flat index `i`), kept as compact as
/// the GGUF keeps them, since batch-1 decode reads them with the weights: f16 for the
/// 32-wide formats (as stored), and for k-quants the same two factors as the file, a
/// small integer per block times an f32 per 256-wide super-block (`d * sub_scale`; the
/// product is exact in f32). Either way the weights are exactly the GGUF's.
#[derive(Debug, Clone)]
pub(super) enum Scales {
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
    pub(super) fn f16(len: usize) -> Self {
        Scales::F16(vec![0; len])
    }

    pub(super) fn factored(len: usize, per_outer: usize) -> Self {
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

    pub(super) fn set_f16(&mut self, i: usize, v: f32) {
        if let Scales::F16(s) = self {
            s[i] = half::f16::from_f32(v).to_bits();
        }
    }

    pub(super) fn set_factored(&mut self, i: usize, sub_factor: i8, outer_factor: f32) {
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

    pub(super) fn get(&self, i: usize) -> f32 {
        match self {
            Scales::F16(s) => half::f16::from_bits(s[i]).to_f32(),
            Scales::Factored {
                sub,
                outer,
                per_outer,
            } => sub[i] as f32 * outer[Self::outer_index(i, *per_outer)],
        }
    }

    pub(super) fn len(&self) -> usize {
        match self {
            Scales::F16(s) => s.len(),
            Scales::Factored { sub, .. } => sub.len(),
        }
    }
}

/// One row of a GGUF matrix brought to `w = d * q + m` per block.
pub(super) struct DecodedRow {
    pub(super) q: Vec<i8>,
    pub(super) d: Vec<f32>,
    pub(super) m: Vec<f32>,
    /// k-quants: `d[b] = d_sub[b] * d_outer[b / per_outer]`, and likewise `m`.
    pub(super) factors: Option<KFactors>,
}

#[derive(Default, Clone)]
pub(super) struct KFactors {
    pub(super) d_sub: Vec<i8>,
    pub(super) d_outer: Vec<f32>,
    pub(super) m_sub: Vec<i8>,
    pub(super) m_outer: Vec<f32>,
}

/// The source formats handled here, with their packed form.
#[derive(Debug, Clone, Copy)]
pub(super) struct Source {
    pub(super) dtype: GgmlDType,
    /// Weights and bytes per GGUF block.
    pub(super) elems: usize,
    pub(super) bytes: usize,
    pub(super) storage: Storage,
    pub(super) block: usize,
    pub(super) has_min: bool,
}

pub(super) fn source(dtype: GgmlDType) -> Option<Source> {
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
        // 2 and 3 bits per weight become a byte each (see `PackedQuantMatrix::from_qtensor`
        // for when).
        Q2K => s(256, 84, Storage::Bytes, 16, true),
        Q3K => s(256, 110, Storage::Bytes, 16, false),
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
pub(super) fn decode_row(src: &Source, row: &[u8], cols: usize) -> DecodedRow {
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
            GgmlDType::Q2K => {
                let (sc, qs, scale, dmin) = (&b[0..16], &b[16..80], f16_at(b, 80), f16_at(b, 82));
                let f = out.factors.as_mut().expect("k-quant");
                f.d_outer.push(scale);
                f.m_outer.push(-dmin);
                for (s, &packed) in sc.iter().enumerate() {
                    let (scale_s, min_s) = (packed & 0x0F, packed >> 4);
                    (d[s], m[s]) = (scale * scale_s as f32, -dmin * min_s as f32);
                    f.d_sub.push(scale_s as i8);
                    f.m_sub.push(min_s as i8);
                    // Sub-block s: 128-weight half s / 8, bit pair (s % 8) / 2, bytes
                    // 16 (s % 2) .. of that half's 32.
                    let (half, shift, first) = (s / 8, 2 * ((s % 8) / 2), 16 * (s % 2));
                    for l in 0..16 {
                        q[16 * s + l] = ((qs[32 * half + first + l] >> shift) & 3) as i8;
                    }
                }
            }
            GgmlDType::Q3K => {
                let (hmask, qs, packed, scale) = (&b[0..32], &b[32..96], &b[96..108], f16_at(b, 108));
                let f = out.factors.as_mut().expect("k-quant");
                f.d_outer.push(scale);
                for s in 0..16 {
                    // ggml's packing of 16 six-bit scales: low 4 bits from bytes 0-7, high
                    // 2 bits from bytes 8-11; stored with an offset of 32.
                    let low = if s < 8 {
                        packed[s] & 0x0F
                    } else {
                        packed[s - 8] >> 4
                    };
                    let high = (packed[8 + s % 4] >> (2 * (s / 4))) & 3;
                    let sc = ((low | (high << 4)) as i8) - 32;
                    d[s] = scale * sc as f32;
                    f.d_sub.push(sc);
                    let (half, pair, first) = (s / 8, (s % 8) / 2, 16 * (s % 2));
                    for l in 0..16 {
                        let low = (qs[32 * half + first + l] >> (2 * pair)) & 3;
                        let bit = 4 * half + pair;
                        let high = (hmask[first + l] >> bit) & 1;
                        // The high bit set means the value as it is, clear means 4 less.
                        q[16 * s + l] = low as i8 - if high == 1 { 0 } else { 4 };
                    }
                }
            }
            other => unreachable!("no decoder for {other:?}"),
        }
    }
    out
}

/// Bytes of one packed `[16 rows, block]` tile.
pub(super) const fn group_block_bytes(storage: Storage, block: usize) -> usize {
    match storage {
        Storage::Nibbles => GROUP * block / 2,
        Storage::Bytes => GROUP * block,
    }
}

/// Lays out one block of 16 rows (`q[r]` is row `r`'s block) for `layout`.
///
/// [`Layout::Pairs`]: each 32-byte chunk widens (`vpmovzxbw`/`vpmovsxbw`) into 32 16-bit
/// lanes holding, for every row `r`, the pair of weights `(2c, 2c+1)` in lanes `2r, 2r+1`
/// (and each 16-byte half into the same for 8 rows):
/// - bytes: chunk `c` (of `block / 2`) is that pair of every row;
/// - nibbles: chunk `c` (of 8) holds pair `c` in the low nibbles and pair `c + 8` (weights
///   `2c + 16, 2c + 17`) in the high nibbles.
///
/// [`Layout::RowPairs`]: 16-byte vectors, vector `(k, p)` holding weights `8k..8k + 8` of
/// row `2p` then the same of row `2p + 1`, for `k` over the block's 8-weight chunks and `p`
/// over the 8 row pairs:
/// - bytes: vector `(k, p)` at `16 (8k + p)`;
/// - nibbles (32-wide blocks): vector `(k, p)` for `k` in 0..2 holds chunk `k` in the low
///   nibbles and chunk `k + 2` in the high nibbles.
pub(super) fn pack_group_block(
    layout: Layout,
    storage: Storage,
    block: usize,
    q: &[&[i8]; GROUP],
    out: &mut [u8],
) {
    for (r, row) in q.iter().enumerate() {
        for (j, &v) in row[..block].iter().enumerate() {
            let (at, high) = weight_position(layout, storage, block, r, j);
            let v = v as u8;
            if storage == Storage::Nibbles {
                out[at] |= if high { v << 4 } else { v & 0x0F };
            } else {
                out[at] = v;
            }
        }
    }
}

/// Where weight `j` of row `r` sits in a packed block of 16 rows: its byte, and for
/// nibbles whether it is the high one.
#[inline(always)]
pub(super) fn weight_position(
    layout: Layout,
    storage: Storage,
    block: usize,
    r: usize,
    j: usize,
) -> (usize, bool) {
    match (layout, storage) {
        (Layout::Pairs, Storage::Bytes) => ((j / 2) * 32 + 2 * r + j % 2, false),
        (Layout::Pairs, Storage::Nibbles) => {
            let (high, j) = (j >= 16, j % 16);
            ((j / 2) * 32 + 2 * r + j % 2, high)
        }
        (Layout::RowPairs, Storage::Bytes) => {
            let (k, p) = (j / 8, r / 2);
            (16 * (8 * k + p) + 8 * (r % 2) + j % 8, false)
        }
        (Layout::RowPairs, Storage::Nibbles) => {
            debug_assert_eq!(block, 32);
            let (high, k, p) = (j >= 16, (j / 8) % 2, r / 2);
            (16 * (8 * k + p) + 8 * (r % 2) + j % 8, high)
        }
    }
}

/// Weight `j` of row `r` of a packed block of 16 rows ([`pack_group_block`] backwards).
#[cfg(test)]
pub(super) fn weight_at(
    layout: Layout,
    storage: Storage,
    block: usize,
    packed: &[u8],
    r: usize,
    j: usize,
) -> i16 {
    let (at, high) = weight_position(layout, storage, block, r, j);
    let b = packed[at];
    match storage {
        Storage::Bytes => b as i8 as i16,
        Storage::Nibbles => (if high { b >> 4 } else { b & 0x0F }) as i16,
    }
}
