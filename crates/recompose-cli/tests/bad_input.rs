//! Bad input through the real binary: each case must exit non-zero with exactly one line on
//! stderr starting with "error:", and never panic.

use recompose_core::gguf::{write_gguf, GgufFile, Value};
use recompose_core::testing::{write_tiny_gguf, TinySpec};
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{fails, recompose, succeeds};

fn tiny(dir: &Path, spec: TinySpec) -> PathBuf {
    let p = dir.join("tiny.gguf");
    write_tiny_gguf(&p, &spec).unwrap();
    p
}

#[test]
fn tiny_model_generates() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path(), TinySpec::default());
    let (code, out, err) =
        recompose(d.path(), &["generate", "-q", "-m", m.to_str().unwrap(), "-p", "hello", "-n", "5", "--ignore-eos"]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.is_empty());
}

#[test]
fn truncated_gguf_is_reported() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path(), TinySpec::default());
    let bytes = std::fs::read(&m).unwrap();
    let cut = d.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = fails(d.path(), &["inspect", cut.to_str().unwrap()]);
    assert!(e.contains("runs past the end of the file"), "{e}");
    std::fs::write(&cut, &bytes[..100]).unwrap();
    let e = fails(d.path(), &["inspect", cut.to_str().unwrap()]);
    assert!(e.contains("truncated or corrupt GGUF header"), "{e}");
}

#[test]
fn wrong_magic_is_reported() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("x.gguf");
    std::fs::write(&p, b"GGML\x03\x00\x00\x00rest of a file that is not gguf").unwrap();
    let e = fails(d.path(), &["generate", "-m", p.to_str().unwrap(), "-p", "hi"]);
    assert!(e.contains("not a GGUF file"), "{e}");
}

#[test]
fn tensor_running_past_the_end_is_reported() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path(), TinySpec::default());
    let bytes = std::fs::read(&m).unwrap();
    let cut = d.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 4]).unwrap();
    let e = fails(d.path(), &["generate", "-m", cut.to_str().unwrap(), "-p", "hi"]);
    assert!(e.contains("runs past the end of the file"), "{e}");
}

/// Rewrites a GGUF with edited metadata and without some tensors.
fn rewrite(src: &Path, dst: &Path, drop: &str, set: Option<(&str, Value)>) {
    rewrite_with(src, dst, drop, |meta| {
        if let Some((k, v)) = set {
            meta.retain(|(kk, _)| kk != k);
            meta.push((k.to_string(), v));
        }
    })
}

/// Rewrites a GGUF with its metadata list edited by `edit` and without the tensor `drop`.
fn rewrite_with(src: &Path, dst: &Path, drop: &str, edit: impl FnOnce(&mut Vec<(String, Value)>)) {
    let g = GgufFile::open(src).unwrap();
    let mut meta: Vec<(String, Value)> = g.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    edit(&mut meta);
    let tensors: Vec<_> =
        g.tensors().iter().filter(|t| t.name != drop).map(|t| (t.name.clone(), g.qtensor(&t.name).unwrap())).collect();
    write_gguf(dst, &meta, &tensors).unwrap();
}

#[test]
fn missing_tensor_is_named() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path(), TinySpec::default());
    let p = d.path().join("missing.gguf");
    rewrite(&m, &p, "blk.1.attn_q.weight", None);
    let e = fails(d.path(), &["generate", "-m", p.to_str().unwrap(), "-p", "hi"]);
    assert!(e.contains("missing tensor 'blk.1.attn_q.weight'"), "{e}");
}

#[test]
fn unknown_architecture_is_named() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path(), TinySpec::default());
    let p = d.path().join("bert.gguf");
    rewrite(&m, &p, "", Some(("general.architecture", Value::String("bert".into()))));
    let e = fails(d.path(), &["inspect", p.to_str().unwrap()]);
    assert!(e.contains("unknown architecture 'bert'"), "{e}");
}

#[test]
fn shape_that_contradicts_the_config_is_named() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path(), TinySpec::default());
    let p = d.path().join("wide.gguf");
    rewrite(&m, &p, "", Some(("llama.feed_forward_length", Value::U32(96))));
    let e = fails(d.path(), &["generate", "-m", p.to_str().unwrap(), "-p", "hi"]);
    assert!(e.contains("blk.0.ffn_gate.weight") && e.contains("does not match"), "{e}");
}

/// `generate --chat` with a template that loops without end fails with one line (it used to
/// never return).
#[test]
fn a_runaway_chat_template_fails_generate_with_one_line() {
    let d = tempfile::tempdir().unwrap();
    let template = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}";
    let m = tiny(d.path(), TinySpec { chat_template: template, ..Default::default() });
    let e = fails(d.path(), &["generate", "-m", m.to_str().unwrap(), "--chat", "-p", "hi", "-n", "2"]);
    assert!(e.contains("instructions"), "{e}");
}

/// An HF folder whose config.json contradicts its tensors is refused by inspect and convert, with
/// the tensor named (both used to succeed, and convert wrote a GGUF that then failed to load).
#[test]
fn hf_shapes_are_checked_against_config_json() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path(), TinySpec::default());
    let hf = d.path().join("hf");
    succeeds(d.path(), &["convert", m.to_str().unwrap(), hf.to_str().unwrap()]);
    let cfg = hf.join("config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    c["intermediate_size"] = 96.into();
    std::fs::write(&cfg, c.to_string()).unwrap();
    let out = d.path().join("out.gguf");
    for args in [vec!["inspect", hf.to_str().unwrap()], vec!["convert", hf.to_str().unwrap(), out.to_str().unwrap()]] {
        let e = fails(d.path(), &args);
        assert!(e.contains("model.layers.0.mlp.gate_proj.weight") && e.contains("does not match"), "{e}");
    }
    assert!(!out.exists());
}

/// convert refuses a GGUF whose tokenizer inspect would reject, instead of writing a copy that
/// no command can open.
#[test]
fn convert_refuses_a_tokenizer_that_would_not_read_back() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path(), TinySpec::default());
    let p = d.path().join("badtok.gguf");
    rewrite(&m, &p, "", Some(("tokenizer.ggml.merges", Value::Array(vec![Value::String("nospace".into())]))));
    assert!(fails(d.path(), &["inspect", p.to_str().unwrap()]).contains("malformed merge"));
    let out = d.path().join("out.gguf");
    let e = fails(d.path(), &["convert", p.to_str().unwrap(), out.to_str().unwrap(), "--dtype", "q8_0"]);
    assert!(e.contains("malformed merge"), "{e}");
    assert!(!out.exists());
}

/// A size field far beyond any model (`block_count` 10 million or 2^62) is an error, not an
/// allocation until the process aborts (it used to end with "memory allocation of ... failed").
#[test]
fn absurd_block_count_is_an_error_not_an_abort() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path(), TinySpec::default());
    for n in [10_000_000u64, 1 << 62] {
        let p = d.path().join(format!("layers-{n}.gguf"));
        rewrite(&m, &p, "", Some(("llama.block_count", Value::U64(n))));
        for cmd in ["inspect", "generate"] {
            let args: Vec<&str> = match cmd {
                "inspect" => vec!["inspect", p.to_str().unwrap()],
                _ => vec!["generate", "-m", p.to_str().unwrap(), "-p", "hi"],
            };
            let e = fails(d.path(), &args);
            assert!(e.contains(&format!("layers {n} is more than recompose accepts")), "{e}");
        }
    }
}

/// `--threads 100000` used to start that many threads and hang; it is capped with a warning.
#[test]
fn absurd_thread_count_is_capped_with_a_warning() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path(), TinySpec::default());
    let (code, out, err) = recompose(d.path(), &["--threads", "100000", "inspect", m.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("--threads 100000: using"), "{err}");
    assert!(out.contains("architecture"), "{out}");
}

/// A missing file is named once: the OS error used to be printed twice through the error chain
/// ("nope.gguf: no such file or directory: no such file or directory").
#[test]
fn a_missing_file_is_reported_once() {
    let d = tempfile::tempdir().unwrap();
    let e = fails(d.path(), &["inspect", "nope.gguf"]);
    assert_eq!(e.matches("no such file").count(), 1, "{e}");
}

/// A shard index may only name files of its own folder (it used to open any absolute path).
#[test]
fn a_shard_index_cannot_point_outside_the_model_folder() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path(), TinySpec::default());
    let hf = d.path().join("hf");
    succeeds(d.path(), &["convert", "-q", m.to_str().unwrap(), hf.to_str().unwrap()]);
    let outside = d.path().join("outside.safetensors");
    std::fs::copy(hf.join("model.safetensors"), &outside).unwrap();
    std::fs::remove_file(hf.join("model.safetensors")).unwrap();
    for shard in [outside.to_str().unwrap().to_string(), "../outside.safetensors".into()] {
        let index = serde_json::json!({"metadata": {}, "weight_map": {"model.embed_tokens.weight": shard}});
        std::fs::write(hf.join("model.safetensors.index.json"), index.to_string()).unwrap();
        let e = fails(d.path(), &["inspect", hf.to_str().unwrap()]);
        assert!(e.contains("not a file of the model folder"), "{e}");
    }
}

/// A metadata key written twice used to let the last copy win silently; it is an error.
#[test]
fn a_duplicated_gguf_key_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path(), TinySpec::default());
    let p = d.path().join("dup.gguf");
    rewrite_with(&m, &p, "", |meta| meta.push(("llama.block_count".into(), Value::U32(1))));
    let e = fails(d.path(), &["inspect", p.to_str().unwrap()]);
    assert!(e.contains("metadata key 'llama.block_count' appears twice"), "{e}");
}

/// Two tensors whose data ranges overlap used to be accepted.
#[test]
fn overlapping_gguf_tensor_data_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path(), TinySpec::default());
    let g = GgufFile::open(&m).unwrap();
    let (first, second) = (&g.tensors()[0], &g.tensors()[1]);
    let mut bytes = std::fs::read(&m).unwrap();
    // Where a tensor info keeps its data offset: after the name (u64 length + bytes), n_dims
    // (u32), the dims (u64 each) and the type (u32).
    let offset_at = |bytes: &[u8], t: &recompose_core::gguf::TensorInfo| {
        let name = t.name.as_bytes();
        let at = bytes.windows(name.len()).position(|w| w == name).unwrap();
        at + name.len() + 4 + 8 * t.shape.len() + 4
    };
    let (from, to) = (offset_at(&bytes, first), offset_at(&bytes, second));
    let first_offset: [u8; 8] = bytes[from..from + 8].try_into().unwrap();
    bytes[to..to + 8].copy_from_slice(&first_offset);
    let p = d.path().join("overlap.gguf");
    std::fs::write(&p, &bytes).unwrap();
    let e = fails(d.path(), &["inspect", p.to_str().unwrap()]);
    assert!(e.contains("overlaps tensor"), "{e}");
}

/// A flag that needs another names it: the one-line error used to stop at "the following
/// required arguments were not provided:".
#[test]
fn a_missing_required_flag_is_named() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path(), TinySpec::default());
    let e = fails(d.path(), &["generate", "-m", m.to_str().unwrap(), "-p", "hi", "--system", "be brief"]);
    assert!(e.contains("--chat"), "{e}");
}

/// Errors from the format libraries are said in words, not as their variant names
/// (`MetadataIncompleteBuffer`, `TensorInvalidInfo`, `unknown value type 9` used to be printed).
#[test]
fn library_errors_are_said_in_words() {
    let d = tempfile::tempdir().unwrap();
    let hf = d.path().join("hf");
    std::fs::create_dir(&hf).unwrap();
    std::fs::write(hf.join("config.json"), r#"{"model_type":"llama","vocab_size":258,"hidden_size":64,"intermediate_size":128,"num_hidden_layers":1,"num_attention_heads":4}"#).unwrap();
    let shard = |header: &str, data: usize| {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(vec![0u8; data]);
        std::fs::write(hf.join("model.safetensors"), bytes).unwrap();
    };
    for (header, data, words, variant) in [
        // Far fewer bytes than the header claims.
        (
            r#"{"model.embed_tokens.weight":{"dtype":"F32","shape":[258,64],"data_offsets":[0,66048]}}"#,
            100,
            "invalid safetensors",
            "Metadata",
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            100,
            "not fully covered",
            "MetadataIncompleteBuffer",
        ),
        (r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, 8, "invalid shape", "TensorInvalidInfo"),
    ] {
        shard(header, data);
        let e = fails(d.path(), &["inspect", hf.to_str().unwrap()]);
        assert!(e.contains(words) && !e.contains(variant), "{e}");
    }
    let m = tiny(d.path(), TinySpec::default());
    let p = d.path().join("deep.gguf");
    let deep = (0..6).fold(Value::U32(1), |v, _| Value::Array(vec![v]));
    rewrite(&m, &p, "", Some(("general.deep", deep)));
    let e = fails(d.path(), &["inspect", p.to_str().unwrap()]);
    assert!(e.contains("nests arrays deeper") && !e.contains("type 9"), "{e}");
}

#[test]
fn prompt_longer_than_context_is_reported() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path(), TinySpec { context: 16, ..Default::default() });
    let e = fails(
        d.path(),
        &["generate", "-m", m.to_str().unwrap(), "-p", "a prompt that is far longer than sixteen tokens"],
    );
    assert!(e.contains("does not fit the context of 16"), "{e}");
}

#[test]
fn bad_sampling_values_are_rejected() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path(), TinySpec::default());
    let e = fails(d.path(), &["generate", "-m", m.to_str().unwrap(), "-p", "hi", "--top-p", "0"]);
    assert!(e.contains("top-p"), "{e}");
}

#[test]
fn convert_refuses_existing_output_and_unknown_dtype() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path(), TinySpec::default());
    let out = d.path().join("exists");
    std::fs::create_dir(&out).unwrap();
    let e = fails(d.path(), &["convert", m.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(e.contains("already exists"), "{e}");
    let (code, _, err) = recompose(d.path(), &["convert", m.to_str().unwrap(), "x.gguf", "--dtype", "q3_x"]);
    assert_ne!(code, 0);
    assert!(err.contains("unknown dtype 'q3_x'"), "{err}");
}

#[test]
fn unknown_asset_is_named() {
    let d = tempfile::tempdir().unwrap();
    let e = fails(d.path(), &["fetch", "llama-70b"]);
    assert!(e.contains("unknown asset 'llama-70b'"), "{e}");
}

#[test]
fn bounded_kv_policies_generate_and_stream() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path(), TinySpec::default());
    let m = m.to_str().unwrap();
    for kv in ["window:8,sinks=2", "window:0.5,pos=original", "h2o:8", "h2o:0.2,agg=max,prefill=4"] {
        let (code, out, err) = recompose(
            d.path(),
            &["generate", "-q", "-m", m, "-p", "hello there, friend", "-n", "12", "--ignore-eos", "--kv", kv],
        );
        assert_eq!(code, 0, "{kv}: {err}");
        assert!(!out.is_empty(), "{kv}");
        assert!(err.contains("KV cache"), "{kv}: {err}");
    }
    let text = d.path().join("text.txt");
    std::fs::write(&text, "All the world's a stage. ".repeat(8)).unwrap();
    let (code, out, err) =
        recompose(d.path(), &["eval", "ppl", "-q", "-m", m, "--data", text.to_str().unwrap(), "--kv", "h2o:16"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("perplexity") && out.contains("streamed 1 at a time"), "{out}");
}

#[test]
fn invalid_kv_specs_are_rejected() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path(), TinySpec::default());
    for (kv, why) in [
        ("h2o:0", "at least 1"),
        ("lru:64", "unknown policy `lru`"),
        ("h2o:64,recent=100", "recent 100 is larger than the total 64"),
        ("window:4,sinks=4", "no room"),
    ] {
        for cmd in [&["generate", "-p", "hi"][..], &["eval", "ppl"], &["eval", "mmlu"], &["bench"]] {
            let mut args = cmd.to_vec();
            args.extend(["-m", m.to_str().unwrap(), "--kv", kv]);
            let e = fails(d.path(), &args);
            assert!(e.contains(why), "{cmd:?} {kv}: {e}");
        }
    }
}

#[test]
fn merge_tv_and_rws_run_and_reject_bad_input_with_one_line() {
    let d = tempfile::tempdir().unwrap();
    let h = d.path();
    let a = h.join("a.gguf");
    let b = h.join("b.gguf");
    write_tiny_gguf(&a, &TinySpec { seed: 1, ..Default::default() }).unwrap();
    write_tiny_gguf(&b, &TinySpec { seed: 2, ..Default::default() }).unwrap();
    let yaml = |method: &str, extra: &str| {
        format!(
            "merge_method: {method}\nbase_model: {0}\nmodels:\n  - model: {0}\n  - model: {1}\n    parameters:\n      weight: 0.5\n{extra}",
            a.display(),
            b.display()
        )
    };
    let cfg = h.join("m.yml");
    let write = |text: &str| std::fs::write(&cfg, text).unwrap();
    let c = cfg.to_str().unwrap();
    let out = h.join("out");
    let o = out.to_str().unwrap();
    // A good merge, then a model that generates from it.
    write(&yaml("slerp", "parameters:\n  t: [0, 0.5, 1]\n"));
    succeeds(h, &["merge", c, o]);
    succeeds(h, &["generate", "-m", o, "--prompt", "hi", "-n", "3"]);
    assert!(fails(h, &["merge", c, o]).contains("already exists"));
    for (text, want) in [
        (yaml("slerp", ""), "missing parameter 't'"),
        (yaml("bogus", ""), "unknown method 'bogus'"),
        (yaml("linear", "dtype: float3\n"), "dtype"),
        (yaml("linear", "extra_key: 1\n"), "unknown field `extra_key`"),
        ("merge_method: linear\nmodels: [\n".to_string(), "m.yml"),
        (yaml("linear", "").replace(a.to_str().unwrap(), "/no/such/model.gguf"), "/no/such/model.gguf"),
    ] {
        write(&text);
        let e = fails(h, &["merge", c, h.join("x").to_str().unwrap()]);
        assert!(e.contains(want), "want {want:?} in {e}");
        assert!(!h.join("x").exists());
    }
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    let path = |name: &str| h.join(name).to_str().unwrap().to_string();
    // Task vectors: extract, apply with a negative scale; wrong kind of file, bad levels.
    let tv = path("tv.safetensors");
    let extract_tv = |levels: &str, out: &str| {
        ["tv", "extract", "--base", a, "--finetuned", b, "--levels", levels, "-o", out].map(String::from)
    };
    let (_, err) = succeeds(h, &extract_tv("16", &tv).each_ref().map(String::as_str));
    assert!(err.contains("smaller"), "{err}");
    succeeds(h, &["tv", "apply", a, &format!("{tv}:-0.5"), "-o", &path("neg")]);
    let e = fails(h, &["rws", "apply", a, &tv, "-o", &path("y")]);
    assert!(e.contains("not a rws"), "{e}");
    let e = fails(h, &["tv", "apply", a, a, "-o", &path("y")]);
    assert!(e.contains("a.gguf"), "{e}");
    let e = fails(h, &extract_tv("1", &path("t1")).each_ref().map(String::as_str));
    assert!(e.contains("--levels 1"), "{e}");
    // Signatures: extract over the first layers, inspect, apply with alpha.
    let sig = path("sig.safetensors");
    let extract_rws = |layers: &str, out: &str| {
        ["rws", "extract", "--pretrained", a, "--clean", b, "--robust", o, "--layers", layers, "-o", out]
            .map(String::from)
    };
    succeeds(h, &extract_rws("first:2", &sig).each_ref().map(String::as_str));
    let (stdout, _) = succeeds(h, &["rws", "inspect", &sig]);
    assert!(stdout.contains("2 layers"), "{stdout}");
    let e = fails(h, &extract_rws("first:99", &path("s2")).each_ref().map(String::as_str));
    assert!(e.contains("first:99"), "{e}");
    succeeds(h, &["rws", "apply", a, &sig, "--alpha", "0.5", "-o", &path("p")]);
}

/// A tiny labelled image set as a recompose data file: `channels` x 8 x 8, 3 classes.
fn tiny_images(dir: &Path, name: &str, channels: usize) -> PathBuf {
    let n = 48;
    let images = (0..n * channels * 64)
        .map(|i| (((i * 7919) % 101) as f32 / 100.0) * 0.5 + 0.25 * ((i / (channels * 64)) % 3) as f32)
        .collect();
    let ds = recompose_vision::Dataset {
        name: "tiny".into(),
        channels,
        height: 8,
        width: 8,
        images,
        labels: (0..n).map(|i| (i % 3) as u8).collect(),
        classes: vec!["a".into(), "b".into(), "c".into()],
    };
    let p = dir.join(name);
    recompose_vision::data::save_file(&ds, &p).unwrap();
    p
}

#[test]
fn vision_train_resume_eval_and_corrupt_work_end_to_end() {
    let d = tempfile::tempdir().unwrap();
    let home = d.path();
    let data = tiny_images(home, "tiny.safetensors", 3);
    let data = data.to_str().unwrap();
    let ckpt = home.join("m.safetensors");
    let ckpt = ckpt.to_str().unwrap();
    let train =
        ["vision", "train", "--data", data, "--arch", "vgg", "--width", "4", "--experts", "2", "--method", "advmoe"];
    let (_, err) = succeeds(
        home,
        &[&train[..], &["--epochs", "1", "--batch", "16", "--check-attack", "pgd2", "-o", ckpt]].concat(),
    );
    assert!(err.contains("epoch   1") && err.contains("routing entropy"), "{err}");
    // Two epochs in total: the run resumes after the first.
    let (_, err) = succeeds(
        home,
        &[&train[..], &["--epochs", "2", "--batch", "16", "--check-attack", "pgd2", "-o", ckpt, "--resume"]].concat(),
    );
    assert!(err.contains("resuming") && err.contains("epoch   2") && !err.contains("epoch   1 "), "{err}");
    let json = home.join("r.json");
    let (out, _) =
        succeeds(home, &["vision", "eval", ckpt, "--data", data, "--attack", "pgd3", "--json", json.to_str().unwrap()]);
    assert!(out.contains("accuracy") && out.contains("robust"), "{out}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["results"][0]["images"], 48);
    let noisy = home.join("noisy.safetensors");
    let (out, _) = succeeds(
        home,
        &[
            "vision",
            "corrupt",
            "--data",
            data,
            "--corruption",
            "gaussian_noise",
            "--severity",
            "5",
            "-o",
            noisy.to_str().unwrap(),
        ],
    );
    assert!(out.contains("mean |change|"), "{out}");
    let (out, _) = succeeds(home, &["vision", "eval", ckpt, "--data", noisy.to_str().unwrap()]);
    assert!(out.contains("accuracy"), "{out}");
    let (out, _) = succeeds(home, &["vision", "eval", ckpt, "--data", data, "--corruption", "contrast:2"]);
    assert!(out.contains("contrast s2"), "{out}");
}

#[test]
fn vision_bad_input_is_one_line() {
    let d = tempfile::tempdir().unwrap();
    let home = d.path();
    let data = tiny_images(home, "tiny.safetensors", 3);
    let gray = tiny_images(home, "gray.safetensors", 1);
    let (data, gray) = (data.to_str().unwrap(), gray.to_str().unwrap());
    let ckpt = home.join("m.safetensors");
    let ckpt = ckpt.to_str().unwrap();
    succeeds(
        home,
        &[
            "vision",
            "train",
            "--data",
            data,
            "--width",
            "4",
            "--epochs",
            "1",
            "--batch",
            "16",
            "--check-attack",
            "fgsm",
            "-o",
            ckpt,
        ],
    );

    let e = fails(home, &["vision", "train", "--data", data, "--width", "4", "--epochs", "1", "-o", ckpt]);
    assert!(e.contains("exists") && e.contains("--resume"), "{e}");
    let out = home.join("x.safetensors");
    let out = out.to_str().unwrap();
    let e = fails(home, &["vision", "train", "--data", data, "--width", "4", "--method", "advmoe", "-o", out]);
    assert!(e.contains("MoE"), "{e}");
    let e = fails(home, &["vision", "train", "--data", data, "--width", "6", "--experts", "4", "-o", out]);
    assert!(e.contains("divisible"), "{e}");
    let e = fails(home, &["vision", "train", "--data", data, "--eps", "9/0", "-o", out]);
    assert!(e.contains("9/0"), "{e}");
    let e =
        fails(home, &["vision", "train", "--data", data, "-o", home.join("no/such/m.safetensors").to_str().unwrap()]);
    assert!(e.contains("does not exist"), "{e}");
    let e = fails(home, &["vision", "train", "--data", "mnist", "-o", out]);
    assert!(e.contains("mnist") && e.contains("cifar10"), "{e}");
    assert!(!Path::new(out).exists(), "a failed run left {out}");

    let e = fails(home, &["vision", "eval", ckpt, "--data", data, "--attack", "cw"]);
    assert!(e.contains("unknown attack"), "{e}");
    let e = fails(home, &["vision", "eval", ckpt, "--data", gray]);
    assert!(e.contains("the model takes"), "{e}");
    let e = fails(home, &["vision", "eval", ckpt, "--data", data, "--corruption", "fog:3"]);
    assert!(e.contains("fog"), "{e}");
    let junk = home.join("junk.safetensors");
    std::fs::write(&junk, b"\x10\0\0\0\0\0\0\0{not json}").unwrap();
    let e = fails(home, &["vision", "eval", junk.to_str().unwrap(), "--data", data]);
    assert!(e.contains("junk.safetensors"), "{e}");
    let e = fails(home, &["vision", "eval", ckpt, "--data", junk.to_str().unwrap()]);
    assert!(e.contains("junk.safetensors"), "{e}");
    let e =
        fails(home, &["vision", "corrupt", "--data", data, "--corruption", "contrast", "--severity", "7", "-o", out]);
    assert!(e.contains("severity"), "{e}");
    assert!(!Path::new(out).exists());
}

/// A text file of `n` repetitions of a few sentences.
fn text_file(dir: &Path, name: &str, n: usize) -> PathBuf {
    let p = dir.join(name);
    let t: String =
        (0..n).map(|i| ["the cat sat on the mat. ", "a dog ran far! ", "to be or not to be. "][i % 3]).collect();
    std::fs::write(&p, t).unwrap();
    p
}

/// `recompose finetune -q` of `model` on `data` with a tiny batch (2 rows of 32 tokens) for
/// `steps` steps, written to `out`, plus `extra` flags; the run must succeed.
fn finetune_tiny(dir: &Path, model: &str, data: &Path, steps: &str, out: &Path, extra: &[&str]) -> String {
    let mut args = vec!["finetune", "-q", "-m", model, "--data", data.to_str().unwrap(), "--steps", steps];
    args.extend_from_slice(&["--batch", "2", "--ctx", "32", "-o", out.to_str().unwrap()]);
    args.extend_from_slice(extra);
    succeeds(dir, &args).1
}

#[test]
fn finetune_lora_merge_and_apply_end_to_end() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path(), TinySpec::default());
    let (m, data) = (m.to_str().unwrap(), text_file(d.path(), "t.txt", 300));
    let adapter = d.path().join("ad");
    let err =
        finetune_tiny(d.path(), m, &data, "6", &adapter, &["--lora", "r=4,alpha=8,targets=q,v,down", "--lr", "1e-2"]);
    assert!(err.contains("held-out perplexity"), "{err}");
    assert!(adapter.join("adapter_config.json").exists() && adapter.join("adapter_model.safetensors").exists());
    assert!(d.path().join("ad.log.jsonl").exists() && d.path().join("ad.checkpoint.safetensors").exists());
    // Applied at run time, merged, and as BASE+ADAPTER: the f32 perplexities agree.
    let ppl = |extra: &[&str]| -> f64 {
        let j = d.path().join("ppl.json");
        let mut args = vec![
            "eval",
            "ppl",
            "-q",
            "--f32",
            "--data",
            data.to_str().unwrap(),
            "--ctx",
            "32",
            "--stride",
            "16",
            "--tokens",
            "300",
        ];
        args.extend_from_slice(&["--json", j.to_str().unwrap()]);
        args.extend_from_slice(extra);
        succeeds(d.path(), &args);
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&j).unwrap()).unwrap();
        v["ppl"].as_f64().unwrap()
    };
    let ad = adapter.to_str().unwrap();
    let (base, with) = (ppl(&["-m", m]), ppl(&["-m", m, "--lora", ad]));
    assert!(with < base, "training on the text lowers its perplexity: {base} -> {with}");
    let plus = format!("{m}+{ad}");
    assert_eq!(ppl(&["-m", &plus]), with);
    let merged = d.path().join("merged");
    succeeds(d.path(), &["lora", "merge", m, ad, "-o", merged.to_str().unwrap()]);
    let merged_ppl = ppl(&["-m", merged.to_str().unwrap()]);
    assert!((merged_ppl - with).abs() < 1e-4 * with, "merged {merged_ppl} vs applied {with}");
    let half = ppl(&["-m", m, "--lora", &format!("{ad}:0.5")]);
    assert!(half > with && half < base, "half the adapter: {half}");
    // The quantised path takes the adapter too.
    succeeds(d.path(), &["generate", "-q", "-m", m, "--lora", ad, "-p", "to be", "-n", "4"]);
    // A task vector of the merged fine-tune, straight from BASE+ADAPTER.
    let tv = d.path().join("tv.safetensors");
    succeeds(d.path(), &["tv", "extract", "--base", m, "--finetuned", &plus, "-o", tv.to_str().unwrap()]);
    // A negative scale is a value, not a flag (`--scale -1` used to be refused as an unknown
    // argument although the help allows it): applying -1 of the vector undoes the fine-tune.
    let neg = d.path().join("neg");
    succeeds(d.path(), &["tv", "apply", &plus, tv.to_str().unwrap(), "--scale", "-1", "-o", neg.to_str().unwrap()]);
    let undone = ppl(&["-m", neg.to_str().unwrap()]);
    assert!((undone - base).abs() < 1e-3 * base, "base {base}, +adapter -tv {undone}");
    // A full fine-tune writes an HF folder that loads.
    let full = d.path().join("full");
    finetune_tiny(d.path(), m, &data, "2", &full, &["--full"]);
    assert!(full.join("config.json").exists());
    assert!(ppl(&["-m", full.to_str().unwrap()]).is_finite());
}

#[test]
fn finetune_bad_input_is_one_line_and_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path(), TinySpec::default());
    let m = m.to_str().unwrap();
    let short = text_file(d.path(), "short.txt", 1);
    let data = text_file(d.path(), "t.txt", 300);
    let out = d.path().join("out");
    let o = out.to_str().unwrap();
    let ft = |extra: &[&str]| -> String {
        let mut args = vec!["finetune", "-q", "-m", m, "--steps", "2", "--batch", "2", "--ctx", "32", "-o", o];
        args.extend_from_slice(extra);
        let e = fails(d.path(), &args);
        assert!(!out.exists(), "{args:?} left {}", out.display());
        e
    };
    let e = ft(&["--data", short.to_str().unwrap(), "--lora", "r=4"]);
    assert!(e.contains("fewer than one context"), "{e}");
    let empty = d.path().join("empty.jsonl");
    std::fs::write(&empty, "\n\n").unwrap();
    let e = ft(&["--data", empty.to_str().unwrap(), "--lora", "r=4"]);
    assert!(e.contains("no conversations"), "{e}");
    let no_assistant = d.path().join("q.jsonl");
    std::fs::write(&no_assistant, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n").unwrap();
    let e = ft(&["--data", no_assistant.to_str().unwrap(), "--lora", "r=4"]);
    assert!(e.contains("q.jsonl:1") && e.contains("no assistant turn"), "{e}");
    let e = ft(&["--data", data.to_str().unwrap(), "--lora", "r=4", "--lr", "fast"]);
    assert!(e.contains("--lr"), "{e}");
    let e = ft(&["--data", data.to_str().unwrap(), "--lora", "r=4", "--lr", "NaN"]);
    assert!(e.contains("learning rate"), "{e}");
    let e = ft(&["--data", data.to_str().unwrap(), "--lora", "r=4,targets=q,lm_head"]);
    assert!(e.contains("unknown LoRA target"), "{e}");
    let e = ft(&["--data", data.to_str().unwrap()]);
    assert!(e.contains("--lora") && e.contains("--full"), "{e}");
    let e = ft(&["--data", data.to_str().unwrap(), "--lora", "r=4", "--device", "tpu"]);
    assert!(e.contains("unknown device"), "{e}");
    // Without a GPU (or without the cuda feature) asking for one is one line, with a backtrace
    // requested or not.
    let e = ft(&["--data", data.to_str().unwrap(), "--lora", "r=4", "--device", "cuda"]);
    assert!(e.contains("--device cuda:0"), "{e}");
    // Resuming another run's checkpoint: stop one run early, resume with other settings.
    finetune_tiny(d.path(), m, &data, "2", &out, &["--lora", "r=4", "--stop-after", "1"]);
    assert!(!out.exists());
    let e = ft(&["--data", data.to_str().unwrap(), "--lora", "r=4", "--seed", "9", "--resume"]);
    assert!(e.contains("another run"), "{e}");
}

#[test]
fn an_adapter_for_another_model_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let a_model = d.path().join("a.gguf");
    write_tiny_gguf(&a_model, &TinySpec { seed: 1, ..Default::default() }).unwrap();
    let b_model = d.path().join("b.gguf");
    write_tiny_gguf(&b_model, &TinySpec { seed: 2, ..Default::default() }).unwrap();
    let c_model = d.path().join("c.gguf");
    write_tiny_gguf(&c_model, &TinySpec { hidden: 32, ffn: 64, ..Default::default() }).unwrap();
    let data = text_file(d.path(), "t.txt", 300);
    let ad = d.path().join("ad");
    finetune_tiny(d.path(), a_model.to_str().unwrap(), &data, "1", &ad, &["--lora", "r=4"]);
    let ad = ad.to_str().unwrap();
    // Same shapes, other weights: the recorded base hash differs.
    let e = fails(d.path(), &["generate", "-m", b_model.to_str().unwrap(), "--lora", ad, "-p", "hi", "-n", "2"]);
    assert!(e.contains("trained on another model"), "{e}");
    // Other shapes.
    let e = fails(d.path(), &["generate", "-m", c_model.to_str().unwrap(), "--lora", ad, "-p", "hi", "-n", "2"]);
    assert!(e.contains("another model"), "{e}");
    let merged = d.path().join("m");
    let e = fails(d.path(), &["lora", "merge", c_model.to_str().unwrap(), ad, "-o", merged.to_str().unwrap()]);
    assert!(e.contains("another model") && !merged.exists(), "{e}");
    // A PEFT adapter without recompose's metadata is checked by shape.
    let foreign = d.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::copy(Path::new(ad).join("adapter_config.json"), foreign.join("adapter_config.json")).unwrap();
    let st = recompose_core::weights::HfDir::open_tensors(&Path::new(ad).join("adapter_model.safetensors")).unwrap();
    let mut factors = std::collections::BTreeMap::new();
    for n in st.names() {
        if let Some(m) = n.strip_prefix("base_model.model.").and_then(|x| x.strip_suffix(".lora_A.weight")) {
            let b = st.load(&n.replace("lora_A", "lora_B")).unwrap();
            factors.insert(m.to_string(), (st.load(n).unwrap(), b));
        }
    }
    std::fs::remove_file(foreign.join("adapter_config.json")).unwrap();
    std::fs::remove_dir(&foreign).unwrap();
    let cfg: recompose_core::peft::AdapterConfig =
        serde_json::from_str(&std::fs::read_to_string(Path::new(ad).join("adapter_config.json")).unwrap()).unwrap();
    recompose_core::peft::Adapter::write(&foreign, &cfg, &factors, &Default::default()).unwrap();
    succeeds(
        d.path(),
        &[
            "generate",
            "-q",
            "-m",
            b_model.to_str().unwrap(),
            "--lora",
            foreign.to_str().unwrap(),
            "-p",
            "hi",
            "-n",
            "2",
        ],
    );
    let e = fails(
        d.path(),
        &["generate", "-m", c_model.to_str().unwrap(), "--lora", foreign.to_str().unwrap(), "-p", "hi", "-n", "2"],
    );
    assert!(e.contains("do not fit"), "{e}");
}

/// Output into a pipe whose reader is gone (`recompose inspect --tensors M | head -1`) ends the
/// process quietly, as Unix tools do: ended by SIGPIPE, no panic, no message (it used to panic,
/// "failed printing to stdout: Broken pipe", exit 101).
#[cfg(unix)]
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path(), TinySpec::default());
    let m = m.to_str().unwrap();
    for args in
        [vec!["inspect", "--tensors", m], vec!["generate", "-q", "-m", m, "-p", "hello", "-n", "8", "--ignore-eos"]]
    {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(env!("CARGO_BIN_EXE_recompose"))
            .args(&args)
            .env("RECOMPOSE_HOME", d.path())
            .env("RAYON_NUM_THREADS", "1")
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.trim().is_empty(), "{args:?} printed: {err}");
        assert_eq!(out.status.signal(), Some(13), "{args:?}: {}", out.status); // SIGPIPE
    }
}

/// SIGINT or SIGTERM during `convert` removes its hidden temporary folder and ends the process
/// by that signal (a `.recompose-tmp-*` folder of hundreds of MB used to stay beside the target).
/// Converting smollm2-135m to f32 takes ~1.5 s, so the signal lands mid-write.
#[cfg(unix)]
#[test]
fn an_interrupted_convert_leaves_no_temporaries() {
    use std::os::unix::process::ExitStatusExt;
    for sig in ["INT", "TERM"] {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        let mut child = Command::new(env!("CARGO_BIN_EXE_recompose"))
            .args(["convert", "smollm2-135m", out.to_str().unwrap(), "--dtype", "f32"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let temporaries = || {
            std::fs::read_dir(d.path())
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(".recompose-tmp-"))
                .count()
        };
        let t0 = std::time::Instant::now();
        while temporaries() == 0 {
            assert!(child.try_wait().unwrap().is_none(), "convert ended before writing");
            assert!(t0.elapsed().as_secs() < 60, "no temporary appeared");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(Command::new("kill").args([&format!("-{sig}"), &child.id().to_string()]).status().unwrap().success());
        let st = child.wait().unwrap();
        let want = if sig == "INT" { 2 } else { 15 };
        assert_eq!(st.signal(), Some(want), "SIG{sig}: {st}");
        assert_eq!(temporaries(), 0, "SIG{sig} left a temporary");
        assert!(!out.exists(), "SIG{sig} left a half-written output");
    }
}

#[test]
fn serve_refuses_a_prefix_cache_of_zero_or_beyond_memory_and_an_empty_step_budget() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path(), TinySpec::default());
    let m = m.to_str().unwrap();
    let e = fails(d.path(), &["serve", "--model", m, "--port", "0", "--prefix-cache", "0"]);
    assert!(e.contains("--prefix-cache must be at least 1 MiB"), "{e}");
    // 2^40 MiB is a zettabyte-scale budget: more than any machine's memory.
    let e = fails(d.path(), &["serve", "--model", m, "--port", "0", "--prefix-cache", "1099511627776"]);
    assert!(e.contains("more than this machine's") || e.contains("too large"), "{e}");
    let e = fails(d.path(), &["serve", "--model", m, "--port", "0", "--step-tokens", "0"]);
    assert!(e.contains("--step-tokens"), "{e}");
}

#[test]
fn serve_refuses_expert_batching_or_an_expert_budget_without_a_pre_gated_moe() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path(), TinySpec::default());
    let m = m.to_str().unwrap();
    let e = fails(d.path(), &["serve", "--model", m, "--port", "0", "--batching", "expert"]);
    assert!(e.contains("--batching expert needs a pre-gated MoE"), "{e}");
    let e = fails(d.path(), &["serve", "--model", m, "--port", "0", "--batching", "fifo"]);
    assert!(e.contains("expected expert, decode-first or prefill-first"), "{e}");
    let e = fails(d.path(), &["serve", "--model", m, "--port", "0", "--step-rows", "0"]);
    assert!(e.contains("--step-rows must be at least 1"), "{e}");
    let e = fails(d.path(), &["serve", "--model", m, "--port", "0", "--expert-budget", "2"]);
    assert!(e.contains("need a MoE (--moe DIR)"), "{e}");
}
