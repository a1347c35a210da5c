//! Properties of the bounded cache on synthetic steps (random batch, GQA shape, sliding window,
//! policy, prompt lengths and attention mass): it never holds more than its budget, never evicts
//! a sink or a recent token, never grows after the prompt, and decides exactly as the oracle.

use candle_core::{Device, Tensor};
use proptest::prelude::*;
use recompose_core::config::{RopeScaling, RopeStyle};
use recompose_kv::oracle::MaskOracle;
use recompose_kv::{BoundedCache, KvSpec, Prefill};
use recompose_llm::kv::{CacheLayout, KvCache, Step};
use recompose_llm::rope::Rope;
use std::sync::Arc;

const D: usize = 4;

fn layout(layers: usize, kv_heads: usize, group: usize, window: Option<usize>) -> CacheLayout {
    let rope = Arc::new(Rope::new(D, 10_000.0, &RopeScaling::None, RopeStyle::Neox));
    CacheLayout {
        num_layers: layers,
        num_heads: kv_heads * group,
        kv_heads,
        head_dim: D,
        max_len: 4096,
        // The last layer slides when a window is given, like Gemma's local layers.
        windows: (0..layers).map(|l| if l + 1 == layers { window } else { None }).collect(),
        ropes: vec![rope; layers],
        device: candle_core::Device::Cpu,
    }
}

/// A deterministic pseudo-random attention mass for (layer, row, query head, position, step).
fn mass_of(layer: usize, b: usize, hq: usize, pos: i64, step: usize) -> f32 {
    let mut x = (layer * 1_000_003 + b * 7919 + hq * 104_729 + pos as usize * 15_485_863 + step * 31) as u64;
    x ^= x >> 13;
    x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((x >> 40) % 1000) as f32 / 1000.0
}

/// One step on a cache: keys random, values carrying their position in component 0, and a mass
/// computed from what each slot holds (so both implementations see the same scores).
fn step(cache: &mut dyn KvCache, lay: &CacheLayout, st: &Step, n: usize) {
    let (b, t, h) = (st.batch(), st.t, lay.kv_heads);
    let g = lay.num_heads / h;
    cache.begin_step(st).unwrap();
    for l in 0..lay.num_layers {
        let k = Tensor::randn(0f32, 1.0, (b, h, t, D), &Device::Cpu).unwrap();
        let mut vv = vec![0f32; b * h * t * D];
        for r in 0..b {
            for hh in 0..h {
                for i in 0..t {
                    let p = if i < st.lens[r] { (st.start[r] + i) as f32 } else { -1.0 };
                    vv[((r * h + hh) * t + i) * D] = p;
                }
            }
        }
        let v = Tensor::from_vec(vv, (b, h, t, D), &Device::Cpu).unwrap();
        let view = cache.update(l, &k, &v, lay.windows[l]).unwrap();
        let len = view.k.dim(2).unwrap();
        let vals: Vec<f32> = view.v.contiguous().unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let mask: Option<(usize, Vec<f32>)> =
            view.mask.map(|m| (m.dim(1).unwrap(), m.flatten_all().unwrap().to_vec1().unwrap()));
        let mut mass = vec![0f32; b * h * g * len];
        for r in 0..b {
            for hh in 0..h {
                for s in 0..len {
                    let visible = (0..st.lens[r]).any(|q| match &mask {
                        None => true,
                        Some((mh, m)) => m[((r * mh + hh.min(mh - 1)) * t + q) * len + s] > -1.0,
                    });
                    if !visible {
                        continue;
                    }
                    let pos = vals[((r * h + hh) * len + s) * D] as i64;
                    for gi in 0..g {
                        mass[((r * h + hh) * g + gi) * len + s] = mass_of(l, r, hh * g + gi, pos, n);
                    }
                }
            }
        }
        if cache.wants_probs() {
            cache.observe(l, &Tensor::from_vec(mass, (b, h * g, len), &Device::Cpu).unwrap()).unwrap();
        }
    }
    cache.end_step().unwrap();
}

fn spec_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        (3usize..12, 0usize..3, any::<bool>(), 0usize..4).prop_map(|(n, s, orig, c)| format!(
            "window:{},sinks={s}{}{}",
            n.max(s + 1),
            if orig { ",pos=original" } else { "" },
            if c > 0 { format!(",prefill={c}") } else { String::new() }
        )),
        (0usize..6, 1usize..6, 0usize..3, 0usize..4).prop_map(|(hv, r, a, c)| format!(
            "h2o:heavy={hv},recent={r},agg={}{}",
            ["mean", "sum", "max"][a],
            if c > 0 { format!(",prefill={c}") } else { String::new() }
        )),
        (1usize..9, 0usize..3).prop_map(|(f, a)| format!("h2o:0.{f},agg={}", ["mean", "sum", "max"][a])),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn bounded_cache_keeps_its_budget_and_decides_like_the_oracle(
        spec in spec_strategy(),
        lens in proptest::collection::vec(1usize..16, 1..4),
        layers in 1usize..3,
        kv_heads in 1usize..3,
        group in 1usize..4,
        window in prop_oneof![Just(None), (3usize..9).prop_map(Some)],
        decode in 1usize..10,
    ) {
        let spec: KvSpec = spec.parse().unwrap();
        let lay = layout(layers, kv_heads, group, window);
        let budgets = spec.row_budgets(&lens).unwrap();
        let sinks = match spec { KvSpec::Window { sinks, .. } => sinks, _ => 0 };
        let mut bounded = BoundedCache::from_spec(&lay, &spec, &lens).unwrap();
        let mut oracle = MaskOracle::new(&lay, &spec, &lens);
        // Prefill as Model::prefill does: chunks of the policy's size, then end_prefill.
        let chunk = match spec.prefill() { Prefill::Bounded(c) => c, Prefill::Full => usize::MAX };
        let longest = *lens.iter().max().unwrap();
        let mut steps = vec![];
        let mut at = 0;
        while at < longest {
            let step_lens: Vec<usize> = lens.iter().map(|&n| n.saturating_sub(at).min(chunk)).collect();
            let t = *step_lens.iter().max().unwrap();
            steps.push(Step { start: lens.iter().map(|&n| n.min(at)).collect(), lens: step_lens, t });
            at += t;
        }
        let mut n = 0;
        let mut bytes_after_prompt = None;
        for phase in 0..2 {
            if phase == 1 {
                bounded.end_prefill().unwrap();
                oracle.end_prefill().unwrap();
                let seen: Vec<usize> = (0..lens.len()).map(|b| bounded.seq_len(b)).collect();
                steps = (0..decode).map(|i| Step { start: seen.iter().map(|s| s + i).collect(), lens: vec![1; lens.len()], t: 1 }).collect();
            }
            for st in steps.clone() {
                step(&mut bounded, &lay, &st, n);
                step(&mut oracle, &lay, &st, n);
                n += 1;
                let deferring = phase == 0 && spec.prefill() == Prefill::Full;
                for l in 0..layers {
                    for (b, budget) in budgets.iter().enumerate() {
                        let seen = bounded.seq_len(b) as i64;
                        for h in 0..kv_heads {
                            let held = bounded.held(l, b, h);
                            prop_assert_eq!(&held, &oracle.held(l, b, h), "layer {} row {} head {}", l, b, h);
                            if deferring {
                                continue;
                            }
                            prop_assert!(held.len() <= budget.keep, "{} held > budget {}", held.len(), budget.keep);
                            for p in 0..seen {
                                let must = p < sinks as i64 || p >= seen - budget.recent as i64;
                                prop_assert!(!must || held.contains(&p), "position {} evicted (sinks {}, recent {})", p, sinks, budget.recent);
                            }
                        }
                    }
                }
                if phase == 1 {
                    let now = bounded.resident_bytes();
                    prop_assert_eq!(*bytes_after_prompt.get_or_insert(now), now, "the cache grew during decode");
                }
            }
        }
    }
}
