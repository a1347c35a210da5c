//! LoRA adapters in HF PEFT's on-disk format, so they move between recompose and PEFT both ways:
//! a folder with `adapter_config.json` (`peft_type: LORA`, `r`, `lora_alpha`, `lora_dropout`,
//! `target_modules`, `use_rslora`) and `adapter_model.safetensors` holding
//! `base_model.model.<module>.lora_A.weight (r, in)` and `...lora_B.weight (out, r)` per module,
//! in HF's weight convention. recompose adds `recompose.*` keys to the safetensors metadata saying
//! which base model the adapter was trained on; PEFT ignores them. Owns no model.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";

/// `adapter_config.json`, the keys recompose reads and writes (others are kept as PEFT wrote them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

fn default_bias() -> String {
    "none".into()
}

/// PEFT writes `target_modules` as a list, or as one regex string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Pattern(String),
}

impl AdapterConfig {
    pub fn lora(r: usize, alpha: f64, dropout: f64, targets: &[&str], rslora: bool, base: &str) -> Self {
        Self {
            peft_type: "LORA".into(),
            r,
            lora_alpha: alpha,
            lora_dropout: dropout,
            target_modules: TargetModules::List(targets.iter().map(|t| t.to_string()).collect()),
            use_rslora: rslora,
            base_model_name_or_path: Some(base.into()),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            use_dora: false,
            fan_in_fan_out: false,
            bias: "none".into(),
            task_type: Some("CAUSAL_LM".into()),
            inference_mode: true,
            other: BTreeMap::new(),
        }
    }

    /// The multiplier of `B A`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |what: String| Err(Error::Unsupported(format!("{}: {what}", path.display())));
        if self.peft_type != "LORA" {
            return bad(format!("peft_type '{}' is not supported (only LORA)", self.peft_type));
        }
        if self.r == 0 || self.r > 4096 || !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            return bad(format!("r {} and lora_alpha {} must be positive", self.r, self.lora_alpha));
        }
        if !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty() {
            return bad("per-module rank_pattern / alpha_pattern are not supported".into());
        }
        if self.use_dora {
            return bad("DoRA adapters are not supported".into());
        }
        if self.fan_in_fan_out {
            return bad("fan_in_fan_out (GPT-2 style Conv1D) adapters are not supported".into());
        }
        if self.bias != "none" {
            return bad(format!("bias '{}' is not supported (only none)", self.bias));
        }
        Ok(())
    }
}

/// A LoRA adapter: its config and, per module path (`model.layers.0.self_attn.q_proj`), the
/// factors `A (r, in)` and `B (out, r)` as f32, in HF's convention.
pub struct Adapter {
    pub dir: PathBuf,
    pub config: AdapterConfig,
    pub factors: BTreeMap<String, (Tensor, Tensor)>,
    /// `__metadata__` of the weights file (`recompose.*` identity keys when recompose wrote it).
    pub metadata: BTreeMap<String, String>,
}

/// Is `path` a PEFT adapter folder?
pub fn is_adapter(path: &Path) -> bool {
    path.is_dir() && path.join(CONFIG_FILE).is_file()
}

impl Adapter {
    pub fn open(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let config: AdapterConfig = serde_json::from_str(&text)
            .map_err(|e| Error::Unsupported(format!("{}: not a PEFT adapter config: {e}", cfg_path.display())))?;
        config.validate(&cfg_path)?;
        let wpath = dir.join(WEIGHTS_FILE);
        if !wpath.is_file() {
            return Err(Error::MissingTensor { path: wpath, tensor: "(the adapter weights file)".into() });
        }
        let st = crate::weights::HfDir::open_tensors(&wpath)?;
        let mut a = BTreeMap::new();
        let mut b = BTreeMap::new();
        for name in st.names() {
            let bad = |what: &str| Error::BadTensor { path: wpath.clone(), tensor: name.clone(), what: what.into() };
            let rest = name.strip_prefix(PREFIX).ok_or_else(|| bad("not a PEFT LoRA tensor name"))?;
            // PEFT may insert the adapter name: `...q_proj.lora_A.default.weight`.
            let rest = rest.replace(".default.weight", ".weight");
            let t = st.load(name)?.to_dtype(DType::F32)?;
            if t.rank() != 2 {
                return Err(bad(&format!("shape {:?} is not 2-D", t.dims())));
            }
            if let Some(m) = rest.strip_suffix(".lora_A.weight") {
                a.insert(m.to_string(), t);
            } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
                b.insert(m.to_string(), t);
            } else {
                return Err(bad("not a lora_A / lora_B weight (only plain LoRA adapters are supported)"));
            }
        }
        if a.is_empty() {
            return Err(Error::Unsupported(format!("{}: no LoRA weights", wpath.display())));
        }
        let mut factors = BTreeMap::new();
        for (m, ta) in a {
            let tb = b.remove(&m).ok_or_else(|| Error::MissingTensor {
                path: wpath.clone(),
                tensor: format!("{PREFIX}{m}.lora_B.weight"),
            })?;
            if ta.dim(0)? != config.r || tb.dim(1)? != config.r {
                return Err(Error::BadTensor {
                    path: wpath.clone(),
                    tensor: format!("{PREFIX}{m}"),
                    what: format!("A {:?} and B {:?} do not have rank {}", ta.dims(), tb.dims(), config.r),
                });
            }
            factors.insert(m, (ta, tb));
        }
        if let Some(m) = b.keys().next() {
            return Err(Error::MissingTensor { path: wpath, tensor: format!("{PREFIX}{m}.lora_A.weight") });
        }
        Ok(Self { dir: dir.to_path_buf(), config, factors, metadata: st.metadata.clone() })
    }

    /// Writes the adapter folder `dir` (built beside it, renamed into place when complete).
    pub fn write(
        dir: &Path,
        config: &AdapterConfig,
        factors: &BTreeMap<String, (Tensor, Tensor)>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<()> {
        if dir.exists() {
            return Err(Error::Unsupported(format!("{}: already exists (refusing to overwrite)", dir.display())));
        }
        let tmp = crate::atomic::scratch_beside(dir)?;
        let mut plan = vec![];
        let mut values = vec![];
        for (m, (a, b)) in factors {
            for (suffix, t) in [("lora_A", a), ("lora_B", b)] {
                let t = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
                plan.push(crate::safetensors_out::PlannedTensor {
                    name: format!("{PREFIX}{m}.{suffix}.weight"),
                    dtype: DType::F32,
                    shape: t.dims().to_vec(),
                });
                values.push(t);
            }
        }
        let mut meta = metadata.clone();
        meta.insert("format".into(), "pt".into());
        let written =
            crate::safetensors_out::write_sharded(tmp.path(), &plan, usize::MAX, &meta, |i| Ok(values[i].clone()))?;
        // One shard: rename PEFT's file name.
        for f in written {
            std::fs::rename(&f, tmp.path().join(WEIGHTS_FILE)).map_err(|e| Error::io(&f, e))?;
        }
        let json = serde_json::to_string_pretty(config).map_err(|e| Error::Unsupported(e.to_string()))?;
        crate::atomic::write_bytes(&tmp.path().join(CONFIG_FILE), json.as_bytes())?;
        crate::atomic::publish_dir(tmp, dir)
    }

    /// `scale * B A` for a module, `(out, in)`.
    pub fn delta(&self, module: &str) -> Result<Option<Tensor>> {
        let Some((a, b)) = self.factors.get(module) else { return Ok(None) };
        Ok(Some((b.matmul(a)? * self.config.scale())?))
    }

    /// The weight a module's delta applies to (`model.layers.0.self_attn.q_proj.weight`).
    pub fn weight_names(&self) -> Vec<String> {
        self.factors.keys().map(|m| format!("{m}.weight")).collect()
    }
}

/// The `recompose.*` metadata that ties an adapter to its base model: the model's label, the
/// hash of its structure and a hash of the values of the adapted weights of its first layer.
pub fn base_identity(
    file: &crate::weights::ModelFile,
    label: &str,
    modules: &[String],
) -> Result<BTreeMap<String, String>> {
    let names: Vec<String> =
        modules.iter().filter(|m| m.starts_with("model.layers.0.")).map(|m| format!("{m}.weight")).collect();
    Ok(BTreeMap::from([
        ("recompose.kind".to_string(), "lora".to_string()),
        ("recompose.base".to_string(), label.to_string()),
        ("recompose.base_layout".to_string(), crate::identity::layout_hash(&crate::identity::shapes(file)?)),
        ("recompose.base_fingerprint".to_string(), crate::identity::fingerprint(file, &names)?),
        ("recompose.base_fingerprint_of".to_string(), names.join(",")),
    ]))
}

impl Adapter {
    /// Refuses an adapter that records another base model than `file` (adapters from PEFT record
    /// none; their shapes are checked when they are attached).
    pub fn check_base(&self, file: &crate::weights::ModelFile) -> Result<()> {
        let other = |what: &str| {
            Err(Error::Unsupported(format!(
                "{}: this adapter was trained on another model ({}, {what}), not {}",
                self.dir.display(),
                self.metadata.get("recompose.base").map_or("?", |s| s),
                file.path.display()
            )))
        };
        if let Some(want) = self.metadata.get("recompose.base_layout") {
            if *want != crate::identity::layout_hash(&crate::identity::shapes(file)?) {
                return other("another set of tensors");
            }
        }
        if let (Some(want), Some(of)) =
            (self.metadata.get("recompose.base_fingerprint"), self.metadata.get("recompose.base_fingerprint_of"))
        {
            let names: Vec<String> = of.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect();
            if names.iter().any(|n| !file.has(n)) || *want != crate::identity::fingerprint(file, &names)? {
                return other("other weights");
            }
        }
        Ok(())
    }
}

/// A `PATH[:SCALE]` argument (`my-adapter/:0.5`).
pub fn parse_scaled(arg: &str) -> std::result::Result<(PathBuf, f64), String> {
    if let Some((p, s)) = arg.rsplit_once(':') {
        if let Ok(v) = s.parse::<f64>() {
            if !v.is_finite() {
                return Err(format!("adapter scale '{s}' is not a finite number"));
            }
            return Ok((PathBuf::from(p), v));
        }
    }
    Ok((PathBuf::from(arg), 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn factors() -> BTreeMap<String, (Tensor, Tensor)> {
        let a = Tensor::from_vec((0..12).map(|i| i as f32 * 0.1).collect(), (2, 6), &Device::Cpu).unwrap();
        let b = Tensor::from_vec((0..8).map(|i| i as f32 - 3.0).collect(), (4, 2), &Device::Cpu).unwrap();
        BTreeMap::from([("model.layers.0.self_attn.q_proj".to_string(), (a, b))])
    }

    #[test]
    fn writes_and_reads_back_peft_layout() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("adapter");
        let cfg = AdapterConfig::lora(2, 4.0, 0.05, &["q_proj"], false, "smollm2-135m");
        let meta = BTreeMap::from([("recompose.base".to_string(), "x".to_string())]);
        Adapter::write(&out, &cfg, &factors(), &meta).unwrap();
        let a = Adapter::open(&out).unwrap();
        assert_eq!(a.config, cfg);
        assert_eq!(a.metadata.get("recompose.base").map(String::as_str), Some("x"));
        let (fa, fb) = &a.factors["model.layers.0.self_attn.q_proj"];
        assert_eq!(fa.dims(), [2, 6]);
        assert_eq!(
            fb.to_vec2::<f32>().unwrap(),
            factors()["model.layers.0.self_attn.q_proj"].1.to_vec2::<f32>().unwrap()
        );
        let d = a.delta("model.layers.0.self_attn.q_proj").unwrap().unwrap();
        assert_eq!(d.dims(), [4, 6]);
        // Refuses to overwrite.
        assert!(Adapter::write(&out, &cfg, &factors(), &meta).unwrap_err().to_string().contains("already exists"));
    }

    #[test]
    fn unsupported_peft_features_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("a");
        let mut cfg = AdapterConfig::lora(2, 4.0, 0.0, &["q_proj"], false, "m");
        cfg.use_dora = true;
        Adapter::write(&out, &cfg, &factors(), &BTreeMap::new()).unwrap();
        let e = Adapter::open(&out).err().unwrap().to_string();
        assert!(e.contains("DoRA"), "{e}");
    }

    #[test]
    fn scaled_argument() {
        assert_eq!(parse_scaled("a/b:0.5").unwrap(), (PathBuf::from("a/b"), 0.5));
        assert_eq!(parse_scaled("a/b").unwrap(), (PathBuf::from("a/b"), 1.0));
        assert_eq!(parse_scaled("c:/x").unwrap(), (PathBuf::from("c:/x"), 1.0));
    }
}
