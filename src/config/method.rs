//! The fine-tuning method and its hyper-parameters ([`MethodConfig`]), and the one catalogue of
//! named method variants that `moppa compare`, `moppa params` and the app share.

use super::prior::Prior;
use serde::{Deserialize, Serialize};

/// The fine-tuning method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, Hash)]
#[serde(rename_all = "lowercase")]
pub enum MethodKind {
    /// Mixture of Physical Priors Adapter.
    #[default]
    Moppa,
    /// Low-rank update of q and v.
    Lora,
    /// A bottleneck beside each MLP.
    Adaptformer,
    /// Head only.
    Linear,
    /// Everything.
    Full,
}

impl MethodKind {
    /// All methods, in the order tables list them.
    pub const ALL: [Self; 5] = [Self::Linear, Self::Full, Self::Lora, Self::Adaptformer, Self::Moppa];

    /// Name as on the command line.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Moppa => "moppa",
            Self::Lora => "lora",
            Self::Adaptformer => "adaptformer",
            Self::Linear => "linear",
            Self::Full => "full",
        }
    }
}

impl std::fmt::Display for MethodKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a MoPPA unit reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// Before self-attention: `x ← x + MoPPA(norm1(x))`.
    #[default]
    PreAttn,
    /// Beside the MLP: `x ← x_mid + MLP(norm2(x_mid)) + MoPPA(norm2(x_mid))`.
    ParallelMlp,
}

/// Router granularity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RouterKind {
    /// One mixture per token.
    #[default]
    Token,
    /// One mixture per image (from the mean patch token).
    Image,
    /// One learned mixture per block.
    Layer,
}

/// Method hyper-parameters (flat, so every field is also a `--flag` and a TOML key).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MethodConfig {
    /// Which method.
    pub method: MethodKind,
    /// Rank r (MoPPA, LoRA) or bottleneck width (AdaptFormer).
    pub rank: usize,
    /// MoPPA placement.
    pub placement: Placement,
    /// MoPPA router.
    pub router: RouterKind,
    /// Active priors, in the order heat, wave, Poisson.
    pub priors: Vec<Prior>,
    /// Route-regularization weight λ ≥ 0.
    pub route_weight: f64,
    /// Time τ > 0 of the heat and wave filters.
    pub tau: f64,
    /// Wave damping γ ≥ 0.
    pub gamma: f64,
    /// Router temperature T > 0.
    pub temperature: f64,
    /// Output scale s of the MoPPA up-projection.
    pub scale: f64,
    /// LoRA α (scale α/r); `None` = r.
    pub lora_alpha: Option<f64>,
}

impl Default for MethodConfig {
    fn default() -> Self {
        Self {
            method: MethodKind::Moppa,
            rank: 8,
            placement: Placement::PreAttn,
            router: RouterKind::Token,
            priors: Prior::ALL.to_vec(),
            route_weight: 0.01,
            tau: 1.0,
            gamma: 0.0,
            temperature: 1.0,
            scale: 1.0,
            lora_alpha: None,
        }
    }
}

impl MethodConfig {
    /// A method with every other setting at its default.
    #[must_use]
    pub fn of(method: MethodKind) -> Self {
        Self {
            method,
            ..Self::default()
        }
    }

    /// Validates ranges; the error names the field and value.
    pub fn validate(&self) -> Result<(), String> {
        if self.rank == 0 {
            return Err("rank must be ≥ 1".into());
        }
        let check = |r: super::ValueRange, v: f64| r.check(v).map(drop).map_err(|e| e.to_string());
        check(super::range::TAU, self.tau)?;
        check(super::range::TEMPERATURE, self.temperature)?;
        check(super::range::GAMMA, self.gamma)?;
        check(super::range::ROUTE_WEIGHT, self.route_weight)?;
        if !self.scale.is_finite() {
            return Err(format!("scale must be finite (got {})", self.scale));
        }
        if let Some(a) = self.lora_alpha
            && !(a.is_finite() && a > 0.0)
        {
            return Err(format!("lora-alpha must be > 0 (got {})", crate::util::short_number(a)));
        }
        if self.method == MethodKind::Moppa {
            if self.priors.is_empty() {
                return Err("priors: choose at least one of heat, wave, poisson".into());
            }
            let mut sorted = self.priors.clone();
            sorted.sort();
            sorted.dedup();
            if sorted.len() != self.priors.len() {
                return Err("priors: each prior at most once".into());
            }
        }
        Ok(())
    }

    /// Active priors in canonical order.
    #[must_use]
    pub fn active_priors(&self) -> Vec<Prior> {
        let mut p = self.priors.clone();
        p.sort();
        p.dedup();
        p
    }

    /// A short label for tables: `moppa r8`, `moppa r8 λ=0`, `moppa heat`, `lora r8`.
    #[must_use]
    pub fn label(&self) -> String {
        match self.method {
            MethodKind::Moppa => {
                let priors = self.active_priors();
                let mut s = format!("moppa r{}", self.rank);
                if priors.len() < 3 {
                    let names: Vec<&str> = priors.iter().map(|p| p.name()).collect();
                    s = format!("{s} {}", names.join("+"));
                }
                if self.route_weight == 0.0 && priors.len() > 1 {
                    s.push_str(" λ=0");
                }
                if self.placement == Placement::ParallelMlp {
                    s.push_str(" parallel");
                }
                if self.router != RouterKind::Token && priors.len() > 1 {
                    s = format!(
                        "{s} {}-router",
                        match self.router {
                            RouterKind::Image => "image",
                            _ => "layer",
                        }
                    );
                }
                s
            }
            MethodKind::Lora | MethodKind::Adaptformer => format!("{} r{}", self.method, self.rank),
            m => m.name().to_owned(),
        }
    }
}

/// A named method variant: what `moppa compare --methods` and `moppa params` list.
#[derive(Clone, Copy, Debug)]
pub struct NamedMethod {
    /// Name on the command line.
    pub name: &'static str,
    /// What it is, in one phrase.
    pub about: &'static str,
    /// The variant from the run's own method settings (rank, priors, λ, … of `base`).
    pub build: fn(&MethodConfig) -> MethodConfig,
}

impl NamedMethod {
    /// The variant's configuration on top of `base`.
    #[must_use]
    pub fn config(&self, base: &MethodConfig) -> MethodConfig {
        (self.build)(base)
    }
}

fn with_kind(base: &MethodConfig, method: MethodKind) -> MethodConfig {
    MethodConfig { method, ..base.clone() }
}

fn with_prior(base: &MethodConfig, prior: Prior) -> MethodConfig {
    MethodConfig {
        priors: vec![prior],
        ..with_kind(base, MethodKind::Moppa)
    }
}

/// Every named method variant, in the order tables list them.
pub const METHOD_CATALOGUE: [NamedMethod; 12] = [
    NamedMethod {
        name: "linear",
        about: "linear probe: the head only",
        build: |_| MethodConfig::of(MethodKind::Linear),
    },
    NamedMethod {
        name: "full",
        about: "full fine-tuning: every weight",
        build: |_| MethodConfig::of(MethodKind::Full),
    },
    NamedMethod {
        name: "lora",
        about: "LoRA on q and v at the run's rank",
        build: |b| MethodConfig {
            rank: b.rank,
            lora_alpha: b.lora_alpha,
            ..MethodConfig::of(MethodKind::Lora)
        },
    },
    NamedMethod {
        name: "adaptformer",
        about: "AdaptFormer beside the MLP, bottleneck = the run's rank",
        build: |b| MethodConfig {
            rank: b.rank,
            ..MethodConfig::of(MethodKind::Adaptformer)
        },
    },
    NamedMethod {
        name: "moppa",
        about: "MoPPA with the run's settings",
        build: |b| with_kind(b, MethodKind::Moppa),
    },
    NamedMethod {
        name: "moppa-noroute",
        about: "MoPPA without route regularization (λ = 0)",
        build: |b| MethodConfig {
            route_weight: 0.0,
            ..with_kind(b, MethodKind::Moppa)
        },
    },
    NamedMethod {
        name: "moppa-image",
        about: "MoPPA with one mixture per image",
        build: |b| MethodConfig {
            router: RouterKind::Image,
            ..with_kind(b, MethodKind::Moppa)
        },
    },
    NamedMethod {
        name: "moppa-layer",
        about: "MoPPA with one learned mixture per block",
        build: |b| MethodConfig {
            router: RouterKind::Layer,
            ..with_kind(b, MethodKind::Moppa)
        },
    },
    NamedMethod {
        name: "moppa-parallel",
        about: "MoPPA beside the MLP instead of before attention",
        build: |b| MethodConfig {
            placement: Placement::ParallelMlp,
            ..with_kind(b, MethodKind::Moppa)
        },
    },
    NamedMethod {
        name: "heat",
        about: "MoPPA with the heat prior alone",
        build: |b| with_prior(b, Prior::Heat),
    },
    NamedMethod {
        name: "wave",
        about: "MoPPA with the wave prior alone",
        build: |b| with_prior(b, Prior::Wave),
    },
    NamedMethod {
        name: "poisson",
        about: "MoPPA with the Poisson prior alone",
        build: |b| with_prior(b, Prior::Poisson),
    },
];

/// The variants `moppa compare` runs by default.
pub const COMPARE_DEFAULT: &str = "linear,full,lora,adaptformer,moppa,moppa-noroute,heat,wave,poisson";

/// A named variant on top of `base`, or `None` for an unknown name.
#[must_use]
pub fn named_method(name: &str, base: &MethodConfig) -> Option<MethodConfig> {
    METHOD_CATALOGUE.iter().find(|m| m.name == name).map(|m| m.config(base))
}

/// The catalogue's names, for messages.
#[must_use]
pub fn method_names() -> String {
    METHOD_CATALOGUE.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
}
