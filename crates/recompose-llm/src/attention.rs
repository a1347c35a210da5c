//! Fused CPU attention over a cache view: scores, mask, softmax and the weighted sum of values
//! without materialising the `(B, H, T, L)` score matrix, reading the cache's keys and values in
//! place through their strides. Two kernels, both split across threads beyond (row, KV head):
//!
//! - `split` (decode, and by default blocks up to `SPLIT_MAX_T` columns): the keys are cut
//!   into fixed chunks (flash-decoding); every chunk's scores are computed in parallel, then the
//!   exponentials and weighted values, with the denominators and value sums in f64, combined in
//!   chunk order. A slot's probability does not depend on where it sits, so caches holding the
//!   same entries in another order give the same result to the last bit or so (bounded caches
//!   are tested against a sorted oracle).
//! - `tiled` (prefill: in serving every prompt piece, whatever its length): query tiles x key
//!   tiles with an online softmax (FlashAttention), f32, tiles the mask hides entirely skipped;
//!   the attention mass, when asked, comes from a second pass that recomputes the scores
//!   against each row's log-sum-exp.
//!
//! The chunk and tile sizes are fixed and aligned to slot 0, so results depend neither on the
//! thread count nor, for one query, on the other queries of its call. The plain candle
//! composition (matmul, mask, softmax, matmul) is the oracle both are tested against.
//! Owns no cache and no masking policy: masks come from the `KvView`.

mod lanes;
mod simd;
mod split;
#[cfg(test)]
mod tests;
mod tiled;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor};
use std::sync::Mutex;

/// Query columns up to which the split (decode) kernel runs by default; longer blocks run tiled.
pub const SPLIT_MAX_T: usize = 16;

/// Which kernel attends. Each gives a query the same result however many other queries share
/// its call (its keys being the same), but the two differ from each other in the last bits: a
/// prompt must go through one of them whatever pieces it is cut into, or its KV (and so a
/// prefix cache's) would depend on the cutting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Split,
    Tiled,
}

impl Kernel {
    /// The faster kernel for a block of `t` query columns.
    pub fn for_columns(t: usize) -> Self {
        if t <= SPLIT_MAX_T {
            Kernel::Split
        } else {
            Kernel::Tiled
        }
    }
}

/// `q (B, Hkv, G*T, D)` contiguous, `k, v (B, Hkv, L, D)` any strides with a unit last stride,
/// `mask` additive `(B, 1, T, L)` or per KV head `(B, Hkv, T, L)` -> `(B, Hkv, G*T, D)`.
pub struct FusedAttention {
    pub scale: f32,
    pub t: usize,
    pub kernel: Kernel,
    pub mask: Option<Tensor>,
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

/// Everything a task needs, shared by all tasks: the inputs in place and the geometry.
pub(crate) struct Job<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    /// Strides of the batch, head and slot axes of `k` and `v`, and their start offsets.
    pub ks: [usize; 3],
    pub vs: [usize; 3],
    pub ko: usize,
    pub vo: usize,
    pub b: usize,
    pub h: usize,
    /// Query rows per (row, KV head): the group's heads stacked, `g * t`.
    pub gt: usize,
    pub g: usize,
    pub t: usize,
    pub d: usize,
    pub l: usize,
    pub scale: f32,
    /// Contiguous `(B, mask_heads, T, L)`.
    pub mask: Option<&'a [f32]>,
    pub mask_heads: usize,
    pub mass_lens: Option<&'a [usize]>,
}

impl Job<'_> {
    #[inline(always)]
    pub fn krow(&self, bi: usize, hi: usize, x: usize) -> &[f32] {
        let at = self.ko + bi * self.ks[0] + hi * self.ks[1] + x * self.ks[2];
        &self.k[at..at + self.d]
    }

    #[inline(always)]
    pub fn vrow(&self, bi: usize, hi: usize, x: usize) -> &[f32] {
        let at = self.vo + bi * self.vs[0] + hi * self.vs[1] + x * self.vs[2];
        &self.v[at..at + self.d]
    }

    /// Query row `r` (of `gt`) of (row, KV head) `bh`.
    #[inline(always)]
    pub fn qrow(&self, bh: usize, r: usize) -> &[f32] {
        let at = (bh * self.gt + r) * self.d;
        &self.q[at..at + self.d]
    }

    /// The mask over all `L` slots for query column `t` of row `bi`, KV head `hi`.
    #[inline(always)]
    pub fn mask_row(&self, bi: usize, hi: usize, t: usize) -> Option<&[f32]> {
        let mh = if self.mask_heads > 1 { hi } else { 0 };
        self.mask.map(|m| {
            let at = ((bi * self.mask_heads + mh) * self.t + t) * self.l;
            &m[at..at + self.l]
        })
    }

    /// Whether query column `t` of row `bi` counts towards the attention mass.
    #[inline(always)]
    pub fn real(&self, bi: usize, t: usize) -> bool {
        self.mass_lens.is_some_and(|lens| t < lens[bi])
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
        if self.t == 0 || gt % self.t != 0 {
            candle_core::bail!("fused attention: {gt} query rows are not a multiple of {} columns", self.t);
        }
        let Some((qo, _)) = ql.contiguous_offsets() else {
            candle_core::bail!("fused attention: q must be contiguous")
        };
        if kl.stride()[3] != 1 || vl.stride()[3] != 1 {
            candle_core::bail!("fused attention: k and v need a unit last stride");
        }
        if self.mass_lens.as_ref().is_some_and(|m| m.len() != b) {
            candle_core::bail!("fused attention: query lengths for {b} rows needed");
        }
        // The mask is read in place (one (T, L) mask serves every layer of a step).
        let mask_t = match &self.mask {
            Some(m) if m.dtype() == candle_core::DType::F32 => Some(m.contiguous()?),
            Some(m) => Some(m.to_dtype(candle_core::DType::F32)?.contiguous()?),
            None => None,
        };
        let guard = mask_t.as_ref().map(|m| m.storage_and_layout());
        let (mask, mask_heads) = match &guard {
            Some((storage, layout)) => {
                let Storage::Cpu(s) = &**storage else {
                    candle_core::bail!("fused attention: mask must be on the CPU")
                };
                let Some((o0, o1)) = layout.contiguous_offsets() else { candle_core::bail!("mask not contiguous") };
                let m = &f32s(s, "mask")?[o0..o1];
                let heads = if m.len() == b * h * self.t * l {
                    h
                } else if m.len() == b * self.t * l {
                    1
                } else {
                    candle_core::bail!("fused attention: mask has {} values, expected {}", m.len(), b * self.t * l);
                };
                (Some(m), heads)
            }
            None => (None, 1),
        };
        let (k, v) = (f32s(ks, "k")?, f32s(vs, "v")?);
        let (kst, vst) = (kl.stride(), vl.stride());
        let job = Job {
            q: &f32s(qs, "q")?[qo..qo + b * h * gt * d],
            k,
            v,
            ks: [kst[0], kst[1], kst[2]],
            vs: [vst[0], vst[1], vst[2]],
            ko: kl.start_offset(),
            vo: vl.start_offset(),
            b,
            h,
            gt,
            g: gt / self.t,
            t: self.t,
            d,
            l,
            scale: self.scale,
            mask,
            mask_heads,
            mass_lens: self.mass_lens.as_deref(),
        };
        let mut out = vec![0f32; b * h * gt * d];
        let mut mass = vec![0f32; if self.mass_lens.is_some() { b * h * job.g * l } else { 0 }];
        let mass_out = self.mass_lens.is_some().then_some(mass.as_mut_slice());
        if l > 0 {
            match self.kernel {
                Kernel::Split => split::run(&job, &mut out, mass_out),
                Kernel::Tiled => tiled::run(&job, &mut out, mass_out),
            }
        }
        if self.mass_lens.is_some() {
            if let Ok(mut m) = self.mass.lock() {
                *m = mass;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, h, gt, d))))
    }
}

/// Splits `buf` into consecutive pieces of the given lengths.
fn pieces<T>(mut buf: &mut [T], lens: impl Iterator<Item = usize>) -> Vec<&mut [T]> {
    lens.map(|n| {
        let (a, b) = std::mem::take(&mut buf).split_at_mut(n);
        buf = b;
        a
    })
    .collect()
}

/// Runs a fused kernel: `q (B, Hkv, G*T, D)`, `k/v (B, Hkv, L, D)`, mask `(B, 1, T, L)` or
/// `(B, Hkv, T, L)`. With `mass_lens` also returns the attention mass `(B, Hkv * G, L)` of each
/// row's first `mass_lens[b]` queries.
#[allow(clippy::too_many_arguments)]
pub fn fused_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f32,
    t: usize,
    kernel: Kernel,
    mass_lens: Option<&[usize]>,
) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    let op = FusedAttention {
        scale,
        t,
        kernel,
        mask: mask.cloned(),
        mass_lens: mass_lens.map(<[usize]>::to_vec),
        mass: Mutex::new(vec![]),
    };
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
