//! From the loader's host buffers to the model's input tensors: one conversion for training,
//! evaluation, snapshots, benchmarks and pretraining.

use candle_core::{DType, Device, Result, Tensor};

/// `b` normalised images of `size × size` (CHW, row-major) as a `(b, 3, size, size)` tensor in
/// `dtype` on `device`.
pub fn images_tensor(pixels: Vec<f32>, b: usize, size: usize, device: &Device, dtype: DType) -> Result<Tensor> {
    let t = Tensor::from_vec(pixels, (b, 3, size, size), device)?;
    if dtype == DType::F32 { Ok(t) } else { t.to_dtype(dtype) }
}

/// Class labels as a `(b)` `u32` tensor.
pub fn labels_tensor(labels: &[u32], device: &Device) -> Result<Tensor> {
    Tensor::from_slice(labels, labels.len(), device)
}
