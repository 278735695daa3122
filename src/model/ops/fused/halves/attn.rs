//! The attention half of a timm block, `x + ls1 ⊙ proj(attn(qkv(norm1(x)) [+ Δq, Δv]))`, with
//! LoRA on q and v computed inside it.

use super::super::{lock, residual_epilogue, scaled, slice, through_layer_scale, with_data};
use super::{grad_tensor, output_grads, through_input_norm};
use crate::model::ops::cpu::attention::{self, Dims};
use crate::model::ops::cpu::gemm::{Par, linear_dw, linear_dx, linear_fwd};
use crate::model::ops::cpu::pool::{give, give_all, take};
use crate::model::ops::cpu::{col_sums, layer_norm, rows_mut, zeros};
use crate::model::ops::layout::{HalfLayout, LS, NORM_B, NORM_W, PROJ_B, PROJ_W, QKV_B, QKV_W};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};
use std::sync::{Arc, Mutex};

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
    /// How its products with weights run: `Pool`, or `PoolBf16` (bf16 operands, f32 accumulation).
    pub par: Par,
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
            par: Par::Pool,
            cache: Mutex::new(None),
        }
    }

    /// The same op with its products with weights formed from bf16 operands, or not.
    #[must_use]
    pub fn with_bf16(self, bf16: bool) -> Self {
        Self {
            par: Par::pool(bf16),
            ..self
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
        let par = self.par;
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
        linear_fwd(n, 3 * d, d, &ln, d, p(QKV_W), &mut qkv, 3 * d, false, par);
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
            linear_fwd(n, 2 * r, d, &ln, d, a, &mut z, 2 * r, false, par);
            linear_fwd(n, d, r, &z, 2 * r, &scaled(bq, scale), &mut qkv, 3 * d, true, par);
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
                par,
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
        linear_fwd(n, d, d, &o, d, p(PROJ_W), &mut out, d, false, par);
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
        let par = self.par;
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
                            output_grads(&mut dw, &lay, (w, par), (PROJ_W, PROJ_B), (&cache.o, d), dy, d_proj);
                        }
                        let mut d_o = take(n * d);
                        linear_dx(n, d, d, d_proj, d, p(PROJ_W), &mut d_o, d, false, par);
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
                                linear_dx(n, d, r, &d_qkv, 3 * d, &scaled(bq, scale), &mut dz, 2 * r, false, par);
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
                                    par,
                                );
                                if side_grad && let Some(ln) = &cache.ln {
                                    // Packed like the parameters: dA (2r × D), dB_q, dB_v (D × r).
                                    d_side = zeros(4 * r * d);
                                    let (da, db) = d_side.split_at_mut(2 * r * d);
                                    let (dbq, dbv) = db.split_at_mut(d * r);
                                    linear_dw(n, 2 * r, d, &dz, 2 * r, ln, d, da, false, par);
                                    linear_dw(n, d, r, &d_qkv, 3 * d, &cache.z, 2 * r, dbq, false, par);
                                    linear_dw(n, d, r, &d_qkv[2 * d..], 3 * d, &cache.z[r..], 2 * r, dbv, false, par);
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
                            linear_dw(n, 3 * d, d, &d_qkv, 3 * d, ln, d, &mut dw[lay.range(QKV_W)], false, par);
                            if lay.present(QKV_B) {
                                dw[lay.range(QKV_B)].copy_from_slice(&col_sums(&d_qkv, 3 * d));
                            }
                        }
                        // Nothing upstream needs dx (the first block of a frozen backbone): the
                        // LayerNorm's backward and the input-gradient products are skipped.
                        let mut dx = Vec::new();
                        if need_dx || self.train_weights {
                            let mut d_ln = take(n * d);
                            linear_dx(n, 3 * d, d, &d_qkv, 3 * d, p(QKV_W), &mut d_ln, d, false, par);
                            if let (AttnSide::Lora { rank: r, .. }, Some(dz)) = (self.side, &lora_dz) {
                                let (a, _, _) = lora_parts(side, r, d);
                                linear_dx(n, 2 * r, d, dz, 2 * r, a, &mut d_ln, d, true, par);
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
        Ok((
            grad_tensor(dx, need_dx, x.shape())?,
            grad_tensor(dw, self.train_weights, w.shape())?,
            grad_tensor(d_side, side_grad, third.shape())?,
        ))
    }
}
