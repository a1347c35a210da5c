//! From a config and the opened models to a list of output tensors, each with its inputs and its
//! resolved parameters, as mergekit's planner builds it: `models:` becomes one slice over every
//! layer (the base appended when not listed); embeddings come first with t = 0, then each slice's
//! layers with t = layer / (layers - 1), then the final norm and head with t = 0. Every shape,
//! tensor and parameter is checked here, before anything is read or written.

use crate::config::{Layout, MergeConfig, Parameters, Slice, Source};
use crate::error::{Error, Result};
use crate::methods::{Method, Params};
use crate::store::{layer_of, Store};
use std::collections::BTreeSet;

/// One output tensor.
#[derive(Debug, Clone)]
pub struct Planned {
    pub name: String,
    pub shape: Vec<usize>,
    /// (model index, input tensor name), in config order.
    pub sources: Vec<(usize, String)>,
    /// Index of the base model among `sources`.
    pub base: Option<usize>,
    pub global: Params,
    pub per: Vec<Params>,
    /// Embedding or output head: rows follow the vocabulary.
    pub is_embed: bool,
}

pub struct Plan {
    pub method: Method,
    pub models: Vec<Store>,
    /// The model whose config and tokenizer the output starts from.
    pub reference: usize,
    pub tensors: Vec<Planned>,
    pub num_layers: usize,
    pub warnings: Vec<String>,
}

fn is_embed(name: &str) -> bool {
    name.contains("embed_tokens") || name.starts_with("lm_head")
}

/// mergekit's `ConfigReader.parameter`: per-source, then slice, then global parameters.
fn lookup(
    cfg: &MergeConfig,
    slice: &Slice,
    name: &str,
    model: Option<&str>,
    tensor: &str,
    t: f64,
) -> Option<crate::config::Value> {
    if let Some(m) = model {
        for s in slice.sources.iter().filter(|s| s.model == m) {
            if let Some(v) = s.parameters.get(name).and_then(|p| p.evaluate(tensor, t)) {
                return Some(v);
            }
        }
    }
    let levels: [&Parameters; 2] = [&slice.parameters, &cfg.parameters];
    levels.iter().find_map(|p| p.get(name).and_then(|s| s.evaluate(tensor, t)))
}

impl Plan {
    pub fn build(cfg: &MergeConfig) -> Result<Self> {
        let method = Method::parse(&cfg.method)?;
        if method.needs_base() && cfg.base_model.is_none() {
            return Err(Error::Config(format!("merge_method {}: needs base_model", method.name())));
        }
        let labels = cfg.referenced_models();
        let models: Vec<Store> = labels.iter().map(|l| Store::open(l)).collect::<Result<_>>()?;
        let idx = |label: &str| labels.iter().position(|l| l == label).unwrap_or(0);
        let mut warnings = vec![];

        // Normalise to slices.
        let slices: Vec<Slice> = match &cfg.layout {
            Layout::Slices(s) => s.clone(),
            Layout::Models(ms) => {
                let layers = |m: &str| models[idx(m)].config().map_or(0, |c| c.num_layers);
                let mut sources: Vec<Source> = ms
                    .iter()
                    .map(|(m, p)| Source { model: m.clone(), layers: (0, layers(m)), parameters: p.clone() })
                    .collect();
                if let Some(b) = &cfg.base_model {
                    if !ms.iter().any(|(m, _)| m == b) {
                        sources.push(Source {
                            model: b.clone(),
                            layers: (0, layers(b)),
                            parameters: Parameters::new(),
                        });
                    }
                }
                vec![Slice { sources, base_model: None, parameters: Parameters::new() }]
            }
        };
        let reference = cfg.base_model.as_deref().map_or_else(|| idx(&slices[0].sources[0].model), idx);
        check_architectures(&models, reference)?;

        // Parameters nobody reads are almost always typos: say so.
        let known: BTreeSet<&str> =
            method.global_params().iter().chain(method.tensor_params().iter()).map(|d| d.name).collect();
        let mut given: BTreeSet<String> = cfg.parameters.keys().cloned().collect();
        for s in &slices {
            given.extend(s.parameters.keys().cloned());
            given.extend(s.sources.iter().flat_map(|x| x.parameters.keys().cloned()));
        }
        if let Layout::Models(ms) = &cfg.layout {
            given.extend(ms.iter().flat_map(|(_, p)| p.keys().cloned()));
        }
        for g in given.iter().filter(|g| !known.contains(g.as_str())) {
            warnings.push(format!(
                "parameter '{g}' is not used by {} (it reads: {})",
                method.name(),
                known.iter().copied().collect::<Vec<_>>().join(", ")
            ));
        }

        let mut plan = Plan { method, models, reference, tensors: vec![], num_layers: 0, warnings };
        let refm = &plan.models[reference];
        let non_layer: Vec<String> = refm.names().iter().filter(|n| layer_of(n).is_none()).cloned().collect();
        let any_head = plan.models.iter().any(|m| m.has("lm_head.weight"));
        let (mut pre, mut post): (Vec<String>, Vec<String>) = if refm.config().is_some() {
            non_layer.iter().cloned().partition(|n| n.contains("embed_tokens"))
        } else {
            (non_layer.clone(), vec![])
        };
        if any_head && !post.iter().any(|n| n == "lm_head.weight") && refm.config().is_some() {
            post.push("lm_head.weight".into());
        }
        post.sort_by_key(|n| n.starts_with("lm_head"));
        pre.sort_by_key(|n| !n.contains("embed_tokens"));

        let first = &slices[0];
        let last = &slices[slices.len() - 1];
        for name in &pre {
            plan.add(cfg, first, name, 0.0, |_| name.clone(), &labels)?;
        }
        let mut out_layer = 0;
        for (si, slice) in slices.iter().enumerate() {
            let (a, b) = slice.sources[0].layers;
            for src in &slice.sources {
                let have = plan.models[idx(&src.model)].config().map_or(0, |c| c.num_layers);
                if src.layers.1 > have {
                    return Err(Error::Config(format!(
                        "slices[{si}]: layer_range [{}, {}] of '{}' goes past its {have} layers",
                        src.layers.0, src.layers.1, src.model
                    )));
                }
            }
            let n = b - a;
            for off in 0..n {
                let t = if n > 1 { off as f64 / (n - 1) as f64 } else { 1.0 };
                let src0 = &plan.models[idx(&slice.sources[0].model)];
                let suffixes: Vec<String> = src0
                    .names()
                    .iter()
                    .filter_map(|nm| layer_of(nm).filter(|(l, _)| *l == a + off).map(|(_, s)| s.to_owned()))
                    .collect();
                for suffix in suffixes {
                    let out = format!("model.layers.{out_layer}.{suffix}");
                    plan.add(
                        cfg,
                        slice,
                        &out,
                        t,
                        |src| format!("model.layers.{}.{suffix}", src.layers.0 + off),
                        &labels,
                    )?;
                }
                out_layer += 1;
            }
        }
        plan.num_layers = out_layer;
        for name in &post {
            plan.add(cfg, last, name, 0.0, |_| name.clone(), &labels)?;
        }
        Ok(plan)
    }

    /// Plans one output tensor from `slice`'s sources; `input_name` maps a source to its tensor.
    fn add(
        &mut self,
        cfg: &MergeConfig,
        slice: &Slice,
        out: &str,
        t: f64,
        input_name: impl Fn(&Source) -> String,
        labels: &[String],
    ) -> Result<()> {
        let base_label = slice.base_model.as_ref().or(cfg.base_model.as_ref());
        let mut sources = vec![];
        let mut per = vec![];
        let mut shapes = vec![];
        let mut base = None;
        for src in &slice.sources {
            let mi = labels.iter().position(|l| *l == src.model).unwrap_or(0);
            let m = &self.models[mi];
            let mut name = input_name(src);
            // A tied head is the embedding (mergekit's tied_names).
            if name == "lm_head.weight" && !m.has(&name) && m.has("model.embed_tokens.weight") {
                name = "model.embed_tokens.weight".into();
            }
            let shape = m
                .shape(&name)
                .ok_or_else(|| Error::Mismatch(format!("{}: missing tensor '{name}'", m.label)))?
                .to_vec();
            let is_base = base_label == Some(&src.model);
            if is_base {
                base = Some(sources.len());
            }
            let mut p = Params::new();
            for d in self.method.tensor_params() {
                match lookup(cfg, slice, d.name, Some(&src.model), &name, t).or(d.default) {
                    Some(v) => {
                        p.insert(d.name.into(), v);
                    }
                    None if is_base => {}
                    None => {
                        return Err(Error::Config(format!(
                            "missing parameter '{}' for model '{}' (tensor '{name}')",
                            d.name, src.model
                        )))
                    }
                }
            }
            sources.push((mi, name));
            per.push(p);
            shapes.push(shape);
        }
        let mut global = Params::new();
        for d in self.method.global_params() {
            match lookup(cfg, slice, d.name, None, out, t).or(d.default) {
                Some(v) => {
                    global.insert(d.name.into(), v);
                }
                None => return Err(Error::Config(format!("missing parameter '{}' (tensor '{out}')", d.name))),
            }
        }
        let embed = is_embed(out) && shapes.iter().all(|s| s.len() == 2);
        let shape = if shapes.iter().all(|s| *s == shapes[0]) {
            shapes[0].clone()
        } else if embed {
            // Vocabularies of different sizes: the common rows (mergekit); tokenizer_source fixes it.
            let s =
                vec![shapes.iter().map(|s| s[0]).min().unwrap_or(0), shapes.iter().map(|s| s[1]).min().unwrap_or(0)];
            if shapes.iter().any(|x| x[1] != s[1]) {
                return Err(Error::Mismatch(format!("tensor '{out}': embedding widths differ: {shapes:?}")));
            }
            if cfg.tokenizer == crate::config::TokenizerSource::Copy {
                self.warnings.push(format!(
                "tensor '{out}': vocabularies differ {:?}; keeping the common first {} rows (set tokenizer_source: union to align them by token)",
                shapes.iter().map(|s| s[0]).collect::<Vec<_>>(),
                s[0]
            ));
            }
            s
        } else {
            let detail: Vec<String> =
                sources.iter().zip(&shapes).map(|((m, _), s)| format!("{} {s:?}", self.models[*m].label)).collect();
            return Err(Error::Mismatch(format!("tensor '{out}': shapes do not match: {}", detail.join(", "))));
        };
        self.tensors.push(Planned { name: out.into(), shape, sources, base, global, per, is_embed: embed });
        Ok(())
    }
}

/// Models merged together must share the architecture's dimensions (the vocabulary may differ).
fn check_architectures(models: &[Store], reference: usize) -> Result<()> {
    let Some(r) = models[reference].config() else { return Ok(()) };
    for m in models {
        let Some(c) = m.config() else {
            return Err(Error::Mismatch(format!(
                "{}: not a language model (no config) but '{}' is",
                m.label, models[reference].label
            )));
        };
        let fields = [
            ("architecture", format!("{:?}", c.arch), format!("{:?}", r.arch)),
            ("hidden_size", c.hidden_size.to_string(), r.hidden_size.to_string()),
            ("intermediate_size", c.intermediate_size.to_string(), r.intermediate_size.to_string()),
            ("num_attention_heads", c.num_heads.to_string(), r.num_heads.to_string()),
            ("num_key_value_heads", c.num_kv_heads.to_string(), r.num_kv_heads.to_string()),
            ("head_dim", c.head_dim.to_string(), r.head_dim.to_string()),
        ];
        for (what, a, b) in fields {
            if a != b {
                return Err(Error::Mismatch(format!(
                    "{}: {what} {a} does not match {}'s {b}",
                    m.label, models[reference].label
                )));
            }
        }
    }
    Ok(())
}
