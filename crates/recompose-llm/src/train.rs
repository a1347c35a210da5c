//! The decoder's differentiable mode: batches of token rows with next-token targets, the LM loss
//! (the fused chunked cross-entropy of `grad`), gradients with optional per-block activation
//! checkpointing, and LoRA branches attached to the blocks' linear layers. The forward pass is
//! the inference one: with trainable `Var`s or a tracked input, every op it runs switches to its
//! backward-capable form, and attention runs within the step (`StepCache`, nothing stored outside
//! the graph). Owns no optimiser and no data pipeline (recompose-train).

use crate::error::{Error, Result};
use crate::grad::{self, IGNORE};
use crate::kv::{KvCache, Step, StepCache};
use crate::linear::{Linear, Weight};
use crate::lora::{LoraBranch, LoraConfig};
use crate::model::{Model, Output, Plan, StepShape};
use candle_core::{Tensor, Var};

/// Rows of tokens with their next-token targets, right-padded to `t` columns. A target of
/// [`IGNORE`] takes no loss (padding, prompt tokens).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub targets: Vec<u32>,
    pub rows: usize,
    pub t: usize,
}

impl Batch {
    /// From `(tokens, targets)` rows of equal lengths each (targets aligned with tokens), padded
    /// with `pad`.
    pub fn from_rows(rows: &[(Vec<u32>, Vec<u32>)], pad: u32) -> Result<Self> {
        let t = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        if t == 0 {
            return Err(Error::InvalidInput("an empty batch".into()));
        }
        let (mut tokens, mut targets) = (Vec::with_capacity(rows.len() * t), Vec::with_capacity(rows.len() * t));
        for (i, (tok, tgt)) in rows.iter().enumerate() {
            if tok.len() != tgt.len() {
                return Err(Error::InvalidInput(format!("row {i}: {} tokens, {} targets", tok.len(), tgt.len())));
            }
            tokens.extend_from_slice(tok);
            tokens.extend(std::iter::repeat_n(pad, t - tok.len()));
            targets.extend_from_slice(tgt);
            targets.extend(std::iter::repeat_n(IGNORE, t - tgt.len()));
        }
        Ok(Self { tokens, targets, rows: rows.len(), t })
    }

    /// Tokens that take a loss.
    pub fn target_count(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE).count()
    }

    fn step(&self) -> Step {
        Step { start: vec![0; self.rows], lens: vec![self.t; self.rows], t: self.t }
    }
}

/// What a gradient computation returns.
pub struct Gradients {
    /// `scale * sum of target NLLs` (the value whose gradient was taken, auxiliary losses aside).
    pub loss: f64,
    /// Sum of the FFNs' auxiliary losses.
    pub aux: f64,
    /// One entry per requested variable (None: it took no part).
    pub grads: Vec<Option<Tensor>>,
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}

impl Model {
    /// The trainable parameters: weights loaded as `Var`s and LoRA factors, by name
    /// (`model.layers.0.self_attn.q_proj.lora_A.weight`, ...).
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// Registers trainable parameters of parts put in after loading (a MoE's experts), so
    /// training finds them with the rest.
    pub fn add_params(&mut self, params: impl IntoIterator<Item = (String, Var)>) {
        self.params.extend(params);
    }

    /// Logits for every column of a batch, differentiable (attention within the rows).
    pub fn forward_train(&self, batch: &Batch, plan: &Plan) -> Result<Output> {
        let step = batch.step();
        let mut cache = StepCache::new(batch.rows, self.dtype, &self.device);
        self.forward_with(&batch.tokens, &step, &mut [&mut cache], crate::Logits::All, plan)
    }

    /// `scale * sum NLL` of the batch's targets from the final hidden states `x (N, hidden)`.
    fn head_loss(&self, x: &Tensor, targets: &[u32], scale: f64) -> Result<Tensor> {
        let c = &self.config;
        let x = grad::rms_norm(x, &self.norm, c.rms_eps)?;
        match (&self.lm_head.weight, c.final_logit_softcap, &self.lm_head.lora) {
            (Weight::Dense(w), None, None) => Ok(grad::linear_cross_entropy(&x, w, targets, scale)?),
            (Weight::Dense(_), _, _) => {
                // Soft-capped logits: the plain composition.
                let mut logits = self.lm_head.forward(&x)?;
                if let Some(cap) = c.final_logit_softcap {
                    logits = ((logits / cap)?.tanh()? * cap)?;
                }
                Ok(grad::cross_entropy(&logits, targets, scale)?)
            }
            (Weight::Packed(_), _, _) => Err(Error::NoGradient(format!(
                "{} is a quantised weight: the loss needs the f32 weights (load with WeightMode::F32)",
                self.lm_head.name
            ))),
        }
    }

    /// The batch's loss as a graph: `scale * sum NLL` plus the FFNs' auxiliary losses. The
    /// whole forward pass stays in memory (see [`Model::loss_and_grads`] for the checkpointed
    /// form).
    pub fn loss(&self, batch: &Batch, plan: &Plan, scale: f64) -> Result<(Tensor, Option<Tensor>)> {
        let c = &self.config;
        let step = batch.step();
        let mut cache = StepCache::new(batch.rows, self.dtype, &self.device);
        let caches: &mut [&mut dyn KvCache] = &mut [&mut cache];
        let mut x = self.embed(&batch.tokens)?.reshape((batch.rows, batch.t, c.hidden_size))?;
        caches[0].begin_step(&step)?;
        let routed = self.routed(&x, StepShape::Padded(&step), caches, plan)?;
        let plan = routed.as_ref().unwrap_or(plan);
        let mut aux: Option<Tensor> = None;
        for li in 0..self.layers.len() {
            let (y, side) = self.block(li, &x, StepShape::Padded(&step), caches, plan)?;
            x = y;
            aux = add(aux, side.aux_loss)?;
        }
        caches[0].end_step()?;
        let nll = self.head_loss(&x.reshape((batch.rows * batch.t, c.hidden_size))?, &batch.targets, scale)?;
        Ok((nll, aux))
    }

    /// Gradients of `scale * sum NLL + aux` with respect to `vars`. With `checkpoint`, only each
    /// block's input is kept during the forward pass, and each block is run again, from the
    /// top, to take its backward pass: memory for one block's graph instead of all of them,
    /// for about one more forward pass of compute.
    pub fn loss_and_grads(
        &self,
        batch: &Batch,
        plan: &Plan,
        vars: &[Var],
        scale: f64,
        checkpoint: bool,
    ) -> Result<Gradients> {
        let mut acc: Vec<Option<Tensor>> = vec![None; vars.len()];
        let collect = |acc: &mut Vec<Option<Tensor>>, g: &candle_core::backprop::GradStore| -> Result<()> {
            for (slot, v) in acc.iter_mut().zip(vars) {
                if let Some(gr) = g.get(v.as_tensor()) {
                    *slot = Some(match slot.take() {
                        Some(a) => (a + gr)?,
                        None => gr.clone(),
                    });
                }
            }
            Ok(())
        };
        if !checkpoint {
            let (nll, aux) = self.loss(batch, plan, scale)?;
            let loss = scalar(&nll)?;
            let aux_v = aux.as_ref().map(scalar).transpose()?.unwrap_or(0.0);
            let total = match aux {
                Some(a) => (nll + a.to_dtype(self.dtype)?)?,
                None => nll,
            };
            collect(&mut acc, &total.backward()?)?;
            return Ok(Gradients { loss, aux: aux_v, grads: acc });
        }
        let c = &self.config;
        let step = batch.step();
        let (n, h) = (batch.rows * batch.t, c.hidden_size);
        let mut cache = StepCache::new(batch.rows, self.dtype, &self.device);
        let caches: &mut [&mut dyn KvCache] = &mut [&mut cache];
        caches[0].begin_step(&step)?;
        // Forward: keep every block's input, detached (its graph is freed block by block).
        let emb = self.embed(&batch.tokens)?.reshape((batch.rows, batch.t, h))?;
        let routed = self.routed(&emb, StepShape::Padded(&step), caches, plan)?;
        let plan = routed.as_ref().unwrap_or(plan);
        let mut inputs = vec![emb.detach()];
        for li in 0..self.layers.len() {
            let (y, _) = self.block(li, &inputs[li], StepShape::Padded(&step), caches, plan)?;
            inputs.push(y.detach());
        }
        // Head: the loss from the last hidden states.
        let top = Var::from_tensor(&inputs[self.layers.len()])?;
        let nll = self.head_loss(&top.as_tensor().reshape((n, h))?, &batch.targets, scale)?;
        let loss = scalar(&nll)?;
        let grads = nll.backward()?;
        collect(&mut acc, &grads)?;
        let mut upstream = grads
            .get(top.as_tensor())
            .cloned()
            .ok_or_else(|| Error::NoGradient("the loss does not depend on the last hidden states".into()))?;
        // Blocks, last to first: run again with the input tracked, backward from `upstream`.
        let mut aux_total = 0.0;
        for li in (0..self.layers.len()).rev() {
            let input = Var::from_tensor(&inputs[li])?;
            let (y, side) = self.block(li, input.as_tensor(), StepShape::Padded(&step), caches, plan)?;
            let mut obj = (y * &upstream)?.sum_all()?;
            if let Some(a) = side.aux_loss {
                aux_total += scalar(&a)?;
                obj = (obj + a.to_dtype(self.dtype)?)?;
            }
            let g = obj.backward()?;
            collect(&mut acc, &g)?;
            upstream = match g.get(input.as_tensor()) {
                Some(u) => u.clone(),
                None => upstream.zeros_like()?,
            };
            inputs.truncate(li + 1);
        }
        caches[0].end_step()?;
        // Embeddings, if trainable.
        let emb = self.embed(&batch.tokens)?.reshape((batch.rows, batch.t, h))?;
        if emb.track_op() {
            collect(&mut acc, &(emb * &upstream)?.sum_all()?.backward()?)?;
        }
        Ok(Gradients { loss, aux: aux_total, grads: acc })
    }

    /// Every linear layer of the blocks with its module path (`model.layers.3.mlp.up_proj`).
    pub fn block_linears(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = vec![];
        for (l, b) in self.layers.iter_mut().enumerate() {
            let at = &mut b.attn;
            for (p, lin) in [
                ("self_attn.q_proj", &mut at.q),
                ("self_attn.k_proj", &mut at.k),
                ("self_attn.v_proj", &mut at.v),
                ("self_attn.o_proj", &mut at.o),
            ] {
                out.push((format!("model.layers.{l}.{p}"), lin));
            }
            for (p, lin) in b.ffn.linears() {
                out.push((format!("model.layers.{l}.{p}"), lin));
            }
        }
        out
    }

    /// Attaches fresh trainable LoRA branches (PEFT's initialisation, seeded: `A` uniform, `B`
    /// zero) to every target module; registers their factors as parameters.
    pub fn add_lora(&mut self, cfg: &LoraConfig, seed: u64) -> Result<()> {
        cfg.validate()?;
        let (dtype, device) = (self.dtype, self.device.clone());
        let targets: Vec<&str> = cfg.targets.iter().map(|t| t.path()).collect();
        let mut new_params = vec![];
        for (i, (path, lin)) in self.block_linears().into_iter().enumerate() {
            if !targets.iter().any(|t| path.ends_with(t)) {
                continue;
            }
            let (out, inp) = lin.dims();
            let a = Tensor::from_vec(
                crate::lora::init_a(cfg.rank, inp, seed ^ crate::lora::mix(i as u64)),
                (cfg.rank, inp),
                &device,
            )?
            .to_dtype(dtype)?;
            let (a, b) = (Var::from_tensor(&a)?, Var::zeros((out, cfg.rank), dtype, &device)?);
            lin.lora = Some(LoraBranch {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                scale: cfg.scale(),
                dropout: cfg.dropout,
            });
            new_params.push((format!("{path}.lora_A.weight"), a));
            new_params.push((format!("{path}.lora_B.weight"), b));
        }
        if new_params.is_empty() {
            return Err(Error::InvalidInput("no module of the model matches the LoRA targets".into()));
        }
        self.params.extend(new_params);
        Ok(())
    }

    /// Attaches LoRA branches with given factors `(module path, A (r, in), B (out, r))`, in this
    /// model's weight convention, scaled by `scale`; trainable ones become parameters.
    pub fn set_lora(
        &mut self,
        factors: Vec<(String, Tensor, Tensor)>,
        scale: f64,
        dropout: f64,
        trainable: bool,
    ) -> Result<()> {
        let (dtype, device) = (self.dtype, self.device.clone());
        let mut by_path: std::collections::BTreeMap<String, (Tensor, Tensor)> =
            factors.into_iter().map(|(p, a, b)| (p, (a, b))).collect();
        let mut new_params = vec![];
        for (path, lin) in self.block_linears() {
            let Some((a, b)) = by_path.remove(&path) else { continue };
            let (out, inp) = lin.dims();
            let (ra, rb) = (a.dims2()?, b.dims2()?);
            if ra.1 != inp || rb.0 != out || ra.0 != rb.1 {
                return Err(Error::InvalidInput(format!(
                    "{path}: LoRA factors A {:?} and B {:?} do not fit a {out}x{inp} weight",
                    a.dims(),
                    b.dims()
                )));
            }
            let (a, b) = (a.to_dtype(dtype)?.to_device(&device)?, b.to_dtype(dtype)?.to_device(&device)?);
            let (a, b) = if trainable {
                let (va, vb) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
                new_params.push((format!("{path}.lora_A.weight"), va.clone()));
                new_params.push((format!("{path}.lora_B.weight"), vb.clone()));
                (va.as_tensor().clone(), vb.as_tensor().clone())
            } else {
                (a, b)
            };
            lin.lora = Some(LoraBranch { a, b, scale, dropout });
        }
        if let Some(p) = by_path.keys().next() {
            return Err(Error::InvalidInput(format!("the adapter has a module '{p}' this model does not have")));
        }
        self.params.extend(new_params);
        Ok(())
    }

    /// Attaches a PEFT adapter (HF convention, as stored) scaled by `scale`, after checking it
    /// was made for this model: frozen for inference, or trainable to continue training it.
    pub fn apply_adapter(
        &mut self,
        adapter: &recompose_core::peft::Adapter,
        scale: f64,
        trainable: bool,
    ) -> Result<()> {
        let mut factors = vec![];
        for (m, (a, b)) in &adapter.factors {
            let b = self.b_convention(m, b, true)?;
            factors.push((m.clone(), a.clone(), b));
        }
        self.set_lora(factors, adapter.config.scale() * scale, adapter.config.lora_dropout, trainable)
            .map_err(|e| Error::InvalidInput(format!("{}: {e}", adapter.dir.display())))
    }

    /// The attached LoRA factors per module path, in HF's convention (as PEFT stores them).
    pub fn adapter_factors(&mut self) -> Result<std::collections::BTreeMap<String, (Tensor, Tensor)>> {
        let mut out = std::collections::BTreeMap::new();
        for (m, a, b, _) in self.lora_factors() {
            let b = self.b_convention(&m, &b, false)?;
            out.insert(
                m,
                (a.detach().to_dtype(candle_core::DType::F32)?, b.detach().to_dtype(candle_core::DType::F32)?),
            );
        }
        Ok(out)
    }

    /// LoRA's B of a Q or K projection in the model's row order (`to_model`) or HF's: GGUF Llama
    /// weights have their rotary rows interleaved, HF's are in halves.
    fn b_convention(&self, module: &str, b: &Tensor, to_model: bool) -> Result<Tensor> {
        let c = &self.config;
        if c.rope_style != recompose_core::config::RopeStyle::Interleaved {
            return Ok(b.clone());
        }
        match recompose_core::convert::qk_heads(c, &format!("{module}.lora_B.weight")) {
            Some(h) => Ok(recompose_core::convert::permute_qk(b, h, to_model)?),
            None => Ok(b.clone()),
        }
    }

    /// The attached LoRA factors `(module path, A, B, scale)` in this model's convention.
    pub fn lora_factors(&mut self) -> Vec<(String, Tensor, Tensor, f64)> {
        self.block_linears()
            .into_iter()
            .filter_map(|(p, l)| l.lora.as_ref().map(|b| (p, b.a.clone(), b.b.clone(), b.scale)))
            .collect()
    }
}

fn add(acc: Option<Tensor>, x: Option<Tensor>) -> Result<Option<Tensor>> {
    Ok(match (acc, x) {
        (Some(a), Some(b)) => Some((a + b)?),
        (a, b) => a.or(b),
    })
}
