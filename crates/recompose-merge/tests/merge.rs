//! End-to-end merges, task vectors and signatures on tiny seeded models (GGUF and HF inputs).

use recompose_core::convert::{self, OutDType};
use recompose_core::testing::{write_tiny_gguf, TinySpec};
use recompose_llm::{Model, WeightMode};
use recompose_merge::delta::{patch, Delta, Scheme};
use recompose_merge::merge::{merge, MergeOptions};
use recompose_merge::output::Format;
use recompose_merge::signature::{extract_signature, extract_task_vector, project_out};
use recompose_merge::{MergeConfig, Store};
use std::path::{Path, PathBuf};

fn tiny(dir: &Path, name: &str, seed: u64, hf: bool) -> PathBuf {
    let g = dir.join(format!("{name}.gguf"));
    write_tiny_gguf(&g, &TinySpec { seed, layers: 3, ..Default::default() }).unwrap();
    if !hf {
        return g;
    }
    let h = dir.join(name);
    convert::convert(&g, &h, Some(OutDType::F32), &mut |_, _| {}).unwrap();
    h
}

fn run(dir: &Path, yaml: &str, out: &str, seed: u64) -> recompose_merge::Result<PathBuf> {
    let cfg = MergeConfig::parse(yaml)?;
    let o = dir.join(out);
    merge(&cfg, &o, &MergeOptions { seed, ..Default::default() }, &|_, _| {})?;
    Ok(o)
}

fn tensors(p: &Path) -> Vec<(String, Vec<f32>)> {
    let s = Store::open(p.to_str().unwrap()).unwrap();
    let mut names = s.names().to_vec();
    names.sort();
    names.iter().map(|n| (n.clone(), s.load(n).unwrap())).collect()
}

fn logits(p: &Path, tokens: &[u32]) -> Vec<f32> {
    let f = recompose_core::ModelFile::open(p).unwrap();
    let m = Model::load(&f, WeightMode::F32).unwrap();
    let mut cache = m.new_cache(1);
    m.prefill(&[tokens.to_vec()], &mut cache, 64).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Nothing but the listed entries in `dir` (no temporary leftovers from a failed write).
fn assert_only(dir: &Path, names: &[&str]) {
    let mut have: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    have.sort();
    let mut want: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(have, want);
}

#[test]
fn gguf_and_hf_inputs_mix_and_the_result_runs_in_recompose() {
    let d = tempfile::tempdir().unwrap();
    let a = tiny(d.path(), "a", 1, false); // GGUF
    let b = tiny(d.path(), "b", 2, true); // HF folder
                                          // Weight 1 on the GGUF model: the merge must reproduce it exactly, through either format.
    let yaml = format!(
        "merge_method: linear\nmodels:\n  - model: {}\n    parameters: {{weight: 1.0}}\n  - model: {}\n    parameters: {{weight: 0.0}}\ndtype: float32\n",
        a.display(),
        b.display()
    );
    let out = run(d.path(), &yaml, "out", 0).unwrap();
    assert_eq!(tensors(&out), tensors(&a));
    let toks = [256u32, 72, 105, 33];
    // Same weights; the HF and GGUF loaders order Q/K rows differently (rounding only).
    let close = |x: Vec<f32>, y: Vec<f32>, tol: f32| {
        let err = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(err <= tol, "logits differ by {err}");
    };
    close(logits(&out, &toks), logits(&a, &toks), 1e-4);
    // ... and to GGUF.
    let cfg = MergeConfig::parse(&yaml).unwrap();
    let g = d.path().join("out.gguf");
    merge(&cfg, &g, &MergeOptions { format: Format::Gguf(OutDType::F32), ..Default::default() }, &|_, _| {}).unwrap();
    assert_eq!(logits(&g, &toks), logits(&a, &toks));
    let q = d.path().join("out-q8.gguf");
    merge(&cfg, &q, &MergeOptions { format: Format::Gguf(OutDType::Q8_0), ..Default::default() }, &|_, _| {}).unwrap();
    close(logits(&q, &toks), logits(&a, &toks), 0.5);
}

#[test]
fn frankenmerge_renumbers_layers_and_updates_the_config() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (tiny(d.path(), "a", 1, true), tiny(d.path(), "b", 2, true));
    let yaml = format!(
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: {0}\n        layer_range: [0, 2]\n  - sources:\n      - model: {1}\n        layer_range: [1, 3]\n",
        a.display(),
        b.display()
    );
    let out = run(d.path(), &yaml, "out", 0).unwrap();
    let s = Store::open(out.to_str().unwrap()).unwrap();
    assert_eq!(s.config().unwrap().num_layers, 4);
    let (sa, sb) = (Store::open(a.to_str().unwrap()).unwrap(), Store::open(b.to_str().unwrap()).unwrap());
    let q = "self_attn.q_proj.weight";
    assert_eq!(s.load(&format!("model.layers.1.{q}")).unwrap(), sa.load(&format!("model.layers.1.{q}")).unwrap());
    assert_eq!(s.load(&format!("model.layers.2.{q}")).unwrap(), sb.load(&format!("model.layers.1.{q}")).unwrap());
    assert_eq!(s.load(&format!("model.layers.3.{q}")).unwrap(), sb.load(&format!("model.layers.2.{q}")).unwrap());
    // pre weights from the first slice, post weights from the last
    assert_eq!(s.load("model.embed_tokens.weight").unwrap(), sa.load("model.embed_tokens.weight").unwrap());
    assert_eq!(s.load("model.norm.weight").unwrap(), sb.load("model.norm.weight").unwrap());
    logits(&out, &[256, 65]);
}

#[test]
fn random_methods_are_seeded() {
    let d = tempfile::tempdir().unwrap();
    let (a, b, c) = (tiny(d.path(), "a", 1, true), tiny(d.path(), "b", 2, true), tiny(d.path(), "c", 3, true));
    let yaml = format!(
        "merge_method: dare_ties\nbase_model: {0}\nmodels:\n  - model: {1}\n    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {2}\n    parameters: {{weight: 0.5, density: 0.5}}\n",
        a.display(),
        b.display(),
        c.display()
    );
    let x = tensors(&run(d.path(), &yaml, "x", 7).unwrap());
    let y = tensors(&run(d.path(), &yaml, "y", 7).unwrap());
    let z = tensors(&run(d.path(), &yaml, "z", 8).unwrap());
    assert_eq!(x, y);
    assert_ne!(x, z);
}

#[test]
fn bad_merges_fail_with_one_line_and_write_nothing() {
    let d = tempfile::tempdir().unwrap();
    let a = tiny(d.path(), "a", 1, true);
    let g = d.path().join("wide.gguf");
    write_tiny_gguf(&g, &TinySpec { seed: 5, layers: 3, hidden: 32, ffn: 64, ..Default::default() }).unwrap();
    let m = |method: &str, other: &Path, extra: &str| {
        format!(
            "merge_method: {method}\nbase_model: {0}\nmodels:\n  - model: {0}\n    parameters: {{weight: 1}}\n  - model: {1}\n    parameters: {{weight: 1}}\n{extra}",
            a.display(),
            other.display()
        )
    };
    let cases = [
        (m("linear", &g, ""), "hidden_size 32 does not match"),
        (m("linear", &d.path().join("nope"), ""), "nope: no such file"),
        (m("frobnicate", &a, ""), "unknown method 'frobnicate'"),
        (m("slerp", &a, ""), "missing parameter 't'"),
        (m("linear", &a, "dtype: int4\n"), "unknown dtype 'int4'"),
        (m("linear", &a, "colour: red\n"), "unknown field `colour`"),
        (m("ties", &a, "parameters: {density: -0.5}\n"), "parameters.density: -0.5 is outside (0, 1]"),
    ];
    for (yaml, want) in cases {
        let e = run(d.path(), &yaml, "out", 0).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains(want), "want '{want}', got '{e}'");
        assert!(!e.contains('\n'));
        assert_only(d.path(), &["a", "a.gguf", "wide.gguf"]);
    }
    // An existing output is refused before any work.
    std::fs::create_dir(d.path().join("out")).unwrap();
    let e = run(d.path(), &m("linear", &a, ""), "out", 0).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("already exists"), "{e}");
}

/// A model listed many times is opened (and memory-mapped) once: stores are keyed by label.
#[test]
fn a_repeated_model_is_opened_once() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (tiny(d.path(), "a", 1, false), tiny(d.path(), "b", 2, false));
    let entry = |m: &Path| format!("  - model: {}\n    parameters: {{weight: 1}}\n", m.display());
    let yaml = format!("merge_method: linear\nmodels:\n{}{}", entry(&a).repeat(200), entry(&b));
    let plan = recompose_merge::plan::Plan::build(&MergeConfig::parse(&yaml).unwrap()).unwrap();
    let labels: Vec<&str> = plan.models.iter().map(|m| m.label.as_str()).collect();
    assert_eq!(labels, [a.to_str().unwrap(), b.to_str().unwrap()]);
}

/// A fine-tune-like model: `a` moved 1% of the way towards another random model.
fn finetune(d: &Path, a: &Path, seed: u64, name: &str) -> PathBuf {
    let c = tiny(d, &format!("{name}-other"), seed, true);
    let yaml = format!(
        "merge_method: linear\nmodels:\n  - model: {}\n    parameters: {{weight: 0.99}}\n  - model: {}\n    parameters: {{weight: 0.01}}\n",
        a.display(),
        c.display()
    );
    run(d, &yaml, name, 0).unwrap()
}

/// Element-wise: |restored - original| within one rounding of the patched value (float addition
/// is not always invertible), and how many elements came back bit for bit.
fn check_restored(orig: &[(String, Vec<f32>)], patched: &[(String, Vec<f32>)], back: &[(String, Vec<f32>)]) -> f64 {
    let (mut exact, mut total) = (0usize, 0usize);
    for (((n, x), (_, y)), (_, z)) in orig.iter().zip(patched).zip(back) {
        for ((a, b), c) in x.iter().zip(y).zip(z) {
            let bound = f32::EPSILON * a.abs().max(b.abs());
            assert!((a - c).abs() <= bound, "{n}: {a} -> {b} -> {c}");
            exact += (a.to_bits() == c.to_bits()) as usize;
            total += 1;
        }
    }
    exact as f64 / total as f64
}

#[test]
fn task_vector_apply_then_remove_restores_the_model() {
    let d = tempfile::tempdir().unwrap();
    let a = tiny(d.path(), "a", 1, true);
    let b = finetune(d.path(), &a, 2, "b");
    let (sa, sb) = (Store::open(a.to_str().unwrap()).unwrap(), Store::open(b.to_str().unwrap()).unwrap());
    for (levels, name) in [(None, "tv"), (Some(16), "tv16")] {
        let tv = d.path().join(format!("{name}.safetensors"));
        extract_task_vector(&sa, &sb, &[], levels, Scheme::Linear, &tv, &|_, _| {}).unwrap();
        let delta = || vec![(Delta::open(&tv).unwrap(), 0.7f32)];
        let up = d.path().join(format!("{name}-up"));
        patch(&sa, &delta(), false, &up, Format::Safetensors, None, &|_, _| {}).unwrap();
        let back = d.path().join(format!("{name}-back"));
        let su = Store::open(up.to_str().unwrap()).unwrap();
        patch(&su, &delta(), true, &back, Format::Safetensors, None, &|_, _| {}).unwrap();
        let (orig, patched) = (tensors(&a), tensors(&up));
        assert_ne!(orig, patched);
        let exact = check_restored(&orig, &patched, &tensors(&back));
        // Misses are elements whose patched value crossed a power of two (here ~6%: deltas of 1%
        // of a random model's scale are large next to its small weights).
        assert!(exact > 0.9, "{name}: only {exact} of the elements bit-exact");
    }
    // Scale 1, unquantised: base + (ft - base) is the fine-tune, to rounding.
    let tv = d.path().join("tv.safetensors");
    let full = d.path().join("full");
    patch(&sa, &[(Delta::open(&tv).unwrap(), 1.0)], false, &full, Format::Safetensors, None, &|_, _| {}).unwrap();
    check_restored(&tensors(&b), &tensors(&a), &tensors(&full));
    // A 16-level vector costs about an eighth of the f32 one.
    let (f, q) = (Delta::open(&tv).unwrap(), Delta::open(&d.path().join("tv16.safetensors")).unwrap());
    assert!(q.data_bytes() * 7 < f.data_bytes(), "{} vs {}", q.data_bytes(), f.data_bytes());
}

#[test]
fn signatures_are_orthogonal_to_the_clean_delta_and_cover_the_first_layers() {
    let d = tempfile::tempdir().unwrap();
    let (p, c, r) = (tiny(d.path(), "p", 1, true), tiny(d.path(), "c", 2, true), tiny(d.path(), "r", 3, true));
    let open = |x: &Path| Store::open(x.to_str().unwrap()).unwrap();
    let (sp, sc, sr) = (open(&p), open(&c), open(&r));
    let sig = d.path().join("sig.safetensors");
    extract_signature(&sp, &sc, &sr, "first:2", None, Scheme::Linear, &sig, &|_, _| {}).unwrap();
    let delta = Delta::open(&sig).unwrap();
    let layers: std::collections::BTreeSet<String> =
        delta.names.iter().map(|n| recompose_merge::signature::layer_key(n)).collect();
    assert_eq!(layers.len(), 2, "{layers:?}");
    for n in &delta.names {
        let v = delta.values(n).unwrap();
        let a: Vec<f32> = sc.load(n).unwrap().iter().zip(sp.load(n).unwrap()).map(|(x, y)| x - y).collect();
        let dot: f64 = v.iter().zip(&a).map(|(x, y)| *x as f64 * *y as f64).sum();
        let scale: f64 = (v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>()
            * a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>())
        .sqrt();
        assert!(dot.abs() <= 1e-5 * scale.max(1e-12), "{n}: {dot} vs {scale}");
    }
    // A signature made for another layout is refused, naming the tensor.
    let g = d.path().join("wide.gguf");
    write_tiny_gguf(&g, &TinySpec { seed: 5, layers: 3, hidden: 32, ffn: 64, ..Default::default() }).unwrap();
    let e = patch(&open(&g), &[(delta, 1.0)], false, &d.path().join("x"), Format::Safetensors, None, &|_, _| {})
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("has shape"), "{e}");
    assert!(!d.path().join("x").exists());
}

#[test]
fn projection_of_a_parallel_delta_is_zero() {
    let a = [1.0f32, 2.0, -1.0];
    let d: Vec<f32> = a.iter().map(|x| 3.0 * x).collect();
    assert!(project_out(&d, &a).iter().all(|v| v.abs() < 1e-6));
    assert_eq!(project_out(&d, &[0.0; 3]), d);
}
