//! BIG-bench task texts: each example's input followed by its answer, as one calibration text.

/// The tasks the `bigbench` asset takes: natural-language reasoning and understanding, each
/// with examples in its top-level `task.json` (tasks made of programmatic or coded subtasks
/// are left out).
pub const TASKS: &[&str] = &[
    "causal_judgment",
    "date_understanding",
    "disambiguation_qa",
    "epistemic_reasoning",
    "fantasy_reasoning",
    "implicatures",
    "moral_permissibility",
    "movie_recommendation",
    "navigate",
    "ruin_names",
    "snarks",
    "social_iqa",
    "sports_understanding",
    "strategyqa",
    "understanding_fables",
    "winowhy",
];

/// Text taken from one task at most, so that no task outweighs the rest.
pub const MAX_TASK_BYTES: usize = 256 << 10;

/// One task's text from its `task.json`: `INPUT\nAnswer: ANSWER` per example, blank-line
/// separated, where the answer is the `target` (the first, when it is a list) or the choice
/// with the highest `target_scores`.
pub fn task_text(json: &[u8]) -> Result<String, String> {
    let v: serde_json::Value = serde_json::from_slice(json).map_err(|e| format!("not JSON: {e}"))?;
    let examples = v.get("examples").and_then(|e| e.as_array()).ok_or("no examples")?;
    let mut out = String::new();
    for ex in examples {
        let Some(input) = ex.get("input").and_then(|i| i.as_str()) else { continue };
        let answer = match (ex.get("target"), ex.get("target_scores")) {
            (Some(serde_json::Value::String(t)), _) => Some(t.as_str()),
            (Some(serde_json::Value::Array(ts)), _) => ts.first().and_then(|t| t.as_str()),
            (_, Some(serde_json::Value::Object(scores))) => scores
                .iter()
                .filter_map(|(k, s)| s.as_f64().map(|s| (k, s)))
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(k, _)| k.as_str()),
            _ => None,
        };
        let Some(answer) = answer else { continue };
        if out.len() + input.len() + answer.len() > MAX_TASK_BYTES {
            break;
        }
        out.push_str(input.trim());
        out.push_str("\nAnswer: ");
        out.push_str(answer.trim());
        out.push_str("\n\n");
    }
    if out.is_empty() {
        return Err("no example has an input and an answer".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_come_from_targets_or_the_best_score() {
        let json = br#"{"examples": [
            {"input": "Is fire hot?", "target_scores": {"Yes": 1, "No": 0}},
            {"input": "2+2?", "target": ["4", "four"]},
            {"input": "Name?", "target": "Ada"},
            {"input": "no answer here"}
        ]}"#;
        let t = task_text(json).unwrap();
        assert_eq!(t, "Is fire hot?\nAnswer: Yes\n\n2+2?\nAnswer: 4\n\nName?\nAnswer: Ada\n\n");
    }

    #[test]
    fn a_task_without_usable_examples_is_refused() {
        assert!(task_text(b"{}").unwrap_err().contains("no examples"));
        assert!(task_text(br#"{"examples": [{"input": "x"}]}"#).unwrap_err().contains("no example has"));
        assert!(task_text(b"[").unwrap_err().contains("not JSON"));
    }

    #[test]
    fn one_task_is_capped() {
        let ex: Vec<String> =
            (0..10_000).map(|i| format!(r#"{{"input": "question {i} {}", "target": "a"}}"#, "x".repeat(100))).collect();
        let json = format!(r#"{{"examples": [{}]}}"#, ex.join(","));
        let t = task_text(json.as_bytes()).unwrap();
        assert!(t.len() <= MAX_TASK_BYTES && t.len() > MAX_TASK_BYTES - 200, "{}", t.len());
    }
}
