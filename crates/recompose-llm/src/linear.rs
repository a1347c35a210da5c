//! Linear layers over the three weight forms: dense f32 (the exact reference path), our packed
//! 4/8-bit blocks (the fast path, `kernels::quant`), and any other GGML type through candle's
//! own quantised matmul. Input `(..., in)`, output `(..., out)`.

use crate::error::Result;
use crate::kernels::quant::{self, PackedWeight};
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Module, Shape, Tensor};
use std::sync::Arc;

pub enum Linear {
    Dense(Tensor),
    Packed(Arc<PackedWeight>),
    Candle(QMatMul),
}

impl Linear {
    pub fn from_qtensor(q: QTensor) -> Result<Self> {
        Ok(Linear::Candle(QMatMul::from_qtensor(q)?))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (&k, lead) = dims.split_last().ok_or_else(|| candle_core::Error::Msg("linear on a scalar".into()))?;
        let n: usize = lead.iter().product();
        let x2 = x.reshape((n, k))?;
        let y = match self {
            Linear::Dense(w) => x2.matmul(&w.t()?)?,
            Linear::Packed(w) => x2.contiguous()?.apply_op1_no_bwd(&PackedMatmul(w.clone()))?,
            Linear::Candle(q) => q.forward(&x2)?,
        };
        let out = y.dim(1)?;
        let mut shape = lead.to_vec();
        shape.push(out);
        Ok(y.reshape(shape)?)
    }

    pub fn out_features(&self) -> Result<usize> {
        Ok(match self {
            Linear::Dense(w) => w.dim(0)?,
            Linear::Packed(w) => w.rows(),
            Linear::Candle(QMatMul::QTensor(q)) => q.shape().dims()[0],
            Linear::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => t.dim(0)?,
        })
    }
}

/// `x (n, k) -> x W^T (n, rows)` through the packed kernels.
struct PackedMatmul(Arc<PackedWeight>);

impl CustomOp1 for PackedMatmul {
    fn name(&self) -> &'static str {
        "packed-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, k) = layout.shape().dims2()?;
        let w = &self.0;
        if k != w.cols() {
            candle_core::bail!("packed matmul: input width {k}, weight expects {}", w.cols());
        }
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("packed matmul expects f32 input");
        };
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("packed matmul expects a contiguous input");
        };
        let acts = quant::quantize_acts(&data[a..b], n, k);
        let mut out = vec![0f32; n * w.rows()];
        quant::matmul(w, &acts, &mut out, quant::level());
        Ok((CpuStorage::F32(out), Shape::from((n, w.rows()))))
    }
}
