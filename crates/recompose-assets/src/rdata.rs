//! Reader for R lazy-load databases (`Rdata.rdb` + `Rdata.rdx`), the form in which installed R
//! packages ship their `data/` sets (here: r-cran-janeaustenr's six novels). This module owns the
//! small subset of R's serialization format needed to pull character vectors out of such a
//! database; it depends only on `flate2`.
//!
//! Layout, as written by R's `makeLazyLoadDB` and checked against janeaustenr 1.0.0:
//!
//! - `Rdata.rdx` is written by `saveRDS`, i.e. a **gzip** file (not the 4-byte length + zlib framing
//!   of the objects) holding an XDR-serialized named list with `variables` (a named list of
//!   `c(offset, length)` integer — or, for big databases, double — pairs into the `.rdb`),
//!   `references` (environments; ignored here) and `compressed` (`TRUE`/1 = zlib, 2 = bzip2,
//!   3 = xz, `FALSE` = none). An uncompressed index or one framed as length + zlib is accepted too.
//! - each object in `Rdata.rdb` at `(offset, length)` is, for `compressed = 1`, a 4-byte big-endian
//!   uncompressed length followed by a zlib stream; for 2 and 3 a fifth byte names the method
//!   (`'0'` stored, `'1'` zlib, `'2'` bzip2, `'Z'` xz — the last two are reported as unsupported).
//! - the decompressed bytes are an R serialization, `"X\n"` (XDR, big-endian), version 2 or 3 (v3
//!   adds the writer's native encoding name after the three version integers).
//!
//! The parser walks every SEXP type R writes (pairlists iteratively, with a nesting limit so that
//! corrupt input yields an error rather than a stack overflow), keeps vectors, lists, symbols and
//! attributes, and throws the rest (environments, closures, byte code, external pointers) away.
//! Strings are decoded by their CHARSXP encoding flag: UTF-8/ASCII as UTF-8, latin1 as ISO-8859-1,
//! "bytes" and unflagged native strings as UTF-8 when valid, otherwise as latin1 (or CP1252 when the
//! v3 header names that as the native encoding). Invalid UTF-8 in a UTF-8-flagged string is
//! replaced with U+FFFD.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use flate2::read::{MultiGzDecoder, ZlibDecoder};

/// Reads the lazy-load database `rdb` (its index is the `Rdata.rdx`, i.e. the same path with the
/// extension `rdx`) and returns every object that is a character vector (STRSXP, attributes
/// ignored) as `(name, strings)`, **in the order of the index** (R writes it sorted by name).
/// Objects of any other type (data frames, factors, numbers, ...) are skipped. `NA_character_`
/// elements become empty strings. Errors are one line and name the file and what is wrong.
pub fn read_rdb(rdb: &Path) -> std::result::Result<Vec<(String, Vec<String>)>, String> {
    let rdx = rdb.with_extension("rdx");
    let index = read_index(&rdx).map_err(|e| format!("{}: {e}", rdx.display()))?;
    let mut file = File::open(rdb).map_err(|e| format!("{}: cannot open: {e}", rdb.display()))?;
    let file_len = file.metadata().map_err(|e| format!("{}: cannot stat: {e}", rdb.display()))?.len();
    let mut out = Vec::new();
    for (name, offset, len) in index.vars {
        let end = offset.checked_add(len);
        if end.is_none_or(|end| end > file_len) {
            return Err(format!(
                "{}: object `{name}` at offset {offset} length {len} runs past the end of the file ({file_len} bytes)",
                rdb.display()
            ));
        }
        let n = usize::try_from(len).map_err(|_| format!("{}: object `{name}` too large", rdb.display()))?;
        let mut raw = vec![0u8; n];
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.read_exact(&mut raw))
            .map_err(|e| format!("{}: object `{name}`: read error: {e}", rdb.display()))?;
        let obj = decompress_object(&raw, index.compressed)
            .and_then(|bytes| unserialize(&bytes))
            .map_err(|e| format!("{}: object `{name}`: {e}", rdb.display()))?;
        if let RObj::Str(v, _) = obj {
            out.push((name, v.into_iter().map(Option::unwrap_or_default).collect()));
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// index (.rdx)

struct Index {
    /// (name, offset, length) in index order
    vars: Vec<(String, u64, u64)>,
    compressed: i64,
}

fn read_index(rdx: &Path) -> Result<Index, String> {
    let mut raw = Vec::new();
    File::open(rdx).and_then(|mut f| f.read_to_end(&mut raw)).map_err(|e| format!("cannot read index: {e}"))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut v = Vec::new();
        MultiGzDecoder::new(&raw[..]).read_to_end(&mut v).map_err(|e| format!("bad gzip stream: {e}"))?;
        v
    } else if raw.starts_with(b"X\n") {
        raw
    } else if raw.starts_with(b"BZh") || raw.starts_with(&[0xfd, b'7', b'z', b'X', b'Z']) {
        return Err("index is bzip2/xz compressed, which is not supported".into());
    } else {
        zlib_framed(&raw)?
    };
    let obj = unserialize(&bytes)?;
    let RObj::List(items, attrs) = obj else {
        return Err("index is not a list".into());
    };
    let names = names_of(&attrs).ok_or("index list has no names")?;
    let field = |want: &str| names.iter().position(|n| n.as_deref() == Some(want)).and_then(|i| items.get(i));
    let compressed = match field("compressed") {
        Some(RObj::Int(v, _)) | Some(RObj::Lgl(v, _)) => match v.first() {
            Some(&x) if x != NA_INTEGER => i64::from(x),
            _ => return Err("index field `compressed` is NA or empty".into()),
        },
        Some(RObj::Real(v, _)) => match v.first() {
            Some(&x) if x.is_finite() => x as i64,
            _ => return Err("index field `compressed` is NA or empty".into()),
        },
        None => return Err("index has no field `compressed`".into()),
        Some(_) => return Err("index field `compressed` is not a number".into()),
    };
    let Some(RObj::List(vars, vattrs)) = field("variables") else {
        return Err("index has no list `variables`".into());
    };
    let vnames = names_of(vattrs).ok_or("index `variables` has no names")?;
    if vnames.len() != vars.len() {
        return Err("index `variables` names and values differ in length".into());
    }
    let mut out = Vec::with_capacity(vars.len());
    for (name, v) in vnames.iter().zip(vars) {
        let name = name.clone().unwrap_or_default();
        let pair: Option<(f64, f64)> = match v {
            RObj::Int(x, _) if x.len() == 2 && !x.contains(&NA_INTEGER) => Some((f64::from(x[0]), f64::from(x[1]))),
            RObj::Real(x, _) if x.len() == 2 => Some((x[0], x[1])),
            _ => None,
        };
        let ok = |x: f64| (0.0..=9.0e15).contains(&x) && x.fract() == 0.0;
        match pair {
            Some((o, l)) if ok(o) && ok(l) => out.push((name, o as u64, l as u64)),
            _ => return Err(format!("index entry `{name}` is not a valid (offset, length) pair")),
        }
    }
    Ok(Index { vars: out, compressed })
}

// ---------------------------------------------------------------------------------------------
// decompression

fn be_u32(b: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?))
}

/// 4-byte big-endian uncompressed length + zlib stream.
fn zlib_framed(raw: &[u8]) -> Result<Vec<u8>, String> {
    let n = be_u32(raw).ok_or("truncated: no 4-byte length header")?;
    inflate(&raw[4..], n)
}

fn inflate(z: &[u8], n: u32) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity((n as usize).min(z.len().saturating_mul(64)));
    ZlibDecoder::new(z).take(u64::from(n) + 1).read_to_end(&mut out).map_err(|e| format!("bad zlib stream: {e}"))?;
    if out.len() != n as usize {
        return Err(format!("zlib stream gave {} bytes, header says {n}", out.len()));
    }
    Ok(out)
}

fn decompress_object(raw: &[u8], compressed: i64) -> Result<Vec<u8>, String> {
    match compressed {
        0 => Ok(raw.to_vec()),
        1 => zlib_framed(raw),
        2 | 3 => {
            let n = be_u32(raw).ok_or("truncated: no 4-byte length header")?;
            let body = raw.get(5..).ok_or("truncated: no compression type byte")?;
            match raw[4] {
                b'0' => {
                    if body.len() != n as usize {
                        return Err(format!("stored object has {} bytes, header says {n}", body.len()));
                    }
                    Ok(body.to_vec())
                }
                b'1' => inflate(body, n),
                b'2' => Err("bzip2-compressed object, not supported".into()),
                b'Z' => Err("xz-compressed object, not supported".into()),
                t => Err(format!("unknown compression type byte 0x{t:02x}")),
            }
        }
        c => Err(format!("unknown `compressed` value {c} in the index")),
    }
}

// ---------------------------------------------------------------------------------------------
// R serialization (XDR)

const NA_INTEGER: i32 = i32::MIN;
const MAX_DEPTH: usize = 200;

// SEXP types
const NILSXP: u32 = 0;
const SYMSXP: u32 = 1;
const LISTSXP: u32 = 2;
const CLOSXP: u32 = 3;
const ENVSXP: u32 = 4;
const PROMSXP: u32 = 5;
const LANGSXP: u32 = 6;
const SPECIALSXP: u32 = 7;
const BUILTINSXP: u32 = 8;
const CHARSXP: u32 = 9;
const LGLSXP: u32 = 10;
const INTSXP: u32 = 13;
const REALSXP: u32 = 14;
const CPLXSXP: u32 = 15;
const STRSXP: u32 = 16;
const DOTSXP: u32 = 17;
const VECSXP: u32 = 19;
const EXPRSXP: u32 = 20;
const BCODESXP: u32 = 21;
const EXTPTRSXP: u32 = 22;
const WEAKREFSXP: u32 = 23;
const RAWSXP: u32 = 24;
const S4SXP: u32 = 25;
// serialization pseudo-types
const REFSXP: u32 = 255;
const NILVALUE_SXP: u32 = 254;
const GLOBALENV_SXP: u32 = 253;
const UNBOUNDVALUE_SXP: u32 = 252;
const MISSINGARG_SXP: u32 = 251;
const BASENAMESPACE_SXP: u32 = 250;
const NAMESPACESXP: u32 = 249;
const PACKAGESXP: u32 = 248;
const PERSISTSXP: u32 = 247;
const BCREPREF: u32 = 243;
const BCREPDEF: u32 = 244;
const EMPTYENV_SXP: u32 = 242;
const BASEENV_SXP: u32 = 241;
const ATTRLANGSXP: u32 = 240;
const ATTRLISTSXP: u32 = 239;
const ALTREP_SXP: u32 = 238;

// CHARSXP encoding bits (in the "levels" field)
const BYTES_MASK: u32 = 1 << 1;
const LATIN1_MASK: u32 = 1 << 2;
const UTF8_MASK: u32 = 1 << 3;
const ASCII_MASK: u32 = 1 << 6;

/// Attributes as (tag, value) pairs.
type Attrs = Vec<(Option<String>, RObj)>;

/// What the parser keeps of an R object. (Attributes are kept for every vector, though only
/// `names` of lists is read today.)
#[derive(Clone, Debug)]
#[allow(dead_code)]
enum RObj {
    Nil,
    Sym(String),
    Char(Option<String>),
    Str(Vec<Option<String>>, Attrs),
    Lgl(Vec<i32>, Attrs),
    Int(Vec<i32>, Attrs),
    Real(Vec<f64>, Attrs),
    List(Vec<RObj>, Attrs),
    Pairlist(Attrs, Attrs),
    /// anything not kept (environments, closures, calls, byte code, raw, complex, ...)
    Other,
}

fn names_of(attrs: &Attrs) -> Option<&Vec<Option<String>>> {
    attrs.iter().find_map(|(t, v)| match (t.as_deref(), v) {
        (Some("names"), RObj::Str(n, _)) => Some(n),
        _ => None,
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Native {
    Utf8,
    Latin1,
    Cp1252,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    refs: Vec<RObj>,
    depth: usize,
    native: Native,
}

/// Parses one complete R serialization (`"X\n"` header, version 2 or 3).
fn unserialize(bytes: &[u8]) -> Result<RObj, String> {
    match bytes.get(..2) {
        Some(b"X\n") => {}
        Some(b"A\n") | Some(b"B\n") => {
            return Err("ascii/native-binary R serialization, only XDR (\"X\\n\") is supported".into())
        }
        _ => return Err("not an R XDR serialization (no \"X\\n\" header)".into()),
    }
    let mut r = Reader { buf: bytes, pos: 2, refs: Vec::new(), depth: 0, native: Native::Utf8 };
    let version = r.int()?;
    let _writer = r.int()?;
    let _min_reader = r.int()?;
    match version {
        2 => {}
        3 => {
            let n = r.len_int()?;
            let enc = String::from_utf8_lossy(r.bytes(n)?).to_ascii_lowercase();
            r.native = if enc.contains("8859-1") || enc.contains("8859_1") || enc.contains("latin1") {
                Native::Latin1
            } else if enc.contains("1252") {
                Native::Cp1252
            } else {
                Native::Utf8
            };
        }
        v => return Err(format!("unsupported serialization version {v}")),
    }
    let obj = r.item()?;
    if r.pos != r.buf.len() {
        return Err(format!("{} trailing bytes after the object", r.buf.len() - r.pos));
    }
    Ok(obj)
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            format!("truncated: need {n} bytes at offset {}, have {}", self.pos, self.buf.len() - self.pos)
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn int(&mut self) -> Result<i32, String> {
        let b = self.bytes(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn len_int(&mut self) -> Result<usize, String> {
        let n = self.int()?;
        usize::try_from(n).map_err(|_| format!("negative length {n} at offset {}", self.pos - 4))
    }

    /// Vector length (long vectors: -1 then upper and lower 32 bits), checked against the bytes
    /// left given at least `min_elt` bytes per element.
    fn vec_len(&mut self, min_elt: usize) -> Result<usize, String> {
        let at = self.pos;
        let n = self.int()?;
        let n: u64 = if n == -1 {
            let hi = self.int()? as u32;
            let lo = self.int()? as u32;
            (u64::from(hi) << 32) | u64::from(lo)
        } else {
            u64::try_from(n).map_err(|_| format!("negative length {n} at offset {at}"))?
        };
        let left = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_elt as u64) > left {
            return Err(format!(
                "truncated: vector of length {n} at offset {at} needs more than the {left} bytes left"
            ));
        }
        Ok(n as usize)
    }

    fn item(&mut self) -> Result<RObj, String> {
        let flags = self.int()? as u32;
        self.item_with(flags)
    }

    fn item_with(&mut self, flags: u32) -> Result<RObj, String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(format!("objects nested deeper than {MAX_DEPTH} at offset {}", self.pos));
        }
        let r = self.item_inner(flags);
        self.depth -= 1;
        r
    }

    fn add_ref(&mut self, o: RObj) {
        self.refs.push(o);
    }

    fn string_vec(&mut self) -> Result<Vec<Option<String>>, String> {
        if self.int()? != 0 {
            return Err("names in persistent strings are not supported".into());
        }
        let n = self.vec_len(8)?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            match self.item()? {
                RObj::Char(s) => v.push(s),
                _ => return Err("non-CHARSXP in a string vector".into()),
            }
        }
        Ok(v)
    }

    fn attrs(&mut self, has: bool) -> Result<Attrs, String> {
        if !has {
            return Ok(Vec::new());
        }
        match self.item()? {
            RObj::Pairlist(items, _) => Ok(items),
            RObj::Nil => Ok(Vec::new()),
            _ => Err("attributes are not a pairlist".into()),
        }
    }

    fn item_inner(&mut self, flags: u32) -> Result<RObj, String> {
        let ty = flags & 0xff;
        let levels = (flags >> 12) & 0xffff;
        let has_attr = flags & (1 << 9) != 0;
        match ty {
            NILVALUE_SXP => return Ok(RObj::Nil),
            EMPTYENV_SXP | BASEENV_SXP | GLOBALENV_SXP | UNBOUNDVALUE_SXP | MISSINGARG_SXP | BASENAMESPACE_SXP => {
                return Ok(RObj::Other)
            }
            REFSXP => {
                let mut i = (flags >> 8) as usize;
                if i == 0 {
                    i = self.len_int()?;
                }
                return i
                    .checked_sub(1)
                    .and_then(|i| self.refs.get(i))
                    .cloned()
                    .ok_or_else(|| format!("reference {i} out of range ({} known)", self.refs.len()));
            }
            PERSISTSXP | PACKAGESXP | NAMESPACESXP => {
                self.string_vec()?;
                self.add_ref(RObj::Other);
                return Ok(RObj::Other);
            }
            SYMSXP => {
                let s = match self.item()? {
                    RObj::Char(s) => s.unwrap_or_else(|| "NA".into()),
                    _ => return Err("symbol name is not a CHARSXP".into()),
                };
                self.add_ref(RObj::Sym(s.clone()));
                return Ok(RObj::Sym(s));
            }
            ENVSXP => {
                let _locked = self.int()?;
                self.add_ref(RObj::Other);
                for _ in 0..4 {
                    self.item()?; // enclos, frame, hashtab, attrib
                }
                return Ok(RObj::Other);
            }
            LISTSXP | LANGSXP | CLOSXP | PROMSXP | DOTSXP => return self.pairlist(flags),
            ALTREP_SXP => return self.altrep(),
            ATTRLANGSXP | ATTRLISTSXP | BCREPDEF | BCREPREF => {
                return Err(format!("byte-code-only type {ty} outside byte code"))
            }
            _ => {}
        }
        let obj = match ty {
            NILSXP => RObj::Nil,
            EXTPTRSXP => {
                self.add_ref(RObj::Other);
                self.item()?;
                self.item()?;
                RObj::Other
            }
            WEAKREFSXP => {
                self.add_ref(RObj::Other);
                RObj::Other
            }
            SPECIALSXP | BUILTINSXP => {
                let n = self.len_int()?;
                self.bytes(n)?;
                RObj::Other
            }
            CHARSXP => {
                let n = self.int()?;
                let s = if n == -1 {
                    None
                } else {
                    let n = usize::try_from(n).map_err(|_| format!("bad CHARSXP length {n}"))?;
                    let b = self.bytes(n)?;
                    Some(self.decode(b, levels))
                };
                // old writers may attach attributes to a CHARSXP: read and drop them
                self.attrs(has_attr)?;
                return Ok(RObj::Char(s));
            }
            LGLSXP | INTSXP => {
                let n = self.vec_len(4)?;
                let b = self.bytes(n * 4)?;
                let v = b.chunks_exact(4).map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]])).collect();
                let a = self.attrs(has_attr)?;
                return Ok(if ty == LGLSXP { RObj::Lgl(v, a) } else { RObj::Int(v, a) });
            }
            REALSXP => {
                let n = self.vec_len(8)?;
                let b = self.bytes(n * 8)?;
                let v = b
                    .chunks_exact(8)
                    .map(|c| f64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect();
                return Ok(RObj::Real(v, self.attrs(has_attr)?));
            }
            CPLXSXP => {
                let n = self.vec_len(16)?;
                self.bytes(n * 16)?;
                RObj::Other
            }
            RAWSXP => {
                let n = self.vec_len(1)?;
                self.bytes(n)?;
                RObj::Other
            }
            STRSXP => {
                let n = self.vec_len(8)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    match self.item()? {
                        RObj::Char(s) => v.push(s),
                        _ => return Err("element of a character vector is not a CHARSXP".into()),
                    }
                }
                return Ok(RObj::Str(v, self.attrs(has_attr)?));
            }
            VECSXP | EXPRSXP => {
                let n = self.vec_len(4)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.item()?);
                }
                let a = self.attrs(has_attr)?;
                return Ok(if ty == VECSXP { RObj::List(v, a) } else { RObj::Other });
            }
            BCODESXP => {
                let _reps = self.len_int()?;
                self.bc1()?;
                RObj::Other
            }
            S4SXP => RObj::Other,
            t => return Err(format!("unknown SEXP type {t} at offset {}", self.pos - 4)),
        };
        self.attrs(has_attr)?;
        Ok(obj)
    }

    /// Pairlist-like node chain (LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP), read iteratively
    /// along the CDRs so that long lists do not recurse.
    fn pairlist(&mut self, mut flags: u32) -> Result<RObj, String> {
        let is_list = flags & 0xff == LISTSXP;
        let mut attrs = None;
        let mut items = Vec::new();
        loop {
            let a = self.attrs(flags & (1 << 9) != 0)?;
            if attrs.is_none() {
                attrs = Some(a);
            }
            let tag = if flags & (1 << 10) != 0 {
                match self.item()? {
                    RObj::Sym(s) => Some(s),
                    _ => None,
                }
            } else {
                None
            };
            let car = self.item()?;
            items.push((tag, car));
            flags = self.int()? as u32;
            if !matches!(flags & 0xff, LISTSXP | LANGSXP | CLOSXP | PROMSXP | DOTSXP) {
                self.item_with(flags)?; // the final CDR, normally NILVALUE
                break;
            }
        }
        Ok(if is_list { RObj::Pairlist(items, attrs.unwrap_or_default()) } else { RObj::Other })
    }

    /// ALTREP: class info pairlist, state, attributes. Wrappers and compact sequences are
    /// expanded; other classes (e.g. deferred strings) are kept as `Other`.
    fn altrep(&mut self) -> Result<RObj, String> {
        let info = self.item()?;
        let state = self.item()?;
        let attrs = match self.item()? {
            RObj::Pairlist(a, _) => a,
            _ => Vec::new(),
        };
        let class = match &info {
            RObj::Pairlist(v, _) => match v.first() {
                Some((_, RObj::Sym(s))) => s.clone(),
                _ => String::new(),
            },
            _ => String::new(),
        };
        let with_attrs = |o: RObj, attrs: Attrs| match o {
            RObj::Str(v, _) => RObj::Str(v, attrs),
            RObj::Int(v, _) => RObj::Int(v, attrs),
            RObj::Lgl(v, _) => RObj::Lgl(v, attrs),
            RObj::Real(v, _) => RObj::Real(v, attrs),
            RObj::List(v, _) => RObj::List(v, attrs),
            _ => RObj::Other,
        };
        Ok(match class.as_str() {
            c if c.starts_with("wrap_") => match state {
                RObj::Pairlist(mut v, _) if !v.is_empty() => with_attrs(v.swap_remove(0).1, attrs),
                _ => RObj::Other,
            },
            "compact_intseq" => match state {
                RObj::Real(v, _) if v.len() == 3 && v[0] >= 0.0 && v[0] <= (self.buf.len() as f64) * 64.0 => {
                    let (n, n1, inc) = (v[0] as i64, v[1] as i64, v[2] as i64);
                    let seq = (0..n).map(|i| (n1 + i * inc) as i32).collect();
                    RObj::Int(seq, attrs)
                }
                _ => RObj::Other,
            },
            "compact_realseq" => match state {
                RObj::Real(v, _) if v.len() == 3 && v[0] >= 0.0 && v[0] <= (self.buf.len() as f64) * 64.0 => {
                    let (n, n1, inc) = (v[0] as i64, v[1], v[2]);
                    RObj::Real((0..n).map(|i| n1 + i as f64 * inc).collect(), attrs)
                }
                _ => RObj::Other,
            },
            _ => RObj::Other,
        })
    }

    /// One byte-code object: code vector, then constants (R's ReadBC1/ReadBCConsts).
    fn bc1(&mut self) -> Result<(), String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(format!("byte code nested deeper than {MAX_DEPTH}"));
        }
        self.item()?; // code (INTSXP)
        let n = self.vec_len(4)?;
        for _ in 0..n {
            let ty = self.int()? as u32;
            match ty {
                BCODESXP => self.bc1()?,
                LANGSXP | LISTSXP | BCREPDEF | BCREPREF | ATTRLANGSXP | ATTRLISTSXP => self.bc_lang(ty)?,
                _ => {
                    self.item()?;
                }
            }
        }
        self.depth -= 1;
        Ok(())
    }

    /// R's ReadBCLang.
    fn bc_lang(&mut self, mut ty: u32) -> Result<(), String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(format!("byte code nested deeper than {MAX_DEPTH}"));
        }
        match ty {
            BCREPREF => {
                self.int()?;
            }
            BCREPDEF | LANGSXP | LISTSXP | ATTRLANGSXP | ATTRLISTSXP => {
                if ty == BCREPDEF {
                    self.int()?; // position
                    ty = self.int()? as u32;
                }
                if matches!(ty, ATTRLANGSXP | ATTRLISTSXP) {
                    self.item()?;
                }
                self.item()?; // tag
                let t = self.int()? as u32;
                self.bc_lang(t)?; // car
                let t = self.int()? as u32;
                self.bc_lang(t)?; // cdr
            }
            _ => {
                self.item()?;
            }
        }
        self.depth -= 1;
        Ok(())
    }

    fn decode(&self, b: &[u8], levels: u32) -> String {
        let latin1 = |b: &[u8]| b.iter().map(|&c| char::from(c)).collect::<String>();
        if levels & LATIN1_MASK != 0 {
            return latin1(b);
        }
        if levels & (UTF8_MASK | ASCII_MASK) != 0 {
            return String::from_utf8_lossy(b).into_owned();
        }
        // BYTES or native encoding
        if levels & BYTES_MASK == 0 && self.native != Native::Utf8 {
            return if self.native == Native::Latin1 { latin1(b) } else { cp1252(b) };
        }
        match std::str::from_utf8(b) {
            Ok(s) => s.to_owned(),
            Err(_) => latin1(b),
        }
    }
}

fn cp1252(b: &[u8]) -> String {
    const HI: [char; 32] = [
        '€', '\u{81}', '‚', 'ƒ', '„', '…', '†', '‡', 'ˆ', '‰', 'Š', '‹', 'Œ', '\u{8d}', 'Ž', '\u{8f}', '\u{90}', '‘',
        '’', '“', '”', '•', '–', '—', '˜', '™', 'š', '›', 'œ', '\u{9d}', 'ž', 'Ÿ',
    ];
    b.iter().map(|&c| if (0x80..0xa0).contains(&c) { HI[usize::from(c - 0x80)] } else { char::from(c) }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::{GzEncoder, ZlibEncoder};
    use flate2::Compression;
    use std::io::Write;

    /// Builds XDR serialization bytes by hand.
    #[derive(Default)]
    struct W(Vec<u8>);
    impl W {
        fn header(v: i32) -> W {
            let mut w = W(b"X\n".to_vec());
            w.int(v).int(0x0004_0201).int(0x0003_0500);
            if v == 3 {
                w.int(5);
                w.0.extend_from_slice(b"UTF-8");
            }
            w
        }
        fn int(&mut self, x: i32) -> &mut W {
            self.0.extend_from_slice(&x.to_be_bytes());
            self
        }
        fn flags(&mut self, ty: u32, levels: u32, attr: bool, tag: bool) -> &mut W {
            let f = ty | (levels << 12) | if attr { 1 << 9 } else { 0 } | if tag { 1 << 10 } else { 0 };
            self.int(f as i32)
        }
        fn chars(&mut self, s: &[u8], levels: u32) -> &mut W {
            self.flags(CHARSXP, levels, false, false).int(s.len() as i32);
            self.0.extend_from_slice(s);
            self
        }
        fn na_string(&mut self) -> &mut W {
            self.flags(CHARSXP, 0, false, false).int(-1)
        }
        fn strs(&mut self, v: &[&str]) -> &mut W {
            self.flags(STRSXP, 0, false, false).int(v.len() as i32);
            for s in v {
                self.chars(s.as_bytes(), 64);
            }
            self
        }
        fn nil(&mut self) -> &mut W {
            self.int(NILVALUE_SXP as i32)
        }
        /// `attributes = list(names = c(...))` pairlist, first use of the `names` symbol.
        fn names_attr(&mut self, names: &[&str]) -> &mut W {
            self.flags(LISTSXP, 0, false, true).flags(SYMSXP, 0, false, false).chars(b"names", 64);
            self.strs(names).nil()
        }
    }

    fn framed(raw: &[u8]) -> Vec<u8> {
        let mut z = ZlibEncoder::new(Vec::new(), Compression::default());
        z.write_all(raw).unwrap();
        let z = z.finish().unwrap();
        let mut out = (raw.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&z);
        out
    }

    /// Writes an rdb/rdx pair holding `objs` (each already a full serialization).
    fn write_db(dir: &Path, objs: &[(&str, Vec<u8>)]) -> std::path::PathBuf {
        let mut rdb = Vec::new();
        let mut pairs = Vec::new();
        for (_, o) in objs {
            let f = framed(o);
            pairs.push((rdb.len() as i32, f.len() as i32));
            rdb.extend_from_slice(&f);
        }
        let names: Vec<&str> = objs.iter().map(|(n, _)| *n).collect();
        let mut w = W::header(3);
        w.flags(VECSXP, 0, true, false).int(3);
        // variables
        w.flags(VECSXP, 0, true, false).int(objs.len() as i32);
        for (o, l) in &pairs {
            w.flags(INTSXP, 0, false, false).int(2).int(*o).int(*l);
        }
        w.names_attr(&names);
        // references: empty named list (names symbol now a reference: index 1)
        w.flags(VECSXP, 0, true, false).int(0);
        w.flags(LISTSXP, 0, false, true).int(((1 << 8) | REFSXP) as i32).strs(&[]).nil();
        // compressed = TRUE
        w.flags(LGLSXP, 0, false, false).int(1).int(1);
        // top-level names, via the ref again
        w.flags(LISTSXP, 0, false, true).int(((1 << 8) | REFSXP) as i32);
        w.strs(&["variables", "references", "compressed"]).nil();
        let mut gz = GzEncoder::new(Vec::new(), Compression::default());
        gz.write_all(&w.0).unwrap();
        let p = dir.join("Rdata.rdb");
        std::fs::write(&p, &rdb).unwrap();
        std::fs::write(dir.join("Rdata.rdx"), gz.finish().unwrap()).unwrap();
        p
    }

    #[test]
    fn parses_strsxp_with_encodings_and_na() {
        let mut w = W::header(3);
        w.flags(STRSXP, 0, false, false).int(5);
        w.chars(b"EMMA", 64).chars(b"", 64).chars("caf\u{e9}".as_bytes(), 8).chars(b"na\xefve", 4).na_string();
        let o = unserialize(&w.0).unwrap();
        let RObj::Str(v, _) = o else { panic!("not a STRSXP: {o:?}") };
        assert_eq!(v, vec![Some("EMMA".into()), Some("".into()), Some("café".into()), Some("naïve".into()), None]);
        // version 2 (no native encoding) parses the same way
        let mut w = W::header(2);
        w.strs(&["a", "b"]);
        assert!(matches!(unserialize(&w.0).unwrap(), RObj::Str(v, _) if v.len() == 2));
    }

    #[test]
    fn reads_db_and_skips_non_character_objects() {
        let dir = tempfile::tempdir().unwrap();
        let mut book = W::header(3);
        book.strs(&["PRIDE AND PREJUDICE", "", "By Jane Austen"]);
        let mut nums = W::header(3);
        nums.flags(REALSXP, 0, false, false).int(1).0.extend_from_slice(&1.5f64.to_be_bytes());
        // a data frame-like list with attributes
        let mut df = W::header(3);
        df.flags(VECSXP, 0, true, false).int(1).strs(&["x"]).names_attr(&["text"]);
        let mut named = W::header(3);
        named.flags(STRSXP, 0, true, false).int(1).chars(b"v", 64).names_attr(&["k"]);
        let p = write_db(dir.path(), &[("book", book.0), ("nums", nums.0), ("df", df.0), ("named", named.0)]);
        let got = read_rdb(&p).unwrap();
        assert_eq!(
            got,
            vec![
                ("book".to_string(), vec!["PRIDE AND PREJUDICE".to_string(), "".into(), "By Jane Austen".into()]),
                ("named".to_string(), vec!["v".to_string()]),
            ]
        );
    }

    #[test]
    fn truncated_inputs_are_errors() {
        let mut w = W::header(3);
        w.strs(&["hello", "world"]);
        let full = w.0.clone();
        assert!(unserialize(&full).is_ok());
        for cut in 0..full.len() {
            assert!(unserialize(&full[..cut]).is_err(), "cut at {cut} parsed");
        }
        // truncated / corrupted compressed frames
        let f = framed(&full);
        for cut in 0..f.len() {
            assert!(decompress_object(&f[..cut], 1).is_err(), "frame cut at {cut} decompressed");
        }
        // huge claimed lengths do not allocate or panic
        let mut w = W::header(3);
        w.flags(STRSXP, 0, false, false).int(i32::MAX);
        assert!(unserialize(&w.0).is_err());
        let mut w = W::header(3);
        w.flags(STRSXP, 0, false, false).int(-1).int(0x7fff_ffff).int(-1);
        assert!(unserialize(&w.0).is_err());
        // bad reference, deep nesting
        let mut w = W::header(3);
        w.int(((7 << 8) | REFSXP) as i32);
        assert!(unserialize(&w.0).is_err());
        let mut w = W::header(3);
        for _ in 0..10_000 {
            w.flags(VECSXP, 0, false, false).int(1);
        }
        w.nil();
        assert!(unserialize(&w.0).unwrap_err().contains("nested"));
    }

    #[test]
    fn truncated_db_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut book = W::header(3);
        book.strs(&["some text", "more text"]);
        let p = write_db(dir.path(), &[("book", book.0)]);
        let rdb = std::fs::read(&p).unwrap();
        std::fs::write(&p, &rdb[..rdb.len() - 3]).unwrap();
        let e = read_rdb(&p).unwrap_err();
        assert!(e.contains("Rdata.rdb") && e.contains("book"), "{e}");
        let rdx = dir.path().join("Rdata.rdx");
        let x = std::fs::read(&rdx).unwrap();
        std::fs::write(&rdx, &x[..x.len() / 2]).unwrap();
        let e = read_rdb(&p).unwrap_err();
        assert!(e.contains("Rdata.rdx") && !e.contains('\n'), "{e}");
        std::fs::remove_file(&rdx).unwrap();
        assert!(read_rdb(&p).unwrap_err().contains("Rdata.rdx"));
    }
}
