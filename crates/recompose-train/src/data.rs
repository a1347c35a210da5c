//! Training data for language models: plain text packed into rows of `ctx` next-token targets,
//! or JSONL chat (`{"messages": [{"role": ..., "content": ...}, ...]}` per line) rendered with
//! the model's chat template, with loss on the assistant turns only; a held-out split; and a
//! seeded row order that a checkpoint resumes from a plain counter.

use crate::{Error, Result};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use recompose_core::chat::Message;
use recompose_core::Tokenizer;
use recompose_llm::grad::IGNORE;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// One row: `tokens[i]` predicts `targets[i]` (or nothing, when it is [`IGNORE`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub tokens: Vec<u32>,
    pub targets: Vec<u32>,
}

pub struct Dataset {
    pub examples: Vec<Example>,
    /// What was read, for logs.
    pub describe: String,
    /// A hash of every example's tokens and targets (part of a run's identity).
    pub hash: String,
}

impl Dataset {
    pub fn new(examples: Vec<Example>, describe: String) -> Self {
        let mut h = Sha256::new();
        for e in &examples {
            for (t, y) in e.tokens.iter().zip(&e.targets) {
                h.update(t.to_le_bytes());
                h.update(y.to_le_bytes());
            }
            h.update(b"|");
        }
        let hash = h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
        Self { examples, describe, hash }
    }

    /// Tokens that take a loss.
    pub fn target_count(&self) -> usize {
        self.examples.iter().map(|e| e.targets.iter().filter(|&&t| t != IGNORE).count()).sum()
    }

    /// Splits off the last `fraction` of the rows (at least one) as held-out data, so the two
    /// parts never share text.
    pub fn split_last(mut self, fraction: f64) -> Result<(Dataset, Dataset)> {
        let n = self.examples.len();
        if n < 2 {
            return Err(Error::Data(format!(
                "{}: {n} row(s), too few to hold any out for evaluation (give --eval-data)",
                self.describe
            )));
        }
        let held = ((n as f64 * fraction).round() as usize).clamp(1, n - 1);
        let tail = self.examples.split_off(n - held);
        let d = self.describe.clone();
        Ok((
            Dataset::new(self.examples, format!("{d} (first {} rows)", n - held)),
            Dataset::new(tail, format!("{d} (last {held} rows)")),
        ))
    }
}

/// Files behind a data argument: a file, or every `.txt`/`.jsonl` file of a folder (sorted).
pub fn expand(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::Data(format!("{}: {e}", path.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "txt" || x == "jsonl"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::Data(format!("{}: no .txt or .jsonl files", path.display())));
        }
        return Ok(files);
    }
    if !path.is_file() {
        return Err(Error::Data(format!("{}: no such file", path.display())));
    }
    Ok(vec![path.to_path_buf()])
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::Data(format!("{}: {e}", path.display())))
}

/// Text or chat, by extension: every `.jsonl` file is chat, anything else text (not both).
pub fn load(paths: &[PathBuf], tok: &Tokenizer, ctx: usize) -> Result<Dataset> {
    if ctx < 2 {
        return Err(Error::Config(format!("context {ctx} is too short (at least 2 tokens)")));
    }
    let chat = paths.iter().filter(|p| p.extension().is_some_and(|x| x == "jsonl")).count();
    match chat {
        0 => load_text(paths, tok, ctx),
        n if n == paths.len() => load_chat(paths, tok, ctx),
        _ => Err(Error::Data("mixing .jsonl chat and plain text files in one data set is not supported".into())),
    }
}

/// Plain text: each file tokenized (no BOS), documents joined with EOS, the stream cut into
/// rows of `ctx + 1` tokens overlapping by one (each row's last token is the next row's first).
pub fn load_text(paths: &[PathBuf], tok: &Tokenizer, ctx: usize) -> Result<Dataset> {
    let mut ids = vec![];
    for p in paths {
        if !ids.is_empty() {
            ids.extend(tok.eos.first());
        }
        ids.extend(tok.encode(&read(p)?, false)?);
    }
    let describe = describe(paths);
    let rows = ids.len().saturating_sub(1) / ctx;
    if rows == 0 {
        return Err(Error::Data(format!(
            "{describe}: {} tokens, fewer than one context of {} (ctx + 1)",
            ids.len(),
            ctx + 1
        )));
    }
    let examples = (0..rows)
        .map(|r| Example {
            tokens: ids[r * ctx..(r + 1) * ctx].to_vec(),
            targets: ids[r * ctx + 1..(r + 1) * ctx + 1].to_vec(),
        })
        .collect();
    Ok(Dataset::new(examples, describe))
}

fn describe(paths: &[PathBuf]) -> String {
    match paths {
        [one] => one.display().to_string(),
        [first, ..] => format!("{} and {} more files", first.display(), paths.len() - 1),
        [] => "no files".into(),
    }
}

#[derive(serde::Deserialize)]
struct ChatRow {
    messages: Vec<ChatMessage>,
}

#[derive(serde::Deserialize)]
struct ChatMessage {
    role: String,
    content: String,
}

/// JSONL chat: one conversation per row, rendered with the model's template, truncated to
/// `ctx + 1` tokens; targets only on the assistant turns (the text the template adds after
/// each assistant prompt, its end-of-turn marker included).
pub fn load_chat(paths: &[PathBuf], tok: &Tokenizer, ctx: usize) -> Result<Dataset> {
    let template = tok
        .chat_template
        .as_deref()
        .ok_or_else(|| Error::Data("the model has no chat template, so chat data cannot be rendered".into()))?;
    let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).unwrap_or_default();
    let (bos, eos) = (name(tok.bos), name(tok.eos.first().copied()));
    let render = |m: &[Message], gen: bool| recompose_core::chat::render(template, m, gen, &bos, &eos);
    let mut examples = vec![];
    let mut truncated_away = 0;
    for p in paths {
        let text = read(p)?;
        for (ln, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = || format!("{}:{}", p.display(), ln + 1);
            let row: ChatRow =
                serde_json::from_str(line).map_err(|e| Error::Data(format!("{}: not a chat row ({e})", at())))?;
            let msgs: Vec<Message> =
                row.messages.into_iter().map(|m| Message { role: m.role, content: m.content }).collect();
            if !msgs.iter().any(|m| m.role == "assistant") {
                return Err(Error::Data(format!("{}: no assistant turn (nothing to learn from)", at())));
            }
            // Pieces of the rendering: context up to each assistant prompt, then the turn.
            let (mut tokens, mut learn) = (vec![], vec![]);
            let mut done = 0usize; // characters of the rendering already tokenized
            let add = |piece: &str, is_target: bool, tokens: &mut Vec<u32>, learn: &mut Vec<bool>| -> Result<()> {
                let ids = tok.encode(piece, false)?;
                learn.extend(std::iter::repeat_n(is_target, ids.len()));
                tokens.extend(ids);
                Ok(())
            };
            if tok.add_bos {
                tokens.extend(tok.bos);
                learn.extend(tok.bos.map(|_| false));
            }
            for i in 0..msgs.len() {
                if msgs[i].role != "assistant" {
                    continue;
                }
                let before = render(&msgs[..i], true).map_err(|e| Error::Data(format!("{}: {e}", at())))?;
                let with = render(&msgs[..=i], false).map_err(|e| Error::Data(format!("{}: {e}", at())))?;
                if !with.starts_with(&before) || before.len() < done {
                    return Err(Error::Data(format!(
                        "{}: the chat template does not render conversations as a growing prefix; \
                         assistant turns cannot be located",
                        at()
                    )));
                }
                add(&before[done..], false, &mut tokens, &mut learn)?;
                add(&with[before.len()..], true, &mut tokens, &mut learn)?;
                done = with.len();
            }
            tokens.truncate(ctx + 1);
            learn.truncate(ctx + 1);
            let targets: Vec<u32> = (1..tokens.len()).map(|j| if learn[j] { tokens[j] } else { IGNORE }).collect();
            if targets.iter().all(|&t| t == IGNORE) {
                truncated_away += 1;
                continue;
            }
            tokens.pop();
            examples.push(Example { tokens, targets });
        }
    }
    let describe = describe(paths);
    if examples.is_empty() {
        return Err(Error::Data(if truncated_away > 0 {
            format!("{describe}: every conversation's assistant turns lie beyond the context of {ctx} tokens")
        } else {
            format!("{describe}: no conversations")
        }));
    }
    if truncated_away > 0 {
        tracing::warn!(
            "{describe}: {truncated_away} conversations skipped: their assistant turns lie beyond the context"
        );
    }
    Ok(Dataset::new(examples, describe))
}

/// The row order: a fresh seeded permutation every epoch. Position `k` of the run (rows
/// consumed so far) fixes everything, so resuming needs only the counter.
pub struct Order {
    seed: u64,
    rows: usize,
    epoch: usize,
    perm: Vec<usize>,
}

impl Order {
    pub fn new(seed: u64, rows: usize) -> Self {
        let mut o = Self { seed, rows, epoch: usize::MAX, perm: vec![] };
        o.set_epoch(0);
        o
    }

    fn set_epoch(&mut self, epoch: usize) {
        if epoch == self.epoch {
            return;
        }
        self.perm = (0..self.rows).collect();
        self.perm.shuffle(&mut StdRng::seed_from_u64(self.seed ^ (epoch as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        self.epoch = epoch;
    }

    /// The row at position `k`.
    pub fn row(&mut self, k: usize) -> usize {
        self.set_epoch(k / self.rows.max(1));
        self.perm[k % self.rows.max(1)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_a_permutation_per_epoch_and_seeded() {
        let mut o = Order::new(3, 10);
        let e0: Vec<usize> = (0..10).map(|k| o.row(k)).collect();
        let e1: Vec<usize> = (10..20).map(|k| o.row(k)).collect();
        let mut s = e0.clone();
        s.sort();
        assert_eq!(s, (0..10).collect::<Vec<_>>());
        assert_ne!(e0, e1);
        let mut again = Order::new(3, 10);
        assert_eq!(again.row(13), e1[3]);
        assert_eq!((0..10).map(|k| again.row(k)).collect::<Vec<_>>(), e0);
    }
}
