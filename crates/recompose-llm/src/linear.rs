//! Linear layers over two weight forms: dense (the exact reference path, trainable, and any GGML
//! type our kernels do not take) and packed 4/8-bit blocks (the fast path, `kernels::quant`),
//! optionally with a LoRA branch; plus the lossless rewrites that bring Q5_0 and Q4_K weights onto
//! the packed kernels. Input `(..., in)`, output `(..., out)`.

use crate::error::{Error, Result};
use crate::kernels::quant::{self, PackedWeight};
use crate::lora::LoraBranch;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use std::sync::Arc;

pub enum Weight {
    /// f32 (or f64 in tests); a candle `Var` when trainable.
    Dense(Tensor),
    Packed(Arc<PackedWeight>),
}

pub struct Linear {
    /// The HF tensor name of the weight, for errors.
    pub name: String,
    pub weight: Weight,
    pub lora: Option<LoraBranch>,
}

impl Linear {
    pub fn dense(name: impl Into<String>, w: Tensor) -> Self {
        Self { name: name.into(), weight: Weight::Dense(w), lora: None }
    }

    pub fn packed(name: impl Into<String>, w: Arc<PackedWeight>) -> Self {
        Self { name: name.into(), weight: Weight::Packed(w), lora: None }
    }

    /// (out, in).
    pub fn dims(&self) -> (usize, usize) {
        match &self.weight {
            Weight::Dense(w) => {
                let d = w.dims();
                (d[0], d.get(1).copied().unwrap_or(0))
            }
            Weight::Packed(p) => (p.rows(), p.cols()),
        }
    }

    /// The dense weight, if this layer has one.
    pub fn dense_weight(&self) -> Option<&Tensor> {
        match &self.weight {
            Weight::Dense(w) => Some(w),
            Weight::Packed(_) => None,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, None)
    }

    /// With `dropout_seed`, the LoRA branch drops its input (training).
    pub fn forward_t(&self, x: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        self.forward_prefix(x, None, None, dropout_seed)
    }

    /// The layer restricted to its first `rows` outputs and/or first `cols` inputs (elastic
    /// sub-networks: a prefix of heads or channels); `x` then has `cols` features.
    pub fn forward_prefix(
        &self,
        x: &Tensor,
        rows: Option<usize>,
        cols: Option<usize>,
        dropout_seed: Option<u64>,
    ) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (&k, lead) = dims.split_last().ok_or_else(|| candle_core::Error::Msg("linear on a scalar".into()))?;
        let n: usize = lead.iter().product();
        let x2 = x.reshape((n, k))?;
        let (out_full, in_full) = self.dims();
        let (out, inp) = (rows.unwrap_or(out_full), cols.unwrap_or(in_full));
        if k != inp || out > out_full || inp > in_full {
            return Err(Error::InvalidInput(format!(
                "{}: input of width {k} for a {out_full}x{in_full} weight used as {out}x{inp}",
                self.name
            )));
        }
        let mut y = match &self.weight {
            Weight::Dense(w) => {
                let w = if out < out_full { w.narrow(0, 0, out)? } else { w.clone() };
                let w = if inp < in_full { w.narrow(1, 0, inp)? } else { w };
                match &self.lora {
                    // Without dropout the branch fuses with the base matmul.
                    Some(l) if !l.drops(dropout_seed) => {
                        let (a, b) = l.prefix(out, inp)?;
                        let y = crate::grad::lora_linear(&x2, &w, &a, &b, l.scale)?;
                        let mut shape = lead.to_vec();
                        shape.push(out);
                        return Ok(y.reshape(shape)?);
                    }
                    _ => crate::grad::frozen_linear(&x2, &w)?,
                }
            }
            Weight::Packed(w) => {
                if x2.track_op() {
                    return Err(Error::NoGradient(format!(
                        "{} is a quantised weight: gradients need the f32 weights (load with WeightMode::F32)",
                        self.name
                    )));
                }
                // A prefix of a packed weight runs the whole weight: inputs padded with zeros,
                // outputs narrowed (exact; the saving needs tiles cut to the prefix).
                let xin = if inp < in_full { x2.pad_with_zeros(1, 0, in_full - inp)? } else { x2.clone() };
                let y = xin.contiguous()?.apply_op1_no_bwd(&PackedMatmul(w.clone()))?;
                if out < out_full {
                    y.narrow(1, 0, out)?
                } else {
                    y
                }
            }
        };
        if let Some(l) = &self.lora {
            y = (y + l.forward(&x2, out, inp, dropout_seed)?)?;
        }
        let mut shape = lead.to_vec();
        shape.push(out);
        Ok(y.reshape(shape)?)
    }
}

/// Several layers over one input `x`, each restricted to its first `rows` outputs: `parts` are
/// (layer, rows, dropout seed). While training they run as one matmul (weights concatenated, the
/// LoRA branches one low-rank product: A stacked, B block-diagonal), since Q, K and V (or gate and
/// up) share an input and one wide matmul is faster than three narrow ones. Packed weights in
/// inference quantise the input once and run as one parallel matmul group. Otherwise (LoRA
/// dropout this step, branches of different scales, dense inference) one by one.
pub fn forward_group<const N: usize>(parts: [(&Linear, usize, Option<u64>); N], x: &Tensor) -> Result<[Tensor; N]> {
    let fused = match packed_group(&parts, x)? {
        Some(ys) => Some(ys),
        None => fused(&parts, x)?,
    };
    let ys = match fused {
        Some(ys) => ys,
        None => parts
            .iter()
            .map(|(l, rows, seed)| l.forward_prefix(x, Some(*rows), None, *seed))
            .collect::<Result<Vec<_>>>()?,
    };
    ys.try_into().map_err(|_| Error::InvalidInput("linear group: wrong number of outputs".into()))
}

/// Packed weights without LoRA over one input, in inference: the input quantised once and the
/// weights' tiles in one parallel region (`quant::matmul_group`); None when that does not apply.
fn packed_group(parts: &[(&Linear, usize, Option<u64>)], x: &Tensor) -> Result<Option<Vec<Tensor>>> {
    let mut ws = vec![];
    for (l, rows, _) in parts {
        match &l.weight {
            Weight::Packed(w) if l.lora.is_none() && *rows <= w.rows() => ws.push(w.as_ref()),
            _ => return Ok(None),
        }
    }
    if x.track_op() || !x.device().is_cpu() || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let dims = x.dims().to_vec();
    let (&k, lead) = dims.split_last().ok_or_else(|| candle_core::Error::Msg("linear on a scalar".into()))?;
    if let Some(w) = ws.iter().find(|w| w.cols() != k) {
        return Err(Error::InvalidInput(format!("input of width {k} for a weight of {} columns", w.cols())));
    }
    let n: usize = lead.iter().product();
    // The input is read in place (no copy on the decode path).
    let x2 = x.reshape((n, k))?.contiguous()?;
    let acts = {
        let (storage, layout) = x2.storage_and_layout();
        let (candle_core::Storage::Cpu(CpuStorage::F32(data)), Some((a, b))) = (&*storage, layout.contiguous_offsets())
        else {
            return Ok(None);
        };
        quant::quantize_acts(&data[a..b], n, k)
    };
    let mut bufs: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; n * w.rows()]).collect();
    let mut outs: Vec<&mut [f32]> = bufs.iter_mut().map(Vec::as_mut_slice).collect();
    quant::matmul_group(&ws, &acts, &mut outs, quant::level());
    let mut ys = Vec::with_capacity(parts.len());
    for ((buf, w), (_, rows, _)) in bufs.into_iter().zip(&ws).zip(parts) {
        let y = Tensor::from_vec(buf, (n, w.rows()), x.device())?;
        let y = if *rows < w.rows() { y.narrow(1, 0, *rows)? } else { y };
        let mut shape = lead.to_vec();
        shape.push(*rows);
        ys.push(y.reshape(shape)?);
    }
    Ok(Some(ys))
}

fn fused(parts: &[(&Linear, usize, Option<u64>)], x: &Tensor) -> Result<Option<Vec<Tensor>>> {
    let mut ws = vec![];
    for (l, rows, seed) in parts {
        match &l.weight {
            Weight::Dense(w) if l.lora.as_ref().is_none_or(|b| !b.drops(*seed)) && *rows <= l.dims().0 => {
                ws.push(w.narrow(0, 0, *rows)?)
            }
            _ => return Ok(None),
        }
    }
    if !(x.track_op() || ws.iter().any(|w| w.track_op())) || !x.device().is_cpu() {
        return Ok(None);
    }
    let branches: Vec<&LoraBranch> = parts.iter().filter_map(|(l, _, _)| l.lora.as_ref()).collect();
    if branches.windows(2).any(|w| w[0].scale != w[1].scale) {
        return Ok(None);
    }
    let dims = x.dims().to_vec();
    let (&k, lead) = dims.split_last().ok_or_else(|| candle_core::Error::Msg("linear on a scalar".into()))?;
    let x2 = x.reshape((lead.iter().product::<usize>(), k))?;
    let w = Tensor::cat(&ws, 0)?;
    let y = match branches.first() {
        None => crate::grad::frozen_linear(&x2, &w)?,
        Some(first) => {
            let rank = branches.iter().map(|b| b.a.dim(0)).sum::<candle_core::Result<usize>>()?;
            let a = Tensor::cat(&branches.iter().map(|b| b.a.clone()).collect::<Vec<_>>(), 0)?;
            let mut blocks = vec![];
            let mut col = 0;
            for (l, rows, _) in parts {
                match &l.lora {
                    Some(b) => {
                        let r = b.b.dim(1)?;
                        blocks.push(b.b.narrow(0, 0, *rows)?.pad_with_zeros(1, col, rank - col - r)?);
                        col += r;
                    }
                    None => blocks.push(Tensor::zeros((*rows, rank), x.dtype(), x.device())?),
                }
            }
            crate::grad::lora_linear(&x2, &w, &a, &Tensor::cat(&blocks, 0)?, first.scale)?
        }
    };
    let mut out = vec![];
    let mut at = 0;
    for (_, rows, _) in parts {
        let mut shape = lead.to_vec();
        shape.push(*rows);
        out.push(y.narrow(1, at, *rows)?.reshape(shape)?);
        at += rows;
    }
    Ok(Some(out))
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

/// Rewrites GGML Q4_K super-blocks (256 values: f16 d and dmin, 6-bit scale/min per 32-value
/// sub-block, nibbles) as Q4_1 blocks (value = q * d + m per 32 values). The quants are kept
/// exactly; each sub-block's scale `d * sc` and offset `-dmin * m` are rounded to f16 (relative
/// change <= 2^-11, far below the 4-bit quantisation step).
pub fn q4_k_as_q4_1(bytes: &[u8]) -> Option<Vec<u8>> {
    if bytes.len() % 144 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 144 * 8 * 20);
    for b in bytes.chunks_exact(144) {
        let f = |o: usize| half::f16::from_bits(u16::from_le_bytes([b[o], b[o + 1]])).to_f32();
        let (d, dmin) = (f(0), f(2));
        let sc = &b[4..16];
        let qs = &b[16..144];
        let scale_min = |j: usize| -> (u8, u8) {
            if j < 4 {
                (sc[j] & 63, sc[j + 4] & 63)
            } else {
                ((sc[j + 4] & 0x0F) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4))
            }
        };
        for j in 0..8 {
            let (s, m) = scale_min(j);
            let q = &qs[32 * (j / 2)..32 * (j / 2) + 32];
            let nib = |i: usize| if j % 2 == 0 { q[i] & 0x0F } else { q[i] >> 4 };
            out.extend_from_slice(&half::f16::from_f32(d * s as f32).to_bits().to_le_bytes());
            out.extend_from_slice(&half::f16::from_f32(-dmin * m as f32).to_bits().to_le_bytes());
            for i in 0..16 {
                out.push(nib(i) | (nib(i + 16) << 4));
            }
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

    #[test]
    fn q4_k_rewrite_keeps_values() {
        let x: Vec<f32> = (0..1024).map(|i| ((i * 53 % 97) as f32 - 40.0) / 13.0).collect();
        let t = candle_core::Tensor::from_vec(x, (4, 256), &Device::Cpu).unwrap();
        let q4k = QTensor::quantize(&t, GgmlDType::Q4K).unwrap();
        let q41_bytes = q4_k_as_q4_1(&q4k.data().unwrap()).unwrap();
        let st = QStorage::from_data(std::borrow::Cow::Owned(q41_bytes), &Device::Cpu, GgmlDType::Q4_1).unwrap();
        let q41 = QTensor::new(st, (4, 256)).unwrap();
        let a: Vec<f32> = q4k.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = q41.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let max = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(max < 5e-3, "max diff {max}");
    }

    /// The fused group is an optimised path: it must equal the layers run one by one, values and
    /// gradients, with LoRA on some members and output prefixes.
    #[test]
    fn a_fused_group_equals_its_layers_one_by_one() {
        use candle_core::{DType, Var};
        let dev = Device::Cpu;
        let t = |seed: u64, shape: (usize, usize)| {
            let n = shape.0 * shape.1;
            let v: Vec<f64> =
                (0..n).map(|i| ((crate::lora::mix(seed * 1000 + i as u64) % 2000) as f64 - 1000.0) / 1000.0).collect();
            Tensor::from_vec(v, shape, &dev).unwrap()
        };
        let var = |seed: u64, shape: (usize, usize)| Var::from_tensor(&t(seed, shape)).unwrap().as_tensor().clone();
        let x = var(1, (5, 6));
        let branch = |s: u64, out: usize, r: usize| LoraBranch {
            a: var(s, (r, 6)),
            b: var(s + 1, (out, r)),
            scale: 0.5,
            dropout: 0.0,
        };
        // Frozen base weights, so the fused LoRA kernel runs (not its composition).
        let q = Linear { name: "q".into(), weight: Weight::Dense(t(2, (8, 6))), lora: Some(branch(10, 8, 2)) };
        let k = Linear::dense("k", t(3, (4, 6)));
        let v = Linear { name: "v".into(), weight: Weight::Dense(t(4, (4, 6))), lora: Some(branch(20, 4, 3)) };
        let run = |fuse: bool| {
            let parts = [(&q, 6, Some(7)), (&k, 4, Some(7)), (&v, 3, Some(7))];
            let ys: Vec<Tensor> = if fuse {
                fused(&parts, &x).unwrap().expect("fuses while training")
            } else {
                parts.iter().map(|(l, r, s)| l.forward_prefix(&x, Some(*r), None, *s).unwrap()).collect()
            };
            let loss = ys
                .iter()
                .enumerate()
                .map(|(i, y)| (y.sqr().unwrap().sum_all().unwrap() * (i + 1) as f64).unwrap())
                .reduce(|a, b| (a + b).unwrap())
                .unwrap();
            let g = loss.backward().unwrap();
            let qa = q.lora.as_ref().unwrap();
            let vb = v.lora.as_ref().unwrap();
            let grads = [&x, &qa.a, &qa.b, &vb.a, &vb.b]
                .map(|p| g.get(p).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap());
            (ys.iter().map(|y| y.flatten_all().unwrap().to_vec1::<f64>().unwrap()).collect::<Vec<_>>(), grads)
        };
        let ((ya, ga), (yb, gb)) = (run(true), run(false));
        let close = |a: &[f64], b: &[f64]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12);
        assert!(ya.iter().zip(&yb).all(|(a, b)| close(a, b)));
        assert!(ga.iter().zip(&gb).all(|(a, b)| close(a, b)));
        // Inference (nothing tracked) takes the layers one by one.
        let plain = Tensor::zeros((2, 6), DType::F64, &dev).unwrap();
        assert!(fused(&[(&k, 4, None)], &plain).unwrap().is_none());
    }
}
