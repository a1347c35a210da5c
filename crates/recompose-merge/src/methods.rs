//! The merge methods, one tensor at a time, with mergekit's semantics (parameter names, defaults,
//! order of operations). Element-wise arithmetic is f32 like mergekit's; reductions (norms, dot
//! products, L1 sums) accumulate in f64.

use crate::config::Value;
use crate::error::{Error, Result};
use crate::sparsify::{self, Rescale};
use rand::SeedableRng;
use std::collections::BTreeMap;

/// Resolved parameters of one tensor (global) or of one model for one tensor.
pub type Params = BTreeMap<String, Value>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Consensus {
    /// TIES: the sign of the weighted sum wins.
    Sum,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drop {
    Magnitude,
    Outliers,
    Random,
    Della,
}

/// Generalised task arithmetic: mergekit's family of delta-based methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Gta {
    consensus: Option<Consensus>,
    drop: Option<Drop>,
    normalize: bool,
    rescale: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Linear,
    Slerp,
    NuSlerp,
    ModelStock,
    Passthrough,
    Gta(&'static str, GtaKind),
}

/// Which member of the task-arithmetic family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GtaKind(Gta);

const GTA: &[(&str, Gta)] = &[
    ("task_arithmetic", Gta { consensus: None, drop: None, normalize: false, rescale: false }),
    ("ties", Gta { consensus: Some(Consensus::Sum), drop: Some(Drop::Magnitude), normalize: true, rescale: false }),
    ("dare_ties", Gta { consensus: Some(Consensus::Sum), drop: Some(Drop::Random), normalize: false, rescale: true }),
    ("dare_linear", Gta { consensus: None, drop: Some(Drop::Random), normalize: false, rescale: true }),
    ("breadcrumbs", Gta { consensus: None, drop: Some(Drop::Outliers), normalize: false, rescale: false }),
    (
        "breadcrumbs_ties",
        Gta { consensus: Some(Consensus::Sum), drop: Some(Drop::Outliers), normalize: false, rescale: false },
    ),
    ("della", Gta { consensus: Some(Consensus::Sum), drop: Some(Drop::Della), normalize: true, rescale: true }),
    ("della_linear", Gta { consensus: None, drop: Some(Drop::Della), normalize: false, rescale: true }),
];

pub const METHOD_NAMES: &[&str] = &[
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "slerp",
    "nuslerp",
    "model_stock",
    "passthrough",
];

/// A parameter a method reads: name and default (`None`: required).
pub struct ParamDef {
    pub name: &'static str,
    pub default: Option<Value>,
}

fn def(name: &'static str, default: Option<Value>) -> ParamDef {
    ParamDef { name, default }
}

impl Method {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "linear" => Method::Linear,
            "slerp" => Method::Slerp,
            "nuslerp" => Method::NuSlerp,
            "model_stock" => Method::ModelStock,
            "passthrough" => Method::Passthrough,
            _ => match GTA.iter().find(|(n, _)| *n == name) {
                Some((n, g)) => Method::Gta(n, GtaKind(*g)),
                None => {
                    return Err(Error::Config(format!(
                        "merge_method: unknown method '{name}' (known: {})",
                        METHOD_NAMES.join(", ")
                    )))
                }
            },
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Method::Linear => "linear",
            Method::Slerp => "slerp",
            Method::NuSlerp => "nuslerp",
            Method::ModelStock => "model_stock",
            Method::Passthrough => "passthrough",
            Method::Gta(n, _) => n,
        }
    }

    /// Whether the method needs `base_model`.
    pub fn needs_base(&self) -> bool {
        matches!(self, Method::Gta(..) | Method::Slerp | Method::ModelStock)
    }

    /// Parameters read once per tensor (from the slice/global levels).
    pub fn global_params(&self) -> Vec<ParamDef> {
        match self {
            Method::Linear => vec![def("normalize", Some(Value::Bool(true)))],
            Method::Slerp => vec![def("t", None)],
            Method::NuSlerp => {
                vec![def("nuslerp_row_wise", Some(Value::Bool(false))), def("nuslerp_flatten", Some(Value::Bool(true)))]
            }
            Method::ModelStock => vec![def("filter_wise", Some(Value::Bool(false)))],
            Method::Passthrough => vec![],
            Method::Gta(_, GtaKind(g)) => vec![
                def("int8_mask", Some(Value::Bool(false))),
                def("normalize", Some(Value::Bool(g.normalize))),
                def("rescale", Some(Value::Bool(g.rescale))),
                def("lambda", Some(Value::Num(1.0))),
                // Extension: `density` divides survivors by their keep probability (the papers).
                def("rescale_mode", Some(Value::Str("l1".into()))),
            ],
        }
    }

    /// Parameters read per model per tensor.
    pub fn tensor_params(&self) -> Vec<ParamDef> {
        match self {
            Method::Linear | Method::NuSlerp => vec![def("weight", None)],
            Method::Passthrough => vec![def("scale", Some(Value::Num(1.0)))],
            Method::Slerp | Method::ModelStock => vec![],
            Method::Gta(_, GtaKind(g)) => {
                let mut v = vec![def("weight", None), def("density", Some(Value::Num(1.0)))];
                match g.drop {
                    Some(Drop::Outliers) => v.push(def("gamma", Some(Value::Num(0.01)))),
                    Some(Drop::Della) => v.push(def("epsilon", Some(Value::Num(0.15)))),
                    _ => {}
                }
                v
            }
        }
    }

    /// Merges one tensor. `inputs` are the sources in config order (all the same length),
    /// `base` indexes the base model among them, `per` holds each input's parameters.
    pub fn merge(&self, job: &Job) -> Result<Vec<f32>> {
        let n = job.inputs.len();
        if n == 0 {
            return Err(Error::Mismatch(format!("tensor '{}': no inputs", job.tensor)));
        }
        match self {
            Method::Passthrough => {
                if n != 1 {
                    return Err(Error::Config(format!(
                        "passthrough: tensor '{}' has {n} sources; passthrough takes exactly one per slice",
                        job.tensor
                    )));
                }
                let s = job.num(&job.per[0], "scale")? as f32;
                Ok(if s == 1.0 { job.inputs[0].to_vec() } else { job.inputs[0].iter().map(|v| v * s).collect() })
            }
            Method::Linear => linear(job),
            Method::Slerp => {
                if n == 1 {
                    return Ok(job.inputs[0].to_vec());
                }
                let b = job.base_index()?;
                if n != 2 {
                    return Err(Error::Config(format!(
                        "slerp: merges exactly two models, tensor '{}' has {n}",
                        job.tensor
                    )));
                }
                let t = job.num(&job.global, "t")?;
                Ok(slerp(t, job.inputs[b], job.inputs[1 - b]))
            }
            Method::NuSlerp => nuslerp_job(job),
            Method::ModelStock => model_stock(job),
            Method::Gta(_, GtaKind(g)) => gta(g, job),
        }
    }
}

/// Everything one tensor's merge needs.
pub struct Job<'a> {
    pub tensor: &'a str,
    pub shape: &'a [usize],
    pub inputs: Vec<&'a [f32]>,
    pub base: Option<usize>,
    pub global: Params,
    pub per: Vec<Params>,
    pub seed: u64,
}

impl Job<'_> {
    fn num(&self, p: &Params, name: &str) -> Result<f64> {
        p.get(name)
            .and_then(Value::as_f64)
            .ok_or_else(|| Error::Config(format!("parameter '{name}' for tensor '{}' must be a number", self.tensor)))
    }
    fn flag(&self, p: &Params, name: &str) -> Result<bool> {
        p.get(name).and_then(Value::as_bool).ok_or_else(|| {
            Error::Config(format!("parameter '{name}' for tensor '{}' must be true or false", self.tensor))
        })
    }
    fn base_index(&self) -> Result<usize> {
        self.base.ok_or_else(|| Error::Config(format!("tensor '{}': this method needs base_model", self.tensor)))
    }
    fn row_len(&self) -> usize {
        if self.shape.len() < 2 {
            self.shape.iter().product()
        } else {
            self.shape[1..].iter().product()
        }
    }
}

fn linear(job: &Job) -> Result<Vec<f32>> {
    let mut w: Vec<f64> = job.per.iter().map(|p| job.num(p, "weight")).collect::<Result<_>>()?;
    // Normalising the weights first (not the sum after) keeps one model with any weight exact.
    if job.flag(&job.global, "normalize")? {
        let s: f64 = w.iter().sum();
        if s == 0.0 {
            return Err(Error::Config(format!("linear: weights for tensor '{}' sum to zero", job.tensor)));
        }
        w.iter_mut().for_each(|x| *x /= s);
    }
    let len = job.inputs[0].len();
    let mut out = vec![0f32; len];
    for (x, wi) in job.inputs.iter().zip(&w) {
        let wi = *wi as f32;
        for (o, v) in out.iter_mut().zip(x.iter()) {
            *o += wi * v;
        }
    }
    Ok(out)
}

fn norm(x: &[f32]) -> f64 {
    x.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>().sqrt()
}

fn lerp(t: f64, a: &[f32], b: &[f32]) -> Vec<f32> {
    let (s, t) = ((1.0 - t) as f32, t as f32);
    a.iter().zip(b).map(|(x, y)| s * x + t * y).collect()
}

/// mergekit's slerp: the whole tensor as one vector; lerp when nearly colinear (|cos| > 0.9995).
pub fn slerp(t: f64, a: &[f32], b: &[f32]) -> Vec<f32> {
    let (na, nb) = (norm(a), norm(b));
    let (ia, ib) = (if na > 1e-8 { 1.0 / na } else { 1.0 }, if nb > 1e-8 { 1.0 / nb } else { 1.0 });
    let dot: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 * ia) * (*y as f64 * ib)).sum();
    if dot.abs() > 0.9995 {
        return lerp(t, a, b);
    }
    let theta0 = dot.acos();
    let sin0 = theta0.sin();
    let theta_t = theta0 * t;
    let s0 = ((theta0 - theta_t).sin() / sin0) as f32;
    let s1 = (theta_t.sin() / sin0) as f32;
    a.iter().zip(b).map(|(x, y)| s0 * x + s1 * y).collect()
}

/// nuslerp on vectors of length `len` laid out with stride: `vectors` yields each vector's indices.
fn nuslerp(t: f64, a: &[f32], b: &[f32], groups: &[Vec<usize>]) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    for idx in groups {
        let na = idx.iter().map(|&i| (a[i] as f64).powi(2)).sum::<f64>().sqrt().max(1e-7);
        let nb = idx.iter().map(|&i| (b[i] as f64).powi(2)).sum::<f64>().sqrt().max(1e-7);
        let cos: f64 = idx.iter().map(|&i| (a[i] as f64 / na) * (b[i] as f64 / nb)).sum();
        let theta = cos.clamp(-1.0, 1.0).acos();
        let sin = theta.sin();
        if sin.abs() < 1e-8 {
            let (s, u) = ((1.0 - t) as f32, t as f32);
            idx.iter().for_each(|&i| out[i] = s * a[i] + u * b[i]);
        } else {
            let s0 = ((1.0 - t) * theta).sin() / sin;
            let s1 = (t * theta).sin() / sin;
            let (s0, s1) = (s0 as f32, s1 as f32);
            idx.iter().for_each(|&i| out[i] = s0 * a[i] + s1 * b[i]);
        }
    }
    out
}

fn nuslerp_job(job: &Job) -> Result<Vec<f32>> {
    if job.inputs.len() == 1 {
        return Ok(job.inputs[0].to_vec());
    }
    let others: Vec<usize> = (0..job.inputs.len()).filter(|i| Some(*i) != job.base).collect();
    if others.len() != 2 {
        return Err(Error::Config(format!(
            "nuslerp: merges exactly two models (plus an optional base), tensor '{}' has {}",
            job.tensor,
            others.len()
        )));
    }
    let w0 = job.num(&job.per[others[0]], "weight")?;
    let w1 = job.num(&job.per[others[1]], "weight")?;
    let t = if (w0 + w1).abs() < 1e-6 { 0.5 } else { w1 / (w0 + w1) };
    let flatten = job.flag(&job.global, "nuslerp_flatten")?;
    let row_wise = job.flag(&job.global, "nuslerp_row_wise")?;
    let len = job.inputs[0].len();
    // The vectors interpolated: the whole tensor, its columns (row_wise, as mergekit names it), or rows.
    let cols = if job.shape.len() >= 2 { *job.shape.last().unwrap_or(&1) } else { len };
    let rows = len / cols.max(1);
    let groups: Vec<Vec<usize>> = if flatten || job.shape.len() < 2 {
        vec![(0..len).collect()]
    } else if row_wise {
        (0..cols).map(|c| (0..rows).map(|r| r * cols + c).collect()).collect()
    } else {
        (0..rows).map(|r| (r * cols..(r + 1) * cols).collect()).collect()
    };
    let (a, b) = (job.inputs[others[0]], job.inputs[others[1]]);
    match job.base {
        None => Ok(nuslerp(t, a, b, &groups)),
        Some(bi) => {
            let base = job.inputs[bi];
            let da: Vec<f32> = a.iter().zip(base).map(|(x, y)| x - y).collect();
            let db: Vec<f32> = b.iter().zip(base).map(|(x, y)| x - y).collect();
            let m = nuslerp(t, &da, &db, &groups);
            Ok(base.iter().zip(m).map(|(x, d)| x + d).collect())
        }
    }
}

fn model_stock(job: &Job) -> Result<Vec<f32>> {
    let b = job.base_index()?;
    if job.inputs.len() == 1 {
        return Ok(job.inputs[0].to_vec());
    }
    if job.inputs.len() < 3 {
        return Err(Error::Config(format!(
            "model_stock: needs the base plus at least two models, tensor '{}' has {}",
            job.tensor,
            job.inputs.len()
        )));
    }
    let w0 = job.inputs[b];
    let ws: Vec<&[f32]> = (0..job.inputs.len()).filter(|i| *i != b).map(|i| job.inputs[i]).collect();
    let len = w0.len();
    let row = if job.flag(&job.global, "filter_wise")? { job.row_len().max(1) } else { len.max(1) };
    let offsets: Vec<Vec<f32>> = ws.iter().map(|w| w.iter().zip(w0).map(|(x, y)| x - y).collect()).collect();
    let n = ws.len() as f64;
    let mut out = vec![0f32; len];
    for start in (0..len).step_by(row) {
        let end = (start + row).min(len);
        let mut cos_sum = 0.0;
        let mut pairs = 0.0;
        for i in 0..offsets.len() {
            for j in i + 1..offsets.len() {
                let (a, c) = (&offsets[i][start..end], &offsets[j][start..end]);
                let dot: f64 = a.iter().zip(c).map(|(x, y)| *x as f64 * *y as f64).sum();
                cos_sum += (dot / (norm(a) * norm(c)).max(1e-6)).clamp(-1.0, 1.0);
                pairs += 1.0;
            }
        }
        let cos = cos_sum / pairs;
        let t = ((n * cos) / (1.0 + (n - 1.0) * cos)) as f32;
        for k in start..end {
            let avg = ws.iter().map(|w| w[k]).sum::<f32>() / ws.len() as f32;
            out[k] = t * avg + (1.0 - t) * w0[k];
        }
    }
    Ok(out)
}

fn gta(g: &Gta, job: &Job) -> Result<Vec<f32>> {
    let b = job.base_index()?;
    let base = job.inputs[b];
    let others: Vec<usize> = (0..job.inputs.len()).filter(|i| *i != b).collect();
    if others.is_empty() {
        return Ok(base.to_vec());
    }
    let rescale = if !job.flag(&job.global, "rescale")? {
        Rescale::None
    } else {
        match job.global.get("rescale_mode").map(|v| v.to_string()).as_deref() {
            Some("density") => Rescale::Density,
            Some("l1") | None => Rescale::L1,
            Some(other) => {
                return Err(Error::Config(format!("rescale_mode: '{other}' is not one of l1, density")));
            }
        }
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(job.seed);
    let mut deltas = Vec::with_capacity(others.len());
    let mut weights = Vec::with_capacity(others.len());
    for &i in &others {
        let p = &job.per[i];
        let delta: Vec<f32> = job.inputs[i].iter().zip(base).map(|(x, y)| x - y).collect();
        let density = job.num(p, "density")?;
        let delta = match g.drop {
            None => delta,
            Some(Drop::Magnitude) => sparsify::magnitude(&delta, density, rescale, job.tensor)?,
            Some(Drop::Outliers) => sparsify::magnitude_outliers(&delta, density, job.num(p, "gamma")?, rescale),
            Some(Drop::Random) => sparsify::bernoulli(&delta, density, rescale, &mut rng),
            Some(Drop::Della) => {
                sparsify::della_magprune(&delta, job.row_len(), density, job.num(p, "epsilon")?, rescale, &mut rng)?
            }
        };
        deltas.push(delta);
        weights.push(job.num(p, "weight")? as f32);
    }
    let len = base.len();
    let normalize = job.flag(&job.global, "normalize")?;
    let lambda = job.num(&job.global, "lambda")? as f32;
    let mut out = vec![0f32; len];
    let total_w: f32 = weights.iter().sum();
    let total_w = if total_w.abs() < 1e-8 { 1.0 } else { total_w };
    for k in 0..len {
        let mut mixed = 0f32;
        let mut divisor = 0f32;
        match g.consensus {
            None => {
                for (d, w) in deltas.iter().zip(&weights) {
                    mixed += d[k] * w;
                }
                divisor = total_w;
            }
            Some(c) => {
                let Consensus::Sum = c;
                let elect = deltas.iter().zip(&weights).map(|(d, w)| d[k] * w).sum::<f32>() >= 0.0;
                let majority = if elect { 1.0 } else { -1.0 };
                for (d, w) in deltas.iter().zip(&weights) {
                    let wd = d[k] * w;
                    if sign(wd) == majority {
                        mixed += wd;
                        divisor += w;
                    }
                }
                if divisor == 0.0 {
                    divisor = 1.0;
                }
            }
        }
        if normalize {
            mixed /= divisor;
        }
        if lambda != 1.0 {
            mixed *= lambda;
        }
        out[k] = base[k] + mixed;
    }
    Ok(out)
}

fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(kv: &[(&str, Value)]) -> Params {
        kv.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    fn defaults(m: &Method) -> Params {
        m.global_params().into_iter().filter_map(|d| d.default.map(|v| (d.name.to_string(), v))).collect()
    }

    fn run(m: &str, inputs: &[&[f32]], base: Option<usize>, global: &[(&str, Value)], per: Vec<Params>) -> Vec<f32> {
        let m = Method::parse(m).unwrap();
        let mut g = defaults(&m);
        g.extend(params(global));
        let shape = [inputs[0].len()];
        let job = Job { tensor: "t", shape: &shape, inputs: inputs.to_vec(), base, global: g, per, seed: 0 };
        m.merge(&job).unwrap()
    }

    fn w(x: f64) -> Params {
        params(&[("weight", Value::Num(x)), ("density", Value::Num(1.0))])
    }

    #[test]
    fn linear_with_one_model_is_the_identity() {
        let a = [1.0f32, -2.0, 3.5];
        assert_eq!(run("linear", &[&a], None, &[], vec![w(0.7)]), a.to_vec());
    }

    #[test]
    fn task_arithmetic_with_lambda_zero_is_the_base() {
        let (b, x) = ([1.0f32, 2.0, 3.0], [4.0f32, -1.0, 0.5]);
        let out = run("task_arithmetic", &[&b, &x], Some(0), &[("lambda", Value::Num(0.0))], vec![w(1.0), w(1.0)]);
        assert_eq!(out, b.to_vec());
    }

    #[test]
    fn slerp_endpoints_and_colinear_fallback() {
        let (a, b) = ([1.0f32, 0.0, 2.0], [0.0f32, 3.0, -1.0]);
        assert_eq!(slerp(0.0, &a, &b), a.to_vec());
        let end = slerp(1.0, &a, &b);
        assert!(end.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-6), "{end:?}");
        // colinear: exactly the lerp
        let c = [2.0f32, 0.0, 4.0];
        assert_eq!(slerp(0.25, &a, &c), vec![1.25, 0.0, 2.5]);
        // a midpoint of orthogonal unit vectors has unit length
        let m = slerp(0.5, &[1.0, 0.0], &[0.0, 1.0]);
        assert!((m[0] - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6 && (m[0] - m[1]).abs() < 1e-7);
    }

    #[test]
    fn ties_with_density_one_and_one_model_is_task_arithmetic() {
        let (b, x) = ([1.0f32, 2.0, 3.0, -1.0], [1.5f32, 1.0, 3.0, 2.0]);
        let ties = run("ties", &[&b, &x], Some(0), &[], vec![w(1.0), w(0.6)]);
        let ta = run("task_arithmetic", &[&b, &x], Some(0), &[("normalize", Value::Bool(true))], vec![w(1.0), w(0.6)]);
        assert_eq!(ties, ta);
    }

    #[test]
    fn ties_elects_the_sign_by_weighted_sum() {
        let b = [0.0f32; 2];
        let (x, y, z) = ([1.0f32, -1.0], [2.0f32, -1.0], [-4.0f32, 3.0]);
        let out = run("ties", &[&b, &x, &y, &z], Some(0), &[], vec![w(1.0), w(1.0), w(1.0), w(1.0)]);
        // element 0: 1 + 2 - 4 < 0 -> only z survives; element 1: -1 - 1 + 3 > 0 -> only z survives
        assert_eq!(out, vec![-4.0, 3.0]);
    }

    #[test]
    fn model_stock_of_identical_offsets_is_the_average() {
        let b = [0.0f32, 0.0];
        let (x, y) = ([1.0f32, 1.0], [1.0f32, 1.0]);
        assert_eq!(run("model_stock", &[&b, &x, &y], Some(0), &[], vec![Params::new(); 3]), vec![1.0, 1.0]);
    }

    #[test]
    fn nuslerp_with_equal_weights_is_symmetric() {
        let (a, b) = ([1.0f32, 0.0], [0.0f32, 1.0]);
        let out = run("nuslerp", &[&a, &b], None, &[], vec![w(1.0), w(1.0)]);
        assert!((out[0] - out[1]).abs() < 1e-7 && (out[0] - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6);
    }
}
