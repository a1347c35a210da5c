//! mergekit's YAML, read as mergekit reads it: `models:` or `slices:`, `parameters` at every level
//! (scalars, gradients interpolated over the layer index, lists of `filter`/`value` conditions where
//! the first matching filter wins). Unlike mergekit, an unknown key is an error, not silently ignored.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

/// A resolved parameter value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Num(f64),
    Bool(bool),
    Str(String),
}

impl Value {
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Num(x) => Some(*x),
            Value::Bool(b) => Some(*b as u8 as f64),
            Value::Str(_) => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            Value::Num(x) => Some(*x != 0.0),
            Value::Str(_) => None,
        }
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Num(x) => write!(f, "{x}"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Str(s) => write!(f, "{s}"),
        }
    }
}

/// A parameter as written in the YAML.
#[derive(Debug, Clone, PartialEq)]
pub enum Setting {
    Scalar(Value),
    /// Numbers interpolated linearly over t = layer / (layers - 1).
    Gradient(Vec<f64>),
    /// Non-numeric values indexed by t.
    Choices(Vec<Value>),
    /// `filter`/`value` pairs; the first whose filter is a substring of the tensor name wins
    /// (no filter or `*` matches everything).
    Conditional(Vec<(Option<String>, Setting)>),
}

impl Setting {
    fn parse(v: &serde_yaml::Value, at: &str) -> Result<Self> {
        use serde_yaml::Value as Y;
        let scalar = |v: &Y| -> Option<Value> {
            match v {
                Y::Number(n) => n.as_f64().map(Value::Num),
                Y::Bool(b) => Some(Value::Bool(*b)),
                Y::String(s) => Some(Value::Str(s.clone())),
                _ => None,
            }
        };
        if let Some(s) = scalar(v) {
            return Ok(Setting::Scalar(s));
        }
        match v {
            Y::Mapping(_) => Ok(Setting::Conditional(vec![Self::condition(v, at)?])),
            Y::Sequence(items) if items.is_empty() => Err(Error::Config(format!("{at}: empty list"))),
            Y::Sequence(items) => {
                if items.iter().all(|i| matches!(i, Y::Number(_))) {
                    Ok(Setting::Gradient(items.iter().filter_map(|i| i.as_f64()).collect()))
                } else if let Some(vals) = items.iter().map(scalar).collect::<Option<Vec<_>>>() {
                    Ok(Setting::Choices(vals))
                } else if items.iter().all(|i| matches!(i, Y::Mapping(_))) {
                    Ok(Setting::Conditional(items.iter().map(|i| Self::condition(i, at)).collect::<Result<_>>()?))
                } else {
                    Err(Error::Config(format!("{at}: a list must hold numbers, or filter/value maps, not a mix")))
                }
            }
            _ => Err(Error::Config(format!("{at}: expected a number, a list or filter/value maps"))),
        }
    }

    fn condition(v: &serde_yaml::Value, at: &str) -> Result<(Option<String>, Setting)> {
        let map = v.as_mapping().ok_or_else(|| Error::Config(format!("{at}: expected a filter/value map")))?;
        let mut filter = None;
        let mut value = None;
        for (k, x) in map {
            match k.as_str() {
                Some("filter") => {
                    filter = Some(
                        x.as_str().ok_or_else(|| Error::Config(format!("{at}.filter: expected a string")))?.to_owned(),
                    )
                }
                Some("value") => value = Some(Self::parse(x, &format!("{at}.value"))?),
                other => {
                    return Err(Error::Config(format!(
                        "{at}: unknown key '{}' in a condition (filter, value)",
                        other.unwrap_or("?")
                    )))
                }
            }
        }
        let value = value.ok_or_else(|| Error::Config(format!("{at}: condition without a 'value'")))?;
        Ok((filter, value))
    }

    /// Every number written in the setting. A gradient's points bound every value interpolated
    /// between them, so checking these checks all the values the setting can give.
    fn numbers(&self) -> Vec<f64> {
        match self {
            Setting::Scalar(Value::Num(x)) => vec![*x],
            Setting::Scalar(_) => vec![],
            Setting::Gradient(g) => g.clone(),
            Setting::Choices(c) => {
                c.iter().filter_map(|v| if let Value::Num(x) = v { Some(*x) } else { None }).collect()
            }
            Setting::Conditional(conds) => conds.iter().flat_map(|(_, s)| s.numbers()).collect(),
        }
    }

    /// mergekit's `evaluate_setting`: the value for `tensor` at layer fraction `t`.
    pub fn evaluate(&self, tensor: &str, t: f64) -> Option<Value> {
        match self {
            Setting::Scalar(v) => Some(v.clone()),
            Setting::Gradient(g) => {
                let scaled = t * (g.len() - 1) as f64;
                let i0 = scaled as usize;
                let i1 = (i0 + 1).min(g.len() - 1);
                let frac = scaled - i0 as f64;
                Some(Value::Num((1.0 - frac) * g[i0] + frac * g[i1]))
            }
            Setting::Choices(c) => Some(c[(t * (c.len() - 1) as f64) as usize].clone()),
            Setting::Conditional(conds) => conds
                .iter()
                .find(|(f, _)| f.as_deref().is_none_or(|f| f == "*" || tensor.contains(f)))
                .and_then(|(_, s)| s.evaluate(tensor, t)),
        }
    }
}

pub type Parameters = BTreeMap<String, Setting>;

/// Refuses a number no parameter can take, naming the parameter (`at`), the model (if any) and
/// the value. NaN and infinity mean nothing anywhere (`weight: .nan` used to write an all-NaN
/// model). `density` is the fraction of each delta kept: 0 keeps nothing (mergekit refuses it,
/// or divides by it) and above 1 is not a fraction.
fn check_numbers(key: &str, setting: &Setting, at: &str, model: Option<&str>) -> Result<()> {
    for x in setting.numbers() {
        let why = if !x.is_finite() {
            "is not a finite number"
        } else if key == "density" && !(x > 0.0 && x <= 1.0) {
            "is outside (0, 1] (density is the fraction of each delta kept)"
        } else {
            continue;
        };
        let whose = model.map(|m| format!(" of model '{m}'")).unwrap_or_default();
        return Err(Error::Config(format!("{at}{whose}: {x} {why}")));
    }
    Ok(())
}

/// The parameters of one level; `model` is the model they belong to, if they sit on one.
fn parse_params(
    raw: &Option<BTreeMap<String, serde_yaml::Value>>,
    at: &str,
    model: Option<&str>,
) -> Result<Parameters> {
    let mut out = Parameters::new();
    for (k, v) in raw.iter().flatten() {
        let at = format!("{at}.{k}");
        let setting = Setting::parse(v, &at)?;
        check_numbers(k, &setting, &at, model)?;
        out.insert(k.clone(), setting);
    }
    Ok(out)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    model: String,
    parameters: Option<BTreeMap<String, serde_yaml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    model: String,
    layer_range: (usize, usize),
    parameters: Option<BTreeMap<String, serde_yaml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSlice {
    sources: Vec<RawSource>,
    base_model: Option<String>,
    parameters: Option<BTreeMap<String, serde_yaml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokenizer {
    source: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    merge_method: String,
    base_model: Option<String>,
    models: Option<Vec<RawModel>>,
    slices: Option<Vec<RawSlice>>,
    parameters: Option<BTreeMap<String, serde_yaml::Value>>,
    dtype: Option<String>,
    out_dtype: Option<String>,
    tokenizer_source: Option<String>,
    tokenizer: Option<RawTokenizer>,
    chat_template: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Source {
    pub model: String,
    pub layers: (usize, usize),
    pub parameters: Parameters,
}

#[derive(Debug, Clone)]
pub struct Slice {
    pub sources: Vec<Source>,
    pub base_model: Option<String>,
    pub parameters: Parameters,
}

/// Where the merged model's tokenizer comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenizerSource {
    /// mergekit's default: the base model's tokenizer files copied, embeddings untouched.
    Copy,
    Base,
    Union,
    Model(String),
}

/// Either `models:` (whole models; layer ranges filled in from each model's depth) or `slices:`.
#[derive(Debug, Clone)]
pub enum Layout {
    Models(Vec<(String, Parameters)>),
    Slices(Vec<Slice>),
}

#[derive(Debug, Clone)]
pub struct MergeConfig {
    pub method: String,
    pub base_model: Option<String>,
    pub layout: Layout,
    pub parameters: Parameters,
    pub dtype: Option<String>,
    pub out_dtype: Option<String>,
    pub tokenizer: TokenizerSource,
    pub chat_template: Option<String>,
    /// The YAML as given, recorded in the output's metadata.
    pub text: String,
}

/// mergekit zoos merge tens of models. Every source of a tensor is in memory while it is merged,
/// so a config listing thousands (2,000 copies of one model aborted the process) is refused
/// before any model is opened. Counted over the whole config, which also bounds the plan.
const MAX_SOURCES: usize = 256;

/// mergekit configs nest a few levels. A file of 100,000 nested brackets kept the YAML parser
/// busy for a minute, so flow collections deeper than this are refused before parsing.
const MAX_DEPTH: usize = 64;

/// The deepest nesting of `[ ]` / `{ }` outside quotes and comments.
fn flow_depth(text: &str) -> usize {
    let (mut depth, mut most, mut quote) = (0usize, 0usize, None);
    for line in text.lines() {
        let mut prev = ' ';
        for ch in line.chars() {
            match quote {
                Some(q) if ch == q => quote = None,
                Some(_) => {}
                None => match ch {
                    '#' if prev.is_whitespace() => break,
                    '"' | '\'' => quote = Some(ch),
                    '[' | '{' => {
                        depth += 1;
                        most = most.max(depth);
                    }
                    ']' | '}' => depth = depth.saturating_sub(1),
                    _ => {}
                },
            }
            prev = ch;
        }
    }
    most
}

impl MergeConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| Error::Config(format!("{}: {}", path.display(), e.bare())))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let depth = flow_depth(text);
        if depth > MAX_DEPTH {
            return Err(Error::Config(format!(
                "brackets nested {depth} deep (at most {MAX_DEPTH}; a merge config needs a few)"
            )));
        }
        let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        if raw.models.is_some() == raw.slices.is_some() {
            return Err(Error::Config("exactly one of 'models' or 'slices' must be present".into()));
        }
        let (sources, what) = match (&raw.models, &raw.slices) {
            (Some(models), _) => (models.len(), "models"),
            (_, slices) => (slices.iter().flatten().map(|s| s.sources.len()).sum(), "slice sources"),
        };
        if sources > MAX_SOURCES {
            return Err(Error::Config(format!("{sources} {what} listed (at most {MAX_SOURCES}; merges take tens)")));
        }
        let layout = if let Some(models) = raw.models {
            if models.is_empty() {
                return Err(Error::Config("'models' is empty".into()));
            }
            Layout::Models(
                models
                    .into_iter()
                    .enumerate()
                    .map(|(i, m)| {
                        let p = parse_params(&m.parameters, &format!("models[{i}].parameters"), Some(&m.model))?;
                        Ok((m.model, p))
                    })
                    .collect::<Result<_>>()?,
            )
        } else {
            let slices = raw.slices.unwrap_or_default();
            if slices.is_empty() {
                return Err(Error::Config("'slices' is empty".into()));
            }
            let mut out = vec![];
            for (i, s) in slices.into_iter().enumerate() {
                if s.sources.is_empty() {
                    return Err(Error::Config(format!("slices[{i}]: no sources")));
                }
                let mut sources = vec![];
                for (j, src) in s.sources.into_iter().enumerate() {
                    let (a, b) = src.layer_range;
                    if a >= b {
                        return Err(Error::Config(format!(
                            "slices[{i}].sources[{j}].layer_range: [{a}, {b}] is empty"
                        )));
                    }
                    let at = format!("slices[{i}].sources[{j}].parameters");
                    let parameters = parse_params(&src.parameters, &at, Some(&src.model))?;
                    sources.push(Source { model: src.model, layers: (a, b), parameters });
                }
                let n = sources[0].layers.1 - sources[0].layers.0;
                if sources.iter().any(|s| s.layers.1 - s.layers.0 != n) {
                    return Err(Error::Config(format!("slices[{i}]: all sources must span the same number of layers")));
                }
                out.push(Slice {
                    sources,
                    base_model: s.base_model,
                    parameters: parse_params(&s.parameters, &format!("slices[{i}].parameters"), None)?,
                });
            }
            Layout::Slices(out)
        };
        let tokenizer = match (raw.tokenizer_source, raw.tokenizer) {
            (Some(_), Some(_)) => return Err(Error::Config("give 'tokenizer_source' or 'tokenizer', not both".into())),
            (Some(s), None) | (None, Some(RawTokenizer { source: s })) => match s.as_str() {
                "base" => TokenizerSource::Base,
                "union" => TokenizerSource::Union,
                _ => TokenizerSource::Model(s),
            },
            (None, None) => TokenizerSource::Copy,
        };
        for (key, d) in [("dtype", &raw.dtype), ("out_dtype", &raw.out_dtype)] {
            if let Some(d) = d {
                crate::store::parse_dtype(d).map_err(|e| Error::Config(format!("{key}: {e}")))?;
            }
        }
        Ok(Self {
            method: raw.merge_method,
            base_model: raw.base_model,
            layout,
            parameters: parse_params(&raw.parameters, "parameters", None)?,
            dtype: raw.dtype,
            out_dtype: raw.out_dtype,
            tokenizer,
            chat_template: raw.chat_template,
            text: text.to_owned(),
        })
    }

    /// Every model the config names, base first, each once, in order of appearance.
    pub fn referenced_models(&self) -> Vec<String> {
        let mut out: Vec<String> = self.base_model.iter().cloned().collect();
        let mut add = |m: &String| {
            if !out.contains(m) {
                out.push(m.clone());
            }
        };
        match &self.layout {
            Layout::Models(ms) => ms.iter().for_each(|(m, _)| add(m)),
            Layout::Slices(ss) => ss.iter().flat_map(|s| &s.sources).for_each(|s| add(&s.model)),
        }
        if let TokenizerSource::Model(m) = &self.tokenizer {
            add(m);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 100,000 nested brackets took the YAML parser about a minute; now a quick error.
    #[test]
    fn deeply_nested_brackets_are_refused_before_parsing() {
        let deep = format!("models: {}{}", "[".repeat(100_000), "]".repeat(100_000));
        let e = MergeConfig::parse(&deep).err().expect("accepted").to_string();
        assert!(e.contains("nested 100000 deep"), "{e}");
        // Brackets in quotes and comments do not count, and real configs pass.
        assert_eq!(flow_depth("a: \"[[[[\" # [[[[\nb: [1, [2, {c: 3}]]"), 3);
    }

    /// A ties merge of b onto a, with `params` on b.
    fn with_params(params: &str) -> String {
        format!("merge_method: ties\nbase_model: a\nmodels:\n  - model: a\n  - model: b\n    parameters: {params}\n")
    }

    fn refusal(yaml: &str) -> String {
        let e = MergeConfig::parse(yaml).err().map(|e| e.to_string()).unwrap_or_else(|| panic!("accepted: {yaml}"));
        assert!(!e.contains('\n'), "{e}");
        e
    }

    /// `.nan` and `.inf` used to be merged into an all-NaN model; now any number a parameter can
    /// take, as a scalar, in a gradient, in a condition or at any level, must be finite.
    #[test]
    fn a_nan_merge_weight_is_refused() {
        let cases = [
            (with_params("{weight: .nan}"), "models[1].parameters.weight of model 'b': NaN is not a finite number"),
            (with_params("{weight: .inf}"), "models[1].parameters.weight of model 'b': inf is not a finite number"),
            (with_params("{weight: [0.5, -.inf]}"), "weight of model 'b': -inf is not a finite number"),
            (with_params("{weight: [{filter: mlp, value: .nan}, {value: 1}]}"), "weight of model 'b': NaN"),
            (with_params("{weight: 1, epsilon: .nan}"), "models[1].parameters.epsilon of model 'b': NaN"),
            (with_params("{weight: 1}") + "parameters: {lambda: .inf}\n", "parameters.lambda: inf"),
            (
                "merge_method: slerp\nbase_model: a\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n      - model: b\n        layer_range: [0, 2]\n    parameters: {t: [0, .nan]}\n".into(),
                "slices[0].parameters.t: NaN",
            ),
            (
                "merge_method: linear\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n        parameters: {weight: .nan}\n".into(),
                "slices[0].sources[0].parameters.weight of model 'a': NaN",
            ),
        ];
        for (yaml, want) in cases {
            let e = refusal(&yaml);
            assert!(e.contains(want), "want {want:?}, got {e:?}");
        }
    }

    /// density is the fraction of each delta kept: 2 and -0.5 used to be accepted.
    #[test]
    fn density_outside_zero_one_is_refused() {
        for (params, value) in [
            ("{weight: 1, density: 2}", "2"),
            ("{weight: 1, density: -0.5}", "-0.5"),
            ("{weight: 1, density: 0}", "0"),
            ("{weight: 1, density: [0.5, 1.5]}", "1.5"),
            ("{weight: 1, density: [{filter: mlp, value: 0.5}, {value: 2}]}", "2"),
        ] {
            let e = refusal(&with_params(params));
            let want = format!("models[1].parameters.density of model 'b': {value} is outside (0, 1]");
            assert!(e.contains(&want), "want {want:?}, got {e:?}");
        }
        for ok in ["{weight: 1, density: 1}", "{weight: 1, density: [0.1, 1]}"] {
            assert!(MergeConfig::parse(&with_params(ok)).is_ok(), "{ok}");
        }
    }

    /// 2,000 copies of one model aborted the process; the count is refused before any model is opened.
    #[test]
    fn a_config_of_thousands_of_models_is_refused() {
        let mut yaml = "merge_method: linear\nmodels:\n".to_string();
        yaml += &"  - model: a\n    parameters: {weight: 1}\n".repeat(2000);
        assert!(refusal(&yaml).contains("2000 models listed (at most 256"));
        let mut yaml = "merge_method: linear\nslices:\n".to_string();
        yaml += &"  - sources:\n      - model: a\n        layer_range: [0, 1]\n".repeat(300);
        assert!(refusal(&yaml).contains("300 slice sources listed (at most 256"));
        let mut yaml = "merge_method: linear\nmodels:\n".to_string();
        yaml += &"  - model: a\n    parameters: {weight: 1}\n".repeat(256);
        assert!(MergeConfig::parse(&yaml).is_ok());
    }

    #[test]
    fn gradients_interpolate_as_mergekit_does() {
        let g = Setting::Gradient(vec![0.0, 0.5, 0.3, 0.7, 1.0]);
        // t = layer / (layers - 1); the list is stretched over [0, 1].
        let at = |t: f64| g.evaluate("x", t).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
        assert_eq!(at(0.0), 0.0);
        assert_eq!(at(1.0), 1.0);
        assert!((at(0.125) - 0.25).abs() < 1e-12); // halfway between 0 and 0.5
        assert!((at(0.5) - 0.3).abs() < 1e-12);
        assert!((at(0.625) - 0.5).abs() < 1e-12); // halfway between 0.3 and 0.7
        let one = Setting::Gradient(vec![0.7]);
        assert_eq!(one.evaluate("x", 0.4), Some(Value::Num(0.7)));
    }

    #[test]
    fn first_matching_filter_wins() {
        let yaml = "merge_method: slerp\nbase_model: a\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n      - model: b\n        layer_range: [0, 2]\nparameters:\n  t:\n    - filter: self_attn\n      value: [0, 1]\n    - filter: mlp\n      value: 0.25\n    - value: 0.5\n";
        let c = MergeConfig::parse(yaml).unwrap();
        let t = &c.parameters["t"];
        assert_eq!(t.evaluate("model.layers.0.self_attn.q_proj.weight", 1.0), Some(Value::Num(1.0)));
        assert_eq!(t.evaluate("model.layers.0.mlp.up_proj.weight", 1.0), Some(Value::Num(0.25)));
        assert_eq!(t.evaluate("model.norm.weight", 0.0), Some(Value::Num(0.5)));
        assert_eq!(c.referenced_models(), vec!["a".to_string(), "b".to_string()]);
    }

    #[test]
    fn bad_configs_name_the_key() {
        let cases = [
            ("merge_method: linear\nmodels:\n  - model: a\n    wieght: 1\n", "wieght"),
            ("merge_method: linear\nmodels: []\n", "empty"),
            ("merge_method: linear\n", "exactly one"),
            ("merge_method: linear\nmodels:\n  - model: a\nmodules: {}\n", "modules"),
            ("merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: [1, {filter: x, value: 1}]\n", "mix"),
            ("merge_method: linear\nmodels:\n  - model: a\ndtype: float8\n", "dtype"),
            (
                "merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: [3, 1]\n",
                "layer_range",
            ),
        ];
        for (yaml, needle) in cases {
            let e = MergeConfig::parse(yaml).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains(needle), "{yaml:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
