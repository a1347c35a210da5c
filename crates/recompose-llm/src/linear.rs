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

/// Rewrites GGML Q5_0 blocks (f16 d, 32 high bits, 16 bytes of low nibbles; value = (q - 16) d)
/// as Q8_0 blocks (f16 d, 32 signed bytes) holding the same values exactly, so Q5_0 weights run
/// on the 8-bit kernels. Returns None when the size is not whole blocks.
pub fn q5_0_as_q8_0(bytes: &[u8]) -> Option<Vec<u8>> {
    if bytes.len() % 22 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 22 * 34);
    for b in bytes.chunks_exact(22) {
        out.extend_from_slice(&b[0..2]);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let qs = &b[6..22];
        for j in 0..32 {
            let nib = if j < 16 { qs[j] & 0x0F } else { qs[j - 16] >> 4 };
            let hi = ((qh >> j) & 1) as u8;
            out.push(((nib | (hi << 4)) as i8 - 16) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QStorage, QTensor};
    use candle_core::Device;

    #[test]
    fn q5_0_rewrite_is_exact() {
        let x: Vec<f32> = (0..256).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        let t = candle_core::Tensor::from_vec(x, (4, 64), &Device::Cpu).unwrap();
        let q5 = QTensor::quantize(&t, GgmlDType::Q5_0).unwrap();
        let bytes = q5.data().unwrap().to_vec();
        let q8_bytes = q5_0_as_q8_0(&bytes).unwrap();
        let st = QStorage::from_data(std::borrow::Cow::Owned(q8_bytes), &Device::Cpu, GgmlDType::Q8_0).unwrap();
        let q8 = QTensor::new(st, (4, 64)).unwrap();
        let a: Vec<f32> = q5.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = q8.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b);
    }
}
