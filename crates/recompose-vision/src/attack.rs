//! L-infinity attacks (FGSM, PGD-k with random start), always against the model in eval mode with
//! no parameter gradients tracked, in pixel space: results stay in the epsilon ball and in [0, 1].

use crate::model::{Exec, Model};
use crate::nn::{cross_entropy, kl_div, log_softmax, Ctx};
use crate::{Error, Result};
use candle_core::{Tensor, Var};

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Attack {
    pub eps: f64,
    pub step: f64,
    pub steps: usize,
    pub random_start: bool,
}

impl Attack {
    pub fn fgsm(eps: f64) -> Self {
        Attack { eps, step: eps, steps: 1, random_start: false }
    }
    pub fn pgd(eps: f64, step: f64, steps: usize) -> Self {
        Attack { eps, step, steps, random_start: true }
    }

    /// Parses `fgsm`, `pgdK` (e.g. `pgd10`) or `none`, with the given epsilon and PGD step size.
    pub fn parse(name: &str, eps: f64, step: f64) -> Result<Option<Self>> {
        if !(eps >= 0.0 && eps <= 1.0) || !(step > 0.0 && step <= 1.0) {
            return Err(Error::Config(format!(
                "epsilon {eps} and step {step} must lie in [0, 1] (pixels are in [0, 1])"
            )));
        }
        match name {
            "none" | "clean" => Ok(None),
            "fgsm" => Ok(Some(Attack::fgsm(eps))),
            _ => match name.strip_prefix("pgd").and_then(|k| k.parse::<usize>().ok()).filter(|k| *k > 0) {
                Some(k) => Ok(Some(Attack::pgd(eps, step, k))),
                None => Err(Error::Config(format!("unknown attack '{name}' (known: none, fgsm, pgdK such as pgd10)"))),
            },
        }
    }
}

/// The loss an attack ascends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Objective {
    /// Cross-entropy against the labels (FGSM, PGD-AT, evaluation).
    CrossEntropy,
    /// KL(f(x) || f(x')) against the clean prediction (TRADES, AdvMoE).
    Kl,
}

/// Adversarial examples for `x` (`[N, C, H, W]` in [0, 1]) with labels `y`.
pub fn perturb(model: &Model, x: &Tensor, y: &Tensor, a: &Attack, obj: Objective, rng_seed: u64) -> Result<Tensor> {
    let ctx = Ctx::eval();
    let clean_logp = match obj {
        Objective::Kl => Some(log_softmax(&model.forward(x, &ctx, Exec::Masked)?.logits)?.detach()),
        Objective::CrossEntropy => None,
    };
    let lo = (x - a.eps)?.clamp(0f32, 1f32)?.to_dtype(x.dtype())?;
    let hi = (x + a.eps)?.clamp(0f32, 1f32)?.to_dtype(x.dtype())?;
    let mut adv = x.clone();
    if a.random_start && a.eps > 0.0 {
        let noise = match obj {
            // TRADES starts from a tiny Gaussian step, PGD from a uniform point of the ball.
            Objective::Kl => seeded_normal(x, 0.001, rng_seed)?,
            Objective::CrossEntropy => seeded_uniform(x, a.eps, rng_seed)?,
        };
        adv = (adv + noise)?.maximum(&lo)?.minimum(&hi)?;
    }
    for _ in 0..a.steps {
        let v = Var::from_tensor(&adv)?;
        let logits = model.forward(v.as_tensor(), &ctx, Exec::Masked)?.logits;
        let loss = match &clean_logp {
            Some(c) => kl_div(c, &log_softmax(&logits)?)?,
            None => cross_entropy(&logits, y)?,
        };
        let grads = loss.backward()?;
        let g = grads.get(v.as_tensor()).ok_or_else(|| Error::Diverged("the attack found no input gradient".into()))?;
        adv = (adv + (g.sign()? * a.step)?)?.maximum(&lo)?.minimum(&hi)?.detach();
    }
    Ok(adv)
}

fn seeded_uniform(like: &Tensor, eps: f64, seed: u64) -> Result<Tensor> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..like.elem_count()).map(|_| rng.random_range(-eps as f32..=eps as f32)).collect();
    Ok(Tensor::from_vec(v, like.dims(), like.device())?.to_dtype(like.dtype())?)
}

fn seeded_normal(like: &Tensor, std: f64, seed: u64) -> Result<Tensor> {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..like.elem_count()).map(|_| (std * crate::corrupt::normal(&mut rng)) as f32).collect();
    Ok(Tensor::from_vec(v, like.dims(), like.device())?.to_dtype(like.dtype())?)
}
