//! The oracle expert of every token, what the pre-gating router is distilled towards: per layer,
//! the token's active channels are its top `keep` fraction by |a| in the dense model; the score
//! of an expert is how many of them lie in that expert's own channels, summed over the layers.
//! (The permanent channels are every expert's, so they add the same to each score.)

use crate::stats::{observe, Sink};
use crate::{Error, ExpertSplit, Result};
use recompose_llm::Model;
use std::sync::{Arc, Mutex};

/// Per row, per token, per expert: the summed overlap.
pub type Overlaps = Vec<Vec<Vec<u32>>>;

/// Per row, per token: the overlap with each expert at each layer, at `layer * experts + e`.
pub type LayerOverlaps = Vec<Vec<Vec<u32>>>;

/// The overlaps of every token of `rows` with the experts of `split` (made for `model`),
/// summed over the layers.
pub fn overlaps(
    model: &mut Model,
    split: &ExpertSplit,
    rows: &[Vec<u32>],
    progress: impl FnMut(usize, usize),
) -> Result<Overlaps> {
    Ok(summed(&layer_overlaps(model, split, rows, progress)?, split.names.len()))
}

/// Per-layer overlaps summed over the layers.
pub fn summed(lo: &LayerOverlaps, experts: usize) -> Overlaps {
    let e = experts.max(1);
    lo.iter()
        .map(|row| row.iter().map(|s| (0..e).map(|x| s.iter().skip(x).step_by(e).sum()).collect()).collect())
        .collect()
}

/// The overlaps of layer `layer` alone (the layer-wise routers' targets).
pub fn at_layer(lo: &LayerOverlaps, layer: usize, experts: usize) -> Overlaps {
    lo.iter().map(|row| row.iter().map(|s| s[layer * experts..(layer + 1) * experts].to_vec()).collect()).collect()
}

/// The overlaps of every token of `rows` with the experts of `split`, per layer.
pub fn layer_overlaps(
    model: &mut Model,
    split: &ExpertSplit,
    rows: &[Vec<u32>],
    progress: impl FnMut(usize, usize),
) -> Result<LayerOverlaps> {
    let channels = model.layers.first().and_then(|b| b.ffn.as_dense()).map_or(0, |d| d.gate.dims().0);
    split.check(model.layers.len(), channels)?;
    let (experts, layers) = (split.names.len(), split.layers());
    if experts > 64 {
        return Err(Error::Config(format!("{experts} experts: at most 64")));
    }
    // Per layer: the expert owning each channel, as a bit set over the experts.
    let owners: Vec<Vec<u64>> = split
        .experts
        .iter()
        .map(|layer| {
            let mut own = vec![0u64; channels];
            for (e, chans) in layer.iter().enumerate() {
                chans.iter().for_each(|&c| own[c as usize] |= 1 << e);
            }
            own
        })
        .collect();
    let k = ((channels as f64 * split.keep).round() as usize).clamp(1, channels);
    let out = Arc::new(Mutex::new(
        rows.iter().map(|r| vec![vec![0u32; layers * experts]; r.len()]).collect::<LayerOverlaps>(),
    ));
    let o = out.clone();
    let sink: Arc<Sink> = Arc::new(move |row, layer, _x: &candle_core::Tensor, a: &[Vec<f32>]| {
        let own = &owners[layer];
        let Ok(mut out) = o.lock() else { return };
        let mut order: Vec<usize> = (0..channels).collect();
        for (t, act) in a.iter().enumerate() {
            // The token's k most active channels (ties by index).
            order.iter_mut().enumerate().for_each(|(i, c)| *c = i);
            order.select_nth_unstable_by(k - 1, |&x, &y| act[y].total_cmp(&act[x]).then(x.cmp(&y)));
            let scores = &mut out[row][t][layer * experts..(layer + 1) * experts];
            for &c in &order[..k] {
                let mut bits = own[c];
                while bits != 0 {
                    scores[bits.trailing_zeros() as usize] += 1;
                    bits &= bits - 1;
                }
            }
        }
    });
    observe(model, rows, sink, progress)?;
    let out = out.lock().map_err(|_| Error::Data("overlaps poisoned".into()))?.clone();
    Ok(out)
}

/// The best-overlapping expert of every token (ties to the lower index).
pub fn best(overlaps: &Overlaps) -> Vec<Vec<u32>> {
    overlaps
        .iter()
        .map(|row| {
            row.iter()
                .map(|s| {
                    s.iter().enumerate().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(&a.0))).map_or(0, |(e, _)| e as u32)
                })
                .collect()
        })
        .collect()
}

/// The share of all tokens of `routes` routed to each of `experts` experts.
pub fn load(routes: &[Vec<u32>], experts: usize) -> Vec<f64> {
    let mut n = vec![0usize; experts];
    routes.iter().flatten().for_each(|&e| {
        if let Some(c) = n.get_mut(e as usize) {
            *c += 1;
        }
    });
    let total = routes.iter().map(Vec::len).sum::<usize>().max(1) as f64;
    n.into_iter().map(|c| c as f64 / total).collect()
}

/// The share of tokens two routings send to the same expert.
pub fn agreement(a: &[Vec<u32>], b: &[Vec<u32>]) -> f64 {
    let (same, n) = a
        .iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y))
        .fold((0usize, 0usize), |(s, n), (x, y)| (s + usize::from(x == y), n + 1));
    same as f64 / n.max(1) as f64
}

/// How often a token's expert is the one of the token before it, over all rows.
pub fn locality(routes: &[Vec<u32>]) -> f64 {
    let (same, pairs) = routes.iter().fold((0usize, 0usize), |(s, p), r| {
        (s + r.windows(2).filter(|w| w[0] == w[1]).count(), p + r.len().saturating_sub(1))
    });
    same as f64 / pairs.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_breaks_ties_low_and_locality_counts_repeats() {
        let o: Overlaps = vec![vec![vec![1, 3, 3], vec![5, 0, 1], vec![0, 0, 0]]];
        assert_eq!(best(&o), vec![vec![1, 0, 0]]);
        assert_eq!(locality(&[vec![0, 0, 1, 1, 1], vec![2]]), 0.75);
        assert_eq!(locality(&[]), 0.0);
        assert_eq!(load(&[vec![0, 2, 2], vec![2]], 3), vec![0.25, 0.0, 0.75]);
        assert_eq!(agreement(&[vec![0, 1, 2], vec![1]], &[vec![0, 2, 2], vec![0]]), 0.5);
    }
}
