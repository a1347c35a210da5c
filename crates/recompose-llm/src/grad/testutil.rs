//! Test helpers shared by the op tests (declared `#[cfg(test)]` in `mod.rs`): seeded tensors, the
//! oracle comparison against a candle composition, and central finite differences in f64.

use candle_core::{DType, Device, Tensor, Var};

pub fn rand(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|i| ((crate::lora::mix(seed ^ crate::lora::mix(i as u64)) >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Forward value and input gradients of `f` (under a fixed random projection of its output)
/// for the fused op and its composition must agree.
pub fn check_against_composed(
    inputs: &[Tensor],
    fused: impl Fn(&[Tensor]) -> Tensor,
    composed: impl Fn(&[Tensor]) -> Tensor,
    tol: f64,
) {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let (a, b) = (fused(&ts), composed(&ts));
    assert!(max_diff(&a, &b) < tol, "forward: {}", max_diff(&a, &b));
    let proj = rand(a.dims(), 99, a.dtype());
    let ga = (&a * &proj).unwrap().sum_all().unwrap().backward().unwrap();
    let gb = (&b * &proj).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, v) in vars.iter().enumerate() {
        let (x, y) = (ga.get(v.as_tensor()), gb.get(v.as_tensor()));
        match (x, y) {
            (Some(x), Some(y)) => {
                assert!(max_diff(x, y) < tol, "input {i}: gradient differs by {}", max_diff(x, y))
            }
            (None, None) => {}
            _ => panic!("input {i}: gradient present in one version only"),
        }
    }
}

/// Central differences of `sum(f(inputs) * proj)` at a few coordinates of each input (f64).
pub fn check_finite_differences(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Tensor) {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts);
    let proj = rand(out.dims(), 7, DType::F64);
    let loss = |ts: &[Tensor]| -> f64 { (f(ts) * &proj).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap() };
    let g = (out * &proj).unwrap().sum_all().unwrap().backward().unwrap();
    let eps = 1e-5;
    for (i, v) in vars.iter().enumerate() {
        let grad: Vec<f64> = g.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let base: Vec<f64> = inputs[i].flatten_all().unwrap().to_vec1().unwrap();
        for k in [0, base.len() / 3, base.len() - 1] {
            let at = |d: f64| {
                let mut p = base.clone();
                p[k] += d;
                let mut ts: Vec<Tensor> = inputs.to_vec();
                ts[i] = Tensor::from_vec(p, inputs[i].shape(), &Device::Cpu).unwrap();
                loss(&ts)
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            let err = (fd - grad[k]).abs() / fd.abs().max(grad[k].abs()).max(1e-6);
            assert!(err < 1e-6, "input {i} [{k}]: autograd {} vs finite difference {fd}", grad[k]);
        }
    }
}
