//! Dropping parts of a task vector before it is merged: by magnitude (TIES), by magnitude with the
//! largest outliers removed too (breadcrumbs), at random (DARE), at random with magnitude-ranked
//! keep probabilities (DELLA); then, optionally, rescaling what is left.

use crate::error::{Error, Result};
use rand::Rng;

/// How the survivors are rescaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rescale {
    None,
    /// mergekit: match the L1 norm of the vector before dropping.
    L1,
    /// The DARE/DELLA papers: divide each survivor by its keep probability.
    Density,
}

/// Indices of the `k` largest |x| (ties broken by index).
fn top_k(x: &[f32], k: usize) -> Vec<bool> {
    let mut keep = vec![false; x.len()];
    if k == 0 {
        return keep;
    }
    if k >= x.len() {
        return vec![true; x.len()];
    }
    let mut mags: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    let (_, thr, _) = mags.select_nth_unstable_by(x.len() - k, |a, b| a.total_cmp(b));
    let thr = *thr;
    let mut left = k;
    for (i, v) in x.iter().enumerate() {
        if v.abs() > thr {
            keep[i] = true;
            left -= 1;
        }
    }
    for (i, v) in x.iter().enumerate() {
        if left == 0 {
            break;
        }
        if v.abs() == thr && !keep[i] {
            keep[i] = true;
            left -= 1;
        }
    }
    keep
}

fn apply_mask(x: &[f32], keep: &[bool], rescale: Rescale) -> Vec<f32> {
    let masked: Vec<f32> = x.iter().zip(keep).map(|(v, k)| if *k { *v } else { 0.0 }).collect();
    if rescale != Rescale::L1 {
        return masked;
    }
    let before: f64 = x.iter().map(|v| v.abs() as f64).sum();
    let after: f64 = masked.iter().map(|v| v.abs() as f64).sum();
    if before < 1e-7 || after < 1e-7 {
        return masked;
    }
    let s = (before / after) as f32;
    masked.into_iter().map(|v| v * s).collect()
}

/// TIES: keep the `density` fraction of largest magnitudes.
pub fn magnitude(x: &[f32], density: f64, rescale: Rescale, tensor: &str) -> Result<Vec<f32>> {
    if density >= 1.0 {
        return Ok(x.to_vec());
    }
    // At least one element survives (mergekit 0.1.5), however small the density.
    let k = ((density * x.len() as f64) as usize).max(1);
    if !(density > 0.0) {
        return Err(Error::Config(format!("density {density} for tensor '{tensor}' must be above 0")));
    }
    Ok(apply_mask(x, &top_k(x, k), rescale))
}

/// Breadcrumbs: drop the `gamma` fraction of largest magnitudes and the smallest, keeping `density`.
pub fn magnitude_outliers(x: &[f32], density: f64, gamma: f64, rescale: Rescale) -> Vec<f32> {
    if density >= 1.0 {
        return x.to_vec();
    }
    let n = x.len();
    let target = (density * n as f64) as usize;
    let mut n_top = (gamma * n as f64) as usize;
    let n_bot = n.saturating_sub(target + n_top);
    if n_bot == 0 {
        n_top = n - target;
    }
    // Keep ranks [n_bot, n - n_top) in ascending magnitude: the top `n - n_bot` minus the top `n_top`.
    let upper = top_k(x, n - n_bot);
    let top = top_k(x, n_top);
    let keep: Vec<bool> = upper.iter().zip(&top).map(|(u, t)| *u && !*t).collect();
    apply_mask(x, &keep, rescale)
}

/// DARE: keep each element with probability `density`.
pub fn bernoulli(x: &[f32], density: f64, rescale: Rescale, rng: &mut impl Rng) -> Vec<f32> {
    if density >= 1.0 {
        return x.to_vec();
    }
    let keep: Vec<bool> = x.iter().map(|_| rng.random::<f64>() < density).collect();
    if rescale == Rescale::Density {
        let s = (1.0 / density) as f32;
        return x.iter().zip(&keep).map(|(v, k)| if *k { v * s } else { 0.0 }).collect();
    }
    apply_mask(x, &keep, rescale)
}

/// DELLA's MagPrune: within each row, keep probabilities rise linearly with magnitude rank from
/// `density - epsilon` (smallest) to `density + epsilon` (largest).
pub fn della_magprune(
    x: &[f32],
    row_len: usize,
    density: f64,
    epsilon: f64,
    rescale: Rescale,
    rng: &mut impl Rng,
) -> Result<Vec<f32>> {
    if density >= 1.0 {
        return Ok(x.to_vec());
    }
    if density <= 0.0 {
        return Ok(vec![0.0; x.len()]);
    }
    if density + epsilon >= 1.0 || density - epsilon <= 0.0 {
        return Err(Error::Config(format!("della: epsilon {epsilon} must keep density ± epsilon inside (0, 1)")));
    }
    let row_len = row_len.max(1);
    let mut keep = vec![false; x.len()];
    let mut prob = vec![1.0f64; x.len()];
    let mut order: Vec<usize> = Vec::with_capacity(row_len);
    for (r, row) in x.chunks(row_len).enumerate() {
        order.clear();
        order.extend(0..row.len());
        order.sort_by(|&a, &b| row[a].abs().total_cmp(&row[b].abs()));
        let denom = (row.len().max(2) - 1) as f64;
        for (rank, &i) in order.iter().enumerate() {
            let p = density - epsilon + (rank as f64 / denom) * 2.0 * epsilon;
            prob[r * row_len + i] = p;
        }
    }
    for (k, p) in keep.iter_mut().zip(&prob) {
        *k = rng.random::<f64>() < *p;
    }
    if rescale == Rescale::Density {
        return Ok(x.iter().zip(&keep).zip(&prob).map(|((v, k), p)| if *k { v / *p as f32 } else { 0.0 }).collect());
    }
    Ok(apply_mask(x, &keep, rescale))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn magnitude_keeps_the_largest_and_matches_l1() {
        let x = [0.1f32, -3.0, 0.5, 2.0, -0.2, 0.0];
        let y = magnitude(&x, 0.5, Rescale::None, "t").unwrap();
        assert_eq!(y, vec![0.0, -3.0, 0.5, 2.0, 0.0, 0.0]);
        let z = magnitude(&x, 0.5, Rescale::L1, "t").unwrap();
        let l1 = |v: &[f32]| v.iter().map(|a| a.abs()).sum::<f32>();
        assert!((l1(&z) - l1(&x)).abs() < 1e-5);
        assert_eq!(magnitude(&x, 0.1, Rescale::None, "t").unwrap(), vec![0.0, -3.0, 0.0, 0.0, 0.0, 0.0]);
        assert!(magnitude(&x, 0.0, Rescale::None, "t").is_err());
    }

    #[test]
    fn breadcrumbs_drops_both_ends() {
        let x: Vec<f32> = (1..=10).map(|i| i as f32).collect();
        // density 0.5, gamma 0.1: drop the top 1 and the bottom 4.
        let y = magnitude_outliers(&x, 0.5, 0.1, Rescale::None);
        assert_eq!(y, vec![0., 0., 0., 0., 5., 6., 7., 8., 9., 0.]);
    }

    #[test]
    fn bernoulli_keeps_about_density_and_is_seeded() {
        let x = vec![1.0f32; 20000];
        let mut a = rand::rngs::StdRng::seed_from_u64(7);
        let mut b = rand::rngs::StdRng::seed_from_u64(7);
        let y = bernoulli(&x, 0.3, Rescale::Density, &mut a);
        assert_eq!(y, bernoulli(&x, 0.3, Rescale::Density, &mut b));
        let kept = y.iter().filter(|v| **v != 0.0).count() as f64 / x.len() as f64;
        assert!((kept - 0.3).abs() < 0.02, "{kept}");
        assert!(y.iter().all(|v| *v == 0.0 || (*v - 1.0 / 0.3).abs() < 1e-5));
    }

    #[test]
    fn della_prefers_large_magnitudes() {
        let x: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut low = 0;
        let mut high = 0;
        for _ in 0..20 {
            let y = della_magprune(&x, 1000, 0.5, 0.4, Rescale::None, &mut rng).unwrap();
            low += y[..100].iter().filter(|v| **v != 0.0).count();
            high += y[900..].iter().filter(|v| **v != 0.0).count();
        }
        // keep probability ~0.14 at the bottom, ~0.86 at the top
        assert!(low < 400 && high > 1600, "{low} {high}");
        assert!(della_magprune(&x, 1000, 0.5, 0.5, Rescale::None, &mut rng).is_err());
    }
}
