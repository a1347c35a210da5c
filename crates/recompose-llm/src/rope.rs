//! Rotary position embeddings: frequency tables (with the scaling variants configs use) and the
//! rotation of a `(B, H, T, D)` tensor at per-row positions, in either pairing convention.

use crate::error::Result;
use candle_core::Tensor;
use recompose_core::config::{RopeScaling, RopeStyle};
use std::sync::RwLock;

pub struct Rope {
    inv_freq: Vec<f32>,
    style: RopeStyle,
    /// cos/sin tables `(positions, D/2)`, grown on demand (no fixed 4096 limit).
    table: RwLock<(usize, Vec<f32>, Vec<f32>)>,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64, scaling: &RopeScaling, style: RopeStyle) -> Self {
        let half = head_dim / 2;
        let inv_freq = (0..half)
            .map(|i| {
                let f = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
                match *scaling {
                    RopeScaling::None => f,
                    RopeScaling::Linear { factor } => f / factor,
                    RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } => {
                        let old = original_max_position as f64;
                        let low_wavelen = old / low_freq_factor;
                        let high_wavelen = old / high_freq_factor;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    }
                }
            })
            .map(|f| f as f32)
            .collect();
        Self { inv_freq, style, table: RwLock::new((0, vec![], vec![])) }
    }

    fn ensure(&self, n: usize) {
        if self.table.read().map(|t| t.0 >= n).unwrap_or(false) {
            return;
        }
        let Ok(mut t) = self.table.write() else { return };
        if t.0 >= n {
            return;
        }
        let n = n.next_power_of_two().max(256);
        let half = self.inv_freq.len();
        let (mut cos, mut sin) = (Vec::with_capacity(n * half), Vec::with_capacity(n * half));
        for p in 0..n {
            for &f in &self.inv_freq {
                // Angles in f32 as HF computes them (positions * inv_freq in float32).
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        *t = (n, cos, sin);
    }

    /// Rotates `x: (B, H, T, D)`; row b's column t sits at position `start[b] + t`.
    pub fn apply(&self, x: &Tensor, start: &[usize]) -> Result<Tensor> {
        let (b, _h, t, _d) = x.dims4()?;
        let positions: Vec<usize> = start.iter().take(b).flat_map(|&s| s..s + t).collect();
        self.apply_at(x, &positions)
    }

    /// Rotates `x: (B, H, T, D)` with row b's column t at `positions[b * T + t]`. Rotations
    /// compose, so rotating an already rotated key by `n` moves it `n` positions later.
    pub fn apply_at(&self, x: &Tensor, positions: &[usize]) -> Result<Tensor> {
        let (b, _h, t, _d) = x.dims4()?;
        if positions.len() != b * t {
            return Err(crate::Error::InvalidInput(format!("{} positions for {b} x {t} columns", positions.len())));
        }
        let half = self.inv_freq.len();
        self.ensure(positions.iter().max().map_or(1, |m| m + 1));
        let (cos, sin) = {
            let tab = self.table.read().map_err(|_| candle_core::Error::Msg("rope table poisoned".into()))?;
            let mut c = Vec::with_capacity(b * t * half);
            let mut s = Vec::with_capacity(b * t * half);
            for &p in positions {
                c.extend_from_slice(&tab.1[p * half..(p + 1) * half]);
                s.extend_from_slice(&tab.2[p * half..(p + 1) * half]);
            }
            (Tensor::from_vec(c, (b, t, half), x.device())?, Tensor::from_vec(s, (b, t, half), x.device())?)
        };
        Ok(crate::grad::rope(x, &cos, &sin, self.style == RopeStyle::Interleaved)?)
    }
}
