//! Device-generic training ops for CUDA (and any backend): candle's fused forward kernels where
//! they exist, with explicit backward passes built from a handful of primitives, and a linear
//! layer whose backward forms only the gradients that something needs.
//!
//! Why: candle's autograd of the composite forms records every primitive and, for each binary
//! op, forms a gradient for both operands, frozen ones too. On a GPU each of those is a kernel
//! launch and a full pass over memory: a composite LayerNorm is ~9 kernels forward and ~25
//! backward, a composite softmax over the attention scores (the largest tensor of a ViT step)
//! ~5 and ~15, and `x·Wᵀ` with a frozen `W` still forms `dW`. Here they are 1-2 kernels each
//! way, and a frozen weight costs no gradient work at all.
//!
//! The standalone [`softmax`] and [`layer_norm`] take their forward values from one-pass kernels
//! without a backward of their own (`rowwise::softmax`; candle_nn's fused LayerNorm); a small
//! custom op ([`HeldValue`]) returns that value as its output and carries the backward pass, so
//! autograd sees one node. The
//! transformer's two half-blocks are one node each as well ([`attn_half`], [`mlp_half`]: forward
//! on detached inputs, hand-written backward). The elementwise and row-wise work inside them (GELU,
//! softmax, LayerNorm backward, bias add, head split/merge) runs on the one-pass kernels of
//! [`super::rowwise`]. Tested against the composite forms on the CPU (tests/ops.rs,
//! tests/peft.rs), where the same code runs, and on a GPU by `moppa bench --verify`; measured on an
//! H200 (README, Performance).

use super::composite::slot;
use super::layout::{FC1_B, FC1_W, FC2_B, FC2_W, HalfLayout, LS, NORM_B, NORM_W, PROJ_B, PROJ_W, QKV_B, QKV_W};
use super::profile::section;
use super::rowwise;
use candle_core::backend::BackendStorage;
use candle_core::op::Add;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, Layout, Result, Shape, Storage, Tensor};
use std::sync::Arc;

/// Which backward pass a [`HeldValue`] carries.
#[derive(Clone, Copy, Debug)]
enum HeldBackward {
    /// `y = softmax(x)` over the last dimension.
    Softmax,
    /// `y = LayerNorm(x; γ, β)` over the last dimension.
    LayerNorm { eps: f64 },
}

/// A custom op whose output is a value computed beforehand without autograd (`value`), and
/// whose backward pass is the one of `kind`. The forward copies the value once (a custom op must
/// return storage it owns).
struct HeldValue {
    value: Tensor,
    kind: HeldBackward,
}

impl HeldValue {
    fn copy_value<S: BackendStorage>(&self, pick: impl Fn(&Storage) -> Option<&S>) -> Result<(S, Shape)> {
        let (storage, layout) = self.value.storage_and_layout();
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            candle_core::bail!("lean op: the held value must be contiguous");
        }
        let s =
            pick(&storage).ok_or_else(|| candle_core::Error::Msg("lean op: held value on another device".into()))?;
        Ok((s.try_clone(layout)?, layout.shape().clone()))
    }

    fn cpu(s: &Storage) -> Option<&CpuStorage> {
        match s {
            Storage::Cpu(c) => Some(c),
            _ => None,
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda(s: &Storage) -> Option<&candle_core::CudaStorage> {
        match s {
            Storage::Cuda(c) => Some(c),
            _ => None,
        }
    }

    /// `x̂` of a LayerNorm recomputed from its input (for `dγ`; the input gradient
    /// recomputes them inside [`rowwise::layer_norm_bwd`]).
    fn normalized(x: &Tensor, eps: f64) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let rstd = (xc.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        xc.broadcast_mul(&rstd)
    }
}

/// Sums `t (…, D)` over every leading dimension to `(D)`.
fn sum_rows(t: &Tensor) -> Result<Tensor> {
    let d = t.dim(D::Minus1)?;
    t.reshape(((), d))?.sum(0)
}

impl CustomOp1 for HeldValue {
    fn name(&self) -> &'static str {
        "lean-softmax"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.copy_value(Self::cpu)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        self.copy_value(Self::cuda)
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(rowwise::softmax_bwd(y, g)?))
    }
}

impl CustomOp3 for HeldValue {
    fn name(&self) -> &'static str {
        "lean-layer-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.copy_value(Self::cpu)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.copy_value(Self::cuda)
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let HeldBackward::LayerNorm { eps } = self.kind else {
            candle_core::bail!("lean op: not a LayerNorm");
        };
        let g = g.detach();
        let dgamma = gamma
            .track_op()
            .then(|| sum_rows(&(&g * &Self::normalized(&x.detach(), eps)?)?))
            .transpose()?;
        let dbeta = beta.track_op().then(|| sum_rows(&g)).transpose()?;
        let dx = x
            .track_op()
            .then(|| rowwise::layer_norm_bwd(x, gamma, &g, eps))
            .transpose()?;
        Ok((dx, dgamma, dbeta))
    }
}

/// Softmax over the last dimension: the one-pass forward kernel, explicit backward.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    // `rowwise::softmax` has no backward pass of its own: it computes the value on a detached
    // input; the gradient to `x` comes from `HeldValue`'s backward (tests/ops.rs
    // `lean_softmax_and_layer_norm_match_composite` checks it against the composite softmax).
    let y = rowwise::softmax(&x)?;
    if !x.track_op() {
        return Ok(y);
    }
    x.apply_op1(HeldValue {
        value: y,
        kind: HeldBackward::Softmax,
    })
}

/// LayerNorm over the last dimension: candle's fused kernel forward, explicit backward that
/// skips the gradients of frozen `γ`/`β`.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (gamma, beta) = (gamma.contiguous()?, beta.contiguous()?);
    // candle_nn's LayerNorm has no backward pass: value only, on detached inputs; the gradients
    // to x, γ and β come from `HeldValue`'s backward (checked in tests/ops.rs like the softmax).
    let y = candle_nn::ops::layer_norm(&x.detach(), &gamma.detach(), &beta.detach(), eps as f32)?;
    if !(x.track_op() || gamma.track_op() || beta.track_op()) {
        return Ok(y);
    }
    x.apply_op3(
        &gamma,
        &beta,
        HeldValue {
            value: y,
            kind: HeldBackward::LayerNorm { eps },
        },
    )
}

/// `x·Wᵀ + b` on 2-D `x (M, K)`, `W (N, K)`, `b (N)` as one op: the product reads `W` through a
/// transposed layout (no copy), the bias add is fused into the op, and the backward pass forms
/// `dW` and `db` only when they are tracked.
struct LinearOp {
    bias: bool,
}

impl LinearOp {
    /// `x·Wᵀ` as a contiguous `(m, n)` buffer.
    fn product<S: BackendStorage>(x: &S, lx: &Layout, w: &S, lw: &Layout) -> Result<(S, usize, usize)> {
        let (m, k) = lx.shape().dims2()?;
        let (n, k2) = lw.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("lean linear: x has {k} features, W expects {k2}");
        }
        Ok((x.matmul(w, (1, m, n, k), lx, &lw.transpose(0, 1)?)?, m, n))
    }

    fn fwd<S: BackendStorage>(&self, x: &S, lx: &Layout, w: &S, lw: &Layout, b: &S, lb: &Layout) -> Result<(S, Shape)> {
        let (y, m, n) = Self::product(x, lx, w, lw)?;
        let y = if self.bias {
            y.binary_impl::<Add>(b, &Layout::contiguous((m, n)), &lb.broadcast_as((m, n))?)?
        } else {
            y
        };
        Ok((y, Shape::from((m, n))))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "lean-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd(x, lx, w, lw, b, lb)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        w: &candle_core::CudaStorage,
        lw: &Layout,
        b: &candle_core::CudaStorage,
        lb: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        // The bias goes into the GEMM's fresh output in place (one pass; candle's broadcast add
        // is a strided kernel and a second buffer).
        let (mut y, m, n) = Self::product(x, lx, w, lw)?;
        if self.bias {
            rowwise::add_bias_in_place(&mut y, b, lb, n)?;
        }
        Ok((y, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.detach().contiguous()?;
        let dx = x.track_op().then(|| g.matmul(&w.detach())).transpose()?;
        let dw = w.track_op().then(|| g.t()?.matmul(&x.detach())).transpose()?;
        let db = (self.bias && b.track_op()).then(|| g.sum(0)).transpose()?;
        Ok((dx, dw, db))
    }
}

/// `x·Wᵀ (+ b)` over the last dimension of `x` of any rank.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = dims.last().copied().unwrap_or(1);
    let n = w.dim(0)?;
    let rows = x.elem_count() / k.max(1);
    let x2 = x.contiguous()?.reshape((rows, k))?;
    let w = w.contiguous()?;
    let y = if let Some(b) = b {
        x2.apply_op3(&w, &b.contiguous()?, LinearOp { bias: true })?
    } else {
        // A placeholder third operand (never read).
        let none = w.narrow(0, 0, 1)?.flatten_all()?.detach();
        x2.apply_op3(&w, &none, LinearOp { bias: false })?
    };
    let mut out_dims = dims;
    if let Some(l) = out_dims.last_mut() {
        *l = n;
    }
    y.reshape(out_dims)
}

// ---------------------------------------------------------------------------------------------
// Half-blocks as single autograd nodes
// ---------------------------------------------------------------------------------------------
//
// candle's backward forms, for every edge of the graph, a zero tensor and an add (`or_insert` +
// `add`), and a gradient for both operands of every binary op. A ViT half-block built from
// primitives is ~30 graph nodes; on a GPU each of those edges is two more kernel launches and two
// more passes over the activations. These ops compute the forward on detached inputs (no graph)
// and keep what the backward needs; their backward is written out by hand with tensor ops, so
// the whole half is one node. Frozen weights (untracked) cost no weight gradients.

/// `out = x + y` at storage level (the custom op's forward: the residual add doubles as the copy
/// of the precomputed branch value `y` into storage the op owns).
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
