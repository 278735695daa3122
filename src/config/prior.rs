//! The method's vocabulary: the three priors, their per-channel coefficients, what can be locked
//! out of the optimizer, and values indexed by coefficient ([`PerCoeff`]), so that code which
//! handles κ, c and ε alike is written once.

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

    /// Position in [`Self::ALL`] (the colour and column index of the views).
    #[must_use]
    pub fn index(self) -> usize {
        self as usize
    }

    /// The learned per-channel coefficient of this prior.
    #[must_use]
    pub fn coeff(self) -> Coeff {
        match self {
            Self::Heat => Coeff::Kappa,
            Self::Wave => Coeff::C,
            Self::Poisson => Coeff::Eps,
        }
    }
}

impl std::fmt::Display for Prior {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not heat, wave or poisson.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown prior '{0}' (expected heat, wave or poisson)")]
pub struct UnknownPrior(pub String);

impl std::str::FromStr for Prior {
    type Err = UnknownPrior;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.trim().to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or(UnknownPrior(name))
    }
}

/// A per-channel spectral coefficient of MoPPA (each belongs to one prior).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Coeff {
    /// Heat diffusivity κ.
    Kappa,
    /// Wave speed c.
    C,
    /// Poisson screening ε.
    Eps,
}

impl Coeff {
    /// All three, in prior order.
    pub const ALL: [Self; 3] = [Self::Kappa, Self::C, Self::Eps];

    /// Name as in files and logs.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Kappa => "kappa",
            Self::C => "c",
            Self::Eps => "eps",
        }
    }

    /// The Greek (or Latin) symbol the method uses.
    #[must_use]
    pub fn symbol(self) -> &'static str {
        match self {
            Self::Kappa => "κ",
            Self::C => "c",
            Self::Eps => "ε",
        }
    }

    /// The prior it belongs to.
    #[must_use]
    pub fn prior(self) -> Prior {
        Prior::ALL[self as usize]
    }

    /// The range of valid values (INTERFACES.md "General").
    #[must_use]
    pub fn range(self) -> super::ValueRange {
        match self {
            Self::Kappa => super::range::KAPPA,
            Self::C => super::range::WAVE_SPEED,
            Self::Eps => super::range::EPS,
        }
    }
}

/// Something that can be held out of the optimizer: a coefficient or the Poisson source map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lockable {
    /// κ.
    Kappa,
    /// c.
    C,
    /// ε.
    Eps,
    /// The Poisson source map S.
    Source,
}

impl Lockable {
    /// All four.
    pub const ALL: [Self; 4] = [Self::Kappa, Self::C, Self::Eps, Self::Source];

    /// Name as in files and logs.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self.coeff() {
            Some(c) => c.name(),
            None => "source",
        }
    }

    /// The coefficient it is, if any (`None` for the source map).
    #[must_use]
    pub fn coeff(self) -> Option<Coeff> {
        Coeff::ALL.get(self as usize).copied()
    }
}

impl From<Coeff> for Lockable {
    fn from(c: Coeff) -> Self {
        Self::ALL[c as usize]
    }
}

/// One value per coefficient, indexed by [`Coeff`]. Serialised as the three fields `kappa`, `c`,
/// `eps`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PerCoeff<T> {
    /// κ's value.
    pub kappa: T,
    /// c's value.
    pub c: T,
    /// ε's value.
    pub eps: T,
}

impl<T> PerCoeff<T> {
    /// Builds each value from its coefficient.
    pub fn from_fn(mut f: impl FnMut(Coeff) -> T) -> Self {
        Self {
            kappa: f(Coeff::Kappa),
            c: f(Coeff::C),
            eps: f(Coeff::Eps),
        }
    }

    /// The values with their coefficients, in prior order.
    pub fn iter(&self) -> impl Iterator<Item = (Coeff, &T)> {
        Coeff::ALL.into_iter().map(move |c| (c, &self[c]))
    }
}

impl<T> std::ops::Index<Coeff> for PerCoeff<T> {
    type Output = T;
    fn index(&self, c: Coeff) -> &T {
        match c {
            Coeff::Kappa => &self.kappa,
            Coeff::C => &self.c,
            Coeff::Eps => &self.eps,
        }
    }
}

impl<T> std::ops::IndexMut<Coeff> for PerCoeff<T> {
    fn index_mut(&mut self, c: Coeff) -> &mut T {
        match c {
            Coeff::Kappa => &mut self.kappa,
            Coeff::C => &mut self.c,
            Coeff::Eps => &mut self.eps,
        }
    }
}
