//! Mutations: byte-level ones for every input, little-endian word overwrites for binary formats,
//! line/token edits and nesting for text. Deterministic from a seed. Owns no notion of which
//! inputs are interesting (that is the runner's).

/// How a target's input is structured, which picks the mutations that make sense for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Length-prefixed binary fields (GGUF).
    Binary,
    /// Text (YAML, JSON, Jinja, KV specs).
    Text,
    /// Both: a binary frame around text (safetensors: a u64 length, then a JSON header).
    Mixed,
}

/// SplitMix64: tiny and fixed forever, so a seed replays the same run whatever `rand` does.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n`; 0 when `n` is 0.
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

/// Bytes at the edges of signed and unsigned ranges.
const BOUNDARY_BYTES: [u8; 6] = [0, 1, 0x7f, 0x80, 0xfe, 0xff];

/// Text that tends to break parsers: delimiters, escapes, odd Unicode, numbers at the edges.
const SPECIAL: &[&str] = &[
    "\n",
    "\r\n",
    "\t",
    " ",
    ":",
    ",",
    "=",
    "-",
    "\"",
    "'",
    "`",
    "\\",
    "{",
    "}",
    "[",
    "]",
    "(",
    ")",
    "#",
    "&",
    "*",
    "!",
    "|",
    "%",
    ">",
    "<",
    "\0",
    "\u{feff}",
    "\u{202e}",
    "é",
    "💥",
    "\u{10ffff}",
    "0",
    "-1",
    "-0",
    "1e309",
    "-1e309",
    "NaN",
    "inf",
    "0.0",
    "1.0",
    "0.5",
    "4294967296",
    "9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "null",
    "true",
    "false",
];

/// Brackets and quotes to wrap a range in; repeated, they nest.
const PAIRS: &[(&str, &str)] = &[
    ("[", "]"),
    ("{", "}"),
    ("(", ")"),
    ("\"", "\""),
    ("'", "'"),
    ("{{ ", " }}"),
    ("{% if true %}", "{% endif %}"),
    ("{% for x in messages %}", "{% endfor %}"),
];

type Op = fn(&mut Mutator, &mut Vec<u8>, &[Vec<u8>]);

const BYTE_OPS: &[Op] = &[
    Mutator::flip_bit,
    Mutator::boundary_byte,
    Mutator::random_byte,
    Mutator::insert_bytes,
    Mutator::delete_range,
    Mutator::duplicate_range,
    Mutator::splice,
];
const WORD_OPS: &[Op] = &[Mutator::boundary_word, Mutator::nudge_word];
const TEXT_OPS: &[Op] = &[Mutator::edit_lines, Mutator::edit_tokens, Mutator::insert_token, Mutator::nest];

pub struct Mutator {
    rng: Rng,
    ops: Vec<Op>,
    dict: &'static [&'static str],
    max_len: usize,
}

// Every mutation has the one `Op` signature, so those that only overwrite bytes take a Vec too.
#[allow(clippy::ptr_arg)]
impl Mutator {
    /// `dict` holds the target's own keywords, inserted alongside [`SPECIAL`].
    pub fn new(seed: u64, format: Format, dict: &'static [&'static str], max_len: usize) -> Self {
        let extra: &[&[Op]] = match format {
            Format::Binary => &[WORD_OPS],
            Format::Text => &[TEXT_OPS],
            Format::Mixed => &[WORD_OPS, TEXT_OPS],
        };
        let ops = extra.iter().fold(BYTE_OPS.to_vec(), |mut v, o| {
            v.extend_from_slice(o);
            v
        });
        Self { rng: Rng::new(seed), ops, dict, max_len }
    }

    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// Mutates `data` in place with 1 to 4 stacked mutations (stacks reach inputs no single
    /// step does); `corpus` feeds splicing.
    pub fn mutate(&mut self, data: &mut Vec<u8>, corpus: &[Vec<u8>]) {
        for _ in 0..1 + self.rng.below(4) {
            let op = *self.rng.pick(&self.ops);
            op(self, data, corpus);
        }
        data.truncate(self.max_len);
    }

    /// A range of `len` bytes: mostly short (a field, a token), sometimes up to the end.
    fn range(&mut self, len: usize) -> (usize, usize) {
        let start = self.rng.below(len + 1);
        let room = len - start;
        let most = if self.rng.one_in(4) { room } else { room.min(16) };
        let n = self.rng.below(most + 1);
        (start, start + n)
    }

    fn flip_bit(&mut self, d: &mut Vec<u8>, _: &[Vec<u8>]) {
        if !d.is_empty() {
            let i = self.rng.below(d.len());
            d[i] ^= 1 << self.rng.below(8);
        }
    }

    fn boundary_byte(&mut self, d: &mut Vec<u8>, _: &[Vec<u8>]) {
        if !d.is_empty() {
            let i = self.rng.below(d.len());
            d[i] = *self.rng.pick(&BOUNDARY_BYTES);
        }
    }

    fn random_byte(&mut self, d: &mut Vec<u8>, _: &[Vec<u8>]) {
        if !d.is_empty() {
            let i = self.rng.below(d.len());
            d[i] = self.rng.next_u64() as u8;
        }
    }

    /// A few random bytes, or one byte repeated (long runs of one byte find length bugs).
    fn insert_bytes(&mut self, d: &mut Vec<u8>, _: &[Vec<u8>]) {
        let at = self.rng.below(d.len() + 1);
        let bytes: Vec<u8> = if self.rng.one_in(2) {
            (0..1 + self.rng.below(8)).map(|_| self.rng.next_u64() as u8).collect()
        } else {
            vec![self.rng.next_u64() as u8; 1 + self.rng.below(256)]
        };
        d.splice(at..at, bytes);
    }

    fn delete_range(&mut self, d: &mut Vec<u8>, _: &[Vec<u8>]) {
        let (a, b) = self.range(d.len());
        d.drain(a..b);
    }

    fn duplicate_range(&mut self, d: &mut Vec<u8>, _: &[Vec<u8>]) {
        let (a, b) = self.range(d.len());
        let copy = d[a..b].to_vec();
        let at = self.rng.below(d.len() + 1);
        d.splice(at..at, copy);
    }

    /// Part of another corpus entry: inserted, or replacing our tail from the same offset
    /// (which keeps both halves' structure when they share a layout).
    fn splice(&mut self, d: &mut Vec<u8>, corpus: &[Vec<u8>]) {
        if corpus.is_empty() {
            return;
        }
        let other = self.rng.pick(corpus);
        if self.rng.one_in(2) {
            let (a, b) = self.range(other.len());
            let at = self.rng.below(d.len() + 1);
            d.splice(at..at, other[a..b].iter().copied());
        } else {
            let at = self.rng.below(d.len().min(other.len()) + 1);
            d.truncate(at);
            d.extend_from_slice(&other[at..]);
        }
    }

    /// Where a 4- or 8-byte word goes: half the time aligned to its width, else anywhere (GGUF
    /// fields follow variable-length strings, so most sit at odd offsets).
    fn word_at(&mut self, len: usize) -> Option<(usize, usize)> {
        let w = if self.rng.one_in(2) { 4 } else { 8 };
        if len < w {
            return None;
        }
        let mut at = self.rng.below(len - w + 1);
        if self.rng.one_in(2) {
            at -= at % w;
        }
        Some((at, w))
    }

    /// Counts, lengths and offsets at their edges, including ones relative to the input size.
    fn boundary_word(&mut self, d: &mut Vec<u8>, _: &[Vec<u8>]) {
        let Some((at, w)) = self.word_at(d.len()) else { return };
        let n = d.len() as u64;
        let values = [
            0,
            1,
            2,
            4,
            8,
            32,
            255,
            256,
            0x7fff,
            0xffff,
            0x7fff_ffff,
            0x8000_0000,
            u32::MAX as u64,
            1 << 32,
            1 << 62,
            i64::MAX as u64,
            1 << 63,
            u64::MAX,
            n - 1,
            n,
            n + 1,
            n * 2,
        ];
        let v = *self.rng.pick(&values);
        d[at..at + w].copy_from_slice(&v.to_le_bytes()[..w]);
    }

    /// A small step from the current value: off-by-one lengths and offsets.
    fn nudge_word(&mut self, d: &mut Vec<u8>, _: &[Vec<u8>]) {
        let Some((at, w)) = self.word_at(d.len()) else { return };
        let mut b = [0u8; 8];
        b[..w].copy_from_slice(&d[at..at + w]);
        let step = 1 + self.rng.below(16) as u64;
        let v = u64::from_le_bytes(b);
        let v = if self.rng.one_in(2) { v.wrapping_add(step) } else { v.wrapping_sub(step) };
        d[at..at + w].copy_from_slice(&v.to_le_bytes()[..w]);
    }

    fn edit_lines(&mut self, d: &mut Vec<u8>, _: &[Vec<u8>]) {
        let mut spans = vec![];
        let mut start = 0;
        for (i, &c) in d.iter().enumerate() {
            if c == b'\n' {
                spans.push((start, i + 1));
                start = i + 1;
            }
        }
        if start < d.len() {
            spans.push((start, d.len()));
        }
        self.rearrange(d, &spans);
    }

    fn edit_tokens(&mut self, d: &mut Vec<u8>, _: &[Vec<u8>]) {
        let spans = tokens(d);
        self.rearrange(d, &spans);
    }

    /// Duplicates, deletes or swaps spans (lines or tokens).
    fn rearrange(&mut self, d: &mut Vec<u8>, spans: &[(usize, usize)]) {
        if spans.is_empty() {
            return;
        }
        let a = *self.rng.pick(spans);
        let b = *self.rng.pick(spans);
        match self.rng.below(3) {
            0 => {
                let copy = d[a.0..a.1].to_vec();
                d.splice(b.1..b.1, copy);
            }
            1 => {
                d.drain(a.0..a.1);
            }
            _ => {
                let (x, y) = if a.0 <= b.0 { (a, b) } else { (b, a) };
                if x.1 <= y.0 {
                    let mut out = d[..x.0].to_vec();
                    out.extend_from_slice(&d[y.0..y.1]);
                    out.extend_from_slice(&d[x.1..y.0]);
                    out.extend_from_slice(&d[x.0..x.1]);
                    out.extend_from_slice(&d[y.1..]);
                    *d = out;
                }
            }
        }
    }

    /// A keyword or special string, inserted at a token edge or replacing a token.
    fn insert_token(&mut self, d: &mut Vec<u8>, _: &[Vec<u8>]) {
        let word =
            if !self.dict.is_empty() && self.rng.one_in(2) { self.rng.pick(self.dict) } else { self.rng.pick(SPECIAL) };
        let spans = tokens(d);
        let (a, b) = match spans.is_empty() {
            true => (d.len(), d.len()),
            false => {
                let t = *self.rng.pick(&spans);
                match self.rng.below(3) {
                    0 => (t.0, t.0),
                    1 => (t.1, t.1),
                    _ => t,
                }
            }
        };
        d.splice(a..b, word.bytes());
    }

    /// Wraps a token or a range in brackets or quotes, a few levels deep or, rarely, hundreds
    /// (recursion limits).
    fn nest(&mut self, d: &mut Vec<u8>, _: &[Vec<u8>]) {
        let spans = tokens(d);
        let (a, b) = if !spans.is_empty() && self.rng.one_in(2) { *self.rng.pick(&spans) } else { self.range(d.len()) };
        let (open, close) = *self.rng.pick(PAIRS);
        let depth = if self.rng.one_in(16) { 50 + self.rng.below(300) } else { 1 + self.rng.below(4) };
        d.splice(b..b, close.repeat(depth).into_bytes());
        d.splice(a..a, open.repeat(depth).into_bytes());
    }
}

/// Token spans: runs of word bytes (ASCII alphanumerics, `_`, `.`, and every non-ASCII byte so
/// UTF-8 characters stay whole), and each other non-space byte on its own.
fn tokens(d: &[u8]) -> Vec<(usize, usize)> {
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c >= 0x80;
    let mut spans = vec![];
    let mut i = 0;
    while i < d.len() {
        let start = i;
        if word(d[i]) {
            while i < d.len() && word(d[i]) {
                i += 1;
            }
        } else {
            i += 1;
        }
        if !d[start].is_ascii_whitespace() {
            spans.push((start, i));
        }
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_mutants() {
        let corpus = vec![b"window:256,sinks=4".to_vec(), b"h2o:0.2".to_vec()];
        let run = |seed| {
            let mut m = Mutator::new(seed, Format::Mixed, &["recent="], 1 << 10);
            (0..200)
                .map(|i| {
                    let mut d = corpus[i % 2].clone();
                    m.mutate(&mut d, &corpus);
                    d
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn mutants_respect_the_length_limit_and_change_the_input() {
        let mut m = Mutator::new(1, Format::Binary, &[], 64);
        let seed: Vec<u8> = (0..64).collect();
        let mut changed = 0;
        for _ in 0..1000 {
            let mut d = seed.clone();
            m.mutate(&mut d, std::slice::from_ref(&seed));
            assert!(d.len() <= 64);
            changed += (d != seed) as usize;
        }
        assert!(changed > 900, "{changed} of 1000 mutants differ from their parent");
    }

    #[test]
    fn tokens_keep_words_and_utf8_whole() {
        let d = "a: [é1, b.c]".as_bytes();
        let t: Vec<&str> = tokens(d).iter().map(|&(a, b)| std::str::from_utf8(&d[a..b]).unwrap()).collect();
        assert_eq!(t, ["a", ":", "[", "é1", ",", "b.c", "]"]);
    }
}
