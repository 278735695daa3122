//! The same operations built from candle's differentiable primitives: they run on every device
//! and dtype (CUDA, f64 for gradient checks) and are the reference the fused CPU ops are tested
//! against. Never candle's fused LayerNorm/softmax, which have no backward pass.

use super::layout::{FC1_B, FC1_W, FC2_B, FC2_W, HalfLayout, LS, NORM_B, NORM_W, PROJ_B, PROJ_W, QKV_B, QKV_W};
use crate::config::Activation;
use candle_core::{D, Result, Tensor};

/// A slot of a flat weight buffer as a tensor of its timm shape (a differentiable view;
/// placeholders of absent tensors are detached so they never train).
pub fn slot(w: &Tensor, layout: &HalfLayout, i: usize) -> Result<Tensor> {
    let s = &layout.slots[i];
    let v = w.narrow(0, s.offset, s.len())?.reshape(s.shape.as_slice())?;
    Ok(if s.present { v } else { v.detach() })
}

/// LayerNorm over the last dimension.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xhat = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    xhat.broadcast_mul(gamma)?.broadcast_add(beta)
}

/// Softmax over the last dimension (max-shifted; the shift is a constant for autograd).
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// `x·Wᵀ + b` over the last dimension (contiguous operands, as CUDA needs).
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    // A plain 2-D product over the flattened leading dimensions: no broadcast batch strides,
    // which CUDA's matmul rejects.
    let wt = w.t()?.contiguous()?;
    let dims = x.dims().to_vec();
    let (k, n) = (dims.last().copied().unwrap_or(1), w.dim(0)?);
    let rows = x.elem_count() / k.max(1);
    let y = x.contiguous()?.reshape((rows, k))?.matmul(&wt)?;
    let mut out_dims = dims;
    if let Some(l) = out_dims.last_mut() {
        *l = n;
    }
    let y = y.reshape(out_dims)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// `(B, T, D)` → `(B, H, T, D/H)`, contiguous.
pub(crate) fn heads_of(t: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, d) = t.dims3()?;
    t.reshape((b, n, heads, d / heads))?.transpose(1, 2)?.contiguous()
}

/// `(B, H, T, hd)` → `(B, T, H·hd)`.
pub(crate) fn merge_heads(t: &Tensor) -> Result<Tensor> {
    let (b, h, n, hd) = t.dims4()?;
    t.transpose(1, 2)?.contiguous()?.reshape((b, n, h * hd))
}

/// The attention half (see `fused::AttnHalfOp`), composite.
pub fn attn_half(
    x: &Tensor,
    w: &Tensor,
    layout: &HalfLayout,
    delta: Option<&Tensor>,
    heads: usize,
    eps: f64,
) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    let hd = d / heads;
    let h = layer_norm(x, &slot(w, layout, NORM_W)?, &slot(w, layout, NORM_B)?, eps)?;
    let mut qkv = linear(&h, &slot(w, layout, QKV_W)?, Some(&slot(w, layout, QKV_B)?))?;
    if let Some(delta) = delta {
        let zeros = Tensor::zeros((b, t, d), delta.dtype(), delta.device())?;
        let full = Tensor::cat(&[&delta.narrow(2, 0, d)?, &zeros, &delta.narrow(2, d, d)?], 2)?;
        qkv = (qkv + full)?;
    }
    let split = |i: usize| heads_of(&qkv.narrow(2, i * d, d)?, heads);
    let (q, k, v) = (split(0)?, split(1)?, split(2)?);
    let scale = 1.0 / (hd as f64).sqrt();
    let s = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
    let p = softmax(&s)?;
    let o = merge_heads(&p.matmul(&v)?)?;
    let mut y = linear(&o, &slot(w, layout, PROJ_W)?, Some(&slot(w, layout, PROJ_B)?))?;
    if layout.present(LS) {
        y = y.broadcast_mul(&slot(w, layout, LS)?)?;
    }
    x + y
}

/// QuickGELU's slope: `x·σ(1.702·x)`.
const QUICK_GELU: f64 = 1.702;

/// The MLP half (see `fused::MlpHalfOp`), composite; the one implementation of QuickGELU.
pub fn mlp_half(x: &Tensor, w: &Tensor, layout: &HalfLayout, eps: f64, act: Activation) -> Result<Tensor> {
    let h = layer_norm(x, &slot(w, layout, NORM_W)?, &slot(w, layout, NORM_B)?, eps)?;
    let a = linear(&h, &slot(w, layout, FC1_W)?, Some(&slot(w, layout, FC1_B)?))?;
    let a = match act {
        Activation::Gelu => a.gelu_erf()?,
        // x·σ(1.702x) = silu(1.702x) / 1.702, through candle's differentiable silu.
        Activation::QuickGelu => ((a * QUICK_GELU)?.silu()? / QUICK_GELU)?,
    };
    let mut y = linear(&a, &slot(w, layout, FC2_W)?, Some(&slot(w, layout, FC2_B)?))?;
    if layout.present(LS) {
        y = y.broadcast_mul(&slot(w, layout, LS)?)?;
    }
    x + y
}
