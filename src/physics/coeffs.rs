//! Scalar coefficients of the three priors (one value for every channel: the playground, `moppa
//! filters`, `moppa apply`) and their validation. The priors themselves are [`crate::config::Prior`].

use crate::config::OutOfRange;
use crate::config::range;
use serde::{Deserialize, Serialize};

/// Errors of the physics layer.
#[derive(Debug, thiserror::Error)]
pub enum PhysicsError {
    /// A coefficient outside its range (`config::range`).
    #[error(transparent)]
    BadCoefficient(#[from] OutOfRange),
    /// Buffer sizes that do not match the grid.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A candle error while building tensors.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Scalar coefficients of the three filters (one value for every channel).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PriorCoeffs {
    /// Heat diffusivity κ > 0.
    pub kappa: f64,
    /// Wave speed c > 0.
    pub c: f64,
    /// Poisson screening ε > 0.
    pub eps: f64,
    /// Time τ > 0 at which heat and wave are evaluated.
    pub tau: f64,
    /// Wave damping γ ≥ 0.
    pub gamma: f64,
}

impl Default for PriorCoeffs {
    fn default() -> Self {
        Self {
            kappa: 0.1,
            c: 0.5,
            eps: 1.0,
            tau: 1.0,
            gamma: 0.0,
        }
    }
}

impl PriorCoeffs {
    /// Checks every coefficient's domain; the error names the first bad one and its value.
    pub fn validate(&self) -> Result<(), PhysicsError> {
        // The ranges keep every filter finite in f32 at every corner (tests/physics.rs).
        range::KAPPA.check(self.kappa)?;
        range::WAVE_SPEED.check(self.c)?;
        range::EPS.check(self.eps)?;
        range::TAU.check(self.tau)?;
        range::GAMMA.check(self.gamma)?;
        Ok(())
    }
}
