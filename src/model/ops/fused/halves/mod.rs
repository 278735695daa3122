//! The two half-block ops ([`AttnHalfOp`], [`MlpHalfOp`]): a whole timm transformer half in one
//! node of candle's graph, activations kept inside the op only when a gradient will be needed and
//! released by the backward pass (see the parent module).
//!
//! `attn` holds the attention half (with LoRA inside it), `mlp` the MLP half (with AdaptFormer
//! beside it); both end their backward passes through the helpers here.

mod attn;
mod mlp;

pub use attn::{AttnHalfOp, AttnSide};
pub use mlp::{MlpHalfOp, MlpSide};

use super::tensor;
use crate::model::ops::cpu::gemm::{Par, linear_dw, linear_fwd};
use crate::model::ops::cpu::pool::{give, take};
use crate::model::ops::cpu::{col_dot, col_sums, layer_norm, rows_mut};
use crate::model::ops::layout::{HalfLayout, LS, NORM_B, NORM_W};
use candle_core::{Result, Shape, Tensor};

/// A gradient the backward pass formed in `buf`, as a tensor of `shape` when candle asked for it
/// (`wanted`); otherwise `buf` goes back to the pool.
fn grad_tensor(buf: Vec<f32>, wanted: bool, shape: &Shape) -> Result<Option<Tensor>> {
    if wanted {
        tensor(buf, shape).map(Some)
    } else {
        give(buf);
        Ok(None)
    }
}

/// The gradients of a half's output layer `y = h·Wᵀ + b` (then `x + ls ⊙ y`), written straight
/// into the flat gradient buffer `dw`: `dW` and `db` from `d_out` (`dy` through the layer scale),
/// and with layer scale `dγ = Σ dy ⊙ y` (recomputing `y` from the weights `w` as the forward
/// pass did, `par`). `(h, k)`: the layer's input and width.
fn output_grads(
    dw: &mut [f32],
    lay: &HalfLayout,
    (w, par): (&[f32], Par),
    (w_slot, b_slot): (usize, usize),
    (h, k): (&[f32], usize),
    dy: &[f32],
    d_out: &[f32],
) {
    let d = lay.slots[b_slot].len();
    let n = dy.len() / d.max(1);
    linear_dw(n, d, k, d_out, d, h, k, &mut dw[lay.range(w_slot)], false, par);
    dw[lay.range(b_slot)].copy_from_slice(&col_sums(d_out, d));
    if lay.present(LS) {
        let mut y = take(n * d);
        linear_fwd(n, d, k, h, k, &w[lay.range(w_slot)], &mut y, d, false, par);
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
