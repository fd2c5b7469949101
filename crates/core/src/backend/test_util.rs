//! Helpers for the kernels' tests: seeded inputs and the distance between outputs.

use candle_core::{DType, Device, Tensor};

/// `n` values in [-1, 1) from a seeded linear congruential generator: the same inputs
/// on every machine, no dependency.
pub(crate) fn random_values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A CPU f32 tensor of `shape` filled by [`random_values`].
pub(crate) fn random(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(random_values(n, seed), shape, &Device::Cpu).unwrap()
}

/// The largest absolute difference between two tensors of one shape, in f32.
pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    max_abs(&(f32(a) - f32(b)).unwrap())
}

/// The largest absolute value of a tensor, in f32.
pub(crate) fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
