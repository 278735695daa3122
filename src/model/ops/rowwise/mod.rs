//! One-pass backward kernels of the lean ops: GELU (erf form), softmax over the last dimension
//! and LayerNorm's input gradient. Built from candle primitives these are 5-14 kernels and as
//! many passes over a `(B, T, ·)` tensor each (on an H200 the GELU backward of ViT-B/16 at batch
//! 64 took 1.9 ms per block where one pass takes ~0.05 ms); here each is one kernel.
//!
//! On CUDA they run `cuda/rowwise.cu` (PTX built by build.rs); on the CPU, the loops below, which
//! are what the lean ops' CPU tests exercise (tests/ops.rs checks both against the composite
//! forms) and which the CUDA kernels mirror line by line (`cuda`). Everything accumulates in `f32`.
//! [`heads`] holds the attention head layouts (qkv split, head merge) in the same style.
//! None of these ops has a backward of its own: they are used inside backward passes only.

#[cfg(feature = "cuda")]
mod cuda;
mod heads;

#[cfg(feature = "cuda")]
pub use cuda::add_bias_in_place;
pub use heads::{merge_heads, split_heads, split_qkv};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Which one-pass kernel.
#[derive(Clone, Copy, Debug)]
enum RowKernel {
    /// `y = GELU(a)` (erf form), elementwise.
    GeluFwd,
    /// `y = softmax(x)` over rows.
    SoftmaxFwd,
    /// `da = dy ⊙ GELU'(a)`, elementwise.
    GeluBwd,
    /// `ds = p ⊙ (dp − Σ dp⊙p)` over rows.
    SoftmaxBwd,
    /// LayerNorm's `dx` from `x`, `γ`, `dy` over rows.
    LayerNormBwd { eps: f32 },
}

impl RowKernel {
    fn name(self) -> &'static str {
        match self {
            Self::GeluFwd => "gelu_fwd",
            Self::SoftmaxFwd => "softmax_fwd",
            Self::GeluBwd => "gelu_bwd",
            Self::SoftmaxBwd => "softmax_bwd",
            Self::LayerNormBwd { .. } => "layer_norm_bwd",
        }
    }
}

/// `GELU'(x) = Φ(x) + x·φ(x)` (std has no `erf`; candle's is used).
fn gelu_grad(x: f32) -> f32 {
    let erf = candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2);
    let pdf = 0.398_942_3 * (-0.5 * x * x).exp();
    0.5 * (1.0 + erf) + x * pdf
}

/// The CPU loops: the result for inputs `a`, `b` (unused by the forward ops) and `c` (γ for
/// LayerNorm), rows of `n`.
fn cpu_run<T: WithDType>(op: RowKernel, a: &[T], b: &[T], c: &[T], n: usize) -> Vec<T> {
    let f = |v: T| v.to_f64() as f32;
    let t = |v: f32| T::from_f64(f64::from(v));
    match op {
        RowKernel::GeluFwd => a
            .par_iter()
            .map(|&x| {
                let x = f(x);
                t(0.5 * x * (1.0 + candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2)))
            })
            .collect(),
        RowKernel::SoftmaxFwd => {
            let mut out = vec![T::zero(); a.len()];
            out.par_chunks_mut(n).zip(a.par_chunks(n)).for_each(|(o, x)| {
                let m = x.iter().map(|&v| f(v)).fold(f32::NEG_INFINITY, f32::max);
                let s: f32 = x.iter().map(|&v| (f(v) - m).exp()).sum();
                for (o, &v) in o.iter_mut().zip(x) {
                    *o = t((f(v) - m).exp() / s);
                }
            });
            out
        }
        RowKernel::GeluBwd => a
            .par_iter()
            .zip(b.par_iter())
            .map(|(&x, &g)| t(f(g) * gelu_grad(f(x))))
            .collect(),
        RowKernel::SoftmaxBwd => {
            let mut out = vec![T::zero(); a.len()];
            out.par_chunks_mut(n)
                .zip(a.par_chunks(n).zip(b.par_chunks(n)))
                .for_each(|(o, (p, dp))| {
                    let s: f32 = p.iter().zip(dp).map(|(&p, &d)| f(p) * f(d)).sum();
                    for ((o, &p), &d) in o.iter_mut().zip(p).zip(dp) {
                        *o = t(f(p) * (f(d) - s));
                    }
                });
            out
        }
        RowKernel::LayerNormBwd { eps } => {
            let mut out = vec![T::zero(); a.len()];
            let inv_n = 1.0 / n as f32;
            out.par_chunks_mut(n)
                .zip(a.par_chunks(n).zip(b.par_chunks(n)))
                .for_each(|(o, (x, dy))| {
                    let mean = x.iter().map(|&v| f(v)).sum::<f32>() * inv_n;
                    let (mut var, mut sg, mut sgx) = (0.0f32, 0.0f32, 0.0f32);
                    for ((&x, &d), &gm) in x.iter().zip(dy).zip(c) {
                        let (xc, g) = (f(x) - mean, f(d) * f(gm));
                        var += xc * xc;
                        sg += g;
                        sgx += g * xc;
                    }
                    let rstd = 1.0 / (var * inv_n + eps).sqrt();
                    let (mg, mgx) = (sg * inv_n, sgx * inv_n * rstd);
                    for (((o, &x), &d), &gm) in o.iter_mut().zip(x).zip(dy).zip(c) {
                        let xhat = (f(x) - mean) * rstd;
                        *o = t(rstd * (f(d) * f(gm) - mg - xhat * mgx));
                    }
                });
            out
        }
    }
}

/// The op's operands as contiguous slices (the wrappers below make them contiguous).
fn cpu_slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("rowwise op: operand not contiguous");
    };
    Ok(&s.as_slice::<T>()?[start..end])
}

fn cpu_fwd(
    op: RowKernel,
    a: (&CpuStorage, &Layout),
    b: (&CpuStorage, &Layout),
    c: Option<(&CpuStorage, &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    let (sa, la) = a;
    if la.shape() != b.1.shape() {
        candle_core::bail!(
            "{}: operand shapes differ ({:?} vs {:?})",
            op.name(),
            la.shape(),
            b.1.shape()
        );
    }
    let n = la.dims().last().copied().unwrap_or(1).max(1);
    macro_rules! run {
        ($t:ty, $variant:ident) => {{
            let c = match c {
                Some((s, l)) => cpu_slice::<$t>(s, l)?,
                None => &[],
            };
            CpuStorage::$variant(cpu_run::<$t>(op, cpu_slice(sa, la)?, cpu_slice(b.0, b.1)?, c, n))
        }};
    }
    let out = match sa.dtype() {
        DType::F32 => run!(f32, F32),
        DType::F64 => run!(f64, F64),
        DType::BF16 => run!(half::bf16, BF16),
        DType::F16 => run!(half::f16, F16),
        d => candle_core::bail!("{}: unsupported dtype {d:?}", op.name()),
    };
    Ok((out, la.shape().clone()))
}

/// A one-pass kernel of two operands as a candle op (no backward of its own).
struct BinaryRowOp(RowKernel);

impl CustomOp2 for BinaryRowOp {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(&self, a: &CpuStorage, la: &Layout, b: &CpuStorage, lb: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_fwd(self.0, (a, la), (b, lb), None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a: &candle_core::CudaStorage,
        la: &Layout,
        b: &candle_core::CudaStorage,
        lb: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::fwd(self.0, (a, la), (b, lb), None)
    }
}

/// A one-pass kernel of three operands (LayerNorm backward: `x`, `dy`, `γ`) as a candle op.
struct TernaryRowOp(RowKernel);

impl CustomOp3 for TernaryRowOp {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        la: &Layout,
        b: &CpuStorage,
        lb: &Layout,
        c: &CpuStorage,
        lc: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_fwd(self.0, (a, la), (b, lb), Some((c, lc)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a: &candle_core::CudaStorage,
        la: &Layout,
        b: &candle_core::CudaStorage,
        lb: &Layout,
        c: &candle_core::CudaStorage,
        lc: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::fwd(self.0, (a, la), (b, lb), Some((c, lc)))
    }
}

/// `GELU(a)` (erf form), in one pass (no gradient of its own: for forward passes on detached
/// inputs whose op carries the backward).
pub fn gelu(a: &Tensor) -> Result<Tensor> {
    let a = a.detach().contiguous()?;
    a.apply_op2_no_bwd(&a, &BinaryRowOp(RowKernel::GeluFwd))
}

/// Softmax over the last dimension, in one pass (no gradient of its own, like [`gelu`]).
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let x = x.detach().contiguous()?;
    x.apply_op2_no_bwd(&x, &BinaryRowOp(RowKernel::SoftmaxFwd))
}

/// `dy ⊙ GELU'(a)` for the erf GELU, in one pass (no gradient of its own).
pub fn gelu_bwd(a: &Tensor, dy: &Tensor) -> Result<Tensor> {
    a.detach()
        .contiguous()?
        .apply_op2_no_bwd(&dy.detach().contiguous()?, &BinaryRowOp(RowKernel::GeluBwd))
}

/// Softmax's input gradient `p ⊙ (dp − Σ dp⊙p)` over the last dimension, from its output `p`.
pub fn softmax_bwd(p: &Tensor, dp: &Tensor) -> Result<Tensor> {
    p.detach()
        .contiguous()?
        .apply_op2_no_bwd(&dp.detach().contiguous()?, &BinaryRowOp(RowKernel::SoftmaxBwd))
}

/// LayerNorm's input gradient over the last dimension from its input `x`, `γ` and the output
/// gradient `dy` (the statistics are recomputed from `x`).
pub fn layer_norm_bwd(x: &Tensor, gamma: &Tensor, dy: &Tensor, eps: f64) -> Result<Tensor> {
    let gamma = gamma.detach().contiguous()?;
    x.detach().contiguous()?.apply_op3_no_bwd(
        &dy.detach().contiguous()?,
        &gamma,
        &TernaryRowOp(RowKernel::LayerNormBwd { eps: eps as f32 }),
    )
}
