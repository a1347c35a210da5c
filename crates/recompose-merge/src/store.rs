//! A model's tensors as f32 under HF names, from a GGUF file (dequantised on the fly), an HF
//! folder, or a bare safetensors checkpoint (no config: CNNs, for signatures). Tensors are read
//! one at a time from the memory map; nothing else is held.

use crate::error::{Error, Result};
use candle_core::DType;
use recompose_core::convert;
use recompose_core::weights::{HfDir, Source as FileSource};
use recompose_core::{ModelConfig, ModelFile, Tokenizer};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A dtype name as mergekit writes it (`float16`, `bfloat16`, `float32`, and short forms).
pub fn parse_dtype(s: &str) -> std::result::Result<DType, String> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "float32" | "fp32" | "f32" => DType::F32,
        "float16" | "fp16" | "f16" | "half" => DType::F16,
        "bfloat16" | "bf16" => DType::BF16,
        other => return Err(format!("unknown dtype '{other}' (float32, float16, bfloat16)")),
    })
}

enum Inner {
    Model(Box<ModelFile>),
    Tensors(HfDir),
}

pub struct Store {
    /// The name the user gave (path or asset name), used in messages.
    pub label: String,
    pub path: PathBuf,
    inner: Inner,
    /// A LoRA adapter merged on the fly (mergekit's `BASE+ADAPTER` syntax).
    adapter: Option<(recompose_core::peft::Adapter, f32)>,
    names: Vec<String>,
    shapes: HashMap<String, (DType, Vec<usize>)>,
    tokenizer: std::sync::OnceLock<Tokenizer>,
}

fn st_dtype(d: safetensors::Dtype) -> DType {
    match d {
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        safetensors::Dtype::F64 => DType::F64,
        _ => DType::F32,
    }
}

impl Store {
    /// Opens a path, a recompose asset name (`smollm2-135m`) when no such path exists, or
    /// `BASE+ADAPTER` (a model with a PEFT LoRA adapter merged into its weights, as mergekit
    /// writes it).
    pub fn open(label: &str) -> Result<Self> {
        if let Some((base, adapter)) = label.rsplit_once('+') {
            if recompose_core::peft::is_adapter(Path::new(adapter)) {
                let mut store = Self::open(base)?;
                let a = recompose_core::peft::Adapter::open(Path::new(adapter))?;
                store.attach(a, 1.0)?;
                store.label = label.to_owned();
                return Ok(store);
            }
        }
        Self::open_plain(label)
    }

    /// Merges `adapter` (scaled by `scale`) into every tensor read from now on. Refuses an
    /// adapter made for another model: a module this model lacks, another shape, or another
    /// base recorded in the adapter.
    pub fn attach(&mut self, adapter: recompose_core::peft::Adapter, scale: f32) -> Result<()> {
        let bad = |what: String| Error::Mismatch(format!("{}: {what}", adapter.dir.display()));
        if let Some(want) = adapter.metadata.get("recompose.base_layout") {
            if *want != self.layout_hash() {
                return Err(bad(format!(
                    "this adapter was trained on another model ({}), not {}",
                    adapter.metadata.get("recompose.base").map_or("?", |s| s),
                    self.label
                )));
            }
        }
        for (m, (a, b)) in &adapter.factors {
            let name = format!("{m}.weight");
            let want = [b.dims()[0], a.dims()[1]];
            match self.shape(&name) {
                None => return Err(bad(format!("module '{m}' is not in {}", self.label))),
                Some(s) if s != want => {
                    return Err(bad(format!("module '{m}' is {want:?} in the adapter, {s:?} in {}", self.label)))
                }
                _ => {}
            }
        }
        self.adapter = Some((adapter, scale));
        Ok(())
    }

    /// The attached adapter as `PATH:SCALE`, if any.
    pub fn adapter_label(&self) -> Option<String> {
        self.adapter.as_ref().map(|(a, s)| format!("{}:{s}", a.dir.display()))
    }

    fn open_plain(label: &str) -> Result<Self> {
        let mut path = PathBuf::from(label);
        if !path.exists() && recompose_assets::find(label).is_some() {
            path = recompose_assets::resolve_model(label)?;
        }
        if !path.exists() {
            return Err(Error::Mismatch(format!("{label}: no such file or directory")));
        }
        let is_model = path.extension().is_some_and(|e| e == "gguf")
            || (path.is_dir() && path.join("config.json").exists())
            || (path.is_file() && path.parent().is_some_and(|p| p.join("config.json").exists()));
        let (inner, names, shapes) = if is_model {
            let f = ModelFile::open(&path)?;
            let names = match &f.source {
                FileSource::Hf(h) => h.names_in_file_order(),
                FileSource::Gguf(_) => convert::hf_names(&f)?,
            };
            let mut shapes = HashMap::new();
            for n in &names {
                let s = match &f.source {
                    FileSource::Hf(h) => h.dtype_shape(n).map(|(d, s)| (st_dtype(d), s.to_vec())),
                    FileSource::Gguf(g) => recompose_core::names::hf_to_gguf(f.config.arch, n)
                        .and_then(|g_name| g.info(&g_name).map(|i| (DType::F32, i.shape.clone()))),
                };
                shapes.insert(n.clone(), s.unwrap_or((DType::F32, vec![])));
            }
            (Inner::Model(Box::new(f)), names, shapes)
        } else {
            let h = HfDir::open_tensors(&path)?;
            let names = h.names_in_file_order();
            let shapes = names
                .iter()
                .filter_map(|n| h.dtype_shape(n).map(|(d, s)| (n.clone(), (st_dtype(d), s.to_vec()))))
                .collect();
            (Inner::Tensors(h), names, shapes)
        };
        Ok(Self {
            label: label.to_owned(),
            path,
            inner,
            adapter: None,
            names,
            shapes,
            tokenizer: std::sync::OnceLock::new(),
        })
    }

    /// The `__metadata__` of a bare checkpoint (a CNN's own config lives there); empty otherwise.
    pub fn checkpoint_metadata(&self) -> std::collections::BTreeMap<String, String> {
        match &self.inner {
            Inner::Tensors(h) => h.metadata.clone(),
            Inner::Model(_) => Default::default(),
        }
    }

    /// Tensor names in stored order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn has(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.shapes.get(name).map(|(_, s)| s.as_slice())
    }

    /// The stored dtype (GGUF tensors count as f32).
    pub fn dtype(&self, name: &str) -> Option<DType> {
        self.shapes.get(name).map(|(d, _)| *d)
    }

    pub fn config(&self) -> Option<&ModelConfig> {
        match &self.inner {
            Inner::Model(f) => Some(&f.config),
            Inner::Tensors(_) => None,
        }
    }

    pub fn model_file(&self) -> Option<&ModelFile> {
        match &self.inner {
            Inner::Model(f) => Some(f),
            Inner::Tensors(_) => None,
        }
    }

    /// The HF folder this store reads, if it is one (for copying its config and tokenizer files).
    pub fn hf_dir(&self) -> Option<&Path> {
        match &self.inner {
            Inner::Model(f) => match &f.source {
                FileSource::Hf(h) => Some(&h.dir),
                FileSource::Gguf(_) => None,
            },
            Inner::Tensors(_) => None,
        }
    }

    pub fn is_gguf(&self) -> bool {
        matches!(&self.inner, Inner::Model(f) if matches!(f.source, FileSource::Gguf(_)))
    }

    /// The model's tokenizer, built on first use (from GGUF metadata that is not cheap) and kept.
    pub fn tokenizer(&self) -> Result<Option<&Tokenizer>> {
        let Inner::Model(f) = &self.inner else { return Ok(None) };
        if self.tokenizer.get().is_none() {
            let _ = self.tokenizer.set(f.tokenizer()?);
        }
        Ok(self.tokenizer.get())
    }

    /// A tensor as f32 values in HF's convention (with the attached adapter merged in).
    pub fn load(&self, name: &str) -> Result<Vec<f32>> {
        let mut v = self.load_base(name)?;
        if let Some((a, scale)) = &self.adapter {
            if let Some(m) = name.strip_suffix(".weight") {
                if let Some(d) = a.delta(m)? {
                    let d = d.flatten_all()?.to_vec1::<f32>()?;
                    v.iter_mut().zip(d).for_each(|(x, y)| *x += scale * y);
                }
            }
        }
        Ok(v)
    }

    fn load_base(&self, name: &str) -> Result<Vec<f32>> {
        let missing = || Error::Mismatch(format!("{}: missing tensor '{name}'", self.label));
        if !self.has(name) {
            return Err(missing());
        }
        let hf = match &self.inner {
            Inner::Tensors(h) => Some(h),
            Inner::Model(f) => match &f.source {
                FileSource::Hf(h) => Some(h),
                FileSource::Gguf(_) => None,
            },
        };
        if let Some(h) = hf {
            let (dtype, _, bytes) = h.raw(name).ok_or_else(missing)?;
            let bad = |what: &str| Error::Mismatch(format!("{}: tensor '{name}': {what}", self.label));
            return Ok(match dtype {
                safetensors::Dtype::F32 => {
                    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
                }
                safetensors::Dtype::BF16 => {
                    bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
                }
                safetensors::Dtype::F16 => {
                    bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
                }
                safetensors::Dtype::F64 => bytes
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
                    .collect(),
                other => return Err(bad(&format!("dtype {other:?} is not a float type"))),
            });
        }
        let Inner::Model(f) = &self.inner else { return Err(missing()) };
        Ok(convert::hf_value(f, name)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// Lets the pages of a tensor that has been read go (safetensors inputs).
    pub fn release(&self, name: &str) {
        match &self.inner {
            Inner::Tensors(h) => h.release(name),
            Inner::Model(f) => {
                if let FileSource::Hf(h) = &f.source {
                    h.release(name)
                }
            }
        }
    }

    /// A short hash of the names, shapes and values of `names` (all tensors when empty): the
    /// identity recorded in derived artifacts.
    pub fn fingerprint(&self, names: &[String]) -> Result<String> {
        let all;
        let names = if names.is_empty() {
            all = self.names.clone();
            &all
        } else {
            names
        };
        Ok(recompose_core::identity::values_hash(names.iter().map(|n| {
            let v = self.load(n).map_err(|e| recompose_core::Error::Unsupported(e.to_string()))?;
            self.release(n);
            Ok((n.clone(), self.shape(n).unwrap_or(&[]).to_vec(), v))
        }))?)
    }

    /// Identity of the structure alone: architecture and every name and shape.
    pub fn layout_hash(&self) -> String {
        let shapes: Vec<(String, Vec<usize>)> =
            self.names.iter().map(|n| (n.clone(), self.shape(n).unwrap_or(&[]).to_vec())).collect();
        recompose_core::identity::layout_hash(&shapes)
    }
}

/// Numbers the layers of a name: `model.layers.12.mlp.up_proj.weight` -> (12, "mlp.up_proj.weight").
pub fn layer_of(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (idx, suffix) = rest.split_once('.')?;
    Some((idx.parse().ok()?, suffix))
}
