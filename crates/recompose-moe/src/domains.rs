//! Calibration domains: a named text cut into rows of tokens, the last tenth held out for
//! evaluation (never sharing text with the rows calibration draws from).
//!
//! Built in ([`BUILT_IN`], each an asset pinned by sha256): `shakespeare` (the complete works),
//! `austen` (the six novels), `mmlu` (the test split's questions with their choices and
//! answers), `code` (a Python library's source), `docs` (a Python library's documentation),
//! `fortunes` (quotations and jokes) and `bigbench` (BIG-bench task inputs with their answers);
//! any other name is read as a text file or a folder of them.

use crate::{Error, Result};
use recompose_core::Tokenizer;
use std::path::{Path, PathBuf};

/// The part of a domain's rows held out for evaluation.
pub const HELD_OUT: f64 = 0.1;

pub struct Domain {
    pub name: String,
    /// Rows for statistics and training, spread evenly over the text before the held-out part.
    pub calib: Vec<Vec<u32>>,
    /// The last rows of the text.
    pub held_out: Vec<Vec<u32>>,
}

/// The built-in domains: seven, as the paper's seven experts.
pub const BUILT_IN: &[&str] = &["shakespeare", "austen", "mmlu", "code", "docs", "fortunes", "bigbench"];

/// The text of domain `name`.
pub fn text(name: &str) -> Result<String> {
    match name {
        "mmlu" => Ok(recompose_eval::mmlu::split_text(&recompose_assets::ensure("mmlu")?, "test")
            .map_err(|e| Error::Data(format!("mmlu: {e}")))?),
        n if BUILT_IN.contains(&n) => read_folder(&recompose_assets::main_file(n)?),
        other => {
            let p = PathBuf::from(other);
            if p.is_dir() {
                read_folder(&p)
            } else if p.is_file() {
                std::fs::read_to_string(&p).map_err(|e| Error::Data(format!("{other}: {e}")))
            } else {
                Err(Error::Data(format!("{other}: not a domain ({}) nor a text file or folder", BUILT_IN.join(", "))))
            }
        }
    }
}

/// Every `.txt` file of a folder, in name order, separated by blank lines.
fn read_folder(dir: &Path) -> Result<String> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::Data(format!("{}: {e}", dir.display())))?;
    let mut files: Vec<PathBuf> =
        rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "txt")).collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::Data(format!("{}: no .txt files", dir.display())));
    }
    let mut out = String::new();
    for f in files {
        out.push_str(&std::fs::read_to_string(&f).map_err(|e| Error::Data(format!("{}: {e}", f.display())))?);
        out.push_str("\n\n");
    }
    Ok(out)
}

/// Cuts `ids` into rows of `ctx` tokens; the last [`HELD_OUT`] of them (at least one) are held
/// out, and `rows` rows are drawn evenly from the others (all of them when there are fewer).
pub fn cut(name: &str, ids: &[u32], ctx: usize, rows: usize) -> Result<Domain> {
    if ctx == 0 || rows == 0 {
        return Err(Error::Config(format!("{name}: rows of {ctx} tokens, {rows} rows asked")));
    }
    let all: Vec<&[u32]> = ids.chunks_exact(ctx).collect();
    if all.len() < 2 {
        return Err(Error::Data(format!(
            "{name}: {} tokens, fewer than two rows of {ctx} (one to calibrate on, one held out)",
            ids.len()
        )));
    }
    let held = ((all.len() as f64 * HELD_OUT).round() as usize).clamp(1, all.len() - 1);
    let (body, tail) = all.split_at(all.len() - held);
    let take = rows.min(body.len());
    // Evenly spread: row i of `take` from the i-th of `take` equal stretches of the body.
    let calib = (0..take).map(|i| body[i * body.len() / take].to_vec()).collect();
    Ok(Domain { name: name.to_string(), calib, held_out: tail.iter().map(|r| r.to_vec()).collect() })
}

/// Domain `name`'s text tokenized (no BOS), to [`cut`] once or several times.
pub fn ids(name: &str, tok: &Tokenizer) -> Result<Vec<u32>> {
    Ok(tok.encode(&text(name)?, false)?)
}

/// Domain `name`: its text tokenized (no BOS) and [`cut`].
pub fn load(name: &str, tok: &Tokenizer, ctx: usize, rows: usize) -> Result<Domain> {
    cut(name, &ids(name, tok)?, ctx, rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_drawn_evenly_and_never_from_the_held_out_tail() {
        let ids: Vec<u32> = (0..1000).collect();
        let d = cut("t", &ids, 10, 5).unwrap();
        // 100 rows: the last 10 held out, 5 drawn from the first 90.
        assert_eq!(d.held_out.len(), 10);
        assert_eq!(d.held_out[0][0], 900);
        assert_eq!(d.calib.iter().map(|r| r[0]).collect::<Vec<_>>(), vec![0, 180, 360, 540, 720]);
        assert!(d.calib.iter().all(|r| r.len() == 10));
        // Asking for more rows than there are gives all of them.
        assert_eq!(cut("t", &ids, 10, 500).unwrap().calib.len(), 90);
    }

    #[test]
    fn too_little_text_or_a_bad_name_is_refused() {
        let e = cut("t", &[1, 2, 3], 10, 5).err().unwrap().to_string();
        assert!(e.contains("fewer than two rows"), "{e}");
        let e = text("/no/such/place").err().unwrap().to_string();
        assert!(e.contains("not a domain"), "{e}");
        let e = cut("t", &[1, 2, 3], 0, 5).err().unwrap().to_string();
        assert!(e.contains("rows of 0 tokens"), "{e}");
    }
}
