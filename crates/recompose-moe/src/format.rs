//! The MoE model on disk, and putting it into a loaded model.
//!
//! A MoE folder holds:
//! - `config.json`: `format` (`recompose-moe/1`), `base` (the identity of the dense model it
//!   was cut from: architecture, tensor layout hash, a hash of layer 0's FFN weights), the
//!   `split` (expert names, `keep`, and per layer the permanent channels and each expert's
//!   channels), `router` (its expert count and MLP width; null for a model pruned to its
//!   permanent channels, which routes nothing, and for layer-wise routing) and `layerwise`
//!   (true when one gate per layer routes instead of the pre-gate: the paper's baseline);
//! - `router.safetensors`: the pre-gating router's tensors (`router.*`, f32), the base's
//!   identity in its metadata;
//! - `gates.safetensors`, with `layerwise`: each layer's gate over its FFN input
//!   (`model.layers.{l}.mlp.gate.weight`, `(experts, hidden)` f32), the base's identity in its
//!   metadata;
//! - `experts.safetensors`, once the experts are fine-tuned: every part's f32 weights
//!   (`model.layers.{l}.mlp.permanent.{gate,up,down}_proj.weight`, and `...mlp.experts.{e}...`).
//!
//! Without fine-tuned weights the experts are slices of the base's own weights, cut when the MoE
//! is applied (packed weights stay packed), so the folder is small; the base is named rather than
//! copied, and applying the MoE to another model is refused.

use crate::ffn::{part_name, PartWeights, PROJ};
use crate::layerwise::Gates;
use crate::{Error, ExpertSplit, MoeFfn, Result};
use candle_core::{DType, Tensor};
use recompose_core::weights::ModelFile;
use recompose_llm::pregate::{PreGate, PreGateConfig};
use recompose_llm::Model;
use std::path::Path;

pub const FORMAT: &str = "recompose-moe/1";
/// A config bigger than this is not one of ours (the split of a 7B model is about 5 MB).
const MAX_CONFIG_BYTES: u64 = 256 << 20;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MoeConfig {
    pub format: String,
    pub base: String,
    pub split: ExpertSplit,
    pub router: Option<PreGateConfig>,
    /// Routed by one gate per layer (`gates.safetensors`) rather than by a pre-gate.
    #[serde(default)]
    pub layerwise: bool,
}

impl MoeConfig {
    /// Reads and checks `dir/config.json` on its own (no model needed: `inspect`).
    pub fn read(dir: &Path) -> Result<Self> {
        let bad = |what: String| Error::Data(format!("{}: {what}", dir.display()));
        let cfg_path = dir.join("config.json");
        let size =
            std::fs::metadata(&cfg_path).map_err(|e| bad(format!("config.json: {e} (not a MoE folder?)")))?.len();
        if size > MAX_CONFIG_BYTES {
            return Err(bad(format!("config.json is {size} bytes, too big for a MoE config")));
        }
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| bad(format!("config.json: {e}")))?;
        let format = serde_json::from_str::<serde_json::Value>(&text)
            .map_err(|e| bad(format!("config.json is not JSON ({e})")))?
            .get("format")
            .and_then(|f| f.as_str().map(str::to_string));
        if format.as_deref() != Some(FORMAT) {
            return Err(bad(format!("config.json is not a {FORMAT} config (format {format:?})")));
        }
        let config: MoeConfig =
            serde_json::from_str(&text).map_err(|e| bad(format!("config.json: a corrupt MoE config ({e})")))?;
        let (layers, channels) = (config.split.layers(), config.split.channels);
        config.split.check(layers, channels).map_err(|e| bad(format!("config.json: {e}")))?;
        Ok(config)
    }

    /// Whether `dir` holds a MoE config (what `inspect` tells a MoE folder from a model by).
    pub fn is_moe(dir: &Path) -> bool {
        std::fs::read_to_string(dir.join("config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|v| v.get("format").and_then(|f| f.as_str()) == Some(FORMAT))
    }
}

/// What a MoE is made for: architecture, tensor layout, and layer 0's FFN weights.
pub fn identity(file: &ModelFile) -> Result<String> {
    let shapes = recompose_core::identity::shapes(file)?;
    let ffn0: Vec<String> = PROJ.iter().map(|p| format!("model.layers.0.mlp.{p}.weight")).collect();
    Ok(format!(
        "{:?}-{}-{}",
        file.config.arch,
        recompose_core::identity::layout_hash(&shapes),
        recompose_core::identity::fingerprint(file, &ffn0)?
    )
    .to_lowercase())
}

pub struct MoeModel {
    pub config: MoeConfig,
    /// None when the split routes nothing (a pruned model) or routes layer-wise.
    pub router: Option<PreGate>,
    /// With `config.layerwise`: each layer's gate.
    pub gates: Option<Gates>,
    /// Fine-tuned expert weights by name (None: slices of the base).
    pub experts: Option<Vec<(String, Tensor)>>,
}

impl MoeModel {
    /// Writes `config.json` and `router.safetensors` into `dir` (each built beside and renamed
    /// in).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Data(format!("{}: {e}", dir.display())))?;
        let mut meta = std::collections::BTreeMap::new();
        meta.insert("recompose.backbone".to_string(), self.config.base.clone());
        if let Some(r) = &self.router {
            let named: Vec<(String, candle_core::Tensor)> = r.tensors().to_vec();
            recompose_train::checkpoint::save_tensors(&dir.join("router.safetensors"), &named, &meta)?;
        }
        if let Some(g) = &self.gates {
            recompose_train::checkpoint::save_tensors(&dir.join("gates.safetensors"), &g.tensors(), &meta)?;
        }
        if let Some(w) = &self.experts {
            recompose_train::checkpoint::save_tensors(&dir.join("experts.safetensors"), w, &meta)?;
        }
        let json = serde_json::to_string(&self.config).map_err(|e| Error::Data(e.to_string()))?;
        recompose_core::atomic::write_bytes(&dir.join("config.json"), json.as_bytes())?;
        Ok(())
    }

    /// Reads a MoE folder made for `file`'s model (its identity is checked).
    pub fn load(dir: &Path, file: &ModelFile) -> Result<Self> {
        Self::load_parts(dir, file, true)
    }

    /// As [`Self::load`] for a MoE that will run from its expert store: fine-tuned routed
    /// experts are left on disk (only the permanent parts are read), so they never take memory.
    pub fn load_for_store(dir: &Path, file: &ModelFile) -> Result<Self> {
        Self::load_parts(dir, file, false)
    }

    fn load_parts(dir: &Path, file: &ModelFile, routed: bool) -> Result<Self> {
        let bad = |what: String| Error::Data(format!("{}: {what}", dir.display()));
        let config = MoeConfig::read(dir)?;
        let c = &file.config;
        let channels = c.dims(0).intermediate;
        config.split.check(c.num_layers, channels).map_err(|e| bad(format!("config.json: {e}")))?;
        let routes = config.split.experts.iter().flatten().any(|e| !e.is_empty());
        match config.router {
            Some(r) if r.experts != config.split.names.len() => {
                return Err(bad(format!(
                    "config.json: a router over {} experts for a split of {}",
                    r.experts,
                    config.split.names.len()
                )))
            }
            Some(_) if config.layerwise => {
                return Err(bad("config.json: a router and layer-wise gates (one routes, not both)".into()))
            }
            None if routes && !config.layerwise => {
                return Err(bad("config.json: a split with routed experts and no router".into()))
            }
            _ => {}
        }
        let here = identity(file)?;
        if config.base != here {
            return Err(bad(format!("made for another model ({}; this one is {here})", config.base)));
        }
        let router = match config.router {
            None => None,
            Some(rc) => {
                let st = open_for(&dir.join("router.safetensors"), &here, "a router")?;
                let load = |name: &str| Ok(st.load(name)?.to_dtype(DType::F32)?);
                Some(PreGate::from_tensors(rc, c, false, load).map_err(|e| bad(format!("router.safetensors: {e}")))?)
            }
        };
        let gates = match config.layerwise {
            false => None,
            true => {
                let st = open_for(&dir.join("gates.safetensors"), &here, "layer-wise gates")?;
                let get = |name: &str| Ok(st.load(name)?);
                let g = Gates::from_tensors(c.num_layers, config.split.names.len(), c.hidden_size, get);
                Some(g.map_err(|e| bad(format!("gates.safetensors: {e}")))?)
            }
        };
        let experts = match dir.join("experts.safetensors") {
            p if p.exists() => {
                let split = if routed { config.split.clone() } else { permanent_only(&config.split) };
                Some(read_experts(&p, &split, c.hidden_size, &here)?)
            }
            _ => None,
        };
        Ok(Self { config, router, gates, experts })
    }

    /// Cuts `model`'s FFNs into the experts and puts the router in front (moving the router's
    /// weights to the model's device and float type). Make caches after this: the router adds
    /// a cache layer.
    pub fn apply(self, model: &mut Model) -> Result<()> {
        let moes = self.ffns(model)?;
        self.install(model, moes)
    }

    /// As [`Self::apply`], with the routed experts read on demand from `store` (made by
    /// [`crate::store::write`] for this MoE) rather than kept in memory. Only a pre-gated MoE
    /// knows its routes before the blocks run, which is what the store's prefetch and
    /// look-ahead need.
    pub fn apply_stored(self, model: &mut Model, store: std::sync::Arc<crate::store::ExpertStore>) -> Result<()> {
        self.check_storable()?;
        // The store must hold this split's experts as the model runs them: gate and up of
        // channels x hidden (on the packed kernels the channels padded to a block of 32), down
        // transposed.
        let (split, hidden, packed) = (&self.config.split, model.config.hidden_size, on_packed(model));
        if store.layers() != split.layers() || store.experts() != split.names.len() {
            return Err(Error::Config(format!(
                "the expert store holds {} layers x {} experts, this MoE {} x {}: made from another MoE",
                store.layers(),
                store.experts(),
                split.layers(),
                split.names.len()
            )));
        }
        if store.packed() != packed {
            let (has, runs) = if packed { ("f32", "packed") } else { ("packed", "f32") };
            return Err(Error::Config(format!(
                "the expert store holds {has} experts and this model runs {runs} (write the store as the model runs)"
            )));
        }
        for (l, layer) in split.experts.iter().enumerate() {
            for (e, chans) in layer.iter().enumerate() {
                let k =
                    if packed { chans.len().next_multiple_of(recompose_llm::kernels::quant::QK) } else { chans.len() };
                let want = (k > 0).then_some([(k, hidden), (k, hidden), (hidden, k)]);
                if store.shapes(l, e) != want {
                    return Err(Error::Config(format!(
                        "layer {l} expert {e}: the expert store has {:?}, this MoE {want:?}: made from another MoE",
                        store.shapes(l, e)
                    )));
                }
            }
        }
        let moes = self.ffns_of(model, &permanent_only(split))?;
        let moes = moes.into_iter().map(|m| m.into_stored(store.clone())).collect();
        self.install(model, moes)
    }

    /// Refuses a MoE that cannot run from an expert store: one without a pre-gate.
    pub fn check_storable(&self) -> Result<()> {
        if self.router.is_none() {
            let what = if self.config.layerwise { "routes layer by layer" } else { "routes nothing" };
            return Err(Error::Config(format!(
                "an expert store needs a pre-gated MoE (routes known before the blocks); this one {what}"
            )));
        }
        Ok(())
    }

    /// The MoE's FFNs for `model`, one per layer, not yet installed: slices of its dense FFNs
    /// or the fine-tuned experts.
    pub fn ffns(&self, model: &Model) -> Result<Vec<MoeFfn>> {
        self.ffns_of(model, &self.config.split)
    }

    /// [`Self::ffns`] of `split` (this MoE's, or it with the routed experts emptied).
    fn ffns_of(&self, model: &Model, split: &ExpertSplit) -> Result<Vec<MoeFfn>> {
        let (dtype, device) = (model.dtype(), model.device().clone());
        let packed = on_packed(model);
        let moes = match &self.experts {
            None => crate::ffn::cut(model, split)?,
            Some(w) => {
                let act = model.config.activation;
                let by_name: std::collections::HashMap<&str, &Tensor> =
                    w.iter().map(|(n, t)| (n.as_str(), t)).collect();
                let get = |name: String| -> Result<Tensor> {
                    let t = by_name.get(name.as_str()).copied().cloned();
                    let t = t.ok_or_else(|| Error::Data(format!("experts: no {name}")))?;
                    Ok(t.to_dtype(dtype)?.to_device(&device)?)
                };
                let part = |l: usize, which: Option<usize>, chans: &[u32]| -> Result<Option<PartWeights>> {
                    if chans.is_empty() {
                        return Ok(None);
                    }
                    let [g, u, d] = PROJ.map(|p| part_name(l, which, p));
                    Ok(Some(PartWeights { gate: get(g)?, up: get(u)?, down: get(d)? }))
                };
                (0..split.layers())
                    .map(|l| {
                        let experts = split.experts[l]
                            .iter()
                            .enumerate()
                            .map(|(e, c)| part(l, Some(e), c))
                            .collect::<Result<Vec<_>>>()?;
                        MoeFfn::from_weights(l, part(l, None, &split.permanent[l])?, experts, act, packed)
                    })
                    .collect::<Result<Vec<_>>>()?
            }
        };
        Ok(moes)
    }

    /// Installs `moes` (from [`Self::ffns`]) in `model` with the router in front or the gates.
    fn install(self, model: &mut Model, moes: Vec<MoeFfn>) -> Result<()> {
        let (dtype, device, packed) = (model.dtype(), model.device().clone(), on_packed(model));
        let router = match &self.router {
            None => None,
            Some(r) => {
                let r = r.to(&model.config, dtype, &device)?;
                Some(if packed { r.packed()? } else { r })
            }
        };
        let routing = match (&self.gates, router) {
            (Some(g), _) => crate::Routing::Layerwise(g),
            (None, Some(r)) => crate::Routing::PreGate(r),
            (None, None) => crate::Routing::None,
        };
        crate::ffn::install(model, moes, routing)
    }
}

/// `split` with every routed expert's channels dropped: what stays resident beside a store.
fn permanent_only(split: &ExpertSplit) -> ExpertSplit {
    let mut s = split.clone();
    s.experts.iter_mut().flatten().for_each(Vec::clear);
    s
}

/// Whether `model` (its dense FFNs still in) runs on the packed kernels: then its experts and
/// router run there too.
fn on_packed(model: &Model) -> bool {
    model.layers.first().and_then(|b| b.ffn.as_dense()).is_some_and(|d| d.gate.dense_weight().is_none())
}

/// Opens a safetensors file of a MoE folder, refusing `what` made for a base other than `base`.
fn open_for(path: &Path, base: &str, what: &str) -> Result<recompose_core::weights::HfDir> {
    let st = recompose_core::weights::HfDir::open_tensors(path)?;
    if st.metadata.get("recompose.backbone").map(String::as_str) != Some(base) {
        return Err(Error::Data(format!("{}: {what} for another model", path.display())));
    }
    Ok(st)
}

/// Reads fine-tuned expert weights, checking that every part the split has is there with its
/// shape, and that they were made for this base.
fn read_experts(path: &Path, split: &ExpertSplit, hidden: usize, base: &str) -> Result<Vec<(String, Tensor)>> {
    let bad = |what: String| Error::Data(format!("{}: {what}", path.display()));
    let st = open_for(path, base, "expert weights")?;
    let mut out = vec![];
    for l in 0..split.layers() {
        let parts = std::iter::once((None, &split.permanent[l]))
            .chain(split.experts[l].iter().enumerate().map(|(e, c)| (Some(e), c)));
        for (which, chans) in parts.filter(|(_, c)| !c.is_empty()) {
            let k = chans.len();
            for (p, shape) in PROJ.iter().zip([[k, hidden], [k, hidden], [hidden, k]]) {
                let name = part_name(l, which, p);
                let t = st.load(&name).map_err(|e| bad(format!("{name}: {e}")))?.to_dtype(DType::F32)?;
                if t.dims() != shape {
                    return Err(bad(format!("{name} is {:?}, the split needs {shape:?}", t.dims())));
                }
                out.push((name, t));
            }
        }
    }
    Ok(out)
}
