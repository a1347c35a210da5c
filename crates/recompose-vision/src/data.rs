//! Image data sets held in memory as f32 pixels in [0, 1], NCHW.
//!
//! Fashion-MNIST comes as IDX files (60k train / 10k test). CIFAR-10 is only available here as its
//! 10k test images (BIG-bench's hex JSON), so it is split once, by a fixed seed, into 8000 train
//! and 2000 test images, stratified by class.

use crate::error::{Error, Result};
use std::path::Path;

/// An in-memory labelled image set. Pixels are in [0, 1]; normalisation happens inside the model,
/// so attacks and corruptions work in pixel space.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// "fashion-mnist" or "cifar10".
    pub name: String,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// N * C * H * W values in [0, 1].
    pub images: Vec<f32>,
    pub labels: Vec<u8>,
    pub classes: Vec<String>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }
    pub fn image(&self, i: usize) -> &[f32] {
        let n = self.image_len();
        &self.images[i * n..(i + 1) * n]
    }

    /// The images at `idx`, in that order (indices must be < len).
    pub fn subset(&self, idx: &[usize]) -> Dataset {
        let (images, labels) = self.gather(idx);
        Dataset { images, labels, ..self.empty_like() }
    }

    /// At most `n` images of each class, picked by a seeded shuffle, in their original order:
    /// a small balanced set for quick runs.
    pub fn take_per_class(&self, n: usize, seed: u64) -> Dataset {
        let mut idx = vec![];
        for (c, mut members) in by_class(&self.labels, self.classes.len()).into_iter().enumerate() {
            shuffle(&mut members, mix(seed, c as u64));
            idx.extend(members.into_iter().take(n));
        }
        shuffle(&mut idx, mix(seed, u64::MAX));
        self.subset(&idx)
    }

    /// Per-channel mean and (population) standard deviation over all pixels.
    pub fn mean_std(&self) -> (Vec<f32>, Vec<f32>) {
        let plane = self.height * self.width;
        let mut sum = vec![0f64; self.channels];
        let mut sq = vec![0f64; self.channels];
        for img in self.images.chunks_exact(self.image_len().max(1)) {
            for (c, p) in img.chunks_exact(plane.max(1)).enumerate() {
                for &v in p {
                    sum[c] += v as f64;
                    sq[c] += (v as f64) * (v as f64);
                }
            }
        }
        let count = (self.len() * plane).max(1) as f64;
        let mean: Vec<f64> = sum.iter().map(|s| s / count).collect();
        let std = sq.iter().zip(&mean).map(|(s, m)| ((s / count - m * m).max(0.0)).sqrt() as f32).collect();
        (mean.into_iter().map(|m| m as f32).collect(), std)
    }

    /// Copies of the images and labels at `idx` (indices must be < len), ready for a tensor.
    pub fn batch(&self, idx: &[usize]) -> (Vec<f32>, Vec<u32>) {
        let (images, labels) = self.gather(idx);
        (images, labels.into_iter().map(u32::from).collect())
    }

    /// Training augmentation in place on `n` images of this set's shape: a random shift with zero
    /// padding (4 pixels for 32x32, 2 for 28x28) and, for CIFAR-10 only, a random horizontal flip.
    pub fn augment(&self, pixels: &mut [f32], n: usize, rng: &mut impl rand::Rng) {
        let (c, h, w) = (self.channels, self.height, self.width);
        let pad: i64 = if h >= 32 { 4 } else { 2 };
        let flips = self.name == "cifar10";
        let mut scratch = vec![0f32; self.image_len()];
        for img in pixels.chunks_exact_mut(self.image_len().max(1)).take(n) {
            let dy = rng.random_range(-pad..=pad) as isize;
            let dx = rng.random_range(-pad..=pad) as isize;
            let flip = flips && rng.random_bool(0.5);
            shift_flip(img, &mut scratch, c, h, w, dy, dx, flip);
        }
    }

    fn gather(&self, idx: &[usize]) -> (Vec<f32>, Vec<u8>) {
        let mut images = Vec::with_capacity(idx.len() * self.image_len());
        for &i in idx {
            images.extend_from_slice(self.image(i));
        }
        (images, idx.iter().map(|&i| self.labels[i]).collect())
    }

    fn empty_like(&self) -> Dataset {
        Dataset { images: vec![], labels: vec![], classes: self.classes.clone(), name: self.name.clone(), ..*self }
    }
}

/// Crop-with-padding and flip of one CHW image: out[y][x] = in[y + dy][x' + dx], zero outside,
/// where x' mirrors x when `flip`.
#[allow(clippy::too_many_arguments)]
fn shift_flip(img: &mut [f32], scratch: &mut [f32], c: usize, h: usize, w: usize, dy: isize, dx: isize, flip: bool) {
    scratch.copy_from_slice(img);
    for ch in 0..c {
        let plane = &scratch[ch * h * w..(ch + 1) * h * w];
        for y in 0..h {
            for x in 0..w {
                let sx = if flip { w - 1 - x } else { x } as isize + dx;
                let sy = y as isize + dy;
                let inside = sy >= 0 && sx >= 0 && (sy as usize) < h && (sx as usize) < w;
                img[ch * h * w + y * w + x] = if inside { plane[sy as usize * w + sx as usize] } else { 0.0 };
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

impl std::str::FromStr for Split {
    type Err = Error;
    fn from_str(s: &str) -> Result<Split> {
        match s {
            "train" => Ok(Split::Train),
            "test" => Ok(Split::Test),
            _ => Err(Error::Config(format!("unknown split '{s}' (known: train, test)"))),
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Test => "test",
        })
    }
}

/// Writes a data set (e.g. a corrupted copy) as safetensors: `images` f32 `[N, C, H, W]`, `labels`
/// u8 `[N]`, name and classes in the metadata. Atomic.
pub fn save_file(ds: &Dataset, path: &Path) -> Result<()> {
    let bytes: Vec<u8> = ds.images.iter().flat_map(|v| v.to_le_bytes()).collect();
    let shape = vec![ds.len(), ds.channels, ds.height, ds.width];
    let bad = |e: safetensors::SafeTensorError| Error::Data(format!("{}: {e}", path.display()));
    let views = vec![
        (
            "images".to_string(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &bytes).map_err(bad)?,
        ),
        (
            "labels".to_string(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![ds.len()], &ds.labels).map_err(bad)?,
        ),
    ];
    let meta = std::collections::HashMap::from([
        ("recompose.dataset".to_string(), ds.name.clone()),
        ("recompose.classes".to_string(), ds.classes.join("\n")),
    ]);
    let out = safetensors::serialize(views, Some(meta)).map_err(bad)?;
    recompose_core::atomic::write_bytes(path, &out)?;
    Ok(())
}

/// Reads a data file written by [`save_file`].
pub fn load_file(path: &Path) -> Result<Dataset> {
    let bad = |m: String| Error::Data(format!("{}: {m}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let images = st.tensor("images").map_err(|_| bad("no 'images' tensor (not a recompose data file)".into()))?;
    let labels = st.tensor("labels").map_err(|_| bad("no 'labels' tensor (not a recompose data file)".into()))?;
    let (&[n, c, h, w], safetensors::Dtype::F32) = (images.shape(), images.dtype()) else {
        return Err(bad(format!("'images' must be f32 [N, C, H, W], got {:?} {:?}", images.dtype(), images.shape())));
    };
    if labels.dtype() != safetensors::Dtype::U8 || labels.shape() != [n] {
        return Err(bad(format!("'labels' must be u8 [{n}], got {:?} {:?}", labels.dtype(), labels.shape())));
    }
    let meta = header.metadata().clone().unwrap_or_default();
    let classes: Vec<String> =
        meta.get("recompose.classes").map(|c| c.split('\n').map(String::from).collect()).unwrap_or_default();
    let labels = labels.data().to_vec();
    if let Some(l) = labels.iter().find(|&&l| l as usize >= classes.len().max(1)) {
        return Err(bad(format!("label {l} is out of range for {} classes", classes.len())));
    }
    let images: Vec<f32> =
        images.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    if images.iter().any(|v| !(0.0..=1.0).contains(v)) {
        return Err(bad("pixels must lie in [0, 1]".into()));
    }
    let name = meta.get("recompose.dataset").cloned().unwrap_or_else(|| "file".into());
    Ok(Dataset { name, channels: c, height: h, width: w, images, labels, classes })
}

/// A data set by name (`fashion-mnist`, `cifar10`) or from a `.safetensors` data file.
pub fn open(spec: &str, split: Split) -> Result<Dataset> {
    if spec.ends_with(".safetensors") {
        return load_file(Path::new(spec));
    }
    load(spec, split)
}

pub const DATASETS: [&str; 2] = ["fashion-mnist", "cifar10"];

/// A data set by name, fetching its asset when it is not cached.
pub fn load(name: &str, split: Split) -> Result<Dataset> {
    match name {
        "fashion-mnist" => fashion_mnist(&recompose_assets::ensure("fashion-mnist")?, split),
        "cifar10" => cifar10(&recompose_assets::main_file("cifar10-test")?, split),
        _ => Err(Error::Config(format!("unknown data set '{name}' (known: {})", DATASETS.join(", ")))),
    }
}

pub const FASHION_CLASSES: [&str; 10] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];

/// Fashion-MNIST from a folder holding the four unpacked IDX files.
pub fn fashion_mnist(dir: &Path, split: Split) -> Result<Dataset> {
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let (images, labels, height, width) =
        read_idx(&dir.join(format!("{prefix}-images-idx3-ubyte")), &dir.join(format!("{prefix}-labels-idx1-ubyte")))?;
    Ok(Dataset {
        name: "fashion-mnist".into(),
        channels: 1,
        height,
        width,
        images,
        labels,
        classes: FASHION_CLASSES.iter().map(|c| c.to_string()).collect(),
    })
}

/// Reads an IDX image file (u8, N x H x W) and its label file: (pixels in [0, 1], labels, H, W).
pub fn read_idx(images: &Path, labels: &Path) -> Result<(Vec<f32>, Vec<u8>, usize, usize)> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| Error::Data(format!("{}: cannot read: {e}", p.display())));
    let be = |b: &[u8], i: usize| u32::from_be_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]) as usize;

    let img = read(images)?;
    let bad = |what: String| Error::Data(format!("{}: {what}", images.display()));
    if img.len() < 16 {
        return Err(bad(format!("truncated IDX header ({} bytes)", img.len())));
    }
    if be(&img, 0) != 0x803 {
        return Err(bad(format!("not an IDX u8 image file (magic {:#010x}, expected 0x00000803)", be(&img, 0))));
    }
    let (n, h, w) = (be(&img, 1), be(&img, 2), be(&img, 3));
    let want = n.checked_mul(h).and_then(|v| v.checked_mul(w)).and_then(|v| v.checked_add(16));
    if want != Some(img.len()) {
        return Err(bad(format!("{n} images of {h}x{w} need {want:?} bytes, the file has {}", img.len())));
    }

    let lab = read(labels)?;
    let bad = |what: String| Error::Data(format!("{}: {what}", labels.display()));
    if lab.len() < 8 {
        return Err(bad(format!("truncated IDX header ({} bytes)", lab.len())));
    }
    if be(&lab, 0) != 0x801 {
        return Err(bad(format!("not an IDX u8 label file (magic {:#010x}, expected 0x00000801)", be(&lab, 0))));
    }
    let m = be(&lab, 1);
    if lab.len() != 8 + m {
        return Err(bad(format!("{m} labels need {} bytes, the file has {}", 8 + m, lab.len())));
    }
    if m != n {
        return Err(bad(format!("{m} labels for {n} images in {}", images.display())));
    }
    let labels = lab[8..].to_vec();
    if let Some(i) = labels.iter().position(|&l| l >= 10) {
        return Err(bad(format!("label {} of item {i} is not in 0..10", labels[i])));
    }
    Ok((img[16..].iter().map(|&b| b as f32 / 255.0).collect(), labels, h, w))
}

pub const CIFAR_CLASSES: [&str; 10] =
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

/// Seed of the fixed CIFAR-10 train/test split. It is a constant, not an option, so every run and
/// every report uses the same 2000 test images; changing it changes all CIFAR-10 numbers.
pub const CIFAR_SPLIT_SEED: u64 = 20_190_328;

/// Share of each class that goes to the test split.
const CIFAR_TEST_FRACTION: f64 = 0.2;

#[derive(serde::Deserialize)]
struct Task {
    examples: Vec<Example>,
}

#[derive(serde::Deserialize)]
struct Example {
    input: String,
    target_scores: serde_json::Value,
}

/// CIFAR-10 from BIG-bench's cifar10_classification/hex task.json (the 10k official test images),
/// split 80/20 per class by [`CIFAR_SPLIT_SEED`].
pub fn cifar10(task_json: &Path, split: Split) -> Result<Dataset> {
    let bad = |what: String| Error::Data(format!("{}: {what}", task_json.display()));
    let text = std::fs::read_to_string(task_json).map_err(|e| bad(format!("cannot read: {e}")))?;
    let task: Task = serde_json::from_str(&text).map_err(|e| bad(format!("not a BIG-bench task: {e}")))?;
    drop(text);
    let mut images = vec![0f32; task.examples.len() * 3 * 1024];
    let mut labels = Vec::with_capacity(task.examples.len());
    for (i, (ex, img)) in task.examples.iter().zip(images.chunks_exact_mut(3 * 1024)).enumerate() {
        parse_hex_image(&ex.input, img).map_err(|e| bad(format!("example {i}: {e}")))?;
        labels.push(parse_label(&ex.target_scores).map_err(|e| bad(format!("example {i}: {e}")))?);
    }
    let all = Dataset {
        name: "cifar10".into(),
        channels: 3,
        height: 32,
        width: 32,
        images,
        labels,
        classes: CIFAR_CLASSES.iter().map(|c| c.to_string()).collect(),
    };
    let (train, test) = stratified_split(&all.labels, 10, CIFAR_TEST_FRACTION, CIFAR_SPLIT_SEED);
    Ok(all.subset(match split {
        Split::Train => &train,
        Split::Test => &test,
    }))
}

/// 1024 "#rrggbb" pixels, row-major, into CHW planes; text around the pixels is ignored.
fn parse_hex_image(s: &str, out: &mut [f32]) -> std::result::Result<(), String> {
    let hex = |b: u8| (b as char).to_digit(16);
    let b = s.as_bytes();
    let mut n = 0;
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'#' {
            i += 1;
            continue;
        }
        let digits: Option<Vec<u32>> = b.get(i + 1..i + 7).and_then(|d| d.iter().map(|&c| hex(c)).collect());
        let d = digits.ok_or_else(|| format!("'#' at byte {i} is not followed by 6 hex digits"))?;
        if n < 1024 {
            for ch in 0..3 {
                out[ch * 1024 + n] = (d[2 * ch] * 16 + d[2 * ch + 1]) as f32 / 255.0;
            }
        }
        n += 1;
        i += 7;
    }
    if n != 1024 {
        return Err(format!("{n} pixels, expected 1024 (32x32)"));
    }
    Ok(())
}

/// The class whose score is 1, from a JSON object or a string holding a Python dict literal.
fn parse_label(scores: &serde_json::Value) -> std::result::Result<u8, String> {
    let pairs: Vec<(String, f64)> = match scores {
        serde_json::Value::Object(m) => m.iter().map(|(k, v)| (k.clone(), v.as_f64().unwrap_or(f64::NAN))).collect(),
        serde_json::Value::String(s) => {
            let body = s.trim().trim_start_matches('{').trim_end_matches('}');
            body.split(',')
                .filter(|p| !p.trim().is_empty())
                .map(|p| {
                    let (k, v) = p.split_once(':').unwrap_or((p, ""));
                    let k = k.trim().trim_matches(|c| c == '\'' || c == '"').to_string();
                    (k, v.trim().parse().unwrap_or(f64::NAN))
                })
                .collect()
        }
        _ => return Err("target_scores is neither an object nor a string".into()),
    };
    let hits: Vec<&str> = pairs.iter().filter(|(_, v)| *v == 1.0).map(|(k, _)| k.as_str()).collect();
    let [class] = hits[..] else {
        return Err(format!("target_scores should have exactly one class scored 1, has {}", hits.len()));
    };
    CIFAR_CLASSES.iter().position(|c| *c == class).map(|i| i as u8).ok_or_else(|| format!("unknown class '{class}'"))
}

/// Indices of each class, ascending.
fn by_class(labels: &[u8], classes: usize) -> Vec<Vec<usize>> {
    let mut out = vec![vec![]; classes];
    for (i, &l) in labels.iter().enumerate() {
        if let Some(v) = out.get_mut(l as usize) {
            v.push(i);
        }
    }
    out
}

/// A per-class shuffled split: round(count * test_fraction) of each class go to test. Both
/// halves are returned in ascending order.
pub fn stratified_split(labels: &[u8], classes: usize, test_fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let (mut train, mut test) = (vec![], vec![]);
    for (c, mut members) in by_class(labels, classes).into_iter().enumerate() {
        shuffle(&mut members, mix(seed, c as u64));
        let k = ((members.len() as f64 * test_fraction).round() as usize).min(members.len());
        test.extend_from_slice(&members[..k]);
        train.extend_from_slice(&members[k..]);
    }
    // Mixed order: the BIG-bench copy of CIFAR-10 is sorted by class, so any prefix of a sorted
    // split (a held-out batch, `--limit N`) would hold one or two classes only.
    shuffle(&mut train, mix(seed, u64::MAX));
    shuffle(&mut test, mix(seed, u64::MAX - 1));
    (train, test)
}

/// splitmix64: a fixed generator of our own, so the split cannot change with a rand upgrade.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn mix(seed: u64, k: u64) -> u64 {
    let mut s = seed ^ k.wrapping_mul(0xD1B5_4A32_D192_ED03);
    splitmix(&mut s)
}

/// Fisher-Yates with splitmix64.
fn shuffle(v: &mut [usize], seed: u64) {
    let mut state = seed;
    for i in (1..v.len()).rev() {
        let j = ((splitmix(&mut state) as u128 * (i as u128 + 1)) >> 64) as usize;
        v.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn write_idx(dir: &Path, n: usize, h: usize, w: usize, labels: &[u8]) -> (std::path::PathBuf, std::path::PathBuf) {
        let mut img = vec![0, 0, 8, 3];
        for d in [n, h, w] {
            img.extend_from_slice(&(d as u32).to_be_bytes());
        }
        img.extend((0..n * h * w).map(|i| (i % 256) as u8));
        let mut lab = vec![0, 0, 8, 1];
        lab.extend_from_slice(&(labels.len() as u32).to_be_bytes());
        lab.extend_from_slice(labels);
        let (pi, pl) = (dir.join("img"), dir.join("lab"));
        std::fs::write(&pi, img).unwrap();
        std::fs::write(&pl, lab).unwrap();
        (pi, pl)
    }

    #[test]
    fn idx_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let (pi, pl) = write_idx(d.path(), 3, 4, 5, &[0, 9, 4]);
        let (px, labels, h, w) = read_idx(&pi, &pl).unwrap();
        assert_eq!((h, w, labels), (4, 5, vec![0, 9, 4]));
        assert_eq!(px.len(), 60);
        assert_eq!(px[59], 59.0 / 255.0);
    }

    #[test]
    fn idx_errors_name_the_file() {
        let d = tempfile::tempdir().unwrap();
        let (pi, pl) = write_idx(d.path(), 3, 4, 5, &[0, 9, 4]);
        let full = std::fs::read(&pi).unwrap();

        std::fs::write(&pi, &full[..40]).unwrap();
        let e = read_idx(&pi, &pl).unwrap_err().to_string();
        assert!(e.contains("img") && e.contains("the file has 40"), "{e}");

        std::fs::write(&pi, &full[..10]).unwrap();
        let e = read_idx(&pi, &pl).unwrap_err().to_string();
        assert!(e.contains("truncated IDX header"), "{e}");

        let mut magic = full.clone();
        magic[3] = 1;
        std::fs::write(&pi, magic).unwrap();
        let e = read_idx(&pi, &pl).unwrap_err().to_string();
        assert!(e.contains("magic"), "{e}");

        std::fs::write(&pi, &full).unwrap();
        write_idx(d.path(), 3, 4, 5, &[0, 10, 4]);
        let e = read_idx(&pi, &pl).unwrap_err().to_string();
        assert!(e.contains("lab") && e.contains("label 10"), "{e}");

        write_idx(d.path(), 3, 4, 5, &[0, 1]);
        std::fs::write(&pi, &full).unwrap();
        let e = read_idx(&pi, &pl).unwrap_err().to_string();
        assert!(e.contains("2 labels for 3 images"), "{e}");

        let e = read_idx(&d.path().join("none"), &pl).unwrap_err().to_string();
        assert!(e.contains("none: cannot read"), "{e}");
    }

    fn hex_input(seed: u32) -> String {
        let rows: Vec<String> = (0..32)
            .map(|y| {
                (0..32).map(|x| format!("#{:02x}{:02x}{:02x}", (x * 8) as u8, (y * 8) as u8, seed as u8)).collect()
            })
            .collect();
        format!("'{}\n", rows.join("\n"))
    }

    #[test]
    fn cifar_json_with_both_target_forms() {
        let d = tempfile::tempdir().unwrap();
        let mut examples = vec![];
        for i in 0..20u32 {
            let class = CIFAR_CLASSES[(i % 10) as usize];
            let scores: serde_json::Map<String, serde_json::Value> =
                CIFAR_CLASSES.iter().map(|c| (c.to_string(), ((*c == class) as u8).into())).collect();
            let target = if i % 2 == 0 {
                serde_json::Value::Object(scores)
            } else {
                let items: Vec<String> = scores.iter().map(|(k, v)| format!("'{k}': {v}")).collect();
                serde_json::Value::String(format!("{{{}}}", items.join(", ")))
            };
            examples.push(serde_json::json!({"input": hex_input(i), "target_scores": target}));
        }
        let p = d.path().join("task.json");
        std::fs::write(&p, serde_json::json!({"name": "x", "examples": examples}).to_string()).unwrap();
        let test = cifar10(&p, Split::Test).unwrap();
        let train = cifar10(&p, Split::Train).unwrap();
        // 2 per class: round(0.4) = 0 go to test.
        assert_eq!((train.len(), test.len()), (20, 0));
        let mut labels = train.labels.clone();
        labels.sort_unstable();
        assert_eq!(labels, (0..20).map(|i| (i / 2) as u8).collect::<Vec<_>>());
        // The split shuffles: find example 3 by its blue channel (= example index).
        let k = (0..20).find(|&k| train.image(k)[2048 + 32 + 2] == 3.0 / 255.0).unwrap();
        assert_eq!(train.labels[k], 3);
        let img = train.image(k);
        // Pixel (y=1, x=2): R = x*8, G = y*8, B = example index.
        assert_eq!(img[32 + 2], 16.0 / 255.0);
        assert_eq!(img[1024 + 32 + 2], 8.0 / 255.0);
        assert_eq!(img[2048 + 32 + 2], 3.0 / 255.0);

        let mut short = hex_input(0);
        short.truncate(short.len() - 8);
        assert!(parse_hex_image(&short, &mut [0.0; 3072]).unwrap_err().contains("1023 pixels"));
        assert!(parse_hex_image("#12345g", &mut [0.0; 3072]).unwrap_err().contains("6 hex digits"));
        let two = serde_json::json!({"cat": 1, "dog": 1});
        assert!(parse_label(&two).unwrap_err().contains("exactly one"));
        assert_eq!(parse_label(&serde_json::json!("{'cat': 0, 'ship': 1}")).unwrap(), 8);
    }

    /// The BIG-bench CIFAR copy is sorted by class; a held-out batch taken from the front of the
    /// split held airplanes and automobiles only.
    #[test]
    fn split_of_class_sorted_labels_mixes_classes_in_every_prefix() {
        let sorted: Vec<u8> = (0..10_000).map(|i| (i / 1000) as u8).collect();
        let (train, test) = stratified_split(&sorted, 10, 0.2, CIFAR_SPLIT_SEED);
        for split in [&train, &test] {
            let prefix: std::collections::HashSet<u8> = split[..256].iter().map(|&i| sorted[i]).collect();
            assert_eq!(prefix.len(), 10, "the first 256 hold only classes {prefix:?}");
        }
    }

    #[test]
    fn split_is_stratified_disjoint_and_fixed() {
        let labels: Vec<u8> = (0..10_000).map(|i| ((i * 7) % 10) as u8).collect();
        let (train, test) = stratified_split(&labels, 10, 0.2, CIFAR_SPLIT_SEED);
        assert_eq!((train.len(), test.len()), (8000, 2000));
        for c in 0..10u8 {
            assert_eq!(test.iter().filter(|&&i| labels[i] == c).count(), 200);
        }
        let mut all: Vec<usize> = train.iter().chain(&test).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..10_000).collect::<Vec<_>>());
        assert_eq!(stratified_split(&labels, 10, 0.2, CIFAR_SPLIT_SEED), (train.clone(), test.clone()));
        assert_ne!(stratified_split(&labels, 10, 0.2, 1).1, test);
        // Not just the first 200 of each class.
        assert!(test.iter().any(|&i| i >= 2000));

        let uneven: Vec<u8> = (0..25).map(|i| (i % 2) as u8).collect();
        let (_, t) = stratified_split(&uneven, 2, 0.2, 0);
        assert_eq!(t.len(), 5);
        assert_eq!(t.iter().filter(|&&i| uneven[i] == 0).count(), 3); // round(13 * 0.2)
        assert_eq!(t.iter().filter(|&&i| uneven[i] == 1).count(), 2); // round(12 * 0.2)
    }

    fn toy(name: &str, c: usize, h: usize, w: usize, n: usize) -> Dataset {
        Dataset {
            name: name.into(),
            channels: c,
            height: h,
            width: w,
            images: (0..n * c * h * w).map(|i| (i % 97) as f32 / 96.0).collect(),
            labels: (0..n).map(|i| (i % 10) as u8).collect(),
            classes: CIFAR_CLASSES.iter().map(|c| c.to_string()).collect(),
        }
    }

    #[test]
    fn subsets_batches_and_stats() {
        let ds = toy("cifar10", 3, 4, 4, 30);
        let s = ds.subset(&[5, 2]);
        assert_eq!(s.labels, vec![5, 2]);
        assert_eq!(s.image(1), ds.image(2));
        let (px, lab) = ds.batch(&[7]);
        assert_eq!((px.as_slice(), lab), (ds.image(7), vec![7]));
        let t = ds.take_per_class(2, 1);
        assert_eq!(t.len(), 20);
        assert!((0..10).all(|c| t.labels.iter().filter(|&&l| l == c).count() == 2));
        assert_eq!(t.labels, ds.take_per_class(2, 1).labels);
        assert_eq!(ds.take_per_class(100, 1).len(), 30);

        let mut flat = toy("x", 2, 2, 2, 3);
        flat.images = [[0.5f32; 4], [0.0, 1.0, 0.0, 1.0]].concat().repeat(3);
        let (m, s) = flat.mean_std();
        assert_eq!(m, vec![0.5, 0.5]);
        assert_eq!(s, vec![0.0, 0.5]);
    }

    #[test]
    fn augment_keeps_shape_and_range_and_flips_exactly() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        for ds in [toy("cifar10", 3, 32, 32, 4), toy("fashion-mnist", 1, 28, 28, 4)] {
            let mut px = ds.images.clone();
            ds.augment(&mut px, 4, &mut rng);
            assert_eq!(px.len(), ds.images.len());
            assert!(px.iter().all(|v| (0.0..=1.0).contains(v)));
            assert_ne!(px, ds.images);
        }
        let (c, h, w) = (2, 3, 4);
        let orig: Vec<f32> = (0..c * h * w).map(|i| i as f32).collect();
        let mut img = orig.clone();
        shift_flip(&mut img, &mut vec![0.0; c * h * w], c, h, w, 0, 0, true);
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    assert_eq!(img[ch * h * w + y * w + x], orig[ch * h * w + y * w + (w - 1 - x)]);
                }
            }
        }
        // A shift right by one: column 0 is padding.
        let mut img = orig.clone();
        shift_flip(&mut img, &mut vec![0.0; c * h * w], c, h, w, 0, -1, false);
        assert_eq!(&img[..4], &[0.0, 0.0, 1.0, 2.0]);
    }

    /// Loads the real data when it is cached (`recompose fetch fashion-mnist cifar10-test`).
    #[test]
    fn real_data_sets_when_cached() {
        let home = recompose_assets::home();
        let counts =
            |ds: &Dataset| (0..10u8).map(|c| ds.labels.iter().filter(|&&l| l == c).count()).collect::<Vec<_>>();
        if home.join("fashion-mnist").is_dir() {
            let t = std::time::Instant::now();
            let train = load("fashion-mnist", Split::Train).unwrap();
            let test = load("fashion-mnist", Split::Test).unwrap();
            println!("fashion-mnist loaded in {:.2?}", t.elapsed());
            assert_eq!((train.len(), test.len(), train.height, train.width), (60_000, 10_000, 28, 28));
            assert_eq!(counts(&train), vec![6000; 10]);
            assert_eq!(counts(&test), vec![1000; 10]);
        } else {
            println!("skipped: no {}", home.join("fashion-mnist").display());
        }
        if home.join("cifar10-test").is_dir() {
            let t = std::time::Instant::now();
            let train = load("cifar10", Split::Train).unwrap();
            println!("cifar10 (train split) loaded in {:.2?}", t.elapsed());
            let test = load("cifar10", Split::Test).unwrap();
            assert_eq!((train.len(), test.len()), (8000, 2000));
            assert_eq!(counts(&train), vec![800; 10]);
            assert_eq!(counts(&test), vec![200; 10]);
            let (m, _) = test.mean_std();
            assert!(m.iter().all(|&v| (0.4..0.55).contains(&v)), "{m:?}");
        } else {
            println!("skipped: no {}", home.join("cifar10-test").display());
        }
    }
}
