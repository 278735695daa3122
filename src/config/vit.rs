//! The backbone's architecture ([`VitConfig`], timm's `VisionTransformer` arguments) and the one
//! catalogue of named presets that training, benchmarks, pretraining and `moppa params` share.

use super::arch::Activation;
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
    /// The MLP's activation.
    pub act: Activation,
    /// How evaluation resizes images for a timm checkpoint (its `pretrained_cfg`); `None`:
    /// stretched to the square input (our backbones).
    pub eval_crop: Option<EvalCrop>,
    /// Per-channel input mean (after scaling pixels to 0..1).
    pub mean: [f32; 3],
    /// Per-channel input std.
    pub std: [f32; 3],
    /// Prefix tokens (class + register + distillation); derived, stored for readers.
    pub prefix_tokens: usize,
}

/// timm's evaluation resize: the shorter side to `floor(size / crop_pct)`, then the centre
/// `size × size`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalCrop {
    /// Fraction of the resized image the centre crop keeps.
    pub crop_pct: f64,
    /// Resampling filter.
    pub interpolation: Interpolation,
}

/// A resampling filter, by timm's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    /// `nearest`.
    Nearest,
    /// `bilinear`.
    Bilinear,
    /// `bicubic` (Catmull-Rom, a = −0.5, as PIL).
    Bicubic,
    /// `lanczos`.
    Lanczos,
}

impl Interpolation {
    /// From timm's name (`bicubic`, …); unknown names are `None`.
    #[must_use]
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "nearest" => Some(Self::Nearest),
            "bilinear" => Some(Self::Bilinear),
            "bicubic" => Some(Self::Bicubic),
            "lanczos" => Some(Self::Lanczos),
            _ => None,
        }
    }
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
            act: Activation::Gelu,
            eval_crop: None,
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

/// A named backbone architecture: the one table every command reads.
#[derive(Clone, Copy, Debug)]
pub struct VitPreset {
    /// Name on the command line (`tiny`, `vit-b16`, …).
    pub name: &'static str,
    /// What it is.
    pub about: &'static str,
    /// Its configuration (with timm's 1000-class head, or 10 classes for `tiny`).
    pub config: fn() -> VitConfig,
}

/// Every preset, smallest first.
pub const VIT_PRESETS: [VitPreset; 5] = [
    VitPreset {
        name: "tiny",
        about: "32 px, patch 4, D 96, depth 4, 3 heads (the built-in backbone's shape and the speed targets')",
        config: VitConfig::tiny,
    },
    VitPreset {
        name: "vit-ti16",
        about: "ViT-Ti/16 (timm vit_tiny_patch16_224)",
        config: VitConfig::vit_ti16,
    },
    VitPreset {
        name: "vit-s16",
        about: "ViT-S/16 (timm vit_small_patch16_224)",
        config: VitConfig::vit_s16,
    },
    VitPreset {
        name: "vit-b16",
        about: "ViT-B/16 (timm vit_base_patch16_224)",
        config: VitConfig::vit_b16,
    },
    VitPreset {
        name: "vit-l16",
        about: "ViT-L/16 (timm vit_large_patch16_224)",
        config: VitConfig::vit_l16,
    },
];

impl VitConfig {
    /// A preset by name.
    #[must_use]
    pub fn preset(name: &str) -> Option<Self> {
        VIT_PRESETS.iter().find(|p| p.name == name).map(|p| (p.config)())
    }

    /// The preset names, for messages: `tiny, vit-ti16, …`.
    #[must_use]
    pub fn preset_names() -> String {
        VIT_PRESETS.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
    }
}
