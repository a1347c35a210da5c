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

impl Scheme {
    /// Refuses a number of levels a grid of this scheme cannot have (codes are bytes; log spends
    /// half of them on each sign).
    fn check_levels(self, levels: u32) -> std::result::Result<(), String> {
        let (min, name) = match self {
            Scheme::Linear => (2, "linear"),
            Scheme::Log => (4, "log"),
        };
        if (min..=256).contains(&levels) {
            return Ok(());
        }
        Err(format!("must be between {min} and 256 for a {name} grid"))
    }
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
            scheme.check_levels(l).map_err(|e| Error::Config(format!("--levels {l}: {e}")))?;
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
        let names: Vec<String> = file.names_in_file_order().into_iter().filter(|n| !n.ends_with(GRID)).collect();
        // Every entry of the quantisation table must describe a tensor of the file with a grid
        // the dequantiser knows; an unknown scheme used to be read as linear.
        for (name, q) in &quant {
            let at = |what: String| bad(format!("tensor '{name}': {what}"));
            let scheme: Scheme = q.scheme.parse().map_err(|e: String| at(format!("{e} in recompose.quant")))?;
            scheme.check_levels(q.levels).map_err(|e| at(format!("{} levels: {e}", q.levels)))?;
            if !names.contains(name) {
                return Err(at("listed in recompose.quant but not stored in the file".into()));
            }
        }
        let delta = Self { path: path.to_path_buf(), metadata, names, file, quant };
        // Every value is decoded (and so checked, see `values`) once here, before anything is
        // patched or written: a NaN in a delta would otherwise spread through a whole output.
        for n in &delta.names {
            delta.values(n)?;
            delta.file.release(n);
        }
        Ok(delta)
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

    /// The delta's values for `name`, dequantised; refused unless every one is finite.
    pub fn values(&self, name: &str) -> Result<Vec<f32>> {
        let v = self.decode(name)?;
        match v.iter().position(|x| !x.is_finite()) {
            Some(i) => Err(Error::Artifact(format!(
                "{}: tensor '{name}': element {i} is {}, not a finite number",
                self.path.display(),
                v[i]
            ))),
            None => Ok(v),
        }
    }

    fn decode(&self, name: &str) -> Result<Vec<f32>> {
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
                if grid.len() != 2 {
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
        // Every tensor is checked, whatever layout the file claims to be for: the claim is the
        // file's own metadata, and a transposed shape has the right number of values.
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
        if d.metadata.get("recompose.base_layout").map(String::as_str) != Some(&model.layout_hash()) {
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
            // Shapes were checked against the model above.
            let v = d.values(name)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    type Entry = (&'static str, Dtype, Vec<usize>, Vec<u8>);

    fn write(path: &Path, tensors: &[Entry], meta: &[(&str, &str)]) {
        let views = tensors.iter().map(|(n, d, s, b)| (*n, TensorView::new(*d, s.clone(), b).unwrap()));
        let meta = meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        safetensors::serialize_to_file(views, Some(meta), path).unwrap();
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// A bare checkpoint with `w` [2, 3], and a task vector of `tensors` that claims to fit it.
    fn model_and_delta(dir: &Path, tensors: &[Entry], quant: &str) -> (Store, std::path::PathBuf) {
        let m = dir.join("model.safetensors");
        write(&m, &[("w", Dtype::F32, vec![2, 3], f32s(&[1.0; 6]))], &[]);
        let model = Store::open(m.to_str().unwrap()).unwrap();
        let d = dir.join("tv.safetensors");
        let layout = model.layout_hash();
        write(
            &d,
            tensors,
            &[("recompose.kind", "task_vector"), ("recompose.base_layout", &layout), ("recompose.quant", quant)],
        );
        (model, d)
    }

    fn refusal(r: Result<impl Sized>) -> String {
        let e = r.err().map(|e| e.to_string()).expect("accepted");
        assert!(!e.contains('\n'), "{e}");
        e
    }

    /// NaN stored as such, or inf from a grid that overflows, used to be added to the model.
    #[test]
    fn a_task_vector_with_a_nan_or_inf_value_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let nan = [("w", Dtype::F32, vec![2, 3], f32s(&[0.0, f32::NAN, 0.0, 0.0, 0.0, 0.0]))];
        let (_, tv) = model_and_delta(d.path(), &nan, "{}");
        assert!(refusal(Delta::open(&tv)).contains("tensor 'w': element 1 is NaN, not a finite number"));
        let d = tempfile::tempdir().unwrap();
        let overflow =
            [("w", Dtype::U8, vec![3], vec![0xF0, 0, 0]), ("w.__grid", Dtype::F32, vec![2], f32s(&[0.0, f32::MAX]))];
        let q = r#"{"w": {"shape": [2, 3], "levels": 16, "scheme": "linear"}}"#;
        let (_, tv) = model_and_delta(d.path(), &overflow, q);
        assert!(refusal(Delta::open(&tv)).contains("tensor 'w': element 1 is inf"));
    }

    /// An unknown scheme used to be dequantised as linear.
    #[test]
    fn an_unknown_quantisation_scheme_is_refused() {
        let codes = [("w", Dtype::U8, vec![3], vec![0x10, 0, 0]), ("w.__grid", Dtype::F32, vec![2], f32s(&[0.0, 0.1]))];
        for (q, want) in [
            (r#"{"w": {"shape": [2, 3], "levels": 16, "scheme": "cubic"}}"#, "tensor 'w': unknown scheme 'cubic'"),
            (r#"{"w": {"shape": [2, 3], "levels": 300, "scheme": "linear"}}"#, "tensor 'w': 300 levels"),
            (
                r#"{"w": {"shape": [2, 3], "levels": 2, "scheme": "log"}}"#,
                "tensor 'w': 2 levels: must be between 4 and 256",
            ),
            (r#"{"v": {"shape": [2, 3], "levels": 16, "scheme": "linear"}}"#, "tensor 'v': listed in recompose.quant"),
        ] {
            let d = tempfile::tempdir().unwrap();
            let (_, tv) = model_and_delta(d.path(), &codes, q);
            let e = refusal(Delta::open(&tv));
            assert!(e.contains(want), "want {want:?}, got {e:?}");
        }
    }

    fn apply(model: &Store, tv: &Path, out: &Path) -> Result<Vec<String>> {
        patch(model, &[(Delta::open(tv)?, 1.0)], false, out, Format::Safetensors, None, &|_, _| {})
    }

    /// [3, 2] has as many values as [2, 3]; with a layout claimed to match, it used to be added.
    #[test]
    fn a_task_vector_for_a_transposed_shape_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let (model, tv) = model_and_delta(d.path(), &[("w", Dtype::F32, vec![3, 2], f32s(&[0.5; 6]))], "{}");
        let out = d.path().join("out.safetensors");
        let e = refusal(apply(&model, &tv, &out));
        assert!(e.contains("tensor 'w' has shape [3, 2],") && e.contains("has [2, 3]"), "{e}");
        assert!(!out.exists());
    }

    /// A tensor the model lacks used to be skipped silently.
    #[test]
    fn a_task_vector_naming_a_tensor_the_model_lacks_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let tensors =
            [("w", Dtype::F32, vec![2, 3], f32s(&[0.5; 6])), ("extra.weight", Dtype::F32, vec![2], f32s(&[0.5; 2]))];
        let (model, tv) = model_and_delta(d.path(), &tensors, "{}");
        let out = d.path().join("out.safetensors");
        assert!(refusal(apply(&model, &tv, &out)).contains("tensor 'extra.weight' is not in"));
        assert!(!out.exists());
    }
}
