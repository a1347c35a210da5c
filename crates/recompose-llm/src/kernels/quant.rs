//! Quantised matrix multiplication on the CPU: weights in 4-bit (Q4_0/Q4_1) or 8-bit (Q8_0)
//! blocks of 32, activations quantised to 8-bit blocks on the fly, integer dot products with
//! AVX-512 VNNI or AVX2 picked at run time (never at build time), and a portable scalar path
//! that is also the oracle the SIMD paths are tested against.
//!
//! Owns the packed weight layout and the kernels; knows nothing about models.

use rayon::prelude::*;
use std::sync::OnceLock;

/// Elements per block.
pub const QK: usize = 32;

/// Weights repacked for the kernels: f32 scales beside the packed quants, one row per output.
pub enum PackedWeight {
    /// value = nibble * d + m (Q4_1 as is; Q4_0 becomes m = -8 d). Nibbles: low = elements
    /// 0..16 of the block, high = 16..32, as in GGML.
    Q4 { d: Vec<f32>, m: Vec<f32>, qs: Vec<u8>, rows: usize, cols: usize },
    /// value = q * d.
    Q8 { d: Vec<f32>, qs: Vec<i8>, rows: usize, cols: usize },
}

/// Activations quantised to 8 bits per block of 32: scale `d`, `s = d * sum(q)`.
pub struct Q8Acts {
    pub rows: usize,
    pub blocks: usize,
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    pub qs: Vec<i8>,
}

fn f16(b: &[u8]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

impl PackedWeight {
    /// Repacks GGML Q4_0 (18-byte blocks), Q4_1 (20) or Q8_0 (34) data of a `rows x cols` matrix.
    /// Returns None for other types or a size mismatch.
    pub fn from_ggml(dtype: candle_core::quantized::GgmlDType, bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        use candle_core::quantized::GgmlDType as T;
        if cols % QK != 0 {
            return None;
        }
        let nb = rows * cols / QK;
        match dtype {
            T::Q4_0 | T::Q4_1 => {
                let bs = if dtype == T::Q4_0 { 18 } else { 20 };
                if bytes.len() != nb * bs {
                    return None;
                }
                let (mut d, mut m, mut qs) = (Vec::with_capacity(nb), Vec::with_capacity(nb), Vec::with_capacity(nb * 16));
                for blk in bytes.chunks_exact(bs) {
                    let dd = f16(&blk[0..2]);
                    d.push(dd);
                    if dtype == T::Q4_0 {
                        m.push(-8.0 * dd);
                        qs.extend_from_slice(&blk[2..18]);
                    } else {
                        m.push(f16(&blk[2..4]));
                        qs.extend_from_slice(&blk[4..20]);
                    }
                }
                Some(PackedWeight::Q4 { d, m, qs, rows, cols })
            }
            T::Q8_0 => {
                if bytes.len() != nb * 34 {
                    return None;
                }
                let (mut d, mut qs) = (Vec::with_capacity(nb), Vec::with_capacity(nb * QK));
                for blk in bytes.chunks_exact(34) {
                    d.push(f16(&blk[0..2]));
                    qs.extend(blk[2..34].iter().map(|&b| b as i8));
                }
                Some(PackedWeight::Q8 { d, qs, rows, cols })
            }
            _ => None,
        }
    }

    pub fn rows(&self) -> usize {
        match self {
            PackedWeight::Q4 { rows, .. } | PackedWeight::Q8 { rows, .. } => *rows,
        }
    }
    pub fn cols(&self) -> usize {
        match self {
            PackedWeight::Q4 { cols, .. } | PackedWeight::Q8 { cols, .. } => *cols,
        }
    }
    pub fn bytes(&self) -> usize {
        match self {
            PackedWeight::Q4 { d, m, qs, .. } => 4 * d.len() + 4 * m.len() + qs.len(),
            PackedWeight::Q8 { d, qs, .. } => 4 * d.len() + qs.len(),
        }
    }

    /// Dequantises one row (embedding lookups).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let nb = self.cols() / QK;
        match self {
            PackedWeight::Q4 { d, m, qs, .. } => {
                for b in 0..nb {
                    let i = r * nb + b;
                    let q = &qs[i * 16..i * 16 + 16];
                    for j in 0..16 {
                        out[b * QK + j] = (q[j] & 0x0F) as f32 * d[i] + m[i];
                        out[b * QK + j + 16] = (q[j] >> 4) as f32 * d[i] + m[i];
                    }
                }
            }
            PackedWeight::Q8 { d, qs, .. } => {
                for b in 0..nb {
                    let i = r * nb + b;
                    for j in 0..QK {
                        out[b * QK + j] = qs[i * QK + j] as f32 * d[i];
                    }
                }
            }
        }
    }
}

/// Quantises `rows x cols` f32 activations (cols a multiple of 32).
pub fn quantize_acts(x: &[f32], rows: usize, cols: usize) -> Q8Acts {
    let blocks = cols / QK;
    let n = rows * blocks;
    let mut a = Q8Acts { rows, blocks, d: vec![0.0; n], s: vec![0.0; n], qs: vec![0; n * QK] };
    for (i, blk) in x[..rows * cols].chunks_exact(QK).enumerate() {
        let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (j, v) in blk.iter().enumerate() {
            let q = (v * id).round() as i32;
            a.qs[i * QK + j] = q as i8;
            sum += q;
        }
        a.d[i] = d;
        a.s[i] = d * sum as f32;
    }
    a
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Scalar,
    Avx2,
    Avx512Vnni,
}

/// The best kernel level this CPU supports (detected once). `RECOMPOSE_KERNEL=scalar|avx2`
/// forces a lower level, for tests and comparisons.
pub fn level() -> Level {
    static L: OnceLock<Level> = OnceLock::new();
    *L.get_or_init(|| {
        let forced = std::env::var("RECOMPOSE_KERNEL").ok();
        detect(forced.as_deref())
    })
}

fn detect(forced: Option<&str>) -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        let vnni = is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") && is_x86_feature_detected!("avx512bw");
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        match forced {
            Some("scalar") => Level::Scalar,
            Some("avx2") if avx2 => Level::Avx2,
            _ if vnni && avx2 => Level::Avx512Vnni,
            _ if avx2 => Level::Avx2,
            _ => Level::Scalar,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = forced;
        Level::Scalar
    }
}

/// Activation rows processed together (weight blocks are unpacked once per group).
const NR: usize = 4;

/// `out[n, r] = sum_k x[n, k] * w[r, k]` for all activation rows n and weight rows r.
/// `out` is `x.rows x w.rows()`, row-major.
pub fn matmul(w: &PackedWeight, x: &Q8Acts, out: &mut [f32], lvl: Level) {
    let rows = w.rows();
    assert_eq!(out.len(), x.rows * rows, "output buffer size"); // ok: internal invariant
    assert_eq!(x.blocks * QK, w.cols(), "activation width"); // ok: internal invariant
    // Chunks of output rows per task: enough tasks to balance, few enough to keep overhead low.
    let threads = rayon::current_num_threads().max(1);
    let chunk = (rows / (threads * 8)).clamp(16, 512);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let n_chunks = rows.div_ceil(chunk);
    let work = |c: usize| {
        let r0 = c * chunk;
        let r1 = (r0 + chunk).min(rows);
        let mut n = 0;
        while n < x.rows {
            let nr = (x.rows - n).min(NR);
            for r in r0..r1 {
                let mut res = [0f32; NR];
                dot_rows(w, r, x, n, nr, &mut res, lvl);
                for (i, v) in res[..nr].iter().enumerate() {
                    // SAFETY: each (n + i, r) is written by exactly one task; in bounds by the asserts.
                    unsafe { *out_ptr.get().add((n + i) * rows + r) = *v };
                }
            }
            n += nr;
        }
    };
    if n_chunks == 1 || threads == 1 {
        (0..n_chunks).for_each(work);
    } else {
        (0..n_chunks).into_par_iter().for_each(work);
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[inline]
fn dot_rows(w: &PackedWeight, r: usize, x: &Q8Acts, n: usize, nr: usize, res: &mut [f32; NR], lvl: Level) {
    match lvl {
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 | Level::Avx512Vnni => unsafe {
            // SAFETY: `level()` verified the CPU features.
            match (w, lvl) {
                (PackedWeight::Q4 { .. }, Level::Avx512Vnni) => x86::q4_vnni(w, r, x, n, nr, res),
                (PackedWeight::Q4 { .. }, _) => x86::q4_avx2(w, r, x, n, nr, res),
                (PackedWeight::Q8 { .. }, Level::Avx512Vnni) => x86::q8_vnni(w, r, x, n, nr, res),
                (PackedWeight::Q8 { .. }, _) => x86::q8_avx2(w, r, x, n, nr, res),
            }
        },
        _ => scalar_dot_rows(w, r, x, n, nr, res),
    }
}

/// The plain reference: integer dot per block, scaled.
pub fn scalar_dot_rows(w: &PackedWeight, r: usize, x: &Q8Acts, n: usize, nr: usize, res: &mut [f32; NR]) {
    let nb = x.blocks;
    for (i, out) in res.iter_mut().enumerate().take(nr) {
        let row = n + i;
        let mut acc = 0f32;
        for b in 0..nb {
            let wi = r * nb + b;
            let ai = row * nb + b;
            let aq = &x.qs[ai * QK..ai * QK + QK];
            match w {
                PackedWeight::Q4 { d, m, qs, .. } => {
                    let q = &qs[wi * 16..wi * 16 + 16];
                    let mut s = 0i32;
                    for j in 0..16 {
                        s += (q[j] & 0x0F) as i32 * aq[j] as i32 + (q[j] >> 4) as i32 * aq[j + 16] as i32;
                    }
                    acc += d[wi] * x.d[ai] * s as f32 + m[wi] * x.s[ai];
                }
                PackedWeight::Q8 { d, qs, .. } => {
                    let q = &qs[wi * QK..wi * QK + QK];
                    let s: i32 = q.iter().zip(aq).map(|(&a, &b)| a as i32 * b as i32).sum();
                    acc += d[wi] * x.d[ai] * s as f32;
                }
            }
        }
        *out = acc;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{PackedWeight, Q8Acts, NR, QK};
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Unpacks 16 bytes of nibbles into 32 unsigned bytes (low nibbles first).
    #[inline(always)]
    unsafe fn unpack_nibbles(p: *const u8) -> __m256i {
        let q = _mm_loadu_si128(p as *const __m128i);
        let mask = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(q, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
        _mm256_set_m128i(hi, lo)
    }

    macro_rules! q4_kernel {
        ($name:ident, $feat:literal, $dot:expr) => {
            #[target_feature(enable = $feat)]
            pub unsafe fn $name(w: &PackedWeight, r: usize, x: &Q8Acts, n: usize, nr: usize, res: &mut [f32; NR]) {
                let PackedWeight::Q4 { d, m, qs, .. } = w else { return };
                let nb = x.blocks;
                let mut acc = [_mm256_setzero_ps(); NR];
                let mut macc = [0f32; NR];
                let wq = qs.as_ptr().add(r * nb * 16);
                let wd = d.as_ptr().add(r * nb);
                let wm = m.as_ptr().add(r * nb);
                for b in 0..nb {
                    let wv = unpack_nibbles(wq.add(b * 16));
                    let dw = *wd.add(b);
                    let mw = *wm.add(b);
                    for i in 0..nr {
                        let ai = (n + i) * nb + b;
                        let av = _mm256_loadu_si256(x.qs.as_ptr().add(ai * QK) as *const __m256i);
                        let p: __m256i = $dot(wv, av);
                        let scale = _mm256_set1_ps(dw * *x.d.get_unchecked(ai));
                        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[i]);
                        macc[i] += mw * *x.s.get_unchecked(ai);
                    }
                }
                for i in 0..nr {
                    res[i] = hsum(acc[i]) + macc[i];
                }
            }
        };
    }

    macro_rules! q8_kernel {
        ($name:ident, $feat:literal, $dot:expr) => {
            #[target_feature(enable = $feat)]
            pub unsafe fn $name(w: &PackedWeight, r: usize, x: &Q8Acts, n: usize, nr: usize, res: &mut [f32; NR]) {
                let PackedWeight::Q8 { d, qs, .. } = w else { return };
                let nb = x.blocks;
                let mut acc = [_mm256_setzero_ps(); NR];
                let wq = qs.as_ptr().add(r * nb * QK);
                let wd = d.as_ptr().add(r * nb);
                for b in 0..nb {
                    let wv = _mm256_loadu_si256(wq.add(b * QK) as *const __m256i);
                    // |w| as unsigned, sign moved onto the activations.
                    let wabs = _mm256_sign_epi8(wv, wv);
                    let dw = *wd.add(b);
                    for i in 0..nr {
                        let ai = (n + i) * nb + b;
                        let av = _mm256_loadu_si256(x.qs.as_ptr().add(ai * QK) as *const __m256i);
                        let p: __m256i = $dot(wabs, _mm256_sign_epi8(av, wv));
                        let scale = _mm256_set1_ps(dw * *x.d.get_unchecked(ai));
                        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[i]);
                    }
                }
                for i in 0..nr {
                    res[i] = hsum(acc[i]);
                }
            }
        };
    }

    #[inline(always)]
    unsafe fn dot_avx2(u: __m256i, s: __m256i) -> __m256i {
        // u8 x i8 pairs -> i16 (no saturation: |15*127*2| and |128*127*2| fit), then -> i32.
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
    }

    #[inline(always)]
    unsafe fn dot_vnni(u: __m256i, s: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
    }

    q4_kernel!(q4_avx2, "avx2,fma", dot_avx2);
    q4_kernel!(q4_vnni, "avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni", dot_vnni);
    q8_kernel!(q8_avx2, "avx2,fma", dot_avx2);
    q8_kernel!(q8_vnni, "avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni", dot_vnni);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;
    use rand::{Rng, SeedableRng};

    fn random_q4_1(rows: usize, cols: usize, rng: &mut rand::rngs::StdRng) -> Vec<u8> {
        let mut v = vec![];
        for _ in 0..rows * cols / QK {
            v.extend_from_slice(&half::f16::from_f32(rng.random_range(0.001..0.1)).to_bits().to_le_bytes());
            v.extend_from_slice(&half::f16::from_f32(rng.random_range(-0.5..0.5)).to_bits().to_le_bytes());
            for _ in 0..16 {
                v.push(rng.random());
            }
        }
        v
    }

    fn random_q8_0(rows: usize, cols: usize, rng: &mut rand::rngs::StdRng) -> Vec<u8> {
        let mut v = vec![];
        for _ in 0..rows * cols / QK {
            v.extend_from_slice(&half::f16::from_f32(rng.random_range(0.001..0.1)).to_bits().to_le_bytes());
            for _ in 0..QK {
                v.push(rng.random());
            }
        }
        v
    }

    fn check(dtype: GgmlDType, bytes: Vec<u8>, rows: usize, cols: usize, n: usize, rng: &mut rand::rngs::StdRng) {
        let w = PackedWeight::from_ggml(dtype, &bytes, rows, cols).unwrap();
        let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
        let acts = quantize_acts(&x, n, cols);
        let mut reference = vec![0f32; n * rows];
        matmul(&w, &acts, &mut reference, Level::Scalar);
        // The scalar path itself against plain f32 math on dequantised values (quantisation error only).
        let mut row = vec![0f32; cols];
        for r in 0..rows {
            w.dequantize_row(r, &mut row);
            for i in 0..n {
                let exact: f32 = row.iter().zip(&x[i * cols..(i + 1) * cols]).map(|(a, b)| a * b).sum();
                let got = reference[i * rows + r];
                let scale: f32 = row.iter().map(|v| v.abs()).sum::<f32>() * 2.0 / 127.0 + 1e-3;
                assert!((exact - got).abs() <= scale, "{dtype:?} r{r} n{i}: {exact} vs {got}");
            }
        }
        for lvl in [Level::Avx2, Level::Avx512Vnni] {
            if level() == Level::Scalar || (lvl == Level::Avx512Vnni && level() != Level::Avx512Vnni) {
                continue;
            }
            let mut out = vec![0f32; n * rows];
            matmul(&w, &acts, &mut out, lvl);
            for (a, b) in out.iter().zip(&reference) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{dtype:?} {lvl:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn simd_kernels_match_scalar_oracle() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        for &(rows, cols, n) in &[(1, 32, 1), (37, 64, 1), (70, 576, 3), (130, 1536, 9)] {
            let b = random_q4_1(rows, cols, &mut rng);
            check(GgmlDType::Q4_1, b, rows, cols, n, &mut rng);
            let b = random_q8_0(rows, cols, &mut rng);
            check(GgmlDType::Q8_0, b, rows, cols, n, &mut rng);
        }
    }

    #[test]
    fn q8_handles_minus_128() {
        // -128 is the one i8 whose absolute value does not fit; the sign trick must still be exact.
        let mut bytes = half::f16::from_f32(1.0).to_bits().to_le_bytes().to_vec();
        bytes.extend(std::iter::repeat_n(0x80u8, 32));
        let w = PackedWeight::from_ggml(GgmlDType::Q8_0, &bytes, 1, 32).unwrap();
        let acts = quantize_acts(&[1.0; 32], 1, 32);
        let mut a = vec![0f32];
        let mut b = vec![0f32];
        matmul(&w, &acts, &mut a, Level::Scalar);
        matmul(&w, &acts, &mut b, level());
        assert_eq!(a, b);
        assert!((a[0] + 128.0 * 32.0).abs() < 1e-3);
    }

    #[test]
    fn q4_0_repacks_as_offset_q4() {
        let mut bytes = half::f16::from_f32(0.5).to_bits().to_le_bytes().to_vec();
        bytes.extend(std::iter::repeat_n(0x3Au8, 16)); // low nibble 10, high nibble 3
        let w = PackedWeight::from_ggml(GgmlDType::Q4_0, &bytes, 1, 32).unwrap();
        let mut row = vec![0f32; 32];
        w.dequantize_row(0, &mut row);
        assert_eq!(row[0], (10.0 - 8.0) * 0.5);
        assert_eq!(row[16], (3.0 - 8.0) * 0.5);
    }
}
