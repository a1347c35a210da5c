//! A request trace replayed through a model of the server's scheduler, in steps, to see what
//! the pre-gate's routes let a MoE server do: which experts each step needs under a batching
//! policy (decode-first, prefill-first, or Read-ME's expert-aware batching), and how often an
//! expert cache of a given capacity holds them ([`replay`]).
//!
//! Each request is its tokens' routes: a prompt, then a completion (in a replay, the text that
//! followed the prompt, as if generated). A step runs up to `batch` sequences and `budget`
//! tokens: one token for a decoding sequence, a chunk of up to `chunk` prompt tokens for a
//! prefilling one. Routes become known as a server would learn them: a prompt's when it
//! arrives (the router runs over it), a completion token's once it is sampled, at the end of
//! the step before it runs.

use crate::cache::ExpertCache;
use crate::{Error, Result};
use recompose_llm::batching::Candidate;
use std::collections::VecDeque;

/// One request: its arrival step and its tokens' experts.
#[derive(Debug, Clone)]
pub struct Request {
    pub arrival: usize,
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
}

impl Request {
    /// Prompt and completion tokens.
    fn len(&self) -> usize {
        self.prompt.len() + self.completion.len()
    }

    /// The expert of token `i`, counting the prompt then the completion.
    fn route(&self, i: usize) -> u32 {
        *self.prompt.get(i).unwrap_or_else(|| &self.completion[i - self.prompt.len()])
    }
}

pub use recompose_llm::batching::Batching;

/// The scheduler's limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per step (decode tokens plus prompt chunks).
    pub budget: usize,
    /// Prompt tokens one sequence runs per step.
    pub chunk: usize,
    /// Sequences admitted at once (each holds a KV cache); the rest wait in the queue.
    pub pool: usize,
    /// Steps a ready sequence may be passed over before expert-aware batching must take it.
    pub max_wait: usize,
}

impl Limits {
    pub fn validate(&self) -> Result<()> {
        let Limits { batch, budget, chunk, pool, .. } = *self;
        if batch == 0 || budget == 0 || chunk == 0 || pool == 0 {
            return Err(Error::Config(format!(
                "scheduler limits must be positive: batch {batch}, budget {budget}, chunk {chunk}, pool {pool}"
            )));
        }
        Ok(())
    }
}

/// An expert a step needs, and the first step at which a server knows it will (the earliest
/// of the step's tokens routed to it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub expert: u32,
    pub known_from: usize,
}

/// A replayed schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub experts: usize,
    /// Per step that ran anything, the experts it needs in expert order (a stretch with
    /// nothing to run is skipped: it would need nothing and learn nothing).
    pub steps: Vec<Vec<Need>>,
    /// Per request, steps from arrival to its last token.
    pub latency: Vec<usize>,
    /// Per request, steps from arrival to the end of its prompt (its first token sampled).
    pub first_token: Vec<usize>,
}

impl Schedule {
    /// The mean number of distinct experts a step needs.
    pub fn unique_experts(&self) -> f64 {
        self.steps.iter().map(Vec::len).sum::<usize>() as f64 / self.steps.len().max(1) as f64
    }
}

struct Live {
    req: usize,
    /// Tokens run so far, prompt then completion.
    done: usize,
    /// Steps passed over while ready.
    waited: usize,
    /// The step from which the next token's expert is known: the prompt's from its arrival,
    /// a completion token's from the step after the one that sampled it.
    known_from: usize,
}

/// Replays `requests` (any order; they are taken by arrival) through the scheduler model.
pub fn schedule(requests: &[Request], experts: usize, limits: &Limits, batching: Batching) -> Result<Schedule> {
    limits.validate()?;
    for (i, r) in requests.iter().enumerate() {
        if r.prompt.is_empty() {
            return Err(Error::Data(format!("request {i} has an empty prompt")));
        }
        if let Some(&e) = r.prompt.iter().chain(&r.completion).find(|&&e| e as usize >= experts) {
            return Err(Error::Data(format!("request {i} routes to expert {e} of {experts}")));
        }
    }
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by_key(|&i| (requests[i].arrival, i));
    let mut arriving: VecDeque<usize> = order.into();
    // Queued requests with the step their prompt's routes became known.
    let mut queue: VecDeque<(usize, usize)> = VecDeque::new();
    let mut pool: Vec<Live> = Vec::new();
    let (mut latency, mut first_token) = (vec![0; requests.len()], vec![0; requests.len()]);
    let mut steps: Vec<Vec<Need>> = Vec::new();
    // `clock` counts steps for arrivals and latencies, idle ones included; `t` indexes the
    // steps that ran, which is the clock routes are known by.
    let mut clock = 0usize;
    while !(arriving.is_empty() && queue.is_empty() && pool.is_empty()) {
        if queue.is_empty() && pool.is_empty() {
            clock = clock.max(arriving.front().map_or(0, |&i| requests[i].arrival));
        }
        let t = steps.len();
        while let Some(i) = arriving.front().copied().filter(|&i| requests[i].arrival <= clock) {
            arriving.pop_front();
            queue.push_back((i, t));
        }
        while pool.len() < limits.pool {
            let Some((req, known_from)) = queue.pop_front() else { break };
            pool.push(Live { req, done: 0, waited: 0, known_from });
        }
        // Who runs: an order over the pool, then filled up to the step's limits.
        let decoding = |l: &Live| l.done >= requests[l.req].prompt.len();
        let candidates: Vec<Candidate> = pool
            .iter()
            .map(|l| Candidate { decoding: decoding(l), waited: l.waited, expert: requests[l.req].route(l.done) })
            .collect();
        let rank = recompose_llm::batching::rank(&candidates, batching, limits.max_wait);
        let mut step: Vec<Need> = Vec::new();
        let mut need = |expert: u32, known_from: usize| match step.iter_mut().find(|n| n.expert == expert) {
            Some(n) => n.known_from = n.known_from.min(known_from),
            None => step.push(Need { expert, known_from }),
        };
        let (mut seqs, mut tokens) = (0, 0);
        let mut ran = vec![false; pool.len()];
        for &i in &rank {
            if seqs == limits.batch || tokens == limits.budget {
                break;
            }
            let l = &mut pool[i];
            let r = &requests[l.req];
            let n = if l.done < r.prompt.len() {
                let n = (r.prompt.len() - l.done).min(limits.chunk).min(limits.budget - tokens);
                for &e in &r.prompt[l.done..l.done + n] {
                    need(e, l.known_from);
                }
                n
            } else {
                need(r.route(l.done), l.known_from);
                1
            };
            l.done += n;
            l.waited = 0;
            if l.done >= r.prompt.len() {
                l.known_from = t + 1;
            }
            if l.done == r.prompt.len() {
                first_token[l.req] = clock + 1 - r.arrival;
            }
            ran[i] = true;
            seqs += 1;
            tokens += n;
        }
        for (l, &r) in pool.iter_mut().zip(&ran) {
            l.waited += usize::from(!r);
        }
        step.sort_by_key(|n| n.expert);
        steps.push(step);
        clock += 1;
        pool.retain(|l| {
            let finished = l.done == requests[l.req].len();
            if finished {
                latency[l.req] = clock - requests[l.req].arrival;
            }
            !finished
        });
    }
    Ok(Schedule { experts, steps, latency, first_token })
}

/// Hits and loads of one cache over a schedule.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CacheRun {
    pub policy: String,
    pub capacity: usize,
    pub hits: u64,
    pub loads: u64,
    pub hit_rate: f64,
}

/// Runs `cache` over every need of `schedule` in order. A look-ahead policy sees, for every
/// expert, its next need within `horizon` steps that a server would know of at the time: the
/// rest of the current step, and later steps' needs whose routes were already known.
pub fn replay(schedule: &Schedule, mut cache: ExpertCache, horizon: usize) -> CacheRun {
    for (t, step) in schedule.steps.iter().enumerate() {
        for (i, n) in step.iter().enumerate() {
            cache.use_expert(n.expert, || next_uses(schedule, t, i, horizon));
        }
    }
    CacheRun {
        policy: cache.policy().to_string(),
        capacity: cache.capacity(),
        hits: cache.hits,
        loads: cache.loads,
        hit_rate: cache.hit_rate(),
    }
}

/// Per expert, the position (step * experts + index) of its next known need after need `i` of
/// step `t`, looking `horizon` steps past `t`.
fn next_uses(s: &Schedule, t: usize, i: usize, horizon: usize) -> Vec<Option<u64>> {
    let mut next = vec![None; s.experts];
    let end = s.steps.len().min(t.saturating_add(1).saturating_add(horizon));
    for (u, step) in s.steps.iter().enumerate().take(end).skip(t) {
        for (j, n) in step.iter().enumerate() {
            let ahead = u > t || j > i;
            let slot = &mut next[n.expert as usize];
            if ahead && n.known_from <= t && slot.is_none() {
                *slot = Some((u * s.experts + j) as u64);
            }
        }
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::policy;

    fn limits(batch: usize) -> Limits {
        Limits { batch, budget: 64, chunk: 4, pool: 8, max_wait: 3 }
    }

    fn req(arrival: usize, prompt: &[u32], completion: &[u32]) -> Request {
        Request { arrival, prompt: prompt.to_vec(), completion: completion.to_vec() }
    }

    #[test]
    fn one_request_runs_its_prompt_in_chunks_then_decodes() {
        let s = schedule(&[req(2, &[0, 0, 1, 1, 2, 2], &[3, 3, 0])], 4, &limits(4), Batching::DecodeFirst).unwrap();
        // Idle until step 2 (not recorded), 2 chunks of 4 and 2, then 3 decode steps.
        let experts: Vec<Vec<u32>> = s.steps.iter().map(|st| st.iter().map(|n| n.expert).collect()).collect();
        assert_eq!(experts, vec![vec![0, 1], vec![2], vec![3], vec![3], vec![0]]);
        assert_eq!((s.first_token[0], s.latency[0]), (2, 5));
        // Prompt routes are known on arrival; a decode token's once the step before it ends.
        assert_eq!(s.steps[1][0].known_from, 0);
        assert_eq!(s.steps[3][0].known_from, 3);
    }

    #[test]
    fn expert_aware_batching_groups_sequences_by_expert() {
        // Six decoding sequences (one-token prompts), two at a time: expert-aware batching
        // runs same-expert pairs; decode-first takes them in arrival order.
        let reqs: Vec<Request> = [0u32, 1, 2, 0, 1, 2].iter().map(|&e| req(0, &[e], &[e, e, e, e])).collect();
        let unique = |b| schedule(&reqs, 3, &limits(2), b).unwrap().unique_experts();
        assert!(
            unique(Batching::ExpertAware) < unique(Batching::DecodeFirst),
            "{} {}",
            unique(Batching::ExpertAware),
            unique(Batching::DecodeFirst)
        );
        assert_eq!(unique(Batching::ExpertAware), 1.0);
    }

    #[test]
    fn expert_aware_batching_does_not_starve_a_lone_expert() {
        let mut reqs: Vec<Request> = (0..6).map(|_| req(0, &[0], &[0; 30])).collect();
        reqs.push(req(0, &[1], &[1; 3]));
        let s = schedule(&reqs, 2, &limits(2), Batching::ExpertAware).unwrap();
        // The wait bound lets it through long before the long queue of expert 0 is done...
        let first_done = |s: &Schedule| *s.latency[..6].iter().min().unwrap();
        assert!(s.latency[6] < first_done(&s) / 2, "{} {}", s.latency[6], first_done(&s));
        // ...which without it would come first.
        let s = schedule(&reqs, 2, &Limits { max_wait: usize::MAX, ..limits(2) }, Batching::ExpertAware).unwrap();
        assert!(s.latency[6] > first_done(&s), "{} {}", s.latency[6], first_done(&s));
    }

    #[test]
    fn belady_looks_only_at_what_is_known() {
        let s = Schedule {
            experts: 3,
            steps: vec![
                vec![Need { expert: 0, known_from: 0 }],
                vec![Need { expert: 1, known_from: 0 }],
                vec![Need { expert: 2, known_from: 0 }],
                vec![Need { expert: 0, known_from: 3 }, Need { expert: 1, known_from: 0 }],
            ],
            latency: vec![],
            first_token: vec![],
        };
        // At step 2 expert 1's use at step 3 is known, expert 0's is not yet.
        assert_eq!(next_uses(&s, 2, 0, 8), vec![None, Some(10), None]);
        assert_eq!(next_uses(&s, 2, 0, 0), vec![None, None, None]);
        // A horizon past the end of time is the whole trace, not an overflow.
        assert_eq!(next_uses(&s, 2, 0, usize::MAX), vec![None, Some(10), None]);
        // So a 2-slot Belady cache evicts 0 at step 2 and loads it back at step 3.
        let run = replay(&s, ExpertCache::new(2, policy("belady", 0).unwrap()).unwrap(), 8);
        assert_eq!((run.hits, run.loads), (1, 4));
    }

    #[test]
    fn bad_requests_and_limits_are_refused() {
        let e = schedule(&[req(0, &[], &[1])], 2, &limits(2), Batching::DecodeFirst).err().unwrap().to_string();
        assert!(e.contains("empty prompt"), "{e}");
        let e = schedule(&[req(0, &[5], &[])], 2, &limits(2), Batching::DecodeFirst).err().unwrap().to_string();
        assert!(e.contains("expert 5 of 2"), "{e}");
        let e = schedule(&[], 2, &Limits { batch: 0, ..limits(2) }, Batching::DecodeFirst).err().unwrap().to_string();
        assert!(e.contains("batch 0"), "{e}");
    }
}
