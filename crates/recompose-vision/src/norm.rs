//! Training-mode batch norm as one fused CPU op with its closed-form backward. Built from candle
//! ops it spent most of a training step in reductions over the (N, H, W) axes.

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

pub const EPS: f64 = 1e-5;

/// `(x - mean) / sqrt(var + eps) * gamma + beta` with the batch's per-channel statistics.
pub fn batch_norm_train(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> candle_core::Result<Tensor> {
    x.apply_op3(gamma, beta, BatchNormTrain)
}

/// The same formula in plain candle ops (autograd through mean, variance and broadcasts): the
/// oracle the fused op is tested against and the baseline it is benchmarked against.
pub fn batch_norm_train_candle_ops(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> candle_core::Result<Tensor> {
    let c = x.dim(1)?;
    let centred = x.broadcast_sub(&x.mean_keepdim((0, 2, 3))?)?;
    let var = centred.sqr()?.mean_keepdim((0, 2, 3))?;
    centred
        .broadcast_div(&(var + EPS)?.sqrt()?)?
        .broadcast_mul(&gamma.reshape((1, c, 1, 1))?)?
        .broadcast_add(&beta.reshape((1, c, 1, 1))?)
}

/// Per-channel mean and biased variance of `x [N, C, H, W]` (f64 accumulation).
pub fn channel_stats(x: &Tensor) -> candle_core::Result<(Vec<f64>, Vec<f64>)> {
    let (n, c, h, w) = x.dims4()?;
    let v = x.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    Ok(stats(&v, n, c, h * w))
}

fn stats<T: WithDType>(x: &[T], n: usize, c: usize, hw: usize) -> (Vec<f64>, Vec<f64>) {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let (mut s, mut s2) = (0.0, 0.0);
            for i in 0..n {
                for v in &x[(i * c + ch) * hw..][..hw] {
                    let v = v.to_f64();
                    s += v;
                    s2 += v * v;
                }
            }
            let m = (n * hw) as f64;
            let mean = s / m;
            (mean, (s2 / m - mean * mean).max(0.0))
        })
        .unzip()
}

struct BatchNormTrain;

fn contiguous<'a, T: WithDType>(s: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    l.contiguous_offsets()
        .map(|(a, b)| &s[a..b])
        .ok_or_else(|| candle_core::Error::Msg("batch norm expects contiguous tensors".into()))
}

fn forward<T: WithDType>(x: &[T], g: &[T], b: &[T], dims: &[usize]) -> Vec<T> {
    let (n, c, hw) = (dims[0], dims[1], dims[2] * dims[3]);
    let (mean, var) = stats(x, n, c, hw);
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(hw).zip(x.par_chunks(hw)).enumerate().for_each(|(k, (yo, xi))| {
        let ch = k % c;
        let inv = 1.0 / (var[ch] + EPS).sqrt();
        let (scale, shift) = (g[ch].to_f64() * inv, b[ch].to_f64() - mean[ch] * g[ch].to_f64() * inv);
        for (o, v) in yo.iter_mut().zip(xi) {
            *o = T::from_f64(v.to_f64() * scale + shift);
        }
    });
    y
}

/// (dx, dgamma, dbeta) for upstream gradient `dy`.
fn backward<T: WithDType>(x: &[T], g: &[T], dy: &[T], dims: &[usize]) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (n, c, hw) = (dims[0], dims[1], dims[2] * dims[3]);
    let (mean, var) = stats(x, n, c, hw);
    let m = (n * hw) as f64;
    // Per channel: sum(dy) and sum(dy * xhat).
    let sums: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let inv = 1.0 / (var[ch] + EPS).sqrt();
            let (mut sd, mut sdx) = (0.0, 0.0);
            for i in 0..n {
                let o = (i * c + ch) * hw;
                for (d, v) in dy[o..o + hw].iter().zip(&x[o..o + hw]) {
                    let d = d.to_f64();
                    sd += d;
                    sdx += d * (v.to_f64() - mean[ch]) * inv;
                }
            }
            (sd, sdx)
        })
        .collect();
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(hw).enumerate().for_each(|(k, out)| {
        let ch = k % c;
        let inv = 1.0 / (var[ch] + EPS).sqrt();
        let (sd, sdx) = sums[ch];
        let gi = g[ch].to_f64() * inv;
        for (j, o) in out.iter_mut().enumerate() {
            let xhat = (x[k * hw + j].to_f64() - mean[ch]) * inv;
            *o = T::from_f64(gi * (dy[k * hw + j].to_f64() - sd / m - xhat * sdx / m));
        }
    });
    let dg = sums.iter().map(|s| T::from_f64(s.1)).collect();
    let db = sums.iter().map(|s| T::from_f64(s.0)).collect();
    (dx, dg, db)
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l1.dims();
        if dims.len() != 4 || l2.dims() != [dims[1]] || l3.dims() != [dims[1]] {
            return Err(candle_core::Error::Msg(format!(
                "batch norm of {dims:?} needs gamma/beta of [{}]",
                dims.get(1).copied().unwrap_or(0)
            )));
        }
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(g), CpuStorage::F32(b)) => {
                CpuStorage::F32(forward(contiguous(x, l1)?, contiguous(g, l2)?, contiguous(b, l3)?, dims))
            }
            (CpuStorage::F64(x), CpuStorage::F64(g), CpuStorage::F64(b)) => {
                CpuStorage::F64(forward(contiguous(x, l1)?, contiguous(g, l2)?, contiguous(b, l3)?, dims))
            }
            _ => {
                return Err(candle_core::Error::Msg(format!(
                    "batch norm supports f32/f64 of one dtype, got {:?}",
                    s1.dtype()
                )))
            }
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        g: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let flat = |t: &Tensor| t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>();
        let (dx, dg, db) = backward(&flat(x)?, &flat(g)?, &flat(dy)?, x.dims());
        let dt = x.dtype();
        let mk = |v: Vec<f64>, like: &Tensor| Tensor::from_vec(v, like.shape(), like.device())?.to_dtype(dt);
        Ok((Some(mk(dx, x)?), Some(mk(dg, g)?), Some(mk(db, b)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        crate::test_tensor(shape, seed, 2.0)
    }

    /// Oracle: the same formula in candle ops.
    #[test]
    fn fused_batch_norm_matches_candle_ops_forward_and_backward() {
        let x = Var::from_tensor(&rand(&[4, 3, 5, 6], 1)).unwrap();
        let g = Var::from_tensor(&rand(&[3], 2)).unwrap();
        let b = Var::from_tensor(&rand(&[3], 3)).unwrap();
        let mine = batch_norm_train(x.as_tensor(), g.as_tensor(), b.as_tensor()).unwrap();
        let reference = batch_norm_train_candle_ops(x.as_tensor(), g.as_tensor(), b.as_tensor()).unwrap();
        let max = |t: Tensor| t.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(max((&mine - &reference).unwrap()) < 1e-12);
        let proj = rand(mine.dims(), 4);
        let gm = (&mine * &proj).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (&reference * &proj).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &g, &b] {
            let d = max((gm.get(v.as_tensor()).unwrap() - gr.get(v.as_tensor()).unwrap()).unwrap());
            assert!(d < 1e-10, "{d}");
        }
    }
}
