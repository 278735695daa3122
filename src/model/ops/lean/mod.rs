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

use super::rowwise;
use candle_core::backend::BackendStorage;
use candle_core::op::Add;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, D, Layout, Result, Shape, Storage, Tensor};

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
mod blocks;
pub use blocks::{attn_half, mlp_half};
