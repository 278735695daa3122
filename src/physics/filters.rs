//! The grid Laplacian's eigenvalues `Λ` and the three spectral filters (host side, `f64`).

use super::{Dct2, PhysicsError, Prior, PriorCoeffs};
use crate::config::range;
use serde::Serialize;

/// `Λ_nm = 4·sin²(π·n/(2H)) + 4·sin²(π·m/(2W))`, row-major `H×W`, values in `[0, 8)`.
///
/// These are the eigenvalues of the 5-point grid Laplacian with reflecting (Neumann) boundaries,
/// which the DCT-II diagonalises exactly, so every filter is the exact solution of its PDE.
#[must_use]
pub fn laplacian_eigenvalues(h: usize, w: usize) -> Vec<f64> {
    let half_pi = std::f64::consts::FRAC_PI_2;
    let mut out = Vec::with_capacity(h * w);
    for n in 0..h {
        let a = (half_pi * n as f64 / h as f64).sin();
        for m in 0..w {
            let b = (half_pi * m as f64 / w as f64).sin();
            out.push(4.0 * a * a + 4.0 * b * b);
        }
    }
    out
}

/// Heat: `G = exp(−κ·τ·Λ)`.
#[must_use]
pub fn heat_filter(lambda: &[f64], kappa: f64, tau: f64) -> Vec<f64> {
    lambda.iter().map(|&l| (-kappa * tau * l).exp()).collect()
}

/// Wave with damping: `G = exp(−γ·τ·√Λ)·cos(c·τ·√Λ)`.
#[must_use]
pub fn wave_filter(lambda: &[f64], c: f64, tau: f64, gamma: f64) -> Vec<f64> {
    lambda
        .iter()
        .map(|&l| {
            let k = l.sqrt();
            (-gamma * tau * k).exp() * (c * tau * k).cos()
        })
        .collect()
}

/// Screened Poisson: `G = S·ε/(Λ + ε)`; `source` = `S` (all ones when `None`).
pub fn poisson_filter(lambda: &[f64], eps: f64, source: Option<&[f64]>) -> Result<Vec<f64>, PhysicsError> {
    if let Some(s) = source
        && s.len() != lambda.len()
    {
        return Err(PhysicsError::Shape(format!(
            "source map has {} values, the grid {}",
            s.len(),
            lambda.len()
        )));
    }
    Ok(lambda
        .iter()
        .enumerate()
        .map(|(i, &l)| source.map_or(1.0, |s| s[i]) * eps / (l + eps))
        .collect())
}

/// The spatial impulse response `IDCT2(G ⊙ DCT2(δ))` of a gain `G`, for a unit impulse at cell
/// `(⌊H/2⌋, ⌊W/2⌋)`.
pub fn impulse_response(dct: &Dct2, gain: &[f64]) -> Result<Vec<f64>, PhysicsError> {
    let (h, w) = (dct.height(), dct.width());
    let mut delta = vec![0.0; h * w];
    delta[(h / 2) * w + w / 2] = 1.0;
    dct.filter(&delta, gain)
}

/// Points `(√Λ, G)` sorted by `√Λ`, gains averaged over cells with equal `Λ` (within 1e-9):
/// the filter as a function of spatial frequency, for radial-profile plots.
#[must_use]
pub fn radial_profile(lambda: &[f64], gain: &[f64]) -> Vec<(f64, f64)> {
    let mut pts: Vec<(f64, f64)> = lambda.iter().zip(gain).map(|(&l, &g)| (l.sqrt(), g)).collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut out: Vec<(f64, f64, usize)> = Vec::new();
    for (k, g) in pts {
        match out.last_mut() {
            Some(last) if (last.0 - k).abs() < 1e-9 => {
                last.1 += g;
                last.2 += 1;
            }
            _ => out.push((k, g, 1)),
        }
    }
    out.into_iter().map(|(k, g, n)| (k, g / n as f64)).collect()
}

/// RMS distance (in cells) of an impulse response's absolute mass from the impulse cell.
#[must_use]
pub fn impulse_width(h: usize, w: usize, response: &[f64]) -> f64 {
    let (cy, cx) = ((h / 2) as f64, (w / 2) as f64);
    let (mut num, mut den) = (0.0, 0.0);
    for n in 0..h {
        for m in 0..w {
            let a = response[n * w + m].abs();
            let d2 = (n as f64 - cy).powi(2) + (m as f64 - cx).powi(2);
            num += a * d2;
            den += a;
        }
    }
    if den > 0.0 { (num / den).sqrt() } else { 0.0 }
}

/// `Λ`, the three filters and their impulse responses on one grid, for scalar coefficients.
#[derive(Clone, Debug, Serialize)]
pub struct FilterSet {
    /// Grid height `H`.
    pub h: usize,
    /// Grid width `W`.
    pub w: usize,
    /// The coefficients used.
    pub coeffs: PriorCoeffs,
    /// `Λ`, row-major `H×W`.
    pub lambda: Vec<f64>,
    /// Heat gain, row-major.
    pub heat: Vec<f64>,
    /// Wave gain, row-major.
    pub wave: Vec<f64>,
    /// Poisson gain (source map all ones), row-major.
    pub poisson: Vec<f64>,
    /// Impulse responses in the same order heat, wave, Poisson.
    pub impulse: [Vec<f64>; 3],
}

impl FilterSet {
    /// Computes everything for an `h×w` grid; validates the coefficients first.
    pub fn new(h: usize, w: usize, coeffs: PriorCoeffs) -> Result<Self, PhysicsError> {
        coeffs.validate()?;
        if h == 0 || w == 0 {
            return Err(PhysicsError::Shape(format!("grid {h}×{w} is empty")));
        }
        let lambda = laplacian_eigenvalues(h, w);
        let heat = heat_filter(&lambda, coeffs.kappa, coeffs.tau);
        let wave = wave_filter(&lambda, coeffs.c, coeffs.tau, coeffs.gamma);
        let poisson = poisson_filter(&lambda, coeffs.eps, None)?;
        let dct = Dct2::new(h, w);
        let impulse = [
            impulse_response(&dct, &heat)?,
            impulse_response(&dct, &wave)?,
            impulse_response(&dct, &poisson)?,
        ];
        Ok(Self {
            h,
            w,
            coeffs,
            lambda,
            heat,
            wave,
            poisson,
            impulse,
        })
    }

    /// The gain of one prior.
    #[must_use]
    pub fn gain(&self, prior: Prior) -> &[f64] {
        match prior {
            Prior::Heat => &self.heat,
            Prior::Wave => &self.wave,
            Prior::Poisson => &self.poisson,
        }
    }

    /// The impulse response of one prior.
    #[must_use]
    pub fn impulse(&self, prior: Prior) -> &[f64] {
        match prior {
            Prior::Heat => &self.impulse[0],
            Prior::Wave => &self.impulse[1],
            Prior::Poisson => &self.impulse[2],
        }
    }
}

/// One channel's gain of `prior` on a grid with eigenvalues `lambda`, from that channel's
/// coefficient (κ, c or ε), τ, γ and (Poisson) the source map `S` (row-major, as `lambda`):
/// METHOD.md's formulas, for views that recompute filters from recorded coefficients.
pub fn channel_gain(
    prior: Prior,
    lambda: &[f64],
    coeff: f64,
    tau: f64,
    gamma: f64,
    source: Option<&[f64]>,
) -> Result<Vec<f64>, PhysicsError> {
    match prior {
        Prior::Heat => Ok(heat_filter(lambda, coeff, tau)),
        Prior::Wave => Ok(wave_filter(lambda, coeff, tau, gamma)),
        Prior::Poisson => poisson_filter(lambda, coeff, source),
    }
}

/// The gain of `prior` for scalar coefficients on a given `Λ` (source map all ones), coefficients
/// validated: the playground and `moppa filters`.
pub fn prior_gain(prior: Prior, lambda: &[f64], coeffs: &PriorCoeffs) -> Result<Vec<f64>, PhysicsError> {
    match prior {
        Prior::Heat => {
            range::KAPPA.check(coeffs.kappa)?;
            range::TAU.check(coeffs.tau)?;
            Ok(heat_filter(lambda, coeffs.kappa, coeffs.tau))
        }
        Prior::Wave => {
            range::WAVE_SPEED.check(coeffs.c)?;
            range::TAU.check(coeffs.tau)?;
            range::GAMMA.check(coeffs.gamma)?;
            Ok(wave_filter(lambda, coeffs.c, coeffs.tau, coeffs.gamma))
        }
        Prior::Poisson => {
            range::EPS.check(coeffs.eps)?;
            poisson_filter(lambda, coeffs.eps, None)
        }
    }
}
