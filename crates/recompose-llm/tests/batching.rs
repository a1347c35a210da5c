//! Batched prefill and decode over rows of different lengths must give each row the logits it
//! gets alone (padding masked, positions per row), for GQA Llama and for Gemma 3's sliding window.

use recompose_core::testing::{write_tiny_gguf, TinySpec};
use recompose_core::weights::ModelFile;
use recompose_llm::kv::KvCache;
use recompose_llm::model::step_for;
use recompose_llm::sample::argmax;
use recompose_llm::{Logits, Model, WeightMode};

fn load(arch: &'static str, mode: WeightMode) -> (tempfile::TempDir, Model) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("tiny.gguf");
    let dtype = if mode == WeightMode::Quantized {
        candle_core::quantized::GgmlDType::Q8_0
    } else {
        candle_core::quantized::GgmlDType::F32
    };
    write_tiny_gguf(&p, &TinySpec { arch, dtype, ..Default::default() }).unwrap();
    let m = Model::load(&ModelFile::open(&p).unwrap(), mode).unwrap();
    (d, m)
}

/// Greedy-decodes `steps` tokens for each row; returns the logits of every step per row.
fn run(model: &Model, rows: &[Vec<u32>], steps: usize) -> Vec<Vec<Vec<f32>>> {
    let mut cache = model.new_cache(rows.len());
    let (t, s) = step_for(rows, &cache, 0);
    let mut logits: Vec<Vec<f32>> = model.forward(&t, &s, &mut cache, Logits::Last).unwrap().to_vec2().unwrap();
    let mut out: Vec<Vec<Vec<f32>>> = logits.iter().map(|l| vec![l.clone()]).collect();
    for _ in 0..steps {
        let next: Vec<Vec<u32>> = logits.iter().map(|l| vec![argmax(l)]).collect();
        let (t, s) = step_for(&next, &cache, 0);
        logits = model.forward(&t, &s, &mut cache, Logits::Last).unwrap().to_vec2().unwrap();
        for (o, l) in out.iter_mut().zip(&logits) {
            o.push(l.clone());
        }
    }
    out
}

fn check(arch: &'static str, mode: WeightMode) {
    let (_d, model) = load(arch, mode);
    let rows: Vec<Vec<u32>> = vec![
        (0..3).map(|i| 40 + i).collect(),
        (0..13).map(|i| 60 + 3 * i).collect(),
        (0..7).map(|i| 100 + i).collect(),
    ];
    let batched = run(&model, &rows, 6);
    for (b, row) in rows.iter().enumerate() {
        let alone = run(&model, std::slice::from_ref(row), 6);
        let d =
            batched[b].iter().flatten().zip(alone[0].iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(d < 1e-4, "{arch} {mode:?}: row {b} differs by {d} when batched");
    }
}

#[test]
fn batched_rows_match_single_rows_llama_gqa() {
    check("llama", WeightMode::F32);
}

#[test]
fn batched_rows_match_single_rows_gemma3_sliding_window() {
    check("gemma3", WeightMode::F32);
}

#[test]
fn batched_rows_match_single_rows_quantized() {
    check("llama", WeightMode::Quantized);
}

#[test]
fn chunked_prefill_equals_one_shot() {
    // Feeding a prompt in pieces through the cache gives the same last logits as all at once.
    let (_d, model) = load("gemma3", WeightMode::F32);
    let ids: Vec<u32> = (0..20).map(|i| 33 + 5 * i).collect();
    let mut c1 = model.new_cache(1);
    let (t, s) = step_for(&[ids.clone()], &c1, 0);
    let one: Vec<f32> = model.forward(&t, &s, &mut c1, Logits::Last).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let mut c2 = model.new_cache(1);
    let mut last: Vec<f32> = vec![];
    for chunk in ids.chunks(6) {
        let (t, s) = step_for(&[chunk.to_vec()], &c2, 0);
        last = model.forward(&t, &s, &mut c2, Logits::Last).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    }
    let d = one.iter().zip(&last).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(d < 1e-4, "chunked prefill differs by {d}");
}

/// Rows with caches of their own (a server's requests): each row prefilled alone, then decoded
/// together in packed steps, rows joining late and leaving early, must match decoding alone.
fn check_rows(arch: &'static str, mode: WeightMode) {
    let (_d, model) = load(arch, mode);
    let rows: Vec<Vec<u32>> = vec![
        (0..3).map(|i| 40 + i).collect(),
        (0..13).map(|i| 60 + 3 * i).collect(),
        (0..7).map(|i| 100 + i).collect(),
    ];
    let alone: Vec<Vec<Vec<f32>>> = rows.iter().map(|r| run(&model, std::slice::from_ref(r), 6).remove(0)).collect();
    // Row 2 joins after two steps; row 0 leaves after four.
    let (join, leave) = ([0usize, 0, 2], [4usize, 6, 6]);
    let mut caches: Vec<_> = rows.iter().map(|_| model.new_cache(1)).collect();
    let mut next: Vec<u32> = vec![0; rows.len()];
    let mut got: Vec<Vec<Vec<f32>>> = vec![vec![]; rows.len()];
    for step in 0..=6 {
        for r in 0..rows.len() {
            if join[r] == step {
                let (t, s) = step_for(std::slice::from_ref(&rows[r]), &caches[r], 0);
                let l: Vec<f32> = model
                    .forward(&t, &s, &mut caches[r], Logits::Last)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                next[r] = argmax(&l);
                got[r].push(l);
            }
        }
        let live: Vec<usize> = (0..rows.len()).filter(|&r| join[r] < step && step <= leave[r]).collect();
        if live.is_empty() {
            continue;
        }
        let toks: Vec<u32> = live.iter().map(|&r| next[r]).collect();
        let start: Vec<usize> = live.iter().map(|&r| caches[r].seq_len(0)).collect();
        let mut refs = live_caches(&mut caches, &live);
        let l: Vec<Vec<f32>> = model
            .forward_packed(&toks, &start, &vec![1; live.len()], &vec![false; live.len()], &mut refs, Logits::Last)
            .unwrap()
            .to_vec2()
            .unwrap();
        for (i, &r) in live.iter().enumerate() {
            next[r] = argmax(&l[i]);
            got[r].push(l[i].clone());
        }
    }
    assert_match_alone(&got, &alone, 3, &format!("{arch} {mode:?}"));
}

/// The caches of the rows in `live`, in order, for one packed step.
fn live_caches<'a>(
    caches: &'a mut [recompose_llm::FullCache],
    live: &[usize],
) -> Vec<&'a mut dyn recompose_llm::kv::KvCache> {
    caches
        .iter_mut()
        .enumerate()
        .filter(|(r, _)| live.contains(r))
        .map(|(_, c)| c as &mut dyn recompose_llm::kv::KvCache)
        .collect()
}

/// Every row produced at least `min` logits, each within 1e-4 of the row's logits alone.
fn assert_match_alone(got: &[Vec<Vec<f32>>], alone: &[Vec<Vec<f32>>], min: usize, what: &str) {
    for (r, g) in got.iter().enumerate() {
        assert!(g.len() >= min, "{what}: row {r} produced {} logits", g.len());
        for (k, l) in g.iter().enumerate() {
            let d = l.iter().zip(&alone[r][k]).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(d < 1e-4, "{what}: row {r} logits {k} differ by {d}");
        }
    }
}

#[test]
fn rows_with_own_caches_match_single_rows_llama() {
    check_rows("llama", WeightMode::F32);
}

#[test]
fn rows_with_own_caches_match_single_rows_gemma3_quantized() {
    check_rows("gemma3", WeightMode::Quantized);
}

/// A packed step mixes prefill chunks and decode tokens of different rows in one forward: each
/// row must get the logits it gets alone, whatever the rows beside it bring.
fn check_mixed(arch: &'static str, mode: WeightMode) {
    let (_d, model) = load(arch, mode);
    let rows: Vec<Vec<u32>> = vec![
        (0..11).map(|i| 40 + i).collect(),
        (0..13).map(|i| 60 + 3 * i).collect(),
        (0..7).map(|i| 100 + i).collect(),
    ];
    let alone: Vec<Vec<Vec<f32>>> = rows.iter().map(|r| run(&model, std::slice::from_ref(r), 4).remove(0)).collect();
    let mut caches: Vec<_> = rows.iter().map(|_| model.new_cache(1)).collect();
    // fed[r]: prompt tokens fed; got[r]: logits after the whole prompt, then per decode token.
    let mut fed = [0usize; 3];
    let mut got: Vec<Vec<Vec<f32>>> = vec![vec![]; 3];
    // Chunks per step and row (0: the row sits the step out): rows finish their prompts at
    // different steps, so later steps mix decode tokens with prefill chunks.
    let plan: [[usize; 3]; 5] = [[4, 13, 0], [4, 1, 3], [3, 1, 4], [1, 1, 1], [1, 1, 1]];
    for chunks in plan {
        let mut toks = vec![];
        let (mut start, mut lens, mut prompt, mut live) = (vec![], vec![], vec![], vec![]);
        for r in 0..3 {
            if chunks[r] == 0 {
                continue;
            }
            let piece: Vec<u32> = if fed[r] < rows[r].len() {
                rows[r][fed[r]..(fed[r] + chunks[r]).min(rows[r].len())].to_vec()
            } else {
                vec![argmax(got[r].last().unwrap())]
            };
            start.push(caches[r].seq_len(0));
            lens.push(piece.len());
            prompt.push(fed[r] < rows[r].len());
            toks.extend(piece);
            live.push(r);
        }
        let mut refs = live_caches(&mut caches, &live);
        let l: Vec<Vec<f32>> =
            model.forward_packed(&toks, &start, &lens, &prompt, &mut refs, Logits::Last).unwrap().to_vec2().unwrap();
        for (i, &r) in live.iter().enumerate() {
            let was_prefilling = fed[r] < rows[r].len();
            fed[r] = (fed[r] + lens[i]).min(rows[r].len());
            if !was_prefilling || fed[r] == rows[r].len() {
                got[r].push(l[i].clone());
            }
        }
    }
    assert_match_alone(&got, &alone, 2, &format!("{arch} {mode:?}, mixed steps"));
}

#[test]
fn mixed_prefill_and_decode_rows_match_single_rows_llama() {
    check_mixed("llama", WeightMode::F32);
}

#[test]
fn mixed_prefill_and_decode_rows_match_single_rows_gemma3_quantized() {
    check_mixed("gemma3", WeightMode::Quantized);
}

/// A prompt fed in pieces (chunked prefill, or the rest after a cached prefix) must leave the
/// same KV as one piece, to the last bit: the logits after it and after every decode step are
/// identical, not merely close (int8 activation rounding turns 1e-7 into a different token).
/// Quantised weights only: f32 weights go through candle's gemm, whose blocking depends on the
/// row count (pieces differ from a whole prompt by ~3e-6 there).
fn check_cut(arch: &'static str, mode: WeightMode) {
    let (_d, model) = load(arch, mode);
    let prompt: Vec<u32> = (0..150).map(|i| 3 + (i * 7) % 200).collect();
    let run = |cuts: &[usize]| -> Vec<Vec<f32>> {
        let mut cache = model.new_cache(1);
        let mut out = vec![];
        let mut last = vec![];
        for c in cuts.windows(2) {
            let piece = &prompt[c[0]..c[1]];
            let mut refs: Vec<&mut dyn KvCache> = vec![&mut cache];
            last = model
                .forward_packed(piece, &[c[0]], &[piece.len()], &[true], &mut refs, Logits::Last)
                .unwrap()
                .to_vec2()
                .unwrap();
        }
        out.push(last[0].clone());
        for _ in 0..3 {
            let next = argmax(out.last().unwrap());
            let pos = cache.seq_len(0);
            let mut refs: Vec<&mut dyn KvCache> = vec![&mut cache];
            let l: Vec<Vec<f32>> = model
                .forward_packed(&[next], &[pos], &[1], &[false], &mut refs, Logits::Last)
                .unwrap()
                .to_vec2()
                .unwrap();
            out.push(l[0].clone());
        }
        out
    };
    let whole = run(&[0, 150]);
    for cuts in [vec![0, 149, 150], vec![0, 1, 150], vec![0, 64, 65, 129, 150], vec![0, 100, 104, 150]] {
        let got = run(&cuts);
        let d = got.iter().flatten().zip(whole.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(got == whole, "{arch} {mode:?}: a prompt cut at {cuts:?} gives other logits than whole (by {d})");
    }
}

#[test]
fn a_prompt_cut_into_pieces_gives_the_same_bits_llama_quantized() {
    check_cut("llama", WeightMode::Quantized);
}

#[test]
fn a_prompt_cut_into_pieces_gives_the_same_bits_gemma3_quantized() {
    check_cut("gemma3", WeightMode::Quantized);
}
