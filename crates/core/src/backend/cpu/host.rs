//! Host-memory access to candle tensors for the hand-written CPU kernels.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, DType, Storage, Tensor};

use crate::error::{Error, Result};

/// Runs `f` on the values of `t` (a tensor in CPU memory) in row-major order as f32: in
/// place when `t` is contiguous f32 (the common case: a layer's output), else through one
/// conversion (half precision, a strided view). Saves a copy of every activation a kernel
/// reads. A tensor on another device is an error: a CPU kernel never copies one across.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    if !t.device().is_cpu() {
        return Err(Error::Backend(format!(
            "a tensor on {:?} reached a CPU kernel",
            t.device()
        )));
    }
    if t.dtype() == DType::F32 {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(f(&v[start..end]));
        }
    }
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(f(&v))
}

/// A vector of `n` values written by `fill` into uninitialized memory: no zeroing pass
/// first: a decode step makes several fresh activation buffers per layer, and zeroing
/// them is a pass over memory for nothing.
///
/// # Safety
/// `fill` writes every one of the `n` elements.
pub(crate) unsafe fn filled_vec<T>(n: usize, fill: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    fill(&mut v.spare_capacity_mut()[..n]);
    // SAFETY: all `n` elements are initialized (the caller's contract). A panic in
    // `fill` leaves the length at 0.
    unsafe { v.set_len(n) };
    v
}

/// The elements of `s`, all written.
///
/// # Safety
/// Every element of `s` is initialized.
#[inline(always)]
pub(crate) unsafe fn assume_init_mut<T>(s: &mut [MaybeUninit<T>]) -> &mut [T] {
    // SAFETY: `MaybeUninit<T>` has `T`'s layout, and the elements are initialized.
    unsafe { &mut *(s as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// Asks the kernel to back the 2 MiB-aligned stretches of `buf` with huge pages (where
/// transparent huge pages are in `madvise` mode, as on many distributions), before its
/// first write. Matmuls stream hundreds of megabytes of weights per step and attention
/// walks scattered KV blocks; with 4 KiB pages that is a TLB miss every 4 KiB.
/// A hint: nothing happens where it is not supported.
pub(crate) fn advise_huge_pages<T>(buf: &mut [T]) {
    const HUGE: usize = 2 << 20;
    let bytes = std::mem::size_of_val(buf);
    if bytes < 2 * HUGE {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        let start = buf.as_mut_ptr() as usize;
        let first = start.next_multiple_of(HUGE);
        let end = (start + bytes) / HUGE * HUGE;
        if end > first {
            // SAFETY: the range lies inside `buf`'s allocation; MADV_HUGEPAGE changes only
            // how pages are backed, never their contents.
            unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE) };
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    #[test]
    fn views_match_copies() {
        let t = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((4, 6))
            .unwrap();
        let want = |t: &Tensor| {
            t.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        // Contiguous, a contiguous row range (offset view), a strided view, and f16.
        for t in [
            t.clone(),
            t.narrow(0, 1, 2).unwrap(),
            t.narrow(1, 2, 3).unwrap(),
            t.to_dtype(DType::F16).unwrap(),
        ] {
            assert_eq!(with_f32(&t, |v| v.to_vec()).unwrap(), want(&t));
        }
    }
}
