//! The fuzz targets: each feeds one input to a reader of untrusted data the way the product
//! does, touches what the reader returns, and describes the outcome in a short string (the
//! runner's novelty signal). A target may return any error; it must never panic, hang or
//! allocate without bound. Invariants worth asserting (a KV spec's display means the same spec)
//! are asserted with panics, so the runner reports them as crashes.

use crate::mutate::Format;
use recompose_core::gguf::GgufFile;
use recompose_core::weights::HfDir;
use recompose_core::{chat, ModelConfig, ModelFile, Tokenizer};
use recompose_merge::config::{Layout, Parameters};
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct Target {
    pub name: &'static str,
    pub about: &'static str,
    pub format: Format,
    /// Mutants are cut to this many bytes.
    pub max_len: usize,
    /// The format's own keywords, for the text mutators.
    pub dict: &'static [&'static str],
    /// Writes the fixed files the target reads beside its input, once per worker.
    pub prepare: Option<fn(&Path) -> std::io::Result<()>>,
    /// A longer hang bound than the run's, for a target whose bounded worst case is slow.
    pub timeout: Option<Duration>,
    /// Runs one input; says what happened, one entry per reader called (the novelty signal).
    pub run: fn(&Scratch, &[u8]) -> Vec<String>,
}

impl Target {
    /// Valid and near-valid examples, committed.
    pub fn corpus_dir(&self) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(self.name)
    }
    /// Inputs that crashed or hung before a fix: regression tests, and good seeds.
    pub fn crashes_dir(&self) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("crashes").join(self.name)
    }
    pub fn seeds(&self) -> Vec<(PathBuf, Vec<u8>)> {
        let mut v = load_dir(&self.corpus_dir());
        v.extend(load_dir(&self.crashes_dir()));
        v
    }
}

/// The inputs in `dir`, by name; `.log` files are notes beside them. A missing folder is empty.
pub fn load_dir(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return vec![] };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_none_or(|e| e != "log"))
        .collect();
    paths.sort();
    paths.into_iter().filter_map(|p| std::fs::read(&p).ok().map(|d| (p, d))).collect()
}

/// A worker's private folder for file-based targets, in RAM (`/dev/shm`) where there is one.
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new(target: &Target) -> std::io::Result<Self> {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
        let dir = tempfile::Builder::new().prefix("recompose-fuzz-").tempdir_in(base)?;
        if let Some(prepare) = target.prepare {
            prepare(dir.path())?;
        }
        Ok(Self { dir })
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    fn write(&self, name: &str, data: &[u8]) -> std::io::Result<PathBuf> {
        let p = self.dir.path().join(name);
        std::fs::write(&p, data)?;
        Ok(p)
    }
}

pub static TARGETS: &[Target] = &[
    Target {
        name: "gguf",
        about: "GGUF header, metadata and tensor table; config, tokenizer and shape checks on top",
        format: Format::Binary,
        max_len: 64 << 10,
        dict: &[],
        prepare: None,
        timeout: None,
        run: gguf,
    },
    Target {
        name: "safetensors",
        about: "one .safetensors file: header, offsets, every tensor loaded",
        format: Format::Mixed,
        max_len: 16 << 10,
        dict: &[
            "\"dtype\":",
            "\"shape\":",
            "\"data_offsets\":",
            "\"__metadata__\":",
            "\"F32\"",
            "\"F16\"",
            "\"BF16\"",
            "\"F64\"",
            "\"I64\"",
            "\"U8\"",
            "\"I8\"",
            "\"BOOL\"",
            "\"F8_E4M3\"",
            "[0, 0]",
            "[18446744073709551615]",
            "[4294967296, 4294967296]",
        ],
        prepare: None,
        timeout: None,
        run: safetensors,
    },
    Target {
        name: "safetensors_index",
        about: "model.safetensors.index.json over fixed shards and config.json; the same text as config.json",
        format: Format::Text,
        max_len: 16 << 10,
        dict: &[
            "\"weight_map\":",
            "\"metadata\":",
            "\"total_size\":",
            "\"model-00001-of-00003.safetensors\"",
            "\"model-00003-of-00003.safetensors\"",
            "\"model.safetensors\"",
            "\"config.json\"",
            "\"model.safetensors.index.json\"",
            "\"../config.json\"",
            "\"/etc/hostname\"",
            "\".\"",
            "\"\"",
            "\"model_type\":",
            "\"architectures\":",
            "\"hidden_size\":",
            "\"intermediate_size\":",
            "\"num_hidden_layers\":",
            "\"num_attention_heads\":",
            "\"num_key_value_heads\":",
            "\"head_dim\":",
            "\"vocab_size\":",
            "\"max_position_embeddings\":",
            "\"rope_theta\":",
            "\"rope_scaling\":",
            "\"rope_parameters\":",
            "\"rope_type\":",
            "\"llama3\"",
            "\"linear\"",
            "\"factor\":",
            "\"text_config\":",
            "\"gemma3_text\"",
            "\"layer_types\":",
            "\"sliding_attention\"",
            "\"sliding_window\":",
            "\"query_pre_attn_scalar\":",
            "[8, 16]",
        ],
        prepare: Some(crate::seeds::write_hf_fixture),
        timeout: None,
        run: safetensors_index,
    },
    Target {
        name: "merge_yaml",
        about: "a mergekit YAML config: parsed, models listed, every parameter evaluated",
        format: Format::Text,
        max_len: 16 << 10,
        dict: &[
            "merge_method:",
            "base_model:",
            "models:",
            "slices:",
            "sources:",
            "layer_range: [0, 2]",
            "parameters:",
            "weight:",
            "density:",
            "epsilon:",
            "lambda:",
            "t:",
            "normalize:",
            "filter:",
            "value:",
            "- model: a",
            "tokenizer_source:",
            "tokenizer:",
            "source:",
            "union",
            "base",
            "chat_template:",
            "dtype:",
            "out_dtype:",
            "&a ",
            "*a",
            "<<: *a",
            "!!str ",
            "!!binary ",
            "~",
            "- ",
            "  ",
            "---\n",
            "...\n",
            "|\n",
            "? ",
            ".nan",
            ".inf",
        ],
        prepare: None,
        timeout: None,
        run: merge_yaml,
    },
    Target {
        name: "kv_spec",
        about: "a --kv / \"kv\" policy string: parsed, displayed and parsed back, budgets resolved",
        format: Format::Text,
        max_len: 1 << 10,
        dict: &[
            "full", "window:", "h2o:", "sinks=", "recent=", "heavy=", "pos=", "cache", "original", "agg=", "mean",
            "sum", "max", "prefill=", "1", "0.5", "1.0", "1e-300", "1e308", "+1", "1_000",
        ],
        prepare: None,
        timeout: None,
        run: kv_spec,
    },
    Target {
        name: "request",
        about: "an OpenAI request body: JSON, chat and completion parameters, prompt, messages",
        format: Format::Text,
        max_len: 16 << 10,
        dict: &[
            "\"model\":",
            "\"messages\":",
            "\"prompt\":",
            "\"role\":",
            "\"content\":",
            "\"user\"",
            "\"system\"",
            "\"assistant\"",
            "\"max_tokens\":",
            "\"max_completion_tokens\":",
            "\"temperature\":",
            "\"top_p\":",
            "\"top_k\":",
            "\"min_p\":",
            "\"seed\":",
            "\"stop\":",
            "\"logprobs\":",
            "\"top_logprobs\":",
            "\"stream\":",
            "\"stream_options\":",
            "\"include_usage\":",
            "\"kv\":",
            "\"h2o:0.2\"",
            "\"n\":",
            "\"presence_penalty\":",
            "\"frequency_penalty\":",
            "\"type\":",
            "\"text\"",
            "\"image_url\"",
            "1e400",
            "9007199254740993",
            "\"\\ud800\"",
            "[]",
            "{}",
        ],
        prepare: None,
        timeout: None,
        run: request,
    },
    Target {
        name: "chat_content",
        about: "message content rendered by fixed ChatML, Llama 3 and Gemma templates",
        format: Format::Text,
        max_len: 4 << 10,
        dict: &["{{", "}}", "{%", "%}", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "[INST]", "<start_of_turn>"],
        prepare: None,
        timeout: None,
        run: chat_content,
    },
    // Last, so that in `all` a template that hangs (its thread cannot be stopped) slows no other.
    Target {
        name: "chat_template",
        about: "a Jinja chat template rendered over a fixed conversation",
        format: Format::Text,
        max_len: 16 << 10,
        dict: &[
            "{{ ",
            " }}",
            "{% ",
            " %}",
            "{%- ",
            " -%}",
            "{# ",
            " #}",
            "for m in messages",
            "endfor",
            "if ",
            "endif",
            "else",
            "elif ",
            "loop.index",
            "loop.cycle(",
            "messages[0]",
            "messages[-1]",
            "m.role",
            "m.content",
            "bos_token",
            "eos_token",
            "add_generation_prompt",
            "raise_exception(",
            "range(100000)",
            "recursive",
            "loop(",
            "macro ",
            "endmacro",
            "call ",
            "endcall",
            "set ",
            "namespace(",
            "|tojson",
            "|length",
            "|join",
            "|trim",
            "|replace(",
            "|batch(",
            "|indent(",
            " ~ ",
            " * ",
            " ** ",
            "'x' * 100000",
            "filter ",
            "endfilter",
            "include ",
            "extends ",
            "block ",
            "endblock",
        ],
        prepare: None,
        // Fuel stops a runaway template. Deeply nested loops spend ~10x longer per unit of fuel:
        // under the first limit (20M) the fuzzer found 5 KB of them that took 3.4 s (release);
        // under today's 2M they take a tenth of that, within the default bound.
        timeout: None,
        run: chat_template,
    },
];

pub fn find(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// "accepted" or the error's message: what the novelty signal is made of.
fn outcome<T, E: Display>(r: &Result<T, E>) -> String {
    match r {
        Ok(_) => "accepted".into(),
        Err(e) => e.to_string(),
    }
}

/// A size as a word per power of two: sizes count as new when their magnitude is (the runner
/// ignores numbers, so a number would never count).
fn magnitude(n: usize) -> String {
    format!("size{}", (b'a' + (usize::BITS - n.leading_zeros()) as u8) as char)
}

fn gguf(s: &Scratch, data: &[u8]) -> Vec<String> {
    let path = match s.write("fuzzed.gguf", data) {
        Ok(p) => p,
        Err(e) => return vec![format!("scratch: {e}")],
    };
    let g = match GgufFile::open(&path) {
        Ok(g) => g,
        Err(e) => return vec![e.to_string()],
    };
    let summary: usize = g.metadata.values().map(|v| v.summary().len()).sum();
    for t in g.tensors() {
        let bytes = g.bytes(&t.name).map(<[u8]>::len);
        let mapped = g.mapped(&t.name).map(|m| m.bytes().len());
        assert_eq!(bytes.ok(), mapped.ok(), "tensor {}: bytes() and mapped() disagree", t.name);
        // The reader has checked the extent against the file, so this stays small.
        let _ = g.dequantize(&t.name);
    }
    let config = ModelConfig::from_gguf(&g);
    let tokenizer = Tokenizer::from_gguf(&g).and_then(|t| {
        let ids = t.encode("Hello, world <s>", true)?;
        t.decode(&ids, false)
    });
    let model = ModelFile::open(&path).map(|m| m.tensor_entries().len());
    vec![
        format!(
            "tensors {} keys {} summary {}",
            magnitude(g.tensors().len()),
            magnitude(g.metadata.len()),
            magnitude(summary)
        ),
        outcome(&config),
        outcome(&tokenizer),
        outcome(&model),
    ]
}

/// Reads every tensor of an opened folder or file, as `inspect` and the loaders do.
fn walk(h: &HfDir) -> String {
    let names: Vec<String> = h.names().cloned().collect();
    let order = h.names_in_file_order();
    assert_eq!(order.len(), names.len(), "names_in_file_order lost tensors");
    let mut loaded = 0;
    for n in &names {
        let raw = h.raw(n).map(|(_, _, b)| b.len());
        let shape = h.dtype_shape(n).map(|(_, s)| s.to_vec());
        assert!(shape.is_some(), "{n} is listed but has no dtype/shape");
        loaded += h.load(n).is_ok() as usize;
        h.release(n);
        std::hint::black_box(raw);
    }
    format!("tensors {} loaded {} bytes {}", magnitude(names.len()), magnitude(loaded), magnitude(h.data_bytes()))
}

fn safetensors(s: &Scratch, data: &[u8]) -> Vec<String> {
    let opened = s
        .write("model.safetensors", data)
        .map_err(|e| format!("scratch: {e}"))
        .and_then(|p| HfDir::open_tensors(&p).map_err(|e| e.to_string()));
    vec![opened.map_or_else(|e| e, |h| walk(&h))]
}

fn safetensors_index(s: &Scratch, data: &[u8]) -> Vec<String> {
    if let Err(e) = s.write("model.safetensors.index.json", data) {
        return vec![format!("scratch: {e}")];
    }
    let dir = match HfDir::open(s.path()) {
        Ok(h) => walk(&h),
        Err(e) => e.to_string(),
    };
    let model = ModelFile::open(s.path()).map(|m| m.tensor_entries().len());
    let config = ModelConfig::from_hf_json(&String::from_utf8_lossy(data));
    vec![dir, outcome(&model), outcome(&config)]
}

fn merge_yaml(_: &Scratch, data: &[u8]) -> Vec<String> {
    let c = match recompose_merge::MergeConfig::parse(&String::from_utf8_lossy(data)) {
        Ok(c) => c,
        Err(e) => return vec![e.to_string()],
    };
    let mut all: Vec<&Parameters> = vec![&c.parameters];
    match &c.layout {
        Layout::Models(m) => all.extend(m.iter().map(|(_, p)| p)),
        Layout::Slices(s) => {
            for slice in s {
                all.push(&slice.parameters);
                all.extend(slice.sources.iter().map(|src| &src.parameters));
            }
        }
    }
    // Every setting at the first, a middle and the last layer, for a tensor most filters touch.
    let mut values = 0;
    for p in all {
        for setting in p.values() {
            for t in [0.0, 0.37, 1.0] {
                values += setting.evaluate("model.layers.0.self_attn.q_proj.weight", t).is_some() as usize;
            }
        }
    }
    vec![format!(
        "models {} values {} tokenizer {:?}",
        magnitude(c.referenced_models().len()),
        magnitude(values),
        std::mem::discriminant(&c.tokenizer)
    )]
}

fn kv_spec(_: &Scratch, data: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(data);
    let spec = match text.parse::<recompose_kv::KvSpec>() {
        Ok(s) => s,
        Err(e) => return vec![e.why],
    };
    // The display is what eval reports and logs record: it must mean the same policy.
    let shown = spec.to_string();
    match shown.parse::<recompose_kv::KvSpec>() {
        Ok(again) => assert_eq!(again, spec, "`{text}` displays as `{shown}`, which is another policy"),
        // The fuzz oracle's failure signal: the runner catches it and saves the input.
        Err(e) => panic!("`{text}` displays as `{shown}`, which does not parse: {}", e.why), // ok: fuzz oracle
    }
    // Prompt lengths from empty to the longest context recompose accepts.
    let lens = [0, 1, 7, 4096, recompose_core::config::MAX_CONTEXT];
    for b in spec.row_budgets(&lens).unwrap_or_default() {
        assert!(b.recent <= b.keep && b.keep > 0, "`{text}`: budget {b:?}");
    }
    vec![format!("accepted {shown}"), outcome(&cache_steps(&spec).map_err(|e| e.to_string()))]
}

/// A 3-token prompt and one decoded token through the cache `spec` builds for a small model,
/// as the server does for a request's "kv" field: what a spec sizes is allocated here.
fn cache_steps(spec: &recompose_kv::KvSpec) -> recompose_llm::Result<usize> {
    use candle_core::{DType, Device, Tensor};
    use recompose_core::config::{RopeScaling, RopeStyle};
    use recompose_llm::kv::{CacheLayout, Step};
    let (heads, kv_heads, dim) = (4, 2, 8);
    let rope = std::sync::Arc::new(recompose_llm::rope::Rope::new(dim, 1e4, &RopeScaling::None, RopeStyle::Neox));
    let layout = CacheLayout {
        num_layers: 1,
        num_heads: heads,
        kv_heads,
        head_dim: dim,
        max_len: 64,
        windows: vec![None],
        ropes: vec![rope],
        device: Device::Cpu,
    };
    let mut cache = spec.build(&layout, &[3]);
    for (start, t) in [(0, 3), (3, 1)] {
        cache.begin_step(&Step { start: vec![start], lens: vec![t], t })?;
        let k = Tensor::ones((1, kv_heads, t, dim), DType::F32, &Device::Cpu)?;
        let view = cache.update(0, &k, &k, None)?;
        if cache.wants_probs() {
            let len = view.k.dim(2)?;
            cache.observe(0, &Tensor::ones((1, heads, len), DType::F32, &Device::Cpu)?)?;
        }
        cache.end_step()?;
        if start == 0 {
            cache.end_prefill()?;
        }
    }
    Ok(cache.resident_bytes())
}

fn request(_: &Scratch, data: &[u8]) -> Vec<String> {
    use recompose_serve::api;
    let m = match api::parse_json(data) {
        Ok(m) => m,
        Err(e) => return vec![e.message],
    };
    let errs = [
        api::parse_params(&m, true).err(),
        api::parse_params(&m, false).err(),
        api::parse_prompt(&m).err(),
        api::parse_messages(&m).err(),
    ];
    errs.iter()
        .map(|e| match e {
            None => "accepted".to_string(),
            Some(e) => {
                assert!((400..600).contains(&e.status), "status {} for {}", e.status, e.message);
                e.body()["error"]["message"].as_str().unwrap_or_default().to_string()
            }
        })
        .collect()
}

/// The conversation every template renders: each role, a turn ending in a user message.
fn conversation(content: &str) -> Vec<chat::Message> {
    [("system", "Be brief."), ("user", content), ("assistant", "Hi."), ("user", "And then?")]
        .into_iter()
        .map(|(role, content)| chat::Message { role: role.into(), content: content.into() })
        .collect()
}

fn render(template: &str, content: &str) -> recompose_core::Result<String> {
    chat::render(template, &conversation(content), true, "<s>", "</s>")
}

fn chat_template(_: &Scratch, data: &[u8]) -> Vec<String> {
    vec![render(&String::from_utf8_lossy(data), "Hello").map_or_else(|e| e.to_string(), |out| magnitude(out.len()))]
}

const CHATML: &str = include_str!("../corpus/chat_template/chatml.jinja");
const LLAMA3: &str = include_str!("../corpus/chat_template/llama3.jinja");
const GEMMA: &str = include_str!("../corpus/chat_template/gemma.jinja");

fn chat_content(_: &Scratch, data: &[u8]) -> Vec<String> {
    let content = String::from_utf8_lossy(data);
    // Content is data, never template: ChatML prints it untouched, so it must appear verbatim.
    let chatml = render(CHATML, &content);
    if let Ok(out) = &chatml {
        assert!(out.contains(&*content), "ChatML output lost or rewrote the content");
    }
    [outcome(&chatml), outcome(&render(LLAMA3, &content)), outcome(&render(GEMMA, &content))].into()
}
