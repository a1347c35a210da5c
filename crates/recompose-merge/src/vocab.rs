//! `tokenizer_source`: the merged model's vocabulary (the base's, one model's, or the union of all)
//! and, per input model, where each output token's embedding row comes from — so embeddings are
//! merged token by token, not row by row. The rules are mergekit's: a token only one model knows
//! takes that model's row, a token the base knows takes the base's row in models that lack it, a
//! token nobody knows is zero, others average over the models that have it.

use crate::config::TokenizerSource;
use crate::error::{Error, Result};
use crate::store::Store;
use std::collections::HashMap;

pub struct Vocab {
    /// Output tokens by id.
    pub tokens: Vec<String>,
    /// `tokenizer.json` of the output.
    pub tokenizer_json: String,
    /// Model whose tokenizer_config.json the output starts from.
    pub config_from: usize,
    /// Per model: output id -> row in that model's embedding (-1: absent).
    pub perms: Vec<Vec<i64>>,
    pub base: Option<usize>,
}

fn vocab_of(s: &Store) -> Result<Vec<String>> {
    let tok = s.tokenizer()?.ok_or_else(|| Error::Mismatch(format!("{}: no tokenizer", s.label)))?;
    let rows = s.config().map_or(tok.vocab_size(), |c| c.vocab_size);
    Ok((0..rows.min(tok.vocab_size()) as u32).map(|i| tok.id_to_token(i).unwrap_or_default()).collect())
}

impl Vocab {
    pub fn build(
        models: &[Store],
        reference: usize,
        base: Option<usize>,
        source: &TokenizerSource,
    ) -> Result<Option<Self>> {
        let from = match source {
            TokenizerSource::Copy => return Ok(None),
            TokenizerSource::Base | TokenizerSource::Union => reference,
            TokenizerSource::Model(m) => models.iter().position(|s| &s.label == m).unwrap_or(reference),
        };
        let vocabs: Vec<Vec<String>> = models.iter().map(vocab_of).collect::<Result<_>>()?;
        let tok = models[from]
            .tokenizer()?
            .ok_or_else(|| Error::Mismatch(format!("{}: no tokenizer", models[from].label)))?;
        let mut tokens = vocabs[from].clone();
        let mut json: serde_json::Value = serde_json::from_str(&tok.hf_json()?)
            .map_err(|e| Error::Mismatch(format!("{}: tokenizer.json: {e}", models[from].label)))?;
        if *source == TokenizerSource::Union {
            let mut seen: std::collections::HashSet<String> = tokens.iter().cloned().collect();
            let mut added = vec![];
            for v in &vocabs {
                for t in v {
                    if seen.insert(t.clone()) {
                        added.push(t.clone());
                    }
                }
            }
            let list = json.get_mut("added_tokens").and_then(|a| a.as_array_mut()).ok_or_else(|| {
                Error::Mismatch(format!("{}: tokenizer.json has no added_tokens list", models[from].label))
            })?;
            for t in added {
                list.push(serde_json::json!({"id": tokens.len(), "content": t, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": false}));
                tokens.push(t);
            }
        }
        let perms = vocabs
            .iter()
            .map(|v| {
                let index: HashMap<&str, i64> = v.iter().enumerate().map(|(i, t)| (t.as_str(), i as i64)).collect();
                tokens.iter().map(|t| index.get(t.as_str()).copied().unwrap_or(-1)).collect()
            })
            .collect();
        let tokenizer_json = serde_json::to_string(&json).unwrap_or_default();
        Ok(Some(Self { tokens, tokenizer_json, config_from: from, perms, base }))
    }

    /// Rearranges each model's embedding rows (`inputs[i]` belongs to `models[i]`) into the output
    /// vocabulary. `cols` is the embedding width.
    pub fn permute(&self, models: &[usize], inputs: &[Vec<f32>], cols: usize) -> Vec<Vec<f32>> {
        let n = self.tokens.len();
        let row = |m: usize, x: &[f32], id: usize| -> Option<Vec<f32>> {
            let r = self.perms[m][id];
            (r >= 0 && (r as usize + 1) * cols <= x.len())
                .then(|| x[r as usize * cols..(r as usize + 1) * cols].to_vec())
        };
        // The models taking part: those with this tensor, plus the base.
        let mut part: Vec<usize> = models.to_vec();
        if let Some(b) = self.base {
            if !part.contains(&b) {
                part.push(b);
            }
        }
        let mut out: Vec<Vec<f32>> = vec![vec![0.0; n * cols]; models.len()];
        for id in 0..n {
            let have: Vec<usize> = part.iter().copied().filter(|m| self.perms[*m][id] >= 0).collect();
            let fallback = || -> Vec<f32> {
                let donor_row = |m: usize| models.iter().position(|x| *x == m).and_then(|i| row(m, &inputs[i], id));
                if have.len() == 1 {
                    donor_row(have[0]).unwrap_or_else(|| vec![0.0; cols])
                } else if have.is_empty() {
                    vec![0.0; cols]
                } else if let Some(b) = self.base.filter(|b| have.contains(b)) {
                    donor_row(b).unwrap_or_else(|| vec![0.0; cols])
                } else {
                    let rows: Vec<Vec<f32>> = have.iter().filter_map(|m| donor_row(*m)).collect();
                    let mut avg = vec![0.0f32; cols];
                    for r in &rows {
                        avg.iter_mut().zip(r).for_each(|(a, v)| *a += v);
                    }
                    let k = rows.len().max(1) as f32;
                    avg.iter_mut().for_each(|a| *a /= k);
                    avg
                }
            };
            for (i, &m) in models.iter().enumerate() {
                let r = row(m, &inputs[i], id).unwrap_or_else(fallback);
                out[i][id * cols..(id + 1) * cols].copy_from_slice(&r);
            }
        }
        out
    }
}
