//! Quantised matrix multiplication on the CPU: weights in 4-bit (Q4_0/Q4_1) or 8-bit (Q8_0)
//! blocks of 32, activations quantised to 8-bit blocks on the fly, integer dot products with
//! AVX-512 VNNI or AVX2 picked at run time (never at build time), and a portable scalar path
//! that is also the oracle the SIMD paths are tested against.
//!
//! Owns the packed weight layout (tiles of 16 output rows, see [`PackedWeight`]), the activation
//! quantiser, the kernel-level selection and the parallel driver; the x86 kernels themselves live
//! in `kernels::x86`. Knows nothing about models.

use rayon::prelude::*;
use std::sync::OnceLock;

/// Elements per block.
pub const QK: usize = 32;
/// Output rows per weight tile.
pub const TR: usize = 16;

/// The GGML block formats we pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// value = (nibble - 8) * d
    Q4_0,
    /// value = nibble * d + m
    Q4_1,
    /// value = q * d, q signed
    Q8_0,
}

/// One cache line; the packed arrays are made of these so every tile starts 64-byte aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line(pub(crate) [u8; 64]);

fn lines(bytes: usize) -> Vec<Line> {
    vec![Line([0; 64]); bytes.div_ceil(64)]
}

fn as_bytes(v: &[Line]) -> &[u8] {
    // SAFETY: `Line` is 64 plain bytes with no padding.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 64) }
}

fn as_bytes_mut(v: &mut [Line]) -> &mut [u8] {
    // SAFETY: as above, and the borrow is unique.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, v.len() * 64) }
}

/// Weights repacked for the kernels.
///
/// Rows are grouped in tiles of [`TR`] = 16 (the last tile padded with zero rows). For tile `t`
/// and block `b` (32 columns) the quants of all 16 rows sit together at `(t * blocks + b) *`
/// [`Self::qbytes`] as 64-byte groups: group `g` holds, at byte `4 * r + j`, row `r`'s element
/// `4 * g' + j` of the block, so one 512-bit register is "16 rows x 4 columns".
/// - Q4: 4 groups; the low nibbles of group `i` are elements `4i..4i+4`, the high nibbles
///   elements `16+4i..16+4i+4` (GGML's own nibble order, so each row's 16 GGML bytes are
///   just dealt out 4 at a time).
/// - Q8: 8 groups of `q + 128` as unsigned bytes (`q ^ 0x80`), for unsigned x signed products.
///
/// The scales of the 16 rows of a tile-block are f16 (exactly as in the GGUF) at
/// `(t * blocks + b) *` [`Self::sbytes`]: 16 `d`, then for Q4_1 16 `m`.
pub struct PackedWeight {
    kind: Kind,
    rows: usize,
    cols: usize,
    tiles: usize,
    blocks: usize,
    qs: Vec<Line>,
    sc: Vec<Line>,
}

/// Activations quantised to 8 bits per block of 32: scale `d`, `s = d * sum(q)`, `isum = sum(q)`.
/// Quants lie in -127..=127.
pub struct Q8Acts {
    pub rows: usize,
    pub blocks: usize,
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    pub isum: Vec<i32>,
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
        let kind = match dtype {
            T::Q4_0 => Kind::Q4_0,
            T::Q4_1 => Kind::Q4_1,
            T::Q8_0 => Kind::Q8_0,
            _ => return None,
        };
        if !cols.is_multiple_of(QK) || rows == 0 || cols == 0 {
            return None;
        }
        let blocks = cols / QK;
        let bs = match kind {
            Kind::Q4_0 => 18,
            Kind::Q4_1 => 20,
            Kind::Q8_0 => 34,
        };
        if bytes.len() != rows.checked_mul(blocks)?.checked_mul(bs)? {
            return None;
        }
        let tiles = rows.div_ceil(TR);
        let mut w = PackedWeight { kind, rows, cols, tiles, blocks, qs: vec![], sc: vec![] };
        let (qb, sb) = (w.qbytes(), w.sbytes());
        let mut qs = lines(tiles * blocks * qb);
        let mut sc = lines(tiles * blocks * sb);
        let (q, s) = (as_bytes_mut(&mut qs), as_bytes_mut(&mut sc));
        for (i, blk) in bytes.chunks_exact(bs).enumerate() {
            let (r, b) = (i / blocks, i % blocks);
            let tb = (r / TR) * blocks + b;
            let rr = r % TR;
            let (qo, so) = (tb * qb + 4 * rr, tb * sb + 2 * rr);
            s[so..so + 2].copy_from_slice(&blk[0..2]);
            match kind {
                Kind::Q4_0 | Kind::Q4_1 => {
                    let src = if kind == Kind::Q4_0 { &blk[2..18] } else { &blk[4..20] };
                    if kind == Kind::Q4_1 {
                        s[so + 32..so + 34].copy_from_slice(&blk[2..4]);
                    }
                    for (g, four) in src.chunks_exact(4).enumerate() {
                        q[qo + 64 * g..qo + 64 * g + 4].copy_from_slice(four);
                    }
                }
                Kind::Q8_0 => {
                    for (g, four) in blk[2..34].chunks_exact(4).enumerate() {
                        for (j, &v) in four.iter().enumerate() {
                            q[qo + 64 * g + j] = v ^ 0x80;
                        }
                    }
                }
            }
        }
        w.qs = qs;
        w.sc = sc;
        Some(w)
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Bytes held by the packed arrays.
    pub fn bytes(&self) -> usize {
        64 * (self.qs.len() + self.sc.len())
    }
    /// Tiles of [`TR`] rows (the last one possibly partial).
    pub fn tiles(&self) -> usize {
        self.tiles
    }
    /// Blocks of [`QK`] columns.
    pub fn blocks(&self) -> usize {
        self.blocks
    }
    /// Quant bytes per tile-block.
    pub fn qbytes(&self) -> usize {
        match self.kind {
            Kind::Q4_0 | Kind::Q4_1 => TR * QK / 2,
            Kind::Q8_0 => TR * QK,
        }
    }
    /// Scale bytes per tile-block.
    pub fn sbytes(&self) -> usize {
        match self.kind {
            Kind::Q4_1 => 4 * TR,
            Kind::Q4_0 | Kind::Q8_0 => 2 * TR,
        }
    }
    pub(crate) fn qs_bytes(&self) -> &[u8] {
        as_bytes(&self.qs)
    }
    pub(crate) fn sc_bytes(&self) -> &[u8] {
        as_bytes(&self.sc)
    }

    /// One block of one row in the oracle's terms: integer quants `q` (unsigned nibbles for Q4,
    /// signed bytes for Q8) with `value = q * d + m`. Rows past `rows()` within the last tile
    /// are zero.
    pub fn block(&self, r: usize, b: usize) -> ([i32; QK], f32, f32) {
        assert!(r < self.tiles * TR && b < self.blocks, "block index"); // ok: internal invariant
        let tb = (r / TR) * self.blocks + b;
        let rr = r % TR;
        let (q, s) = (self.qs_bytes(), self.sc_bytes());
        let so = tb * self.sbytes() + 2 * rr;
        let d = f16(&s[so..]);
        let mut v = [0i32; QK];
        let qo = tb * self.qbytes() + 4 * rr;
        match self.kind {
            Kind::Q4_0 | Kind::Q4_1 => {
                for g in 0..4 {
                    for j in 0..4 {
                        let byte = q[qo + 64 * g + j];
                        v[4 * g + j] = (byte & 0x0F) as i32;
                        v[16 + 4 * g + j] = (byte >> 4) as i32;
                    }
                }
            }
            Kind::Q8_0 => {
                for g in 0..8 {
                    for j in 0..4 {
                        v[4 * g + j] = (q[qo + 64 * g + j] ^ 0x80) as i8 as i32;
                    }
                }
            }
        }
        let m = match self.kind {
            Kind::Q4_0 => -8.0 * d,
            Kind::Q4_1 => f16(&s[so + 32..]),
            Kind::Q8_0 => 0.0,
        };
        (v, d, m)
    }

    /// A weight of `rows_out` rows whose row `i` is row `idx[i]` of this one, bit for bit, and
    /// whose rows past `idx.len()` are zero (padding to a block of channels). None if an index
    /// is out of range or `rows_out` is smaller than `idx`.
    pub fn select_rows(&self, idx: &[u32], rows_out: usize) -> Option<Self> {
        if rows_out == 0 || rows_out < idx.len() || idx.iter().any(|&r| r as usize >= self.rows) {
            return None;
        }
        let tiles = rows_out.div_ceil(TR);
        let (qb, sb, blocks) = (self.qbytes(), self.sbytes(), self.blocks);
        let mut qs = lines(tiles * blocks * qb);
        let mut sc = lines(tiles * blocks * sb);
        let (q, s) = (as_bytes_mut(&mut qs), as_bytes_mut(&mut sc));
        let (sq, ss) = (self.qs_bytes(), self.sc_bytes());
        // A row's share of a tile-block: 4 bytes in each 64-byte quant group, 2 bytes per scale
        // array (d, and m for Q4_1 at +32).
        let scale_arrays = if self.kind == Kind::Q4_1 { 2 } else { 1 };
        for (nr, &r) in idx.iter().enumerate() {
            let r = r as usize;
            for b in 0..blocks {
                let (src, dst) = ((r / TR) * blocks + b, (nr / TR) * blocks + b);
                for g in 0..qb / 64 {
                    let (so, d) = (src * qb + 64 * g + 4 * (r % TR), dst * qb + 64 * g + 4 * (nr % TR));
                    q[d..d + 4].copy_from_slice(&sq[so..so + 4]);
                }
                for a in 0..scale_arrays {
                    let (so, d) = (src * sb + 32 * a + 2 * (r % TR), dst * sb + 32 * a + 2 * (nr % TR));
                    s[d..d + 2].copy_from_slice(&ss[so..so + 2]);
                }
            }
        }
        Some(Self { kind: self.kind, rows: rows_out, cols: self.cols, tiles, blocks, qs, sc })
    }

    /// Quantises a `rows x cols` f32 matrix (cols a multiple of 32) to Q8_0 (each block's scale
    /// `max|x| / 127`, stored as f16) and packs it. None for a shape that does not fit.
    pub fn q8_0_from_f32(values: &[f32], rows: usize, cols: usize) -> Option<Self> {
        if rows == 0 || !cols.is_multiple_of(QK) || values.len() != rows.checked_mul(cols)? {
            return None;
        }
        let mut bytes = Vec::with_capacity(rows * cols / QK * 34);
        let mut q = [0i8; QK];
        for blk in values.chunks_exact(QK) {
            let amax = blk.iter().fold(0f32, |m, v| v.abs().max(m));
            // The scale as stored (f16) is the one the quants are rounded against.
            let d = half::f16::from_f32(amax / 127.0);
            let id = if d.to_f32() > 0.0 { 1.0 / d.to_f32() } else { 0.0 };
            for (v, q) in blk.iter().zip(q.iter_mut()) {
                let r = (v * id).round_ties_even();
                *q = if r.is_nan() { 0 } else { r.clamp(-127.0, 127.0) as i8 };
            }
            bytes.extend_from_slice(&d.to_bits().to_le_bytes());
            bytes.extend(q.iter().map(|&v| v as u8));
        }
        Self::from_ggml(candle_core::quantized::GgmlDType::Q8_0, &bytes, rows, cols)
    }

    /// The packed arrays as they lie in memory: quant bytes, then scale bytes (what the expert
    /// store writes to disk and reads back with [`Self::from_raw`]).
    pub fn raw(&self) -> (&[u8], &[u8]) {
        (self.qs_bytes(), self.sc_bytes())
    }

    /// The byte lengths of [`Self::raw`]'s arrays for a `kind` weight of `rows x cols`; None for
    /// a shape that does not pack (or whose size overflows).
    pub fn raw_sizes(kind: Kind, rows: usize, cols: usize) -> Option<(usize, usize)> {
        if rows == 0 || cols == 0 || !cols.is_multiple_of(QK) {
            return None;
        }
        let w = PackedWeight { kind, rows, cols, tiles: rows.div_ceil(TR), blocks: cols / QK, qs: vec![], sc: vec![] };
        let tb = w.tiles.checked_mul(w.blocks)?;
        Some((tb.checked_mul(w.qbytes())?.div_ceil(64) * 64, tb.checked_mul(w.sbytes())?.div_ceil(64) * 64))
    }

    /// A weight from the arrays [`Self::raw`] gave, their lengths checked against the shape.
    pub fn from_raw(kind: Kind, rows: usize, cols: usize, qs: &[u8], sc: &[u8]) -> Option<Self> {
        if Self::raw_sizes(kind, rows, cols)? != (qs.len(), sc.len()) {
            return None;
        }
        let fill = |src: &[u8]| {
            let mut v = lines(src.len());
            as_bytes_mut(&mut v).copy_from_slice(src);
            v
        };
        Some(Self { kind, rows, cols, tiles: rows.div_ceil(TR), blocks: cols / QK, qs: fill(qs), sc: fill(sc) })
    }

    /// Dequantises one row (embedding lookups) into `out[..cols]`; a row past the end gives zeros.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        for (b, o) in out.chunks_mut(QK).take(self.blocks).enumerate() {
            if r >= self.rows {
                o.fill(0.0);
                continue;
            }
            let (q, d, m) = self.block(r, b);
            for (o, &q) in o.iter_mut().zip(&q) {
                *o = q as f32 * d + m;
            }
        }
    }
}

/// Quantises `rows x cols` f32 activations (cols a multiple of 32) with the best kernel level.
pub fn quantize_acts(x: &[f32], rows: usize, cols: usize) -> Q8Acts {
    quantize_acts_with(x, rows, cols, level())
}

/// [`quantize_acts`] at a given level; every level gives bit-identical results.
pub fn quantize_acts_with(x: &[f32], rows: usize, cols: usize, lvl: Level) -> Q8Acts {
    assert!(cols.is_multiple_of(QK) && x.len() >= rows * cols, "activation shape"); // ok: internal invariant
    let lvl = lvl.min(supported());
    let blocks = cols / QK;
    let n = rows * blocks;
    let mut a = Q8Acts { rows, blocks, d: vec![0.0; n], s: vec![0.0; n], isum: vec![0; n], qs: vec![0; n * QK] };
    let blks = x[..rows * cols].chunks_exact(QK).zip(a.qs.chunks_exact_mut(QK));
    for (i, (blk, q)) in blks.enumerate() {
        let (d, sum) = match lvl {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the level was detected (or lowered) by `level()`, so the features exist.
            Level::Avx512Vnni => unsafe { super::x86::quantize_block_avx512(blk, q) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Level::Avx2 => unsafe { super::x86::quantize_block_avx2(blk, q) },
            _ => quantize_block(blk, q),
        };
        a.d[i] = d;
        a.isum[i] = sum;
        a.s[i] = d * sum as f32;
    }
    a
}

/// The reference block quantiser: `d = max|x| / 127`, `q = round_half_even(x / d)`; NaN gives 0.
pub fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |m, v| v.abs().max(m));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (v, q) in x.iter().zip(q.iter_mut()) {
        let r = (v * id).round_ties_even();
        let v = if r.is_nan() { 0 } else { r.clamp(-127.0, 127.0) as i32 };
        *q = v as i8;
        sum += v;
    }
    (d, sum)
}

/// Kernel levels, ordered: a CPU that runs one runs every lower one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
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

/// The best level the CPU itself supports, whatever `RECOMPOSE_KERNEL` says. Requests above it
/// are lowered to it, so no level passed in can reach an unsupported instruction.
fn supported() -> Level {
    static L: OnceLock<Level> = OnceLock::new();
    *L.get_or_init(|| detect(None))
}

fn detect(forced: Option<&str>) -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        let vnni = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512bw");
        let avx2 =
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
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

/// Below this many multiply-adds a matmul runs on the calling thread (waking the pool costs more).
const PAR_MIN_MACS: usize = 1 << 19;

/// `out[n, r] = sum_k x[n, k] * w[r, k]` for all activation rows n and weight rows r.
/// `out` is `x.rows x w.rows()`, row-major; `x` as made by [`quantize_acts`] (quants in
/// -127..=127, which the AVX2 sign trick relies on). Parallel over tiles on the current rayon
/// pool once the product is big enough to pay for waking it.
pub fn matmul(w: &PackedWeight, x: &Q8Acts, out: &mut [f32], lvl: Level) {
    matmul_group(&[w], x, &mut [out], lvl);
}

/// [`matmul`] for several weights over one input (Q, K and V; gate and up): `outs[i]` is
/// `x.rows x ws[i].rows()`. Their tiles are shared out in one parallel region, so the pool is
/// woken once for the group, and a group too big to run alone runs parallel even when each of
/// its weights is too small to.
pub fn matmul_group(ws: &[&PackedWeight], x: &Q8Acts, outs: &mut [&mut [f32]], lvl: Level) {
    assert_eq!(ws.len(), outs.len(), "one output per weight"); // ok: internal invariant
    for (w, out) in ws.iter().zip(outs.iter()) {
        assert_eq!(out.len(), x.rows * w.rows(), "output buffer size"); // ok: internal invariant
        assert_eq!(x.blocks * QK, w.cols(), "activation width"); // ok: internal invariant
    }
    assert!(x.qs.len() == x.rows * x.blocks * QK && x.d.len() == x.rows * x.blocks, "activation buffers"); // ok: internal invariant
    assert!(x.s.len() == x.d.len() && x.isum.len() == x.d.len(), "activation buffers"); // ok: internal invariant
    let lvl = lvl.min(supported());
    if x.rows == 0 || ws.is_empty() {
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    let macs: usize = ws.iter().map(|w| x.rows * w.rows() * w.cols()).sum();
    let all_tiles: usize = ws.iter().map(|w| w.tiles).sum();
    let tasks = if threads == 1 || macs < PAR_MIN_MACS { 1 } else { (threads * 4).min(all_tiles) };
    let chunk = all_tiles.div_ceil(tasks);
    // (weight, first tile, end tile) pieces of about `chunk` tiles; a piece never spans weights.
    let mut work: Vec<(usize, usize, usize)> = vec![];
    for (i, w) in ws.iter().enumerate() {
        work.extend((0..w.tiles).step_by(chunk).map(|t0| (i, t0, (t0 + chunk).min(w.tiles))));
    }
    let ptrs: Vec<SendPtr> = outs.iter_mut().map(|o| SendPtr(o.as_mut_ptr())).collect();
    let run = |&(i, t0, t1): &(usize, usize, usize)| {
        // SAFETY: pieces own disjoint tile ranges of their weight, so disjoint output columns;
        // sizes asserted above.
        unsafe { tiles(ws[i], x, ptrs[i].get(), t0, t1, lvl) };
    };
    if tasks == 1 {
        work.iter().for_each(run);
    } else {
        work.par_iter().for_each(run);
    }
}

/// Computes output columns `t0 * TR .. min(t1 * TR, rows)` for every activation row.
///
/// # Safety
/// `out` must point to `x.rows * w.rows()` floats, the shapes must agree (see `matmul`), and no
/// one else may touch those output columns meanwhile.
unsafe fn tiles(w: &PackedWeight, x: &Q8Acts, out: *mut f32, t0: usize, t1: usize, lvl: Level) {
    match lvl {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512Vnni => super::x86::tiles_vnni(w, x, out, t0, t1),
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => super::x86::tiles_avx2(w, x, out, t0, t1),
        _ => {
            let rows = w.rows();
            for r in t0 * TR..(t1 * TR).min(rows) {
                for n in 0..x.rows {
                    *out.add(n * rows + r) = scalar_dot(w, r, x, n);
                }
            }
        }
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

/// The plain reference: integer dot per block, scaled, `d_w d_a sum(q_w q_a) + m_w s_a`.
pub fn scalar_dot(w: &PackedWeight, r: usize, x: &Q8Acts, n: usize) -> f32 {
    let nb = x.blocks;
    let mut acc = 0f32;
    for b in 0..nb {
        let (q, d, m) = w.block(r, b);
        let ai = n * nb + b;
        let aq = &x.qs[ai * QK..ai * QK + QK];
        let s: i32 = q.iter().zip(aq).map(|(&w, &a)| w * a as i32).sum();
        acc += d * x.d[ai] * s as f32 + m * x.s[ai];
    }
    acc
}
