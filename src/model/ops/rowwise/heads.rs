//! Attention head layouts in one pass each: the qkv projection split into heads (with LoRA's
//! update and the 1/√hd scale) and heads merged back, instead of narrow + add + reshape +
//! transpose + contiguous copy + scale. CPU loops here; CUDA kernels in `cuda.rs` compute the same
//! index maps.

use super::cpu_slice;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Which head-layout kernel (`dims` = `[B, T, H, hd]`).
#[derive(Clone, Copy, Debug)]
pub(super) enum HeadLayoutOp {
    /// `x (B, T, parts·D)` [+ `delta (B, T, 2D)` on parts 0 and 2] → `(parts, B, H, T, hd)`, part
    /// 0 times `scale`; `parts` is 3 (q, k, v) or 1.
    Split {
        dims: [usize; 4],
        parts: usize,
        scale: f32,
        has_delta: bool,
    },
    /// `parts` tensors `(B, H, T, hd)` → `(B, T, parts·D)`, part 0 times `scale0`.
    Merge {
        dims: [usize; 4],
        parts: usize,
        scale0: f32,
    },
}

impl HeadLayoutOp {
    fn out_shape(self) -> Shape {
        match self {
            Self::Split {
                dims: [b, t, h, hd],
                parts,
                ..
            } => Shape::from((parts, b, h, t, hd)),
            Self::Merge {
                dims: [b, t, h, hd],
                parts,
                ..
            } => Shape::from((b, t, parts * h * hd)),
        }
    }

    /// The CPU loop (the CUDA kernels compute the same index maps).
    fn cpu_run<T: WithDType>(self, a: &[T], b: &[T], c: &[T]) -> Vec<T> {
        let f = |v: T| v.to_f64() as f32;
        let mut out = vec![T::zero(); self.out_shape().elem_count()];
        match self {
            Self::Split {
                dims: [bn, tn, h, hd],
                parts,
                scale,
                has_delta,
            } => {
                let d = h * hd;
                out.par_iter_mut().enumerate().for_each(|(i, o)| {
                    let (e, r) = (i % hd, i / hd);
                    let (ti, r) = (r % tn, r / tn);
                    let (hi, r) = (r % h, r / h);
                    let (bi, part) = (r % bn, r / bn);
                    let (row, col) = (bi * tn + ti, hi * hd + e);
                    let mut v = f(a[row * parts * d + part * d + col]);
                    if has_delta && part != 1 {
                        v += f(b[row * 2 * d + if part == 0 { 0 } else { d } + col]);
                    }
                    if part == 0 {
                        v *= scale;
                    }
                    *o = T::from_f64(f64::from(v));
                });
            }
            Self::Merge {
                dims: [_, tn, h, hd],
                parts,
                scale0,
            } => {
                let d = h * hd;
                out.par_iter_mut().enumerate().for_each(|(i, o)| {
                    let (col, row) = (i % (parts * d), i / (parts * d));
                    let (part, c2) = (col / d, col % d);
                    let (hi, e) = (c2 / hd, c2 % hd);
                    let (bi, ti) = (row / tn, row % tn);
                    let src = [a, b, c][part];
                    let mut v = f(src[((bi * h + hi) * tn + ti) * hd + e]);
                    if part == 0 {
                        v *= scale0;
                    }
                    *o = T::from_f64(f64::from(v));
                });
            }
        }
        out
    }
}

impl CustomOp3 for HeadLayoutOp {
    fn name(&self) -> &'static str {
        match self {
            Self::Split { .. } => "split_qkv",
            Self::Merge { .. } => "merge_heads",
        }
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
        macro_rules! run {
            ($t:ty, $variant:ident) => {
                CpuStorage::$variant(self.cpu_run::<$t>(cpu_slice(a, la)?, cpu_slice(b, lb)?, cpu_slice(c, lc)?))
            };
        }
        let out = match a.dtype() {
            DType::F32 => run!(f32, F32),
            DType::F64 => run!(f64, F64),
            DType::BF16 => run!(half::bf16, BF16),
            DType::F16 => run!(half::f16, F16),
            d => candle_core::bail!("{}: unsupported dtype {d:?}", self.name()),
        };
        Ok((out, self.out_shape()))
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
        let shape = self.out_shape();
        Ok((
            super::cuda::run_heads(*self, [(a, la), (b, lb), (c, lc)], shape.elem_count())?,
            shape,
        ))
    }
}

/// `q, k, v` in heads `(B, H, T, hd)` from the qkv projection `(B, T, 3D)`, with the optional
/// LoRA update `(B, T, 2D)` added to q and v, and q multiplied by `scale`: one pass, returned as
/// three contiguous views of one `(3, B, H, T, hd)` buffer.
pub fn split_qkv(qkv: &Tensor, delta: Option<&Tensor>, heads: usize, scale: f64) -> Result<(Tensor, Tensor, Tensor)> {
    let qkv = qkv.detach().contiguous()?;
    let (b, t, d3) = qkv.dims3()?;
    let d = d3 / 3;
    if d3 % 3 != 0 || heads == 0 || d % heads != 0 {
        candle_core::bail!("split_qkv: {d3} features do not split into 3 × {heads} heads");
    }
    let op = HeadLayoutOp::Split {
        dims: [b, t, heads, d / heads],
        parts: 3,
        scale: scale as f32,
        has_delta: delta.is_some(),
    };
    let out = match delta {
        Some(dl) => {
            let dl = dl.detach().contiguous()?;
            if dl.dims() != [b, t, 2 * d] {
                candle_core::bail!(
                    "split_qkv: LoRA update of shape {:?}, expected ({b}, {t}, {})",
                    dl.dims(),
                    2 * d
                );
            }
            qkv.apply_op3_no_bwd(&dl, &qkv, &op)?
        }
        // The unused operands are the input itself (never read).
        None => qkv.apply_op3_no_bwd(&qkv, &qkv, &op)?,
    };
    Ok((out.get(0)?, out.get(1)?, out.get(2)?))
}

/// `x (B, T, D)` as heads `(B, H, T, hd)`, in one pass.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let x = x.detach().contiguous()?;
    let (b, t, d) = x.dims3()?;
    if heads == 0 || d % heads != 0 {
        candle_core::bail!("split_heads: {d} features do not split into {heads} heads");
    }
    let op = HeadLayoutOp::Split {
        dims: [b, t, heads, d / heads],
        parts: 1,
        scale: 1.0,
        has_delta: false,
    };
    x.apply_op3_no_bwd(&x, &x, &op)?.squeeze(0)
}

/// One or three `(B, H, T, hd)` tensors of one shape side by side as `(B, T, parts·D)`, the
/// first multiplied by `scale0`: one pass.
pub fn merge_heads(parts: &[&Tensor], scale0: f64) -> Result<Tensor> {
    let ts = parts
        .iter()
        .map(|t| t.detach().contiguous())
        .collect::<Result<Vec<_>>>()?;
    let Some(first) = ts.first() else {
        candle_core::bail!("merge_heads: no input");
    };
    let (b, h, t, hd) = first.dims4()?;
    if ts.iter().any(|x| x.dims() != [b, h, t, hd]) || !(ts.len() == 1 || ts.len() == 3) {
        candle_core::bail!("merge_heads: needs 1 or 3 tensors of one shape");
    }
    let op = HeadLayoutOp::Merge {
        dims: [b, t, h, hd],
        parts: ts.len(),
        scale0: scale0 as f32,
    };
    let (y, z) = if ts.len() == 3 {
        (&ts[1], &ts[2])
    } else {
        (first, first)
    };
    first.apply_op3_no_bwd(y, z, &op)
}
