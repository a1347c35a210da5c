//! Streaming safetensors output: the header is computed from shapes and dtypes up front, then
//! tensors are written one at a time (never the whole model in memory), split into shards with
//! an HF `model.safetensors.index.json` when larger than the shard size. Every file goes through
//! a temporary name and is renamed into place when complete.

use crate::error::{Error, Result};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// What will be written: name, dtype, shape (in output order).
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl PlannedTensor {
    fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()
    }
}

fn st_dtype(d: DType) -> Result<&'static str> {
    Ok(match d {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::U8 => "U8",
        DType::U32 => "U32",
        DType::I64 => "I64",
        DType::F64 => "F64",
        other => return Err(Error::Unsupported(format!("cannot write {other:?} to safetensors"))),
    })
}

/// Writes the planned tensors into `dir`, asking `produce(i)` for tensor i in order.
/// `metadata` goes into every shard's `__metadata__`.
pub fn write_sharded(
    dir: &Path,
    plan: &[PlannedTensor],
    shard_bytes: usize,
    metadata: &BTreeMap<String, String>,
    mut produce: impl FnMut(usize) -> Result<Tensor>,
) -> Result<Vec<PathBuf>> {
    write_sharded_with(dir, plan, shard_bytes, metadata, |i, w| {
        let t = &plan[i];
        let x = produce(i)?;
        if x.dims() != t.shape.as_slice() || x.dtype() != t.dtype {
            return Err(Error::BadTensor {
                path: dir.to_path_buf(),
                tensor: t.name.clone(),
                what: format!("produced {:?} {:?}, planned {:?} {:?}", x.dtype(), x.dims(), t.dtype, t.shape),
            });
        }
        let bytes = tensor_bytes(&x)?;
        w.write_all(&bytes).map_err(|e| Error::io(dir, e))?;
        Ok(bytes.len())
    })
}

/// Like [`write_sharded`], but `produce(i, out)` writes tensor i's little-endian bytes itself and
/// returns how many it wrote (checked against the plan): no intermediate copy of the tensor.
pub fn write_sharded_with(
    dir: &Path,
    plan: &[PlannedTensor],
    shard_bytes: usize,
    metadata: &BTreeMap<String, String>,
    mut produce: impl FnMut(usize, &mut dyn Write) -> Result<usize>,
) -> Result<Vec<PathBuf>> {
    // Group consecutive tensors into shards.
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut size = 0;
    for (i, t) in plan.iter().enumerate() {
        if size > 0 && size + t.bytes() > shard_bytes {
            shards.push(vec![]);
            size = 0;
        }
        shards.last_mut().map(|s| s.push(i));
        size += t.bytes();
    }
    let n = shards.len();
    let names: Vec<String> = (0..n)
        .map(|i| {
            if n == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
            }
        })
        .collect();
    let mut weight_map = BTreeMap::new();
    let mut written = vec![];
    for (si, members) in shards.iter().enumerate() {
        let mut header = serde_json::Map::new();
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).map_err(|e| Error::Unsupported(e.to_string()))?,
        );
        let mut off = 0;
        for &i in members {
            let t = &plan[i];
            header.insert(
                t.name.clone(),
                serde_json::json!({ "dtype": st_dtype(t.dtype)?, "shape": t.shape, "data_offsets": [off, off + t.bytes()] }),
            );
            off += t.bytes();
            weight_map.insert(t.name.clone(), names[si].clone());
        }
        let mut h = serde_json::to_vec(&header).map_err(|e| Error::Unsupported(e.to_string()))?;
        while h.len() % 8 != 0 {
            h.push(b' ');
        }
        let path = dir.join(&names[si]);
        crate::atomic::write_with(&path, |w| {
            w.write_all(&(h.len() as u64).to_le_bytes()).map_err(|e| Error::io(&path, e))?;
            w.write_all(&h).map_err(|e| Error::io(&path, e))?;
            for &i in members {
                let t = &plan[i];
                let n = produce(i, w)?;
                if n != t.bytes() {
                    return Err(Error::BadTensor {
                        path: path.clone(),
                        tensor: t.name.clone(),
                        what: format!("produced {n} bytes, planned {} ({:?} {:?})", t.bytes(), t.dtype, t.shape),
                    });
                }
            }
            Ok(())
        })?;
        written.push(path);
    }
    if n > 1 {
        let total: usize = plan.iter().map(PlannedTensor::bytes).sum();
        let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        let p = dir.join("model.safetensors.index.json");
        crate::atomic::write_bytes(&p, serde_json::to_string_pretty(&index).unwrap_or_default().as_bytes())?;
        written.push(p);
    }
    Ok(written)
}

/// Little-endian bytes of a tensor's elements.
fn tensor_bytes(x: &Tensor) -> Result<Vec<u8>> {
    let x = x.flatten_all()?;
    Ok(match x.dtype() {
        DType::F32 => x.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => x.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::BF16 => x.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::U8 => x.to_vec1::<u8>()?,
        DType::U32 => x.to_vec1::<u32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::I64 => x.to_vec1::<i64>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F64 => x.to_vec1::<f64>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        other => return Err(Error::Unsupported(format!("cannot write {other:?} to safetensors"))),
    })
}
