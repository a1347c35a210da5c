//! Experts without domain labels (Read-ME's clustering mode): calibration tokens clustered by
//! their FFN activation patterns with balanced k-means, one expert per cluster. A token's
//! feature is its |a| at a few layers spread through the model, each layer's part L2-normalised;
//! the clusters are found on every `every`-th token, then every token goes to its nearest
//! centroid and each cluster's channel statistics are summed as a domain's would be.

use crate::stats::{observe, Sink};
use crate::{ChannelStats, Error, Result};
use recompose_llm::lora::uniform;
use recompose_llm::Model;
use std::sync::{Arc, Mutex};

/// The layers a token's feature is read at: a quarter, half and three quarters of the way.
pub fn feature_layers(layers: usize) -> Vec<usize> {
    let mut l: Vec<usize> = [1, 2, 3].iter().map(|q| (q * layers / 4).min(layers.saturating_sub(1))).collect();
    l.dedup();
    l
}

fn squared(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Balanced k-means: `k` centroids over `points` (all the same length) and each point's cluster,
/// no cluster holding more than `ceil(n / k)` points. Seeded k-means++ start; each round assigns
/// point-cluster pairs in order of distance while clusters have room, then moves the centroids
/// to their means; stops after `rounds` rounds or when nothing moves.
pub fn balanced_kmeans(points: &[Vec<f32>], k: usize, rounds: usize, seed: u64) -> Result<(Vec<Vec<f32>>, Vec<u32>)> {
    let n = points.len();
    if k < 2 || n < k {
        return Err(Error::Config(format!("{k} clusters of {n} points: at least 2 clusters and a point each")));
    }
    let dims = points[0].len();
    if points.iter().any(|p| p.len() != dims) {
        return Err(Error::Data("clustering: points of different lengths".into()));
    }
    // k-means++: each next centroid drawn with probability proportional to the squared distance
    // to the nearest one so far.
    let mut centroids = vec![points[(uniform(seed, 0) * n as f64) as usize % n].clone()];
    let mut near: Vec<f32> = points.iter().map(|p| squared(p, &centroids[0])).collect();
    for c in 1..k {
        let total: f64 = near.iter().map(|&d| d as f64).sum();
        let mut at = uniform(seed, c as u64) * total;
        let mut pick = n - 1;
        for (i, &d) in near.iter().enumerate() {
            at -= d as f64;
            if at <= 0.0 {
                pick = i;
                break;
            }
        }
        centroids.push(points[pick].clone());
        for (d, p) in near.iter_mut().zip(points) {
            *d = d.min(squared(p, &centroids[c]));
        }
    }
    let cap = n.div_ceil(k);
    let mut assign = vec![u32::MAX; n];
    for _ in 0..rounds.max(1) {
        let mut pairs: Vec<(f32, u32, u32)> = Vec::with_capacity(n * k);
        for (i, p) in points.iter().enumerate() {
            for (c, m) in centroids.iter().enumerate() {
                pairs.push((squared(p, m), i as u32, c as u32));
            }
        }
        pairs.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let mut next = vec![u32::MAX; n];
        let mut room = vec![cap; k];
        for (_, i, c) in pairs {
            if next[i as usize] == u32::MAX && room[c as usize] > 0 {
                next[i as usize] = c;
                room[c as usize] -= 1;
            }
        }
        let moved = next != assign;
        assign = next;
        let mut sums = vec![vec![0f64; dims]; k];
        let mut counts = vec![0usize; k];
        for (p, &c) in points.iter().zip(&assign) {
            counts[c as usize] += 1;
            for (s, v) in sums[c as usize].iter_mut().zip(p) {
                *s += *v as f64;
            }
        }
        for ((m, s), &cnt) in centroids.iter_mut().zip(&sums).zip(&counts) {
            if cnt > 0 {
                m.iter_mut().zip(s).for_each(|(m, s)| *m = (*s / cnt as f64) as f32);
            }
        }
        if !moved {
            break;
        }
    }
    Ok((centroids, assign))
}

/// A token's feature from its |a| at the feature layers (each part L2-normalised).
fn feature(parts: &[&[f32]]) -> Vec<f32> {
    let mut f = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        let norm = p.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        f.extend(p.iter().map(|v| v / norm));
    }
    f
}

/// `k` experts' worth of channel statistics from `rows` without labels: balanced k-means on every
/// `every`-th token's activation feature, then every token's |a| summed into its nearest
/// cluster's statistics (named `cluster0`, `cluster1`, ...). Two passes over the rows.
pub fn cluster_stats(
    model: &mut Model,
    rows: &[Vec<u32>],
    k: usize,
    every: usize,
    seed: u64,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<ChannelStats>> {
    let layers = model.layers.len();
    let at = feature_layers(layers);
    let every = every.max(1);
    // Pass 1: the sampled tokens' features, layer part by layer part.
    let feats: Arc<Mutex<Vec<Vec<Vec<f32>>>>> =
        Arc::new(Mutex::new(rows.iter().map(|r| vec![vec![]; r.len().div_ceil(every)]).collect()));
    let (f, at1) = (feats.clone(), at.clone());
    let sink: Arc<Sink> = Arc::new(move |row, layer, _x: &candle_core::Tensor, a: &[Vec<f32>]| {
        if !at1.contains(&layer) {
            return;
        }
        if let Ok(mut f) = f.lock() {
            for (t, act) in a.iter().enumerate().step_by(every) {
                f[row][t / every].extend(feature(&[act]));
            }
        }
    });
    let total = 2 * rows.len();
    observe(model, rows, sink, |d, _| progress(d, total))?;
    let points: Vec<Vec<f32>> =
        feats.lock().map_err(|_| Error::Data("features poisoned".into()))?.iter().flatten().cloned().collect();
    let (centroids, _) = balanced_kmeans(&points, k, 20, seed)?;
    // Pass 2: every token to its nearest centroid, its |a| of every layer into that cluster.
    let channels: Vec<usize> = model.layers.iter().map(|b| b.ffn.as_dense().map_or(0, |d| d.gate.dims().0)).collect();
    let sums =
        Arc::new(Mutex::new((vec![channels.iter().map(|&c| vec![0f64; c]).collect::<Vec<_>>(); k], vec![0u64; k])));
    let buffer: Arc<Mutex<Vec<Vec<Vec<f32>>>>> = Arc::new(Mutex::new(vec![vec![]; layers]));
    let (s, b) = (sums.clone(), buffer.clone());
    let sink: Arc<Sink> = Arc::new(move |_row, layer, _x: &candle_core::Tensor, a: &[Vec<f32>]| {
        let (Ok(mut b), Ok(mut s)) = (b.lock(), s.lock()) else { return };
        b[layer] = a.to_vec();
        if layer + 1 < layers {
            return;
        }
        let (sums, counts) = &mut *s;
        for t in 0..a.len() {
            let parts: Vec<&[f32]> = at.iter().map(|&l| b[l][t].as_slice()).collect();
            let f = feature(&parts);
            let dist: Vec<f32> = centroids.iter().map(|m| squared(&f, m)).collect();
            let c = (0..k).min_by(|&x, &y| dist[x].total_cmp(&dist[y])).unwrap_or(0);
            counts[c] += 1;
            for (l, layer_sums) in sums[c].iter_mut().enumerate() {
                layer_sums.iter_mut().zip(&b[l][t]).for_each(|(x, v)| *x += *v as f64);
            }
        }
    });
    observe(model, rows, sink, |d, _| progress(rows.len() + d, total))?;
    let (sums, counts) = sums.lock().map_err(|_| Error::Data("cluster statistics poisoned".into()))?.clone();
    Ok(sums
        .into_iter()
        .zip(counts)
        .enumerate()
        .map(|(c, (sums, tokens))| ChannelStats { name: format!("cluster{c}"), sums, tokens })
        .collect())
}
