//! Both kernels against the plain candle composition: strided caches, shared and per-KV-head
//! masks, causal masks by slot position with windows and padding, fully hidden rows, GQA groups,
//! T = 1 to past one query tile, L not a multiple of a chunk or tile, head sizes not a multiple
//! of a vector, and the attention mass.

use super::*;
use crate::kv::MASKED;
use candle_core::{Device, D};

/// The plain composition: matmul, mask, softmax, matmul. Returns the output and the
/// probabilities `(B, Hkv, G*T, L)`.
fn reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64, t: usize) -> (Tensor, Tensor) {
    let (b, h, gt, _) = q.dims4().unwrap();
    let l = k.dim(2).unwrap();
    let s = (q.matmul(&k.t().unwrap().contiguous().unwrap()).unwrap() * scale).unwrap();
    let s = match mask {
        Some(m) => s
            .reshape((b, h, gt / t, t, l))
            .unwrap()
            .broadcast_add(&m.unsqueeze(2).unwrap())
            .unwrap()
            .reshape((b, h, gt, l))
            .unwrap(),
        None => s,
    };
    let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
    (p.matmul(&v.contiguous().unwrap()).unwrap(), p)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

/// Largest `|a - b| / max(1, |b|)`.
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) =
        (a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    a.iter().zip(&b).map(|(x, y)| (x - y).abs() / y.abs().max(1.0)).fold(0.0, f32::max)
}

/// A causal mask `(B, 1, T, L)` by slot position, as the full cache builds it: the first
/// `L - T` slots hold positions `0..`, except `hist_pad[b]` padding slots at the front; the last
/// `T` hold the step, of which row `b`'s first `lens[b]` are real.
fn causal(b: usize, t: usize, l: usize, lens: &[usize], hist_pad: &[usize], window: Option<usize>) -> Vec<f32> {
    let hist = l - t;
    let mut m = vec![0f32; b * t * l];
    for bi in 0..b {
        let pos = |s: usize| -> i64 {
            if s < hist {
                if s < hist_pad[bi] {
                    -1
                } else {
                    (s - hist_pad[bi]) as i64
                }
            } else if s - hist < lens[bi] {
                (hist - hist_pad[bi] + s - hist) as i64
            } else {
                -1
            }
        };
        for ti in 0..t {
            let qp = (hist - hist_pad[bi] + ti) as i64;
            for s in 0..l {
                let p = pos(s);
                if !(p >= 0 && p <= qp && window.is_none_or(|w| qp - p < w as i64)) {
                    m[(bi * t + ti) * l + s] = MASKED;
                }
            }
        }
    }
    m
}

struct Case {
    b: usize,
    h: usize,
    g: usize,
    t: usize,
    d: usize,
    l: usize,
    lens: Vec<usize>,
}

/// Runs every mask kind on `c` and compares output and mass with the reference.
fn check(c: &Case) {
    let dev = Device::Cpu;
    let Case { b, h, g, t, d, l, .. } = *c;
    let cap = l + 7;
    let q = Tensor::randn(0f32, 1.0, (b, h, g * t, d), &dev).unwrap();
    // A cache with spare capacity, narrowed to the used slots: strided like the real one.
    let kc = Tensor::randn(0f32, 1.0, (b, h, cap, d), &dev).unwrap();
    let vc = Tensor::randn(0f32, 1.0, (b, h, cap, d), &dev).unwrap();
    let (k, v) = (kc.narrow(2, 0, l).unwrap(), vc.narrow(2, 0, l).unwrap());
    let masked = |i: usize, m: usize| if (i * 7).is_multiple_of(m) { MASKED } else { 0.0 };
    let mk = |m: Vec<f32>, heads: usize| Tensor::from_vec(m, (b, heads, t, l), &dev).unwrap();
    let pad: Vec<usize> = (0..b).map(|bi| (bi * 3).min(l - t)).collect();
    let mut hidden_row = causal(b, t, l, &c.lens, &pad, Some(5));
    hidden_row[(b - 1) * t * l..((b - 1) * t + 1) * l].fill(MASKED);
    let masks = [
        ("none", None),
        ("shared", Some(mk((0..b * t * l).map(|i| masked(i, 5)).collect(), 1))),
        ("per head", Some(mk((0..b * h * t * l).map(|i| masked(i, 3)).collect(), h))),
        ("causal", Some(mk(causal(b, t, l, &c.lens, &pad, None), 1))),
        ("causal window 50", Some(mk(causal(b, t, l, &c.lens, &pad, Some(50)), 1))),
        ("a hidden row", Some(mk(hidden_row, 1))),
    ];
    let scale = 1.0 / (d as f64).sqrt();
    // Short blocks run either kernel (prompt pieces always run tiled).
    let kernels: &[Kernel] = if t <= SPLIT_MAX_T { &[Kernel::Split, Kernel::Tiled] } else { &[Kernel::Tiled] };
    for ((name, mask), &kernel) in masks.iter().flat_map(|m| kernels.iter().map(move |k| (m, k))) {
        let (want, probs) = reference(&q, &k, &v, mask.as_ref(), scale, t);
        let (got, mass) = fused_attention(&q, &k, &v, mask.as_ref(), scale as f32, t, kernel, Some(&c.lens)).unwrap();
        let e = max_diff(&want, &got);
        assert!(e < 2e-5, "{kernel:?} b{b} h{h} g{g} t{t} d{d} l{l} mask {name}: output off by {e}");
        let (plain, none) = fused_attention(&q, &k, &v, mask.as_ref(), scale as f32, t, kernel, None).unwrap();
        assert!(none.is_none());
        assert_eq!(max_diff(&plain, &got), 0.0, "asking for the mass changed the output");
        // Mass: probabilities of each row's real queries, summed per query head.
        let valid: Vec<f32> = (0..b * t).map(|i| if i % t < c.lens[i / t] { 1.0 } else { 0.0 }).collect();
        let valid = Tensor::from_vec(valid, (b, 1, 1, t, 1), &dev).unwrap();
        let want_mass = probs.reshape((b, h, g, t, l)).unwrap().broadcast_mul(&valid).unwrap().sum(3).unwrap();
        let want_mass = want_mass.reshape((b, h * g, l)).unwrap();
        let e = rel_diff(&mass.unwrap(), &want_mass);
        assert!(e < 1e-5, "{kernel:?} b{b} h{h} g{g} t{t} d{d} l{l} mask {name}: mass off by {e} (relative)");
    }
}

#[test]
fn split_kernel_one_chunk_matches_plain_attention() {
    check(&Case { b: 3, h: 2, g: 3, t: 2, d: 16, l: 13, lens: vec![2, 1, 0] });
}

#[test]
fn split_kernel_decode_over_several_chunks_matches_plain_attention() {
    // L = 700: chunks of 256, 256 and 188.
    check(&Case { b: 2, h: 3, g: 3, t: 1, d: 64, l: 700, lens: vec![1, 0] });
}

#[test]
fn split_kernel_longest_block_matches_plain_attention() {
    check(&Case { b: 2, h: 1, g: 4, t: SPLIT_MAX_T, d: 12, l: 300, lens: vec![16, 9] });
}

#[test]
fn tiled_kernel_just_past_the_split_matches_plain_attention() {
    check(&Case { b: 2, h: 2, g: 3, t: SPLIT_MAX_T + 1, d: 64, l: 150, lens: vec![17, 5] });
}

#[test]
fn tiled_kernel_several_query_and_key_tiles_match_plain_attention() {
    // Query tiles of 64, 64 and 12 columns, key tiles of 64, 64, 64 and 8: the causal and
    // windowed masks hide whole tiles.
    check(&Case { b: 2, h: 3, g: 3, t: 140, d: 64, l: 200, lens: vec![140, 77] });
}

#[test]
fn tiled_kernel_with_mha_and_odd_head_size_matches_plain_attention() {
    check(&Case { b: 1, h: 2, g: 1, t: 33, d: 12, l: 97, lens: vec![30] });
}

#[test]
fn split_kernel_gives_the_same_result_for_slots_in_any_order() {
    // What lets a bounded cache (slots in arrival order) match a sorted oracle: permuted slots
    // (over chunks and vector tails, some hidden) give the same output and mass.
    let dev = Device::Cpu;
    let (b, h, g, t, d, l) = (1, 2, 3, 2, 64, 601);
    let q = Tensor::randn(0f32, 1.0, (b, h, g * t, d), &dev).unwrap();
    let k = Tensor::randn(0f32, 1.0, (b, h, l, d), &dev).unwrap();
    let v = Tensor::randn(0f32, 1.0, (b, h, l, d), &dev).unwrap();
    let mask: Vec<f32> = (0..t * l).map(|i| if i % 11 == 3 { MASKED } else { 0.0 }).collect();
    let perm: Vec<u32> = (0..l as u32).map(|i| (i * 37 + 11) % l as u32).collect();
    let permuted: Vec<f32> = (0..t * l).map(|i| mask[(i / l) * l + perm[i % l] as usize]).collect();
    let (mask, permuted) =
        (Tensor::from_vec(mask, (b, 1, t, l), &dev).unwrap(), Tensor::from_vec(permuted, (b, 1, t, l), &dev).unwrap());
    let idx = Tensor::from_vec(perm, l, &dev).unwrap();
    let (kp, vp) = (k.index_select(&idx, 2).unwrap(), v.index_select(&idx, 2).unwrap());
    let (a, ma) = fused_attention(&q, &k, &v, Some(&mask), 0.125, t, Kernel::Split, Some(&[2])).unwrap();
    let (p, mp) = fused_attention(&q, &kp, &vp, Some(&permuted), 0.125, t, Kernel::Split, Some(&[2])).unwrap();
    let e = max_diff(&a, &p);
    assert!(e < 1e-6, "slot order changed the output by {e}");
    let e = max_diff(&ma.unwrap().index_select(&idx, 2).unwrap(), &mp.unwrap());
    assert_eq!(e, 0.0, "slot order changed the mass by {e}");
}

#[test]
fn tiled_kernel_gives_a_query_the_same_bits_however_its_block_is_cut() {
    // What makes a prefix cache exact: the last T queries of a causal prompt over L keys, attended
    // in one block or as pieces (each over the keys up to its own end, as a cache holds them),
    // give every query the same result to the last bit, windowed or not, one row or a tile's worth.
    let dev = Device::Cpu;
    let (h, g, d, l, t) = (2, 3, 64, 300, 150);
    let k = Tensor::randn(0f32, 1.0, (1, h, l, d), &dev).unwrap();
    let v = Tensor::randn(0f32, 1.0, (1, h, l, d), &dev).unwrap();
    let q = Tensor::randn(0f32, 1.0, (1, h, g, t, d), &dev).unwrap();
    // Query columns c0..c1 of the block, over the keys up to the last of them.
    let run = |c0: usize, c1: usize, window: Option<usize>| -> Tensor {
        let (n, keys) = (c1 - c0, l - t + c1);
        let qs = q.narrow(3, c0, n).unwrap().reshape((1, h, g * n, d)).unwrap();
        let mask = Tensor::from_vec(causal(1, n, keys, &[n], &[0], window), (1, 1, n, keys), &dev).unwrap();
        let (kk, vv) = (k.narrow(2, 0, keys).unwrap(), v.narrow(2, 0, keys).unwrap());
        let (o, _) = fused_attention(&qs, &kk, &vv, Some(&mask), 0.125, n, Kernel::Tiled, None).unwrap();
        o.reshape((1, h, g, n, d)).unwrap()
    };
    for window in [None, Some(70)] {
        let whole = run(0, t, window);
        for cuts in [vec![0, 1, t], vec![0, 99, 100, t], vec![0, 64, 65, 130, t], vec![0, 17, t]] {
            let parts: Vec<Tensor> = cuts.windows(2).map(|c| run(c[0], c[1], window)).collect();
            let cut = Tensor::cat(&parts, 3).unwrap();
            assert_eq!(max_diff(&whole, &cut), 0.0, "cut at {cuts:?}, window {window:?}");
        }
    }
}
