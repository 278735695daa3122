//! Seeded parameter initialisation (PyTorch's conventions).

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng as _, SeedableRng as _};

/// A seeded source of initial values.
pub struct Init {
    rng: rand::rngs::StdRng,
    device: Device,
    dtype: DType,
}

impl Init {
    /// A generator of `dtype` variables on `device`, seeded.
    #[must_use]
    pub fn new(seed: u64, device: &Device, dtype: DType) -> Self {
        Self {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            device: device.clone(),
            dtype,
        }
    }

    /// PyTorch's `kaiming_uniform_(a = √5)` for a `(out, in)` weight, which is `U(±1/√in)` (the
    /// default `nn.Linear` init, and LoRA's A).
    pub fn kaiming_uniform(&mut self, out: usize, fan_in: usize) -> Result<Var> {
        self.uniform(&[out, fan_in], 1.0 / (fan_in.max(1) as f64).sqrt())
    }

    /// `U(±bound)`.
    pub fn uniform(&mut self, shape: &[usize], bound: f64) -> Result<Var> {
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.rng.random_range(-bound..bound) as f32).collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &self.device)?.to_dtype(self.dtype)?)
    }

    /// A zero-filled variable.
    pub fn zeros(&self, shape: &[usize]) -> Result<Var> {
        Var::from_tensor(&Tensor::zeros(shape, self.dtype, &self.device)?)
    }

    /// A variable from values.
    pub fn from_values(&self, values: Vec<f32>, shape: &[usize]) -> Result<Var> {
        Var::from_tensor(&Tensor::from_vec(values, shape, &self.device)?.to_dtype(self.dtype)?)
    }
}
