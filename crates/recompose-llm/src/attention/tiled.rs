//! The tiled kernel, for long query blocks (prefill): each task takes `BQ` query rows of one
//! query head and walks the keys in tiles of `BK` with an online softmax (FlashAttention): the
//! tile's scores in registers-sized blocks, the running maximum and denominator per row, the
//! output rescaled when the maximum grows. Nothing of size `(T, L)` is kept. A pre-pass sorts
//! every (query tile, key tile) block of the mask into clear, mixed or hidden; hidden blocks
//! (the causal upper triangle, outside a window, padding) are skipped. When the attention mass
//! is wanted a second pass, parallel over key tiles, recomputes the scores (bit for bit the same)
//! and sums `e^(s - max) / denominator` over each row's real queries.

use super::lanes::{self, Lanes, Narrow, Wide};
use super::simd::{exp, isa, isa_variants};
use super::{pieces, Job};
use crate::kv::MASKED;
use rayon::prelude::*;
use std::cell::RefCell;

/// Query rows per task.
const BQ: usize = 64;
/// Keys per tile.
const BK: usize = 64;
/// Rows are padded to a multiple of this (every register block's row count divides it).
const MR: usize = 8;

const CLEAR: u8 = 0;
const MIXED: u8 = 1;
const HIDDEN: u8 = 2;

/// Below this an additive mask value hides its slot (`MASKED` and anything of its order).
const HIDES: f32 = MASKED * 0.5;

/// What the mask does to each (query tile, key tile) block, per row and mask head.
struct Classes {
    v: Vec<u8>,
    nq: usize,
    nk: usize,
}

impl Classes {
    fn new(j: &Job) -> Self {
        let (nq, nk) = (j.t.div_ceil(BQ), j.l.div_ceil(BK));
        let Some(mask) = j.mask else { return Self { v: vec![], nq, nk } };
        let mut v = vec![CLEAR; j.b * j.mask_heads * nq * nk];
        v.par_chunks_mut(nk).enumerate().for_each(|(i, row)| {
            let (bm, qi) = (i / nq, i % nq);
            let (t0, t1) = (qi * BQ, (qi * BQ + BQ).min(j.t));
            for (ki, c) in row.iter_mut().enumerate() {
                let (x0, x1) = (ki * BK, (ki * BK + BK).min(j.l));
                let (mut hidden, mut clear) = (true, true);
                for t in t0..t1 {
                    for &e in &mask[(bm * j.t + t) * j.l + x0..(bm * j.t + t) * j.l + x1] {
                        hidden &= e <= HIDES;
                        clear &= e == 0.0;
                    }
                }
                *c = if hidden {
                    HIDDEN
                } else if clear {
                    CLEAR
                } else {
                    MIXED
                };
            }
        });
        Self { v, nq, nk }
    }

    fn get(&self, j: &Job, bi: usize, hi: usize, qi: usize, ki: usize) -> u8 {
        if self.v.is_empty() {
            return CLEAR;
        }
        let mh = if j.mask_heads > 1 { hi } else { 0 };
        self.v[((bi * j.mask_heads + mh) * self.nq + qi) * self.nk + ki]
    }
}

/// Per-thread tile buffers, reused across tasks and calls.
#[derive(Default)]
struct Scratch {
    qs: Vec<f32>,
    s: Vec<f32>,
    o: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
    /// The calling thread's transposed keys.
    static KEYS: RefCell<Vec<f32>> = RefCell::default();
}

/// Runs with this thread's buffers (fresh ones if they are in use: a nested call from inside a
/// parallel task).
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut s) => f(&mut s),
        Err(_) => f(&mut Scratch::default()),
    })
}

fn with_keys<R>(f: impl FnOnce(&mut Vec<f32>) -> R) -> R {
    KEYS.with(|s| match s.try_borrow_mut() {
        Ok(mut s) => f(&mut s),
        Err(_) => f(&mut Vec::new()),
    })
}

fn grow(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

pub(super) fn run(j: &Job, out: &mut [f32], mass: Option<&mut [f32]>) {
    let isa = isa();
    let cls = Classes::new(j);
    let (bhn, d) = (j.b * j.h, j.d);
    let rows = |qi: usize| BQ.min(j.t - qi * BQ);
    with_keys(|keys| {
        // Every key tile transposed once, `(B*H, tiles, D, BK)`, for all the queries that read it.
        let keys = grow(keys, bhn * cls.nk * d * BK);
        keys.par_chunks_mut(d * BK).enumerate().for_each(|(i, kt)| {
            let (bh, ki) = (i / cls.nk, i % cls.nk);
            load_kt(j, bh / j.h, bh % j.h, ki * BK, BK.min(j.l - ki * BK), kt);
        });
        let keys = &*keys;
        let ids: Vec<(usize, usize, usize)> =
            (0..bhn).flat_map(|bh| (0..j.g).flat_map(move |gi| (0..cls.nq).map(move |qi| (bh, gi, qi)))).collect();
        let outs = pieces(out, ids.iter().map(|&(_, _, qi)| rows(qi) * d));
        // Per query row: the final maximum and 1 / denominator, for the mass pass.
        let mut stats = vec![0f32; if mass.is_some() { bhn * j.gt * 2 } else { 0 }];
        let stat_lens = ids.iter().map(|&(_, _, qi)| if mass.is_some() { rows(qi) * 2 } else { 0 });
        let stat_pieces = pieces(&mut stats, stat_lens);
        ids.par_iter().zip(outs).zip(stat_pieces).for_each(|((&(bh, gi, qi), o), st)| {
            with_scratch(|sc| attend_tile(isa, j, &cls, keys, bh, gi * j.t + qi * BQ, qi, o, st, sc))
        });
        if let Some(mass) = mass {
            let stats = &stats;
            mass.par_chunks_mut(j.l).enumerate().for_each(|(row, m)| {
                m.par_chunks_mut(BK).enumerate().for_each(|(ki, m)| {
                    with_scratch(|sc| mass_tile(isa, j, &cls, keys, stats, row, ki, m, sc));
                })
            });
        }
    })
}

/// Copies query rows `r0..r0 + n` of `bh`, scaled, into `qs (rows, D)`; rows past `n` are zero.
#[inline(always)]
fn load_q(j: &Job, bh: usize, r0: usize, n: usize, qs: &mut [f32]) {
    let d = j.d;
    for (i, row) in qs.chunks_exact_mut(d).enumerate() {
        if i < n {
            for (a, b) in row.iter_mut().zip(j.qrow(bh, r0 + i)) {
                *a = b * j.scale;
            }
        } else {
            row.fill(0.0);
        }
    }
}

/// Keys `x0..x0 + n` transposed into `kt (D, BK)`; columns past `n` are zero.
#[inline(always)]
fn load_kt(j: &Job, bi: usize, hi: usize, x0: usize, n: usize, kt: &mut [f32]) {
    for x in 0..n {
        for (dd, &e) in j.krow(bi, hi, x0 + x).iter().enumerate() {
            kt[dd * BK + x] = e;
        }
    }
    if n < BK {
        for col in kt.chunks_exact_mut(BK) {
            col[n..].fill(0.0);
        }
    }
}

/// `s (rows, BK) = qs (rows, D) . kt (D, BK)` in blocks of `RB` rows x `NV` vectors.
///
/// # Safety
/// Runs inside a function compiled for `V`'s instruction set.
#[inline(always)]
unsafe fn scores<V: Lanes, const NV: usize, const RB: usize>(
    qs: &[f32],
    kt: &[f32],
    s: &mut [f32],
    d: usize,
    rows: usize,
) {
    let nr = NV * V::N;
    assert!(
        qs.len() >= rows * d
            && kt.len() >= d * BK
            && s.len() >= rows * BK
            && rows.is_multiple_of(RB)
            && BK.is_multiple_of(nr)
    );
    let (qp, kp, sp) = (qs.as_ptr(), kt.as_ptr(), s.as_mut_ptr());
    for i0 in (0..rows).step_by(RB) {
        for j0 in (0..BK).step_by(nr) {
            let mut acc = [[V::zero(); NV]; RB];
            for dd in 0..d {
                let kr = kp.add(dd * BK + j0);
                let mut kv = [V::zero(); NV];
                for (v, k) in kv.iter_mut().enumerate() {
                    *k = V::load(kr.add(v * V::N));
                }
                for (ii, a) in acc.iter_mut().enumerate() {
                    let qv = V::splat(*qp.add((i0 + ii) * d + dd));
                    for v in 0..NV {
                        a[v] = qv.fma(kv[v], a[v]);
                    }
                }
            }
            for (ii, a) in acc.iter().enumerate() {
                for (v, x) in a.iter().enumerate() {
                    x.store(sp.add((i0 + ii) * BK + j0 + v * V::N));
                }
            }
        }
    }
}

/// `o (rows, D) += s (rows, BK) . v[x0..x0 + n]` in blocks of `RB` rows x `NV` vectors.
///
/// # Safety
/// Runs inside a function compiled for `V`'s instruction set.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn weigh<V: Lanes, const NV: usize, const RB: usize>(
    j: &Job,
    bi: usize,
    hi: usize,
    x0: usize,
    n: usize,
    s: &[f32],
    o: &mut [f32],
    rows: usize,
) {
    let (d, nr, vst) = (j.d, NV * V::N, j.vs[2]);
    let whole = d - d % nr;
    let vbase = j.vo + bi * j.vs[0] + hi * j.vs[1] + x0 * vst;
    assert!(s.len() >= rows * BK && o.len() >= rows * d && rows.is_multiple_of(RB) && n <= BK && x0 + n <= j.l);
    assert!(n == 0 || vbase + (n - 1) * vst + d <= j.v.len());
    let (vp, sp, op) = (j.v.as_ptr().add(vbase), s.as_ptr(), o.as_mut_ptr());
    for i0 in (0..rows).step_by(RB) {
        for d0 in (0..whole).step_by(nr) {
            let mut acc = [[V::zero(); NV]; RB];
            for (ii, a) in acc.iter_mut().enumerate() {
                for (v, x) in a.iter_mut().enumerate() {
                    *x = V::load(op.add((i0 + ii) * d + d0 + v * V::N));
                }
            }
            for x in 0..n {
                let vr = vp.add(x * vst + d0);
                let mut vv = [V::zero(); NV];
                for (v, e) in vv.iter_mut().enumerate() {
                    *e = V::load(vr.add(v * V::N));
                }
                for (ii, a) in acc.iter_mut().enumerate() {
                    let p = V::splat(*sp.add((i0 + ii) * BK + x));
                    for v in 0..NV {
                        a[v] = p.fma(vv[v], a[v]);
                    }
                }
            }
            for (ii, a) in acc.iter().enumerate() {
                for (v, x) in a.iter().enumerate() {
                    x.store(op.add((i0 + ii) * d + d0 + v * V::N));
                }
            }
        }
        for dd in whole..d {
            for ii in 0..RB {
                let mut a = *op.add((i0 + ii) * d + dd);
                for x in 0..n {
                    a += *sp.add((i0 + ii) * BK + x) * *vp.add(x * vst + dd);
                }
                *op.add((i0 + ii) * d + dd) = a;
            }
        }
    }
}

/// The largest of a row of `BK` scores.
///
/// # Safety
/// Runs inside a function compiled for `V`'s instruction set.
#[inline(always)]
unsafe fn row_max<V: Lanes>(row: &[f32; BK]) -> f32 {
    let mut m = V::splat(f32::NEG_INFINITY);
    for c in (0..BK).step_by(V::N) {
        m = m.max(V::load(row.as_ptr().add(c)));
    }
    m.hmax()
}

/// Replaces a row of `BK` scores by `e^(s - mx)` and returns their sum.
///
/// # Safety
/// Runs inside a function compiled for `V`'s instruction set.
#[inline(always)]
unsafe fn row_exp<V: Lanes>(row: &mut [f32; BK], mx: f32) -> f32 {
    let (m, p) = (V::splat(mx), row.as_mut_ptr());
    let mut sum = V::zero();
    for c in (0..BK).step_by(V::N) {
        let e = lanes::exp(V::load(p.add(c)).sub(m));
        e.store(p.add(c));
        sum = sum.add(e);
    }
    sum.hsum()
}

/// `mass[x] += e^(s[x] - mx) * inv` (`s` holds a whole tile of `BK`, so every slot goes
/// through the same vector code).
///
/// # Safety
/// Runs inside a function compiled for `V`'s instruction set.
#[inline(always)]
unsafe fn add_mass<V: Lanes>(mass: &mut [f32], s: &[f32; BK], mx: f32, inv: f32) {
    let mut p = [0f32; BK];
    let (m, iv) = (V::splat(mx), V::splat(inv));
    for c in (0..BK).step_by(V::N) {
        lanes::exp(V::load(s.as_ptr().add(c)).sub(m)).mul(iv).store(p.as_mut_ptr().add(c));
    }
    for (e, p) in mass.iter_mut().zip(&p) {
        *e += p;
    }
}

/// Picks the vector type and block width for the instruction set of the calling body.
macro_rules! with_lanes {
    ($fma:expr, $wide:expr, $f:ident($($a:expr),*)) => {
        // SAFETY: the body runs compiled for AVX-512 when WIDE, for AVX2 when FMA.
        unsafe {
            if $wide {
                $f::<Wide, 2, 8>($($a),*)
            } else if $fma {
                $f::<Narrow, 2, 4>($($a),*)
            } else {
                $f::<f32, 16, 4>($($a),*)
            }
        }
    };
}

isa_variants! {
    /// Attention of query rows `r0..` (of the `GT` of `bh`; query tile `qi` of one head) into
    /// `out (n, D)`; with `stats (n, 2)` also each row's maximum and 1 / denominator (maximum
    /// +inf: the row saw no slot, and attends uniformly to all, as softmax over a constant does).
    fn attend_tile(
        j: &Job,
        cls: &Classes,
        keys: &[f32],
        bh: usize,
        r0: usize,
        qi: usize,
        out: &mut [f32],
        stats: &mut [f32],
        sc: &mut Scratch,
    ) {
        with_lanes!(FMA, WIDE, attend_tile_v(j, cls, keys, bh, r0, qi, out, stats, sc))
    }
}

/// `attend_tile` for one vector type.
///
/// # Safety
/// Runs inside a function compiled for `V`'s instruction set.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn attend_tile_v<V: Lanes, const NV: usize, const RB: usize>(
    j: &Job,
    cls: &Classes,
    keys: &[f32],
    bh: usize,
    r0: usize,
    qi: usize,
    out: &mut [f32],
    stats: &mut [f32],
    sc: &mut Scratch,
) {
    let (bi, hi, d) = (bh / j.h, bh % j.h, j.d);
    let t0 = qi * BQ;
    let nq = out.len() / d;
    let rows = nq.next_multiple_of(MR);
    let Scratch { qs, s, o, m, l } = sc;
    let (qs, s) = (grow(qs, rows * d), grow(s, rows * BK));
    let (o, m, l) = (grow(o, rows * d), grow(m, rows), grow(l, rows));
    load_q(j, bh, r0, nq, qs);
    o.fill(0.0);
    m.fill(f32::NEG_INFINITY);
    l.fill(0.0);
    for ki in 0..cls.nk {
        let class = cls.get(j, bi, hi, qi, ki);
        if class == HIDDEN {
            continue;
        }
        let x0 = ki * BK;
        let n = BK.min(j.l - x0);
        let kt = &keys[(bh * cls.nk + ki) * d * BK..(bh * cls.nk + ki + 1) * d * BK];
        scores::<V, NV, RB>(qs, kt, s, d, rows);
        for i in 0..nq {
            let row: &mut [f32; BK] = (&mut s[i * BK..(i + 1) * BK]).try_into().unwrap(); // ok: the slice is BK long
            if class == MIXED {
                if let Some(mr) = j.mask_row(bi, hi, t0 + i) {
                    for (e, mm) in row[..n].iter_mut().zip(&mr[x0..x0 + n]) {
                        *e += mm;
                    }
                }
            }
            row[n..].fill(f32::NEG_INFINITY);
            let mnew = m[i].max(row_max::<V>(row));
            let alpha = exp(m[i] - mnew);
            let sum = row_exp::<V>(row, mnew);
            l[i] = l[i] * alpha + sum;
            m[i] = mnew;
            if alpha != 1.0 {
                for e in &mut o[i * d..(i + 1) * d] {
                    *e *= alpha;
                }
            }
        }
        s[nq * BK..rows * BK].fill(0.0);
        weigh::<V, NV, RB>(j, bi, hi, x0, n, s, o, rows);
    }
    let mut uniform: Option<Vec<f32>> = None;
    for i in 0..nq {
        let orow = &mut out[i * d..(i + 1) * d];
        if m[i] > HIDES {
            let inv = 1.0 / l[i];
            for (a, b) in orow.iter_mut().zip(&o[i * d..(i + 1) * d]) {
                *a = b * inv;
            }
            if !stats.is_empty() {
                stats[2 * i] = m[i];
                stats[2 * i + 1] = inv;
            }
        } else {
            // Every slot hidden: the mean of all values, as the plain composition gives.
            let mean = uniform.get_or_insert_with(|| {
                let mut acc = vec![0f64; d];
                for x in 0..j.l {
                    for (a, v) in acc.iter_mut().zip(j.vrow(bi, hi, x)) {
                        *a += *v as f64;
                    }
                }
                acc.iter().map(|a| (a / j.l as f64) as f32).collect()
            });
            orow.copy_from_slice(mean);
            if !stats.is_empty() {
                stats[2 * i] = f32::INFINITY;
                stats[2 * i + 1] = 0.0;
            }
        }
    }
}

isa_variants! {
    /// The attention mass of query head `row` (`bh * G + g`) on key tile `ki`, into `mass`: the
    /// probabilities of the row's real queries, summed.
    fn mass_tile(
        j: &Job,
        cls: &Classes,
        keys: &[f32],
        stats: &[f32],
        row: usize,
        ki: usize,
        mass: &mut [f32],
        sc: &mut Scratch,
    ) {
        with_lanes!(FMA, WIDE, mass_tile_v(j, cls, keys, stats, row, ki, mass, sc))
    }
}

/// `mass_tile` for one vector type.
///
/// # Safety
/// Runs inside a function compiled for `V`'s instruction set.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn mass_tile_v<V: Lanes, const NV: usize, const RB: usize>(
    j: &Job,
    cls: &Classes,
    keys: &[f32],
    stats: &[f32],
    row: usize,
    ki: usize,
    mass: &mut [f32],
    sc: &mut Scratch,
) {
    let (bh, gi) = (row / j.g, row % j.g);
    let (bi, hi, d) = (bh / j.h, bh % j.h, j.d);
    let x0 = ki * BK;
    let n = mass.len();
    let Scratch { qs, s, .. } = sc;
    let (qs, s) = (grow(qs, BQ * d), grow(s, BQ * BK));
    let kt = &keys[(bh * cls.nk + ki) * d * BK..(bh * cls.nk + ki + 1) * d * BK];
    for qi in 0..cls.nq {
        let t0 = qi * BQ;
        if !j.real(bi, t0) {
            break;
        }
        let nq = BQ.min(j.t - t0);
        let r0 = gi * j.t + t0;
        let st = |i: usize| (stats[2 * (bh * j.gt + r0 + i)], stats[2 * (bh * j.gt + r0 + i) + 1]);
        for i in (0..nq).take_while(|&i| j.real(bi, t0 + i)) {
            if st(i).0 == f32::INFINITY {
                let p = 1.0 / j.l as f32;
                mass.iter_mut().for_each(|e| *e += p);
            }
        }
        let class = cls.get(j, bi, hi, qi, ki);
        if class == HIDDEN {
            continue;
        }
        let rows = nq.next_multiple_of(MR);
        load_q(j, bh, r0, nq, &mut qs[..rows * d]);
        scores::<V, NV, RB>(qs, kt, s, d, rows);
        for i in (0..nq).take_while(|&i| j.real(bi, t0 + i)) {
            let (mx, inv) = st(i);
            let srow: &mut [f32; BK] = (&mut s[i * BK..(i + 1) * BK]).try_into().unwrap(); // ok: the slice is BK long
            if class == MIXED {
                if let Some(mr) = j.mask_row(bi, hi, t0 + i) {
                    for (e, mm) in srow[..n].iter_mut().zip(&mr[x0..x0 + n]) {
                        *e += mm;
                    }
                }
            }
            add_mass::<V>(mass, srow, mx, inv);
        }
    }
}
