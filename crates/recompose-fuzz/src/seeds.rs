//! The binary seeds (tiny GGUF models, safetensors files and their index) and the fixed shards
//! the index target reads, all written with recompose's own writers. The seeds are committed;
//! `recompose-fuzz --write-seeds` regenerates them. Text seeds are written by hand.

use candle_core::quantized::GgmlDType;
use candle_core::DType;
use recompose_core::safetensors_out::{write_sharded_with, PlannedTensor};
use recompose_core::testing::{write_tiny_gguf, TinySpec};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The config.json beside the index target's shards (also one of its seeds).
const TINY_CONFIG: &str = include_str!("../corpus/safetensors_index/config_llama.json");

/// The tensors of the tiny Llama `TINY_CONFIG` describes (HF names), in several dtypes, plus a
/// few more of other widths; `shard_bytes` decides how many files.
fn write_tensors(dir: &Path, shard_bytes: usize) -> recompose_core::Result<Vec<PathBuf>> {
    let layer = |s: &str| format!("model.layers.0.{s}");
    let plan: Vec<PlannedTensor> = [
        ("model.embed_tokens.weight".to_string(), DType::F32, vec![4, 2]),
        (layer("input_layernorm.weight"), DType::BF16, vec![2]),
        (layer("self_attn.q_proj.weight"), DType::F32, vec![2, 2]),
        (layer("self_attn.k_proj.weight"), DType::F16, vec![2, 2]),
        (layer("self_attn.v_proj.weight"), DType::BF16, vec![2, 2]),
        (layer("self_attn.o_proj.weight"), DType::F32, vec![2, 2]),
        (layer("post_attention_layernorm.weight"), DType::F16, vec![2]),
        (layer("mlp.gate_proj.weight"), DType::F32, vec![4, 2]),
        (layer("mlp.up_proj.weight"), DType::F32, vec![4, 2]),
        (layer("mlp.down_proj.weight"), DType::F32, vec![2, 4]),
        ("model.norm.weight".to_string(), DType::F32, vec![2]),
        ("lm_head.weight".to_string(), DType::F64, vec![4, 2]),
        ("extra.mask".to_string(), DType::U8, vec![3]),
        ("extra.ids".to_string(), DType::I64, vec![2]),
        ("extra.empty".to_string(), DType::F32, vec![0, 4]),
    ]
    .into_iter()
    .map(|(name, dtype, shape)| PlannedTensor { name, dtype, shape })
    .collect();
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_sharded_with(dir, &plan, shard_bytes, &meta, |i, w| {
        let n = plan[i].shape.iter().product::<usize>() * plan[i].dtype.size_in_bytes();
        // Small ramps: finite in every dtype, different per tensor.
        let bytes: Vec<u8> = (0..n).map(|j| ((i * 7 + j) % 61) as u8).collect();
        w.write_all(&bytes).map_err(|e| recompose_core::Error::Unsupported(e.to_string()))?;
        Ok(n)
    })
}

/// A tiny model in a few shards, their index and config.json, for the index target.
pub fn write_hf_fixture(dir: &Path) -> std::io::Result<()> {
    write_tensors(dir, 128).map_err(std::io::Error::other)?;
    std::fs::write(dir.join("config.json"), TINY_CONFIG)
}

/// The smallest models `write_tiny_gguf` makes: each architecture, F32 and Q8_0 blocks.
fn tiny_models() -> [(&'static str, TinySpec); 3] {
    let f32 = TinySpec { layers: 1, hidden: 4, heads: 1, kv_heads: 1, ffn: 4, context: 16, ..TinySpec::default() };
    [
        ("llama_f32.gguf", f32.clone()),
        ("gemma3_f32.gguf", TinySpec { arch: "gemma3", ..f32.clone() }),
        ("llama_q8_0.gguf", TinySpec { hidden: 32, heads: 2, ffn: 32, dtype: GgmlDType::Q8_0, ..f32 }),
    ]
}

/// Writes every binary seed under `corpus` (the crate's `corpus/` folder); returns the files.
pub fn write_binary_seeds(corpus: &Path) -> recompose_core::Result<Vec<PathBuf>> {
    let mut out = vec![];
    for (name, spec) in tiny_models() {
        let p = corpus.join("gguf").join(name);
        write_tiny_gguf(&p, &spec)?;
        out.push(p);
    }
    let tmp = tempfile::tempdir().map_err(|e| recompose_core::Error::Unsupported(e.to_string()))?;
    let copy = |from: &Path, to: PathBuf| -> recompose_core::Result<PathBuf> {
        let bytes = std::fs::read(from).map_err(|e| recompose_core::Error::Unsupported(e.to_string()))?;
        recompose_core::atomic::write_bytes(&to, &bytes)?;
        Ok(to)
    };
    let single = tmp.path().join("single");
    for f in write_tensors(&single, usize::MAX)? {
        out.push(copy(&f, corpus.join("safetensors").join("all_dtypes.safetensors"))?);
    }
    let sharded = tmp.path().join("sharded");
    for f in write_tensors(&sharded, 128)? {
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let to = match name.as_str() {
            "model.safetensors.index.json" => corpus.join("safetensors_index").join("index.json"),
            // Shards are seeds for the single-file target too: fewer tensors, other offsets.
            _ => corpus.join("safetensors").join(name),
        };
        out.push(copy(&f, to)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiny models stay small enough to be seeds, and open as models.
    #[test]
    fn binary_seeds_are_small_and_valid() {
        let dir = tempfile::tempdir().unwrap();
        for f in write_binary_seeds(dir.path()).unwrap() {
            let len = std::fs::metadata(&f).unwrap().len();
            assert!(len < 64 << 10, "{}: {len} bytes", f.display());
            if f.extension().is_some_and(|e| e == "gguf") {
                recompose_core::ModelFile::open(&f).unwrap();
            }
        }
        let fixture = tempfile::tempdir().unwrap();
        write_hf_fixture(fixture.path()).unwrap();
        recompose_core::ModelFile::open(fixture.path()).unwrap();
    }
}
