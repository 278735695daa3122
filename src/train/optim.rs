//! AdamW (Loshchilov & Hutter) with decoupled weight decay on matrices only, global gradient
//! clipping, a warm-up + cosine schedule, and per-tensor locks (a locked tensor is held out of
//! the update; its moments are kept for when it is released).

use crate::model::ops::HalfLayout;
use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};
use std::collections::BTreeSet;

/// Where weight decay applies to one tensor.
#[derive(Clone, Debug)]
pub enum Decay {
    /// Nowhere (vectors, coefficients).
    None,
    /// Everywhere (matrices).
    All,
    /// Where the mask is 1 (a flat buffer of several tensors).
    Mask(Tensor),
}

/// Weight decay of a block half's flat buffer: 1 on its matrices (the slots marked to decay).
#[must_use]
pub fn half_decay(lay: &HalfLayout, device: &candle_core::Device) -> Decay {
    let mut mask = vec![0f32; lay.len];
    for s in lay.slots.iter().filter(|s| s.decay && s.present) {
        mask[s.range()].fill(1.0);
    }
    Tensor::from_vec(mask, lay.len, device).map_or(Decay::None, Decay::Mask)
}

/// timm's rule for where weight decay applies to a named trainable tensor: the matrices of a
/// half-block's flat buffer (`…attn_half`, `…mlp_half`, laid out by `layouts`, the attention and
/// MLP layouts of the network it belongs to) and every other matrix except the Poisson source
/// map; never vectors, tokens, position embeddings or coefficients.
#[must_use]
pub fn timm_decay(name: &str, var: &Var, (attn, mlp): (&HalfLayout, &HalfLayout)) -> Decay {
    if name.ends_with(".attn_half") {
        return half_decay(attn, var.device());
    }
    if name.ends_with(".mlp_half") {
        return half_decay(mlp, var.device());
    }
    if var.rank() == 2 && !name.ends_with("source") && !name.ends_with("pos_embed") {
        Decay::All
    } else {
        Decay::None
    }
}

struct Param {
    name: String,
    var: Var,
    /// Where the tensor's elements start in the flat optimizer buffers.
    offset: usize,
    len: usize,
}

/// The optimizer. The moments, the decay mask and the update live in flat f32 buffers over all
/// parameters, so a step is ~20 whole-buffer operations plus one gather of the gradients and one
/// write-back per tensor, whatever the number of tensors (on a GPU, per-tensor arithmetic was
/// ~15 kernel launches per tensor: 16 ms of a ViT-B/16 MoPPA step for 110 small tensors).
pub struct AdamW {
    params: Vec<Param>,
    m: Option<Tensor>,
    v: Option<Tensor>,
    /// 1 where weight decay applies, else 0.
    decay: Option<Tensor>,
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Steps taken (for bias correction).
    pub t: u64,
    locked: BTreeSet<String>,
    /// On the CPU, update in one fused parallel pass on the host (default) rather than with tensor
    /// ops (the path every other device takes; tests run both).
    pub host_pass: bool,
    /// The last partial-update mask (which tensors moved) and its element mask.
    active_mask: Option<(Vec<bool>, Tensor)>,
}

/// What one update saw.
#[derive(Clone, Copy, Debug)]
pub struct UpdateInfo {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// False when some gradient was NaN/inf: nothing was updated.
    pub finite: bool,
}

impl AdamW {
    /// An optimizer over named variables; `decay` says where weight decay applies to each.
    pub fn new(vars: &[(String, Var)], decay: impl Fn(&str, &Var) -> Decay, weight_decay: f64) -> Result<Self> {
        let mut params = Vec::with_capacity(vars.len());
        let mut masks = Vec::with_capacity(vars.len());
        let mut offset = 0;
        for (name, var) in vars {
            let len = var.elem_count();
            let ones = || Tensor::ones(len, DType::F32, var.device());
            masks.push(match decay(name, var) {
                Decay::None => ones()?.zeros_like()?,
                Decay::All => ones()?,
                Decay::Mask(mask) => mask.to_dtype(DType::F32)?.flatten_all()?,
            });
            params.push(Param {
                name: name.clone(),
                var: var.clone(),
                offset,
                len,
            });
            offset += len;
        }
        let (m, v, decay) = if masks.is_empty() {
            (None, None, None)
        } else {
            let zeros = Tensor::zeros(offset, DType::F32, masks[0].device())?;
            (Some(zeros.clone()), Some(zeros), Some(Tensor::cat(&masks, 0)?))
        };
        Ok(Self {
            params,
            m,
            v,
            decay,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            t: 0,
            locked: BTreeSet::new(),
            host_pass: true,
            active_mask: None,
        })
    }

    /// Holds a tensor out of (or back into) the update.
    pub fn set_locked(&mut self, name: &str, locked: bool) {
        if locked {
            self.locked.insert(name.to_owned());
        } else {
            self.locked.remove(name);
        }
    }

    /// Whether a tensor is locked.
    #[must_use]
    pub fn is_locked(&self, name: &str) -> bool {
        self.locked.contains(name)
    }

    /// Names of the locked tensors.
    #[must_use]
    pub fn locked(&self) -> &BTreeSet<String> {
        &self.locked
    }

    /// 1 over the elements of the tensors that move this step (cached while the set is the same).
    fn element_mask(&mut self, active: &[bool], like: &Tensor) -> Result<Tensor> {
        if let Some((key, mask)) = &self.active_mask
            && key.as_slice() == active
        {
            return Ok(mask.clone());
        }
        let mut host = Vec::new();
        for (p, &on) in self.params.iter().zip(active) {
            host.extend(std::iter::repeat_n(u8::from(on), p.len));
        }
        let mask = Tensor::from_vec(host, like.elem_count(), like.device())?;
        self.active_mask = Some((active.to_vec(), mask.clone()));
        Ok(mask)
    }

    /// One update with learning rate `lr`, clipping the global gradient norm at `clip` (0: off).
    /// A non-finite gradient, or an update that would make a weight non-finite, leaves every
    /// parameter and moment untouched (`finite: false`). Tensors without a gradient and
    /// locked tensors keep their values and their moments.
    pub fn step(&mut self, grads: &GradStore, lr: f64, clip: f64) -> Result<UpdateInfo> {
        let (Some(m), Some(v), Some(decay)) = (self.m.clone(), self.v.clone(), self.decay.clone()) else {
            return Ok(UpdateInfo {
                grad_norm: 0.0,
                finite: true,
            });
        };
        let mut any = false;
        let parts = self
            .params
            .iter()
            .map(|p| match grads.get(p.var.as_tensor()) {
                Some(g) => {
                    any = true;
                    g.to_dtype(DType::F32)?.flatten_all()
                }
                None => Tensor::zeros(p.len, DType::F32, m.device()),
            })
            .collect::<Result<Vec<_>>>()?;
        if !any {
            return Ok(UpdateInfo {
                grad_norm: 0.0,
                finite: true,
            });
        }
        let g = Tensor::cat(&parts, 0)?;
        // One host read per step: the global squared norm.
        let grad_norm = f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?).sqrt();
        if !grad_norm.is_finite() {
            return Ok(UpdateInfo {
                grad_norm,
                finite: false,
            });
        }
        let scale = if clip > 0.0 && grad_norm > clip {
            clip / grad_norm
        } else {
            1.0
        };
        self.t += 1;
        let t = self.t as f64;
        let bc1 = 1.0 - self.beta1.powf(t);
        let bc2 = 1.0 - self.beta2.powf(t);
        let active: Vec<bool> = self
            .params
            .iter()
            .map(|p| grads.get(p.var.as_tensor()).is_some() && !self.locked.contains(&p.name))
            .collect();
        if self.host_pass && m.device().is_cpu() {
            let finite = self.step_host(&g, &m, &v, &decay, &active, scale, lr, (bc1, bc2))?;
            if !finite {
                self.t -= 1;
            }
            return Ok(UpdateInfo { grad_norm, finite });
        }
        let g = (g * scale)?;
        let m_new = ((&m * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
        let v_new = ((&v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
        let m_hat = (&m_new / bc1)?;
        let v_hat = (&v_new / bc2)?;
        let mut update = (m_hat / (v_hat.sqrt()? + self.eps)?)?;
        let w = Tensor::cat(
            &self
                .params
                .iter()
                .map(|p| p.var.as_tensor().to_dtype(DType::F32)?.flatten_all())
                .collect::<Result<Vec<_>>>()?,
            0,
        )?;
        if self.weight_decay > 0.0 {
            update = (update + ((&w * &decay)? * self.weight_decay)?)?;
        }
        let w_new = (w - (update * lr)?)?;
        // An update that overflows (an absurd learning rate) would leave no good weights to keep:
        // check before anything is written.
        if !f64::from(w_new.abs()?.max_all()?.to_scalar::<f32>()?).is_finite() {
            self.t -= 1;
            return Ok(UpdateInfo {
                grad_norm,
                finite: false,
            });
        }
        if active.iter().all(|a| *a) {
            self.m = Some(m_new);
            self.v = Some(v_new);
        } else {
            let mask = self.element_mask(&active, &m)?;
            self.m = Some(mask.where_cond(&m_new, &m)?);
            self.v = Some(mask.where_cond(&v_new, &v)?);
        }
        for (p, on) in self.params.iter().zip(active) {
            if on {
                let new = w_new.narrow(0, p.offset, p.len)?.reshape(p.var.shape())?;
                p.var.set(&new.to_dtype(p.var.dtype())?)?;
            }
        }
        Ok(UpdateInfo {
            grad_norm,
            finite: true,
        })
    }

    /// The same update on the CPU as one fused, parallel pass over the flat buffers (candle's CPU
    /// elementwise ops are single-threaded passes: ~20 of them cost 13 ms per step for the
    /// 460 k parameters of the tiny ViT's full fine-tuning).
    #[allow(clippy::too_many_arguments)]
    fn step_host(
        &mut self,
        g: &Tensor,
        m: &Tensor,
        v: &Tensor,
        decay: &Tensor,
        active: &[bool],
        scale: f64,
        lr: f64,
        (bc1, bc2): (f64, f64),
    ) -> Result<bool> {
        use rayon::prelude::*;
        let g: Vec<f32> = g.to_vec1()?;
        let decay: Vec<f32> = decay.to_vec1()?;
        let mut mv: Vec<f32> = m.to_vec1()?;
        let mut vv: Vec<f32> = v.to_vec1()?;
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        let (scale, lr, eps, wd) = (scale as f32, lr as f32, self.eps as f32, self.weight_decay as f32);
        let (bc1, bc2) = (bc1 as f32, bc2 as f32);
        let mut updated = Vec::new();
        for (i, (p, &on)) in self.params.iter().zip(active).enumerate() {
            if !on {
                continue;
            }
            let r = p.offset..p.offset + p.len;
            let mut w: Vec<f32> = p.var.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            w.par_iter_mut()
                .zip(mv[r.clone()].par_iter_mut())
                .zip(vv[r.clone()].par_iter_mut())
                .zip(g[r.clone()].par_iter().zip(decay[r].par_iter()))
                .with_min_len(4096)
                .for_each(|(((w, m), v), (g, d))| {
                    let g = g * scale;
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    let update = (*m / bc1) / ((*v / bc2).sqrt() + eps) + wd * *w * d;
                    *w -= lr * update;
                });
            // An update that overflows (an absurd learning rate) would leave no good weights to
            // keep: nothing is written unless every new value is finite.
            if !w.par_iter().all(|x| x.is_finite()) {
                return Ok(false);
            }
            updated.push((i, w));
        }
        for (i, w) in updated {
            let p = &self.params[i];
            let new = Tensor::from_vec(w, p.var.shape(), p.var.device())?;
            p.var.set(&new.to_dtype(p.var.dtype())?)?;
        }
        self.m = Some(Tensor::from_vec(mv, m.elem_count(), m.device())?);
        self.v = Some(Tensor::from_vec(vv, v.elem_count(), v.device())?);
        Ok(true)
    }

    /// The moments by parameter name (for resumable state).
    pub fn moments(&self) -> Result<Vec<(String, Tensor, Tensor)>> {
        let (Some(m), Some(v)) = (&self.m, &self.v) else {
            return Ok(Vec::new());
        };
        self.params
            .iter()
            .map(|p| {
                let view = |t: &Tensor| t.narrow(0, p.offset, p.len)?.reshape(p.var.shape());
                Ok((p.name.clone(), view(m)?, view(v)?))
            })
            .collect()
    }

    /// Restores moments by name; returns false for a name this optimizer does not have.
    pub fn set_moments(&mut self, name: &str, m: &Tensor, v: &Tensor) -> Result<bool> {
        let Some(p) = self.params.iter().find(|p| p.name == name) else {
            return Ok(false);
        };
        if m.dims() != p.var.dims() || v.dims() != p.var.dims() {
            candle_core::bail!(
                "optimizer state for {name} has shape {:?}, expected {:?}",
                m.dims(),
                p.var.dims()
            );
        }
        let range = p.offset..p.offset + p.len;
        if let (Some(fm), Some(fv)) = (&self.m, &self.v) {
            let put = |flat: &Tensor, t: &Tensor| -> Result<Tensor> {
                flat.slice_assign(std::slice::from_ref(&range), &t.to_dtype(DType::F32)?.flatten_all()?)
            };
            self.m = Some(put(fm, m)?);
            self.v = Some(put(fv, v)?);
        }
        Ok(true)
    }
}

/// Linear warm-up to `peak` over `warmup` steps, then cosine decay to 0 at `total`.
#[must_use]
pub fn schedule(step: u64, total: u64, warmup: u64, peak: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}
