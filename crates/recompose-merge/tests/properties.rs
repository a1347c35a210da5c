//! Method invariants on random tensors (proptest).

use proptest::prelude::*;
use recompose_merge::config::{Setting, Value};
use recompose_merge::methods::{slerp, Job, Method, Params};

fn defaults(m: &Method) -> Params {
    m.global_params().into_iter().filter_map(|d| d.default.map(|v| (d.name.to_string(), v))).collect()
}

fn per(weight: f64, density: f64) -> Params {
    [("weight".to_string(), Value::Num(weight)), ("density".to_string(), Value::Num(density))].into_iter().collect()
}

fn merge(method: &str, inputs: &[&[f32]], base: Option<usize>, global: &[(&str, Value)], p: Vec<Params>) -> Vec<f32> {
    let m = Method::parse(method).unwrap();
    let mut g = defaults(&m);
    g.extend(global.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let shape = [inputs[0].len()];
    m.merge(&Job { tensor: "t", shape: &shape, inputs: inputs.to_vec(), base, global: g, per: p, seed: 3 }).unwrap()
}

fn tensor(n: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(-4.0f32..4.0, n)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn linear_of_one_model_is_that_model(x in tensor(37), w in 0.01f64..10.0) {
        prop_assert_eq!(merge("linear", &[&x], None, &[], vec![per(w, 1.0)]), x);
    }

    #[test]
    fn task_arithmetic_with_lambda_zero_is_the_base((b, x, y) in (tensor(40), tensor(40), tensor(40)), w in -2.0f64..2.0) {
        let out = merge("task_arithmetic", &[&b, &x, &y], Some(0), &[("lambda", Value::Num(0.0))], vec![per(1.0, 1.0), per(w, 1.0), per(0.5, 1.0)]);
        prop_assert_eq!(out, b);
    }

    #[test]
    fn slerp_gives_its_endpoints((a, b) in (tensor(33), tensor(33))) {
        prop_assert_eq!(slerp(0.0, &a, &b), a.clone());
        let end = slerp(1.0, &a, &b);
        for (p, q) in end.iter().zip(&b) {
            prop_assert!((p - q).abs() <= 1e-5 * (1.0 + q.abs()), "{} vs {}", p, q);
        }
        // colinear inputs take the lerp
        let c: Vec<f32> = a.iter().map(|v| v * 2.0).collect();
        let mid = slerp(0.5, &a, &c);
        for (m, v) in mid.iter().zip(&a) {
            prop_assert!((m - 1.5 * v).abs() <= 1e-6 * (1.0 + v.abs()));
        }
    }

    #[test]
    fn ties_at_density_one_with_one_model_is_task_arithmetic((b, x) in (tensor(50), tensor(50)), w in 0.1f64..2.0) {
        let ties = merge("ties", &[&b, &x], Some(0), &[], vec![per(1.0, 1.0), per(w, 1.0)]);
        let ta = merge("task_arithmetic", &[&b, &x], Some(0), &[("normalize", Value::Bool(true))], vec![per(1.0, 1.0), per(w, 1.0)]);
        prop_assert_eq!(ties, ta);
    }

    #[test]
    fn dare_survivors_are_rescaled_by_one_over_density(x in tensor(4000), density in 0.2f64..0.8) {
        let b = vec![0.0f32; x.len()];
        let out = merge("dare_linear", &[&b, &x], Some(0), &[("rescale_mode", Value::Str("density".into()))], vec![per(1.0, 1.0), per(1.0, density)]);
        let mut kept = 0;
        for (o, v) in out.iter().zip(&x) {
            if *o != 0.0 {
                kept += 1;
                prop_assert!((o - v / density as f32).abs() <= 1e-5 * (1.0 + o.abs()));
            }
        }
        let frac = kept as f64 / x.len() as f64;
        prop_assert!((frac - density).abs() < 0.05, "kept {} at density {}", frac, density);
    }

    #[test]
    fn gradients_hit_their_points_and_stay_between_them(g in prop::collection::vec(-3.0f64..3.0, 2..6), t in 0.0f64..1.0) {
        let s = Setting::Gradient(g.clone());
        let n = g.len() - 1;
        for (i, want) in g.iter().enumerate() {
            let got = s.evaluate("x", i as f64 / n as f64).and_then(|v| v.as_f64()).unwrap();
            prop_assert!((got - want).abs() < 1e-12);
        }
        let v = s.evaluate("x", t).and_then(|v| v.as_f64()).unwrap();
        let i = ((t * n as f64) as usize).min(n - 1);
        let (lo, hi) = (g[i].min(g[i + 1]), g[i].max(g[i + 1]));
        prop_assert!(v >= lo - 1e-12 && v <= hi + 1e-12);
    }
}
