//! The LM head and cross-entropy fused: logits are computed a chunk of rows at a time and each
//! chunk's gradient is taken while its logits are at hand, so the `N x vocab` matrix never
//! exists whole (32 MB at a time instead of 400 MB for a batch of 2048 tokens).

use super::{cpu_float, max_of, sum_of, values, vectorized, CResult, Real};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;
use std::sync::Mutex;

/// Target id that takes no loss (padding, prompt tokens of a chat row).
pub const IGNORE: u32 = u32::MAX;

/// `scale * sum_i NLL(softmax(x_i W^T), targets_i)` over rows whose target is not [`IGNORE`],
/// as a scalar, without ever holding all `N x vocab` logits: rows go through in chunks, and each
/// chunk's gradient is computed while its logits are at hand (the loss is the graph's end, so the
/// upstream gradient is a scalar that only scales them). `w (vocab, hidden)` may be frozen or
/// trainable (tied embeddings).
pub fn linear_cross_entropy(x: &Tensor, w: &Tensor, targets: &[u32], scale: f64) -> CResult<Tensor> {
    let (n, _) = x.dims2()?;
    let v = w.dim(0)?;
    if targets.len() != n {
        candle_core::bail!("cross-entropy: {} targets for {n} rows", targets.len());
    }
    if let Some(bad) = targets.iter().find(|&&t| t != IGNORE && t as usize >= v) {
        candle_core::bail!("cross-entropy: target {bad} outside the vocabulary of {v}");
    }
    let op = LinearCe {
        x: x.detach(),
        w: w.detach(),
        targets: targets.to_vec(),
        scale,
        need_x: x.track_op(),
        need_w: w.track_op(),
        grads: Mutex::new(None),
    };
    x.apply_op2_arc(w, std::sync::Arc::new(Box::new(op)))
}

/// The same loss in candle ops: logits, log-softmax, gather (the oracle).
pub fn linear_cross_entropy_composed(x: &Tensor, w: &Tensor, targets: &[u32], scale: f64) -> CResult<Tensor> {
    cross_entropy(&x.matmul(&w.t()?)?, targets, scale)
}

/// `scale * sum NLL` of `logits (N, vocab)` against targets, in candle ops.
pub fn cross_entropy(logits: &Tensor, targets: &[u32], scale: f64) -> CResult<Tensor> {
    let x = logits;
    let lp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let keep: Vec<u32> = (0..targets.len() as u32).filter(|&i| targets[i as usize] != IGNORE).collect();
    if keep.is_empty() {
        return Tensor::zeros((), x.dtype(), x.device());
    }
    let rows = Tensor::new(keep.as_slice(), x.device())?;
    let ids: Vec<u32> = keep.iter().map(|&i| targets[i as usize]).collect();
    let ids = Tensor::new(ids.as_slice(), x.device())?.unsqueeze(1)?;
    let picked = lp.index_select(&rows, 0)?.gather(&ids, 1)?;
    picked.sum_all()?.neg()? * scale
}

struct LinearCe {
    x: Tensor,
    w: Tensor,
    targets: Vec<u32>,
    scale: f64,
    need_x: bool,
    need_w: bool,
    /// (dx, dw) for an upstream gradient of 1, filled by the forward pass.
    grads: Mutex<Option<(Option<Tensor>, Option<Tensor>)>>,
}

/// Rows per chunk of logits: about 32 MB of f32 logits at a 49k vocabulary.
fn ce_chunk(vocab: usize) -> usize {
    ((8 << 20) / vocab.max(1)).clamp(16, 1024)
}

impl LinearCe {
    /// Loss (already scaled) and the gradients for an upstream gradient of 1.
    fn run(&self) -> CResult<(f64, Option<Tensor>, Option<Tensor>)> {
        let (n, h) = self.x.dims2()?;
        let v = self.w.dim(0)?;
        let dev = self.x.device().clone();
        let dtype = self.x.dtype();
        let chunk = ce_chunk(v);
        let mut loss = 0f64;
        let mut dxs = vec![];
        let mut dw: Option<Tensor> = None;
        let wt = self.w.t()?;
        for start in (0..n).step_by(chunk) {
            let rows = chunk.min(n - start);
            let xc = self.x.narrow(0, start, rows)?;
            let tgt = &self.targets[start..start + rows];
            if tgt.iter().all(|&t| t == IGNORE) {
                if self.need_x {
                    dxs.push(Tensor::zeros((rows, h), dtype, &dev)?);
                }
                continue;
            }
            let logits = xc.matmul(&wt)?;
            let (l, dlogits) = ce_rows(&logits, tgt, self.scale)?;
            loss += l;
            if self.need_x {
                dxs.push(dlogits.matmul(&self.w)?);
            }
            if self.need_w {
                let g = dlogits.t()?.matmul(&xc)?;
                dw = Some(match dw {
                    Some(acc) => (acc + g)?,
                    None => g,
                });
            }
        }
        let dx = if self.need_x { Some(Tensor::cat(&dxs, 0)?) } else { None };
        let dw = match (self.need_w, dw) {
            (true, None) => Some(self.w.zeros_like()?),
            (_, d) => d,
        };
        Ok((loss, dx, dw))
    }
}

/// For one chunk of logits: the scaled NLL sum and scale * (softmax - onehot) on kept rows.
fn ce_rows(logits: &Tensor, targets: &[u32], scale: f64) -> CResult<(f64, Tensor)> {
    let (rows, v) = logits.dims2()?;
    if !cpu_float(logits) {
        // Other devices: the same arithmetic in candle ops.
        let lse = logits.max_keepdim(1)?;
        let z = logits.broadcast_sub(&lse)?;
        let sum = z.exp()?.sum_keepdim(1)?;
        let lsm = z.broadcast_sub(&sum.log()?)?;
        let keep: Vec<f32> = targets.iter().map(|&t| if t == IGNORE { 0.0 } else { 1.0 }).collect();
        let keep = Tensor::from_vec(keep, (rows, 1), logits.device())?.to_dtype(logits.dtype())?;
        let ids: Vec<u32> = targets.iter().map(|&t| if t == IGNORE { 0 } else { t }).collect();
        let ids = Tensor::from_vec(ids, (rows, 1), logits.device())?;
        let onehot = Tensor::zeros((rows, v), logits.dtype(), logits.device())?.scatter_add(
            &ids,
            &Tensor::ones((rows, 1), logits.dtype(), logits.device())?,
            1,
        )?;
        let nll = (lsm.gather(&ids, 1)?.neg()? * &keep)?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let d = ((lsm.exp()? - onehot)?.broadcast_mul(&keep)? * scale)?;
        return Ok((nll * scale, d));
    }
    Ok(match logits.dtype() {
        DType::F32 => ce_rows_cpu::<f32>(logits, targets, scale, v)?,
        DType::F64 => ce_rows_cpu::<f64>(logits, targets, scale, v)?,
        d => candle_core::bail!("cross-entropy: {d:?}"),
    })
}

fn ce_rows_cpu<T: Real>(logits: &Tensor, targets: &[u32], scale: f64, v: usize) -> CResult<(f64, Tensor)> {
    let z = values::<T>(logits)?;
    let mut d = vec![T::from_f64(0.0); z.len()];
    let s = T::from_f64(scale);
    let nll: Vec<f64> = d
        .par_chunks_mut(v)
        .zip(z.par_chunks(v))
        .zip(targets.par_iter())
        .map(|((o, zr), &t)| {
            if t == IGNORE {
                return 0.0;
            }
            vectorized(|| {
                let max = max_of(zr);
                for (o, &a) in o.iter_mut().zip(zr) {
                    *o = (a - max).expo();
                }
                let sum = sum_of(o);
                let k = T::from_f64(scale / sum);
                o.iter_mut().for_each(|x| *x *= k);
                o[t as usize] -= s;
                max.to_f64() + sum.ln() - zr[t as usize].to_f64()
            })
        })
        .collect();
    Ok((nll.iter().sum::<f64>() * scale, Tensor::from_vec(d, (logits.dim(0)?, v), logits.device())?))
}

impl CustomOp2 for LinearCe {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (loss, dx, dw) = self.run()?;
        if let Ok(mut g) = self.grads.lock() {
            *g = Some((dx, dw));
        }
        let out = match s1 {
            CpuStorage::F64(_) => CpuStorage::F64(vec![loss]),
            _ => CpuStorage::F32(vec![loss as f32]),
        };
        Ok((out, Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (loss, dx, dw) = self.run()?;
        if let Ok(mut g) = self.grads.lock() {
            *g = Some((dx, dw));
        }
        let t = Tensor::new(loss, self.x.device())?.to_dtype(s1.dtype())?;
        let (st, _) = t.storage_and_layout();
        let candle_core::Storage::Cuda(c) = &*st else { candle_core::bail!("cross-entropy: loss is not on the GPU") };
        Ok((c.try_clone(t.layout())?, Shape::from(())))
    }

    fn bwd(&self, _x: &Tensor, _w: &Tensor, _res: &Tensor, g: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = self
            .grads
            .lock()
            .map_err(|_| candle_core::Error::Msg("cross-entropy gradients poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("cross-entropy: backward ran twice".into()))?;
        let scale = |t: Option<Tensor>| -> CResult<Option<Tensor>> {
            match t {
                Some(t) => Ok(Some(t.broadcast_mul(&g.to_dtype(t.dtype())?)?)),
                None => Ok(None),
            }
        };
        Ok((scale(dx)?, scale(dw)?))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn fused_cross_entropy_matches_composition_with_ignored_rows_and_chunks() {
        // 40 rows over a vocabulary large enough that the rows go through in several chunks.
        let (n, h, v) = (40, 6, 600_000);
        assert!(ce_chunk(v) < n);
        let x = rand(&[n, h], 12, DType::F64);
        let w = (rand(&[v, h], 13, DType::F64) * 0.5).unwrap();
        let targets: Vec<u32> =
            (0..n as u32).map(|i| if i % 7 == 3 { IGNORE } else { (i * 7919) % v as u32 }).collect();
        let (t1, t2) = (targets.clone(), targets.clone());
        check_against_composed(
            &[x, w],
            |t| linear_cross_entropy(&t[0], &t[1], &t1, 0.1).unwrap(),
            |t| linear_cross_entropy_composed(&t[0], &t[1], &t2, 0.1).unwrap(),
            1e-10,
        );
    }

    #[test]
    fn fused_cross_entropy_finite_differences() {
        let x = rand(&[5, 4], 14, DType::F64);
        let w = rand(&[9, 4], 15, DType::F64);
        let targets = vec![1, IGNORE, 8, 0, 3];
        check_finite_differences(&[x, w], |t| linear_cross_entropy(&t[0], &t[1], &targets, 0.5).unwrap());
    }
}
