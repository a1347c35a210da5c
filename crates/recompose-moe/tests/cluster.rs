//! The clustering mode: balanced k-means on blobs it must find and blobs too big for a cluster,
//! and cluster statistics that add up to the statistics of all tokens.

use candle_core::DType;
use recompose_llm::WeightMode;
use recompose_moe::cluster::{balanced_kmeans, cluster_stats};
use recompose_moe::stats;

mod common;
use common::tiny;

/// `sizes[b]` points around centre `b` (one-hot times 10) in 4 dimensions, deterministic spread.
fn blobs(sizes: &[usize]) -> (Vec<Vec<f32>>, Vec<usize>) {
    let mut pts = vec![];
    let mut label = vec![];
    for (b, &n) in sizes.iter().enumerate() {
        for i in 0..n {
            let p: Vec<f32> =
                (0..4).map(|d| if d == b { 10.0 } else { 0.0 } + ((i * 7 + d * 3) % 5) as f32 * 0.1).collect();
            pts.push(p);
            label.push(b);
        }
    }
    (pts, label)
}

#[test]
fn balanced_kmeans_finds_separated_blobs_and_caps_every_cluster() {
    let (pts, label) = blobs(&[40, 40, 40]);
    let (_, a) = balanced_kmeans(&pts, 3, 20, 1).unwrap();
    // Same blob, same cluster; different blobs, different clusters.
    for i in 0..pts.len() {
        for j in 0..pts.len() {
            assert_eq!(a[i] == a[j], label[i] == label[j], "points {i} and {j}");
        }
    }
    assert_eq!(balanced_kmeans(&pts, 3, 20, 1).unwrap().1, a, "seeded: the same clusters again");
    // One blob twice the others' size: no cluster past ceil(n / k).
    let (pts, _) = blobs(&[60, 30, 30]);
    let (_, a) = balanced_kmeans(&pts, 3, 20, 2).unwrap();
    for c in 0..3 {
        assert!(a.iter().filter(|&&x| x == c).count() <= 40, "cluster {c} over capacity");
    }
    assert!(balanced_kmeans(&pts, 1, 5, 0).is_err());
    assert!(balanced_kmeans(&pts[..2], 3, 5, 0).is_err());
}

#[test]
fn cluster_statistics_add_up_to_the_statistics_of_all_tokens() {
    let d = tempfile::tempdir().unwrap();
    let (_f, mut model) = tiny(d.path(), "llama", 3, DType::F32, WeightMode::F32);
    let rows: Vec<Vec<u32>> =
        (0..6u32).map(|r| (0..20u32).map(|i| 3 + (r * 41 + i * 13 + r * i) % 200).collect()).collect();
    let clusters = cluster_stats(&mut model, &rows, 3, 2, 0, |_, _| {}).unwrap();
    assert_eq!(clusters.len(), 3);
    assert_eq!(clusters.iter().map(|c| c.tokens).sum::<u64>(), 120);
    assert!(clusters.iter().all(|c| c.tokens > 0), "an empty cluster");
    let all = stats::collect(&mut model, "all", &rows, |_, _| {}).unwrap();
    for l in 0..all.layers() {
        for ch in 0..all.channels() {
            let got: f64 = clusters.iter().map(|c| c.sums[l][ch]).sum();
            let want = all.sums[l][ch];
            assert!((got - want).abs() <= 1e-6 * want.abs().max(1.0), "layer {l} channel {ch}: {got} vs {want}");
        }
    }
}
