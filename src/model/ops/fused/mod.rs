//! candle custom ops wrapping the CPU kernels, with explicit backward passes.
//!
//! The two "half-block" ops run a whole timm transformer half (LayerNorm → qkv → attention →
//! projection → residual, and LayerNorm → fc1 → GELU → fc2 → residual) in one node of candle's
//! graph. Their activations are kept inside the op (only when a gradient will be needed) and
//! released by the backward pass. Weight gradients are formed only when the flat weight buffer is
//! trainable (a `Var`): a frozen backbone costs input gradients only.

use super::cpu::gemm::{Par, linear_dw, linear_dx, linear_fwd};
use super::cpu::pool::take;
use super::cpu::{col_sums, layer_norm, math, rows_mut, zeros};
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Device, Layout, Result, Shape, Storage, Tensor, bail};
use std::sync::Mutex;

fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("fused op: {what} must be contiguous"),
    }
}

/// A half-block's residual epilogue, row by row: `out ← x + ls ⊙ (out + bias)`, or
/// `x + out + bias` without layer scale; `extra` (a side path's bias) is added outside the
/// layer scale.
fn residual_epilogue(out: &mut [f32], x: &[f32], bias: &[f32], ls: Option<&[f32]>, extra: Option<&[f32]>, d: usize) {
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
        if let Some(e) = extra {
            for (v, b) in row.iter_mut().zip(e) {
                *v += b;
            }
        }
    });
}

/// `v · s`, element by element, in a new (small) buffer: a side path's scaled weight.
fn scaled(v: &[f32], s: f32) -> Vec<f32> {
    v.iter().map(|a| a * s).collect()
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

mod halves;
pub use halves::{AttnHalfOp, AttnSide, MlpHalfOp, MlpSide};
