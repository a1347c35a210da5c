//! A CPU 2-D convolution with its own backward pass: per image, im2col and one matrix product
//! (gemm), images in parallel. candle's CPU conv backward runs a direct transposed convolution that
//! made a training step of these small CNNs ~5x slower. `tests` checks it against candle's conv2d.

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;
use recompose_llm::grad::matmul_strided;

/// `x [N, C, H, W]` convolved with `w [O, C, kh, kw]` (no bias), zero padding, equal strides.
pub fn conv2d(x: &Tensor, w: &Tensor, pad: usize, stride: usize) -> candle_core::Result<Tensor> {
    x.apply_op2(w, Im2colConv { pad, stride })
}

struct Im2colConv {
    pad: usize,
    stride: usize,
}

/// The geometry of one convolution.
#[derive(Clone, Copy)]
struct Geom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    ho: usize,
    wo: usize,
    pad: usize,
    stride: usize,
}

impl Geom {
    fn new(x: &[usize], w: &[usize], pad: usize, stride: usize) -> candle_core::Result<Self> {
        let bad = |m: String| candle_core::Error::Msg(m);
        let [n, c, h, wd] = <[usize; 4]>::try_from(x).map_err(|_| bad(format!("conv input {x:?} is not 4-D")))?;
        let [o, c2, kh, kw] = <[usize; 4]>::try_from(w).map_err(|_| bad(format!("conv kernel {w:?} is not 4-D")))?;
        if c != c2 || h + 2 * pad < kh || wd + 2 * pad < kw || stride == 0 {
            return Err(bad(format!("conv of {x:?} with kernel {w:?}, pad {pad}, stride {stride} is not defined")));
        }
        let (ho, wo) = ((h + 2 * pad - kh) / stride + 1, (wd + 2 * pad - kw) / stride + 1);
        Ok(Geom { n, c, h, w: wd, o, kh, kw, ho, wo, pad, stride })
    }
    fn ck(&self) -> usize {
        self.c * self.kh * self.kw
    }
    fn hw_out(&self) -> usize {
        self.ho * self.wo
    }
    fn img(&self) -> usize {
        self.c * self.h * self.w
    }

    /// Column matrix `[C*kh*kw, Ho*Wo]` of one image.
    fn im2col<T: WithDType>(&self, x: &[T], col: &mut [T]) {
        let hw = self.hw_out();
        for c in 0..self.c {
            for i in 0..self.kh {
                for j in 0..self.kw {
                    let row = &mut col[((c * self.kh + i) * self.kw + j) * hw..][..hw];
                    for oy in 0..self.ho {
                        let iy = (oy * self.stride + i) as isize - self.pad as isize;
                        let dst = &mut row[oy * self.wo..][..self.wo];
                        if iy < 0 || iy >= self.h as isize {
                            dst.fill(T::zero());
                            continue;
                        }
                        let src = &x[(c * self.h + iy as usize) * self.w..][..self.w];
                        for (ox, d) in dst.iter_mut().enumerate() {
                            let ix = (ox * self.stride + j) as isize - self.pad as isize;
                            *d = if ix < 0 || ix >= self.w as isize { T::zero() } else { src[ix as usize] };
                        }
                    }
                }
            }
        }
    }

    /// Adds a column-gradient matrix back onto one image's gradient (the adjoint of im2col).
    fn col2im<T: WithDType>(&self, col: &[T], gx: &mut [T]) {
        let hw = self.hw_out();
        for c in 0..self.c {
            for i in 0..self.kh {
                for j in 0..self.kw {
                    let row = &col[((c * self.kh + i) * self.kw + j) * hw..][..hw];
                    for oy in 0..self.ho {
                        let iy = (oy * self.stride + i) as isize - self.pad as isize;
                        if iy < 0 || iy >= self.h as isize {
                            continue;
                        }
                        let dst = &mut gx[(c * self.h + iy as usize) * self.w..][..self.w];
                        for ox in 0..self.wo {
                            let ix = (ox * self.stride + j) as isize - self.pad as isize;
                            if ix >= 0 && ix < self.w as isize {
                                dst[ix as usize] += row[oy * self.wo + ox];
                            }
                        }
                    }
                }
            }
        }
    }
}

fn forward<T: WithDType>(g: Geom, x: &[T], w: &[T]) -> Vec<T> {
    let (hw, ck) = (g.hw_out(), g.ck());
    let mut y = vec![T::zero(); g.n * g.o * hw];
    y.par_chunks_mut(g.o * hw).zip(x.par_chunks(g.img())).for_each_init(
        || vec![T::zero(); ck * hw],
        |col, (yn, xn)| {
            g.im2col(xn, col);
            matmul_strided(g.o, hw, ck, yn, false, w, (ck, 1), col, (hw, 1));
        },
    );
    y
}

/// Images per partial sum of the weight gradient: a constant, so the order of the sums (and the
/// result's bits) does not depend on how rayon split the batch.
const IMAGES_PER_PARTIAL: usize = 4;

/// (grad x, grad w) from grad y.
fn backward<T: WithDType>(g: Geom, x: &[T], w: &[T], gy: &[T], need_x: bool, need_w: bool) -> (Vec<T>, Vec<T>) {
    let (hw, ck) = (g.hw_out(), g.ck());
    let mut gx = vec![T::zero(); g.n * g.img()];
    let k = IMAGES_PER_PARTIAL;
    let partials: Vec<Vec<T>> = gx
        .par_chunks_mut(g.img() * k)
        .zip(x.par_chunks(g.img() * k))
        .zip(gy.par_chunks(g.o * hw * k))
        .map(|((gxs, xs), gys)| {
            let (mut gw, mut col, mut gcol) = (
                vec![T::zero(); if need_w { g.o * ck } else { 0 }],
                vec![T::zero(); ck * hw],
                vec![T::zero(); ck * hw],
            );
            for ((gxn, xn), gyn) in gxs.chunks_mut(g.img()).zip(xs.chunks(g.img())).zip(gys.chunks(g.o * hw)) {
                // gw += gy_n · colᵀ ; gcol = wᵀ · gy_n
                if need_w {
                    g.im2col(xn, &mut col);
                    matmul_strided(g.o, ck, hw, &mut gw, true, gyn, (hw, 1), &col, (1, hw));
                }
                if need_x {
                    matmul_strided(ck, hw, g.o, &mut gcol, false, w, (1, ck), gyn, (hw, 1));
                    g.col2im(&gcol, gxn);
                }
            }
            gw
        })
        .collect();
    let mut gw = vec![T::zero(); g.o * ck];
    if need_w {
        for p in partials {
            gw.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
    }
    (gx, gw)
}

fn contiguous<'a, T: WithDType>(s: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => Err(candle_core::Error::Msg("conv2d expects contiguous tensors".into())),
    }
}

impl CustomOp2 for Im2colConv {
    fn name(&self) -> &'static str {
        "im2col-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = Geom::new(l1.dims(), l2.dims(), self.pad, self.stride)?;
        let shape = Shape::from((g.n, g.o, g.ho, g.wo));
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => {
                CpuStorage::F32(forward(g, contiguous(x, l1)?, contiguous(w, l2)?))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w)) => {
                CpuStorage::F64(forward(g, contiguous(x, l1)?, contiguous(w, l2)?))
            }
            _ => {
                return Err(candle_core::Error::Msg(format!(
                    "conv2d supports f32/f64 inputs of one dtype, got {:?}",
                    s1.dtype()
                )))
            }
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        gy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = Geom::new(x.dims(), w.dims(), self.pad, self.stride)?;
        // Detached weights (attacks) or raw pixels (first layer) need no gradient; skip its gemm.
        if !w.track_op() && !x.track_op() {
            return Ok((None, None));
        }
        let (gx, gw) = match x.dtype() {
            DType::F32 => {
                let (gx, gw) =
                    backward(g, &flat::<f32>(x)?, &flat::<f32>(w)?, &flat::<f32>(gy)?, x.track_op(), w.track_op());
                (Tensor::from_vec(gx, x.shape(), x.device())?, Tensor::from_vec(gw, w.shape(), w.device())?)
            }
            DType::F64 => {
                let (gx, gw) =
                    backward(g, &flat::<f64>(x)?, &flat::<f64>(w)?, &flat::<f64>(gy)?, x.track_op(), w.track_op());
                (Tensor::from_vec(gx, x.shape(), x.device())?, Tensor::from_vec(gw, w.shape(), w.device())?)
            }
            d => return Err(candle_core::Error::Msg(format!("conv2d backward supports f32/f64, got {d:?}"))),
        };
        Ok((x.track_op().then_some(gx), w.track_op().then_some(gw)))
    }
}

fn flat<T: WithDType>(t: &Tensor) -> candle_core::Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        crate::test_tensor(shape, seed, 1.0)
    }

    /// The oracle is candle's own conv2d, forward and backward, for every pad/stride/kernel we use.
    #[test]
    fn im2col_conv_matches_candle_conv_forward_and_backward() {
        for (k, pad, stride, h) in [(3, 1, 1, 7), (3, 1, 2, 8), (3, 1, 2, 7), (1, 0, 2, 6), (1, 0, 1, 5), (3, 0, 1, 5)]
        {
            // Square inputs: candle's own conv backward assumes equal output padding on both axes.
            let x = Var::from_tensor(&rand(&[3, 4, h, h], 1)).unwrap();
            let w = Var::from_tensor(&rand(&[5, 4, k, k], 2)).unwrap();
            let mine = conv2d(x.as_tensor(), w.as_tensor(), pad, stride).unwrap();
            let theirs = x.as_tensor().conv2d(w.as_tensor(), pad, stride, 1, 1).unwrap();
            assert_eq!(mine.dims(), theirs.dims());
            let d = (&mine - &theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            assert!(d < 1e-12, "forward k{k} p{pad} s{stride}: {d}");
            // A fixed random projection of the output as the loss, so every output gets a gradient.
            let proj = rand(mine.dims(), 3);
            let gm = (&mine * &proj).unwrap().sum_all().unwrap().backward().unwrap();
            let gt = (&theirs * &proj).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &w] {
                let (a, b) = (gm.get(v.as_tensor()).unwrap(), gt.get(v.as_tensor()).unwrap());
                let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
                assert!(d < 1e-10, "backward k{k} p{pad} s{stride}: {d}");
            }
        }
    }
}
