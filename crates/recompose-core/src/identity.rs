//! A model's identity for the artifacts derived from it (task vectors, signatures, adapters):
//! a hash of its structure (every tensor name and shape) and a hash of chosen tensors' values in
//! HF's convention, so a GGUF file and its HF conversion are the same model. Recorded in an
//! artifact's metadata and checked when the artifact is applied.

use crate::error::Result;
use crate::weights::{ModelFile, Source};
use sha2::{Digest, Sha256};

fn short(h: Sha256) -> String {
    h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Hash of names, shapes and f32 values, in the order given.
pub fn values_hash(items: impl IntoIterator<Item = Result<(String, Vec<usize>, Vec<f32>)>>) -> Result<String> {
    let mut h = Sha256::new();
    for item in items {
        let (name, shape, values) = item?;
        h.update(name.as_bytes());
        for d in shape {
            h.update((d as u64).to_le_bytes());
        }
        for v in values {
            h.update(v.to_le_bytes());
        }
    }
    Ok(short(h))
}

/// Hash of the structure alone: names (sorted) and shapes.
pub fn layout_hash(names_and_shapes: &[(String, Vec<usize>)]) -> String {
    let mut sorted: Vec<&(String, Vec<usize>)> = names_and_shapes.iter().collect();
    sorted.sort();
    let mut h = Sha256::new();
    for (n, s) in sorted {
        h.update(n.as_bytes());
        for d in s {
            h.update((*d as u64).to_le_bytes());
        }
    }
    short(h)
}

/// Every tensor of a model file with its shape, by HF name.
pub fn shapes(file: &ModelFile) -> Result<Vec<(String, Vec<usize>)>> {
    let names = crate::convert::hf_names(file)?;
    Ok(names
        .into_iter()
        .map(|n| {
            let s = match &file.source {
                Source::Hf(h) => h.dtype_shape(&n).map(|(_, s)| s.to_vec()),
                Source::Gguf(g) => {
                    crate::names::hf_to_gguf(file.config.arch, &n).and_then(|gn| g.info(&gn).map(|i| i.shape.clone()))
                }
            };
            (n, s.unwrap_or_default())
        })
        .collect())
}

/// [`values_hash`] of some tensors of a model file (HF convention, f32).
pub fn fingerprint(file: &ModelFile, names: &[String]) -> Result<String> {
    let shapes = shapes(file)?;
    values_hash(names.iter().map(|n| {
        let shape = shapes.iter().find(|(m, _)| m == n).map(|(_, s)| s.clone()).unwrap_or_default();
        let v = crate::convert::hf_value(file, n)?.flatten_all()?.to_vec1::<f32>()?;
        Ok((n.clone(), shape, v))
    }))
}
