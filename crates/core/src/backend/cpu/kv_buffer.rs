//! The KV cache's memory: host memory for the CPU kernels, a device tensor for the GPU
//! backend.

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::kv::KvDtype;

/// One layer's cached keys (or values) in the cache's element type: in host memory, the
/// physical storage the CPU attention kernel reads in place, or as one flat tensor on
/// the device the GPU backend's kernels read and write ([`KvBuffer::Device`]).
pub enum KvBuffer {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
    /// A 1-D tensor of the cache's dtype on the model's device.
    Device(Tensor),
}

/// Writes a zero into every 4 KiB page of `v` (volatile: the compiler knows the memory
/// is zero already and would drop plain stores).
fn prefault<T: Default>(v: &mut [T]) {
    let step = (4096 / std::mem::size_of::<T>().max(1)).max(1);
    for i in (0..v.len()).step_by(step) {
        // SAFETY: `i` is in bounds; a plain store of a valid value.
        unsafe { std::ptr::write_volatile(v.as_mut_ptr().add(i), T::default()) };
    }
}

impl KvBuffer {
    pub fn zeros(dtype: KvDtype, len: usize) -> Self {
        // Fresh zeroed memory is not touched until written, so the huge-page hint still
        // applies to all of it; then every page is touched at once, so that the pool is
        // resident from the start: the process's memory is what it will stay (a
        // container's limit is met at start, not hours later when the prefix cache has
        // cycled through every block), and no step pays for page faults.
        match dtype {
            KvDtype::F32 => {
                let mut v = vec![0.0; len];
                super::host::advise_huge_pages(&mut v);
                prefault(&mut v);
                KvBuffer::F32(v)
            }
            KvDtype::F16 => {
                // Zero bits, allocated as integers so that the allocator hands over
                // fresh zeroed pages (a `vec![f16::ZERO; len]` writes every value).
                use half::vec::HalfBitsVecExt;
                let mut v = vec![0u16; len];
                super::host::advise_huge_pages(&mut v);
                prefault(&mut v);
                KvBuffer::F16(v.reinterpret_into())
            }
        }
    }

    /// A zeroed buffer on `device` for the GPU backend.
    pub fn zeros_on(dtype: KvDtype, len: usize, device: &candle_core::Device) -> Result<Self> {
        let dtype = match dtype {
            KvDtype::F32 => DType::F32,
            KvDtype::F16 => DType::F16,
        };
        Ok(KvBuffer::Device(Tensor::zeros(len, dtype, device)?))
    }

    pub fn len(&self) -> usize {
        match self {
            KvBuffer::F32(v) => v.len(),
            KvBuffer::F16(v) => v.len(),
            KvBuffer::Device(t) => t.elem_count(),
        }
    }

    /// The device tensor of a [`KvBuffer::Device`].
    pub fn device_tensor(&self) -> Option<&Tensor> {
        match self {
            KvBuffer::Device(t) => Some(t),
            _ => None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stores `src` at `at..at + src.len()`.
    pub fn write(&mut self, at: usize, src: &[f32]) {
        use half::slice::HalfFloatSliceExt;
        match self {
            KvBuffer::F32(v) => v[at..at + src.len()].copy_from_slice(src),
            KvBuffer::F16(v) => v[at..at + src.len()].convert_from_f32_slice(src),
            KvBuffer::Device(t) => {
                let src = Tensor::from_slice(src, src.len(), t.device()).and_then(|s| s.to_dtype(t.dtype()));
                src.and_then(|s| t.slice_set(&s, 0, at))
                    .expect("a write inside a device KV buffer");
            }
        }
    }

    /// Stores `src[i]` at `at + i * stride`.
    pub fn write_strided(&mut self, at: usize, stride: usize, src: &[f32]) {
        if stride == 1 {
            return self.write(at, src);
        }
        match self {
            KvBuffer::Device(_) => {
                for (i, &x) in src.iter().enumerate() {
                    self.write(at + i * stride, &[x]);
                }
            }
            KvBuffer::F32(v) => {
                for (i, &x) in src.iter().enumerate() {
                    v[at + i * stride] = x;
                }
            }
            KvBuffer::F16(v) => {
                // Converted as one slice first: that uses the CPU's F16C when it has
                // it, where `f16::from_f32` per value is a software conversion.
                use half::slice::HalfFloatSliceExt;
                let mut halves = [half::f16::ZERO; 64];
                for (c, chunk) in src.chunks(64).enumerate() {
                    let h = &mut halves[..chunk.len()];
                    h.convert_from_f32_slice(chunk);
                    for (i, &x) in h.iter().enumerate() {
                        v[at + (64 * c + i) * stride] = x;
                    }
                }
            }
        }
    }

    /// Appends the stored bits of `len` values from `at` to `out`, little-endian (the disk
    /// tier's record of a block).
    pub fn bytes_into(&self, at: usize, len: usize, out: &mut Vec<u8>) -> Result<()> {
        match self {
            KvBuffer::F32(v) => out.extend(v[at..at + len].iter().flat_map(|x| x.to_le_bytes())),
            KvBuffer::F16(v) => out.extend(v[at..at + len].iter().flat_map(|x| x.to_bits().to_le_bytes())),
            KvBuffer::Device(t) => {
                let part = t.narrow(0, at, len)?;
                match t.dtype() {
                    DType::F16 => out.extend(
                        part.to_vec1::<half::f16>()?
                            .iter()
                            .flat_map(|x| x.to_bits().to_le_bytes()),
                    ),
                    _ => out.extend(part.to_vec1::<f32>()?.iter().flat_map(|x| x.to_le_bytes())),
                }
            }
        }
        Ok(())
    }

    /// Stores values from their bits as [`bytes_into`](Self::bytes_into) wrote them;
    /// `src` holds `src.len() / element size` values, written from `at`.
    pub fn set_bytes(&mut self, at: usize, src: &[u8]) -> Result<()> {
        match self {
            KvBuffer::F32(v) => {
                for (d, s) in v[at..].iter_mut().zip(src.chunks_exact(4)) {
                    *d = f32::from_le_bytes(s.try_into().expect("4 bytes"));
                }
            }
            KvBuffer::F16(v) => {
                for (d, s) in v[at..].iter_mut().zip(src.chunks_exact(2)) {
                    *d = half::f16::from_bits(u16::from_le_bytes(s.try_into().expect("2 bytes")));
                }
            }
            KvBuffer::Device(t) => {
                let values = match t.dtype() {
                    DType::F16 => {
                        let v: Vec<half::f16> = src
                            .chunks_exact(2)
                            .map(|s| half::f16::from_bits(u16::from_le_bytes(s.try_into().expect("2 bytes"))))
                            .collect();
                        Tensor::from_vec(v, src.len() / 2, t.device())
                    }
                    _ => {
                        let v: Vec<f32> = src
                            .chunks_exact(4)
                            .map(|s| f32::from_le_bytes(s.try_into().expect("4 bytes")))
                            .collect();
                        Tensor::from_vec(v, src.len() / 4, t.device())
                    }
                };
                t.slice_set(&values?, 0, at)?;
            }
        }
        Ok(())
    }

    /// Appends `len` values from `at`, widened to f32, to `out`.
    pub fn read_into(&self, at: usize, len: usize, out: &mut Vec<f32>) {
        match self {
            KvBuffer::F32(v) => out.extend_from_slice(&v[at..at + len]),
            KvBuffer::F16(v) => out.extend(v[at..at + len].iter().map(|x| x.to_f32())),
            KvBuffer::Device(t) => out.extend(
                t.narrow(0, at, len)
                    .and_then(|p| p.to_dtype(DType::F32))
                    .and_then(|p| p.to_vec1::<f32>())
                    .expect("a range inside a device KV buffer"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Strided writes land every value (past a whole chunk of conversion) where it
    /// belongs, and touch nothing between.
    #[test]
    fn strided_writes_place_each_value() {
        let src: Vec<f32> = (0..130).map(|i| i as f32 * 0.5 - 20.0).collect();
        for dtype in [KvDtype::F32, KvDtype::F16] {
            let mut buf = KvBuffer::zeros(dtype, 2 + 3 * src.len());
            buf.write_strided(2, 3, &src);
            let mut all = Vec::new();
            buf.read_into(0, buf.len(), &mut all);
            for (i, v) in all.iter().enumerate() {
                let want = if i >= 2 && (i - 2) % 3 == 0 {
                    src[(i - 2) / 3]
                } else {
                    0.0
                };
                assert_eq!(*v, want, "{dtype:?} at {i}");
            }
        }
    }
}
