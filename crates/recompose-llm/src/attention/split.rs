//! The split kernel, for short query blocks (decode): the keys of each (row, KV head) are cut
//! into chunks of `CH` slots, so a long context runs on every thread even with few KV heads
//! (flash-decoding). Pass 1 scores every chunk (each key is read once for all the group's query
//! rows) and notes each row's maximum; pass 2 turns the scores into `e^(s - max)` with the global
//! maximum, so a slot's probability does not depend on which chunk holds it, and sums them and
//! the weighted values in f64; the chunks' sums are then added in chunk order. With one chunk per
//! (row, KV head) both passes run in one task.

use super::lanes::{self, Lanes, Lanes64, Narrow, Narrow64, Wide, Wide64};
use super::simd::{isa, isa_variants, max_of};
use super::{pieces, Job};
use rayon::prelude::*;
use std::cell::RefCell;

/// Slots per chunk. Fixed, so the result does not depend on the thread count.
const CH: usize = 256;

/// Buffers kept between calls by the calling thread: scores `(B*H, GT, L)` in chunk-major
/// blocks, chunk maxima, and the chunks' f64 sums `(B*H, chunks, GT, D + 1)`.
#[derive(Default)]
struct Scratch {
    s: Vec<f32>,
    max: Vec<f32>,
    part: Vec<f64>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// Runs with the calling thread's buffers (fresh ones if they are in use: a nested call from
/// inside a parallel task).
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut s) => f(&mut s),
        Err(_) => f(&mut Scratch::default()),
    })
}

fn grow<T: Copy + Default>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    if v.len() < n {
        v.resize(n, T::default());
    }
    &mut v[..n]
}

pub(super) fn run(j: &Job, out: &mut [f32], mass: Option<&mut [f32]>) {
    let isa = isa();
    let (bhn, gt, d, l) = (j.b * j.h, j.gt, j.d, j.l);
    let nc = l.div_ceil(CH);
    let clen = |c: usize| CH.min(l - c * CH);
    with_scratch(|sc| {
        let s = grow(&mut sc.s, bhn * gt * l);
        let mx = grow(&mut sc.max, bhn * nc * gt);
        let part = grow(&mut sc.part, bhn * nc * gt * (d + 1));
        let ids = || (0..bhn).flat_map(|bh| (0..nc).map(move |c| (bh, c)));
        let mut s_chunks = pieces(s, ids().map(|(_, c)| clen(c) * gt));
        let mut parts = pieces(part, ids().map(|_| gt * (d + 1)));
        if nc == 1 {
            s_chunks.par_iter_mut().zip(parts.par_iter_mut()).zip(mx.par_chunks_mut(gt)).enumerate().for_each(
                |(bh, ((s, p), m))| {
                    score_chunk(isa, j, bh, 0, s, m);
                    weigh_chunk(isa, j, bh, 0, s, m, p);
                },
            );
        } else {
            s_chunks
                .par_iter_mut()
                .zip(mx.par_chunks_mut(gt))
                .zip(ids().collect::<Vec<_>>())
                .for_each(|((s, m), (bh, c))| score_chunk(isa, j, bh, c * CH, s, m));
            // Each row's maximum over all chunks, into chunk 0's slot.
            for bh in 0..bhn {
                for r in 0..gt {
                    let m = (1..nc).fold(mx[bh * nc * gt + r], |a, c| a.max(mx[(bh * nc + c) * gt + r]));
                    mx[bh * nc * gt + r] = m;
                }
            }
            let mx = &*mx;
            s_chunks.par_iter_mut().zip(parts.par_iter_mut()).zip(ids().collect::<Vec<_>>()).for_each(
                |((s, p), (bh, c))| weigh_chunk(isa, j, bh, c * CH, s, &mx[bh * nc * gt..(bh * nc + 1) * gt], p),
            );
        }
        drop(s_chunks);
        let (s, part) = (&sc.s[..bhn * gt * l], &sc.part[..bhn * nc * gt * (d + 1)]);
        let combine = |bh: usize, o: &mut [f32], mass: &mut [f32]| {
            let part = &part[bh * nc * gt * (d + 1)..(bh + 1) * nc * gt * (d + 1)];
            let s = &s[bh * gt * l..(bh + 1) * gt * l];
            let mut acc = vec![0f64; d];
            for r in 0..gt {
                acc.fill(0.0);
                let mut sum = 0f64;
                for c in 0..nc {
                    let p = &part[(c * gt + r) * (d + 1)..(c * gt + r + 1) * (d + 1)];
                    for (a, x) in acc.iter_mut().zip(p) {
                        *a += x;
                    }
                    sum += p[d];
                }
                for (oo, a) in o[r * d..(r + 1) * d].iter_mut().zip(&acc) {
                    *oo = (a / sum) as f32;
                }
                let (bi, t) = (bh / j.h, r % j.t);
                if !mass.is_empty() && j.real(bi, t) {
                    let inv = (1.0 / sum) as f32;
                    let row = &mut mass[(r / j.t) * l..(r / j.t + 1) * l];
                    for c in 0..nc {
                        let n = clen(c);
                        let p = &s[c * CH * gt + r * n..c * CH * gt + (r + 1) * n];
                        for (m, p) in row[c * CH..c * CH + n].iter_mut().zip(p) {
                            *m += p * inv;
                        }
                    }
                }
            }
        };
        match mass {
            Some(mass) => out
                .par_chunks_mut(gt * d)
                .zip(mass.par_chunks_mut(j.g * l))
                .enumerate()
                .for_each(|(bh, (o, m))| combine(bh, o, m)),
            None => out.par_chunks_mut(gt * d).enumerate().for_each(|(bh, o)| combine(bh, o, &mut [])),
        }
    });
}

isa_variants! {
    /// Scores of the `GT` query rows of (row, KV head) `bh` against the chunk's slots from `x0`
    /// into `s (GT, n)` (scaled, mask added), and each row's maximum into `mx`.
    fn score_chunk(j: &Job, bh: usize, x0: usize, s: &mut [f32], mx: &mut [f32]) {
        // SAFETY: the body runs compiled for AVX-512 when WIDE, for AVX2 when FMA.
        unsafe {
            if WIDE {
                score_chunk_v::<Wide>(j, bh, x0, s, mx)
            } else if FMA {
                score_chunk_v::<Narrow>(j, bh, x0, s, mx)
            } else {
                score_chunk_v::<f32>(j, bh, x0, s, mx)
            }
        }
    }
}

/// # Safety
/// Runs inside a function compiled for `V`'s instruction set.
#[inline(always)]
unsafe fn score_chunk_v<V: Lanes>(j: &Job, bh: usize, x0: usize, s: &mut [f32], mx: &mut [f32]) {
    let (bi, hi) = (bh / j.h, bh % j.h);
    let (gt, d, kst) = (j.gt, j.d, j.ks[2]);
    let n = s.len() / gt;
    let kbase = j.ko + bi * j.ks[0] + hi * j.ks[1] + x0 * kst;
    assert!(n == 0 || kbase + (n - 1) * kst + d <= j.k.len());
    assert!((bh + 1) * gt * d <= j.q.len() && mx.len() >= gt && x0 + n <= j.l);
    let (kp, qp, sp) = (j.k.as_ptr().add(kbase), j.q.as_ptr().add(bh * gt * d), s.as_mut_ptr());
    let step = 2 * V::N;
    let whole = d - d % step;
    // Keys outer: each key is read once for all query rows; rows ahead are prefetched (the
    // cache is streamed from memory, and the hardware prefetcher alone leaves it stalling).
    for x in 0..n {
        let kr = kp.add(x * kst);
        if x + AHEAD < n {
            lanes::prefetch_row(kr.add(AHEAD * kst), d);
        }
        for r in 0..gt {
            let qr = qp.add(r * d);
            let (mut a0, mut a1) = (V::zero(), V::zero());
            for c in (0..whole).step_by(step) {
                a0 = V::load(qr.add(c)).fma(V::load(kr.add(c)), a0);
                a1 = V::load(qr.add(c + V::N)).fma(V::load(kr.add(c + V::N)), a1);
            }
            let mut dot = a0.add(a1).hsum();
            for c in whole..d {
                dot += *qr.add(c) * *kr.add(c);
            }
            *sp.add(r * n + x) = dot * j.scale;
        }
    }
    for r in 0..gt {
        let row = &mut s[r * n..(r + 1) * n];
        if let Some(m) = j.mask_row(bi, hi, r % j.t) {
            for (e, m) in row.iter_mut().zip(&m[x0..x0 + n]) {
                *e += m;
            }
        }
        mx[r] = max_of(row);
    }
}

isa_variants! {
    /// Probabilities `e^(s - max)` of the chunk's scores (in place), their f64 sum per row and
    /// the f64 sum of the weighted values per row into `part (GT, D + 1)` (values, then sum).
    fn weigh_chunk(j: &Job, bh: usize, x0: usize, s: &mut [f32], mx: &[f32], part: &mut [f64]) {
        let (gt, d) = (j.gt, j.d);
        let n = s.len() / gt;
        // SAFETY: the body runs compiled for AVX-512 when WIDE, for AVX2 when FMA.
        unsafe {
            for r in 0..gt {
                let row = &mut s[r * n..(r + 1) * n];
                match (WIDE, FMA) {
                    (true, _) => exp_sub::<Wide>(row, mx[r]),
                    (false, true) => exp_sub::<Narrow>(row, mx[r]),
                    _ => exp_sub::<f32>(row, mx[r]),
                }
            }
        }
        let p64: Vec<f64> = s.iter().map(|&p| p as f64).collect();
        for r in 0..gt {
            part[r * (d + 1) + d] = sum64(&p64[r * n..(r + 1) * n]);
        }
        // Sub-blocks of keys: their values stay in L1 while every column block reads them.
        for k0 in (0..n).step_by(SUB) {
            let k1 = (k0 + SUB).min(n);
            for r0 in (0..gt).step_by(3) {
                // SAFETY: as above.
                unsafe {
                    match (WIDE, FMA) {
                        (true, _) => weigh_rows::<Wide64, 4>(j, bh, x0, n, k0..k1, &p64, r0, part),
                        (false, true) => weigh_rows::<Narrow64, 2>(j, bh, x0, n, k0..k1, &p64, r0, part),
                        _ => weigh_rows::<f64, 1>(j, bh, x0, n, k0..k1, &p64, r0, part),
                    }
                }
            }
        }
    }
}

/// Keys per sub-block of `weigh_chunk`.
const SUB: usize = 64;

/// How many keys ahead `score_chunk` prefetches.
const AHEAD: usize = 32;

/// `x = e^(x - m)` over a row, every value through the same vector code (a tail padded to a
/// whole vector), so a slot's probability does not depend on where in the row it sits.
///
/// # Safety
/// Runs inside a function compiled for `V`'s instruction set.
#[inline(always)]
unsafe fn exp_sub<V: Lanes>(row: &mut [f32], m: f32) {
    let whole = row.len() - row.len() % V::N;
    let (mv, p) = (V::splat(m), row.as_mut_ptr());
    for c in (0..whole).step_by(V::N) {
        lanes::exp(V::load(p.add(c)).sub(mv)).store(p.add(c));
    }
    if whole < row.len() {
        let mut tail = [f32::NEG_INFINITY; 16];
        let n = row.len() - whole;
        tail[..n].copy_from_slice(&row[whole..]);
        lanes::exp(V::load(tail.as_ptr()).sub(mv)).store(tail.as_mut_ptr());
        row[whole..].copy_from_slice(&tail[..n]);
    }
}

/// A sum in 8 f64 lanes.
#[inline(always)]
fn sum64(x: &[f64]) -> f64 {
    let mut s = [0f64; 8];
    let c = x.chunks_exact(8);
    let tail: f64 = c.remainder().iter().sum();
    for ch in c {
        for i in 0..8 {
            s[i] += ch[i];
        }
    }
    s.iter().sum::<f64>() + tail
}

/// Rows `r0..r0 + 3` (or to the end) of `weigh_chunk`, in column blocks of `P` vector pairs.
///
/// # Safety
/// Runs inside a function compiled for `W`'s instruction set.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn weigh_rows<W: Lanes64, const P: usize>(
    j: &Job,
    bh: usize,
    x0: usize,
    n: usize,
    keys: std::ops::Range<usize>,
    p: &[f64],
    r0: usize,
    part: &mut [f64],
) {
    match j.gt - r0 {
        1 => weigh_block::<W, 1, P>(j, bh, x0, n, keys, p, r0, part),
        2 => weigh_block::<W, 2, P>(j, bh, x0, n, keys, p, r0, part),
        _ => weigh_block::<W, 3, P>(j, bh, x0, n, keys, p, r0, part),
    }
}

/// `part[r][..D] += sum_x p[r][x] * v[x0 + x]` over `keys` for `R` rows from `r0`, in f64
/// registers (the first sub-block starts from 0): columns in blocks of `P` pairs of vectors,
/// then single pairs, then one by one.
///
/// # Safety
/// Runs inside a function compiled for `W`'s instruction set.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn weigh_block<W: Lanes64, const R: usize, const P: usize>(
    j: &Job,
    bh: usize,
    x0: usize,
    n: usize,
    keys: std::ops::Range<usize>,
    p: &[f64],
    r0: usize,
    part: &mut [f64],
) {
    let (bi, hi) = (bh / j.h, bh % j.h);
    let (d, vst) = (j.d, j.vs[2]);
    let vbase = j.vo + bi * j.vs[0] + hi * j.vs[1] + x0 * vst;
    assert!(n == 0 || vbase + (n - 1) * vst + d <= j.v.len());
    assert!(p.len() >= (r0 + R) * n && part.len() >= (r0 + R) * (d + 1) && keys.end <= n);
    let (vp, pp, op) = (j.v.as_ptr().add(vbase), p.as_ptr().add(r0 * n), part.as_mut_ptr().add(r0 * (d + 1)));
    let step = 2 * W::N;
    let big = d - d % (P * step);
    let whole = d - d % step;
    let first = keys.start == 0;
    for d0 in (0..big).step_by(P * step) {
        weigh_cols::<W, R, P>(vp, vst, pp, n, op, d + 1, d0, keys.clone(), first);
    }
    for d0 in (big..whole).step_by(step) {
        weigh_cols::<W, R, 1>(vp, vst, pp, n, op, d + 1, d0, keys.clone(), first);
    }
    for dd in whole..d {
        for rr in 0..R {
            let mut a = if first { 0.0 } else { *op.add(rr * (d + 1) + dd) };
            for x in keys.clone() {
                a += *pp.add(rr * n + x) * *vp.add(x * vst + dd) as f64;
            }
            *op.add(rr * (d + 1) + dd) = a;
        }
    }
}

/// Columns `d0..d0 + P * 2 * W::N` of `weigh_block`: `R x 2P` accumulators, one pass over the
/// keys' values (prefetched `AHEAD` keys ahead).
///
/// # Safety
/// Runs inside a function compiled for `W`'s instruction set; pointers as `weigh_block` checked.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn weigh_cols<W: Lanes64, const R: usize, const P: usize>(
    vp: *const f32,
    vst: usize,
    pp: *const f64,
    n: usize,
    op: *mut f64,
    ostride: usize,
    d0: usize,
    keys: std::ops::Range<usize>,
    first: bool,
) {
    let step = 2 * W::N;
    let mut acc = [[[W::zero(); 2]; P]; R];
    if !first {
        for (rr, a) in acc.iter_mut().enumerate() {
            for (pi, a) in a.iter_mut().enumerate() {
                a[0] = W::load(op.add(rr * ostride + d0 + pi * step));
                a[1] = W::load(op.add(rr * ostride + d0 + pi * step + W::N));
            }
        }
    }
    for x in keys {
        let vr = vp.add(x * vst + d0);
        if x + AHEAD < n {
            lanes::prefetch_row(vr.add(AHEAD * vst), P * step);
        }
        let mut pv = [W::zero(); R];
        for (rr, e) in pv.iter_mut().enumerate() {
            *e = W::splat(*pp.add(rr * n + x));
        }
        for pi in 0..P {
            let (v0, v1) = W::load_cvt(vr.add(pi * step));
            for (a, p) in acc.iter_mut().zip(&pv) {
                a[pi][0] = p.fma(v0, a[pi][0]);
                a[pi][1] = p.fma(v1, a[pi][1]);
            }
        }
    }
    for (rr, a) in acc.iter().enumerate() {
        for (pi, a) in a.iter().enumerate() {
            a[0].store(op.add(rr * ostride + d0 + pi * step));
            a[1].store(op.add(rr * ostride + d0 + pi * step + W::N));
        }
    }
}
