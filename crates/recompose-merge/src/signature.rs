//! Extracting deltas: task vectors (fine-tuned minus base, Ilharco et al.) and robust weight
//! signatures (robust minus pretrained, with its component along clean minus pretrained removed,
//! over the first K layers; PAPERS.md §7), and the per-layer view that shows where they live.

use crate::delta::{identity, DeltaPlan, Scheme};
use crate::error::{Error, Result};
use crate::store::{layer_of, Store};
use std::collections::BTreeMap;
use std::path::Path;

/// What was written.
pub struct Extracted {
    pub tensors: usize,
    pub bytes: usize,
    /// Bytes of a full copy of the model in its stored dtype.
    pub full_bytes: usize,
}

fn check_same(a: &Store, b: &Store, name: &str) -> Result<()> {
    match (a.shape(name), b.shape(name)) {
        (Some(x), Some(y)) if x == y => Ok(()),
        (Some(x), Some(y)) => {
            Err(Error::Mismatch(format!("tensor '{name}': {} has shape {x:?}, {} has {y:?}", a.label, b.label)))
        }
        _ => Err(Error::Mismatch(format!("{}: missing tensor '{name}'", b.label))),
    }
}

fn is_float_weight(s: &Store, name: &str) -> bool {
    // BatchNorm statistics are re-estimated after patching, not patched.
    !(name.ends_with("running_mean") || name.ends_with("running_var") || name.ends_with("num_batches_tracked"))
        && s.dtype(name).is_some()
}

/// A delta's metadata: the base's identity, the levels, and `recompose.KEY` entries.
fn metadata<const N: usize>(
    base: &Store,
    names: &[String],
    levels: Option<u32>,
    entries: [(&str, String); N],
) -> Result<std::collections::BTreeMap<String, String>> {
    let mut meta = identity(base, names)?;
    meta.insert("recompose.levels".into(), levels.map_or("f32".into(), |l| l.to_string()));
    for (k, v) in entries {
        meta.insert(format!("recompose.{k}"), v);
    }
    Ok(meta)
}

fn shapes(s: &Store, names: &[String]) -> Vec<(String, Vec<usize>)> {
    names.iter().map(|n| (n.clone(), s.shape(n).unwrap_or(&[]).to_vec())).collect()
}

fn full_bytes(s: &Store) -> usize {
    s.names()
        .iter()
        .map(|n| s.shape(n).map_or(0, |sh| sh.iter().product::<usize>()) * s.dtype(n).map_or(4, |d| d.size_in_bytes()))
        .sum()
}

/// `tv extract`: finetuned - base over the tensors whose names contain one of `filters` (all when empty).
pub fn extract_task_vector(
    base: &Store,
    finetuned: &Store,
    filters: &[String],
    levels: Option<u32>,
    scheme: Scheme,
    out: &Path,
    progress: &dyn Fn(usize, usize),
) -> Result<Extracted> {
    crate::output::check_target(out)?;
    let names: Vec<String> = base
        .names()
        .iter()
        .filter(|n| filters.is_empty() || filters.iter().any(|f| n.contains(f.as_str())))
        .cloned()
        .collect();
    if names.is_empty() {
        return Err(Error::Config(format!("--filter {filters:?} matches no tensor of {}", base.label)));
    }
    for n in base.names() {
        check_same(base, finetuned, n)?;
    }
    let plan = DeltaPlan::new(levels, scheme, shapes(base, &names))?;
    let bytes = plan.data_bytes();
    let meta = metadata(
        base,
        &names,
        levels,
        [("kind", "task_vector".into()), ("finetuned", finetuned.label.clone()), ("filters", filters.join(","))],
    )?;
    plan.write(
        out,
        meta,
        |n| {
            let (b, f) = (base.load(n)?, finetuned.load(n)?);
            base.release(n);
            finetuned.release(n);
            Ok(f.iter().zip(&b).map(|(x, y)| x - y).collect())
        },
        progress,
    )?;
    Ok(Extracted { tensors: names.len(), bytes, full_bytes: full_bytes(base) })
}

/// A layer of a checkpoint: `model.layers.N` for transformer blocks, otherwise the module path
/// (the name without its last component).
pub fn layer_key(name: &str) -> String {
    match layer_of(name) {
        Some((l, _)) => format!("model.layers.{l}"),
        None => name.rsplit_once('.').map_or(name, |(m, _)| m).to_string(),
    }
}

/// Layers in the checkpoint's stored order, each with its tensors.
pub fn layers(s: &Store) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = vec![];
    for n in s.names().iter().filter(|n| is_float_weight(s, n)) {
        let k = layer_key(n);
        match out.iter_mut().find(|(key, _)| *key == k) {
            Some((_, v)) => v.push(n.clone()),
            None => out.push((k, vec![n.clone()])),
        }
    }
    out
}

/// `--layers first:K` or `all`.
pub fn select_layers(s: &Store, spec: &str) -> Result<Vec<(String, Vec<String>)>> {
    let all = layers(s);
    if spec == "all" {
        return Ok(all);
    }
    let k: usize = spec
        .strip_prefix("first:")
        .and_then(|k| k.parse().ok())
        .filter(|k| *k > 0)
        .ok_or_else(|| Error::Config(format!("--layers '{spec}': expected first:K (K >= 1) or all")))?;
    if k > all.len() {
        return Err(Error::Config(format!("--layers first:{k}: {} has only {} layers", s.label, all.len())));
    }
    Ok(all.into_iter().take(k).collect())
}

/// The RWS projection: d - (a.d / a.a) a, with d = robust - pretrained, a = clean - pretrained.
pub fn project_out(d: &[f32], a: &[f32]) -> Vec<f32> {
    let ad: f64 = a.iter().zip(d).map(|(x, y)| *x as f64 * *y as f64).sum();
    let aa: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
    if aa == 0.0 {
        return d.to_vec();
    }
    let c = (ad / aa) as f32;
    d.iter().zip(a).map(|(y, x)| y - c * x).collect()
}

/// `rws extract` for one robust model.
pub fn extract_signature(
    pretrained: &Store,
    clean: &Store,
    robust: &Store,
    layers_spec: &str,
    levels: Option<u32>,
    scheme: Scheme,
    out: &Path,
    progress: &dyn Fn(usize, usize),
) -> Result<Extracted> {
    crate::output::check_target(out)?;
    let chosen = select_layers(pretrained, layers_spec)?;
    let names: Vec<String> = chosen.iter().flat_map(|(_, v)| v.iter().cloned()).collect();
    for n in &names {
        check_same(pretrained, clean, n)?;
        check_same(pretrained, robust, n)?;
    }
    let plan = DeltaPlan::new(levels, scheme, shapes(pretrained, &names))?;
    let bytes = plan.data_bytes();
    let layers = chosen.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(",");
    let meta = metadata(
        pretrained,
        &names,
        levels,
        [("kind", "rws".into()), ("clean", clean.label.clone()), ("robust", robust.label.clone()), ("layers", layers)],
    )?;
    plan.write(
        out,
        meta,
        |n| {
            let p = pretrained.load(n)?;
            let d: Vec<f32> = robust.load(n)?.iter().zip(&p).map(|(x, y)| x - y).collect();
            let a: Vec<f32> = clean.load(n)?.iter().zip(&p).map(|(x, y)| x - y).collect();
            [pretrained, robust, clean].iter().for_each(|s| s.release(n));
            Ok(project_out(&d, &a))
        },
        progress,
    )?;
    Ok(Extracted { tensors: names.len(), bytes, full_bytes: full_bytes(robust) })
}

/// One row of `rws inspect`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerNorm {
    pub layer: String,
    pub params: usize,
    /// ||robust - clean|| over the layer.
    pub delta_norm: f64,
    /// ... divided by ||clean||.
    pub relative: f64,
}

/// Per-layer norms of robust - clean: where the robustness lives.
pub fn layer_deltas(clean: &Store, robust: &Store) -> Result<Vec<LayerNorm>> {
    let mut out = vec![];
    for (layer, names) in layers(clean) {
        let (mut dn, mut cn, mut params) = (0f64, 0f64, 0usize);
        for n in &names {
            check_same(clean, robust, n)?;
            let (c, r) = (clean.load(n)?, robust.load(n)?);
            dn += c.iter().zip(&r).map(|(x, y)| ((y - x) as f64).powi(2)).sum::<f64>();
            cn += c.iter().map(|x| (*x as f64).powi(2)).sum::<f64>();
            params += c.len();
        }
        let (dn, cn) = (dn.sqrt(), cn.sqrt());
        out.push(LayerNorm { layer, params, delta_norm: dn, relative: if cn > 0.0 { dn / cn } else { 0.0 } });
    }
    Ok(out)
}

/// Per-layer norms of a delta file.
pub fn delta_layers(d: &crate::delta::Delta) -> Result<BTreeMap<String, (usize, f64)>> {
    let mut out: BTreeMap<String, (usize, f64)> = BTreeMap::new();
    for n in &d.names {
        let v = d.values(n)?;
        let e = out.entry(layer_key(n)).or_default();
        e.0 += v.len();
        e.1 += v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>();
    }
    out.values_mut().for_each(|v| v.1 = v.1.sqrt());
    Ok(out)
}
