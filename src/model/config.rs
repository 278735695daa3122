//! Backbone and method configuration: plain serde data with named presets.

use crate::physics::Prior;
use serde::{Deserialize, Serialize};

/// How the backbone turns tokens into one feature vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    /// The class token (timm `global_pool='token'`).
    #[default]
    Token,
    /// The mean of the patch tokens (timm `global_pool='avg'`; MAE checkpoints).
    Avg,
}

/// The timm `VisionTransformer` arguments that matter, as stored in our backbone files'
/// `moppa.backbone` metadata (see INTERFACES.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[allow(clippy::struct_excessive_bools)] // timm's own flags, one per optional tensor
pub struct VitConfig {
    /// Input image side (square), pixels.
    pub img_size: usize,
    /// Patch side, pixels.
    pub patch_size: usize,
    /// Input channels.
    pub in_chans: usize,
    /// Width `D`.
    pub embed_dim: usize,
    /// Number of transformer blocks.
    pub depth: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// MLP hidden width = `int(D · mlp_ratio)`.
    pub mlp_ratio: f64,
    /// Whether the qkv projection has a bias.
    pub qkv_bias: bool,
    /// A class token leads the sequence.
    pub class_token: bool,
    /// Register tokens after the class token.
    pub reg_tokens: usize,
    /// A distillation token (DeiT distilled) after the class token.
    pub dist_token: bool,
    /// Position embeddings cover only the patch tokens (added before the prefix is joined).
    pub no_embed_class: bool,
    /// Pooling.
    pub pool: Pool,
    /// `fc_norm` after pooling.
    pub fc_norm: bool,
    /// The final `norm` (timm replaces it by `fc_norm` for avg pooling).
    pub final_norm: bool,
    /// `norm_pre` before the blocks.
    pub norm_pre: bool,
    /// Layer scale (`ls1.gamma`, `ls2.gamma`).
    pub layer_scale: bool,
    /// The patch embedding has a bias.
    pub patch_bias: bool,
    /// Classes of the backbone's own head (0: no head).
    pub num_classes: usize,
    /// LayerNorm epsilon.
    pub ln_eps: f64,
    /// Per-channel input mean (after scaling pixels to 0..1).
    pub mean: [f32; 3],
    /// Per-channel input std.
    pub std: [f32; 3],
    /// Prefix tokens (class + register + distillation); derived, stored for readers.
    pub prefix_tokens: usize,
}

/// ImageNet normalisation, timm's default.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet std.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

impl Default for VitConfig {
    fn default() -> Self {
        Self::vit_b16()
    }
}

impl VitConfig {
    fn base(img: usize, patch: usize, d: usize, depth: usize, heads: usize, classes: usize) -> Self {
        let mut c = Self {
            img_size: img,
            patch_size: patch,
            in_chans: 3,
            embed_dim: d,
            depth,
            num_heads: heads,
            mlp_ratio: 4.0,
            qkv_bias: true,
            class_token: true,
            reg_tokens: 0,
            dist_token: false,
            no_embed_class: false,
            pool: Pool::Token,
            fc_norm: false,
            final_norm: true,
            norm_pre: false,
            layer_scale: false,
            patch_bias: true,
            num_classes: classes,
            ln_eps: 1e-6,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            prefix_tokens: 0,
        };
        c.prefix_tokens = c.derived_prefix_tokens();
        c
    }

    /// The speed issue's tiny configuration: 32 px, patch 4, D 96, depth 4, 3 heads, 10 classes.
    #[must_use]
    pub fn tiny() -> Self {
        Self::base(32, 4, 96, 4, 3, 10)
    }

    /// ViT-Ti/16 (timm `vit_tiny_patch16_224`).
    #[must_use]
    pub fn vit_ti16() -> Self {
        Self::base(224, 16, 192, 12, 3, 1000)
    }

    /// ViT-S/16 (timm `vit_small_patch16_224`).
    #[must_use]
    pub fn vit_s16() -> Self {
        Self::base(224, 16, 384, 12, 6, 1000)
    }

    /// ViT-B/16 (timm `vit_base_patch16_224`).
    #[must_use]
    pub fn vit_b16() -> Self {
        Self::base(224, 16, 768, 12, 12, 1000)
    }

    /// ViT-L/16 (timm `vit_large_patch16_224`).
    #[must_use]
    pub fn vit_l16() -> Self {
        Self::base(224, 16, 1024, 24, 16, 1000)
    }

    /// Class + register + distillation tokens.
    #[must_use]
    pub fn derived_prefix_tokens(&self) -> usize {
        usize::from(self.class_token) + self.reg_tokens + usize::from(self.dist_token)
    }

    /// Patch-grid side `H = W = img_size / patch_size`.
    #[must_use]
    pub fn grid(&self) -> usize {
        self.img_size / self.patch_size.max(1)
    }

    /// Tokens per image (prefix + patches).
    #[must_use]
    pub fn tokens(&self) -> usize {
        self.derived_prefix_tokens() + self.grid() * self.grid()
    }

    /// MLP hidden width, as timm computes it.
    #[must_use]
    pub fn mlp_hidden(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }

    /// Checks internal consistency; the error says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.patch_size == 0 || !self.img_size.is_multiple_of(self.patch_size) {
            return Err(format!(
                "img_size {} is not a multiple of patch_size {}",
                self.img_size, self.patch_size
            ));
        }
        if self.num_heads == 0 || !self.embed_dim.is_multiple_of(self.num_heads) {
            return Err(format!(
                "embed_dim {} is not divisible by num_heads {}",
                self.embed_dim, self.num_heads
            ));
        }
        if self.depth == 0 || self.embed_dim == 0 || self.in_chans == 0 {
            return Err("depth, embed_dim and in_chans must be positive".into());
        }
        if self.pool == Pool::Token && !self.class_token {
            return Err("token pooling needs a class token".into());
        }
        if self.std.iter().any(|s| *s <= 0.0 || !s.is_finite()) {
            return Err(format!("normalisation std {:?} must be positive", self.std));
        }
        Ok(())
    }
}

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
        let pos = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("{name} must be > 0 (got {v})"))
            }
        };
        let nonneg = |name: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(format!("{name} must be ≥ 0 (got {v})"))
            }
        };
        pos("tau", self.tau)?;
        pos("temperature", self.temperature)?;
        nonneg("gamma", self.gamma)?;
        nonneg("route-weight", self.route_weight)?;
        if !self.scale.is_finite() {
            return Err(format!("scale must be finite (got {})", self.scale));
        }
        if let Some(a) = self.lora_alpha {
            pos("lora-alpha", a)?;
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
