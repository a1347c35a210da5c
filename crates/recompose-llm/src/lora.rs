//! LoRA as PEFT defines it: beside a linear layer `W`, a branch `scale * B (A dropout(x))` with
//! `A (r, in)`, `B (out, r)` and `scale = alpha / r` (or `alpha / sqrt(r)` with rsLoRA). This
//! file owns the branch, which modules may take one, PEFT's initialisation and seeded dropout
//! masks; the model attaches branches (`Model::add_lora`), recompose-train reads and writes the
//! PEFT files.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

/// A module that can carry a LoRA branch, by its HF / PEFT name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [Target::Q, Target::K, Target::V, Target::O, Target::Gate, Target::Up, Target::Down];

    /// PEFT's `target_modules` name.
    pub fn module(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// The module path inside a decoder block (`self_attn.q_proj`, `mlp.up_proj`, ...).
    pub fn path(self) -> &'static str {
        match self {
            Target::Q => "self_attn.q_proj",
            Target::K => "self_attn.k_proj",
            Target::V => "self_attn.v_proj",
            Target::O => "self_attn.o_proj",
            Target::Gate => "mlp.gate_proj",
            Target::Up => "mlp.up_proj",
            Target::Down => "mlp.down_proj",
        }
    }

    /// `q`, `q_proj`, `gate`, `gate_proj`, ...
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        Target::ALL
            .into_iter()
            .find(|t| t.module() == s || t.module().strip_suffix("_proj") == Some(s))
            .ok_or_else(|| Error::InvalidInput(format!("unknown LoRA target '{s}' (q, k, v, o, gate, up, down)")))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Probability of dropping an input feature of the branch while training.
    pub dropout: f64,
    pub targets: Vec<Target>,
    /// rsLoRA: scale `alpha / sqrt(r)`.
    pub rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self { rank: 8, alpha: 16.0, dropout: 0.0, targets: vec![Target::Q, Target::V], rslora: false }
    }
}

impl LoraConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidInput(m));
        if self.rank == 0 || self.rank > 4096 {
            return bad(format!("LoRA rank {} must be between 1 and 4096", self.rank));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return bad(format!("LoRA alpha {} must be a positive number", self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("LoRA dropout {} must be in [0, 1)", self.dropout));
        }
        if self.targets.is_empty() {
            return bad("LoRA needs at least one target module".into());
        }
        Ok(())
    }

    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// The branch of one linear layer.
pub struct LoraBranch {
    /// `(r, in)`; a `Var` while training.
    pub a: Tensor,
    /// `(out, r)`.
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f64,
}

impl LoraBranch {
    /// `scale * B (A dropout(x))` for `x (N, inp)`, restricted to the first `out` outputs and
    /// `inp` inputs (elastic prefixes).
    pub fn forward(&self, x: &Tensor, out: usize, inp: usize, dropout_seed: Option<u64>) -> Result<Tensor> {
        let (a, b) = self.prefix(out, inp)?;
        let x = match dropout_seed {
            Some(seed) if self.dropout > 0.0 => {
                let (n, k) = x.dims2()?;
                (x * dropout_mask(n, k, self.dropout, seed, x.dtype(), x.device())?)?
            }
            _ => x.clone(),
        };
        let h = (x.matmul(&a.t()?)? * self.scale)?;
        Ok(h.matmul(&b.t()?)?)
    }

    /// `A` and `B` cut to the first `out` outputs and `inp` inputs.
    pub fn prefix(&self, out: usize, inp: usize) -> Result<(Tensor, Tensor)> {
        let a = if inp < self.a.dim(1)? { self.a.narrow(1, 0, inp)? } else { self.a.clone() };
        let b = if out < self.b.dim(0)? { self.b.narrow(0, 0, out)? } else { self.b.clone() };
        Ok((a, b))
    }

    /// Whether a forward pass with this seed drops features.
    pub fn drops(&self, dropout_seed: Option<u64>) -> bool {
        dropout_seed.is_some() && self.dropout > 0.0
    }
}

/// splitmix64: a counter-based generator, so a mask element depends only on (seed, index) and
/// masks are the same however the work is split.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The `i`-th uniform in `[0, 1)` of stream `seed` (53 bits of [`mix`]).
pub fn uniform(seed: u64, i: u64) -> f64 {
    (mix(seed ^ mix(i)) >> 11) as f64 / (1u64 << 53) as f64
}

/// The `i`-th standard normal of stream `seed` (Box-Muller over two hashed uniforms, each half
/// a step off zero so the logarithm is finite).
pub fn normal(seed: u64, i: u64) -> f64 {
    let u = |j: u64| ((mix(seed ^ mix(j)) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    (-2.0 * u(2 * i).ln()).sqrt() * (2.0 * std::f64::consts::PI * u(2 * i + 1)).cos()
}

/// An inverted-dropout mask `(n, k)`: 0 with probability `p`, else `1 / (1 - p)`.
pub fn dropout_mask(n: usize, k: usize, p: f64, seed: u64, dtype: DType, device: &Device) -> Result<Tensor> {
    let keep = 1.0 / (1.0 - p);
    let threshold = (p * (1u64 << 53) as f64) as u64;
    let mut m = vec![0f32; n * k];
    m.par_chunks_mut(4096).enumerate().for_each(|(c, out)| {
        for (i, v) in out.iter_mut().enumerate() {
            let r = mix(seed ^ mix((c * 4096 + i) as u64)) >> 11;
            *v = if r >= threshold { keep as f32 } else { 0.0 };
        }
    });
    Ok(Tensor::from_vec(m, (n, k), device)?.to_dtype(dtype)?)
}

/// PEFT's default initialisation: `A ~ U(-1/sqrt(in), 1/sqrt(in))` (kaiming-uniform with
/// a = sqrt(5)), `B = 0`, so a fresh adapter leaves the model unchanged.
pub fn init_a(rank: usize, inp: usize, seed: u64) -> Vec<f32> {
    let bound = 1.0 / (inp as f64).sqrt();
    (0..rank * inp).map(|i| ((2.0 * uniform(seed, i as u64) - 1.0) * bound) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_short_and_peft_names() {
        assert_eq!(Target::parse("q").unwrap(), Target::Q);
        assert_eq!(Target::parse("down_proj").unwrap(), Target::Down);
        let e = Target::parse("lm_head").unwrap_err().to_string();
        assert!(e.contains("unknown LoRA target 'lm_head'"), "{e}");
    }

    #[test]
    fn dropout_mask_keeps_about_one_minus_p_and_rescales() {
        let m = dropout_mask(100, 100, 0.25, 7, DType::F32, &Device::Cpu).unwrap();
        let v: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
        let kept = v.iter().filter(|x| **x > 0.0).count() as f64 / v.len() as f64;
        assert!((kept - 0.75).abs() < 0.02, "{kept}");
        assert!(v.iter().all(|x| *x == 0.0 || (*x - 1.0 / 0.75).abs() < 1e-6));
        let again = dropout_mask(100, 100, 0.25, 7, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(v, again.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }

    #[test]
    fn config_rejects_bad_values() {
        let c = LoraConfig { rank: 0, ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("rank 0"));
        let c = LoraConfig { dropout: 1.0, ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("dropout"));
        assert_eq!(LoraConfig { rank: 16, alpha: 32.0, ..Default::default() }.scale(), 2.0);
    }
}
