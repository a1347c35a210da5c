//! Passkey retrieval: a five-digit key hidden at a given depth of a long filler text, then asked
//! for at the end. The answer is read greedily (a few tokens) with the KV policy active; a trial
//! counts when the key's digits appear in it. Filler offsets and keys come from a fixed seed.

use crate::error::{Error, Result};
use recompose_core::Tokenizer;
use recompose_kv::KvSpec;
use recompose_llm::generate::{generate, GenerateOptions};
use recompose_llm::Model;
use serde::Serialize;

#[derive(Debug, Clone)]
pub struct PasskeyOptions {
    /// Prompt lengths in tokens.
    pub lengths: Vec<usize>,
    /// Where the key sits, as fractions of the filler (0.1 = near the start).
    pub depths: Vec<f64>,
    pub trials: usize,
    pub seed: u64,
    pub kv: KvSpec,
}

#[derive(Debug, Clone, Serialize)]
pub struct PasskeyCell {
    pub length: usize,
    pub depth: f64,
    pub correct: usize,
    pub trials: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct PasskeyReport {
    pub kv: String,
    pub cells: Vec<PasskeyCell>,
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
    pub peak_kv_bytes: usize,
}

const INTRO: &str = "There is an important pass key hidden inside a lot of irrelevant text. Find it and \
                     memorize it. I will quiz you about the pass key.\n\n";
const QUESTION: &str = "\n\nWhat is the pass key? The pass key is";

/// splitmix64: a seeded stream without a dependency.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The prompt of one trial and its key: intro, filler with the needle at `depth`, question.
pub fn prompt(tok: &Tokenizer, filler: &[u32], length: usize, depth: f64, seed: u64) -> Result<(Vec<u32>, String)> {
    let key = format!("{}", 10_000 + mix(seed) % 90_000);
    let needle = format!("\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n");
    let intro = tok.encode(INTRO, true)?;
    let needle = tok.encode(&needle, false)?;
    let question = tok.encode(QUESTION, false)?;
    let fixed = intro.len() + needle.len() + question.len();
    if length <= fixed + 16 {
        return Err(Error::Invalid(format!(
            "passkey length {length} leaves no room for filler ({fixed} fixed tokens)"
        )));
    }
    let n = length - fixed;
    if filler.len() < n {
        return Err(Error::Invalid(format!("the filler text has {} tokens, {n} needed", filler.len())));
    }
    let off = (mix(seed ^ 0xF111) as usize) % (filler.len() - n + 1);
    let filler = &filler[off..off + n];
    let cut = ((n as f64) * depth.clamp(0.0, 1.0)).round() as usize;
    let ids = [intro.as_slice(), &filler[..cut], &needle, &filler[cut..], &question].concat();
    Ok((ids, key))
}

/// Runs every (length, depth, trial) with `o.kv`; `progress(done, total)`.
pub fn evaluate(
    model: &Model,
    tok: &Tokenizer,
    filler_text: &str,
    o: &PasskeyOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<PasskeyReport> {
    if o.lengths.is_empty() || o.depths.is_empty() || o.trials == 0 {
        return Err(Error::Invalid("need at least one length, one depth and one trial".into()));
    }
    if let Some(d) = o.depths.iter().find(|d| !(0.0..=1.0).contains(*d)) {
        return Err(Error::Invalid(format!("depth {d} is outside [0, 1]")));
    }
    let filler = tok.encode(filler_text, false)?;
    let gen = GenerateOptions { max_tokens: 8, ..Default::default() };
    let total = o.lengths.len() * o.depths.len() * o.trials;
    let (mut cells, mut done, mut peak) = (vec![], 0, 0);
    for &length in &o.lengths {
        if length + gen.max_tokens > model.config.max_position {
            return Err(
                recompose_llm::Error::ContextOverflow { tokens: length, context: model.config.max_position }.into()
            );
        }
        for &depth in &o.depths {
            let mut correct = 0;
            for trial in 0..o.trials {
                let seed = mix(o.seed ^ mix(length as u64) ^ mix((depth * 1000.0) as u64 + 7) ^ mix(trial as u64 + 99));
                let (ids, key) = prompt(tok, &filler, length, depth, seed)?;
                let layout = model.cache_layout();
                let (g, _) = generate(model, tok, &[ids], &gen, |n| o.kv.build(&layout, &[n]), |_, _| {})?;
                peak = peak.max(g[0].kv_bytes);
                if g[0].text.contains(&key) {
                    correct += 1;
                }
                done += 1;
                progress(done, total);
            }
            cells.push(PasskeyCell { length, depth, correct, trials: o.trials });
        }
    }
    let correct: usize = cells.iter().map(|c| c.correct).sum();
    Ok(PasskeyReport {
        kv: o.kv.to_string(),
        cells,
        correct,
        total,
        accuracy: correct as f64 / total as f64,
        peak_kv_bytes: peak,
    })
}
