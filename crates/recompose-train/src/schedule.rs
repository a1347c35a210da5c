//! Learning-rate schedules: a linear warmup, then constant, linear or cosine decay to
//! `min_ratio` of the peak at the last step.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    Constant,
    Linear,
    Cosine,
}

impl std::str::FromStr for Decay {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(Decay::Constant),
            "linear" => Ok(Decay::Linear),
            "cosine" => Ok(Decay::Cosine),
            o => Err(Error::Config(format!("unknown schedule '{o}' (constant, linear, cosine)"))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub peak: f64,
    /// Steps of linear warmup: step `s < warmup` uses `peak * (s + 1) / warmup`.
    pub warmup: usize,
    /// Steps in all (the decay ends at the last one).
    pub total: usize,
    pub decay: Decay,
    /// The learning rate at the end, as a fraction of the peak.
    pub min_ratio: f64,
}

impl Schedule {
    pub fn validate(&self) -> Result<()> {
        if !(self.peak.is_finite() && self.peak > 0.0) {
            return Err(Error::Config(format!("learning rate {} must be a positive number", self.peak)));
        }
        if self.total == 0 || self.warmup > self.total {
            return Err(Error::Config(format!(
                "{} warmup steps for {} steps (need at least one step, warmup <= steps)",
                self.warmup, self.total
            )));
        }
        if !(0.0..=1.0).contains(&self.min_ratio) {
            return Err(Error::Config(format!("final learning-rate ratio {} must be in [0, 1]", self.min_ratio)));
        }
        Ok(())
    }

    /// The learning rate of step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let span = (self.total - self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        let f = match self.decay {
            Decay::Constant => 1.0,
            Decay::Linear => 1.0 - progress,
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        };
        self.peak * (self.min_ratio + (1.0 - self.min_ratio) * f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        let s = Schedule { peak: 1.0, warmup: 4, total: 104, decay: Decay::Cosine, min_ratio: 0.0 };
        assert_eq!(s.lr(0), 0.25);
        assert_eq!(s.lr(3), 1.0);
        assert_eq!(s.lr(4), 1.0);
        assert!((s.lr(54) - 0.5).abs() < 1e-12);
        assert!(s.lr(103) < 0.001);
        let l = Schedule { decay: Decay::Linear, min_ratio: 0.1, ..s };
        assert!((l.lr(54) - 0.55).abs() < 1e-12);
        assert!((l.lr(104) - 0.1).abs() < 1e-12);
        let c = Schedule { decay: Decay::Constant, ..s };
        assert_eq!(c.lr(90), 1.0);
    }

    #[test]
    fn bad_settings_are_named() {
        let s = Schedule { peak: f64::NAN, warmup: 0, total: 10, decay: Decay::Cosine, min_ratio: 0.0 };
        assert!(s.validate().unwrap_err().to_string().contains("learning rate"));
        let s = Schedule { peak: 1e-3, warmup: 20, total: 10, ..s };
        assert!(s.validate().unwrap_err().to_string().contains("warmup"));
        assert!("exp".parse::<Decay>().unwrap_err().to_string().contains("unknown schedule"));
    }
}
