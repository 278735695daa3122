//! One-pass backward kernels of the lean ops: GELU (erf form), softmax over the last dimension
//! and LayerNorm's input gradient. Built from candle primitives these are 5-14 kernels and as
//! many passes over a `(B, T, ·)` tensor each (on an H200 the GELU backward of ViT-B/16 at batch
//! 64 took 1.9 ms per block where one pass takes ~0.05 ms); here each is one kernel.
//!
//! On CUDA they run `cuda/rowwise.cu` (PTX built by build.rs); on the CPU, the loops below, which
//! are what the lean ops' CPU tests exercise (tests/ops.rs checks both against the composite
//! forms) and which the CUDA kernels mirror line by line. Everything accumulates in `f32`.
//! None of these ops has a backward of its own: they are used inside backward passes only.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Which one-pass kernel.
#[derive(Clone, Copy, Debug)]
enum Op {
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

impl Op {
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
fn cpu_run<T: WithDType>(op: Op, a: &[T], b: &[T], c: &[T], n: usize) -> Vec<T> {
    let f = |v: T| v.to_f64() as f32;
    let t = |v: f32| T::from_f64(f64::from(v));
    match op {
        Op::GeluFwd => a
            .par_iter()
            .map(|&x| {
                let x = f(x);
                t(0.5 * x * (1.0 + candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2)))
            })
            .collect(),
        Op::SoftmaxFwd => {
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
        Op::GeluBwd => a
            .par_iter()
            .zip(b.par_iter())
            .map(|(&x, &g)| t(f(g) * gelu_grad(f(x))))
            .collect(),
        Op::SoftmaxBwd => {
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
        Op::LayerNormBwd { eps } => {
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
    op: Op,
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

// Kernel launches and uninitialised device buffers are `unsafe` in cudarc; each use says why it
// holds (argument lists match rowwise.cu; every output element is written before it is read).
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod gpu {
    use super::Op;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::WrapErr;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::{CudaStorage, DType, Layout, Result, Shape};

    pub(super) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rowwise.ptx"));

    /// Launch shape of the elementwise kernels (grid-stride loops: any length fits).
    pub(super) fn flat_cfg(len: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (len.div_ceil(256).min(65_535 * 8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }
    /// Rows per block of the row kernels (one warp each).
    const ROWS_PER_BLOCK: u32 = 8;

    fn launch<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
        op: Op,
        suffix: &str,
        a: (&CudaStorage, &Layout),
        b: (&CudaStorage, &Layout),
        c: Option<(&CudaStorage, &Layout)>,
    ) -> Result<CudaStorage> {
        let dev = a.0.device.clone();
        let range = |l: &Layout| {
            l.contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg(format!("{}: operand not contiguous", op.name())))
        };
        let (a0, a1) = range(a.1)?;
        let (b0, b1) = range(b.1)?;
        let sa = a.0.as_cuda_slice::<T>()?.slice(a0..a1);
        let sb = b.0.as_cuda_slice::<T>()?.slice(b0..b1);
        let len = a1 - a0;
        let n = a.1.dims().last().copied().unwrap_or(1).max(1);
        let rows = (len / n) as u64;
        let func = dev.get_or_load_custom_func(&format!("{}_{suffix}", op.name()), "moppa_rowwise", PTX)?;
        // SAFETY: every element is written by the kernel below before anyone reads it.
        let out = unsafe { dev.alloc::<T>(len)? };
        let mut builder = func.builder();
        let row_cfg = LaunchConfig {
            grid_dim: ((rows as u32).div_ceil(ROWS_PER_BLOCK), 1, 1),
            block_dim: (32 * ROWS_PER_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n32, len64) = (n as u32, len as u64);
        let flat_cfg = flat_cfg(len);
        match op {
            Op::GeluFwd => {
                builder.arg(&sa).arg(&out).arg(&len64);
                // SAFETY: argument types and count match `gelu_fwd_*` in rowwise.cu.
                unsafe { builder.launch(flat_cfg) }.w()?;
            }
            Op::SoftmaxFwd => {
                builder.arg(&sa).arg(&out).arg(&rows).arg(&n32);
                // SAFETY: argument types and count match `softmax_fwd_*` in rowwise.cu.
                unsafe { builder.launch(row_cfg) }.w()?;
            }
            Op::GeluBwd => {
                builder.arg(&sa).arg(&sb).arg(&out).arg(&len64);
                // SAFETY: argument types and count match `gelu_bwd_*` in rowwise.cu.
                unsafe { builder.launch(flat_cfg) }.w()?;
            }
            Op::SoftmaxBwd => {
                builder.arg(&sa).arg(&sb).arg(&out).arg(&rows).arg(&n32);
                // SAFETY: argument types and count match `softmax_bwd_*` in rowwise.cu.
                unsafe { builder.launch(row_cfg) }.w()?;
            }
            Op::LayerNormBwd { eps } => {
                let Some((sc, lc)) = c else {
                    candle_core::bail!("layer_norm_bwd: γ missing");
                };
                let (c0, c1) = range(lc)?;
                if c1 - c0 != n {
                    candle_core::bail!("layer_norm_bwd: γ has {} values for rows of {n}", c1 - c0);
                }
                let gamma = sc.as_cuda_slice::<T>()?.slice(c0..c1);
                builder
                    .arg(&sa)
                    .arg(&gamma)
                    .arg(&sb)
                    .arg(&out)
                    .arg(&rows)
                    .arg(&n32)
                    .arg(&eps);
                // SAFETY: argument types and count match `layer_norm_bwd_*` in rowwise.cu.
                unsafe { builder.launch(row_cfg) }.w()?;
            }
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }

    pub(super) fn fwd(
        op: Op,
        a: (&CudaStorage, &Layout),
        b: (&CudaStorage, &Layout),
        c: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(CudaStorage, Shape)> {
        if a.1.shape() != b.1.shape() {
            candle_core::bail!("{}: operand shapes differ", op.name());
        }
        let out = match a.0.dtype() {
            DType::F32 => launch::<f32>(op, "f32", a, b, c)?,
            DType::BF16 => launch::<half::bf16>(op, "bf16", a, b, c)?,
            DType::F16 => launch::<half::f16>(op, "f16", a, b, c)?,
            d => candle_core::bail!("{}: no CUDA kernel for {d:?}", op.name()),
        };
        Ok((out, a.1.shape().clone()))
    }

    /// `y[r, j] += b[j]` in place: `y` a contiguous `(len / n, n)` buffer just produced by a
    /// GEMM, `b` a contiguous `n`-vector.
    pub fn add_bias_in_place(y: &mut CudaStorage, b: &CudaStorage, lb: &Layout, n: usize) -> Result<()> {
        fn go<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
            suffix: &str,
            y: &mut CudaStorage,
            b: &CudaStorage,
            lb: &Layout,
            n: usize,
        ) -> Result<()> {
            let Some((b0, b1)) = lb.contiguous_offsets() else {
                candle_core::bail!("add_bias: bias not contiguous");
            };
            if b1 - b0 != n {
                candle_core::bail!("add_bias: {} bias values for rows of {n}", b1 - b0);
            }
            let dev = y.device.clone();
            let func = dev.get_or_load_custom_func(&format!("add_bias_{suffix}"), "moppa_rowwise", PTX)?;
            let bias = b.as_cuda_slice::<T>()?.slice(b0..b1);
            let ys = y.as_cuda_slice_mut::<T>()?;
            let (len, n32) = (ys.len() as u64, n as u32);
            let cfg = flat_cfg(ys.len());
            let mut builder = func.builder();
            builder.arg(ys).arg(&bias).arg(&len).arg(&n32);
            // SAFETY: argument types and count match `add_bias_*` in rowwise.cu.
            unsafe { builder.launch(cfg) }.w()?;
            Ok(())
        }
        match y.dtype() {
            DType::F32 => go::<f32>("f32", y, b, lb, n),
            DType::BF16 => go::<half::bf16>("bf16", y, b, lb, n),
            DType::F16 => go::<half::f16>("f16", y, b, lb, n),
            d => candle_core::bail!("add_bias: no CUDA kernel for {d:?}"),
        }
    }
}

#[cfg(feature = "cuda")]
pub use gpu::add_bias_in_place;

#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod gpu_heads {
    use super::Heads;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::WrapErr;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, PushKernelArg};
    use candle_core::{CudaStorage, DType, Layout, Result};

    fn slice<'a, T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
        s: &'a CudaStorage,
        l: &Layout,
    ) -> Result<CudaView<'a, T>> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("head op: operand not contiguous");
        };
        Ok(s.as_cuda_slice::<T>()?.slice(a..b))
    }

    fn go<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
        suffix: &str,
        op: Heads,
        ins: [(&CudaStorage, &Layout); 3],
        len: usize,
    ) -> Result<CudaStorage> {
        let dev = ins[0].0.device.clone();
        let name = match op {
            Heads::Split { .. } => "split_qkv",
            Heads::Merge { .. } => "merge_heads",
        };
        let func = dev.get_or_load_custom_func(&format!("{name}_{suffix}"), "moppa_rowwise", super::gpu::PTX)?;
        // SAFETY: the kernel writes every one of the `len` elements.
        let out: CudaSlice<T> = unsafe { dev.alloc::<T>(len)? };
        let cfg = super::gpu::flat_cfg(len);
        let (a, b, c) = (
            slice::<T>(ins[0].0, ins[0].1)?,
            slice::<T>(ins[1].0, ins[1].1)?,
            slice::<T>(ins[2].0, ins[2].1)?,
        );
        let mut builder = func.builder();
        match op {
            Heads::Split {
                dims,
                parts,
                scale,
                has_delta,
            } => {
                let [bn, tn, h, hd] = dims.map(|v| v as u32);
                let parts = parts as u32;
                let null = 0u64;
                builder.arg(&a);
                if has_delta {
                    builder.arg(&b);
                } else {
                    builder.arg(&null);
                }
                builder
                    .arg(&out)
                    .arg(&bn)
                    .arg(&tn)
                    .arg(&h)
                    .arg(&hd)
                    .arg(&parts)
                    .arg(&scale);
                // SAFETY: argument types and count match `split_qkv_*` in rowwise.cu.
                unsafe { builder.launch(cfg) }.w()?;
            }
            Heads::Merge { dims, parts, scale0 } => {
                let [bn, tn, h, hd] = dims.map(|v| v as u32);
                let parts = parts as u32;
                builder.arg(&a).arg(&b).arg(&c).arg(&out);
                builder.arg(&bn).arg(&tn).arg(&h).arg(&hd).arg(&parts).arg(&scale0);
                // SAFETY: argument types and count match `merge_heads_*` in rowwise.cu.
                unsafe { builder.launch(cfg) }.w()?;
            }
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }

    pub(super) fn run(op: Heads, ins: [(&CudaStorage, &Layout); 3], len: usize) -> Result<CudaStorage> {
        match ins[0].0.dtype() {
            DType::F32 => go::<f32>("f32", op, ins, len),
            DType::BF16 => go::<half::bf16>("bf16", op, ins, len),
            DType::F16 => go::<half::f16>("f16", op, ins, len),
            d => candle_core::bail!("head op: no CUDA kernel for {d:?}"),
        }
    }
}
// ---------------------------------------------------------------------------------------------
// Attention head layout: split the qkv projection into heads and merge heads back in one pass
// each (instead of narrow + add + reshape + transpose + contiguous copy + scale).
// ---------------------------------------------------------------------------------------------

/// Which head-layout kernel (`dims` = `[B, T, H, hd]`).
#[derive(Clone, Copy, Debug)]
enum Heads {
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

impl Heads {
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

impl CustomOp3 for Heads {
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
            gpu_heads::run(*self, [(a, la), (b, lb), (c, lc)], shape.elem_count())?,
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
    let op = Heads::Split {
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
    let op = Heads::Split {
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
    let op = Heads::Merge {
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

struct Two(Op);

impl CustomOp2 for Two {
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
        gpu::fwd(self.0, (a, la), (b, lb), None)
    }
}

struct Three(Op);

impl CustomOp3 for Three {
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
        gpu::fwd(self.0, (a, la), (b, lb), Some((c, lc)))
    }
}

/// `GELU(a)` (erf form), in one pass (no gradient of its own: for forward passes on detached
/// inputs whose op carries the backward).
pub fn gelu(a: &Tensor) -> Result<Tensor> {
    let a = a.detach().contiguous()?;
    a.apply_op2_no_bwd(&a, &Two(Op::GeluFwd))
}

/// Softmax over the last dimension, in one pass (no gradient of its own, like [`gelu`]).
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let x = x.detach().contiguous()?;
    x.apply_op2_no_bwd(&x, &Two(Op::SoftmaxFwd))
}

/// `dy ⊙ GELU'(a)` for the erf GELU, in one pass (no gradient of its own).
pub fn gelu_bwd(a: &Tensor, dy: &Tensor) -> Result<Tensor> {
    a.detach()
        .contiguous()?
        .apply_op2_no_bwd(&dy.detach().contiguous()?, &Two(Op::GeluBwd))
}

/// Softmax's input gradient `p ⊙ (dp − Σ dp⊙p)` over the last dimension, from its output `p`.
pub fn softmax_bwd(p: &Tensor, dp: &Tensor) -> Result<Tensor> {
    p.detach()
        .contiguous()?
        .apply_op2_no_bwd(&dp.detach().contiguous()?, &Two(Op::SoftmaxBwd))
}

/// LayerNorm's input gradient over the last dimension from its input `x`, `γ` and the output
/// gradient `dy` (the statistics are recomputed from `x`).
pub fn layer_norm_bwd(x: &Tensor, gamma: &Tensor, dy: &Tensor, eps: f64) -> Result<Tensor> {
    let gamma = gamma.detach().contiguous()?;
    x.detach().contiguous()?.apply_op3_no_bwd(
        &dy.detach().contiguous()?,
        &gamma,
        &Three(Op::LayerNormBwd { eps: eps as f32 }),
    )
}

/// Each one-pass kernel on `device` against the CPU loops on the same inputs, in f32 and bf16:
/// `(kernel, dtype, largest error relative to the largest reference value)`. On the CPU this
/// compares the loops with themselves; it is `moppa bench --verify`'s check of a GPU build.
pub fn self_check(device: &candle_core::Device) -> Result<Vec<(String, DType, f64)>> {
    use candle_core::Device;
    let (rows, n) = (37, 197);
    let cpu = Device::Cpu;
    let a = Tensor::randn(0f32, 1.5, (rows, n), &cpu)?;
    let b = Tensor::randn(0f32, 1.0, (rows, n), &cpu)?;
    let p = super::composite::softmax(&a)?;
    let gamma = Tensor::randn(1f32, 0.3, n, &cpu)?;
    let w = Tensor::randn(0f32, 0.1, (n, n), &cpu)?;
    // Attention layouts: B 2, T 5, 3 heads of 4.
    let qkv = Tensor::randn(0f32, 1.0, (2, 5, 36), &cpu)?;
    let delta = Tensor::randn(0f32, 1.0, (2, 5, 24), &cpu)?;
    let heads = |t: &Tensor, i: usize| t.flatten_all()?.narrow(0, i * 120, 120)?.reshape((2, 3, 5, 4));
    let mut out = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        let on = |t: &Tensor| t.to_dtype(dtype)?.to_device(device);
        let here = |t: &Tensor| t.to_dtype(dtype);
        let split = |dev_qkv: &Tensor, dev_delta: &Tensor| -> Result<Tensor> {
            let (q, k, v) = split_qkv(dev_qkv, Some(dev_delta), 3, 0.125)?;
            Tensor::stack(&[q, k, v], 0)
        };
        let (q, k, v) = (heads(&a, 0)?, heads(&a, 1)?, heads(&b, 0)?);
        let cases: [(&str, Tensor, Tensor); 9] = [
            (
                "split_heads",
                split_heads(&on(&qkv)?, 3)?,
                split_heads(&here(&qkv)?, 3)?,
            ),
            ("gelu", gelu(&on(&a)?)?, gelu(&here(&a)?)?),
            ("softmax", softmax(&on(&a)?)?, softmax(&here(&a)?)?),
            (
                "gelu_bwd",
                gelu_bwd(&on(&a)?, &on(&b)?)?,
                gelu_bwd(&here(&a)?, &here(&b)?)?,
            ),
            (
                "softmax_bwd",
                softmax_bwd(&on(&p)?, &on(&b)?)?,
                softmax_bwd(&here(&p)?, &here(&b)?)?,
            ),
            (
                "layer_norm_bwd",
                layer_norm_bwd(&on(&a)?, &on(&gamma)?, &on(&b)?, 1e-6)?,
                layer_norm_bwd(&here(&a)?, &here(&gamma)?, &here(&b)?, 1e-6)?,
            ),
            (
                "split_qkv",
                split(&on(&qkv)?, &on(&delta)?)?,
                split(&here(&qkv)?, &here(&delta)?)?,
            ),
            (
                "merge_heads",
                merge_heads(&[&on(&q)?, &on(&k)?, &on(&v)?], 0.5)?,
                merge_heads(&[&here(&q)?, &here(&k)?, &here(&v)?], 0.5)?,
            ),
            (
                "linear (bias)",
                super::lean::linear(&on(&a)?, &on(&w)?, Some(&on(&gamma)?))?,
                super::lean::linear(&here(&a)?, &here(&w)?, Some(&here(&gamma)?))?,
            ),
        ];
        for (name, got, want) in cases {
            let (got, want) = (got.to_device(&cpu)?.to_dtype(DType::F32)?, want.to_dtype(DType::F32)?);
            let scale = f64::from(want.abs()?.max_all()?.to_scalar::<f32>()?).max(1e-12);
            let err = f64::from((got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?);
            out.push((name.to_string(), dtype, err / scale));
        }
    }
    Ok(out)
}
