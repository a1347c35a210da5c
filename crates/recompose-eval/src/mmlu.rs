//! MMLU, k-shot from the dev split: the prompt of the original MMLU code, and the answer is the
//! choice letter (" A" .. " D") with the highest log-likelihood after "Answer:".

use crate::csv;
use crate::error::{Error, Result};
use candle_core::DType;
use recompose_core::Tokenizer;
use recompose_kv::KvSpec;
use recompose_llm::model::step_for;
use recompose_llm::{Logits, Model};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct MmluOptions {
    pub dir: PathBuf,
    /// "val" or "test".
    pub split: String,
    /// Only these subjects (all when empty).
    pub subjects: Vec<String>,
    /// At most this many questions per subject.
    pub limit: Option<usize>,
    pub shots: usize,
    /// KV policy applied while each prompt is read (the H2O paper's lm-eval setting needs a
    /// bounded prefill, `prefill=C`: with `prefill=full` the answer sees the whole prompt).
    pub kv: KvSpec,
}

#[derive(Debug, Clone, Serialize)]
pub struct SubjectResult {
    pub subject: String,
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MmluReport {
    pub split: String,
    pub shots: usize,
    pub subjects: Vec<SubjectResult>,
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
    /// Half-width of the 95% normal-approximation interval of `accuracy`.
    pub ci95: f64,
    /// The chosen answer (0..4 for A..D) of every question, in order: lets two runs be compared
    /// question by question (a paired comparison separates far more than two accuracies do).
    pub picks: Vec<u8>,
    /// The right answer of every question, in the same order.
    pub answers: Vec<u8>,
}

struct Question {
    text: String,
    choices: [String; 4],
    answer: usize,
}

fn load(path: &Path) -> Result<Vec<Question>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Data { path: path.display().to_string(), what: e.to_string() })?;
    let rows = csv::parse(&text).map_err(|what| Error::Data { path: path.display().to_string(), what })?;
    rows.into_iter()
        .enumerate()
        .map(|(i, r)| {
            let bad =
                |what: String| Error::Data { path: path.display().to_string(), what: format!("row {}: {what}", i + 1) };
            if r.len() != 6 {
                return Err(bad(format!("{} fields, expected 6", r.len())));
            }
            let answer = match r[5].trim() {
                "A" => 0,
                "B" => 1,
                "C" => 2,
                "D" => 3,
                other => return Err(bad(format!("answer '{other}' is not A-D"))),
            };
            Ok(Question {
                text: r[0].clone(),
                choices: [r[1].clone(), r[2].clone(), r[3].clone(), r[4].clone()],
                answer,
            })
        })
        .collect()
}

const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

fn format_question(q: &Question, with_answer: bool) -> String {
    let mut s = q.text.clone();
    for (l, c) in LETTERS.iter().zip(&q.choices) {
        s.push_str(&format!("\n{l}. {c}"));
    }
    s.push_str("\nAnswer:");
    if with_answer {
        s.push_str(&format!(" {}\n\n", LETTERS[q.answer]));
    }
    s
}

/// Every question of a split (`dev`, `val`, `test`) of every subject, in subject order, as the
/// prompts show worked examples (question, choices, answer): MMLU as plain text, for calibration.
pub fn split_text(dir: &Path, split: &str) -> Result<String> {
    let mut out = String::new();
    for s in subjects(dir, split)? {
        for q in load(&dir.join(split).join(format!("{s}_{split}.csv")))? {
            out.push_str(&format_question(&q, true));
        }
    }
    Ok(out)
}

/// All subjects present in the split folder, sorted.
pub fn subjects(dir: &Path, split: &str) -> Result<Vec<String>> {
    let d = dir.join(split);
    let rd = std::fs::read_dir(&d).map_err(|e| Error::Data { path: d.display().to_string(), what: e.to_string() })?;
    let suffix = format!("_{split}.csv");
    let mut v: Vec<String> =
        rd.flatten().filter_map(|e| e.file_name().to_str()?.strip_suffix(&suffix).map(str::to_owned)).collect();
    v.sort();
    Ok(v)
}

pub fn evaluate(
    model: &Model,
    tok: &Tokenizer,
    o: &MmluOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<MmluReport> {
    if o.split != "val" && o.split != "test" {
        return Err(Error::Invalid(format!("split must be val or test, got '{}'", o.split)));
    }
    let all = subjects(&o.dir, &o.split)?;
    let chosen: Vec<String> = if o.subjects.is_empty() {
        all
    } else {
        for s in &o.subjects {
            if !all.contains(s) {
                return Err(Error::Invalid(format!("unknown MMLU subject '{s}'")));
            }
        }
        o.subjects.clone()
    };
    let choice_ids: Vec<Vec<u32>> =
        LETTERS.iter().map(|l| tok.encode(&format!(" {l}"), false)).collect::<std::result::Result<_, _>>()?;
    let mut work = vec![];
    for s in &chosen {
        let dev = load(&o.dir.join("dev").join(format!("{s}_dev.csv")))?;
        let mut qs = load(&o.dir.join(&o.split).join(format!("{s}_{}.csv", o.split)))?;
        if let Some(l) = o.limit {
            qs.truncate(l);
        }
        let mut header =
            format!("The following are multiple choice questions (with answers) about {}.\n\n", s.replace('_', " "));
        for q in dev.iter().take(o.shots) {
            header.push_str(&format_question(q, true));
        }
        work.push((s.clone(), header, qs));
    }
    let total_q: usize = work.iter().map(|w| w.2.len()).sum();
    let mut done = 0;
    let mut results = vec![];
    let mut picks = vec![];
    let mut answers = vec![];
    for (subject, header, qs) in work {
        let mut correct = 0;
        for q in &qs {
            let ctx = tok.encode(&format!("{header}{}", format_question(q, false)), true)?;
            let scores = score_choices(model, &ctx, &choice_ids, &o.kv)?;
            let pred = (0..4).max_by(|&a, &b| scores[a].total_cmp(&scores[b])).unwrap_or(0);
            correct += usize::from(pred == q.answer);
            picks.push(pred as u8);
            answers.push(q.answer as u8);
            done += 1;
            progress(done, total_q);
        }
        let total = qs.len();
        results.push(SubjectResult { subject, correct, total, accuracy: correct as f64 / total.max(1) as f64 });
    }
    let correct: usize = results.iter().map(|r| r.correct).sum();
    let total: usize = results.iter().map(|r| r.total).sum();
    let acc = correct as f64 / total.max(1) as f64;
    let ci95 = 1.96 * (acc * (1.0 - acc) / total.max(1) as f64).sqrt();
    Ok(MmluReport {
        split: o.split.clone(),
        shots: o.shots,
        subjects: results,
        correct,
        total,
        accuracy: acc,
        ci95,
        picks,
        answers,
    })
}

/// Log-likelihood of each continuation after `ctx`. One forward when every continuation is a
/// single token; otherwise one batched forward over ctx + continuation rows.
fn score_choices(model: &Model, ctx: &[u32], choices: &[Vec<u32>], kv: &KvSpec) -> Result<Vec<f64>> {
    if ctx.len() + choices.iter().map(Vec::len).max().unwrap_or(0) > model.config.max_position {
        return Err(
            recompose_llm::Error::ContextOverflow { tokens: ctx.len(), context: model.config.max_position }.into()
        );
    }
    if choices.iter().all(|c| c.len() == 1) {
        let mut cache = kv.build(&model.cache_layout(), &[ctx.len()]);
        let logits = model.prefill(&[ctx.to_vec()], cache.as_mut(), recompose_llm::generate::PREFILL_CHUNK)?;
        let logp = crate::log_softmax(&logits.to_dtype(DType::F64)?)?.squeeze(0)?.to_vec1::<f64>()?;
        return Ok(choices.iter().map(|c| logp[c[0] as usize]).collect());
    }
    if !kv.is_full() {
        return Err(Error::Invalid(format!(
            "this tokenizer spells the answers in several tokens; --kv {kv} needs one"
        )));
    }
    let rows: Vec<Vec<u32>> = choices.iter().map(|c| [ctx, c.as_slice()].concat()).collect();
    let mut cache = model.new_cache(rows.len());
    let (tokens, step) = step_for(&rows, &cache, 0);
    let logits = model.forward(&tokens, &step, &mut cache, Logits::From(ctx.len() - 1))?;
    let logp = crate::log_softmax(&logits.to_dtype(DType::F64)?)?;
    let mut out = vec![];
    for (b, c) in choices.iter().enumerate() {
        let row: Vec<Vec<f64>> = logp.get(b)?.to_vec2()?;
        out.push(c.iter().enumerate().map(|(i, &t)| row[i][t as usize]).sum());
    }
    Ok(out)
}
