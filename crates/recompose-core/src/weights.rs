//! One model on disk, GGUF file or HF safetensors folder, seen through HF tensor names.
//!
//! The model code asks for tensors by HF name; this module maps names, dequantises, and applies
//! the one format difference that changes a value's meaning (Gemma's RMSNorm weights are `w` in HF
//! and `1 + w` in GGUF: we always hand out the multiplier). Nothing is read until asked for.

use crate::config::{Arch, ModelConfig};
use crate::error::{Error, Result};
use crate::gguf::{GgufFile, MappedTensor};
use crate::names;
use crate::tokenizer::Tokenizer;
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A safetensors folder: config.json, one or more shards, tokenizer files.
pub struct HfDir {
    pub dir: PathBuf,
    shards: Vec<(PathBuf, memmap2::Mmap, usize)>,
    /// tensor name -> (shard, dtype, shape, byte range in the shard)
    index: BTreeMap<String, (usize, safetensors::Dtype, Vec<usize>, (usize, usize))>,
    pub config_json: String,
    /// `__metadata__` of the shards, merged.
    pub metadata: BTreeMap<String, String>,
}

impl HfDir {
    pub fn open(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config_json = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let mut h = Self::open_tensors(dir)?;
        h.config_json = config_json;
        Ok(h)
    }

    /// The tensors of a folder (sharded or not) or of one `.safetensors` file, without a config:
    /// for checkpoints that are not language models (CNNs, task vectors, signatures).
    pub fn open_tensors(path: &Path) -> Result<Self> {
        if path.is_file() {
            let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            return Self::open_shards(&dir, vec![path.to_path_buf()], String::new());
        }
        let dir = path;
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::BadSafetensors { path: index_path.clone(), what: e.to_string() })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::BadSafetensors { path: index_path.clone(), what: "no weight_map".into() })?;
            let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_owned)).collect();
            files.sort();
            files.dedup();
            // A shard is a file of this folder: an index must not point anywhere else on the
            // machine (an absolute path, `..`, a subfolder).
            let plain = |f: &str| {
                let mut c = Path::new(f).components();
                matches!((c.next(), c.next()), (Some(std::path::Component::Normal(_)), None))
            };
            if let Some(f) = files.iter().find(|f| !plain(f)) {
                return Err(Error::BadSafetensors {
                    path: index_path.clone(),
                    what: format!("shard '{f}' is not a file of the model folder (shard names are plain file names)"),
                });
            }
            files.into_iter().map(|f| dir.join(f)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        Self::open_shards(dir, files, String::new())
    }

    fn open_shards(dir: &Path, files: Vec<PathBuf>, config_json: String) -> Result<Self> {
        let mut shards = vec![];
        let mut index = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (si, f) in files.into_iter().enumerate() {
            let file = std::fs::File::open(&f).map_err(|e| Error::io(&f, e))?;
            // SAFETY: read-only map; see gguf.rs.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&f, e))?;
            let (n, meta) = safetensors::SafeTensors::read_metadata(&map)
                .map_err(|e| Error::BadSafetensors { path: f.clone(), what: e.to_string() })?;
            metadata.extend(meta.metadata().clone().unwrap_or_default());
            for (name, info) in meta.tensors() {
                index.insert(name.clone(), (si, info.dtype, info.shape.clone(), info.data_offsets));
            }
            shards.push((f, map, 8 + n));
        }
        Ok(Self { dir: dir.to_path_buf(), shards, index, config_json, metadata })
    }

    /// Bytes of tensor data over all shards (headers aside).
    pub fn data_bytes(&self) -> usize {
        self.index.values().map(|(_, _, _, (a, b))| b - a).sum()
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Tensor names in the order they are stored (shard, then offset): the writer's order, which
    /// for checkpoints saved layer by layer is the network's order.
    pub fn names_in_file_order(&self) -> Vec<String> {
        let mut v: Vec<(&usize, &usize, &String)> = self.index.iter().map(|(n, (s, _, _, (a, _)))| (s, a, n)).collect();
        v.sort();
        v.into_iter().map(|(_, _, n)| n.clone()).collect()
    }

    pub fn dtype_shape(&self, name: &str) -> Option<(safetensors::Dtype, &[usize])> {
        self.index.get(name).map(|(_, d, s, _)| (*d, s.as_slice()))
    }

    /// A tensor's stored bytes (little-endian, in `dtype`), straight from the map.
    pub fn raw(&self, name: &str) -> Option<(safetensors::Dtype, &[usize], &[u8])> {
        let (si, dtype, shape, (a, b)) = self.index.get(name)?;
        let (_, map, base) = &self.shards[*si];
        map.get(base + a..base + b).map(|d| (*dtype, shape.as_slice(), d))
    }

    /// Drops a tensor's pages from this process's memory once it has been read, so streaming
    /// through a model keeps resident memory at about one tensor (the pages are file-backed and
    /// are read again if touched).
    pub fn release(&self, name: &str) {
        let Some((si, _, _, (a, b))) = self.index.get(name) else { return };
        let (_, map, base) = &self.shards[*si];
        let page = 4096;
        let start = (base + a).div_ceil(page) * page;
        let end = ((base + b) / page) * page;
        if end > start {
            // SAFETY: a read-only private file mapping; DONTNEED only drops cached pages, later
            // reads fault them back in from the file.
            let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
        }
    }

    /// A tensor in its stored dtype.
    pub fn load(&self, name: &str) -> Result<Tensor> {
        let (si, dtype, shape, (a, b)) =
            self.index.get(name).ok_or_else(|| Error::MissingTensor { path: self.dir.clone(), tensor: name.into() })?;
        let (path, map, base) = &self.shards[*si];
        let dtype = DType::try_from(*dtype).map_err(|e| Error::BadTensor {
            path: path.clone(),
            tensor: name.into(),
            what: e.to_string(),
        })?;
        let data = &map[base + a..base + b];
        Tensor::from_raw_buffer(data, dtype, shape, &Device::Cpu).map_err(|e| Error::BadTensor {
            path: path.clone(),
            tensor: name.into(),
            what: e.to_string(),
        })
    }
}

pub enum Source {
    Gguf(GgufFile),
    Hf(HfDir),
}

/// A model's weights, config and tokenizer, from either format.
pub struct ModelFile {
    pub source: Source,
    pub config: ModelConfig,
    pub path: PathBuf,
}

/// One row of `inspect`'s tensor table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub bytes: usize,
}

impl ModelFile {
    /// Opens a `.gguf` file, an HF folder, or the folder of a `.safetensors` file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if path.is_dir() {
            return Self::open_hf(path);
        }
        if path.extension().is_some_and(|e| e == "safetensors") {
            let dir = path.parent().unwrap_or(Path::new("."));
            return Self::open_hf(dir);
        }
        if !path.exists() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ));
        }
        let g = GgufFile::open(path)?;
        let config = ModelConfig::from_gguf(&g)?;
        check_shapes(path, &config, false, |name| g.info(name).map(|t| t.shape.as_slice()))?;
        Ok(Self { source: Source::Gguf(g), config, path: path.to_path_buf() })
    }

    fn open_hf(dir: &Path) -> Result<Self> {
        let hf = HfDir::open(dir)?;
        let config = ModelConfig::from_hf_json(&hf.config_json)?;
        check_shapes(dir, &config, true, |g| {
            let name = names::gguf_to_hf(config.arch, g)?;
            hf.index.get(&name).map(|e| e.2.as_slice())
        })?;
        Ok(Self { source: Source::Hf(hf), config, path: dir.to_path_buf() })
    }

    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match &self.source {
            Source::Gguf(g) => Tokenizer::from_gguf(g),
            Source::Hf(h) => Tokenizer::from_hf_dir(&h.dir),
        }
    }

    fn gguf_name(&self, hf: &str) -> Result<String> {
        names::hf_to_gguf(self.config.arch, hf)
            .ok_or_else(|| Error::MissingTensor { path: self.path.clone(), tensor: hf.into() })
    }

    pub fn has(&self, hf: &str) -> bool {
        match &self.source {
            Source::Gguf(g) => names::hf_to_gguf(self.config.arch, hf).is_some_and(|n| g.contains(&n)),
            Source::Hf(h) => h.contains(hf),
        }
    }

    /// A weight as f32, with its expected shape checked. Norm weights come out as multipliers.
    pub fn f32(&self, hf: &str, shape: &[usize]) -> Result<Tensor> {
        let t = match &self.source {
            Source::Gguf(g) => g.dequantize(&self.gguf_name(hf)?)?,
            Source::Hf(h) => {
                let t = h.load(hf)?.to_dtype(DType::F32)?;
                if self.config.arch == Arch::Gemma3 && names::is_norm(hf) {
                    (t + 1.0)?
                } else {
                    t
                }
            }
        };
        if t.dims() != shape {
            return Err(Error::BadTensor {
                path: self.path.clone(),
                tensor: hf.into(),
                what: format!("shape {:?}, expected {:?}", t.dims(), shape),
            });
        }
        Ok(t)
    }

    /// The quantised blocks of a GGUF weight, in place in the map (None for HF folders).
    pub fn quantized(&self, hf: &str) -> Result<Option<MappedTensor>> {
        match &self.source {
            Source::Gguf(g) => Ok(Some(g.mapped(&self.gguf_name(hf)?)?)),
            Source::Hf(_) => Ok(None),
        }
    }

    pub fn tensor_entries(&self) -> Vec<TensorEntry> {
        match &self.source {
            Source::Gguf(g) => g
                .tensors()
                .iter()
                .map(|t| TensorEntry {
                    name: t.name.clone(),
                    dtype: format!("{:?}", t.dtype),
                    shape: t.shape.clone(),
                    bytes: t.size,
                })
                .collect(),
            Source::Hf(h) => h
                .index
                .iter()
                .map(|(n, (_, d, s, (a, b)))| TensorEntry {
                    name: n.clone(),
                    dtype: format!("{d:?}"),
                    shape: s.clone(),
                    bytes: b - a,
                })
                .collect(),
        }
    }
}

/// Checks every block tensor's shape against the config up front, in either format (`shape_of`
/// maps a GGUF name to the file's shape, HF order; errors use HF names when `hf`), so a file that lies fails at open (inspect,
/// convert and load alike) with the tensor named, not deep inside a forward pass or after a
/// conversion has written it.
fn check_shapes<'a>(
    path: &Path,
    c: &ModelConfig,
    hf: bool,
    shape_of: impl Fn(&str) -> Option<&'a [usize]>,
) -> Result<()> {
    let h = c.hidden_size;
    let mut expect: Vec<(String, Vec<usize>)> =
        vec![("token_embd.weight".into(), vec![c.vocab_size, h]), ("output_norm.weight".into(), vec![h])];
    for l in 0..c.num_layers {
        let d = c.dims(l);
        let (i, q, kv) = (d.intermediate, d.heads * c.head_dim, d.kv_heads * c.head_dim);
        let b = |s: &str| format!("blk.{l}.{s}");
        expect.extend([
            (b("attn_norm.weight"), vec![h]),
            (b("attn_q.weight"), vec![q, h]),
            (b("attn_k.weight"), vec![kv, h]),
            (b("attn_v.weight"), vec![kv, h]),
            (b("attn_output.weight"), vec![h, q]),
            (b("ffn_gate.weight"), vec![i, h]),
            (b("ffn_up.weight"), vec![i, h]),
            (b("ffn_down.weight"), vec![h, i]),
            (b("ffn_norm.weight"), vec![h]),
        ]);
    }
    let named = |name: &str| match hf {
        true => names::gguf_to_hf(c.arch, name).unwrap_or_else(|| name.to_string()),
        false => name.to_string(),
    };
    for (name, shape) in expect {
        match shape_of(&name) {
            None => return Err(Error::MissingTensor { path: path.into(), tensor: named(&name) }),
            Some(s) if s != shape.as_slice() => {
                return Err(Error::BadTensor {
                    path: path.into(),
                    tensor: named(&name),
                    what: format!("shape {s:?} does not match the config's {shape:?}"),
                })
            }
            _ => {}
        }
    }
    Ok(())
}
