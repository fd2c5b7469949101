//! f32 vectors of each kernel set behind one trait, so that a kernel made of loads,
//! multiply-adds and stores (attention, the small dense matmul) is written once and
//! compiled for each set: generic `#[inline(always)]` code, instantiated inside a
//! `#[target_feature]` entry point per set, where the trait's methods (each with its
//! set's features) inline.

/// Hints the cache line at `p` into L1. A hint: it never faults, whatever the address.
#[inline(always)]
pub(crate) fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a hint; never faults.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    #[cfg(target_arch = "aarch64")]
    // SAFETY: a prefetch hint reads nothing architecturally and never faults.
    unsafe {
        std::arch::asm!("prfm pldl1keep, [{p}]", p = in(reg) p, options(nostack, preserves_flags, readonly))
    };
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = p;
}

/// One kernel set's f32 vectors.
pub(crate) trait F32x {
    type V: Copy;
    /// f32 values per vector.
    const LANES: usize;
    /// 32 vector registers (AVX-512, NEON) rather than 16 (AVX2): how many accumulators
    /// a kernel may keep.
    const MANY_REGISTERS: bool;

    /// # Safety (every method)
    /// The CPU has the set's features; pointers are valid for the lanes they touch.
    unsafe fn zero() -> Self::V;
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    /// `LANES` IEEE halves (their bits) widened.
    unsafe fn load_f16(p: *const u16) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// The first `n` lanes (`n <= LANES`).
    unsafe fn store_first(p: *mut f32, v: Self::V, n: usize);
    /// `a * b + c`, one rounding.
    unsafe fn fmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn reduce_add(v: Self::V) -> f32;
    /// Lane `i` of the result is the sum of `v[i]`'s lanes (`v` holds `LANES` vectors).
    unsafe fn sums_of_each(v: &[Self::V]) -> Self::V;
    /// Hints the line at `p` into L1 (never faults, whatever the address).
    fn prefetch(p: *const u8);
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::F32x;
    use crate::backend::cpu::vmath::{avx2, avx512};

    pub(crate) struct Avx512;
    pub(crate) struct Avx2;

    impl F32x for Avx512 {
        type V = __m512;
        const LANES: usize = 16;
        const MANY_REGISTERS: bool = true;

        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn splat(x: f32) -> __m512 {
            _mm512_set1_ps(x)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load(p: *const f32) -> __m512 {
            // SAFETY: by the caller's contract.
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load_f16(p: *const u16) -> __m512 {
            // SAFETY: by the caller's contract.
            unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn store(p: *mut f32, v: __m512) {
            // SAFETY: by the caller's contract.
            unsafe { _mm512_storeu_ps(p, v) }
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn store_first(p: *mut f32, v: __m512, n: usize) {
            // SAFETY: by the caller's contract; masked-off lanes are not touched.
            unsafe { _mm512_mask_storeu_ps(p, (1u32 << n).wrapping_sub(1) as u16, v) }
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn mul(a: __m512, b: __m512) -> __m512 {
            _mm512_mul_ps(a, b)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn reduce_add(v: __m512) -> f32 {
            _mm512_reduce_add_ps(v)
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn sums_of_each(v: &[__m512]) -> __m512 {
            avx512::fold_each16::<avx512::Add>(v.try_into().expect("16 vectors"))
        }
        #[inline(always)]
        fn prefetch(p: *const u8) {
            super::prefetch(p)
        }
    }

    impl F32x for Avx2 {
        type V = __m256;
        const LANES: usize = 8;
        const MANY_REGISTERS: bool = false;

        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn splat(x: f32) -> __m256 {
            _mm256_set1_ps(x)
        }
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn load(p: *const f32) -> __m256 {
            // SAFETY: by the caller's contract.
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn load_f16(p: *const u16) -> __m256 {
            // SAFETY: by the caller's contract.
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
        }
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn store(p: *mut f32, v: __m256) {
            // SAFETY: by the caller's contract.
            unsafe { _mm256_storeu_ps(p, v) }
        }
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn store_first(p: *mut f32, v: __m256, n: usize) {
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lanes);
            // SAFETY: by the caller's contract; masked-off lanes are not touched.
            unsafe { _mm256_maskstore_ps(p, mask, v) }
        }
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn mul(a: __m256, b: __m256) -> __m256 {
            _mm256_mul_ps(a, b)
        }
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn reduce_add(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn sums_of_each(v: &[__m256]) -> __m256 {
            avx2::fold_each8::<avx2::Add>(v.try_into().expect("8 vectors"))
        }
        #[inline(always)]
        fn prefetch(p: *const u8) {
            super::prefetch(p)
        }
    }
}

#[cfg(target_arch = "aarch64")]
pub(crate) use arm::Neon;

#[cfg(target_arch = "aarch64")]
mod arm {
    use std::arch::aarch64::*;
    use std::arch::asm;

    use super::F32x;

    pub(crate) struct Neon;

    impl F32x for Neon {
        type V = float32x4_t;
        const LANES: usize = 4;
        const MANY_REGISTERS: bool = true;

        #[inline]
        #[target_feature(enable = "neon")]
        unsafe fn zero() -> float32x4_t {
            vdupq_n_f32(0.0)
        }
        #[inline]
        #[target_feature(enable = "neon")]
        unsafe fn splat(x: f32) -> float32x4_t {
            vdupq_n_f32(x)
        }
        #[inline]
        #[target_feature(enable = "neon")]
        unsafe fn load(p: *const f32) -> float32x4_t {
            // SAFETY: by the caller's contract.
            unsafe { vld1q_f32(p) }
        }
        #[inline]
        #[target_feature(enable = "neon")]
        unsafe fn load_f16(p: *const u16) -> float32x4_t {
            // SAFETY: by the caller's contract.
            let h = unsafe { vld1_u16(p) };
            let out: float32x4_t;
            // SAFETY: register-only conversion (FCVTL is base Advanced SIMD; its
            // intrinsic is not stable in Rust yet).
            unsafe {
                asm!(
                    "fcvtl {out:v}.4s, {h:v}.4h",
                    out = out(vreg) out,
                    h = in(vreg) h,
                    options(pure, nomem, nostack, preserves_flags),
                )
            };
            out
        }
        #[inline]
        #[target_feature(enable = "neon")]
        unsafe fn store(p: *mut f32, v: float32x4_t) {
            // SAFETY: by the caller's contract.
            unsafe { vst1q_f32(p, v) }
        }
        #[inline]
        #[target_feature(enable = "neon")]
        unsafe fn store_first(p: *mut f32, v: float32x4_t, n: usize) {
            let mut all = [0f32; 4];
            // SAFETY: by the caller's contract, `p..p + n` is writable.
            unsafe {
                vst1q_f32(all.as_mut_ptr(), v);
                std::ptr::copy_nonoverlapping(all.as_ptr(), p, n);
            }
        }
        #[inline]
        #[target_feature(enable = "neon")]
        unsafe fn fmadd(a: float32x4_t, b: float32x4_t, c: float32x4_t) -> float32x4_t {
            vfmaq_f32(c, a, b)
        }
        #[inline]
        #[target_feature(enable = "neon")]
        unsafe fn mul(a: float32x4_t, b: float32x4_t) -> float32x4_t {
            vmulq_f32(a, b)
        }
        #[inline]
        #[target_feature(enable = "neon")]
        unsafe fn reduce_add(v: float32x4_t) -> f32 {
            vaddvq_f32(v)
        }
        #[inline]
        #[target_feature(enable = "neon")]
        unsafe fn sums_of_each(v: &[float32x4_t]) -> float32x4_t {
            assert_eq!(v.len(), 4);
            vpaddq_f32(vpaddq_f32(v[0], v[1]), vpaddq_f32(v[2], v[3]))
        }
        #[inline(always)]
        fn prefetch(p: *const u8) {
            super::prefetch(p)
        }
    }
}
