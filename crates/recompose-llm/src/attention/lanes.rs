//! f32 vectors for the register-blocked tile kernels: one trait, three widths (a plain f32 for
//! CPUs without AVX2, AVX2 `__m256`, AVX-512 `__m512`). The compiler does not vectorise the
//! blocked loops on its own (it keeps the accumulators in memory), so the kernels are written
//! against this trait. Every method is `unsafe`: the caller runs inside a function compiled for
//! the instruction set (`simd::isa_variants!`) and passes pointers with `N` readable lanes.

#![allow(clippy::missing_safety_doc)]

/// Constants of the exponential (Cephes' polynomial on [-ln2/2, ln2/2]).
const EXP_LO: f32 = -87.336_54;
const EXP_HI: f32 = 88.0;
/// 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
const MAGIC: f32 = 12_582_912.0;
const P: [f32; 6] = [1.987_569_1e-4, 1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];

pub(crate) trait Lanes: Copy {
    const N: usize;
    unsafe fn zero() -> Self;
    unsafe fn splat(x: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    /// `self * b + c`.
    unsafe fn fma(self, b: Self, c: Self) -> Self;
    unsafe fn add(self, b: Self) -> Self;
    unsafe fn sub(self, b: Self) -> Self;
    unsafe fn mul(self, b: Self) -> Self;
    unsafe fn max(self, b: Self) -> Self;
    unsafe fn min(self, b: Self) -> Self;
    /// `2^n` from `t = MAGIC + n` (n in -126..=127).
    unsafe fn pow2_magic(t: Self) -> Self;
    /// `self` where `x >= lim`, 0 elsewhere.
    unsafe fn zero_below(self, x: Self, lim: Self) -> Self;
    unsafe fn hsum(self) -> f32;
    unsafe fn hmax(self) -> f32;
}

/// `e^x` per lane, as `simd::exp` (0 below -87.3).
#[inline(always)]
pub(crate) unsafe fn exp<V: Lanes>(x: V) -> V {
    let xc = x.max(V::splat(EXP_LO)).min(V::splat(EXP_HI));
    let t = xc.fma(V::splat(std::f32::consts::LOG2_E), V::splat(MAGIC));
    let n = t.sub(V::splat(MAGIC));
    let r = n.fma(V::splat(-0.693_359_4), xc);
    let r = n.fma(V::splat(2.121_944_4e-4), r);
    let mut p = V::splat(P[0]);
    for c in &P[1..] {
        p = p.fma(r, V::splat(*c));
    }
    let y = p.fma(r.mul(r), r).add(V::splat(1.0));
    y.mul(V::pow2_magic(t)).zero_below(x, V::splat(EXP_LO))
}

/// Plain f32, for CPUs without AVX2.
impl Lanes for f32 {
    const N: usize = 1;
    #[inline(always)]
    unsafe fn zero() -> Self {
        0.0
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        x
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        *p
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        *p = self
    }
    #[inline(always)]
    unsafe fn fma(self, b: Self, c: Self) -> Self {
        self * b + c
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        self + b
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        self - b
    }
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        self * b
    }
    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        if self > b {
            self
        } else {
            b
        }
    }
    #[inline(always)]
    unsafe fn min(self, b: Self) -> Self {
        if self < b {
            self
        } else {
            b
        }
    }
    #[inline(always)]
    unsafe fn pow2_magic(t: Self) -> Self {
        f32::from_bits(t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23)
    }
    #[inline(always)]
    unsafe fn zero_below(self, x: Self, lim: Self) -> Self {
        if x < lim {
            0.0
        } else {
            self
        }
    }
    #[inline(always)]
    unsafe fn hsum(self) -> f32 {
        self
    }
    #[inline(always)]
    unsafe fn hmax(self) -> f32 {
        self
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Lanes, MAGIC};
    use std::arch::x86_64::*;

    impl Lanes for __m256 {
        const N: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> Self {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            _mm256_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm256_storeu_ps(p, self)
        }
        #[inline(always)]
        unsafe fn fma(self, b: Self, c: Self) -> Self {
            _mm256_fmadd_ps(self, b, c)
        }
        #[inline(always)]
        unsafe fn add(self, b: Self) -> Self {
            _mm256_add_ps(self, b)
        }
        #[inline(always)]
        unsafe fn sub(self, b: Self) -> Self {
            _mm256_sub_ps(self, b)
        }
        #[inline(always)]
        unsafe fn mul(self, b: Self) -> Self {
            _mm256_mul_ps(self, b)
        }
        #[inline(always)]
        unsafe fn max(self, b: Self) -> Self {
            _mm256_max_ps(self, b)
        }
        #[inline(always)]
        unsafe fn min(self, b: Self) -> Self {
            _mm256_min_ps(self, b)
        }
        #[inline(always)]
        unsafe fn pow2_magic(t: Self) -> Self {
            let n = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(MAGIC.to_bits() as i32));
            _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(n, _mm256_set1_epi32(127))))
        }
        #[inline(always)]
        unsafe fn zero_below(self, x: Self, lim: Self) -> Self {
            _mm256_and_ps(self, _mm256_cmp_ps::<_CMP_GE_OQ>(x, lim))
        }
        #[inline(always)]
        unsafe fn hsum(self) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(self), _mm256_extractf128_ps::<1>(self));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
        }
        #[inline(always)]
        unsafe fn hmax(self) -> f32 {
            let s = _mm_max_ps(_mm256_castps256_ps128(self), _mm256_extractf128_ps::<1>(self));
            let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps::<1>(s, s)))
        }
    }

    impl Lanes for __m512 {
        const N: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> Self {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            _mm512_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm512_storeu_ps(p, self)
        }
        #[inline(always)]
        unsafe fn fma(self, b: Self, c: Self) -> Self {
            _mm512_fmadd_ps(self, b, c)
        }
        #[inline(always)]
        unsafe fn add(self, b: Self) -> Self {
            _mm512_add_ps(self, b)
        }
        #[inline(always)]
        unsafe fn sub(self, b: Self) -> Self {
            _mm512_sub_ps(self, b)
        }
        #[inline(always)]
        unsafe fn mul(self, b: Self) -> Self {
            _mm512_mul_ps(self, b)
        }
        #[inline(always)]
        unsafe fn max(self, b: Self) -> Self {
            _mm512_max_ps(self, b)
        }
        #[inline(always)]
        unsafe fn min(self, b: Self) -> Self {
            _mm512_min_ps(self, b)
        }
        #[inline(always)]
        unsafe fn pow2_magic(t: Self) -> Self {
            let n = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(MAGIC.to_bits() as i32));
            _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(n, _mm512_set1_epi32(127))))
        }
        #[inline(always)]
        unsafe fn zero_below(self, x: Self, lim: Self) -> Self {
            _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, lim), self)
        }
        #[inline(always)]
        unsafe fn hsum(self) -> f32 {
            _mm512_reduce_add_ps(self)
        }
        #[inline(always)]
        unsafe fn hmax(self) -> f32 {
            _mm512_reduce_max_ps(self)
        }
    }
}

/// The vector types of the two x86 widths (plain f32 elsewhere, never run).
#[cfg(target_arch = "x86_64")]
pub(crate) type Narrow = std::arch::x86_64::__m256;
#[cfg(target_arch = "x86_64")]
pub(crate) type Wide = std::arch::x86_64::__m512;
#[cfg(not(target_arch = "x86_64"))]
pub(crate) type Narrow = f32;
#[cfg(not(target_arch = "x86_64"))]
pub(crate) type Wide = f32;

/// f64 vectors for the split kernel's sums, filled from f32 values.
pub(crate) trait Lanes64: Copy {
    /// f64 lanes per vector; `load_cvt` reads `2 * N` f32 values.
    const N: usize;
    unsafe fn zero() -> Self;
    unsafe fn splat(x: f64) -> Self;
    /// `2 * N` f32 values from `p`, widened.
    unsafe fn load_cvt(p: *const f32) -> (Self, Self);
    unsafe fn load(p: *const f64) -> Self;
    unsafe fn store(self, p: *mut f64);
    /// `self * b + c`.
    unsafe fn fma(self, b: Self, c: Self) -> Self;
}

impl Lanes64 for f64 {
    const N: usize = 1;
    #[inline(always)]
    unsafe fn zero() -> Self {
        0.0
    }
    #[inline(always)]
    unsafe fn splat(x: f64) -> Self {
        x
    }
    #[inline(always)]
    unsafe fn load_cvt(p: *const f32) -> (Self, Self) {
        (*p as f64, *p.add(1) as f64)
    }
    #[inline(always)]
    unsafe fn load(p: *const f64) -> Self {
        *p
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f64) {
        *p = self
    }
    #[inline(always)]
    unsafe fn fma(self, b: Self, c: Self) -> Self {
        self * b + c
    }
}

#[cfg(target_arch = "x86_64")]
mod x86_64f {
    use super::Lanes64;
    use std::arch::x86_64::*;

    impl Lanes64 for __m256d {
        const N: usize = 4;
        #[inline(always)]
        unsafe fn zero() -> Self {
            _mm256_setzero_pd()
        }
        #[inline(always)]
        unsafe fn splat(x: f64) -> Self {
            _mm256_set1_pd(x)
        }
        #[inline(always)]
        unsafe fn load_cvt(p: *const f32) -> (Self, Self) {
            (_mm256_cvtps_pd(_mm_loadu_ps(p)), _mm256_cvtps_pd(_mm_loadu_ps(p.add(4))))
        }
        #[inline(always)]
        unsafe fn load(p: *const f64) -> Self {
            _mm256_loadu_pd(p)
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f64) {
            _mm256_storeu_pd(p, self)
        }
        #[inline(always)]
        unsafe fn fma(self, b: Self, c: Self) -> Self {
            _mm256_fmadd_pd(self, b, c)
        }
    }

    impl Lanes64 for __m512d {
        const N: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> Self {
            _mm512_setzero_pd()
        }
        #[inline(always)]
        unsafe fn splat(x: f64) -> Self {
            _mm512_set1_pd(x)
        }
        #[inline(always)]
        unsafe fn load_cvt(p: *const f32) -> (Self, Self) {
            (_mm512_cvtps_pd(_mm256_loadu_ps(p)), _mm512_cvtps_pd(_mm256_loadu_ps(p.add(8))))
        }
        #[inline(always)]
        unsafe fn load(p: *const f64) -> Self {
            _mm512_loadu_pd(p)
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f64) {
            _mm512_storeu_pd(p, self)
        }
        #[inline(always)]
        unsafe fn fma(self, b: Self, c: Self) -> Self {
            _mm512_fmadd_pd(self, b, c)
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) type Narrow64 = std::arch::x86_64::__m256d;
#[cfg(target_arch = "x86_64")]
pub(crate) type Wide64 = std::arch::x86_64::__m512d;
#[cfg(not(target_arch = "x86_64"))]
pub(crate) type Narrow64 = f64;
#[cfg(not(target_arch = "x86_64"))]
pub(crate) type Wide64 = f64;

/// Asks for the cache line holding `p` ahead of its use (a hint: never faults).
#[inline(always)]
pub(crate) fn prefetch(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint; any address is allowed.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Prefetches the `d` floats from `p` (a cache row of keys or values).
#[inline(always)]
pub(crate) fn prefetch_row(p: *const f32, d: usize) {
    for c in (0..d).step_by(16) {
        prefetch(p.wrapping_add(c));
    }
}
