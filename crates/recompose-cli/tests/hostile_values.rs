//! Hostile values through the real binary: NaN and infinite merge parameters, densities that are
//! not fractions, configs of thousands of models, and task vectors or signatures edited by hand
//! (NaN values, transposed shapes, tensors the model lacks, unknown quantisation schemes). Each
//! used to be accepted with exit 0; each must now fail with one line and write no output.

use recompose_core::testing::{write_tiny_gguf, TinySpec};
use serde_json::Value;
use std::path::{Path, PathBuf};

mod common;
use common::{fails, succeeds};

/// A folder with two tiny models, a.gguf and b.gguf.
fn two_models() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.gguf"), d.path().join("b.gguf"));
    write_tiny_gguf(&a, &TinySpec { seed: 1, ..Default::default() }).unwrap();
    write_tiny_gguf(&b, &TinySpec { seed: 2, ..Default::default() }).unwrap();
    (d, a, b)
}

/// Runs `args` expecting a one-line error containing `want`, and checks that `out` was not
/// written (nor a temporary file left beside it).
fn refused(home: &Path, args: &[&str], out: &Path, want: &str) {
    let e = fails(home, args);
    assert!(e.contains(want), "want {want:?} in {e:?}");
    assert!(!out.exists(), "{} was written", out.display());
    let left: Vec<String> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".recompose-tmp"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Merges `yaml` (written to m.yml) into `out`, expecting the refusal `want`.
fn merge_refused(home: &Path, yaml: &str, want: &str) {
    let cfg = home.join("m.yml");
    std::fs::write(&cfg, yaml).unwrap();
    let out = home.join("out");
    refused(home, &["merge", cfg.to_str().unwrap(), out.to_str().unwrap()], &out, want);
}

/// A ties merge of b onto a with `params` on b, and `extra` top-level lines.
fn ties(a: &Path, b: &Path, params: &str, extra: &str) -> String {
    format!(
        "merge_method: ties\nbase_model: {0}\nmodels:\n  - model: {0}\n  - model: {1}\n    parameters: {params}\n{extra}",
        a.display(),
        b.display()
    )
}

#[test]
fn a_nan_merge_weight_is_refused() {
    let (d, a, b) = two_models();
    for (value, shown) in [(".nan", "NaN"), (".inf", "inf"), ("-.inf", "-inf")] {
        let want = format!("models[1].parameters.weight of model '{}': {shown} is not a finite number", b.display());
        merge_refused(d.path(), &ties(&a, &b, &format!("{{weight: {value}}}"), ""), &want);
    }
}

#[test]
fn a_non_finite_parameter_in_a_gradient_condition_or_method_is_refused() {
    let (d, a, b) = two_models();
    let h = d.path();
    merge_refused(h, &ties(&a, &b, "{weight: [1, .nan]}", ""), "parameters.weight of model");
    merge_refused(h, &ties(&a, &b, "{weight: [{filter: mlp, value: .inf}, {value: 1}]}", ""), ": inf is not a finite");
    merge_refused(h, &ties(&a, &b, "{weight: 1}", "parameters: {lambda: .nan}\n"), "parameters.lambda: NaN");
    let slerp = format!(
        "merge_method: slerp\nbase_model: {0}\nmodels:\n  - model: {0}\n  - model: {1}\nparameters: {{t: [0, .inf]}}\n",
        a.display(),
        b.display()
    );
    merge_refused(h, &slerp, "parameters.t: inf is not a finite number");
}

#[test]
fn density_outside_zero_one_is_refused() {
    let (d, a, b) = two_models();
    for density in ["2", "-0.5", "0", "[0.5, 1.5]"] {
        let shown = if density.starts_with('[') { "1.5" } else { density };
        let want = format!("parameters.density of model '{}': {shown} is outside (0, 1]", b.display());
        merge_refused(d.path(), &ties(&a, &b, &format!("{{weight: 1, density: {density}}}"), ""), &want);
    }
    // Dropping half the delta is fine.
    let cfg = d.path().join("ok.yml");
    std::fs::write(&cfg, ties(&a, &b, "{weight: 1, density: 0.5}", "")).unwrap();
    succeeds(d.path(), &["merge", cfg.to_str().unwrap(), d.path().join("ok").to_str().unwrap()]);
}

/// 2,000 copies of one model aborted the process. The count is refused before any model is
/// opened: with copies of a file that does not exist, the error is still about the count.
#[test]
fn a_config_of_thousands_of_models_is_refused() {
    let (d, a, _) = two_models();
    for model in [a.to_str().unwrap(), "missing.gguf"] {
        let yaml = format!(
            "merge_method: linear\nmodels:\n{}",
            format!("  - model: {model}\n    parameters: {{weight: 1}}\n").repeat(2000)
        );
        merge_refused(d.path(), &yaml, "2000 models listed (at most 256");
    }
}

/// A safetensors file as (header, data), to be edited and written back.
fn read_st(path: &Path) -> (serde_json::Map<String, Value>, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

fn write_st(path: &Path, header: &serde_json::Map<String, Value>, data: &[u8]) {
    let mut h = serde_json::to_string(header).unwrap();
    while h.len() % 8 != 0 {
        h.push(' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    std::fs::write(path, out).unwrap();
}

/// The first stored tensor of `header` whose shape has two different dimensions.
fn non_square(header: &serde_json::Map<String, Value>) -> String {
    let dims = |v: &Value| v["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect::<Vec<_>>();
    let found = header.iter().find(|(k, v)| *k != "__metadata__" && matches!(dims(v)[..], [r, c] if r != c));
    found.map(|(k, _)| k.clone()).expect("a non-square tensor")
}

/// Extracts a task vector b - a (`--levels` if given) into tv.safetensors, edits it with `edit`,
/// and checks that `tv apply a` refuses it with `want`.
fn edited_tv_refused(
    levels: Option<&str>,
    edit: impl FnOnce(&mut serde_json::Map<String, Value>, &mut Vec<u8>),
    want: &str,
) {
    let (d, a, b) = two_models();
    let h = d.path();
    let tv = h.join("tv.safetensors");
    let (a, b, t) = (a.to_str().unwrap(), b.to_str().unwrap(), tv.to_str().unwrap());
    let mut args = vec!["tv", "extract", "--base", a, "--finetuned", b, "-o", t];
    args.extend(levels.iter().flat_map(|l| ["--levels", *l]));
    succeeds(h, &args);
    let (mut header, mut data) = read_st(&tv);
    edit(&mut header, &mut data);
    write_st(&tv, &header, &data);
    let out = h.join("out");
    refused(h, &["tv", "apply", a, &format!("{t}:0.5"), "-o", out.to_str().unwrap()], &out, want);
}

#[test]
fn a_task_vector_with_a_nan_value_is_refused() {
    for (bad, shown) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf")] {
        edited_tv_refused(
            None,
            |header, data| {
                let name = non_square(header);
                let start = header[&name]["data_offsets"][0].as_u64().unwrap() as usize + 4;
                data[start..start + 4].copy_from_slice(&bad.to_le_bytes());
            },
            &format!(": element 1 is {shown}, not a finite number"),
        );
    }
}

#[test]
fn a_task_vector_for_a_transposed_shape_is_refused() {
    edited_tv_refused(
        None,
        |header, _| {
            let name = non_square(header);
            let shape = header[&name]["shape"].as_array_mut().unwrap();
            shape.reverse();
        },
        "has shape [",
    );
}

#[test]
fn a_task_vector_naming_a_tensor_the_model_lacks_is_refused() {
    edited_tv_refused(
        None,
        |header, data| {
            let end = data.len();
            data.extend_from_slice(&[0u8; 8]);
            let entry = serde_json::json!({"dtype": "F32", "shape": [2], "data_offsets": [end, end + 8]});
            header.insert("model.layers.7.mlp.extra.weight".into(), entry);
        },
        "tensor 'model.layers.7.mlp.extra.weight' is not in",
    );
}

#[test]
fn an_unknown_quantisation_scheme_is_refused() {
    edited_tv_refused(
        Some("16"),
        |header, _| {
            let meta = header["__metadata__"].as_object_mut().unwrap();
            let mut quant: Value = serde_json::from_str(meta["recompose.quant"].as_str().unwrap()).unwrap();
            let first = quant.as_object_mut().unwrap().values_mut().next().unwrap();
            first["scheme"] = "cubic".into();
            meta.insert("recompose.quant".into(), quant.to_string().into());
        },
        "unknown scheme 'cubic'",
    );
}

/// Signatures go through the same reader: a NaN is refused by apply and by inspect.
#[test]
fn a_signature_with_a_nan_value_is_refused() {
    let (d, a, b) = two_models();
    let h = d.path();
    let sig = h.join("sig.safetensors");
    let (a, b, s) = (a.to_str().unwrap(), b.to_str().unwrap(), sig.to_str().unwrap());
    succeeds(h, &["rws", "extract", "--pretrained", a, "--clean", a, "--robust", b, "--layers", "first:1", "-o", s]);
    let (header, mut data) = read_st(&sig);
    data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    write_st(&sig, &header, &data);
    let out = h.join("out");
    refused(h, &["rws", "apply", a, s, "-o", out.to_str().unwrap()], &out, "element 0 is NaN");
    assert!(fails(h, &["rws", "inspect", s]).contains("element 0 is NaN"));
}
