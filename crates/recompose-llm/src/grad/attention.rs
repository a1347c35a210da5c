//! Causal self-attention with its backward pass, for the differentiable mode: queries attend to
//! the step's own keys at or before their position (within a sliding window when the layer has
//! one). Blocks of 64 queries are multiplied only against the keys they can see, so the masked
//! half of the score matrix is never computed; the softmax stays in per-task scratch, never in the
//! graph: the forward pass keeps each row's log-sum-exp and the backward pass recomputes the
//! probabilities block by block (as FlashAttention does). Work splits over (row, KV head), and a
//! KV head's query groups run in order in one task, so key and value gradients are summed in a
//! fixed order.

use super::{cpu_float, dot, matmul_strided as mm, max_of, slice, sum_of, vectorized, CResult, Data, Real};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, WithDType, D};
use rayon::prelude::*;
use std::sync::Mutex;

/// Queries per block.
const BQ: usize = 64;

/// `q (B, Hkv, G*T, D)` (a KV head's G query heads stacked, as the model folds them), `k`, `v`
/// `(B, Hkv, T, D)` -> `(B, Hkv, G*T, D)`: query `t` sees keys `j <= t` with `t - j < window`.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, window: Option<usize>) -> CResult<Tensor> {
    let track = q.track_op() || k.track_op() || v.track_op();
    if !cpu_float(q) || q.dtype() != k.dtype() || q.dtype() != v.dtype() {
        return causal_attention_composed(q, k, v, scale, window);
    }
    let op = CausalAttention { scale, window, lse: Mutex::new(None) };
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    if track {
        q.apply_op3_arc(&k, &v, std::sync::Arc::new(Box::new(op)))
    } else {
        q.apply_op3_no_bwd(&k, &v, &op)
    }
}

/// The same attention in candle ops: scores, additive causal mask, softmax, weighted values.
pub fn causal_attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    window: Option<usize>,
) -> CResult<Tensor> {
    let (b, h, gt, _) = q.dims4()?;
    let t = k.dim(2)?;
    let g = gt / t.max(1);
    let mut m = vec![0f32; t * t];
    for i in 0..t {
        for j in 0..t {
            if j > i || window.is_some_and(|w| i - j >= w) {
                m[i * t + j] = crate::kv::MASKED;
            }
        }
    }
    let mask = Tensor::from_vec(m, (1, 1, 1, t, t), q.device())?.to_dtype(q.dtype())?;
    let s = (q.matmul(&k.t()?)? * scale)?.reshape((b, h, g, t, t))?.broadcast_add(&mask)?.reshape((b, h, gt, t))?;
    candle_nn::ops::softmax(&s, D::Minus1)?.matmul(&v.contiguous()?)
}

struct CausalAttention {
    scale: f64,
    window: Option<usize>,
    /// Per query row: the log-sum-exp of its scaled scores, kept for the backward pass.
    lse: Mutex<Option<Vec<f64>>>,
}

#[derive(Clone, Copy)]
struct Geom {
    b: usize,
    h: usize,
    g: usize,
    t: usize,
    d: usize,
    window: Option<usize>,
}

impl Geom {
    /// Keys `[k0, q1)` a block of queries `[q0, q1)` may see.
    fn keys(&self, q0: usize) -> usize {
        self.window.map_or(0, |w| q0.saturating_sub(w - 1))
    }
    /// The first key query `t` sees.
    fn first(&self, t: usize) -> usize {
        self.window.map_or(0, |w| (t + 1).saturating_sub(w))
    }
}

fn geom(q: &[usize], k: &[usize], v: &[usize], window: Option<usize>) -> CResult<Geom> {
    let (&[b, h, gt, d], &[kb, kh, t, kd]) = (q, k) else {
        candle_core::bail!("causal attention: q {q:?} and k {k:?} must be 4-D")
    };
    if (kb, kh, kd) != (b, h, d) || v != k || t == 0 || gt % t != 0 || window == Some(0) {
        candle_core::bail!("causal attention: q {q:?}, k {k:?}, v {v:?}, window {window:?}");
    }
    Ok(Geom { b, h, g: gt / t, t, d, window })
}

/// Forward of one (row, KV head): writes `o (G*T, D)` and each query's log-sum-exp.
#[inline(always)]
fn forward_task<T: Real>(gm: &Geom, scale: T, q: &[T], k: &[T], v: &[T], o: &mut [T], lse: &mut [f64]) {
    let (t, d) = (gm.t, gm.d);
    let mut s = vec![T::from_f64(0.0); BQ * t];
    for gi in 0..gm.g {
        for q0 in (0..t).step_by(BQ) {
            let q1 = (q0 + BQ).min(t);
            let (bq, k0) = (q1 - q0, gm.keys(q0));
            let kl = q1 - k0;
            let qb = &q[(gi * t + q0) * d..];
            mm(bq, kl, d, &mut s, false, qb, (d, 1), &k[k0 * d..], (1, d));
            for i in 0..bq {
                let ti = q0 + i;
                let (lo, hi) = (gm.first(ti) - k0, ti - k0 + 1);
                let row = &mut s[i * kl..(i + 1) * kl];
                let live = &mut row[lo..hi];
                live.iter_mut().for_each(|x| *x *= scale);
                let max = max_of(live);
                live.iter_mut().for_each(|x| *x = (*x - max).expo());
                let sum = sum_of(live);
                let inv = T::from_f64(1.0 / sum);
                live.iter_mut().for_each(|x| *x *= inv);
                let (head, rest) = row.split_at_mut(lo);
                head.iter_mut().chain(&mut rest[hi - lo..]).for_each(|x| *x = T::from_f64(0.0));
                lse[gi * t + ti] = max.to_f64() + sum.ln();
            }
            mm(bq, d, kl, &mut o[(gi * t + q0) * d..], false, &s, (kl, 1), &v[k0 * d..], (d, 1));
        }
    }
}

/// Backward of one (row, KV head): dq `(G*T, D)`, dk and dv `(T, D)`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_task<T: Real>(
    gm: &Geom,
    scale: T,
    (q, k, v, o, dout): (&[T], &[T], &[T], &[T], &[T]),
    lse: &[f64],
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) {
    let (t, d) = (gm.t, gm.d);
    let zero = T::from_f64(0.0);
    let (mut p, mut dp) = (vec![zero; BQ * t], vec![zero; BQ * t]);
    for gi in 0..gm.g {
        for q0 in (0..t).step_by(BQ) {
            let q1 = (q0 + BQ).min(t);
            let (bq, k0) = (q1 - q0, gm.keys(q0));
            let kl = q1 - k0;
            let at = (gi * t + q0) * d;
            let (qb, ob, gb) = (&q[at..], &o[at..], &dout[at..]);
            mm(bq, kl, d, &mut p, false, qb, (d, 1), &k[k0 * d..], (1, d));
            mm(bq, kl, d, &mut dp, false, gb, (d, 1), &v[k0 * d..], (1, d));
            for i in 0..bq {
                let ti = q0 + i;
                let (lo, hi) = (gm.first(ti) - k0, ti - k0 + 1);
                let l = T::from_f64(lse[gi * t + ti]);
                // D = rowsum(dO * O) = rowsum(dP * P).
                let dsum = T::from_f64(dot(&gb[i * d..(i + 1) * d], &ob[i * d..(i + 1) * d]));
                let (pr, dr) = (&mut p[i * kl..(i + 1) * kl], &mut dp[i * kl..(i + 1) * kl]);
                for j in 0..kl {
                    if j < lo || j >= hi {
                        pr[j] = zero;
                        dr[j] = zero;
                        continue;
                    }
                    let pj = (pr[j] * scale - l).expo();
                    pr[j] = pj;
                    dr[j] = pj * (dr[j] - dsum) * scale; // dS, with the score scale folded in
                }
            }
            // dV += P^T dO ; dQ = dS K ; dK += dS^T Q
            mm(kl, d, bq, &mut dv[k0 * d..], true, &p, (1, kl), gb, (d, 1));
            mm(bq, d, kl, &mut dq[at..], false, &dp, (kl, 1), &k[k0 * d..], (d, 1));
            mm(kl, d, bq, &mut dk[k0 * d..], true, &dp, (1, kl), qb, (d, 1));
        }
    }
}

impl CausalAttention {
    fn forward<T: Real>(&self, gm: Geom, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
        let (gt, td) = (gm.g * gm.t, gm.t * gm.d);
        let mut o = vec![T::from_f64(0.0); gm.b * gm.h * gt * gm.d];
        let mut lse = vec![0f64; gm.b * gm.h * gt];
        let scale = T::from_f64(self.scale);
        o.par_chunks_mut(gt * gm.d).zip(lse.par_chunks_mut(gt)).enumerate().for_each(|(bh, (o, l))| {
            vectorized(|| forward_task(&gm, scale, &q[bh * gt * gm.d..], &k[bh * td..], &v[bh * td..], o, l))
        });
        if let Ok(mut slot) = self.lse.lock() {
            *slot = Some(lse);
        }
        o
    }

    fn backward<T: Real>(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        dout: &Tensor,
    ) -> CResult<(Tensor, Tensor, Tensor)> {
        let gm = geom(q.dims(), k.dims(), v.dims(), self.window)?;
        let lse = self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention statistics poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("causal attention: backward ran twice".into()))?;
        let doutc = dout.contiguous()?;
        let (qd, kd, vd, od, gd) =
            (Data::<T>::of(q)?, Data::<T>::of(k)?, Data::<T>::of(v)?, Data::<T>::of(o)?, Data::<T>::of(&doutc)?);
        let (qv, kv, vv, ov, gv) = (qd.get()?, kd.get()?, vd.get()?, od.get()?, gd.get()?);
        let (gt, td) = (gm.g * gm.t, gm.t * gm.d);
        let zero = T::from_f64(0.0);
        let mut dq = vec![zero; qv.len()];
        let mut dk = vec![zero; kv.len()];
        let mut dv = vec![zero; vv.len()];
        let scale = T::from_f64(self.scale);
        dq.par_chunks_mut(gt * gm.d).zip(dk.par_chunks_mut(td).zip(dv.par_chunks_mut(td))).enumerate().for_each(
            |(bh, (dq, (dk, dv)))| {
                let (qo, ko) = (bh * gt * gm.d, bh * td);
                let inputs = (&qv[qo..], &kv[ko..], &vv[ko..], &ov[qo..], &gv[qo..]);
                vectorized(|| backward_task(&gm, scale, inputs, &lse[bh * gt..], dq, dk, dv))
            },
        );
        let dev = q.device();
        Ok((
            Tensor::from_vec(dq, q.shape(), dev)?,
            Tensor::from_vec(dk, k.shape(), dev)?,
            Tensor::from_vec(dv, v.shape(), dev)?,
        ))
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
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
        let gm = geom(l1.dims(), l2.dims(), l3.dims(), self.window)?;
        let out = float_dispatch!("causal attention", s1, |T| {
            let (q, k, v) =
                (slice::<T>(s1, l1, "attention")?, slice::<T>(s2, l2, "attention")?, slice::<T>(s3, l3, "attention")?);
            T::to_cpu_storage_owned(self.forward(gm, q, k, v))
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        dout: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => self.backward::<f32>(q, k, v, o, dout)?,
            DType::F64 => self.backward::<f64>(q, k, v, o, dout)?,
            d => candle_core::bail!("causal attention backward: {d:?}"),
        };
        Ok((q.track_op().then_some(dq), k.track_op().then_some(dk), v.track_op().then_some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn fast_exp_is_accurate() {
        for i in -8000..8000 {
            let x = i as f32 * 0.01;
            let (a, b) = (x.expo(), x.exp());
            assert!((a - b).abs() <= 3e-7 * b, "exp({x}): {a} vs {b}");
        }
        // A NaN stays NaN, so a diverged step reaches the loss check.
        assert!(f32::NAN.expo().is_nan());
        assert_eq!(f32::NEG_INFINITY.expo(), (-87f32).expo());
    }

    #[test]
    fn matches_the_composition_with_gqa_windows_and_several_blocks() {
        // T = 150 spans three query blocks; G = 3 query heads per KV head.
        for (window, dtype, tol) in
            [(None, DType::F64, 1e-12), (Some(70), DType::F64, 1e-12), (Some(5), DType::F32, 2e-5)]
        {
            let (b, h, g, t, d) = (2, 2, 3, 150, 8);
            let q = rand(&[b, h, g * t, d], 1, dtype);
            let k = rand(&[b, h, t, d], 2, dtype);
            let v = rand(&[b, h, t, d], 3, dtype);
            check_against_composed(
                &[q, k, v],
                |x| causal_attention(&x[0], &x[1], &x[2], 0.7, window).unwrap(),
                |x| causal_attention_composed(&x[0], &x[1], &x[2], 0.7, window).unwrap(),
                tol,
            );
        }
    }

    #[test]
    fn finite_differences() {
        let (q, k, v) = (
            rand(&[1, 2, 2 * 9, 4], 4, DType::F64),
            rand(&[1, 2, 9, 4], 5, DType::F64),
            rand(&[1, 2, 9, 4], 6, DType::F64),
        );
        check_finite_differences(&[q, k, v], |x| causal_attention(&x[0], &x[1], &x[2], 0.5, Some(4)).unwrap());
    }
}
