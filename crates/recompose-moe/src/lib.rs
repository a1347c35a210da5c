//! recompose-moe: Read-ME's refactorisation of a dense model into a pre-gated mixture of experts.
//!
//! - [`domains`]: calibration texts (Shakespeare, Austen, MMLU, any text) cut into rows, the
//!   last tenth held out.
//! - [`stats`]: the mean |activation| of every FFN channel (the down projection's input,
//!   `act(gate(x)) * up(x)`), per layer, over a calibration set; one set per data domain.
//! - [`cluster`]: experts without domain labels: tokens clustered by their activation patterns
//!   (balanced k-means), one expert per cluster.
//! - [`experts`]: from one set of statistics per domain, each domain's top `keep` channels per
//!   layer. Channels every domain keeps form the permanent expert that every token runs; each
//!   domain's expert is the rest of its set (channels kept by several, not all, domains are in
//!   each of their experts).
//! - [`ffn`]: the MoE FFN (an `Ffn` for the decoder's seam): the permanent channels over every
//!   token, then each token's routed expert over the tokens routed to it. Routes come from the
//!   step's plan, decided before the backbone ran (the pre-gating router).
//! - [`oracle`]: each token's oracle expert (its most active channels' overlap with each
//!   expert's, summed over layers), the target the pre-gating router is distilled towards.
//! - [`router`]: training the pre-gating router (the engine's `PreGate`: one causal block over
//!   the backbone's token embeddings, run before the blocks) towards the oracle experts.
//! - [`layerwise`]: the layer-wise routing baseline (one gate per layer over its FFN input,
//!   distilled towards each layer's own oracle expert).
//! - [`format`]: the MoE folder (config.json with the split and the base's identity, the
//!   router's safetensors), and applying it to a loaded model.
//! - [`testing`]: seeded splits, routers and MoEs for tests.
//! - [`cache`]: the expert cache (random, LRU, LFU, Belady with look-ahead) that decides
//!   which experts stay resident when only some fit.
//! - [`trace`]: a request trace replayed through a model of the server's scheduler in steps
//!   (decode-first, prefill-first, expert-aware batching): the experts each step needs, and
//!   what a cache of each capacity makes of them.
//! - [`store`]: the routed experts in a file, read on demand into a pool under a budget (with
//!   a cache policy, direct reads and prefetch on a worker thread); permanent parts stay resident.
//! - [`quality`]: held-out NLL of a model as its FFNs stand, with every token routed to one
//!   expert.

pub mod cache;
pub mod cluster;
pub mod domains;
pub mod error;
pub mod experts;
pub mod ffn;
pub mod finetune;
pub mod format;
pub mod layerwise;
pub mod oracle;
pub mod quality;
pub mod router;
pub mod stats;
pub mod store;
pub mod testing;
pub mod trace;

pub use error::{Error, Result};
pub use experts::ExpertSplit;
pub use ffn::{MoeFfn, Routing};
pub use format::{MoeConfig, MoeModel};
pub use stats::ChannelStats;
