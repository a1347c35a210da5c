//! `--kv SPEC`: the policy grammar, its validation, and building a cache from it.
//!
//! ```text
//! full
//! window:N[,sinks=S][,pos=cache|original][,prefill=full|C]    N slots in all, S of them sinks
//! window:recent=R[,sinks=S]...
//! h2o:N[,recent=R][,agg=mean|sum|max][,prefill=full|C]         N slots, R recent (default N/2)
//! h2o:heavy=H,recent=R...
//! ```
//! N, R and H may be fractions of the prompt (`h2o:0.2` = 10% heavy + 10% recent, the paper's
//! "20%"); a fractional total needs a fractional `recent=` if one is given. `prefill=full` (the
//! default) attends fully inside the prompt and cuts the cache once it is in; `prefill=C` evicts
//! after every step of at most C prompt tokens, so prefill memory stays bounded too.
//! Counts are at most the longest context recompose accepts (2^26); a cache is built with them
//! cut to its model's context.

use crate::bounded::{BoundedCache, Rule};
use recompose_llm::kv::{CacheLayout, FullCache, KvCache};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid KV spec `{spec}`: {why}")]
pub struct SpecError {
    pub spec: String,
    pub why: String,
}

/// A slot count, or a fraction of each row's prompt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    Count(usize),
    Fraction(f64),
}

impl Budget {
    fn resolve(self, prompt: usize) -> usize {
        match self {
            Budget::Count(n) => n,
            Budget::Fraction(f) => (f * prompt as f64).round() as usize,
        }
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Budget::Count(n) => write!(f, "{n}"),
            // A whole fraction keeps its point: `1.0` is the whole prompt, `1` one slot.
            Budget::Fraction(x) if x.fract() == 0.0 => write!(f, "{x:.1}"),
            Budget::Fraction(x) => write!(f, "{x}"),
        }
    }
}

/// Where the window policy's keys sit for RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Positions {
    /// By index inside the cache, as the StreamingLLM paper does (the default for `window`).
    #[default]
    Cache,
    /// At the positions the tokens had in the text (what H2O does).
    Original,
}

/// How the query heads of a GQA group combine into their KV head's score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Aggregate {
    /// The default, as NVIDIA kvpress. Ranks exactly as `Sum` (a constant factor per head).
    #[default]
    Mean,
    Sum,
    Max,
}

/// When a bounded policy evicts while the prompt goes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prefill {
    /// Full attention inside the prompt, cut to the budget once it is in (the papers' setting).
    #[default]
    Full,
    /// Steps of at most this many prompt tokens, evicting after each: memory bounded throughout.
    Bounded(usize),
}

#[derive(Debug, Clone, PartialEq, Default)]
pub enum KvSpec {
    #[default]
    Full,
    Window {
        total: Budget,
        sinks: usize,
        positions: Positions,
        prefill: Prefill,
    },
    H2o {
        heavy: Budget,
        recent: Budget,
        agg: Aggregate,
        prefill: Prefill,
    },
}

/// One row's resolved budget: `protected` entries (sinks; none for h2o) and `recent` ones are
/// never evicted; `keep` is the row's total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowBudget {
    pub keep: usize,
    pub recent: usize,
}

/// No count can be more than the longest context recompose accepts: a larger one means nothing,
/// and refusing it keeps the budget arithmetic (recent + sinks, heavy + recent) from overflowing.
const MAX_COUNT: usize = recompose_core::config::MAX_CONTEXT;

fn parse_budget(v: &str) -> Option<Budget> {
    if let Ok(n) = v.parse::<usize>() {
        return Some(Budget::Count(n));
    }
    match v.parse::<f64>() {
        Ok(f) if f.is_finite() => Some(Budget::Fraction(f)),
        _ => None,
    }
}

impl FromStr for KvSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        let err = |why: String| SpecError { spec: s.to_string(), why };
        let (name, rest) = s.split_once(':').unwrap_or((s, ""));
        let mut positional = None;
        let mut keys: Vec<(&str, &str)> = vec![];
        for (i, part) in rest.split(',').filter(|p| !p.is_empty()).enumerate() {
            match part.split_once('=') {
                Some((k, v)) => {
                    if keys.iter().any(|(kk, _)| *kk == k) {
                        return Err(err(format!("`{k}` given twice")));
                    }
                    keys.push((k, v))
                }
                None if i == 0 => positional = Some(part),
                None => return Err(err(format!("`{part}` needs a key (like recent={part})"))),
            }
        }
        let allowed: &[&str] = match name {
            "full" => &[],
            "window" => &["recent", "sinks", "pos", "prefill"],
            "h2o" => &["heavy", "recent", "agg", "prefill"],
            _ => return Err(err(format!("unknown policy `{name}` (full, window, h2o)"))),
        };
        if let Some((k, _)) = keys.iter().find(|(k, _)| !allowed.contains(k)) {
            return Err(err(format!("unknown option `{k}` for {name} (options: {})", allowed.join(", "))));
        }
        let get = |k: &str| keys.iter().find(|(kk, _)| *kk == k).map(|(_, v)| *v);
        let too_many = |k: &str, n: usize| err(format!("{k} {n} is more than any context ({MAX_COUNT} tokens)"));
        let budget = |k: &str, v: &str| -> Result<Budget, SpecError> {
            match parse_budget(v) {
                Some(Budget::Count(0)) => Err(err(format!("{k} must be at least 1"))),
                Some(Budget::Count(n)) if n > MAX_COUNT => Err(too_many(k, n)),
                Some(Budget::Fraction(f)) if !(f > 0.0 && f <= 1.0) => {
                    Err(err(format!("{k} fraction {f} must be in (0, 1]")))
                }
                Some(b) => Ok(b),
                None => Err(err(format!("{k} `{v}` is not a count or a fraction"))),
            }
        };
        let count = |k: &str, v: &str| match v.parse::<usize>() {
            Ok(n) if n > MAX_COUNT => Err(too_many(k, n)),
            Ok(n) => Ok(n),
            Err(_) => Err(err(format!("{k} `{v}` is not a count"))),
        };
        let prefill = match get("prefill") {
            None | Some("full") => Prefill::Full,
            Some(v) => match count("prefill", v)? {
                0 => return Err(err("prefill chunk must be at least 1".into())),
                c => Prefill::Bounded(c),
            },
        };
        let total = positional.map(|v| budget("budget", v)).transpose()?;
        match name {
            "full" => {
                if positional.is_some() {
                    return Err(err("full takes no budget".into()));
                }
                Ok(KvSpec::Full)
            }
            "window" => {
                let sinks = get("sinks").map(|v| count("sinks", v)).transpose()?.unwrap_or(0);
                let recent = get("recent").map(|v| budget("recent", v)).transpose()?;
                let total = match (total, recent) {
                    (Some(_), Some(_)) => return Err(err("give the total or recent=, not both".into())),
                    (Some(t), None) => t,
                    (None, Some(Budget::Count(r))) => Budget::Count(r + sinks),
                    (None, Some(Budget::Fraction(_))) => {
                        return Err(err("recent= must be a count; use window:FRACTION for a fraction".into()))
                    }
                    (None, None) => return Err(err("a budget is needed (like window:256)".into())),
                };
                if let Budget::Count(t) = total {
                    if sinks >= t {
                        return Err(err(format!("{sinks} sinks leave no room for recent tokens in {t} slots")));
                    }
                }
                let positions = match get("pos") {
                    None | Some("cache") => Positions::Cache,
                    Some("original") => Positions::Original,
                    Some(v) => return Err(err(format!("pos `{v}` is not cache or original"))),
                };
                Ok(KvSpec::Window { total, sinks, positions, prefill })
            }
            _ => {
                let agg = match get("agg") {
                    None | Some("mean") => Aggregate::Mean,
                    Some("sum") => Aggregate::Sum,
                    Some("max") => Aggregate::Max,
                    Some(v) => return Err(err(format!("agg `{v}` is not mean, sum or max"))),
                };
                let recent = get("recent").map(|v| budget("recent", v)).transpose()?;
                let heavy = get("heavy")
                    .map(|v| match parse_budget(v) {
                        Some(Budget::Fraction(f)) if !(0.0..=1.0).contains(&f) => {
                            Err(err(format!("heavy fraction {f} must be in [0, 1]")))
                        }
                        Some(Budget::Count(n)) if n > MAX_COUNT => Err(too_many("heavy", n)),
                        Some(b) => Ok(b),
                        None => Err(err(format!("heavy `{v}` is not a count or a fraction"))),
                    })
                    .transpose()?;
                let (heavy, recent) = match (total, heavy, recent) {
                    (Some(_), Some(_), _) => return Err(err("give the total or heavy=, not both".into())),
                    (Some(Budget::Count(t)), None, r) => {
                        let r = match r {
                            None => t.div_ceil(2),
                            Some(Budget::Count(r)) if r > t => {
                                return Err(err(format!("recent {r} is larger than the total {t}")))
                            }
                            Some(Budget::Count(r)) => r,
                            Some(Budget::Fraction(_)) => {
                                return Err(err("recent= must be a count when the total is".into()))
                            }
                        };
                        (Budget::Count(t - r), Budget::Count(r))
                    }
                    (Some(Budget::Fraction(t)), None, r) => {
                        let r = match r {
                            None => t / 2.0,
                            Some(Budget::Fraction(r)) if r > t => {
                                return Err(err(format!("recent {r} is larger than the total {t}")))
                            }
                            Some(Budget::Fraction(r)) => r,
                            Some(Budget::Count(_)) => {
                                return Err(err("recent= must be a fraction when the total is".into()))
                            }
                        };
                        (Budget::Fraction(t - r), Budget::Fraction(r))
                    }
                    (None, Some(h), Some(r)) => (h, r),
                    (None, _, _) => return Err(err("a budget is needed (like h2o:256 or h2o:0.2)".into())),
                };
                Ok(KvSpec::H2o { heavy, recent, agg, prefill })
            }
        }
    }
}

impl fmt::Display for KvSpec {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let prefill = |p: &Prefill| match p {
            Prefill::Full => String::new(),
            Prefill::Bounded(c) => format!(",prefill={c}"),
        };
        match self {
            KvSpec::Full => write!(f, "full"),
            KvSpec::Window { total, sinks, positions, prefill: p } => {
                write!(f, "window:{total}")?;
                if *sinks > 0 {
                    write!(f, ",sinks={sinks}")?;
                }
                if *positions == Positions::Original {
                    write!(f, ",pos=original")?;
                }
                write!(f, "{}", prefill(p))
            }
            KvSpec::H2o { heavy, recent, agg, prefill: p } => {
                write!(f, "h2o:heavy={heavy},recent={recent}")?;
                match agg {
                    Aggregate::Mean => {}
                    Aggregate::Sum => write!(f, ",agg=sum")?,
                    Aggregate::Max => write!(f, ",agg=max")?,
                }
                write!(f, "{}", prefill(p))
            }
        }
    }
}

impl KvSpec {
    pub fn is_full(&self) -> bool {
        *self == KvSpec::Full
    }

    /// Each row's budget for prompts of these lengths (None for `full`).
    pub fn row_budgets(&self, prompt_lens: &[usize]) -> Option<Vec<RowBudget>> {
        match *self {
            KvSpec::Full => None,
            KvSpec::Window { total, sinks, .. } => Some(
                prompt_lens
                    .iter()
                    .map(|&n| {
                        let keep = total.resolve(n).max(sinks + 1);
                        RowBudget { keep, recent: keep - sinks }
                    })
                    .collect(),
            ),
            KvSpec::H2o { heavy, recent, .. } => Some(
                prompt_lens
                    .iter()
                    .map(|&n| {
                        let recent = recent.resolve(n).max(1);
                        RowBudget { keep: recent + heavy.resolve(n), recent }
                    })
                    .collect(),
            ),
        }
    }

    pub(crate) fn rule(&self) -> Option<Rule> {
        match *self {
            KvSpec::Full => None,
            KvSpec::Window { sinks, positions, .. } => {
                Some(Rule::Window { sinks, reposition: positions == Positions::Cache })
            }
            KvSpec::H2o { agg, .. } => Some(Rule::H2o { agg }),
        }
    }

    /// The same policy for a model that holds at most `max_len` tokens per row. A count past that
    /// is never reached (nothing would be evicted either way), so it is cut to it: the cache
    /// reserves slots for its budget, and a request's number must not size that, the model must.
    fn within(&self, max_len: usize) -> KvSpec {
        let cut = |b: Budget| match b {
            Budget::Count(n) => Budget::Count(n.min(max_len)),
            f => f,
        };
        match *self {
            KvSpec::Full => KvSpec::Full,
            KvSpec::Window { total, sinks, positions, prefill } => {
                KvSpec::Window { total: cut(total), sinks: sinks.min(max_len.saturating_sub(1)), positions, prefill }
            }
            KvSpec::H2o { heavy, recent, agg, prefill } => {
                KvSpec::H2o { heavy: cut(heavy), recent: cut(recent), agg, prefill }
            }
        }
    }

    pub fn prefill(&self) -> Prefill {
        match *self {
            KvSpec::Full => Prefill::Full,
            KvSpec::Window { prefill, .. } | KvSpec::H2o { prefill, .. } => prefill,
        }
    }

    /// A cache for a batch whose rows have these prompt lengths (fractional budgets resolve
    /// against them; streaming callers pass the length of the whole text).
    pub fn build(&self, layout: &CacheLayout, prompt_lens: &[usize]) -> Box<dyn KvCache> {
        match BoundedCache::from_spec(layout, &self.within(layout.max_len), prompt_lens) {
            Some(c) => Box::new(c),
            None => Box::new(FullCache::new(layout.num_layers, prompt_lens.len(), layout.max_len).on(&layout.device)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};
    use recompose_core::config::{RopeScaling, RopeStyle};
    use recompose_llm::kv::Step;

    fn parse(s: &str) -> Result<KvSpec, String> {
        s.parse::<KvSpec>().map_err(|e| e.to_string())
    }

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!(parse("full").unwrap(), KvSpec::Full);
        let w = parse("window:256,sinks=4").unwrap();
        assert_eq!(w.row_budgets(&[1000]).unwrap(), vec![RowBudget { keep: 256, recent: 252 }]);
        assert_eq!(parse("window:recent=252,sinks=4").unwrap(), w);
        let h = parse("h2o:heavy=64,recent=64").unwrap();
        assert_eq!(h, parse("h2o:128").unwrap());
        assert_eq!(h.row_budgets(&[10]).unwrap(), vec![RowBudget { keep: 128, recent: 64 }]);
        // The paper's 20%: 10% heavy + 10% recent of each row's prompt.
        let f = parse("h2o:0.2").unwrap();
        assert_eq!(
            f.row_budgets(&[1000, 500]).unwrap(),
            vec![RowBudget { keep: 200, recent: 100 }, RowBudget { keep: 100, recent: 50 }]
        );
        assert_eq!(parse("h2o:256,recent=200").unwrap().row_budgets(&[1]).unwrap()[0].keep, 256);
        assert!(matches!(
            parse("h2o:64,agg=max,prefill=32").unwrap(),
            KvSpec::H2o { agg: Aggregate::Max, prefill: Prefill::Bounded(32), .. }
        ));
        assert!(matches!(
            parse("window:64,pos=original").unwrap(),
            KvSpec::Window { positions: Positions::Original, .. }
        ));
    }

    #[test]
    fn display_round_trips() {
        for s in ["full", "window:256,sinks=4", "window:0.2,pos=original,prefill=16", "h2o:0.2", "h2o:100,agg=max"] {
            let spec = parse(s).unwrap();
            assert_eq!(parse(&spec.to_string()).unwrap(), spec, "{s} -> {spec}");
        }
    }

    #[test]
    fn rejects_bad_specs_with_a_reason() {
        for (s, why) in [
            ("lru:64", "unknown policy `lru`"),
            ("h2o:0", "at least 1"),
            ("window:0", "at least 1"),
            ("h2o:64,recent=100", "recent 100 is larger than the total 64"),
            ("h2o:1.5", "must be in (0, 1]"),
            ("h2o", "a budget is needed"),
            ("window:4,sinks=4", "no room"),
            ("h2o:64,pos=cache", "unknown option `pos`"),
            ("h2o:64,agg=median", "agg `median`"),
            ("window:64,prefill=0", "at least 1"),
            ("h2o:64,64", "needs a key"),
            ("full:64", "no budget"),
            ("h2o:abc", "not a count or a fraction"),
            ("h2o:64,recent=1,recent=2", "given twice"),
        ] {
            let e = parse(s).unwrap_err();
            assert!(e.contains(why), "{s}: {e}");
            assert!(!e.contains('\n'));
        }
    }

    /// Found by recompose-fuzz: counts were unbounded, so `window:recent=N,sinks=1` and the
    /// budgets of `h2o:heavy=N,recent=1` overflowed for N near 2^64.
    #[test]
    fn counts_past_any_context_are_refused() {
        for s in [
            "window:recent=18446744073709551615,sinks=1",
            "h2o:heavy=18446744073709551615,recent=1",
            "window:67108865",
            "h2o:64,prefill=67108865",
        ] {
            let e = parse(s).unwrap_err();
            assert!(e.contains("is more than any context"), "{s}: {e}");
        }
        assert!(parse("window:67108864,sinks=67108863").is_ok());
    }

    /// Found by recompose-fuzz: `recent=1.0` (the whole prompt) displayed as `recent=1` (one slot).
    #[test]
    fn a_whole_fraction_displays_as_a_fraction() {
        for s in ["h2o:heavy=6,recent=1.0", "h2o:heavy=0.0,recent=0.1", "window:1.0"] {
            let spec = parse(s).unwrap();
            assert_eq!(parse(&spec.to_string()).unwrap(), spec, "{s} -> {spec}");
        }
        assert_eq!(parse("window:1.0").unwrap().to_string(), "window:1.0");
    }

    /// Found by recompose-fuzz: `h2o:42296256` reserved slots for 42M tokens at the first step,
    /// whatever the model's context (2.7 GB here; a request's "kv" field could abort the server).
    #[test]
    fn a_budget_past_the_context_reserves_only_the_context() {
        let rope = std::sync::Arc::new(recompose_llm::rope::Rope::new(8, 1e4, &RopeScaling::None, RopeStyle::Neox));
        let layout = CacheLayout {
            num_layers: 1,
            num_heads: 2,
            kv_heads: 2,
            head_dim: 8,
            max_len: 64,
            windows: vec![None],
            ropes: vec![rope],
            device: Device::Cpu,
        };
        let k = Tensor::ones((1, 2, 3, 8), DType::F32, &Device::Cpu).unwrap();
        for s in ["h2o:42296256", "h2o:heavy=1,recent=42296256", "window:42296256,sinks=42296255"] {
            let mut cache = parse(s).unwrap().build(&layout, &[3]);
            cache.begin_step(&Step { start: vec![0], lens: vec![3], t: 3 }).unwrap();
            cache.update(0, &k, &k, None).unwrap();
            // Two budgets of the whole context at most: 2 x (K + V) x 2 heads x 64 x 8 x 4 bytes.
            assert!(cache.resident_bytes() <= 32 << 10, "{s}: {} bytes", cache.resident_bytes());
        }
    }
}
