//! The x86-64 kernels over the tiled weight layout of `quant::PackedWeight`: AVX-512 VNNI
//! (one 512-bit `vpdpbusd` = 16 rows x 4 columns against a broadcast 4-byte activation group),
//! AVX2 (the same tiles as two 8-row halves, `vpmaddubsw` + `vpmaddwd`), and the matching
//! activation block quantisers. Callers must have checked the CPU features (`quant::level`).
//!
//! Exactness: the integer dot products are exact. Q4_0's `-8` and Q8_0's `+128` weight offsets
//! are removed in integers by starting the accumulator at `-8 * sum(q_a)` / `-128 * sum(q_a)`;
//! Q4_1's minimum is added in f32 as `m_w * s_a`. AVX2 has no unsigned x signed dot without i16
//! saturation for Q8, so there the weights are unbiased again and the sign moved onto the
//! activations (`|w| * sign(a, w)`, at most 128 * 127 * 2 per i16 pair); for Q4 eight pair sums
//! of at most 15 * 127 * 2 stay below 32767.

use super::quant::{Kind, PackedWeight, Q8Acts, QK, TR};
use std::arch::x86_64::*;

const PF: usize = 4096;
const K40: u8 = 0;
const K41: u8 = 1;
const K80: u8 = 2;

/// Activation pointers for a group of rows starting at one row.
#[derive(Clone, Copy)]
struct Acts {
    q: *const i8,
    d: *const f32,
    s: *const f32,
    isum: *const i32,
}

impl Acts {
    /// # Safety
    /// `n < x.rows`.
    unsafe fn at(x: &Q8Acts, n: usize) -> Self {
        let nb = x.blocks;
        Acts {
            q: x.qs.as_ptr().add(n * nb * QK),
            d: x.d.as_ptr().add(n * nb),
            s: x.s.as_ptr().add(n * nb),
            isum: x.isum.as_ptr().add(n * nb),
        }
    }
}

/// The i32 the accumulator starts from: removes the weight offset of Q4_0 / Q8_0.
#[inline(always)]
unsafe fn offset_init<const K: u8>(a: Acts, ai: usize) -> i32 {
    match K {
        K40 => -8 * *a.isum.add(ai),
        K80 => -128 * *a.isum.add(ai),
        _ => 0,
    }
}

macro_rules! by_nr {
    ($nr:expr, $f:ident, $k:ident, $arg:expr, [$($n:literal)*], $max:literal) => {
        match $nr {
            $($n => $f::<$n, $k>($arg),)*
            _ => $f::<$max, $k>($arg),
        }
    };
}

/// Output columns `t0 * 16 .. min(t1 * 16, rows)` for all activation rows, AVX-512 VNNI.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C must be present; `out` must hold `x.rows * w.rows()`
/// floats; `x` must match `w` (as asserted by `quant::matmul`); `t1 <= w.tiles()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn tiles_vnni(w: &PackedWeight, x: &Q8Acts, out: *mut f32, t0: usize, t1: usize) {
    let (nb, rows) = (w.blocks(), w.rows());
    let (qb, sb) = (w.qbytes(), w.sbytes());
    let (q, s) = (w.qs_bytes().as_ptr(), w.sc_bytes().as_ptr());
    for t in t0..t1 {
        let valid = (rows - t * TR).min(TR);
        let mask = ((1u32 << valid) - 1) as __mmask16;
        let (wq, ws) = (q.add(t * nb * qb), s.add(t * nb * sb));
        let mut n = 0;
        while n < x.rows {
            let nr = (x.rows - n).min(8);
            let (a, o) = (Acts::at(x, n), out.add(n * rows + t * TR));
            let args = (wq, ws, nb, a, o, rows, mask);
            match w.kind() {
                Kind::Q4_0 => by_nr!(nr, vnni_tile, K40, args, [1 2 3 4 5 6 7], 8),
                Kind::Q4_1 => by_nr!(nr, vnni_tile, K41, args, [1 2 3 4 5 6 7], 8),
                Kind::Q8_0 => by_nr!(nr, vnni_tile, K80, args, [1 2 3 4 5 6 7], 8),
            }
            n += nr;
        }
    }
}

type TileArgs<M> = (*const u8, *const u8, usize, Acts, *mut f32, usize, M);

/// One 16-row tile against `NR` activation rows.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn vnni_tile<const NR: usize, const K: u8>(args: TileArgs<__mmask16>) {
    let (wq, ws, nb, a, o, ostride, mask) = args;
    let (qb, sb) = match K {
        K80 => (TR * QK, 2 * TR),
        K41 => (TR * QK / 2, 4 * TR),
        _ => (TR * QK / 2, 2 * TR),
    };
    let lo = _mm512_set1_epi8(0x0F);
    let mut f = [_mm512_setzero_ps(); NR];
    for b in 0..nb {
        let p = wq.add(b * qb);
        if NR >= 2 {
            for l in (0..qb).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PF + l) as *const i8);
            }
            _mm_prefetch::<_MM_HINT_T0>(ws.wrapping_add(b * sb + PF / 4) as *const i8);
        }
        let mut wv = [_mm512_setzero_si512(); 8];
        if K == K80 {
            for (g, v) in wv.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(p.add(64 * g) as *const _);
            }
        } else {
            for g in 0..4 {
                let v = _mm512_loadu_si512(p.add(64 * g) as *const _);
                wv[g] = _mm512_and_si512(v, lo);
                wv[g + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), lo);
            }
        }
        let sp = ws.add(b * sb);
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(sp as *const __m256i));
        let m = if K == K41 {
            _mm512_cvtph_ps(_mm256_loadu_si256(sp.add(32) as *const __m256i))
        } else {
            _mm512_setzero_ps()
        };
        for (i, f) in f.iter_mut().enumerate() {
            let ai = i * nb + b;
            let aq = a.q.add(ai * QK) as *const i32;
            let mut acc = _mm512_set1_epi32(offset_init::<K>(a, ai));
            if NR <= 2 {
                // Few rows: two dependency chains per row.
                let mut acc2 = _mm512_setzero_si512();
                for g in 0..4 {
                    acc = _mm512_dpbusd_epi32(acc, wv[g], _mm512_set1_epi32(aq.add(g).read_unaligned()));
                    acc2 = _mm512_dpbusd_epi32(acc2, wv[g + 4], _mm512_set1_epi32(aq.add(g + 4).read_unaligned()));
                }
                acc = _mm512_add_epi32(acc, acc2);
            } else {
                for (g, wg) in wv.iter().enumerate() {
                    acc = _mm512_dpbusd_epi32(acc, *wg, _mm512_set1_epi32(aq.add(g).read_unaligned()));
                }
            }
            let sc = _mm512_mul_ps(d, _mm512_set1_ps(*a.d.add(ai)));
            *f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), sc, *f);
            if K == K41 {
                *f = _mm512_fmadd_ps(m, _mm512_set1_ps(*a.s.add(ai)), *f);
            }
        }
    }
    for (i, f) in f.iter().enumerate() {
        _mm512_mask_storeu_ps(o.add(i * ostride), mask, *f);
    }
}

/// Output columns `t0 * 16 .. min(t1 * 16, rows)` for all activation rows, AVX2.
///
/// # Safety
/// AVX2, FMA and F16C must be present; otherwise as [`tiles_vnni`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tiles_avx2(w: &PackedWeight, x: &Q8Acts, out: *mut f32, t0: usize, t1: usize) {
    let (nb, rows) = (w.blocks(), w.rows());
    let (qb, sb) = (w.qbytes(), w.sbytes());
    let (q, s) = (w.qs_bytes().as_ptr(), w.sc_bytes().as_ptr());
    for t in t0..t1 {
        let valid = (rows - t * TR).min(TR);
        for h in 0..2 {
            let vh = valid.saturating_sub(8 * h).min(8);
            if vh == 0 {
                break;
            }
            // Half h: rows 8h..8h+8 are bytes 32h..32h+32 of each 64-byte group, scales 8h..8h+8.
            let (wq, ws) = (q.add(t * nb * qb + 32 * h), s.add(t * nb * sb + 16 * h));
            let mut n = 0;
            while n < x.rows {
                let nr = (x.rows - n).min(4);
                let (a, o) = (Acts::at(x, n), out.add(n * rows + t * TR + 8 * h));
                let args = (wq, ws, nb, a, o, rows, vh);
                match w.kind() {
                    Kind::Q4_0 => by_nr!(nr, avx2_half, K40, args, [1 2 3], 4),
                    Kind::Q4_1 => by_nr!(nr, avx2_half, K41, args, [1 2 3], 4),
                    Kind::Q8_0 => by_nr!(nr, avx2_half, K80, args, [1 2 3], 4),
                }
                n += nr;
            }
        }
    }
}

/// One 8-row half tile against `NR` activation rows; `valid` of the 8 outputs are stored.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2_half<const NR: usize, const K: u8>(args: TileArgs<usize>) {
    let (wq, ws, nb, a, o, ostride, valid) = args;
    let (qb, sb) = match K {
        K80 => (TR * QK, 2 * TR),
        K41 => (TR * QK / 2, 4 * TR),
        _ => (TR * QK / 2, 2 * TR),
    };
    let lo = _mm256_set1_epi8(0x0F);
    let flip = _mm256_set1_epi8(-128);
    let ones = _mm256_set1_epi16(1);
    let mut f = [_mm256_setzero_ps(); NR];
    for b in 0..nb {
        let p = wq.add(b * qb);
        if NR >= 2 {
            for l in (0..qb).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PF + l) as *const i8);
            }
            _mm_prefetch::<_MM_HINT_T0>(ws.wrapping_add(b * sb + PF / 4) as *const i8);
        }
        // Q4: i16 pair sums (8 groups fit); Q8: i32 sums.
        let mut acc = [_mm256_setzero_si256(); NR];
        for g in 0..8 {
            if K == K80 {
                let sw = _mm256_xor_si256(_mm256_loadu_si256(p.add(64 * g) as *const __m256i), flip);
                let aw = _mm256_abs_epi8(sw);
                for (i, acc) in acc.iter_mut().enumerate() {
                    let av = _mm256_set1_epi32((a.q.add((i * nb + b) * QK) as *const i32).add(g).read_unaligned());
                    let prod = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(av, sw));
                    *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(prod, ones));
                }
            } else {
                let v = _mm256_loadu_si256(p.add(64 * (g % 4)) as *const __m256i);
                let wg = if g < 4 { _mm256_and_si256(v, lo) } else { _mm256_and_si256(_mm256_srli_epi16::<4>(v), lo) };
                for (i, acc) in acc.iter_mut().enumerate() {
                    let av = _mm256_set1_epi32((a.q.add((i * nb + b) * QK) as *const i32).add(g).read_unaligned());
                    *acc = _mm256_add_epi16(*acc, _mm256_maddubs_epi16(wg, av));
                }
            }
        }
        let sp = ws.add(b * sb);
        let d = _mm256_cvtph_ps(_mm_loadu_si128(sp as *const __m128i));
        let m =
            if K == K41 { _mm256_cvtph_ps(_mm_loadu_si128(sp.add(32) as *const __m128i)) } else { _mm256_setzero_ps() };
        for (i, (f, acc)) in f.iter_mut().zip(acc).enumerate() {
            let ai = i * nb + b;
            let mut s32 = if K == K80 { acc } else { _mm256_madd_epi16(acc, ones) };
            if K == K40 {
                s32 = _mm256_add_epi32(s32, _mm256_set1_epi32(offset_init::<K>(a, ai)));
            }
            let sc = _mm256_mul_ps(d, _mm256_set1_ps(*a.d.add(ai)));
            *f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), sc, *f);
            if K == K41 {
                *f = _mm256_fmadd_ps(m, _mm256_set1_ps(*a.s.add(ai)), *f);
            }
        }
    }
    for (i, f) in f.iter().enumerate() {
        let dst = o.add(i * ostride);
        if valid == 8 {
            _mm256_storeu_ps(dst, *f);
        } else {
            let mut tmp = [0f32; 8];
            _mm256_storeu_ps(tmp.as_mut_ptr(), *f);
            std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, valid);
        }
    }
}

/// `quant::quantize_block` for one block of 32, bit-identical, AVX-512.
///
/// # Safety
/// AVX-512 F must be present. `x` and `q` hold 32 elements.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn quantize_block_avx512(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    assert!(x.len() == QK && q.len() == QK, "block size"); // ok: internal invariant
    let v = [_mm512_loadu_ps(x.as_ptr()), _mm512_loadu_ps(x.as_ptr().add(16))];
    // max_ps returns its second operand when either is NaN: NaNs are skipped as in the reference.
    let m = _mm512_max_ps(_mm512_abs_ps(v[1]), _mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_setzero_ps()));
    let amax = _mm512_reduce_max_ps(m);
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let (idv, lo, hi) = (_mm512_set1_ps(id), _mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
    let mut sum = _mm512_setzero_si512();
    for (h, v) in v.into_iter().enumerate() {
        let r = _mm512_mul_ps(v, idv);
        let r = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(r, r), r);
        let r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
        let i = _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(r);
        sum = _mm512_add_epi32(sum, i);
        _mm_storeu_si128(q.as_mut_ptr().add(16 * h) as *mut __m128i, _mm512_cvtepi32_epi8(i));
    }
    (d, _mm512_reduce_add_epi32(sum))
}

/// `quant::quantize_block` for one block of 32, bit-identical, AVX2.
///
/// # Safety
/// AVX2 must be present. `x` and `q` hold 32 elements.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_block_avx2(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    assert!(x.len() == QK && q.len() == QK, "block size"); // ok: internal invariant
    let p = x.as_ptr();
    let v = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
    let absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    let mut m = _mm256_setzero_ps();
    for v in v {
        m = _mm256_max_ps(_mm256_and_ps(v, absm), m);
    }
    let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps::<1>(m2, m2)));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let (idv, lo, hi) = (_mm256_set1_ps(id), _mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
    let mut iv = [_mm256_setzero_si256(); 4];
    for (iv, v) in iv.iter_mut().zip(v) {
        let r = _mm256_mul_ps(v, idv);
        let r = _mm256_and_ps(r, _mm256_cmp_ps::<_CMP_ORD_Q>(r, r));
        let r = _mm256_min_ps(_mm256_max_ps(r, lo), hi);
        *iv = _mm256_cvttps_epi32(_mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(r));
    }
    let s = _mm256_add_epi32(_mm256_add_epi32(iv[0], iv[1]), _mm256_add_epi32(iv[2], iv[3]));
    let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
    let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32::<0b01_00_11_10>(s4));
    let sum = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32::<0b10_11_00_01>(s2)));
    // Packing works per 128-bit lane; the permute restores element order.
    let p16 = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]), _mm256_packs_epi32(iv[2], iv[3]));
    let bytes = _mm256_permutevar8x32_epi32(p16, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, bytes);
    (d, sum)
}
