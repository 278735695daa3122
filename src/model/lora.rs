//! LoRA (Hu et al., arXiv 2106.09685) on the q and v slices of timm's fused qkv projection:
//! `Δq = (α/r)·B_q A_q h`, `Δv = (α/r)·B_v A_v h`, A kaiming-uniform, B zero.

use super::init::Init;
use super::ops::LoraWeights;
use super::param;
use candle_core::{DType, Result, Var};

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

    /// The matrices as the forward pass uses them (detached when gradients are off, in `dtype`).
    pub fn weights(&self, grad: bool, dtype: DType) -> Result<LoraWeights> {
        let p = |v: &Var| param(v, grad, dtype);
        Ok(LoraWeights {
            q_a: p(&self.q_a)?,
            q_b: p(&self.q_b)?,
            v_a: p(&self.v_a)?,
            v_b: p(&self.v_b)?,
            scale: self.scale,
        })
    }
}
