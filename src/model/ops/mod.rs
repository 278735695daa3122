//! Training ops with real backward passes, in three implementations behind one API:
//!
//! - `fused`: candle custom ops over vectorised, rayon-parallel CPU kernels (`cpu`), used for
//!   `f32` on the CPU. Frozen weights cost no weight gradients.
//! - `composite`: candle's own differentiable primitives, for `f64` gradient checks and as the
//!   reference every other implementation is tested against.
//! - `lean`: device-generic ops (the default on CUDA) whose backward passes are written out, with
//!   the one-pass kernels of `rowwise` (CUDA kernels built by build.rs, CPU loops that mirror them)
//!   for the GELU/softmax/LayerNorm backward, the bias add and the attention head layouts.
//!
//! candle's fused `LayerNorm` / `softmax_last_dim` have no backward pass: only `lean::layer_norm`
//! calls the former, for the forward value inside an op that carries its own backward.

pub mod composite;
pub mod cpu;
pub mod fused;
pub mod layout;
pub mod lean;
pub mod profile;
pub mod rowwise;
pub mod spectral;
pub mod verify;

use crate::config::Activation;
use candle_core::{DType, Result, Tensor};
pub use cpu::attention::Dims;
pub use layout::HalfLayout;
use std::sync::Arc;

/// Which implementation the model's ops use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Kernels {
    /// Fused CPU ops where possible (CPU + f32), composite elsewhere.
    #[default]
    Auto,
    /// The device-generic lean ops ([`lean`]) on every device (tests run them on the CPU).
    Lean,
    /// Always the composite ops (the reference).
    Composite,
    /// As `Auto`, with the fused transformer halves' products with weights formed from bf16
    /// operands (f32 accumulation and weight gradients; `cpu::bf16`): `--dtype bf16` on the CPU.
    Bf16,
}

impl Kernels {
    /// Whether to run the fused op for this tensor.
    #[must_use]
    pub fn fused_for(self, x: &Tensor) -> bool {
        matches!(self, Self::Auto | Self::Bf16) && x.device().is_cpu() && x.dtype() == DType::F32
    }

    /// Whether to run the lean op (where the fused one does not apply): CUDA by default, any
    /// device when asked; never for f64 (the gradient-check dtype, which candle's fused
    /// LayerNorm/softmax kernels do not cover everywhere).
    #[must_use]
    pub fn lean_for(self, x: &Tensor) -> bool {
        let dtype_ok = matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16);
        match self {
            Self::Auto | Self::Bf16 => dtype_ok && !self.fused_for(x),
            Self::Lean => dtype_ok,
            Self::Composite => false,
        }
    }

    /// Parses `auto`, `lean`, `composite` or `bf16`.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "lean" => Ok(Self::Lean),
            "composite" => Ok(Self::Composite),
            "bf16" => Ok(Self::Bf16),
            other => Err(format!("kernels must be auto, lean, composite or bf16 (got {other})")),
        }
    }

    /// Whether the fused halves form their products with weights from bf16 operands.
    #[must_use]
    pub fn bf16_products(self) -> bool {
        self == Self::Bf16
    }

    /// The name `parse` takes.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Lean => "lean",
            Self::Composite => "composite",
            Self::Bf16 => "bf16",
        }
    }
}

/// Softmax over the last dimension.
pub fn softmax(k: Kernels, x: &Tensor) -> Result<Tensor> {
    if k.lean_for(x) {
        lean::softmax(x)
    } else {
        composite::softmax(x)
    }
}

/// `LayerNorm(x; γ, β)` over the last dimension.
pub fn layer_norm(k: Kernels, x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    if k.fused_for(x) {
        x.contiguous()?.apply_op3(
            &gamma.contiguous()?,
            &beta.contiguous()?,
            fused::LayerNormOp { eps: eps as f32 },
        )
    } else if k.lean_for(x) {
        lean::layer_norm(x, gamma, beta, eps)
    } else {
        composite::layer_norm(x, gamma, beta, eps)
    }
}

/// `x·Wᵀ + b` over the last dimension; frozen (untracked) weights get no gradient work.
pub fn linear(k: Kernels, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if k.fused_for(x) {
        x.contiguous()?
            .apply_op3(&w.contiguous()?, &b.contiguous()?, fused::LinearOp)
    } else if k.lean_for(x) {
        lean::linear(x, w, Some(b))
    } else {
        composite::linear(x, w, Some(b))
    }
}

/// `x·Wᵀ` without a bias.
pub fn linear_no_bias(k: Kernels, x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if k.fused_for(x) {
        let zero = Tensor::zeros(w.dim(0)?, x.dtype(), x.device())?;
        x.contiguous()?.apply_op3(&w.contiguous()?, &zero, fused::LinearOp)
    } else if k.lean_for(x) {
        lean::linear(x, w, None)
    } else {
        composite::linear(x, w, None)
    }
}

/// Exact GELU.
pub fn gelu(k: Kernels, x: &Tensor) -> Result<Tensor> {
    if k.fused_for(x) {
        x.contiguous()?.apply_op1(fused::GeluOp)
    } else {
        x.gelu_erf()
    }
}

/// One attention half of a timm block (`x + ls1 ⊙ attn(norm1(x))`), with an optional LoRA
/// update `(B, T, 2D)` added to q and v.
pub fn attn_half(
    k: Kernels,
    x: &Tensor,
    w: &Tensor,
    layout: &Arc<HalfLayout>,
    delta: Option<&Tensor>,
    heads: usize,
    eps: f64,
) -> Result<Tensor> {
    if !k.fused_for(x) {
        return if k.lean_for(x) {
            lean::attn_half(x, w, layout, delta, heads, eps)
        } else {
            composite::attn_half(x, w, layout, delta, heads, eps)
        };
    }
    let (b, t, d) = x.dims3()?;
    let save = x.track_op() || w.track_op() || delta.is_some_and(Tensor::track_op);
    let (side, third) = match delta {
        Some(dl) => (fused::AttnSide::Delta, dl.contiguous()?),
        None => (fused::AttnSide::None, Tensor::zeros(1, DType::F32, x.device())?),
    };
    let op = fused::AttnHalfOp::new(
        Dims { b, t, d, heads },
        eps as f32,
        layout.clone(),
        side,
        save,
        w.track_op(),
        third.track_op(),
    )
    .with_bf16(k.bf16_products());
    x.contiguous()?.apply_op3(&w.contiguous()?, &third, op)
}

/// A side path's parameters as one flat tensor, in order (differentiable: the gradient of the
/// packed tensor flows back to each part).
fn pack(parts: &[&Tensor]) -> Result<Tensor> {
    let flat = parts.iter().map(|t| t.flatten_all()).collect::<Result<Vec<_>>>()?;
    Tensor::cat(&flat, 0)
}

/// LoRA's matrices on q and v (`A (r, D)`, `B (D, r)`) and its scale `α / r`.
#[derive(Clone, Debug)]
pub struct LoraWeights {
    /// `A_q (r, D)`.
    pub q_a: Tensor,
    /// `B_q (D, r)`.
    pub q_b: Tensor,
    /// `A_v (r, D)`.
    pub v_a: Tensor,
    /// `B_v (D, r)`.
    pub v_b: Tensor,
    /// `α / r`.
    pub scale: f64,
}

impl LoraWeights {
    /// `(Δq, Δv)` side by side, `(B, T, 2D)`, from `h = norm1(x)`: two matrix products (the two
    /// A's stacked, then a block-diagonal B carrying the scale).
    pub fn delta(&self, k: Kernels, h: &Tensor) -> Result<Tensor> {
        let (d, r) = self.q_b.dims2()?;
        let a = Tensor::cat(&[&self.q_a, &self.v_a], 0)?;
        let z = linear_no_bias(k, h, &a)?;
        let zeros = Tensor::zeros((d, r), self.q_b.dtype(), self.q_b.device())?;
        let top = Tensor::cat(&[&self.q_b, &zeros], 1)?;
        let bottom = Tensor::cat(&[&zeros, &self.v_b], 1)?;
        let b = (Tensor::cat(&[&top, &bottom], 0)? * self.scale)?;
        linear_no_bias(k, &z, &b)
    }
}

/// The attention half with LoRA on q and v (`Δq = (α/r)·B_q A_q norm1(x)`, Δv alike). On the CPU
/// the low-rank path runs inside the fused op (no separate LayerNorm, no `(B, T, 2D)` update);
/// elsewhere it is computed beside the half and passed in as an update.
pub fn attn_half_lora(
    k: Kernels,
    x: &Tensor,
    w: &Tensor,
    layout: &Arc<HalfLayout>,
    lora: &LoraWeights,
    heads: usize,
    eps: f64,
) -> Result<Tensor> {
    if !k.fused_for(x) {
        let g = composite::slot(w, layout, layout::NORM_W)?;
        let b = composite::slot(w, layout, layout::NORM_B)?;
        let delta = lora.delta(k, &layer_norm(k, x, &g, &b, eps)?)?;
        return attn_half(k, x, w, layout, Some(&delta), heads, eps);
    }
    let (b, t, d) = x.dims3()?;
    let rank = lora.q_a.dim(0)?;
    let packed = pack(&[&lora.q_a, &lora.v_a, &lora.q_b, &lora.v_b])?;
    let save = x.track_op() || w.track_op() || packed.track_op();
    let op = fused::AttnHalfOp::new(
        Dims { b, t, d, heads },
        eps as f32,
        layout.clone(),
        fused::AttnSide::Lora {
            rank,
            scale: lora.scale as f32,
        },
        save,
        w.track_op(),
        packed.track_op(),
    )
    .with_bf16(k.bf16_products());
    x.contiguous()?.apply_op3(&w.contiguous()?, &packed, op)
}

/// One MLP half of a timm block (`x + ls2 ⊙ mlp(norm2(x))`). The fused op implements exact GELU
/// and QuickGELU; the lean (CUDA) op exact GELU only, so QuickGELU (OpenAI CLIP) off the CPU runs
/// through the composite ops.
pub fn mlp_half(
    k: Kernels,
    x: &Tensor,
    w: &Tensor,
    layout: &Arc<HalfLayout>,
    hidden: usize,
    eps: f64,
    act: Activation,
) -> Result<Tensor> {
    if act != Activation::Gelu && !k.fused_for(x) {
        return composite::mlp_half(x, w, layout, eps, act);
    }
    if !k.fused_for(x) {
        return if k.lean_for(x) {
            lean::mlp_half(x, w, layout, eps)
        } else {
            composite::mlp_half(x, w, layout, eps, act)
        };
    }
    let d = x.dim(candle_core::D::Minus1)?;
    let save = x.track_op() || w.track_op();
    let op = fused::MlpHalfOp::new(d, hidden, eps as f32, layout.clone(), save, w.track_op())
        .with_act(act)
        .with_bf16(k.bf16_products());
    let placeholder = Tensor::zeros(1, DType::F32, x.device())?;
    x.contiguous()?.apply_op3(&w.contiguous()?, &placeholder, op)
}

/// AdaptFormer's bottleneck (`down (r, D)`, `(r)`; `up (D, r)`, `(D)`) and its output scale.
#[derive(Clone, Debug)]
pub struct AdaptFormerWeights {
    /// `(r, D)`.
    pub down_w: Tensor,
    /// `(r)`.
    pub down_b: Tensor,
    /// `(D, r)`.
    pub up_w: Tensor,
    /// `(D)`.
    pub up_b: Tensor,
    /// The output scale.
    pub scale: f64,
}

/// The MLP half with AdaptFormer beside it: `x + ls2 ⊙ mlp(h) + s · up(ReLU(down(h)))`,
/// `h = norm2(x)`. On the CPU the bottleneck runs inside the fused op; elsewhere beside it.
#[allow(clippy::too_many_arguments)]
pub fn mlp_half_adaptformer(
    k: Kernels,
    x: &Tensor,
    w: &Tensor,
    layout: &Arc<HalfLayout>,
    hidden: usize,
    eps: f64,
    act: Activation,
    ad: &AdaptFormerWeights,
) -> Result<Tensor> {
    if !k.fused_for(x) {
        let g = composite::slot(w, layout, layout::NORM_W)?;
        let b = composite::slot(w, layout, layout::NORM_B)?;
        let h = layer_norm(k, x, &g, &b, eps)?;
        let a = linear(k, &h, &ad.down_w, &ad.down_b)?.relu()?;
        // The scale goes on the small up-projection, not on the (B, T, D) output.
        let out = linear(k, &a, &(&ad.up_w * ad.scale)?, &(&ad.up_b * ad.scale)?)?;
        return mlp_half(k, x, w, layout, hidden, eps, act)? + out;
    }
    let d = x.dim(candle_core::D::Minus1)?;
    let rank = ad.down_w.dim(0)?;
    let packed = pack(&[&ad.down_w, &ad.down_b, &ad.up_w, &ad.up_b])?;
    let save = x.track_op() || w.track_op() || packed.track_op();
    let op = fused::MlpHalfOp::new(d, hidden, eps as f32, layout.clone(), save, w.track_op())
        .with_act(act)
        .with_bf16(k.bf16_products())
        .with_side(
            fused::MlpSide::AdaptFormer {
                rank,
                scale: ad.scale as f32,
            },
            packed.track_op(),
        );
    x.contiguous()?.apply_op3(&w.contiguous()?, &packed, op)
}

/// The MoPPA spectral mixing `Σ_p α_p ⊙ IDCT2(G_p ⊙ DCT2(Z))` on `Z (B, HW, r)` with gains
/// `(k, r, HW)` and router weights `(B|1, HW|1, k)`; `None` for α means a single prior.
pub fn spectral_mix(
    k: Kernels,
    grid: &crate::physics::tensor::SpectralGrid,
    z: &Tensor,
    gains: &Tensor,
    alpha: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, hw, r) = z.dims3()?;
    let kp = gains.dim(0)?;
    if k.fused_for(z) {
        let a = match alpha {
            Some(a) => a.contiguous()?,
            None => Tensor::ones((1, 1, 1), DType::F32, z.device())?,
        };
        let save = z.track_op() || gains.track_op() || a.track_op();
        let op = spectral::SpectralMixOp::new(grid.kron_host.clone(), save);
        return z.contiguous()?.apply_op3(&gains.contiguous()?, &a, op);
    }
    // Composite: rows of grids (B·r, HW), Ẑ = Z·Kᵀ, Y_p = (G_p ⊙ Ẑ)·K.
    let z_grid = z.transpose(1, 2)?.contiguous()?.reshape((b * r, hw))?;
    let z_hat = z_grid.matmul(&grid.kron_t)?.reshape((b, 1, r, hw))?;
    let filtered = z_hat.broadcast_mul(&gains.unsqueeze(0)?)?.reshape((b * kp * r, hw))?;
    let y_all = filtered.matmul(&grid.kron)?.reshape((b, kp, r, hw))?;
    let y = match alpha {
        // (B|1, HW|1, k) → (B|1, k, 1, HW|1)
        Some(a) => y_all.broadcast_mul(&a.transpose(1, 2)?.unsqueeze(2)?)?.sum(1)?,
        None => y_all.squeeze(1)?,
    };
    y.transpose(1, 2)?.contiguous()
}
