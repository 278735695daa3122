//! The valid range of every coefficient and live hyper-parameter (INTERFACES.md "General"), with
//! the one check that every path calls: flags, TOML configs, the protocol's commands (local and
//! remote), lessons, the model's setters, resume and the playground. The bounds are those in which
//! every filter and update stays finite in f32, so a value is checked in the precision it is
//! stored in: it must lie in the range and stay finite (and non-zero, where zero is outside) once
//! rounded to f32. Nothing is clamped: a value outside is refused with the range in the message.

use crate::util::short_number;

/// A closed (or half-open at its lower end) interval of valid values of one named quantity.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ValueRange {
    /// The name as in flags, files and logs (`kappa`, `route_weight`, `lr`).
    pub name: &'static str,
    /// The smallest valid value (excluded when `open_min`).
    pub min: f64,
    /// The largest valid value (included).
    pub max: f64,
    /// Whether `min` itself is outside (the learning rate's `(0, 1e3]`).
    pub open_min: bool,
}

/// A value outside its range.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{name} = {} is outside its range {range}", short_number(*value))]
pub struct OutOfRange {
    /// The quantity's name.
    pub name: &'static str,
    /// The value refused.
    pub value: f64,
    /// The range, as written in INTERFACES.md (`[1e-8, 1e8]`).
    pub range: String,
}

impl ValueRange {
    const fn closed(name: &'static str, min: f64, max: f64) -> Self {
        Self {
            name,
            min,
            max,
            open_min: false,
        }
    }

    /// Whether `v` is valid: in the range in f64, and still finite (and non-zero where zero is
    /// outside) once stored as f32.
    #[must_use]
    pub fn contains(&self, v: f64) -> bool {
        let above = if self.open_min { v > self.min } else { v >= self.min };
        let stored = v as f32;
        let zero_ok = self.min <= 0.0 && !self.open_min;
        above && v <= self.max && stored.is_finite() && (zero_ok || stored > 0.0)
    }

    /// `v` if valid, else an error naming the quantity, the value and the range.
    pub fn check(&self, v: f64) -> Result<f64, OutOfRange> {
        if self.contains(v) {
            Ok(v)
        } else {
            Err(OutOfRange {
                name: self.name,
                value: v,
                range: self.to_string(),
            })
        }
    }

    /// The same range under another name (`--route-weight` for `route_weight`).
    #[must_use]
    pub const fn named(self, name: &'static str) -> Self {
        Self { name, ..self }
    }

    /// Whether the range spans decades (a slider over it is logarithmic).
    #[must_use]
    pub fn is_log(&self) -> bool {
        self.max / self.smallest_positive() >= 100.0
    }

    /// The smallest positive value a logarithmic slider reaches (for ranges that include 0, the
    /// point below which the slider jumps to 0).
    #[must_use]
    pub fn smallest_positive(&self) -> f64 {
        if self.min > 0.0 { self.min } else { 1e-8 }
    }
}

/// A bound as INTERFACES.md writes it: `0`, `1e-8`, `1e4`.
fn bound(v: f64) -> String {
    if v == 0.0 || (1e-3..1e3).contains(&v.abs()) {
        format!("{v}")
    } else {
        format!("{v:e}")
    }
}

impl std::fmt::Display for ValueRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let open = if self.open_min { '(' } else { '[' };
        write!(f, "{open}{}, {}]", bound(self.min), bound(self.max))
    }
}

/// Heat diffusivity κ.
pub const KAPPA: ValueRange = ValueRange::closed("kappa", 1e-8, 1e8);
/// Wave speed c.
pub const WAVE_SPEED: ValueRange = ValueRange::closed("c", 1e-8, 1e8);
/// Poisson screening ε.
pub const EPS: ValueRange = ValueRange::closed("eps", 1e-8, 1e8);
/// Time τ of the heat and wave filters.
pub const TAU: ValueRange = ValueRange::closed("tau", 1e-8, 1e8);
/// Router temperature T.
pub const TEMPERATURE: ValueRange = ValueRange::closed("temperature", 1e-8, 1e8);
/// Wave damping γ.
pub const GAMMA: ValueRange = ValueRange::closed("gamma", 0.0, 1e8);
/// Route-regularization weight λ.
pub const ROUTE_WEIGHT: ValueRange = ValueRange::closed("route_weight", 0.0, 1e4);
/// Peak learning rate.
pub const LR: ValueRange = ValueRange {
    name: "lr",
    min: 0.0,
    max: 1e3,
    open_min: true,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_values_that_f64_holds_but_f32_does_not() {
        // κ = 1e39 is finite in f64 and inf in f32; ε = 1e-50 is positive in f64 and 0 in f32.
        let e = KAPPA.check(1e39).expect_err("1e39 is outside");
        assert_eq!(e.to_string(), "kappa = 1e39 is outside its range [1e-8, 1e8]");
        assert!(EPS.check(1e-50).is_err());
        assert!(TAU.check(1e300).is_err());
        assert!(KAPPA.check(f64::NAN).is_err());
        assert!(GAMMA.check(f64::INFINITY).is_err());
        assert!(GAMMA.check(-1e-300).is_err());
    }

    #[test]
    fn takes_both_ends() {
        for r in [KAPPA, WAVE_SPEED, EPS, TAU, TEMPERATURE] {
            assert_eq!(r.check(1e-8), Ok(1e-8), "{}", r.name);
            assert_eq!(r.check(1e8), Ok(1e8), "{}", r.name);
            assert!(r.check(0.99e-8).is_err() && r.check(1.01e8).is_err(), "{}", r.name);
        }
        assert_eq!(GAMMA.check(0.0), Ok(0.0));
        assert_eq!(ROUTE_WEIGHT.check(1e4), Ok(1e4));
        assert!(ROUTE_WEIGHT.check(1.0001e4).is_err());
        assert!(LR.check(0.0).is_err(), "lr's lower end is open");
        assert_eq!(LR.check(50.0), Ok(50.0), "the breaking-it lesson's lr");
        assert_eq!(LR.to_string(), "(0, 1e3]");
        assert_eq!(ROUTE_WEIGHT.to_string(), "[0, 1e4]");
        assert!(LR.check(1e-320).is_err(), "a positive f64 that is 0 in f32");
    }
}
