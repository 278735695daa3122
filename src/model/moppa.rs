//! The MoPPA unit: Mixture of Physical Priors Adapter (Wang, Li, Ye, Zhang, arXiv 2412.02759),
//! as this project defines it in METHOD.md.
//!
//! `z = h W_downᵀ + b_down` → the patch part as a grid → `Ẑ = DCT2(Z)` → per prior
//! `Y_p = IDCT2(G_p ⊙ Ẑ)` (heat, wave, Poisson) → `y = Σ_p α_p Y_p` (router) → `out = s · y W_upᵀ`.
//! Prefix tokens bypass the filters. All transforms are 2-D matrix products with contiguous
//! operands (`(B·r, HW) × (HW, HW)`), so the same code runs on CPU and CUDA.

use super::init::Init;
use super::ops::{self, Kernels};
use super::param;
use crate::config::{Coeff, Lockable, MethodConfig, PerCoeff, Prior, RouterKind};
use crate::physics::tensor::SpectralGrid;
use candle_core::{D, DType, Result, Tensor, Var};

/// The router of one unit.
#[derive(Debug)]
pub enum Router {
    /// A single prior: `α ≡ 1`, no route loss.
    None,
    /// Per-token mixture from `h`.
    Token {
        /// `(k, D)`.
        w: Var,
        /// `(k)`.
        b: Var,
    },
    /// Per-image mixture from the mean patch token.
    Image {
        /// `(k, D)`.
        w: Var,
        /// `(k)`.
        b: Var,
    },
    /// One learned mixture for the block.
    Layer {
        /// `(k)`, initialised at 0.
        logits: Var,
    },
}

/// Hyper-parameters that can change while training (read at every forward pass).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Live {
    /// τ of heat and wave.
    pub tau: f64,
    /// Wave damping γ.
    pub gamma: f64,
    /// Router temperature T.
    pub temperature: f64,
    /// Output scale s.
    pub scale: f64,
    /// Route-regularization weight λ.
    pub route_weight: f64,
}

impl Live {
    /// From a method config.
    #[must_use]
    pub fn from_config(m: &MethodConfig) -> Self {
        Self {
            tau: m.tau,
            gamma: m.gamma,
            temperature: m.temperature,
            scale: m.scale,
            route_weight: m.route_weight,
        }
    }
}

/// What one unit returns.
#[derive(Debug)]
pub struct UnitOutput {
    /// The update added to the residual stream, `(B, T, D)`.
    pub out: Tensor,
    /// Router weights of the patch tokens: `(B, HW, k)` (token), `(B, 1, k)` (image),
    /// `(1, 1, k)` (layer); `None` for a single prior.
    pub alpha: Option<Tensor>,
    /// `KL(ᾱ ‖ U_k)` for this block (not yet weighted by λ); `None` for a single prior.
    pub route_kl: Option<Tensor>,
}

/// One block's MoPPA parameters.
#[derive(Debug)]
pub struct MoppaUnit {
    /// Active priors, in the order heat, wave, Poisson.
    pub priors: Vec<Prior>,
    /// Rank r.
    pub rank: usize,
    /// `W_down (r, D)`.
    pub down_w: Var,
    /// `b_down (r)`.
    pub down_b: Var,
    /// `W_up (D, r)`, zero-initialised.
    pub up_w: Var,
    /// The router.
    pub router: Router,
    /// Raw per-channel coefficients of the active priors, `(r)` each: `κ = softplus(kappa_raw)`,
    /// `c = softplus(c_raw)`, `ε = softplus(eps_raw)`. Only this unit converts between raw values
    /// and natural units ([`Self::coeff_values`], [`Self::set_coeff`]).
    raw: PerCoeff<Option<Var>>,
    /// Poisson source map `S (H, W)`, initialised at 1.
    source: Option<Var>,
}

// The coefficients' parameterisation: κ, c and ε are trained as raw values through softplus;
// only this module converts (ARCHITECTURE.md: each value has one owner).

/// `softplus(x) = ln(1 + eˣ)` (β = 1), computed stably as `relu(x) + ln(1 + t)` with
/// `t = e^{−|x|}`, with gradient `sigmoid(x)` everywhere (candle's `abs`/`relu` backward agree at
/// 0). Below `t = 1e-4` the tail is the series `t − t²/2` (relative error < 4e-9): in f32, `1 + t`
/// rounds to 1 once `t` < 6e-8, so `ln(1 + t)` would turn every coefficient below ~6e-8 into 0 —
/// and an ε of 0 makes the Poisson gain 0/0 at the DC cell — although the ranges reach 1e-8.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    let t = x.abs()?.neg()?.exp()?;
    let series = (&t * t.affine(-0.5, 1.0)?)?;
    let log = (&t + 1.0)?.log()?;
    let tail = t.lt(1e-4)?.where_cond(&series, &log)?;
    x.relu()? + tail
}

/// Host `softplus` with PyTorch's convention (linear above 20).
#[must_use]
pub fn softplus_f64(x: f64) -> f64 {
    if x > 20.0 { x } else { x.exp().ln_1p() }
}

/// The inverse of softplus for `v > 0`: `v + ln(−expm1(−v))`.
#[must_use]
pub fn inv_softplus(v: f64) -> f64 {
    v + (-(-v).exp_m1()).ln()
}

/// The checkpoint (and optimizer) name prefix of block `block`'s unit.
#[must_use]
pub fn prefix(block: usize) -> String {
    format!("blocks.{block}.moppa")
}

/// METHOD.md's initial value of a coefficient at `f_j ∈ [0, 1]`.
fn initial_value(c: Coeff, f: f64) -> f64 {
    match c {
        Coeff::Kappa => 10f64.powf(-2.0 + 2.0 * f),
        Coeff::C => 0.25 + 1.25 * f,
        Coeff::Eps => 10f64.powf(-1.0 + 2.0 * f),
    }
}

/// METHOD.md's initial raw coefficients of channels `j = 0..r`: `f_j = j/(r−1)` (0 when r = 1).
fn init_curve(r: usize, c: Coeff) -> Vec<f32> {
    (0..r)
        .map(|j| {
            let fj = if r == 1 { 0.0 } else { j as f64 / (r - 1) as f64 };
            inv_softplus(initial_value(c, fj)) as f32
        })
        .collect()
}

impl MoppaUnit {
    /// A freshly initialised unit for width `d` on an `h × w` grid.
    pub fn new(d: usize, (h, w): (usize, usize), cfg: &MethodConfig, init: &mut Init) -> Result<Self> {
        let r = cfg.rank;
        let priors = cfg.active_priors();
        let k = priors.len();
        let has = |p: Prior| priors.contains(&p);
        let down_w = init.kaiming_uniform(r, d)?;
        // nn.Linear's default bias init.
        let down_b = init.uniform(&[r], 1.0 / (d as f64).sqrt())?;
        let up_w = init.zeros(&[d, r])?;
        let router = match (k, cfg.router) {
            (1, _) => Router::None,
            (_, RouterKind::Token) => Router::Token {
                w: init.kaiming_uniform(k, d)?,
                b: init.zeros(&[k])?,
            },
            (_, RouterKind::Image) => Router::Image {
                w: init.kaiming_uniform(k, d)?,
                b: init.zeros(&[k])?,
            },
            (_, RouterKind::Layer) => Router::Layer {
                logits: init.zeros(&[k])?,
            },
        };
        let mut raw = PerCoeff::default();
        for c in Coeff::ALL {
            raw[c] = has(c.prior())
                .then(|| init.from_values(init_curve(r, c), &[r]))
                .transpose()?;
        }
        Ok(Self {
            raw,
            source: has(Prior::Poisson)
                .then(|| init.from_values(vec![1.0; h * w], &[h, w]))
                .transpose()?,
            priors,
            rank: r,
            down_w,
            down_b,
            up_w,
            router,
        })
    }

    /// Every trainable tensor with its checkpoint name under `prefix` (`blocks.{i}.moppa`).
    #[must_use]
    pub fn named_vars(&self, prefix: &str) -> Vec<(String, Var)> {
        let mut v = vec![
            (format!("{prefix}.down.weight"), self.down_w.clone()),
            (format!("{prefix}.down.bias"), self.down_b.clone()),
            (format!("{prefix}.up.weight"), self.up_w.clone()),
        ];
        match &self.router {
            Router::None => {}
            Router::Token { w, b } | Router::Image { w, b } => {
                v.push((format!("{prefix}.router.weight"), w.clone()));
                v.push((format!("{prefix}.router.bias"), b.clone()));
            }
            Router::Layer { logits } => v.push((format!("{prefix}.router.logits"), logits.clone())),
        }
        for what in Lockable::ALL {
            if let Some(var) = self.lockable(what) {
                v.push((format!("{prefix}.{}", Self::tensor_name(what)), var.clone()));
            }
        }
        v
    }

    /// The checkpoint name (under the unit's prefix) of a lockable tensor: `kappa_raw`, `c_raw`,
    /// `eps_raw`, `source`.
    #[must_use]
    pub fn tensor_name(what: Lockable) -> &'static str {
        match what {
            Lockable::Kappa => "kappa_raw",
            Lockable::C => "c_raw",
            Lockable::Eps => "eps_raw",
            Lockable::Source => "source",
        }
    }

    /// The variable behind a lockable tensor, if this unit has it.
    #[must_use]
    pub fn lockable(&self, what: Lockable) -> Option<&Var> {
        match what.coeff() {
            Some(c) => self.raw[c].as_ref(),
            None => self.source.as_ref(),
        }
    }

    /// A coefficient's per-channel values in natural units (`softplus` of the raw values); empty
    /// when its prior is not active.
    #[must_use]
    pub fn coeff_values(&self, c: Coeff) -> Vec<f64> {
        self.raw[c]
            .as_ref()
            .and_then(|v| v.as_tensor().to_dtype(DType::F64).ok()?.to_vec1::<f64>().ok())
            .map(|raw| raw.into_iter().map(softplus_f64).collect())
            .unwrap_or_default()
    }

    /// Every coefficient's per-channel values in natural units.
    #[must_use]
    pub fn coeffs(&self) -> PerCoeff<Vec<f64>> {
        PerCoeff::from_fn(|c| self.coeff_values(c))
    }

    /// Sets a coefficient's per-channel values in natural units (each in its range, one per
    /// channel); the raw values become their inverse softplus.
    pub fn set_coeff(&self, c: Coeff, values: &[f64]) -> Result<()> {
        let Some(var) = &self.raw[c] else {
            candle_core::bail!("{} belongs to the {} prior, which is not active", c.name(), c.prior());
        };
        if values.len() != self.rank {
            candle_core::bail!("{}: {} values for rank {}", c.name(), values.len(), self.rank);
        }
        for &v in values {
            c.range().check(v).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        }
        let raw: Vec<f64> = values.iter().map(|&v| inv_softplus(v)).collect();
        var.set(&Tensor::from_vec(raw, var.dims(), var.device())?.to_dtype(var.dtype())?)
    }

    /// The Poisson source map, `H·W` row-major (empty when Poisson is not active).
    pub fn source_map(&self) -> Result<Vec<f32>> {
        match &self.source {
            Some(s) => s.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1(),
            None => Ok(Vec::new()),
        }
    }

    /// The spectral gains of the active priors, each `(r, HW)`, in prior order.
    pub fn filters(&self, grid: &SpectralGrid, live: &Live, grad: bool) -> Result<Vec<Tensor>> {
        let dtype = grid.lambda.dtype();
        let natural = |c: Coeff| -> Result<Tensor> {
            let v = self.raw[c]
                .as_ref()
                .ok_or_else(|| candle_core::Error::Msg(format!("MoPPA unit: no {} for an active prior", c.name())))?;
            softplus(&param(v, grad, dtype)?)
        };
        self.priors
            .iter()
            .map(|p| match p {
                Prior::Heat => grid.heat(&natural(Coeff::Kappa)?, live.tau),
                Prior::Wave => grid.wave(&natural(Coeff::C)?, live.tau, live.gamma),
                Prior::Poisson => {
                    let s = self
                        .source
                        .as_ref()
                        .ok_or_else(|| candle_core::Error::Msg("MoPPA unit: missing source map".into()))?;
                    grid.poisson(&natural(Coeff::Eps)?, &param(s, grad, dtype)?.flatten_all()?)
                }
            })
            .collect()
    }

    /// The unit on normalised tokens `h (B, T, D)` with `prefix` leading tokens; `remove`
    /// takes a prior out of the mixture (METHOD.md "Prior ablation": the router's softmax over
    /// the other priors' logits, so the remaining α sum to 1; the only prior removed leaves no
    /// filtered output). A prior this unit does not have changes nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        h: &Tensor,
        grid: &SpectralGrid,
        prefix: usize,
        live: &Live,
        kernels: Kernels,
        grad: bool,
        remove: Option<Prior>,
    ) -> Result<UnitOutput> {
        let dtype = h.dtype();
        let p = |v: &Var| param(v, grad, dtype);
        let (_, t, _) = h.dims3()?;
        let (r, hw, k) = (self.rank, grid.cells(), self.priors.len());
        if t != prefix + hw {
            candle_core::bail!("MoPPA unit: {t} tokens, expected {prefix} prefix + {hw} patches");
        }
        // Down-projection, fused with the token router's logits into one matrix product.
        let (z, token_logits) = match &self.router {
            Router::Token { w, b: rb } => {
                let wc = Tensor::cat(&[p(&self.down_w)?, p(w)?], 0)?;
                let bc = Tensor::cat(&[p(&self.down_b)?, p(rb)?], 0)?;
                let zz = ops::linear(kernels, h, &wc, &bc)?;
                (zz.narrow(D::Minus1, 0, r)?, Some(zz.narrow(D::Minus1, r, k)?))
            }
            _ => (ops::linear(kernels, h, &p(&self.down_w)?, &p(&self.down_b)?)?, None),
        };
        let z_pre = z.narrow(1, 0, prefix)?;
        let drop = remove.and_then(|q| self.priors.iter().position(|&x| x == q));
        // Logits over T, with a removed prior's pushed to where its softmax weight is 0.
        let scaled = |logits: Tensor| -> Result<Tensor> {
            let logits = (logits / live.temperature)?;
            match drop {
                None => Ok(logits),
                Some(i) => {
                    let m: Vec<f32> = (0..k).map(|j| if j == i { -1e9 } else { 0.0 }).collect();
                    logits.broadcast_add(&Tensor::from_vec(m, k, h.device())?.to_dtype(logits.dtype())?)
                }
            }
        };
        let alpha = match &self.router {
            Router::None => match drop {
                None => None,
                Some(_) => Some(Tensor::zeros((1, 1, 1), dtype, h.device())?),
            },
            Router::Token { .. } => {
                let logits = token_logits.ok_or_else(|| candle_core::Error::Msg("router logits".into()))?;
                Some(ops::softmax(kernels, &scaled(logits.narrow(1, prefix, hw)?)?)?)
            }
            Router::Image { w, b: rb } => {
                let mean = h.narrow(1, prefix, hw)?.mean(1)?;
                let logits = ops::linear(kernels, &mean, &p(w)?, &p(rb)?)?;
                Some(ops::softmax(kernels, &scaled(logits)?)?.unsqueeze(1)?)
            }
            Router::Layer { logits } => Some(ops::softmax(kernels, &scaled(p(logits)?)?)?.reshape((1, 1, k))?),
        };
        // Σ_p α_p ⊙ IDCT2(G_p ⊙ DCT2(Z)) over the patch tokens, (B, HW, r).
        let gains = Tensor::stack(&self.filters(grid, live, grad)?, 0)?; // (k, r, HW)
        let y_patch = ops::spectral_mix(kernels, grid, &z.narrow(1, prefix, hw)?, &gains, alpha.as_ref())?;
        let y = Tensor::cat(&[&z_pre, &y_patch], 1)?;
        // The output scale goes on the small up-projection, not on the (B, T, D) output.
        let up = if (live.scale - 1.0).abs() < f64::EPSILON {
            p(&self.up_w)?
        } else {
            (p(&self.up_w)? * live.scale)?
        };
        let out = ops::linear_no_bias(kernels, &y.contiguous()?, &up)?;
        let route_kl = match &alpha {
            Some(a) if k > 1 => {
                let mean = a.flatten_to(1)?.reshape(((), k))?.mean(0)?; // ᾱ over batch and patch tokens
                let kl = (&mean * (mean.clone() * k as f64)?.log()?)?.sum_all()?;
                Some(kl)
            }
            _ => None,
        };
        Ok(UnitOutput { out, alpha, route_kl })
    }
}
