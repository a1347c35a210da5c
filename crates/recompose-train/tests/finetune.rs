//! The fine-tuning loop on a tiny seeded model: the same seed gives bit-identical adapters,
//! an interrupted run resumed from its checkpoint ends bit-identical to an uninterrupted one,
//! a checkpoint of another run is refused, a diverging run stops with its last good checkpoint,
//! full fine-tunes write a loadable model, and chat rows take loss on assistant turns only.

use recompose_core::testing::{write_tiny_gguf, TinySpec};
use recompose_core::weights::ModelFile;
use recompose_llm::lora::{LoraConfig, Target};
use recompose_llm::{LoadOptions, Model, Trainable, WeightMode};
use recompose_train::data;
use recompose_train::finetune::{self, FinetuneConfig, Mode, Observer, Paths};
use recompose_train::{Decay, OptimizerKind, Schedule};
use std::path::{Path, PathBuf};

struct Quiet;
impl Observer for Quiet {}

fn setup(dir: &Path) -> (ModelFile, PathBuf) {
    let model = dir.join("tiny.gguf");
    write_tiny_gguf(&model, &TinySpec { seed: 11, ..Default::default() }).unwrap();
    let text: String = (0..400)
        .map(|i| {
            ["the cat sat on the mat. ", "a dog ran far away! ", "we sing of arms and men; ", "to be or not to be. "]
                [i * 7 % 4]
        })
        .collect();
    let data = dir.join("text.txt");
    std::fs::write(&data, text).unwrap();
    (ModelFile::open(&model).unwrap(), data)
}

fn config(mode: Mode, steps: usize) -> FinetuneConfig {
    FinetuneConfig {
        mode,
        steps,
        batch: 2,
        accum: 2,
        schedule: Schedule { peak: 5e-3, warmup: 1, total: steps, decay: Decay::Cosine, min_ratio: 0.1 },
        optimizer: OptimizerKind::adamw(0.01),
        clip: Some(1.0),
        seed: 7,
        eval_every: 2,
        eval_rows: 4,
        checkpoint_every: 2,
        activation_checkpointing: true,
        stop_after: None,
    }
}

fn lora() -> Mode {
    Mode::Lora(LoraConfig { rank: 4, alpha: 8.0, dropout: 0.1, targets: Target::ALL.to_vec(), rslora: false })
}

/// Trains and writes the result to `out`; returns the run's summary losses.
fn train(
    file: &ModelFile,
    text: &Path,
    cfg: &FinetuneConfig,
    out: &Path,
    resume: bool,
) -> recompose_train::Result<Option<f64>> {
    let tok = file.tokenizer()?;
    let ds = data::load(&[text.to_path_buf()], &tok, 32)?;
    let (tr, held) = ds.split_last(0.1)?;
    let trainable = if cfg.mode == Mode::Full { Trainable::All } else { Trainable::None };
    let mut model = Model::load_with(file, LoadOptions { mode: WeightMode::F32, trainable, ..Default::default() })?;
    finetune::prepare(&mut model, &cfg.mode, cfg.seed)?;
    let s = finetune::run(&model, "tiny", &tr, &held, cfg, &Paths::beside(out), resume, &mut Quiet)?;
    if s.steps == cfg.steps {
        finetune::save_output(&mut model, file, "tiny", &cfg.mode, out)?;
    }
    Ok(s.last_eval.map(|e| e.eval_loss))
}

fn weights(out: &Path) -> Vec<u8> {
    let f =
        if out.join("adapter_model.safetensors").exists() { "adapter_model.safetensors" } else { "model.safetensors" };
    std::fs::read(out.join(f)).unwrap()
}

#[test]
fn same_seed_gives_bit_identical_adapters_and_training_lowers_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let (file, text) = setup(dir.path());
    let cfg = config(lora(), 6);
    train(&file, &text, &cfg, &dir.path().join("a"), false).unwrap();
    train(&file, &text, &cfg, &dir.path().join("b"), false).unwrap();
    assert_eq!(weights(&dir.path().join("a")), weights(&dir.path().join("b")));
    let other = FinetuneConfig { seed: 8, ..cfg.clone() };
    train(&file, &text, &other, &dir.path().join("c"), false).unwrap();
    assert_ne!(weights(&dir.path().join("a")), weights(&dir.path().join("c")));
    // The log's first held-out loss is before any step; the last after the last.
    let log = std::fs::read_to_string(dir.path().join("a.log.jsonl")).unwrap();
    let evals: Vec<f64> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("eval_loss")?.as_f64())
        .collect();
    assert_eq!(evals.len(), 4, "{log}");
    assert!(evals[3] < evals[0], "held-out loss {evals:?}");
}

#[test]
fn an_interrupted_run_resumes_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let (file, text) = setup(dir.path());
    let cfg = config(lora(), 5);
    train(&file, &text, &cfg, &dir.path().join("straight"), false).unwrap();
    let (out, stop) = (dir.path().join("resumed"), FinetuneConfig { stop_after: Some(3), ..cfg.clone() });
    train(&file, &text, &stop, &out, false).unwrap();
    assert!(!out.exists() && dir.path().join("resumed.checkpoint.safetensors").exists());
    train(&file, &text, &cfg, &out, true).unwrap();
    assert_eq!(weights(&dir.path().join("straight")), weights(&out));
    let steps = |p: &str| -> Vec<String> {
        std::fs::read_to_string(dir.path().join(p))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                for k in ["seconds", "tokens_per_s"] {
                    v.as_object_mut().unwrap().remove(k);
                }
                v.to_string()
            })
            .collect()
    };
    assert_eq!(steps("straight.log.jsonl"), steps("resumed.log.jsonl"));
}

#[test]
fn a_checkpoint_of_another_run_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (file, text) = setup(dir.path());
    let out = dir.path().join("x");
    let cfg = config(lora(), 4);
    train(&file, &text, &FinetuneConfig { stop_after: Some(2), ..cfg.clone() }, &out, false).unwrap();
    let other = FinetuneConfig { schedule: Schedule { peak: 1e-3, ..cfg.schedule }, ..cfg };
    let e = train(&file, &text, &other, &out, true).unwrap_err().to_string();
    assert!(e.contains("another run"), "{e}");
}

#[test]
fn a_diverging_run_stops_and_keeps_its_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (file, text) = setup(dir.path());
    let out = dir.path().join("boom");
    let mut cfg = config(lora(), 8);
    cfg.schedule.peak = 1e30;
    cfg.clip = None;
    cfg.checkpoint_every = 1;
    let e = train(&file, &text, &cfg, &out, false).unwrap_err().to_string();
    assert!(e.contains("lower") && e.contains("--lr") && e.contains("last good checkpoint"), "{e}");
    assert!(!out.exists());
    let ck = recompose_train::checkpoint::Loaded::open(&dir.path().join("boom.checkpoint.safetensors")).unwrap();
    let state = ck.state(Path::new("boom")).unwrap();
    let good = state["step"].as_u64().unwrap();
    assert!(good >= 1, "{state}");
    for t in ck.tensors.values() {
        assert!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|x| x.is_finite()));
    }
}

#[test]
fn a_full_fine_tune_writes_a_model_that_loads_and_generates_its_training_loss() {
    let dir = tempfile::tempdir().unwrap();
    let (file, text) = setup(dir.path());
    let out = dir.path().join("full");
    let cfg =
        FinetuneConfig { schedule: Schedule { peak: 1e-3, ..config(Mode::Full, 3).schedule }, ..config(Mode::Full, 3) };
    let last = train(&file, &text, &cfg, &out, false).unwrap().unwrap();
    // The written HF folder, loaded back, scores the held-out rows as the trained model did.
    let back = ModelFile::open(&out).unwrap();
    let m = Model::load_with(&back, LoadOptions::new(WeightMode::F32)).unwrap();
    let tok = back.tokenizer().unwrap();
    let (_, held) = data::load(&[text], &tok, 32).unwrap().split_last(0.1).unwrap();
    let (loss, _) = finetune::evaluate(&m, &held, 2, 4).unwrap();
    assert!((loss - last).abs() < 1e-4, "{loss} vs {last}");
}

#[test]
fn chat_rows_take_loss_on_assistant_turns_only() {
    let file = ModelFile::open(recompose_assets::main_file("smollm2-135m").unwrap()).unwrap();
    let tok = file.tokenizer().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("chat.jsonl");
    let row = |q: &str, a: &str| {
        serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
            .to_string()
    };
    std::fs::write(&p, format!("{}\n\n{}\n", row("Hi there", "Hello! How can I help?"), row("2+2?", "4."))).unwrap();
    let ds = data::load(std::slice::from_ref(&p), &tok, 256).unwrap();
    assert_eq!(ds.examples.len(), 2);
    let e = &ds.examples[0];
    let learned: Vec<u32> = e.targets.iter().copied().filter(|&t| t != recompose_llm::grad::IGNORE).collect();
    let text = tok.decode(&learned, false).unwrap();
    assert_eq!(text, "Hello! How can I help?<|im_end|>\n", "{text:?}");
    // Bad rows are named by line.
    std::fs::write(
        &p,
        format!("{}\n{}\n", row("a", "b"), r#"{"messages": [{"role": "user", "content": "only a question"}]}"#),
    )
    .unwrap();
    let err = data::load(std::slice::from_ref(&p), &tok, 256).err().unwrap().to_string();
    assert!(err.contains("chat.jsonl:2") && err.contains("no assistant turn"), "{err}");
    std::fs::write(&p, "\n\n").unwrap();
    let err = data::load(std::slice::from_ref(&p), &tok, 256).err().unwrap().to_string();
    assert!(err.contains("no conversations"), "{err}");
}
