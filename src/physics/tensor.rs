//! The same physics as candle tensors (any dtype, any device), differentiable where the model
//! learns through it (κ, c, ε and the source map `S`).
//!
//! Matrices are built in `f64` on the host, then cast to the working dtype (METHOD.md).

use super::{dct_matrix, laplacian_eigenvalues};
use candle_core::{DType, Device, Result, Tensor};

/// `C_N` as an `N×N` tensor.
pub fn dct_matrix_tensor(n: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    Tensor::from_vec(dct_matrix(n), (n, n), device)?.to_dtype(dtype)
}

/// The token-grid constants a spectral adapter needs, for one `H×W` grid.
#[derive(Clone, Debug)]
pub struct SpectralGrid {
    /// Grid height `H`.
    pub h: usize,
    /// Grid width `W`.
    pub w: usize,
    /// `Λ` flattened row-major, shape `(H·W)`.
    pub lambda: Tensor,
    /// `√Λ`, shape `(H·W)`.
    pub sqrt_lambda: Tensor,
    /// `K = C_H ⊗ C_W`, shape `(H·W, H·W)`: for a grid flattened row-major, `vec(Ẑ) = K·vec(Z)`.
    pub kron: Tensor,
    /// `Kᵀ` (the inverse transform), contiguous.
    pub kron_t: Tensor,
    /// `K` on the host in `f32`, row-major (for the fused CPU op).
    pub kron_host: std::sync::Arc<Vec<f32>>,
}

impl SpectralGrid {
    /// Builds the constants in `f64` and casts them to `dtype` on `device`.
    pub fn new(h: usize, w: usize, dtype: DType, device: &Device) -> Result<Self> {
        let lambda = laplacian_eigenvalues(h, w);
        let sqrt: Vec<f64> = lambda.iter().map(|l| l.sqrt()).collect();
        let (ch, cw) = (dct_matrix(h), dct_matrix(w));
        let n = h * w;
        let mut kron = vec![0.0; n * n];
        for a in 0..h {
            for b in 0..w {
                let row = (a * w + b) * n;
                for i in 0..h {
                    let chi = ch[a * h + i];
                    for j in 0..w {
                        kron[row + i * w + j] = chi * cw[b * w + j];
                    }
                }
            }
        }
        let kron_host = std::sync::Arc::new(kron.iter().map(|&v| v as f32).collect());
        let kron = Tensor::from_vec(kron, (n, n), device)?;
        Ok(Self {
            kron_host,
            h,
            w,
            lambda: Tensor::from_vec(lambda, n, device)?.to_dtype(dtype)?,
            sqrt_lambda: Tensor::from_vec(sqrt, n, device)?.to_dtype(dtype)?,
            kron_t: kron.t()?.contiguous()?.to_dtype(dtype)?,
            kron: kron.to_dtype(dtype)?,
        })
    }

    /// Number of grid cells `H·W`.
    #[must_use]
    pub fn cells(&self) -> usize {
        self.h * self.w
    }

    /// Heat gains for per-channel `κ` (shape `(r)`): `exp(−κ_j·τ·Λ)`, shape `(r, H·W)`.
    pub fn heat(&self, kappa: &Tensor, tau: f64) -> Result<Tensor> {
        let arg = kappa.unsqueeze(1)?.broadcast_mul(&self.lambda.unsqueeze(0)?)?;
        (arg * (-tau))?.exp()
    }

    /// Wave gains for per-channel `c`: `exp(−γ·τ·√Λ)·cos(c_j·τ·√Λ)`, shape `(r, H·W)`.
    pub fn wave(&self, c: &Tensor, tau: f64, gamma: f64) -> Result<Tensor> {
        let phase = (c.unsqueeze(1)?.broadcast_mul(&self.sqrt_lambda.unsqueeze(0)?)? * tau)?;
        let osc = phase.cos()?;
        if gamma == 0.0 {
            Ok(osc)
        } else {
            let damp = (&self.sqrt_lambda * (-gamma * tau))?.exp()?.unsqueeze(0)?;
            osc.broadcast_mul(&damp)
        }
    }

    /// Poisson gains for per-channel `ε` and source map `S` (shape `(H·W)`): `S·ε_j/(Λ + ε_j)`,
    /// shape `(r, H·W)`.
    pub fn poisson(&self, eps: &Tensor, source: &Tensor) -> Result<Tensor> {
        let e = eps.unsqueeze(1)?;
        let denom = e.broadcast_add(&self.lambda.unsqueeze(0)?)?;
        e.broadcast_div(&denom)?.broadcast_mul(&source.unsqueeze(0)?)
    }
}
