//! LoRA (Hu et al., arXiv 2106.09685) on the q and v slices of timm's fused qkv projection:
//! `Δq = (α/r)·B_q A_q h`, `Δv = (α/r)·B_v A_v h`, A kaiming-uniform, B zero.

use super::init::Init;
use super::ops::{self, Kernels};
use super::param;
use candle_core::{Result, Tensor, Var};

/// One block's LoRA parameters.
#[derive(Debug)]
pub struct LoraUnit {
    /// `A_q (r, D)`.
    pub q_a: Var,
    /// `B_q (D, r)`.
    pub q_b: Var,
    /// `A_v (r, D)`.
    pub v_a: Var,
    /// `B_v (D, r)`.
    pub v_b: Var,
    /// `α / r`.
    pub scale: f64,
}

impl LoraUnit {
    /// A freshly initialised unit.
    pub fn new(d: usize, rank: usize, alpha: f64, init: &mut Init) -> Result<Self> {
        Ok(Self {
            q_a: init.kaiming_uniform(rank, d)?,
            q_b: init.zeros(&[d, rank])?,
            v_a: init.kaiming_uniform(rank, d)?,
            v_b: init.zeros(&[d, rank])?,
            scale: alpha / rank as f64,
        })
    }

    /// Checkpoint names under `prefix` (`blocks.{i}.lora`).
    #[must_use]
    pub fn named_vars(&self, prefix: &str) -> Vec<(String, Var)> {
        vec![
            (format!("{prefix}.q.a"), self.q_a.clone()),
            (format!("{prefix}.q.b"), self.q_b.clone()),
            (format!("{prefix}.v.a"), self.v_a.clone()),
            (format!("{prefix}.v.b"), self.v_b.clone()),
        ]
    }

    /// `(Δq, Δv)` side by side, `(B, T, 2D)`, from `h = norm1(x)`: two matrix products (the two
    /// A's stacked, then a block-diagonal B).
    pub fn forward(&self, h: &Tensor, kernels: Kernels, grad: bool) -> Result<Tensor> {
        let dtype = h.dtype();
        let p = |v: &Var| param(v, grad, dtype);
        let (d, r) = self.q_b.dims2()?;
        let a = Tensor::cat(&[p(&self.q_a)?, p(&self.v_a)?], 0)?;
        let z = ops::linear_no_bias(kernels, h, &a)?;
        let zeros = Tensor::zeros((d, r), dtype, self.q_b.device())?;
        let top = Tensor::cat(&[&p(&self.q_b)?, &zeros], 1)?;
        let bottom = Tensor::cat(&[&zeros, &p(&self.v_b)?], 1)?;
        // The α/r scale goes on the small block-diagonal B, not on the (B, T, 2D) output.
        let b = (Tensor::cat(&[&top, &bottom], 0)? * self.scale)?;
        ops::linear_no_bias(kernels, &z, &b)
    }
}
