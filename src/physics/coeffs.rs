//! Scalar coefficients of the three priors (one value for every channel: the playground, `moppa
//! filters`, `moppa apply`) and their validation. The priors themselves are [`crate::config::Prior`].

use serde::{Deserialize, Serialize};

/// Errors of the physics layer.
#[derive(Debug, thiserror::Error)]
pub enum PhysicsError {
    /// A coefficient outside its domain (κ, c, ε, τ must be > 0; γ ≥ 0).
    #[error("{name} must be {rule} (got {})", crate::util::short_number(*value))]
    BadCoefficient {
        /// Coefficient name as the user knows it.
        name: &'static str,
        /// The rule it broke.
        rule: &'static str,
        /// The offending value.
        value: f64,
    },
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
        positive("kappa", self.kappa)?;
        positive("c", self.c)?;
        positive("eps", self.eps)?;
        positive("tau", self.tau)?;
        non_negative("gamma", self.gamma)?;
        // The filters' arguments grow with Λ < 8: they must stay finite, or the filter is NaN
        // (cos of infinity) where the user sees an all-black image or null cells.
        let sqrt_max = 8f64.sqrt();
        for (name, value, product) in [
            ("kappa", self.kappa, self.kappa * self.tau * 8.0),
            ("c", self.c, self.c * self.tau * sqrt_max),
            ("gamma", self.gamma, self.gamma * self.tau * sqrt_max),
        ] {
            if !product.is_finite() {
                return Err(PhysicsError::BadCoefficient {
                    name,
                    rule: "small enough that its product with τ and Λ is finite",
                    value,
                });
            }
        }
        Ok(())
    }
}

/// `value > 0` and finite, else a [`PhysicsError::BadCoefficient`] naming it.
pub(crate) fn positive(name: &'static str, value: f64) -> Result<(), PhysicsError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(PhysicsError::BadCoefficient {
            name,
            rule: "a finite number > 0",
            value,
        })
    }
}

/// `value >= 0` and finite, else a [`PhysicsError::BadCoefficient`] naming it.
pub(crate) fn non_negative(name: &'static str, value: f64) -> Result<(), PhysicsError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(PhysicsError::BadCoefficient {
            name,
            rule: "a finite number >= 0",
            value,
        })
    }
}
