//! `moppa bench --verify`'s check of a GPU build's one-pass kernels: each runs on the device and
//! on the CPU loops it mirrors, on the same inputs, in f32 and bf16.

use super::lean;
use super::rowwise::{gelu, gelu_bwd, layer_norm_bwd, merge_heads, softmax, softmax_bwd, split_heads, split_qkv};
use candle_core::{DType, Result, Tensor};

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
                lean::linear(&on(&a)?, &on(&w)?, Some(&on(&gamma)?))?,
                lean::linear(&here(&a)?, &here(&w)?, Some(&here(&gamma)?))?,
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
