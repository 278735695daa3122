//! The MLP half of a timm block, `x + ls2 ⊙ fc2(GELU(fc1(norm2(x))))`, with AdaptFormer's
//! bottleneck `s · up(ReLU(down(norm2(x))))` computed inside it.

use super::super::{lock, residual_epilogue, scaled, slice, through_layer_scale, with_data};
use super::{grad_tensor, output_grads, through_input_norm};
use crate::config::Activation;
use crate::model::ops::cpu::gemm::{Par, linear_dw, linear_dx, linear_fwd};
use crate::model::ops::cpu::pool::{give, give_all, take};
use crate::model::ops::cpu::{col_sums, layer_norm, math, rows_mut, zeros};
use crate::model::ops::layout::{FC1_B, FC1_W, FC2_B, FC2_W, HalfLayout, LS, NORM_B, NORM_W};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};
use std::sync::{Arc, Mutex};

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
    /// How its products with weights run: `Pool`, or `PoolBf16` (bf16 operands, f32 accumulation).
    pub par: Par,
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
        let par = self.par;
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
        linear_fwd(n, hd, d, &ln, d, p(FC1_W), &mut a, hd, false, par);
        let mut g = take(n * hd);
        let mut cdf = take(n * hd);
        // `cdf` keeps Φ(a) for GELU, σ(1.702a) for QuickGELU: what each backward needs.
        match self.act {
            Activation::Gelu => math::bias_gelu(&mut a, &mut g, &mut cdf, p(FC1_B)),
            Activation::QuickGelu => math::bias_quick_gelu(&mut a, &mut g, &mut cdf, p(FC1_B)),
        }
        let mut out = take(n * d);
        linear_fwd(n, d, hd, &g, hd, p(FC2_W), &mut out, d, false, par);
        let has_ls = lay.present(LS);
        let up_b = adapter.map(|((_, _, _, ub), _, s)| scaled(ub, s));
        residual_epilogue(&mut out, x, p(FC2_B), has_ls.then(|| p(LS)), up_b.as_deref(), d);
        // AdaptFormer: u = ReLU(h·W_downᵀ + b_down), out += u·(s·W_up)ᵀ.
        let side = if let Some(((dw, db, uw, _), r, s)) = adapter {
            let mut u = take(n * r);
            linear_fwd(n, r, d, &ln, d, dw, &mut u, r, false, par);
            rows_mut(&mut u, r, |_, row| {
                for (v, b) in row.iter_mut().zip(db) {
                    *v = (*v + b).max(0.0);
                }
            });
            linear_fwd(n, d, r, &u, r, &scaled(uw, s), &mut out, d, true, par);
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
        let par = self.par;
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
                            linear_dx(n, d, r, dy, d, &scaled(uw, scale), &mut g, r, false, par);
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
                                linear_dw(n, r, d, &g, r, ln, d, ddw, false, par);
                                ddb.copy_from_slice(&col_sums(&g, r));
                                linear_dw(n, d, r, dy, d, &cache.side, r, duw, false, par);
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
                                output_grads(&mut dw, &lay, (w, par), (FC2_W, FC2_B), (g, hd), dy, d_fc2);
                            }
                            let mut da = take(n * hd);
                            linear_dx(n, d, hd, d_fc2, d, p(FC2_W), &mut da, hd, false, par);
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
                                linear_dw(n, hd, d, &da, hd, ln, d, &mut dw[lay.range(FC1_W)], false, par);
                                dw[lay.range(FC1_B)].copy_from_slice(&col_sums(&da, hd));
                            }
                            let mut d_ln = take(n * d);
                            linear_dx(n, hd, d, &da, hd, p(FC1_W), &mut d_ln, d, false, par);
                            give(da);
                            if let (MlpSide::AdaptFormer { rank: r, .. }, Some(g)) = (self.side, &du) {
                                let (dwn, _, _, _) = adaptformer_parts(side, r, d);
                                linear_dx(n, r, d, g, r, dwn, &mut d_ln, d, true, par);
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
        Ok((
            grad_tensor(dx, need_dx, x.shape())?,
            grad_tensor(dw, self.train_weights, w.shape())?,
            grad_tensor(d_side, side_grad, third.shape())?,
        ))
    }
}
