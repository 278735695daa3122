//! candle custom ops wrapping the CPU kernels, with explicit backward passes.
//!
//! The two "half-block" ops run a whole timm transformer half (LayerNorm → qkv → attention →
//! projection → residual, and LayerNorm → fc1 → GELU → fc2 → residual) in one node of candle's
//! graph. Their activations are kept inside the op (only when a gradient will be needed) and
//! released by the backward pass. Weight gradients are formed only when the flat weight buffer is
//! trainable (a `Var`): a frozen backbone costs input gradients only.

use super::cpu::attention::{self, Dims};
use super::cpu::gemm::{Par, linear_dw, linear_dx, linear_fwd};
use super::cpu::pool::{give, give_all, take};
use super::cpu::{col_dot, col_sums, layer_norm, math, rows_mut, zeros};
use super::layout::{FC1_B, FC1_W, FC2_B, FC2_W, HalfLayout, LS, NORM_B, NORM_W, PROJ_B, PROJ_W, QKV_B, QKV_W};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Device, Layout, Result, Shape, Storage, Tensor, bail};
use std::sync::{Arc, Mutex};

fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("fused op: {what} must be contiguous"),
    }
}

/// A half-block's residual epilogue, row by row: `out ← x + ls ⊙ (out + bias)`, or
/// `x + out + bias` without layer scale.
fn residual_epilogue(out: &mut [f32], x: &[f32], bias: &[f32], ls: Option<&[f32]>, d: usize) {
    rows_mut(out, d, |r, row| {
        let xr = &x[r * d..(r + 1) * d];
        if let Some(ls) = ls {
            for (((v, xv), b), g) in row.iter_mut().zip(xr).zip(bias).zip(ls) {
                *v = xv + g * (*v + b);
            }
        } else {
            for ((v, xv), b) in row.iter_mut().zip(xr).zip(bias) {
                *v = xv + *v + b;
            }
        }
    });
}

/// Runs `f` on the contiguous `f32` data of a CPU tensor.
fn with_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(c) => Ok(f(slice(c, l, "tensor")?)),
        _ => bail!("fused CPU op given a non-CPU tensor"),
    }
}

fn tensor(v: Vec<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// LayerNorm

/// `LayerNorm(x; γ, β)` over the last dimension.
pub struct LayerNormOp {
    /// Epsilon.
    pub eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "moppa-layer-norm"
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
        let (x, g, b) = (slice(s1, l1, "x")?, slice(s2, l2, "gamma")?, slice(s3, l3, "beta")?);
        let d = g.len();
        if d == 0 || x.len() % d != 0 || b.len() != d {
            bail!("layer norm: x {:?} does not match gamma {d}", l1.shape());
        }
        let mut y = zeros(x.len());
        let mut stats = zeros(2 * x.len() / d);
        layer_norm::forward(x, &mut y, &mut stats, g, b, self.eps);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        g: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = g.elem_count();
        let (dx, dg, db) = with_data(x, |x| {
            with_data(g, |gv| {
                with_data(grad, |dy| {
                    // Recomputing the row statistics is cheaper than keeping them.
                    let mut stats = zeros(2 * x.len() / d);
                    let mut scratch = zeros(x.len());
                    layer_norm::forward(x, &mut scratch, &mut stats, gv, &vec![0.0; d], self.eps);
                    let mut dx = scratch;
                    let (dg, db) = layer_norm::backward(x, dy, &stats, gv, &mut dx, false);
                    (dx, dg, db)
                })
            })
        })???;
        let dx = x.track_op().then(|| tensor(dx, x.shape())).transpose()?;
        let dg = g.track_op().then(|| tensor(dg, g.shape())).transpose()?;
        let db = b.track_op().then(|| tensor(db, b.shape())).transpose()?;
        Ok((dx, dg, db))
    }
}

// ---------------------------------------------------------------------------------------------
// Linear

/// `y = x·Wᵀ + b` over the last dimension; the backward forms `dW`, `db` only for trainable
/// arguments.
pub struct LinearOp;

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "moppa-linear"
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
        let (x, w, b) = (slice(s1, l1, "x")?, slice(s2, l2, "weight")?, slice(s3, l3, "bias")?);
        let (n_out, k) = l2.shape().dims2()?;
        let dims = l1.shape().dims();
        if dims.last() != Some(&k) || b.len() != n_out {
            bail!(
                "linear: x {dims:?} does not match weight ({n_out}, {k}) / bias {}",
                b.len()
            );
        }
        let m = x.len() / k.max(1);
        let mut y = zeros(m * n_out);
        rows_mut(&mut y, n_out, |_, row| row.copy_from_slice(b));
        linear_fwd(m, n_out, k, x, k, w, &mut y, n_out, true, Par::Pool);
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = n_out;
        }
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n_out, k) = w.dims2()?;
        let m = x.elem_count() / k.max(1);
        let dx = if x.track_op() {
            let v = with_data(grad, |dy| {
                with_data(w, |wv| {
                    let mut dx = zeros(m * k);
                    linear_dx(m, n_out, k, dy, n_out, wv, &mut dx, k, false, Par::Pool);
                    dx
                })
            })??;
            Some(tensor(v, x.shape())?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let v = with_data(grad, |dy| {
                with_data(x, |xv| {
                    let mut dw = zeros(n_out * k);
                    linear_dw(m, n_out, k, dy, n_out, xv, k, &mut dw, false, Par::Pool);
                    dw
                })
            })??;
            Some(tensor(v, w.shape())?)
        } else {
            None
        };
        let db = if b.track_op() {
            Some(tensor(with_data(grad, |dy| col_sums(dy, n_out))?, b.shape())?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

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
            cache: Mutex::new(None),
        }
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
        math::bias_gelu(&mut a, &mut g, &mut cdf, p(FC1_B));
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
                    math::gelu_bwd(&mut da, &cache.a, &cache.cdf, hd);
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

// ---------------------------------------------------------------------------------------------
// GELU (exact) on its own, for composite paths that want the fast kernel.

/// Exact GELU with an explicit backward.
pub struct GeluOp;

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "moppa-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "x")?;
        let mut y = zeros(x.len());
        math::gelu_slice(x, &mut y);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let v = with_data(x, |xv| {
            with_data(grad, |dy| {
                let mut d = dy.to_vec();
                math::gelu_bwd_recompute(&mut d, xv);
                d
            })
        })??;
        Ok(Some(tensor(v, x.shape())?))
    }
}

/// `dy` times the layer scale `ls` per channel (rows of `d`), in a pooled buffer: the gradient
/// that reaches the projection of a half-block with layer scale.
fn through_layer_scale(dy: &[f32], ls: &[f32], d: usize) -> Vec<f32> {
    let mut v = take(dy.len());
    v.copy_from_slice(dy);
    rows_mut(&mut v, d, |_, row| {
        for (a, g) in row.iter_mut().zip(ls) {
            *a *= g;
        }
    });
    v
}
