//! The CUDA side of the one-pass kernels: PTX from `cuda/rowwise.cu` (built by build.rs with
//! the `cuda` feature) and the launchers of the row kernels, the in-place bias add and the head
//! layouts. Kernel launches and uninitialised device buffers are `unsafe` in cudarc; each use
//! says why it holds (argument lists match rowwise.cu; every output element is written before it
//! is read).
#![allow(unsafe_code)]

pub use head::run as run_heads;
pub use row::{add_bias_in_place, fwd};

mod row {
    use super::super::RowKernel;
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
        op: RowKernel,
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
            RowKernel::GeluFwd => {
                builder.arg(&sa).arg(&out).arg(&len64);
                // SAFETY: argument types and count match `gelu_fwd_*` in rowwise.cu.
                unsafe { builder.launch(flat_cfg) }.w()?;
            }
            RowKernel::SoftmaxFwd => {
                builder.arg(&sa).arg(&out).arg(&rows).arg(&n32);
                // SAFETY: argument types and count match `softmax_fwd_*` in rowwise.cu.
                unsafe { builder.launch(row_cfg) }.w()?;
            }
            RowKernel::GeluBwd => {
                builder.arg(&sa).arg(&sb).arg(&out).arg(&len64);
                // SAFETY: argument types and count match `gelu_bwd_*` in rowwise.cu.
                unsafe { builder.launch(flat_cfg) }.w()?;
            }
            RowKernel::SoftmaxBwd => {
                builder.arg(&sa).arg(&sb).arg(&out).arg(&rows).arg(&n32);
                // SAFETY: argument types and count match `softmax_bwd_*` in rowwise.cu.
                unsafe { builder.launch(row_cfg) }.w()?;
            }
            RowKernel::LayerNormBwd { eps } => {
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

    pub fn fwd(
        op: RowKernel,
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

mod head {
    use super::super::heads::HeadLayoutOp;
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
        op: HeadLayoutOp,
        ins: [(&CudaStorage, &Layout); 3],
        len: usize,
    ) -> Result<CudaStorage> {
        let dev = ins[0].0.device.clone();
        let name = match op {
            HeadLayoutOp::Split { .. } => "split_qkv",
            HeadLayoutOp::Merge { .. } => "merge_heads",
        };
        let func = dev.get_or_load_custom_func(&format!("{name}_{suffix}"), "moppa_rowwise", super::row::PTX)?;
        // SAFETY: the kernel writes every one of the `len` elements.
        let out: CudaSlice<T> = unsafe { dev.alloc::<T>(len)? };
        let cfg = super::row::flat_cfg(len);
        let (a, b, c) = (
            slice::<T>(ins[0].0, ins[0].1)?,
            slice::<T>(ins[1].0, ins[1].1)?,
            slice::<T>(ins[2].0, ins[2].1)?,
        );
        let mut builder = func.builder();
        match op {
            HeadLayoutOp::Split {
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
            HeadLayoutOp::Merge { dims, parts, scale0 } => {
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

    pub fn run(op: HeadLayoutOp, ins: [(&CudaStorage, &Layout); 3], len: usize) -> Result<CudaStorage> {
        match ins[0].0.dtype() {
            DType::F32 => go::<f32>("f32", op, ins, len),
            DType::BF16 => go::<half::bf16>("bf16", op, ins, len),
            DType::F16 => go::<half::f16>("f16", op, ins, len),
            d => candle_core::bail!("head op: no CUDA kernel for {d:?}"),
        }
    }
}
