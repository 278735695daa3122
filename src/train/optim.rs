//! AdamW (Loshchilov & Hutter) with decoupled weight decay on matrices only, global gradient
//! clipping, a warm-up + cosine schedule, and per-tensor locks (a locked tensor is held out of
//! the update; its moments are kept for when it is released).

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

struct Param {
    name: String,
    var: Var,
    /// 1 where weight decay applies, 0 elsewhere; `None` = no decay at all.
    decay: Option<Tensor>,
    m: Tensor,
    v: Tensor,
}

/// The optimizer.
pub struct AdamW {
    params: Vec<Param>,
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
        let params = vars
            .iter()
            .map(|(name, var)| {
                let zeros = var.as_tensor().zeros_like()?.to_dtype(DType::F32)?;
                let decay = match decay(name, var) {
                    Decay::None => None,
                    Decay::All => Some(var.as_tensor().ones_like()?.to_dtype(DType::F32)?),
                    Decay::Mask(mask) => Some(mask),
                };
                Ok(Param {
                    name: name.clone(),
                    var: var.clone(),
                    decay,
                    m: zeros.clone(),
                    v: zeros,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            params,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            t: 0,
            locked: BTreeSet::new(),
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

    /// One update with learning rate `lr`, clipping the global gradient norm at `clip` (0: off).
    /// A non-finite gradient leaves every parameter untouched.
    pub fn step(&mut self, grads: &GradStore, lr: f64, clip: f64) -> Result<UpdateInfo> {
        let present: Vec<(usize, Tensor)> = self
            .params
            .iter()
            .enumerate()
            .filter_map(|(i, p)| grads.get(p.var.as_tensor()).map(|g| (i, g.clone())))
            .collect();
        // One host read per step: the squared norms of every gradient at once.
        let sq: Vec<Tensor> = present
            .iter()
            .map(|(_, g)| g.to_dtype(DType::F32)?.sqr()?.sum_all())
            .collect::<Result<_>>()?;
        let total = if sq.is_empty() {
            0.0
        } else {
            f64::from(Tensor::stack(&sq, 0)?.sum_all()?.to_scalar::<f32>()?)
        };
        let grad_norm = total.sqrt();
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
        for (i, g) in present {
            let p = &mut self.params[i];
            if self.locked.contains(&p.name) {
                continue;
            }
            let g = (g.to_dtype(DType::F32)? * scale)?;
            p.m = ((&p.m * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
            p.v = ((&p.v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let m_hat = (&p.m / bc1)?;
            let v_hat = (&p.v / bc2)?;
            let mut update = (m_hat / (v_hat.sqrt()? + self.eps)?)?;
            let w = p.var.as_tensor().to_dtype(DType::F32)?;
            if let Some(mask) = &p.decay
                && self.weight_decay > 0.0
            {
                update = (update + (w.clone() * mask)? * self.weight_decay)?;
            }
            let new = (w - (update * lr)?)?;
            p.var.set(&new.to_dtype(p.var.dtype())?)?;
        }
        Ok(UpdateInfo {
            grad_norm,
            finite: true,
        })
    }

    /// The moments by parameter name (for resumable state).
    #[must_use]
    pub fn moments(&self) -> Vec<(String, Tensor, Tensor)> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.m.clone(), p.v.clone()))
            .collect()
    }

    /// Restores moments by name; unknown names are ignored by the caller's choice.
    pub fn set_moments(&mut self, name: &str, m: Tensor, v: Tensor) -> Result<bool> {
        match self.params.iter_mut().find(|p| p.name == name) {
            Some(p) => {
                if m.dims() != p.m.dims() || v.dims() != p.v.dims() {
                    candle_core::bail!(
                        "optimizer state for {name} has shape {:?}, expected {:?}",
                        m.dims(),
                        p.m.dims()
                    );
                }
                p.m = m;
                p.v = v;
                Ok(true)
            }
            None => Ok(false),
        }
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
