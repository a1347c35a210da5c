//! `recompose moefy` through the binary: a tiny model split by two text domains, and every bad
//! setting refused with one line.

use recompose_core::testing::{write_tiny_gguf, TinySpec};
use std::path::{Path, PathBuf};

mod common;
use common::{fails, succeeds};

/// A tiny model and two domain texts of distinct character (the tiny tokenizer is byte-level).
fn setup(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let m = dir.join("tiny.gguf");
    write_tiny_gguf(&m, &TinySpec::default()).unwrap();
    let a = dir.join("verse.txt");
    std::fs::write(&a, "O that this too too solid flesh would melt, thaw and resolve itself. ".repeat(60)).unwrap();
    let b = dir.join("sums.txt");
    std::fs::write(&b, "12 + 7 = 19; 45 - 3 = 42; 6 * 8 = 48; 81 / 9 = 9. ".repeat(80)).unwrap();
    (m, a, b)
}

#[test]
fn moefy_splits_a_tiny_model_by_two_domains_and_scores_the_split() {
    let d = tempfile::tempdir().unwrap();
    let (m, a, b) = setup(d.path());
    let out = d.path().join("moe");
    let calib = format!("{},{}", a.display(), b.display());
    let (stdout, _) = succeeds(
        d.path(),
        &[
            "moefy",
            "-q",
            "-m",
            m.to_str().unwrap(),
            "--calib",
            &calib,
            "--rows",
            "8",
            "--ctx",
            "64",
            "--eval-rows",
            "2",
            "--router-steps",
            "20",
            "--finetune-steps",
            "3",
            "--finetune-rows",
            "8",
            "-o",
            out.to_str().unwrap(),
        ],
    );
    assert!(stdout.contains("permanent"), "{stdout}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(v["format"], "recompose-moe-report/1");
    assert_eq!(v["calibration"][0]["tokens"], 8 * 64);
    let q = v["quality"].as_array().unwrap();
    assert_eq!(q.len(), 2);
    for d in q {
        assert!(d["dense"].as_f64().unwrap().is_finite() && d["pruned"].as_f64().unwrap().is_finite(), "{d}");
        assert_eq!(d["experts"].as_array().unwrap().len(), 2);
        let r = &d["router"];
        assert!(r["ppl"].as_f64().unwrap().is_finite(), "{d}");
        assert!((0.0..=1.0).contains(&r["matches_oracle"].as_f64().unwrap()), "{d}");
        let l = &d["layerwise"];
        assert!(l["ppl"].as_f64().unwrap().is_finite(), "{d}");
        assert!((0.0..=1.0).contains(&l["matches_layer_oracle"].as_f64().unwrap()), "{d}");
    }
    for k in ["pregate", "layerwise"] {
        assert!((0.0..1.0).contains(&v["router_share"][k].as_f64().unwrap()), "{}", v["router_share"]);
    }
    let ft = &v["finetuned"];
    assert_eq!(ft["steps"], 3);
    for k in ["dense_f32", "moe", "pruned"] {
        let p = ft[k].as_array().unwrap();
        assert!(p.len() == 2 && p.iter().all(|x| x.as_f64().unwrap().is_finite()), "{ft}");
    }
    assert!(out.join("experts.safetensors").exists() && out.join("finetune-moe.log.jsonl").exists());
    // The fine-tuned pruned baseline runs too.
    let generate = |moe: &Path, prompt: &str, n: &str| {
        let args = [
            "generate",
            "-m",
            m.to_str().unwrap(),
            "--moe",
            moe.to_str().unwrap(),
            "--prompt",
            prompt,
            "--max-tokens",
            n,
        ];
        succeeds(d.path(), &[&args[..], &["--temperature", "0"]].concat())
    };
    let (_, err) = generate(&out.join("pruned"), "12 +", "4");
    assert!(err.contains("generated 4 tokens"), "{err}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["format"], "recompose-moe/1");
    assert_eq!(cfg["split"]["names"].as_array().unwrap().len(), 2);
    assert_eq!(cfg["router"]["experts"], 2);
    assert_eq!(cfg["base"], v["model"]);
    // The MoE runs, and is refused on another model.
    let moe = out.to_str().unwrap();
    let (text, err) = generate(&out, "O that", "8");
    assert!(err.contains("generated 8 tokens"), "{text}\n{err}");
    let other = d.path().join("other.gguf");
    write_tiny_gguf(&other, &TinySpec { seed: 5, ..Default::default() }).unwrap();
    let e = fails(d.path(), &["generate", "-m", other.to_str().unwrap(), "--moe", moe, "--prompt", "O"]);
    assert!(e.contains("made for another model"), "{e}");
    let (shown, _) = succeeds(d.path(), &["inspect", moe]);
    assert!(shown.contains("pre-gating, 2 experts") && shown.contains("fine-tuned"), "{shown}");
    // A corrupt config is one line, not a panic.
    let broken = d.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    let text = std::fs::read_to_string(out.join("config.json")).unwrap();
    std::fs::write(broken.join("config.json"), text.replace("\"permanent\"", "\"perm\"")).unwrap();
    let e =
        fails(d.path(), &["generate", "-m", m.to_str().unwrap(), "--moe", broken.to_str().unwrap(), "--prompt", "O"]);
    assert!(e.contains("a corrupt MoE config"), "{e}");
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("stats.json")).unwrap()).unwrap();
    assert_eq!(stats.as_array().unwrap().len(), 2);
    moe_trace_replays_the_routes(d.path(), &m, &out, &calib);
    the_expert_store_runs_the_fine_tuned_moe_as_it_runs_resident(d.path(), &m, &out);
}

/// `moe-store write` on the fine-tuned MoE, then generation from the store under the smallest
/// budget (every policy, with and without prefetch) gives the resident MoE's greedy text.
fn the_expert_store_runs_the_fine_tuned_moe_as_it_runs_resident(dir: &Path, m: &Path, moe: &Path) {
    let (m, moe) = (m.to_str().unwrap(), moe.to_str().unwrap());
    let gen =
        ["generate", "-m", m, "--moe", moe, "--prompt", "O that 12 +", "--max-tokens", "12", "--temperature", "0"];
    let e = fails(dir, &[&gen[..], &["--expert-budget", "1"]].concat());
    assert!(e.contains("moe-store write"), "{e}");
    let (_, err) = succeeds(dir, &["moe-store", "write", "-m", m, "--moe", moe]);
    assert!(err.contains("experts.store"), "{err}");
    let (want, _) = succeeds(dir, &gen);
    for policy in ["lru", "lfu", "random", "belady", "none"] {
        for prefetch in [&[][..], &["--prefetch"][..]] {
            let flags = [&["--expert-budget", "1", "--expert-cache", policy][..], prefetch].concat();
            let (text, err) = succeeds(dir, &[&gen[..], &flags[..]].concat());
            assert_eq!(text, want, "{policy} {prefetch:?}");
            assert!(err.contains("expert store: 1 of 2 experts resident") && err.contains("loads"), "{err}");
        }
    }
    // Bad budgets and flags, one line each.
    let e = fails(dir, &[&gen[..], &["--expert-budget", "1KiB"]].concat());
    assert!(e.contains("smaller than one expert"), "{e}");
    let e = fails(dir, &[&gen[..], &["--expert-cache", "lru"]].concat());
    assert!(e.contains("go with --expert-budget"), "{e}");
    let e = fails(dir, &["generate", "-m", m, "--prompt", "O", "--expert-cache", "lru"]);
    assert!(e.contains("need a MoE (--moe DIR)") && e.contains("dense model"), "{e}");
    let e = fails(dir, &[&gen[..], &["--expert-budget", "lots"]].concat());
    assert!(e.contains("a count of experts"), "{e}");
    let e =
        fails(dir, &["generate", "-m", m, "--moe", &format!("{moe}/pruned"), "--prompt", "O", "--expert-budget", "1"]);
    assert!(e.contains("needs a pre-gated MoE"), "{e}");
}

/// `moe-trace` on the MoE just made: every batching and policy reported, and a cache holding
/// every expert loads each once.
fn moe_trace_replays_the_routes(dir: &Path, m: &Path, moe: &Path, calib: &str) {
    let (m, moe) = (m.to_str().unwrap(), moe.to_str().unwrap());
    let json = dir.join("trace.json");
    let args = ["moe-trace", "-q", "-m", m, "--moe", moe, "--domains", calib, "--requests", "6", "--prompt", "16"];
    let more = ["--completion", "8", "--capacity", "1,2", "--batch", "2", "--json", json.to_str().unwrap()];
    let (stdout, _) = succeeds(dir, &[&args[..], &more[..]].concat());
    assert!(stdout.contains("hit rate, expert batching"), "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let b = v["batching"].as_array().unwrap();
    assert_eq!(b.len(), 3);
    for r in b {
        let u = r["unique_experts"].as_f64().unwrap();
        assert!((1.0..=2.0).contains(&u), "{r}");
        let runs = r["cache"].as_array().unwrap();
        assert_eq!(runs.len(), 8);
        for c in runs {
            let (hits, loads) = (c["hits"].as_u64().unwrap(), c["loads"].as_u64().unwrap());
            assert!(hits + loads >= 1, "{c}");
            if c["capacity"] == 2 {
                assert!(loads <= 2, "a cache holding both experts loads each at most once: {c}");
            }
        }
    }
    // Without a pre-gate, an impossible capacity, or no --moe: one line each.
    let e = fails(dir, &["moe-trace", "-m", m, "--moe", &format!("{moe}/pruned"), "--domains", calib]);
    assert!(e.contains("no pre-gating router"), "{e}");
    let e = fails(dir, &["moe-trace", "-m", m, "--moe", moe, "--domains", calib, "--capacity", "3"]);
    assert!(e.contains("--capacity 3: from 1 to the MoE's 2 experts"), "{e}");
    let e = fails(dir, &["moe-trace", "-m", m]);
    assert!(e.contains("give --moe DIR"), "{e}");
}

#[test]
fn moefy_refuses_bad_settings_and_thin_or_missing_text() {
    let d = tempfile::tempdir().unwrap();
    let (m, a, b) = setup(d.path());
    let (m, a, b) = (m.to_str().unwrap(), a.to_str().unwrap(), b.to_str().unwrap());
    let out = d.path().join("moe");
    let o = out.to_str().unwrap();
    let two = format!("{a},{b}");
    let run = |extra: &[&str]| {
        let mut args = vec!["moefy", "-m", m, "-o", o];
        args.extend_from_slice(extra);
        fails(d.path(), &args)
    };
    assert!(run(&["--calib", a]).contains("at least two domains"));
    assert!(run(&["--calib", &format!("{a},{a}")]).contains("names a domain twice"));
    assert!(run(&["--calib", &two, "--keep", "1.5"]).contains("not a fraction"));
    assert!(run(&["--calib", &two, "--experts", "3"]).contains("--experts 3 for 2 calibration domains"));
    assert!(run(&["--calib", &two, "--router-steps", "0"]).contains("--router-steps must be at least 1"));
    assert!(run(&["--calib", &two, "--ctx", "4096"]).contains("longer than the model's context"));
    let e = run(&["--calib", &two, "--rows", "1", "--ctx", "64"]);
    assert!(e.contains("too few to rank channels"), "{e}");
    let short = d.path().join("short.txt");
    std::fs::write(&short, "too short").unwrap();
    let e = run(&["--calib", &format!("{a},{}", short.display()), "--ctx", "64"]);
    assert!(e.contains("fewer than two rows"), "{e}");
    let e = run(&["--calib", &format!("{a},/no/such/text")]);
    assert!(e.contains("not a domain"), "{e}");
    let file = d.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let e = fails(d.path(), &["moefy", "-m", m, "--calib", &two, "-o", file.to_str().unwrap()]);
    assert!(e.contains("-o takes a folder"), "{e}");
    assert!(!out.exists(), "a refused run left an output folder");
}

#[test]
fn moefy_clusters_unlabelled_text_into_experts() {
    let d = tempfile::tempdir().unwrap();
    let (m, a, b) = setup(d.path());
    let out = d.path().join("moe");
    // Both texts pooled, then clustered: the experts are clusters, not the texts.
    let calib = format!("{},{}", a.display(), b.display());
    let args = [
        "moefy",
        "-q",
        "-m",
        m.to_str().unwrap(),
        "--calib",
        &calib,
        "--cluster",
        "--experts",
        "3",
        "--rows",
        "8",
        "--ctx",
        "64",
        "--eval-rows",
        "2",
        "--router-steps",
        "10",
        "--layerwise-steps",
        "10",
        "-o",
        out.to_str().unwrap(),
    ];
    succeeds(d.path(), &args);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["split"]["names"], serde_json::json!(["cluster0", "cluster1", "cluster2"]));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let q = v["quality"].as_array().unwrap();
    assert_eq!(q.len(), 2, "quality is still reported per text");
    assert!(q[0]["oracle_is_own"].is_null(), "a cluster is no text's own expert");
    let one = a.to_str().unwrap();
    let e = fails(d.path(), &["moefy", "-m", m.to_str().unwrap(), "--calib", one, "--cluster", "-o", "x"]);
    assert!(e.contains("--cluster needs --experts"), "{e}");
    let e = fails(
        d.path(),
        &["moefy", "-m", m.to_str().unwrap(), "--calib", one, "--cluster", "--experts", "80", "-o", "x"],
    );
    assert!(e.contains("from 2 to 64 clusters"), "{e}");
}
