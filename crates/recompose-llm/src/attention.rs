//! Fused attention for short query blocks (decode and small chunks): scores, mask, softmax and
//! the weighted sum of values in one pass per (row, KV head), reading the cache's keys and values
//! in place through their strides. Replaces per-head batched matmuls and cache copies whose
//! fixed costs dominate decode at batch > 1. The plain candle composition in `model.rs` is the
//! oracle it is tested against.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// `q (B, Hkv, G*T, D)` contiguous, `k, v (B, Hkv, L, D)` any strides with a unit last stride,
/// `mask` additive `(B, T, L)` or per KV head `(B, Hkv, T, L)` -> `(B, Hkv, G*T, D)`.
pub struct FusedAttention {
    pub scale: f32,
    pub t: usize,
    pub mask: Option<Vec<f32>>,
    /// When set (each row's real query count), the kernel also sums every slot's probabilities
    /// over those queries into `mass`, laid out `(B, Hkv * G, L)`.
    pub mass_lens: Option<Vec<usize>>,
    pub mass: Mutex<Vec<f32>>,
}

fn f32s<'a>(s: &'a CpuStorage, what: &str) -> candle_core::Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        _ => candle_core::bail!("fused attention: {what} must be f32"),
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, gt, d) = ql.shape().dims4()?;
        let (kb, kh, l, kd) = kl.shape().dims4()?;
        if (kb, kh, kd) != (b, h, d) || vl.shape().dims() != kl.shape().dims() {
            candle_core::bail!("fused attention: shapes {:?} {:?} {:?}", ql.shape(), kl.shape(), vl.shape());
        }
        let Some((qo, _)) = ql.contiguous_offsets() else {
            candle_core::bail!("fused attention: q must be contiguous")
        };
        if kl.stride()[3] != 1 || vl.stride()[3] != 1 {
            candle_core::bail!("fused attention: k and v need a unit last stride");
        }
        let mut mask_heads = 1;
        if let Some(m) = &self.mask {
            if m.len() == b * h * self.t * l {
                mask_heads = h;
            } else if m.len() != b * self.t * l {
                candle_core::bail!("fused attention: mask has {} values, expected {}", m.len(), b * self.t * l);
            }
        }
        if self.mass_lens.as_ref().is_some_and(|m| m.len() != b) {
            candle_core::bail!("fused attention: query lengths for {b} rows needed");
        }
        let (q, k, v) = (&f32s(qs, "q")?[qo..], f32s(ks, "k")?, f32s(vs, "v")?);
        let (ks_, vs_) = (kl.stride(), vl.stride());
        let (ko, vo) = (kl.start_offset(), vl.start_offset());
        let mut out = vec![0f32; b * h * gt * d];
        let job = Job {
            q,
            k,
            v,
            ks: ks_,
            vs: vs_,
            ko,
            vo,
            h,
            gt,
            d,
            l,
            t: self.t,
            scale: self.scale,
            mask: self.mask.as_deref(),
            mask_heads,
            mass_lens: self.mass_lens.as_deref(),
        };
        let g = gt / self.t;
        let mut mass = vec![0f32; if self.mass_lens.is_some() { b * h * g * l } else { 0 }];
        let simd = crate::kernels::quant::level() != crate::kernels::quant::Level::Scalar;
        let run = |(bh, (o, m)): (usize, (&mut [f32], &mut [f32]))| {
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: `level()` found AVX2 and FMA on this CPU.
                unsafe { attend_avx2(&job, bh, o, m) };
                return;
            }
            let _ = simd;
            attend(&job, bh, o, m);
        };
        if self.mass_lens.is_some() {
            out.par_chunks_mut(gt * d).zip(mass.par_chunks_mut(g * l)).enumerate().for_each(run);
            if let Ok(mut m) = self.mass.lock() {
                *m = mass;
            }
        } else {
            out.par_chunks_mut(gt * d).enumerate().for_each(|(bh, o)| run((bh, (o, &mut []))));
        }
        Ok((CpuStorage::F32(out), Shape::from((b, h, gt, d))))
    }
}

/// Everything one (row, KV head) needs, shared by all tasks.
struct Job<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    ks: &'a [usize],
    vs: &'a [usize],
    ko: usize,
    vo: usize,
    h: usize,
    gt: usize,
    d: usize,
    l: usize,
    t: usize,
    scale: f32,
    mask: Option<&'a [f32]>,
    mask_heads: usize,
    mass_lens: Option<&'a [usize]>,
}

/// The same loop compiled with AVX2/FMA enabled (the baseline build is SSE2 only).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(j: &Job, bh: usize, o: &mut [f32], mass: &mut [f32]) {
    attend(j, bh, o, mass)
}

/// Attention of the `G*T` query rows of one (batch row, KV head) into `o`; with `mass_lens`,
/// the probabilities of each real query are also summed into `mass` `(G, L)`.
#[inline(always)]
fn attend(j: &Job, bh: usize, o: &mut [f32], mass: &mut [f32]) {
    let (bi, hi) = (bh / j.h, bh % j.h);
    let (d, l, t_) = (j.d, j.l, j.t);
    let kbase = j.ko + bi * j.ks[0] + hi * j.ks[1];
    let vbase = j.vo + bi * j.vs[0] + hi * j.vs[1];
    let mhead = if j.mask_heads > 1 { hi } else { 0 };
    let mut scores = vec![0f32; l];
    let mut acc = vec![0f64; d];
    for r in 0..j.gt {
        let qr = &j.q[(bh * j.gt + r) * d..(bh * j.gt + r + 1) * d];
        let t = r % t_;
        let mrow = j.mask.map(|m| {
            let at = ((bi * j.mask_heads + mhead) * t_ + t) * l;
            &m[at..at + l]
        });
        let mut max = f32::NEG_INFINITY;
        for (x, s) in scores.iter_mut().enumerate() {
            let kr = &j.k[kbase + x * j.ks[2]..kbase + x * j.ks[2] + d];
            *s = dot(qr, kr) * j.scale + mrow.map_or(0.0, |m| m[x]);
            max = max.max(*s);
        }
        // Sums in f64: the result then hardly depends on the order of the slots, so a cache that
        // keeps its entries in any order gives the logits of one that keeps them sorted.
        let mut sum = 0f64;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s as f64;
        }
        let inv = (1.0 / sum) as f32;
        if let Some(lens) = j.mass_lens {
            if t < lens[bi] {
                let mrow = &mut mass[(r / t_) * l..(r / t_ + 1) * l];
                for (m, s) in mrow.iter_mut().zip(&scores) {
                    *m += s * inv;
                }
            }
        }
        acc.fill(0.0);
        for (x, s) in scores.iter().enumerate() {
            if *s == 0.0 {
                continue; // masked
            }
            let p = (s * inv) as f64;
            let vr = &j.v[vbase + x * j.vs[2]..vbase + x * j.vs[2] + d];
            for (a, vv) in acc.iter_mut().zip(vr) {
                *a += p * *vv as f64;
            }
        }
        for (oo, a) in o[r * d..(r + 1) * d].iter_mut().zip(&acc) {
            *oo = *a as f32;
        }
    }
}

/// Dot product with 8 independent partial sums, so the compiler keeps SIMD lanes busy instead of
/// one serial chain of dependent adds.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Runs the fused kernel: `q (B, Hkv, G*T, D)`, `k/v (B, Hkv, L, D)`, mask `(B, 1, T, L)` or
/// `(B, Hkv, T, L)`. With `mass_lens` also returns the attention mass `(B, Hkv * G, L)` of each
/// row's first `mass_lens[b]` queries.
pub fn fused_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f32,
    t: usize,
    mass_lens: Option<&[usize]>,
) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    let mask = match mask {
        Some(m) => Some(m.flatten_all()?.to_vec1::<f32>()?),
        None => None,
    };
    let op = FusedAttention { scale, t, mask, mass_lens: mass_lens.map(<[usize]>::to_vec), mass: Mutex::new(vec![]) };
    let out = q.contiguous()?.apply_op3_no_bwd(k, v, &op)?;
    let mass = match mass_lens {
        Some(_) => {
            let (b, h, gt, _) = q.dims4()?;
            let l = k.dim(2)?;
            let m = op.mass.into_inner().map_err(|_| candle_core::Error::Msg("attention mass poisoned".into()))?;
            Some(Tensor::from_vec(m, (b, h * gt / t, l), q.device())?)
        }
        None => None,
    };
    Ok((out, mass))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// The plain composition: matmul, mask, softmax, matmul. Returns the output and the
    /// probabilities `(B, Hkv, G*T, L)`.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64, t: usize) -> (Tensor, Tensor) {
        let (b, h, gt, _) = q.dims4().unwrap();
        let l = k.dim(2).unwrap();
        let s = (q.matmul(&k.t().unwrap().contiguous().unwrap()).unwrap() * scale).unwrap();
        let s = match mask {
            Some(m) => s
                .reshape((b, h, gt / t, t, l))
                .unwrap()
                .broadcast_add(&m.unsqueeze(2).unwrap())
                .unwrap()
                .reshape((b, h, gt, l))
                .unwrap(),
            None => s,
        };
        let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
        (p.matmul(&v.contiguous().unwrap()).unwrap(), p)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn matches_plain_attention_on_strided_cache_with_mask() {
        let dev = Device::Cpu;
        let (b, h, g, t, d, cap, l) = (3, 2, 3, 2, 16, 20, 13);
        let q = Tensor::randn(0f32, 1.0, (b, h, g * t, d), &dev).unwrap();
        // A cache with spare capacity, narrowed to the used slots: strided like the real one.
        let kc = Tensor::randn(0f32, 1.0, (b, h, cap, d), &dev).unwrap();
        let vc = Tensor::randn(0f32, 1.0, (b, h, cap, d), &dev).unwrap();
        let (k, v) = (kc.narrow(2, 0, l).unwrap(), vc.narrow(2, 0, l).unwrap());
        let masked = |i: usize, m: usize| if (i * 7) % m == 0 { crate::kv::MASKED } else { 0.0 };
        let shared = Tensor::from_vec((0..b * t * l).map(|i| masked(i, 5)).collect(), (b, 1, t, l), &dev).unwrap();
        let per_head =
            Tensor::from_vec((0..b * h * t * l).map(|i| masked(i, 3)).collect(), (b, h, t, l), &dev).unwrap();
        let lens = [2, 1, 0];
        for mask in [None, Some(&shared), Some(&per_head)] {
            let (want, probs) = reference(&q, &k, &v, mask, 0.25, t);
            let (got, mass) = fused_attention(&q, &k, &v, mask, 0.25, t, Some(&lens)).unwrap();
            assert!(max_diff(&want, &got) < 1e-5);
            // Mass: probabilities of each row's real queries, summed per query head.
            let valid: Vec<f32> = (0..b * t).map(|i| if i % t < lens[i / t] { 1.0 } else { 0.0 }).collect();
            let valid = Tensor::from_vec(valid, (b, 1, 1, t, 1), &dev).unwrap();
            let want_mass = probs.reshape((b, h, g, t, l)).unwrap().broadcast_mul(&valid).unwrap().sum(3).unwrap();
            let want_mass = want_mass.reshape((b, h * g, l)).unwrap();
            assert!(max_diff(&want_mass, &mass.unwrap()) < 1e-5);
        }
    }
}
