//! Model hyper-parameters: a serde struct mirroring HF `config.json`, a reader for GGUF
//! metadata, and the validated runtime [`ModelConfig`] both become. Owns no weights.

use crate::error::{Error, Result};
use crate::gguf::{GgufFile, Value};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Gemma3,
}

impl Arch {
    pub fn gguf_name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Gemma3 => "gemma3",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "llama" | "mistral" | "LlamaForCausalLM" | "MistralForCausalLM" => Ok(Arch::Llama),
            "gemma3" | "gemma3_text" | "Gemma3ForCausalLM" => Ok(Arch::Gemma3),
            other => Err(Error::UnknownArchitecture(other.to_string())),
        }
    }
}

/// How RoPE pairs dimensions: GGUF Llama weights use adjacent pairs (the converter permuted Q/K);
/// HF checkpoints and GGUF Gemma use the two halves (NEOX).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    Interleaved,
    Neox,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Linear { factor: f64 },
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    GeluTanh,
}

/// One layer's sizes: FFN channels, query heads, KV heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerDims {
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
}

/// The validated runtime configuration every model is built from.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_eps: f64,
    pub rope_theta: f64,
    /// Gemma 3's sliding-window layers use their own base.
    pub rope_theta_local: f64,
    pub rope_scaling: RopeScaling,
    pub rope_style: RopeStyle,
    pub max_position: usize,
    pub tie_embeddings: bool,
    pub activation: Activation,
    /// Attention logits are multiplied by this (1/sqrt(head_dim) unless the config says otherwise).
    pub attn_scale: f64,
    /// Gemma multiplies embeddings by sqrt(hidden).
    pub embed_scale: Option<f64>,
    /// Gemma 3: local layers attend to the last `sliding_window` positions; every
    /// `sliding_pattern`-th layer is global.
    pub sliding_window: Option<usize>,
    pub sliding_pattern: usize,
    pub final_logit_softcap: Option<f64>,
    /// Per-layer sizes of a pruned or elastic sub-network whose layers differ (empty: every
    /// layer has `intermediate_size`, `num_heads`, `num_kv_heads`, which are then the largest).
    /// GGUF stores them as per-layer arrays of `feed_forward_length`, `attention.head_count`
    /// and `attention.head_count_kv`; config.json as lists under the same keys as the scalars.
    pub layer_dims: Vec<LayerDims>,
}

/// Ceilings on config sizes (the largest real models are far below them: ~130 layers, 16k
/// hidden, 53k FFN, 128 heads, 256k vocab, 10M context).
pub const MAX_LAYERS: usize = 4096;
pub const MAX_WIDTH: usize = 1 << 20;
pub const MAX_HEADS: usize = 4096;
pub const MAX_VOCAB: usize = 1 << 24;
/// Also what fits GGUF's u32 `context_length`.
pub const MAX_CONTEXT: usize = 1 << 26;

impl ModelConfig {
    /// The sizes of layer `l`.
    pub fn dims(&self, l: usize) -> LayerDims {
        self.layer_dims.get(l).copied().unwrap_or(LayerDims {
            intermediate: self.intermediate_size,
            heads: self.num_heads,
            kv_heads: self.num_kv_heads,
        })
    }

    /// Sets per-layer sizes (uniform ones are stored as plain scalars); the scalars become the
    /// largest values.
    pub fn with_layer_dims(mut self, dims: Vec<LayerDims>) -> Result<Self> {
        if dims.len() != self.num_layers {
            return Err(Error::InvalidConfig(format!("{} layer sizes for {} layers", dims.len(), self.num_layers)));
        }
        self.intermediate_size = dims.iter().map(|d| d.intermediate).max().unwrap_or(0);
        self.num_heads = dims.iter().map(|d| d.heads).max().unwrap_or(0);
        self.num_kv_heads = dims.iter().map(|d| d.kv_heads).max().unwrap_or(0);
        self.layer_dims = if dims.iter().all(|d| *d == dims[0]) { vec![] } else { dims };
        self.validate()
    }

    pub fn is_sliding(&self, layer: usize) -> bool {
        self.sliding_window.is_some() && self.sliding_pattern > 0 && (layer + 1) % self.sliding_pattern != 0
    }
    pub fn qk_norm(&self) -> bool {
        self.arch == Arch::Gemma3
    }

    /// Checks the invariants the model code relies on, and that no size is absurd.
    pub fn validate(self) -> Result<Self> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        if self.num_layers == 0 || self.hidden_size == 0 || self.vocab_size == 0 || self.intermediate_size == 0 {
            return bad("layers, hidden size, vocab size and intermediate size must be positive".into());
        }
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.num_heads % self.num_kv_heads != 0 {
            return bad(format!(
                "{} attention heads are not a multiple of {} KV heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || self.head_dim % 2 != 0 {
            return bad(format!("head dim {} must be even and positive", self.head_dim));
        }
        if !(self.rope_theta > 0.0) || !(self.rms_eps > 0.0) {
            return bad("rope theta and rms eps must be positive".into());
        }
        if self.max_position == 0 {
            return bad("context length must be positive".into());
        }
        // Sizes come from untrusted files and size what gets allocated (per-layer state, caches,
        // tables), so each has a ceiling far above any real model: an error instead of an
        // allocation that aborts the process.
        for (what, n, max) in [
            ("layers", self.num_layers, MAX_LAYERS),
            ("hidden size", self.hidden_size, MAX_WIDTH),
            ("intermediate size", self.intermediate_size, MAX_WIDTH),
            ("attention heads", self.num_heads, MAX_HEADS),
            ("head dim", self.head_dim, MAX_HEADS),
            ("vocab size", self.vocab_size, MAX_VOCAB),
            ("context length", self.max_position, MAX_CONTEXT),
        ] {
            if n > max {
                return bad(format!("{what} {n} is more than recompose accepts ({max})"));
            }
        }
        if !self.layer_dims.is_empty() {
            if self.layer_dims.len() != self.num_layers {
                return bad(format!("{} per-layer sizes for {} layers", self.layer_dims.len(), self.num_layers));
            }
            for (l, d) in self.layer_dims.iter().enumerate() {
                if d.intermediate == 0 || d.heads == 0 || d.kv_heads == 0 || d.heads % d.kv_heads != 0 {
                    return bad(format!(
                        "layer {l}: {} FFN channels, {} heads, {} KV heads (all positive, heads a multiple of KV heads)",
                        d.intermediate, d.heads, d.kv_heads
                    ));
                }
            }
        }
        Ok(self)
    }

    /// Reads `{arch}.*` keys of a GGUF file.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let path = g.path();
        let arch_name = g
            .get_str("general.architecture")
            .ok_or_else(|| Error::MissingKey { path: path.into(), key: "general.architecture".into() })?;
        let arch = Arch::parse(arch_name)?;
        let p = arch.gguf_name();
        let req = |k: &str| -> Result<u64> {
            let key = format!("{p}.{k}");
            let v = g.get(&key).ok_or_else(|| Error::MissingKey { path: path.into(), key: key.clone() })?;
            v.as_u64().ok_or_else(|| Error::BadKey {
                path: path.into(),
                key,
                what: "expected an unsigned integer".into(),
            })
        };
        let opt_f = |k: &str| g.get(&format!("{p}.{k}")).and_then(Value::as_f64);
        let opt_u = |k: &str| g.get(&format!("{p}.{k}")).and_then(Value::as_u64);
        // A size that is either one number or one per layer (llama.cpp's convention for pruned
        // models): (largest, per-layer list if an array).
        let sizes = |k: &str| -> Result<Option<(usize, Option<Vec<usize>>)>> {
            let key = format!("{p}.{k}");
            let Some(v) = g.get(&key) else { return Ok(None) };
            if let Some(n) = v.as_u64() {
                return Ok(Some((n as usize, None)));
            }
            let bad = || Error::BadKey {
                path: path.into(),
                key: key.clone(),
                what: "expected an unsigned integer or one per layer".into(),
            };
            let list: Vec<usize> = v
                .as_array()
                .ok_or_else(bad)?
                .iter()
                .map(|x| x.as_u64().map(|n| n as usize).ok_or_else(bad))
                .collect::<Result<_>>()?;
            Ok(Some((list.iter().copied().max().unwrap_or(0), Some(list))))
        };
        let hidden = req("embedding_length")? as usize;
        let (heads, heads_list) = sizes("attention.head_count")?
            .ok_or_else(|| Error::MissingKey { path: path.into(), key: format!("{p}.attention.head_count") })?;
        let (kv_heads, kv_list) = sizes("attention.head_count_kv")?.unwrap_or((heads, heads_list.clone()));
        let (ffn, ffn_list) = sizes("feed_forward_length")?
            .ok_or_else(|| Error::MissingKey { path: path.into(), key: format!("{p}.feed_forward_length") })?;
        let head_dim = opt_u("attention.key_length")
            .or_else(|| opt_u("rope.dimension_count"))
            .map(|v| v as usize)
            .unwrap_or(if heads > 0 { hidden / heads } else { 0 });
        let vocab = match opt_u("vocab_size") {
            Some(v) => v as usize,
            None => g.get("tokenizer.ggml.tokens").and_then(Value::as_array).map(|a| a.len()).unwrap_or(0),
        };
        let rope_scaling = match g.get_str(&format!("{p}.rope.scaling.type")) {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear { factor: opt_f("rope.scaling.factor").unwrap_or(1.0) },
            Some(other) => {
                return Err(Error::Unsupported(format!("{}: rope scaling '{other}' is not supported", path.display())))
            }
        };
        let is_gemma = arch == Arch::Gemma3;
        let cfg = ModelConfig {
            arch,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: ffn,
            num_layers: req("block_count")? as usize,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            rms_eps: opt_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: opt_f("rope.freq_base").unwrap_or(10_000.0),
            rope_theta_local: 10_000.0,
            rope_scaling,
            rope_style: if is_gemma { RopeStyle::Neox } else { RopeStyle::Interleaved },
            max_position: opt_u("context_length").unwrap_or(2048) as usize,
            tie_embeddings: !g.contains("output.weight"),
            activation: if is_gemma { Activation::GeluTanh } else { Activation::Silu },
            attn_scale: 1.0 / (head_dim as f64).sqrt(),
            embed_scale: is_gemma.then(|| (hidden as f64).sqrt()),
            sliding_window: if is_gemma { opt_u("attention.sliding_window").map(|v| v as usize) } else { None },
            sliding_pattern: if is_gemma { 6 } else { 0 },
            final_logit_softcap: opt_f("final_logit_softcapping"),
            layer_dims: vec![],
        };
        let cfg = cfg.validate()?;
        if ffn_list.is_none() && heads_list.is_none() && kv_list.is_none() {
            return Ok(cfg);
        }
        let dims = per_layer_dims(cfg.num_layers, (ffn, ffn_list), (heads, heads_list), (kv_heads, kv_list))
            .map_err(|what| Error::BadKey { path: path.into(), key: format!("{p}.feed_forward_length"), what })?;
        cfg.with_layer_dims(dims)
    }

    /// Reads an HF `config.json` text.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let mut raw: HfConfig =
            serde_json::from_str(text).map_err(|e| Error::InvalidConfig(format!("config.json: {e}")))?;
        if let Some(t) = raw.text_config.take() {
            let mut inner: HfConfig =
                serde_json::from_value(t).map_err(|e| Error::InvalidConfig(format!("config.json text_config: {e}")))?;
            if inner.model_type.is_none() {
                inner.model_type = Some("gemma3_text".into());
            }
            raw = inner;
        }
        raw.into_config()
    }
}

/// `config.json` as HF writes it (Llama, Mistral, Gemma 3 text); missing keys take HF defaults.
#[derive(Debug, Deserialize)]
pub struct HfConfig {
    pub model_type: Option<String>,
    #[serde(default)]
    pub architectures: Vec<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: Sizes,
    pub num_hidden_layers: usize,
    pub num_attention_heads: Sizes,
    pub num_key_value_heads: Option<Sizes>,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rope_local_base_freq: Option<f64>,
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers 5 moves `rope_theta` and scaling here.
    pub rope_parameters: Option<serde_json::Value>,
    pub max_position_embeddings: Option<usize>,
    pub tie_word_embeddings: Option<bool>,
    pub hidden_act: Option<String>,
    pub hidden_activation: Option<String>,
    pub query_pre_attn_scalar: Option<f64>,
    pub sliding_window: Option<usize>,
    pub sliding_window_pattern: Option<usize>,
    pub layer_types: Option<Vec<String>>,
    pub final_logit_softcapping: Option<f64>,
    pub text_config: Option<serde_json::Value>,
}

/// A size given once, or once per layer (pruned sub-networks).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Sizes {
    One(usize),
    PerLayer(Vec<usize>),
}

impl Sizes {
    fn split(&self) -> (usize, Option<Vec<usize>>) {
        match self {
            Sizes::One(n) => (*n, None),
            Sizes::PerLayer(v) => (v.iter().copied().max().unwrap_or(0), Some(v.clone())),
        }
    }
}

/// Per-layer sizes from (largest, optional list) pairs; a list must have one entry per layer.
fn per_layer_dims(
    layers: usize,
    ffn: (usize, Option<Vec<usize>>),
    heads: (usize, Option<Vec<usize>>),
    kv: (usize, Option<Vec<usize>>),
) -> std::result::Result<Vec<LayerDims>, String> {
    for (what, list) in [("FFN sizes", &ffn.1), ("head counts", &heads.1), ("KV head counts", &kv.1)] {
        if let Some(l) = list {
            if l.len() != layers {
                return Err(format!("{} {what} for {layers} layers", l.len()));
            }
        }
    }
    let at = |p: &(usize, Option<Vec<usize>>), l: usize| p.1.as_ref().map_or(p.0, |v| v[l]);
    Ok((0..layers)
        .map(|l| LayerDims { intermediate: at(&ffn, l), heads: at(&heads, l), kv_heads: at(&kv, l) })
        .collect())
}

impl HfConfig {
    fn into_config(self) -> Result<ModelConfig> {
        let arch_name =
            self.model_type.clone().or_else(|| self.architectures.first().cloned()).unwrap_or_else(|| "llama".into());
        let arch = Arch::parse(&arch_name)?;
        let is_gemma = arch == Arch::Gemma3;
        let rp = self.rope_parameters.as_ref();
        // transformers 5 may nest per layer type: {"full_attention": {...}, "sliding_attention": {...}}.
        let rp_global = rp.and_then(|v| v.get("full_attention")).or(rp);
        let rp_local = rp.and_then(|v| v.get("sliding_attention"));
        let theta_of = |v: Option<&serde_json::Value>| v.and_then(|v| v.get("rope_theta")).and_then(|t| t.as_f64());
        let rope_theta =
            self.rope_theta.or_else(|| theta_of(rp_global)).unwrap_or(if is_gemma { 1_000_000.0 } else { 10_000.0 });
        let rope_theta_local = self.rope_local_base_freq.or_else(|| theta_of(rp_local)).unwrap_or(10_000.0);
        let scaling = self.rope_scaling.as_ref().or(rp_global);
        let rope_scaling = parse_hf_rope_scaling(scaling)?;
        let (ffn, heads, kv) = (
            self.intermediate_size.split(),
            self.num_attention_heads.split(),
            self.num_key_value_heads.as_ref().unwrap_or(&self.num_attention_heads).split(),
        );
        let head_dim = self.head_dim.unwrap_or(self.hidden_size / heads.0.max(1));
        let act = self.hidden_activation.as_deref().or(self.hidden_act.as_deref()).unwrap_or("silu");
        let activation = match act {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_tanh" | "gelu" => Activation::GeluTanh,
            other => return Err(Error::Unsupported(format!("activation '{other}'"))),
        };
        let sliding_pattern = match (&self.layer_types, self.sliding_window_pattern) {
            // The first global layer gives the period; no global layer at all: every layer slides.
            (Some(types), _) => {
                types.iter().position(|t| t == "full_attention").map(|i| i + 1).unwrap_or(types.len() + 1)
            }
            (None, Some(p)) => p,
            (None, None) => {
                if is_gemma {
                    6
                } else {
                    0
                }
            }
        };
        let cfg = ModelConfig {
            arch,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: ffn.0,
            num_layers: self.num_hidden_layers,
            num_heads: heads.0,
            num_kv_heads: kv.0,
            head_dim,
            rms_eps: self.rms_norm_eps.unwrap_or(if is_gemma { 1e-6 } else { 1e-5 }),
            rope_theta,
            rope_theta_local,
            rope_scaling,
            rope_style: RopeStyle::Neox,
            max_position: self.max_position_embeddings.unwrap_or(2048),
            tie_embeddings: self.tie_word_embeddings.unwrap_or(is_gemma),
            activation,
            attn_scale: 1.0 / self.query_pre_attn_scalar.unwrap_or(head_dim as f64).sqrt(),
            embed_scale: is_gemma.then(|| (self.hidden_size as f64).sqrt()),
            sliding_window: if is_gemma { self.sliding_window } else { None },
            sliding_pattern,
            final_logit_softcap: self.final_logit_softcapping,
            layer_dims: vec![],
        }
        .validate()?;
        if ffn.1.is_none() && heads.1.is_none() && kv.1.is_none() {
            return Ok(cfg);
        }
        let layers = cfg.num_layers;
        cfg.with_layer_dims(
            per_layer_dims(layers, ffn, heads, kv).map_err(|e| Error::InvalidConfig(format!("config.json: {e}")))?,
        )
    }
}

fn parse_hf_rope_scaling(v: Option<&serde_json::Value>) -> Result<RopeScaling> {
    let Some(v) = v else { return Ok(RopeScaling::None) };
    let ty = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
    let f = |k: &str, d: f64| v.get(k).and_then(|x| x.as_f64()).unwrap_or(d);
    Ok(match ty {
        "default" | "none" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: f("factor", 1.0) },
        "llama3" => RopeScaling::Llama3 {
            factor: f("factor", 8.0),
            low_freq_factor: f("low_freq_factor", 1.0),
            high_freq_factor: f("high_freq_factor", 4.0),
            original_max_position: f("original_max_position_embeddings", 8192.0) as usize,
        },
        other => return Err(Error::Unsupported(format!("rope scaling '{other}' is not supported"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_transformers5_rope_parameters() {
        let text = r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,
            "rope_parameters":{"rope_theta":100000.0,"rope_type":"default"}}"#;
        let c = ModelConfig::from_hf_json(text).unwrap();
        assert_eq!(c.rope_theta, 100000.0);
        assert_eq!(c.head_dim, 4);
    }

    #[test]
    fn rejects_heads_not_multiple_of_kv_heads() {
        let text = r#"{"model_type":"llama","vocab_size":10,"hidden_size":12,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":3,"num_key_value_heads":2}"#;
        let e = ModelConfig::from_hf_json(text).unwrap_err().to_string();
        assert!(e.contains("not a multiple"), "{e}");
    }

    #[test]
    fn layer_types_without_a_global_layer_slide_everywhere() {
        let text = r#"{"model_type":"gemma3_text","vocab_size":10,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":2,"num_attention_heads":2,"num_key_value_heads":1,"head_dim":4,"sliding_window":8,
            "layer_types":["sliding_attention","sliding_attention"]}"#;
        let c = ModelConfig::from_hf_json(text).unwrap();
        assert!(c.is_sliding(0) && c.is_sliding(1));
        let text = text.replace(r#""sliding_attention"]"#, r#""full_attention"]"#);
        let c = ModelConfig::from_hf_json(&text).unwrap();
        assert!(c.is_sliding(0) && !c.is_sliding(1));
    }

    #[test]
    fn unknown_architecture_is_named() {
        let text = r#"{"model_type":"bert","vocab_size":10,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2}"#;
        let e = ModelConfig::from_hf_json(text).unwrap_err().to_string();
        assert!(e.contains("unknown architecture 'bert'"), "{e}");
    }

    #[test]
    fn absurd_sizes_are_errors_not_allocations() {
        for (key, v) in [("LAYERS", "10000000"), ("LAYERS", "4611686018427387904"), ("VOCAB", "4611686018427387904")] {
            let text = r#"{"model_type":"llama","vocab_size":VOCAB,"hidden_size":8,"intermediate_size":16,
                "num_hidden_layers":LAYERS,"num_attention_heads":2}"#;
            let text = text.replace(key, v).replace("LAYERS", "1").replace("VOCAB", "10");
            let e = ModelConfig::from_hf_json(&text).unwrap_err().to_string();
            assert!(e.contains("more than recompose accepts"), "{key}={v}: {e}");
        }
    }
}
