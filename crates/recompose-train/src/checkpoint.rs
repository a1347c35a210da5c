//! Checkpoints: one safetensors file holding the trainable parameters (`param/NAME`), the
//! optimiser's buffers (`opt/K/NAME`) and, in its metadata, the optimiser's per-parameter step
//! counts and whatever the loop needs to continue exactly where it stopped (its step, data
//! position, run identity). Written beside the target and renamed into place, so an interrupted
//! save leaves the previous checkpoint intact.

use crate::optim::{Optimizer, Param};
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use recompose_core::safetensors_out::{write_sharded, PlannedTensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub const KIND_KEY: &str = "recompose.kind";
pub const KIND: &str = "train-checkpoint";
pub const STATE_KEY: &str = "recompose.train";

/// Writes `params`, `opt` and the loop's `state` (JSON) to `path`.
pub fn save(path: &Path, params: &[Param], opt: &Optimizer, state: &serde_json::Value) -> Result<()> {
    let mut named: Vec<(String, Tensor)> =
        params.iter().map(|p| (format!("param/{}", p.name), p.var.as_tensor().clone())).collect();
    for (p, slot) in params.iter().zip(&opt.slots) {
        for (k, b) in slot.buffers.iter().enumerate() {
            named.push((format!("opt/{k}/{}", p.name), b.clone()));
        }
    }
    let steps: Vec<u64> = opt.slots.iter().map(|s| s.steps).collect();
    let meta = BTreeMap::from([
        (KIND_KEY.to_string(), KIND.to_string()),
        ("recompose.optimizer".to_string(), serde_json::to_string(&opt.kind).unwrap_or_default()),
        ("recompose.optimizer_steps".to_string(), serde_json::to_string(&steps).unwrap_or_default()),
        (STATE_KEY.to_string(), state.to_string()),
    ]);
    save_tensors(path, &named, &meta)
}

/// Writes named tensors (as f32, or f64 when they are) to one safetensors file, atomically.
pub fn save_tensors(path: &Path, named: &[(String, Tensor)], meta: &BTreeMap<String, String>) -> Result<()> {
    let tmp = recompose_core::atomic::scratch_beside(path)?;
    let plan: Vec<PlannedTensor> = named
        .iter()
        .map(|(n, t)| PlannedTensor {
            name: n.clone(),
            dtype: if t.dtype() == DType::F64 { DType::F64 } else { DType::F32 },
            shape: t.dims().to_vec(),
        })
        .collect();
    let files = write_sharded(tmp.path(), &plan, usize::MAX, meta, |i| {
        Ok(named[i].1.detach().to_dtype(plan[i].dtype)?.to_device(&candle_core::Device::Cpu)?)
    })?;
    let file = files.first().ok_or_else(|| Error::Checkpoint(format!("{}: nothing written", path.display())))?;
    std::fs::rename(file, path).map_err(|e| Error::Checkpoint(format!("{}: {e}", path.display())))?;
    Ok(())
}

/// A checkpoint read back.
pub struct Loaded {
    pub tensors: HashMap<String, Tensor>,
    pub metadata: BTreeMap<String, String>,
}

impl Loaded {
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |what: String| Error::Checkpoint(format!("{}: {what}", path.display()));
        if !path.is_file() {
            return Err(bad("no such checkpoint".into()));
        }
        let st = recompose_core::weights::HfDir::open_tensors(path).map_err(|e| bad(e.to_string()))?;
        let tensors = st.names().map(|n| Ok((n.clone(), st.load(n)?))).collect::<Result<_>>()?;
        Ok(Self { tensors, metadata: st.metadata.clone() })
    }

    /// The loop's state, if this is a training checkpoint.
    pub fn state(&self, path: &Path) -> Result<serde_json::Value> {
        if self.metadata.get(KIND_KEY).map(String::as_str) != Some(KIND) {
            return Err(Error::Checkpoint(format!("{}: not a recompose training checkpoint", path.display())));
        }
        let s = self.metadata.get(STATE_KEY).map_or("null", |s| s);
        serde_json::from_str(s).map_err(|e| Error::Checkpoint(format!("{}: bad state: {e}", path.display())))
    }

    /// Puts the parameters and optimiser state back. Every parameter must be there with its shape.
    pub fn restore(&self, path: &Path, params: &[Param], opt: &mut Optimizer) -> Result<()> {
        let bad = |what: String| Error::Checkpoint(format!("{}: {what}", path.display()));
        let kind: crate::OptimizerKind =
            serde_json::from_str(self.metadata.get("recompose.optimizer").map_or("null", |s| s))
                .map_err(|e| bad(format!("optimiser: {e}")))?;
        if kind != opt.kind {
            return Err(bad(format!("made with optimiser {kind:?}, this run uses {:?}", opt.kind)));
        }
        let steps: Vec<u64> = serde_json::from_str(self.metadata.get("recompose.optimizer_steps").map_or("[]", |s| s))
            .map_err(|e| bad(format!("optimiser steps: {e}")))?;
        if steps.len() != params.len() {
            return Err(bad(format!("{} parameters in the checkpoint, {} in this run", steps.len(), params.len())));
        }
        let get = |name: &str, like: &Tensor| -> Result<Tensor> {
            let t = self.tensors.get(name).ok_or_else(|| bad(format!("missing tensor '{name}'")))?;
            if t.dims() != like.dims() {
                return Err(bad(format!("tensor '{name}' is {:?}, the run needs {:?}", t.dims(), like.dims())));
            }
            Ok(t.to_dtype(like.dtype())?.to_device(like.device())?)
        };
        for ((p, slot), s) in params.iter().zip(opt.slots.iter_mut()).zip(steps) {
            p.var.set(&get(&format!("param/{}", p.name), p.var.as_tensor())?)?;
            slot.steps = s;
            for k in 0..slot.buffers.len() {
                slot.buffers[k] = get(&format!("opt/{k}/{}", p.name), &slot.buffers[k])?;
            }
        }
        Ok(())
    }
}
