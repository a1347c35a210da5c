//! GGUF (v2/v3) reading, memory-mapped and lazy, and writing through candle's quantiser.
//!
//! Opening a file parses the header and validates every tensor's extent against the file size;
//! no tensor byte is read until a tensor is asked for. Owns the GGUF binary layout only: what the
//! metadata means for a model lives in `config.rs` and `tokenizer.rs`.

use crate::error::{Error, Result};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A metadata value, as stored in the file.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
    /// A short human rendering for `inspect` (arrays are summarised).
    pub fn summary(&self) -> String {
        match self {
            Value::String(s) if s.len() > 80 => {
                format!("{:?}… ({} chars)", &s[..s.floor_char_boundary_compat(60)], s.len())
            }
            Value::String(s) => format!("{s:?}"),
            Value::Array(a) => format!("[{} values]", a.len()),
            Value::Bool(b) => b.to_string(),
            Value::F32(v) => v.to_string(),
            Value::F64(v) => v.to_string(),
            other => other.as_u64().map(|v| v.to_string()).unwrap_or_else(|| format!("{other:?}")),
        }
    }
}

trait FloorCharBoundary {
    fn floor_char_boundary_compat(&self, i: usize) -> usize;
}
impl FloorCharBoundary for str {
    fn floor_char_boundary_compat(&self, mut i: usize) -> usize {
        i = i.min(self.len());
        while !self.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}

/// GGML tensor types, by their on-disk id.
pub fn ggml_dtype_from_id(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Row-major shape (outermost first), i.e. GGUF's `ne` reversed.
    pub shape: Vec<usize>,
    pub dtype: GgmlDType,
    /// Absolute byte offset in the file.
    pub offset: usize,
    pub size: usize,
}

/// An opened GGUF file: parsed header plus the memory map.
pub struct GgufFile {
    path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    index: BTreeMap<String, usize>,
    mmap: Arc<memmap2::Mmap>,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(Error::CorruptGguf {
                path: self.path.to_path_buf(),
                what: format!("file ends while reading {what} at byte {}", self.pos),
            }),
        }
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    /// A length that must fit in what is left of the file (each element at least `min_elem` bytes).
    fn len(&mut self, what: &str, min_elem: usize) -> Result<usize> {
        let n = self.u64(what)?;
        let left = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_elem as u64) > left {
            return Err(Error::CorruptGguf {
                path: self.path.to_path_buf(),
                what: format!("{what} = {n} is larger than the rest of the file"),
            });
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.len(what, 1)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| Error::CorruptGguf { path: self.path.to_path_buf(), what: format!("{what} is not UTF-8") })
    }
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.u8(key)?),
            1 => Value::I8(self.u8(key)? as i8),
            2 => Value::U16(self.u16(key)?),
            3 => Value::I16(self.u16(key)? as i16),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(self.u32(key)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(key)?)),
            7 => Value::Bool(self.u8(key)? != 0),
            8 => Value::String(self.string(key)?),
            9 if depth < 4 => {
                let elem_ty = self.u32(key)?;
                let n = self.len(key, 1)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(elem_ty, key, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(self.u64(key)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(key)?)),
            9 => {
                return Err(Error::CorruptGguf {
                    path: self.path.to_path_buf(),
                    what: format!("key '{key}' nests arrays deeper than 4 levels"),
                })
            }
            _ => {
                return Err(Error::CorruptGguf {
                    path: self.path.to_path_buf(),
                    what: format!("key '{key}' has unknown value type {ty}"),
                })
            }
        })
    }
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; a file truncated underneath us is outside our contract,
        // exactly as for any mmap-based reader (llama.cpp, candle).
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(path, Arc::new(mmap))
    }

    fn parse(path: &Path, mmap: Arc<memmap2::Mmap>) -> Result<Self> {
        let mut c = Cursor { buf: &mmap, pos: 0, path };
        let magic = c.u32("magic")?;
        if magic != 0x4655_4747 {
            return Err(Error::BadMagic { path: path.into(), magic });
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::UnsupportedGgufVersion { path: path.into(), version });
        }
        // A tensor info is at least 24 bytes, a key-value at least 13.
        let n_tensors = c.len("tensor count", 24)?;
        let n_kv = c.len("metadata count", 13)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32(&key)?;
            let value = c.value(ty, &key, 0)?;
            // Which copy of a repeated key wins is up to each reader: refuse the ambiguity.
            if metadata.contains_key(&key) {
                return Err(Error::CorruptGguf {
                    path: path.into(),
                    what: format!("metadata key '{key}' appears twice"),
                });
            }
            metadata.insert(key, value);
        }
        let mut raw = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let n_dims = c.u32(&name)? as usize;
            if n_dims == 0 || n_dims > 4 {
                return Err(bad_tensor(path, &name, format!("{n_dims} dimensions (1 to 4 allowed)")));
            }
            let mut ne = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                ne.push(c.u64(&name)?);
            }
            let ty = c.u32(&name)?;
            let offset = c.u64(&name)?;
            raw.push((name, ne, ty, offset));
        }
        let alignment = match metadata.get("general.alignment") {
            Some(v) => v.as_u64().filter(|a| *a > 0 && a.is_power_of_two()).ok_or_else(|| Error::BadKey {
                path: path.into(),
                key: "general.alignment".into(),
                what: "must be a power of two".into(),
            })? as usize,
            None => 32,
        };
        let data_start = c.pos.div_ceil(alignment) * alignment;
        let file_len = mmap.len();
        let mut tensors = Vec::with_capacity(raw.len());
        let mut index = BTreeMap::new();
        for (name, ne, ty, offset) in raw {
            let dtype =
                ggml_dtype_from_id(ty).ok_or_else(|| bad_tensor(path, &name, format!("unknown GGML type id {ty}")))?;
            let mut elems: u64 = 1;
            for &d in &ne {
                elems =
                    elems.checked_mul(d).ok_or_else(|| bad_tensor(path, &name, "element count overflows".into()))?;
            }
            let bs = dtype.block_size() as u64;
            if ne[0] % bs != 0 {
                return Err(bad_tensor(
                    path,
                    &name,
                    format!("row length {} is not a multiple of the {dtype:?} block size {bs}", ne[0]),
                ));
            }
            // 2^62 f32 values are 2^64 bytes: unchecked, the size wrapped to 0 and the tensor passed.
            let size = (elems / bs)
                .checked_mul(dtype.type_size() as u64)
                .ok_or_else(|| bad_tensor(path, &name, "byte size overflows".into()))?;
            let start = (data_start as u64).checked_add(offset);
            let end = start.and_then(|s| s.checked_add(size));
            let (Some(start), Some(end)) = (start, end) else {
                return Err(bad_tensor(path, &name, "offset overflows".into()));
            };
            if end > file_len as u64 {
                return Err(bad_tensor(
                    path,
                    &name,
                    format!("data [{start}, {end}) runs past the end of the file ({file_len} bytes)"),
                ));
            }
            // The spec requires aligned offsets; block structs are read in place and need it.
            if start % 4 != 0 {
                return Err(bad_tensor(path, &name, format!("misaligned data offset {start}")));
            }
            let shape: Vec<usize> = ne.iter().rev().map(|&d| d as usize).collect();
            if index.insert(name.clone(), tensors.len()).is_some() {
                return Err(bad_tensor(path, &name, "appears twice".into()));
            }
            tensors.push(TensorInfo { name, shape, dtype, offset: start as usize, size: size as usize });
        }
        // Tensors own disjoint bytes: with overlapping ranges, writing one (in place, or in a
        // tool that trusts the layout) would change another.
        let mut spans: Vec<&TensorInfo> = tensors.iter().filter(|t| t.size > 0).collect();
        spans.sort_by_key(|t| t.offset);
        if let Some(w) = spans.windows(2).find(|w| w[0].offset + w[0].size > w[1].offset) {
            return Err(bad_tensor(path, &w[1].name, format!("data overlaps tensor '{}'", w[0].name)));
        }
        Ok(Self { path: path.to_path_buf(), version, metadata, tensors, index, mmap })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    fn require(&self, name: &str) -> Result<&TensorInfo> {
        self.info(name).ok_or_else(|| Error::MissingTensor { path: self.path.clone(), tensor: name.into() })
    }

    /// The raw bytes of a tensor, straight from the map (no copy).
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self.require(name)?;
        Ok(&self.mmap[t.offset..t.offset + t.size])
    }

    /// A shared handle on the map plus the tensor's extent: lets kernels read blocks in place.
    pub fn mapped(&self, name: &str) -> Result<MappedTensor> {
        let t = self.require(name)?.clone();
        Ok(MappedTensor { map: self.mmap.clone(), info: t })
    }

    /// The tensor as a candle QTensor (copies the blocks).
    pub fn qtensor(&self, name: &str) -> Result<QTensor> {
        let t = self.require(name)?;
        let storage = QStorage::from_data(std::borrow::Cow::Borrowed(self.bytes(name)?), &Device::Cpu, t.dtype)?;
        Ok(QTensor::new(storage, t.shape.as_slice())?)
    }

    /// The tensor dequantised to f32.
    pub fn dequantize(&self, name: &str) -> Result<Tensor> {
        Ok(self.qtensor(name)?.dequantize(&Device::Cpu)?)
    }
}

fn bad_tensor(path: &Path, name: &str, what: String) -> Error {
    Error::BadTensor { path: path.into(), tensor: name.into(), what }
}

/// A tensor's blocks inside a shared memory map.
#[derive(Clone)]
pub struct MappedTensor {
    map: Arc<memmap2::Mmap>,
    pub info: TensorInfo,
}

impl MappedTensor {
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.info.offset..self.info.offset + self.info.size]
    }
}

/// Converts our metadata value into candle's, for writing.
fn to_candle_value(v: &Value) -> candle_core::quantized::gguf_file::Value {
    use candle_core::quantized::gguf_file::Value as C;
    match v {
        Value::U8(x) => C::U8(*x),
        Value::I8(x) => C::I8(*x),
        Value::U16(x) => C::U16(*x),
        Value::I16(x) => C::I16(*x),
        Value::U32(x) => C::U32(*x),
        Value::I32(x) => C::I32(*x),
        Value::U64(x) => C::U64(*x),
        Value::I64(x) => C::I64(*x),
        Value::F32(x) => C::F32(*x),
        Value::F64(x) => C::F64(*x),
        Value::Bool(x) => C::Bool(*x),
        Value::String(x) => C::String(x.clone()),
        Value::Array(x) => C::Array(x.iter().map(to_candle_value).collect()),
    }
}

/// Writes a GGUF file atomically (temporary file in the target folder, then rename).
pub fn write_gguf(path: &Path, metadata: &[(String, Value)], tensors: &[(String, QTensor)]) -> Result<()> {
    let meta: Vec<(String, candle_core::quantized::gguf_file::Value)> = metadata
        .iter()
        .filter(|(k, _)| k != "general.alignment")
        .map(|(k, v)| (k.clone(), to_candle_value(v)))
        .collect();
    let meta_refs: Vec<(&str, &candle_core::quantized::gguf_file::Value)> =
        meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    crate::atomic::write_with(path, |w| {
        candle_core::quantized::gguf_file::write(w, &meta_refs, &tensor_refs)?;
        Ok(())
    })
}

fn value_type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend(x.to_le_bytes()),
        Value::U16(x) => out.extend(x.to_le_bytes()),
        Value::I16(x) => out.extend(x.to_le_bytes()),
        Value::U32(x) => out.extend(x.to_le_bytes()),
        Value::I32(x) => out.extend(x.to_le_bytes()),
        Value::U64(x) => out.extend(x.to_le_bytes()),
        Value::I64(x) => out.extend(x.to_le_bytes()),
        Value::F32(x) => out.extend(x.to_le_bytes()),
        Value::F64(x) => out.extend(x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => put_string(out, s),
        Value::Array(items) => {
            out.extend(items.first().map_or(4, value_type_id).to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            items.iter().for_each(|i| put_value(out, i));
        }
    }
}

/// A tensor to be written by [`write_gguf_streaming`]: GGUF name, shape (row-major, as candle
/// has it) and type.
pub struct PlannedQ {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: GgmlDType,
}

/// Writes a GGUF v3 file whose tensors are produced one at a time by `produce(i)` (which must
/// return `plan[i]`'s shape and type): the header is laid out from the plan, so only one tensor
/// is in memory at once. Atomic like every output.
pub fn write_gguf_streaming(
    path: &Path,
    metadata: &[(String, Value)],
    plan: &[PlannedQ],
    mut produce: impl FnMut(usize) -> Result<QTensor>,
) -> Result<()> {
    const ALIGN: usize = 32;
    let pad = |n: usize| (ALIGN - n % ALIGN) % ALIGN;
    let meta: Vec<&(String, Value)> = metadata.iter().filter(|(k, _)| k != "general.alignment").collect();
    let mut head = Vec::new();
    head.extend(0x46554747u32.to_le_bytes());
    head.extend(3u32.to_le_bytes());
    head.extend((plan.len() as u64).to_le_bytes());
    head.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in &meta {
        put_string(&mut head, k);
        head.extend(value_type_id(v).to_le_bytes());
        put_value(&mut head, v);
    }
    let mut offset = 0usize;
    let mut sizes = Vec::with_capacity(plan.len());
    for t in plan {
        let n: usize = t.shape.iter().product();
        let bs = t.dtype.block_size();
        if n % bs != 0 {
            return Err(Error::Unsupported(format!(
                "tensor '{}': {n} values do not fill {:?} blocks of {bs}",
                t.name, t.dtype
            )));
        }
        let size = n / bs * t.dtype.type_size();
        put_string(&mut head, &t.name);
        head.extend((t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            head.extend((*d as u64).to_le_bytes());
        }
        head.extend(gguf_type_id(t.dtype).to_le_bytes());
        head.extend((offset as u64).to_le_bytes());
        sizes.push(size);
        offset += size + pad(size);
    }
    head.resize(head.len() + pad(head.len()), 0);
    crate::atomic::write_with(path, |w| {
        use std::io::Write;
        w.write_all(&head).map_err(|e| Error::io(path, e))?;
        for (i, t) in plan.iter().enumerate() {
            let q = produce(i)?;
            if q.dtype() != t.dtype || q.shape().dims() != t.shape.as_slice() {
                return Err(Error::BadTensor {
                    path: path.into(),
                    tensor: t.name.clone(),
                    what: format!(
                        "produced {:?} {:?}, planned {:?} {:?}",
                        q.dtype(),
                        q.shape().dims(),
                        t.dtype,
                        t.shape
                    ),
                });
            }
            let data = q.data()?;
            if data.len() != sizes[i] {
                return Err(Error::BadTensor {
                    path: path.into(),
                    tensor: t.name.clone(),
                    what: "unexpected size".into(),
                });
            }
            w.write_all(&data).map_err(|e| Error::io(path, e))?;
            w.write_all(&vec![0u8; pad(data.len())]).map_err(|e| Error::io(path, e))?;
        }
        Ok(())
    })
}

fn gguf_type_id(d: GgmlDType) -> u32 {
    (0..=30).find(|i| ggml_dtype_from_id(*i) == Some(d)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 file with no metadata and one F32 tensor of GGUF shape `ne` at data offset 0,
    /// followed by 64 data bytes.
    fn one_f32_tensor(ne: &[u64]) -> Vec<u8> {
        let mut b = vec![];
        b.extend(0x4655_4747u32.to_le_bytes());
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        put_string(&mut b, "t");
        b.extend((ne.len() as u32).to_le_bytes());
        ne.iter().for_each(|d| b.extend(d.to_le_bytes()));
        b.extend(gguf_type_id(GgmlDType::F32).to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.resize(b.len().div_ceil(32) * 32 + 64, 0);
        b
    }

    /// Found by recompose-fuzz: the byte size of 2^62 f32 values overflowed (a panic in debug
    /// builds, a 0-byte tensor of 2^62 elements accepted in release ones).
    #[test]
    fn a_tensor_whose_byte_size_overflows_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.gguf");
        std::fs::write(&p, one_f32_tensor(&[1 << 62])).unwrap();
        let e = GgufFile::open(&p).err().expect("accepted").to_string();
        assert!(e.contains("byte size overflows"), "{e}");
        std::fs::write(&p, one_f32_tensor(&[16])).unwrap();
        assert_eq!(GgufFile::open(&p).unwrap().tensors()[0].size, 64);
    }
}
