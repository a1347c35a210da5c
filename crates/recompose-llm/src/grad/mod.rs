//! Differentiable building blocks of the decoder: RMSNorm, softmax, RoPE, SwiGLU/GeGLU, the frozen
//! linear (input gradient only) and the fused LM-head cross-entropy. Each is a CPU op with a
//! closed-form backward (f32 and f64) plus a plain candle composition, which is its test oracle
//! and the path on other devices. The model calls these only when a gradient is wanted (some
//! input is tracked); inference keeps candle's fused forward-only kernels.
//!
//! Reductions that cross rows (the weight gradient of RMSNorm, the LM head's) run in fixed chunks
//! summed in order, so a result never depends on how rayon split the work: training is
//! bit-for-bit repeatable.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Storage, Tensor, WithDType, D};
use rayon::prelude::*;
use recompose_core::config::Activation;
use std::sync::Mutex;

pub(crate) type CResult<T> = candle_core::Result<T>;

/// Rows per partial sum of a cross-row reduction: a constant, so the summation order (and the
/// result's bits) are the same for any thread count.
pub(crate) const REDUCE_ROWS: usize = 64;

/// Runs `f` inside a function compiled for AVX-512 (or AVX2 and FMA) when the CPU has it, so
/// the element loops it inlines vectorise wide; the baseline build targets plain x86-64.
#[inline(always)]
pub(crate) fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::kernels::quant::{level, Level};
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn wide<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn narrow<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        match level() {
            // SAFETY: `level()` detected these features on this CPU.
            Level::Avx512Vnni => return unsafe { wide(f) },
            Level::Avx2 => return unsafe { narrow(f) },
            Level::Scalar => {}
        }
    }
    f()
}

pub(crate) fn wants_grad(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.track_op())
}

/// Whether the CPU op of this module can take `t`.
pub(crate) fn cpu_float(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

pub(crate) fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, what: &str) -> CResult<&'a [T]> {
    let v = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: expects a contiguous tensor"),
    }
}

pub(crate) fn values<T: WithDType>(t: &Tensor) -> CResult<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

/// A tensor's elements for a backward pass: borrowed in place when the tensor is a contiguous
/// CPU one (no copy of activations that can be tens of megabytes), copied otherwise.
pub(crate) enum Data<'a, T> {
    Borrowed(candle_core::StorageRef<'a>, usize, usize),
    Owned(Vec<T>),
}

impl<'a, T: WithDType> Data<'a, T> {
    pub(crate) fn of(t: &'a Tensor) -> CResult<Self> {
        let (st, l) = t.storage_and_layout();
        if let (Storage::Cpu(_), Some((a, b))) = (&*st, l.contiguous_offsets()) {
            return Ok(Data::Borrowed(st, a, b));
        }
        drop(st);
        Ok(Data::Owned(values(t)?))
    }

    pub(crate) fn get(&self) -> CResult<&[T]> {
        match self {
            Data::Borrowed(st, a, b) => match &**st {
                Storage::Cpu(cs) => Ok(&T::cpu_storage_as_slice(cs)?[*a..*b]),
                _ => candle_core::bail!("tensor data is not on the CPU"),
            },
            Data::Owned(v) => Ok(v),
        }
    }
}

/// Runs `f` on the f32 or f64 data of a CPU op; other dtypes are refused.
macro_rules! float_dispatch {
    ($name:expr, $s:expr, |$t:ident| $body:expr) => {
        match $s {
            CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            other => candle_core::bail!("{}: expects f32 or f64, got {:?}", $name, other.dtype()),
        }
    };
}

/// The floats the kernel runs on: f32 with a fast exp, f64 exact (tests).
pub(crate) trait Real: WithDType {
    fn expo(self) -> Self;
}

impl Real for f32 {
    /// e^x to about 2e-7 relative: 2^n times a degree-6 polynomial on [-ln2/2, ln2/2],
    /// branch-free so the loops vectorise.
    #[inline(always)]
    fn expo(self) -> f32 {
        // clamp, not max/min: a NaN must stay NaN (max/min would turn it into e^-87 and hide a
        // diverged step from the loss check).
        let x = self.clamp(-87.0, 88.0);
        // t = 1.5 * 2^23 + round(x log2 e): its low mantissa bits hold n as an integer.
        let t = x * std::f32::consts::LOG2_E + 12_582_912.0;
        let n = t - 12_582_912.0;
        let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
        let p =
            1.0 + r * (1.0 + r * (0.5 + r * (0.166_666_67 + r * (0.041_666_5 + r * (0.008_333_36 + r * 0.001_392_5)))));
        let two_n = t.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127) << 23;
        p * f32::from_bits(two_n)
    }
}

impl Real for f64 {
    fn expo(self) -> f64 {
        self.exp()
    }
}

/// `sum(a * b)` in 16 independent lanes (so it vectorises), finished in f64.
#[inline(always)]
pub(crate) fn dot<T: Real>(a: &[T], b: &[T]) -> f64 {
    let mut acc = [T::from_f64(0.0); 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f64 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| (*x * *y).to_f64()).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().map(|v| v.to_f64()).sum::<f64>() + tail
}

/// `sum(a)` in 16 lanes, finished in f64.
#[inline(always)]
pub(crate) fn sum_of<T: Real>(a: &[T]) -> f64 {
    let mut acc = [T::from_f64(0.0); 16];
    let c = a.chunks_exact(16);
    let tail: f64 = c.remainder().iter().map(|v| v.to_f64()).sum();
    for x in c {
        for i in 0..16 {
            acc[i] += x[i];
        }
    }
    acc.iter().map(|v| v.to_f64()).sum::<f64>() + tail
}

/// The largest element, in 16 lanes.
#[inline(always)]
pub(crate) fn max_of<T: Real>(a: &[T]) -> T {
    let first = a.first().copied().unwrap_or(T::from_f64(f64::NEG_INFINITY));
    let mut acc = [first; 16];
    let c = a.chunks_exact(16);
    let mut m = c.remainder().iter().copied().fold(first, |x, y| if y > x { y } else { x });
    for x in c {
        for i in 0..16 {
            acc[i] = if x[i] > acc[i] { x[i] } else { acc[i] };
        }
    }
    for v in acc {
        m = if v > m { v } else { m };
    }
    m
}

/// `c (m x n) = a (m x k) . b (k x n)` (+ c when `acc`) on the calling thread, each matrix given
/// as (data, (row stride, column stride)): for kernels that parallelise over their own tasks.
#[allow(clippy::too_many_arguments)]
pub fn matmul_strided<T: WithDType>(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [T],
    acc: bool,
    a: &[T],
    (a_rs, a_cs): (usize, usize),
    b: &[T],
    (b_rs, b_cs): (usize, usize),
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    // The extents the raw pointers may touch: an internal invariant of this module's callers.
    assert!(c.len() >= m * n); // ok: internal invariant
    assert!(a.len() > (m - 1) * a_rs + (k - 1) * a_cs); // ok: internal invariant
    assert!(b.len() > (k - 1) * b_rs + (n - 1) * b_cs); // ok: internal invariant
                                                        // SAFETY: the asserts bound every index gemm reads or writes.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            acc,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            T::from_f64(1.0),
            T::from_f64(1.0),
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

mod attention;
mod ce;
#[cfg(test)]
pub(crate) mod testutil;

pub use attention::{causal_attention, causal_attention_composed};
pub use ce::{cross_entropy, linear_cross_entropy, linear_cross_entropy_composed, IGNORE};

// ---------------------------------------------------------------------------------------------
// RMSNorm

/// `x / sqrt(mean(x^2) + eps) * w` over the last dimension.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> CResult<Tensor> {
    if !wants_grad(&[x, w]) && x.dtype() != DType::F64 {
        return candle_nn::ops::rms_norm(x, w, eps as f32);
    }
    if cpu_float(x) && x.dtype() == w.dtype() {
        return x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps });
    }
    rms_norm_composed(x, w, eps)
}

/// RMSNorm in candle ops (autograd through every step).
pub fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> CResult<Tensor> {
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&r)?.broadcast_mul(w)
}

struct RmsNorm {
    eps: f64,
}

#[inline(always)]
fn inv_rms<T: Real>(row: &[T], eps: f64) -> f64 {
    1.0 / (dot(row, row) / row.len() as f64 + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let h = l1.dims().last().copied().unwrap_or(0);
        if l2.dims() != [h] {
            candle_core::bail!("rms-norm: weight {:?} for rows of {h}", l2.dims());
        }
        let eps = self.eps;
        let out = float_dispatch!("rms-norm", s1, |T| {
            let (x, w) = (slice::<T>(s1, l1, "rms-norm")?, slice::<T>(s2, l2, "rms-norm")?);
            let mut y = vec![T::from_f64(0.0); x.len()];
            y.par_chunks_mut(h.max(1) * 16).zip(x.par_chunks(h.max(1) * 16)).for_each(|(yo, xs)| {
                vectorized(|| {
                    for (yo, xi) in yo.chunks_mut(h.max(1)).zip(xs.chunks(h.max(1))) {
                        let r = T::from_f64(inv_rms(xi, eps));
                        for ((o, &v), &g) in yo.iter_mut().zip(xi).zip(w) {
                            *o = v * r * g;
                        }
                    }
                })
            });
            T::to_cpu_storage_owned(y)
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, dy: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let h = x.dim(D::Minus1)?;
        let (need_x, need_w) = (x.track_op(), w.track_op());
        macro_rules! run {
            ($t:ty) => {{
                let dyc = dy.contiguous()?;
                let (xv, wv, gv) = (Data::<$t>::of(x)?, Data::<$t>::of(w)?, Data::<$t>::of(&dyc)?);
                let (dx, dw) = rms_norm_backward(xv.get()?, wv.get()?, gv.get()?, h, self.eps, need_x, need_w);
                // Only what is needed was computed: an input that takes no gradient gets none
                // (the weight of a norm over untracked embeddings, say).
                let dx = if need_x { Some(Tensor::from_vec(dx, x.shape(), x.device())?) } else { None };
                let dw = if need_w { Some(Tensor::from_vec(dw, h, w.device())?) } else { None };
                (dx, dw)
            }};
        }
        Ok(match x.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            d => candle_core::bail!("rms-norm backward: {d:?}"),
        })
    }
}

/// dx = r (g - x r^2 mean(g x)) with g = dy w; dw = sum over rows of dy x r.
fn rms_norm_backward<T: Real>(
    x: &[T],
    w: &[T],
    dy: &[T],
    h: usize,
    eps: f64,
    need_x: bool,
    need_w: bool,
) -> (Vec<T>, Vec<T>) {
    let mut dx = vec![T::from_f64(0.0); if need_x { x.len() } else { 0 }];
    if need_x {
        dx.par_chunks_mut(h * 16).zip(x.par_chunks(h * 16)).zip(dy.par_chunks(h * 16)).for_each(|((o, xs), gs)| {
            vectorized(|| {
                let mut gw = vec![T::from_f64(0.0); h];
                for ((o, xi), gi) in o.chunks_mut(h).zip(xs.chunks(h)).zip(gs.chunks(h)) {
                    let r = inv_rms(xi, eps);
                    gw.iter_mut().zip(gi).zip(w).for_each(|((a, &g), &ww)| *a = g * ww);
                    let c = T::from_f64(dot(xi, &gw) / h as f64 * r * r);
                    let r = T::from_f64(r);
                    for ((o, &v), &g) in o.iter_mut().zip(xi).zip(&gw) {
                        *o = r * (g - v * c);
                    }
                }
            })
        });
    }
    let mut dw = vec![T::from_f64(0.0); h];
    if need_w {
        let partials: Vec<Vec<f64>> = x
            .par_chunks(h * REDUCE_ROWS)
            .zip(dy.par_chunks(h * REDUCE_ROWS))
            .map(|(xs, gs)| {
                vectorized(|| {
                    let mut acc = vec![0f64; h];
                    for (xi, gi) in xs.chunks(h).zip(gs.chunks(h)) {
                        let r = inv_rms(xi, eps);
                        for ((a, &v), &g) in acc.iter_mut().zip(xi).zip(gi) {
                            *a += (g * v).to_f64() * r;
                        }
                    }
                    acc
                })
            })
            .collect();
        let mut acc = vec![0f64; h];
        for p in partials {
            acc.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
        dw = acc.into_iter().map(T::from_f64).collect();
    }
    (dx, dw)
}

// ---------------------------------------------------------------------------------------------
// Softmax

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> CResult<Tensor> {
    if !x.track_op() {
        return candle_nn::ops::softmax_last_dim(x);
    }
    if cpu_float(x) {
        return x.contiguous()?.apply_op1(Softmax);
    }
    candle_nn::ops::softmax(x, D::Minus1)
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let n = l.dims().last().copied().unwrap_or(1).max(1);
        let out = float_dispatch!("softmax", s, |T| {
            let x = slice::<T>(s, l, "softmax")?;
            let mut y = vec![T::from_f64(0.0); x.len()];
            y.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(yo, xi)| {
                let max = xi.iter().map(|v| v.to_f64()).fold(f64::NEG_INFINITY, f64::max);
                let mut sum = 0f64;
                for (o, v) in yo.iter_mut().zip(xi) {
                    let e = (v.to_f64() - max).exp();
                    sum += e;
                    *o = T::from_f64(e);
                }
                let inv = 1.0 / sum;
                yo.iter_mut().for_each(|o| *o = T::from_f64(o.to_f64() * inv));
            });
            T::to_cpu_storage_owned(y)
        });
        Ok((out, l.shape().clone()))
    }

    /// dx = y (dy - sum(dy y)).
    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> CResult<Option<Tensor>> {
        let n = y.dim(D::Minus1)?.max(1);
        macro_rules! run {
            ($t:ty) => {{
                let dyc = dy.contiguous()?;
                let (yd, gd) = (Data::<$t>::of(y)?, Data::<$t>::of(&dyc)?);
                let (yv, gv) = (yd.get()?, gd.get()?);
                let mut dx = vec![<$t>::from_f64(0.0); yv.len()];
                dx.par_chunks_mut(n).zip(yv.par_chunks(n)).zip(gv.par_chunks(n)).for_each(|((o, yi), gi)| {
                    let dot: f64 = yi.iter().zip(gi).map(|(a, b)| a.to_f64() * b.to_f64()).sum();
                    for ((o, a), b) in o.iter_mut().zip(yi).zip(gi) {
                        *o = <$t>::from_f64(a.to_f64() * (b.to_f64() - dot));
                    }
                });
                Tensor::from_vec(dx, y.shape(), y.device())?
            }};
        }
        Ok(Some(match y.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            d => candle_core::bail!("softmax backward: {d:?}"),
        }))
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE

/// Rotates `x (B, H, T, D)` by angles whose cos/sin are `(B, T, D/2)` (or `(T, D/2)`), pairing
/// adjacent dimensions (`interleaved`) or the two halves (NEOX), like candle's `rope_i` / `rope`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> CResult<Tensor> {
    let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
    if !x.track_op() {
        return if interleaved {
            candle_nn::rotary_emb::rope_i(&x.contiguous()?, &cos, &sin)
        } else {
            candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
        };
    }
    if cpu_float(x) {
        return x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope { interleaved });
    }
    rope_composed(x, &cos, &sin, interleaved)
}

/// RoPE in candle ops: `x * cos + rotate(x) * sin` with the pairing made explicit.
pub fn rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> CResult<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    let half = d / 2;
    // cos/sin as (B or 1, 1, T, D/2).
    let per_row = |c: &Tensor| -> CResult<Tensor> {
        match c.rank() {
            2 => c.reshape((1, 1, t, half)),
            _ => c.reshape((b, 1, t, half)),
        }
    };
    let (c, s) = (per_row(cos)?, per_row(sin)?);
    if interleaved {
        let xs = x.reshape((b, h, t, half, 2))?;
        let (x0, x1) = (xs.narrow(4, 0, 1)?.squeeze(4)?, xs.narrow(4, 1, 1)?.squeeze(4)?);
        let y0 = (x0.broadcast_mul(&c)? - x1.broadcast_mul(&s)?)?;
        let y1 = (x0.broadcast_mul(&s)? + x1.broadcast_mul(&c)?)?;
        Tensor::stack(&[y0, y1], 4)?.reshape((b, h, t, d))
    } else {
        let (x0, x1) = (x.narrow(3, 0, half)?, x.narrow(3, half, half)?);
        let y0 = (x0.broadcast_mul(&c)? - x1.broadcast_mul(&s)?)?;
        let y1 = (x0.broadcast_mul(&s)? + x1.broadcast_mul(&c)?)?;
        Tensor::cat(&[y0, y1], 3)
    }
}

struct Rope {
    interleaved: bool,
}

/// The rotation itself; `sign` -1 rotates backwards (the transpose, used by the backward pass).
fn rotate<T: Real>(
    x: &[T],
    cos: &[T],
    sin: &[T],
    dims: (usize, usize, usize, usize),
    per_row: bool,
    interleaved: bool,
    sign: f64,
) -> Vec<T> {
    let (_, h, t, d) = dims;
    let half = d / 2;
    let sign = T::from_f64(sign);
    let mut y = vec![T::from_f64(0.0); x.len()];
    y.par_chunks_mut(t * d).zip(x.par_chunks(t * d)).enumerate().for_each(|(bh, (yo, xi))| {
        let row = if per_row { bh / h } else { 0 };
        vectorized(|| {
            for ti in 0..t {
                let at = (row * t + ti) * half;
                let (cs, ss) = (&cos[at..at + half], &sin[at..at + half]);
                let (xr, yr) = (&xi[ti * d..(ti + 1) * d], &mut yo[ti * d..(ti + 1) * d]);
                if interleaved {
                    for i in 0..half {
                        let (c, s, x0, x1) = (cs[i], sign * ss[i], xr[2 * i], xr[2 * i + 1]);
                        yr[2 * i] = x0 * c - x1 * s;
                        yr[2 * i + 1] = x0 * s + x1 * c;
                    }
                } else {
                    let (y0, y1) = yr.split_at_mut(half);
                    let (x0, x1) = xr.split_at(half);
                    for i in 0..half {
                        let (c, s) = (cs[i], sign * ss[i]);
                        y0[i] = x0[i] * c - x1[i] * s;
                        y1[i] = x0[i] * s + x1[i] * c;
                    }
                }
            }
        })
    });
    y
}

fn rope_shapes(x: &Layout, cos: &Layout) -> CResult<((usize, usize, usize, usize), bool)> {
    let dims = x.shape().dims4()?;
    let (b, _, t, d) = dims;
    let per_row = match cos.dims() {
        [tt, hh] if *tt == t && *hh == d / 2 => false,
        [bb, tt, hh] if *bb == b && *tt == t && *hh == d / 2 => true,
        other => candle_core::bail!("rope: cos/sin {other:?} for x {:?}", x.dims()),
    };
    Ok((dims, per_row))
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (dims, per_row) = rope_shapes(l1, l2)?;
        let out = float_dispatch!("rope", s1, |T| {
            let (x, c, s) = (slice::<T>(s1, l1, "rope")?, slice::<T>(s2, l2, "rope")?, slice::<T>(s3, l3, "rope")?);
            T::to_cpu_storage_owned(rotate(x, c, s, dims, per_row, self.interleaved, 1.0))
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = x.dims4()?;
        let per_row = cos.rank() == 3;
        macro_rules! run {
            ($t:ty) => {{
                let dyc = dy.contiguous()?;
                let (g, c, s) = (Data::<$t>::of(&dyc)?, Data::<$t>::of(cos)?, Data::<$t>::of(sin)?);
                let r = rotate(g.get()?, c.get()?, s.get()?, dims, per_row, self.interleaved, -1.0);
                Tensor::from_vec(r, x.shape(), x.device())?
            }};
        }
        let dx = match x.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            d => candle_core::bail!("rope backward: {d:?}"),
        };
        Ok((Some(dx), None, None))
    }
}

// ---------------------------------------------------------------------------------------------
// Gated activation

/// `act(g) * u`, SiLU (Llama) or tanh-GELU (Gemma).
pub fn gated(g: &Tensor, u: &Tensor, act: Activation) -> CResult<Tensor> {
    if !cpu_float(g) || g.dtype() != u.dtype() {
        return gated_composed(g, u, act);
    }
    // One pass with the fast exp, in inference too: candle's silu then mul is two passes and
    // two allocations.
    if !wants_grad(&[g, u]) {
        return g.contiguous()?.apply_op2_no_bwd(&u.contiguous()?, &Gated { act });
    }
    g.contiguous()?.apply_op2(&u.contiguous()?, Gated { act })
}

/// The gated activation in candle ops.
pub fn gated_composed(g: &Tensor, u: &Tensor, act: Activation) -> CResult<Tensor> {
    let a = match act {
        Activation::Silu => candle_nn::ops::silu(g)?,
        Activation::GeluTanh => g.gelu()?,
    };
    a * u
}

struct Gated {
    act: Activation,
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;

/// (act(x), act'(x)) in the element type, with the fast exp for f32.
#[inline(always)]
fn act_and_grad<T: Real>(act: Activation, x: T) -> (T, T) {
    let c = |v: f64| T::from_f64(v);
    match act {
        Activation::Silu => {
            let s = c(1.0) / (c(1.0) + (c(0.0) - x).expo());
            (x * s, s * (c(1.0) + x * (c(1.0) - s)))
        }
        Activation::GeluTanh => {
            let inner = c(SQRT_2_OVER_PI) * (x + c(0.044715) * x * x * x);
            let th = c(1.0) - c(2.0) / ((inner + inner).expo() + c(1.0));
            let dinner = c(SQRT_2_OVER_PI) * (c(1.0) + c(3.0 * 0.044715) * x * x);
            (c(0.5) * x * (c(1.0) + th), c(0.5) * (c(1.0) + th) + c(0.5) * x * (c(1.0) - th * th) * dinner)
        }
    }
}

fn gated_forward<T: Real>(act: Activation, g: &[T], u: &[T]) -> Vec<T> {
    let mut y = vec![T::from_f64(0.0); g.len()];
    y.par_chunks_mut(4096).zip(g.par_chunks(4096)).zip(u.par_chunks(4096)).for_each(|((o, gs), us)| {
        vectorized(|| match act {
            Activation::Silu => {
                for ((o, &a), &b) in o.iter_mut().zip(gs).zip(us) {
                    *o = act_and_grad(Activation::Silu, a).0 * b;
                }
            }
            Activation::GeluTanh => {
                for ((o, &a), &b) in o.iter_mut().zip(gs).zip(us) {
                    *o = act_and_grad(Activation::GeluTanh, a).0 * b;
                }
            }
        })
    });
    y
}

#[inline(always)]
fn gated_grad_chunk<T: Real>(act: Activation, dg: &mut [T], du: &mut [T], g: &[T], u: &[T], dy: &[T]) {
    for i in 0..g.len().min(dg.len()).min(du.len()).min(u.len()).min(dy.len()) {
        let (a, da) = act_and_grad(act, g[i]);
        dg[i] = dy[i] * u[i] * da;
        du[i] = dy[i] * a;
    }
}

fn gated_backward<T: Real>(act: Activation, g: &[T], u: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
    let mut dg = vec![T::from_f64(0.0); g.len()];
    let mut du = vec![T::from_f64(0.0); g.len()];
    dg.par_chunks_mut(4096)
        .zip(du.par_chunks_mut(4096))
        .zip(g.par_chunks(4096).zip(u.par_chunks(4096)).zip(dy.par_chunks(4096)))
        .for_each(|((dgo, duo), ((gs, us), ds))| {
            vectorized(|| match act {
                Activation::Silu => gated_grad_chunk(Activation::Silu, dgo, duo, gs, us, ds),
                Activation::GeluTanh => gated_grad_chunk(Activation::GeluTanh, dgo, duo, gs, us, ds),
            })
        });
    (dg, du)
}

impl CustomOp2 for Gated {
    fn name(&self) -> &'static str {
        "gated-activation"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        if l1.dims() != l2.dims() {
            candle_core::bail!("gated activation: {:?} vs {:?}", l1.dims(), l2.dims());
        }
        let act = self.act;
        let out = float_dispatch!("gated activation", s1, |T| {
            let (g, u) = (slice::<T>(s1, l1, "gated")?, slice::<T>(s2, l2, "gated")?);
            T::to_cpu_storage_owned(gated_forward(act, g, u))
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _res: &Tensor, dy: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let act = self.act;
        macro_rules! run {
            ($t:ty) => {{
                let dyc = dy.contiguous()?;
                let (gv, uv, dv) = (Data::<$t>::of(g)?, Data::<$t>::of(u)?, Data::<$t>::of(&dyc)?);
                let (dg, du) = gated_backward(act, gv.get()?, uv.get()?, dv.get()?);
                (Tensor::from_vec(dg, g.shape(), g.device())?, Tensor::from_vec(du, u.shape(), u.device())?)
            }};
        }
        let (dg, du) = match g.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            d => candle_core::bail!("gated activation backward: {d:?}"),
        };
        Ok((g.track_op().then_some(dg), u.track_op().then_some(du)))
    }
}

// ---------------------------------------------------------------------------------------------
// Frozen linear

/// `x (N, in) @ w^T` where `w (out, in)` is frozen: only the input's gradient is computed.
/// (candle's matmul backward also computes the weight's, which for a frozen weight costs a
/// second matmul of the forward's size for nothing.)
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> CResult<Tensor> {
    if !x.track_op() || w.track_op() {
        return x.matmul(&w.t()?);
    }
    x.apply_op1(FrozenLinear { w: w.clone() })
}

struct FrozenLinear {
    w: Tensor,
}

impl FrozenLinear {
    fn dims(&self, l: &Layout) -> CResult<(usize, usize, usize, Layout)> {
        let (n, k) = l.shape().dims2()?;
        let (out, wk) = self.w.dims2()?;
        if k != wk {
            candle_core::bail!("frozen linear: input width {k}, weight {:?}", self.w.dims());
        }
        Ok((n, k, out, self.w.layout().transpose(0, 1)?))
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (n, k, out, wt) = self.dims(l)?;
        let (ws, _) = self.w.storage_and_layout();
        let Storage::Cpu(w) = &*ws else { candle_core::bail!("frozen linear: weight is not on the CPU") };
        Ok((s.matmul(w, (1, n, out, k), l, &wt)?, Shape::from((n, out))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> CResult<(candle_core::CudaStorage, Shape)> {
        let (n, k, out, wt) = self.dims(l)?;
        let (ws, _) = self.w.storage_and_layout();
        let Storage::Cuda(w) = &*ws else { candle_core::bail!("frozen linear: weight is not on the GPU") };
        Ok((s.matmul(w, (1, n, out, k), l, &wt)?, Shape::from((n, out))))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, dy: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(dy.matmul(&self.w)?))
    }
}

/// `x W^T + scale (x A^T) B^T` for a frozen `W (out, in)` with LoRA factors `A (r, in)`,
/// `B (out, r)`: one op instead of the six a composition puts in the graph (two matmuls, two
/// transposes, a scale and an add), and no weight gradient for `W`.
pub fn lora_linear(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> CResult<Tensor> {
    if w.track_op() || !cpu_float(x) || !wants_grad(&[x, a, b]) || x.dtype() != w.dtype() {
        let base = frozen_linear(x, w)?;
        return base + (x.matmul(&a.t()?)? * scale)?.matmul(&b.t()?)?;
    }
    let op = LoraLinear { w: w.clone(), scale, h: Mutex::new(None) };
    x.contiguous()?.apply_op3_arc(&a.contiguous()?, &b.contiguous()?, std::sync::Arc::new(Box::new(op)))
}

struct LoraLinear {
    w: Tensor,
    scale: f64,
    /// `x A^T`, kept for B's gradient.
    h: Mutex<Option<Tensor>>,
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (n, k) = lx.shape().dims2()?;
        let (out, wk) = self.w.dims2()?;
        let (r, ak) = la.shape().dims2()?;
        if k != wk || ak != k || lb.dims() != [out, r] {
            candle_core::bail!(
                "lora linear: x {:?}, W {:?}, A {:?}, B {:?}",
                lx.dims(),
                self.w.dims(),
                la.dims(),
                lb.dims()
            );
        }
        let (ws, _) = self.w.storage_and_layout();
        let Storage::Cpu(w) = &*ws else { candle_core::bail!("lora linear: weight is not on the CPU") };
        let y = sx.matmul(w, (1, n, out, k), lx, &self.w.layout().transpose(0, 1)?)?;
        let h = sx.matmul(sa, (1, n, r, k), lx, &la.transpose(0, 1)?)?;
        let d = h.matmul(sb, (1, n, out, r), &Layout::contiguous((n, r)), &lb.transpose(0, 1)?)?;
        let s = self.scale;
        let mut y = y;
        macro_rules! add_branch {
            ($y:expr, $d:expr, $h:expr, $t:ty) => {{
                let k = <$t>::from_f64(s);
                $y.par_chunks_mut(4096)
                    .zip($d.par_chunks(4096))
                    .for_each(|(y, d)| vectorized(|| y.iter_mut().zip(d).for_each(|(y, &d)| *y += k * d)));
                if let Ok(mut slot) = self.h.lock() {
                    *slot = Some(Tensor::from_slice($h.as_slice(), (n, r), &candle_core::Device::Cpu)?);
                }
            }};
        }
        match (&mut y, &d, &h) {
            (CpuStorage::F32(y), CpuStorage::F32(d), CpuStorage::F32(h)) => add_branch!(y, d, h, f32),
            (CpuStorage::F64(y), CpuStorage::F64(d), CpuStorage::F64(h)) => add_branch!(y, d, h, f64),
            _ => candle_core::bail!("lora linear: expects f32 or f64"),
        }
        Ok((y, Shape::from((n, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = self
            .h
            .lock()
            .map_err(|_| candle_core::Error::Msg("lora linear state poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("lora linear: backward ran twice".into()))?;
        let dyb = (dy.matmul(b)? * self.scale)?; // (n, r)
        let dx = if x.track_op() { Some((dy.matmul(&self.w)? + dyb.matmul(a)?)?) } else { None };
        let da = if a.track_op() { Some(dyb.t()?.matmul(x)?) } else { None };
        let db = if b.track_op() { Some((dy.t()?.matmul(&h)? * self.scale)?) } else { None };
        Ok((dx, da, db))
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn rms_norm_matches_composition_and_finite_differences() {
        for dtype in [DType::F32, DType::F64] {
            let x = rand(&[3, 5, 16], 1, dtype);
            let w = rand(&[16], 2, dtype);
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
            check_against_composed(
                &[x, w],
                |t| rms_norm(&t[0], &t[1], 1e-5).unwrap(),
                |t| rms_norm_composed(&t[0], &t[1], 1e-5).unwrap(),
                tol,
            );
        }
        let (x, w) = (rand(&[4, 8], 3, DType::F64), rand(&[8], 4, DType::F64));
        check_finite_differences(&[x, w], |t| rms_norm(&t[0], &t[1], 1e-5).unwrap());
    }

    #[test]
    fn rms_norm_of_an_untracked_input_gives_its_weight_the_composed_gradient() {
        // The backward once built an empty dx for an input without a gradient, and failed.
        let x = rand(&[3, 8], 5, DType::F32);
        let w = Var::from_tensor(&rand(&[8], 6, DType::F32)).unwrap();
        let c = rand(&[3, 8], 7, DType::F32);
        let fused = (rms_norm(&x, w.as_tensor(), 1e-5).unwrap() * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let plain =
            (rms_norm_composed(&x, w.as_tensor(), 1e-5).unwrap() * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let (a, b) = (fused.get(w.as_tensor()).unwrap(), plain.get(w.as_tensor()).unwrap());
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-5, "weight gradient off by {d}");
        assert!(fused.get(&x).is_none());
    }

    #[test]
    fn softmax_matches_composition_and_finite_differences() {
        let x = (rand(&[2, 3, 7], 5, DType::F64) * 4.0).unwrap();
        check_against_composed(
            &[x.clone()],
            |t| softmax_last_dim(&t[0]).unwrap(),
            |t| candle_nn::ops::softmax(&t[0], D::Minus1).unwrap(),
            1e-12,
        );
        check_finite_differences(&[x], |t| softmax_last_dim(&t[0]).unwrap());
    }

    #[test]
    fn rope_matches_candle_and_composition_in_both_pairings() {
        for interleaved in [true, false] {
            let x = rand(&[2, 3, 5, 8], 6, DType::F32);
            let angles: Vec<f32> = (0..2 * 5 * 4).map(|i| i as f32 * 0.37).collect();
            let cos = Tensor::from_vec(angles.iter().map(|a| a.cos()).collect(), (2, 5, 4), &Device::Cpu).unwrap();
            let sin = Tensor::from_vec(angles.iter().map(|a| a.sin()).collect(), (2, 5, 4), &Device::Cpu).unwrap();
            // Untracked: candle's kernel; tracked: ours; both equal the composition.
            let plain = rope(&x, &cos, &sin, interleaved).unwrap();
            assert!(max_diff(&plain, &rope_composed(&x, &cos, &sin, interleaved).unwrap()) < 1e-6);
            let (c2, s2) = (cos.clone(), sin.clone());
            check_against_composed(
                &[x.clone()],
                |t| rope(&t[0], &cos, &sin, interleaved).unwrap(),
                |t| rope_composed(&t[0], &c2, &s2, interleaved).unwrap(),
                1e-6,
            );
            let (c, s) = (cos.to_dtype(DType::F64).unwrap(), sin.to_dtype(DType::F64).unwrap());
            check_finite_differences(&[x.to_dtype(DType::F64).unwrap()], |t| rope(&t[0], &c, &s, interleaved).unwrap());
        }
    }

    #[test]
    fn gated_activations_match_composition_and_finite_differences() {
        for act in [Activation::Silu, Activation::GeluTanh] {
            let (g, u) = ((rand(&[6, 10], 8, DType::F64) * 3.0).unwrap(), rand(&[6, 10], 9, DType::F64));
            // candle's GELU backward rounds its constants (0.797885, ...): 1e-7 apart from the exact one.
            check_against_composed(
                &[g.clone(), u.clone()],
                |t| gated(&t[0], &t[1], act).unwrap(),
                |t| gated_composed(&t[0], &t[1], act).unwrap(),
                1e-6,
            );
            check_finite_differences(&[g, u], |t| gated(&t[0], &t[1], act).unwrap());
        }
    }

    #[test]
    fn inference_gated_activation_matches_candle_ops_in_f32() {
        // Untracked f32: the fused one-pass kernel against candle's silu/gelu then mul.
        for act in [Activation::Silu, Activation::GeluTanh] {
            let g = (rand(&[37, 300], 3, DType::F32) * 6.0).unwrap();
            let u = rand(&[37, 300], 4, DType::F32);
            let (got, want) = (gated(&g, &u, act).unwrap(), gated_composed(&g, &u, act).unwrap());
            let d = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-5, "{act:?}: fused and composed differ by {d}");
        }
    }

    #[test]
    fn lora_linear_matches_composition_and_finite_differences() {
        let (x, w) = (rand(&[7, 6], 20, DType::F64), rand(&[5, 6], 21, DType::F64));
        let (a, b) = (rand(&[3, 6], 22, DType::F64), rand(&[5, 3], 23, DType::F64));
        let w2 = w.clone();
        check_against_composed(
            &[x.clone(), a.clone(), b.clone()],
            |t| lora_linear(&t[0], &w, &t[1], &t[2], 1.5).unwrap(),
            |t| {
                (t[0].matmul(&w2.t().unwrap()).unwrap()
                    + (t[0].matmul(&t[1].t().unwrap()).unwrap() * 1.5).unwrap().matmul(&t[2].t().unwrap()).unwrap())
                .unwrap()
            },
            1e-12,
        );
        let w3 = rand(&[5, 6], 21, DType::F64);
        check_finite_differences(&[x, a, b], |t| lora_linear(&t[0], &w3, &t[1], &t[2], 0.7).unwrap());
    }

    #[test]
    fn frozen_linear_gives_the_input_gradient_only() {
        let x = Var::from_tensor(&rand(&[5, 6], 10, DType::F64)).unwrap();
        let w = rand(&[4, 6], 11, DType::F64);
        let y = frozen_linear(x.as_tensor(), &w).unwrap();
        let want = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        assert!(max_diff(&y, &want) < 1e-12);
        let g = y.sum_all().unwrap().backward().unwrap();
        let gw = Tensor::ones((5, 4), DType::F64, &Device::Cpu).unwrap().matmul(&w).unwrap();
        assert!(max_diff(g.get(x.as_tensor()).unwrap(), &gw) < 1e-12);
        assert!(g.get(&w).is_none());
    }

    #[test]
    fn weight_gradients_do_not_depend_on_the_thread_count() {
        let x = Var::from_tensor(&rand(&[300, 32], 16, DType::F32)).unwrap();
        let w = Var::from_tensor(&rand(&[32], 17, DType::F32)).unwrap();
        let grad = || {
            let y = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
            let g = (y * rand(&[300, 32], 18, DType::F32)).unwrap().sum_all().unwrap().backward().unwrap();
            g.get(w.as_tensor()).unwrap().to_vec1::<f32>().unwrap()
        };
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(grad);
        let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap().install(grad);
        assert_eq!(one, three);
    }
}
