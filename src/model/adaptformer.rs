//! AdaptFormer (Chen et al., arXiv 2205.13535): `s · up(ReLU(down(norm2(x_mid))))` added beside
//! the MLP, `s = 0.1`, down kaiming-uniform with zero bias, up zero.

use super::init::Init;
use super::ops::AdaptFormerWeights;
use super::param;
use candle_core::{DType, Result, Var};

/// AdaptFormer's fixed output scale.
pub const ADAPTFORMER_SCALE: f64 = 0.1;

/// One block's AdaptFormer parameters.
#[derive(Debug)]
pub struct AdaptFormerUnit {
    /// `(r, D)`.
    pub down_w: Var,
    /// `(r)`.
    pub down_b: Var,
    /// `(D, r)`.
    pub up_w: Var,
    /// `(D)`.
    pub up_b: Var,
}

impl AdaptFormerUnit {
    /// A freshly initialised unit of bottleneck width `r`.
    pub fn new(d: usize, r: usize, init: &mut Init) -> Result<Self> {
        Ok(Self {
            down_w: init.kaiming_uniform(r, d)?,
            down_b: init.zeros(&[r])?,
            up_w: init.zeros(&[d, r])?,
            up_b: init.zeros(&[d])?,
        })
    }

    /// Checkpoint names under `prefix` (`blocks.{i}.adaptformer`).
    #[must_use]
    pub fn named_vars(&self, prefix: &str) -> Vec<(String, Var)> {
        vec![
            (format!("{prefix}.down.weight"), self.down_w.clone()),
            (format!("{prefix}.down.bias"), self.down_b.clone()),
            (format!("{prefix}.up.weight"), self.up_w.clone()),
            (format!("{prefix}.up.bias"), self.up_b.clone()),
        ]
    }

    /// The bottleneck as the forward pass uses it (detached when gradients are off, in `dtype`),
    /// with the fixed output scale.
    pub fn weights(&self, grad: bool, dtype: DType) -> Result<AdaptFormerWeights> {
        let p = |v: &Var| param(v, grad, dtype);
        Ok(AdaptFormerWeights {
            down_w: p(&self.down_w)?,
            down_b: p(&self.down_b)?,
            up_w: p(&self.up_w)?,
            up_b: p(&self.up_b)?,
            scale: ADAPTFORMER_SCALE,
        })
    }
}
