//! Coefficients of the three priors and their validation.

use serde::{Deserialize, Serialize};

/// One of the three physical priors, in the method's fixed order heat, wave, Poisson.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Prior {
    /// Heat diffusion `u_t = κΔu`: local smoothing, a positive Gaussian-like kernel.
    Heat,
    /// Wave propagation `u_tt = c²Δu`: long-range, oscillatory interactions.
    Wave,
    /// Screened Poisson `−Δu + εu = εf`: global equilibrium, a heavy-tailed low-pass.
    Poisson,
}

impl Prior {
    /// All priors in the method's order.
    pub const ALL: [Self; 3] = [Self::Heat, Self::Wave, Self::Poisson];

    /// Lower-case name as used on the command line and in files.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Heat => "heat",
            Self::Wave => "wave",
            Self::Poisson => "poisson",
        }
    }

    /// The spectral filter as an equation, for tooltips and help text.
    #[must_use]
    pub fn equation(self) -> &'static str {
        match self {
            Self::Heat => "G = exp(−κ·τ·Λ)",
            Self::Wave => "G = exp(−γ·τ·√Λ)·cos(c·τ·√Λ)",
            Self::Poisson => "G = S·ε/(Λ + ε)",
        }
    }
}

impl std::fmt::Display for Prior {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Prior {
    type Err = PhysicsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "heat" => Ok(Self::Heat),
            "wave" => Ok(Self::Wave),
            "poisson" => Ok(Self::Poisson),
            other => Err(PhysicsError::UnknownPrior(other.to_owned())),
        }
    }
}

/// Errors of the physics layer.
#[derive(Debug, thiserror::Error)]
pub enum PhysicsError {
    /// A coefficient outside its domain (κ, c, ε, τ must be > 0; γ ≥ 0).
    #[error("{name} must be {rule} (got {value})")]
    BadCoefficient {
        /// Coefficient name as the user knows it.
        name: &'static str,
        /// The rule it broke.
        rule: &'static str,
        /// The offending value.
        value: f64,
    },
    /// A prior name that is not heat, wave or poisson.
    #[error("unknown prior '{0}' (expected heat, wave or poisson)")]
    UnknownPrior(String),
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
