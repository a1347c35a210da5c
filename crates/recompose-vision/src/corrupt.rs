//! CIFAR-10-C style corruptions (Hendrycks & Dietterich 2019) at severities 1..=5, applied to one
//! CHW image in [0, 1] at a time. Parameters follow the CIFAR tables of their make_cifar_c.py;
//! the implementations are our own, so numbers are close to, not identical with, CIFAR-10-C.

use crate::data::Dataset;
use crate::error::{Error, Result};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Corruption {
    GaussianNoise,
    ShotNoise,
    ImpulseNoise,
    GaussianBlur,
    Contrast,
    Brightness,
    Pixelate,
    Jpeg,
}

impl Corruption {
    pub const ALL: [Corruption; 8] = [
        Corruption::GaussianNoise,
        Corruption::ShotNoise,
        Corruption::ImpulseNoise,
        Corruption::GaussianBlur,
        Corruption::Contrast,
        Corruption::Brightness,
        Corruption::Pixelate,
        Corruption::Jpeg,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Corruption::GaussianNoise => "gaussian_noise",
            Corruption::ShotNoise => "shot_noise",
            Corruption::ImpulseNoise => "impulse_noise",
            Corruption::GaussianBlur => "gaussian_blur",
            Corruption::Contrast => "contrast",
            Corruption::Brightness => "brightness",
            Corruption::Pixelate => "pixelate",
            Corruption::Jpeg => "jpeg",
        }
    }

    /// Corrupts one CHW image in place; the result is clamped to [0, 1].
    pub fn apply(&self, img: &mut [f32], c: usize, h: usize, w: usize, severity: u8, rng: &mut impl Rng) -> Result<()> {
        let s = check_severity(severity)?;
        if img.len() != c * h * w || img.is_empty() {
            return Err(Error::Data(format!("image has {} values, expected {c}x{h}x{w}", img.len())));
        }
        match self {
            Corruption::GaussianNoise => {
                let sigma = [0.04, 0.06, 0.08, 0.09, 0.10][s];
                img.iter_mut().for_each(|v| *v += sigma * normal(rng) as f32);
            }
            Corruption::ShotNoise => {
                let lam = [500.0, 250.0, 100.0, 75.0, 50.0][s];
                img.iter_mut().for_each(|v| *v = (poisson(v.max(0.0) as f64 * lam, rng) / lam) as f32);
            }
            Corruption::ImpulseNoise => {
                // skimage's salt & pepper: each value is replaced with probability `amount`,
                // by 0 or 1 with equal odds.
                let amount = [0.01, 0.02, 0.03, 0.05, 0.07][s];
                for v in img.iter_mut() {
                    if rng.random_bool(amount) {
                        *v = if rng.random_bool(0.5) { 1.0 } else { 0.0 };
                    }
                }
            }
            Corruption::GaussianBlur => gaussian_blur(img, c, h, w, [0.4, 0.6, 0.7, 0.8, 1.0][s]),
            Corruption::Contrast => {
                // As in CIFAR-10-C, the mean is taken per channel of the image.
                let k = [0.75, 0.5, 0.4, 0.3, 0.15][s];
                for plane in img.chunks_exact_mut(h * w) {
                    let mean = plane.iter().sum::<f32>() / plane.len() as f32;
                    plane.iter_mut().for_each(|v| *v = (*v - mean) * k + mean);
                }
            }
            Corruption::Brightness => brightness(img, c, h * w, [0.05, 0.1, 0.15, 0.2, 0.3][s]),
            Corruption::Pixelate => pixelate(img, h, w, [0.95, 0.9, 0.85, 0.75, 0.65][s]),
            Corruption::Jpeg => jpeg(img, h, w, [80, 65, 58, 50, 40][s]),
        }
        img.iter_mut().for_each(|v| *v = v.clamp(0.0, 1.0));
        Ok(())
    }
}

impl std::fmt::Display for Corruption {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Corruption {
    type Err = Error;
    fn from_str(s: &str) -> Result<Corruption> {
        if s == "defocus_blur" {
            return Ok(Corruption::GaussianBlur);
        }
        Corruption::ALL.into_iter().find(|c| c.name() == s).ok_or_else(|| {
            let known: Vec<_> = Corruption::ALL.iter().map(|c| c.name()).collect();
            Error::Config(format!("unknown corruption '{s}' (known: {})", known.join(", ")))
        })
    }
}

fn check_severity(severity: u8) -> Result<usize> {
    if !(1..=5).contains(&severity) {
        return Err(Error::Config(format!("corruption severity {severity} is outside 1..=5")));
    }
    Ok(severity as usize - 1)
}

/// A corrupted copy of a data set. Each image gets its own rng seeded from (seed, index), so the
/// result is the same for a seed whatever the thread count.
pub fn corrupt_dataset(ds: &Dataset, corruption: Corruption, severity: u8, seed: u64) -> Result<Dataset> {
    check_severity(severity)?;
    let mut out = ds.clone();
    let (c, h, w) = (ds.channels, ds.height, ds.width);
    out.images.par_chunks_mut(ds.image_len().max(1)).enumerate().try_for_each(|(i, img)| {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        corruption.apply(img, c, h, w, severity, &mut rng)
    })?;
    Ok(out)
}

/// Standard normal by Box-Muller (no rand_distr dependency for one distribution).
pub(crate) fn normal(rng: &mut impl Rng) -> f64 {
    let u1 = 1.0 - rng.random::<f64>(); // in (0, 1], so ln is finite
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Poisson sample: Knuth's product of uniforms for small means, a rounded normal for large ones
/// (where Knuth needs ~mean draws and the normal approximation is already close).
fn poisson(mean: f64, rng: &mut impl Rng) -> f64 {
    if mean < 30.0 {
        let limit = (-mean).exp();
        let (mut k, mut p) = (0.0, rng.random::<f64>());
        while p > limit {
            k += 1.0;
            p *= rng.random::<f64>();
        }
        k
    } else {
        (mean + mean.sqrt() * normal(rng)).round().max(0.0)
    }
}

/// Index into 0..n with symmetric reflection at the edges (d c b a | a b c d | d c b a), as
/// scipy's 'reflect' mode.
fn reflect(mut i: isize, n: usize) -> usize {
    let n = n as isize;
    loop {
        if i < 0 {
            i = -i - 1;
        } else if i >= n {
            i = 2 * n - i - 1;
        } else {
            return i as usize;
        }
    }
}

/// Separable Gaussian blur per channel, kernel radius round(4 sigma) as in scipy.
fn gaussian_blur(img: &mut [f32], c: usize, h: usize, w: usize, sigma: f32) {
    let r = (4.0 * sigma + 0.5) as isize;
    let mut k: Vec<f32> = (-r..=r).map(|d| (-(d * d) as f32 / (2.0 * sigma * sigma)).exp()).collect();
    let total: f32 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= total);
    let mut tmp = vec![0f32; h * w];
    for plane in img.chunks_exact_mut(h * w).take(c) {
        for y in 0..h {
            for x in 0..w {
                tmp[y * w + x] = k
                    .iter()
                    .enumerate()
                    .map(|(j, kv)| kv * plane[y * w + reflect(x as isize + j as isize - r, w)])
                    .sum();
            }
        }
        for y in 0..h {
            for x in 0..w {
                plane[y * w + x] =
                    k.iter().enumerate().map(|(j, kv)| kv * tmp[reflect(y as isize + j as isize - r, h) * w + x]).sum();
            }
        }
    }
}

/// CIFAR-10-C raises the HSV value channel. With hue and saturation fixed, every RGB channel is
/// proportional to V, so that is a rescale by V'/V (and a grey of level V' where V = 0), done
/// here without the round trip through HSV. Other channel counts just get the offset added.
fn brightness(img: &mut [f32], c: usize, plane: usize, b: f32) {
    if c != 3 {
        img.iter_mut().for_each(|v| *v += b);
        return;
    }
    for p in 0..plane {
        let rgb = [img[p], img[plane + p], img[2 * plane + p]].map(|v| v.clamp(0.0, 1.0));
        let v = rgb[0].max(rgb[1]).max(rgb[2]);
        let v2 = (v + b).min(1.0);
        for (ch, x) in rgb.into_iter().enumerate() {
            img[ch * plane + p] = if v > 0.0 { x * v2 / v } else { v2 };
        }
    }
}

/// Box-averages cells of a round(h f) x round(w f) grid and paints each cell with its mean:
/// a downscale followed by a nearest-neighbour upscale back to h x w.
fn pixelate(img: &mut [f32], h: usize, w: usize, f: f32) {
    let sh = ((h as f32 * f).round() as usize).clamp(1, h);
    let sw = ((w as f32 * f).round() as usize).clamp(1, w);
    for plane in img.chunks_exact_mut(h * w) {
        for i in 0..sh {
            let (y0, y1) = (i * h / sh, (i + 1) * h / sh);
            for j in 0..sw {
                let (x0, x1) = (j * w / sw, (j + 1) * w / sw);
                let mut sum = 0.0;
                for y in y0..y1 {
                    sum += plane[y * w + x0..y * w + x1].iter().sum::<f32>();
                }
                let mean = sum / ((y1 - y0) * (x1 - x0)) as f32;
                for y in y0..y1 {
                    plane[y * w + x0..y * w + x1].fill(mean);
                }
            }
        }
    }
}

/// The JPEG standard's luminance quantisation table (Annex K), row-major.
const JPEG_LUMA: [u16; 64] = [
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51,
    87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92, 49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99,
];

/// JPEG-like compression: 8x8 block DCT, quantisation by the luminance table scaled for `quality`
/// as libjpeg does, inverse DCT, rounding to 8-bit levels. Each channel is coded on its own with
/// the luminance table: no YCbCr conversion and no chroma subsampling, so colour artefacts are
/// milder than real JPEG's. Edge blocks are padded by repeating the last row/column.
fn jpeg(img: &mut [f32], h: usize, w: usize, quality: u32) {
    let q = quality.clamp(1, 100);
    let scale = if q < 50 { 5000 / q } else { 200 - 2 * q };
    let table: Vec<f32> = JPEG_LUMA.iter().map(|&t| ((t as u32 * scale + 50) / 100).clamp(1, 255) as f32).collect();
    // cos_t[u * 8 + x] = a(u) cos((2x + 1) u pi / 16): the orthonormal DCT-II, which equals JPEG's.
    let mut cos_t = [0f32; 64];
    for u in 0..8 {
        let a = if u == 0 { (1.0f32 / 8.0).sqrt() } else { 0.5 };
        for x in 0..8 {
            cos_t[u * 8 + x] = a * (((2 * x + 1) * u) as f32 * std::f32::consts::PI / 16.0).cos();
        }
    }
    let mut block = [0f32; 64];
    let mut tmp = [0f32; 64];
    for plane in img.chunks_exact_mut(h * w) {
        for by in (0..h).step_by(8) {
            for bx in (0..w).step_by(8) {
                for y in 0..8 {
                    for x in 0..8 {
                        let (sy, sx) = ((by + y).min(h - 1), (bx + x).min(w - 1));
                        block[y * 8 + x] = plane[sy * w + sx] * 255.0 - 128.0;
                    }
                }
                dct(&block, &mut tmp, &cos_t, false);
                for (v, t) in tmp.iter_mut().zip(&table) {
                    *v = (*v / t).round() * t;
                }
                dct(&tmp, &mut block, &cos_t, true);
                for y in 0..8.min(h - by) {
                    for x in 0..8.min(w - bx) {
                        plane[(by + y) * w + bx + x] = ((block[y * 8 + x] + 128.0).round().clamp(0.0, 255.0)) / 255.0;
                    }
                }
            }
        }
    }
}

/// 2-D DCT of an 8x8 block (C X C^T), or its inverse (C^T X C) when `inverse`.
fn dct(src: &[f32; 64], dst: &mut [f32; 64], cos_t: &[f32; 64], inverse: bool) {
    let m = |a: usize, b: usize| if inverse { cos_t[b * 8 + a] } else { cos_t[a * 8 + b] };
    let mut rows = [0f32; 64];
    for u in 0..8 {
        for x in 0..8 {
            rows[u * 8 + x] = (0..8).map(|y| m(u, y) * src[y * 8 + x]).sum();
        }
    }
    for u in 0..8 {
        for v in 0..8 {
            dst[u * 8 + v] = (0..8).map(|x| rows[u * 8 + x] * m(v, x)).sum();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;

    /// Smooth random images: a few low-frequency waves in [0.1, 0.9].
    fn smooth(n: usize, c: usize, h: usize, w: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut out = vec![];
        for _ in 0..n * c {
            let waves: Vec<[f32; 4]> = (0..3)
                .map(|_| [rng.random_range(0.0..0.4), rng.random_range(0.0..0.4), rng.random_range(0.0..6.3), 0.0])
                .collect();
            for y in 0..h {
                for x in 0..w {
                    let s: f32 = waves.iter().map(|[fy, fx, ph, _]| (fy * y as f32 + fx * x as f32 + ph).sin()).sum();
                    out.push(0.5 + 0.4 * s / 3.0);
                }
            }
        }
        out
    }

    fn set(c: usize, h: usize, w: usize, n: usize) -> Dataset {
        Dataset {
            name: "cifar10".into(),
            channels: c,
            height: h,
            width: w,
            images: smooth(n, c, h, w, 7),
            labels: vec![0; n],
            classes: vec!["a".into()],
        }
    }

    fn mean_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32
    }

    #[test]
    fn every_corruption_keeps_shape_and_range() {
        for (c, h, w) in [(3, 32, 32), (1, 28, 28), (3, 5, 7)] {
            let ds = set(c, h, w, 2);
            for k in Corruption::ALL {
                for s in 1..=5 {
                    let out = corrupt_dataset(&ds, k, s, 1).unwrap();
                    assert_eq!(out.images.len(), ds.images.len(), "{k} {s}");
                    assert!(out.images.iter().all(|v| (0.0..=1.0).contains(v)), "{k} {s} {c}x{h}x{w}");
                    // A 5x7 image is too small for mild pixelation to change anything.
                    if h >= 28 {
                        assert!(mean_abs_diff(&out.images, &ds.images) > 0.0, "{k} {s} {c}x{h}x{w} did nothing");
                    }
                }
            }
        }
    }

    #[test]
    fn higher_severity_moves_further() {
        for (c, h, w) in [(3, 32, 32), (1, 28, 28)] {
            let ds = set(c, h, w, 8);
            for k in Corruption::ALL {
                let d: Vec<f32> = (1..=5)
                    .map(|s| mean_abs_diff(&corrupt_dataset(&ds, k, s, 3).unwrap().images, &ds.images))
                    .collect();
                assert!(d.windows(2).all(|p| p[1] >= p[0] - 1e-3), "{k} {c}x{h}x{w}: {d:?}");
                assert!(d[4] > d[0], "{k}: {d:?}");
            }
        }
    }

    #[test]
    fn same_seed_same_result() {
        let ds = set(3, 32, 32, 4);
        for k in [Corruption::GaussianNoise, Corruption::ShotNoise, Corruption::ImpulseNoise] {
            let a = corrupt_dataset(&ds, k, 3, 9).unwrap().images;
            assert_eq!(a, corrupt_dataset(&ds, k, 3, 9).unwrap().images);
            assert_ne!(a, corrupt_dataset(&ds, k, 3, 10).unwrap().images);
        }
    }

    #[test]
    fn jpeg_at_quality_100_is_nearly_identity() {
        let (h, w) = (28, 28);
        let orig = smooth(1, 3, h, w, 1);
        let mut img = orig.clone();
        jpeg(&mut img, h, w, 100);
        let max = orig.iter().zip(&img).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(max < 0.01, "{max}");
    }

    #[test]
    fn blur_of_a_constant_is_constant_and_brightness_keeps_hue() {
        let mut flat = vec![0.3f32; 3 * 8 * 8];
        gaussian_blur(&mut flat, 3, 8, 8, 1.0);
        assert!(flat.iter().all(|v| (v - 0.3).abs() < 1e-5));
        let mut px = vec![0.2, 0.4, 0.0]; // one RGB pixel
        brightness(&mut px, 3, 1, 0.2);
        assert!((px[0] - 0.3).abs() < 1e-6 && (px[1] - 0.6).abs() < 1e-6 && px[2] == 0.0, "{px:?}");
    }

    #[test]
    fn bad_severity_and_name_are_errors() {
        let ds = set(1, 4, 4, 1);
        for s in [0, 6] {
            let e = corrupt_dataset(&ds, Corruption::Contrast, s, 0).unwrap_err().to_string();
            assert!(e.contains("outside 1..=5"), "{e}");
        }
        let mut rng = StdRng::seed_from_u64(0);
        let e = Corruption::Jpeg.apply(&mut [0.5; 3], 1, 2, 2, 1, &mut rng).unwrap_err().to_string();
        assert!(e.contains("expected 1x2x2"), "{e}");
        let e = "fog".parse::<Corruption>().unwrap_err().to_string();
        assert!(e.contains("unknown corruption 'fog'") && e.contains("jpeg"), "{e}");
        assert_eq!("defocus_blur".parse::<Corruption>().unwrap(), Corruption::GaussianBlur);
        for k in Corruption::ALL {
            assert_eq!(k.to_string().parse::<Corruption>().unwrap(), k);
        }
    }
}
