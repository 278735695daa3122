//! Orthonormal DCT-II matrices and the 2-D transform of small grids (host side, `f64`).

use super::PhysicsError;

/// The orthonormal DCT-II matrix `C_N`, row-major `N×N`:
/// `C[n,i] = sqrt(2/N)·cos(π·n·(i+½)/N)`, row 0 = `sqrt(1/N)`. `C·Cᵀ = I`.
#[must_use]
pub fn dct_matrix(n: usize) -> Vec<f64> {
    let nf = n as f64;
    let mut c = vec![0.0; n * n];
    for k in 0..n {
        let scale = if k == 0 { (1.0 / nf).sqrt() } else { (2.0 / nf).sqrt() };
        for i in 0..n {
            c[k * n + i] = scale * (std::f64::consts::PI * k as f64 * (i as f64 + 0.5) / nf).cos();
        }
    }
    c
}

/// The 2-D orthonormal DCT-II of an `H×W` grid: `Ẑ = C_H·Z·C_Wᵀ`, inverse `Z = C_Hᵀ·Ẑ·C_W`.
///
/// Grids are row-major slices of length `H·W` (row = n, column = m).
#[derive(Clone, Debug)]
pub struct Dct2 {
    h: usize,
    w: usize,
    c_h: Vec<f64>,
    c_w: Vec<f64>,
}

impl Dct2 {
    /// Plans the transform for an `h×w` grid.
    #[must_use]
    pub fn new(h: usize, w: usize) -> Self {
        Self {
            h,
            w,
            c_h: dct_matrix(h),
            c_w: dct_matrix(w),
        }
    }

    /// Grid height `H`.
    #[must_use]
    pub fn height(&self) -> usize {
        self.h
    }

    /// Grid width `W`.
    #[must_use]
    pub fn width(&self) -> usize {
        self.w
    }

    fn check(&self, len: usize) -> Result<(), PhysicsError> {
        if len == self.h * self.w {
            Ok(())
        } else {
            Err(PhysicsError::Shape(format!(
                "grid buffer has {len} values, expected {}×{} = {}",
                self.h,
                self.w,
                self.h * self.w
            )))
        }
    }

    /// `Ẑ = C_H·Z·C_Wᵀ`.
    pub fn forward(&self, grid: &[f64]) -> Result<Vec<f64>, PhysicsError> {
        self.check(grid.len())?;
        Ok(self.transform(grid, false))
    }

    /// `Z = C_Hᵀ·Ẑ·C_W`.
    pub fn inverse(&self, coeffs: &[f64]) -> Result<Vec<f64>, PhysicsError> {
        self.check(coeffs.len())?;
        Ok(self.transform(coeffs, true))
    }

    /// `IDCT2(G ⊙ DCT2(Z))`: applies a spectral gain `G` (same shape as the grid).
    pub fn filter(&self, grid: &[f64], gain: &[f64]) -> Result<Vec<f64>, PhysicsError> {
        self.check(gain.len())?;
        let mut spec = self.forward(grid)?;
        for (s, g) in spec.iter_mut().zip(gain) {
            *s *= g;
        }
        self.inverse(&spec)
    }

    /// [`Self::forward`] for `f32` grids (computed in `f64`).
    pub fn forward_f32(&self, grid: &[f32]) -> Result<Vec<f32>, PhysicsError> {
        let g: Vec<f64> = grid.iter().map(|&v| f64::from(v)).collect();
        Ok(to_f32(&self.forward(&g)?))
    }

    /// [`Self::inverse`] for `f32` coefficients (computed in `f64`).
    pub fn inverse_f32(&self, coeffs: &[f32]) -> Result<Vec<f32>, PhysicsError> {
        let c: Vec<f64> = coeffs.iter().map(|&v| f64::from(v)).collect();
        Ok(to_f32(&self.inverse(&c)?))
    }

    /// Left-multiplies by `C_H` (or `C_Hᵀ`) and right-multiplies by `C_Wᵀ` (or `C_W`).
    fn transform(&self, x: &[f64], inverse: bool) -> Vec<f64> {
        let (h, w) = (self.h, self.w);
        // tmp = A·X with A = C_H (forward) or C_Hᵀ (inverse).
        let mut tmp = vec![0.0; h * w];
        for r in 0..h {
            for k in 0..h {
                let a = if inverse {
                    self.c_h[k * h + r]
                } else {
                    self.c_h[r * h + k]
                };
                let row = &x[k * w..(k + 1) * w];
                for (t, v) in tmp[r * w..(r + 1) * w].iter_mut().zip(row) {
                    *t += a * v;
                }
            }
        }
        // out = tmp·B with B = C_Wᵀ (forward) or C_W (inverse).
        let mut out = vec![0.0; h * w];
        for r in 0..h {
            for m in 0..w {
                let mut acc = 0.0;
                for j in 0..w {
                    let b = if inverse {
                        self.c_w[j * w + m]
                    } else {
                        self.c_w[m * w + j]
                    };
                    acc += tmp[r * w + j] * b;
                }
                out[r * w + m] = acc;
            }
        }
        out
    }
}

fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}
