//! The kernels against each other and against candle's dequantized matmul: every
//! kernel this CPU runs (each kernel set with and without its dot-product extension)
//! against the portable one, bit for bit, on every format, tile size and a ragged last
//! row group.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::activations::{quantize_blocks, split_bytes, Activations, QMAX};
use super::pack::{weight_at, weight_position};
use super::*;

fn packed(dtype: GgmlDType, w: &Tensor, kernel: QuantKernel) -> (QTensor, PackedQuantMatrix) {
    let q = QTensor::quantize(w, dtype).unwrap();
    let m = PackedQuantMatrix::pack(&q, kernel).unwrap().unwrap();
    (q, m)
}

fn randn(shape: (usize, usize), seed: u64) -> Vec<f32> {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(seed);
    (0..shape.0 * shape.1)
        .map(|_| {
            // Roughly normal: the sum of four uniforms, centred.
            (0..4).map(|_| rng.random_range(-1.0f32..1.0)).sum::<f32>() * 0.9
        })
        .collect()
}

const FORMATS: [GgmlDType; 10] = [
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// Rows with a ragged tail of blocks (576 = 18 blocks of 32), zero blocks and values from
/// tiny to large.
fn quantizer_input(tokens: usize, cols: usize, block: usize) -> Vec<f32> {
    (0..tokens * cols)
        .map(|i| {
            if (i / block) % 7 == 3 {
                0.0
            } else {
                let v = ((i * 7919) % 1000) as f32 / 500.0 - 1.0;
                v * [1e-3, 1.0, 40.0, 3e4][(i / block) % 4]
            }
        })
        .collect()
}

/// Every kernel's activation quantizer gives the scalar one's values and scales exactly,
/// its sums to rounding, and (NEON's 8-bit kernels) the split bytes of its values.
#[test]
fn every_quantizer_matches_the_scalar_one() {
    for (cols, block, tokens) in [
        (576, 32, 3),
        (1024, 32, 2),
        (512, 16, 5),
        (48, 16, 1),
        (2048, 16, 2),
    ] {
        let blocks = cols / block;
        let x = quantizer_input(tokens, cols, block);
        let (mut q, mut scale, mut sum) = (
            vec![0i16; x.len()],
            vec![0f32; tokens * blocks],
            vec![0f32; tokens * blocks],
        );
        for t in 0..tokens {
            let (b0, b1) = (t * blocks, (t + 1) * blocks);
            quantize_blocks(
                &x[t * cols..(t + 1) * cols],
                &mut q[t * cols..(t + 1) * cols],
                &mut scale[b0..b1],
                &mut sum[b0..b1],
                block,
            );
        }
        assert!(q.iter().all(|&v| (v as f32).abs() <= QMAX));
        for kernel in QuantKernel::available() {
            let a = Activations::quantize(&x, tokens, cols, block, kernel);
            let what = format!("{kernel:?}, cols {cols} block {block}");
            assert_eq!(&a.q[..x.len()], &q[..], "values, {what}");
            assert_eq!(&a.scale[..scale.len()], &scale[..], "scales, {what}");
            for (b, (g, w)) in a.sum.iter().zip(&sum).enumerate() {
                let bound: f32 = x[b * block..(b + 1) * block].iter().map(|v| v.abs()).sum();
                assert!(
                    (g - w).abs() <= 1e-6 * bound,
                    "sum of block {b}, {what}: {g} vs {w}"
                );
            }
            if matches!(kernel, QuantKernel::NeonDot | QuantKernel::NeonI8mm) {
                let mut hl = vec![0i8; 2 * x.len()];
                split_bytes(&q, &mut hl);
                assert_eq!(&a.hl[..hl.len()], &hl[..], "split bytes, {what}");
            }
        }
    }
}

/// `q = 256 hi + lo` with both bytes signed, for every quantized value.
#[test]
fn split_bytes_recombine_to_every_value() {
    let q: Vec<i16> = (-(QMAX as i16)..=QMAX as i16).collect();
    let q = &q[..q.len() / 8 * 8];
    let mut hl = vec![0i8; 2 * q.len()];
    split_bytes(q, &mut hl);
    for (q, hl) in q.chunks(8).zip(hl.chunks(16)) {
        for j in 0..8 {
            assert_eq!(256 * hl[j] as i32 + hl[8 + j] as i32, q[j] as i32);
        }
    }
}

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

/// Both layouts place every weight of a block in its own spot (no two weights share a
/// byte, or a nibble), and read back what was packed.
#[test]
fn both_layouts_pack_and_read_back_every_weight() {
    for layout in [Layout::Pairs, Layout::RowPairs] {
        for (storage, block) in [(Storage::Nibbles, 32), (Storage::Bytes, 32), (Storage::Bytes, 16)] {
            let bytes = group_block_bytes(storage, block);
            let mut seen = std::collections::HashSet::new();
            for r in 0..GROUP {
                for j in 0..block {
                    let (at, high) = weight_position(layout, storage, block, r, j);
                    assert!(
                        at < bytes && seen.insert((at, high)),
                        "{layout:?} {storage:?} {block}: ({r}, {j})"
                    );
                }
            }
            let rows: Vec<Vec<i8>> = (0..GROUP)
                .map(|r| {
                    (0..block)
                        .map(|j| match storage {
                            Storage::Nibbles => ((r * 7 + j * 3) % 16) as i8,
                            Storage::Bytes => ((r * 37 + j * 11) % 256) as u8 as i8,
                        })
                        .collect()
                })
                .collect();
            let q: [&[i8]; GROUP] = std::array::from_fn(|r| rows[r].as_slice());
            let mut out = vec![0u8; bytes];
            pack_group_block(layout, storage, block, &q, &mut out);
            for (r, row) in rows.iter().enumerate() {
                for (j, &v) in row.iter().enumerate() {
                    assert_eq!(weight_at(layout, storage, block, &out, r, j), v as i16);
                }
            }
        }
    }
}

/// `[t, rows]` from running `kernel`'s group entry (not the matmul driver) over every
/// row group with activations quantized once, for `m`.
fn run_groups(m: &PackedQuantMatrix, kernel: GroupKernel, acts: &Activations) -> Vec<f32> {
    let t = acts.tokens;
    let mut out = vec![f32::NAN; t * m.rows];
    let target = Target {
        ptr: out.as_mut_ptr(),
        stride: m.rows,
        first_group: 0,
    };
    for g in 0..m.rows.div_ceil(GROUP) {
        // SAFETY: the output is `[t, rows]`; group `g` is one of the matrix's; the kernel
        // is one this CPU runs (the caller packed `m` for it).
        unsafe { kernel(m, g, acts, 0..t, target) };
    }
    out
}

/// Every kernel this CPU runs gives the portable kernel's outputs bit for bit (the same
/// integer sums, the scales applied in the same order), on every format, tiles of every
/// length up to past two tiles, and a ragged last row group; the portable kernel reads
/// both layouts alike (and unpacks each as packed).
#[test]
fn every_kernel_matches_the_portable_one_bit_for_bit() {
    let dev = Device::Cpu;
    let rows = 21;
    let w = Tensor::from_vec(randn((rows, 512), 1), (rows, 512), &dev).unwrap();
    for t in [1usize, 2, 3, 4, 5, 8, 9, 11] {
        let x = randn((t, 512), 2 + t as u64);
        for dtype in FORMATS {
            let (q, portable) = packed(dtype, &w, QuantKernel::Portable);
            for kernel in QuantKernel::available() {
                let m = PackedQuantMatrix::pack(&q, kernel).unwrap().unwrap();
                let acts = Activations::quantize(&x, t, 512, m.block, kernel);
                let want = run_groups(&portable, portable::group_fused, &acts);
                let got = run_groups(&m, group_kernel(kernel), &acts);
                // The portable kernel on this kernel's layout.
                let mut relaid = m.clone();
                relaid.kernel = QuantKernel::Portable;
                let portable_relaid = run_groups(&relaid, portable::group_fused, &acts);
                // What the portable set runs: fused where the target has FMA, else a
                // rounding apart.
                let plain = run_groups(&portable, portable::group, &acts);
                for (p, w) in plain.iter().zip(&want) {
                    assert!(
                        (p - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "{dtype:?}, {t} tokens: {p} vs {w}"
                    );
                }
                // (The portable set itself is `plain`, checked above.)
                let got = if kernel == QuantKernel::Portable {
                    &want
                } else {
                    &got
                };
                for (i, ((g, w), p)) in got.iter().zip(&want).zip(&portable_relaid).enumerate() {
                    assert!(
                        g.to_bits() == w.to_bits() && p.to_bits() == w.to_bits(),
                        "{kernel:?}, {dtype:?}, {t} tokens, output {i}: {g} vs portable {w} ({p} on its layout)"
                    );
                }
            }
        }
    }
}

/// Against the f32 matmul of the dequantized weights: only the 16-bit activation
/// rounding separates them.
#[test]
fn packed_matmul_matches_dequantized_f32_matmul() {
    let dev = Device::Cpu;
    // Three k-quant super-blocks per row, so the per-super-block scales step within a row
    // as well as from group to group.
    let w = Tensor::randn(0f32, 1.0, (40, 768), &dev).unwrap();
    for kernel in QuantKernel::available() {
        // Large before small: later matmuls reuse the longer activation buffers.
        for t in [70usize, 1, 9, 3] {
            let x = Tensor::randn(0f32, 1.0, (t, 768), &dev).unwrap();
            for dtype in FORMATS {
                let (q, m) = packed(dtype, &w, kernel);
                let want = x.matmul(&q.dequantize(&dev).unwrap().t().unwrap()).unwrap();
                let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let got = Tensor::from_vec(m.matmul(&xs).unwrap(), (t, 40), &dev).unwrap();
                let max_abs = |t: &Tensor| t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                let err = max_abs(&(got - &want).unwrap()) / max_abs(&want);
                // 16-bit activations: a few 1e-5 of the largest output.
                assert!(
                    err < 2e-4,
                    "{kernel:?}, {dtype:?} with {t} tokens: max error {err} of the largest output"
                );
            }
        }
    }
}

/// A token's output does not depend on the other tokens of the call, bit for bit, in
/// every kernel: speculative decoding checks drafted tokens several to a call and must
/// get what one token per call gives.
#[test]
fn each_tokens_output_is_independent_of_the_batch() {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, (80, 768), &dev).unwrap();
    let x = randn((70, 768), 9);
    for kernel in QuantKernel::available() {
        for dtype in FORMATS {
            let (_, m) = packed(dtype, &w, kernel);
            let whole = m.matmul(&x).unwrap();
            for t in [0usize, 1, 5, 8, 9, 69] {
                let alone = m.matmul(&x[t * 768..(t + 1) * 768]).unwrap();
                assert!(
                    alone
                        .iter()
                        .zip(&whole[t * 80..(t + 1) * 80])
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{kernel:?}, {dtype:?}: token {t} alone differs from token {t} of 70"
                );
            }
        }
    }
}

/// The rows of one expert of a stacked matrix are those rows of the whole product, and
/// rows gathered from several matrices (gate and up of each expert, side by side) are
/// those rows of each; ranges that are not whole row groups are refused, and so are
/// matrices packed for different kernels.
#[test]
fn row_ranges_and_gathered_rows_match_the_whole_product() {
    let dev = Device::Cpu;
    for kernel in QuantKernel::available() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::Q8_0] {
            let (experts, per, cols) = (3usize, 32usize, 256usize);
            let w = Tensor::randn(0f32, 1.0, (experts, per, cols), &dev).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let stacked = PackedQuantMatrix::pack(&q, kernel).unwrap().unwrap();
            assert_eq!((stacked.rows(), stacked.cols()), (experts * per, cols));
            let x = randn((5, cols), 3);
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
            if kernel != QuantKernel::Portable {
                let other = PackedQuantMatrix::pack(&q, QuantKernel::Portable)
                    .unwrap()
                    .unwrap();
                assert!(PackedQuantMatrix::concat(&[&stacked, &other]).is_none());
            }
        }
    }
}

/// A kernel this CPU cannot run is refused at packing time (its code runs unchecked on
/// the matrices packed for it).
#[test]
fn packing_for_a_kernel_the_cpu_lacks_is_refused() {
    let w = Tensor::randn(0f32, 1.0, (16, 64), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
    for kernel in QuantKernel::ALL {
        assert_eq!(
            PackedQuantMatrix::pack(&q, kernel).is_ok(),
            kernel.supported(),
            "{kernel:?}"
        );
    }
}
