//! Tiny synthetic models for tests: a Llama-shaped GGUF with seeded random weights and a
//! byte-level vocabulary, small enough to build in milliseconds. Used by tests across crates
//! (bad-input handling, cache policies, conversions); never by the product itself.

use crate::error::Result;
use crate::gguf::{write_gguf, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::path::Path;

#[derive(Debug, Clone)]
pub struct TinySpec {
    pub arch: &'static str,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub context: usize,
    pub seed: u64,
    pub dtype: GgmlDType,
    /// The GGUF's chat template (ChatML unless a test needs another).
    pub chat_template: &'static str,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            arch: "llama",
            layers: 2,
            hidden: 64,
            heads: 4,
            kv_heads: 2,
            ffn: 128,
            context: 256,
            seed: 0,
            dtype: GgmlDType::F32,
            chat_template: CHATML,
        }
    }
}

/// GPT-2's reversible byte -> printable character map.
pub fn byte_chars() -> Vec<char> {
    let printable: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut map = vec!['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        if printable.contains(&b) {
            map[b as usize] = char::from_u32(b).unwrap_or('?');
        } else {
            map[b as usize] = char::from_u32(256 + extra).unwrap_or('?');
            extra += 1;
        }
    }
    map
}

/// Deterministic pseudo-random values in [-scale, scale).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// A ChatML template, so chat data and `--chat` work on tiny models.
const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Writes a tiny model as GGUF. Vocabulary: 256 byte tokens plus `<s>` (256) and `</s>` (257).
pub fn write_tiny_gguf(path: &Path, spec: &TinySpec) -> Result<()> {
    let vocab: Vec<String> =
        byte_chars().into_iter().map(String::from).chain(["<s>".to_string(), "</s>".to_string()]).collect();
    let nv = vocab.len();
    let hd = spec.hidden / spec.heads;
    let a = spec.arch;
    let k = |s: &str| format!("{a}.{s}");
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        (k("context_length"), Value::U32(spec.context as u32)),
        (k("embedding_length"), Value::U32(spec.hidden as u32)),
        (k("block_count"), Value::U32(spec.layers as u32)),
        (k("feed_forward_length"), Value::U32(spec.ffn as u32)),
        (k("attention.head_count"), Value::U32(spec.heads as u32)),
        (k("attention.head_count_kv"), Value::U32(spec.kv_heads as u32)),
        (k("rope.dimension_count"), Value::U32(hd as u32)),
        (k("rope.freq_base"), Value::F32(10000.0)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("default".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(vocab.iter().cloned().map(Value::String).collect())),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array((0..nv).map(|i| Value::I32(if i >= 256 { 3 } else { 1 })).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(vec![])),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(256)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(257)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
        ("tokenizer.chat_template".into(), Value::String(spec.chat_template.into())),
    ];
    if a == "gemma3" {
        meta.push((k("attention.key_length"), Value::U32(hd as u32)));
        meta.push((k("attention.sliding_window"), Value::U32(8)));
    }
    let mut seed = spec.seed;
    let mut tensor = |name: String, shape: Vec<usize>, scale: f32, offset: f32| -> Result<(String, QTensor)> {
        seed += 1;
        let n: usize = shape.iter().product();
        let v: Vec<f32> = values(n, seed, scale).into_iter().map(|x| x + offset).collect();
        let t = Tensor::from_vec(v, shape.as_slice(), &Device::Cpu)?;
        let dtype = if shape.len() == 1 { GgmlDType::F32 } else { spec.dtype };
        Ok((name, QTensor::quantize(&t, dtype)?))
    };
    let (h, f) = (spec.hidden, spec.ffn);
    let mut ts = vec![
        tensor("token_embd.weight".into(), vec![nv, h], 0.5, 0.0)?,
        tensor("output_norm.weight".into(), vec![h], 0.1, 1.0)?,
    ];
    for l in 0..spec.layers {
        let b = |s: &str| format!("blk.{l}.{s}");
        ts.push(tensor(b("attn_norm.weight"), vec![h], 0.1, 1.0)?);
        ts.push(tensor(b("attn_q.weight"), vec![spec.heads * hd, h], 0.2, 0.0)?);
        ts.push(tensor(b("attn_k.weight"), vec![spec.kv_heads * hd, h], 0.2, 0.0)?);
        ts.push(tensor(b("attn_v.weight"), vec![spec.kv_heads * hd, h], 0.2, 0.0)?);
        ts.push(tensor(b("attn_output.weight"), vec![h, spec.heads * hd], 0.2, 0.0)?);
        ts.push(tensor(b("ffn_norm.weight"), vec![h], 0.1, 1.0)?);
        ts.push(tensor(b("ffn_gate.weight"), vec![f, h], 0.2, 0.0)?);
        ts.push(tensor(b("ffn_up.weight"), vec![f, h], 0.2, 0.0)?);
        ts.push(tensor(b("ffn_down.weight"), vec![h, f], 0.2, 0.0)?);
        if a == "gemma3" {
            ts.push(tensor(b("attn_q_norm.weight"), vec![hd], 0.1, 1.0)?);
            ts.push(tensor(b("attn_k_norm.weight"), vec![hd], 0.1, 1.0)?);
            ts.push(tensor(b("post_attention_norm.weight"), vec![h], 0.1, 1.0)?);
            ts.push(tensor(b("post_ffw_norm.weight"), vec![h], 0.1, 1.0)?);
        }
    }
    write_gguf(path, &meta, &ts)
}

/// Copies a GGUF model cut to per-layer prefixes: layer `l` keeps its first `dims[l].0` KV heads
/// (with their query-head groups) and its first `dims[l].1` FFN channels; the sizes go into the
/// metadata as per-layer arrays. The reference for elastic (prefix) execution.
pub fn write_prefix_gguf(file: &crate::weights::ModelFile, out: &Path, dims: &[(usize, usize)]) -> Result<()> {
    let crate::weights::Source::Gguf(g) = &file.source else {
        return Err(crate::Error::Unsupported("write_prefix_gguf takes a GGUF model".into()));
    };
    let c = &file.config;
    let group = c.num_heads / c.num_kv_heads;
    let hd = c.head_dim;
    let a = c.arch.gguf_name();
    let mut meta: Vec<(String, Value)> = g.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let arr = |f: &dyn Fn(usize) -> usize| Value::Array((0..c.num_layers).map(|l| Value::U32(f(l) as u32)).collect());
    for (k, v) in [
        // llama.cpp derives the head size from hidden / heads unless told.
        ("attention.key_length", Value::U32(hd as u32)),
        ("attention.value_length", Value::U32(hd as u32)),
        ("feed_forward_length", arr(&|l| dims[l].1)),
        ("attention.head_count", arr(&|l| dims[l].0 * group)),
        ("attention.head_count_kv", arr(&|l| dims[l].0)),
    ] {
        let key = format!("{a}.{k}");
        meta.retain(|(m, _)| *m != key);
        meta.push((key, v));
    }
    let mut ts = vec![];
    for info in g.tensors() {
        let mut t = g.dequantize(&info.name)?;
        if let Some(rest) = info.name.strip_prefix("blk.") {
            let (l, what) = rest.split_once('.').unwrap_or((rest, ""));
            let l: usize = l.parse().map_err(|_| crate::Error::Unsupported(format!("tensor {}", info.name)))?;
            let (kv, ffn) = dims[l];
            t = match what {
                "attn_q.weight" => t.narrow(0, 0, kv * group * hd)?,
                "attn_k.weight" | "attn_v.weight" => t.narrow(0, 0, kv * hd)?,
                "attn_output.weight" => t.narrow(1, 0, kv * group * hd)?,
                "ffn_gate.weight" | "ffn_up.weight" => t.narrow(0, 0, ffn)?,
                "ffn_down.weight" => t.narrow(1, 0, ffn)?,
                _ => t,
            };
        }
        // A fresh tensor: quantize reads the storage from its start, ignoring a narrow's offset.
        let t = Tensor::from_vec(t.flatten_all()?.to_vec1::<f32>()?, t.dims(), &Device::Cpu)?;
        ts.push((info.name.clone(), QTensor::quantize(&t, GgmlDType::F32)?));
    }
    write_gguf(out, &meta, &ts)
}
