//! Weight deltas on disk — task vectors and robust weight signatures — and patching a model with
//! them. A delta file is safetensors: each tensor either f32, or uniform codes with N levels
//! (linear in the value, or in sign and log-magnitude), packed two to a byte at 16 levels or fewer.
//! `recompose.*` metadata records what it is and which model it came from; patching checks it.
//! Adding and removing use the very same dequantised, scaled values, so a patch followed by its
//! removal gives back the model (checked bit for bit in the tests).

use crate::error::{Error, Result};
use crate::output::{self, Format, Output};
use crate::store::Store;
use candle_core::DType;
use recompose_core::safetensors_out::{self, PlannedTensor};
use recompose_core::weights::HfDir;
use safetensors::tensor::Dtype;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Linear,
    Log,
}

impl std::str::FromStr for Scheme {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "linear" => Ok(Scheme::Linear),
            "log" => Ok(Scheme::Log),
            o => Err(format!("unknown scheme '{o}' (linear, log)")),
        }
    }
}

/// How a quantised tensor is stored: codes under its name (u8), the grid `[lo, step]` under
/// `NAME.__grid` (f32); shape, levels and scheme in the metadata. Linear: value = lo + code * step.
/// Log: magnitude = exp(lo + code * step), codes in the top half negative.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Quant {
    pub shape: Vec<usize>,
    pub levels: u32,
    pub scheme: String,
}

const GRID: &str = ".__grid";

fn code_bytes(n: usize, levels: u32) -> usize {
    if bits(levels) <= 4 {
        n.div_ceil(2)
    } else {
        n
    }
}

fn bits(levels: u32) -> u32 {
    32 - (levels - 1).leading_zeros()
}

/// Quantises `x` to `levels` codes: (packed codes, lo, step).
pub fn quantize(x: &[f32], levels: u32, scheme: Scheme) -> (Vec<u8>, f32, f32) {
    let (codes, lo, step): (Vec<u32>, f32, f32) = match scheme {
        Scheme::Linear => {
            let lo = x.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 0.0) };
            let step = (hi - lo) / (levels - 1) as f32;
            let codes = x
                .iter()
                .map(|v| if step > 0.0 { (((v - lo) / step).round() as u32).min(levels - 1) } else { 0 })
                .collect();
            (codes, lo, step)
        }
        Scheme::Log => {
            let half = levels / 2;
            let logs: Vec<f32> = x.iter().filter(|v| **v != 0.0).map(|v| v.abs().ln()).collect();
            let lo = logs.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = logs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 0.0) };
            let step = if half > 1 { (hi - lo) / (half - 1) as f32 } else { 0.0 };
            let codes = x
                .iter()
                .map(|v| {
                    let m = if *v == 0.0 || step == 0.0 {
                        0
                    } else {
                        (((v.abs().ln() - lo) / step).round().max(0.0) as u32).min(half - 1)
                    };
                    if *v < 0.0 {
                        m + half
                    } else {
                        m
                    }
                })
                .collect();
            (codes, lo, step)
        }
    };
    let packed = if bits(levels) <= 4 {
        codes.chunks(2).map(|c| (c[0] as u8) | ((*c.get(1).unwrap_or(&0) as u8) << 4)).collect()
    } else {
        codes.iter().map(|c| *c as u8).collect()
    };
    (packed, lo, step)
}

pub fn dequantize(bytes: &[u8], q: &Quant, lo: f32, step: f32) -> Vec<f32> {
    let n: usize = q.shape.iter().product();
    let codes: Vec<u32> = if bits(q.levels) <= 4 {
        bytes.iter().flat_map(|b| [(b & 15) as u32, (b >> 4) as u32]).take(n).collect()
    } else {
        bytes.iter().map(|b| *b as u32).take(n).collect()
    };
    match q.scheme.as_str() {
        "log" => {
            let half = q.levels / 2;
            codes
                .iter()
                .map(|&c| {
                    let (m, s) = if c >= half { (c - half, -1.0) } else { (c, 1.0) };
                    s * (lo + m as f32 * step).exp()
                })
                .collect()
        }
        _ => codes.iter().map(|&c| lo + c as f32 * step).collect(),
    }
}

/// A delta to be written: its tensors (name, shape), each stored f32 or quantised. Written one
/// tensor at a time, so extracting from a model never holds more than a tensor or two.
pub struct DeltaPlan {
    levels: Option<(u32, Scheme)>,
    tensors: Vec<(String, Vec<usize>)>,
}

impl DeltaPlan {
    pub fn new(levels: Option<u32>, scheme: Scheme, tensors: Vec<(String, Vec<usize>)>) -> Result<Self> {
        if let Some(l) = levels {
            let min = if scheme == Scheme::Log { 4 } else { 2 };
            if !(min..=256).contains(&l) {
                return Err(Error::Config(format!("--levels {l}: must be between {min} and 256")));
            }
        }
        Ok(Self { levels: levels.map(|l| (l, scheme)), tensors })
    }

    /// What goes into the file: (name, dtype, shape) per stored tensor.
    fn stored(&self) -> Vec<PlannedTensor> {
        let mut out = vec![];
        for (name, shape) in &self.tensors {
            let n: usize = shape.iter().product();
            match self.levels {
                None => out.push(PlannedTensor { name: name.clone(), dtype: DType::F32, shape: shape.clone() }),
                Some((levels, _)) => {
                    out.push(PlannedTensor {
                        name: name.clone(),
                        dtype: DType::U8,
                        shape: vec![code_bytes(n, levels)],
                    });
                    out.push(PlannedTensor { name: format!("{name}{GRID}"), dtype: DType::F32, shape: vec![2] });
                }
            }
        }
        out
    }

    /// Bytes of tensor data (what the delta costs on disk, headers aside).
    pub fn data_bytes(&self) -> usize {
        self.stored().iter().map(|t| t.shape.iter().product::<usize>() * t.dtype.size_in_bytes()).sum()
    }

    /// Writes the delta; `produce(name)` gives a tensor's f32 values.
    pub fn write(
        &self,
        path: &Path,
        mut metadata: BTreeMap<String, String>,
        produce: impl Fn(&str) -> Result<Vec<f32>>,
        progress: &dyn Fn(usize, usize),
    ) -> Result<()> {
        output::check_target(path)?;
        let quant: BTreeMap<&str, Quant> = match self.levels {
            None => BTreeMap::new(),
            Some((levels, scheme)) => self
                .tensors
                .iter()
                .map(|(n, s)| {
                    let scheme = if scheme == Scheme::Log { "log" } else { "linear" };
                    (n.as_str(), Quant { shape: s.clone(), levels, scheme: scheme.into() })
                })
                .collect(),
        };
        metadata.insert("recompose.quant".into(), serde_json::to_string(&quant).unwrap_or_default());
        let stored = self.stored();
        let tmp = recompose_core::atomic::scratch_beside(path)?;
        let core = |e: Error| recompose_core::Error::Unsupported(e.bare());
        let io = |e: std::io::Error| recompose_core::Error::Unsupported(format!("{}: {e}", path.display()));
        // The grid of the tensor just written, for the `.__grid` entry that follows it.
        let mut grid = [0f32; 2];
        let total = stored.len();
        safetensors_out::write_sharded_with(tmp.path(), &stored, usize::MAX, &metadata, |i, w| {
            progress(i + 1, total);
            let t = &stored[i];
            if self.levels.is_some() && t.name.ends_with(GRID) {
                let bytes: Vec<u8> = grid.iter().flat_map(|v| v.to_le_bytes()).collect();
                w.write_all(&bytes).map_err(io)?;
                return Ok(bytes.len());
            }
            let v = produce(&t.name).map_err(core)?;
            match self.levels {
                None => {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    w.write_all(&bytes).map_err(io)?;
                    Ok(bytes.len())
                }
                Some((levels, scheme)) => {
                    let (codes, lo, step) = quantize(&v, levels, scheme);
                    grid = [lo, step];
                    w.write_all(&codes).map_err(io)?;
                    Ok(codes.len())
                }
            }
        })?;
        std::fs::rename(tmp.path().join("model.safetensors"), path)
            .map_err(|e| Error::Artifact(format!("{}: {e}", path.display())))?;
        Ok(())
    }
}

/// A delta read back (tensors through core's memory-mapped safetensors reader).
pub struct Delta {
    pub path: std::path::PathBuf,
    pub metadata: BTreeMap<String, String>,
    /// The patched tensors, in stored order (grids excluded).
    pub names: Vec<String>,
    file: HfDir,
    quant: BTreeMap<String, Quant>,
}

impl Delta {
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |what: String| Error::Artifact(format!("{}: {what}", path.display()));
        if !path.is_file() {
            return Err(bad("no such file".into()));
        }
        let file = HfDir::open_tensors(path).map_err(|e| bad(e.to_string()))?;
        let metadata = file.metadata.clone();
        if !metadata.contains_key("recompose.kind") {
            return Err(bad("no recompose metadata: not a task vector or signature made by recompose".into()));
        }
        let quant: BTreeMap<String, Quant> = serde_json::from_str(metadata.get("recompose.quant").map_or("{}", |s| s))
            .map_err(|e| bad(format!("recompose.quant: {e}")))?;
        let names = file.names_in_file_order().into_iter().filter(|n| !n.ends_with(GRID)).collect();
        Ok(Self { path: path.to_path_buf(), metadata, names, file, quant })
    }

    pub fn kind(&self) -> &str {
        self.metadata.get("recompose.kind").map_or("?", |s| s)
    }

    /// Shape of a tensor of the delta (the shape it patches).
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        if let Some(q) = self.quant.get(name) {
            return Ok(q.shape.clone());
        }
        self.file
            .dtype_shape(name)
            .map(|(_, s)| s.to_vec())
            .ok_or_else(|| Error::Artifact(format!("{}: no tensor '{name}'", self.path.display())))
    }

    pub fn levels(&self) -> Option<u32> {
        self.quant.values().next().map(|q| q.levels)
    }

    pub fn data_bytes(&self) -> usize {
        self.file.data_bytes()
    }

    /// The delta's values for `name`, dequantised.
    pub fn values(&self, name: &str) -> Result<Vec<f32>> {
        let bad = |what: String| Error::Artifact(format!("{}: tensor '{name}': {what}", self.path.display()));
        let (dtype, _, data) = self.file.raw(name).ok_or_else(|| bad("missing".into()))?;
        let floats = |b: &[u8]| -> Vec<f32> {
            b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        };
        match (dtype, self.quant.get(name)) {
            (Dtype::U8, Some(q)) => {
                let need = code_bytes(q.shape.iter().product(), q.levels);
                if data.len() != need {
                    return Err(bad(format!("{} code bytes, expected {need}", data.len())));
                }
                let grid = match self.file.raw(&format!("{name}{GRID}")) {
                    Some((Dtype::F32, _, g)) => floats(g),
                    _ => return Err(bad("no quantisation grid".into())),
                };
                if grid.len() != 2 || q.levels < 2 || q.levels > 256 {
                    return Err(bad("bad quantisation grid".into()));
                }
                Ok(dequantize(data, q, grid[0], grid[1]))
            }
            (Dtype::F32, None) => Ok(floats(data)),
            (d, _) => Err(bad(format!("unexpected dtype {d:?}"))),
        }
    }
}

/// Metadata identifying the model a delta was taken against.
pub fn identity(store: &Store, names: &[String]) -> Result<BTreeMap<String, String>> {
    Ok(BTreeMap::from([
        ("recompose.base".to_string(), store.label.clone()),
        ("recompose.base_layout".to_string(), store.layout_hash()),
        ("recompose.base_fingerprint".to_string(), store.fingerprint(names)?),
    ]))
}

/// Writes `model` + sum(scale_i * delta_i) (or minus, to remove) to `target`.
pub fn patch(
    model: &Store,
    deltas: &[(Delta, f32)],
    remove: bool,
    target: &Path,
    format: Format,
    dtype: Option<DType>,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<Vec<String>> {
    output::check_target(target)?;
    let mut notes = vec![];
    for (d, _) in deltas {
        if d.metadata.get("recompose.base_layout").map(String::as_str) != Some(&model.layout_hash()) {
            // Not the same layout: say which tensor differs.
            for n in &d.names {
                let want = d.shape(n)?;
                match model.shape(n) {
                    None => {
                        return Err(Error::Artifact(format!(
                            "{}: tensor '{n}' is not in {}",
                            d.path.display(),
                            model.label
                        )))
                    }
                    Some(s) if s != want.as_slice() => {
                        return Err(Error::Artifact(format!(
                            "{}: tensor '{n}' has shape {want:?}, {} has {s:?}",
                            d.path.display(),
                            model.label
                        )))
                    }
                    _ => {}
                }
            }
            notes.push(format!(
                "{}: made for a model with another set of tensors ({}); its tensors all fit {}",
                d.path.display(),
                d.metadata.get("recompose.base").map_or("?", |s| s),
                model.label
            ));
        }
    }
    let names: Vec<String> = model.names().to_vec();
    let first = names.first().cloned().unwrap_or_default();
    let dtype =
        dtype.unwrap_or_else(|| if model.is_gguf() { DType::F32 } else { model.dtype(&first).unwrap_or(DType::F32) });
    let plan: Vec<(String, Vec<usize>)> =
        names.iter().map(|n| (n.clone(), model.shape(n).unwrap_or(&[]).to_vec())).collect();
    let cost: Vec<usize> = plan.iter().map(|(_, s)| s.iter().product::<usize>() * 4 * 3).collect();
    let compute = |i: usize| -> Result<Vec<f32>> {
        let name = &names[i];
        let mut x = model.load(name)?;
        model.release(name);
        let mut sum: Option<Vec<f32>> = None;
        for (d, scale) in deltas {
            if !d.names.iter().any(|n| n == name) {
                continue;
            }
            let v = d.values(name)?;
            if v.len() != x.len() {
                return Err(Error::Artifact(format!(
                    "{}: tensor '{name}' has {} values, the model {}",
                    d.path.display(),
                    v.len(),
                    x.len()
                )));
            }
            let acc = sum.get_or_insert_with(|| vec![0.0; x.len()]);
            acc.iter_mut().zip(&v).for_each(|(a, b)| *a += scale * b);
        }
        if let Some(p) = sum {
            if remove {
                x.iter_mut().zip(&p).for_each(|(a, b)| *a -= b);
            } else {
                x.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
            }
        }
        Ok(x)
    };
    let config = match model.config() {
        Some(c) => {
            Some((crate::merge::output_config_json(model, c.num_layers, c.vocab_size, dtype, false)?, c.clone()))
        }
        None => None,
    };
    if config.is_none() && !target.extension().is_some_and(|e| e == "safetensors") {
        return Err(Error::Config(format!(
            "{}: {} is a bare checkpoint; write the result to a .safetensors file",
            target.display(),
            model.label
        )));
    }
    let files = if config.is_some() { crate::merge::tokenizer_files(model)? } else { vec![] };
    let applied: Vec<String> = deltas.iter().map(|(d, s)| format!("{}:{s}", d.path.display())).collect();
    // A bare checkpoint keeps its own metadata (e.g. a vision model's config) under the patch's.
    let mut metadata = model.checkpoint_metadata();
    metadata.extend([
        ("format".to_string(), "pt".to_string()),
        ("recompose.kind".to_string(), if remove { "patch_removed" } else { "patched" }.to_string()),
        ("recompose.model".to_string(), model.label.clone()),
        ("recompose.deltas".to_string(), applied.join(" ")),
    ]);
    if let Some(a) = model.adapter_label() {
        metadata.insert("recompose.lora".to_string(), a);
    }
    let out =
        Output { target, format, dtype, metadata, config, files, shard_bytes: 5_000_000_000, budget_bytes: 256 << 20 };
    output::write(&out, &plan, &cost, &compute, progress)?;
    Ok(notes)
}
