use std::mem::MaybeUninit;

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::host::{assume_init_mut, filled_vec, with_f32};
use crate::vmath::fold16;
use crate::weights::WeightStore;

/// Root-mean-square layer norm over the last dimension, computed in f32 whatever the
/// compute dtype (as the reference implementations do).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    /// The same weights as plain values, for the row kernel.
    weight_f32: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    pub fn load(store: &WeightStore, name: &str, size: usize, eps: f64) -> Result<Self> {
        let weight = store.get_f32(&format!("{name}.weight"), &[size])?;
        Ok(Self {
            weight_f32: weight.to_vec1::<f32>()?,
            weight,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.dtype() == DType::F32 && x.rank() == 2 {
            let normed = with_f32(x, |v| self.forward_rows_f32(v))?;
            return Ok(Tensor::from_vec(normed, x.dims2()?, x.device())?);
        }
        let dtype = x.dtype();
        let y = candle_nn::ops::rms_norm(&x.to_dtype(DType::F32)?.contiguous()?, &self.weight, self.eps)?;
        Ok(y.to_dtype(dtype)?)
    }

    /// `(x + residual, norm(x + residual))`: the residual stream after a sublayer and the
    /// next sublayer's input, in one pass over the rows.
    pub fn add_and_norm(&self, x: &Tensor, residual: &Tensor) -> Result<(Tensor, Tensor)> {
        if x.dtype() == DType::F32
            && residual.dtype() == DType::F32
            && x.rank() == 2
            && x.dims() == residual.dims()
        {
            return self.add_and_norm_rows(x, residual);
        }
        let sum = (x + residual)?;
        let normed = self.forward(&sum)?;
        Ok((sum, normed))
    }

    /// Each `size`-wide row of `x` (flat f32, `[rows, size]`) normed. Also attention's
    /// q/k norms (per head, or over the whole projection), applied to the projections'
    /// f32 buffers, where a round trip through tensors and candle's `rms_norm` had been
    /// ~6 us per layer at batch 1.
    pub fn forward_rows_f32(&self, x: &[f32]) -> Vec<f32> {
        let (w, eps) = (&self.weight_f32, self.eps);
        let d = w.len();
        assert_eq!(x.len() % d, 0, "rows of {d}");
        // SAFETY: every row of the output is written by `norm_row`.
        unsafe {
            filled_vec(x.len(), |out| {
                out.par_chunks_mut(d)
                    .zip(x.par_chunks(d))
                    .with_min_len(min_rows_per_task(x.len(), d))
                    .for_each(|(o, xr)| norm_row(xr, None, w, eps, o))
            })
        }
    }

    /// `(x + residual, norm(x + residual))` by the f32 row kernel over `[tokens, size]`.
    fn add_and_norm_rows(&self, x: &Tensor, residual: &Tensor) -> Result<(Tensor, Tensor)> {
        let (t, d) = x.dims2()?;
        let (w, eps) = (&self.weight_f32, self.eps);
        let min_rows = min_rows_per_task(t * d, d);
        // Both outputs are written in full, row by row, so neither is zeroed first.
        let mut normed: Vec<f32> = Vec::with_capacity(t * d);
        let sum = with_f32(x, |x| {
            assert_eq!(x.len(), t * d);
            let rows = &mut normed.spare_capacity_mut()[..t * d];
            with_f32(residual, |r| {
                assert_eq!(r.len(), t * d);
                // SAFETY: every row of `sum` is written by `norm_row`.
                unsafe {
                    filled_vec(t * d, |sum| {
                        rows.par_chunks_mut(d)
                            .zip(sum.par_chunks_mut(d))
                            .with_min_len(min_rows)
                            .enumerate()
                            .for_each(|(i, (n, s))| {
                                norm_row(&x[i * d..][..d], Some((&r[i * d..][..d], s)), w, eps, n)
                            })
                    })
                }
            })
        })??;
        // SAFETY: every row of `normed` was written by `norm_row` above (the closure
        // returned normally, so every row ran).
        unsafe { normed.set_len(t * d) };
        let dev = x.device();
        Ok((
            Tensor::from_vec(sum, (t, d), dev)?,
            Tensor::from_vec(normed, (t, d), dev)?,
        ))
    }
}

/// Rows per task when `len` values in rows of `d` are normed: all of them on the calling
/// thread below 2^16 values (a decode step's few rows take microseconds, less than
/// handing them out would), else tasks of about 2^13 values.
fn min_rows_per_task(len: usize, d: usize) -> usize {
    if len >= 1 << 16 {
        (1usize << 13).div_ceil(d)
    } else {
        len / d.max(1) + 1
    }
}

/// A residual row to add, and the row the sum is written to.
type Residual<'a> = (&'a [f32], &'a mut [MaybeUninit<f32>]);

/// One row: `s = x (+ residual)`, `normed = s / rms(s) * weight`.
fn norm_row(x: &[f32], residual: Option<Residual>, w: &[f32], eps: f32, normed: &mut [MaybeUninit<f32>]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features.
        return unsafe { norm_row_avx512(x, residual, w, eps, normed) };
    }
    norm_row_impl(x, residual, w, eps, normed)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn norm_row_avx512(
    x: &[f32],
    residual: Option<Residual>,
    w: &[f32],
    eps: f32,
    normed: &mut [MaybeUninit<f32>],
) {
    norm_row_impl(x, residual, w, eps, normed)
}

#[inline(always)]
fn norm_row_impl(
    x: &[f32],
    residual: Option<Residual>,
    w: &[f32],
    eps: f32,
    normed: &mut [MaybeUninit<f32>],
) {
    assert!(
        normed.len() == x.len()
            && residual
                .as_ref()
                .is_none_or(|(r, sum)| r.len() == x.len() && sum.len() == x.len())
    );
    // `normed` first holds the sum, written in full (as is the `sum` output).
    match residual {
        Some((r, sum)) => {
            for (((o, s), a), b) in normed.iter_mut().zip(sum.iter_mut()).zip(x).zip(r) {
                o.write(*s.write(a + b));
            }
        }
        None => {
            for (o, a) in normed.iter_mut().zip(x) {
                o.write(*a);
            }
        }
    }
    // SAFETY: every element of `normed` was written just above (equal lengths, assert).
    let normed = unsafe { assume_init_mut(normed) };
    let squares = fold16(normed, 0.0, |v| v * v, |a, b| a + b);
    let inv = 1.0 / (squares / x.len() as f32 + eps).sqrt();
    for (o, w) in normed.iter_mut().zip(w) {
        *o = *o * inv * w;
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// The row kernel (with and without the residual add) agrees with candle's rms_norm
    /// on few rows (serial) and many (parallel), and with a width that is not a multiple
    /// of 16.
    #[test]
    fn row_kernel_matches_candle() {
        let dev = Device::Cpu;
        // The last two split rows over the pool (t * d >= 2^16); the others run serially.
        // (70 x 1000 is also 70 heads of one token, for the q/k norms.)
        for (t, d) in [(1usize, 576usize), (3, 37), (20, 64), (120, 576), (70, 1000)] {
            let weight = Tensor::randn(1f32, 0.2, d, &dev).unwrap();
            let norm = RmsNorm {
                weight_f32: weight.to_vec1().unwrap(),
                weight: weight.clone(),
                eps: 1e-5,
            };
            let x = Tensor::randn(0f32, 2.0, (t, d), &dev).unwrap();
            let r = Tensor::randn(0f32, 2.0, (t, d), &dev).unwrap();
            let close = |a: &Tensor, b: &Tensor| {
                let (a, b) = (a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
                for (a, b) in a.iter().flatten().zip(b.iter().flatten()) {
                    assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
                }
            };
            close(
                &norm.forward(&x).unwrap(),
                &candle_nn::ops::rms_norm(&x, &weight, 1e-5).unwrap(),
            );
            let (s, n) = norm.add_and_norm(&x, &r).unwrap();
            let want_s = (&x + &r).unwrap();
            close(&s, &want_s);
            close(&n, &candle_nn::ops::rms_norm(&want_s, &weight, 1e-5).unwrap());
            // Flat rows, as attention's q/k norms take them.
            let flat = norm.forward_rows_f32(&x.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            close(
                &Tensor::from_vec(flat, (t, d), &dev).unwrap(),
                &candle_nn::ops::rms_norm(&x, &weight, 1e-5).unwrap(),
            );
        }
    }
}
