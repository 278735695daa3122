//! The two half-block ops ([`AttnHalfOp`], [`MlpHalfOp`]): a whole timm transformer half in one
//! node of candle's graph, activations kept inside the op only when a gradient will be needed and
//! released by the backward pass (see the parent module).

use super::super::cpu::attention::{self, Dims};
use super::super::cpu::gemm::{Par, linear_dw, linear_dx, linear_fwd};
use super::super::cpu::pool::{give, give_all, take};
use super::super::cpu::{col_dot, col_sums, layer_norm, math, rows_mut, zeros};
use super::super::layout::{FC1_B, FC1_W, FC2_B, FC2_W, HalfLayout, LS, NORM_B, NORM_W, PROJ_B, PROJ_W, QKV_B, QKV_W};
use super::{lock, residual_epilogue, slice, tensor, through_layer_scale, with_data};
use crate::config::Activation;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, bail};
use std::sync::{Arc, Mutex};

// ---------------------------------------------------------------------------------------------
// Attention half: x + ls1 ⊙ proj(attn(qkv(norm1(x)) [+ Δq, Δv]))

struct AttnCache {
    stats: Vec<f32>,
    ln: Option<Vec<f32>>,
    qkv: Vec<f32>,
    probs: Vec<f32>,
    o: Vec<f32>,
}

impl Drop for AttnCache {
    fn drop(&mut self) {
        let ln = self.ln.take().unwrap_or_default();
        give_all([
            std::mem::take(&mut self.stats),
            ln,
            std::mem::take(&mut self.qkv),
            std::mem::take(&mut self.probs),
            std::mem::take(&mut self.o),
        ]);
    }
}

/// The attention half of a timm block. Arguments: `x (B, T, D)`, the flat weights, and a LoRA
/// update `(B, T, 2D)` for q and v (or any 1-element placeholder when `has_delta` is false).
pub struct AttnHalfOp {
    /// Images, tokens, width, heads.
    pub dims: Dims,
    /// LayerNorm epsilon.
    pub eps: f32,
    /// Where each tensor lives in the flat weights.
    pub layout: Arc<HalfLayout>,
    /// Whether the third argument is a real (Δq, Δv) update.
    pub has_delta: bool,
    /// Keep activations for a backward pass.
    pub save: bool,
    /// Form weight gradients (full fine-tuning).
    pub train_weights: bool,
    cache: Mutex<Option<AttnCache>>,
}

impl AttnHalfOp {
    /// A new op; `save`/`train_weights` follow from which arguments need gradients.
    #[must_use]
    pub fn new(
        dims: Dims,
        eps: f32,
        layout: Arc<HalfLayout>,
        has_delta: bool,
        save: bool,
        train_weights: bool,
    ) -> Self {
        Self {
            dims,
            eps,
            layout,
            has_delta,
            save,
            train_weights,
            cache: Mutex::new(None),
        }
    }
}

impl CustomOp3 for AttnHalfOp {
    fn name(&self) -> &'static str {
        "moppa-attention-half"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Dims { b, t, d, heads } = self.dims;
        let (x, w) = (slice(s1, l1, "x")?, slice(s2, l2, "weights")?);
        let n = b * t;
        if x.len() != n * d || w.len() != self.layout.len || d % heads != 0 {
            bail!(
                "attention half: x {:?} / weights {} do not match the block",
                l1.shape(),
                w.len()
            );
        }
        let delta = if self.has_delta {
            let dl = slice(s3, l3, "delta")?;
            if dl.len() != n * 2 * d {
                bail!(
                    "attention half: LoRA update {:?}, expected ({b}, {t}, {})",
                    l3.shape(),
                    2 * d
                );
            }
            Some(dl)
        } else {
            None
        };
        let lay = &self.layout;
        let p = |i: usize| &w[lay.range(i)];
        let mut ln = take(n * d);
        let mut stats = take(2 * n);
        layer_norm::forward(x, &mut ln, &mut stats, p(NORM_W), p(NORM_B), self.eps);
        let mut qkv = take(n * 3 * d);
        linear_fwd(n, 3 * d, d, &ln, d, p(QKV_W), &mut qkv, 3 * d, false, Par::Pool);
        let qkv_b = p(QKV_B);
        rows_mut(&mut qkv, 3 * d, |r, row| {
            for (v, bias) in row.iter_mut().zip(qkv_b) {
                *v += bias;
            }
            if let Some(delta) = delta {
                let dr = &delta[r * 2 * d..(r + 1) * 2 * d];
                for (v, u) in row[..d].iter_mut().zip(&dr[..d]) {
                    *v += u;
                }
                for (v, u) in row[2 * d..].iter_mut().zip(&dr[d..]) {
                    *v += u;
                }
            }
        });
        // Both are overwritten whole (the products do not accumulate) and go back to the pool
        // after the backward pass, so they come from it too.
        let mut o = take(n * d);
        let mut probs = if self.save { take(b * heads * t * t) } else { Vec::new() };
        attention::forward(&qkv, &mut o, self.save.then_some(probs.as_mut_slice()), self.dims);
        let mut out = zeros(n * d);
        linear_fwd(n, d, d, &o, d, p(PROJ_W), &mut out, d, false, Par::Pool);
        residual_epilogue(&mut out, x, p(PROJ_B), lay.present(LS).then(|| p(LS)), d);
        if self.save {
            let ln = if self.train_weights {
                Some(ln)
            } else {
                give(ln);
                None
            };
            *lock(&self.cache) = Some(AttnCache {
                stats,
                ln,
                qkv,
                probs,
                o,
            });
        } else {
            give_all([ln, stats, qkv, o]);
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        delta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(cache) = lock(&self.cache).take() else {
            bail!("attention half: backward without saved activations (a second backward on the same graph?)")
        };
        let Dims { b, t, d, .. } = self.dims;
        let n = b * t;
        let lay = self.layout.clone();
        let (dx, dw, d_delta) = with_data(x, |x| {
            with_data(w, |w| {
                with_data(grad, |dy| {
                    let p = |i: usize| &w[lay.range(i)];
                    let has_ls = lay.present(LS);
                    let mut dw = if self.train_weights { zeros(lay.len) } else { Vec::new() };
                    // Through the layer scale (no copy without one).
                    let scaled = has_ls.then(|| through_layer_scale(dy, p(LS), d));
                    let d_proj: &[f32] = scaled.as_deref().unwrap_or(dy);
                    if self.train_weights {
                        let mut pw = zeros(d * d);
                        linear_dw(n, d, d, d_proj, d, &cache.o, d, &mut pw, false, Par::Pool);
                        dw[lay.range(PROJ_W)].copy_from_slice(&pw);
                        dw[lay.range(PROJ_B)].copy_from_slice(&col_sums(d_proj, d));
                        if has_ls {
                            // dγ = Σ dy ⊙ (o·Wᵀ + b): recompute the projection.
                            let mut y = zeros(n * d);
                            linear_fwd(n, d, d, &cache.o, d, p(PROJ_W), &mut y, d, false, Par::Pool);
                            let pb = p(PROJ_B);
                            rows_mut(&mut y, d, |_, row| {
                                for (v, bias) in row.iter_mut().zip(pb) {
                                    *v += bias;
                                }
                            });
                            dw[lay.range(LS)].copy_from_slice(&col_dot(dy, &y, d));
                        }
                    }
                    let mut d_o = take(n * d);
                    linear_dx(n, d, d, d_proj, d, p(PROJ_W), &mut d_o, d, false, Par::Pool);
                    if let Some(v) = scaled {
                        give(v);
                    }
                    let mut d_qkv = take(n * 3 * d);
                    attention::backward(&cache.qkv, &cache.probs, &d_o, &mut d_qkv, self.dims);
                    give(d_o);
                    let d_delta = self.has_delta.then(|| {
                        let mut v = zeros(n * 2 * d);
                        rows_mut(&mut v, 2 * d, |r, row| {
                            let src = &d_qkv[r * 3 * d..(r + 1) * 3 * d];
                            row[..d].copy_from_slice(&src[..d]);
                            row[d..].copy_from_slice(&src[2 * d..]);
                        });
                        v
                    });
                    if self.train_weights
                        && let Some(ln) = &cache.ln
                    {
                        let mut qw = zeros(3 * d * d);
                        linear_dw(n, 3 * d, d, &d_qkv, 3 * d, ln, d, &mut qw, false, Par::Pool);
                        dw[lay.range(QKV_W)].copy_from_slice(&qw);
                        if lay.present(QKV_B) {
                            dw[lay.range(QKV_B)].copy_from_slice(&col_sums(&d_qkv, 3 * d));
                        }
                    }
                    let mut d_ln = take(n * d);
                    linear_dx(n, 3 * d, d, &d_qkv, 3 * d, p(QKV_W), &mut d_ln, d, false, Par::Pool);
                    give(d_qkv);
                    // dx = dy (residual) + LayerNorm backward.
                    let mut dx = take(dy.len());
                    dx.copy_from_slice(dy);
                    let (dg, db) = layer_norm::backward(x, &d_ln, &cache.stats, p(NORM_W), &mut dx, true);
                    give(d_ln);
                    if self.train_weights {
                        dw[lay.range(NORM_W)].copy_from_slice(&dg);
                        dw[lay.range(NORM_B)].copy_from_slice(&db);
                    }
                    (dx, dw, d_delta)
                })
            })
        })???;
        let dx = tensor(dx, x.shape())?;
        let dw = if self.train_weights {
            Some(tensor(dw, w.shape())?)
        } else {
            None
        };
        let d_delta = match d_delta {
            Some(v) if delta.track_op() => Some(tensor(v, delta.shape())?),
            _ => None,
        };
        Ok((x.track_op().then_some(dx), dw, d_delta))
    }
}

// ---------------------------------------------------------------------------------------------
// MLP half: x + ls2 ⊙ fc2(GELU(fc1(norm2(x))))

struct MlpCache {
    stats: Vec<f32>,
    ln: Option<Vec<f32>>,
    a: Vec<f32>,
    cdf: Vec<f32>,
    g: Option<Vec<f32>>,
}

impl Drop for MlpCache {
    fn drop(&mut self) {
        let (ln, g) = (self.ln.take().unwrap_or_default(), self.g.take().unwrap_or_default());
        give_all([
            std::mem::take(&mut self.stats),
            ln,
            std::mem::take(&mut self.a),
            std::mem::take(&mut self.cdf),
            g,
        ]);
    }
}

/// The MLP half of a timm block. Arguments: `x (B, T, D)` and the flat weights.
pub struct MlpHalfOp {
    /// Width `D`.
    pub d: usize,
    /// Hidden width.
    pub hidden: usize,
    /// LayerNorm epsilon.
    pub eps: f32,
    /// Where each tensor lives in the flat weights.
    pub layout: Arc<HalfLayout>,
    /// Keep activations for a backward pass.
    pub save: bool,
    /// Form weight gradients (full fine-tuning).
    pub train_weights: bool,
    /// The activation (exact GELU unless [`Self::with_act`]).
    pub act: Activation,
    cache: Mutex<Option<MlpCache>>,
}

impl MlpHalfOp {
    /// A new op.
    #[must_use]
    pub fn new(d: usize, hidden: usize, eps: f32, layout: Arc<HalfLayout>, save: bool, train_weights: bool) -> Self {
        Self {
            d,
            hidden,
            eps,
            layout,
            save,
            train_weights,
            act: Activation::Gelu,
            cache: Mutex::new(None),
        }
    }

    /// The same op with another activation.
    #[must_use]
    pub fn with_act(self, act: Activation) -> Self {
        Self { act, ..self }
    }
}

impl CustomOp2 for MlpHalfOp {
    fn name(&self) -> &'static str {
        "moppa-mlp-half"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (d, hd) = (self.d, self.hidden);
        let (x, w) = (slice(s1, l1, "x")?, slice(s2, l2, "weights")?);
        if x.len() % d != 0 || w.len() != self.layout.len {
            bail!(
                "mlp half: x {:?} / weights {} do not match the block",
                l1.shape(),
                w.len()
            );
        }
        let n = x.len() / d;
        let lay = &self.layout;
        let p = |i: usize| &w[lay.range(i)];
        let mut ln = take(n * d);
        let mut stats = take(2 * n);
        layer_norm::forward(x, &mut ln, &mut stats, p(NORM_W), p(NORM_B), self.eps);
        let mut a = take(n * hd);
        linear_fwd(n, hd, d, &ln, d, p(FC1_W), &mut a, hd, false, Par::Pool);
        let mut g = take(n * hd);
        let mut cdf = take(n * hd);
        // `cdf` keeps Φ(a) for GELU, σ(1.702a) for QuickGELU: what each backward needs.
        match self.act {
            Activation::Gelu => math::bias_gelu(&mut a, &mut g, &mut cdf, p(FC1_B)),
            Activation::QuickGelu => math::bias_quick_gelu(&mut a, &mut g, &mut cdf, p(FC1_B)),
        }
        let mut out = take(n * d);
        linear_fwd(n, d, hd, &g, hd, p(FC2_W), &mut out, d, false, Par::Pool);
        let has_ls = lay.present(LS);
        residual_epilogue(&mut out, x, p(FC2_B), has_ls.then(|| p(LS)), d);
        if self.save {
            let keep_g = self.train_weights || has_ls;
            let ln = if self.train_weights {
                Some(ln)
            } else {
                give(ln);
                None
            };
            let g = if keep_g {
                Some(g)
            } else {
                give(g);
                None
            };
            *lock(&self.cache) = Some(MlpCache { stats, ln, a, cdf, g });
        } else {
            give_all([ln, stats, a, g, cdf]);
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Some(cache) = lock(&self.cache).take() else {
            bail!("mlp half: backward without saved activations (a second backward on the same graph?)")
        };
        let (d, hd) = (self.d, self.hidden);
        let lay = self.layout.clone();
        let (dx, dw) = with_data(x, |x| {
            with_data(w, |w| {
                with_data(grad, |dy| {
                    let n = x.len() / d;
                    let p = |i: usize| &w[lay.range(i)];
                    let has_ls = lay.present(LS);
                    let mut dw = if self.train_weights { zeros(lay.len) } else { Vec::new() };
                    let scaled = has_ls.then(|| through_layer_scale(dy, p(LS), d));
                    let d_fc2: &[f32] = scaled.as_deref().unwrap_or(dy);
                    if self.train_weights
                        && let Some(g) = &cache.g
                    {
                        let mut w2 = zeros(d * hd);
                        linear_dw(n, d, hd, d_fc2, d, g, hd, &mut w2, false, Par::Pool);
                        dw[lay.range(FC2_W)].copy_from_slice(&w2);
                        dw[lay.range(FC2_B)].copy_from_slice(&col_sums(d_fc2, d));
                        if has_ls {
                            let mut y = zeros(n * d);
                            linear_fwd(n, d, hd, g, hd, p(FC2_W), &mut y, d, false, Par::Pool);
                            let fb = p(FC2_B);
                            rows_mut(&mut y, d, |_, row| {
                                for (v, bias) in row.iter_mut().zip(fb) {
                                    *v += bias;
                                }
                            });
                            dw[lay.range(LS)].copy_from_slice(&col_dot(dy, &y, d));
                        }
                    }
                    let mut da = take(n * hd);
                    linear_dx(n, d, hd, d_fc2, d, p(FC2_W), &mut da, hd, false, Par::Pool);
                    if let Some(v) = scaled {
                        give(v);
                    }
                    match self.act {
                        Activation::Gelu => math::gelu_bwd(&mut da, &cache.a, &cache.cdf, hd),
                        Activation::QuickGelu => math::quick_gelu_bwd(&mut da, &cache.a, &cache.cdf, hd),
                    }
                    if self.train_weights
                        && let Some(ln) = &cache.ln
                    {
                        let mut w1 = zeros(hd * d);
                        linear_dw(n, hd, d, &da, hd, ln, d, &mut w1, false, Par::Pool);
                        dw[lay.range(FC1_W)].copy_from_slice(&w1);
                        dw[lay.range(FC1_B)].copy_from_slice(&col_sums(&da, hd));
                    }
                    let mut d_ln = take(n * d);
                    linear_dx(n, hd, d, &da, hd, p(FC1_W), &mut d_ln, d, false, Par::Pool);
                    give(da);
                    let mut dx = take(dy.len());
                    dx.copy_from_slice(dy);
                    let (dg, db) = layer_norm::backward(x, &d_ln, &cache.stats, p(NORM_W), &mut dx, true);
                    give(d_ln);
                    if self.train_weights {
                        dw[lay.range(NORM_W)].copy_from_slice(&dg);
                        dw[lay.range(NORM_B)].copy_from_slice(&db);
                    }
                    (dx, dw)
                })
            })
        })???;
        let dx = x.track_op().then(|| tensor(dx, x.shape())).transpose()?;
        let dw = if self.train_weights {
            Some(tensor(dw, w.shape())?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}
