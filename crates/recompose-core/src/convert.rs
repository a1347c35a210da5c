//! Format conversion: GGUF <-> HF safetensors folders, with dtype changes. Owns the two value
//! conventions that differ between the formats for the same model: Llama Q/K rows are permuted in
//! GGUF (interleaved RoPE) and Gemma norm weights are stored as `1 + w`. Tensors stream one at a
//! time into safetensors; GGUF output is assembled in memory (candle's writer needs all tensors).

use crate::config::{Arch, ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::gguf::{self, Value};
use crate::names;
use crate::safetensors_out::{self, PlannedTensor};
use crate::weights::{ModelFile, Source};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutDType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4K,
}

impl std::str::FromStr for OutDType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => OutDType::F32,
            "f16" => OutDType::F16,
            "bf16" => OutDType::BF16,
            "q8_0" => OutDType::Q8_0,
            "q4_k" => OutDType::Q4K,
            other => return Err(format!("unknown dtype '{other}' (f32, f16, bf16, q8_0, q4_k)")),
        })
    }
}

/// Reorders Q/K rows between HF (rotate-half) and GGUF (interleaved) layouts.
/// `to_gguf`: rows (h, 2, d/2) -> (h, d/2, 2); otherwise the inverse.
pub fn permute_qk(w: &Tensor, heads: usize, to_gguf: bool) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    if heads == 0 || out % (2 * heads) != 0 {
        return Err(Error::InvalidConfig(format!("cannot split {out} rows into {heads} rotary heads")));
    }
    let half = out / heads / 2;
    let t = if to_gguf { w.reshape((heads, 2, half, inp))? } else { w.reshape((heads, half, 2, inp))? };
    Ok(t.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

/// Rotary heads of a Llama Q or K weight (per layer: pruned models may differ), else None.
pub fn qk_heads(cfg: &ModelConfig, hf: &str) -> Option<usize> {
    if cfg.arch != Arch::Llama {
        return None;
    }
    let layer = hf.strip_prefix("model.layers.")?.split('.').next()?.parse::<usize>().ok()?;
    let d = cfg.dims(layer);
    if hf.ends_with("self_attn.q_proj.weight") || hf.ends_with("self_attn.q_proj.lora_B.weight") {
        Some(d.heads)
    } else if hf.ends_with("self_attn.k_proj.weight") || hf.ends_with("self_attn.k_proj.lora_B.weight") {
        Some(d.kv_heads)
    } else {
        None
    }
}

/// Every tensor of the model under its HF name, in the model's source order.
pub fn hf_names(file: &ModelFile) -> Result<Vec<String>> {
    match &file.source {
        Source::Hf(h) => Ok(h.names().cloned().collect()),
        Source::Gguf(g) => g
            .tensors()
            .iter()
            .map(|t| {
                names::gguf_to_hf(file.config.arch, &t.name).ok_or_else(|| {
                    Error::Unsupported(format!("{}: no HF name for tensor '{}'", g.path().display(), t.name))
                })
            })
            .collect(),
    }
}

/// A tensor in HF's convention (f32), whatever the source format.
pub fn hf_value(file: &ModelFile, hf: &str) -> Result<Tensor> {
    match &file.source {
        Source::Hf(h) => Ok(h.load(hf)?.to_dtype(DType::F32)?),
        Source::Gguf(g) => {
            let gname = names::hf_to_gguf(file.config.arch, hf).unwrap_or_default();
            let mut t = g.dequantize(&gname)?;
            if let Some(h) = qk_heads(&file.config, hf) {
                t = permute_qk(&t, h, false)?;
            }
            if file.config.arch == Arch::Gemma3 && names::is_norm(hf) {
                t = (t - 1.0)?;
            }
            Ok(t)
        }
    }
}

/// A tensor in GGUF's convention (f32) from its HF-convention value.
pub fn gguf_value(cfg: &ModelConfig, hf: &str, t: Tensor) -> Result<Tensor> {
    let mut t = t;
    if let Some(h) = qk_heads(cfg, hf) {
        t = permute_qk(&t, h, true)?;
    }
    if cfg.arch == Arch::Gemma3 && names::is_norm(hf) {
        t = (t + 1.0)?;
    }
    Ok(t)
}

/// Converts `input` (GGUF file or HF folder) to `output` (`*.gguf`, or a folder for HF).
/// Refuses an existing output; nothing is left behind on failure.
pub fn convert(
    input: &Path,
    output: &Path,
    dtype: Option<OutDType>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<()> {
    if output.exists() {
        return Err(Error::Unsupported(format!("{}: already exists (refusing to overwrite)", output.display())));
    }
    let file = ModelFile::open(input)?;
    let to_gguf = output.extension().is_some_and(|e| e == "gguf");
    if to_gguf {
        to_gguf_file(&file, output, dtype.unwrap_or(OutDType::F32), progress)
    } else {
        to_hf_dir(&file, output, dtype.unwrap_or(OutDType::F32), progress)
    }
}

fn to_hf_dir(file: &ModelFile, out: &Path, dtype: OutDType, progress: &mut dyn FnMut(usize, usize)) -> Result<()> {
    let dt = match dtype {
        OutDType::F32 => DType::F32,
        OutDType::F16 => DType::F16,
        OutDType::BF16 => DType::BF16,
        other => {
            return Err(Error::Unsupported(format!(
                "{other:?} is a GGUF type; safetensors output takes f32, f16 or bf16"
            )))
        }
    };
    let tok = file.tokenizer()?;
    let names = hf_names(file)?;
    let plan: Vec<PlannedTensor> = names
        .iter()
        .map(|n| {
            let shape = match &file.source {
                Source::Hf(h) => h.dtype_shape(n).map(|(_, s)| s.to_vec()).unwrap_or_default(),
                Source::Gguf(g) => g
                    .info(&names::hf_to_gguf(file.config.arch, n).unwrap_or_default())
                    .map(|i| i.shape.clone())
                    .unwrap_or_default(),
            };
            PlannedTensor { name: n.clone(), dtype: dt, shape }
        })
        .collect();
    let total = plan.len();
    write_hf_dir(out, &file.config, &tok, &plan, |i| {
        progress(i + 1, total);
        Ok(hf_value(file, &plan[i].name)?.to_dtype(dt)?)
    })
}

/// Writes an HF model folder — sharded safetensors, config.json, tokenizer.json,
/// tokenizer_config.json — built beside `out` and renamed into place when complete.
/// `produce(i)` gives tensor `i` of the plan, in HF's convention and the planned dtype.
pub fn write_hf_dir(
    out: &Path,
    config: &ModelConfig,
    tok: &crate::Tokenizer,
    plan: &[PlannedTensor],
    produce: impl FnMut(usize) -> Result<Tensor>,
) -> Result<()> {
    if out.exists() {
        return Err(Error::Unsupported(format!("{}: already exists (refusing to overwrite)", out.display())));
    }
    let dt = plan.first().map_or(DType::F32, |p| p.dtype);
    let tok_json = tok.hf_json()?;
    let tmp = crate::atomic::scratch_beside(out)?;
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    safetensors_out::write_sharded(tmp.path(), plan, 2 << 30, &meta, produce)?;
    let cfg_json = hf_config_json(config, tok, dt);
    crate::atomic::write_bytes(&tmp.path().join("config.json"), cfg_json.as_bytes())?;
    crate::atomic::write_bytes(&tmp.path().join("tokenizer.json"), tok_json.as_bytes())?;
    crate::atomic::write_bytes(&tmp.path().join("tokenizer_config.json"), tokenizer_config_json(tok).as_bytes())?;
    crate::atomic::publish_dir(tmp, out)
}

/// A weight in HF's convention from the model runtime's: Llama Q/K rows back from GGUF's
/// interleaved rotary order (when the model was read from GGUF), Gemma norms from `1 + w` to `w`.
pub fn hf_from_runtime(cfg: &ModelConfig, hf: &str, t: Tensor) -> Result<Tensor> {
    let mut t = t;
    if cfg.rope_style == crate::config::RopeStyle::Interleaved {
        if let Some(h) = qk_heads(cfg, hf) {
            t = permute_qk(&t, h, false)?;
        }
    }
    if cfg.arch == Arch::Gemma3 && names::is_norm(hf) {
        t = (t - 1.0)?;
    }
    Ok(t)
}

/// HF `tokenizer_config.json` text for a tokenizer: special tokens, BOS policy, chat template.
pub fn tokenizer_config_json(tok: &crate::Tokenizer) -> String {
    let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i));
    let tcfg = serde_json::json!({
        "bos_token": name(tok.bos),
        "eos_token": name(tok.eos.first().copied()),
        "add_bos_token": tok.add_bos,
        "chat_template": tok.chat_template,
    });
    serde_json::to_string_pretty(&tcfg).unwrap_or_default()
}

/// HF `config.json` text for a runtime config.
pub fn hf_config_json(c: &ModelConfig, tok: &crate::Tokenizer, dt: DType) -> String {
    let dtype = match dt {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    };
    // Per-layer sizes (pruned sub-networks) as lists under the scalar keys.
    let per_layer = |f: fn(&crate::config::LayerDims) -> usize, uniform: usize| -> serde_json::Value {
        if c.layer_dims.is_empty() {
            uniform.into()
        } else {
            c.layer_dims.iter().map(f).collect::<Vec<_>>().into()
        }
    };
    let mut v = serde_json::json!({
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": per_layer(|d| d.intermediate, c.intermediate_size),
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": per_layer(|d| d.heads, c.num_heads),
        "num_key_value_heads": per_layer(|d| d.kv_heads, c.num_kv_heads),
        "head_dim": c.head_dim,
        "rms_norm_eps": c.rms_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position,
        "tie_word_embeddings": c.tie_embeddings,
        "torch_dtype": dtype,
        "bos_token_id": tok.bos,
        "eos_token_id": tok.eos.first(),
    });
    if let Some(o) = v.as_object_mut() {
        match c.arch {
            Arch::Llama => {
                o.insert("architectures".into(), serde_json::json!(["LlamaForCausalLM"]));
                o.insert("model_type".into(), "llama".into());
                o.insert("hidden_act".into(), "silu".into());
            }
            Arch::Gemma3 => {
                o.insert("architectures".into(), serde_json::json!(["Gemma3ForCausalLM"]));
                o.insert("model_type".into(), "gemma3_text".into());
                o.insert("hidden_activation".into(), "gelu_pytorch_tanh".into());
                o.insert("query_pre_attn_scalar".into(), (1.0 / (c.attn_scale * c.attn_scale)).round().into());
                o.insert("sliding_window".into(), c.sliding_window.into());
                o.insert("sliding_window_pattern".into(), c.sliding_pattern.into());
                o.insert("rope_local_base_freq".into(), c.rope_theta_local.into());
                let types: Vec<&str> = (0..c.num_layers)
                    .map(|l| if c.is_sliding(l) { "sliding_attention" } else { "full_attention" })
                    .collect();
                o.insert("layer_types".into(), serde_json::json!(types));
            }
        }
        match c.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                o.insert("rope_scaling".into(), serde_json::json!({"rope_type": "linear", "factor": factor}));
            }
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } => {
                o.insert(
                    "rope_scaling".into(),
                    serde_json::json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                        "high_freq_factor": high_freq_factor, "original_max_position_embeddings": original_max_position}),
                );
            }
        }
    }
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

pub fn ggml_type(dtype: OutDType, t: &Tensor) -> GgmlDType {
    ggml_type_for(dtype, t.dims())
}

/// The GGML type a tensor of `shape` gets for the requested output type: 1-D tensors stay f32,
/// rows that do not fill a block fall back to a smaller block or f16, as llama.cpp does.
pub fn ggml_type_for(dtype: OutDType, shape: &[usize]) -> GgmlDType {
    let cols = shape.last().copied().unwrap_or(0);
    if shape.len() < 2 {
        return GgmlDType::F32;
    }
    match dtype {
        OutDType::F32 => GgmlDType::F32,
        OutDType::F16 => GgmlDType::F16,
        OutDType::BF16 => GgmlDType::BF16,
        OutDType::Q8_0 if cols % 32 == 0 => GgmlDType::Q8_0,
        // Q4_K needs rows of 256; llama.cpp falls back to an 8-bit type too.
        OutDType::Q4K if cols % 256 == 0 => GgmlDType::Q4K,
        OutDType::Q4K | OutDType::Q8_0 if cols % 32 == 0 => GgmlDType::Q8_0,
        _ => GgmlDType::F16,
    }
}

fn to_gguf_file(file: &ModelFile, out: &Path, dtype: OutDType, progress: &mut dyn FnMut(usize, usize)) -> Result<()> {
    let cfg = &file.config;
    let metadata = match &file.source {
        Source::Gguf(g) => g
            .metadata
            .iter()
            .filter(|(k, _)| k.as_str() != "general.file_type")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        Source::Hf(_) => gguf_metadata(cfg, &file.tokenizer()?)?,
    };
    if let Source::Gguf(_) = file.source {
        // Copied as it is: a source whose tokenizer does not read is refused, not passed on.
        file.tokenizer()?;
    }
    let names = hf_names(file)?;
    let mut tensors = Vec::with_capacity(names.len());
    for (i, n) in names.iter().enumerate() {
        progress(i + 1, names.len());
        let gname = names::hf_to_gguf(cfg.arch, n)
            .ok_or_else(|| Error::Unsupported(format!("no GGUF name for tensor '{n}'")))?;
        let t = gguf_value(cfg, n, hf_value(file, n)?)?;
        let q = QTensor::quantize(&t, ggml_type(dtype, &t))?;
        tensors.push((gname, q));
    }
    gguf::write_gguf(out, &metadata, &tensors)
}

/// GGUF metadata (hyper-parameters and tokenizer) for a model read from an HF folder.
pub fn gguf_metadata(c: &ModelConfig, tok: &crate::Tokenizer) -> Result<Vec<(String, Value)>> {
    let a = c.arch.gguf_name();
    let k = |s: &str| format!("{a}.{s}");
    // Per-layer sizes (pruned sub-networks) as arrays, llama.cpp's convention.
    let per_layer = |f: fn(&crate::config::LayerDims) -> usize, uniform: usize| -> Value {
        if c.layer_dims.is_empty() {
            Value::U32(uniform as u32)
        } else {
            Value::Array(c.layer_dims.iter().map(|d| Value::U32(f(d) as u32)).collect())
        }
    };
    let mut m: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        (k("context_length"), Value::U32(c.max_position as u32)),
        (k("embedding_length"), Value::U32(c.hidden_size as u32)),
        (k("block_count"), Value::U32(c.num_layers as u32)),
        (k("feed_forward_length"), per_layer(|d| d.intermediate, c.intermediate_size)),
        (k("attention.head_count"), per_layer(|d| d.heads, c.num_heads)),
        (k("attention.head_count_kv"), per_layer(|d| d.kv_heads, c.num_kv_heads)),
        (k("attention.key_length"), Value::U32(c.head_dim as u32)),
        (k("attention.value_length"), Value::U32(c.head_dim as u32)),
        (k("rope.dimension_count"), Value::U32(c.head_dim as u32)),
        (k("rope.freq_base"), Value::F32(c.rope_theta as f32)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(c.rms_eps as f32)),
        (k("vocab_size"), Value::U32(c.vocab_size as u32)),
    ];
    if let Some(w) = c.sliding_window {
        m.push((k("attention.sliding_window"), Value::U32(w as u32)));
    }
    if let RopeScaling::Linear { factor } = c.rope_scaling {
        m.push((k("rope.scaling.type"), Value::String("linear".into())));
        m.push((k("rope.scaling.factor"), Value::F32(factor as f32)));
    }
    m.extend(tok.gguf_metadata()?);
    reads_back(Path::new("the output"), &m, tok.vocab_size())?;
    Ok(m)
}

/// Refuses GGUF metadata whose tokenizer our own reader would reject (`inspect` and every model
/// command would fail on the written file) or read with another vocabulary size.
fn reads_back(out: &Path, meta: &[(String, Value)], vocab: usize) -> Result<()> {
    let map: std::collections::BTreeMap<String, Value> = meta.iter().cloned().collect();
    let back = crate::Tokenizer::from_gguf_metadata(out, &map)
        .map_err(|e| Error::Unsupported(format!("the tokenizer would not read back from GGUF: {e}")))?;
    if back.vocab_size() != vocab {
        return Err(Error::Unsupported(format!(
            "the tokenizer would read back from GGUF with {} tokens, not {vocab}",
            back.vocab_size()
        )));
    }
    Ok(())
}
