//! Writing a model tensor by tensor: an HF folder (sharded safetensors + index, config.json,
//! tokenizer files), a bare `.safetensors` checkpoint, or a GGUF file. Tensors are computed in
//! parallel a window at a time, the window sized to a memory budget, and written in order as they
//! finish. Everything is built beside the target and renamed into place when complete.

use crate::error::{Error, Result};
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use recompose_core::convert::{self, OutDType};
use recompose_core::gguf::{write_gguf_streaming, PlannedQ};
use recompose_core::safetensors_out::{self, PlannedTensor};
use recompose_core::{names, ModelConfig, Tokenizer};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// HF folder, or a single file when the target ends in `.safetensors`.
    Safetensors,
    Gguf(OutDType),
}

/// Tokenizer files of an HF output: (file name, contents).
pub type TextFiles = Vec<(String, String)>;

pub struct Output<'a> {
    pub target: &'a Path,
    pub format: Format,
    /// Safetensors element type.
    pub dtype: DType,
    /// `__metadata__` of every shard (GGUF: `recompose.*` keys).
    pub metadata: BTreeMap<String, String>,
    /// config.json text plus the runtime config (GGUF needs it); None for bare checkpoints.
    pub config: Option<(String, ModelConfig)>,
    /// Tokenizer (and other) files written beside the weights.
    pub files: TextFiles,
    pub shard_bytes: usize,
    /// Bytes of tensors computed at once (inputs + result), at least one tensor.
    pub budget_bytes: usize,
}

/// Refuses an existing target before any work is done.
pub fn check_target(target: &Path) -> Result<()> {
    if target.exists() {
        return Err(Error::Mismatch(format!("{}: already exists (refusing to overwrite)", target.display())));
    }
    Ok(())
}

/// Computes tensor `i` (values, in HF's convention) for `plan[i]`; `cost[i]` bytes of memory.
pub fn write(
    out: &Output,
    plan: &[(String, Vec<usize>)],
    cost: &[usize],
    compute: &(dyn Fn(usize) -> Result<Vec<f32>> + Sync),
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<()> {
    check_target(out.target)?;
    let tmp = recompose_core::atomic::scratch_beside(out.target)?;
    let n = plan.len();
    let mut done = 0usize;
    // Window of results computed ahead of the writer.
    let mut ready: HashMap<usize, Vec<f32>> = HashMap::new();
    let mut next = |i: usize| -> Result<Vec<f32>> {
        if let Some(v) = ready.remove(&i) {
            return Ok(v);
        }
        let mut j = i;
        let mut bytes = 0;
        while j < n && (j == i || bytes + cost[j] <= out.budget_bytes) {
            bytes += cost[j];
            j += 1;
        }
        let mut got: Vec<(usize, Result<Vec<f32>>)> = (i..j).into_par_iter().map(|k| (k, compute(k))).collect();
        let mut first = None;
        for (k, r) in got.drain(..) {
            let v = r?;
            let want: usize = plan[k].1.iter().product();
            if v.len() != want {
                return Err(Error::Mismatch(format!("tensor '{}': {} values, expected {want}", plan[k].0, v.len())));
            }
            if k == i {
                first = Some(v);
            } else {
                ready.insert(k, v);
            }
        }
        done = j;
        progress(done, n);
        first.ok_or_else(|| Error::Mismatch("internal: window lost its first tensor".into()))
    };

    match out.format {
        Format::Safetensors => {
            let planned: Vec<PlannedTensor> = plan
                .iter()
                .map(|(name, shape)| PlannedTensor { name: name.clone(), dtype: out.dtype, shape: shape.clone() })
                .collect();
            let single = out.target.extension().is_some_and(|e| e == "safetensors");
            let shard = if single { usize::MAX } else { out.shard_bytes };
            let dtype = out.dtype;
            safetensors_out::write_sharded_with(tmp.path(), &planned, shard, &out.metadata, |i, w| {
                let v = next(i).map_err(|e| recompose_core::Error::Unsupported(e.bare()))?;
                write_values(&v, dtype, w)
                    .map_err(|e| recompose_core::Error::Unsupported(format!("{}: {e}", plan[i].0)))
            })?;
            if single {
                std::fs::rename(tmp.path().join("model.safetensors"), out.target)
                    .map_err(|e| Error::Mismatch(format!("{}: {e}", out.target.display())))?;
                return Ok(());
            }
            if let Some((json, _)) = &out.config {
                recompose_core::atomic::write_bytes(&tmp.path().join("config.json"), json.as_bytes())?;
            }
            for (name, text) in &out.files {
                recompose_core::atomic::write_bytes(&tmp.path().join(name), text.as_bytes())?;
            }
            Ok(recompose_core::atomic::publish_dir(tmp, out.target)?)
        }
        Format::Gguf(q) => {
            let (_, cfg) = out
                .config
                .as_ref()
                .ok_or_else(|| Error::Mismatch("GGUF output needs a language model (config.json)".into()))?;
            // The tokenizer as written for the HF output, read back for its GGUF metadata.
            for (name, text) in &out.files {
                recompose_core::atomic::write_bytes(&tmp.path().join(name), text.as_bytes())?;
            }
            let tok = Tokenizer::from_hf_dir(tmp.path())?;
            let mut meta = convert::gguf_metadata(cfg, &tok)?;
            for (k, v) in out.metadata.iter().filter(|(k, _)| k.starts_with("recompose.")) {
                meta.push((k.clone(), recompose_core::gguf::Value::String(v.clone())));
            }
            let planned: Vec<PlannedQ> = plan
                .iter()
                .map(|(name, shape)| {
                    let gname = names::hf_to_gguf(cfg.arch, name)
                        .ok_or_else(|| Error::Mismatch(format!("tensor '{name}' has no GGUF name")))?;
                    Ok(PlannedQ { name: gname, shape: shape.clone(), dtype: convert::ggml_type_for(q, shape) })
                })
                .collect::<Result<_>>()?;
            write_gguf_streaming(out.target, &meta, &planned, |i| {
                let err = |e: Error| recompose_core::Error::Unsupported(e.bare());
                let t = Tensor::from_vec(next(i).map_err(err)?, plan[i].1.as_slice(), &Device::Cpu)?;
                let t = convert::gguf_value(cfg, &plan[i].0, t)?;
                Ok(QTensor::quantize(&t, planned[i].dtype)?)
            })?;
            Ok(())
        }
    }
}

/// Writes values as little-endian `dtype` through a small buffer (no copy of the whole tensor).
fn write_values(v: &[f32], dtype: DType, w: &mut dyn std::io::Write) -> std::io::Result<usize> {
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
    let mut n = 0;
    for chunk in v.chunks(1 << 14) {
        buf.clear();
        match dtype {
            DType::F16 => chunk.iter().for_each(|x| buf.extend(half::f16::from_f32(*x).to_le_bytes())),
            DType::BF16 => chunk.iter().for_each(|x| buf.extend(half::bf16::from_f32(*x).to_le_bytes())),
            _ => chunk.iter().for_each(|x| buf.extend(x.to_le_bytes())),
        }
        w.write_all(&buf)?;
        n += buf.len();
    }
    Ok(n)
}
