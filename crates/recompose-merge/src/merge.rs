//! `recompose merge`: plan, then stream every output tensor from its inputs to disk.

use crate::config::{MergeConfig, TokenizerSource};
use crate::error::{Error, Result};
use crate::output::{self, Format, Output, TextFiles};
use crate::plan::Plan;
use crate::store::{parse_dtype, Store};
use crate::vocab::Vocab;
use candle_core::DType;
use recompose_core::convert;
use std::collections::BTreeMap;
use std::path::Path;

pub struct MergeOptions {
    pub format: Format,
    pub seed: u64,
    pub shard_bytes: usize,
    pub budget_bytes: usize,
}

impl Default for MergeOptions {
    fn default() -> Self {
        Self { format: Format::Safetensors, seed: 0, shard_bytes: 5_000_000_000, budget_bytes: 256 << 20 }
    }
}

/// What was written, for the summary line.
pub struct MergeSummary {
    pub tensors: usize,
    pub layers: usize,
    pub vocab: Option<usize>,
    pub warnings: Vec<String>,
}

/// Tokenizer files of the model at `dir` (HF) or generated from its tokenizer (GGUF).
pub fn tokenizer_files(store: &Store) -> Result<TextFiles> {
    let mut files = vec![];
    if let Some(dir) = store.hf_dir() {
        for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"] {
            if let Ok(text) = std::fs::read_to_string(dir.join(f)) {
                files.push((f.to_string(), text));
            }
        }
        return Ok(files);
    }
    if let Some(tok) = store.tokenizer()? {
        files.push(("tokenizer.json".into(), tok.hf_json()?));
        files.push(("tokenizer_config.json".into(), convert::tokenizer_config_json(tok)));
    }
    Ok(files)
}

/// config.json for an output derived from `store` with `layers` layers and `vocab` rows.
pub fn output_config_json(store: &Store, layers: usize, vocab: usize, dt: DType, untie: bool) -> Result<String> {
    let cfg = store.config().ok_or_else(|| Error::Mismatch(format!("{}: not a language model", store.label)))?;
    let text = match store.hf_dir() {
        Some(dir) => std::fs::read_to_string(dir.join("config.json"))
            .map_err(|e| Error::Mismatch(format!("{}: {e}", dir.display())))?,
        None => {
            let tok = store.tokenizer()?.ok_or_else(|| Error::Mismatch(format!("{}: no tokenizer", store.label)))?;
            convert::hf_config_json(cfg, tok, dt)
        }
    };
    let mut v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::Mismatch(format!("{}: config.json: {e}", store.label)))?;
    if let Some(o) = v.as_object_mut() {
        if layers != cfg.num_layers {
            o.remove("layer_types");
        }
        o.insert("num_hidden_layers".into(), layers.into());
        o.insert("vocab_size".into(), vocab.into());
        let name = match dt {
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            _ => "float32",
        };
        o.insert("torch_dtype".into(), name.into());
        if untie {
            o.insert("tie_word_embeddings".into(), false.into());
        }
    }
    Ok(serde_json::to_string_pretty(&v).unwrap_or_default())
}

fn tensor_seed(seed: u64, name: &str) -> u64 {
    // FNV-1a: stable across runs and platforms (std's hasher is not guaranteed to be).
    let mut h: u64 = 0xcbf29ce484222325 ^ seed;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Runs the merge `cfg` into `target`.
pub fn merge(
    cfg: &MergeConfig,
    target: &Path,
    opts: &MergeOptions,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<MergeSummary> {
    output::check_target(target)?;
    let mut plan = Plan::build(cfg)?;
    for w in &plan.warnings {
        tracing::warn!("{w}");
    }
    let base = cfg.base_model.as_ref().and_then(|b| plan.models.iter().position(|m| &m.label == b));
    let vocab = Vocab::build(&plan.models, plan.reference, base, &cfg.tokenizer)?;
    if let Some(v) = &vocab {
        for t in plan.tensors.iter_mut().filter(|t| t.is_embed) {
            t.shape[0] = v.tokens.len();
        }
    }
    let refm = &plan.models[plan.reference];
    let first = plan.tensors.first().map(|t| t.sources[0].1.clone()).unwrap_or_default();
    let dtype = match cfg.out_dtype.as_ref().or(cfg.dtype.as_ref()) {
        Some(d) => parse_dtype(d).map_err(Error::Config)?,
        None if refm.is_gguf() => DType::F32,
        None => refm.dtype(&first).unwrap_or(DType::F32),
    };
    let has_head = plan.tensors.iter().any(|t| t.name == "lm_head.weight");
    let out_vocab = plan.tensors.iter().find(|t| t.is_embed && t.name.contains("embed_tokens")).map(|t| t.shape[0]);
    let config = match refm.config() {
        Some(c) => {
            let rows = out_vocab.unwrap_or(c.vocab_size);
            let untie = has_head && c.tie_embeddings;
            let json = output_config_json(refm, plan.num_layers, rows, dtype, untie)?;
            let mut rc = c.clone();
            rc.num_layers = plan.num_layers;
            rc.vocab_size = rows;
            rc.tie_embeddings = rc.tie_embeddings && !has_head;
            Some((json, rc))
        }
        None => None,
    };
    let mut files = match (&vocab, &cfg.tokenizer) {
        (None, TokenizerSource::Copy) if config.is_some() => tokenizer_files(refm)?,
        (None, _) => vec![],
        (Some(v), _) => {
            let mut f = tokenizer_files(&plan.models[v.config_from])?;
            f.retain(|(n, _)| n != "tokenizer.json");
            f.push(("tokenizer.json".into(), v.tokenizer_json.clone()));
            f
        }
    };
    if let Some(tpl) = &cfg.chat_template {
        if !tpl.contains("{{") && !tpl.contains("{%") {
            return Err(Error::Config(format!(
                "chat_template: '{tpl}' is not a Jinja template (named templates are not supported; give the template text)"
            )));
        }
        let entry = files.iter_mut().find(|(n, _)| n == "tokenizer_config.json");
        let mut tc: serde_json::Value =
            entry.as_ref().and_then(|(_, t)| serde_json::from_str(t).ok()).unwrap_or_else(|| serde_json::json!({}));
        tc["chat_template"] = tpl.clone().into();
        let text = serde_json::to_string_pretty(&tc).unwrap_or_default();
        match entry {
            Some((_, t)) => *t = text,
            None => files.push(("tokenizer_config.json".into(), text)),
        }
    }

    let metadata = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("recompose.kind".to_string(), "merge".to_string()),
        ("recompose.method".to_string(), plan.method.name().to_string()),
        ("recompose.config".to_string(), cfg.text.clone()),
        ("recompose.seed".to_string(), opts.seed.to_string()),
        (
            "recompose.inputs".to_string(),
            serde_json::to_string(
                &plan
                    .models
                    .iter()
                    .map(|m| serde_json::json!({"model": m.label, "layout": m.layout_hash()}))
                    .collect::<Vec<_>>(),
            )
            .unwrap_or_default(),
        ),
    ]);
    let shapes: Vec<(String, Vec<usize>)> = plan.tensors.iter().map(|t| (t.name.clone(), t.shape.clone())).collect();
    let cost: Vec<usize> =
        plan.tensors.iter().map(|t| t.shape.iter().product::<usize>() * 4 * (t.sources.len() * 2 + 2)).collect();
    let method = plan.method;
    let compute = |i: usize| -> Result<Vec<f32>> {
        let t = &plan.tensors[i];
        let mut inputs: Vec<Vec<f32>> = Vec::with_capacity(t.sources.len());
        for (m, name) in &t.sources {
            inputs.push(plan.models[*m].load(name)?);
            plan.models[*m].release(name);
        }
        if t.is_embed {
            let cols = t.shape[1];
            if let Some(v) = &vocab {
                let ms: Vec<usize> = t.sources.iter().map(|(m, _)| *m).collect();
                inputs = v.permute(&ms, &inputs, cols);
            } else {
                // Different vocabulary sizes: the common first rows.
                let keep = t.shape.iter().product::<usize>();
                inputs.iter_mut().for_each(|x| x.truncate(keep));
            }
        }
        let job = crate::methods::Job {
            tensor: &t.name,
            shape: &t.shape,
            inputs: inputs.iter().map(Vec::as_slice).collect(),
            base: t.base,
            global: t.global.clone(),
            per: t.per.clone(),
            seed: tensor_seed(opts.seed, &t.name),
        };
        method.merge(&job)
    };
    let out = Output {
        target,
        format: opts.format,
        dtype,
        metadata,
        config,
        files,
        shard_bytes: opts.shard_bytes,
        budget_bytes: opts.budget_bytes,
    };
    output::write(&out, &shapes, &cost, &compute, progress)?;
    Ok(MergeSummary { tensors: shapes.len(), layers: plan.num_layers, vocab: out_vocab, warnings: plan.warnings })
}
