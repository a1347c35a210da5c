//! Dense and MoE CNNs: a ResNet-style and a VGG-style network sized for 28–32 px images.
//!
//! An MoE conv unit (conv → BN → ReLU) splits its output channels into E expert groups. Its router,
//! a small CNN reading the unit's input (the image features at that depth), picks one expert per
//! image. Training and attacks run the *masked* path: all channels computed, the unchosen groups
//! multiplied by 0, with a straight-through gradient (hard one-hot forward, softmax backward) into
//! the router. Inference runs the *grouped* path: the batch is split by expert and only the chosen
//! expert's channels are computed, so FLOPs drop by E for every MoE unit.

use crate::nn::{BatchNorm, Builder, Conv, Ctx, Group, Linear, Param};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, D};
use rand::{rngs::StdRng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Resnet,
    Vgg,
}

impl std::str::FromStr for Arch {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "resnet" => Ok(Arch::Resnet),
            "vgg" => Ok(Arch::Vgg),
            _ => Err(Error::Config(format!("unknown architecture '{s}' (known: resnet, vgg)"))),
        }
    }
}

/// The stored model description (checkpoint metadata `recompose.vision.config`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    /// Channels of the first stage; later stages use 2x and 4x.
    pub width: usize,
    /// Experts per MoE unit; 1 = a dense network.
    pub experts: usize,
    pub router_width: usize,
    pub in_channels: usize,
    pub image_size: usize,
    pub classes: usize,
    /// Per-channel normalisation applied inside the model, so attacks work in pixel space.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl ModelConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.width == 0 || self.experts == 0 || self.classes < 2 || self.in_channels == 0 {
            return bad("width, experts, in_channels must be >= 1 and classes >= 2".into());
        }
        if self.width % self.experts != 0 {
            return bad(format!("width {} is not divisible by {} experts", self.width, self.experts));
        }
        if self.experts > 1 && self.router_width == 0 {
            return bad("router width must be >= 1 for an MoE model".into());
        }
        if self.image_size < 8 {
            return bad(format!("image size {} is below 8 px", self.image_size));
        }
        if self.mean.len() != self.in_channels
            || self.std.len() != self.in_channels
            || self.std.iter().any(|s| *s <= 0.0)
        {
            return bad("mean/std need one value per input channel and std > 0".into());
        }
        Ok(())
    }

    pub fn is_moe(&self) -> bool {
        self.experts > 1
    }
}

/// How MoE units execute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exec {
    /// All channels computed, unchosen experts zeroed; differentiable (training, attacks).
    Masked,
    /// Only the chosen expert's channels computed per image (inference; eval mode only).
    Grouped,
}

pub struct Router {
    conv: Conv,
    /// Centres the pooled features across images; without it the (all-positive) pooled ReLU
    /// features give every image the same argmax at initialisation and routing starts collapsed.
    bn: BatchNorm,
    fc: Linear,
}

impl Router {
    fn new(b: &mut Builder, name: &str, cin: usize, width: usize, experts: usize) -> Result<Self> {
        Ok(Router {
            conv: Conv::new(b, &format!("{name}.conv"), cin, width, 3, 2, true, Group::Router)?,
            bn: BatchNorm::new(b, &format!("{name}.bn"), width, Group::Router)?,
            fc: Linear::new(b, &format!("{name}.fc"), width, experts, Group::Router)?,
        })
    }
    /// Routing logits `[N, E]`.
    fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let h = self.conv.forward(x, ctx)?.relu()?.mean_keepdim((2, 3))?;
        let w = h.dims()[1];
        let h = self.bn.forward_channels(&h, ctx, 0, w)?.flatten_from(1)?;
        self.fc.forward(&h, ctx)
    }
    fn macs(&self, h: usize, w: usize) -> u64 {
        self.conv.macs(h, w, self.conv.out_channels()).0 + self.fc.macs()
    }
}

/// conv → BN → (ReLU), optionally with experts over the output channels.
pub struct Unit {
    conv: Conv,
    bn: BatchNorm,
    relu: bool,
    router: Option<(Router, usize)>,
}

impl Unit {
    #[allow(clippy::too_many_arguments)]
    fn new(
        b: &mut Builder,
        conv: &str,
        bn: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        relu: bool,
        moe: Option<(usize, usize)>,
    ) -> Result<Self> {
        let c = Conv::new(b, conv, cin, cout, k, stride, false, Group::Net)?;
        let n = BatchNorm::new(b, bn, cout, Group::Net)?;
        let router = match moe {
            Some((experts, rw)) => Some((Router::new(b, &format!("{conv}.router"), cin, rw, experts)?, experts)),
            None => None,
        };
        Ok(Unit { conv: c, bn: n, relu, router })
    }

    fn dense(&self, x: &Tensor, ctx: &Ctx, lo: usize, n: usize) -> Result<Tensor> {
        let y = self.conv.forward_channels(x, ctx, lo, n)?;
        let y = self.bn.forward_channels(&y, ctx, lo, n)?;
        Ok(if self.relu { y.relu()? } else { y })
    }

    fn forward(
        &self,
        x: &Tensor,
        ctx: &Ctx,
        exec: Exec,
        routes: &mut Vec<Tensor>,
        st_features: bool,
    ) -> Result<Tensor> {
        let out = self.conv.out_channels();
        let Some((router, experts)) = &self.router else { return self.dense(x, ctx, 0, out) };
        let experts = *experts;
        let g = out / experts;
        let rx = if st_features { x.clone() } else { x.detach() };
        let probs = candle_core::Tensor::exp(&crate::nn::log_softmax(&router.forward(&rx, ctx)?)?)?;
        routes.push(probs.clone());
        let choice = probs.argmax(D::Minus1)?; // [N] u32
        match exec {
            Exec::Masked => {
                let y = self.dense(x, ctx, 0, out)?;
                let hard = one_hot(&choice, experts, probs.dtype())?;
                // Straight-through: the forward value is the hard one-hot, the gradient is softmax's.
                let st = ((hard - probs.detach())? + &probs)?;
                let n = y.dims()[0];
                let mask = st.unsqueeze(2)?.broadcast_as((n, experts, g))?.reshape((n, out, 1, 1))?;
                Ok(y.broadcast_mul(&mask)?)
            }
            Exec::Grouped => {
                if ctx.train {
                    return Err(Error::Config("expert-grouped execution is for inference (eval mode) only".into()));
                }
                let choice = choice.to_vec1::<u32>()?;
                let (mut parts, mut order) = (vec![], vec![]);
                for e in 0..experts {
                    let ids: Vec<u32> = (0..choice.len() as u32).filter(|&i| choice[i as usize] == e as u32).collect();
                    if ids.is_empty() {
                        continue;
                    }
                    let xe = x.index_select(&Tensor::new(ids.as_slice(), x.device())?, 0)?;
                    let ye = self.dense(&xe, ctx, e * g, g)?;
                    let (ne, _, h, w) = ye.dims4()?;
                    let (dt, dev) = (ye.dtype(), ye.device().clone());
                    let zeros = |c: usize| Tensor::zeros((ne, c, h, w), dt, &dev);
                    let mut cols = vec![];
                    if e > 0 {
                        cols.push(zeros(e * g)?);
                    }
                    cols.push(ye);
                    if e + 1 < experts {
                        cols.push(zeros((experts - e - 1) * g)?);
                    }
                    parts.push(Tensor::cat(&cols, 1)?);
                    order.extend(ids);
                }
                let y = Tensor::cat(&parts, 0)?;
                // Back to the batch's order: position of image i in the concatenation.
                let mut inv = vec![0u32; order.len()];
                for (pos, &i) in order.iter().enumerate() {
                    inv[i as usize] = pos as u32;
                }
                Ok(y.index_select(&Tensor::new(inv.as_slice(), x.device())?, 0)?)
            }
        }
    }

    /// (MACs per image at this unit, output h, output w), counting only the active expert.
    fn macs(&self, h: usize, w: usize) -> (u64, usize, usize) {
        let out = self.conv.out_channels();
        match &self.router {
            Some((r, e)) => {
                let (m, ho, wo) = self.conv.macs(h, w, out / e);
                (m + r.macs(h, w), ho, wo)
            }
            None => self.conv.macs(h, w, out),
        }
    }
}

/// 2x2 max-pool (an odd last row/column is dropped) as reshape + max, whose gradient is exact.
/// candle 0.11's max_pool2d backward multiplies the gradient by the share of maxima in each
/// window (1/4 for a unique max) instead of dividing by their count: 1/64 after three pools.
fn max_pool2(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (ho, wo) = (h / 2, w / 2);
    let x = if h % 2 == 1 || w % 2 == 1 { x.narrow(2, 0, 2 * ho)?.narrow(3, 0, 2 * wo)? } else { x.clone() };
    Ok(x.contiguous()?.reshape((n, c, ho, 2, wo, 2))?.max(5)?.max(3)?)
}

fn one_hot(idx: &Tensor, n: usize, dtype: DType) -> Result<Tensor> {
    let range = Tensor::arange(0u32, n as u32, idx.device())?.unsqueeze(0)?;
    Ok(idx.unsqueeze(1)?.broadcast_eq(&range)?.to_dtype(dtype)?)
}

struct Block {
    c1: Unit,
    c2: Unit,
    shortcut: Option<Unit>,
}

enum Body {
    Resnet {
        stem: Unit,
        blocks: Vec<Block>,
    },
    /// Units, with `true` after those followed by a 2x2 max-pool.
    Vgg {
        units: Vec<(Unit, bool)>,
    },
}

/// A forward pass's results: logits and, per MoE unit, the routing probabilities `[N, E]`.
pub struct Output {
    pub logits: Tensor,
    pub routes: Vec<Tensor>,
}

pub struct Model {
    pub config: ModelConfig,
    body: Body,
    head: Linear,
    pub params: Vec<Param>,
    buffers: Vec<(String, std::sync::Arc<std::sync::Mutex<Tensor>>)>,
    /// Tensor names in network order (checkpoint order).
    order: Vec<String>,
    mean: Tensor,
    std: Tensor,
    /// Whether the routers' straight-through gradient also flows back into the features they
    /// read (true, as in the reference code, so attacks see the routing too). The
    /// finite-difference test turns it off: the hard top-1 forward has no such derivative.
    pub st_features: bool,
}

pub const CONFIG_KEY: &str = "recompose.vision.config";

impl Model {
    /// A freshly initialised model (Kaiming-normal convs, BN at identity), seeded.
    pub fn new(config: ModelConfig, seed: u64, dtype: DType) -> Result<Self> {
        config.validate()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut b = Builder::new(&mut rng, dtype);
        let moe = config.is_moe().then_some((config.experts, config.router_width));
        let w = config.width;
        let (body, last) = match config.arch {
            Arch::Resnet => {
                let stem = Unit::new(&mut b, "conv1", "bn1", config.in_channels, w, 3, 1, true, None)?;
                let mut blocks = vec![];
                let mut cin = w;
                for (i, (cout, stride)) in [(w, 1), (2 * w, 2), (4 * w, 2)].into_iter().enumerate() {
                    let p = format!("layer{}.0", i + 1);
                    let c1 =
                        Unit::new(&mut b, &format!("{p}.conv1"), &format!("{p}.bn1"), cin, cout, 3, stride, true, moe)?;
                    let c2 =
                        Unit::new(&mut b, &format!("{p}.conv2"), &format!("{p}.bn2"), cout, cout, 3, 1, false, moe)?;
                    let shortcut = if stride != 1 || cin != cout {
                        Some(Unit::new(
                            &mut b,
                            &format!("{p}.shortcut.0"),
                            &format!("{p}.shortcut.1"),
                            cin,
                            cout,
                            1,
                            stride,
                            false,
                            None,
                        )?)
                    } else {
                        None
                    };
                    blocks.push(Block { c1, c2, shortcut });
                    cin = cout;
                }
                (Body::Resnet { stem, blocks }, cin)
            }
            Arch::Vgg => {
                let plan = [(w, false), (w, true), (2 * w, false), (2 * w, true), (4 * w, false), (4 * w, true)];
                let mut units = vec![];
                let mut cin = config.in_channels;
                for (i, (cout, pool)) in plan.into_iter().enumerate() {
                    // The first conv sees raw pixels and stays dense, as in the ResNet's stem.
                    let m = if i == 0 { None } else { moe };
                    let u = Unit::new(
                        &mut b,
                        &format!("features.{i}.conv"),
                        &format!("features.{i}.bn"),
                        cin,
                        cout,
                        3,
                        1,
                        true,
                        m,
                    )?;
                    units.push((u, pool));
                    cin = cout;
                }
                (Body::Vgg { units }, cin)
            }
        };
        let head = Linear::new(&mut b, "fc", last, config.classes, Group::Net)?;
        let c = config.in_channels;
        let mean = Tensor::from_vec(config.mean.clone(), (1, c, 1, 1), &Device::Cpu)?.to_dtype(dtype)?;
        let std = Tensor::from_vec(config.std.clone(), (1, c, 1, 1), &Device::Cpu)?.to_dtype(dtype)?;
        Ok(Model {
            config,
            body,
            head,
            params: b.params,
            buffers: b.buffers,
            order: b.order,
            mean,
            std,
            st_features: true,
        })
    }

    pub fn dtype(&self) -> DType {
        self.mean.dtype()
    }

    /// Logits for pixels `x` `[N, C, H, W]` in [0, 1].
    pub fn forward(&self, x: &Tensor, ctx: &Ctx, exec: Exec) -> Result<Output> {
        let mut routes = vec![];
        let st = self.st_features;
        let h = x.to_dtype(self.dtype())?.broadcast_sub(&self.mean)?.broadcast_div(&self.std)?;
        let h = match &self.body {
            Body::Resnet { stem, blocks } => {
                let mut h = stem.forward(&h, ctx, exec, &mut routes, st)?;
                for b in blocks {
                    let y = b.c1.forward(&h, ctx, exec, &mut routes, st)?;
                    let y = b.c2.forward(&y, ctx, exec, &mut routes, st)?;
                    let s = match &b.shortcut {
                        Some(u) => u.forward(&h, ctx, exec, &mut routes, st)?,
                        None => h,
                    };
                    h = (y + s)?.relu()?;
                }
                h
            }
            Body::Vgg { units } => {
                let mut h = h;
                for (u, pool) in units {
                    h = u.forward(&h, ctx, exec, &mut routes, st)?;
                    if *pool {
                        h = max_pool2(&h)?;
                    }
                }
                h
            }
        };
        let pooled = h.mean((2, 3))?;
        Ok(Output { logits: self.head.forward(&pooled, ctx)?, routes })
    }

    /// Multiply-adds per image of inference (grouped execution: only chosen experts count).
    pub fn macs(&self) -> u64 {
        let (mut h, mut w) = (self.config.image_size, self.config.image_size);
        let mut total = 0;
        let mut add = |u: &Unit, h: usize, w: usize| {
            let (m, ho, wo) = u.macs(h, w);
            total += m;
            (ho, wo)
        };
        match &self.body {
            Body::Resnet { stem, blocks } => {
                (h, w) = add(stem, h, w);
                for b in blocks {
                    let (h1, w1) = add(&b.c1, h, w);
                    add(&b.c2, h1, w1);
                    if let Some(s) = &b.shortcut {
                        add(s, h, w);
                    }
                    (h, w) = (h1, w1);
                }
            }
            Body::Vgg { units } => {
                for (u, pool) in units {
                    (h, w) = add(u, h, w);
                    if *pool {
                        (h, w) = (h / 2, w / 2);
                    }
                }
            }
        }
        total + self.head.macs()
    }

    /// Tensors in network order: parameters and BN running statistics, as f32.
    pub fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![];
        for name in &self.order {
            let t = if let Some(p) = self.params.iter().find(|p| &p.name == name) {
                p.var.as_tensor().clone()
            } else {
                let (_, b) = self
                    .buffers
                    .iter()
                    .find(|(n, _)| n == name)
                    .ok_or_else(|| Error::Checkpoint(format!("no tensor {name}")))?;
                crate::nn::lock(b)?.clone()
            };
            out.push((name.clone(), t.to_dtype(DType::F32)?));
        }
        Ok(out)
    }

    /// Replaces every tensor from `tensors` (name → value); each must exist with the same shape.
    pub fn set_tensors(&self, tensors: &std::collections::HashMap<String, Tensor>, source: &str) -> Result<()> {
        for name in &self.order {
            let t = tensors.get(name).ok_or_else(|| Error::Checkpoint(format!("{source}: missing tensor {name}")))?;
            let t = t.to_dtype(self.dtype())?;
            if let Some(p) = self.params.iter().find(|p| &p.name == name) {
                if p.var.as_tensor().dims() != t.dims() {
                    return Err(Error::Checkpoint(format!(
                        "{source}: tensor {name} has shape {:?}, the model needs {:?}",
                        t.dims(),
                        p.var.as_tensor().dims()
                    )));
                }
                p.var.set(&t)?;
            } else if let Some((_, b)) = self.buffers.iter().find(|(n, _)| n == name) {
                let mut cur = crate::nn::lock(b)?;
                if cur.dims() != t.dims() {
                    return Err(Error::Checkpoint(format!(
                        "{source}: tensor {name} has shape {:?}, the model needs {:?}",
                        t.dims(),
                        cur.dims()
                    )));
                }
                *cur = t;
            }
        }
        Ok(())
    }

    /// Writes the model as safetensors (atomically), config in the metadata.
    pub fn save(&self, path: &Path, extra: &[(&str, String)]) -> Result<()> {
        let mut meta = std::collections::HashMap::new();
        meta.insert(
            CONFIG_KEY.to_string(),
            serde_json::to_string(&self.config).map_err(|e| Error::Config(e.to_string()))?,
        );
        for (k, v) in extra {
            meta.insert(k.to_string(), v.clone());
        }
        write_safetensors(path, &self.tensors()?, meta)
    }

    /// Loads a checkpoint written by [`Model::save`] (or edited by the merge/tv/rws tools).
    pub fn load(path: &Path, dtype: DType) -> Result<(Self, std::collections::HashMap<String, String>)> {
        let (tensors, meta) = read_safetensors(path)?;
        let cfg = meta.get(CONFIG_KEY).ok_or_else(|| {
            Error::Checkpoint(format!(
                "{}: no {CONFIG_KEY} metadata (not a recompose vision checkpoint)",
                path.display()
            ))
        })?;
        let config: ModelConfig = serde_json::from_str(cfg)
            .map_err(|e| Error::Checkpoint(format!("{}: bad model config: {e}", path.display())))?;
        let model = Model::new(config, 0, dtype)?;
        model.set_tensors(&tensors, &path.display().to_string())?;
        Ok((model, meta))
    }
}

/// Writes tensors (as f32) and metadata to a safetensors file, atomically, byte-for-byte the same
/// for the same contents (metadata keys sorted).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    meta: std::collections::HashMap<String, String>,
) -> Result<()> {
    let f32s: Vec<(String, Tensor)> =
        tensors.iter().map(|(n, t)| Ok((n.clone(), t.to_dtype(DType::F32)?))).collect::<Result<_>>()?;
    recompose_train::checkpoint::save_tensors(path, &f32s, &meta.into_iter().collect()).map_err(crate::train::train_err)
}

type Loaded = (std::collections::HashMap<String, Tensor>, std::collections::HashMap<String, String>);

pub fn read_safetensors(path: &Path) -> Result<Loaded> {
    let bytes = std::fs::read(path).map_err(|e| Error::Checkpoint(format!("{}: {e}", path.display())))?;
    let bad = |e: String| Error::Checkpoint(format!("{}: {e}", path.display()));
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut out = std::collections::HashMap::new();
    for (name, view) in st.tensors() {
        let vals: Vec<f32> = match view.dtype() {
            safetensors::Dtype::F32 => {
                view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
            }
            d => return Err(bad(format!("tensor {name} is {d:?}; vision checkpoints are f32"))),
        };
        out.insert(name.clone(), Tensor::from_vec(vals, view.shape(), &Device::Cpu)?);
    }
    Ok((out, header.metadata().clone().unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Track;

    /// Each image's output is the dense conv → BN → ReLU on its chosen expert's channels and
    /// exactly zero on the others: an MoE conv with all but one expert masked is the dense conv.
    #[test]
    fn moe_unit_with_all_but_one_expert_masked_equals_the_dense_conv_on_those_channels() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut b = Builder::new(&mut rng, DType::F64);
        let unit = Unit::new(&mut b, "u", "bn", 3, 6, 3, 1, true, Some((3, 4))).unwrap();
        let x = Tensor::randn(0f64, 1.0, (8, 3, 6, 6), &Device::Cpu).unwrap();
        for ctx in [Ctx { train: true, track: Track::All }, Ctx::eval()] {
            let mut routes = vec![];
            let y = unit.forward(&x, &ctx, Exec::Masked, &mut routes, true).unwrap();
            let dense = unit.dense(&x, &ctx, 0, 6).unwrap();
            let choice: Vec<u32> = routes[0].argmax(1).unwrap().to_vec1().unwrap();
            for (i, &e) in choice.iter().enumerate() {
                for ch in 0..6 {
                    let got = y.get(i).unwrap().get(ch).unwrap();
                    let d = if ch / 2 == e as usize {
                        (got - dense.get(i).unwrap().get(ch).unwrap()).unwrap()
                    } else {
                        got
                    };
                    let d = d.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
                    assert!(d < 1e-12, "image {i} channel {ch} (expert {e}): {d}");
                }
            }
        }
    }
}
