//! Experts from per-domain statistics, as Read-ME makes them: per layer, each domain keeps its
//! top `keep` fraction of FFN channels by mean |a|. Channels every domain keeps form the
//! permanent expert, which every token runs; each domain's expert is the rest of its set.
//! A channel kept by some domains but not all is in each of their experts; a channel no domain
//! keeps is dropped. A token then runs `keep` of the channels: the permanent ones and its
//! expert's.

use crate::{ChannelStats, Error, Result};

/// Below this many tokens a domain's means are too noisy to rank channels by.
pub const MIN_TOKENS: u64 = 256;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExpertSplit {
    /// The experts' names (their domains), in route order: route `e` runs `experts[l][e]`.
    pub names: Vec<String>,
    /// FFN channels of the dense model, per layer.
    pub channels: usize,
    /// The fraction of channels each domain kept.
    pub keep: f64,
    /// Per layer: the channels every token runs, ascending.
    pub permanent: Vec<Vec<u32>>,
    /// Per layer, per expert: the expert's own channels, ascending, disjoint from the permanent.
    pub experts: Vec<Vec<Vec<u32>>>,
}

/// How one layer's channels fell.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LayerReport {
    pub layer: usize,
    pub permanent: usize,
    /// Each expert's own channels.
    pub experts: Vec<usize>,
    /// Channels in two or more experts (kept by several domains, not all).
    pub shared: usize,
    /// Channels no domain kept.
    pub dropped: usize,
}

/// Refuses a domain with fewer than [`MIN_TOKENS`] calibration tokens (callers check it before
/// taking statistics, the split again on what it is given).
pub fn enough_tokens(name: &str, tokens: u64) -> Result<()> {
    if tokens < MIN_TOKENS {
        return Err(Error::Data(format!(
            "{name}: {tokens} calibration tokens, too few to rank channels (at least {MIN_TOKENS})"
        )));
    }
    Ok(())
}

/// The `k` channels of largest value, ascending; ties to the lower index, so splits are
/// deterministic.
fn top_k(values: &[f64], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    order.truncate(k);
    order.sort_unstable();
    order
}

/// Checks per-domain statistics for a split keeping `keep`; returns (layers, channels, kept
/// channels per domain and layer).
fn validate(stats: &[ChannelStats], keep: f64) -> Result<(usize, usize, usize)> {
    if stats.len() < 2 {
        return Err(Error::Config(format!("{} domain(s): experts need at least two", stats.len())));
    }
    if !(keep > 0.0 && keep <= 1.0) {
        return Err(Error::Config(format!("keep {keep} is not a fraction in (0, 1]")));
    }
    let (layers, channels) = (stats[0].layers(), stats[0].channels());
    if let Some(s) = stats.iter().find(|s| s.layers() != layers || s.channels() != channels) {
        return Err(Error::Data(format!(
            "{}: statistics of {} layers x {} channels, {} has {layers} x {channels}",
            s.name,
            s.layers(),
            s.channels(),
            stats[0].name
        )));
    }
    for s in stats {
        enough_tokens(&s.name, s.tokens)?;
    }
    Ok((layers, channels, ((channels as f64 * keep).round() as usize).clamp(1, channels)))
}

impl ExpertSplit {
    /// One expert per domain from each domain's statistics.
    pub fn from_domains(stats: &[ChannelStats], keep: f64) -> Result<Self> {
        let (layers, channels, k) = validate(stats, keep)?;
        let mut permanent = Vec::with_capacity(layers);
        let mut experts = Vec::with_capacity(layers);
        for l in 0..layers {
            // Per domain: which channels it keeps.
            let kept: Vec<Vec<bool>> = stats
                .iter()
                .map(|s| {
                    let mut keep = vec![false; channels];
                    top_k(&s.mean(l), k).into_iter().for_each(|c| keep[c] = true);
                    keep
                })
                .collect();
            let all = |c: usize| kept.iter().all(|d| d[c]);
            permanent.push((0..channels).filter(|&c| all(c)).map(|c| c as u32).collect());
            experts.push(
                kept.iter().map(|d| (0..channels).filter(|&c| d[c] && !all(c)).map(|c| c as u32).collect()).collect(),
            );
        }
        Ok(Self { names: stats.iter().map(|s| s.name.clone()).collect(), channels, keep, permanent, experts })
    }

    /// The dense model pruned to the same active size, the baseline the paper's MoE is set
    /// against: per layer, the top `keep` channels by the domains' means averaged (each domain
    /// weighs the same), all permanent, and one empty expert named "pruned".
    pub fn pruned(stats: &[ChannelStats], keep: f64) -> Result<Self> {
        let (layers, channels, k) = validate(stats, keep)?;
        let n = stats.len() as f64;
        let permanent = (0..layers)
            .map(|l| {
                let means: Vec<Vec<f64>> = stats.iter().map(|s| s.mean(l)).collect();
                let pooled: Vec<f64> = (0..channels).map(|c| means.iter().map(|m| m[c]).sum::<f64>() / n).collect();
                top_k(&pooled, k).into_iter().map(|c| c as u32).collect()
            })
            .collect();
        Ok(Self { names: vec!["pruned".into()], channels, keep, permanent, experts: vec![vec![vec![]]; layers] })
    }

    pub fn layers(&self) -> usize {
        self.permanent.len()
    }

    /// Channels a token routed to `expert` runs in `layer`.
    pub fn active(&self, layer: usize, expert: usize) -> usize {
        self.permanent[layer].len() + self.experts[layer][expert].len()
    }

    pub fn report(&self) -> Vec<LayerReport> {
        (0..self.layers())
            .map(|l| {
                let mut count = vec![0usize; self.channels];
                for e in &self.experts[l] {
                    e.iter().for_each(|&c| count[c as usize] += 1);
                }
                let mut used = vec![false; self.channels];
                self.permanent[l].iter().chain(self.experts[l].iter().flatten()).for_each(|&c| used[c as usize] = true);
                LayerReport {
                    layer: l,
                    permanent: self.permanent[l].len(),
                    experts: self.experts[l].iter().map(Vec::len).collect(),
                    shared: count.iter().filter(|&&n| n >= 2).count(),
                    dropped: used.iter().filter(|&&u| !u).count(),
                }
            })
            .collect()
    }

    /// Checks the split against a model of `layers` layers with `channels` FFN channels, and
    /// its own invariants (what a split read from a file must satisfy before it is used).
    pub fn check(&self, layers: usize, channels: usize) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.layers() != layers || self.channels != channels || self.experts.len() != layers {
            return bad(format!(
                "the split is for {} layers x {} channels, the model has {layers} x {channels}",
                self.layers(),
                self.channels
            ));
        }
        for l in 0..layers {
            if self.experts[l].len() != self.names.len() {
                return bad(format!("layer {l}: {} experts, {} names", self.experts[l].len(), self.names.len()));
            }
            let mut seen = vec![0u8; channels];
            for &c in &self.permanent[l] {
                match seen.get_mut(c as usize) {
                    Some(s) if *s == 0 => *s = 1,
                    _ => return bad(format!("layer {l}: permanent channel {c} repeated or out of range")),
                }
            }
            for (e, chans) in self.experts[l].iter().enumerate() {
                if chans.windows(2).any(|w| w[0] >= w[1]) {
                    return bad(format!("layer {l}, expert {e}: channels not ascending"));
                }
                if let Some(&c) = chans.iter().find(|&&c| seen.get(c as usize) != Some(&0)) {
                    return bad(format!("layer {l}, expert {e}: channel {c} out of range or permanent"));
                }
            }
            if self.permanent[l].windows(2).any(|w| w[0] >= w[1]) {
                return bad(format!("layer {l}: permanent channels not ascending"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(name: &str, means: Vec<Vec<f64>>) -> ChannelStats {
        let tokens = 1000;
        ChannelStats {
            name: name.into(),
            sums: means.into_iter().map(|l| l.into_iter().map(|m| m * 1000.0).collect()).collect(),
            tokens,
        }
    }

    #[test]
    fn permanent_is_what_every_domain_keeps_and_experts_the_rest() {
        // 8 channels, keep 4: a keeps {0,1,2,3}, b keeps {0,1,4,5}, c keeps {0,1,2,6}.
        let a = stats("a", vec![vec![9., 8., 7., 6., 0., 0., 0., 0.]]);
        let b = stats("b", vec![vec![9., 8., 0., 0., 7., 6., 0., 0.]]);
        let c = stats("c", vec![vec![9., 8., 7., 0., 0., 0., 6., 0.]]);
        let s = ExpertSplit::from_domains(&[a, b, c], 0.5).unwrap();
        assert_eq!(s.permanent, vec![vec![0, 1]]);
        assert_eq!(s.experts, vec![vec![vec![2, 3], vec![4, 5], vec![2, 6]]]);
        assert_eq!((0..3).map(|e| s.active(0, e)).collect::<Vec<_>>(), vec![4, 4, 4]);
        let r = &s.report()[0];
        assert_eq!((r.permanent, r.shared, r.dropped), (2, 1, 1));
        s.check(1, 8).unwrap();
    }

    #[test]
    fn pruned_keeps_the_top_channels_of_the_averaged_means() {
        // Averaged means: [5, 4.5, 3.5, 3, 3.5, 3, 0, 0]; keep 4 -> {0, 1, 2, 4} (ties by index).
        let a = stats("a", vec![vec![9., 8., 7., 6., 0., 0., 0., 0.]]);
        let b = stats("b", vec![vec![1., 1., 0., 0., 7., 6., 0., 0.]]);
        let p = ExpertSplit::pruned(&[a, b], 0.5).unwrap();
        assert_eq!(p.permanent, vec![vec![0, 1, 2, 4]]);
        assert_eq!((p.names.clone(), p.active(0, 0)), (vec!["pruned".to_string()], 4));
        p.check(1, 8).unwrap();
    }

    #[test]
    fn ties_break_by_channel_index() {
        let a = stats("a", vec![vec![1.0; 4]]);
        let b = stats("b", vec![vec![1.0; 4]]);
        let s = ExpertSplit::from_domains(&[a, b], 0.5).unwrap();
        assert_eq!(s.permanent, vec![vec![0, 1]]);
        assert!(s.experts[0].iter().all(Vec::is_empty));
    }

    #[test]
    fn bad_settings_and_thin_statistics_are_refused() {
        let a = stats("a", vec![vec![1.0; 4]]);
        let e = ExpertSplit::from_domains(std::slice::from_ref(&a), 0.5).unwrap_err().to_string();
        assert!(e.contains("at least two"), "{e}");
        let e = ExpertSplit::from_domains(&[a.clone(), a.clone()], 0.0).unwrap_err().to_string();
        assert!(e.contains("not a fraction"), "{e}");
        let thin = ChannelStats { tokens: 10, ..a.clone() };
        let e = ExpertSplit::from_domains(&[a.clone(), thin], 0.5).unwrap_err().to_string();
        assert!(e.contains("too few to rank"), "{e}");
        let wide = stats("w", vec![vec![1.0; 5]]);
        let e = ExpertSplit::from_domains(&[a.clone(), wide], 0.5).unwrap_err().to_string();
        assert!(e.contains("1 layers x 5 channels"), "{e}");
    }

    #[test]
    fn check_refuses_a_split_for_another_model_or_with_broken_sets() {
        let a = stats("a", vec![vec![9., 8., 7., 6.]]);
        let b = stats("b", vec![vec![9., 0., 7., 6.]]);
        let s = ExpertSplit::from_domains(&[a, b], 0.5).unwrap();
        assert!(s.check(2, 4).unwrap_err().to_string().contains("the model has 2 x 4"));
        let mut broken = s.clone();
        broken.experts[0][0] = vec![0];
        assert!(broken.check(1, 4).unwrap_err().to_string().contains("out of range or permanent"));
        let mut broken = s.clone();
        broken.permanent[0] = vec![9];
        assert!(broken.check(1, 4).unwrap_err().to_string().contains("out of range"));
    }
}
