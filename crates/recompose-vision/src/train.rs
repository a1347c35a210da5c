//! Training loops: standard, PGD adversarial training, TRADES and AdvMoE, with SGD (momentum,
//! weight decay, cosine learning rate), divergence and routing-collapse checks, per-epoch logs and
//! resumable optimiser state.

use crate::attack::{perturb, Attack, Objective};
use crate::data::Dataset;
use crate::model::{Exec, Model};
use crate::nn::{cross_entropy, kl_div, log_softmax, Ctx, Group, Track};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use recompose_train::{Decay, Optimizer, OptimizerKind, Schedule};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Cross-entropy on clean images.
    Standard,
    /// Cross-entropy on PGD examples (Madry et al.); an MoE's router and experts train jointly.
    PgdAt,
    /// CE(clean) + beta KL(f(x) || f(x')) with x' maximising the KL (Zhang et al.).
    Trades,
    /// Per batch: TRADES on the experts with the routers fixed, then TRADES plus a routing KL on the
    /// routers with the experts fixed, each on freshly generated examples.
    Advmoe,
}

impl std::str::FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "standard" => Ok(Method::Standard),
            "pgd-at" | "at" => Ok(Method::PgdAt),
            "trades" => Ok(Method::Trades),
            "advmoe" => Ok(Method::Advmoe),
            _ => Err(Error::Config(format!("unknown training method '{s}' (known: standard, pgd-at, trades, advmoe)"))),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub method: Method,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// TRADES / AdvMoE robustness weight.
    pub beta: f64,
    /// The attack used to make training examples.
    pub train_attack: Attack,
    /// The attack of the per-epoch held-out check.
    pub eval_attack: Attack,
    pub seed: u64,
    /// Use only this many training images (stratified), for quick runs.
    pub limit: Option<usize>,
    /// Weight of the load-balancing loss on MoE routers (Switch-Transformer style).
    pub balance: f64,
}

impl TrainConfig {
    pub fn validate(&self, model: &Model) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if !(self.balance >= 0.0 && self.balance.is_finite()) {
            return bad(format!("balance weight {} must be >= 0", self.balance));
        }
        if self.epochs == 0 || self.batch_size < 2 {
            return bad("epochs must be >= 1 and batch size >= 2 (batch norm needs two images)".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite())
            || !(0.0..1.0).contains(&self.momentum)
            || self.weight_decay < 0.0
            || self.beta < 0.0
        {
            return bad(format!(
                "bad optimiser settings: lr {} momentum {} weight decay {} beta {}",
                self.lr, self.momentum, self.weight_decay, self.beta
            ));
        }
        if self.method == Method::Advmoe && !model.config.is_moe() {
            return bad("advmoe trains routers and experts alternately: it needs an MoE model (--experts >= 2)".into());
        }
        Ok(())
    }
}

/// The optimiser (SGD with momentum, recompose-train's) and the epochs completed.
pub struct OptState {
    pub opt: Optimizer,
    /// Epochs already completed.
    pub epoch: usize,
}

impl OptState {
    pub fn new(model: &Model, cfg: &TrainConfig) -> Result<Self> {
        let kind = OptimizerKind::Sgd { momentum: cfg.momentum, weight_decay: cfg.weight_decay };
        Ok(OptState { opt: Optimizer::new(kind, &model.params).map_err(train_err)?, epoch: 0 })
    }
}

/// recompose-train's errors in this crate's terms.
pub fn train_err(e: recompose_train::Error) -> Error {
    match e {
        recompose_train::Error::Diverged(m) => Error::Diverged(m.replace("lower the learning rate", "lower --lr")),
        recompose_train::Error::Candle(e) => Error::Candle(e),
        other => Error::Checkpoint(other.to_string()),
    }
}

/// One epoch's summary line.
#[derive(Clone, Debug, Serialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub loss: f64,
    pub train_acc: f64,
    pub clean_acc: f64,
    pub robust_acc: f64,
    pub seconds: f64,
    /// Per MoE unit: mean routing entropy (nats) and the share of images per expert.
    pub entropy: Vec<f64>,
    pub load: Vec<Vec<f64>>,
}

impl std::fmt::Display for EpochLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "epoch {:>3}  loss {:.4}  train-acc {:.2}%  held-out clean {:.2}%  robust {:.2}%  {:.0}s",
            self.epoch,
            self.loss,
            100.0 * self.train_acc,
            100.0 * self.clean_acc,
            100.0 * self.robust_acc,
            self.seconds
        )?;
        if !self.entropy.is_empty() {
            let ent: Vec<String> = self.entropy.iter().map(|e| format!("{e:.2}")).collect();
            let load: Vec<String> = self
                .load
                .iter()
                .map(|l| l.iter().map(|s| format!("{:.0}", 100.0 * s)).collect::<Vec<_>>().join("/"))
                .collect();
            write!(f, "  routing entropy [{}] load% [{}]", ent.join(" "), load.join(" "))?;
        }
        Ok(())
    }
}

/// Per-epoch routing statistics.
struct Routing {
    counts: Vec<Vec<u64>>,
    entropy: Vec<f64>,
    batches: usize,
}

impl Routing {
    fn new() -> Self {
        Routing { counts: vec![], entropy: vec![], batches: 0 }
    }
    fn add(&mut self, routes: &[Tensor]) -> Result<()> {
        if self.counts.is_empty() {
            self.counts = routes.iter().map(|r| vec![0; r.dims()[1]]).collect();
            self.entropy = vec![0.0; routes.len()];
        }
        for (l, r) in routes.iter().enumerate() {
            let p: Vec<Vec<f32>> = r.detach().to_dtype(candle_core::DType::F32)?.to_vec2()?;
            let mut h = 0.0;
            for row in &p {
                if row.iter().any(|v| !v.is_finite()) {
                    return Err(Error::Diverged(format!(
                        "router of MoE unit {l} produced a non-finite probability; lower --lr"
                    )));
                }
                let (k, _) = row.iter().enumerate().fold((0, f32::MIN), |a, (i, &v)| if v > a.1 { (i, v) } else { a });
                self.counts[l][k] += 1;
                h -= row.iter().filter(|v| **v > 0.0).map(|v| (*v as f64) * (*v as f64).ln()).sum::<f64>();
            }
            self.entropy[l] += h / p.len().max(1) as f64;
        }
        self.batches += 1;
        Ok(())
    }
    fn finish(&self, epoch: usize) -> Result<(Vec<f64>, Vec<Vec<f64>>)> {
        let b = self.batches.max(1) as f64;
        let entropy = self.entropy.iter().map(|e| e / b).collect();
        let mut load = vec![];
        for (l, c) in self.counts.iter().enumerate() {
            let total: u64 = c.iter().sum();
            if let Some(k) = c.iter().position(|&n| n == total) {
                return Err(Error::Diverged(format!(
                    "routing collapsed: the router of MoE unit {l} sent every image of epoch {epoch} to expert {k}; \
                     lower --lr or raise --balance"
                )));
            }
            load.push(c.iter().map(|&n| n as f64 / total.max(1) as f64).collect());
        }
        Ok((entropy, load))
    }
}

/// Accuracy of a model on a data set, clean and (optionally) under an attack.
#[derive(Clone, Debug, Serialize)]
pub struct EvalResult {
    pub images: usize,
    pub clean_acc: f64,
    pub robust_acc: Option<f64>,
}

/// Clean predictions run expert-grouped (real inference); attacks run the masked path (same
/// function, differentiable).
pub fn evaluate(
    model: &Model,
    ds: &Dataset,
    attack: Option<&Attack>,
    batch: usize,
    mut progress: impl FnMut(usize),
) -> Result<EvalResult> {
    let (mut clean, mut robust) = (0usize, 0usize);
    let idx: Vec<usize> = (0..ds.len()).collect();
    for (b, chunk) in idx.chunks(batch.max(1)).enumerate() {
        let (x, y) = to_tensors(ds, chunk)?;
        clean += correct(model, &x, &y)?;
        if let Some(a) = attack {
            let adv = perturb(model, &x, &y, a, Objective::CrossEntropy, 0x5eed ^ b as u64)?;
            robust += correct(model, &adv, &y)?;
        }
        progress(chunk.len());
    }
    let n = ds.len().max(1) as f64;
    Ok(EvalResult { images: ds.len(), clean_acc: clean as f64 / n, robust_acc: attack.map(|_| robust as f64 / n) })
}

fn correct(model: &Model, x: &Tensor, y: &Tensor) -> Result<usize> {
    let exec = if model.config.is_moe() { Exec::Grouped } else { Exec::Masked };
    let pred = model.forward(x, &Ctx::eval(), exec)?.logits.argmax(1)?;
    Ok(pred.eq(y)?.to_dtype(candle_core::DType::F32)?.sum_all()?.to_scalar::<f32>()? as usize)
}

pub fn to_tensors(ds: &Dataset, idx: &[usize]) -> Result<(Tensor, Tensor)> {
    let (px, labels) = ds.batch(idx);
    tensors_from(ds, px, labels, idx.len())
}

fn tensors_from(ds: &Dataset, px: Vec<f32>, labels: Vec<u32>, n: usize) -> Result<(Tensor, Tensor)> {
    let x = Tensor::from_vec(px, (n, ds.channels, ds.height, ds.width), &Device::Cpu)?;
    let y = Tensor::from_vec(labels, n, &Device::Cpu)?;
    Ok((x, y))
}

/// Re-estimates batch-norm statistics from `batches` training batches (after a weight patch).
pub fn recalibrate_bn(model: &Model, ds: &Dataset, batches: usize, batch: usize, seed: u64) -> Result<()> {
    let mut order: Vec<usize> = (0..ds.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    let ctx = Ctx { train: true, track: Track::None };
    for chunk in order.chunks(batch.max(2)).take(batches) {
        let (x, _) = to_tensors(ds, chunk)?;
        model.forward(&x, &ctx, Exec::Masked)?;
    }
    Ok(())
}

/// Callbacks of a training run: per batch (images done in the epoch) and per epoch (after the
/// log is computed, to save a checkpoint).
pub trait Observer {
    fn batch(&mut self, _images: usize) {}
    fn epoch(&mut self, log: &EpochLog, model: &Model, state: &OptState) -> Result<()>;
}

/// Trains from `state.epoch` to `cfg.epochs`. `held` is a fixed held-out batch for the log line.
pub fn train(
    model: &Model,
    state: &mut OptState,
    data: &Dataset,
    held: &Dataset,
    cfg: &TrainConfig,
    obs: &mut dyn Observer,
) -> Result<()> {
    cfg.validate(model)?;
    let steps_per_epoch = data.len().div_ceil(cfg.batch_size);
    let schedule =
        Schedule { peak: cfg.lr, warmup: 0, total: steps_per_epoch * cfg.epochs, decay: Decay::Cosine, min_ratio: 0.0 };
    while state.epoch < cfg.epochs {
        let epoch = state.epoch;
        let start = std::time::Instant::now();
        let mut rng = StdRng::seed_from_u64(cfg.seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64));
        let mut order: Vec<usize> = (0..data.len()).collect();
        order.shuffle(&mut rng);
        let (mut loss_sum, mut seen, mut hits) = (0.0, 0usize, 0usize);
        let mut routing = Routing::new();
        // Full batches only: a last batch of one image would break batch norm.
        for (b, chunk) in order.chunks_exact(cfg.batch_size).enumerate() {
            let step = epoch * steps_per_epoch + b;
            let lr = schedule.lr(step);
            let (mut px, labels) = data.batch(chunk);
            data.augment(&mut px, chunk.len(), &mut rng);
            let (x, y) = tensors_from(data, px, labels, chunk.len())?;
            let batch_seed = cfg.seed ^ (step as u64).wrapping_mul(0x9e37_79b9);
            let (loss, logits, routes) = step_once(model, state, &x, &y, cfg, lr, batch_seed)?;
            if !loss.is_finite() {
                return Err(Error::Diverged(format!(
                    "the loss became {loss} at epoch {} batch {b}; lower --lr",
                    epoch + 1
                )));
            }
            routing.add(&routes)?;
            loss_sum += loss * chunk.len() as f64;
            seen += chunk.len();
            hits +=
                logits.argmax(1)?.eq(&y)?.to_dtype(candle_core::DType::F32)?.sum_all()?.to_scalar::<f32>()? as usize;
            obs.batch(chunk.len());
        }
        let (entropy, load) = routing.finish(epoch + 1)?;
        let held_res = evaluate(model, held, Some(&cfg.eval_attack), 256, |_| {})?;
        state.epoch += 1;
        let log = EpochLog {
            epoch: state.epoch,
            loss: loss_sum / seen.max(1) as f64,
            train_acc: hits as f64 / seen.max(1) as f64,
            clean_acc: held_res.clean_acc,
            robust_acc: held_res.robust_acc.unwrap_or(0.0),
            seconds: start.elapsed().as_secs_f64(),
            entropy,
            load,
        };
        obs.epoch(&log, model, state)?;
    }
    Ok(())
}

/// One optimisation step; returns (loss, logits on the trained inputs, routing of the clean pass).
fn step_once(
    model: &Model,
    state: &mut OptState,
    x: &Tensor,
    y: &Tensor,
    cfg: &TrainConfig,
    lr: f64,
    seed: u64,
) -> Result<(f64, Tensor, Vec<Tensor>)> {
    let train = |track| Ctx { train: true, track };
    match cfg.method {
        Method::Standard => {
            let out = model.forward(x, &train(Track::All), Exec::Masked)?;
            let loss = (cross_entropy(&out.logits, y)?
                + balance_loss(&out.routes, cfg.balance)?.to_dtype(out.logits.dtype())?)?;
            sgd(model, state, &loss, lr, None)?;
            Ok((scalar(&loss)?, out.logits, out.routes))
        }
        Method::PgdAt => {
            let adv = perturb(model, x, y, &cfg.train_attack, Objective::CrossEntropy, seed)?;
            let out = model.forward(&adv, &train(Track::All), Exec::Masked)?;
            let loss = (cross_entropy(&out.logits, y)?
                + balance_loss(&out.routes, cfg.balance)?.to_dtype(out.logits.dtype())?)?;
            sgd(model, state, &loss, lr, None)?;
            Ok((scalar(&loss)?, out.logits, out.routes))
        }
        Method::Trades => {
            let adv = perturb(model, x, y, &cfg.train_attack, Objective::Kl, seed)?;
            let (loss, logits, routes) = trades_loss(model, x, &adv, y, cfg.beta, Track::All, false)?;
            let loss = (loss + balance_loss(&routes, cfg.balance)?)?;
            sgd(model, state, &loss, lr, None)?;
            Ok((scalar(&loss)?, logits, routes))
        }
        Method::Advmoe => {
            // Expert phase: routers fixed (detached, never updated).
            let adv = perturb(model, x, y, &cfg.train_attack, Objective::Kl, seed)?;
            let (loss, logits, routes) = trades_loss(model, x, &adv, y, cfg.beta, Track::Experts, false)?;
            sgd(model, state, &loss, lr, Some(Group::Net))?;
            // Router phase: fresh examples against the updated experts, experts fixed.
            let adv = perturb(model, x, y, &cfg.train_attack, Objective::Kl, seed ^ 0xa5a5)?;
            let (rloss, _, rroutes) = trades_loss(model, x, &adv, y, cfg.beta, Track::Routers, true)?;
            let rloss = (rloss + balance_loss(&rroutes, cfg.balance)?)?;
            sgd(model, state, &rloss, lr, Some(Group::Router))?;
            Ok((scalar(&loss)?, logits, routes))
        }
    }
}

/// CE(f(x)) + beta KL(f(x) || f(x')), plus, with `route_kl`, beta times the mean over MoE units of
/// KL(r(x) || r(x')) between the routers' clean and adversarial distributions. All in log space.
fn trades_loss(
    model: &Model,
    x: &Tensor,
    adv: &Tensor,
    y: &Tensor,
    beta: f64,
    track: Track,
    route_kl: bool,
) -> Result<(Tensor, Tensor, Vec<Tensor>)> {
    let ctx = Ctx { train: true, track };
    let clean = model.forward(x, &ctx, Exec::Masked)?;
    let advo = model.forward(adv, &ctx, Exec::Masked)?;
    let lp_clean = log_softmax(&clean.logits)?;
    let mut loss = (cross_entropy(&clean.logits, y)? + (kl_div(&lp_clean, &log_softmax(&advo.logits)?)? * beta)?)?;
    if route_kl && !clean.routes.is_empty() {
        let n = clean.routes.len() as f64;
        for (rc, ra) in clean.routes.iter().zip(&advo.routes) {
            // The probabilities came from a log-softmax; a floor keeps log finite if one underflows.
            let (lc, la) = (rc.clamp(1e-12f32, 1f32)?.log()?, ra.clamp(1e-12f32, 1f32)?.log()?);
            loss = (loss + (kl_div(&lc, &la)? * (beta / n))?)?;
        }
    }
    Ok((loss, clean.logits, clean.routes))
}

/// Switch-Transformer load balancing, mean over MoE units: E * sum_e f_e * mean_p_e, where f_e
/// is the (constant) share of images routed to e. Minimal (= 1) when the load is even; without it
/// a freshly initialised router tends to send every image to one expert.
fn balance_loss(routes: &[Tensor], weight: f64) -> Result<Tensor> {
    let dtype = routes.first().map_or(candle_core::DType::F32, |r| r.dtype());
    let mut total = Tensor::zeros((), dtype, &Device::Cpu)?;
    if routes.is_empty() || weight == 0.0 {
        return Ok(total);
    }
    for r in routes {
        let (n, e) = r.dims2()?;
        let hard =
            r.argmax(1)?.unsqueeze(1)?.broadcast_eq(&Tensor::arange(0u32, e as u32, r.device())?.unsqueeze(0)?)?;
        let share = hard.to_dtype(r.dtype())?.sum(0)?.affine(1.0 / n as f64, 0.0)?;
        let term = (share * r.mean(0)?)?.sum_all()?.affine(e as f64 * weight / routes.len() as f64, 0.0)?;
        total = (total + term)?;
    }
    Ok(total)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}

/// One SGD step (momentum, weight decay on conv/linear weights) on the parameters of `only`
/// (all if None), from the gradients of `loss`.
fn sgd(model: &Model, state: &mut OptState, loss: &Tensor, lr: f64, only: Option<Group>) -> Result<()> {
    let grads = loss.backward()?;
    let g: Vec<Option<Tensor>> = model.params.iter().map(|p| grads.get(p.var.as_tensor()).cloned()).collect();
    state.opt.step(&model.params, &g, lr, &|p| only.is_none_or(|o| p.group == o.tag())).map_err(train_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(rows: &[[f32; 2]]) -> Tensor {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (rows.len(), 2), &Device::Cpu).unwrap()
    }

    #[test]
    fn routing_collapse_stops_the_run() {
        let mut r = Routing::new();
        r.add(&[routes(&[[0.9, 0.1], [0.6, 0.4]])]).unwrap();
        r.add(&[routes(&[[0.7, 0.3]])]).unwrap();
        let err = r.finish(3).unwrap_err().to_string();
        assert!(err.contains("routing collapsed") && err.contains("unit 0") && err.contains("epoch 3"), "{err}");
    }

    #[test]
    fn routing_load_and_entropy_are_per_unit() {
        let mut r = Routing::new();
        r.add(&[routes(&[[0.5, 0.5], [0.2, 0.8], [0.9, 0.1], [0.1, 0.9]])]).unwrap();
        let (entropy, load) = r.finish(1).unwrap();
        assert_eq!(load, vec![vec![0.5, 0.5]]);
        let h = |p: f64| -(p * p.ln() + (1.0 - p) * (1.0 - p).ln());
        let want = (h(0.5) + h(0.2) + h(0.9) + h(0.1)) / 4.0;
        assert!((entropy[0] - want).abs() < 1e-6, "{} vs {want}", entropy[0]);
    }

    #[test]
    fn non_finite_router_probability_stops_the_run() {
        let mut r = Routing::new();
        let err = r.add(&[routes(&[[f32::NAN, 0.5]])]).unwrap_err().to_string();
        assert!(err.contains("non-finite"), "{err}");
    }
}
