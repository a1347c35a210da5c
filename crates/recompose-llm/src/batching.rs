//! Which of the sequences ready to run a step takes, when a step takes at most so many: the
//! one ranking both the server's [`crate::generate::Batcher`] and recompose-moe's trace model
//! of it use.
//!
//! Decode-first and prefill-first order by phase; expert-aware batching is Read-ME's Algorithm
//! 1: with every token's expert known before the backbone runs (the pre-gate), sequences are
//! grouped by the expert of their next token and the expert with the longest queue goes first,
//! so a step needs fewer distinct experts; a sequence passed over `max_wait` steps goes before
//! any group, which bounds how long grouping can starve it.

use std::cmp::Reverse;

/// How a step chooses among the sequences ready to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Batching {
    /// Decoding sequences first (longest waiting first), then prompt chunks (oldest first).
    #[default]
    DecodeFirst,
    /// Prompt chunks first (oldest first), then decoding sequences (longest waiting first).
    PrefillFirst,
    /// Read-ME's Algorithm 1 on top of decode-first: sequences passed over for `max_wait`
    /// steps first, then decoding sequences grouped by the expert of their next token, the
    /// expert with the longest queue first, then prompt chunks grouped the same way.
    ExpertAware,
}

impl Batching {
    pub const ALL: [Batching; 3] = [Batching::DecodeFirst, Batching::PrefillFirst, Batching::ExpertAware];

    pub fn name(self) -> &'static str {
        match self {
            Batching::DecodeFirst => "decode-first",
            Batching::PrefillFirst => "prefill-first",
            Batching::ExpertAware => "expert",
        }
    }
}

impl std::str::FromStr for Batching {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Batching::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| format!("batching `{s}`: expected expert, decode-first or prefill-first"))
    }
}

/// What the ranking knows of a ready sequence.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    /// Past its prompt.
    pub decoding: bool,
    /// Steps it was ready and passed over.
    pub waited: usize,
    /// The expert of its next token (expert-aware batching needs it).
    pub expert: u32,
}

/// The order in which a step takes `c` (indices into it, oldest sequence first); the step
/// then fills up to its limits in this order.
pub fn rank(c: &[Candidate], batching: Batching, max_wait: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..c.len()).collect();
    // Decoding sequences by how long they waited; prompts in arrival order, which finishes the
    // oldest prompt first (round-robin chunks would delay every first token).
    let wait = |x: &Candidate| Reverse(if x.decoding { x.waited } else { 0 });
    match batching {
        Batching::DecodeFirst => order.sort_by_key(|&i| (!c[i].decoding, wait(&c[i]))),
        Batching::PrefillFirst => order.sort_by_key(|&i| (c[i].decoding, wait(&c[i]))),
        Batching::ExpertAware => {
            // Per expert, its queue and its longest wait (which breaks ties, so that equal
            // queues take turns).
            let experts = c.iter().map(|x| x.expert as usize + 1).max().unwrap_or(0);
            let (mut queue, mut oldest) = (vec![0usize; experts], vec![0usize; experts]);
            for x in c {
                queue[x.expert as usize] += 1;
                oldest[x.expert as usize] = oldest[x.expert as usize].max(x.waited);
            }
            order.sort_by_key(|&i| {
                let x = &c[i];
                let starved = x.waited >= max_wait;
                let e = x.expert as usize;
                // The starved by how long they waited; the rest by their expert's queue.
                let wait = Reverse(if starved { x.waited } else { 0 });
                (!starved, wait, !x.decoding, (Reverse(queue[e]), Reverse(oldest[e]), e, Reverse(x.waited)))
            });
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(decoding: bool, waited: usize, expert: u32) -> Candidate {
        Candidate { decoding, waited, expert }
    }

    #[test]
    fn expert_aware_takes_the_longest_queue_first_and_the_starved_before_it() {
        let cs = [c(true, 0, 1), c(true, 1, 0), c(true, 0, 1), c(false, 0, 1), c(true, 0, 2)];
        // Expert 1 has three waiting (two decoding), so its decoding sequences lead.
        assert_eq!(rank(&cs, Batching::ExpertAware, 8)[..2], [0, 2]);
        // Sequence 1 waited past the bound: it goes first, whatever its expert's queue.
        assert_eq!(rank(&cs, Batching::ExpertAware, 1)[0], 1);
        assert_eq!(rank(&cs, Batching::DecodeFirst, 8), [1, 0, 2, 4, 3]);
        assert_eq!(rank(&cs, Batching::PrefillFirst, 8)[0], 3);
        // Prompts go oldest first however long they waited.
        let prompts = [c(false, 0, 0), c(false, 3, 0), c(true, 0, 0)];
        assert_eq!(rank(&prompts, Batching::DecodeFirst, 8), [2, 0, 1]);
        assert_eq!(rank(&prompts, Batching::PrefillFirst, 8), [0, 1, 2]);
        assert_eq!("expert".parse::<Batching>(), Ok(Batching::ExpertAware));
        assert!("fifo".parse::<Batching>().unwrap_err().contains("decode-first"));
    }
}
