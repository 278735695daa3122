//! The two half-block ops ([`AttnHalfOp`], [`MlpHalfOp`]): a whole timm transformer half in one
//! node of candle's graph, activations kept inside the op only when a gradient will be needed and
//! released by the backward pass (see the parent module).

use super::super::cpu::attention::{self, Dims};
use super::super::cpu::gemm::{Par, linear_dw, linear_dx, linear_fwd};
use super::super::cpu::pool::{give, give_all, take};
use super::super::cpu::{col_dot, col_sums, layer_norm, math, rows_mut, zeros};
use super::super::layout::{FC1_B, FC1_W, FC2_B, FC2_W, HalfLayout, LS, NORM_B, NORM_W, PROJ_B, PROJ_W, QKV_B, QKV_W};
use super::{lock, residual_epilogue, scaled, slice, tensor, through_layer_scale, with_data};
use crate::config::Activation;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};
use std::sync::{Arc, Mutex};

/// The gradients of a half's output layer `y = h·Wᵀ + b` (then `x + ls ⊙ y`), written straight
/// into the flat gradient buffer `dw`: `dW` and `db` from `d_out` (`dy` through the layer scale),
/// and with layer scale `dγ = Σ dy ⊙ y` (recomputing `y`). `(h, k)`: the layer's input and width.
fn output_grads(
    dw: &mut [f32],
    lay: &HalfLayout,
    w: &[f32],
    (w_slot, b_slot): (usize, usize),
    (h, k): (&[f32], usize),
    dy: &[f32],
    d_out: &[f32],
) {
    let d = lay.slots[b_slot].len();
    let n = dy.len() / d.max(1);
    linear_dw(n, d, k, d_out, d, h, k, &mut dw[lay.range(w_slot)], false, Par::Pool);
    dw[lay.range(b_slot)].copy_from_slice(&col_sums(d_out, d));
    if lay.present(LS) {
        let mut y = take(n * d);
        linear_fwd(n, d, k, h, k, &w[lay.range(w_slot)], &mut y, d, false, Par::Pool);
        let bias = &w[lay.range(b_slot)];
        rows_mut(&mut y, d, |_, row| {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        });
        dw[lay.range(LS)].copy_from_slice(&col_dot(dy, &y, d));
        give(y);
    }
}

/// A half's input side backward: `dx = dy` (the residual) `+` the LayerNorm's backward of `d_ln`
/// (given back to the pool), and, when `dw` is given, the norm's `dγ`, `dβ` into it.
fn through_input_norm(
    x: &[f32],
    dy: &[f32],
    d_ln: Vec<f32>,
    stats: &[f32],
    w: &[f32],
    lay: &HalfLayout,
    dw: Option<&mut Vec<f32>>,
) -> Vec<f32> {
    let mut dx = take(dy.len());
    dx.copy_from_slice(dy);
    let (dg, db) = layer_norm::backward(x, &d_ln, stats, &w[lay.range(NORM_W)], &mut dx, true);
    give(d_ln);
    if let Some(dw) = dw {
        dw[lay.range(NORM_W)].copy_from_slice(&dg);
        dw[lay.range(NORM_B)].copy_from_slice(&db);
    }
    dx
}

// ---------------------------------------------------------------------------------------------
// Attention half: x + ls1 ⊙ proj(attn(qkv(norm1(x)) [+ Δq, Δv]))

/// What the attention half's third argument holds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AttnSide {
    /// Nothing: a 1-element placeholder.
    None,
    /// A precomputed `(Δq, Δv)` update, `(B, T, 2D)`.
    Delta,
    /// LoRA on q and v, computed inside from `norm1(x)`: its parameters packed flat as
    /// `[A_q; A_v]` (`2r × D`), `B_q` (`D × r`), `B_v` (`D × r`); `Δq = scale · B_q A_q h`.
    Lora {
        /// Rank `r`.
        rank: usize,
        /// `α / r`.
        scale: f32,
    },
}

/// The packed LoRA parameters as `(A (2r × D), B_q (D × r), B_v (D × r))`.
fn lora_parts(p: &[f32], r: usize, d: usize) -> (&[f32], &[f32], &[f32]) {
    let (a, b) = p.split_at(2 * r * d);
    let (bq, bv) = b.split_at(d * r);
    (a, bq, bv)
}

struct AttnCache {
    stats: Vec<f32>,
    ln: Option<Vec<f32>>,
    qkv: Vec<f32>,
    probs: Vec<f32>,
    o: Vec<f32>,
    /// LoRA's `h·[A_q; A_v]ᵀ`, `n × 2r` (empty without LoRA).
    z: Vec<f32>,
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
            std::mem::take(&mut self.z),
        ]);
    }
}

/// The attention half of a timm block. Arguments: `x (B, T, D)`, the flat weights, and what
/// [`AttnSide`] says (a LoRA update, LoRA's parameters, or any 1-element placeholder).
pub struct AttnHalfOp {
    /// Images, tokens, width, heads.
    pub dims: Dims,
    /// LayerNorm epsilon.
    pub eps: f32,
    /// Where each tensor lives in the flat weights.
    pub layout: Arc<HalfLayout>,
    /// What the third argument is.
    pub side: AttnSide,
    /// Keep activations for a backward pass.
    pub save: bool,
    /// Form weight gradients (full fine-tuning).
    pub train_weights: bool,
    /// The third argument is trainable (keep what its gradient needs).
    pub train_side: bool,
    cache: Mutex<Option<AttnCache>>,
}

impl AttnHalfOp {
    /// A new op; `save`/`train_weights`/`train_side` follow from which arguments need gradients.
    #[must_use]
    pub fn new(
        dims: Dims,
        eps: f32,
        layout: Arc<HalfLayout>,
        side: AttnSide,
        save: bool,
        train_weights: bool,
        train_side: bool,
    ) -> Self {
        Self {
            dims,
            eps,
            layout,
            side,
            save,
            train_weights,
            train_side,
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
        let third = slice(s3, l3, "third argument")?;
        let delta = match self.side {
            AttnSide::Delta if third.len() != n * 2 * d => bail!(
                "attention half: LoRA update {:?}, expected ({b}, {t}, {})",
                l3.shape(),
                2 * d
            ),
            AttnSide::Lora { rank, .. } if third.len() != 4 * rank * d => {
                bail!("attention half: {} LoRA parameters, expected 4·{rank}·{d}", third.len())
            }
            AttnSide::Delta => Some(third),
            _ => None,
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
        // LoRA: z = h·[A_q; A_v]ᵀ, then q += z_q·(s·B_q)ᵀ and v += z_v·(s·B_v)ᵀ straight into
        // the qkv rows (row stride 3D).
        let z = if let AttnSide::Lora { rank: r, scale } = self.side {
            let (a, bq, bv) = lora_parts(third, r, d);
            let mut z = take(n * 2 * r);
            linear_fwd(n, 2 * r, d, &ln, d, a, &mut z, 2 * r, false, Par::Pool);
            linear_fwd(n, d, r, &z, 2 * r, &scaled(bq, scale), &mut qkv, 3 * d, true, Par::Pool);
            linear_fwd(
                n,
                d,
                r,
                &z[r..],
                2 * r,
                &scaled(bv, scale),
                &mut qkv[2 * d..],
                3 * d,
                true,
                Par::Pool,
            );
            z
        } else {
            Vec::new()
        };
        // Both are overwritten whole (the products do not accumulate) and go back to the pool
        // after the backward pass, so they come from it too.
        let mut o = take(n * d);
        let mut probs = if self.save { take(b * heads * t * t) } else { Vec::new() };
        attention::forward(&qkv, &mut o, self.save.then_some(probs.as_mut_slice()), self.dims);
        let mut out = zeros(n * d);
        linear_fwd(n, d, d, &o, d, p(PROJ_W), &mut out, d, false, Par::Pool);
        residual_epilogue(&mut out, x, p(PROJ_B), lay.present(LS).then(|| p(LS)), None, d);
        if self.save {
            let keep_ln = self.train_weights || (self.train_side && matches!(self.side, AttnSide::Lora { .. }));
            let ln = if keep_ln {
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
                z,
            });
        } else {
            give_all([ln, stats, qkv, o, z]);
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        third: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(cache) = lock(&self.cache).take() else {
            bail!("attention half: backward without saved activations (a second backward on the same graph?)")
        };
        let Dims { b, t, d, .. } = self.dims;
        let n = b * t;
        let lay = self.layout.clone();
        let need_dx = x.track_op();
        let side_grad = third.track_op() && self.side != AttnSide::None;
        let (dx, dw, d_side) = with_data(x, |x| {
            with_data(w, |w| {
                with_data(third, |side| {
                    with_data(grad, |dy| {
                        let p = |i: usize| &w[lay.range(i)];
                        let has_ls = lay.present(LS);
                        let mut dw = if self.train_weights { zeros(lay.len) } else { Vec::new() };
                        // Through the layer scale (no copy without one).
                        let scaled_dy = has_ls.then(|| through_layer_scale(dy, p(LS), d));
                        let d_proj: &[f32] = scaled_dy.as_deref().unwrap_or(dy);
                        if self.train_weights {
                            output_grads(&mut dw, &lay, w, (PROJ_W, PROJ_B), (&cache.o, d), dy, d_proj);
                        }
                        let mut d_o = take(n * d);
                        linear_dx(n, d, d, d_proj, d, p(PROJ_W), &mut d_o, d, false, Par::Pool);
                        if let Some(v) = scaled_dy {
                            give(v);
                        }
                        let mut d_qkv = take(n * 3 * d);
                        attention::backward(&cache.qkv, &cache.probs, &d_o, &mut d_qkv, self.dims);
                        give(d_o);
                        let mut d_side = Vec::new();
                        // LoRA's input gradient dz = [d_q·(s·B_q), d_v·(s·B_v)], n × 2r.
                        let mut lora_dz = None;
                        match self.side {
                            AttnSide::Delta => {
                                if side_grad {
                                    d_side = zeros(n * 2 * d);
                                    rows_mut(&mut d_side, 2 * d, |r, row| {
                                        let src = &d_qkv[r * 3 * d..(r + 1) * 3 * d];
                                        row[..d].copy_from_slice(&src[..d]);
                                        row[d..].copy_from_slice(&src[2 * d..]);
                                    });
                                }
                            }
                            AttnSide::Lora { rank: r, scale } if side_grad || need_dx || self.train_weights => {
                                let (_, bq, bv) = lora_parts(side, r, d);
                                let mut dz = take(n * 2 * r);
                                linear_dx(
                                    n,
                                    d,
                                    r,
                                    &d_qkv,
                                    3 * d,
                                    &scaled(bq, scale),
                                    &mut dz,
                                    2 * r,
                                    false,
                                    Par::Pool,
                                );
                                linear_dx(
                                    n,
                                    d,
                                    r,
                                    &d_qkv[2 * d..],
                                    3 * d,
                                    &scaled(bv, scale),
                                    &mut dz[r..],
                                    2 * r,
                                    false,
                                    Par::Pool,
                                );
                                if side_grad && let Some(ln) = &cache.ln {
                                    // Packed like the parameters: dA (2r × D), dB_q, dB_v (D × r).
                                    d_side = zeros(4 * r * d);
                                    let (da, db) = d_side.split_at_mut(2 * r * d);
                                    let (dbq, dbv) = db.split_at_mut(d * r);
                                    linear_dw(n, 2 * r, d, &dz, 2 * r, ln, d, da, false, Par::Pool);
                                    linear_dw(n, d, r, &d_qkv, 3 * d, &cache.z, 2 * r, dbq, false, Par::Pool);
                                    linear_dw(
                                        n,
                                        d,
                                        r,
                                        &d_qkv[2 * d..],
                                        3 * d,
                                        &cache.z[r..],
                                        2 * r,
                                        dbv,
                                        false,
                                        Par::Pool,
                                    );
                                    for v in db.iter_mut() {
                                        *v *= scale;
                                    }
                                }
                                lora_dz = Some(dz);
                            }
                            AttnSide::None | AttnSide::Lora { .. } => {}
                        }
                        if self.train_weights
                            && let Some(ln) = &cache.ln
                        {
                            linear_dw(
                                n,
                                3 * d,
                                d,
                                &d_qkv,
                                3 * d,
                                ln,
                                d,
                                &mut dw[lay.range(QKV_W)],
                                false,
                                Par::Pool,
                            );
                            if lay.present(QKV_B) {
                                dw[lay.range(QKV_B)].copy_from_slice(&col_sums(&d_qkv, 3 * d));
                            }
                        }
                        // Nothing upstream needs dx (the first block of a frozen backbone): the
                        // LayerNorm's backward and the input-gradient products are skipped.
                        let mut dx = Vec::new();
                        if need_dx || self.train_weights {
                            let mut d_ln = take(n * d);
                            linear_dx(n, 3 * d, d, &d_qkv, 3 * d, p(QKV_W), &mut d_ln, d, false, Par::Pool);
                            if let (AttnSide::Lora { rank: r, .. }, Some(dz)) = (self.side, &lora_dz) {
                                let (a, _, _) = lora_parts(side, r, d);
                                linear_dx(n, 2 * r, d, dz, 2 * r, a, &mut d_ln, d, true, Par::Pool);
                            }
                            dx = through_input_norm(
                                x,
                                dy,
                                d_ln,
                                &cache.stats,
                                w,
                                &lay,
                                self.train_weights.then_some(&mut dw),
                            );
                        }
                        if let Some(dz) = lora_dz {
                            give(dz);
                        }
                        give(d_qkv);
                        (dx, dw, d_side)
                    })
                })
            })
        })????;
        let dx = if need_dx {
            Some(tensor(dx, x.shape())?)
        } else {
            give(dx);
            None
        };
        let dw = if self.train_weights {
            Some(tensor(dw, w.shape())?)
        } else {
            None
        };
        let d_side = if side_grad {
            Some(tensor(d_side, third.shape())?)
        } else {
            None
        };
        Ok((dx, dw, d_side))
    }
}

// ---------------------------------------------------------------------------------------------
// MLP half: x + ls2 ⊙ fc2(GELU(fc1(norm2(x)))) [+ s · up(ReLU(down(norm2(x))))]

/// What the MLP half's third argument holds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MlpSide {
    /// Nothing: a 1-element placeholder.
    None,
    /// AdaptFormer beside the MLP, computed from `norm2(x)`: its parameters packed flat as
    /// `down.weight` (`r × D`), `down.bias` (`r`), `up.weight` (`D × r`), `up.bias` (`D`); the
    /// update `scale · up(ReLU(down(h)))` is added outside the layer scale.
    AdaptFormer {
        /// Bottleneck width `r`.
        rank: usize,
        /// The output scale (0.1).
        scale: f32,
    },
}

/// The packed AdaptFormer parameters as `(down_w, down_b, up_w, up_b)`.
fn adaptformer_parts(p: &[f32], r: usize, d: usize) -> (&[f32], &[f32], &[f32], &[f32]) {
    let (dw, rest) = p.split_at(r * d);
    let (db, rest) = rest.split_at(r);
    let (uw, ub) = rest.split_at(d * r);
    (dw, db, uw, ub)
}

struct MlpCache {
    stats: Vec<f32>,
    ln: Option<Vec<f32>>,
    a: Vec<f32>,
    cdf: Vec<f32>,
    g: Option<Vec<f32>>,
    /// AdaptFormer's `ReLU(down(h))`, `n × r` (empty without it).
    side: Vec<f32>,
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
            std::mem::take(&mut self.side),
        ]);
    }
}

/// The MLP half of a timm block. Arguments: `x (B, T, D)`, the flat weights, and what [`MlpSide`]
/// says (AdaptFormer's parameters, or any 1-element placeholder).
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
    /// What the third argument is (nothing unless [`Self::with_side`]).
    pub side: MlpSide,
    /// The third argument is trainable.
    pub train_side: bool,
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
            side: MlpSide::None,
            train_side: false,
            cache: Mutex::new(None),
        }
    }

    /// The same op with another activation.
    #[must_use]
    pub fn with_act(self, act: Activation) -> Self {
        Self { act, ..self }
    }

    /// The same op with a side path (trainable or not).
    #[must_use]
    pub fn with_side(self, side: MlpSide, train_side: bool) -> Self {
        Self {
            side,
            train_side,
            ..self
        }
    }
}

impl CustomOp3 for MlpHalfOp {
    fn name(&self) -> &'static str {
        "moppa-mlp-half"
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
        let (d, hd) = (self.d, self.hidden);
        let (x, w) = (slice(s1, l1, "x")?, slice(s2, l2, "weights")?);
        if x.len() % d != 0 || w.len() != self.layout.len {
            bail!(
                "mlp half: x {:?} / weights {} do not match the block",
                l1.shape(),
                w.len()
            );
        }
        let third = slice(s3, l3, "third argument")?;
        let adapter = match self.side {
            MlpSide::AdaptFormer { rank, scale } => {
                if third.len() != 2 * rank * d + rank + d {
                    bail!(
                        "mlp half: {} AdaptFormer parameters for rank {rank}, width {d}",
                        third.len()
                    );
                }
                Some((adaptformer_parts(third, rank, d), rank, scale))
            }
            MlpSide::None => None,
        };
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
        let up_b = adapter.map(|((_, _, _, ub), _, s)| scaled(ub, s));
        residual_epilogue(&mut out, x, p(FC2_B), has_ls.then(|| p(LS)), up_b.as_deref(), d);
        // AdaptFormer: u = ReLU(h·W_downᵀ + b_down), out += u·(s·W_up)ᵀ.
        let side = if let Some(((dw, db, uw, _), r, s)) = adapter {
            let mut u = take(n * r);
            linear_fwd(n, r, d, &ln, d, dw, &mut u, r, false, Par::Pool);
            rows_mut(&mut u, r, |_, row| {
                for (v, b) in row.iter_mut().zip(db) {
                    *v = (*v + b).max(0.0);
                }
            });
            linear_fwd(n, d, r, &u, r, &scaled(uw, s), &mut out, d, true, Par::Pool);
            u
        } else {
            Vec::new()
        };
        if self.save {
            let keep_g = self.train_weights || has_ls;
            let keep_ln = self.train_weights || (self.train_side && adapter.is_some());
            let ln = if keep_ln {
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
            *lock(&self.cache) = Some(MlpCache {
                stats,
                ln,
                a,
                cdf,
                g,
                side,
            });
        } else {
            give_all([ln, stats, a, g, cdf, side]);
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        third: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(cache) = lock(&self.cache).take() else {
            bail!("mlp half: backward without saved activations (a second backward on the same graph?)")
        };
        let (d, hd) = (self.d, self.hidden);
        let lay = self.layout.clone();
        let need_dx = x.track_op();
        let side_grad = third.track_op() && self.side != MlpSide::None;
        let (dx, dw, d_side) = with_data(x, |x| {
            with_data(w, |w| {
                with_data(third, |side| {
                    with_data(grad, |dy| {
                        let n = x.len() / d;
                        let p = |i: usize| &w[lay.range(i)];
                        let has_ls = lay.present(LS);
                        let need_main = need_dx || self.train_weights;
                        // AdaptFormer: du = dy·(s·W_up) through the ReLU (n × r), its parameter
                        // gradients, and (below) its share of d_ln.
                        let mut d_side = Vec::new();
                        let mut du = None;
                        if let MlpSide::AdaptFormer { rank: r, scale } = self.side
                            && (side_grad || need_main)
                        {
                            let (_, _, uw, _) = adaptformer_parts(side, r, d);
                            let mut g = take(n * r);
                            linear_dx(n, d, r, dy, d, &scaled(uw, scale), &mut g, r, false, Par::Pool);
                            rows_mut(&mut g, r, |i, row| {
                                for (v, u) in row.iter_mut().zip(&cache.side[i * r..(i + 1) * r]) {
                                    if *u <= 0.0 {
                                        *v = 0.0;
                                    }
                                }
                            });
                            if side_grad && let Some(ln) = &cache.ln {
                                d_side = zeros(2 * r * d + r + d);
                                let (ddw, rest) = d_side.split_at_mut(r * d);
                                let (ddb, rest) = rest.split_at_mut(r);
                                let (duw, dub) = rest.split_at_mut(d * r);
                                linear_dw(n, r, d, &g, r, ln, d, ddw, false, Par::Pool);
                                ddb.copy_from_slice(&col_sums(&g, r));
                                linear_dw(n, d, r, dy, d, &cache.side, r, duw, false, Par::Pool);
                                for v in duw.iter_mut() {
                                    *v *= scale;
                                }
                                for (v, s) in dub.iter_mut().zip(col_sums(dy, d)) {
                                    *v = s * scale;
                                }
                            }
                            du = Some(g);
                        }
                        let mut dw = if self.train_weights { zeros(lay.len) } else { Vec::new() };
                        let mut dx = Vec::new();
                        // Nothing upstream needs dx (the first block of a frozen backbone): the
                        // MLP's own backward is skipped.
                        if need_main {
                            let scaled_dy = has_ls.then(|| through_layer_scale(dy, p(LS), d));
                            let d_fc2: &[f32] = scaled_dy.as_deref().unwrap_or(dy);
                            if self.train_weights
                                && let Some(g) = &cache.g
                            {
                                output_grads(&mut dw, &lay, w, (FC2_W, FC2_B), (g, hd), dy, d_fc2);
                            }
                            let mut da = take(n * hd);
                            linear_dx(n, d, hd, d_fc2, d, p(FC2_W), &mut da, hd, false, Par::Pool);
                            if let Some(v) = scaled_dy {
                                give(v);
                            }
                            match self.act {
                                Activation::Gelu => math::gelu_bwd(&mut da, &cache.a, &cache.cdf, hd),
                                Activation::QuickGelu => math::quick_gelu_bwd(&mut da, &cache.a, &cache.cdf, hd),
                            }
                            if self.train_weights
                                && let Some(ln) = &cache.ln
                            {
                                linear_dw(n, hd, d, &da, hd, ln, d, &mut dw[lay.range(FC1_W)], false, Par::Pool);
                                dw[lay.range(FC1_B)].copy_from_slice(&col_sums(&da, hd));
                            }
                            let mut d_ln = take(n * d);
                            linear_dx(n, hd, d, &da, hd, p(FC1_W), &mut d_ln, d, false, Par::Pool);
                            give(da);
                            if let (MlpSide::AdaptFormer { rank: r, .. }, Some(g)) = (self.side, &du) {
                                let (dwn, _, _, _) = adaptformer_parts(side, r, d);
                                linear_dx(n, r, d, g, r, dwn, &mut d_ln, d, true, Par::Pool);
                            }
                            dx = through_input_norm(
                                x,
                                dy,
                                d_ln,
                                &cache.stats,
                                w,
                                &lay,
                                self.train_weights.then_some(&mut dw),
                            );
                        }
                        if let Some(g) = du {
                            give(g);
                        }
                        (dx, dw, d_side)
                    })
                })
            })
        })????;
        let dx = if need_dx {
            Some(tensor(dx, x.shape())?)
        } else {
            give(dx);
            None
        };
        let dw = if self.train_weights {
            Some(tensor(dw, w.shape())?)
        } else {
            None
        };
        let d_side = if side_grad {
            Some(tensor(d_side, third.shape())?)
        } else {
            None
        };
        Ok((dx, dw, d_side))
    }
}
