//! The transformer's two half-blocks as one autograd node each ([`attn_half`], [`mlp_half`]):
//! forward on detached inputs with the one-pass kernels, hand-written backward that forms only the
//! gradients something needs (see the parent module).

use super::super::composite::slot;
use super::super::layout::{FC1_B, FC1_W, FC2_B, FC2_W, HalfLayout, LS, NORM_B, NORM_W, PROJ_B, PROJ_W, QKV_B, QKV_W};
use super::super::profile::section;
use super::super::rowwise;
use super::{HeldValue, layer_norm, linear, sum_rows};
use candle_core::backend::BackendStorage;
use candle_core::op::Add;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, D, Layout, Result, Shape, Storage, Tensor};
use std::sync::Arc;

fn residual<S: BackendStorage>(x: &S, lx: &Layout, y: &S, ly: &Layout) -> Result<(S, Shape)> {
    if lx.shape() != ly.shape() {
        candle_core::bail!("lean half-block: residual shapes differ");
    }
    Ok((x.binary_impl::<Add>(y, lx, ly)?, lx.shape().clone()))
}

fn storage_of<'a, S>(t: &'a Storage, pick: impl Fn(&'a Storage) -> Option<&'a S>) -> Result<&'a S> {
    pick(t).ok_or_else(|| candle_core::Error::Msg("lean half-block: tensors on different devices".into()))
}

/// The layer scale's backward: the gradient before the scale (and `d ls` into `wg` when wanted).
fn layer_scale_bwd(
    pre_ls: Option<&Tensor>,
    g: &Tensor,
    w: &Tensor,
    lay: &HalfLayout,
    want_w: bool,
    wg: &mut [Option<Tensor>],
) -> Result<Tensor> {
    let Some(pre) = pre_ls else {
        return Ok(g.clone());
    };
    if want_w {
        wg[LS] = Some(sum_rows(&(g * pre)?)?);
    }
    g.broadcast_mul(&slot(w, lay, LS)?)
}

/// The tail of a half's backward: the half's LayerNorm from its input `x` (gradient `dh` of its
/// output), plus the residual `g`; with `want_w`, dγ/dβ join the slot gradients `wg` and the flat
/// gradient of the half's buffer is returned too.
#[allow(clippy::too_many_arguments)]
fn norm_and_residual_bwd(
    x: &Tensor,
    w: &Tensor,
    lay: &HalfLayout,
    dh: &Tensor,
    g: &Tensor,
    eps: f64,
    want_w: bool,
    mut wg: Vec<Option<Tensor>>,
) -> Result<(Tensor, Option<Tensor>)> {
    let dx = (rowwise::layer_norm_bwd(x, &slot(w, lay, NORM_W)?, dh, eps)? + g)?;
    let dw = if want_w {
        wg[NORM_W] = Some(sum_rows(&(dh * &HeldValue::normalized(x, eps)?)?)?);
        wg[NORM_B] = Some(sum_rows(dh)?);
        Some(flat_grad(lay, wg, w)?)
    } else {
        None
    };
    Ok((dx, dw))
}

/// The flat gradient of a half's buffer from its slot gradients (absent slots and slots without
/// a gradient get zeros).
fn flat_grad(layout: &HalfLayout, grads: Vec<Option<Tensor>>, like: &Tensor) -> Result<Tensor> {
    let parts = layout
        .slots
        .iter()
        .zip(grads)
        .map(|(s, g)| match g {
            Some(g) if s.present => g.flatten_all(),
            _ => Tensor::zeros(s.len(), like.dtype(), like.device()),
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 0)
}

fn rows(t: &Tensor) -> Result<Tensor> {
    let d = t.dim(D::Minus1)?;
    t.reshape(((), d))
}

/// The attention half `x + ls1 ⊙ proj(attn(norm1(x)))` (optional LoRA update `(B, T, 2D)` on q
/// and v) as one node.
struct AttnHalf {
    layout: Arc<HalfLayout>,
    heads: usize,
    eps: f64,
    has_delta: bool,
    /// The branch `ls1 ⊙ proj(…)` (the op's output is `x + branch`).
    branch: Tensor,
    h: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    p: Tensor,
    o: Tensor,
    /// `proj(…)` before the layer scale (for its gradient), when there is one.
    pre_ls: Option<Tensor>,
}

impl AttnHalf {
    fn new(
        x: &Tensor,
        w: &Tensor,
        layout: Arc<HalfLayout>,
        delta: Option<&Tensor>,
        heads: usize,
        eps: f64,
    ) -> Result<Self> {
        let (x, w) = (x.detach(), w.detach());
        let dev = x.device().clone();
        let (b, t, d) = x.dims3()?;
        let h = section("attn fwd: norm1", &dev, || {
            layer_norm(&x, &slot(&w, &layout, NORM_W)?, &slot(&w, &layout, NORM_B)?, eps)
        })?;
        let qkv = section("attn fwd: qkv", &dev, || {
            linear(&h, &slot(&w, &layout, QKV_W)?, Some(&slot(&w, &layout, QKV_B)?))
        })?;
        let scale = 1.0 / ((d / heads) as f64).sqrt();
        let (q, k, v) = section("attn fwd: split heads", &dev, || {
            rowwise::split_qkv(&qkv, delta, heads, scale)
        })?;
        // kᵀ as a transposed view: the GEMM reads it as such (no copy).
        let s = section("attn fwd: q·kᵀ", &dev, || q.matmul(&k.t()?))?;
        // Value only (one pass, no backward of its own): the whole half's forward runs on detached
        // inputs and `AttnHalf::bwd` differentiates the softmax by hand (tests/ops.rs
        // `lean_half_blocks_match_composite` checks every gradient against the composite half).
        let p = section("attn fwd: softmax", &dev, || rowwise::softmax(&s))?;
        let o = section("attn fwd: p·v, merge", &dev, || {
            rowwise::merge_heads(&[&p.matmul(&v)?], 1.0)
        })?;
        let y = section("attn fwd: proj", &dev, || {
            linear(&o, &slot(&w, &layout, PROJ_W)?, Some(&slot(&w, &layout, PROJ_B)?))
        })?;
        let (branch, pre_ls) = if layout.present(LS) {
            (y.broadcast_mul(&slot(&w, &layout, LS)?)?, Some(y))
        } else {
            (y, None)
        };
        debug_assert_eq!(branch.dims(), &[b, t, d]);
        Ok(Self {
            layout,
            heads,
            eps,
            has_delta: delta.is_some(),
            branch: branch.contiguous()?,
            h,
            q,
            k,
            v,
            p,
            o,
            pre_ls,
        })
    }

    fn fwd<'a, S: BackendStorage + 'a>(
        &self,
        x: &S,
        lx: &Layout,
        pick: impl Fn(&Storage) -> Option<&S>,
    ) -> Result<(S, Shape)> {
        let (s, l) = self.branch.storage_and_layout();
        residual(x, lx, storage_of(&s, pick)?, l)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, delta: &Tensor, g: &Tensor) -> Result<[Option<Tensor>; 3]> {
        let lay = &self.layout;
        let (want_w, want_delta) = (w.track_op(), self.has_delta && delta.track_op());
        let (x, w, g) = (x.detach(), w.detach(), g.detach().contiguous()?);
        let (b, t, d) = x.dims3()?;
        let hd = d / self.heads;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut wg: Vec<Option<Tensor>> = vec![None; lay.slots.len()];
        let dy = layer_scale_bwd(self.pre_ls.as_ref(), &g, &w, lay, want_w, &mut wg)?;
        let dev = x.device().clone();
        // Projection.
        let dy2 = rows(&dy)?;
        let do_ = section("attn bwd: proj", &dev, || {
            if want_w {
                let o2 = rows(&self.o)?;
                wg[PROJ_W] = Some(dy2.t()?.matmul(&o2)?);
                wg[PROJ_B] = Some(dy2.sum(0)?);
            }
            rowwise::split_heads(&dy2.matmul(&slot(&w, lay, PROJ_W)?)?.reshape((b, t, d))?, self.heads)
        })?;
        // o = p·v, p = softmax(q·kᵀ) (q carries the 1/√hd scale).
        let (dp, dv) = section("attn bwd: p·v", &dev, || {
            Ok((do_.matmul(&self.v.t()?)?, self.p.t()?.matmul(&do_)?))
        })?;
        let ds = section("attn bwd: softmax", &dev, || rowwise::softmax_bwd(&self.p, &dp))?;
        // dq without its 1/√hd: the merge applies it.
        let (dq, dk) = section("attn bwd: q·kᵀ", &dev, || {
            Ok((ds.matmul(&self.k)?, ds.t()?.matmul(&self.q)?))
        })?;
        let (ddelta, dqkv) = section("attn bwd: merge heads", &dev, || {
            let dqkv = rowwise::merge_heads(&[&dq, &dk, &dv], scale)?;
            let ddelta = want_delta
                .then(|| Tensor::cat(&[&dqkv.narrow(2, 0, d)?, &dqkv.narrow(2, 2 * d, d)?], 2))
                .transpose()?;
            Ok((ddelta, rows(&dqkv)?))
        })?;
        let dh = section("attn bwd: qkv", &dev, || {
            if want_w {
                let h2 = rows(&self.h)?;
                wg[QKV_W] = Some(dqkv.t()?.matmul(&h2)?);
                wg[QKV_B] = Some(dqkv.sum(0)?);
            }
            dqkv.matmul(&slot(&w, lay, QKV_W)?)?.reshape((b, t, d))
        })?;
        let (dx, dw) = section("attn bwd: norm1", &dev, || {
            norm_and_residual_bwd(&x, &w, lay, &dh, &g, self.eps, want_w, wg)
        })?;
        Ok([Some(dx), dw, ddelta])
    }
}

impl CustomOp3 for AttnHalf {
    fn name(&self) -> &'static str {
        "lean-attn-half"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd(x, lx, HeldValue::cpu)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.fwd(x, lx, HeldValue::cuda)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        delta: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [dx, dw, dd] = self.bwd(x, w, delta, g)?;
        Ok((dx, dw, dd))
    }
}

/// The attention half as one autograd node (see [`AttnHalf`]).
pub fn attn_half(
    x: &Tensor,
    w: &Tensor,
    layout: &Arc<HalfLayout>,
    delta: Option<&Tensor>,
    heads: usize,
    eps: f64,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let op = AttnHalf::new(&x, w, layout.clone(), delta, heads, eps)?;
    // Without a LoRA update the third operand is an untracked placeholder (never read).
    let none = w.narrow(0, 0, 1)?.detach();
    let third = delta.unwrap_or(&none);
    x.apply_op3(w, third, op)
}

/// The MLP half `x + ls2 ⊙ fc2(GELU(fc1(norm2(x))))` as one node.
struct MlpHalf {
    layout: Arc<HalfLayout>,
    eps: f64,
    branch: Tensor,
    h: Tensor,
    a: Tensor,
    ga: Tensor,
    pre_ls: Option<Tensor>,
}

impl MlpHalf {
    fn new(x: &Tensor, w: &Tensor, layout: Arc<HalfLayout>, eps: f64) -> Result<Self> {
        let (x, w) = (x.detach(), w.detach());
        let dev = x.device().clone();
        let h = section("mlp fwd: norm2", &dev, || {
            layer_norm(&x, &slot(&w, &layout, NORM_W)?, &slot(&w, &layout, NORM_B)?, eps)
        })?;
        let a = section("mlp fwd: fc1", &dev, || {
            linear(&h, &slot(&w, &layout, FC1_W)?, Some(&slot(&w, &layout, FC1_B)?))
        })?;
        let ga = section("mlp fwd: gelu", &dev, || rowwise::gelu(&a))?;
        let y = section("mlp fwd: fc2", &dev, || {
            linear(&ga, &slot(&w, &layout, FC2_W)?, Some(&slot(&w, &layout, FC2_B)?))
        })?;
        let (branch, pre_ls) = if layout.present(LS) {
            (y.broadcast_mul(&slot(&w, &layout, LS)?)?, Some(y))
        } else {
            (y, None)
        };
        Ok(Self {
            layout,
            eps,
            branch: branch.contiguous()?,
            h,
            a,
            ga,
            pre_ls,
        })
    }
}

impl CustomOp2 for MlpHalf {
    fn name(&self) -> &'static str {
        "lean-mlp-half"
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let (s, l) = self.branch.storage_and_layout();
        residual(x, lx, storage_of(&s, HeldValue::cpu)?, l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (s, l) = self.branch.storage_and_layout();
        residual(x, lx, storage_of(&s, HeldValue::cuda)?, l)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let lay = &self.layout;
        let want_w = w.track_op();
        let (x, w, g) = (x.detach(), w.detach(), g.detach().contiguous()?);
        let (b, t, d) = x.dims3()?;
        let mut wg: Vec<Option<Tensor>> = vec![None; lay.slots.len()];
        let dy = layer_scale_bwd(self.pre_ls.as_ref(), &g, &w, lay, want_w, &mut wg)?;
        let dev = x.device().clone();
        let dy2 = rows(&dy)?;
        let dga = section("mlp bwd: fc2", &dev, || {
            if want_w {
                wg[FC2_W] = Some(dy2.t()?.matmul(&rows(&self.ga)?)?);
                wg[FC2_B] = Some(dy2.sum(0)?);
            }
            dy2.matmul(&slot(&w, lay, FC2_W)?)
        })?;
        let da = section("mlp bwd: gelu", &dev, || rowwise::gelu_bwd(&rows(&self.a)?, &dga))?;
        let dh = section("mlp bwd: fc1", &dev, || {
            if want_w {
                wg[FC1_W] = Some(da.t()?.matmul(&rows(&self.h)?)?);
                wg[FC1_B] = Some(da.sum(0)?);
            }
            da.matmul(&slot(&w, lay, FC1_W)?)?.reshape((b, t, d))
        })?;
        let (dx, dw) = section("mlp bwd: norm2", &dev, || {
            norm_and_residual_bwd(&x, &w, lay, &dh, &g, self.eps, want_w, wg)
        })?;
        Ok((Some(dx), dw))
    }
}

/// The MLP half as one autograd node (see [`MlpHalf`]).
pub fn mlp_half(x: &Tensor, w: &Tensor, layout: &Arc<HalfLayout>, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    let op = MlpHalf::new(&x, w, layout.clone(), eps)?;
    x.apply_op2(w, op)
}
